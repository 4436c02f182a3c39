//! The image builder and the daemon agree: the files `edgelora-image` bakes into a root
//! filesystem (update layout, first boot entry, unit command lines) are what `edgelorad`
//! parses, so a box built today can be updated and marked good. Plus the builder's own
//! refusals that need no root or network, and a whole Jetson (aarch64) build from a tiny fake
//! arm64 base: the root filesystem is right for L4T (no ESP, APP/APP_b, nvbootctrl) and the
//! hand-off names NVIDIA's exact files and steps.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use edgelora_daemon::cli::Cli;
use edgelora_daemon::update::layout::{Boot, Layout};
use edgelora_daemon::update::loader::{self, Assessment, Entry, Slot};
use edgelora_image::files;
use edgelora_tests::workspace_bin;

/// `edgelora-fleet init --dir DIR` (the CA and the update signing key).
fn fleet_init(dir: &std::path::Path) {
    let fleet = workspace_bin("edgelora-fleet", "edgelora-fleet");
    let st = Command::new(&fleet)
        .args(["init", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

#[test]
fn the_builders_update_layout_is_what_the_daemon_reads() {
    let cmdline = r#"ro console=ttyS0,115200 quiet "odd\value""#;
    let text = files::update_layout("edgelora-x86_64", cmdline);
    let layout = Layout::parse(&text, Path::new("/etc/edgelora/update.toml")).expect("parses");
    assert_eq!(layout.compatible, "edgelora-x86_64");
    assert_eq!(layout.kernel_cmdline, cmdline, "escaping lost characters");
    assert_eq!(layout.tries, 3);
    assert_eq!(layout.esp, Path::new("/boot/efi"));
    assert_eq!(
        layout.slot_device(Slot::A),
        Path::new("/dev/disk/by-partlabel/edgelora-root-a")
    );
    assert_eq!(
        layout.slot_device(Slot::B),
        Path::new("/dev/disk/by-partlabel/edgelora-root-b")
    );
    assert_eq!(layout.boot, Boot::SystemdBoot);
    // The fstab mounts the ESP where the layout looks for it, and the data partition by the
    // label the GPT gives it.
    let fstab = files::fstab(true);
    assert!(fstab.contains("PARTLABEL=edgelora-esp /boot/efi vfat"));
    assert!(fstab.contains(&format!(
        "PARTLABEL={} {}",
        files::DATA_LABEL,
        files::DATA_DIR
    )));
}

#[test]
fn the_jetson_update_layout_is_what_the_daemon_reads() {
    let text = files::update_layout_jetson("edgelora-aarch64");
    let layout = Layout::parse(&text, Path::new("/etc/edgelora/update.toml")).expect("parses");
    assert_eq!(layout.boot, Boot::Jetson);
    assert_eq!(layout.compatible, "edgelora-aarch64");
    assert_eq!(
        layout.slot_device(Slot::A),
        Path::new("/dev/disk/by-partlabel/APP")
    );
    assert_eq!(
        layout.slot_device(Slot::B),
        Path::new("/dev/disk/by-partlabel/APP_b")
    );
    assert_eq!(layout.jetson.nvbootctrl, Path::new("/usr/sbin/nvbootctrl"));
    assert_eq!(
        layout.jetson.state_file,
        Path::new("/var/lib/edgelora/update-state.json")
    );
    assert!(layout.jetson.set_extlinux_root);
    let fstab = files::fstab(false);
    assert!(!fstab.contains("/boot/efi") && !fstab.contains(files::ESP_LABEL));
    assert!(fstab.contains("PARTLABEL=edgelora-data /var/lib/edgelora ext4"));
}

#[test]
fn the_first_boot_entry_is_slot_a_good_and_chosen() {
    let text = files::boot_entry('a', "1.0.0", 1, "ro rootwait");
    let a = Entry::from_parts("edgelora-a.conf", &text, true).expect("an entry");
    assert_eq!(a.slot(), Some(Slot::A));
    assert_eq!(a.generation(), Some(1));
    assert_eq!(a.image_version(), Some("1.0.0"));
    assert_eq!(a.assessment(), Assessment::Good);
    assert!(text.contains("root=PARTLABEL=edgelora-root-a edgelora.slot=a"));
    // What apply writes for slot B sorts first while on trial, and the builder's entry is the
    // fallback once B is bad.
    let b_text = loader::render_entry(Slot::B, "1.1.0", 2, "ro rootwait");
    let b = Entry::from_parts("edgelora-b+3.conf", &b_text, true).unwrap();
    let trying = [a.clone(), b];
    assert_eq!(loader::choose(&trying).unwrap().slot(), Some(Slot::B));
    let bad = Entry::from_parts("edgelora-b+0-3.conf", &b_text, true).unwrap();
    assert_eq!(loader::choose(&[a, bad]).unwrap().slot(), Some(Slot::A));
}

/// The `ExecStart=` line of a unit, as arguments.
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find(|l| l.starts_with("ExecStart=/"))
        .expect("an ExecStart line");
    line.trim_start_matches("ExecStart=")
        .split_whitespace()
        .map(|s| s.replace("/usr/bin/edgelorad", "edgelorad"))
        .collect()
}

#[test]
fn the_units_command_lines_parse() {
    let serve = files::daemon_unit(" --model /var/lib/edgelora/models/m.gguf");
    Cli::try_parse_from(exec_start(&serve)).expect("edgelorad.service's ExecStart parses");
    assert!(serve.contains("Type=notify") && serve.contains("WatchdogSec="));
    assert!(serve.contains("User=edgelora") && serve.contains("ProtectSystem=strict"));
    let ok = files::boot_ok_unit("http://127.0.0.1:8080/health", 300);
    Cli::try_parse_from(exec_start(&ok)).expect("edgelora-boot-ok.service's ExecStart parses");
    assert!(ok.contains("FailureAction=reboot"));
    let ok = files::boot_ok_unit_jetson("http://127.0.0.1:8080/health", 300);
    Cli::try_parse_from(exec_start(&ok)).expect("the Jetson boot-ok unit's ExecStart parses");
    assert!(ok.contains("FailureAction=reboot") && ok.contains("SuccessExitStatus=3"));
    assert!(!ok.contains("/boot/efi") && !ok.contains("boot-complete"));
}

#[test]
fn build_refuses_bad_inputs_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let bin = workspace_bin("edgelora-image", "edgelora-image");
    let run = |args: &[&str]| {
        let out = Command::new(&bin)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    std::fs::write(dir.path().join("c.toml"), "listen = \"127.0.0.1:8080\"\n").unwrap();
    std::fs::write(dir.path().join("bad.toml"), "listen = [\n").unwrap();
    std::fs::write(dir.path().join("not-elf"), "#!/bin/sh\n").unwrap();
    fleet_init(&dir.path().join("fleet"));
    let pubk = dir.path().join("fleet/update.pub");
    let pubk = pubk.to_str().unwrap();
    let daemon = edgelora_tests::edgelorad();
    let daemon = daemon.to_str().unwrap();
    // Every build below must be refused; `--base debootstrap:bookworm` unless overridden.
    let build = |base: &str, daemon: &str, config: &str, key: Option<&str>, extra: &[&str]| {
        let mut args = vec!["build", "--base", base, "--out", "x.img"];
        args.extend(["--daemon", daemon, "--config", config]);
        args.extend(key.map(|k| ["--update-pub", k]).into_iter().flatten());
        args.extend(extra);
        run(&args)
    };
    let deb = "debootstrap:bookworm";
    let e = build(deb, daemon, "c.toml", None, &[]);
    assert!(e.contains("update key"), "{e}");
    let e = build(deb, "not-elf", "c.toml", Some(pubk), &[]);
    assert!(e.contains("not an ELF"), "{e}");
    let e = build(deb, daemon, "bad.toml", Some(pubk), &[]);
    assert!(e.contains("bad.toml"), "{e}");
    let e = build(deb, daemon, "c.toml", Some("c.toml"), &[]);
    assert!(e.contains("update key"), "{e}");
    let e = build(deb, daemon, "c.toml", Some(pubk), &["--arch", "aarch64"]);
    assert!(e.contains("ELF machine"), "{e}");
    let e = build("bogus", daemon, "c.toml", Some(pubk), &[]);
    assert!(e.contains("debootstrap:<suite>"), "{e}");
    // Nothing was left behind.
    assert!(!dir.path().join("x.img").exists());
    let stray: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".edgelora-image")
        })
        .collect();
    assert!(stray.is_empty(), "work directories left: {stray:?}");
    // A bundle's version must match the root filesystem's.
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc/edgelora")).unwrap();
    std::fs::write(root.join("etc/edgelora/version"), "1.0.0\n").unwrap();
    let key = dir.path().join("fleet/update.key");
    let e = run(&[
        "bundle",
        "--rootfs",
        root.to_str().unwrap(),
        "--version",
        "2.0.0",
        "--key",
        key.to_str().unwrap(),
        "--out",
        "u.bundle",
    ]);
    assert!(e.contains("built as 1.0.0"), "{e}");
    assert!(!dir.path().join("u.bundle").exists());
}

/// Whether this process runs as root (the builder chowns the data partition's tree).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The first 64 bytes of an ELF64 little-endian executable for `machine` (183: aarch64):
/// enough for the builder's architecture check, which is all the hand-off test needs.
fn elf_stub(machine: u16) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little-endian
    h[6] = 1; // ELF version
    h[16] = 2; // ET_EXEC
    h[18..20].copy_from_slice(&machine.to_le_bytes());
    h
}

/// The aarch64 edgelorad for the hand-off test: a real one if this target directory holds one
/// (or, with EDGELORA_IMAGE_CROSS=1, None: the builder cross-compiles it itself), else an ELF
/// header stub, said loudly.
fn aarch64_daemon(dir: &Path) -> Option<PathBuf> {
    if std::env::var_os("EDGELORA_IMAGE_CROSS").is_some_and(|v| v == "1") {
        eprintln!("EDGELORA_IMAGE_CROSS=1: edgelora-image cross-compiles edgelorad itself");
        return None;
    }
    let target = edgelora_tests::edgelorad()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let built = target.join("aarch64-unknown-linux-gnu/release/edgelorad");
    if built.is_file() {
        eprintln!("using the prebuilt {}", built.display());
        return Some(built);
    }
    eprintln!(
        "\n*** NOTE: no prebuilt aarch64 edgelorad at {}; the hand-off is built with an ELF \
         header stub. EDGELORA_IMAGE_CROSS=1 makes edgelora-image cross-compile the real one \
         (several minutes). ***\n",
        built.display()
    );
    let stub = dir.join("edgelorad-aarch64-stub");
    std::fs::write(&stub, elf_stub(183)).unwrap();
    Some(stub)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn jetson_build_makes_an_l4t_root_filesystem_and_the_exact_hand_off() {
    if !is_root() {
        eprintln!("\n*** SKIPPED: the image builder needs root (it chowns the data tree) ***\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A tiny arm64 base standing in for NVIDIA's sample root filesystem (which manages the
    // network with NetworkManager).
    let base = d.join("base");
    for (f, text) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\n"),
        ("etc/fstab", "/dev/root / ext4 defaults 0 1\n"),
        (
            "usr/lib/os-release",
            "NAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\n",
        ),
        ("lib/systemd/system/NetworkManager.service", "[Unit]\n"),
        ("lib/systemd/system/systemd-networkd.service", "[Unit]\n"),
    ] {
        let p = base.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let base_tar = d.join("base.tar");
    let st = Command::new("tar")
        .arg("-cpf")
        .arg(&base_tar)
        .args(["--numeric-owner", "-C"])
        .arg(&base)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    fleet_init(&d.join("fleet"));
    std::fs::write(d.join("c.toml"), "listen = \"0.0.0.0:8081\"\n").unwrap();
    let daemon = aarch64_daemon(d);
    let out = d.join("jetson");
    let bin = workspace_bin("edgelora-image", "edgelora-image");
    let mut cmd = Command::new(&bin);
    cmd.args(["build", "--arch", "aarch64", "--base-tar"])
        .arg(&base_tar)
        .arg("--config")
        .arg(d.join("c.toml"))
        .arg("--update-pub")
        .arg(d.join("fleet/update.pub"))
        .args(["--version", "1.2.3", "--data-mib", "64", "--out"])
        .arg(&out);
    if let Some(p) = &daemon {
        cmd.arg("--daemon").arg(p);
    }
    let res = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "edgelora-image build failed:\n{log}");

    // The hand-off folder.
    for f in [
        "rootfs.tar",
        "edgelora-data.ext4",
        "edgelora-partitions.xml",
        "HANDOFF.md",
    ] {
        assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
    }
    let root = d.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let st = Command::new("tar")
        .arg("-xpf")
        .arg(out.join("rootfs.tar"))
        .args(["--numeric-owner", "-C"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());

    // No ESP anywhere: not mounted, no mount point, no systemd-boot unit wiring.
    let fstab = read(&root.join("etc/fstab"));
    assert!(
        !fstab.contains("/boot/efi") && !fstab.contains(files::ESP_LABEL),
        "{fstab}"
    );
    assert!(
        fstab.contains("PARTLABEL=edgelora-data /var/lib/edgelora ext4"),
        "{fstab}"
    );
    assert!(!root.join("boot/efi").exists());
    assert!(!root.join("usr/lib/repart.d").exists());
    let sys = root.join("etc/systemd/system");
    assert!(!sys.join("boot-complete.target.requires").exists());
    // The update layout: APP/APP_b, nvbootctrl, as the daemon reads it.
    let text = read(&root.join("etc/edgelora/update.toml"));
    let layout = Layout::parse(&text, Path::new("/etc/edgelora/update.toml")).unwrap();
    assert_eq!(layout.boot, Boot::Jetson);
    assert_eq!(layout.compatible, "edgelora-aarch64");
    assert!(text.contains("/dev/disk/by-partlabel/APP\""), "{text}");
    assert!(text.contains("/dev/disk/by-partlabel/APP_b\""), "{text}");
    assert!(!text.contains("edgelora-root-"), "{text}");
    assert_eq!(read(&root.join("etc/edgelora/version")), "1.2.3\n");
    // The units: the daemon, the health gate (enabled), NVIDIA's confirmation held behind it.
    let ok = read(&sys.join("edgelora-boot-ok.service"));
    assert_eq!(
        ok,
        files::boot_ok_unit_jetson("http://127.0.0.1:8081/health", 300)
    );
    Cli::try_parse_from(exec_start(&ok)).expect("the boot-ok unit's ExecStart parses");
    assert!(read(&sys.join("edgelorad.service")).contains("ExecStart=/usr/bin/edgelorad serve"));
    for unit in ["edgelorad.service", "edgelora-boot-ok.service"] {
        let link = sys.join("multi-user.target.wants").join(unit);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("/etc/systemd/system").join(unit)
        );
    }
    let dropin = read(&sys.join(format!(
        "{}.d/50-edgelora-health-gate.conf",
        files::NV_BOOTLOADER_CONFIG_UNIT
    )));
    assert!(dropin.contains("After=edgelora-boot-ok.service"));
    assert!(dropin.contains("Requires=edgelora-boot-ok.service"));
    // NetworkManager is there, so networkd is left alone.
    assert!(
        !sys.join("multi-user.target.wants/systemd-networkd.service")
            .exists()
    );
    assert!(!root.join("etc/systemd/network/20-wired.network").exists());
    assert!(read(&root.join("etc/passwd")).contains("edgelora:x:900:900:"));
    let installed = std::fs::read(root.join("usr/bin/edgelorad")).unwrap();
    assert_eq!(&installed[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([installed[18], installed[19]]), 183);

    // The data partition image: ext4 labelled as fstab mounts it, the size the XML declares.
    let data = std::fs::read(out.join("edgelora-data.ext4")).unwrap();
    assert_eq!(&data[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef], "not ext4");
    assert_eq!(&data[1024 + 0x78..1024 + 0x78 + 13], b"edgelora-data");
    let xml = read(&out.join("edgelora-partitions.xml"));
    assert!(
        xml.contains("<partition name=\"edgelora-data\" type=\"data\">"),
        "{xml}"
    );
    assert!(
        xml.contains("<filename> edgelora-data.ext4 </filename>"),
        "{xml}"
    );
    assert!(
        xml.contains(&format!("<size> {} </size>", data.len())),
        "{xml}"
    );
    assert!(xml.contains("flash_l4t_t234_nvme_rootfs_ab.xml") && xml.contains("APP_b"));
    // HANDOFF.md: the release, the files, the exact commands.
    let h = read(&out.join("HANDOFF.md"));
    for needle in [
        "Jetson Linux r36",
        "sudo tar -xpf rootfs.tar --numeric-owner -C Linux_for_Tegra/rootfs",
        "sudo ./apply_binaries.sh",
        "tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml",
        "sudo ROOTFS_AB=1 ROOTFS_RETRY_COUNT_MAX=3 ./tools/kernel_flash/l4t_initrd_flash.sh",
        "--external-device nvme0n1p1",
        "-c tools/kernel_flash/flash_l4t_t234_nvme_rootfs_ab.xml",
        "-p \"-c bootloader/generic/cfg/flash_t234_qspi.xml\"",
        "jetson-orin-nano-devkit internal",
        "edgelora-data.ext4",
        "nvbootctrl -t rootfs mark-boot-successful",
        "nvbootctrl -t rootfs set-active-boot-slot",
        "Not verified on hardware",
    ] {
        assert!(h.contains(needle), "HANDOFF.md lacks {needle:?}");
    }
    assert!(log.contains("HANDOFF.md"), "{log}");

    // An update bundle is made from the root filesystem after apply_binaries.sh (it boots its
    // kernel from the slot), so it carries the rootfs alone.
    let bundle = |extra: &[&str]| {
        Command::new(&bin)
            .args([
                "bundle",
                "--arch",
                "aarch64",
                "--version",
                "1.2.3",
                "--rootfs",
            ])
            .arg(&root)
            .arg("--key")
            .arg(d.join("fleet/update.key"))
            .arg("--out")
            .arg(d.join("u.bundle"))
            .args(extra)
            .output()
            .unwrap()
    };
    let res = bundle(&[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("apply_binaries.sh"),
        "{err}"
    );
    std::fs::create_dir_all(root.join("boot/extlinux")).unwrap();
    std::fs::write(
        root.join("boot/extlinux/extlinux.conf"),
        "LABEL primary\n  LINUX /boot/Image\n  APPEND ${cbootargs} root=PARTUUID=x rw\n",
    )
    .unwrap();
    let res = bundle(&[]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let v = Command::new(&bin)
        .arg("verify")
        .arg(d.join("u.bundle"))
        .arg("--key")
        .arg(d.join("fleet/update.pub"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(v.status.success());
    let m: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(m["compatible"], "edgelora-aarch64");
    let names: Vec<&str> = m["payloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rootfs"]);
}

#[test]
fn jetson_build_without_a_daemon_names_what_the_cross_compile_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fleet_init(&d.join("fleet"));
    std::fs::write(d.join("c.toml"), "listen = \"127.0.0.1:8080\"\n").unwrap();
    std::fs::write(d.join("base.tar"), b"").unwrap();
    let bin = workspace_bin("edgelora-image", "edgelora-image");
    let build = |extra: &[&str], linker: Option<&str>| {
        let mut cmd = Command::new(&bin);
        cmd.current_dir(d)
            .args(["build", "--arch", "aarch64", "--base-tar", "base.tar"])
            .args(["--config", "c.toml", "--out", "out"])
            .args(extra);
        if !extra.contains(&"--update-pub") {
            cmd.args(["--update-pub", "fleet/update.pub"]);
        }
        if let Some(l) = linker {
            cmd.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", l);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The first thing missing is named: the rustup target where it is not installed (the test
    // command installs it first), else the linker.
    let e = build(&[], Some("/nonexistent/aarch64-linux-gnu-gcc"));
    assert!(
        e.contains("/nonexistent/aarch64-linux-gnu-gcc") && e.contains("gcc-aarch64-linux-gnu")
            || e.contains("rustup target add aarch64-unknown-linux-gnu"),
        "{e}"
    );
    let e = build(&["--source", "/nonexistent-workspace"], None);
    assert!(e.contains("not the edgelora workspace"), "{e}");
    // A bad key is refused before minutes of compiling.
    std::fs::write(d.join("bad.pub"), "not a key\n").unwrap();
    let e = build(&["--update-pub", "bad.pub"], None);
    assert!(e.contains("update key"), "{e}");
    assert!(!d.join("out").exists());
}
