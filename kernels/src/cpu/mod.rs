//! CPU kernels.

pub mod act;
#[cfg(target_arch = "aarch64")]
pub mod arm;
pub mod attention;
pub mod dense;
pub mod kv;
pub mod lora;
pub mod matmul;
pub mod ops;
pub mod q4;
pub mod q8;
pub mod qdot;
pub mod threads;
pub mod weight;
#[cfg(target_arch = "x86_64")]
pub mod x86;
