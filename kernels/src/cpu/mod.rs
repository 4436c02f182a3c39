//! CPU kernels.

pub mod attention;
pub mod dense;
pub mod kv;
pub mod lora;
pub mod ops;
pub mod q4;
pub mod q8;
pub mod threads;
pub mod weight;
