//! The collector's TLS configuration, built from the fleet directory and kept current.
//!
//! TLS 1.3 only, the ring provider passed explicitly (no process-wide default is installed),
//! the collector certificate as server certificate, and a mandatory client certificate that
//! must chain to the fleet CA, allow clientAuth, be within its validity, and not be listed in
//! `crl.pem`. The CRL's own expiry is enforced: once its next-update time passes, every
//! handshake fails until an operator runs `edgelora-fleet crl`.
//!
//! `ServerTls` re-reads `crl.pem`, `ca.crt`, `collector.crt` and `collector.key` whenever
//! their contents change (a revocation takes effect for the next connection, without a
//! restart). A new file that does not make a working configuration is refused with an error
//! in the log, and the previous configuration stays in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use edgelora_ledger::sync::bundle::{ALPN_SYNC_V1, crypto_provider};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::fleet::{CA_CERT_FILE, COLLECTOR_CERT_FILE, COLLECTOR_KEY_FILE, CRL_FILE};
use crate::pki;

/// How often the collector looks at the fleet files by default.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Warn when the CRL expires sooner than this.
const CRL_WARN_BEFORE_SECS: i64 = 24 * 60 * 60;

/// The collector's server TLS configuration, reloadable.
#[derive(Debug)]
pub struct ServerTls {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    config: Arc<ServerConfig>,
    /// SHA-256 over the files `config` was built from.
    digest: [u8; 32],
    /// Digest of files that failed to build (already reported; not retried until they change).
    rejected: Option<[u8; 32]>,
    /// The earliest next-update of the loaded CRLs, unix seconds.
    crl_next_update: Option<i64>,
    alarm: CrlAlarm,
}

/// What has been said about the CRL's expiry, so each state is logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrlAlarm {
    Quiet,
    ExpiresSoon,
    Expired,
}

/// The four files, as read at one moment.
struct Sources {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    crl: Vec<u8>,
}

impl Sources {
    fn read(dir: &Path) -> anyhow::Result<Sources> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(Sources {
            ca: read(CA_CERT_FILE)?,
            cert: read(COLLECTOR_CERT_FILE)?,
            key: read(COLLECTOR_KEY_FILE)?,
            crl: read(CRL_FILE)?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&self.ca, &self.cert, &self.key, &self.crl] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

impl ServerTls {
    /// Builds the configuration from the fleet directory. Fails if any file is missing or
    /// unusable; an expired CRL is loaded (with an error in the log) since refreshing it is
    /// the fix and the watcher will pick the new one up.
    pub fn load(fleet_dir: &Path) -> anyhow::Result<Arc<ServerTls>> {
        let provider = crypto_provider();
        let src = Sources::read(fleet_dir)?;
        let (config, crl_next_update) = build(&provider, fleet_dir, &src)?;
        let tls = Arc::new(ServerTls {
            dir: fleet_dir.to_path_buf(),
            provider,
            state: Mutex::new(State {
                config,
                digest: src.digest(),
                rejected: None,
                crl_next_update,
                alarm: CrlAlarm::Quiet,
            }),
        });
        tls.check_crl_expiry();
        Ok(tls)
    }

    /// The configuration new connections should use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.lock().config.clone()
    }

    /// When the loaded CRL stops being acceptable.
    pub fn crl_next_update(&self) -> Option<SystemTime> {
        self.lock()
            .crl_next_update
            .map(|s| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64))
    }

    /// Re-reads the fleet files; if their contents changed, builds and installs a new
    /// configuration. `Ok(true)` when a new configuration is in force, `Ok(false)` when nothing
    /// changed (or the same rejected files are still there). On a bad new file the previous
    /// configuration stays, the error is logged and returned.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let src = Sources::read(&self.dir)?;
        let digest = src.digest();
        {
            let st = self.lock();
            if digest == st.digest || st.rejected == Some(digest) {
                return Ok(false);
            }
        }
        match build(&self.provider, &self.dir, &src) {
            Ok((config, next_update)) => {
                let mut st = self.lock();
                st.config = config;
                st.digest = digest;
                st.rejected = None;
                st.crl_next_update = next_update;
                st.alarm = CrlAlarm::Quiet;
                drop(st);
                tracing::info!(dir = %self.dir.display(), "reloaded the collector's TLS configuration (CRL, CA or certificate changed)");
                self.check_crl_expiry();
                Ok(true)
            }
            Err(e) => {
                self.lock().rejected = Some(digest);
                tracing::error!(
                    dir = %self.dir.display(),
                    "the changed fleet files do not make a working TLS configuration; keeping \
                     the previous one: {e:#}"
                );
                Err(e)
            }
        }
    }

    /// Polls the fleet files every `interval` (see `reload_if_changed`) and reports the CRL's
    /// approaching or past expiry. Runs until the returned task is aborted.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error: Option<String> = None;
            loop {
                tick.tick().await;
                let t = Arc::clone(&this);
                match tokio::task::spawn_blocking(move || t.reload_if_changed()).await {
                    Ok(Ok(_)) => last_error = None,
                    Ok(Err(e)) => {
                        // A missing file would otherwise be reported every poll.
                        let msg = format!("{e:#}");
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::error!("watching the fleet's TLS files: {msg}");
                            last_error = Some(msg);
                        }
                    }
                    Err(e) => tracing::error!("the TLS reload task failed: {e}"),
                }
                this.check_crl_expiry();
            }
        })
    }

    /// Logs (once per state) a warning when the CRL expires within a day and an error once it
    /// has expired.
    fn check_crl_expiry(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut st = self.lock();
        let Some(next) = st.crl_next_update else {
            return;
        };
        let crl = self.dir.join(CRL_FILE);
        if now >= next {
            if st.alarm != CrlAlarm::Expired {
                st.alarm = CrlAlarm::Expired;
                tracing::error!(
                    crl = %crl.display(),
                    "the CRL expired {} s ago: every device handshake now fails; run \
                     `edgelora-fleet crl --dir {}` (and schedule it from cron)",
                    now - next,
                    self.dir.display()
                );
            }
        } else if next - now < CRL_WARN_BEFORE_SECS {
            if st.alarm == CrlAlarm::Quiet {
                st.alarm = CrlAlarm::ExpiresSoon;
                tracing::warn!(
                    crl = %crl.display(),
                    "the CRL expires in {} minutes; after that every device handshake fails. \
                     Run `edgelora-fleet crl --dir {}`",
                    (next - now) / 60,
                    self.dir.display()
                );
            }
        } else {
            st.alarm = CrlAlarm::Quiet;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is replaced whole under the lock, so it is consistent even if a holder
        // panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds a server configuration from the four files; returns it with the CRL's next update.
fn build(
    provider: &Arc<CryptoProvider>,
    dir: &Path,
    src: &Sources,
) -> anyhow::Result<(Arc<ServerConfig>, Option<i64>)> {
    let ca_path = dir.join(CA_CERT_FILE);
    let cas = CertificateDer::pem_slice_iter(&src.ca)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM", ca_path.display()))?;
    let Some(ca) = cas.first() else {
        bail!("{}: no CERTIFICATE in the file", ca_path.display());
    };
    let (_, ca_x509) = x509_parser::parse_x509_certificate(ca)
        .map_err(|e| anyhow!("{}: not a certificate: {e}", ca_path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in &cas {
        roots
            .add(c.clone())
            .with_context(|| format!("{}: not a usable CA", ca_path.display()))?;
    }

    let crl_path = dir.join(CRL_FILE);
    let crls = CertificateRevocationListDer::pem_slice_iter(&src.crl)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM", crl_path.display()))?;
    if crls.is_empty() {
        bail!(
            "{}: no X509 CRL in the file; run `edgelora-fleet crl --dir {}`",
            crl_path.display(),
            dir.display()
        );
    }
    let mut next_update: Option<i64> = None;
    for der in &crls {
        let (_, crl) = x509_parser::parse_x509_crl(der)
            .map_err(|e| anyhow!("{}: not a CRL: {e}", crl_path.display()))?;
        // webpki would also reject it, but only at handshake time, for every device.
        crl.verify_signature(ca_x509.public_key()).map_err(|e| {
            anyhow!(
                "{}: not signed by the fleet CA in {} ({e})",
                crl_path.display(),
                ca_path.display()
            )
        })?;
        let Some(n) = crl.next_update() else {
            bail!("{}: the CRL has no next-update time", crl_path.display());
        };
        next_update = Some(next_update.map_or(n.timestamp(), |m| m.min(n.timestamp())));
    }

    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .with_crls(crls)
    .enforce_revocation_expiration()
    .build()
    .with_context(|| {
        format!(
            "client verifier from {} and {}",
            ca_path.display(),
            crl_path.display()
        )
    })?;

    let cert_path = dir.join(COLLECTOR_CERT_FILE);
    let chain = CertificateDer::pem_slice_iter(&src.cert)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM", cert_path.display()))?;
    if chain.is_empty() {
        bail!("{}: no CERTIFICATE in the file", cert_path.display());
    }
    let key_path = dir.join(COLLECTOR_KEY_FILE);
    let key = PrivateKeyDer::from_pem_slice(&src.key)
        .with_context(|| format!("{}: no private key", key_path.display()))?;

    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| format!("{} with {}", cert_path.display(), key_path.display()))?;
    config.alpn_protocols = vec![ALPN_SYNC_V1.to_vec()];
    Ok((Arc::new(config), next_update))
}

/// The device id named by the peer's end-entity certificate (its `urn:edgelora:device:` URI).
pub fn peer_device_id(certs: &[CertificateDer<'_>]) -> Option<String> {
    pki::cert_device_id(certs.first()?)
}

/// The ledger public key named by the peer's end-entity certificate (its
/// `urn:edgelora:ledger-key:` URI).
pub fn peer_ledger_key(certs: &[CertificateDer<'_>]) -> Option<[u8; 32]> {
    pki::cert_ledger_key(certs.first()?)
}
