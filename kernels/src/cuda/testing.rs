//! Test support for CUDA kernels: one shared [`Gpu`] per test process, or a clear skip.
//!
//! PTX comes from `EDGELORA_PTX_DIR` when it is set (files written by `edgelorad kernels build`,
//! which is how the tests run on a GPU machine without NVRTC), else from NVRTC. Set
//! `EDGELORA_REQUIRE_GPU=1` to turn a skip into a failure (the GPU runs do, so a broken setup
//! cannot pass as "skipped").

use std::sync::{Arc, OnceLock};

use super::{CudaError, Gpu, KernelModule, compile, ptx_file_name};

/// PTX for a module from `EDGELORA_PTX_DIR` if set, else compiled by NVRTC.
pub fn ptx_from_env(module: &KernelModule, arch: &str) -> Result<String, CudaError> {
    match std::env::var_os("EDGELORA_PTX_DIR") {
        Some(dir) => {
            let path = std::path::Path::new(&dir).join(ptx_file_name(module, arch));
            std::fs::read_to_string(&path).map_err(|e| CudaError::MissingPtx {
                module: module.name.to_string(),
                arch: arch.to_string(),
                why: format!("{}: {e}", path.display()),
            })
        }
        None => compile(module, arch),
    }
}

fn shared() -> &'static Result<Arc<Gpu>, String> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    GPU.get_or_init(|| {
        let ordinal = std::env::var("EDGELORA_CUDA_DEVICE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Gpu::new(ordinal, ptx_from_env)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
}

/// The shared GPU, or `None` after printing why the test named `test` is skipped.
pub fn gpu_or_skip(test: &str) -> Option<Arc<Gpu>> {
    match shared() {
        Ok(g) => Some(g.clone()),
        Err(why) => {
            if std::env::var_os("EDGELORA_REQUIRE_GPU").is_some_and(|v| v == "1") {
                panic!("{test}: EDGELORA_REQUIRE_GPU=1 but no GPU: {why}");
            }
            eprintln!("skipped {test}: no CUDA GPU ({why})");
            None
        }
    }
}

/// The deterministic xorshift generator behind the CUDA tests' random inputs.
pub struct TestRng(pub u64);

impl TestRng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.f32()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{MODULES, SHIPPED_ARCHS, compile, digest, nvrtc_available};

    /// CI installs NVRTC and sets EDGELORA_REQUIRE_NVRTC=1, so there this test really compiles
    /// every module for every shipped architecture; elsewhere it skips with a message.
    #[test]
    fn every_module_compiles_for_shipped_arches() {
        if !nvrtc_available() {
            if std::env::var_os("EDGELORA_REQUIRE_NVRTC").is_some_and(|v| v == "1") {
                panic!("EDGELORA_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded");
            }
            eprintln!("skipped every_module_compiles_for_shipped_arches: libnvrtc not found");
            return;
        }
        for m in MODULES {
            for arch in SHIPPED_ARCHS {
                let ptx = compile(m, arch).unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    ptx.contains(&format!(".target {arch}")),
                    "{} {arch}",
                    m.name
                );
                for f in m.functions {
                    assert!(
                        ptx.contains(&format!(".entry {f}(")),
                        "{}: kernel {f} missing from the PTX for {arch}",
                        m.name
                    );
                }
            }
        }
    }

    #[test]
    fn digest_depends_on_source_and_arch() {
        let m = MODULES[0];
        assert_ne!(digest(&m, "sm_87"), digest(&m, "sm_90"));
        let mut other = m;
        other.source = "extern \"C\" __global__ void x() {}";
        assert_ne!(digest(&m, "sm_87"), digest(&other, "sm_87"));
        assert_eq!(digest(&m, "sm_87"), digest(&m, "sm_87"));
    }
}
