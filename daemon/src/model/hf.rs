//! Hugging Face folders: `config.json`, `*.safetensors` (sharded or not; f32, f16 or bf16),
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`; and GPTQ folders, which are
//! the same plus a `quantization_config`.

use std::path::Path;

use edgelora_kernels::{DenseMatrix, Q4Matrix, Q8Matrix, Weight};
use serde_json::Value;

use super::config::token_id_list;
use super::gptq::{self, GptqConfig};
use super::st::TensorStore;
use super::{
    LayerWeights, Linear, LoadOptions, ModelConfig, ModelError, ModelFormat, ModelWeights, Proj,
    TextTokenizer, WeightDtype,
};

pub fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Format {
        file: path.display().to_string(),
        msg: format!("invalid JSON: {e}"),
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, ModelError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Builds a projection weight from f32 values according to the load options.
pub fn make_weight(
    name: &str,
    w: Vec<f32>,
    rows: usize,
    cols: usize,
    opts: &LoadOptions,
) -> Result<Weight, ModelError> {
    Ok(match opts.dtype {
        WeightDtype::F32 => Weight::F32(
            DenseMatrix::new(rows, cols, w).map_err(|e| ModelError::tensor(name, e.to_string()))?,
        ),
        WeightDtype::Int4 => Weight::Q4(
            Q4Matrix::quantize(&w, rows, cols, opts.group_size)
                .map_err(|e| ModelError::tensor(name, e.to_string()))?,
        ),
    })
}

/// An embedding or output head: f32, or Q8_0 when the options ask for it.
pub fn embedding_weight(
    name: &str,
    w: Vec<f32>,
    rows: usize,
    cols: usize,
    opts: &LoadOptions,
) -> Result<Weight, ModelError> {
    if opts.q8_embeddings && opts.dtype == WeightDtype::Int4 {
        Ok(Weight::Q8(
            Q8Matrix::quantize(&w, rows, cols)
                .map_err(|e| ModelError::tensor(name, e.to_string()))?,
        ))
    } else {
        dense(name, w, rows, cols)
    }
}

pub fn dense(name: &str, w: Vec<f32>, rows: usize, cols: usize) -> Result<Weight, ModelError> {
    Ok(Weight::F32(
        DenseMatrix::new(rows, cols, w).map_err(|e| ModelError::tensor(name, e.to_string()))?,
    ))
}

pub fn load_folder(
    dir: &Path,
    opts: &LoadOptions,
) -> Result<(ModelConfig, ModelWeights, TextTokenizer, ModelFormat), ModelError> {
    let cfg_json = read_json(&dir.join("config.json"))?;
    let mut config = ModelConfig::from_hf_json(&cfg_json)?;
    let gen_cfg = read_json_opt(&dir.join("generation_config.json"))?;
    if let Some(g) = &gen_cfg {
        let ids = token_id_list(g.get("eos_token_id"));
        if !ids.is_empty() {
            config.eos_token_ids = ids;
        }
        if let Some(b) = g.get("bos_token_id").and_then(Value::as_u64) {
            config.bos_token_id = Some(b as u32);
        }
    }
    let qcfg = match cfg_json.get("quantization_config") {
        Some(q) => Some(q.clone()),
        None => read_json_opt(&dir.join("quantize_config.json"))?,
    };
    let gptq = qcfg.as_ref().map(GptqConfig::from_json).transpose()?;
    let format = if gptq.is_some() {
        ModelFormat::GptqFolder
    } else {
        ModelFormat::HfFolder
    };

    let store = TensorStore::open_folder(dir)?;
    let c = &config;
    let embed_name = "model.embed_tokens.weight";
    let embed = embedding_weight(
        embed_name,
        store.f32(embed_name, Some(&[c.vocab_size, c.hidden_size]))?,
        c.vocab_size,
        c.hidden_size,
        opts,
    )?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let pre = format!("model.layers.{i}");
        let norm = |n: &str| store.f32(&format!("{pre}.{n}.weight"), Some(&[c.hidden_size]));
        let mut proj = Vec::with_capacity(7);
        for p in Proj::ALL {
            let (rows, cols) = p.shape(c);
            let module = format!("{pre}.{}", p.hf_path());
            let weight = match &gptq {
                Some(g) => {
                    let q = gptq::load_q4(&store, &module, rows, cols, g)?;
                    match opts.dtype {
                        WeightDtype::Int4 => Weight::Q4(q),
                        WeightDtype::F32 => dense(&module, q.dequantize(), rows, cols)?,
                    }
                }
                None => {
                    let name = format!("{module}.weight");
                    let w = store.f32(&name, Some(&[rows, cols]))?;
                    make_weight(&name, w, rows, cols, opts)?
                }
            };
            let bias_name = format!("{module}.bias");
            let bias = if p.has_bias(c) {
                Some(store.f32(&bias_name, Some(&[rows]))?)
            } else if store.contains(&bias_name) {
                return Err(ModelError::tensor(
                    bias_name,
                    "present but the config says this projection has no bias",
                ));
            } else {
                None
            };
            proj.push(Linear { weight, bias });
        }
        let proj: [Linear; 7] = proj
            .try_into()
            .map_err(|_| ModelError::Config("projection count".into()))?;
        layers.push(LayerWeights {
            attn_norm: norm("input_layernorm")?,
            ffn_norm: norm("post_attention_layernorm")?,
            proj,
        });
    }
    let norm = store.f32("model.norm.weight", Some(&[c.hidden_size]))?;
    let lm_head = if c.tie_word_embeddings && !store.contains("lm_head.weight") {
        None
    } else {
        let w = store.f32("lm_head.weight", Some(&[c.vocab_size, c.hidden_size]))?;
        Some(embedding_weight(
            "lm_head.weight",
            w,
            c.vocab_size,
            c.hidden_size,
            opts,
        )?)
    };
    let weights = ModelWeights {
        embed,
        layers,
        norm,
        lm_head,
    };
    let tokenizer = TextTokenizer::from_hf_folder(dir, &config)?;
    Ok((config, weights, tokenizer, format))
}
