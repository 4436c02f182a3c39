//! Ledger configuration.

use std::time::Duration;

use crate::error::LedgerError;
use crate::key::LedgerKey;

/// When `Ticket::wait` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After the event's bytes are fsynced (group commit shares one fsync among everything
    /// queued meanwhile). Nothing acknowledged is lost, even on power loss.
    #[default]
    Strict,
    /// After the event's bytes are written to the page cache; the writer fsyncs every
    /// `interval`. Survives a process crash (kill -9), but on power loss or a kernel crash the
    /// events acknowledged during the last `interval` can be lost.
    Relaxed { interval: Duration },
}

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// The device id: the origin of checkpoints. Letters, digits, '.', '_', '-' (at most 128).
    pub device_id: String,
    /// The device's ledger signing key.
    pub key: LedgerKey,
    pub durability: Durability,
    /// A segment is sealed and a new one started once it reaches this many bytes.
    pub segment_bytes: u64,
    /// Sign a checkpoint after this many events ...
    pub checkpoint_every_events: u64,
    /// ... or this long after the first event not yet covered by one, whichever comes first.
    pub checkpoint_interval: Duration,
    /// Write a counters/Merkle snapshot (with a checkpoint) after this many events; bounds the
    /// replay at open.
    pub snapshot_every_events: u64,
    /// Most appends folded into one write + fsync.
    pub max_batch: usize,
}

impl LedgerConfig {
    pub fn new(device_id: impl Into<String>, key: LedgerKey) -> Self {
        LedgerConfig {
            device_id: device_id.into(),
            key,
            durability: Durability::Strict,
            segment_bytes: 64 << 20,
            checkpoint_every_events: 4096,
            checkpoint_interval: Duration::from_secs(10),
            snapshot_every_events: 65_536,
            max_batch: 4096,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), LedgerError> {
        let id = &self.device_id;
        if id.is_empty()
            || id.len() > 128
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return Err(LedgerError::Config(format!(
                "device id {id:?} must be 1-128 letters, digits, '.', '_' or '-'"
            )));
        }
        if self.segment_bytes < 4096 {
            return Err(LedgerError::Config(
                "segment_bytes must be at least 4096".into(),
            ));
        }
        if self.checkpoint_every_events == 0
            || self.snapshot_every_events == 0
            || self.max_batch == 0
        {
            return Err(LedgerError::Config(
                "checkpoint_every_events, snapshot_every_events and max_batch must be positive"
                    .into(),
            ));
        }
        if let Durability::Relaxed { interval } = self.durability
            && interval.is_zero()
        {
            return Err(LedgerError::Config(
                "relaxed fsync interval must be positive".into(),
            ));
        }
        Ok(())
    }
}
