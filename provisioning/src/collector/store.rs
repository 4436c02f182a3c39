//! Where the collector keeps what devices sent: an embedded SQLite file under the fleet
//! directory by default, or a PostgreSQL database shared by several collector processes.
//!
//! Exactly-once rests on two things, in both backends: `commit` advances a device's position
//! only if it is still where the verifier read it (`expected_next_seq`, checked inside the same
//! transaction that inserts), and `(device, seq)` is a primary key, so a second copy of an event
//! can never be stored, whichever collector process tries.

use edgelora_ledger::ContributionKind;
use edgelora_ledger::merkle::Hash;

/// What the collector knows about one device's log: where its next event starts and the
/// Merkle tree of the current epoch as far as it has been stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLog {
    pub device: String,
    /// The device's current tree epoch (a device starts a new epoch after local log damage).
    pub epoch: u32,
    /// Sequence number of the epoch's leaf 0.
    pub epoch_first_seq: u64,
    /// Every event below this sequence number is stored (or recorded as a gap).
    pub next_seq: u64,
    /// The epoch's tree over the stored events: its size and right-edge nodes
    /// (`edgelora_ledger::merkle::CompactRange::{size, nodes}`).
    pub tree_size: u64,
    pub tree_nodes: Vec<Hash>,
    /// The last checkpoint accepted in this epoch (its signed note text), if any.
    pub checkpoint: Option<String>,
    /// Set once the device sent something contradicting what it signed; uploads are refused.
    pub suspect: Option<String>,
}

/// One event to store: what the device sent, already verified.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: u64,
    pub epoch: u32,
    /// The Merkle leaf hash (SHA-256 of 0x00 || postcard(Event)).
    pub leaf_hash: Hash,
    /// postcard(EventBody), kept verbatim for audits and re-exports.
    pub body: Vec<u8>,
    pub time_ms: u64,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// `edgelora_ledger::Outcome` as 0 Stop, 1 Length, 2 Cancelled, 3 Error.
    pub outcome: u8,
    /// Every distinct (contributor, kind) the event credits (`edgelora_ledger::credits`).
    pub credits: Vec<(String, ContributionKind)>,
}

/// Sequence numbers a device declared lost (it started a new epoch after local damage before
/// they reached the collector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub from_seq: u64,
    /// Exclusive.
    pub to_seq: u64,
    pub epoch: u32,
}

/// One upload's verified result, applied atomically by `Store::commit`.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The device's `next_seq` as read before verifying (`None`: the device had no row yet).
    pub expected_next_seq: Option<u64>,
    /// The device's state after this upload (its `suspect` is left as stored).
    pub new_state: DeviceLog,
    /// New events, contiguous from `expected_next_seq` (or from the gap's end).
    pub events: Vec<StoredEvent>,
    pub gap: Option<Gap>,
    /// The checkpoint accepted with this upload: (epoch, tree size, root, note).
    pub checkpoint: Option<(u32, u64, Hash, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Stored this many events.
    Stored(u64),
    /// Another upload for the device moved its position first, or the device was flagged as
    /// suspect meanwhile; nothing was written. Re-read the state and verify again (a suspect
    /// device is then refused).
    Conflict,
}

/// Totals for one (contributor, kind) or one device or one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContributorRow {
    pub contributor: String,
    pub kind: String,
    #[serde(flatten)]
    pub totals: Totals,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceRow {
    pub device: String,
    /// Events stored.
    pub events: u64,
    pub next_seq: u64,
    pub epoch: u32,
    /// Events declared lost (gaps).
    pub lost: u64,
    pub suspect: Option<String>,
    /// Tokens over the device's events (each event once, not per credit).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KindRow {
    pub kind: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// What `edgelora-fleet report` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Sorted by contributor, then kind.
    pub contributors: Vec<ContributorRow>,
    /// Sorted by device.
    pub devices: Vec<DeviceRow>,
    /// Sorted by kind name.
    pub kinds: Vec<KindRow>,
}

/// The collector's storage. Implementations are blocking; the server calls them from
/// `spawn_blocking`. They must be safe to call from many threads at once.
pub trait Store: Send + Sync + 'static {
    /// The device's state, or `None` if it never uploaded.
    fn device_log(&self, device: &str) -> anyhow::Result<Option<DeviceLog>>;
    /// Leaf hashes of the stored events `from..to` of `device`, in sequence order (missing
    /// sequence numbers are simply absent).
    fn leaf_hashes(&self, device: &str, from: u64, to: u64) -> anyhow::Result<Vec<(u64, Hash)>>;
    /// Applies one verified upload atomically (see `Commit`, `CommitOutcome`).
    fn commit(&self, commit: &Commit) -> anyhow::Result<CommitOutcome>;
    /// Flags the device (creating its row if needed); its data stays.
    fn mark_suspect(&self, device: &str, reason: &str) -> anyhow::Result<()>;
    /// Totals per contributor and kind, per device, per kind; `device` limits it to one device.
    fn report(&self, device: Option<&str>) -> anyhow::Result<Report>;
    /// Number of stored events of `device` and the number of distinct sequence numbers among
    /// them (equal unless something was stored twice; a check for tests and audits).
    fn event_count(&self, device: &str) -> anyhow::Result<(u64, u64)>;
    /// What the backend is ("sqlite /path", "postgres host/db").
    fn describe(&self) -> String;
}
