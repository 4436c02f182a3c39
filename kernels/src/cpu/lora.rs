//! Multi-LoRA products, SGMV-style: the rows of a batch are split into segments that share an
//! adapter, and each segment gets `out += scaling * B (A x)` with its own A and B; adapters are
//! never merged into the base weights. [`sgmv_reference`] is the exact f32 definition; on the int8
//! path the shrink and the expand run inside the base projection's parallel region
//! ([`crate::cpu::matmul::project_q8`]), with B as [`LoraB`] and [`lora_axpy`] as the expand's
//! micro-kernel.

use std::ops::Range;

use half::f16;

use crate::cpu::act::{ActQ8, BlockQ8A};
use crate::cpu::matmul::{OutlierPlan, add_outliers, q4_group_columns, q8_group_columns};
use crate::cpu::mem::{Packable, Store};
use crate::cpu::ops::dot;
use crate::cpu::q4::TILE_ROWS;
use crate::cpu::qdot::{
    Isa, TILE_XROWS, TileOut, q4q8_tiles, q4q8_tiles2_cached, q8q8_tiles, q8q8_tiles2_cached,
};
use crate::cpu::threads::SharedOut;
use crate::{KernelError, Q4Matrix, Q8Matrix};

/// One run of consecutive rows that share an adapter's A `[rank, in]` and B `[out, rank]`.
#[derive(Clone, Debug)]
pub struct LoraSegment<'a> {
    pub rows: Range<usize>,
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub scaling: f32,
}

/// Reference SGMV: shrink (`t = A x`, rank-sized) then expand (`out += scaling * B t`) per segment.
/// `x` is `[rows, in_dim]`, `out` is `[rows, out_dim]`.
pub fn sgmv_reference(
    x: &[f32],
    in_dim: usize,
    out: &mut [f32],
    out_dim: usize,
    segments: &[LoraSegment<'_>],
) {
    let mut t = Vec::new();
    for seg in segments {
        debug_assert_eq!(seg.a.len(), seg.rank * in_dim);
        debug_assert_eq!(seg.b.len(), out_dim * seg.rank);
        t.resize(seg.rank, 0.0);
        for r in seg.rows.clone() {
            let xr = &x[r * in_dim..(r + 1) * in_dim];
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = dot(&seg.a[j * in_dim..(j + 1) * in_dim], xr);
            }
            let orow = &mut out[r * out_dim..(r + 1) * out_dim];
            for (n, o) in orow.iter_mut().enumerate() {
                *o += dot(&seg.b[n * seg.rank..(n + 1) * seg.rank], &t) * seg.scaling;
            }
        }
    }
}

/// How the int8 path stores an adapter's A and B. `Int8` (the default) moves an adapter's effect
/// on the logits by under 1%; `Int4` nearly halves the bytes a batch of distinct adapters streams
/// per step (a rank-16 pair: 0.57 of the int8 bytes), moving the effect by 10-14% (measured on the
/// fixture's PEFT adapters, see BENCHMARKS.md). An opt-in: the quality is the user's call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AdapterBits {
    #[default]
    Int8,
    Int4,
}

impl AdapterBits {
    pub fn bits(self) -> u32 {
        match self {
            Self::Int8 => 8,
            Self::Int4 => 4,
        }
    }
}

impl std::fmt::Display for AdapterBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.bits())
    }
}

impl std::str::FromStr for AdapterBits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "8" | "int8" => Ok(Self::Int8),
            "4" | "int4" => Ok(Self::Int4),
            _ => Err(format!("adapter bits {s:?}: expected 8 or 4")),
        }
    }
}

/// A `[rank, in]` of an adapted projection on the int8 path, in the base weights' tiled layout so
/// that the shrink runs on their micro-kernels: Q8_0, or INT4 (groups of 32, zero point, as the
/// base quantizer makes them) under [`AdapterBits::Int4`].
#[derive(Clone, Debug)]
pub enum LoraA {
    Q8(Q8Matrix),
    Q4(Q4Matrix),
}

impl LoraA {
    /// Quantizes `a` (`[rank, cols]`, row-major) at `bits`.
    pub fn quantize(
        a: &[f32],
        rank: usize,
        cols: usize,
        bits: AdapterBits,
    ) -> Result<Self, KernelError> {
        Ok(match bits {
            AdapterBits::Int8 => Self::Q8(Q8Matrix::quantize(a, rank, cols)?),
            AdapterBits::Int4 => Self::Q4(Q4Matrix::quantize(a, rank, cols, crate::QK)?),
        })
    }
    pub fn bits(&self) -> AdapterBits {
        match self {
            Self::Q8(_) => AdapterBits::Int8,
            Self::Q4(_) => AdapterBits::Int4,
        }
    }
    /// The rank.
    pub fn rows(&self) -> usize {
        match self {
            Self::Q8(m) => m.rows(),
            Self::Q4(m) => m.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Self::Q8(m) => m.cols(),
            Self::Q4(m) => m.cols(),
        }
    }
    pub fn row_groups(&self) -> usize {
        match self {
            Self::Q8(m) => m.row_groups(),
            Self::Q4(m) => m.row_groups(),
        }
    }
    pub fn nbytes(&self) -> usize {
        match self {
            Self::Q8(m) => m.nbytes(),
            Self::Q4(m) => m.nbytes(),
        }
    }
    /// The tiles as stored (for prefetching).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Q8(m) => m.as_bytes(),
            Self::Q4(m) => m.as_bytes(),
        }
    }
    /// Hands its storage to `f` (for [`crate::cpu::mem::pack`]).
    pub fn stores(&mut self, f: &mut dyn FnMut(&mut dyn Packable)) {
        match self {
            Self::Q8(m) => m.stores(f),
            Self::Q4(m) => m.stores(f),
        }
    }
    /// The values the codes stand for, `[rank, cols]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0f32; rows * cols];
        for (n, row) in out.chunks_mut(cols).enumerate() {
            match self {
                Self::Q8(m) => m.dequantize_row(n, row),
                Self::Q4(m) => m.dequantize_row(n, row),
            }
        }
        out
    }
}

/// B `[out, rank]` of an adapted projection for the integer expand: codes with one scale per
/// output row (over its `rank` values), in groups of eight rows laid out like the base weights'
/// tiles — eight f16 scales, then 32-byte chunks whose 32-bit lane `i` holds row `i`'s codes of
/// the chunk's columns — so that a `dpbusd` gives eight outputs. Int8: four columns per chunk,
/// one byte each (rank 16: 144 bytes per eight outputs). Int4: eight columns per chunk, byte `j`
/// of a lane holding column `j` in its low nibble and column `j + 4` in its high one, each as
/// `code + 8` (rank 16: 80 bytes per eight outputs); the kernels take the nibbles as unsigned
/// bytes and start each sum at `-8 * sum(t)`. The rank is padded to a chunk only, not to a block
/// of 32.
#[derive(Clone, Debug)]
pub struct LoraB {
    rows: usize,
    rank: usize,
    chunks: usize,
    bits: AdapterBits,
    data: Store<u8>,
}

impl LoraB {
    /// Quantizes `b` (`[rows, rank]`, row-major) to int8: `d = max|row| / 127` (as f16), codes
    /// rounded half away from zero and clamped to ±127.
    pub fn quantize(b: &[f32], rows: usize, rank: usize) -> Result<Self, KernelError> {
        Self::quantize_bits(b, rows, rank, AdapterBits::Int8)
    }

    /// As [`LoraB::quantize`] at `bits`; at int4 `d = max|row| / 7` and codes clamped to -8..=7.
    pub fn quantize_bits(
        b: &[f32],
        rows: usize,
        rank: usize,
        bits: AdapterBits,
    ) -> Result<Self, KernelError> {
        if b.len() != rows * rank || rank == 0 {
            return Err(KernelError::Shape(format!(
                "LoRA B: {} values for [{rows}, {rank}]",
                b.len()
            )));
        }
        let (qmax, qmin, per_chunk) = match bits {
            AdapterBits::Int8 => (127.0, -127, 4),
            AdapterBits::Int4 => (7.0, -8, 8),
        };
        let chunks = rank.div_ceil(per_chunk);
        let stride = Self::stride_for(chunks);
        let mut data = vec![0u8; rows.div_ceil(TILE_ROWS) * stride];
        if bits == AdapterBits::Int4 {
            // Every nibble a zero code (8) to begin with, padding included.
            for g in data.chunks_mut(stride) {
                g[16..].fill(0x88);
            }
        }
        for n in 0..rows {
            let row = &b[n * rank..(n + 1) * rank];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            // The scale as stored (f16), so that codes and scale agree.
            let d = f16::from_f32(amax / qmax).to_f32();
            if !d.is_finite() {
                return Err(KernelError::Unsupported(format!(
                    "LoRA B row {n}: magnitude {amax} is beyond an f16 scale"
                )));
            }
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let (g, i) = (n / TILE_ROWS, n % TILE_ROWS);
            let base = g * stride;
            data[base + 2 * i..base + 2 * i + 2]
                .copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            for (k, &v) in row.iter().enumerate() {
                let t = v * id;
                let q = ((t + 0.5f32.copysign(t)) as i32).clamp(qmin, qmax as i32);
                let at = base + Self::code_offset(bits, i, k);
                match bits {
                    AdapterBits::Int8 => data[at] = q as i8 as u8,
                    AdapterBits::Int4 => {
                        let shift = 4 * ((k % 8) / 4);
                        data[at] = (data[at] & !(0x0F << shift)) | (((q + 8) as u8) << shift);
                    }
                }
            }
        }
        Ok(Self {
            rows,
            rank,
            chunks,
            bits,
            data: data.into(),
        })
    }

    /// Offset in its group of row `i`'s (of eight) byte holding column `k`.
    fn code_offset(bits: AdapterBits, i: usize, k: usize) -> usize {
        match bits {
            AdapterBits::Int8 => 16 + 32 * (k / 4) + 4 * i + k % 4,
            AdapterBits::Int4 => 16 + 32 * (k / 8) + 4 * i + k % 4,
        }
    }
    fn stride_for(chunks: usize) -> usize {
        16 + 32 * chunks
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn bits(&self) -> AdapterBits {
        self.bits
    }
    /// 32-byte chunks per group: the rank over four (int8) or eight (int4), rounded up.
    pub fn chunks(&self) -> usize {
        self.chunks
    }
    /// The `t` codes the expand reads: the rank rounded up to whole chunks (zero past the rank).
    pub fn t_len(&self) -> usize {
        match self.bits {
            AdapterBits::Int8 => 4 * self.chunks,
            AdapterBits::Int4 => 8 * self.chunks,
        }
    }
    /// Bytes per group of eight rows.
    pub fn stride(&self) -> usize {
        Self::stride_for(self.chunks)
    }
    /// Hands its storage to `f` (for [`crate::cpu::mem::pack`]).
    pub fn stores(&mut self, f: &mut dyn FnMut(&mut dyn Packable)) {
        f(&mut self.data)
    }
    /// Every byte, group after group.
    pub fn all_data(&self) -> &[u8] {
        &self.data
    }
    /// The bytes of row groups `gs`, group after group.
    pub fn groups_data(&self, gs: Range<usize>) -> &[u8] {
        &self.data[gs.start * self.stride()..gs.end * self.stride()]
    }
    /// Row `n`'s scale.
    pub fn scale(&self, n: usize) -> f32 {
        let at = (n / TILE_ROWS) * self.stride() + 2 * (n % TILE_ROWS);
        f16::from_bits(u16::from_le_bytes([self.data[at], self.data[at + 1]])).to_f32()
    }
    /// Row `n`'s code of column `k`.
    pub fn code(&self, n: usize, k: usize) -> i8 {
        let byte = self.data
            [(n / TILE_ROWS) * self.stride() + Self::code_offset(self.bits, n % TILE_ROWS, k)];
        match self.bits {
            AdapterBits::Int8 => byte as i8,
            AdapterBits::Int4 => ((byte >> (4 * ((k % 8) / 4))) & 0x0F) as i8 - 8,
        }
    }
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
    /// The values the codes stand for, `[rows, rank]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.rank];
        for n in 0..self.rows {
            for k in 0..self.rank {
                out[n * self.rank + k] = self.code(n, k) as f32 * self.scale(n);
            }
        }
        out
    }
}

/// A segment for the int8 path: A `[rank, in]` as [`LoraA`] and B as [`LoraB`]. Shrink and
/// expand run in the base projection's parallel region, the expand after its products, see
/// [`crate::cpu::matmul::project_q8`].
#[derive(Clone, Debug)]
pub struct LoraSegmentQ8<'a> {
    pub rows: Range<usize>,
    pub a: &'a LoraA,
    pub b: &'a LoraB,
    pub scaling: f32,
}

/// SGMV on the int8 path: `out [rows, out_dim] += scaling * B (A x)` per segment, in one parallel
/// region (the fused projection with no base weight).
pub fn sgmv_q8(
    x: &ActQ8,
    out: &mut [f32],
    out_dim: usize,
    segments: &[LoraSegmentQ8<'_>],
    isa: Isa,
) {
    crate::cpu::matmul::project_q8(
        &mut [crate::cpu::matmul::ProjQ8 {
            weight: None,
            out,
            out_dim,
            lora: segments,
        }],
        x,
        isa,
    );
}

/// Rows per piece (a shrink and its expand): each A tile is reused for up to four rows.
pub(crate) const ROWS_PER_TASK: usize = 4;

/// What [`shrink_rows`] reuses from one call to the next (it runs thousands of times per step, and
/// growing fresh vectors was most of the allocator's time in a mixed-adapter decode step).
#[derive(Default)]
pub(crate) struct ShrinkScratch {
    /// The piece's outlier columns (indices into the plan's union), sorted.
    us: Vec<u32>,
    /// The same as activation columns.
    ks: Vec<u32>,
    /// A's row group at those columns.
    cols: Vec<[f32; TILE_ROWS]>,
}

/// The shrink of up to four rows `rows` of `x` that share `a`: `t = A x` with `x`'s outliers
/// applied exactly, then quantized to int8 with one scale per row into `codes` (`stride` per row,
/// zero past the rank) and `scales`, for the expand's integer product. Only the outlier columns
/// of these rows are dequantized (the plan's union covers the whole batch).
#[allow(clippy::too_many_arguments)]
pub(crate) fn shrink_rows(
    isa: Isa,
    x: &ActQ8,
    plan: &OutlierPlan,
    rows: Range<usize>,
    a: &LoraA,
    codes: &mut [i8],
    stride: usize,
    scales: &mut [f32],
    scratch: &mut ShrinkScratch,
) {
    let n = rows.len();
    debug_assert!(n <= ROWS_PER_TASK && codes.len() == n * stride && scales.len() == n);
    let rank = a.rows();
    let groups = a.row_groups();
    let empty: &[BlockQ8A] = &[];
    let mut xs = [empty; ROWS_PER_TASK];
    for (i, r) in rows.clone().enumerate() {
        xs[i] = x.row(r);
    }
    let ShrinkScratch { us, ks, cols } = scratch;
    us.clear();
    for r in rows.clone() {
        us.extend(plan.row(r).iter().map(|&(u, _)| u));
    }
    us.sort_unstable();
    us.dedup();
    ks.clear();
    ks.extend(us.iter().map(|&u| plan.cols[u as usize]));
    let mut tmp: [TileOut; 2] = [[[0f32; TILE_ROWS]; TILE_XROWS]; 2];
    // t of row i, row group g at [(i * groups + g) * 8 ..]; on the stack up to 64 values, one
    // row of rank 64 or four of rank 16 (this runs once per row and adapted projection:
    // thousands of times per step, and zeroing a larger array was 8% of a one-row shrink).
    let (mut stack, mut heap) = ([0f32; 64], Vec::new());
    let t: &mut [f32] = if n * groups * TILE_ROWS <= stack.len() {
        &mut stack[..n * groups * TILE_ROWS]
    } else {
        heap.resize(n * groups * TILE_ROWS, 0f32);
        &mut heap
    };
    // Two row groups per kernel call where there are two (a rank of 16 is exactly two).
    for g0 in (0..groups).step_by(2) {
        let gs = g0..(g0 + 2).min(groups);
        match (a, gs.len()) {
            (LoraA::Q8(a), 2) => {
                let tiles = [a.group_tiles(g0), a.group_tiles(g0 + 1)];
                q8q8_tiles2_cached(isa, tiles, &xs[..n], &mut tmp);
            }
            (LoraA::Q8(a), _) => q8q8_tiles(isa, a.group_tiles(g0), &xs[..n], &mut tmp[0]),
            (LoraA::Q4(a), 2) => {
                let tiles = [a.group_tiles(g0), a.group_tiles(g0 + 1)];
                q4q8_tiles2_cached(isa, a.kind(), tiles, &xs[..n], &mut tmp);
            }
            (LoraA::Q4(a), _) => {
                q4q8_tiles(isa, a.kind(), a.group_tiles(g0), &xs[..n], &mut tmp[0])
            }
        }
        for (k, g) in gs.enumerate() {
            match a {
                LoraA::Q8(a) => q8_group_columns(isa, a, g, ks, cols),
                LoraA::Q4(a) => q4_group_columns(isa, a, g, ks, cols),
            }
            for (i, vals) in tmp[k][..n].iter().enumerate() {
                // Each outlier's column found among this piece's.
                let acc = add_outliers(*vals, plan.row(rows.start + i), |u| {
                    &cols[us
                        .binary_search(&u)
                        .expect("a row's outlier is in its piece's")]
                });
                t[(i * groups + g) * TILE_ROWS..][..TILE_ROWS].copy_from_slice(&acc);
            }
        }
    }
    for i in 0..n {
        let ti = &t[i * groups * TILE_ROWS..][..rank];
        let amax = ti.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let row = &mut codes[i * stride..(i + 1) * stride];
        row.fill(0);
        for (q, &v) in row.iter_mut().zip(ti) {
            let s = v * id;
            *q = ((s + 0.5f32.copysign(s)) as i32).clamp(-127, 127) as i8;
        }
        scales[i] = d;
    }
}

/// The expand of row groups `gs` (output columns `8 gs.start .. 8 gs.end`) for the rows of
/// `seg`: `out[r][n] += scaling * d_t * d_B[n] * dot(B[n], t[r])`, where `t_row(r)` gives row
/// `r`'s codes and scale and `op` is `out` (`[rows, out_dim]`; the caller owns these columns of the
/// segment's rows): one [`lora_axpy`] per row over the whole run of groups.
pub(crate) fn expand_groups<'t>(
    isa: Isa,
    seg: &LoraSegmentQ8<'_>,
    gs: Range<usize>,
    t_row: impl Fn(usize) -> (&'t [i8], f32),
    op: SharedOut,
    out_dim: usize,
) {
    let n0 = gs.start * TILE_ROWS;
    let n1 = (gs.end * TILE_ROWS).min(out_dim);
    // Whole groups straight into the output; a partial last group through a scratch.
    let whole = if n1 - n0 == gs.len() * TILE_ROWS {
        gs.end
    } else {
        gs.end - 1
    };
    for r in seg.rows.clone() {
        let (t, td) = t_row(r);
        let scale = seg.scaling * td;
        if whole > gs.start {
            // SAFETY: these columns of row r belong to the calling task.
            let dst = unsafe { op.slice_mut(r * out_dim + n0, (whole - gs.start) * TILE_ROWS) };
            lora_axpy(isa, seg.b, gs.start..whole, t, scale, dst);
        }
        if whole < gs.end {
            let mut tmp = [0f32; TILE_ROWS];
            lora_axpy(isa, seg.b, whole..gs.end, t, scale, &mut tmp);
            let m0 = whole * TILE_ROWS;
            // SAFETY: as above.
            let dst = unsafe { op.slice_mut(r * out_dim + m0, n1 - m0) };
            for (d, v) in dst.iter_mut().zip(tmp) {
                *d += v;
            }
        }
    }
}

/// The expand's micro-kernel: `out[8(g - gs.start) + i] += scale * d_B[8g + i] * dot(B[8g + i],
/// t)` for the row groups `gs` of `b`; `t` holds `b.t_len()` codes (zero past the rank) and
/// `out` eight values per group.
pub fn lora_axpy(isa: Isa, b: &LoraB, gs: Range<usize>, t: &[i8], scale: f32, out: &mut [f32]) {
    assert!(t.len() >= b.t_len(), "t codes");
    let nib = b.bits() == AdapterBits::Int4;
    assert_eq!(out.len(), TILE_ROWS * gs.len(), "output length");
    assert!(gs.end <= b.rows().div_ceil(TILE_ROWS), "row groups");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => {
            // SAFETY: `isa` came from `available_isas`, so the CPU has these features; the
            // shapes were checked above.
            unsafe {
                crate::cpu::x86::lora_axpy(
                    isa == Isa::Avx512Vnni,
                    nib,
                    b.groups_data(gs),
                    b.stride(),
                    b.chunks(),
                    t,
                    scale,
                    out,
                )
            }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => {
            // SAFETY: as above.
            unsafe {
                crate::cpu::arm::lora_axpy(
                    isa == Isa::NeonDot,
                    nib,
                    b.groups_data(gs),
                    b.stride(),
                    b.chunks(),
                    t,
                    scale,
                    out,
                )
            }
        }
        _ => lora_axpy_reference(b, gs, t, scale, out),
    }
}

/// Reference for [`lora_axpy`] (also the scalar path); the SIMD paths give its bits.
pub fn lora_axpy_reference(b: &LoraB, gs: Range<usize>, t: &[i8], scale: f32, out: &mut [f32]) {
    for (o, n) in out.iter_mut().zip(gs.start * TILE_ROWS..) {
        if n >= b.rows() {
            continue; // padding rows of the last group (their codes are zero anyway)
        }
        let sumi: i32 = (0..b.t_len())
            .map(|k| {
                let c = if k < b.rank() { b.code(n, k) } else { 0 };
                c as i32 * t[k] as i32
            })
            .sum();
        *o += sumi as f32 * (b.scale(n) * scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_sgmv_follows_the_reference_for_every_isa() {
        // 40: one partial chunk of the expand; 300: a whole chunk, then a partial block.
        for out_dim in [40, 300] {
            int8_sgmv_case(out_dim);
        }
    }

    fn int8_sgmv_case(out_dim: usize) {
        let (in_dim, rank, rows) = (96, 16, 5);
        let x: Vec<f32> = (0..rows * in_dim)
            .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.5)
            .collect();
        let a: Vec<f32> = (0..rank * in_dim)
            .map(|i| ((i * 104729 % 97) as f32 / 48.0 - 1.0) * 0.1)
            .collect();
        let b: Vec<f32> = (0..out_dim * rank)
            .map(|i| ((i * 1299709 % 89) as f32 / 44.0 - 1.0) * 0.1)
            .collect();
        let segs = [
            LoraSegment {
                rows: 0..2,
                a: &a,
                b: &b,
                rank,
                scaling: 2.0,
            },
            LoraSegment {
                rows: 3..5,
                a: &a,
                b: &b,
                rank,
                scaling: 0.5,
            },
        ];
        let mut want = vec![0.25f32; rows * out_dim];
        sgmv_reference(&x, in_dim, &mut want, out_dim, &segs);
        let (aq, bq) = (
            LoraA::Q8(Q8Matrix::quantize(&a, rank, in_dim).unwrap()),
            LoraB::quantize(&b, out_dim, rank).unwrap(),
        );
        let segs_q8 = [
            LoraSegmentQ8 {
                rows: 0..2,
                a: &aq,
                b: &bq,
                scaling: 2.0,
            },
            LoraSegmentQ8 {
                rows: 3..5,
                a: &aq,
                b: &bq,
                scaling: 0.5,
            },
        ];
        let xq = ActQ8::quantize(&x, rows, in_dim);
        let scale = want.iter().fold(0f32, |m, v| m.max((v - 0.25).abs()));
        let mut scalar = vec![0.25f32; rows * out_dim];
        sgmv_q8(&xq, &mut scalar, out_dim, &segs_q8, Isa::Scalar);
        // Four int8 roundings (x, A, t, B) on uniform data: a few percent of the delta's scale; a
        // wrong kernel is off by the whole delta.
        let err = scalar
            .iter()
            .zip(&want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(
            err < 0.06 * scale,
            "scalar int8 SGMV error {err} vs delta scale {scale}"
        );
        assert!(
            scalar[2 * out_dim..3 * out_dim].iter().all(|&v| v == 0.25),
            "row 2 has no adapter"
        );
        for isa in crate::cpu::qdot::available_isas() {
            let mut got = vec![0.25f32; rows * out_dim];
            sgmv_q8(&xq, &mut got, out_dim, &segs_q8, isa);
            let d = got
                .iter()
                .zip(&scalar)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            assert!(
                d < 1e-5,
                "{} differs from the scalar path by {d}",
                isa.name()
            );
        }
    }

    #[test]
    fn lora_b_round_trips_and_the_expand_kernel_equals_its_reference_on_every_isa() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for (rows, rank) in [
            (1, 1),
            (8, 4),
            (13, 7),
            (40, 16),
            (33, 30),
            (64, 64),
            (20, 100),
        ] {
            let b: Vec<f32> = (0..rows * rank).map(|_| next()).collect();
            for bits in [AdapterBits::Int8, AdapterBits::Int4] {
                lora_b_case(&b, rows, rank, bits, &mut next);
            }
        }
        assert!(LoraB::quantize(&[1.0; 6], 2, 4).is_err());
    }

    fn lora_b_case(
        b: &[f32],
        rows: usize,
        rank: usize,
        bits: AdapterBits,
        next: &mut impl FnMut() -> f32,
    ) {
        let lb = LoraB::quantize_bits(b, rows, rank, bits).unwrap();
        let per_chunk = if bits == AdapterBits::Int8 { 4 } else { 8 };
        assert_eq!(lb.chunks(), rank.div_ceil(per_chunk));
        assert_eq!(lb.t_len(), per_chunk * lb.chunks());
        let qmax = if bits == AdapterBits::Int8 { 127 } else { 7 };
        assert!(
            (0..rows).all(|n| (0..rank).any(|k| lb.code(n, k).abs() == qmax)),
            "int{bits}: every row's largest value takes the largest code"
        );
        for n in 0..rows {
            let d = lb.scale(n);
            for k in 0..rank {
                let back = lb.code(n, k) as f32 * d;
                // Half a step, plus the clamp when the f16 scale rounded down (127 * 2^-11 steps).
                assert!((back - b[n * rank + k]).abs() <= d * 0.57, "[{n},{k}]");
            }
        }
        let t: Vec<i8> = (0..lb.t_len())
            .map(|k| if k < rank { (next() * 127.0) as i8 } else { 0 })
            .collect();
        let groups = rows.div_ceil(TILE_ROWS);
        for gs in [0..groups, groups / 2..groups, 0..groups.div_ceil(2)] {
            let mut want = vec![0.5f32; gs.len() * TILE_ROWS];
            lora_axpy_reference(&lb, gs.clone(), &t, 0.75, &mut want);
            // Against the definition, row by row.
            for (o, n) in want.iter().zip(gs.start * TILE_ROWS..) {
                if n < rows {
                    let dot: i32 = (0..rank).map(|k| lb.code(n, k) as i32 * t[k] as i32).sum();
                    let exact = 0.5 + dot as f32 * lb.scale(n) * 0.75;
                    assert!((o - exact).abs() <= 1e-4 * (1.0 + exact.abs()), "row {n}");
                }
            }
            for isa in crate::cpu::qdot::available_isas() {
                let mut got = vec![0.5f32; gs.len() * TILE_ROWS];
                lora_axpy(isa, &lb, gs.clone(), &t, 0.75, &mut got);
                assert_eq!(got, want, "{} int{bits} [{rows},{rank}] {gs:?}", isa.name());
            }
        }
    }

    #[test]
    fn segments_only_touch_their_rows_and_match_the_dense_formula() {
        let (in_dim, out_dim, rank) = (5, 3, 2);
        let x: Vec<f32> = (0..4 * in_dim).map(|i| (i as f32 * 0.3).sin()).collect();
        let a: Vec<f32> = (0..rank * in_dim).map(|i| (i as f32 * 0.7).cos()).collect();
        let b: Vec<f32> = (0..out_dim * rank).map(|i| i as f32 * 0.1 - 0.2).collect();
        let mut out = vec![1.0f32; 4 * out_dim];
        let seg = LoraSegment {
            rows: 1..3,
            a: &a,
            b: &b,
            rank,
            scaling: 2.0,
        };
        sgmv_reference(&x, in_dim, &mut out, out_dim, &[seg]);
        for r in 0..4 {
            for n in 0..out_dim {
                let want = if (1..3).contains(&r) {
                    let mut s = 0.0;
                    for j in 0..rank {
                        let t: f32 = (0..in_dim)
                            .map(|k| a[j * in_dim + k] * x[r * in_dim + k])
                            .sum();
                        s += b[n * rank + j] * t;
                    }
                    1.0 + 2.0 * s
                } else {
                    1.0
                };
                assert!(
                    (out[r * out_dim + n] - want).abs() < 1e-5,
                    "row {r} col {n}"
                );
            }
        }
    }
}
