//! The first pass of recovery: read every segment, check it and its header succession, cut a
//! torn tail, quarantine damage, and collect what the second pass needs.

use std::fs;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::LedgerError;
use crate::format::header::{BadHeader, HEADER_LEN, SegmentHeader};
use crate::format::snapshot::Snapshot;
use crate::format::wire::SymbolTable;
use crate::merkle::Hash;
use crate::report::{Damage, DamageKind};
use crate::segment::{self, Cursor, Fault, Item, valid_frame_after};
use crate::state::{SPARSE_EVERY, SparseEntry};

pub(super) struct Scanned {
    pub(super) path: PathBuf,
    pub(super) header: SegmentHeader,
    pub(super) valid_end: usize,
    pub(super) events: u64,
    pub(super) sparse: Vec<SparseEntry>,
    pub(super) table: SymbolTable,
    pub(super) prev_time: u64,
    pub(super) chain: Hash,
    pub(super) last_snapshot: Option<(usize, Snapshot)>,
    pub(super) last_checkpoint: Option<Checkpoint>,
}

impl Scanned {
    pub(super) fn next_seq(&self) -> u64 {
        self.header.first_seq + self.events
    }
}

pub(super) struct Pass1 {
    pub(super) intact: Vec<Scanned>,
    pub(super) damage: Vec<Damage>,
    pub(super) quarantined: Vec<PathBuf>,
    pub(super) truncated_bytes: u64,
    pub(super) max_seq: Option<u64>,
    pub(super) max_index: Option<u64>,
    pub(super) max_epoch: Option<u32>,
    /// Whether the last listed file survived as the last intact segment.
    pub(super) last_file_intact: bool,
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |e| LedgerError::io(path, e)
}

fn record(damage: &mut Vec<Damage>, d: Damage) {
    tracing::error!(
        kind = ?d.kind,
        path = %d.path.display(),
        offset = d.offset,
        detail = %d.detail,
        quarantined_to = ?d.quarantined_to,
        "ledger damage found"
    );
    damage.push(d);
}

fn damage_and_quarantine(
    p: &mut Pass1,
    kind: DamageKind,
    path: &Path,
    offset: u64,
    detail: String,
) -> Result<(), LedgerError> {
    let to = segment::quarantine(path).map_err(io_err(path))?;
    p.quarantined.push(to.clone());
    record(
        &mut p.damage,
        Damage {
            kind,
            path: path.to_path_buf(),
            offset,
            detail,
            quarantined_to: Some(to),
        },
    );
    Ok(())
}

/// How the header of `h` relates to the intact segment before it; `Err` is damage to `h`.
fn check_succession(prev: &Scanned, h: &SegmentHeader) -> Result<Option<String>, String> {
    let p = &prev.header;
    if h.segment_index <= p.segment_index {
        return Err(format!(
            "segment index {} does not follow {}",
            h.segment_index, p.segment_index
        ));
    }
    if h.epoch < p.epoch
        || (h.epoch == p.epoch && h.epoch_first_seq != p.epoch_first_seq)
        || (h.epoch > p.epoch && h.epoch_first_seq != h.first_seq)
    {
        return Err(format!(
            "epoch {} (first seq {}) does not follow epoch {} (first seq {})",
            h.epoch, h.epoch_first_seq, p.epoch, p.epoch_first_seq
        ));
    }
    let expected = prev.next_seq();
    if h.first_seq < expected {
        return Err(format!(
            "first sequence number {} overlaps the previous segment, which ends before {expected}",
            h.first_seq
        ));
    }
    if h.first_seq > expected {
        return Ok(Some(format!(
            "sequence numbers {expected}..{} are missing before this segment",
            h.first_seq
        )));
    }
    if h.prev_chain != prev.chain {
        return Err("header chain value does not match the previous segment's last frame".into());
    }
    Ok(None)
}

pub(super) fn pass1(dir: &Path) -> Result<Pass1, LedgerError> {
    let mut p = Pass1 {
        intact: Vec::new(),
        damage: Vec::new(),
        quarantined: Vec::new(),
        truncated_bytes: 0,
        max_seq: None,
        max_index: None,
        max_epoch: None,
        last_file_intact: false,
    };
    for q in segment::list_quarantined(dir).map_err(io_err(dir))? {
        let buf = fs::read(&q).map_err(io_err(&q))?;
        let from = match SegmentHeader::decode(&buf) {
            Ok(h) => {
                p.max_index = p.max_index.max(Some(h.segment_index));
                p.max_epoch = p.max_epoch.max(Some(h.epoch));
                HEADER_LEN
            }
            Err(_) => 0,
        };
        p.max_seq = p.max_seq.max(segment::max_seq_in(&buf, from));
        p.damage.push(Damage {
            kind: DamageKind::PreviouslyQuarantined,
            path: q.clone(),
            offset: 0,
            detail: "set aside by an earlier open; restore it from a backup or the collector, \
                     or delete it once its events are accounted for"
                .into(),
            quarantined_to: Some(q),
        });
    }

    let files = segment::list_segments(dir).map_err(io_err(dir))?;
    let mut prev_intact = false;
    for (i, (name_seq, path)) in files.iter().enumerate() {
        let is_last = i + 1 == files.len();
        let buf = fs::read(path).map_err(io_err(path))?;
        let header = match SegmentHeader::decode(&buf) {
            Ok(h) => h,
            Err(BadHeader::UnsupportedVersion(version)) => {
                return Err(LedgerError::UnsupportedVersion {
                    path: path.clone(),
                    version,
                });
            }
            Err(BadHeader::Zeroed | BadHeader::Short(_)) if is_last => {
                tracing::warn!(path = %path.display(), bytes = buf.len(),
                    "removing a half-created last segment (crash during rotation)");
                fs::remove_file(path).map_err(io_err(path))?;
                segment::sync_dir(dir).map_err(io_err(dir))?;
                p.truncated_bytes += buf.len() as u64;
                continue;
            }
            Err(bad) => {
                p.max_seq = p.max_seq.max(segment::max_seq_in(&buf, 0));
                damage_and_quarantine(&mut p, DamageKind::BadHeader, path, 0, bad.to_string())?;
                prev_intact = false;
                continue;
            }
        };
        p.max_index = p.max_index.max(Some(header.segment_index));
        p.max_epoch = p.max_epoch.max(Some(header.epoch));

        let mut s = Scanned {
            path: path.clone(),
            header: header.clone(),
            valid_end: HEADER_LEN,
            events: 0,
            sparse: Vec::new(),
            table: SymbolTable::default(),
            prev_time: header.created_ms,
            chain: header.prev_chain,
            last_snapshot: None,
            last_checkpoint: None,
        };
        let mut cur = Cursor::new(&buf, &header);
        let mut fault = None;
        for r in cur.by_ref() {
            match r {
                Ok((raw, item)) => match item {
                    Item::Event {
                        wire, prev_time, ..
                    } => {
                        if s.events.is_multiple_of(SPARSE_EVERY) {
                            s.sparse.push(SparseEntry {
                                seq: wire.seq,
                                offset: raw.offset as u64,
                                prev_time,
                            });
                        }
                        s.events += 1;
                    }
                    Item::Snapshot(snap) => s.last_snapshot = Some((raw.end(), snap)),
                    Item::Checkpoint(cp) => s.last_checkpoint = Some(cp),
                    Item::Define(_) => {}
                },
                Err(f) => fault = Some(f),
            }
        }
        s.valid_end = cur.pos();
        s.prev_time = cur.prev_time;
        s.chain = cur.chain_value();
        s.table = std::mem::take(&mut cur.table);
        if s.events > 0 {
            p.max_seq = p.max_seq.max(Some(s.next_seq() - 1));
        }
        if let Some((off, _)) = &fault {
            p.max_seq = p.max_seq.max(segment::max_seq_in(&buf, *off));
        }

        // Classify. Cross-segment checks first: a segment that will be quarantined must not be
        // truncated.
        if header.first_seq != *name_seq || header.epoch_first_seq > header.first_seq {
            let detail = format!(
                "file name says first sequence number {name_seq}, header says {} (epoch starts at {})",
                header.first_seq, header.epoch_first_seq
            );
            damage_and_quarantine(&mut p, DamageKind::BadHeader, path, 0, detail)?;
            prev_intact = false;
            continue;
        }
        if prev_intact {
            let prev = p
                .intact
                .last()
                .expect("prev_intact implies a previous segment");
            match check_succession(prev, &header) {
                Err(detail) => {
                    damage_and_quarantine(&mut p, DamageKind::ChainMismatch, path, 0, detail)?;
                    prev_intact = false;
                    continue;
                }
                Ok(Some(gap)) => record(
                    &mut p.damage,
                    Damage {
                        kind: DamageKind::SequenceGap,
                        path: path.clone(),
                        offset: 0,
                        detail: gap,
                        quarantined_to: None,
                    },
                ),
                Ok(None) => {}
            }
        }
        match fault {
            None => {}
            Some((off, Fault::Frame(bad))) if is_last && valid_frame_after(&buf, off).is_none() => {
                let cut = (buf.len() - off) as u64;
                tracing::warn!(path = %path.display(), offset = off, bytes = cut, reason = %bad,
                    "cutting a torn tail off the last ledger segment");
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_err(path))?;
                f.set_len(off as u64)
                    .and_then(|_| f.sync_all())
                    .map_err(io_err(path))?;
                p.truncated_bytes += cut;
            }
            Some((off, f)) => {
                let (kind, detail) = match &f {
                    Fault::Frame(bad) => {
                        let more = if is_last {
                            ", with intact frames after it"
                        } else {
                            ""
                        };
                        (DamageKind::CorruptFrame, format!("{bad}{more}"))
                    }
                    Fault::Content(why) => (DamageKind::InvalidFrame, why.clone()),
                };
                damage_and_quarantine(&mut p, kind, path, off as u64, detail)?;
                prev_intact = false;
                continue;
            }
        }
        p.intact.push(s);
        prev_intact = true;
        p.last_file_intact = is_last;
    }
    Ok(p)
}
