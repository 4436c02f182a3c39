//! Threaded products of a [`Weight`] with a batch of activation rows, in two modes:
//! * exact: f32 activations against the dequantized weights (the reference arithmetic; goldens);
//! * int8: activations quantized per block of 32 ([`ActQ8`]) against INT4 / Q8_0 weights with
//!   integer SIMD dot products — the fast default, as llama.cpp does.
//!
//! Both loop over weight rows outermost, so each weight byte is read from memory once per call
//! whatever the number of activation rows, and split the rows across the thread pool.

use crate::Weight;
use crate::cpu::act::{ActQ8, BlockQ8A};
use crate::cpu::ops::dot;
use crate::cpu::q4::TILE_ROWS;
use crate::cpu::qdot::{Isa, TileOut, best_isa, q4q8_tiles, q8q8_tiles};
use crate::cpu::threads::{SharedOut, parallel_ranges};

/// Output rows per task are a multiple of this (cache-line-friendly writes for m = 1).
const ROW_ALIGN: usize = 16;
/// Row groups (of eight rows) per task are a multiple of this.
const GROUP_ALIGN: usize = 2;

/// How a projection's input is presented.
pub struct Input<'a> {
    /// `[m, cols]` f32 activations.
    pub x: &'a [f32],
    pub m: usize,
    /// The same activations quantized, when the fast path is on.
    pub q8: Option<&'a ActQ8>,
}

impl Weight {
    /// `out [m, rows] = x [m, cols] W^T`, exact f32 activations, threaded.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(x.len(), m * cols, "activation shape");
        assert_eq!(out.len(), m * rows, "output shape");
        let op = SharedOut::new(out);
        parallel_ranges(rows, ROW_ALIGN, &|range| {
            let mut wrow = vec![0f32; cols];
            for n in range {
                let w: &[f32] = match self {
                    Weight::F32(d) => d.row(n),
                    _ => {
                        self.dequantize_row(n, &mut wrow);
                        &wrow
                    }
                };
                for r in 0..m {
                    let v = dot(w, &x[r * cols..(r + 1) * cols]);
                    // SAFETY: index < m * rows; row n belongs to this task only.
                    unsafe { op.write(r * rows + n, v) };
                }
            }
        });
    }

    /// Column `k` of the eight rows of row group `g`, dequantized (rows past the end are zero).
    /// Reads one tile: what the outlier correction needs per outlier and row group.
    pub fn group_column(&self, g: usize, k: usize) -> [f32; TILE_ROWS] {
        match self {
            Weight::F32(d) => std::array::from_fn(|i| {
                let n = g * TILE_ROWS + i;
                if n < d.rows() { d.row(n)[k] } else { 0.0 }
            }),
            Weight::Q4(w) => w.group_column(g, k),
            Weight::Q8(w) => w.group_column(g, k),
        }
    }

    /// Fast path when `inp.q8` is given and the weight is quantized; exact otherwise.
    pub fn matmul_input(&self, inp: &Input<'_>, out: &mut [f32]) {
        match (self, inp.q8) {
            (Weight::Q4(_) | Weight::Q8(_), Some(q)) => self.matmul_q8(q, best_isa(), out),
            _ => self.matmul(inp.x, inp.m, out),
        }
    }

    /// `out [m, rows] = x W^T` with int8 activations on the given instruction-set path.
    /// Dense weights are not supported here (they take the exact path).
    pub fn matmul_q8(&self, x: &ActQ8, isa: Isa, out: &mut [f32]) {
        Self::matmul_q8_many(&mut [(self, out)], x, isa);
    }

    /// Several products of the same int8 input (q, k and v; gate and up) in one parallel region:
    /// fewer barriers per token and one balanced split of all their rows.
    pub fn matmul_q8_many(jobs: &mut [(&Weight, &mut [f32])], x: &ActQ8, isa: Isa) {
        let m = x.rows();
        let mut starts = Vec::with_capacity(jobs.len() + 1);
        let mut total = 0;
        for (w, out) in jobs.iter() {
            assert!(
                !matches!(w, Weight::F32(_)),
                "dense weights take the exact path"
            );
            assert_eq!(x.cols(), w.cols(), "activation width");
            assert_eq!(out.len(), m * w.rows(), "output shape");
            starts.push(total);
            total += w.rows().div_ceil(TILE_ROWS);
        }
        starts.push(total);
        let outs: Vec<(&Weight, SharedOut)> = jobs
            .iter_mut()
            .map(|(w, o)| (*w, SharedOut::new(o)))
            .collect();
        let xrows: Vec<&[BlockQ8A]> = (0..m).map(|r| x.row(r)).collect();
        parallel_ranges(total, GROUP_ALIGN, &|range| {
            for gg in range {
                let j = starts.partition_point(|&s| s <= gg) - 1;
                let (w, op) = outs[j];
                w.q8_group(gg - starts[j], x, &xrows, isa, op);
            }
        });
    }

    /// Row group `g` of `x W^T` into `op` (`[m, rows]`).
    fn q8_group(&self, g: usize, x: &ActQ8, xrows: &[&[BlockQ8A]], isa: Isa, op: SharedOut) {
        let (rows, m) = (self.rows(), xrows.len());
        let mut tmp: TileOut = [[0f32; TILE_ROWS]; 4];
        for r0 in (0..m).step_by(4) {
            let xs = &xrows[r0..(r0 + 4).min(m)];
            match self {
                Weight::Q4(w) => q4q8_tiles(isa, w.kind(), w.group_tiles(g), xs, &mut tmp),
                Weight::Q8(w) => q8q8_tiles(isa, w.group_tiles(g), xs, &mut tmp),
                Weight::F32(_) => unreachable!("dense weights take the exact path"),
            }
            let n0 = g * TILE_ROWS;
            let n1 = (n0 + TILE_ROWS).min(rows);
            if x.has_outliers() {
                for (i, vals) in tmp[..xs.len()].iter_mut().enumerate() {
                    for &(k, v) in x.outliers(r0 + i) {
                        let col = self.group_column(g, k as usize);
                        for (o, c) in vals.iter_mut().zip(col) {
                            *o += v * c;
                        }
                    }
                }
            }
            for (i, vals) in tmp[..xs.len()].iter().enumerate() {
                for (n, &v) in (n0..n1).zip(vals) {
                    // SAFETY: index < m * rows; row group g belongs to this task only.
                    unsafe { op.write((r0 + i) * rows + n, v) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::qdot::available_isas;
    use crate::{BlockQ8, DenseMatrix, Q4Kind, Q4Matrix, Q8Matrix};
    use half::f16;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// An affine (Q4_1-like) matrix with random codes, scales and offsets.
    fn affine(rows: usize, cols: usize, g: &mut Lcg) -> Q4Matrix {
        let bpr = cols.div_ceil(32);
        let blocks = (0..rows * bpr)
            .map(|_| {
                let mut b = crate::BlockQ4 {
                    d: f16::from_f32(g.next().abs() * 0.1 + 0.01).to_bits(),
                    m: f16::from_f32(g.next() * 0.5).to_bits(),
                    qs: [0; 16],
                };
                for j in 0..32 {
                    b.set_code(j, ((g.next() + 1.0) * 7.99) as u8);
                }
                b
            })
            .collect();
        Q4Matrix::from_blocks(rows, cols, Q4Kind::Affine, blocks).unwrap()
    }

    fn q8(rows: usize, cols: usize, g: &mut Lcg) -> Q8Matrix {
        let blocks = (0..rows * cols.div_ceil(32))
            .map(|_| {
                let mut qs = [0i8; 32];
                for q in qs.iter_mut() {
                    *q = (g.next() * 127.0) as i8;
                }
                qs[3] = -128; // the extreme a sign trick must survive
                BlockQ8 {
                    d: f16::from_f32(g.next().abs() * 0.02).to_bits(),
                    qs,
                }
            })
            .collect();
        Q8Matrix::from_blocks(rows, cols, blocks).unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}: [{i}] {x} vs {y}"
            );
        }
    }

    #[test]
    fn every_isa_matches_the_scalar_reference_on_random_shapes_with_partial_blocks() {
        let mut g = Lcg(11);
        for &(rows, cols, m) in &[
            (1, 32, 1),
            (7, 40, 1),
            (33, 176, 3),
            (64, 576, 5),
            (17, 1536, 8),
            (5, 16, 2),
            (24, 96, 13),
            (16, 64, 16),
        ] {
            let x = g.vec(m * cols);
            let xq = ActQ8::quantize(&x, m, cols);
            let wq = Weight::Q4(Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap());
            let wa = Weight::Q4(affine(rows, cols, &mut g));
            let w8 = Weight::Q8(q8(rows, cols, &mut g));
            for w in [&wq, &wa, &w8] {
                let mut want = vec![0f32; m * rows];
                w.matmul_q8(&xq, Isa::Scalar, &mut want);
                for isa in available_isas() {
                    let mut got = vec![0f32; m * rows];
                    w.matmul_q8(&xq, isa, &mut got);
                    close(
                        &got,
                        &want,
                        1e-5,
                        &format!("{} {} [{rows},{cols}] m={m}", isa.name(), w.format_name()),
                    );
                }
            }
        }
    }

    #[test]
    fn the_simd_paths_of_this_cpu_are_among_those_tested() {
        let isas = available_isas();
        eprintln!(
            "paths under test: {:?}",
            isas.iter().map(|i| i.name()).collect::<Vec<_>>()
        );
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert!(isas.contains(&Isa::Avx2));
        }
        #[cfg(target_arch = "aarch64")]
        assert!(
            isas.contains(&Isa::Neon),
            "NEON is architectural on aarch64"
        );
        assert_eq!(best_isa(), *isas.last().unwrap());
    }

    #[test]
    fn int8_activations_stay_close_to_the_exact_product() {
        let mut g = Lcg(5);
        let (rows, cols, m) = (48, 256, 2);
        let x = g.vec(m * cols);
        let w = Weight::Q4(affine(rows, cols, &mut g));
        let mut exact = vec![0f32; m * rows];
        w.matmul(&x, m, &mut exact);
        let mut fast = vec![0f32; m * rows];
        w.matmul_q8(&ActQ8::quantize(&x, m, cols), best_isa(), &mut fast);
        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = exact
            .iter()
            .zip(&fast)
            .fold(0f32, |a, (e, f)| a.max((e - f).abs()));
        assert!(
            err < 0.02 * scale,
            "int8 activations off by {err} (scale {scale})"
        );
    }

    #[test]
    fn outlier_channels_are_applied_exactly() {
        let mut g = Lcg(21);
        let (rows, cols, m) = (24, 96, 2);
        let mut x = g.vec(m * cols);
        x[5] = 900.0;
        x[cols + 70] = -700.0;
        let w = Weight::Q4(affine(rows, cols, &mut g));
        let mut exact = vec![0f32; m * rows];
        w.matmul(&x, m, &mut exact);
        let xq = ActQ8::quantize(&x, m, cols);
        assert_eq!(xq.outliers(0).len() + xq.outliers(1).len(), 2);
        for isa in available_isas() {
            let mut fast = vec![0f32; m * rows];
            w.matmul_q8(&xq, isa, &mut fast);
            // Without the outlier split the error would be of the order of the small values' sum.
            let err = exact
                .iter()
                .zip(&fast)
                .fold(0f32, |a, (e, f)| a.max((e - f).abs()));
            assert!(err < 0.05, "{}: {err}", isa.name());
        }
    }

    #[test]
    fn threaded_exact_product_equals_the_reference() {
        let mut g = Lcg(9);
        let (rows, cols, m) = (300, 70, 3);
        let x = g.vec(m * cols);
        for w in [
            Weight::Q4(Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).unwrap()),
            Weight::F32(DenseMatrix::new(rows, cols, g.vec(rows * cols)).unwrap()),
        ] {
            let mut want = vec![0f32; m * rows];
            match &w {
                Weight::Q4(q) => q.matmul_reference(&x, m, &mut want),
                Weight::F32(d) => d.matmul_reference(&x, m, &mut want),
                Weight::Q8(_) => unreachable!(),
            }
            let mut got = vec![0f32; m * rows];
            w.matmul(&x, m, &mut got);
            assert_eq!(got, want);
        }
    }
}
