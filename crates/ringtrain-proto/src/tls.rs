//! Mutual TLS for every connection of a job (worker ↔ coordinator, rank ↔ rank): each
//! process holds a certificate signed by the cluster's CA and accepts only peers whose
//! certificate that CA signed.
//!
//! Peers are dialled at addresses nobody knows in advance (pod IPs, the address a worker
//! called from), so a client does not check the server's certificate against the address it
//! dialled but against one name every certificate of the cluster carries, [`TLS_NAME`]
//! (`ringtrain certs` puts it in every certificate beside the host names). What makes a peer
//! trusted is the CA's signature; the job token stays as a second factor.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name every certificate of a ringtrain cluster carries, and that clients check.
pub const TLS_NAME: &str = "ringtrain";

/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// TLS material that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    pub path: PathBuf,
    pub reason: String,
}

/// This process's certificate and key, and the CA its peers' certificates must be signed by
/// (all PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Tls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The PEM blocks (`-----BEGIN label-----`) in `text`.
fn pem_labels(text: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("-----BEGIN ")?
                .strip_suffix("-----")
                .map(str::to_owned)
        })
        .collect()
}

impl Tls {
    /// Reads the three PEM files; each must hold what its role needs (a certificate, or a
    /// private key), so a swapped or truncated file is named here rather than in a failed
    /// handshake later.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let read = |path: &Path, want: &str, what: &str| -> Result<Vec<u8>, TlsError> {
            let bad = |reason: String| TlsError {
                path: path.to_path_buf(),
                reason,
            };
            let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read the {what}: {e}")))?;
            if !pem_labels(&bytes).iter().any(|l| l.ends_with(want)) {
                return Err(bad(format!("not a PEM {what} (no \"-----BEGIN {want}-----\" block)")));
            }
            Ok(bytes)
        };
        Ok(Tls {
            ca: read(ca, "CERTIFICATE", "CA certificate")?,
            cert: read(cert, "CERTIFICATE", "certificate")?,
            key: read(key, "PRIVATE KEY", "private key")?,
        })
    }

    /// From PEM text already in memory (a throw-away CA made for one run).
    pub fn from_pem(ca: impl Into<Vec<u8>>, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Tls {
        Tls {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        }
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    /// A server that presents this certificate and requires a client certificate signed by
    /// the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca))
            .timeout(HANDSHAKE)
    }

    /// A client that presents this certificate and accepts a server whose certificate the CA
    /// signed for [`TLS_NAME`].
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(self.identity())
            .domain_name(TLS_NAME)
            .timeout(HANDSHAKE)
    }

    /// The URI scheme of a connection with or without TLS.
    pub fn scheme(tls: Option<&Tls>) -> &'static str {
        if tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_the_right_pem_block_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(Tls::load(&cert, &cert, &key).is_ok());
        // Key and certificate swapped.
        let e = Tls::load(&cert, &key, &cert).unwrap_err();
        assert_eq!(e.path, key);
        assert!(e.reason.contains("not a PEM certificate"), "{e}");
        let e = Tls::load(&cert, &cert, &dir.path().join("missing.pem")).unwrap_err();
        assert!(e.reason.contains("cannot read the private key"), "{e}");
    }
}
