//! `ledger` and `ledger-soak`: the attribution ledger's figures beside yardsticks measured in the
//! same run, and its crash torture at scale.
//!
//! `ledger` (all on one real disk, in a fresh folder removed afterwards):
//!
//! - durable events/s (`Durability::Strict`: each `wait()` returns after the event's bytes are
//!   fdatasync'ed) with 1, 16 and 256 threads appending-and-waiting for `--secs` each, every run
//!   next to the raw cost of a 4 KiB write + fdatasync to a file in the same folder measured just
//!   before it (`edgelora_ledger::bench::durable_throughput`). Ratio = events/s ÷ raw fsyncs/s:
//!   above 1 only through group commit (events per fsync, next to the writer count: how full the
//!   group commits are);
//! - bytes per event on the realistic `bench::Mix` (everything on disk ÷ events: frames,
//!   definitions, checkpoints, snapshots, headers), next to the aim of 48 bytes;
//! - reopening a `--reopen-events` log after a clean close (snapshot at the end) and with the
//!   final checkpoint and snapshot cut off (every event decoded and hashed), next to a plain read
//!   of the same segment files (page cache warm, as it is for the opens).
//!
//! `ledger-soak`: `edgelora_ledger::torture::run`: a child process (this binary, re-run with the
//! torture's environment; `main` calls `torture::child_main_if_requested` first) appends with
//! several threads and prints every acknowledged sequence number; it is SIGKILLed at a random
//! moment; the log is reopened; every acknowledged number must be present exactly once, recovery
//! may only cut a torn tail, and `verify` must pass. The log is started afresh every
//! `--kills-per-log` kills: reopening, checking and verifying read the whole log, so one log for
//! 10,000 kills would make the run quadratic.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use edgelora_ledger::bench;
use edgelora_ledger::torture::{self, TortureOptions, TortureReport};

use crate::common::resolve_threads;
use crate::report::{Context, Report, Row};
use crate::swap::{bench_dir, fs_name, in_memory_fs};

/// The aim for the average bytes per event on disk (realistic mix, everything included).
pub const BYTES_PER_EVENT_AIM: f64 = 48.0;

/// The hidden subcommand the torture child is started with. `main` never reaches it in a real
/// child (the torture's environment makes `child_main_if_requested` take over first).
pub const SOAK_CHILD_CMD: &str = "ledger-soak-child";

#[derive(Args, Debug)]
pub struct LedgerArgs {
    /// Concurrent appending threads of the durable runs (comma list).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    pub writers: Vec<usize>,
    /// Seconds of each durable run.
    #[arg(long, default_value_t = 5.0)]
    pub secs: f64,
    /// Events of the realistic mix logged for the bytes-per-event figure.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Events of the log that is reopened.
    #[arg(long, default_value_t = 1_000_000)]
    pub reopen_events: u64,
    /// Folder on the disk to measure: a fresh sub-folder is made in it and removed afterwards
    /// (default: under the edgelora cache folder, or /var/tmp when that is tmpfs).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// SIGKILLs in all.
    #[arg(long, default_value_t = 10_000)]
    pub kills: u32,
    /// Kills on one log before the next log is started in a fresh folder (0: one log for all).
    #[arg(long, default_value_t = 500)]
    pub kills_per_log: u32,
    /// `verify` (the whole log, against the signed checkpoints) after every N-th kill of a log
    /// and after its last.
    #[arg(long, default_value_t = 10)]
    pub verify_every: u32,
    /// Pause of each child writer between appends (or writer 0's bursts), in microseconds: it
    /// bounds how fast the log grows.
    #[arg(long, default_value_t = 2000)]
    pub pace_us: u64,
    /// Appending threads in the child.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Appends writer 0 queues before waiting (large group commits span pages, so kills tear them).
    #[arg(long, default_value_t = 32)]
    pub burst: usize,
    /// The child is killed a random time in [min, max] ms after it has opened the ledger.
    #[arg(long, default_value_t = 2)]
    pub min_run_ms: u64,
    #[arg(long, default_value_t = 50)]
    pub max_run_ms: u64,
    /// Segment size of the tortured log (small: kills land in rotations too).
    #[arg(long, default_value_t = 16 << 10)]
    pub segment_bytes: u64,
    /// Seed of the kill times (each log adds its index).
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Folder on a real disk: a fresh sub-folder is made in it, removed after a clean run and
    /// kept after a failure (default: under the edgelora cache folder, or /var/tmp when that is
    /// tmpfs).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// A fresh folder for this run inside `base`, removed on drop unless `keep` is set.
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    fn create(base: &Path, prefix: &str) -> Result<Self> {
        let path = base.join(format!("{prefix}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(RunDir { path, keep: false })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The base folder (flag or default) and its filesystem, warning when it is in memory.
fn base_dir(flag: &Option<PathBuf>, sub: &str) -> (PathBuf, String) {
    let base = flag.clone().unwrap_or_else(|| bench_dir(sub));
    let fs = fs_name(&base);
    if in_memory_fs(&fs) {
        eprintln!(
            "warning: {} is on {fs}: fsync costs nothing there (pass --dir on a disk)",
            base.display()
        );
    }
    (base, fs)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Seconds of a plain read of every segment file in `dir`, and the bytes read.
fn read_segments(dir: &Path) -> Result<(f64, u64)> {
    let mut paths = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("seg-") && name.ends_with(".log") {
            paths.push(p);
        }
    }
    paths.sort();
    let t = Instant::now();
    let mut bytes = 0u64;
    for p in &paths {
        let b = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        bytes += b.len() as u64;
        std::hint::black_box(&b);
    }
    Ok((t.elapsed().as_secs_f64(), bytes))
}

pub fn run(a: LedgerArgs) -> Result<()> {
    if a.writers.is_empty() || a.writers.contains(&0) {
        bail!("--writers needs counts of at least 1");
    }
    if !a.secs.is_finite() || a.secs <= 0.0 {
        bail!("--secs must be positive");
    }
    if a.events == 0 || a.reopen_events == 0 {
        bail!("--events and --reopen-events must be at least 1");
    }
    let (base, fs) = base_dir(&a.dir, "bench-ledger");
    let run_dir = RunDir::create(&base, "ledger")?;
    let root = &run_dir.path;
    let mut report = Report::new(
        a.json,
        Context {
            threads: resolve_threads(None),
            batch: None,
            model: None,
        },
    );
    let place = format!("{} ({fs})", root.display());

    for &w in &a.writers {
        let writers = if w == 1 {
            "1 writer".to_string()
        } else {
            format!("{w} writers")
        };
        eprintln!(
            "durable appends: raw fsync yardstick, then {writers} for {} s ...",
            a.secs
        );
        let d = root.join(format!("throughput-{w}"));
        let t = bench::durable_throughput(&d, w, Duration::from_secs_f64(a.secs))
            .with_context(|| format!("durable throughput with {w} writers"))?;
        // The same probe again just after: a shared or throttled disk drifts, and a ratio
        // against a yardstick that moved under the run says little.
        let after = bench::raw_fsync_4k(&d, 100)
            .with_context(|| format!("raw fsync probe in {}", d.display()))?;
        let raw_rate = 1.0 / t.raw_fsync.as_secs_f64();
        let drift = after.as_secs_f64() / t.raw_fsync.as_secs_f64();
        let drifted = if !(0.5..=2.0).contains(&drift) {
            " (the disk's speed moved under the run: the ratio is unreliable)"
        } else {
            ""
        };
        report.push(
            Row::new(
                "ledger",
                format!("durable events/s, {writers} (strict)"),
                t.events_per_sec(),
                "/s",
            )
            .vs("raw 4 KiB write+fdatasync/s, just before", raw_rate)
            .note(format!(
                "{} events in {:.2} s, {} fdatasyncs; raw 4 KiB write+fdatasync (mean of 100) {:.3} ms \
                 just before, {:.3} ms just after{drifted}; {place}",
                t.events,
                t.elapsed.as_secs_f64(),
                t.fsyncs,
                ms(t.raw_fsync),
                ms(after),
            )),
        );
        report.push(
            Row::new(
                "ledger",
                format!("events per fsync, {writers}"),
                t.events_per_fsync(),
                "ev",
            )
            .vs("writers (a full group commit)", w as f64),
        );
        std::fs::remove_dir_all(&d).ok();
    }

    eprintln!(
        "bytes per event: logging {} events of the realistic mix ...",
        a.events
    );
    let d = root.join("size");
    let b = bench::bytes_per_event(&d, a.events, 42).context("bytes per event")?;
    let n = b.events.max(1) as f64;
    report.push(
        Row::new(
            "ledger",
            "bytes per event on disk (realistic mix)",
            b.per_event(),
            "B",
        )
        .vs("aim (at most)", BYTES_PER_EVENT_AIM)
        .note(format!(
            "{} events, {} bytes: event frames {:.2} (9-byte frame header and 32-byte digest \
             included), definitions {:.2}, checkpoints {:.2}, snapshots {:.2}, headers {:.3} per event",
            b.events,
            b.total_bytes,
            b.event_frame_avg(),
            b.define_bytes as f64 / n,
            b.checkpoint_bytes as f64 / n,
            b.snapshot_bytes as f64 / n,
            b.header_bytes as f64 / n,
        )),
    );
    std::fs::remove_dir_all(&d).ok();

    eprintln!(
        "reopen: building a {}-event log, then opening it twice ...",
        a.reopen_events
    );
    let d = root.join("reopen");
    let r = bench::reopen(&d, a.reopen_events).context("reopen")?;
    let (read_s, read_bytes) = read_segments(&d)?;
    let read_ms = read_s * 1e3;
    let read_label = format!(
        "plain read of the log's {:.1} MB (page cache warm)",
        read_bytes as f64 / 1e6
    );
    report.push(
        Row::new(
            "ledger",
            format!("reopen of {} events after a clean close", r.events),
            ms(r.after_close),
            "ms",
        )
        .vs(read_label.clone(), read_ms)
        .note(format!(
            "log built in {:.1} s (relaxed durability, no snapshot until the close)",
            r.build.as_secs_f64()
        )),
    );
    report.push(
        Row::new(
            "ledger",
            format!("reopen of {} events with a full replay", r.events),
            ms(r.full_replay),
            "ms",
        )
        .vs(read_label, read_ms)
        .note(format!(
            "{} events replayed (decoded and hashed; final checkpoint and snapshot cut off): \
             {:.1}x the clean-close reopen",
            r.replayed_events,
            r.full_replay.as_secs_f64() / r.after_close.as_secs_f64().max(1e-9),
        )),
    );
    drop(run_dir);
    report.print();
    Ok(())
}

/// Sums the reports of consecutive logs.
fn add(total: &mut TortureReport, r: &TortureReport) {
    total.kills += r.kills;
    total.acknowledged += r.acknowledged;
    total.events += r.events;
    total.truncations += r.truncations;
    total.truncated_bytes += r.truncated_bytes;
    total.segments += r.segments;
    total.slowest_reopen = total.slowest_reopen.max(r.slowest_reopen);
    total.in_children += r.in_children;
    total.in_checks += r.in_checks;
    total.in_verify += r.in_verify;
}

pub fn run_soak(a: SoakArgs) -> Result<()> {
    if a.kills == 0 {
        bail!("--kills must be at least 1");
    }
    if a.writers == 0 || a.burst == 0 || a.verify_every == 0 {
        bail!("--writers, --burst and --verify-every must be at least 1");
    }
    if a.min_run_ms > a.max_run_ms {
        bail!("--min-run-ms is above --max-run-ms");
    }
    let (base, fs) = base_dir(&a.dir, "bench-ledger-soak");
    let mut run_dir = RunDir::create(&base, "ledger-soak")?;
    let per_log = if a.kills_per_log == 0 {
        a.kills
    } else {
        a.kills_per_log.min(a.kills)
    };
    let logs = a.kills.div_ceil(per_log);
    let chosen = format!(
        "{} kills on {logs} log(s) of up to {per_log} kills; verify every {} kills and after each \
         log's last; child: {} writers, pace {} us, writer 0 bursts of {}, killed {}..{} ms after \
         opening; {} KiB segments, strict durability; seed {:#x}; {} ({fs})",
        a.kills,
        a.verify_every,
        a.writers,
        a.pace_us,
        a.burst,
        a.min_run_ms,
        a.max_run_ms,
        a.segment_bytes >> 10,
        a.seed,
        run_dir.path.display(),
    );
    eprintln!("ledger-soak: {chosen}");

    let started = Instant::now();
    let mut total = TortureReport::default();
    let mut failure = None;
    for log in 0..logs {
        let kills = per_log.min(a.kills - log * per_log);
        let dir = run_dir.path.join(format!("log-{log:04}"));
        let mut opts = TortureOptions::new(kills, vec![OsString::from(SOAK_CHILD_CMD)]);
        opts.writers = a.writers;
        opts.burst = a.burst;
        opts.pace = Duration::from_micros(a.pace_us);
        opts.verify_every = a.verify_every;
        opts.min_run = Duration::from_millis(a.min_run_ms);
        opts.max_run = Duration::from_millis(a.max_run_ms);
        opts.segment_bytes = a.segment_bytes;
        opts.seed = a.seed.wrapping_add(u64::from(log));
        match torture::run(&dir, &opts) {
            Ok(r) => {
                add(&mut total, &r);
                std::fs::remove_dir_all(&dir).ok();
                eprintln!(
                    "log {}/{logs}: {} kills, {} acknowledged, {} events, {} torn tails cut, \
                     slowest reopen {:.1} ms, {:.1} s; {} kills in {:.0} s so far",
                    log + 1,
                    r.kills,
                    r.acknowledged,
                    r.events,
                    r.truncations,
                    ms(r.slowest_reopen),
                    r.elapsed.as_secs_f64(),
                    total.kills,
                    started.elapsed().as_secs_f64(),
                );
            }
            Err(e) => {
                eprintln!("log {}/{logs} FAILED: {e}", log + 1);
                eprintln!("the failing log is kept in {}", dir.display());
                run_dir.keep = true;
                failure = Some(format!("log {}: {e}", log + 1));
                break;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    let mut report = Report::new(
        a.json,
        Context {
            threads: resolve_threads(None),
            batch: None,
            model: None,
        },
    );
    report.push(
        Row::new(
            "ledger-soak",
            "SIGKILLs survived",
            f64::from(total.kills),
            "",
        )
        .vs("kills asked", f64::from(a.kills))
        .note(chosen),
    );
    report.push(
        Row::new(
            "ledger-soak",
            "acknowledged events found exactly once",
            total.acknowledged as f64,
            "ev",
        )
        .vs("acknowledged by the child", total.acknowledged as f64)
        .note(format!(
            "{} events in the logs at the end (acknowledged or not)",
            total.events
        )),
    );
    report.push(
        Row::new(
            "ledger-soak",
            "torn tails cut on reopen",
            f64::from(total.truncations),
            "",
        )
        .vs("kills", f64::from(total.kills))
        .note(format!("{} bytes cut in all", total.truncated_bytes)),
    );
    report.push(
        Row::new(
            "ledger-soak",
            "failures (lost, duplicated, damage, verify)",
            f64::from(u8::from(failure.is_some())),
            "",
        )
        .note(failure.clone().unwrap_or_else(|| "none".into())),
    );
    report.push(Row::new(
        "ledger-soak",
        "slowest reopen",
        ms(total.slowest_reopen),
        "ms",
    ));
    report.push(
        Row::new("ledger-soak", "elapsed", elapsed, "s").note(format!(
            "{:.1} ms per kill: children {:.0} s, reopen + checks {:.0} s, verify {:.0} s",
            elapsed * 1e3 / f64::from(total.kills.max(1)),
            total.in_children.as_secs_f64(),
            total.in_checks.as_secs_f64(),
            total.in_verify.as_secs_f64(),
        )),
    );
    report.print();
    if let Some(f) = failure {
        bail!("ledger soak failed: {f}");
    }
    drop(run_dir);
    Ok(())
}

/// Reached only when the child subcommand is run by hand (the torture sets its environment).
pub fn run_soak_child() -> Result<()> {
    bail!("{SOAK_CHILD_CMD} is the crash-torture child: `ledger-soak` starts it")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: LedgerArgs,
    }

    #[test]
    fn writers_default_and_list() {
        let c = Cli::parse_from(["x"]);
        assert_eq!(c.a.writers, [1, 16, 256]);
        assert_eq!(c.a.reopen_events, 1_000_000);
        let c = Cli::parse_from(["x", "--writers", "2,8"]);
        assert_eq!(c.a.writers, [2, 8]);
    }

    #[test]
    fn run_dir_is_fresh_and_removed() {
        let base =
            std::env::temp_dir().join(format!("edgelora-bench-ledger-t{}", std::process::id()));
        let d = RunDir::create(&base, "t").unwrap();
        std::fs::write(d.path.join("seg-00000000000000000000.log"), [1u8; 100]).unwrap();
        std::fs::write(d.path.join("other"), [1u8; 7]).unwrap();
        let (_, bytes) = read_segments(&d.path).unwrap();
        assert_eq!(bytes, 100);
        let p = d.path.clone();
        drop(d);
        assert!(!p.exists());
        std::fs::remove_dir_all(&base).ok();
    }
}
