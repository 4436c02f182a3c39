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
    _tmp: tempfile::TempDir,
    root: PathBuf,
    layout: PathBuf,
    esp: PathBuf,
    slot_a: PathBuf,
    slot_b: PathBuf,
    slot_size: usize,
    key: LedgerKey,
}

impl FakeBox {
    fn new(slot_size: usize) -> FakeBox {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let etc = root.join("etc");
        fs::create_dir_all(&etc).unwrap();
        fs::create_dir_all(root.join("bundles")).unwrap();
        let key = LedgerKey::generate("edgelora-updates").unwrap();
        fs::write(
            etc.join("update.pub"),
            format!("{}\n", key.public_key().to_verifier_string()),
        )
        .unwrap();
        // Relative paths: the layout resolves them against its own directory.
        fs::write(
            etc.join("update.toml"),
            format!(
                "compatible = \"{COMPATIBLE}\"\npublic_key = \"update.pub\"\n\
                 version_file = \"version\"\nesp = \"../esp\"\ncmdline_file = \"cmdline\"\n\
                 kernel_cmdline = \"{KERNEL_CMDLINE}\"\ntries = 3\n\n[slots]\n\
                 a = \"../slot-a.img\"\nb = \"../slot-b.img\"\n"
            ),
        )
        .unwrap();
        let b = FakeBox {
            layout: etc.join("update.toml"),
            esp: root.join("esp"),
            slot_a: root.join("slot-a.img"),
            slot_b: root.join("slot-b.img"),
            root,
            _tmp: tmp,
            slot_size,
            key,
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

    /// A bundle of `img` signed with `key`, at `bundles/<name>`.
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

    fn bundle(&self, name: &str, version: &str, img: &Image) -> (PathBuf, Manifest) {
        let sources = self.write_image_files(img, name);
        self.bundle_with(name, COMPATIBLE, version, &sources, &self.key)
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
        let mut c = self.update(&["apply"]);
        c.arg(bundle).args(extra);
        c.output().unwrap()
    }

    fn status(&self) -> Value {
        let out = ok(self.update(&["status", "--json"]).output().unwrap());
        serde_json::from_str(&out).unwrap()
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
        let mut f = fs::File::open(&self.slot_b).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).unwrap();
        blake3::hash(&buf).to_hex().to_string()
    }
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
        let delay = Duration::from_micros(rng.below(full.as_micros() as u64 * 23 / 20));
        let mut child = fb
            .update(&["apply"])
            .arg(&bundle)
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
