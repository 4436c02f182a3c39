//! Signed update bundles: one file a fleet operator makes with `edgelora-image bundle` and a box
//! installs with `edgelorad update apply`.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0        16 bytes  MAGIC "EDGELORA-BUNDLE1"
//! 16       4 bytes   manifest length L (1 ..= MAX_MANIFEST)
//! 20       L bytes   manifest, UTF-8 JSON (`Manifest`)
//! 20+L     64 bytes  Ed25519 signature over bytes [0, 20+L) (magic, length and manifest)
//! 84+L     payloads, concatenated; each `PayloadEntry::offset` counts from here
//! ```
//!
//! The signature covers the manifest, and the manifest carries the BLAKE3 digest and size of
//! every payload as stored (and, when compressed, of the decoded bytes), so one signature check
//! plus one streaming digest pass authenticate every byte. Nothing is trusted before the
//! signature has been checked: `Bundle::open` reads at most `20 + MAX_MANIFEST + 64` bytes
//! before it.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use edgelora_ledger::{LedgerKey, PublicKey};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 16] = b"EDGELORA-BUNDLE1";
/// Largest manifest accepted (a manifest is a few hundred bytes).
pub const MAX_MANIFEST: u32 = 1 << 20;
/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Raw,
    Zstd,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PayloadEntry {
    /// "rootfs" (an ext4 image for a root slot), "kernel", "initrd".
    pub name: String,
    /// From the start of the payload area.
    pub offset: u64,
    /// Bytes as stored in the bundle.
    pub size: u64,
    /// BLAKE3 of the stored bytes, 64 lowercase hex digits.
    pub blake3: String,
    pub encoding: Encoding,
    /// Bytes once decoded (== size for raw).
    pub raw_size: u64,
    /// BLAKE3 of the decoded bytes (== blake3 for raw).
    pub raw_blake3: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `FORMAT`.
    pub format: u32,
    /// Which boxes may install it, e.g. "edgelora-x86_64" or "edgelora-aarch64".
    pub compatible: String,
    /// Semantic version of the image, e.g. "1.4.0".
    pub version: String,
    /// Seconds since the Unix epoch when the bundle was made.
    pub created_unix: u64,
    /// `key_id` of the signing key's public half.
    pub key_id: String,
    pub payloads: Vec<PayloadEntry>,
}

impl Manifest {
    pub fn payload(&self, name: &str) -> Option<&PayloadEntry> {
        self.payloads.iter().find(|p| p.name == name)
    }
    /// The parsed `version` (validated by `Bundle::open`).
    pub fn semver(&self) -> semver::Version {
        semver::Version::parse(&self.version).expect("checked at open")
    }
}

/// Everything that can be wrong with a bundle or a key, each naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not an edgelora update bundle (bad magic)")]
    NotABundle(PathBuf),
    #[error("{path}: truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: manifest length {len} out of range (1..={MAX_MANIFEST})")]
    ManifestLength { path: PathBuf, len: u32 },
    #[error(
        "{path}: signature does not verify with the update key {key_id} (unsigned, signed by \
         another key, or altered)"
    )]
    BadSignature { path: PathBuf, key_id: String },
    #[error("{path}: manifest: {what}")]
    BadManifest { path: PathBuf, what: String },
    #[error("{path}: payload {name}: {what}")]
    BadPayload {
        path: PathBuf,
        name: String,
        what: String,
    },
    #[error("{path}: {what}")]
    BadKey { path: PathBuf, what: String },
    #[error("{0}")]
    Other(String),
}

/// Hex of the first 8 bytes of BLAKE3(public key bytes): short, stable, printed by `verify`.
pub fn key_id(key: &PublicKey) -> String {
    let digest = blake3::hash(&key.to_bytes());
    digest.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fleet's `update.key` (a raw 32-byte Ed25519 seed, as `edgelora-fleet init` writes it).
pub fn load_signing_key(path: &Path) -> Result<LedgerKey, BundleError> {
    let bad = |what: String| BundleError::BadKey {
        path: path.to_path_buf(),
        what,
    };
    let file = File::open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    // Like ssh: a signing key others can read is refused rather than used, so a leaked-looking
    // key gets noticed (and fixed) before it signs anything.
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "update signing key is readable or writable by group or others (mode {:04o}); \
             chmod 600 it",
            mode & 0o7777
        )));
    }
    // One byte more than a seed is enough to tell "too long" without reading a huge wrong file.
    let mut bytes = Vec::with_capacity(SEED_LEN + 1);
    file.take(SEED_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    let seed: [u8; SEED_LEN] = bytes.as_slice().try_into().map_err(|_| {
        let found = if bytes.len() > SEED_LEN && meta.is_file() {
            format!("{} bytes", meta.len())
        } else if bytes.len() > SEED_LEN {
            format!("more than {SEED_LEN} bytes")
        } else {
            format!("{} bytes", bytes.len())
        };
        bad(format!(
            "not an update signing key: expected a raw {SEED_LEN}-byte Ed25519 seed, found {found}"
        ))
    })?;
    LedgerKey::from_seed(SIGNING_KEY_NAME, seed).map_err(|e| bad(e.to_string()))
}

/// The fleet's `update.pub` (a note-style verifier key line, as `edgelora-fleet init` writes it).
pub fn load_public_key(path: &Path) -> Result<PublicKey, BundleError> {
    let bad = |what: String| BundleError::BadKey {
        path: path.to_path_buf(),
        what,
    };
    let file = File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    file.take(MAX_PUBLIC_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > MAX_PUBLIC_KEY_FILE {
        return Err(bad(format!(
            "not an update verifier key: longer than {MAX_PUBLIC_KEY_FILE} bytes"
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| bad("not an update verifier key: not UTF-8 text".to_string()))?;
    PublicKey::from_verifier_string(text.trim())
        .map_err(|e| bad(format!("not an update verifier key: {e}")))
}

/// One file to put in a bundle.
#[derive(Clone, Debug)]
pub struct PayloadSource {
    pub name: String,
    pub path: PathBuf,
    pub encoding: Encoding,
}

/// Writes a signed bundle to `out` (through a temporary file renamed into place, fsynced), and
/// returns its manifest. `progress(done_bytes, total_bytes)` is called as payloads are read.
pub fn write_bundle(
    out: &Path,
    compatible: &str,
    version: &semver::Version,
    sources: &[PayloadSource],
    key: &LedgerKey,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, BundleError> {
    check_sources(out, compatible, sources)?;
    // Only for progress: a source that cannot be stat'ed fails properly when it is opened.
    let total: u64 = sources
        .iter()
        .map(|s| fs::metadata(&s.path).map_or(0, |m| m.len()))
        .sum();
    // The manifest (which precedes the payloads) needs every payload's digest, and a payload
    // may be far too big for memory, so the encoded payloads go to a temporary file first.
    let mut data = TempFile::create(temp_path(out, "payloads")?)?;
    let mut payloads = Vec::with_capacity(sources.len());
    let mut offset = 0u64;
    let mut done = 0u64;
    progress(0, total);
    for source in sources {
        let mut on_read = |n: u64| {
            done += n;
            // A source that grows (or a block device, whose length reads as 0) may pass the
            // estimate; never report more done than total.
            progress(done, total.max(done));
        };
        let entry = encode_payload(source, offset, &mut data, &mut on_read)?;
        offset += entry.size;
        payloads.push(entry);
    }
    let manifest = Manifest {
        format: FORMAT,
        compatible: compatible.to_string(),
        version: version.to_string(),
        created_unix: now_unix(),
        key_id: key_id(&key.public_key()),
        payloads,
    };
    let header = signed_header(out, &manifest, key)?;
    assemble(out, &header, &mut data, offset)?;
    Ok(manifest)
}

/// An opened bundle whose signature and manifest have been checked (payloads not yet read).
#[derive(Debug)]
pub struct Bundle {
    path: PathBuf,
    manifest: Manifest,
    /// Absolute file offset of the payload area.
    data_start: u64,
    /// The file that was checked. Payloads are read from this handle (never by reopening the
    /// path) with positional reads, so a file renamed over the path cannot be swapped in and
    /// several payload readers never disturb each other's offset.
    file: Arc<File>,
}

impl Bundle {
    /// Reads the header, checks the magic, the manifest length, the signature against `key`,
    /// then parses the manifest and checks it: format, a valid semantic version, the key id,
    /// unique payload names, offsets/sizes that tile the payload area without overlap and lie
    /// inside the file (a regular file must end exactly at the last payload; a block device,
    /// whose size is rounded up, may be longer), digests well-formed, raw sizes consistent.
    pub fn open(path: &Path, key: &PublicKey) -> Result<Bundle, BundleError> {
        let file = File::open(path).map_err(io_err(path))?;
        let is_block = is_block_device(&file, path)?;
        let signed = read_signed_header(&file, path)?;
        let json = check_signature(&signed, path, key)?;
        // Only now, with the signature checked, is the manifest looked at.
        let manifest: Manifest =
            serde_json::from_slice(json).map_err(|e| BundleError::BadManifest {
                path: path.to_path_buf(),
                what: format!("not a valid manifest: {e}"),
            })?;
        let payload_bytes =
            check_manifest(&manifest, key).map_err(|what| BundleError::BadManifest {
                path: path.to_path_buf(),
                what,
            })?;
        let data_start = signed.len() as u64;
        check_file_length(&file, path, is_block, data_start, payload_bytes)?;
        Ok(Bundle {
            path: path.to_path_buf(),
            manifest,
            data_start,
            file: Arc::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Streams every payload and checks its stored digest, and for compressed payloads decodes
    /// it and checks the decoded size and digest. Nothing is written anywhere.
    /// `progress(done_bytes, total_bytes)` over stored bytes.
    pub fn verify_payloads(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), BundleError> {
        let total: u64 = self.manifest.payloads.iter().map(|p| p.size).sum();
        let mut buf = vec![0u8; CHUNK];
        let mut base = 0u64;
        progress(0, total);
        for entry in &self.manifest.payloads {
            let mut reader = self.reader_for(entry)?;
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => progress(base + reader.stored_count(), total),
                    Err(e) => return Err(self.payload_error(e)),
                }
            }
            base += entry.size;
            progress(base, total);
        }
        Ok(())
    }

    /// The decoded bytes of one payload. The reader hashes what it yields; once it reaches the
    /// end it checks the decoded size and digest (and the stored digest), and its `read` returns
    /// an `InvalidData` error instead of `Ok(0)` when they differ, so a bundle changed after
    /// `verify_payloads` cannot slip through a consumer that reads to the end.
    pub fn payload_reader(&self, name: &str) -> Result<Box<dyn Read + Send>, BundleError> {
        let Some(entry) = self.manifest.payload(name) else {
            let names: Vec<&str> = self
                .manifest
                .payloads
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            return Err(BundleError::BadPayload {
                path: self.path.clone(),
                name: name.to_string(),
                what: format!("no such payload (the bundle has: {})", names.join(", ")),
            });
        };
        Ok(Box::new(self.reader_for(entry)?))
    }

    fn reader_for(&self, entry: &PayloadEntry) -> Result<PayloadReader, BundleError> {
        // Cannot overflow: `open` checked that data_start + all sizes fits in the file.
        let start = self.data_start + entry.offset;
        let stored = StoredReader {
            file: Arc::clone(&self.file),
            pos: start,
            end: start + entry.size,
            digest: Tally::default(),
            io_failed: false,
        };
        let source = match entry.encoding {
            Encoding::Raw => Source::Raw(stored),
            Encoding::Zstd => {
                Source::Zstd(zstd::stream::read::Decoder::new(stored).map_err(io_err(&self.path))?)
            }
        };
        Ok(PayloadReader {
            path: self.path.clone(),
            decoded_digest: (entry.encoding != Encoding::Raw).then(blake3::Hasher::new),
            entry: entry.clone(),
            source,
            decoded: 0,
            state: State::Reading,
        })
    }

    /// A payload reader's failure as a `BundleError`: its own findings become `BadPayload`,
    /// anything else (a read error) stays an I/O error on the bundle.
    fn payload_error(&self, e: io::Error) -> BundleError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<PayloadError>())
        {
            Some(found) => BundleError::BadPayload {
                path: self.path.clone(),
                name: found.name.clone(),
                what: found.what.clone(),
            },
            None => BundleError::Io {
                path: self.path.clone(),
                source: e,
            },
        }
    }
}

/// magic (16) + manifest length (4).
const HEADER_LEN: usize = 20;
const SIGNATURE_LEN: usize = 64;
const SEED_LEN: usize = 32;
/// The signing key's name; Ed25519 signatures do not depend on it.
const SIGNING_KEY_NAME: &str = "edgelora-updates";
/// A verifier key line is about 80 bytes; anything much longer is some other file.
const MAX_PUBLIC_KEY_FILE: u64 = 4096;
/// Streaming buffer size: big enough for few syscalls, small enough to never matter.
const CHUNK: usize = 1 << 20;
/// zstd's default level: fast to make, and most of the gain on a filesystem image.
const ZSTD_LEVEL: i32 = 3;

fn io_err(path: &Path) -> impl Fn(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A non-empty name, lowercase hex, 64 digits: a BLAKE3 digest as the manifest writes it.
fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A running BLAKE3 digest and byte count of a stream.
#[derive(Default)]
struct Tally {
    hasher: blake3::Hasher,
    count: u64,
}

impl Tally {
    fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.count += bytes.len() as u64;
    }

    fn hex(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }
}

// ---- writing ----

/// What `write_bundle` refuses up front, so it never makes a bundle `Bundle::open` refuses.
fn check_sources(
    out: &Path,
    compatible: &str,
    sources: &[PayloadSource],
) -> Result<(), BundleError> {
    let bad = |what: String| BundleError::BadManifest {
        path: out.to_path_buf(),
        what,
    };
    if compatible.trim().is_empty() {
        return Err(bad("compatible is empty".to_string()));
    }
    if sources.is_empty() {
        return Err(bad("no payloads given".to_string()));
    }
    for (i, source) in sources.iter().enumerate() {
        if source.name.trim().is_empty() {
            return Err(bad(format!(
                "payload {} ({}) has an empty name",
                i + 1,
                source.path.display()
            )));
        }
        if sources[..i].iter().any(|s| s.name == source.name) {
            return Err(bad(format!(
                "payload name {:?} is given twice",
                source.name
            )));
        }
    }
    Ok(())
}

/// A file created next to the bundle and removed when dropped unless renamed into place, so
/// a failed or interrupted `write_bundle` leaves nothing behind.
struct TempFile {
    path: PathBuf,
    file: File,
    keep: bool,
}

impl TempFile {
    fn create(path: PathBuf) -> Result<TempFile, BundleError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(TempFile {
            path,
            file,
            keep: false,
        })
    }

    fn rename_to(&mut self, to: &Path) -> Result<(), BundleError> {
        fs::rename(&self.path, to).map_err(io_err(to))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// `.<out name>.<pid>-<seq>.<tag>` in `out`'s directory: the same filesystem, so the rename is
/// atomic, and hidden, so a half-written bundle is never mistaken for one.
fn temp_path(out: &Path, tag: &str) -> Result<PathBuf, BundleError> {
    let name = out
        .file_name()
        .ok_or_else(|| BundleError::Other(format!("{}: not a file name", out.display())))?;
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}-{seq}.{tag}", std::process::id()));
    Ok(parent_dir(out).join(tmp))
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A writer that digests and counts what it passes on: the stored bytes of a payload.
struct HashWriter<W> {
    inner: W,
    tally: Tally,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.tally.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Appends one source, encoded, to `data`, digesting the source and the stored bytes in the
/// same single pass over the source.
fn encode_payload(
    source: &PayloadSource,
    offset: u64,
    data: &mut TempFile,
    on_read: &mut dyn FnMut(u64),
) -> Result<PayloadEntry, BundleError> {
    let mut input = File::open(&source.path).map_err(io_err(&source.path))?;
    let data_path = data.path.clone();
    let mut stored = HashWriter {
        inner: &mut data.file,
        tally: Tally::default(),
    };
    let mut raw = Tally::default();
    match source.encoding {
        Encoding::Raw => pump(
            &mut input,
            &source.path,
            &mut stored,
            &data_path,
            &mut raw,
            on_read,
        )?,
        Encoding::Zstd => {
            let mut encoder = zstd::stream::write::Encoder::new(&mut stored, ZSTD_LEVEL)
                .map_err(io_err(&data_path))?;
            pump(
                &mut input,
                &source.path,
                &mut encoder,
                &data_path,
                &mut raw,
                on_read,
            )?;
            encoder.finish().map_err(io_err(&data_path))?;
        }
    }
    Ok(PayloadEntry {
        name: source.name.clone(),
        offset,
        size: stored.tally.count,
        blake3: stored.tally.hex(),
        encoding: source.encoding,
        raw_size: raw.count,
        raw_blake3: raw.hex(),
    })
}

/// Copies `input` to `out` in `CHUNK`s, digesting the source bytes into `raw`.
fn pump(
    input: &mut File,
    input_path: &Path,
    out: &mut dyn Write,
    out_path: &Path,
    raw: &mut Tally,
    on_read: &mut dyn FnMut(u64),
) -> Result<(), BundleError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(input_path)(e)),
        };
        raw.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(out_path))?;
        on_read(n as u64);
    }
}

/// Magic, manifest length, manifest and the signature over those three.
fn signed_header(out: &Path, manifest: &Manifest, key: &LedgerKey) -> Result<Vec<u8>, BundleError> {
    let json = serde_json::to_vec(manifest).map_err(|e| BundleError::BadManifest {
        path: out.to_path_buf(),
        what: format!("cannot encode: {e}"),
    })?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|len| (1..=MAX_MANIFEST).contains(len))
        .ok_or_else(|| BundleError::BadManifest {
            path: out.to_path_buf(),
            what: format!("{} bytes long, more than {MAX_MANIFEST}", json.len()),
        })?;
    let mut header = Vec::with_capacity(HEADER_LEN + json.len() + SIGNATURE_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(&json);
    let signature = key.sign(&header);
    header.extend_from_slice(&signature);
    Ok(header)
}

/// Writes header + payloads to a temporary file, fsyncs it, renames it over `out` and fsyncs
/// the directory, so `out` is either the old file or the complete new bundle.
fn assemble(
    out: &Path,
    header: &[u8],
    data: &mut TempFile,
    data_len: u64,
) -> Result<(), BundleError> {
    let mut tmp = TempFile::create(temp_path(out, "tmp")?)?;
    tmp.file.write_all(header).map_err(io_err(&tmp.path))?;
    data.file
        .seek(SeekFrom::Start(0))
        .map_err(io_err(&data.path))?;
    let copied = io::copy(&mut data.file, &mut tmp.file).map_err(io_err(&tmp.path))?;
    if copied != data_len {
        return Err(BundleError::Other(format!(
            "{}: payloads changed while the bundle was written ({copied} bytes, expected {data_len})",
            data.path.display()
        )));
    }
    tmp.file.sync_all().map_err(io_err(&tmp.path))?;
    tmp.rename_to(out)?;
    let dir = parent_dir(out);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

// ---- opening ----

/// Whether the bundle is a block device (which may be longer than the bundle); anything but
/// that or a regular file is refused before a byte is read from it.
fn is_block_device(file: &File, path: &Path) -> Result<bool, BundleError> {
    let kind = file.metadata().map_err(io_err(path))?.file_type();
    if kind.is_file() {
        Ok(false)
    } else if kind.is_block_device() {
        Ok(true)
    } else {
        Err(io_err(path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        )))
    }
}

/// Reads at `offset` until `buf` is full or the file ends; returns how many bytes were read.
fn read_full_at(file: &File, mut offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The signed bytes and the signature (`[0, 84 + L)`): checks the magic and the manifest
/// length, and reads at most `20 + MAX_MANIFEST + 64` bytes.
fn read_signed_header(file: &File, path: &Path) -> Result<Vec<u8>, BundleError> {
    let mut fixed = [0u8; HEADER_LEN];
    let got = read_full_at(file, 0, &mut fixed).map_err(io_err(path))?;
    let seen = got.min(MAGIC.len());
    if fixed[..seen] != MAGIC[..seen] {
        return Err(BundleError::NotABundle(path.to_path_buf()));
    }
    if got < HEADER_LEN {
        return Err(BundleError::Truncated {
            path: path.to_path_buf(),
            what: format!("the file ends after {got} bytes, inside the {HEADER_LEN}-byte header"),
        });
    }
    let len = u32::from_le_bytes([fixed[16], fixed[17], fixed[18], fixed[19]]);
    if !(1..=MAX_MANIFEST).contains(&len) {
        return Err(BundleError::ManifestLength {
            path: path.to_path_buf(),
            len,
        });
    }
    let rest = len as usize + SIGNATURE_LEN;
    let mut signed = vec![0u8; HEADER_LEN + rest];
    signed[..HEADER_LEN].copy_from_slice(&fixed);
    let got =
        read_full_at(file, HEADER_LEN as u64, &mut signed[HEADER_LEN..]).map_err(io_err(path))?;
    if got < rest {
        return Err(BundleError::Truncated {
            path: path.to_path_buf(),
            what: format!(
                "the file ends at byte {}, inside the {len}-byte manifest and its signature \
                 (which end at byte {})",
                HEADER_LEN + got,
                signed.len()
            ),
        });
    }
    Ok(signed)
}

/// Checks the signature over magic, length and manifest; returns the (now authentic) manifest.
fn check_signature<'a>(
    signed: &'a [u8],
    path: &Path,
    key: &PublicKey,
) -> Result<&'a [u8], BundleError> {
    let bad = || BundleError::BadSignature {
        path: path.to_path_buf(),
        key_id: key_id(key),
    };
    let (message, signature) = signed.split_last_chunk::<SIGNATURE_LEN>().ok_or_else(bad)?;
    if !key.verify(message, signature) {
        return Err(bad());
    }
    message.get(HEADER_LEN..).ok_or_else(bad)
}

/// Everything about a signed manifest that must hold before its payloads are trusted to mean
/// what they say. Returns the size of the payload area.
fn check_manifest(m: &Manifest, key: &PublicKey) -> Result<u64, String> {
    if m.format != FORMAT {
        return Err(format!(
            "format {}, this program reads format {FORMAT}",
            m.format
        ));
    }
    if m.compatible.trim().is_empty() {
        return Err("compatible is empty".to_string());
    }
    if let Err(e) = semver::Version::parse(&m.version) {
        return Err(format!(
            "version {:?} is not a semantic version: {e}",
            m.version
        ));
    }
    let expected_id = key_id(key);
    if m.key_id != expected_id {
        return Err(format!(
            "made for update key {}, but it was checked with update key {expected_id}",
            m.key_id
        ));
    }
    if m.payloads.is_empty() {
        return Err("no payloads".to_string());
    }
    let mut next = 0u64;
    for (i, p) in m.payloads.iter().enumerate() {
        check_entry(p, next)?;
        if m.payloads[..i].iter().any(|q| q.name == p.name) {
            return Err(format!("payload name {:?} appears twice", p.name));
        }
        next = next
            .checked_add(p.size)
            .ok_or_else(|| format!("payload {}: sizes overflow", p.name))?;
    }
    Ok(next)
}

/// One payload entry, which must start at `expected_offset` (right after the previous one).
fn check_entry(p: &PayloadEntry, expected_offset: u64) -> Result<(), String> {
    if p.name.trim().is_empty() {
        return Err("a payload has an empty name".to_string());
    }
    let name = &p.name;
    if p.offset != expected_offset {
        return Err(format!(
            "payload {name} starts at offset {}, expected {expected_offset} (payloads must follow \
             each other without gaps or overlap)",
            p.offset
        ));
    }
    if !is_digest(&p.blake3) {
        return Err(format!(
            "payload {name}: blake3 {:?} is not 64 lowercase hex digits",
            p.blake3
        ));
    }
    if !is_digest(&p.raw_blake3) {
        return Err(format!(
            "payload {name}: raw_blake3 {:?} is not 64 lowercase hex digits",
            p.raw_blake3
        ));
    }
    if p.encoding == Encoding::Raw && (p.raw_size != p.size || p.raw_blake3 != p.blake3) {
        return Err(format!(
            "payload {name} is raw, but its raw size/digest differ from its stored size/digest"
        ));
    }
    Ok(())
}

/// The file must hold every payload; a regular file must end right after the last one.
fn check_file_length(
    file: &File,
    path: &Path,
    is_block: bool,
    data_start: u64,
    payload_bytes: u64,
) -> Result<(), BundleError> {
    let end = data_start
        .checked_add(payload_bytes)
        .ok_or_else(|| BundleError::BadManifest {
            path: path.to_path_buf(),
            what: "payload sizes overflow".to_string(),
        })?;
    let len = if is_block {
        let mut handle = file;
        handle.seek(SeekFrom::End(0)).map_err(io_err(path))?
    } else {
        file.metadata().map_err(io_err(path))?.len()
    };
    if len < end {
        return Err(BundleError::Truncated {
            path: path.to_path_buf(),
            what: format!("the file is {len} bytes, but its payloads end at byte {end}"),
        });
    }
    if !is_block && len > end {
        return Err(BundleError::BadManifest {
            path: path.to_path_buf(),
            what: format!(
                "the payloads end at byte {end}, but the file is {len} bytes ({} bytes of \
                 trailing data)",
                len - end
            ),
        });
    }
    Ok(())
}

// ---- reading payloads ----

/// What a payload reader found wrong, carried inside its `io::Error` so `verify_payloads` can
/// turn it back into `BundleError::BadPayload`.
#[derive(Debug)]
struct PayloadError {
    path: PathBuf,
    name: String,
    what: String,
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: payload {}: {}",
            self.path.display(),
            self.name,
            self.what
        )
    }
}

impl std::error::Error for PayloadError {}

/// The stored bytes `[pos, end)` of one payload, read with positional reads from the shared
/// bundle file and digested as they are returned.
struct StoredReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
    digest: Tally,
    /// A read of the file failed: errors from here on are I/O errors, not bad data.
    io_failed: bool,
}

impl Read for StoredReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.end.saturating_sub(self.pos))
            .map_or(buf.len(), |left| left.min(buf.len()));
        if want == 0 {
            return Ok(0);
        }
        loop {
            match self.file.read_at(&mut buf[..want], self.pos) {
                Ok(n) => {
                    self.pos += n as u64;
                    self.digest.update(&buf[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.io_failed = true;
                    return Err(e);
                }
            }
        }
    }
}

/// A payload's decoded bytes: the stored bytes themselves, or what zstd makes of them.
enum Source {
    Raw(StoredReader),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<StoredReader>>),
}

impl Source {
    fn stored(&mut self) -> &mut StoredReader {
        match self {
            Source::Raw(r) => r,
            Source::Zstd(d) => d.get_mut().get_mut(),
        }
    }

    fn stored_ref(&self) -> &StoredReader {
        match self {
            Source::Raw(r) => r,
            Source::Zstd(d) => d.get_ref().get_ref(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Raw(r) => r.read(buf),
            Source::Zstd(d) => d.read(buf),
        }
    }
}

enum State {
    Reading,
    Done,
    Failed(String),
}

/// Yields a payload's decoded bytes and checks, at the end, that they and the stored bytes
/// are exactly what the signed manifest says.
struct PayloadReader {
    path: PathBuf,
    entry: PayloadEntry,
    source: Source,
    /// Bytes yielded so far.
    decoded: u64,
    /// Digest of the bytes yielded, for compressed payloads (for raw ones it is the stored one).
    decoded_digest: Option<blake3::Hasher>,
    state: State,
}

impl PayloadReader {
    fn stored_count(&self) -> u64 {
        self.source.stored_ref().digest.count
    }

    fn error(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            PayloadError {
                path: self.path.clone(),
                name: self.entry.name.clone(),
                what,
            },
        )
    }

    /// Hands out `n` freshly decoded bytes, unless they run past the manifest's size (which
    /// also stops a decompression bomb after `raw_size` bytes).
    fn take_decoded(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = bytes.len() as u64;
        if n > self.entry.raw_size - self.decoded {
            return Err(self.fail(format!(
                "decodes to more than the manifest's {} bytes",
                self.entry.raw_size
            )));
        }
        self.decoded += n;
        if let Some(h) = &mut self.decoded_digest {
            h.update(bytes);
        }
        Ok(bytes.len())
    }

    /// At the end of the decoded bytes: every check, then `Ok(0)` or the error from then on.
    fn finish(&mut self) -> io::Result<usize> {
        if let Err(e) = self.drain_stored() {
            self.state = State::Failed(format!("read failed: {e}"));
            return Err(e);
        }
        match self.stored_problem().or_else(|| self.decoded_problem()) {
            None => {
                self.state = State::Done;
                Ok(0)
            }
            Some(what) => {
                self.state = State::Failed(what.clone());
                Err(self.error(what))
            }
        }
    }

    /// Fails with `what`, unless the stored bytes are themselves wrong: that is the real cause
    /// (altered or truncated bytes are what make a good frame undecodable or too long).
    fn fail(&mut self, what: String) -> io::Error {
        let what = match self.drain_stored() {
            Ok(()) => self.stored_problem().unwrap_or(what),
            Err(_) => what,
        };
        self.state = State::Failed(what.clone());
        self.error(what)
    }

    /// Reads (and digests) whatever stored bytes the decoder did not ask for.
    fn drain_stored(&mut self) -> io::Result<()> {
        let stored = self.source.stored();
        let mut buf =
            vec![0u8; CHUNK.min(usize::try_from(stored.end - stored.pos).unwrap_or(CHUNK))];
        while stored.read(&mut buf)? > 0 {}
        Ok(())
    }

    fn stored_problem(&self) -> Option<String> {
        let stored = &self.source.stored_ref().digest;
        if stored.count != self.entry.size {
            return Some(format!(
                "the stored bytes end after {} of {} bytes (file truncated after it was opened?)",
                stored.count, self.entry.size
            ));
        }
        (stored.hex() != self.entry.blake3)
            .then(|| "digest mismatch (stored bytes altered)".to_string())
    }

    fn decoded_problem(&self) -> Option<String> {
        if self.decoded != self.entry.raw_size {
            return Some(format!(
                "decoded size {}, manifest says {}",
                self.decoded, self.entry.raw_size
            ));
        }
        let digest = self.decoded_digest.as_ref()?.finalize().to_hex();
        (digest.as_str() != self.entry.raw_blake3)
            .then(|| "decoded digest mismatch (does not decode to the signed bytes)".to_string())
    }
}

impl Read for PayloadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.state {
            State::Reading => {}
            State::Done => return Ok(0),
            State::Failed(what) => return Err(self.error(what.clone())),
        }
        if buf.is_empty() {
            return Ok(0);
        }
        match self.source.read(buf) {
            Ok(0) => self.finish(),
            Ok(n) => self.take_decoded(&buf[..n]),
            Err(e) if self.source.stored_ref().io_failed => {
                self.state = State::Failed(format!("read failed: {e}"));
                Err(e)
            }
            Err(e) => Err(self.fail(format!("cannot decode: {e}"))),
        }
    }
}
