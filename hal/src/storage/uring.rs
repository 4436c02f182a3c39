//! The io_uring engine: `queue_depth` reads of `chunk_bytes` each in flight, straight into the
//! destination buffer. One buffer at a time (the reader's staging buffer) can be registered as
//! fixed buffer 0; it stays registered until the reader replaces it, and reads that land inside
//! it use `IORING_OP_READ_FIXED`, all others plain `IORING_OP_READ`.

use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, Probe, opcode, types};

use super::ReadStats;
use super::buf::{ALIGN, AlignedBuf};

/// The kernel refuses to register a single buffer larger than this (`SZ_1G` in io_uring/rsrc.c).
pub(super) const MAX_FIXED_BYTES: usize = 1 << 30;

/// Why a read through the ring did not produce the bytes.
#[derive(Debug)]
pub(super) enum Failure {
    /// The kernel refused the request itself (EINVAL, EOPNOTSUPP): read this file with pread.
    Unsupported(io::Error),
    /// A real I/O error; pread would fail the same way.
    Io(io::Error),
    /// Reads in flight could not be waited for, so the kernel may still write into the
    /// destination: the caller must leak it and retire the ring.
    Stuck(io::Error),
}

/// One ring, reused for every file the reader reads.
pub(super) struct Uring {
    ring: IoUring,
    depth: usize,
    /// `IORING_OP_READ_FIXED` exists and registering a one-page buffer worked at setup.
    fixed_supported: bool,
    /// The memory registered as fixed buffer 0: start address and length.
    region: Option<(usize, usize)>,
    /// Whether the latest registration (or, before any, the setup probe) worked; `Err` holds why
    /// not.
    fixed: Result<(), String>,
}

impl Uring {
    /// Sets up a ring of `depth` entries and probes what it can do. Fails (so the reader falls
    /// back to pread) when io_uring is missing, disabled (`kernel.io_uring_disabled`, seccomp),
    /// `depth` is 0 or too large, or the kernel has no `IORING_OP_READ` (before 5.6).
    pub(super) fn new(depth: u32) -> io::Result<Self> {
        let ring = IoUring::new(depth)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Read::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel has no IORING_OP_READ",
            ));
        }
        let fixed = if probe.is_supported(opcode::ReadFixed::CODE) {
            probe_registration(&ring)
        } else {
            Err("the kernel has no IORING_OP_READ_FIXED".to_owned())
        };
        Ok(Self {
            ring,
            depth: depth as usize,
            fixed_supported: fixed.is_ok(),
            region: None,
            fixed,
        })
    }

    /// Whether the staging buffer is registered: after a registration, whether it worked; before
    /// any, whether registering worked at setup.
    pub(super) fn registered(&self) -> bool {
        self.fixed.is_ok()
    }

    /// Whether a buffer is registered right now.
    #[cfg(test)]
    pub(super) fn has_region(&self) -> bool {
        self.region.is_some()
    }

    /// The reader's `why()` while this ring serves it.
    pub(super) fn describe(&self) -> String {
        let buffers = match &self.fixed {
            Ok(()) => "registered staging buffer".to_owned(),
            Err(why) => format!("plain reads ({why})"),
        };
        format!("io_uring, {} reads in flight, {buffers}", self.depth)
    }

    /// Registers `buf` as fixed buffer 0, in place of any buffer registered before. On failure
    /// (no fixed buffers here, `RLIMIT_MEMLOCK`, over 1 GiB) records why and returns false; reads
    /// into `buf` then use plain `IORING_OP_READ`, which pins the pages per request instead.
    /// Registering pins every page of `buf`, faulting in the ones never touched: it costs about
    /// what writing the whole buffer once does, which is why only a reused buffer is registered.
    ///
    /// # Safety
    /// `buf` must stay allocated, and not be moved or handed to anything but reads through this
    /// ring, until [`unregister`](Self::unregister) is called or the ring is dropped.
    pub(super) unsafe fn register(&mut self, buf: &mut [u8]) -> bool {
        self.unregister();
        if !self.fixed_supported || buf.is_empty() {
            return false;
        }
        if buf.len() > MAX_FIXED_BYTES {
            self.fixed = Err(format!(
                "staging buffer of {} bytes is over the 1 GiB limit",
                buf.len()
            ));
            return false;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `buf` is valid for writes of its length, and the caller keeps it so until
        // `unregister` or the ring's drop.
        match unsafe { self.ring.submitter().register_buffers(&[iov]) } {
            Ok(()) => {
                self.region = Some((buf.as_ptr() as usize, buf.len()));
                self.fixed = Ok(());
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, bytes = buf.len(), "io_uring: registering the staging buffer failed; plain reads");
                self.fixed = Err(format!("registering the staging buffer failed: {e}"));
                false
            }
        }
    }

    /// Unregisters the buffer registered by [`register`](Self::register), if any. Afterwards no
    /// request uses a fixed buffer until the next successful registration.
    pub(super) fn unregister(&mut self) {
        if self.region.take().is_none() {
            return;
        }
        let result = loop {
            match self.ring.submitter().unregister_buffers() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        if let Err(e) = result {
            // Harmless for memory safety: the kernel keeps its own references to the pages, and
            // with `region` cleared no request names buffer 0 again (the next registration fails
            // with EBUSY, so reads stay plain). But the pages stay pinned.
            tracing::warn!(error = %e, "io_uring: unregistering the staging buffer failed");
        }
    }

    /// Whether `dst` lies inside the registered buffer.
    fn in_region(&self, dst: &[u8]) -> bool {
        self.region.is_some_and(|(start, len)| {
            let at = dst.as_ptr() as usize;
            at >= start && at - start <= len && dst.len() <= len - (at - start)
        })
    }

    /// Reads `dst.len()` bytes (a multiple of 4096 when `direct`) of `fd` from `offset` into
    /// `dst`, `chunk` bytes per read: with `IORING_OP_READ_FIXED` where `dst` lies inside the
    /// registered buffer, plain reads elsewhere. Returns how many bytes from the start of `dst`
    /// hold file data: `dst.len()`, or less where the file ended.
    pub(super) fn read(
        &mut self,
        fd: RawFd,
        dst: &mut [u8],
        offset: u64,
        chunk: usize,
        direct: bool,
        stats: &mut ReadStats,
    ) -> Result<usize, Failure> {
        if dst.is_empty() {
            return Ok(0);
        }
        let fixed = self.in_region(dst);
        self.run(fd, dst, offset, chunk, direct, fixed, stats)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        fd: RawFd,
        dst: &mut [u8],
        offset: u64,
        chunk: usize,
        direct: bool,
        fixed: bool,
        stats: &mut ReadStats,
    ) -> Result<usize, Failure> {
        let total = dst.len();
        let base = dst.as_mut_ptr();
        // What each in-flight read still has to fill: `dst[pos..end]`. The slot index is the
        // request's user_data.
        let mut spans: Vec<Option<(usize, usize)>> = vec![None; self.depth];
        let mut free: Vec<usize> = (0..self.depth).rev().collect();
        let mut ready: Vec<usize> = Vec::with_capacity(self.depth);
        let mut next = 0; // start of the first chunk not handed out yet
        let mut eof = total; // lowest position where the file was seen to end
        let mut in_flight = 0usize;
        let mut failure: Option<Failure> = None;

        loop {
            if failure.is_none() {
                while next < eof {
                    let Some(slot) = free.pop() else { break };
                    let end = (next + chunk).min(total);
                    spans[slot] = Some((next, end));
                    ready.push(slot);
                    next = end;
                }
                let mut sq = self.ring.submission();
                for slot in ready.drain(..) {
                    let (pos, end) = spans[slot].expect("a ready slot has a span");
                    // SAFETY: pos < end <= total, so `base + pos` stays inside `dst`.
                    let buf = unsafe { base.add(pos) };
                    let len = u32::try_from(end - pos).expect("chunk_bytes fits u32");
                    let at = offset + pos as u64;
                    let entry = if fixed {
                        opcode::ReadFixed::new(types::Fd(fd), buf, len, 0)
                            .offset(at)
                            .build()
                    } else {
                        opcode::Read::new(types::Fd(fd), buf, len)
                            .offset(at)
                            .build()
                    };
                    // SAFETY: the entry writes `len` bytes at `buf`, inside `dst`, which outlives
                    // the request: this function waits for every request it pushed before
                    // returning, or returns `Stuck` so that the caller leaks `dst`. With `fixed`,
                    // `dst` lies inside registered buffer 0, which `register`'s caller keeps
                    // allocated while it is registered. At most `depth` requests are pushed or in
                    // flight, and the ring has at least `depth` entries, so it is never full.
                    unsafe { sq.push(&entry.user_data(slot as u64)) }
                        .expect("submission queue has room for `depth` entries");
                    in_flight += 1;
                    stats.reads_submitted += 1;
                    stats.fixed_reads += u64::from(fixed);
                }
            } else {
                free.append(&mut ready);
            }
            if in_flight == 0 {
                break;
            }

            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN | libc::EBUSY) => {
                        std::thread::yield_now();
                        continue;
                    }
                    _ => return Err(Failure::Stuck(e)),
                }
            }

            for cqe in self.ring.completion() {
                let slot = cqe.user_data() as usize;
                let (pos, end) = spans[slot]
                    .take()
                    .expect("a completion for a request in flight");
                in_flight -= 1;
                let res = cqe.result();
                if res < 0 {
                    let errno = -res;
                    match errno {
                        libc::EINTR | libc::EAGAIN => {
                            spans[slot] = Some((pos, end));
                            ready.push(slot);
                            continue;
                        }
                        libc::EINVAL | libc::EOPNOTSUPP => {
                            failure.get_or_insert(Failure::Unsupported(
                                io::Error::from_raw_os_error(errno),
                            ));
                        }
                        _ => {
                            failure.get_or_insert(Failure::Io(io::Error::from_raw_os_error(errno)));
                        }
                    }
                } else if res == 0 {
                    eof = eof.min(pos);
                } else {
                    let pos = pos + res as usize;
                    stats.bytes_read += res as u64;
                    if pos < end {
                        if direct && !pos.is_multiple_of(ALIGN) {
                            // O_DIRECT returns an unaligned count only for the file's tail.
                            eof = eof.min(pos);
                        } else {
                            spans[slot] = Some((pos, end));
                            ready.push(slot);
                            continue;
                        }
                    }
                }
                free.push(slot);
            }
        }

        match failure {
            Some(f) => Err(f),
            None => Ok(eof),
        }
    }
}

/// Registers and unregisters a one-page buffer: whether fixed buffers work here at all (they need
/// `RLIMIT_MEMLOCK` room or `CAP_IPC_LOCK`).
fn probe_registration(ring: &IoUring) -> Result<(), String> {
    let mut page = AlignedBuf::zeroed(ALIGN);
    let dst = page.spare_mut();
    let iov = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    // SAFETY: `page` is live until after `unregister_buffers`, and no request uses it.
    unsafe { ring.submitter().register_buffers(&[iov]) }
        .map_err(|e| format!("registering buffers failed: {e}"))?;
    ring.submitter()
        .unregister_buffers()
        .map_err(|e| format!("unregistering buffers failed: {e}"))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn ring(test: &str) -> Option<Uring> {
        match Uring::new(4) {
            Ok(ring) => Some(ring),
            Err(e) => {
                eprintln!("SKIP {test}: io_uring setup failed: {e}");
                None
            }
        }
    }

    #[test]
    fn completion_errors_are_io_errors_and_the_ring_stays_usable() {
        let Some(mut ring) = ring("completion_errors_are_io_errors") else {
            return;
        };
        let mut stats = ReadStats::default();
        let mut buf = AlignedBuf::zeroed(3 * ALIGN);
        // Three reads of one page each, all on a closed fd.
        match ring.read(-1, buf.spare_mut(), 0, ALIGN, false, &mut stats) {
            Err(Failure::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EBADF)),
            other => panic!("expected EBADF, got {other:?}"),
        }
        let dir = std::fs::File::open(env!("CARGO_MANIFEST_DIR")).unwrap();
        match ring.read(
            dir.as_raw_fd(),
            buf.spare_mut(),
            0,
            ALIGN,
            false,
            &mut stats,
        ) {
            Err(Failure::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EISDIR)),
            other => panic!("expected EISDIR, got {other:?}"),
        }
        let this = concat!(env!("CARGO_MANIFEST_DIR"), "/src/storage/uring.rs");
        let file = std::fs::File::open(this).unwrap();
        let got = ring
            .read(
                file.as_raw_fd(),
                buf.spare_mut(),
                0,
                ALIGN,
                false,
                &mut stats,
            )
            .unwrap();
        let want = std::fs::read(this).unwrap();
        let n = want.len().min(buf.capacity());
        assert_eq!(got, n);
        assert_eq!(&buf.spare_mut()[..n], &want[..n]);
    }

    /// Reads inside the registered buffer are fixed reads, reads elsewhere plain ones; replacing
    /// the registration moves which reads are fixed.
    #[test]
    fn reads_inside_the_registered_buffer_are_fixed() {
        let Some(mut ring) = ring("reads_inside_the_registered_buffer_are_fixed") else {
            return;
        };
        let this = concat!(env!("CARGO_MANIFEST_DIR"), "/src/storage/uring.rs");
        let want = std::fs::read(this).unwrap();
        let file = std::fs::File::open(this).unwrap();
        let fd = file.as_raw_fd();
        let mut stats = ReadStats::default();
        let mut staging = AlignedBuf::zeroed(4 * ALIGN);
        let mut other = AlignedBuf::zeroed(4 * ALIGN);
        // SAFETY: both buffers stay allocated until the `unregister` at the end (a failed
        // assertion drops them registered, but with no request in flight and none to come).
        let registered = unsafe { ring.register(staging.spare_mut()) };
        assert_eq!(registered, ring.registered());
        assert_eq!(ring.has_region(), registered);
        if !registered {
            eprintln!(
                "SKIP reads_inside_the_registered_buffer_are_fixed: {}",
                ring.describe()
            );
            return;
        }
        assert!(
            ring.describe().ends_with("registered staging buffer"),
            "{}",
            ring.describe()
        );
        let n = want.len().min(2 * ALIGN);
        // The middle two pages of the registered buffer, two requests.
        let dst = &mut staging.spare_mut()[ALIGN..3 * ALIGN];
        assert_eq!(ring.read(fd, dst, 0, ALIGN, false, &mut stats).unwrap(), n);
        assert_eq!(&dst[..n], &want[..n]);
        assert_eq!((stats.reads_submitted, stats.fixed_reads), (2, 2));
        // Another buffer: plain reads.
        let got = ring
            .read(fd, other.spare_mut(), 0, ALIGN, false, &mut stats)
            .unwrap();
        assert_eq!(&other.spare_mut()[..got], &want[..got]);
        assert_eq!(stats.fixed_reads, 2);
        assert!(stats.reads_submitted >= 3);
        assert!(!ring.in_region(other.spare_mut()));
        assert!(ring.in_region(&staging.spare_mut()[3 * ALIGN..]));
        assert!(ring.in_region(&staging.spare_mut()[4 * ALIGN..]));
        let before = stats;
        // Moving the registration to `other` makes its reads fixed and `staging`'s plain.
        // SAFETY: as above.
        assert!(unsafe { ring.register(other.spare_mut()) });
        let got = ring
            .read(fd, other.spare_mut(), 0, ALIGN, false, &mut stats)
            .unwrap();
        assert_eq!(&other.spare_mut()[..got], &want[..got]);
        assert!(stats.fixed_reads > before.fixed_reads);
        let fixed = stats.fixed_reads;
        let got = ring
            .read(fd, staging.spare_mut(), 0, ALIGN, false, &mut stats)
            .unwrap();
        assert_eq!(&staging.spare_mut()[..got], &want[..got]);
        assert_eq!(stats.fixed_reads, fixed);
        ring.unregister();
        assert!(!ring.has_region());
        let got = ring
            .read(fd, other.spare_mut(), 0, ALIGN, false, &mut stats)
            .unwrap();
        assert_eq!(&other.spare_mut()[..got], &want[..got]);
        assert_eq!(stats.fixed_reads, fixed);
    }

    #[test]
    fn a_misaligned_direct_read_is_refused_as_unsupported() {
        let Some(mut ring) = ring("a_misaligned_direct_read_is_refused") else {
            return;
        };
        let dir = tempfile::tempdir_in("/var/tmp").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 4 * ALIGN]).unwrap();
        let mut src = super::super::Source::open(&path, true).unwrap();
        if !src.direct {
            eprintln!("SKIP a_misaligned_direct_read_is_refused: no O_DIRECT on this filesystem");
            return;
        }
        let mut stats = ReadStats::default();
        let mut buf = AlignedBuf::zeroed(ALIGN);
        let fd = src.file.as_raw_fd();
        match ring.read(fd, buf.spare_mut(), 1, ALIGN, true, &mut stats) {
            Err(Failure::Unsupported(e)) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("expected EINVAL, got {other:?}"),
        }
        src.reopen_buffered(&io::Error::from_raw_os_error(libc::EINVAL))
            .unwrap();
    }
}
