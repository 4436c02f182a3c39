//! The appliance image end to end under QEMU (TCG): `edgelora-image build` from debootstrap
//! with the real daemon and the tiny model, booted with UEFI + systemd-boot; /health and a
//! completion over a forwarded port; hostile update bundles (another fleet's key, unsigned,
//! truncated, bit-flipped, old) refused on the box with slot B untouched; an update whose apply
//! process is killed at a random point of the slot write leaves slot A; a good update boots
//! slot B, is marked good once healthy and keeps the ledger.
//!
//! Needs root, qemu-system-x86, ovmf, debootstrap, e2fsprogs, dosfstools, mtools, fdisk, kmod
//! and the Debian mirror; `scripts/test.sh` installs them and sets EDGELORA_REQUIRE_VM=1. Run
//! by hand with EDGELORA_VM_TEST=1. The slower fault drills (power cut during an update, a
//! daemon that never gets healthy rolling back within three boots) run with
//! EDGELORA_VM_FAULTS=1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use edgelora_tests::vm::{self, Vm, VmConfig};
use edgelora_tests::{edgelorad, free_port, request_on, tiny, workspace_bin};

const API_KEY: &str = "vm-test-key";
const ADMIN: &str = "vm-admin-token";

/// Whether to run; panics when required but impossible.
fn enabled(var: &str) -> bool {
    let required = std::env::var_os("EDGELORA_REQUIRE_VM").is_some();
    let asked = std::env::var_os(var).is_some() || (required && var == "EDGELORA_VM_TEST");
    if !asked {
        eprintln!("\n*** SKIPPED: set {var}=1 to boot the appliance image under QEMU ***\n");
        return false;
    }
    if let Err(why) = vm::prerequisites() {
        assert!(
            !required,
            "EDGELORA_REQUIRE_VM is set but the VM test cannot run: {why}"
        );
        eprintln!("\n*** SKIPPED: {why} ***\n");
        return false;
    }
    true
}

/// One VM at a time: two TCG guests on two cores would only slow each other down.
fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything built once per test process: fleet, image 1.0.0, bundles.
struct Artifacts {
    dir: PathBuf,
    image: PathBuf,
    /// serial → bundle file padded to whole sectors (a virtio disk is whole sectors).
    drives: Vec<(String, PathBuf)>,
    build_secs: f64,
}

fn image_bin() -> PathBuf {
    workspace_bin("edgelora-image", "edgelora-image")
}

fn rootfs(a: &Path, version: &str, model: &str, health_timeout: u64) -> PathBuf {
    let out = a.join(format!("rootfs-{version}.tar"));
    run(Command::new(image_bin())
        .args([
            "rootfs",
            "--base",
            "debootstrap:bookworm",
            "--debug-console",
        ])
        .arg("--daemon")
        .arg(edgelorad())
        .arg("--config")
        .arg(a.join("edgelorad.toml"))
        .arg("--update-pub")
        .arg(a.join("fleet/update.pub"))
        .args(["--version", version, "--model-path", model])
        .args(["--health-timeout", &health_timeout.to_string()])
        .arg("--out")
        .arg(&out));
    out
}

fn bundle(a: &Path, rootfs: &Path, version: &str, key: &Path, name: &str) -> PathBuf {
    let out = a.join(name);
    run(Command::new(image_bin())
        .arg("bundle")
        .arg("--rootfs")
        .arg(rootfs)
        .args(["--version", version])
        .arg("--key")
        .arg(key)
        .arg("--out")
        .arg(&out));
    out
}

/// A correctly signed bundle of `version` with small stand-in payloads: the box must refuse it
/// on its version before reading any payload.
fn small_bundle(a: &Path, version: &str, name: &str) -> PathBuf {
    use edgelora_image::bundle::{Encoding, PayloadSource, load_signing_key, write_bundle};
    let key = load_signing_key(&a.join("fleet/update.key")).unwrap();
    let mut sources = Vec::new();
    for p in ["rootfs", "kernel", "initrd"] {
        let f = a.join(format!("{name}.{p}"));
        std::fs::write(&f, format!("{p} of {version}").repeat(1000)).unwrap();
        sources.push(PayloadSource {
            name: p.into(),
            path: f,
            encoding: Encoding::Raw,
        });
    }
    let out = a.join(name);
    let v = semver::Version::parse(version).unwrap();
    write_bundle(&out, "edgelora-x86_64", &v, &sources, &key, &mut |_, _| {}).unwrap();
    out
}

/// `src` with its header signed by another key (the manifest still names the fleet's key id):
/// what a forger without the fleet's key can make.
fn resigned(src: &Path, key: &Path, out: &Path) -> PathBuf {
    let key = edgelora_image::bundle::load_signing_key(key).unwrap();
    let mut bytes = std::fs::read(src).unwrap();
    let len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let sig = key.sign(&bytes[..20 + len]);
    bytes[20 + len..20 + len + 64].copy_from_slice(&sig);
    std::fs::write(out, &bytes).unwrap();
    out.to_path_buf()
}

/// A drive file of `src` with its signature zeroed (what an unsigned bundle looks like to the
/// box), padded to 512 bytes.
fn unsigned_drive(src: &Path, dst: &Path) -> PathBuf {
    let mut bytes = std::fs::read(src).expect("bundle");
    let len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    bytes[20 + len..20 + len + 64].fill(0);
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    std::fs::write(dst, &bytes).expect("drive file");
    dst.to_path_buf()
}

/// A copy of `src` cut to `len` bytes (or whole), with `flip` XORed in, padded to 512 bytes.
fn drive_file(src: &Path, dst: &Path, len: Option<u64>, flip: Option<u64>) -> PathBuf {
    let mut bytes = std::fs::read(src).expect("bundle");
    if let Some(l) = len {
        bytes.truncate(l as usize);
    }
    if let Some(at) = flip {
        bytes[at as usize] ^= 0x10;
    }
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    std::fs::write(dst, &bytes).expect("drive file");
    dst.to_path_buf()
}

/// Where a test run keeps its image, drives and fleet (3.6 GB), by process id.
const VM_DIR_PREFIX: &str = "/var/tmp/edgelora-vm-";

/// The directories of earlier runs whose process has ended: the artifacts live in a static, which
/// is never dropped, so each run leaves its directory behind, and runs add up (7 of them filled a
/// 40 GB disk). A run removes those of processes that are gone before making its own.
fn remove_finished_runs() {
    let Ok(entries) = std::fs::read_dir("/var/tmp") else {
        return;
    };
    let prefix = Path::new(VM_DIR_PREFIX)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a file name");
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        remove_finished_runs();
        let dir = PathBuf::from(format!("{VM_DIR_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fleet = workspace_bin("edgelora-fleet", "edgelora-fleet");
        run(Command::new(&fleet)
            .arg("init")
            .arg("--dir")
            .arg(dir.join("fleet")));
        run(Command::new(&fleet)
            .arg("init")
            .arg("--dir")
            .arg(dir.join("other")));
        run(Command::new(&fleet)
            .arg("enroll")
            .arg("--dir")
            .arg(dir.join("fleet"))
            .args(["--device", "box-1", "--out"])
            .arg(dir.join("dev1")));
        std::fs::write(
            dir.join("edgelorad.toml"),
            format!(
                "listen = \"0.0.0.0:8080\"\napi_key = \"{API_KEY}\"\nadmin_token = \"{ADMIN}\"\n\
                 base_contributor = \"vm-test\"\n"
            ),
        )
        .unwrap();
        let t0 = Instant::now();
        let image = dir.join("appliance.img");
        let out = Command::new(image_bin())
            .args(["build", "--base", "debootstrap:bookworm", "--debug-console"])
            .arg("--daemon")
            .arg(edgelorad())
            .arg("--config")
            .arg(dir.join("edgelorad.toml"))
            .arg("--bundle")
            .arg(dir.join("dev1"))
            .arg("--model")
            .arg(tiny())
            .args(["--version", "1.0.0", "--health-timeout", "120"])
            .arg("--out")
            .arg(&image)
            .output()
            .expect("edgelora-image build");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "edgelora-image build failed:\n{log}");
        let build_secs = t0.elapsed().as_secs_f64();
        eprintln!("{log}");
        let model = "/var/lib/edgelora/models/tiny-llama";
        let r11 = rootfs(&dir, "1.1.0", model, 120);
        let good = bundle(
            &dir,
            &r11,
            "1.1.0",
            &dir.join("fleet/update.key"),
            "good.bundle",
        );
        let old = small_bundle(&dir, "1.0.0", "old.bundle");
        let other = resigned(
            &good,
            &dir.join("other/update.key"),
            &dir.join("wrongkey.bundle"),
        );
        // The builder's own check: good verifies with the fleet key, the other fleet's does not.
        run(Command::new(image_bin())
            .arg("verify")
            .arg(&good)
            .arg("--key")
            .arg(dir.join("fleet/update.pub")));
        let st = Command::new(image_bin())
            .arg("verify")
            .arg(&other)
            .arg("--key")
            .arg(dir.join("fleet/update.pub"))
            .output()
            .unwrap();
        assert!(!st.status.success(), "a bundle of another fleet verified");
        let len = std::fs::metadata(&good).unwrap().len();
        let d = |n: &str| dir.join(format!("{n}.drive"));
        let drives = vec![
            (
                "good".to_string(),
                drive_file(&good, &d("good"), None, None),
            ),
            ("old".to_string(), drive_file(&old, &d("old"), None, None)),
            (
                "wrongkey".to_string(),
                drive_file(&other, &d("wrongkey"), None, None),
            ),
            (
                "unsigned".to_string(),
                unsigned_drive(&good, &d("unsigned")),
            ),
            (
                "trunc".to_string(),
                drive_file(&good, &d("trunc"), Some(len * 2 / 3 / 512 * 512), None),
            ),
            (
                "flip".to_string(),
                drive_file(&good, &d("flip"), None, Some(len / 2)),
            ),
        ];
        Artifacts {
            dir,
            image,
            drives,
            build_secs,
        }
    })
}

/// A fresh copy of the image, grown to `gib` GiB (first boot grows the data partition).
fn disk_copy(a: &Artifacts, name: &str, gib: u64) -> PathBuf {
    let p = a.dir.join(name);
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&a.image)
        .arg(&p));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(gib << 30)
        .unwrap();
    p
}

fn completion(vm: &Vm) -> serde_json::Value {
    let body =
        br#"{"model": "tiny-llama", "prompt": "The box", "max_tokens": 8, "temperature": 0}"#;
    let auth = format!("Bearer {API_KEY}");
    let (status, resp) = request_on(
        vm.http_port,
        "POST",
        "/v1/completions",
        Some(body),
        &[("Authorization", &auth)],
    )
    .expect("completion request");
    let text = String::from_utf8_lossy(&resp);
    assert_eq!(status, 200, "completion: {text}");
    let v: serde_json::Value = serde_json::from_slice(&resp).expect("completion JSON");
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
    v
}

fn status_json(vm: &mut Vm) -> serde_json::Value {
    let (rc, out) = vm.shell(
        "edgelorad update status --json 2>/dev/null",
        Duration::from_secs(60),
    );
    assert_eq!(rc, 0, "update status: {out}");
    // Pretty-printed over several console lines: from the first '{' to the last '}'.
    let text = out.replace('\r', "");
    let json = match (text.find('{'), text.rfind('}')) {
        (Some(a), Some(b)) if a < b => &text[a..=b],
        _ => panic!("no JSON in {out:?}"),
    };
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

/// The boot-loader entries on the box's ESP.
fn entries(vm: &mut Vm) -> String {
    let (rc, out) = vm.shell("ls /boot/efi/loader/entries", Duration::from_secs(30));
    assert_eq!(rc, 0, "{out}");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn slot_b_untouched(vm: &mut Vm) -> bool {
    // Slot B is all zeros until the first update writes it.
    let (rc, _) = vm.shell(
        "cmp -n 8388608 /dev/disk/by-partlabel/edgelora-root-b /dev/zero",
        Duration::from_secs(60),
    );
    rc == 0
}

fn reboot_and_wait(vm: &mut Vm, timeout: Duration) -> Duration {
    vm.send("systemctl reboot");
    let t = Instant::now();
    while vm.http_status("/health") == Some(200) && t.elapsed() < Duration::from_secs(120) {
        vm.drain();
        std::thread::sleep(Duration::from_millis(300));
    }
    vm.wait_http_ok("/health", timeout);
    t.elapsed()
}

/// The seed of the killed-apply point: `EDGELORA_VM_SEED`, else the clock.
fn kill_seed() -> u64 {
    std::env::var("EDGELORA_VM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Where a seed kills the apply: a tenth of the slot write (0..=8) and extra milliseconds
/// (0..1000), from splitmix64.
fn kill_point(seed: u64) -> (u64, u64) {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % 9, (z >> 32) % 1000)
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn appliance_boots_serves_refuses_hostile_bundles_and_updates() {
    if !enabled("EDGELORA_VM_TEST") {
        return;
    }
    let _one = vm_lock();
    let a = artifacts();
    let vmdir = a.dir.join("vm1");
    std::fs::create_dir_all(&vmdir).unwrap();
    let disk = disk_copy(a, "vm1.img", 5);
    let cfg = VmConfig {
        disk,
        drives: a.drives.clone(),
        http_port: free_port(),
        mem_mib: 1536,
    };
    let mut vm = Vm::start(&cfg, &vmdir);
    let boot_to_ready = vm.wait_http_ok("/health", Duration::from_secs(900));
    let first = completion(&vm);
    vm.wait_shell(Duration::from_secs(120));

    // Where the boot time goes (firmware, loader, kernel, initrd, userspace), same boot.
    let (_, analyze) = vm.shell(
        "systemd-analyze time 2>&1 | head -3",
        Duration::from_secs(60),
    );
    eprintln!("systemd-analyze: {}", analyze.trim());
    let st = status_json(&mut vm);
    assert_eq!(st["current_slot"], "a", "{st}");
    assert_eq!(entries(&mut vm), "edgelora-a.conf");
    assert!(slot_b_untouched(&mut vm));
    let (_, df) = vm.shell(
        "df -B1 --output=size /var/lib/edgelora | tail -1",
        Duration::from_secs(30),
    );
    let data_bytes: u64 = df.trim().parse().unwrap_or(0);
    assert!(
        data_bytes > 1 << 30,
        "the data partition did not grow to the disk: {df:?}"
    );

    // Hostile bundles: each refused, and nothing written.
    for (serial, expect) in [
        ("wrongkey", "signature"),
        ("unsigned", "signature"),
        ("trunc", "truncated"),
        ("flip", "digest"),
        ("old", "already installed"),
    ] {
        let (rc, out) = vm.shell(
            &format!("edgelorad update apply /dev/disk/by-id/virtio-{serial} 2>&1 | tail -3; test ${{PIPESTATUS[0]}} -eq 0"),
            Duration::from_secs(900),
        );
        assert_ne!(rc, 0, "{serial} bundle was accepted: {out}");
        assert!(
            out.to_lowercase().contains(expect),
            "{serial}: expected {expect:?} in {out:?}"
        );
        assert!(
            slot_b_untouched(&mut vm),
            "the {serial} bundle was refused but slot B was written"
        );
    }
    assert_eq!(entries(&mut vm), "edgelora-a.conf");
    assert!(
        slot_b_untouched(&mut vm),
        "a refused bundle wrote to slot B"
    );

    // The apply process killed at a random point while it writes slot B (seeded and printed;
    // EDGELORA_VM_SEED repeats a run): no entry for B, A stays the boot. The write reports each
    // tenth ("writing slot b:  30% (...)"); the kill comes at a random tenth up to 80 %, plus a
    // random part of a second.
    let seed = kill_seed();
    let (tenth, extra_ms) = kill_point(seed);
    eprintln!(
        "killed apply: seed {seed} (EDGELORA_VM_SEED={seed} repeats it): kill at {}% of the \
         slot write + {extra_ms} ms",
        tenth * 10
    );
    let secs = format!("0.{extra_ms:03}");
    let (rc, out) = vm.shell(
        &format!(
            "edgelorad update apply /dev/disk/by-id/virtio-good >/tmp/apply.log 2>&1 & p=$!; \
             for i in $(seq 3000); do grep -Eq 'writing slot b: +{pct}%' /tmp/apply.log && break; \
             sleep 0.2; done; sleep {secs}; kill -9 $p; wait $p; r=$?; \
             tail -c 300 /tmp/apply.log; (exit $r)",
            pct = tenth * 10,
        ),
        Duration::from_secs(900),
    );
    assert_eq!(rc, 137, "apply was not killed mid-write: {out}");
    assert_eq!(
        entries(&mut vm),
        "edgelora-a.conf",
        "a killed apply left a boot entry"
    );
    assert!(
        !slot_b_untouched(&mut vm),
        "the kill came before any write (test did not test)"
    );
    assert_eq!(status_json(&mut vm)["next_boot"]["slot"], "a");

    // The good update, then a reboot into slot B.
    let t = Instant::now();
    let (rc, out) = vm.shell(
        "edgelorad update apply /dev/disk/by-id/virtio-good 2>&1 | tail -4; test ${PIPESTATUS[0]} -eq 0",
        Duration::from_secs(1200),
    );
    let apply_secs = t.elapsed().as_secs_f64();
    assert_eq!(rc, 0, "good update refused: {out}");
    assert!(entries(&mut vm).contains("edgelora-b+3.conf"));
    let reboot = reboot_and_wait(&mut vm, Duration::from_secs(900));
    vm.wait_shell(Duration::from_secs(120));
    let (_, ver) = vm.shell("cat /etc/edgelora/version", Duration::from_secs(30));
    assert!(ver.contains("1.1.0"), "{ver}");
    let (_, cmdline) = vm.shell("cat /proc/cmdline", Duration::from_secs(30));
    assert!(cmdline.contains("edgelora.slot=b"), "{cmdline}");
    // Marked good once /health answered 200.
    let st = wait_for("slot b marked good", Duration::from_secs(300), || {
        let st = status_json(&mut vm);
        (entries(&mut vm) == "edgelora-a.conf edgelora-b.conf").then_some(st)
    });
    assert_eq!(st["current_slot"], "b", "{st}");
    let second = completion(&vm);
    // The ledger lives on the data partition: both answers are in it.
    let auth = format!("Bearer {ADMIN}");
    let (code, body) = request_on(
        vm.http_port,
        "GET",
        "/v1/attribution/counters",
        None,
        &[("Authorization", &auth)],
    )
    .unwrap();
    let counters: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(code, 200, "{counters}");
    let base = counters["data"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["contributor"] == "vm-test" && r["kind"] == "base")
        })
        .unwrap_or_else(|| panic!("no base row: {counters}"));
    assert_eq!(
        base["requests"], 2,
        "one answer before the update, one after: {counters}"
    );
    let (rc, out) = vm.shell(
        "edgelorad ledger verify --data /var/lib/edgelora 2>&1 | tail -2",
        Duration::from_secs(60),
    );
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = vm.shell(
        "edgelorad update apply /dev/disk/by-id/virtio-old 2>&1 | tail -3; test ${PIPESTATUS[0]} -eq 0",
        Duration::from_secs(900),
    );
    assert_ne!(rc, 0, "downgrade accepted: {out}");
    assert!(out.to_lowercase().contains("downgrade"), "{out}");
    vm.kill();

    let image_mib = std::fs::metadata(&a.image).unwrap().len() >> 20;
    let alloc_mib = edgelora_image::build::allocated_bytes(&a.image) >> 20;
    let bundle_mib = std::fs::metadata(a.dir.join("good.bundle")).unwrap().len() >> 20;
    eprintln!(
        "appliance: build {:.0} s; image {image_mib} MiB ({alloc_mib} MiB allocated); bundle \
         {bundle_mib} MiB; boot-to-ready {:.1} s (QEMU TCG, no KVM); apply {apply_secs:.0} s; \
         reboot-to-ready {:.1} s; completions {} / {}",
        a.build_secs,
        boot_to_ready.as_secs_f64(),
        reboot.as_secs_f64(),
        first["choices"][0]["text"],
        second["choices"][0]["text"]
    );
}

#[test]
fn appliance_survives_power_cut_and_rolls_back_a_broken_update() {
    if !enabled("EDGELORA_VM_FAULTS") {
        return;
    }
    let _one = vm_lock();
    let a = artifacts();
    // 1.2.0's daemon never gets healthy (its model is missing); 60 s per try.
    let broken_root = rootfs(&a.dir, "1.2.0", "/var/lib/edgelora/models/missing.gguf", 60);
    let broken = bundle(
        &a.dir,
        &broken_root,
        "1.2.0",
        &a.dir.join("fleet/update.key"),
        "broken.bundle",
    );
    let mut drives = a.drives.clone();
    drives.push((
        "broken".into(),
        drive_file(&broken, &a.dir.join("broken.drive"), None, None),
    ));
    let vmdir = a.dir.join("vm2");
    std::fs::create_dir_all(&vmdir).unwrap();
    let disk = disk_copy(a, "vm2.img", 5);
    let cfg = VmConfig {
        disk,
        drives,
        http_port: free_port(),
        mem_mib: 1536,
    };

    // Power cut while slot B is being written.
    let mut vm = Vm::start(&cfg, &vmdir);
    vm.wait_http_ok("/health", Duration::from_secs(900));
    vm.wait_shell(Duration::from_secs(120));
    vm.send("edgelorad update apply /dev/disk/by-id/virtio-good >/dev/console 2>&1 &");
    vm.wait_for_console("writing slot", Duration::from_secs(900));
    std::thread::sleep(Duration::from_secs(3));
    vm.kill();
    let mut vm = Vm::start(&cfg, &vmdir);
    vm.wait_http_ok("/health", Duration::from_secs(900));
    vm.wait_shell(Duration::from_secs(120));
    let (_, cmdline) = vm.shell("cat /proc/cmdline", Duration::from_secs(30));
    assert!(
        cmdline.contains("edgelora.slot=a"),
        "after the power cut: {cmdline}"
    );
    assert_eq!(entries(&mut vm), "edgelora-a.conf");

    // A broken update: three failed boots, then slot A again.
    let (rc, out) = vm.shell(
        "edgelorad update apply /dev/disk/by-id/virtio-broken 2>&1 | tail -3; test ${PIPESTATUS[0]} -eq 0",
        Duration::from_secs(1200),
    );
    assert_eq!(rc, 0, "{out}");
    let t = Instant::now();
    vm.send("systemctl reboot");
    std::thread::sleep(Duration::from_secs(20));
    // Three failed boots (each: boot, no health within 60 s, reboot), then slot A serves.
    vm.wait_http_ok("/health", Duration::from_secs(1800));
    let rollback_secs = t.elapsed().as_secs_f64();
    vm.wait_shell(Duration::from_secs(120));
    let (_, cmdline) = vm.shell("cat /proc/cmdline", Duration::from_secs(30));
    assert!(cmdline.contains("edgelora.slot=a"), "{cmdline}");
    let e = entries(&mut vm);
    assert!(
        e.contains("edgelora-b+0-3.conf"),
        "slot b should be marked bad: {e}"
    );
    let st = status_json(&mut vm);
    assert_eq!(st["current_slot"], "a", "{st}");
    assert_eq!(st["rolled_back"], true, "{st}");
    let boots = vm.console_tail(1 << 22).matches("edgelora.slot=b").count();
    eprintln!(
        "rollback: {rollback_secs:.0} s from reboot to slot A serving again; slot B tried ({boots} console mentions); status {st}"
    );
    completion(&vm);
    vm.kill();
}

#[test]
fn kill_points_are_seeded_and_inside_the_write() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let (tenth, ms) = kill_point(seed);
        assert!(tenth <= 8 && ms < 1000, "seed {seed}: {tenth} {ms}");
        assert_eq!(kill_point(seed), (tenth, ms), "not reproducible");
        seen.insert(tenth);
    }
    assert_eq!(
        seen.len(),
        9,
        "every tenth up to 80 % is reachable: {seen:?}"
    );
}

#[test]
fn runs_that_ended_leave_no_directory_behind() {
    // A process id above the kernel's limit (4194304) has ended; pid 1 is always alive.
    let gone = PathBuf::from(format!("{VM_DIR_PREFIX}4000000000"));
    let alive = PathBuf::from(format!("{VM_DIR_PREFIX}1"));
    for d in [&gone, &alive] {
        std::fs::create_dir_all(d.join("drives")).unwrap();
        std::fs::write(d.join("drives/a.img"), b"image").unwrap();
    }
    remove_finished_runs();
    let (gone_left, alive_left) = (gone.exists(), alive.exists());
    let _ = std::fs::remove_dir_all(&alive);
    assert!(!gone_left, "the directory of an ended run is removed");
    assert!(alive_left, "a running process's directory is kept");
}
