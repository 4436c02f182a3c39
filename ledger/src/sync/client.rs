//! The device side of sync: a background task that ships the log to the collector.
//!
//! It connects (mTLS, TLS 1.3), learns from `Welcome` where the collector is, and uploads
//! batches of events from there, each with a checkpoint covering it and the consistency proofs
//! the collector checks. Any failure — refused connection, cut, stall, collector restart —
//! ends the session; the task reconnects after an exponential backoff with full jitter, capped,
//! and resumes from the collector's acknowledgement. Nothing is ever deleted from the log: the
//! unsynced backlog is simply the events after the acknowledgement, and it is measured
//! (events, bytes) so the daemon can raise an alarm or refuse work before a disk fills.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::LedgerError;
use crate::handle::LedgerHandle;

use super::proto::{
    self, ClientMsg, Hello, MAGIC, RefuseCode, ServerMsg, Upload, VERSION, Welcome, frame,
};

/// Where the collector says it is for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub next_seq: u64,
    pub epoch: u32,
    pub checkpoint_size: u64,
}

impl From<&Welcome> for Position {
    fn from(w: &Welcome) -> Self {
        Position {
            next_seq: w.next_seq,
            epoch: w.epoch,
            checkpoint_size: w.checkpoint_size,
        }
    }
}

/// Builds the next upload after `pos` (at most `max_events` events), signing a checkpoint if
/// the latest one does not cover any unsent event. `None` when there is nothing to send.
///
/// Events of an older epoch than the device's current one are not sent: the upload starts the
/// current epoch and the collector records what it never received as a gap.
pub fn build_upload(
    ledger: &LedgerHandle,
    pos: Position,
    max_events: usize,
) -> Result<Option<Upload>, LedgerError> {
    let (epoch, efs) = ledger.epoch();
    if pos.epoch > epoch {
        return Err(LedgerError::BadProofRequest(format!(
            "the collector is at epoch {} but this log is at epoch {epoch}: the log was replaced",
            pos.epoch
        )));
    }
    let from = pos.next_seq.max(efs);
    if from >= ledger.next_seq() {
        return Ok(None);
    }
    let covered_end = |cp: &crate::Checkpoint| {
        (cp.epoch() == epoch && cp.first_seq == efs).then_some(efs + cp.tree_size)
    };
    let mut cp = ledger.latest_checkpoint();
    if cp
        .as_ref()
        .and_then(covered_end)
        .is_none_or(|end| end <= from)
    {
        cp = Some(ledger.checkpoint_now()?);
    }
    let cp = cp.expect("set above");
    let Some(end) = covered_end(&cp).filter(|&end| end > from) else {
        return Ok(None);
    };
    let end = end.min(from + max_events.clamp(1, proto::MAX_BATCH_EVENTS) as u64);
    let events = ledger.events(from, (end - from) as usize)?;
    if events.len() as u64 != end - from || events.first().map(|e| e.seq) != Some(from) {
        return Err(LedgerError::BadProofRequest(format!(
            "events {from}..{end} are not all readable from the log (damaged?)"
        )));
    }
    let batch_proof = ledger.consistency_proof(end - efs, cp.tree_size)?.path;
    let prev_proof =
        if pos.epoch == epoch && pos.checkpoint_size > 0 && pos.checkpoint_size < cp.tree_size {
            ledger
                .consistency_proof(pos.checkpoint_size, cp.tree_size)?
                .path
        } else {
            Vec::new()
        };
    Ok(Some(Upload {
        epoch,
        epoch_first_seq: efs,
        first_seq: from,
        events,
        checkpoint: cp.note().to_string(),
        batch_proof,
        prev_proof,
    }))
}

/// How the sync task runs.
#[derive(Clone)]
pub struct SyncOptions {
    pub device_id: String,
    /// Collector addresses (`host:port`), tried in turn.
    pub collectors: Vec<String>,
    /// The name the collector's certificate must carry.
    pub server_name: String,
    pub tls: Arc<ClientConfig>,
    /// Events per upload.
    pub batch_events: usize,
    /// How often to look for new events once caught up.
    pub poll_interval: Duration,
    /// Backoff after a failure: from `backoff_min`, doubling, capped at `backoff_max`; each
    /// wait is drawn uniformly from [0, current] (full jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Limit for connecting + handshaking, and for each reply.
    pub timeout: Duration,
    /// A session with nothing to send for this long is closed (cleanly); the next one starts
    /// when the log has grown past the acknowledgement. Keep it below the collector's idle
    /// timeout (300 s).
    pub idle_close: Duration,
    /// The unsynced backlog that raises the alarm (bytes of log); `None`: no limit.
    pub max_backlog_bytes: Option<u64>,
    /// Free text sent in `Hello`.
    pub agent: String,
}

impl SyncOptions {
    pub fn new(
        device_id: impl Into<String>,
        collectors: Vec<String>,
        server_name: impl Into<String>,
        tls: Arc<ClientConfig>,
    ) -> Self {
        SyncOptions {
            device_id: device_id.into(),
            collectors,
            server_name: server_name.into(),
            tls,
            batch_events: 4096,
            poll_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(60),
            timeout: Duration::from_secs(30),
            idle_close: Duration::from_secs(60),
            max_backlog_bytes: None,
            agent: format!("edgelora-ledger {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// What the sync task has done; see `SyncClient::status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// The collector's acknowledgement as last heard (persisted across restarts).
    pub acked: Option<Position>,
    /// Unix ms of the last acknowledged upload (or of a Welcome showing nothing to send).
    pub last_success_ms: Option<u64>,
    pub connected: bool,
    pub last_error: Option<String>,
    /// A refusal the collector gave (cleared by the next success).
    pub refused: Option<(RefuseCode, String)>,
    pub sessions: u64,
    pub failures: u64,
    pub uploads: u64,
    pub events_sent: u64,
    pub bytes_sent: u64,
    /// Events after the acknowledgement (all of the log if never acknowledged).
    pub backlog_events: u64,
    /// Bytes of log those events take.
    pub backlog_bytes: u64,
    /// The backlog is over `max_backlog_bytes`.
    pub alarm: bool,
}

struct Shared {
    status: Mutex<SyncStatus>,
    ledger: LedgerHandle,
    max_backlog_bytes: Option<u64>,
    state_file: PathBuf,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut SyncStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn snapshot(&self) -> SyncStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let from = s.acked.map_or(0, |p| p.next_seq);
        s.backlog_events = self.ledger.next_seq().saturating_sub(from);
        s.backlog_bytes = if s.backlog_events == 0 {
            0
        } else {
            self.ledger.bytes_since(from)
        };
        s.alarm = self
            .max_backlog_bytes
            .is_some_and(|cap| s.backlog_bytes > cap);
        s
    }

    fn acked(&self, pos: Position) {
        let now = now_ms();
        self.update(|s| {
            s.acked = Some(pos);
            s.last_success_ms = Some(now);
            s.refused = None;
            s.last_error = None;
        });
        // Informational (the collector's Welcome is the truth): no fsync.
        let tmp = self.state_file.with_extension("tmp");
        let text = format!("{} {} {}\n", pos.next_seq, pos.epoch, pos.checkpoint_size);
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &self.state_file))
        {
            tracing::warn!(path = %self.state_file.display(), "saving the sync position: {e}");
        }
    }
}

fn load_position(path: &std::path::Path) -> Option<Position> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    Some(Position {
        next_seq: it.next()??,
        epoch: u32::try_from(it.next()??).ok()?,
        checkpoint_size: it.next()??,
    })
}

/// The running sync task. Dropping it stops the task.
pub struct SyncClient {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// File in the ledger directory holding the last acknowledged position.
pub const SYNC_STATE_FILE: &str = "sync.acked";

impl SyncClient {
    /// Starts the task on the current tokio runtime.
    pub fn spawn(ledger: LedgerHandle, opts: SyncOptions) -> SyncClient {
        let state_file = ledger.dir().join(SYNC_STATE_FILE);
        let shared = Arc::new(Shared {
            status: Mutex::new(SyncStatus {
                acked: load_position(&state_file),
                ..Default::default()
            }),
            ledger,
            max_backlog_bytes: opts.max_backlog_bytes,
            state_file,
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(shared.clone(), opts, stop_rx));
        SyncClient {
            shared,
            stop,
            task: Some(task),
        }
    }

    /// The task's status with the backlog measured now.
    pub fn status(&self) -> SyncStatus {
        self.shared.snapshot()
    }

    /// Stops the task (an upload in flight is abandoned; the collector's acknowledgement
    /// decides where the next run resumes).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SyncClient {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    Stopped,
    /// Caught up and idle: closed cleanly.
    Idle,
    Failed(String),
    Refused(RefuseCode, String),
}

async fn run(shared: Arc<Shared>, opts: SyncOptions, mut stop: watch::Receiver<bool>) {
    let mut rng = Jitter::seeded();
    let mut backoff = opts.backoff_min;
    let mut next_collector = 0usize;
    loop {
        if *stop.borrow() {
            return;
        }
        // Caught up (as far as the last acknowledgement tells): no connection until the log
        // grows.
        let acked = shared.status.lock().map(|s| s.acked).unwrap_or(None);
        if acked.is_some_and(|p| p.next_seq >= shared.ledger.next_seq()) {
            tokio::select! {
                _ = tokio::time::sleep(opts.poll_interval) => continue,
                _ = stop.changed() => return,
            }
        }
        let addr = opts.collectors[next_collector % opts.collectors.len().max(1)].clone();
        shared.update(|s| s.sessions += 1);
        let mut progressed = false;
        let end = session(&shared, &opts, &addr, &mut stop, &mut progressed).await;
        shared.update(|s| s.connected = false);
        let wait = match end {
            SessionEnd::Stopped => return,
            SessionEnd::Idle => {
                backoff = opts.backoff_min;
                continue;
            }
            SessionEnd::Failed(e) => {
                tracing::warn!(collector = %addr, "sync: {e}");
                shared.update(|s| {
                    s.failures += 1;
                    s.last_error = Some(e);
                });
                next_collector += 1;
                if progressed {
                    backoff = opts.backoff_min;
                }
                backoff
            }
            SessionEnd::Refused(code, msg) => {
                tracing::error!(collector = %addr, ?code, "sync refused: {msg}");
                shared.update(|s| {
                    s.failures += 1;
                    s.last_error = Some(format!("refused ({code:?}): {msg}"));
                    s.refused = Some((code, msg));
                });
                // A final refusal will not change soon; retry rarely, in case an operator
                // fixes the cause.
                if code.retryable() {
                    backoff
                } else {
                    opts.backoff_max
                }
            }
        };
        let sleep = rng.below(wait);
        backoff = (backoff * 2).min(opts.backoff_max);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = stop.changed() => return,
        }
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn session(
    shared: &Shared,
    opts: &SyncOptions,
    addr: &str,
    stop: &mut watch::Receiver<bool>,
    progressed: &mut bool,
) -> SessionEnd {
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(opts.server_name.clone())
            .map_err(|e| format!("server name {:?}: {e}", opts.server_name))?;
        tokio_rustls::TlsConnector::from(opts.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))
    };
    let mut tls: Tls = tokio::select! {
        r = tokio::time::timeout(opts.timeout, connect) => match r {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return SessionEnd::Failed(e),
            Err(_) => return SessionEnd::Failed(format!("connecting to {addr}: timed out")),
        },
        _ = stop.changed() => return SessionEnd::Stopped,
    };
    let hello = ClientMsg::Hello(Hello {
        magic: MAGIC,
        version: VERSION,
        device_id: opts.device_id.clone(),
        agent: opts.agent.clone(),
    });
    let mut pos = match exchange(&mut tls, &hello, opts.timeout, stop).await {
        Ok((ServerMsg::Welcome(w), _)) if w.version == VERSION => Position::from(&w),
        Ok((ServerMsg::Welcome(w), _)) => {
            return SessionEnd::Failed(format!("collector speaks version {}", w.version));
        }
        Ok((ServerMsg::Refused(r), _)) => return SessionEnd::Refused(r.code, r.message),
        Ok((other, _)) => return SessionEnd::Failed(format!("expected Welcome, got {other:?}")),
        Err(end) => return end,
    };
    shared.update(|s| s.connected = true);
    shared.acked(pos);
    let mut idle_since = tokio::time::Instant::now();
    loop {
        let ledger = shared.ledger.clone();
        let batch = opts.batch_events;
        let built = tokio::task::spawn_blocking(move || build_upload(&ledger, pos, batch)).await;
        let upload = match built {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => return SessionEnd::Failed(format!("reading the log: {e}")),
            Err(e) => return SessionEnd::Failed(format!("reading the log: {e}")),
        };
        let Some(upload) = upload else {
            if idle_since.elapsed() >= opts.idle_close {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                return SessionEnd::Idle;
            }
            tokio::select! {
                _ = tokio::time::sleep(opts.poll_interval) => continue,
                _ = stop.changed() => return SessionEnd::Stopped,
            }
        };
        let n = upload.events.len() as u64;
        match exchange(&mut tls, &ClientMsg::Upload(upload), opts.timeout, stop).await {
            Ok((ServerMsg::Ack(a), sent)) => {
                *progressed = true;
                idle_since = tokio::time::Instant::now();
                pos = Position {
                    next_seq: a.next_seq,
                    epoch: a.epoch,
                    checkpoint_size: a.checkpoint_size,
                };
                shared.update(|s| {
                    s.uploads += 1;
                    s.events_sent += n;
                    s.bytes_sent += sent as u64;
                });
                shared.acked(pos);
            }
            Ok((ServerMsg::Refused(r), _)) => return SessionEnd::Refused(r.code, r.message),
            Ok((other, _)) => return SessionEnd::Failed(format!("expected Ack, got {other:?}")),
            Err(end) => return end,
        }
    }
}

/// Sends one message and reads the reply, within `timeout`; also returns the bytes sent.
async fn exchange(
    tls: &mut Tls,
    msg: &ClientMsg,
    timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Result<(ServerMsg, usize), SessionEnd> {
    let io = async {
        let sent = frame::write(tls, msg).await?;
        Ok::<_, frame::FrameError>((frame::read::<_, ServerMsg>(tls).await?.0, sent))
    };
    tokio::select! {
        r = tokio::time::timeout(timeout, io) => match r {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(SessionEnd::Failed(e.to_string())),
            Err(_) => Err(SessionEnd::Failed(format!("no reply within {timeout:?}"))),
        },
        _ = stop.changed() => Err(SessionEnd::Stopped),
    }
}

/// Full-jitter draws (xorshift64*; seeded from the OS so devices do not retry in lockstep).
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Jitter(u64::from_le_bytes(seed) | 1)
    }

    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let nanos = max.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { r % nanos })
    }
}
