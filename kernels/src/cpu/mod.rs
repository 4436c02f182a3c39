//! CPU kernels.

pub mod dense;
pub mod ops;
pub mod q4;
pub mod q8;
pub mod weight;
