//! Paged attention on the device (`attention.cu`): the CUDA twin of [`crate::cpu::attention`].
//!
//! # Plan once per step, launch per layer
//!
//! [`attention_plan`] builds one `i32` *meta* array on the host and uploads it once per step (it
//! does not depend on the layer), with the scratch buffers every layer reuses:
//!
//! * rows section (8 ints per query row): offset of the row's page table entries, visible pages,
//!   `n_tokens`, first work item, number of work items, sparse index (-1 when dense);
//! * work section (3 ints per work item): row, first entry, end entry;
//! * sparse section (8 ints per row whose visible pages exceed the budget): row, candidates `C`
//!   (pages `1..recent_start`), `k` to pick, `recent_start`, offsets of its bounds, masks and list,
//!   list capacity;
//! * entries: the page id of each visible page, one table per distinct page table (rows of one
//!   sequence share it: prefill uploads its table once).
//!
//! INT4 staging slots are not in the plan: the kernels read the pool's device staging table
//! (kept by `write_rows` / `seal` / reopen / `free` in stream order), so one plan serves every
//! layer while pages are written and sealed between layers ([`AttentionPlan`] states the rule).
//! [`paged_attention_planned`] only launches kernels.
//!
//! Sparse rows run two or three small kernels: `attn_page_bounds` (one warp per candidate page,
//! which stages the page's key min / max in shared memory with 16-byte loads; lanes (head, u) sum
//! channels `u, u+8, ...` in order and xor shuffles pair the eight lanes exactly as
//! [`crate::cpu::attention::page_bound`]'s `reduce8`, so the bounds are bit-identical),
//! `attn_select_pages` (one block per (row, query head): MSB radix select over `f32::total_cmp` keys
//! with shared-memory histograms and warp-aggregated atomics for the `k`-th largest bound, then ties
//! by lower page index — the CPU's rule — writing a per-page bit mask of the group's heads; under
//! [`SparseConfig::group_shared`] one block per (row, kv head) ranks by the group's largest bound
//! and sets every head's bit, writing the kept-page list itself), and, for per-head selection,
//! `attn_compact_pages` (per (row, kv head), the ascending list of pages any head of the group
//! keeps, with their head masks; it clears the masks for the next layer). The selection is entirely
//! on the device.
//!
//! `attn_paged` is flash-decoding with split-K: one block per (work item, kv head); a work item is a
//! range of a row's entries (visible pages when dense, the compacted kept-page list when sparse).
//! The block decodes up to 32 tokens at a time into shared memory (INT4: one 16-byte code load per
//! thread and item, 16-byte scale loads; keys per channel, values per token, exactly as the CPU),
//! shared by the group's query heads (warp `g` owns query head `kv·G + g`, float4 dot products)
//! which each keep an online softmax. Rows with one work item are written directly; others leave
//! partial (max, sum, accumulator) and `attn_reduce` merges them. Splits are sized so the grid has
//! about four blocks per SM, so one sequence at 4K context already fills the GPU.

use std::collections::HashMap;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{CudaError, Gpu, KernelModule, as_i32, shape};
use crate::cpu::attention::SparseConfig;
use crate::cpu::kv::PageId;

pub use super::kv::{GpuKvPool, MAX_HEAD_DIM};

pub const MODULE: KernelModule = KernelModule {
    name: "attention",
    source: include_str!("../../cuda/attention.cu"),
    functions: &[
        "kv_fill_bounds",
        "kv_write_rows",
        "kv_seal_int4",
        "kv_reopen_int4",
        "kv_read_token",
        "attn_page_bounds",
        "attn_select_pages",
        "attn_compact_pages",
        "attn_paged",
        "attn_reduce",
    ],
};

/// Where one query row reads its keys and values (as [`crate::cpu::attention::Query`]).
#[derive(Clone, Copy, Debug)]
pub struct GpuQuery<'a> {
    /// The sequence's page table.
    pub pages: &'a [PageId],
    /// Tokens visible to this query (its position + 1).
    pub n_tokens: usize,
}

/// How rows are split over blocks. The default sizes splits from the SM count; tests force small
/// splits to exercise the merge.
#[derive(Clone, Copy, Debug, Default)]
pub struct SplitPlan {
    /// Entries (pages) per work item; `None`: automatic.
    pub entries_per_split: Option<usize>,
}

const ROW_INTS: usize = 8;
const SPARSE_INTS: usize = 8;
const WORK_INTS: usize = 3;
const SEL_THREADS: u32 = 1024;
/// Threads of an attn_reduce block (attention.cu).
const RED_THREADS: u32 = 1024;
/// Warps per attn_page_bounds block, candidate pages per block, and the channels a warp stages in
/// shared memory at a time (attention.cu).
const BOUND_WARPS: u32 = 8;
const BOUND_PAGES: usize = 32;
const BOUND_CHUNK: usize = 128;
/// Split-K target: blocks per SM over the whole grid (4 measured best at 4K and 32K contexts on an
/// H200: 26.7 / 141.9 us against 30.3 / 145.0 us with 8).
const WAVES_PER_SM: usize = 4;
/// Warps per attention block (at least the group size): all decode, G compute.
const ATTN_MIN_WARPS: usize = 8;
/// Entries of a work item an attention block caches at a time (`META_CAP` in attention.cu).
const META_CAP: usize = 64;
/// Candidate keys cached in shared memory by the selection kernel (32 KiB).
const KEY_CAP: usize = 8192;
const SMEM_LIMIT: usize = 48 * 1024;

/// `out[r × n_heads·head_dim]` = attention of query row `r` (`q`: `[rows × n_heads·head_dim]`,
/// after RoPE) over the first `n_tokens` tokens of its pages (causal by construction), GQA
/// (query head `h` reads KV head `h / (n_heads / n_kv_heads)`), softmax scale `scale`. With
/// `sparse`, each query head attends to the pages [`crate::cpu::attention::select_pages`] picks
/// (same pages, same sink / recent / tie rules). An empty context writes zeros.
///
/// Plans and runs in one go (one upload per call); a decode step with several layers should build
/// one [`AttentionPlan`] with [`attention_plan`] and call [`paged_attention_planned`] per layer.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_rows(
    gpu: &Gpu,
    pool: &GpuKvPool,
    layer: usize,
    queries: &[GpuQuery<'_>],
    q: &CudaView<'_, f32>,
    n_heads: usize,
    scale: f32,
    sparse: Option<&SparseConfig>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<(), CudaError> {
    paged_attention_rows_with(
        gpu,
        pool,
        layer,
        queries,
        q,
        n_heads,
        scale,
        sparse,
        out,
        SplitPlan::default(),
    )
}

/// [`paged_attention_rows`] with an explicit [`SplitPlan`].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_rows_with(
    gpu: &Gpu,
    pool: &GpuKvPool,
    layer: usize,
    queries: &[GpuQuery<'_>],
    q: &CudaView<'_, f32>,
    n_heads: usize,
    scale: f32,
    sparse: Option<&SparseConfig>,
    out: &mut CudaViewMut<'_, f32>,
    split: SplitPlan,
) -> Result<(), CudaError> {
    let plan = attention_plan_with(gpu, pool, queries, n_heads, sparse, split)?;
    paged_attention_planned(gpu, pool, &plan, layer, q, scale, out)
}

struct SparseRow {
    row: usize,
    cand: usize,
    k: usize,
    recent_start: usize,
    cap: usize,
}

/// Everything one step's attention needs on the device, for every layer: the per-row records,
/// split-K work items, sparse records and page tables (one upload), plus the scratch buffers
/// (page bounds, head masks, kept-page lists, split-K partials) its launches reuse layer after
/// layer.
///
/// # Validity rule
///
/// A plan depends only on the queries' page ids (the first `ceil(n_tokens / page_size)` of each
/// table), their `n_tokens`, `n_heads`, the sparse config and the pool's geometry — never on page
/// contents or on which INT4 pages are open. Staging slots of open INT4 pages are looked up at run
/// time from a device table that [`GpuKvPool::write_rows`], [`GpuKvPool::seal`] (and reopen / free)
/// update in stream order. So a step may build its plan once, before the first layer's
/// `write_rows`, and between layers write rows, seal and reopen pages freely: each
/// [`paged_attention_planned`] sees exactly the pool state its launch follows on the stream. What
/// the caller must not do while a plan is in use: free a page the plan reads, or change a query's
/// page table / `n_tokens` (build a new plan for that). All launches must stay on the pool's stream
/// (the [`Gpu`]'s), and plans are not to be shared by concurrently running steps (their scratch
/// buffers are reused by each run).
pub struct AttentionPlan {
    rows: usize,
    n_heads: usize,
    group: usize,
    geom: crate::cpu::kv::KvGeometry,
    capacity: usize,
    n_work: usize,
    n_sparse: usize,
    max_cand: usize,
    /// One selection per GQA group ([`SparseConfig::group_shared`]).
    shared: bool,
    split: bool,
    work_off: i32,
    sp_off: i32,
    ch: usize,
    meta: CudaSlice<i32>,
    counts: CudaSlice<i32>,
    lists: CudaSlice<i32>,
    bounds: CudaSlice<f32>,
    masks: CudaSlice<u32>,
    part: CudaSlice<f32>,
}

impl AttentionPlan {
    /// Query rows the plan covers.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Query heads per row.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Split-K work items (blocks per kv head).
    pub fn work_items(&self) -> usize {
        self.n_work
    }

    /// Rows whose visible pages exceed the sparse budget (they run the selection kernels).
    pub fn sparse_rows(&self) -> usize {
        self.n_sparse
    }
}

/// Uploads everything a step's attention needs (one host-to-device copy), for every layer. See
/// [`AttentionPlan`] for when it stays valid.
pub fn attention_plan(
    gpu: &Gpu,
    pool: &GpuKvPool,
    queries: &[GpuQuery<'_>],
    n_heads: usize,
    sparse: Option<&SparseConfig>,
) -> Result<AttentionPlan, CudaError> {
    attention_plan_with(gpu, pool, queries, n_heads, sparse, SplitPlan::default())
}

/// Tokens per attention chunk for head_dim `d` and group `group`: 32 (one per lane) unless shared
/// memory is short.
fn chunk_tokens(d: usize, group: usize) -> Result<usize, CudaError> {
    let mut ch = 32usize;
    while attn_smem(ch, d, group) > SMEM_LIMIT && ch > 1 {
        ch /= 2;
    }
    if attn_smem(ch, d, group) > SMEM_LIMIT {
        return Err(shape(format!(
            "attention: head_dim {d} × group {group} exceeds shared memory"
        )));
    }
    Ok(ch)
}

/// Shared memory of an attn_page_bounds block: the group's queries and each warp's staged bounds.
fn bounds_smem(d: usize, group: usize) -> usize {
    (group * (d + 8) + BOUND_WARPS as usize * 2 * BOUND_CHUNK) * 4
}

fn attn_smem(ch: usize, d: usize, group: usize) -> usize {
    (2 * ch * (d + 4) + group * d) * 4 + (4 * ch + 4 * META_CAP) * 4
}

/// [`attention_plan`] with an explicit [`SplitPlan`].
pub fn attention_plan_with(
    gpu: &Gpu,
    pool: &GpuKvPool,
    queries: &[GpuQuery<'_>],
    n_heads: usize,
    sparse: Option<&SparseConfig>,
    split_plan: SplitPlan,
) -> Result<AttentionPlan, CudaError> {
    let g = *pool.geometry();
    let (ps, n_kv, d) = (g.page_size, g.n_kv_heads, g.head_dim);
    let rows = queries.len();
    if n_heads == 0 || !n_heads.is_multiple_of(n_kv) {
        return Err(shape(format!(
            "attention: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}"
        )));
    }
    let group = n_heads / n_kv;
    if group > 32 || n_kv > 65535 || n_heads > 65535 {
        return Err(shape(format!(
            "attention: {n_heads} query heads over {n_kv} kv heads (at most 32 per group)"
        )));
    }
    if d > MAX_HEAD_DIM {
        return Err(shape(format!("attention: head_dim {d} > {MAX_HEAD_DIM}")));
    }
    if bounds_smem(d, group) > SMEM_LIMIT {
        return Err(shape(format!(
            "attention: head_dim {d} × group {group} exceeds shared memory"
        )));
    }
    let ch = chunk_tokens(d, group)?;

    // Visible pages per row, page tables deduplicated by identity, sparse rows.
    let mut npages = Vec::with_capacity(rows);
    let mut table_of = Vec::with_capacity(rows);
    let mut tables: Vec<(&[PageId], usize)> = Vec::new();
    let mut table_ids: HashMap<(usize, usize), usize> = HashMap::new();
    for (r, qr) in queries.iter().enumerate() {
        let np = qr.n_tokens.div_ceil(ps);
        if np > qr.pages.len() {
            return Err(shape(format!(
                "attention: row {r} sees {} tokens but its page table has {} pages of {ps}",
                qr.n_tokens,
                qr.pages.len()
            )));
        }
        if let Some(&bad) = qr.pages[..np]
            .iter()
            .find(|&&p| p as usize >= pool.capacity())
        {
            return Err(shape(format!(
                "attention: row {r} reads page {bad} of a {}-page pool",
                pool.capacity()
            )));
        }
        let key = (qr.pages.as_ptr() as usize, qr.pages.len());
        let t = *table_ids.entry(key).or_insert_with(|| {
            tables.push((qr.pages, 0));
            tables.len() - 1
        });
        tables[t].1 = tables[t].1.max(np);
        table_of.push(t);
        npages.push(np);
    }
    let mut sparse_rows = Vec::new();
    let mut sparse_of = vec![-1i32; rows];
    let mut entries = Vec::with_capacity(rows);
    for r in 0..rows {
        let np = npages[r];
        let mut n_entries = np;
        if let Some(cfg) = sparse {
            let budget = cfg.budget_pages(ps);
            if np > budget {
                // np > budget >= 1 + recent_pages (cpu::attention::select_into).
                let recent = cfg.recent_pages;
                let recent_start = np - recent;
                let k = budget - 1 - recent;
                // Per-head selection reads the union of the group's pages; a shared one, k pages.
                let picked = if cfg.group_shared { k } else { group * k };
                let cap = np.min(1 + recent + picked);
                sparse_of[r] = as_i32(sparse_rows.len(), "sparse rows")?;
                sparse_rows.push(SparseRow {
                    row: r,
                    cand: recent_start - 1,
                    k,
                    recent_start,
                    cap,
                });
                n_entries = cap;
            }
        }
        entries.push(n_entries);
    }

    // Split-K: about WAVES_PER_SM blocks per SM over all rows and kv heads.
    let per_split = match split_plan.entries_per_split {
        Some(e) => e.max(1),
        None => {
            let total: usize = entries.iter().sum::<usize>() * n_kv;
            let target = WAVES_PER_SM * pool.sm_count();
            let min_entries = 32usize.div_ceil(ps).max(1);
            total.div_ceil(target.max(1)).max(min_entries)
        }
    };
    let mut work: Vec<[usize; 3]> = Vec::new();
    let mut row_work = Vec::with_capacity(rows);
    for (r, &n) in entries.iter().enumerate() {
        let nw = n.div_ceil(per_split).max(1);
        row_work.push((work.len(), nw));
        for i in 0..nw {
            work.push([r, i * per_split, ((i + 1) * per_split).min(n)]);
        }
    }
    let n_work = work.len();
    let split = row_work.iter().any(|&(_, nw)| nw > 1);
    as_i32(n_work, "work items")?;
    if n_work > i32::MAX as usize / n_heads.max(1) {
        return Err(shape(format!("attention: {n_work} work items")));
    }

    // Meta array: rows, work, sparse, entries (one page id per visible page).
    let work_off = rows * ROW_INTS;
    let sp_off = work_off + n_work * WORK_INTS;
    let ent_base = sp_off + sparse_rows.len() * SPARSE_INTS;
    let mut table_off = Vec::with_capacity(tables.len());
    let mut at = ent_base;
    for &(_, np) in &tables {
        table_off.push(at);
        at += np;
    }
    let meta_len = at;
    as_i32(meta_len, "meta length")?;
    let mut meta = vec![0i32; meta_len.max(1)];
    for r in 0..rows {
        let rec = &mut meta[r * ROW_INTS..(r + 1) * ROW_INTS];
        rec[0] = table_off[table_of[r]] as i32;
        rec[1] = npages[r] as i32;
        rec[2] = as_i32(queries[r].n_tokens, "n_tokens")?;
        rec[3] = row_work[r].0 as i32;
        rec[4] = row_work[r].1 as i32;
        rec[5] = sparse_of[r];
    }
    for (w, item) in work.iter().enumerate() {
        let rec = &mut meta[work_off + w * WORK_INTS..][..WORK_INTS];
        for (dst, &x) in rec.iter_mut().zip(item) {
            *dst = x as i32;
        }
    }
    let (mut bounds_len, mut masks_len, mut lists_len) = (0usize, 0usize, 0usize);
    let mut max_cand = 0usize;
    for (s, sr) in sparse_rows.iter().enumerate() {
        let rec = &mut meta[sp_off + s * SPARSE_INTS..][..SPARSE_INTS];
        rec[0] = sr.row as i32;
        rec[1] = sr.cand as i32;
        rec[2] = sr.k as i32;
        rec[3] = sr.recent_start as i32;
        rec[4] = as_i32(bounds_len, "bounds offset")?;
        rec[5] = as_i32(masks_len, "mask offset")?;
        rec[6] = as_i32(lists_len, "list offset")?;
        rec[7] = sr.cap as i32;
        bounds_len += n_heads * sr.cand;
        masks_len += n_kv * npages[sr.row];
        lists_len += n_kv * sr.cap * 2;
        max_cand = max_cand.max(sr.cand);
    }
    as_i32(bounds_len, "bounds length")?;
    as_i32(masks_len, "masks length")?;
    as_i32(lists_len, "lists length")?;
    as_i32(n_work * n_heads * (d + 2), "partials length")?;
    if max_cand.div_ceil(BOUND_PAGES) > 65535 {
        return Err(shape(format!("attention: {max_cand} candidate pages")));
    }
    for (t, &(pages, np)) in tables.iter().enumerate() {
        for (dst, &p) in meta[table_off[t]..table_off[t] + np]
            .iter_mut()
            .zip(&pages[..np])
        {
            *dst = p as i32;
        }
    }

    let s = gpu.stream();
    let n_sparse = sparse_rows.len();
    let shared = sparse.is_some_and(|c| c.group_shared);
    Ok(AttentionPlan {
        rows,
        n_heads,
        group,
        geom: g,
        capacity: pool.capacity(),
        n_work,
        n_sparse,
        max_cand,
        shared,
        split,
        work_off: work_off as i32,
        sp_off: sp_off as i32,
        ch,
        meta: s.clone_htod(&meta)?,
        counts: s.alloc_zeros::<i32>((n_sparse * n_kv).max(1))?,
        lists: s.alloc_zeros::<i32>(lists_len.max(1))?,
        bounds: s.alloc_zeros::<f32>(bounds_len.max(1))?,
        // Zero here; attn_compact_pages clears what attn_select_pages set, layer after layer.
        // A shared selection writes its lists directly and never reads them.
        masks: s.alloc_zeros::<u32>(if shared { 1 } else { masks_len.max(1) })?,
        part: s.alloc_zeros::<f32>(if split { n_work * n_heads * (d + 2) } else { 1 })?,
    })
}

/// Attention of one layer under `plan`: no host-device copy, only launches (when some row is
/// sparse, 2 selection kernels for a group-shared selection, 3 for per-head; the attention kernel;
/// the split-K merge when some row is split).
/// `q` and `out` are `[plan.rows() × n_heads·head_dim]`.
pub fn paged_attention_planned(
    gpu: &Gpu,
    pool: &GpuKvPool,
    plan: &AttentionPlan,
    layer: usize,
    q: &CudaView<'_, f32>,
    scale: f32,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<(), CudaError> {
    let g = *pool.geometry();
    let (ps, n_layers, n_kv, d) = (g.page_size, g.n_layers, g.n_kv_heads, g.head_dim);
    if g != plan.geom || pool.capacity() != plan.capacity {
        return Err(shape(format!(
            "attention: plan made for {:?} × {} pages, pool is {g:?} × {}",
            plan.geom,
            plan.capacity,
            pool.capacity()
        )));
    }
    let (rows, n_heads, group) = (plan.rows, plan.n_heads, plan.group);
    let width = n_heads * d;
    if layer >= n_layers {
        return Err(shape(format!("attention: layer {layer} of {n_layers}")));
    }
    if q.len() != rows * width || out.len() != rows * width {
        return Err(shape(format!(
            "attention: q has {} and out {} elements, want {rows} rows × {width}",
            q.len(),
            out.len()
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let s = gpu.stream();
    let st = &pool.store;
    let (work_off_i, sp_off_i) = (plan.work_off, plan.sp_off);
    let (n_layers_i, n_kv_i, d_i, n_heads_i) =
        (n_layers as i32, n_kv as i32, d as i32, n_heads as i32);
    let layer_i = layer as i32;
    let n_sparse = plan.n_sparse;

    if n_sparse > 0 {
        let cfg = LaunchConfig {
            grid_dim: (
                n_sparse as u32,
                plan.max_cand.div_ceil(BOUND_PAGES).max(1) as u32,
                n_kv as u32,
            ),
            block_dim: (32 * BOUND_WARPS, 1, 1),
            shared_mem_bytes: bounds_smem(d, group) as u32,
        };
        let f = gpu.function(MODULE.name, "attn_page_bounds")?;
        // SAFETY: attn_page_bounds(const float* q, const int* meta, int sp_off,
        // const float* bmin, const float* bmax, float* bounds, int layer, int n_layers, int n_kv,
        // int d, int n_heads). Sparse records index rows < rows, candidate pages 1..recent_start of
        // tables whose page ids were checked < capacity; bounds holds every record's
        // n_heads × C floats; shared memory is bounds_smem (checked <= 48 KiB at plan time). The
        // plan's scratch is device memory used only by launches on this stream.
        unsafe {
            s.launch_builder(f)
                .arg(q)
                .arg(&plan.meta)
                .arg(&sp_off_i)
                .arg(&st.bmin)
                .arg(&st.bmax)
                .arg(&plan.bounds)
                .arg(&layer_i)
                .arg(&n_layers_i)
                .arg(&n_kv_i)
                .arg(&d_i)
                .arg(&n_heads_i)
                .launch(cfg)?;
        }
        let key_cap = plan.max_cand.min(KEY_CAP);
        let key_cap_i = key_cap as i32;
        let shared_i = plan.shared as i32;
        let cfg = LaunchConfig {
            grid_dim: (
                n_sparse as u32,
                if plan.shared { n_kv } else { n_heads } as u32,
                1,
            ),
            block_dim: (SEL_THREADS, 1, 1),
            shared_mem_bytes: (key_cap * 4) as u32,
        };
        let f = gpu.function(MODULE.name, "attn_select_pages")?;
        // SAFETY: attn_select_pages(const int* meta, int sp_off, const float* bounds, u32* masks,
        // int* lists, int* counts, int n_heads, int n_kv, int key_cap, int shared): one block per
        // (record, query head), or per (record, kv head) when shared; masks holds n_kv × npages
        // per record unless shared (zero: fresh, or cleared by the previous run's
        // attn_compact_pages); shared, it writes lists (n_kv × cap pairs per record, writes
        // capped) and counts (n_sparse × n_kv) instead; keys are cached only when C <= key_cap,
        // which the shared memory holds.
        unsafe {
            s.launch_builder(f)
                .arg(&plan.meta)
                .arg(&sp_off_i)
                .arg(&plan.bounds)
                .arg(&plan.masks)
                .arg(&plan.lists)
                .arg(&plan.counts)
                .arg(&n_heads_i)
                .arg(&n_kv_i)
                .arg(&key_cap_i)
                .arg(&shared_i)
                .launch(cfg)?;
        }
    }
    if n_sparse > 0 && !plan.shared {
        // Per-head selections meet in the masks: their union, in page order, becomes the lists.
        let cfg = LaunchConfig {
            grid_dim: (n_sparse as u32, n_kv as u32, 1),
            block_dim: (SEL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(MODULE.name, "attn_compact_pages")?;
        // SAFETY: attn_compact_pages(const int* meta, int sp_off, u32* masks, int* lists,
        // int* counts, int n_kv): lists hold n_kv × cap pairs per record (writes are capped),
        // counts n_sparse × n_kv; it zeroes the masks it read.
        unsafe {
            s.launch_builder(f)
                .arg(&plan.meta)
                .arg(&sp_off_i)
                .arg(&plan.masks)
                .arg(&plan.lists)
                .arg(&plan.counts)
                .arg(&n_kv_i)
                .launch(cfg)?;
        }
    }

    let ch = plan.ch;
    let warps = group.max(ATTN_MIN_WARPS);
    let cfg = LaunchConfig {
        grid_dim: (plan.n_work as u32, n_kv as u32, 1),
        block_dim: ((32 * warps) as u32, 1, 1),
        shared_mem_bytes: attn_smem(ch, d, group) as u32,
    };
    let (dt, ps_i, ch_i, n_work_i) = (pool.dtype_code(), ps as i32, ch as i32, plan.n_work as i32);
    let f = gpu.function(MODULE.name, "attn_paged")?;
    // SAFETY: attn_paged(const float* q, float* out, float* part, const int* meta, int work_off,
    // int sp_off, const int* lists, const int* counts, const int* stage_tab, kf, vf, kh, vh, kq,
    // vq, ksc, kmn, vsc, vmn, stg, int dtype, int layer, int n_layers, int n_kv, int ps, int d,
    // int n_heads, float scale, int ch, int n_work). q / out hold rows × n_heads·d (checked);
    // every work item's entries are < the row's visible pages (dense) or < its list count
    // (sparse); page ids < capacity (checked at plan time, same pool geometry and capacity);
    // the staging table holds n_pages × n_layers slots + 1 of slots < staging capacity; part
    // holds n_work × n_heads × (d + 2) floats whenever some row has several work items (only then
    // is it written); ch <= 32 and shared memory is attn_smem(ch).
    unsafe {
        s.launch_builder(f)
            .arg(q)
            .arg(&mut *out)
            .arg(&plan.part)
            .arg(&plan.meta)
            .arg(&work_off_i)
            .arg(&sp_off_i)
            .arg(&plan.lists)
            .arg(&plan.counts)
            .arg(&st.stage)
            .arg(&st.kf)
            .arg(&st.vf)
            .arg(&st.kh)
            .arg(&st.vh)
            .arg(&st.kq)
            .arg(&st.vq)
            .arg(&st.ksc)
            .arg(&st.kmn)
            .arg(&st.vsc)
            .arg(&st.vmn)
            .arg(&st.stg)
            .arg(&dt)
            .arg(&layer_i)
            .arg(&n_layers_i)
            .arg(&n_kv_i)
            .arg(&ps_i)
            .arg(&d_i)
            .arg(&n_heads_i)
            .arg(&scale)
            .arg(&ch_i)
            .arg(&n_work_i)
            .launch(cfg)?;
    }
    if plan.split {
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, n_heads as u32, 1),
            block_dim: (RED_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(MODULE.name, "attn_reduce")?;
        // SAFETY: attn_reduce(const float* part, float* out, const int* meta, int n_work,
        // int n_heads, int d): rows with nw > 1 read partials w0..w0+nw < n_work, written above.
        unsafe {
            s.launch_builder(f)
                .arg(&plan.part)
                .arg(&mut *out)
                .arg(&plan.meta)
                .arg(&n_work_i)
                .arg(&n_heads_i)
                .arg(&d_i)
                .launch(cfg)?;
        }
    }
    Ok(())
}

/// Device seconds per layer of attention: one [`attention_plan`] (not timed), then CUDA events
/// around `iters` [`paged_attention_planned`] calls after one warm-up call. The plan's upload is
/// paid once per step, not per layer; time it separately if needed.
#[allow(clippy::too_many_arguments)]
pub fn time_attention(
    gpu: &Gpu,
    pool: &GpuKvPool,
    layer: usize,
    queries: &[GpuQuery<'_>],
    q: &CudaView<'_, f32>,
    n_heads: usize,
    scale: f32,
    sparse: Option<&SparseConfig>,
    out: &mut CudaViewMut<'_, f32>,
    iters: usize,
) -> Result<f64, CudaError> {
    let plan = attention_plan(gpu, pool, queries, n_heads, sparse)?;
    let run = |out: &mut CudaViewMut<'_, f32>| {
        paged_attention_planned(gpu, pool, &plan, layer, q, scale, out)
    };
    run(out)?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.context().new_event(flags)?;
    let end = gpu.context().new_event(flags)?;
    start.record(gpu.stream())?;
    for _ in 0..iters.max(1) {
        run(out)?;
    }
    end.record(gpu.stream())?;
    let ms = start.elapsed_ms(&end)?;
    Ok(ms as f64 / 1e3 / iters.max(1) as f64)
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
