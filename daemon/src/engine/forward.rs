//! One forward step over a batch of sequences, each with its own adapter (or none).
//!
//! The rows of every sequence in the step are stacked: each base projection runs once over all
//! rows (the weights are read once per step whatever the batch mixes), then the LoRA deltas are
//! added per segment of rows sharing an adapter (SGMV), never by merging weights. Keys and values
//! go into the sequences' KV pages; attention reads them back page by page.

use edgelora_kernels::Weight;
use edgelora_kernels::cpu::act::ActQ8;
use edgelora_kernels::cpu::attention::{Query, SparseConfig, paged_attention_rows};
use edgelora_kernels::cpu::kv::KvPool;
use edgelora_kernels::cpu::lora::{LoraSegment, LoraSegmentQ8, sgmv_reference};
use edgelora_kernels::cpu::matmul::{Input, ProjQ8, project_q8};
use edgelora_kernels::cpu::ops::{Rope, rms_norm, rms_norm_rows, swiglu};
use edgelora_kernels::cpu::qdot::best_isa;

use super::{EngineError, PagePool, SeqKv};
use crate::adapters::LoraAdapter;
use crate::model::{Model, Proj};

/// Pages at the start of a sequence whose keys and values stay in full precision under an INT4
/// KV cache: the first tokens are attention sinks that draw a large share of every query's
/// attention, so their rounding error is felt everywhere (as IntactKV and KVQuant observe).
pub const SINK_PAGES: usize = 1;
/// Full pages that stay in full precision behind the page being written (KIVI's residual window):
/// recent tokens draw most of the remaining attention. On SmolLM2 / KJV Genesis at ctx 512, INT4
/// KV costs +2.7% perplexity with none kept, +0.65% with the sink page and two recent ones.
pub const RECENT_PAGES: usize = 2;

/// One sequence's part of a step: new tokens appended after what its KV already holds.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub kv: &'a mut SeqKv,
    pub adapter: Option<&'a LoraAdapter>,
    /// Logits for every new token (evaluation) instead of only the last.
    pub all_logits: bool,
}

/// Activation precision for products with quantized (INT4, Q8) weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActMode {
    /// f32 activations against dequantized weights: the reference arithmetic (goldens).
    Exact,
    /// Activations quantized to int8 per block of 32 and integer SIMD dot products, as llama.cpp's
    /// default CPU path does: several times faster, small log-probability differences.
    #[default]
    Int8,
}

impl std::str::FromStr for ActMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int8" | "q8" => Ok(ActMode::Int8),
            "f32" | "exact" => Ok(ActMode::Exact),
            other => Err(format!("unknown activation mode {other:?} (int8 or f32)")),
        }
    }
}

impl ForwardOptions {
    /// Reference arithmetic, dense attention.
    pub fn exact() -> Self {
        Self {
            sparse: None,
            act: ActMode::Exact,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ForwardOptions {
    /// Query-aware page sparsity; `None` = dense attention.
    pub sparse: Option<SparseConfig>,
    /// How quantized weights meet their inputs.
    pub act: ActMode,
}

/// Rotary tables for a model.
pub fn rope_for(model: &Model) -> Rope {
    Rope {
        inv_freq: model.config.rope_inv_freq(),
        head_dim: model.config.head_dim,
        mscale: 1.0,
    }
}

/// The bookkeeping of one step, shared by every backend.
pub struct StepPlan<'a> {
    /// Rows (new tokens) in the step, all sequences stacked.
    pub rows: usize,
    /// Position of each row in its sequence.
    pub pos: Vec<usize>,
    /// Sequence each row belongs to.
    pub owner: Vec<usize>,
    /// Runs of consecutive rows sharing an adapter.
    pub segments: Vec<(std::ops::Range<usize>, &'a LoraAdapter)>,
    /// Rows whose logits are returned, in output order.
    pub logit_rows: Vec<usize>,
}

/// Validates a step and reserves its KV pages; on error nothing was changed.
pub fn plan_step<'a>(
    model: &Model,
    pool: &mut (impl PagePool + ?Sized),
    seqs: &mut [SeqStep<'a>],
) -> Result<StepPlan<'a>, EngineError> {
    let c = &model.config;
    // Validate everything before touching any state.
    for s in seqs.iter() {
        if s.tokens.is_empty() {
            return Err(EngineError::Invalid(
                "a sequence in the step has no new tokens".into(),
            ));
        }
        if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::BadToken {
                id,
                vocab: c.vocab_size,
            });
        }
        let new_len = s.kv.len + s.tokens.len();
        if let Some(win) = c.sliding_window
            && new_len > win
        {
            return Err(EngineError::TooLong {
                len: new_len,
                limit: win,
                why: "sliding-window attention is not implemented past the window",
            });
        }
    }
    let needed: usize = seqs
        .iter()
        .map(|s| s.kv.pages_needed(pool, s.kv.len + s.tokens.len()))
        .sum();
    if needed > pool.free_count() {
        return Err(EngineError::KvExhausted {
            needed,
            free: pool.free_count(),
        });
    }
    for s in seqs.iter_mut() {
        let new_len = s.kv.len + s.tokens.len();
        s.kv.reserve(pool, new_len)?;
    }

    // Row bookkeeping: positions, owning sequence, and adapter segments.
    let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let mut pos = Vec::with_capacity(rows);
    let mut owner = Vec::with_capacity(rows);
    for (si, s) in seqs.iter().enumerate() {
        for i in 0..s.tokens.len() {
            pos.push(s.kv.len + i);
            owner.push(si);
        }
    }
    // Consecutive sequences with the same adapter form one segment.
    let mut segments: Vec<(std::ops::Range<usize>, &LoraAdapter)> = Vec::new();
    let mut r0 = 0;
    for s in seqs.iter() {
        let r1 = r0 + s.tokens.len();
        if let Some(a) = s.adapter {
            match segments.last_mut() {
                Some((range, prev)) if range.end == r0 && std::ptr::eq(*prev, a) => range.end = r1,
                _ => segments.push((r0..r1, a)),
            }
        }
        r0 = r1;
    }

    let mut logit_rows = Vec::new();
    let mut r0 = 0;
    for s in seqs.iter() {
        let n = s.tokens.len();
        if s.all_logits {
            logit_rows.extend(r0..r0 + n);
        } else {
            logit_rows.push(r0 + n - 1);
        }
        r0 += n;
    }
    Ok(StepPlan {
        rows,
        pos,
        owner,
        segments,
        logit_rows,
    })
}

/// Runs one step. Returns, per sequence, `[n_new, vocab]` logits when `all_logits`, else `[vocab]`
/// for its last token. On error nothing was written to any sequence.
pub fn forward(
    model: &Model,
    pool: &mut KvPool,
    seqs: &mut [SeqStep<'_>],
    opts: &ForwardOptions,
) -> Result<Vec<Vec<f32>>, EngineError> {
    let c = &model.config;
    let w = &model.weights;
    let (hd, qd, kvd, hidden) = (c.head_dim, c.q_dim(), c.kv_dim(), c.hidden_size);
    let StepPlan {
        rows,
        pos,
        owner,
        segments,
        logit_rows: sel_rows,
    } = plan_step(model, pool, seqs)?;

    let rope = rope_for(model);
    // Every row's rotations, once for all the layers.
    let half = rope.inv_freq.len();
    let mut angles = Vec::with_capacity(rows * half);
    for &p in &pos {
        rope.angles(p, &mut angles);
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let page_size = pool.geometry().page_size;

    let mut x = vec![0f32; rows * hidden];
    let mut r = 0;
    for s in seqs.iter() {
        for &t in s.tokens {
            w.embed
                .dequantize_row(t as usize, &mut x[r * hidden..(r + 1) * hidden]);
            r += 1;
        }
    }
    let mut h = vec![0f32; rows * hidden];
    let mut q = vec![0f32; rows * qd];
    let mut k = vec![0f32; rows * kvd];
    let mut v = vec![0f32; rows * kvd];
    let mut att = vec![0f32; rows * qd];
    let mut o = vec![0f32; rows * hidden];
    let mut gate = vec![0f32; rows * c.intermediate_size];
    let mut up = vec![0f32; rows * c.intermediate_size];

    let int8 = opts.act == ActMode::Int8;
    let mut xq = ActQ8::new();
    // Quantizes a projection input once for all the projections that read it.
    let quantize = |xq: &mut ActQ8, input: &[f32], cols: usize| {
        if int8 {
            xq.quantize_from(input, rows, cols);
        }
    };
    // Projections that read the same input (q, k, v; gate, up), with the LoRA deltas of every
    // segment of rows sharing an adapter. On the int8 path all of it is one parallel region.
    let project = |xq: &ActQ8, layer: usize, input: &[f32], outs: &mut [(Proj, &mut [f32])]| {
        let lw = &w.layers[layer];
        if !int8 {
            for (p, out) in outs.iter_mut() {
                let lin = lw.get(*p);
                lin.forward(
                    &Input {
                        x: input,
                        m: rows,
                        q8: None,
                    },
                    out,
                );
                let (cols, out_dim) = (lin.weight.cols(), lin.weight.rows());
                let segs: Vec<LoraSegment<'_>> = segments
                    .iter()
                    .filter_map(|(range, a)| {
                        a.get(layer, *p).map(|pair| LoraSegment {
                            rows: range.clone(),
                            a: &pair.a,
                            b: &pair.b,
                            rank: pair.rank,
                            scaling: a.scaling,
                        })
                    })
                    .collect();
                if !segs.is_empty() {
                    sgmv_reference(input, cols, out, out_dim, &segs);
                }
            }
            return;
        }
        // Dense (f32) weights take the exact product; their LoRA deltas still run on int8.
        let quantized = outs
            .iter()
            .all(|(p, _)| !matches!(lw.get(*p).weight, Weight::F32(_)));
        if !quantized {
            for (p, o) in outs.iter_mut() {
                lw.get(*p).forward(
                    &Input {
                        x: input,
                        m: rows,
                        q8: Some(xq),
                    },
                    o,
                );
            }
        }
        let segs: Vec<Vec<LoraSegmentQ8<'_>>> = outs
            .iter()
            .map(|(p, _)| {
                segments
                    .iter()
                    .filter_map(|(range, a)| {
                        a.get(layer, *p).map(|pair| LoraSegmentQ8 {
                            rows: range.clone(),
                            a: &pair.a_q,
                            b: &pair.b_q,
                            scaling: a.scaling,
                        })
                    })
                    .collect()
            })
            .collect();
        let mut jobs: Vec<ProjQ8<'_, '_>> = outs
            .iter_mut()
            .zip(&segs)
            .map(|((p, o), sg)| {
                let weight = &lw.get(*p).weight;
                ProjQ8 {
                    weight: quantized.then_some(weight),
                    out_dim: weight.rows(),
                    out: o,
                    lora: sg,
                }
            })
            .collect();
        project_q8(&mut jobs, xq, best_isa());
        if quantized {
            for (p, o) in outs.iter_mut() {
                lw.get(*p).add_bias(o);
            }
        }
    };

    for (li, lw) in w.layers.iter().enumerate() {
        rms_norm_rows(&x, &lw.attn_norm, c.rms_norm_eps, &mut h);
        quantize(&mut xq, &h, hidden);
        project(
            &xq,
            li,
            &h,
            &mut [(Proj::Q, &mut q), (Proj::K, &mut k), (Proj::V, &mut v)],
        );
        for (rr, cs) in angles.chunks_exact(half).enumerate() {
            rope.apply_at(&mut q[rr * qd..(rr + 1) * qd], c.n_heads, cs);
            rope.apply_at(&mut k[rr * kvd..(rr + 1) * kvd], c.n_kv_heads, cs);
        }
        // Write this step's keys and values.
        for rr in 0..rows {
            let kv = &seqs[owner[rr]].kv;
            let p = pos[rr];
            let page = kv.pages[p / page_size];
            let slot = p % page_size;
            pool.write(
                li,
                page,
                slot,
                &k[rr * kvd..(rr + 1) * kvd],
                &v[rr * kvd..(rr + 1) * kvd],
            );
            // A page is sealed (INT4 quantizes it) once RECENT_PAGES newer pages have begun;
            // the attention-sink page 0 never is.
            if slot == page_size - 1 && p / page_size >= RECENT_PAGES + SINK_PAGES {
                pool.seal(li, kv.pages[p / page_size - RECENT_PAGES]);
            }
        }
        let queries: Vec<Query<'_>> = (0..rows)
            .map(|rr| Query {
                pages: &seqs[owner[rr]].kv.pages,
                n_tokens: pos[rr] + 1,
            })
            .collect();
        paged_attention_rows(
            pool,
            li,
            &queries,
            &q,
            c.n_heads,
            scale,
            opts.sparse.as_ref(),
            &mut att,
        );
        quantize(&mut xq, &att, qd);
        project(&xq, li, &att, &mut [(Proj::O, &mut o)]);
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += ov;
        }
        rms_norm_rows(&x, &lw.ffn_norm, c.rms_norm_eps, &mut h);
        quantize(&mut xq, &h, hidden);
        project(
            &xq,
            li,
            &h,
            &mut [(Proj::Gate, &mut gate), (Proj::Up, &mut up)],
        );
        swiglu(&mut gate, &up);
        quantize(&mut xq, &gate, c.intermediate_size);
        project(&xq, li, &gate, &mut [(Proj::Down, &mut o)]);
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += ov;
        }
    }

    // Final norm and logits only for the rows asked for, all sequences in one product so the
    // output matrix is read once per step.
    let m = sel_rows.len();
    let mut hn = vec![0f32; m * hidden];
    for (i, &rr) in sel_rows.iter().enumerate() {
        rms_norm(
            &x[rr * hidden..(rr + 1) * hidden],
            &w.norm,
            c.rms_norm_eps,
            &mut hn[i * hidden..(i + 1) * hidden],
        );
    }
    let vocab = c.vocab_size;
    let mut logits = vec![0f32; m * vocab];
    let hq = int8.then(|| ActQ8::quantize(&hn, m, hidden));
    w.output().matmul_input(
        &Input {
            x: &hn,
            m,
            q8: hq.as_ref(),
        },
        &mut logits,
    );
    let mut out = Vec::with_capacity(seqs.len());
    if let [s] = seqs {
        // One sequence: its rows are all of them, handed over without a copy.
        s.kv.len += s.tokens.len();
        out.push(logits);
    } else {
        let mut at = 0;
        for s in seqs.iter_mut() {
            let n = if s.all_logits { s.tokens.len() } else { 1 };
            out.push(logits[at * vocab..(at + n) * vocab].to_vec());
            at += n;
            s.kv.len += s.tokens.len();
        }
    }
    Ok(out)
}
