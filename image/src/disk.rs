//! Partition images and the GPT disk: an EFI system partition with systemd-boot and one boot
//! entry per slot, two root slots (A holds the image, B is empty until the first update) and the
//! data partition, which grows to the disk on first boot.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::files;
use crate::tools::{self, os, s};

pub const MIB: u64 = 1 << 20;

/// GPT partition type GUIDs (Discoverable Partitions Specification).
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const TYPE_ROOT_ARM64: &str = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE";
const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// Bytes a directory tree takes as ext4 contents (4 KiB blocks, one per directory/symlink).
pub fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            total += if m.is_file() {
                m.len().div_ceil(4096) * 4096
            } else {
                4096
            };
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(total)
}

/// An ext4 image sized for `dir` with room to spare, made by `mke2fs -d` (no mounting).
pub fn ext4_image(
    dir: &Path,
    label: &str,
    out: &Path,
    min_bytes: u64,
    owner: Option<u32>,
) -> Result<u64> {
    let need = tree_bytes(dir)?;
    let bytes = (need + need / 8 + 64 * MIB).max(min_bytes).div_ceil(MIB) * MIB;
    let _ = fs::remove_file(out);
    let size = format!("{}M", bytes / MIB);
    let mut args: Vec<&std::ffi::OsStr> = vec![
        s("-q"),
        s("-F"),
        s("-t"),
        s("ext4"),
        s("-L"),
        s(label),
        s("-d"),
        os(dir),
    ];
    let root_owner = owner.map(|u| format!("root_owner={u}:{u}"));
    if let Some(ro) = &root_owner {
        args.extend([s("-E"), s(ro)]);
    }
    args.extend([os(out), s(&size)]);
    tools::run("mke2fs", &args)?;
    Ok(bytes)
}

/// The ESP: systemd-boot as the removable-media loader, its settings, slot A's kernel, initrd
/// and boot entry. FAT is written with mtools, so nothing is mounted.
pub fn esp_image(
    out: &Path,
    bytes: u64,
    systemd_boot: &Path,
    kernel: &Path,
    initrd: &Path,
    entry: &str,
) -> Result<()> {
    let _ = fs::remove_file(out);
    let kib = (bytes / 1024).to_string();
    tools::run(
        "mkfs.vfat",
        &[
            s("-F"),
            s("32"),
            s("-n"),
            s("EDGELORA"),
            s("-C"),
            os(out),
            s(&kib),
        ],
    )?;
    let img = out.to_string_lossy().into_owned();
    for d in [
        "::/EFI",
        "::/EFI/BOOT",
        "::/loader",
        "::/loader/entries",
        "::/edgelora",
        "::/edgelora/a",
        "::/edgelora/b",
    ] {
        tools::run("mmd", &[s("-i"), s(&img), s(d)])?;
    }
    let tmp = tempfile::tempdir()?;
    let conf = tmp.path().join("loader.conf");
    fs::write(&conf, files::loader_conf())?;
    let ent = tmp.path().join("entry.conf");
    fs::write(&ent, entry)?;
    for (src, dst) in [
        (systemd_boot, "::/EFI/BOOT/BOOTX64.EFI"),
        (conf.as_path(), "::/loader/loader.conf"),
        (kernel, "::/edgelora/a/vmlinuz"),
        (initrd, "::/edgelora/a/initrd.img"),
        (ent.as_path(), "::/loader/entries/edgelora-a.conf"),
    ] {
        tools::run("mcopy", &[s("-i"), s(&img), os(src), s(dst)])?;
    }
    Ok(())
}

/// One partition of the disk.
pub struct Part {
    pub name: String,
    pub type_guid: &'static str,
    pub bytes: u64,
    /// The image written at its start (`None`: left zero).
    pub image: Option<PathBuf>,
}

pub fn root_type(arch: crate::rootfs::Arch) -> &'static str {
    match arch {
        crate::rootfs::Arch::X86_64 => TYPE_ROOT_X86_64,
        crate::rootfs::Arch::Aarch64 => TYPE_ROOT_ARM64,
    }
}

pub fn esp_type() -> &'static str {
    TYPE_ESP
}

pub fn linux_type() -> &'static str {
    TYPE_LINUX
}

/// Creates the GPT disk image: 1 MiB-aligned partitions in order, each image copied in
/// sparsely (zero blocks stay holes), with progress.
pub fn assemble(out: &Path, parts: &[Part]) -> Result<u64> {
    for p in parts {
        if p.bytes % MIB != 0 {
            bail!("partition {}: size {} is not a whole MiB", p.name, p.bytes);
        }
        if let Some(img) = &p.image {
            let len = fs::metadata(img)?.len();
            if len > p.bytes {
                bail!(
                    "partition {}: image {} ({len} B) larger than the partition ({} B)",
                    p.name,
                    img.display(),
                    p.bytes
                );
            }
        }
    }
    // 1 MiB before the first partition, 1 MiB after the last for the backup GPT.
    let total = MIB + parts.iter().map(|p| p.bytes).sum::<u64>() + MIB;
    let tmp = out.with_extension("img.partial");
    let _ = fs::remove_file(&tmp);
    File::create(&tmp)?.set_len(total)?;
    let mut script = String::from("label: gpt\nfirst-lba: 2048\n");
    for p in parts {
        script.push_str(&format!(
            "size={}MiB, type={}, name=\"{}\"\n",
            p.bytes / MIB,
            p.type_guid,
            p.name
        ));
    }
    let sfdisk = tools::find("sfdisk")?;
    let mut child = std::process::Command::new(sfdisk)
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&tmp)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!("sfdisk failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let mut disk = OpenOptions::new().write(true).open(&tmp)?;
    let mut offset = MIB;
    for p in parts {
        if let Some(img) = &p.image {
            copy_sparse(img, &mut disk, offset, &p.name)?;
        }
        offset += p.bytes;
    }
    disk.sync_all()?;
    fs::rename(&tmp, out)?;
    Ok(total)
}

/// Copies `src` into `dst` at `offset`, skipping all-zero blocks (they stay holes).
fn copy_sparse(src: &Path, dst: &mut File, offset: u64, name: &str) -> Result<()> {
    let mut f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; MIB as usize];
    let mut done = 0u64;
    let start = Instant::now();
    let mut last = Instant::now();
    while done < len {
        let n = f.read(&mut buf)?;
        if n == 0 {
            bail!("{}: shorter than it was", src.display());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(offset + done))?;
            dst.write_all(&buf[..n])?;
        }
        done += n as u64;
        if last.elapsed().as_secs() >= 2 || done == len {
            last = Instant::now();
            eprintln!(
                "  [{name} {:>4.0}s] {:>5} / {} MiB",
                start.elapsed().as_secs_f64(),
                done / MIB,
                len / MIB
            );
        }
    }
    Ok(())
}
