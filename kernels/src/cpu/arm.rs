//! aarch64 NEON paths for the quantized dot products (`sdot` where the dotprod extension exists,
//! widening multiplies otherwise). Same contracts as the x86 paths.

use std::arch::aarch64::*;

use crate::cpu::act::BlockQ8A;
use crate::cpu::q4::{BlockQ4, Q4Kind};
use crate::cpu::q8::BlockQ8;
use crate::cpu::qdot::f16_to_f32;

#[inline]
#[target_feature(enable = "neon")]
fn dot_i8_neon(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
}

#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dot_i8_sdot(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    vdotq_s32(vdupq_n_s32(0), a, b)
}

macro_rules! arm_impl {
    ($q4:ident, $q8:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        fn $q4(kind: Q4Kind, w: &[BlockQ4], xs: &[&[BlockQ8A]], out: &mut [f32]) {
            let m4 = vdupq_n_u8(0x0F);
            for (r, x) in xs.iter().enumerate() {
                let mut acc = vdupq_n_f32(0.0);
                let mut off = 0f32;
                for (blk, xb) in w.iter().zip(x.iter()) {
                    // SAFETY: `qs` is 16 bytes, `xb.qs` 32 bytes.
                    let (qs, x0, x1) = unsafe {
                        (
                            vld1q_u8(blk.qs.as_ptr()),
                            vld1q_s8(xb.qs.as_ptr()),
                            vld1q_s8(xb.qs.as_ptr().add(16)),
                        )
                    };
                    // Codes are 0..15, so they are valid signed bytes.
                    let lo = vreinterpretq_s8_u8(vandq_u8(qs, m4));
                    let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(qs));
                    let p = vaddq_s32($dot(lo, x0), $dot(hi, x1));
                    let dw = f16_to_f32(blk.d);
                    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), dw * xb.d);
                    off += crate::cpu::qdot::block_offset(kind, blk, dw) * xb.s;
                }
                out[r] = vaddvq_f32(acc) + off;
            }
        }

        #[target_feature(enable = $feat)]
        fn $q8(w: &[BlockQ8], xs: &[&[BlockQ8A]], out: &mut [f32]) {
            for (r, x) in xs.iter().enumerate() {
                let mut acc = vdupq_n_f32(0.0);
                for (blk, xb) in w.iter().zip(x.iter()) {
                    // SAFETY: both `qs` are 32 bytes.
                    let (w0, w1, x0, x1) = unsafe {
                        (
                            vld1q_s8(blk.qs.as_ptr()),
                            vld1q_s8(blk.qs.as_ptr().add(16)),
                            vld1q_s8(xb.qs.as_ptr()),
                            vld1q_s8(xb.qs.as_ptr().add(16)),
                        )
                    };
                    let p = vaddq_s32($dot(w0, x0), $dot(w1, x1));
                    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), f16_to_f32(blk.d) * xb.d);
                }
                out[r] = vaddvq_f32(acc);
            }
        }
    };
}

arm_impl!(q4_neon, q8_neon, "neon", dot_i8_neon);
arm_impl!(q4_sdot, q8_sdot, "neon,dotprod", dot_i8_sdot);

/// # Safety
/// The CPU must support NEON, and the dotprod extension when `dotprod`.
pub unsafe fn q4q8_rows(
    dotprod: bool,
    kind: Q4Kind,
    w: &[BlockQ4],
    xs: &[&[BlockQ8A]],
    out: &mut [f32],
) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        if dotprod {
            q4_sdot(kind, w, xs, out)
        } else {
            q4_neon(kind, w, xs, out)
        }
    }
}

/// # Safety
/// As [`q4q8_rows`].
pub unsafe fn q8q8_rows(dotprod: bool, w: &[BlockQ8], xs: &[&[BlockQ8A]], out: &mut [f32]) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        if dotprod {
            q8_sdot(w, xs, out)
        } else {
            q8_neon(w, xs, out)
        }
    }
}
