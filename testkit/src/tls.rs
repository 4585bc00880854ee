//! Certificates for TLS tests, made at test time with rcgen: a private CA ([`TestCa`]) and
//! server certificates it signs, written as PEM files the services read with `--tls-cert` /
//! `--tls-key` and clients with `--ca`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// PEM text of one DER block (what rcgen's optional `pem` feature would write).
pub fn pem_block(label: &str, der: &[u8]) -> String {
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

/// A certificate authority of a test: its certificate as PEM, and the key to sign with.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// The PEM files of one server certificate.
#[derive(Clone, Debug)]
pub struct ServerFiles {
    /// The certificate (leaf only).
    pub cert: PathBuf,
    /// Its private key (PKCS#8).
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names to check");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generating a CA key");
        let cert = params.self_signed(&key).expect("self-signing the CA");
        TestCa {
            cert_pem: pem_block("CERTIFICATE", cert.der()),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Write the CA certificate to `path` (what a client's `--ca` reads).
    pub fn write_cert(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.cert_pem).expect("writing the CA certificate");
        path.to_owned()
    }

    /// A server certificate for `names` (DNS names or IP addresses) signed by this CA, as
    /// `(certificate PEM, key PEM)`.
    pub fn server_pem(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("valid test names");
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generating a server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing the server certificate");
        (
            pem_block("CERTIFICATE", cert.der()),
            pem_block("PRIVATE KEY", &key.serialize_der()),
        )
    }

    /// [`server_pem`](Self::server_pem) written to `dir/<stem>.crt` and `dir/<stem>.key`.
    pub fn write_server(&self, dir: &Path, stem: &str, names: &[&str]) -> ServerFiles {
        let (cert, key) = self.server_pem(names);
        let files = ServerFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert).expect("writing the server certificate");
        std::fs::write(&files.key, key).expect("writing the server key");
        files
    }
}
