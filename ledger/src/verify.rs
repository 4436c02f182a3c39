//! Offline verification of a ledger directory with only the public key.
//!
//! Checks, in log order: every segment header and the succession of headers (index, epoch,
//! sequence continuity, chain value), every frame's CRC and content, every checkpoint's
//! signature, origin, size and root against the tree recomputed from the events, and every
//! snapshot against the recomputed tree and counters. Stops at the first failure and names the
//! file and byte offset. Read-only: safe to run while the daemon appends (it verifies what was
//! written when each file was read).

use std::fs;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, epoch_of_origin, origin_for};
use crate::counters::Counters;
use crate::format::header::SegmentHeader;
use crate::key::PublicKey;
use crate::merkle::{CompactRange, Hash, leaf_hash_of_event_with};
use crate::segment::{self, Cursor, Item};

/// The first problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: at byte {offset}: {reason}", path.display())]
pub struct VerifyError {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: String,
}

fn fail(path: &Path, offset: u64, reason: impl Into<String>) -> VerifyError {
    VerifyError {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// What a successful `verify` saw.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub segments: usize,
    pub events: u64,
    /// The sequence number after the last event.
    pub next_seq: u64,
    pub checkpoints: u64,
    pub snapshots: u64,
    /// The epoch of the last segment.
    pub epoch: u32,
    pub last_checkpoint: Option<Checkpoint>,
    /// Events after the last checkpoint (not yet covered by a signature).
    pub unsigned_tail: u64,
    pub counters: Counters,
    /// `*.quarantined` files beside the log (not verified: recovery set them aside).
    pub quarantined: Vec<PathBuf>,
}

/// Leaves of one epoch, collected for an offline proof.
pub(crate) struct Collected {
    pub leaves: Vec<Hash>,
    pub first_seq: u64,
    pub checkpoint: Option<Checkpoint>,
}

/// Verifies the ledger in `dir` (see the module docs).
pub fn verify(dir: &Path, key: &PublicKey) -> Result<VerifyReport, VerifyError> {
    verify_collecting(dir, key, None).map(|(r, _)| r)
}

/// As `verify`; with `collect = Some(seq)`, also returns the leaves and the last checkpoint of
/// the epoch that contains `seq`.
pub(crate) fn verify_collecting(
    dir: &Path,
    key: &PublicKey,
    collect: Option<u64>,
) -> Result<(VerifyReport, Option<Collected>), VerifyError> {
    let files =
        segment::list_segments(dir).map_err(|e| fail(dir, 0, format!("cannot list: {e}")))?;
    let mut report = VerifyReport::default();
    let mut counters = Counters::new();
    let mut prev: Option<(SegmentHeader, u64, Hash)> = None; // header, next seq, chain
    let mut tree = CompactRange::new();
    let mut epoch_first_seq = 0u64;
    let mut device: Option<String> = None;
    let mut collected: Option<Collected> = None;
    let mut collecting = false;
    let mut hash_buf = Vec::new();

    for (name_seq, path) in &files {
        let buf = fs::read(path).map_err(|e| fail(path, 0, format!("cannot read: {e}")))?;
        let h = SegmentHeader::decode(&buf).map_err(|e| fail(path, 0, e.to_string()))?;
        if h.first_seq != *name_seq {
            return Err(fail(
                path,
                0,
                format!(
                    "file name says first sequence number {name_seq}, header says {}",
                    h.first_seq
                ),
            ));
        }
        match &prev {
            None => {
                if h.first_seq != h.epoch_first_seq {
                    return Err(fail(
                        path,
                        0,
                        format!(
                            "the log starts at sequence number {}, inside an epoch that starts at {}: \
                         earlier segments are missing",
                            h.first_seq, h.epoch_first_seq
                        ),
                    ));
                }
            }
            Some((p, next, chain)) => {
                if h.segment_index <= p.segment_index {
                    return Err(fail(
                        path,
                        0,
                        format!(
                            "segment index {} does not follow {}",
                            h.segment_index, p.segment_index
                        ),
                    ));
                }
                if h.first_seq != *next {
                    return Err(fail(
                        path,
                        0,
                        format!(
                            "segment starts at sequence number {} but the previous one ends before {next} \
                         (missing or quarantined segment)",
                            h.first_seq
                        ),
                    ));
                }
                if h.prev_chain != *chain {
                    return Err(fail(
                        path,
                        0,
                        "header chain value does not match the previous segment's last frame",
                    ));
                }
                let same = h.epoch == p.epoch && h.epoch_first_seq == p.epoch_first_seq;
                let next_epoch = h.epoch > p.epoch && h.epoch_first_seq == h.first_seq;
                if !same && !next_epoch {
                    return Err(fail(
                        path,
                        0,
                        format!("epoch {} does not follow epoch {}", h.epoch, p.epoch),
                    ));
                }
            }
        }
        if prev.as_ref().is_none_or(|(p, _, _)| p.epoch != h.epoch) {
            tree = CompactRange::new();
            epoch_first_seq = h.epoch_first_seq;
            report.last_checkpoint = None;
            if let Some(seq) = collect {
                collecting = seq >= h.epoch_first_seq;
                if collecting {
                    collected = Some(Collected {
                        leaves: Vec::new(),
                        first_seq: h.epoch_first_seq,
                        checkpoint: None,
                    });
                }
            }
        }
        report.epoch = h.epoch;

        let mut cur = Cursor::new(&buf, &h);
        while let Some(r) = cur.next() {
            let (raw, item) = r.map_err(|(off, f)| fail(path, off as u64, f.to_string()))?;
            let at = raw.offset as u64;
            match item {
                Item::Define(_) => {}
                Item::Event {
                    wire, prev_time, ..
                } => {
                    let ev = cur
                        .table
                        .resolve(&wire, prev_time)
                        .map_err(|e| fail(path, at, e.0))?;
                    let leaf = leaf_hash_of_event_with(&ev, &mut hash_buf);
                    tree.push(leaf);
                    if collecting && let Some(c) = collected.as_mut() {
                        c.leaves.push(leaf);
                    }
                    counters.apply(&ev.body);
                    report.events += 1;
                }
                Item::Checkpoint(cp) => {
                    cp.verify(key).map_err(|e| fail(path, at, e.to_string()))?;
                    if epoch_of_origin(&cp.origin) != Some(h.epoch) {
                        return Err(fail(
                            path,
                            at,
                            format!(
                                "checkpoint origin {:?} does not name epoch {}",
                                cp.origin, h.epoch
                            ),
                        ));
                    }
                    let base = match h.epoch {
                        0 => cp.origin.clone(),
                        e => cp
                            .origin
                            .strip_suffix(&format!("/epoch-{e}"))
                            .unwrap_or(&cp.origin)
                            .to_string(),
                    };
                    match &device {
                        None => device = Some(base),
                        Some(d) if origin_for(d, h.epoch) == cp.origin => {}
                        Some(d) => {
                            return Err(fail(
                                path,
                                at,
                                format!("checkpoint origin {:?} is not device {d:?}", cp.origin),
                            ));
                        }
                    }
                    if cp.first_seq != epoch_first_seq {
                        return Err(fail(
                            path,
                            at,
                            format!(
                                "checkpoint first-seq {} but the epoch starts at {epoch_first_seq}",
                                cp.first_seq
                            ),
                        ));
                    }
                    if cp.tree_size != tree.size() {
                        return Err(fail(
                            path,
                            at,
                            format!(
                                "checkpoint tree size {} but {} events precede it",
                                cp.tree_size,
                                tree.size()
                            ),
                        ));
                    }
                    if cp.root != tree.root() {
                        return Err(fail(
                            path,
                            at,
                            "checkpoint root does not match the events before it",
                        ));
                    }
                    if collecting && let Some(c) = collected.as_mut() {
                        c.checkpoint = Some(cp.clone());
                    }
                    report.last_checkpoint = Some(cp);
                    report.checkpoints += 1;
                }
                Item::Snapshot(s) => {
                    if s.epoch != h.epoch || s.epoch_first_seq != epoch_first_seq {
                        return Err(fail(path, at, "snapshot names the wrong epoch"));
                    }
                    if s.tree_size != tree.size() || s.right_edge != tree.nodes() {
                        return Err(fail(
                            path,
                            at,
                            "snapshot tree state does not match the events before it",
                        ));
                    }
                    if Counters::from_rows(s.counters) != counters {
                        return Err(fail(
                            path,
                            at,
                            "snapshot counters do not match the events before it",
                        ));
                    }
                    report.snapshots += 1;
                }
            }
        }
        if cur.pos() != buf.len() {
            return Err(fail(
                path,
                cur.pos() as u64,
                "trailing bytes after the last frame",
            ));
        }
        report.next_seq = cur.next_seq;
        prev = Some((h, cur.next_seq, cur.chain_value()));
    }
    report.segments = files.len();
    report.quarantined = segment::list_quarantined(dir).unwrap_or_default();
    report.unsigned_tail = tree.size() - report.last_checkpoint.as_ref().map_or(0, |c| c.tree_size);
    report.counters = counters;
    Ok((report, collected))
}
