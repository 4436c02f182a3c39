//! The paged KV cache in device memory: [`GpuKvPool`], the CUDA twin of [`crate::cpu::kv::KvPool`].
//!
//! Same geometry, layout and dtype semantics as the CPU pool (see `cpu/kv.rs`): every per-page
//! array is `[page][layer][kv_head][slot][channel]`, f16 elements are rounded to nearest even,
//! INT4 pages are written in f32 and quantized by [`GpuKvPool::seal`] with exactly the CPU's
//! arithmetic (keys per channel over the page, values per token, f16 scale/min rounded outward),
//! and every dtype keeps per-channel key min/max per (page, layer, kv_head) for page selection.
//! Given the same writes and seals, the device pool holds bit-identical contents.
//!
//! Open INT4 pages live in f32 *staging slots* (`[K|V][kv_head][slot][channel]`, as the CPU's staging
//! copy); the slot of each open (page, layer) is tracked on the host (to allocate slots) and mirrored
//! in a device table `stage[page][layer]` (slot + 1, 0 = none) that the write / seal / reopen kernels
//! update themselves and `free` clears, in stream order. Attention reads the table on the device, so
//! an attention plan built once per step stays valid while pages are written and sealed between
//! layers, with no upload. The staging buffer grows (doubling) when every slot is taken, so only open
//! pages pay for it. Page bookkeeping (free list, filled / sealed flags) is on the host.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg};

use super::attention::MODULE;
use super::{CudaError, Gpu, blocks_for, shape};
use crate::cpu::kv::{KvDtype, KvGeometry, PageId};

pub(crate) const DTYPE_F32: i32 = 0;
pub(crate) const DTYPE_F16: i32 = 1;
pub(crate) const DTYPE_INT4: i32 = 2;

/// Largest head_dim the attention kernels take (a lane accumulates `head_dim / 32 <= 8` channels).
pub const MAX_HEAD_DIM: usize = 256;

/// Device arrays; those the dtype does not use are one-element placeholders.
pub(crate) struct DevStore {
    pub kf: CudaSlice<f32>,
    pub vf: CudaSlice<f32>,
    pub kh: CudaSlice<u16>,
    pub vh: CudaSlice<u16>,
    pub kq: CudaSlice<u8>,
    pub vq: CudaSlice<u8>,
    pub ksc: CudaSlice<u16>,
    pub kmn: CudaSlice<u16>,
    pub vsc: CudaSlice<u16>,
    pub vmn: CudaSlice<u16>,
    /// INT4 staging slots, `staging_cap × slot_len` f32.
    pub stg: CudaSlice<f32>,
    /// Per (page, layer): INT4 staging slot + 1 (0: none), kept by the kernels.
    pub stage: CudaSlice<i32>,
    /// Key bounds, `[tile][channel]`.
    pub bmin: CudaSlice<f32>,
    pub bmax: CudaSlice<f32>,
}

/// A pool of KV pages in device memory. See the module docs.
pub struct GpuKvPool {
    geom: KvGeometry,
    dtype: KvDtype,
    n_pages: usize,
    stream: Arc<CudaStream>,
    fill_bounds: CudaFunction,
    sm_count: usize,
    pub(crate) store: DevStore,
    /// Per (page, layer): highest written slot + 1.
    filled: Vec<usize>,
    /// Per (page, layer): sealed.
    sealed: Vec<bool>,
    in_use: Vec<bool>,
    free_list: Vec<PageId>,
    /// Per (page, layer): the INT4 staging slot of an open page that has been written.
    staging_of: Vec<Option<u32>>,
    staging_free: Vec<u32>,
    staging_cap: usize,
    /// An error from [`Self::free`] (which cannot return one), reported by the next fallible call.
    deferred: Option<CudaError>,
}

impl GpuKvPool {
    /// A pool of `n_pages` free pages on `gpu`. Same validation as the CPU pool, plus the kernels'
    /// limits (32-bit page ids and element offsets that fit their index arithmetic).
    pub fn new(
        gpu: &Gpu,
        geom: KvGeometry,
        dtype: KvDtype,
        n_pages: usize,
    ) -> Result<Self, CudaError> {
        let KvGeometry {
            page_size: ps,
            n_layers: l,
            n_kv_heads: h,
            head_dim: d,
        } = geom;
        if ps == 0 || l == 0 || h == 0 || d == 0 {
            return Err(shape(format!(
                "KV geometry: all dimensions must be >= 1, got {geom:?}"
            )));
        }
        if d % 2 != 0 {
            return Err(shape(format!(
                "KV geometry: head_dim must be even, got {d}"
            )));
        }
        let mul = |xs: &[usize]| xs.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        let tiles = mul(&[n_pages, l, h]);
        let elems = tiles.and_then(|t| mul(&[t, ps, d]));
        let (Some(tiles), Some(elems)) = (tiles, elems) else {
            return Err(shape(format!("KV pool of {n_pages} pages overflows")));
        };
        if n_pages > i32::MAX as usize
            || mul(&[h, d]).is_none_or(|w| w > i32::MAX as usize)
            || mul(&[2, h, ps, d]).is_none_or(|w| w > i32::MAX as usize)
            || elems > i64::MAX as usize / 4
        {
            return Err(shape(format!(
                "KV pool of {n_pages} pages × {geom:?} exceeds the kernels' index range"
            )));
        }
        let s = gpu.stream().clone();
        let one_f32 = || s.alloc_zeros::<f32>(1);
        let one_u16 = || s.alloc_zeros::<u16>(1);
        let one_u8 = || s.alloc_zeros::<u8>(1);
        let n = elems.max(1);
        let (kf, vf) = if dtype == KvDtype::F32 {
            (s.alloc_zeros(n)?, s.alloc_zeros(n)?)
        } else {
            (one_f32()?, one_f32()?)
        };
        let (kh, vh) = if dtype == KvDtype::F16 {
            (s.alloc_zeros(n)?, s.alloc_zeros(n)?)
        } else {
            (one_u16()?, one_u16()?)
        };
        let int4 = dtype == KvDtype::Int4;
        let staging_cap = if int4 {
            (n_pages * l).min(4 * l).max(1)
        } else {
            0
        };
        let slot_len = 2 * h * ps * d;
        let store = DevStore {
            kf,
            vf,
            kh,
            vh,
            kq: if int4 {
                s.alloc_zeros((n / 2).max(1))?
            } else {
                one_u8()?
            },
            vq: if int4 {
                s.alloc_zeros((n / 2).max(1))?
            } else {
                one_u8()?
            },
            ksc: if int4 {
                s.alloc_zeros((tiles * d).max(1))?
            } else {
                one_u16()?
            },
            kmn: if int4 {
                s.alloc_zeros((tiles * d).max(1))?
            } else {
                one_u16()?
            },
            vsc: if int4 {
                s.alloc_zeros((tiles * ps).max(1))?
            } else {
                one_u16()?
            },
            vmn: if int4 {
                s.alloc_zeros((tiles * ps).max(1))?
            } else {
                one_u16()?
            },
            stg: if int4 {
                s.alloc_zeros((staging_cap * slot_len).max(1))?
            } else {
                one_f32()?
            },
            stage: s.alloc_zeros((n_pages * l).max(1))?,
            bmin: s.alloc_zeros((tiles * d).max(1))?,
            bmax: s.alloc_zeros((tiles * d).max(1))?,
        };
        let sm_count = gpu
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map(|c| c.max(1) as usize)
            .unwrap_or(1);
        let mut pool = Self {
            geom,
            dtype,
            n_pages,
            stream: s.clone(),
            fill_bounds: gpu.function(MODULE.name, "kv_fill_bounds")?.clone(),
            sm_count,
            store,
            filled: vec![0; n_pages * l],
            sealed: vec![false; n_pages * l],
            in_use: vec![false; n_pages],
            free_list: (0..n_pages as PageId).rev().collect(),
            staging_of: vec![None; n_pages * l],
            staging_free: (0..staging_cap as u32).rev().collect(),
            staging_cap,
            deferred: None,
        };
        pool.reset_bounds(0..tiles * d)?;
        Ok(pool)
    }

    pub fn geometry(&self) -> &KvGeometry {
        &self.geom
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Total number of pages.
    pub fn capacity(&self) -> usize {
        self.n_pages
    }

    /// Pages currently free.
    pub fn free_count(&self) -> usize {
        self.free_list.len()
    }

    /// Streaming multiprocessors of the device (sizes the split-K grid).
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// Takes a free page (empty and open in every layer); `None` when the pool is exhausted. A
    /// fresh pool hands out 0, 1, 2, ... like the CPU pool.
    pub fn alloc(&mut self) -> Option<PageId> {
        let page = self.free_list.pop()?;
        self.in_use[page as usize] = true;
        Some(page)
    }

    /// Returns `page` to the free list and resets it as the CPU pool does (contents zeroed, key
    /// bounds emptied, every layer open, staging released). The device work is queued on the
    /// pool's stream; a launch error is reported by the next `write_rows` / `seal`. Freeing a page
    /// that is not allocated trips a debug assertion and is otherwise ignored.
    pub fn free(&mut self, page: PageId) {
        let p = page as usize;
        let ok = p < self.n_pages && self.in_use[p];
        debug_assert!(ok, "free of page {page} that is not allocated");
        if !ok {
            return;
        }
        let KvGeometry {
            page_size: ps,
            n_layers: l,
            n_kv_heads: h,
            head_dim: d,
        } = self.geom;
        let tiles = p * l * h..(p + 1) * l * h;
        let elems = tiles.start * ps * d..tiles.end * ps * d;
        let chans = tiles.start * d..tiles.end * d;
        let metas = tiles.start * ps..tiles.end * ps;
        if let Err(e) = self.zero_page(elems, chans.clone(), metas) {
            self.deferred.get_or_insert(e);
        }
        if let Err(e) = self.reset_bounds(chans) {
            self.deferred.get_or_insert(e);
        }
        let stages = p * l..(p + 1) * l;
        if let Err(e) = self
            .stream
            .memset_zeros(&mut self.store.stage.slice_mut(stages))
        {
            self.deferred.get_or_insert(CudaError::Driver(e));
        }
        for pl in p * l..(p + 1) * l {
            if let Some(slot) = self.staging_of[pl].take() {
                self.staging_free.push(slot);
            }
        }
        self.filled[p * l..(p + 1) * l].fill(0);
        self.sealed[p * l..(p + 1) * l].fill(false);
        self.in_use[p] = false;
        self.free_list.push(page);
    }

    fn zero_page(
        &mut self,
        elems: std::ops::Range<usize>,
        chans: std::ops::Range<usize>,
        metas: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        let s = &self.stream;
        let st = &mut self.store;
        match self.dtype {
            KvDtype::F32 => {
                s.memset_zeros(&mut st.kf.slice_mut(elems.clone()))?;
                s.memset_zeros(&mut st.vf.slice_mut(elems))?;
            }
            KvDtype::F16 => {
                s.memset_zeros(&mut st.kh.slice_mut(elems.clone()))?;
                s.memset_zeros(&mut st.vh.slice_mut(elems))?;
            }
            KvDtype::Int4 => {
                let codes = elems.start / 2..elems.end / 2;
                s.memset_zeros(&mut st.kq.slice_mut(codes.clone()))?;
                s.memset_zeros(&mut st.vq.slice_mut(codes))?;
                s.memset_zeros(&mut st.ksc.slice_mut(chans.clone()))?;
                s.memset_zeros(&mut st.kmn.slice_mut(chans))?;
                s.memset_zeros(&mut st.vsc.slice_mut(metas.clone()))?;
                s.memset_zeros(&mut st.vmn.slice_mut(metas))?;
            }
        }
        Ok(())
    }

    /// Key bounds `range` (indices into `[tile][channel]`) back to +inf / -inf.
    fn reset_bounds(&mut self, range: std::ops::Range<usize>) -> Result<(), CudaError> {
        if range.is_empty() {
            return Ok(());
        }
        let n = range.len() as i64;
        let grid = blocks_for(range.len(), 256).min(65535);
        let mut lo = self.store.bmin.slice_mut(range.clone());
        let mut hi = self.store.bmax.slice_mut(range);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: kv_fill_bounds(float* bmin, float* bmax, long long n); both views hold n floats.
        unsafe {
            self.stream
                .launch_builder(&self.fill_bounds)
                .arg(&mut lo)
                .arg(&mut hi)
                .arg(&n)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// Bytes one page occupies across all layers in its sealed form (same formula as the CPU pool:
    /// K and V elements, INT4 metadata, f32 key bounds; INT4 staging excluded).
    pub fn bytes_per_page(&self) -> usize {
        let KvGeometry {
            page_size: ps,
            n_layers: l,
            n_kv_heads: h,
            head_dim: d,
        } = self.geom;
        let kv = match self.dtype {
            KvDtype::F32 => 2 * ps * d * 4,
            KvDtype::F16 => 2 * ps * d * 2,
            KvDtype::Int4 => ps * d + d * 4 + ps * 4,
        };
        l * h * (kv + 2 * d * 4)
    }

    /// Whether (layer, page) has been sealed since it was allocated (or last reopened).
    pub fn is_sealed(&self, layer: usize, page: PageId) -> bool {
        self.sealed[self.pl(layer, page)]
    }

    /// Slots written so far on (layer, page): the highest written slot + 1.
    pub fn filled(&self, layer: usize, page: PageId) -> usize {
        self.filled[self.pl(layer, page)]
    }

    pub(crate) fn dtype_code(&self) -> i32 {
        match self.dtype {
            KvDtype::F32 => DTYPE_F32,
            KvDtype::F16 => DTYPE_F16,
            KvDtype::Int4 => DTYPE_INT4,
        }
    }

    /// The staging slot of (layer, page) (host copy of the device table): -1 when the page is
    /// sealed, not INT4 or never written.
    pub(crate) fn stage_of(&self, layer: usize, page: PageId) -> i32 {
        self.staging_of[self.pl(layer, page)].map_or(-1, |s| s as i32)
    }

    pub(crate) fn in_use(&self, page: PageId) -> bool {
        self.in_use.get(page as usize) == Some(&true)
    }

    pub(crate) fn take_deferred(&mut self) -> Result<(), CudaError> {
        match self.deferred.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn pl(&self, layer: usize, page: PageId) -> usize {
        debug_assert!(layer < self.geom.n_layers && (page as usize) < self.n_pages);
        page as usize * self.geom.n_layers + layer
    }

    fn slot_len(&self) -> usize {
        2 * self.geom.n_kv_heads * self.geom.page_size * self.geom.head_dim
    }

    /// A zeroed staging slot, growing the staging buffer when all are taken.
    fn take_staging(&mut self) -> Result<u32, CudaError> {
        if self.staging_free.is_empty() {
            let limit = self.n_pages * self.geom.n_layers;
            let new_cap = (self.staging_cap * 2).clamp(1, limit.max(1));
            if new_cap <= self.staging_cap {
                return Err(shape(
                    "INT4 staging: every (page, layer) already has a slot".into(),
                ));
            }
            let len = self.slot_len();
            let mut bigger = self.stream.alloc_zeros::<f32>(new_cap * len)?;
            if self.staging_cap > 0 {
                self.stream.memcpy_dtod(
                    &self.store.stg.slice(0..self.staging_cap * len),
                    &mut bigger.slice_mut(0..self.staging_cap * len),
                )?;
            }
            self.store.stg = bigger;
            self.staging_free
                .extend((self.staging_cap as u32..new_cap as u32).rev());
            self.staging_cap = new_cap;
        }
        let slot = self.staging_free.pop().expect("a free staging slot");
        let len = self.slot_len();
        let range = slot as usize * len..(slot as usize + 1) * len;
        self.stream
            .memset_zeros(&mut self.store.stg.slice_mut(range))?;
        Ok(slot)
    }

    /// Writes rows' keys and values (device arrays `[rows × kv_dim]`, `kv_dim = n_kv_heads ·
    /// head_dim`, after RoPE) at `(pages[r], slots[r])` of `layer` and widens the pages' key
    /// bounds; one launch for all rows. Rows must target distinct slots (the device writes them
    /// concurrently). Writing into a sealed INT4 page reopens it, as on the CPU.
    pub fn write_rows(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
        pages: &[PageId],
        slots: &[usize],
    ) -> Result<(), CudaError> {
        self.take_deferred()?;
        let KvGeometry {
            page_size: ps,
            n_layers: l,
            n_kv_heads: h,
            head_dim: d,
        } = self.geom;
        let rows = pages.len();
        let w = h * d;
        if layer >= l {
            return Err(shape(format!("write_rows: layer {layer} of {l}")));
        }
        if slots.len() != rows || k.len() != rows * w || v.len() != rows * w {
            return Err(shape(format!(
                "write_rows: {rows} pages, {} slots, k {} and v {} elements (want rows × {w})",
                slots.len(),
                k.len(),
                v.len()
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        if rows > i32::MAX as usize {
            return Err(shape(format!("write_rows: {rows} rows")));
        }
        for (&p, &s) in pages.iter().zip(slots) {
            if !self.in_use(p) || s >= ps {
                return Err(shape(format!(
                    "write_rows: page {p} (allocated: {}) slot {s} of {ps}",
                    self.in_use(p)
                )));
            }
        }
        let int4 = self.dtype == KvDtype::Int4;
        let mut info = Vec::with_capacity(3 * rows);
        for (&p, &s) in pages.iter().zip(slots) {
            let pl = self.pl(layer, p);
            let mut stage = -1;
            if int4 {
                if self.sealed[pl] {
                    self.reopen(gpu, layer, p)?;
                }
                if self.staging_of[pl].is_none() {
                    self.staging_of[pl] = Some(self.take_staging()?);
                }
                stage = self.staging_of[pl].expect("staging slot") as i32;
            }
            info.extend_from_slice(&[p as i32, s as i32, stage]);
        }
        let s = self.stream.clone();
        let d_info = s.clone_htod(&info)?;
        let (dt, li, nl, nk, psi, di) = (
            self.dtype_code(),
            layer as i32,
            l as i32,
            h as i32,
            ps as i32,
            d as i32,
        );
        let st = &mut self.store;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (w.clamp(32, 256).next_multiple_of(32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(MODULE.name, "kv_write_rows")?;
        // SAFETY: kv_write_rows(const float* k, const float* v, const int* rowinfo, float* kf,
        // float* vf, u16* kh, u16* vh, float* stg, int* stage_tab, float* bmin, float* bmax,
        // int dtype, int layer, int n_layers, int n_kv, int ps, int d). Every page is allocated
        // (< capacity), every slot < ps, every INT4 row has a staging slot < staging_cap, k / v
        // hold rows × n_kv·d, stage_tab n_pages × n_layers.
        unsafe {
            s.launch_builder(f)
                .arg(k)
                .arg(v)
                .arg(&d_info)
                .arg(&mut st.kf)
                .arg(&mut st.vf)
                .arg(&mut st.kh)
                .arg(&mut st.vh)
                .arg(&mut st.stg)
                .arg(&mut st.stage)
                .arg(&mut st.bmin)
                .arg(&mut st.bmax)
                .arg(&dt)
                .arg(&li)
                .arg(&nl)
                .arg(&nk)
                .arg(&psi)
                .arg(&di)
                .launch(cfg)?;
        }
        for (&p, &s) in pages.iter().zip(slots) {
            let pl = self.pl(layer, p);
            self.filled[pl] = self.filled[pl].max(s + 1);
        }
        Ok(())
    }

    /// Marks (layer, page) as full or final. INT4: quantizes its written slots exactly as the CPU
    /// pool does and releases the staging slot; F32 / F16: only records the state. Idempotent.
    pub fn seal(&mut self, gpu: &Gpu, layer: usize, page: PageId) -> Result<(), CudaError> {
        self.take_deferred()?;
        if layer >= self.geom.n_layers || page as usize >= self.n_pages {
            return Err(shape(format!(
                "seal: layer {layer} / page {page} out of range ({} layers, {} pages)",
                self.geom.n_layers, self.n_pages
            )));
        }
        let pl = self.pl(layer, page);
        if self.sealed[pl] {
            return Ok(());
        }
        self.sealed[pl] = true;
        let Some(stage) = self.staging_of[pl].take() else {
            return Ok(());
        };
        let KvGeometry {
            page_size: ps,
            n_layers: l,
            n_kv_heads: h,
            head_dim: d,
        } = self.geom;
        let n = self.filled[pl];
        let s = self.stream.clone();
        let st = &mut self.store;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: ((2 * d + 2 * ps) * 4) as u32,
        };
        let f = gpu.function(MODULE.name, "kv_seal_int4")?;
        let args = [
            stage as i32,
            page as i32,
            layer as i32,
            l as i32,
            h as i32,
            ps as i32,
            d as i32,
            n as i32,
        ];
        // SAFETY: kv_seal_int4(const float* stg, int stage, int* stage_tab, u8* kq, u8* vq,
        // u16* ksc, u16* kmn, u16* vsc, u16* vmn, int page, int layer, int n_layers, int n_kv,
        // int ps, int d, int n); stage < staging_cap, page < capacity, n <= ps; shared memory holds
        // 2d + 2ps floats.
        unsafe {
            s.launch_builder(f)
                .arg(&st.stg)
                .arg(&args[0])
                .arg(&mut st.stage)
                .arg(&mut st.kq)
                .arg(&mut st.vq)
                .arg(&mut st.ksc)
                .arg(&mut st.kmn)
                .arg(&mut st.vsc)
                .arg(&mut st.vmn)
                .arg(&args[1])
                .arg(&args[2])
                .arg(&args[3])
                .arg(&args[4])
                .arg(&args[5])
                .arg(&args[6])
                .arg(&args[7])
                .launch(cfg)?;
        }
        self.staging_free.push(stage);
        Ok(())
    }

    /// Turns a sealed INT4 (layer, page) back into an open one (its written slots dequantized into
    /// a fresh staging slot, keeping their quantization error), as `KvPool::reopen`.
    fn reopen(&mut self, gpu: &Gpu, layer: usize, page: PageId) -> Result<(), CudaError> {
        let pl = self.pl(layer, page);
        let stage = self.take_staging()?;
        let KvGeometry {
            page_size: ps,
            n_layers: l,
            n_kv_heads: h,
            head_dim: d,
        } = self.geom;
        let n = self.filled[pl];
        let s = self.stream.clone();
        let st = &mut self.store;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(MODULE.name, "kv_reopen_int4")?;
        let args = [
            stage as i32,
            page as i32,
            layer as i32,
            l as i32,
            h as i32,
            ps as i32,
            d as i32,
            n as i32,
        ];
        // SAFETY: kv_reopen_int4(const u8* kq, const u8* vq, const u16* ksc, const u16* kmn,
        // const u16* vsc, const u16* vmn, float* stg, int* stage_tab, int stage, int page,
        // int layer, int n_layers, int n_kv, int ps, int d, int n); indices in range as for seal.
        unsafe {
            s.launch_builder(f)
                .arg(&st.kq)
                .arg(&st.vq)
                .arg(&st.ksc)
                .arg(&st.kmn)
                .arg(&st.vsc)
                .arg(&st.vmn)
                .arg(&mut st.stg)
                .arg(&mut st.stage)
                .arg(&args[0])
                .arg(&args[1])
                .arg(&args[2])
                .arg(&args[3])
                .arg(&args[4])
                .arg(&args[5])
                .arg(&args[6])
                .arg(&args[7])
                .launch(cfg)?;
        }
        self.staging_of[pl] = Some(stage);
        self.sealed[pl] = false;
        Ok(())
    }

    /// Reads back token `slot` of (layer, page), all KV heads, decoded to f32 on the device through
    /// the attention kernels' decode path (`n_kv_heads · head_dim` each). For tests and checks.
    pub fn read_token(
        &self,
        gpu: &Gpu,
        layer: usize,
        page: PageId,
        slot: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        let KvGeometry {
            page_size: ps,
            n_layers: l,
            n_kv_heads: h,
            head_dim: d,
        } = self.geom;
        if layer >= l || page as usize >= self.n_pages || slot >= ps {
            return Err(shape(format!(
                "read_token: layer {layer} page {page} slot {slot} out of range"
            )));
        }
        let s = &self.stream;
        let mut ko = s.alloc_zeros::<f32>(h * d)?;
        let mut vo = s.alloc_zeros::<f32>(h * d)?;
        let st = &self.store;
        let args = [
            self.dtype_code(),
            page as i32,
            self.stage_of(layer, page),
            layer as i32,
            slot as i32,
            l as i32,
            h as i32,
            ps as i32,
            d as i32,
        ];
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(MODULE.name, "kv_read_token")?;
        // SAFETY: kv_read_token(kf, vf, kh, vh, kq, vq, ksc, kmn, vsc, vmn, stg, int dtype,
        // int page, int stage, int layer, int slot, int n_layers, int n_kv, int ps, int d,
        // float* kout, float* vout); outputs hold n_kv·d floats, indices checked above.
        unsafe {
            s.launch_builder(f)
                .arg(&st.kf)
                .arg(&st.vf)
                .arg(&st.kh)
                .arg(&st.vh)
                .arg(&st.kq)
                .arg(&st.vq)
                .arg(&st.ksc)
                .arg(&st.kmn)
                .arg(&st.vsc)
                .arg(&st.vmn)
                .arg(&st.stg)
                .arg(&args[0])
                .arg(&args[1])
                .arg(&args[2])
                .arg(&args[3])
                .arg(&args[4])
                .arg(&args[5])
                .arg(&args[6])
                .arg(&args[7])
                .arg(&args[8])
                .arg(&mut ko)
                .arg(&mut vo)
                .launch(cfg)?;
        }
        Ok((s.clone_dtoh(&ko)?, s.clone_dtoh(&vo)?))
    }

    /// Per-channel key min and max (each `head_dim`) of (layer, page, kv_head), downloaded.
    pub fn key_bounds(
        &self,
        layer: usize,
        page: PageId,
        kv_head: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        if layer >= self.geom.n_layers
            || page as usize >= self.n_pages
            || kv_head >= self.geom.n_kv_heads
        {
            return Err(shape(format!(
                "key_bounds: layer {layer} page {page} kv head {kv_head} out of range"
            )));
        }
        let d = self.geom.head_dim;
        let off = (self.pl(layer, page) * self.geom.n_kv_heads + kv_head) * d;
        let s = &self.stream;
        Ok((
            s.clone_dtoh(&self.store.bmin.slice(off..off + d))?,
            s.clone_dtoh(&self.store.bmax.slice(off..off + d))?,
        ))
    }
}
