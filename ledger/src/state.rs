//! State shared between the writer thread and readers, and reading events back from segments.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::checkpoint::Checkpoint;
use crate::counters::Counters;
use crate::error::LedgerError;
use crate::event::Event;
use crate::format::frame::{FRAME_HEADER_LEN, FrameKind, MAX_PAYLOAD, read_frame};
use crate::format::header::SegmentHeader;
use crate::format::wire::{SymbolTable, WireEvent, apply_delta, decode_exact};
use crate::merkle::TreeStore;
use crate::report::Damage;

/// Every `SPARSE_EVERY`-th event of a segment is indexed (sequence number → byte offset).
pub(crate) const SPARSE_EVERY: u64 = 256;

#[derive(Debug, Clone, Copy)]
pub(crate) struct SparseEntry {
    pub seq: u64,
    pub offset: u64,
    /// Time base for the event at `offset`.
    pub prev_time: u64,
}

/// A segment as readers see it.
#[derive(Debug)]
pub(crate) struct SegmentInfo {
    pub path: PathBuf,
    pub header: SegmentHeader,
    /// End of the last frame written (readers never look past it).
    pub end: u64,
    pub events: u64,
    pub sparse: Vec<SparseEntry>,
    pub symbols: Arc<RwLock<SymbolTable>>,
}

impl SegmentInfo {
    pub fn last_event(&self) -> Option<u64> {
        (self.events > 0).then(|| self.header.first_seq + self.events - 1)
    }
}

/// Counters of the writer's work, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Events appended since open.
    pub appended: u64,
    /// Group commits (one write each).
    pub batches: u64,
    pub fsyncs: u64,
    pub bytes_written: u64,
    pub checkpoints: u64,
    pub segments_created: u64,
}

#[derive(Debug)]
pub(crate) struct State {
    pub segments: Vec<SegmentInfo>,
    pub tree: TreeStore,
    pub epoch: u32,
    pub epoch_first_seq: u64,
    pub counters: Counters,
    pub latest_checkpoint: Option<Checkpoint>,
    pub damage: Vec<Damage>,
    pub next_seq: u64,
    /// Events in the log (excluding quarantined segments).
    pub events: u64,
    /// Set when the writer stopped after an I/O failure.
    pub failure: Option<String>,
    pub closed: bool,
    pub stats: LedgerStats,
}

/// Where to start reading one segment for events at or after some sequence number.
pub(crate) struct ReadPlan {
    path: PathBuf,
    offset: u64,
    end: u64,
    prev_time: u64,
    symbols: Arc<RwLock<SymbolTable>>,
}

impl State {
    /// Plans a read of the events with sequence numbers `>= since`.
    pub fn plan_reads(&self, since: u64) -> Vec<ReadPlan> {
        let mut plans = Vec::new();
        for s in &self.segments {
            let Some(last) = s.last_event() else { continue };
            if last < since {
                continue;
            }
            let start = s
                .sparse
                .iter()
                .rev()
                .find(|e| e.seq <= since)
                .or(s.sparse.first());
            let Some(start) = start else { continue };
            plans.push(ReadPlan {
                path: s.path.clone(),
                offset: start.offset,
                end: s.end,
                prev_time: start.prev_time,
                symbols: s.symbols.clone(),
            });
        }
        plans
    }

    /// Bytes of log from the event `since` (to within one sparse-index step) to the end.
    pub fn bytes_since(&self, since: u64) -> u64 {
        self.plan_reads(since)
            .iter()
            .map(|p| p.end.saturating_sub(p.offset))
            .sum()
    }
}

/// Reads up to `limit` events with sequence numbers `>= since`, in order, following `plans`.
/// Runs without the state lock.
pub(crate) fn read_events(
    plans: Vec<ReadPlan>,
    since: u64,
    limit: usize,
) -> Result<Vec<Event>, LedgerError> {
    let mut out = Vec::new();
    let mut frame = Vec::new();
    for plan in plans {
        if out.len() >= limit {
            break;
        }
        let file = File::open(&plan.path).map_err(|e| LedgerError::io(&plan.path, e))?;
        let mut r = BufReader::with_capacity(64 << 10, file);
        r.seek(SeekFrom::Start(plan.offset))
            .map_err(|e| LedgerError::io(&plan.path, e))?;
        let mut off = plan.offset;
        let mut prev_time = plan.prev_time;
        while off < plan.end && out.len() < limit {
            let corrupt = |reason: String| LedgerError::Corrupt {
                path: plan.path.clone(),
                offset: off,
                reason,
            };
            frame.resize(FRAME_HEADER_LEN, 0);
            r.read_exact(&mut frame)
                .map_err(|e| LedgerError::io(&plan.path, e))?;
            let len = u32::from_le_bytes(frame[0..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_PAYLOAD {
                return Err(corrupt(format!("length {len} too large")));
            }
            frame.resize(FRAME_HEADER_LEN + len, 0);
            r.read_exact(&mut frame[FRAME_HEADER_LEN..])
                .map_err(|e| LedgerError::io(&plan.path, e))?;
            let raw = match read_frame(&frame, 0) {
                Ok(Some(raw)) => raw,
                Ok(None) => return Err(corrupt("empty frame".into())),
                Err(bad) => return Err(corrupt(bad.to_string())),
            };
            if raw.kind == FrameKind::Event {
                let wire: WireEvent =
                    decode_exact(raw.payload, "event").map_err(|e| corrupt(e.0))?;
                let base = prev_time;
                prev_time = apply_delta(prev_time, wire.time_delta);
                if wire.seq >= since {
                    let table = plan.symbols.read().unwrap_or_else(|p| p.into_inner());
                    out.push(table.resolve(&wire, base).map_err(|e| corrupt(e.0))?);
                }
            }
            off += raw.frame_len() as u64;
        }
    }
    Ok(out)
}
