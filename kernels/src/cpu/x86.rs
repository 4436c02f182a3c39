//! x86-64 SIMD paths for the quantized dot products (AVX2 + FMA + F16C; AVX-512 VNNI's `vpdpbusd`
//! on 256-bit vectors where present). Each kernel takes one row group (eight rows, stored as
//! tiles) and up to four activation rows, and computes what the scalar reference in `qdot.rs`
//! computes, up to float summation order; tests compare them.
//!
//! Per tile: the eight scales and offsets convert with one instruction each, the eight rows'
//! integer dot products are reduced to one vector of eight sums with a `hadd` tree, and the
//! float work (scale, offset) is one vector operation for all eight rows.

use std::arch::x86_64::*;

use crate::cpu::act::BlockQ8A;
use crate::cpu::q4::{Q4Kind, TILE_ROWS, TileQ4};
use crate::cpu::q8::TileQ8;
use crate::cpu::qdot::TileOut;

/// Sum of unsigned-by-signed byte products in 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn dot_u8i8_avx2(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
fn dot_u8i8_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

/// Eight vectors of eight i32 lanes → one vector of their eight lane sums.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8(p: &[__m256i; TILE_ROWS]) -> __m256i {
    let t0 = _mm256_hadd_epi32(p[0], p[1]);
    let t1 = _mm256_hadd_epi32(p[2], p[3]);
    let t2 = _mm256_hadd_epi32(p[4], p[5]);
    let t3 = _mm256_hadd_epi32(p[6], p[7]);
    let u0 = _mm256_hadd_epi32(t0, t1);
    let u1 = _mm256_hadd_epi32(t2, t3);
    let lo = _mm256_permute2x128_si256::<0x20>(u0, u1);
    let hi = _mm256_permute2x128_si256::<0x31>(u0, u1);
    _mm256_add_epi32(lo, hi)
}

macro_rules! q4_tiles_impl {
    ($name:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        fn $name<const R: usize>(
            kind: Q4Kind,
            tiles: &[TileQ4],
            xs: &[&[BlockQ8A]],
            out: &mut TileOut,
        ) {
            let m4 = _mm_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut offs = [_mm256_setzero_ps(); R];
            for (b, t) in tiles.iter().enumerate() {
                // SAFETY: `d` and `m` are 8 × u16 = 16 bytes; unaligned loads.
                let (draw, mraw) = unsafe {
                    (
                        _mm_loadu_si128(t.d.as_ptr() as *const __m128i),
                        _mm_loadu_si128(t.m.as_ptr() as *const __m128i),
                    )
                };
                let dvec = _mm256_cvtph_ps(draw);
                let ovec = match kind {
                    Q4Kind::Affine => _mm256_cvtph_ps(mraw),
                    Q4Kind::ZeroPoint => _mm256_mul_ps(
                        _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(mraw)),
                        _mm256_sub_ps(_mm256_setzero_ps(), dvec),
                    ),
                };
                let mut w = [_mm256_setzero_si256(); TILE_ROWS];
                for (wi, q) in w.iter_mut().zip(&t.qs) {
                    // SAFETY: each row's `qs` is 16 bytes; unaligned load.
                    let qs = unsafe { _mm_loadu_si128(q.as_ptr() as *const __m128i) };
                    let lo = _mm_and_si128(qs, m4);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), m4);
                    *wi = _mm256_set_m128i(hi, lo);
                }
                for r in 0..R {
                    let xb = &xs[r][b];
                    // SAFETY: `qs` is 32 bytes; unaligned load.
                    let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                    let p = [
                        $dot(w[0], xv),
                        $dot(w[1], xv),
                        $dot(w[2], xv),
                        $dot(w[3], xv),
                        $dot(w[4], xv),
                        $dot(w[5], xv),
                        $dot(w[6], xv),
                        $dot(w[7], xv),
                    ];
                    let s = _mm256_cvtepi32_ps(reduce8(&p));
                    acc[r] = _mm256_fmadd_ps(s, _mm256_mul_ps(dvec, _mm256_set1_ps(xb.d)), acc[r]);
                    offs[r] = _mm256_fmadd_ps(ovec, _mm256_set1_ps(xb.s), offs[r]);
                }
            }
            for r in 0..R {
                // SAFETY: `out[r]` is 8 f32; unaligned store.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_add_ps(acc[r], offs[r])) };
            }
        }
    };
}

macro_rules! q8_tiles_impl {
    ($name:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        fn $name<const R: usize>(tiles: &[TileQ8], xs: &[&[BlockQ8A]], out: &mut TileOut) {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, t) in tiles.iter().enumerate() {
                // SAFETY: `d` is 16 bytes; unaligned load.
                let dvec =
                    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(t.d.as_ptr() as *const __m128i) });
                let mut w = [_mm256_setzero_si256(); TILE_ROWS];
                let mut aw = [_mm256_setzero_si256(); TILE_ROWS];
                for i in 0..TILE_ROWS {
                    // SAFETY: each row's `qs` is 32 bytes; unaligned load.
                    w[i] = unsafe { _mm256_loadu_si256(t.qs[i].as_ptr() as *const __m256i) };
                    // |w| as unsigned; x takes w's sign, so every product keeps its sign.
                    aw[i] = _mm256_sign_epi8(w[i], w[i]);
                }
                for r in 0..R {
                    let xb = &xs[r][b];
                    // SAFETY: `qs` is 32 bytes; unaligned load.
                    let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                    let p = [
                        $dot(aw[0], _mm256_sign_epi8(xv, w[0])),
                        $dot(aw[1], _mm256_sign_epi8(xv, w[1])),
                        $dot(aw[2], _mm256_sign_epi8(xv, w[2])),
                        $dot(aw[3], _mm256_sign_epi8(xv, w[3])),
                        $dot(aw[4], _mm256_sign_epi8(xv, w[4])),
                        $dot(aw[5], _mm256_sign_epi8(xv, w[5])),
                        $dot(aw[6], _mm256_sign_epi8(xv, w[6])),
                        $dot(aw[7], _mm256_sign_epi8(xv, w[7])),
                    ];
                    let s = _mm256_cvtepi32_ps(reduce8(&p));
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

q4_tiles_impl!(q4_avx2, "avx2,fma,f16c", dot_u8i8_avx2);
q4_tiles_impl!(q4_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_u8i8_vnni);
q8_tiles_impl!(q8_avx2, "avx2,fma,f16c", dot_u8i8_avx2);
q8_tiles_impl!(q8_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_u8i8_vnni);

/// # Safety
/// The CPU must support AVX2, FMA and F16C, and AVX-512 VNNI + VL when `vnni`.
pub unsafe fn q4q8_tiles(
    vnni: bool,
    kind: Q4Kind,
    tiles: &[TileQ4],
    xs: &[&[BlockQ8A]],
    out: &mut TileOut,
) {
    debug_assert!(xs.iter().all(|x| x.len() >= tiles.len()));
    // SAFETY: the caller guarantees the features.
    unsafe {
        match (vnni, xs.len()) {
            (false, 1) => q4_avx2::<1>(kind, tiles, xs, out),
            (false, 2) => q4_avx2::<2>(kind, tiles, xs, out),
            (false, 3) => q4_avx2::<3>(kind, tiles, xs, out),
            (false, _) => q4_avx2::<4>(kind, tiles, xs, out),
            (true, 1) => q4_vnni::<1>(kind, tiles, xs, out),
            (true, 2) => q4_vnni::<2>(kind, tiles, xs, out),
            (true, 3) => q4_vnni::<3>(kind, tiles, xs, out),
            (true, _) => q4_vnni::<4>(kind, tiles, xs, out),
        }
    }
}

/// # Safety
/// As [`q4q8_tiles`].
pub unsafe fn q8q8_tiles(vnni: bool, tiles: &[TileQ8], xs: &[&[BlockQ8A]], out: &mut TileOut) {
    debug_assert!(xs.iter().all(|x| x.len() >= tiles.len()));
    // SAFETY: the caller guarantees the features.
    unsafe {
        match (vnni, xs.len()) {
            (false, 1) => q8_avx2::<1>(tiles, xs, out),
            (false, 2) => q8_avx2::<2>(tiles, xs, out),
            (false, 3) => q8_avx2::<3>(tiles, xs, out),
            (false, _) => q8_avx2::<4>(tiles, xs, out),
            (true, 1) => q8_vnni::<1>(tiles, xs, out),
            (true, 2) => q8_vnni::<2>(tiles, xs, out),
            (true, 3) => q8_vnni::<3>(tiles, xs, out),
            (true, _) => q8_vnni::<4>(tiles, xs, out),
        }
    }
}
