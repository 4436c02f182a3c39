//! Reading tensors from one or several `.safetensors` files (sharded checkpoints with
//! `model.safetensors.index.json`), memory-mapped, converted to f32 on demand.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::ModelError;

/// One mapped file.
struct Shard {
    name: String,
    map: Mmap,
}

/// The tensors of a checkpoint, by name.
pub struct TensorStore {
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: HashMap<String, usize>,
}

/// A tensor's raw view.
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl TensorStore {
    /// Opens the safetensors files of a folder: the shards listed by
    /// `model.safetensors.index.json` when present, else every `*.safetensors` file.
    pub fn open_folder(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Format {
                    file: index_path.display().to_string(),
                    msg: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Format {
                    file: index_path.display().to_string(),
                    msg: "missing \"weight_map\"".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| ModelError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(ModelError::Format {
                file: dir.display().to_string(),
                msg: "no *.safetensors files".into(),
            });
        }
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self, ModelError> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is opened read-only; checkpoints are not modified while loaded (the
            // same assumption every mmap-based loader makes).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let name = path.display().to_string();
            let st = SafeTensors::deserialize(&map).map_err(|e| ModelError::Format {
                file: name.clone(),
                msg: format!("not a valid safetensors file (truncated or damaged?): {e}"),
            })?;
            for n in st.names() {
                index.insert(n.to_string(), i);
            }
            shards.push(Shard { name, map });
        }
        Ok(Self { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, ModelError> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::tensor(name, "missing from the checkpoint"))?;
        let shard = &self.shards[i];
        let st = SafeTensors::deserialize(&shard.map).map_err(|e| ModelError::Format {
            file: shard.name.clone(),
            msg: e.to_string(),
        })?;
        let view = st
            .tensor(name)
            .map_err(|e| ModelError::tensor(name, e.to_string()))?;
        let (key, _) = self.index.get_key_value(name).expect("indexed above");
        Ok(RawTensor {
            name: key,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data(),
        })
    }

    /// A floating-point tensor as f32 with its shape checked against `want` (when given).
    pub fn f32(&self, name: &str, want: Option<&[usize]>) -> Result<Vec<f32>, ModelError> {
        let t = self.raw(name)?;
        if let Some(w) = want
            && t.shape != w
        {
            return Err(ModelError::tensor(
                name,
                format!("shape {:?}, expected {:?}", t.shape, w),
            ));
        }
        to_f32(&t)
    }
}

/// Converts F32/F16/BF16 data to f32 (exact widening).
pub fn to_f32(t: &RawTensor<'_>) -> Result<Vec<f32>, ModelError> {
    let d = t.data;
    Ok(match t.dtype {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::tensor(
                t.name,
                format!("dtype {other:?} where a float tensor is expected"),
            ));
        }
    })
}

/// Raw little-endian i32 words (GPTQ's packed tensors).
pub fn to_i32(t: &RawTensor<'_>) -> Result<Vec<u32>, ModelError> {
    if t.dtype != Dtype::I32 {
        return Err(ModelError::tensor(
            t.name,
            format!("dtype {:?}, expected I32", t.dtype),
        ));
    }
    Ok(t.data
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
