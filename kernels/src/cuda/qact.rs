//! Activations quantized to int8 on the device (`qact.cu`), for the fast mode's products: the same
//! blocks, scales, sums and outliers as the CPU's [`crate::cpu::act::ActQ8`], bit for bit (tested)
//! except that the row sums behind the outlier limit are tree sums (a value within their rounding
//! of the limit may be classified differently), so `--act int8` means the same arithmetic on both
//! backends up to the order of the f32 sums.
//! [`crate::cuda::linear::GpuWeight::matmul_q8`] multiplies them with INT4 or Q8 weights using
//! `dp4a` (four int8 multiply-adds per instruction).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{CudaError, Gpu, KernelModule, as_i32, shape};
use crate::QK;
use crate::cpu::act::MAX_OUTLIERS;

pub const MODULE: KernelModule = KernelModule {
    name: "qact",
    source: include_str!("../../cuda/qact.cu"),
    functions: &[
        "quantize_rows",
        "rms_norm_quantize",
        "add_rms_norm_quantize",
        "swiglu_quantize",
    ],
};

/// Threads of a standalone quantization block (one block per row).
const QA_THREADS: u32 = 512;
/// Threads of the fused kernels: those of `ops.cu`'s row kernels, so that their f32 outputs are
/// the unfused kernels' bit for bit (the block sum's order depends on it).
const FUSED_THREADS: u32 = 256;

/// Up to `capacity` rows of `cols` activations as int8 blocks on the device (see `qact.cu` for
/// the layout), with their outliers.
pub struct GpuActQ8 {
    capacity: usize,
    cols: usize,
    rows: usize,
    /// `[rows][KB][8]` u32: four int8 codes each, natural column order.
    pub(crate) codes: CudaSlice<u32>,
    /// `[rows][KB]` (d, s) pairs.
    pub(crate) ds: CudaSlice<f32>,
    /// `[rows]` outliers kept; `[rows][MAX_OUTLIERS]` their columns and values.
    pub(crate) counts: CudaSlice<u32>,
    pub(crate) ocol: CudaSlice<u32>,
    pub(crate) oval: CudaSlice<f32>,
}

/// A quantized row brought back to the host (tests and debugging).
#[derive(Debug, Clone, PartialEq)]
pub struct HostRowQ8 {
    /// Per block: (d, s, the 32 codes).
    pub blocks: Vec<(f32, f32, [i8; QK])>,
    pub outliers: Vec<(u32, f32)>,
}

impl GpuActQ8 {
    /// Buffers for up to `capacity` rows of `cols` values.
    pub fn new(gpu: &Gpu, capacity: usize, cols: usize) -> Result<Self, CudaError> {
        let kb = cols.div_ceil(QK);
        as_i32(cols, "cols")?;
        let s = gpu.stream();
        let cap = capacity.max(1);
        Ok(Self {
            capacity: cap,
            cols,
            rows: 0,
            codes: s.alloc_zeros(cap * kb * 8)?,
            ds: s.alloc_zeros(cap * kb * 2)?,
            counts: s.alloc_zeros(cap)?,
            ocol: s.alloc_zeros(cap * MAX_OUTLIERS)?,
            oval: s.alloc_zeros(cap * MAX_OUTLIERS)?,
        })
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows of the last [`GpuActQ8::quantize`].
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// One block of `threads` per row.
    fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Checks that `rows` rows fit and that each `(what, len)` view holds `rows · cols` (or, for
    /// a `w` view, `cols`) elements; records `rows`.
    fn prepare(&mut self, op: &str, rows: usize, views: &[(&str, usize)]) -> Result<(), CudaError> {
        let cols = self.cols;
        if rows > self.capacity {
            return Err(shape(format!(
                "{op}: {rows} rows exceed the quantized buffer's capacity of {}",
                self.capacity
            )));
        }
        for &(what, len) in views {
            let want = if what == "w" { cols } else { rows * cols };
            if len < want {
                return Err(shape(format!(
                    "{op}: {what} needs {want} elements ({rows} rows of {cols}), the view has {len}"
                )));
            }
        }
        as_i32(rows * cols, "rows · cols")?;
        self.rows = rows;
        Ok(())
    }

    /// Pushes this buffer's outputs (after the op's own arguments): KB, codes, ds, counts,
    /// outlier columns and values.
    fn push_outputs<'a>(&'a mut self, b: &mut LaunchArgs<'a>, kb: &'a i32) {
        b.arg(kb)
            .arg(&mut self.codes)
            .arg(&mut self.ds)
            .arg(&mut self.counts)
            .arg(&mut self.ocol)
            .arg(&mut self.oval);
    }

    fn kb(&self) -> i32 {
        self.cols.div_ceil(QK) as i32
    }

    /// Quantizes the first `rows` rows of `x` (`[rows][cols]`), one launch.
    pub fn quantize(
        &mut self,
        gpu: &Gpu,
        x: &CudaView<'_, f32>,
        rows: usize,
    ) -> Result<(), CudaError> {
        self.prepare("quantize", rows, &[("x", x.len())])?;
        if rows == 0 {
            return Ok(());
        }
        let (k, kb) = (self.cols as i32, self.kb());
        let f = gpu.function(MODULE.name, "quantize_rows")?;
        let mut b = gpu.stream().launch_builder(f);
        b.arg(x).arg(&k);
        self.push_outputs(&mut b, &kb);
        // SAFETY: quantize_rows(x, K, KB, outputs): block r reads x[r·K .. (r+1)·K] (rows·K ≤
        // x.len(), prepare).
        // The outputs: block r writes codes[r·KB·8 ..], ds[r·KB·2 ..], cnt[r], ocol/oval[r·16 ..]
        // of buffers sized for `capacity ≥ rows` rows (prepare).
        unsafe { b.launch(Self::rows_cfg(rows, QA_THREADS))? };
        Ok(())
    }

    /// `out[r] = x[r] · rsqrt(mean(x[r]²) + eps) · w` (as [`super::ops::rms_norm_rows`], bit for
    /// bit) and `out` quantized into this buffer, in one launch.
    pub fn rms_norm_quantize(
        &mut self,
        gpu: &Gpu,
        x: &CudaView<'_, f32>,
        w: &CudaView<'_, f32>,
        rows: usize,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let views = [("x", x.len()), ("w", w.len()), ("out", out.len())];
        self.prepare("rms_norm_quantize", rows, &views)?;
        if rows == 0 {
            return Ok(());
        }
        let (k, kb) = (self.cols as i32, self.kb());
        let f = gpu.function(MODULE.name, "rms_norm_quantize")?;
        let mut b = gpu.stream().launch_builder(f);
        b.arg(x).arg(w).arg(out).arg(&k).arg(&eps);
        self.push_outputs(&mut b, &kb);
        // SAFETY: (x, w, out, cols, eps, KB, outputs): block r reads x and writes out at
        // [r·cols, (r+1)·cols) and reads w[..cols], all within the checked lengths.
        // The outputs: block r writes codes[r·KB·8 ..], ds[r·KB·2 ..], cnt[r], ocol/oval[r·16 ..]
        // of buffers sized for `capacity ≥ rows` rows (prepare).
        unsafe { b.launch(Self::rows_cfg(rows, FUSED_THREADS))? };
        Ok(())
    }

    /// `x[r] += y[r]`, then `out[r]` = RMSNorm of `x[r]` (as [`super::ops::add_rms_norm_rows`],
    /// bit for bit), and `out` quantized into this buffer, in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm_quantize(
        &mut self,
        gpu: &Gpu,
        x: &mut CudaViewMut<'_, f32>,
        y: &CudaView<'_, f32>,
        w: &CudaView<'_, f32>,
        rows: usize,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let views = [
            ("x", x.len()),
            ("y", y.len()),
            ("w", w.len()),
            ("out", out.len()),
        ];
        self.prepare("add_rms_norm_quantize", rows, &views)?;
        if rows == 0 {
            return Ok(());
        }
        let (k, kb) = (self.cols as i32, self.kb());
        let f = gpu.function(MODULE.name, "add_rms_norm_quantize")?;
        let mut b = gpu.stream().launch_builder(f);
        b.arg(x).arg(y).arg(w).arg(out).arg(&k).arg(&eps);
        self.push_outputs(&mut b, &kb);
        // SAFETY: (x, y, w, out, cols, eps, KB, outputs): block r touches x, y and out at
        // [r·cols, (r+1)·cols) and reads w[..cols], within the checked lengths.
        // The outputs: block r writes codes[r·KB·8 ..], ds[r·KB·2 ..], cnt[r], ocol/oval[r·16 ..]
        // of buffers sized for `capacity ≥ rows` rows (prepare).
        unsafe { b.launch(Self::rows_cfg(rows, FUSED_THREADS))? };
        Ok(())
    }

    /// `gate[r] = silu(gate[r]) · up[r]` (as [`super::ops::swiglu`], bit for bit) and `gate`
    /// quantized into this buffer, in one launch.
    pub fn swiglu_quantize(
        &mut self,
        gpu: &Gpu,
        gate: &mut CudaViewMut<'_, f32>,
        up: &CudaView<'_, f32>,
        rows: usize,
    ) -> Result<(), CudaError> {
        let views = [("gate", gate.len()), ("up", up.len())];
        self.prepare("swiglu_quantize", rows, &views)?;
        if rows == 0 {
            return Ok(());
        }
        let (k, kb) = (self.cols as i32, self.kb());
        let f = gpu.function(MODULE.name, "swiglu_quantize")?;
        let mut b = gpu.stream().launch_builder(f);
        b.arg(gate).arg(up).arg(&k);
        self.push_outputs(&mut b, &kb);
        // SAFETY: (gate, up, cols, KB, outputs): block r touches gate and up at
        // [r·cols, (r+1)·cols), within the checked lengths.
        // The outputs: block r writes codes[r·KB·8 ..], ds[r·KB·2 ..], cnt[r], ocol/oval[r·16 ..]
        // of buffers sized for `capacity ≥ rows` rows (prepare).
        unsafe { b.launch(Self::rows_cfg(rows, FUSED_THREADS))? };
        Ok(())
    }

    /// The quantized rows, copied back.
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<HostRowQ8>, CudaError> {
        let s = gpu.stream();
        let kb = self.cols.div_ceil(QK);
        let (codes, ds) = (s.clone_dtoh(&self.codes)?, s.clone_dtoh(&self.ds)?);
        let (counts, ocol, oval) = (
            s.clone_dtoh(&self.counts)?,
            s.clone_dtoh(&self.ocol)?,
            s.clone_dtoh(&self.oval)?,
        );
        Ok((0..self.rows)
            .map(|r| HostRowQ8 {
                blocks: (0..kb)
                    .map(|b| {
                        let i = r * kb + b;
                        let q = std::array::from_fn(|j| {
                            (codes[i * 8 + j / 4] >> (8 * (j % 4))) as u8 as i8
                        });
                        (ds[2 * i], ds[2 * i + 1], q)
                    })
                    .collect(),
                outliers: (0..counts[r] as usize)
                    .map(|o| (ocol[r * MAX_OUTLIERS + o], oval[r * MAX_OUTLIERS + o]))
                    .collect(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::act::ActQ8;
    use crate::cuda::testing::{TestRng, gpu_or_skip};

    /// Rows with planted outliers of every kind the CPU handles: none, a few, more than
    /// `MAX_OUTLIERS` (the largest kept, ties to the earlier column), equal magnitudes, a row of
    /// zeros, tiny values whose `1/d` overflows, a partial last block.
    fn rows_for(cols: usize, rows: usize, rng: &mut TestRng) -> Vec<f32> {
        let mut x: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        for r in 0..rows {
            let row = &mut x[r * cols..(r + 1) * cols];
            match r % 7 {
                0 => {}
                1 => {
                    for i in 0..3 {
                        row[(i * 97 + 5) % cols] = 40.0 * (i as f32 + 1.0);
                    }
                }
                2 => {
                    for i in 0..(MAX_OUTLIERS + 9).min(cols / 2) {
                        row[(i * 13 + 1) % cols] = if i % 2 == 0 { -60.0 } else { 60.0 + i as f32 };
                    }
                }
                3 => row.iter_mut().for_each(|v| *v = 0.0),
                4 => row.iter_mut().for_each(|v| *v *= 1e-38),
                5 => row[cols - 1] = 1e4,
                _ => {
                    for v in row.iter_mut().step_by(3) {
                        *v *= 25.0;
                    }
                }
            }
        }
        x
    }

    /// Bit for bit: none of these rows has a value within rounding of its outlier limit (the one
    /// place the GPU's tree sums could decide differently).
    #[test]
    fn quantized_rows_equal_the_cpu_bit_for_bit() {
        let Some(gpu) = gpu_or_skip("qact::quantized_rows_equal_the_cpu_bit_for_bit") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = TestRng(7);
        for &(cols, rows) in &[
            (70usize, 7usize),
            (576, 14),
            (1536, 9),
            (4096, 7),
            (14336, 3),
            (33, 7),
        ] {
            let x = rows_for(cols, rows, &mut rng);
            let dx = s.clone_htod(&x).unwrap();
            let mut qa = GpuActQ8::new(&gpu, rows, cols).unwrap();
            qa.quantize(&gpu, &dx.as_view(), rows).unwrap();
            let got = qa.to_host(&gpu).unwrap();
            let want = ActQ8::quantize(&x, rows, cols);
            for (r, g) in got.iter().enumerate() {
                assert_eq!(g.outliers, want.outliers(r), "[{cols}] row {r}: outliers");
                for (b, (gb, wb)) in g.blocks.iter().zip(want.row(r)).enumerate() {
                    assert_eq!(
                        (gb.0.to_bits(), gb.1.to_bits(), gb.2),
                        (wb.d.to_bits(), wb.s.to_bits(), wb.qs),
                        "[{cols}] row {r} block {b}"
                    );
                }
            }
        }
    }

    /// The fused kernels write what the separate op kernels write, bit for bit, and quantize it
    /// as `quantize` does.
    #[test]
    fn fused_kernels_equal_the_op_then_quantize() {
        use crate::cuda::ops::{add_rms_norm_rows, rms_norm_rows, swiglu};
        let Some(gpu) = gpu_or_skip("qact::fused_kernels_equal_the_op_then_quantize") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = TestRng(9);
        for &(cols, rows) in &[(576usize, 5usize), (1100, 3), (4096, 2)] {
            let n = rows * cols;
            let x = rows_for(cols, rows, &mut rng);
            let y = rng.vec(n, 2.0);
            let w = rng.vec(cols, 1.5);
            let (dx, dy, dw) = (
                s.clone_htod(&x).unwrap(),
                s.clone_htod(&y).unwrap(),
                s.clone_htod(&w).unwrap(),
            );
            let mut want_q = GpuActQ8::new(&gpu, rows, cols).unwrap();
            let mut got_q = GpuActQ8::new(&gpu, rows, cols).unwrap();
            let mut want = s.alloc_zeros::<f32>(n).unwrap();
            let mut got = s.alloc_zeros::<f32>(n).unwrap();
            let host = |v: &CudaSlice<f32>| s.clone_dtoh(v).unwrap();
            let same = |a: Vec<f32>, b: Vec<f32>, what: &str| {
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    a.iter().map(|v| v.to_bits()).collect(),
                    b.iter().map(|v| v.to_bits()).collect(),
                );
                assert!(a == b, "[{cols}] {what} differs");
            };

            rms_norm_rows(
                &gpu,
                &dx.as_view(),
                &dw.as_view(),
                rows,
                cols,
                1e-5,
                &mut want.as_view_mut(),
            )
            .unwrap();
            want_q.quantize(&gpu, &want.as_view(), rows).unwrap();
            got_q
                .rms_norm_quantize(
                    &gpu,
                    &dx.as_view(),
                    &dw.as_view(),
                    rows,
                    1e-5,
                    &mut got.as_view_mut(),
                )
                .unwrap();
            same(host(&want), host(&got), "rms_norm out");
            assert_eq!(
                want_q.to_host(&gpu).unwrap(),
                got_q.to_host(&gpu).unwrap(),
                "[{cols}] rms_norm q8"
            );

            let (mut xa, mut xb) = (s.clone_htod(&x).unwrap(), s.clone_htod(&x).unwrap());
            add_rms_norm_rows(
                &gpu,
                &mut xa.as_view_mut(),
                &dy.as_view(),
                &dw.as_view(),
                rows,
                cols,
                1e-5,
                &mut want.as_view_mut(),
            )
            .unwrap();
            want_q.quantize(&gpu, &want.as_view(), rows).unwrap();
            got_q
                .add_rms_norm_quantize(
                    &gpu,
                    &mut xb.as_view_mut(),
                    &dy.as_view(),
                    &dw.as_view(),
                    rows,
                    1e-5,
                    &mut got.as_view_mut(),
                )
                .unwrap();
            same(host(&xa), host(&xb), "residual sum");
            same(host(&want), host(&got), "add_rms_norm out");
            assert_eq!(
                want_q.to_host(&gpu).unwrap(),
                got_q.to_host(&gpu).unwrap(),
                "[{cols}] add_rms_norm q8"
            );

            let (mut ga, mut gb) = (s.clone_htod(&x).unwrap(), s.clone_htod(&x).unwrap());
            swiglu(&gpu, &mut ga.as_view_mut(), &dy.as_view(), n).unwrap();
            want_q.quantize(&gpu, &ga.as_view(), rows).unwrap();
            got_q
                .swiglu_quantize(&gpu, &mut gb.as_view_mut(), &dy.as_view(), rows)
                .unwrap();
            same(host(&ga), host(&gb), "swiglu out");
            assert_eq!(
                want_q.to_host(&gpu).unwrap(),
                got_q.to_host(&gpu).unwrap(),
                "[{cols}] swiglu q8"
            );
            assert!(
                got_q
                    .to_host(&gpu)
                    .unwrap()
                    .iter()
                    .all(|r| r.blocks.len() == cols.div_ceil(QK))
            );
        }
        // A short view is refused before anything runs.
        let mut qa = GpuActQ8::new(&gpu, 2, 64).unwrap();
        let short = s.alloc_zeros::<f32>(64).unwrap();
        let mut out = s.alloc_zeros::<f32>(128).unwrap();
        let e = qa
            .rms_norm_quantize(
                &gpu,
                &short.as_view(),
                &short.as_view(),
                2,
                1e-5,
                &mut out.as_view_mut(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("x needs 128"), "{e}");
    }

    #[test]
    fn quantize_refuses_more_rows_than_its_capacity() {
        let Some(gpu) = gpu_or_skip("qact::quantize_refuses_more_rows_than_its_capacity") else {
            return;
        };
        let dx = gpu.stream().clone_htod(&[0f32; 64]).unwrap();
        let mut qa = GpuActQ8::new(&gpu, 1, 32).unwrap();
        let e = qa.quantize(&gpu, &dx.as_view(), 2).unwrap_err();
        assert!(e.to_string().contains("capacity"), "{e}");
    }
}
