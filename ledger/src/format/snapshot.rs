//! Payload of a `Snapshot` frame: enough state that open can start replaying here instead of at
//! the beginning of the log.

use serde::{Deserialize, Serialize};

use crate::counters::CounterRow;
use crate::merkle::Hash;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Every event with a smaller sequence number is summarized here; replay resumes at the
    /// frame after this one.
    pub next_seq: u64,
    pub epoch: u32,
    pub epoch_first_seq: u64,
    /// The epoch's tree at this point: its size and right edge (largest subtree first).
    pub tree_size: u64,
    pub right_edge: Vec<Hash>,
    pub counters: Vec<CounterRow>,
}
