//! The collector's network side: mTLS accept loop, the sync protocol per connection, and the
//! verify → commit → acknowledge step for each upload.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use edgelora_ledger::sync::check::{self, CheckError, LogState, Verified};
use edgelora_ledger::sync::proto::{
    Ack, ClientMsg, MAGIC, RefuseCode, Refused, ServerMsg, Upload, VERSION, Welcome, frame,
};
use edgelora_ledger::{Checkpoint, PublicKey, merkle::CompactRange};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::store::{Commit, CommitOutcome, DeviceLog, Gap, Store, StoredEvent};
use crate::fleet::Fleet;
use crate::tls::{ServerTls, peer_device_id};

/// How to run a collector.
#[derive(Debug, Clone)]
pub struct CollectorOptions {
    pub fleet_dir: PathBuf,
    /// `host:port` to listen on.
    pub listen: String,
    /// `None`: SQLite at `<fleet dir>/collector.db`; or a `postgres://` URL.
    pub db: Option<String>,
    /// How often the CRL (and certificates) are checked for changes.
    pub crl_poll: Duration,
    /// Limit for the TLS handshake and for the device's Hello.
    pub handshake_timeout: Duration,
    /// A connection with no message for this long is closed.
    pub idle_timeout: Duration,
}

impl CollectorOptions {
    pub fn new(fleet_dir: impl Into<PathBuf>, listen: impl Into<String>) -> Self {
        CollectorOptions {
            fleet_dir: fleet_dir.into(),
            listen: listen.into(),
            db: None,
            crl_poll: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// What the collector has done since it started.
#[derive(Debug, Default)]
pub struct CollectorStats {
    pub connections: AtomicU64,
    /// Connections whose TLS handshake failed (no or bad client certificate, revoked, ...).
    pub handshake_failures: AtomicU64,
    pub uploads: AtomicU64,
    pub events_stored: AtomicU64,
    /// Events received again that were already stored (resends after a lost Ack).
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    /// Devices flagged as suspect by this process.
    pub flagged: AtomicU64,
    /// Commits that lost a race with another upload for the same device (and were redone).
    pub conflicts: AtomicU64,
}

impl CollectorStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Ctx {
    fleet_dir: PathBuf,
    tls: Arc<ServerTls>,
    store: Arc<dyn Store>,
    stats: Arc<CollectorStats>,
    opts: CollectorOptions,
}

/// A running collector. Dropping it stops accepting (open connections end with the runtime).
pub struct Collector {
    addr: SocketAddr,
    stats: Arc<CollectorStats>,
    store: Arc<dyn Store>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Collector {
    /// Opens the store, loads the fleet's TLS material, binds and starts accepting.
    pub async fn start(opts: CollectorOptions) -> anyhow::Result<Collector> {
        let fleet_dir = opts.fleet_dir.clone();
        let db = opts.db.clone();
        let store = tokio::task::spawn_blocking(move || {
            super::report::open_store(&fleet_dir, db.as_deref())
        })
        .await??;
        Self::start_with_store(opts, store).await
    }

    /// As `start`, with a store opened by the caller (tests share one between collectors).
    pub async fn start_with_store(
        opts: CollectorOptions,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Collector> {
        // Fail early on an unreadable fleet.
        Fleet::open(&opts.fleet_dir)
            .with_context(|| format!("opening the fleet in {}", opts.fleet_dir.display()))?;
        let tls = ServerTls::load(&opts.fleet_dir)?;
        let listener = TcpListener::bind(&opts.listen)
            .await
            .with_context(|| format!("listening on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(CollectorStats::default());
        let ctx = Arc::new(Ctx {
            fleet_dir: opts.fleet_dir.clone(),
            tls: tls.clone(),
            store: store.clone(),
            stats: stats.clone(),
            opts: opts.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let watcher = tls.spawn_watcher(opts.crl_poll);
        let accept = tokio::spawn(accept_loop(listener, ctx, stop_rx));
        tracing::info!(%addr, store = %store.describe(), "collector listening");
        Ok(Collector {
            addr,
            stats,
            store,
            stop,
            tasks: vec![watcher, accept],
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &CollectorStats {
        &self.stats
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Stops accepting and closes every open connection (as a crash would, minus the
    /// process exit: nothing half-committed exists, since each commit is one transaction).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Runs a collector until SIGINT/SIGTERM (`edgelora-fleet collect`).
pub async fn serve(opts: CollectorOptions) -> anyhow::Result<()> {
    let c = Collector::start(opts).await?;
    eprintln!(
        "edgelora-fleet: collector on {} (store: {})",
        c.local_addr(),
        c.store.describe()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let s = c.stats();
    eprintln!(
        "edgelora-fleet: collector stopping: {} connections, {} uploads, {} events stored, {} duplicates, {} refused",
        CollectorStats::get(&s.connections),
        CollectorStats::get(&s.uploads),
        CollectorStats::get(&s.events_stored),
        CollectorStats::get(&s.duplicates),
        CollectorStats::get(&s.refused),
    );
    c.shutdown().await;
    Ok(())
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        // Reap finished connections.
        while conns.try_join_next().is_some() {}
        match accepted {
            Ok((tcp, peer)) => {
                bump(&ctx.stats.connections, 1);
                let ctx = ctx.clone();
                conns.spawn(async move { connection(tcp, peer, ctx).await });
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    conns.abort_all();
}

type Tls = tokio_rustls::server::TlsStream<TcpStream>;

async fn connection(tcp: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.tls.current());
    let mut tls: Tls =
        match tokio::time::timeout(ctx.opts.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                bump(&ctx.stats.handshake_failures, 1);
                tracing::warn!(%peer, "TLS handshake refused: {e}");
                return;
            }
            Err(_) => {
                bump(&ctx.stats.handshake_failures, 1);
                tracing::warn!(%peer, "TLS handshake timed out");
                return;
            }
        };
    let device = tls.get_ref().1.peer_certificates().and_then(peer_device_id);
    let Some(device) = device else {
        refuse(
            &mut tls,
            &ctx,
            RefuseCode::NotEnrolled,
            "no device id in the certificate",
        )
        .await;
        return;
    };
    if let Err(e) = session(&mut tls, &device, &ctx).await {
        tracing::info!(%peer, %device, "sync session ended: {e}");
    }
}

async fn refuse(tls: &mut Tls, ctx: &Ctx, code: RefuseCode, message: impl Into<String>) {
    let message = message.into();
    bump(&ctx.stats.refused, 1);
    tracing::warn!(?code, "refusing: {message}");
    let _ = frame::write(tls, &ServerMsg::Refused(Refused { code, message })).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(tls).await;
}

async fn session(tls: &mut Tls, device: &str, ctx: &Arc<Ctx>) -> anyhow::Result<()> {
    let hello = match tokio::time::timeout(ctx.opts.handshake_timeout, frame::read(tls)).await {
        Ok(Ok((ClientMsg::Hello(h), _))) => h,
        Ok(Ok(_)) => {
            refuse(tls, ctx, RefuseCode::Protocol, "expected Hello").await;
            return Ok(());
        }
        Ok(Err(e)) => anyhow::bail!("reading Hello: {e}"),
        Err(_) => anyhow::bail!("no Hello within {:?}", ctx.opts.handshake_timeout),
    };
    if hello.magic != MAGIC || hello.version != VERSION {
        let msg = format!(
            "this collector speaks sync version {VERSION}; the device sent version {}",
            hello.version
        );
        refuse(tls, ctx, RefuseCode::BadVersion, msg).await;
        return Ok(());
    }
    if hello.device_id != device {
        let msg = format!(
            "Hello names device {:?} but the certificate is {device:?}",
            hello.device_id
        );
        refuse(tls, ctx, RefuseCode::WrongDevice, msg).await;
        return Ok(());
    }
    let key = {
        let dir = ctx.fleet_dir.clone();
        let id = device.to_string();
        tokio::task::spawn_blocking(move || Fleet::open(&dir)?.ledger_key(&id)).await??
    };
    let Some(key) = key else {
        let msg = format!("device {device:?} is not enrolled in this fleet (or was revoked)");
        refuse(tls, ctx, RefuseCode::NotEnrolled, msg).await;
        return Ok(());
    };
    let state = blocking(ctx, {
        let id = device.to_string();
        move |s| s.device_log(&id)
    })
    .await?;
    if let Some(reason) = state.as_ref().and_then(|s| s.suspect.clone()) {
        let msg = format!("device {device:?} is flagged as suspect: {reason}");
        refuse(tls, ctx, RefuseCode::Suspect, msg).await;
        return Ok(());
    }
    let log = match state.as_ref().map(to_log_state).transpose() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => {
            refuse(
                tls,
                ctx,
                RefuseCode::Unavailable,
                format!("stored state: {e}"),
            )
            .await;
            return Ok(());
        }
    };
    let welcome = Welcome {
        version: VERSION,
        next_seq: log.next_seq,
        epoch: log.epoch,
        checkpoint_size: log.checkpoint.as_ref().map_or(0, |c| c.tree_size),
    };
    tracing::info!(device, agent = %hello.agent, next_seq = log.next_seq, "device connected");
    frame::write(tls, &ServerMsg::Welcome(welcome)).await?;

    let key = Arc::new(key);
    loop {
        let msg = match tokio::time::timeout(ctx.opts.idle_timeout, frame::read(tls)).await {
            Ok(Ok((ClientMsg::Upload(u), _))) => u,
            Ok(Ok(_)) => {
                refuse(tls, ctx, RefuseCode::Protocol, "expected Upload").await;
                return Ok(());
            }
            Ok(Err(frame::FrameError::Closed)) => return Ok(()),
            Ok(Err(e)) => anyhow::bail!("reading an upload: {e}"),
            Err(_) => anyhow::bail!("idle for {:?}", ctx.opts.idle_timeout),
        };
        bump(&ctx.stats.uploads, 1);
        let reply = {
            let (store, device, key) = (ctx.store.clone(), device.to_string(), key.clone());
            let stats = ctx.stats.clone();
            tokio::task::spawn_blocking(move || {
                process_upload(store.as_ref(), &stats, &device, &key, &msg)
            })
            .await?
        };
        let refused = matches!(reply, ServerMsg::Refused(_));
        if let ServerMsg::Refused(r) = &reply {
            bump(&ctx.stats.refused, 1);
            tracing::warn!(device, code = ?r.code, "upload refused: {}", r.message);
        }
        frame::write(tls, &reply).await?;
        if refused {
            let _ = tokio::io::AsyncWriteExt::shutdown(tls).await;
            return Ok(());
        }
    }
}

async fn blocking<T: Send + 'static>(
    ctx: &Ctx,
    f: impl FnOnce(&dyn Store) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref())).await?
}

/// The stored state as the verifier sees it.
pub fn to_log_state(d: &DeviceLog) -> anyhow::Result<LogState> {
    let tree = CompactRange::from_parts(d.tree_size, d.tree_nodes.clone()).with_context(|| {
        format!(
            "device {}: stored tree of {} leaves has {} nodes",
            d.device,
            d.tree_size,
            d.tree_nodes.len()
        )
    })?;
    let checkpoint = d
        .checkpoint
        .as_deref()
        .map(Checkpoint::parse)
        .transpose()
        .with_context(|| format!("device {}: stored checkpoint", d.device))?;
    Ok(LogState {
        epoch: d.epoch,
        epoch_first_seq: d.epoch_first_seq,
        next_seq: d.next_seq,
        tree,
        checkpoint,
    })
}

fn refused(code: RefuseCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Refused(Refused {
        code,
        message: message.into(),
    })
}

/// Verifies and stores one upload; the reply to send. Retries when another upload for the
/// same device (on another connection or collector process) committed first. (Public for the
/// sync bench's no-network yardstick.)
pub fn process_upload(
    store: &dyn Store,
    stats: &CollectorStats,
    device: &str,
    key: &PublicKey,
    upload: &Upload,
) -> ServerMsg {
    const ATTEMPTS: usize = 8;
    for _ in 0..ATTEMPTS {
        let stored = match store.device_log(device) {
            Ok(s) => s,
            Err(e) => return refused(RefuseCode::Unavailable, format!("storage: {e:#}")),
        };
        if let Some(reason) = stored.as_ref().and_then(|s| s.suspect.clone()) {
            return refused(
                RefuseCode::Suspect,
                format!("device {device:?} is flagged as suspect: {reason}"),
            );
        }
        let state = match stored.as_ref().map(to_log_state).transpose() {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => return refused(RefuseCode::Unavailable, format!("stored state: {e:#}")),
        };
        let resent = match check::resent_range(&state, upload) {
            Some((a, b)) => match store.leaf_hashes(device, a, b) {
                Ok(h) => h,
                Err(e) => return refused(RefuseCode::Unavailable, format!("storage: {e:#}")),
            },
            None => Vec::new(),
        };
        let verified = match check::check_upload(&state, device, key, upload, &resent) {
            Ok(v) => v,
            Err(e) => return refuse_check(store, stats, device, e),
        };
        if verified.new_events.is_empty() {
            bump(&stats.duplicates, verified.duplicates as u64);
            return ack(&verified, 0);
        }
        let commit = match to_commit(device, stored.as_ref(), &verified) {
            Ok(c) => c,
            Err(e) => return refused(RefuseCode::Unavailable, format!("{e:#}")),
        };
        match store.commit(&commit) {
            Ok(CommitOutcome::Stored(n)) => {
                bump(&stats.events_stored, n);
                bump(&stats.duplicates, verified.duplicates as u64);
                if let Some((from, to)) = verified.gap {
                    tracing::warn!(
                        device,
                        from,
                        to,
                        "device started a new epoch: events {from}..{to} were never received"
                    );
                }
                return ack(&verified, n as u32);
            }
            Ok(CommitOutcome::Conflict) => {
                bump(&stats.conflicts, 1);
                continue;
            }
            Err(e) => return refused(RefuseCode::Unavailable, format!("storage: {e:#}")),
        }
    }
    refused(
        RefuseCode::Unavailable,
        format!("uploads for {device:?} kept racing; try again"),
    )
}

fn refuse_check(
    store: &dyn Store,
    stats: &CollectorStats,
    device: &str,
    e: CheckError,
) -> ServerMsg {
    if e.flags_device() {
        tracing::error!(device, "flagging device as suspect: {e}");
        bump(&stats.flagged, 1);
        if let Err(se) = store.mark_suspect(device, &e.to_string()) {
            tracing::error!(device, "recording the suspect flag failed: {se:#}");
            return refused(RefuseCode::Unavailable, format!("storage: {se:#}"));
        }
    }
    refused(e.code(), e.to_string())
}

fn ack(v: &Verified, stored: u32) -> ServerMsg {
    ServerMsg::Ack(Ack {
        next_seq: v.state.next_seq,
        epoch: v.state.epoch,
        checkpoint_size: v.state.checkpoint.as_ref().map_or(0, |c| c.tree_size),
        stored,
        duplicates: v.duplicates,
    })
}

fn to_commit(device: &str, prev: Option<&DeviceLog>, v: &Verified) -> anyhow::Result<Commit> {
    let mut events = Vec::with_capacity(v.new_events.len());
    for (e, leaf) in &v.new_events {
        events.push(StoredEvent {
            seq: e.seq,
            epoch: v.state.epoch,
            leaf_hash: *leaf,
            body: postcard::to_allocvec(&e.body)?,
            time_ms: e.body.time_ms,
            prompt_tokens: e.body.prompt_tokens,
            completion_tokens: e.body.completion_tokens,
            outcome: e.body.outcome as u8,
            credits: edgelora_ledger::credits(&e.body)
                .into_iter()
                .map(|(c, k)| (c.to_string(), k))
                .collect(),
        });
    }
    Ok(Commit {
        expected_next_seq: prev.map(|p| p.next_seq),
        new_state: DeviceLog {
            device: device.to_string(),
            epoch: v.state.epoch,
            epoch_first_seq: v.state.epoch_first_seq,
            next_seq: v.state.next_seq,
            tree_size: v.state.tree.size(),
            tree_nodes: v.state.tree.nodes().to_vec(),
            checkpoint: v.state.checkpoint.as_ref().map(|c| c.note().to_string()),
            suspect: None,
        },
        events,
        gap: v.gap.map(|(from_seq, to_seq)| Gap {
            from_seq,
            to_seq,
            epoch: v.state.epoch,
        }),
        checkpoint: v
            .accepted_checkpoint
            .as_ref()
            .map(|c| (c.epoch(), c.tree_size, c.root, c.note().to_string())),
    })
}
