//! `edgelorad update apply`: install a signed bundle into the slot that is not running, and
//! add a boot entry that systemd-boot tries `tries` times before falling back.
//!
//! Every check (signature, compatibility, version, trial state, payload digests, sizes) runs
//! before the first write, so a refused bundle changes nothing. Writes then go in an order that
//! keeps the running slot the only bootable choice until the very last step: the target's
//! old entry goes first, the new entry (a rename of a complete, fsynced file) comes only after
//! the slot's content has been read back and matched the signed digest.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use edgelora_image::bundle::{Bundle, PayloadEntry};
use serde::Serialize;

use super::Progress;
use super::fsutil::{fsync_dir, read_full, remove_if_exists, replace_file};
use super::layout::Layout;
use super::loader::{self, Counter, ENTRIES_DIR, Entry, Slot};

/// Copy and verify in chunks of this size (large, aligned writes suit block devices).
const CHUNK: usize = 1 << 20;
/// The payloads every bundle must carry.
pub const REQUIRED_PAYLOADS: [&str; 3] = ["rootfs", "kernel", "initrd"];

/// What was installed, for the operator and `--json`.
#[derive(Serialize, Debug, Clone)]
pub struct ApplyReport {
    pub version: String,
    pub previous_version: String,
    pub slot: Slot,
    pub fallback_slot: Slot,
    pub device: PathBuf,
    pub entry: String,
    pub generation: u64,
    pub tries: u32,
}

/// Everything `apply` decided before writing anything.
struct Plan {
    bundle: Bundle,
    current: Slot,
    target: Slot,
    running: semver::Version,
    /// The target slot's device, opened for writing (proves it is there and writable before
    /// anything is removed).
    device: File,
    rootfs: PayloadEntry,
    generation: u64,
}

/// Checks `bundle_path` against this box and installs it into the other slot.
pub fn apply(layout: &Layout, bundle_path: &Path, force: bool) -> Result<ApplyReport> {
    if layout.boot != super::layout::Boot::SystemdBoot {
        bail!("{}: not a systemd-boot layout", layout.path.display());
    }
    let mut plan = preflight(layout, bundle_path, force)?;
    install(layout, &mut plan)
}

/// The bundle opened with the fleet's key (signature and manifest checked), for this box
/// (`compatible`) and newer than the running version unless forced; and that version.
pub(super) fn open_bundle(
    layout: &Layout,
    bundle_path: &Path,
    force: bool,
) -> Result<(Bundle, semver::Version)> {
    let key = layout.load_public_key()?;
    let bundle = Bundle::open(bundle_path, &key).context("refusing the bundle")?;
    let m = bundle.manifest();
    if m.compatible != layout.compatible {
        bail!(
            "refusing the bundle: it is for `{}` but this box is `{}` (compatible in {})",
            m.compatible,
            layout.compatible,
            layout.path.display()
        );
    }
    let running = layout.running_version()?;
    check_version(&running, &m.semver(), force)?;
    Ok((bundle, running))
}

/// The target slot's device opened for writing, checked to hold the rootfs, and every payload
/// of the bundle verified against its digest (the last check before any write).
pub(super) fn open_target_verified(
    layout: &Layout,
    bundle: &Bundle,
    rootfs: &PayloadEntry,
    target: Slot,
) -> Result<File> {
    let (device, size) = open_slot(layout.slot_device(target))?;
    if rootfs.raw_size > size {
        bail!(
            "refusing the bundle: its rootfs is {} bytes but slot {target} ({}) holds only {size}",
            rootfs.raw_size,
            layout.slot_device(target).display()
        );
    }
    let mut progress = Progress::new("verifying bundle");
    bundle
        .verify_payloads(&mut |d, t| progress.update(d, t))
        .context("refusing the bundle")?;
    progress.finish();
    Ok(device)
}

/// Steps 1–4: every check, no writes.
fn preflight(layout: &Layout, bundle_path: &Path, force: bool) -> Result<Plan> {
    let current = layout.current_slot()?;
    let target = current.other();
    let (bundle, running) = open_bundle(layout, bundle_path, force)?;
    let entries = loader::scan(&layout.esp)
        .with_context(|| format!("reading boot entries on {}", layout.esp.display()))?;
    check_running_entry(&entries, current, force)?;
    let rootfs = required_payloads(&bundle)?;
    let device = open_target_verified(layout, &bundle, &rootfs, target)?;
    let generation = next_generation(&entries);
    Ok(Plan {
        bundle,
        current,
        target,
        running,
        device,
        rootfs,
        generation,
    })
}

/// Only a newer version installs, unless forced.
pub(super) fn check_version(
    running: &semver::Version,
    new: &semver::Version,
    force: bool,
) -> Result<()> {
    use std::cmp::Ordering;
    match new.cmp_precedence(running) {
        Ordering::Greater => Ok(()),
        _ if force => Ok(()),
        Ordering::Equal => bail!(
            "refusing the bundle: version {new} is already installed (running {running}); \
             --force to reinstall"
        ),
        Ordering::Less => bail!("downgrade from {running} to {new} refused; --force to allow"),
    }
}

/// The running slot must be the proven fallback: marked good, so that a failed new slot rolls
/// back to it rather than to something itself on trial.
fn check_running_entry(entries: &[Entry], current: Slot, force: bool) -> Result<()> {
    let mine: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.slot() == Some(current))
        .collect();
    if force {
        return Ok(());
    }
    if mine.is_empty() {
        bail!(
            "no boot entry for the running slot {current}: a failed update could not fall back to \
             it; --force to install anyway"
        );
    }
    if let Some(e) = mine.iter().find(|e| e.counter.is_some()) {
        bail!(
            "the running slot has not been marked good yet ({} is on trial); run `edgelorad \
             update mark-good` first, or --force",
            e.file_name
        );
    }
    Ok(())
}

/// The rootfs entry, once every required payload is known to be present.
fn required_payloads(bundle: &Bundle) -> Result<PayloadEntry> {
    let m = bundle.manifest();
    for name in REQUIRED_PAYLOADS {
        if m.payload(name).is_none() {
            bail!(
                "refusing the bundle: it has no `{name}` payload (needs {})",
                REQUIRED_PAYLOADS.join(", ")
            );
        }
    }
    Ok(m.payload("rootfs").expect("checked").clone())
}

/// Opens a slot for writing without truncating it, and returns its size: a block device's
/// size is where its end seeks to (its metadata says 0); a regular file's is its length.
pub(super) fn open_slot(path: &Path) -> Result<(File, u64)> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening slot device {} for writing", path.display()))?;
    let size = f
        .seek(SeekFrom::End(0))
        .with_context(|| format!("sizing slot device {}", path.display()))?;
    Ok((f, size))
}

/// One more than the highest generation on the ESP, so the new entry sorts first.
fn next_generation(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .filter(|e| e.slot().is_some())
        .filter_map(Entry::generation)
        .max()
        .unwrap_or(0)
        + 1
}

/// Steps 5–9: the writes.
fn install(layout: &Layout, plan: &mut Plan) -> Result<ApplyReport> {
    let target = plan.target;
    let device_path = layout.slot_device(target);
    remove_entries(&layout.esp, target)?;
    write_rootfs(plan, device_path)?;
    verify_rootfs(device_path, &plan.rootfs)?;
    let slot_dir = layout.esp.join("edgelora").join(target.as_str());
    create_dirs(&layout.esp, &slot_dir)?;
    install_file(
        &plan.bundle,
        "kernel",
        &layout.esp.join(loader::kernel_path(target)),
    )?;
    install_file(
        &plan.bundle,
        "initrd",
        &layout.esp.join(loader::initrd_path(target)),
    )?;
    let version = plan.bundle.manifest().version.clone();
    let entry = write_entry(layout, target, &version, plan.generation)?;
    Ok(ApplyReport {
        version,
        previous_version: plan.running.to_string(),
        slot: target,
        fallback_slot: plan.current,
        device: device_path.to_path_buf(),
        entry,
        generation: plan.generation,
        tries: layout.tries,
    })
}

/// Temporary names used while writing slot `slot`'s files; leftovers of an interrupted apply.
fn temp_names(esp: &Path, slot: Slot) -> [PathBuf; 3] {
    let dir = esp.join("edgelora").join(slot.as_str());
    [
        esp.join(ENTRIES_DIR).join(format!(".edgelora-{slot}.tmp")),
        dir.join(".vmlinuz.tmp"),
        dir.join(".initrd.img.tmp"),
    ]
}

/// Step 5: the target slot stops being bootable (whatever its counter said) before its
/// content changes; leftovers of an interrupted apply go too (the ESP is small).
fn remove_entries(esp: &Path, slot: Slot) -> Result<()> {
    let dir = esp.join(ENTRIES_DIR);
    for e in loader::scan(esp)?.iter().filter(|e| e.slot() == Some(slot)) {
        let p = dir.join(&e.file_name);
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    for p in temp_names(esp, slot) {
        remove_if_exists(&p)?;
    }
    if dir.is_dir() {
        fsync_dir(&dir)?;
    }
    Ok(())
}

/// Step 6: streams the decoded rootfs onto the slot from offset 0 and syncs it.
fn write_rootfs(plan: &mut Plan, device_path: &Path) -> Result<()> {
    write_slot(
        &plan.bundle,
        &plan.rootfs,
        &mut plan.device,
        device_path,
        plan.target,
    )
}

/// Streams the decoded `rootfs` payload onto `dev` (slot `slot`, at `device_path`) from offset 0
/// and syncs it. The reader checks size and digest at its end, so it is read until it says so.
pub(super) fn write_slot(
    bundle: &Bundle,
    rootfs: &PayloadEntry,
    dev: &mut File,
    device_path: &Path,
    slot: Slot,
) -> Result<()> {
    let raw_size = rootfs.raw_size;
    let mut reader = bundle
        .payload_reader("rootfs")
        .context("reading the rootfs payload")?;
    dev.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut progress = Progress::new(&format!("writing slot {slot}"));
    loop {
        let n = read_full(&mut reader, &mut buf).context("reading the rootfs payload")?;
        if n == 0 {
            break;
        }
        if written + n as u64 > raw_size {
            bail!("rootfs payload is longer than its signed size {raw_size}");
        }
        dev.write_all(&buf[..n])
            .with_context(|| format!("writing {}", device_path.display()))?;
        written += n as u64;
        progress.update(written, raw_size);
    }
    progress.finish();
    if written != raw_size {
        bail!("rootfs payload ended after {written} of {raw_size} bytes");
    }
    dev.sync_all()
        .with_context(|| format!("syncing {}", device_path.display()))?;
    drop_cache(dev, raw_size);
    Ok(())
}

/// Asks the kernel to forget the cached pages just written, so the read-back in step 7 reads
/// what reached the device rather than what is still in memory. Advisory; errors are ignored.
fn drop_cache(f: &File, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor this function borrows.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            0,
            len.min(i64::MAX as u64) as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// Step 7: the slot's first `raw_size` bytes must hash to the signed digest.
pub(super) fn verify_rootfs(device_path: &Path, rootfs: &PayloadEntry) -> Result<()> {
    let mut f = File::open(device_path)
        .with_context(|| format!("opening {} to read it back", device_path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = rootfs.raw_size;
    let mut progress = Progress::new("reading back");
    while left > 0 {
        let want = (left as usize).min(CHUNK);
        let n = read_full(&mut f, &mut buf[..want])
            .with_context(|| format!("reading back {}", device_path.display()))?;
        if n == 0 {
            bail!("{} ended while reading it back", device_path.display());
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
        progress.update(rootfs.raw_size - left, rootfs.raw_size);
    }
    progress.finish();
    let got = hasher.finalize().to_hex().to_string();
    if got != rootfs.raw_blake3 {
        bail!(
            "{} does not read back what was written (BLAKE3 {got}, expected {}); the slot stays \
             unbootable",
            device_path.display(),
            rootfs.raw_blake3
        );
    }
    Ok(())
}

/// Creates `dir` (below `esp`) and syncs each parent that gained an entry.
fn create_dirs(esp: &Path, dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() && d != esp {
        missing.push(d.to_path_buf());
        d = d.parent().unwrap_or(esp);
    }
    for m in missing.iter().rev() {
        fs::create_dir(m).with_context(|| format!("creating {}", m.display()))?;
        fsync_dir(m.parent().unwrap_or(esp))?;
    }
    Ok(())
}

/// Step 8: a payload to `dest` through a temporary file, synced and renamed into place.
fn install_file(bundle: &Bundle, name: &str, dest: &Path) -> Result<()> {
    let mut reader = bundle
        .payload_reader(name)
        .with_context(|| format!("reading the {name} payload"))?;
    let file_name = dest.file_name().expect("a file").to_string_lossy();
    let tmp = dest.with_file_name(format!(".{file_name}.tmp"));
    replace_file(&tmp, dest, |f| {
        io::copy(&mut reader, f).with_context(|| format!("copying the {name} payload"))?;
        Ok(())
    })
}

/// Step 9: the new entry, `edgelora-<slot>+<tries>.conf`, appears in one rename.
fn write_entry(layout: &Layout, slot: Slot, version: &str, generation: u64) -> Result<String> {
    let dir = layout.esp.join(ENTRIES_DIR);
    create_dirs(&layout.esp, &dir)?;
    let text = loader::render_entry(slot, version, generation, &layout.kernel_cmdline);
    let name = loader::entry_file_name(
        slot,
        Some(Counter {
            left: layout.tries,
            done: 0,
        }),
    );
    let tmp = &temp_names(&layout.esp, slot)[0];
    replace_file(tmp, &dir.join(&name), |f| {
        f.write_all(text.as_bytes())?;
        Ok(())
    })?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let v = |s: &str| semver::Version::parse(s).unwrap();
        assert!(check_version(&v("1.0.0"), &v("1.1.0"), false).is_ok());
        let e = check_version(&v("1.0.0"), &v("1.0.0"), false).unwrap_err();
        assert!(e.to_string().contains("already installed"), "{e}");
        let e = check_version(&v("1.0.0"), &v("0.9.0"), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "downgrade from 1.0.0 to 0.9.0 refused; --force to allow"
        );
        assert!(check_version(&v("1.0.0"), &v("0.9.0"), true).is_ok());
        // Pre-releases come before their release.
        assert!(check_version(&v("1.1.0-rc.1"), &v("1.1.0"), false).is_ok());
    }

    #[test]
    fn generations_increase() {
        let e = |name: &str, g: u64| {
            Entry::from_parts(name, &loader::render_entry(Slot::A, "1.0.0", g, ""), true).unwrap()
        };
        assert_eq!(next_generation(&[]), 1);
        assert_eq!(
            next_generation(&[e("edgelora-a.conf", 4), e("edgelora-b+0-3.conf", 9)]),
            10
        );
    }
}
