//! Linear layers on the GPU (`linear.cu`): INT4 / Q8 / f32 weights times f32 activations, and the
//! embedding gather.
//!
//! [`GpuWeight::upload`] repacks a [`Weight`] into the device layout described at the top of
//! `linear.cu`: rows in tiles of [`TILE_N`] = 32 (lane `L` of a warp owns row `32·tile + L`),
//! columns in the formats' 32-column blocks (a row is padded only to whole blocks), and for each
//! (tile, block) the 32 rows' data contiguous, so a warp's weight loads are coalesced 16-byte
//! accesses. Device bytes are the format's own bytes plus at most 31 padding rows. Dequantization
//! is bit-exact with the CPU reference (`(q - z)·d`, unfused `d·q + m`, `q·d`); only the order of
//! the f32 sums differs.
//!
//! Products with `m ≤ 32` activation rows run one GEMV launch (every weight byte read once, each
//! staged activation value used by the 32 rows of a warp; one instantiation per bound on m: 1, 2,
//! 4, 8, 12, 16, 24, 32), up to [`GEMM_ALWAYS_M`] rows as GEMV launches of 32 rows when the GEMM
//! grid would be small, and larger `m` the tiled GEMM kernel.
//!
//! INT4 GEMV has two kernel families ([`Int4Gemv`]): the block-scaled one (default: the block's
//! scale applied once per 32 columns, codes turned into exact floats by one byte permute, and
//! split-K over several blocks per row tile when the tiles alone would leave the GPU idle, merged
//! deterministically in the same launch) and the first version (per-weight dequantization, bit-
//! exact weights as the CPU), kept to compare against (`EDGELORA_INT4_GEMV=per-weight`).
//!
//! The fast mode's int8 activations ([`super::qact::GpuActQ8`]) go through
//! [`GpuWeight::matmul_q8`] (`gemvq_*`: `dp4a` over INT4 or Q8 codes, the activation blocks' scales
//! and sums and the exact outliers as the CPU's int8 product; m ≤ 32).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::qact::GpuActQ8;
use super::{CudaError, Gpu, KernelModule, as_i32, shape};
use crate::{DenseMatrix, Q4Kind, Q4Matrix, Q8Matrix, QK, TILE_ROWS, Weight};

pub const MODULE: KernelModule = KernelModule {
    name: "linear",
    source: include_str!("../../cuda/linear.cu"),
    functions: &[
        "gemv_q4zp_m1",
        "gemv_q4zp_m2",
        "gemv_q4zp_m4",
        "gemv_q4zp_m8",
        "gemv_q4zp_m12",
        "gemv_q4zp_m16",
        "gemv_q4zp_m24",
        "gemv_q4zp_m32",
        "gemv_q4af_m1",
        "gemv_q4af_m2",
        "gemv_q4af_m4",
        "gemv_q4af_m8",
        "gemv_q4af_m12",
        "gemv_q4af_m16",
        "gemv_q4af_m24",
        "gemv_q4af_m32",
        "gemv4_q4zp_m1",
        "gemv4_q4zp_m2",
        "gemv4_q4zp_m4",
        "gemv4_q4zp_m8",
        "gemv4_q4zp_m12",
        "gemv4_q4zp_m16",
        "gemv4_q4zp_m24",
        "gemv4_q4zp_m32",
        "gemv4_q4af_m1",
        "gemv4_q4af_m2",
        "gemv4_q4af_m4",
        "gemv4_q4af_m8",
        "gemv4_q4af_m12",
        "gemv4_q4af_m16",
        "gemv4_q4af_m24",
        "gemv4_q4af_m32",
        "gemv_q8_m1",
        "gemv_q8_m2",
        "gemv_q8_m4",
        "gemv_q8_m8",
        "gemv_q8_m12",
        "gemv_q8_m16",
        "gemv_q8_m24",
        "gemv_q8_m32",
        "gemv_f32_m1",
        "gemv_f32_m2",
        "gemv_f32_m4",
        "gemv_f32_m8",
        "gemv_f32_m12",
        "gemv_f32_m16",
        "gemv_f32_m24",
        "gemv_f32_m32",
        "gemvq_q4zp_m1",
        "gemvq_q4zp_m2",
        "gemvq_q4zp_m4",
        "gemvq_q4zp_m8",
        "gemvq_q4zp_m16",
        "gemvq_q4zp_m32",
        "gemvq_q4af_m1",
        "gemvq_q4af_m2",
        "gemvq_q4af_m4",
        "gemvq_q4af_m8",
        "gemvq_q4af_m16",
        "gemvq_q4af_m32",
        "gemvq_q8_m1",
        "gemvq_q8_m2",
        "gemvq_q8_m4",
        "gemvq_q8_m8",
        "gemvq_q8_m16",
        "gemvq_q8_m32",
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

/// Which INT4 GEMV kernels run (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int4Gemv {
    /// `gemv4_*`: per-block scaling and split-K, the next block prefetched into registers (the
    /// default).
    BlockScaled,
    /// `gemv_q4*`: per-weight dequantization, one block per row tile (the first version).
    PerWeight,
}

impl Int4Gemv {
    /// The process default, [`Int4Gemv::BlockScaled`]; `EDGELORA_INT4_GEMV=per-weight` picks the
    /// first version (to compare them).
    pub fn from_env() -> Self {
        static V: std::sync::OnceLock<Int4Gemv> = std::sync::OnceLock::new();
        *V.get_or_init(|| match std::env::var("EDGELORA_INT4_GEMV").as_deref() {
            Ok("per-weight") => Int4Gemv::PerWeight,
            _ => Int4Gemv::BlockScaled,
        })
    }
}

/// Split-K scratch every [`Gpu`] holds for the block-scaled INT4 GEMV: partial sums
/// (`splits · m · rowpad` floats at most) and one arrival counter per row tile.
pub const SPLITK_PART_FLOATS: usize = 1 << 20;
pub const SPLITK_TILES: usize = 1 << 12;
/// Most splits of one row tile's columns.
const MAX_SPLITS: usize = 8;
/// Resident GEMV blocks per multiprocessor the split count aims for (`EDGELORA_GEMV_BLOCKS_PER_SM`
/// overrides it, for benchmarking the heuristic).
const GEMV_BLOCKS_PER_SM: usize = 2;

fn gemv_blocks_per_sm() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("EDGELORA_GEMV_BLOCKS_PER_SM")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .unwrap_or(GEMV_BLOCKS_PER_SM)
    })
}

/// Output rows per tile of the device layout (one per lane of a warp; `TILE_N` in `linear.cu`).
pub const TILE_N: usize = 32;
/// Activation rows one GEMV launch handles.
pub const GEMV_MAX_M: usize = 32;
/// Bounds on m the GEMV kernels are instantiated for, with the most warps per block each allows
/// (`GW` in `linear.cu`: its shared memory holds `GW · MAXM · 32` floats).
const GEMV_BOUNDS: [(usize, usize); 8] = [
    (1, 16),
    (2, 16),
    (4, 16),
    (8, 16),
    (12, 16),
    (16, 16),
    (24, 8),
    (32, 8),
];
/// `gemvq_*` instantiations: (bound on m, most warps per block).
const GEMVQ_BOUNDS: [(usize, usize); 6] = [(1, 16), (2, 16), (4, 16), (8, 16), (16, 16), (32, 8)];
/// From this many rows on, the GEMM kernel runs whatever its grid; between [`GEMV_MAX_M`] and
/// this, GEMV launches of 32 rows run when the GEMM grid would cover less than half of the
/// multiprocessors.
pub const GEMM_ALWAYS_M: usize = 96;
const GEMM_BM: usize = 64;
const GEMM_BN: usize = 128;
const GEMM_THREADS: u32 = 256;
const GATHER_THREADS: u32 = 256;

enum Store {
    /// Codes `[rowpad/32][KB][32][4]` u32 and metadata `[rowpad/32][KB][32]` u32 (`d | m << 16`).
    Q4 {
        kind: Q4Kind,
        qs: CudaSlice<u32>,
        dm: CudaSlice<u32>,
    },
    /// Codes `[rowpad/32][KB][2][32][4]` u32 and scales `[rowpad/32][KB][32]` u16.
    Q8 {
        qs: CudaSlice<u32>,
        d: CudaSlice<u16>,
    },
    /// `[rowpad/32][KB][8][32][4]`.
    F32 { w: CudaSlice<f32> },
}

/// A projection's weight on the device, in the format it was loaded in.
pub struct GpuWeight {
    rows: usize,
    cols: usize,
    /// Column blocks per row (`KB`).
    kb: usize,
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

/// Column blocks of [`QK`] columns for `cols` columns.
fn blocks_for(cols: usize) -> usize {
    cols.div_ceil(QK)
}

/// Rows as stored on the device (whole tiles of [`TILE_N`]).
fn rows_padded(rows: usize) -> usize {
    rows.div_ceil(TILE_N) * TILE_N
}

/// Index of the tile-block (tile of row `n`, block `b`) in a layout with `kb` blocks per row.
fn tile_block(n: usize, b: usize, kb: usize) -> usize {
    (n / TILE_N) * kb + b
}

/// Where column `c` of row `n` lives in the INT4 codes: (u32 word, bit shift).
fn q4_pos(n: usize, c: usize, kb: usize) -> (usize, u32) {
    let (b, k) = (c / QK, c % QK);
    let tb = tile_block(n, b, kb);
    ((tb * 32 + n % TILE_N) * 4 + k / 8, (4 * (k % 8)) as u32)
}

/// Where column `c` of row `n` lives in the Q8 codes: (u32 word, bit shift).
fn q8_pos(n: usize, c: usize, kb: usize) -> (usize, u32) {
    let (b, k) = (c / QK, c % QK);
    let tb = tile_block(n, b, kb);
    let (h, j, e) = (k / 16, (k / 4) % 4, k % 4);
    (((tb * 2 + h) * 32 + n % TILE_N) * 4 + j, (8 * e) as u32)
}

/// Index of block `b` of row `n` in the metadata (INT4) or scales (Q8).
fn meta_index(n: usize, b: usize, kb: usize) -> usize {
    tile_block(n, b, kb) * 32 + n % TILE_N
}

/// Index of column `c` of row `n` in the f32 layout.
fn f32_index(n: usize, c: usize, kb: usize) -> usize {
    let (b, k) = (c / QK, c % QK);
    let tb = tile_block(n, b, kb);
    ((tb * 8 + k / 4) * 32 + n % TILE_N) * 4 + k % 4
}

/// Runs `f(first_row, chunk_a, chunk_b)` over chunks of whole [`TILE_N`]-row tiles in parallel
/// (a tile's data is contiguous in every buffer); `a` holds `per_a` and `b` `per_b` elements per
/// row, and the chunks' layout indices are relative to `first_row`.
fn par_row_tiles<A: Send, B: Send>(
    a: &mut [A],
    per_a: usize,
    b: &mut [B],
    per_b: usize,
    rows: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tiles = rows.div_ceil(TILE_N);
    let rows_per = tiles.div_ceil(threads).max(1) * TILE_N;
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
    let (rows, kb) = (q.rows(), blocks_for(q.cols()));
    let (per_q, per_m) = (kb * 4, kb);
    let np = rows_padded(rows);
    let mut qs = vec![0u32; np * per_q];
    let mut dm = vec![0u32; np * per_m];
    par_row_tiles(&mut qs, per_q, &mut dm, per_m, rows, |n0, qs, dm| {
        let local_rows = (qs.len() / per_q).min(rows.saturating_sub(n0));
        for g in (0..local_rows).step_by(TILE_ROWS) {
            for (b, t) in q.group_tiles((n0 + g) / TILE_ROWS).iter().enumerate() {
                for r in 0..TILE_ROWS.min(local_rows - g) {
                    let n = g + r;
                    dm[meta_index(n, b, kb)] = t.d[r] as u32 | (t.m[r] as u32) << 16;
                    for k in 0..QK {
                        let (wi, shift) = q4_pos(n, b * QK + k, kb);
                        qs[wi] |= (t.code(r, k) as u32) << shift;
                    }
                }
            }
        }
    });
    (qs, dm)
}

/// Q8 codes and scales in the device layout.
fn pack_q8(q: &Q8Matrix) -> (Vec<u32>, Vec<u16>) {
    let (rows, kb) = (q.rows(), blocks_for(q.cols()));
    let (per_q, per_m) = (kb * 8, kb);
    let np = rows_padded(rows);
    let mut qs = vec![0u32; np * per_q];
    let mut d = vec![0u16; np * per_m];
    par_row_tiles(&mut qs, per_q, &mut d, per_m, rows, |n0, qs, d| {
        let local_rows = (qs.len() / per_q).min(rows.saturating_sub(n0));
        for g in (0..local_rows).step_by(TILE_ROWS) {
            for (b, t) in q.group_tiles((n0 + g) / TILE_ROWS).iter().enumerate() {
                for r in 0..TILE_ROWS.min(local_rows - g) {
                    let n = g + r;
                    d[meta_index(n, b, kb)] = t.d[r];
                    for k in 0..QK {
                        let (wi, shift) = q8_pos(n, b * QK + k, kb);
                        qs[wi] |= (t.q(r, k) as u8 as u32) << shift;
                    }
                }
            }
        }
    });
    (qs, d)
}

/// f32 weights in the device layout.
fn pack_f32(w: &DenseMatrix) -> Vec<f32> {
    let (rows, cols) = (w.rows(), w.cols());
    let kb = blocks_for(cols);
    let mut out = vec![0f32; rows_padded(rows) * kb * QK];
    for n in 0..rows {
        for (c, &v) in w.row(n).iter().enumerate() {
            out[f32_index(n, c, kb)] = v;
        }
    }
    out
}

impl GpuWeight {
    /// Repacks and copies a weight to the device (enqueued on the GPU's stream).
    pub fn upload(gpu: &Gpu, w: &Weight) -> Result<Self, CudaError> {
        let (rows, cols) = (w.rows(), w.cols());
        let kb = blocks_for(cols);
        let s = gpu.stream();
        // Device indices are computed in 64 bits; the kernels' ints hold rows, cols and KB.
        let elems = rows_padded(rows)
            .checked_mul(kb * QK)
            .ok_or_else(|| shape(format!("weight [{rows}, {cols}] is too large")))?;
        if elems > (1usize << 40) || rows == 0 || cols == 0 {
            return Err(shape(format!("weight [{rows}, {cols}] is not supported")));
        }
        as_i32(rows, "weight rows")?;
        as_i32(rows_padded(rows), "padded weight rows")?;
        as_i32(kb * QK, "padded weight columns")?;
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
            kb,
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
        self.matmul_with(gpu, x, m, out, Int4Gemv::from_env())
    }

    /// [`GpuWeight::matmul`] with the INT4 GEMV kernels named (other formats ignore it).
    pub fn matmul_with(
        &self,
        gpu: &Gpu,
        x: &CudaView<'_, f32>,
        m: usize,
        out: &mut CudaViewMut<'_, f32>,
        int4: Int4Gemv,
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
        // One GEMV launch reads the weights once for up to 32 rows; beyond that, GEMV launches of
        // 32 rows re-read them per launch, while the GEMM (about 25 TFLOP/s on an H100 with a
        // full grid) has one block per 64 × 128 outputs, too few for moderate m on a narrow
        // matrix (the old 8-row passes measured on an H100: [4096, 4096] at m = 64 239 us as
        // passes vs 357 us as a 32-block GEMM; [14336, 4096] 727 us vs 376 us as a 112-block
        // GEMM; at m = 128 the GEMM won on both).
        let gemm_blocks = self.rows.div_ceil(GEMM_BN) * m.div_ceil(GEMM_BM);
        let passes = m <= GEMV_MAX_M || (m < GEMM_ALWAYS_M && 2 * gemm_blocks < self.sms);
        if passes {
            let mut r0 = 0;
            while r0 < m {
                let mm = GEMV_MAX_M.min(m - r0);
                let xs = x.slice(r0 * cols..(r0 + mm) * cols);
                let mut os = out.slice_mut(r0 * rows..(r0 + mm) * rows);
                self.gemv(gpu, &xs, mm, &mut os, int4)?;
                r0 += mm;
            }
            Ok(())
        } else {
            self.gemm(gpu, x, m, out)
        }
    }

    /// One GEMV launch for `m ≤ 32` rows (shapes already checked).
    fn gemv(
        &self,
        gpu: &Gpu,
        x: &CudaView<'_, f32>,
        m: usize,
        out: &mut CudaViewMut<'_, f32>,
        int4: Int4Gemv,
    ) -> Result<(), CudaError> {
        debug_assert!((1..=GEMV_MAX_M).contains(&m));
        let s = gpu.stream();
        let (n, k, kbi, mi) = (self.rows as i32, self.cols as i32, self.kb as i32, m as i32);
        let (bound, max_warps) = gemv_bound(m);
        let tiles = rows_padded(self.rows) / TILE_N;
        if let (Store::Q4 { qs, dm, .. }, Int4Gemv::BlockScaled) = (&self.store, int4) {
            let cfg = self.splitk_cfg(m, max_warps);
            let f = gpu.function(
                MODULE.name,
                &format!("gemv4_{}_m{bound}", self.kernel_suffix()),
            )?;
            let (part, cnt) = gpu.splitk_scratch();
            // SAFETY: gemv4_*(qs, dm, x, out, part, cnt, N, K, KB, m): block (t, y) reads the
            // weight buffers at tile-blocks t·KB .. (t+1)·KB (t < rowpad/32, inside their exact
            // sizes), x[r·K + k] for r < m, k < K, and writes out[r·N + n] for r < m, n < N (m·K ≤
            // x.len(), m·N ≤ out.len() checked). With splits > 1 it writes
            // part[(y·m + r)·rowpad + n] (splits·m·rowpad ≤ SPLITK_PART_FLOATS, gemv_splits) and
            // counts in cnt[t] (tiles ≤ SPLITK_TILES), which the last block of the tile resets;
            // the scratch is used only by launches on this stream. At most GW warps per block.
            unsafe {
                s.launch_builder(f)
                    .arg(qs)
                    .arg(dm)
                    .arg(x)
                    .arg(out)
                    .arg(part)
                    .arg(cnt)
                    .arg(&n)
                    .arg(&k)
                    .arg(&kbi)
                    .arg(&mi)
                    .launch(cfg)?;
            }
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, 1, 1),
            block_dim: ((gemv_warps(self.kb, max_warps) * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(
            MODULE.name,
            &format!("gemv_{}_m{bound}", self.kernel_suffix()),
        )?;
        // SAFETY: block t reads the weight buffers at tile-blocks t·KB .. (t+1)·KB (t < rowpad/32,
        // so inside their exact sizes), x[r·K + k] for r < m, k < K, and writes out[r·N + n] for
        // r < m, n < N; m·K ≤ x.len() and m·N ≤ out.len() were checked. The block has at most
        // GW warps (the kernel's shared memory). Argument order and types follow the kernels:
        // (qs, meta, x, out, N, K, KB, m) or (w, x, out, N, K, KB, m).
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
                .arg(&kbi)
                .arg(&mi)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// Whether [`GpuWeight::matmul_q8`] takes this weight (INT4 and Q8 do; f32 weights take f32
    /// activations).
    pub fn takes_q8(&self) -> bool {
        !matches!(self.store, Store::F32 { .. })
    }

    /// `out[m × rows] = x · Wᵀ` with `x` the first `m ≤ 32` rows quantized in `act` (the fast
    /// mode): one `gemvq_*` launch, dp4a over the weight codes, split-K as the block-scaled GEMV.
    /// Overwrites `out`.
    pub fn matmul_q8(
        &self,
        gpu: &Gpu,
        act: &GpuActQ8,
        m: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let rows = self.rows;
        if !self.takes_q8() {
            return Err(shape(format!(
                "matmul_q8: {} weights take f32 activations",
                self.format_name()
            )));
        }
        if act.cols() != self.cols || m > act.rows() || m > GEMV_MAX_M || out.len() < m * rows {
            return Err(shape(format!(
                "matmul_q8: W [{rows}, {}] with m = {m} (at most {GEMV_MAX_M}) needs {m} quantized rows of {} (have {} of {}) and out ≥ {} elements (have {})",
                self.cols,
                self.cols,
                act.rows(),
                act.cols(),
                m * rows,
                out.len()
            )));
        }
        as_i32(m * rows, "m · rows")?;
        if m == 0 {
            return Ok(());
        }
        let (bound, max_warps) = gemvq_bound(m);
        let cfg = self.splitk_cfg(m, max_warps);
        let f = gpu.function(
            MODULE.name,
            &format!("gemvq_{}_m{bound}", self.kernel_suffix()),
        )?;
        let (n, kbi, mi) = (rows as i32, self.kb as i32, m as i32);
        let (part, cnt) = gpu.splitk_scratch();
        // SAFETY: gemvq_*(qs, meta, xq, xds, ocnt, ocol, oval, out, part, cnt, N, KB, m): block
        // (t, y) reads the weight buffers at tile-blocks t·KB .. (t+1)·KB (inside their sizes),
        // the quantized rows r < m ≤ act.rows() (codes r·KB·8 .., ds r·KB·2 .., outlier slots
        // r·16 ..; act has the weight's KB), writes out[r·N + n] for r < m, n < N (m·N ≤
        // out.len() checked), and with splits > 1 the split-K scratch as gemv4 (gemv_splits keeps
        // splits·m·rowpad ≤ SPLITK_PART_FLOATS and tiles ≤ SPLITK_TILES). At most GW warps.
        unsafe {
            let mut b = gpu.stream().launch_builder(f);
            match &self.store {
                Store::Q4 { qs, dm, .. } => {
                    b.arg(qs).arg(dm);
                }
                Store::Q8 { qs, d } => {
                    b.arg(qs).arg(d);
                }
                Store::F32 { .. } => unreachable!("checked by takes_q8"),
            }
            b.arg(&act.codes)
                .arg(&act.ds)
                .arg(&act.counts)
                .arg(&act.ocol)
                .arg(&act.oval)
                .arg(out)
                .arg(part)
                .arg(cnt)
                .arg(&n)
                .arg(&kbi)
                .arg(&mi)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// The grid of a split-K GEMV (`gemv4_*`, `gemvq_*`): one block per row tile and split, the
    /// splits from [`gemv_splits`], at most `max_warps` warps splitting a split's column blocks.
    fn splitk_cfg(&self, m: usize, max_warps: usize) -> LaunchConfig {
        let tiles = rows_padded(self.rows) / TILE_N;
        let splits = gemv_splits(
            tiles,
            self.kb,
            m,
            max_warps,
            gemv_blocks_per_sm() * self.sms,
        );
        LaunchConfig {
            grid_dim: (tiles as u32, splits as u32, 1),
            block_dim: (
                (gemv_warps(self.kb.div_ceil(splits), max_warps) * 32) as u32,
                1,
                1,
            ),
            shared_mem_bytes: 0,
        }
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
        let (n, k, kbi, mi) = (self.rows as i32, self.cols as i32, self.kb as i32, m as i32);
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
        // SAFETY: weight reads stay in rows < N and blocks < KB; x reads are guarded by row < m
        // and k < K, out writes by row < m and col < N; sizes checked by the caller. Argument
        // order: (qs, meta, x, out, N, K, KB, m) or (w, x, out, N, K, KB, m).
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
                .arg(&kbi)
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
        let (nr, k, kbi) = (self.rows as i32, self.cols as i32, self.kb as i32);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (GATHER_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.function(MODULE.name, &format!("gather_{}", self.kernel_suffix()))?;
        // SAFETY: block i reads ids[i] (i < n ≤ ids.len()), weight row ids[i] only when it is
        // < N, and writes out[i·K .. (i+1)·K] (n·K ≤ out.len()). Argument order:
        // (qs, meta, ids, out, N, K, KB) or (w, ids, out, N, K, KB).
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
            b.arg(ids).arg(out).arg(&nr).arg(&k).arg(&kbi).launch(cfg)?;
        }
        Ok(())
    }
}

/// The GEMV instantiation for `m` rows: (bound on m, most warps per block).
fn gemv_bound(m: usize) -> (usize, usize) {
    *GEMV_BOUNDS
        .iter()
        .find(|(b, _)| m <= *b)
        .unwrap_or(&GEMV_BOUNDS[GEMV_BOUNDS.len() - 1])
}

/// The int8 GEMV instantiation for `m` rows: (bound on m, most warps per block).
fn gemvq_bound(m: usize) -> (usize, usize) {
    *GEMVQ_BOUNDS
        .iter()
        .find(|(b, _)| m <= *b)
        .unwrap_or(&GEMVQ_BOUNDS[GEMVQ_BOUNDS.len() - 1])
}

/// Column splits of each row tile for the block-scaled INT4 GEMV: enough blocks for `target`
/// (about [`GEMV_BLOCKS_PER_SM`] per multiprocessor) when the tiles alone are fewer, each warp
/// keeping at least two column blocks, within the split-K scratch.
fn gemv_splits(tiles: usize, kb: usize, m: usize, max_warps: usize, target: usize) -> usize {
    let want = target / tiles.max(1);
    let most = (kb / (2 * max_warps)).clamp(1, MAX_SPLITS);
    let s = want.clamp(1, most);
    if s > 1 && (s * m * tiles * TILE_N > SPLITK_PART_FLOATS || tiles > SPLITK_TILES) {
        1
    } else {
        s
    }
}

/// Warps per GEMV block: they split a tile's `kb` column blocks, so no more than there are
/// blocks, and at most `max_warps`.
fn gemv_warps(kb: usize, max_warps: usize) -> usize {
    kb.clamp(1, max_warps)
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
    fn layout_at(p: &Packed, kb_count: usize, n: usize, c: usize) -> f32 {
        let (kb, kk, lane) = (c >> 5, c & 31, n & 31);
        let tb = (n >> 5) * kb_count + kb;
        match p {
            Packed::Q4(kind, qs, dm) => {
                let word = qs[(tb * 32 + lane) * 4 + (kk >> 3)];
                let code = (word >> (4 * (kk & 7))) & 0xF;
                let meta = dm[tb * 32 + lane];
                let d = half::f16::from_bits(meta as u16).to_f32();
                match kind {
                    Q4Kind::ZeroPoint => (code as i32 - (meta >> 16) as i32) as f32 * d,
                    Q4Kind::Affine => {
                        d * code as f32 + half::f16::from_bits((meta >> 16) as u16).to_f32()
                    }
                }
            }
            Packed::Q8(qs, d) => {
                let (h, j, e) = (kk >> 4, (kk >> 2) & 3, kk & 3);
                let word = qs[((tb * 2 + h) * 32 + lane) * 4 + j];
                let v = (word >> (8 * e)) as u8 as i8;
                v as f32 * half::f16::from_bits(d[tb * 32 + lane]).to_f32()
            }
            Packed::F32(w) => w[((tb * 8 + (kk >> 2)) * 32 + lane) * 4 + (kk & 3)],
        }
    }

    /// Host mirror of the GEMV kernel's reads: quad `c` of block `kb` of row `n` as
    /// `load_blk` + `deq_quad` see it (uint4 / float4 indices, then word and shift).
    fn gemv_quad(p: &Packed, kb_count: usize, n: usize, kb: usize, c: usize) -> [f32; 4] {
        let (tile, lane) = (n / 32, n % 32);
        let tb = tile * kb_count + kb;
        std::array::from_fn(|e| match p {
            Packed::Q4(kind, qs, dm) => {
                let a = &qs[(tb * 32 + lane) * 4..(tb * 32 + lane) * 4 + 4];
                let word = a[c >> 1] >> ((c & 1) * 16);
                let code = (word >> (4 * e)) & 0xF;
                let meta = dm[tb * 32 + lane];
                let d = half::f16::from_bits(meta as u16).to_f32();
                match kind {
                    Q4Kind::ZeroPoint => (code as i32 - (meta >> 16) as i32) as f32 * d,
                    Q4Kind::Affine => {
                        d * code as f32 + half::f16::from_bits((meta >> 16) as u16).to_f32()
                    }
                }
            }
            Packed::Q8(qs, d) => {
                let half_i = if c < 4 { 0 } else { 1 };
                let base = ((tb * 2 + half_i) * 32 + lane) * 4;
                let word = qs[base + (c & 3)];
                let v = (word >> (8 * e)) as u8 as i8;
                v as f32 * half::f16::from_bits(d[tb * 32 + lane]).to_f32()
            }
            Packed::F32(w) => w[((tb * 8 + c) * 32 + lane) * 4 + e],
        })
    }

    /// Host mirror of the GEMM kernel's `gemm_wtile`: the 16 weights of half `q` of block `b`.
    fn gemm_half(p: &Packed, kb_count: usize, n: usize, b: usize, q: usize) -> [f32; 16] {
        let (tb, lane) = ((n >> 5) * kb_count + b, n & 31);
        std::array::from_fn(|i| match p {
            Packed::Q4(kind, qs, dm) => {
                let (jj, ii) = (i / 8, i % 8);
                let word = qs[(tb * 32 + lane) * 4 + 2 * q + jj];
                let code = (word >> (4 * ii)) & 0xF;
                let meta = dm[tb * 32 + lane];
                let d = half::f16::from_bits(meta as u16).to_f32();
                match kind {
                    Q4Kind::ZeroPoint => (code as i32 - (meta >> 16) as i32) as f32 * d,
                    Q4Kind::Affine => {
                        d * code as f32 + half::f16::from_bits((meta >> 16) as u16).to_f32()
                    }
                }
            }
            Packed::Q8(qs, d) => {
                let (j, e) = (i / 4, i % 4);
                let word = qs[((tb * 2 + q) * 32 + lane) * 4 + j];
                let v = (word >> (8 * e)) as u8 as i8;
                v as f32 * half::f16::from_bits(d[tb * 32 + lane]).to_f32()
            }
            Packed::F32(w) => {
                let (l, e) = (i / 4, i % 4);
                w[((tb * 8 + 4 * q + l) * 32 + lane) * 4 + e]
            }
        })
    }

    /// Runs on the CPU: the packed layouts, read back with the kernels' index arithmetic (the
    /// gather's, the GEMV's and the GEMM's), give the CPU dequantization bit for bit, and zeros
    /// in the padding rows (catches a packing / indexing mismatch without a GPU).
    #[test]
    fn packed_layouts_read_back_as_the_cpu_dequantization() {
        let mut rng = Rng::new(11);
        for (rows, cols) in [
            (5, 40),
            (9, 1100),
            (3, 2048),
            (40, 3000),
            (70, 576),
            (33, 1536),
        ] {
            for w in all_formats(rows, cols, &mut rng) {
                let dq = dequantized(&w);
                let p = pack(&w);
                let kb = blocks_for(cols);
                for n in 0..rows {
                    for c in 0..cols {
                        assert_eq!(
                            layout_at(&p, kb, n, c).to_bits(),
                            dq[n * cols + c].to_bits(),
                            "{} [{rows}, {cols}] row {n} col {c}",
                            w.format_name()
                        );
                    }
                }
                for n in 0..rows_padded(rows) {
                    for b in 0..kb {
                        // Past the last column of a real row the partial block keeps whatever
                        // the format holds (finite; the kernels stage x there as 0): not compared.
                        let want = |k: usize| {
                            let c = b * QK + k;
                            if n < rows && c < cols {
                                Some(dq[n * cols + c])
                            } else if n < rows {
                                None
                            } else {
                                Some(0.0)
                            }
                        };
                        for c in 0..8 {
                            let got = gemv_quad(&p, kb, n, b, c);
                            for (e, g) in got.iter().enumerate() {
                                assert!(g.is_finite());
                                let Some(v) = want(4 * c + e) else { continue };
                                assert_eq!(
                                    g.to_bits(),
                                    v.to_bits(),
                                    "gemv {} [{rows}, {cols}] row {n} block {b} quad {c}",
                                    w.format_name()
                                );
                            }
                        }
                        for q in 0..2 {
                            let got = gemm_half(&p, kb, n, b, q);
                            for (i, g) in got.iter().enumerate() {
                                assert!(g.is_finite());
                                let Some(v) = want(16 * q + i) else { continue };
                                assert_eq!(
                                    g.to_bits(),
                                    v.to_bits(),
                                    "gemm {} [{rows}, {cols}] row {n} block {b} half {q}",
                                    w.format_name()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packing_fills_every_code_slot_exactly_once() {
        // Every (row, column) of two tiles of two blocks maps to a distinct (word, shift) slot,
        // and the slots are exactly the buffers' sizes.
        let kb = 2;
        let (rows, cols) = (2 * TILE_N, kb * QK);
        let mut seen = std::collections::HashSet::new();
        for n in 0..rows {
            for c in 0..cols {
                let (wi, sh) = q4_pos(n, c, kb);
                assert!(wi < rows * kb * 4 && sh < 32);
                assert!(seen.insert((wi, sh)), "q4 slot of ({n}, {c}) reused");
            }
        }
        assert_eq!(seen.len(), rows * cols);
        let mut seen = std::collections::HashSet::new();
        for n in 0..rows {
            for c in 0..cols {
                let (wi, sh) = q8_pos(n, c, kb);
                assert!(wi < rows * kb * 8 && sh < 32);
                assert!(seen.insert((wi, sh)), "q8 slot of ({n}, {c}) reused");
            }
        }
        let mut seen = std::collections::HashSet::new();
        for n in 0..rows {
            for c in 0..cols {
                let i = f32_index(n, c, kb);
                assert!(i < rows * cols);
                assert!(seen.insert(i), "f32 slot of ({n}, {c}) reused");
            }
        }
        let mut seen = std::collections::HashSet::new();
        for n in 0..rows {
            for b in 0..kb {
                let i = meta_index(n, b, kb);
                assert!(i < rows * kb);
                assert!(seen.insert(i));
            }
        }
    }

    /// Runs on the CPU: the device bytes of SmolLM2-sized projections are the format's own bytes
    /// (no column padding when the width is a multiple of 32, rows only to whole tiles of 32).
    #[test]
    fn packing_pads_rows_to_tiles_and_columns_to_blocks_only() {
        let mut rng = Rng::new(12);
        for (rows, cols) in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49, 100)] {
            let q = random_q4(rows, cols, Q4Kind::ZeroPoint, &mut rng);
            let (qs, dm) = pack_q4(&q);
            let (rp, kb) = (rows_padded(rows), blocks_for(cols));
            assert_eq!(rp % TILE_N, 0);
            assert!(rp < rows + TILE_N);
            assert_eq!((qs.len(), dm.len()), (rp * kb * 4, rp * kb));
            if rows % TILE_N == 0 && cols % QK == 0 {
                // 16 code bytes and 4 metadata bytes per block: exactly the blocks' 20 bytes.
                assert_eq!(4 * (qs.len() + dm.len()), rows * cols / QK * 20);
            }
            let q8 = random_q8(rows, cols, &mut rng);
            let (qs, d) = pack_q8(&q8);
            assert_eq!((qs.len(), d.len()), (rp * kb * 8, rp * kb));
            let f = pack_f32(&random_f32(rows, cols, &mut rng));
            assert_eq!(f.len(), rp * kb * QK);
        }
    }

    #[test]
    fn gemv_picks_a_bound_and_warps_that_cover_m() {
        for m in 1..=GEMV_MAX_M {
            let (b, w) = gemv_bound(m);
            assert!(b >= m && b <= 2 * m.max(2), "m {m} bound {b}");
            // The kernel's shared memory holds GW · MAXM · 32 floats: at most 32 KB.
            assert!(w * b * 32 * 4 <= 32 << 10, "m {m}: {w} warps × {b}");
            assert!((1..=16).contains(&w));
        }
        assert_eq!(gemv_warps(1, 16), 1);
        assert_eq!(gemv_warps(3, 16), 3);
        assert_eq!(gemv_warps(128, 8), 8);
        assert_eq!(gemv_warps(0, 8), 1);
    }

    #[test]
    fn gemv_splits_fill_the_gpu_within_the_scratch() {
        // 132 multiprocessors (H100, H200) × 2 blocks (best of 2, 4 and 8 on an H200): Llama
        // shapes split until the grid fills them.
        assert_eq!(gemv_splits(64, 64, 1, 16, 264), 2); // [2048, 2048]: 2 blocks per warp
        assert_eq!(gemv_splits(64, 256, 1, 16, 264), 4); // [2048, 8192]
        assert_eq!(gemv_splits(128, 128, 1, 16, 264), 2); // [4096, 4096]
        assert_eq!(gemv_splits(256, 64, 1, 16, 264), 1); // [8192, 2048]: tiles suffice
        assert_eq!(gemv_splits(448, 128, 1, 16, 264), 1); // [14336, 4096]
        assert_eq!(gemv_splits(5, 10, 1, 10, 528), 1); // too few column blocks
        for (tiles, kb, m) in [
            (64, 256, 32),
            (4096, 4096, 32),
            (1, 4096, 32),
            (200, 1000, 7),
        ] {
            let (_, w) = gemv_bound(m);
            let s = gemv_splits(tiles, kb, m, w, 528);
            assert!((1..=MAX_SPLITS).contains(&s));
            assert!(s == 1 || s * m * tiles * TILE_N <= SPLITK_PART_FLOATS);
            assert!(
                s == 1 || kb / s >= 2 * w,
                "tiles {tiles} kb {kb} m {m}: {s} splits"
            );
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
        // Partial blocks (cols % 32), cols % 4 != 0, rows not a multiple of 32 (partial tiles),
        // fewer column blocks than GEMV warps (33, 70), SmolLM2-like shapes (576 and 1536
        // columns, 192 rows), m across every GEMV bound (1..=32), GEMV launches of 32 rows for
        // 48 and 64 on narrow matrices, the GEMM with partial tiles in both directions.
        let shapes = [
            (13, 70),
            (37, 1100),
            (130, 4096),
            (64, 2050),
            (9, 33),
            (192, 576),
            (576, 1536),
            (257, 8192),
        ];
        let ms = [
            1usize, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 23, 24, 25, 31, 32, 48, 64, 70, 200,
        ];
        for &(rows, cols) in &shapes {
            for w in all_formats(rows, cols, &mut rng) {
                let gw = GpuWeight::upload(&gpu, &w).unwrap();
                assert_eq!((gw.rows(), gw.cols()), (rows, cols));
                for m in ms {
                    if rows * cols > 1 << 20 && !matches!(m, 1 | 3 | 8 | 16 | 17 | 32 | 48) {
                        continue; // keep the CPU reference quick
                    }
                    let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
                    let dx = s.clone_htod(&x).unwrap();
                    // Poisoned output: every element must be overwritten.
                    for int4 in [Int4Gemv::BlockScaled, Int4Gemv::PerWeight] {
                        let mut dout = s.clone_htod(&vec![f32::NAN; m * rows]).unwrap();
                        gw.matmul_with(&gpu, &dx.as_view(), m, &mut dout.as_view_mut(), int4)
                            .unwrap();
                        let got = s.clone_dtoh(&dout).unwrap();
                        let label = format!("{} [{rows}, {cols}] m={m} {int4:?}", w.format_name());
                        check_product(&label, &w, &x, m, &got);
                    }
                }
            }
        }
    }

    /// The int8 fast mode against the CPU's scalar int8 product on the same quantized rows (the
    /// GPU's quantization equals the CPU's bit for bit, `qact` tests): the integer dot products
    /// are exact on both sides, so only the order of the f32 sums differs (same bound as
    /// [`check_product`]). Rows carry outliers (a few channels 50× the rest) in every other row.
    #[test]
    fn int8_matmul_matches_the_cpu_int8_reference() {
        use crate::cpu::act::ActQ8;
        use crate::cpu::qdot::Isa;
        use crate::cuda::qact::GpuActQ8;
        let Some(gpu) = gpu_or_skip("linear::int8_matmul_matches_the_cpu_int8_reference") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng::new(11);
        let shapes = [
            (13, 70),
            (37, 1100),
            (192, 576),
            (576, 1536),
            (257, 8192),
            (1100, 33),
        ];
        for &(rows, cols) in &shapes {
            for w in all_formats(rows, cols, &mut rng) {
                let gw = GpuWeight::upload(&gpu, &w).unwrap();
                if !gw.takes_q8() {
                    assert!(matches!(w, Weight::F32(_)));
                    continue;
                }
                for m in [1usize, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32] {
                    let mut x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
                    for r in (0..m).step_by(2) {
                        for i in 0..3 {
                            x[r * cols + (i * 41 + r) % cols] = 50.0 * (1.0 + i as f32);
                        }
                    }
                    let dx = s.clone_htod(&x).unwrap();
                    let mut qa = GpuActQ8::new(&gpu, 32, cols).unwrap();
                    qa.quantize(&gpu, &dx.as_view(), m).unwrap();
                    let mut dout = s.clone_htod(&vec![f32::NAN; m * rows]).unwrap();
                    gw.matmul_q8(&gpu, &qa, m, &mut dout.as_view_mut()).unwrap();
                    let got = s.clone_dtoh(&dout).unwrap();
                    let act = ActQ8::quantize(&x, m, cols);
                    if m == 1 && cols >= 576 {
                        assert!(act.has_outliers(), "the planted outliers are taken out");
                    }
                    let mut want = vec![0f32; m * rows];
                    w.matmul_q8(&act, Isa::Scalar, &mut want);
                    let dq = dequantized(&w);
                    for r in 0..m {
                        for n in 0..rows {
                            let scale: f64 = (0..cols)
                                .map(|k| (dq[n * cols + k] as f64 * x[r * cols + k] as f64).abs())
                                .sum();
                            let (g, v) = (got[r * rows + n], want[r * rows + n]);
                            assert!(
                                (g - v).abs() as f64 <= 2e-5 * scale + 1e-5,
                                "{} [{rows}, {cols}] m={m}: row {r} out {n}: gpu {g} cpu {v} (scale {scale})",
                                w.format_name()
                            );
                        }
                    }
                }
            }
        }
        // Refusals: f32 weights, more rows than quantized, a width mismatch.
        let f = GpuWeight::upload(&gpu, &Weight::F32(random_f32(8, 64, &mut rng))).unwrap();
        let q = GpuWeight::upload(&gpu, &Weight::Q8(random_q8(8, 64, &mut rng))).unwrap();
        let dx = s.clone_htod(&vec![0.5f32; 2 * 64]).unwrap();
        let mut qa = GpuActQ8::new(&gpu, 2, 64).unwrap();
        qa.quantize(&gpu, &dx.as_view(), 1).unwrap();
        let mut dout = s.alloc_zeros::<f32>(16).unwrap();
        for (wt, m) in [(&f, 1), (&q, 2)] {
            let e = wt
                .matmul_q8(&gpu, &qa, m, &mut dout.as_view_mut())
                .unwrap_err();
            assert!(e.to_string().contains("matmul_q8"), "{e}");
        }
        let narrow = GpuActQ8::new(&gpu, 2, 32).unwrap();
        assert!(
            q.matmul_q8(&gpu, &narrow, 1, &mut dout.as_view_mut())
                .is_err()
        );
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
