//! `edgelorad serve`: the OpenAI-compatible HTTP API over the continuous-batching scheduler.
//!
//! One engine thread owns the [`Scheduler`] and the step backend (built on that thread, so the
//! backend never crosses threads); HTTP handlers on a small tokio runtime validate requests,
//! turn them into [`GenRequest`]s sent over a channel, and stream the engine's events back.
//! `/health` answers 503 until the model and adapters are loaded.
//! Run by a systemd `Type=notify` unit, it sends `READY=1` at that same moment, `STATUS=` while
//! loading, `STOPPING=1` on SIGTERM, and `WATCHDOG=1` only while the engine's step loop beats.

mod admin;
mod errors;
mod handlers;
pub mod mdns;
pub mod types;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use edgelora_hal::board::{
    GuardConfig, Heartbeat, LinuxWatchdog, SystemdNotifier, SystemdWatchdog, WatchdogGuard,
};
use edgelora_hal::clock::MonotonicClock;
use edgelora_kernels::cpu::lora::AdapterBits;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;

use crate::adapters::pack::fingerprint;
use crate::adapters::registry::{Registry, default_data_dir};
use crate::adapters::residency::{ResidencyConfig, ResidentState};
use crate::cli::ModelArgs;
use crate::device::DeviceSpec;
use crate::engine::forward::ActMode;
use crate::engine::scheduler::{GenRequest, Limits, SchedStats, Scheduler};
use crate::engine::{ForwardOptions, KvDtype};
use crate::model::{Model, WeightDtype};

pub use errors::ApiError;

/// `edgelorad serve` flags; each overrides the same key of `--config`.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// A TOML file with any of the keys below (snake_case, e.g. `listen = "0.0.0.0:8080"`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A Hugging Face folder, a GPTQ folder or a GGUF file (default: SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The adapter packs (`<id>.elpack`, made by `edgelorad adapters import`); each is served
    /// as model `<id>` (default: <data dir>/adapters).
    #[arg(long)]
    pub adapters_dir: Option<PathBuf>,
    /// Where the appliance keeps its state: adapters, the ledger (default $EDGELORA_DATA, else
    /// $XDG_DATA_HOME/edgelora or ~/.local/share/edgelora).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// At most this many adapters resident in the pool at once (default: as many as the page
    /// budget holds).
    #[arg(long)]
    pub pool_adapters: Option<usize>,
    /// Bearer token of the admin routes (/v1/adapters); else $EDGELORA_ADMIN_TOKEN. Without
    /// one the admin routes answer 403.
    #[arg(long)]
    pub admin_token: Option<String>,
    /// Who is credited for the base model in attribution events (default "unattributed").
    #[arg(long)]
    pub base_contributor: Option<String>,
    /// The attribution ledger: `strict` (default; an answer is sent only after its event is
    /// fsynced) or `relaxed` (fsync on a timer: a power loss can lose the last interval).
    #[arg(long)]
    pub durability: Option<String>,
    /// The origin that signs the ledger's checkpoints (default: the host name).
    #[arg(long)]
    pub device_id: Option<String>,
    /// Address to listen on (default 127.0.0.1:8080). Any non-loopback address needs an API key.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Projection weights: int4 or f32.
    #[arg(long)]
    pub dtype: Option<WeightDtype>,
    /// INT4 group size for quantize-at-load.
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Activations against quantized weights: int8 or f32.
    #[arg(long)]
    pub act: Option<ActMode>,
    /// Adapters' A and B on the int8 path: 8 bits (default) or 4 (0.57 of the bytes per step for a
    /// batch of distinct adapters, moving each adapter's effect by 10-14%; BENCHMARKS.md).
    #[arg(long)]
    pub adapter_bits: Option<AdapterBits>,
    /// KV cache element type: f32, f16 or int4.
    #[arg(long)]
    pub kv: Option<KvDtype>,
    /// Tokens per KV page (default 16).
    #[arg(long)]
    pub page_size: Option<usize>,
    /// KV budget in tokens across every running sequence (default 16384).
    #[arg(long)]
    pub kv_tokens: Option<usize>,
    /// Rows per forward step, prefill chunks included (default 512).
    #[arg(long)]
    pub max_step_tokens: Option<usize>,
    /// Sequences running at once (default 64).
    #[arg(long)]
    pub max_running: Option<usize>,
    /// Compute device: auto, cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Bearer token clients must send (else $EDGELORA_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Allow a non-loopback --listen without an API key.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Largest request body accepted (default 1 MiB); larger ones get 413.
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Seconds to finish running requests after SIGTERM/SIGINT (default 30).
    #[arg(long)]
    pub shutdown_grace_secs: Option<u64>,
    /// A hardware watchdog device (e.g. /dev/watchdog): armed once the model is loaded and
    /// petted only while the engine's step loop is alive, so a stuck engine reboots the box.
    /// Under systemd with `WatchdogSec=` ($WATCHDOG_USEC), systemd's watchdog is petted the same
    /// way, beside this one.
    #[arg(long)]
    pub watchdog: Option<PathBuf>,
    /// Advertise the server on the LAN over mDNS/DNS-SD as `_edgelora._tcp` (TXT: base model,
    /// number of adapters, whether a key is required).
    #[arg(long)]
    pub mdns: bool,
    /// Sync the attribution ledger to the fleet's collector with this device bundle (default:
    /// `[sync] bundle` in the config, else <data dir>/identity when it holds a bundle.toml).
    #[arg(long)]
    pub sync_bundle: Option<PathBuf>,
}

/// The `--config` file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    model: Option<PathBuf>,
    adapters_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    pool_adapters: Option<usize>,
    admin_token: Option<String>,
    base_contributor: Option<String>,
    durability: Option<String>,
    device_id: Option<String>,
    listen: Option<String>,
    threads: Option<usize>,
    dtype: Option<String>,
    group_size: Option<usize>,
    act: Option<String>,
    adapter_bits: Option<u32>,
    kv: Option<String>,
    page_size: Option<usize>,
    kv_tokens: Option<usize>,
    max_step_tokens: Option<usize>,
    max_running: Option<usize>,
    device: Option<String>,
    api_key: Option<String>,
    insecure_no_auth: Option<bool>,
    max_body_bytes: Option<usize>,
    shutdown_grace_secs: Option<u64>,
    watchdog: Option<PathBuf>,
    mdns: Option<bool>,
    sync: Option<crate::sync::SyncSection>,
}

/// Flags over the file over the defaults.
#[derive(Debug)]
pub struct ServeConfig {
    pub m: ModelArgs,
    pub adapters_dir: PathBuf,
    pub data_dir: PathBuf,
    pub pool_adapters: usize,
    pub admin_token: Option<String>,
    pub base_contributor: String,
    pub relaxed: bool,
    pub device_id: String,
    pub listen: SocketAddr,
    pub kv_tokens: usize,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub insecure_no_auth: bool,
    pub max_body_bytes: usize,
    pub grace: Duration,
    pub watchdog: Option<PathBuf>,
    pub mdns: bool,
    /// Ledger sync to the fleet (`None`: off).
    pub sync: Option<crate::sync::SyncSettings>,
    /// The ledger signing key: the bundle's `ledger.key` when it has one, else
    /// `<data dir>/ledger/ledger.key` (created on first start).
    pub ledger_key: PathBuf,
}

fn parse_opt<T: std::str::FromStr>(v: Option<String>, key: &str) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    v.map(|s| {
        s.parse::<T>()
            .map_err(|e| anyhow::anyhow!("config key `{key}`: {e}"))
    })
    .transpose()
}

impl ServeArgs {
    pub fn resolve(self) -> Result<ServeConfig> {
        let file: ConfigFile = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => ConfigFile::default(),
        };
        let rel = |p: PathBuf| match &self.config {
            // Paths in the file are relative to the file.
            Some(c) if p.is_relative() => c.parent().unwrap_or(Path::new(".")).join(p),
            _ => p,
        };
        let listen = match self.listen {
            Some(a) => a,
            None => match file.listen {
                Some(s) => s
                    .parse()
                    .with_context(|| format!("config key `listen`: {s:?}"))?,
                None => "127.0.0.1:8080".parse().expect("valid default"),
            },
        };
        let page_size = self.page_size.or(file.page_size).unwrap_or(16);
        if page_size == 0 {
            bail!("--page-size must be at least 1");
        }
        let m = ModelArgs {
            model: self.model.or(file.model.map(rel)),
            adapter: None,
            dtype: match self.dtype {
                Some(d) => d,
                None => parse_opt(file.dtype, "dtype")?.unwrap_or(WeightDtype::Int4),
            },
            group_size: self.group_size.or(file.group_size).unwrap_or(32),
            kv: match self.kv {
                Some(k) => k,
                None => parse_opt(file.kv, "kv")?.unwrap_or(KvDtype::F32),
            },
            page_size,
            sparse_budget: None,
            sparse_recent: 4,
            sparse_select: crate::cli::SparseSelect::Head,
            act: match self.act {
                Some(a) => a,
                None => parse_opt(file.act, "act")?.unwrap_or(ActMode::Int8),
            },
            adapter_bits: match self.adapter_bits {
                Some(b) => b,
                None => parse_opt(file.adapter_bits.map(|b| b.to_string()), "adapter_bits")?
                    .unwrap_or_default(),
            },
            threads: self.threads.or(file.threads),
            device: match self.device {
                Some(d) => d,
                None => parse_opt(file.device, "device")?.unwrap_or(DeviceSpec::Auto),
            },
        };
        let api_key = self
            .api_key
            .or(file.api_key)
            .or_else(|| std::env::var("EDGELORA_API_KEY").ok())
            .filter(|k| !k.is_empty());
        let insecure_no_auth = self.insecure_no_auth || file.insecure_no_auth.unwrap_or(false);
        if !listen.ip().is_loopback() && api_key.is_none() && !insecure_no_auth {
            bail!(
                "listening on {listen} (not loopback) needs an API key: --api-key, `api_key` in the \
                 config or $EDGELORA_API_KEY (or --insecure-no-auth)"
            );
        }
        let limits = Limits {
            max_step_tokens: self
                .max_step_tokens
                .or(file.max_step_tokens)
                .unwrap_or(512)
                .max(1),
            max_running: self.max_running.or(file.max_running).unwrap_or(64).max(1),
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir.map(rel))
            .unwrap_or_else(default_data_dir);
        let admin_token = self
            .admin_token
            .or(file.admin_token)
            .or_else(|| std::env::var("EDGELORA_ADMIN_TOKEN").ok())
            .filter(|k| !k.is_empty());
        if admin_token.is_some() && admin_token == api_key {
            bail!("the admin token must differ from the API key");
        }
        let relaxed = match self.durability.or(file.durability).as_deref() {
            None | Some("strict") => false,
            Some("relaxed") => true,
            Some(o) => bail!("durability {o:?}: use \"strict\" or \"relaxed\""),
        };
        let mut sync_section = file.sync;
        if let Some(sec) = sync_section.as_mut() {
            sec.bundle = sec.bundle.take().map(rel);
        }
        let sync = crate::sync::SyncSettings::resolve(sync_section, self.sync_bundle, &data_dir)?;
        let explicit_id = self.device_id.or(file.device_id);
        if let (Some(s), Some(id)) = (&sync, &explicit_id)
            && &s.bundle.device_id != id
        {
            bail!(
                "device id {id:?} differs from the bundle's {:?} ({}): the ledger must be signed \
                 as the device the fleet enrolled",
                s.bundle.device_id,
                s.bundle.dir.display()
            );
        }
        let ledger_key = sync
            .as_ref()
            .and_then(|s| s.bundle.ledger_key_path())
            .unwrap_or_else(|| data_dir.join("ledger").join("ledger.key"));
        let device_id = explicit_id
            .or_else(|| sync.as_ref().map(|s| s.bundle.device_id.clone()))
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "edgelora".into());
        Ok(ServeConfig {
            base_contributor: self
                .base_contributor
                .or(file.base_contributor)
                .unwrap_or_else(|| "unattributed".into()),
            relaxed,
            device_id,
            m,
            adapters_dir: self
                .adapters_dir
                .or(file.adapters_dir.map(rel))
                .unwrap_or_else(|| data_dir.join("adapters")),
            data_dir,
            pool_adapters: self.pool_adapters.or(file.pool_adapters).unwrap_or(0),
            admin_token,
            listen,
            kv_tokens: self.kv_tokens.or(file.kv_tokens).unwrap_or(16384).max(1),
            limits,
            api_key,
            insecure_no_auth,
            max_body_bytes: self
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(1 << 20),
            grace: Duration::from_secs(
                self.shutdown_grace_secs
                    .or(file.shutdown_grace_secs)
                    .unwrap_or(30),
            ),
            watchdog: self.watchdog.or(file.watchdog.map(rel)),
            mdns: self.mdns || file.mdns.unwrap_or(false),
            sync,
            ledger_key,
        })
    }
}

/// What the handlers need once the engine is up.
pub struct Ready {
    pub model: Arc<Model>,
    /// Served name of the base model.
    pub base_id: String,
    /// Every registered adapter pack (headers only; payloads are read on demand).
    pub registry: Arc<RwLock<Registry>>,
    /// What the pool holds now, by adapter id (published by the engine).
    pub residency: Arc<Mutex<HashMap<String, ResidentState>>>,
    /// Requests in flight per adapter (an adapter in use cannot be deleted).
    pub in_use: admin::InUseMap,
    /// Registered prompt templates (`<data dir>/prompts`).
    pub prompts: Arc<RwLock<crate::attribution::PromptStore>>,
    /// The attribution ledger (`<data dir>/ledger`).
    pub ledger: Option<edgelora_ledger::LedgerHandle>,
    /// Who is credited for the base model.
    pub base_contributor: String,
    /// Longest prompt + completion a request may ask for.
    pub context: usize,
    pub tx: std::sync::mpsc::Sender<EngineMsg>,
    /// The reader that streams adapter packs, and why.
    pub storage: String,
    /// The compute device ("cpu", "cuda:0 (NVIDIA …, sm_90)") and why it was chosen.
    pub device: String,
    pub device_why: String,
}

/// The engine's counters as of its last step (what `/health` reports).
#[derive(Clone, Debug, Default)]
pub struct EngineStatus {
    pub running: usize,
    pub waiting: usize,
    pub stats: SchedStats,
}

pub struct AppState {
    pub ready: OnceLock<Ready>,
    pub status: Mutex<EngineStatus>,
    /// What `GET /metrics` encodes: the engine's metrics and the board's GPU telemetry.
    pub registry: prometheus_client::registry::Registry,
    pub metrics: crate::engine::metrics::EngineMetrics,
    pub api_key: Option<String>,
    pub admin_token: Option<String>,
    pub max_body_bytes: usize,
    pub created: u64,
    /// Beaten by the engine loop; the watchdog guards pet only while it beats.
    pub heartbeat: Heartbeat,
    pub watchdog: Mutex<Option<WatchdogGuard>>,
    /// systemd's `$NOTIFY_SOCKET`, when run by a `Type=notify` unit.
    pub systemd: Option<SystemdNotifier>,
    /// The guard sending systemd `WATCHDOG=1`, when the unit has `WatchdogSec=`.
    pub systemd_watchdog: Mutex<Option<WatchdogGuard>>,
    /// The ledger's sync to the fleet, once started.
    pub sync: Mutex<Option<crate::sync::Sync>>,
}

impl AppState {
    /// Disarms the hardware watchdog (magic close) and stops petting systemd's on a clean stop.
    pub fn disarm_watchdog(&self) {
        if let Some(g) = self.watchdog.lock().ok().and_then(|mut g| g.take()) {
            match g.shutdown() {
                Ok(()) => eprintln!("edgelorad: watchdog disarmed"),
                Err(e) => eprintln!("edgelorad: disarming the watchdog: {e}"),
            }
        }
        if let Some(g) = self.systemd_watchdog.lock().ok().and_then(|mut g| g.take()) {
            match g.shutdown() {
                Ok(()) => eprintln!("edgelorad: systemd watchdog no longer petted"),
                Err(e) => eprintln!("edgelorad: stopping systemd's watchdog: {e}"),
            }
        }
    }

    /// Tells systemd (when it runs us) `STATUS=<status>`; a failure is logged, never fatal.
    pub fn sd_status(&self, status: &str) {
        self.sd_notify(|n| n.status(status));
    }

    fn sd_notify(&self, f: impl FnOnce(&SystemdNotifier) -> Result<(), edgelora_hal::HalError>) {
        if let Some(n) = &self.systemd
            && let Err(e) = f(n)
        {
            eprintln!("edgelorad: notifying systemd: {e}");
        }
    }
}

/// systemd's notification socket and watchdog interval, when run by a `Type=notify` unit
/// (`$NOTIFY_SOCKET`, `$WATCHDOG_USEC`/`$WATCHDOG_PID`); neither when not. Nonsense in them is
/// logged and ignored.
fn systemd_from_env() -> (Option<SystemdNotifier>, Option<Duration>) {
    let notifier = SystemdNotifier::from_env().unwrap_or_else(|e| {
        eprintln!("edgelorad: ignoring $NOTIFY_SOCKET: {e}");
        None
    });
    let interval = edgelora_hal::board::watchdog_interval_from_env().unwrap_or_else(|e| {
        eprintln!("edgelorad: ignoring systemd's watchdog: {e}");
        None
    });
    match (&notifier, interval) {
        (Some(n), _) => eprintln!(
            "edgelorad: systemd: notifying {} (READY=1 once the model is loaded); {}",
            n.socket_name().display(),
            match interval {
                Some(i) => format!(
                    "its watchdog ({i:?}) petted every {:?} while the engine's step loop is alive",
                    edgelora_hal::board::guard_config_for(i).pet_every
                ),
                None => "no watchdog (WatchdogSec= unset)".to_owned(),
            }
        ),
        (None, Some(_)) => {
            eprintln!(
                "edgelorad: $WATCHDOG_USEC without $NOTIFY_SOCKET: systemd's watchdog ignored"
            );
        }
        (None, None) => {}
    }
    let interval = interval.filter(|_| notifier.is_some());
    (notifier, interval)
}

/// Opens (or creates) the attribution ledger and its signing key; recovery is reported loudly.
fn open_ledger(
    dir: &Path,
    key_path: &Path,
    device_id: &str,
    relaxed: bool,
) -> Result<edgelora_ledger::LedgerHandle> {
    use edgelora_ledger::{Durability, LedgerConfig, LedgerKey};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = LedgerKey::load_or_create(key_path, device_id)
        .with_context(|| format!("the ledger key {}", key_path.display()))?;
    let mut cfg = LedgerConfig::new(device_id, key);
    if relaxed {
        cfg.durability = Durability::Relaxed {
            interval: Duration::from_secs(1),
        };
    }
    let (handle, report) = edgelora_ledger::Ledger::open(dir, cfg)
        .with_context(|| format!("opening the attribution ledger in {}", dir.display()))?;
    eprintln!(
        "edgelorad: attribution ledger {} ({}): {} events, next seq {}",
        dir.display(),
        if relaxed {
            "relaxed fsync"
        } else {
            "strict: answers wait for fsync"
        },
        report.events,
        report.next_seq,
    );
    if report.truncated_bytes > 0 {
        eprintln!(
            "edgelorad: ledger: cut a torn tail of {} bytes (unacknowledged writes)",
            report.truncated_bytes
        );
    }
    for d in &report.damage {
        eprintln!("edgelorad: LEDGER DAMAGE: {d}");
    }
    Ok(handle)
}

/// What the handlers send the engine thread.
pub enum EngineMsg {
    Gen(GenRequest),
    /// An adapter was removed or replaced: drop its idle copies from the pool.
    Forget(String),
}

/// Opens the adapter registry, and points at PEFT folders left in it (they are served only
/// once imported into packs).
fn open_registry(dir: &Path, model: &Model, base_id: &str) -> Result<Registry> {
    let reg = Registry::open(dir, fingerprint(&model.config))
        .with_context(|| format!("opening the adapters directory {}", dir.display()))?;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.join("adapter_config.json").exists() {
                eprintln!(
                    "edgelorad: {} is a PEFT folder, not a pack; serve it with \
                     `edgelorad adapters import {} --id <id> --contributor <name> --adapters {}`",
                    p.display(),
                    p.display(),
                    dir.display()
                );
            }
        }
    }
    if reg.get(base_id).is_some() {
        eprintln!("edgelorad: adapter id {base_id:?} equals the base model's id; the base wins");
    }
    Ok(reg)
}

/// The engine thread: loads the model, publishes [`Ready`], then steps while there is work and
/// blocks on the request channel when idle.
fn engine_thread(cfg: EngineCfg, state: Arc<AppState>) -> Result<()> {
    let EngineCfg {
        m: cfg_m,
        adapters_dir,
        data_dir,
        ledger_key,
        device_id,
        relaxed,
        base_contributor,
        pool_adapters,
        kv_tokens,
        limits,
        watchdog,
        systemd_watchdog,
    } = cfg;
    let loaded = cfg_m.load()?;
    let model = Arc::new(loaded.model);
    let base_id = model.name.clone();
    state.sd_status(&format!(
        "{base_id} loaded; opening the adapters and the ledger"
    ));
    let registry = open_registry(&adapters_dir, &model, &base_id)?;
    let ledger = open_ledger(&data_dir.join("ledger"), &ledger_key, &device_id, relaxed)?;
    let prompts_dir = data_dir.join("prompts");
    let prompts = crate::attribution::PromptStore::open(&prompts_dir)
        .with_context(|| format!("opening the prompt templates in {}", prompts_dir.display()))?;
    let (backend, device_why) = cfg_m.backend_why(&model, kv_tokens)?;
    let capacity = backend.free_pages().saturating_sub(1) * backend.page_size();
    let context = model.config.max_position_embeddings.min(capacity.max(1));
    let opts: ForwardOptions = loaded.opts;
    let device = backend.describe();
    let mut sched = Scheduler::new(model.clone(), backend, opts, limits);
    sched.metrics = Some(state.metrics.clone());
    sched.set_residency(ResidencyConfig {
        max_adapters: pool_adapters,
        adapter_bits: cfg_m.adapter_bits,
        ..ResidencyConfig::default()
    });
    sched.update_gauges();
    let residency = sched.residency().expect("just set");
    let residency_view = residency.view();
    let storage = residency.storage().1.to_string();
    let (tx, rx) = std::sync::mpsc::channel::<EngineMsg>();
    let unavailable = registry
        .ids()
        .filter(|id| {
            registry.get(id).is_some_and(|e| {
                !matches!(e.state, crate::adapters::registry::EntryState::Available)
            })
        })
        .count();
    eprintln!(
        "edgelorad: {} loaded on {device}; {} adapter pack(s) in {}{}; adapters stream with {storage}; context {context} tokens",
        base_id,
        registry.len(),
        adapters_dir.display(),
        if unavailable > 0 {
            format!(" ({unavailable} refused: GET /v1/adapters says why)")
        } else {
            String::new()
        },
    );
    let _ = state.ready.set(Ready {
        model,
        base_id,
        registry: Arc::new(RwLock::new(registry)),
        prompts: Arc::new(RwLock::new(prompts)),
        ledger: Some(ledger),
        base_contributor,
        residency: residency_view,
        in_use: Arc::default(),
        context,
        tx,
        storage,
        device,
        device_why,
    });
    // Armed only now: loading a model may take longer than any step.
    if let Some(path) = watchdog {
        state.heartbeat.beat();
        let guard = WatchdogGuard::start(
            Box::new(LinuxWatchdog::new(&path)),
            state.heartbeat.clone(),
            GuardConfig::default(),
        )
        .with_context(|| format!("arming the watchdog {}", path.display()))?;
        eprintln!("edgelorad: watchdog {} armed", path.display());
        if let Ok(mut g) = state.watchdog.lock() {
            *g = Some(guard);
        }
    }
    // systemd watches from READY=1 (sent once `ready` is set), with the unit's interval; on the
    // same heartbeat as the hardware watchdog when both are configured.
    if let (Some(interval), Some(notifier)) = (systemd_watchdog, &state.systemd) {
        state.heartbeat.beat();
        let wd = SystemdWatchdog::new(notifier.clone(), interval);
        let config = wd.guard_config();
        let guard = WatchdogGuard::start(Box::new(wd), state.heartbeat.clone(), config)
            .context("arming systemd's watchdog")?;
        eprintln!(
            "edgelorad: systemd watchdog armed: WATCHDOG=1 every {:?} (WatchdogSec {interval:?}) while the engine beats{}",
            config.pet_every,
            if state.watchdog.lock().is_ok_and(|g| g.is_some()) {
                "; the hardware watchdog too"
            } else {
                ""
            }
        );
        if let Ok(mut g) = state.systemd_watchdog.lock() {
            *g = Some(guard);
        }
    }
    loop {
        state.heartbeat.beat();
        if sched.is_idle() {
            // Wake every second while idle so the heartbeat goes on.
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => on_msg(&mut sched, m),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
        while let Ok(m) = rx.try_recv() {
            on_msg(&mut sched, m);
        }
        match sched.step() {
            Ok(true) => {}
            // Queued requests wait for adapter loads: sleep until one lands (briefly, so new
            // requests are taken too).
            Ok(false) => sched.wait_for_loads(Duration::from_millis(2)),
            Err(e) => tracing::error!("engine step failed: {e}"),
        }
        if let Ok(mut st) = state.status.lock() {
            *st = EngineStatus {
                running: sched.running(),
                waiting: sched.waiting(),
                stats: sched.stats.clone(),
            };
        }
    }
}

fn on_msg(sched: &mut Scheduler<dyn crate::engine::Backend>, m: EngineMsg) {
    match m {
        EngineMsg::Gen(r) => sched.submit(r),
        EngineMsg::Forget(id) => sched.forget_adapter(&id),
    }
}

struct EngineCfg {
    m: ModelArgs,
    adapters_dir: PathBuf,
    data_dir: PathBuf,
    ledger_key: PathBuf,
    device_id: String,
    relaxed: bool,
    base_contributor: String,
    pool_adapters: usize,
    kv_tokens: usize,
    limits: Limits,
    watchdog: Option<PathBuf>,
    /// systemd's watchdog interval (only with a notification socket).
    systemd_watchdog: Option<Duration>,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let cfg = args.resolve()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve_async(cfg))
}

async fn serve_async(cfg: ServeConfig) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let (systemd, systemd_watchdog) = systemd_from_env();
    let metrics = crate::engine::metrics::EngineMetrics::default();
    let mut registry = prometheus_client::registry::Registry::with_prefix("edgelora");
    metrics.register(&mut registry);
    // GPU telemetry (NVML, or a Jetson's sysfs files) when the board has any.
    if let Some(t) = edgelora_hal::telemetry::auto_detect(Path::new("/")) {
        eprintln!("edgelorad: GPU telemetry from {}", t.name());
        edgelora_hal::telemetry::metrics::register(&mut registry, Arc::from(t));
    }
    let state = Arc::new(AppState {
        ready: OnceLock::new(),
        status: Mutex::new(EngineStatus::default()),
        registry,
        metrics,
        api_key: cfg.api_key.clone(),
        admin_token: cfg.admin_token.clone(),
        max_body_bytes: cfg.max_body_bytes,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        heartbeat: Heartbeat::new(Arc::new(MonotonicClock::new())),
        watchdog: Mutex::new(None),
        systemd,
        systemd_watchdog: Mutex::new(None),
        sync: Mutex::new(None),
    });
    state.sd_status("loading the model");
    eprintln!(
        "edgelorad: listening on http://{addr} (loading the model; /health answers 503 until ready)"
    );
    if cfg.insecure_no_auth && cfg.api_key.is_none() && !addr.ip().is_loopback() {
        eprintln!("edgelorad: WARNING: serving {addr} without authentication (--insecure-no-auth)");
    }
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    {
        let state = state.clone();
        let ecfg = EngineCfg {
            m: cfg.m.clone(),
            adapters_dir: cfg.adapters_dir.clone(),
            data_dir: cfg.data_dir.clone(),
            ledger_key: cfg.ledger_key.clone(),
            device_id: cfg.device_id.clone(),
            relaxed: cfg.relaxed,
            base_contributor: cfg.base_contributor.clone(),
            pool_adapters: cfg.pool_adapters,
            kv_tokens: cfg.kv_tokens,
            limits: cfg.limits.clone(),
            watchdog: cfg.watchdog.clone(),
            systemd_watchdog,
        };
        std::thread::Builder::new()
            .name("edgelora-engine".into())
            .spawn(move || {
                let mut ready_tx = Some(ready_tx);
                let r = engine_thread(ecfg, state.clone());
                if let Err(e) = r {
                    if state.ready.get().is_none()
                        && let Some(tx) = ready_tx.take()
                    {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    eprintln!("edgelorad: engine stopped: {e:#}");
                    state.sd_status(&format!("engine stopped: {e:#}"));
                    std::process::exit(1);
                }
            })?;
    }
    let app = handlers::router(state.clone());
    let curl_key = match &cfg.api_key {
        Some(_) => " -H \"Authorization: Bearer $EDGELORA_API_KEY\"",
        None => "",
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal(cfg.grace, state.clone()));
    let server = tokio::spawn(async move { server.await });
    // Announce readiness (or fail) once the engine has loaded.
    let mdns = cfg.mdns;
    let mut sync_settings = cfg.sync.clone();
    let mut advert: Option<mdns::Advert> = None;
    let announce = {
        let state = state.clone();
        let advert = &mut advert;
        async move {
            loop {
                if let Some(r) = state.ready.get() {
                    if let (Some(settings), Some(ledger)) = (sync_settings.take(), &r.ledger) {
                        match crate::sync::Sync::start(settings, ledger.clone()) {
                            Ok(s) => {
                                if let Ok(mut g) = state.sync.lock() {
                                    *g = Some(s);
                                }
                            }
                            Err(e) => eprintln!("edgelorad: ledger sync NOT started: {e:#}"),
                        }
                    }
                    if mdns {
                        match mdns::advertise(
                            addr.port(),
                            &r.base_id,
                            r.registry.read().map_or(0, |g| g.len()),
                            state.api_key.is_some(),
                        ) {
                            Ok(a) => {
                                eprintln!("edgelorad: advertised on the LAN as {}", a.fullname());
                                *advert = Some(a);
                            }
                            Err(e) => eprintln!("edgelorad: mDNS advertisement failed: {e:#}"),
                        }
                    }
                    // /health answers 200 from now on: tell systemd start-up is over.
                    state.sd_notify(|n| {
                        n.ready(&format!(
                            "serving {} on {} at http://{addr}",
                            r.base_id, r.device
                        ))
                    });
                    eprintln!(
                        "edgelorad: ready; try:\n  curl -s http://{addr}/v1/completions{curl_key} \
                         -H 'Content-Type: application/json' -d '{{\"model\": \"{}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
                        r.base_id
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    tokio::select! {
        r = ready_rx => {
            if let Ok(Err(e)) = r {
                state.sd_status(&format!("failed: {e:#}"));
                return Err(e);
            }
        }
        () = announce => {}
    }
    server.await??;
    drop(advert);
    let sync = state.sync.lock().ok().and_then(|mut g| g.take());
    if let Some(s) = sync {
        s.shutdown().await;
    }
    // A final signed checkpoint over everything answered.
    if let Some(l) = state.ready.get().and_then(|r| r.ledger.as_ref()) {
        match l.close() {
            Ok(_) => eprintln!("edgelorad: attribution ledger closed"),
            Err(e) => eprintln!("edgelorad: closing the attribution ledger: {e}"),
        }
    }
    state.disarm_watchdog();
    eprintln!("edgelorad: stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C; past the grace period the process exits even with requests
/// still running.
async fn shutdown_signal(grace: Duration, state: Arc<AppState>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    eprintln!(
        "edgelorad: shutting down: no new requests; finishing running ones for up to {}s",
        grace.as_secs()
    );
    state.sd_notify(|n| {
        n.stopping(&format!(
            "shutting down: finishing running requests for up to {}s",
            grace.as_secs()
        ))
    });
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        eprintln!("edgelorad: grace period over; cancelling what still runs and exiting");
        // Unanswered requests were never acknowledged; what was answered is already durable.
        // Seal it with a final signed checkpoint.
        if let Some(l) = state.ready.get().and_then(|r| r.ledger.as_ref())
            && let Err(e) = l.close()
        {
            eprintln!("edgelorad: closing the attribution ledger: {e}");
        }
        state.disarm_watchdog();
        std::process::exit(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> ServeArgs {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: ServeArgs,
        }
        let mut v = vec!["serve"];
        v.extend(flags);
        <P as clap::Parser>::parse_from(v).a
    }

    #[test]
    fn flags_override_the_config_file_which_overrides_the_defaults() {
        let dir = std::env::temp_dir().join(format!("edgelora-serve-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("serve.toml");
        std::fs::write(
            &f,
            "model = \"m\"\nlisten = \"127.0.0.1:9000\"\nmax_running = 3\nkv = \"f16\"\napi_key = \"k\"\n",
        )
        .unwrap();
        let c = args(&["--config", f.to_str().unwrap(), "--max-running", "5"])
            .resolve()
            .unwrap();
        assert_eq!(c.m.model.as_deref(), Some(dir.join("m").as_path()));
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.max_running, 5);
        assert_eq!(c.limits.max_step_tokens, 512);
        assert_eq!(c.m.kv, KvDtype::F16);
        assert_eq!(c.api_key.as_deref(), Some("k"));
        assert_eq!(
            c.m.adapter_bits,
            AdapterBits::Int8,
            "int8 adapters by default"
        );
        // Int4 adapters from the file, the flag over the file, a bad value named.
        std::fs::write(&f, "adapter_bits = 4\n").unwrap();
        let cfg = || args(&["--config", f.to_str().unwrap()]);
        assert_eq!(cfg().resolve().unwrap().m.adapter_bits, AdapterBits::Int4);
        let c = args(&["--config", f.to_str().unwrap(), "--adapter-bits", "8"])
            .resolve()
            .unwrap();
        assert_eq!(c.m.adapter_bits, AdapterBits::Int8);
        std::fs::write(&f, "adapter_bits = 5\n").unwrap();
        let e = format!("{:#}", cfg().resolve().unwrap_err());
        assert!(e.contains("adapter_bits") && e.contains("8 or 4"), "{e}");
        std::fs::write(&f, "bogus_key = 1\n").unwrap();
        assert!(args(&["--config", f.to_str().unwrap()]).resolve().is_err());
        let d = args(&[]).resolve().unwrap();
        assert_eq!(d.listen.to_string(), "127.0.0.1:8080");
        assert!(
            args(&["--listen", "0.0.0.0:8080", "--api-key", "x"])
                .resolve()
                .is_ok()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
