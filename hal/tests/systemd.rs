//! systemd notifications against a real `AF_UNIX` datagram socket bound in a temp dir (and an
//! abstract one), standing in for systemd's `$NOTIFY_SOCKET`. Nothing reads or sets the process
//! environment: every socket and interval is passed explicitly. As in `board.rs`, "no more pets"
//! is counted in guard rounds that started after the engine went silent, not in sleeps.

#![cfg(unix)]

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgelora_hal::HalError;
use edgelora_hal::board::{
    GuardConfig, Heartbeat, NotifyState, SystemdNotifier, SystemdWatchdog, Watchdog, WatchdogGuard,
    guard_config_for, watchdog_interval,
};
use edgelora_hal::clock::FakeClock;

/// systemd's end: a datagram socket bound at a path in a fresh temp dir.
struct Systemd {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    socket: UnixDatagram,
}

impl Systemd {
    fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            _dir: dir,
            path,
            socket,
        }
    }

    fn notifier(&self) -> SystemdNotifier {
        SystemdNotifier::new(&self.path).unwrap()
    }

    /// The next datagram (waits up to 10 s).
    fn recv(&self) -> String {
        recv(&self.socket)
    }

    /// Every datagram already queued.
    fn drain(&self) -> Vec<String> {
        self.socket.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => out.push(String::from_utf8(buf[..n].to_vec()).unwrap()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        self.socket.set_nonblocking(false).unwrap();
        out
    }
}

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a datagram within 10 s");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn each_notification_is_one_datagram_of_key_value_lines() {
    let systemd = Systemd::bind();
    let n = systemd.notifier();
    assert_eq!(n.socket_name(), systemd.path);

    n.status("loading the model").unwrap();
    assert_eq!(systemd.recv(), "STATUS=loading the model");
    n.ready("serving tiny-llama").unwrap();
    assert_eq!(systemd.recv(), "READY=1\nSTATUS=serving tiny-llama");
    n.watchdog().unwrap();
    assert_eq!(systemd.recv(), "WATCHDOG=1");
    n.stopping("finishing requests").unwrap();
    assert_eq!(systemd.recv(), "STOPPING=1\nSTATUS=finishing requests");
    // A status cannot smuggle in another line (say READY=1).
    n.notify(&[NotifyState::Status("failed:\nREADY=1\r\n")])
        .unwrap();
    assert_eq!(systemd.recv(), "STATUS=failed: READY=1  ");
    // Clones share the socket.
    n.clone().notify(&[NotifyState::Watchdog]).unwrap();
    assert_eq!(systemd.recv(), "WATCHDOG=1");
    assert!(systemd.drain().is_empty());
}

#[cfg(target_os = "linux")]
#[test]
fn an_abstract_socket_is_reached_by_its_at_name() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let name = format!("edgelora-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = SystemdNotifier::new(format!("@{name}")).unwrap();
    n.ready("up").unwrap();
    assert_eq!(recv(&socket), "READY=1\nSTATUS=up");
}

#[test]
fn socket_names_other_than_paths_and_at_names_are_refused() {
    for bad in ["", "relative/notify", "vsock:2:1234"] {
        assert!(
            matches!(SystemdNotifier::new(bad), Err(HalError::Config(_))),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn sending_to_a_socket_nobody_listens_on_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let n = SystemdNotifier::new(dir.path().join("gone")).unwrap();
    assert!(matches!(n.watchdog(), Err(HalError::Write { .. })));
}

#[test]
fn watchdog_interval_follows_sd_watchdog_enabled() {
    let os = |s: &'static str| Some(OsStr::new(s));
    let me = 4242;
    // Unset: no watchdog.
    assert_eq!(watchdog_interval(None, None, me).unwrap(), None);
    assert_eq!(watchdog_interval(None, os("4242"), me).unwrap(), None);
    // Set, for us or for whoever (no pid).
    assert_eq!(
        watchdog_interval(os("30000000"), None, me).unwrap(),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        watchdog_interval(os("2000000"), os("4242"), me).unwrap(),
        Some(Duration::from_secs(2))
    );
    // Inherited from a parent the watchdog was meant for: not ours.
    assert_eq!(watchdog_interval(os("2000000"), os("1"), me).unwrap(), None);
    // Nonsense is an error, as in libsystemd.
    for (usec, pid) in [
        ("0", None),
        ("-5", None),
        ("2s", None),
        ("", None),
        ("18446744073709551615", None),
        ("2000000", os("")),
        ("2000000", os("0")),
        ("2000000", os("pid")),
    ] {
        assert!(
            matches!(
                watchdog_interval(Some(OsStr::new(usec)), pid, me),
                Err(HalError::Config(_))
            ),
            "{usec:?} {pid:?} accepted"
        );
    }
}

#[test]
fn guard_config_pets_at_half_the_interval() {
    let c = guard_config_for(Duration::from_secs(30));
    assert_eq!(c.hardware_timeout, Duration::from_secs(30));
    assert_eq!(c.pet_every, Duration::from_secs(15));
    assert_eq!(c.stall_after, GuardConfig::default().stall_after);
    c.validate().unwrap();
    let c = guard_config_for(Duration::from_micros(2_000_001));
    assert!(c.pet_every * 2 <= c.hardware_timeout);
    c.validate().unwrap();
}

#[test]
fn systemd_watchdog_pets_only_after_start_and_reports_the_units_interval() {
    let systemd = Systemd::bind();
    let interval = Duration::from_secs(2);
    let mut wd = SystemdWatchdog::new(systemd.notifier(), interval);
    assert_eq!(wd.interval(), interval);
    assert_eq!(wd.guard_config(), guard_config_for(interval));
    assert!(matches!(wd.pet(), Err(HalError::WatchdogNotStarted { .. })));
    // The asked-for timeout cannot change the unit's; start pets once.
    assert_eq!(wd.start(Duration::from_secs(60)).unwrap(), Some(interval));
    assert_eq!(systemd.recv(), "WATCHDOG=1");
    wd.pet().unwrap();
    assert_eq!(systemd.recv(), "WATCHDOG=1");
    wd.stop_magic().unwrap();
    assert!(wd.pet().is_err());
    assert!(systemd.drain().is_empty());
}

#[test]
fn a_guard_petting_slower_than_half_the_units_interval_is_refused() {
    let systemd = Systemd::bind();
    let wd = SystemdWatchdog::new(systemd.notifier(), Duration::from_secs(3));
    // Fine against the asked-for 60 s, too slow for the unit's 3 s.
    let config = GuardConfig {
        hardware_timeout: Duration::from_secs(60),
        stall_after: Duration::from_secs(10),
        pet_every: Duration::from_secs(2),
    };
    let heartbeat = Heartbeat::new(Arc::new(FakeClock::new()));
    assert!(matches!(
        WatchdogGuard::start(Box::new(wd), heartbeat, config),
        Err(HalError::Config(_))
    ));
}

#[test]
fn the_guard_sends_watchdog_1_only_while_the_engine_beats() {
    let systemd = Systemd::bind();
    let clock = FakeClock::new();
    let heartbeat = Heartbeat::new(Arc::new(clock.clone()));
    let stall = Duration::from_secs(10);
    let interval = Duration::from_secs(2);
    let config = GuardConfig {
        hardware_timeout: interval,
        stall_after: stall,
        pet_every: Duration::from_millis(5),
    };
    let guard = WatchdogGuard::start(
        Box::new(SystemdWatchdog::new(systemd.notifier(), interval)),
        heartbeat.clone(),
        config,
    )
    .unwrap();
    assert_eq!(guard.effective_timeout(), Some(interval));

    // Beating: WATCHDOG=1 keeps coming, one datagram per pet (plus the one of start).
    assert_eq!(systemd.recv(), "WATCHDOG=1");
    for _ in 0..5 {
        clock.advance(Duration::from_secs(1));
        heartbeat.beat();
        assert_eq!(systemd.recv(), "WATCHDOG=1");
    }

    // The engine goes silent: once a round has seen it, nothing more is sent.
    clock.advance(stall + Duration::from_nanos(1));
    wait_until("the guard withholds", || guard.is_withholding());
    let queued = systemd.drain();
    assert!(queued.iter().all(|d| d == "WATCHDOG=1"), "{queued:?}");
    let rounds = guard.rounds();
    wait_until("ten more rounds", || guard.rounds() >= rounds + 10);
    assert_eq!(systemd.drain(), Vec::<String>::new());
    assert!(guard.is_withholding());

    // A beat again: the pets come back.
    heartbeat.beat();
    assert_eq!(systemd.recv(), "WATCHDOG=1");
    // The datagram leaves before the guard counts it: wait for the count, not a snapshot.
    wait_until("the pets are counted", || guard.pets() >= 6);
    wait_until("the guard pets again", || !guard.is_withholding());
    assert_eq!(guard.pet_failures(), 0);

    // A clean stop ends the petting.
    guard.shutdown().unwrap();
    systemd.drain();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(systemd.drain(), Vec::<String>::new());
}
