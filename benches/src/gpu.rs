//! GPU benches, each beside a yardstick measured in the same run on the same device:
//! - `gemv`: INT4 GEMV achieved read bandwidth vs a device-to-device copy;
//! - `decode`: tokens/s at several batch sizes vs the bandwidth bound (copy bandwidth / bytes of
//!   weights per step), and with adapters: K distinct adapters vs one shared vs none; on a loaded
//!   model (`--model`) or one of a `synth` shape built in memory (`--synth`, seconds even for 8B);
//! - `attention`: one sequence's decode attention at long contexts, dense vs page-sparse;
//! - `adapter-load`: a cold adapter from disk into VRAM vs a raw read of the same bytes
//!   (`gpu_load`).
//!
//! Times come from CUDA events around many launches (the host never waits inside the loop).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use cudarc::driver::CudaSlice;
use edgelora_daemon::adapters::LoraAdapter;
use edgelora_daemon::device::{Device, DeviceSpec};
use edgelora_daemon::engine::cuda::CudaBackend;
use edgelora_daemon::engine::forward::ActMode;
use edgelora_daemon::engine::{Backend, ForwardOptions, KvDtype, SeqKv, SeqStep, SparseConfig};
use edgelora_daemon::model::{LoadOptions, Model};
use edgelora_kernels::cpu::kv::KvGeometry;
use edgelora_kernels::cpu::lora::AdapterBits;
use edgelora_kernels::cuda::Gpu;
use edgelora_kernels::cuda::attention::{
    GpuKvPool, GpuQuery, SplitPlan, attention_plan_with, paged_attention_planned,
};
use edgelora_kernels::cuda::linear::{GpuWeight, Int4Gemv};
use edgelora_kernels::cuda::qact::GpuActQ8;
use edgelora_kernels::{Q4Matrix, Weight};

use crate::common::{ModelArgs, model_label, synth_adapter, text_tokens};
use crate::gpu_load::AdapterLoadArgs;
use crate::report::{Context, Report, Row};
use crate::rng::Rng;
use crate::swap::shape_name;
use crate::synth::{self, Shape};

#[derive(Args, Debug)]
pub struct GpuArgs {
    #[command(subcommand)]
    pub what: GpuBench,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0, global = true)]
    pub device: usize,
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum GpuBench {
    /// INT4 GEMV read bandwidth on real projection shapes vs a device-to-device copy.
    Gemv {
        /// Timed launches per shape.
        #[arg(long, default_value_t = 200)]
        iters: usize,
    },
    /// Decode tokens/s vs the bandwidth bound; with --adapters, mixed vs shared vs none.
    Decode {
        #[command(flatten)]
        m: ModelArgs,
        /// Instead of loading --model, build a model of this `synth` shape in memory: the
        /// tensors and formats the loader makes of `synth --shape S` under --dtype, --group-size
        /// and --act, with random INT4 codes (seconds, where the folder would be 16 GB for 8B).
        #[arg(long, value_enum, conflicts_with = "model")]
        synth: Option<Shape>,
        /// Tokenizer folder of --synth (default: the tiny-llama fixture, under
        /// $EDGELORA_FIXTURES when set).
        #[arg(long, requires = "synth")]
        tokenizer: Option<PathBuf>,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        batch: Vec<usize>,
        /// Distinct random adapters spread over the batch (0: none).
        #[arg(long, default_value_t = 0)]
        adapters: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value_t = 16)]
        prompt: usize,
        #[arg(long, default_value_t = 32)]
        steps: usize,
    },
    /// Decode attention of one sequence at long contexts: dense vs page-sparse.
    Attention {
        #[arg(long, value_delimiter = ',', default_value = "4096,32768")]
        ctx: Vec<usize>,
        /// Sparse budget in tokens.
        #[arg(long, default_value_t = 2048)]
        budget: usize,
        #[arg(long, default_value = "int4")]
        kv: KvDtype,
        #[arg(long, default_value_t = 16)]
        page_size: usize,
        #[arg(long, default_value_t = 100)]
        iters: usize,
        /// Also time dense attention with these pages per split-K work item (the default plan
        /// sizes splits itself), to see where its heuristic should sit.
        #[arg(long, value_delimiter = ',')]
        splits: Vec<usize>,
    },
    /// Cold adapter load, disk to VRAM (read, check and decode the pack, upload, wait), vs a
    /// raw read of the same bytes through the loader's reader; and the upload alone vs a pinned
    /// host-to-device copy.
    AdapterLoad(AdapterLoadArgs),
}

fn open_gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    match edgelora_daemon::device::open(DeviceSpec::Cuda(ordinal))? {
        Device::Cuda { gpu, .. } => Ok(gpu),
        Device::Cpu { why } => bail!("no CUDA device: {why}"),
    }
}

/// Seconds per call of `f`, from CUDA events around `iters` calls after 3 untimed ones. The timed
/// calls queue behind a kernel that holds the stream for longer than the host takes to issue them
/// (1.5× the warm-up calls' host time, at least 5 ms), so the events see the device running them
/// back to back, not the host's launch rate (which varied 2-3× between runs on a lent H100).
pub(crate) fn time_events(
    gpu: &Gpu,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let t0 = std::time::Instant::now();
    for _ in 0..3 {
        f()?;
    }
    let host_per_call = t0.elapsed().as_secs_f64() / 3.0;
    let ctx = gpu.context();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (a, b) = (ctx.new_event(flags)?, ctx.new_event(flags)?);
    let hold_s = (1.5 * host_per_call * iters as f64).clamp(5e-3, 1.0);
    edgelora_kernels::cuda::timing::hold(gpu, (hold_s * 1e9) as u64)?;
    a.record(gpu.stream())?;
    for _ in 0..iters {
        f()?;
    }
    b.record(gpu.stream())?;
    Ok(a.elapsed_ms(&b)? as f64 / 1e3 / iters as f64)
}

/// Device-to-device copy bandwidth, bytes read + written per second (best of 5).
fn copy_bandwidth(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let s = gpu.stream();
    let n = bytes / 4;
    let src: CudaSlice<f32> = s.alloc_zeros(n)?;
    let mut dst: CudaSlice<f32> = s.alloc_zeros(n)?;
    let mut best = 0f64;
    for _ in 0..5 {
        let t = time_events(gpu, 10, || {
            s.memcpy_dtod(&src, &mut dst)?;
            Ok(())
        })?;
        best = best.max(2.0 * (n * 4) as f64 / t);
    }
    Ok(best)
}

fn random_q4(rows: usize, cols: usize, seed: u64) -> Result<Weight> {
    let mut w = vec![0f32; rows * cols];
    Rng::new(seed).fill_normal(&mut w, 0.02);
    Ok(Weight::Q4(Q4Matrix::quantize(&w, rows, cols, 32)?))
}

pub fn run(a: GpuArgs) -> Result<()> {
    let gpu = open_gpu(a.device)?;
    let info = gpu.info().clone();
    let mut report = Report::new(
        a.json,
        Context {
            threads: 0,
            batch: None,
            model: Some(format!("{} ({})", info.name, info.arch)),
        },
    );
    let copy = copy_bandwidth(&gpu, 1 << 30)?;
    report.push(
        Row::new("gpu", "device-to-device copy", copy / 1e9, "GB/s")
            .note("1 GiB, bytes read + written, best of 5"),
    );
    match a.what {
        GpuBench::Gemv { iters } => {
            // Llama-3 projections: 1B (2048 wide, 8192 MLP) and 8B (4096 wide, 14336 MLP).
            let shapes = [
                ("1B q_proj", 2048, 2048),
                ("1B gate_proj", 8192, 2048),
                ("1B down_proj", 2048, 8192),
                ("8B q_proj", 4096, 4096),
                ("8B gate_proj", 14336, 4096),
                ("8B down_proj", 4096, 14336),
            ];
            let s = gpu.stream();
            for (i, (name, rows, cols)) in shapes.into_iter().enumerate() {
                let w = GpuWeight::upload(&gpu, &random_q4(rows, cols, i as u64)?)?;
                for m in [1usize, 16] {
                    let x: CudaSlice<f32> = s.clone_htod(&vec![0.01f32; m * cols])?;
                    let mut y: CudaSlice<f32> = s.alloc_zeros(m * rows)?;
                    // The default kernels, then the first version's, same weights, same run.
                    for (kernels, int4) in [
                        ("", Int4Gemv::BlockScaled),
                        (", per-weight kernels", Int4Gemv::PerWeight),
                    ] {
                        let t = time_events(&gpu, iters, || {
                            w.matmul_with(&gpu, &x.as_view(), m, &mut y.as_view_mut(), int4)?;
                            Ok(())
                        })?;
                        let gbs = w.nbytes() as f64 / t / 1e9;
                        report.push(
                            Row::new(
                                "gpu",
                                format!("INT4 GEMV {name} {rows}x{cols} m={m}{kernels}"),
                                gbs,
                                "GB/s",
                            )
                            .vs("copy bandwidth", copy / 1e9)
                            .note(format!(
                                "{:.1} us/call, {:.1} MB of weights",
                                t * 1e6,
                                w.nbytes() as f64 / 1e6
                            )),
                        );
                    }
                    // The fast mode: activations quantized to int8 (timed apart: once per input,
                    // shared by the projections reading it), dp4a products.
                    let mut qa = GpuActQ8::new(&gpu, m, cols)?;
                    let tq =
                        time_events(&gpu, iters, || Ok(qa.quantize(&gpu, &x.as_view(), m)?))?;
                    let t = time_events(&gpu, iters, || {
                        w.matmul_q8(&gpu, &qa, m, &mut y.as_view_mut())?;
                        Ok(())
                    })?;
                    report.push(
                        Row::new(
                            "gpu",
                            format!("INT4 GEMV {name} {rows}x{cols} m={m}, int8 activations"),
                            w.nbytes() as f64 / t / 1e9,
                            "GB/s",
                        )
                        .vs("copy bandwidth", copy / 1e9)
                        .note(format!(
                            "{:.1} us/call (+ {:.1} us to quantize the input)",
                            t * 1e6,
                            tq * 1e6
                        )),
                    );
                }
            }
        }
        GpuBench::Decode {
            m,
            synth: synth_shape,
            tokenizer,
            batch,
            adapters,
            rank,
            prompt,
            steps,
        } => {
            let (model, label) = match synth_shape {
                Some(shape) => {
                    let tok = tokenizer.unwrap_or_else(synth::fixture_tokenizer_dir);
                    let model = synth_model(shape, &m.load_options(), &tok)?;
                    (
                        model,
                        format!("synth {} (random weights)", shape_name(shape)),
                    )
                }
                None => {
                    let loaded = m.load()?;
                    (loaded.model, model_label(&loaded.path))
                }
            };
            let model = &model;
            report.ctx.model = Some(format!("{label} on {} ({})", info.name, info.arch));
            let max_b = batch.iter().copied().max().unwrap_or(1);
            let pages = max_b * ((prompt + steps + 8).div_ceil(m.page_size) + 1);
            let mut be = CudaBackend::new(gpu.clone(), model, m.kv, m.page_size, pages)?;
            // --act int8 measures the CUDA int8 fast mode (opt-in in edgelorad).
            be.set_int8_activations(m.act == ActMode::Int8);
            let bytes = be.weight_bytes();
            let ads: Vec<LoraAdapter> = (0..adapters)
                .map(|i| synth_adapter(&model.config, rank, i, AdapterBits::Int8))
                .collect();
            // --act int8 (default): int8 activations and dp4a products for steps of up to 32
            // rows, as edgelorad runs; --act f32: the exact path.
            let opts = ForwardOptions {
                act: m.act,
                ..ForwardOptions::exact()
            };
            for &b in &batch {
                // A read-only stream can use the copy's whole rate (reads + writes).
                let bound = copy / bytes as f64 * b as f64;
                let mut configs: Vec<(String, Vec<Option<&LoraAdapter>>)> =
                    vec![("no adapter".into(), vec![None; b])];
                if adapters > 0 {
                    configs.push(("1 shared adapter".into(), vec![Some(&ads[0]); b]));
                    configs.push((
                        format!("{adapters} distinct adapters"),
                        (0..b).map(|i| Some(&ads[i % adapters])).collect(),
                    ));
                }
                let mut base = None;
                for (label, who) in configs {
                    let tps = decode_tps(&mut be, model, &who, prompt, steps, &opts)
                        .with_context(|| label.clone())?;
                    let mut row =
                        Row::new("gpu", format!("decode batch {b}, {label}"), tps, "tok/s");
                    row = match base {
                        None => {
                            base = Some(tps);
                            row.vs("bandwidth bound", bound).note(format!(
                                "{:.1} MB of weights per step, kv {}, act {:?}",
                                bytes as f64 / 1e6,
                                m.kv,
                                m.act
                            ))
                        }
                        Some(b0) => row.vs("no adapter", b0),
                    };
                    report.push(row);
                }
            }
        }
        GpuBench::Attention {
            ctx,
            budget,
            kv,
            page_size,
            iters,
            splits,
        } => {
            // One layer of Llama-3-8B attention: 32 query heads over 8 KV heads of 128.
            let (n_heads, n_kv, hd) = (32usize, 8usize, 128usize);
            for &n in &ctx {
                let geom = KvGeometry {
                    page_size,
                    n_layers: 1,
                    n_kv_heads: n_kv,
                    head_dim: hd,
                };
                let n_pages = n.div_ceil(page_size);
                let mut pool = GpuKvPool::new(&gpu, geom, kv, n_pages)?;
                let pages: Vec<_> = (0..n_pages)
                    .map(|_| pool.alloc().expect("sized for the context"))
                    .collect();
                fill_pool(&gpu, &mut pool, &pages, n, n_kv * hd)?;
                let s = gpu.stream();
                let mut q = vec![0f32; n_heads * hd];
                Rng::new(7).fill_normal(&mut q, 1.0);
                let dq: CudaSlice<f32> = s.clone_htod(&q)?;
                let mut out: CudaSlice<f32> = s.alloc_zeros(n_heads * hd)?;
                let queries = [GpuQuery {
                    pages: &pages,
                    n_tokens: n,
                }];
                let scale = 1.0 / (hd as f32).sqrt();
                let sparse = SparseConfig::new(budget);
                // A decode step plans once (page tables, selection scratch) and runs every layer
                // under the plan: time one layer's run.
                let mut time_split = |sp: Option<&SparseConfig>, split: SplitPlan| -> Result<f64> {
                    let plan = attention_plan_with(&gpu, &pool, &queries, n_heads, sp, split)?;
                    time_events(&gpu, iters, || {
                        paged_attention_planned(
                            &gpu,
                            &pool,
                            &plan,
                            0,
                            &dq.as_view(),
                            scale,
                            &mut out.as_view_mut(),
                        )?;
                        Ok(())
                    })
                };
                let mut time = |sp: Option<&SparseConfig>| time_split(sp, SplitPlan::default());
                let dense = time(None)?;
                report.push(
                    Row::new("gpu", format!("attention ctx {n} dense"), dense * 1e6, "us")
                        .note(format!("kv {kv}, 32 heads / 8 KV heads x 128, one layer")),
                );
                for (how, cfg) in [
                    ("per head", sparse),
                    ("per group", sparse.shared_by_group()),
                ] {
                    let t = time(Some(&cfg))?;
                    report.push(
                        Row::new(
                            "gpu",
                            format!("attention ctx {n} sparse (budget {budget}, {how})"),
                            dense / t,
                            "x faster",
                        )
                        .note(format!("{:.1} us", t * 1e6)),
                    );
                }
                // Smaller budgets, per group: what stays as the budget shrinks is the selection's
                // own cost (bounds of every page, top-k, compaction) and the launches.
                for b in [budget / 8, budget / 2] {
                    let t = time(Some(&SparseConfig::new(b).shared_by_group()))?;
                    report.push(
                        Row::new(
                            "gpu",
                            format!("attention ctx {n} sparse (budget {b}, per group)"),
                            dense / t,
                            "x faster",
                        )
                        .note(format!("{:.1} us", t * 1e6)),
                    );
                }
                for &e in &splits {
                    let split = SplitPlan {
                        entries_per_split: Some(e),
                    };
                    let t = time_split(None, split)?;
                    report.push(
                        Row::new(
                            "gpu",
                            format!("attention ctx {n} dense, {e} pages per split"),
                            t * 1e6,
                            "us",
                        )
                        .vs("default split", dense * 1e6),
                    );
                }
            }
        }
        GpuBench::AdapterLoad(args) => crate::gpu_load::run(&gpu, &args, &mut report)?,
    }
    report.print();
    Ok(())
}

/// A model of a `synth` shape built in memory (see [`synth::model_in_memory`]), logged as
/// `ModelArgs::load` logs a loaded one.
pub(crate) fn synth_model(shape: Shape, opts: &LoadOptions, tokenizer: &Path) -> Result<Model> {
    let t0 = std::time::Instant::now();
    let model = synth::model_in_memory(shape, opts, 0, tokenizer)
        .with_context(|| format!("building the {} model in memory", shape_name(shape)))?;
    eprintln!(
        "built {} in memory ({} layers, hidden {}, vocab {}, {:.1} MB of weights per token) in \
         {:.1}s",
        model.name,
        model.config.n_layers,
        model.config.hidden_size,
        model.config.vocab_size,
        model.weights.bytes_per_token() as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// Writes `n` tokens of random keys and values into `pages` and seals every full page.
fn fill_pool(
    gpu: &Gpu,
    pool: &mut GpuKvPool,
    pages: &[edgelora_kernels::cpu::kv::PageId],
    n: usize,
    width: usize,
) -> Result<()> {
    let ps = pool.geometry().page_size;
    let s = gpu.stream();
    let mut rng = Rng::new(3);
    let chunk = 1024;
    let mut t = 0;
    while t < n {
        let rows = chunk.min(n - t);
        let mut k = vec![0f32; rows * width];
        let mut v = vec![0f32; rows * width];
        rng.fill_normal(&mut k, 1.0);
        rng.fill_normal(&mut v, 1.0);
        let (dk, dv) = (s.clone_htod(&k)?, s.clone_htod(&v)?);
        let pg: Vec<_> = (t..t + rows).map(|i| pages[i / ps]).collect();
        let sl: Vec<_> = (t..t + rows).map(|i| i % ps).collect();
        pool.write_rows(gpu, 0, &dk.as_view(), &dv.as_view(), &pg, &sl)?;
        t += rows;
    }
    for (i, &p) in pages.iter().enumerate() {
        if (i + 1) * ps <= n {
            pool.seal(gpu, 0, p)?;
        }
    }
    Ok(())
}

/// Prefills `prompt` tokens per sequence, then times `steps` greedy decode steps of all of them.
fn decode_tps(
    be: &mut CudaBackend,
    model: &Model,
    who: &[Option<&LoraAdapter>],
    prompt: usize,
    steps: usize,
    opts: &ForwardOptions,
) -> Result<f64> {
    let b = who.len();
    let toks = text_tokens(model, prompt)?;
    let mut kvs: Vec<SeqKv> = (0..b).map(|_| SeqKv::new()).collect();
    let mut next: Vec<Vec<u32>> = vec![toks; b];
    let result = (|| -> Result<f64> {
        let mut t0 = std::time::Instant::now();
        for i in 0..steps + 3 {
            if i == 3 {
                t0 = std::time::Instant::now();
            }
            let mut seqs: Vec<SeqStep<'_>> = kvs
                .iter_mut()
                .zip(&next)
                .zip(who)
                .map(|((kv, t), a)| SeqStep {
                    tokens: t,
                    kv,
                    adapter: *a,
                    all_logits: false,
                })
                .collect();
            let ids = be.step_argmax(model, &mut seqs, opts)?;
            next = ids.into_iter().map(|t| vec![t]).collect();
        }
        Ok((steps * b) as f64 / t0.elapsed().as_secs_f64())
    })();
    for kv in &mut kvs {
        be.release(kv);
    }
    result
}
