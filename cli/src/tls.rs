//! The server side of TLS for every peerlink service that terminates it (the relay's TURN
//! over TLS listeners, signaling's HTTPS/WSS listener): the certificate chain and key read
//! from PEM files into a rustls server configuration, and the reload that a service runs on
//! SIGHUP.
//!
//! [`TlsStore`] is shared by every accepting task or worker. Each takes the current
//! configuration once per new connection ([`TlsStore::current`], one read lock per accept,
//! never per packet), so a reload changes what new handshakes present and leaves every
//! established connection as it is. A reload that fails (unreadable file, key not matching)
//! keeps the previous configuration and says why.
//!
//! The configuration offers TLS 1.2 and 1.3 with rustls's ring provider and asks for no
//! client certificate; ALPN protocols are the service's choice ([`TlsStore::with_alpn`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no PEM certificate.
    #[error("TLS certificate {path}: {reason}")]
    Cert {
        /// File given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key file is unreadable or holds no PEM private key.
    #[error("TLS key {path}: {reason}")]
    Key {
        /// File given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the pair (key not matching the certificate, unsupported algorithm).
    #[error("TLS certificate {cert} with key {key}: {reason}")]
    Config {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// Reads `cert` (a PEM chain, leaf first) and `key` (a PEM private key: PKCS#8, PKCS#1 or
/// SEC1) into a server configuration (TLS 1.2 and 1.3, no client certificates, no ALPN).
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    load_with_alpn(cert, key, &[])
}

/// [`load`], offering `alpn` (most preferred first, e.g. `h2`, `http/1.1`) to clients that
/// send ALPN.
pub fn load_with_alpn(
    cert: &Path,
    key: &Path,
    alpn: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.to_owned(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let config_err = |reason: String| TlsError::Config {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| config_err(e.to_string()))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// The current TLS configuration of a service and the files it came from.
#[derive(Clone)]
pub struct TlsStore {
    cert: PathBuf,
    key: PathBuf,
    alpn: Vec<Vec<u8>>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStore")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TlsStore {
    /// Loads `cert` and `key` (see [`load`]).
    pub fn open(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::with_alpn(cert, key, Vec::new())
    }

    /// Loads `cert` and `key` offering `alpn` (see [`load_with_alpn`]), now and after every
    /// reload.
    pub fn with_alpn(cert: &Path, key: &Path, alpn: Vec<Vec<u8>>) -> Result<Self, TlsError> {
        Ok(TlsStore {
            current: Arc::new(RwLock::new(load_with_alpn(cert, key, &alpn)?)),
            cert: cert.to_owned(),
            key: key.to_owned(),
            alpn,
        })
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the files again; on success new handshakes use them, on failure the previous
    /// configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load_with_alpn(&self.cert, &self.key, &self.alpn)?;
        match self.current.write() {
            Ok(mut c) => *c = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// PEM text of one DER block (what rcgen's optional `pem` feature would write).
    fn pem_block(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, pem_block("CERTIFICATE", ck.cert.der())).unwrap();
        std::fs::write(
            &key,
            pem_block("PRIVATE KEY", &ck.signing_key.serialize_der()),
        )
        .unwrap();
        (cert, key)
    }

    #[test]
    fn loads_reloads_and_keeps_the_old_config_on_a_bad_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "one.test");
        let store = TlsStore::open(&cert, &key).unwrap();
        let first = store.current();
        assert!(Arc::ptr_eq(&first, &store.current()));
        let (c2, k2) = write_pair(dir.path(), "two.test");
        std::fs::copy(&c2, &cert).unwrap();
        std::fs::copy(&k2, &key).unwrap();
        store.reload().unwrap();
        let second = store.current();
        assert!(!Arc::ptr_eq(&first, &second), "reload swaps the config");
        std::fs::write(&cert, "not pem").unwrap();
        assert!(matches!(store.reload(), Err(TlsError::Cert { .. })));
        assert!(Arc::ptr_eq(&second, &store.current()), "old config kept");
    }

    #[test]
    fn alpn_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "alpn.test");
        let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let store = TlsStore::with_alpn(&cert, &key, alpn.clone()).unwrap();
        assert_eq!(store.current().alpn_protocols, alpn);
        store.reload().unwrap();
        assert_eq!(store.current().alpn_protocols, alpn);
        assert!(
            TlsStore::open(&cert, &key)
                .unwrap()
                .current()
                .alpn_protocols
                .is_empty()
        );
    }

    #[test]
    fn bad_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a.test");
        let (_, other_key) = write_pair(dir.path(), "b.test");
        let missing = dir.path().join("missing.pem");
        assert!(matches!(load(&missing, &key), Err(TlsError::Cert { .. })));
        assert!(matches!(load(&cert, &missing), Err(TlsError::Key { .. })));
        assert!(matches!(load(&key, &key), Err(TlsError::Cert { .. })));
        assert!(matches!(load(&cert, &cert), Err(TlsError::Key { .. })));
        let e = load(&cert, &other_key).unwrap_err();
        assert!(matches!(e, TlsError::Config { .. }), "{e}");
    }
}
