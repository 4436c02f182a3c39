//! Hugging Face folders with random weights of a real model's shape, so that shapes we cannot
//! download can still be benchmarked: `config.json`, f16 safetensors (N(0, 0.02) projections and
//! embeddings, unit norms) in shards of about `--shard-mb` with `model.safetensors.index.json`,
//! and the tiny-llama fixture's tokenizer (the model only needs `vocab_size` for its shapes; every
//! id the tokenizer produces is inside it).
//!
//! [`model_in_memory`] skips the folder: it builds, in seconds even for llama-8b, the [`Model`]
//! the loader would make of such a folder (same config, same tensor shapes and formats: INT4
//! projections, Q8_0 or f32 embedding and head, unit norms), with random codes in place of
//! quantized random values, for benches that only need the weights to exist (GPU decode, adapter
//! uploads).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use edgelora_daemon::model::{
    LayerWeights, Linear, LoadOptions, Model, ModelConfig, ModelFormat, ModelWeights, Proj,
    TextTokenizer, WeightDtype,
};
use edgelora_kernels::{BlockQ4, BlockQ8, DenseMatrix, Q4Kind, Q4Matrix, Q8Matrix, QK, Weight};
use half::f16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

use crate::rng::{Rng, seed_of};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied.
    #[value(name = "llama-1b")]
    Llama1b,
    /// Llama-3.1-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256.
    #[value(name = "llama-8b")]
    Llama8b,
    /// SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied.
    #[value(name = "smollm2")]
    Smollm2,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(long, value_enum)]
    pub shape: Shape,
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Target shard size in MB (a single model.safetensors when everything fits in one).
    #[arg(long, default_value_t = 1000)]
    pub shard_mb: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where tokenizer.json / tokenizer_config.json are copied from (default: the tiny-llama
    /// fixture of this repository).
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
}

struct Dims {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    inter: usize,
    vocab: usize,
    tied: bool,
}

/// The projection shapes of `shape`: (hidden, layers, k/v width, intermediate).
pub fn proj_dims(shape: Shape) -> (usize, usize, usize, usize) {
    let (d, _) = config(shape);
    (d.hidden, d.layers, d.hidden / d.heads * d.kv_heads, d.inter)
}

fn config(shape: Shape) -> (Dims, Value) {
    let (d, extra) = match shape {
        Shape::Llama1b => (
            Dims {
                hidden: 2048,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                inter: 8192,
                vocab: 128_256,
                tied: true,
            },
            json!({
                "rope_theta": 500000.0,
                "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
            }),
        ),
        Shape::Llama8b => (
            Dims {
                hidden: 4096,
                layers: 32,
                heads: 32,
                kv_heads: 8,
                inter: 14336,
                vocab: 128_256,
                tied: false,
            },
            json!({
                "rope_theta": 500000.0,
                "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
            }),
        ),
        Shape::Smollm2 => (
            Dims {
                hidden: 576,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                inter: 1536,
                vocab: 49152,
                tied: true,
            },
            json!({
                "rope_theta": 100000.0,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5,
            }),
        ),
    };
    let cfg = config_json(&d, &extra, &format!("{shape:?}"));
    (d, cfg)
}

/// The `config.json` of a llama-architecture model of dims `d`, with `extra` keys (RoPE, norms)
/// merged in; `label` names the shape in the file.
fn config_json(d: &Dims, extra: &Value, label: &str) -> Value {
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.hidden,
        "intermediate_size": d.inter,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.hidden / d.heads,
        "vocab_size": d.vocab,
        "tie_word_embeddings": d.tied,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float16",
        // The ids of the copied tiny-llama tokenizer's specials, not the real model's.
        "bos_token_id": 0,
        "eos_token_id": 1,
        "edgelora_synthetic": format!("random N(0, 0.02) weights of the {label} shape"),
    });
    for (k, v) in extra.as_object().expect("object") {
        cfg[k] = v.clone();
    }
    cfg
}

/// (name, shape, is a norm) in checkpoint order.
fn tensors(d: &Dims) -> Vec<(String, Vec<usize>, bool)> {
    let hd = d.hidden / d.heads;
    let (q, kv) = (d.heads * hd, d.kv_heads * hd);
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![d.vocab, d.hidden],
        false,
    )];
    for i in 0..d.layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d.hidden], true));
        v.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, d.hidden],
            false,
        ));
        v.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, d.hidden],
            false,
        ));
        v.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, d.hidden],
            false,
        ));
        v.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![d.hidden, q],
            false,
        ));
        v.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![d.hidden],
            true,
        ));
        v.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![d.inter, d.hidden],
            false,
        ));
        v.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![d.inter, d.hidden],
            false,
        ));
        v.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![d.hidden, d.inter],
            false,
        ));
    }
    v.push(("model.norm.weight".to_string(), vec![d.hidden], true));
    if !d.tied {
        v.push(("lm_head.weight".to_string(), vec![d.vocab, d.hidden], false));
    }
    v
}

/// f16 little-endian bytes of N(0, 0.02) values (or ones for norms), generated in parallel chunks
/// whose seeds depend only on (seed, tensor, chunk), so the result is the same on any machine.
fn generate(n: usize, norm: bool, seed: u64, tensor: usize) -> Vec<u8> {
    const CHUNK: usize = 1 << 20;
    let mut out = vec![0u8; n * 2];
    if norm {
        let one = half::f16::ONE.to_le_bytes();
        for c in out.chunks_exact_mut(2) {
            c.copy_from_slice(&one);
        }
        return out;
    }
    let parts: Vec<std::sync::Mutex<&mut [u8]>> = out
        .chunks_mut(CHUNK * 2)
        .map(std::sync::Mutex::new)
        .collect();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(parts.len());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut f = vec![0f32; CHUNK];
                let mut h = vec![half::f16::ZERO; CHUNK];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(part) = parts.get(i) else { break };
                    let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
                    let len = part.len() / 2;
                    Rng::new(seed_of(&[seed, tensor as u64, i as u64]))
                        .fill_normal(&mut f[..len], 0.02);
                    half::slice::HalfFloatSliceExt::convert_from_f32_slice(
                        &mut h[..len],
                        &f[..len],
                    );
                    for (dst, v) in part.chunks_exact_mut(2).zip(&h[..len]) {
                        dst.copy_from_slice(&v.to_le_bytes());
                    }
                }
            });
        }
    });
    drop(parts);
    out
}

/// The tiny-llama fixture's folder, whose tokenizer synthesized models use:
/// `$EDGELORA_FIXTURES/tiny-llama` when set (binaries carried to another machine), else this
/// repository's copy where it exists, else `tests/fixtures/tiny-llama` under the working folder.
pub fn fixture_tokenizer_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGELORA_FIXTURES") {
        return PathBuf::from(d).join("tiny-llama");
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures/tiny-llama")
    }
}

pub fn run(a: SynthArgs) -> Result<()> {
    let (d, cfg) = config(a.shape);
    let tok_dir = a
        .tokenizer_from
        .clone()
        .unwrap_or_else(fixture_tokenizer_dir);
    let t0 = std::time::Instant::now();
    let label = format!("{:?}", a.shape);
    let w = write_folder(&d, &cfg, &label, &a.out, a.shard_mb, a.seed, &tok_dir)?;
    println!(
        "{}",
        json!({"bench": "synth", "shape": label, "out": a.out,
               "shards": w.shards, "parameters": w.params, "bytes": w.bytes,
               "seconds": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}

/// What [`write_folder`] wrote.
struct Written {
    shards: usize,
    params: usize,
    bytes: usize,
}

/// Writes the folder of a model of dims `d` (`label` in messages) with `config.json` `cfg`:
/// shards of about `shard_mb`, random weights from `seed`, the tokenizer files of `tok_dir`.
fn write_folder(
    d: &Dims,
    cfg: &Value,
    label: &str,
    out: &Path,
    shard_mb: usize,
    seed: u64,
    tok_dir: &Path,
) -> Result<Written> {
    let list = tensors(d);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    // Shards of at most shard_mb (a tensor larger than that gets a shard of its own).
    let limit = shard_mb.max(1) * 1_000_000;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0usize;
    for (i, (_, shape, _)) in list.iter().enumerate() {
        let b = shape.iter().product::<usize>() * 2;
        if size + b > limit && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("non-empty").push(i);
        size += b;
    }
    let n_shards = shards.len();
    let total_bytes: usize = list
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>() * 2)
        .sum();
    let params = total_bytes / 2;
    eprintln!(
        "synth {label}: {:.2} G parameters, {:.2} GB at f16, {n_shards} shard(s) -> {}",
        params as f64 / 1e9,
        total_bytes as f64 / 1e9,
        out.display()
    );
    let name_of = |s: usize| {
        if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, n_shards)
        }
    };
    let mut weight_map = serde_json::Map::new();
    let t0 = std::time::Instant::now();
    for (s, idx) in shards.iter().enumerate() {
        let datas: Vec<Vec<u8>> = idx
            .iter()
            .map(|&i| {
                let (_, shape, norm) = &list[i];
                generate(shape.iter().product(), *norm, seed, i)
            })
            .collect();
        let views = idx
            .iter()
            .zip(&datas)
            .map(|(&i, data)| {
                let (name, shape, _) = &list[i];
                Ok((
                    name.clone(),
                    TensorView::new(Dtype::F16, shape.clone(), data)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let file = out.join(name_of(s));
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &file)
            .with_context(|| format!("writing {}", file.display()))?;
        for &i in idx {
            weight_map.insert(list[i].0.clone(), Value::String(name_of(s)));
        }
        eprintln!(
            "  wrote {} ({} tensors, {:.1}s)",
            file.display(),
            idx.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    // A stale single file or index from an earlier run with another sharding would confuse the loader.
    let index = out.join("model.safetensors.index.json");
    if n_shards > 1 {
        let _ = std::fs::remove_file(out.join("model.safetensors"));
        let v = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
        std::fs::write(&index, serde_json::to_string_pretty(&v)?)?;
    } else if index.exists() {
        std::fs::remove_file(&index)?;
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&json!({"bos_token_id": 0, "eos_token_id": 1}))?,
    )?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = tok_dir.join(f);
        if !src.exists() {
            bail!(
                "{} not found (pass --tokenizer-from a folder with tokenizer.json)",
                src.display()
            );
        }
        std::fs::copy(&src, out.join(f)).with_context(|| format!("copying {}", src.display()))?;
    }
    Ok(Written {
        shards: n_shards,
        params,
        bytes: total_bytes,
    })
}

/// Scale of a random INT4 group: about what the quantizer gives 32 N(0, 0.02) values,
/// `(max - min) / 15` with a range of about 4.1 standard deviations.
const Q4_SCALE: f32 = 0.02 * 4.1 / 15.0;
/// Scale of a random Q8_0 block: about `max |w| / 127` of 32 N(0, 0.02) values (2.1 std).
const Q8_SCALE: f32 = 0.02 * 2.1 / 127.0;

/// The `ModelConfig` the loader reads from the folder `synth` writes for `shape` (its
/// `generation_config.json` repeats the token ids of `config.json`, so it changes nothing).
pub fn model_config(shape: Shape) -> Result<ModelConfig> {
    Ok(ModelConfig::from_hf_json(&config(shape).1)?)
}

/// The model `Model::load(folder, opts)` makes of the folder `synth --shape shape` writes, built
/// directly in memory: see [`random_model`].
pub fn model_in_memory(
    shape: Shape,
    opts: &LoadOptions,
    seed: u64,
    tokenizer_dir: &Path,
) -> Result<Model> {
    let name = format!("synth-{}", crate::swap::shape_name(shape));
    random_model(model_config(shape)?, opts, seed, tokenizer_dir, &name)
}

/// The format the loader gives one matrix.
#[derive(Clone, Copy, Debug)]
enum Format {
    /// INT4, zero-point kind, metadata per `group` columns (quantize-at-load).
    Q4 {
        group: usize,
    },
    /// Q8_0 (embedding and head on the int8 path).
    Q8,
    F32,
}

/// A model of `config` with the tensors and formats the loader makes of a float checkpoint under
/// `opts` (as `hf::load_folder`: projections INT4 of `opts.group_size` or f32; the embedding and
/// an untied head Q8_0 when `opts.q8_embeddings` under INT4, else f32; unit norms; zero biases
/// where the config has them), filled with random codes and scales of about the magnitude the
/// quantizer gives N(0, 0.02) values, and the tokenizer of `tokenizer_dir`.
///
/// Every matrix is generated straight in its final format (no f32 round trip for INT4 and Q8),
/// one matrix per thread, largest first; the values depend only on `seed`.
pub fn random_model(
    config: ModelConfig,
    opts: &LoadOptions,
    seed: u64,
    tokenizer_dir: &Path,
    name: &str,
) -> Result<Model> {
    if opts.group_size == 0 || !opts.group_size.is_multiple_of(QK) {
        bail!(
            "INT4 group size {}: must be a positive multiple of {QK}",
            opts.group_size
        );
    }
    let c = &config;
    let proj_fmt = match opts.dtype {
        WeightDtype::Int4 => Format::Q4 {
            group: opts.group_size,
        },
        WeightDtype::F32 => Format::F32,
    };
    let embed_fmt = if opts.q8_embeddings && opts.dtype == WeightDtype::Int4 {
        Format::Q8
    } else {
        Format::F32
    };
    // The loader reads `lm_head.weight` unless tied, and `synth` writes it only when untied.
    let untied = !c.tie_word_embeddings;
    let mut jobs = vec![(c.vocab_size, c.hidden_size, embed_fmt)];
    if untied {
        jobs.push((c.vocab_size, c.hidden_size, embed_fmt));
    }
    for _ in 0..c.n_layers {
        for p in Proj::ALL {
            let (rows, cols) = p.shape(c);
            jobs.push((rows, cols, proj_fmt));
        }
    }
    let mut it = random_weights(&jobs, seed)?.into_iter();
    let mut next = || it.next().expect("one weight per job");
    let embed = next();
    let lm_head = untied.then(&mut next);
    let layers = (0..c.n_layers)
        .map(|_| LayerWeights {
            attn_norm: vec![1.0; c.hidden_size],
            ffn_norm: vec![1.0; c.hidden_size],
            proj: std::array::from_fn(|pi| {
                let p = Proj::ALL[pi];
                Linear {
                    weight: next(),
                    bias: p.has_bias(c).then(|| vec![0.0; p.shape(c).0]),
                }
            }),
        })
        .collect();
    let weights = ModelWeights {
        embed,
        layers,
        norm: vec![1.0; c.hidden_size],
        lm_head,
    };
    weights.validate(c)?;
    let tokenizer = TextTokenizer::from_hf_folder(tokenizer_dir, c).with_context(|| {
        format!(
            "the tokenizer of {} (pass a folder with tokenizer.json)",
            tokenizer_dir.display()
        )
    })?;
    Ok(Model {
        config,
        weights,
        tokenizer,
        format: ModelFormat::HfFolder,
        name: name.to_string(),
    })
}

/// One random matrix per `(rows, cols, format)`, in order, built on every core (largest first, so
/// that the embedding starts at once); matrix `i` is seeded by `(seed, i)`.
fn random_weights(jobs: &[(usize, usize, Format)], seed: u64) -> Result<Vec<Weight>> {
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].0 * jobs[i].1));
    let slots: Vec<OnceLock<Result<Weight>>> = jobs.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(jobs.len())
        .max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let (rows, cols, f) = jobs[i];
                    let w = random_weight(rows, cols, f, seed_of(&[seed, i as u64]));
                    slots[i].get_or_init(|| w);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().expect("every job ran"))
        .collect()
}

/// A uniform value in [0.75, 1.25) from the low 24 bits of `r`.
fn jitter(r: u64) -> f32 {
    0.75 + 0.5 * (r & 0xFF_FFFF) as f32 / (1u32 << 24) as f32
}

fn random_weight(rows: usize, cols: usize, f: Format, seed: u64) -> Result<Weight> {
    let mut g = Rng::new(seed);
    Ok(match f {
        Format::Q4 { group } => Weight::Q4(random_q4(rows, cols, group, &mut g)?),
        Format::Q8 => Weight::Q8(random_q8(rows, cols, &mut g)?),
        Format::F32 => {
            let mut w = vec![0f32; rows * cols];
            g.fill_normal(&mut w, 0.02);
            Weight::F32(DenseMatrix::new(rows, cols, w)?)
        }
    })
}

/// Random codes under metadata as `Q4Matrix::quantize` lays it out: per row, each group of
/// `group` columns has one f16 scale (near [`Q4_SCALE`]) and an integer zero point (7 or 8),
/// repeated in each of its blocks; codes past `cols` hold the zero point (they dequantize to 0).
fn random_q4(rows: usize, cols: usize, group: usize, g: &mut Rng) -> Result<Q4Matrix> {
    let bpr = Q4Matrix::blocks_per_row_for(cols);
    let per_group = group / QK;
    let mut blocks = vec![BlockQ4::default(); rows * bpr];
    for row in blocks.chunks_exact_mut(bpr) {
        for (gi, grp) in row.chunks_mut(per_group).enumerate() {
            let r = g.next_u64();
            let d = f16::from_f32(Q4_SCALE * jitter(r)).to_bits();
            let zero = 7 + (r >> 63) as u8;
            for (bi, b) in grp.iter_mut().enumerate() {
                b.d = d;
                b.m = zero as u16;
                b.qs[..8].copy_from_slice(&g.next_u64().to_le_bytes());
                b.qs[8..].copy_from_slice(&g.next_u64().to_le_bytes());
                let k0 = (gi * per_group + bi) * QK;
                for j in (cols - k0).min(QK)..QK {
                    b.set_code(j, zero);
                }
            }
        }
    }
    Ok(Q4Matrix::from_blocks(
        rows,
        cols,
        Q4Kind::ZeroPoint,
        blocks,
    )?)
}

/// Random Q8_0 blocks: codes uniform in [-127, 127] under a scale near [`Q8_SCALE`]; codes past
/// `cols` are 0, as `Q8Matrix::quantize` pads.
fn random_q8(rows: usize, cols: usize, g: &mut Rng) -> Result<Q8Matrix> {
    let bpr = cols.div_ceil(QK);
    let mut blocks = Vec::with_capacity(rows * bpr);
    for _ in 0..rows {
        for b in 0..bpr {
            let d = f16::from_f32(Q8_SCALE * jitter(g.next_u64())).to_bits();
            let mut qs = [0i8; QK];
            for chunk in qs.chunks_exact_mut(8) {
                for (q, x) in chunk.iter_mut().zip(g.next_u64().to_le_bytes()) {
                    *q = (x as i8).max(-127);
                }
            }
            qs[(cols - b * QK).min(QK)..].fill(0);
            blocks.push(BlockQ8 { d, qs });
        }
    }
    Ok(Q8Matrix::from_blocks(rows, cols, blocks)?)
}

#[cfg(test)]
mod tests {
    use edgelora_daemon::engine::forward::ActMode;
    use edgelora_daemon::engine::{ForwardOptions, KvDtype, KvPool, SeqKv, SeqStep, forward};

    use super::*;

    /// A folder removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("edgelora-synth-test-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            Self(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Whether every quantization group of every row repeats one scale and zero point.
    fn groups_share_metadata(q: &Q4Matrix, group: usize) -> bool {
        let per = group / QK;
        (0..q.rows()).all(|n| {
            let blocks = q.row_blocks(n);
            blocks
                .chunks(per)
                .all(|g| g.iter().all(|b| (b.d, b.m) == (g[0].d, g[0].m)))
        })
    }

    /// One line per tensor: name, format, shape, bytes, INT4 kind and whether the metadata
    /// follows `group_size`; norms with their length and whether they are all ones.
    fn describe(m: &Model, group_size: usize) -> Vec<String> {
        let w = &m.weights;
        let mat = |name: String, x: &Weight| {
            let extra = match x {
                Weight::Q4(q) => format!(
                    " {:?} grouped {}",
                    q.kind(),
                    groups_share_metadata(q, group_size)
                ),
                _ => String::new(),
            };
            format!(
                "{name}: {} [{}, {}] {} B{extra}",
                x.format_name(),
                x.rows(),
                x.cols(),
                x.nbytes()
            )
        };
        let norm = |name: String, v: &[f32]| {
            format!(
                "{name}: norm {} ones {}",
                v.len(),
                v.iter().all(|&x| x == 1.0)
            )
        };
        let mut out = vec![mat("embed".into(), &w.embed)];
        out.push(match &w.lm_head {
            Some(h) => mat("lm_head".into(), h),
            None => "lm_head: tied".into(),
        });
        for (i, l) in w.layers.iter().enumerate() {
            out.push(norm(format!("{i}.attn_norm"), &l.attn_norm));
            out.push(norm(format!("{i}.ffn_norm"), &l.ffn_norm));
            for p in Proj::ALL {
                let lin = l.get(p);
                out.push(mat(format!("{i}.{}", p.hf_name()), &lin.weight));
                out.push(format!(
                    "{i}.{} bias {:?}",
                    p.hf_name(),
                    lin.bias.as_ref().map(Vec::len)
                ));
            }
        }
        out.push(norm("norm".into(), &w.norm));
        out
    }

    /// The option sets the benches load with: the int8 fast path (Q8 head), the exact path
    /// (f32 head), a wider INT4 group, and full precision.
    fn option_sets() -> Vec<LoadOptions> {
        vec![
            LoadOptions::default(),
            LoadOptions::reference(WeightDtype::Int4),
            LoadOptions {
                group_size: 64,
                ..LoadOptions::default()
            },
            LoadOptions::reference(WeightDtype::F32),
        ]
    }

    /// One forward step of a short prompt on the CPU: the logits are finite and not constant.
    fn check_forward(m: &Model, act: ActMode) {
        let c = &m.config;
        let geom = c.kv_geometry(16);
        let mut pool = KvPool::new(geom, KvDtype::F32, 4).unwrap();
        let mut kv = SeqKv::new();
        let tokens = m.tokenizer.encode("Once upon a time", true).unwrap();
        let mut seqs = [SeqStep {
            tokens: &tokens,
            kv: &mut kv,
            adapter: None,
            all_logits: false,
        }];
        let opts = ForwardOptions { sparse: None, act };
        let logits = forward(m, &mut pool, &mut seqs, &opts).unwrap();
        let l = &logits[0];
        assert_eq!(l.len(), c.vocab_size);
        assert!(
            l.iter().all(|x| x.is_finite()),
            "{act:?}: non-finite logits"
        );
        let (lo, hi) = l
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(hi > lo, "{act:?}: constant logits");
        kv.release(&mut pool);
    }

    /// Writes a folder of dims `d` with config `cfg`, loads it under each of `sets` and compares
    /// it with the model built in memory from the same config, tensor by tensor; then runs a CPU
    /// step on the in-memory one on both activation paths.
    fn check_against_loader(d: &Dims, cfg: &Value, label: &str, sets: &[LoadOptions]) {
        let dir = TempDir::new(label);
        let tok = fixture_tokenizer_dir();
        write_folder(d, cfg, label, &dir.0, 1000, 0, &tok).unwrap();
        for opts in sets {
            let loaded = Model::load(&dir.0, opts).unwrap();
            let config = ModelConfig::from_hf_json(cfg).unwrap();
            let ours = random_model(config, opts, 1, &tok, label).unwrap();
            let what = format!("{label} {opts:?}");
            assert_eq!(
                format!("{:?}", loaded.config),
                format!("{:?}", ours.config),
                "{what}"
            );
            assert_eq!(
                describe(&loaded, opts.group_size),
                describe(&ours, opts.group_size),
                "{what}"
            );
            assert_eq!(
                (loaded.tokenizer.bos_id, &loaded.tokenizer.eos_ids),
                (ours.tokenizer.bos_id, &ours.tokenizer.eos_ids),
                "{what}"
            );
            assert_eq!(
                loaded.weights.bytes_per_token(),
                ours.weights.bytes_per_token(),
                "{what}"
            );
            for act in [ActMode::Int8, ActMode::Exact] {
                check_forward(&ours, act);
            }
        }
    }

    /// A small llama, tied and untied, with groups of 64 that end short (96 and 160 columns).
    #[test]
    fn in_memory_model_matches_the_loader_on_a_small_shape() {
        for tied in [true, false] {
            let d = Dims {
                hidden: 96,
                layers: 2,
                heads: 3,
                kv_heads: 1,
                inter: 160,
                vocab: 512,
                tied,
            };
            let label = if tied { "small-tied" } else { "small-untied" };
            let extra = json!({"rope_theta": 10000.0, "rms_norm_eps": 1e-5});
            check_against_loader(&d, &config_json(&d, &extra, label), label, &option_sets());
        }
    }

    /// The real smollm2 shape, from the config `synth --shape smollm2` writes (270 MB of f16),
    /// under the default options; [`model_in_memory`] builds from that same config.
    #[test]
    fn in_memory_model_matches_the_loader_on_smollm2() {
        let (d, cfg) = config(Shape::Smollm2);
        let opts = LoadOptions::default();
        check_against_loader(&d, &cfg, "smollm2", std::slice::from_ref(&opts));
        let ours = model_in_memory(Shape::Smollm2, &opts, 1, &fixture_tokenizer_dir()).unwrap();
        let loaded_config = ModelConfig::from_hf_json(&cfg).unwrap();
        assert_eq!(format!("{:?}", ours.config), format!("{loaded_config:?}"));
        assert_eq!(ours.name, "synth-smollm2");
    }
}
