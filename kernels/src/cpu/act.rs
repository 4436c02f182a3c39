//! Activations quantized to 8 bits per block of 32, as llama.cpp's Q8_1 does for its default CPU
//! path: `d = max|x| / 127`, `q = round(x / d)` (half away from zero), and `s = d * sum(q)` kept
//! so that an affine weight block's offset term costs one multiply per block. Integer dot products
//! (`maddubs`, `dpbusd`, `sdot`) then do the heavy lifting. This is the fast path; the exact path
//! keeps f32 activations.

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

/// `rows` activation vectors of `cols` values, each as `ceil(cols / 32)` blocks (a partial last
/// block is zero-padded, so it contributes nothing whatever the weights' padding holds).
#[derive(Clone, Debug, Default)]
pub struct ActQ8 {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ8A>,
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
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            for (b, blk) in self.blocks[r * bpr..(r + 1) * bpr].iter_mut().enumerate() {
                let k0 = b * QK;
                let k1 = (k0 + QK).min(cols);
                quantize_block(&xr[k0..k1], blk);
            }
        }
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
    pub fn row(&self, r: usize) -> &[BlockQ8A] {
        let bpr = self.blocks_per_row();
        &self.blocks[r * bpr..(r + 1) * bpr]
    }
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
    }
}
