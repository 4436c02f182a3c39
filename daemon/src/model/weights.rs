//! The weights of a decoder-only transformer, in kernel formats.

use edgelora_kernels::Weight;
use edgelora_kernels::cpu::matmul::Input;

use super::{ModelConfig, ModelError};

/// The seven projections of a decoder layer, the LoRA target names of PEFT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module name in Hugging Face / PEFT checkpoints.
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
    /// The module path under `model.layers.N.`.
    pub fn hf_path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }
    pub fn from_hf_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.hf_name() == s)
    }
    pub fn index(self) -> usize {
        self as usize
    }
    /// (out_features, in_features) for a config.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Proj::Q => (c.q_dim(), c.hidden_size),
            Proj::K | Proj::V => (c.kv_dim(), c.hidden_size),
            Proj::O => (c.hidden_size, c.q_dim()),
            Proj::Gate | Proj::Up => (c.intermediate_size, c.hidden_size),
            Proj::Down => (c.hidden_size, c.intermediate_size),
        }
    }
    pub fn has_bias(self, c: &ModelConfig) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => c.qkv_bias,
            Proj::O => c.o_bias,
            _ => c.mlp_bias,
        }
    }
}

/// A projection: `y = W x (+ b)`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// `out [m, rows] = x [m, cols] W^T (+ b)`, on the fast path when the input carries int8 blocks.
    pub fn forward(&self, input: &Input<'_>, out: &mut [f32]) {
        self.weight.matmul_input(input, out);
        self.add_bias(out);
    }

    /// Adds the bias (if any) to every row of `out`.
    pub fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, &bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// Indexed by [`Proj::index`].
    pub proj: [Linear; 7],
}

impl LayerWeights {
    pub fn get(&self, p: Proj) -> &Linear {
        &self.proj[p.index()]
    }
}

#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub embed: Weight,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    /// `None`: tied to the embedding.
    pub lm_head: Option<Weight>,
}

impl ModelWeights {
    pub fn output(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Moves every quantized weight into huge-page regions
    /// ([`edgelora_kernels::cpu::mem::pack`]), so that a step's stream of weights does not take a
    /// TLB miss every 4 KiB. Nothing but speed changes. Returns the regions (none: the weights
    /// stay on the heap, see [`edgelora_kernels::cpu::mem::pack`]).
    pub fn pack_pages(&mut self) -> Vec<std::sync::Arc<edgelora_kernels::cpu::mem::Region>> {
        edgelora_kernels::cpu::mem::pack(|f| {
            self.embed.stores(f);
            if let Some(h) = self.lm_head.as_mut() {
                h.stores(f);
            }
            for l in self.layers.iter_mut() {
                for p in l.proj.iter_mut() {
                    p.weight.stores(f);
                }
            }
        })
    }

    /// Bytes of weights one decode step reads (every projection, the output head, norms).
    pub fn bytes_per_token(&self) -> usize {
        let mut n = self.output().nbytes() + self.norm.len() * 4;
        for l in &self.layers {
            n += (l.attn_norm.len() + l.ffn_norm.len()) * 4;
            for p in &l.proj {
                n += p.weight.nbytes() + p.bias.as_ref().map_or(0, |b| b.len() * 4);
            }
        }
        n
    }

    /// Every shape agrees with the config (loaders check as they go; this is the last word).
    pub fn validate(&self, c: &ModelConfig) -> Result<(), ModelError> {
        let chk = |name: String, got: (usize, usize), want: (usize, usize)| {
            if got != want {
                Err(ModelError::tensor(
                    name,
                    format!(
                        "shape [{}, {}], expected [{}, {}]",
                        got.0, got.1, want.0, want.1
                    ),
                ))
            } else {
                Ok(())
            }
        };
        chk(
            "embed".into(),
            (self.embed.rows(), self.embed.cols()),
            (c.vocab_size, c.hidden_size),
        )?;
        chk(
            "output".into(),
            (self.output().rows(), self.output().cols()),
            (c.vocab_size, c.hidden_size),
        )?;
        if self.layers.len() != c.n_layers {
            return Err(ModelError::Config(format!(
                "{} layers loaded, config says {}",
                self.layers.len(),
                c.n_layers
            )));
        }
        for (i, l) in self.layers.iter().enumerate() {
            for p in Proj::ALL {
                let lin = l.get(p);
                chk(
                    format!("layer {i} {}", p.hf_name()),
                    (lin.weight.rows(), lin.weight.cols()),
                    p.shape(c),
                )?;
                if let Some(b) = &lin.bias
                    && b.len() != p.shape(c).0
                {
                    return Err(ModelError::tensor(
                        format!("layer {i} {} bias", p.hf_name()),
                        "wrong length",
                    ));
                }
            }
            if l.attn_norm.len() != c.hidden_size || l.ffn_norm.len() != c.hidden_size {
                return Err(ModelError::tensor(
                    format!("layer {i} norm"),
                    "wrong length",
                ));
            }
        }
        if self.norm.len() != c.hidden_size {
            return Err(ModelError::tensor("norm", "wrong length"));
        }
        Ok(())
    }
}
