//! The attribution event in its public, string form. Interning is internal to the log
//! (`format::wire`); nothing outside this crate sees symbol ids.

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;

/// Who made one ingredient of an answer: the ingredient's id and its contributor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attribution {
    pub id: String,
    pub contributor: String,
}

impl Attribution {
    pub fn new(id: impl Into<String>, contributor: impl Into<String>) -> Self {
        Attribution {
            id: id.into(),
            contributor: contributor.into(),
        }
    }
}

/// A retrieved data chunk that went into the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataChunk {
    pub datanet: String,
    pub chunk: String,
    pub contributor: String,
    pub score: f32,
    /// The client said it used this chunk; the device did not retrieve it itself.
    pub client_reported: bool,
}

/// A tool the request called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolUse {
    pub id: String,
    pub contributor: String,
    pub client_reported: bool,
}

/// How the request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Stop,
    Length,
    Cancelled,
    Error,
}

/// Everything the daemon knows about one finished request; the ledger adds the sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    /// Completion time, Unix milliseconds.
    pub time_ms: u64,
    /// A digest of the request (e.g. SHA-256 of the canonical request body).
    pub request_digest: [u8; 32],
    pub base_model: Attribution,
    pub adapter: Option<Attribution>,
    pub prompt_template: Option<Attribution>,
    pub data_chunks: Vec<DataChunk>,
    pub tools: Vec<ToolUse>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u32,
    pub outcome: Outcome,
}

/// A logged event: the body and its sequence number. Its `postcard` encoding is what the Merkle
/// leaf hashes (`merkle::leaf_hash_of_event`), so the tree commits to strings, not symbol ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub body: EventBody,
}

/// Longest accepted string (id, contributor, datanet, chunk).
pub const MAX_STRING_BYTES: usize = 1024;
/// Most data chunks or tools one event may carry.
pub const MAX_LIST_LEN: usize = 256;

impl EventBody {
    /// Rejects what the log will not store: empty or overlong strings, too many chunks or tools,
    /// a non-finite score. Called by `append` before anything is queued.
    pub fn validate(&self) -> Result<(), LedgerError> {
        fn s(what: &str, v: &str) -> Result<(), LedgerError> {
            if v.is_empty() {
                return Err(LedgerError::InvalidEvent(format!("{what} is empty")));
            }
            if v.len() > MAX_STRING_BYTES {
                return Err(LedgerError::InvalidEvent(format!(
                    "{what} is {} bytes, longer than {MAX_STRING_BYTES}",
                    v.len()
                )));
            }
            Ok(())
        }
        fn a(what: &str, v: &Attribution) -> Result<(), LedgerError> {
            s(&format!("{what} id"), &v.id)?;
            s(&format!("{what} contributor"), &v.contributor)
        }
        a("base model", &self.base_model)?;
        if let Some(x) = &self.adapter {
            a("adapter", x)?;
        }
        if let Some(x) = &self.prompt_template {
            a("prompt template", x)?;
        }
        if self.data_chunks.len() > MAX_LIST_LEN || self.tools.len() > MAX_LIST_LEN {
            return Err(LedgerError::InvalidEvent(format!(
                "at most {MAX_LIST_LEN} data chunks and {MAX_LIST_LEN} tools per event"
            )));
        }
        for c in &self.data_chunks {
            s("datanet", &c.datanet)?;
            s("chunk", &c.chunk)?;
            s("chunk contributor", &c.contributor)?;
            if !c.score.is_finite() {
                return Err(LedgerError::InvalidEvent(format!(
                    "score of chunk {} is not finite",
                    c.chunk
                )));
            }
        }
        for t in &self.tools {
            s("tool id", &t.id)?;
            s("tool contributor", &t.contributor)?;
        }
        Ok(())
    }
}
