//! Weight and KV storage on transparent huge pages.
//!
//! A decode step streams every weight, and a batch of distinct adapters reads thousands of short
//! runs in scattered places. On 4 KiB pages each page needs its own TLB entry, a miss costs a page
//! walk (under a hypervisor's nested paging, a two-dimensional one), and a software prefetch that
//! misses the TLB walks too. So the buffers of things that live and die together (one model's
//! weights, one adapter) can be **packed** into anonymous mappings aligned to 2 MiB and advised
//! `MADV_HUGEPAGE`, which Linux backs with huge pages wherever transparent huge pages are enabled
//! ("madvise" or "always", the default of most distributions).
//!
//! A [`Store`] starts on the heap (the `Vec` a quantizer builds); [`pack`] moves a set of stores
//! into [`Region`]s of up to [`GROUP_BYTES`], each of which lives as long as any store in it.
//! Packed stores are read-only and clone by sharing. Less than [`PACK_MIN`] bytes in all stay on
//! the heap (a small adapter would otherwise hold a whole 2 MiB page). [`HugeVec`] is the
//! writable kind, for buffers written in place (the KV cache's pages). `EDGELORA_HUGEPAGES=0`
//! turns both off.

use std::sync::Arc;

use bytemuck::Pod;

/// The huge page size this module aligns to (x86-64 and aarch64 with 4 KiB base pages).
pub const HUGE_PAGE: usize = 2 << 20;
/// Below this many bytes in all, [`pack`] leaves the stores on the heap.
pub const PACK_MIN: usize = HUGE_PAGE;
/// [`pack`] fills regions of up to this many bytes, one after the other.
pub const GROUP_BYTES: usize = 64 << 20;
/// [`pack`] rounds a group up to whole huge pages when that adds at most `1 / MAX_WASTE` of it.
pub const MAX_WASTE: usize = 8;
/// Each packed buffer starts on a cache line.
const ALIGN: usize = 64;

/// One anonymous mapping, its usable part aligned to [`HUGE_PAGE`] and advised for huge pages.
pub struct Region {
    map: memmap2::MmapMut,
    /// Offset of the aligned start in `map`.
    start: usize,
    len: usize,
}

impl Region {
    /// A zeroed region of at least `len` bytes (rounded up to whole huge pages).
    pub fn new(len: usize) -> std::io::Result<Region> {
        let len = len.max(1).next_multiple_of(HUGE_PAGE);
        // One huge page more, so that an aligned start exists inside the mapping.
        let map = memmap2::MmapOptions::new()
            .len(len + HUGE_PAGE)
            .map_anon()?;
        let start = (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize;
        // Advice only: where THP is off or the kernel lacks it, the pages stay 4 KiB.
        #[cfg(target_os = "linux")]
        let _ = map.advise_range(memmap2::Advice::HugePage, start, len);
        Ok(Region { map, start, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }
}

/// Bytes of `regions` that the kernel backs with huge pages now, from one read of
/// `/proc/self/smaps` (`None` where that cannot be read).
pub fn huge_bytes<'a>(regions: impl IntoIterator<Item = &'a Region>) -> Option<usize> {
    let spans: Vec<(usize, usize)> = regions
        .into_iter()
        .map(|r| {
            (
                r.map.as_ptr() as usize,
                r.map.as_ptr() as usize + r.map.len(),
            )
        })
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = spans.iter().any(|&(a, b)| lo < b && a < hi);
        } else if inside && let Some(v) = line.strip_prefix("AnonHugePages:") {
            total += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()?
                * 1024;
        }
    }
    Some(total)
}

/// A buffer of plain values: on the heap, or packed read-only in a shared [`Region`].
pub enum Store<T> {
    Heap(Vec<T>),
    Packed {
        region: Arc<Region>,
        /// Where the values start in the region, so that a read is this pointer: through the
        /// region it was two more dependent loads (the `Arc`'s target, then its mapping) and a
        /// bounds and an alignment check, at every tile kernel call.
        ptr: std::ptr::NonNull<T>,
        len: usize,
    },
}

// SAFETY: a packed store only reads its region, which the `Arc` keeps mapped and nothing writes
// once it is shared (`pack` fills it before wrapping it); the heap case is a `Vec`.
unsafe impl<T: Send + Sync> Send for Store<T> {}
// SAFETY: as above: shared access is read-only.
unsafe impl<T: Send + Sync> Sync for Store<T> {}

impl<T: Pod> Store<T> {
    pub fn is_packed(&self) -> bool {
        matches!(self, Store::Packed { .. })
    }

    fn nbytes(&self) -> usize {
        std::mem::size_of_val::<[T]>(self)
    }
}

impl<T: Pod> From<Vec<T>> for Store<T> {
    fn from(v: Vec<T>) -> Self {
        Store::Heap(v)
    }
}

impl<T: Pod> std::ops::Deref for Store<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        match self {
            Store::Heap(v) => v,
            // SAFETY: `repoint` checked that the `len` values at `ptr` lie inside the region
            // (aligned for `T`), which the `Arc` keeps mapped and unwritten.
            Store::Packed { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }
}

impl<T: Pod> Clone for Store<T> {
    /// Packed stores are read-only: a clone shares the region.
    fn clone(&self) -> Self {
        match self {
            Store::Heap(v) => Store::Heap(v.clone()),
            Store::Packed { region, ptr, len } => Store::Packed {
                region: region.clone(),
                ptr: *ptr,
                len: *len,
            },
        }
    }
}

impl<T: Pod> std::fmt::Debug for Store<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = if self.is_packed() { "packed" } else { "heap" };
        write!(
            f,
            "Store({} × {}, {place})",
            self.len(),
            std::any::type_name::<T>()
        )
    }
}

/// A zeroed, writable buffer that owns its memory: on huge pages (a [`Region`] of its own) when
/// it is at least [`PACK_MIN`] bytes and packing is on, else on the heap. For buffers written in
/// place, such as the KV cache's pages, which attention reads in scattered pieces.
pub enum HugeVec<T> {
    Mapped { region: Region, len: usize },
    Heap(Vec<T>),
}

impl<T: Pod> HugeVec<T> {
    /// `len` zeroed values (an anonymous mapping is zero-filled and, like `calloc`'s memory,
    /// takes physical pages only where written).
    pub fn zeroed(len: usize) -> Self {
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        if packing_enabled()
            && bytes >= PACK_MIN
            && std::mem::align_of::<T>() <= HUGE_PAGE
            && let Ok(region) = Region::new(bytes)
        {
            return HugeVec::Mapped { region, len };
        }
        HugeVec::Heap(vec![T::zeroed(); len])
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, HugeVec::Mapped { .. })
    }
}

impl<T: Pod> std::ops::Deref for HugeVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            HugeVec::Mapped { region, len } => {
                bytemuck::cast_slice(&region.bytes()[..len * std::mem::size_of::<T>()])
            }
            HugeVec::Heap(v) => v,
        }
    }
}

impl<T: Pod> std::ops::DerefMut for HugeVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            HugeVec::Mapped { region, len } => {
                bytemuck::cast_slice_mut(&mut region.bytes_mut()[..*len * std::mem::size_of::<T>()])
            }
            HugeVec::Heap(v) => v,
        }
    }
}

/// A store of any element type, as [`pack`] sees it.
pub trait Packable {
    /// Bytes it would take in a region (0 once packed).
    fn heap_bytes(&self) -> usize;
    /// Copies its heap values to the front of `to`.
    fn copy_to(&self, to: &mut [u8]);
    /// Points it at `at` in `region` (where [`Packable::copy_to`] put its values) and frees the
    /// heap copy.
    fn repoint(&mut self, region: &Arc<Region>, at: usize);
}

impl<T: Pod> Packable for Store<T> {
    fn heap_bytes(&self) -> usize {
        match self {
            Store::Heap(_) => self.nbytes(),
            Store::Packed { .. } => 0,
        }
    }

    fn copy_to(&self, to: &mut [u8]) {
        if let Store::Heap(v) = self {
            let src: &[u8] = bytemuck::cast_slice(v);
            to[..src.len()].copy_from_slice(src);
        }
    }

    fn repoint(&mut self, region: &Arc<Region>, at: usize) {
        if let Store::Heap(v) = self {
            let len = v.len();
            // Checked once here (bounds and alignment), so that `deref` need not.
            let values: &[T] =
                bytemuck::cast_slice(&region.bytes()[at..at + len * std::mem::size_of::<T>()]);
            *self = Store::Packed {
                region: region.clone(),
                ptr: std::ptr::NonNull::from(values).cast(),
                len,
            };
        }
    }
}

/// Whether [`pack`] packs (`EDGELORA_HUGEPAGES=0` turns it off; read once).
pub fn packing_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("EDGELORA_HUGEPAGES").map_or(true, |v| v != "0"))
}

/// Moves the heap stores that `visit` hands out into new huge-page [`Region`]s of up to
/// [`GROUP_BYTES`] each (a larger store gets one of its own), so that packing a model holds at
/// most one group twice, not the whole model. A group's region is rounded up to whole huge pages
/// when that wastes at most an eighth of it ([`MAX_WASTE`]); otherwise it covers only the whole
/// huge pages the group fills, and the stores past them stay on the heap. So packing costs at
/// most an eighth more memory: a 5.35 MB adapter (SmolLM2, rank 16, all projections) puts 4 MiB
/// on huge pages and keeps its last 1.2 MB where it was; a 12.4 MB one (Llama-3.2-1B) takes
/// 12 MiB.
///
/// `visit` is called several times and must hand out the same stores in the same order each
/// time. Returns the regions: none when packing is off, when there is less than [`PACK_MIN`] to
/// pack, or when a mapping fails (the stores not yet moved then stay where they are, which
/// changes nothing but speed).
pub fn pack(mut visit: impl FnMut(&mut dyn FnMut(&mut dyn Packable))) -> Vec<Arc<Region>> {
    // (group, offset, bytes) of every store, and each group's size.
    let mut places = Vec::new();
    let mut groups: Vec<usize> = Vec::new();
    visit(&mut |s| {
        let n = s.heap_bytes();
        let step = n.next_multiple_of(ALIGN);
        let gi = groups.len();
        match groups.last_mut() {
            Some(g) if *g + step <= GROUP_BYTES || *g == 0 => {
                places.push((gi - 1, *g, n));
                *g += step;
            }
            _ => {
                places.push((gi, 0, n));
                groups.push(step);
            }
        }
    });
    let total: usize = groups.iter().sum();
    if !packing_enabled() || total < PACK_MIN {
        return Vec::new();
    }
    let mut regions = Vec::with_capacity(groups.len());
    for (gi, &len) in groups.iter().enumerate() {
        let up = len.next_multiple_of(HUGE_PAGE);
        // The bytes of this group that go to the region: all, or the whole pages it fills.
        let cut = if up - len <= len / MAX_WASTE {
            up
        } else {
            len / HUGE_PAGE * HUGE_PAGE
        };
        let inside = |&(g, at, n): &(usize, usize, usize)| g == gi && n > 0 && at + n <= cut;
        if !places.iter().any(inside) {
            continue;
        }
        let Ok(mut region) = Region::new(cut) else {
            break;
        };
        let bytes = region.bytes_mut();
        let mut i = 0;
        visit(&mut |s| {
            if inside(&places[i]) {
                s.copy_to(&mut bytes[places[i].1..]);
            }
            i += 1;
        });
        let region = Arc::new(region);
        let mut i = 0;
        visit(&mut |s| {
            if inside(&places[i]) {
                s.repoint(&region, places[i].1);
            }
            i += 1;
        });
        regions.push(region);
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values `7 i` (wrapping), on the heap.
    fn ramp(n: u32) -> Store<u16> {
        (0..n).map(|i| (i * 7) as u16).collect::<Vec<_>>().into()
    }

    #[test]
    fn packed_stores_read_what_the_heap_stores_held_and_keep_the_region_alive() {
        // 1 MiB of u16 and 1 MiB of [u8; 4]: exactly one huge page, all of it packed.
        let mut a = ramp(1 << 19);
        let mut b: Store<[u8; 4]> = (0..(1u32 << 18))
            .map(|i| [i as u8, (i >> 8) as u8, 1, 2])
            .collect::<Vec<_>>()
            .into();
        let (wa, wb) = (a.to_vec(), b.to_vec());
        let regions = pack(|f| {
            f(&mut a);
            f(&mut b);
        });
        if !packing_enabled() {
            assert!(regions.is_empty() && !a.is_packed());
            return;
        }
        let [region] = &regions[..] else {
            panic!("2 MiB packs in one region, got {}", regions.len())
        };
        assert!(a.is_packed() && b.is_packed());
        // Read in place, from the region itself.
        let inside = region.bytes().as_ptr_range();
        assert!(inside.contains(&(a.as_ptr() as *const u8)));
        assert!(inside.contains(&(b.as_ptr() as *const u8)));
        assert_eq!(&a[..], &wa[..]);
        assert_eq!(&b[..], &wb[..]);
        assert_eq!(region.len(), HUGE_PAGE);
        assert_eq!(region.bytes().as_ptr() as usize % HUGE_PAGE, 0);
        // A second pack finds nothing on the heap.
        assert!(pack(|f| f(&mut a)).is_empty());
        // The stores keep the region: dropping the caller's handle changes nothing.
        drop(regions);
        let c = a.clone();
        drop(a);
        assert_eq!(&c[..], &wa[..]);
        assert_eq!(&b[..], &wb[..]);
    }

    #[test]
    fn stores_past_the_last_whole_huge_page_stay_on_the_heap() {
        // 1.4 MB then 1.5 MB: rounding 2.9 MB up to 4 MiB would waste more than an eighth, so
        // the region is the one whole page and the second store stays where it was.
        let mut a = ramp(700_000);
        let mut b: Store<[u8; 3]> = (0..500_000u32)
            .map(|i| [i as u8, (i >> 8) as u8, 1])
            .collect::<Vec<_>>()
            .into();
        let (wa, wb) = (a.to_vec(), b.to_vec());
        let regions = pack(|f| {
            f(&mut a);
            f(&mut b);
        });
        if !packing_enabled() {
            return;
        }
        assert_eq!(
            regions.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [HUGE_PAGE]
        );
        assert!(a.is_packed() && !b.is_packed());
        assert_eq!(&a[..], &wa[..]);
        assert_eq!(&b[..], &wb[..]);
    }

    #[test]
    fn large_sets_are_packed_group_by_group() {
        // 3 × 30 MB and one 70 MB store: groups of up to 64 MB, the large store on its own.
        let sizes = [30 << 20, 30 << 20, 70 << 20, 30 << 20];
        let mut stores: Vec<Store<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8 + 1; n].into())
            .collect();
        let regions = pack(|f| stores.iter_mut().for_each(|s| f(s)));
        if !packing_enabled() {
            return;
        }
        let lens: Vec<usize> = regions.iter().map(|r| r.len()).collect();
        assert_eq!(lens, [60 << 20, 70 << 20, 30 << 20]);
        for (i, s) in stores.iter().enumerate() {
            assert!(s.is_packed());
            assert!(s.iter().all(|&b| b == i as u8 + 1), "store {i}");
        }
    }

    #[test]
    fn huge_vecs_start_zeroed_and_keep_what_is_written() {
        for len in [10usize, 3 << 20] {
            let mut v: HugeVec<f32> = HugeVec::zeroed(len);
            assert_eq!(v.len(), len);
            assert_eq!(v.is_mapped(), packing_enabled() && len * 4 >= PACK_MIN);
            assert!(v.iter().all(|&x| x == 0.0));
            for (i, x) in v.iter_mut().enumerate().step_by(997) {
                *x = i as f32;
            }
            assert!(
                v.iter()
                    .enumerate()
                    .all(|(i, &x)| x == if i % 997 == 0 { i as f32 } else { 0.0 })
            );
        }
    }

    #[test]
    fn small_sets_stay_on_the_heap() {
        let mut a: Store<u8> = vec![5u8; 4096].into();
        assert!(pack(|f| f(&mut a)).is_empty());
        assert!(!a.is_packed());
        assert_eq!(&a[..], &[5u8; 4096][..]);
    }
}
