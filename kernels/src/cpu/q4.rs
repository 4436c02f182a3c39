//! The internal INT4 weight format.
//!
//! A matrix `W [rows = out, cols = in]` is stored row by row as blocks of [`QK`] = 32 consecutive
//! input columns. A block is 20 bytes — an f16 scale, a 16-bit offset field and 16 bytes of nibbles —
//! the same size as GGUF's Q4_1, so a decode step reads as few bytes as llama.cpp does. Element
//! `j < 16` of a block is the low nibble of `qs[j]`, element `16 + j` the high nibble of `qs[j]`, so
//! one 16-byte load gives two runs of 16 consecutive elements (what SIMD unpacking wants).
//!
//! Two kinds of block metadata cover every 4-bit source without a round trip through f32:
//! * [`Q4Kind::ZeroPoint`]: `w = (q - z) * d`, `z` an integer in `m` (our quantizer, GPTQ, GGUF Q4_0).
//!   The product is exact in f32, so dequantization is bit-exact with the reference definition.
//! * [`Q4Kind::Affine`]: `w = d * q + m` with `m` an f16 (GGUF Q4_1, and Q4_K sub-blocks).
//!
//! Quantization groups are a multiple of 32 columns; a group wider than a block repeats its metadata
//! in each of its blocks. The last block of a row may be partial (`cols % 32 != 0`): its unused
//! nibbles hold the value that dequantizes to zero where one exists, and kernels never read the
//! activations past `cols`.

use bytemuck::{Pod, Zeroable};
use half::f16;

use crate::KernelError;
use crate::cpu::mem::{Packable, Store};

/// Elements per block.
pub const QK: usize = 32;

/// One block of 32 4-bit weights with its metadata.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4 {
    /// Scale, f16 bits.
    pub d: u16,
    /// Zero point (integer, [`Q4Kind::ZeroPoint`]) or offset (f16 bits, [`Q4Kind::Affine`]).
    pub m: u16,
    /// Packed nibbles: element j in the low nibble of `qs[j]`, element 16+j in its high nibble.
    pub qs: [u8; 16],
}

impl BlockQ4 {
    /// The 4-bit code of element `j` (0..32).
    #[inline]
    pub fn code(&self, j: usize) -> u8 {
        if j < 16 {
            self.qs[j] & 0x0F
        } else {
            self.qs[j - 16] >> 4
        }
    }

    #[inline]
    pub fn set_code(&mut self, j: usize, q: u8) {
        debug_assert!(q < 16);
        if j < 16 {
            self.qs[j] = (self.qs[j] & 0xF0) | q;
        } else {
            self.qs[j - 16] = (self.qs[j - 16] & 0x0F) | (q << 4);
        }
    }

    #[inline]
    pub fn scale(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }
}

/// How a block's `m` field is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q4Kind {
    /// `w = (q - m) * d`, `m` an integer zero point, at most [`MAX_ZERO_POINT`].
    ZeroPoint,
    /// `w = d * q + m`, `m` an f16 offset (unfused multiply-add, as gguf-py computes it).
    Affine,
}

/// Rows interleaved per tile: the SIMD kernels produce eight outputs per pass.
pub const TILE_ROWS: usize = 8;
/// The largest zero point a [`Q4Kind::ZeroPoint`] block may carry: 16, which GPTQ's v1 format
/// stores as 15 + 1. The VNNI kernels take `code - m + 128` as an unsigned byte, so the bound
/// keeps that in range with room to spare; no 4-bit format goes beyond it.
pub const MAX_ZERO_POINT: u16 = 16;

/// One block column of eight consecutive rows: the eight scales and the eight offsets (one vector
/// load each), then the 256 codes interleaved four columns at a time, so that a 32-bit lane holds
/// four consecutive columns of one row. A `dpbusd` / `sdot` of a 32-byte run against the four
/// matching activation bytes broadcast to every lane then yields the eight rows' partial sums in
/// eight lanes, with no horizontal reduction (llama.cpp's repacked layouts use the same idea).
///
/// Byte `(k % 16) / 4 * 32 + row * 4 + k % 4` holds column `k` of `row`: in its low nibble for
/// `k < 16`, in its high nibble for `k >= 16`. Same 20 bytes per 32 weights as [`BlockQ4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TileQ4 {
    pub d: [u16; TILE_ROWS],
    pub m: [u16; TILE_ROWS],
    pub qs: [u8; TILE_ROWS * 16],
}

impl Default for TileQ4 {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl TileQ4 {
    #[inline]
    fn index(row: usize, k: usize) -> (usize, u32) {
        let q = k % 16;
        ((q / 4) * 32 + row * 4 + q % 4, if k < 16 { 0 } else { 4 })
    }

    /// The code of column `k` (0..32) of row `row`.
    #[inline]
    pub fn code(&self, row: usize, k: usize) -> u8 {
        let (i, shift) = Self::index(row, k);
        (self.qs[i] >> shift) & 0x0F
    }

    #[inline]
    pub fn set_code(&mut self, row: usize, k: usize, c: u8) {
        let (i, shift) = Self::index(row, k);
        self.qs[i] = (self.qs[i] & !(0x0F << shift)) | ((c & 0x0F) << shift);
    }

    /// Row `i` of the tile as a block.
    pub fn block(&self, i: usize) -> BlockQ4 {
        let mut b = BlockQ4 {
            d: self.d[i],
            m: self.m[i],
            qs: [0; 16],
        };
        for k in 0..QK {
            b.set_code(k, self.code(i, k));
        }
        b
    }
}

/// An INT4 matrix `[rows, cols]`, stored as tiles of 8 rows × 32 columns
/// (`tiles[row_group * blocks_per_row + block]`). Rows past `rows` in the last group are zero.
#[derive(Clone, Debug)]
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    kind: Q4Kind,
    tiles: Store<TileQ4>,
}

impl Q4Matrix {
    /// Blocks per row: `ceil(cols / 32)`.
    pub fn blocks_per_row_for(cols: usize) -> usize {
        cols.div_ceil(QK)
    }

    /// Builds a matrix from row-major blocks produced by a converter (GPTQ, GGUF, the quantizer).
    /// `blocks.len()` must be `rows * ceil(cols / 32)`.
    pub fn from_blocks(
        rows: usize,
        cols: usize,
        kind: Q4Kind,
        blocks: Vec<BlockQ4>,
    ) -> Result<Self, KernelError> {
        let bpr = Self::blocks_per_row_for(cols);
        let want = rows * bpr;
        if blocks.len() != want || rows == 0 || cols == 0 {
            return Err(KernelError::Shape(format!(
                "INT4 matrix [{rows}, {cols}] needs {want} blocks, got {}",
                blocks.len()
            )));
        }
        if kind == Q4Kind::ZeroPoint
            && let Some(i) = blocks.iter().position(|b| b.m > MAX_ZERO_POINT)
        {
            return Err(KernelError::Shape(format!(
                "INT4 matrix [{rows}, {cols}]: block {i} (row {}) has zero point {}, above {MAX_ZERO_POINT}",
                i / bpr,
                blocks[i].m
            )));
        }
        let groups = rows.div_ceil(TILE_ROWS);
        let mut tiles = vec![TileQ4::default(); groups * bpr];
        for (i, b) in blocks.iter().enumerate() {
            let (n, k) = (i / bpr, i % bpr);
            let t = &mut tiles[(n / TILE_ROWS) * bpr + k];
            let r = n % TILE_ROWS;
            t.d[r] = b.d;
            t.m[r] = b.m;
            for k in 0..QK {
                t.set_code(r, k, b.code(k));
            }
        }
        Ok(Self {
            rows,
            cols,
            kind,
            tiles: tiles.into(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn kind(&self) -> Q4Kind {
        self.kind
    }
    pub fn blocks_per_row(&self) -> usize {
        Self::blocks_per_row_for(self.cols)
    }
    /// Groups of [`TILE_ROWS`] rows.
    pub fn row_groups(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }
    /// The tiles of row group `g` (`blocks_per_row` of them).
    pub fn group_tiles(&self, g: usize) -> &[TileQ4] {
        let bpr = self.blocks_per_row();
        &self.tiles[g * bpr..(g + 1) * bpr]
    }
    /// Block `b` of row `n`.
    #[inline]
    pub fn block(&self, n: usize, b: usize) -> BlockQ4 {
        self.tiles[(n / TILE_ROWS) * self.blocks_per_row() + b].block(n % TILE_ROWS)
    }
    /// The blocks of one output row (a copy).
    pub fn row_blocks(&self, n: usize) -> Vec<BlockQ4> {
        (0..self.blocks_per_row())
            .map(|b| self.block(n, b))
            .collect()
    }
    /// Column `k` of the eight rows of row group `g`, dequantized (one tile read).
    pub fn group_column(&self, g: usize, k: usize) -> [f32; TILE_ROWS] {
        use half::slice::HalfFloatSliceExt;
        let t = &self.group_tiles(g)[k / QK];
        let mut d = [0f32; TILE_ROWS];
        bytemuck::cast_slice::<u16, f16>(&t.d).convert_to_f32_slice(&mut d);
        let codes: [f32; TILE_ROWS] = std::array::from_fn(|i| t.code(i, k % QK) as f32);
        match self.kind {
            Q4Kind::ZeroPoint => std::array::from_fn(|i| (codes[i] - t.m[i] as f32) * d[i]),
            Q4Kind::Affine => {
                let mut m = [0f32; TILE_ROWS];
                bytemuck::cast_slice::<u16, f16>(&t.m).convert_to_f32_slice(&mut m);
                std::array::from_fn(|i| d[i] * codes[i] + m[i])
            }
        }
    }
    /// Every block, row-major (a copy).
    pub fn to_blocks(&self) -> Vec<BlockQ4> {
        (0..self.rows).flat_map(|n| self.row_blocks(n)).collect()
    }
    /// Bytes of weight data a product reads.
    pub fn nbytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<TileQ4>()
    }
    /// Hands its storage to `f` (for [`crate::cpu::mem::pack`]).
    pub fn stores(&mut self, f: &mut dyn FnMut(&mut dyn Packable)) {
        f(&mut self.tiles)
    }
    /// The tiles as stored (for prefetching).
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.tiles)
    }

    /// Quantizes a row-major f32 matrix by the reference definition (see the fixtures README):
    /// per output row, groups of `group_size` consecutive input columns (the last one shorter when
    /// `cols % group_size != 0`), f32 arithmetic, round-half-to-even,
    /// `scale16 = f16((max - min) / 15)`, `zero = clamp(round(-min / s), 0, 15)`,
    /// `q = clamp(round(w / s) + zero, 0, 15)`.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        group_size: usize,
    ) -> Result<Self, KernelError> {
        if group_size == 0 || !group_size.is_multiple_of(QK) {
            return Err(KernelError::Unsupported(format!(
                "INT4 group size {group_size}: must be a positive multiple of {QK}"
            )));
        }
        if w.len() != rows * cols || rows == 0 || cols == 0 {
            return Err(KernelError::Shape(format!(
                "quantize: {} values for a [{rows}, {cols}] matrix",
                w.len()
            )));
        }
        let bpr = Self::blocks_per_row_for(cols);
        let mut blocks = vec![BlockQ4::default(); rows * bpr];
        // Load-time work on up to billions of weights: rows are split over scoped threads.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rows_per = rows.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for (ci, chunk) in blocks.chunks_mut(rows_per * bpr).enumerate() {
                let w = &w[ci * rows_per * cols..];
                scope.spawn(move || {
                    for (n, row_blocks) in chunk.chunks_mut(bpr).enumerate() {
                        quantize_row(&w[n * cols..(n + 1) * cols], group_size, row_blocks);
                    }
                });
            }
        });
        Self::from_blocks(rows, cols, Q4Kind::ZeroPoint, blocks)
    }

    /// Dequantizes one block into `out[..32]`.
    #[inline]
    pub fn dequantize_block(kind: Q4Kind, b: &BlockQ4, out: &mut [f32]) {
        let d = b.scale();
        match kind {
            Q4Kind::ZeroPoint => {
                let z = b.m as i32;
                for (j, o) in out[..QK].iter_mut().enumerate() {
                    *o = (b.code(j) as i32 - z) as f32 * d;
                }
            }
            Q4Kind::Affine => {
                let m = f16::from_bits(b.m).to_f32();
                for (j, o) in out[..QK].iter_mut().enumerate() {
                    *o = d * b.code(j) as f32 + m;
                }
            }
        }
    }

    /// Dequantizes output row `n` into `out[..cols]`.
    pub fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        let mut tmp = [0f32; QK];
        for bi in 0..self.blocks_per_row() {
            Self::dequantize_block(self.kind, &self.block(n, bi), &mut tmp);
            let k0 = bi * QK;
            let k1 = (k0 + QK).min(self.cols);
            out[k0..k1].copy_from_slice(&tmp[..k1 - k0]);
        }
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for n in 0..self.rows {
            self.dequantize_row(n, &mut out[n * self.cols..(n + 1) * self.cols]);
        }
        out
    }

    /// Reference product: `out[r, n] = sum_k W[n, k] * x[r, k]` for `m` rows of `x` (`[m, cols]`),
    /// `out` is `[m, rows]`. Dequantizes each weight row once and uses it for every activation row,
    /// so the weights are read once whatever `m` is.
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

/// One row of the reference quantizer into its blocks.
fn quantize_row(row: &[f32], group_size: usize, blocks: &mut [BlockQ4]) {
    let cols = row.len();
    for g0 in (0..cols).step_by(group_size) {
        let g1 = (g0 + group_size).min(cols);
        let (scale16, zero) = group_params(&row[g0..g1]);
        let s = scale16.to_f32();
        for b0 in (g0..g1).step_by(QK) {
            let blk = &mut blocks[b0 / QK];
            blk.d = scale16.to_bits();
            blk.m = zero as u16;
            let b1 = (b0 + QK).min(g1);
            for (j, &x) in row[b0..b1].iter().enumerate() {
                blk.set_code(j, quantize_one(x, s, zero));
            }
            // Padding dequantizes to exactly zero.
            for j in (b1 - b0)..QK {
                blk.set_code(j, zero);
            }
        }
    }
}

/// Round half to even, as `f32::round_ties_even`, without a library call: adding and subtracting
/// 1.5 · 2^23 leaves the nearest integer under the default rounding mode, exactly, for
/// |x| < 2^22. Larger values are already integers or are clamped by the callers.
#[inline]
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    if x.abs() < 4_194_304.0 {
        (x + MAGIC) - MAGIC
    } else {
        x.round_ties_even()
    }
}

/// `(scale16, zero)` of one group by the reference definition.
fn group_params(g: &[f32]) -> (f16, u8) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in g {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    let scale16 = f16::from_f32((hi - lo) / 15.0);
    let s = scale16.to_f32();
    if s == 0.0 || !s.is_finite() {
        // A constant group: represent its value with code 1 and zero point 0 (or 1 for negatives),
        // falling back to an all-zero group when the value itself is zero.
        let v = if hi.abs() > lo.abs() { hi } else { lo };
        let s16 = f16::from_f32(v.abs());
        return if s16.to_f32() == 0.0 {
            (f16::ZERO, 0)
        } else {
            (s16, if v < 0.0 { 1 } else { 0 })
        };
    }
    let zero = round_even(-lo / s).clamp(0.0, 15.0) as u8;
    (scale16, zero)
}

#[inline]
fn quantize_one(x: f32, s: f32, zero: u8) -> u8 {
    if s == 0.0 {
        return zero;
    }
    (round_even(x / s) + zero as f32).clamp(0.0, 15.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn dequantized_error_is_within_half_a_step_per_group() {
        let (rows, cols) = (5, 176);
        let mut s = 7;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        let q = Q4Matrix::quantize(&w, rows, cols, 32).unwrap();
        assert_eq!(q.blocks_per_row(), 6);
        let dq = q.dequantize();
        for n in 0..rows {
            for k in 0..cols {
                let b = &q.row_blocks(n)[k / 32];
                let step = b.scale();
                let err = (dq[n * cols + k] - w[n * cols + k]).abs();
                assert!(
                    err <= step * 0.5 + 1e-6 || err <= step,
                    "({n},{k}) err {err} step {step}"
                );
            }
        }
    }

    #[test]
    fn group_column_equals_the_dequantized_rows() {
        let (rows, cols) = (13, 70);
        let mut s = 5;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        let q = Q4Matrix::quantize(&w, rows, cols, 32).unwrap();
        let dq = q.dequantize();
        for g in 0..q.row_groups() {
            for k in [0, 15, 16, 31, 32, 69] {
                let col = q.group_column(g, k);
                for (i, &c) in col.iter().enumerate() {
                    let n = g * TILE_ROWS + i;
                    let want = if n < rows { dq[n * cols + k] } else { 0.0 };
                    assert_eq!(c, want, "row {n} col {k}");
                }
            }
        }
    }

    #[test]
    fn round_even_equals_round_ties_even() {
        for x in [
            0.5f32, 1.5, 2.5, -0.5, -1.5, 3.4999998, 7.5000005, -14.5, 0.0, -0.0, 1e7, -3e9,
            4194303.5,
        ] {
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
        let mut s = 1;
        for _ in 0..100_000 {
            let x = lcg(&mut s) * 40.0;
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn partial_block_padding_dequantizes_to_zero() {
        let (rows, cols) = (2, 40);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = Q4Matrix::quantize(&w, rows, cols, 32).unwrap();
        let mut tmp = [0f32; 32];
        Q4Matrix::dequantize_block(q.kind(), &q.row_blocks(0)[1], &mut tmp);
        assert!(tmp[8..].iter().all(|&v| v == 0.0), "{tmp:?}");
    }

    #[test]
    fn wider_groups_share_metadata_across_blocks() {
        let (rows, cols) = (3, 100);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let q = Q4Matrix::quantize(&w, rows, cols, 64).unwrap();
        let r = q.row_blocks(1);
        assert_eq!((r[0].d, r[0].m), (r[1].d, r[1].m));
        assert!(Q4Matrix::quantize(&w, rows, cols, 48).is_err());
    }

    #[test]
    fn matmul_reference_equals_dense_product_of_dequantized_weights() {
        let (rows, cols, m) = (7, 70, 3);
        let mut s = 3;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut s)).collect();
        let q = Q4Matrix::quantize(&w, rows, cols, 32).unwrap();
        let dq = q.dequantize();
        let mut out = vec![0f32; m * rows];
        q.matmul_reference(&x, m, &mut out);
        for r in 0..m {
            for n in 0..rows {
                let want: f32 = (0..cols).map(|k| dq[n * cols + k] * x[r * cols + k]).sum();
                assert!((out[r * rows + n] - want).abs() < 1e-4);
            }
        }
    }
}
