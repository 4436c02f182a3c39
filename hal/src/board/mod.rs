//! The board: a status LED and the hardware watchdog, behind `embedded-hal`'s output pin and a
//! small watchdog trait, with Linux implementations and fakes.
//!
//! | piece              | real                                          | fake              |
//! |--------------------|-----------------------------------------------|-------------------|
//! | LED pin            | [`SysfsLed`] (`/sys/class/leds/<name>`), [`open_gpio_output`] (GPIO character device) | [`fake::FakePin`] |
//! | watchdog           | [`LinuxWatchdog`] (`/dev/watchdog`)           | [`fake::FakeWatchdog`] |
//! | service watchdog   | [`SystemdWatchdog`] (`WATCHDOG=1` to `$NOTIFY_SOCKET`) | a socket in a temp dir |
//! | time               | [`crate::clock::MonotonicClock`]              | [`crate::clock::FakeClock`] |
//!
//! Wiring in the daemon: one [`BoardStatus`] set as the daemon moves from booting to serving, a
//! [`StatusLed`] spawned on it; one [`Heartbeat`] beaten by the engine's step loop, a
//! [`WatchdogGuard`] started on it after the model is loaded and shut down on SIGTERM. Under
//! systemd (`Type=notify`, `WatchdogSec=`): a [`SystemdNotifier`] for `READY=1`, `STATUS=` and
//! `STOPPING=1`, and a second guard on the same heartbeat over a [`SystemdWatchdog`].

pub mod fake;
#[cfg(target_os = "linux")]
mod gpio;
mod guard;
mod led;
mod sysfs_led;
#[cfg(unix)]
mod systemd;
mod watchdog;

#[cfg(target_os = "linux")]
pub use gpio::{CdevPin, open_gpio_output};
pub use guard::{GuardConfig, Heartbeat, WatchdogGuard};
pub use led::{ACTIVITY_WINDOW, BoardState, BoardStatus, LedTask, StatusLed, led_level};
pub use sysfs_led::SysfsLed;
#[cfg(unix)]
pub use systemd::{
    NOTIFY_SOCKET, NotifyState, SystemdNotifier, SystemdWatchdog, WATCHDOG_PID, WATCHDOG_USEC,
    guard_config_for, watchdog_interval, watchdog_interval_from_env,
};
pub use watchdog::{DEFAULT_WATCHDOG_DEVICE, LinuxWatchdog, Watchdog};
