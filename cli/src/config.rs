//! Configuration layering, one rule for every service: **the TOML file, then the environment,
//! then the flags**. A value given later wins; a setting given nowhere takes its default.
//!
//! Each service has two types:
//!
//! - its *settings*: one serde type that is the file format, with `deny_unknown_fields`, every
//!   default in one place (`#[serde(default)]` and its `Default`), and durations through
//!   [`duration`];
//! - its *flags*: the clap struct, where every setting is an `Option` (or a `Vec`, or a `bool`
//!   switch) and which derives `Serialize` under the settings' key names. Environment variables
//!   are clap `env` attributes on flags, so clap already puts a flag before its variable. Unset
//!   flags must not serialize: `None` is left out by the TOML serializer, empty lists and unset
//!   switches need `#[serde(skip_serializing_if = "Vec::is_empty")]` /
//!   `"std::ops::Not::not"`; `--config` itself is `#[serde(skip)]`.
//!
//! [`load`] reads the file into a TOML table and checks it on its own (a mistake in the file is
//! an error even where a flag replaces the value), lays the serialized flags over it (a key
//! that is set replaces the file's value, a list replaces the file's whole list, tables merge
//! key by key) and deserializes the settings from the result. Every error names where the value
//! came from (the file's path, or the command line and environment) and the key: an unknown
//! key, a value of the wrong type, a duration that does not parse. Checks that need several values together
//! stay with each service (its `validate`), after loading and before anything is bound.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where a refused value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The TOML file at this path.
    File(PathBuf),
    /// A flag or the environment variable behind it.
    Flags,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "config {}", p.display()),
            Origin::Flags => f.write_str("command line or environment"),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {}: {source}", path.display())]
    Read {
        /// The path given.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config {}: {message}", path.display())]
    Syntax {
        /// The path given.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key the settings do not have.
    #[error("{origin}: unknown key `{key}`{expected}")]
    UnknownKey {
        /// Where the key came from.
        origin: Origin,
        /// The key, dotted inside tables.
        key: String,
        /// The keys that would have been accepted there (`, expected one of ...`).
        expected: String,
    },
    /// A value is refused (wrong type, out of range, a duration that does not parse).
    #[error("{origin}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Value {
        /// Where the value came from.
        origin: Origin,
        /// The key (dotted inside tables, `[i]` for list entries), when known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// The flags could not be written as TOML (a value TOML cannot hold).
    #[error("command line or environment: {0}")]
    Flags(String),
}

/// Overrides that set nothing: [`load`] with them reads the file alone.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct NoOverrides {}

/// Load settings `T`: the TOML `file` when given, with `overrides` (the serialized flags,
/// environment included) laid over it, deserialized once.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    overrides: &impl Serialize,
) -> Result<T, ConfigError> {
    let base = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            Some((path, parse_table(path, &text)?))
        }
        None => None,
    };
    layer(base, overrides)
}

/// Load settings `T` from the TOML file alone.
pub fn load_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    load(Some(path), &NoOverrides {})
}

/// Load settings `T` from TOML text, as if read from `path`, with `overrides` over it.
pub fn load_str<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    overrides: &impl Serialize,
) -> Result<T, ConfigError> {
    layer(Some((path, parse_table(path, text)?)), overrides)
}

fn parse_table(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
}

fn layer<T: DeserializeOwned>(
    base: Option<(&Path, toml::Table)>,
    overrides: &impl Serialize,
) -> Result<T, ConfigError> {
    let over = toml::Table::try_from(overrides).map_err(|e| ConfigError::Flags(e.to_string()))?;
    let Some((path, mut table)) = base else {
        return deserialize(over, &|_| Origin::Flags);
    };
    // The file must be valid on its own, also where a flag replaces a value: a mistake in it
    // is reported now, not once the flag is dropped.
    deserialize::<T>(table.clone(), &|_| Origin::File(path.to_owned()))?;
    let from_flags: Vec<String> = over.keys().cloned().collect();
    overlay(&mut table, over);
    deserialize(table, &|top| match top {
        Some(k) if !from_flags.iter().any(|f| f == k) => Origin::File(path.to_owned()),
        _ => Origin::Flags,
    })
}

/// Deserialize `T` from `table`; `origin` tells where a value under a top-level key came from.
fn deserialize<T: DeserializeOwned>(
    table: toml::Table,
    origin: &dyn Fn(Option<&str>) -> Origin,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        use serde_path_to_error::Segment;
        let segments: Vec<&Segment> = e.path().iter().collect();
        let top = match segments.first() {
            Some(Segment::Map { key }) => Some(key.as_str()),
            _ => None,
        };
        let origin = origin(top);
        let key = (!segments.is_empty()).then(|| e.path().to_string());
        // The TOML deserializer's own message, without the location it appends ("in `key`"):
        // the key is named above.
        let message = e.inner().message().trim_end().to_owned();
        // The unknown key is the path's last segment: serde says `unknown field `name`, ...`.
        if let (Some(key), Some(Segment::Map { key: last })) = (&key, segments.last())
            && let Some(expected) = message.strip_prefix(&format!("unknown field `{last}`"))
        {
            return ConfigError::UnknownKey {
                origin,
                key: key.clone(),
                expected: expected.to_owned(),
            };
        }
        ConfigError::Value {
            origin,
            key,
            message,
        }
    })
}

/// Lay `over` on `base`: tables merge key by key, any other value (lists included) replaces.
fn overlay(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => overlay(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Serde for a [`Duration`] setting, `#[serde(with = "peerlink_cli::config::duration")]`.
///
/// Reads humantime's syntax as a string (`"500ms"`, `"30s"`, `"1h 30m"`, `"7d"`, or bare
/// seconds `"30"`, see [`crate::parse_duration`]) or a non-negative number of seconds (`30`,
/// `2.5`); writes humantime's syntax.
pub mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de};

    /// Write `d` as humantime text (`15m`, `1h 30m`, `500ms`).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Read a duration string or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(Visit)
    }

    struct Visit;

    impl de::Visitor<'_> for Visit {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"500ms\", \"30s\", \"1h 30m\", or a number of seconds")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("bad duration {v}: negative")))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(v).map_err(|e| E::custom(format!("bad duration {v}: {e}")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            crate::parse_duration(v).map_err(E::custom)
        }
    }

    /// The same for an `Option<Duration>` (absent: `None`, with `#[serde(default)]`).
    pub mod option {
        use std::time::Duration;

        use serde::{Deserializer, Serializer};

        /// Write a set duration as humantime text (`None` is left out by the TOML serializer).
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Read a duration string or a number of seconds.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// Serde for a setting that is one URL or several, `#[serde(default, deserialize_with =
/// "peerlink_cli::config::url_list::deserialize")]` on an `Option<String>`: reads a string
/// (itself possibly comma-separated) or an array of strings, and gives them joined by commas;
/// an empty array is `None`. The flag side is a repeatable, comma-delimited `Vec<String>`
/// flag, which serializes as an array.
pub mod url_list {
    use std::fmt;

    use serde::{Deserializer, de};

    /// Read a string or an array of strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(Visit)
    }

    struct Visit;

    impl<'de> de::Visitor<'de> for Visit {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a URL, a comma-separated list of URLs, or an array of URLs")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut all: Vec<String> = Vec::new();
            while let Some(one) = seq.next_element::<String>()? {
                all.push(one);
            }
            Ok((!all.is_empty()).then(|| all.join(",")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    /// A service's settings: the file format, defaults in one place.
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Settings {
        listen: std::net::SocketAddr,
        name: String,
        peers: Vec<String>,
        workers: Option<u32>,
        verbose: bool,
        #[serde(with = "duration")]
        timeout: Duration,
        limits: Limits,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Limits {
        rate: u32,
        burst: u32,
    }

    impl Default for Settings {
        fn default() -> Self {
            Settings {
                listen: "127.0.0.1:1000".parse().unwrap(),
                name: "default".into(),
                peers: vec!["d1".into()],
                workers: None,
                verbose: false,
                timeout: Duration::from_secs(30),
                limits: Limits::default(),
            }
        }
    }

    impl Default for Limits {
        fn default() -> Self {
            Limits { rate: 1, burst: 2 }
        }
    }

    /// Its flags: unset ones serialize to nothing.
    #[derive(Debug, Default, Serialize)]
    struct Flags {
        listen: Option<std::net::SocketAddr>,
        name: Option<String>,
        #[serde(rename = "peers", skip_serializing_if = "Vec::is_empty")]
        peer: Vec<String>,
        workers: Option<u32>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        verbose: bool,
        #[serde(with = "duration::option")]
        timeout: Option<Duration>,
        limits: Option<LimitFlags>,
    }

    #[derive(Debug, Default, Serialize)]
    struct LimitFlags {
        burst: Option<u32>,
    }

    fn file(text: &str, flags: &Flags) -> Result<Settings, ConfigError> {
        load_str(Path::new("/etc/svc.toml"), text, flags)
    }

    #[test]
    fn nothing_given_is_the_defaults() {
        let s: Settings = load(None, &Flags::default()).unwrap();
        assert_eq!(s, Settings::default());
        let s: Settings = load(None, &NoOverrides {}).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn file_only() {
        let s = file(
            "listen = \"10.0.0.1:2000\"\npeers = [\"a\", \"b\"]\ntimeout = \"1h 30m\"\n\
             [limits]\nrate = 7\n",
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(s.listen, "10.0.0.1:2000".parse().unwrap());
        assert_eq!(s.peers, ["a", "b"]);
        assert_eq!(s.timeout, Duration::from_secs(5400));
        assert_eq!(s.limits, Limits { rate: 7, burst: 2 });
        assert_eq!(
            s.name, "default",
            "keys the file leaves out keep their default"
        );
    }

    #[test]
    fn a_set_flag_replaces_the_file_value_and_unset_ones_leave_it() {
        let text = "name = \"file\"\nworkers = 3\nverbose = true\ntimeout = 5\n[limits]\nrate = 7\nburst = 8\n";
        let s = file(text, &Flags::default()).unwrap();
        assert_eq!(
            (s.name.as_str(), s.workers, s.verbose),
            ("file", Some(3), true)
        );
        let flags = Flags {
            name: Some("flag".into()),
            timeout: Some(Duration::from_millis(1500)),
            limits: Some(LimitFlags { burst: Some(9) }),
            ..Flags::default()
        };
        let s = file(text, &flags).unwrap();
        assert_eq!(s.name, "flag");
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(
            s.workers,
            Some(3),
            "an unset Option flag leaves the file's value"
        );
        assert!(s.verbose, "an unset switch leaves the file's true");
        assert_eq!(
            s.limits,
            Limits { rate: 7, burst: 9 },
            "tables merge key by key"
        );
    }

    #[test]
    fn lists_replace_and_empty_lists_do_not() {
        let text = "peers = [\"f1\", \"f2\", \"f3\"]\n";
        let s = file(text, &Flags::default()).unwrap();
        assert_eq!(s.peers, ["f1", "f2", "f3"], "no flag: the file's list");
        let flags = Flags {
            peer: vec!["c1".into()],
            ..Flags::default()
        };
        let s = file(text, &flags).unwrap();
        assert_eq!(
            s.peers,
            ["c1"],
            "the flags' list replaces the file's, no append"
        );
        let s: Settings = load(None, &flags).unwrap();
        assert_eq!(s.peers, ["c1"], "and the default's");
        let s = file("peers = []\n", &Flags::default()).unwrap();
        assert!(s.peers.is_empty(), "the file may empty a default list");
    }

    #[test]
    fn unknown_key_names_the_key_and_the_file() {
        let e = file("listen = \"10.0.0.1:2000\"\nlisen = 3\n", &Flags::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "config /etc/svc.toml: unknown key `lisen`, expected one of `listen`, "
            ),
            "{msg}"
        );
        assert!(
            matches!(&e, ConfigError::UnknownKey { origin: Origin::File(p), key, .. }
                if p == Path::new("/etc/svc.toml") && key == "lisen"),
            "{e:?}"
        );
        // In a table the key is dotted.
        let e = file("[limits]\nrat = 1\n", &Flags::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config /etc/svc.toml: unknown key `limits.rat`, expected `rate` or `burst`"
        );
    }

    #[test]
    fn bad_duration_names_the_key_and_the_file() {
        let e = file("timeout = \"soon\"\n", &Flags::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config /etc/svc.toml: key `timeout`: bad duration \"soon\": expected number at 0 \
             (use e.g. 500ms, 30s, 15m, 1h 30m, 7d, or seconds)"
        );
        match e {
            ConfigError::Value { key, origin, .. } => {
                assert_eq!(key.as_deref(), Some("timeout"));
                assert_eq!(origin, Origin::File("/etc/svc.toml".into()));
            }
            other => panic!("{other:?}"),
        }
        let e = file("timeout = -3\n", &Flags::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("key `timeout`: bad duration -3: negative"),
            "{e}"
        );
        let e = file("timeout = true\n", &Flags::default()).unwrap_err();
        assert!(e.to_string().contains("key `timeout`: invalid type"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_value_name_the_key() {
        let e = file("workers = \"four\"\n", &Flags::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config /etc/svc.toml: key `workers`: invalid type: string \"four\", expected u32"
        );
        let e = file("listen = \"nope\"\n", &Flags::default()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config /etc/svc.toml: key `listen`: "),
            "{e}"
        );
        let e = file("peers = [\"a\", 2]\n", &Flags::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("key `peers[1]`: invalid type: integer"),
            "{e}"
        );
    }

    #[test]
    fn the_file_is_valid_on_its_own_and_flag_values_are_blamed_on_the_flags() {
        // A bad file value is an error even where a flag replaces it.
        let flags = Flags {
            workers: Some(2),
            ..Flags::default()
        };
        let e = file("workers = \"four\"\n", &flags).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config /etc/svc.toml: key `workers`: "),
            "{e}"
        );
        // A flag value the settings refuse is reported as the command line's.
        #[derive(Serialize)]
        struct Bad {
            workers: &'static str,
        }
        let e = load_str::<Settings>(Path::new("/etc/svc.toml"), "", &Bad { workers: "x" })
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("command line or environment: key `workers`: "),
            "{e}"
        );
    }

    #[test]
    fn syntax_and_read_errors_name_the_file() {
        let e = file("listen = \n", &Flags::default()).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("config /etc/svc.toml: "), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
        let e = load::<Settings>(Some(Path::new("/nonexistent/svc.toml")), &Flags::default())
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("reading config /nonexistent/svc.toml: "),
            "{e}"
        );
    }

    #[test]
    fn load_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.toml");
        std::fs::write(&path, "name = \"on disk\"\n").unwrap();
        let s: Settings = load_file(&path).unwrap();
        assert_eq!(s.name, "on disk");
        let s: Settings = load(
            Some(&path),
            &Flags {
                name: Some("flag".into()),
                ..Flags::default()
            },
        )
        .unwrap();
        assert_eq!(s.name, "flag");
    }

    #[test]
    fn durations_read_strings_and_numbers_and_write_humantime() {
        #[derive(Deserialize, Serialize)]
        struct D {
            #[serde(with = "duration")]
            d: Duration,
        }
        let read = |t: &str| toml::from_str::<D>(t).map(|d| d.d);
        assert_eq!(read("d = 30").unwrap(), Duration::from_secs(30));
        assert_eq!(read("d = 2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(read("d = \"30\"").unwrap(), Duration::from_secs(30));
        assert_eq!(read("d = \"500ms\"").unwrap(), Duration::from_millis(500));
        assert_eq!(read("d = \"7d\"").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(read("d = -1.5").is_err());
        assert!(read("d = \"-1s\"").is_err());
        assert!(read("d = nan").is_err());
        for ms in [0, 1, 500, 1500, 90_000, 5_400_000, 7 * 86_400_000] {
            let d = Duration::from_millis(ms);
            let text = toml::to_string(&D { d }).unwrap();
            assert_eq!(read(&text).unwrap(), d, "{text}");
        }
        assert_eq!(
            toml::to_string(&D {
                d: Duration::from_secs(5400)
            })
            .unwrap()
            .trim(),
            "d = \"1h 30m\""
        );
    }

    #[test]
    fn unrepresentable_flags_are_an_error_not_a_panic() {
        #[derive(Serialize)]
        struct Huge {
            workers: u64,
        }
        let e = load::<Settings>(None, &Huge { workers: u64::MAX }).unwrap_err();
        assert!(matches!(e, ConfigError::Flags(_)), "{e:?}");
    }

    #[test]
    fn url_lists_read_a_string_or_an_array_and_flags_replace_the_file() {
        #[derive(Debug, Default, Deserialize)]
        #[serde(default)]
        struct U {
            #[serde(deserialize_with = "url_list::deserialize")]
            directory: Option<String>,
        }
        #[derive(Serialize)]
        struct Flags {
            #[serde(skip_serializing_if = "Vec::is_empty")]
            directory: Vec<String>,
        }
        let read = |text: &str, flags: Vec<&str>| {
            let flags = Flags {
                directory: flags.into_iter().map(String::from).collect(),
            };
            load_str::<U>(Path::new("t.toml"), text, &flags).map(|u| u.directory)
        };
        assert_eq!(read("", vec![]).unwrap(), None);
        assert_eq!(
            read("directory = \"http://a:1\"", vec![])
                .unwrap()
                .as_deref(),
            Some("http://a:1")
        );
        assert_eq!(
            read("directory = [\"http://a:1\", \"http://b:2\"]", vec![])
                .unwrap()
                .as_deref(),
            Some("http://a:1,http://b:2")
        );
        assert_eq!(read("directory = []", vec![]).unwrap(), None);
        assert_eq!(
            read(
                "directory = \"http://a:1\"",
                vec!["http://c:3", "http://d:4"]
            )
            .unwrap()
            .as_deref(),
            Some("http://c:3,http://d:4"),
            "the flags' list replaces the file's"
        );
        assert!(read("directory = 5", vec![]).is_err());
        assert!(read("directory = [5]", vec![]).is_err());
    }
}
