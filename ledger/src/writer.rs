//! The writer thread: group commit, segment rotation, checkpoints and snapshots.
//!
//! One thread owns the active segment. It blocks for a command, then drains everything queued
//! behind it (up to `max_batch`), encodes the whole batch into one buffer, writes it with one
//! `write`, makes it durable with one `fdatasync`, and only then answers the batch's tickets.
//! While it waits on the disk, new appends queue up and form the next batch, so N concurrent
//! appenders share fsyncs without any tuning knob.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, origin_for};
use crate::config::{Durability, LedgerConfig};
use crate::error::LedgerError;
use crate::event::{Event, EventBody};
use crate::format::frame::{FrameKind, encode_frame};
use crate::format::header::{HEADER_LEN, SegmentHeader, segment_file_name};
use crate::format::snapshot::Snapshot;
use crate::format::wire::{Interner, SymbolTable, encode};
use crate::merkle::{CompactRange, Hash, leaf_hash_of_event_with};
use crate::recovery::{ActiveInit, WriterInit, now_ms};
use crate::report::{Damage, DamageKind};
use crate::segment;
use crate::state::{SPARSE_EVERY, SegmentInfo, SparseEntry, State};
use crate::ticket::Reply;

type AppendReply = Reply<Result<u64, LedgerError>>;
/// The replies of a batch that could not be made durable, and why.
type FailedBatch = (Vec<AppendReply>, std::io::Error);

// Appends are nearly all the traffic; boxing their body would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
    Append(EventBody, Reply<Result<u64, LedgerError>>),
    Checkpoint(Reply<Result<Checkpoint, LedgerError>>),
    Close(Reply<Result<Option<Checkpoint>, LedgerError>>),
}

/// What one batch changed in one segment, published to readers after the write.
struct SegDelta {
    path: PathBuf,
    created: Option<SegmentInfo>,
    end: u64,
    events: u64,
    sparse: Vec<SparseEntry>,
}

pub(crate) struct Writer {
    dir: PathBuf,
    config: LedgerConfig,
    state: Arc<Mutex<State>>,
    active: ActiveInit,
    compact: CompactRange,
    epoch: u32,
    epoch_first_seq: u64,
    next_seq: u64,
    next_index: u64,
    since_checkpoint: u64,
    first_uncovered_at: Option<Instant>,
    has_checkpoint: bool,
    since_snapshot: u64,
    unsynced: bool,
    last_sync: Instant,
    failed: Option<String>,
    buf: Vec<u8>,
    last_frame_start: Option<usize>,
    hash_buf: Vec<u8>,
    deltas: Vec<SegDelta>,
}

impl Writer {
    pub fn new(
        dir: PathBuf,
        config: LedgerConfig,
        state: Arc<Mutex<State>>,
        r: WriterInit,
    ) -> Writer {
        let (has_checkpoint, epoch, epoch_first_seq, next_seq) = {
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            (
                st.latest_checkpoint.is_some(),
                st.epoch,
                st.epoch_first_seq,
                st.next_seq,
            )
        };
        Writer {
            dir,
            config,
            state,
            active: r.active,
            compact: r.compact,
            epoch,
            epoch_first_seq,
            next_seq,
            next_index: r.next_index,
            since_checkpoint: r.events_since_checkpoint,
            first_uncovered_at: (r.events_since_checkpoint > 0).then(Instant::now),
            has_checkpoint,
            since_snapshot: r.events_since_snapshot,
            unsynced: false,
            last_sync: Instant::now(),
            failed: None,
            buf: Vec::with_capacity(1 << 20),
            last_frame_start: None,
            hash_buf: Vec::with_capacity(512),
            deltas: Vec::new(),
        }
    }

    pub fn run(mut self, rx: Receiver<Command>) {
        loop {
            let first = match self.next_deadline() {
                None => rx.recv().ok(),
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => {
                        self.process(Vec::new(), false);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            };
            let Some(first) = first else {
                // Every handle was dropped: close cleanly.
                self.process(Vec::new(), true);
                return;
            };
            let mut batch = vec![first];
            while batch.len() < self.config.max_batch {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            if self.process(batch, false) {
                return;
            }
        }
    }

    fn next_deadline(&self) -> Option<Duration> {
        if self.failed.is_some() {
            return None; // nothing more will be written; just answer commands
        }
        let now = Instant::now();
        let mut at: Option<Instant> = self
            .first_uncovered_at
            .map(|t| t + self.config.checkpoint_interval);
        if let Durability::Relaxed { interval } = self.config.durability
            && self.unsynced
        {
            let t = self.last_sync + interval;
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at.map(|t| t.saturating_duration_since(now))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_frame(&mut self, kind: FrameKind, payload: &[u8]) {
        self.last_frame_start = Some(self.buf.len());
        encode_frame(&mut self.buf, kind, payload);
    }

    fn current_delta(&mut self) -> &mut SegDelta {
        if self
            .deltas
            .last()
            .is_none_or(|d| d.path != self.active.path)
        {
            self.deltas.push(SegDelta {
                path: self.active.path.clone(),
                created: None,
                end: self.active.size,
                events: self.active.events,
                sparse: Vec::new(),
            });
        }
        self.deltas.last_mut().expect("just ensured")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(s) = self.last_frame_start.take() {
            self.active.chain = Sha256::digest(&self.buf[s..]).into();
        }
        self.active.file.write_all(&self.buf)?;
        self.active.size += self.buf.len() as u64;
        let (size, events, n) = (self.active.size, self.active.events, self.buf.len() as u64);
        let d = self.current_delta();
        d.end = size;
        d.events = events;
        self.buf.clear();
        self.unsynced = true;
        let mut st = self.lock();
        st.stats.bytes_written += n;
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.active.file.sync_data()?;
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.lock().stats.fsyncs += 1;
        Ok(())
    }

    /// Seals the active segment (durably) and starts the next one.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.flush()?;
        self.sync()?;
        let header = SegmentHeader {
            epoch: self.epoch,
            segment_index: self.next_index,
            first_seq: self.next_seq,
            epoch_first_seq: self.epoch_first_seq,
            created_ms: now_ms(),
            prev_chain: self.active.chain,
        };
        let path = self.dir.join(segment_file_name(self.next_seq));
        let file = segment::create_segment(&path, &header)?;
        self.next_index += 1;
        let symbols = Arc::new(RwLock::new(SymbolTable::default()));
        self.deltas.push(SegDelta {
            path: path.clone(),
            created: Some(SegmentInfo {
                path: path.clone(),
                header: header.clone(),
                end: HEADER_LEN as u64,
                events: 0,
                sparse: Vec::new(),
                symbols: symbols.clone(),
            }),
            end: HEADER_LEN as u64,
            events: 0,
            sparse: Vec::new(),
        });
        self.active = ActiveInit {
            file,
            path,
            prev_time: header.created_ms,
            chain: header.prev_chain,
            size: HEADER_LEN as u64,
            interner: Interner::default(),
            symbols,
            events: 0,
        };
        self.lock().stats.segments_created += 1;
        Ok(())
    }

    fn encode_event(&mut self, body: EventBody) -> std::io::Result<(u64, Hash, EventBody)> {
        if self.active.events > 0
            && self.active.size + self.buf.len() as u64 >= self.config.segment_bytes
        {
            self.rotate()?;
        }
        let seq = self.next_seq;
        let ev = Event { seq, body };
        let mut defs = Vec::new();
        let wire = self
            .active
            .interner
            .encode_event(&ev, self.active.prev_time, &mut defs);
        if !defs.is_empty() {
            let symbols = self.active.symbols.clone();
            let mut table = symbols.write().unwrap_or_else(|p| p.into_inner());
            for d in defs {
                self.push_frame(FrameKind::Define, &encode(&d));
                table
                    .define(d)
                    .expect("the interner defines symbols in order");
            }
        }
        let offset = self.active.size + self.buf.len() as u64;
        if self.active.events.is_multiple_of(SPARSE_EVERY) {
            let entry = SparseEntry {
                seq,
                offset,
                prev_time: self.active.prev_time,
            };
            self.current_delta().sparse.push(entry);
        }
        self.push_frame(FrameKind::Event, &encode(&wire));
        self.active.prev_time = ev.body.time_ms;
        self.active.events += 1;
        self.next_seq += 1;
        let leaf = leaf_hash_of_event_with(&ev, &mut self.hash_buf);
        self.compact.push(leaf);
        self.since_checkpoint += 1;
        self.since_snapshot += 1;
        if self.first_uncovered_at.is_none() {
            self.first_uncovered_at = Some(Instant::now());
        }
        Ok((seq, leaf, ev.body))
    }

    fn write_checkpoint(&mut self) -> Checkpoint {
        let cp = Checkpoint::sign(
            &origin_for(&self.config.device_id, self.epoch),
            self.compact.size(),
            self.compact.root(),
            now_ms(),
            self.epoch_first_seq,
            &self.config.key,
        );
        self.push_frame(FrameKind::Checkpoint, cp.note().as_bytes());
        self.since_checkpoint = 0;
        self.first_uncovered_at = None;
        self.has_checkpoint = true;
        cp
    }

    fn write_snapshot(&mut self, batch_bodies: &[EventBody]) {
        let mut counters = self.lock().counters.clone();
        for b in batch_bodies {
            counters.apply(b);
        }
        let snap = Snapshot {
            next_seq: self.next_seq,
            epoch: self.epoch,
            epoch_first_seq: self.epoch_first_seq,
            tree_size: self.compact.size(),
            right_edge: self.compact.nodes().to_vec(),
            counters: counters.to_rows(),
        };
        self.push_frame(FrameKind::Snapshot, &encode(&snap));
        self.since_snapshot = 0;
    }

    /// Handles one batch; returns true once the ledger is closed.
    fn process(&mut self, batch: Vec<Command>, disconnected: bool) -> bool {
        let mut appends = Vec::new();
        let mut checkpoint_waiters = Vec::new();
        let mut close: Option<Reply<Result<Option<Checkpoint>, LedgerError>>> = None;
        let mut late = Vec::new();
        for cmd in batch {
            match cmd {
                _ if close.is_some() => late.push(cmd),
                Command::Append(body, reply) => appends.push((body, reply)),
                Command::Checkpoint(reply) => checkpoint_waiters.push(reply),
                Command::Close(reply) => close = Some(reply),
            }
        }
        drop(late); // commands after Close: their replies report `Closed`
        let closing = close.is_some() || disconnected;

        if let Some(why) = self.failed.clone() {
            for (_, r) in appends {
                r.send(Err(LedgerError::Poisoned(why.clone())));
            }
            for r in checkpoint_waiters {
                r.send(Err(LedgerError::Poisoned(why.clone())));
            }
            if let Some(r) = close {
                r.send(Err(LedgerError::Poisoned(why.clone())));
            }
            if closing {
                self.lock().closed = true;
            }
            return closing;
        }

        match self.commit(appends, !checkpoint_waiters.is_empty(), closing) {
            Ok(acked) => {
                for (reply, seq) in acked {
                    reply.send(Ok(seq));
                }
                let latest = self.lock().latest_checkpoint.clone();
                for r in checkpoint_waiters {
                    r.send(latest.clone().ok_or(LedgerError::Closed));
                }
                if closing {
                    self.lock().closed = true;
                    tracing::info!(next_seq = self.next_seq, "ledger closed");
                }
                if let Some(r) = close {
                    r.send(Ok(latest));
                }
            }
            Err((replies, e)) => {
                let err = LedgerError::io(&self.active.path, e);
                let why = err.to_string();
                tracing::error!(error = %why, "ledger write failed; the writer stops until reopen");
                self.failed = Some(why.clone());
                {
                    let mut st = self.lock();
                    st.failure = Some(why.clone());
                    st.damage.push(Damage {
                        kind: DamageKind::WriteFailed,
                        path: self.active.path.clone(),
                        offset: self.active.size,
                        detail: why.clone(),
                        quarantined_to: None,
                    });
                    if closing {
                        st.closed = true;
                    }
                }
                for r in replies {
                    r.send(Err(err.clone()));
                }
                for r in checkpoint_waiters {
                    r.send(Err(err.clone()));
                }
                if let Some(r) = close {
                    r.send(Err(err.clone()));
                }
            }
        }
        closing
    }

    /// Encodes, writes and (as the durability mode requires) syncs one batch, then publishes
    /// it to readers. Returns the replies to send, or them with the error that stopped the batch.
    fn commit(
        &mut self,
        appends: Vec<(EventBody, Reply<Result<u64, LedgerError>>)>,
        forced_checkpoint: bool,
        closing: bool,
    ) -> Result<Vec<(AppendReply, u64)>, FailedBatch> {
        let mut replies = Vec::with_capacity(appends.len());
        let mut bodies = Vec::with_capacity(appends.len());
        let mut leaves = Vec::with_capacity(appends.len());
        let mut result: std::io::Result<()> = Ok(());
        for (body, reply) in appends {
            if result.is_err() {
                replies.push((reply, u64::MAX));
                continue;
            }
            match self.encode_event(body) {
                Ok((seq, leaf, body)) => {
                    replies.push((reply, seq));
                    bodies.push(body);
                    leaves.push(leaf);
                }
                Err(e) => {
                    replies.push((reply, u64::MAX));
                    result = Err(e);
                }
            }
        }
        let fail = |replies: Vec<(Reply<Result<u64, LedgerError>>, u64)>, e| {
            Err((replies.into_iter().map(|(r, _)| r).collect(), e))
        };
        if let Err(e) = result {
            return fail(replies, e);
        }

        let timer_due = self
            .first_uncovered_at
            .is_some_and(|t| t.elapsed() >= self.config.checkpoint_interval);
        let snapshot_due = self.since_snapshot >= self.config.snapshot_every_events
            || (closing && self.since_snapshot > 0);
        let checkpoint_due = snapshot_due
            || self.since_checkpoint >= self.config.checkpoint_every_events
            || (self.since_checkpoint > 0 && (timer_due || forced_checkpoint || closing))
            || (!self.has_checkpoint && (forced_checkpoint || closing));
        let checkpoint = checkpoint_due.then(|| self.write_checkpoint());
        if snapshot_due {
            self.write_snapshot(&bodies);
        }

        let wrote = !self.buf.is_empty();
        if let Err(e) = self.flush() {
            return fail(replies, e);
        }
        let sync_now = match self.config.durability {
            Durability::Strict => wrote,
            Durability::Relaxed { interval } => {
                self.unsynced
                    && (closing || checkpoint.is_some() || self.last_sync.elapsed() >= interval)
            }
        };
        if sync_now && let Err(e) = self.sync() {
            return fail(replies, e);
        }

        // Publish.
        let deltas = std::mem::take(&mut self.deltas);
        let mut st = self.lock();
        for leaf in leaves {
            st.tree.push(leaf);
        }
        for b in &bodies {
            st.counters.apply(b);
        }
        for d in deltas {
            if let Some(info) = d.created {
                st.segments.push(info);
            }
            if let Some(s) = st.segments.iter_mut().rev().find(|s| s.path == d.path) {
                s.end = d.end;
                s.events = d.events;
                s.sparse.extend(d.sparse);
            }
        }
        st.next_seq = self.next_seq;
        st.events += bodies.len() as u64;
        st.stats.appended += bodies.len() as u64;
        if wrote {
            st.stats.batches += 1;
        }
        if let Some(cp) = &checkpoint {
            st.latest_checkpoint = Some(cp.clone());
            st.stats.checkpoints += 1;
        }
        drop(st);
        Ok(replies)
    }
}
