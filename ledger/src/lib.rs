//! The attribution ledger: every finished inference request leaves exactly one attribution
//! event in a compact, append-only, checksummed log; the device signs Merkle checkpoints of the
//! log so history cannot be rewritten unnoticed; counters per contributor are derived from it.
//!
//! ```no_run
//! use edgelora_ledger::{Ledger, LedgerConfig, LedgerKey};
//! # fn body() -> edgelora_ledger::EventBody { unimplemented!() }
//! let key = LedgerKey::load_or_create("/var/lib/edgelora/ledger.key".as_ref(), "box-17")?;
//! let (ledger, report) = Ledger::open("/var/lib/edgelora/ledger", LedgerConfig::new("box-17", key))?;
//! if !report.damage.is_empty() { /* surface on /health */ }
//! let seq = ledger.append(body()).wait()?; // durable once this returns
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The on-disk format, recovery rules, checkpoint format and durability contract are in
//! README.md beside this crate.

pub mod bench;
mod checkpoint;
mod config;
mod counters;
mod error;
mod event;
pub mod format;
mod handle;
pub mod inspect;
mod key;
pub mod merkle;
mod recovery;
mod report;
mod segment;
mod state;
pub mod sync;
mod ticket;
pub mod torture;
mod verify;
mod writer;

pub use checkpoint::{Checkpoint, NoteError, epoch_of_origin, origin_for};
pub use config::{Durability, LedgerConfig};
pub use counters::{ContributionKind, Counter, CounterRow, Counters, credits};
pub use error::{KeyError, LedgerError};
pub use event::{
    Attribution, DataChunk, Event, EventBody, MAX_LIST_LEN, MAX_STRING_BYTES, Outcome, ToolUse,
};
pub use handle::{
    ConsistencyProof, EventProof, EventProofError, Ledger, LedgerHandle, PUBLIC_KEY_FILE,
};
pub use key::{LedgerKey, PublicKey};
pub use report::{Damage, DamageKind, OpenReport};
pub use segment::QUARANTINE_SUFFIX;
pub use state::LedgerStats;
pub use ticket::Ticket;
pub use verify::{VerifyError, VerifyReport, verify};
