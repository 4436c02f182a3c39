//! AVX-512 kernels over two row groups at once: the tiles of groups `g` and `g + 1` side by side
//! in one 512-bit vector (sixteen weight rows, one per 32-bit lane), against up to eight
//! activation rows. They compute what the 256-bit VNNI kernels in `x86.rs` compute, lane for
//! lane and in the same order, so the results are the same bits; tests compare them.
//!
//! Why: on Zen 4 the 256-bit kernels issue one broadcast load of four activation bytes per
//! `vpdpbusd` and run at about 7 cycles per activation row and tile, where the two pipes that
//! execute `vpdpbusd` and the float multiplies allow 5. A 512-bit `vpdpbusd` costs those pipes
//! what two 256-bit ones do, but its broadcast serves sixteen rows, so the loads per product
//! halve and the kernel reaches the pipes' bound (measured in a standalone loop: 5.0 cycles per
//! row and tile at eight activation rows, against 7.0 for the 256-bit form).
//!
//! They run from `qdot::PAIR_MIN_ROWS` activation rows: with fewer the product is bound by
//! memory, where reading two groups' tiles side by side (two streams) was slower than one group
//! after the other. They prefetch both groups' tiles `qdot::AHEAD_TILES` ahead and on into the
//! next pair (but not tiles already in cache, such as a LoRA A).

use std::arch::x86_64::*;

use crate::cpu::act::{BlockQ8A, U8_BIAS};
use crate::cpu::q4::{TILE_ROWS, TileQ4};
use crate::cpu::q8::TileQ8;
use crate::cpu::qdot::{AHEAD_TILES, Side, prefetch_lines};
use crate::cpu::x86::FOLD_MIN_ROWS;

/// Activation bytes `4j .. 4j + 4` of a block, broadcast to every 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn xbcast(xb: &BlockQ8A, j: usize) -> __m512i {
    let b = &xb.qs[4 * j..4 * j + 4];
    _mm512_set1_epi32(i32::from_le_bytes([
        b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8,
    ]))
}

/// One activation block against a tile pair's weight vectors (`w[j]`: columns `4j .. 4j + 4`
/// of the sixteen rows as unsigned bytes), from `start`, as floats: the same two chains and
/// order as the 256-bit kernels, so the same sums.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn block_sums(w: &[__m512i; 8], xb: &BlockQ8A, start: __m512i) -> __m512 {
    let (mut s0, mut s1) = (start, _mm512_setzero_si512());
    for j in (0..8).step_by(2) {
        s0 = _mm512_dpbusd_epi32(s0, w[j], xbcast(xb, j));
        s1 = _mm512_dpbusd_epi32(s1, w[j + 1], xbcast(xb, j + 1));
    }
    _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1))
}

/// Sixteen bytes at `a` in the low half, sixteen at `b` in the high half.
///
/// # Safety
/// Both must be readable for 16 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pair128(a: *const u16, b: *const u16) -> __m256i {
    // SAFETY: the caller's.
    unsafe { _mm256_loadu2_m128i(b as *const __m128i, a as *const __m128i) }
}

/// Thirty-two bytes at `a` in the low half, thirty-two at `b` in the high half.
///
/// # Safety
/// Both must be readable for 32 bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pair256<T>(a: *const T, b: *const T) -> __m512i {
    // SAFETY: the caller's.
    unsafe {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(a as *const __m256i)),
            _mm256_loadu_si256(b as *const __m256i),
        )
    }
}

/// Lanes 0..8 of `v` into `lo`, lanes 8..16 into `hi`.
#[inline]
#[target_feature(enable = "avx512f")]
fn store_halves(v: __m512, lo: &mut [f32; TILE_ROWS], hi: &mut [f32; TILE_ROWS]) {
    let h = _mm256_castsi256_ps(_mm512_extracti64x4_epi64::<1>(_mm512_castps_si512(v)));
    // SAFETY: eight f32 each; unaligned stores.
    unsafe {
        _mm256_storeu_ps(lo.as_mut_ptr(), _mm512_castps512_ps256(v));
        _mm256_storeu_ps(hi.as_mut_ptr(), h);
    }
}

/// Prefetches the lines of tile `b + AHEAD_TILES` of both groups (two streams at once, which the
/// hardware prefetcher alone followed at about half the bandwidth of one). Past the groups' last
/// tile it goes on into the two groups that lie after them in memory: in a matrix those are the
/// next pair, which the same program computes next (its share is a run of pairs), so that a
/// pair's first tiles are in cache when it starts instead of waiting on memory. Against eight
/// tiles ahead within the pair only, decode steps of SmolLM2 took 24%, 14% and 9% less time at
/// batch 4, 8 and 16, alternated step by step in one process.
#[inline(always)]
fn ahead<T>(ta: &[T], tb: &[T], b: usize) {
    let (n, i) = (ta.len(), b + AHEAD_TILES);
    // Tile pointers, not references: past the end they point outside both slices.
    let (pa, pb) = if i < n {
        (ta.as_ptr().wrapping_add(i), tb.as_ptr().wrapping_add(i))
    } else {
        // Group g + 2 starts where g + 1 (`tb`) ends, and g + 3 one group later.
        (tb.as_ptr().wrapping_add(i), tb.as_ptr().wrapping_add(n + i))
    };
    prefetch_lines(pa);
    prefetch_lines(pb);
}

/// Unrolls `$body` over the constant row indices `0..8`, each under `if $r < R`, so that the
/// per-row sums stay in registers (LLVM keeps a loop this long rolled, its arrays in memory).
macro_rules! rows8 {
    ($r:ident, $body:block) => {
        rows8!(@ $r, $body, 0, 1, 2, 3, 4, 5, 6, 7)
    };
    (@ $r:ident, $body:block, $($i:literal),*) => {
        $({
            #[allow(non_upper_case_globals)]
            const $r: usize = $i;
            if $r < R $body
        })*
    };
}

/// INT4 tiles of two row groups against `R` activation rows; `ZP`: zero-point tiles, from
/// `FOLD_MIN_ROWS` rows with their zero point folded into the integer sums as in `x86.rs`
/// (`c - z + 128` against `bias_sum`), below that as a float offset, as there; with `AHEAD`,
/// prefetching the tiles ahead (not for tiles in cache, such as an int4 LoRA A).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
fn q4_pair<const R: usize, const ZP: bool, const AHEAD: bool>(
    ta: &[TileQ4],
    tb: &[TileQ4],
    xs: &[&[BlockQ8A]],
    oa: &mut [[f32; TILE_ROWS]],
    ob: &mut [[f32; TILE_ROWS]],
    side: Side,
) {
    let n = ta.len();
    assert!(tb.len() == n && xs.len() >= R && oa.len() >= R && ob.len() >= R);
    let fold = ZP && R >= FOLD_MIN_ROWS;
    let xs: [&[BlockQ8A]; R] = std::array::from_fn(|r| &xs[r][..n]);
    let m4 = _mm512_set1_epi8(0x0F);
    // Byte 0 of each 32-bit lane (the zero point) into all four of its bytes: shuffle
    // indices 0, 4, 8, 12 (within each 128-bit lane), four times each.
    let spread = _mm512_set4_epi32(0x0C0C_0C0C, 0x0808_0808, 0x0404_0404, 0);
    let bias = _mm512_set1_epi8(U8_BIAS as u8 as i8);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut offs = [_mm512_setzero_ps(); R];
    for b in 0..n {
        side.line(b, n);
        if AHEAD {
            ahead(ta, tb, b);
        }
        let (a, t) = (&ta[b], &tb[b]);
        // SAFETY: `d` and `m` are 8 × u16 = 16 bytes each.
        let (draw, mraw) = unsafe {
            (
                pair128(a.d.as_ptr(), t.d.as_ptr()),
                pair128(a.m.as_ptr(), t.m.as_ptr()),
            )
        };
        let dvec = _mm512_cvtph_ps(draw);
        let (ovec, zb) = if fold {
            let z = _mm512_shuffle_epi8(_mm512_cvtepu16_epi32(mraw), spread);
            (_mm512_setzero_ps(), _mm512_sub_epi8(bias, z))
        } else if ZP {
            let z = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(mraw));
            let o = _mm512_mul_ps(z, _mm512_sub_ps(_mm512_setzero_ps(), dvec));
            (o, _mm512_setzero_si512())
        } else {
            (_mm512_cvtph_ps(mraw), _mm512_setzero_si512())
        };
        // w[j]: columns 4j..4j+4 of the sixteen rows, one row per 32-bit lane.
        let mut w = [_mm512_setzero_si512(); 8];
        for g in 0..4 {
            // SAFETY: `qs` is 128 bytes; bytes 32g..32g+32 of each tile.
            let v = unsafe { pair256(a.qs.as_ptr().add(32 * g), t.qs.as_ptr().add(32 * g)) };
            w[g] = _mm512_and_si512(v, m4);
            w[g + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
            if fold {
                w[g] = _mm512_add_epi8(w[g], zb);
                w[g + 4] = _mm512_add_epi8(w[g + 4], zb);
            }
        }
        rows8!(r, {
            let xb = &xs[r][b];
            let start = if fold {
                _mm512_set1_epi32(xb.bias_sum)
            } else {
                _mm512_setzero_si512()
            };
            let s = block_sums(&w, xb, start);
            let dx = _mm512_set1_ps(xb.d);
            acc[r] = _mm512_fmadd_ps(s, _mm512_mul_ps(dvec, dx), acc[r]);
            if !fold {
                offs[r] = _mm512_fmadd_ps(ovec, _mm512_set1_ps(xb.s), offs[r]);
            }
        });
    }
    for r in 0..R {
        let v = if fold {
            acc[r]
        } else {
            _mm512_add_ps(acc[r], offs[r])
        };
        store_halves(v, &mut oa[r], &mut ob[r]);
    }
}

/// Q8_0 tiles of two row groups against `R` activation rows: `u = w + 128` against `bias_sum`,
/// as `q8_vnni` in `x86.rs`; with `AHEAD`, prefetching the tiles ahead (not for tiles in cache).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
fn q8_pair<const R: usize, const AHEAD: bool>(
    ta: &[TileQ8],
    tb: &[TileQ8],
    xs: &[&[BlockQ8A]],
    oa: &mut [[f32; TILE_ROWS]],
    ob: &mut [[f32; TILE_ROWS]],
    side: Side,
) {
    let n = ta.len();
    assert!(tb.len() == n && xs.len() >= R && oa.len() >= R && ob.len() >= R);
    let xs: [&[BlockQ8A]; R] = std::array::from_fn(|r| &xs[r][..n]);
    let bias = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..n {
        side.line(b, n);
        if AHEAD {
            ahead(ta, tb, b);
        }
        let (a, t) = (&ta[b], &tb[b]);
        // SAFETY: `d` is 8 × u16 = 16 bytes.
        let dvec = _mm512_cvtph_ps(unsafe { pair128(a.d.as_ptr(), t.d.as_ptr()) });
        let mut u = [_mm512_setzero_si512(); 8];
        for (j, uj) in u.iter_mut().enumerate() {
            // SAFETY: `qs` is 256 bytes; bytes 32j..32j+32 of each tile.
            let w = unsafe { pair256(a.qs.as_ptr().add(32 * j), t.qs.as_ptr().add(32 * j)) };
            *uj = _mm512_xor_si512(w, bias);
        }
        rows8!(r, {
            let xb = &xs[r][b];
            let s = block_sums(&u, xb, _mm512_set1_epi32(xb.bias_sum));
            let dx = _mm512_set1_ps(xb.d);
            acc[r] = _mm512_fmadd_ps(s, _mm512_mul_ps(dvec, dx), acc[r]);
        });
    }
    for r in 0..R {
        store_halves(acc[r], &mut oa[r], &mut ob[r]);
    }
}

/// Dispatches on the number of activation rows (1..=8).
macro_rules! by_rows {
    ($n:expr, $f:ident $(::<$($c:literal),+>)?, $($arg:expr),*) => {
        match $n {
            1 => $f::<1 $($(, $c)+)?>($($arg),*),
            2 => $f::<2 $($(, $c)+)?>($($arg),*),
            3 => $f::<3 $($(, $c)+)?>($($arg),*),
            4 => $f::<4 $($(, $c)+)?>($($arg),*),
            5 => $f::<5 $($(, $c)+)?>($($arg),*),
            6 => $f::<6 $($(, $c)+)?>($($arg),*),
            7 => $f::<7 $($(, $c)+)?>($($arg),*),
            8 => $f::<8 $($(, $c)+)?>($($arg),*),
            n => panic!("{n} activation rows: the pair kernels take 1 to 8"),
        }
    };
}

/// Two consecutive INT4 row groups (`ta`, `tb`) against 1 to 8 activation rows, into `oa`, `ob`;
/// `ahead`: prefetch the tiles ahead of the one being read.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI.
#[allow(clippy::too_many_arguments)]
pub unsafe fn q4q8_pair(
    zero_point: bool,
    ta: &[TileQ4],
    tb: &[TileQ4],
    xs: &[&[BlockQ8A]],
    oa: &mut [[f32; TILE_ROWS]],
    ob: &mut [[f32; TILE_ROWS]],
    side: Side,
    ahead: bool,
) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        match (zero_point, ahead) {
            (true, true) => by_rows!(xs.len(), q4_pair::<true, true>, ta, tb, xs, oa, ob, side),
            (false, true) => by_rows!(xs.len(), q4_pair::<false, true>, ta, tb, xs, oa, ob, side),
            (true, false) => by_rows!(xs.len(), q4_pair::<true, false>, ta, tb, xs, oa, ob, side),
            (false, false) => {
                by_rows!(xs.len(), q4_pair::<false, false>, ta, tb, xs, oa, ob, side)
            }
        }
    }
}

/// As [`q4q8_pair`] for Q8_0 row groups; `ahead`: prefetch the tiles ahead of the one being
/// read (the tiles are streamed from memory, not already in cache).
///
/// # Safety
/// As [`q4q8_pair`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn q8q8_pair(
    ta: &[TileQ8],
    tb: &[TileQ8],
    xs: &[&[BlockQ8A]],
    oa: &mut [[f32; TILE_ROWS]],
    ob: &mut [[f32; TILE_ROWS]],
    side: Side,
    ahead: bool,
) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        if ahead {
            by_rows!(xs.len(), q8_pair::<true>, ta, tb, xs, oa, ob, side)
        } else {
            by_rows!(xs.len(), q8_pair::<false>, ta, tb, xs, oa, ob, side)
        }
    }
}
