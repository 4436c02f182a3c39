//! `adapters`: serving throughput as the number of distinct adapters grows far past what the pool
//! holds, against the same workload on one adapter and on the base model, measured in the same
//! run (S-LoRA's scaling experiment, on this box).
//!
//! `max(--distinct)` random adapters of the model's shape are written once as f16 packs into a
//! cache folder named by the model fingerprint, rank and targets (reused by later runs). For each
//! N, a fresh [`Scheduler`] over a CPU KV pool (room for `--batch` sequences plus the pool's
//! adapters) with residency `max_adapters = --pool-adapters` serves R requests, request i on
//! adapter i % N, through a closed loop: `--clients` requests (default `--batch`) are in flight
//! and each one that finishes is replaced by the next, as that many clients would. Every request
//! has a random prompt and `--max-tokens` greedy tokens (no stop token), except that the first
//! wave ramps its lengths up to `--max-tokens`, so that completions, and with them the next
//! requests' adapter loads, are spread over the steps rather than all at once.
//!
//! The base model and every N are served side by side, each with its own scheduler, in turns of
//! `--slice-secs` (a turn ends by waiting for the loads under way, so none lands during another
//! one's turn): on a shared machine a neighbour's burst then slows all of them alike instead of
//! whichever ran at the time. Reported: generated tokens/s over each one's own time, tokens per
//! step and time per step (tokens/s is their ratio), and what the residency manager counted
//! (loads, evictions, hits, misses, loader seconds).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use edgelora_daemon::adapters::pack::{self, PackDtype, PackInfo};
use edgelora_daemon::adapters::registry::{EntryState, Registry};
use edgelora_daemon::adapters::residency::{ResidencyConfig, ResidencyStats, pages_for};
use edgelora_daemon::engine::scheduler::{Event, GenRequest, Limits, Scheduler};
use edgelora_daemon::engine::{Backend, ForwardOptions, KvPool};
use edgelora_daemon::model::{Model, ModelConfig, Proj};
use edgelora_kernels::cpu::kv::KvGeometry;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::common::{ModelArgs, init_threads, model_label, resolve_threads};
use crate::report::{Context, Report, Row};
use crate::rng::{Rng, seed_of};
use crate::swap::{
    bench_dir, fs_name, in_memory_fs, manifest, parse_targets, random_adapter, targets_label,
};

/// Requests per measurement unless `--requests` says otherwise: twice the largest N, at least
/// 4 × batch, at most this. Round-robin over N > pool adapters misses on every request whatever
/// N is (LRU over a cycle longer than the pool), so the steady state is reached long before every
/// adapter is touched; the cap keeps each measurement near a minute on 2 cores.
const DEFAULT_REQUESTS_CAP: usize = 512;

#[derive(Args, Debug)]
pub struct AdaptersArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Distinct adapters the requests go round-robin over; one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000,2000")]
    pub distinct: Vec<usize>,
    /// At most this many adapters resident at once (the pool's `max_adapters`).
    #[arg(long, default_value_t = 32)]
    pub pool_adapters: usize,
    /// LoRA rank of the adapters.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Adapted projections: `all`, or a comma list of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    /// Sequences decoded together (the scheduler's `max_running`).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Requests in flight (closed loop; default: --batch).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Requests per measurement, the same for every N and the base (default: 2 × the largest N,
    /// at least 4 × batch, at most 512).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 16)]
    pub prompt: usize,
    /// Rows per forward step, prefill chunks included (the server's default).
    #[arg(long, default_value_t = 512)]
    pub max_step_tokens: usize,
    /// Seconds each configuration runs before the next takes its turn: all of them are served
    /// side by side in turns, so that the machine's ups and downs fall on all alike.
    #[arg(long, default_value_t = 2.0)]
    pub slice_secs: f64,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Folder of the packs (default: under the edgelora cache folder, named by the model's
    /// fingerprint, rank and targets; reused when complete).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// The id of adapter `i`.
fn adapter_id(i: usize) -> String {
    format!("a{i:05}")
}

/// Makes sure `dir` holds packs `a00000 .. a{n-1}` of `config`'s shape. The `complete` marker
/// records how many were written in full; missing ones are written (two at a time per core),
/// then the marker is updated.
fn ensure_packs(
    dir: &Path,
    config: &ModelConfig,
    rank: usize,
    targets: &[Proj],
    n: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let marker = dir.join("complete");
    let have: usize = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if have >= n {
        eprintln!("reusing {have} packs in {}", dir.display());
        return Ok(());
    }
    let fp = pack::fingerprint(config);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    eprintln!(
        "writing packs {have}..{n} (rank {rank}, {}, f16) into {} on {} threads ...",
        targets_label(targets),
        dir.display(),
        threads
    );
    let next = AtomicUsize::new(have);
    let done = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        let id = adapter_id(i);
                        let ad = random_adapter(config, rank, targets, i as u64, &id);
                        let bytes = pack::encode_pack(&ad, PackDtype::F16, &fp, &manifest(&id))?;
                        // A bench cache: written whole then renamed, no fsync.
                        let tmp = dir.join(format!(".{id}.tmp"));
                        std::fs::write(&tmp, &bytes)
                            .with_context(|| format!("writing {}", tmp.display()))?;
                        std::fs::rename(&tmp, dir.join(format!("{id}.{}", pack::PACK_EXT)))?;
                        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if d.is_multiple_of(250) {
                            eprintln!(
                                "  {d}/{} packs ({:.0}s)",
                                n - have,
                                t0.elapsed().as_secs_f64()
                            );
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().expect("pack writer thread")?;
        }
        Ok(())
    })?;
    std::fs::write(&marker, format!("{n}\n"))?;
    eprintln!(
        "wrote {} packs in {:.1}s",
        n - have,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What one measurement saw.
#[derive(Clone, Debug, Default)]
struct Outcome {
    wall: f64,
    tokens: u64,
    steps: u64,
    /// Seconds inside `Scheduler::step`.
    step_secs: f64,
    /// Seconds the loop waited for adapter loads with nothing to run.
    wait_secs: f64,
    preemptions: u64,
    res: Option<ResidencyStats>,
    reader: String,
}

impl Outcome {
    fn tps(&self) -> f64 {
        self.tokens as f64 / self.wall.max(1e-9)
    }
    fn tokens_per_step(&self) -> f64 {
        self.tokens as f64 / self.steps.max(1) as f64
    }
    fn step_ms(&self) -> f64 {
        self.step_secs * 1e3 / self.steps.max(1) as f64
    }
}

/// What every measurement shares.
struct Workload<'a> {
    model: Arc<Model>,
    opts: ForwardOptions,
    a: &'a AdaptersArgs,
    clients: usize,
    prompts: Vec<Vec<u32>>,
    geom: KvGeometry,
    pages: usize,
}

/// One configuration being served: its own scheduler, KV pool and residency, advanced a time
/// slice at a time.
struct Live<'a> {
    what: String,
    w: &'a Workload<'a>,
    packs: Option<&'a [Arc<PackInfo>]>,
    sched: Scheduler<KvPool>,
    tx: UnboundedSender<Event>,
    rx: UnboundedReceiver<Event>,
    submitted: usize,
    finished: usize,
    out: Outcome,
}

impl<'a> Live<'a> {
    fn new(w: &'a Workload<'a>, packs: Option<&'a [Arc<PackInfo>]>, what: String) -> Result<Self> {
        let a = w.a;
        let pool = KvPool::new(w.geom, a.m.kv, w.pages)?;
        let mut sched = Scheduler::new(
            w.model.clone(),
            Box::new(pool),
            w.opts.clone(),
            Limits {
                max_step_tokens: a.max_step_tokens.max(1),
                max_running: a.batch,
            },
        );
        if packs.is_some() {
            sched.set_residency(ResidencyConfig {
                max_adapters: a.pool_adapters,
                ..ResidencyConfig::default()
            });
        }
        let (tx, rx) = unbounded_channel::<Event>();
        Ok(Self {
            what,
            w,
            packs,
            sched,
            tx,
            rx,
            submitted: 0,
            finished: 0,
            out: Outcome::default(),
        })
    }

    fn done(&self) -> bool {
        self.finished >= self.w.prompts.len()
    }

    /// Queues request `i`. The first wave ramps its lengths from max_tokens / clients up to
    /// max_tokens, so that completions (and with them new requests and their adapter loads)
    /// spread evenly over the steps from the start instead of arriving in lockstep waves.
    fn submit(&mut self) {
        let (a, i, clients) = (self.w.a, self.submitted, self.w.clients);
        let max_tokens = if i < clients {
            ((i + 1) * a.max_tokens).div_ceil(clients).max(1)
        } else {
            a.max_tokens
        };
        self.sched.submit(GenRequest {
            pack: self.packs.map(|p| p[i % p.len()].clone()),
            ..GenRequest::greedy(self.w.prompts[i].clone(), max_tokens, self.tx.clone())
        });
        self.submitted += 1;
    }

    /// Serves for about `slice` (the closed loop: every finished request is replaced while any
    /// are left), then waits for adapter loads under way, so that none completes while another
    /// configuration runs; all of it counts in this configuration's time.
    fn run_slice(&mut self, slice: Duration) -> Result<()> {
        let r = self.w.prompts.len();
        let t0 = Instant::now();
        if self.submitted == 0 {
            while self.submitted < self.w.clients.min(r) {
                self.submit();
            }
        }
        let mut last_token = Instant::now();
        while !self.done() && t0.elapsed() < slice {
            let ts = Instant::now();
            if self.sched.step()? {
                self.out.step_secs += ts.elapsed().as_secs_f64();
            } else {
                self.sched.wait_for_loads(Duration::from_millis(20));
                self.out.wait_secs += ts.elapsed().as_secs_f64();
            }
            let before = self.out.tokens;
            while let Ok(ev) = self.rx.try_recv() {
                match ev {
                    Event::Token(_) => self.out.tokens += 1,
                    Event::Done { .. } => {
                        self.finished += 1;
                        if self.submitted < r {
                            self.submit();
                        }
                    }
                    Event::Error(e) | Event::AdapterFailed(e) => bail!("{}: {e}", self.what),
                    Event::PromptLogprobs(_) => {}
                }
            }
            if self.out.tokens > before {
                last_token = Instant::now();
            } else if last_token.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{}: no token for two minutes ({}/{r} requests done)",
                    self.what,
                    self.finished
                );
            }
        }
        while self.sched.residency().is_some_and(|r| r.loading() > 0) {
            let tw = Instant::now();
            self.sched.wait_for_loads(Duration::from_millis(20));
            self.out.wait_secs += tw.elapsed().as_secs_f64();
            // Applies the finished load (a step admits nothing new when the batch is full).
            if self.sched.step()? {
                self.out.step_secs += tw.elapsed().as_secs_f64();
            }
        }
        self.out.wall += t0.elapsed().as_secs_f64();
        Ok(())
    }

    fn finish(mut self) -> Outcome {
        self.out.steps = self.sched.stats.steps;
        self.out.preemptions = self.sched.stats.preemptions;
        if let Some(res) = self.sched.residency() {
            self.out.res = Some(res.stats.clone());
            let (kind, why) = res.storage();
            self.out.reader = format!("{kind} ({why})");
        }
        self.out
    }
}

/// Serves every configuration to the end in turns of `slice` each (round robin), so that a
/// neighbour's burst on a shared machine slows them all alike instead of one.
fn serve_interleaved(mut lives: Vec<Live<'_>>, slice: Duration) -> Result<Vec<Outcome>> {
    let t0 = Instant::now();
    let mut last_report = Instant::now();
    while lives.iter().any(|l| !l.done()) {
        for l in lives.iter_mut().filter(|l| !l.done()) {
            l.run_slice(slice)?;
        }
        if last_report.elapsed() > Duration::from_secs(20) || lives.iter().all(Live::done) {
            last_report = Instant::now();
            let parts: Vec<String> = lives
                .iter()
                .map(|l| {
                    format!(
                        "{} {}/{} ({:.0} tok/s)",
                        l.what,
                        l.finished,
                        l.w.prompts.len(),
                        l.out.tps()
                    )
                })
                .collect();
            eprintln!("  {:.0}s: {}", t0.elapsed().as_secs_f64(), parts.join(", "));
        }
    }
    Ok(lives.into_iter().map(Live::finish).collect())
}

pub fn run(a: AdaptersArgs) -> Result<()> {
    let mut distinct = a.distinct.clone();
    distinct.retain(|&n| n > 0);
    if distinct.is_empty() || a.batch == 0 || a.max_tokens == 0 || a.rank == 0 {
        bail!("--distinct, --batch, --max-tokens and --rank must be at least 1");
    }
    let threads = resolve_threads(a.threads);
    init_threads(threads);
    let targets = parse_targets(&a.targets)?;
    let l = a.m.load()?;
    let model = Arc::new(l.model);
    let config = model.config.clone();
    let fp = pack::fingerprint(&config);
    let max_n = distinct.iter().copied().max().unwrap_or(1);
    let tlabel = targets_label(&targets);
    let dir = a.dir.clone().unwrap_or_else(|| {
        bench_dir("bench-adapters").join(format!(
            "{}-r{}-{}-f16",
            pack::fingerprint_short(&fp),
            a.rank,
            tlabel.replace(',', "-")
        ))
    });
    let fs = fs_name(&dir);
    if in_memory_fs(&fs) {
        eprintln!(
            "warning: {} is on {fs}: adapter loads come from memory, not a device",
            dir.display()
        );
    }
    ensure_packs(&dir, &config, a.rank, &targets, max_n)?;
    let t0 = Instant::now();
    let reg = Registry::open(&dir, fp)?;
    let mut packs = Vec::with_capacity(max_n);
    for i in 0..max_n {
        let id = adapter_id(i);
        let e = reg
            .get(&id)
            .with_context(|| format!("{id} missing from {}", dir.display()))?;
        match (&e.state, &e.info) {
            (EntryState::Available, Some(info)) => packs.push(Arc::new(info.clone())),
            (s, _) => bail!(
                "{id} in {} is unusable ({s:?}); delete the folder to rewrite it",
                dir.display()
            ),
        }
    }
    eprintln!(
        "indexed {} packs in {:.2}s",
        reg.len(),
        t0.elapsed().as_secs_f64()
    );
    drop(reg);
    let pack_mb = packs[0].file_len as f64 / 1e6;

    // KV for `batch` sequences of prompt + max_tokens (+1 page each), and the pool's adapters.
    let geom = config.kv_geometry(a.m.page_size.max(1));
    let page_bytes = KvPool::new(geom, a.m.kv, 1)?.page_bytes();
    let kv_pages = a.batch * ((a.prompt + a.max_tokens + 1).div_ceil(geom.page_size) + 1);
    let per_adapter = pages_for(&packs[0], page_bytes);
    let pages = kv_pages + a.pool_adapters.max(1) * per_adapter;
    let clients = a.clients.unwrap_or(a.batch).max(1);
    let r = a
        .requests
        .unwrap_or_else(|| (2 * max_n).clamp(4 * a.batch, DEFAULT_REQUESTS_CAP.max(4 * a.batch)))
        .max(1);
    let r_note = if a.requests.is_some() {
        format!("{r} requests (--requests)")
    } else {
        format!("{r} requests (2 x largest N, at least 4 x batch, at most {DEFAULT_REQUESTS_CAP})")
    };
    // The same prompts for every measurement.
    let vocab = config.vocab_size.max(2) as u64;
    let prompts: Vec<Vec<u32>> = (0..r)
        .map(|i| {
            let mut g = Rng::new(seed_of(&[0xAD, i as u64]));
            (0..a.prompt.max(1))
                .map(|_| (1 + g.next_u64() % (vocab - 1)) as u32)
                .collect()
        })
        .collect();
    let w = Workload {
        model: model.clone(),
        opts: l.opts.clone(),
        a: &a,
        clients,
        prompts,
        geom,
        pages,
    };
    eprintln!(
        "{r_note}; each {} prompt + {} generated tokens; pool: {pages} pages of {:.2} MB ({kv_pages} \
         for KV, {per_adapter} per adapter)",
        a.prompt.max(1),
        a.max_tokens,
        page_bytes as f64 / 1e6
    );

    let mut lives = vec![Live::new(&w, None, "no adapter".into())?];
    for &n in &distinct {
        lives.push(Live::new(&w, Some(&packs[..n]), format!("N={n}"))?);
    }
    eprintln!(
        "serving {} configurations in turns of {:.1}s each ...",
        lives.len(),
        a.slice_secs
    );
    let mut outs = serve_interleaved(lives, Duration::from_secs_f64(a.slice_secs.max(0.1)))?;
    let per_n: Vec<(usize, Outcome)> = distinct.iter().copied().zip(outs.split_off(1)).collect();
    let base = outs.pop().expect("the base measurement");
    for (what, o) in std::iter::once(("no adapter".to_string(), &base))
        .chain(per_n.iter().map(|(n, o)| (format!("N={n}"), o)))
    {
        eprintln!(
            "  {what}: {:.1} tok/s over {:.1}s ({} steps, {:.1} ms/step, {:.1} tokens/step)",
            o.tps(),
            o.wall,
            o.steps,
            o.step_ms(),
            o.tokens_per_step()
        );
    }
    let one = per_n.iter().find(|(n, _)| *n == 1).map(|(_, o)| o.clone());

    let mut report = Report::new(
        a.json,
        Context {
            threads,
            batch: Some(a.batch),
            model: Some(model_label(&l.path)),
        },
    );
    let reader = per_n
        .first()
        .map(|(_, o)| o.reader.clone())
        .unwrap_or_default();
    report.push(
        Row::new("adapters", "tokens/s, no adapter", base.tps(), "tok/s").note(format!(
            "{r_note}, request i on adapter i % N; {clients} in flight (closed loop, the first \
             {clients} ramping max_tokens up so completions do not come in waves), batch {}, \
             {} prompt + {} generated tokens each (greedy, no stop); act {:?}, kv {}; \
             max_step_tokens {}; configurations served in turns of {:.1}s; {:.1} ms/step, \
             {:.1} tokens/step",
            a.batch,
            a.prompt.max(1),
            a.max_tokens,
            l.opts.act,
            a.m.kv,
            a.max_step_tokens,
            a.slice_secs,
            base.step_ms(),
            base.tokens_per_step()
        )),
    );
    let last = per_n.last().map(|(n, _)| *n);
    for (n, o) in &per_n {
        let res = o.res.clone().unwrap_or_default();
        let label = format!("tokens/s, N={n}");
        let mut note = format!(
            "{} loads ({:.0} MB read, {:.2} ms each, loader busy {:.1}s of {:.1}s), {} evictions, \
             {} hits / {} misses, engine idle waiting for loads {:.2}s, {} preemptions",
            res.loads,
            res.bytes_read as f64 / 1e6,
            res.load_secs * 1e3 / res.loads.max(1) as f64,
            res.load_secs,
            o.wall,
            res.evictions,
            res.hits,
            res.misses,
            o.wait_secs,
            o.preemptions
        );
        if Some(*n) == last && *n > 1 {
            note += "; the issue's target at N=2000: >= 0.95 of N=1 (S-LoRA: 0.945)";
        }
        match &one {
            Some(one) if *n != 1 => {
                report.push(
                    Row::new("adapters", label.clone(), o.tps(), "tok/s")
                        .vs("N=1, same run", one.tps())
                        .note(note),
                );
                report.push(
                    Row::new("adapters", label, o.tps(), "tok/s").vs("no adapter", base.tps()),
                );
            }
            _ => report.push(
                Row::new("adapters", label, o.tps(), "tok/s")
                    .vs("no adapter", base.tps())
                    .note(note),
            ),
        }
        report.push(
            Row::new(
                "adapters",
                format!("tokens per step, N={n}"),
                o.tokens_per_step(),
                "tok",
            )
            .vs("batch", a.batch as f64),
        );
        let step_row = Row::new("adapters", format!("step time, N={n}"), o.step_ms(), "ms");
        report.push(match &one {
            Some(one) if *n != 1 => step_row.vs("N=1", one.step_ms()),
            _ => step_row.vs("no adapter", base.step_ms()),
        });
    }
    report.push(
        Row::new("adapters", "pack size", pack_mb, "MB").note(format!(
            "{max_n} adapters, rank {}, {tlabel}, f16, in {} ({fs}); pool of {} adapters \
             ({per_adapter} pages each); loads stream with {reader}",
            a.rank,
            dir.display(),
            a.pool_adapters
        )),
    );
    report.print();
    Ok(())
}
