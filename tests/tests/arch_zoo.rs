//! The Hugging Face folder loader and the forward pass on the `arch-zoo` fixtures: tiny random
//! models of the architectures and checkpoint options the tiny-llama goldens do not cover (Qwen2,
//! Mistral, Llama 3.x rope scaling, an explicit head_dim, attention/MLP biases, a sharded
//! checkpoint, f16 and bf16 weight files), each against transformers' float32 eager logits.
//! `tests/fixtures/arch-zoo/make_arch_zoo.py` makes them; its README says how.

use std::path::{Path, PathBuf};

use edgelora_daemon::engine::generate::all_logits;
use edgelora_daemon::engine::{ForwardOptions, KvDtype, KvPool};
use edgelora_daemon::model::{Arch, LoadOptions, Model, ModelConfig, RopeScaling, WeightDtype};
use edgelora_tests::*;
use safetensors::{Dtype, SafeTensors};

/// Max abs difference allowed against the transformers float32 logits.
const TOL: f32 = 1e-4;
/// A deliberately wrong forward (an option switched off) must miss the reference by at least this.
const SENSITIVE: f32 = 1e-2;

fn zoo(variant: &str) -> PathBuf {
    fixtures().join("arch-zoo").join(variant)
}

/// What the loaded config must say for a variant.
struct Expect {
    arch: Arch,
    tied: bool,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    head_dim: usize,
    rope_theta: f32,
    rope_scaling: RopeScaling,
    sliding_window: Option<usize>,
    /// The dtype of every tensor in the weight files.
    file_dtype: Dtype,
    /// Number of `*.safetensors` weight files (2: sharded, with an index).
    shards: usize,
}

/// A plain Llama; variants override what differs.
fn llama() -> Expect {
    Expect {
        arch: Arch::Llama,
        tied: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        head_dim: 8,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        sliding_window: None,
        file_dtype: Dtype::F32,
        shards: 1,
    }
}

fn qwen2() -> Expect {
    Expect {
        arch: Arch::Qwen2,
        tied: true,
        qkv_bias: true,
        rope_theta: 1e6,
        ..llama()
    }
}

fn load(dir: &Path) -> Model {
    Model::load(
        dir,
        &LoadOptions {
            dtype: WeightDtype::F32,
            group_size: 32,
            q8_embeddings: false,
        },
    )
    .unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()))
}

fn logits(m: &Model, prompt: &[u32]) -> Vec<f32> {
    let c = &m.config;
    // Pages of 8 so the 16-token prompt spans two of them.
    let mut pool = KvPool::new(c.kv_geometry(8), KvDtype::F32, 8).unwrap();
    all_logits(m, &mut pool, None, prompt, &ForwardOptions::exact()).expect("forward")
}

/// The weight files of a folder and the dtypes of their tensors (checks the fixture is what the
/// variant claims, so a regenerated fixture cannot silently drop the option under test).
fn weight_files(dir: &Path) -> Vec<(String, Vec<Dtype>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && p.file_name().is_some_and(|n| n != "reference.safetensors")
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let dtypes = st.tensors().iter().map(|(_, v)| v.dtype()).collect();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                dtypes,
            )
        })
        .collect()
}

/// Loads a variant, checks its config and files, and returns the model, the prompt and the
/// reference logits after asserting the forward pass matches them within [`TOL`].
fn check(variant: &str, want: Expect) -> (Model, Vec<u32>, Vec<f32>) {
    let dir = zoo(variant);

    let files = weight_files(&dir);
    assert_eq!(
        files.len(),
        want.shards,
        "{variant}: weight files {files:?}"
    );
    assert_eq!(
        dir.join("model.safetensors.index.json").exists(),
        want.shards > 1,
        "{variant}: index file presence"
    );
    for (name, dtypes) in &files {
        assert!(
            !dtypes.is_empty() && dtypes.iter().all(|&d| d == want.file_dtype),
            "{variant}/{name}: tensor dtypes {dtypes:?}, expected all {:?}",
            want.file_dtype
        );
    }

    let m = load(&dir);
    let c = &m.config;
    assert_eq!(c.arch, want.arch, "{variant}: arch");
    assert_eq!(
        c.tie_word_embeddings, want.tied,
        "{variant}: tie_word_embeddings"
    );
    assert_eq!(
        m.weights.lm_head.is_none(),
        want.tied,
        "{variant}: lm_head loaded iff untied"
    );
    assert_eq!(c.qkv_bias, want.qkv_bias, "{variant}: qkv_bias");
    assert_eq!(c.o_bias, want.o_bias, "{variant}: o_bias");
    assert_eq!(c.mlp_bias, want.mlp_bias, "{variant}: mlp_bias");
    assert_eq!(c.head_dim, want.head_dim, "{variant}: head_dim");
    assert_eq!(c.rope_theta, want.rope_theta, "{variant}: rope_theta");
    assert_eq!(c.rope_scaling, want.rope_scaling, "{variant}: rope_scaling");
    assert_eq!(
        c.sliding_window, want.sliding_window,
        "{variant}: sliding_window"
    );
    assert_eq!(
        (
            c.hidden_size,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.vocab_size
        ),
        (32, 2, 4, 2, 512),
        "{variant}: shape"
    );
    assert_eq!(c.bos_token_id, Some(0), "{variant}: bos");
    assert!(
        c.eos_token_ids.contains(&1),
        "{variant}: eos {:?}",
        c.eos_token_ids
    );
    // Every bias the config promises was loaded.
    for (li, l) in m.weights.layers.iter().enumerate() {
        for (pi, p) in l.proj.iter().enumerate() {
            let expected = match pi {
                0..=2 => want.qkv_bias,
                3 => want.o_bias,
                _ => want.mlp_bias,
            };
            assert_eq!(
                p.bias.is_some(),
                expected,
                "{variant}: layer {li} projection {pi} bias"
            );
        }
    }

    let reference = read_safetensors(&dir.join("reference.safetensors"));
    let prompt = reference["prompt"].ids();
    let want_logits = &reference["logits"];
    assert_eq!(want_logits.shape, vec![prompt.len(), c.vocab_size]);
    assert!(prompt.contains(&0) && prompt.contains(&(c.vocab_size as u32 - 1)));

    let got = logits(&m, &prompt);
    let d = max_abs_diff(&got, &want_logits.data);
    eprintln!("{variant}: max |logits - transformers| = {d:.3e}");
    assert!(
        d <= TOL,
        "{variant}: logits differ from transformers by {d} (> {TOL})"
    );
    let reference_logits = want_logits.data.clone();
    (m, prompt, reference_logits)
}

/// Asserts that `m` (a deliberately altered model) misses the reference: the fixture is sensitive
/// to the option that was switched off.
fn assert_sensitive(variant: &str, what: &str, m: &Model, prompt: &[u32], reference: &[f32]) {
    let d = max_abs_diff(&logits(m, prompt), reference);
    eprintln!("{variant}: without {what}: max diff {d:.3e}");
    assert!(
        d >= SENSITIVE,
        "{variant}: ignoring {what} changes the logits by only {d}; the fixture does not exercise it"
    );
}

fn drop_biases(m: &mut Model) {
    for l in &mut m.weights.layers {
        for p in &mut l.proj {
            p.bias = None;
        }
    }
}

#[test]
fn qwen2_qkv_bias_tied_embeddings() {
    let (mut m, prompt, reference) = check("qwen2", qwen2());
    drop_biases(&mut m);
    assert_sensitive("qwen2", "q/k/v biases", &m, &prompt, &reference);
}

#[test]
fn qwen2_bf16_weights() {
    check(
        "qwen2-bf16",
        Expect {
            file_dtype: Dtype::BF16,
            ..qwen2()
        },
    );
}

#[test]
fn mistral() {
    check(
        "mistral",
        Expect {
            arch: Arch::Mistral,
            sliding_window: Some(4096),
            ..llama()
        },
    );
}

#[test]
fn llama3_rope_scaling() {
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 256.0,
    };
    let (mut m, prompt, reference) = check(
        "llama3-rope",
        Expect {
            tied: true,
            rope_theta: 500000.0,
            rope_scaling: scaling.clone(),
            ..llama()
        },
    );
    // head_dim 8, theta 5e5, original context 256: one frequency in each llama3 band.
    let scaled = m.config.rope_inv_freq();
    m.config.rope_scaling = RopeScaling::None;
    let plain = m.config.rope_inv_freq();
    assert_eq!(scaled[0], plain[0], "high-frequency band kept");
    assert!(
        scaled[1] < plain[1] && scaled[1] > plain[1] / 8.0,
        "middle band smoothed: {} vs {}",
        scaled[1],
        plain[1]
    );
    for i in 2..4 {
        assert!(
            (scaled[i] - plain[i] / 8.0).abs() <= 1e-6 * plain[i],
            "low band {i} divided by the factor"
        );
    }
    assert_sensitive(
        "llama3-rope",
        "llama3 rope scaling",
        &m,
        &prompt,
        &reference,
    );

    // The fixture uses the transformers 4 spelling (top-level `rope_theta`, `rope_scaling`) that
    // Llama 3.x checkpoints ship with; transformers 5 writes one `rope_parameters` object instead.
    // Both must parse to the same thing.
    let text = std::fs::read_to_string(zoo("llama3-rope").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = v.as_object_mut().unwrap();
    let theta = obj.remove("rope_theta").expect("legacy rope_theta");
    let mut params = obj.remove("rope_scaling").expect("legacy rope_scaling");
    params["rope_theta"] = theta;
    obj.insert("rope_parameters".into(), params);
    let c5 = ModelConfig::from_hf_json(&v).expect("transformers 5 spelling parses");
    assert_eq!(c5.rope_theta, 500000.0);
    assert_eq!(c5.rope_scaling, scaling);
}

#[test]
fn llama_explicit_head_dim() {
    let (m, ..) = check(
        "llama-head-dim",
        Expect {
            tied: true,
            head_dim: 16,
            ..llama()
        },
    );
    // q is n_heads * 16 = 64 wide, not hidden_size.
    assert_eq!(m.config.q_dim(), 64);
    assert_eq!(m.weights.layers[0].proj[0].weight.rows(), 64);
    assert_eq!(m.weights.layers[0].proj[3].weight.cols(), 64);
}

#[test]
fn llama_attention_and_mlp_bias() {
    let (mut m, prompt, reference) = check(
        "llama-bias",
        Expect {
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            ..llama()
        },
    );
    drop_biases(&mut m);
    assert_sensitive("llama-bias", "all biases", &m, &prompt, &reference);
}

#[test]
fn llama_sharded_checkpoint() {
    check(
        "llama-sharded",
        Expect {
            shards: 2,
            ..llama()
        },
    );
}

#[test]
fn llama_f16_weights() {
    check(
        "llama-f16",
        Expect {
            file_dtype: Dtype::F16,
            ..llama()
        },
    );
}
