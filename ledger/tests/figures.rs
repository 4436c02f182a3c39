//! Prints the ledger's figures (bytes per event, durable appends per second against the raw
//! fsync yardstick, reopen time). Asserts only that the measurements ran; speed is reported,
//! never tested. The bench harness calls the same `edgelora_ledger::bench` functions with larger
//! sizes (1,000,000 events for reopen).

use std::time::Duration;

use edgelora_ledger::bench;

#[test]
fn print_ledger_figures() {
    let dir = tempfile::tempdir().unwrap();

    let b = bench::bytes_per_event(&dir.path().join("size"), 100_000, 42).unwrap();
    println!(
        "bytes/event over {} mixed events: {:.1} on disk (event frames {:.1}, definitions {:.2}, \
         checkpoints {:.2}, snapshots {:.2}, headers {:.3})",
        b.events,
        b.per_event(),
        b.event_frame_avg(),
        b.define_bytes as f64 / b.events as f64,
        b.checkpoint_bytes as f64 / b.events as f64,
        b.snapshot_bytes as f64 / b.events as f64,
        b.header_bytes as f64 / b.events as f64,
    );
    assert_eq!(b.events, 100_000);
    assert!(b.total_bytes > b.event_frame_bytes);

    let raw = bench::raw_fsync_4k(dir.path(), 200).unwrap();
    println!(
        "raw 4 KiB write+fdatasync: {:?} ({:.0}/s)",
        raw,
        1.0 / raw.as_secs_f64()
    );
    for writers in [1usize, 16, 256] {
        let d = dir.path().join(format!("tp-{writers}"));
        let t = bench::durable_throughput(&d, writers, Duration::from_millis(700)).unwrap();
        println!(
            "durable appends, {:>3} writers: {:>8.0} events/s, {:>6.1} events per fsync; raw 4 KiB \
             write+fdatasync just before: {:?} ({:.0}/s) -> {:.1}x the raw fsync rate",
            writers,
            t.events_per_sec(),
            t.events_per_fsync(),
            t.raw_fsync,
            1.0 / t.raw_fsync.as_secs_f64(),
            t.vs_raw_fsync()
        );
        assert!(t.events > 0);
    }

    let r = bench::reopen(&dir.path().join("reopen"), 100_000).unwrap();
    println!(
        "reopen of {} events: {:?} after a clean close, {:?} with a full replay ({} events replayed); built in {:?}",
        r.events, r.after_close, r.full_replay, r.replayed_events, r.build
    );
    assert_eq!(r.replayed_events, r.events);
}

/// The bench-sized reopen: `cargo test --release -p edgelora-ledger --test figures -- --ignored`.
#[test]
#[ignore = "builds a 1,000,000-event log (about 70 MB, tens of seconds)"]
fn print_reopen_of_one_million_events() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench::reopen(dir.path(), 1_000_000).unwrap();
    println!(
        "reopen of {} events: {:?} after a clean close, {:?} with a full replay; built in {:?}",
        r.events, r.after_close, r.full_replay, r.build
    );
}
