//! x86-64 SIMD paths for the quantized dot products (AVX2 + FMA + F16C; AVX-512 VNNI's `vpdpbusd`
//! on 256-bit vectors where present). Each function computes what its scalar reference in
//! `qdot.rs` computes, up to float summation order; tests compare them.

use std::arch::x86_64::*;

use crate::cpu::act::BlockQ8A;
use crate::cpu::q4::{BlockQ4, Q4Kind};
use crate::cpu::q8::BlockQ8;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16c(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

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

macro_rules! q4_rows_impl {
    ($name:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        fn $name<const R: usize>(kind: Q4Kind, w: &[BlockQ4], xs: &[&[BlockQ8A]], out: &mut [f32]) {
            let m4 = _mm_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut off = [0f32; R];
            for (b, blk) in w.iter().enumerate() {
                // SAFETY: `qs` is 16 bytes; unaligned load.
                let qs = unsafe { _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i) };
                let lo = _mm_and_si128(qs, m4);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), m4);
                let wv = _mm256_set_m128i(hi, lo);
                let dw = f16c(blk.d);
                let o = match kind {
                    Q4Kind::ZeroPoint => -(blk.m as f32) * dw,
                    Q4Kind::Affine => f16c(blk.m),
                };
                for r in 0..R {
                    let xb = &xs[r][b];
                    // SAFETY: `qs` is 32 bytes; unaligned load.
                    let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                    let p = $dot(wv, xv);
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xb.d), acc[r]);
                    off[r] += o * xb.s;
                }
            }
            for r in 0..R {
                out[r] = hsum(acc[r]) + off[r];
            }
        }
    };
}

macro_rules! q8_rows_impl {
    ($name:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        fn $name<const R: usize>(w: &[BlockQ8], xs: &[&[BlockQ8A]], out: &mut [f32]) {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, blk) in w.iter().enumerate() {
                // SAFETY: `qs` is 32 bytes; unaligned load.
                let wv = unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) };
                // |w| as unsigned, and x carrying w's sign: the products keep their sign.
                let aw = _mm256_sign_epi8(wv, wv);
                let dw = f16c(blk.d);
                for r in 0..R {
                    let xb = &xs[r][b];
                    // SAFETY: `qs` is 32 bytes; unaligned load.
                    let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                    let p = $dot(aw, _mm256_sign_epi8(xv, wv));
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xb.d), acc[r]);
                }
            }
            for r in 0..R {
                out[r] = hsum(acc[r]);
            }
        }
    };
}

q4_rows_impl!(q4_avx2, "avx2,fma,f16c", dot_u8i8_avx2);
q4_rows_impl!(q4_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_u8i8_vnni);
q8_rows_impl!(q8_avx2, "avx2,fma,f16c", dot_u8i8_avx2);
q8_rows_impl!(q8_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_u8i8_vnni);

/// # Safety
/// The CPU must support AVX2, FMA and F16C, and AVX-512 VNNI + VL when `vnni`.
pub unsafe fn q4q8_rows(
    vnni: bool,
    kind: Q4Kind,
    w: &[BlockQ4],
    xs: &[&[BlockQ8A]],
    out: &mut [f32],
) {
    debug_assert!(xs.iter().all(|x| x.len() >= w.len()));
    // SAFETY: the caller guarantees the features.
    unsafe {
        match (vnni, xs.len()) {
            (false, 1) => q4_avx2::<1>(kind, w, xs, out),
            (false, 2) => q4_avx2::<2>(kind, w, xs, out),
            (false, 3) => q4_avx2::<3>(kind, w, xs, out),
            (false, _) => q4_avx2::<4>(kind, w, xs, out),
            (true, 1) => q4_vnni::<1>(kind, w, xs, out),
            (true, 2) => q4_vnni::<2>(kind, w, xs, out),
            (true, 3) => q4_vnni::<3>(kind, w, xs, out),
            (true, _) => q4_vnni::<4>(kind, w, xs, out),
        }
    }
}

/// # Safety
/// As [`q4q8_rows`].
pub unsafe fn q8q8_rows(vnni: bool, w: &[BlockQ8], xs: &[&[BlockQ8A]], out: &mut [f32]) {
    debug_assert!(xs.iter().all(|x| x.len() >= w.len()));
    // SAFETY: the caller guarantees the features.
    unsafe {
        match (vnni, xs.len()) {
            (false, 1) => q8_avx2::<1>(w, xs, out),
            (false, 2) => q8_avx2::<2>(w, xs, out),
            (false, 3) => q8_avx2::<3>(w, xs, out),
            (false, _) => q8_avx2::<4>(w, xs, out),
            (true, 1) => q8_vnni::<1>(w, xs, out),
            (true, 2) => q8_vnni::<2>(w, xs, out),
            (true, 3) => q8_vnni::<3>(w, xs, out),
            (true, _) => q8_vnni::<4>(w, xs, out),
        }
    }
}
