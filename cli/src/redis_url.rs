//! Redis locations as the services take them: `redis://[user:password@]HOST:PORT[/DB]`, with an
//! optional `?prefix=P` naming the key prefix (so that several fleets can share one Redis).
//! Only the syntax is checked here; a service hands [`RedisUrl::url`] to its Redis client,
//! which checks the rest. Passwords never reach logs or errors ([`redact`]).

/// Longest accepted key prefix (bytes).
pub const MAX_PREFIX_LEN: usize = 64;

/// A parsed Redis location.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `redis://[user:password@]host:port[/db]` (without the query).
    pub url: String,
    /// Key prefix (`?prefix=`, else the default the caller gave).
    pub prefix: String,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl RedisUrl {
    /// Parse `text`; errors start with `what` (the setting's name, e.g. `store`) and never show
    /// the password. `default_prefix` applies when the URL names none.
    pub fn parse(text: &str, what: &str, default_prefix: &str) -> Result<Self, String> {
        let shown = redact(text);
        let Some(rest) = text.strip_prefix("redis://") else {
            return Err(format!(
                "{what} {shown:?}: expected redis://HOST:PORT[/DB][?prefix=P]"
            ));
        };
        let (base, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let mut prefix = default_prefix.to_owned();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("prefix", p)) => prefix = p.to_owned(),
                _ => {
                    return Err(format!(
                        "{what} {shown:?}: unknown parameter {pair:?} (only prefix=)"
                    ));
                }
            }
        }
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_LEN
            || !prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "{what} prefix {prefix:?} must be 1..={MAX_PREFIX_LEN} printable ASCII bytes"
            ));
        }
        if base.is_empty() || base.starts_with('/') {
            return Err(format!("{what} {shown:?}: no host"));
        }
        Ok(Self {
            url: format!("redis://{base}"),
            prefix,
        })
    }

    /// The location without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        format!("{}?prefix={}", redact(&self.url), self.prefix)
    }
}

/// `text` with the password of its `user:password@` part replaced by `***`.
pub fn redact(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_owned();
    };
    let Some((auth, host)) = rest.rsplit_once('@') else {
        return text.to_owned();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_their_prefix_and_hide_passwords() {
        let u = RedisUrl::parse("redis://u:pw@h:1/2?prefix=fleet-a", "store", "d").unwrap();
        assert_eq!(
            (u.url.as_str(), u.prefix.as_str()),
            ("redis://u:pw@h:1/2", "fleet-a")
        );
        assert!(!format!("{u:?}").contains("pw"));
        assert_eq!(
            RedisUrl::parse("redis://h:1", "store", "d").unwrap().prefix,
            "d"
        );
        for bad in [
            "h:1",
            "http://u:pw@h:1",
            "redis://",
            "redis:///3",
            "redis://h:1?db=2",
            "redis://h:1?prefix=",
            "redis://h:1?prefix=has space",
        ] {
            let e = RedisUrl::parse(bad, "throttle store", "d").unwrap_err();
            assert!(e.starts_with("throttle store"), "{bad}: {e}");
            assert!(!e.contains("pw"), "{e}");
        }
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://:pw@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
