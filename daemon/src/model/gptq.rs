//! GPTQ 4-bit checkpoints (AutoGPTQ layout, `desc_act: false`) converted straight into the internal
//! INT4 blocks — nibbles and f16 scales are copied, never re-derived through f32.
//!
//! Layout (see tests/fixtures/tiny-llama/README.md), for a Linear with weight `[out, in]`,
//! `G = ceil(in / group_size)`:
//! * `qweight` i32 `[in/8, out]`: bits 4j..4j+3 of `qweight[r, n]` = `q[n, 8r + j]`;
//! * `qzeros` i32 `[G, out/8]`: bits 4j..4j+3 of `qzeros[g, c]` = `zero[8c + j, g]` minus one in the
//!   v1 format (`checkpoint_format: gptq`), the zero itself in v2 (`gptq_v2`);
//! * `scales` f16 `[G, out]`; `g_idx` i32 `[in]` = `k / group_size`.
//!
//! `W[n, k] = scales[g, n] * (q - zero)`.

use edgelora_kernels::{BlockQ4, Q4Kind, Q4Matrix, QK};
use safetensors::Dtype;
use serde_json::Value;

use super::ModelError;
use super::st::{TensorStore, to_i32};

/// The parts of `quantization_config` that decide the layout.
#[derive(Clone, Debug)]
pub struct GptqConfig {
    pub group_size: Option<usize>,
    /// v1 stores zero - 1.
    pub zeros_minus_one: bool,
}

impl GptqConfig {
    pub fn from_json(q: &Value) -> Result<Self, ModelError> {
        let bad = |m: String| ModelError::Unsupported(format!("GPTQ quantization_config: {m}"));
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("gptq");
        if method != "gptq" {
            return Err(bad(format!("quant_method {method:?} (only gptq)")));
        }
        let bits = q.get("bits").and_then(Value::as_u64).unwrap_or(0);
        if bits != 4 {
            return Err(bad(format!("bits {bits} (only 4)")));
        }
        if q.get("desc_act").and_then(Value::as_bool).unwrap_or(false) {
            return Err(bad(
                "desc_act: true (act-order) is not supported; re-export with desc_act false".into(),
            ));
        }
        let group_size = match q.get("group_size").and_then(Value::as_i64) {
            Some(-1) => None,
            Some(g) if g > 0 && g % QK as i64 == 0 => Some(g as usize),
            other => {
                return Err(bad(format!(
                    "group_size {other:?} (a multiple of 32, or -1)"
                )));
            }
        };
        let fmt = q
            .get("checkpoint_format")
            .and_then(Value::as_str)
            .unwrap_or("gptq");
        let zeros_minus_one = match fmt {
            "gptq" => true,
            "gptq_v2" => false,
            other => {
                return Err(bad(format!(
                    "checkpoint_format {other:?} (gptq or gptq_v2)"
                )));
            }
        };
        Ok(Self {
            group_size,
            zeros_minus_one,
        })
    }
}

/// Converts the GPTQ tensors of module `prefix` (e.g. `model.layers.0.self_attn.q_proj`) with
/// weight shape `[out, in]`.
pub fn load_q4(
    store: &TensorStore,
    prefix: &str,
    out: usize,
    inp: usize,
    cfg: &GptqConfig,
) -> Result<Q4Matrix, ModelError> {
    let gs = cfg.group_size.unwrap_or(inp.div_ceil(QK) * QK);
    let groups = inp.div_ceil(gs);
    let name = |s: &str| format!("{prefix}.{s}");
    let shape_err = |n: &str, got: &[usize], want: &[usize]| {
        ModelError::tensor(
            name(n),
            format!("shape {got:?}, expected {want:?} for a [{out}, {inp}] weight"),
        )
    };
    if !inp.is_multiple_of(8) || !out.is_multiple_of(8) {
        return Err(ModelError::tensor(
            prefix,
            format!("GPTQ needs in and out divisible by 8, got [{out}, {inp}]"),
        ));
    }
    let qw_t = store.raw(&name("qweight"))?;
    if qw_t.shape != [inp / 8, out] {
        return Err(shape_err("qweight", &qw_t.shape, &[inp / 8, out]));
    }
    let qweight = to_i32(&qw_t)?;
    let qz_t = store.raw(&name("qzeros"))?;
    if qz_t.shape != [groups, out / 8] {
        return Err(shape_err("qzeros", &qz_t.shape, &[groups, out / 8]));
    }
    let qzeros = to_i32(&qz_t)?;
    let sc_t = store.raw(&name("scales"))?;
    if sc_t.shape != [groups, out] {
        return Err(shape_err("scales", &sc_t.shape, &[groups, out]));
    }
    if sc_t.dtype != Dtype::F16 {
        return Err(ModelError::tensor(
            name("scales"),
            format!("dtype {:?}, expected F16", sc_t.dtype),
        ));
    }
    let scales: Vec<u16> = sc_t
        .data
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    if store.contains(&name("g_idx")) {
        let g_idx = to_i32(&store.raw(&name("g_idx"))?)?;
        if g_idx.len() != inp || g_idx.iter().enumerate().any(|(k, &g)| g as usize != k / gs) {
            return Err(ModelError::tensor(
                name("g_idx"),
                "not k / group_size: act-order (desc_act) checkpoints are not supported",
            ));
        }
    }
    let bpr = inp.div_ceil(QK);
    let mut blocks = vec![BlockQ4::default(); out * bpr];
    for n in 0..out {
        for b in 0..bpr {
            let g = b * QK / gs;
            let zword = qzeros[g * (out / 8) + n / 8];
            let stored = (zword >> (4 * (n % 8))) & 0xF;
            let zero = stored + cfg.zeros_minus_one as u32;
            let blk = &mut blocks[n * bpr + b];
            blk.d = scales[g * out + n];
            blk.m = zero as u16;
            for j in 0..QK {
                let k = b * QK + j;
                // Padding past `in` dequantizes to zero only if the code equals the zero point; when
                // zero is 16 (v1 with stored 15) no code does, but kernels never read x past `in`.
                let q = if k < inp {
                    (qweight[(k / 8) * out + n] >> (4 * (k % 8))) & 0xF
                } else {
                    zero.min(15)
                };
                blk.set_code(j, q as u8);
            }
        }
    }
    Q4Matrix::from_blocks(out, inp, Q4Kind::ZeroPoint, blocks)
        .map_err(|e| ModelError::tensor(prefix, e.to_string()))
}
