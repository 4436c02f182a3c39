//! edgelora compute kernels: weight formats (INT4, Q8, dense), matrix products, norms, RoPE and
//! paged-KV attention. Pure compute, no I/O: loaders live in the daemon and hand us plain buffers.
//!
//! Every optimized kernel keeps a plain reference beside it (`*_reference`) and a test comparing the
//! two; the references are tested against the Hugging Face goldens by the `edgelora-tests` crate.

pub mod cpu;
pub mod cuda;

pub use cpu::dense::DenseMatrix;
pub use cpu::q4::{BlockQ4, Q4Kind, Q4Matrix, QK, TILE_ROWS, TileQ4};
pub use cpu::q8::TileQ8;
pub use cpu::q8::{BlockQ8, Q8Matrix};
pub use cpu::weight::Weight;

/// Errors from constructing kernel-side data from caller-provided buffers.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}
