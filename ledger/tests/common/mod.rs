//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use edgelora_ledger::bench::Mix;
use edgelora_ledger::{
    Event, EventBody, Ledger, LedgerConfig, LedgerHandle, LedgerKey, OpenReport,
};

pub const DEVICE: &str = "test-box-1";

pub fn key() -> LedgerKey {
    LedgerKey::from_seed(DEVICE, [7u8; 32]).unwrap()
}

/// Small segments, frequent checkpoints and snapshots, so that short tests cross every boundary.
pub fn config() -> LedgerConfig {
    let mut c = LedgerConfig::new(DEVICE, key());
    c.segment_bytes = 4096;
    c.checkpoint_every_events = 16;
    c.snapshot_every_events = 64;
    c
}

pub fn open(dir: &Path) -> (LedgerHandle, OpenReport) {
    Ledger::open(dir, config()).unwrap()
}

pub fn bodies(n: usize, seed: u64) -> Vec<EventBody> {
    let mut mix = Mix::new(seed);
    (0..n).map(|_| mix.next_body()).collect()
}

/// Appends `n` events (waiting for each batch of tickets) and returns them with their seqs.
pub fn append_all(ledger: &LedgerHandle, bodies: Vec<EventBody>) -> Vec<Event> {
    let tickets: Vec<_> = bodies.iter().map(|b| ledger.append(b.clone())).collect();
    tickets
        .into_iter()
        .zip(bodies)
        .map(|(t, body)| Event {
            seq: t.wait().unwrap(),
            body,
        })
        .collect()
}

/// A closed ledger holding `n` events.
pub fn build(dir: &Path, n: usize) -> Vec<Event> {
    let (ledger, _) = open(dir);
    let events = append_all(&ledger, bodies(n, 1));
    ledger.close().unwrap();
    events
}
