//! Quantized dot products: INT4 or Q8_0 weight rows against int8 activation blocks, with a scalar
//! reference and SIMD paths (x86-64 AVX2, AVX-512 VNNI; aarch64 NEON) chosen at run time.
//!
//! Per block, with `w = dw * c + o` (`o = m` for affine blocks, `-z * dw` for zero-point ones) and
//! `x ≈ dx * q`: `sum(w * x) ≈ dw * dx * sum(c * q) + o * dx * sum(q)`; the integer part is what the
//! SIMD units compute, `dx * sum(q)` is stored with the activation block.

use half::f16;

use crate::cpu::act::BlockQ8A;
use crate::cpu::q4::{BlockQ4, Q4Kind, QK, TILE_ROWS, TileQ4};
use crate::cpu::q8::{BlockQ8, TileQ8};

/// Instruction-set paths, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "aarch64")]
    Neon,
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => "avx512vnni",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => "neon-dotprod",
        }
    }
}

/// Every path this CPU can run, scalar first.
pub fn available_isas() -> Vec<Isa> {
    #[allow(unused_mut)]
    let mut v = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            v.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
            {
                v.push(Isa::Avx512Vnni);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Isa::Neon);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                v.push(Isa::NeonDot);
            }
        }
    }
    v
}

/// The path used by default: the best available, or `EDGELORA_ISA` (a name from [`Isa::name`]).
pub fn best_isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        let avail = available_isas();
        if let Ok(want) = std::env::var("EDGELORA_ISA")
            && let Some(i) = avail.iter().find(|i| i.name() == want)
        {
            return *i;
        }
        *avail.last().expect("scalar is always available")
    })
}

#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// The additive offset `o` of a block: `w = dw * c + o`.
#[inline]
pub fn block_offset(kind: Q4Kind, b: &BlockQ4, dw: f32) -> f32 {
    match kind {
        Q4Kind::ZeroPoint => -(b.m as f32) * dw,
        Q4Kind::Affine => f16_to_f32(b.m),
    }
}

/// Reference: one INT4 row against one activation row.
pub fn q4q8_dot_reference(kind: Q4Kind, w: &[BlockQ4], x: &[BlockQ8A]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.iter().zip(x) {
        let sumi: i32 = (0..QK).map(|j| b.code(j) as i32 * xb.qs[j] as i32).sum();
        let dw = f16_to_f32(b.d);
        acc += dw * xb.d * sumi as f32 + block_offset(kind, b, dw) * xb.s;
    }
    acc
}

/// Reference: one Q8_0 row against one activation row.
pub fn q8q8_dot_reference(w: &[BlockQ8], x: &[BlockQ8A]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.iter().zip(x) {
        let sumi: i32 =
            b.qs.iter()
                .zip(&xb.qs)
                .map(|(&a, &q)| a as i32 * q as i32)
                .sum();
        acc += f16_to_f32(b.d) * xb.d * sumi as f32;
    }
    acc
}

/// Activation rows that one call of the tile kernels takes at most.
pub const TILE_XROWS: usize = 8;

/// Eight outputs (one row group) for each of up to [`TILE_XROWS`] activation rows.
pub type TileOut = [[f32; TILE_ROWS]; TILE_XROWS];

/// `f` over `xs` four rows at a time, with the matching rows of `out`; `side` goes with the
/// first call (only the AVX-512 INT4 kernels keep eight rows' sums in registers).
fn by_fours(
    xs: &[&[BlockQ8A]],
    out: &mut TileOut,
    side: Side,
    mut f: impl FnMut(&[&[BlockQ8A]], &mut [[f32; TILE_ROWS]], Side),
) {
    for (i, (x, o)) in xs.chunks(4).zip(out.chunks_mut(4)).enumerate() {
        f(x, o, if i == 0 { side } else { Side::NONE });
    }
}

/// Cache lines that a tile kernel prefetches on the side, one per tile it reads, so that bytes
/// needed later (a LoRA adapter's) stream in while it computes: `lines` lines from `at`.
#[derive(Clone, Copy, Debug)]
pub struct Side {
    at: *const u8,
    lines: usize,
}

impl Side {
    pub const NONE: Side = Side {
        at: std::ptr::null(),
        lines: 0,
    };

    /// The first `lines` cache lines of `bytes` (fewer when it is shorter).
    pub fn of(bytes: &[u8], lines: usize) -> Side {
        Side {
            at: bytes.as_ptr(),
            lines: lines.min(bytes.len().div_ceil(LINE)),
        }
    }

    /// The prefetches that go with tile `b` of `tiles`: lines `b`, `b + tiles`, ...
    #[inline(always)]
    pub fn line(self, b: usize, tiles: usize) {
        let mut i = b;
        while i < self.lines {
            // `wrapping_add`: in bounds (`i < lines`), and a prefetch never faults anyway.
            prefetch(self.at.wrapping_add(i * LINE));
            i += tiles;
        }
    }

    pub fn lines(self) -> usize {
        self.lines
    }

    pub fn start(self) -> *const u8 {
        self.at
    }

    /// Prefetches every line (for the paths that do not interleave them).
    pub fn all(self) {
        self.line(0, 1);
    }
}

/// Tiles ahead of the one being read that the tile kernels prefetch (the pair kernels always,
/// the one-group kernels from [`AHEAD_MIN_ROWS`] activation rows): 2.5 KB of INT4 and 4.3 KB of
/// Q8_0 tiles per group. A tile computes in about 5 cycles per row, so at 4-8 rows per call
/// eight tiles ahead was less than a memory latency on this kind of VM and the products waited
/// on their weights; 12 to 48 tiles measured alike (SmolLM2, batch 4 to 16, step by step in one
/// process).
pub const AHEAD_TILES: usize = 16;

/// Activation rows from which the one-group tile kernels prefetch their tiles ahead. With fewer
/// the product streams at memory speed and the hardware prefetcher does better alone:
/// prefetching made decode at batch 1, 2 and 3 slower by 23%, 21% and 13%, alternated step by
/// step.
pub const AHEAD_MIN_ROWS: usize = 4;

/// From [`AHEAD_MIN_ROWS`] activation `rows` (nothing below): prefetches the lines of tile
/// `b + AHEAD_TILES` of a row group's `tiles`, and past the group's last tile those that lie
/// after it in memory: in a matrix, the next group's, which the same program computes next (its
/// share is a run of groups), so that a group's first tiles do not wait on memory. (Past a
/// matrix's last group that is whatever lies after it, in a packed model the next projection's
/// weights; a prefetch is only a hint and never faults.)
#[inline(always)]
pub fn ahead_tiles<T>(tiles: &[T], b: usize, rows: usize) {
    if rows >= AHEAD_MIN_ROWS {
        // A pointer, not a reference: past the end it points outside the slice.
        prefetch_lines(tiles.as_ptr().wrapping_add(b + AHEAD_TILES));
    }
}

/// Prefetches the lines that a `T` at `p` would span from `p` on (with the next `T`'s lines
/// when `T`s lie back to back, every line of a run of them).
#[inline(always)]
pub fn prefetch_lines<T>(p: *const T) {
    prefetch_span(p as *const u8, std::mem::size_of::<T>());
}

/// A cache line's size in bytes.
pub const LINE: usize = 64;

/// Prefetches every cache line that `v` itself spans, not what it points to: a slice's values
/// (a KV page's keys), or a struct read rarely and far apart (a weight's or an adapter's shapes
/// and pointers), so that the misses overlap one another instead of coming one after another.
#[inline]
pub fn prefetch_value<T: ?Sized>(v: &T) {
    let (p, n) = (v as *const T as *const u8, std::mem::size_of_val(v));
    if n == 0 {
        return;
    }
    // From the line that holds the first byte to the one that holds the last.
    let into = p as usize & (LINE - 1);
    prefetch_span(p.wrapping_sub(into), into + n);
}

/// Prefetches the lines at `p`, `p + LINE`, ... below `p + n`.
#[inline(always)]
fn prefetch_span(p: *const u8, n: usize) {
    let mut o = 0;
    while o < n {
        prefetch(p.wrapping_add(o));
        o += LINE;
    }
}

/// A hint to bring the line at `p` into the cache (L2 and up); no effect on results.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and has no architectural effect.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above (PRFM never faults).
    unsafe {
        std::arch::asm!(
            "prfm pldl2keep, [{0}]",
            in(reg) p,
            options(nostack, readonly, preserves_flags)
        );
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// One row group of an INT4 matrix (its tiles, one per block column) against up to
/// [`TILE_XROWS`] activation rows: `out[r][i] = dot(row i of the group, xs[r])`. The weight
/// bytes are unpacked once per tile and reused for every activation row (the prefill GEMM's
/// micro-kernel; decode passes one row).
pub fn q4q8_tiles(isa: Isa, kind: Q4Kind, tiles: &[TileQ4], xs: &[&[BlockQ8A]], out: &mut TileOut) {
    q4q8_tiles_side(isa, kind, tiles, xs, out, Side::NONE)
}

/// [`q4q8_tiles`], prefetching `side`'s lines as it goes (one or more per tile on the SIMD
/// paths, all first on the scalar one).
pub fn q4q8_tiles_side(
    isa: Isa,
    kind: Q4Kind,
    tiles: &[TileQ4],
    xs: &[&[BlockQ8A]],
    out: &mut TileOut,
    side: Side,
) {
    debug_assert!(!xs.is_empty() && xs.len() <= TILE_XROWS);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            // SAFETY: `isa` came from `available_isas`, so the CPU has these features.
            unsafe { crate::cpu::x86::q4q8_tiles(true, kind, tiles, xs, out, side) }
        }
        // Sixteen vector registers hold four rows' sums at most.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_fours(xs, out, side, |xs, out, side| {
            // SAFETY: as above.
            unsafe { crate::cpu::x86::q4q8_tiles(false, kind, tiles, xs, out, side) }
        }),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => by_fours(xs, out, side, |xs, out, side| {
            // SAFETY: `isa` came from `available_isas`, so the CPU has these features.
            unsafe { crate::cpu::arm::q4q8_tiles(isa == Isa::NeonDot, kind, tiles, xs, out, side) }
        }),
        Isa::Scalar => {
            side.all();
            for (r, x) in xs.iter().enumerate() {
                for (i, o) in out[r].iter_mut().enumerate() {
                    let row: Vec<BlockQ4> = tiles.iter().map(|t| t.block(i)).collect();
                    *o = q4q8_dot_reference(kind, &row, x);
                }
            }
        }
    }
}

/// Activation rows from which two row groups go through one 512-bit kernel. With fewer the
/// product is bound by memory, and there the 512-bit kernel's two streams (one per group) came
/// in slower than one group after the other (`gemm-peak --m M --rows 65536`, a weight of 2.5x
/// the L3): a third to a half fewer GOP/s at one and two rows, about even at four, 30% more at
/// eight. Since the pair kernels prefetch [`AHEAD_TILES`] ahead and on into the next pair,
/// SmolLM2's decode steps through them took 8.7% longer at batch 1, 5.6% longer at batch 2 and
/// 2-3% less time at batch 3, alternated step by step in one process: they take three rows up.
pub const PAIR_MIN_ROWS: usize = 3;

/// Two consecutive row groups of an INT4 matrix (`tiles[0]`, `tiles[1]`, the same length)
/// against up to [`TILE_XROWS`] activation rows, into `out[0]` and `out[1]`: on AVX-512 VNNI,
/// from [`PAIR_MIN_ROWS`] rows, one 512-bit kernel computes both (the same bits as
/// [`q4q8_tiles`] on each); otherwise one group after the other.
pub fn q4q8_tiles2_side(
    isa: Isa,
    kind: Q4Kind,
    tiles: [&[TileQ4]; 2],
    xs: &[&[BlockQ8A]],
    out: &mut [TileOut; 2],
    side: Side,
) {
    debug_assert!(!xs.is_empty() && xs.len() <= TILE_XROWS && tiles[0].len() == tiles[1].len());
    q4q8_pair_from(isa, kind, tiles, xs, out, side, false)
}

/// [`q4q8_tiles2_side`] for tiles in cache already (an int4 LoRA A, which the base product
/// prefetched), as [`q8q8_tiles2_cached`]: the pair kernel from one row, no prefetch ahead.
pub fn q4q8_tiles2_cached(
    isa: Isa,
    kind: Q4Kind,
    tiles: [&[TileQ4]; 2],
    xs: &[&[BlockQ8A]],
    out: &mut [TileOut; 2],
) {
    q4q8_pair_from(isa, kind, tiles, xs, out, Side::NONE, true)
}

/// Both groups through the 512-bit pair kernel where it applies: from [`PAIR_MIN_ROWS`] rows,
/// or from one row for tiles in `cached`.
fn q4q8_pair_from(
    isa: Isa,
    kind: Q4Kind,
    tiles: [&[TileQ4]; 2],
    xs: &[&[BlockQ8A]],
    out: &mut [TileOut; 2],
    side: Side,
    cached: bool,
) {
    debug_assert!(!xs.is_empty() && xs.len() <= TILE_XROWS && tiles[0].len() == tiles[1].len());
    let [oa, ob] = out;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && (cached || xs.len() >= PAIR_MIN_ROWS) {
        // SAFETY: `Avx512Vnni` is only available with AVX-512 F, BW, VL and VNNI besides AVX2,
        // FMA and F16C.
        unsafe {
            crate::cpu::x86_512::q4q8_pair(
                kind == Q4Kind::ZeroPoint,
                tiles[0],
                tiles[1],
                xs,
                oa,
                ob,
                side,
                !cached,
            )
        };
        return;
    }
    let _ = cached;
    q4q8_tiles_side(isa, kind, tiles[0], xs, oa, side);
    q4q8_tiles_side(isa, kind, tiles[1], xs, ob, Side::NONE);
}

/// As [`q4q8_tiles2_side`] for a Q8_0 matrix.
pub fn q8q8_tiles2_side(
    isa: Isa,
    tiles: [&[TileQ8]; 2],
    xs: &[&[BlockQ8A]],
    out: &mut [TileOut; 2],
    side: Side,
) {
    q8q8_pair_from(isa, tiles, xs, out, side, false)
}

/// [`q8q8_tiles2_side`] for tiles that are in cache already (a LoRA A, which the base product
/// prefetched): the pair kernel from one row, as there is no memory stream to split, and no
/// prefetch of tiles ahead (a one-row shrink of rank 16 took about 260 ns before, 173 after).
pub fn q8q8_tiles2_cached(
    isa: Isa,
    tiles: [&[TileQ8]; 2],
    xs: &[&[BlockQ8A]],
    out: &mut [TileOut; 2],
) {
    q8q8_pair_from(isa, tiles, xs, out, Side::NONE, true)
}

/// Both groups through the 512-bit pair kernel where it applies: from [`PAIR_MIN_ROWS`] rows,
/// or from one row for tiles in `cached`.
fn q8q8_pair_from(
    isa: Isa,
    tiles: [&[TileQ8]; 2],
    xs: &[&[BlockQ8A]],
    out: &mut [TileOut; 2],
    side: Side,
    cached: bool,
) {
    debug_assert!(!xs.is_empty() && xs.len() <= TILE_XROWS && tiles[0].len() == tiles[1].len());
    let [oa, ob] = out;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && (cached || xs.len() >= PAIR_MIN_ROWS) {
        // SAFETY: as in `q4q8_tiles2_side`.
        unsafe { crate::cpu::x86_512::q8q8_pair(tiles[0], tiles[1], xs, oa, ob, side, !cached) };
        return;
    }
    let _ = cached;
    q8q8_tiles_side(isa, tiles[0], xs, oa, side);
    q8q8_tiles_side(isa, tiles[1], xs, ob, Side::NONE);
}

/// As [`q4q8_tiles`] for a Q8_0 matrix.
pub fn q8q8_tiles(isa: Isa, tiles: &[TileQ8], xs: &[&[BlockQ8A]], out: &mut TileOut) {
    q8q8_tiles_side(isa, tiles, xs, out, Side::NONE)
}

/// As [`q4q8_tiles_side`] for a Q8_0 matrix.
pub fn q8q8_tiles_side(
    isa: Isa,
    tiles: &[TileQ8],
    xs: &[&[BlockQ8A]],
    out: &mut TileOut,
    side: Side,
) {
    debug_assert!(!xs.is_empty() && xs.len() <= TILE_XROWS);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => by_fours(xs, out, side, |xs, out, side| {
            // SAFETY: `isa` came from `available_isas`, so the CPU has these features.
            unsafe { crate::cpu::x86::q8q8_tiles(isa == Isa::Avx512Vnni, tiles, xs, out, side) }
        }),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => by_fours(xs, out, side, |xs, out, side| {
            // SAFETY: `isa` came from `available_isas`, so the CPU has these features.
            unsafe { crate::cpu::arm::q8q8_tiles(isa == Isa::NeonDot, tiles, xs, out, side) }
        }),
        Isa::Scalar => {
            side.all();
            for (r, x) in xs.iter().enumerate() {
                for (i, o) in out[r].iter_mut().enumerate() {
                    let row: Vec<BlockQ8> = tiles.iter().map(|t| t.block(i)).collect();
                    *o = q8q8_dot_reference(&row, x);
                }
            }
        }
    }
}
