//! 8-bit weights: GGUF's Q8_0 block (f16 scale + 32 signed bytes), kept as is.
//!
//! 8-bit tensors (Q8_0) are never requantized to INT4: they run through this path, which is exact
//! with gguf-py's dequantization (`w = q * d` in f32). Like [`crate::Q4Matrix`], the matrix is
//! stored as tiles of eight rows × 32 columns so the SIMD kernels produce eight outputs per pass.

use bytemuck::{Pod, Zeroable};
use half::f16;

use crate::KernelError;
use crate::cpu::mem::{Packable, Store};
use crate::cpu::q4::{QK, TILE_ROWS};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8 {
    /// Scale, f16 bits.
    pub d: u16,
    pub qs: [i8; QK],
}

/// One block column of eight rows: their scales, then their bytes interleaved four columns at a
/// time (byte `k / 4 * 32 + row * 4 + k % 4` is column `k` of `row`), as in [`crate::TileQ4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TileQ8 {
    pub d: [u16; TILE_ROWS],
    pub qs: [i8; TILE_ROWS * QK],
}

impl Default for TileQ8 {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl TileQ8 {
    #[inline]
    fn index(row: usize, k: usize) -> usize {
        (k / 4) * 32 + row * 4 + k % 4
    }

    /// Column `k` (0..32) of row `row`.
    #[inline]
    pub fn q(&self, row: usize, k: usize) -> i8 {
        self.qs[Self::index(row, k)]
    }

    pub fn block(&self, i: usize) -> BlockQ8 {
        BlockQ8 {
            d: self.d[i],
            qs: std::array::from_fn(|k| self.q(i, k)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    tiles: Store<TileQ8>,
}

/// `f32::round` (half away from zero) for |x| < 2^31, without the libm call that baseline x86-64
/// (no SSE4.1 `roundps`) makes of it: truncate, then step by the exact fractional part. The loop
/// around it vectorizes; adapter loads quantize tens of millions of values.
#[inline]
pub fn round_half_away(x: f32) -> i32 {
    let t = x as i32;
    let f = x - t as f32;
    t + i32::from(f >= 0.5) - i32::from(f <= -0.5)
}

impl Q8Matrix {
    /// Builds a matrix from row-major blocks (`rows * ceil(cols / 32)` of them).
    pub fn from_blocks(
        rows: usize,
        cols: usize,
        blocks: Vec<BlockQ8>,
    ) -> Result<Self, KernelError> {
        let bpr = cols.div_ceil(QK);
        let want = rows * bpr;
        if blocks.len() != want || rows == 0 || cols == 0 {
            return Err(KernelError::Shape(format!(
                "Q8 matrix [{rows}, {cols}] needs {want} blocks, got {}",
                blocks.len()
            )));
        }
        let mut tiles = vec![TileQ8::default(); rows.div_ceil(TILE_ROWS) * bpr];
        for (i, b) in blocks.iter().enumerate() {
            let (n, k) = (i / bpr, i % bpr);
            let t = &mut tiles[(n / TILE_ROWS) * bpr + k];
            t.d[n % TILE_ROWS] = b.d;
            for (k, &q) in b.qs.iter().enumerate() {
                t.qs[TileQ8::index(n % TILE_ROWS, k)] = q;
            }
        }
        Ok(Self {
            rows,
            cols,
            tiles: tiles.into(),
        })
    }
    /// Quantizes a row-major f32 matrix to Q8_0 blocks as llama.cpp does (`d = max|w| / 127`
    /// stored as f16, `q = round(w / d)`), e.g. LoRA factors for the int8 fast path.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self, KernelError> {
        if w.len() != rows * cols {
            return Err(KernelError::Shape(format!(
                "quantize: {} values for [{rows}, {cols}]",
                w.len()
            )));
        }
        let bpr = cols.div_ceil(QK);
        let mut blocks = Vec::with_capacity(rows * bpr);
        for row in w.chunks_exact(cols.max(1)) {
            for chunk in row.chunks(QK) {
                let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let inv = if d.to_f32() != 0.0 {
                    1.0 / d.to_f32()
                } else {
                    0.0
                };
                let mut qs = [0i8; QK];
                for (q, &v) in qs.iter_mut().zip(chunk) {
                    *q = round_half_away(v * inv).clamp(-127, 127) as i8;
                }
                blocks.push(BlockQ8 { d: d.to_bits(), qs });
            }
        }
        Self::from_blocks(rows, cols, blocks)
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
    pub fn row_groups(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }
    /// Hands its storage to `f` (for [`crate::cpu::mem::pack`]).
    pub fn stores(&mut self, f: &mut dyn FnMut(&mut dyn Packable)) {
        f(&mut self.tiles)
    }
    /// The tiles of row group `g`.
    pub fn group_tiles(&self, g: usize) -> &[TileQ8] {
        let bpr = self.blocks_per_row();
        &self.tiles[g * bpr..(g + 1) * bpr]
    }
    #[inline]
    pub fn block(&self, n: usize, b: usize) -> BlockQ8 {
        self.tiles[(n / TILE_ROWS) * self.blocks_per_row() + b].block(n % TILE_ROWS)
    }
    /// The blocks of one output row (a copy).
    pub fn row_blocks(&self, n: usize) -> Vec<BlockQ8> {
        (0..self.blocks_per_row())
            .map(|b| self.block(n, b))
            .collect()
    }
    /// Column `k` of the eight rows of row group `g`, dequantized (one tile read).
    pub fn group_column(&self, g: usize, k: usize) -> [f32; TILE_ROWS] {
        let t = &self.group_tiles(g)[k / QK];
        std::array::from_fn(|i| t.q(i, k % QK) as f32 * f16::from_bits(t.d[i]).to_f32())
    }
    /// Every block, row-major (a copy).
    pub fn to_blocks(&self) -> Vec<BlockQ8> {
        (0..self.rows).flat_map(|n| self.row_blocks(n)).collect()
    }
    pub fn nbytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<TileQ8>()
    }
    /// The tiles as stored (for prefetching).
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.tiles)
    }

    pub fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        self.dequantize_row_blocks(n, 0..self.blocks_per_row(), out);
    }

    /// Blocks `blocks` of row `n` (columns `32 * start ..`, clipped to the width) into `out`,
    /// which starts at the first of those columns.
    pub fn dequantize_row_blocks(&self, n: usize, blocks: std::ops::Range<usize>, out: &mut [f32]) {
        let base = blocks.start * QK;
        for bi in blocks {
            let b = self.block(n, bi);
            let d = f16::from_bits(b.d).to_f32();
            let k0 = bi * QK;
            let k1 = (k0 + QK).min(self.cols);
            for (o, &q) in out[k0 - base..k1 - base].iter_mut().zip(b.qs.iter()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_away_is_f32_round_on_halves_edges_and_random_values() {
        let mut vals = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            126.5,
            -126.5,
            127.49,
            0.49999997,
            -0.49999997,
            0.50000006,
            1e-30,
            8388607.5,
            -8388607.5,
            8388609.0,
            1e9,
        ];
        let mut s = 0x1234_5678u32;
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            vals.push((s as f32 / u32::MAX as f32 - 0.5) * 300.0);
        }
        for v in vals {
            assert_eq!(round_half_away(v), v.round() as i32, "{v}");
        }
    }

    #[test]
    fn quantize_matches_llama_cpp_rounding() {
        let w: Vec<f32> = (0..96)
            .map(|i| ((i * 29 % 41) as f32 - 20.0) * 0.37)
            .collect();
        let m = Q8Matrix::quantize(&w, 2, 48).unwrap();
        let mut back = vec![0f32; 96];
        for r in 0..2 {
            m.dequantize_row(r, &mut back[r * 48..(r + 1) * 48]);
        }
        for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
            let row = i / 48;
            let blk = (i % 48) / 32;
            let amax = w[row * 48 + blk * 32..(row * 48 + (blk + 1) * 32).min(row * 48 + 48)]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (a - b).abs() <= amax / 127.0 * 0.5 + 1e-6,
                "{i}: {a} vs {b}"
            );
        }
    }
}
