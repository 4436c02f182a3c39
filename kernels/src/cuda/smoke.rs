//! The toolchain smoke kernels (`smoke.cu`): NVRTC, PTX load, launch and copies end to end.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{CudaError, Gpu, KernelModule, blocks_for};

pub const MODULE: KernelModule = KernelModule {
    name: "smoke",
    source: include_str!("../../cuda/smoke.cu"),
    functions: &["axpy_f32", "f16_roundtrip"],
};

/// y = a·x + y on the device; returns the new y.
pub fn axpy(gpu: &Gpu, a: f32, x: &[f32], y: &[f32]) -> Result<Vec<f32>, CudaError> {
    if x.len() != y.len() {
        return Err(CudaError::Shape(format!(
            "axpy: x has {} elements, y {}",
            x.len(),
            y.len()
        )));
    }
    let s = gpu.stream();
    let dx = s.clone_htod(x)?;
    let mut dy = s.clone_htod(y)?;
    let n = x.len() as i32;
    let cfg = LaunchConfig {
        grid_dim: (blocks_for(x.len(), 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(MODULE.name, "axpy_f32")?;
    // SAFETY: argument types match the kernel's signature; n bounds every access.
    unsafe {
        s.launch_builder(f)
            .arg(&a)
            .arg(&dx)
            .arg(&mut dy)
            .arg(&n)
            .launch(cfg)?;
    }
    Ok(s.clone_dtoh(&dy)?)
}

/// Rounds each value to f16 and back on the device (checks the common header's conversions).
pub fn f16_roundtrip(gpu: &Gpu, x: &[f32]) -> Result<Vec<f32>, CudaError> {
    let s = gpu.stream();
    let dx = s.clone_htod(x)?;
    let mut dy = s.alloc_zeros::<f32>(x.len())?;
    let n = x.len() as i32;
    let cfg = LaunchConfig {
        grid_dim: (blocks_for(x.len(), 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(MODULE.name, "f16_roundtrip")?;
    // SAFETY: as above.
    unsafe {
        s.launch_builder(f)
            .arg(&dx)
            .arg(&mut dy)
            .arg(&n)
            .launch(cfg)?;
    }
    Ok(s.clone_dtoh(&dy)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::testing::gpu_or_skip;

    #[test]
    fn axpy_matches_cpu() {
        let Some(gpu) = gpu_or_skip("smoke::axpy_matches_cpu") else {
            return;
        };
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let y: Vec<f32> = (0..1000).map(|i| 3.0 - i as f32).collect();
        let got = axpy(&gpu, 2.0, &x, &y).unwrap();
        for i in 0..1000 {
            assert_eq!(got[i], 2.0f32.mul_add(x[i], y[i]), "element {i}");
        }
    }

    #[test]
    fn f16_roundtrip_matches_half_crate() {
        let Some(gpu) = gpu_or_skip("smoke::f16_roundtrip_matches_half_crate") else {
            return;
        };
        let x: Vec<f32> = (0..4096).map(|i| (i as f32 - 2048.0) * 0.0137).collect();
        let got = f16_roundtrip(&gpu, &x).unwrap();
        for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
            assert_eq!(g, half::f16::from_f32(v).to_f32(), "element {i}");
        }
    }
}
