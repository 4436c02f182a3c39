//! Open-time recovery: scan every segment, cut a torn tail, quarantine damage, rebuild the tree
//! and counters from the last snapshot, and decide where appends go.
//!
//! Rules (README.md, "Recovery"):
//! - A torn or garbage tail (bytes after the last intact frame of the LAST segment with no
//!   intact frame after them) is cut off (ftruncate + fsync) and reported.
//! - Anything else wrong is damage. A damaged segment is never rewritten: it is renamed to
//!   `*.quarantined`, reported (tracing::error, `OpenReport::damage`, `damaged()`), and appends
//!   continue in a new segment. A missing segment (sequence gap) is reported; nothing to move.
//! - Sequence numbers continue after the highest intact event frame found anywhere, quarantined
//!   segments included, so a number that may have been acknowledged is never reused.
//! - The Merkle tree continues if the last snapshot of the current epoch is followed by every
//!   event up to the end of the log; otherwise a new epoch (a new tree, with its own origin)
//!   starts at the next sequence number.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

mod scan;

use crate::counters::Counters;
use crate::error::LedgerError;
use crate::format::header::{HEADER_LEN, SegmentHeader, segment_file_name};
use crate::format::wire::{Interner, SymbolTable};
use crate::merkle::{CompactRange, Hash, TreeStore, leaf_hash_of_event_with};
use crate::report::{DamageKind, OpenReport};
use crate::segment::{self, Cursor, Item};
use crate::state::{LedgerStats, SegmentInfo, State};
use scan::{io_err, pass1};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The segment the writer appends to, as recovery leaves it.
pub(crate) struct ActiveInit {
    pub file: fs::File,
    pub path: PathBuf,
    pub size: u64,
    pub interner: Interner,
    pub symbols: Arc<RwLock<SymbolTable>>,
    pub prev_time: u64,
    pub chain: Hash,
    pub events: u64,
}

/// What the writer thread starts from.
pub(crate) struct WriterInit {
    pub active: ActiveInit,
    pub compact: CompactRange,
    pub events_since_checkpoint: u64,
    pub events_since_snapshot: u64,
    pub next_index: u64,
}

pub(crate) struct Recovered {
    pub state: State,
    pub report: OpenReport,
    pub writer: WriterInit,
}

/// One intact segment found by the first pass.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, LedgerError> {
    let mut p = pass1(dir)?;
    let mut next_seq = p.max_seq.map_or(0, |m| m + 1);
    for s in &p.intact {
        next_seq = next_seq.max(s.next_seq());
    }
    let anything_lost = !p.quarantined.is_empty()
        || p.damage
            .iter()
            .any(|d| d.kind == DamageKind::PreviouslyQuarantined);

    // Current epoch: that of the last intact segment.
    // With no intact segment left but events lost, the old tree cannot be continued.
    let mut new_epoch = false;
    let (mut epoch, mut epoch_first_seq) = match p.intact.last() {
        Some(s) => (s.header.epoch, s.header.epoch_first_seq),
        None if next_seq == 0 && !anything_lost => (0, 0),
        None => {
            new_epoch = true;
            (p.max_epoch.map_or(0, |e| e + 1), next_seq)
        }
    };

    // Start from the last snapshot.
    let snap_at = p.intact.iter().enumerate().rev().find_map(|(i, s)| {
        s.last_snapshot
            .as_ref()
            .map(|(off, snap)| (i, *off, snap.clone()))
    });
    let mut counters = Counters::new();
    let mut tree = TreeStore::new();
    let mut tree_next = epoch_first_seq;
    let mut tree_from_snapshot = false;
    let (start_seg, start_off) = match &snap_at {
        Some((i, off, snap)) => {
            counters = Counters::from_rows(snap.counters.clone());
            let fits = snap.epoch == epoch
                && snap.epoch_first_seq == epoch_first_seq
                && snap.next_seq.checked_sub(epoch_first_seq) == Some(snap.tree_size);
            if let Some(range) = CompactRange::from_parts(snap.tree_size, snap.right_edge.clone())
                && fits
            {
                tree = TreeStore::from_compact(range);
                tree_next = snap.next_seq;
                tree_from_snapshot = true;
            }
            (*i, *off)
        }
        None => (0, HEADER_LEN),
    };
    // Without a usable snapshot of this epoch, the tree is rebuilt from the epoch's first
    // segment; if that lies at or before the snapshot, replay everything (counters too, so that
    // nothing is counted twice).
    let (start_seg, start_off) = match &snap_at {
        Some(_) if !tree_from_snapshot => {
            let first = p
                .intact
                .iter()
                .position(|s| s.header.epoch == epoch)
                .unwrap_or(p.intact.len());
            if first <= start_seg {
                tracing::warn!("no usable snapshot for the current epoch; replaying the whole log");
                counters = Counters::new();
                (0, HEADER_LEN)
            } else {
                (start_seg, start_off)
            }
        }
        _ => (start_seg, start_off),
    };

    let mut tree_ok = true;
    let mut replayed = 0u64;
    let mut hash_buf = Vec::new();
    for (k, s) in p.intact.iter().enumerate().skip(start_seg) {
        let buf = fs::read(&s.path).map_err(io_err(&s.path))?;
        let buf = &buf[..s.valid_end.min(buf.len())];
        let mut cur = Cursor::new(buf, &s.header);
        while let Some(r) = cur.next() {
            let (raw, item) = r.map_err(|(off, f)| LedgerError::Corrupt {
                path: s.path.clone(),
                offset: off as u64,
                reason: format!("changed while opening: {f}"),
            })?;
            if k == start_seg && raw.offset < start_off {
                continue;
            }
            let Item::Event {
                wire, prev_time, ..
            } = item
            else {
                continue;
            };
            let table = &cur.table;
            let ev = table
                .resolve(&wire, prev_time)
                .map_err(|e| LedgerError::Corrupt {
                    path: s.path.clone(),
                    offset: raw.offset as u64,
                    reason: e.0,
                })?;
            counters.apply(&ev.body);
            replayed += 1;
            if s.header.epoch == epoch && ev.seq >= tree_next {
                if ev.seq == tree_next && tree_ok {
                    tree.push(leaf_hash_of_event_with(&ev, &mut hash_buf));
                    tree_next += 1;
                } else {
                    tree_ok = false;
                }
            }
        }
    }
    if tree_next != next_seq {
        tree_ok = false;
    }
    let mut latest_checkpoint = p
        .intact
        .iter()
        .rev()
        .filter(|s| s.header.epoch == epoch)
        .find_map(|s| s.last_checkpoint.clone())
        .filter(|cp| cp.tree_size <= tree.size());
    if !tree_ok {
        let next_epoch = p.max_epoch.map_or(0, |e| e + 1).max(epoch + 1);
        tracing::error!(
            old_epoch = epoch,
            new_epoch = next_epoch,
            first_seq = next_seq,
            "events after the last snapshot are missing: the Merkle tree cannot be continued, \
             starting a new epoch"
        );
        epoch = next_epoch;
        epoch_first_seq = next_seq;
        tree = TreeStore::new();
        latest_checkpoint = None;
        new_epoch = true;
    }
    let events_since_checkpoint =
        tree.size() - latest_checkpoint.as_ref().map_or(0, |c| c.tree_size);
    let events_since_snapshot = next_seq
        - snap_at
            .as_ref()
            .map_or(0, |(_, _, s)| s.next_seq)
            .min(next_seq);

    // Where appends go.
    let can_continue = p.quarantined.is_empty()
        && !new_epoch
        && p.last_file_intact
        && p.intact.last().is_some_and(|s| s.next_seq() == next_seq);
    let next_index = p.max_index.map_or(0, |i| i + 1);
    let mut segments: Vec<SegmentInfo> = Vec::with_capacity(p.intact.len() + 1);
    let mut last_chain = [0u8; 32];
    let mut cont: Option<(Interner, Arc<RwLock<SymbolTable>>, u64, Hash)> = None;
    let n_intact = p.intact.len();
    for (i, s) in std::mem::take(&mut p.intact).into_iter().enumerate() {
        last_chain = s.chain;
        let interner = (can_continue && i + 1 == n_intact).then(|| Interner::from_table(&s.table));
        let symbols = Arc::new(RwLock::new(s.table));
        if let Some(interner) = interner {
            cont = Some((interner, symbols.clone(), s.prev_time, s.chain));
        }
        segments.push(SegmentInfo {
            path: s.path,
            header: s.header,
            end: s.valid_end as u64,
            events: s.events,
            sparse: s.sparse,
            symbols,
        });
    }
    let events: u64 = segments.iter().map(|s| s.events).sum();

    let (active, next_index) = match cont {
        Some((interner, symbols, prev_time, chain)) => {
            let s = segments.last().expect("continuing implies a segment");
            let file = fs::OpenOptions::new()
                .append(true)
                .open(&s.path)
                .map_err(io_err(&s.path))?;
            (
                ActiveInit {
                    file,
                    path: s.path.clone(),
                    size: s.end,
                    interner,
                    symbols,
                    prev_time,
                    chain,
                    events: s.events,
                },
                next_index,
            )
        }
        None => {
            let header = SegmentHeader {
                epoch,
                segment_index: next_index,
                first_seq: next_seq,
                epoch_first_seq,
                created_ms: now_ms(),
                prev_chain: last_chain,
            };
            let path = dir.join(segment_file_name(next_seq));
            if path.exists() {
                // An event-less last segment with the same first sequence number that cannot be
                // continued (new epoch): set it aside rather than delete anything.
                let to = segment::quarantine(&path).map_err(io_err(&path))?;
                tracing::warn!(path = %path.display(), to = %to.display(),
                    "set aside an empty segment that cannot be continued");
                segments.retain(|s| s.path != path);
                p.quarantined.push(to);
            }
            let file = segment::create_segment(&path, &header).map_err(io_err(&path))?;
            let symbols = Arc::new(RwLock::new(SymbolTable::default()));
            segments.push(SegmentInfo {
                path: path.clone(),
                header: header.clone(),
                end: HEADER_LEN as u64,
                events: 0,
                sparse: Vec::new(),
                symbols: symbols.clone(),
            });
            (
                ActiveInit {
                    file,
                    path,
                    prev_time: header.created_ms,
                    chain: header.prev_chain,
                    size: HEADER_LEN as u64,
                    interner: Interner::default(),
                    symbols,
                    events: 0,
                },
                next_index + 1,
            )
        }
    };

    let report = OpenReport {
        events,
        next_seq,
        segments: segments.len(),
        truncated_bytes: p.truncated_bytes,
        quarantined: p.quarantined.clone(),
        damage: p.damage.clone(),
        epoch,
        new_epoch,
        replayed_events: replayed,
    };
    let compact = tree.compact().clone();
    Ok(Recovered {
        state: State {
            segments,
            tree,
            epoch,
            epoch_first_seq,
            counters,
            latest_checkpoint,
            damage: p.damage,
            next_seq,
            events,
            failure: None,
            closed: false,
            stats: LedgerStats::default(),
        },
        report,
        writer: WriterInit {
            active,
            compact,
            events_since_checkpoint,
            events_since_snapshot,
            next_index,
        },
    })
}
