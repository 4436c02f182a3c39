//! Activations quantized to 8 bits per block of 32, as llama.cpp's Q8_1 does for its default CPU
//! path: `d = max|x| / 127`, `q = round(x / d)` (half away from zero), and `s = d * sum(q)` kept
//! so that an affine weight block's offset term costs one multiply per block. Integer dot products
//! (`maddubs`, `dpbusd`, `sdot`) then do the heavy lifting. This is the fast path; the exact path
//! keeps f32 activations.
//!
//! Outliers: a few channels of some tokens carry values tens of times larger than the rest (the
//! "massive activations" of the attention-sink token; SmolLM2's position 0 reaches an L2 norm of
//! 2.3e4). Quantized in a block with them, the other 31 values of the block round to zero, and on
//! SmolLM2 that alone turns "The capital of France is Paris." into nonsense. As in LLM.int8(), such
//! values (beyond [`OUTLIER_FACTOR`] times the row's mean magnitude without them, at most [`MAX_OUTLIERS`] per row) are
//! taken out of the int8 blocks and applied exactly, column by column, after the integer product.
//!
//! Rows are quantized with AVX2 (`act_x86.rs`) or NEON (`act_arm.rs`) where the CPU has it,
//! bit-identical to the scalar reference: see `RowKernels`.

use bytemuck::{Pod, Zeroable};

use crate::cpu::q4::QK;

#[cfg(target_arch = "x86_64")]
#[path = "act_x86.rs"]
mod x86;

#[cfg(target_arch = "aarch64")]
#[path = "act_arm.rs"]
mod arm;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct BlockQ8A {
    /// Scale.
    pub d: f32,
    /// `d * sum(qs)`.
    pub s: f32,
    /// `-U8_BIAS * sum(qs)`: where the VNNI kernels start a block's integer sum. `vpdpbusd`
    /// multiplies unsigned by signed bytes, so they take each weight as an unsigned byte biased
    /// by [`U8_BIAS`] (`w + 128` for Q8_0, `c - z + 128` for zero-point INT4) and this takes the
    /// bias off again, with no float work.
    pub bias_sum: i32,
    pub qs: [i8; QK],
}

/// What the VNNI kernels add to a signed weight to make it an unsigned byte; see
/// [`BlockQ8A::bias_sum`].
pub const U8_BIAS: i32 = 128;

impl BlockQ8A {
    /// Sets the scale and the sums kept beside the codes, `sum` being the sum of `qs`.
    #[inline(always)]
    pub fn set_scale(&mut self, d: f32, sum: i32) {
        self.d = d;
        self.s = d * sum as f32;
        self.bias_sum = -U8_BIAS * sum;
    }
}

/// A value is an outlier beyond this many times its row's mean magnitude (about 8 standard
/// deviations for Gaussian values, whose largest of a thousand is about 3.3). On SmolLM2 this
/// keeps about three values per row exact; 8 doubles that for no measurable gain, 12 starts to
/// lose greedy agreement.
pub const OUTLIER_FACTOR: f32 = 10.0;
/// At most this many outliers per row are kept exact (the largest).
pub const MAX_OUTLIERS: usize = 16;

/// `rows` activation vectors of `cols` values, each as `ceil(cols / 32)` blocks (a partial last
/// block is zero-padded, so it contributes nothing whatever the weights' padding holds).
#[derive(Clone, Debug, Default)]
pub struct ActQ8 {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ8A>,
    /// (column, value) of the values kept exact: `MAX_OUTLIERS` slots per row, `counts[r]` used.
    outliers: Vec<(u32, f32)>,
    counts: Vec<u8>,
}

/// Rows from which quantization is spread over the thread pool (prefill).
const PARALLEL_ROWS: usize = 16;

/// Raw pointers to the per-row parts of an [`ActQ8`], for tasks that own disjoint rows.
#[derive(Clone, Copy)]
struct Parts {
    blocks: *mut BlockQ8A,
    outliers: *mut (u32, f32),
    counts: *mut u8,
}
// SAFETY: tasks only touch the rows they own (see `Parts::row`).
unsafe impl Send for Parts {}
// SAFETY: as above.
unsafe impl Sync for Parts {}

impl Parts {
    /// # Safety
    /// `r` is in bounds and no other live reference covers row `r`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize, bpr: usize) -> (&mut [BlockQ8A], &mut [(u32, f32)], &mut u8) {
        // SAFETY: the caller guarantees bounds and exclusivity.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.blocks.add(r * bpr), bpr),
                std::slice::from_raw_parts_mut(self.outliers.add(r * MAX_OUTLIERS), MAX_OUTLIERS),
                &mut *self.counts.add(r),
            )
        }
    }
}

/// The passes a row's quantization is made of, each over a whole row: the scalar reference
/// ([`Scalar`]), on x86-64 AVX2 (`x86::Avx2`) and on aarch64 NEON (`arm::Neon`). They agree to
/// the bit: float sums accumulate in [`LANES`] striped lanes added up by [`reduce_lanes`], maxima
/// do not depend on order, and each value is rounded by the same sequence of IEEE operations.
trait RowKernels: Copy {
    /// `(sum |x|, max |x|)`, the maximum ignoring NaNs.
    fn abs_sum_max(self, x: &[f32]) -> (f32, f32);
    /// The sum and the number of the `|x|` above `t` (`t >= 0`).
    fn sum_above(self, x: &[f32], t: f32) -> (f32, usize);
    /// `f(k, x[k])` for every `|x[k]| > t`, in column order.
    fn for_each_above(self, x: &[f32], t: f32, f: &mut dyn FnMut(usize, f32));
    /// Quantizes row `x` into `blocks`, the columns of `skip` (sorted) taken as zeros.
    fn quantize_blocks(self, x: &[f32], blocks: &mut [BlockQ8A], skip: &[(u32, f32)]);
}

/// Float sums over a row accumulate in this many striped lanes (lane `j` sums `x[j]`,
/// `x[j + 32]`, ...; a partial last chunk feeds the first lanes), as four 8-lane AVX2
/// accumulators do, and [`reduce_lanes`] adds the lanes up in a fixed order.
const LANES: usize = 32;

/// The lanes' total, in the order of the AVX2 reduction: the four 8-lane vectors added pairwise,
/// then lanes `i` and `i + 4`, then `i` and `i + 2`, then the last two.
#[inline(always)]
fn reduce_lanes(a: &[f32; LANES]) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|i| (a[i] + a[8 + i]) + (a[16 + i] + a[24 + i]));
    let w: [f32; 4] = std::array::from_fn(|i| v[i] + v[4 + i]);
    (w[0] + w[2]) + (w[1] + w[3])
}

/// The chunks of [`LANES`] of `x`, the last (if partial) zero-padded, passed to `f` in order
/// (the SIMD passes' loop: padding zeros add nothing to a sum or a maximum of magnitudes).
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
#[inline(always)]
fn for_each_chunk(x: &[f32], mut f: impl FnMut(&[f32; LANES])) {
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        f(c.try_into().expect("chunks of 32"));
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut tmp = [0f32; LANES];
        tmp[..rem.len()].copy_from_slice(rem);
        f(&tmp);
    }
}

/// The scalar reference passes.
#[derive(Clone, Copy)]
struct Scalar;

impl RowKernels for Scalar {
    fn abs_sum_max(self, x: &[f32]) -> (f32, f32) {
        let (mut acc, mut mx) = ([0f32; LANES], [0f32; LANES]);
        for c in x.chunks(LANES) {
            for ((a, m), v) in acc.iter_mut().zip(&mut mx).zip(c) {
                *a += v.abs();
                *m = m.max(v.abs());
            }
        }
        (reduce_lanes(&acc), mx.iter().fold(0f32, |m, &v| m.max(v)))
    }

    fn sum_above(self, x: &[f32], t: f32) -> (f32, usize) {
        let (mut acc, mut n) = ([0f32; LANES], 0usize);
        for c in x.chunks(LANES) {
            for (a, v) in acc.iter_mut().zip(c) {
                let big = v.abs() > t;
                // Adding zero (rather than skipping) is what the vector path does; the same sum.
                *a += if big { v.abs() } else { 0.0 };
                n += big as usize;
            }
        }
        (reduce_lanes(&acc), n)
    }

    fn for_each_above(self, x: &[f32], t: f32, f: &mut dyn FnMut(usize, f32)) {
        for (k, &v) in x.iter().enumerate() {
            if v.abs() > t {
                f(k, v);
            }
        }
    }

    fn quantize_blocks(self, x: &[f32], blocks: &mut [BlockQ8A], skip: &[(u32, f32)]) {
        let mut next = 0;
        for (b, blk) in blocks.iter_mut().enumerate() {
            let (src, mut zero) = block_at(x, b, skip, &mut next);
            if zero == 0
                && let Ok(full) = <&[f32; QK]>::try_from(src)
            {
                quantize_block32(full, blk);
                continue;
            }
            let mut vals = [0f32; QK];
            vals[..src.len()].copy_from_slice(src);
            while zero != 0 {
                vals[zero.trailing_zeros() as usize] = 0.0;
                zero &= zero - 1;
            }
            quantize_block32(&vals, blk);
        }
    }
}

/// Block `b` of row `x` (up to 32 values) and the bit mask of its columns among those of
/// `skip[*next..]` (sorted), which are to be taken as zeros; advances `*next` past those.
#[inline(always)]
fn block_at<'a>(x: &'a [f32], b: usize, skip: &[(u32, f32)], next: &mut usize) -> (&'a [f32], u32) {
    let k0 = b * QK;
    let k1 = (k0 + QK).min(x.len());
    let mut zero = 0u32;
    while let Some(&(c, _)) = skip.get(*next)
        && (c as usize) < k1
    {
        debug_assert!(c as usize >= k0, "skip is sorted");
        zero |= 1 << (c as usize - k0);
        *next += 1;
    }
    (&x[k0..k1], zero)
}

/// The [`MAX_OUTLIERS`] largest values offered by magnitude (the earlier column first among
/// equal magnitudes, as a stable sort would have it), kept in column order. Values must be
/// offered in column order.
#[derive(Default)]
struct Largest {
    kept: [(u32, f32); MAX_OUTLIERS],
    n: usize,
}

impl Largest {
    fn offer(&mut self, col: u32, v: f32) {
        if self.n < MAX_OUTLIERS {
            self.kept[self.n] = (col, v);
            self.n += 1;
            return;
        }
        // The weakest kept value: the smallest magnitude, the latest column among equals.
        let mut w = 0;
        for i in 1..MAX_OUTLIERS {
            if self.kept[i].1.abs() <= self.kept[w].1.abs() {
                w = i;
            }
        }
        // The newcomer's column is the latest, so it loses ties.
        if v.abs() > self.kept[w].1.abs() {
            self.kept.copy_within(w + 1.., w);
            self.kept[MAX_OUTLIERS - 1] = (col, v);
        }
    }
}

/// Quantizes one row into `blocks`, setting its outliers aside into `slots` (`MAX_OUTLIERS`
/// of them); returns how many. The result is [`quantize_row_reference`]'s, bit for bit.
fn quantize_row(xr: &[f32], blocks: &mut [BlockQ8A], slots: &mut [(u32, f32)]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = x86::Avx2::get() {
        return quantize_row_with(k, xr, blocks, slots);
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(k) = arm::Neon::get() {
        return quantize_row_with(k, xr, blocks, slots);
    }
    quantize_row_reference(xr, blocks, slots)
}

/// The scalar reference of [`quantize_row`], which the SIMD paths match to the bit.
fn quantize_row_reference(xr: &[f32], blocks: &mut [BlockQ8A], slots: &mut [(u32, f32)]) -> usize {
    quantize_row_with(Scalar, xr, blocks, slots)
}

#[inline(always)]
fn quantize_row_with<K: RowKernels>(
    k: K,
    xr: &[f32],
    blocks: &mut [BlockQ8A],
    slots: &mut [(u32, f32)],
) -> usize {
    let (sum, max) = k.abs_sum_max(xr);
    let limit = outlier_limit(k, xr, sum, max);
    let mut n = 0;
    // With `limit > 0`, `max > limit` exactly when some `|x| > limit`.
    if limit > 0.0 && max > limit {
        let mut top = Largest::default();
        k.for_each_above(xr, limit, &mut |c, v| top.offer(c as u32, v));
        n = top.n;
        slots[..n].copy_from_slice(&top.kept[..n]);
    }
    k.quantize_blocks(xr, blocks, &slots[..n]);
    n
}

impl ActQ8 {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `x` (`[rows, cols]`), reusing this buffer.
    pub fn quantize_from(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols);
        let bpr = cols.div_ceil(QK);
        self.rows = rows;
        self.cols = cols;
        self.blocks.resize(rows * bpr, BlockQ8A::default());
        self.outliers.resize(rows * MAX_OUTLIERS, (0, 0.0));
        self.counts.resize(rows, 0);
        if rows < PARALLEL_ROWS {
            for r in 0..rows {
                self.counts[r] = quantize_row(
                    &x[r * cols..(r + 1) * cols],
                    &mut self.blocks[r * bpr..(r + 1) * bpr],
                    &mut self.outliers[r * MAX_OUTLIERS..(r + 1) * MAX_OUTLIERS],
                ) as u8;
            }
            return;
        }
        let parts = Parts {
            blocks: self.blocks.as_mut_ptr(),
            outliers: self.outliers.as_mut_ptr(),
            counts: self.counts.as_mut_ptr(),
        };
        crate::cpu::threads::parallel_ranges(rows, 1, &|range| {
            for r in range {
                // SAFETY: each task owns its rows' disjoint slices of the three buffers, which
                // were sized above and outlive the region.
                let (blocks, outliers, count) = unsafe { parts.row(r, bpr) };
                *count = quantize_row(&x[r * cols..(r + 1) * cols], blocks, outliers) as u8;
            }
        });
    }

    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        let mut a = Self::new();
        a.quantize_from(x, rows, cols);
        a
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn blocks_per_row(&self) -> usize {
        self.cols.div_ceil(QK)
    }
    /// The (column, value) pairs of row `r` that are not in its int8 blocks.
    pub fn outliers(&self, r: usize) -> &[(u32, f32)] {
        &self.outliers[r * MAX_OUTLIERS..r * MAX_OUTLIERS + self.counts[r] as usize]
    }
    pub fn has_outliers(&self) -> bool {
        self.counts.iter().any(|&c| c > 0)
    }
    pub fn row(&self, r: usize) -> &[BlockQ8A] {
        let bpr = self.blocks_per_row();
        &self.blocks[r * bpr..(r + 1) * bpr]
    }
}

/// The magnitude above which a value of `x` is an outlier: [`OUTLIER_FACTOR`] times the mean
/// magnitude of the values that remain once those beyond that factor of the plain mean magnitude
/// are set aside (a plain mean is pulled up by the outliers themselves). Two cheap passes where a
/// median would need a selection; `(sum, max)` is `k.abs_sum_max(x)`, and the second pass is
/// skipped when nothing is beyond the first threshold.
#[inline(always)]
fn outlier_limit<K: RowKernels>(k: K, x: &[f32], sum: f32, max: f32) -> f32 {
    let first = OUTLIER_FACTOR * sum / x.len() as f32;
    if max > first {
        let (big, big_n) = k.sum_above(x, first);
        if big_n > 0 && big_n < x.len() {
            return OUTLIER_FACTOR * (sum - big).max(0.0) / (x.len() - big_n) as f32;
        }
    }
    first
}

/// A block's scale `d = amax / 127` and the factor `id` its values are multiplied by: `1 / d`,
/// or 0 where `d` is 0, and at most `f32::MAX` (for `amax` below about 3.7e-37, `1 / d` overflows
/// to infinity, which would turn the block's codes into garbage; capped, they come out a little
/// small but in range).
#[inline(always)]
fn scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 {
        (1.0 / d).min(f32::MAX)
    } else {
        0.0
    };
    (d, id)
}

/// Quantizes up to 32 values into one block (the rest zero). Scalar; rows go through
/// [`ActQ8::quantize_from`], which uses SIMD where the CPU has it (to the same result).
pub fn quantize_block(x: &[f32], blk: &mut BlockQ8A) {
    let mut vals = [0f32; QK];
    vals[..x.len()].copy_from_slice(x);
    quantize_block32(&vals, blk);
}

/// The reference block quantization.
#[inline(always)]
fn quantize_block32(x: &[f32; QK], blk: &mut BlockQ8A) {
    // The maximum in eight lanes, which the compiler vectorizes (one chain of `f32::max` it
    // cannot reorder); the same value in any order.
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in m.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let (d, id) = scales(m.iter().fold(0f32, |a, &b| a.max(b)));
    let mut sum = 0i32;
    for (q, &v) in blk.qs.iter_mut().zip(x) {
        // Round half away from zero (as `roundf`), in a form the compiler vectorizes; `as i32`
        // truncates (and takes NaN, from a NaN input or infinity times a zero `id`, to 0). The
        // AVX2 path does the same operations.
        let t = v * id;
        let qi = (t + 0.5f32.copysign(t)) as i32;
        *q = qi as i8;
        sum += qi;
    }
    blk.set_scale(d, sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_reconstruct_within_half_a_step_and_carry_their_sum() {
        let x: Vec<f32> = (0..70)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.13)
            .collect();
        let a = ActQ8::quantize(&x, 1, 70);
        assert_eq!(a.blocks_per_row(), 3);
        for (b, blk) in a.row(0).iter().enumerate() {
            let sum: i32 = blk.qs.iter().map(|&q| q as i32).sum();
            assert_eq!(blk.s, blk.d * sum as f32);
            assert_eq!(blk.bias_sum, -U8_BIAS * sum);
            for j in 0..32 {
                let k = b * 32 + j;
                let want = x.get(k).copied().unwrap_or(0.0);
                assert!((blk.qs[j] as f32 * blk.d - want).abs() <= blk.d * 0.5 + 1e-6);
            }
        }
        // Zero padding of the partial block.
        assert!(a.row(0)[2].qs[6..].iter().all(|&q| q == 0));
        assert!(!a.has_outliers());
    }

    #[test]
    fn many_rows_quantized_in_parallel_equal_each_row_alone() {
        let (rows, cols) = (40, 100);
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 251) as f32 - 125.0) * 0.01)
            .collect();
        x[3 * cols + 7] = 90.0;
        x[33 * cols + 99] = -70.0;
        let all = ActQ8::quantize(&x, rows, cols);
        for r in 0..rows {
            let one = ActQ8::quantize(&x[r * cols..(r + 1) * cols], 1, cols);
            assert_eq!(all.row(r), one.row(0), "row {r}");
            assert_eq!(all.outliers(r), one.outliers(0), "row {r}");
        }
        assert_eq!(all.outliers(33), &[(99, -70.0)]);
    }

    #[test]
    fn outliers_leave_the_blocks_and_keep_their_exact_value() {
        let mut x: Vec<f32> = (0..128).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        x[40] = 500.0;
        x[100] = -300.0;
        let a = ActQ8::quantize(&x, 1, 128);
        assert_eq!(a.outliers(0), &[(40, 500.0), (100, -300.0)]);
        let blk = &a.row(0)[1];
        assert_eq!(blk.qs[8], 0, "the outlier is not in its block");
        // The block's other values keep their resolution.
        assert!((blk.qs[9] as f32 * blk.d - x[41]).abs() <= blk.d * 0.5 + 1e-7);
        assert!(blk.d < 0.001);
    }

    /// xorshift64*: deterministic test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A path's name, blocks, and outliers as (column, value bits).
    type Quantized = (&'static str, Vec<BlockQ8A>, Vec<(u32, u32)>);

    /// Rows quantized by the scalar reference and, where the CPU has one, each SIMD path.
    fn all_paths(x: &[f32]) -> Vec<Quantized> {
        fn run(
            name: &'static str,
            x: &[f32],
            f: impl Fn(&[f32], &mut [BlockQ8A], &mut [(u32, f32)]) -> usize,
        ) -> Quantized {
            let mut blocks = vec![BlockQ8A::default(); x.len().div_ceil(QK)];
            let mut slots = [(0u32, 0f32); MAX_OUTLIERS];
            let n = f(x, &mut blocks, &mut slots);
            let out = slots[..n].iter().map(|&(c, v)| (c, v.to_bits())).collect();
            (name, blocks, out)
        }
        #[allow(unused_mut)]
        let mut v = vec![run("scalar", x, quantize_row_reference)];
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = x86::Avx2::detect() {
            v.push(run("avx2", x, |x, b, s| quantize_row_with(k, x, b, s)));
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(k) = arm::Neon::detect() {
            v.push(run("neon", x, |x, b, s| quantize_row_with(k, x, b, s)));
        }
        v
    }

    /// Asserts that every path quantizes `x` as the reference does, to the bit; returns the
    /// reference's outliers.
    fn assert_paths_agree(x: &[f32], what: &str) -> Vec<(u32, u32)> {
        let mut paths = all_paths(x).into_iter();
        let (_, b0, o0) = paths.next().expect("the reference");
        for (name, b, o) in paths {
            for (i, (p, q)) in b0.iter().zip(&b).enumerate() {
                assert_eq!(
                    bytemuck::bytes_of(p),
                    bytemuck::bytes_of(q),
                    "{what}, len {}: {name} block {i}: {q:?}, reference {p:?}",
                    x.len()
                );
            }
            assert_eq!(o, o0, "{what}, len {}: {name} outliers", x.len());
        }
        o0
    }

    /// The row passes themselves, on thresholds between the values.
    fn assert_passes_agree(x: &[f32], what: &str) {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = x86::Avx2::detect() {
            assert_passes_agree_with(k, x, what);
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(k) = arm::Neon::detect() {
            assert_passes_agree_with(k, x, what);
        }
        let _ = (x, what); // used by no path on other targets
    }

    #[allow(dead_code)] // no SIMD path on other targets
    fn assert_passes_agree_with<K: RowKernels>(k: K, x: &[f32], what: &str) {
        let (s0, m0) = Scalar.abs_sum_max(x);
        let (s1, m1) = k.abs_sum_max(x);
        assert_eq!(
            (s0.to_bits(), m0.to_bits()),
            (s1.to_bits(), m1.to_bits()),
            "{what}, len {}: sum/max",
            x.len()
        );
        for t in [0.0, 0.1, 0.5, 0.9, 2.0, 100.0] {
            let (b0, n0) = Scalar.sum_above(x, t);
            let (b1, n1) = k.sum_above(x, t);
            assert_eq!(
                (b0.to_bits(), n0),
                (b1.to_bits(), n1),
                "{what}: sum above {t}"
            );
            let (mut a0, mut a1) = (Vec::new(), Vec::new());
            Scalar.for_each_above(x, t, &mut |c, v| a0.push((c, v.to_bits())));
            k.for_each_above(x, t, &mut |c, v| a1.push((c, v.to_bits())));
            assert_eq!(a0, a1, "{what}: values above {t}");
        }
    }

    #[test]
    fn simd_matches_the_reference_on_random_rows_of_every_length() {
        let mut rng = Rng(0x5eed_0ac7_0001);
        let lens = (1..=700).chain([1023, 1024, 1025, 1536, 2048 + 5]);
        for len in lens {
            let scale = [1e-3f32, 0.37, 1.0, 24.0][len % 4];
            let x: Vec<f32> = (0..len).map(|_| rng.unit() * scale).collect();
            assert_passes_agree(&x, "random");
            assert_paths_agree(&x, "random");
        }
    }

    #[test]
    fn simd_matches_the_reference_on_rows_with_outliers() {
        let mut rng = Rng(0x5eed_0ac7_0002);
        for len in [1, 2, 7, 8, 9, 31, 32, 33, 63, 100, 255, 256, 576, 700, 1536] {
            for count in [1, 2, 3, 5, 15, 16, 17, 24, 40, 100] {
                if count > len / 2 {
                    continue;
                }
                for tie in [false, true] {
                    let mut x: Vec<f32> = (0..len).map(|_| rng.unit()).collect();
                    for i in 0..count {
                        let big = if tie && i % 2 == 0 {
                            300.0 // equal magnitudes: the earlier columns win
                        } else {
                            50.0 + 950.0 * rng.unit().abs()
                        };
                        let sign = if rng.next() & 1 == 0 { 1.0 } else { -1.0 };
                        x[rng.below(len)] = sign * big;
                    }
                    let what = format!("{count} outliers (ties {tie})");
                    assert_passes_agree(&x, &what);
                    let out = assert_paths_agree(&x, &what);
                    if count * 20 <= len {
                        assert!(!out.is_empty(), "{what}, len {len}");
                    }
                    assert!(out.len() <= MAX_OUTLIERS);
                    assert!(out.windows(2).all(|w| w[0].0 < w[1].0), "in column order");
                }
            }
        }
    }

    #[test]
    fn simd_matches_the_reference_on_zero_half_step_tiny_and_non_finite_rows() {
        let mut rng = Rng(0x5eed_0ac7_0003);
        for len in [1, 7, 31, 32, 33, 100, 576, 1536] {
            assert_paths_agree(&vec![0.0; len], "zeros");
            assert_paths_agree(&vec![-0.0; len], "negative zeros");
            // Exact half steps: with a block maximum of 127 * 2^e, `d` is 2^e and `t` exact.
            for e in [-10, 0, 3] {
                let p = 2f32.powi(e);
                let x: Vec<f32> = (0..len)
                    .map(|k| match k % 32 {
                        0 => 127.0 * p,
                        1 => -127.0 * p,
                        _ => (rng.below(253) as f32 - 126.0 + 0.5) * p,
                    })
                    .collect();
                assert_paths_agree(&x, "half steps");
            }
            // Values whose `1 / d` would overflow.
            let x: Vec<f32> = (0..len).map(|_| rng.unit() * 1e-38).collect();
            assert_paths_agree(&x, "tiny");
            let x: Vec<f32> = (0..len).map(|_| rng.unit() * 1e-44).collect();
            assert_paths_agree(&x, "subnormal");
            for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                let mut x: Vec<f32> = (0..len).map(|_| rng.unit()).collect();
                x[len / 2] = bad;
                assert_paths_agree(&x, "non-finite");
            }
        }
    }

    #[test]
    fn half_steps_round_away_from_zero() {
        // Large enough company that none of these is an outlier.
        let mut x: Vec<f32> = (0..32)
            .map(|k| if k % 2 == 0 { 100.5 } else { -100.5 })
            .collect();
        x[0] = 127.0;
        let halves = [
            0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 0.49999997, -0.0,
        ];
        x[1..=halves.len()].copy_from_slice(&halves);
        for (_, blocks, _) in all_paths(&x) {
            let b = &blocks[0];
            assert_eq!(b.d, 1.0);
            // 0.49999997 + 0.5 rounds up to 1.0 in f32: a quirk of the add-half form, kept.
            assert_eq!(b.qs[..11], [127, 1, -1, 2, -2, 3, -3, 127, -127, 1, 0]);
            // 127, the halves' 1, and ten 101s against eleven -101s.
            assert_eq!(b.s, 127.0 + 1.0 - 101.0);
        }
    }

    #[test]
    fn tiny_blocks_keep_their_codes_in_range() {
        for amax in [1e-37f32, 3e-38, 1e-39, 1e-42, 1e-45] {
            let x: Vec<f32> = (0..32).map(|i| amax * (i as f32 - 16.0) / 16.0).collect();
            let mut b = BlockQ8A::default();
            quantize_block(&x, &mut b);
            assert!(b.qs.iter().all(|&q| q != i8::MIN), "{amax}: {b:?}");
            assert!(b.s.is_finite() && b.qs[0] <= 0, "{amax}: {b:?}");
        }
    }

    /// The selection as it was: all candidates, a stable sort by magnitude, the first
    /// `MAX_OUTLIERS`, sorted by column.
    fn largest_by_sorting(vals: &[(u32, f32)]) -> Vec<(u32, f32)> {
        let mut found = vals.to_vec();
        if found.len() > MAX_OUTLIERS {
            found.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
            found.truncate(MAX_OUTLIERS);
        }
        found.sort_by_key(|o| o.0);
        found
    }

    #[test]
    fn largest_keeps_what_a_stable_sort_keeps() {
        let mut rng = Rng(0x5eed_0ac7_0004);
        for round in 0..2000 {
            let n = rng.below(60);
            // Few distinct magnitudes, so that ties are common.
            let levels = 1 + round % 8;
            let vals: Vec<(u32, f32)> = (0..n)
                .map(|i| {
                    let m = 50.0 + rng.below(levels) as f32;
                    let v = if rng.next() & 1 == 0 { m } else { -m };
                    (3 * i as u32 + 1, v)
                })
                .collect();
            let mut top = Largest::default();
            for &(c, v) in &vals {
                top.offer(c, v);
            }
            assert_eq!(top.kept[..top.n], largest_by_sorting(&vals)[..], "{vals:?}");
        }
    }
}
