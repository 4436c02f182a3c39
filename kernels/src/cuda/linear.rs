//! Linear layers on the GPU (`linear.cu`): INT4 / Q8 / f32 weights times f32 activations, and the
//! embedding gather.
//!
//! [`GpuWeight::upload`] repacks a [`Weight`] into the device layout described at the top of
//! `linear.cu`: each row padded to whole steps of [`STEP`] = 1024 columns (rows to a multiple of
//! four), and inside a step lane `L` of a warp owning columns `128·w + 4·L + e`, so that both the
//! weight loads (16 bytes per lane) and the activation loads (a float4 per lane) are coalesced.
//! Dequantization is bit-exact with the CPU reference (`(q - z)·d`, unfused `d·q + m`, `q·d`); only
//! the order of the f32 sums differs.
//!
//! Products with `m ≤ 8` activation rows run the GEMV kernel (every weight byte read once for all
//! rows; one instantiation per bound on m: 1, 2, 4, 8), up to [`GEMV_PASSES_MAX_M`] rows (more
//! when the GEMM grid would be small) as passes of 8, and larger `m` the tiled GEMM kernel.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};

use super::{CudaError, Gpu, KernelModule};
use crate::{DenseMatrix, Q4Kind, Q4Matrix, Q8Matrix, QK, TILE_ROWS, Weight};

pub const MODULE: KernelModule = KernelModule {
    name: "linear",
    source: include_str!("../../cuda/linear.cu"),
    functions: &[
        "gemv_q4zp_m1",
        "gemv_q4zp_m2",
        "gemv_q4zp_m4",
        "gemv_q4zp_m8",
        "gemv_q4af_m1",
        "gemv_q4af_m2",
        "gemv_q4af_m4",
        "gemv_q4af_m8",
        "gemv_q8_m1",
        "gemv_q8_m2",
        "gemv_q8_m4",
        "gemv_q8_m8",
        "gemv_f32_m1",
        "gemv_f32_m2",
        "gemv_f32_m4",
        "gemv_f32_m8",
        "gemm_q4zp",
        "gemm_q4af",
        "gemm_q8",
        "gemm_f32",
        "gather_q4zp",
        "gather_q4af",
        "gather_q8",
        "gather_f32",
    ],
};

/// Columns per step of the device layout (32 blocks of 32).
pub const STEP: usize = 1024;
/// Output rows per GEMV block (rows are padded to a multiple of this).
const GEMV_ROWS: usize = 4;
/// Warps per GEMV block (they split a row's steps).
const GEMV_WARPS: u32 = 4;
/// Activation rows one GEMV launch handles.
pub const GEMV_MAX_M: usize = 8;
/// Up to this many rows a product always runs as GEMV passes of [`GEMV_MAX_M`].
pub const GEMV_PASSES_MAX_M: usize = 32;
/// From this many rows on, the GEMM kernel runs whatever its grid; between the two, GEMV passes
/// run when the GEMM grid would cover less than half of the multiprocessors.
const GEMM_ALWAYS_M: usize = 96;
const GEMM_BM: usize = 64;
const GEMM_BN: usize = 128;
const GEMM_THREADS: u32 = 256;
const GATHER_THREADS: u32 = 256;

enum Store {
    /// Codes `[rowpad][S][32][4]` u32 and metadata `[rowpad][S][4][8]` u32 (`d | m << 16`).
    Q4 {
        kind: Q4Kind,
        qs: CudaSlice<u32>,
        dm: CudaSlice<u32>,
    },
    /// Codes `[rowpad][S][2][32][4]` u32 and scales `[rowpad][S][4][8]` u16.
    Q8 {
        qs: CudaSlice<u32>,
        d: CudaSlice<u16>,
    },
    /// Row-major `[rowpad][S·1024]`.
    F32 { w: CudaSlice<f32> },
}

/// A projection's weight on the device, in the format it was loaded in.
pub struct GpuWeight {
    rows: usize,
    cols: usize,
    steps: usize,
    /// Multiprocessors of the device it lives on (picks GEMV passes or GEMM).
    sms: usize,
    store: Store,
}

impl std::fmt::Debug for GpuWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuWeight")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("format", &self.format_name())
            .finish()
    }
}

/// Steps of [`STEP`] columns for `cols` columns.
fn steps_for(cols: usize) -> usize {
    cols.div_ceil(STEP)
}

/// Rows as stored on the device.
fn rows_padded(rows: usize) -> usize {
    rows.div_ceil(GEMV_ROWS) * GEMV_ROWS
}

/// Where column `c` of a row lives: (u32 word within the row's INT4 codes, bit shift).
fn q4_pos(c: usize) -> (usize, u32) {
    let (s, kk) = (c / STEP, c % STEP);
    let (w, l, e) = (kk / 128, (kk % 128) / 4, kk % 4);
    (s * 128 + l * 4 + w / 2, (4 * ((w % 2) * 4 + e)) as u32)
}

/// Where column `c` of a row lives: (u32 word within the row's Q8 codes, bit shift).
fn q8_pos(c: usize) -> (usize, u32) {
    let (s, kk) = (c / STEP, c % STEP);
    let (w, l, e) = (kk / 128, (kk % 128) / 4, kk % 4);
    (s * 256 + (w / 4) * 128 + l * 4 + w % 4, (8 * e) as u32)
}

/// Index of block `b` of a row within the row's metadata (`[S][4][8]`).
fn meta_index(b: usize) -> usize {
    let (s, bi) = (b / 32, b % 32);
    s * 32 + (bi % 4) * 8 + bi / 4
}

/// Runs `f(first_row, rows_chunk_a, rows_chunk_b)` over chunks of whole 8-row groups in parallel;
/// `a` holds `per_a` and `b` holds `per_b` elements per row.
fn par_row_groups<A: Send, B: Send>(
    a: &mut [A],
    per_a: usize,
    b: &mut [B],
    per_b: usize,
    rows: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let groups = rows.div_ceil(TILE_ROWS);
    let rows_per = groups.div_ceil(threads).max(1) * TILE_ROWS;
    std::thread::scope(|scope| {
        for (ci, (ca, cb)) in a
            .chunks_mut(rows_per * per_a)
            .zip(b.chunks_mut(rows_per * per_b))
            .enumerate()
        {
            let f = &f;
            scope.spawn(move || f(ci * rows_per, ca, cb));
        }
    });
}

/// INT4 codes and metadata in the device layout.
fn pack_q4(q: &Q4Matrix) -> (Vec<u32>, Vec<u32>) {
    let (rows, s) = (q.rows(), steps_for(q.cols()));
    let (per_q, per_m) = (s * 128, s * 32);
    let np = rows_padded(rows);
    let mut qs = vec![0u32; np * per_q];
    let mut dm = vec![0u32; np * per_m];
    par_row_groups(&mut qs, per_q, &mut dm, per_m, rows, |n0, qs, dm| {
        let local_rows = (qs.len() / per_q).min(rows.saturating_sub(n0));
        for g in (0..local_rows).step_by(TILE_ROWS) {
            for (b, t) in q.group_tiles((n0 + g) / TILE_ROWS).iter().enumerate() {
                for r in 0..TILE_ROWS.min(local_rows - g) {
                    let n = g + r;
                    dm[n * per_m + meta_index(b)] = t.d[r] as u32 | (t.m[r] as u32) << 16;
                    let row = &mut qs[n * per_q..(n + 1) * per_q];
                    for k in 0..QK {
                        let (wi, shift) = q4_pos(b * QK + k);
                        row[wi] |= (t.code(r, k) as u32) << shift;
                    }
                }
            }
        }
    });
    (qs, dm)
}

/// Q8 codes and scales in the device layout.
fn pack_q8(q: &Q8Matrix) -> (Vec<u32>, Vec<u16>) {
    let (rows, s) = (q.rows(), steps_for(q.cols()));
    let (per_q, per_m) = (s * 256, s * 32);
    let np = rows_padded(rows);
    let mut qs = vec![0u32; np * per_q];
    let mut d = vec![0u16; np * per_m];
    par_row_groups(&mut qs, per_q, &mut d, per_m, rows, |n0, qs, d| {
        let local_rows = (qs.len() / per_q).min(rows.saturating_sub(n0));
        for g in (0..local_rows).step_by(TILE_ROWS) {
            for (b, t) in q.group_tiles((n0 + g) / TILE_ROWS).iter().enumerate() {
                for r in 0..TILE_ROWS.min(local_rows - g) {
                    let n = g + r;
                    d[n * per_m + meta_index(b)] = t.d[r];
                    let row = &mut qs[n * per_q..(n + 1) * per_q];
                    for k in 0..QK {
                        let (wi, shift) = q8_pos(b * QK + k);
                        row[wi] |= (t.q(r, k) as u8 as u32) << shift;
                    }
                }
            }
        }
    });
    (qs, d)
}

/// f32 rows padded to whole steps.
fn pack_f32(w: &DenseMatrix) -> Vec<f32> {
    let (rows, cols) = (w.rows(), w.cols());
    let kp = steps_for(cols) * STEP;
    let mut out = vec![0f32; rows_padded(rows) * kp];
    for n in 0..rows {
        out[n * kp..n * kp + cols].copy_from_slice(w.row(n));
    }
    out
}

fn shape(msg: String) -> CudaError {
    CudaError::Shape(msg)
}

/// `v` as a kernel's `int`, or a shape error naming `what`.
fn as_i32(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| shape(format!("{what} = {v} does not fit a kernel's int")))
}

impl GpuWeight {
    /// Repacks and copies a weight to the device (enqueued on the GPU's stream).
    pub fn upload(gpu: &Gpu, w: &Weight) -> Result<Self, CudaError> {
        let (rows, cols) = (w.rows(), w.cols());
        let steps = steps_for(cols);
        let s = gpu.stream();
        // Every device index must fit the kernels' arithmetic: element offsets up to
        // rowpad · S · 1024 (f32) stay below 2^32 / 4 words... checked generously here.
        let elems = rows_padded(rows)
            .checked_mul(steps * STEP)
            .ok_or_else(|| shape(format!("weight [{rows}, {cols}] is too large")))?;
        if elems > (1usize << 40) || rows == 0 || cols == 0 {
            return Err(shape(format!("weight [{rows}, {cols}] is not supported")));
        }
        as_i32(rows, "weight rows")?;
        as_i32(steps * STEP, "padded weight columns")?;
        let store = match w {
            Weight::Q4(q) => {
                let (qs, dm) = pack_q4(q);
                Store::Q4 {
                    kind: q.kind(),
                    qs: s.clone_htod(&qs)?,
                    dm: s.clone_htod(&dm)?,
                }
            }
            Weight::Q8(q) => {
                let (qs, d) = pack_q8(q);
                Store::Q8 {
                    qs: s.clone_htod(&qs)?,
                    d: s.clone_htod(&d)?,
                }
            }
            Weight::F32(d) => Store::F32 {
                w: s.clone_htod(&pack_f32(d))?,
            },
        };
        let sms = gpu
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_or(1, |n| n.max(1) as usize);
        Ok(Self {
            rows,
            cols,
            steps,
            sms,
            store,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Device bytes a product reads (the padded layout).
    pub fn nbytes(&self) -> usize {
        match &self.store {
            Store::Q4 { qs, dm, .. } => qs.num_bytes() + dm.num_bytes(),
            Store::Q8 { qs, d } => qs.num_bytes() + d.num_bytes(),
            Store::F32 { w } => w.num_bytes(),
        }
    }

    pub fn format_name(&self) -> &'static str {
        match &self.store {
            Store::Q4 {
                kind: Q4Kind::ZeroPoint,
                ..
            } => "int4",
            Store::Q4 { .. } => "int4-affine",
            Store::Q8 { .. } => "q8",
            Store::F32 { .. } => "f32",
        }
    }

    fn kernel_suffix(&self) -> &'static str {
        match &self.store {
            Store::Q4 {
                kind: Q4Kind::ZeroPoint,
                ..
            } => "q4zp",
            Store::Q4 { .. } => "q4af",
            Store::Q8 { .. } => "q8",
            Store::F32 { .. } => "f32",
        }
    }

    /// `out[m × rows] = x[m × cols] · Wᵀ` (the first `m·cols` / `m·rows` elements of the views).
    /// Overwrites `out`.
    pub fn matmul(
        &self,
        gpu: &Gpu,
        x: &CudaView<'_, f32>,
        m: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let (rows, cols) = (self.rows, self.cols);
        if x.len() < m * cols || out.len() < m * rows {
            return Err(shape(format!(
                "matmul: W [{rows}, {cols}] with m = {m} needs x ≥ {} and out ≥ {} elements, got {} and {}",
                m * cols,
                m * rows,
                x.len(),
                out.len()
            )));
        }
        as_i32(m * cols, "m · cols")?;
        as_i32(m * rows, "m · rows")?;
        if m == 0 {
            return Ok(());
        }
        // GEMV passes re-read the weights every 8 rows (about 9-12 TFLOP/s on an H100 at 8 rows);
        // the GEMM (about 25 TFLOP/s with a full grid) has one block per 64 × 128 outputs, too few
        // for moderate m on a narrow matrix. Measured on an H100, [out, in]: [4096, 4096] at
        // m = 64 took 239 us as passes vs 357 us as a 32-block GEMM; [14336, 4096] at m = 64 took
        // 727 us as passes vs 376 us as a 112-block GEMM; at m = 128 the GEMM wins on both.
        let gemm_blocks = self.rows.div_ceil(GEMM_BN) * m.div_ceil(GEMM_BM);
        let passes = m <= GEMV_PASSES_MAX_M || (m < GEMM_ALWAYS_M && 2 * gemm_blocks < self.sms);
        if passes {
            let mut r0 = 0;
            while r0 < m {
                let mm = GEMV_MAX_M.min(m - r0);
                let xs = x.slice(r0 * cols..(r0 + mm) * cols);
                let mut os = out.slice_mut(r0 * rows..(r0 + mm) * rows);
                self.gemv(gpu, &xs, mm, &mut os)?;
                r0 += mm;
            }
            Ok(())
        } else {
            self.gemm(gpu, x, m, out)
        }
    }

    /// One GEMV launch for `m ≤ 8` rows (shapes already checked).
    fn gemv(
        &self,
        gpu: &Gpu,
        x: &CudaView<'_, f32>,
        m: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        debug_assert!((1..=GEMV_MAX_M).contains(&m));
        let s = gpu.stream();
        let (n, k, st, mi) = (
            self.rows as i32,
            self.cols as i32,
            self.steps as i32,
            m as i32,
        );
        let aligned = {
            let (ptr, _sync) = x.device_ptr(s);
            ptr % 16 == 0
        };
        let xvec: i32 = (aligned && self.cols.is_multiple_of(4)) as i32;
        let cfg = LaunchConfig {
            grid_dim: ((rows_padded(self.rows) / GEMV_ROWS) as u32, 1, 1),
            block_dim: (GEMV_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let bound = match m {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => 8,
        };
        let f = gpu.function(
            MODULE.name,
            &format!("gemv_{}_m{bound}", self.kernel_suffix()),
        )?;
        // SAFETY: the kernel reads rowpad·S steps of the weight buffers (their exact sizes),
        // x[r·K + k] for r < m, k < K, and writes out[r·N + n] for r < m, n < N; m·K ≤ x.len()
        // and m·N ≤ out.len() were checked. Argument order and types follow the kernels:
        // (qs, meta, x, out, N, K, S, m, xvec) or (w, x, out, N, K, S, m, xvec).
        unsafe {
            let mut b = s.launch_builder(f);
            match &self.store {
                Store::Q4 { qs, dm, .. } => {
                    b.arg(qs).arg(dm);
                }
                Store::Q8 { qs, d } => {
                    b.arg(qs).arg(d);
                }
                Store::F32 { w } => {
                    b.arg(w);
                }
            }
            b.arg(x)
                .arg(out)
                .arg(&n)
                .arg(&k)
                .arg(&st)
                .arg(&mi)
                .arg(&xvec)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// The tiled GEMM (shapes already checked).
    fn gemm(
        &self,
        gpu: &Gpu,
        x: &CudaView<'_, f32>,
        m: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let s = gpu.stream();
        let (n, k, st, mi) = (
            self.rows as i32,
            self.cols as i32,
            self.steps as i32,
            m as i32,
        );
        let grid_y = m.div_ceil(GEMM_BM);
        if grid_y > 65_535 {
            return Err(shape(format!(
                "matmul: m = {m} rows is too many for one GEMM"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (self.rows.div_ceil(GEMM_BN) as u32, grid_y as u32, 1),
            block_dim: (GEMM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(MODULE.name, &format!("gemm_{}", self.kernel_suffix()))?;
        // SAFETY: weight reads stay in rows < N and blocks < ceil(K/32) ≤ S·32; x reads are
        // guarded by row < m and k < K, out writes by row < m and col < N; sizes checked by the
        // caller. Argument order: (qs, meta, x, out, N, K, S, m) or (w, x, out, N, K, S, m).
        unsafe {
            let mut b = s.launch_builder(f);
            match &self.store {
                Store::Q4 { qs, dm, .. } => {
                    b.arg(qs).arg(dm);
                }
                Store::Q8 { qs, d } => {
                    b.arg(qs).arg(d);
                }
                Store::F32 { w } => {
                    b.arg(w);
                }
            }
            b.arg(x)
                .arg(out)
                .arg(&n)
                .arg(&k)
                .arg(&st)
                .arg(&mi)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// `out[i × cols]` = dequantized row `ids[i]` for `i < n` (embedding gather). An id past the
    /// last row gives a row of zeros (the ids live on the device, so they cannot be checked here).
    pub fn gather_rows(
        &self,
        gpu: &Gpu,
        ids: &CudaView<'_, u32>,
        n: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let cols = self.cols;
        if ids.len() < n || out.len() < n * cols {
            return Err(shape(format!(
                "gather_rows: {n} rows of {cols} need ids ≥ {n} and out ≥ {} elements, got {} and {}",
                n * cols,
                ids.len(),
                out.len()
            )));
        }
        as_i32(n * cols, "n · cols")?;
        if n == 0 {
            return Ok(());
        }
        let s = gpu.stream();
        let (nr, k, st) = (self.rows as i32, self.cols as i32, self.steps as i32);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (GATHER_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(MODULE.name, &format!("gather_{}", self.kernel_suffix()))?;
        // SAFETY: block i reads ids[i] (i < n ≤ ids.len()), weight row ids[i] only when it is
        // < N, and writes out[i·K .. (i+1)·K] (n·K ≤ out.len()). Argument order:
        // (qs, meta, ids, out, N, K, S) or (w, ids, out, N, K, S).
        unsafe {
            let mut b = s.launch_builder(f);
            match &self.store {
                Store::Q4 { qs, dm, .. } => {
                    b.arg(qs).arg(dm);
                }
                Store::Q8 { qs, d } => {
                    b.arg(qs).arg(d);
                }
                Store::F32 { w } => {
                    b.arg(w);
                }
            }
            b.arg(ids).arg(out).arg(&nr).arg(&k).arg(&st).launch(cfg)?;
        }
        Ok(())
    }
}

/// Device-to-device copy bandwidth: `iters` copies of `bytes`, timed with CUDA events. Returns
/// GB/s counting the bytes read and written (2 · bytes per copy).
pub fn copy_bandwidth_probe(gpu: &Gpu, bytes: usize, iters: usize) -> Result<f64, CudaError> {
    if bytes == 0 || iters == 0 {
        return Err(shape(
            "copy_bandwidth_probe: bytes and iters must be positive".into(),
        ));
    }
    let s = gpu.stream();
    let src = s.alloc_zeros::<u8>(bytes)?;
    let mut dst = s.alloc_zeros::<u8>(bytes)?;
    s.memcpy_dtod(&src, &mut dst)?; // warm-up
    let ms = timed(gpu, iters, || Ok(s.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * bytes as f64 * iters as f64 / (ms as f64 * 1e-3) / 1e9)
}

/// Mean seconds per [`GpuWeight::matmul`] with `m` rows (one warm-up call, then `iters` timed with
/// CUDA events; activations are zeros, which costs the same as any data).
pub fn time_matmul(gpu: &Gpu, w: &GpuWeight, m: usize, iters: usize) -> Result<f64, CudaError> {
    if m == 0 || iters == 0 {
        return Err(shape("time_matmul: m and iters must be positive".into()));
    }
    let s = gpu.stream();
    let x = s.alloc_zeros::<f32>(m * w.cols())?;
    let mut out = s.alloc_zeros::<f32>(m * w.rows())?;
    w.matmul(gpu, &x.as_view(), m, &mut out.as_view_mut())?;
    let ms = timed(gpu, iters, || {
        w.matmul(gpu, &x.as_view(), m, &mut out.as_view_mut())
    })?;
    Ok(ms as f64 * 1e-3 / iters as f64)
}

/// Milliseconds for `iters` calls of `f` on the GPU's stream, between two timing events.
fn timed(
    gpu: &Gpu,
    iters: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f32, CudaError> {
    use cudarc::driver::sys::CUevent_flags;
    let s = gpu.stream();
    let start = gpu
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = gpu
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(s)?;
    for _ in 0..iters {
        f()?;
    }
    end.record(s)?;
    Ok(start.elapsed_ms(&end)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::testing::gpu_or_skip;
    use crate::{BlockQ4, BlockQ8};

    /// xorshift64*: deterministic test data without a dependency.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [-1, 1).
        pub(crate) fn f32(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
    }

    /// An INT4 matrix of either kind with random codes and metadata (scales around 0.01–0.05,
    /// zero points 0..16 or offsets around -0.2..0.2).
    fn random_q4(rows: usize, cols: usize, kind: Q4Kind, rng: &mut Rng) -> Q4Matrix {
        let bpr = cols.div_ceil(QK);
        let blocks = (0..rows * bpr)
            .map(|_| {
                let mut b = BlockQ4 {
                    d: half::f16::from_f32(0.01 + 0.04 * rng.f32().abs()).to_bits(),
                    m: match kind {
                        Q4Kind::ZeroPoint => rng.below(16) as u16,
                        Q4Kind::Affine => half::f16::from_f32(0.2 * rng.f32()).to_bits(),
                    },
                    qs: [0; 16],
                };
                for j in 0..QK {
                    b.set_code(j, rng.below(16) as u8);
                }
                b
            })
            .collect();
        Q4Matrix::from_blocks(rows, cols, kind, blocks).unwrap()
    }

    fn random_q8(rows: usize, cols: usize, rng: &mut Rng) -> Q8Matrix {
        let bpr = cols.div_ceil(QK);
        let blocks = (0..rows * bpr)
            .map(|_| BlockQ8 {
                d: half::f16::from_f32(0.001 + 0.004 * rng.f32().abs()).to_bits(),
                qs: std::array::from_fn(|_| (rng.below(255) as i32 - 127) as i8),
            })
            .collect();
        Q8Matrix::from_blocks(rows, cols, blocks).unwrap()
    }

    fn random_f32(rows: usize, cols: usize, rng: &mut Rng) -> DenseMatrix {
        DenseMatrix::new(
            rows,
            cols,
            (0..rows * cols).map(|_| 0.1 * rng.f32()).collect(),
        )
        .unwrap()
    }

    /// Every format of a `[rows, cols]` weight: INT4 zero point, INT4 affine, Q8, f32.
    fn all_formats(rows: usize, cols: usize, rng: &mut Rng) -> Vec<Weight> {
        vec![
            Weight::Q4(random_q4(rows, cols, Q4Kind::ZeroPoint, rng)),
            Weight::Q4(random_q4(rows, cols, Q4Kind::Affine, rng)),
            Weight::Q8(random_q8(rows, cols, rng)),
            Weight::F32(random_f32(rows, cols, rng)),
        ]
    }

    fn dequantized(w: &Weight) -> Vec<f32> {
        let (rows, cols) = (w.rows(), w.cols());
        let mut out = vec![0f32; rows * cols];
        for n in 0..rows {
            w.dequantize_row(n, &mut out[n * cols..(n + 1) * cols]);
        }
        out
    }

    fn reference(w: &Weight, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * w.rows()];
        match w {
            Weight::F32(d) => d.matmul_reference(x, m, &mut out),
            Weight::Q4(q) => q.matmul_reference(x, m, &mut out),
            Weight::Q8(q) => q.matmul_reference(x, m, &mut out),
        }
        out
    }

    /// A weight packed for the device, kept on the host.
    enum Packed {
        Q4(Q4Kind, Vec<u32>, Vec<u32>),
        Q8(Vec<u32>, Vec<u16>),
        F32(Vec<f32>),
    }

    fn pack(w: &Weight) -> Packed {
        match w {
            Weight::Q4(q) => {
                let (qs, dm) = pack_q4(q);
                Packed::Q4(q.kind(), qs, dm)
            }
            Weight::Q8(q) => {
                let (qs, d) = pack_q8(q);
                Packed::Q8(qs, d)
            }
            Weight::F32(d) => Packed::F32(pack_f32(d)),
        }
    }

    /// Host mirror of the gather kernel's `deq_at`: the dequantized weight at (n, c) read back
    /// from the packed device layout, with the kernel's index arithmetic.
    fn layout_at(p: &Packed, s_count: usize, n: usize, c: usize) -> f32 {
        let (s, kk) = (c >> 10, c & 1023);
        let (wi, l, e) = (kk >> 7, (kk & 127) >> 2, kk & 3);
        let g = l >> 3;
        let rs = n * s_count + s;
        match p {
            Packed::Q4(kind, qs, dm) => {
                let word = qs[(rs * 32 + l) * 4 + (wi >> 1)];
                let code = (word >> ((wi & 1) * 16 + 4 * e)) & 0xF;
                let meta = dm[(rs * 4 + g) * 8 + wi];
                let d = half::f16::from_bits(meta as u16).to_f32();
                match kind {
                    Q4Kind::ZeroPoint => (code as i32 - (meta >> 16) as i32) as f32 * d,
                    Q4Kind::Affine => {
                        d * code as f32 + half::f16::from_bits((meta >> 16) as u16).to_f32()
                    }
                }
            }
            Packed::Q8(qs, d) => {
                let word = qs[((rs * 2 + (wi >> 2)) * 32 + l) * 4 + (wi & 3)];
                let v = (word >> (8 * e)) as u8 as i8;
                v as f32 * half::f16::from_bits(d[(rs * 4 + g) * 8 + wi]).to_f32()
            }
            Packed::F32(w) => w[n * s_count * STEP + c],
        }
    }

    /// Runs on the CPU: the packed layouts, read back with the kernels' index arithmetic, give the
    /// CPU dequantization bit for bit (catches a packing / indexing mismatch without a GPU).
    #[test]
    fn packed_layouts_read_back_as_the_cpu_dequantization() {
        let mut rng = Rng::new(11);
        for (rows, cols) in [(5, 40), (9, 1100), (3, 2048), (17, 3000)] {
            for w in all_formats(rows, cols, &mut rng) {
                let dq = dequantized(&w);
                let p = pack(&w);
                for n in 0..rows {
                    for c in 0..cols {
                        assert_eq!(
                            layout_at(&p, steps_for(cols), n, c).to_bits(),
                            dq[n * cols + c].to_bits(),
                            "{} [{rows}, {cols}] row {n} col {c}",
                            w.format_name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packing_fills_every_code_slot_exactly_once() {
        // Every (column in a padded row) maps to a distinct (word, shift) slot.
        let mut seen = std::collections::HashSet::new();
        for c in 0..2 * STEP {
            assert!(seen.insert(q4_pos(c)), "q4 slot of column {c} reused");
        }
        assert_eq!(seen.len(), 2 * STEP);
        let mut seen = std::collections::HashSet::new();
        for c in 0..2 * STEP {
            assert!(seen.insert(q8_pos(c)), "q8 slot of column {c} reused");
        }
        let mut seen = std::collections::HashSet::new();
        for b in 0..64 {
            assert!(seen.insert(meta_index(b)));
        }
    }

    /// GPU vs CPU tolerance for a product: |got - want| ≤ 2e-5 · Σ_k |w_k x_k| + 1e-6.
    /// Both sides round the same dequantized weights and differ only in the order of the f32
    /// sums; the error of an f32 sum of K terms is bounded by ≈ log2(K)·2^-24·Σ|terms| for the
    /// tree-ish orders used here (≤ 1e-6 relative for K ≤ 8192), so 2e-5 leaves a wide margin
    /// while a wrong weight or a missed block (≥ 1/K of the sum, > 1e-4) still fails.
    fn check_product(label: &str, w: &Weight, x: &[f32], m: usize, got: &[f32]) {
        let want = reference(w, x, m);
        let dq = dequantized(w);
        let (rows, cols) = (w.rows(), w.cols());
        for r in 0..m {
            for n in 0..rows {
                let scale: f64 = (0..cols)
                    .map(|k| (dq[n * cols + k] as f64 * x[r * cols + k] as f64).abs())
                    .sum();
                let (g, v) = (got[r * rows + n], want[r * rows + n]);
                assert!(
                    (g - v).abs() as f64 <= 2e-5 * scale + 1e-6,
                    "{label}: row {r} out {n}: gpu {g} cpu {v} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn matmul_matches_the_cpu_reference_for_every_format_and_m() {
        let Some(gpu) =
            gpu_or_skip("linear::matmul_matches_the_cpu_reference_for_every_format_and_m")
        else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng::new(1);
        // Partial blocks (cols % 32), partial steps (cols % 1024), cols % 4 != 0 (scalar x
        // path), rows not a multiple of 4 or 8, a partial GEMM tile in both directions.
        let shapes = [
            (13, 70),
            (37, 1100),
            (130, 4096),
            (64, 2050),
            (9, 33),
            (257, 8192),
        ];
        for &(rows, cols) in &shapes {
            for w in all_formats(rows, cols, &mut rng) {
                let gw = GpuWeight::upload(&gpu, &w).unwrap();
                assert_eq!((gw.rows(), gw.cols()), (rows, cols));
                for m in [1usize, 2, 3, 5, 8, 17, 64, 70, 200] {
                    if cols == 8192 && m > 17 {
                        continue; // keep the CPU reference quick
                    }
                    let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
                    let dx = s.clone_htod(&x).unwrap();
                    // Poisoned output: every element must be overwritten.
                    let mut dout = s.clone_htod(&vec![f32::NAN; m * rows]).unwrap();
                    gw.matmul(&gpu, &dx.as_view(), m, &mut dout.as_view_mut())
                        .unwrap();
                    let got = s.clone_dtoh(&dout).unwrap();
                    let label = format!("{} [{rows}, {cols}] m={m}", w.format_name());
                    check_product(&label, &w, &x, m, &got);
                }
            }
        }
    }

    #[test]
    fn matmul_reads_offset_views_and_leaves_the_rest_alone() {
        let Some(gpu) = gpu_or_skip("linear::matmul_reads_offset_views_and_leaves_the_rest_alone")
        else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng::new(2);
        let (rows, cols, m) = (21, 96, 3);
        for w in all_formats(rows, cols, &mut rng) {
            let gw = GpuWeight::upload(&gpu, &w).unwrap();
            // x starts one element into its buffer (not 16-byte aligned: the scalar path).
            let x: Vec<f32> = (0..m * cols + 1).map(|_| rng.f32()).collect();
            let dx = s.clone_htod(&x).unwrap();
            let mut dout = s.clone_htod(&vec![7.0f32; m * rows + 5]).unwrap();
            {
                let xv = dx.slice(1..);
                let mut ov = dout.slice_mut(2..2 + m * rows);
                gw.matmul(&gpu, &xv, m, &mut ov).unwrap();
            }
            let got = s.clone_dtoh(&dout).unwrap();
            assert_eq!(&got[..2], &[7.0, 7.0]);
            assert_eq!(&got[2 + m * rows..], &[7.0, 7.0, 7.0]);
            check_product(w.format_name(), &w, &x[1..], m, &got[2..2 + m * rows]);
        }
    }

    #[test]
    fn matmul_rejects_short_buffers() {
        let Some(gpu) = gpu_or_skip("linear::matmul_rejects_short_buffers") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng::new(3);
        let w = Weight::F32(random_f32(8, 32, &mut rng));
        let gw = GpuWeight::upload(&gpu, &w).unwrap();
        let x = s.alloc_zeros::<f32>(2 * 32 - 1).unwrap();
        let mut out = s.alloc_zeros::<f32>(16).unwrap();
        assert!(matches!(
            gw.matmul(&gpu, &x.as_view(), 2, &mut out.as_view_mut()),
            Err(CudaError::Shape(_))
        ));
    }

    #[test]
    fn gather_rows_equals_the_dequantized_rows() {
        let Some(gpu) = gpu_or_skip("linear::gather_rows_equals_the_dequantized_rows") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng::new(4);
        for (rows, cols) in [(50, 70), (11, 2100), (300, 64)] {
            for w in all_formats(rows, cols, &mut rng) {
                let gw = GpuWeight::upload(&gpu, &w).unwrap();
                let dq = dequantized(&w);
                let ids: Vec<u32> = vec![0, (rows - 1) as u32, 3, 3, rows as u32 + 7, 1];
                let dids = s.clone_htod(&ids).unwrap();
                let mut dout = s.clone_htod(&vec![f32::NAN; ids.len() * cols]).unwrap();
                gw.gather_rows(&gpu, &dids.as_view(), ids.len(), &mut dout.as_view_mut())
                    .unwrap();
                let got = s.clone_dtoh(&dout).unwrap();
                for (i, &id) in ids.iter().enumerate() {
                    for c in 0..cols {
                        let want = if (id as usize) < rows {
                            dq[id as usize * cols + c]
                        } else {
                            0.0
                        };
                        assert_eq!(
                            got[i * cols + c].to_bits(),
                            want.to_bits(),
                            "{} [{rows}, {cols}] id {id} col {c}",
                            w.format_name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn probes_report_positive_numbers() {
        let Some(gpu) = gpu_or_skip("linear::probes_report_positive_numbers") else {
            return;
        };
        let bw = copy_bandwidth_probe(&gpu, 64 << 20, 5).unwrap();
        assert!(bw > 1.0, "{bw} GB/s");
        let mut rng = Rng::new(5);
        let w = Weight::Q4(random_q4(1024, 1024, Q4Kind::ZeroPoint, &mut rng));
        let gw = GpuWeight::upload(&gpu, &w).unwrap();
        let t = time_matmul(&gpu, &gw, 1, 10).unwrap();
        assert!(t > 0.0 && t < 1.0, "{t} s");
        eprintln!("copy {bw:.0} GB/s; int4 1024x1024 m=1 {:.2} us", t * 1e6);
    }
}
