//! The forward step on a CUDA device: the same step as [`super::forward`], with the weights, the
//! adapters in use and the KV pages in device memory.
//!
//! Activations stay f32 on the device (the exact arithmetic of the CPU reference: the INT4 and Q8
//! weights are dequantized inside the product kernels), so the goldens hold on CUDA as on the CPU.
//! Only the logits of the rows asked for come back to the host.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use edgelora_kernels::cpu::kv::{KvDtype, KvGeometry, PageId};
use edgelora_kernels::cuda::attention::{GpuKvPool, GpuQuery, paged_attention_rows};
use edgelora_kernels::cuda::linear::GpuWeight;
use edgelora_kernels::cuda::lora::{GpuLora, GpuLoraSegment, sgmv};
use edgelora_kernels::cuda::ops::{add_assign, add_bias_rows, rms_norm_rows, rope_rows, swiglu};
use edgelora_kernels::cuda::sample::argmax_rows;
use edgelora_kernels::cuda::{CudaError, Gpu};

use super::forward::{RECENT_PAGES, SINK_PAGES, StepPlan, plan_step};
use super::{Backend, EngineError, ForwardOptions, PagePool, SeqKv, SeqStep};
use crate::adapters::LoraAdapter;
use crate::model::{Model, Proj};

impl From<CudaError> for EngineError {
    fn from(e: CudaError) -> Self {
        EngineError::Device(e.to_string())
    }
}

struct GpuLinear {
    weight: GpuWeight,
    bias: Option<CudaSlice<f32>>,
}

struct GpuLayer {
    attn_norm: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    proj: Vec<GpuLinear>,
}

/// An adapter's pairs in device memory, `[layer][proj]`.
struct GpuAdapter {
    pairs: Vec<[Option<GpuLora>; 7]>,
}

/// A model on a CUDA device with its KV pool: a [`Backend`].
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    embed: GpuWeight,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<f32>,
    /// `None`: the embedding is tied and doubles as the output head.
    lm_head: Option<GpuWeight>,
    inv_freq: CudaSlice<f32>,
    pool: GpuKvPool,
    /// Adapters uploaded so far, by address of the host adapter (the registry keeps them alive).
    adapters: HashMap<usize, (Arc<str>, GpuAdapter)>,
    /// Device bytes of the weights a decode step reads.
    weight_bytes: usize,
}

fn upload_f32(gpu: &Gpu, v: &[f32]) -> Result<CudaSlice<f32>, CudaError> {
    Ok(gpu.stream().clone_htod(v)?)
}

impl CudaBackend {
    /// Uploads `model` to `gpu` and makes a pool of `n_pages` KV pages.
    pub fn new(
        gpu: Arc<Gpu>,
        model: &Model,
        kv: KvDtype,
        page_size: usize,
        n_pages: usize,
    ) -> Result<Self, EngineError> {
        let c = &model.config;
        let w = &model.weights;
        let g = &*gpu;
        if c.rope_inv_freq().len() * 2 != c.head_dim {
            return Err(EngineError::Invalid(format!(
                "partial rotary embeddings ({} of {} dimensions) are not implemented on CUDA",
                c.rope_inv_freq().len() * 2,
                c.head_dim
            )));
        }
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(w.layers.len());
        for lw in &w.layers {
            let mut proj = Vec::with_capacity(7);
            for lin in &lw.proj {
                let weight = GpuWeight::upload(g, &lin.weight)?;
                weight_bytes += weight.nbytes();
                let bias = match &lin.bias {
                    Some(b) => Some(upload_f32(g, b)?),
                    None => None,
                };
                proj.push(GpuLinear { weight, bias });
            }
            layers.push(GpuLayer {
                attn_norm: upload_f32(g, &lw.attn_norm)?,
                ffn_norm: upload_f32(g, &lw.ffn_norm)?,
                proj,
            });
        }
        let embed = GpuWeight::upload(g, &w.embed)?;
        let lm_head = match &w.lm_head {
            Some(h) => Some(GpuWeight::upload(g, h)?),
            None => None,
        };
        weight_bytes += lm_head.as_ref().unwrap_or(&embed).nbytes();
        let geom = KvGeometry {
            page_size,
            n_layers: c.n_layers,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let pool = GpuKvPool::new(g, geom, kv, n_pages)?;
        Ok(Self {
            embed,
            layers,
            norm: upload_f32(g, &w.norm)?,
            lm_head,
            inv_freq: upload_f32(g, &c.rope_inv_freq())?,
            pool,
            adapters: HashMap::new(),
            weight_bytes,
            gpu,
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Device bytes of weights one decode step reads.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    pub fn pool(&self) -> &GpuKvPool {
        &self.pool
    }

    fn ensure_adapter(&mut self, a: &LoraAdapter) -> Result<(), EngineError> {
        let key = a as *const LoraAdapter as usize;
        if let Some((name, _)) = self.adapters.get(&key)
            && **name == *a.name
        {
            return Ok(());
        }
        let mut pairs = Vec::with_capacity(a.layers.len());
        for (li, layer) in a.layers.iter().enumerate() {
            let mut slot: [Option<GpuLora>; 7] = Default::default();
            for (pi, pair) in layer.iter().enumerate() {
                if let Some(pair) = pair {
                    let w = &self.layers[li].proj[pi].weight;
                    slot[pi] = Some(GpuLora::upload(
                        &self.gpu,
                        &pair.a,
                        &pair.b,
                        pair.rank,
                        w.cols(),
                        w.rows(),
                        a.scaling,
                    )?);
                }
            }
            pairs.push(slot);
        }
        self.adapters
            .insert(key, (Arc::from(a.name.as_str()), GpuAdapter { pairs }));
        Ok(())
    }

    /// Forgets an adapter's device copy (the residency manager calls this on eviction).
    pub fn evict_adapter(&mut self, a: &LoraAdapter) {
        self.adapters.remove(&(a as *const LoraAdapter as usize));
    }
}

impl PagePool for GpuKvPool {
    fn geometry(&self) -> &KvGeometry {
        GpuKvPool::geometry(self)
    }
    fn free_count(&self) -> usize {
        GpuKvPool::free_count(self)
    }
    fn alloc(&mut self) -> Option<PageId> {
        GpuKvPool::alloc(self)
    }
    fn free(&mut self, page: PageId) {
        GpuKvPool::free(self, page)
    }
}

impl Backend for CudaBackend {
    fn step(
        &mut self,
        model: &Model,
        seqs: &mut [SeqStep<'_>],
        opts: &ForwardOptions,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let logits = self.step_device(model, seqs, opts)?;
        let host = self
            .gpu
            .stream()
            .clone_dtoh(&logits)
            .map_err(CudaError::from)?;
        let vocab = model.config.vocab_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for sq in seqs.iter() {
            let n = if sq.all_logits { sq.tokens.len() } else { 1 };
            out.push(host[at * vocab..(at + n) * vocab].to_vec());
            at += n;
        }
        Ok(out)
    }

    fn release(&mut self, kv: &mut SeqKv) {
        kv.release(&mut self.pool)
    }

    fn describe(&self) -> String {
        let i = self.gpu.info();
        format!("cuda:{} ({}, {})", i.ordinal, i.name, i.arch)
    }
}

impl CudaBackend {
    /// A step whose logits stay on the device: `[logit rows, vocab]`.
    fn step_device(
        &mut self,
        model: &Model,
        seqs: &mut [SeqStep<'_>],
        opts: &ForwardOptions,
    ) -> Result<CudaSlice<f32>, EngineError> {
        for s in seqs.iter() {
            if let Some(a) = s.adapter {
                self.ensure_adapter(a)?;
            }
        }
        let plan = plan_step(model, &mut self.pool, seqs)?;
        match self.run(model, seqs, &plan, opts) {
            Ok(logits) => {
                for s in seqs.iter_mut() {
                    s.kv.len += s.tokens.len();
                }
                Ok(logits)
            }
            Err(e) => {
                // Nothing of a failed step counts: give back the pages it reserved.
                let ps = self.pool.geometry().page_size;
                for s in seqs.iter_mut() {
                    for p in s.kv.pages.drain(s.kv.len.div_ceil(ps)..) {
                        self.pool.free(p);
                    }
                }
                Err(e)
            }
        }
    }

    /// A greedy step: the argmax of each logit row, computed on the device (only the ids travel).
    pub fn step_argmax(
        &mut self,
        model: &Model,
        seqs: &mut [SeqStep<'_>],
        opts: &ForwardOptions,
    ) -> Result<Vec<u32>, EngineError> {
        let logits = self.step_device(model, seqs, opts)?;
        let vocab = model.config.vocab_size;
        let rows = logits.len() / vocab;
        Ok(argmax_rows(&self.gpu, &logits.as_view(), rows, vocab)?)
    }

    fn run(
        &mut self,
        model: &Model,
        seqs: &[SeqStep<'_>],
        plan: &StepPlan<'_>,
        opts: &ForwardOptions,
    ) -> Result<CudaSlice<f32>, EngineError> {
        let c = &model.config;
        let g = &*self.gpu;
        let s = g.stream();
        let (hd, qd, kvd, hidden, inter) = (
            c.head_dim,
            c.q_dim(),
            c.kv_dim(),
            c.hidden_size,
            c.intermediate_size,
        );
        let rows = plan.rows;
        let page_size = self.pool.geometry().page_size;
        let scale = 1.0 / (hd as f32).sqrt();

        let ids: Vec<u32> = seqs.iter().flat_map(|q| q.tokens.iter().copied()).collect();
        let pos32: Vec<u32> = plan.pos.iter().map(|&p| p as u32).collect();
        let d_ids = s.clone_htod(&ids).map_err(CudaError::from)?;
        let d_pos = s.clone_htod(&pos32).map_err(CudaError::from)?;

        let alloc = |n: usize| -> Result<CudaSlice<f32>, CudaError> { Ok(s.alloc_zeros(n)?) };
        let mut x = alloc(rows * hidden)?;
        let mut h = alloc(rows * hidden)?;
        let mut q = alloc(rows * qd)?;
        let mut k = alloc(rows * kvd)?;
        let mut v = alloc(rows * kvd)?;
        let mut att = alloc(rows * qd)?;
        let mut o = alloc(rows * hidden)?;
        let mut gate = alloc(rows * inter)?;
        let mut up = alloc(rows * inter)?;
        self.embed
            .gather_rows(g, &d_ids.as_view(), rows, &mut x.as_view_mut())?;

        // Where each row's key and value go, and which pages seal after it.
        let mut pages = Vec::with_capacity(rows);
        let mut slots = Vec::with_capacity(rows);
        let mut seal = Vec::new();
        for rr in 0..rows {
            let kv = &seqs[plan.owner[rr]].kv;
            let p = plan.pos[rr];
            pages.push(kv.pages[p / page_size]);
            slots.push(p % page_size);
            if p % page_size == page_size - 1 && p / page_size >= RECENT_PAGES + SINK_PAGES {
                seal.push(kv.pages[p / page_size - RECENT_PAGES]);
            }
        }
        let queries: Vec<GpuQuery<'_>> = (0..rows)
            .map(|rr| GpuQuery {
                pages: &seqs[plan.owner[rr]].kv.pages,
                n_tokens: plan.pos[rr] + 1,
            })
            .collect();

        for li in 0..self.layers.len() {
            let layer = &self.layers[li];
            rms_norm_rows(
                g,
                &x.as_view(),
                &layer.attn_norm.as_view(),
                rows,
                hidden,
                c.rms_norm_eps,
                &mut h.as_view_mut(),
            )?;
            for (p, out) in [(Proj::Q, &mut q), (Proj::K, &mut k), (Proj::V, &mut v)] {
                self.project(li, p, &h, rows, out, plan)?;
            }
            rope_rows(
                g,
                &mut q.as_view_mut(),
                rows,
                c.n_heads,
                hd,
                &d_pos.as_view(),
                &self.inv_freq.as_view(),
                1.0,
            )?;
            rope_rows(
                g,
                &mut k.as_view_mut(),
                rows,
                c.n_kv_heads,
                hd,
                &d_pos.as_view(),
                &self.inv_freq.as_view(),
                1.0,
            )?;
            self.pool
                .write_rows(g, li, &k.as_view(), &v.as_view(), &pages, &slots)?;
            for &p in &seal {
                self.pool.seal(g, li, p)?;
            }
            paged_attention_rows(
                g,
                &self.pool,
                li,
                &queries,
                &q.as_view(),
                c.n_heads,
                scale,
                opts.sparse.as_ref(),
                &mut att.as_view_mut(),
            )?;
            self.project(li, Proj::O, &att, rows, &mut o, plan)?;
            add_assign(g, &mut x.as_view_mut(), &o.as_view(), rows * hidden)?;
            let layer = &self.layers[li];
            rms_norm_rows(
                g,
                &x.as_view(),
                &layer.ffn_norm.as_view(),
                rows,
                hidden,
                c.rms_norm_eps,
                &mut h.as_view_mut(),
            )?;
            self.project(li, Proj::Gate, &h, rows, &mut gate, plan)?;
            self.project(li, Proj::Up, &h, rows, &mut up, plan)?;
            swiglu(g, &mut gate.as_view_mut(), &up.as_view(), rows * inter)?;
            self.project(li, Proj::Down, &gate, rows, &mut o, plan)?;
            add_assign(g, &mut x.as_view_mut(), &o.as_view(), rows * hidden)?;
        }

        // Final norm and the output head over the rows whose logits are wanted.
        let m = plan.logit_rows.len();
        let mut sel = alloc(m * hidden)?;
        for (i, &rr) in plan.logit_rows.iter().enumerate() {
            s.memcpy_dtod(
                &x.slice(rr * hidden..(rr + 1) * hidden),
                &mut sel.slice_mut(i * hidden..(i + 1) * hidden),
            )
            .map_err(CudaError::from)?;
        }
        let mut hn = alloc(m * hidden)?;
        rms_norm_rows(
            g,
            &sel.as_view(),
            &self.norm.as_view(),
            m,
            hidden,
            c.rms_norm_eps,
            &mut hn.as_view_mut(),
        )?;
        let vocab = c.vocab_size;
        let mut logits = alloc(m * vocab)?;
        self.lm_head.as_ref().unwrap_or(&self.embed).matmul(
            g,
            &hn.as_view(),
            m,
            &mut logits.as_view_mut(),
        )?;
        Ok(logits)
    }

    /// out = input · Wᵀ (+ bias) + the LoRA deltas of the step's adapter segments.
    fn project(
        &self,
        li: usize,
        p: Proj,
        input: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
        plan: &StepPlan<'_>,
    ) -> Result<(), EngineError> {
        let g = &*self.gpu;
        let lin = &self.layers[li].proj[p.index()];
        lin.weight
            .matmul(g, &input.as_view(), rows, &mut out.as_view_mut())?;
        if let Some(b) = &lin.bias {
            add_bias_rows(
                g,
                &mut out.as_view_mut(),
                &b.as_view(),
                rows,
                lin.weight.rows(),
            )?;
        }
        let segs: Vec<GpuLoraSegment<'_>> = plan
            .segments
            .iter()
            .filter_map(|(range, a)| {
                let key = *a as *const LoraAdapter as usize;
                let (_, ga) = self.adapters.get(&key)?;
                ga.pairs[li][p.index()].as_ref().map(|l| GpuLoraSegment {
                    rows: range.clone(),
                    lora: l,
                })
            })
            .collect();
        if !segs.is_empty() {
            sgmv(
                g,
                &input.as_view(),
                lin.weight.cols(),
                &mut out.as_view_mut(),
                lin.weight.rows(),
                &segs,
            )?;
        }
        Ok(())
    }
}
