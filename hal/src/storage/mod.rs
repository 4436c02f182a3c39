//! Streaming LoRA adapter pack files (a few KB to ~100 MB) from NVMe into memory at the disk's
//! full speed.
//!
//! [`FileReader`] reads a whole file, or an aligned range of one, two ways:
//!
//! - [`FileReader::read_file_staged`] reads into a **staging buffer** the reader owns and reuses
//!   for every file, and lends it out until the next call. This is the one for a loader that
//!   decodes each file right away and does not keep the bytes: after the first few files, a load
//!   allocates nothing, faults in no pages and (on io_uring) registers nothing. The buffer grows
//!   when a larger file comes (to the file's size plus 1/8, so that packs of nearly the same size
//!   do not each grow it) and never shrinks: it holds the largest file read so far, pinned in
//!   memory where it is registered.
//! - [`FileReader::read_file`] and [`FileReader::read_range`] return an owned [`AlignedBuf`],
//!   fresh memory each call, for callers that keep the bytes.
//!
//! How the bytes get there:
//!
//! - **`O_DIRECT`.** An adapter is read once and then uploaded; going through the page cache
//!   would copy every byte once more and keep a second copy of each adapter around, evicting
//!   cached data the box needs more (such as the base model files). With `O_DIRECT` the drive DMAs
//!   straight into the destination, which is why the destination is 4096-byte aligned and reads
//!   are whole 4096-byte blocks (a file's tail is read rounded up; the kernel returns only the
//!   bytes that exist). Filesystems that refuse `O_DIRECT` (tmpfs) get the file re-opened
//!   buffered, logged at debug.
//! - **io_uring, several reads in flight.** One synchronous read at a time leaves an NVMe drive
//!   idle between requests; [`ReaderConfig::queue_depth`] reads of [`ReaderConfig::chunk_bytes`]
//!   each are kept in flight, each landing directly at its place in the destination (no bounce
//!   buffer, no copy). Short reads are resubmitted for the remainder; a short read at the end of
//!   the file ends that range.
//! - **A registered staging buffer, and only that.** Without registration the kernel pins (and
//!   unpins) the destination pages for every request; a buffer registered as a fixed buffer is
//!   pinned once and read into with `IORING_OP_READ_FIXED`. But registering pins the whole buffer
//!   up front, before the first read can start, and for fresh memory that means faulting in every
//!   page first; with plain reads that work overlaps the reads in flight. Registering a fresh
//!   buffer per file measured about 35% slower than plain reads on a 64 MiB file. So registration
//!   is tied to reuse: the staging buffer is registered once each time it grows (where pinning it
//!   is paid once for all the files that follow), and the owned-buffer reads use plain reads.
//!   Registration counts against `RLIMIT_MEMLOCK` unless the process has `CAP_IPC_LOCK`, and the
//!   kernel takes at most 1 GiB per buffer; where it fails, the staging buffer is read into with
//!   plain reads ([`FileReader::registered_buffers`] and [`FileReader::why`] say which), still
//!   without faulting in pages once it has been used.
//! - **The fallback.** Where io_uring cannot be set up (an old kernel, `kernel.io_uring_disabled`,
//!   a seccomp filter, a container runtime that blocks it) the reader does the same chunked reads
//!   with `pread`, one at a time, into the same destinations (the staging buffer included), and
//!   [`FileReader::why`] says why. `EDGELORA_IO_URING=off` (or `0`, `false`) and
//!   [`ReaderConfig::force_pread`] force it. If a read through the ring is refused as such
//!   (EINVAL, EOPNOTSUPP), that file is read again with `pread` and a warning logged.
//!
//! [`raw_direct_read`] is the yardstick to compare against: a plain `O_DIRECT` pread loop with
//! one read in flight into one reused buffer.

mod buf;
mod pread;
#[cfg(target_os = "linux")]
mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use buf::round_up;
pub use buf::{ALIGN, AlignedBuf};

/// Environment variable that forces the pread fallback when set to `off`, `0` or `false`.
pub const IO_URING_ENV: &str = "EDGELORA_IO_URING";

/// Largest read one request asks for: what fits the io_uring length field with room to spare.
const MAX_CHUNK_BYTES: usize = 1 << 30;

/// Which engine a [`FileReader`] reads with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageKind {
    /// Several reads in flight through an io_uring.
    IoUring,
    /// One `pread` at a time.
    Pread,
}

impl fmt::Display for StorageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageKind::IoUring => "io_uring",
            StorageKind::Pread => "pread",
        })
    }
}

/// How a [`FileReader`] reads.
#[derive(Clone, Debug)]
pub struct ReaderConfig {
    /// Use pread even where io_uring works. Default false; `EDGELORA_IO_URING=off|0|false`
    /// forces it too.
    pub force_pread: bool,
    /// Reads in flight through the ring. Default 8. 0 (or more than the kernel allows) makes the
    /// io_uring setup fail, and so the reader fall back to pread.
    pub queue_depth: u32,
    /// Bytes per read. Default 1 MiB. Rounded up to a multiple of 4096 (at least 4096, at most
    /// 1 GiB).
    pub chunk_bytes: usize,
    /// Open with `O_DIRECT` (bypassing the page cache). Default true. A file on a filesystem that
    /// refuses `O_DIRECT` is read buffered instead.
    pub direct: bool,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            force_pread: false,
            queue_depth: 8,
            chunk_bytes: 1 << 20,
            direct: true,
        }
    }
}

/// Cumulative counters of a [`FileReader`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// File bytes read (a file's tail counts its real length, not the rounded-up read).
    pub bytes_read: u64,
    /// Read requests issued (resubmissions after short reads included).
    pub reads_submitted: u64,
    /// Of `reads_submitted`, those into the registered staging buffer (`IORING_OP_READ_FIXED`).
    pub fixed_reads: u64,
    /// Successful [`FileReader::read_file`], [`FileReader::read_file_staged`] and
    /// [`FileReader::read_range`] calls.
    pub files_read: u64,
}

/// Reads adapter files into aligned memory, through io_uring where it works and pread elsewhere.
/// Never fails to construct; [`kind`](Self::kind) and [`why`](Self::why) tell what it ended up
/// with. Meant to live in one loader thread (it is `Send`, and reads take `&mut self`).
pub struct FileReader {
    cfg: ReaderConfig,
    // Declared before `staging` so that the ring (and with it the registration of `staging`) is
    // dropped first.
    #[cfg(target_os = "linux")]
    uring: Option<uring::Uring>,
    /// Where [`read_file_staged`](Self::read_file_staged) reads to; registered with the ring
    /// (where that works) from each growth to the next.
    staging: AlignedBuf,
    why: String,
    stats: ReadStats,
}

impl fmt::Debug for FileReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileReader")
            .field("kind", &self.kind())
            .field("why", &self.why)
            .field("cfg", &self.cfg)
            .field("staging_capacity", &self.staging.capacity())
            .field("stats", &self.stats)
            .finish()
    }
}

impl FileReader {
    /// Sets up io_uring unless forced off; on any failure falls back to pread and remembers why.
    pub fn new(cfg: ReaderConfig) -> Self {
        let cfg = ReaderConfig {
            chunk_bytes: round_up(cfg.chunk_bytes.max(1)).min(MAX_CHUNK_BYTES),
            ..cfg
        };
        let env = std::env::var(IO_URING_ENV).ok();
        let (uring, why) = if let Some(value) = env.as_deref().filter(|v| env_forces_pread(v)) {
            (None, format!("pread: forced by {IO_URING_ENV}={value}"))
        } else if cfg.force_pread {
            (
                None,
                "pread: forced by ReaderConfig::force_pread".to_owned(),
            )
        } else {
            setup_uring(cfg.queue_depth)
        };
        #[cfg(not(target_os = "linux"))]
        let _: Option<()> = uring;
        tracing::debug!(reader = %why, "adapter file reader");
        Self {
            cfg,
            #[cfg(target_os = "linux")]
            uring,
            staging: AlignedBuf::zeroed(0),
            why,
            stats: ReadStats::default(),
        }
    }

    /// The engine reads go through.
    pub fn kind(&self) -> StorageKind {
        #[cfg(target_os = "linux")]
        if self.uring.is_some() {
            return StorageKind::IoUring;
        }
        StorageKind::Pread
    }

    /// Why [`kind`](Self::kind) is what it is, for a log line: "io_uring, 8 reads in flight,
    /// registered staging buffer", "io_uring, 8 reads in flight, plain reads (registering the
    /// staging buffer failed: ...)", "pread: io_uring setup failed: ...", "pread: forced by
    /// EDGELORA_IO_URING=off".
    pub fn why(&self) -> &str {
        &self.why
    }

    /// Whether [`read_file_staged`](Self::read_file_staged) reads into a registered (fixed)
    /// io_uring buffer: once the staging buffer exists, whether registering it worked; before,
    /// whether registering a buffer worked at setup. Always false for pread.
    /// [`read_file`](Self::read_file) and [`read_range`](Self::read_range) never use registered
    /// buffers.
    pub fn registered_buffers(&self) -> bool {
        #[cfg(target_os = "linux")]
        if let Some(u) = &self.uring {
            return u.registered();
        }
        false
    }

    /// The configuration in force (`chunk_bytes` rounded as documented).
    pub fn config(&self) -> &ReaderConfig {
        &self.cfg
    }

    /// Cumulative counters.
    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    /// Bytes held by the staging buffer of [`read_file_staged`](Self::read_file_staged): 0
    /// before its first non-empty file, then at least the largest file read so far.
    pub fn staging_capacity(&self) -> usize {
        self.staging.capacity()
    }

    /// The whole file, into fresh memory of its own (plain reads, no registration); the result's
    /// length is the file's size. For a caller that decodes the bytes and lets them go,
    /// [`read_file_staged`](Self::read_file_staged) is cheaper.
    pub fn read_file(&mut self, path: &Path) -> io::Result<AlignedBuf> {
        self.read(path, 0, None)
    }

    /// The whole file, into the reader's staging buffer, lent out until the next call; the
    /// slice's length is the file's size, and it starts 4096-byte aligned.
    ///
    /// The staging buffer is reused from call to call: it grows when a file does not fit (to the
    /// file's size plus 1/8), never shrinks, and on io_uring is registered once per growth, so
    /// that a load of a file no larger than one read before allocates nothing, faults in no
    /// pages and registers nothing. On a failed call the buffer keeps its size; its contents are
    /// unspecified.
    pub fn read_file_staged(&mut self, path: &Path) -> io::Result<&[u8]> {
        let (mut src, want) = self.open(path, 0, None)?;
        let span = round_up(want);
        if span > self.staging.capacity() {
            self.grow_staging(span);
        }
        // Taken out for the read so that `read_into` can borrow `self` too; an empty buffer
        // allocates nothing. The ring's registration stays valid: the allocation does not move.
        let mut staging = std::mem::replace(&mut self.staging, AlignedBuf::zeroed(0));
        let result = self.read_into(&mut src, &mut staging, span, 0);
        self.staging = staging;
        let got = result.map_err(|e| in_path(path, e))?;
        self.staging.set_len(got.min(want));
        self.stats.files_read += 1;
        Ok(&self.staging[..])
    }

    /// `len` bytes from `offset` (a multiple of 4096), into fresh memory (plain reads, no
    /// registration); fewer only where the file ends first (none at or past the end).
    pub fn read_range(&mut self, path: &Path, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        if !offset.is_multiple_of(ALIGN as u64) {
            return Err(in_path(
                path,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("offset {offset} is not a multiple of {ALIGN}"),
                ),
            ));
        }
        self.read(path, offset, Some(len))
    }

    fn read(&mut self, path: &Path, offset: u64, len: Option<usize>) -> io::Result<AlignedBuf> {
        let (mut src, want) = self.open(path, offset, len)?;
        let mut buf = AlignedBuf::zeroed(want);
        let span = buf.capacity();
        let got = self
            .read_into(&mut src, &mut buf, span, offset)
            .map_err(|e| in_path(path, e))?;
        buf.set_len(got.min(want));
        self.stats.files_read += 1;
        Ok(buf)
    }

    /// Opens `path` and works out how many bytes from `offset` to read: up to `len`, and no
    /// further than the file's end.
    fn open<'p>(
        &self,
        path: &'p Path,
        offset: u64,
        len: Option<usize>,
    ) -> io::Result<(Source<'p>, usize)> {
        let src = Source::open(path, self.cfg.direct).map_err(|e| in_path(path, e))?;
        let meta = src.file.metadata().map_err(|e| in_path(path, e))?;
        if !meta.is_file() {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
            return Err(in_path(path, e));
        }
        let available = meta.len().saturating_sub(offset);
        let want = len.map_or(available, |len| available.min(len as u64));
        let want = usize::try_from(want).map_err(|_| {
            let e = io::Error::new(io::ErrorKind::OutOfMemory, "file does not fit in memory");
            in_path(path, e)
        })?;
        Ok((src, want))
    }

    /// Replaces the staging buffer with one of at least `span` bytes (plus 1/8 headroom), and
    /// registers that with the ring where registration works.
    fn grow_staging(&mut self, span: usize) {
        let cap = staging_capacity_for(span);
        // The old buffer is unregistered, then freed, before the new one is allocated: never
        // both at once.
        #[cfg(target_os = "linux")]
        if let Some(ring) = &mut self.uring {
            ring.unregister();
        }
        self.staging = AlignedBuf::zeroed(0);
        self.staging = AlignedBuf::zeroed(cap);
        #[cfg(target_os = "linux")]
        if let Some(ring) = &mut self.uring {
            // SAFETY: the staging allocation stays where it is until the next `grow_staging`,
            // which unregisters it first, or until a stuck ring makes `read_into` leak it, or
            // until the reader is dropped, which drops the ring first (field order).
            // `read_file_staged` moving the `AlignedBuf` in and out does not move the allocation.
            let registered = unsafe { ring.register(self.staging.spare_mut()) };
            self.why = ring.describe();
            tracing::debug!(
                bytes = cap,
                registered,
                "adapter file reader: staging buffer grown"
            );
        }
    }

    /// Reads `buf`'s first `span` bytes of capacity (`span` a multiple of 4096, at most the
    /// capacity) from `offset`; returns how many of them hold file data. If the ring gets stuck,
    /// `buf` is replaced by a fresh buffer of the same capacity (the old one leaked) and read
    /// with pread.
    fn read_into(
        &mut self,
        src: &mut Source<'_>,
        buf: &mut AlignedBuf,
        span: usize,
        offset: u64,
    ) -> io::Result<usize> {
        debug_assert!(span <= buf.capacity() && span.is_multiple_of(ALIGN));
        let chunk = self.cfg.chunk_bytes;
        #[cfg(target_os = "linux")]
        if let Some(ring) = &mut self.uring {
            use std::os::fd::AsRawFd;
            let fd = src.file.as_raw_fd();
            let dst = &mut buf.spare_mut()[..span];
            match ring.read(fd, dst, offset, chunk, src.direct, &mut self.stats) {
                Ok(got) => return Ok(got),
                Err(uring::Failure::Io(e)) => return Err(e),
                Err(uring::Failure::Unsupported(e)) => {
                    tracing::warn!(
                        path = %src.path.display(),
                        error = %e,
                        "io_uring read refused; reading this file with pread"
                    );
                }
                Err(uring::Failure::Stuck(e)) => {
                    tracing::warn!(
                        path = %src.path.display(),
                        error = %e,
                        "io_uring stopped answering; leaking the read buffer and using pread from now on"
                    );
                    // The kernel may still write into the old buffer: it must never be freed.
                    let fresh = AlignedBuf::zeroed(buf.capacity());
                    std::mem::forget(std::mem::replace(buf, fresh));
                    self.uring = None;
                    self.why = format!("pread: io_uring failed while reading: {e}");
                }
            }
        }
        pread::read(
            src,
            &mut buf.spare_mut()[..span],
            offset,
            chunk,
            &mut self.stats,
        )
    }
}

/// The staging buffer's capacity for a file of `span` bytes: 1/8 more, so that a run of
/// slightly larger files grows (and re-registers) it once per 1/8 rather than every time, rounded
/// to whole pages, and kept within the 1 GiB a registered buffer may span where `span` is.
fn staging_capacity_for(span: usize) -> usize {
    let cap = round_up(span.saturating_add(span / 8));
    #[cfg(target_os = "linux")]
    let cap = if span <= uring::MAX_FIXED_BYTES {
        cap.min(uring::MAX_FIXED_BYTES)
    } else {
        cap
    };
    cap.max(span)
}

/// Whether `EDGELORA_IO_URING` set to `value` forces pread.
fn env_forces_pread(value: &str) -> bool {
    let value = value.trim();
    ["off", "0", "false"]
        .iter()
        .any(|v| value.eq_ignore_ascii_case(v))
}

#[cfg(target_os = "linux")]
fn setup_uring(depth: u32) -> (Option<uring::Uring>, String) {
    match uring::Uring::new(depth) {
        Ok(ring) => {
            let why = ring.describe();
            (Some(ring), why)
        }
        Err(e) => (None, format!("pread: io_uring setup failed: {e}")),
    }
}

#[cfg(not(target_os = "linux"))]
fn setup_uring(_depth: u32) -> (Option<()>, String) {
    (None, "pread: io_uring is Linux-only".to_owned())
}

/// The yardstick: a plain sequential `O_DIRECT` pread loop, one read of `chunk` bytes (rounded up
/// to a multiple of 4096) in flight. Returns the bytes read. Like [`FileReader`], it reads
/// buffered where the filesystem refuses `O_DIRECT`.
pub fn raw_direct_read(path: &Path, chunk: usize) -> io::Result<u64> {
    let chunk = round_up(chunk.max(1)).min(MAX_CHUNK_BYTES);
    let mut src = Source::open(path, true).map_err(|e| in_path(path, e))?;
    let mut buf = AlignedBuf::zeroed(chunk);
    let mut total = 0u64;
    loop {
        match pread::read_at(&src.file, buf.spare_mut(), total) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                if src.direct && !n.is_multiple_of(ALIGN) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if src.direct && pread::refuses_direct(&e) => {
                src.reopen_buffered(&e).map_err(|e| in_path(path, e))?
            }
            Err(e) => return Err(in_path(path, e)),
        }
    }
    Ok(total)
}

/// An open file and whether it is open with `O_DIRECT`.
struct Source<'a> {
    path: &'a Path,
    file: File,
    direct: bool,
}

impl<'a> Source<'a> {
    fn open(path: &'a Path, direct: bool) -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        if direct {
            use std::os::unix::fs::OpenOptionsExt;
            match File::options()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(file) => {
                    return Ok(Self {
                        path,
                        file,
                        direct: true,
                    });
                }
                Err(e) if pread::refuses_direct(&e) => {
                    tracing::debug!(path = %path.display(), "O_DIRECT refused (tmpfs?); reading buffered");
                }
                Err(e) => return Err(e),
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = direct;
        Ok(Self {
            path,
            file: File::open(path)?,
            direct: false,
        })
    }

    /// The filesystem took `O_DIRECT` at open but refused a read (`why`): read buffered.
    fn reopen_buffered(&mut self, why: &io::Error) -> io::Result<()> {
        tracing::debug!(path = %self.path.display(), error = %why, "O_DIRECT read refused; reading buffered");
        self.file = File::open(self.path)?;
        self.direct = false;
        Ok(())
    }
}

/// `e`, with the path it is about in its message (its kind kept).
fn in_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        PathError {
            path: path.to_owned(),
            source: e,
        },
    )
}

#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", path.display())]
struct PathError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_that_force_pread() {
        for v in ["off", "OFF", "0", "false", "False", " off\n"] {
            assert!(env_forces_pread(v), "{v:?}");
        }
        for v in ["", "on", "1", "true", "uring"] {
            assert!(!env_forces_pread(v), "{v:?}");
        }
    }

    #[test]
    fn kind_display() {
        assert_eq!(StorageKind::IoUring.to_string(), "io_uring");
        assert_eq!(StorageKind::Pread.to_string(), "pread");
    }

    #[test]
    fn reader_is_send_and_buffer_send_sync() {
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<FileReader>();
        send::<AlignedBuf>();
        sync::<AlignedBuf>();
    }

    /// Offset 1 breaks `O_DIRECT` alignment: the ring answers EINVAL, so the file is redone with
    /// pread, which gets EINVAL too and re-opens it buffered. The ring stays for later files.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_read_the_ring_refuses_is_redone_with_pread() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mut reader = FileReader::new(ReaderConfig::default());
        if reader.kind() != StorageKind::IoUring {
            eprintln!(
                "SKIP a_read_the_ring_refuses_is_redone_with_pread: {}",
                reader.why()
            );
            return;
        }
        let mut src = Source::open(&path, true).unwrap();
        let mut buf = AlignedBuf::zeroed(2 * ALIGN);
        let got = reader.read_into(&mut src, &mut buf, 2 * ALIGN, 1).unwrap();
        assert_eq!(got, 2 * ALIGN);
        assert_eq!(&buf[..], &data[1..1 + 2 * ALIGN]);
        assert_eq!(reader.kind(), StorageKind::IoUring);
    }

    #[test]
    fn staging_capacity_has_headroom_and_whole_pages() {
        assert_eq!(staging_capacity_for(ALIGN), 2 * ALIGN);
        assert_eq!(staging_capacity_for(8 * ALIGN), 9 * ALIGN);
        assert_eq!(staging_capacity_for(64 << 20), (64 << 20) + (8 << 20));
        #[cfg(target_os = "linux")]
        {
            assert_eq!(staging_capacity_for(1 << 30), 1 << 30);
            assert_eq!(staging_capacity_for((1 << 30) - ALIGN), 1 << 30);
            assert_eq!(staging_capacity_for((1 << 30) + ALIGN) % ALIGN, 0);
        }
        for span in [
            ALIGN,
            3 * ALIGN,
            1 << 20,
            (1 << 30) + ALIGN,
            usize::MAX & !(ALIGN - 1),
        ] {
            let cap = staging_capacity_for(span);
            assert!(cap >= span && cap.is_multiple_of(ALIGN), "{span}: {cap}");
        }
    }

    /// The staging buffer registered with a ring, then the ring retired (as after a stuck read):
    /// staged reads go on with pread into the same buffer, which keeps growing as needed.
    #[cfg(target_os = "linux")]
    #[test]
    fn staged_reads_go_on_after_the_ring_is_retired() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let mut reader = FileReader::new(ReaderConfig::default());
        if reader.kind() != StorageKind::IoUring {
            eprintln!(
                "SKIP staged_reads_go_on_after_the_ring_is_retired: {}",
                reader.why()
            );
            return;
        }
        let files: Vec<(std::path::PathBuf, Vec<u8>)> = [5000usize, 300_000, 1, 700_001]
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let data: Vec<u8> = (0..size).map(|j| (j * 31 + i * 7) as u8).collect();
                let path = dir.path().join(format!("f{i}"));
                std::fs::write(&path, &data).unwrap();
                (path, data)
            })
            .collect();
        for (path, data) in &files[..2] {
            assert_eq!(reader.read_file_staged(path).unwrap(), &data[..]);
        }
        if reader.registered_buffers() {
            assert!(reader.uring.as_ref().unwrap().has_region());
            assert!(reader.stats().fixed_reads > 0);
        }
        let fixed = reader.stats().fixed_reads;
        let cap = reader.staging_capacity();
        reader.uring = None;
        for (path, data) in &files {
            assert_eq!(reader.read_file_staged(path).unwrap(), &data[..]);
        }
        assert!(
            reader.staging_capacity() > cap,
            "grew for the 700001-byte file"
        );
        assert_eq!(reader.stats().fixed_reads, fixed);
        assert_eq!(reader.stats().files_read, 6);
        assert!(!reader.registered_buffers());
    }

    #[test]
    fn chunk_bytes_rounded_to_pages() {
        for (asked, got) in [(0, 4096), (1, 4096), (4096, 4096), (5000, 8192)] {
            let r = FileReader::new(ReaderConfig {
                chunk_bytes: asked,
                force_pread: true,
                ..ReaderConfig::default()
            });
            assert_eq!(r.config().chunk_bytes, got);
        }
    }
}
