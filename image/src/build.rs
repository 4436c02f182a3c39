//! `edgelora-image build`: root filesystem → slot image, data partition, ESP → GPT disk image
//! (x86_64), or the files NVIDIA's flashing tools take (aarch64 / Jetson).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::disk::{self, MIB, Part};
use crate::files;
use crate::rootfs::{self, Arch, RootfsSpec};
use crate::tools::{self, os, s};

/// What goes on the data partition.
#[derive(Clone, Debug, Default)]
pub struct DataOptions {
    pub model: Option<PathBuf>,
    pub adapters: Option<PathBuf>,
    /// A device bundle from `edgelora-fleet enroll`.
    pub identity: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Sizes {
    pub slot_mib: Option<u64>,
    pub data_mib: u64,
    pub esp_mib: u64,
}

pub struct BuildOptions {
    /// Build the root filesystem from this (else `prebuilt_rootfs`).
    pub spec: Option<RootfsSpec>,
    pub prebuilt_rootfs: Option<PathBuf>,
    pub arch: Arch,
    pub data: DataOptions,
    pub rootfs_out: Option<PathBuf>,
    pub sizes: Sizes,
    pub cmdline: String,
    pub out: PathBuf,
}

/// `edgelorad serve` arguments for what the data partition holds.
pub fn serve_args(data: &DataOptions) -> String {
    match data.model.as_ref().and_then(|m| m.file_name()) {
        Some(name) => format!(
            " --model {}/models/{}",
            files::DATA_DIR,
            name.to_string_lossy()
        ),
        None => String::new(),
    }
}

/// A scratch directory beside `out` (same file system: the final rename is atomic and big
/// images are not copied across disks). Removed when dropped.
pub fn work_dir(out: &Path) -> Result<tempfile::TempDir> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    tempfile::Builder::new()
        .prefix(".edgelora-image-")
        .tempdir_in(parent)
        .with_context(|| format!("making a work directory in {}", parent.display()))
}

/// A root filesystem given as a directory (used in place) or a tarball (unpacked into `work`).
pub fn rootfs_dir(path: &Path, work: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !path.is_file() {
        bail!(
            "{}: no such root filesystem (directory or .tar)",
            path.display()
        );
    }
    let dir = work.join("rootfs");
    fs::create_dir_all(&dir)?;
    tools::run(
        "tar",
        &[
            s("-xpf"),
            os(path),
            s("--numeric-owner"),
            s("--xattrs"),
            s("-C"),
            os(&dir),
        ],
    )?;
    Ok(dir)
}

/// Packs a root filesystem as a tarball, numeric owners and extended attributes kept.
pub fn tar_rootfs(dir: &Path, out: &Path) -> Result<()> {
    let tmp = out.with_extension("tar.partial");
    tools::run(
        "tar",
        &[
            s("-cpf"),
            os(&tmp),
            s("--numeric-owner"),
            s("--xattrs"),
            s("-C"),
            os(dir),
            s("."),
        ],
    )?;
    fs::rename(&tmp, out)?;
    Ok(())
}

/// Copies a file or a directory tree (`cp -a`).
fn copy_into(src: &Path, dst_dir: &Path) -> Result<()> {
    fs::create_dir_all(dst_dir)?;
    tools::run("cp", &[s("-a"), s("-L"), os(src), os(dst_dir)])
}

/// The data partition's tree: models/, adapters/, identity/, owned by the service user.
fn data_tree(data: &DataOptions, dir: &Path) -> Result<()> {
    for sub in ["models", "adapters", "identity"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    if let Some(m) = &data.model {
        if !m.exists() {
            bail!("--model {}: no such file or folder", m.display());
        }
        copy_into(m, &dir.join("models"))?;
    }
    if let Some(a) = &data.adapters {
        if !a.is_dir() {
            bail!("--adapters {}: not a folder", a.display());
        }
        for e in fs::read_dir(a)? {
            copy_into(&e?.path(), &dir.join("adapters"))?;
        }
    }
    if let Some(b) = &data.identity {
        if !b.join("bundle.toml").is_file() {
            bail!(
                "--bundle {}: not a device bundle (no bundle.toml; make one with `edgelora-fleet enroll`)",
                b.display()
            );
        }
        for e in fs::read_dir(b)? {
            copy_into(&e?.path(), &dir.join("identity"))?;
        }
    }
    let uid = files::SERVICE_UID.to_string();
    tools::run("chown", &[s("-R"), s(&format!("{uid}:{uid}")), os(dir)])?;
    tools::run("chmod", &[s("0750"), os(dir), os(&dir.join("identity"))])?;
    Ok(())
}

/// Builds the image; returns a human summary.
pub fn build(o: &BuildOptions) -> Result<String> {
    let work = work_dir(&o.out)?;
    let root = match (&o.spec, &o.prebuilt_rootfs) {
        (Some(spec), _) => {
            let dir = work.path().join("rootfs");
            rootfs::build(spec, &dir)?;
            dir
        }
        (None, Some(p)) => rootfs_dir(p, work.path())?,
        (None, None) => bail!("no root filesystem: give --base/--base-tar or --rootfs"),
    };
    let version = rootfs::version_of(&root)?;
    if let Some(t) = &o.rootfs_out {
        eprintln!(
            "edgelora-image: keeping the root filesystem as {}",
            t.display()
        );
        tar_rootfs(&root, t)?;
    }
    let data_dir = work.path().join("data");
    data_tree(&o.data, &data_dir)?;
    match o.arch {
        Arch::X86_64 => build_x86_64(o, &root, &data_dir, work.path(), &version),
        Arch::Aarch64 => crate::jetson::handoff(o, &root, &data_dir, &version),
    }
}

fn build_x86_64(
    o: &BuildOptions,
    root: &Path,
    data_dir: &Path,
    work: &Path,
    version: &semver::Version,
) -> Result<String> {
    let (kernel, initrd) = rootfs::kernel_and_initrd(root)?;
    let sd_boot = root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if !sd_boot.is_file() {
        bail!(
            "{}: missing; the base system needs the systemd-boot-efi package",
            sd_boot.display()
        );
    }
    eprintln!("edgelora-image: root slot image");
    let root_img = work.join("root.ext4");
    let root_bytes = disk::ext4_image(root, "edgelora-root", &root_img, 0, None)?;
    let slot_bytes = match o.sizes.slot_mib {
        Some(m) => m * MIB,
        None => (2 * root_bytes).max(1024 * MIB).div_ceil(256 * MIB) * 256 * MIB,
    };
    if root_bytes > slot_bytes {
        bail!(
            "the root filesystem needs {} MiB; --slot-mib {} is too small",
            root_bytes / MIB,
            slot_bytes / MIB
        );
    }
    eprintln!("edgelora-image: data partition");
    let data_img = work.join("data.ext4");
    let data_bytes = disk::ext4_image(
        data_dir,
        files::DATA_LABEL,
        &data_img,
        o.sizes.data_mib * MIB,
        Some(files::SERVICE_UID),
    )?;
    eprintln!("edgelora-image: EFI system partition (systemd-boot)");
    let esp_img = work.join("esp.img");
    let esp_bytes = o.sizes.esp_mib * MIB;
    let entry = files::boot_entry('a', &version.to_string(), 1, &o.cmdline);
    disk::esp_image(&esp_img, esp_bytes, &sd_boot, &kernel, &initrd, &entry)?;
    eprintln!("edgelora-image: GPT disk image");
    let parts = [
        Part {
            name: files::ESP_LABEL.into(),
            type_guid: disk::esp_type(),
            bytes: esp_bytes,
            image: Some(esp_img),
        },
        Part {
            name: files::root_label('a'),
            type_guid: disk::root_type(Arch::X86_64),
            bytes: slot_bytes,
            image: Some(root_img),
        },
        Part {
            name: files::root_label('b'),
            type_guid: disk::root_type(Arch::X86_64),
            bytes: slot_bytes,
            image: None,
        },
        Part {
            name: files::DATA_LABEL.into(),
            type_guid: disk::linux_type(),
            bytes: data_bytes,
            image: Some(data_img),
        },
    ];
    let total = disk::assemble(&o.out, &parts)?;
    let allocated = allocated_bytes(&o.out);
    let mut s = String::new();
    writeln!(
        s,
        "{}: edgelora {version} for x86_64 (UEFI, systemd-boot)",
        o.out.display()
    )?;
    writeln!(
        s,
        "  disk {} MiB ({} MiB allocated, sparse)",
        total / MIB,
        allocated / MIB
    )?;
    for p in &parts {
        writeln!(s, "  {:<16} {:>6} MiB", p.name, p.bytes / MIB)?;
    }
    writeln!(
        s,
        "  root filesystem {} MiB; the data partition grows to the disk on first boot",
        root_bytes / MIB
    )?;
    write!(
        s,
        "  flash: dd if={} of=/dev/sdX bs=4M conv=sparse,fsync status=progress",
        o.out.display()
    )?;
    Ok(s)
}

/// Blocks actually allocated (st_blocks × 512).
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}
