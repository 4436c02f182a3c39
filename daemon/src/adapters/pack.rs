//! Adapter packs: one file per adapter (`<id>.elpack`), written once by `import` from a PEFT folder
//! and read by the registry (header and metadata only) and the residency manager (the payload).
//!
//! Layout, little-endian:
//!
//! ```text
//! 0        header (256 bytes, `Header` below; its last 32 bytes are blake3 of the first 224)
//! 256      metadata: postcard `{ tensors: [WireTensor], manifest: Manifest }` (blake3 in the header)
//! P        payload, P a multiple of 4096: every tensor 4096-aligned (offsets relative to P), layer by
//!          layer, within a layer in `Proj::ALL` order, A [rank, in] then B [out, rank], row-major,
//!          in the pack's dtype; zero padding up to the next multiple of 4096 (blake3 in the header)
//! P + len  end of file (so the file length is a multiple of 4096 too)
//! ```
//!
//! Readers check, in order: magic, version, header checksum, metadata checksum, the tensor table,
//! the base model's fingerprint, the file length; and before use the payload digest.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytemuck::{Pod, Zeroable};
use edgelora_kernels::cpu::lora::AdapterBits;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use super::peft::{LoraAdapter, LoraPair};
use crate::model::st::TensorStore;
use crate::model::{ModelConfig, Proj, RopeScaling};

pub const PACK_VERSION: u32 = 1;
pub const PACK_EXT: &str = "elpack";
pub const MAGIC: [u8; 8] = *b"ELPACK\0\0";
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 256;
/// Alignment of the payload and of every tensor in it (and of the file length).
pub const ALIGN: u64 = 4096;
/// A first read of this many bytes holds header and metadata of any but very large adapters;
/// [`head_len`] says exactly how many are needed.
pub const HEAD_HINT: usize = 4096;
/// Metadata larger than this is refused as corrupt (a 100-layer model has ~1,400 table entries,
/// a few tens of KB).
pub const MAX_META: u64 = 16 << 20;
/// Imports of sources larger than this print progress on stderr.
const LARGE_IMPORT: u64 = 16 << 20;
/// Bytes of the header covered by its checksum (all but the checksum itself).
const CHECKED_HEADER: usize = HEADER_BYTES - 32;
const FLAG_RSLORA: u32 = 1;

const _: () = assert!(
    cfg!(target_endian = "little"),
    "the pack header is read in place: little-endian hosts only"
);

/// The fixed header, read and written in place.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Header {
    magic: [u8; 8],
    version: u32,
    header_bytes: u32,
    fingerprint: [u8; 32],
    rank: u32,
    alpha: f32,
    scaling: f32,
    flags: u32,
    dtype: u32,
    n_tensors: u32,
    target_mask: u32,
    n_layers: u32,
    meta_offset: u64,
    meta_len: u64,
    payload_offset: u64,
    payload_len: u64,
    payload_digest: [u8; 32],
    file_len: u64,
    meta_digest: [u8; 32],
    reserved: [u64; 5],
    header_checksum: [u8; 32],
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);

impl Header {
    fn checksum(&self) -> [u8; 32] {
        *blake3::hash(&bytemuck::bytes_of(self)[..CHECKED_HEADER]).as_bytes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("adapter {adapter}: {}: {source}", path.display())]
    Io {
        adapter: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adapter {adapter}: not an adapter pack (bad magic)")]
    NotAPack { adapter: String },
    #[error(
        "adapter {adapter}: pack format version {found} is not supported (this build reads version {supported})"
    )]
    UnknownVersion {
        adapter: String,
        found: u32,
        supported: u32,
    },
    #[error(
        "adapter {adapter}: built for another base model (pack fingerprint {found}, this model {expected})"
    )]
    WrongBase {
        adapter: String,
        expected: String,
        found: String,
    },
    #[error("adapter {adapter}: truncated pack ({actual} bytes, expected {expected})")]
    Truncated {
        adapter: String,
        expected: u64,
        actual: u64,
    },
    #[error("adapter {adapter}: corrupt pack (payload checksum mismatch)")]
    Digest { adapter: String },
    #[error("adapter {adapter}: corrupt pack ({msg})")]
    Corrupt { adapter: String, msg: String },
    #[error("adapter {adapter}: {msg}")]
    Invalid { adapter: String, msg: String },
}

impl PackError {
    /// A stable code for API errors and listings.
    pub fn kind(&self) -> &'static str {
        match self {
            PackError::Io { .. } => "io",
            PackError::NotAPack { .. } => "not_a_pack",
            PackError::UnknownVersion { .. } => "unknown_version",
            PackError::WrongBase { .. } => "wrong_base",
            PackError::Truncated { .. } => "truncated",
            PackError::Digest { .. } => "digest_mismatch",
            PackError::Corrupt { .. } => "corrupt",
            PackError::Invalid { .. } => "invalid",
        }
    }

    /// The adapter id (or file stem) the error is about.
    pub fn adapter(&self) -> &str {
        match self {
            PackError::Io { adapter, .. }
            | PackError::NotAPack { adapter }
            | PackError::UnknownVersion { adapter, .. }
            | PackError::WrongBase { adapter, .. }
            | PackError::Truncated { adapter, .. }
            | PackError::Digest { adapter }
            | PackError::Corrupt { adapter, .. }
            | PackError::Invalid { adapter, .. } => adapter,
        }
    }

    fn io(adapter: &str, path: &Path, source: std::io::Error) -> Self {
        PackError::Io {
            adapter: adapter.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }
    fn corrupt(adapter: &str, msg: impl Into<String>) -> Self {
        PackError::Corrupt {
            adapter: adapter.to_string(),
            msg: msg.into(),
        }
    }
    fn invalid(adapter: &str, msg: impl Into<String>) -> Self {
        PackError::Invalid {
            adapter: adapter.to_string(),
            msg: msg.into(),
        }
    }
}

/// Element type of the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PackDtype {
    F32,
    F16,
    Bf16,
}

impl PackDtype {
    pub fn code(self) -> u32 {
        match self {
            PackDtype::F32 => 0,
            PackDtype::F16 => 1,
            PackDtype::Bf16 => 2,
        }
    }
    pub fn from_code(c: u32) -> Option<Self> {
        match c {
            0 => Some(PackDtype::F32),
            1 => Some(PackDtype::F16),
            2 => Some(PackDtype::Bf16),
            _ => None,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            PackDtype::F32 => 4,
            PackDtype::F16 | PackDtype::Bf16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            PackDtype::F32 => "f32",
            PackDtype::F16 => "f16",
            PackDtype::Bf16 => "bf16",
        }
    }

    /// Appends `v` in this dtype, little-endian.
    fn encode(self, v: &[f32], out: &mut Vec<u8>) {
        match self {
            PackDtype::F32 => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            PackDtype::F16 => v
                .iter()
                .for_each(|&x| out.extend(f16::from_f32(x).to_le_bytes())),
            PackDtype::Bf16 => v
                .iter()
                .for_each(|&x| out.extend(bf16::from_f32(x).to_le_bytes())),
        }
    }

    /// Widens little-endian elements to f32 (exact).
    pub fn decode(self, b: &[u8]) -> Vec<f32> {
        match self {
            PackDtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            PackDtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            PackDtype::Bf16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

impl std::fmt::Display for PackDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PackDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(PackDtype::F32),
            "f16" => Ok(PackDtype::F16),
            "bf16" => Ok(PackDtype::Bf16),
            other => Err(format!("unknown pack dtype {other:?} (f32, f16 or bf16)")),
        }
    }
}

/// Who made the adapter and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub display_name: String,
    pub contributor: String,
    pub license: Option<String>,
    /// blake3 (hex) of the source `adapter_config.json` bytes followed by the
    /// `adapter_model.safetensors` bytes.
    pub source_digest: String,
    /// Unix seconds.
    pub created: u64,
    /// The source folder's name.
    pub source: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorKind {
    /// `A [rank, in]`
    A,
    /// `B [out, rank]`
    B,
}

/// One tensor of the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub layer: usize,
    pub proj: Proj,
    pub kind: TensorKind,
    pub rows: usize,
    pub cols: usize,
    /// Relative to the payload start; a multiple of 4096.
    pub offset: u64,
    pub bytes: u64,
}

impl TensorEntry {
    /// The tensor's bytes within the payload.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.bytes) as usize
    }
}

#[derive(Serialize, Deserialize)]
struct WireTensor {
    layer: u32,
    proj: u8,
    kind: u8,
    rows: u32,
    cols: u32,
    offset: u64,
    bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct WireMeta {
    tensors: Vec<WireTensor>,
    manifest: Manifest,
}

/// What the header and metadata say (the payload unread).
#[derive(Clone, Debug)]
pub struct PackInfo {
    pub path: PathBuf,
    pub version: u32,
    pub fingerprint: [u8; 32],
    pub rank: usize,
    pub alpha: f32,
    pub scaling: f32,
    pub use_rslora: bool,
    pub dtype: PackDtype,
    pub targets: Vec<Proj>,
    pub tensors: Vec<TensorEntry>,
    pub payload_offset: u64,
    pub payload_len: u64,
    pub payload_digest: [u8; 32],
    pub file_len: u64,
    pub manifest: Manifest,
    /// Layers of the base model the pack was made for.
    pub n_layers: usize,
}

impl PackInfo {
    pub fn id(&self) -> &str {
        &self.manifest.id
    }
    /// The payload's byte range within the file.
    pub fn payload_range(&self) -> std::ops::Range<u64> {
        self.payload_offset..self.payload_offset + self.payload_len
    }
    /// Bytes the decoded adapter's f32 A and B take.
    pub fn f32_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| (t.rows * t.cols * 4) as u64)
            .sum()
    }
}

/// What `import` is asked to do.
#[derive(Clone, Debug, Default)]
pub struct ImportRequest {
    pub id: String,
    pub contributor: String,
    pub license: Option<String>,
    pub display_name: Option<String>,
    pub replace: bool,
}

fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// The base model an adapter fits: blake3 over a canonical text of every field that decides the
/// shapes and the meaning of the projections. The same model as an HF folder, a GPTQ folder or a
/// GGUF file has the same fingerprint (quantization is not part of it).
pub fn fingerprint(c: &ModelConfig) -> [u8; 32] {
    let rope = match &c.rope_scaling {
        RopeScaling::None => "none".to_string(),
        RopeScaling::Linear { factor } => format!("linear {:08x}", factor.to_bits()),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => format!(
            "llama3 {:08x} {:08x} {:08x} {:08x}",
            factor.to_bits(),
            low_freq_factor.to_bits(),
            high_freq_factor.to_bits(),
            original_max_position.to_bits()
        ),
    };
    let text = format!(
        "edgelora base fingerprint v1\narch {}\nhidden_size {}\nintermediate_size {}\nlayers {}\n\
         heads {}\nkv_heads {}\nhead_dim {}\nvocab {}\nrope_theta {:08x}\nrope_scaling {rope}\n\
         rms_norm_eps {:08x}\nqkv_bias {}\no_bias {}\nmlp_bias {}\ntie_word_embeddings {}\n",
        c.arch.name(),
        c.hidden_size,
        c.intermediate_size,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.vocab_size,
        c.rope_theta.to_bits(),
        c.rms_norm_eps.to_bits(),
        c.qkv_bias,
        c.o_bias,
        c.mlp_bias,
        c.tie_word_embeddings,
    );
    *blake3::hash(text.as_bytes()).as_bytes()
}

/// Full hex of a fingerprint or digest.
pub fn fingerprint_hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 16 hex digits, for messages.
pub fn fingerprint_short(fp: &[u8; 32]) -> String {
    fingerprint_hex(fp)[..16].to_string()
}

/// The name to blame before the manifest is read: the file stem.
fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// How many bytes from the start of the file [`parse_info`] needs (header and metadata), from at
/// least the first [`HEADER_BYTES`]; `None` when `prefix` is too short or not a version-1 pack.
pub fn head_len(prefix: &[u8]) -> Option<usize> {
    if prefix.len() < HEADER_BYTES || prefix[..8] != MAGIC {
        return None;
    }
    let h: Header = bytemuck::pod_read_unaligned(&prefix[..HEADER_BYTES]);
    if h.version != PACK_VERSION || h.meta_len > MAX_META {
        return None;
    }
    usize::try_from(h.meta_offset.checked_add(h.meta_len)?).ok()
}

/// Reads and checks only the header and metadata (never the payload): magic, version, header
/// and metadata checksums, the tensor table, fingerprint == `expected`, and the file length on
/// disk against the header.
pub fn read_info(path: &Path, expected: &[u8; 32]) -> Result<PackInfo, PackError> {
    let (info, disk_len) = read_head(path)?;
    check_fit(&info, disk_len, expected)?;
    Ok(info)
}

/// The same checks from bytes already in memory (the head of the file, at least [`head_len`]).
pub fn parse_info(
    path: &Path,
    head: &[u8],
    file_len_on_disk: u64,
    expected: &[u8; 32],
) -> Result<PackInfo, PackError> {
    let info = parse_head(path, head, file_len_on_disk)?;
    check_fit(&info, file_len_on_disk, expected)?;
    Ok(info)
}

/// Header and metadata with their integrity checked, but not whether the pack fits a base model
/// or is complete on disk; with the file's length. (The registry lists such packs with the reason
/// they cannot be used.)
pub(crate) fn read_head(path: &Path) -> Result<(PackInfo, u64), PackError> {
    let name = stem(path);
    let io = |e| PackError::io(&name, path, e);
    let mut f = File::open(path).map_err(io)?;
    let disk_len = f.metadata().map_err(io)?.len();
    let mut head = vec![0u8; (disk_len as usize).min(HEAD_HINT)];
    f.read_exact(&mut head).map_err(io)?;
    if let Some(need) = head_len(&head)
        && need > head.len()
        && (need as u64) <= disk_len
    {
        let have = head.len();
        head.resize(need, 0);
        f.read_exact(&mut head[have..]).map_err(io)?;
    }
    Ok((parse_head(path, &head, disk_len)?, disk_len))
}

/// Fingerprint and length checks.
pub(crate) fn check_fit(
    info: &PackInfo,
    disk_len: u64,
    expected: &[u8; 32],
) -> Result<(), PackError> {
    if info.fingerprint != *expected {
        return Err(PackError::WrongBase {
            adapter: info.id().to_string(),
            expected: fingerprint_short(expected),
            found: fingerprint_short(&info.fingerprint),
        });
    }
    if disk_len < info.file_len {
        return Err(PackError::Truncated {
            adapter: info.id().to_string(),
            expected: info.file_len,
            actual: disk_len,
        });
    }
    if disk_len > info.file_len {
        return Err(PackError::corrupt(
            info.id(),
            format!(
                "{} bytes on disk, the header says {}",
                disk_len, info.file_len
            ),
        ));
    }
    Ok(())
}

fn parse_head(path: &Path, head: &[u8], disk_len: u64) -> Result<PackInfo, PackError> {
    let name = stem(path);
    let truncated = |expected: u64| PackError::Truncated {
        adapter: name.clone(),
        expected,
        actual: disk_len,
    };
    if head.len() < MAGIC.len() {
        return Err(if !head.is_empty() && MAGIC.starts_with(head) {
            truncated(HEADER_BYTES as u64)
        } else {
            PackError::NotAPack { adapter: name }
        });
    }
    if head[..8] != MAGIC {
        return Err(PackError::NotAPack { adapter: name });
    }
    if head.len() < 12 {
        return Err(truncated(HEADER_BYTES as u64));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != PACK_VERSION {
        return Err(PackError::UnknownVersion {
            adapter: name,
            found: version,
            supported: PACK_VERSION,
        });
    }
    if head.len() < HEADER_BYTES {
        return Err(if disk_len < HEADER_BYTES as u64 {
            truncated(HEADER_BYTES as u64)
        } else {
            PackError::invalid(
                &name,
                format!(
                    "{} head bytes given, the header needs {HEADER_BYTES}",
                    head.len()
                ),
            )
        });
    }
    let h: Header = bytemuck::pod_read_unaligned(&head[..HEADER_BYTES]);
    if h.checksum() != h.header_checksum {
        return Err(PackError::corrupt(&name, "header checksum mismatch"));
    }
    // The header is what was written; from here on its fields are trusted to be the writer's.
    let bad = |msg: String| Err(PackError::corrupt(&name, msg));
    if h.header_bytes as usize != HEADER_BYTES || h.meta_offset < HEADER_BYTES as u64 {
        return bad(format!(
            "header size {} / metadata offset {}",
            h.header_bytes, h.meta_offset
        ));
    }
    if h.meta_len > MAX_META {
        return bad(format!("metadata of {} bytes", h.meta_len));
    }
    let Some(meta_end) = h.meta_offset.checked_add(h.meta_len) else {
        return bad(format!("metadata offset {}", h.meta_offset));
    };
    if (head.len() as u64) < meta_end {
        return Err(if disk_len < meta_end {
            truncated(h.file_len)
        } else {
            PackError::invalid(
                &name,
                format!(
                    "{} head bytes given, header and metadata need {meta_end}",
                    head.len()
                ),
            )
        });
    }
    let meta = &head[h.meta_offset as usize..meta_end as usize];
    if *blake3::hash(meta).as_bytes() != h.meta_digest {
        return bad("metadata checksum mismatch".into());
    }
    let wire: WireMeta = postcard::from_bytes(meta)
        .map_err(|e| PackError::corrupt(&name, format!("metadata: {e}")))?;
    let Some(dtype) = PackDtype::from_code(h.dtype) else {
        return bad(format!("unknown dtype code {}", h.dtype));
    };
    if h.flags & !FLAG_RSLORA != 0 {
        return bad(format!("unknown flags {:#x}", h.flags));
    }
    if h.rank == 0 || !h.alpha.is_finite() || !h.scaling.is_finite() {
        return bad(format!(
            "rank {}, alpha {}, scaling {}",
            h.rank, h.alpha, h.scaling
        ));
    }
    if !h.payload_offset.is_multiple_of(ALIGN)
        || h.payload_offset < meta_end
        || h.payload_offset.checked_add(h.payload_len) != Some(h.file_len)
    {
        return bad(format!(
            "payload at {} of {} bytes in a file of {}",
            h.payload_offset, h.payload_len, h.file_len
        ));
    }
    if wire.tensors.len() != h.n_tensors as usize {
        return bad(format!(
            "{} tensors in the table, the header says {}",
            wire.tensors.len(),
            h.n_tensors
        ));
    }
    let tensors = check_table(&name, &wire.tensors, &h, dtype)?;
    let mut mask = 0u32;
    for t in &tensors {
        mask |= 1 << t.proj.index();
    }
    if mask != h.target_mask || mask == 0 {
        return bad(format!(
            "target mask {:#x}, the table has {mask:#x}",
            h.target_mask
        ));
    }
    if wire.manifest.id != name {
        return Err(PackError::invalid(
            &name,
            format!(
                "the file is named {}.{PACK_EXT} but its manifest says id {:?}",
                name, wire.manifest.id
            ),
        ));
    }
    Ok(PackInfo {
        path: path.to_path_buf(),
        version,
        fingerprint: h.fingerprint,
        rank: h.rank as usize,
        alpha: h.alpha,
        scaling: h.scaling,
        use_rslora: h.flags & FLAG_RSLORA != 0,
        dtype,
        targets: Proj::ALL
            .into_iter()
            .filter(|p| mask & (1 << p.index()) != 0)
            .collect(),
        tensors,
        payload_offset: h.payload_offset,
        payload_len: h.payload_len,
        payload_digest: h.payload_digest,
        file_len: h.file_len,
        manifest: wire.manifest,
        n_layers: h.n_layers as usize,
    })
}

/// The table is pairs (A, B) of one (layer, projection), in payload order, aligned, in bounds, of
/// the right byte size and rank.
fn check_table(
    name: &str,
    wire: &[WireTensor],
    h: &Header,
    dtype: PackDtype,
) -> Result<Vec<TensorEntry>, PackError> {
    let bad = |i: usize, msg: String| Err(PackError::corrupt(name, format!("tensor {i}: {msg}")));
    let mut out = Vec::with_capacity(wire.len());
    if !wire.len().is_multiple_of(2) {
        return Err(PackError::corrupt(name, "odd number of tensors"));
    }
    let mut prev_end = 0u64;
    let mut prev_key: Option<(u32, u8)> = None;
    for (i, w) in wire.iter().enumerate() {
        let Some(&proj) = Proj::ALL.get(w.proj as usize) else {
            return bad(i, format!("projection {}", w.proj));
        };
        let kind = match (w.kind, i % 2) {
            (0, 0) => TensorKind::A,
            (1, 1) => TensorKind::B,
            _ => return bad(i, format!("kind {} out of A/B order", w.kind)),
        };
        if w.layer >= h.n_layers {
            return bad(i, format!("layer {} of {}", w.layer, h.n_layers));
        }
        let key = (w.layer, w.proj);
        match kind {
            TensorKind::A => {
                if prev_key.is_some_and(|k| k >= key) {
                    return bad(i, "out of order".into());
                }
                if w.rows != h.rank {
                    return bad(i, format!("A has {} rows, rank is {}", w.rows, h.rank));
                }
            }
            TensorKind::B => {
                if prev_key != Some(key) {
                    return bad(i, "B without its A".into());
                }
                if w.cols != h.rank {
                    return bad(i, format!("B has {} columns, rank is {}", w.cols, h.rank));
                }
            }
        }
        prev_key = Some(key);
        let want = (w.rows as u64)
            .checked_mul(w.cols as u64)
            .and_then(|n| n.checked_mul(dtype.size() as u64));
        if w.rows == 0 || w.cols == 0 || want != Some(w.bytes) {
            return bad(
                i,
                format!("{} bytes for [{}, {}] {dtype}", w.bytes, w.rows, w.cols),
            );
        }
        if !w.offset.is_multiple_of(ALIGN) || w.offset < prev_end {
            return bad(i, format!("offset {}", w.offset));
        }
        let end = w.offset.checked_add(w.bytes);
        if end.is_none_or(|e| e > h.payload_len) {
            return bad(
                i,
                format!("bytes {}+{} beyond the payload", w.offset, w.bytes),
            );
        }
        prev_end = end.unwrap_or(u64::MAX);
        out.push(TensorEntry {
            layer: w.layer as usize,
            proj,
            kind,
            rows: w.rows as usize,
            cols: w.cols as usize,
            offset: w.offset,
            bytes: w.bytes,
        });
    }
    Ok(out)
}

/// Builds the runtime adapter from the whole file's bytes: length (Truncated), header unchanged
/// since `info` was read (Corrupt), payload blake3 (Digest), base fingerprint and tensor shapes
/// against `config`. The adapter's `name` is the manifest id.
pub fn decode(
    info: &PackInfo,
    file: &[u8],
    config: &ModelConfig,
) -> Result<LoraAdapter, PackError> {
    decode_with(info, file, config, AdapterBits::Int8)
}

/// [`decode`], the int8 path's forms at `bits`.
pub fn decode_with(
    info: &PackInfo,
    file: &[u8],
    config: &ModelConfig,
    bits: AdapterBits,
) -> Result<LoraAdapter, PackError> {
    let id = info.id();
    let len = file.len() as u64;
    if len < info.file_len {
        return Err(PackError::Truncated {
            adapter: id.to_string(),
            expected: info.file_len,
            actual: len,
        });
    }
    if len > info.file_len {
        return Err(PackError::corrupt(
            id,
            format!("{len} bytes, the header says {}", info.file_len),
        ));
    }
    let h: Header = bytemuck::pod_read_unaligned(&file[..HEADER_BYTES]);
    if file[..8] != MAGIC || h.header_checksum != h.checksum() {
        return Err(PackError::corrupt(id, "header checksum mismatch"));
    }
    if h.payload_digest != info.payload_digest || h.fingerprint != info.fingerprint {
        return Err(PackError::corrupt(
            id,
            "the file changed since its header was read",
        ));
    }
    decode_payload_with(
        info,
        &file[info.payload_offset as usize..info.file_len as usize],
        config,
        bits,
    )
}

/// [`decode`] from the payload bytes alone (`info.payload_range()` of the file).
pub fn decode_payload(
    info: &PackInfo,
    payload: &[u8],
    config: &ModelConfig,
) -> Result<LoraAdapter, PackError> {
    decode_payload_with(info, payload, config, AdapterBits::Int8)
}

/// [`decode_payload`], the int8 path's forms at `bits`.
pub fn decode_payload_with(
    info: &PackInfo,
    payload: &[u8],
    config: &ModelConfig,
    bits: AdapterBits,
) -> Result<LoraAdapter, PackError> {
    let id = info.id();
    if payload.len() as u64 != info.payload_len {
        return Err(PackError::Truncated {
            adapter: id.to_string(),
            expected: info.payload_len,
            actual: payload.len() as u64,
        });
    }
    let fp = fingerprint(config);
    if fp != info.fingerprint {
        return Err(PackError::WrongBase {
            adapter: id.to_string(),
            expected: fingerprint_short(&fp),
            found: fingerprint_short(&info.fingerprint),
        });
    }
    let rank = info.rank;
    let pairs: Vec<&[TensorEntry]> = info.tensors.chunks_exact(2).collect();
    for pair in &pairs {
        let (a, b) = (&pair[0], &pair[1]);
        let (out, inp) = a.proj.shape(config);
        if a.layer >= config.n_layers
            || (a.rows, a.cols) != (rank, inp)
            || (b.rows, b.cols) != (out, rank)
        {
            return Err(PackError::invalid(
                id,
                format!(
                    "layer {} {}: A [{}, {}] and B [{}, {}] do not fit this model (A [{rank}, {inp}], B [{out}, {rank}], {} layers)",
                    a.layer,
                    a.proj.hf_name(),
                    a.rows,
                    a.cols,
                    b.rows,
                    b.cols,
                    config.n_layers
                ),
            ));
        }
    }
    // The digest and the pairs' decoding (f16 → f32, the int8 forms) run side by side on the
    // cores: a cold load waits for the slowest part, not their sum. A digest mismatch discards
    // whatever was decoded.
    let decode_pair = |pair: &[TensorEntry]| -> Result<LoraPair, PackError> {
        let (a, b) = (&pair[0], &pair[1]);
        let av = info.dtype.decode(&payload[a.range()]);
        let bv = info.dtype.decode(&payload[b.range()]);
        LoraPair::with_bits(rank, av, bv, bits).map_err(|e| {
            PackError::invalid(id, format!("layer {} {}: {e}", a.layer, a.proj.hf_name()))
        })
    };
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16)
        .min(pairs.len().max(1));
    let per = pairs.len().div_ceil(workers).max(1);
    let (digest, decoded) = std::thread::scope(|sc| {
        let hash = sc.spawn(|| *blake3::hash(payload).as_bytes());
        let parts: Vec<_> = pairs
            .chunks(per)
            .map(|chunk| sc.spawn(move || chunk.iter().map(|p| decode_pair(p)).collect::<Vec<_>>()))
            .collect();
        let decoded: Vec<Result<LoraPair, PackError>> = parts
            .into_iter()
            .flat_map(|h| h.join().expect("pack decoding does not panic"))
            .collect();
        (hash.join().expect("hashing does not panic"), decoded)
    });
    if digest != info.payload_digest {
        return Err(PackError::Digest {
            adapter: id.to_string(),
        });
    }
    let mut layers: Vec<[Option<LoraPair>; 7]> =
        (0..config.n_layers).map(|_| Default::default()).collect();
    for (pair, p) in pairs.iter().zip(decoded) {
        layers[pair[0].layer][pair[0].proj.index()] = Some(p?);
    }
    let mut adapter = LoraAdapter {
        name: id.to_string(),
        rank,
        alpha: info.alpha,
        use_rslora: info.use_rslora,
        scaling: info.scaling,
        layers,
        targets: info.targets.clone(),
    };
    adapter.pack_pages();
    Ok(adapter)
}

/// Everything about a pack but its payload, before writing.
struct Plan {
    header: Header,
    meta: Vec<u8>,
    /// (layer, proj) of every pair, payload order, with the A and B entries.
    tensors: Vec<WireTensor>,
}

fn plan(
    adapter: &LoraAdapter,
    dtype: PackDtype,
    fingerprint: &[u8; 32],
    manifest: &Manifest,
) -> Result<Plan, PackError> {
    let id = manifest.id.as_str();
    super::registry::validate_id(id).map_err(|m| PackError::invalid(id, m))?;
    let rank = adapter.rank;
    if rank == 0 || rank > u32::MAX as usize {
        return Err(PackError::invalid(id, format!("rank {rank}")));
    }
    let mut tensors = Vec::new();
    let mut offset = 0u64;
    let mut mask = 0u32;
    for (layer, l) in adapter.layers.iter().enumerate() {
        for p in Proj::ALL {
            let Some(pair) = &l[p.index()] else {
                continue;
            };
            let inp = pair.a.len() / rank;
            let out = pair.b.len() / rank;
            if pair.rank != rank
                || inp == 0
                || out == 0
                || pair.a.len() != rank * inp
                || pair.b.len() != rank * out
            {
                return Err(PackError::invalid(
                    id,
                    format!(
                        "layer {layer} {}: rank {} with A of {} and B of {} values (adapter rank {rank})",
                        p.hf_name(),
                        pair.rank,
                        pair.a.len(),
                        pair.b.len()
                    ),
                ));
            }
            mask |= 1 << p.index();
            for (kind, rows, cols) in [(0u8, rank, inp), (1u8, out, rank)] {
                let bytes = (rows * cols * dtype.size()) as u64;
                tensors.push(WireTensor {
                    layer: layer as u32,
                    proj: p.index() as u8,
                    kind,
                    rows: rows as u32,
                    cols: cols as u32,
                    offset,
                    bytes,
                });
                offset = align_up(offset + bytes);
            }
        }
    }
    if tensors.is_empty() {
        return Err(PackError::invalid(id, "the adapter has no LoRA weights"));
    }
    let wire = WireMeta {
        tensors,
        manifest: manifest.clone(),
    };
    let meta = postcard::to_allocvec(&wire)
        .map_err(|e| PackError::invalid(id, format!("encoding metadata: {e}")))?;
    let meta_offset = HEADER_BYTES as u64;
    let payload_offset = align_up(meta_offset + meta.len() as u64);
    let payload_len = offset; // already aligned past the last tensor
    let header = Header {
        magic: MAGIC,
        version: PACK_VERSION,
        header_bytes: HEADER_BYTES as u32,
        fingerprint: *fingerprint,
        rank: rank as u32,
        alpha: adapter.alpha,
        scaling: adapter.scaling,
        flags: if adapter.use_rslora { FLAG_RSLORA } else { 0 },
        dtype: dtype.code(),
        n_tensors: wire.tensors.len() as u32,
        target_mask: mask,
        n_layers: adapter.layers.len() as u32,
        meta_offset,
        meta_len: meta.len() as u64,
        payload_offset,
        payload_len,
        payload_digest: [0; 32],
        file_len: payload_offset + payload_len,
        meta_digest: *blake3::hash(&meta).as_bytes(),
        reserved: [0; 5],
        header_checksum: [0; 32],
    };
    Ok(Plan {
        header,
        meta,
        tensors: wire.tensors,
    })
}

/// Writes a whole pack to `w` (positioned at 0): a zero header, the metadata, the payload streamed
/// through blake3, then the final header. Returns the file length.
fn write_to<W: Write + Seek>(
    w: &mut W,
    adapter: &LoraAdapter,
    plan: &mut Plan,
) -> std::io::Result<u64> {
    let h = &mut plan.header;
    w.write_all(&[0u8; HEADER_BYTES])?;
    w.write_all(&plan.meta)?;
    let zeros = vec![0u8; ALIGN as usize];
    let pad = (h.payload_offset - h.meta_offset - h.meta_len) as usize;
    w.write_all(&zeros[..pad])?;
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    let mut buf = Vec::new();
    let dtype = PackDtype::from_code(h.dtype).expect("planned dtype");
    for t in &plan.tensors {
        let pair = adapter.layers[t.layer as usize][t.proj as usize]
            .as_ref()
            .expect("planned pair");
        let gap = (t.offset - pos) as usize;
        hasher.update(&zeros[..gap]);
        w.write_all(&zeros[..gap])?;
        buf.clear();
        dtype.encode(if t.kind == 0 { &pair.a } else { &pair.b }, &mut buf);
        hasher.update(&buf);
        w.write_all(&buf)?;
        pos = t.offset + buf.len() as u64;
    }
    let gap = (h.payload_len - pos) as usize;
    hasher.update(&zeros[..gap]);
    w.write_all(&zeros[..gap])?;
    h.payload_digest = *hasher.finalize().as_bytes();
    h.header_checksum = h.checksum();
    w.seek(SeekFrom::Start(0))?;
    w.write_all(bytemuck::bytes_of(h))?;
    w.seek(SeekFrom::End(0))
}

/// A whole pack in memory (for tests and tools; [`write_pack`] streams to disk instead).
pub fn encode_pack(
    adapter: &LoraAdapter,
    dtype: PackDtype,
    fingerprint: &[u8; 32],
    manifest: &Manifest,
) -> Result<Vec<u8>, PackError> {
    let mut plan = plan(adapter, dtype, fingerprint, manifest)?;
    let mut cur = std::io::Cursor::new(Vec::with_capacity(plan.header.file_len as usize));
    write_to(&mut cur, adapter, &mut plan)
        .map_err(|e| PackError::io(&manifest.id, Path::new("<memory>"), e))?;
    Ok(cur.into_inner())
}

/// Writes a pack atomically (temp file in the same folder, fsync, rename, fsync the folder),
/// replacing any file at `path`. Returns the bytes written. The file must be named
/// `<manifest.id>.elpack`.
pub fn write_pack(
    path: &Path,
    adapter: &LoraAdapter,
    dtype: PackDtype,
    fingerprint: &[u8; 32],
    manifest: &Manifest,
) -> Result<u64, PackError> {
    write_pack_at(path, adapter, dtype, fingerprint, manifest, true)
}

fn write_pack_at(
    path: &Path,
    adapter: &LoraAdapter,
    dtype: PackDtype,
    fingerprint: &[u8; 32],
    manifest: &Manifest,
    replace: bool,
) -> Result<u64, PackError> {
    let id = manifest.id.as_str();
    let want = format!("{id}.{PACK_EXT}");
    if path.file_name().is_none_or(|n| *n != *want) {
        return Err(PackError::invalid(
            id,
            format!("a pack must be named {want}, not {}", path.display()),
        ));
    }
    let mut plan = plan(adapter, dtype, fingerprint, manifest)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{want}.{}.{}.tmp",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let result = (|| -> Result<u64, PackError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e| PackError::io(id, &p, e)
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let n = write_to(&mut w, adapter, &mut plan).map_err(io(&tmp))?;
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        if replace {
            std::fs::rename(&tmp, path).map_err(io(path))?;
        } else {
            // A hard link never replaces: two imports of one id cannot both win.
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&tmp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(exists(id));
                }
                Err(_) => {
                    // Filesystems without hard links: check, then rename.
                    if path.exists() {
                        return Err(exists(id));
                    }
                    std::fs::rename(&tmp, path).map_err(io(path))?;
                }
            }
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn exists(id: &str) -> PackError {
    PackError::invalid(
        id,
        "an adapter with this id already exists (remove it or ask to replace it)",
    )
}

/// The dtype every LoRA tensor of the source shares (f32, f16 or bf16), else f32.
fn source_dtype(store: &TensorStore) -> PackDtype {
    let mut seen = None;
    for n in store.names() {
        let Ok(t) = store.raw(n) else {
            return PackDtype::F32;
        };
        let d = match t.dtype {
            safetensors::Dtype::F32 => PackDtype::F32,
            safetensors::Dtype::F16 => PackDtype::F16,
            safetensors::Dtype::BF16 => PackDtype::Bf16,
            _ => return PackDtype::F32,
        };
        match seen {
            None => seen = Some(d),
            Some(s) if s != d => return PackDtype::F32,
            _ => {}
        }
    }
    seen.unwrap_or(PackDtype::F32)
}

/// Converts a PEFT folder into `<dir>/<id>.elpack` (dtype of the source when it is one of
/// f32/f16/bf16 throughout, else f32) and returns the written pack's info. Refuses an existing id
/// unless `req.replace`. Prints progress on stderr for sources over 16 MB.
pub fn import_peft(
    peft_dir: &Path,
    dir: &Path,
    req: &ImportRequest,
    config: &ModelConfig,
) -> Result<PackInfo, PackError> {
    import_peft_with(peft_dir, dir, req, config, &mut |msg| eprintln!("{msg}"))
}

/// [`import_peft`] with progress going to `progress` (called only for sources over 16 MB).
pub fn import_peft_with(
    peft_dir: &Path,
    dir: &Path,
    req: &ImportRequest,
    config: &ModelConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<PackInfo, PackError> {
    let id = req.id.as_str();
    super::registry::validate_id(id).map_err(|m| PackError::invalid(id, m))?;
    let contributor = req.contributor.trim();
    if contributor.is_empty() {
        return Err(PackError::invalid(id, "a contributor is required"));
    }
    let path = dir.join(format!("{id}.{PACK_EXT}"));
    if !req.replace && path.exists() {
        return Err(exists(id));
    }
    let cfg_path = peft_dir.join("adapter_config.json");
    let st_path = peft_dir.join("adapter_model.safetensors");
    let src_len = std::fs::metadata(&st_path).map_or(0, |m| m.len());
    let large = src_len > LARGE_IMPORT;
    let t0 = std::time::Instant::now();
    if large {
        progress(&format!(
            "importing {id}: reading {} ({:.1} MB)",
            peft_dir.display(),
            src_len as f64 / 1e6
        ));
    }
    let adapter = LoraAdapter::load_peft(peft_dir, config).map_err(|e| {
        let super::AdapterError::Invalid { msg, .. } = e;
        PackError::invalid(id, format!("{}: {msg}", peft_dir.display()))
    })?;
    let store = TensorStore::open_files(std::slice::from_ref(&st_path))
        .map_err(|e| PackError::invalid(id, e.to_string()))?;
    let dtype = source_dtype(&store);
    drop(store);
    let mut hasher = blake3::Hasher::new();
    for p in [&cfg_path, &st_path] {
        let f = File::open(p).map_err(|e| PackError::io(id, p, e))?;
        hasher
            .update_reader(f)
            .map_err(|e| PackError::io(id, p, e))?;
    }
    let manifest = Manifest {
        id: id.to_string(),
        display_name: req
            .display_name
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or(id)
            .to_string(),
        contributor: contributor.to_string(),
        license: req
            .license
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        source_digest: hasher.finalize().to_hex().to_string(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        source: peft_dir
            .canonicalize()
            .ok()
            .as_deref()
            .unwrap_or(peft_dir)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    if large {
        progress(&format!(
            "importing {id}: rank {}, {} projections, {dtype}; writing {} ({:.1}s so far)",
            adapter.rank,
            adapter.targets.len(),
            path.display(),
            t0.elapsed().as_secs_f64()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| PackError::io(id, dir, e))?;
    let fp = fingerprint(config);
    let n = write_pack_at(&path, &adapter, dtype, &fp, &manifest, req.replace)?;
    if large {
        progress(&format!(
            "importing {id}: wrote {:.1} MB in {:.1}s",
            n as f64 / 1e6,
            t0.elapsed().as_secs_f64()
        ));
    }
    read_info(&path, &fp)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::Arch;

    pub(crate) fn tiny_config() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: 64,
            intermediate_size: 96,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// A synthetic adapter on `targets`, values exactly representable in f16 and bf16 when
    /// `narrow`.
    pub(crate) fn synthetic(
        c: &ModelConfig,
        rank: usize,
        targets: &[Proj],
        seed: u32,
    ) -> LoraAdapter {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            // multiples of 1/64 in [-2, 2): exact in f16 and bf16
            ((s % 256) as f32 - 128.0) / 64.0
        };
        let layers = (0..c.n_layers)
            .map(|_| {
                let mut l: [Option<LoraPair>; 7] = Default::default();
                for &p in targets {
                    let (out, inp) = p.shape(c);
                    let a = (0..rank * inp).map(|_| next()).collect();
                    let b = (0..out * rank).map(|_| next()).collect();
                    l[p.index()] = Some(LoraPair::new(rank, a, b).unwrap());
                }
                l
            })
            .collect();
        let mut t = targets.to_vec();
        t.sort();
        LoraAdapter {
            name: "synthetic".into(),
            rank,
            alpha: 2.0 * rank as f32,
            use_rslora: false,
            scaling: 2.0,
            layers,
            targets: t,
        }
    }

    pub(crate) fn manifest(id: &str) -> Manifest {
        Manifest {
            id: id.into(),
            display_name: id.into(),
            contributor: "tests".into(),
            license: Some("Apache-2.0".into()),
            source_digest: "00".repeat(32),
            created: 1_700_000_000,
            source: "synthetic".into(),
        }
    }

    fn assert_same(a: &LoraAdapter, b: &LoraAdapter) {
        assert_eq!(a.rank, b.rank);
        assert_eq!(a.alpha.to_bits(), b.alpha.to_bits());
        assert_eq!(a.scaling.to_bits(), b.scaling.to_bits());
        assert_eq!(a.use_rslora, b.use_rslora);
        assert_eq!(a.targets, b.targets);
        assert_eq!(a.layers.len(), b.layers.len());
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            for (pa, pb) in la.iter().zip(lb) {
                match (pa, pb) {
                    (None, None) => {}
                    (Some(x), Some(y)) => {
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&x.a), bits(&y.a));
                        assert_eq!(bits(&x.b), bits(&y.b));
                    }
                    _ => panic!("pair presence differs"),
                }
            }
        }
    }

    #[test]
    fn header_is_pod_and_256_bytes() {
        assert_eq!(std::mem::size_of::<Header>(), 256);
        assert_eq!(std::mem::align_of::<Header>(), 8);
    }

    #[test]
    fn every_dtype_round_trips_bitwise_and_tensors_are_aligned() {
        let c = tiny_config();
        let fp = fingerprint(&c);
        let ad = synthetic(&c, 4, &[Proj::Q, Proj::V, Proj::Down], 7);
        for dtype in [PackDtype::F32, PackDtype::F16, PackDtype::Bf16] {
            let bytes = encode_pack(&ad, dtype, &fp, &manifest("syn")).unwrap();
            assert!((bytes.len() as u64).is_multiple_of(ALIGN));
            let path = Path::new("/x/syn.elpack");
            let info = parse_info(path, &bytes, bytes.len() as u64, &fp).unwrap();
            assert_eq!(info.dtype, dtype);
            assert_eq!(info.tensors.len(), 2 * 2 * 3);
            assert_eq!(info.payload_offset % ALIGN, 0);
            assert!(info.tensors.iter().all(|t| t.offset % ALIGN == 0));
            assert_eq!(head_len(&bytes), Some(HEADER_BYTES + info_meta_len(&bytes)));
            let back = decode(&info, &bytes, &c).unwrap();
            assert_eq!(back.name, "syn");
            assert_same(&ad, &back);
            // At int4 the same f32 values, their integer forms at four bits.
            let four = decode_with(&info, &bytes, &c, AdapterBits::Int4).unwrap();
            assert_same(&ad, &four);
            for (p8, p4) in back
                .layers
                .iter()
                .flatten()
                .zip(four.layers.iter().flatten())
            {
                let (Some(p8), Some(p4)) = (p8, p4) else {
                    assert!(p8.is_none() && p4.is_none());
                    continue;
                };
                assert_eq!(
                    (p8.a_q.bits(), p8.b_q.bits()),
                    (AdapterBits::Int8, AdapterBits::Int8)
                );
                assert_eq!(
                    (p4.a_q.bits(), p4.b_q.bits()),
                    (AdapterBits::Int4, AdapterBits::Int4)
                );
                assert!(p4.nbytes_q() < p8.nbytes_q());
            }
        }
    }

    fn info_meta_len(bytes: &[u8]) -> usize {
        let h: Header = bytemuck::pod_read_unaligned(&bytes[..HEADER_BYTES]);
        h.meta_len as usize
    }

    #[test]
    fn fingerprint_tracks_shape_fields_only() {
        let c = tiny_config();
        let fp = fingerprint(&c);
        let mut d = c.clone();
        d.max_position_embeddings = 9999;
        d.eos_token_ids = vec![3];
        assert_eq!(fingerprint(&d), fp);
        for f in [
            |c: &mut ModelConfig| c.n_layers += 1,
            |c: &mut ModelConfig| c.rope_theta = 500000.0,
            |c: &mut ModelConfig| c.qkv_bias = true,
            |c: &mut ModelConfig| c.tie_word_embeddings = true,
            |c: &mut ModelConfig| c.rms_norm_eps = 1e-6,
            |c: &mut ModelConfig| c.rope_scaling = RopeScaling::Linear { factor: 2.0 },
        ] {
            let mut d = c.clone();
            f(&mut d);
            assert_ne!(fingerprint(&d), fp);
        }
        assert_eq!(fingerprint_hex(&fp).len(), 64);
        assert_eq!(fingerprint_short(&fp).len(), 16);
    }

    #[test]
    fn refusals_name_the_adapter() {
        let c = tiny_config();
        let fp = fingerprint(&c);
        let ad = synthetic(&c, 2, &[Proj::K], 1);
        let good = encode_pack(&ad, PackDtype::F32, &fp, &manifest("refuse-me")).unwrap();
        let path = Path::new("refuse-me.elpack");
        let info = parse_info(path, &good, good.len() as u64, &fp).unwrap();
        let check = |r: Result<PackInfo, PackError>, kind: &str| {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains("refuse-me"), "{e}");
        };
        let len = good.len() as u64;
        // payload byte
        let mut b = good.clone();
        b[info.payload_offset as usize + 5] ^= 1;
        let e = decode(&info, &b, &c).unwrap_err();
        assert_eq!(e.kind(), "digest_mismatch");
        assert!(e.to_string().contains("refuse-me"));
        // truncated
        check(parse_info(path, &good, len - 1, &fp), "truncated");
        check(parse_info(path, &good[..100], 100, &fp), "truncated");
        assert_eq!(
            decode(&info, &good[..good.len() - 7], &c)
                .unwrap_err()
                .kind(),
            "truncated"
        );
        // wrong base
        check(parse_info(path, &good, len, &[9; 32]), "wrong_base");
        let mut other = c.clone();
        other.n_layers = 3;
        assert_eq!(
            decode(&info, &good, &other).unwrap_err().kind(),
            "wrong_base"
        );
        // version
        let mut b = good.clone();
        b[8] = 2;
        check(parse_info(path, &b, len, &fp), "unknown_version");
        // garbage
        check(parse_info(path, b"hello world", 11, &fp), "not_a_pack");
        check(parse_info(path, b"", 0, &fp), "not_a_pack");
        // header field, header checksum, metadata
        for at in [20, 50, 70, 90, 150, 240, HEADER_BYTES + 3] {
            let mut b = good.clone();
            b[at] ^= 0x10;
            check(parse_info(path, &b, len, &fp), "corrupt");
        }
        // file name and manifest id disagree
        let e = parse_info(Path::new("other.elpack"), &good, len, &fp).unwrap_err();
        assert_eq!(e.kind(), "invalid");
        assert!(
            e.to_string().contains("other") && e.to_string().contains("refuse-me"),
            "{e}"
        );
    }

    #[test]
    fn every_single_bit_flip_in_header_or_metadata_is_caught() {
        let c = tiny_config();
        let fp = fingerprint(&c);
        let ad = synthetic(&c, 3, &[Proj::V, Proj::Gate], 9);
        let good = encode_pack(&ad, PackDtype::Bf16, &fp, &manifest("flips")).unwrap();
        let path = Path::new("flips.elpack");
        let n = head_len(&good).unwrap();
        for at in 0..n {
            for bit in [0, 3, 7] {
                let mut b = good.clone();
                b[at] ^= 1 << bit;
                let e = parse_info(path, &b, b.len() as u64, &fp).unwrap_err();
                assert!(e.to_string().contains("flips"), "byte {at}: {e}");
            }
        }
    }

    #[test]
    fn write_pack_is_atomic_and_refuses_a_wrong_name() {
        let dir = tempfile::tempdir().unwrap();
        let c = tiny_config();
        let fp = fingerprint(&c);
        let ad = synthetic(&c, 2, &[Proj::O, Proj::Up], 3);
        let p = dir.path().join("w1.elpack");
        let n = write_pack(&p, &ad, PackDtype::F16, &fp, &manifest("w1")).unwrap();
        assert_eq!(n, std::fs::metadata(&p).unwrap().len());
        let info = read_info(&p, &fp).unwrap();
        assert_eq!(info.file_len, n);
        let bytes = std::fs::read(&p).unwrap();
        assert_same(&ad, &decode(&info, &bytes, &c).unwrap());
        // Only the pack is left in the folder.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        let e = write_pack(
            &dir.path().join("w2.elpack"),
            &ad,
            PackDtype::F32,
            &fp,
            &manifest("w1"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), "invalid");
        // No replace through the import path.
        let e = write_pack_at(&p, &ad, PackDtype::F32, &fp, &manifest("w1"), false).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A PEFT folder in f16 / bf16 keeps its dtype and decodes to what load_peft reads.
    #[test]
    fn import_keeps_a_narrow_source_dtype() {
        let c = tiny_config();
        let ad = synthetic(&c, 4, &[Proj::Q, Proj::Gate], 11);
        for (dtype, st) in [
            (PackDtype::F16, safetensors::Dtype::F16),
            (PackDtype::Bf16, safetensors::Dtype::BF16),
        ] {
            let src = tempfile::tempdir().unwrap();
            let out = tempfile::tempdir().unwrap();
            let mut tensors = Vec::new();
            for (layer, l) in ad.layers.iter().enumerate() {
                for p in Proj::ALL {
                    if let Some(pair) = &l[p.index()] {
                        let (o, i) = p.shape(&c);
                        for (ab, v, shape) in
                            [("A", &pair.a, vec![4, i]), ("B", &pair.b, vec![o, 4])]
                        {
                            let mut bytes = Vec::new();
                            dtype.encode(v, &mut bytes);
                            tensors.push((
                                format!(
                                    "base_model.model.model.layers.{layer}.{}.lora_{ab}.weight",
                                    p.hf_path()
                                ),
                                shape,
                                bytes,
                            ));
                        }
                    }
                }
            }
            let views: Vec<_> = tensors
                .iter()
                .map(|(n, s, b)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(st, s.clone(), b).unwrap(),
                    )
                })
                .collect();
            safetensors::serialize_to_file(
                views,
                None,
                &src.path().join("adapter_model.safetensors"),
            )
            .unwrap();
            std::fs::write(
                src.path().join("adapter_config.json"),
                r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","gate_proj"]}"#,
            )
            .unwrap();
            let req = ImportRequest {
                id: "narrow".into(),
                contributor: "me".into(),
                ..Default::default()
            };
            let info = import_peft(src.path(), out.path(), &req, &c).unwrap();
            assert_eq!(info.dtype, dtype);
            assert_eq!(info.manifest.contributor, "me");
            assert_eq!(info.manifest.display_name, "narrow");
            assert_eq!(info.manifest.source_digest.len(), 64);
            let bytes = std::fs::read(&info.path).unwrap();
            let back = decode(&info, &bytes, &c).unwrap();
            let peft = LoraAdapter::load_peft(src.path(), &c).unwrap();
            assert_same(&peft, &back);
            assert_same(&ad, &back);
            // A second import of the same id is refused; with replace it goes through.
            let e = import_peft(src.path(), out.path(), &req, &c).unwrap_err();
            assert!(e.to_string().contains("already exists"), "{e}");
            let req2 = ImportRequest {
                replace: true,
                ..req.clone()
            };
            import_peft(src.path(), out.path(), &req2, &c).unwrap();
        }
    }
}
