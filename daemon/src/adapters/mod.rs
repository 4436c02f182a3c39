//! LoRA adapters: loading PEFT folders and validating them against a base model, the pack format
//! they are imported into, and the registry of packs.

pub mod pack;
pub mod peft;
pub mod registry;
pub mod residency;

pub use pack::{ImportRequest, Manifest, PackDtype, PackError, PackInfo};
pub use peft::{AdapterError, LoraAdapter, LoraPair};
pub use registry::{EntryState, Registry, RegistryEntry};
