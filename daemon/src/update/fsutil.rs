//! The few file operations whose ordering makes updates crash-safe: sync a directory after a
//! rename or removal, replace a file through a synced temporary, read a buffer to the full.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

use anyhow::{Context, Result};

/// Makes renames, creations and removals in `dir` durable. File systems that cannot sync a
/// directory (EINVAL) are accepted: there the rename is as durable as it gets.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).with_context(|| format!("opening {} to sync it", dir.display()))?;
    match f.sync_all() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r.with_context(|| format!("syncing {}", dir.display())),
    }
}

/// Removes `path` if it is there.
pub fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Writes `dest` as a whole or not at all: `write` fills `tmp` (same directory), which is
/// synced, renamed over `dest`, and the directory synced.
pub fn replace_file(
    tmp: &Path,
    dest: &Path,
    write: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    write(&mut f).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    fs::rename(tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    fsync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// Reads until `buf` is full or the reader ends; returns the bytes read (0 only at the end).
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
