//! Models: configuration, weights, tokenizer and the loaders for Hugging Face folders, GPTQ
//! checkpoints and GGUF files. Loading validates every shape against the config and fails with an
//! error naming the tensor or key; nothing half-loaded is ever returned.

pub mod chat;
pub mod config;
pub mod gguf;
mod gguf_blocks;
pub mod gguf_model;
mod gguf_reader;
#[cfg(test)]
mod gguf_tests;
pub mod gguf_tokenizer;
#[cfg(test)]
mod gguf_tokenizer_tests;
pub mod gptq;
pub mod hf;
pub mod probe;
pub mod st;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{Arch, ModelConfig, RopeScaling};
pub use tokenizer::TextTokenizer;
pub use weights::{LayerWeights, Linear, ModelWeights, Proj};

/// Errors from loading or validating a model. Every message names the file, key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("tensor {name}: {msg}")]
    Tensor { name: String, msg: String },
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
}

impl ModelError {
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        ModelError::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How projections are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// INT4 (full-precision projections quantized at load; 4-bit sources converted directly).
    #[default]
    Int4,
    /// Full precision for checking against references: everything dequantized to f32.
    F32,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int4" | "q4" => Ok(WeightDtype::Int4),
            "f32" => Ok(WeightDtype::F32),
            other => Err(format!("unknown dtype {other:?} (int4 or f32)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: WeightDtype,
    /// INT4 group size for quantize-at-load; a multiple of 32.
    pub group_size: usize,
    /// Full-precision embedding and output head stored as Q8_0 (8-bit, as llama.cpp's converters
    /// do): a quarter of the memory, and the head joins the int8 fast path. Off for checking
    /// against float32 references; ignored under `WeightDtype::F32`.
    pub q8_embeddings: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: WeightDtype::Int4,
            group_size: 32,
            q8_embeddings: true,
        }
    }
}

impl LoadOptions {
    /// Options whose arithmetic follows the float32 references: INT4 projections (for `Int4`)
    /// but full-precision embedding and head.
    pub fn reference(dtype: WeightDtype) -> Self {
        Self {
            dtype,
            group_size: 32,
            q8_embeddings: false,
        }
    }
}

/// What kind of thing a model path points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    HfFolder,
    GptqFolder,
    Gguf,
}

/// A loaded model: hyper-parameters, weights, tokenizer.
pub struct Model {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: TextTokenizer,
    pub format: ModelFormat,
    /// A short human name (folder or file stem).
    pub name: String,
}

impl Model {
    /// Loads a Hugging Face folder, a GPTQ folder or a GGUF file, detected from the path.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model, ModelError> {
        if opts.group_size == 0 || !opts.group_size.is_multiple_of(32) {
            return Err(ModelError::Unsupported(format!(
                "INT4 group size {}: must be a positive multiple of 32",
                opts.group_size
            )));
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        let mut model = if meta.is_dir() {
            let (config, weights, tokenizer, format) = hf::load_folder(path, opts)?;
            Model {
                config,
                weights,
                tokenizer,
                format,
                name,
            }
        } else {
            let (config, weights, tokenizer) = gguf_model::load_gguf(path, opts)?;
            Model {
                config,
                weights,
                tokenizer,
                format: ModelFormat::Gguf,
                name,
            }
        };
        model.weights.validate(&model.config)?;
        let regions = model.weights.pack_pages();
        if regions.is_empty() {
            tracing::info!("weights on the heap (small, EDGELORA_HUGEPAGES=0, or no mapping)");
        } else {
            let huge = edgelora_kernels::cpu::mem::huge_bytes(regions.iter().map(|r| &**r));
            tracing::info!(
                regions = regions.len(),
                mb = regions.iter().map(|r| r.len()).sum::<usize>() as f64 / 1e6,
                huge_page_mb = huge.map(|b| b as f64 / 1e6),
                "weights packed on huge pages"
            );
        }
        Ok(model)
    }
}
