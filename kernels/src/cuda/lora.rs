//! Multi-LoRA SGMV on the GPU (`lora.cu`), the device twin of [`crate::cpu::lora::sgmv_reference`]:
//! `out[r] += scaling · B (A x[r])` for the rows of each segment, every segment of every adapter
//! in one shrink and one expand launch (a small device table of work items carries each
//! segment's A / B pointers, rank and scaling, so ranks may differ between segments).

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};

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

/// One adapter's factors for one projection on the device: A `[rank × cols]` and B
/// `[out_dim × rank]`, both f32 and row-major as the CPU holds them, inside a device buffer that the projections of
/// an adapter uploaded together share (one allocation and one copy per adapter).
pub struct GpuLora {
    buf: Arc<CudaSlice<f32>>,
    /// Where A and B start in `buf`, in floats (multiples of [`FACTOR_ALIGN`]).
    a_off: usize,
    b_off: usize,
    rank: usize,
    cols: usize,
    out_dim: usize,
    scaling: f32,
}

/// Factors start on 256-byte boundaries of the shared buffer (16-byte loads in the kernels).
const FACTOR_ALIGN: usize = 64;

/// One projection's factors on the host, as the CPU path holds them: A `[rank × cols]` and B
/// `[out_dim × rank]`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct LoraFactors<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub cols: usize,
    pub out_dim: usize,
    pub scaling: f32,
}

impl LoraFactors<'_> {
    fn check(&self) -> Result<(), CudaError> {
        let (rank, cols, out_dim) = (self.rank, self.cols, self.out_dim);
        if rank == 0 || rank > MAX_RANK || cols == 0 || out_dim == 0 {
            return Err(CudaError::Shape(format!(
                "LoRA rank {rank} (1..={MAX_RANK}), cols {cols}, out {out_dim}: unsupported"
            )));
        }
        if self.a.len() != rank * cols || self.b.len() != out_dim * rank {
            return Err(CudaError::Shape(format!(
                "LoRA A needs {} values (got {}), B {} (got {})",
                rank * cols,
                self.a.len(),
                out_dim * rank,
                self.b.len()
            )));
        }
        if i32::try_from(cols).is_err() || i32::try_from(out_dim).is_err() {
            return Err(CudaError::Shape(format!(
                "LoRA [{cols} → {out_dim}] is too wide"
            )));
        }
        Ok(())
    }

    /// Writes A and B at `a_off` / `b_off` of `dst`.
    fn write(&self, dst: &mut [f32], a_off: usize, b_off: usize) {
        dst[a_off..a_off + self.a.len()].copy_from_slice(self.a);
        dst[b_off..b_off + self.b.len()].copy_from_slice(self.b);
    }
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

/// Offsets of each projection's A and B in one shared buffer, and its length (floats).
fn layout(pairs: &[LoraFactors<'_>]) -> Result<(Vec<(usize, usize)>, usize), CudaError> {
    let mut offs = Vec::with_capacity(pairs.len());
    let mut total = 0usize;
    for p in pairs {
        p.check()?;
        let a_off = total;
        let b_off = a_off + (p.rank * p.cols).next_multiple_of(FACTOR_ALIGN);
        total = b_off + (p.rank * p.out_dim).next_multiple_of(FACTOR_ALIGN);
        offs.push((a_off, b_off));
    }
    Ok((offs, total))
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
        let f = LoraFactors {
            a,
            b,
            rank,
            cols,
            out_dim,
            scaling,
        };
        let (offs, total) = layout(std::slice::from_ref(&f))?;
        let mut host = vec![0f32; total];
        f.write(&mut host, offs[0].0, offs[0].1);
        let buf = Arc::new(gpu.stream().clone_htod(&host)?);
        Ok(Self::within(buf, &f, offs[0]))
    }

    /// Every projection of an adapter in one device buffer, through one pinned staging buffer and
    /// one copy on `stream` (an upload stream beside the compute stream), so the copy overlaps
    /// compute and costs one allocation of each kind, not two per projection. `reuse` is a
    /// staging buffer of an earlier upload to fill again (page-locking a fresh one costs more
    /// than the copy; [`PinnedHostSlice::as_mut_slice`] waits for its last copy), taken when it
    /// has exactly the size needed (adapters of one shape and rank). Returns the staging buffer (`reuse` back for no projections), which must
    /// live until the copy is done: record an event on `stream` after this, make the compute
    /// stream wait on it before first use, and drop or reuse the staging once it passed.
    pub fn upload_all_staged(
        stream: &Arc<CudaStream>,
        pairs: &[LoraFactors<'_>],
        reuse: Option<PinnedHostSlice<f32>>,
    ) -> Result<(Vec<Self>, Option<PinnedHostSlice<f32>>), CudaError> {
        let (offs, total) = layout(pairs)?;
        if pairs.is_empty() {
            return Ok((Vec::new(), reuse));
        }
        let mut stage = match reuse {
            Some(p) if p.len() == total => p,
            // SAFETY: every element copied is written below (factors, then zeros in the padding)
            // before the copy reads the buffer.
            _ => unsafe { stream.context().alloc_pinned::<f32>(total)? },
        };
        {
            let host = stage.as_mut_slice()?;
            let mut end = 0;
            for (p, &(a_off, b_off)) in pairs.iter().zip(&offs) {
                host[end..a_off].fill(0.0);
                host[a_off + p.a.len()..b_off].fill(0.0);
                p.write(host, a_off, b_off);
                end = b_off + p.rank * p.out_dim;
            }
            host[end..].fill(0.0);
        }
        // SAFETY: the copy below writes all `total` elements before any kernel reads them (the
        // compute stream waits for this stream's event first).
        let mut dev = unsafe { stream.alloc::<f32>(total)? };
        stream.memcpy_htod(&stage, &mut dev)?;
        let buf = Arc::new(dev);
        let loras = pairs
            .iter()
            .zip(offs)
            .map(|(p, o)| Self::within(buf.clone(), p, o))
            .collect();
        Ok((loras, Some(stage)))
    }

    /// Floats of the staging buffer [`GpuLora::upload_all_staged`] needs for `pairs`.
    pub fn staging_len(pairs: &[LoraFactors<'_>]) -> Result<usize, CudaError> {
        Ok(layout(pairs)?.1)
    }

    fn within(
        buf: Arc<CudaSlice<f32>>,
        f: &LoraFactors<'_>,
        (a_off, b_off): (usize, usize),
    ) -> Self {
        Self {
            buf,
            a_off,
            b_off,
            rank: f.rank,
            cols: f.cols,
            out_dim: f.out_dim,
            scaling: f.scaling,
        }
    }

    pub fn nbytes(&self) -> usize {
        (self.rank * (self.cols + self.out_dim)) * std::mem::size_of::<f32>()
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

/// One call of an [`SgmvPlan`]: its work items and what it was validated for.
#[derive(Clone, Debug)]
struct PlanCall {
    /// First work item of the call in the plan's table, and how many.
    first: usize,
    items: usize,
    /// Largest rank among its segments (the shrink grid and the scratch stride).
    max_rank: usize,
    /// The projection's shape, `None` for a call without rows (nothing to run or check).
    dims: Option<(usize, usize)>,
    /// One past the last row any segment touches.
    max_row: usize,
}

/// The work items of several SGMV calls (e.g. one per (layer, projection) of a decode step) in
/// one device buffer, uploaded once by [`sgmv_plan`]; [`sgmv_planned`] then runs call `i` with
/// no host-device copy. It holds the adapters' device pointers, so it borrows them.
pub struct SgmvPlan<'a> {
    items: Option<CudaSlice<u64>>,
    /// Scratch for the shrink results, sized for the largest call (calls run in stream order).
    t: Option<CudaSlice<f32>>,
    calls: Vec<PlanCall>,
    _adapters: std::marker::PhantomData<&'a GpuLora>,
}

impl std::fmt::Debug for SgmvPlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SgmvPlan")
            .field("calls", &self.calls)
            .finish()
    }
}

impl SgmvPlan<'_> {
    /// Calls in the plan.
    pub fn len(&self) -> usize {
        self.calls.len()
    }
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
    /// Work items of call `i` (0 when it has no rows).
    pub fn items(&self, call: usize) -> usize {
        self.calls.get(call).map_or(0, |c| c.items)
    }
}

/// Validates every call's segments (same projection shape within a call, ranks, no overlaps,
/// row counts that fit the kernels), cuts them into work items and uploads all items with one
/// host-to-device copy. `calls[i]` are the segments of call `i`.
pub fn sgmv_plan<'a>(
    gpu: &Gpu,
    calls: &[Vec<GpuLoraSegment<'a>>],
) -> Result<SgmvPlan<'a>, CudaError> {
    let s = gpu.stream();
    let mut items: Vec<u64> = Vec::new();
    let mut planned = Vec::with_capacity(calls.len());
    let mut scratch = 0usize;
    for (ci, segs) in calls.iter().enumerate() {
        let shape = |m: String| CudaError::Shape(format!("sgmv call {ci}: {m}"));
        let mut dims: Option<(usize, usize)> = None;
        let mut ranges: Vec<Range<usize>> = Vec::with_capacity(segs.len());
        for sg in segs {
            if sg.rows.start > sg.rows.end {
                return Err(shape(format!("rows {:?} are reversed", sg.rows)));
            }
            if sg.rows.is_empty() {
                continue;
            }
            let l = sg.lora;
            if l.rank == 0 || l.rank > MAX_RANK {
                return Err(shape(format!("rank {} outside 1..={MAX_RANK}", l.rank)));
            }
            match dims {
                None => dims = Some((l.cols, l.out_dim)),
                Some((c, o)) if (c, o) != (l.cols, l.out_dim) => {
                    return Err(shape(format!(
                        "adapter [{} → {}] in a call on [{c} → {o}]",
                        l.cols, l.out_dim
                    )));
                }
                Some(_) => {}
            }
            ranges.push(sg.rows.clone());
        }
        ranges.sort_by_key(|r| r.start);
        if let Some(w) = ranges.windows(2).find(|w| w[1].start < w[0].end) {
            return Err(shape(format!("segments {:?} and {:?} overlap", w[0], w[1])));
        }
        let max_row = ranges.last().map_or(0, |r| r.end);
        if let Some((c, o)) = dims
            && i32::try_from(max_row.saturating_mul(c.max(o))).is_err()
        {
            return Err(shape(format!("{max_row} rows are too many")));
        }
        let first = items.len() / 4;
        let mut max_rank = 0usize;
        for sg in segs.iter().filter(|sg| !sg.rows.is_empty()) {
            let l = sg.lora;
            // The pointers are read on the plan's stream, the only stream of the engine.
            let (base, _g) = l.buf.device_ptr(s);
            let f32s = std::mem::size_of::<f32>() as u64;
            let (a_ptr, b_ptr) = (base + l.a_off as u64 * f32s, base + l.b_off as u64 * f32s);
            max_rank = max_rank.max(l.rank);
            let mut r0 = sg.rows.start;
            while r0 < sg.rows.end {
                let r1 = (r0 + ITEM_ROWS).min(sg.rows.end);
                items.extend_from_slice(&[
                    a_ptr,
                    b_ptr,
                    r0 as u64 | (r1 as u64) << 32,
                    l.rank as u64 | (l.scaling.to_bits() as u64) << 32,
                ]);
                r0 = r1;
            }
        }
        let n = items.len() / 4 - first;
        if n > 65_535 {
            return Err(shape(format!("{n} work items exceed one launch")));
        }
        scratch = scratch.max(n * ITEM_ROWS * max_rank);
        planned.push(PlanCall {
            first,
            items: n,
            max_rank,
            dims: if n == 0 { None } else { dims },
            max_row,
        });
    }
    let (d_items, t) = if items.is_empty() {
        (None, None)
    } else {
        // SAFETY: every scratch entry the expand kernel reads, (item, r < rows of item,
        // j < rank of item), is written by the same call's shrink kernel first (same stream).
        let t = unsafe { s.alloc::<f32>(scratch) }?;
        (Some(s.clone_htod(&items)?), Some(t))
    };
    Ok(SgmvPlan {
        items: d_items,
        t,
        calls: planned,
        _adapters: std::marker::PhantomData,
    })
}

/// Runs call `call` of `plan`: `out[r] += scaling · B·(A·x[r])` for the rows of its segments
/// (`x` `[rows × cols]`, `out` `[rows × out_dim]`, rows outside every segment untouched). One
/// shrink and one expand launch, no host-device copy; `cols` / `out_dim` must be the call's.
pub fn sgmv_planned(
    gpu: &Gpu,
    plan: &SgmvPlan<'_>,
    call: usize,
    x: &CudaView<'_, f32>,
    cols: usize,
    out: &mut CudaViewMut<'_, f32>,
    out_dim: usize,
) -> Result<(), CudaError> {
    let shape = |m: String| CudaError::Shape(format!("sgmv call {call}: {m}"));
    let c = plan
        .calls
        .get(call)
        .ok_or_else(|| shape(format!("the plan has {} calls", plan.calls.len())))?;
    let Some((pc, po)) = c.dims else {
        return Ok(()); // no rows
    };
    if (pc, po) != (cols, out_dim) {
        return Err(shape(format!(
            "planned for [{pc} → {po}], run on [{cols} → {out_dim}]"
        )));
    }
    if c.max_row * cols > x.len() || c.max_row * out_dim > out.len() {
        return Err(shape(format!(
            "rows up to {} outside x ({} elements) or out ({} elements)",
            c.max_row,
            x.len(),
            out.len()
        )));
    }
    let (Some(all_items), Some(t)) = (&plan.items, &plan.t) else {
        return Ok(());
    };
    let s = gpu.stream();
    let items = all_items.slice(4 * c.first..4 * (c.first + c.items));
    let (ci, od, ts) = (cols as i32, out_dim as i32, c.max_rank as i32);
    let shrink = gpu.function(MODULE.name, "lora_shrink")?;
    let cfg = LaunchConfig {
        grid_dim: (c.items as u32, c.max_rank as u32, 1),
        block_dim: ((SHRINK_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (items, x, t, cols, t_stride) as the kernel; the items are this call's (validated
    // at plan time against adapters of [cols → out_dim], which the plan borrows), their rows lie
    // inside x (max_row checked above), A has rank × cols values, t has at least
    // items × 8 × max_rank (the plan's largest call). Calls run in stream order, so the shared
    // scratch is never used by two launches at once.
    unsafe {
        s.launch_builder(shrink)
            .arg(&items)
            .arg(x)
            .arg(t)
            .arg(&ci)
            .arg(&ts)
            .launch(cfg)?;
    }
    let expand = gpu.function(MODULE.name, "lora_expand")?;
    let cfg = LaunchConfig {
        grid_dim: (
            out_dim.div_ceil(EXPAND_THREADS as usize) as u32,
            c.items as u32,
            1,
        ),
        block_dim: (EXPAND_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (items, t, out, out_dim, t_stride) as the kernel; rank ≤ MAX_RANK (checked at plan
    // time), B has out_dim × rank values, item rows lie inside out, and no two items share a
    // row (no overlaps), so no two threads update the same element.
    unsafe {
        s.launch_builder(expand)
            .arg(&items)
            .arg(t)
            .arg(out)
            .arg(&od)
            .arg(&ts)
            .launch(cfg)?;
    }
    Ok(())
}

/// `out[r] += scaling · B·(A·x[r])` for each row `r` of each segment (rows outside every segment
/// untouched). `x` is `[rows × cols]`, `out` is `[rows × out_dim]`; segments must not overlap.
/// One shrink and one expand launch whatever the number of segments and their ranks. A one-call
/// [`sgmv_plan`] (one upload per call); a decode step should plan all its calls at once.
pub fn sgmv(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    cols: usize,
    out: &mut CudaViewMut<'_, f32>,
    out_dim: usize,
    segs: &[GpuLoraSegment<'_>],
) -> Result<(), CudaError> {
    for sg in segs.iter().filter(|sg| !sg.rows.is_empty()) {
        let l = sg.lora;
        if l.cols != cols || l.out_dim != out_dim {
            return Err(CudaError::Shape(format!(
                "sgmv: adapter [{} → {}] on a [{cols} → {out_dim}] projection",
                l.cols, l.out_dim
            )));
        }
    }
    let plan = sgmv_plan(gpu, &[segs.to_vec()])?;
    sgmv_planned(gpu, &plan, 0, x, cols, out, out_dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::lora::{LoraSegment, sgmv_reference};
    use crate::cuda::testing::{TestRng as Rng, gpu_or_skip};

    #[test]
    fn upload_all_staged_lays_out_every_projection_in_one_buffer() {
        let Some(gpu) =
            gpu_or_skip("lora::upload_all_staged_lays_out_every_projection_in_one_buffer")
        else {
            return;
        };
        let mut rng = Rng(5);
        // Odd shapes (padding between factors), ranks 1..16.
        let shapes = [
            (3usize, 70usize, 33usize),
            (16, 576, 192),
            (1, 5, 7),
            (8, 64, 1536),
        ];
        let host: Vec<(Vec<f32>, Vec<f32>)> = shapes
            .iter()
            .map(|&(r, c, o)| {
                let a = (0..r * c).map(|_| rng.f32()).collect();
                let b = (0..o * r).map(|_| rng.f32()).collect();
                (a, b)
            })
            .collect();
        let factors: Vec<LoraFactors<'_>> = shapes
            .iter()
            .zip(&host)
            .map(|(&(rank, cols, out_dim), (a, b))| LoraFactors {
                a,
                b,
                rank,
                cols,
                out_dim,
                scaling: 0.5,
            })
            .collect();
        let upload = gpu.context().new_stream().unwrap();
        let (loras, stage) = GpuLora::upload_all_staged(&upload, &factors, None).unwrap();
        upload.synchronize().unwrap();
        assert!(stage.is_some());
        let dev = upload.clone_dtoh(&*loras[0].buf).unwrap();
        for (l, f) in loras.iter().zip(&factors) {
            assert!(Arc::ptr_eq(&l.buf, &loras[0].buf), "one buffer");
            assert_eq!((l.a_off % FACTOR_ALIGN, l.b_off % FACTOR_ALIGN), (0, 0));
            assert_eq!(&dev[l.a_off..l.a_off + f.a.len()], f.a);
            assert_eq!(&dev[l.b_off..l.b_off + f.b.len()], f.b);
            assert_eq!(l.nbytes(), 4 * f.rank * (f.cols + f.out_dim));
        }
        // The same factors one by one give the same device contents (one upload per buffer).
        for (l, f) in loras.iter().zip(&factors) {
            let one = GpuLora::upload(&gpu, f.a, f.b, f.rank, f.cols, f.out_dim, 0.5).unwrap();
            let d1 = gpu.stream().clone_dtoh(&*one.buf).unwrap();
            assert_eq!(&d1[..f.a.len()], &dev[l.a_off..l.a_off + f.a.len()]);
        }
        // A bad shape is refused before anything is allocated.
        let bad = LoraFactors {
            b: &host[0].1[1..],
            ..factors[0]
        };
        assert!(GpuLora::upload_all_staged(&upload, &[factors[1], bad], None).is_err());
        assert!(
            GpuLora::upload_all_staged(&upload, &[], None)
                .unwrap()
                .1
                .is_none()
        );
        // A staging buffer of the same size is filled again (the same device contents); one of
        // another size is replaced by a fresh one.
        let stage = stage.unwrap();
        let ptr = stage.as_ptr().unwrap();
        let (again, stage) = GpuLora::upload_all_staged(&upload, &factors, Some(stage)).unwrap();
        assert_eq!(stage.as_ref().unwrap().as_ptr().unwrap(), ptr, "reused");
        upload.synchronize().unwrap();
        assert_eq!(upload.clone_dtoh(&*again[0].buf).unwrap(), dev);
        let (_, other) = GpuLora::upload_all_staged(&upload, &factors[1..2], stage).unwrap();
        assert_ne!(
            other.as_ref().unwrap().as_ptr().unwrap(),
            ptr,
            "another size: a new buffer"
        );
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

    /// The CPU reference for one call, and the bound of the ragged-segments test per element.
    fn reference_and_bound(
        x: &[f32],
        cols: usize,
        base: &[f32],
        out_dim: usize,
        segs: &[(Range<usize>, &HostLora)],
    ) -> (Vec<f32>, Vec<f64>) {
        let mut want = base.to_vec();
        let cpu_segs: Vec<LoraSegment<'_>> = segs
            .iter()
            .map(|(r, h)| LoraSegment {
                rows: r.clone(),
                a: &h.a,
                b: &h.b,
                rank: h.rank,
                scaling: h.scaling,
            })
            .collect();
        sgmv_reference(x, cols, &mut want, out_dim, &cpu_segs);
        let mut bound: Vec<f64> = base.iter().map(|v| 1e-5 * v.abs() as f64 + 1e-30).collect();
        for (rows, h) in segs {
            for r in rows.clone() {
                let xr = &x[r * cols..(r + 1) * cols];
                let at: Vec<f64> = (0..h.rank)
                    .map(|j| {
                        (0..cols)
                            .map(|k| (h.a[j * cols + k] as f64 * xr[k] as f64).abs())
                            .sum()
                    })
                    .collect();
                for n in 0..out_dim {
                    let d: f64 = (0..h.rank)
                        .map(|j| (h.b[n * h.rank + j] as f64).abs() * at[j])
                        .sum();
                    bound[r * out_dim + n] += 1e-5 * h.scaling.abs() as f64 * d;
                }
            }
        }
        (want, bound)
    }

    #[test]
    fn sgmv_plan_runs_many_calls_from_one_upload() {
        let Some(gpu) = gpu_or_skip("lora::sgmv_plan_runs_many_calls_from_one_upload") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng(0x5eed_1234_abcd_0002);
        let rows = 21;
        // Calls of different shapes and ranks (one projection each), an empty call, a call
        // listed twice with other rows; one plan, one upload.
        let shapes = [(96, 40), (576, 192), (70, 1536), (1000, 576)];
        let ranks = [(16, 2.0f32), (8, 0.5), (64, 1.0), (3, -1.5)];
        let host: Vec<Vec<HostLora>> = shapes
            .iter()
            .map(|&(cols, out_dim)| {
                ranks
                    .iter()
                    .map(|&(rank, scaling)| HostLora {
                        a: rng.vec(rank * cols, 0.1),
                        b: rng.vec(out_dim * rank, 0.1),
                        rank,
                        scaling,
                    })
                    .collect()
            })
            .collect();
        let dev: Vec<Vec<GpuLora>> = shapes
            .iter()
            .zip(&host)
            .map(|(&(cols, out_dim), hs)| {
                hs.iter()
                    .map(|h| {
                        GpuLora::upload(&gpu, &h.a, &h.b, h.rank, cols, out_dim, h.scaling).unwrap()
                    })
                    .collect()
            })
            .collect();
        // (shape index, [(rows, adapter index)])
        type Call = (usize, Vec<(Range<usize>, usize)>);
        let calls: Vec<Call> = vec![
            (0, vec![(0..3, 0), (5..14, 2), (14..21, 1)]),
            (1, vec![(2..19, 3), (0..2, 0)]),
            (2, vec![]),
            (3, vec![(20..21, 2), (0..9, 1), (9..10, 3)]),
            (2, vec![(4..6, 3), (6..20, 2), (3..3, 0)]),
            (1, vec![(1..2, 1)]),
        ];
        let seg_lists: Vec<Vec<GpuLoraSegment<'_>>> = calls
            .iter()
            .map(|(si, segs)| {
                segs.iter()
                    .map(|(r, ai)| GpuLoraSegment {
                        rows: r.clone(),
                        lora: &dev[*si][*ai],
                    })
                    .collect()
            })
            .collect();
        let plan = sgmv_plan(&gpu, &seg_lists).unwrap();
        assert_eq!(plan.len(), calls.len());
        assert_eq!(plan.items(2), 0);
        assert_eq!(plan.items(0), 1 + 2 + 1);
        for (ci, (si, segs)) in calls.iter().enumerate() {
            let (cols, out_dim) = shapes[*si];
            let x = rng.vec(rows * cols, 1.0);
            let base = rng.vec(rows * out_dim, 1.0);
            let dx = s.clone_htod(&x).unwrap();
            let mut planned = s.clone_htod(&base).unwrap();
            sgmv_planned(
                &gpu,
                &plan,
                ci,
                &dx.as_view(),
                cols,
                &mut planned.as_view_mut(),
                out_dim,
            )
            .unwrap();
            let mut single = s.clone_htod(&base).unwrap();
            sgmv(
                &gpu,
                &dx.as_view(),
                cols,
                &mut single.as_view_mut(),
                out_dim,
                &seg_lists[ci],
            )
            .unwrap();
            let (got, one) = (
                s.clone_dtoh(&planned).unwrap(),
                s.clone_dtoh(&single).unwrap(),
            );
            // The same kernels on the same items: bit for bit.
            assert!(
                got.iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "call {ci}: planned and single-call sgmv differ"
            );
            let hs: Vec<(Range<usize>, &HostLora)> = segs
                .iter()
                .map(|(r, ai)| (r.clone(), &host[*si][*ai]))
                .collect();
            let (want, bound) = reference_and_bound(&x, cols, &base, out_dim, &hs);
            for i in 0..rows * out_dim {
                assert!(
                    ((got[i] - want[i]).abs() as f64) <= bound[i],
                    "call {ci} [{cols}→{out_dim}] element {i}: gpu {} cpu {} bound {}",
                    got[i],
                    want[i],
                    bound[i]
                );
            }
            // The wrong shape for the call is refused.
            if !segs.iter().all(|(r, _)| r.is_empty()) {
                assert!(matches!(
                    sgmv_planned(
                        &gpu,
                        &plan,
                        ci,
                        &dx.as_view(),
                        cols,
                        &mut planned.as_view_mut(),
                        out_dim + 1
                    ),
                    Err(CudaError::Shape(_))
                ));
            }
        }
        // Out of range call, too-short buffers.
        let x = s.alloc_zeros::<f32>(rows * 96).unwrap();
        let mut out = s.alloc_zeros::<f32>(rows * 40).unwrap();
        assert!(
            sgmv_planned(
                &gpu,
                &plan,
                99,
                &x.as_view(),
                96,
                &mut out.as_view_mut(),
                40
            )
            .is_err()
        );
        let short = x.slice(..20 * 96);
        assert!(sgmv_planned(&gpu, &plan, 0, &short, 96, &mut out.as_view_mut(), 40).is_err());
    }

    #[test]
    fn sgmv_plan_validates_every_call() {
        let Some(gpu) = gpu_or_skip("lora::sgmv_plan_validates_every_call") else {
            return;
        };
        let l = GpuLora::upload(&gpu, &[0.1; 8], &[0.2; 6], 2, 4, 3, 1.0).unwrap();
        let other = GpuLora::upload(&gpu, &[0.1; 10], &[0.2; 6], 2, 5, 3, 1.0).unwrap();
        let seg = |rows: Range<usize>, lora| GpuLoraSegment { rows, lora };
        // A good call followed by a bad one: the whole plan is refused.
        for bad in [
            vec![seg(0..2, &l), seg(1..3, &l)],
            vec![seg(0..2, &l), seg(2..3, &other)],
            vec![seg(Range { start: 3, end: 2 }, &l)],
        ] {
            assert!(matches!(
                sgmv_plan(&gpu, &[vec![seg(0..1, &l)], bad]),
                Err(CudaError::Shape(_))
            ));
        }
        let plan = sgmv_plan(&gpu, &[vec![], vec![seg(0..1, &other)]]).unwrap();
        assert_eq!(plan.items(1), 1);
        assert!(sgmv_plan(&gpu, &[]).unwrap().is_empty());
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
