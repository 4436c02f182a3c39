//! Multi-LoRA SGMV on the GPU (`lora.cu`), the device twin of [`crate::cpu::lora::sgmv_reference`]:
//! `out[r] += scaling · B (A x[r])` for the rows of each segment, every segment of every adapter
//! in one shrink and one expand launch (a small device table of work items carries each
//! segment's A / B pointers, rank and scaling, so ranks may differ between segments).

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};

use super::{CudaError, Gpu, KernelModule};

pub const MODULE: KernelModule = KernelModule {
    name: "lora",
    source: include_str!("../../cuda/lora.cu"),
    functions: &["lora_shrink", "lora_expand"],
};

/// Rows per work item (`LORA_ROWS` in `lora.cu`).
const ITEM_ROWS: usize = 8;
/// Warps per shrink block (`LORA_WARPS`).
const SHRINK_WARPS: usize = 8;
/// Largest rank the expand kernel's shared memory holds (`LORA_MAX_RANK`).
pub const MAX_RANK: usize = 512;
const EXPAND_THREADS: u32 = 256;

/// One adapter's factors for one projection on the device: A `[rank × cols]` and B stored
/// transposed, `Bᵀ [rank × out_dim]`, both f32.
pub struct GpuLora {
    a: CudaSlice<f32>,
    bt: CudaSlice<f32>,
    rank: usize,
    cols: usize,
    out_dim: usize,
    scaling: f32,
}

impl std::fmt::Debug for GpuLora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuLora")
            .field("rank", &self.rank)
            .field("cols", &self.cols)
            .field("out_dim", &self.out_dim)
            .field("scaling", &self.scaling)
            .finish()
    }
}

impl GpuLora {
    /// Copies A `[rank × cols]` and B `[out_dim × rank]` (row-major, as the CPU path takes them)
    /// to the device.
    pub fn upload(
        gpu: &Gpu,
        a: &[f32],
        b: &[f32],
        rank: usize,
        cols: usize,
        out_dim: usize,
        scaling: f32,
    ) -> Result<Self, CudaError> {
        if rank == 0 || rank > MAX_RANK || cols == 0 || out_dim == 0 {
            return Err(CudaError::Shape(format!(
                "LoRA rank {rank} (1..={MAX_RANK}), cols {cols}, out {out_dim}: unsupported"
            )));
        }
        if a.len() != rank * cols || b.len() != out_dim * rank {
            return Err(CudaError::Shape(format!(
                "LoRA A needs {} values (got {}), B {} (got {})",
                rank * cols,
                a.len(),
                out_dim * rank,
                b.len()
            )));
        }
        if i32::try_from(cols).is_err() || i32::try_from(out_dim).is_err() {
            return Err(CudaError::Shape(format!(
                "LoRA [{cols} → {out_dim}] is too wide"
            )));
        }
        let mut bt = vec![0f32; rank * out_dim];
        for n in 0..out_dim {
            for j in 0..rank {
                bt[j * out_dim + n] = b[n * rank + j];
            }
        }
        let s = gpu.stream();
        Ok(Self {
            a: s.clone_htod(a)?,
            bt: s.clone_htod(&bt)?,
            rank,
            cols,
            out_dim,
            scaling,
        })
    }

    pub fn nbytes(&self) -> usize {
        self.a.num_bytes() + self.bt.num_bytes()
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    pub fn scaling(&self) -> f32 {
        self.scaling
    }
}

/// Rows of a batch that share one adapter.
#[derive(Clone, Debug)]
pub struct GpuLoraSegment<'a> {
    pub rows: Range<usize>,
    pub lora: &'a GpuLora,
}

/// `out[r] += scaling · B·(A·x[r])` for each row `r` of each segment (rows outside every segment
/// untouched). `x` is `[rows × cols]`, `out` is `[rows × out_dim]`; segments must not overlap.
/// One shrink and one expand launch whatever the number of segments and their ranks.
pub fn sgmv(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    cols: usize,
    out: &mut CudaViewMut<'_, f32>,
    out_dim: usize,
    segs: &[GpuLoraSegment<'_>],
) -> Result<(), CudaError> {
    let shape = |m: String| CudaError::Shape(format!("sgmv: {m}"));
    let mut ranges: Vec<Range<usize>> = Vec::with_capacity(segs.len());
    for s in segs {
        let l = s.lora;
        if l.cols != cols || l.out_dim != out_dim {
            return Err(shape(format!(
                "adapter [{} → {}] on a [{cols} → {out_dim}] projection",
                l.cols, l.out_dim
            )));
        }
        if s.rows.start > s.rows.end
            || s.rows.end * cols > x.len()
            || s.rows.end * out_dim > out.len()
        {
            return Err(shape(format!(
                "rows {:?} outside x ({} elements) or out ({} elements)",
                s.rows,
                x.len(),
                out.len()
            )));
        }
        if !s.rows.is_empty() {
            ranges.push(s.rows.clone());
        }
    }
    ranges.sort_by_key(|r| r.start);
    if let Some(w) = ranges.windows(2).find(|w| w[1].start < w[0].end) {
        return Err(shape(format!("segments {:?} and {:?} overlap", w[0], w[1])));
    }
    let max_row = ranges.last().map_or(0, |r| r.end);
    if i32::try_from(max_row * cols.max(out_dim)).is_err() {
        return Err(shape(format!("{max_row} rows are too many")));
    }

    let s = gpu.stream();
    // The work items: pointers are read while the guards are alive (they order the stream
    // after any pending write of the factors).
    let mut items: Vec<u64> = Vec::new();
    let mut max_rank = 0usize;
    let mut guards = Vec::with_capacity(2 * segs.len());
    for seg in segs.iter().filter(|s| !s.rows.is_empty()) {
        let l = seg.lora;
        let (a_ptr, ga) = l.a.device_ptr(s);
        let (b_ptr, gb) = l.bt.device_ptr(s);
        guards.push(ga);
        guards.push(gb);
        max_rank = max_rank.max(l.rank);
        let mut r0 = seg.rows.start;
        while r0 < seg.rows.end {
            let r1 = (r0 + ITEM_ROWS).min(seg.rows.end);
            items.extend_from_slice(&[
                a_ptr,
                b_ptr,
                r0 as u64 | (r1 as u64) << 32,
                l.rank as u64 | (l.scaling.to_bits() as u64) << 32,
            ]);
            r0 = r1;
        }
    }
    let n_items = items.len() / 4;
    if n_items == 0 {
        return Ok(());
    }
    if n_items > 65_535 {
        return Err(shape(format!("{n_items} work items exceed one launch")));
    }
    let d_items = s.clone_htod(&items)?;
    // SAFETY: every entry the expand kernel reads, (item, r < rows of item, j < rank of item),
    // is written by the shrink kernel first (same stream).
    let mut t = unsafe { s.alloc::<f32>(n_items * ITEM_ROWS * max_rank) }?;
    let (c, od, ts) = (cols as i32, out_dim as i32, max_rank as i32);

    let shrink = gpu.function(MODULE.name, "lora_shrink")?;
    let cfg = LaunchConfig {
        grid_dim: (n_items as u32, max_rank.div_ceil(SHRINK_WARPS) as u32, 1),
        block_dim: ((SHRINK_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (items, x, t, cols, t_stride) as the kernel; item rows lie inside x (checked
    // above), A has rank × cols values, t has items × 8 × max_rank.
    unsafe {
        s.launch_builder(shrink)
            .arg(&d_items)
            .arg(x)
            .arg(&mut t)
            .arg(&c)
            .arg(&ts)
            .launch(cfg)?;
    }
    let expand = gpu.function(MODULE.name, "lora_expand")?;
    let cfg = LaunchConfig {
        grid_dim: (
            out_dim.div_ceil(EXPAND_THREADS as usize) as u32,
            n_items as u32,
            1,
        ),
        block_dim: (EXPAND_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (items, t, out, out_dim, t_stride) as the kernel; rank ≤ MAX_RANK (upload checks),
    // Bᵀ has rank × out_dim values, item rows lie inside out, and no two items share a row, so
    // no two threads update the same element.
    unsafe {
        s.launch_builder(expand)
            .arg(&d_items)
            .arg(&t)
            .arg(out)
            .arg(&od)
            .arg(&ts)
            .launch(cfg)?;
    }
    drop(guards);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::lora::{LoraSegment, sgmv_reference};
    use crate::cuda::testing::gpu_or_skip;

    struct Rng(u64);
    impl Rng {
        fn f32(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| scale * self.f32()).collect()
        }
    }

    struct HostLora {
        a: Vec<f32>,
        b: Vec<f32>,
        rank: usize,
        scaling: f32,
    }

    #[test]
    fn sgmv_matches_the_reference_on_ragged_segments_with_mixed_ranks() {
        let Some(gpu) =
            gpu_or_skip("lora::sgmv_matches_the_reference_on_ragged_segments_with_mixed_ranks")
        else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for (cols, out_dim) in [(96, 40), (4096, 1024), (70, 300), (1000, 4097)] {
            let adapters: Vec<HostLora> = [(16, 2.0f32), (8, 0.5), (64, 1.0), (3, -1.5)]
                .iter()
                .map(|&(rank, scaling)| HostLora {
                    a: rng.vec(rank * cols, 0.1),
                    b: rng.vec(out_dim * rank, 0.1),
                    rank,
                    scaling,
                })
                .collect();
            let dev: Vec<GpuLora> = adapters
                .iter()
                .map(|h| {
                    GpuLora::upload(&gpu, &h.a, &h.b, h.rank, cols, out_dim, h.scaling).unwrap()
                })
                .collect();
            // Ragged segments with gaps, an empty segment, one longer than a work item (19 rows),
            // an adapter used twice, listed out of order.
            let plan: [(Range<usize>, usize); 6] = [
                (30..49, 2),
                (0..3, 0),
                (4..5, 1),
                (7..7, 3),
                (9..17, 3),
                (20..29, 0),
            ];
            let rows = 52;
            let x = rng.vec(rows * cols, 1.0);
            let base = rng.vec(rows * out_dim, 1.0);
            let mut want = base.clone();
            let cpu_segs: Vec<LoraSegment<'_>> = plan
                .iter()
                .map(|(r, i)| LoraSegment {
                    rows: r.clone(),
                    a: &adapters[*i].a,
                    b: &adapters[*i].b,
                    rank: adapters[*i].rank,
                    scaling: adapters[*i].scaling,
                })
                .collect();
            sgmv_reference(&x, cols, &mut want, out_dim, &cpu_segs);
            let gpu_segs: Vec<GpuLoraSegment<'_>> = plan
                .iter()
                .map(|(r, i)| GpuLoraSegment {
                    rows: r.clone(),
                    lora: &dev[*i],
                })
                .collect();
            let dx = s.clone_htod(&x).unwrap();
            let mut dout = s.clone_htod(&base).unwrap();
            sgmv(
                &gpu,
                &dx.as_view(),
                cols,
                &mut dout.as_view_mut(),
                out_dim,
                &gpu_segs,
            )
            .unwrap();
            let got = s.clone_dtoh(&dout).unwrap();

            let seg_of = |r: usize| plan.iter().find(|(rg, _)| rg.contains(&r)).map(|(_, i)| *i);
            for r in 0..rows {
                let Some(ai) = seg_of(r) else {
                    assert_eq!(
                        &got[r * out_dim..(r + 1) * out_dim],
                        &base[r * out_dim..(r + 1) * out_dim],
                        "[{cols}→{out_dim}] row {r} has no adapter"
                    );
                    continue;
                };
                // Bound: the f32 sums of the A·x and B·t terms run in another order, then one
                // product and one add: 1e-5 of the sum of the absolute terms (about 1e-6 would
                // do for these lengths; a wrong row, rank or scaling is off by the whole delta).
                let h = &adapters[ai];
                let xr = &x[r * cols..(r + 1) * cols];
                let at: Vec<f64> = (0..h.rank)
                    .map(|j| {
                        (0..cols)
                            .map(|k| (h.a[j * cols + k] as f64 * xr[k] as f64).abs())
                            .sum()
                    })
                    .collect();
                for n in 0..out_dim {
                    let i = r * out_dim + n;
                    let abs_delta: f64 = (0..h.rank)
                        .map(|j| (h.b[n * h.rank + j] as f64).abs() * at[j])
                        .sum();
                    let bound = 1e-5 * (base[i].abs() as f64 + h.scaling.abs() as f64 * abs_delta);
                    assert!(
                        ((got[i] - want[i]).abs() as f64) <= bound,
                        "[{cols}→{out_dim}] row {r} col {n}: gpu {} cpu {} bound {bound}",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }

    #[test]
    fn sgmv_rejects_overlaps_and_mismatched_adapters() {
        let Some(gpu) = gpu_or_skip("lora::sgmv_rejects_overlaps_and_mismatched_adapters") else {
            return;
        };
        let s = gpu.stream();
        let l = GpuLora::upload(&gpu, &[0.1; 8], &[0.2; 6], 2, 4, 3, 1.0).unwrap();
        let other = GpuLora::upload(&gpu, &[0.1; 10], &[0.2; 6], 2, 5, 3, 1.0).unwrap();
        let x = s.alloc_zeros::<f32>(4 * 4).unwrap();
        let mut out = s.alloc_zeros::<f32>(4 * 3).unwrap();
        let seg = |rows: Range<usize>, lora| GpuLoraSegment { rows, lora };
        for segs in [
            vec![seg(0..2, &l), seg(1..3, &l)],
            vec![seg(0..2, &other)],
            vec![seg(3..5, &l)],
        ] {
            assert!(matches!(
                sgmv(&gpu, &x.as_view(), 4, &mut out.as_view_mut(), 3, &segs),
                Err(CudaError::Shape(_))
            ));
        }
        assert!(GpuLora::upload(&gpu, &[0.1; 8], &[0.2; 5], 2, 4, 3, 1.0).is_err());
        sgmv(&gpu, &x.as_view(), 4, &mut out.as_view_mut(), 3, &[]).unwrap();
    }
}
