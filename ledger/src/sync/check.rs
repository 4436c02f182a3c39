//! What the collector checks about an upload before it stores anything. Pure: the caller
//! supplies the device's state, its registered ledger key and the stored leaf hashes of any
//! events the upload resends; storage and networking are the collector's.
//!
//! The collector keeps, per device, the Merkle tree (right edge) of the events it stored in the
//! device's current epoch and the last checkpoint it accepted. An upload is accepted only if
//!
//! 1. its checkpoint is a well-formed note for this device and epoch, signed by the device's
//!    registered key;
//! 2. its events are contiguous, start no later than the collector's next sequence number, and
//!    any it resends hash to exactly what is stored;
//! 3. the tree over the stored events plus the new ones is a prefix of the signed tree
//!    (`batch_proof`), and the signed tree extends the last accepted checkpoint (`prev_proof`).
//!
//! A failure of 1 or 3 or a changed resend means the device's log contradicts what it signed:
//! `CheckError::flags_device`.

use crate::checkpoint::{Checkpoint, origin_for};
use crate::event::Event;
use crate::key::PublicKey;
use crate::merkle::{self, CompactRange, Hash};

use super::proto::{MAX_BATCH_EVENTS, RefuseCode, Upload};

/// The collector's view of one device's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogState {
    pub epoch: u32,
    pub epoch_first_seq: u64,
    /// Every event below this is stored (or was declared lost).
    pub next_seq: u64,
    /// The current epoch's tree over the stored events.
    pub tree: CompactRange,
    /// The last checkpoint accepted in the current epoch.
    pub checkpoint: Option<Checkpoint>,
}

/// An accepted upload: what to store and the state after it.
#[derive(Debug, Clone)]
pub struct Verified {
    pub state: LogState,
    /// Events not stored before, with their leaf hashes, in sequence order.
    pub new_events: Vec<(Event, Hash)>,
    /// Events of the upload that were already stored (and matched).
    pub duplicates: u32,
    /// Sequence numbers `[from, to)` the device skipped by starting a new epoch.
    pub gap: Option<(u64, u64)>,
    /// The checkpoint accepted with this upload (`None` for a pure resend, which changes
    /// nothing).
    pub accepted_checkpoint: Option<Checkpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("malformed upload: {0}")]
    Protocol(String),
    #[error("bad checkpoint: {0}")]
    BadCheckpoint(String),
    #[error("upload contradicts the device's signed log: {0}")]
    Tampered(String),
    #[error("stale upload: {0}")]
    Stale(String),
}

impl CheckError {
    /// The refusal sent to the device.
    pub fn code(&self) -> RefuseCode {
        match self {
            CheckError::Protocol(_) => RefuseCode::Protocol,
            CheckError::BadCheckpoint(_) => RefuseCode::BadCheckpoint,
            CheckError::Tampered(_) => RefuseCode::Tampered,
            CheckError::Stale(_) => RefuseCode::Stale,
        }
    }

    /// Whether the device must be flagged as suspect: it presented data its registered key
    /// did not sign, or that contradicts what it signed.
    pub fn flags_device(&self) -> bool {
        matches!(self, CheckError::BadCheckpoint(_) | CheckError::Tampered(_))
    }
}

/// The range `[from, to)` of already-stored sequence numbers the upload resends (the caller
/// fetches their stored leaf hashes for `check_upload`); `None` if it resends nothing.
pub fn resent_range(state: &LogState, upload: &Upload) -> Option<(u64, u64)> {
    let end = upload.first_seq.saturating_add(upload.events.len() as u64);
    let to = end.min(state.next_seq);
    (upload.epoch == state.epoch && upload.first_seq < to).then_some((upload.first_seq, to))
}

/// Verifies `upload` from `device_id` against `state`. `stored` holds the stored leaf hashes
/// of `resent_range(state, upload)` in sequence order.
pub fn check_upload(
    state: &LogState,
    device_id: &str,
    key: &PublicKey,
    upload: &Upload,
    stored: &[(u64, Hash)],
) -> Result<Verified, CheckError> {
    use CheckError::*;
    if upload.events.is_empty() {
        return Err(Protocol("an upload carries at least one event".into()));
    }
    if upload.events.len() > MAX_BATCH_EVENTS {
        return Err(Protocol(format!(
            "{} events in one upload; at most {MAX_BATCH_EVENTS}",
            upload.events.len()
        )));
    }

    // 1. The checkpoint: well formed, this device's, this epoch's, signed by its key.
    let cp = Checkpoint::parse(&upload.checkpoint).map_err(|e| BadCheckpoint(e.to_string()))?;
    cp.verify(key).map_err(|e| BadCheckpoint(e.to_string()))?;
    let origin = origin_for(device_id, upload.epoch);
    if cp.origin != origin {
        return Err(BadCheckpoint(format!(
            "checkpoint origin {:?}, expected {origin:?}",
            cp.origin
        )));
    }
    if cp.first_seq != upload.epoch_first_seq {
        return Err(BadCheckpoint(format!(
            "checkpoint's first-seq {} differs from the upload's epoch start {}",
            cp.first_seq, upload.epoch_first_seq
        )));
    }

    // 2. The epoch the upload continues or starts.
    let mut gap = None;
    let base = if upload.epoch < state.epoch {
        return Err(Stale(format!(
            "epoch {} is older than the collector's epoch {}",
            upload.epoch, state.epoch
        )));
    } else if upload.epoch > state.epoch || (state.next_seq == 0 && state.tree.size() == 0) {
        if upload.epoch_first_seq < state.next_seq {
            return Err(Tampered(format!(
                "epoch {} starts at seq {}, below the {} events already stored",
                upload.epoch, upload.epoch_first_seq, state.next_seq
            )));
        }
        if upload.epoch_first_seq > state.next_seq {
            gap = Some((state.next_seq, upload.epoch_first_seq));
        }
        LogState {
            epoch: upload.epoch,
            epoch_first_seq: upload.epoch_first_seq,
            next_seq: upload.epoch_first_seq,
            tree: CompactRange::new(),
            checkpoint: None,
        }
    } else {
        if upload.epoch_first_seq != state.epoch_first_seq {
            return Err(Tampered(format!(
                "epoch {} started at seq {}, the upload says {}",
                upload.epoch, state.epoch_first_seq, upload.epoch_first_seq
            )));
        }
        state.clone()
    };

    // 3. Contiguous events, starting where the collector is (or earlier: a resend).
    if upload.first_seq < base.epoch_first_seq {
        return Err(Tampered(format!(
            "event {} is before epoch {}'s first event {}",
            upload.first_seq, base.epoch, base.epoch_first_seq
        )));
    }
    if upload.first_seq > base.next_seq {
        return Err(Tampered(format!(
            "events {}..{} are missing: the upload starts at {}",
            base.next_seq, upload.first_seq, upload.first_seq
        )));
    }
    for (i, e) in upload.events.iter().enumerate() {
        let want = upload.first_seq + i as u64;
        if e.seq != want {
            return Err(Tampered(format!(
                "event at position {i} has seq {}, expected {want} (reordered or removed events)",
                e.seq
            )));
        }
        e.body
            .validate()
            .map_err(|err| Tampered(format!("event {}: {err}", e.seq)))?;
    }

    // Resent events must be exactly what is stored.
    let mut buf = Vec::with_capacity(256);
    let mut duplicates = 0u32;
    let mut tree = base.tree.clone();
    let mut new_events = Vec::new();
    let mut stored_it = stored.iter();
    for e in &upload.events {
        let leaf = merkle::leaf_hash_of_event_with(e, &mut buf);
        if e.seq < base.next_seq {
            match stored_it.find(|(s, _)| *s == e.seq) {
                Some((_, h)) if *h == leaf => duplicates += 1,
                Some(_) => {
                    return Err(Tampered(format!(
                        "event {} differs from the one stored before (rewritten history)",
                        e.seq
                    )));
                }
                None => {
                    return Err(Protocol(format!(
                        "event {} is below the collector's position but not stored",
                        e.seq
                    )));
                }
            }
        } else {
            tree.push(leaf);
            new_events.push((e.clone(), leaf));
        }
    }
    if new_events.is_empty() {
        // A pure resend: nothing to store; the state does not move.
        return Ok(Verified {
            state: state.clone(),
            new_events,
            duplicates,
            gap: None,
            accepted_checkpoint: None,
        });
    }

    // 4. The stored tree plus the new events is a prefix of the signed tree ...
    let batch_size = tree.size();
    if cp.tree_size < batch_size {
        return Err(Protocol(format!(
            "the checkpoint covers {} events of epoch {}, the upload reaches {batch_size}",
            cp.tree_size, upload.epoch
        )));
    }
    merkle::verify_consistency(
        batch_size,
        cp.tree_size,
        &tree.root(),
        &cp.root,
        &upload.batch_proof,
    )
    .map_err(|e| {
        Tampered(format!(
            "events {}..{} do not match the signed tree of {} leaves ({e})",
            upload.first_seq,
            upload.first_seq + upload.events.len() as u64,
            cp.tree_size
        ))
    })?;

    // ... and the signed tree extends the last one accepted.
    if let Some(prev) = &base.checkpoint {
        if cp.tree_size < prev.tree_size {
            // Older than what was accepted: the device sends its latest checkpoint, so this is
            // a stale upload; accepting it would not prove the events extend `prev`.
            return Err(Stale(format!(
                "the checkpoint covers {} leaves; one of {} was already accepted",
                cp.tree_size, prev.tree_size
            )));
        }
        {
            merkle::verify_consistency(
                prev.tree_size,
                cp.tree_size,
                &prev.root,
                &cp.root,
                &upload.prev_proof,
            )
            .map_err(|e| {
                Tampered(format!(
                    "the checkpoint of {} leaves forks from the one accepted at {} leaves ({e})",
                    cp.tree_size, prev.tree_size
                ))
            })?;
        }
    }
    let next_seq = base.epoch_first_seq + batch_size;
    Ok(Verified {
        state: LogState {
            epoch: base.epoch,
            epoch_first_seq: base.epoch_first_seq,
            next_seq,
            tree,
            checkpoint: Some(cp.clone()),
        },
        new_events,
        duplicates,
        gap,
        accepted_checkpoint: Some(cp),
    })
}
