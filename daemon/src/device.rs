//! Choosing the compute device (`--device auto|cpu|cuda[:N]`) and keeping compiled CUDA kernels.
//!
//! PTX for each kernel module is looked up, in order, in `$EDGELORA_KERNELS` (a folder written
//! by `edgelorad kernels build`, which the appliance image ships so a box needs no NVRTC at boot),
//! `/usr/lib/edgelora/kernels`, and the cache (`<cache>/kernels`); when none has it, NVRTC
//! compiles it and the result is written to the cache. File names carry a digest of the source,
//! architecture and compiler options, so an edited kernel is never served stale.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgelora_kernels::cuda::{
    CudaError, Gpu, KernelModule, MODULES, compile, driver_status, ptx_file_name,
};

/// What the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA when libcuda loads and a device answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!(
                    "unknown device {s:?}: expected auto, cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

/// The device chosen and why.
pub enum Device {
    Cpu { why: String },
    Cuda { gpu: Arc<Gpu>, why: String },
}

impl Device {
    pub fn why(&self) -> &str {
        match self {
            Device::Cpu { why } | Device::Cuda { why, .. } => why,
        }
    }
    pub fn name(&self) -> String {
        match self {
            Device::Cpu { .. } => "cpu".into(),
            Device::Cuda { gpu, .. } => {
                let i = gpu.info();
                format!("cuda:{} ({}, {})", i.ordinal, i.name, i.arch)
            }
        }
    }
}

/// Opens the device `spec` names. `auto` never fails: without a usable GPU it picks the CPU and
/// says why; an explicit `cuda` that cannot be opened is an error naming the reason.
pub fn open(spec: DeviceSpec) -> Result<Device, CudaError> {
    let device = match spec {
        DeviceSpec::Cpu => Device::Cpu {
            why: "--device cpu".into(),
        },
        DeviceSpec::Cuda(n) => {
            let gpu = Gpu::new(n, cached_ptx)?;
            Device::Cuda {
                gpu: Arc::new(gpu),
                why: format!("--device cuda:{n}"),
            }
        }
        DeviceSpec::Auto => match driver_status() {
            Err(e) => Device::Cpu {
                why: format!("auto: {e}"),
            },
            Ok(0) => Device::Cpu {
                why: "auto: the CUDA driver reports no device".into(),
            },
            Ok(_) => match Gpu::new(0, cached_ptx) {
                Ok(gpu) => Device::Cuda {
                    gpu: Arc::new(gpu),
                    why: "auto: CUDA device 0 answered".into(),
                },
                Err(e) => Device::Cpu {
                    why: format!("auto: CUDA device 0 unusable ({e})"),
                },
            },
        },
    };
    tracing::info!(device = %device.name(), why = device.why(), "compute device");
    Ok(device)
}

/// Folders searched for prebuilt PTX before the cache.
fn prebuilt_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("EDGELORA_KERNELS") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("/usr/lib/edgelora/kernels"));
    dirs
}

pub fn cache_dir() -> PathBuf {
    crate::default_model::cache_dir().join("kernels")
}

/// PTX for `module` on `arch`: prebuilt, cached, or compiled now and cached.
pub fn cached_ptx(module: &KernelModule, arch: &str) -> Result<String, CudaError> {
    let name = ptx_file_name(module, arch);
    for dir in prebuilt_dirs().into_iter().chain([cache_dir()]) {
        if let Ok(text) = std::fs::read_to_string(dir.join(&name)) {
            return Ok(text);
        }
    }
    let ptx = compile(module, arch)?;
    let dir = cache_dir();
    if let Err(e) = write_atomic(&dir, &name, &ptx) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not cache compiled kernels");
    }
    Ok(ptx)
}

/// Writes `dir/name` through a temporary file and a rename, so a reader never sees half a file.
fn write_atomic(dir: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// `edgelorad kernels build`: compiles every module for each architecture into `out`.
pub fn build_all(archs: &[String], out: &Path) -> Result<Vec<PathBuf>, CudaError> {
    let mut written = Vec::new();
    for arch in archs {
        if !arch.starts_with("sm_") || arch[3..].parse::<u32>().is_err() {
            return Err(CudaError::Shape(format!(
                "bad architecture {arch:?}: expected sm_NN such as sm_87 or sm_90"
            )));
        }
        for m in MODULES {
            let ptx = compile(m, arch)?;
            let path = write_atomic(out, &ptx_file_name(m, arch), &ptx).map_err(|e| {
                CudaError::MissingPtx {
                    module: m.name.into(),
                    arch: arch.clone(),
                    why: format!("writing {}: {e}", out.display()),
                }
            })?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_parses_and_rejects() {
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("unknown device"), "{bad}: {e}");
        }
    }

    #[test]
    fn auto_never_fails_and_explains() {
        let d = open(DeviceSpec::Auto).expect("auto must not fail");
        assert!(d.why().starts_with("auto:"), "{}", d.why());
        if driver_status().is_err() {
            assert!(matches!(d, Device::Cpu { .. }));
            // An explicit request for CUDA on a machine without it is an error, not a panic.
            let e = open(DeviceSpec::Cuda(0)).err().expect("no CUDA here");
            assert!(matches!(e, CudaError::NoDriver), "{e}");
        }
    }
}
