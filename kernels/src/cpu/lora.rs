//! Multi-LoRA products, SGMV-style: the rows of a batch are split into segments that share an
//! adapter, and each segment gets `out += scaling * B (A x)` with its own A and B. The base
//! projection has already run once over all rows; adapters are never merged into it.

use std::ops::Range;

use crate::cpu::ops::dot;

/// One run of consecutive rows that share an adapter's A `[rank, in]` and B `[out, rank]`.
#[derive(Clone, Debug)]
pub struct LoraSegment<'a> {
    pub rows: Range<usize>,
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub scaling: f32,
}

/// Reference SGMV: shrink (`t = A x`, rank-sized) then expand (`out += scaling * B t`) per segment.
/// `x` is `[rows, in_dim]`, `out` is `[rows, out_dim]`.
pub fn sgmv_reference(
    x: &[f32],
    in_dim: usize,
    out: &mut [f32],
    out_dim: usize,
    segments: &[LoraSegment<'_>],
) {
    let mut t = Vec::new();
    for seg in segments {
        debug_assert_eq!(seg.a.len(), seg.rank * in_dim);
        debug_assert_eq!(seg.b.len(), out_dim * seg.rank);
        t.resize(seg.rank, 0.0);
        for r in seg.rows.clone() {
            let xr = &x[r * in_dim..(r + 1) * in_dim];
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = dot(&seg.a[j * in_dim..(j + 1) * in_dim], xr);
            }
            let orow = &mut out[r * out_dim..(r + 1) * out_dim];
            for (n, o) in orow.iter_mut().enumerate() {
                *o += dot(&seg.b[n * seg.rank..(n + 1) * seg.rank], &t) * seg.scaling;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_only_touch_their_rows_and_match_the_dense_formula() {
        let (in_dim, out_dim, rank) = (5, 3, 2);
        let x: Vec<f32> = (0..4 * in_dim).map(|i| (i as f32 * 0.3).sin()).collect();
        let a: Vec<f32> = (0..rank * in_dim).map(|i| (i as f32 * 0.7).cos()).collect();
        let b: Vec<f32> = (0..out_dim * rank).map(|i| i as f32 * 0.1 - 0.2).collect();
        let mut out = vec![1.0f32; 4 * out_dim];
        let seg = LoraSegment {
            rows: 1..3,
            a: &a,
            b: &b,
            rank,
            scaling: 2.0,
        };
        sgmv_reference(&x, in_dim, &mut out, out_dim, &[seg]);
        for r in 0..4 {
            for n in 0..out_dim {
                let want = if (1..3).contains(&r) {
                    let mut s = 0.0;
                    for j in 0..rank {
                        let t: f32 = (0..in_dim)
                            .map(|k| a[j * in_dim + k] * x[r * in_dim + k])
                            .sum();
                        s += b[n * rank + j] * t;
                    }
                    1.0 + 2.0 * s
                } else {
                    1.0
                };
                assert!(
                    (out[r * out_dim + n] - want).abs() < 1e-5,
                    "row {r} col {n}"
                );
            }
        }
    }
}
