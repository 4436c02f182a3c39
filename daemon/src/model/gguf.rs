//! GGUF (versions 2 and 3) reader: metadata, the tensor directory, and conversion of tensor data
//! into the kernel weight types ([`Weight`]).
//!
//! File layout (all little-endian):
//! * header: magic `"GGUF"`, `u32` version, `u64` tensor count, `u64` metadata count;
//! * metadata: `string` key, `u32` value type, value; a `string` is a `u64` byte length plus UTF-8;
//!   an array is a `u32` element type, a `u64` count and the elements (arrays may nest);
//! * tensor infos: `string` name, `u32` n_dims, `u64` dims (`ne0` first, `ne0` contiguous), `u32`
//!   ggml type, `u64` offset relative to the data section (a multiple of the alignment);
//! * the data section starts at the first multiple of `general.alignment` (default 32) after the
//!   tensor infos.
//!
//! The file is memory-mapped and fully validated in [`GgufFile::open`] (every read bounds-checked,
//! string/array lengths capped by the bytes left, every tensor's byte range inside the file), so the
//! accessors afterwards cannot fail on malformed input and nothing here panics on a bad file.
//!
//! Conversions keep the quantized formats whenever our kernel types represent them exactly
//! (Q4_0, Q4_1, Q8_0), and dequantize exactly otherwise (Q6_K, F16, BF16). Q4_K is the one lossy
//! mapping: see [`GgufFile::load_weight`]. Dequantization formulas follow gguf-py's
//! `gguf.quants.dequantize` (what transformers' GGUF loader uses) bit for bit: f32 arithmetic,
//! unfused multiply-add, the same operand grouping.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use edgelora_kernels::{DenseMatrix, KernelError, Q4Kind, Q4Matrix, Q8Matrix, QK, Weight};
use memmap2::Mmap;

use super::gguf_blocks::{dequantize, q4_0_block, q4_1_block, q4_k_blocks, q8_0_block};
use super::gguf_reader::Reader;

/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most four dimensions.
pub(crate) const MAX_DIMS: usize = 4;
/// Nested arrays are legal but never deep in practice; the cap keeps recursion bounded.
pub(crate) const MAX_ARRAY_DEPTH: usize = 8;
/// Elements per k-quant super-block.
pub(crate) const QK_K: usize = 256;

/// Everything that can go wrong reading or converting a GGUF file. Variants name the metadata key
/// or tensor involved so that a failure on a real model file is diagnosable from the message alone.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: first bytes {found:02x?}, expected \"GGUF\" (47 47 55 46)")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {version}: this reader handles versions 2 and 3{hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error("malformed GGUF at byte {offset} while reading {what}: {problem}")]
    Malformed {
        offset: usize,
        what: String,
        problem: String,
    },
    #[error("metadata key `{key}` not found")]
    MissingKey { key: String },
    #[error("metadata key `{key}`: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("tensor `{name}` not found")]
    MissingTensor { name: String },
    #[error(
        "tensor `{name}` has ggml type {type_name} (id {type_id}), which is not supported \
         (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)"
    )]
    UnsupportedTensorType {
        name: String,
        type_id: u32,
        type_name: String,
    },
    #[error(
        "tensor `{name}` does not fit in the file: its data spans bytes {start}..{end} but the file \
         has {file_len} bytes (truncated download?)"
    )]
    TensorOutOfBounds {
        name: String,
        start: u128,
        end: u128,
        file_len: usize,
    },
    #[error("tensor `{name}`: {problem}")]
    BadTensor { name: String, problem: String },
    #[error(
        "tensor `{name}`: expected GGUF dims {expected:?} ([ne0 = cols, ne1 = rows]), found {found:?}"
    )]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("cannot un-permute Q/K rows: {rows} rows is not a multiple of 2 * n_head = {}", 2 * n_head)]
    Permute { rows: usize, n_head: usize },
    #[error("tensor `{name}`: {source}")]
    Kernel {
        name: String,
        #[source]
        source: KernelError,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tokenizer model `{model}` is not supported (supported: gpt2, llama)")]
    UnsupportedTokenizer { model: String },
}

type Result<T> = std::result::Result<T, GgufError>;

/// The ggml tensor types this reader converts.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4_K,
    Q6_K,
}

impl GgmlType {
    /// The type for a ggml type id, `None` for ids this reader does not support.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            _ => return None,
        })
    }
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4_K => 12,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }
    pub fn name(self) -> &'static str {
        type_name(self.id())
    }
    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => QK,
            Self::Q4_K | Self::Q6_K => QK_K,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q6_K => 210,
        }
    }
}

/// ggml's name for a type id (also for the ones we do not support), for error messages.
pub(crate) fn type_name(id: u32) -> &'static str {
    #[rustfmt::skip]
    const NAMES: [&str; 42] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4",
        "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",
        "NVFP4", "Q1_0",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// A short description of the value's type, for error messages.
    pub fn type_name(&self) -> String {
        match self {
            Self::U8(_) => "u8".into(),
            Self::I8(_) => "i8".into(),
            Self::U16(_) => "u16".into(),
            Self::I16(_) => "i16".into(),
            Self::U32(_) => "u32".into(),
            Self::I32(_) => "i32".into(),
            Self::F32(_) => "f32".into(),
            Self::Bool(_) => "bool".into(),
            Self::String(_) => "string".into(),
            Self::Array(v) => match v.first() {
                Some(e) => format!("array of {}", e.type_name()),
                None => "empty array".into(),
            },
            Self::U64(_) => "u64".into(),
            Self::I64(_) => "i64".into(),
            Self::F64(_) => "f64".into(),
        }
    }
    /// Any integer type, widened (so callers can range-check into the type they want).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }
    /// f32 or f64 (narrowed).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => Some(v as f32),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// `ne0` first; `ne0` is the contiguous dimension (the input features of a weight matrix).
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: usize,
    pub n_elements: usize,
    pub n_bytes: usize,
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file.
pub struct GgufFile {
    bytes: Bytes,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("len", &self.bytes.as_slice().len())
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            // Mapping an empty file fails on some platforms; report it as what it is.
            return Err(GgufError::BadMagic { found: Vec::new() });
        }
        // SAFETY: the map is read-only and we only ever read it through bounds-checked slices. The
        // one thing we cannot rule out is another process truncating or rewriting the file while it
        // is mapped; like llama.cpp, we treat model files as immutable while loaded.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(Bytes::Mapped(map))
    }

    /// Parses a GGUF image held in memory (tests, or files fetched without a filesystem).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<Self> {
        let buf = bytes.as_slice();
        if buf.len() < 4 || &buf[..4] != b"GGUF" {
            return Err(GgufError::BadMagic {
                found: buf[..buf.len().min(4)].to_vec(),
            });
        }
        let mut r = Reader { buf, pos: 4 };
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            let hint = if version == 1 {
                " (GGUF v1 used 32-bit lengths; re-convert the model)"
            } else if matches!(version.swap_bytes(), 2 | 3) {
                " (this looks like a big-endian GGUF; only little-endian files are supported)"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion { version, hint });
        }
        let n_tensors = r.count("tensor count", 24)?;
        let n_kv = r.count("metadata count", 13)?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let what = format!("value of metadata key `{key}`");
            let ty = r.u32(&what)?;
            let value = r.value(ty, &what, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(r.malformed(&what, "duplicate key".into()));
            }
            metadata.push((key, value));
        }

        let mut file = GgufFile {
            bytes: Bytes::Owned(Vec::new()),
            version,
            alignment: DEFAULT_ALIGNMENT,
            data_offset: 0,
            metadata,
            meta_index,
            tensors: Vec::with_capacity(n_tensors),
            tensor_index: HashMap::with_capacity(n_tensors),
        };
        if let Some(a) = file.get_u32_opt("general.alignment")? {
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufError::WrongType {
                    key: "general.alignment".into(),
                    expected: "a non-zero power of two",
                    found: a.to_string(),
                });
            }
            file.alignment = a as usize;
        }

        for i in 0..n_tensors {
            let info = r.tensor_info(i, file.alignment)?;
            if file.tensor_index.insert(info.name.clone(), i).is_some() {
                return Err(GgufError::BadTensor {
                    name: info.name,
                    problem: "duplicate tensor name".into(),
                });
            }
            file.tensors.push(info);
        }
        file.data_offset = r.pos.div_ceil(file.alignment) * file.alignment;

        // Every tensor's bytes must lie inside the file; report the first (in directory order) that
        // does not, which after a truncated download names where the damage starts.
        for t in &file.tensors {
            let start = file.data_offset as u128 + t.offset as u128;
            let end = start + t.n_bytes as u128;
            if end > buf.len() as u128 {
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    start,
                    end,
                    file_len: buf.len(),
                });
            }
        }
        file.bytes = bytes;
        Ok(file)
    }

    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> usize {
        self.alignment
    }
    /// Absolute byte offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }
    pub fn file_len(&self) -> usize {
        self.bytes.as_slice().len()
    }

    // ---- metadata -------------------------------------------------------------------------------

    /// All metadata in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey { key: key.into() })
    }

    /// Any integer type whose value fits in `u32` (converters disagree on u32/i32/u64 for counts).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.require(key)?;
        int_to(key, v, "an integer that fits in u32")
    }
    pub fn get_u32_opt(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|_| self.get_u32(key)).transpose()
    }
    /// Any integer type whose value fits in `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        int_to(key, v, "an integer that fits in u64")
    }
    /// f32, or f64 narrowed to f32.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f32().ok_or_else(|| wrong(key, "f32 or f64", v))
    }
    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>> {
        self.get(key).map(|_| self.get_f32(key)).transpose()
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong(key, "string", v))
    }
    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|_| self.get_str(key)).transpose()
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(wrong(key, "bool", v)),
        }
    }
    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|_| self.get_bool(key)).transpose()
    }
    fn get_array(&self, key: &str, expected: &'static str) -> Result<&[GgufValue]> {
        match self.require(key)? {
            GgufValue::Array(a) => Ok(a),
            v => Err(wrong(key, expected, v)),
        }
    }
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        const E: &str = "array of string";
        let a = self.get_array(key, E)?;
        a.iter()
            .map(|v| v.as_str().ok_or_else(|| wrong(key, E, v)))
            .collect()
    }
    /// Elements of any integer type that fit in `i32` (token types are i32 in some files, u32 in others).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        const E: &str = "array of integers that fit in i32";
        let a = self.get_array(key, E)?;
        a.iter().map(|v| int_to(key, v, E)).collect()
    }
    /// Elements of type f32 or f64 (narrowed).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        const E: &str = "array of f32";
        let a = self.get_array(key, E)?;
        a.iter()
            .map(|v| v.as_f32().ok_or_else(|| wrong(key, E, v)))
            .collect()
    }

    // ---- tensors --------------------------------------------------------------------------------

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor { name: name.into() })
    }
    /// The tensor's raw bytes (in bounds: checked when the file was opened).
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(name)?;
        let start = self.data_offset + t.offset;
        Ok(&self.bytes.as_slice()[start..start + t.n_bytes])
    }

    /// The whole tensor as f32, exactly as gguf-py's `dequantize` computes it, plus its dims
    /// (`ne0` first). For norms, biases, and checking.
    pub fn load_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.tensor_info(name)?;
        let data = dequantize(t.ggml_type, self.tensor_data(name)?);
        Ok((data, t.dims.clone()))
    }

    /// The matrix `name` as a `[rows, cols]` weight (`rows` = output features, `cols` = input
    /// features), so its GGUF dims must be `[ne0 = cols, ne1 = rows]`.
    ///
    /// * Q4_1 → [`Q4Kind::Affine`] blocks, `d`, `m` and the nibbles copied (same layout, exact).
    /// * Q4_0 → [`Q4Kind::ZeroPoint`] blocks with zero point 8 (exact).
    /// * Q8_0 → [`Q8Matrix`], blocks copied (exact).
    /// * Q4_K → [`Q4Kind::Affine`]: each 32-element sub-block gets scale `d * sc` and offset
    ///   `-(dmin * m)` computed in f32 and **rounded to f16**. This is the one lossy mapping (the
    ///   4-bit codes are kept; only the per-sub-block scale/offset lose precision to f16). If a
    ///   rounded value overflows f16 the tensor is dequantized exactly to f32 instead.
    /// * Q6_K, F16, BF16, F32 → exact f32 ([`Weight::F32`]). Q6_K is never requantized to 4 bits.
    pub fn load_weight(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let t = self.tensor_info(name)?;
        // Trailing unit dims are not significant, and a 1-D tensor is a single row.
        let mut found = t.dims.clone();
        while found.len() > 2 && found.last() == Some(&1) {
            found.pop();
        }
        if found.len() == 1 {
            found.push(1);
        }
        if found != [cols, rows] {
            return Err(GgufError::ShapeMismatch {
                name: name.into(),
                expected: vec![cols, rows],
                found: t.dims.clone(),
            });
        }
        let data = self.tensor_data(name)?;
        let kernel = |source| GgufError::Kernel {
            name: name.into(),
            source,
        };
        let q4 = |kind, blocks| {
            Q4Matrix::from_blocks(rows, cols, kind, blocks)
                .map(Weight::Q4)
                .map_err(kernel)
        };
        match t.ggml_type {
            GgmlType::Q4_1 => q4(
                Q4Kind::Affine,
                data.chunks_exact(20).map(q4_1_block).collect(),
            ),
            GgmlType::Q4_0 => q4(
                Q4Kind::ZeroPoint,
                data.chunks_exact(18).map(q4_0_block).collect(),
            ),
            GgmlType::Q8_0 => {
                let blocks = data.chunks_exact(34).map(q8_0_block).collect();
                Q8Matrix::from_blocks(rows, cols, blocks)
                    .map(Weight::Q8)
                    .map_err(kernel)
            }
            GgmlType::Q4_K => match q4_k_blocks(data) {
                Some(blocks) => q4(Q4Kind::Affine, blocks),
                None => dense(rows, cols, dequantize(t.ggml_type, data)).map_err(kernel),
            },
            GgmlType::Q6_K | GgmlType::F16 | GgmlType::BF16 | GgmlType::F32 => {
                dense(rows, cols, dequantize(t.ggml_type, data)).map_err(kernel)
            }
        }
    }
}

fn dense(rows: usize, cols: usize, data: Vec<f32>) -> std::result::Result<Weight, KernelError> {
    DenseMatrix::new(rows, cols, data).map(Weight::F32)
}

fn wrong(key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
    GgufError::WrongType {
        key: key.into(),
        expected,
        found: v.type_name(),
    }
}

fn int_to<T: TryFrom<i128>>(key: &str, v: &GgufValue, expected: &'static str) -> Result<T> {
    let found = || match v.as_i128() {
        Some(i) => format!("{} {i}", v.type_name()),
        None => v.type_name(),
    };
    v.as_i128()
        .and_then(|i| T::try_from(i).ok())
        .ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            expected,
            found: found(),
        })
}

/// Undoes llama.cpp's Q/K row permutation so that `attn_q` / `attn_k` rows are in Hugging Face
/// order, for half-split (NeoX `rotate_half`) RoPE.
///
/// `convert_hf_to_gguf` reorders each head's rows so that interleaved RoPE (pairs `2i, 2i+1`) on
/// the stored rows equals `rotate_half` RoPE (pairs `i, i + hd/2`) on the original ones:
/// GGUF row `h*hd + 2*i + j` holds HF row `h*hd + j*hd/2 + i` (`i < hd/2`, `j < 2`). Here HF row
/// `h*hd + j*hd/2 + i` is taken from GGUF row `h*hd + 2*i + j`, i.e. transformers'
/// `w.reshape(n_head, hd/2, 2, cols).swapaxes(1, 2)`. Use `n_head` = KV heads for `attn_k`.
///
/// Rows are independent (each a run of blocks for Q4/Q8), so this is a pure row reordering and is
/// exact for every weight format.
pub fn unpermute_qk(w: Weight, n_head: usize) -> Result<Weight> {
    let (rows, cols) = (w.rows(), w.cols());
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(GgufError::Permute { rows, n_head });
    }
    let hd = rows / n_head;
    let half = hd / 2;
    let src_row = |r: usize| {
        let (h, k) = (r / hd, r % hd);
        let (j, i) = (k / half, k % half);
        h * hd + 2 * i + j
    };
    let kernel = |source| GgufError::Kernel {
        name: "unpermute_qk".into(),
        source,
    };
    match w {
        Weight::Q4(m) => {
            let blocks = (0..rows).flat_map(|r| m.row_blocks(src_row(r))).collect();
            Q4Matrix::from_blocks(rows, cols, m.kind(), blocks)
                .map(Weight::Q4)
                .map_err(kernel)
        }
        Weight::Q8(m) => {
            let blocks = (0..rows).flat_map(|r| m.row_blocks(src_row(r))).collect();
            Q8Matrix::from_blocks(rows, cols, blocks)
                .map(Weight::Q8)
                .map_err(kernel)
        }
        Weight::F32(m) => {
            let data = (0..rows)
                .flat_map(|r| m.row(src_row(r)).iter().copied())
                .collect();
            dense(rows, cols, data).map_err(kernel)
        }
    }
}
