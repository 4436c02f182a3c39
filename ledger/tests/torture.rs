//! Crash torture: SIGKILL a writing child process at random moments, reopen, check.

use std::time::Duration;

use edgelora_ledger::Durability;
use edgelora_ledger::torture::{self, TortureOptions};

fn child_args(test: &str) -> Vec<std::ffi::OsString> {
    [test, "--exact", "--nocapture", "--test-threads=1"]
        .iter()
        .map(Into::into)
        .collect()
}

#[test]
fn strict_appends_survive_200_sigkills_exactly_once() {
    torture::child_main_if_requested();
    let dir = tempfile::tempdir().unwrap();
    let opts = TortureOptions::new(
        200,
        child_args("strict_appends_survive_200_sigkills_exactly_once"),
    );
    let r = torture::run(dir.path(), &opts).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "torture (strict): {} kills, {} acknowledged, {} events in log, {} torn tails cut ({} bytes), \
         {} segments, slowest reopen {:?}, total {:?} (children {:?}, reopen+checks {:?}, verify {:?})",
        r.kills,
        r.acknowledged,
        r.events,
        r.truncations,
        r.truncated_bytes,
        r.segments,
        r.slowest_reopen,
        r.elapsed,
        r.in_children,
        r.in_checks,
        r.in_verify
    );
    assert_eq!(r.kills, 200);
    assert!(
        r.acknowledged > 200,
        "the child must get work done between kills"
    );
    assert!(r.events >= r.acknowledged);
}

#[test]
fn relaxed_appends_survive_process_kills_too() {
    torture::child_main_if_requested();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = TortureOptions::new(40, child_args("relaxed_appends_survive_process_kills_too"));
    opts.durability = Durability::Relaxed {
        interval: Duration::from_millis(5),
    };
    opts.seed = 99;
    let r = torture::run(dir.path(), &opts).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "torture (relaxed): {} kills, {} acknowledged, {} events, {} torn tails cut",
        r.kills, r.acknowledged, r.events, r.truncations
    );
    assert!(r.acknowledged > 40);
}
