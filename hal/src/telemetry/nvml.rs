//! NVML backend: discrete NVIDIA GPUs through `libnvidia-ml.so.1`, loaded at run time.

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;

use super::{GpuSample, GpuTelemetry};
use crate::HalError;

/// GPU telemetry through NVML.
pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvml").finish_non_exhaustive()
    }
}

impl Nvml {
    pub const SOURCE: &'static str = "nvml";

    /// Loads `libnvidia-ml.so.1` and initialises it. On a machine without the NVIDIA driver this
    /// is an error, not a panic.
    pub fn init() -> Result<Self, HalError> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|source| HalError::Nvml {
            op: "init (is the NVIDIA driver installed?)",
            source,
        })?;
        Ok(Self { nvml })
    }

    fn sample_device(&self, index: u32) -> Result<GpuSample, HalError> {
        let nvml_err = |op| move |source| HalError::Nvml { op, source };
        let device = self
            .nvml
            .device_by_index(index)
            .map_err(nvml_err("device_by_index"))?;
        let memory = optional(device.memory_info()).map_err(nvml_err("memory_info"))?;
        Ok(GpuSample {
            index,
            name: device.name().map_err(nvml_err("name"))?,
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_free_bytes: memory.as_ref().map(|m| m.free),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            temperature_c: optional(device.temperature(TemperatureSensor::Gpu))
                .map_err(nvml_err("temperature"))?
                .map(f64::from),
            power_mw: optional(device.power_usage())
                .map_err(nvml_err("power_usage"))?
                .map(u64::from),
            utilization_pct: optional(device.utilization_rates())
                .map_err(nvml_err("utilization_rates"))?
                .map(|u| f64::from(u.gpu)),
            sm_clock_mhz: optional(device.clock_info(Clock::SM))
                .map_err(nvml_err("clock_info(SM)"))?,
            mem_clock_mhz: optional(device.clock_info(Clock::Memory))
                .map_err(nvml_err("clock_info(Memory)"))?,
            source: Self::SOURCE,
        })
    }
}

/// A reading this GPU does not offer (or this process may not see) is `None`; anything else
/// (the GPU fell off the bus, the driver is gone) is an error.
fn optional<T>(result: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(
            NvmlError::NotSupported
            | NvmlError::NoPermission
            | NvmlError::NotFound
            | NvmlError::NoData,
        ) => Ok(None),
        Err(e) => Err(e),
    }
}

impl GpuTelemetry for Nvml {
    fn sample(&self) -> Result<Vec<GpuSample>, HalError> {
        let count = self.nvml.device_count().map_err(|source| HalError::Nvml {
            op: "device_count",
            source,
        })?;
        (0..count).map(|i| self.sample_device(i)).collect()
    }

    fn name(&self) -> &str {
        Self::SOURCE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine with an NVIDIA driver this checks the real thing; on one without (CI), that
    /// the failure is a clean error naming NVML.
    #[test]
    fn init_is_an_error_not_a_panic_without_a_driver() {
        match Nvml::init() {
            Ok(nvml) => {
                let samples = nvml.sample().expect("NVML loaded, so sampling works");
                for s in &samples {
                    assert_eq!(s.source, "nvml");
                    assert!(s.memory_total_bytes.unwrap_or(0) > 0, "{s:?}");
                }
            }
            Err(e) => {
                let message = e.to_string();
                assert!(message.starts_with("NVML init"), "{message}");
            }
        }
    }
}
