//! A/B updates end to end on a fake box: two slot files, an ESP directory laid out as the image
//! builder lays it out, a kernel command line file and a version file, driven through the real
//! `edgelorad update` binary. Boots are emulated with the daemon's systemd-boot model
//! (`update::loader`), which applies the counting renames systemd-boot does.
//!
//! - a good bundle lands in slot b with an entry on trial that boots next; three failed boots
//!   roll back to a, while a healthy boot plus `mark-good` makes b the good default;
//! - hostile bundles (unsigned, foreign key, truncated, bit flips, downgrade, wrong box, too
//!   big) are refused with a message naming the problem, and not one byte of the ESP or of
//!   either slot changes;
//! - an apply killed at random moments never leaves an entry pointing at a slot whose content
//!   is not the signed image, and three failed boots always end on slot a.
//!
//! The same on a fake Jetson (`boot = "jetson"`): slot files standing in for APP / APP_b and a
//! fake `nvbootctrl` (a shell script keeping the firmware's slot state in a file and logging
//! every call), with boots emulated as L4T's UEFI counts them (ROOTFS_RETRY_COUNT_MAX = 3):
//! apply writes the inactive slot and only then sets it active; hostile bundles call nothing
//! but `get-current-slot` and write nothing; `mark-good` calls `mark-boot-successful` only after
//! /health answered 200; a killed apply never leaves the firmware pointed at a half-written slot.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgelora_daemon::update::loader::{self, Slot};
use edgelora_image::bundle::{Encoding, Manifest, PayloadSource, write_bundle};
use edgelora_ledger::LedgerKey;
use edgelora_tests::edgelorad;
use serde_json::Value;

const MIB: usize = 1 << 20;
const COMPATIBLE: &str = "edgelora-x86_64";
const KERNEL_CMDLINE: &str = "console=ttyS0 rootwait";

/// splitmix64: reproducible pseudo-random bytes and delays without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A slot's initial content: recognisable, and different for each slot.
/// A delay uniform in [0, 1.15 × `full`): most kills land inside an apply that takes `full`.
fn random_delay(rng: &mut Rng, full: Duration) -> Duration {
    Duration::from_micros(rng.below(full.as_micros() as u64 * 23 / 20))
}

/// Runs `cmd` (output discarded) and SIGKILLs it after `delay` unless it has ended; whether it
/// was killed.
fn killed_after(cmd: &mut Command, delay: Duration) -> bool {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let killed = child.try_wait().unwrap().is_none();
    if killed {
        child.kill().unwrap();
    }
    child.wait().unwrap();
    killed
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i % 251) as u8).collect()
}

/// The entry text of the boot entry convention, spelled out independently of the daemon.
fn expected_entry(slot: &str, version: &str, generation: u64) -> String {
    format!(
        "title edgelora {version} (slot {slot})\nsort-key edgelora\nversion {generation}\n\
         linux /edgelora/{slot}/vmlinuz\ninitrd /edgelora/{slot}/initrd.img\n\
         options root=PARTLABEL=edgelora-root-{slot} edgelora.slot={slot} \
         edgelora.version={version} {KERNEL_CMDLINE}\n"
    )
}

/// The payload files of one image version.
struct Image {
    rootfs: Vec<u8>,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
}

impl Image {
    fn random(rng: &mut Rng, rootfs_len: usize) -> Image {
        Image {
            rootfs: rng.bytes(rootfs_len),
            kernel: rng.bytes(64 * 1024 + 17),
            initrd: rng.bytes(200 * 1024 + 3),
        }
    }
}

/// A box in a temporary directory: `etc/` (layout, key, version, cmdline), `esp/`, the two
/// slot files, and `bundles/` for the bundles under test.
struct FakeBox {
    base: BoxBase,
    esp: PathBuf,
    slot_a: PathBuf,
    slot_b: PathBuf,
    slot_size: usize,
}

impl std::ops::Deref for FakeBox {
    type Target = BoxBase;
    fn deref(&self) -> &BoxBase {
        &self.base
    }
}

impl FakeBox {
    fn new(slot_size: usize) -> FakeBox {
        // Relative paths: the layout resolves them against its own directory.
        let base = BoxBase::new(
            &format!(
                "compatible = \"{COMPATIBLE}\"\npublic_key = \"update.pub\"\n\
                 version_file = \"version\"\nesp = \"../esp\"\ncmdline_file = \"cmdline\"\n\
                 kernel_cmdline = \"{KERNEL_CMDLINE}\"\ntries = 3\n\n[slots]\n\
                 a = \"../slot-a.img\"\nb = \"../slot-b.img\"\n"
            ),
            &[],
        );
        let root = &base.root;
        let b = FakeBox {
            esp: root.join("esp"),
            slot_a: root.join("slot-a.img"),
            slot_b: root.join("slot-b.img"),
            slot_size,
            base,
        };
        fs::write(&b.slot_a, pattern(0xa5, slot_size)).unwrap();
        b.reset();
        b
    }

    /// Back to a freshly flashed box running slot a 1.0.0 (slot a's file is never written by
    /// an update, so it is left alone).
    fn reset(&self) {
        let _ = fs::remove_dir_all(&self.esp);
        let entries = self.esp.join("loader/entries");
        fs::create_dir_all(&entries).unwrap();
        fs::create_dir_all(self.esp.join("edgelora/a")).unwrap();
        fs::write(self.esp.join("loader/loader.conf"), "timeout 0\n").unwrap();
        fs::write(
            entries.join("edgelora-a.conf"),
            expected_entry("a", "1.0.0", 1),
        )
        .unwrap();
        fs::write(self.esp.join("edgelora/a/vmlinuz"), b"kernel of 1.0.0").unwrap();
        fs::write(self.esp.join("edgelora/a/initrd.img"), b"initrd of 1.0.0").unwrap();
        fs::write(&self.slot_b, pattern(0x3c, self.slot_size)).unwrap();
        self.boot_into("a", "1.0.0");
    }

    /// What the kernel command line and the running root's version file say after a boot.
    fn boot_into(&self, slot: &str, version: &str) {
        let etc = self.root.join("etc");
        fs::write(
            etc.join("cmdline"),
            format!(
                "BOOT_IMAGE=/edgelora/{slot}/vmlinuz root=PARTLABEL=edgelora-root-{slot} \
                 edgelora.slot={slot} edgelora.version={version} {KERNEL_CMDLINE}\n"
            ),
        )
        .unwrap();
        fs::write(etc.join("version"), format!("{version}\n")).unwrap();
    }

    fn write_image_files(&self, img: &Image, tag: &str) -> Vec<PayloadSource> {
        let dir = self.root.join("payloads").join(tag);
        fs::create_dir_all(&dir).unwrap();
        let src = |name: &str, bytes: &[u8], encoding| {
            let path = dir.join(name);
            fs::write(&path, bytes).unwrap();
            PayloadSource {
                name: name.to_string(),
                path,
                encoding,
            }
        };
        vec![
            src("rootfs", &img.rootfs, Encoding::Zstd),
            src("kernel", &img.kernel, Encoding::Raw),
            src("initrd", &img.initrd, Encoding::Raw),
        ]
    }

    fn bundle(&self, name: &str, version: &str, img: &Image) -> (PathBuf, Manifest) {
        let sources = self.write_image_files(img, name);
        self.bundle_with(name, COMPATIBLE, version, &sources, &self.key)
    }

    fn entry_names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.esp.join("loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn entry_text(&self, name: &str) -> String {
        fs::read_to_string(self.esp.join("loader/entries").join(name)).unwrap()
    }

    /// The slot the loader model boots next, and the entry file it boots.
    fn next_boot(&self) -> (Slot, String) {
        let e = loader::next_boot(&self.esp)
            .unwrap()
            .expect("a bootable entry");
        (e.slot().expect("an edgelora entry"), e.file_name)
    }

    /// One boot as systemd-boot does it; returns the slot it boots.
    fn boot_attempt(&self) -> Slot {
        let e = loader::simulate_boot_attempt(&self.esp)
            .unwrap()
            .expect("a bootable entry");
        e.slot().expect("an edgelora entry")
    }

    /// BLAKE3 of every file (and the name of every directory) under the ESP and of both slots.
    fn snapshot(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        walk(&self.esp, &self.esp, &mut m);
        for (name, p) in [("slot-a", &self.slot_a), ("slot-b", &self.slot_b)] {
            m.insert(name.into(), hash_file(p));
        }
        m
    }

    /// BLAKE3 of slot b's first `len` bytes.
    fn slot_b_prefix_digest(&self, len: usize) -> String {
        prefix_digest(&self.slot_b, len)
    }
}

/// What both fake boxes share: a temporary root with `etc/update.toml` (the layout),
/// `etc/update.pub` for the fleet key the tests sign with, and `bundles/`.
struct BoxBase {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    layout: PathBuf,
    key: LedgerKey,
}

impl BoxBase {
    /// `update_toml` as the layout; `dirs` made under the root besides `etc/` and `bundles/`.
    fn new(update_toml: &str, dirs: &[&str]) -> BoxBase {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let etc = root.join("etc");
        for d in ["etc", "bundles"].iter().chain(dirs) {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let key = LedgerKey::generate("edgelora-updates").unwrap();
        fs::write(
            etc.join("update.pub"),
            format!("{}\n", key.public_key().to_verifier_string()),
        )
        .unwrap();
        fs::write(etc.join("update.toml"), update_toml).unwrap();
        BoxBase {
            layout: etc.join("update.toml"),
            root,
            _tmp: tmp,
            key,
        }
    }

    /// A bundle of `sources` signed with `key`, at `bundles/<name>`.
    fn bundle_with(
        &self,
        name: &str,
        compatible: &str,
        version: &str,
        sources: &[PayloadSource],
        key: &LedgerKey,
    ) -> (PathBuf, Manifest) {
        let out = self.root.join("bundles").join(name);
        let v = semver::Version::parse(version).unwrap();
        let m = write_bundle(&out, compatible, &v, sources, key, &mut |_, _| {}).unwrap();
        (out, m)
    }

    fn update(&self, args: &[&str]) -> Command {
        let mut c = Command::new(edgelorad());
        c.arg("update")
            .args(args)
            .arg("--layout")
            .arg(&self.layout)
            .env_remove("EDGELORA_UPDATE_LAYOUT");
        c
    }

    fn apply(&self, bundle: &Path, extra: &[&str]) -> Output {
        self.update(&["apply"])
            .arg(bundle)
            .args(extra)
            .output()
            .unwrap()
    }

    fn status(&self) -> Value {
        let out = ok(self.update(&["status", "--json"]).output().unwrap());
        serde_json::from_str(&out).unwrap()
    }
}

/// BLAKE3 of the first `len` bytes of `path`.
fn prefix_digest(path: &Path, len: usize) -> String {
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    blake3::hash(&buf).to_hex().to_string()
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(base).unwrap().display().to_string();
        if e.file_type().unwrap().is_dir() {
            out.insert(format!("esp/{rel}/"), "dir".into());
            walk(base, &p, out);
        } else {
            out.insert(format!("esp/{rel}"), hash_file(&p));
        }
    }
}

fn hash_file(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

/// The stdout of a command that must have succeeded.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts a command failed with exit code 1 and `needle` in its error; returns stderr.
fn refused(out: Output, needle: &str, case: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{case}: expected a refusal, got {}:\n{err}",
        out.status
    );
    assert!(
        err.contains(needle),
        "{case}: expected {needle:?} in the error, got:\n{err}"
    );
    err
}

/// An HTTP server on loopback standing in for the daemon's health endpoint: answers the
/// requests with `codes` in order, then keeps answering the last one until stopped.
struct HealthServer {
    url: String,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<String>>,
}

impl HealthServer {
    fn start(codes: Vec<u16>) -> HealthServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for conn in l.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let code = codes[seen.len().min(codes.len() - 1)];
                seen.push(answer(conn.unwrap(), code));
            }
            seen
        });
        HealthServer {
            url: format!("http://{addr}/health"),
            addr,
            stop,
            handle,
        }
    }

    /// Stops the server; returns the request lines it answered.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = std::net::TcpStream::connect(self.addr);
        self.handle.join().unwrap()
    }
}

/// Reads one request, checks it asks to close the connection, answers `code`; returns the
/// request line.
fn answer(mut s: std::net::TcpStream, code: u16) -> String {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&req).to_string();
    assert!(text.contains("Connection: close"), "{text}");
    let body = if code == 200 { "ok" } else { "starting" };
    let resp = format!(
        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // One write; a client that has what it needs may close first.
    let _ = s.write_all(resp.as_bytes());
    text.lines().next().unwrap_or("").to_string()
}

/// The status JSON's view of one slot: (state, version, tries left, tries done).
fn slot_state(s: &Value, slot: &str) -> (String, Value, Value, Value) {
    let v = &s["slots"][slot];
    (
        v["state"].as_str().unwrap().to_string(),
        v["version"].clone(),
        v["tries_left"].clone(),
        v["tries_done"].clone(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn apply_then_roll_back_or_mark_good() {
    let fb = FakeBox::new(16 * MIB);
    let mut rng = Rng(0x5eed_0001);
    let img = Image::random(&mut rng, 3 * MIB + 12_345);
    let (bundle, _) = fb.bundle("1.1.0.bundle", "1.1.0", &img);
    let slot_a_before = hash_file(&fb.slot_a);

    let out = ok(fb.apply(&bundle, &["--json"]));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["slot"], "b");
    assert_eq!(report["entry"], "edgelora-b+3.conf");
    assert_eq!(report["generation"], 2);

    // Slot b holds the image, the rest of it is untouched, slot a is untouched.
    let b = fs::read(&fb.slot_b).unwrap();
    assert_eq!(b.len(), 16 * MIB, "the slot must not be truncated or grown");
    assert!(b[..img.rootfs.len()] == img.rootfs[..], "slot b != rootfs");
    assert!(b[img.rootfs.len()..] == pattern(0x3c, 16 * MIB)[img.rootfs.len()..]);
    assert_eq!(hash_file(&fb.slot_a), slot_a_before);
    // The ESP: the entry on trial, byte for byte, and the kernel and initrd.
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b+3.conf"]);
    assert_eq!(
        fb.entry_text("edgelora-b+3.conf"),
        expected_entry("b", "1.1.0", 2)
    );
    assert_eq!(
        fs::read(fb.esp.join("edgelora/b/vmlinuz")).unwrap(),
        img.kernel
    );
    assert_eq!(
        fs::read(fb.esp.join("edgelora/b/initrd.img")).unwrap(),
        img.initrd
    );
    assert_eq!(fb.next_boot(), (Slot::B, "edgelora-b+3.conf".into()));
    let s = fb.status();
    assert_eq!(s["current_slot"], "a");
    assert_eq!(s["current_version"], "1.0.0");
    assert_eq!(slot_state(&s, "a").0, "good");
    assert_eq!(
        slot_state(&s, "b"),
        ("trying".into(), "1.1.0".into(), 3.into(), 0.into())
    );
    assert_eq!(s["next_boot"]["slot"], "b");
    assert_eq!(s["rolled_back"], false);
    let after_apply = fb.root.join("esp-after-apply");
    copy_dir(&fb.esp, &after_apply);

    // Three boots that never get marked good, then the loader falls back to slot a.
    for i in 0..3 {
        assert_eq!(fb.boot_attempt(), Slot::B, "boot attempt {i}");
    }
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b+0-3.conf"]);
    assert_eq!(fb.next_boot(), (Slot::A, "edgelora-a.conf".into()));
    assert_eq!(fb.boot_attempt(), Slot::A);
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b+0-3.conf"]);
    let s = fb.status();
    assert_eq!(
        slot_state(&s, "b"),
        ("bad".into(), "1.1.0".into(), 0.into(), 3.into())
    );
    assert_eq!(s["next_boot"]["slot"], "a");
    assert_eq!(s["rolled_back"], true);
    // A fixed image installs over the bad one with a newer generation.
    let img2 = Image::random(&mut rng, 2 * MIB + 1);
    let (bundle2, _) = fb.bundle("1.1.1.bundle", "1.1.1", &img2);
    ok(fb.apply(&bundle2, &[]));
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b+3.conf"]);
    assert_eq!(
        fb.entry_text("edgelora-b+3.conf"),
        expected_entry("b", "1.1.1", 3)
    );
    assert_eq!(fb.next_boot().0, Slot::B);

    // Back to right after the first apply: one boot into b, which comes up healthy.
    fs::remove_dir_all(&fb.esp).unwrap();
    copy_dir(&after_apply, &fb.esp);
    assert_eq!(fb.boot_attempt(), Slot::B);
    fb.boot_into("b", "1.1.0");
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b+2-1.conf"]);
    let s = fb.status();
    assert_eq!(s["current_slot"], "b");
    assert_eq!(
        slot_state(&s, "b"),
        ("trying".into(), "1.1.0".into(), 2.into(), 1.into())
    );
    // No new update while the running slot is still on trial.
    let before = fb.snapshot();
    refused(
        fb.apply(&bundle2, &[]),
        "the running slot has not been marked good yet",
        "update during trial",
    );
    assert_eq!(fb.snapshot(), before, "a refused apply changed the box");
    // The daemon answers 503 first, then 200: mark-good waits for the 200.
    let server = HealthServer::start(vec![503, 200]);
    let url = server.url.clone();
    let out = ok(fb
        .update(&["mark-good", "--health-url", &url, "--timeout", "30"])
        .output()
        .unwrap());
    assert!(out.contains("marked slot b good"), "{out}");
    assert_eq!(server.stop(), ["GET /health HTTP/1.1"; 2]);
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b.conf"]);
    assert_eq!(
        fb.entry_text("edgelora-b.conf"),
        expected_entry("b", "1.1.0", 2)
    );
    assert_eq!(fb.next_boot(), (Slot::B, "edgelora-b.conf".into()));
    // A good entry boots without counting.
    assert_eq!(fb.boot_attempt(), Slot::B);
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b.conf"]);
    let s = fb.status();
    assert_eq!(slot_state(&s, "b").0, "good");
    assert_eq!(slot_state(&s, "a").0, "good");
    assert_eq!(s["next_boot"]["slot"], "b");
    assert_eq!(s["rolled_back"], false);
    // Already good: no health wait (nothing listens on that URL any more).
    let out = ok(fb
        .update(&["mark-good", "--health-url", &url, "--timeout", "1"])
        .output()
        .unwrap());
    assert!(out.contains("already marked good"), "{out}");
    // And now slot b is the fallback: the next update goes to slot a.
    ok(fb.apply(&bundle2, &[]));
    assert_eq!(
        fb.entry_names(),
        ["edgelora-a+3.conf", "edgelora-b.conf"],
        "the update replaces slot a's entry"
    );
    assert_eq!(
        fb.entry_text("edgelora-a+3.conf"),
        expected_entry("a", "1.1.1", 3)
    );
    assert!(fs::read(&fb.slot_a).unwrap()[..img2.rootfs.len()] == img2.rootfs[..]);
    assert_eq!(fb.next_boot().0, Slot::A);
}

#[test]
fn mark_good_gives_up_when_never_healthy() {
    let fb = FakeBox::new(8 * MIB);
    let mut rng = Rng(0x5eed_0002);
    let img = Image::random(&mut rng, MIB);
    let (bundle, _) = fb.bundle("1.1.0.bundle", "1.1.0", &img);
    ok(fb.apply(&bundle, &[]));
    assert_eq!(fb.boot_attempt(), Slot::B);
    fb.boot_into("b", "1.1.0");
    let server = HealthServer::start(vec![503]);
    let t0 = Instant::now();
    let out = fb
        .update(&["mark-good", "--health-url", &server.url, "--timeout", "2"])
        .output()
        .unwrap();
    let took = t0.elapsed();
    refused(out, "was not healthy within 2s", "unhealthy mark-good");
    assert!(took >= Duration::from_secs(2), "gave up after {took:?}");
    let seen = server.stop();
    assert!(seen.len() >= 2, "polled only {seen:?}");
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b+2-1.conf"]);
    let on_trial = fb.root.join("esp-on-trial");
    copy_dir(&fb.esp, &on_trial);
    // The unit's FailureAction reboots; two more failed boots and slot a is back.
    assert_eq!(fb.boot_attempt(), Slot::B);
    assert_eq!(fb.boot_attempt(), Slot::B);
    assert_eq!(fb.next_boot(), (Slot::A, "edgelora-a.conf".into()));
    fb.boot_into("a", "1.0.0");
    let out = ok(fb.update(&["mark-good", "--no-wait"]).output().unwrap());
    assert!(out.contains("already marked good"), "{out}");
    // `--no-wait` marks the slot on trial good without asking (an operator, by hand).
    fs::remove_dir_all(&fb.esp).unwrap();
    copy_dir(&on_trial, &fb.esp);
    fb.boot_into("b", "1.1.0");
    let out = ok(fb.update(&["mark-good", "--no-wait"]).output().unwrap());
    assert!(out.contains("marked slot b good"), "{out}");
    assert_eq!(fb.entry_names(), ["edgelora-a.conf", "edgelora-b.conf"]);
    // A missing slot option is a clear error.
    fs::write(fb.root.join("etc/cmdline"), "root=/dev/sda2 quiet\n").unwrap();
    refused(
        fb.update(&["mark-good", "--no-wait"]).output().unwrap(),
        "no `edgelora.slot=a|b` option",
        "no slot on the command line",
    );
}

/// Flips one bit of a copy of `bytes` at `at`.
fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[at] ^= 0x10;
    v
}

#[test]
fn hostile_bundles_change_nothing() {
    let fb = FakeBox::new(16 * MIB);
    let mut rng = Rng(0x5eed_0003);
    let img = Image::random(&mut rng, 3 * MIB + 777);
    let sources = fb.write_image_files(&img, "good");
    let (good_path, m) = fb.bundle_with("good", COMPATIBLE, "1.1.0", &sources, &fb.key);
    let good = fs::read(&good_path).unwrap();
    let mlen = u32::from_le_bytes(good[16..20].try_into().unwrap()) as usize;
    let data = 20 + mlen + 64;
    let rootfs = m.payload("rootfs").unwrap();
    let kernel = m.payload("kernel").unwrap();
    let r0 = data + rootfs.offset as usize;
    let k0 = data + kernel.offset as usize;

    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    let sig = "signature does not verify";
    let mut unsigned = good.clone();
    unsigned[20 + mlen..data].fill(0);
    cases.push(("unsigned".into(), unsigned, sig));
    let other_key = LedgerKey::generate("edgelora-updates").unwrap();
    let (p, _) = fb.bundle_with("foreign", COMPATIBLE, "1.1.0", &sources, &other_key);
    cases.push(("signed by another key".into(), fs::read(p).unwrap(), sig));
    for cut in [
        0,
        10,
        20 + mlen / 2,
        data - 1,
        data + 100,
        r0 + 5000,
        good.len() - 1,
    ] {
        cases.push((
            format!("truncated at {cut}"),
            good[..cut].to_vec(),
            "truncated",
        ));
    }
    cases.push((
        "bit flip in the magic".into(),
        flipped(&good, 3),
        "bad magic",
    ));
    cases.push((
        "bit flip in the manifest length".into(),
        flipped(&good, 19),
        "manifest length",
    ));
    cases.push((
        "bit flip in the manifest".into(),
        flipped(&good, 20 + mlen / 2),
        sig,
    ));
    cases.push((
        "bit flip in the signature".into(),
        flipped(&good, 20 + mlen + 9),
        sig,
    ));
    let rootfs_end = r0 + rootfs.size as usize - 1;
    for (what, at) in [
        ("start", r0),
        ("middle", r0 + rootfs.size as usize / 2),
        ("end", rootfs_end),
    ] {
        cases.push((
            format!("bit flip at the rootfs payload's {what}"),
            flipped(&good, at),
            "payload rootfs",
        ));
    }
    cases.push((
        "bit flip in the kernel".into(),
        flipped(&good, k0 + kernel.size as usize / 2),
        "payload kernel",
    ));
    let mut appended = good.clone();
    appended.extend_from_slice(b"trailing");
    cases.push(("trailing data".into(), appended, "trailing data"));
    let (p, _) = fb.bundle_with("downgrade", COMPATIBLE, "0.9.0", &sources, &fb.key);
    let downgrade = fs::read(&p).unwrap();
    cases.push((
        "downgrade".into(),
        downgrade.clone(),
        "downgrade from 1.0.0 to 0.9.0 refused; --force to allow",
    ));
    let (p, _) = fb.bundle_with("same", COMPATIBLE, "1.0.0", &sources, &fb.key);
    cases.push((
        "same version".into(),
        fs::read(p).unwrap(),
        "version 1.0.0 is already installed",
    ));
    let (p, _) = fb.bundle_with("arm", "edgelora-aarch64", "1.1.0", &sources, &fb.key);
    cases.push((
        "wrong compatible".into(),
        fs::read(p).unwrap(),
        "it is for `edgelora-aarch64` but this box is `edgelora-x86_64`",
    ));
    let mut big_sources = sources.clone();
    let big = fb.root.join("payloads/big-rootfs");
    fs::write(&big, vec![0u8; 16 * MIB + 1]).unwrap();
    big_sources[0].path = big;
    let (p, _) = fb.bundle_with("big", COMPATIBLE, "1.1.0", &big_sources, &fb.key);
    cases.push((
        "rootfs larger than the slot".into(),
        fs::read(p).unwrap(),
        "holds only 16777216",
    ));
    let (p, _) = fb.bundle_with("no-initrd", COMPATIBLE, "1.1.0", &sources[..2], &fb.key);
    cases.push((
        "no initrd".into(),
        fs::read(p).unwrap(),
        "has no `initrd` payload",
    ));

    let before = fb.snapshot();
    let case_path = fb.root.join("bundles/case.bundle");
    for (what, bytes, needle) in &cases {
        fs::write(&case_path, bytes).unwrap();
        refused(fb.apply(&case_path, &[]), needle, what);
        assert_eq!(
            fb.snapshot(),
            before,
            "{what}: the refused bundle changed the box"
        );
    }
    // The box still works: the intact bundle installs.
    ok(fb.apply(&good_path, &[]));
    assert_eq!(fb.next_boot(), (Slot::B, "edgelora-b+3.conf".into()));

    // --force lets an operator downgrade on purpose.
    fb.reset();
    fs::write(&case_path, &downgrade).unwrap();
    ok(fb.apply(&case_path, &["--force"]));
    assert_eq!(
        fb.entry_text("edgelora-b+3.conf"),
        expected_entry("b", "0.9.0", 2)
    );
    assert_eq!(fb.slot_b_prefix_digest(img.rootfs.len()), rootfs.raw_blake3);
}

#[test]
fn killed_apply_never_leaves_a_broken_boot() {
    const TRIALS: usize = 12;
    let fb = FakeBox::new(72 * MIB);
    let mut rng = Rng(0x5eed_0004);
    let img = Image::random(&mut rng, 64 * MIB + 4321);
    let (bundle, m) = fb.bundle("1.1.0.bundle", "1.1.0", &img);
    let want = m.payload("rootfs").unwrap().raw_blake3.clone();
    let slot_a = hash_file(&fb.slot_a);
    let b_untouched = fb.slot_b_prefix_digest(img.rootfs.len());
    edgelorad();

    // Uninterrupted applies set the time scale (the median of three: the other tests run
    // alongside and make single timings noisy).
    let mut times = Vec::new();
    for _ in 0..3 {
        fb.reset();
        let t0 = Instant::now();
        ok(fb.apply(&bundle, &[]));
        times.push(t0.elapsed());
        assert_eq!(fb.slot_b_prefix_digest(img.rootfs.len()), want);
    }
    times.sort();
    let full = times[1];
    eprintln!("uninterrupted apply: {times:?}");

    let mut outcomes = BTreeMap::<&str, usize>::new();
    for trial in 0..TRIALS {
        fb.reset();
        let delay = random_delay(&mut rng, full);
        let killed = killed_after(fb.update(&["apply"]).arg(&bundle), delay);

        let b_now = fb.slot_b_prefix_digest(img.rootfs.len());
        if b_now != want && b_now != b_untouched {
            *outcomes.entry("slot b half written").or_default() += 1;
        }
        let names = fb.entry_names();
        let b_entries: Vec<&String> = names
            .iter()
            .filter(|n| loader::parse_file_name(n).is_some_and(|e| e.id == "edgelora-b"))
            .collect();
        let (slot, entry) = fb.next_boot();
        let ctx = format!("trial {trial} (killed after {delay:?}: {killed}), entries {names:?}");
        match slot {
            Slot::A => {
                assert_eq!(entry, "edgelora-a.conf", "{ctx}");
                assert!(b_entries.is_empty(), "{ctx}: a b entry that does not boot");
                *outcomes.entry("old slot").or_default() += 1;
            }
            Slot::B => {
                assert_eq!(entry, "edgelora-b+3.conf", "{ctx}");
                assert_eq!(
                    fb.slot_b_prefix_digest(img.rootfs.len()),
                    want,
                    "{ctx}: slot b boots but does not hold the image"
                );
                assert_eq!(
                    fb.entry_text(&entry),
                    expected_entry("b", "1.1.0", 2),
                    "{ctx}"
                );
                assert_eq!(
                    fs::read(fb.esp.join("edgelora/b/vmlinuz")).unwrap(),
                    img.kernel,
                    "{ctx}"
                );
                assert_eq!(
                    fs::read(fb.esp.join("edgelora/b/initrd.img")).unwrap(),
                    img.initrd,
                    "{ctx}"
                );
                *outcomes.entry("new slot").or_default() += 1;
            }
        }
        for _ in 0..3 {
            fb.boot_attempt();
        }
        assert_eq!(
            fb.next_boot(),
            (Slot::A, "edgelora-a.conf".into()),
            "{ctx}: three failed boots must end on slot a"
        );
        assert_eq!(hash_file(&fb.slot_a), slot_a, "{ctx}: slot a was written");
        if killed {
            *outcomes.entry("killed").or_default() += 1;
        }
    }
    eprintln!("outcomes over {TRIALS} trials: {outcomes:?}");
    assert!(
        outcomes.get("killed").copied().unwrap_or(0) > 0,
        "no trial interrupted an apply"
    );
}

// ---- Jetson (L4T r36, nvbootctrl) ----

const JETSON_COMPATIBLE: &str = "edgelora-aarch64";

/// The fake `nvbootctrl`: accepts exactly the `-t rootfs` commands the daemon may use, logs
/// each call, keeps the firmware's view (current and active slot, each slot's retry count and
/// status) in `fw.state` beside it, and prints `dump-slots-info` as L4T r35/r36 does. A file
/// `fail-mark` beside it makes `mark-boot-successful` fail.
const FAKE_NVBOOTCTRL: &str = r#"#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/nvbootctrl.log"
. "$dir/fw.state"
save() {
    printf 'current=%s\nactive=%s\nretry0=%s\nretry1=%s\nstatus0=%s\nstatus1=%s\n' \
        "$current" "$active" "$retry0" "$retry1" "$status0" "$status1" > "$dir/fw.state.tmp"
    mv "$dir/fw.state.tmp" "$dir/fw.state"
}
letter() { if [ "$1" = 0 ]; then echo A; else echo B; fi; }
if [ "$1" != "-t" ] || [ "$2" != "rootfs" ]; then echo "fake nvbootctrl: want -t rootfs" >&2; exit 2; fi
case "$3" in
get-current-slot)
    [ $# -eq 3 ] || exit 2
    echo "$current" ;;
set-active-boot-slot)
    case "$4" in 0|1) active=$4; save ;; *) echo "invalid slot '$4'" >&2; exit 2 ;; esac ;;
mark-boot-successful)
    [ $# -eq 3 ] || exit 2
    if [ -e "$dir/fail-mark" ]; then echo "unknown command mark-boot-successful" >&2; exit 1; fi
    eval "retry$current=3"; save ;;
dump-slots-info)
    printf 'Current rootfs slot: %s\nActive rootfs slot: %s\nnum_slots: 2\n' "$(letter "$current")" "$(letter "$active")"
    printf 'slot: 0,             retry_count: %s,             status: %s\n' "$retry0" "$status0"
    printf 'slot: 1,             retry_count: %s,             status: %s\n' "$retry1" "$status1" ;;
*)
    echo "fake nvbootctrl: unknown command $3" >&2; exit 2 ;;
esac
"#;

/// The firmware's state as the fake keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fw {
    current: u8,
    active: u8,
    retry: [u8; 2],
    unbootable: [bool; 2],
}

impl Fw {
    fn fresh() -> Fw {
        Fw {
            current: 0,
            active: 0,
            retry: [3, 3],
            unbootable: [false, false],
        }
    }
}

/// A Jetson in a temporary directory: `etc/` (layout, key, version), `bin/nvbootctrl` (the
/// fake) with its state and log, the two slot files, and the update state file.
struct FakeJetson {
    base: BoxBase,
    slot_a: PathBuf,
    slot_b: PathBuf,
    slot_size: usize,
    bin: PathBuf,
    state_file: PathBuf,
}

impl std::ops::Deref for FakeJetson {
    type Target = BoxBase;
    fn deref(&self) -> &BoxBase {
        &self.base
    }
}

impl FakeJetson {
    fn new(slot_size: usize) -> FakeJetson {
        use std::os::unix::fs::PermissionsExt;
        let base = BoxBase::new(
            &format!(
                "compatible = \"{JETSON_COMPATIBLE}\"\npublic_key = \"update.pub\"\n\
                 version_file = \"version\"\nboot = \"jetson\"\n\n[jetson]\n\
                 nvbootctrl = \"../bin/nvbootctrl\"\nstate_file = \"../data/update-state.json\"\n\n\
                 [slots]\na = \"../APP.img\"\nb = \"../APP_b.img\"\n"
            ),
            &["bin", "data"],
        );
        let root = &base.root;
        let bin = root.join("bin");
        let nv = bin.join("nvbootctrl");
        fs::write(&nv, FAKE_NVBOOTCTRL).unwrap();
        fs::set_permissions(&nv, fs::Permissions::from_mode(0o755)).unwrap();
        let j = FakeJetson {
            slot_a: root.join("APP.img"),
            slot_b: root.join("APP_b.img"),
            state_file: root.join("data/update-state.json"),
            bin,
            slot_size,
            base,
        };
        fs::write(&j.slot_a, pattern(0xa5, slot_size)).unwrap();
        j.reset();
        j
    }

    /// A freshly flashed Jetson running APP (slot a) 1.0.0.
    fn reset(&self) {
        fs::write(&self.slot_b, pattern(0x3c, self.slot_size)).unwrap();
        let _ = fs::remove_file(&self.state_file);
        let _ = fs::remove_file(self.bin.join("fail-mark"));
        self.set_fw(&Fw::fresh());
        self.set_version("1.0.0");
        self.clear_log();
    }

    fn set_version(&self, v: &str) {
        fs::write(self.root.join("etc/version"), format!("{v}\n")).unwrap();
    }

    fn fw(&self) -> Fw {
        let text = fs::read_to_string(self.bin.join("fw.state")).unwrap();
        let get = |k: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
                .to_string()
        };
        Fw {
            current: get("current").parse().unwrap(),
            active: get("active").parse().unwrap(),
            retry: [
                get("retry0").parse().unwrap(),
                get("retry1").parse().unwrap(),
            ],
            unbootable: [
                get("status0") == "unbootable",
                get("status1") == "unbootable",
            ],
        }
    }

    fn set_fw(&self, f: &Fw) {
        let st = |u: bool| if u { "unbootable" } else { "normal" };
        fs::write(
            self.bin.join("fw.state"),
            format!(
                "current={}\nactive={}\nretry0={}\nretry1={}\nstatus0={}\nstatus1={}\n",
                f.current,
                f.active,
                f.retry[0],
                f.retry[1],
                st(f.unbootable[0]),
                st(f.unbootable[1])
            ),
        )
        .unwrap();
    }

    /// One boot as L4T's UEFI counts it: the active slot boots if it has tries left (using
    /// one); one that has none is marked unbootable and the other slot boots instead. Returns
    /// the nvbootctrl number of the slot that booted.
    fn boot(&self) -> u8 {
        let mut f = self.fw();
        let mut s = f.active as usize;
        if f.retry[s] == 0 {
            f.unbootable[s] = true;
            s = 1 - s;
            f.active = s as u8;
        }
        assert!(f.retry[s] > 0, "no bootable slot left: {f:?}");
        f.retry[s] -= 1;
        f.current = s as u8;
        self.set_fw(&f);
        s as u8
    }

    fn log(&self) -> Vec<String> {
        fs::read_to_string(self.bin.join("nvbootctrl.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn clear_log(&self) {
        let _ = fs::remove_file(self.bin.join("nvbootctrl.log"));
    }

    /// A bundle whose only payload is `rootfs` (a Jetson boots kernel and initrd from the slot).
    fn rootfs_bundle(
        &self,
        name: &str,
        compatible: &str,
        version: &str,
        rootfs: &[u8],
        key: &LedgerKey,
    ) -> (PathBuf, Manifest) {
        let dir = self.root.join("payloads").join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("rootfs"), rootfs).unwrap();
        let sources = [PayloadSource {
            name: "rootfs".into(),
            path: dir.join("rootfs"),
            encoding: Encoding::Zstd,
        }];
        self.bundle_with(name, compatible, version, &sources, key)
    }

    fn bundle(&self, name: &str, version: &str, rootfs: &[u8]) -> (PathBuf, Manifest) {
        self.rootfs_bundle(name, JETSON_COMPATIBLE, version, rootfs, &self.key)
    }

    /// Both slots, the update state file (or its absence) and the firmware state.
    fn snapshot(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("APP".into(), hash_file(&self.slot_a));
        m.insert("APP_b".into(), hash_file(&self.slot_b));
        m.insert(
            "state".into(),
            fs::read_to_string(&self.state_file).unwrap_or_else(|_| "absent".into()),
        );
        m.insert("fw".into(), format!("{:?}", self.fw()));
        m
    }
}

/// The calls a refused or read-only command may make.
fn only_reads(log: &[String]) -> bool {
    log.iter()
        .all(|l| l == "-t rootfs get-current-slot" || l == "-t rootfs dump-slots-info")
}

#[test]
fn jetson_apply_switches_with_nvbootctrl_then_rolls_back_or_is_marked_good() {
    let j = FakeJetson::new(16 * MIB);
    let mut rng = Rng(0x5eed_0101);
    let img = rng.bytes(3 * MIB + 4321);
    let (bundle, m) = j.bundle("1.1.0.bundle", "1.1.0", &img);
    let want = m.payload("rootfs").unwrap().raw_blake3.clone();
    let slot_a_before = hash_file(&j.slot_a);

    let out = ok(j.apply(&bundle, &["--json"]));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["slot"], "b");
    assert_eq!(report["fallback_slot"], "a");
    assert_eq!(report["active_boot_slot"], 1);
    // The running slot is made the next boot before the write, the new one only after it.
    assert_eq!(
        j.log(),
        [
            "-t rootfs get-current-slot",
            "-t rootfs set-active-boot-slot 0",
            "-t rootfs set-active-boot-slot 1"
        ]
    );
    let b = fs::read(&j.slot_b).unwrap();
    assert_eq!(b.len(), 16 * MIB, "the slot must not be truncated or grown");
    assert!(b[..img.len()] == img[..], "APP_b != rootfs");
    assert!(b[img.len()..] == pattern(0x3c, 16 * MIB)[img.len()..]);
    assert_eq!(prefix_digest(&j.slot_b, img.len()), want);
    assert_eq!(hash_file(&j.slot_a), slot_a_before);
    assert_eq!(j.fw().active, 1);
    let s = j.status();
    assert_eq!(s["boot"], "jetson");
    assert_eq!(s["current_slot"], "a");
    assert_eq!(s["current_version"], "1.0.0");
    assert_eq!(s["next_boot"]["slot"], "b");
    assert_eq!(s["trial"]["slot"], "b");
    assert_eq!(s["trial"]["version"], "1.1.0");
    assert_eq!(s["slots"]["b"]["state"], "normal");
    assert_eq!(s["slots"]["b"]["version"], "1.1.0");
    assert_eq!(s["rolled_back"], false);
    let after_apply = j.fw();
    let state_after_apply = fs::read_to_string(&j.state_file).unwrap();

    // Three boots into b that never get confirmed, then the firmware falls back to a.
    for i in 0..3 {
        assert_eq!(j.boot(), 1, "boot attempt {i}");
    }
    assert_eq!(j.boot(), 0, "the fourth boot must be the old slot");
    j.set_version("1.0.0");
    let s = j.status();
    assert_eq!(s["current_slot"], "a");
    assert_eq!(s["slots"]["b"]["state"], "unbootable");
    assert_eq!(s["next_boot"]["slot"], "a");
    assert_eq!(s["rolled_back"], true);

    // Back to right after the apply: one boot into b, which comes up healthy.
    j.set_fw(&after_apply);
    fs::write(&j.state_file, &state_after_apply).unwrap();
    assert_eq!(j.boot(), 1);
    j.set_version("1.1.0");
    assert_eq!(j.fw().retry[1], 2, "an unconfirmed boot used a try");
    // No new update while the running slot is on trial: it would overwrite the only proven one.
    let img2 = rng.bytes(2 * MIB + 1);
    let (bundle2, m2) = j.bundle("1.1.1.bundle", "1.1.1", &img2);
    let before = j.snapshot();
    j.clear_log();
    refused(
        j.apply(&bundle2, &[]),
        "the running slot has not been marked good yet",
        "update during trial",
    );
    assert_eq!(j.snapshot(), before, "a refused apply changed the box");
    assert!(only_reads(&j.log()), "a refused apply called {:?}", j.log());
    // The daemon answers 503 first, then 200: mark-good confirms only after the 200.
    j.clear_log();
    let server = HealthServer::start(vec![503, 200]);
    let out = ok(j
        .update(&["mark-good", "--health-url", &server.url, "--timeout", "30"])
        .output()
        .unwrap());
    assert!(out.contains("marked slot b good"), "{out}");
    assert_eq!(server.stop(), ["GET /health HTTP/1.1"; 2]);
    assert_eq!(
        j.log(),
        [
            "-t rootfs get-current-slot",
            "-t rootfs mark-boot-successful"
        ]
    );
    assert_eq!(j.fw().retry[1], 3, "the confirmation restores the tries");
    let s = j.status();
    assert_eq!(s["trial"], Value::Null);
    assert_eq!(s["current_slot"], "b");
    assert_eq!(s["next_boot"]["slot"], "b");
    // Confirmed boots do not count down.
    j.boot();
    j.update(&["mark-good", "--no-wait"]).output().unwrap();
    assert_eq!(j.fw().retry[1], 3);
    // Now b is the fallback: the next update goes to APP.
    j.clear_log();
    ok(j.apply(&bundle2, &[]));
    assert_eq!(
        j.log(),
        [
            "-t rootfs get-current-slot",
            "-t rootfs set-active-boot-slot 1",
            "-t rootfs set-active-boot-slot 0"
        ]
    );
    assert_eq!(
        prefix_digest(&j.slot_a, img2.len()),
        m2.payload("rootfs").unwrap().raw_blake3
    );
    assert_eq!(prefix_digest(&j.slot_b, img.len()), want);
    assert_eq!(j.fw().active, 0);
}

#[test]
fn jetson_mark_good_confirms_only_a_healthy_boot() {
    let j = FakeJetson::new(8 * MIB);
    let mut rng = Rng(0x5eed_0102);
    let (bundle, _) = j.bundle("1.1.0.bundle", "1.1.0", &rng.bytes(MIB));
    ok(j.apply(&bundle, &[]));
    assert_eq!(j.boot(), 1);
    j.set_version("1.1.0");
    j.clear_log();
    let server = HealthServer::start(vec![503]);
    let t0 = Instant::now();
    let out = j
        .update(&["mark-good", "--health-url", &server.url, "--timeout", "2"])
        .output()
        .unwrap();
    refused(out, "was not healthy within 2s", "unhealthy mark-good");
    assert!(t0.elapsed() >= Duration::from_secs(2));
    assert!(server.stop().len() >= 2);
    assert_eq!(
        j.log(),
        ["-t rootfs get-current-slot"],
        "an unhealthy boot must not be confirmed"
    );
    assert_eq!(j.fw().retry[1], 2);
    assert_eq!(j.status()["trial"]["slot"], "b", "still on trial");
    // Healthy, but this nvbootctrl refuses the command: exit 3, which the unit counts as
    // success (no reboot loop of a healthy box), and the trial stays recorded.
    fs::write(j.bin.join("fail-mark"), "").unwrap();
    let server = HealthServer::start(vec![200]);
    let out = j
        .update(&["mark-good", "--health-url", &server.url, "--timeout", "10"])
        .output()
        .unwrap();
    server.stop();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("mark-boot-successful"), "{err}");
    assert_eq!(j.status()["trial"]["slot"], "b");
    fs::remove_file(j.bin.join("fail-mark")).unwrap();
    let out = ok(j.update(&["mark-good", "--no-wait"]).output().unwrap());
    assert!(out.contains("marked slot b good"), "{out}");
    assert_eq!(j.status()["trial"], Value::Null);
    // nvbootctrl's own failures are named.
    fs::write(j.bin.join("fw.state"), "current=7\n").unwrap();
    refused(
        j.update(&["mark-good", "--no-wait"]).output().unwrap(),
        "not 0 or 1",
        "odd current slot",
    );
}

#[test]
fn jetson_hostile_bundles_call_nothing_and_write_nothing() {
    let j = FakeJetson::new(16 * MIB);
    let mut rng = Rng(0x5eed_0103);
    let img = rng.bytes(3 * MIB + 99);
    let (good_path, m) = j.bundle("good", "1.1.0", &img);
    let good = fs::read(&good_path).unwrap();
    let mlen = u32::from_le_bytes(good[16..20].try_into().unwrap()) as usize;
    let data = 20 + mlen + 64;
    let rootfs = m.payload("rootfs").unwrap();
    let r0 = data + rootfs.offset as usize;
    let sig = "signature does not verify";

    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    let mut unsigned = good.clone();
    unsigned[20 + mlen..data].fill(0);
    cases.push(("unsigned".into(), unsigned, sig));
    let other_key = LedgerKey::generate("edgelora-updates").unwrap();
    let (p, _) = j.rootfs_bundle("foreign", JETSON_COMPATIBLE, "1.1.0", &img, &other_key);
    cases.push(("signed by another key".into(), fs::read(p).unwrap(), sig));
    for cut in [0, 20 + mlen / 2, data + 100, r0 + 5000, good.len() - 1] {
        cases.push((
            format!("truncated at {cut}"),
            good[..cut].to_vec(),
            "truncated",
        ));
    }
    cases.push((
        "bit flip in the manifest".into(),
        flipped(&good, 20 + mlen / 2),
        sig,
    ));
    cases.push((
        "bit flip in the rootfs payload".into(),
        flipped(&good, r0 + rootfs.size as usize / 2),
        "payload rootfs",
    ));
    let (p, _) = j.bundle("downgrade", "0.9.0", &img);
    let downgrade = fs::read(&p).unwrap();
    cases.push((
        "downgrade".into(),
        downgrade.clone(),
        "downgrade from 1.0.0 to 0.9.0 refused; --force to allow",
    ));
    let (p, _) = j.bundle("same", "1.0.0", &img);
    cases.push((
        "same version".into(),
        fs::read(p).unwrap(),
        "version 1.0.0 is already installed",
    ));
    let (p, _) = j.rootfs_bundle("x86", COMPATIBLE, "1.1.0", &img, &j.key);
    cases.push((
        "an x86_64 bundle".into(),
        fs::read(p).unwrap(),
        "it is for `edgelora-x86_64` but this box is `edgelora-aarch64`",
    ));
    let (p, _) = j.bundle("big", "1.1.0", &vec![7u8; 16 * MIB + 1]);
    cases.push((
        "rootfs larger than the slot".into(),
        fs::read(p).unwrap(),
        "holds only 16777216",
    ));
    {
        let dir = j.root.join("payloads/no-rootfs");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("kernel"), b"kernel").unwrap();
        let src = [PayloadSource {
            name: "kernel".into(),
            path: dir.join("kernel"),
            encoding: Encoding::Raw,
        }];
        let out = j.root.join("bundles/no-rootfs");
        let v = semver::Version::parse("1.1.0").unwrap();
        write_bundle(&out, JETSON_COMPATIBLE, &v, &src, &j.key, &mut |_, _| {}).unwrap();
        cases.push((
            "no rootfs payload".into(),
            fs::read(out).unwrap(),
            "has no `rootfs` payload",
        ));
    }

    let before = j.snapshot();
    let case_path = j.root.join("bundles/case.bundle");
    for (what, bytes, needle) in &cases {
        fs::write(&case_path, bytes).unwrap();
        j.clear_log();
        refused(j.apply(&case_path, &[]), needle, what);
        assert_eq!(
            j.snapshot(),
            before,
            "{what}: the refused bundle changed the box"
        );
        assert!(
            only_reads(&j.log()),
            "{what}: nvbootctrl called {:?}",
            j.log()
        );
    }
    // The box still works: the intact bundle installs, and --force allows a downgrade.
    ok(j.apply(&good_path, &[]));
    assert_eq!(j.fw().active, 1);
    j.reset();
    fs::write(&case_path, &downgrade).unwrap();
    ok(j.apply(&case_path, &["--force"]));
    assert_eq!(j.status()["trial"]["version"], "0.9.0");
}

#[test]
fn jetson_killed_apply_never_points_the_firmware_at_a_half_written_slot() {
    const TRIALS: usize = 10;
    let j = FakeJetson::new(40 * MIB);
    let mut rng = Rng(0x5eed_0104);
    let img = rng.bytes(32 * MIB + 777);
    let (bundle, m) = j.bundle("1.1.0.bundle", "1.1.0", &img);
    let want = m.payload("rootfs").unwrap().raw_blake3.clone();
    let slot_a = hash_file(&j.slot_a);
    edgelorad();
    let mut times = Vec::new();
    for _ in 0..3 {
        j.reset();
        let t0 = Instant::now();
        ok(j.apply(&bundle, &[]));
        times.push(t0.elapsed());
    }
    times.sort();
    let full = times[1];
    let mut outcomes = BTreeMap::<&str, usize>::new();
    for trial in 0..TRIALS {
        j.reset();
        let delay = random_delay(&mut rng, full);
        let killed = killed_after(j.update(&["apply"]).arg(&bundle), delay);
        let fw = j.fw();
        let ctx = format!("trial {trial} (killed after {delay:?}: {killed}), {fw:?}");
        assert_eq!(hash_file(&j.slot_a), slot_a, "{ctx}: APP was written");
        if fw.active == 1 {
            assert_eq!(
                prefix_digest(&j.slot_b, img.len()),
                want,
                "{ctx}: the firmware boots APP_b next but it does not hold the image"
            );
            *outcomes.entry("new slot next").or_default() += 1;
        } else {
            *outcomes.entry("old slot next").or_default() += 1;
        }
        // A new slot that never gets confirmed: three boots, then the firmware is back on APP.
        if fw.active == 1 {
            for _ in 0..3 {
                assert_eq!(j.boot(), 1, "{ctx}");
            }
            assert_eq!(j.boot(), 0, "{ctx}: no fallback to APP");
        }
        if killed {
            *outcomes.entry("killed").or_default() += 1;
        }
    }
    eprintln!("jetson outcomes over {TRIALS} trials: {outcomes:?}");
    assert!(outcomes.get("killed").copied().unwrap_or(0) > 0);
}
