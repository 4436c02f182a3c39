//! Typed errors. `LedgerError` is `Clone` because one failed group commit answers every ticket
//! in its batch with the same error.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What went wrong while opening, appending to or reading from a ledger.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// An operating-system call failed on `path`.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// A segment was written by a newer (or unknown) format version. Nothing was changed on disk.
    #[error(
        "{}: segment format version {version} is not supported (this build reads version {}); \
         run the edgelora version that wrote it, nothing was modified",
        path.display(), crate::format::header::VERSION
    )]
    UnsupportedVersion { path: PathBuf, version: u16 },
    /// Another process (or another `Ledger::open` in this one) holds the directory.
    #[error(
        "ledger directory {} is locked by another process; stop the other edgelorad first",
        .0.display()
    )]
    Locked(PathBuf),
    /// `<dir>/ledger.pub` names a different key than the one the ledger was opened with.
    #[error(
        "{} holds public key {found}, but the ledger was opened with {expected}; the device key \
         changed: restore the original key file or move the old ledger aside",
        path.display()
    )]
    KeyMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// The configuration cannot work (e.g. an empty device id).
    #[error("invalid ledger configuration: {0}")]
    Config(String),
    /// The event was rejected before it was queued; nothing was written.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// The handle was closed (or the writer thread exited).
    #[error("ledger is closed")]
    Closed,
    /// An earlier write or fsync failed. After a failed fsync the page cache may have dropped
    /// data, so the writer stops rather than guess; reopening the ledger re-scans the disk.
    #[error("ledger writer stopped after an I/O failure ({0}); reopen the ledger to recover")]
    Poisoned(String),
    /// No event with this sequence number is in the log.
    #[error("sequence number {0} is not in the log")]
    NotFound(u64),
    /// The event exists but no signed checkpoint covers it yet (see `LedgerHandle::checkpoint_now`).
    #[error("no signed checkpoint covers sequence number {0} yet")]
    NotCheckpointed(u64),
    /// A proof needs a leaf that the log no longer holds (its segment was quarantined or lost).
    #[error("proof needs the event with sequence number {0}, which is not available (damaged log)")]
    LeafUnavailable(u64),
    /// The requested tree sizes do not describe a valid proof.
    #[error("invalid proof request: {0}")]
    BadProofRequest(String),
    /// A frame read back from a sealed segment failed its checks after open accepted it.
    #[error("{}: frame at byte {offset} is corrupt: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Loading or creating the signing key failed.
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl LedgerError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        LedgerError::Io {
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

/// Loading, creating or parsing a key failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("I/O error on key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error(
        "key file {} holds {len} bytes, expected a 32-byte Ed25519 seed; restore it from backup",
        path.display()
    )]
    BadSeedLength { path: PathBuf, len: usize },
    #[error("key name {0:?} is invalid: it must be non-empty and contain no whitespace or '+'")]
    BadName(String),
    #[error("malformed verifier key {0:?}: {1}")]
    BadVerifierKey(String, &'static str),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

impl KeyError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        KeyError::Io {
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}
