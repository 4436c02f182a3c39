//! The appliance's root filesystem: a Debian base (debootstrap, cached, or a tarball the user
//! brings) plus the daemon, its config, units, mounts and the fleet's update key. Everything is
//! done by writing files — never by running the target's binaries — so the same code prepares an
//! arm64 root on an x86-64 host.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::files;
use crate::tools::{self, os, s};

/// Debian packages on top of debootstrap's minbase.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "kmod",
    "e2fsprogs",
    "fdisk",
    "ca-certificates",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
    /// The `compatible` string bundles for this architecture carry.
    pub fn compatible(self) -> &'static str {
        match self {
            Arch::X86_64 => "edgelora-x86_64",
            Arch::Aarch64 => "edgelora-aarch64",
        }
    }
    /// The kernel and boot loader packages; a Jetson's kernel comes from NVIDIA's BSP, not Debian.
    fn kernel_package(self) -> Option<&'static str> {
        match self {
            Arch::X86_64 => Some("linux-image-amd64,systemd-boot-efi"),
            Arch::Aarch64 => None,
        }
    }
}

/// Where the base system comes from.
#[derive(Clone, Debug)]
pub enum Base {
    /// `debootstrap:<suite>` (e.g. bookworm), from the Debian mirror.
    Debootstrap { suite: String, mirror: String },
    /// A root filesystem tarball (e.g. NVIDIA's sample rootfs for Jetson).
    Tar(PathBuf),
}

impl Base {
    pub fn parse(spec: &str, mirror: &str) -> Result<Base> {
        match spec.strip_prefix("debootstrap:") {
            Some(suite)
                if !suite.is_empty() && suite.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                Ok(Base::Debootstrap {
                    suite: suite.to_string(),
                    mirror: mirror.to_string(),
                })
            }
            _ => bail!("--base {spec:?}: expected debootstrap:<suite>, e.g. debootstrap:bookworm"),
        }
    }
}

/// What goes into the root filesystem.
#[derive(Clone, Debug)]
pub struct RootfsSpec {
    pub base: Base,
    pub arch: Arch,
    /// The edgelorad binary for `arch`.
    pub daemon: PathBuf,
    /// edgelorad.toml.
    pub config: PathBuf,
    /// The fleet's update.pub, baked in: the only key updates are accepted from.
    pub update_pub: PathBuf,
    pub version: semver::Version,
    /// Extra `edgelorad serve` arguments (e.g. `--model /var/lib/edgelora/models/x`).
    pub serve_args: String,
    /// Root on the serial console without a password (labs and tests).
    pub debug_console: bool,
    /// Seconds a new boot has to reach /health 200 before it counts as failed.
    pub health_timeout: u64,
    /// The daemon's /health, as seen from the box.
    pub health_url: String,
    /// Extra kernel command line.
    pub cmdline: String,
    /// The builder's cache (debootstrap bases).
    pub cache: PathBuf,
}

/// The default kernel command line: read-only root, console on the screen and the first serial
/// port (the last `console=` is /dev/console).
pub const DEFAULT_CMDLINE: &str = "ro rootwait console=tty0 console=ttyS0,115200";

/// Builds the root filesystem into `out` (created; must not exist).
pub fn build(spec: &RootfsSpec, out: &Path) -> Result<()> {
    if out.exists() {
        bail!("{} already exists", out.display());
    }
    check_inputs(spec)?;
    match &spec.base {
        Base::Debootstrap { suite, mirror } => {
            let base = debootstrap_cached(suite, mirror, spec.arch, &spec.cache)?;
            eprintln!("edgelora-image: copying the base system");
            tools::run("cp", &[s("-a"), s("--reflink=auto"), os(&base), os(out)])?;
        }
        Base::Tar(tar) => {
            fs::create_dir_all(out)?;
            eprintln!("edgelora-image: unpacking {}", tar.display());
            tools::run(
                "tar",
                &[
                    s("-xpf"),
                    os(tar),
                    s("--numeric-owner"),
                    s("--xattrs"),
                    s("-C"),
                    os(out),
                ],
            )?;
        }
    }
    customize(spec, out)
}

fn check_inputs(spec: &RootfsSpec) -> Result<()> {
    for (what, p) in [
        ("--daemon", &spec.daemon),
        ("--config", &spec.config),
        ("the update public key", &spec.update_pub),
    ] {
        if !p.is_file() {
            bail!("{what} {}: not a file", p.display());
        }
    }
    crate::bundle::load_public_key(&spec.update_pub)
        .with_context(|| format!("the update key {}", spec.update_pub.display()))?;
    let text = fs::read_to_string(&spec.config)
        .with_context(|| format!("reading {}", spec.config.display()))?;
    toml::from_str::<toml::Table>(&text)
        .with_context(|| format!("--config {}: not valid TOML", spec.config.display()))?;
    let elf = fs::read(&spec.daemon).map(|b| b.get(..20).map(<[u8]>::to_vec));
    let want_machine: u16 = match spec.arch {
        Arch::X86_64 => 62,
        Arch::Aarch64 => 183,
    };
    match elf {
        Ok(Some(h)) if h.starts_with(b"\x7fELF") => {
            let machine = u16::from_le_bytes([h[18], h[19]]);
            if machine != want_machine {
                bail!(
                    "--daemon {}: built for ELF machine {machine}, not {:?} (cross-compile it: \
                     cargo build --release --target aarch64-unknown-linux-gnu -p edgelora-daemon)",
                    spec.daemon.display(),
                    spec.arch
                );
            }
            Ok(())
        }
        _ => bail!("--daemon {}: not an ELF executable", spec.daemon.display()),
    }
}

/// debootstrap once per (suite, arch, package list), kept in the cache; later builds copy it.
fn debootstrap_cached(suite: &str, mirror: &str, arch: Arch, cache: &Path) -> Result<PathBuf> {
    let mut pkgs: Vec<&str> = PACKAGES.to_vec();
    pkgs.extend(arch.kernel_package());
    let key = blake3::hash(format!("{suite} {} {}", arch.debian(), pkgs.join(",")).as_bytes());
    let dir = cache.join(format!(
        "base-{suite}-{}-{}",
        arch.debian(),
        &key.to_hex()[..12]
    ));
    let root = dir.join("rootfs");
    if dir.join("complete").is_file() {
        eprintln!(
            "edgelora-image: base system from the cache: {}",
            root.display()
        );
        return Ok(root);
    }
    if arch == Arch::Aarch64 {
        bail!(
            "debootstrap for arm64 must run arm64 maintainer scripts, which this host cannot; \
             bring an arm64 root filesystem with --base-tar (e.g. NVIDIA's Jetson sample rootfs, \
             or `debootstrap --arch arm64` run on an arm64 machine)"
        );
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    eprintln!(
        "edgelora-image: debootstrap {suite} ({}) from {mirror} into {} (a minute or two; cached \
         afterwards)",
        arch.debian(),
        root.display()
    );
    let include = format!("--include={}", pkgs.join(","));
    let arch_arg = format!("--arch={}", arch.debian());
    tools::run_with_progress(
        "debootstrap",
        &[
            s("--variant=minbase"),
            s(&arch_arg),
            s(&include),
            s(suite),
            os(&root),
            s(mirror),
        ],
        "debootstrap",
        &|l: &str| {
            l.starts_with("I: Retrieving Release")
                || l.starts_with("I: Extracting base")
                || l.starts_with("I: Installing")
                || l.starts_with("I: Configuring linux-image")
                || l.starts_with("I: Base system installed")
        },
    )?;
    prune(&root)?;
    fs::write(dir.join("complete"), b"")?;
    Ok(root)
}

/// What an appliance does not need: package caches, docs, translations, and kernel modules of
/// subsystems an inference box has no use for (sound, cameras/TV, Wi-Fi, Bluetooth, staging).
fn prune(root: &Path) -> Result<()> {
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
    ] {
        clear_dir(&root.join(dir))?;
    }
    let modules = root.join("usr/lib/modules");
    if let Ok(rd) = fs::read_dir(&modules) {
        for kver in rd.filter_map(|e| e.ok()) {
            let k = kver.path().join("kernel");
            for sub in [
                "sound",
                "drivers/media",
                "drivers/net/wireless",
                "net/wireless",
                "net/mac80211",
                "drivers/bluetooth",
                "net/bluetooth",
                "drivers/staging",
                "drivers/isdn",
                "drivers/infiniband",
            ] {
                let p = k.join(sub);
                if p.is_dir() {
                    fs::remove_dir_all(&p)?;
                }
            }
            let name = kver.file_name();
            tools::run("depmod", &[s("-b"), os(root), os(Path::new(&name))])?;
        }
    }
    Ok(())
}

fn clear_dir(dir: &Path) -> Result<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        if e.file_type()?.is_dir() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Installs the appliance into a base root filesystem. x86_64 gets the systemd-boot layout
/// (ESP mount, `edgelora-root-a/b`, boot counting in entry names, systemd-repart growing the
/// data partition); aarch64 the Jetson one (no ESP, NVIDIA's `APP`/`APP_b`, `nvbootctrl`, and
/// NVIDIA's own boot confirmation held back until the daemon is healthy).
fn customize(spec: &RootfsSpec, root: &Path) -> Result<()> {
    eprintln!("edgelora-image: installing edgelorad {}", spec.version);
    let jetson = spec.arch == Arch::Aarch64;
    let daemon = fs::read(&spec.daemon)?;
    put(root, "usr/bin/edgelorad", &daemon, 0o755)?;
    put(
        root,
        "etc/edgelora/edgelorad.toml",
        &fs::read(&spec.config)?,
        0o644,
    )?;
    put(
        root,
        "etc/edgelora/update.pub",
        &fs::read(&spec.update_pub)?,
        0o644,
    )?;
    put(
        root,
        "etc/edgelora/version",
        format!("{}\n", spec.version).as_bytes(),
        0o644,
    )?;
    let layout = if jetson {
        files::update_layout_jetson(spec.arch.compatible())
    } else {
        files::update_layout(spec.arch.compatible(), &spec.cmdline)
    };
    put(root, "etc/edgelora/update.toml", layout.as_bytes(), 0o644)?;
    put(root, "etc/fstab", files::fstab(!jetson).as_bytes(), 0o644)?;
    put(root, "etc/hostname", b"edgelora\n", 0o644)?;
    if !jetson {
        // The data partition is the disk's last only in the x86_64 image; on Jetson the flash
        // configuration sizes it.
        put(
            root,
            "usr/lib/repart.d/50-edgelora-data.conf",
            files::repart_data().as_bytes(),
            0o644,
        )?;
    }
    put(
        root,
        "etc/systemd/system/edgelorad.service",
        files::daemon_unit(&spec.serve_args).as_bytes(),
        0o644,
    )?;
    let boot_ok = if jetson {
        files::boot_ok_unit_jetson(&spec.health_url, spec.health_timeout)
    } else {
        files::boot_ok_unit(&spec.health_url, spec.health_timeout)
    };
    put(
        root,
        "etc/systemd/system/edgelora-boot-ok.service",
        boot_ok.as_bytes(),
        0o644,
    )?;
    mkdir(root, "var/lib/edgelora")?;
    os_release(root, &spec.version)?;
    add_service_user(root)?;
    let sys = "etc/systemd/system";
    enable(
        root,
        &format!("{sys}/multi-user.target.wants/edgelorad.service"),
        "/etc/systemd/system/edgelorad.service",
    )?;
    enable(
        root,
        &format!("{sys}/multi-user.target.wants/edgelora-boot-ok.service"),
        "/etc/systemd/system/edgelora-boot-ok.service",
    )?;
    if jetson {
        // A drop-in applies wherever apply_binaries.sh puts NVIDIA's unit.
        put(
            root,
            &format!(
                "{sys}/{}.d/50-edgelora-health-gate.conf",
                files::NV_BOOTLOADER_CONFIG_UNIT
            ),
            files::nv_bootloader_config_dropin().as_bytes(),
            0o644,
        )?;
    } else {
        mkdir(root, "boot/efi")?;
        enable(
            root,
            &format!("{sys}/boot-complete.target.requires/edgelora-boot-ok.service"),
            "/etc/systemd/system/edgelora-boot-ok.service",
        )?;
    }
    // NVIDIA's sample root filesystem manages the network with NetworkManager; two DHCP
    // clients on one port would fight, so networkd only where NetworkManager is absent.
    let network_manager = ["lib", "usr/lib"].iter().any(|d| {
        root.join(d)
            .join("systemd/system/NetworkManager.service")
            .exists()
    });
    if !network_manager {
        put(
            root,
            "etc/systemd/network/20-wired.network",
            files::network().as_bytes(),
            0o644,
        )?;
        for (link, unit) in [
            (
                "multi-user.target.wants/systemd-networkd.service",
                "systemd-networkd.service",
            ),
            (
                "sockets.target.wants/systemd-networkd.socket",
                "systemd-networkd.socket",
            ),
            (
                "multi-user.target.wants/systemd-resolved.service",
                "systemd-resolved.service",
            ),
        ] {
            if root.join("lib/systemd/system").join(unit).exists() {
                enable(
                    root,
                    &format!("{sys}/{link}"),
                    &format!("/lib/systemd/system/{unit}"),
                )?;
            }
        }
    }
    if spec.debug_console {
        // Orin's debug UART is ttyTCU0 (L4T r36 extlinux.conf: console=ttyTCU0,115200).
        let tty = if jetson { "ttyTCU0" } else { "ttyS0" };
        put(
            root,
            &format!("etc/systemd/system/serial-getty@{tty}.service.d/autologin.conf"),
            files::autologin_dropin().as_bytes(),
            0o644,
        )?;
        unlock_root(root)?;
    }
    Ok(())
}

/// Joins a path inside the root filesystem, refusing `..` and absolute parts.
fn inside(root: &Path, rel: &str) -> Result<PathBuf> {
    let rel = Path::new(rel);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("{}: not a plain relative path", rel.display());
    }
    // Never write through a symlink of the target's tree: an absolute one points at the host.
    let mut p = root.to_path_buf();
    for c in rel.components() {
        p.push(c);
        if p.symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
            && p != root.join(rel)
        {
            bail!(
                "{}: a parent is a symlink in the image; refusing to follow it",
                p.display()
            );
        }
    }
    Ok(p)
}

/// Writes a file into the root filesystem (replacing a symlink rather than following it).
pub fn put(root: &Path, rel: &str, contents: &[u8], mode: u32) -> Result<()> {
    let p = inside(root, rel)?;
    if let Some(d) = p.parent() {
        fs::create_dir_all(d)?;
    }
    if p.symlink_metadata().is_ok() {
        fs::remove_file(&p).with_context(|| format!("replacing {}", p.display()))?;
    }
    let mut f = fs::File::create(&p).with_context(|| format!("writing {}", p.display()))?;
    f.write_all(contents)?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn mkdir(root: &Path, rel: &str) -> Result<()> {
    fs::create_dir_all(inside(root, rel)?)?;
    Ok(())
}

/// `systemctl enable` without running systemctl: the symlink it would make.
fn enable(root: &Path, link: &str, target: &str) -> Result<()> {
    let p = inside(root, link)?;
    if let Some(d) = p.parent() {
        fs::create_dir_all(d)?;
    }
    if p.symlink_metadata().is_ok() {
        fs::remove_file(&p)?;
    }
    symlink(target, &p).with_context(|| format!("linking {}", p.display()))?;
    Ok(())
}

/// IMAGE_ID / IMAGE_VERSION in os-release, as systemd's image-based systems record them.
fn os_release(root: &Path, version: &semver::Version) -> Result<()> {
    let path = root.join("usr/lib/os-release");
    let old = fs::read_to_string(&path).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|l| !l.starts_with("IMAGE_ID=") && !l.starts_with("IMAGE_VERSION="))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!("IMAGE_ID=edgelora\nIMAGE_VERSION={version}\n"));
    put(root, "usr/lib/os-release", text.as_bytes(), 0o644)
}

/// The `edgelora` system user and group with the fixed uid, written into the account files.
fn add_service_user(root: &Path) -> Result<()> {
    let uid = files::SERVICE_UID;
    let entries = [
        (
            "etc/passwd",
            format!(
                "edgelora:x:{uid}:{uid}:edgelora appliance daemon:{}:/usr/sbin/nologin",
                files::DATA_DIR
            ),
        ),
        ("etc/group", format!("edgelora:x:{uid}:")),
        ("etc/shadow", "edgelora:!:19000::::::".to_string()),
        ("etc/gshadow", "edgelora:!::".to_string()),
    ];
    for (file, line) in entries {
        let p = inside(root, file)?;
        let mut text = fs::read_to_string(&p).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("edgelora:")) {
            continue;
        }
        if let Some(other) = text
            .lines()
            .find(|l| l.split(':').nth(2) == Some(&uid.to_string()) && file != "etc/shadow")
        {
            bail!("{file}: uid/gid {uid} is taken by {other:?}");
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        text.push('\n');
        let mode = fs::metadata(&p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0o644);
        put(root, file, text.as_bytes(), mode & 0o7777)?;
    }
    Ok(())
}

/// An empty root password (debug console only).
fn unlock_root(root: &Path) -> Result<()> {
    let p = inside(root, "etc/shadow")?;
    let text = fs::read_to_string(&p)?;
    let out: String = text
        .lines()
        .map(|l| match l.split_once(':') {
            Some(("root", rest)) => {
                let rest = rest.split_once(':').map(|(_, r)| r).unwrap_or("");
                format!("root::{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    let mode = fs::metadata(&p)?.permissions().mode();
    put(root, "etc/shadow", out.as_bytes(), mode & 0o7777)
}

/// The kernel and initrd a root filesystem boots with: `/vmlinuz` and `/initrd.img` (Debian's
/// symlinks), else the only `boot/vmlinuz-*` and its initrd.
pub fn kernel_and_initrd(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let resolve = |name: &str| -> Option<PathBuf> {
        let link = root.join(name);
        let target = fs::read_link(&link).ok()?;
        let rel = target.strip_prefix("/").unwrap_or(&target).to_path_buf();
        let p = root.join(rel);
        p.is_file().then_some(p)
    };
    if let (Some(k), Some(i)) = (resolve("vmlinuz"), resolve("initrd.img")) {
        return Ok((k, i));
    }
    let boot = root.join("boot");
    let mut kernels: Vec<PathBuf> = fs::read_dir(&boot)
        .with_context(|| format!("{}: no boot directory", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    match kernels.as_slice() {
        [k] => {
            let kver = k
                .file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string();
            let i = boot.join(format!("initrd.img-{kver}"));
            if !i.is_file() {
                bail!("{}: no initrd for kernel {kver}", i.display());
            }
            Ok((k.clone(), i))
        }
        [] => bail!(
            "{}: no kernel (boot/vmlinuz-*) in the root filesystem",
            root.display()
        ),
        _ => bail!(
            "{}: several kernels and no /vmlinuz link to choose one: {kernels:?}",
            root.display()
        ),
    }
}

/// The version a root filesystem was built as (`/etc/edgelora/version`).
pub fn version_of(root: &Path) -> Result<semver::Version> {
    let p = root.join("etc/edgelora/version");
    let text = fs::read_to_string(&p)
        .with_context(|| format!("{}: not an edgelora root filesystem", p.display()))?;
    semver::Version::parse(text.trim()).with_context(|| format!("{}: {text:?}", p.display()))
}
