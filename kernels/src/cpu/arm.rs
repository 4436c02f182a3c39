//! aarch64 NEON paths for the quantized dot products (`sdot` where the dotprod extension exists,
//! widening multiplies otherwise). Same contracts as the x86 paths: one row group (eight rows,
//! stored as tiles) against up to four activation rows.

use std::arch::aarch64::*;

use crate::cpu::act::BlockQ8A;
use crate::cpu::q4::{Q4Kind, TILE_ROWS, TileQ4};
use crate::cpu::q8::TileQ8;
use crate::cpu::qdot::{TileOut, f16_to_f32};

#[inline]
#[target_feature(enable = "neon")]
fn dot_i8_neon(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
}

/// `sdot` through inline assembly: the `vdotq_s32` intrinsic is not stable in Rust yet.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dot_i8_sdot(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = vdupq_n_s32(0);
    // SAFETY: `sdot` only reads and writes the named vector registers; the dotprod extension is
    // enabled for this function (callers check it at run time).
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Eight vectors of four lanes → two vectors holding the eight lane sums (rows 0-3, 4-7).
#[inline]
#[target_feature(enable = "neon")]
fn reduce8(s: &[int32x4_t; TILE_ROWS]) -> (int32x4_t, int32x4_t) {
    (
        vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3])),
        vpaddq_s32(vpaddq_s32(s[4], s[5]), vpaddq_s32(s[6], s[7])),
    )
}

macro_rules! arm_impl {
    ($q4:ident, $q8:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        fn $q4(kind: Q4Kind, tiles: &[TileQ4], xs: &[&[BlockQ8A]], out: &mut TileOut) {
            let m4 = vdupq_n_u8(0x0F);
            for (r, x) in xs.iter().enumerate() {
                let (mut acc_lo, mut acc_hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                for (t, xb) in tiles.iter().zip(x.iter()) {
                    // SAFETY: `xb.qs` is 32 bytes.
                    let (x0, x1) =
                        unsafe { (vld1q_s8(xb.qs.as_ptr()), vld1q_s8(xb.qs.as_ptr().add(16))) };
                    let mut s = [vdupq_n_s32(0); TILE_ROWS];
                    for (si, q) in s.iter_mut().zip(&t.qs) {
                        // SAFETY: each row's `qs` is 16 bytes.
                        let qs = unsafe { vld1q_u8(q.as_ptr()) };
                        // Codes are 0..15, valid signed bytes.
                        let lo = vreinterpretq_s8_u8(vandq_u8(qs, m4));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(qs));
                        *si = vaddq_s32($dot(lo, x0), $dot(hi, x1));
                    }
                    let (s_lo, s_hi) = reduce8(&s);
                    let mut d = [0f32; TILE_ROWS];
                    let mut o = [0f32; TILE_ROWS];
                    for i in 0..TILE_ROWS {
                        d[i] = f16_to_f32(t.d[i]) * xb.d;
                        let dw = f16_to_f32(t.d[i]);
                        o[i] = match kind {
                            Q4Kind::ZeroPoint => -(t.m[i] as f32) * dw,
                            Q4Kind::Affine => f16_to_f32(t.m[i]),
                        } * xb.s;
                    }
                    // SAFETY: `d` and `o` hold 8 f32.
                    unsafe {
                        acc_lo = vfmaq_f32(acc_lo, vcvtq_f32_s32(s_lo), vld1q_f32(d.as_ptr()));
                        acc_hi =
                            vfmaq_f32(acc_hi, vcvtq_f32_s32(s_hi), vld1q_f32(d.as_ptr().add(4)));
                        acc_lo = vaddq_f32(acc_lo, vld1q_f32(o.as_ptr()));
                        acc_hi = vaddq_f32(acc_hi, vld1q_f32(o.as_ptr().add(4)));
                    }
                }
                // SAFETY: `out[r]` holds 8 f32.
                unsafe {
                    vst1q_f32(out[r].as_mut_ptr(), acc_lo);
                    vst1q_f32(out[r].as_mut_ptr().add(4), acc_hi);
                }
            }
        }

        #[target_feature(enable = $feat)]
        fn $q8(tiles: &[TileQ8], xs: &[&[BlockQ8A]], out: &mut TileOut) {
            for (r, x) in xs.iter().enumerate() {
                let (mut acc_lo, mut acc_hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                for (t, xb) in tiles.iter().zip(x.iter()) {
                    // SAFETY: `xb.qs` is 32 bytes.
                    let (x0, x1) =
                        unsafe { (vld1q_s8(xb.qs.as_ptr()), vld1q_s8(xb.qs.as_ptr().add(16))) };
                    let mut s = [vdupq_n_s32(0); TILE_ROWS];
                    for (si, q) in s.iter_mut().zip(&t.qs) {
                        // SAFETY: each row's `qs` is 32 bytes.
                        let (w0, w1) =
                            unsafe { (vld1q_s8(q.as_ptr()), vld1q_s8(q.as_ptr().add(16))) };
                        *si = vaddq_s32($dot(w0, x0), $dot(w1, x1));
                    }
                    let (s_lo, s_hi) = reduce8(&s);
                    let mut d = [0f32; TILE_ROWS];
                    for i in 0..TILE_ROWS {
                        d[i] = f16_to_f32(t.d[i]) * xb.d;
                    }
                    // SAFETY: `d` holds 8 f32.
                    unsafe {
                        acc_lo = vfmaq_f32(acc_lo, vcvtq_f32_s32(s_lo), vld1q_f32(d.as_ptr()));
                        acc_hi =
                            vfmaq_f32(acc_hi, vcvtq_f32_s32(s_hi), vld1q_f32(d.as_ptr().add(4)));
                    }
                }
                // SAFETY: `out[r]` holds 8 f32.
                unsafe {
                    vst1q_f32(out[r].as_mut_ptr(), acc_lo);
                    vst1q_f32(out[r].as_mut_ptr().add(4), acc_hi);
                }
            }
        }
    };
}

arm_impl!(q4_neon, q8_neon, "neon", dot_i8_neon);
arm_impl!(q4_sdot, q8_sdot, "neon,dotprod", dot_i8_sdot);

/// # Safety
/// The CPU must support NEON, and the dotprod extension when `dotprod`.
pub unsafe fn q4q8_tiles(
    dotprod: bool,
    kind: Q4Kind,
    tiles: &[TileQ4],
    xs: &[&[BlockQ8A]],
    out: &mut TileOut,
) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        if dotprod {
            q4_sdot(kind, tiles, xs, out)
        } else {
            q4_neon(kind, tiles, xs, out)
        }
    }
}

/// # Safety
/// As [`q4q8_tiles`].
pub unsafe fn q8q8_tiles(dotprod: bool, tiles: &[TileQ8], xs: &[&[BlockQ8A]], out: &mut TileOut) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        if dotprod {
            q8_sdot(tiles, xs, out)
        } else {
            q8_neon(tiles, xs, out)
        }
    }
}
