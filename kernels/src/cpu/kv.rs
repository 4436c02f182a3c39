//! Paged KV cache storage.
//!
//! A [`KvPool`] owns a fixed number of pages; a page holds `page_size` token slots for *every*
//! layer, so a sequence needs one page table (a `Vec<PageId>`) regardless of depth and the
//! scheduler can budget memory in whole pages ([`KvPool::bytes_per_page`]).
//!
//! # Layout
//!
//! Every per-page array is page-major: `[page][layer][kv_head][slot][channel]` for K and V. A page
//! is therefore one contiguous region per array (freeing or moving it touches one range), and one
//! (layer, page, kv_head) *tile* — `page_size × head_dim` values — is one contiguous slice, which is
//! exactly what attention consumes for all query heads of a GQA group. Keys are stored after RoPE.
//!
//! # Element types
//!
//! * [`KvDtype::F32`] and [`KvDtype::F16`]: the tile holds the values themselves.
//! * [`KvDtype::Int4`]: while a (layer, page) is *open* it lives in an f32 staging copy, so the
//!   newest, partial page is exact. [`KvPool::seal`] quantizes it and frees the staging copy. Following
//!   KIVI (Liu et al., 2024), keys are quantized **per channel** across the page's tokens (key
//!   outliers live in fixed channels, so a per-token range would be dominated by them) and values
//!   **per token** across channels (values have no channel outliers, and the attention output mixes
//!   values per token, so per-token error stays local). Both are asymmetric 4-bit,
//!   `x ≈ code · scale + min` with f16 `scale` and `min`: per (kv_head, channel) for keys, per
//!   (slot, kv_head) for values. `min` is rounded down and `scale` up to f16 so the f16 range always
//!   covers the data and every value is within half a step of its reconstruction. Codes are packed
//!   two per byte as in `q4.rs`: byte `j` of a token row holds channel `j` (low nibble) and channel
//!   `j + head_dim/2` (high nibble), so one load unpacks two contiguous channel runs.
//!
//! For every dtype the pool also keeps each page's per-channel key min/max (f32, before any
//! quantization): the inputs of the query-aware page relevance bound in `attention`.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::cpu::mem::HugeVec;
use crate::cpu::qdot::prefetch_value;

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    F16,
    Int4,
}

impl KvDtype {
    /// The lowercase name used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Int4 => "int4",
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KvDtype {
    type Err = KvError;

    fn from_str(s: &str) -> Result<Self, KvError> {
        [KvDtype::F32, KvDtype::F16, KvDtype::Int4]
            .into_iter()
            .find(|d| s.eq_ignore_ascii_case(d.as_str()))
            .ok_or_else(|| KvError::UnknownDtype(s.to_owned()))
    }
}

/// Shape of the cache: how many token slots a page has and what one token stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub page_size: usize,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    /// Values per token per layer for K (and for V): `n_kv_heads * head_dim`.
    pub fn token_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Errors from building a pool or parsing its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("invalid KV geometry: {0}")]
    Geometry(String),
    #[error("unknown KV dtype {0:?} (expected f32, f16 or int4)")]
    UnknownDtype(String),
    #[error("KV pool of {0} pages does not fit in memory indices")]
    TooLarge(usize),
}

/// Index of a page in its pool.
pub type PageId = u32;

/// The element storage, one variant per dtype. Tile-shaped arrays are `[page][layer][kv_head][..]`.
enum Store {
    F32 { k: HugeVec<f32>, v: HugeVec<f32> },
    F16 { k: HugeVec<f16>, v: HugeVec<f16> },
    Int4(Int4Store),
}

struct Int4Store {
    /// Packed codes, `[tile][slot][head_dim / 2]`.
    k_codes: HugeVec<u8>,
    v_codes: HugeVec<u8>,
    /// Key metadata, per channel: `[tile][channel]`.
    k_scale: Vec<f16>,
    k_min: Vec<f16>,
    /// Value metadata, per token: `[tile][slot]`.
    v_scale: Vec<f16>,
    v_min: Vec<f16>,
    /// Open (layer, page)s: the f32 K tiles of all heads, then the V tiles (`2 × n_kv_heads × page_size ×
    /// head_dim`). Allocated on the first write, dropped on seal, so only open pages pay for it.
    staging: Vec<Option<Box<[f32]>>>,
}

/// A pool of KV pages with a free list. See the module docs for layout and quantization.
pub struct KvPool {
    geom: KvGeometry,
    dtype: KvDtype,
    n_pages: usize,
    store: Store,
    /// Per-channel key min / max of the written tokens, `[tile][channel]`; +inf / -inf when empty.
    kmin: Vec<f32>,
    kmax: Vec<f32>,
    /// Per (page, layer): highest written slot + 1.
    filled: Vec<usize>,
    /// Per (page, layer): sealed (INT4: quantized, staging freed).
    sealed: Vec<bool>,
    in_use: Vec<bool>,
    /// Free pages; popped from the back, so a fresh pool hands out 0, 1, 2, ...
    free_list: Vec<PageId>,
}

impl KvPool {
    /// A pool of `n_pages` pages, all free. Fails on a degenerate geometry, an odd `head_dim` (INT4
    /// packs channel pairs, and RoPE needs pairs anyway) or a size that overflows.
    pub fn new(geom: KvGeometry, dtype: KvDtype, n_pages: usize) -> Result<Self, KvError> {
        let KvGeometry {
            page_size,
            n_layers,
            n_kv_heads,
            head_dim,
        } = geom;
        let bad = |why: String| Err(KvError::Geometry(why));
        if page_size == 0 || n_layers == 0 || n_kv_heads == 0 || head_dim == 0 {
            return bad(format!("all dimensions must be >= 1, got {geom:?}"));
        }
        if head_dim % 2 != 0 {
            return bad(format!("head_dim must be even, got {head_dim}"));
        }
        if n_pages > PageId::MAX as usize {
            return Err(KvError::TooLarge(n_pages));
        }
        // Every array size below, the largest INT4 staging copy and the tile scratch must be
        // addressable; checking the largest products covers the smaller ones.
        let mul = |xs: &[usize]| xs.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        let tiles = mul(&[n_pages, n_layers, n_kv_heads]);
        let elems = tiles.and_then(|t| mul(&[t, page_size, head_dim]));
        let staging = mul(&[2, n_kv_heads, page_size, head_dim + 1]);
        let (Some(tiles), Some(elems), Some(_)) = (tiles, elems, staging) else {
            return Err(KvError::TooLarge(n_pages));
        };
        if mul(&[tiles, page_size.max(head_dim)]).is_none() {
            return Err(KvError::TooLarge(n_pages));
        }
        let store = match dtype {
            // Page arrays on huge pages: attention reads them in page-sized pieces all over the
            // pool, which on 4 KiB pages costs a TLB miss per piece.
            KvDtype::F32 => Store::F32 {
                k: HugeVec::zeroed(elems),
                v: HugeVec::zeroed(elems),
            },
            KvDtype::F16 => Store::F16 {
                k: HugeVec::zeroed(elems),
                v: HugeVec::zeroed(elems),
            },
            KvDtype::Int4 => Store::Int4(Int4Store {
                k_codes: HugeVec::zeroed(elems / 2),
                v_codes: HugeVec::zeroed(elems / 2),
                k_scale: vec![f16::ZERO; tiles * head_dim],
                k_min: vec![f16::ZERO; tiles * head_dim],
                v_scale: vec![f16::ZERO; tiles * page_size],
                v_min: vec![f16::ZERO; tiles * page_size],
                staging: (0..n_pages * n_layers).map(|_| None).collect(),
            }),
        };
        Ok(Self {
            geom,
            dtype,
            n_pages,
            store,
            kmin: vec![f32::INFINITY; tiles * head_dim],
            kmax: vec![f32::NEG_INFINITY; tiles * head_dim],
            filled: vec![0; n_pages * n_layers],
            sealed: vec![false; n_pages * n_layers],
            in_use: vec![false; n_pages],
            free_list: (0..n_pages as PageId).rev().collect(),
        })
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

    /// Takes a free page (empty and open in every layer); `None` when the pool is exhausted.
    pub fn alloc(&mut self) -> Option<PageId> {
        let page = self.free_list.pop()?;
        self.in_use[page as usize] = true;
        Some(page)
    }

    /// Returns `page` to the free list and resets it: contents zeroed, key bounds emptied, every layer
    /// open again, INT4 staging dropped. Freeing a page that is not allocated is a caller bug: it
    /// trips a debug assertion and is otherwise ignored (so a double free cannot corrupt the list).
    pub fn free(&mut self, page: PageId) {
        let p = page as usize;
        let ok = p < self.n_pages && self.in_use[p];
        debug_assert!(ok, "free of page {page} that is not allocated");
        if !ok {
            return;
        }
        let (l, h, ps, d) = self.dims();
        let tiles = p * l * h..(p + 1) * l * h;
        let elems = tiles.start * ps * d..tiles.end * ps * d;
        let chans = tiles.start * d..tiles.end * d;
        match &mut self.store {
            Store::F32 { k, v } => {
                k[elems.clone()].fill(0.0);
                v[elems].fill(0.0);
            }
            Store::F16 { k, v } => {
                k[elems.clone()].fill(f16::ZERO);
                v[elems].fill(f16::ZERO);
            }
            Store::Int4(s) => {
                s.k_codes[elems.start / 2..elems.end / 2].fill(0);
                s.v_codes[elems.start / 2..elems.end / 2].fill(0);
                s.k_scale[chans.clone()].fill(f16::ZERO);
                s.k_min[chans.clone()].fill(f16::ZERO);
                s.v_scale[tiles.start * ps..tiles.end * ps].fill(f16::ZERO);
                s.v_min[tiles.start * ps..tiles.end * ps].fill(f16::ZERO);
                s.staging[p * l..(p + 1) * l].fill(None);
            }
        }
        self.kmin[chans.clone()].fill(f32::INFINITY);
        self.kmax[chans].fill(f32::NEG_INFINITY);
        self.filled[p * l..(p + 1) * l].fill(0);
        self.sealed[p * l..(p + 1) * l].fill(false);
        self.in_use[p] = false;
        self.free_list.push(page);
    }

    /// Writes one token's keys and values (each `n_kv_heads * head_dim`, head-major) into `slot` of
    /// `page`, layer `layer`, and widens the page's key bounds. Rewriting a slot is allowed (bounds
    /// only widen, so they stay valid upper bounds). Writing into a sealed INT4 page reopens it: the
    /// sealed tokens are dequantized into a new staging copy (keeping their quantization error).
    pub fn write(&mut self, layer: usize, page: PageId, slot: usize, k: &[f32], v: &[f32]) {
        let (_, h, ps, d) = self.dims();
        debug_assert!(
            layer < self.geom.n_layers && slot < ps,
            "layer {layer} / slot {slot} out of range"
        );
        debug_assert!(
            self.in_use.get(page as usize) == Some(&true),
            "write to unallocated page {page}"
        );
        debug_assert!(k.len() == h * d && v.len() == h * d, "token width mismatch");
        if self.dtype == KvDtype::Int4 && self.is_sealed(layer, page) {
            self.reopen(layer, page);
        }
        let pl = self.pl(layer, page);
        let chans = pl * h * d..(pl + 1) * h * d;
        let bounds = self.kmin[chans.clone()]
            .iter_mut()
            .zip(&mut self.kmax[chans]);
        for ((mn, mx), &x) in bounds.zip(k) {
            *mn = mn.min(x);
            *mx = mx.max(x);
        }
        match &mut self.store {
            Store::F32 { k: ks, v: vs } => {
                for hd in 0..h {
                    let dst = ((pl * h + hd) * ps + slot) * d;
                    ks[dst..dst + d].copy_from_slice(&k[hd * d..(hd + 1) * d]);
                    vs[dst..dst + d].copy_from_slice(&v[hd * d..(hd + 1) * d]);
                }
            }
            Store::F16 { k: ks, v: vs } => {
                for hd in 0..h {
                    let dst = ((pl * h + hd) * ps + slot) * d;
                    ks[dst..dst + d].convert_from_f32_slice(&k[hd * d..(hd + 1) * d]);
                    vs[dst..dst + d].convert_from_f32_slice(&v[hd * d..(hd + 1) * d]);
                }
            }
            Store::Int4(s) => {
                let st = s.staging[pl]
                    .get_or_insert_with(|| vec![0.0; 2 * h * ps * d].into_boxed_slice());
                let (sk, sv) = st.split_at_mut(h * ps * d);
                for hd in 0..h {
                    let dst = (hd * ps + slot) * d;
                    sk[dst..dst + d].copy_from_slice(&k[hd * d..(hd + 1) * d]);
                    sv[dst..dst + d].copy_from_slice(&v[hd * d..(hd + 1) * d]);
                }
            }
        }
        self.filled[pl] = self.filled[pl].max(slot + 1);
    }

    /// Marks (layer, page) as full or final. For INT4 this quantizes the written slots from the
    /// staging copy and frees it; for F32/F16 it only records the state. Idempotent.
    pub fn seal(&mut self, layer: usize, page: PageId) {
        let pl = self.pl(layer, page);
        if self.sealed[pl] {
            return;
        }
        self.sealed[pl] = true;
        if let Store::Int4(s) = &mut self.store
            && let Some(st) = s.staging[pl].take()
        {
            s.quantize(&self.geom, pl, self.filled[pl], &st);
        }
    }

    /// Whether (layer, page) has been sealed since it was allocated (or last reopened).
    pub fn is_sealed(&self, layer: usize, page: PageId) -> bool {
        self.sealed[self.pl(layer, page)]
    }

    /// Slots written so far on (layer, page): the highest written slot + 1.
    pub fn filled(&self, layer: usize, page: PageId) -> usize {
        self.filled[self.pl(layer, page)]
    }

    /// Per-channel key min and max (each `head_dim`) of the tokens written so far on
    /// (layer, page, kv_head), taken before quantization; +inf / -inf for an empty page.
    pub fn key_bounds(&self, layer: usize, page: PageId, kv_head: usize) -> (&[f32], &[f32]) {
        let d = self.geom.head_dim;
        let off = self.tile(layer, page, kv_head) * d;
        (&self.kmin[off..off + d], &self.kmax[off..off + d])
    }

    /// Bytes one page occupies across all layers in its sealed form: K and V elements, INT4 scale/min
    /// metadata and the f32 key bounds. Excludes INT4 staging (transient, one open page per layer
    /// per sequence) and per-page bookkeeping of a few bytes.
    pub fn bytes_per_page(&self) -> usize {
        let (l, h, ps, d) = self.dims();
        let kv = match self.dtype {
            KvDtype::F32 => 2 * ps * d * 4,
            KvDtype::F16 => 2 * ps * d * 2,
            // Codes for K and V, f16 scale + min per key channel and per value token.
            KvDtype::Int4 => ps * d + d * 4 + ps * 4,
        };
        l * h * (kv + 2 * d * 4)
    }

    /// Length [`Self::tile_f32`] needs for its scratch buffer: `2 * page_size * head_dim + 2 * head_dim`.
    pub fn tile_scratch_len(&self) -> usize {
        2 * self.geom.page_size * self.geom.head_dim + 2 * self.geom.head_dim
    }

    /// The first `n_tokens` slots of (layer, page, kv_head) as f32 `[slot][channel]` K and V slices.
    /// Borrowed without copying for F32 pools and open INT4 pages; otherwise decoded into `scratch`
    /// (at least [`Self::tile_scratch_len`] long) — once per tile, shared by every query head of the
    /// GQA group.
    pub fn tile_f32<'a>(
        &'a self,
        layer: usize,
        page: PageId,
        kv_head: usize,
        n_tokens: usize,
        scratch: &'a mut [f32],
    ) -> (&'a [f32], &'a [f32]) {
        self.rows_f32(layer, page, kv_head, 0..n_tokens, scratch)
    }

    /// Brings the memory that [`Self::tile_f32`] reads for the first `n_tokens` slots of (layer,
    /// page, kv_head) towards the cache, without reading it: attention calls this a page or two
    /// ahead. A page's keys and values lie apart from the next page's, so the hardware prefetcher
    /// does not run ahead across them, and between two layers megabytes of weights have gone
    /// through the caches: decode attention at short contexts waited on these loads.
    pub fn prefetch_tile(&self, layer: usize, page: PageId, kv_head: usize, n_tokens: usize) {
        let (_, h, ps, d) = self.dims();
        let n = n_tokens.min(ps);
        let t = self.tile(layer, page, kv_head);
        let elems = t * ps * d..(t * ps + n) * d;
        match &self.store {
            Store::F32 { k, v } => {
                prefetch_value(&k[elems.clone()]);
                prefetch_value(&v[elems]);
            }
            Store::F16 { k, v } => {
                prefetch_value(&k[elems.clone()]);
                prefetch_value(&v[elems]);
            }
            Store::Int4(s) => {
                if let Some(st) = &s.staging[self.pl(layer, page)] {
                    let off = kv_head * ps * d;
                    prefetch_value(&st[off..off + n * d]);
                    prefetch_value(&st[h * ps * d + off..][..n * d]);
                    return;
                }
                let codes = elems.start / 2..elems.end / 2;
                prefetch_value(&s.k_codes[codes.clone()]);
                prefetch_value(&s.v_codes[codes]);
            }
        }
    }

    /// Reads back token `slot` of (layer, page) as f32 (dequantized), all KV heads, into
    /// `k_out` / `v_out` (each `n_kv_heads * head_dim`). Same code path as [`Self::tile_f32`]; meant
    /// for references and tests, not hot loops.
    pub fn read_token(
        &self,
        layer: usize,
        page: PageId,
        slot: usize,
        k_out: &mut [f32],
        v_out: &mut [f32],
    ) {
        let d = self.geom.head_dim;
        debug_assert!(k_out.len() == self.geom.token_width() && v_out.len() == k_out.len());
        let mut scratch = vec![0.0f32; 4 * d];
        let outs = k_out.chunks_exact_mut(d).zip(v_out.chunks_exact_mut(d));
        for (hd, (ko, vo)) in outs.enumerate() {
            let (k, v) = self.rows_f32(layer, page, hd, slot..slot + 1, &mut scratch);
            ko.copy_from_slice(k);
            vo.copy_from_slice(v);
        }
    }

    /// Slots `rows` of (layer, page, kv_head) as f32; `scratch` holds at least
    /// `2 * rows.len() * head_dim + 2 * head_dim` values: decoded K, decoded V, key scale, key min.
    fn rows_f32<'a>(
        &'a self,
        layer: usize,
        page: PageId,
        kv_head: usize,
        rows: Range<usize>,
        scratch: &'a mut [f32],
    ) -> (&'a [f32], &'a [f32]) {
        let (_, h, ps, d) = self.dims();
        debug_assert!(rows.end <= ps && scratch.len() >= 2 * (rows.len() + 1) * d);
        let t = self.tile(layer, page, kv_head);
        let len = rows.len() * d;
        let elems = (t * ps + rows.start) * d..(t * ps + rows.end) * d;
        let (ko, rest) = scratch.split_at_mut(len);
        let (vo, meta) = rest.split_at_mut(len);
        match &self.store {
            Store::F32 { k, v } => (&k[elems.clone()], &v[elems]),
            Store::F16 { k, v } => {
                k[elems.clone()].convert_to_f32_slice(ko);
                v[elems].convert_to_f32_slice(vo);
                (ko, vo)
            }
            Store::Int4(s) => {
                if let Some(st) = &s.staging[self.pl(layer, page)] {
                    let off = (kv_head * ps + rows.start) * d;
                    return (&st[off..off + len], &st[h * ps * d + off..][..len]);
                }
                let (scale, min) = meta.split_at_mut(d);
                let min = &mut min[..d];
                s.k_scale[t * d..(t + 1) * d].convert_to_f32_slice(scale);
                s.k_min[t * d..(t + 1) * d].convert_to_f32_slice(min);
                let codes = elems.start / 2..elems.end / 2;
                decode_keys(&s.k_codes[codes.clone()], scale, min, ko);
                let vmeta = t * ps + rows.start..t * ps + rows.end;
                decode_values(
                    &s.v_codes[codes],
                    &s.v_scale[vmeta.clone()],
                    &s.v_min[vmeta],
                    d,
                    vo,
                );
                (ko, vo)
            }
        }
    }

    /// Turns a sealed INT4 (layer, page) back into an open one: its written slots are dequantized
    /// into a fresh staging copy (they keep their quantization error).
    fn reopen(&mut self, layer: usize, page: PageId) {
        let (_, h, ps, d) = self.dims();
        let pl = self.pl(layer, page);
        let n = self.filled[pl];
        let mut st = vec![0.0f32; 2 * h * ps * d].into_boxed_slice();
        let mut scratch = vec![0.0f32; self.tile_scratch_len()];
        for hd in 0..h {
            let (k, v) = self.tile_f32(layer, page, hd, n, &mut scratch);
            st[hd * ps * d..][..n * d].copy_from_slice(k);
            st[(h + hd) * ps * d..][..n * d].copy_from_slice(v);
        }
        if let Store::Int4(s) = &mut self.store {
            s.staging[pl] = Some(st);
        }
        self.sealed[pl] = false;
    }

    fn dims(&self) -> (usize, usize, usize, usize) {
        let g = &self.geom;
        (g.n_layers, g.n_kv_heads, g.page_size, g.head_dim)
    }

    /// Index of (page, layer) in the per-(page, layer) arrays.
    fn pl(&self, layer: usize, page: PageId) -> usize {
        debug_assert!(layer < self.geom.n_layers && (page as usize) < self.n_pages);
        page as usize * self.geom.n_layers + layer
    }

    /// Index of the (page, layer, kv_head) tile.
    fn tile(&self, layer: usize, page: PageId, kv_head: usize) -> usize {
        debug_assert!(kv_head < self.geom.n_kv_heads);
        self.pl(layer, page) * self.geom.n_kv_heads + kv_head
    }
}

impl Int4Store {
    /// Quantizes slots `0..n` of (page, layer) `pl` from its staging copy `st` (module docs).
    fn quantize(&mut self, g: &KvGeometry, pl: usize, n: usize, st: &[f32]) {
        let (h, ps, d) = (g.n_kv_heads, g.page_size, g.head_dim);
        if n == 0 {
            return;
        }
        let mut lo = vec![0.0f32; d];
        let mut hi = vec![0.0f32; d];
        let mut scale = vec![0.0f32; d];
        let mut min = vec![0.0f32; d];
        for hd in 0..h {
            let t = pl * h + hd;
            let ks = &st[hd * ps * d..][..n * d];
            let vs = &st[(h + hd) * ps * d..][..n * d];
            let codes = t * ps * d / 2..(t * ps + n) * d / 2;

            // Keys: per-channel range across the page's tokens.
            lo.copy_from_slice(&ks[..d]);
            hi.copy_from_slice(&ks[..d]);
            for row in ks.chunks_exact(d).skip(1) {
                for ((l, u), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                    *l = l.min(x);
                    *u = u.max(x);
                }
            }
            let meta = self.k_min[t * d..(t + 1) * d]
                .iter_mut()
                .zip(&mut self.k_scale[t * d..(t + 1) * d]);
            let meta32 = min.iter_mut().zip(scale.iter_mut());
            for (((km, ks), (m32, s32)), (&l, &u)) in meta.zip(meta32).zip(lo.iter().zip(&hi)) {
                (*km, *ks) = affine_params(l, u);
                (*m32, *s32) = (km.to_f32(), ks.to_f32());
            }
            let (s_lo, s_hi) = scale.split_at(d / 2);
            let (m_lo, m_hi) = min.split_at(d / 2);
            for (out, row) in self.k_codes[codes.clone()]
                .chunks_exact_mut(d / 2)
                .zip(ks.chunks_exact(d))
            {
                let (x_lo, x_hi) = row.split_at(d / 2);
                for (j, b) in out.iter_mut().enumerate() {
                    *b = quant(x_lo[j], s_lo[j], m_lo[j]) | (quant(x_hi[j], s_hi[j], m_hi[j]) << 4);
                }
            }

            // Values: per-token range across the head's channels.
            for (slot, (out, row)) in self.v_codes[codes]
                .chunks_exact_mut(d / 2)
                .zip(vs.chunks_exact(d))
                .enumerate()
            {
                let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (m, s) = affine_params(lo, hi);
                self.v_min[t * ps + slot] = m;
                self.v_scale[t * ps + slot] = s;
                let (m, s) = (m.to_f32(), s.to_f32());
                let (x_lo, x_hi) = row.split_at(d / 2);
                for ((b, &a), &c) in out.iter_mut().zip(x_lo).zip(x_hi) {
                    *b = quant(a, s, m) | (quant(c, s, m) << 4);
                }
            }
        }
    }
}

/// Key tile decode: rows of `head_dim / 2` packed bytes, per-channel f32 `scale` / `min`.
fn decode_keys(codes: &[u8], scale: &[f32], min: &[f32], out: &mut [f32]) {
    let half = scale.len() / 2;
    let (s_lo, s_hi) = scale.split_at(half);
    let (m_lo, m_hi) = min.split_at(half);
    for (row, o) in codes.chunks_exact(half).zip(out.chunks_exact_mut(2 * half)) {
        let (o_lo, o_hi) = o.split_at_mut(half);
        for (j, &b) in row.iter().enumerate() {
            o_lo[j] = f32::from(b & 15) * s_lo[j] + m_lo[j];
            o_hi[j] = f32::from(b >> 4) * s_hi[j] + m_hi[j];
        }
    }
}

/// Value tile decode: one f16 `scale` / `min` per token row.
fn decode_values(codes: &[u8], scale: &[f16], min: &[f16], head_dim: usize, out: &mut [f32]) {
    let half = head_dim / 2;
    let rows = codes.chunks_exact(half).zip(out.chunks_exact_mut(head_dim));
    for ((row, o), (s, m)) in rows.zip(scale.iter().zip(min)) {
        let (s, m) = (s.to_f32(), m.to_f32());
        let (o_lo, o_hi) = o.split_at_mut(half);
        for ((&b, lo), hi) in row.iter().zip(o_lo).zip(o_hi) {
            *lo = f32::from(b & 15) * s + m;
            *hi = f32::from(b >> 4) * s + m;
        }
    }
}

/// 4-bit code of `x` for `x ≈ code * s + m`.
#[inline]
fn quant(x: f32, s: f32, m: f32) -> u8 {
    if s > 0.0 {
        // NaN input saturates to code 0 (float-to-int casts never panic).
        ((x - m) / s).round().clamp(0.0, 15.0) as u8
    } else {
        0
    }
}

/// f16 `(min, scale)` covering `[lo, hi]`: `min` rounded down, `scale` up, so `min + 15 * scale >= hi`
/// and every value in range reconstructs within half a step. Values beyond the f16 range are clamped.
fn affine_params(lo: f32, hi: f32) -> (f16, f16) {
    let m = f16_round(lo, false);
    let s = f16_round((hi - m.to_f32()) / 15.0, true);
    (m, s)
}

/// Rounds `x` to f16 toward +inf (`up`) or -inf, saturating at the finite f16 range.
fn f16_round(x: f32, up: bool) -> f16 {
    let x = x.clamp(f16::MIN.to_f32(), f16::MAX.to_f32());
    let h = f16::from_f32(x);
    let y = h.to_f32();
    let b = h.to_bits();
    let neg = b & 0x8000 != 0;
    if up && y < x {
        // Step toward +inf: magnitude down for negatives (-0 never rounds below a positive x).
        f16::from_bits(if neg { b - 1 } else { b + 1 })
    } else if !up && y > x {
        f16::from_bits(match (neg, b & 0x7fff) {
            (false, 0) => 0x8001,
            (false, _) => b - 1,
            (true, _) => b + 1,
        })
    } else {
        h
    }
}

#[cfg(test)]
#[path = "kv_tests.rs"]
pub(crate) mod tests;
