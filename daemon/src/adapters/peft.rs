//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`).
//!
//! PEFT's forward is `y = W x (+ b) + scaling * B (A x)` with `scaling = lora_alpha / r`, or
//! `lora_alpha / sqrt(r)` under `use_rslora`. We keep A and B as they are (never merged into the
//! base weight, which stays INT4 and shared by every adapter in a batch). Options that change the
//! forward in ways we do not implement (DoRA, LoRA bias, fan_in_fan_out, per-module rank/alpha
//! patterns, modules_to_save) are refused with an error naming the option.

use std::path::Path;

use edgelora_kernels::cpu::lora::{AdapterBits, LoraA, LoraB};
use serde_json::Value;

use crate::model::st::TensorStore;
use crate::model::{ModelConfig, Proj};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter {adapter}: {msg}")]
    Invalid { adapter: String, msg: String },
}

/// One adapted projection: `A [r, in]`, `B [out, r]`, in f32 (exact path), and for the int8 fast
/// path A in the base weights' tiled layout ([`LoraA`]) and B as codes grouped by eight rows
/// ([`LoraB`]), so the shrink and the fused expand run on integer dot products; both int8 unless
/// the daemon was asked for int4 adapters ([`AdapterBits`]).
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub a_q: LoraA,
    pub b_q: LoraB,
}

impl LoraPair {
    /// Builds both forms from `A [rank, in]` and `B [out, rank]`, the integer one at int8.
    pub fn new(rank: usize, a: Vec<f32>, b: Vec<f32>) -> Result<Self, String> {
        Self::with_bits(rank, a, b, AdapterBits::Int8)
    }

    /// As [`LoraPair::new`], the integer form at `bits`.
    pub fn with_bits(
        rank: usize,
        a: Vec<f32>,
        b: Vec<f32>,
        bits: AdapterBits,
    ) -> Result<Self, String> {
        let inp = a.len() / rank.max(1);
        let out = b.len() / rank.max(1);
        let a_q = LoraA::quantize(&a, rank, inp, bits).map_err(|e| e.to_string())?;
        let b_q = LoraB::quantize_bits(&b, out, rank, bits).map_err(|e| e.to_string())?;
        Ok(Self {
            rank,
            a,
            b,
            a_q,
            b_q,
        })
    }

    /// Bytes the int8 path reads per use.
    pub fn nbytes_q(&self) -> usize {
        self.a_q.nbytes() + self.b_q.nbytes()
    }
}

#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub name: String,
    pub rank: usize,
    pub alpha: f32,
    pub use_rslora: bool,
    pub scaling: f32,
    /// `[layer][proj index]`.
    pub layers: Vec<[Option<LoraPair>; 7]>,
    pub targets: Vec<Proj>,
}

impl LoraAdapter {
    /// Moves the int8 path's A and B of every pair into a huge-page region
    /// ([`edgelora_kernels::cpu::mem::pack`]): a batch of distinct adapters reads thousands of
    /// short runs, and on 4 KiB pages each one costs its own TLB misses. Nothing but speed
    /// changes; small adapters stay on the heap.
    pub fn pack_pages(&mut self) {
        edgelora_kernels::cpu::mem::pack(|f| {
            for p in self.layers.iter_mut().flatten().flatten() {
                p.a_q.stores(f);
                p.b_q.stores(f);
            }
        });
    }

    pub fn get(&self, layer: usize, p: Proj) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[p.index()].as_ref())
    }

    /// Loads a PEFT folder and checks it fits `config` (ranks, targets, shapes, layer indices).
    pub fn load_peft(dir: &Path, config: &ModelConfig) -> Result<Self, AdapterError> {
        Self::load_peft_with(dir, config, AdapterBits::Int8)
    }

    /// [`LoraAdapter::load_peft`], the int8 path's forms at `bits`.
    pub fn load_peft_with(
        dir: &Path,
        config: &ModelConfig,
        bits: AdapterBits,
    ) -> Result<Self, AdapterError> {
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into());
        let err = |msg: String| AdapterError::Invalid {
            adapter: name.clone(),
            msg,
        };
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| err(format!("{}: {e}", cfg_path.display())))?;
        let cfg: Value =
            serde_json::from_str(&text).map_err(|e| err(format!("adapter_config.json: {e}")))?;
        let peft_type = cfg
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(err(format!(
                "peft_type {peft_type:?}: only LORA adapters are supported"
            )));
        }
        let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
        for k in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            if flag(k) {
                return Err(err(format!("{k}: true is not supported")));
            }
        }
        if let Some(b) = cfg.get("bias").and_then(Value::as_str)
            && b != "none"
        {
            return Err(err(format!("bias {b:?} is not supported (only \"none\")")));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if cfg
                .get(k)
                .and_then(Value::as_object)
                .is_some_and(|o| !o.is_empty())
            {
                return Err(err(format!(
                    "{k} (per-module rank or alpha) is not supported"
                )));
            }
        }
        if cfg.get("modules_to_save").is_some_and(|v| !v.is_null()) {
            return Err(err(
                "modules_to_save is not supported (the adapter would replace base weights)".into(),
            ));
        }
        let rank = cfg
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| err("missing or invalid \"r\"".into()))? as usize;
        let alpha = cfg
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| err("missing \"lora_alpha\"".into()))? as f32;
        let use_rslora = flag("use_rslora");
        let scaling = if use_rslora {
            alpha / (rank as f32).sqrt()
        } else {
            alpha / rank as f32
        };
        let listed: Option<Vec<String>> = match cfg.get("target_modules") {
            Some(Value::Array(a)) => Some(
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect(),
            ),
            _ => None, // a regex string or "all-linear": the tensors decide
        };

        let weights = dir.join("adapter_model.safetensors");
        if !weights.exists() {
            return Err(err(format!(
                "{} not found (only safetensors adapters are read)",
                weights.display()
            )));
        }
        let store = TensorStore::open_files(&[weights]).map_err(|e| err(e.to_string()))?;
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..config.n_layers).map(|_| Default::default()).collect();
        let mut names: Vec<&str> = store.names().collect();
        names.sort();
        let mut targets = Vec::new();
        for tname in names {
            let Some((layer, proj, is_a)) = parse_lora_name(tname) else {
                return Err(err(format!(
                    "tensor {tname}: not a LoRA A/B weight of a decoder projection (unsupported target)"
                )));
            };
            if layer >= config.n_layers {
                return Err(err(format!(
                    "tensor {tname}: layer {layer} but the model has {} layers",
                    config.n_layers
                )));
            }
            if let Some(l) = &listed
                && !l
                    .iter()
                    .any(|m| m == proj.hf_name() || m.ends_with(&format!(".{}", proj.hf_name())))
            {
                return Err(err(format!(
                    "tensor {tname}: {} is not in target_modules {l:?}",
                    proj.hf_name()
                )));
            }
            if !is_a {
                continue; // read with its A
            }
            let b_name = tname.replace("lora_A", "lora_B");
            let (out, inp) = proj.shape(config);
            let a = store.f32(tname, Some(&[rank, inp])).map_err(|e| {
                err(format!(
                    "{e} (rank {rank}, {} in_features {inp} for this model)",
                    proj.hf_name()
                ))
            })?;
            let b = store.f32(&b_name, Some(&[out, rank])).map_err(|e| {
                err(format!(
                    "{e} (rank {rank}, {} out_features {out} for this model)",
                    proj.hf_name()
                ))
            })?;
            layers[layer][proj.index()] = Some(LoraPair::with_bits(rank, a, b, bits).map_err(err)?);
            if !targets.contains(&proj) {
                targets.push(proj);
            }
        }
        // Every B needs its A.
        for (i, l) in layers.iter().enumerate() {
            for p in Proj::ALL {
                let b_exists = store
                    .names()
                    .any(|n| parse_lora_name(n) == Some((i, p, false)));
                if b_exists && l[p.index()].is_none() {
                    return Err(err(format!(
                        "layer {i} {}: lora_B without lora_A",
                        p.hf_name()
                    )));
                }
            }
        }
        if targets.is_empty() {
            return Err(err("no LoRA weights found".into()));
        }
        targets.sort();
        let mut adapter = Self {
            name,
            rank,
            alpha,
            use_rslora,
            scaling,
            layers,
            targets,
        };
        adapter.pack_pages();
        Ok(adapter)
    }
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` → (3, Q, true).
fn parse_lora_name(n: &str) -> Option<(usize, Proj, bool)> {
    let rest = n.split("layers.").nth(1)?;
    let mut parts = rest.split('.');
    let layer: usize = parts.next()?.parse().ok()?;
    let _block = parts.next()?; // self_attn | mlp
    let proj = Proj::from_hf_name(parts.next()?)?;
    let ab = parts.next()?;
    let is_a = match ab {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    // optional adapter name ("default") then "weight"
    let tail: Vec<&str> = parts.collect();
    if tail.last() != Some(&"weight") {
        return None;
    }
    if Proj::from_hf_name(_block).is_some() {
        return None;
    }
    Some((layer, proj, is_a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peft_tensor_names() {
        assert_eq!(
            parse_lora_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Proj::Q, true))
        );
        assert_eq!(
            parse_lora_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"),
            Some((0, Proj::Down, false))
        );
        assert_eq!(
            parse_lora_name("base_model.model.lm_head.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_lora_name("base_model.model.model.layers.0.self_attn.q_proj.weight"),
            None
        );
    }
}
