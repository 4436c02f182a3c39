//! A device's identity bundle: the directory that holds everything the device needs to reach
//! its fleet's collector over mutual TLS.
//!
//! ```text
//! bundle.toml   device_id = "box-17"
//!               collector = ["collector.example:7443"]
//!               server_name = "collector.example"
//! device.crt    the device's client certificate (PEM), issued by the fleet CA
//! device.key    its private key (PKCS#8 PEM, mode 0600)
//! ca.crt        the fleet CA certificate (PEM): the only root the device trusts
//! ledger.key    optional: the 32-byte ledger signing seed (`edgelora-fleet enroll` writes it;
//!               with the CSR flow the daemon keeps its own in <data>/ledger/ledger.key)
//! ```
//!
//! The device certificate names the device twice, in a form the collector can check without
//! any other lookup: the URI `urn:edgelora:device:<id>` and the URI
//! `urn:edgelora:ledger-key:<base64url, unpadded, of the 32-byte Ed25519 ledger public key>`.
//!
//! `bundle.toml` is written last, so a directory without it is not a bundle (yet).
//!
//! TLS here always uses the ring provider passed explicitly; this module never installs a
//! process-wide default provider.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

/// The ALPN protocol id of sync protocol version 1; the collector offers only this.
pub const ALPN_SYNC_V1: &[u8] = b"edgelora-sync/1";
/// Prefix of the URI subject alternative name that carries the device id.
pub const DEVICE_URI_PREFIX: &str = "urn:edgelora:device:";
/// Prefix of the URI subject alternative name that carries the device's ledger public key.
pub const LEDGER_KEY_URI_PREFIX: &str = "urn:edgelora:ledger-key:";

pub const MANIFEST_FILE: &str = "bundle.toml";
pub const DEVICE_CERT_FILE: &str = "device.crt";
pub const DEVICE_KEY_FILE: &str = "device.key";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const LEDGER_KEY_FILE: &str = "ledger.key";

/// What is wrong with a bundle (or with a certificate being installed into one).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// An operating-system call failed on `path`.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `path` exists but its contents are unusable.
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    /// A device id outside the ledger's rule.
    #[error("device id {0:?} must be 1-128 letters, digits, '.', '_' or '-'")]
    BadDeviceId(String),
    /// The issued certificate does not belong with this device's key or CA.
    #[error("certificate in {}: {why}", path.display())]
    Certificate { path: PathBuf, why: String },
}

impl BundleError {
    fn io(path: &Path, source: std::io::Error) -> BundleError {
        BundleError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn invalid(path: &Path, why: impl Into<String>) -> BundleError {
        BundleError::Invalid {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }
}

/// A device id: letters, digits, '.', '_', '-', 1 to 128 bytes (the same rule as
/// `LedgerConfig::device_id`, so every id is also a valid ledger key name).
pub fn check_device_id(id: &str) -> Result<(), BundleError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BundleError::BadDeviceId(id.to_string()))
    }
}

/// `urn:edgelora:device:<id>`.
pub fn device_uri(device_id: &str) -> String {
    format!("{DEVICE_URI_PREFIX}{device_id}")
}

/// `urn:edgelora:ledger-key:<base64url, unpadded>`.
pub fn ledger_key_uri(key: &[u8; 32]) -> String {
    format!("{LEDGER_KEY_URI_PREFIX}{}", URL_SAFE_NO_PAD.encode(key))
}

/// The device id in a device URI, if `uri` is one and the id is valid.
pub fn parse_device_uri(uri: &str) -> Option<&str> {
    let id = uri.strip_prefix(DEVICE_URI_PREFIX)?;
    check_device_id(id).ok()?;
    Some(id)
}

/// The 32-byte key in a ledger-key URI, if `uri` is one and holds exactly 32 bytes.
pub fn parse_ledger_key_uri(uri: &str) -> Option<[u8; 32]> {
    let b64 = uri.strip_prefix(LEDGER_KEY_URI_PREFIX)?;
    URL_SAFE_NO_PAD.decode(b64).ok()?.try_into().ok()
}

/// A collector address `host:port` (IPv6 hosts in brackets). Returns a description of the
/// problem otherwise.
pub fn check_collector_addr(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("collector address {addr:?} must be host:port"));
    };
    if host.is_empty() {
        return Err(format!("collector address {addr:?} has no host"));
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "collector address {addr:?}: port must be a number from 1 to 65535"
        ));
    }
    Ok(())
}

/// The ring crypto provider, the one every TLS configuration in edgelora uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Writes `bytes` to `path` atomically: a temporary file beside it (created with `mode`),
/// fsynced, renamed over `path`, then the directory fsynced. A crash leaves either the old
/// file or the new one, never a torn one.
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BundleError> {
    let name = path
        .file_name()
        .ok_or_else(|| BundleError::invalid(path, "not a file path"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| BundleError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| BundleError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| BundleError::io(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| BundleError::io(dir, e))?;
    }
    Ok(())
}

/// PEM text for one DER object (64-character base64 lines).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// `bundle.toml`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    device_id: String,
    collector: Vec<String>,
    server_name: String,
}

/// A loaded, checked device bundle. The certificate and keys stay on disk; `client_config`
/// reads them each time, so a renewed certificate is picked up by the next connection.
#[derive(Debug, Clone)]
pub struct DeviceBundle {
    /// The bundle directory.
    pub dir: PathBuf,
    pub device_id: String,
    /// Collector addresses, `host:port`, tried in order.
    pub collector: Vec<String>,
    /// The name the collector's certificate must carry (DNS name or IP address).
    pub server_name: String,
}

impl DeviceBundle {
    /// Reads `dir/bundle.toml` and checks that the certificates and the key in `dir` parse.
    /// Warns (via tracing) if a private key file is readable by group or others.
    pub fn load(dir: &Path) -> Result<DeviceBundle, BundleError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&manifest_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BundleError::invalid(
                    &manifest_path,
                    "missing: this is not a device bundle (make one with `edgelora-fleet \
                     enroll`, or `edgelorad identity csr` and `edgelorad identity install`)",
                )
            } else {
                BundleError::io(&manifest_path, e)
            }
        })?;
        let m: Manifest = toml::from_str(&text)
            .map_err(|e| BundleError::invalid(&manifest_path, e.to_string()))?;
        check_device_id(&m.device_id)
            .map_err(|e| BundleError::invalid(&manifest_path, e.to_string()))?;
        check_manifest_addresses(&manifest_path, &m.collector, &m.server_name)?;

        read_certs(&dir.join(DEVICE_CERT_FILE))?;
        read_certs(&dir.join(CA_CERT_FILE))?;
        let key_path = dir.join(DEVICE_KEY_FILE);
        read_private_key(&key_path)?;
        warn_if_readable_by_others(&key_path);
        let ledger_key = dir.join(LEDGER_KEY_FILE);
        if ledger_key.exists() {
            warn_if_readable_by_others(&ledger_key);
        }
        Ok(DeviceBundle {
            dir: dir.to_path_buf(),
            device_id: m.device_id,
            collector: m.collector,
            server_name: m.server_name,
        })
    }

    /// `dir/ledger.key` if the bundle carries the ledger key (bundles from `enroll` do).
    pub fn ledger_key_path(&self) -> Option<PathBuf> {
        let p = self.dir.join(LEDGER_KEY_FILE);
        p.is_file().then_some(p)
    }

    /// The collector's expected TLS name.
    pub fn tls_server_name(&self) -> Result<ServerName<'static>, BundleError> {
        ServerName::try_from(self.server_name.clone()).map_err(|_| {
            BundleError::invalid(
                &self.dir.join(MANIFEST_FILE),
                format!(
                    "server_name {:?} is not a DNS name or IP address",
                    self.server_name
                ),
            )
        })
    }

    /// The client TLS configuration: TLS 1.3 only, the fleet CA as the only root, the device
    /// certificate as client certificate, ALPN `edgelora-sync/1`.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, BundleError> {
        let ca_path = self.dir.join(CA_CERT_FILE);
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs(&ca_path)? {
            roots
                .add(ca)
                .map_err(|e| BundleError::invalid(&ca_path, format!("not a usable CA: {e}")))?;
        }
        let cert_path = self.dir.join(DEVICE_CERT_FILE);
        let certs = read_certs(&cert_path)?;
        let key_path = self.dir.join(DEVICE_KEY_FILE);
        let key = read_private_key(&key_path)?;
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| BundleError::invalid(&self.dir, e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| {
                BundleError::invalid(
                    &cert_path,
                    format!("cannot be used with {}: {e}", key_path.display()),
                )
            })?;
        config.alpn_protocols = vec![ALPN_SYNC_V1.to_vec()];
        Ok(Arc::new(config))
    }

    /// Writes `bundle.toml` into `dir` (atomically). Call it after the certificate and key
    /// files are in place: its presence is what makes `dir` a bundle.
    pub fn write_manifest(
        dir: &Path,
        device_id: &str,
        collector: &[String],
        server_name: &str,
    ) -> Result<(), BundleError> {
        let path = dir.join(MANIFEST_FILE);
        check_device_id(device_id)?;
        check_manifest_addresses(&path, collector, server_name)?;
        let m = Manifest {
            device_id: device_id.to_string(),
            collector: collector.to_vec(),
            server_name: server_name.to_string(),
        };
        let text = toml::to_string(&m).map_err(|e| BundleError::invalid(&path, e.to_string()))?;
        write_file_atomic(&path, text.as_bytes(), 0o644)
    }

    /// Completes a bundle from a certificate the fleet signed (the CSR flow): checks that the
    /// certificate belongs to `dir/device.key`, that it chains to the CA in `issued`, and is
    /// currently valid for client authentication; then writes `device.crt`, `ca.crt` and
    /// finally `bundle.toml`. `device_id` is the id the certificate names (the caller reads
    /// it from the certificate's URI).
    pub fn install(
        dir: &Path,
        device_id: &str,
        issued: &IssuedCertificate,
    ) -> Result<DeviceBundle, BundleError> {
        let origin = &issued.origin;
        let bad = |why: String| BundleError::Certificate {
            path: origin.clone(),
            why,
        };
        check_device_id(device_id)?;
        let key_path = dir.join(DEVICE_KEY_FILE);
        let key = read_private_key(&key_path)?;
        let provider = crypto_provider();

        // The certificate must carry the public half of our key.
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| BundleError::invalid(&key_path, format!("unusable key: {e}")))?;
        rustls::sign::CertifiedKey::new(vec![issued.device_cert.clone()], signing_key)
            .keys_match()
            .map_err(|e| {
                bad(format!(
                    "its public key does not match {} ({e}); was it signed from this \
                     device's CSR?",
                    key_path.display()
                ))
            })?;

        // It must chain to the CA, be valid now and allow client authentication: exactly what
        // the collector will check (less revocation).
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(issued.ca_cert.clone())
            .map_err(|e| bad(format!("the CA certificate is not usable: {e}")))?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(format!("the CA certificate is not usable: {e}")))?;
        verifier
            .verify_client_cert(&issued.device_cert, &[], UnixTime::now())
            .map_err(|e| {
                bad(format!(
                    "the device certificate does not verify against the CA in the same file: {e}"
                ))
            })?;

        let collector = issued.collector.clone();
        check_manifest_addresses(origin, &collector, &issued.server_name)?;
        write_file_atomic(
            &dir.join(DEVICE_CERT_FILE),
            pem_encode("CERTIFICATE", &issued.device_cert).as_bytes(),
            0o644,
        )?;
        write_file_atomic(
            &dir.join(CA_CERT_FILE),
            pem_encode("CERTIFICATE", &issued.ca_cert).as_bytes(),
            0o644,
        )?;
        DeviceBundle::write_manifest(dir, device_id, &collector, &issued.server_name)?;
        DeviceBundle::load(dir)
    }
}

/// What `edgelora-fleet sign-csr` hands back to a device: where the collector is, the device
/// certificate and the CA certificate. As text:
///
/// ```text
/// collector: collector.example:7443
/// server-name: collector.example
/// -----BEGIN CERTIFICATE-----     (the device certificate)
/// -----BEGIN CERTIFICATE-----     (the fleet CA certificate)
/// ```
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// Collector addresses (`host:port`), one `collector:` line each.
    pub collector: Vec<String>,
    pub server_name: String,
    pub device_cert: CertificateDer<'static>,
    pub ca_cert: CertificateDer<'static>,
    /// Where it was read from (for error messages); empty when built in memory.
    pub origin: PathBuf,
}

impl IssuedCertificate {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for c in &self.collector {
            out.push_str(&format!("collector: {c}\n"));
        }
        out.push_str(&format!("server-name: {}\n", self.server_name));
        out.push_str(&pem_encode("CERTIFICATE", &self.device_cert));
        out.push_str(&pem_encode("CERTIFICATE", &self.ca_cert));
        out
    }

    pub fn read(path: &Path) -> Result<IssuedCertificate, BundleError> {
        let text = fs::read_to_string(path).map_err(|e| BundleError::io(path, e))?;
        IssuedCertificate::parse(&text, path)
    }

    /// Parses the text form; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<IssuedCertificate, BundleError> {
        let bad = |why: String| BundleError::invalid(origin, why);
        let mut collector = Vec::new();
        let mut server_name = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.starts_with("-----BEGIN ") {
                break;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("collector", v)) => {
                    check_collector_addr(v).map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
                    collector.push(v.to_string());
                }
                Some(("server-name", v)) => server_name = Some(v.to_string()),
                _ => {
                    return Err(bad(format!(
                        "line {}: expected `collector: HOST:PORT` or `server-name: NAME`, \
                         found {line:?}",
                        n + 1
                    )));
                }
            }
        }
        let certs = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("bad PEM: {e}")))?;
        let [device_cert, ca_cert]: [CertificateDer<'static>; 2] =
            certs.try_into().map_err(|certs: Vec<_>| {
                bad(format!(
                    "expected 2 certificates (the device's, then the CA's), found {}",
                    certs.len()
                ))
            })?;
        // Without a server-name line the collector's host is the name to expect.
        let server_name = server_name.unwrap_or_else(|| {
            collector
                .first()
                .and_then(|c| c.rsplit_once(':'))
                .map(|(host, _)| {
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string()
                })
                .unwrap_or_default()
        });
        Ok(IssuedCertificate {
            collector,
            server_name,
            device_cert,
            ca_cert,
            origin: origin.to_path_buf(),
        })
    }
}

fn check_manifest_addresses(
    path: &Path,
    collector: &[String],
    server_name: &str,
) -> Result<(), BundleError> {
    if collector.is_empty() {
        return Err(BundleError::invalid(
            path,
            "no collector address (want at least one host:port)",
        ));
    }
    for c in collector {
        check_collector_addr(c).map_err(|e| BundleError::invalid(path, e))?;
    }
    if ServerName::try_from(server_name).is_err() {
        return Err(BundleError::invalid(
            path,
            format!("server name {server_name:?} is not a DNS name or IP address"),
        ));
    }
    Ok(())
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let bytes = fs::read(path).map_err(|e| BundleError::io(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BundleError::invalid(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(BundleError::invalid(path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, or SEC1/PKCS#1 if someone converted it).
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, BundleError> {
    let bytes = fs::read(path).map_err(|e| BundleError::io(path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            BundleError::invalid(path, "no PRIVATE KEY in the file")
        }
        e => BundleError::invalid(path, format!("bad PEM: {e}")),
    })
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "private key file is readable by group or others; chmod 600 it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    const MANIFEST: &str =
        "device_id = \"box-1\"\ncollector = [\"localhost:7443\"]\nserver_name = \"localhost\"\n";

    #[test]
    fn load_without_manifest_says_it_is_not_a_bundle() {
        let d = tempfile::tempdir().unwrap();
        let e = DeviceBundle::load(d.path()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("bundle.toml") && msg.contains("not a device bundle"),
            "{msg}"
        );
    }

    #[test]
    fn load_rejects_bad_device_id_in_manifest() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            MANIFEST_FILE,
            "device_id = \"box 1\"\ncollector = [\"h:1\"]\nserver_name = \"h\"\n",
        );
        let msg = DeviceBundle::load(d.path()).unwrap_err().to_string();
        assert!(
            msg.contains("bundle.toml") && msg.contains("box 1"),
            "{msg}"
        );
    }

    #[test]
    fn load_rejects_collector_without_port() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            MANIFEST_FILE,
            "device_id = \"box-1\"\ncollector = [\"collector\"]\nserver_name = \"collector\"\n",
        );
        let msg = DeviceBundle::load(d.path()).unwrap_err().to_string();
        assert!(msg.contains("host:port"), "{msg}");
    }

    #[test]
    fn load_names_the_missing_certificate_file() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), MANIFEST_FILE, MANIFEST);
        let msg = DeviceBundle::load(d.path()).unwrap_err().to_string();
        assert!(msg.contains("device.crt"), "{msg}");
    }

    #[test]
    fn load_rejects_a_certificate_file_without_certificates() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), MANIFEST_FILE, MANIFEST);
        write(d.path(), DEVICE_CERT_FILE, "not pem at all\n");
        let msg = DeviceBundle::load(d.path()).unwrap_err().to_string();
        assert!(
            msg.contains("device.crt") && msg.contains("no CERTIFICATE"),
            "{msg}"
        );
    }

    #[test]
    fn load_rejects_a_key_file_without_a_key() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), MANIFEST_FILE, MANIFEST);
        let fake_cert = pem_encode("CERTIFICATE", b"\x30\x00");
        write(d.path(), DEVICE_CERT_FILE, &fake_cert);
        write(d.path(), CA_CERT_FILE, &fake_cert);
        write(d.path(), DEVICE_KEY_FILE, &fake_cert);
        let msg = DeviceBundle::load(d.path()).unwrap_err().to_string();
        assert!(
            msg.contains("device.key") && msg.contains("no PRIVATE KEY"),
            "{msg}"
        );
    }

    #[test]
    fn device_ids_follow_the_ledger_rule() {
        for ok in ["box-17", "a", "A.b_c-9", &"x".repeat(128)] {
            assert!(check_device_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "box 17", "box/17", "bóx", "a+b", &"x".repeat(129)] {
            assert!(check_device_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uris_round_trip_and_reject_malformed_ones() {
        let key = [7u8; 32];
        assert_eq!(parse_ledger_key_uri(&ledger_key_uri(&key)), Some(key));
        assert_eq!(parse_device_uri(&device_uri("box-1")), Some("box-1"));
        assert_eq!(parse_device_uri("urn:edgelora:device:box 1"), None);
        assert_eq!(parse_ledger_key_uri("urn:edgelora:ledger-key:AAAA"), None);
        assert_eq!(parse_ledger_key_uri("urn:other:AAAA"), None);
    }

    #[test]
    fn issued_certificate_text_round_trips() {
        let issued = IssuedCertificate {
            collector: vec!["c.example:7443".into()],
            server_name: "c.example".into(),
            device_cert: CertificateDer::from(vec![0x30, 0x01, 0x01]),
            ca_cert: CertificateDer::from(vec![0x30, 0x01, 0x02]),
            origin: PathBuf::new(),
        };
        let back = IssuedCertificate::parse(&issued.to_text(), Path::new("x")).unwrap();
        assert_eq!(back.collector, issued.collector);
        assert_eq!(back.server_name, issued.server_name);
        assert_eq!(back.device_cert, issued.device_cert);
        assert_eq!(back.ca_cert, issued.ca_cert);
    }

    #[test]
    fn issued_certificate_needs_two_certificates() {
        let text = format!(
            "collector: c:1\nserver-name: c\n{}",
            pem_encode("CERTIFICATE", b"\x30\x00")
        );
        let msg = IssuedCertificate::parse(&text, Path::new("cert.txt"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cert.txt") && msg.contains("found 1"), "{msg}");
    }

    #[test]
    fn atomic_write_sets_the_mode_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret.key");
        write_file_atomic(&p, b"abc", 0o600).unwrap();
        write_file_atomic(&p, b"def", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"def");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
