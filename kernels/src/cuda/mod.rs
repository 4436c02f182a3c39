//! CUDA kernels: `.cu` sources in `kernels/cuda/` beside their Rust launchers here (cudarc 0.19).
//!
//! Sources are compiled to PTX by NVRTC for the device's architecture. This crate does no I/O, so
//! it only compiles ([`compile`]) and names the result ([`ptx_file_name`], which carries a digest
//! of the source, the architecture and the compiler options); the daemon keeps the on-disk cache
//! and `edgelorad kernels build` writes the same files ahead of time for boxes without NVRTC.
//!
//! Everything here works on a machine with no CUDA at all: [`driver_status`] and
//! [`nvrtc_available`] check for the shared libraries before cudarc touches them (cudarc's loaders
//! panic when a library is missing), and [`Gpu::new`] returns an error instead.

pub mod attention;
pub mod kv;
pub mod linear;
pub mod lora;
pub mod ops;
pub mod qact;
pub mod sample;
pub mod smoke;
pub mod testing;
pub mod timing;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// Prepended to every module's source (f16 conversions, warp reductions).
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// One `.cu` source and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

impl KernelModule {
    /// The text NVRTC compiles: the common header, then the module.
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n// ---- {}.cu ----\n{}", self.name, self.source)
    }
}

/// Every module the engine uses. `edgelorad kernels build` compiles exactly these.
pub const MODULES: &[KernelModule] = &[
    smoke::MODULE,
    linear::MODULE,
    attention::MODULE,
    ops::MODULE,
    qact::MODULE,
    lora::MODULE,
    sample::MODULE,
    timing::MODULE,
];

/// Architectures the appliance ships PTX for: Jetson Orin, A100, H100.
pub const SHIPPED_ARCHS: &[&str] = &["sm_87", "sm_80", "sm_90"];

/// NVRTC options used for every module (part of the cache digest).
const NVRTC_FLAGS: &[&str] = &["--std=c++17", "--fmad=true"];

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoDriver,
    #[error("no CUDA device {0}: the driver reports {1} device(s)")]
    NoDevice(usize, i32),
    #[error(
        "NVRTC is not available (libnvrtc could not be loaded); ship PTX built with `edgelorad kernels build`"
    )]
    NoNvrtc,
    #[error("NVRTC failed to compile {module} for {arch}:\n{log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    #[error("no PTX for module {module} ({arch}): {why}")]
    MissingPtx {
        module: String,
        arch: String,
        why: String,
    },
    #[error("unknown kernel {module}::{function}")]
    UnknownKernel { module: String, function: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Shape(String),
}

/// Whether libcuda can be loaded and how many devices it reports.
pub fn driver_status() -> Result<i32, CudaError> {
    // SAFETY: only tries to dlopen the library; no CUDA call is made when it is absent.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    Ok(CudaContext::device_count()?)
}

/// Whether libnvrtc can be loaded (compiling at run time is possible).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// A short digest of what determines a module's PTX: source, common header, arch, options.
pub fn digest(module: &KernelModule, arch: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(module.full_source().as_bytes());
    h.update(b"\0");
    h.update(arch.as_bytes());
    for f in NVRTC_FLAGS {
        h.update(b"\0");
        h.update(f.as_bytes());
    }
    h.finalize().to_hex()[..16].to_string()
}

/// The file name a module's PTX is stored under, in the cache and in AOT builds.
pub fn ptx_file_name(module: &KernelModule, arch: &str) -> String {
    format!("{}-{}-{}.ptx", module.name, arch, digest(module, arch))
}

/// Compiles one module to PTX text for `arch` (e.g. "sm_87").
pub fn compile(module: &KernelModule, arch: &str) -> Result<String, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    // cudarc wants a &'static str for the arch; the set of arches is tiny, so leaking is bounded.
    let arch_static: &'static str = match SHIPPED_ARCHS.iter().find(|a| **a == arch) {
        Some(a) => a,
        None => Box::leak(arch.to_string().into_boxed_str()),
    };
    let opts = CompileOptions {
        arch: Some(arch_static),
        options: NVRTC_FLAGS.iter().map(|s| s.to_string()).collect(),
        name: Some(format!("{}.cu", module.name)),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(module.full_source(), opts)
        .map(|p| p.to_src())
        .map_err(|e| CudaError::Compile {
            module: module.name.to_string(),
            arch: arch.to_string(),
            log: match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            },
        })
}

/// Facts about the device a [`Gpu`] runs on.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub arch: String,
    pub total_mem: usize,
}

/// One CUDA device with every module loaded and one compute stream.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    /// Loaded kernels by module, then function name (looked up on every launch).
    functions: HashMap<&'static str, HashMap<&'static str, CudaFunction>>,
    /// Split-K scratch of the INT4 GEMV (`linear::SPLITK_PART_FLOATS` partial sums, and
    /// `linear::SPLITK_TILES` arrival counters, zero between launches).
    splitk: (CudaSlice<f32>, CudaSlice<u32>),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` and loads every module, asking `ptx` for each module's PTX
    /// (from a cache, an AOT folder, or [`compile`]).
    pub fn new(
        ordinal: usize,
        mut ptx: impl FnMut(&KernelModule, &str) -> Result<String, CudaError>,
    ) -> Result<Self, CudaError> {
        let count = driver_status()?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice(ordinal, count));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name()?,
            arch: format!("sm_{major}{minor}"),
            total_mem: ctx.total_mem()?,
        };
        // One compute stream, and every buffer is used only on it: cudarc's per-argument event
        // tracking (for buffers shared across streams) would add host work to every launch.
        // SAFETY: no buffer of this context is used on two streams.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let mut functions = HashMap::new();
        for m in MODULES {
            let text = ptx(m, &info.arch)?;
            let module = ctx.load_module(Ptx::from_src(text))?;
            let by_name = functions.entry(m.name).or_insert_with(HashMap::new);
            for f in m.functions {
                by_name.insert(*f, module.load_function(f)?);
            }
        }
        let splitk = (
            stream.alloc_zeros::<f32>(linear::SPLITK_PART_FLOATS)?,
            stream.alloc_zeros::<u32>(linear::SPLITK_TILES)?,
        );
        Ok(Gpu {
            ctx,
            stream,
            info,
            functions,
            splitk,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every kernel of the engine runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The INT4 GEMV's split-K scratch: (partial sums, per-tile arrival counters). Only launches
    /// on [`Gpu::stream`] use it, one after another.
    pub(crate) fn splitk_scratch(&self) -> (&CudaSlice<f32>, &CudaSlice<u32>) {
        (&self.splitk.0, &self.splitk.1)
    }

    /// A loaded kernel by module and function name.
    pub fn function(&self, module: &str, function: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(module)
            .and_then(|m| m.get(function))
            .ok_or_else(|| CudaError::UnknownKernel {
                module: module.to_string(),
                function: function.to_string(),
            })
    }
}

/// A shape error (the launchers' common refusal).
pub(crate) fn shape(msg: String) -> CudaError {
    CudaError::Shape(msg)
}

/// `v` as a kernel's `int`, or a shape error naming `what`.
pub(crate) fn as_i32(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| shape(format!("{what} = {v} does not fit a kernel's int")))
}

/// Grid size for `n` items at `block` threads per block.
pub fn blocks_for(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).max(1) as u32
}
