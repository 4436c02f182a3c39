//! The collector's stores, SQLite and PostgreSQL, held to the same contract by the same tests:
//! exactly-once storage under racing collectors, nothing written on a conflict or a duplicate,
//! and report totals equal to what `edgelora_ledger::Counters` derives from the same events.
//!
//! SQLite always runs. PostgreSQL runs when `EDGELORA_TEST_PG` holds a server URL (e.g. from
//! `scripts/pg.sh`); each test creates a database of its own there and drops it afterwards.
//! `EDGELORA_REQUIRE_PG=1` turns a missing URL into a failure instead of a loud skip.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Once};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use edgelora_fleet::collector::postgres::PgStore;
use edgelora_fleet::collector::report::{open_store, render_json, render_table};
use edgelora_fleet::collector::sqlite::SqliteStore;
use edgelora_fleet::collector::store::{
    Commit, CommitOutcome, ContributorRow, DeviceLog, Gap, KindRow, Report, Store, StoredEvent,
    Totals,
};
use edgelora_ledger::bench::Mix;
use edgelora_ledger::merkle::{self, CompactRange};
use edgelora_ledger::{Counters, Event, EventBody, Outcome, credits};

// ---- Backends ----

/// Where one test's data lives: a fresh SQLite file, or a fresh PostgreSQL database.
enum Backend {
    Sqlite(tempfile::TempDir),
    Pg(PgDatabase),
}

impl Backend {
    /// A new connection to the backend's data, as a separate collector process would open.
    fn open(&self) -> Box<dyn Store> {
        match self {
            Backend::Sqlite(dir) => Box::new(
                SqliteStore::open(&dir.path().join("collector.db")).expect("open sqlite store"),
            ),
            Backend::Pg(db) => Box::new(PgStore::connect(&db.url).expect("connect to postgres")),
        }
    }
}

/// SQLite, and PostgreSQL when configured.
fn backends() -> Vec<Backend> {
    let mut all = vec![Backend::Sqlite(tempfile::tempdir().expect("tempdir"))];
    if let Some(admin) = pg_admin_url() {
        all.push(Backend::Pg(PgDatabase::create(&admin)));
    }
    all
}

/// Runs `test` once per backend, naming the backend if it panics.
fn on_each_backend(test: impl Fn(&Backend, &dyn Store)) {
    for backend in backends() {
        let store = backend.open();
        eprintln!("backend: {}", store.describe());
        test(&backend, &*store);
    }
}

fn pg_admin_url() -> Option<String> {
    static SKIP_NOTICE: Once = Once::new();
    match std::env::var("EDGELORA_TEST_PG") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("EDGELORA_REQUIRE_PG").as_deref() != Ok("1"),
                "EDGELORA_REQUIRE_PG=1 but EDGELORA_TEST_PG is not set (scripts/pg.sh prints a URL)"
            );
            SKIP_NOTICE.call_once(|| {
                // Straight to stderr: libtest captures eprintln! of passing tests.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!! PostgreSQL tests SKIPPED: set EDGELORA_TEST_PG to a server URL \
                     (scripts/pg.sh starts one) to run the collector store tests on PostgreSQL \
                     too !!!\n"
                );
            });
            None
        }
    }
}

/// A uniquely named database on the test server, dropped when the test ends.
struct PgDatabase {
    admin: String,
    name: String,
    url: String,
}

impl PgDatabase {
    fn create(admin: &str) -> PgDatabase {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let name = format!(
            "edgelora_test_{}_{}_{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut client =
            postgres::Client::connect(admin, postgres::NoTls).expect("connect to EDGELORA_TEST_PG");
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create a test database");
        PgDatabase {
            admin: admin.to_string(),
            url: with_dbname(admin, &name),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// `url` with its database (the path) replaced by `db`; query parameters kept.
fn with_dbname(url: &str, db: &str) -> String {
    let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let end = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    format!("{}/{db}{query}", &base[..end])
}

// ---- Devices and their events ----

/// `n` event bodies, deterministic in `seed`.
fn event_bodies(seed: u64, n: usize) -> Vec<EventBody> {
    let mut mix = Mix::new(seed);
    (0..n).map(|_| mix.next_body()).collect()
}

fn stored_event(seq: u64, epoch: u32, body: &EventBody) -> StoredEvent {
    let event = Event {
        seq,
        body: body.clone(),
    };
    StoredEvent {
        seq,
        epoch,
        leaf_hash: merkle::leaf_hash_of_event(&event),
        body: postcard::to_allocvec(body).expect("encode body"),
        time_ms: body.time_ms,
        prompt_tokens: body.prompt_tokens,
        completion_tokens: body.completion_tokens,
        outcome: match body.outcome {
            Outcome::Stop => 0,
            Outcome::Length => 1,
            Outcome::Cancelled => 2,
            Outcome::Error => 3,
        },
        credits: credits(body)
            .into_iter()
            .map(|(c, k)| (c.to_string(), k))
            .collect(),
    }
}

/// The commit a collector builds after verifying `events` against `before` (the stored state
/// it read; `None` for a new device).
fn next_commit(device: &str, before: Option<&DeviceLog>, events: &[StoredEvent]) -> Commit {
    let (expected, mut tree, epoch, first, next) = match before {
        None => (None, CompactRange::new(), 0, 0, 0),
        Some(s) => (
            Some(s.next_seq),
            CompactRange::from_parts(s.tree_size, s.tree_nodes.clone()).expect("stored tree"),
            s.epoch,
            s.epoch_first_seq,
            s.next_seq,
        ),
    };
    for e in events {
        tree.push(e.leaf_hash);
    }
    Commit {
        expected_next_seq: expected,
        new_state: DeviceLog {
            device: device.to_string(),
            epoch,
            epoch_first_seq: first,
            next_seq: events.last().map_or(next, |e| e.seq + 1),
            tree_size: tree.size(),
            tree_nodes: tree.nodes().to_vec(),
            checkpoint: None,
            suspect: None,
        },
        events: events.to_vec(),
        gap: None,
        checkpoint: None,
    }
}

/// Events `0..n` of `device` (epoch 0), with their bodies.
fn device_events(seed: u64, n: usize) -> (Vec<EventBody>, Vec<StoredEvent>) {
    let b = event_bodies(seed, n);
    let events = b
        .iter()
        .enumerate()
        .map(|(i, body)| stored_event(i as u64, 0, body))
        .collect();
    (b, events)
}

/// Stores `events` from the device's current position on, `batch` at a time.
fn upload(store: &dyn Store, device: &str, events: &[StoredEvent], batch: usize) {
    for chunk in events.chunks(batch) {
        let before = store.device_log(device).expect("device_log");
        let commit = next_commit(device, before.as_ref(), chunk);
        assert_eq!(
            store.commit(&commit).expect("commit"),
            CommitOutcome::Stored(chunk.len() as u64)
        );
    }
}

// ---- Expected totals, computed in Rust with the ledger's own counters ----

struct Expected {
    contributors: Vec<ContributorRow>,
    kinds: Vec<KindRow>,
}

fn expected<'a>(all: impl IntoIterator<Item = &'a EventBody>) -> Expected {
    let mut counters = Counters::new();
    for body in all {
        counters.apply(body);
    }
    let mut kinds: BTreeMap<&str, Totals> = BTreeMap::new();
    let mut contributors = Vec::new();
    for (contributor, kind, c) in counters.iter() {
        let totals = Totals {
            requests: c.requests,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
        };
        let k = kinds.entry(kind.name()).or_default();
        k.requests += c.requests;
        k.prompt_tokens += c.prompt_tokens;
        k.completion_tokens += c.completion_tokens;
        contributors.push(ContributorRow {
            contributor: contributor.to_string(),
            kind: kind.name().to_string(),
            totals,
        });
    }
    contributors.sort_by(|a, b| (&a.contributor, &a.kind).cmp(&(&b.contributor, &b.kind)));
    Expected {
        contributors,
        kinds: kinds
            .into_iter()
            .map(|(kind, totals)| KindRow {
                kind: kind.to_string(),
                totals,
            })
            .collect(),
    }
}

fn token_sums(bodies: &[EventBody]) -> (u64, u64) {
    bodies.iter().fold((0, 0), |(p, c), b| {
        (
            p + u64::from(b.prompt_tokens),
            c + u64::from(b.completion_tokens),
        )
    })
}

fn assert_report_matches(report: &Report, bodies: &[&[EventBody]]) {
    let want = expected(bodies.iter().flat_map(|b| b.iter()));
    assert_eq!(report.contributors, want.contributors, "per contributor");
    assert_eq!(report.kinds, want.kinds, "per kind");
}

// ---- The contract ----

#[test]
fn commit_then_read_back_state_and_leaf_hashes() {
    on_each_backend(|_, store| {
        let (_, events) = device_events(1, 25);
        assert_eq!(store.device_log("box-1").unwrap(), None);
        let first = next_commit("box-1", None, &events[..10]);
        assert_eq!(store.commit(&first).unwrap(), CommitOutcome::Stored(10));
        assert_eq!(
            store.device_log("box-1").unwrap().as_ref(),
            Some(&first.new_state)
        );

        let second = next_commit("box-1", Some(&first.new_state), &events[10..]);
        assert_eq!(store.commit(&second).unwrap(), CommitOutcome::Stored(15));
        let state = store.device_log("box-1").unwrap().expect("stored");
        assert_eq!(state, second.new_state);
        assert_eq!(state.next_seq, 25);
        assert_eq!(state.tree_nodes.len(), 25u64.count_ones() as usize);

        let all: Vec<(u64, merkle::Hash)> = events.iter().map(|e| (e.seq, e.leaf_hash)).collect();
        assert_eq!(store.leaf_hashes("box-1", 0, u64::MAX).unwrap(), all);
        assert_eq!(store.leaf_hashes("box-1", 3, 7).unwrap(), all[3..7]);
        assert!(store.leaf_hashes("box-1", 25, 40).unwrap().is_empty());
        assert!(store.leaf_hashes("other", 0, 40).unwrap().is_empty());
        assert_eq!(store.event_count("box-1").unwrap(), (25, 25));
        assert_eq!(store.event_count("other").unwrap(), (0, 0));
    });
}

#[test]
fn stale_expected_next_seq_conflicts_and_writes_nothing() {
    on_each_backend(|_, store| {
        let (bodies, events) = device_events(2, 30);
        upload(store, "box-2", &events[..10], 10);
        let before = store.device_log("box-2").unwrap().expect("stored");
        let report_before = store.report(None).unwrap();

        // A collector that read the state before the device existed.
        let stale_new = next_commit("box-2", None, &events[..12]);
        assert_eq!(store.commit(&stale_new).unwrap(), CommitOutcome::Conflict);
        // One that read it at seq 5 and verified 5..20.
        let mut at_5 = before.clone();
        at_5.next_seq = 5;
        let stale = next_commit("box-2", Some(&at_5), &events[5..20]);
        assert_eq!(store.commit(&stale).unwrap(), CommitOutcome::Conflict);

        assert_eq!(store.device_log("box-2").unwrap(), Some(before.clone()));
        assert_eq!(store.event_count("box-2").unwrap(), (10, 10));
        assert_eq!(store.report(None).unwrap(), report_before);
        assert_report_matches(&report_before, &[&bodies[..10]]);

        // The right position still works afterwards.
        let next = next_commit("box-2", Some(&before), &events[10..]);
        assert_eq!(store.commit(&next).unwrap(), CommitOutcome::Stored(20));
        assert_eq!(store.event_count("box-2").unwrap(), (30, 30));
    });
}

#[test]
fn a_duplicate_event_fails_the_commit_and_changes_no_total() {
    on_each_backend(|_, store| {
        let (bodies, events) = device_events(3, 20);
        upload(store, "box-3", &events[..10], 10);
        let before = store.device_log("box-3").unwrap().expect("stored");
        let report_before = store.report(None).unwrap();

        // A (buggy) upload at the right position that repeats event 9 before 10..15.
        let mut dup = next_commit("box-3", Some(&before), &events[10..15]);
        dup.events.insert(0, events[9].clone());
        let outcome = store.commit(&dup);
        assert!(
            !matches!(outcome, Ok(CommitOutcome::Stored(_))),
            "a second copy of event 9 was accepted: {outcome:?}"
        );

        assert_eq!(store.device_log("box-3").unwrap(), Some(before));
        assert_eq!(store.event_count("box-3").unwrap(), (10, 10));
        let after = store.report(None).unwrap();
        assert_eq!(after, report_before);
        assert_report_matches(&after, &[&bodies[..10]]);
    });
}

#[test]
fn report_totals_equal_the_ledger_counters_over_the_same_events() {
    on_each_backend(|_, store| {
        let devices = [
            ("box-a", 11u64, 1500usize),
            ("box-b", 12, 700),
            ("box-c", 13, 1),
        ];
        let mut all_bodies = Vec::new();
        for (name, seed, n) in devices {
            let (bodies, events) = device_events(seed, n);
            upload(store, name, &events, 256);
            all_bodies.push(bodies);
        }
        let slices: Vec<&[EventBody]> = all_bodies.iter().map(|b| &b[..]).collect();
        let report = store.report(None).unwrap();
        assert_report_matches(&report, &slices);
        assert_eq!(report.devices.len(), 3);
        for ((name, _, n), (row, bodies)) in devices.iter().zip(report.devices.iter().zip(&slices))
        {
            assert_eq!(&row.device, name);
            assert_eq!(row.events, *n as u64);
            assert_eq!(row.next_seq, *n as u64);
            assert_eq!((row.lost, row.epoch, row.suspect.as_deref()), (0, 0, None));
            assert_eq!(
                (row.prompt_tokens, row.completion_tokens),
                token_sums(bodies)
            );
        }

        let one = store.report(Some("box-b")).unwrap();
        assert_report_matches(&one, &[slices[1]]);
        assert_eq!(one.devices, vec![report.devices[1].clone()]);
        assert_eq!(store.report(Some("nobody")).unwrap(), Report::default());
    });
}

#[test]
fn mark_suspect_keeps_the_data_and_the_first_reason() {
    on_each_backend(|_, store| {
        let (bodies, events) = device_events(4, 40);
        upload(store, "box-4", &events[..30], 15);
        store.mark_suspect("box-4", "root mismatch at 30").unwrap();
        store.mark_suspect("box-4", "a later reason").unwrap();

        let state = store.device_log("box-4").unwrap().expect("stored");
        assert_eq!(state.suspect.as_deref(), Some("root mismatch at 30"));
        assert_eq!(state.next_seq, 30);
        assert_eq!(store.event_count("box-4").unwrap(), (30, 30));
        let report = store.report(None).unwrap();
        assert_report_matches(&report, &[&bodies[..30]]);
        assert_eq!(
            report.devices[0].suspect.as_deref(),
            Some("root mismatch at 30")
        );
        // A suspect device's uploads are refused: its position no longer moves.
        let more = next_commit("box-4", Some(&state), &events[30..]);
        assert_eq!(store.commit(&more).unwrap(), CommitOutcome::Conflict);
        assert_eq!(store.event_count("box-4").unwrap(), (30, 30));

        // A device flagged before its first upload gets a row, and cannot be created over.
        store.mark_suspect("box-5", "bad certificate").unwrap();
        let fresh = store.device_log("box-5").unwrap().expect("row created");
        assert_eq!((fresh.next_seq, fresh.epoch, fresh.tree_size), (0, 0, 0));
        assert!(fresh.tree_nodes.is_empty());
        assert_eq!(fresh.suspect.as_deref(), Some("bad certificate"));
        let (_, others) = device_events(5, 3);
        let create = next_commit("box-5", None, &others);
        assert_eq!(store.commit(&create).unwrap(), CommitOutcome::Conflict);
        assert_eq!(store.event_count("box-5").unwrap(), (0, 0));
    });
}

#[test]
fn a_gap_is_counted_as_lost_events() {
    on_each_backend(|_, store| {
        let (bodies, events) = device_events(6, 10);
        upload(store, "box-6", &events, 10);
        let before = store.device_log("box-6").unwrap().expect("stored");

        // The device lost 10..15 locally and started epoch 1 at 15.
        let later = event_bodies(60, 5);
        let epoch1: Vec<StoredEvent> = later
            .iter()
            .enumerate()
            .map(|(i, b)| stored_event(15 + i as u64, 1, b))
            .collect();
        let mut tree = CompactRange::new();
        epoch1.iter().for_each(|e| tree.push(e.leaf_hash));
        let commit = Commit {
            expected_next_seq: Some(before.next_seq),
            new_state: DeviceLog {
                epoch: 1,
                epoch_first_seq: 15,
                next_seq: 20,
                tree_size: tree.size(),
                tree_nodes: tree.nodes().to_vec(),
                ..before.clone()
            },
            events: epoch1,
            gap: Some(Gap {
                from_seq: 10,
                to_seq: 15,
                epoch: 1,
            }),
            checkpoint: None,
        };
        assert_eq!(store.commit(&commit).unwrap(), CommitOutcome::Stored(5));

        let report = store.report(Some("box-6")).unwrap();
        let row = &report.devices[0];
        assert_eq!(
            (row.events, row.next_seq, row.epoch, row.lost),
            (15, 20, 1, 5)
        );
        assert_report_matches(&report, &[&bodies, &later]);
        assert_eq!(store.device_log("box-6").unwrap(), Some(commit.new_state));
    });
}

#[test]
fn a_repeated_checkpoint_is_accepted_and_a_different_root_refused() {
    on_each_backend(|_, store| {
        let (_, events) = device_events(7, 30);
        let mut first = next_commit("box-7", None, &events[..10]);
        let root = CompactRange::from_parts(
            first.new_state.tree_size,
            first.new_state.tree_nodes.clone(),
        )
        .expect("tree")
        .root();
        first.checkpoint = Some((0, 10, root, "note for 10".to_string()));
        first.new_state.checkpoint = Some("note for 10".to_string());
        assert_eq!(store.commit(&first).unwrap(), CommitOutcome::Stored(10));

        // The device re-sends the same checkpoint with its next events.
        let mut again = next_commit("box-7", Some(&first.new_state), &events[10..20]);
        again.checkpoint = first.checkpoint.clone();
        assert_eq!(store.commit(&again).unwrap(), CommitOutcome::Stored(10));
        let state = store.device_log("box-7").unwrap().expect("stored");

        // A second root for size 10 is a fork: refused, nothing written.
        let mut fork = next_commit("box-7", Some(&state), &events[20..]);
        fork.checkpoint = Some((0, 10, [9; 32], "forged".to_string()));
        assert!(store.commit(&fork).is_err());
        assert_eq!(store.device_log("box-7").unwrap(), Some(state));
        assert_eq!(store.event_count("box-7").unwrap(), (20, 20));
    });
}

// ---- Several collectors at once ----

#[test]
fn two_collectors_racing_for_the_same_batch_store_it_once() {
    on_each_backend(|backend, first| {
        let second = backend.open();
        let stores = [first, &*second];
        let (bodies, events) = device_events(8, 20 * 16);
        for round in 0..20 {
            let before = stores[0].device_log("box-8").unwrap();
            assert_eq!(before.as_ref().map_or(0, |s| s.next_seq), round as u64 * 16);
            let commit = next_commit("box-8", before.as_ref(), &events[round * 16..][..16]);
            let barrier = Barrier::new(2);
            let outcomes: Vec<CommitOutcome> = std::thread::scope(|s| {
                let handles: Vec<_> = stores
                    .iter()
                    .map(|store| {
                        let (barrier, commit) = (&barrier, &commit);
                        s.spawn(move || {
                            barrier.wait();
                            store.commit(commit).expect("commit")
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let stored = outcomes
                .iter()
                .filter(|o| **o == CommitOutcome::Stored(16))
                .count();
            let conflicts = outcomes
                .iter()
                .filter(|o| **o == CommitOutcome::Conflict)
                .count();
            assert_eq!((stored, conflicts), (1, 1), "round {round}: {outcomes:?}");
        }
        assert_eq!(first.event_count("box-8").unwrap(), (320, 320));
        assert_report_matches(&second.report(None).unwrap(), &[&bodies]);
    });
}

#[test]
fn many_collectors_store_every_event_exactly_once() {
    on_each_backend(|backend, _| {
        const DEVICES: usize = 3;
        const EVENTS: usize = 600;
        let fleet: Vec<(String, Vec<EventBody>, Vec<StoredEvent>)> = (0..DEVICES)
            .map(|d| {
                let (b, e) = device_events(100 + d as u64, EVENTS);
                (format!("racer-{d}"), b, e)
            })
            .collect();
        let stores: Vec<Box<dyn Store>> = (0..4).map(|_| backend.open()).collect();
        let conflicts = AtomicU64::new(0);
        std::thread::scope(|s| {
            for (w, store) in stores.iter().enumerate() {
                let (fleet, conflicts) = (&fleet, &conflicts);
                s.spawn(move || {
                    // Every collector tries to store every device's whole log, in batches whose
                    // size differs per collector, re-reading the state after each conflict.
                    let batch = 7 + 13 * w;
                    for (name, _, events) in fleet {
                        loop {
                            let before = store.device_log(name).unwrap();
                            let from = before.as_ref().map_or(0, |s| s.next_seq) as usize;
                            if from >= events.len() {
                                break;
                            }
                            let to = (from + batch).min(events.len());
                            let commit = next_commit(name, before.as_ref(), &events[from..to]);
                            if store.commit(&commit).unwrap() == CommitOutcome::Conflict {
                                conflicts.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        eprintln!("conflicts: {}", conflicts.load(Ordering::Relaxed));
        for (name, _, _) in &fleet {
            assert_eq!(
                stores[0].event_count(name).unwrap(),
                (EVENTS as u64, EVENTS as u64)
            );
        }
        let slices: Vec<&[EventBody]> = fleet.iter().map(|(_, b, _)| &b[..]).collect();
        assert_report_matches(&stores[1].report(None).unwrap(), &slices);
    });
}

#[test]
fn collectors_starting_at_once_on_a_fresh_database_all_get_the_schema() {
    for backend in backends() {
        let barrier = Barrier::new(4);
        let stores: Vec<Box<dyn Store>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        backend.open()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (_, events) = device_events(14, 5);
        upload(&*stores[0], "box-s", &events, 5);
        assert_eq!(stores[3].event_count("box-s").unwrap(), (5, 5));
    }
}

/// Not a benchmark gate: prints how long 100k events take to store, and checks the totals.
#[test]
fn bulk_upload_of_100k_events_in_batches_of_4096() {
    let (bodies, events) = device_events(9, 100_000);
    on_each_backend(|_, store| {
        let start = Instant::now();
        upload(store, "bulk", &events, 4096);
        let stored = start.elapsed();
        let start = Instant::now();
        let report = store.report(None).unwrap();
        let reported = start.elapsed();
        let _ = writeln!(
            std::io::stderr(),
            "{}: 100000 events in batches of 4096 stored in {:.2?} ({:.0} events/s), report in {:.2?}",
            store.describe(),
            stored,
            100_000.0 / stored.as_secs_f64(),
            reported
        );
        assert_eq!(store.event_count("bulk").unwrap(), (100_000, 100_000));
        assert_report_matches(&report, &[&bodies]);
    });
}

// ---- Choosing a store and printing a report ----

#[test]
fn open_store_defaults_to_sqlite_in_the_fleet_dir_and_refuses_unknown_urls() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), None).unwrap();
    assert!(store.describe().starts_with("sqlite "));
    assert!(dir.path().join("collector.db").exists());

    let err = open_store(dir.path(), Some("mysql://root@db/fleet"))
        .err()
        .expect("mysql URL refused");
    assert!(err.to_string().contains("postgres://"), "{err}");

    if let Some(admin) = pg_admin_url() {
        let db = PgDatabase::create(&admin);
        let pg = open_store(dir.path(), Some(&db.url)).unwrap();
        assert!(pg.describe().starts_with("postgres "), "{}", pg.describe());
        assert!(!pg.describe().contains("password"));
    }
}

#[test]
fn postgres_store_opens_and_drops_inside_an_async_runtime() {
    let Some(admin) = pg_admin_url() else {
        return;
    };
    let db = PgDatabase::create(&admin);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // As the collector's async main does: open, hand to blocking threads, drop.
        let store = open_store(std::path::Path::new("."), Some(&db.url)).unwrap();
        let s = store.clone();
        let log = tokio::task::spawn_blocking(move || s.device_log("none").unwrap())
            .await
            .unwrap();
        assert_eq!(log, None);
        drop(store);
    });
}

#[test]
fn rendered_report_shows_suspects_lost_events_and_all_three_sections() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), None).unwrap();
    let (_, events) = device_events(10, 50);
    upload(&*store, "box-r", &events, 50);
    store.mark_suspect("box-r", "forked checkpoint").unwrap();
    let report = store.report(None).unwrap();

    let table = render_table(&report);
    for needle in [
        "Contributors",
        "Devices",
        "Kinds",
        "box-r",
        "SUSPECT: forked checkpoint",
        "adapter",
    ] {
        assert!(table.contains(needle), "{needle:?} missing from\n{table}");
    }
    let empty = render_table(&Report::default());
    assert!(empty.contains("(none)"), "{empty}");

    let json: serde_json::Value = serde_json::from_str(&render_json(&report)).unwrap();
    assert_eq!(json["devices"][0]["device"], "box-r");
    assert_eq!(json["devices"][0]["events"], 50);
    assert_eq!(json["devices"][0]["suspect"], "forked checkpoint");
    let contributors = json["contributors"].as_array().expect("contributors array");
    assert_eq!(contributors.len(), report.contributors.len());
    assert!(
        contributors[0]["requests"].is_u64(),
        "totals are flattened: {}",
        contributors[0]
    );
    assert_eq!(
        json["kinds"].as_array().map(Vec::len),
        Some(report.kinds.len())
    );
}
