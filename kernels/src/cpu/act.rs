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
    /// (column, value) of the values kept exact, row by row; `outlier_start[r]..outlier_start[r+1]`.
    outliers: Vec<(u32, f32)>,
    outlier_start: Vec<usize>,
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
        self.outliers.clear();
        self.outlier_start.clear();
        let mut scratch = Vec::new();
        for r in 0..rows {
            self.outlier_start.push(self.outliers.len());
            let mut xr = &x[r * cols..(r + 1) * cols];
            let limit = outlier_limit(xr);
            if limit > 0.0 && xr.iter().any(|v| v.abs() > limit) {
                let first = self.outliers.len();
                self.outliers.extend(
                    xr.iter()
                        .enumerate()
                        .filter(|(_, v)| v.abs() > limit)
                        .map(|(k, &v)| (k as u32, v)),
                );
                let found = &mut self.outliers[first..];
                if found.len() > MAX_OUTLIERS {
                    found.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
                    self.outliers.truncate(first + MAX_OUTLIERS);
                }
                scratch.clear();
                scratch.extend_from_slice(xr);
                for &(k, _) in &self.outliers[first..] {
                    scratch[k as usize] = 0.0;
                }
                xr = &scratch;
            }
            for (b, blk) in self.blocks[r * bpr..(r + 1) * bpr].iter_mut().enumerate() {
                let k0 = b * QK;
                let k1 = (k0 + QK).min(cols);
                quantize_block(&xr[k0..k1], blk);
            }
        }
        self.outlier_start.push(self.outliers.len());
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
        &self.outliers[self.outlier_start[r]..self.outlier_start[r + 1]]
    }
    pub fn has_outliers(&self) -> bool {
        !self.outliers.is_empty()
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
    let mut sum = 0i32;
    for (j, q) in blk.qs.iter_mut().enumerate() {
        let v = x.get(j).copied().unwrap_or(0.0);
        let qi = (v * id).round() as i32;
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
