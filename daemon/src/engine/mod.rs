//! The engine: per-sequence KV page tables over one page pool, the batched multi-LoRA forward
//! step, sampling, generation and evaluation.

pub mod backend;
pub mod cuda;
pub mod forward;
pub mod generate;
pub mod kv;
pub mod metrics;
pub mod perplexity;
pub mod sampler;
pub mod scheduler;

pub use backend::{Backend, PagePool};
pub use edgelora_kernels::cpu::attention::SparseConfig;
pub use edgelora_kernels::cpu::kv::{KvDtype, KvPool};
pub use forward::{ForwardOptions, SeqStep, forward};
pub use kv::SeqKv;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("KV cache exhausted: {needed} more pages needed, {free} free (raise the KV budget)")]
    KvExhausted { needed: usize, free: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("sequence of {len} tokens exceeds {limit}: {why}")]
    TooLong {
        len: usize,
        limit: usize,
        why: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("compute device: {0}")]
    Device(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}
