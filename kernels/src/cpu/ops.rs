//! Element-wise and small vector operations of the forward pass, in f32.

/// Dot product. Eight independent partial sums let the compiler vectorize it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, ra) = a.split_at(a.len() / 8 * 8);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out = x * rsqrt(mean(x^2) + eps) * w` (weight multiplies after normalisation, as HF).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = (v * inv) * g;
    }
}

/// [`rms_norm`] applied to each row of `x` (`[rows, w.len()]`).
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        rms_norm(xr, w, eps, or);
    }
}

// Cephes' single-precision exp: ln 2 in two parts, and the polynomial's coefficients.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
/// The clamp of [`exp_cephes`]'s argument: `exp(EXP_MIN)` is about 1.6e-38 (no subnormals),
/// `exp(EXP_MAX)` about 1.65e38 (no infinity).
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;

/// `exp(x)` for attention's softmax weights and for SiLU, `x` clamped to `[EXP_MIN, EXP_MAX]`:
/// Cephes' range reduction `x = n ln 2 + r` and degree-7 polynomial in `r`, from basic
/// operations only (no fused multiply-add, rounding to nearest even), so that the eight lanes of
/// [`exp_cephes8_avx2`] give the same bits; within a few ulp of `exp` (tested). libm's `expf`,
/// one call per value, was a third of an attention page's work and most of SwiGLU's.
#[inline(always)]
pub(crate) fn exp_cephes(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let y = (p * (r * r) + r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// [`exp_cephes`] of eight lanes: the same operations lane by lane, so the same bits.
///
/// # Safety
/// The CPU must have AVX2 (the caller's own `target_feature` or a run-time check).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn exp_cephes8_avx2(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(v, _mm256_set1_ps(EXP_MIN)),
        _mm256_set1_ps(EXP_MAX),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_sub_ps(
        _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
        _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
    );
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r),
        _mm256_set1_ps(1.0),
    );
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_cephes(-x))
}

/// `gate[i] = silu(gate[i]) * up[i]`; eight at a time with AVX2, the same bits.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above).
        unsafe { swiglu_avx2(gate, up) };
        return;
    }
    swiglu_scalar(gate, up)
}

fn swiglu_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn swiglu_avx2(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    let mut g8 = gate.chunks_exact_mut(8);
    let mut u8 = up.chunks_exact(8);
    for (g, u) in (&mut g8).zip(&mut u8) {
        // SAFETY: both chunks hold eight values.
        unsafe {
            let x = _mm256_loadu_ps(g.as_ptr());
            let e = exp_cephes8_avx2(_mm256_xor_ps(x, _mm256_set1_ps(-0.0))); // -x, as `silu`
            let s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(
                g.as_mut_ptr(),
                _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr())),
            );
        }
    }
    swiglu_scalar(g8.into_remainder(), u8.remainder());
}

/// Rotary embedding tables: `inv_freq[i]` for i in 0..rot_dim/2.
#[derive(Clone, Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    pub head_dim: usize,
    /// Attention-factor multiplier on cos/sin (1 for the default and llama3 types).
    pub mscale: f32,
}

impl Rope {
    /// Applies NeoX-style (`rotate_half`) rotation in place to `n_heads` heads at `pos`:
    /// dim i pairs with dim i + d/2.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, pos: usize) {
        let mut cs = Vec::with_capacity(self.inv_freq.len());
        self.angles(pos, &mut cs);
        self.apply_at(x, n_heads, &cs);
    }

    /// Appends to `out` the rotations at `pos`, (cos, sin) times `mscale` per dim pair, for
    /// [`Self::apply_at`]. A step rotates every layer's queries and keys at the same positions:
    /// the engine computes them once per row and step, where `apply` per layer and head kind
    /// called `sin_cos` sixty times as often on a 30-layer model.
    pub fn angles(&self, pos: usize, out: &mut Vec<(f32, f32)>) {
        out.extend(self.inv_freq.iter().map(|&f| {
            let (s, c) = (pos as f32 * f).sin_cos();
            (c * self.mscale, s * self.mscale)
        }));
    }

    /// [`Self::apply`] with the rotations from [`Self::angles`]: the same bits.
    pub fn apply_at(&self, x: &mut [f32], n_heads: usize, cs: &[(f32, f32)]) {
        let half = self.inv_freq.len();
        let d = self.head_dim;
        assert_eq!(cs.len(), half, "one rotation per dim pair");
        for (i, &(c, s)) in cs.iter().enumerate() {
            for h in 0..n_heads {
                let base = h * d;
                let a = x[base + i];
                let b = x[base + i + half];
                x[base + i] = a * c - b * s;
                x[base + i + half] = b * c + a * s;
            }
        }
    }
}

/// log-softmax value of `logits[idx]`, computed in f64 for stable scoring.
pub fn log_softmax_at(logits: &[f32], idx: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[idx] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum_on_odd_lengths() {
        for n in [1usize, 7, 8, 9, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 / (i as f32 + 1.0)).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm_elsewhere() {
        let rope = Rope {
            inv_freq: vec![1.0, 0.1],
            head_dim: 4,
            mscale: 1.0,
        };
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rope.apply(&mut x, 1, 0);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0]);
        rope.apply(&mut x, 1, 5);
        let n: f32 = x.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
        // rotate_half: pair (0, 2) by 5 radians, pair (1, 3) by 0.5.
        let (s0, c0) = 5f32.sin_cos();
        let (s1, c1) = 0.5f32.sin_cos();
        let want = [
            1.0 * c0 - 3.0 * s0,
            2.0 * c1 - 4.0 * s1,
            3.0 * c0 + 1.0 * s0,
            4.0 * c1 + 2.0 * s1,
        ];
        for (g, w) in x.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{x:?} vs {want:?}");
        }
        // From precomputed rotations, over two heads: the same bits as `apply` on each.
        let mut two: Vec<f32> = (0..8).map(|i| i as f32 - 2.5).collect();
        let mut each = two.clone();
        let mut cs = Vec::new();
        rope.angles(7, &mut cs);
        rope.apply_at(&mut two, 2, &cs);
        rope.apply(&mut each[..4], 1, 7);
        rope.apply(&mut each[4..], 1, 7);
        assert_eq!(two, each);
    }

    #[test]
    fn swiglu_is_close_to_the_exact_formula_and_both_builds_agree_bit_for_bit() {
        // Gates over the clamp's range and past it, odd lengths (eight-lane tails).
        for n in [1usize, 7, 8, 13, 1536, 1539] {
            let gate: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 2000) as f32 * 0.1 - 100.0)
                .collect();
            let up: Vec<f32> = (0..n).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
            let mut fast = gate.clone();
            swiglu(&mut fast, &up);
            let mut scalar = gate.clone();
            swiglu_scalar(&mut scalar, &up);
            for i in 0..n {
                let (g, u) = (gate[i] as f64, up[i] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                let tol = 4.0 * f32::EPSILON as f64 * want.abs() + 1e-30;
                assert!(
                    (scalar[i] as f64 - want).abs() <= tol,
                    "n {n} i {i}: {} against {want}",
                    scalar[i]
                );
                assert_eq!(fast[i].to_bits(), scalar[i].to_bits(), "n {n} i {i}");
            }
        }
    }
}
