//! Prefill throughput and its compute rate against the INT4 × int8 GEMM peak of our own kernel,
//! measured in the same run (`gemm-peak`).

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use edgelora_daemon::engine::{SeqKv, SeqStep, forward};
use edgelora_daemon::model::Model;
use edgelora_kernels::cpu::act::ActQ8;
use edgelora_kernels::cpu::qdot::{Isa, available_isas, best_isa};
use edgelora_kernels::{BlockQ4, BlockQ8, Q4Kind, Q4Matrix, Q8Matrix, Weight};
use half::f16;

use crate::common::{
    ModelArgs, init_threads, model_label, projection_macs, resolve_threads, text_tokens,
};
use crate::llamacpp::{self, LlamaCpp};
use crate::report::{Context, Report, Row};
use crate::rng::Rng;

#[derive(Args, Debug)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Prompt tokens, all in one forward.
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed forwards (best kept); alternated with llama.cpp's.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Also measure llama.cpp (llama-cpp-python) on the same GGUF with the same threads.
    #[arg(long)]
    pub vs_llamacpp: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GemmPeakArgs {
    /// Weight rows (output features); the weight should stay in L2.
    #[arg(long, default_value_t = 256)]
    pub rows: usize,
    /// Weight columns (input features).
    #[arg(long, default_value_t = 2048)]
    pub cols: usize,
    /// Activation rows.
    #[arg(long, default_value_t = 64)]
    pub m: usize,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds of measurement per instruction-set path.
    #[arg(long, default_value_t = 1.0)]
    pub secs: f64,
    /// Block kind: affine (GGUF Q4_1-like), zero-point (our quantizer, GPTQ, Q4_0), or q8_0 (the
    /// 8-bit path of output heads and Q8_0 tensors).
    #[arg(long, default_value = "affine")]
    pub kind: String,
    #[arg(long)]
    pub json: bool,
}

/// A random INT4 matrix of the given block kind.
pub fn random_q4(rows: usize, cols: usize, kind: Q4Kind, seed: u64) -> Q4Matrix {
    let mut g = Rng::new(seed);
    let n = rows * Q4Matrix::blocks_per_row_for(cols);
    let blocks = (0..n)
        .map(|_| {
            let mut b = BlockQ4 {
                d: f16::from_f32(0.001 + g.uniform() * 0.01).to_bits(),
                m: match kind {
                    Q4Kind::ZeroPoint => (g.next_u64() % 16) as u16,
                    Q4Kind::Affine => f16::from_f32(g.symmetric(0.05)).to_bits(),
                },
                qs: [0; 16],
            };
            for q in &mut b.qs {
                *q = g.next_u64() as u8;
            }
            b
        })
        .collect();
    Q4Matrix::from_blocks(rows, cols, kind, blocks).expect("consistent shape")
}

/// GOP/s (2 ops per multiply-add) of `Weight::matmul_q8` on `isa`: the best of repeated batches of
/// calls over about `secs` seconds, after a warm-up.
pub fn gemm_gops(w: &Weight, x: &ActQ8, isa: Isa, secs: f64) -> f64 {
    let mut out = vec![0f32; x.rows() * w.rows()];
    let ops = 2.0 * (w.rows() * w.cols() * x.rows()) as f64;
    // Warm-up and calibration: calls per batch so that a batch takes about 50 ms.
    let t0 = Instant::now();
    w.matmul_q8(x, isa, &mut out);
    let one = t0.elapsed().as_secs_f64().max(1e-7);
    let per_batch = ((0.05 / one) as usize).clamp(1, 100_000);
    let mut best = 0f64;
    let start = Instant::now();
    loop {
        let t = Instant::now();
        for _ in 0..per_batch {
            w.matmul_q8(x, isa, &mut out);
        }
        let rate = ops * per_batch as f64 / t.elapsed().as_secs_f64();
        best = best.max(rate);
        if start.elapsed().as_secs_f64() >= secs {
            break;
        }
    }
    std::hint::black_box(&out);
    best / 1e9
}

/// The GEMM peak on every path (or only the default one): `(isa, GOP/s)`.
pub fn gemm_peak(
    rows: usize,
    cols: usize,
    m: usize,
    kind: Q4Kind,
    secs: f64,
    all_isas: bool,
) -> Vec<(Isa, f64)> {
    gemm_peak_of(
        &Weight::Q4(random_q4(rows, cols, kind, 7)),
        m,
        secs,
        all_isas,
    )
}

/// A random Q8_0 matrix (the 8-bit path: output heads, Q8_0 tensors).
pub fn random_q8(rows: usize, cols: usize, seed: u64) -> Q8Matrix {
    let mut g = Rng::new(seed);
    let blocks = (0..rows * cols.div_ceil(32))
        .map(|_| BlockQ8 {
            d: f16::from_f32(g.uniform() * 0.01 + 1e-3).to_bits(),
            qs: std::array::from_fn(|_| ((g.next_u64() % 255) as i32 - 127) as i8),
        })
        .collect();
    Q8Matrix::from_blocks(rows, cols, blocks).expect("consistent shape")
}

/// [`gemm_peak`] of a given weight.
pub fn gemm_peak_of(w: &Weight, m: usize, secs: f64, all_isas: bool) -> Vec<(Isa, f64)> {
    let (rows, cols) = (w.rows(), w.cols());
    let mut g = Rng::new(3);
    let x: Vec<f32> = (0..m * cols).map(|_| g.symmetric(1.0)).collect();
    let xq = ActQ8::quantize(&x, m, cols);
    let isas = if all_isas {
        available_isas()
    } else {
        vec![best_isa()]
    };
    isas.into_iter()
        .map(|isa| {
            eprintln!("gemm-peak: {} [{rows}x{cols}] x {m} rows ...", isa.name());
            (isa, gemm_gops(w, &xq, isa, secs))
        })
        .collect()
}

/// The INT4 block kind of a model's projections (affine when they are not INT4).
pub fn model_kind(model: &Model) -> Q4Kind {
    match &model.weights.layers[0].proj[0].weight {
        Weight::Q4(q) => q.kind(),
        _ => Q4Kind::Affine,
    }
}

fn parse_kind(s: &str) -> Result<Q4Kind> {
    match s {
        "affine" | "q4_1" => Ok(Q4Kind::Affine),
        "zero-point" | "zeropoint" | "q4_0" => Ok(Q4Kind::ZeroPoint),
        other => bail!("unknown block kind {other:?} (affine or zero-point)"),
    }
}

pub fn run_gemm_peak(a: GemmPeakArgs) -> Result<()> {
    let threads = resolve_threads(a.threads);
    init_threads(threads);
    let q8 = a.kind == "q8_0";
    let kind = if q8 {
        Q4Kind::Affine
    } else {
        parse_kind(&a.kind)?
    };
    let mut report = Report::new(
        a.json,
        Context {
            threads,
            batch: Some(a.m),
            model: None,
        },
    );
    let bpr = Q4Matrix::blocks_per_row_for(a.cols);
    let (wbytes, res, name) = if q8 {
        let w = Weight::Q8(random_q8(a.rows, a.cols, 7));
        (
            a.rows * bpr * 34,
            gemm_peak_of(&w, a.m, a.secs, true),
            "int8 x int8",
        )
    } else {
        let res = gemm_peak(a.rows, a.cols, a.m, kind, a.secs, true);
        (a.rows * bpr * 20, res, "int4 x int8")
    };
    let best = best_isa();
    let best_gops = res
        .iter()
        .find(|(i, _)| *i == best)
        .map_or(0.0, |&(_, g)| g);
    for (isa, gops) in res {
        let mut row = Row::new(
            "gemm-peak",
            format!("{name} ({})", isa.name()),
            gops,
            "GOP/s",
        );
        if isa == best {
            row = row.note(format!(
                "default path; weight [{}x{}] {} ({} KiB, stays in L2) x {} activation rows",
                a.rows,
                a.cols,
                if q8 {
                    "Q8_0".to_string()
                } else {
                    format!("{kind:?}")
                },
                wbytes >> 10,
                a.m
            ));
        } else {
            row = row.vs(format!("{} (default)", best.name()), best_gops);
        }
        report.push(row);
    }
    report.print();
    Ok(())
}

pub fn run(a: PrefillArgs) -> Result<()> {
    if a.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let threads = resolve_threads(a.threads);
    init_threads(threads);
    let l = a.m.load()?;
    let model = &l.model;
    let c = &model.config;
    let llama = LlamaCpp::for_model(a.vs_llamacpp, model)?;
    let mut report = Report::new(
        a.json,
        Context {
            threads,
            batch: Some(1),
            model: Some(model_label(&l.path)),
        },
    );

    // The peak on the block kind this model's projections use.
    let kind = model_kind(model);
    let peak_before = gemm_peak(256, 2048, 64, kind, 0.5, false)[0].1;

    let tokens = text_tokens(model, a.tokens)?;
    let mut pool = a.m.pool(model, 1, a.tokens)?;
    let mut once = || -> Result<f64> {
        let mut kv = SeqKv::new();
        let mut steps = [SeqStep {
            tokens: &tokens,
            kv: &mut kv,
            adapter: None,
            all_logits: false,
        }];
        let t0 = Instant::now();
        let r = forward(model, &mut pool, &mut steps, &l.opts);
        let secs = t0.elapsed().as_secs_f64();
        kv.release(&mut pool);
        r?;
        Ok(secs)
    };
    eprintln!("prefill: warm-up forward of {} tokens ...", a.tokens);
    once()?;
    let mut best = f64::INFINITY;
    let mut theirs: Option<llamacpp::Speed> = None;
    let mut info = String::new();
    for _ in 0..a.rounds.max(1) {
        eprintln!("prefill: {} tokens ...", a.tokens);
        best = best.min(once()?);
        if let Some(lc) = &llama {
            eprintln!("prefill: llama.cpp, {} tokens ...", a.tokens);
            let m = lc.measure(&llamacpp::Request {
                model: &l.path,
                threads,
                n_ctx: (a.tokens + 64).next_multiple_of(256),
                decode: None,
                prefill: Some(&tokens),
            })?;
            info = format!("llama-cpp-python {}: {}", m.version, m.system_info);
            if let Some(s) = m.prefill
                && theirs.is_none_or(|t| s.tps > t.tps)
            {
                theirs = Some(s);
            }
        }
    }
    // Measured again after the runs and the best kept (a neighbour's burst must not flatter us).
    let peak = peak_before.max(gemm_peak(256, 2048, 64, kind, 0.5, false)[0].1);
    let n = a.tokens;
    let tps = n as f64 / best;
    // Multiply-adds: every projection for every token, the output head for the last row, and
    // causal attention (QK^T and PV: n_heads * head_dim per visible key, sum over 1..=n keys).
    let proj = projection_macs(c) * n;
    let head = c.vocab_size * c.hidden_size;
    let attn = c.n_layers * 2 * c.n_heads * c.head_dim * n * (n + 1) / 2;
    let gflops = 2.0 * (proj + head + attn) as f64 / best / 1e9;

    let mut row = Row::new("prefill", "tokens/s", tps, "tok/s").note(format!(
        "one forward of {n} tokens, act {:?}, best of {}",
        l.opts.act,
        a.rounds.max(1)
    ));
    if let Some(t) = theirs {
        row = row.vs("llama.cpp", t.tps);
    }
    report.push(row);
    report.push(
        Row::new("prefill", "GFLOP/s", gflops, "GFLOP/s")
            .vs(format!("gemm-peak ({})", best_isa().name()), peak)
            .note(format!(
                "2 x (projections {:.2} G + head {:.3} G + attention {:.3} G) multiply-adds; \
                 peak: int4 [256x2048] {kind:?} x 64 rows, best of before and after",
                proj as f64 / 1e9,
                head as f64 / 1e9,
                attn as f64 / 1e9
            )),
    );
    if let Some(t) = theirs {
        report.push(
            Row::new("prefill", "llama.cpp tokens/s", t.tps, "tok/s").note(format!(
                "llama_perf_context timers; wall clock {:.1} tok/s; {info}",
                t.wall_tps
            )),
        );
    }
    report.print();
    Ok(())
}
