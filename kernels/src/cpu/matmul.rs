//! Threaded products of a [`Weight`] with a batch of activation rows, in two modes:
//! * exact: f32 activations against the dequantized weights (the reference arithmetic; goldens);
//! * int8: activations quantized per block of 32 ([`ActQ8`]) against INT4 / Q8_0 weights with
//!   integer SIMD dot products — the fast default, as llama.cpp does.
//!
//! Both loop over weight rows outermost, so each weight byte is read from memory once per call
//! whatever the number of activation rows, and split the rows across the thread pool.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::cpu::act::{ActQ8, BlockQ8A};
use crate::cpu::lora::{LoraSegmentQ8, ROWS_PER_TASK, ShrinkScratch, expand_groups, shrink_rows};
use crate::cpu::ops::dot;
use crate::cpu::phases::{self, Clock, Phase};
use crate::cpu::q4::TILE_ROWS;
use crate::cpu::qdot::{
    Isa, LINE, Side, TILE_XROWS, TileOut, best_isa, q4q8_tiles_side, q4q8_tiles2_side,
    q8q8_tiles_side, q8q8_tiles2_side,
};
use crate::cpu::threads::{SharedOut, parallel_ranges};
use crate::{Q4Matrix, Q8Matrix, Weight};
use std::ops::Range;

/// Output rows per task are a multiple of this (cache-line-friendly writes for m = 1).
const ROW_ALIGN: usize = 16;
/// Row groups (of eight rows) per task are a multiple of this.
const GROUP_ALIGN: usize = 2;
/// The most adapter bytes one program of a projection region prefetches (half of one core's L2:
/// 256 KiB and 1 MiB measured the same or worse, step by step, on SmolLM2 at batch 16).
const PREFETCH_BYTES: usize = 512 << 10;
/// A program spreads its prefetches over the base pairs that stream about this many bytes of
/// weights (all of them on a small model; the last of them on a large projection, so that what
/// was fetched is still in cache when its units read it).
const PREFETCH_WINDOW: usize = 512 << 10;

/// How a projection's input is presented.
pub struct Input<'a> {
    /// `[m, cols]` f32 activations.
    pub x: &'a [f32],
    pub m: usize,
    /// The same activations quantized, when the fast path is on.
    pub q8: Option<&'a ActQ8>,
}

impl Weight {
    /// `out [m, rows] = x [m, cols] W^T`, exact f32 activations, threaded.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(x.len(), m * cols, "activation shape");
        assert_eq!(out.len(), m * rows, "output shape");
        let op = SharedOut::new(out);
        parallel_ranges(rows, ROW_ALIGN, &|range| {
            let mut wrow = vec![0f32; cols];
            for n in range {
                let w: &[f32] = match self {
                    Weight::F32(d) => d.row(n),
                    _ => {
                        self.dequantize_row(n, &mut wrow);
                        &wrow
                    }
                };
                for r in 0..m {
                    let v = dot(w, &x[r * cols..(r + 1) * cols]);
                    // SAFETY: index < m * rows; row n belongs to this task only.
                    unsafe { op.write(r * rows + n, v) };
                }
            }
        });
    }

    /// Column `k` of the eight rows of row group `g`, dequantized (rows past the end are zero).
    /// Reads one tile: what the outlier correction needs per outlier and row group.
    pub fn group_column(&self, g: usize, k: usize) -> [f32; TILE_ROWS] {
        match self {
            Weight::F32(d) => std::array::from_fn(|i| {
                let n = g * TILE_ROWS + i;
                if n < d.rows() { d.row(n)[k] } else { 0.0 }
            }),
            Weight::Q4(w) => w.group_column(g, k),
            Weight::Q8(w) => w.group_column(g, k),
        }
    }

    /// Fast path when `inp.q8` is given and the weight is quantized; exact otherwise.
    pub fn matmul_input(&self, inp: &Input<'_>, out: &mut [f32]) {
        match (self, inp.q8) {
            (Weight::Q4(_) | Weight::Q8(_), Some(q)) => self.matmul_q8(q, best_isa(), out),
            _ => self.matmul(inp.x, inp.m, out),
        }
    }

    /// `out [m, rows] = x W^T` with int8 activations on the given instruction-set path.
    /// Dense weights are not supported here (they take the exact path).
    pub fn matmul_q8(&self, x: &ActQ8, isa: Isa, out: &mut [f32]) {
        Self::matmul_q8_many(&mut [(self, out)], x, isa);
    }

    /// Several products of the same int8 input (q, k and v; gate and up) in one parallel region:
    /// fewer barriers per token and one balanced split of all their rows.
    pub fn matmul_q8_many(jobs: &mut [(&Weight, &mut [f32])], x: &ActQ8, isa: Isa) {
        let mut projs: Vec<ProjQ8<'_, '_>> = jobs
            .iter_mut()
            .map(|(w, out)| ProjQ8 {
                weight: Some(*w),
                out_dim: w.rows(),
                out,
                lora: &[],
            })
            .collect();
        project_q8(&mut projs, x, isa);
    }

    /// Row groups `gs` (one, or two consecutive ones, which a 512-bit kernel computes together)
    /// of `x W^T` into `op` (`[m, rows]`). `cols[k]` receives group `gs.start + k`'s weight
    /// columns at `plan`'s outlier columns.
    #[allow(clippy::too_many_arguments)]
    fn q8_groups(
        &self,
        gs: Range<usize>,
        plan: &OutlierPlan,
        xrows: &[&[BlockQ8A]],
        isa: Isa,
        op: SharedOut,
        cols: &mut [Vec<[f32; TILE_ROWS]>; 2],
        ahead: &mut Prefetch<'_, '_>,
        per: usize,
    ) {
        debug_assert!(matches!(gs.len(), 1 | 2));
        let (rows, m) = (self.rows(), xrows.len());
        let mut tmp: [TileOut; 2] = [[[0f32; TILE_ROWS]; TILE_XROWS]; 2];
        let g = gs.start;
        for r0 in (0..m).step_by(TILE_XROWS) {
            let xs = &xrows[r0..(r0 + TILE_XROWS).min(m)];
            let side = ahead.chunk(per);
            match (self, gs.len()) {
                (Weight::Q4(w), 1) => {
                    q4q8_tiles_side(isa, w.kind(), w.group_tiles(g), xs, &mut tmp[0], side)
                }
                (Weight::Q4(w), _) => {
                    let tiles = [w.group_tiles(g), w.group_tiles(g + 1)];
                    q4q8_tiles2_side(isa, w.kind(), tiles, xs, &mut tmp, side)
                }
                (Weight::Q8(w), 1) => q8q8_tiles_side(isa, w.group_tiles(g), xs, &mut tmp[0], side),
                (Weight::Q8(w), _) => {
                    let tiles = [w.group_tiles(g), w.group_tiles(g + 1)];
                    q8q8_tiles2_side(isa, tiles, xs, &mut tmp, side)
                }
                (Weight::F32(_), _) => unreachable!("dense weights take the exact path"),
            }
            // A chunk ends with its run: the rest of this call's lines from the next runs.
            ahead.issue(per - side.lines());
            if r0 == 0 {
                // The outlier columns, now that the kernel has brought the groups' tiles into
                // cache (read before it, each column was a cache miss of its own).
                for (g, cols) in gs.clone().zip(cols.iter_mut()) {
                    cols.clear();
                    match self {
                        Weight::Q4(w) => q4_group_columns(isa, w, g, &plan.cols, cols),
                        Weight::Q8(w) => q8_group_columns(isa, w, g, &plan.cols, cols),
                        Weight::F32(_) => unreachable!("dense weights take the exact path"),
                    }
                }
            }
            for (k, g) in gs.clone().enumerate() {
                let n0 = g * TILE_ROWS;
                let fin = Finish {
                    vals: &tmp[k][..xs.len()],
                    plan,
                    r0,
                    cols: &cols[k],
                    op,
                    rows,
                    n0,
                    n1: (n0 + TILE_ROWS).min(rows),
                };
                #[cfg(target_arch = "x86_64")]
                if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
                    // SAFETY: these paths are only chosen on CPUs with AVX2.
                    unsafe { fin.run_avx2() };
                    continue;
                }
                fin.run();
            }
        }
    }
}

/// The end of a row group's tile kernel call: each row's sums plus its outliers' exact products
/// with the group's outlier columns, stored into the row's eight (or fewer) outputs.
struct Finish<'a> {
    /// The kernel's sums, one row per activation row `r0 + i`.
    vals: &'a [[f32; TILE_ROWS]],
    plan: &'a OutlierPlan,
    r0: usize,
    cols: &'a [[f32; TILE_ROWS]],
    op: SharedOut,
    rows: usize,
    n0: usize,
    n1: usize,
}

impl Finish<'_> {
    #[inline(always)]
    fn run(&self) {
        for (i, vals) in self.vals.iter().enumerate() {
            // Summed in a local (registers): scalar stores into `tmp` followed by a vector load
            // of it would stall on store forwarding.
            let acc = add_outliers(*vals, self.plan.row(self.r0 + i), |u| {
                &self.cols[u as usize]
            });
            // SAFETY: in bounds (checked by `slice_mut`); this row group belongs to the calling
            // task.
            let dst = unsafe {
                self.op
                    .slice_mut((self.r0 + i) * self.rows + self.n0, self.n1 - self.n0)
            };
            store_group(dst, &acc);
        }
    }

    /// [`Self::run`] in AVX2 registers: the same operations (a multiply, then an add, per
    /// outlier), so the same bits. The plain version round-trips the sums through the stack,
    /// and a 128-bit load of the upper half of a 256-bit store does not forward on Zen 4: a
    /// stall per row and group (5-8% of a batch-16 step).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn run_avx2(&self) {
        use std::arch::x86_64::*;
        let len = self.n1 - self.n0;
        for (i, vals) in self.vals.iter().enumerate() {
            // SAFETY: `vals` and every column are 8 f32; unaligned loads.
            let mut acc = unsafe { _mm256_loadu_ps(vals.as_ptr()) };
            for &(u, v) in self.plan.row(self.r0 + i) {
                // SAFETY: a column is 8 f32; unaligned load.
                let c = unsafe { _mm256_loadu_ps(self.cols[u as usize].as_ptr()) };
                acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(v), c));
            }
            // SAFETY: in bounds (checked by `slice_mut`); this row group belongs to the calling
            // task.
            let dst = unsafe { self.op.slice_mut((self.r0 + i) * self.rows + self.n0, len) };
            if len == TILE_ROWS {
                // SAFETY: `dst` holds eight f32; unaligned store.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), acc) };
            } else {
                let mut tmp = [0f32; TILE_ROWS];
                // SAFETY: `tmp` is 8 f32; unaligned store.
                unsafe { _mm256_storeu_ps(tmp.as_mut_ptr(), acc) };
                dst.copy_from_slice(&tmp[..len]);
            }
        }
    }
}

/// `dst = vals[..dst.len()]` (eight values but for a matrix's last, partial row group). Written
/// as two vector stores: as a plain copy, LLVM merged the whole and the partial case into one
/// variable-length `memcpy` call per row group (4% of a batch-16 decode step).
#[inline(always)]
fn store_group(dst: &mut [f32], vals: &[f32; TILE_ROWS]) {
    if dst.len() == TILE_ROWS {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `dst` holds eight f32 (checked); SSE2 is part of x86-64; unaligned stores.
        unsafe {
            use std::arch::x86_64::{_mm_loadu_ps, _mm_storeu_ps};
            _mm_storeu_ps(dst.as_mut_ptr(), _mm_loadu_ps(vals.as_ptr()));
            _mm_storeu_ps(dst.as_mut_ptr().add(4), _mm_loadu_ps(vals.as_ptr().add(4)));
        }
        #[cfg(not(target_arch = "x86_64"))]
        dst.copy_from_slice(vals);
    } else {
        for (d, v) in dst.iter_mut().zip(vals) {
            *d = *v;
        }
    }
}

/// `vals + Σ v · col(u)` over a row's outliers `(u, v)` (`col(u)`: the weight column of union
/// entry `u`).
#[inline]
pub(crate) fn add_outliers<'c>(
    mut acc: [f32; TILE_ROWS],
    outliers: &[(u32, f32)],
    col: impl Fn(u32) -> &'c [f32; TILE_ROWS],
) -> [f32; TILE_ROWS] {
    for &(u, v) in outliers {
        let c = col(u);
        for l in 0..TILE_ROWS {
            acc[l] += v * c[l];
        }
    }
    acc
}

/// Columns `ks` of the eight rows of row group `g`, dequantized into `out`, one per column (the
/// AVX2 path: one load and shift per column; otherwise the tile accessor).
pub(crate) fn q4_group_columns(
    isa: Isa,
    w: &Q4Matrix,
    g: usize,
    ks: &[u32],
    out: &mut Vec<[f32; TILE_ROWS]>,
) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
        // SAFETY: these instruction sets are only chosen when the CPU has AVX2, FMA and F16C.
        unsafe { crate::cpu::x86::q4_columns(w.kind(), w.group_tiles(g), ks, out) };
        return;
    }
    let _ = isa;
    out.clear();
    out.extend(ks.iter().map(|&k| w.group_column(g, k as usize)));
}

/// As [`q4_group_columns`] for a Q8_0 matrix.
pub(crate) fn q8_group_columns(
    isa: Isa,
    w: &Q8Matrix,
    g: usize,
    ks: &[u32],
    out: &mut Vec<[f32; TILE_ROWS]>,
) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
        // SAFETY: these instruction sets are only chosen when the CPU has AVX2, FMA and F16C.
        unsafe { crate::cpu::x86::q8_columns(w.group_tiles(g), ks, out) };
        return;
    }
    let _ = isa;
    out.clear();
    out.extend(ks.iter().map(|&k| w.group_column(g, k as usize)));
}

/// The outlier columns of an [`ActQ8`] deduplicated across its rows (the same few channels are
/// outliers in most tokens), so that a row group dequantizes each such weight column once, not
/// once per row and outlier.
pub(crate) struct OutlierPlan {
    pub(crate) cols: Vec<u32>,
    /// Every row's (index into `cols`, exact value), row after row; row `r` is
    /// `entries[starts[r] .. starts[r + 1]]`. Flat: one allocation per call, not one per row.
    entries: Vec<(u32, f32)>,
    starts: Vec<usize>,
}

impl OutlierPlan {
    fn new(x: &ActQ8) -> Self {
        // Each column's place in the union, found through a map over the columns that is left
        // all unset between calls. This runs on the caller's thread before every product, with
        // the other threads waiting: sorting every row's outliers together and searching the
        // union took 3.6 us per call at batch 16, this 2.4.
        use std::cell::RefCell;
        thread_local! {
            static PLACE: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
        }
        const UNSET: u32 = u32::MAX;
        let mut cols: Vec<u32> = Vec::new();
        let mut entries = Vec::new();
        let mut starts = Vec::with_capacity(x.rows() + 1);
        PLACE.with_borrow_mut(|place| {
            if place.len() < x.cols() {
                place.resize(x.cols(), UNSET);
            }
            for r in 0..x.rows() {
                for &(k, _) in x.outliers(r) {
                    let at = &mut place[k as usize];
                    if *at == UNSET {
                        *at = 0;
                        cols.push(k);
                    }
                }
            }
            cols.sort_unstable();
            for (u, &k) in cols.iter().enumerate() {
                place[k as usize] = u as u32;
            }
            for r in 0..x.rows() {
                starts.push(entries.len());
                entries.extend(x.outliers(r).iter().map(|&(k, v)| (place[k as usize], v)));
            }
            starts.push(entries.len());
            for &k in &cols {
                place[k as usize] = UNSET;
            }
        });
        Self {
            cols,
            entries,
            starts,
        }
    }

    /// Row `r`'s outliers as (index into `cols`, exact value).
    pub(crate) fn row(&self, r: usize) -> &[(u32, f32)] {
        &self.entries[self.starts[r]..self.starts[r + 1]]
    }
}

/// Byte runs to prefetch (a region's adapter bytes), handed out a contiguous chunk of lines at a
/// time to the tile kernels, which prefetch one line per tile they compute ([`Side`]).
struct Prefetch<'r, 'a> {
    runs: &'r [&'a [u8]],
    /// The next run, and the next line in it.
    at: (usize, usize),
    /// Lines still to hand out.
    budget: usize,
}

impl<'r, 'a> Prefetch<'r, 'a> {
    fn new(runs: &'r [&'a [u8]]) -> Self {
        Self {
            runs,
            at: (0, 0),
            budget: usize::MAX,
        }
    }

    fn lines(&self) -> usize {
        self.runs.iter().map(|r| r.len().div_ceil(LINE)).sum()
    }

    /// Lines `first .. first + n` only.
    fn window(mut self, first: usize, n: usize) -> Self {
        self.skip(first);
        self.budget = n;
        self
    }

    fn skip(&mut self, mut n: usize) {
        while n > 0 && self.at.0 < self.runs.len() {
            let left = self.runs[self.at.0].len().div_ceil(LINE) - self.at.1;
            if n < left {
                self.at.1 += n;
                return;
            }
            n -= left;
            self.at = (self.at.0 + 1, 0);
        }
    }

    /// The next up to `n` lines, within one run.
    fn chunk(&mut self, n: usize) -> Side {
        let Some(run) = self.runs.get(self.at.0) else {
            return Side::NONE;
        };
        let side = Side::of(&run[self.at.1 * LINE..], n.min(self.budget));
        self.skip(side.lines());
        self.budget -= side.lines();
        side
    }

    /// Prefetches the next `n` lines at once (what one chunk could not hold).
    fn issue(&mut self, mut n: usize) {
        while n > 0 {
            let side = self.chunk(n);
            if side.lines() == 0 {
                return;
            }
            side.all();
            n -= side.lines();
        }
    }
}

/// One projection of a shared int8 input: `out = x W^T` when `weight` is given (else `out` is
/// left as it is), then `out[r] += scaling * B (A x_r)` for the rows of each LoRA segment.
/// `out` is `[x.rows(), out_dim]`.
pub struct ProjQ8<'w, 'o> {
    pub weight: Option<&'w Weight>,
    pub out: &'o mut [f32],
    pub out_dim: usize,
    pub lora: &'w [LoraSegmentQ8<'w>],
}

/// Projections of the same int8 input (q, k and v; gate and up), their base products and every
/// LoRA segment's shrink and expand, in **one** parallel region of one *program* per thread:
/// 1. its share of the base product, a pair of row groups (eight output columns each, for every
///    row) at a time, prefetching its adapter bytes meanwhile (at most [`PREFETCH_BYTES`], one
///    cache line per weight tile, over the pairs that stream the last [`PREFETCH_WINDOW`] bytes of
///    its weights), so that they stream in while the base product computes; then pairs that the
///    other programs have not started, from the back of their shares;
/// 2. its *units*: the pieces (up to four rows of one segment) of one run of rows across the
///    jobs, each a shrink `t = A x` quantized per row, then its expand `out[rows] += B t`; then
///    units the others have not started. The expands add to the base product's outputs, so they
///    wait for every pair; until then a program runs the shrinks of its first units (they read
///    only the input) and keeps their results.
///
/// A unit reads its adapter's A and B of every job in the order they lie in memory (an adapter
/// is packed layer by layer, projection by projection, A before B), as one stream, and a program
/// prefetches exactly the bytes of its own units, so that they are in its own core's cache. A
/// distinct adapter per row otherwise reads ~10 KB runs in scattered places, which the hardware
/// prefetcher barely starts on and which no compute hides.
///
/// Which units each program gets, and so which bytes it prefetches, is planned inside the region
/// by the first program to start ([`UnitPlan`]); the others start their base shares meanwhile and
/// prefetch over the pairs they have left once the plan is there. (Planned before the region, on
/// the calling thread, it kept the other threads waiting: 16 distinct adapters on SmolLM2's
/// projections added 2.2-2.3 ms per step, against 2.05-2.07 ms planned inside, alternated runs.)
///
/// Whichever thread claims a program runs it to its end. The wait for the base product ends:
/// each program first takes pairs until none is left unclaimed, and a claimed pair is computed
/// without waiting.
pub fn project_q8(jobs: &mut [ProjQ8<'_, '_>], x: &ActQ8, isa: Isa) {
    let clock = Clock::start();
    project_q8_in(jobs, x, isa, clock);
    clock.add_to(Phase::Regions);
}

/// [`project_q8`], its phases timed from `clock` (when on).
fn project_q8_in(jobs: &mut [ProjQ8<'_, '_>], x: &ActQ8, isa: Isa, clock: Clock) {
    let m = x.rows();
    fetch_structs(jobs);
    for j in jobs.iter() {
        if let Some(w) = j.weight {
            assert!(
                !matches!(w, Weight::F32(_)),
                "dense weights take the exact path"
            );
            assert_eq!(x.cols(), w.cols(), "activation width");
            assert_eq!(j.out_dim, w.rows(), "output width");
        }
        assert_eq!(j.out.len(), m * j.out_dim, "output shape");
        for s in j.lora {
            assert!(
                s.rows.end <= m && s.a.cols() == x.cols(),
                "segment rows or input width"
            );
            assert!(
                s.b.rows() == j.out_dim && s.b.rank() == s.a.rows(),
                "B shape"
            );
        }
        // Units write their segments' rows unsynchronized: segments must not overlap. (In order
        // of rows, as the engine gives them, that needs no sorted copy.)
        let apart = |a: &Range<usize>, b: &Range<usize>| a.end <= b.start;
        if j.lora.is_sorted_by_key(|s| s.rows.start) {
            assert!(
                j.lora.windows(2).all(|w| apart(&w[0].rows, &w[1].rows)),
                "LoRA segments of one projection overlap"
            );
        } else {
            let mut ranges: Vec<_> = j.lora.iter().map(|s| s.rows.clone()).collect();
            ranges.sort_unstable_by_key(|r| r.start);
            assert!(
                ranges.windows(2).all(|w| apart(&w[0], &w[1])),
                "LoRA segments of one projection overlap"
            );
        }
    }
    // Row groups of every job that has something to compute.
    let mut starts = Vec::with_capacity(jobs.len() + 1);
    let mut total = 0;
    for j in jobs.iter() {
        starts.push(total);
        if j.weight.is_some() || !j.lora.is_empty() {
            total += j.out_dim.div_ceil(TILE_ROWS);
        }
    }
    starts.push(total);
    if total == 0 {
        return;
    }
    let plan = OutlierPlan::new(x);
    let outs: Vec<JobOut<'_, '_>> = jobs
        .iter_mut()
        .map(|j| (j.weight, SharedOut::new(j.out), j.out_dim, j.lora))
        .collect();
    let xrows: Vec<&[BlockQ8A]> = (0..m).map(|r| x.row(r)).collect();
    let pool = crate::cpu::threads::global();
    let programs = pool.threads();
    // The base product: one even share of the row groups per program, claimed a pair at a time:
    // by its owner from the front (one stream), and from the back by a program done with its
    // own. Up to four rows this streams weights at the threads' pace: with four tasks per thread
    // instead, decode at batch 1, 2 and 4 ran 4-7%, 3.5% and 2.5% slower, alternated step by
    // step in one process (at batch 8 and 16 the two measured the same; with adapters, a share
    // per program is what lets it know its own units before it starts). Stealing gained 6-8% at
    // batch 2, 2% at 3 and 3% at 4; nothing at batch 1, where one thread's share took 24 us and
    // the other's 17 in every region (this VM), but both streams share the memory bandwidth.
    let per = total.div_ceil(programs).next_multiple_of(GROUP_ALIGN);
    let base_claims: Vec<Claims> = (0..programs)
        .map(|p| {
            let (g0, g1) = ((p * per).min(total), ((p + 1) * per).min(total));
            Claims::new(g0 / 2..g1.div_ceil(2))
        })
        .collect();
    let base_bytes: usize = outs.iter().filter_map(|o| o.0).map(Weight::nbytes).sum();
    let pair_bytes = base_bytes.div_ceil(total.div_ceil(2));
    let calls_per_pair = m.div_ceil(TILE_XROWS);
    // Row groups done, added by each program once it has computed every pair it claimed. (Added
    // pair by pair, its cache line went from core to core at every pair: with the claims on lines
    // of their own, counting once per program took 1-2% off the projections, with or without
    // adapters, alternated step by step in one process.)
    let based = AtomicUsize::new(0);
    // Pair `g / 2`; the row groups it computed.
    let run_pair = |g: usize,
                    ahead: &mut Prefetch<'_, '_>,
                    per_call: usize,
                    cols: &mut [Vec<[f32; TILE_ROWS]>; 2]| {
        for (j, gs) in task_runs(g..(g + 2).min(total), &starts) {
            if let Some(w) = outs[j].0 {
                w.q8_groups(gs, &plan, &xrows, isa, outs[j].1, cols, ahead, per_call);
            }
        }
        (g + 2).min(total) - g
    };
    // A piece's shrink result per row: its codes (the rank rounded up to the expand's chunks).
    let stride = |&(ji, si, _): &Piece| outs[ji].3[si].b.t_len();
    // A piece's shrink, into `codes` (a row after another, `stride` each) and `scales`.
    let shrink =
        |pc: &Piece, scratch: &mut ShrinkScratch, codes: &mut Vec<i8>, scales: &mut Vec<f32>| {
            let (ji, si, rows) = pc;
            let (s, stride) = (&outs[*ji].3[*si], stride(pc));
            let (c0, s0) = (codes.len(), scales.len());
            codes.resize(c0 + rows.len() * stride, 0);
            scales.resize(s0 + rows.len(), 0.0);
            let (c, d) = (&mut codes[c0..], &mut scales[s0..]);
            shrink_rows(isa, x, &plan, rows.clone(), s.a, c, stride, d, scratch);
        };
    // A piece's expand into the base product's outputs, from its shrink's `codes` and `scales`.
    let expand = |pc: &Piece, codes: &[i8], scales: &[f32]| {
        let (ji, si, rows) = pc;
        let (_, op, out_dim, lora) = outs[*ji];
        let seg = LoraSegmentQ8 {
            rows: rows.clone(),
            ..lora[*si].clone()
        };
        let (stride, r0) = (stride(pc), rows.start);
        expand_groups(
            isa,
            &seg,
            0..out_dim.div_ceil(TILE_ROWS),
            |r| (&codes[(r - r0) * stride..][..stride], scales[r - r0]),
            op,
            out_dim,
        );
    };
    // A unit whole: each piece's shrink, then its expand (the order its bytes lie in).
    let unit = |plan: &UnitPlan<'_>,
                u: usize,
                scratch: &mut ShrinkScratch,
                codes: &mut Vec<i8>,
                scales: &mut Vec<f32>| {
        for pc in &plan.pieces[plan.units[u].clone()] {
            codes.clear();
            scales.clear();
            shrink(pc, scratch, codes, scales);
            expand(pc, codes, scales);
        }
    };
    let has_units = outs.iter().any(|o| !o.3.is_empty());
    // The adapter units' plan is made in the region, by the first program to start, while the
    // others begin their base shares (made before the region, it kept every other thread
    // waiting).
    let (planned, planner) = (OnceLock::new(), AtomicBool::new(!has_units));
    // When the last program's base share ended (`--phases`).
    let base_end = AtomicU64::new(0);
    pool.run(programs, &|p| {
        if !planner.swap(true, Ordering::Relaxed) {
            let _ = planned.set(UnitPlan::new(&outs, programs));
        }
        let mut cols = [Vec::new(), Vec::new()];
        // Its base share, prefetching its adapter bytes over the last pairs.
        let own = base_claims[p].len();
        let fetching = PREFETCH_WINDOW
            .div_ceil(pair_bytes.max(1))
            .clamp(1, own.max(1));
        // Its adapter bytes and the lines per tile kernel call, from when the plan is known (at
        // once in the program that made it; another may have started its share by then, and
        // spreads them over the pairs it has left).
        let mut ahead: Option<(Prefetch<'_, '_>, usize)> = None;
        let mut none = Prefetch::new(&[]);
        let (mut done, mut groups) = (0, 0);
        while let Some(pair) = base_claims[p].front() {
            if ahead.is_none()
                && base_bytes > 0
                && let Some(plan) = planned.get()
            {
                let mine: &[&[u8]] = &plan.runs[p];
                let lines = Prefetch::new(mine).lines().min(PREFETCH_BYTES / LINE);
                let over = fetching.min(own.saturating_sub(done)).max(1);
                let per_call = lines.div_ceil(over * calls_per_pair);
                ahead = Some((Prefetch::new(mine).window(0, lines), per_call));
            }
            groups += match &mut ahead {
                Some((fetch, per_call)) if done + fetching >= own => {
                    run_pair(2 * pair, fetch, *per_call, &mut cols)
                }
                _ => run_pair(2 * pair, &mut none, 0, &mut cols),
            };
            done += 1;
        }
        if done > 0
            && let Some((fetch, _)) = &mut ahead
        {
            // What thieves left unfetched.
            fetch.issue(usize::MAX);
        }
        for other in (1..programs).map(|k| (p + k) % programs) {
            while let Some(pair) = base_claims[other].back() {
                groups += run_pair(2 * pair, &mut none, 0, &mut cols);
            }
        }
        based.fetch_add(groups, Ordering::Release);
        if let Some(ns) = clock.ns() {
            base_end.fetch_max(ns, Ordering::Relaxed);
        }
        if !has_units {
            return;
        }
        let units_clock = Clock::start();
        // Made by now, or being made by a program that is running.
        let plan = loop {
            if let Some(plan) = planned.get() {
                break plan;
            }
            std::hint::spin_loop();
        };
        let (unit_claims, pieces, units) = (&plan.claims, &plan.pieces, &plan.units);
        let (mut scratch, mut codes, mut scales) =
            (ShrinkScratch::default(), Vec::new(), Vec::new());
        // The expands add to the base product's outputs. Until the last pairs are done, the
        // shrinks of its first units (they read only the input), kept for their expands.
        let (mut early, mut early_codes, mut early_scales) = (Vec::new(), Vec::new(), Vec::new());
        while based.load(Ordering::Acquire) < total {
            let Some(u) = unit_claims[p].front() else {
                break;
            };
            for pc in &pieces[units[u].clone()] {
                shrink(pc, &mut scratch, &mut early_codes, &mut early_scales);
            }
            early.push(u);
        }
        // Every pair is claimed by now, by programs that compute it without waiting: this wait
        // ends.
        let mut spins = 0u32;
        while based.load(Ordering::Acquire) < total {
            spins += 1;
            if spins.is_multiple_of(1 << 14) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let (mut c, mut d) = (&early_codes[..], &early_scales[..]);
        for pc in early.iter().flat_map(|&u| &pieces[units[u].clone()]) {
            let rows = pc.2.len();
            let n = rows * stride(pc);
            expand(pc, &c[..n], &d[..rows]);
            (c, d) = (&c[n..], &d[rows..]);
        }
        while let Some(u) = unit_claims[p].front() {
            unit(plan, u, &mut scratch, &mut codes, &mut scales);
        }
        for other in (1..programs).map(|k| (p + k) % programs) {
            while let Some(u) = unit_claims[other].back() {
                unit(plan, u, &mut scratch, &mut codes, &mut scales);
            }
        }
        units_clock.add_to(Phase::AdapterUnits);
    });
    if clock.is_on() {
        phases::add(Phase::BaseProducts, base_end.into_inner());
    }
}

/// A job of one region as its programs see it: its weight, output, output width and LoRA
/// segments.
type JobOut<'w, 's> = (
    Option<&'w Weight>,
    SharedOut,
    usize,
    &'s [LoraSegmentQ8<'s>],
);

/// A piece: (job, segment, up to [`ROWS_PER_TASK`] of the segment's rows).
type Piece = (usize, usize, Range<usize>);

/// The adapter work of one region ([`project_q8`]): its pieces, grouped into units (the pieces of
/// the same rows across the jobs, job after job), each program's contiguous run of units (about
/// even in bytes), and each program's adapter bytes in the order its units read them.
struct UnitPlan<'s> {
    pieces: Vec<Piece>,
    /// Ranges of `pieces`.
    units: Vec<Range<usize>>,
    /// Per program: its units.
    claims: Vec<Claims>,
    /// Per program: its A and B byte runs.
    runs: Vec<Vec<&'s [u8]>>,
}

impl<'s> UnitPlan<'s> {
    fn new(outs: &[JobOut<'_, 's>], programs: usize) -> Self {
        let segments = || {
            outs.iter()
                .enumerate()
                .flat_map(|(ji, o)| o.3.iter().enumerate().map(move |(si, s)| (ji, si, s)))
        };
        let mut pieces: Vec<Piece> = Vec::with_capacity(
            segments()
                .map(|(_, _, s)| s.rows.len().div_ceil(ROWS_PER_TASK))
                .sum(),
        );
        for (ji, si, s) in segments() {
            for r in s.rows.clone().step_by(ROWS_PER_TASK) {
                pieces.push((ji, si, r..(r + ROWS_PER_TASK).min(s.rows.end)));
            }
        }
        // (Keys are unique, segments of a job being apart: the unstable sort gives the same
        // order, without the stable sort's buffer.)
        pieces.sort_unstable_by_key(|(ji, _, rows)| (rows.start, *ji));
        let mut units: Vec<Range<usize>> = Vec::new();
        for (i, pc) in pieces.iter().enumerate() {
            match units.last_mut() {
                Some(u) if pieces[u.start].2 == pc.2 => u.end = i + 1,
                _ => units.push(i..i + 1),
            }
        }
        let seg = |&(ji, si, _): &Piece| &outs[ji].3[si];
        let unit_bytes: Vec<usize> = units
            .iter()
            .map(|u| {
                pieces[u.clone()]
                    .iter()
                    .map(|pc| seg(pc).a.nbytes() + seg(pc).b.nbytes())
                    .sum()
            })
            .collect();
        let all_bytes: usize = unit_bytes.iter().sum();
        let mut bounds = vec![0; programs + 1];
        let mut acc = 0;
        for (i, &b) in unit_bytes.iter().enumerate() {
            acc += b;
            // Unit i goes to the program whose share of the bytes holds its middle.
            let p = ((acc - b / 2) * programs / all_bytes.max(1)).min(programs - 1);
            bounds[p + 1] = i + 1;
        }
        for p in 1..=programs {
            bounds[p] = bounds[p].max(bounds[p - 1]);
        }
        let claims = (0..programs)
            .map(|p| Claims::new(bounds[p]..bounds[p + 1]))
            .collect();
        let runs = (0..programs)
            .map(|p| {
                let mine = &units[bounds[p]..bounds[p + 1]];
                let mut runs = Vec::with_capacity(2 * mine.iter().map(|u| u.len()).sum::<usize>());
                // The pieces of one segment (rows sharing an adapter) are in consecutive units
                // and share its bytes: fetched once.
                let mut last = vec![usize::MAX; outs.len()];
                for &(ji, si, _) in mine.iter().flat_map(|u| &pieces[u.clone()]) {
                    if last[ji] != si {
                        last[ji] = si;
                        runs.push(outs[ji].3[si].a.as_bytes());
                        runs.push(outs[ji].3[si].b.all_data());
                    }
                }
                runs
            })
            .collect();
        Self {
            pieces,
            units,
            claims,
            runs,
        }
    }
}

/// Prefetches the structs (shapes, and where the bytes are) of the jobs' weights and of every
/// LoRA segment's A and B. An adapter's are small and lie apart, and they are cold whenever a
/// region starts: a decode step touches thousands of them once each, with megabytes of adapter
/// bytes streaming through the caches between two uses. Read in turn by the checks and the
/// set-up, they were a cache miss after another on the caller's thread, with the other threads
/// waiting; fetched together, the misses overlap.
fn fetch_structs(jobs: &[ProjQ8<'_, '_>]) {
    use crate::cpu::qdot::prefetch_value;
    for j in jobs {
        if let Some(w) = j.weight {
            prefetch_value(w);
        }
        for s in j.lora {
            prefetch_value(s.a);
            prefetch_value(s.b);
        }
    }
}

/// The items `first .. end` of one program (pairs of row groups, or adapter pieces), handed out
/// from the front (its owner) or the back (a thief) with one compare-and-swap on both ends packed
/// together, so that each item goes to exactly one thread. Each on its own pair of cache lines:
/// the programs' claims side by side in one line sent it from core to core at every claim.
#[repr(align(128))]
struct Claims(std::sync::atomic::AtomicU64);

impl Claims {
    fn new(items: Range<usize>) -> Self {
        Self(std::sync::atomic::AtomicU64::new(
            (items.start as u64) << 32 | items.end as u64,
        ))
    }

    /// Items not handed out yet.
    fn len(&self) -> usize {
        let v = self.0.load(Ordering::Acquire);
        (v & 0xffff_ffff).saturating_sub(v >> 32) as usize
    }

    fn take(&self, from_front: bool) -> Option<usize> {
        let mut v = self.0.load(Ordering::Acquire);
        loop {
            let (f, b) = (v >> 32, v & 0xffff_ffff);
            if f >= b {
                return None;
            }
            let (next, item) = if from_front {
                ((f + 1) << 32 | b, f)
            } else {
                (f << 32 | (b - 1), b - 1)
            };
            match self
                .0
                .compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(item as usize),
                Err(now) => v = now,
            }
        }
    }

    /// The next item from the front.
    fn front(&self) -> Option<usize> {
        self.take(true)
    }

    /// The next item from the back.
    fn back(&self) -> Option<usize> {
        self.take(false)
    }
}

/// The row groups `groups` of the concatenated jobs (`starts` their first groups), job by job:
/// (job, its row groups).
fn task_runs(
    groups: Range<usize>,
    starts: &[usize],
) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
    let (first, end) = (groups.start, groups.end);
    let mut gg = first;
    std::iter::from_fn(move || {
        if gg >= end {
            return None;
        }
        let j = starts.partition_point(|&s| s <= gg) - 1;
        let gs = gg - starts[j]..end.min(starts[j + 1]) - starts[j];
        gg = starts[j] + gs.end;
        Some((j, gs))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::qdot::available_isas;
    use crate::{BlockQ8, DenseMatrix, Q4Kind, Q4Matrix, Q8Matrix};
    use half::f16;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// An affine (Q4_1-like) matrix with random codes, scales and offsets.
    fn affine(rows: usize, cols: usize, g: &mut Lcg) -> Q4Matrix {
        let bpr = cols.div_ceil(32);
        let blocks = (0..rows * bpr)
            .map(|_| {
                let mut b = crate::BlockQ4 {
                    d: f16::from_f32(g.next().abs() * 0.1 + 0.01).to_bits(),
                    m: f16::from_f32(g.next() * 0.5).to_bits(),
                    qs: [0; 16],
                };
                for j in 0..32 {
                    b.set_code(j, ((g.next() + 1.0) * 7.99) as u8);
                }
                b
            })
            .collect();
        Q4Matrix::from_blocks(rows, cols, Q4Kind::Affine, blocks).unwrap()
    }

    /// A zero-point matrix with random codes, scales and zero points in `0..=16` (16: GPTQ's v1
    /// format stores 15 + 1), so that the folded `c - z + 128` spans its whole range.
    fn zero_point(rows: usize, cols: usize, g: &mut Lcg) -> Q4Matrix {
        let bpr = cols.div_ceil(32);
        let blocks = (0..rows * bpr)
            .map(|i| {
                let mut b = crate::BlockQ4 {
                    d: f16::from_f32(g.next().abs() * 0.1 + 0.01).to_bits(),
                    m: if i % 5 == 0 {
                        16
                    } else {
                        ((g.next() + 1.0) * 8.49) as u16
                    },
                    qs: [0; 16],
                };
                for j in 0..32 {
                    b.set_code(j, ((g.next() + 1.0) * 7.99) as u8);
                }
                b
            })
            .collect();
        Q4Matrix::from_blocks(rows, cols, Q4Kind::ZeroPoint, blocks).unwrap()
    }

    fn q8(rows: usize, cols: usize, g: &mut Lcg) -> Q8Matrix {
        let blocks = (0..rows * cols.div_ceil(32))
            .map(|_| {
                let mut qs = [0i8; 32];
                for q in qs.iter_mut() {
                    *q = (g.next() * 127.0) as i8;
                }
                qs[3] = -128; // the extreme a sign trick must survive
                BlockQ8 {
                    d: f16::from_f32(g.next().abs() * 0.02).to_bits(),
                    qs,
                }
            })
            .collect();
        Q8Matrix::from_blocks(rows, cols, blocks).unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}: [{i}] {x} vs {y}"
            );
        }
    }

    #[test]
    fn every_isa_matches_the_scalar_reference_on_random_shapes_with_partial_blocks() {
        let mut g = Lcg(11);
        for &(rows, cols, m) in &[
            (1, 32, 1),
            (7, 40, 1),
            (33, 176, 3),
            (64, 576, 5),
            (17, 1536, 8),
            (5, 16, 2),
            (24, 96, 13),
            (16, 64, 16),
        ] {
            let x = g.vec(m * cols);
            let xq = ActQ8::quantize(&x, m, cols);
            let wq = Weight::Q4(Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap());
            let wa = Weight::Q4(affine(rows, cols, &mut g));
            let wz = Weight::Q4(zero_point(rows, cols, &mut g));
            let w8 = Weight::Q8(q8(rows, cols, &mut g));
            for w in [&wq, &wa, &wz, &w8] {
                let mut want = vec![0f32; m * rows];
                w.matmul_q8(&xq, Isa::Scalar, &mut want);
                for isa in available_isas() {
                    let mut got = vec![0f32; m * rows];
                    w.matmul_q8(&xq, isa, &mut got);
                    close(
                        &got,
                        &want,
                        1e-5,
                        &format!("{} {} [{rows},{cols}] m={m}", isa.name(), w.format_name()),
                    );
                }
            }
        }
    }

    #[test]
    fn fused_lora_projection_matches_base_plus_reference_sgmv_on_every_isa() {
        use crate::cpu::lora::{AdapterBits, LoraA, LoraB, LoraSegment};
        let mut g = Lcg(31);
        // (rows, cols, m, segments as (row range, rank)); ranks 8, 16, 40 (a partial second
        // block) and 64 mixed in one job; rows with no adapter in between.
        type Segs = &'static [(std::ops::Range<usize>, usize)];
        let cases: &[(usize, usize, usize, Segs)] = &[
            (40, 96, 1, &[(0..1, 16)]),
            (33, 70, 5, &[(0..2, 8), (3..5, 40)]),
            (64, 576, 13, &[(0..4, 16), (4..5, 64), (6..13, 16)]),
            (17, 160, 7, &[(1..7, 40)]),
            (24, 64, 3, &[]),
        ];
        for (ci, (rows, cols, m, segs)) in cases.iter().enumerate() {
            let (rows, cols, m) = (*rows, *cols, *m);
            let mut x = g.vec(m * cols);
            x[cols / 2] = 300.0; // an outlier channel in row 0, exact on every path
            if m > 2 {
                x[2 * cols + 3] = -250.0;
            }
            let xq = ActQ8::quantize(&x, m, cols);
            assert!(xq.has_outliers());
            let ab: Vec<(Vec<f32>, Vec<f32>, usize)> = segs
                .iter()
                .map(|(_, rank)| {
                    let a: Vec<f32> = g.vec(rank * cols).iter().map(|v| v * 0.1).collect();
                    let b: Vec<f32> = g.vec(rows * rank).iter().map(|v| v * 0.1).collect();
                    (a, b, *rank)
                })
                .collect();
            let w = Weight::Q4(affine(rows, cols, &mut g));
            let w8 = Weight::Q8(q8(rows, cols, &mut g));
            for bits in [AdapterBits::Int8, AdapterBits::Int4] {
                let qs: Vec<(LoraA, LoraB)> = ab
                    .iter()
                    .map(|(a, b, rank)| {
                        (
                            LoraA::quantize(a, *rank, cols, bits).unwrap(),
                            LoraB::quantize_bits(b, rows, *rank, bits).unwrap(),
                        )
                    })
                    .collect();
                // Int8 against the f32 adapter itself; int4 (a coarser adapter by choice) against
                // the values its codes stand for, so both hold the kernels to the same bound.
                let deq: Vec<(Vec<f32>, Vec<f32>, usize)> = qs
                    .iter()
                    .zip(&ab)
                    .map(|((qa, qb), (a, b, rank))| match bits {
                        AdapterBits::Int8 => (a.clone(), b.clone(), *rank),
                        AdapterBits::Int4 => (qa.dequantize(), qb.dequantize(), *rank),
                    })
                    .collect();
                let lora: Vec<LoraSegmentQ8<'_>> = segs
                    .iter()
                    .zip(&qs)
                    .enumerate()
                    .map(|(i, ((r, _), (a, b)))| LoraSegmentQ8 {
                        rows: r.clone(),
                        a,
                        b,
                        scaling: 0.5 + i as f32,
                    })
                    .collect();
                let exact_segs: Vec<LoraSegment<'_>> = segs
                    .iter()
                    .zip(&deq)
                    .enumerate()
                    .map(|(i, ((r, _), (a, b, rank)))| LoraSegment {
                        rows: r.clone(),
                        a,
                        b,
                        rank: *rank,
                        scaling: 0.5 + i as f32,
                    })
                    .collect();
                fused_lora_case(
                    ci,
                    bits,
                    &x,
                    &xq,
                    (rows, cols, m),
                    segs,
                    &lora,
                    &exact_segs,
                    [&w, &w8],
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fused_lora_case(
        ci: usize,
        bits: crate::cpu::lora::AdapterBits,
        x: &[f32],
        xq: &ActQ8,
        (rows, cols, m): (usize, usize, usize),
        segs: &[(std::ops::Range<usize>, usize)],
        lora: &[LoraSegmentQ8<'_>],
        exact_segs: &[crate::cpu::lora::LoraSegment<'_>],
        [w, w8]: [&Weight; 2],
    ) {
        for (wi, weight) in [Some(w), Some(w8), None].into_iter().enumerate() {
            let what = format!("case {ci} weight {wi} int{bits}");
            let run = |isa: Isa| {
                let mut out = vec![0.25f32; m * rows];
                project_q8(
                    &mut [ProjQ8 {
                        weight,
                        out: &mut out,
                        out_dim: rows,
                        lora,
                    }],
                    xq,
                    isa,
                );
                out
            };
            let scalar = run(Isa::Scalar);
            // The base alone, through the plain product of this file.
            let mut base = vec![0.25f32; m * rows];
            if let Some(w) = weight {
                w.matmul_q8(xq, Isa::Scalar, &mut base);
            }
            let mut exact = base.clone();
            crate::cpu::lora::sgmv_reference(x, cols, &mut exact, rows, exact_segs);
            let covered = |r: usize| segs.iter().any(|(s, _)| s.contains(&r));
            for r in 0..m {
                let (got, b) = (&scalar[r * rows..][..rows], &base[r * rows..][..rows]);
                if !covered(r) {
                    assert_eq!(got, b, "{what}: row {r} has no adapter");
                    continue;
                }
                // The delta against the exact f32 delta: int8 roundings of x, A, t and B.
                let want = &exact[r * rows..][..rows];
                let scale = want
                    .iter()
                    .zip(b)
                    .fold(0f32, |s, (w, b)| s.max((w - b).abs()));
                let err = got
                    .iter()
                    .zip(want)
                    .fold(0f32, |e, (g, w)| e.max((g - w).abs()));
                assert!(
                    scale > 0.0 && err < 0.05 * scale,
                    "{what}: row {r} delta error {err} vs scale {scale}"
                );
            }
            for isa in available_isas() {
                close(&run(isa), &scalar, 1e-5, &format!("{what} {}", isa.name()));
            }
        }
    }

    #[test]
    fn jobs_with_mixed_segments_in_one_region_equal_each_job_alone_every_time() {
        // q/k/v-like jobs of different widths sharing one input. Adapters: one over rows 0..6
        // (two pieces, so two units that share its bytes), one per row over 7..12, none on row
        // 6; the middle job lacks the adapter of row 8 (its units differ from the others'), and
        // the last job lists its segments out of order.
        use crate::cpu::lora::{LoraA, LoraB};
        let mut g = Lcg(43);
        let (cols, m, rank) = (160, 12, 16);
        let widths = [48, 16, 24];
        let mut x = g.vec(m * cols);
        x[5 * cols + 7] = 200.0; // an outlier, exact on every path
        let xq = ActQ8::quantize(&x, m, cols);
        let weights: Vec<Weight> = widths
            .iter()
            .map(|&w| Weight::Q4(affine(w, cols, &mut g)))
            .collect();
        let rows_of: Vec<std::ops::Range<usize>> = std::iter::once(0..6)
            .chain((7..12).map(|r| r..r + 1))
            .collect();
        let adapters: Vec<Vec<(LoraA, LoraB)>> = widths
            .iter()
            .map(|&w| {
                (0..rows_of.len())
                    .map(|_| {
                        let a: Vec<f32> = g.vec(rank * cols).iter().map(|v| v * 0.1).collect();
                        let b: Vec<f32> = g.vec(w * rank).iter().map(|v| v * 0.1).collect();
                        (
                            LoraA::Q8(Q8Matrix::quantize(&a, rank, cols).unwrap()),
                            LoraB::quantize(&b, w, rank).unwrap(),
                        )
                    })
                    .collect()
            })
            .collect();
        let segs: Vec<Vec<LoraSegmentQ8<'_>>> = adapters
            .iter()
            .enumerate()
            .map(|(j, per)| {
                let mut v: Vec<LoraSegmentQ8<'_>> = per
                    .iter()
                    .zip(&rows_of)
                    .enumerate()
                    .filter(|&(i, _)| !(j == 1 && rows_of[i].start == 8))
                    .map(|(i, ((a, b), rows))| LoraSegmentQ8 {
                        rows: rows.clone(),
                        a,
                        b,
                        scaling: 0.5 + i as f32 * 0.25,
                    })
                    .collect();
                if j == 2 {
                    v.reverse();
                }
                v
            })
            .collect();
        let isa = best_isa();
        let alone: Vec<Vec<f32>> = (0..3)
            .map(|j| {
                let mut out = vec![f32::NAN; m * widths[j]];
                project_q8(
                    &mut [ProjQ8 {
                        weight: Some(&weights[j]),
                        out: &mut out,
                        out_dim: widths[j],
                        lora: &segs[j],
                    }],
                    &xq,
                    isa,
                );
                out
            })
            .collect();
        for round in 0..20 {
            let mut outs: Vec<Vec<f32>> = widths.iter().map(|&w| vec![f32::NAN; m * w]).collect();
            let mut jobs: Vec<ProjQ8<'_, '_>> = outs
                .iter_mut()
                .enumerate()
                .map(|(j, out)| ProjQ8 {
                    weight: Some(&weights[j]),
                    out,
                    out_dim: widths[j],
                    lora: &segs[j],
                })
                .collect();
            project_q8(&mut jobs, &xq, isa);
            for j in 0..3 {
                assert!(
                    outs[j]
                        .iter()
                        .zip(&alone[j])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "job {j} round {round}"
                );
            }
        }
        // Row 6 has no adapter: the base product alone.
        let mut base = vec![0f32; m * widths[0]];
        weights[0].matmul_q8(&xq, isa, &mut base);
        assert_eq!(alone[0][6 * 48..7 * 48], base[6 * 48..7 * 48]);
        assert_ne!(alone[0][..48], base[..48], "row 0 has an adapter");
    }

    #[test]
    fn phase_accounting_times_the_region_and_changes_no_bit() {
        use crate::cpu::lora::{LoraA, LoraB};
        use crate::cpu::phases::{self, Phase};
        let mut g = Lcg(47);
        let (cols, m, w, rank) = (96, 6, 40, 16);
        let xq = ActQ8::quantize(&g.vec(m * cols), m, cols);
        let weight = Weight::Q4(affine(w, cols, &mut g));
        let a = LoraA::Q8(Q8Matrix::quantize(&g.vec(rank * cols), rank, cols).unwrap());
        let b = LoraB::quantize(&g.vec(w * rank), w, rank).unwrap();
        let segs = [LoraSegmentQ8 {
            rows: 1..5,
            a: &a,
            b: &b,
            scaling: 0.5,
        }];
        let run = || {
            let mut out = vec![f32::NAN; m * w];
            project_q8(
                &mut [ProjQ8 {
                    weight: Some(&weight),
                    out: &mut out,
                    out_dim: w,
                    lora: &segs,
                }],
                &xq,
                best_isa(),
            );
            out
        };
        let _one = phases::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let plain = run();
        phases::set_enabled(true);
        phases::take();
        let timed = run();
        phases::set_enabled(false);
        // (Other tests' products may add to the counters meanwhile: only what holds for any
        // region is asserted.)
        let got = phases::take();
        assert!(
            plain
                .iter()
                .zip(&timed)
                .all(|(p, t)| p.to_bits() == t.to_bits()),
            "timing changed the result"
        );
        let [regions, base, units] =
            [Phase::Regions, Phase::BaseProducts, Phase::AdapterUnits].map(|p| got[p as usize]);
        assert!(regions > 0 && units > 0, "{got:?}");
        assert!(
            base <= regions,
            "a region's base part lies within it: {got:?}"
        );
    }

    #[test]
    fn the_outlier_plan_is_the_sorted_union_of_every_rows_outliers() {
        let mut g = Lcg(3);
        // Twice per width, widest last: the column map is left unset between calls.
        for &(m, cols) in &[(3usize, 96usize), (5, 64), (3, 96), (8, 512), (1, 32)] {
            let mut x = g.vec(m * cols);
            for r in 0..m {
                for k in 0..=(r % 4) {
                    x[r * cols + (r * 37 + k * 11) % cols] = 100.0 + k as f32;
                }
            }
            let xq = ActQ8::quantize(&x, m, cols);
            let plan = OutlierPlan::new(&xq);
            let mut want: Vec<u32> = (0..m)
                .flat_map(|r| xq.outliers(r).iter().map(|o| o.0))
                .collect();
            want.sort_unstable();
            want.dedup();
            assert!(!want.is_empty());
            assert_eq!(plan.cols, want, "[{m}, {cols}]");
            for r in 0..m {
                let got: Vec<(u32, f32)> = plan
                    .row(r)
                    .iter()
                    .map(|&(u, v)| (plan.cols[u as usize], v))
                    .collect();
                assert_eq!(got, xq.outliers(r), "[{m}, {cols}] row {r}");
            }
        }
    }

    #[test]
    fn weights_and_adapters_packed_on_huge_pages_give_the_same_bits() {
        use crate::cpu::lora::{LoraA, LoraB};
        use crate::cpu::mem::{self, HUGE_PAGE};
        let mut g = Lcg(77);
        let (rows, cols, m, rank) = (1536, 576, 6, 16);
        let x = g.vec(m * cols);
        let xq = ActQ8::quantize(&x, m, cols);
        let mut ws = vec![
            Weight::Q4(Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap()),
            Weight::Q4(affine(rows, cols, &mut g)),
            Weight::Q8(q8(rows, cols, &mut g)),
        ];
        let mut ads: Vec<(LoraA, LoraB)> = (0..3)
            .map(|_| {
                let a: Vec<f32> = g.vec(rank * cols).iter().map(|v| v * 0.1).collect();
                let b: Vec<f32> = g.vec(rows * rank).iter().map(|v| v * 0.1).collect();
                (
                    LoraA::Q8(Q8Matrix::quantize(&a, rank, cols).unwrap()),
                    LoraB::quantize(&b, rows, rank).unwrap(),
                )
            })
            .collect();
        let run = |ws: &[Weight], ads: &[(LoraA, LoraB)]| -> Vec<Vec<f32>> {
            let mut outs = vec![vec![0f32; m * rows]; ws.len()];
            let segs: Vec<LoraSegmentQ8> = ads
                .iter()
                .enumerate()
                .map(|(i, (a, b))| LoraSegmentQ8 {
                    rows: 2 * i..2 * i + 2,
                    a,
                    b,
                    scaling: 0.5,
                })
                .collect();
            let mut jobs: Vec<ProjQ8> = ws
                .iter()
                .zip(outs.iter_mut())
                .map(|(w, out)| ProjQ8 {
                    weight: Some(w),
                    out,
                    out_dim: rows,
                    lora: &segs,
                })
                .collect();
            project_q8(&mut jobs, &xq, crate::cpu::qdot::best_isa());
            outs
        };
        let before = run(&ws, &ads);
        // One region for all of them (the adapters alone are too small to be packed).
        let regions = mem::pack(|f| {
            ws.iter_mut().for_each(|w| w.stores(f));
            for (a, b) in ads.iter_mut() {
                a.stores(f);
                b.stores(f);
            }
        });
        if mem::packing_enabled() {
            let want: usize = ws.iter().map(Weight::nbytes).sum::<usize>()
                + ads
                    .iter()
                    .map(|(a, b)| a.nbytes() + b.nbytes())
                    .sum::<usize>();
            // 2.4 MB: the first whole huge page is packed, the rest stays on the heap.
            assert_eq!(regions.iter().map(|r| r.len()).sum::<usize>(), HUGE_PAGE);
            assert!(want > HUGE_PAGE);
            // What is left (0.4 MB) is too little to pack.
            assert!(mem::pack(|f| ws.iter_mut().for_each(|w| w.stores(f))).is_empty());
        }
        let after = run(&ws, &ads);
        for (b, a) in before.iter().zip(&after) {
            assert!(
                b.iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()),
                "packed storage changed a product"
            );
        }
    }

    #[test]
    fn claims_from_both_ends_hand_out_every_item_once() {
        use std::sync::atomic::AtomicUsize;
        // Empty, one item, and two threads racing from the two ends.
        for (first, end) in [(0usize, 0usize), (0, 1), (3, 4), (4, 9), (0, 1000), (6, 7)] {
            for _ in 0..50 {
                let claims = Claims::new(first..end);
                assert_eq!(claims.len(), end - first);
                let hits: Vec<AtomicUsize> = (0..end).map(|_| AtomicUsize::new(0)).collect();
                let order = std::sync::Mutex::new(Vec::new());
                std::thread::scope(|sc| {
                    sc.spawn(|| {
                        while let Some(i) = claims.front() {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                            order.lock().unwrap().push(i);
                        }
                    });
                    while let Some(i) = claims.back() {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                for (i, h) in hits.iter().enumerate() {
                    let want = usize::from(i >= first);
                    assert_eq!(h.load(Ordering::Relaxed), want, "[{first}, {end}) item {i}");
                }
                assert_eq!(claims.len(), 0);
                // The owner's items come in ascending order (one stream).
                let order = order.into_inner().unwrap();
                assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
            }
        }
    }

    #[test]
    fn few_row_products_with_thieves_equal_the_one_thread_result_every_time() {
        // Up to four rows each thread owns one share and steals pairs from the other's back:
        // whoever computes a pair, every output is written once, with the same bits.
        let mut g = Lcg(17);
        let (rows, cols) = (8 * 61, 96);
        let w = Weight::Q4(Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap());
        for m in 1..=4 {
            let x = g.vec(m * cols);
            let xq = ActQ8::quantize(&x, m, cols);
            let mut first = vec![0f32; m * rows];
            for round in 0..40 {
                let mut out = vec![f32::NAN; m * rows];
                project_q8(
                    &mut [ProjQ8 {
                        weight: Some(&w),
                        out: &mut out,
                        out_dim: rows,
                        lora: &[],
                    }],
                    &xq,
                    best_isa(),
                );
                if round == 0 {
                    first = out;
                    assert!(first.iter().all(|v| v.is_finite()), "m {m}");
                } else {
                    assert!(
                        out.iter()
                            .zip(&first)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "m {m} round {round}"
                    );
                }
            }
        }
    }

    #[test]
    fn prefetch_windows_hand_out_each_line_once_in_order() {
        // Runs of 100, 1000, 64 and 1 bytes: 2 + 16 + 1 + 1 = 20 lines.
        let bufs: Vec<Vec<u8>> = [100, 1000, 64, 1].iter().map(|&n| vec![0u8; n]).collect();
        let runs: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
        let all: Vec<*const u8> = runs
            .iter()
            .flat_map(|r| (0..r.len().div_ceil(LINE)).map(|i| r[i * LINE..].as_ptr()))
            .collect();
        assert_eq!(Prefetch::new(&runs).lines(), 20);
        for (first, n, chunk) in [(0, 20, 3), (1, 5, 4), (3, 10, 1), (15, 100, 2), (19, 1, 8)] {
            let mut p = Prefetch::new(&runs).window(first, n);
            let mut got = Vec::new();
            loop {
                let side = p.chunk(chunk);
                if side.lines() == 0 {
                    break;
                }
                assert!(
                    side.lines() <= chunk,
                    "a chunk holds at most what was asked"
                );
                got.extend((0..side.lines()).map(|i| side.start().wrapping_add(i * LINE)));
            }
            let want = &all[first.min(20)..(first + n).min(20)];
            assert_eq!(got, want, "window ({first}, {n}) in chunks of {chunk}");
        }
    }

    #[test]
    fn tile_kernels_with_side_prefetches_give_the_same_bits() {
        let mut g = Lcg(5);
        let (rows, cols) = (16, 200);
        let w4 = Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap();
        let w8 = q8(rows, cols, &mut g);
        let x = ActQ8::quantize(&g.vec(3 * cols), 3, cols);
        let xs: Vec<&[BlockQ8A]> = (0..3).map(|r| x.row(r)).collect();
        let junk = vec![1u8; 64 * 50];
        for isa in available_isas() {
            for lines in [0, 3, 7, 50] {
                let side = Side::of(&junk, lines);
                let (mut a, mut b) = ([[0f32; 8]; TILE_XROWS], [[0f32; 8]; TILE_XROWS]);
                crate::cpu::qdot::q4q8_tiles(isa, w4.kind(), w4.group_tiles(1), &xs, &mut a);
                q4q8_tiles_side(isa, w4.kind(), w4.group_tiles(1), &xs, &mut b, side);
                assert_eq!(a, b, "{} q4, {lines} side lines", isa.name());
                crate::cpu::qdot::q8q8_tiles(isa, w8.group_tiles(0), &xs, &mut a);
                q8q8_tiles_side(isa, w8.group_tiles(0), &xs, &mut b, side);
                assert_eq!(a, b, "{} q8, {lines} side lines", isa.name());
            }
        }
    }

    #[test]
    fn pair_kernels_give_the_bits_of_one_group_after_the_other() {
        let mut g = Lcg(9);
        let (rows, cols) = (16, 200);
        let w4s = [
            Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap(),
            zero_point(rows, cols, &mut g),
            affine(rows, cols, &mut g),
        ];
        let w8 = q8(rows, cols, &mut g);
        let junk = vec![1u8; 64 * 50];
        for m in 1..=TILE_XROWS {
            let x = ActQ8::quantize(&g.vec(m * cols), m, cols);
            let xs: Vec<&[BlockQ8A]> = (0..m).map(|r| x.row(r)).collect();
            for isa in available_isas() {
                let side = Side::of(&junk, 7);
                for w4 in &w4s {
                    let mut pair = [[[0f32; TILE_ROWS]; TILE_XROWS]; 2];
                    let tiles = [w4.group_tiles(0), w4.group_tiles(1)];
                    q4q8_tiles2_side(isa, w4.kind(), tiles, &xs, &mut pair, side);
                    let mut one = [[[0f32; TILE_ROWS]; TILE_XROWS]; 2];
                    for (k, o) in one.iter_mut().enumerate() {
                        crate::cpu::qdot::q4q8_tiles(isa, w4.kind(), w4.group_tiles(k), &xs, o);
                    }
                    assert_eq!(pair, one, "{} {:?} m={m}", isa.name(), w4.kind());
                    assert!(pair[1][m - 1].iter().any(|&v| v != 0.0));
                    // The in-cache form (an int4 LoRA A): the pair kernel from one row.
                    let mut cached = [[[0f32; TILE_ROWS]; TILE_XROWS]; 2];
                    crate::cpu::qdot::q4q8_tiles2_cached(isa, w4.kind(), tiles, &xs, &mut cached);
                    assert_eq!(cached, one, "{} {:?} m={m} cached", isa.name(), w4.kind());
                }
                let mut pair = [[[0f32; TILE_ROWS]; TILE_XROWS]; 2];
                q8q8_tiles2_side(
                    isa,
                    [w8.group_tiles(0), w8.group_tiles(1)],
                    &xs,
                    &mut pair,
                    side,
                );
                let mut one = [[[0f32; TILE_ROWS]; TILE_XROWS]; 2];
                for (k, o) in one.iter_mut().enumerate() {
                    crate::cpu::qdot::q8q8_tiles(isa, w8.group_tiles(k), &xs, o);
                }
                assert_eq!(pair, one, "{} q8 m={m}", isa.name());
                let mut cached = [[[0f32; TILE_ROWS]; TILE_XROWS]; 2];
                let tiles = [w8.group_tiles(0), w8.group_tiles(1)];
                crate::cpu::qdot::q8q8_tiles2_cached(isa, tiles, &xs, &mut cached);
                assert_eq!(cached, one, "{} q8 m={m} cached", isa.name());
            }
        }
    }

    #[test]
    fn zero_points_above_sixteen_are_refused() {
        let mut blocks = vec![crate::BlockQ4::default(); 2];
        blocks[1].m = 17;
        let err = Q4Matrix::from_blocks(2, 32, Q4Kind::ZeroPoint, blocks.clone()).unwrap_err();
        assert!(err.to_string().contains("zero point 17"), "{err}");
        blocks[1].m = 16;
        Q4Matrix::from_blocks(2, 32, Q4Kind::ZeroPoint, blocks).unwrap();
    }

    #[test]
    fn group_columns_equal_the_tile_accessors_bit_for_bit_on_every_isa() {
        let mut g = Lcg(77);
        let (rows, cols) = (20, 100);
        let zp = Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap();
        let af = affine(rows, cols, &mut g);
        let w8 = q8(rows, cols, &mut g);
        let ks: Vec<u32> = (0..cols as u32).collect();
        for isa in available_isas() {
            let mut got = Vec::new();
            for grp in 0..rows.div_ceil(TILE_ROWS) {
                for m in [&zp, &af] {
                    q4_group_columns(isa, m, grp, &ks, &mut got);
                    for (&k, c) in ks.iter().zip(&got) {
                        assert_eq!(*c, m.group_column(grp, k as usize), "{} q4 {k}", isa.name());
                    }
                }
                q8_group_columns(isa, &w8, grp, &ks, &mut got);
                for (&k, c) in ks.iter().zip(&got) {
                    assert_eq!(
                        *c,
                        w8.group_column(grp, k as usize),
                        "{} q8 {k}",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "LoRA segments of one projection overlap")]
    fn overlapping_lora_segments_are_refused() {
        use crate::cpu::lora::{LoraA, LoraB};
        let mut g = Lcg(3);
        let x = ActQ8::quantize(&g.vec(4 * 64), 4, 64);
        let a = LoraA::Q8(Q8Matrix::quantize(&g.vec(8 * 64), 8, 64).unwrap());
        let b = LoraB::quantize(&g.vec(16 * 8), 16, 8).unwrap();
        let seg = |rows| LoraSegmentQ8 {
            rows,
            a: &a,
            b: &b,
            scaling: 1.0,
        };
        let segs = [seg(0..3), seg(2..4)];
        let mut out = vec![0f32; 4 * 16];
        project_q8(
            &mut [ProjQ8 {
                weight: None,
                out: &mut out,
                out_dim: 16,
                lora: &segs,
            }],
            &x,
            Isa::Scalar,
        );
    }

    #[test]
    fn the_simd_paths_of_this_cpu_are_among_those_tested() {
        let isas = available_isas();
        eprintln!(
            "paths under test: {:?}",
            isas.iter().map(|i| i.name()).collect::<Vec<_>>()
        );
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert!(isas.contains(&Isa::Avx2));
        }
        #[cfg(target_arch = "aarch64")]
        assert!(
            isas.contains(&Isa::Neon),
            "NEON is architectural on aarch64"
        );
        assert_eq!(best_isa(), *isas.last().unwrap());
    }

    #[test]
    fn int8_activations_stay_close_to_the_exact_product() {
        let mut g = Lcg(5);
        let (rows, cols, m) = (48, 256, 2);
        let x = g.vec(m * cols);
        let w = Weight::Q4(affine(rows, cols, &mut g));
        let mut exact = vec![0f32; m * rows];
        w.matmul(&x, m, &mut exact);
        let mut fast = vec![0f32; m * rows];
        w.matmul_q8(&ActQ8::quantize(&x, m, cols), best_isa(), &mut fast);
        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = exact
            .iter()
            .zip(&fast)
            .fold(0f32, |a, (e, f)| a.max((e - f).abs()));
        assert!(
            err < 0.02 * scale,
            "int8 activations off by {err} (scale {scale})"
        );
    }

    #[test]
    fn outlier_channels_are_applied_exactly() {
        let mut g = Lcg(21);
        let (rows, cols, m) = (24, 96, 2);
        let mut x = g.vec(m * cols);
        x[5] = 900.0;
        x[cols + 70] = -700.0;
        let w = Weight::Q4(affine(rows, cols, &mut g));
        let mut exact = vec![0f32; m * rows];
        w.matmul(&x, m, &mut exact);
        let xq = ActQ8::quantize(&x, m, cols);
        assert_eq!(xq.outliers(0).len() + xq.outliers(1).len(), 2);
        for isa in available_isas() {
            let mut fast = vec![0f32; m * rows];
            w.matmul_q8(&xq, isa, &mut fast);
            // Without the outlier split the error would be of the order of the small values' sum.
            let err = exact
                .iter()
                .zip(&fast)
                .fold(0f32, |a, (e, f)| a.max((e - f).abs()));
            assert!(err < 0.05, "{}: {err}", isa.name());
        }
    }

    #[test]
    fn threaded_exact_product_equals_the_reference() {
        let mut g = Lcg(9);
        let (rows, cols, m) = (300, 70, 3);
        let x = g.vec(m * cols);
        for w in [
            Weight::Q4(Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap()),
            Weight::F32(DenseMatrix::new(rows, cols, g.vec(rows * cols)).unwrap()),
        ] {
            let mut want = vec![0f32; m * rows];
            match &w {
                Weight::Q4(q) => q.matmul_reference(&x, m, &mut want),
                Weight::F32(d) => d.matmul_reference(&x, m, &mut want),
                Weight::Q8(_) => unreachable!(),
            }
            let mut got = vec![0f32; m * rows];
            w.matmul(&x, m, &mut got);
            assert_eq!(got, want);
        }
    }
}
