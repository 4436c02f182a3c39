//! x86-64 SIMD paths for the quantized dot products (AVX2 + FMA + F16C; AVX-512 VNNI's `vpdpbusd`
//! on 256-bit vectors where present). Each kernel takes one row group (eight rows, stored as
//! tiles) and up to four activation rows, and computes what the scalar reference in `qdot.rs`
//! computes, up to float summation order; tests compare them.
//!
//! Per tile: the eight scales and offsets convert with one instruction each; the codes are laid
//! out so that each 32-bit lane holds four columns of one row, so eight `dpbusd`s against
//! broadcast activation bytes leave the eight rows' integer sums in eight lanes, and the float
//! work (scale, offset) is one vector operation for all eight rows.

use std::arch::x86_64::*;

use crate::cpu::act::{BlockQ8A, U8_BIAS};
use crate::cpu::q4::{Q4Kind, TILE_ROWS, TileQ4};
use crate::cpu::q8::TileQ8;
use crate::cpu::qdot::{Side, ahead_tiles};

/// `acc + ` the sum of each lane's four unsigned-by-signed byte products.
#[inline]
#[target_feature(enable = "avx2")]
fn dpbusd_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
    )
}

#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
fn dpbusd_vnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

/// Activation bytes `4j .. 4j + 4` of a block, broadcast to every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
fn xbcast(xb: &BlockQ8A, j: usize) -> __m256i {
    let b = &xb.qs[4 * j..4 * j + 4];
    _mm256_set1_epi32(i32::from_le_bytes([
        b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8,
    ]))
}

macro_rules! q4_tiles_impl {
    ($name:ident, $feat:literal, $dp:ident, $fold:literal) => {
        /// `ZP`: zero-point tiles. With `$fold` (VNNI, whose `vpdpbusd` does not saturate) the
        /// zero point goes into the integer sums: each code goes in as the unsigned byte
        /// `c - z + 128` (shared by the rows) and each block's sum starts at the activation's
        /// `bias_sum = -128 * sum(q)`, so the sum is `Σ (c - z) q` and there is no float offset
        /// term (one FMA fewer per row and tile, on the pipes `vpdpbusd` uses).
        #[target_feature(enable = $feat)]
        fn $name<const R: usize, const ZP: bool>(
            tiles: &[TileQ4],
            xs: &[&[BlockQ8A]],
            out: &mut [[f32; TILE_ROWS]],
            side: Side,
        ) {
            let fold = ZP && $fold && R >= FOLD_MIN_ROWS;
            let xs: [&[BlockQ8A]; R] = std::array::from_fn(|r| &xs[r][..tiles.len()]);
            let m4 = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut offs = [_mm256_setzero_ps(); R];
            for (b, t) in tiles.iter().enumerate() {
                side.line(b, tiles.len());
                ahead_tiles(tiles, b, R);
                // SAFETY: `d` and `m` are 8 × u16 = 16 bytes; unaligned loads.
                let (draw, mraw) = unsafe {
                    (
                        _mm_loadu_si128(t.d.as_ptr() as *const __m128i),
                        _mm_loadu_si128(t.m.as_ptr() as *const __m128i),
                    )
                };
                let dvec = _mm256_cvtph_ps(draw);
                let (ovec, zb) = if fold {
                    (
                        _mm256_setzero_ps(),
                        zero_bias(_mm256_broadcastsi128_si256(mraw)),
                    )
                } else if ZP {
                    let z = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(mraw));
                    (
                        _mm256_mul_ps(z, _mm256_sub_ps(_mm256_setzero_ps(), dvec)),
                        _mm256_setzero_si256(),
                    )
                } else {
                    (_mm256_cvtph_ps(mraw), _mm256_setzero_si256())
                };
                // w[j]: columns 4j..4j+4 of the eight rows, one row per 32-bit lane.
                let mut w = [_mm256_setzero_si256(); 8];
                for g in 0..4 {
                    // SAFETY: `qs` is 128 bytes; bytes 32g..32g+32.
                    let v =
                        unsafe { _mm256_loadu_si256(t.qs.as_ptr().add(32 * g) as *const __m256i) };
                    w[g] = _mm256_and_si256(v, m4);
                    w[g + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                    if fold {
                        w[g] = _mm256_add_epi8(w[g], zb);
                        w[g + 4] = _mm256_add_epi8(w[g + 4], zb);
                    }
                }
                // One row's sums; unrolled by hand over constant indices so that the sums of
                // eight rows stay in registers (LLVM keeps a longer loop rolled, in memory).
                macro_rules! row {
                    ($r:literal) => {
                        if $r < R {
                            let xb = &xs[$r][b];
                            let mut s0 = if fold {
                                _mm256_set1_epi32(xb.bias_sum)
                            } else {
                                _mm256_setzero_si256()
                            };
                            let mut s1 = _mm256_setzero_si256();
                            for j in (0..8).step_by(2) {
                                s0 = $dp(s0, w[j], xbcast(xb, j));
                                s1 = $dp(s1, w[j + 1], xbcast(xb, j + 1));
                            }
                            let s = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                            let dx = _mm256_set1_ps(xb.d);
                            acc[$r] = _mm256_fmadd_ps(s, _mm256_mul_ps(dvec, dx), acc[$r]);
                            if !fold {
                                offs[$r] = _mm256_fmadd_ps(ovec, _mm256_set1_ps(xb.s), offs[$r]);
                            }
                        }
                    };
                }
                row!(0);
                row!(1);
                row!(2);
                row!(3);
                row!(4);
                row!(5);
                row!(6);
                row!(7);
            }
            for r in 0..R {
                let v = if fold {
                    acc[r]
                } else {
                    _mm256_add_ps(acc[r], offs[r])
                };
                // SAFETY: `out[r]` is 8 f32; unaligned store.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), v) };
            }
        }
    };
}

/// Activation rows from which the VNNI kernels fold zero points into the integer sums: the fold
/// adds eight byte additions per tile to save one FMA per row and tile, a loss for one or two
/// rows (batch-1 decode, where it cost about a tenth of the step).
pub(crate) const FOLD_MIN_ROWS: usize = 3;

/// `128 - z` in every byte of 32-bit lane `i`, from the eight u16 zero points `z` of a tile in
/// both 128-bit halves of `m` (each at most [`crate::cpu::q4::MAX_ZERO_POINT`]).
#[inline]
#[target_feature(enable = "avx2")]
fn zero_bias(m: __m256i) -> __m256i {
    // Byte 2i of the zero points (their low bytes) into the four bytes of lane i.
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6, 8, 8, 8, 8, 10, 10, 10, 10, 12, 12, 12, 12,
        14, 14, 14, 14,
    );
    _mm256_sub_epi8(
        _mm256_set1_epi8(U8_BIAS as u8 as i8),
        _mm256_shuffle_epi8(m, spread),
    )
}

macro_rules! q8_tiles_impl {
    ($name:ident, $feat:literal, $dp:ident) => {
        #[target_feature(enable = $feat)]
        fn $name<const R: usize>(
            tiles: &[TileQ8],
            xs: &[&[BlockQ8A]],
            out: &mut [[f32; TILE_ROWS]],
            side: Side,
        ) {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, t) in tiles.iter().enumerate() {
                side.line(b, tiles.len());
                ahead_tiles(tiles, b, R);
                // SAFETY: `d` is 16 bytes; unaligned load.
                let dvec =
                    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(t.d.as_ptr() as *const __m128i) });
                let mut w = [_mm256_setzero_si256(); 8];
                let mut aw = [_mm256_setzero_si256(); 8];
                for j in 0..8 {
                    // SAFETY: `qs` is 256 bytes; bytes 32j..32j+32.
                    w[j] =
                        unsafe { _mm256_loadu_si256(t.qs.as_ptr().add(32 * j) as *const __m256i) };
                    // |w| as unsigned; x takes w's sign, so every product keeps its sign.
                    aw[j] = _mm256_sign_epi8(w[j], w[j]);
                }
                for r in 0..R {
                    let xb = &xs[r][b];
                    let mut s0 = _mm256_setzero_si256();
                    let mut s1 = _mm256_setzero_si256();
                    for j in (0..8).step_by(2) {
                        s0 = $dp(s0, aw[j], _mm256_sign_epi8(xbcast(xb, j), w[j]));
                        s1 = $dp(s1, aw[j + 1], _mm256_sign_epi8(xbcast(xb, j + 1), w[j + 1]));
                    }
                    let s = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                    acc[r] = _mm256_fmadd_ps(s, _mm256_mul_ps(dvec, _mm256_set1_ps(xb.d)), acc[r]);
                }
            }
            for r in 0..R {
                // SAFETY: `out[r]` is 8 f32; unaligned store.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
            }
        }
    };
}

/// [`q8_avx2`] on AVX-512 VNNI, without the sign trick: `vpdpbusd` sums four products into 32
/// bits without saturating, so the weights go in as unsigned bytes `u = w + 128` (one XOR per
/// weight vector, shared by the rows) and each block's sum starts at the activation's
/// `bias_sum = -128 * sum(q)`: `sum(w q) = bias_sum + sum(u q)`. That drops the two sign
/// operations per weight vector and row that AVX2's saturating `maddubs` needs.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn q8_vnni<const R: usize>(
    tiles: &[TileQ8],
    xs: &[&[BlockQ8A]],
    out: &mut [[f32; TILE_ROWS]],
    side: Side,
) {
    let bias = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, t) in tiles.iter().enumerate() {
        side.line(b, tiles.len());
        ahead_tiles(tiles, b, R);
        // SAFETY: `d` is 16 bytes; unaligned load.
        let dvec = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(t.d.as_ptr() as *const __m128i) });
        let mut u = [_mm256_setzero_si256(); 8];
        for (j, uj) in u.iter_mut().enumerate() {
            // SAFETY: `qs` is 256 bytes; bytes 32j..32j+32.
            let w = unsafe { _mm256_loadu_si256(t.qs.as_ptr().add(32 * j) as *const __m256i) };
            *uj = _mm256_xor_si256(w, bias);
        }
        for r in 0..R {
            let xb = &xs[r][b];
            let mut s0 = _mm256_set1_epi32(xb.bias_sum);
            let mut s1 = _mm256_setzero_si256();
            for j in (0..8).step_by(2) {
                s0 = _mm256_dpbusd_epi32(s0, u[j], xbcast(xb, j));
                s1 = _mm256_dpbusd_epi32(s1, u[j + 1], xbcast(xb, j + 1));
            }
            let s = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
            acc[r] = _mm256_fmadd_ps(s, _mm256_mul_ps(dvec, _mm256_set1_ps(xb.d)), acc[r]);
        }
    }
    for r in 0..R {
        // SAFETY: `out[r]` is 8 f32; unaligned store.
        unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
}

/// The LoRA expand over the groups of `data` (see [`lora_axpy`]), each group's integer sum
/// starting at `start` and taking step `j` (32 code bytes `w`: a chunk, or one nibble of each of
/// its bytes under `nib`; four `t` codes `x` in every lane) as `dot(acc, w, x)`. The usual ranks
/// (8, 16, 32) get their step count as a constant, so the
/// broadcasts of `t` stay in registers across groups and the chunk loop unrolls (a rank-16
/// expand: 6.4 cycles per group of eight outputs before, 4.7 after, on Zen 4).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lora_axpy_with(
    data: &[u8],
    stride: usize,
    chunks: usize,
    t: &[i8],
    scale: f32,
    out: &mut [f32],
    nib: bool,
    start: __m256i,
    dot: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
) {
    let groups = out.len() / 8;
    // Four codes per lane and step: a chunk's bytes (int8), or a chunk's low, then high nibbles.
    let steps = if nib { 2 * chunks } else { chunks };
    assert!(
        data.len() >= groups * stride && stride >= 16 + 32 * chunks && t.len() >= 4 * steps,
        "LoRA B layout"
    );
    // SAFETY (every `unsafe` below): the callers are compiled for AVX2, FMA and F16C; group gi
    // starts at gi * stride in `data` (asserted above) with eight f16 scales (16 bytes), then
    // chunk c's 32 bytes at 16 + 32c < stride; `t` has 4 * steps codes.
    let tv = |j: usize| unsafe {
        _mm256_set1_epi32((t.as_ptr().add(4 * j) as *const i32).read_unaligned())
    };
    let w = |base: *const u8, j: usize| unsafe {
        if nib {
            let v = _mm256_loadu_si256(base.add(16 + 32 * (j / 2)) as *const __m256i);
            let v = if j.is_multiple_of(2) {
                v
            } else {
                _mm256_srli_epi16(v, 4)
            };
            _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
        } else {
            _mm256_loadu_si256(base.add(16 + 32 * j) as *const __m256i)
        }
    };
    match steps {
        2 => lora_groups(data, stride, scale, out, unrolled::<2>(start, tv, w, &dot)),
        4 => lora_groups(data, stride, scale, out, unrolled::<4>(start, tv, w, &dot)),
        8 => lora_groups(data, stride, scale, out, unrolled::<8>(start, tv, w, &dot)),
        _ => lora_groups(data, stride, scale, out, |base| {
            two_chains(start, steps, &dot, |j| (w(base, j), tv(j)))
        }),
    }
}

/// A group's integer sum over `C` chunks, `t`'s broadcasts made once (kept in registers).
#[inline(always)]
fn unrolled<const C: usize>(
    start: __m256i,
    tv: impl Fn(usize) -> __m256i,
    w: impl Fn(*const u8, usize) -> __m256i,
    dot: &impl Fn(__m256i, __m256i, __m256i) -> __m256i,
) -> impl Fn(*const u8) -> __m256i {
    let tv: [__m256i; C] = std::array::from_fn(tv);
    move |base| two_chains(start, C, dot, |j| (w(base, j), tv[j]))
}

/// `dot` over chunks `0..n` (`wx(j)`: chunk j's codes and `t` broadcast) in two alternating
/// chains, the first from `start`, then their sum.
#[inline(always)]
fn two_chains(
    start: __m256i,
    n: usize,
    dot: &impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    wx: impl Fn(usize) -> (__m256i, __m256i),
) -> __m256i {
    // SAFETY: the callers are compiled for AVX2 (`lora_axpy_with`).
    unsafe {
        let (mut a0, mut a1) = (start, _mm256_setzero_si256());
        for j in 0..n {
            let (w, x) = wx(j);
            a0 = dot(a0, w, x);
            std::mem::swap(&mut a0, &mut a1);
        }
        _mm256_add_epi32(a0, a1)
    }
}

/// `out[8gi + i] += scale * d[i] * sum(group gi)[i]` over the groups of `data`.
#[inline(always)]
fn lora_groups(
    data: &[u8],
    stride: usize,
    scale: f32,
    out: &mut [f32],
    sum: impl Fn(*const u8) -> __m256i,
) {
    // SAFETY: as in `lora_axpy_with`, which checked the layout; 8gi + 8 <= out.len(), unaligned
    // loads and stores.
    unsafe {
        let s = _mm256_set1_ps(scale);
        for gi in 0..out.len() / 8 {
            let base = data.as_ptr().add(gi * stride);
            let dvec = _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i));
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(sum(base)), _mm256_mul_ps(dvec, s));
            let o = out.as_mut_ptr().add(8 * gi);
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), v));
        }
    }
}

/// The LoRA expand's micro-kernel on AVX2: `maddubs` saturates, so the signed codes go in
/// through the sign trick.
#[target_feature(enable = "avx2,fma,f16c")]
fn lora_axpy_avx2(
    data: &[u8],
    stride: usize,
    chunks: usize,
    t: &[i8],
    scale: f32,
    out: &mut [f32],
) {
    let dot = |a, w, x| dpbusd_avx2(a, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    let z = _mm256_setzero_si256();
    lora_axpy_with(data, stride, chunks, t, scale, out, false, z, dot)
}

/// The int4 expand: the nibbles `code + 8` are unsigned bytes already, so `maddubs` takes them
/// as they are (15 * 127 * 2 cannot saturate) and each sum starts at `-8 * sum(t)`.
#[target_feature(enable = "avx2,fma,f16c")]
fn lora_axpy4_avx2(
    data: &[u8],
    stride: usize,
    chunks: usize,
    t: &[i8],
    scale: f32,
    out: &mut [f32],
) {
    let start = _mm256_set1_epi32(-8 * t_sum(t, 8 * chunks));
    let dot = |a, w, x| dpbusd_avx2(a, w, x);
    lora_axpy_with(data, stride, chunks, t, scale, out, true, start, dot)
}

/// [`lora_axpy4_avx2`] on AVX-512 VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn lora_axpy4_vnni(
    data: &[u8],
    stride: usize,
    chunks: usize,
    t: &[i8],
    scale: f32,
    out: &mut [f32],
) {
    let start = _mm256_set1_epi32(-8 * t_sum(t, 8 * chunks));
    let dot = |a, w, x| _mm256_dpbusd_epi32(a, w, x);
    lora_axpy_with(data, stride, chunks, t, scale, out, true, start, dot)
}

/// The sum of `t[..n]` (the codes the expand reads).
fn t_sum(t: &[i8], n: usize) -> i32 {
    t[..n].iter().map(|&v| v as i32).sum()
}

/// [`lora_axpy_avx2`] on AVX-512 VNNI without the sign trick, as `q8_vnni`: the codes go in as
/// unsigned bytes `w + 128` and each group's sum starts at `-128 * sum(t)`, so a chunk costs
/// one XOR instead of two sign operations; the integer sums, and so the results, are the same.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn lora_axpy_vnni(
    data: &[u8],
    stride: usize,
    chunks: usize,
    t: &[i8],
    scale: f32,
    out: &mut [f32],
) {
    let bias = _mm256_set1_epi8(-128);
    let start = _mm256_set1_epi32(-U8_BIAS * t_sum(t, 4 * chunks));
    let dot = |a, w, x| _mm256_dpbusd_epi32(a, _mm256_xor_si256(w, bias), x);
    lora_axpy_with(data, stride, chunks, t, scale, out, false, start, dot)
}

/// The LoRA expand over consecutive groups of a `LoraB` (`data`, `stride` bytes per group):
/// `out[8g + i] += scale * d[i] * dot(codes of row i, t)`.
///
/// # Safety
/// As [`q4q8_tiles`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn lora_axpy(
    vnni: bool,
    nib: bool,
    data: &[u8],
    stride: usize,
    chunks: usize,
    t: &[i8],
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        match (vnni, nib) {
            (true, false) => lora_axpy_vnni(data, stride, chunks, t, scale, out),
            (false, false) => lora_axpy_avx2(data, stride, chunks, t, scale, out),
            (true, true) => lora_axpy4_vnni(data, stride, chunks, t, scale, out),
            (false, true) => lora_axpy4_avx2(data, stride, chunks, t, scale, out),
        }
    }
}

/// Columns `ks` of an INT4 row group (`tiles`, one per 32 columns), dequantized as
/// `(code - z) * d` or `d * code + m`, one `[f32; 8]` per column: one load and shift per column
/// (each 32-bit lane of the tile holds four columns of one row).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q4_columns(kind: Q4Kind, tiles: &[TileQ4], ks: &[u32], out: &mut Vec<[f32; 8]>) {
    out.clear();
    let m4 = _mm256_set1_epi32(0x0F);
    for &k in ks {
        let (b, c) = (k as usize / 32, k as usize % 32);
        let t = &tiles[b];
        let q = c % 16;
        // SAFETY: `qs` is 128 bytes; bytes 32(q/4) .. +32. `d` and `m` are 16 bytes.
        let (v, draw, mraw) = unsafe {
            (
                _mm256_loadu_si256(t.qs.as_ptr().add((q / 4) * 32) as *const __m256i),
                _mm_loadu_si128(t.d.as_ptr() as *const __m128i),
                _mm_loadu_si128(t.m.as_ptr() as *const __m128i),
            )
        };
        let shift = _mm_cvtsi32_si128((8 * (q % 4) + if c < 16 { 0 } else { 4 }) as i32);
        let codes = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(v, shift), m4));
        let d = _mm256_cvtph_ps(draw);
        let col = match kind {
            Q4Kind::ZeroPoint => _mm256_mul_ps(
                _mm256_sub_ps(codes, _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(mraw))),
                d,
            ),
            Q4Kind::Affine => _mm256_add_ps(_mm256_mul_ps(d, codes), _mm256_cvtph_ps(mraw)),
        };
        let mut o = [0f32; 8];
        // SAFETY: `o` is 8 f32; unaligned store.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), col) };
        out.push(o);
    }
}

/// As [`q4_columns`] for a Q8_0 row group: `code * d`.
///
/// # Safety
/// As [`q4_columns`].
#[target_feature(enable = "avx2,fma,f16c")]
pub fn q8_columns(tiles: &[TileQ8], ks: &[u32], out: &mut Vec<[f32; 8]>) {
    out.clear();
    for &k in ks {
        let (b, c) = (k as usize / 32, k as usize % 32);
        let t = &tiles[b];
        // SAFETY: `qs` is 256 bytes; bytes 32(c/4) .. +32. `d` is 16 bytes.
        let (v, draw) = unsafe {
            (
                _mm256_loadu_si256(t.qs.as_ptr().add((c / 4) * 32) as *const __m256i),
                _mm_loadu_si128(t.d.as_ptr() as *const __m128i),
            )
        };
        // Byte c % 4 of each lane to the top, then an arithmetic shift sign-extends it.
        let up = _mm256_sll_epi32(v, _mm_cvtsi32_si128((24 - 8 * (c % 4)) as i32));
        let codes = _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(up));
        let col = _mm256_mul_ps(codes, _mm256_cvtph_ps(draw));
        let mut o = [0f32; 8];
        // SAFETY: `o` is 8 f32; unaligned store.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), col) };
        out.push(o);
    }
}

q4_tiles_impl!(q4_avx2, "avx2,fma,f16c", dpbusd_avx2, false);
q4_tiles_impl!(
    q4_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dpbusd_vnni,
    true
);
q8_tiles_impl!(q8_avx2, "avx2,fma,f16c", dpbusd_avx2);

/// # Safety
/// The CPU must support AVX2, FMA and F16C, and AVX-512 VNNI + VL when `vnni`. Up to eight
/// activation rows with `vnni`, up to four without.
pub unsafe fn q4q8_tiles(
    vnni: bool,
    kind: Q4Kind,
    tiles: &[TileQ4],
    xs: &[&[BlockQ8A]],
    out: &mut [[f32; TILE_ROWS]],
    side: Side,
) {
    debug_assert!(xs.iter().all(|x| x.len() >= tiles.len()));
    let zp = kind == Q4Kind::ZeroPoint;
    macro_rules! go {
        ($f:ident, $r:literal) => {
            if zp {
                $f::<$r, true>(tiles, xs, out, side)
            } else {
                $f::<$r, false>(tiles, xs, out, side)
            }
        };
    }
    // SAFETY: the caller guarantees the features.
    unsafe {
        match (vnni, xs.len()) {
            (false, 1) => go!(q4_avx2, 1),
            (false, 2) => go!(q4_avx2, 2),
            (false, 3) => go!(q4_avx2, 3),
            (false, _) => go!(q4_avx2, 4),
            (true, 1) => go!(q4_vnni, 1),
            (true, 2) => go!(q4_vnni, 2),
            (true, 3) => go!(q4_vnni, 3),
            (true, 4) => go!(q4_vnni, 4),
            (true, 5) => go!(q4_vnni, 5),
            (true, 6) => go!(q4_vnni, 6),
            (true, 7) => go!(q4_vnni, 7),
            (true, _) => go!(q4_vnni, 8),
        }
    }
}

/// # Safety
/// As [`q4q8_tiles`].
pub unsafe fn q8q8_tiles(
    vnni: bool,
    tiles: &[TileQ8],
    xs: &[&[BlockQ8A]],
    out: &mut [[f32; TILE_ROWS]],
    side: Side,
) {
    debug_assert!(xs.iter().all(|x| x.len() >= tiles.len()));
    // SAFETY: the caller guarantees the features.
    unsafe {
        match (vnni, xs.len()) {
            (false, 1) => q8_avx2::<1>(tiles, xs, out, side),
            (false, 2) => q8_avx2::<2>(tiles, xs, out, side),
            (false, 3) => q8_avx2::<3>(tiles, xs, out, side),
            (false, _) => q8_avx2::<4>(tiles, xs, out, side),
            (true, 1) => q8_vnni::<1>(tiles, xs, out, side),
            (true, 2) => q8_vnni::<2>(tiles, xs, out, side),
            (true, 3) => q8_vnni::<3>(tiles, xs, out, side),
            (true, _) => q8_vnni::<4>(tiles, xs, out, side),
        }
    }
}
