//! Decode throughput against the memory-bandwidth bound measured in the same run.
//!
//! B sequences are prefilled with a short prompt, then every step calls `forward` once with B
//! one-token `SeqStep`s and picks each next token by argmax. A step reads every weight once
//! (whatever B is), so the bound is `B * membw / bytes_per_step`.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use edgelora_daemon::adapters::LoraAdapter;
use edgelora_daemon::engine::forward::ActMode;
use edgelora_daemon::engine::sampler::argmax;
use edgelora_daemon::engine::{ForwardOptions, KvPool, SeqKv, SeqStep, forward};
use edgelora_daemon::model::Model;
use edgelora_kernels::cpu::lora::AdapterBits;
use edgelora_kernels::cpu::phases::{self, Phase};
use edgelora_kernels::cpu::qdot::best_isa;

use crate::common::{
    ModelArgs, adapter_bytes, adapter_macs, init_threads, model_label, projection_macs,
    resolve_threads, synth_adapter, text_tokens,
};
use crate::llamacpp::{self, LlamaCpp};
use crate::membw;
use crate::prefill;
use crate::report::{Context, Report, Row};
use crate::swap::median;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Sequences decoded together (one token each per step).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Compute threads (default: every core); the all-thread bandwidth uses as many.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Random LoRA adapters: compares no adapter, one shared adapter and K distinct adapters.
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Rank of the random adapters.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// The adapters' integer form on the int8 path: 8 (the default) or 4 bits.
    #[arg(long, default_value = "8")]
    pub adapter_bits: AdapterBits,
    /// Prompt tokens prefilled per sequence before decoding.
    #[arg(long, default_value_t = 16)]
    pub prompt: usize,
    /// Untimed decode steps after the prompt.
    #[arg(long, default_value_t = 4)]
    pub warmup: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Measurements of each configuration (best kept); alternated with llama.cpp's.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// With --adapters: decode the configurations side by side, one step of each in turn, and
    /// report each one's median step (ratios per step pair), in place of whole rounds.
    #[arg(long)]
    pub interleave: bool,
    /// With --interleave: also time each configuration's phases (projection regions, their base
    /// products, the adapter units' thread time, attention) and print their medians per step.
    #[arg(long)]
    pub phases: bool,
    /// Also measure llama.cpp (llama-cpp-python) on the same GGUF with the same threads.
    #[arg(long)]
    pub vs_llamacpp: bool,
    /// With --batch B > 1: also decode one sequence, alternating with the batch in each round, and
    /// report the batch's tokens/s against it.
    #[arg(long)]
    pub vs_batch1: bool,
    /// Bandwidth buffer size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub membw_mib: usize,
    /// Bandwidth measurements (best kept).
    #[arg(long, default_value_t = 3)]
    pub membw_reps: usize,
    #[arg(long)]
    pub json: bool,
}

/// A timed step: its seconds and its phases' nanoseconds ([`phases::take`]).
type StepTime = (f64, [u64; phases::PHASES]);

/// One step of every sequence; returns each sequence's next token.
fn step(
    model: &Model,
    pool: &mut KvPool,
    kvs: &mut [SeqKv],
    adapters: &[Option<&LoraAdapter>],
    tokens: &[Vec<u32>],
    opts: &ForwardOptions,
) -> Result<Vec<u32>> {
    let mut steps: Vec<SeqStep<'_>> = kvs
        .iter_mut()
        .zip(tokens)
        .zip(adapters)
        .map(|((kv, t), a)| SeqStep {
            tokens: t,
            kv,
            adapter: *a,
            all_logits: false,
        })
        .collect();
    let logits = forward(model, pool, &mut steps, opts)?;
    Ok(logits.iter().map(|l| argmax(l)).collect())
}

/// Prefills one prompt per sequence, then times `steps` decode steps; returns tokens/s.
pub fn run_once(
    model: &Model,
    pool: &mut KvPool,
    adapters: &[Option<&LoraAdapter>],
    prompt_len: usize,
    warmup: usize,
    steps: usize,
    opts: &ForwardOptions,
) -> Result<f64> {
    let timed = run_interleaved(model, pool, &[adapters], prompt_len, warmup, steps, opts)?;
    Ok((adapters.len() * steps) as f64 / timed[0].iter().map(|t| t.0).sum::<f64>())
}

/// Prefills one prompt per sequence of each configuration (batches of the same size), then
/// decodes them side by side, a step of each in turn, and returns every timed step's seconds per
/// configuration: on a machine whose speed drifts within seconds, each configuration's step is
/// measured next to the others' (`--interleave`). With the phase accounting on
/// ([`phases::set_enabled`]), each step's phases are there too.
#[allow(clippy::too_many_arguments)]
fn run_interleaved(
    model: &Model,
    pool: &mut KvPool,
    configs: &[&[Option<&LoraAdapter>]],
    prompt_len: usize,
    warmup: usize,
    steps: usize,
    opts: &ForwardOptions,
) -> Result<Vec<Vec<StepTime>>> {
    let b = configs.first().map_or(0, |c| c.len());
    let base = text_tokens(model, prompt_len.max(1) + b)?;
    // Each sequence starts at a different offset of the text, so they do not decode in lockstep.
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|i| base[i..i + prompt_len.max(1)].to_vec())
        .collect();
    let mut kvs: Vec<Vec<SeqKv>> = configs
        .iter()
        .map(|c| (0..c.len()).map(|_| SeqKv::new()).collect())
        .collect();
    let result = (|| {
        let one = |next: &[u32]| next.iter().map(|&t| vec![t]).collect::<Vec<_>>();
        let mut next = Vec::with_capacity(configs.len());
        for (ci, c) in configs.iter().enumerate() {
            next.push(step(model, pool, &mut kvs[ci], c, &prompts, opts)?);
        }
        let mut timed = vec![Vec::with_capacity(steps); configs.len()];
        for s in 0..warmup + steps {
            for (ci, c) in configs.iter().enumerate() {
                phases::take();
                let t0 = Instant::now();
                next[ci] = step(model, pool, &mut kvs[ci], c, &one(&next[ci]), opts)?;
                if s >= warmup {
                    timed[ci].push((t0.elapsed().as_secs_f64(), phases::take()));
                }
            }
        }
        Ok(timed)
    })();
    for kv in kvs.iter_mut().flatten() {
        kv.release(pool);
    }
    result
}

/// `--phases`: each configuration's median step and the median of each phase per step, beside the
/// first configuration's.
fn phase_rows(report: &mut Report, names: &[&str], timed: &[Vec<StepTime>]) {
    let med = |c: &[StepTime], f: &dyn Fn(&StepTime) -> f64| {
        median(&c.iter().map(f).collect::<Vec<_>>()) * 1e3
    };
    let parts: [(&str, Option<Phase>); 5] = [
        ("step", None),
        ("projection regions", Some(Phase::Regions)),
        ("  their base products", Some(Phase::BaseProducts)),
        ("  adapter units (thread time)", Some(Phase::AdapterUnits)),
        ("attention", Some(Phase::Attention)),
    ];
    for (label, phase) in parts {
        let f = |t: &StepTime| match phase {
            None => t.0,
            Some(p) => t.1[p as usize] as f64 * 1e-9,
        };
        let base = med(&timed[0], &f);
        for (ci, c) in timed.iter().enumerate() {
            let mut row = Row::new(
                "decode",
                format!("{label}, {}", names[ci]),
                med(c, &f),
                "ms",
            );
            if ci > 0 && base > 0.0 {
                row = row.vs(names[0], base);
            }
            if ci == 0 && phase == Some(Phase::Regions) {
                row = row.note(
                    "medians per step; base products: each region until its last program's \
                     share is done (the adapters' bytes stream in meanwhile); adapter units: \
                     thread time, summed over the threads",
                );
            }
            report.push(row);
        }
    }
}

pub fn run(a: DecodeArgs) -> Result<()> {
    if a.batch == 0 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    if a.interleave && a.adapters == 0 {
        bail!("--interleave compares adapter configurations: give --adapters K too");
    }
    if a.phases && !a.interleave {
        bail!("--phases times the interleaved configurations: give --interleave too");
    }
    let threads = resolve_threads(a.threads);
    init_threads(threads);
    let l = a.m.load()?;
    let model = &l.model;
    let llama = LlamaCpp::for_model(a.vs_llamacpp, model)?;
    let mut report = Report::new(
        a.json,
        Context {
            threads,
            batch: Some(a.batch),
            model: Some(model_label(&l.path)),
        },
    );

    eprintln!(
        "measuring memory bandwidth ({} MiB, {threads} threads) ...",
        a.membw_mib
    );
    let bw_before = membw::measure(a.membw_mib << 20, threads, a.membw_reps);
    let kind = prefill::model_kind(model);
    let peak_before = prefill::gemm_peak(256, 2048, 64, kind, 0.5, false)[0].1;
    let base_bytes = model.weights.bytes_per_token();
    // Multiply-adds per token: projections and output head (attention over a short context and
    // the norms are left out); a LoRA pair adds rank * (in + out), one per f32 it holds.
    let c = &model.config;
    let base_macs = projection_macs(c) + c.vocab_size * c.hidden_size;
    let total = a.prompt.max(1) + a.warmup + a.steps + 1;
    // Interleaved, each of the three configurations keeps its batch in the pool.
    let seqs = if a.interleave { 3 * a.batch } else { a.batch };
    let mut pool = a.m.pool(
        model,
        seqs,
        total * if a.interleave { a.rounds.max(1) } else { 1 },
    )?;
    // The yardsticks are measured again after the decode runs and the best kept, so that a
    // neighbour's burst during one measurement does not flatter the ratios.
    let yardsticks = |report: &mut Report| {
        eprintln!("measuring memory bandwidth and gemm-peak again ...");
        let after = membw::measure(a.membw_mib << 20, threads, a.membw_reps);
        let peak = peak_before.max(prefill::gemm_peak(256, 2048, 64, kind, 0.5, false)[0].1);
        let bw = membw::Membw {
            single_gbs: bw_before.single_gbs.max(after.single_gbs),
            all_gbs: bw_before.all_gbs.max(after.all_gbs),
            bytes: after.bytes,
        };
        report.push(
            Row::new("decode", "membw (1 thread)", bw.single_gbs, "GB/s").note(format!(
                "best of {} reads of {} MiB before and {} after the decode runs",
                a.membw_reps,
                bw.bytes >> 20,
                a.membw_reps
            )),
        );
        report.push(Row::new(
            "decode",
            format!("membw ({threads} threads)"),
            bw.all_gbs,
            "GB/s",
        ));
        report.push(Row::new(
            "decode",
            "weight bytes per step",
            base_bytes as f64 / 1e6,
            "MB",
        ));
        report.push(Row::new("decode", "gemm-peak", peak, "GOP/s").note(format!(
            "int4 x int8 on {} (best of before and after), the compute bound below: \
             {:.2} GMAC per token",
            best_isa().name(),
            base_macs as f64 / 1e9
        )));
        (bw, peak)
    };

    let measure = |pool: &mut KvPool, adapters: &[Option<&LoraAdapter>], what: &str| {
        eprintln!("decoding: {what}, batch {} ...", a.batch);
        run_once(model, pool, adapters, a.prompt, a.warmup, a.steps, &l.opts)
    };

    if a.adapters == 0 {
        let none: Vec<Option<&LoraAdapter>> = vec![None; a.batch];
        let prompt = text_tokens(model, a.prompt.max(1))?;
        let mut ours = 0f64;
        let mut single = 0f64;
        let mut theirs: Option<llamacpp::Speed> = None;
        let mut info = String::new();
        for _ in 0..a.rounds.max(1) {
            ours = ours.max(measure(&mut pool, &none, "base model")?);
            if a.vs_batch1 && a.batch > 1 {
                eprintln!("decoding: base model, batch 1 ...");
                single = single.max(run_once(
                    model,
                    &mut pool,
                    &none[..1],
                    a.prompt,
                    a.warmup,
                    a.steps,
                    &l.opts,
                )?);
            }
            if let Some(lc) = &llama {
                eprintln!("decoding: llama.cpp, batch 1 ...");
                let m = lc.measure(&llamacpp::Request {
                    model: &l.path,
                    threads,
                    n_ctx: (total + 64).next_multiple_of(256),
                    decode: Some((&prompt, a.warmup, a.steps)),
                    prefill: None,
                })?;
                info = format!("llama-cpp-python {}: {}", m.version, m.system_info);
                if let Some(s) = m.decode
                    && theirs.is_none_or(|t| s.tps > t.tps)
                {
                    theirs = Some(s);
                }
            }
        }
        let (bw, peak) = yardsticks(&mut report);
        let bound = |bytes: usize| a.batch as f64 * bw.all_gbs * 1e9 / bytes as f64;
        let compute_bound = |macs: usize| peak * 1e9 / (2.0 * macs as f64);
        report.push(
            Row::new("decode", "tokens/s", ours, "tok/s")
                .vs("bandwidth bound", bound(base_bytes))
                .note(format!(
                    "{} steps of {} tokens, act {:?}, kv {}, best of {}",
                    a.steps,
                    a.batch,
                    l.opts.act,
                    a.m.kv,
                    a.rounds.max(1)
                )),
        );
        report.push(
            Row::new("decode", "tokens/s", ours, "tok/s")
                .vs("compute bound", compute_bound(base_macs)),
        );
        if single > 0.0 {
            report.push(
                Row::new(
                    "decode",
                    format!("tokens/s (batch {})", a.batch),
                    ours,
                    "tok/s",
                )
                .vs("batch 1, same run", single),
            );
        }
        if let Some(t) = theirs {
            let b1 = bw.all_gbs * 1e9 / base_bytes as f64;
            report.push(
                Row::new("decode", "llama.cpp tokens/s (batch 1)", t.tps, "tok/s")
                    .vs("bandwidth bound (batch 1)", b1)
                    .note(format!(
                        "llama_perf_context timers; wall clock incl. Python {:.1} tok/s; {info}",
                        t.wall_tps
                    )),
            );
            let mut row =
                Row::new("decode", "tokens/s vs llama.cpp", ours, "tok/s").vs("llama.cpp", t.tps);
            if a.batch != 1 {
                row = row.note("ours at the batch above, llama.cpp at batch 1 (one sequence)");
            }
            report.push(row);
        }
    } else {
        if a.vs_llamacpp {
            eprintln!("note: llama.cpp is only compared without adapters");
        }
        eprintln!(
            "synthesizing {} random adapters of rank {} ...",
            a.adapters, a.rank
        );
        let adapters: Vec<LoraAdapter> = (0..a.adapters)
            .map(|i| synth_adapter(&model.config, a.rank, i, a.adapter_bits))
            .collect();
        let per_adapter = adapter_bytes(&adapters[0], l.opts.act);
        // Round-robin assignment, sorted so sequences sharing an adapter are adjacent (one SGMV
        // segment each).
        let mut idx: Vec<usize> = (0..a.batch).map(|i| i % a.adapters).collect();
        idx.sort_unstable();
        let distinct: Vec<Option<&LoraAdapter>> = idx.iter().map(|&i| Some(&adapters[i])).collect();
        let n_distinct = a.batch.min(a.adapters);
        let shared: Vec<Option<&LoraAdapter>> = vec![Some(&adapters[0]); a.batch];
        let none: Vec<Option<&LoraAdapter>> = vec![None; a.batch];
        let (mut t_none, mut t_shared, mut t_k) = (0f64, 0f64, 0f64);
        // Each round's K-adapter figure over its own no-adapter figure, measured back to back:
        // their median is the ratio least moved by a neighbour's burst in one measurement.
        let mut paired = Vec::new();
        if a.interleave {
            let configs: [&[Option<&LoraAdapter>]; 3] = [&none, &shared, &distinct];
            eprintln!(
                "decoding: no adapter, one shared adapter and {n_distinct} distinct adapters, \
                 a step of each in turn, batch {} ...",
                a.batch
            );
            phases::set_enabled(a.phases);
            let timed = run_interleaved(
                model,
                &mut pool,
                &configs,
                a.prompt,
                a.warmup,
                a.steps * a.rounds.max(1),
                &l.opts,
            );
            phases::set_enabled(false);
            let timed = timed?;
            if a.phases {
                let names = [
                    "no adapter",
                    "1 shared adapter",
                    &format!("{n_distinct} adapters"),
                ];
                phase_rows(&mut report, &names, &timed);
            }
            let secs: Vec<Vec<f64>> = timed
                .iter()
                .map(|c| c.iter().map(|t| t.0).collect())
                .collect();
            let tps = |ci: usize| a.batch as f64 / median(&secs[ci]);
            (t_none, t_shared, t_k) = (tps(0), tps(1), tps(2));
            paired = secs[0].iter().zip(&secs[2]).map(|(n, k)| n / k).collect();
        } else {
            for _ in 0..a.rounds.max(1) {
                let none_now = measure(&mut pool, &none, "no adapter")?;
                t_none = t_none.max(none_now);
                t_shared = t_shared.max(measure(&mut pool, &shared, "one shared adapter")?);
                let k_now = measure(
                    &mut pool,
                    &distinct,
                    &format!("{n_distinct} distinct adapters"),
                )?;
                t_k = t_k.max(k_now);
                paired.push(k_now / none_now);
            }
        }
        paired.sort_by(f64::total_cmp);
        let (bw, peak) = yardsticks(&mut report);
        let bound = |bytes: usize| a.batch as f64 * bw.all_gbs * 1e9 / bytes as f64;
        let compute_bound = |macs: usize| peak * 1e9 / (2.0 * macs as f64);
        let k_label = format!("tokens/s ({n_distinct} adapters)");
        report.push(
            Row::new(
                "decode",
                "adapter bytes (each)",
                per_adapter as f64 / 1e6,
                "MB",
            )
            .note(format!(
                "rank {}, all 7 projections, A and B read as {}, {} adapters over {} sequences",
                a.rank,
                match (l.opts.act, a.adapter_bits) {
                    (ActMode::Int8, AdapterBits::Int8) => "int8",
                    (ActMode::Int8, AdapterBits::Int4) => "int4",
                    _ => "f32",
                },
                a.adapters,
                a.batch
            )),
        );
        report.push(
            Row::new("decode", "tokens/s (no adapter)", t_none, "tok/s")
                .vs("bandwidth bound", bound(base_bytes)),
        );
        report.push(
            Row::new("decode", "tokens/s (1 shared adapter)", t_shared, "tok/s")
                .vs("bandwidth bound", bound(base_bytes + per_adapter)),
        );
        report.push(Row::new("decode", k_label.clone(), t_k, "tok/s").vs(
            "bandwidth bound",
            bound(base_bytes + n_distinct * per_adapter),
        ));
        let lora_macs = adapter_macs(&adapters[0]);
        report.push(
            Row::new("decode", "tokens/s (no adapter)", t_none, "tok/s")
                .vs("compute bound", compute_bound(base_macs)),
        );
        report.push(
            Row::new("decode", "tokens/s (1 shared adapter)", t_shared, "tok/s")
                .vs("compute bound", compute_bound(base_macs + lora_macs)),
        );
        report.push(
            Row::new("decode", k_label.clone(), t_k, "tok/s")
                .vs("compute bound", compute_bound(base_macs + lora_macs)),
        );
        report.push(
            Row::new("decode", "tokens/s (1 shared adapter)", t_shared, "tok/s")
                .vs("no adapter", t_none),
        );
        report.push(Row::new("decode", k_label.clone(), t_k, "tok/s").vs("no adapter", t_none));
        let n = paired.len();
        let note = if a.interleave {
            format!(
                "median of {n} interleaved step pairs (the no-adapter step's time over the \
                 {n_distinct}-adapter step's); quartiles {:.3}-{:.3}; tokens/s above are median \
                 steps",
                paired[n / 4],
                paired[3 * n / 4]
            )
        } else {
            format!(
                "median of {n} rounds' ratios, each measured back to back: {}",
                paired
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        report.push(
            Row::new(
                "decode",
                format!("{n_distinct} adapters / no adapter, paired"),
                median(&paired),
                "ratio",
            )
            .note(note),
        );
        report.push(Row::new("decode", k_label, t_k, "tok/s").vs("1 shared adapter", t_shared));
    }
    report.print();
    Ok(())
}
