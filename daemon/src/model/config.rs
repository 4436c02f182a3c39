//! Model hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use serde_json::Value;

use super::ModelError;

/// The architectures the forward pass implements. They share one decoder layer shape (pre-norm,
/// GQA attention with RoPE, SwiGLU MLP) and differ in biases, tying and defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn from_model_type(t: &str) -> Result<Self, ModelError> {
        match t {
            "llama" => Ok(Arch::Llama),
            "mistral" => Ok(Arch::Mistral),
            "qwen2" => Ok(Arch::Qwen2),
            other => Err(ModelError::Unsupported(format!(
                "model_type {other:?} (supported: llama, mistral, qwen2)"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How rotary frequencies are derived from the base `theta`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `linear`).
    Linear {
        factor: f32,
    },
    /// Llama 3.x frequency-dependent scaling (HF `llama3`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (`attention_bias: true` on Llama).
    pub o_bias: bool,
    /// MLP projections carry a bias (`mlp_bias: true`).
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn req_usize(v: &Value, key: &str) -> Result<usize, ModelError> {
    v.get(key)
        .ok_or_else(|| ModelError::Config(format!("config.json: missing key {key:?}")))?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| {
            ModelError::Config(format!(
                "config.json: key {key:?} must be a non-negative integer"
            ))
        })
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            ModelError::Config(format!(
                "config.json: key {key:?} must be a non-negative integer"
            ))
        }),
    }
}

fn opt_f32(v: &Value, key: &str) -> Result<Option<f32>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
            ModelError::Config(format!("config.json: key {key:?} must be a number"))
        }),
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>, ModelError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_bool().map(Some).ok_or_else(|| {
            ModelError::Config(format!("config.json: key {key:?} must be true or false"))
        }),
    }
}

/// `eos_token_id` may be an integer or a list of integers.
pub fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// The KV cache's shape for this model, in pages of `page_size` tokens.
    pub fn kv_geometry(&self, page_size: usize) -> edgelora_kernels::cpu::kv::KvGeometry {
        edgelora_kernels::cpu::kv::KvGeometry {
            page_size,
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Parses a Hugging Face `config.json`. Handles both the transformers 4 (`rope_theta`,
    /// `rope_scaling`) and transformers 5 (`rope_parameters`) spellings.
    pub fn from_hf_json(v: &Value) -> Result<Self, ModelError> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::Config("config.json: missing key \"model_type\"".into()))?;
        let arch = Arch::from_model_type(model_type)?;
        let hidden_size = req_usize(v, "hidden_size")?;
        let n_heads = req_usize(v, "num_attention_heads")?;
        let n_kv_heads = opt_usize(v, "num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim =
            opt_usize(v, "head_dim")?.unwrap_or(hidden_size.checked_div(n_heads).unwrap_or(0));
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(ModelError::Unsupported(format!(
                "config.json: hidden_act {act:?} (only silu)"
            )));
        }
        let rope_params = v.get("rope_parameters").filter(|x| x.is_object());
        // transformers 5 reads rope_parameters first.
        let rope_theta = match rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            Some(t) => t as f32,
            None => opt_f32(v, "rope_theta")?.unwrap_or(10000.0),
        };
        let scaling_obj = v
            .get("rope_scaling")
            .filter(|x| x.is_object())
            .or(rope_params);
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(s) => parse_rope_scaling(s)?,
        };
        let attention_bias = opt_bool(v, "attention_bias")?.unwrap_or(false);
        // Qwen2 applies its window only with use_sliding_window (default false); Mistral always.
        let use_window = opt_bool(v, "use_sliding_window")?.unwrap_or(arch != Arch::Qwen2);
        let sliding_window = if use_window {
            opt_usize(v, "sliding_window")?
        } else {
            None
        };
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size")?,
            n_layers: req_usize(v, "num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size: req_usize(v, "vocab_size")?,
            rms_norm_eps: opt_f32(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(v, "max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(arch == Arch::Qwen2),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: attention_bias && arch != Arch::Qwen2,
            mlp_bias: opt_bool(v, "mlp_bias")?.unwrap_or(false),
            sliding_window,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids: token_id_list(v.get("eos_token_id")),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects shapes the forward pass cannot run, naming the offending key.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.hidden_size == 0
            || self.n_layers == 0
            || self.vocab_size == 0
            || self.intermediate_size == 0
        {
            return bad(
                "hidden_size, num_hidden_layers, intermediate_size and vocab_size must be positive"
                    .into(),
            );
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be positive and even",
                self.head_dim
            ));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Rotary inverse frequencies, computed in f32 the way transformers does
    /// (`1 / theta^(2i/d)`, then the scaling rule).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(s: &Value) -> Result<RopeScaling, ModelError> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f32, ModelError> {
        s.get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| {
                ModelError::Config(format!(
                    "config.json: rope scaling {kind:?} needs key {k:?}"
                ))
            })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position: num("original_max_position_embeddings")?,
        }),
        other => Err(ModelError::Unsupported(format!(
            "config.json: rope scaling type {other:?} (supported: default, linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5})
    }

    #[test]
    fn missing_key_is_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }

    #[test]
    fn head_dim_defaults_to_hidden_over_heads() {
        let c = ModelConfig::from_hf_json(&base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_unknown_types_fail() {
        let mut v = base();
        v["model_type"] = json!("qwen2");
        let c = ModelConfig::from_hf_json(&v).unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        v["model_type"] = json!("gpt_neox");
        assert!(
            ModelConfig::from_hf_json(&v)
                .unwrap_err()
                .to_string()
                .contains("gpt_neox")
        );
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut v = base();
        v["head_dim"] = json!(128);
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        let scaled = c.rope_inv_freq();
        let mut plain_cfg = c.clone();
        plain_cfg.rope_scaling = RopeScaling::None;
        let plain = plain_cfg.rope_inv_freq();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 32.0).abs() < 1e-12);
        assert!(
            scaled[40] < plain[40] && scaled[40] > plain[40] / 32.0
                || scaled[40] == plain[40] / 32.0
        );
    }
}
