//! The collector's upload checks (`sync::check`) against uploads built from real ledgers by the
//! device's own `build_upload`: an honest log is accepted batch after batch; every way of
//! tampering with it is refused and flags the device; resends are recognised.

use std::collections::BTreeMap;

use edgelora_ledger::bench::Mix;
use edgelora_ledger::merkle::Hash;
use edgelora_ledger::sync::check::{CheckError, LogState, Verified, check_upload, resent_range};
use edgelora_ledger::sync::client::{Position, build_upload};
use edgelora_ledger::sync::proto::Upload;
use edgelora_ledger::{Ledger, LedgerConfig, LedgerHandle, LedgerKey, PublicKey};

const DEVICE: &str = "box-7";

fn ledger(dir: &std::path::Path, seed: u8, events: usize, mix_seed: u64) -> LedgerHandle {
    let key = LedgerKey::from_seed(DEVICE, [seed; 32]).unwrap();
    let mut cfg = LedgerConfig::new(DEVICE, key);
    // Checkpoints exactly every 1000 events, whatever the machine's speed: one append per write
    // (group commit would put them at the end of whatever batch crosses 1000, and batches grow
    // under load) and no timer checkpoints. Upload batches end at checkpoints, so the counts
    // below depend on where they are. Durability plays no part here.
    cfg.checkpoint_every_events = 1000;
    cfg.max_batch = 1;
    cfg.checkpoint_interval = std::time::Duration::from_secs(3600);
    cfg.durability = edgelora_ledger::Durability::Relaxed {
        interval: std::time::Duration::from_secs(3600),
    };
    let (h, _) = Ledger::open(dir, cfg).unwrap();
    append(&h, events, mix_seed);
    h
}

fn append(h: &LedgerHandle, n: usize, mix_seed: u64) {
    let mut mix = Mix::new(mix_seed);
    let tickets: Vec<_> = (0..n).map(|_| h.append(mix.next_body())).collect();
    for t in tickets {
        t.wait().unwrap();
    }
}

/// A collector in memory: the state and the stored leaf hashes.
#[derive(Default)]
struct Collector {
    state: LogState,
    stored: BTreeMap<u64, Hash>,
}

impl Collector {
    fn position(&self) -> Position {
        Position {
            next_seq: self.state.next_seq,
            epoch: self.state.epoch,
            checkpoint_size: self.state.checkpoint.as_ref().map_or(0, |c| c.tree_size),
        }
    }

    fn offer(&mut self, key: &PublicKey, up: &Upload) -> Result<Verified, CheckError> {
        let resent: Vec<(u64, Hash)> = match resent_range(&self.state, up) {
            Some((a, b)) => self.stored.range(a..b).map(|(s, h)| (*s, *h)).collect(),
            None => Vec::new(),
        };
        let v = check_upload(&self.state, DEVICE, key, up, &resent)?;
        for (e, h) in &v.new_events {
            assert!(self.stored.insert(e.seq, *h).is_none(), "stored twice");
        }
        self.state = v.state.clone();
        Ok(v)
    }

    /// Syncs everything `h` has, in batches; returns the number of uploads.
    fn sync_all(&mut self, h: &LedgerHandle, batch: usize) -> usize {
        let mut n = 0;
        while let Some(up) = build_upload(h, self.position(), batch).unwrap() {
            self.offer(h.public_key(), &up).unwrap();
            n += 1;
        }
        n
    }
}

#[test]
fn an_honest_log_is_accepted_in_batches_and_resends_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let h = ledger(dir.path(), 1, 2500, 1);
    let mut c = Collector::default();
    // 2500 events in batches of 700 (crossing the device's checkpoints at 1000, 2000).
    let up1 = build_upload(&h, c.position(), 700).unwrap().unwrap();
    let v = c.offer(h.public_key(), &up1).unwrap();
    assert_eq!((v.new_events.len(), v.duplicates), (700, 0));
    assert_eq!(c.state.next_seq, 700);
    assert_eq!(c.sync_all(&h, 700), 3);
    assert_eq!(c.state.next_seq, 2500);
    assert_eq!(c.stored.len(), 2500);

    // The first upload again: all duplicates, nothing moves.
    let v = c.offer(h.public_key(), &up1).unwrap();
    assert_eq!((v.new_events.len(), v.duplicates), (0, 700));
    assert_eq!(c.state.next_seq, 2500);

    // More events later: the collector's last checkpoint is extended consistently.
    append(&h, 300, 2);
    assert_eq!(c.sync_all(&h, 4096), 1);
    assert_eq!(c.state.next_seq, 2800);
    assert!(build_upload(&h, c.position(), 4096).unwrap().is_none());
}

#[test]
fn an_upload_overlapping_the_stored_part_stores_only_the_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let h = ledger(dir.path(), 1, 1200, 1);
    let mut c = Collector::default();
    c.offer(
        h.public_key(),
        &build_upload(&h, c.position(), 500).unwrap().unwrap(),
    )
    .unwrap();
    // As if the ack of that upload was lost: the device sends again from 0.
    let stale = Position::default();
    let up = build_upload(&h, stale, 900).unwrap().unwrap();
    let v = c.offer(h.public_key(), &up).unwrap();
    assert_eq!((v.new_events.len(), v.duplicates), (400, 500));
    assert_eq!(c.state.next_seq, 900);
}

fn expect_flagged(r: Result<Verified, CheckError>, what: &str) -> CheckError {
    match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => {
            assert!(e.flags_device(), "{what}: {e} does not flag the device");
            e
        }
    }
}

#[test]
fn tampered_uploads_are_refused_and_flag_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let h = ledger(dir.path(), 1, 2000, 1);
    let key = h.public_key().clone();
    let mut c = Collector::default();
    c.offer(&key, &build_upload(&h, c.position(), 600).unwrap().unwrap())
        .unwrap();
    let before = c.state.clone();
    let honest = build_upload(&h, c.position(), 600).unwrap().unwrap();

    // A changed field (a flipped bit in an event).
    let mut up = honest.clone();
    up.events[10].body.completion_tokens ^= 1;
    let e = expect_flagged(c.offer(&key, &up), "changed event");
    assert!(
        e.to_string().contains("do not match the signed tree"),
        "{e}"
    );

    // Two events swapped.
    let mut up = honest.clone();
    up.events.swap(3, 4);
    expect_flagged(c.offer(&key, &up), "reordered events");

    // Swapped bodies with renumbered seqs (contiguous, but not what was signed).
    let mut up = honest.clone();
    let (a, b) = (up.events[3].body.clone(), up.events[4].body.clone());
    up.events[3].body = b;
    up.events[4].body = a;
    expect_flagged(c.offer(&key, &up), "reordered bodies");

    // A removed range: renumbered to look contiguous ...
    let mut up = honest.clone();
    up.events.drain(100..150);
    for (i, e) in up.events.iter_mut().enumerate() {
        e.seq = up.first_seq + i as u64;
    }
    expect_flagged(c.offer(&key, &up), "removed range (renumbered)");
    // ... or starting past the collector's position.
    let mut up = honest.clone();
    up.events.drain(..50);
    up.first_seq += 50;
    let e = expect_flagged(c.offer(&key, &up), "removed range (skipped)");
    assert!(e.to_string().contains("missing"), "{e}");

    // A checkpoint signed by another key, or a flipped bit in the note.
    let other = LedgerKey::from_seed(DEVICE, [9; 32]).unwrap();
    let mut up = honest.clone();
    let cp = edgelora_ledger::Checkpoint::parse(&up.checkpoint).unwrap();
    up.checkpoint = edgelora_ledger::Checkpoint::sign(
        &cp.origin,
        cp.tree_size,
        cp.root,
        cp.time_ms,
        cp.first_seq,
        &other,
    )
    .note()
    .to_string();
    expect_flagged(c.offer(&key, &up), "checkpoint by another key");
    let mut up = honest.clone();
    let mut note = up.checkpoint.into_bytes();
    note[2] ^= 0x01;
    up.checkpoint = String::from_utf8(note).unwrap();
    expect_flagged(c.offer(&key, &up), "flipped bit in the checkpoint");

    // A wrong proof.
    let mut up = honest.clone();
    if let Some(p) = up.batch_proof.first_mut() {
        p[0] ^= 1;
    }
    expect_flagged(c.offer(&key, &up), "bad batch proof");

    // Nothing of the above moved the collector; the honest upload still goes through.
    assert_eq!(c.state, before);
    c.offer(&key, &honest).unwrap();
    assert_eq!(c.state.next_seq, 1200);
}

#[test]
fn a_rewritten_history_under_the_same_key_is_a_fork() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let h1 = ledger(d1.path(), 1, 1500, 1);
    let mut c = Collector::default();
    c.sync_all(&h1, 1000);
    assert_eq!(c.state.next_seq, 1500);

    // The same key and device id, a different history (first 1000 events equal, then not).
    let h2 = ledger(d2.path(), 1, 1000, 1);
    append(&h2, 1000, 99);
    let key = h2.public_key().clone();
    assert_eq!(&key, h1.public_key());

    // Resending the rewritten part: the stored events differ.
    let up = build_upload(&h2, Position::default(), 1600)
        .unwrap()
        .unwrap();
    let e = expect_flagged(c.offer(&key, &up), "rewritten resend");
    assert!(e.to_string().contains("rewritten"), "{e}");

    // Continuing after the collector's position with the forked tree: the new checkpoint is
    // not an extension of the accepted one, and the new events do not extend the stored tree.
    let up = build_upload(&h2, c.position(), 4096).unwrap().unwrap();
    expect_flagged(c.offer(&key, &up), "forked continuation");
    assert_eq!(c.state.next_seq, 1500);
}

#[test]
fn an_older_epoch_or_checkpoint_is_stale_not_suspect() {
    let dir = tempfile::tempdir().unwrap();
    let h = ledger(dir.path(), 1, 300, 1);
    let mut c = Collector::default();
    c.sync_all(&h, 4096);
    let mut up = build_upload(&h, Position::default(), 10).unwrap().unwrap();
    up.epoch = 0;
    c.state.epoch = 1;
    let e = c.offer(h.public_key(), &up).unwrap_err();
    assert!(!e.flags_device() && e.code().retryable(), "{e}");
}
