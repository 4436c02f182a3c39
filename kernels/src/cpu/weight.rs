//! A projection's weight in whichever format it was loaded, behind one product.

use crate::cpu::mem::Packable;
use crate::{DenseMatrix, Q4Matrix, Q8Matrix};

#[derive(Clone, Debug)]
pub enum Weight {
    F32(DenseMatrix),
    Q4(Q4Matrix),
    Q8(Q8Matrix),
}

impl Weight {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Weight::F32(w) => w.rows(),
            Weight::Q4(w) => w.rows(),
            Weight::Q8(w) => w.rows(),
        }
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Weight::F32(w) => w.cols(),
            Weight::Q4(w) => w.cols(),
            Weight::Q8(w) => w.cols(),
        }
    }
    /// Bytes a product reads.
    pub fn nbytes(&self) -> usize {
        match self {
            Weight::F32(w) => w.nbytes(),
            Weight::Q4(w) => w.nbytes(),
            Weight::Q8(w) => w.nbytes(),
        }
    }
    /// Hands its quantized storage to `f` (for [`crate::cpu::mem::pack`]; dense weights, the exact
    /// path's, stay where they are).
    pub fn stores(&mut self, f: &mut dyn FnMut(&mut dyn Packable)) {
        match self {
            Weight::F32(_) => {}
            Weight::Q4(w) => w.stores(f),
            Weight::Q8(w) => w.stores(f),
        }
    }
    pub fn format_name(&self) -> &'static str {
        match self {
            Weight::F32(_) => "f32",
            Weight::Q4(_) => "int4",
            Weight::Q8(_) => "q8",
        }
    }

    /// Row `n` as f32 (embedding lookup for any format).
    pub fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        match self {
            Weight::F32(w) => out.copy_from_slice(w.row(n)),
            Weight::Q4(w) => w.dequantize_row(n, out),
            Weight::Q8(w) => w.dequantize_row(n, out),
        }
    }
}
