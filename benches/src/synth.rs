//! Hugging Face folders with random weights of a real model's shape, so that shapes we cannot
//! download can still be benchmarked: `config.json`, f16 safetensors (N(0, 0.02) projections and
//! embeddings, unit norms) in shards of about `--shard-mb` with `model.safetensors.index.json`,
//! and the tiny-llama fixture's tokenizer (the model only needs `vocab_size` for its shapes; every
//! id the tokenizer produces is inside it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
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
        "edgelora_synthetic": format!("random N(0, 0.02) weights of the {shape:?} shape"),
    });
    for (k, v) in extra.as_object().expect("object") {
        cfg[k] = v.clone();
    }
    (d, cfg)
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

fn fixture_tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

pub fn run(a: SynthArgs) -> Result<()> {
    let (d, cfg) = config(a.shape);
    let list = tensors(&d);
    let out = &a.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    // Shards of at most shard_mb (a tensor larger than that gets a shard of its own).
    let limit = a.shard_mb.max(1) * 1_000_000;
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
        "synth {:?}: {:.2} G parameters, {:.2} GB at f16, {n_shards} shard(s) -> {}",
        a.shape,
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
                generate(shape.iter().product(), *norm, a.seed, i)
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
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&json!({"bos_token_id": 0, "eos_token_id": 1}))?,
    )?;
    let tok_dir = a
        .tokenizer_from
        .clone()
        .unwrap_or_else(fixture_tokenizer_dir);
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
    println!(
        "{}",
        json!({"bench": "synth", "shape": format!("{:?}", a.shape), "out": out, "shards": n_shards,
               "parameters": params, "bytes": total_bytes, "seconds": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}
