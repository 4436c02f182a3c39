//! edgelorad's library: model loading, adapters, the multi-LoRA engine and the command line.

pub mod adapters;
pub mod api;
pub mod attribution;
pub mod cli;
pub mod default_model;
pub mod device;
pub mod engine;
pub mod identity;
pub mod model;
pub mod sync;
pub mod update;
