//! aarch64 NEON paths for the quantized dot products (`sdot` where the dotprod extension exists,
//! widening multiplies otherwise). Same contracts as the x86 paths: one row group (eight rows,
//! stored as tiles) against up to four activation rows. The tiles' four-column interleave is what
//! `sdot` wants: each 32-bit lane sums four products of one row.

use std::arch::aarch64::*;

use crate::cpu::act::BlockQ8A;
use crate::cpu::q4::{Q4Kind, TILE_ROWS, TileQ4};
use crate::cpu::q8::TileQ8;
use crate::cpu::qdot::{Side, ahead_tiles, f16_to_f32};

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

/// Activation bytes `4j .. 4j + 4` of a block, repeated in every 32-bit lane.
#[inline]
#[target_feature(enable = "neon")]
fn xbcast(xb: &BlockQ8A, j: usize) -> int8x16_t {
    let b = &xb.qs[4 * j..4 * j + 4];
    vreinterpretq_s8_s32(vdupq_n_s32(i32::from_le_bytes([
        b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8,
    ])))
}

/// Per-tile scales `d * xd` and offsets `o * xs` of the eight rows, as two vectors each.
#[inline]
#[target_feature(enable = "neon")]
fn scales(d: &[u16; TILE_ROWS], xd: f32) -> (float32x4_t, float32x4_t) {
    let v: [f32; TILE_ROWS] = std::array::from_fn(|i| f16_to_f32(d[i]) * xd);
    // SAFETY: `v` holds 8 f32.
    unsafe { (vld1q_f32(v.as_ptr()), vld1q_f32(v.as_ptr().add(4))) }
}

macro_rules! arm_impl {
    ($q4:ident, $q8:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        fn $q4(
            kind: Q4Kind,
            tiles: &[TileQ4],
            xs: &[&[BlockQ8A]],
            out: &mut [[f32; TILE_ROWS]],
            side: Side,
        ) {
            let m4 = vdupq_n_u8(0x0F);
            for (r, x) in xs.iter().enumerate() {
                let (mut acc_lo, mut acc_hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                for (b, (t, xb)) in tiles.iter().zip(x.iter()).enumerate() {
                    if r == 0 {
                        side.line(b, tiles.len());
                        ahead_tiles(tiles, b, xs.len());
                    }
                    let (mut s_lo, mut s_hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
                    for g in 0..4 {
                        // SAFETY: `qs` is 128 bytes: rows 0-3 at 32g, rows 4-7 at 32g + 16.
                        let (v_lo, v_hi) = unsafe {
                            (
                                vld1q_u8(t.qs.as_ptr().add(32 * g)),
                                vld1q_u8(t.qs.as_ptr().add(32 * g + 16)),
                            )
                        };
                        let (xa, xb4) = (xbcast(xb, g), xbcast(xb, g + 4));
                        // Codes are 0..15, valid signed bytes.
                        let low = |v: uint8x16_t| vreinterpretq_s8_u8(vandq_u8(v, m4));
                        let high = |v: uint8x16_t| vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                        s_lo =
                            vaddq_s32(s_lo, vaddq_s32($dot(low(v_lo), xa), $dot(high(v_lo), xb4)));
                        s_hi =
                            vaddq_s32(s_hi, vaddq_s32($dot(low(v_hi), xa), $dot(high(v_hi), xb4)));
                    }
                    let (d_lo, d_hi) = scales(&t.d, xb.d);
                    let o: [f32; TILE_ROWS] = std::array::from_fn(|i| {
                        let dw = f16_to_f32(t.d[i]);
                        let o = match kind {
                            Q4Kind::ZeroPoint => -(t.m[i] as f32) * dw,
                            Q4Kind::Affine => f16_to_f32(t.m[i]),
                        };
                        o * xb.s
                    });
                    // SAFETY: `o` holds 8 f32.
                    let (o_lo, o_hi) =
                        unsafe { (vld1q_f32(o.as_ptr()), vld1q_f32(o.as_ptr().add(4))) };
                    acc_lo = vaddq_f32(vfmaq_f32(acc_lo, vcvtq_f32_s32(s_lo), d_lo), o_lo);
                    acc_hi = vaddq_f32(vfmaq_f32(acc_hi, vcvtq_f32_s32(s_hi), d_hi), o_hi);
                }
                // SAFETY: `out[r]` holds 8 f32.
                unsafe {
                    vst1q_f32(out[r].as_mut_ptr(), acc_lo);
                    vst1q_f32(out[r].as_mut_ptr().add(4), acc_hi);
                }
            }
        }

        #[target_feature(enable = $feat)]
        fn $q8(tiles: &[TileQ8], xs: &[&[BlockQ8A]], out: &mut [[f32; TILE_ROWS]], side: Side) {
            for (r, x) in xs.iter().enumerate() {
                let (mut acc_lo, mut acc_hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                for (b, (t, xb)) in tiles.iter().zip(x.iter()).enumerate() {
                    if r == 0 {
                        side.line(b, tiles.len());
                        ahead_tiles(tiles, b, xs.len());
                    }
                    let (mut s_lo, mut s_hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
                    for j in 0..8 {
                        // SAFETY: `qs` is 256 bytes: rows 0-3 at 32j, rows 4-7 at 32j + 16.
                        let (w_lo, w_hi) = unsafe {
                            (
                                vld1q_s8(t.qs.as_ptr().add(32 * j)),
                                vld1q_s8(t.qs.as_ptr().add(32 * j + 16)),
                            )
                        };
                        let xj = xbcast(xb, j);
                        s_lo = vaddq_s32(s_lo, $dot(w_lo, xj));
                        s_hi = vaddq_s32(s_hi, $dot(w_hi, xj));
                    }
                    let (d_lo, d_hi) = scales(&t.d, xb.d);
                    acc_lo = vfmaq_f32(acc_lo, vcvtq_f32_s32(s_lo), d_lo);
                    acc_hi = vfmaq_f32(acc_hi, vcvtq_f32_s32(s_hi), d_hi);
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
    out: &mut [[f32; TILE_ROWS]],
    side: Side,
) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        if dotprod {
            q4_sdot(kind, tiles, xs, out, side)
        } else {
            q4_neon(kind, tiles, xs, out, side)
        }
    }
}

/// # Safety
/// As [`q4q8_tiles`].
pub unsafe fn q8q8_tiles(
    dotprod: bool,
    tiles: &[TileQ8],
    xs: &[&[BlockQ8A]],
    out: &mut [[f32; TILE_ROWS]],
    side: Side,
) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        if dotprod {
            q8_sdot(tiles, xs, out, side)
        } else {
            q8_neon(tiles, xs, out, side)
        }
    }
}

/// The LoRA expand over consecutive groups of a `LoraB` (`data`, `stride` bytes per group: eight
/// f16 scales, then 32-byte chunks whose 32-bit lane `i` holds row `i`'s codes): `out[8g + i] +=
/// (d[i] * scale) * dot(codes of row i, t)`, rounded as the reference (`lora_axpy_reference`)
/// rounds it, so the result is the same bits. Int8 (`nib` false): four codes per lane and chunk.
/// Int4: eight, byte `j` holding column `j` in its low nibble and `j + 4` in its high one, as
/// `code + 8`; the nibbles go in as they are (0..=15 are positive bytes) and each sum starts at
/// `-8 * sum(t)`.
macro_rules! lora_axpy_arm {
    ($name:ident, $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        fn $name(
            nib: bool,
            data: &[u8],
            stride: usize,
            chunks: usize,
            t: &[i8],
            scale: f32,
            out: &mut [f32],
        ) {
            let groups = out.len() / TILE_ROWS;
            let steps = if nib { 2 * chunks } else { chunks };
            assert!(
                data.len() >= groups * stride && stride >= 16 + 32 * chunks && t.len() >= 4 * steps,
                "LoRA B layout"
            );
            let start = if nib {
                -8 * t[..4 * steps].iter().map(|&v| v as i32).sum::<i32>()
            } else {
                0
            };
            let m4 = vdupq_n_u8(0x0F);
            for gi in 0..groups {
                let g = &data[gi * stride..(gi + 1) * stride];
                let ds: [f32; TILE_ROWS] = std::array::from_fn(|i| {
                    f16_to_f32(u16::from_le_bytes([g[2 * i], g[2 * i + 1]])) * scale
                });
                let (mut s_lo, mut s_hi) = (vdupq_n_s32(start), vdupq_n_s32(start));
                for j in 0..steps {
                    let c = if nib { j / 2 } else { j };
                    // SAFETY: chunk c is 32 bytes at 16 + 32c, inside the group (asserted).
                    let (w_lo, w_hi) = unsafe {
                        (
                            vld1q_u8(g.as_ptr().add(16 + 32 * c)),
                            vld1q_u8(g.as_ptr().add(32 + 32 * c)),
                        )
                    };
                    let (w_lo, w_hi) = match (nib, j % 2) {
                        (false, _) => (w_lo, w_hi),
                        (true, 0) => (vandq_u8(w_lo, m4), vandq_u8(w_hi, m4)),
                        _ => (vshrq_n_u8(w_lo, 4), vshrq_n_u8(w_hi, 4)),
                    };
                    let tj = &t[4 * j..4 * j + 4];
                    let x = vreinterpretq_s8_s32(vdupq_n_s32(i32::from_le_bytes([
                        tj[0] as u8,
                        tj[1] as u8,
                        tj[2] as u8,
                        tj[3] as u8,
                    ])));
                    s_lo = vaddq_s32(s_lo, $dot(vreinterpretq_s8_u8(w_lo), x));
                    s_hi = vaddq_s32(s_hi, $dot(vreinterpretq_s8_u8(w_hi), x));
                }
                let o = &mut out[TILE_ROWS * gi..TILE_ROWS * (gi + 1)];
                // SAFETY: `ds` and `o` hold 8 f32 each; unaligned loads and stores.
                unsafe {
                    let (d_lo, d_hi) = (vld1q_f32(ds.as_ptr()), vld1q_f32(ds.as_ptr().add(4)));
                    let v_lo = vmulq_f32(vcvtq_f32_s32(s_lo), d_lo);
                    let v_hi = vmulq_f32(vcvtq_f32_s32(s_hi), d_hi);
                    vst1q_f32(o.as_mut_ptr(), vaddq_f32(vld1q_f32(o.as_ptr()), v_lo));
                    vst1q_f32(
                        o.as_mut_ptr().add(4),
                        vaddq_f32(vld1q_f32(o.as_ptr().add(4)), v_hi),
                    );
                }
            }
        }
    };
}

lora_axpy_arm!(lora_axpy_neon, "neon", dot_i8_neon);
lora_axpy_arm!(lora_axpy_sdot, "neon,dotprod", dot_i8_sdot);

/// # Safety
/// As [`q4q8_tiles`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn lora_axpy(
    dotprod: bool,
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
        if dotprod {
            lora_axpy_sdot(nib, data, stride, chunks, t, scale, out)
        } else {
            lora_axpy_neon(nib, data, stride, chunks, t, scale, out)
        }
    }
}
