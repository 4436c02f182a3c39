//! Benchmark support on the device (`timing.cu`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{CudaError, Gpu, KernelModule};

pub const MODULE: KernelModule = KernelModule {
    name: "timing",
    source: include_str!("../../cuda/timing.cu"),
    functions: &["hold_ns"],
};

/// Queues a kernel that keeps the GPU's stream busy for `ns` nanoseconds. Benchmarks queue their
/// timed launches behind it, so the device runs them back to back however slowly the host issues
/// them, and CUDA events measure the device alone.
pub fn hold(gpu: &Gpu, ns: u64) -> Result<(), CudaError> {
    let s = gpu.stream();
    let ns = ns.min(i64::MAX as u64) as i64;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(MODULE.name, "hold_ns")?;
    // SAFETY: hold_ns(long long ns) reads no memory.
    unsafe {
        s.launch_builder(f).arg(&ns).launch(cfg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::testing::gpu_or_skip;

    /// The hold lasts at least what was asked (the global timer only moves forward).
    #[test]
    fn hold_keeps_the_stream_busy() {
        let Some(gpu) = gpu_or_skip("timing::hold_keeps_the_stream_busy") else {
            return;
        };
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let a = gpu.context().new_event(flags).unwrap();
        let b = gpu.context().new_event(flags).unwrap();
        a.record(gpu.stream()).unwrap();
        hold(&gpu, 3_000_000).unwrap();
        b.record(gpu.stream()).unwrap();
        let ms = a.elapsed_ms(&b).unwrap();
        assert!(ms >= 2.9, "held {ms} ms of 3");
    }
}
