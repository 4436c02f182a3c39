//! Appending, reading back, counters, durability modes, and the handle's contract.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use edgelora_ledger::{
    Attribution, ContributionKind, Counter, Durability, Event, EventBody, Ledger, LedgerConfig,
    LedgerError, LedgerKey, Outcome, PUBLIC_KEY_FILE, verify,
};

/// Counters by the documented rule, computed independently of the crate.
fn expected_counters(events: &[Event]) -> BTreeMap<(String, ContributionKind), Counter> {
    let mut m: BTreeMap<(String, ContributionKind), Counter> = BTreeMap::new();
    for e in events {
        let b = &e.body;
        let mut pairs = vec![(b.base_model.contributor.clone(), ContributionKind::Base)];
        pairs.extend(
            b.adapter
                .iter()
                .map(|a| (a.contributor.clone(), ContributionKind::Adapter)),
        );
        pairs.extend(
            b.prompt_template
                .iter()
                .map(|a| (a.contributor.clone(), ContributionKind::Prompt)),
        );
        pairs.extend(
            b.data_chunks
                .iter()
                .map(|c| (c.contributor.clone(), ContributionKind::Data)),
        );
        pairs.extend(
            b.tools
                .iter()
                .map(|t| (t.contributor.clone(), ContributionKind::Tool)),
        );
        pairs.sort();
        pairs.dedup();
        for p in pairs {
            let c = m.entry(p).or_default();
            c.requests += 1;
            c.prompt_tokens += b.prompt_tokens as u64;
            c.completion_tokens += b.completion_tokens as u64;
        }
    }
    m
}

fn counters_map(c: &edgelora_ledger::Counters) -> BTreeMap<(String, ContributionKind), Counter> {
    c.iter().map(|(n, k, v)| ((n.to_string(), k), v)).collect()
}

#[test]
fn appended_events_read_back_in_order_with_consecutive_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, report) = common::open(dir.path());
    assert_eq!((report.events, report.next_seq), (0, 0));
    let events = common::append_all(&ledger, common::bodies(300, 5));
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (0..300).collect::<Vec<_>>()
    );
    assert_eq!(ledger.events(0, 1000).unwrap(), events);
    assert_eq!(ledger.events(123, 7).unwrap(), events[123..130].to_vec());
    assert_eq!(ledger.events(299, 10).unwrap(), events[299..].to_vec());
    assert!(ledger.events(300, 10).unwrap().is_empty());
    assert!(ledger.stats().segments_created > 2, "small segments rotate");
    ledger.close().unwrap();
    assert!(matches!(
        ledger.append(common::bodies(1, 1).remove(0)).wait(),
        Err(LedgerError::Closed)
    ));
}

#[test]
fn counters_equal_the_sums_over_appended_events_before_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _) = common::open(dir.path());
    let mut events = common::append_all(&ledger, common::bodies(500, 11));
    assert_eq!(counters_map(&ledger.counters()), expected_counters(&events));
    ledger.close().unwrap();
    drop(ledger);

    let (ledger, report) = common::open(dir.path());
    assert_eq!(
        report.replayed_events, 0,
        "a clean close leaves a snapshot at the end"
    );
    assert_eq!(counters_map(&ledger.counters()), expected_counters(&events));
    events.extend(common::append_all(&ledger, common::bodies(77, 12)));
    assert_eq!(counters_map(&ledger.counters()), expected_counters(&events));
    // Dropping the last handle closes the ledger too.
    drop(ledger);
    let (ledger, _) = common::open(dir.path());
    assert_eq!(counters_map(&ledger.counters()), expected_counters(&events));
    let report = verify(dir.path(), ledger.public_key()).unwrap();
    assert_eq!(counters_map(&report.counters), expected_counters(&events));
}

#[test]
fn one_event_credits_each_contributor_once_per_kind() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _) = common::open(dir.path());
    let mut body = common::bodies(1, 1).remove(0);
    body.base_model = Attribution::new("base", "meta");
    body.adapter = Some(Attribution::new("a", "alice"));
    body.prompt_template = None;
    body.tools = vec![];
    body.data_chunks = (0..3)
        .map(|i| edgelora_ledger::DataChunk {
            datanet: "net".into(),
            chunk: format!("c{i}"),
            contributor: "alice".into(),
            score: 0.5,
            client_reported: false,
        })
        .collect();
    body.prompt_tokens = 10;
    body.completion_tokens = 3;
    ledger.append(body).wait().unwrap();
    let c = ledger.counters();
    let one = Counter {
        requests: 1,
        prompt_tokens: 10,
        completion_tokens: 3,
    };
    assert_eq!(c.get("alice", ContributionKind::Adapter), one);
    assert_eq!(c.get("alice", ContributionKind::Data), one);
    assert_eq!(c.get("meta", ContributionKind::Base), one);
    assert_eq!(c.get("alice", ContributionKind::Tool), Counter::default());
}

#[test]
fn many_concurrent_appenders_share_fsyncs_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _) = common::open(dir.path());
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                common::bodies(40, 100 + t)
                    .into_iter()
                    .map(|b| ledger.append(b).wait().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (0..1280).collect::<Vec<_>>());
    let stats = ledger.stats();
    assert!(stats.fsyncs < 1280, "group commit shared fsyncs: {stats:?}");
    ledger.close().unwrap();
    verify(dir.path(), &common::key().public_key()).unwrap();
}

#[test]
fn relaxed_durability_acknowledges_and_still_recovers_everything_after_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config();
    c.durability = Durability::Relaxed {
        interval: Duration::from_millis(20),
    };
    let (ledger, _) = Ledger::open(dir.path(), c.clone()).unwrap();
    let events = common::append_all(&ledger, common::bodies(200, 2));
    // The timer fsyncs (within 20 ms; waited for generously: a loaded machine is slow).
    wait_until("the timer fsyncs", || ledger.stats().fsyncs >= 1);
    ledger.close().unwrap();
    drop(ledger);
    let (ledger, _) = Ledger::open(dir.path(), c).unwrap();
    assert_eq!(ledger.events(0, 1000).unwrap(), events);
}

#[test]
fn checkpoints_are_written_every_n_events_and_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config();
    c.checkpoint_every_events = 10;
    c.checkpoint_interval = Duration::from_secs(3600);
    let (ledger, _) = Ledger::open(dir.path(), c.clone()).unwrap();
    for b in common::bodies(25, 3) {
        ledger.append(b).wait().unwrap();
    }
    let cp = ledger.latest_checkpoint().unwrap();
    assert_eq!(cp.tree_size, 20);
    assert_eq!(cp.origin, common::DEVICE);
    let last = ledger.close().unwrap().unwrap();
    assert_eq!(last.tree_size, 25);
    last.verify(&common::key().public_key()).unwrap();
    let report = verify(dir.path(), &common::key().public_key()).unwrap();
    assert_eq!(report.checkpoints, 3);
    assert_eq!(report.unsigned_tail, 0);
}

#[test]
fn checkpoints_are_written_after_the_interval_without_more_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config();
    c.checkpoint_every_events = 1_000_000;
    c.checkpoint_interval = Duration::from_millis(30);
    let (ledger, _) = Ledger::open(dir.path(), c).unwrap();
    ledger
        .append(common::bodies(1, 3).remove(0))
        .wait()
        .unwrap();
    wait_until("a checkpoint after the interval", || {
        ledger.latest_checkpoint().map(|c| c.tree_size) == Some(1)
    });
}

#[test]
fn invalid_events_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _) = common::open(dir.path());
    let mut b = common::bodies(1, 3).remove(0);
    b.base_model.contributor.clear();
    assert!(matches!(
        ledger.append(b).wait(),
        Err(LedgerError::InvalidEvent(_))
    ));
    let mut b = common::bodies(1, 3).remove(0);
    b.data_chunks.push(edgelora_ledger::DataChunk {
        datanet: "n".into(),
        chunk: "c".into(),
        contributor: "x".into(),
        score: f32::NAN,
        client_reported: false,
    });
    assert!(matches!(
        ledger.append(b).wait(),
        Err(LedgerError::InvalidEvent(_))
    ));
    assert_eq!(ledger.next_seq(), 0);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused_while_the_first_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _) = common::open(dir.path());
    assert!(matches!(
        Ledger::open(dir.path(), common::config()),
        Err(LedgerError::Locked(_))
    ));
    ledger.close().unwrap();
    drop(ledger);
    Ledger::open(dir.path(), common::config()).unwrap();
}

#[test]
fn opening_with_a_different_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::build(dir.path(), 3);
    assert!(
        std::fs::read_to_string(dir.path().join(PUBLIC_KEY_FILE))
            .unwrap()
            .starts_with("test-box-1+")
    );
    let other = LedgerConfig::new(
        common::DEVICE,
        LedgerKey::from_seed(common::DEVICE, [9; 32]).unwrap(),
    );
    assert!(matches!(
        Ledger::open(dir.path(), other),
        Err(LedgerError::KeyMismatch { .. })
    ));
}

struct Flag(std::sync::atomic::AtomicBool);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_ticket_can_be_awaited_as_a_future() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _) = common::open(dir.path());
    let flag = Arc::new(Flag(false.into()));
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut ticket = pin!(ledger.append(common::bodies(1, 3).remove(0)));
    let seq = loop {
        match ticket.as_mut().poll(&mut cx) {
            Poll::Ready(r) => break r.unwrap(),
            Poll::Pending => {
                // The writer wakes us once the event is durable.
                for _ in 0..1000 {
                    if flag.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    };
    assert_eq!(seq, 0);
}

#[test]
fn a_full_mix_event_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _) = common::open(dir.path());
    let body = EventBody {
        time_ms: 5,
        request_digest: [0xee; 32],
        base_model: Attribution::new("b", "B"),
        adapter: None,
        prompt_template: Some(Attribution::new("t", "T")),
        data_chunks: vec![edgelora_ledger::DataChunk {
            datanet: "n".into(),
            chunk: "ü-chunk".into(),
            contributor: "D".into(),
            score: -0.25,
            client_reported: true,
        }],
        tools: vec![edgelora_ledger::ToolUse {
            id: "calc".into(),
            contributor: "V".into(),
            client_reported: false,
        }],
        prompt_tokens: u32::MAX,
        completion_tokens: 0,
        latency_ms: 1,
        outcome: Outcome::Cancelled,
    };
    // Time going backwards is stored as a negative delta.
    let mut earlier = body.clone();
    earlier.time_ms = 1;
    let events = common::append_all(&ledger, vec![body, earlier]);
    ledger.close().unwrap();
    drop(ledger);
    let (ledger, _) = common::open(dir.path());
    assert_eq!(ledger.events(0, 10).unwrap(), events);
}

#[test]
fn readers_see_a_consistent_prefix_while_appends_run() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _) = common::open(dir.path());
    let writer = {
        let ledger = ledger.clone();
        std::thread::spawn(move || common::append_all(&ledger, common::bodies(1500, 21)))
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let got = ledger.events(0, usize::MAX).unwrap();
        assert!(got.iter().enumerate().all(|(i, e)| e.seq == i as u64));
        reads += 1;
    }
    let events = writer.join().unwrap();
    assert!(reads > 0);
    assert_eq!(ledger.events(0, usize::MAX).unwrap(), events);
}

#[test]
fn proofs_are_refused_for_events_no_checkpoint_covers_yet() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config();
    c.checkpoint_every_events = 1000;
    c.checkpoint_interval = Duration::from_secs(3600);
    let (ledger, _) = Ledger::open(dir.path(), c).unwrap();
    let seq = ledger
        .append(common::bodies(1, 1).remove(0))
        .wait()
        .unwrap();
    assert!(matches!(
        ledger.inclusion_proof(seq),
        Err(LedgerError::NotCheckpointed(0))
    ));
    ledger.checkpoint_now().unwrap();
    ledger
        .inclusion_proof(seq)
        .unwrap()
        .verify(ledger.public_key())
        .unwrap();
    assert!(matches!(
        ledger.inclusion_proof(5),
        Err(LedgerError::NotCheckpointed(5))
    ));
    assert!(ledger.consistency_proof(2, 1).is_err());
}

/// Polls `done` until it holds, for at most 10 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
