//! Generation for one sequence: chunked prefill, then decode with sampling and stop tokens.

use super::sampler::{Sampler, SamplingParams};
use super::{Backend, EngineError, ForwardOptions, SeqKv, SeqStep};
use crate::adapters::LoraAdapter;
use crate::model::Model;

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end generation (not included in the output).
    pub stop_ids: Vec<u32>,
    /// Reuse the KV cache between steps (the normal mode); `false` recomputes the whole sequence
    /// every step, which is how the cache is checked.
    pub use_cache: bool,
    /// Prompt tokens per prefill forward.
    pub prefill_chunk: usize,
    /// Keep the logits each token was chosen from.
    pub keep_logits: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
            use_cache: true,
            prefill_chunk: 512,
            keep_logits: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// `logits[t]`: the distribution token t was drawn from (when kept).
    pub logits: Vec<Vec<f32>>,
    pub finish: FinishReason,
    /// Seconds spent on the prompt (prefill) and on the generated tokens (decode).
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Runs a prompt through the model, `chunk` tokens per forward; returns the last token's logits.
pub fn prefill(
    model: &Model,
    pool: &mut (impl Backend + ?Sized),
    kv: &mut SeqKv,
    adapter: Option<&LoraAdapter>,
    tokens: &[u32],
    chunk: usize,
    opts: &ForwardOptions,
) -> Result<Vec<f32>, EngineError> {
    let mut last = Vec::new();
    for piece in tokens.chunks(chunk.max(1)) {
        let mut step = [SeqStep {
            tokens: piece,
            kv: &mut *kv,
            adapter,
            all_logits: false,
        }];
        last = pool.step(model, &mut step, opts)?.pop().unwrap_or_default();
    }
    Ok(last)
}

/// Generates up to `max_tokens` after `prompt`; `on_token` sees each token as it is chosen.
pub fn generate(
    model: &Model,
    pool: &mut (impl Backend + ?Sized),
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    params: &GenerateParams,
    opts: &ForwardOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    let mut sampler =
        Sampler::new(params.sampling.clone()).map_err(|e| EngineError::Invalid(e.to_string()))?;
    let mut history = prompt.to_vec();
    let mut out = Generation {
        tokens: Vec::new(),
        logits: Vec::new(),
        finish: FinishReason::Length,
        prefill_secs: 0.0,
        decode_secs: 0.0,
    };
    let mut kv = SeqKv::new();
    let t0 = std::time::Instant::now();
    let mut t_decode = None;
    let result = (|| {
        let mut logits = if params.use_cache {
            prefill(
                model,
                pool,
                &mut kv,
                adapter,
                prompt,
                params.prefill_chunk,
                opts,
            )?
        } else {
            full_recompute(model, pool, adapter, &history, params.prefill_chunk, opts)?
        };
        t_decode = Some(std::time::Instant::now());
        for _ in 0..params.max_tokens {
            let tok = sampler.sample(&logits, &history);
            if params.keep_logits {
                out.logits.push(std::mem::take(&mut logits));
            }
            if params.stop_ids.contains(&tok) {
                out.finish = FinishReason::Stop;
                break;
            }
            out.tokens.push(tok);
            history.push(tok);
            on_token(tok);
            if out.tokens.len() == params.max_tokens {
                break;
            }
            logits = if params.use_cache {
                let mut step = [SeqStep {
                    tokens: &[tok],
                    kv: &mut kv,
                    adapter,
                    all_logits: false,
                }];
                pool.step(model, &mut step, opts)?.pop().unwrap_or_default()
            } else {
                full_recompute(model, pool, adapter, &history, params.prefill_chunk, opts)?
            };
        }
        Ok(())
    })();
    pool.release(&mut kv);
    if let Some(td) = t_decode {
        out.prefill_secs = td.duration_since(t0).as_secs_f64();
        out.decode_secs = td.elapsed().as_secs_f64();
    }
    result.map(|()| out)
}

fn full_recompute(
    model: &Model,
    pool: &mut (impl Backend + ?Sized),
    adapter: Option<&LoraAdapter>,
    tokens: &[u32],
    chunk: usize,
    opts: &ForwardOptions,
) -> Result<Vec<f32>, EngineError> {
    let mut kv = SeqKv::new();
    let r = prefill(
        model,
        pool,
        &mut kv,
        adapter,
        tokens,
        chunk.max(tokens.len()),
        opts,
    );
    pool.release(&mut kv);
    r
}

/// Logits at every position of `tokens` from one forward with a fresh cache (`eval logits`).
pub fn all_logits(
    model: &Model,
    pool: &mut (impl Backend + ?Sized),
    adapter: Option<&LoraAdapter>,
    tokens: &[u32],
    opts: &ForwardOptions,
) -> Result<Vec<f32>, EngineError> {
    let mut kv = SeqKv::new();
    let mut step = [SeqStep {
        tokens,
        kv: &mut kv,
        adapter,
        all_logits: true,
    }];
    let r = pool
        .step(model, &mut step, opts)
        .map(|mut v| v.pop().unwrap_or_default());
    pool.release(&mut kv);
    r
}
