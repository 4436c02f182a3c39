//! The forward step on a CUDA device: the same step as [`super::forward`], with the weights, the
//! adapters in use and the KV pages in device memory.
//!
//! Activations stay f32 on the device by default (the exact arithmetic of the CPU reference: the
//! INT4 and Q8 weights are dequantized inside the product kernels), so the goldens hold on CUDA as
//! on the CPU. The int8 fast mode is opt-in on CUDA ([`CudaBackend::set_int8_activations`], or
//! `EDGELORA_CUDA_INT8=1` for the daemon) and then applies with `--act int8`: a step of up to 32
//! rows quantizes each projection's input once (`qact`: the CPU's int8 blocks and outliers), fused
//! into the kernel that writes it, and the INT4 / Q8 products run on `dp4a`; longer steps (prefill)
//! keep f32 activations, and the LoRA deltas always use the f32 input. Opt-in because, measured on
//! an H100, its products are faster (8B gate/down at 1.03 / 0.90 of the copy bandwidth against
//! 0.71 / 0.69) but its quantization is not yet: outlier-heavy rows (SwiGLU outputs) cost up to 16
//! block-wide passes, and decode came out slower (BENCHMARKS.md). Only the logits of the rows
//! asked for come back to the host.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use edgelora_kernels::cpu::kv::{KvDtype, KvGeometry, PageId};
use edgelora_kernels::cuda::attention::{
    GpuKvPool, GpuQuery, attention_plan, paged_attention_planned,
};
use edgelora_kernels::cuda::linear::{GEMV_MAX_M, GpuWeight};
use edgelora_kernels::cuda::lora::{
    GpuLora, GpuLoraSegment, LoraFactors, SgmvPlan, sgmv_plan, sgmv_planned,
};
use edgelora_kernels::cuda::ops::{
    add_assign, add_bias_rows, add_rms_norm_rows, rms_norm_rows, rope_rows, swiglu,
};
use edgelora_kernels::cuda::qact::GpuActQ8;
use edgelora_kernels::cuda::sample::argmax_rows;
use edgelora_kernels::cuda::{CudaError, Gpu};

use super::forward::{ActMode, RECENT_PAGES, SINK_PAGES, StepPlan, plan_step};
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

/// An adapter's pairs in device memory, `[layer][proj]`, uploaded on the upload stream.
struct GpuAdapter {
    pairs: Vec<[Option<GpuLora>; 7]>,
    /// Recorded on the upload stream after the last copy; the compute stream waits on it.
    ready: CudaEvent,
    /// The pinned buffer the copy reads from, kept until `ready` has passed (`None` once it went
    /// back to the spare list, or for an adapter without projections).
    staging: Option<PinnedHostSlice<f32>>,
}

/// Activation buffers of a step, kept across steps; `rows` is their capacity.
struct Scratch {
    rows: usize,
    x: CudaSlice<f32>,
    h: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: CudaSlice<f32>,
    o: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    /// int8 copies of the projections' inputs (fast mode, steps of up to [`GEMV_MAX_M`] rows):
    /// the normed hidden state, the attention output, the MLP's inner activation.
    q8_hidden: GpuActQ8,
    q8_att: GpuActQ8,
    q8_inter: GpuActQ8,
}

impl Scratch {
    fn new(g: &Gpu, rows: usize, c: &crate::model::ModelConfig) -> Result<Self, CudaError> {
        let s = g.stream();
        let (qd, kvd, hidden, inter) = (c.q_dim(), c.kv_dim(), c.hidden_size, c.intermediate_size);
        Ok(Self {
            rows,
            x: s.alloc_zeros(rows * hidden)?,
            h: s.alloc_zeros(rows * hidden)?,
            q: s.alloc_zeros(rows * qd)?,
            k: s.alloc_zeros(rows * kvd)?,
            v: s.alloc_zeros(rows * kvd)?,
            att: s.alloc_zeros(rows * qd)?,
            o: s.alloc_zeros(rows * hidden)?,
            gate: s.alloc_zeros(rows * inter)?,
            up: s.alloc_zeros(rows * inter)?,
            q8_hidden: GpuActQ8::new(g, GEMV_MAX_M, hidden)?,
            q8_att: GpuActQ8::new(g, GEMV_MAX_M, qd)?,
            q8_inter: GpuActQ8::new(g, GEMV_MAX_M, inter)?,
        })
    }
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
    /// Adapter uploads run here, beside the compute stream, from pinned staging memory.
    upload: Arc<CudaStream>,
    /// Adapters uploaded so far, by address of the host adapter (the registry keeps them alive).
    adapters: HashMap<usize, (Arc<str>, GpuAdapter)>,
    /// Staging buffers of finished uploads, kept for the next ones (at most [`SPARE_STAGING`]).
    spare_staging: Vec<PinnedHostSlice<f32>>,
    /// Device bytes of the weights a decode step reads.
    weight_bytes: usize,
    scratch: Option<Scratch>,
    /// The int8 fast mode for `--act int8` steps (see the module docs).
    int8_activations: bool,
}

/// Spare pinned staging buffers a backend keeps for adapter uploads.
const SPARE_STAGING: usize = 4;

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
        let geom = c.kv_geometry(page_size);
        let pool = GpuKvPool::new(g, geom, kv, n_pages)?;
        let upload = gpu.context().new_stream().map_err(CudaError::from)?;
        Ok(Self {
            upload,
            embed,
            layers,
            norm: upload_f32(g, &w.norm)?,
            lm_head,
            inv_freq: upload_f32(g, &c.rope_inv_freq())?,
            pool,
            adapters: HashMap::new(),
            spare_staging: Vec::new(),
            weight_bytes,
            scratch: None,
            int8_activations: std::env::var("EDGELORA_CUDA_INT8").is_ok_and(|v| v == "1"),
            gpu,
        })
    }

    /// Turns the int8 fast mode on or off for steps run with `--act int8` (off by default; see
    /// the module docs). Steps with `--act f32` stay exact either way.
    pub fn set_int8_activations(&mut self, on: bool) {
        self.int8_activations = on;
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

    /// Starts copying an adapter to the device on the upload stream and returns without
    /// waiting: steps that use it make the compute stream wait for the copy on the device, so a
    /// load overlaps the steps that do not need it. A no-op when it is already resident.
    pub fn prefetch_adapter(&mut self, a: &LoraAdapter) -> Result<(), EngineError> {
        let key = a as *const LoraAdapter as usize;
        if let Some((name, _)) = self.adapters.get(&key)
            && **name == *a.name
        {
            return Ok(());
        }
        // Every projection of the adapter: one pinned staging buffer, one device buffer, one copy.
        let mut factors = Vec::new();
        let mut slots = Vec::new();
        for (li, layer) in a.layers.iter().enumerate() {
            for (pi, pair) in layer.iter().enumerate() {
                if let Some(pair) = pair {
                    let w = &self.layers[li].proj[pi].weight;
                    factors.push(LoraFactors {
                        a: &pair.a,
                        b: &pair.b,
                        rank: pair.rank,
                        cols: w.cols(),
                        out_dim: w.rows(),
                        scaling: a.scaling,
                    });
                    slots.push((li, pi));
                }
            }
        }
        // A staging buffer of an earlier upload of the same size, if one is spare (filling it
        // waits for its last copy); page-locking a fresh one costs more than the copy itself.
        let len = GpuLora::staging_len(&factors)?;
        let reuse = self
            .spare_staging
            .iter()
            .position(|p| p.len() == len)
            .map(|i| self.spare_staging.swap_remove(i));
        let (loras, stage) = GpuLora::upload_all_staged(&self.upload, &factors, reuse)?;
        let mut pairs: Vec<[Option<GpuLora>; 7]> =
            (0..a.layers.len()).map(|_| Default::default()).collect();
        for ((li, pi), lora) in slots.into_iter().zip(loras) {
            pairs[li][pi] = Some(lora);
        }
        let ready = self
            .gpu
            .context()
            .new_event(None)
            .map_err(CudaError::from)?;
        ready.record(&self.upload).map_err(CudaError::from)?;
        self.adapters.insert(
            key,
            (
                Arc::from(a.name.as_str()),
                GpuAdapter {
                    pairs,
                    ready,
                    staging: stage,
                },
            ),
        );
        Ok(())
    }

    /// Resident adapters whose upload has not finished yet.
    pub fn adapters_in_flight(&self) -> usize {
        self.adapters
            .values()
            .filter(|(_, ga)| !ga.ready.is_complete())
            .count()
    }

    /// Forgets an adapter's device copy (the residency manager calls this on eviction).
    pub fn evict_adapter(&mut self, a: &LoraAdapter) -> Result<(), EngineError> {
        // Steps already queued may still read it: let them finish before its memory is freed.
        self.gpu.stream().synchronize().map_err(CudaError::from)?;
        if let Some((_, ga)) = self.adapters.remove(&(a as *const LoraAdapter as usize)) {
            self.recycle(ga.staging);
        }
        Ok(())
    }

    /// Keeps staging buffers for later uploads (refilling one first waits for its last copy, so
    /// they may still be in flight).
    fn recycle(&mut self, staging: impl IntoIterator<Item = PinnedHostSlice<f32>>) {
        self.spare_staging.extend(staging);
        let excess = self.spare_staging.len().saturating_sub(SPARE_STAGING);
        self.spare_staging.drain(..excess);
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

    fn page_size(&self) -> usize {
        self.pool.geometry().page_size
    }

    fn free_pages(&self) -> usize {
        self.pool.free_count()
    }

    fn describe(&self) -> String {
        let i = self.gpu.info();
        format!("cuda:{} ({}, {})", i.ordinal, i.name, i.arch)
    }

    fn page_bytes(&self) -> usize {
        self.pool.bytes_per_page()
    }

    fn take_pages(&mut self, n: usize) -> Option<Vec<PageId>> {
        super::backend::take_pages(&mut self.pool, n)
    }

    fn give_pages(&mut self, pages: Vec<PageId>) {
        for p in pages {
            self.pool.free(p);
        }
    }

    fn adapter_resident(&mut self, adapter: &LoraAdapter) -> Result<(), EngineError> {
        self.prefetch_adapter(adapter)
    }

    fn adapter_evicted(&mut self, adapter: &LoraAdapter) -> Result<(), EngineError> {
        self.evict_adapter(adapter)
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
                self.prefetch_adapter(a)?;
                let (_, ga) = &self.adapters[&(a as *const LoraAdapter as usize)];
                // A device-side wait: the host goes on queueing the step.
                self.gpu.stream().wait(&ga.ready).map_err(CudaError::from)?;
            }
        }
        // Staging memory of finished uploads goes back to the spare list.
        let mut done = Vec::new();
        for (_, ga) in self.adapters.values_mut() {
            if ga.staging.is_some() && ga.ready.is_complete() {
                done.extend(ga.staging.take());
            }
        }
        self.recycle(done);
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
        // Token ids and positions travel in one copy.
        let mut meta = ids;
        meta.extend_from_slice(&pos32);
        let d_meta = s.clone_htod(&meta).map_err(CudaError::from)?;
        let d_ids = d_meta.slice(0..rows);
        let d_pos = d_meta.slice(rows..2 * rows);

        // Activations live in buffers kept across steps (grown when a step has more rows).
        let mut scr = match self.scratch.take() {
            Some(sc) if sc.rows >= rows => sc,
            _ => Scratch::new(g, rows.next_power_of_two().max(16), c)?,
        };
        let Scratch {
            x,
            h,
            q,
            k,
            v,
            att,
            o,
            gate,
            up,
            q8_hidden,
            q8_att,
            q8_inter,
            ..
        } = &mut scr;
        // The fast mode's int8 inputs: quantized once per input, shared by the projections
        // reading it (q, k, v; gate, up), by the kernel that writes the input (RMSNorm, residual
        // add + RMSNorm, SwiGLU) except for the attention output.
        let int8 = self.int8_activations && opts.act == ActMode::Int8 && rows <= GEMV_MAX_M;
        let eps = c.rms_norm_eps;
        self.embed
            .gather_rows(g, &d_ids, rows, &mut x.as_view_mut())?;

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

        // Page tables, page selection scratch and split-K layout: once per step, for every layer.
        let att_plan = attention_plan(g, &self.pool, &queries, c.n_heads, opts.sparse.as_ref())?;
        // Every LoRA delta of the step, (layer, projection) by (layer, projection): one upload.
        let (lora_plan, lora_call) = Self::lora_plan(g, &self.adapters, self.layers.len(), plan)?;
        let lora = LoraStep {
            plan: &lora_plan,
            call: &lora_call,
        };

        let w0 = self.layers[0].attn_norm.as_view();
        if int8 {
            q8_hidden.rms_norm_quantize(g, &x.as_view(), &w0, rows, eps, &mut h.as_view_mut())?;
        } else {
            rms_norm_rows(
                g,
                &x.as_view(),
                &w0,
                rows,
                hidden,
                eps,
                &mut h.as_view_mut(),
            )?;
        }
        let n_layers = self.layers.len();
        for li in 0..n_layers {
            let qx = int8.then_some(&*q8_hidden);
            for (p, out) in [(Proj::Q, &mut *q), (Proj::K, &mut *k), (Proj::V, &mut *v)] {
                self.project(li, p, h, qx, rows, out, &lora)?;
            }
            rope_rows(
                g,
                &mut q.as_view_mut(),
                rows,
                c.n_heads,
                hd,
                &d_pos,
                &self.inv_freq.as_view(),
                1.0,
            )?;
            rope_rows(
                g,
                &mut k.as_view_mut(),
                rows,
                c.n_kv_heads,
                hd,
                &d_pos,
                &self.inv_freq.as_view(),
                1.0,
            )?;
            self.pool.write_rows(
                g,
                li,
                &k.slice(0..rows * kvd),
                &v.slice(0..rows * kvd),
                &pages,
                &slots,
            )?;
            for &p in &seal {
                self.pool.seal(g, li, p)?;
            }
            paged_attention_planned(
                g,
                &self.pool,
                &att_plan,
                li,
                &q.slice(0..rows * qd),
                scale,
                &mut att.slice_mut(0..rows * qd),
            )?;
            if int8 {
                q8_att.quantize(g, &att.as_view(), rows)?;
            }
            self.project(li, Proj::O, att, int8.then_some(&*q8_att), rows, o, &lora)?;
            // x += attention output; h = ffn_norm(x), in one pass.
            self.add_norm(
                g,
                x,
                o,
                li,
                Norm::Ffn,
                rows,
                eps,
                h,
                int8.then_some(&mut *q8_hidden),
            )?;
            let qx = int8.then_some(&*q8_hidden);
            self.project(li, Proj::Gate, h, qx, rows, gate, &lora)?;
            self.project(li, Proj::Up, h, qx, rows, up, &lora)?;
            if int8 {
                q8_inter.swiglu_quantize(g, &mut gate.as_view_mut(), &up.as_view(), rows)?;
            } else {
                swiglu(g, &mut gate.as_view_mut(), &up.as_view(), rows * inter)?;
            }
            self.project(
                li,
                Proj::Down,
                gate,
                int8.then_some(&*q8_inter),
                rows,
                o,
                &lora,
            )?;
            if li + 1 < n_layers {
                // x += MLP output; h = the next layer's attn_norm(x).
                let q = int8.then_some(&mut *q8_hidden);
                self.add_norm(g, x, o, li + 1, Norm::Attn, rows, eps, h, q)?;
            } else {
                add_assign(g, &mut x.as_view_mut(), &o.as_view(), rows * hidden)?;
            }
        }

        // Final norm and the output head over the rows whose logits are wanted.
        let m = plan.logit_rows.len();
        // Decode steps want every row in order: norm straight from x; otherwise gather the rows.
        let contiguous = plan.logit_rows.iter().enumerate().all(|(i, &r)| i == r);
        if !contiguous {
            for (i, &rr) in plan.logit_rows.iter().enumerate() {
                s.memcpy_dtod(
                    &x.slice(rr * hidden..(rr + 1) * hidden),
                    &mut o.slice_mut(i * hidden..(i + 1) * hidden),
                )
                .map_err(CudaError::from)?;
            }
        }
        let src = if contiguous { x.as_view() } else { o.as_view() };
        let vocab = c.vocab_size;
        let mut logits = s.alloc_zeros::<f32>(m * vocab).map_err(CudaError::from)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let wn = self.norm.as_view();
        if int8 && head.takes_q8() {
            q8_hidden.rms_norm_quantize(g, &src, &wn, m, eps, &mut h.as_view_mut())?;
            head.matmul_q8(g, q8_hidden, m, &mut logits.as_view_mut())?;
        } else {
            rms_norm_rows(g, &src, &wn, m, hidden, eps, &mut h.as_view_mut())?;
            head.matmul(g, &h.as_view(), m, &mut logits.as_view_mut())?;
        }
        self.scratch = Some(scr);
        Ok(logits)
    }

    /// `x += y`, then `h` = layer `li`'s `which` RMSNorm of `x`, and `h` quantized into `q` when
    /// given (the fast mode), in one launch.
    #[allow(clippy::too_many_arguments)]
    fn add_norm(
        &self,
        g: &Gpu,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        li: usize,
        which: Norm,
        rows: usize,
        eps: f32,
        h: &mut CudaSlice<f32>,
        q: Option<&mut GpuActQ8>,
    ) -> Result<(), CudaError> {
        let l = &self.layers[li];
        let w = match which {
            Norm::Attn => l.attn_norm.as_view(),
            Norm::Ffn => l.ffn_norm.as_view(),
        };
        let (xv, yv, hv) = (&mut x.as_view_mut(), &y.as_view(), &mut h.as_view_mut());
        match q {
            Some(q) => q.add_rms_norm_quantize(g, xv, yv, &w, rows, eps, hv),
            None => add_rms_norm_rows(g, xv, yv, &w, rows, w.len(), eps, hv),
        }
    }

    /// The step's LoRA work as one plan: a call per (layer, projection) that has segments.
    fn lora_plan<'s>(
        gpu: &Gpu,
        adapters: &'s HashMap<usize, (Arc<str>, GpuAdapter)>,
        n_layers: usize,
        plan: &StepPlan<'_>,
    ) -> Result<(SgmvPlan<'s>, Vec<CallIndex>), EngineError> {
        let mut calls: Vec<Vec<GpuLoraSegment<'s>>> = Vec::new();
        let mut index = vec![[None; 7]; n_layers];
        if !plan.segments.is_empty() {
            for (li, slot) in index.iter_mut().enumerate() {
                for (pi, call) in slot.iter_mut().enumerate() {
                    let segs: Vec<GpuLoraSegment<'s>> = plan
                        .segments
                        .iter()
                        .filter_map(|(range, a)| {
                            let key = *a as *const LoraAdapter as usize;
                            let (_, ga) = adapters.get(&key)?;
                            ga.pairs[li][pi].as_ref().map(|l| GpuLoraSegment {
                                rows: range.clone(),
                                lora: l,
                            })
                        })
                        .collect();
                    if !segs.is_empty() {
                        *call = Some(calls.len());
                        calls.push(segs);
                    }
                }
            }
        }
        Ok((sgmv_plan(gpu, &calls)?, index))
    }

    /// out = input · Wᵀ (+ bias) + the LoRA deltas of the step's adapter segments; the product
    /// from `q8` (the input quantized) when given and the weight takes it.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        li: usize,
        p: Proj,
        input: &CudaSlice<f32>,
        q8: Option<&GpuActQ8>,
        rows: usize,
        out: &mut CudaSlice<f32>,
        lora: &LoraStep<'_, '_>,
    ) -> Result<(), EngineError> {
        let g = &*self.gpu;
        let lin = &self.layers[li].proj[p.index()];
        match q8 {
            Some(qa) if lin.weight.takes_q8() => {
                lin.weight.matmul_q8(g, qa, rows, &mut out.as_view_mut())?
            }
            _ => lin
                .weight
                .matmul(g, &input.as_view(), rows, &mut out.as_view_mut())?,
        }
        if let Some(b) = &lin.bias {
            add_bias_rows(
                g,
                &mut out.as_view_mut(),
                &b.as_view(),
                rows,
                lin.weight.rows(),
            )?;
        }
        if let Some(call) = lora.call[li][p.index()] {
            sgmv_planned(
                g,
                lora.plan,
                call,
                &input.as_view(),
                lin.weight.cols(),
                &mut out.as_view_mut(),
                lin.weight.rows(),
            )?;
        }
        Ok(())
    }
}

/// A layer's two RMSNorms.
#[derive(Clone, Copy)]
enum Norm {
    Attn,
    Ffn,
}

/// Per projection of a layer, the SGMV plan call that adds its LoRA deltas (if any).
type CallIndex = [Option<usize>; 7];

/// The LoRA plan of a step and which call serves each (layer, projection).
struct LoraStep<'p, 'a> {
    plan: &'p SgmvPlan<'a>,
    call: &'p [CallIndex],
}
