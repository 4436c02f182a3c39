//! systemd's service notifications (`sd_notify(3)`) and its per-service watchdog
//! (`sd_watchdog_enabled(3)`).
//!
//! A unit with `Type=notify` hands the service `$NOTIFY_SOCKET`, an `AF_UNIX` datagram socket (a
//! path, or an abstract name written `@name`); each datagram is newline-separated `KEY=VALUE`
//! lines: `READY=1` ends start-up, `STATUS=…` shows in `systemctl status`, `STOPPING=1` starts a
//! clean stop, `WATCHDOG=1` pets the watchdog. With `WatchdogSec=` systemd also sets
//! `$WATCHDOG_USEC` (and `$WATCHDOG_PID`): from `READY=1` on, the service is killed
//! (`WatchdogSignal`, SIGABRT) and, with `Restart=on-failure`, restarted unless petted within that
//! interval.
//!
//! [`SystemdWatchdog`] is a [`Watchdog`], so the same [`WatchdogGuard`](super::WatchdogGuard)
//! that holds back the hardware watchdog's pets while the engine is stuck holds back `WATCHDOG=1`.
//! [`SystemdWatchdog::guard_config`] pets at half the interval, as systemd recommends.
//!
//! Hand-rolled rather than the `sd-notify` crate: that crate reads `$NOTIFY_SOCKET` and
//! `$WATCHDOG_USEC` on every call with no way to name the socket or interval, so its users can only
//! be tested by mutating the process environment. Here every constructor takes the socket and
//! interval explicitly, with `from_env` beside it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::guard::GuardConfig;
use super::watchdog::Watchdog;
use crate::HalError;

/// The variable naming the notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The variable holding the watchdog interval in microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The variable naming the process the watchdog interval is meant for.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// A send blocks while systemd's receive queue is full; past this it fails (and the watchdog
/// guard tries again next round) rather than hanging the caller.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// One line of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyState<'a> {
    /// `READY=1`: start-up is finished.
    Ready,
    /// `STATUS=…`: free text for `systemctl status` (line breaks become spaces).
    Status(&'a str),
    /// `STOPPING=1`: the service is shutting down.
    Stopping,
    /// `WATCHDOG=1`: pets the watchdog.
    Watchdog,
}

impl std::fmt::Display for NotifyState<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ready => f.write_str("READY=1"),
            Self::Status(s) => write!(f, "STATUS={}", s.replace(['\n', '\r'], " ")),
            Self::Stopping => f.write_str("STOPPING=1"),
            Self::Watchdog => f.write_str("WATCHDOG=1"),
        }
    }
}

/// Sends notifications to systemd. Cheap to clone; clones share one socket.
#[derive(Debug, Clone)]
pub struct SystemdNotifier {
    socket: Arc<UnixDatagram>,
    addr: SocketAddr,
    /// The socket as named (`/run/systemd/notify`, `@name`), for messages.
    name: PathBuf,
}

impl SystemdNotifier {
    /// The notifier for `$NOTIFY_SOCKET`; `None` when it is unset or empty (not run by systemd,
    /// or by a unit that is not `Type=notify`).
    pub fn from_env() -> Result<Option<Self>, HalError> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(name) if !name.is_empty() => Self::new(name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier sending to `socket`: an absolute path, or `@name` for an abstract socket.
    pub fn new(socket: impl AsRef<OsStr>) -> Result<Self, HalError> {
        let name = socket.as_ref();
        let bytes = name.as_bytes();
        let invalid = |why: &str| HalError::Config(format!("{NOTIFY_SOCKET}={name:?}: {why}"));
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(name).map_err(|e| invalid(&e.to_string()))?,
            Some(b'@') => abstract_addr(&bytes[1..]).map_err(|e| invalid(&e.to_string()))?,
            _ => return Err(invalid("neither an absolute path nor an @abstract name")),
        };
        let write_err = |source| HalError::Write {
            path: name.into(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(write_err)?;
        socket
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(write_err)?;
        Ok(Self {
            socket: Arc::new(socket),
            addr,
            name: name.into(),
        })
    }

    /// The socket as named.
    pub fn socket_name(&self) -> &std::path::Path {
        &self.name
    }

    /// Sends `states` as one datagram, one `KEY=VALUE` line each, joined by `\n`.
    pub fn notify(&self, states: &[NotifyState<'_>]) -> Result<(), HalError> {
        let message = states
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        let err = |source| HalError::Write {
            path: self.name.clone(),
            source,
        };
        let sent = self
            .socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map_err(err)?;
        if sent != message.len() {
            return Err(err(std::io::ErrorKind::WriteZero.into()));
        }
        Ok(())
    }

    /// `READY=1` with `STATUS=<status>`.
    pub fn ready(&self, status: &str) -> Result<(), HalError> {
        self.notify(&[NotifyState::Ready, NotifyState::Status(status)])
    }

    /// `STATUS=<status>`.
    pub fn status(&self, status: &str) -> Result<(), HalError> {
        self.notify(&[NotifyState::Status(status)])
    }

    /// `STOPPING=1` with `STATUS=<status>`.
    pub fn stopping(&self, status: &str) -> Result<(), HalError> {
        self.notify(&[NotifyState::Stopping, NotifyState::Status(status)])
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) -> Result<(), HalError> {
        self.notify(&[NotifyState::Watchdog])
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> std::io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// systemd's watchdog interval for this process, from `$WATCHDOG_USEC` and `$WATCHDOG_PID`
/// (see [`watchdog_interval`]).
pub fn watchdog_interval_from_env() -> Result<Option<Duration>, HalError> {
    watchdog_interval(
        std::env::var_os(WATCHDOG_USEC).as_deref(),
        std::env::var_os(WATCHDOG_PID).as_deref(),
        std::process::id(),
    )
}

/// `sd_watchdog_enabled(3)` on explicit values: `None` when `usec` is unset or `pid` names another
/// process (the variables were inherited); an error when `usec` is not a positive, finite number
/// of microseconds or `pid` is not a process id.
pub fn watchdog_interval(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    our_pid: u32,
) -> Result<Option<Duration>, HalError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    let usec = usec
        .to_str()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&u| u > 0 && u < u64::MAX)
        .ok_or_else(|| HalError::Config(format!("{WATCHDOG_USEC}={usec:?} is not a timeout")))?;
    if let Some(pid) = pid {
        let pid = pid
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&p| p > 0)
            .ok_or_else(|| HalError::Config(format!("{WATCHDOG_PID}={pid:?} is not a pid")))?;
        if pid != our_pid {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(usec)))
}

/// systemd's per-service watchdog as a [`Watchdog`]: [`pet`](Watchdog::pet) sends `WATCHDOG=1`.
///
/// The interval is the unit's (`WatchdogSec=`); [`start`](Watchdog::start) cannot change it and
/// reports it as the effective timeout. systemd watches from `READY=1` until the service stops, and
/// a service cannot disarm it: [`stop_magic`](Watchdog::stop_magic) only ends the petting (send
/// `STOPPING=1` for a clean stop).
#[derive(Debug)]
pub struct SystemdWatchdog {
    notifier: SystemdNotifier,
    interval: Duration,
    started: bool,
}

impl SystemdWatchdog {
    /// A watchdog petted through `notifier`, killed by systemd after `interval` without a pet.
    pub fn new(notifier: SystemdNotifier, interval: Duration) -> Self {
        Self {
            notifier,
            interval,
            started: false,
        }
    }

    /// The watchdog systemd set up for this process: `None` without `$NOTIFY_SOCKET` or without
    /// an interval meant for this process.
    pub fn from_env() -> Result<Option<Self>, HalError> {
        let Some(interval) = watchdog_interval_from_env()? else {
            return Ok(None);
        };
        Ok(SystemdNotifier::from_env()?.map(|n| Self::new(n, interval)))
    }

    /// The unit's watchdog interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The guard timing for this watchdog: a pet every half interval (systemd's advice), the
    /// default stall threshold of the engine.
    pub fn guard_config(&self) -> GuardConfig {
        guard_config_for(self.interval)
    }
}

/// The guard timing for a systemd watchdog of `interval`: `hardware_timeout` is the interval,
/// `pet_every` half of it (at least 1 ms), `stall_after` the default.
pub fn guard_config_for(interval: Duration) -> GuardConfig {
    GuardConfig {
        hardware_timeout: interval,
        pet_every: (interval / 2).max(Duration::from_millis(1)),
        ..GuardConfig::default()
    }
}

impl Watchdog for SystemdWatchdog {
    /// Pets once (the countdown starts now) and reports the unit's interval; `timeout` is ignored.
    fn start(&mut self, _timeout: Duration) -> Result<Option<Duration>, HalError> {
        self.notifier.watchdog()?;
        self.started = true;
        Ok(Some(self.interval))
    }

    fn pet(&mut self) -> Result<(), HalError> {
        if !self.started {
            return Err(HalError::WatchdogNotStarted {
                path: self.notifier.name.clone(),
            });
        }
        self.notifier.watchdog()
    }

    fn stop_magic(&mut self) -> Result<(), HalError> {
        self.started = false;
        Ok(())
    }
}
