//! Full-precision (f32) row-major matrices: embeddings, output heads, norms, and every projection
//! under `--dtype f32`.

use crate::KernelError;

#[derive(Clone, Debug)]
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl DenseMatrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, KernelError> {
        if data.len() != rows * cols || rows == 0 || cols == 0 {
            return Err(KernelError::Shape(format!(
                "dense matrix [{rows}, {cols}] from {} values",
                data.len()
            )));
        }
        Ok(Self { rows, cols, data })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn row(&self, n: usize) -> &[f32] {
        &self.data[n * self.cols..(n + 1) * self.cols]
    }
    pub fn nbytes(&self) -> usize {
        self.data.len() * 4
    }

    /// Reference product, same contract as [`crate::Q4Matrix::matmul_reference`].
    pub fn matmul_reference(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols);
        assert_eq!(out.len(), m * self.rows);
        for n in 0..self.rows {
            let w = self.row(n);
            for r in 0..m {
                out[r * self.rows + n] =
                    crate::cpu::ops::dot(w, &x[r * self.cols..(r + 1) * self.cols]);
            }
        }
    }
}
