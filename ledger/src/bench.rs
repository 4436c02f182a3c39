//! Measurements for the bench harness (and printed, not asserted, by the test suite): bytes per
//! event on a realistic mix, durable appends per second against the raw cost of a 4 KiB
//! write + fsync on the same disk, and reopen time.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Durability, LedgerConfig};
use crate::error::LedgerError;
use crate::event::{Attribution, DataChunk, EventBody, Outcome, ToolUse};
use crate::format::frame::FrameKind;
use crate::handle::{Ledger, LedgerHandle};
use crate::inspect;
use crate::key::LedgerKey;
use crate::torture::SplitMix;

/// A realistic stream of events: 2 base models, 300 adapters from 120 contributors (popularity
/// skewed), 30% with one of 20 prompt templates, 25% with 1–3 chunks from 8 datanets of 5,000
/// chunks each, 10% with a tool.
pub struct Mix {
    rng: SplitMix,
    time_ms: u64,
    bases: Vec<Attribution>,
    adapters: Vec<Attribution>,
    prompts: Vec<Attribution>,
    tools: Vec<Attribution>,
}

impl Mix {
    pub fn new(seed: u64) -> Self {
        let mut rng = SplitMix::new(seed);
        let adapters = (0..300)
            .map(|i| {
                Attribution::new(
                    format!("skill-{i:03}-lora"),
                    format!("contributor-{:03}", rng.range(0, 119)),
                )
            })
            .collect();
        Mix {
            time_ms: 1_735_689_600_000,
            bases: vec![
                Attribution::new("llama-3.1-8b-instruct-int4", "meta"),
                Attribution::new("qwen2.5-7b-instruct-int4", "alibaba"),
            ],
            adapters,
            prompts: (0..20)
                .map(|i| {
                    Attribution::new(format!("template-{i}"), format!("prompt-author-{}", i % 7))
                })
                .collect(),
            tools: (0..12)
                .map(|i| Attribution::new(format!("tool-{i}"), format!("tool-vendor-{}", i % 5)))
                .collect(),
            rng,
        }
    }

    /// The next event body.
    pub fn next_body(&mut self) -> EventBody {
        let r = &mut self.rng;
        self.time_ms += r.range(5, 400);
        let mut digest = [0u8; 32];
        for c in digest.chunks_mut(8) {
            c.copy_from_slice(&r.next_u64().to_le_bytes());
        }
        // Skewed popularity: squaring a uniform favours low indices.
        let u = r.range(0, 999) as f64 / 1000.0;
        let adapter = self.adapters[((u * u) * self.adapters.len() as f64) as usize].clone();
        let base = self.bases[(r.range(0, 9) / 8) as usize].clone();
        let prompt = (r.range(0, 9) < 3).then(|| self.prompts[r.range(0, 19) as usize].clone());
        let chunks = if r.range(0, 3) == 0 {
            (0..r.range(1, 3))
                .map(|_| {
                    let net = r.range(0, 7);
                    DataChunk {
                        datanet: format!("datanet-{net}"),
                        chunk: format!("doc-{}#{}", r.range(0, 999), r.range(0, 4)),
                        contributor: format!("data-owner-{}", net * 3 + r.range(0, 2)),
                        score: r.range(0, 1000) as f32 / 1000.0,
                        client_reported: r.range(0, 9) == 0,
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        let tools = if r.range(0, 9) == 0 {
            let t = &self.tools[r.range(0, 11) as usize];
            vec![ToolUse {
                id: t.id.clone(),
                contributor: t.contributor.clone(),
                client_reported: true,
            }]
        } else {
            Vec::new()
        };
        let outcome = match r.range(0, 99) {
            0..=84 => Outcome::Stop,
            85..=94 => Outcome::Length,
            95..=97 => Outcome::Cancelled,
            _ => Outcome::Error,
        };
        EventBody {
            time_ms: self.time_ms,
            request_digest: digest,
            base_model: base,
            adapter: Some(adapter),
            prompt_template: prompt,
            data_chunks: chunks,
            tools,
            prompt_tokens: r.range(20, 3000) as u32,
            completion_tokens: r.range(1, 800) as u32,
            latency_ms: r.range(40, 9000) as u32,
            outcome,
        }
    }
}

fn bench_config(dir: &Path, durability: Durability) -> Result<LedgerConfig, LedgerError> {
    std::fs::create_dir_all(dir).map_err(|e| LedgerError::io(dir, e))?;
    let key = LedgerKey::load_or_create(&dir.join("bench.key"), "bench-device")?;
    let mut c = LedgerConfig::new("bench-device", key);
    c.durability = durability;
    Ok(c)
}

/// Appends `events` without waiting on each (the writer batches them), then closes.
fn fill(ledger: &LedgerHandle, events: u64, mix: &mut Mix) -> Result<(), LedgerError> {
    let mut pending = Vec::with_capacity(8192);
    for _ in 0..events {
        pending.push(ledger.append(mix.next_body()));
        if pending.len() == 8192 {
            for t in pending.drain(..) {
                t.wait()?;
            }
        }
    }
    for t in pending {
        t.wait()?;
    }
    Ok(())
}

/// Where the bytes of a log go.
#[derive(Debug, Clone, Default)]
pub struct BytesPerEvent {
    pub events: u64,
    pub total_bytes: u64,
    pub event_frame_bytes: u64,
    pub define_bytes: u64,
    pub checkpoint_bytes: u64,
    pub snapshot_bytes: u64,
    pub header_bytes: u64,
}

impl BytesPerEvent {
    /// Everything on disk divided by the events.
    pub fn per_event(&self) -> f64 {
        self.total_bytes as f64 / self.events.max(1) as f64
    }

    /// Event frames alone (9-byte frame header included).
    pub fn event_frame_avg(&self) -> f64 {
        self.event_frame_bytes as f64 / self.events.max(1) as f64
    }
}

/// Logs `events` of `Mix` in `dir` (default configuration) and accounts for every byte.
pub fn bytes_per_event(dir: &Path, events: u64, seed: u64) -> Result<BytesPerEvent, LedgerError> {
    let config = bench_config(
        dir,
        Durability::Relaxed {
            interval: Duration::from_millis(50),
        },
    )?;
    let (ledger, _) = Ledger::open(dir, config)?;
    fill(&ledger, events, &mut Mix::new(seed))?;
    ledger.close()?;
    drop(ledger);
    let mut out = BytesPerEvent {
        events,
        ..Default::default()
    };
    let io = |e: std::io::Error| LedgerError::io(dir, e);
    for seg in inspect::inspect(dir).map_err(io)? {
        out.total_bytes += seg.file_len;
        out.header_bytes += crate::format::header::HEADER_LEN as u64;
        for f in seg.frames {
            match f.kind {
                FrameKind::Event => out.event_frame_bytes += f.len,
                FrameKind::Define => out.define_bytes += f.len,
                FrameKind::Checkpoint => out.checkpoint_bytes += f.len,
                FrameKind::Snapshot => out.snapshot_bytes += f.len,
            }
        }
    }
    Ok(out)
}

/// Mean time of one 4 KiB append + `fdatasync` to a file in `dir`: the yardstick for durable
/// appends on this disk.
pub fn raw_fsync_4k(dir: &Path, iterations: u32) -> std::io::Result<Duration> {
    let path = dir.join("fsync-probe.bin");
    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
    let block = [0x5au8; 4096];
    f.write_all(&block)?;
    f.sync_all()?;
    let t = Instant::now();
    for _ in 0..iterations {
        f.write_all(&block)?;
        f.sync_data()?;
    }
    let per = t.elapsed() / iterations.max(1);
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(per)
}

#[derive(Debug, Clone)]
pub struct Throughput {
    pub writers: usize,
    pub events: u64,
    pub elapsed: Duration,
    pub fsyncs: u64,
    /// `raw_fsync_4k` measured in the same directory just before: the yardstick.
    pub raw_fsync: Duration,
}

impl Throughput {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub fn events_per_fsync(&self) -> f64 {
        self.events as f64 / self.fsyncs.max(1) as f64
    }

    /// Durable events per second divided by raw 4 KiB fsyncs per second.
    pub fn vs_raw_fsync(&self) -> f64 {
        self.events_per_sec() * self.raw_fsync.as_secs_f64()
    }
}

/// `writers` threads each append-and-wait (Strict durability) for `duration`, after measuring
/// the raw fsync yardstick in the same directory (disks shared with other work drift, so the
/// two are taken back to back).
pub fn durable_throughput(
    dir: &Path,
    writers: usize,
    duration: Duration,
) -> Result<Throughput, LedgerError> {
    let config = bench_config(dir, Durability::Strict)?;
    let raw_fsync = raw_fsync_4k(dir, 100).map_err(|e| LedgerError::io(dir, e))?;
    let (ledger, _) = Ledger::open(dir, config)?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let before = ledger.stats();
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (ledger, stop, count) = (ledger.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || -> Result<(), LedgerError> {
                let mut mix = Mix::new(w as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    ledger.append(mix.next_body()).wait()?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| LedgerError::Closed)??;
    }
    let elapsed = start.elapsed();
    let after = ledger.stats();
    ledger.close()?;
    Ok(Throughput {
        writers,
        events: count.load(Ordering::Relaxed),
        elapsed,
        fsyncs: after.fsyncs - before.fsyncs,
        raw_fsync,
    })
}

#[derive(Debug, Clone)]
pub struct ReopenTiming {
    pub events: u64,
    pub build: Duration,
    /// Open after a clean close (a snapshot at the end: nothing to replay).
    pub after_close: Duration,
    /// Open with the final checkpoint and snapshot cut off, as after a crash with no snapshot
    /// in the log: every event is decoded and hashed.
    pub full_replay: Duration,
    pub replayed_events: u64,
}

/// Builds a log of `events` in `dir` and times opening it.
pub fn reopen(dir: &Path, events: u64) -> Result<ReopenTiming, LedgerError> {
    let mut config = bench_config(
        dir,
        Durability::Relaxed {
            interval: Duration::from_millis(100),
        },
    )?;
    config.snapshot_every_events = u64::MAX;
    let t = Instant::now();
    let (ledger, _) = Ledger::open(dir, config.clone())?;
    fill(&ledger, events, &mut Mix::new(7))?;
    ledger.close()?;
    drop(ledger);
    let build = t.elapsed();

    let t = Instant::now();
    let (ledger, _) = Ledger::open(dir, config.clone())?;
    let after_close = t.elapsed();
    ledger.close()?;
    drop(ledger);

    // Cut the log just before its final snapshot and the checkpoint that precedes it.
    let io = |e: std::io::Error| LedgerError::io(dir, e);
    let last = inspect::inspect(dir).map_err(io)?.pop().expect("a segment");
    let kinds: Vec<_> = last.frames.iter().map(|f| (f.kind, f.offset)).collect();
    if let [.., (FrameKind::Checkpoint, cut), (FrameKind::Snapshot, _)] = kinds.as_slice() {
        let f = OpenOptions::new()
            .write(true)
            .open(&last.path)
            .map_err(io)?;
        f.set_len(*cut).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    let t = Instant::now();
    let (ledger, report) = Ledger::open(dir, config)?;
    let full_replay = t.elapsed();
    drop(ledger);
    Ok(ReopenTiming {
        events,
        build,
        after_close,
        full_replay,
        replayed_events: report.replayed_events,
    })
}
