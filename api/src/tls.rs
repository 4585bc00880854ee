//! The client side of TLS for `https://` and `wss://` servers: which certificate authorities a
//! client trusts ([`Trust`]: the system's roots, plus CA certificates read from PEM files for a
//! private fleet), as one rustls client configuration shared by the HTTP client and the
//! WebSocket connector, and what a failed handshake says ([`tls_failure`]).
//!
//! The configuration uses rustls's ring provider, TLS 1.2 and 1.3, no client certificate,
//! and offers ALPN `http/1.1` only: the signaling WebSocket is an HTTP/1.1 upgrade.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Unreadable, not PEM, or without a certificate.
    #[error("CA file {path}: {reason}")]
    Read {
        /// The file given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A certificate in the file is not a usable trust anchor.
    #[error("CA file {path}: certificate {index} is not a usable CA certificate: {reason}")]
    Anchor {
        /// The file given.
        path: PathBuf,
        /// Position of the certificate in the file, from 1.
        index: usize,
        /// webpki's reason.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS client configuration: {0}")]
    Config(String),
}

/// The certificate authorities a client trusts, as a ready rustls client configuration.
/// Cheap to clone.
#[derive(Clone)]
pub struct Trust {
    config: Arc<rustls::ClientConfig>,
    extra: usize,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("extra_cas", &self.extra)
            .finish_non_exhaustive()
    }
}

/// The system's root certificates (the platform store), read once per process. Certificates
/// of the store that rustls cannot use are skipped; an empty or missing store gives no roots.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

impl Trust {
    /// The system's roots only.
    pub fn system() -> Result<Self, TrustError> {
        Self::with_ca_files::<PathBuf>(&[])
    }

    /// The system's roots plus every certificate in each of `ca_files` (PEM, one or more
    /// certificates each).
    pub fn with_ca_files<P: AsRef<Path>>(ca_files: &[P]) -> Result<Self, TrustError> {
        let mut roots = RootCertStore::empty();
        let _ = roots.add_parsable_certificates(system_roots().iter().cloned());
        let mut extra = 0;
        for path in ca_files {
            let path = path.as_ref();
            let read_err = |reason: String| TrustError::Read {
                path: path.to_owned(),
                reason,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| read_err(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| read_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(read_err("no PEM certificate in the file".into()));
            }
            for (i, c) in certs.into_iter().enumerate() {
                roots.add(c).map_err(|e| TrustError::Anchor {
                    path: path.to_owned(),
                    index: i + 1,
                    reason: e.to_string(),
                })?;
                extra += 1;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Trust {
            config: Arc::new(config),
            extra,
        })
    }

    /// The system's roots, built once per process: what a client without CA files uses.
    pub fn system_shared() -> Result<Self, TrustError> {
        static SYSTEM: OnceLock<Result<Trust, String>> = OnceLock::new();
        SYSTEM
            .get_or_init(|| Self::system().map_err(|e| e.to_string()))
            .clone()
            .map_err(TrustError::Config)
    }

    /// The rustls client configuration.
    pub fn config(&self) -> &Arc<rustls::ClientConfig> {
        &self.config
    }

    /// A reqwest client builder using this trust for `https://`.
    pub fn reqwest_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder().use_preconfigured_tls((*self.config).clone())
    }
}

/// The TLS reason behind a failed request or connection, when there is one: the rustls error
/// (for example `invalid peer certificate: UnknownIssuer`) found anywhere in `e`'s chain of
/// causes, including inside `std::io::Error`s.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = tls_failure(inner)
        {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_named() {
        let dir = std::env::temp_dir().join(format!("peerlink-api-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e = Trust::with_ca_files(&[&missing]).unwrap_err();
        assert!(
            matches!(&e, TrustError::Read { path, .. } if *path == missing),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let e = Trust::with_ca_files(&[&empty]).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let junk = dir.join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = Trust::with_ca_files(&[&junk]).unwrap_err();
        assert!(matches!(e, TrustError::Anchor { index: 1, .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let t = Trust::system().unwrap();
        assert_eq!(t.config().alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn the_rustls_reason_is_found_through_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        let r = tls_failure(&io).unwrap();
        assert!(r.contains("certificate"), "{r}");
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(tls_failure(&plain), None);
    }
}
