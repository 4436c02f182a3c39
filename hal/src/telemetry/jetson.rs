//! Jetson backend: the integrated GPU has no NVML worth the name, so its readings come from the
//! files the L4T kernel exposes. All paths are relative to a root (`/` on a real board) so tests
//! run against a fake tree.
//!
//! | reading     | file (Orin, JetPack 5/6)                                          | unit            |
//! |-------------|-------------------------------------------------------------------|-----------------|
//! | GPU         | `/sys/class/devfreq/17000000.ga10b` (JP5) or `17000000.gpu` (JP6)  |                 |
//! | load        | `<devfreq>/device/load` (older boards: `/sys/devices/gpu.0/load`) | per mille       |
//! | SM clock    | `<devfreq>/cur_freq`                                              | Hz              |
//! | temperature | `/sys/class/thermal/thermal_zone*/temp` whose `type` is `GPU-therm` | milli-°C       |
//! | power       | `/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in<N>_label` naming the GPU, with `in<N>_input` and `curr<N>_input` | mV, mA |
//! | memory      | `/proc/meminfo` `MemTotal`, `MemAvailable` (CPU and GPU share it)   | KiB             |
//!
//! On Orin the GPU thermal zone refuses reads while the GPU is power-gated; that reads as no
//! temperature, not as an error.

use std::path::{Path, PathBuf};

use super::{GpuSample, GpuTelemetry};
use crate::HalError;
use crate::sysfs::{parse, read_optional, read_optional_number, read_trimmed, sorted_entries};

/// Device-tree names of the Tegra integrated GPUs (Orin, Xavier, TX2, Nano/TX1), and the generic
/// name newer device trees use.
const GPU_CHIPS: [&str; 5] = ["ga10b", "gv11b", "gp10b", "gm20b", "gpu"];

/// GPU telemetry from a Jetson board's sysfs and procfs files.
#[derive(Debug, Clone)]
pub struct JetsonSysfs {
    root: PathBuf,
    gpu_name: String,
    devfreq: PathBuf,
    load: Option<PathBuf>,
    temperature: Option<PathBuf>,
    power_rails: Vec<PowerRail>,
    meminfo: PathBuf,
}

/// One INA3221 channel that feeds the GPU.
#[derive(Debug, Clone)]
struct PowerRail {
    label: String,
    voltage_mv: PathBuf,
    current_ma: PathBuf,
}

impl JetsonSysfs {
    pub const SOURCE: &'static str = "jetson-sysfs";

    /// Finds the Jetson GPU's files under `root`. An error when there is no Tegra GPU devfreq
    /// node, which is the case on every machine that is not a Jetson.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, HalError> {
        let root = root.into();
        let devfreq_dir = root.join("sys/class/devfreq");
        let (devfreq, gpu_name) =
            find_gpu_devfreq(&devfreq_dir)?.ok_or_else(|| HalError::Missing {
                path: devfreq_dir.clone(),
                what: "a Jetson GPU devfreq node (ga10b, gv11b, gp10b, gm20b or gpu)",
            })?;
        let load = [
            devfreq.join("device/load"),
            root.join("sys/devices/gpu.0/load"),
            root.join("sys/devices/platform/gpu.0/load"),
        ]
        .into_iter()
        .find(|p| p.is_file());
        let temperature = find_gpu_thermal_zone(&root.join("sys/class/thermal"))?;
        let power_rails = find_gpu_power_rails(&root.join("sys/bus/i2c/drivers/ina3221"))?;
        Ok(Self {
            meminfo: root.join("proc/meminfo"),
            root,
            gpu_name,
            devfreq,
            load,
            temperature,
            power_rails,
        })
    }

    /// The root the files are read under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The GPU's device-tree name (`ga10b` on Orin).
    pub fn gpu_name(&self) -> &str {
        &self.gpu_name
    }

    /// Labels of the power rails counted as the GPU's power.
    pub fn power_rail_labels(&self) -> impl Iterator<Item = &str> {
        self.power_rails.iter().map(|r| r.label.as_str())
    }

    fn utilization_pct(&self) -> Result<Option<f64>, HalError> {
        let Some(path) = &self.load else {
            return Ok(None);
        };
        let per_mille: Option<u32> =
            read_optional_number(path, "GPU load in per mille (0 to 1000)")?;
        match per_mille {
            Some(v) if v > 1000 => Err(HalError::Parse {
                path: path.clone(),
                expected: "GPU load in per mille (0 to 1000)",
                found: v.to_string(),
            }),
            v => Ok(v.map(|v| f64::from(v) / 10.0)),
        }
    }

    fn sm_clock_mhz(&self) -> Result<Option<u32>, HalError> {
        let path = self.devfreq.join("cur_freq");
        let hz: Option<u64> = read_optional_number(&path, "a frequency in Hz")?;
        Ok(hz.map(|hz| u32::try_from((hz + 500_000) / 1_000_000).unwrap_or(u32::MAX)))
    }

    fn temperature_c(&self) -> Result<Option<f64>, HalError> {
        let Some(path) = &self.temperature else {
            return Ok(None);
        };
        let text = match read_trimmed(path) {
            Ok(text) => text,
            Err(HalError::Read { source, .. }) => {
                tracing::trace!(path = %path.display(), error = %source, "GPU thermal zone not readable (GPU power-gated?)");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let millidegrees: i64 = parse(path, &text, "a temperature in millidegrees Celsius")?;
        Ok(Some(millidegrees as f64 / 1000.0))
    }

    fn power_mw(&self) -> Result<Option<u64>, HalError> {
        if self.power_rails.is_empty() {
            return Ok(None);
        }
        let mut total_mw = 0u64;
        for rail in &self.power_rails {
            let mv: Option<u64> = read_optional_number(&rail.voltage_mv, "a voltage in mV")?;
            let ma: Option<u64> = read_optional_number(&rail.current_ma, "a current in mA")?;
            let (Some(mv), Some(ma)) = (mv, ma) else {
                return Ok(None);
            };
            total_mw += mv * ma / 1000;
        }
        Ok(Some(total_mw))
    }
}

impl GpuTelemetry for JetsonSysfs {
    fn sample(&self) -> Result<Vec<GpuSample>, HalError> {
        let memory = read_meminfo(&self.meminfo)?;
        Ok(vec![GpuSample {
            index: 0,
            name: self.gpu_name.clone(),
            memory_used_bytes: memory.map(|m| m.total_bytes.saturating_sub(m.available_bytes)),
            memory_free_bytes: memory.map(|m| m.available_bytes),
            memory_total_bytes: memory.map(|m| m.total_bytes),
            temperature_c: self.temperature_c()?,
            power_mw: self.power_mw()?,
            utilization_pct: self.utilization_pct()?,
            sm_clock_mhz: self.sm_clock_mhz()?,
            // The EMC clock is only in debugfs (root only); not worth a privileged read.
            mem_clock_mhz: None,
            source: Self::SOURCE,
        }])
    }

    fn name(&self) -> &str {
        Self::SOURCE
    }
}

/// The devfreq entry of the integrated GPU and the GPU's name. The chip name comes from the
/// device-tree node (`device/of_node/name`) when present, else from the entry's name
/// (`17000000.ga10b` → `ga10b`).
fn find_gpu_devfreq(dir: &Path) -> Result<Option<(PathBuf, String)>, HalError> {
    for entry in sorted_entries(dir)? {
        let path = dir.join(&entry);
        let of_name = read_optional(&path.join("device/of_node/name"))?;
        let chip = of_name.unwrap_or_else(|| {
            entry
                .rsplit_once('.')
                .map_or(entry.as_str(), |(_, chip)| chip)
                .to_owned()
        });
        if GPU_CHIPS.contains(&chip.to_ascii_lowercase().as_str()) {
            return Ok(Some((path, chip)));
        }
    }
    Ok(None)
}

/// The `temp` file of the first thermal zone whose type starts with "gpu" (`GPU-therm` on
/// Jetson, `gpu-thermal` on some device trees).
fn find_gpu_thermal_zone(dir: &Path) -> Result<Option<PathBuf>, HalError> {
    for entry in sorted_entries(dir)? {
        if !entry.starts_with("thermal_zone") {
            continue;
        }
        let zone = dir.join(&entry);
        if let Some(kind) = read_optional(&zone.join("type"))?
            && kind.to_ascii_lowercase().starts_with("gpu")
        {
            return Ok(Some(zone.join("temp")));
        }
    }
    Ok(None)
}

/// INA3221 channels whose label names the GPU (`VDD_GPU_SOC` on AGX Orin, `VDD_CPU_GPU_CV` on
/// Orin NX/Nano). Channels labelled `NC` are not connected and never match.
fn find_gpu_power_rails(driver_dir: &Path) -> Result<Vec<PowerRail>, HalError> {
    let mut rails = Vec::new();
    for device in sorted_entries(driver_dir)? {
        let hwmon_dir = driver_dir.join(&device).join("hwmon");
        for hwmon in sorted_entries(&hwmon_dir)? {
            let hwmon = hwmon_dir.join(hwmon);
            for file in sorted_entries(&hwmon)? {
                let Some(channel) = file
                    .strip_prefix("in")
                    .and_then(|rest| rest.strip_suffix("_label"))
                else {
                    continue;
                };
                let Some(label) = read_optional(&hwmon.join(&file))? else {
                    continue;
                };
                if label.to_ascii_uppercase().contains("GPU") {
                    rails.push(PowerRail {
                        voltage_mv: hwmon.join(format!("in{channel}_input")),
                        current_ma: hwmon.join(format!("curr{channel}_input")),
                        label,
                    });
                }
            }
        }
    }
    Ok(rails)
}

#[derive(Debug, Clone, Copy)]
struct MemInfo {
    total_bytes: u64,
    available_bytes: u64,
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo` (values in KiB, written "kB").
fn read_meminfo(path: &Path) -> Result<Option<MemInfo>, HalError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let mut total = None;
    let mut available = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        let kib = value
            .trim()
            .strip_suffix("kB")
            .map(str::trim)
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| HalError::Parse {
                path: path.to_path_buf(),
                expected: "\"<key>: <number> kB\"",
                found: line.to_owned(),
            })?;
        *slot = Some(kib * 1024);
    }
    Ok(match (total, available) {
        (Some(total_bytes), Some(available_bytes)) => Some(MemInfo {
            total_bytes,
            available_bytes,
        }),
        _ => None,
    })
}
