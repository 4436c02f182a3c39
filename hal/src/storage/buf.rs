//! [`AlignedBuf`]: the page-aligned heap buffer that `O_DIRECT` reads land in.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of the start and granularity of the capacity of every [`AlignedBuf`]: the page
/// size, which is also a multiple of every NVMe/SATA logical block size `O_DIRECT` can ask for.
pub const ALIGN: usize = 4096;

/// Buffers at least this large are anonymous mappings on Linux: the kernel hands out zeroed pages
/// on first touch, where the allocator would have to write zeros over every page up front (which
/// for a 64 MiB adapter costs about as much as reading it).
const MMAP_THRESHOLD: usize = 128 * 1024;

/// `n` rounded up to a multiple of [`ALIGN`] (saturating at the largest aligned `usize`).
pub(crate) const fn round_up(n: usize) -> usize {
    match n.checked_add(ALIGN - 1) {
        Some(m) => m & !(ALIGN - 1),
        None => usize::MAX & !(ALIGN - 1),
    }
}

/// A zero-initialised heap buffer whose start is 4096-byte aligned and whose capacity is a
/// multiple of 4096, as `O_DIRECT` needs. It dereferences to its first [`len`](Self::len) bytes;
/// the rest of the capacity (at most 4095 bytes) is where an `O_DIRECT` read of a file tail that
/// is not a multiple of 4096 is allowed to land.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// Allocated with `mmap` (freed with `munmap`) rather than the global allocator.
    mapped: bool,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Vec<u8>`); nothing else holds the
// pointer, so moving it to or sharing `&AlignedBuf` with another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send`; `&AlignedBuf` only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes (capacity `len` rounded up to 4096). `len` may be 0, which
    /// allocates nothing. Large buffers are anonymous memory mappings on Linux, so their pages are
    /// only materialised (zeroed by the kernel) when first written.
    ///
    /// # Panics
    /// If the capacity overflows `isize`, and (via [`alloc::handle_alloc_error`]) when the
    /// allocation fails, like `Vec`.
    pub fn zeroed(len: usize) -> Self {
        let cap = round_up(len);
        assert!(cap >= len, "AlignedBuf of {len} bytes is too large");
        let (ptr, mapped) = if cap == 0 {
            // A dangling but aligned, non-null pointer: valid for zero-length slices.
            let dangling = std::ptr::without_provenance_mut(ALIGN);
            (NonNull::new(dangling).expect("ALIGN is not zero"), false)
        } else if cfg!(target_os = "linux") && cap >= MMAP_THRESHOLD {
            (Self::map(cap), true)
        } else {
            let layout = Self::layout(cap);
            // SAFETY: `layout` has a non-zero size (cap > 0).
            let raw = unsafe { alloc::alloc_zeroed(layout) };
            let Some(ptr) = NonNull::new(raw) else {
                alloc::handle_alloc_error(layout)
            };
            (ptr, false)
        };
        Self {
            ptr,
            len,
            cap,
            mapped,
        }
    }

    /// `cap` bytes of fresh zero pages.
    #[cfg(target_os = "linux")]
    fn map(cap: usize) -> NonNull<u8> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            alloc::handle_alloc_error(Self::layout(cap));
        }
        // Mappings start on a page boundary, and pages are 4 KiB or a multiple of it.
        debug_assert_eq!(raw as usize % ALIGN, 0);
        NonNull::new(raw.cast()).expect("mmap does not return null on success")
    }

    #[cfg(not(target_os = "linux"))]
    fn map(_cap: usize) -> NonNull<u8> {
        unreachable!("mappings are used on Linux only")
    }

    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, ALIGN).expect("AlignedBuf capacity overflows isize")
    }

    /// Logical length: what `Deref` shows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the logical length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes: a multiple of 4096, at least [`len`](Self::len).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Shortens the logical length to `len`; does nothing if `len` is not shorter.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Sets the logical length to `len`, longer or shorter: the whole capacity is always
    /// initialised (zeroed at allocation, then whatever reads left there).
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub(crate) fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "length {len} past the capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// The whole capacity, past the logical length included: where reads land.
    pub(crate) fn spare_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for reads and writes of `cap` initialised (zeroed at
        // allocation) bytes for as long as `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.mapped {
            // SAFETY: mapped in `zeroed` with exactly this length and not unmapped before.
            let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
            debug_assert_eq!(rc, 0, "munmap of an AlignedBuf failed");
            return;
        }
        if self.cap != 0 {
            // SAFETY: allocated in `zeroed` with exactly this layout and not freed before.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= cap` bytes starting at `ptr` are initialised and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_page_aligned_and_capacity_a_multiple_of_a_page() {
        for len in [0, 1, 511, 4095, 4096, 4097, 65_536, (1 << 20) + 123] {
            let mut buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.is_empty(), len == 0);
            assert_eq!(
                buf.as_ptr() as usize % ALIGN,
                0,
                "start of {len}-byte buffer"
            );
            assert_eq!(buf.capacity() % ALIGN, 0);
            assert!(buf.capacity() >= len && buf.capacity() < len + ALIGN);
            assert!(buf.iter().all(|&b| b == 0));
            assert!(buf.spare_mut().iter().all(|&b| b == 0));
            buf.iter_mut().for_each(|b| *b = 0xA5);
            buf.truncate(len / 2);
            assert_eq!(buf.len(), len / 2);
            buf.truncate(len + 1);
            assert_eq!(buf.len(), len / 2, "truncate never grows");
            let cap = buf.capacity();
            buf.set_len(cap);
            assert_eq!(buf.len(), cap, "set_len grows up to the capacity");
            assert!(buf[..len].iter().all(|&b| b == 0xA5));
            assert!(buf[len..].iter().all(|&b| b == 0));
            buf.set_len(0);
            assert!(buf.is_empty());
        }
    }

    #[test]
    #[should_panic(expected = "past the capacity")]
    fn set_len_past_the_capacity_panics() {
        AlignedBuf::zeroed(10).set_len(ALIGN + 1);
    }

    #[test]
    fn round_up_to_pages() {
        assert_eq!(round_up(0), 0);
        assert_eq!(round_up(1), 4096);
        assert_eq!(round_up(4096), 4096);
        assert_eq!(round_up(4097), 8192);
        assert_eq!(round_up(usize::MAX) % ALIGN, 0);
    }
}
