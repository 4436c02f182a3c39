//! `edgelorad serve` under a stand-in for systemd: the test binds the `$NOTIFY_SOCKET` datagram
//! socket a `Type=notify` unit would get, sets `$WATCHDOG_USEC` as `WatchdogSec=2` would, and reads
//! what the real binary (on the tiny-llama fixture) sends: `STATUS=` while loading, `READY=1` once
//! `/health` answers 200, `WATCHDOG=1` while serving, `STOPPING=1` on SIGTERM.

use std::fs::File;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgelora_tests::*;

/// What `WatchdogSec=2` sets.
const WATCHDOG_USEC: &str = "2000000";

struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Fails the test with the daemon's log when it has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("edgelorad serve exited early ({st}):\n{}", self.log());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The next datagram within `within`, `None` when none came.
    fn recv(&mut self, socket: &UnixDatagram, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            self.assert_running();
            match socket.recv(&mut buf) {
                Ok(n) => return Some(String::from_utf8(buf[..n].to_vec()).unwrap()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
                Err(e) => panic!("recv on the notify socket: {e}"),
            }
        }
    }

    /// Datagrams until one has the line `line` (returned with those before it); at most `within`.
    fn recv_until(
        &mut self,
        socket: &UnixDatagram,
        line: &str,
        within: Duration,
    ) -> (String, Vec<String>) {
        let deadline = Instant::now() + within;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(socket, left) {
                Some(d) if d.lines().any(|l| l == line) => return (d, before),
                Some(d) => before.push(d),
                None => panic!(
                    "no {line} within {within:?}; got {before:?}; log:\n{}",
                    self.log()
                ),
            }
        }
    }
}

/// systemd's end of `$NOTIFY_SOCKET`, bound at `dir/notify`.
fn bind_notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    (socket, path)
}

/// `edgelorad serve` on the tiny model with its own data dir, run as systemd would run it.
fn start(dir: &Path, notify_socket: &Path, watchdog_pid: Option<&str>) -> Daemon {
    let bin = edgelorad();
    let port = free_port();
    let log = dir.join("edgelorad.log");
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--model"])
        .arg(tiny())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--device", "cpu"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("NOTIFY_SOCKET", notify_socket)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap());
    if let Some(pid) = watchdog_pid {
        cmd.env("WATCHDOG_PID", pid);
    }
    let child = cmd.spawn().expect("spawning edgelorad serve");
    Daemon { child, port, log }
}

#[test]
fn serve_tells_systemd_ready_after_health_then_pets_its_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, socket_path) = bind_notify_socket(dir.path());
    let mut d = start(dir.path(), &socket_path, None);

    // Loading: STATUS lines, then READY=1 with the serving status.
    let (ready, before) = d.recv_until(&socket, "READY=1", Duration::from_secs(120));
    // /health is 200 by the time systemd hears READY=1.
    let (status, body) = request_on(d.port, "GET", "/health", None, &[]).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let lines: Vec<&str> = ready.lines().collect();
    assert_eq!(lines.len(), 2, "{ready:?}");
    assert_eq!(lines[0], "READY=1");
    assert!(
        lines[1].starts_with("STATUS=serving ")
            && lines[1].ends_with(&format!(" on cpu at http://127.0.0.1:{}", d.port)),
        "{ready:?}"
    );
    assert_eq!(
        before.first().map(String::as_str),
        Some("STATUS=loading the model"),
        "{before:?}"
    );
    assert!(
        before
            .iter()
            .any(|b| b.starts_with("STATUS=") && b.contains(" loaded; ")),
        "{before:?}"
    );
    // Before READY=1 only status lines, and maybe the watchdog's first pet (it is armed as
    // /health turns 200, a moment before READY=1 goes out).
    for b in &before {
        assert!(b.starts_with("STATUS=") || b == "WATCHDOG=1", "{b:?}");
    }

    // Serving: WATCHDOG=1 every half interval (1 s) while the engine's loop beats. Counted, not
    // timed, so a loaded machine does not fail it: at least three in six seconds.
    let mut pets = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        if let Some(m) = d.recv(&socket, Duration::from_millis(100)) {
            assert_eq!(m, "WATCHDOG=1", "unexpected while serving");
            pets += 1;
        }
    }
    assert!(pets >= 3, "{pets} WATCHDOG=1 in 6 s; log:\n{}", d.log());
    assert!(
        d.log().contains("systemd watchdog armed"),
        "log:\n{}",
        d.log()
    );

    // SIGTERM: STOPPING=1 first, then a clean exit.
    let st = Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let (stopping, _) = d.recv_until(&socket, "STOPPING=1", Duration::from_secs(30));
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=shutting down"),
        "{stopping:?}"
    );
    let t0 = Instant::now();
    let exit = loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit}; log:\n{}", d.log());
    assert!(
        d.log().contains("systemd watchdog no longer petted"),
        "log:\n{}",
        d.log()
    );
}

#[test]
fn a_watchdog_meant_for_another_process_is_not_petted() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, socket_path) = bind_notify_socket(dir.path());
    // $WATCHDOG_PID names another process (as when inherited from a parent): READY=1 still, but
    // no WATCHDOG=1, which an armed watchdog would have sent at once.
    let mut d = start(dir.path(), &socket_path, Some("1"));
    let (_, before) = d.recv_until(&socket, "READY=1", Duration::from_secs(120));
    assert!(!before.iter().any(|b| b.contains("WATCHDOG")), "{before:?}");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        if let Some(m) = d.recv(&socket, Duration::from_millis(100)) {
            assert!(!m.contains("WATCHDOG"), "{m:?}");
        }
    }
    assert!(!d.log().contains("systemd watchdog armed"), "{}", d.log());
}
