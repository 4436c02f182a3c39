//! Shipping the attribution ledger to the fleet's collector: the `[sync]` config section, the
//! background sync task (`edgelora_ledger::sync::client`), its /metrics and /health view, and
//! the backlog policy (alarm, and optionally refuse new requests, when the unsynced log grows
//! past a cap — events are never dropped to make room).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgelora_ledger::LedgerHandle;
use edgelora_ledger::sync::bundle::DeviceBundle;
use edgelora_ledger::sync::client::{SyncClient, SyncOptions, SyncStatus};
use serde::Deserialize;

/// `[sync]` in the `--config` file.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// The device bundle directory (`edgelora-fleet enroll --out`, or `<data dir>/identity`
    /// after `edgelorad identity install`). Default: `<data dir>/identity` when it holds a
    /// `bundle.toml`.
    pub bundle: Option<PathBuf>,
    /// `false` turns sync off even when a bundle is present.
    pub enabled: Option<bool>,
    /// Collector address(es) `host:port`, overriding the bundle's.
    pub collector: Option<Vec<String>>,
    /// The name on the collector's certificate, overriding the bundle's.
    pub server_name: Option<String>,
    /// Unsynced log (MiB) that raises the alarm (default 1024).
    pub max_backlog_mb: Option<u64>,
    /// At the cap: "refuse" new requests (503; nothing is lost) or "accept" them and only
    /// alarm (default "refuse").
    pub on_backlog_full: Option<String>,
    /// Events per upload (default 4096).
    pub batch_events: Option<usize>,
    /// How often to look for new events once caught up, ms (default 1000).
    pub poll_interval_ms: Option<u64>,
    /// Longest wait between reconnection attempts, s (default 60).
    pub backoff_max_secs: Option<u64>,
}

/// The resolved sync settings.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub bundle: DeviceBundle,
    pub collectors: Vec<String>,
    pub server_name: String,
    pub max_backlog_bytes: u64,
    pub refuse_when_full: bool,
    pub batch_events: usize,
    pub poll_interval: Duration,
    pub backoff_max: Duration,
}

impl SyncSettings {
    /// Resolves `[sync]` and `--sync-bundle`: `None` when sync is off or no bundle exists.
    pub fn resolve(
        section: Option<SyncSection>,
        flag_bundle: Option<PathBuf>,
        data_dir: &Path,
    ) -> Result<Option<SyncSettings>> {
        let section = section.unwrap_or_default();
        if section.enabled == Some(false) {
            return Ok(None);
        }
        let default_dir = data_dir.join("identity");
        let dir = match flag_bundle.or(section.bundle.clone()) {
            Some(d) => d,
            None if default_dir.join("bundle.toml").exists() => default_dir,
            None if section.enabled == Some(true) => bail!(
                "[sync] is enabled but there is no bundle: set `bundle`, pass --sync-bundle, or \
                 run `edgelorad identity csr` / `identity install` to create {}",
                default_dir.display()
            ),
            None => return Ok(None),
        };
        let bundle = DeviceBundle::load(&dir)
            .with_context(|| format!("loading the device bundle {}", dir.display()))?;
        let collectors = section
            .collector
            .clone()
            .unwrap_or_else(|| bundle.collector.clone());
        if collectors.is_empty() {
            bail!(
                "no collector address: the bundle {} names none and [sync] sets no `collector`",
                dir.display()
            );
        }
        let refuse_when_full = match section.on_backlog_full.as_deref() {
            None | Some("refuse") => true,
            Some("accept") => false,
            Some(o) => bail!("[sync] on_backlog_full {o:?}: use \"refuse\" or \"accept\""),
        };
        Ok(Some(SyncSettings {
            server_name: section
                .server_name
                .clone()
                .unwrap_or_else(|| bundle.server_name.clone()),
            collectors,
            max_backlog_bytes: section
                .max_backlog_mb
                .unwrap_or(1024)
                .saturating_mul(1 << 20),
            refuse_when_full,
            batch_events: section.batch_events.unwrap_or(4096).max(1),
            poll_interval: Duration::from_millis(section.poll_interval_ms.unwrap_or(1000).max(10)),
            backoff_max: Duration::from_secs(section.backoff_max_secs.unwrap_or(60).max(1)),
            bundle,
        }))
    }
}

/// The running sync task and its policy.
pub struct Sync {
    client: SyncClient,
    settings: SyncSettings,
}

impl Sync {
    /// Starts syncing `ledger` (on the current tokio runtime).
    pub fn start(settings: SyncSettings, ledger: LedgerHandle) -> Result<Sync> {
        let tls = settings
            .bundle
            .client_config()
            .with_context(|| format!("TLS from the bundle {}", settings.bundle.dir.display()))?;
        let mut opts = SyncOptions::new(
            settings.bundle.device_id.clone(),
            settings.collectors.clone(),
            settings.server_name.clone(),
            tls,
        );
        opts.batch_events = settings.batch_events;
        opts.poll_interval = settings.poll_interval;
        opts.backoff_max = settings.backoff_max;
        opts.max_backlog_bytes = Some(settings.max_backlog_bytes);
        opts.agent = format!("edgelorad {}", env!("CARGO_PKG_VERSION"));
        eprintln!(
            "edgelorad: syncing the attribution ledger to {} as {} (backlog cap {} MiB, {} when full)",
            settings.collectors.join(", "),
            settings.bundle.device_id,
            settings.max_backlog_bytes >> 20,
            if settings.refuse_when_full {
                "refuse requests"
            } else {
                "alarm only"
            },
        );
        Ok(Sync {
            client: SyncClient::spawn(ledger, opts),
            settings,
        })
    }

    pub fn status(&self) -> SyncStatus {
        self.client.status()
    }

    /// `Err(message)` when the backlog is over the cap and the policy is to refuse requests.
    pub fn admission(&self) -> std::result::Result<(), String> {
        if !self.settings.refuse_when_full {
            return Ok(());
        }
        let s = self.client.status();
        if !s.alarm {
            return Ok(());
        }
        Err(format!(
            "The attribution log has {} MiB ({} events) not yet accepted by the fleet collector, \
             over this device's cap of {} MiB; requests are refused until it syncs{}",
            s.backlog_bytes >> 20,
            s.backlog_events,
            self.settings.max_backlog_bytes >> 20,
            s.last_error
                .map(|e| format!(" (last sync error: {e})"))
                .unwrap_or_default()
        ))
    }

    /// The `sync` block of `/health`.
    pub fn health(&self) -> serde_json::Value {
        let s = self.client.status();
        serde_json::json!({
            "device_id": self.settings.bundle.device_id,
            "collector": self.settings.collectors,
            "connected": s.connected,
            "acked_next_seq": s.acked.map(|p| p.next_seq),
            "last_success_ms": s.last_success_ms,
            "backlog_events": s.backlog_events,
            "backlog_bytes": s.backlog_bytes,
            "backlog_cap_bytes": self.settings.max_backlog_bytes,
            "alarm": s.alarm,
            "refusing_requests": s.alarm && self.settings.refuse_when_full,
            "last_error": s.last_error,
            "refused": s.refused.map(|(code, msg)| format!("{code:?}: {msg}")),
            "uploads": s.uploads,
            "events_sent": s.events_sent,
            "failures": s.failures,
        })
    }

    /// Stops the task.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
    }
}

/// The sync task's figures in /metrics (set from `SyncStatus` at each scrape).
#[derive(Debug, Default, Clone)]
pub struct SyncMetrics {
    backlog_events: prometheus_client::metrics::gauge::Gauge,
    backlog_bytes: prometheus_client::metrics::gauge::Gauge,
    last_success: prometheus_client::metrics::gauge::Gauge,
    acked_seq: prometheus_client::metrics::gauge::Gauge,
    connected: prometheus_client::metrics::gauge::Gauge,
    alarm: prometheus_client::metrics::gauge::Gauge,
    failures: prometheus_client::metrics::gauge::Gauge,
    events_sent: prometheus_client::metrics::gauge::Gauge,
}

impl SyncMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "sync_backlog_events",
            "Attribution events not yet acknowledged by the fleet collector",
            self.backlog_events.clone(),
        );
        r.register(
            "sync_backlog_bytes",
            "Bytes of attribution log not yet acknowledged by the fleet collector",
            self.backlog_bytes.clone(),
        );
        r.register(
            "sync_last_success_timestamp_seconds",
            "Unix time of the last upload the collector acknowledged (0: never)",
            self.last_success.clone(),
        );
        r.register(
            "sync_acked_seq",
            "The collector's acknowledgement: every event below this sequence number is stored",
            self.acked_seq.clone(),
        );
        r.register(
            "sync_connected",
            "1 while a sync session with the collector is open",
            self.connected.clone(),
        );
        r.register(
            "sync_backlog_alarm",
            "1 while the unsynced backlog is over the configured cap",
            self.alarm.clone(),
        );
        r.register(
            "sync_failures",
            "Sync sessions that ended in an error or refusal since start",
            self.failures.clone(),
        );
        r.register(
            "sync_events_sent",
            "Events uploaded and acknowledged since start",
            self.events_sent.clone(),
        );
    }

    pub fn set(&self, s: &SyncStatus) {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.backlog_events.set(i(s.backlog_events));
        self.backlog_bytes.set(i(s.backlog_bytes));
        self.last_success
            .set(i(s.last_success_ms.unwrap_or(0) / 1000));
        self.acked_seq.set(i(s.acked.map_or(0, |p| p.next_seq)));
        self.connected.set(s.connected as i64);
        self.alarm.set(s.alarm as i64);
        self.failures.set(i(s.failures));
        self.events_sent.set(i(s.events_sent));
    }
}
