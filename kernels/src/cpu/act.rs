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

use bytemuck::{Pod, Zeroable};

use crate::cpu::q4::QK;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct BlockQ8A {
    /// Scale.
    pub d: f32,
    /// `d * sum(qs)`.
    pub s: f32,
    pub qs: [i8; QK],
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

/// Quantizes one row into `blocks`, setting its outliers aside into `slots`; returns how many.
fn quantize_row(xr: &[f32], blocks: &mut [BlockQ8A], slots: &mut [(u32, f32)]) -> usize {
    let limit = outlier_limit(xr);
    let mut n = 0;
    if limit > 0.0 && xr.iter().any(|v| v.abs() > limit) {
        let mut found: Vec<(u32, f32)> = xr
            .iter()
            .enumerate()
            .filter(|(_, v)| v.abs() > limit)
            .map(|(k, &v)| (k as u32, v))
            .collect();
        if found.len() > MAX_OUTLIERS {
            found.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
            found.truncate(MAX_OUTLIERS);
        }
        found.sort_by_key(|o| o.0);
        n = found.len();
        slots[..n].copy_from_slice(&found);
        let mut tmp = [0f32; QK];
        let mut next = 0;
        for (b, blk) in blocks.iter_mut().enumerate() {
            let k0 = b * QK;
            let k1 = (k0 + QK).min(xr.len());
            tmp[..k1 - k0].copy_from_slice(&xr[k0..k1]);
            while next < n && (found[next].0 as usize) < k1 {
                tmp[found[next].0 as usize - k0] = 0.0;
                next += 1;
            }
            quantize_block(&tmp[..k1 - k0], blk);
        }
        return n;
    }
    for (b, blk) in blocks.iter_mut().enumerate() {
        let k0 = b * QK;
        quantize_block(&xr[k0..(k0 + QK).min(xr.len())], blk);
    }
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
/// median would need a selection.
fn outlier_limit(x: &[f32]) -> f32 {
    let sum: f32 = x.iter().map(|v| v.abs()).sum();
    let first = OUTLIER_FACTOR * sum / x.len() as f32;
    let (mut big, mut big_n) = (0f32, 0usize);
    for v in x {
        if v.abs() > first {
            big += v.abs();
            big_n += 1;
        }
    }
    if big_n == 0 || big_n == x.len() {
        return first;
    }
    OUTLIER_FACTOR * (sum - big).max(0.0) / (x.len() - big_n) as f32
}

/// Quantizes up to 32 values into one block (the rest zero).
pub fn quantize_block(x: &[f32], blk: &mut BlockQ8A) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut vals = [0f32; QK];
    vals[..x.len()].copy_from_slice(x);
    let mut sum = 0i32;
    for (q, &v) in blk.qs.iter_mut().zip(&vals) {
        // Round half away from zero (as `roundf`), in a form the compiler vectorizes.
        let t = v * id;
        let qi = (t + 0.5f32.copysign(t)) as i32;
        *q = qi as i8;
        sum += qi;
    }
    blk.d = d;
    blk.s = d * sum as f32;
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
}
