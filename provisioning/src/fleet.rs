//! The fleet directory: the operator's side of the PKI.
//!
//! ```text
//! FLEET/fleet.toml        name, collector_hosts, collector ("host:port"), crl_days
//! FLEET/ca.crt, ca.key    the fleet root CA (key mode 0600)
//! FLEET/collector.crt/.key  the collector's server certificate (serverAuth only)
//! FLEET/crl.pem           the CRL the collector enforces; re-signed by `revoke` and `crl`
//! FLEET/update.key/.pub   Ed25519 seed (0600) and verifier key for appliance update bundles
//! FLEET/devices/<id>.toml one record per enrolled device
//! ```
//!
//! Every file is written to a temporary file, fsynced and renamed into place. Operations that
//! change the fleet (enroll, sign-csr, revoke, crl) hold an exclusive lock on `FLEET/.lock`,
//! so two operators running `revoke` at once cannot drop each other's entry from the CRL.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use edgelora_ledger::sync::bundle::{
    self, BundleError, DeviceBundle, IssuedCertificate, check_device_id, write_file_atomic,
};
use edgelora_ledger::{LedgerKey, PublicKey};
use rcgen::{Issuer, KeyPair, RevokedCertParams, SerialNumber};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::pki::{self, LeafUsage, PkiError};

pub const FLEET_FILE: &str = "fleet.toml";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const COLLECTOR_CERT_FILE: &str = "collector.crt";
pub const COLLECTOR_KEY_FILE: &str = "collector.key";
pub const CRL_FILE: &str = "crl.pem";
pub const UPDATE_KEY_FILE: &str = "update.key";
pub const UPDATE_PUB_FILE: &str = "update.pub";
pub const DEVICES_DIR: &str = "devices";
const LOCK_FILE: &str = ".lock";

/// The collector's default TCP port.
pub const DEFAULT_PORT: u16 = 7443;
/// Default CRL lifetime: the collector refuses every device once it passes, so refresh it
/// (`edgelora-fleet crl`) well before.
pub const DEFAULT_CRL_DAYS: u32 = 30;

/// What went wrong with a fleet directory operation.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error(
        "{} already holds a fleet ({}); refusing to overwrite it",
        dir.display(), found.join(", ")
    )]
    Exists { dir: PathBuf, found: Vec<String> },
    #[error(
        "{} is not a fleet directory (no fleet.toml); create one with `edgelora-fleet init --dir {}`",
        .0.display(), .0.display()
    )]
    NotAFleet(PathBuf),
    #[error(
        "device {device_id} is already enrolled (certificate serial {serial}); revoke it first \
         with `edgelora-fleet revoke --dir {} --device {device_id}`",
        fleet_dir.display()
    )]
    AlreadyEnrolled {
        device_id: String,
        serial: String,
        fleet_dir: PathBuf,
    },
    #[error("no device {0:?} is enrolled in this fleet (see `edgelora-fleet devices`)")]
    UnknownDevice(String),
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("ledger key: {0}")]
    LedgerKey(#[from] edgelora_ledger::KeyError),
}

impl From<rcgen::Error> for FleetError {
    fn from(e: rcgen::Error) -> Self {
        FleetError::Pki(PkiError::Rcgen(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FleetError + '_ {
    move |source| FleetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, why: impl Into<String>) -> FleetError {
    FleetError::Invalid {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// `fleet.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetConfig {
    pub name: String,
    /// Names the collector's certificate carries; the first is the name devices expect.
    pub collector_hosts: Vec<String>,
    /// `<first host>:<port>`: where devices connect.
    pub collector: String,
    /// Lifetime of each CRL signed by `revoke` and `crl`.
    pub crl_days: u32,
}

/// What `Fleet::init` creates.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Letters, digits, '.', '_', '-'; names the CA ("<name> fleet root CA").
    pub name: String,
    pub collector_hosts: Vec<String>,
    pub port: u16,
    pub crl_days: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            name: "edgelora".into(),
            collector_hosts: vec!["localhost".into(), "127.0.0.1".into()],
            port: DEFAULT_PORT,
            crl_days: DEFAULT_CRL_DAYS,
        }
    }
}

/// How a device got its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrollFlow {
    /// `edgelora-fleet enroll`: the fleet made the keys and handed over a bundle.
    Enroll,
    /// `edgelora-fleet sign-csr`: the device made its keys; the fleet signed its CSR.
    Csr,
}

/// Why a certificate was revoked (RFC 5280 reason codes; "unspecified" is left out of the
/// CRL entry, as the RFC asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    #[default]
    Unspecified,
    KeyCompromise,
}

/// A certificate the device held before its current one; always revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlierCert {
    pub serial: String,
    pub not_after: i64,
    pub revoked_ms: u64,
    #[serde(default)]
    pub revocation_reason: RevocationReason,
}

/// `devices/<id>.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    /// The device's ledger public key, `PublicKey::to_verifier_string()` form, named by the
    /// device id.
    pub ledger_key: String,
    /// Serial of the current certificate, lower-case hex.
    pub serial: String,
    /// Validity of the current certificate, unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub enrolled_ms: u64,
    pub flow: EnrollFlow,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_reason: Option<RevocationReason>,
    /// Certificates this device id held before (re-enrolled after a revocation); the CRL keeps
    /// listing them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<EarlierCert>,
}

/// A device's state at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Active,
    Revoked,
    Expired,
    /// Not valid yet (a certificate issued with a future start).
    Pending,
}

impl DeviceRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_ms.is_some()
    }

    /// Status at `now` (unix seconds).
    pub fn status(&self, now: i64) -> DeviceStatus {
        if self.is_revoked() {
            DeviceStatus::Revoked
        } else if now > self.not_after {
            DeviceStatus::Expired
        } else if now < self.not_before {
            DeviceStatus::Pending
        } else {
            DeviceStatus::Active
        }
    }
}

/// What a freshly signed CRL holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    pub number: u64,
    /// Revoked serials listed.
    pub revoked: usize,
    pub next_update: OffsetDateTime,
}

/// An opened fleet directory.
#[derive(Debug, Clone)]
pub struct Fleet {
    dir: PathBuf,
    config: FleetConfig,
}

/// The fleet CA, loaded for one signing operation.
struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fleet name: the same characters as a device id, so the update key name is valid too.
fn check_fleet_name(name: &str) -> Result<(), FleetError> {
    check_device_id(name).map_err(|_| {
        FleetError::Options(format!(
            "fleet name {name:?} must be 1-128 letters, digits, '.', '_' or '-'"
        ))
    })
}

impl Fleet {
    /// Creates a fleet in `dir` (created if missing, mode 0700): CA, collector certificate,
    /// empty CRL, update signing key, `fleet.toml` (written last), `devices/`. Refuses if `dir`
    /// already holds any fleet file.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Fleet, FleetError> {
        check_fleet_name(&opts.name)?;
        if opts.collector_hosts.is_empty() {
            return Err(FleetError::Options(
                "at least one collector host is needed".into(),
            ));
        }
        for h in &opts.collector_hosts {
            pki::host_san(h)?;
        }
        if opts.port == 0 {
            return Err(FleetError::Options("the collector port cannot be 0".into()));
        }
        if opts.crl_days == 0 {
            return Err(FleetError::Options("crl_days must be at least 1".into()));
        }
        let found: Vec<String> = [
            FLEET_FILE,
            CA_CERT_FILE,
            CA_KEY_FILE,
            COLLECTOR_KEY_FILE,
            CRL_FILE,
            UPDATE_KEY_FILE,
            DEVICES_DIR,
        ]
        .iter()
        .filter(|f| dir.join(f).exists())
        .map(|f| f.to_string())
        .collect();
        if !found.is_empty() {
            return Err(FleetError::Exists {
                dir: dir.to_path_buf(),
                found,
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let devices = dir.join(DEVICES_DIR);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&devices)
            .map_err(io_err(&devices))?;

        let now = OffsetDateTime::now_utc();
        let ca_key = pki::generate_key()?;
        let ca_cert = pki::ca_params(&opts.name, now)?.self_signed(&ca_key)?;
        write_file_atomic(
            &dir.join(CA_KEY_FILE),
            ca_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_file_atomic(&dir.join(CA_CERT_FILE), ca_cert.pem().as_bytes(), 0o644)?;

        let host = &opts.collector_hosts[0];
        let collector = if host.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{host}]:{}", opts.port)
        } else {
            format!("{host}:{}", opts.port)
        };
        let fleet = Fleet {
            dir: dir.to_path_buf(),
            config: FleetConfig {
                name: opts.name.clone(),
                collector_hosts: opts.collector_hosts.clone(),
                collector,
                crl_days: opts.crl_days,
            },
        };
        let ca = fleet.load_ca()?;
        let collector_key = pki::generate_key()?;
        let collector_cert = pki::collector_params(&opts.name, &opts.collector_hosts, now)?
            .signed_by(&collector_key, &ca.issuer)?;
        write_file_atomic(
            &dir.join(COLLECTOR_KEY_FILE),
            collector_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_file_atomic(
            &dir.join(COLLECTOR_CERT_FILE),
            collector_cert.pem().as_bytes(),
            0o644,
        )?;

        // The update-bundle signing key: a raw Ed25519 seed, with its note-style verifier key.
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| PkiError::Random(e.to_string()))?;
        let update_key = LedgerKey::from_seed(&format!("{}-updates", opts.name), seed)?;
        write_file_atomic(&dir.join(UPDATE_KEY_FILE), &seed, 0o600)?;
        write_file_atomic(
            &dir.join(UPDATE_PUB_FILE),
            format!("{}\n", update_key.public_key().to_verifier_string()).as_bytes(),
            0o644,
        )?;

        fleet.sign_crl(&ca, now, now + Duration::days(i64::from(opts.crl_days)))?;

        let text = toml::to_string(&fleet.config)
            .map_err(|e| invalid(&dir.join(FLEET_FILE), e.to_string()))?;
        write_file_atomic(&dir.join(FLEET_FILE), text.as_bytes(), 0o644)?;
        Ok(fleet)
    }

    /// Opens an existing fleet directory.
    pub fn open(dir: &Path) -> Result<Fleet, FleetError> {
        let path = dir.join(FLEET_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FleetError::NotAFleet(dir.to_path_buf()));
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let config: FleetConfig =
            toml::from_str(&text).map_err(|e| invalid(&path, e.to_string()))?;
        if config.collector_hosts.is_empty() {
            return Err(invalid(&path, "collector_hosts is empty"));
        }
        bundle::check_collector_addr(&config.collector).map_err(|e| invalid(&path, e))?;
        if config.crl_days == 0 {
            return Err(invalid(&path, "crl_days must be at least 1"));
        }
        Ok(Fleet {
            dir: dir.to_path_buf(),
            config,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// `host:port` devices connect to.
    pub fn collector_addr(&self) -> &str {
        &self.config.collector
    }

    /// The name devices expect on the collector's certificate: the first collector host.
    pub fn server_name(&self) -> &str {
        &self.config.collector_hosts[0]
    }

    /// The record of device `id`, if it was ever enrolled.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>, FleetError> {
        check_device_id(id)?;
        let path = self.record_path(id);
        match fs::read_to_string(&path) {
            Ok(text) => parse_record(&path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Every device record, sorted by id. A record that does not parse is an error (never
    /// skipped: the CRL is built from these, and a skipped record could drop a revocation).
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, FleetError> {
        let dir = self.dir.join(DEVICES_DIR);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            let is_record = path.extension().is_some_and(|e| e == "toml")
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !is_record {
                continue;
            }
            let text = fs::read_to_string(&path).map_err(io_err(&path))?;
            out.push(parse_record(&path, &text)?);
        }
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Ok(out)
    }

    /// The ledger public key registered for device `id`; `None` if the device is unknown or
    /// revoked.
    pub fn ledger_key(&self, id: &str) -> Result<Option<PublicKey>, FleetError> {
        let Some(rec) = self.device(id)? else {
            return Ok(None);
        };
        if rec.is_revoked() {
            return Ok(None);
        }
        PublicKey::from_verifier_string(&rec.ledger_key)
            .map(Some)
            .map_err(|e| invalid(&self.record_path(id), format!("ledger_key: {e}")))
    }

    /// The fleet CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> Result<String, FleetError> {
        let path = self.dir.join(CA_CERT_FILE);
        fs::read_to_string(&path).map_err(io_err(&path))
    }

    /// Enrolls device `id`: makes its TLS key and ledger key, issues a client certificate
    /// valid for `days` (from one minute ago), writes the bundle directory `out_dir` and
    /// registers the device. `out_dir` must not exist or be empty.
    pub fn enroll(&self, id: &str, out_dir: &Path, days: u32) -> Result<DeviceRecord, FleetError> {
        if days == 0 {
            return Err(FleetError::Options("days must be at least 1".into()));
        }
        let now = OffsetDateTime::now_utc();
        self.enroll_with_validity(
            id,
            out_dir,
            now - pki::BACKDATE,
            now + Duration::days(i64::from(days)),
        )
    }

    /// `enroll` with an explicit validity window (tests use it to make an expired certificate).
    pub fn enroll_with_validity(
        &self,
        id: &str,
        out_dir: &Path,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<DeviceRecord, FleetError> {
        let _lock = self.lock()?;
        let earlier = self.enrollable(id)?;
        self.write_bundle(
            id,
            out_dir,
            (not_before, not_after),
            LeafUsage::ClientAuth,
            Some(earlier),
        )
        .map(|r| r.expect("write_bundle returns the record it was asked to register"))
    }

    /// Writes a bundle whose certificate, signed by this fleet's CA, allows serverAuth only.
    /// The device is not registered. Such a certificate must never authenticate a device: this
    /// exists so tests can prove the collector refuses it.
    pub fn issue_server_auth_bundle(&self, id: &str, out_dir: &Path) -> Result<(), FleetError> {
        let now = OffsetDateTime::now_utc();
        let window = (now - pki::BACKDATE, now + Duration::days(1));
        self.write_bundle(id, out_dir, window, LeafUsage::ServerAuth, None)
            .map(|_| ())
    }

    /// Signs a device's CSR (see `pki::read_device_csr`: the certificate is built fresh, only
    /// the device id, ledger key and public key come from the CSR), registers the device with
    /// flow "csr", and returns what to hand back to the device.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        days: u32,
    ) -> Result<(DeviceRecord, IssuedCertificate), FleetError> {
        if days == 0 {
            return Err(FleetError::Options("days must be at least 1".into()));
        }
        let req = pki::read_device_csr(csr_pem)?;
        let _lock = self.lock()?;
        let earlier = self.enrollable(&req.device_id)?;
        let ca = self.load_ca()?;
        let now = OffsetDateTime::now_utc();
        let params = pki::device_params(
            &req.device_id,
            &req.ledger_key,
            now - pki::BACKDATE,
            now + Duration::days(i64::from(days)),
            &pki::random_serial()?,
            LeafUsage::ClientAuth,
        )?;
        let cert = params.signed_by(&req.public_key, &ca.issuer)?;
        let ledger_key = PublicKey::new(&req.device_id, req.ledger_key)?;
        let record = self.register(
            &req.device_id,
            &ledger_key,
            cert.der(),
            EnrollFlow::Csr,
            earlier,
        )?;
        let issued = IssuedCertificate {
            collector: vec![self.config.collector.clone()],
            server_name: self.server_name().to_string(),
            device_cert: cert.der().clone(),
            ca_cert: ca.der,
            origin: PathBuf::new(),
        };
        Ok((record, issued))
    }

    /// Marks device `id` revoked and re-signs the CRL. Revoking a revoked device changes
    /// nothing but the CRL's signature time.
    pub fn revoke(&self, id: &str, reason: RevocationReason) -> Result<DeviceRecord, FleetError> {
        let _lock = self.lock()?;
        let mut rec = self
            .device(id)?
            .ok_or_else(|| FleetError::UnknownDevice(id.to_string()))?;
        if !rec.is_revoked() {
            rec.revoked_ms = Some(now_ms());
            rec.revocation_reason = Some(reason);
            self.write_record(&rec)?;
        }
        let ca = self.load_ca()?;
        let now = OffsetDateTime::now_utc();
        self.sign_crl(
            &ca,
            now,
            now + Duration::days(i64::from(self.config.crl_days)),
        )?;
        Ok(rec)
    }

    /// Re-signs the CRL, valid from now for `days` (default: `crl_days` from fleet.toml).
    /// Operators run it from cron well within that period.
    pub fn refresh_crl(&self, days: Option<u32>) -> Result<CrlInfo, FleetError> {
        let days = days.unwrap_or(self.config.crl_days);
        if days == 0 {
            return Err(FleetError::Options("days must be at least 1".into()));
        }
        let now = OffsetDateTime::now_utc();
        self.write_crl(now, now + Duration::days(i64::from(days)))
    }

    /// Re-signs the CRL with an explicit window (tests use a `next_update` in the past to
    /// prove an expired CRL locks every device out).
    pub fn write_crl(
        &self,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<CrlInfo, FleetError> {
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        self.sign_crl(&ca, this_update, next_update)
    }

    // ---- internals ----

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(DEVICES_DIR).join(format!("{id}.toml"))
    }

    /// An exclusive lock on the fleet, held until the returned file is dropped.
    fn lock(&self) -> Result<fs::File, FleetError> {
        let path = self.dir.join(LOCK_FILE);
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.lock().map_err(io_err(&path))?;
        Ok(f)
    }

    fn load_ca(&self) -> Result<Ca, FleetError> {
        let cert_path = self.dir.join(CA_CERT_FILE);
        let key_path = self.dir.join(CA_KEY_FILE);
        let pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&key_path, format!("not a PKCS#8 private key: {e}")))?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| invalid(&cert_path, format!("no certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| invalid(&cert_path, format!("not a usable CA certificate: {e}")))?;
        Ok(Ca { pem, der, issuer })
    }

    /// Checks `id` may be enrolled now: unknown, or its current certificate revoked. Returns
    /// the certificates to carry into the new record's `earlier` list.
    fn enrollable(&self, id: &str) -> Result<Vec<EarlierCert>, FleetError> {
        check_device_id(id)?;
        let Some(rec) = self.device(id)? else {
            return Ok(Vec::new());
        };
        let Some(revoked_ms) = rec.revoked_ms else {
            return Err(FleetError::AlreadyEnrolled {
                device_id: id.to_string(),
                serial: rec.serial,
                fleet_dir: self.dir.clone(),
            });
        };
        let mut earlier = rec.earlier;
        earlier.push(EarlierCert {
            serial: rec.serial,
            not_after: rec.not_after,
            revoked_ms,
            revocation_reason: rec.revocation_reason.unwrap_or_default(),
        });
        Ok(earlier)
    }

    /// Issues a certificate with fresh keys and writes a complete bundle to `out_dir`. With
    /// `register = Some(earlier)`, the device is registered (before the bundle appears at
    /// `out_dir`, so no usable bundle ever exists for an unregistered device).
    fn write_bundle(
        &self,
        id: &str,
        out_dir: &Path,
        (not_before, not_after): (OffsetDateTime, OffsetDateTime),
        usage: LeafUsage,
        register: Option<Vec<EarlierCert>>,
    ) -> Result<Option<DeviceRecord>, FleetError> {
        check_device_id(id)?;
        if not_after <= not_before {
            return Err(FleetError::Options(
                "the certificate must end after it starts".into(),
            ));
        }
        if out_dir.exists() {
            let empty = fs::read_dir(out_dir)
                .map_err(io_err(out_dir))?
                .next()
                .is_none();
            if !empty {
                return Err(invalid(
                    out_dir,
                    "already exists and is not empty; choose a new bundle directory",
                ));
            }
        }
        let name = out_dir
            .file_name()
            .ok_or_else(|| invalid(out_dir, "not a directory name"))?;
        let mut partial_name = std::ffi::OsString::from(".");
        partial_name.push(name);
        partial_name.push(".partial");
        let partial = out_dir.with_file_name(partial_name);
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&partial)
            .map_err(io_err(&partial))?;

        let result = (|| {
            let ca = self.load_ca()?;
            // load_or_create writes a fresh seed exactly as the daemon reads it (0600, atomic).
            let ledger = LedgerKey::load_or_create(&partial.join(bundle::LEDGER_KEY_FILE), id)?;
            let tls_key = pki::generate_key()?;
            let params = pki::device_params(
                id,
                &ledger.public_key().to_bytes(),
                not_before,
                not_after,
                &pki::random_serial()?,
                usage,
            )?;
            let cert = params.signed_by(&tls_key, &ca.issuer)?;
            write_file_atomic(
                &partial.join(bundle::DEVICE_KEY_FILE),
                tls_key.serialize_pem().as_bytes(),
                0o600,
            )?;
            write_file_atomic(
                &partial.join(bundle::DEVICE_CERT_FILE),
                cert.pem().as_bytes(),
                0o644,
            )?;
            write_file_atomic(
                &partial.join(bundle::CA_CERT_FILE),
                ca.pem.as_bytes(),
                0o644,
            )?;
            // The update key's public half travels with the identity, so an image built from
            // this bundle accepts this fleet's update bundles and no others.
            let update_pub = self.dir.join(UPDATE_PUB_FILE);
            if let Ok(text) = fs::read(&update_pub) {
                write_file_atomic(&partial.join(UPDATE_PUB_FILE), &text, 0o644)?;
            }
            DeviceBundle::write_manifest(
                &partial,
                id,
                std::slice::from_ref(&self.config.collector),
                self.server_name(),
            )?;
            register
                .map(|earlier| {
                    self.register(
                        id,
                        &ledger.public_key(),
                        cert.der(),
                        EnrollFlow::Enroll,
                        earlier,
                    )
                })
                .transpose()
        })();
        let record = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        fs::rename(&partial, out_dir).map_err(|e| {
            invalid(
                out_dir,
                format!(
                    "could not move the finished bundle from {} into place ({e}); the device \
                     is registered: move that directory by hand",
                    partial.display()
                ),
            )
        })?;
        if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_err(parent))?;
        }
        Ok(record)
    }

    /// Writes the device record for a newly issued certificate.
    fn register(
        &self,
        id: &str,
        ledger_key: &PublicKey,
        cert_der: &[u8],
        flow: EnrollFlow,
        earlier: Vec<EarlierCert>,
    ) -> Result<DeviceRecord, FleetError> {
        let summary = pki::cert_summary(cert_der)?;
        let rec = DeviceRecord {
            device_id: id.to_string(),
            ledger_key: ledger_key.to_verifier_string(),
            serial: summary.serial,
            not_before: summary.not_before,
            not_after: summary.not_after,
            enrolled_ms: now_ms(),
            flow,
            revoked_ms: None,
            revocation_reason: None,
            earlier,
        };
        self.write_record(&rec)?;
        Ok(rec)
    }

    fn write_record(&self, rec: &DeviceRecord) -> Result<(), FleetError> {
        let path = self.record_path(&rec.device_id);
        let text = toml::to_string(rec).map_err(|e| invalid(&path, e.to_string()))?;
        write_file_atomic(&path, text.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Signs `crl.pem` listing every revoked certificate of every device record. The CRL
    /// number is one more than the current file's (or the unix time if that is unreadable).
    fn sign_crl(
        &self,
        ca: &Ca,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<CrlInfo, FleetError> {
        if next_update <= this_update {
            return Err(FleetError::Options(
                "the CRL's next update must come after its issue time".into(),
            ));
        }
        let path = self.dir.join(CRL_FILE);
        let mut revoked = Vec::new();
        let entry = |id: &str, serial: &str, ms: u64, reason: RevocationReason| {
            let bytes = pki::unhex(serial)
                .filter(|b| !b.is_empty())
                .ok_or_else(|| {
                    invalid(
                        &self.record_path(id),
                        format!("serial {serial:?} is not hex"),
                    )
                })?;
            Ok::<_, FleetError>(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: pki::from_unix((ms / 1000) as i64),
                reason_code: match reason {
                    RevocationReason::Unspecified => None,
                    RevocationReason::KeyCompromise => Some(rcgen::RevocationReason::KeyCompromise),
                },
                invalidity_date: None,
            })
        };
        for rec in self.devices()? {
            if let Some(ms) = rec.revoked_ms {
                revoked.push(entry(
                    &rec.device_id,
                    &rec.serial,
                    ms,
                    rec.revocation_reason.unwrap_or_default(),
                )?);
            }
            for e in &rec.earlier {
                revoked.push(entry(
                    &rec.device_id,
                    &e.serial,
                    e.revoked_ms,
                    e.revocation_reason,
                )?);
            }
        }
        let previous = fs::read(&path)
            .ok()
            .and_then(|pem| {
                rustls_pki_types::CertificateRevocationListDer::from_pem_slice(&pem).ok()
            })
            .and_then(|der| pki::crl_summary(&der).ok())
            .and_then(|(number, _)| number);
        let number = match previous {
            Some(n) => n + 1,
            None if path.exists() => this_update.unix_timestamp().max(1) as u64,
            None => 1,
        };
        let count = revoked.len();
        let crl =
            pki::crl_params(revoked, this_update, next_update, number).signed_by(&ca.issuer)?;
        let pem = crl.pem().map_err(PkiError::from)?;
        write_file_atomic(&path, pem.as_bytes(), 0o644)?;
        Ok(CrlInfo {
            number,
            revoked: count,
            next_update,
        })
    }
}

fn parse_record(path: &Path, text: &str) -> Result<DeviceRecord, FleetError> {
    let rec: DeviceRecord = toml::from_str(text).map_err(|e| invalid(path, e.to_string()))?;
    let expected = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    if expected.as_deref() != Some(rec.device_id.as_str()) {
        return Err(invalid(
            path,
            format!("holds device_id {:?}, not the file's name", rec.device_id),
        ));
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> (tempfile::TempDir, Fleet) {
        let d = tempfile::tempdir().unwrap();
        let f = Fleet::init(&d.path().join("fleet"), &InitOptions::default()).unwrap();
        (d, f)
    }

    #[test]
    fn init_writes_the_fleet_with_private_keys_0600() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, f) = fleet();
        for k in [CA_KEY_FILE, COLLECTOR_KEY_FILE, UPDATE_KEY_FILE] {
            let mode = fs::metadata(f.dir().join(k)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{k}");
        }
        assert_eq!(fs::read(f.dir().join(UPDATE_KEY_FILE)).unwrap().len(), 32);
        let pubkey = fs::read_to_string(f.dir().join(UPDATE_PUB_FILE)).unwrap();
        assert!(pubkey.starts_with("edgelora-updates+"), "{pubkey}");
        let reopened = Fleet::open(f.dir()).unwrap();
        assert_eq!(reopened.collector_addr(), "localhost:7443");
        assert_eq!(reopened.server_name(), "localhost");
        assert_eq!(reopened.config().crl_days, DEFAULT_CRL_DAYS);
    }

    #[test]
    fn init_refuses_an_existing_fleet() {
        let (_d, f) = fleet();
        let e = Fleet::init(f.dir(), &InitOptions::default()).unwrap_err();
        assert!(matches!(e, FleetError::Exists { .. }), "{e}");
    }

    #[test]
    fn init_refuses_bad_names_and_hosts() {
        let d = tempfile::tempdir().unwrap();
        let bad_name = InitOptions {
            name: "my fleet".into(),
            ..Default::default()
        };
        assert!(Fleet::init(&d.path().join("a"), &bad_name).is_err());
        let bad_host = InitOptions {
            collector_hosts: vec!["not a host".into()],
            ..Default::default()
        };
        assert!(Fleet::init(&d.path().join("b"), &bad_host).is_err());
        assert!(!d.path().join("a").exists() && !d.path().join("b").exists());
    }

    #[test]
    fn ipv6_first_host_is_bracketed_in_the_collector_address() {
        let d = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            collector_hosts: vec!["::1".into()],
            port: 9000,
            ..Default::default()
        };
        let f = Fleet::init(&d.path().join("f"), &opts).unwrap();
        assert_eq!(f.collector_addr(), "[::1]:9000");
    }

    #[test]
    fn enroll_registers_the_device_and_refuses_a_second_enrollment() {
        let (d, f) = fleet();
        let rec = f.enroll("box-1", &d.path().join("b1"), 30).unwrap();
        assert_eq!(rec.flow, EnrollFlow::Enroll);
        assert_eq!(f.device("box-1").unwrap(), Some(rec.clone()));
        let bundle = DeviceBundle::load(&d.path().join("b1")).unwrap();
        assert_eq!(bundle.device_id, "box-1");
        // The ledger key in the bundle is the one registered.
        let key = LedgerKey::load_or_create(&bundle.ledger_key_path().unwrap(), "box-1").unwrap();
        assert_eq!(f.ledger_key("box-1").unwrap(), Some(key.public_key()));

        let e = f.enroll("box-1", &d.path().join("b2"), 30).unwrap_err();
        assert!(e.to_string().contains("edgelora-fleet revoke"), "{e}");
        assert!(!d.path().join("b2").exists());
    }

    #[test]
    fn enroll_refuses_bad_ids_and_non_empty_out_dirs() {
        let (d, f) = fleet();
        assert!(matches!(
            f.enroll("a/b", &d.path().join("x"), 1),
            Err(FleetError::Bundle(BundleError::BadDeviceId(_)))
        ));
        fs::create_dir(d.path().join("full")).unwrap();
        fs::write(d.path().join("full/file"), b"x").unwrap();
        let e = f.enroll("box-2", &d.path().join("full"), 1).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        assert_eq!(f.device("box-2").unwrap(), None);
    }

    #[test]
    fn revoke_lists_the_serial_in_the_crl_and_reenrollment_keeps_it() {
        let (d, f) = fleet();
        let first = f.enroll("box-1", &d.path().join("b1"), 30).unwrap();
        let rec = f.revoke("box-1", RevocationReason::KeyCompromise).unwrap();
        assert!(rec.is_revoked());
        assert_eq!(f.ledger_key("box-1").unwrap(), None);
        let second = f.enroll("box-1", &d.path().join("b2"), 30).unwrap();
        assert_eq!(second.earlier.len(), 1);
        assert_eq!(second.earlier[0].serial, first.serial);
        let info = f.refresh_crl(None).unwrap();
        assert_eq!(info.revoked, 1);

        let pem = fs::read(f.dir().join(CRL_FILE)).unwrap();
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(&pem).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| pki::hex(r.raw_serial()))
            .collect();
        assert_eq!(serials, vec![first.serial]);
    }

    #[test]
    fn crl_numbers_increase() {
        let (_d, f) = fleet();
        let a = f.refresh_crl(None).unwrap();
        let b = f.refresh_crl(Some(2)).unwrap();
        assert_eq!(a.number, 2, "init signs CRL number 1");
        assert_eq!(b.number, 3);
    }

    #[test]
    fn unknown_device_has_no_ledger_key_and_cannot_be_revoked() {
        let (_d, f) = fleet();
        assert_eq!(f.ledger_key("nobody").unwrap(), None);
        assert!(matches!(
            f.revoke("nobody", RevocationReason::Unspecified),
            Err(FleetError::UnknownDevice(_))
        ));
    }
}
