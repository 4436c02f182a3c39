//! Perplexity by the method of llama.cpp's `llama-perplexity`, so figures compare on the same file:
//! the text is tokenized once (with BOS where the model adds one), cut into non-overlapping windows
//! of `ctx` tokens, the first token of each window replaced by BOS when the model adds BOS, and only
//! the predictions of the second half of each window are scored (`first = ctx / 2`).

use edgelora_kernels::cpu::ops::log_softmax_at;

use super::{Backend, EngineError, ForwardOptions, SeqKv, SeqStep};
use crate::model::Model;

#[derive(Clone, Debug)]
pub struct PerplexityReport {
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    pub ppl: f64,
    /// Running perplexity after each window, as llama-perplexity prints it.
    pub running: Vec<f64>,
}

/// Rows per forward inside a window (bounds the logits buffer to `batch * vocab` floats).
const EVAL_BATCH: usize = 256;

/// How to cut and score the text.
#[derive(Clone, Copy, Debug)]
pub struct PerplexityParams {
    /// Tokens per window.
    pub ctx: usize,
    /// Score at most this many windows (`None`: every whole window).
    pub max_chunks: Option<usize>,
    /// Written over each window's first token when the model adds BOS (llama.cpp does the same).
    pub bos: Option<u32>,
}

pub fn perplexity(
    model: &Model,
    pool: &mut (impl Backend + ?Sized),
    tokens: &[u32],
    params: PerplexityParams,
    opts: &ForwardOptions,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PerplexityReport, EngineError> {
    let PerplexityParams {
        ctx,
        max_chunks,
        bos,
    } = params;
    if ctx < 4 {
        return Err(EngineError::Invalid(format!(
            "ctx {ctx} is too small (at least 4)"
        )));
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        return Err(EngineError::Invalid(format!(
            "the text has {} tokens, fewer than one window of ctx {ctx}",
            tokens.len()
        )));
    }
    let chunks = max_chunks.map_or(available, |n| n.min(available));
    let first = ctx / 2;
    let vocab = model.config.vocab_size;
    let (mut nll, mut count) = (0f64, 0usize);
    let mut running = Vec::with_capacity(chunks);
    for ci in 0..chunks {
        let mut window = tokens[ci * ctx..(ci + 1) * ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        let mut kv = SeqKv::new();
        let result = (|| {
            let mut at = 0;
            while at < ctx {
                let end = (at + EVAL_BATCH).min(ctx);
                let want = end > first;
                let mut step = [SeqStep {
                    tokens: &window[at..end],
                    kv: &mut kv,
                    adapter: None,
                    all_logits: want,
                }];
                let logits = pool.step(model, &mut step, opts)?.pop().unwrap_or_default();
                if want {
                    // Row i of this batch is the distribution after token at + i, predicting at + i + 1.
                    for i in 0..(end - at) {
                        let p = at + i;
                        if p >= first && p + 1 < ctx {
                            let row = &logits[i * vocab..(i + 1) * vocab];
                            nll -= log_softmax_at(row, window[p + 1] as usize);
                            count += 1;
                        }
                    }
                }
                at = end;
            }
            Ok::<(), EngineError>(())
        })();
        pool.release(&mut kv);
        result?;
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        progress(ci + 1, chunks, ppl);
    }
    Ok(PerplexityReport {
        ctx,
        chunks,
        tokens_scored: count,
        ppl: (nll / count as f64).exp(),
        running,
    })
}
