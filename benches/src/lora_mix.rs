//! `lora-mix`: the projections of one decode step (every layer's q/k/v, o, gate/up and down, as
//! the engine groups them) at batch B with no adapter, one shared adapter and B distinct rank-R
//! adapters on every projection, alternated step by step; the median step time of each beside the
//! no-adapter one. Decode's `--adapters` measures the whole step; this isolates what the adapters
//! add to the products and varies less from run to run on a shared machine.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use edgelora_kernels::cpu::act::ActQ8;
use edgelora_kernels::cpu::lora::{AdapterBits, LoraA, LoraB, LoraSegmentQ8};
use edgelora_kernels::cpu::matmul::{ProjQ8, project_q8};
use edgelora_kernels::cpu::mem;
use edgelora_kernels::cpu::qdot::best_isa;
use edgelora_kernels::{Q4Matrix, Weight};

use crate::common::{init_threads, resolve_threads};
use crate::report::{Context, Report, Row};
use crate::rng::Rng;
use crate::synth::{Shape, proj_dims};

#[derive(Args, Debug)]
pub struct LoraMixArgs {
    #[arg(long, value_enum, default_value = "smollm2")]
    pub shape: Shape,
    /// Rows (sequences) per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Rank of the random adapters.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Timed steps of each configuration (the median is kept).
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The adapters' integer form: 8 (the default) or 4 bits.
    #[arg(long, default_value = "8")]
    pub adapter_bits: AdapterBits,
    #[arg(long)]
    pub json: bool,
}

struct Lora {
    a: LoraA,
    b: LoraB,
}

/// One projection group: its input width and its weights, with `batch` adapters for each.
struct Group {
    cols: usize,
    weights: Vec<Weight>,
    adapters: Vec<Vec<Lora>>,
}

fn random(rng: &mut Rng, n: usize, a: f32) -> Vec<f32> {
    (0..n).map(|_| rng.symmetric(a)).collect()
}

pub fn run(a: LoraMixArgs) -> Result<()> {
    if a.batch == 0 || a.rank == 0 || a.steps == 0 {
        bail!("--batch, --rank and --steps must be at least 1");
    }
    let threads = resolve_threads(a.threads);
    init_threads(threads);
    let (d, layers, kv, f) = proj_dims(a.shape);
    let (m, rank) = (a.batch, a.rank);
    eprintln!(
        "building {layers} layers of {:?} projections with {m} rank-{rank} adapters each ...",
        a.shape
    );
    let mut rng = Rng::new(7);
    let shapes: [(usize, Vec<usize>); 4] = [
        (d, vec![d, kv, kv]),
        (d, vec![d]),
        (d, vec![f, f]),
        (f, vec![d]),
    ];
    let mut groups = Vec::new();
    for _ in 0..layers {
        for (cols, outs) in &shapes {
            let mut g = Group {
                cols: *cols,
                weights: Vec::new(),
                adapters: Vec::new(),
            };
            for &rows in outs {
                let w = random(&mut rng, rows * cols, 0.05);
                g.weights
                    .push(Weight::Q4(Q4Matrix::quantize(&w, rows, *cols, 32)?));
                let per = (0..m)
                    .map(|_| -> Result<Lora> {
                        Ok(Lora {
                            a: LoraA::quantize(
                                &random(&mut rng, rank * cols, 0.05),
                                rank,
                                *cols,
                                a.adapter_bits,
                            )?,
                            b: LoraB::quantize_bits(
                                &random(&mut rng, rows * rank, 0.05),
                                rows,
                                rank,
                                a.adapter_bits,
                            )?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                g.adapters.push(per);
            }
            groups.push(g);
        }
    }
    // As the engine keeps them: the base weights in one huge-page region, each adapter in its own.
    let mut regions = Vec::new();
    regions.extend(mem::pack(|f| {
        for g in groups.iter_mut() {
            g.weights.iter_mut().for_each(|w| w.stores(f));
        }
    }));
    for r in 0..m {
        regions.extend(mem::pack(|f| {
            for g in groups.iter_mut() {
                for per in g.adapters.iter_mut() {
                    per[r].a.stores(f);
                    per[r].b.stores(f);
                }
            }
        }));
    }
    let huge = mem::huge_bytes(regions.iter().map(|r| &**r));
    eprintln!(
        "{} regions, {:.1} MB, {:.1} MB of it on huge pages",
        regions.len(),
        regions.iter().map(|r| r.len()).sum::<usize>() as f64 / 1e6,
        huge.unwrap_or(0) as f64 / 1e6
    );
    let xs: Vec<ActQ8> = [d, f]
        .iter()
        .map(|&c| ActQ8::quantize(&random(&mut rng, m * c, 1.0), m, c))
        .collect();
    let isa = best_isa();
    let mut outs = vec![vec![0f32; m * d.max(f)]; 3];
    // 0: no adapter; 1: every row the first adapter (one segment); 2: a distinct adapter per row;
    // 3: the first adapter as one segment per row (the distinct case's work, its bytes cached).
    let mut step = |mode: usize| {
        let t = Instant::now();
        for g in &groups {
            let x = if g.cols == d { &xs[0] } else { &xs[1] };
            let segs: Vec<Vec<LoraSegmentQ8>> = g
                .adapters
                .iter()
                .map(|per| match mode {
                    0 => Vec::new(),
                    1 => vec![LoraSegmentQ8 {
                        rows: 0..m,
                        a: &per[0].a,
                        b: &per[0].b,
                        scaling: 0.5,
                    }],
                    _ => per
                        .iter()
                        .enumerate()
                        .map(|(r, l)| if mode == 3 { (r, &per[0]) } else { (r, l) })
                        .map(|(r, l)| LoraSegmentQ8 {
                            rows: r..r + 1,
                            a: &l.a,
                            b: &l.b,
                            scaling: 0.5,
                        })
                        .collect(),
                })
                .collect();
            let mut jobs: Vec<ProjQ8> = g
                .weights
                .iter()
                .zip(outs.iter_mut())
                .zip(&segs)
                .map(|((w, o), s)| ProjQ8 {
                    weight: Some(w),
                    out: &mut o[..m * w.rows()],
                    out_dim: w.rows(),
                    lora: s,
                })
                .collect();
            project_q8(&mut jobs, x, isa);
        }
        t.elapsed().as_secs_f64()
    };
    for mode in [0, 1, 2, 3, 0, 1, 2, 3] {
        step(mode); // warm-up
    }
    let mut times = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..a.steps {
        for (mode, v) in times.iter_mut().enumerate() {
            v.push(step(mode));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    let [t0, t1, t2, t3] = times.map(|mut v| median(&mut v));
    let per_adapter: usize = groups
        .iter()
        .flat_map(|g| &g.adapters)
        .map(|per| per[0].a.nbytes() + per[0].b.nbytes())
        .sum();
    let mut report = Report::new(
        a.json,
        Context {
            threads,
            batch: Some(m),
            model: Some(format!("{:?} projections (random INT4)", a.shape)),
        },
    );
    report.push(
        Row::new("lora-mix", "projections per step (no adapter)", t0, "ms").note(format!(
            "median of {} steps each, the four configurations alternated step by step",
            a.steps
        )),
    );
    report.push(
        Row::new(
            "lora-mix",
            "projections per step (1 shared adapter)",
            t1,
            "ms",
        )
        .vs("no adapter", t0),
    );
    report.push(
        Row::new(
            "lora-mix",
            format!("projections per step ({m} distinct adapters)"),
            t2,
            "ms",
        )
        .vs("no adapter", t0)
        .note(format!(
            "each adapter {:.2} MB (rank {rank}, all 7 projections, int{} A and B); {:.1} MB more per step",
            per_adapter as f64 / 1e6,
            a.adapter_bits,
            (m * per_adapter) as f64 / 1e6
        )),
    );
    report.push(
        Row::new(
            "lora-mix",
            format!("time added by {m} distinct adapters"),
            t2 - t0,
            "ms",
        )
        .vs("added by 1 shared adapter", t1 - t0),
    );
    report.push(
        Row::new(
            "lora-mix",
            format!("time added by {m} one-row segments of 1 adapter"),
            t3 - t0,
            "ms",
        )
        .vs(format!("added by {m} distinct adapters"), t2 - t0)
        .note("the distinct case's tasks with its bytes in cache: what the bytes cost is the rest"),
    );
    report.print();
    Ok(())
}
