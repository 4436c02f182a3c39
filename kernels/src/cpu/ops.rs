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

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
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
        let half = self.inv_freq.len();
        let d = self.head_dim;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = pos as f32 * f;
            let (s, c) = angle.sin_cos();
            let (c, s) = (c * self.mscale, s * self.mscale);
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
        assert_ne!(x, vec![1.0, 2.0, 3.0, 4.0]);
    }
}
