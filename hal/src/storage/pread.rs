//! The fallback engine: the same chunked reads into the same aligned buffer, one `pread` at a
//! time.

use std::fs::File;
use std::io;

use super::buf::ALIGN;
use super::{ReadStats, Source};

/// Reads `dst.len()` bytes of `src` from `offset` into `dst`, `chunk` bytes per read. Returns
/// how many bytes from the start of `dst` hold file data: `dst.len()`, or less where the file
/// ended. A filesystem that takes `O_DIRECT` at open but refuses it per read (EINVAL) gets the
/// file re-opened buffered.
pub(super) fn read(
    src: &mut Source<'_>,
    dst: &mut [u8],
    offset: u64,
    chunk: usize,
    stats: &mut ReadStats,
) -> io::Result<usize> {
    let total = dst.len();
    let mut pos = 0;
    while pos < total {
        let end = (pos + chunk).min(total);
        stats.reads_submitted += 1;
        match read_at(&src.file, &mut dst[pos..end], offset + pos as u64) {
            Ok(0) => break,
            Ok(n) => {
                stats.bytes_read += n as u64;
                pos += n;
                if src.direct && !pos.is_multiple_of(ALIGN) {
                    // O_DIRECT returns an unaligned count only for the file's tail.
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) if src.direct && refuses_direct(&e) => src.reopen_buffered(&e)?,
            Err(e) => return Err(e),
        }
    }
    Ok(pos)
}

/// One positioned read; does not move the file position.
pub(super) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        std::os::windows::fs::FileExt::seek_read(file, buf, offset)
    }
}

/// EINVAL: what a filesystem without `O_DIRECT` support (or with stricter alignment) answers.
pub(super) fn refuses_direct(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidInput
}
