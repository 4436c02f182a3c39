//! Signed update bundles: round trips, and every way a hostile or damaged bundle (or key file)
//! must be refused.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use edgelora_image::bundle::{
    Bundle, BundleError, Encoding, FORMAT, MAGIC, MAX_MANIFEST, Manifest, PayloadEntry,
    PayloadSource, key_id, load_public_key, load_signing_key, write_bundle,
};
use edgelora_ledger::{LedgerKey, PublicKey};
use tempfile::TempDir;

// ---- helpers ----

/// xorshift64*: deterministic, dependency-free test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Incompressible bytes.
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Compressible bytes: repeated words with a little noise, like a filesystem image.
    fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&[u8]; 6] = [
            b"edgelora ",
            b"rootfs ",
            b"\0\0\0\0\0\0\0\0",
            b"lib/",
            b".so.1\n",
            b"usr/",
        ];
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            out.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize]);
            if self.below(16) == 0 {
                out.push(self.next() as u8);
            }
        }
        out.truncate(len);
        out
    }
}

fn key(n: u8) -> LedgerKey {
    LedgerKey::from_seed("test-updates", [n; 32]).unwrap()
}

fn version(v: &str) -> semver::Version {
    semver::Version::parse(v).unwrap()
}

fn hex_digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// One payload to bundle: name, content, encoding.
type Spec<'a> = (&'a str, &'a [u8], Encoding);

/// Writes the payloads as files and bundles them into `<dir>/<file>`.
fn make_bundle(dir: &Path, file: &str, specs: &[Spec], key: &LedgerKey) -> (PathBuf, Manifest) {
    let sources: Vec<PayloadSource> = specs
        .iter()
        .map(|(name, bytes, encoding)| {
            let path = dir.join(format!("{file}.{name}.src"));
            fs::write(&path, bytes).unwrap();
            PayloadSource {
                name: name.to_string(),
                path,
                encoding: *encoding,
            }
        })
        .collect();
    let out = dir.join(file);
    let manifest = write_bundle(
        &out,
        "edgelora-x86_64",
        &version("1.4.0"),
        &sources,
        key,
        &mut |_, _| {},
    )
    .unwrap();
    (out, manifest)
}

/// A few small payloads of every kind, for the hostile tests (each of which rewrites the file
/// many times).
struct Small {
    _dir: TempDir,
    path: PathBuf,
    bytes: Vec<u8>,
    manifest: Manifest,
    payloads: Vec<(String, Vec<u8>)>,
    key: LedgerKey,
}

impl Small {
    fn new() -> Small {
        let dir = TempDir::new().unwrap();
        let mut rng = Rng::new(7);
        let kernel = rng.bytes(5000);
        let rootfs = rng.text(40_000);
        let initrd = rng.bytes(3000);
        let key = key(1);
        let (path, manifest) = make_bundle(
            dir.path(),
            "small.bundle",
            &[
                ("kernel", &kernel, Encoding::Raw),
                ("rootfs", &rootfs, Encoding::Zstd),
                ("initrd", &initrd, Encoding::Zstd),
            ],
            &key,
        );
        let bytes = fs::read(&path).unwrap();
        Small {
            _dir: dir,
            path,
            bytes,
            manifest,
            payloads: vec![
                ("kernel".into(), kernel),
                ("rootfs".into(), rootfs),
                ("initrd".into(), initrd),
            ],
            key,
        }
    }

    fn public(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Writes `bytes` in place of the bundle and opens it with the right key.
    fn open_with(&self, bytes: &[u8]) -> Result<Bundle, BundleError> {
        fs::write(&self.path, bytes).unwrap();
        Bundle::open(&self.path, &self.public())
    }

    fn layout(&self) -> Layout {
        Layout::of(&self.bytes)
    }
}

/// Where things are in a bundle, read independently of the library.
struct Layout {
    manifest_len: usize,
    data_start: usize,
}

impl Layout {
    fn of(bytes: &[u8]) -> Layout {
        assert_eq!(&bytes[..16], MAGIC);
        let manifest_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
        Layout {
            manifest_len,
            data_start: 20 + manifest_len + 64,
        }
    }

    fn signed_end(&self) -> usize {
        20 + self.manifest_len
    }
}

fn read_payload(bundle: &Bundle, name: &str) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    bundle.payload_reader(name).unwrap().read_to_end(&mut out)?;
    Ok(out)
}

/// A bundle assembled by hand around any manifest bytes, signed by `key`.
fn hand_made(manifest: &[u8], key: &LedgerKey, payloads: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    out.extend_from_slice(manifest);
    let signature = key.sign(&out);
    out.extend_from_slice(&signature);
    out.extend_from_slice(payloads);
    out
}

fn raw_entry(name: &str, offset: u64, bytes: &[u8]) -> PayloadEntry {
    PayloadEntry {
        name: name.to_string(),
        offset,
        size: bytes.len() as u64,
        blake3: hex_digest(bytes),
        encoding: Encoding::Raw,
        raw_size: bytes.len() as u64,
        raw_blake3: hex_digest(bytes),
    }
}

fn zstd_entry(name: &str, offset: u64, stored: &[u8], raw: &[u8]) -> PayloadEntry {
    PayloadEntry {
        name: name.to_string(),
        offset,
        size: stored.len() as u64,
        blake3: hex_digest(stored),
        encoding: Encoding::Zstd,
        raw_size: raw.len() as u64,
        raw_blake3: hex_digest(raw),
    }
}

fn manifest_for(key: &LedgerKey, payloads: Vec<PayloadEntry>) -> Manifest {
    Manifest {
        format: FORMAT,
        compatible: "edgelora-x86_64".into(),
        version: "2.0.0".into(),
        created_unix: 1_700_000_000,
        key_id: key_id(&key.public_key()),
        payloads,
    }
}

/// Writes a hand-made bundle to a fresh file and opens it with `key`'s public half.
fn open_hand_made(dir: &Path, bytes: &[u8], key: &LedgerKey) -> Result<Bundle, BundleError> {
    let path = dir.join("hand.bundle");
    fs::write(&path, bytes).unwrap();
    Bundle::open(&path, &key.public_key())
}

/// Files in `dir`, sorted, for "nothing was left behind" checks.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn flip(bytes: &[u8], pos: usize, bit: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[pos] ^= 1 << bit;
    out
}

// ---- round trips ----

#[test]
fn round_trip_raw_and_zstd_multi_megabyte() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng::new(42);
    let rootfs = rng.text(6 << 20);
    let kernel = rng.bytes(3 << 20);
    let initrd = rng.bytes((2 << 20) + 12_345);
    let key = key(9);
    let specs: [Spec; 5] = [
        ("rootfs", &rootfs, Encoding::Zstd),
        ("kernel", &kernel, Encoding::Raw),
        ("initrd", &initrd, Encoding::Zstd),
        ("empty-raw", b"", Encoding::Raw),
        ("empty-zstd", b"", Encoding::Zstd),
    ];
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (path, manifest) = make_bundle(dir.path(), "big.bundle", &specs, &key);

    // The manifest describes the sources.
    assert_eq!(manifest.format, FORMAT);
    assert_eq!(manifest.compatible, "edgelora-x86_64");
    assert_eq!(manifest.semver(), version("1.4.0"));
    assert_eq!(manifest.key_id, key_id(&key.public_key()));
    assert!(manifest.created_unix >= before && manifest.created_unix <= before + 60);
    assert_eq!(manifest.payloads.len(), specs.len());
    let mut offset = 0;
    for (entry, (name, bytes, encoding)) in manifest.payloads.iter().zip(&specs) {
        assert_eq!(entry.name, *name);
        assert_eq!(entry.encoding, *encoding);
        assert_eq!(entry.offset, offset);
        assert_eq!(entry.raw_size, bytes.len() as u64);
        assert_eq!(entry.raw_blake3, hex_digest(bytes));
        if *encoding == Encoding::Raw {
            assert_eq!(
                (entry.size, &entry.blake3),
                (entry.raw_size, &entry.raw_blake3)
            );
        }
        offset += entry.size;
    }
    let rootfs_entry = manifest.payload("rootfs").unwrap();
    assert!(
        rootfs_entry.size < rootfs_entry.raw_size / 2,
        "compressible payload was compressed: {} of {}",
        rootfs_entry.size,
        rootfs_entry.raw_size
    );

    // The layout, checked without the library: magic, length, signature, payloads.
    let bytes = fs::read(&path).unwrap();
    let layout = Layout::of(&bytes);
    assert_eq!(bytes.len() as u64, layout.data_start as u64 + offset);
    let on_disk: Manifest = serde_json::from_slice(&bytes[20..layout.signed_end()]).unwrap();
    assert_eq!(on_disk, manifest);
    let signature: [u8; 64] = bytes[layout.signed_end()..layout.data_start]
        .try_into()
        .unwrap();
    assert!(
        key.public_key()
            .verify(&bytes[..layout.signed_end()], &signature)
    );
    let kernel_entry = manifest.payload("kernel").unwrap();
    let at = layout.data_start + kernel_entry.offset as usize;
    assert_eq!(&bytes[at..at + kernel.len()], &kernel[..]);
    for entry in &manifest.payloads {
        let at = layout.data_start + entry.offset as usize;
        assert_eq!(
            hex_digest(&bytes[at..at + entry.size as usize]),
            entry.blake3
        );
    }

    // And the library reads it all back.
    let bundle = Bundle::open(&path, &key.public_key()).unwrap();
    assert_eq!(bundle.path(), path);
    assert_eq!(bundle.manifest(), &manifest);
    bundle.verify_payloads(&mut |_, _| {}).unwrap();
    for (name, source, _) in &specs {
        assert_eq!(
            read_payload(&bundle, name).unwrap(),
            *source,
            "payload {name}"
        );
    }
    // The source files are untouched and no temporary files are left.
    assert_eq!(
        listing(dir.path()),
        [
            "big.bundle",
            "big.bundle.empty-raw.src",
            "big.bundle.empty-zstd.src",
            "big.bundle.initrd.src",
            "big.bundle.kernel.src",
            "big.bundle.rootfs.src"
        ]
    );
}

#[test]
fn progress_is_monotonic_and_reaches_the_total() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng::new(3);
    let a = rng.bytes(2_500_000);
    let b = rng.text(1_700_000);
    let key = key(2);
    let sources = [("a", &a, Encoding::Raw), ("b", &b, Encoding::Zstd)]
        .iter()
        .map(|(name, bytes, encoding)| {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            PayloadSource {
                name: name.to_string(),
                path,
                encoding: *encoding,
            }
        })
        .collect::<Vec<_>>();
    let out = dir.path().join("p.bundle");
    let mut seen = Vec::new();
    let manifest = write_bundle(
        &out,
        "edgelora-aarch64",
        &version("0.1.0-rc.1"),
        &sources,
        &key,
        &mut |done, total| seen.push((done, total)),
    )
    .unwrap();
    check_progress(&seen, (a.len() + b.len()) as u64);

    let bundle = Bundle::open(&out, &key.public_key()).unwrap();
    let mut seen = Vec::new();
    bundle
        .verify_payloads(&mut |done, total| seen.push((done, total)))
        .unwrap();
    check_progress(&seen, manifest.payloads.iter().map(|p| p.size).sum());
}

fn check_progress(seen: &[(u64, u64)], total: u64) {
    assert!(seen.len() >= 2, "progress reported: {seen:?}");
    assert!(
        seen.iter().all(|&(done, t)| t == total && done <= total),
        "{seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "not monotonic: {seen:?}"
    );
    assert_eq!(seen.last().unwrap().0, total);
}

#[test]
fn payload_readers_are_independent_and_send() {
    let small = Small::new();
    let bundle = Bundle::open(&small.path, &small.public()).unwrap();
    // Interleaved small reads from two readers of the same file must not disturb each other.
    let mut readers: Vec<_> = small
        .payloads
        .iter()
        .map(|(name, _)| (bundle.payload_reader(name).unwrap(), Vec::new()))
        .collect();
    let mut buf = [0u8; 777];
    let mut live = readers.len();
    while live > 0 {
        live = 0;
        for (reader, out) in &mut readers {
            let n = reader.read(&mut buf).unwrap();
            out.extend_from_slice(&buf[..n]);
            if n > 0 {
                live += 1;
            }
        }
    }
    for ((_, got), (name, want)) in readers.iter().zip(&small.payloads) {
        assert_eq!(got, want, "payload {name}");
    }
    // A reader can move to another thread (and outlive nothing it borrows).
    let reader = bundle.payload_reader("rootfs").unwrap();
    let got = std::thread::spawn(move || {
        let mut reader = reader;
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map(|_| out)
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(got, small.payloads[1].1);
    // Reading past the end keeps answering Ok(0).
    let mut reader = bundle.payload_reader("kernel").unwrap();
    io::copy(&mut reader, &mut io::sink()).unwrap();
    assert_eq!(reader.read(&mut buf).unwrap(), 0);
}

#[test]
fn unknown_payload_name_is_refused() {
    let small = Small::new();
    let bundle = Bundle::open(&small.path, &small.public()).unwrap();
    match bundle.payload_reader("bootloader") {
        Err(BundleError::BadPayload { name, what, .. }) => {
            assert_eq!(name, "bootloader");
            assert!(what.contains("kernel") && what.contains("rootfs"), "{what}");
        }
        other => panic!("expected BadPayload, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn rewriting_the_output_replaces_it_whole() {
    let dir = TempDir::new().unwrap();
    let key = key(4);
    let (path, _) = make_bundle(dir.path(), "b", &[("kernel", b"one", Encoding::Raw)], &key);
    let (again, manifest) = make_bundle(
        dir.path(),
        "b",
        &[("kernel", b"two two", Encoding::Zstd)],
        &key,
    );
    assert_eq!(path, again);
    let bundle = Bundle::open(&path, &key.public_key()).unwrap();
    assert_eq!(bundle.manifest(), &manifest);
    assert_eq!(read_payload(&bundle, "kernel").unwrap(), b"two two");
    assert_eq!(listing(dir.path()), ["b", "b.kernel.src"]);
}

// ---- signatures ----

#[test]
fn unsigned_bundle_is_refused() {
    let small = Small::new();
    let layout = small.layout();
    let mut bytes = small.bytes.clone();
    bytes[layout.signed_end()..layout.data_start].fill(0);
    let err = small.open_with(&bytes).unwrap_err();
    match &err {
        BundleError::BadSignature { path, key_id: id } => {
            assert_eq!(path, &small.path);
            assert_eq!(id, &key_id(&small.public()));
        }
        other => panic!("expected BadSignature, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&small.path.display().to_string()), "{text}");
    assert!(text.contains(&key_id(&small.public())), "{text}");
}

#[test]
fn another_key_is_refused() {
    let small = Small::new();
    let err = Bundle::open(&small.path, &key(2).public_key()).unwrap_err();
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err:?}");
}

#[test]
fn manifest_resigned_by_another_key_is_refused() {
    let small = Small::new();
    let layout = small.layout();
    let other = key(2);
    let mut bytes = small.bytes.clone();
    let signature = other.sign(&bytes[..layout.signed_end()]);
    bytes[layout.signed_end()..layout.data_start].copy_from_slice(&signature);
    // With the real update key: the signature is not its.
    let err = small.open_with(&bytes).unwrap_err();
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err:?}");
    // With the other key: the signature verifies, but the manifest names the real key.
    let err = Bundle::open(&small.path, &other.public_key()).unwrap_err();
    match &err {
        BundleError::BadManifest { what, .. } => {
            assert!(what.contains(&key_id(&small.public())), "{what}");
            assert!(what.contains(&key_id(&other.public_key())), "{what}");
        }
        other => panic!("expected BadManifest, got {other:?}"),
    }
}

#[test]
fn altered_manifest_is_a_signature_error_not_a_parse_error() {
    let small = Small::new();
    let layout = small.layout();
    // Overwrite the whole manifest with garbage of the same length.
    let mut bytes = small.bytes.clone();
    bytes[20..layout.signed_end()].fill(b'{');
    let err = small.open_with(&bytes).unwrap_err();
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err:?}");
}

// ---- truncation and framing ----

#[test]
fn truncated_anywhere_is_refused() {
    let small = Small::new();
    let layout = small.layout();
    let len = small.bytes.len();
    let mut cuts = vec![
        0,
        1,
        8,
        15,
        16,
        17,
        19,
        20,
        21,
        20 + layout.manifest_len / 2,
        layout.signed_end() - 1,
        layout.signed_end(),
        layout.signed_end() + 1,
        layout.signed_end() + 32,
        layout.data_start - 1,
        layout.data_start,
        len - 1,
    ];
    for entry in &small.manifest.payloads {
        let start = layout.data_start + entry.offset as usize;
        let end = start + entry.size as usize;
        cuts.extend([start + 1, start + entry.size as usize / 2, end - 1]);
        if end < len {
            cuts.push(end);
        }
    }
    for cut in cuts {
        let err = small.open_with(&small.bytes[..cut]).unwrap_err();
        match &err {
            BundleError::Truncated { path, .. } => assert_eq!(path, &small.path),
            other => panic!("cut at {cut} of {len}: expected Truncated, got {other:?}"),
        }
        assert!(err.to_string().contains("truncated"), "{err}");
    }
    // The untouched file still opens (the loop above really did test cuts of a good bundle).
    small.open_with(&small.bytes).unwrap();
}

#[test]
fn trailing_data_on_a_regular_file_is_refused() {
    let small = Small::new();
    for extra in [1usize, 511, 4096] {
        let mut bytes = small.bytes.clone();
        bytes.extend(std::iter::repeat_n(0u8, extra));
        let err = small.open_with(&bytes).unwrap_err();
        match &err {
            BundleError::BadManifest { what, .. } => {
                assert!(what.contains("trailing"), "{what}")
            }
            other => panic!("{extra} extra bytes: expected BadManifest, got {other:?}"),
        }
    }
}

#[test]
fn manifest_length_out_of_range_is_refused() {
    let small = Small::new();
    for bad in [0u32, MAX_MANIFEST + 1, u32::MAX] {
        let mut bytes = small.bytes.clone();
        bytes[16..20].copy_from_slice(&bad.to_le_bytes());
        match small.open_with(&bytes).unwrap_err() {
            BundleError::ManifestLength { len, .. } => assert_eq!(len, bad),
            other => panic!("length {bad}: expected ManifestLength, got {other:?}"),
        }
    }
    // The largest allowed length, in a file too short for it: truncated, not a huge read.
    let mut bytes = small.bytes.clone();
    bytes[16..20].copy_from_slice(&MAX_MANIFEST.to_le_bytes());
    let err = small.open_with(&bytes).unwrap_err();
    assert!(matches!(err, BundleError::Truncated { .. }), "{err:?}");
}

#[test]
fn other_files_are_not_bundles() {
    let dir = TempDir::new().unwrap();
    let key = key(1);
    let path = dir.path().join("x");
    for bytes in [
        &b"hi"[..],
        b"EDGELORA-BUNDLE2 and then some",
        &Rng::new(5).bytes(10_000),
    ] {
        fs::write(&path, bytes).unwrap();
        match Bundle::open(&path, &key.public_key()).unwrap_err() {
            BundleError::NotABundle(p) => assert_eq!(p, path),
            other => panic!("expected NotABundle, got {other:?}"),
        }
    }
    // A directory is neither a regular file nor a block device.
    let err = Bundle::open(dir.path(), &key.public_key()).unwrap_err();
    assert!(matches!(err, BundleError::Io { .. }), "{err:?}");
    // A missing file is an I/O error naming it.
    let missing = dir.path().join("missing");
    let err = Bundle::open(&missing, &key.public_key()).unwrap_err();
    assert!(matches!(err, BundleError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");
}

// ---- bit flips ----

#[derive(Debug, Clone, Copy, PartialEq)]
enum Region {
    Magic,
    Length,
    Manifest,
    Signature,
    Payload(usize),
}

fn region_of(small: &Small, pos: usize) -> Region {
    let layout = small.layout();
    match pos {
        0..16 => Region::Magic,
        16..20 => Region::Length,
        p if p < layout.signed_end() => Region::Manifest,
        p if p < layout.data_start => Region::Signature,
        p => {
            let offset = (p - layout.data_start) as u64;
            let i = small
                .manifest
                .payloads
                .iter()
                .position(|e| offset >= e.offset && offset < e.offset + e.size)
                .unwrap();
            Region::Payload(i)
        }
    }
}

fn flip_positions(small: &Small) -> Vec<usize> {
    let layout = small.layout();
    let mut positions: Vec<usize> = (0..20).collect();
    positions.extend((20..layout.signed_end()).step_by(7));
    positions.push(layout.signed_end() - 1);
    positions.extend(layout.signed_end()..layout.data_start);
    let mut rng = Rng::new(11);
    for entry in &small.manifest.payloads {
        let start = layout.data_start + entry.offset as usize;
        let size = entry.size as usize;
        positions.extend([start, start + 1, start + size / 2, start + size - 1]);
        positions.extend((0..6).map(|_| start + rng.below(size as u64) as usize));
    }
    positions
}

#[test]
fn every_bit_flip_is_refused() {
    let small = Small::new();
    let mut checked = 0;
    for (i, pos) in flip_positions(&small).into_iter().enumerate() {
        let bit = (i % 8) as u8;
        let bytes = flip(&small.bytes, pos, bit);
        let region = region_of(&small, pos);
        let opened = small.open_with(&bytes);
        match (region, opened) {
            (Region::Magic, Err(BundleError::NotABundle(_))) => {}
            (
                Region::Length,
                Err(
                    BundleError::ManifestLength { .. }
                    | BundleError::Truncated { .. }
                    | BundleError::BadSignature { .. },
                ),
            ) => {}
            (Region::Manifest | Region::Signature, Err(BundleError::BadSignature { .. })) => {}
            (Region::Payload(i), Ok(bundle)) => check_payload_flip(&small, &bundle, i, pos),
            (region, Err(e)) => panic!("flip at {pos} ({region:?}): wrong error {e:?}"),
            (region, Ok(_)) => panic!("flip at {pos} ({region:?}): opened"),
        }
        checked += 1;
    }
    assert!(checked > 150, "only {checked} flips");
}

/// A flipped payload byte passes `open` (payloads are not read there), but `verify_payloads`
/// and a reader of that payload must catch it, while the other payloads still read fine.
fn check_payload_flip(small: &Small, bundle: &Bundle, flipped: usize, pos: usize) {
    let name = &small.manifest.payloads[flipped].name;
    match bundle.verify_payloads(&mut |_, _| {}) {
        Err(BundleError::BadPayload { name: n, what, .. }) => {
            assert_eq!(&n, name, "flip at {pos}");
            assert!(what.contains("digest mismatch"), "flip at {pos}: {what}");
        }
        other => panic!("flip at {pos} in {name}: verify_payloads gave {other:?}"),
    }
    let err = read_payload(bundle, name).unwrap_err();
    assert_eq!(
        err.kind(),
        io::ErrorKind::InvalidData,
        "flip at {pos}: {err}"
    );
    assert!(err.to_string().contains(name.as_str()), "{err}");
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    for (i, (other, want)) in small.payloads.iter().enumerate() {
        if i != flipped {
            assert_eq!(
                &read_payload(bundle, other).unwrap(),
                want,
                "payload {other}"
            );
        }
    }
}

#[test]
fn raw_payload_reader_errors_at_the_end_instead_of_eof() {
    let small = Small::new();
    let layout = small.layout();
    let kernel = small.manifest.payload("kernel").unwrap();
    let pos = layout.data_start + kernel.offset as usize + 100;
    let bundle = small.open_with(&flip(&small.bytes, pos, 0)).unwrap();
    let mut reader = bundle.payload_reader("kernel").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1000];
    let err = loop {
        match reader.read(&mut buf) {
            Ok(0) => panic!("altered payload read to a clean end"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(got.len() as u64, kernel.size, "all bytes, then the error");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    // And it keeps failing rather than turning into a clean end.
    assert!(reader.read(&mut buf).is_err());
}

// ---- changes after open ----

#[test]
fn changes_after_open_are_caught_by_the_reader() {
    let small = Small::new();
    let bundle = Bundle::open(&small.path, &small.public()).unwrap();
    bundle.verify_payloads(&mut |_, _| {}).unwrap();
    let layout = small.layout();
    let rootfs = small.manifest.payload("rootfs").unwrap();
    let pos = (layout.data_start + rootfs.offset as usize + 10) as u64;
    let file = OpenOptions::new().write(true).open(&small.path).unwrap();
    file.write_all_at(&[small.bytes[pos as usize] ^ 0x40], pos)
        .unwrap();
    let err = read_payload(&bundle, "rootfs").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let err = bundle.verify_payloads(&mut |_, _| {}).unwrap_err();
    assert!(
        matches!(&err, BundleError::BadPayload { name, .. } if name == "rootfs"),
        "{err:?}"
    );

    // Truncated under an open bundle: the reader reports the missing bytes.
    file.set_len((layout.data_start + rootfs.offset as usize + 5) as u64)
        .unwrap();
    for name in ["rootfs", "initrd"] {
        let err = read_payload(&bundle, name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{name}: {err}");
    }
    assert!(matches!(
        bundle.verify_payloads(&mut |_, _| {}),
        Err(BundleError::BadPayload { .. })
    ));
}

#[test]
fn a_file_renamed_over_the_path_after_open_is_not_read() {
    let small = Small::new();
    let bundle = Bundle::open(&small.path, &small.public()).unwrap();
    let dir = small.path.parent().unwrap();
    let (other, _) = make_bundle(
        dir,
        "other",
        &[("kernel", b"impostor", Encoding::Raw)],
        &small.key,
    );
    fs::rename(&other, &small.path).unwrap();
    assert_eq!(
        read_payload(&bundle, "kernel").unwrap(),
        small.payloads[0].1
    );
    bundle.verify_payloads(&mut |_, _| {}).unwrap();
}

// ---- signed but malformed manifests ----

#[test]
fn signed_but_malformed_manifests_are_refused() {
    let dir = TempDir::new().unwrap();
    let key = key(5);
    let a = b"kernel bytes".to_vec();
    let b = b"initrd bytes, a few more".to_vec();
    let data = [a.clone(), b.clone()].concat();
    let good = manifest_for(
        &key,
        vec![
            raw_entry("kernel", 0, &a),
            raw_entry("initrd", a.len() as u64, &b),
        ],
    );

    // The control: the hand-made bundle is good as it is.
    let bytes = hand_made(&serde_json::to_vec(&good).unwrap(), &key, &data);
    let bundle = open_hand_made(dir.path(), &bytes, &key).unwrap();
    bundle.verify_payloads(&mut |_, _| {}).unwrap();
    assert_eq!(read_payload(&bundle, "initrd").unwrap(), b);

    type Edit = fn(&mut Manifest);
    let edits: [(&str, Edit); 14] = [
        ("format", |m| m.format = FORMAT + 1),
        ("empty compatible", |m| m.compatible.clear()),
        ("version", |m| m.version = "1.4".into()),
        ("key id", |m| m.key_id = "0011223344556677".into()),
        ("no payloads", |m| m.payloads.clear()),
        ("duplicate name", |m| m.payloads[1].name = "kernel".into()),
        ("empty name", |m| m.payloads[0].name.clear()),
        ("gap", |m| m.payloads[1].offset += 1),
        ("overlap", |m| m.payloads[1].offset -= 1),
        ("first not at 0", |m| m.payloads[0].offset = 1),
        ("uppercase digest", |m| {
            let p = &mut m.payloads[0];
            p.blake3 = p.blake3.to_uppercase();
            p.raw_blake3 = p.blake3.clone();
        }),
        ("short raw digest", |m| {
            m.payloads[1].encoding = Encoding::Zstd;
            m.payloads[1].raw_blake3.pop();
        }),
        ("raw sizes differ", |m| m.payloads[0].raw_size += 1),
        ("raw digests differ", |m| {
            m.payloads[0].raw_blake3 = hex_digest(b"something else")
        }),
    ];
    for (what, edit) in edits {
        let mut m = good.clone();
        edit(&mut m);
        let bytes = hand_made(&serde_json::to_vec(&m).unwrap(), &key, &data);
        match open_hand_made(dir.path(), &bytes, &key) {
            Err(BundleError::BadManifest { .. }) => {}
            other => panic!("{what}: expected BadManifest, got {other:?}"),
        }
    }

    // Not JSON, not UTF-8, an unknown field, a missing field: parse errors, after the signature.
    let json = String::from_utf8(serde_json::to_vec(&good).unwrap()).unwrap();
    let unknown = json.replacen("{", "{\"extra\":1,", 1);
    let missing = json.replacen("\"format\":1,", "", 1);
    assert_ne!(missing, json);
    for manifest in [
        &b"not json"[..],
        b"\xff\xfe{}",
        unknown.as_bytes(),
        missing.as_bytes(),
    ] {
        let bytes = hand_made(manifest, &key, &data);
        match open_hand_made(dir.path(), &bytes, &key) {
            Err(BundleError::BadManifest { .. }) => {}
            other => panic!(
                "{:?}: expected BadManifest, got {other:?}",
                String::from_utf8_lossy(manifest)
            ),
        }
    }
}

#[test]
fn payload_sizes_beyond_the_file_are_refused() {
    let dir = TempDir::new().unwrap();
    let key = key(5);
    let a = b"abc".to_vec();
    // Overflowing sizes.
    let mut m = manifest_for(&key, vec![raw_entry("a", 0, &a), raw_entry("b", 3, &a)]);
    m.payloads[0].size = u64::MAX;
    m.payloads[0].raw_size = u64::MAX;
    m.payloads[1].offset = u64::MAX;
    let bytes = hand_made(&serde_json::to_vec(&m).unwrap(), &key, &a);
    let err = open_hand_made(dir.path(), &bytes, &key).unwrap_err();
    assert!(matches!(err, BundleError::BadManifest { .. }), "{err:?}");
    // A size past the end of the file.
    let mut m = manifest_for(&key, vec![raw_entry("a", 0, &a)]);
    m.payloads[0].size = 1 << 40;
    m.payloads[0].raw_size = 1 << 40;
    let bytes = hand_made(&serde_json::to_vec(&m).unwrap(), &key, &a);
    let err = open_hand_made(dir.path(), &bytes, &key).unwrap_err();
    assert!(matches!(err, BundleError::Truncated { .. }), "{err:?}");
}

// ---- hostile compressed payloads (validly signed) ----

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// Opens a hand-made bundle with one zstd payload `stored` described by `entry`.
fn open_one_zstd(dir: &Path, key: &LedgerKey, entry: PayloadEntry, stored: &[u8]) -> Bundle {
    let m = manifest_for(key, vec![entry]);
    let bytes = hand_made(&serde_json::to_vec(&m).unwrap(), key, stored);
    open_hand_made(dir, &bytes, key).unwrap()
}

fn expect_bad_payload(bundle: &Bundle, needle: &str) {
    match bundle.verify_payloads(&mut |_, _| {}) {
        Err(BundleError::BadPayload { name, what, .. }) => {
            assert_eq!(name, "rootfs");
            assert!(what.contains(needle), "expected {needle:?} in {what:?}");
        }
        other => panic!("expected BadPayload({needle}), got {other:?}"),
    }
    let err = read_payload(bundle, "rootfs").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains(needle), "{err}");
    assert!(err.to_string().contains("rootfs"), "{err}");
}

#[test]
fn a_decompression_bomb_stops_at_the_manifest_size() {
    let dir = TempDir::new().unwrap();
    let key = key(6);
    let zeros = vec![0u8; 64 << 20];
    let stored = zstd(&zeros);
    assert!(stored.len() < 64 << 10);
    let claimed = &zeros[..1000];
    let mut entry = zstd_entry("rootfs", 0, &stored, claimed);
    entry.raw_size = claimed.len() as u64;
    let bundle = open_one_zstd(dir.path(), &key, entry, &stored);
    expect_bad_payload(&bundle, "more than the manifest's 1000 bytes");
    // A reader never hands out more than the manifest's size.
    let mut reader = bundle.payload_reader("rootfs").unwrap();
    let mut yielded = 0usize;
    let mut buf = vec![0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => panic!("bomb read to a clean end"),
            Ok(n) => yielded += n,
            Err(_) => break,
        }
    }
    assert!(yielded <= 1000, "yielded {yielded}");
}

#[test]
fn zstd_payloads_that_decode_wrong_are_refused() {
    let dir = TempDir::new().unwrap();
    let key = key(6);
    let raw = Rng::new(8).text(200_000);
    let stored = zstd(&raw);

    // Sizes right, decoded digest wrong.
    let mut entry = zstd_entry("rootfs", 0, &stored, &raw);
    entry.raw_blake3 = hex_digest(b"other");
    let bundle = open_one_zstd(dir.path(), &key, entry, &stored);
    expect_bad_payload(&bundle, "decoded digest mismatch");

    // Decodes to fewer bytes than the manifest says.
    let mut entry = zstd_entry("rootfs", 0, &stored, &raw);
    entry.raw_size += 1;
    let bundle = open_one_zstd(dir.path(), &key, entry, &stored);
    expect_bad_payload(
        &bundle,
        &format!(
            "decoded size {}, manifest says {}",
            raw.len(),
            raw.len() + 1
        ),
    );

    // Signed, stored digest right, but not zstd at all.
    let junk = Rng::new(9).bytes(5000);
    let bundle = open_one_zstd(
        dir.path(),
        &key,
        zstd_entry("rootfs", 0, &junk, &raw),
        &junk,
    );
    expect_bad_payload(&bundle, "cannot decode");

    // A frame cut short (and described as such, so the stored digest matches).
    let cut = &stored[..stored.len() / 2];
    let bundle = open_one_zstd(dir.path(), &key, zstd_entry("rootfs", 0, cut, &raw), cut);
    expect_bad_payload(&bundle, "cannot decode");

    // The control: the same payload, described correctly, is fine.
    let bundle = open_one_zstd(
        dir.path(),
        &key,
        zstd_entry("rootfs", 0, &stored, &raw),
        &stored,
    );
    bundle.verify_payloads(&mut |_, _| {}).unwrap();
    assert_eq!(read_payload(&bundle, "rootfs").unwrap(), raw);
}

// ---- writing refuses bad input ----

#[test]
fn write_bundle_refuses_bad_input_and_leaves_nothing_behind() {
    let dir = TempDir::new().unwrap();
    let key = key(7);
    let src = dir.path().join("src");
    fs::write(&src, b"payload").unwrap();
    let source = |name: &str, path: &Path| PayloadSource {
        name: name.to_string(),
        path: path.to_path_buf(),
        encoding: Encoding::Zstd,
    };
    let out = dir.path().join("out.bundle");
    let v = version("1.0.0");
    let cases: Vec<(&str, &str, Vec<PayloadSource>)> = vec![
        ("empty compatible", "", vec![source("rootfs", &src)]),
        ("no payloads", "edgelora-x86_64", vec![]),
        ("empty name", "edgelora-x86_64", vec![source("", &src)]),
        (
            "duplicate name",
            "edgelora-x86_64",
            vec![
                source("rootfs", &src),
                source("kernel", &src),
                source("rootfs", &src),
            ],
        ),
    ];
    for (what, compatible, sources) in cases {
        match write_bundle(&out, compatible, &v, &sources, &key, &mut |_, _| {}) {
            Err(BundleError::BadManifest { .. }) => {}
            other => panic!("{what}: expected BadManifest, got {other:?}"),
        }
        assert_eq!(listing(dir.path()), ["src"], "{what}");
    }
    // A missing source fails after temporary files exist: they must be gone too.
    let missing = dir.path().join("no-such-kernel");
    let sources = [source("rootfs", &src), source("kernel", &missing)];
    match write_bundle(&out, "edgelora-x86_64", &v, &sources, &key, &mut |_, _| {}) {
        Err(BundleError::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Io on the missing source, got {other:?}"),
    }
    assert_eq!(listing(dir.path()), ["src"]);
    // An output directory that does not exist.
    let nowhere = dir.path().join("nowhere").join("out.bundle");
    let err = write_bundle(
        &nowhere,
        "edgelora-x86_64",
        &v,
        &sources[..1],
        &key,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, BundleError::Io { .. }), "{err:?}");
}

// ---- keys ----

fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn fleet_key_files_sign_and_verify_bundles() {
    let dir = TempDir::new().unwrap();
    let seed = [0x5au8; 32];
    // As `edgelora-fleet init` writes them: a raw seed (0600) and a verifier line (0644), the
    // key named after the fleet.
    let fleet_key = LedgerKey::from_seed("myfleet-updates", seed).unwrap();
    let key_path = dir.path().join("update.key");
    let pub_path = dir.path().join("update.pub");
    write_mode(&key_path, &seed, 0o600);
    write_mode(
        &pub_path,
        format!("{}\n", fleet_key.public_key().to_verifier_string()).as_bytes(),
        0o644,
    );
    let signing = load_signing_key(&key_path).unwrap();
    let public = load_public_key(&pub_path).unwrap();
    assert_eq!(
        signing.public_key().to_bytes(),
        fleet_key.public_key().to_bytes()
    );
    assert_eq!(public, fleet_key.public_key());
    assert_eq!(key_id(&signing.public_key()), key_id(&public));

    let (path, _) = make_bundle(
        dir.path(),
        "u.bundle",
        &[("kernel", b"k", Encoding::Raw)],
        &signing,
    );
    let bundle = Bundle::open(&path, &public).unwrap();
    bundle.verify_payloads(&mut |_, _| {}).unwrap();
}

#[test]
fn bad_signing_key_files_are_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("update.key");
    for len in [0usize, 31, 33, 64, 100_000] {
        write_mode(&path, &vec![7u8; len], 0o600);
        match load_signing_key(&path) {
            Err(BundleError::BadKey { path: p, what }) => {
                assert_eq!(p, path);
                assert!(
                    what.contains("32") && what.contains(&len.to_string()),
                    "{len}: {what}"
                );
            }
            other => panic!("{len} bytes: expected BadKey, got {other:?}"),
        }
    }
    for mode in [0o644, 0o640, 0o604, 0o660] {
        write_mode(&path, &[7u8; 32], mode);
        match load_signing_key(&path) {
            Err(BundleError::BadKey { what, .. }) => {
                assert!(what.contains("chmod 600"), "{mode:o}: {what}")
            }
            other => panic!("mode {mode:o}: expected BadKey, got {other:?}"),
        }
    }
    write_mode(&path, &[7u8; 32], 0o400);
    load_signing_key(&path).unwrap();
    let err = load_signing_key(&dir.path().join("missing.key")).unwrap_err();
    assert!(matches!(err, BundleError::Io { .. }), "{err:?}");
}

#[test]
fn bad_public_key_files_are_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("update.pub");
    let good = key(3).public_key().to_verifier_string();
    let wrong_hash = {
        let mut parts: Vec<&str> = good.splitn(3, '+').collect();
        parts[1] = "00000000";
        parts.join("+")
    };
    let renamed = good.replacen("test-updates", "other-updates", 1);
    let cases: [&[u8]; 7] = [
        b"",
        b"\n",
        &[7u8; 32],
        b"name+12345678",
        wrong_hash.as_bytes(),
        renamed.as_bytes(),
        &[b'a'; 10_000],
    ];
    for bytes in cases {
        fs::write(&path, bytes).unwrap();
        match load_public_key(&path) {
            Err(BundleError::BadKey { path: p, .. }) => assert_eq!(p, path),
            other => panic!(
                "{:?}: expected BadKey, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }
    fs::write(&path, format!("  {good}\r\n")).unwrap();
    assert_eq!(load_public_key(&path).unwrap(), key(3).public_key());
}

#[test]
fn key_id_is_a_short_digest_of_the_key() {
    let public = key(1).public_key();
    let id = key_id(&public);
    assert_eq!(id.len(), 16);
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{id}"
    );
    assert_eq!(id, hex_digest(&public.to_bytes())[..16]);
    assert_ne!(id, key_id(&key(2).public_key()));
    // The name does not matter, only the key.
    let renamed = LedgerKey::from_seed("another-name", [1; 32]).unwrap();
    assert_eq!(id, key_id(&renamed.public_key()));
}

#[test]
fn errors_name_the_file() {
    let small = Small::new();
    let layout = small.layout();
    let kernel = small.manifest.payload("kernel").unwrap();
    let pos = layout.data_start + kernel.offset as usize;
    let bundle = small.open_with(&flip(&small.bytes, pos, 3)).unwrap();
    let err = bundle.verify_payloads(&mut |_, _| {}).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&small.path.display().to_string()), "{text}");
    assert!(text.contains("payload kernel"), "{text}");
    let err = read_payload(&bundle, "kernel").unwrap_err();
    assert!(
        err.to_string().contains(&small.path.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_read_only_bundle_opens_and_verifies() {
    // Opening needs only read access: a 0444 bundle opens and verifies.
    let small = Small::new();
    fs::set_permissions(&small.path, fs::Permissions::from_mode(0o444)).unwrap();
    let bundle = Bundle::open(&small.path, &small.public()).unwrap();
    bundle.verify_payloads(&mut |_, _| {}).unwrap();
    let mut sink = io::sink();
    io::copy(&mut bundle.payload_reader("rootfs").unwrap(), &mut sink).unwrap();
    sink.flush().unwrap();
}
