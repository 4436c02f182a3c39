//! 8-bit weights: GGUF's Q8_0 block (f16 scale + 32 signed bytes), kept as is.
//!
//! 8-bit tensors (Q8_0) are never requantized to INT4: they run through this path, which is exact
//! with gguf-py's dequantization (`w = q * d` in f32).

use bytemuck::{Pod, Zeroable};
use half::f16;

use crate::KernelError;
use crate::cpu::q4::QK;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8 {
    /// Scale, f16 bits.
    pub d: u16,
    pub qs: [i8; QK],
}

#[derive(Clone, Debug)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ8>,
}

impl Q8Matrix {
    pub fn from_blocks(
        rows: usize,
        cols: usize,
        blocks: Vec<BlockQ8>,
    ) -> Result<Self, KernelError> {
        let want = rows * cols.div_ceil(QK);
        if blocks.len() != want || rows == 0 || cols == 0 {
            return Err(KernelError::Shape(format!(
                "Q8 matrix [{rows}, {cols}] needs {want} blocks, got {}",
                blocks.len()
            )));
        }
        Ok(Self { rows, cols, blocks })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn blocks(&self) -> &[BlockQ8] {
        &self.blocks
    }
    pub fn blocks_per_row(&self) -> usize {
        self.cols.div_ceil(QK)
    }
    /// The blocks of one output row.
    pub fn row_blocks(&self, n: usize) -> &[BlockQ8] {
        let bpr = self.blocks_per_row();
        &self.blocks[n * bpr..(n + 1) * bpr]
    }
    pub fn nbytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<BlockQ8>()
    }

    pub fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        let bpr = self.blocks_per_row();
        for (bi, b) in self.blocks[n * bpr..(n + 1) * bpr].iter().enumerate() {
            let d = f16::from_bits(b.d).to_f32();
            let k0 = bi * QK;
            let k1 = (k0 + QK).min(self.cols);
            for (o, &q) in out[k0..k1].iter_mut().zip(b.qs.iter()) {
                *o = q as f32 * d;
            }
        }
    }

    /// Reference product, same contract as [`crate::Q4Matrix::matmul_reference`].
    pub fn matmul_reference(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols);
        assert_eq!(out.len(), m * self.rows);
        let mut wrow = vec![0f32; self.cols];
        for n in 0..self.rows {
            self.dequantize_row(n, &mut wrow);
            for r in 0..m {
                out[r * self.rows + n] =
                    crate::cpu::ops::dot(&wrow, &x[r * self.cols..(r + 1) * self.cols]);
            }
        }
    }
}
