//! `edgelorad identity`: the appliance's side of the CSR enrolment flow. The device makes its
//! own keys, so no private key ever leaves it:
//!
//! 1. `edgelorad identity csr` creates `<data>/identity/device.key` (ECDSA P-256, 0600; kept if
//!    present), loads or creates the ledger key `<data>/ledger/ledger.key`, and writes a CSR
//!    naming the device id and the ledger public key (as URI subject alternative names).
//! 2. The operator signs it: `edgelora-fleet sign-csr --csr device.csr --out device.cert`.
//! 3. `edgelorad identity install --cert device.cert` checks the certificate belongs to this
//!    device's TLS key and ledger key and chains to the CA it came with, then completes
//!    `<data>/identity` as a device bundle (see `edgelora_ledger::sync::bundle`).
//!
//! This module uses only external crates (no `crate::` paths) so the fleet's integration
//! tests can compile it and run the whole flow without building the daemon.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use edgelora_ledger::sync::bundle::{self, DeviceBundle, IssuedCertificate, write_file_atomic};
use edgelora_ledger::{LedgerKey, PublicKey};

/// `<data>/identity`: the device bundle directory of the CSR flow.
pub const IDENTITY_DIR: &str = "identity";
/// The CSR's default file name in the identity directory.
pub const CSR_FILE: &str = "device.csr";

#[derive(Subcommand, Debug)]
pub enum IdentityCommand {
    /// Create this device's TLS key (kept if it exists) and a certificate signing request for
    /// the fleet operator to sign with `edgelora-fleet sign-csr`.
    Csr {
        /// The appliance's data directory (default as `serve`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// The device id (default: the hostname). Letters, digits, '.', '_', '-'; use the same
        /// id `serve` runs with.
        #[arg(long)]
        device_id: Option<String>,
        /// Where to write the CSR (default: <data>/identity/device.csr).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Install the certificate file `edgelora-fleet sign-csr` produced, completing
    /// <data>/identity as the device's bundle.
    Install {
        /// The appliance's data directory (default as `serve`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// The file from `edgelora-fleet sign-csr`.
        #[arg(long)]
        cert: PathBuf,
        /// Override the collector address in the file (host:port).
        #[arg(long)]
        collector: Option<String>,
        /// Override the name the collector's certificate must carry.
        #[arg(long)]
        server_name: Option<String>,
    },
}

/// Runs an `identity` subcommand; `default_data_dir` supplies the data directory when
/// `--data` is not given.
pub fn run(cmd: IdentityCommand, default_data_dir: impl FnOnce() -> PathBuf) -> Result<()> {
    match cmd {
        IdentityCommand::Csr {
            data,
            device_id,
            out,
        } => {
            let data = data.unwrap_or_else(default_data_dir);
            let device_id = match device_id {
                Some(id) => id,
                None => default_device_id()?,
            };
            let made = make_csr(&data, &device_id, out.as_deref())?;
            if made.key_created {
                eprintln!("created the device TLS key {}", made.device_key.display());
            } else {
                eprintln!("reusing the device TLS key {}", made.device_key.display());
            }
            eprintln!(
                "wrote the certificate signing request for device {} (ledger key {}) to {}",
                made.device_id,
                made.ledger_key.to_verifier_string(),
                made.path.display()
            );
            eprintln!(
                "have the fleet operator run `edgelora-fleet sign-csr --dir FLEET --csr {} --out \
                 CERT`, then `edgelorad identity install --cert CERT`",
                made.path.display()
            );
            Ok(())
        }
        IdentityCommand::Install {
            data,
            cert,
            collector,
            server_name,
        } => {
            let data = data.unwrap_or_else(default_data_dir);
            let b = install(&data, &cert, collector.as_deref(), server_name.as_deref())?;
            println!("{}", b.dir.display());
            eprintln!(
                "installed the identity of device {}: collector {}, server name {}",
                b.device_id,
                b.collector.join(", "),
                b.server_name
            );
            Ok(())
        }
    }
}

/// What `make_csr` did.
#[derive(Debug)]
pub struct CsrOutput {
    /// Where the PEM CSR was written.
    pub path: PathBuf,
    pub device_id: String,
    pub device_key: PathBuf,
    /// Whether the TLS key was created now (false: an existing one was reused).
    pub key_created: bool,
    pub ledger_key: PublicKey,
}

/// The hostname, as a device id. Fails (asking for `--device-id`) if it is not a valid one.
pub fn default_device_id() -> Result<String> {
    let host = ["/etc/hostname", "/proc/sys/kernel/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    let Some(host) = host else {
        bail!("cannot read the hostname; pass --device-id");
    };
    bundle::check_device_id(&host).with_context(|| {
        format!("the hostname {host:?} is not a usable device id; pass --device-id")
    })?;
    Ok(host)
}

/// Creates (or reuses) `<data>/identity/device.key` and `<data>/ledger/ledger.key`, and writes
/// a CSR with CN = device id and the device and ledger-key URIs to `out` (default
/// `<data>/identity/device.csr`).
pub fn make_csr(data_dir: &Path, device_id: &str, out: Option<&Path>) -> Result<CsrOutput> {
    bundle::check_device_id(device_id)?;
    let identity = data_dir.join(IDENTITY_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&identity)
        .with_context(|| format!("creating {}", identity.display()))?;

    let key_path = identity.join(bundle::DEVICE_KEY_FILE);
    let (key, key_created) = match std::fs::read_to_string(&key_path) {
        Ok(pem) => {
            let key = rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{}: not a PKCS#8 PEM private key", key_path.display()))?;
            (key, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .context("generating the device TLS key")?;
            write_file_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            (key, true)
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", key_path.display())),
    };

    // The daemon's ledger key, where `serve` keeps it.
    let ledger_dir = data_dir.join("ledger");
    std::fs::create_dir_all(&ledger_dir)
        .with_context(|| format!("creating {}", ledger_dir.display()))?;
    let ledger_key =
        LedgerKey::load_or_create(&ledger_dir.join(bundle::LEDGER_KEY_FILE), device_id)
            .with_context(|| format!("the ledger key in {}", ledger_dir.display()))?
            .public_key();

    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, device_id);
    params.subject_alt_names = vec![
        rcgen::SanType::URI(bundle::device_uri(device_id).try_into()?),
        rcgen::SanType::URI(bundle::ledger_key_uri(&ledger_key.to_bytes()).try_into()?),
    ];
    let csr = params
        .serialize_request(&key)
        .context("signing the certificate request")?
        .pem()
        .context("encoding the certificate request")?;
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| identity.join(CSR_FILE));
    write_file_atomic(&path, csr.as_bytes(), 0o644)?;
    Ok(CsrOutput {
        path,
        device_id: device_id.to_string(),
        device_key: key_path,
        key_created,
        ledger_key,
    })
}

/// Installs the file `edgelora-fleet sign-csr` produced into `<data>/identity`, after checking
/// that it names this device's ledger key and belongs to its TLS key (see
/// `DeviceBundle::install` for the certificate checks). Returns the completed bundle.
pub fn install(
    data_dir: &Path,
    cert_file: &Path,
    collector: Option<&str>,
    server_name: Option<&str>,
) -> Result<DeviceBundle> {
    let mut issued = IssuedCertificate::read(cert_file)?;
    if let Some(c) = collector {
        bundle::check_collector_addr(c).map_err(anyhow::Error::msg)?;
        issued.collector = vec![c.to_string()];
    }
    if let Some(n) = server_name {
        issued.server_name = n.to_string();
    }
    if issued.collector.is_empty() {
        bail!(
            "{} names no collector; pass --collector HOST:PORT",
            cert_file.display()
        );
    }

    let (device_id, cert_ledger_key) = certificate_identity(&issued.device_cert)
        .with_context(|| format!("the device certificate in {}", cert_file.display()))?;

    let ledger_path = data_dir.join("ledger").join(bundle::LEDGER_KEY_FILE);
    if !ledger_path.exists() {
        bail!(
            "{} does not exist: this data directory did not make the CSR (run `edgelorad \
             identity csr --data {}` first)",
            ledger_path.display(),
            data_dir.display()
        );
    }
    let ours = LedgerKey::load_or_create(&ledger_path, &device_id)
        .with_context(|| format!("reading {}", ledger_path.display()))?
        .public_key();
    if ours.to_bytes() != cert_ledger_key {
        bail!(
            "{} certifies a different ledger key than {} holds ({}); was the CSR made from \
             this data directory?",
            cert_file.display(),
            ledger_path.display(),
            ours.to_verifier_string()
        );
    }

    let identity = data_dir.join(IDENTITY_DIR);
    DeviceBundle::install(&identity, &device_id, &issued).with_context(|| {
        format!(
            "installing {} into {}",
            cert_file.display(),
            identity.display()
        )
    })
}

/// The device id and ledger key a device certificate names in its URIs.
fn certificate_identity(der: &[u8]) -> Result<(String, [u8; 32])> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    let mut device_id = None;
    let mut ledger_key = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                device_id = device_id.or_else(|| bundle::parse_device_uri(uri).map(str::to_string));
                ledger_key = ledger_key.or_else(|| bundle::parse_ledger_key_uri(uri));
            }
        }
    }
    match (device_id, ledger_key) {
        (Some(id), Some(key)) => Ok((id, key)),
        _ => bail!(
            "it lacks the {}<id> or {}<key> URI; it was not issued by `edgelora-fleet sign-csr`",
            bundle::DEVICE_URI_PREFIX,
            bundle::LEDGER_KEY_URI_PREFIX
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: IdentityCommand,
    }

    #[test]
    fn command_line_parses_both_subcommands() {
        use clap::{CommandFactory, Parser};
        Cli::command().debug_assert();
        let c = Cli::try_parse_from(["t", "csr", "--data", "d", "--device-id", "box-1"]).unwrap();
        assert!(
            matches!(c.cmd, IdentityCommand::Csr { device_id: Some(ref id), .. } if id == "box-1")
        );
        let c = Cli::try_parse_from([
            "t",
            "install",
            "--cert",
            "c",
            "--collector",
            "h:1",
            "--server-name",
            "h",
        ])
        .unwrap();
        assert!(matches!(
            c.cmd,
            IdentityCommand::Install {
                collector: Some(_),
                ..
            }
        ));
        assert!(
            Cli::try_parse_from(["t", "install"]).is_err(),
            "--cert is required"
        );
    }

    #[test]
    fn csr_names_device_and_ledger_key_and_reuses_the_device_key() {
        let d = tempfile::tempdir().unwrap();
        let first = make_csr(d.path(), "box-7", None).unwrap();
        assert!(first.key_created);
        let key_pem = std::fs::read(&first.device_key).unwrap();
        let csr = std::fs::read_to_string(&first.path).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let uris: Vec<String> = parsed
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                rcgen::SanType::URI(u) => Some(u.as_str().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            uris,
            vec![
                bundle::device_uri("box-7"),
                bundle::ledger_key_uri(&first.ledger_key.to_bytes())
            ]
        );

        let second = make_csr(d.path(), "box-7", Some(&d.path().join("again.csr"))).unwrap();
        assert!(!second.key_created);
        assert_eq!(std::fs::read(&second.device_key).unwrap(), key_pem);
        assert_eq!(second.ledger_key, first.ledger_key);
    }

    #[test]
    fn csr_refuses_a_bad_device_id() {
        let d = tempfile::tempdir().unwrap();
        let e = make_csr(d.path(), "box 7", None).unwrap_err();
        assert!(format!("{e:#}").contains("box 7"), "{e:#}");
        assert!(!d.path().join(IDENTITY_DIR).exists());
    }

    #[test]
    fn install_refuses_a_file_whose_device_certificate_does_not_parse() {
        let d = tempfile::tempdir().unwrap();
        let cert = d.path().join("cert");
        let issued = IssuedCertificate {
            collector: vec!["c:1".into()],
            server_name: "c".into(),
            device_cert: rustls_pki_types_der(),
            ca_cert: rustls_pki_types_der(),
            origin: PathBuf::new(),
        };
        std::fs::write(&cert, issued.to_text()).unwrap();
        let e = install(d.path(), &cert, None, None).unwrap_err();
        assert!(
            format!("{e:#}").contains("not an X.509 certificate"),
            "{e:#}"
        );
        assert!(
            !d.path()
                .join(IDENTITY_DIR)
                .join(bundle::MANIFEST_FILE)
                .exists()
        );
    }

    fn rustls_pki_types_der() -> rustls_pki_types::CertificateDer<'static> {
        rustls_pki_types::CertificateDer::from(vec![0x30, 0x00])
    }
}
