//! Injected faults: each is detected and reported as specified, and nothing after the damage is
//! silently accepted.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use edgelora_ledger::format::frame::FrameKind;
use edgelora_ledger::format::header::{SegmentHeader, segment_file_name};
use edgelora_ledger::inspect::{SegmentDump, inspect};
use edgelora_ledger::torture::SplitMix;
use edgelora_ledger::{DamageKind, Event, Ledger, LedgerError, OpenReport, verify};

fn dumps(dir: &Path) -> Vec<SegmentDump> {
    inspect(dir).unwrap()
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn seqs_in(d: &SegmentDump) -> Vec<u64> {
    d.frames
        .iter()
        .filter_map(|f| f.event.as_ref().map(|e| e.seq))
        .collect()
}

fn flip_bit(path: &Path, offset: u64) {
    let mut b = fs::read(path).unwrap();
    b[offset as usize] ^= 0x04;
    fs::write(path, b).unwrap();
}

fn assert_verify_fails_at(dir: &Path, path: &Path, offset: u64) {
    let err = verify(dir, &common::key().public_key()).unwrap_err();
    assert_eq!((err.path.as_path(), err.offset), (path, offset), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.file_name().unwrap().to_string_lossy().to_string())
            && msg.contains(&offset.to_string())
    );
}

/// After recovery, the ledger appends, checkpoints, and a clean close leaves no new damage.
fn appends_continue(dir: &Path, report: &OpenReport) -> u64 {
    let (ledger, again) = common::open(dir);
    assert!(
        again
            .new_damage()
            .all(|d| d.kind == DamageKind::SequenceGap),
        "{:?}",
        again.damage
    );
    assert!(again.quarantined.is_empty());
    let seq = ledger
        .append(common::bodies(1, 99).remove(0))
        .wait()
        .unwrap();
    assert_eq!(seq, report.next_seq);
    ledger
        .checkpoint_now()
        .unwrap()
        .verify(ledger.public_key())
        .unwrap();
    ledger.close().unwrap();
    seq
}

#[test]
fn truncated_last_frame_is_cut_off_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let events = common::build(dir.path(), 100);
    let last = dumps(dir.path()).pop().unwrap();
    let ev = last
        .frames
        .iter()
        .rev()
        .find(|f| f.kind == FrameKind::Event)
        .unwrap();
    let cut = ev.offset + ev.len / 2;
    fs::OpenOptions::new()
        .write(true)
        .open(&last.path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    assert_verify_fails_at(dir.path(), &last.path, ev.offset);

    let (ledger, report) = common::open(dir.path());
    assert_eq!(report.truncated_bytes, cut - ev.offset);
    assert!(report.damage.is_empty() && ledger.damaged().is_empty());
    assert_eq!(fs::metadata(&last.path).unwrap().len(), ev.offset);
    assert_eq!(ledger.events(0, 1000).unwrap(), events[..99].to_vec());
    assert_eq!(
        ledger
            .append(common::bodies(1, 5).remove(0))
            .wait()
            .unwrap(),
        99
    );
    ledger.close().unwrap();
    verify(dir.path(), &common::key().public_key()).unwrap();
}

#[test]
fn garbage_appended_to_the_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let events = common::build(dir.path(), 100);
    let last = dumps(dir.path()).pop().unwrap();
    let mut rng = SplitMix::new(1);
    let garbage: Vec<u8> = (0..1000).map(|_| rng.next_u64() as u8).collect();
    let mut b = fs::read(&last.path).unwrap();
    let len = b.len() as u64;
    b.extend_from_slice(&garbage);
    fs::write(&last.path, b).unwrap();
    assert_verify_fails_at(dir.path(), &last.path, len);

    let (ledger, report) = common::open(dir.path());
    assert_eq!(report.truncated_bytes, 1000);
    assert!(report.damage.is_empty());
    assert_eq!(ledger.events(0, 1000).unwrap(), events);
    ledger.close().unwrap();
    verify(dir.path(), &common::key().public_key()).unwrap();
}

#[test]
fn a_zeroed_4k_block_appended_at_the_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let events = common::build(dir.path(), 100);
    let last = dumps(dir.path()).pop().unwrap();
    let mut b = fs::read(&last.path).unwrap();
    b.extend_from_slice(&[0u8; 4096]);
    fs::write(&last.path, b).unwrap();
    let (ledger, report) = common::open(dir.path());
    assert_eq!(report.truncated_bytes, 4096);
    assert!(report.damage.is_empty());
    assert_eq!(ledger.events(0, 1000).unwrap(), events);
}

#[test]
fn a_zeroed_4k_block_over_the_tail_cuts_back_to_the_first_damaged_frame() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config();
    c.segment_bytes = 1 << 20;
    let (ledger, _) = Ledger::open(dir.path(), c.clone()).unwrap();
    let events = common::append_all(&ledger, common::bodies(600, 4));
    ledger.close().unwrap();
    drop(ledger);
    let seg = dumps(dir.path()).pop().unwrap();
    let zero_from = seg.file_len - 4096;
    let mut b = fs::read(&seg.path).unwrap();
    b[zero_from as usize..].fill(0);
    fs::write(&seg.path, b).unwrap();
    let first_bad = seg
        .frames
        .iter()
        .find(|f| f.offset + f.len > zero_from)
        .unwrap();
    let survivors = seg
        .frames
        .iter()
        .filter(|f| f.kind == FrameKind::Event && f.offset < first_bad.offset)
        .count();

    let (ledger, report) = Ledger::open(dir.path(), c).unwrap();
    assert_eq!(report.truncated_bytes, seg.file_len - first_bad.offset);
    assert!(report.damage.is_empty());
    assert_eq!(
        ledger.events(0, 1000).unwrap(),
        events[..survivors].to_vec()
    );
    assert_eq!(ledger.next_seq(), survivors as u64);
    ledger.close().unwrap();
    verify(dir.path(), &common::key().public_key()).unwrap();
}

#[test]
fn a_flipped_bit_in_a_sealed_segment_quarantines_it_and_appends_continue_in_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let events = common::build(dir.path(), 100);
    let all = dumps(dir.path());
    assert!(all.len() >= 4, "need several segments, got {}", all.len());
    let victim = &all[1];
    let frame = victim
        .frames
        .iter()
        .filter(|f| f.kind == FrameKind::Event)
        .nth(2)
        .unwrap();
    flip_bit(&victim.path, frame.offset + frame.len - 3);
    let damaged_bytes = fs::read(&victim.path).unwrap();
    assert_verify_fails_at(dir.path(), &victim.path, frame.offset);

    let (ledger, report) = common::open(dir.path());
    let d = &report.damage[0];
    assert_eq!(
        (d.kind, d.path.as_path(), d.offset),
        (
            DamageKind::CorruptFrame,
            victim.path.as_path(),
            frame.offset
        )
    );
    let moved = PathBuf::from(format!("{}.quarantined", victim.path.display()));
    assert_eq!(report.quarantined, vec![moved.clone()]);
    assert_eq!(d.quarantined_to.as_ref(), Some(&moved));
    assert!(!victim.path.exists());
    assert_eq!(
        fs::read(&moved).unwrap(),
        damaged_bytes,
        "a quarantined segment is never rewritten"
    );
    assert_eq!(ledger.damaged().len(), 1);
    assert_eq!(report.next_seq, 100);
    // The events of the other segments are all there; the victim's are not served.
    let lost = seqs_in(victim);
    let expected: Vec<u64> = seqs(&events)
        .into_iter()
        .filter(|s| !lost.contains(s))
        .collect();
    assert_eq!(seqs(&ledger.events(0, 1000).unwrap()), expected);
    // A snapshot after the damage carries the tree on: same epoch, no reuse of sequence numbers.
    assert!(!report.new_epoch);
    assert_eq!(
        ledger
            .append(common::bodies(1, 5).remove(0))
            .wait()
            .unwrap(),
        100
    );
    let cp = ledger.checkpoint_now().unwrap();
    assert_eq!((cp.origin.as_str(), cp.tree_size), (common::DEVICE, 101));
    // The snapshot's right edge stands in for the lost leaves: new events are provable, lost
    // ones are reported as unavailable rather than proven wrongly.
    ledger
        .inclusion_proof(100)
        .unwrap()
        .verify(ledger.public_key())
        .unwrap();
    assert!(matches!(
        ledger.inclusion_proof(lost[0]),
        Err(LedgerError::LeafUnavailable(_))
    ));
    let dir_files: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        dir_files.contains(&segment_file_name(100).into()),
        "appends go to a new segment"
    );
    ledger.close().unwrap();
    drop(ledger);

    // Later opens keep reporting it (for /health) without quarantining anything else, and
    // verify names the gap the quarantine left.
    let (ledger, again) = common::open(dir.path());
    assert!(again.quarantined.is_empty());
    assert!(
        again
            .damage
            .iter()
            .any(|d| d.kind == DamageKind::PreviouslyQuarantined)
    );
    assert!(
        again
            .damage
            .iter()
            .any(|d| d.kind == DamageKind::SequenceGap)
    );
    drop(ledger);
    let err = verify(dir.path(), &common::key().public_key()).unwrap_err();
    assert_eq!((err.path.as_path(), err.offset), (all[2].path.as_path(), 0));
}

#[test]
fn a_flipped_bit_mid_last_segment_with_intact_frames_after_it_is_quarantined_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    common::build(dir.path(), 100);
    let all = dumps(dir.path());
    let last = all.last().unwrap();
    let frame = last
        .frames
        .iter()
        .find(|f| f.kind == FrameKind::Event)
        .unwrap();
    assert!(
        last.frames.last().unwrap().offset > frame.offset,
        "intact frames follow"
    );
    flip_bit(&last.path, frame.offset + 12);
    let bytes = fs::read(&last.path).unwrap();
    assert_verify_fails_at(dir.path(), &last.path, frame.offset);

    let (ledger, report) = common::open(dir.path());
    assert_eq!(
        report.truncated_bytes, 0,
        "damage with intact frames after it is not a torn tail"
    );
    let d = &report.damage[0];
    assert_eq!((d.kind, d.offset), (DamageKind::CorruptFrame, frame.offset));
    assert_eq!(fs::read(d.quarantined_to.as_ref().unwrap()).unwrap(), bytes);
    // Sequence numbers found after the damage are not reused.
    assert_eq!(report.next_seq, 100);
    // The last snapshot precedes the lost events: the tree cannot continue, a new epoch starts.
    assert!(report.new_epoch);
    assert_eq!(report.epoch, 1);
    assert_eq!(
        ledger
            .append(common::bodies(1, 5).remove(0))
            .wait()
            .unwrap(),
        100
    );
    let cp = ledger.checkpoint_now().unwrap();
    assert_eq!(
        (cp.origin.as_str(), cp.first_seq, cp.tree_size),
        ("test-box-1/epoch-1", 100, 1)
    );
    ledger.close().unwrap();
    drop(ledger);
    let (ledger, again) = common::open(dir.path());
    assert!(!again.new_epoch, "the new epoch is stable across reopens");
    assert_eq!(ledger.epoch(), (1, 100));
    let p = ledger.inclusion_proof(100).unwrap();
    p.verify(ledger.public_key()).unwrap();
    drop(ledger);
    let (ledger, report) = common::open(dir.path());
    drop(ledger);
    appends_continue(dir.path(), &report);
}

#[test]
fn a_deleted_middle_segment_is_reported_as_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let events = common::build(dir.path(), 100);
    let all = dumps(dir.path());
    let gone = &all[2];
    fs::remove_file(&gone.path).unwrap();
    assert_verify_fails_at(dir.path(), &all[3].path, 0);

    let (ledger, report) = common::open(dir.path());
    assert!(report.quarantined.is_empty());
    let d = &report.damage[0];
    assert_eq!(
        (d.kind, d.path.as_path()),
        (DamageKind::SequenceGap, all[3].path.as_path())
    );
    assert_eq!(ledger.damaged(), report.damage);
    let lost = seqs_in(gone);
    assert_eq!(report.events, 100 - lost.len() as u64);
    assert_eq!(report.next_seq, 100);
    assert_eq!(
        ledger.events(lost[0], 1).unwrap()[0].seq,
        lost.last().unwrap() + 1
    );
    assert_eq!(
        ledger.events(0, 1000).unwrap().len() + lost.len(),
        events.len()
    );
    drop(ledger);
    appends_continue(dir.path(), &report);
}

#[test]
fn swapped_event_frames_are_detected_and_the_segment_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    common::build(dir.path(), 100);
    let all = dumps(dir.path());
    let (victim, pair) = all
        .iter()
        .find_map(|d| {
            d.frames
                .windows(2)
                .find(|w| w[0].kind == FrameKind::Event && w[1].kind == FrameKind::Event)
                .map(|w| (d, w))
        })
        .unwrap();
    let (a, b) = (&pair[0], &pair[1]);
    let mut bytes = fs::read(&victim.path).unwrap();
    let fa = bytes[a.offset as usize..(a.offset + a.len) as usize].to_vec();
    let fb = bytes[b.offset as usize..(b.offset + b.len) as usize].to_vec();
    let mut swapped = fb.clone();
    swapped.extend_from_slice(&fa);
    bytes.splice(a.offset as usize..(b.offset + b.len) as usize, swapped);
    fs::write(&victim.path, &bytes).unwrap();
    assert_verify_fails_at(dir.path(), &victim.path, a.offset);

    let (_ledger, report) = common::open(dir.path());
    let d = &report.damage[0];
    assert_eq!(
        (d.kind, d.path.as_path(), d.offset),
        (DamageKind::InvalidFrame, victim.path.as_path(), a.offset)
    );
    assert!(d.detail.contains("sequence number"), "{}", d.detail);
    assert_eq!(report.quarantined.len(), 1);
}

#[test]
fn a_segment_whose_header_chain_does_not_match_its_predecessor_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    common::build(dir.path(), 100);
    let all = dumps(dir.path());
    let victim = &all[3];
    let mut bytes = fs::read(&victim.path).unwrap();
    let mut h = SegmentHeader::decode(&bytes).unwrap();
    h.prev_chain[0] ^= 1;
    bytes[..h.encode().len()].copy_from_slice(&h.encode());
    fs::write(&victim.path, &bytes).unwrap();
    assert_verify_fails_at(dir.path(), &victim.path, 0);

    let (_ledger, report) = common::open(dir.path());
    let d = &report.damage[0];
    assert_eq!(
        (d.kind, d.path.as_path()),
        (DamageKind::ChainMismatch, victim.path.as_path())
    );
    assert!(d.quarantined_to.is_some());
}

#[test]
fn a_segment_from_an_unknown_format_version_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    common::build(dir.path(), 20);
    let last = dumps(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&last.path).unwrap();
    bytes[8] = 2;
    fs::write(&last.path, &bytes).unwrap();
    let err = Ledger::open(dir.path(), common::config()).unwrap_err();
    assert!(
        matches!(err, LedgerError::UnsupportedVersion { version: 2, .. }),
        "{err}"
    );
    assert_eq!(fs::read(&last.path).unwrap(), bytes);
}

#[test]
fn a_half_created_last_segment_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let events = common::build(dir.path(), 30);
    let header = SegmentHeader::decode(&fs::read(&dumps(dir.path())[0].path).unwrap()).unwrap();
    let torn = dir.path().join(segment_file_name(30));
    fs::write(&torn, &header.encode()[..40]).unwrap();
    let (ledger, report) = common::open(dir.path());
    assert_eq!(report.truncated_bytes, 40);
    assert!(report.damage.is_empty());
    assert_eq!(ledger.events(0, 100).unwrap(), events);
    assert_eq!(
        ledger
            .append(common::bodies(1, 2).remove(0))
            .wait()
            .unwrap(),
        30
    );
}

#[test]
fn when_every_segment_is_quarantined_a_new_epoch_starts_after_the_highest_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config();
    c.segment_bytes = 1 << 20;
    let (ledger, _) = Ledger::open(dir.path(), c.clone()).unwrap();
    common::append_all(&ledger, common::bodies(50, 8));
    ledger.close().unwrap();
    drop(ledger);
    let only = dumps(dir.path()).pop().unwrap();
    let frame = only
        .frames
        .iter()
        .find(|f| f.kind == FrameKind::Event)
        .unwrap();
    flip_bit(&only.path, frame.offset + 20);

    let (ledger, report) = Ledger::open(dir.path(), c.clone()).unwrap();
    assert_eq!(report.quarantined.len(), 1);
    assert!(report.new_epoch);
    assert_eq!((report.epoch, report.next_seq, report.events), (1, 50, 0));
    assert!(ledger.events(0, 100).unwrap().is_empty());
    assert!(
        ledger.counters().iter().next().is_none(),
        "nothing from the quarantined segment is counted"
    );
    assert_eq!(
        ledger
            .append(common::bodies(1, 1).remove(0))
            .wait()
            .unwrap(),
        50
    );
    ledger.close().unwrap();
    drop(ledger);
    // What remains verifies on its own; the quarantined file is listed.
    let v = verify(dir.path(), &common::key().public_key()).unwrap();
    assert_eq!((v.events, v.epoch, v.quarantined.len()), (1, 1, 1));
    assert_eq!(v.last_checkpoint.unwrap().origin, "test-box-1/epoch-1");
}
