//! LoRA adapters: loading PEFT folders and validating them against a base model.

pub mod peft;

pub use peft::{AdapterError, LoraAdapter, LoraPair};
