//! The one error type of this crate. Every variant names the file or device it is about, so a log
//! line is enough to find the culprit on a box in the field.

use std::io;
use std::path::PathBuf;

/// What went wrong talking to the hardware.
#[derive(Debug, thiserror::Error)]
pub enum HalError {
    /// A file or device could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file or device could not be written (opened for writing included).
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file held something other than what the kernel documents for it.
    #[error("{path}: expected {expected}, found {found:?}")]
    Parse {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },

    /// Something this backend needs is not on this machine.
    #[error("{path}: {what} not found")]
    Missing { path: PathBuf, what: &'static str },

    /// A device control request (ioctl) failed.
    #[error("{op} on {path}: {source}")]
    Device {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// An NVML call failed. When `libnvidia-ml.so.1` is absent this is the error `Nvml::init`
    /// returns: install the NVIDIA driver, or use the Jetson backend on Jetson boards.
    #[error("NVML {op}: {source}")]
    Nvml {
        op: &'static str,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },

    /// A GPIO character device line could not be requested or driven.
    #[cfg(target_os = "linux")]
    #[error("GPIO {chip} line {line}: {source}")]
    Gpio {
        chip: PathBuf,
        line: u32,
        #[source]
        source: linux_embedded_hal::gpio_cdev::errors::Error,
    },

    /// The watchdog was used before `start` (or after `stop_magic`).
    #[error("watchdog {path} is not started")]
    WatchdogNotStarted { path: PathBuf },

    /// A background thread could not be started.
    #[error("spawning thread {name}: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: io::Error,
    },

    /// A configuration that cannot work (for example a watchdog petted less often than it fires).
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl embedded_hal::digital::Error for HalError {
    fn kind(&self) -> embedded_hal::digital::ErrorKind {
        embedded_hal::digital::ErrorKind::Other
    }
}
