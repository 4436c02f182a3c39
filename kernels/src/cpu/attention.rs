//! Paged decode attention: one query token against its sequence's KV pages.
//!
//! [`paged_attention`] is flash-style: it walks the visible pages in ascending order, scores one page
//! at a time and folds it into a running (max, sum, weighted-V) state per query head — the online
//! softmax — so memory is one page of scores, never the full score vector. Each (page, kv_head) tile
//! is fetched (and, for F16/INT4, decoded) once and reused by every query head of the GQA group
//! (query head `h` reads KV head `h / (n_heads / n_kv_heads)`).
//!
//! # Query-aware page sparsity
//!
//! Long contexts are dominated by a few pages per query (Quest, Tang et al., 2024). With a
//! [`SparseConfig`], a head whose context exceeds the page budget attends only to the first page
//! (attention sink), the newest `recent_pages` pages (local context) and the remaining pages with the
//! largest upper bound on any score in the page, `sum_i max(q_i * min_i, q_i * max_i)` over the page's
//! per-channel key min/max ([`KvPool::key_bounds`]). By default selection is per query head, since
//! heads of a group disagree about relevance; the union of a group's pages is then read, up to
//! `group` times the budget. With [`SparseConfig::group_shared`] the heads of a GQA group share one
//! selection scored by the largest of their bounds (a page any head of the group ranks high ranks
//! high), so each KV head reads exactly the budget. Under the budget every page is selected and the
//! computation is the same code in the same order as dense, so the result is bit-identical.

use crate::cpu::kv::{KvDtype, KvPool, PageId};
use crate::cpu::ops::exp_cephes;
#[cfg(target_arch = "x86_64")]
use crate::cpu::ops::exp_cephes8_avx2;
use crate::cpu::threads::SharedOut;

/// Query-aware page sparsity settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseConfig {
    /// Tokens of context to attend to; rounded up to whole pages, and at least `1 + recent_pages` pages.
    pub budget_tokens: usize,
    /// Newest visible pages always attended (the page holding the query itself included).
    pub recent_pages: usize,
    /// The query heads of a GQA group share one selection, scored per page by the largest of their
    /// [`page_bound`]s ([`group_bound`]); `false`: each head selects its own pages.
    pub group_shared: bool,
}

impl SparseConfig {
    /// A budget of `budget_tokens` with the default single recent page.
    pub fn new(budget_tokens: usize) -> Self {
        Self {
            budget_tokens,
            recent_pages: 1,
            group_shared: false,
        }
    }

    /// The same budget with one selection per GQA group.
    pub fn shared_by_group(self) -> Self {
        Self {
            group_shared: true,
            ..self
        }
    }

    /// The budget in pages for `page_size`-token pages.
    pub fn budget_pages(&self, page_size: usize) -> usize {
        self.budget_tokens
            .div_ceil(page_size.max(1))
            .max(self.recent_pages.saturating_add(1))
    }
}

impl Default for SparseConfig {
    /// Unlimited budget: every context is attended densely.
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

/// Upper bound of `q · k` over any key `k` with `kmin <= k <= kmax` channel-wise:
/// `sum_i max(q_i * kmin_i, q_i * kmax_i)`. Eight independent partial sums so it vectorizes (it
/// runs for every page of every head under sparsity).
pub fn page_bound(q: &[f32], kmin: &[f32], kmax: &[f32]) -> f32 {
    debug_assert!(q.len() == kmin.len() && q.len() == kmax.len());
    let term = |(&q, (&lo, &hi)): (&f32, (&f32, &f32))| (q * lo).max(q * hi);
    let (cq, clo, chi) = (
        q.chunks_exact(8),
        kmin.chunks_exact(8),
        kmax.chunks_exact(8),
    );
    let tail: f32 = cq
        .remainder()
        .iter()
        .zip(clo.remainder().iter().zip(chi.remainder()))
        .map(term)
        .sum();
    let mut lanes = [0.0f32; 8];
    for (q, (lo, hi)) in cq.zip(clo.zip(chi)) {
        for (l, x) in lanes.iter_mut().zip(q.iter().zip(lo.iter().zip(hi))) {
            *l += term(x);
        }
    }
    reduce8(lanes) + tail
}

/// The larger of `a` and `b`, and `b` when `a` is NaN: spelled out (not `f32::max`, which leaves
/// the sign of a ±0 tie open) so the CUDA selection (`fmax_sel` in attention.cu) gives the same bits.
#[inline]
pub fn fmax_sel(a: f32, b: f32) -> f32 {
    if b > a || a.is_nan() { b } else { a }
}

/// The group score of a page under [`SparseConfig::group_shared`]: the heads' [`page_bound`]s
/// (`q_group`: the group's query heads, `head_dim` each) folded by [`fmax_sel`] in head order.
pub fn group_bound(q_group: &[f32], head_dim: usize, kmin: &[f32], kmax: &[f32]) -> f32 {
    let mut heads = q_group.chunks_exact(head_dim);
    let first = heads
        .next()
        .map_or(f32::NEG_INFINITY, |q| page_bound(q, kmin, kmax));
    heads.fold(first, |acc, q| fmax_sel(acc, page_bound(q, kmin, kmax)))
}

/// Sums eight lanes pairwise (the order every lane-split reduction here uses).
#[inline]
fn reduce8([l0, l1, l2, l3, l4, l5, l6, l7]: [f32; 8]) -> f32 {
    ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))
}

/// Which pages (indices into `pages`, ascending) query head `q_head` (a `head_dim` slice) attends to
/// when the visible context is tokens `0..n_tokens`: all visible pages when their count is within
/// [`SparseConfig::budget_pages`]; otherwise the first page, the newest `recent_pages` visible pages
/// and the top remaining pages by [`page_bound`] (ties: lower index).
pub fn select_pages(
    pool: &KvPool,
    layer: usize,
    pages: &[PageId],
    n_tokens: usize,
    q_head: &[f32],
    kv_head: usize,
    cfg: &SparseConfig,
) -> Vec<usize> {
    select_visible(pool, layer, pages, n_tokens, kv_head, cfg, |lo, hi| {
        page_bound(q_head, lo, hi)
    })
}

/// The pages the whole group of KV head `kv_head` attends to under
/// [`SparseConfig::group_shared`] (`q_group`: the group's query heads, `head_dim` each): as
/// [`select_pages`], ranked by [`group_bound`].
pub fn select_pages_group(
    pool: &KvPool,
    layer: usize,
    pages: &[PageId],
    n_tokens: usize,
    q_group: &[f32],
    kv_head: usize,
    cfg: &SparseConfig,
) -> Vec<usize> {
    let d = pool.geometry().head_dim;
    select_visible(pool, layer, pages, n_tokens, kv_head, cfg, |lo, hi| {
        group_bound(q_group, d, lo, hi)
    })
}

/// [`select_into`] over the pages visible to `n_tokens` tokens, as ascending page indices.
fn select_visible(
    pool: &KvPool,
    layer: usize,
    pages: &[PageId],
    n_tokens: usize,
    kv_head: usize,
    cfg: &SparseConfig,
    bound: impl Fn(&[f32], &[f32]) -> f32,
) -> Vec<usize> {
    let npages = visible_pages(pool, pages, n_tokens);
    let mut keep = vec![false; npages];
    select_into(
        pool,
        layer,
        &pages[..npages],
        kv_head,
        cfg,
        &mut Vec::new(),
        &mut keep,
        bound,
    );
    keep.iter()
        .enumerate()
        .filter(|&(_, &k)| k)
        .map(|(i, _)| i)
        .collect()
}

/// Pages holding tokens `0..n_tokens` (clamped to the page table, whose shortness is a caller bug).
fn visible_pages(pool: &KvPool, pages: &[PageId], n_tokens: usize) -> usize {
    let needed = n_tokens.div_ceil(pool.geometry().page_size);
    debug_assert!(
        needed <= pages.len(),
        "page table of {} pages for {n_tokens} tokens",
        pages.len()
    );
    needed.min(pages.len())
}

/// Fills `keep[i]` (one entry per visible page `pages[i]`) with the selection of [`select_pages`],
/// pages ranked by `bound(key min, key max)`. `ranked` is reusable scratch.
#[allow(clippy::too_many_arguments)]
fn select_into(
    pool: &KvPool,
    layer: usize,
    pages: &[PageId],
    kv_head: usize,
    cfg: &SparseConfig,
    ranked: &mut Vec<(f32, usize)>,
    keep: &mut [bool],
    bound: impl Fn(&[f32], &[f32]) -> f32,
) {
    let npages = keep.len();
    let budget = cfg.budget_pages(pool.geometry().page_size);
    if npages <= budget {
        keep.fill(true);
        return;
    }
    // npages > budget >= 1 + recent_pages, so the candidates 1..recent_start are non-empty and
    // outnumber the k pages still to pick.
    let recent_start = npages - cfg.recent_pages;
    keep.fill(false);
    keep[0] = true;
    keep[recent_start..].fill(true);
    ranked.clear();
    ranked.extend((1..recent_start).map(|i| {
        let (lo, hi) = pool.key_bounds(layer, pages[i], kv_head);
        (bound(lo, hi), i)
    }));
    let k = budget - 1 - cfg.recent_pages;
    if k > 0 {
        // Descending bound, ascending index on ties; total_cmp keeps NaN bounds from panicking.
        ranked.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &ranked[..k] {
            keep[i] = true;
        }
    }
}

/// One query token at position `n_tokens - 1` attends to tokens `0..n_tokens` of its sequence (page
/// table `pages`); causal by construction. `q` is `n_heads * head_dim` after RoPE, `out` the same
/// shape. `sparse: None` is dense. An empty context writes zeros.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    pool: &KvPool,
    layer: usize,
    pages: &[PageId],
    n_tokens: usize,
    q: &[f32],
    n_heads: usize,
    scale: f32,
    sparse: Option<&SparseConfig>,
    out: &mut [f32],
) {
    let g = *pool.geometry();
    let (d, n_kv) = (g.head_dim, g.n_kv_heads);
    debug_assert!(
        q.len() == n_heads * d && out.len() == n_heads * d,
        "q/out must be n_heads*head_dim"
    );
    let group = (n_heads / n_kv).max(1);
    for h0 in (0..n_kv).map(|kv_head| kv_head * group) {
        if h0 >= n_heads {
            break;
        }
        let heads = group.min(n_heads - h0);
        let query = Query { pages, n_tokens };
        attend_group(
            pool,
            layer,
            query,
            q,
            n_heads,
            scale,
            sparse,
            h0,
            &mut out[h0 * d..(h0 + heads) * d],
        );
    }
}

/// Where one query row reads its keys and values.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    /// The sequence's page table.
    pub pages: &'a [PageId],
    /// Tokens visible to this query (its position + 1).
    pub n_tokens: usize,
}

/// Attention for a batch of query rows (`q`, `out`: `[rows, n_heads * head_dim]`), each with its
/// own sequence, spread over the thread pool by (row, KV head) so a single decode row still uses
/// every core. Results equal [`paged_attention`] row by row.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_rows(
    pool: &KvPool,
    layer: usize,
    queries: &[Query<'_>],
    q: &[f32],
    n_heads: usize,
    scale: f32,
    sparse: Option<&SparseConfig>,
    out: &mut [f32],
) {
    let g = *pool.geometry();
    let (d, n_kv) = (g.head_dim, g.n_kv_heads);
    let width = n_heads * d;
    assert_eq!(q.len(), queries.len() * width, "q shape");
    assert_eq!(out.len(), queries.len() * width, "out shape");
    let group = (n_heads / n_kv).max(1);
    let op = SharedOut::new(out);
    // Query heads per task: a whole GQA group shares each page's keys and values (one INT4 / f16
    // decode per page), but when a few groups would leave cores idle and f32 pages are read in
    // place, each query head is its own task.
    let threads = crate::cpu::threads::global().threads();
    let per_task = if pool.dtype() == KvDtype::F32 && queries.len() * n_kv < 2 * threads {
        1
    } else {
        group
    };
    let per_row = n_heads.div_ceil(per_task);
    let clock = crate::cpu::phases::Clock::start();
    crate::cpu::threads::global().run(queries.len() * per_row, &|t| {
        let (row, h0) = (t / per_row, (t % per_row) * per_task);
        let heads = per_task.min(n_heads - h0);
        let start = row * width + h0 * d;
        // SAFETY: tasks cover disjoint (row, heads) slices of `out`, in bounds by the asserts.
        let out_heads = unsafe { op.slice_mut(start, heads * d) };
        let qrow = &q[row * width..(row + 1) * width];
        attend_group(
            pool,
            layer,
            queries[row],
            qrow,
            n_heads,
            scale,
            sparse,
            h0,
            out_heads,
        );
    });
    clock.add_to(crate::cpu::phases::Phase::Attention);
}

/// Query heads `h0 .. h0 + out_group.len() / head_dim`, all of one KV head's group, attend to
/// their pages. On x86-64 with AVX2 the same code is compiled 8 lanes wide (the crate's baseline
/// is SSE2), with a page's scores and weighted values in explicit 8-lane kernels; every lane does
/// the scalar code's operations in its order and nothing is fused, so both give the same bits.
#[allow(clippy::too_many_arguments)]
fn attend_group(
    pool: &KvPool,
    layer: usize,
    query: Query<'_>,
    q: &[f32],
    n_heads: usize,
    scale: f32,
    sparse: Option<&SparseConfig>,
    h0: usize,
    out_group: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::qdot::best_isa() >= crate::cpu::qdot::Isa::Avx2 {
        // SAFETY: AVX2 paths are only chosen when the CPU has AVX2 (and FMA, F16C).
        unsafe { attend_group_avx2(pool, layer, query, q, n_heads, scale, sparse, h0, out_group) };
        return;
    }
    attend_group_body::<false>(pool, layer, query, q, n_heads, scale, sparse, h0, out_group)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
fn attend_group_avx2(
    pool: &KvPool,
    layer: usize,
    query: Query<'_>,
    q: &[f32],
    n_heads: usize,
    scale: f32,
    sparse: Option<&SparseConfig>,
    h0: usize,
    out_group: &mut [f32],
) {
    attend_group_body::<true>(pool, layer, query, q, n_heads, scale, sparse, h0, out_group)
}

/// `WIDE`: built with AVX2 (see [`attend_group_avx2`]), the page's scores and weighted values go
/// through [`page_scores_avx2`] and [`accumulate_avx2`] where the head size is a multiple of 8.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_group_body<const WIDE: bool>(
    pool: &KvPool,
    layer: usize,
    query: Query<'_>,
    q: &[f32],
    n_heads: usize,
    scale: f32,
    sparse: Option<&SparseConfig>,
    h0: usize,
    out_group: &mut [f32],
) {
    let g = *pool.geometry();
    let (ps, d, n_kv) = (g.page_size, g.head_dim, g.n_kv_heads);
    debug_assert!(
        n_heads >= n_kv && n_heads.is_multiple_of(n_kv),
        "n_heads must be a multiple of n_kv_heads"
    );
    let Query { pages, n_tokens } = query;
    out_group.fill(0.0);
    let npages = visible_pages(pool, pages, n_tokens);
    if npages == 0 {
        return;
    }
    let last_len = n_tokens.min(npages * ps) - (npages - 1) * ps;
    let group = (n_heads / n_kv).max(1);
    let kv_head = h0 / group;
    let heads = out_group.len() / d;
    debug_assert_eq!((h0 + heads - 1) / group, kv_head, "heads of one group");
    let q_group = &q[h0 * d..(h0 + heads) * d];

    // Scratch reused from task to task on this thread: a decode step runs thousands of these
    // tasks (1440 at batch 16 on SmolLM2), and each allocated seven vectors.
    SCRATCH.with_borrow_mut(|sc| {
        attend_pages::<WIDE>(
            pool, layer, pages, npages, last_len, kv_head, group, q, q_group, scale, sparse, sc,
            out_group,
        )
    });
}

#[derive(Default)]
struct AttendScratch {
    tile: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    run_max: Vec<f32>,
    run_sum: Vec<f32>,
    keep: Vec<bool>,
    ranked: Vec<(f32, usize)>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<AttendScratch> =
        std::cell::RefCell::new(AttendScratch::default());
}

/// The rest of [`attend_group_body`], in `sc`: page selection, the pages' online softmax, the
/// normalized output.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_pages<const WIDE: bool>(
    pool: &KvPool,
    layer: usize,
    pages: &[PageId],
    npages: usize,
    last_len: usize,
    kv_head: usize,
    group: usize,
    q: &[f32],
    q_group: &[f32],
    scale: f32,
    sparse: Option<&SparseConfig>,
    sc: &mut AttendScratch,
    out_group: &mut [f32],
) {
    let g = *pool.geometry();
    let (ps, d) = (g.page_size, g.head_dim);
    let heads = q_group.len() / d;
    let AttendScratch {
        tile,
        scores,
        acc,
        run_max,
        run_sum,
        keep,
        ranked,
    } = sc;
    // The tile and the scores are written before they are read.
    tile.resize(tile.len().max(pool.tile_scratch_len()), 0.0);
    scores.resize(scores.len().max(ps), 0.0);
    for (v, n, x) in [
        (&mut *acc, heads * d, 0.0),
        (&mut *run_max, heads, f32::NEG_INFINITY),
        (&mut *run_sum, heads, 0.0),
    ] {
        v.clear();
        v.resize(n, x);
    }
    keep.clear();
    keep.resize(heads * npages, true);

    if let Some(cfg) = sparse {
        if cfg.group_shared {
            // Every head of the group (not only this task's) scores the pages.
            let q_all = &q[kv_head * group * d..(kv_head + 1) * group * d];
            let (first, rest) = keep.split_at_mut(npages);
            select_into(
                pool,
                layer,
                &pages[..npages],
                kv_head,
                cfg,
                ranked,
                first,
                |lo, hi| group_bound(q_all, d, lo, hi),
            );
            for kh in rest.chunks_exact_mut(npages) {
                kh.copy_from_slice(first);
            }
        } else {
            for (qh, kh) in q_group.chunks_exact(d).zip(keep.chunks_exact_mut(npages)) {
                select_into(
                    pool,
                    layer,
                    &pages[..npages],
                    kv_head,
                    cfg,
                    ranked,
                    kh,
                    |lo, hi| page_bound(qh, lo, hi),
                );
            }
        }
    }
    // Page p's keys and values are asked for two pages ahead of their use (the first two now).
    let used = |p: usize| keep.iter().skip(p).step_by(npages).any(|&k| k);
    let len = |p: usize| if p + 1 == npages { last_len } else { ps };
    let ahead = |p: usize| {
        if p < npages && used(p) {
            pool.prefetch_tile(layer, pages[p], kv_head, len(p));
        }
    };
    ahead(0);
    ahead(1);
    for (p, &page) in pages[..npages].iter().enumerate() {
        ahead(p + 2);
        if !used(p) {
            continue;
        }
        let n = len(p);
        let (kt, vt) = pool.tile_f32(layer, page, kv_head, n, tile);
        let states = acc
            .chunks_exact_mut(d)
            .zip(run_max.iter_mut().zip(run_sum.iter_mut()));
        for (gi, (qh, (a, (m, l)))) in q_group.chunks_exact(d).zip(states).enumerate() {
            if keep[gi * npages + p] {
                online_update::<WIDE>(qh, kt, vt, d, scale, &mut scores[..n], m, l, a);
            }
        }
    }
    for ((o, a), &l) in out_group
        .chunks_exact_mut(d)
        .zip(acc.chunks_exact(d))
        .zip(run_sum.iter())
    {
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for (o, &a) in o.iter_mut().zip(a) {
            *o = a * inv;
        }
    }
}

/// Folds one page (`k`, `v`: `scores.len()` rows of `d`) into a head's online-softmax state: running
/// max `m`, running sum of `exp(s - m)` `l`, and the unnormalized output `acc`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn online_update<const WIDE: bool>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    scores: &mut [f32],
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    let wide = WIDE && d.is_multiple_of(8);
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    let mut page_max = f32::NEG_INFINITY;
    if wide {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: WIDE is only set inside `attend_group_avx2`, called when the CPU has AVX2;
        // `k` holds `scores.len()` rows of `d`.
        {
            page_max = unsafe { page_scores_avx2(q, k, d, scale, scores) };
        }
    } else {
        for (s, kr) in scores.iter_mut().zip(k.chunks_exact(d)) {
            *s = dot(q, kr) * scale;
            page_max = page_max.max(*s);
        }
    }
    let m_new = m.max(page_max);
    if m_new == f32::NEG_INFINITY {
        return; // every weight is exp(-inf) = 0
    }
    if m_new > *m {
        // Rescale what was accumulated under the old max; nothing was when it was -inf.
        let corr = if *m == f32::NEG_INFINITY {
            0.0
        } else {
            exp_cephes(*m - m_new)
        };
        *l *= corr;
        acc.iter_mut().for_each(|a| *a *= corr);
        *m = m_new;
    }
    if wide {
        // The weights first (eight at a time, then the same sum in the same order), then the
        // values.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        unsafe {
            softmax_weights_avx2(scores, m_new)
        };
        for s in scores.iter() {
            *l += *s;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; `v` holds `scores.len()` rows of `d`.
        unsafe {
            accumulate_avx2(scores, v, d, acc)
        };
        return;
    }
    for (&s, vr) in scores.iter().zip(v.chunks_exact(d)) {
        let p = exp_cephes(s - m_new);
        *l += p;
        for (a, &x) in acc.iter_mut().zip(vr) {
            *a += p * x;
        }
    }
}

/// `w[t] = exp_cephes(w[t] - m)` in place, eight at a time (the rest one by one), the same
/// bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn softmax_weights_avx2(w: &mut [f32], m: f32) {
    use std::arch::x86_64::*;
    let mv = _mm256_set1_ps(m);
    let mut chunks = w.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds eight values.
        unsafe {
            let v = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv);
            _mm256_storeu_ps(c.as_mut_ptr(), exp_cephes8_avx2(v));
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_cephes(*x - m);
    }
}

/// `scores[t] = dot(q, k_t) * scale` for the rows `k_t` of `k` (`d` a multiple of 8); returns
/// the largest. Four rows at a time, each in one 8-lane register: the operations of [`dot`] in
/// its order (lane `i` sums `q[8c + i] * k[8c + i]` over `c`, a multiply then an add, then
/// [`reduce8`]), so the same bits as the scalar build. The scalar build's sums come out of the
/// compiler's 128-bit shuffles one row at a time; these keep four rows in flight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn page_scores_avx2(q: &[f32], k: &[f32], d: usize, scale: f32, scores: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = scores.len();
    assert!(d.is_multiple_of(8) && q.len() == d && k.len() >= n * d);
    // What `dot` adds for the channels past the last eight (none here), as it adds it.
    let tail: f32 = std::iter::empty::<f32>().sum();
    // ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)), as `reduce8`.
    let reduce = |acc: __m256| -> f32 {
        let a = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let b = _mm_hadd_ps(a, a);
        _mm_cvtss_f32(_mm_hadd_ps(b, b))
    };
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let mut page_max = f32::NEG_INFINITY;
    let mut t = 0;
    while t < n {
        let rows = (n - t).min(4);
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in (0..d).step_by(8) {
            // SAFETY: c + 8 <= d = q.len(), and row t + j < n has d values in k (asserted).
            let qv = unsafe { _mm256_loadu_ps(qp.add(c)) };
            for (j, a) in acc.iter_mut().enumerate().take(rows) {
                let kv = unsafe { _mm256_loadu_ps(kp.add((t + j) * d + c)) };
                *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, kv));
            }
        }
        for (j, a) in acc.iter().enumerate().take(rows) {
            let s = (reduce(*a) + tail) * scale;
            scores[t + j] = s;
            page_max = page_max.max(s);
        }
        t += rows;
    }
    page_max
}

/// `acc[j] += p[t] * v_t[j]` for the rows `v_t` of `v` in order (`d` a multiple of 8), a multiply
/// then an add as the scalar loop does, so the same bits; 64 channels at a time stay in eight
/// registers over all rows, where the scalar build loads and stores `acc` for every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn accumulate_avx2(p: &[f32], v: &[f32], d: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = p.len();
    assert!(d.is_multiple_of(8) && acc.len() == d && v.len() >= n * d);
    let (vp, ap) = (v.as_ptr(), acc.as_mut_ptr());
    for c0 in (0..d).step_by(64) {
        let regs = (d - c0).min(64) / 8;
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, ri) in r.iter_mut().enumerate().take(regs) {
            // SAFETY: c0 + 8 i + 8 <= d = acc.len().
            *ri = unsafe { _mm256_loadu_ps(ap.add(c0 + 8 * i)) };
        }
        for (t, &pt) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pt);
            for (i, ri) in r.iter_mut().enumerate().take(regs) {
                // SAFETY: row t < n has d values in v (asserted).
                let x = unsafe { _mm256_loadu_ps(vp.add(t * d + c0 + 8 * i)) };
                *ri = _mm256_add_ps(*ri, _mm256_mul_ps(pv, x));
            }
        }
        for (i, ri) in r.iter().enumerate().take(regs) {
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(ap.add(c0 + 8 * i), *ri) };
        }
    }
}

/// Dot product with eight independent accumulators so the compiler can vectorize it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut lanes = [0.0f32; 8];
    for (x, y) in ca.zip(cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    reduce8(lanes) + tail
}

/// Plain reference for [`paged_attention`] (dense only): reads every visible token with
/// [`KvPool::read_token`], builds the full score vector, max-subtracted softmax, weighted sum.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_reference(
    pool: &KvPool,
    layer: usize,
    pages: &[PageId],
    n_tokens: usize,
    q: &[f32],
    n_heads: usize,
    scale: f32,
    out: &mut [f32],
) {
    let g = *pool.geometry();
    let (ps, d, n_kv) = (g.page_size, g.head_dim, g.n_kv_heads);
    out.fill(0.0);
    let n = n_tokens.min(visible_pages(pool, pages, n_tokens) * ps);
    if n == 0 {
        return;
    }
    let w = g.token_width();
    let (mut ks, mut vs) = (vec![0.0f32; n * w], vec![0.0f32; n * w]);
    for (t, (k, v)) in ks
        .chunks_exact_mut(w)
        .zip(vs.chunks_exact_mut(w))
        .enumerate()
    {
        pool.read_token(layer, pages[t / ps], t % ps, k, v);
    }
    let group = (n_heads / n_kv).max(1);
    let mut scores = vec![0.0f32; n];
    for (h, (qh, oh)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let kv = (h / group).min(n_kv - 1) * d;
        for (s, k) in scores.iter_mut().zip(ks.chunks_exact(w)) {
            *s = qh
                .iter()
                .zip(&k[kv..kv + d])
                .map(|(a, b)| a * b)
                .sum::<f32>()
                * scale;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for (&p, v) in scores.iter().zip(vs.chunks_exact(w)) {
            for (o, &x) in oh.iter_mut().zip(&v[kv..kv + d]) {
                *o += p * x;
            }
        }
        oh.iter_mut().for_each(|o| *o /= sum);
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
