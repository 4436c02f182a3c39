//! What the model benches share: loading options, the KV pool, prompt tokens, random adapters.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use edgelora_daemon::adapters::{LoraAdapter, LoraPair};
use edgelora_daemon::engine::forward::ActMode;
use edgelora_daemon::engine::{ForwardOptions, KvDtype, KvPool};
use edgelora_daemon::model::{LoadOptions, Model, ModelConfig, Proj, WeightDtype};
use edgelora_kernels::cpu::lora::AdapterBits;

use crate::rng::{Rng, seed_of};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file, Hugging Face folder or GPTQ folder (default: the embedded SmolLM2-135M-Instruct
    /// Q4_1 GGUF, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Projection weights: int4 or f32.
    #[arg(long, default_value = "int4")]
    pub dtype: WeightDtype,
    /// INT4 group size for quantize-at-load.
    #[arg(long, default_value_t = 32)]
    pub group_size: usize,
    /// Activations against quantized weights: int8 (the fast path) or f32 (exact).
    #[arg(long, default_value = "int8")]
    pub act: ActMode,
    /// KV cache element type: f32, f16 or int4.
    #[arg(long, default_value = "f32")]
    pub kv: KvDtype,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
}

/// Threads to use: the flag, else every core.
pub fn resolve_threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// Sizes the global thread pool; must run before anything uses it (model loading included).
pub fn init_threads(t: usize) {
    if !edgelora_kernels::cpu::threads::set_threads(t) {
        eprintln!("warning: the thread pool already exists with another size");
    }
}

pub struct Loaded {
    pub model: Model,
    pub path: PathBuf,
    pub opts: ForwardOptions,
}

impl ModelArgs {
    pub fn path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => edgelora_daemon::default_model::ensure()
                .map_err(anyhow::Error::msg)
                .context("fetching the default model"),
        }
    }

    /// The options the model loads with (from a folder, or built in memory by `synth`).
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            dtype: self.dtype,
            group_size: self.group_size,
            // The fast path's head is 8-bit, as llama.cpp's converters make it.
            q8_embeddings: self.act == ActMode::Int8,
        }
    }

    pub fn load(&self) -> Result<Loaded> {
        let path = self.path()?;
        let t0 = std::time::Instant::now();
        let model = Model::load(&path, &self.load_options())
            .with_context(|| format!("loading {}", path.display()))?;
        eprintln!(
            "loaded {} ({} layers, hidden {}, vocab {}, {:.1} MB of weights per token) in {:.1}s",
            path.display(),
            model.config.n_layers,
            model.config.hidden_size,
            model.config.vocab_size,
            model.weights.bytes_per_token() as f64 / 1e6,
            t0.elapsed().as_secs_f64()
        );
        Ok(Loaded {
            model,
            path,
            opts: ForwardOptions {
                sparse: None,
                act: self.act,
            },
        })
    }

    /// A pool with room for `seqs` sequences of `tokens` tokens each.
    pub fn pool(&self, model: &Model, seqs: usize, tokens: usize) -> Result<KvPool> {
        let c = &model.config;
        let geom = c.kv_geometry(self.page_size.max(1));
        let pages = seqs * (tokens.div_ceil(geom.page_size) + 1);
        Ok(KvPool::new(geom, self.kv, pages)?)
    }
}

const TEXT: &str = "The history of the region begins with small farming villages along the river. \
Over the centuries, traders brought new crops, tools and ideas, and the villages grew into towns \
with markets, schools and libraries. Today the valley is known for its orchards, its old stone \
bridges and a festival every autumn, when musicians from across the country gather to play.";

/// `n` token ids of ordinary text (repeated as needed), all inside the model's vocabulary.
pub fn text_tokens(model: &Model, n: usize) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = model
        .tokenizer
        .encode(TEXT, false)?
        .into_iter()
        .filter(|&t| (t as usize) < model.config.vocab_size)
        .collect();
    if ids.is_empty() {
        ids = (1..64)
            .map(|t| t % model.config.vocab_size as u32)
            .collect();
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

/// A random LoRA adapter on all seven projections of every layer (scaling 1). A is uniform with
/// std about `1/sqrt(in)`, B small, so the deltas are modest and the logits stay finite.
pub fn synth_adapter(c: &ModelConfig, rank: usize, index: usize, bits: AdapterBits) -> LoraAdapter {
    let layers = (0..c.n_layers)
        .map(|l| {
            std::array::from_fn(|pi| {
                let p = Proj::ALL[pi];
                let (out, inp) = p.shape(c);
                let mut g = Rng::new(seed_of(&[index as u64, l as u64, pi as u64]));
                let sa = (3.0 / inp as f32).sqrt();
                let a = (0..rank * inp).map(|_| g.symmetric(sa)).collect();
                let b = (0..out * rank).map(|_| g.symmetric(0.01)).collect();
                Some(LoraPair::with_bits(rank, a, b, bits).expect("consistent LoRA shapes"))
            })
        })
        .collect();
    let mut adapter = LoraAdapter {
        name: format!("synth-{index}"),
        rank,
        alpha: rank as f32,
        use_rslora: false,
        scaling: 1.0,
        layers,
        targets: Proj::ALL.to_vec(),
    };
    // As the engine's loaders leave them.
    adapter.pack_pages();
    adapter
}

/// Bytes of an adapter's A and B matrices that a step it takes part in reads: their Q8_0 copies on
/// the int8 path, the f32 ones on the exact path.
pub fn adapter_bytes(a: &LoraAdapter, act: ActMode) -> usize {
    a.layers
        .iter()
        .flatten()
        .flatten()
        .map(|p| match act {
            ActMode::Int8 => p.nbytes_q(),
            ActMode::Exact => (p.a.len() + p.b.len()) * 4,
        })
        .sum()
}

/// Multiply-adds of an adapter for one token: `rank * (in + out)` per adapted projection.
pub fn adapter_macs(a: &LoraAdapter) -> usize {
    a.layers
        .iter()
        .flatten()
        .flatten()
        .map(|p| p.a.len() + p.b.len())
        .sum()
}

/// Multiply-adds of one token through every projection (the output head excluded).
pub fn projection_macs(c: &ModelConfig) -> usize {
    c.n_layers
        * Proj::ALL
            .iter()
            .map(|p| {
                let (o, i) = p.shape(c);
                o * i
            })
            .sum::<usize>()
}

/// A short label of the model for reports.
pub fn model_label(path: &std::path::Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
