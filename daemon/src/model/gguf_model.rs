//! GGUF files as models: hyper-parameters from `{arch}.*` metadata, weights by llama.cpp's tensor
//! names, tokenizer and chat template from `tokenizer.*`.
//!
//! 4-bit tensors (Q4_0, Q4_1, Q4_K) become INT4 blocks directly; Q8_0 stays 8-bit; Q6_K and float
//! tensors are dequantized exactly, and float projections are quantized to INT4 under the default
//! dtype. Q6_K is never requantized to 4 bits.

use std::path::Path;

use edgelora_kernels::{DenseMatrix, Weight};

use super::config::{Arch, ModelConfig, RopeScaling};
use super::gguf::{GgmlType, GgufFile, unpermute_qk};
use super::gguf_tokenizer::build_tokenizer;
use super::hf::make_weight;
use super::{
    LayerWeights, Linear, LoadOptions, ModelError, ModelWeights, Proj, TextTokenizer, WeightDtype,
};

fn gguf_name(p: Proj) -> &'static str {
    match p {
        Proj::Q => "attn_q",
        Proj::K => "attn_k",
        Proj::V => "attn_v",
        Proj::O => "attn_output",
        Proj::Gate => "ffn_gate",
        Proj::Up => "ffn_up",
        Proj::Down => "ffn_down",
    }
}

pub(crate) fn config_from(f: &GgufFile) -> Result<ModelConfig, ModelError> {
    let arch_name = f.get_str("general.architecture")?.to_string();
    let arch = Arch::from_model_type(&arch_name)?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let hidden_size = f.get_u32(&key("embedding_length"))? as usize;
    let n_heads = f.get_u32(&key("attention.head_count"))? as usize;
    let n_kv_heads = f
        .get_u32_opt(&key("attention.head_count_kv"))?
        .map_or(n_heads, |v| v as usize);
    let head_dim = match f.get_u32_opt(&key("attention.key_length"))? {
        Some(v) => v as usize,
        None if n_heads > 0 => hidden_size / n_heads,
        None => 0,
    };
    if let Some(rot) = f.get_u32_opt(&key("rope.dimension_count"))?
        && rot as usize != head_dim
    {
        return Err(ModelError::Unsupported(format!(
            "{}: partial rotary embedding ({rot} of {head_dim} dims)",
            key("rope.dimension_count")
        )));
    }
    let tokens = f.get_str_array("tokenizer.ggml.tokens")?.len();
    let vocab_size = f
        .get_u32_opt(&key("vocab_size"))?
        .map_or(tokens, |v| v as usize);
    let rope_scaling = match f.get_str_opt(&key("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: f.get_f32(&key("rope.scaling.factor"))?,
        },
        Some(other) => {
            return Err(ModelError::Unsupported(format!(
                "{}: {other:?} (none or linear)",
                key("rope.scaling.type")
            )));
        }
    };
    let has_output = f.has_tensor("output.weight");
    let cfg = ModelConfig {
        arch,
        hidden_size,
        intermediate_size: f.get_u32(&key("feed_forward_length"))? as usize,
        n_layers: f.get_u32(&key("block_count"))? as usize,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: f.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: f.get_f32_opt(&key("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: f
            .get_u32_opt(&key("context_length"))?
            .map_or(4096, |v| v as usize),
        tie_word_embeddings: !has_output,
        qkv_bias: f.has_tensor("blk.0.attn_q.bias"),
        o_bias: f.has_tensor("blk.0.attn_output.bias"),
        mlp_bias: f.has_tensor("blk.0.ffn_down.bias"),
        sliding_window: None,
        bos_token_id: f.get_u32_opt("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: f
            .get_u32_opt("tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Whether llama.cpp's converter permuted Q/K rows for interleaved RoPE (it does for the llama
/// architecture; Qwen2 uses NeoX RoPE and is stored as is).
fn permuted_qk(arch: Arch) -> bool {
    matches!(arch, Arch::Llama | Arch::Mistral)
}

/// Undoes the converter's per-head row interleave on a bias vector.
fn unpermute_vec(v: Vec<f32>, n_head: usize) -> Vec<f32> {
    let hd = v.len() / n_head;
    let mut out = vec![0f32; v.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                out[h * hd + j * (hd / 2) + i] = v[h * hd + 2 * i + j];
            }
        }
    }
    out
}

fn to_dtype(
    name: &str,
    w: Weight,
    src: GgmlType,
    opts: &LoadOptions,
) -> Result<Weight, ModelError> {
    match (opts.dtype, w) {
        (WeightDtype::F32, Weight::F32(d)) => Ok(Weight::F32(d)),
        (WeightDtype::F32, w) => {
            let (rows, cols) = (w.rows(), w.cols());
            let mut data = vec![0f32; rows * cols];
            for n in 0..rows {
                w.dequantize_row(n, &mut data[n * cols..(n + 1) * cols]);
            }
            Ok(Weight::F32(
                DenseMatrix::new(rows, cols, data)
                    .map_err(|e| ModelError::tensor(name, e.to_string()))?,
            ))
        }
        // Full-precision sources are quantized at load; Q6_K (dequantized exactly) stays full precision.
        (WeightDtype::Int4, Weight::F32(d))
            if matches!(src, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) =>
        {
            make_weight(name, d.data().to_vec(), d.rows(), d.cols(), opts)
        }
        (WeightDtype::Int4, w) => Ok(w),
    }
}

pub fn load_gguf(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(ModelConfig, ModelWeights, TextTokenizer), ModelError> {
    let f = GgufFile::open(path)?;
    let mut config = config_from(&f)?;
    let c = config.clone();
    let norm = |name: &str| -> Result<Vec<f32>, ModelError> {
        let (v, _) = f.load_f32(name)?;
        if v.len() != c.hidden_size {
            return Err(ModelError::tensor(
                name,
                format!("{} values, expected {}", v.len(), c.hidden_size),
            ));
        }
        Ok(v)
    };
    let embed_src = f.tensor_info("token_embd.weight")?.ggml_type;
    let embed = f.load_weight("token_embd.weight", c.vocab_size, c.hidden_size)?;
    // The embedding is only gathered from (and read as the output head when tied): keep its format.
    let embed = if opts.dtype == WeightDtype::F32 {
        to_dtype("token_embd.weight", embed, embed_src, opts)?
    } else {
        embed
    };
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let mut proj = Vec::with_capacity(7);
        for p in Proj::ALL {
            let (rows, cols) = p.shape(&c);
            let name = format!("blk.{i}.{}.weight", gguf_name(p));
            let src = f.tensor_info(&name)?.ggml_type;
            let mut w = f.load_weight(&name, rows, cols)?;
            let heads = match p {
                Proj::Q => c.n_heads,
                _ => c.n_kv_heads,
            };
            let permuted = permuted_qk(c.arch) && matches!(p, Proj::Q | Proj::K);
            if permuted {
                w = unpermute_qk(w, heads)?;
            }
            let weight = to_dtype(&name, w, src, opts)?;
            let bias_name = format!("blk.{i}.{}.bias", gguf_name(p));
            let bias = if f.has_tensor(&bias_name) {
                let (b, _) = f.load_f32(&bias_name)?;
                if b.len() != rows {
                    return Err(ModelError::tensor(
                        bias_name,
                        format!("{} values, expected {rows}", b.len()),
                    ));
                }
                Some(if permuted { unpermute_vec(b, heads) } else { b })
            } else {
                None
            };
            proj.push(Linear { weight, bias });
        }
        let proj: [Linear; 7] = proj
            .try_into()
            .map_err(|_| ModelError::Config("projection count".into()))?;
        layers.push(LayerWeights {
            attn_norm: norm(&format!("blk.{i}.attn_norm.weight"))?,
            ffn_norm: norm(&format!("blk.{i}.ffn_norm.weight"))?,
            proj,
        });
    }
    let lm_head = if f.has_tensor("output.weight") {
        let src = f.tensor_info("output.weight")?.ggml_type;
        let w = f.load_weight("output.weight", c.vocab_size, c.hidden_size)?;
        // The output head stays at its stored precision (often Q6_K or Q8_0), never INT4.
        Some(if opts.dtype == WeightDtype::F32 {
            to_dtype("output.weight", w, src, opts)?
        } else {
            w
        })
    } else {
        None
    };
    if f.has_tensor("rope_freqs.weight") {
        return Err(ModelError::Unsupported(
            "rope_freqs.weight (per-frequency RoPE factors) in GGUF".into(),
        ));
    }
    let weights = ModelWeights {
        embed,
        layers,
        norm: norm("output_norm.weight")?,
        lm_head,
    };

    let gt = build_tokenizer(&f)?;
    for w in &gt.warnings {
        tracing::warn!("{}: {w}", path.display());
    }
    let mut eos_ids: Vec<u32> = gt.eos_id.into_iter().collect();
    if let Some(eot) = f.get_u32_opt("tokenizer.ggml.eot_token_id")?
        && !eos_ids.contains(&eot)
    {
        eos_ids.push(eot);
    }
    config.bos_token_id = gt.bos_id;
    config.eos_token_ids = eos_ids.clone();
    let tokenizer = TextTokenizer::new(
        gt.tokenizer,
        gt.bos_id,
        eos_ids,
        gt.add_bos,
        gt.chat_template.as_deref(),
    )?;
    Ok((config, weights, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_unpermute_matches_row_unpermute() {
        // Two heads of dim 4: GGUF rows [h*4 + 2i + j] hold HF rows [h*4 + j*2 + i].
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; 8];
        for h in 0..2 {
            for j in 0..2 {
                for i in 0..2 {
                    gguf[h * 4 + 2 * i + j] = hf[h * 4 + j * 2 + i];
                }
            }
        }
        assert_eq!(unpermute_vec(gguf, 2), hf);
    }
}
