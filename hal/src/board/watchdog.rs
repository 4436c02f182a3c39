//! The hardware watchdog: once started, the board resets unless it is petted within the timeout.
//!
//! `embedded-hal` 1.0 dropped its watchdog traits, so the trait is ours, shaped like the Linux
//! watchdog API (`Documentation/watchdog/watchdog-api.rst`): opening the device arms it, any write
//! pets it, and writing `V` right before closing (the "magic close") disarms it. Closing without
//! the magic leaves it armed, so a crashed daemon still gets the board reset.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::HalError;

/// The watchdog device on a Linux board.
pub const DEFAULT_WATCHDOG_DEVICE: &str = "/dev/watchdog";

/// A hardware watchdog.
pub trait Watchdog: Send {
    /// Arms the watchdog to reset the board unless petted within `timeout`. Returns the timeout
    /// the device actually uses when it says (drivers round, and some have a fixed one).
    fn start(&mut self, timeout: Duration) -> Result<Option<Duration>, HalError>;

    /// Restarts the countdown.
    fn pet(&mut self) -> Result<(), HalError>;

    /// Disarms the watchdog (magic close). Doing nothing when it was not started.
    fn stop_magic(&mut self) -> Result<(), HalError>;
}

impl<W: Watchdog + ?Sized> Watchdog for Box<W> {
    fn start(&mut self, timeout: Duration) -> Result<Option<Duration>, HalError> {
        (**self).start(timeout)
    }
    fn pet(&mut self) -> Result<(), HalError> {
        (**self).pet()
    }
    fn stop_magic(&mut self) -> Result<(), HalError> {
        (**self).stop_magic()
    }
}

/// The Linux watchdog character device (`/dev/watchdog`, or `/dev/watchdogN`).
///
/// Dropping it without [`stop_magic`](Watchdog::stop_magic) closes the device still armed: on
/// purpose, a daemon that dies without shutting down cleanly gets the board reset.
#[derive(Debug)]
pub struct LinuxWatchdog {
    path: PathBuf,
    file: Option<File>,
}

impl LinuxWatchdog {
    /// A watchdog at `path`; nothing is opened (and nothing armed) until `start`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            file: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), HalError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| HalError::WatchdogNotStarted {
                path: self.path.clone(),
            })?;
        file.write_all(bytes)
            .and_then(|()| file.flush())
            .map_err(|source| HalError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

impl Watchdog for LinuxWatchdog {
    fn start(&mut self, timeout: Duration) -> Result<Option<Duration>, HalError> {
        let file = match self.file.take() {
            Some(file) => file,
            // Opening arms it.
            None => std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)
                .map_err(|source| HalError::Write {
                    path: self.path.clone(),
                    source,
                })?,
        };
        let file = &*self.file.insert(file);
        // Whole seconds, rounded up: the API has no finer unit.
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let secs = i32::try_from(secs.max(1))
            .map_err(|_| HalError::Config(format!("watchdog timeout {timeout:?} is too long")))?;
        match ioctl::set_timeout(file, secs) {
            Ok(effective) => Ok(Some(Duration::from_secs(effective.into()))),
            Err(e) if ioctl::unsupported(&e) => {
                // A fixed-timeout driver, or a stand-in that is not a watchdog at all.
                tracing::debug!(path = %self.path.display(), "watchdog timeout cannot be set");
                match ioctl::get_timeout(file) {
                    Ok(fixed) => Ok(Some(Duration::from_secs(fixed.into()))),
                    Err(e) if ioctl::unsupported(&e) => Ok(None),
                    Err(source) => Err(HalError::Device {
                        path: self.path.clone(),
                        op: "WDIOC_GETTIMEOUT",
                        source,
                    }),
                }
            }
            Err(source) => Err(HalError::Device {
                path: self.path.clone(),
                op: "WDIOC_SETTIMEOUT",
                source,
            }),
        }
    }

    fn pet(&mut self) -> Result<(), HalError> {
        // Any byte but 'V' pets and cancels a pending magic close.
        self.write(b"\0")
    }

    fn stop_magic(&mut self) -> Result<(), HalError> {
        if self.file.is_none() {
            return Ok(());
        }
        self.write(b"V")?;
        self.file = None;
        Ok(())
    }
}

#[cfg(target_os = "linux")]
mod ioctl {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    // <linux/watchdog.h>: _IOWR('W', 6, int) and _IOR('W', 7, int), the asm-generic encoding used
    // by x86_64 and aarch64.
    const fn ioc(dir: u64, nr: u64) -> u64 {
        (dir << 30) | ((size_of::<libc::c_int>() as u64) << 16) | ((b'W' as u64) << 8) | nr
    }
    const IOC_WRITE: u64 = 1;
    const IOC_READ: u64 = 2;
    const WDIOC_SETTIMEOUT: u64 = ioc(IOC_READ | IOC_WRITE, 6);
    const WDIOC_GETTIMEOUT: u64 = ioc(IOC_READ, 7);

    /// Sets the timeout in seconds; returns the one the driver chose.
    pub(super) fn set_timeout(file: &File, secs: i32) -> io::Result<u32> {
        let mut value: libc::c_int = secs;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one c_int through the pointer, which points
        // at a live local for the duration of the call; the fd is owned by `file`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut value) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        seconds(value)
    }

    pub(super) fn get_timeout(file: &File) -> io::Result<u32> {
        let mut value: libc::c_int = 0;
        // SAFETY: WDIOC_GETTIMEOUT writes one c_int through the pointer, which points at a live
        // local for the duration of the call; the fd is owned by `file`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_GETTIMEOUT as _, &mut value) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        seconds(value)
    }

    fn seconds(value: libc::c_int) -> io::Result<u32> {
        u32::try_from(value)
            .map_err(|_| io::Error::other(format!("driver reported timeout {value} s")))
    }

    /// The file is not a watchdog (ENOTTY), or the driver cannot do this (EOPNOTSUPP).
    pub(super) fn unsupported(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EOPNOTSUPP))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn request_codes_match_linux_watchdog_h() {
            assert_eq!(super::WDIOC_SETTIMEOUT, 0xC004_5706);
            assert_eq!(super::WDIOC_GETTIMEOUT, 0x8004_5707);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod ioctl {
    use std::fs::File;
    use std::io;

    pub(super) fn set_timeout(_: &File, _: i32) -> io::Result<u32> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub(super) fn get_timeout(_: &File) -> io::Result<u32> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub(super) fn unsupported(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::Unsupported
    }
}
