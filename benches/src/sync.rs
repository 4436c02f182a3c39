//! `sync`: the attribution log's trip to the fleet collector, over loopback mTLS, beside
//! yardsticks measured in the same run.
//!
//! A fresh fleet (CA, collector certificate, one enrolled device) and a device ledger holding
//! `--backlog` events of the realistic mix (a week offline) are made in a fresh folder on disk.
//! Then, in order:
//!
//! 1. yardstick: raw TLS 1.3 throughput over loopback with the same certificates (the device's
//!    client configuration against the collector's server configuration), sending as many
//!    bytes as the sync will send, read and discarded by the server;
//! 2. yardstick: how fast the device builds uploads alone (read events back from the log,
//!    consistency proofs) — the device-side ceiling;
//! 3. the catch-up: a collector (SQLite under the fleet folder, `synchronous=FULL`) and the
//!    device's sync client, timed from the client's start to the collector's acknowledgement
//!    of the last event; events/s, wire MB/s (ratio to 1) and the collector's exact totals are
//!    checked against the device's counters before the figure is printed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use edgelora_fleet::collector::server::{Collector, CollectorOptions};
use edgelora_fleet::fleet::{Fleet, InitOptions};
use edgelora_ledger::bench::Mix;
use edgelora_ledger::sync::bundle::DeviceBundle;
use edgelora_ledger::sync::client::{Position, SyncClient, SyncOptions, build_upload};
use edgelora_ledger::{Durability, Ledger, LedgerConfig, LedgerHandle, LedgerKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::resolve_threads;
use crate::report::{Context, Report, Row};

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// Events waiting on the device when the collector becomes reachable.
    #[arg(long, default_value_t = 1_000_000)]
    pub backlog: u64,
    /// Events per upload.
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Folder on the disk to use: a fresh sub-folder is made in it and removed afterwards
    /// (default: under the edgelora cache folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

const DEVICE: &str = "bench-box";

pub fn run(a: SyncArgs) -> Result<()> {
    if a.backlog == 0 || a.batch == 0 {
        bail!("--backlog and --batch must be at least 1");
    }
    let base = a
        .dir
        .clone()
        .unwrap_or_else(|| crate::swap::bench_dir("bench-sync"));
    let root = base.join(format!("sync-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let _cleanup = Cleanup(root.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(a, root))
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn run_async(a: SyncArgs, root: PathBuf) -> Result<()> {
    let mut report = Report::new(
        a.json,
        Context {
            threads: resolve_threads(None),
            batch: Some(a.batch),
            model: None,
        },
    );
    let fleet_dir = root.join("fleet");
    let fleet = Fleet::init(
        &fleet_dir,
        &InitOptions {
            name: "bench".into(),
            ..Default::default()
        },
    )?;
    let bundle_dir = root.join("bundle");
    fleet.enroll(DEVICE, &bundle_dir, 30)?;
    let bundle = DeviceBundle::load(&bundle_dir)?;
    let key_path = bundle
        .ledger_key_path()
        .context("the enrolled bundle has no ledger key")?;
    let key = LedgerKey::load_or_create(&key_path, DEVICE)?;
    let mut cfg = LedgerConfig::new(DEVICE, key);
    // Filling the backlog is not what is measured: fsync on a timer.
    cfg.durability = Durability::Relaxed {
        interval: Duration::from_millis(200),
    };
    let (ledger, _) = Ledger::open(root.join("ledger"), cfg)?;
    eprintln!("filling a backlog of {} events ...", a.backlog);
    let t0 = Instant::now();
    {
        let ledger = ledger.clone();
        let n = a.backlog;
        tokio::task::spawn_blocking(move || fill(&ledger, n)).await??;
    }
    ledger.checkpoint_now()?;
    let log_bytes = ledger.bytes_since(0);
    eprintln!(
        "  {} events, {:.1} MB of log, in {:.1} s",
        a.backlog,
        log_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );

    // Yardstick 2 first (it also tells the wire bytes for yardstick 1): build every upload.
    eprintln!("device side alone: building every upload ...");
    let (build_secs, wire_bytes) = {
        let ledger = ledger.clone();
        let batch = a.batch;
        let backlog = a.backlog;
        tokio::task::spawn_blocking(move || build_all(&ledger, batch, backlog)).await??
    };

    eprintln!(
        "raw mTLS over loopback: {:.1} MB ...",
        wire_bytes as f64 / 1e6
    );
    let raw_secs = raw_tls(&fleet_dir, &bundle, wire_bytes).await?;
    let raw_mbs = wire_bytes as f64 / 1e6 / raw_secs;

    eprintln!("the collector's work without the network (verify + store, in process) ...");
    let inproc_secs = {
        let ledger = ledger.clone();
        let (batch, backlog) = (a.batch, a.backlog);
        let db = root.join("inproc.db");
        tokio::task::spawn_blocking(move || in_process(&ledger, &db, batch, backlog)).await??
    };

    eprintln!("catch-up through the collector ...");
    let collector = Collector::start(CollectorOptions::new(&fleet_dir, "127.0.0.1:0")).await?;
    let mut opts = SyncOptions::new(
        DEVICE,
        vec![collector.local_addr().to_string()],
        bundle.server_name.clone(),
        bundle.client_config()?,
    );
    opts.batch_events = a.batch;
    opts.poll_interval = Duration::from_millis(5);
    opts.timeout = Duration::from_secs(120);
    let t0 = Instant::now();
    let client = SyncClient::spawn(ledger.clone(), opts);
    loop {
        let st = client.status();
        if st.acked.is_some_and(|p| p.next_seq >= a.backlog) {
            break;
        }
        if let Some((code, msg)) = &st.refused {
            bail!("the collector refused the sync: {code:?}: {msg}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let catch_up = t0.elapsed().as_secs_f64();
    let st = client.status();
    client.shutdown().await;

    // The figure counts only if the collector's totals are exact.
    let store = collector.store();
    let counters = ledger.counters();
    let backlog = a.backlog;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let (n, distinct) = store.event_count(DEVICE)?;
        if (n, distinct) != (backlog, backlog) {
            bail!("collector holds {n} events ({distinct} distinct), expected {backlog}");
        }
        let report = store.report(Some(DEVICE))?;
        let mut theirs: Vec<_> = report
            .contributors
            .iter()
            .map(|r| (r.contributor.clone(), r.kind.clone(), r.totals.requests))
            .collect();
        let mut ours: Vec<_> = counters
            .iter()
            .map(|(c, k, v)| (c.to_string(), k.name().to_string(), v.requests))
            .collect();
        theirs.sort();
        ours.sort();
        if theirs != ours {
            bail!("collector totals differ from the device's counters");
        }
        Ok(())
    })
    .await??;
    collector.shutdown().await;

    let eps = a.backlog as f64 / catch_up;
    let sync_mbs = st.bytes_sent as f64 / 1e6 / catch_up;
    report.push(
        Row::new(
            "sync",
            format!("catch-up of {} backlogged events", a.backlog),
            catch_up,
            "s",
        )
        .note(format!(
            "{:.1} MB of log; collector on SQLite (synchronous=FULL), {} events per upload",
            log_bytes as f64 / 1e6,
            a.batch
        )),
    );
    report.push(
        Row::new("sync", "events/s over loopback mTLS", eps, "events/s")
            .vs("device builds uploads alone", a.backlog as f64 / build_secs),
    );
    report.push(
        Row::new("sync", "events/s over loopback mTLS", eps, "events/s").vs(
            "same uploads verified + stored in process",
            a.backlog as f64 / inproc_secs,
        ),
    );
    report.push(
        Row::new("sync", "wire throughput", sync_mbs, "MB/s")
            .vs("raw TLS 1.3 loopback, same certs", raw_mbs)
            .note(format!(
                "{:.1} MB sent in {} uploads ({:.0} bytes/event on the wire)",
                st.bytes_sent as f64 / 1e6,
                st.uploads,
                st.bytes_sent as f64 / a.backlog as f64
            )),
    );
    report.print();
    Ok(())
}

fn fill(ledger: &LedgerHandle, n: u64) -> Result<()> {
    let mut mix = Mix::new(2026);
    let mut left = n;
    while left > 0 {
        let k = left.min(8192);
        let tickets: Vec<_> = (0..k).map(|_| ledger.append(mix.next_body())).collect();
        for t in tickets {
            t.wait()?;
        }
        left -= k;
    }
    Ok(())
}

/// Builds every upload of the backlog as the client would; (seconds, bytes framed).
fn build_all(ledger: &LedgerHandle, batch: usize, backlog: u64) -> Result<(f64, u64)> {
    let t0 = Instant::now();
    let mut pos = Position::default();
    let mut bytes = 0u64;
    while pos.next_seq < backlog {
        let Some(up) = build_upload(ledger, pos, batch)? else {
            bail!("nothing to send at {}", pos.next_seq);
        };
        let cp = edgelora_ledger::Checkpoint::parse(&up.checkpoint)?;
        pos = Position {
            next_seq: up.first_seq + up.events.len() as u64,
            epoch: up.epoch,
            checkpoint_size: cp.tree_size,
        };
        let msg = edgelora_ledger::sync::proto::ClientMsg::Upload(up);
        bytes += 4 + postcard::to_allocvec(&msg)?.len() as u64;
    }
    Ok((t0.elapsed().as_secs_f64(), bytes))
}

/// Seconds to build, verify and store every upload in one process (no TLS, no network): the
/// catch-up's ceiling on this machine.
fn in_process(
    ledger: &LedgerHandle,
    db: &std::path::Path,
    batch: usize,
    backlog: u64,
) -> Result<f64> {
    use edgelora_fleet::collector::server::{CollectorStats, process_upload};
    use edgelora_ledger::sync::proto::ServerMsg;
    let store = edgelora_fleet::collector::sqlite::SqliteStore::open(db)?;
    let stats = CollectorStats::default();
    let key = ledger.public_key().clone();
    let t0 = Instant::now();
    let mut pos = Position::default();
    while pos.next_seq < backlog {
        let Some(up) = build_upload(ledger, pos, batch)? else {
            bail!("nothing to send at {}", pos.next_seq);
        };
        match process_upload(&store, &stats, DEVICE, &key, &up) {
            ServerMsg::Ack(a) => {
                pos = Position {
                    next_seq: a.next_seq,
                    epoch: a.epoch,
                    checkpoint_size: a.checkpoint_size,
                }
            }
            other => bail!("in-process collector: {other:?}"),
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Seconds to push `bytes` through a fresh TLS 1.3 connection made with the fleet's
/// certificates (server side reads and discards).
async fn raw_tls(fleet_dir: &std::path::Path, bundle: &DeviceBundle, bytes: u64) -> Result<f64> {
    let server = edgelora_fleet::tls::ServerTls::load(fleet_dir)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server.current());
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        tls.write_all(b"k").await?;
        tls.shutdown().await?;
        Ok::<u64, std::io::Error>(total)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(bundle.server_name.clone())?;
    let t0 = Instant::now();
    let mut tls = tokio_rustls::TlsConnector::from(bundle.client_config()?)
        .connect(name, tcp)
        .await?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        tls.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    tls.shutdown().await?;
    let mut ack = [0u8; 1];
    let _ = tls.read(&mut ack).await;
    let secs = t0.elapsed().as_secs_f64();
    let got = srv.await??;
    if got != bytes {
        bail!("raw TLS: server read {got} of {bytes} bytes");
    }
    Ok(secs)
}
