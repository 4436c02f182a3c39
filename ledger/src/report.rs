//! What open found, and damage as reported to `/health`.

use std::path::PathBuf;

/// The kind of damage recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DamageKind {
    /// Bytes that fail the length/CRC checks, with intact frames after them (or anywhere in a
    /// sealed segment): not a torn tail.
    CorruptFrame,
    /// An intact frame whose content is wrong: a sequence number out of order, an undefined
    /// symbol, an undecodable payload.
    InvalidFrame,
    /// The segment header is unreadable, or disagrees with the file name.
    BadHeader,
    /// The header does not follow its predecessor: chain value, segment index, epoch, or
    /// overlapping sequence numbers.
    ChainMismatch,
    /// Sequence numbers are missing between two segments (a segment was deleted or lost).
    SequenceGap,
    /// A `*.quarantined` file left by an earlier open.
    PreviouslyQuarantined,
    /// A write or fsync failed while running; the writer stopped.
    WriteFailed,
}

/// One finding. Damage is never repaired in place: the damaged segment is renamed aside and the
/// log continues in a new segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub kind: DamageKind,
    /// The segment file as it was named when the damage was found.
    pub path: PathBuf,
    /// Byte offset of the first bad byte (0 for header and cross-segment problems).
    pub offset: u64,
    pub detail: String,
    /// Where the segment was moved, if it was quarantined.
    pub quarantined_to: Option<PathBuf>,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} in {} at byte {}: {}",
            self.kind,
            self.path.display(),
            self.offset,
            self.detail
        )?;
        if let Some(q) = &self.quarantined_to {
            write!(f, " (moved to {})", q.display())?;
        }
        Ok(())
    }
}

/// What `Ledger::open` found and did.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Events in the (non-quarantined) log.
    pub events: u64,
    /// The sequence number the next append gets.
    pub next_seq: u64,
    /// Segment files in use.
    pub segments: usize,
    /// Bytes cut from the tail of the last segment (a torn write), plus the size of an empty or
    /// half-created last segment that was removed.
    pub truncated_bytes: u64,
    /// Segments renamed to `*.quarantined` by this open.
    pub quarantined: Vec<PathBuf>,
    /// Everything found wrong, including earlier quarantines still on disk.
    pub damage: Vec<Damage>,
    /// The Merkle epoch the ledger appends to.
    pub epoch: u32,
    /// Whether this open had to start a new epoch (see README: damage after the last snapshot).
    pub new_epoch: bool,
    /// Events decoded and hashed at open (those after the last snapshot).
    pub replayed_events: u64,
}

impl OpenReport {
    /// Damage found by this open (not counting earlier quarantines).
    pub fn new_damage(&self) -> impl Iterator<Item = &Damage> {
        self.damage
            .iter()
            .filter(|d| d.kind != DamageKind::PreviouslyQuarantined)
    }
}
