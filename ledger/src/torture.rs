//! Crash torture: a child process appends with several threads and reports every sequence
//! number whose `wait()` returned; the parent kills it with SIGKILL at random moments, reopens
//! the ledger, and checks that every acknowledged event is present exactly once, that recovery
//! found no damage (a crash may only leave a torn tail), and that `verify` passes.
//!
//! The child is the current executable, re-run with `CHILD_ENV` set. Whatever hosts the torture
//! must call `child_main_if_requested()` first thing (a test: at the top of the test function,
//! with `child_args` naming that test; a bench binary: at the top of `main`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config::{Durability, LedgerConfig};
use crate::error::LedgerError;
use crate::event::{Attribution, EventBody, Outcome};
use crate::handle::Ledger;
use crate::key::LedgerKey;
use crate::report::Damage;
use crate::verify::{VerifyError, verify};

/// Set (to the ledger directory) in the child's environment.
pub const CHILD_ENV: &str = "EDGELORA_LEDGER_TORTURE_CHILD";
const RUN_ENV: &str = "EDGELORA_LEDGER_TORTURE_RUN";
const WRITERS_ENV: &str = "EDGELORA_LEDGER_TORTURE_WRITERS";
const SEGMENT_ENV: &str = "EDGELORA_LEDGER_TORTURE_SEGMENT_BYTES";
const RELAXED_ENV: &str = "EDGELORA_LEDGER_TORTURE_RELAXED_MS";
const PACE_ENV: &str = "EDGELORA_LEDGER_TORTURE_PACE_US";
const BURST_ENV: &str = "EDGELORA_LEDGER_TORTURE_BURST";
const KEY_FILE: &str = "torture.key";
const DEVICE: &str = "torture-device";

#[derive(Debug, Clone)]
pub struct TortureOptions {
    pub kills: u32,
    /// Appending threads in the child.
    pub writers: usize,
    /// The child is killed a random time in `[min_run, max_run]` after it has opened the ledger.
    pub min_run: Duration,
    pub max_run: Duration,
    pub seed: u64,
    /// Small segments make kills land in rotations too.
    pub segment_bytes: u64,
    pub durability: Durability,
    /// Arguments that make the current executable reach `child_main_if_requested`.
    pub child_args: Vec<OsString>,
    /// Run `verify` after every `verify_every`-th kill (and after the last).
    pub verify_every: u32,
    /// Pause between a writer's appends (or bursts), to bound how fast the log grows: the
    /// checks after each kill read the whole log.
    pub pace: Duration,
    /// Size of writer 0's bursts (appends queued before waiting), which make group commits
    /// large enough to span pages.
    pub burst: usize,
}

impl TortureOptions {
    pub fn new(kills: u32, child_args: Vec<OsString>) -> Self {
        TortureOptions {
            kills,
            writers: 4,
            min_run: Duration::from_millis(2),
            max_run: Duration::from_millis(50),
            seed: 0x5eed,
            segment_bytes: 16 << 10,
            durability: Durability::Strict,
            child_args,
            verify_every: 1,
            pace: Duration::from_millis(2),
            burst: 32,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TortureReport {
    pub kills: u32,
    /// Acknowledged appends seen by the parent, all found in the log.
    pub acknowledged: u64,
    /// Events in the log at the end (acknowledged or not).
    pub events: u64,
    /// Reopens that cut a torn tail.
    pub truncations: u32,
    pub truncated_bytes: u64,
    pub segments: usize,
    pub slowest_reopen: Duration,
    /// Wall time spent with a child running (start-up included).
    pub in_children: Duration,
    /// Wall time spent reopening and checking events in the parent.
    pub in_checks: Duration,
    /// Wall time spent in `verify`.
    pub in_verify: Duration,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TortureError {
    #[error("could not run the child process: {0}")]
    Spawn(std::io::Error),
    #[error("the child process failed: {0}")]
    Child(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("verify failed after kill {kill}: {source}")]
    Verify { kill: u32, source: VerifyError },
    #[error("recovery after kill {kill} reported damage: {damage}")]
    Damage { kill: u32, damage: Damage },
    #[error("after kill {kill}: acknowledged sequence number {seq} {problem}")]
    Lost {
        kill: u32,
        seq: u64,
        problem: String,
    },
    #[error("after kill {kill}: {problem}")]
    Inconsistent { kill: u32, problem: String },
}

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

fn digest_for(run: u64, writer: u64, n: u64) -> [u8; 32] {
    let mut d = [0xa5u8; 32];
    d[0..8].copy_from_slice(&run.to_le_bytes());
    d[8..16].copy_from_slice(&writer.to_le_bytes());
    d[16..24].copy_from_slice(&n.to_le_bytes());
    d
}

fn torture_config(
    dir: &Path,
    segment_bytes: u64,
    durability: Durability,
) -> Result<LedgerConfig, LedgerError> {
    let key = LedgerKey::load_or_create(&dir.join(KEY_FILE), DEVICE)?;
    let mut c = LedgerConfig::new(DEVICE, key);
    c.segment_bytes = segment_bytes;
    c.durability = durability;
    c.checkpoint_every_events = 512;
    c.snapshot_every_events = 2048;
    Ok(c)
}

/// If this process is a torture child, runs the child role and never returns.
pub fn child_main_if_requested() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let code = match child_main(PathBuf::from(dir)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("torture child: {e}");
            2
        }
    };
    std::process::exit(code);
}

fn env_u64(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn child_main(dir: PathBuf) -> Result<(), LedgerError> {
    let run = env_u64(RUN_ENV);
    let writers = env_u64(WRITERS_ENV).max(1);
    let durability = match env_u64(RELAXED_ENV) {
        0 => Durability::Strict,
        ms => Durability::Relaxed {
            interval: Duration::from_millis(ms),
        },
    };
    let config = torture_config(&dir, env_u64(SEGMENT_ENV).max(4096), durability)?;
    let pace = Duration::from_micros(env_u64(PACE_ENV));
    let burst = env_u64(BURST_ENV).max(1) as usize;
    let ledger = open_retrying(&dir, &config)?.0;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let ledger = ledger.clone();
            std::thread::spawn(move || -> Result<(), LedgerError> {
                let mut rng = SplitMix::new(run * 1000 + w);
                // Writer 0 appends in bursts of 100 before waiting: large group commits make
                // multi-page writes that a kill can tear.
                let burst = if w == 0 { burst } else { 1 };
                let mut n = 0u64;
                loop {
                    let mut tickets = Vec::with_capacity(burst);
                    for _ in 0..burst {
                        let body = EventBody {
                            time_ms: 1_700_000_000_000 + run * 1000 + n,
                            request_digest: digest_for(run, w, n),
                            base_model: Attribution::new("base-7b", "acme"),
                            adapter: Some(Attribution::new(
                                format!("adapter-{}", rng.range(0, 40)),
                                format!("contrib-{}", rng.range(0, 12)),
                            )),
                            prompt_template: None,
                            data_chunks: Vec::new(),
                            tools: Vec::new(),
                            prompt_tokens: rng.range(1, 900) as u32,
                            completion_tokens: rng.range(1, 300) as u32,
                            latency_ms: 42,
                            outcome: Outcome::Stop,
                        };
                        tickets.push((n, ledger.append(body)));
                        n += 1;
                    }
                    for (n, t) in tickets {
                        let seq = t.wait()?;
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "ack {seq} {run} {w} {n}");
                        let _ = out.flush();
                    }
                    if !pace.is_zero() {
                        std::thread::sleep(pace);
                    }
                }
                #[allow(unreachable_code)]
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| LedgerError::Closed)??;
    }
    Ok(())
}

/// Opens, retrying briefly on `Locked`: another thread of the parent process may be between
/// fork and exec and so still share the parent's just-released lock on the directory.
fn open_retrying(
    dir: &Path,
    config: &LedgerConfig,
) -> Result<(crate::handle::LedgerHandle, crate::report::OpenReport), LedgerError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Ledger::open(dir, config.clone()) {
            Err(LedgerError::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

/// Runs the torture loop in `dir` (which should be empty or hold an earlier torture's ledger).
pub fn run(dir: &Path, opts: &TortureOptions) -> Result<TortureReport, TortureError> {
    let started = Instant::now();
    std::fs::create_dir_all(dir).map_err(TortureError::Spawn)?;
    let config = torture_config(dir, opts.segment_bytes, opts.durability)?;
    let public = config.key.public_key();
    let exe = std::env::current_exe().map_err(TortureError::Spawn)?;
    let mut rng = SplitMix::new(opts.seed);
    let mut acked: HashMap<u64, [u8; 32]> = HashMap::new();
    let mut digests = std::collections::HashSet::new();
    let mut checked = 0u64;
    let mut report = TortureReport::default();

    for kill in 0..opts.kills {
        let child_started = Instant::now();
        let mut child = Command::new(&exe)
            .args(&opts.child_args)
            .env(CHILD_ENV, dir)
            .env(RUN_ENV, kill.to_string())
            .env(WRITERS_ENV, opts.writers.to_string())
            .env(PACE_ENV, opts.pace.as_micros().to_string())
            .env(BURST_ENV, opts.burst.to_string())
            .env(SEGMENT_ENV, opts.segment_bytes.to_string())
            .env(
                RELAXED_ENV,
                match opts.durability {
                    Durability::Strict => "0".to_string(),
                    Durability::Relaxed { interval } => interval.as_millis().max(1).to_string(),
                },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(TortureError::Spawn)?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    // A line cut by the kill has no newline: it was never fully reported.
                    Ok(_) if line.ends_with(b"\n") => {
                        if tx.send(line.clone()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => break,
                }
            }
        });
        // Wait until the child has opened the ledger (recovery included).
        let ready_deadline = Instant::now() + Duration::from_secs(30);
        let mut lines = Vec::new();
        loop {
            let left = ready_deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                // libtest may have printed "test <name> ... " on the same line.
                Ok(l) if l.ends_with(b"ready\n") => break,
                Ok(l) => lines.push(l),
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().map_err(TortureError::Spawn)?;
                    return Err(TortureError::Child(format!(
                        "never became ready (exit {status})"
                    )));
                }
            }
        }
        let nanos = rng.range(
            opts.min_run.as_nanos() as u64,
            opts.max_run.as_nanos().max(opts.min_run.as_nanos()) as u64,
        );
        std::thread::sleep(Duration::from_nanos(nanos));
        if let Some(status) = child.try_wait().map_err(TortureError::Spawn)? {
            return Err(TortureError::Child(format!("exited early ({status})")));
        }
        child.kill().map_err(TortureError::Spawn)?;
        child.wait().map_err(TortureError::Spawn)?;
        let _ = reader.join();
        lines.extend(rx.try_iter());
        report.in_children += child_started.elapsed();

        let mut fresh: HashMap<u64, [u8; 32]> = HashMap::new();
        for l in lines {
            let text = String::from_utf8_lossy(&l);
            let words: Vec<&str> = text.split_whitespace().collect();
            let Some(at) = words.iter().position(|w| *w == "ack") else {
                continue;
            };
            let f = &words[at..];
            if f.len() != 5 {
                continue;
            }
            let nums: Vec<u64> = f[1..].iter().filter_map(|x| x.parse().ok()).collect();
            if nums.len() != 4 {
                continue;
            }
            let digest = digest_for(nums[1], nums[2], nums[3]);
            fresh.insert(nums[0], digest);
            if let Some(old) = acked.insert(nums[0], digest)
                && old != digest
            {
                return Err(TortureError::Lost {
                    kill,
                    seq: nums[0],
                    problem: "was acknowledged twice for different events".into(),
                });
            }
        }

        // Reopen in the parent, as the restarted daemon would.
        let t = Instant::now();
        let (ledger, open) = open_retrying(dir, &config)?;
        report.slowest_reopen = report.slowest_reopen.max(t.elapsed());
        if let Some(d) = open.damage.first() {
            return Err(TortureError::Damage {
                kill,
                damage: d.clone(),
            });
        }
        if open.truncated_bytes > 0 {
            report.truncations += 1;
            report.truncated_bytes += open.truncated_bytes;
        }
        // Events before `checked` were checked after an earlier kill; the region is sealed (the
        // parent closed cleanly) and `verify` re-checks all of it against signed checkpoints.
        let events = ledger.events(checked, usize::MAX)?;
        for (i, e) in events.iter().enumerate() {
            if e.seq != checked + i as u64 {
                return Err(TortureError::Inconsistent {
                    kill,
                    problem: format!(
                        "event {} of the log has sequence number {}",
                        checked + i as u64,
                        e.seq
                    ),
                });
            }
            if !digests.insert(e.body.request_digest) {
                return Err(TortureError::Inconsistent {
                    kill,
                    problem: format!("event {} is a duplicate of an earlier one", e.seq),
                });
            }
        }
        let log_len = checked + events.len() as u64;
        if ledger.next_seq() != log_len {
            return Err(TortureError::Inconsistent {
                kill,
                problem: format!(
                    "next sequence number {} but the log holds {log_len}",
                    ledger.next_seq()
                ),
            });
        }
        for (&seq, digest) in &fresh {
            match seq
                .checked_sub(checked)
                .and_then(|i| events.get(i as usize))
            {
                None => {
                    return Err(TortureError::Lost {
                        kill,
                        seq,
                        problem: "is missing from the log".into(),
                    });
                }
                Some(e) if e.body.request_digest != *digest => {
                    return Err(TortureError::Lost {
                        kill,
                        seq,
                        problem: "holds a different event".into(),
                    });
                }
                Some(_) => {}
            }
        }
        checked = log_len;
        report.events = log_len;
        report.segments = open.segments;
        ledger.close()?;
        drop(ledger);
        report.in_checks += t.elapsed();
        if (kill + 1) % opts.verify_every.max(1) == 0 || kill + 1 == opts.kills {
            let t = Instant::now();
            verify(dir, &public).map_err(|source| TortureError::Verify { kill, source })?;
            report.in_verify += t.elapsed();
        }
        report.kills = kill + 1;
    }
    report.acknowledged = acked.len() as u64;
    report.elapsed = started.elapsed();
    Ok(report)
}
