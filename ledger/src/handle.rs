//! `Ledger::open` and the cloneable handle the daemon uses.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::checkpoint::{Checkpoint, NoteError};
use crate::config::LedgerConfig;
use crate::counters::Counters;
use crate::error::LedgerError;
use crate::event::{Event, EventBody};
use crate::key::PublicKey;
use crate::merkle::{
    self, CHUNK_LEAVES, ChunkCache, Hash, Missing, ProofError, TreeStore, leaf_hash_of_event,
};
use crate::recovery::recover;
use crate::report::{Damage, OpenReport};
use crate::state::{LedgerStats, State, read_events};
use crate::ticket::{Ticket, oneshot};
use crate::writer::{Command, Writer};

/// File name of the verifier key beside the segments.
pub const PUBLIC_KEY_FILE: &str = "ledger.pub";
const LOCK_FILE: &str = "LOCK";

/// Opens ledgers. See `Ledger::open`.
pub struct Ledger;

impl Ledger {
    /// Opens (or creates) the ledger in `dir`: takes an exclusive lock on the directory, writes
    /// or checks `ledger.pub`, recovers (see `OpenReport`), and starts the writer thread.
    pub fn open(
        dir: impl AsRef<Path>,
        config: LedgerConfig,
    ) -> Result<(LedgerHandle, OpenReport), LedgerError> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| LedgerError::io(&dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LedgerError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(LedgerError::Locked(dir)),
            Err(fs::TryLockError::Error(e)) => return Err(LedgerError::io(&lock_path, e)),
        }
        let public_key = config.key.public_key();
        check_or_write_public_key(&dir, &public_key)?;

        let recovered = recover(&dir)?;
        let report = recovered.report;
        tracing::info!(
            dir = %dir.display(),
            events = report.events,
            next_seq = report.next_seq,
            truncated_bytes = report.truncated_bytes,
            quarantined = report.quarantined.len(),
            epoch = report.epoch,
            replayed = report.replayed_events,
            "ledger opened"
        );
        let state = Arc::new(Mutex::new(recovered.state));
        let (tx, rx) = mpsc::channel();
        let writer = Writer::new(dir.clone(), config.clone(), state.clone(), recovered.writer);
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LedgerError::io(&dir, e))?;
        let handle = LedgerHandle {
            inner: Arc::new(Inner {
                dir,
                tx,
                state,
                thread: Mutex::new(Some(thread)),
                public_key,
                _lock: lock,
            }),
        };
        Ok((handle, report))
    }
}

fn check_or_write_public_key(dir: &Path, pk: &PublicKey) -> Result<(), LedgerError> {
    let path = dir.join(PUBLIC_KEY_FILE);
    let expected = pk.to_verifier_string();
    match fs::read_to_string(&path) {
        Ok(found) if found.trim() == expected => Ok(()),
        Ok(found) => Err(LedgerError::KeyMismatch {
            path,
            found: found.trim().to_string(),
            expected,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = dir.join(format!("{PUBLIC_KEY_FILE}.tmp"));
            fs::write(&tmp, format!("{expected}\n"))
                .and_then(|_| File::open(&tmp)?.sync_all())
                .and_then(|_| fs::rename(&tmp, &path))
                .and_then(|_| crate::segment::sync_dir(dir))
                .map_err(|e| LedgerError::io(&path, e))
        }
        Err(e) => Err(LedgerError::io(&path, e)),
    }
}

struct Inner {
    dir: PathBuf,
    tx: Sender<Command>,
    state: Arc<Mutex<State>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    public_key: PublicKey,
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close cleanly (final checkpoint, fsync) before the directory lock is released.
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let (reply, pending) = oneshot(Err(LedgerError::Closed));
            if self.tx.send(Command::Close(reply)).is_ok() {
                let _ = pending.wait();
            }
            let _ = t.join();
        }
    }
}

/// A handle to an open ledger: cheap to clone, usable from any thread. The ledger closes when
/// `close` is called or the last handle is dropped.
#[derive(Clone)]
pub struct LedgerHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// An event, the signed checkpoint it is proven against, and the audit path.
#[derive(Debug, Clone)]
pub struct EventProof {
    pub event: Event,
    /// Leaf index in the checkpoint's tree (sequence number minus the checkpoint's `first_seq`).
    pub leaf_index: u64,
    pub leaf_hash: Hash,
    pub path: Vec<Hash>,
    pub checkpoint: Checkpoint,
}

/// Why an `EventProof` did not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventProofError {
    #[error(transparent)]
    Signature(#[from] NoteError),
    #[error("the leaf hash does not match the event")]
    LeafMismatch,
    #[error("the event's sequence number does not match the leaf index")]
    IndexMismatch,
    #[error(transparent)]
    Path(#[from] ProofError),
}

impl EventProof {
    /// Checks everything with only the public key: signature, leaf hash, index, audit path.
    pub fn verify(&self, key: &PublicKey) -> Result<(), EventProofError> {
        self.checkpoint.verify(key)?;
        if leaf_hash_of_event(&self.event) != self.leaf_hash {
            return Err(EventProofError::LeafMismatch);
        }
        if self.event.seq.checked_sub(self.checkpoint.first_seq) != Some(self.leaf_index) {
            return Err(EventProofError::IndexMismatch);
        }
        merkle::verify_inclusion(
            self.leaf_index,
            self.checkpoint.tree_size,
            &self.leaf_hash,
            &self.path,
            &self.checkpoint.root,
        )?;
        Ok(())
    }
}

/// A consistency proof between two sizes of the current epoch's tree, with both roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyProof {
    pub old_size: u64,
    pub new_size: u64,
    pub old_root: Hash,
    pub new_root: Hash,
    pub path: Vec<Hash>,
}

impl LedgerHandle {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one event. The returned ticket resolves to its sequence number once it is durable
    /// (see `Durability`). Invalid events are refused at once and never queued.
    pub fn append(&self, body: EventBody) -> Ticket {
        if let Err(e) = body.validate() {
            return Ticket::ready(Err(e));
        }
        let (reply, ticket) = Ticket::new();
        // If the writer is gone, the command (and its reply) is dropped: the ticket says Closed.
        let _ = self.inner.tx.send(Command::Append(body, reply));
        ticket
    }

    /// Signs a checkpoint now if events arrived since the last one; returns the latest.
    pub fn checkpoint_now(&self) -> Result<Checkpoint, LedgerError> {
        let (reply, pending) = oneshot(Err(LedgerError::Closed));
        let _ = self.inner.tx.send(Command::Checkpoint(reply));
        pending.wait()
    }

    /// Writes a final checkpoint and snapshot, fsyncs, and stops the writer. Later appends fail
    /// with `Closed`. Returns the final checkpoint.
    pub fn close(&self) -> Result<Option<Checkpoint>, LedgerError> {
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(thread) = thread else {
            return Err(LedgerError::Closed);
        };
        let (reply, pending) = oneshot(Err(LedgerError::Closed));
        let _ = self.inner.tx.send(Command::Close(reply));
        let result = pending.wait();
        let _ = thread.join();
        result
    }

    /// Counters per (contributor, kind), as of the last published batch.
    pub fn counters(&self) -> Counters {
        self.state().counters.clone()
    }

    /// Up to `limit` events with sequence numbers `>= since_seq`, in order. Sequence numbers
    /// lost to damage are skipped.
    pub fn events(&self, since_seq: u64, limit: usize) -> Result<Vec<Event>, LedgerError> {
        let plans = self.state().plan_reads(since_seq);
        read_events(plans, since_seq, limit)
    }

    /// The latest signed checkpoint of the current epoch.
    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        self.state().latest_checkpoint.clone()
    }

    /// Damage found at open or while running (for `/health`); empty when all is well.
    pub fn damaged(&self) -> Vec<Damage> {
        self.state().damage.clone()
    }

    /// Bytes of log holding the events at and after `seq` (to within 256 events): what an
    /// unsynced backlog from `seq` weighs on disk.
    pub fn bytes_since(&self, seq: u64) -> u64 {
        self.state().bytes_since(seq)
    }

    /// The sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.state().next_seq
    }

    /// Events in the log.
    pub fn event_count(&self) -> u64 {
        self.state().events
    }

    /// The current Merkle epoch and the sequence number of its leaf 0.
    pub fn epoch(&self) -> (u32, u64) {
        let st = self.state();
        (st.epoch, st.epoch_first_seq)
    }

    pub fn stats(&self) -> LedgerStats {
        self.state().stats
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.inner.public_key
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Runs `f` over the tree, loading leaf chunks from disk until nothing is missing.
    fn with_tree<R>(
        &self,
        mut f: impl FnMut(&mut TreeStore, &ChunkCache, &mut Missing) -> R,
    ) -> Result<R, LedgerError> {
        let mut cache = ChunkCache::new();
        loop {
            let (chunks, first_seq, size) = {
                let mut st = self.state();
                let mut missing = Missing::default();
                let r = f(&mut st.tree, &cache, &mut missing);
                if missing.is_empty() {
                    return Ok(r);
                }
                (missing.chunks, st.epoch_first_seq, st.tree.size())
            };
            for chunk in chunks {
                if cache.contains_key(&chunk) {
                    // Loaded, yet still missing: the chunk is incomplete on disk.
                    let have = cache[&chunk].len() as u64;
                    return Err(LedgerError::LeafUnavailable(
                        first_seq + chunk * CHUNK_LEAVES + have,
                    ));
                }
                let start = chunk * CHUNK_LEAVES;
                let count = (size - start).min(CHUNK_LEAVES) as usize;
                let events = self.events(first_seq + start, count)?;
                let mut leaves = Vec::with_capacity(count);
                for (i, ev) in events.iter().enumerate() {
                    if ev.seq != first_seq + start + i as u64 {
                        return Err(LedgerError::LeafUnavailable(first_seq + start + i as u64));
                    }
                    leaves.push(leaf_hash_of_event(ev));
                }
                cache.insert(chunk, leaves);
            }
        }
    }

    /// Proves that event `seq` is in the tree of the latest checkpoint.
    pub fn inclusion_proof(&self, seq: u64) -> Result<EventProof, LedgerError> {
        let cp = self
            .latest_checkpoint()
            .ok_or(LedgerError::NotCheckpointed(seq))?;
        let (_, first_seq) = self.epoch();
        if seq < first_seq {
            return Err(LedgerError::BadProofRequest(format!(
                "sequence number {seq} belongs to an earlier epoch (this one starts at {first_seq})"
            )));
        }
        let index = seq - first_seq;
        if index >= cp.tree_size {
            return Err(LedgerError::NotCheckpointed(seq));
        }
        let event = self
            .events(seq, 1)?
            .into_iter()
            .next()
            .filter(|e| e.seq == seq)
            .ok_or(LedgerError::LeafUnavailable(seq))?;
        let size = cp.tree_size;
        let path = self.with_tree(|t, cache, missing| {
            merkle::inclusion_proof(index, size, &mut |a, b| t.mth(a, b, cache, missing))
        })?;
        Ok(EventProof {
            leaf_hash: leaf_hash_of_event(&event),
            event,
            leaf_index: index,
            path,
            checkpoint: cp,
        })
    }

    /// The audit path of event `seq` in the current epoch's tree of `tree_size` leaves (any size
    /// up to the current one, not only checkpointed ones).
    pub fn inclusion_path(&self, seq: u64, tree_size: u64) -> Result<Vec<Hash>, LedgerError> {
        let (size, first_seq) = {
            let st = self.state();
            (st.tree.size(), st.epoch_first_seq)
        };
        let index = seq.checked_sub(first_seq);
        match index {
            Some(index) if index < tree_size && tree_size <= size => {
                self.with_tree(|t, cache, missing| {
                    merkle::inclusion_proof(index, tree_size, &mut |a, b| {
                        t.mth(a, b, cache, missing)
                    })
                })
            }
            _ => Err(LedgerError::BadProofRequest(format!(
                "sequence number {seq} is not a leaf of a tree of {tree_size} leaves starting at \
                 {first_seq} (current size {size})"
            ))),
        }
    }

    /// The root of the current epoch's tree at `tree_size` leaves.
    pub fn root_at(&self, tree_size: u64) -> Result<Hash, LedgerError> {
        let size = self.state().tree.size();
        if tree_size > size {
            return Err(LedgerError::BadProofRequest(format!(
                "tree size {tree_size} exceeds the current size {size}"
            )));
        }
        if tree_size == 0 {
            return Ok(merkle::empty_root());
        }
        self.with_tree(|t, cache, missing| t.mth(0, tree_size, cache, missing))
    }

    /// Proves that the current epoch's tree of `old_size` leaves is a prefix of the one of
    /// `new_size` leaves (`new_size` at most the current size).
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<ConsistencyProof, LedgerError> {
        let size = self.state().tree.size();
        if old_size > new_size || new_size > size {
            return Err(LedgerError::BadProofRequest(format!(
                "need old size <= new size <= {size}, got {old_size} and {new_size}"
            )));
        }
        let (old_root, new_root, path) = self.with_tree(|t, cache, missing| {
            let mut mth = |a, b| t.mth(a, b, cache, missing);
            let root = |n: u64, mth: &mut dyn FnMut(u64, u64) -> Hash| {
                if n == 0 {
                    merkle::empty_root()
                } else {
                    mth(0, n)
                }
            };
            let old_root = root(old_size, &mut mth);
            let new_root = root(new_size, &mut mth);
            (
                old_root,
                new_root,
                merkle::consistency_proof(old_size, new_size, &mut mth),
            )
        })?;
        Ok(ConsistencyProof {
            old_size,
            new_size,
            old_root,
            new_root,
            path,
        })
    }
}
