//! `ringtrain certs`: a cluster CA and certificates signed by it, and the TLS flags every
//! networked command shares. Every certificate carries the name clients check,
//! [`TLS_NAME`], beside the host names and addresses asked for.
#![allow(clippy::print_stdout)] // reason: the command prints what it wrote

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use ringtrain_collective::{Tls, TLS_NAME};

/// `--tls-ca/--tls-cert/--tls-key`: mutual TLS on every connection (all three or none).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The cluster CA's certificate (PEM): peers must present a certificate it signed.
    #[arg(long, value_name = "PEM", env = "RINGTRAIN_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), signed by the CA (`ringtrain certs` makes one).
    #[arg(long, value_name = "PEM", env = "RINGTRAIN_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "PEM", env = "RINGTRAIN_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS material, or `None` for plaintext; a file that is not what its flag needs is
    /// bad input naming it.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Tls::load(ca, cert, key).map(Some).map_err(crate::bad_input),
            _ => Ok(None),
        }
    }
}

/// `ringtrain certs`.
#[derive(Args, Debug, Clone)]
pub struct CertsArgs {
    /// Directory for `ca.pem`, `ca-key.pem` and one `NAME.pem` + `NAME-key.pem` per --host.
    /// An existing CA there signs the new certificates.
    #[arg(long)]
    pub out: PathBuf,
    /// A certificate for this host name or IP address (repeat for more; default: `node`).
    /// Kubernetes: the Service names, e.g. `ringtrain-coordinator`, `*.ringtrain-worker`.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
}

const CA_NAME: &str = "ringtrain cluster CA";

/// The CA's parameters: the same each time, so a saved CA key signs again without parsing
/// the CA certificate.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A new CA: its certificate and key (PEM).
pub fn new_ca() -> anyhow::Result<(String, KeyPair)> {
    let key = KeyPair::generate().context("generate the CA key")?;
    let cert = ca_params()?.self_signed(&key).context("sign the CA certificate")?;
    Ok((cert.pem(), key))
}

/// A certificate for `names` (plus [`TLS_NAME`]) signed by the CA key: certificate and key
/// (PEM). It serves as server and client certificate alike.
pub fn host_cert(ca_key: &KeyPair, names: &[String]) -> anyhow::Result<(String, String)> {
    let mut sans = vec![TLS_NAME.to_owned()];
    sans.extend(names.iter().filter(|n| n.as_str() != TLS_NAME).cloned());
    let mut params = CertificateParams::new(sans).context("certificate parameters")?;
    params
        .distinguished_name
        .push(DnType::CommonName, names.first().map_or(TLS_NAME, String::as_str));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().context("generate a key")?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let cert = params.signed_by(&key, &issuer).context("sign the certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `text`; keys only for the owner.
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

pub fn run_certs(args: CertsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let (ca_pem, ca_key) = (args.out.join("ca.pem"), args.out.join("ca-key.pem"));
    let key = if ca_pem.is_file() && ca_key.is_file() {
        let text = std::fs::read_to_string(&ca_key).with_context(|| format!("read {}", ca_key.display()))?;
        let key = KeyPair::from_pem(&text)
            .map_err(|e| crate::bad_input(format!("{}: not a private key: {e}", ca_key.display())))?;
        println!("signing with the CA in {}", args.out.display());
        key
    } else {
        let (cert, key) = new_ca()?;
        write(&ca_pem, &cert, false)?;
        write(&ca_key, &key.serialize_pem(), true)?;
        println!(
            "wrote {} and {} (keep the key secret)",
            ca_pem.display(),
            ca_key.display()
        );
        key
    };
    let hosts = if args.hosts.is_empty() {
        vec!["node".to_owned()]
    } else {
        args.hosts
    };
    for host in &hosts {
        // A file name from a host name: `*.svc` becomes `_.svc`.
        let file = host.replace(['*', '/', ':'], "_");
        let (cert, host_key) = host_cert(&key, std::slice::from_ref(host))?;
        let (cert_path, key_path) = (
            args.out.join(format!("{file}.pem")),
            args.out.join(format!("{file}-key.pem")),
        );
        write(&cert_path, &cert, false)?;
        write(&key_path, &host_key, true)?;
        println!(
            "wrote {} and {} for {host} (and {TLS_NAME})",
            cert_path.display(),
            key_path.display()
        );
    }
    println!(
        "use: RINGTRAIN_TLS_CA={} RINGTRAIN_TLS_CERT=<host>.pem RINGTRAIN_TLS_KEY=<host>-key.pem",
        ca_pem.display()
    );
    Ok(())
}

/// A CA and one certificate for 127.0.0.1/localhost made for one local run (`launch`,
/// `bench allreduce --tls`), in a directory only this user can read, removed on drop.
#[derive(Debug)]
pub struct Throwaway {
    dir: PathBuf,
    pub tls: Tls,
}

impl Throwaway {
    pub fn new() -> anyhow::Result<Throwaway> {
        use std::os::unix::fs::DirBuilderExt as _;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("ringtrain-tls-{}-{stamp}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("create {}", dir.display()))?;
        // Removed again if anything below fails.
        let mut made = Throwaway {
            tls: Tls::from_pem(Vec::new(), Vec::new(), Vec::new()),
            dir,
        };
        let (ca, ca_key) = new_ca()?;
        let (cert, key) = host_cert(&ca_key, &["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        write(&made.dir.join("ca.pem"), &ca, false)?;
        write(&made.dir.join("node.pem"), &cert, false)?;
        write(&made.dir.join("node-key.pem"), &key, true)?;
        made.tls = Tls::from_pem(ca, cert, key);
        Ok(made)
    }

    /// The `RINGTRAIN_TLS_*` variables that point a child process at these files.
    pub fn env(&self) -> [(&'static str, PathBuf); 3] {
        [
            ("RINGTRAIN_TLS_CA", self.dir.join("ca.pem")),
            ("RINGTRAIN_TLS_CERT", self.dir.join("node.pem")),
            ("RINGTRAIN_TLS_KEY", self.dir.join("node-key.pem")),
        ]
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
