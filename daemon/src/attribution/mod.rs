//! Who contributed to an answer: prompt templates, client-reported contributions, and the
//! attribution event each finished request leaves in the ledger.

pub mod prompts;
pub mod record;

pub use prompts::{PromptStore, PromptTemplate};
