//! edgelora-hal: the hardware of an edgelora box behind small interfaces, so the daemon never reads
//! `/sys` or `/dev` itself and its tests run against fakes.
//!
//! - [`telemetry`]: GPU readings (memory, temperature, power, utilization, clocks) from NVML on
//!   discrete GPUs or from sysfs on Jetson boards, and their Prometheus export.
//! - [`board`]: the status LED (an `embedded-hal` output pin driven by a pattern per
//!   [`board::BoardState`]) and the hardware watchdog, petted only while the engine's step loop
//!   beats.
//! - [`clock`]: monotonic time behind a trait, so patterns and stall detection are tested without
//!   sleeping.
//!
//! What runs where: NVML needs `libnvidia-ml.so.1` (NVIDIA driver, discrete GPU); the Jetson
//! backend, the sysfs LED and the GPIO LED need a Jetson (or any Linux board with those files);
//! the watchdog needs `/dev/watchdog` (a hardware driver, or `softdog` for a dry run). Everything
//! has a fake, and every real implementation takes its root or device path as an argument.

pub mod board;
pub mod clock;
mod error;
pub mod storage;
mod sysfs;
pub mod telemetry;

pub use error::HalError;
