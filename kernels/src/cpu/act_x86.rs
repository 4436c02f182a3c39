//! AVX2 passes of the activation quantization (see `RowKernels` in `act.rs`), bit-identical to
//! the scalar reference: sums accumulate in the same 32 striped lanes (four 8-lane vectors, a
//! partial last chunk zero-padded, which adds nothing) and reduce in the same order, and codes are
//! `trunc(t + copysign(0.5, t))` as there, NaN taken to 0 as `as i32` does.

use std::arch::x86_64::*;

use super::{BlockQ8A, LANES, RowKernels, block_at, for_each_chunk, scales};
use crate::cpu::q4::QK;
use crate::cpu::qdot::{Isa, best_isa};

/// Proof that the CPU has AVX2: made only after detecting it.
#[derive(Clone, Copy)]
pub(super) struct Avx2(());

impl Avx2 {
    /// The AVX2 passes if the default instruction set has AVX2 (so `EDGELORA_ISA=scalar` turns
    /// them off too).
    #[inline]
    pub(super) fn get() -> Option<Self> {
        matches!(best_isa(), Isa::Avx2 | Isa::Avx512Vnni).then_some(Avx2(()))
    }

    /// The AVX2 passes whenever the CPU has AVX2.
    #[cfg(test)]
    pub(super) fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx2").then_some(Avx2(()))
    }
}

impl RowKernels for Avx2 {
    #[inline]
    fn abs_sum_max(self, x: &[f32]) -> (f32, f32) {
        // SAFETY: an `Avx2` exists only where AVX2 was detected.
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

/// `|x|` of one chunk of 32, as four vectors.
#[inline]
#[target_feature(enable = "avx2")]
fn load_abs(c: &[f32; LANES]) -> [__m256; 4] {
    let m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let p = c.as_ptr();
    // SAFETY: floats 0..32 of `c`; unaligned loads.
    unsafe {
        [
            _mm256_and_ps(_mm256_loadu_ps(p), m),
            _mm256_and_ps(_mm256_loadu_ps(p.add(8)), m),
            _mm256_and_ps(_mm256_loadu_ps(p.add(16)), m),
            _mm256_and_ps(_mm256_loadu_ps(p.add(24)), m),
        ]
    }
}

/// [`super::reduce_lanes`] on four vectors.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce_lanes(a: [__m256; 4]) -> f32 {
    let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    let w = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let u = _mm_add_ps(w, _mm_movehl_ps(w, w));
    _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps::<1>(u, u)))
}

/// The largest lane of four vectors (none NaN).
#[inline]
#[target_feature(enable = "avx2")]
fn max_lanes(a: [__m256; 4]) -> f32 {
    let v = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let w = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let u = _mm_max_ps(w, _mm_movehl_ps(w, w));
    _mm_cvtss_f32(_mm_max_ss(u, _mm_shuffle_ps::<1>(u, u)))
}

/// The sum of the eight lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn sum_epi32(v: __m256i) -> i32 {
    let w = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let u = _mm_add_epi32(w, _mm_shuffle_epi32::<0b01_00_11_10>(w));
    _mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32::<0b10_11_00_01>(u)))
}

/// The reference's `Scalar::abs_sum_max`; and so on below.
#[target_feature(enable = "avx2")]
fn abs_sum_max(x: &[f32]) -> (f32, f32) {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut mx = [_mm256_setzero_ps(); 4];
    for_each_chunk(x, |c| {
        let a = load_abs(c);
        for g in 0..4 {
            acc[g] = _mm256_add_ps(acc[g], a[g]);
            // `maxps` returns its second operand where either is NaN: NaNs are ignored, as
            // `f32::max` does.
            mx[g] = _mm256_max_ps(a[g], mx[g]);
        }
    });
    (reduce_lanes(acc), max_lanes(mx))
}

#[target_feature(enable = "avx2")]
fn sum_above(x: &[f32], t: f32) -> (f32, usize) {
    // Padding zeros are never above a `t >= 0` (or NaN).
    debug_assert!(t >= 0.0 || t.is_nan());
    let tv = _mm256_set1_ps(t);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut n = _mm256_setzero_si256();
    for_each_chunk(x, |c| {
        let a = load_abs(c);
        for g in 0..4 {
            let big = _mm256_cmp_ps::<_CMP_GT_OQ>(a[g], tv);
            acc[g] = _mm256_add_ps(acc[g], _mm256_and_ps(a[g], big));
            n = _mm256_sub_epi32(n, _mm256_castps_si256(big));
        }
    });
    (reduce_lanes(acc), sum_epi32(n) as usize)
}

#[target_feature(enable = "avx2")]
fn for_each_above(x: &[f32], t: f32, f: &mut dyn FnMut(usize, f32)) {
    let tv = _mm256_set1_ps(t);
    let mut chunks = x.chunks_exact(LANES);
    for (i, c) in (&mut chunks).enumerate() {
        let a = load_abs(c.try_into().expect("chunks of 32"));
        let above = a.map(|v| _mm256_cmp_ps::<_CMP_GT_OQ>(v, tv));
        // Outliers are rare: one test for the 32 values.
        let any = _mm256_or_ps(
            _mm256_or_ps(above[0], above[1]),
            _mm256_or_ps(above[2], above[3]),
        );
        if _mm256_testz_ps(any, any) != 0 {
            continue;
        }
        let mut bits = above
            .iter()
            .rev()
            .fold(0u32, |b, &m| (b << 8) | _mm256_movemask_ps(m) as u32);
        while bits != 0 {
            let j = bits.trailing_zeros() as usize;
            f(LANES * i + j, c[j]);
            bits &= bits - 1;
        }
    }
    let base = x.len() - chunks.remainder().len();
    for (j, &v) in chunks.remainder().iter().enumerate() {
        if v.abs() > t {
            f(base + j, v);
        }
    }
}

#[target_feature(enable = "avx2")]
fn quantize_blocks(x: &[f32], blocks: &mut [BlockQ8A], skip: &[(u32, f32)]) {
    let mut next = 0;
    for (b, blk) in blocks.iter_mut().enumerate() {
        let (src, zero) = block_at(x, b, skip, &mut next);
        match <&[f32; QK]>::try_from(src) {
            Ok(full) => quantize_block(full, zero, blk),
            Err(_) => {
                let mut tmp = [0f32; QK];
                tmp[..src.len()].copy_from_slice(src);
                quantize_block(&tmp, zero, blk);
            }
        }
    }
}

/// `super::quantize_block32` of `x` with the values at the set bits of `zero` taken as zeros.
#[inline]
#[target_feature(enable = "avx2")]
fn quantize_block(x: &[f32; QK], zero: u32, blk: &mut BlockQ8A) {
    let p = x.as_ptr();
    // SAFETY: floats 0..32 of `x`; unaligned loads.
    let mut v = unsafe {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    };
    if zero != 0 {
        let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (g, vg) in v.iter_mut().enumerate() {
            let bits = _mm256_set1_epi32((zero >> (8 * g) & 0xff) as i32);
            let hit = _mm256_cmpeq_epi32(_mm256_and_si256(bits, lane_bits), lane_bits);
            // All-zero bits: +0.0, as the reference's zeros.
            *vg = _mm256_andnot_ps(_mm256_castsi256_ps(hit), *vg);
        }
    }
    let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let (d, id) = scales(max_lanes(v.map(|vg| _mm256_and_ps(vg, absm))));
    let idv = _mm256_set1_ps(id);
    let half = _mm256_set1_ps(0.5);
    let sign = _mm256_set1_ps(-0.0);
    let mut q = [_mm256_setzero_si256(); 4];
    for g in 0..4 {
        let t = _mm256_mul_ps(v[g], idv);
        let r = _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(t, sign), half));
        // `cvttps` gives i32::MIN for NaN where `as i32` gives 0.
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(t, t));
        q[g] = _mm256_andnot_si256(nan, _mm256_cvttps_epi32(r));
    }
    let sum = sum_epi32(_mm256_add_epi32(
        _mm256_add_epi32(q[0], q[1]),
        _mm256_add_epi32(q[2], q[3]),
    ));
    // The packs interleave 128-bit halves: dwords come out as q0 lo, q1 lo, q2 lo, q3 lo, q0 hi,
    // ... (codes are within ±127, so the saturation never bites).
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `qs` is 32 bytes; unaligned store.
    unsafe { _mm256_storeu_si256(blk.qs.as_mut_ptr() as *mut __m256i, packed) };
    blk.set_scale(d, sum);
}
