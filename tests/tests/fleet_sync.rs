//! Fleet sync end to end: a real fleet (CA, enrolled device), a real collector over mTLS, the
//! device's sync client, and a fault-injecting proxy between them (cuts after random byte
//! counts, stalls, refused connections, a collector restart midway). The collector's totals
//! must equal the device's counters exactly, with no event stored twice — on SQLite always,
//! and on a real PostgreSQL shared by two collector processes when the test command started
//! one (`EDGELORA_TEST_PG`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgelora_fleet::collector::server::{Collector, CollectorOptions};
use edgelora_fleet::collector::store::Store;
use edgelora_fleet::fleet::{Fleet, InitOptions, RevocationReason};
use edgelora_ledger::bench::Mix;
use edgelora_ledger::sync::bundle::DeviceBundle;
use edgelora_ledger::sync::client::{Position, SyncClient, SyncOptions, build_upload};
use edgelora_ledger::sync::proto::{
    ClientMsg, Hello, MAGIC, RefuseCode, ServerMsg, Upload, VERSION, frame,
};
use edgelora_ledger::{Ledger, LedgerConfig, LedgerHandle, LedgerKey};
use edgelora_tests::fault_proxy::{FaultPlan, FaultProxy};

struct Setup {
    _tmp: tempfile::TempDir,
    fleet_dir: PathBuf,
    bundle: DeviceBundle,
    ledger: LedgerHandle,
}

/// A fleet in `root/fleet` with `device` enrolled; returns its bundle directory.
fn enrolled_fleet(root: &Path, device: &str) -> PathBuf {
    let fleet = Fleet::init(
        &root.join("fleet"),
        &InitOptions {
            name: "test".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let bundle_dir = root.join("bundle");
    fleet.enroll(device, &bundle_dir, 30).unwrap();
    bundle_dir
}

fn setup(device: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let fleet_dir = tmp.path().join("fleet");
    let bundle_dir = enrolled_fleet(tmp.path(), device);
    let bundle = DeviceBundle::load(&bundle_dir).unwrap();
    let key = LedgerKey::load_or_create(&bundle.ledger_key_path().unwrap(), device).unwrap();
    let (ledger, _) =
        Ledger::open(tmp.path().join("ledger"), LedgerConfig::new(device, key)).unwrap();
    Setup {
        _tmp: tmp,
        fleet_dir,
        bundle,
        ledger,
    }
}

fn collector_opts(fleet_dir: &Path, db: Option<&str>) -> CollectorOptions {
    let mut o = CollectorOptions::new(fleet_dir, "127.0.0.1:0");
    o.db = db.map(str::to_string);
    o.crl_poll = Duration::from_millis(100);
    o
}

fn sync_opts(s: &Setup, addr: std::net::SocketAddr) -> SyncOptions {
    let mut o = SyncOptions::new(
        s.bundle.device_id.clone(),
        vec![addr.to_string()],
        s.bundle.server_name.clone(),
        s.bundle.client_config().unwrap(),
    );
    o.batch_events = 300;
    o.poll_interval = Duration::from_millis(20);
    o.backoff_min = Duration::from_millis(5);
    o.backoff_max = Duration::from_millis(150);
    o.timeout = Duration::from_secs(5);
    o
}

fn append(ledger: &LedgerHandle, mix: &mut Mix, n: usize) {
    let tickets: Vec<_> = (0..n).map(|_| ledger.append(mix.next_body())).collect();
    for t in tickets {
        t.wait().unwrap();
    }
}

async fn wait_acked(client: &SyncClient, want: u64, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let st = client.status();
        if st.acked.is_some_and(|p| p.next_seq >= want) {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "sync stuck at {:?} of {want}: {st:?}",
            st.acked
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// (contributor, kind, requests, prompt tokens, completion tokens) of a collector report.
type Row = (String, String, u64, u64, u64);

fn collector_rows(report: &edgelora_fleet::collector::store::Report) -> Vec<Row> {
    report
        .contributors
        .iter()
        .map(|r| {
            (
                r.contributor.clone(),
                r.kind.clone(),
                r.totals.requests,
                r.totals.prompt_tokens,
                r.totals.completion_tokens,
            )
        })
        .collect()
}

/// The collector's totals for `device` equal the device's own counters, row for row, and every
/// event is stored exactly once.
fn assert_exact(store: &dyn Store, device: &str, ledger: &LedgerHandle, events: u64) {
    let (count, distinct) = store.event_count(device).unwrap();
    assert_eq!(
        (count, distinct),
        (events, events),
        "events stored (total, distinct)"
    );
    let report = store.report(Some(device)).unwrap();
    let mut theirs = collector_rows(&report);
    let mut ours: Vec<Row> = ledger
        .counters()
        .iter()
        .map(|(c, k, v)| {
            (
                c.to_string(),
                k.name().to_string(),
                v.requests,
                v.prompt_tokens,
                v.completion_tokens,
            )
        })
        .collect();
    theirs.sort();
    ours.sort();
    assert!(!ours.is_empty());
    assert_eq!(theirs, ours, "collector totals vs device counters");
    let dev = report.devices.iter().find(|d| d.device == device).unwrap();
    assert_eq!(dev.events, events);
    assert_eq!(dev.suspect, None);
}

/// 20,000 events through a flaky uplink, with a collector restart midway and a deliberate
/// resend of an acknowledged batch; `dbs` collectors (sharing one store) take turns.
async fn flaky_uplink(device: &str, db: Option<&str>, collectors: usize) {
    const EVENTS: u64 = 20_000;
    let s = setup(device);
    let mut cs = Vec::new();
    for _ in 0..collectors {
        cs.push(
            Collector::start(collector_opts(&s.fleet_dir, db))
                .await
                .unwrap(),
        );
    }
    let plan = FaultPlan {
        seed: 0x5eed,
        cut_after_bytes: Some(1_000..120_000),
        cut_after_bytes_down: Some(100..1_500),
        stall_prob: 0.05,
        stall: Duration::from_millis(5)..Duration::from_millis(120),
        refuse_prob: 0.05,
        ..Default::default()
    };
    let proxy = FaultProxy::start(cs[0].local_addr(), plan).await.unwrap();
    let client = SyncClient::spawn(s.ledger.clone(), sync_opts(&s, proxy.addr()));

    let mut mix = Mix::new(42);
    let mut appended = 0u64;
    let mut turn = 0usize;
    let mut restarted = false;
    while appended < EVENTS {
        let ledger = s.ledger.clone();
        let n = 1000.min(EVENTS - appended) as usize;
        let mut m = std::mem::replace(&mut mix, Mix::new(0));
        m = tokio::task::spawn_blocking(move || {
            append(&ledger, &mut m, n);
            m
        })
        .await
        .unwrap();
        mix = m;
        appended += n as u64;
        // Several collectors share the store: the uplink lands on another one now and then.
        if collectors > 1 && appended.is_multiple_of(3000) {
            turn += 1;
            proxy.set_upstream(cs[turn % cs.len()].local_addr());
        }
        // Midway: the collector dies (connections cut as by a crash) and comes back on a new
        // port with the same store.
        if !restarted && appended >= EVENTS / 2 {
            restarted = true;
            wait_acked(&client, appended / 3, Duration::from_secs(120)).await;
            let i = turn % cs.len();
            let old = cs.remove(i);
            old.shutdown().await;
            proxy.cut_all();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let fresh = Collector::start(collector_opts(&s.fleet_dir, db))
                .await
                .unwrap();
            proxy.set_upstream(fresh.local_addr());
            cs.insert(i, fresh);
        }
    }
    wait_acked(&client, EVENTS, Duration::from_secs(300)).await;
    let st = client.status();
    assert_eq!(st.backlog_events, 0, "{st:?}");
    let pstats = proxy.stats();
    eprintln!(
        "flaky uplink ({}): {} sessions, {} failures, {} uploads; proxy: {pstats:?}",
        db.unwrap_or("sqlite"),
        st.sessions,
        st.failures,
        st.uploads
    );
    assert!(
        pstats.cuts > 0 && st.failures > 0,
        "the faults did not happen: {pstats:?}"
    );

    // A resend of an acknowledged batch (as after a lost Ack) stores nothing.
    let store = cs[0].store();
    let up = build_upload(&s.ledger, Position::default(), 500)
        .unwrap()
        .unwrap();
    let reply = raw_upload(&s, cs[0].local_addr(), up).await;
    match reply {
        ServerMsg::Ack(a) => assert_eq!((a.stored, a.duplicates, a.next_seq), (0, 500, EVENTS)),
        other => panic!("resend: {other:?}"),
    }
    let store2 = store.clone();
    let ledger = s.ledger.clone();
    let device = device.to_string();
    tokio::task::spawn_blocking(move || assert_exact(store2.as_ref(), &device, &ledger, EVENTS))
        .await
        .unwrap();
    client.shutdown().await;
    for c in cs {
        c.shutdown().await;
    }
}

/// Connects as the device, says Hello, sends one upload, returns the reply.
async fn raw_upload(s: &Setup, addr: std::net::SocketAddr, up: Upload) -> ServerMsg {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(s.bundle.server_name.clone()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(s.bundle.client_config().unwrap())
        .connect(name, tcp)
        .await
        .unwrap();
    let hello = ClientMsg::Hello(Hello {
        magic: MAGIC,
        version: VERSION,
        device_id: s.bundle.device_id.clone(),
        agent: "test".into(),
    });
    frame::write(&mut tls, &hello).await.unwrap();
    let (w, _): (ServerMsg, _) = frame::read(&mut tls).await.unwrap();
    if !matches!(w, ServerMsg::Welcome(_)) {
        return w;
    }
    frame::write(&mut tls, &ClientMsg::Upload(up))
        .await
        .unwrap();
    frame::read::<_, ServerMsg>(&mut tls).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_events_through_a_flaky_uplink_arrive_exactly_once_sqlite() {
    flaky_uplink("box-sqlite", None, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_events_through_a_flaky_uplink_arrive_exactly_once_postgres() {
    let Some(url) = std::env::var("EDGELORA_TEST_PG")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        if std::env::var("EDGELORA_REQUIRE_PG").is_ok_and(|v| v == "1") {
            panic!("EDGELORA_REQUIRE_PG=1 but EDGELORA_TEST_PG is not set");
        }
        eprintln!("\n!!! PostgreSQL fleet sync test SKIPPED: EDGELORA_TEST_PG is not set !!!\n");
        return;
    };
    // Unique per run: the database outlives the test.
    let device = format!(
        "box-pg-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    flaky_uplink(&device, Some(&url), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_upload_flags_the_device_and_keeps_what_was_accepted() {
    let s = setup("box-tamper");
    let c = Collector::start(collector_opts(&s.fleet_dir, None))
        .await
        .unwrap();
    let mut mix = Mix::new(7);
    let ledger = s.ledger.clone();
    tokio::task::spawn_blocking(move || append(&ledger, &mut mix, 1500))
        .await
        .unwrap();
    // The first 1000 events arrive honestly.
    let up = build_upload(&s.ledger, Position::default(), 1000)
        .unwrap()
        .unwrap();
    let pos = match raw_upload(&s, c.local_addr(), up).await {
        ServerMsg::Ack(a) => {
            assert_eq!((a.stored, a.next_seq), (1000, 1000));
            Position {
                next_seq: a.next_seq,
                epoch: a.epoch,
                checkpoint_size: a.checkpoint_size,
            }
        }
        other => panic!("{other:?}"),
    };
    let store = c.store();
    let before = {
        let st = store.clone();
        tokio::task::spawn_blocking(move || st.report(Some("box-tamper")).unwrap())
            .await
            .unwrap()
    };
    // The next batch with one event's token count changed (a flipped bit) is refused ...
    let mut up = build_upload(&s.ledger, pos, 500).unwrap().unwrap();
    up.events[17].body.prompt_tokens ^= 0x10;
    match raw_upload(&s, c.local_addr(), up).await {
        ServerMsg::Refused(r) => assert_eq!(r.code, RefuseCode::Tampered, "{}", r.message),
        other => panic!("tampered upload: {other:?}"),
    }
    // ... the device is flagged, its honest batch now refused too, and the data accepted before
    // the tampering stays as it was.
    let up = build_upload(&s.ledger, pos, 500).unwrap().unwrap();
    match raw_upload(&s, c.local_addr(), up).await {
        ServerMsg::Refused(r) => assert_eq!(r.code, RefuseCode::Suspect, "{}", r.message),
        other => panic!("upload from a flagged device: {other:?}"),
    }
    let after = tokio::task::spawn_blocking(move || store.report(Some("box-tamper")).unwrap())
        .await
        .unwrap();
    assert_eq!(after.contributors, before.contributors);
    let dev = after
        .devices
        .iter()
        .find(|d| d.device == "box-tamper")
        .unwrap();
    assert_eq!(dev.events, 1000);
    assert!(
        dev.suspect
            .as_deref()
            .is_some_and(|r| r.contains("signed tree")),
        "{dev:?}"
    );
    assert_eq!(
        Collector::stats(&c)
            .flagged
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_cannot_sync_after_the_crl_reload() {
    let s = setup("box-revoked");
    let c = Collector::start(collector_opts(&s.fleet_dir, None))
        .await
        .unwrap();
    let mut mix = Mix::new(3);
    let ledger = s.ledger.clone();
    tokio::task::spawn_blocking(move || append(&ledger, &mut mix, 100))
        .await
        .unwrap();
    let client = SyncClient::spawn(s.ledger.clone(), sync_opts(&s, c.local_addr()));
    wait_acked(&client, 100, Duration::from_secs(30)).await;
    client.shutdown().await;

    Fleet::open(&s.fleet_dir)
        .unwrap()
        .revoke("box-revoked", RevocationReason::KeyCompromise)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // > crl_poll
    let mut mix = Mix::new(4);
    let ledger = s.ledger.clone();
    tokio::task::spawn_blocking(move || append(&ledger, &mut mix, 10))
        .await
        .unwrap();
    let failures_before = c
        .stats()
        .handshake_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    let client = SyncClient::spawn(s.ledger.clone(), sync_opts(&s, c.local_addr()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let st = client.status();
    assert_eq!(st.acked.map(|p| p.next_seq), Some(100), "{st:?}");
    assert!(st.failures > 0 && !st.connected, "{st:?}");
    assert!(
        c.stats()
            .handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > failures_before
    );
    client.shutdown().await;
    c.shutdown().await;
}

/// The daemon end to end: `edgelorad serve` with a bundle syncs its events to the collector;
/// with the uplink down and a backlog cap of 0 it refuses new requests (503, nothing lost) and
/// takes them again once the backlog is acknowledged; the collector's totals then equal the
/// daemon's own counters.
#[test]
fn edgelorad_syncs_its_ledger_and_refuses_work_while_the_backlog_is_over_its_cap() {
    use edgelora_tests::{edgelorad, request_on, tiny, tmp_dir};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _rt = rt.enter();
    let tmp = tempfile::tempdir().unwrap();
    let fleet_dir = tmp.path().join("fleet");
    let bundle_dir = enrolled_fleet(tmp.path(), "box-daemon");
    let (collector, proxy) = rt.block_on(async {
        let c = Collector::start(collector_opts(&fleet_dir, None))
            .await
            .unwrap();
        let p = FaultProxy::start(c.local_addr(), FaultPlan::clean())
            .await
            .unwrap();
        p.pause(); // the uplink is down at first
        (c, p)
    });
    let config = tmp.path().join("edgelorad.toml");
    std::fs::write(
        &config,
        format!(
            "[sync]\nbundle = {:?}\ncollector = [\"{}\"]\nmax_backlog_mb = 0\n\
             poll_interval_ms = 50\nbackoff_max_secs = 1\n",
            bundle_dir.display().to_string(),
            proxy.addr()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tmp_dir("fleet-daemon-data");
    let mut child = std::process::Command::new(edgelorad())
        .args(["serve", "--model"])
        .arg(tiny())
        .args(["--device", "cpu", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-token", "admin-secret", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let t0 = Instant::now();
    while !matches!(request_on(port, "GET", "/health", None, &[]), Ok((200, _))) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "edgelorad exited early"
        );
        assert!(t0.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _guard = Kill(child);
    let health = || -> serde_json::Value {
        let (_, b) = request_on(port, "GET", "/health", None, &[]).unwrap();
        serde_json::from_slice(&b).unwrap()
    };
    let complete = || -> (u16, serde_json::Value) {
        let body = br#"{"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4}"#;
        let (st, b) = request_on(port, "POST", "/v1/completions", Some(body), &[]).unwrap();
        (st, serde_json::from_slice(&b).unwrap_or_default())
    };
    let wait_synced = |n: u64| {
        let t0 = Instant::now();
        loop {
            let h = health();
            if h["sync"]["acked_next_seq"] == n && h["sync"]["backlog_events"] == 0 {
                return h;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "not synced: {h}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Wait for the sync task (it starts once the model is loaded).
    let t0 = Instant::now();
    while health()["sync"].is_null() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "sync never started: {}",
            health()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, body) = complete();
    assert_eq!(st, 200, "{body}");
    // One event not yet synced is over a cap of 0: refused, with a clear reason.
    let (st, body) = complete();
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["error"]["code"], "attribution_backlog_full", "{body}");
    let h = health();
    assert_eq!(h["sync"]["alarm"], true, "{h}");
    assert_eq!(h["sync"]["backlog_events"], 1, "{h}");

    // The uplink comes back: the backlog drains, requests are taken again.
    proxy.resume();
    wait_synced(1);
    // (With a cap of 0 every answer must be synced before the next is taken.)
    for n in [2, 3] {
        let (st, body) = complete();
        assert_eq!(st, 200, "{body}");
        wait_synced(n);
    }
    let h = health();
    assert_eq!(h["sync"]["alarm"], false, "{h}");
    let (_, m) = request_on(port, "GET", "/metrics", None, &[]).unwrap();
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("edgelora_sync_backlog_events 0"), "{m}");
    assert!(m.contains("edgelora_sync_acked_seq 3"), "{m}");

    // The collector holds exactly what the daemon counted.
    let (_, b) = request_on(
        port,
        "GET",
        "/v1/attribution/counters",
        None,
        &[("Authorization", "Bearer admin-secret")],
    )
    .unwrap();
    let ours: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let mut ours: Vec<Row> = ours["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["contributor"].as_str().unwrap().to_string(),
                r["kind"].as_str().unwrap().to_string(),
                r["requests"].as_u64().unwrap(),
                r["prompt_tokens"].as_u64().unwrap(),
                r["completion_tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    let report = collector.store().report(Some("box-daemon")).unwrap();
    let mut theirs = collector_rows(&report);
    ours.sort();
    theirs.sort();
    assert_eq!(theirs, ours);
    assert_eq!(ours.iter().map(|r| r.2).sum::<u64>(), 3, "{ours:?}");
    drop(proxy);
    rt.block_on(collector.shutdown());
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_closes_its_session_and_reconnects_when_the_log_grows() {
    let s = setup("box-idle");
    let c = Collector::start(collector_opts(&s.fleet_dir, None))
        .await
        .unwrap();
    let mut opts = sync_opts(&s, c.local_addr());
    opts.idle_close = Duration::from_millis(200);
    let mut mix = Mix::new(5);
    let ledger = s.ledger.clone();
    let mut mix = tokio::task::spawn_blocking(move || {
        append(&ledger, &mut mix, 100);
        mix
    })
    .await
    .unwrap();
    let client = SyncClient::spawn(s.ledger.clone(), opts);
    wait_acked(&client, 100, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let st = client.status();
    assert!(
        !st.connected && st.failures == 0 && st.sessions == 1,
        "{st:?}"
    );
    // Still caught up: no new connection while nothing is new.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.status().sessions, 1);
    let ledger = s.ledger.clone();
    tokio::task::spawn_blocking(move || append(&ledger, &mut mix, 10))
        .await
        .unwrap();
    wait_acked(&client, 110, Duration::from_secs(30)).await;
    let st = client.status();
    assert_eq!(
        (st.sessions, st.failures, st.backlog_events),
        (2, 0, 0),
        "{st:?}"
    );
    client.shutdown().await;
    c.shutdown().await;
}
