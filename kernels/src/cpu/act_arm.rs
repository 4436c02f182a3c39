//! NEON passes of the activation quantization (see `RowKernels` in `act.rs`), bit-identical to
//! the scalar reference as the AVX2 ones are: sums accumulate in the same 32 striped lanes (eight
//! 4-lane vectors, a partial last chunk zero-padded) and reduce in the reference's order; maxima
//! use `fmaxnm` (NaN ignored, as `f32::max`); codes are `trunc(t + copysign(0.5, t))`, and
//! `fcvtzs` takes NaN to 0 and saturates as `as i32` does.

use std::arch::aarch64::*;

use super::{BlockQ8A, LANES, RowKernels, block_at, for_each_chunk, scales};
use crate::cpu::q4::QK;
use crate::cpu::qdot::{Isa, best_isa};

/// Proof that the CPU has NEON: made only after detecting it.
#[derive(Clone, Copy)]
pub(super) struct Neon(());

impl Neon {
    /// The NEON passes if the default instruction set is a NEON one (so `EDGELORA_ISA=scalar`
    /// turns them off too).
    #[inline]
    pub(super) fn get() -> Option<Self> {
        matches!(best_isa(), Isa::Neon | Isa::NeonDot).then_some(Neon(()))
    }

    /// The NEON passes whenever the CPU has NEON.
    #[cfg(test)]
    pub(super) fn detect() -> Option<Self> {
        std::arch::is_aarch64_feature_detected!("neon").then_some(Neon(()))
    }
}

impl RowKernels for Neon {
    #[inline]
    fn abs_sum_max(self, x: &[f32]) -> (f32, f32) {
        // SAFETY: a `Neon` exists only where NEON was detected.
        unsafe { abs_sum_max(x) }
    }

    #[inline]
    fn sum_above(self, x: &[f32], t: f32) -> (f32, usize) {
        // SAFETY: as above.
        unsafe { sum_above(x, t) }
    }

    #[inline]
    fn for_each_above(self, x: &[f32], t: f32, f: &mut dyn FnMut(usize, f32)) {
        // SAFETY: as above.
        unsafe { for_each_above(x, t, f) }
    }

    #[inline]
    fn quantize_blocks(self, x: &[f32], blocks: &mut [BlockQ8A], skip: &[(u32, f32)]) {
        // SAFETY: as above.
        unsafe { quantize_blocks(x, blocks, skip) }
    }
}

/// One chunk of 32 as eight vectors (lanes 4g .. 4g + 4 in vector g).
#[inline]
#[target_feature(enable = "neon")]
fn load(c: &[f32; LANES]) -> [float32x4_t; 8] {
    // SAFETY: floats 4g .. 4g + 4 of `c`, g < 8.
    std::array::from_fn(|g| unsafe { vld1q_f32(c.as_ptr().add(4 * g)) })
}

/// [`super::reduce_lanes`] on eight vectors: lane i of the reference's first step is
/// `(a[i] + a[8 + i]) + (a[16 + i] + a[24 + i])`, i.e. vectors (0, 2, 4, 6) for lanes 0..4 and
/// (1, 3, 5, 7) for lanes 4..8; then lanes i and i + 4, then i and i + 2, then the last two.
#[inline]
#[target_feature(enable = "neon")]
fn reduce_lanes(a: [float32x4_t; 8]) -> f32 {
    let v_lo = vaddq_f32(vaddq_f32(a[0], a[2]), vaddq_f32(a[4], a[6]));
    let v_hi = vaddq_f32(vaddq_f32(a[1], a[3]), vaddq_f32(a[5], a[7]));
    let w = vaddq_f32(v_lo, v_hi);
    let u = vadd_f32(vget_low_f32(w), vget_high_f32(w));
    vget_lane_f32::<0>(u) + vget_lane_f32::<1>(u)
}

/// The largest lane of eight vectors, NaN ignored.
#[inline]
#[target_feature(enable = "neon")]
fn max_lanes(a: [float32x4_t; 8]) -> f32 {
    let m = a.iter().skip(1).fold(a[0], |m, &v| vmaxnmq_f32(m, v));
    vmaxnmvq_f32(m)
}

/// The reference's `Scalar::abs_sum_max`; and so on below.
#[target_feature(enable = "neon")]
fn abs_sum_max(x: &[f32]) -> (f32, f32) {
    let mut acc = [vdupq_n_f32(0.0); 8];
    let mut mx = [vdupq_n_f32(0.0); 8];
    for_each_chunk(x, |c| {
        for (g, v) in load(c).into_iter().enumerate() {
            let a = vabsq_f32(v);
            acc[g] = vaddq_f32(acc[g], a);
            mx[g] = vmaxnmq_f32(mx[g], a);
        }
    });
    (reduce_lanes(acc), max_lanes(mx))
}

#[target_feature(enable = "neon")]
fn sum_above(x: &[f32], t: f32) -> (f32, usize) {
    // Padding zeros are never above a `t >= 0` (or NaN).
    debug_assert!(t >= 0.0 || t.is_nan());
    let tv = vdupq_n_f32(t);
    let mut acc = [vdupq_n_f32(0.0); 8];
    let mut n = vdupq_n_s32(0);
    for_each_chunk(x, |c| {
        for (g, v) in load(c).into_iter().enumerate() {
            let a = vabsq_f32(v);
            let big = vcgtq_f32(a, tv);
            // Adding +0.0 where not above, as the reference does.
            acc[g] = vaddq_f32(
                acc[g],
                vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(a), big)),
            );
            n = vsubq_s32(n, vreinterpretq_s32_u32(big));
        }
    });
    (reduce_lanes(acc), vaddvq_s32(n) as usize)
}

#[target_feature(enable = "neon")]
fn for_each_above(x: &[f32], t: f32, f: &mut dyn FnMut(usize, f32)) {
    let tv = vdupq_n_f32(t);
    let mut chunks = x.chunks_exact(LANES);
    for (i, c) in (&mut chunks).enumerate() {
        let c: &[f32; LANES] = c.try_into().expect("chunks of 32");
        // Outliers are rare: one test for the 32 values.
        let any = load(c).into_iter().fold(vdupq_n_u32(0), |m, v| {
            vorrq_u32(m, vcgtq_f32(vabsq_f32(v), tv))
        });
        if vmaxvq_u32(any) == 0 {
            continue;
        }
        for (j, &v) in c.iter().enumerate() {
            if v.abs() > t {
                f(LANES * i + j, v);
            }
        }
    }
    let base = x.len() - chunks.remainder().len();
    for (j, &v) in chunks.remainder().iter().enumerate() {
        if v.abs() > t {
            f(base + j, v);
        }
    }
}

#[target_feature(enable = "neon")]
fn quantize_blocks(x: &[f32], blocks: &mut [BlockQ8A], skip: &[(u32, f32)]) {
    let mut next = 0;
    for (b, blk) in blocks.iter_mut().enumerate() {
        let (src, zero) = block_at(x, b, skip, &mut next);
        let mut tmp = [0f32; QK];
        let full = match <&[f32; QK]>::try_from(src) {
            Ok(full) if zero == 0 => full,
            _ => {
                tmp[..src.len()].copy_from_slice(src);
                let mut z = zero;
                while z != 0 {
                    tmp[z.trailing_zeros() as usize] = 0.0;
                    z &= z - 1;
                }
                &tmp
            }
        };
        quantize_block(full, blk);
    }
}

/// `super::quantize_block32`.
#[inline]
#[target_feature(enable = "neon")]
fn quantize_block(x: &[f32; QK], blk: &mut BlockQ8A) {
    let v = load(x);
    let (d, id) = scales(max_lanes(v.map(|vg| vabsq_f32(vg))));
    let idv = vdupq_n_f32(id);
    let half = vreinterpretq_u32_f32(vdupq_n_f32(0.5));
    let sign = vdupq_n_u32(0x8000_0000);
    let q: [int32x4_t; 8] = v.map(|vg| {
        let t = vmulq_f32(vg, idv);
        let h = vorrq_u32(vandq_u32(vreinterpretq_u32_f32(t), sign), half);
        vcvtq_s32_f32(vaddq_f32(t, vreinterpretq_f32_u32(h)))
    });
    let sum = vaddvq_s32(q.iter().skip(1).fold(q[0], |s, &v| vaddq_s32(s, v)));
    // Narrowing keeps the low bits, as `as i8` does (codes are within ±127 anyway).
    let h: [int16x8_t; 4] =
        std::array::from_fn(|i| vcombine_s16(vmovn_s32(q[2 * i]), vmovn_s32(q[2 * i + 1])));
    let lo = vcombine_s8(vmovn_s16(h[0]), vmovn_s16(h[1]));
    let hi = vcombine_s8(vmovn_s16(h[2]), vmovn_s16(h[3]));
    // SAFETY: `qs` is 32 bytes.
    unsafe {
        vst1q_s8(blk.qs.as_mut_ptr(), lo);
        vst1q_s8(blk.qs.as_mut_ptr().add(16), hi);
    }
    blk.set_scale(d, sum);
}
