//! Multi-LoRA products, SGMV-style: the rows of a batch are split into segments that share an
//! adapter, and each segment gets `out += scaling * B (A x)` with its own A and B. The base
//! projection has already run once over all rows; adapters are never merged into it.

use std::ops::Range;

use crate::Q8Matrix;
use crate::cpu::act::{ActQ8, BlockQ8A};
use crate::cpu::ops::dot;
use crate::cpu::q4::{QK, TILE_ROWS};
use crate::cpu::q8::Q8Rows;
use crate::cpu::qdot::{Isa, TileOut, q8q8_tiles};
use crate::cpu::threads::SharedOut;

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

/// A segment for the int8 path: A `[rank, in]` and B transposed, `B^T [rank, out]`, as Q8_0.
#[derive(Clone, Debug)]
pub struct LoraSegmentQ8<'a> {
    pub rows: Range<usize>,
    pub a: &'a Q8Matrix,
    pub bt: &'a Q8Rows,
    pub scaling: f32,
}

/// Rows per task: the shrink reuses each A tile for up to four rows.
const ROWS_PER_TASK: usize = 4;

/// SGMV on the int8 path in one parallel region whatever the number of adapters: segments are cut
/// into pieces of at most four rows (so one adapter shared by a whole batch still uses every
/// core). Shrink `t = A x` with the quantized input (its outliers applied exactly), then expand
/// `out += scaling * B t` with `t` in f32 as rank-many row updates from `B^T`, which vectorize.
/// `out` is `[rows, out_dim]`.
pub fn sgmv_q8(
    x: &ActQ8,
    out: &mut [f32],
    out_dim: usize,
    segments: &[LoraSegmentQ8<'_>],
    isa: Isa,
) {
    sgmv_q8_many(x, &mut [(out, out_dim, segments)], isa);
}

/// The LoRA deltas of several projections of the same input (q, k and v; gate and up) in one
/// parallel region: `jobs[i] = (out, out_dim, segments)`. A region costs a wake-up and a barrier
/// of the pool, which for a small model's narrow projections is as much as the work.
pub fn sgmv_q8_many(x: &ActQ8, jobs: &mut [(&mut [f32], usize, &[LoraSegmentQ8<'_>])], isa: Isa) {
    let mut pieces = Vec::new();
    for (ji, (out, out_dim, segments)) in jobs.iter().enumerate() {
        assert_eq!(out.len(), x.rows() * out_dim, "output shape");
        for (si, s) in segments.iter().enumerate() {
            assert!(
                s.rows.end <= x.rows() && s.a.cols() == x.cols(),
                "segment rows or input width"
            );
            assert!(
                s.bt.cols() == *out_dim && s.bt.rows() == s.a.rows(),
                "B^T shape"
            );
            let mut r = s.rows.start;
            while r < s.rows.end {
                let e = (r + ROWS_PER_TASK).min(s.rows.end);
                pieces.push((ji, si, r..e));
                r = e;
            }
        }
    }
    if pieces.is_empty() {
        return;
    }
    let ops: Vec<(SharedOut, usize, &[LoraSegmentQ8<'_>])> = jobs
        .iter_mut()
        .map(|(o, d, segs)| (SharedOut::new(o), *d, *segs))
        .collect();
    crate::cpu::threads::global().run(pieces.len(), &|pi| {
        let (ji, si, rows) = &pieces[pi];
        let (op, out_dim, segments) = ops[*ji];
        let seg = &segments[*si];
        let rank = seg.a.rows();
        let groups = seg.a.row_groups();
        let n = rows.len();
        let xs: Vec<&[BlockQ8A]> = rows.clone().map(|r| x.row(r)).collect();
        // t[i][j]: rank values per row, padded to whole tiles.
        let mut t = vec![[0f32; TILE_ROWS]; n * groups];
        let mut tmp: TileOut = [[0f32; TILE_ROWS]; 4];
        for g in 0..groups {
            q8q8_tiles(isa, seg.a.group_tiles(g), &xs, &mut tmp);
            for i in 0..n {
                t[i * groups + g] = tmp[i];
                for &(k, v) in x.outliers(rows.start + i) {
                    for (ti, c) in t[i * groups + g]
                        .iter_mut()
                        .zip(seg.a.group_column(g, k as usize))
                    {
                        *ti += v * c;
                    }
                }
            }
        }
        // Expand: per output row and block of 32 columns, the rank updates are summed in
        // registers straight from the int8 codes of B^T (plain row order), then added once.
        let coef: Vec<f32> = (0..n)
            .flat_map(|i| {
                let t = &t;
                (0..rank).map(move |j| seg.scaling * t[i * groups + j / TILE_ROWS][j % TILE_ROWS])
            })
            .collect();
        for i in 0..n {
            let r = rows.start + i;
            // SAFETY: row r belongs to this piece only; in bounds by the asserts.
            let orow = unsafe { op.slice_mut(r * out_dim, out_dim) };
            expand_row_dispatch(isa, orow, &coef[i * rank..(i + 1) * rank], seg.bt);
        }
    });
}

/// `orow += Σ_j c[j] · B^T[j]`, per 32-column block summed in registers straight from the int8
/// codes, then added once.
#[inline(always)]
fn expand_row(orow: &mut [f32], c: &[f32], bt: &Q8Rows) {
    let bpr = bt.blocks_per_row();
    let out_dim = orow.len();
    for b in 0..bpr {
        let mut acc = [0f32; QK];
        for (j, &cj) in c.iter().enumerate() {
            let cd = cj * bt.d[j * bpr + b];
            let q: &[i8; QK] = bt.q[(j * bpr + b) * QK..][..QK]
                .try_into()
                .expect("32 codes");
            for (a, &v) in acc.iter_mut().zip(q) {
                *a += cd * v as f32;
            }
        }
        let k0 = b * QK;
        let k1 = (k0 + QK).min(out_dim);
        for (o, a) in orow[k0..k1].iter_mut().zip(acc) {
            *o += a;
        }
    }
}

/// The same loop compiled for AVX2 + FMA (the crate's baseline is plain x86-64, where it
/// vectorizes to 4-wide SSE without FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn expand_row_avx2(orow: &mut [f32], c: &[f32], bt: &Q8Rows) {
    expand_row(orow, c, bt)
}

fn expand_row_dispatch(isa: Isa, orow: &mut [f32], c: &[f32], bt: &Q8Rows) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: these instruction sets are only chosen when the CPU has AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { expand_row_avx2(orow, c, bt) },
        _ => expand_row(orow, c, bt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_sgmv_follows_the_reference_for_every_isa() {
        // 40: one partial chunk of the expand; 300: a whole chunk, then a partial block.
        for out_dim in [40, 300] {
            int8_sgmv_case(out_dim);
        }
    }

    fn int8_sgmv_case(out_dim: usize) {
        let (in_dim, rank, rows) = (96, 16, 5);
        let x: Vec<f32> = (0..rows * in_dim)
            .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 0.5)
            .collect();
        let a: Vec<f32> = (0..rank * in_dim)
            .map(|i| ((i * 104729 % 97) as f32 / 48.0 - 1.0) * 0.1)
            .collect();
        let b: Vec<f32> = (0..out_dim * rank)
            .map(|i| ((i * 1299709 % 89) as f32 / 44.0 - 1.0) * 0.1)
            .collect();
        let segs = [
            LoraSegment {
                rows: 0..2,
                a: &a,
                b: &b,
                rank,
                scaling: 2.0,
            },
            LoraSegment {
                rows: 3..5,
                a: &a,
                b: &b,
                rank,
                scaling: 0.5,
            },
        ];
        let mut want = vec![0.25f32; rows * out_dim];
        sgmv_reference(&x, in_dim, &mut want, out_dim, &segs);
        // B transposed, [rank, out], as the int8 path stores it.
        let bt: Vec<f32> = (0..rank * out_dim)
            .map(|i| b[(i % out_dim) * rank + i / out_dim])
            .collect();
        let (aq, bq) = (
            Q8Matrix::quantize(&a, rank, in_dim).unwrap(),
            Q8Rows::from_matrix(&Q8Matrix::quantize(&bt, rank, out_dim).unwrap()),
        );
        let segs_q8 = [
            LoraSegmentQ8 {
                rows: 0..2,
                a: &aq,
                bt: &bq,
                scaling: 2.0,
            },
            LoraSegmentQ8 {
                rows: 3..5,
                a: &aq,
                bt: &bq,
                scaling: 0.5,
            },
        ];
        let xq = ActQ8::quantize(&x, rows, in_dim);
        let scale = want.iter().fold(0f32, |m, v| m.max((v - 0.25).abs()));
        let mut scalar = vec![0.25f32; rows * out_dim];
        sgmv_q8(&xq, &mut scalar, out_dim, &segs_q8, Isa::Scalar);
        // Three int8 roundings (x, A, B) on uniform data: a few percent of the delta's scale; a
        // wrong kernel is off by the whole delta.
        let err = scalar
            .iter()
            .zip(&want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(
            err < 0.06 * scale,
            "scalar int8 SGMV error {err} vs delta scale {scale}"
        );
        assert!(
            scalar[2 * out_dim..3 * out_dim].iter().all(|&v| v == 0.25),
            "row 2 has no adapter"
        );
        for isa in crate::cpu::qdot::available_isas() {
            let mut got = vec![0.25f32; rows * out_dim];
            sgmv_q8(&xq, &mut got, out_dim, &segs_q8, isa);
            let d = got
                .iter()
                .zip(&scalar)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            assert!(
                d < 1e-5,
                "{} differs from the scalar path by {d}",
                isa.name()
            );
        }
    }

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
