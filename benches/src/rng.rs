//! A small deterministic generator (SplitMix64) for random weights and token ids: benchmarks need
//! reproducible data, not statistical quality.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-a, a).
    pub fn symmetric(&mut self, a: f32) -> f32 {
        (self.uniform() * 2.0 - 1.0) * a
    }

    /// Fills `out` with N(0, std^2) values (Box-Muller).
    pub fn fill_normal(&mut self, out: &mut [f32], std: f32) {
        let mut it = out.chunks_mut(2);
        for pair in &mut it {
            let u1 = (self.uniform() + 1.0 / (1u64 << 25) as f32).min(1.0);
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
            pair[0] = r * c;
            if pair.len() > 1 {
                pair[1] = r * s;
            }
        }
    }
}

/// A seed derived from a few integers (tensor index, chunk index, ...).
pub fn seed_of(parts: &[u64]) -> u64 {
    let mut r = Rng::new(0x5EED);
    let mut s = 0;
    for &p in parts {
        r.0 ^= p;
        s = r.next_u64();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_values_have_about_the_right_spread() {
        let mut v = vec![0f32; 100_001];
        Rng::new(1).fill_normal(&mut v, 0.02);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-3, "std {}", var.sqrt());
    }
}
