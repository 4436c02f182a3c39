//! The image builder and the daemon agree: the files `edgelora-image` bakes into a root
//! filesystem (update layout, first boot entry, unit command lines) are what `edgelorad`
//! parses, so a box built today can be updated and marked good. Plus the builder's own
//! refusals that need no root or network.

use std::path::Path;
use std::process::Command;

use clap::Parser;
use edgelora_daemon::cli::Cli;
use edgelora_daemon::update::layout::Layout;
use edgelora_daemon::update::loader::{self, Assessment, Entry, Slot};
use edgelora_image::files;
use edgelora_tests::workspace_bin;

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
    // The fstab mounts the ESP where the layout looks for it, and the data partition by the
    // label the GPT gives it.
    let fstab = files::fstab();
    assert!(fstab.contains("PARTLABEL=edgelora-esp /boot/efi vfat"));
    assert!(fstab.contains(&format!(
        "PARTLABEL={} {}",
        files::DATA_LABEL,
        files::DATA_DIR
    )));
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
    let fleet = workspace_bin("edgelora-fleet", "edgelora-fleet");
    let st = Command::new(&fleet)
        .args(["init", "--dir"])
        .arg(dir.path().join("fleet"))
        .output()
        .unwrap();
    assert!(st.status.success());
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
