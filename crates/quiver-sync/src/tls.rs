//! TLS identity and trust: a self-signed certificate made at `quiver init`,
//! servers speaking TLS 1.3 only with ALPN `quiver/1`, and clients that
//! trust a server by CA file, by pinned SHA-256 fingerprint, or — only when
//! asked — not at all. Verification is on by default.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use quiver_core::wire::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::{Result, SyncError};

/// How a client decides to trust a server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Verify against the certificates in this PEM file (a CA, or the
    /// server's own self-signed certificate).
    Ca(PathBuf),
    /// Accept exactly the certificate with this SHA-256 fingerprint (hex).
    Pin(String),
    /// Accept any certificate. Encrypted, but not authenticated.
    Insecure,
    /// Trust nothing yet: the connection is refused with the fingerprint to pin.
    Verify,
}

/// Where `quiver init` keeps the certificate and key of a store.
pub fn identity_paths(db: &Path) -> (PathBuf, PathBuf) {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "quiver.db".into());
    (
        db.with_file_name(format!("{name}.cert.pem")),
        db.with_file_name(format!("{name}.key.pem")),
    )
}

/// SHA-256 of a DER certificate, lower-case hex.
pub fn fingerprint(cert_der: &[u8]) -> String {
    Sha256::digest(cert_der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn normalise_fp(fp: &str) -> String {
    fp.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Checks a pin as a person typed it: 64 hex digits, any case, with or
/// without separators between the bytes (`ab:cd:…`, dashes or spaces).
/// Gives it normalised.
pub fn parse_pin(pin: &str) -> Result<String> {
    let digits = pin
        .trim()
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | ' '))
        .count();
    let hex = normalise_fp(pin);
    if hex.len() != 64 || digits != 64 {
        return Err(SyncError::BadPin(pin.to_string()));
    }
    Ok(hex)
}

/// Whether a pinned fingerprint (any case, any separators) names `fp`.
pub(crate) fn same_fingerprint(pin: &str, fp: &str) -> bool {
    quiver_core::wire::constant_time_eq(normalise_fp(pin).as_bytes(), fp.as_bytes())
}

/// Makes a self-signed certificate for `names` (plus localhost and the
/// loopback addresses), writes it and its key beside the store, and
/// returns the fingerprint.
pub fn create_identity(db: &Path, names: &[String]) -> Result<String> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    sans.extend(names.iter().cloned());
    let ck = rcgen::generate_simple_self_signed(sans).map_err(|e| SyncError::Tls(e.to_string()))?;
    let (cert, key) = identity_paths(db);
    std::fs::write(&cert, ck.cert.pem())?;
    write_private(&key, ck.key_pair.serialize_pem().as_bytes())?;
    Ok(fingerprint(ck.cert.der()))
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

/// A certificate chain and its key, loaded from PEM files.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Identity> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| {
                SyncError::Tls(format!(
                    "reading {}: {e}; create it with `quiver init`",
                    p.display()
                ))
            })
        };
        let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| SyncError::Tls(format!("{}: {e}", cert.display())))?;
        if certs.is_empty() {
            return Err(SyncError::Tls(format!(
                "{} holds no certificate",
                cert.display()
            )));
        }
        let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
            .map_err(|e| SyncError::Tls(format!("{}: {e}", key.display())))?
            .ok_or_else(|| SyncError::Tls(format!("{} holds no private key", key.display())))?;
        Ok(Identity { certs, key })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.certs[0])
    }
}

/// The certificates of a PEM file, as trust anchors.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let bad = |e: &dyn std::fmt::Display| SyncError::Tls(format!("{}: {e}", path.display()));
    let pem = std::fs::read(path)
        .map_err(|e| SyncError::Tls(format!("reading {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"holds no certificate"));
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration: TLS 1.3 only, ALPN `quiver/1`, 0-RTT allowed
/// (the handshake it carries is idempotent).
/// With `client_ca`, clients must present a certificate issued by (or
/// equal to) one of the certificates in that PEM file: mutual TLS.
pub fn server_crypto(id: &Identity, client_ca: Option<&Path>) -> Result<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SyncError::Tls(e.to_string()))?;
    let builder = match client_ca {
        Some(path) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_roots(path)?),
                provider(),
            )
            .build()
            .map_err(|e| SyncError::Tls(format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(id.certs.clone(), id.key.clone_key())
        .map_err(|e| SyncError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = u32::MAX;
    Ok(cfg)
}

/// The fingerprint of the last certificate a client was shown, for the
/// error message that tells how to trust it.
pub type SeenFingerprint = Arc<Mutex<Option<String>>>;

/// A rustls client configuration for the given trust, presenting `client`
/// when the server asks for a certificate.
pub fn client_crypto(
    trust: &Trust,
    client: Option<&Identity>,
) -> Result<(rustls::ClientConfig, SeenFingerprint)> {
    let seen: SeenFingerprint = Arc::default();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SyncError::Tls(e.to_string()))?;
    let cfg = match trust {
        Trust::Ca(path) => builder.with_root_certificates(load_roots(path)?),
        other => {
            let pin = match other {
                Trust::Pin(fp) => Some(parse_pin(fp)?),
                _ => None,
            };
            let verifier = Arc::new(FingerprintVerifier {
                pin,
                insecure: matches!(other, Trust::Insecure),
                seen: seen.clone(),
                provider: provider(),
            });
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
        }
    };
    // Sent only when the server asks for one (mutual TLS).
    let mut cfg = match client {
        Some(id) => cfg
            .with_client_auth_cert(id.certs.clone(), id.key.clone_key())
            .map_err(|e| SyncError::Tls(format!("client certificate: {e}")))?,
        None => cfg.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = true;
    Ok((cfg, seen))
}

/// Accepts a server by the fingerprint of its certificate (or, when
/// insecure, any certificate); handshake signatures are always checked.
#[derive(Debug)]
struct FingerprintVerifier {
    pin: Option<String>,
    insecure: bool,
    seen: SeenFingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(fp.clone());
        }
        let pinned = self.pin.as_ref().is_some_and(|p| same_fingerprint(p, &fp));
        if self.insecure || pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
