//! Segment files: listing, creating, and decoding their frames in order with every check that
//! does not need the signing key (CRC, symbols, sequence continuity).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::format::frame::{BadFrame, FrameKind, RawFrame, read_frame, resync};
use crate::format::header::{HEADER_LEN, SegmentHeader, parse_segment_file_name};
use crate::format::snapshot::Snapshot;
use crate::format::wire::{Def, SymbolTable, WireEvent, apply_delta, decode_exact};
use crate::merkle::Hash;

/// Suffix given to a segment that recovery set aside.
pub const QUARANTINE_SUFFIX: &str = ".quarantined";

/// `seg-*.log` files in `dir`, ordered by the first sequence number in their names.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// `*.quarantined` files in `dir`, sorted by name.
pub fn list_quarantined(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(QUARANTINE_SUFFIX))
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// fsync a directory so that a create, rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `path` (which must not exist) holding only `header`, durably: file and directory are
/// fsynced before it returns. Returns the file opened for appending.
pub fn create_segment(path: &Path, header: &SegmentHeader) -> std::io::Result<File> {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(path)?;
    f.write_all(&header.encode())?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(f)
}

/// Renames `path` to `<path>.quarantined` (or `<path>.<n>.quarantined` if taken) and fsyncs the
/// directory. Returns the new path.
pub fn quarantine(path: &Path) -> std::io::Result<PathBuf> {
    let base = path.as_os_str().to_string_lossy().into_owned();
    let mut target = PathBuf::from(format!("{base}{QUARANTINE_SUFFIX}"));
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{base}.{n}{QUARANTINE_SUFFIX}"));
        n += 1;
    }
    fs::rename(path, &target)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(target)
}

/// A decoded frame.
#[derive(Debug, Clone)]
pub enum Item {
    Define(Def),
    Event {
        wire: WireEvent,
        /// The previous event's time in this segment (the base of `wire.time_delta`).
        prev_time: u64,
    },
    Checkpoint(Checkpoint),
    Snapshot(Snapshot),
}

/// Why the frame at an offset was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Length, kind or CRC check failed: the bytes are not a frame.
    Frame(BadFrame),
    /// The frame is intact but its content is wrong (out-of-order sequence number, undefined
    /// symbol, undecodable payload).
    Content(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Frame(b) => b.fmt(f),
            Fault::Content(s) => f.write_str(s),
        }
    }
}

/// Walks the frames of one segment held in memory, keeping the decoding state (symbols, time
/// base, expected sequence number). Stops at the first fault.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    pub table: SymbolTable,
    pub prev_time: u64,
    pub next_seq: u64,
    last_frame: Option<(usize, usize)>,
    prev_chain: Hash,
    failed: bool,
}

impl<'a> Cursor<'a> {
    /// Starts after the header of the segment in `buf`.
    pub fn new(buf: &'a [u8], header: &SegmentHeader) -> Self {
        Cursor {
            buf,
            pos: HEADER_LEN,
            table: SymbolTable::default(),
            prev_time: header.created_ms,
            next_seq: header.first_seq,
            last_frame: None,
            prev_chain: header.prev_chain,
            failed: false,
        }
    }

    /// Offset of the next frame (= end of the last good one).
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// The segment's chain value so far: SHA-256 of its last frame, or the header's
    /// `prev_chain` if it has none.
    pub fn chain_value(&self) -> Hash {
        match self.last_frame {
            Some((a, b)) => Sha256::digest(&self.buf[a..b]).into(),
            None => self.prev_chain,
        }
    }

    fn decode(&mut self, raw: &RawFrame<'a>) -> Result<Item, String> {
        match raw.kind {
            FrameKind::Define => {
                let def: Def = decode_exact(raw.payload, "definition").map_err(|e| e.0)?;
                self.table.define(def.clone()).map_err(|e| e.0)?;
                Ok(Item::Define(def))
            }
            FrameKind::Event => {
                let wire: WireEvent = decode_exact(raw.payload, "event").map_err(|e| e.0)?;
                if wire.seq != self.next_seq {
                    return Err(format!(
                        "event has sequence number {} where {} was expected",
                        wire.seq, self.next_seq
                    ));
                }
                self.table.check(&wire).map_err(|e| e.0)?;
                let prev_time = self.prev_time;
                let time_ms = apply_delta(prev_time, wire.time_delta);
                self.prev_time = time_ms;
                self.next_seq += 1;
                Ok(Item::Event { wire, prev_time })
            }
            FrameKind::Checkpoint => {
                let text = std::str::from_utf8(raw.payload)
                    .map_err(|_| "checkpoint note is not UTF-8".to_string())?;
                Checkpoint::parse(text)
                    .map(Item::Checkpoint)
                    .map_err(|e| e.to_string())
            }
            FrameKind::Snapshot => {
                let s: Snapshot = decode_exact(raw.payload, "snapshot").map_err(|e| e.0)?;
                if s.next_seq != self.next_seq {
                    return Err(format!(
                        "snapshot covers up to sequence number {} but the log is at {}",
                        s.next_seq, self.next_seq
                    ));
                }
                Ok(Item::Snapshot(s))
            }
        }
    }
}

impl<'a> Iterator for Cursor<'a> {
    type Item = Result<(RawFrame<'a>, Item), (usize, Fault)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let raw = match read_frame(self.buf, self.pos) {
            Ok(None) => return None,
            Ok(Some(raw)) => raw,
            Err(bad) => {
                self.failed = true;
                return Some(Err((self.pos, Fault::Frame(bad))));
            }
        };
        match self.decode(&raw) {
            Ok(item) => {
                self.last_frame = Some((raw.offset, raw.end()));
                self.pos = raw.end();
                Some(Ok((raw, item)))
            }
            Err(why) => {
                self.failed = true;
                Some(Err((self.pos, Fault::Content(why))))
            }
        }
    }
}

/// Whether any intact frame follows offset `from`.
pub fn valid_frame_after(buf: &[u8], from: usize) -> Option<usize> {
    resync(buf, from)
}

/// The largest sequence number among intact event frames anywhere in `buf` at or after `from`,
/// found by resynchronizing past damage. Used so that sequence numbers that may already have
/// been acknowledged (and shipped) are never reused after a quarantine.
pub fn max_seq_in(buf: &[u8], from: usize) -> Option<u64> {
    let mut max = None;
    let mut off = Some(from);
    while let Some(o) = off {
        match read_frame(buf, o) {
            Ok(Some(raw)) => {
                if raw.kind == FrameKind::Event
                    && let Ok((seq, _)) = postcard::take_from_bytes::<u64>(raw.payload)
                {
                    max = max.max(Some(seq));
                }
                off = Some(raw.end());
            }
            Ok(None) => break,
            Err(_) => off = resync(buf, o),
        }
    }
    max
}
