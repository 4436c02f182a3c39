//! Read-only helpers for the `edgelorad ledger inspect|proof` commands: list frames with their
//! offsets, and build an inclusion proof from the files alone.

use std::fs;
use std::path::{Path, PathBuf};

use crate::event::Event;
use crate::format::frame::FrameKind;
use crate::format::header::SegmentHeader;
use crate::handle::EventProof;
use crate::key::PublicKey;
use crate::merkle::{self, root_of};
use crate::segment::{self, Cursor, Item};
use crate::verify::{VerifyError, verify_collecting};

/// One frame as found on disk.
#[derive(Debug, Clone)]
pub struct FrameInfo {
    pub offset: u64,
    /// Total bytes, header included.
    pub len: u64,
    pub kind: FrameKind,
    /// The event, for event frames.
    pub event: Option<Event>,
    /// One line for humans.
    pub summary: String,
}

/// A segment file as found on disk.
#[derive(Debug, Clone)]
pub struct SegmentDump {
    pub path: PathBuf,
    pub file_len: u64,
    pub header: Result<SegmentHeader, String>,
    /// Frames up to the first fault.
    pub frames: Vec<FrameInfo>,
    /// The first fault: byte offset and reason.
    pub fault: Option<(u64, String)>,
}

/// Decodes one segment file, frame by frame, stopping at the first fault.
pub fn inspect_segment(path: &Path) -> std::io::Result<SegmentDump> {
    let buf = fs::read(path)?;
    let mut dump = SegmentDump {
        path: path.to_path_buf(),
        file_len: buf.len() as u64,
        header: Err(String::new()),
        frames: Vec::new(),
        fault: None,
    };
    let header = match SegmentHeader::decode(&buf) {
        Ok(h) => h,
        Err(e) => {
            dump.header = Err(e.to_string());
            dump.fault = Some((0, e.to_string()));
            return Ok(dump);
        }
    };
    dump.header = Ok(header.clone());
    let mut cur = Cursor::new(&buf, &header);
    while let Some(r) = cur.next() {
        match r {
            Err((off, f)) => dump.fault = Some((off as u64, f.to_string())),
            Ok((raw, item)) => {
                let (event, summary) = match item {
                    Item::Define(d) => (None, format!("define {} = {:?}", d.id, d.sym)),
                    Item::Event {
                        wire, prev_time, ..
                    } => {
                        let ev = cur.table.resolve(&wire, prev_time).ok();
                        let s = ev.as_ref().map_or_else(String::new, |e| {
                            format!(
                                "event seq={} time={} base={}/{} adapter={} tokens={}+{} {:?}",
                                e.seq,
                                e.body.time_ms,
                                e.body.base_model.id,
                                e.body.base_model.contributor,
                                e.body
                                    .adapter
                                    .as_ref()
                                    .map_or("-".into(), |a| format!("{}/{}", a.id, a.contributor)),
                                e.body.prompt_tokens,
                                e.body.completion_tokens,
                                e.body.outcome
                            )
                        });
                        (ev, s)
                    }
                    Item::Checkpoint(cp) => (
                        None,
                        format!(
                            "checkpoint origin={} size={} first-seq={}",
                            cp.origin, cp.tree_size, cp.first_seq
                        ),
                    ),
                    Item::Snapshot(s) => (
                        None,
                        format!(
                            "snapshot next-seq={} tree-size={} counters={}",
                            s.next_seq,
                            s.tree_size,
                            s.counters.len()
                        ),
                    ),
                };
                dump.frames.push(FrameInfo {
                    offset: raw.offset as u64,
                    len: raw.frame_len() as u64,
                    kind: raw.kind,
                    event,
                    summary,
                });
            }
        }
    }
    if dump.fault.is_none() && cur.pos() != buf.len() {
        dump.fault = Some((cur.pos() as u64, "trailing bytes".into()));
    }
    Ok(dump)
}

/// `inspect_segment` for every `seg-*.log` in `dir`, in order.
pub fn inspect(dir: &Path) -> std::io::Result<Vec<SegmentDump>> {
    segment::list_segments(dir)?
        .into_iter()
        .map(|(_, p)| inspect_segment(&p))
        .collect()
}

/// Verifies the whole ledger in `dir` and proves event `seq` against the last checkpoint of its
/// epoch, from the files alone (for `edgelorad ledger proof` while the daemon is stopped).
pub fn prove(dir: &Path, key: &PublicKey, seq: u64) -> Result<EventProof, VerifyError> {
    let err = |reason: String| VerifyError {
        path: dir.to_path_buf(),
        offset: 0,
        reason,
    };
    let (_, collected) = verify_collecting(dir, key, Some(seq))?;
    let c = collected.ok_or_else(|| err(format!("no epoch contains sequence number {seq}")))?;
    let cp = c
        .checkpoint
        .ok_or_else(|| err("no checkpoint in the epoch of this event".into()))?;
    let index = seq - c.first_seq;
    if index >= cp.tree_size {
        return Err(err(format!(
            "sequence number {seq} is not covered by a checkpoint yet"
        )));
    }
    let leaves = &c.leaves[..cp.tree_size as usize];
    let path = merkle::inclusion_proof(index, cp.tree_size, &mut |a, b| {
        root_of(&leaves[a as usize..b as usize])
    });
    let event = inspect(dir)
        .map_err(|e| err(e.to_string()))?
        .into_iter()
        .flat_map(|d| d.frames)
        .find_map(|f| f.event.filter(|e| e.seq == seq))
        .ok_or_else(|| err(format!("event {seq} not found")))?;
    Ok(EventProof {
        leaf_hash: leaves[index as usize],
        event,
        leaf_index: index,
        path,
        checkpoint: cp,
    })
}
