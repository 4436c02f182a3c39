//! GPU telemetry: what the GPU is doing right now, from whichever source this box has.
//!
//! - [`Nvml`]: discrete NVIDIA GPUs (and anything else `libnvidia-ml.so.1` reports on).
//! - [`JetsonSysfs`]: Jetson boards, which have no usable NVML: the integrated GPU's devfreq node,
//!   the thermal zones, the INA3221 power monitors and `/proc/meminfo` (memory is unified).
//! - [`StaticTelemetry`]: fixed samples, for tests of whatever consumes telemetry.
//!
//! [`auto_detect`] picks one; [`metrics::register`] exports it to Prometheus, sampling on each
//! scrape.

mod jetson;
pub mod metrics;
mod nvml;

use std::path::Path;

pub use jetson::JetsonSysfs;
pub use nvml::Nvml;

use crate::HalError;

/// One reading of one GPU. A field a backend cannot measure is `None`, never a made-up zero.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuSample {
    /// Index of the GPU within its source (0 on a Jetson).
    pub index: u32,
    /// The GPU's name as its source reports it ("NVIDIA H100 80GB HBM3", "ga10b").
    pub name: String,
    /// Memory in use. On Jetson, system memory in use (CPU and GPU share it).
    pub memory_used_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_c: Option<f64>,
    /// Power drawn by the GPU, in milliwatts. On Jetson, the INA3221 rails whose label names the
    /// GPU; on Orin NX/Nano that rail (`VDD_CPU_GPU_CV`) also feeds the CPU and vision engines.
    pub power_mw: Option<u64>,
    /// Share of the last sampling period in which the GPU was busy, 0 to 100.
    pub utilization_pct: Option<f64>,
    /// Current SM (graphics) clock.
    pub sm_clock_mhz: Option<u32>,
    /// Current memory clock.
    pub mem_clock_mhz: Option<u32>,
    /// Which backend produced this sample: [`Nvml::SOURCE`] or [`JetsonSysfs::SOURCE`].
    pub source: &'static str,
}

/// A source of GPU readings.
pub trait GpuTelemetry: Send + Sync + std::fmt::Debug {
    /// One sample per GPU this source knows about.
    fn sample(&self) -> Result<Vec<GpuSample>, HalError>;
    /// The backend's name, the same as the samples' `source`.
    fn name(&self) -> &str;
}

/// Fixed samples: a stand-in backend for tests of the daemon's `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct StaticTelemetry {
    pub samples: Vec<GpuSample>,
}

impl GpuTelemetry for StaticTelemetry {
    fn sample(&self) -> Result<Vec<GpuSample>, HalError> {
        Ok(self.samples.clone())
    }

    fn name(&self) -> &str {
        "static"
    }
}

/// The telemetry source this box has, or `None` on a machine with neither NVML nor a Jetson GPU.
///
/// NVML is tried first and kept only if it reports at least one GPU with its memory size: recent
/// JetPack releases ship an NVML that loads on Jetson but reports next to nothing there, and the
/// Jetson files are then the better source. `root` is the filesystem root the Jetson files are
/// read under (`/` on a real box).
pub fn auto_detect(root: &Path) -> Option<Box<dyn GpuTelemetry>> {
    match Nvml::init() {
        Ok(nvml) => match nvml.sample() {
            Ok(samples)
                if !samples.is_empty()
                    && samples.iter().all(|s| s.memory_total_bytes.is_some()) =>
            {
                tracing::info!(gpus = samples.len(), "GPU telemetry from NVML");
                return Some(Box::new(nvml));
            }
            Ok(_) => tracing::debug!("NVML loaded but reports no GPU with memory"),
            Err(e) => tracing::debug!(error = %e, "NVML loaded but sampling failed"),
        },
        Err(e) => tracing::debug!(error = %e, "no NVML"),
    }
    match JetsonSysfs::open(root) {
        Ok(jetson) => {
            tracing::info!(gpu = jetson.gpu_name(), "GPU telemetry from Jetson sysfs");
            Some(Box::new(jetson))
        }
        Err(e) => {
            tracing::info!(error = %e, "no GPU telemetry on this machine");
            None
        }
    }
}
