//! Bad input never panics. Every damaged model, config or adapter, and every bad command-line value,
//! is refused with an error that names the file, key, tensor or value at fault — through the library
//! (`Model::load`, `LoraAdapter::load_peft`) and through `edgelorad` (non-zero exit, `error:` on
//! stderr, no panic, no output file written).
//!
//! Each test builds its damaged copy in its own temp dir: a fixture folder is copied, then one file
//! is damaged (cut short, a JSON key edited, a tensor rewritten with another shape, dtype or name).
//! The GGUF cases cut or patch a copy of the real SmolLM2 GGUF and are skipped (loudly) without it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use edgelora_daemon::adapters::LoraAdapter;
use edgelora_daemon::model::gguf::GgufFile;
use edgelora_daemon::model::{LoadOptions, Model, ModelConfig, WeightDtype};
use edgelora_tests::{run_edgelorad, smollm2_path, tiny, tmp_dir};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

// ---- scratch folders and damaged copies -------------------------------------------------------

/// One test's scratch directory: emptied first, removed when the test passes (kept on failure).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = tmp_dir(&format!("bad-input-{tag}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Copies the regular files of `src` (not sub-folders, not the goldens) into `dst`.
fn copy_folder(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).expect("create copy");
    for e in std::fs::read_dir(src).expect("read fixture dir") {
        let e = e.expect("dir entry");
        let name = e.file_name();
        if e.file_type().expect("file type").is_file()
            && !name.to_string_lossy().starts_with("golden")
        {
            std::fs::copy(e.path(), dst.join(&name)).expect("copy fixture file");
        }
    }
    dst.to_path_buf()
}

fn tiny_copy(s: &Scratch, name: &str) -> PathBuf {
    copy_folder(&tiny(), &s.join(name))
}

fn gptq_copy(s: &Scratch, name: &str) -> PathBuf {
    copy_folder(&tiny().join("tiny-llama-gptq"), &s.join(name))
}

/// A copy of fixture adapter `which` in a folder called `name` (the adapter's name in errors).
fn adapter_copy(s: &Scratch, which: &str, name: &str) -> PathBuf {
    copy_folder(&tiny().join("adapters").join(which), &s.join(name))
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let text = std::fs::read_to_string(path).expect("read json");
    let mut v: Value = serde_json::from_str(&text).expect("fixture json");
    f(v.as_object_mut().expect("json object"));
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).expect("write json");
}

fn truncate_file(path: &Path, len: usize) {
    let bytes = std::fs::read(path).expect("read file");
    assert!(
        len < bytes.len(),
        "cut {len} is not inside {}",
        path.display()
    );
    std::fs::write(path, &bytes[..len]).expect("write truncated file");
}

/// A tensor held by value, for rewriting safetensors files.
#[derive(Clone)]
struct Owned {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_tensors(path: &Path) -> Vec<Owned> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("fixture safetensors");
    let mut v: Vec<Owned> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| Owned {
            name,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn write_tensors(path: &Path, tensors: &[Owned]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .unwrap_or_else(|e| panic!("test bug: tensor {}: {e}", t.name));
            (t.name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// Rewrites the safetensors file at `path` through `edit`.
fn rewrite_tensors(path: &Path, edit: impl FnOnce(&mut Vec<Owned>)) {
    let mut tensors = read_tensors(path);
    edit(&mut tensors);
    write_tensors(path, &tensors);
}

fn tensor_mut<'a>(tensors: &'a mut [Owned], name: &str) -> &'a mut Owned {
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("test bug: fixture has no tensor {name}"))
}

fn rename_tensor(tensors: &mut [Owned], from: &str, to: &str) {
    tensor_mut(tensors, from).name = to.to_string();
}

/// Keeps the first `cols` columns of a row-major F32 `[rows, _]` tensor.
fn keep_cols(t: &mut Owned, cols: usize) {
    assert_eq!(t.dtype, Dtype::F32);
    let (rows, old) = (t.shape[0], t.shape[1]);
    let mut data = Vec::with_capacity(rows * cols * 4);
    for r in 0..rows {
        data.extend_from_slice(&t.data[r * old * 4..(r * old + cols) * 4]);
    }
    t.data = data;
    t.shape = vec![rows, cols];
}

// ---- checking the errors ----------------------------------------------------------------------

fn f32_opts() -> LoadOptions {
    LoadOptions {
        dtype: WeightDtype::F32,
        group_size: 32,
        q8_embeddings: false,
    }
}

/// `Model::load` on a damaged model: must fail; returns the error's message.
fn load_err(path: &Path) -> String {
    match Model::load(path, &f32_opts()) {
        Ok(_) => panic!("{} loaded although it is damaged", path.display()),
        Err(e) => e.to_string(),
    }
}

/// The tiny model's config, as `edgelorad` sees it when checking an adapter.
fn tiny_config() -> &'static ModelConfig {
    static C: OnceLock<ModelConfig> = OnceLock::new();
    C.get_or_init(|| match Model::load(&tiny(), &f32_opts()) {
        Ok(m) => m.config,
        Err(e) => panic!("the intact tiny-llama fixture does not load: {e}"),
    })
}

/// `LoraAdapter::load_peft` on a damaged adapter: must fail; returns the error's message.
fn adapter_err(dir: &Path) -> String {
    match LoraAdapter::load_peft(dir, tiny_config()) {
        Ok(_) => panic!("adapter {} loaded although it is damaged", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            msg.contains(n),
            "expected {n:?} in the error message, got:\n{msg}"
        );
    }
}

/// Runs `edgelorad args`: it must fail cleanly (non-zero exit, an `error:` line, no panic).
/// Returns stderr.
#[track_caller]
fn cli_err(args: &[&str]) -> String {
    let (ok, stdout, stderr) = run_edgelorad(args);
    assert!(
        !ok,
        "edgelorad {args:?} succeeded on bad input\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "edgelorad {args:?} panicked:\n{stderr}"
    );
    assert!(
        stderr.contains("error:"),
        "edgelorad {args:?} printed no `error:` line:\n{stderr}"
    );
    stderr
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// `edgelorad eval logits --model MODEL --dtype f32 --prompt-tokens 0,1,2 --out X EXTRA...` must
/// fail cleanly and write nothing. Returns stderr.
#[track_caller]
fn logits_err(s: &Scratch, model: &Path, extra: &[&str]) -> String {
    let out = s.join("logits-out.safetensors");
    let _ = std::fs::remove_file(&out);
    let mut args = vec![
        "eval",
        "logits",
        "--model",
        p(model),
        "--dtype",
        "f32",
        "--prompt-tokens",
        "0,1,2",
        "--out",
        p(&out),
    ];
    args.extend_from_slice(extra);
    let e = cli_err(&args);
    assert!(!out.exists(), "edgelorad {args:?} failed yet wrote {out:?}");
    e
}

/// `edgelorad generate --model MODEL --dtype f32 --prompt-tokens 0,1,2 --max-tokens 2 EXTRA...`.
#[track_caller]
fn generate_err(model: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--model",
        p(model),
        "--dtype",
        "f32",
        "--prompt-tokens",
        "0,1,2",
        "--max-tokens",
        "2",
    ];
    args.extend_from_slice(extra);
    cli_err(&args)
}

// ---- Hugging Face folders: truncated or corrupt safetensors -----------------------------------

#[test]
fn truncated_model_safetensors_is_refused_naming_the_file_at_every_cut() {
    let s = Scratch::new("st-cut");
    let full = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let data = full.len() - 8 - header;
    let cuts = [
        ("empty file", 0),
        ("inside the header-length prefix", 5),
        ("header length only", 8),
        ("inside the JSON header", 8 + header / 2),
        ("header without any data", 8 + header),
        ("inside the first tensor", 8 + header + 100),
        ("inside the data", 8 + header + data / 2),
        ("last byte missing", full.len() - 1),
    ];
    for (what, n) in cuts {
        let dir = tiny_copy(&s, &format!("cut-{n}"));
        truncate_file(&dir.join("model.safetensors"), n);
        let e = load_err(&dir);
        assert!(
            e.contains("model.safetensors"),
            "cut {what} ({n} bytes): error does not name the file:\n{e}"
        );
        let c = logits_err(&s, &dir, &[]);
        assert!(
            c.contains("model.safetensors"),
            "cut {what} ({n} bytes): edgelorad error does not name the file:\n{c}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn safetensors_with_a_garbage_header_is_refused_naming_the_file() {
    let s = Scratch::new("st-garbage");
    let dir = tiny_copy(&s, "garbage");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // Keep the length prefix, break the JSON.
    bytes[8..24].copy_from_slice(b"\xff\xfe not json !!!!");
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(
        &load_err(&dir),
        &["model.safetensors", "not a valid safetensors"],
    );
    assert_mentions(&logits_err(&s, &dir, &[]), &["model.safetensors"]);
}

#[test]
fn folder_without_safetensors_is_refused_saying_so() {
    let s = Scratch::new("st-none");
    let dir = tiny_copy(&s, "no-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_mentions(&load_err(&dir), &["no *.safetensors files"]);
    assert_mentions(&logits_err(&s, &dir, &[]), &["no *.safetensors files"]);
}

// ---- config.json --------------------------------------------------------------------------------

#[test]
fn config_missing_a_required_key_is_refused_naming_the_key() {
    let s = Scratch::new("cfg-missing");
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "model_type",
    ] {
        let dir = tiny_copy(&s, &format!("no-{key}"));
        edit_json(&dir.join("config.json"), |c| {
            c.remove(key).expect("fixture key");
        });
        let want = format!("missing key \"{key}\"");
        assert_mentions(&load_err(&dir), &["config.json", &want]);
        assert_mentions(&logits_err(&s, &dir, &[]), &["config.json", &want]);
    }
}

#[test]
fn config_key_of_the_wrong_type_is_refused_naming_the_key() {
    let s = Scratch::new("cfg-type");
    let dir = tiny_copy(&s, "hidden-string");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("hidden_size".into(), json!("64"));
    });
    let want = ["config.json", "\"hidden_size\"", "non-negative integer"];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);

    let dir = tiny_copy(&s, "tie-string");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("tie_word_embeddings".into(), json!("no"));
    });
    let want = ["\"tie_word_embeddings\"", "true or false"];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);
}

#[test]
fn config_that_is_not_json_is_refused_naming_the_file() {
    let s = Scratch::new("cfg-notjson");
    let dir = tiny_copy(&s, "not-json");
    std::fs::write(
        dir.join("config.json"),
        "{ \"model_type\": \"llama\", \"hidden_size\": 6",
    )
    .unwrap();
    let want = ["config.json", "invalid JSON"];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);
}

#[test]
fn folder_without_config_json_is_refused_naming_the_file() {
    let s = Scratch::new("cfg-absent");
    let dir = tiny_copy(&s, "no-config");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_mentions(&load_err(&dir), &["config.json"]);
    assert_mentions(&logits_err(&s, &dir, &[]), &["config.json"]);
}

#[test]
fn unknown_model_type_is_refused_naming_it() {
    let s = Scratch::new("cfg-type-unknown");
    let dir = tiny_copy(&s, "gpt-neox");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("model_type".into(), json!("gpt_neox"));
    });
    let want = ["model_type", "gpt_neox", "supported: llama"];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);
}

#[test]
fn unsupported_activation_is_refused_naming_it() {
    let s = Scratch::new("cfg-act");
    let dir = tiny_copy(&s, "gelu");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("hidden_act".into(), json!("gelu"));
    });
    let want = ["hidden_act", "gelu"];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);
}

#[test]
fn heads_not_divisible_by_kv_heads_is_refused_naming_both_keys() {
    let s = Scratch::new("cfg-heads");
    let dir = tiny_copy(&s, "kv3");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    let want = ["num_attention_heads (4)", "num_key_value_heads (3)"];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);
}

#[test]
fn config_disagreeing_with_the_tensors_is_refused_naming_the_tensor() {
    let s = Scratch::new("cfg-vs-tensors");
    // hidden_size 32 against 64-wide tensors: the first tensor read is the embedding.
    let dir = tiny_copy(&s, "hidden32");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("hidden_size".into(), json!(32));
    });
    let want = [
        "model.embed_tokens.weight",
        "shape [512, 64], expected [512, 32]",
    ];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);

    // Three layers declared, two stored: layer 2's first tensor is missing.
    let dir = tiny_copy(&s, "layers3");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("num_hidden_layers".into(), json!(3));
    });
    let want = ["model.layers.2.", "missing from the checkpoint"];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);

    // Bias declared but not stored.
    let dir = tiny_copy(&s, "bias");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("attention_bias".into(), json!(true));
    });
    let want = [
        "model.layers.0.self_attn.q_proj.bias",
        "missing from the checkpoint",
    ];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);
}

#[test]
fn truncated_tokenizer_json_is_refused_naming_the_file() {
    let s = Scratch::new("tok-cut");
    let dir = tiny_copy(&s, "tok");
    let path = dir.join("tokenizer.json");
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    truncate_file(&path, len / 2);
    let want = ["tokenizer", "tokenizer.json"];
    assert_mentions(&load_err(&dir), &want);
    assert_mentions(&logits_err(&s, &dir, &[]), &want);
}

// ---- tensors of the wrong shape, dtype or presence --------------------------------------------

/// Rewrites the tiny model's `model.safetensors` through `edit`, then expects both the library and
/// the CLI to refuse it with every string of `want`.
#[track_caller]
fn damaged_tiny_tensors(tag: &str, edit: impl FnOnce(&mut Vec<Owned>), want: &[&str]) {
    let s = Scratch::new(tag);
    let dir = tiny_copy(&s, tag);
    rewrite_tensors(&dir.join("model.safetensors"), edit);
    assert_mentions(&load_err(&dir), want);
    assert_mentions(&logits_err(&s, &dir, &[]), want);
}

#[test]
fn projection_with_the_wrong_shape_is_refused_naming_the_tensor() {
    let name = "model.layers.1.self_attn.k_proj.weight";
    damaged_tiny_tensors(
        "shape-kproj",
        |t| tensor_mut(t, name).shape = vec![64, 32],
        &[name, "shape [64, 32], expected [32, 64]"],
    );
}

#[test]
fn norm_with_the_wrong_length_is_refused_naming_the_tensor() {
    let name = "model.norm.weight";
    damaged_tiny_tensors(
        "shape-norm",
        |t| {
            let n = tensor_mut(t, name);
            n.shape = vec![32];
            n.data.truncate(32 * 4);
        },
        &[name, "shape [32], expected [64]"],
    );
}

#[test]
fn lm_head_with_the_wrong_vocab_is_refused_naming_the_tensor() {
    damaged_tiny_tensors(
        "shape-lmhead",
        |t| {
            let n = tensor_mut(t, "lm_head.weight");
            n.shape = vec![256, 64];
            n.data.truncate(256 * 64 * 4);
        },
        &["lm_head.weight", "shape [256, 64], expected [512, 64]"],
    );
}

#[test]
fn missing_tensor_is_refused_naming_it() {
    let name = "model.layers.1.mlp.up_proj.weight";
    damaged_tiny_tensors(
        "missing-up",
        |t| t.retain(|x| x.name != name),
        &[name, "missing from the checkpoint"],
    );
}

#[test]
fn float_tensor_stored_as_integers_is_refused_naming_the_tensor() {
    let name = "model.layers.0.input_layernorm.weight";
    damaged_tiny_tensors(
        "dtype-norm",
        |t| tensor_mut(t, name).dtype = Dtype::I32,
        &[name, "dtype I32", "float"],
    );
}

#[test]
fn unexpected_bias_tensor_is_refused_naming_it() {
    let name = "model.layers.0.self_attn.o_proj.bias";
    damaged_tiny_tensors(
        "extra-bias",
        |t| {
            t.push(Owned {
                name: name.into(),
                dtype: Dtype::F32,
                shape: vec![64],
                data: vec![0; 64 * 4],
            });
            t.sort_by(|a, b| a.name.cmp(&b.name));
        },
        &[name, "no bias"],
    );
}

// ---- GPTQ folders -------------------------------------------------------------------------------

#[track_caller]
fn damaged_gptq(s: &Scratch, dir: &Path, want: &[&str]) {
    assert_mentions(&load_err(dir), want);
    assert_mentions(&logits_err(s, dir, &[]), want);
}

#[test]
fn gptq_qzeros_of_the_wrong_shape_is_refused_naming_the_tensor() {
    let s = Scratch::new("gptq-qzeros");
    let dir = gptq_copy(&s, "qzeros");
    let name = "model.layers.0.self_attn.q_proj.qzeros";
    rewrite_tensors(&dir.join("model.safetensors"), |t| {
        // Same bytes, [2, 8] -> [1, 16].
        tensor_mut(t, name).shape = vec![1, 16];
    });
    damaged_gptq(&s, &dir, &[name, "shape [1, 16], expected [2, 8]"]);
}

#[test]
fn gptq_qweight_of_the_wrong_dtype_is_refused_naming_the_tensor() {
    let s = Scratch::new("gptq-qweight-dtype");
    let dir = gptq_copy(&s, "qweight-f32");
    let name = "model.layers.1.mlp.down_proj.qweight";
    rewrite_tensors(&dir.join("model.safetensors"), |t| {
        tensor_mut(t, name).dtype = Dtype::F32;
    });
    damaged_gptq(&s, &dir, &[name, "expected I32"]);
}

#[test]
fn gptq_desc_act_is_refused_naming_the_option() {
    let s = Scratch::new("gptq-desc-act");
    let dir = gptq_copy(&s, "desc-act");
    edit_json(&dir.join("config.json"), |c| {
        c["quantization_config"]["desc_act"] = json!(true);
    });
    damaged_gptq(&s, &dir, &["GPTQ", "desc_act: true", "not supported"]);
}

#[test]
fn gptq_act_order_g_idx_is_refused_naming_the_tensor() {
    // desc_act false in the config, yet the g_idx is permuted (an act-order checkpoint).
    let s = Scratch::new("gptq-gidx");
    let dir = gptq_copy(&s, "g-idx");
    let name = "model.layers.0.self_attn.v_proj.g_idx";
    rewrite_tensors(&dir.join("model.safetensors"), |t| {
        let g = tensor_mut(t, name);
        let mut ids: Vec<i32> = g
            .data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        ids.reverse();
        g.data = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    });
    damaged_gptq(&s, &dir, &[name, "desc_act"]);
}

#[test]
fn gptq_bits_and_group_size_outside_what_is_supported_are_refused_naming_them() {
    let s = Scratch::new("gptq-cfg");
    let dir = gptq_copy(&s, "bits8");
    edit_json(&dir.join("config.json"), |c| {
        c["quantization_config"]["bits"] = json!(8);
    });
    damaged_gptq(&s, &dir, &["GPTQ", "bits 8"]);

    let dir = gptq_copy(&s, "group48");
    edit_json(&dir.join("config.json"), |c| {
        c["quantization_config"]["group_size"] = json!(48);
    });
    damaged_gptq(&s, &dir, &["GPTQ", "group_size", "48"]);

    // A group size the tensors were not written for: the scale/zero tensors have the wrong shape.
    let dir = gptq_copy(&s, "group64");
    edit_json(&dir.join("config.json"), |c| {
        c["quantization_config"]["group_size"] = json!(64);
    });
    damaged_gptq(&s, &dir, &["qzeros", "shape [2, "]);
}

#[test]
fn truncated_gptq_safetensors_is_refused_naming_the_file() {
    let s = Scratch::new("gptq-cut");
    let dir = gptq_copy(&s, "cut");
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    truncate_file(&path, len * 2 / 3);
    damaged_gptq(&s, &dir, &["model.safetensors", "not a valid safetensors"]);
}

// ---- GGUF files ---------------------------------------------------------------------------------

/// Where tensor `name`'s directory entry (its `u64` name length) starts in a GGUF image.
fn tensor_info_offset(bytes: &[u8], data_offset: usize, name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    bytes[..data_offset]
        .windows(pat.len())
        .rposition(|w| w == pat)
        .unwrap_or_else(|| panic!("test bug: tensor info of {name} not found"))
}

/// Where metadata key `key` (its `u64` length) starts in a GGUF image.
fn metadata_key_offset(bytes: &[u8], key: &str) -> usize {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .unwrap_or_else(|| panic!("test bug: metadata key {key} not found"))
}

/// The tensor a reader must blame when the file is cut to `len` bytes: the first, in directory
/// order, whose data does not fit.
fn first_tensor_past(f: &GgufFile, len: usize) -> String {
    f.tensors()
        .iter()
        .find(|t| f.data_offset() + t.offset + t.n_bytes > len)
        .expect("some tensor past the cut")
        .name
        .clone()
}

#[track_caller]
fn gguf_err(s: &Scratch, path: &Path, want: &[&str]) {
    let e = load_err(path);
    assert_mentions(&e, want);
    let c = logits_err(s, path, &[]);
    assert_mentions(&c, want);
}

#[test]
fn truncated_gguf_is_refused_naming_the_tensor_or_the_section() {
    let Some(real) = smollm2_path() else { return };
    let bytes = std::fs::read(&real).expect("read SmolLM2 GGUF");
    let f = GgufFile::open(&real).expect("the real GGUF parses");
    let data = f.data_offset();
    let s = Scratch::new("gguf-cut");
    let cut = |n: usize| {
        let path = s.join(&format!("cut-{n}.gguf"));
        std::fs::write(&path, &bytes[..n]).unwrap();
        path
    };

    // Inside the fixed header.
    gguf_err(&s, &cut(10), &["GGUF", "tensor count", "truncated"]);

    // Header counts only: the metadata is gone.
    gguf_err(&s, &cut(24), &["GGUF", "tensor count", "bytes left"]);

    // Inside the metadata: the token list, then the merges, are cut.
    let tokens = metadata_key_offset(&bytes, "tokenizer.ggml.tokens");
    gguf_err(
        &s,
        &cut(tokens + 100_000),
        &["GGUF", "metadata key `tokenizer.ggml.tokens`", "bytes left"],
    );
    let merges = metadata_key_offset(&bytes, "tokenizer.ggml.merges");
    gguf_err(
        &s,
        &cut(merges + 300_003),
        &["GGUF", "metadata key `tokenizer.ggml.merges`"],
    );

    // Inside the tensor directory: in the middle of one tensor's dims.
    let mid = &f.tensors()[f.tensors().len() / 2];
    let at = tensor_info_offset(&bytes, data, &mid.name) + 8 + mid.name.len() + 4 + 3;
    let want = format!("info of tensor `{}`", mid.name);
    gguf_err(&s, &cut(at), &["GGUF", &want, "truncated"]);

    // Inside the tensor directory: in the middle of a tensor's name.
    let at = tensor_info_offset(&bytes, data, &mid.name) + 8 + 2;
    gguf_err(&s, &cut(at), &["GGUF", "name of tensor #", "bytes left"]);

    // The whole header, no data; then cuts inside the data; then one byte short.
    let mut by_end: Vec<_> = f.tensors().iter().collect();
    by_end.sort_by_key(|t| t.offset + t.n_bytes);
    let middle = by_end[by_end.len() / 2];
    let cuts = [
        data,
        data + by_end[0].n_bytes / 2,
        data + middle.offset + middle.n_bytes / 2,
        bytes.len() - 1,
    ];
    for n in cuts {
        let blame = first_tensor_past(&f, n);
        let want = format!("tensor `{blame}` does not fit in the file");
        gguf_err(&s, &cut(n), &[&want, "truncated"]);
    }
}

#[test]
fn gguf_with_a_garbage_magic_is_refused_as_not_gguf() {
    let Some(real) = smollm2_path() else { return };
    let s = Scratch::new("gguf-magic");
    let mut bytes = std::fs::read(&real).expect("read SmolLM2 GGUF");
    bytes[..4].copy_from_slice(b"GGML");
    let path = s.join("bad-magic.gguf");
    std::fs::write(&path, &bytes).unwrap();
    gguf_err(&s, &path, &["not a GGUF file", "47 47 55 46"]);
}

#[test]
fn tiny_or_empty_files_are_refused_as_not_gguf() {
    let s = Scratch::new("gguf-tiny");
    for (i, content) in [&b""[..], b"GG", b"GGU"].into_iter().enumerate() {
        let path = s.join(&format!("tiny-{i}.gguf"));
        std::fs::write(&path, content).unwrap();
        gguf_err(&s, &path, &["not a GGUF file"]);
    }
    // A safetensors file where a GGUF file (or a folder) is expected: the CLI names the file.
    let st = tiny().join("model.safetensors");
    assert_mentions(&load_err(&st), &["not a GGUF file"]);
    assert_mentions(
        &logits_err(&s, &st, &[]),
        &["model.safetensors", "not a GGUF file"],
    );
}

#[test]
fn gguf_with_an_unsupported_version_is_refused_naming_it() {
    let Some(real) = smollm2_path() else { return };
    let s = Scratch::new("gguf-version");
    let mut bytes = std::fs::read(&real).expect("read SmolLM2 GGUF");
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    let path = s.join("v1.gguf");
    std::fs::write(&path, &bytes).unwrap();
    gguf_err(&s, &path, &["unsupported GGUF version 1"]);
}

#[test]
fn gguf_missing_a_metadata_key_is_refused_naming_the_key() {
    let Some(real) = smollm2_path() else { return };
    let s = Scratch::new("gguf-key");
    let mut bytes = std::fs::read(&real).expect("read SmolLM2 GGUF");
    let at = metadata_key_offset(&bytes, "llama.block_count") + 8;
    // Same length, another name: `llama.block_count` is gone.
    bytes[at..at + 17].copy_from_slice(b"llama.block_cnxnt");
    let path = s.join("no-block-count.gguf");
    std::fs::write(&path, &bytes).unwrap();
    gguf_err(&s, &path, &["llama.block_count", "not found"]);
}

#[test]
fn gguf_with_an_unknown_architecture_is_refused_naming_it() {
    let Some(real) = smollm2_path() else { return };
    let s = Scratch::new("gguf-arch");
    let mut bytes = std::fs::read(&real).expect("read SmolLM2 GGUF");
    // key, u32 type 8 (string), u64 length 5, "llama"
    let at = metadata_key_offset(&bytes, "general.architecture") + 8 + 20 + 4 + 8;
    assert_eq!(
        &bytes[at..at + 5],
        b"llama",
        "test bug: architecture value not found"
    );
    bytes[at..at + 5].copy_from_slice(b"gpt2x");
    let path = s.join("arch.gguf");
    std::fs::write(&path, &bytes).unwrap();
    gguf_err(&s, &path, &["gpt2x", "supported: llama"]);
}

#[test]
fn gguf_tensor_with_the_wrong_shape_is_refused_naming_it() {
    let Some(real) = smollm2_path() else { return };
    let s = Scratch::new("gguf-shape");
    let mut bytes = std::fs::read(&real).expect("read SmolLM2 GGUF");
    let f = GgufFile::open(&real).expect("the real GGUF parses");
    let name = "blk.0.attn_k.weight";
    let info = f.tensor_info(name).expect("attn_k in SmolLM2").clone();
    assert_eq!(info.dims.len(), 2);
    let at = tensor_info_offset(&bytes, f.data_offset(), name) + 8 + name.len() + 4;
    // Swap ne0 and ne1: same byte count, transposed shape.
    let (ne0, ne1) = (info.dims[0] as u64, info.dims[1] as u64);
    assert_eq!(&bytes[at..at + 8], &ne0.to_le_bytes());
    bytes[at..at + 8].copy_from_slice(&ne1.to_le_bytes());
    bytes[at + 8..at + 16].copy_from_slice(&ne0.to_le_bytes());
    let path = s.join("shape.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let want_dims = format!("found [{ne1}, {ne0}]");
    gguf_err(&s, &path, &[name, "expected GGUF dims", &want_dims]);
}

// ---- adapters -----------------------------------------------------------------------------------

/// The adapter at `dir` must be refused by the library and by `edgelorad --adapter`, naming the
/// adapter (its folder name) and every string of `want`.
#[track_caller]
fn bad_adapter(s: &Scratch, dir: &Path, want: &[&str]) {
    let name = dir.file_name().unwrap().to_str().unwrap().to_string();
    let e = adapter_err(dir);
    assert_mentions(&e, &[&format!("adapter {name}")]);
    assert_mentions(&e, want);
    let c = logits_err(s, &tiny(), &["--adapter", p(dir)]);
    assert_mentions(&c, &[&format!("adapter {name}")]);
    assert_mentions(&c, want);
}

const ALPHA_Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const ALPHA_Q_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const ALPHA_V_A: &str = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight";
const ALPHA_V_B: &str = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";

#[test]
fn intact_adapter_loads_so_the_damaged_cases_are_meaningful() {
    // The damage, not the fixture or the helpers, is what the other adapter tests see refused.
    let s = Scratch::new("adapter-ok");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-ok");
    let a = match LoraAdapter::load_peft(&dir, tiny_config()) {
        Ok(a) => a,
        Err(e) => panic!("intact copy refused: {e}"),
    };
    assert_eq!(a.rank, 8);
    let out = s.join("ok.safetensors");
    let (ok, _, stderr) = run_edgelorad(&[
        "eval",
        "logits",
        "--model",
        p(&tiny()),
        "--adapter",
        p(&dir),
        "--dtype",
        "f32",
        "--prompt-tokens",
        "0,1,2",
        "--out",
        p(&out),
    ]);
    assert!(
        ok && out.exists(),
        "intact adapter failed via the CLI:\n{stderr}"
    );
}

#[test]
fn adapter_rank_disagreeing_with_its_tensors_is_refused_naming_the_rank() {
    let s = Scratch::new("adapter-rank");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-r4");
    edit_json(&dir.join("adapter_config.json"), |c| {
        c.insert("r".into(), json!(4));
    });
    bad_adapter(
        &s,
        &dir,
        &[ALPHA_Q_A, "shape [8, 64], expected [4, 64]", "rank 4"],
    );
}

#[test]
fn adapter_lora_a_and_b_of_different_ranks_are_refused_naming_the_tensor() {
    let s = Scratch::new("adapter-rank-b");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-b4");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| {
        keep_cols(tensor_mut(t, ALPHA_V_B), 4);
    });
    bad_adapter(&s, &dir, &[ALPHA_V_B, "shape [32, 4], expected [32, 8]"]);
}

#[test]
fn adapter_target_the_model_lacks_is_refused_naming_the_tensor() {
    let s = Scratch::new("adapter-target");
    let qkv_a = ALPHA_Q_A.replace("q_proj", "qkv_proj");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-qkv");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| {
        rename_tensor(t, ALPHA_Q_A, &qkv_a);
        rename_tensor(t, ALPHA_Q_B, &ALPHA_Q_B.replace("q_proj", "qkv_proj"));
        t.sort_by(|a, b| a.name.cmp(&b.name));
    });
    bad_adapter(&s, &dir, &[&qkv_a, "unsupported target"]);

    let lm_head = "base_model.model.lm_head.lora_A.weight";
    let dir = adapter_copy(&s, "alpha-qv", "alpha-lmhead");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| {
        rename_tensor(t, ALPHA_Q_A, lm_head);
        rename_tensor(t, ALPHA_Q_B, "base_model.model.lm_head.lora_B.weight");
        t.sort_by(|a, b| a.name.cmp(&b.name));
    });
    bad_adapter(&s, &dir, &["lm_head.lora_", "unsupported target"]);
}

#[test]
fn adapter_tensor_outside_target_modules_is_refused_naming_the_module() {
    let s = Scratch::new("adapter-targets-list");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-q-only");
    edit_json(&dir.join("adapter_config.json"), |c| {
        c.insert("target_modules".into(), json!(["q_proj"]));
    });
    bad_adapter(&s, &dir, &["v_proj is not in target_modules"]);
}

#[test]
fn adapter_layer_beyond_the_model_is_refused_naming_the_layer() {
    let s = Scratch::new("adapter-layer");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-layer7");
    let a7 = ALPHA_V_A.replace("layers.0", "layers.7");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| {
        rename_tensor(t, ALPHA_V_A, &a7);
        rename_tensor(t, ALPHA_V_B, &ALPHA_V_B.replace("layers.0", "layers.7"));
        t.sort_by(|a, b| a.name.cmp(&b.name));
    });
    bad_adapter(&s, &dir, &["layers.7.", "layer 7", "model has 2 layers"]);
}

#[test]
fn adapter_for_a_narrower_model_is_refused_naming_the_width() {
    let s = Scratch::new("adapter-width");
    // in_features 32 instead of 64 on every lora_A.
    let dir = adapter_copy(&s, "alpha-qv", "alpha-in32");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| {
        for a in t.iter_mut().filter(|x| x.name.contains("lora_A")) {
            keep_cols(a, 32);
        }
    });
    bad_adapter(
        &s,
        &dir,
        &[
            ALPHA_Q_A,
            "shape [8, 32], expected [8, 64]",
            "in_features 64",
        ],
    );

    // out_features 16 instead of 32 on v_proj's lora_B.
    let dir = adapter_copy(&s, "alpha-qv", "alpha-out16");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| {
        let b = tensor_mut(t, ALPHA_V_B);
        b.shape = vec![16, 8];
        b.data.truncate(16 * 8 * 4);
    });
    bad_adapter(
        &s,
        &dir,
        &[
            ALPHA_V_B,
            "shape [16, 8], expected [32, 8]",
            "out_features 32",
        ],
    );
}

#[test]
fn adapter_options_that_change_the_forward_are_refused_naming_the_option() {
    let s = Scratch::new("adapter-options");
    for (key, value, want) in [
        ("use_dora", json!(true), "use_dora: true is not supported"),
        (
            "fan_in_fan_out",
            json!(true),
            "fan_in_fan_out: true is not supported",
        ),
        ("lora_bias", json!(true), "lora_bias: true is not supported"),
        ("bias", json!("all"), "bias \"all\" is not supported"),
        (
            "rank_pattern",
            json!({"q_proj": 4}),
            "rank_pattern (per-module rank or alpha) is not supported",
        ),
        (
            "modules_to_save",
            json!(["lm_head"]),
            "modules_to_save is not supported",
        ),
        ("peft_type", json!("IA3"), "peft_type \"IA3\""),
    ] {
        let dir = adapter_copy(&s, "alpha-qv", &format!("alpha-{key}"));
        edit_json(&dir.join("adapter_config.json"), |c| {
            c.insert(key.into(), value);
        });
        bad_adapter(&s, &dir, &[want]);
    }
}

#[test]
fn adapter_config_missing_rank_or_alpha_is_refused_naming_the_key() {
    let s = Scratch::new("adapter-keys");
    for (key, want) in [("r", "\"r\""), ("lora_alpha", "\"lora_alpha\"")] {
        let dir = adapter_copy(&s, "alpha-qv", &format!("alpha-no-{key}"));
        edit_json(&dir.join("adapter_config.json"), |c| {
            c.remove(key).expect("fixture key");
        });
        bad_adapter(&s, &dir, &[want, "missing"]);
    }
    let dir = adapter_copy(&s, "alpha-qv", "alpha-r0");
    edit_json(&dir.join("adapter_config.json"), |c| {
        c.insert("r".into(), json!(0));
    });
    bad_adapter(&s, &dir, &["invalid \"r\""]);
}

#[test]
fn adapter_missing_or_damaged_files_are_refused_naming_the_file() {
    let s = Scratch::new("adapter-files");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-no-weights");
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    bad_adapter(&s, &dir, &["adapter_model.safetensors", "not found"]);

    let dir = adapter_copy(&s, "alpha-qv", "alpha-no-config");
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    bad_adapter(&s, &dir, &["adapter_config.json"]);

    let dir = adapter_copy(&s, "alpha-qv", "alpha-bad-json");
    std::fs::write(dir.join("adapter_config.json"), "{\"r\": 8,").unwrap();
    bad_adapter(&s, &dir, &["adapter_config.json"]);

    let dir = adapter_copy(&s, "alpha-qv", "alpha-cut");
    let w = dir.join("adapter_model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len() as usize;
    truncate_file(&w, len / 2);
    bad_adapter(
        &s,
        &dir,
        &["adapter_model.safetensors", "not a valid safetensors"],
    );

    // A path that does not exist at all.
    let missing = s.join("no-such-adapter");
    bad_adapter(&s, &missing, &["adapter_config.json"]);
}

#[test]
fn adapter_with_an_unpaired_lora_tensor_is_refused_naming_it() {
    let s = Scratch::new("adapter-pairs");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-no-b");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| {
        t.retain(|x| x.name != ALPHA_V_B);
    });
    bad_adapter(&s, &dir, &[ALPHA_V_B, "missing"]);

    let dir = adapter_copy(&s, "alpha-qv", "alpha-no-a");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| {
        t.retain(|x| x.name != ALPHA_V_A);
    });
    bad_adapter(&s, &dir, &["v_proj", "lora_B without lora_A"]);

    let dir = adapter_copy(&s, "alpha-qv", "alpha-empty");
    rewrite_tensors(&dir.join("adapter_model.safetensors"), |t| t.clear());
    bad_adapter(&s, &dir, &["no LoRA weights"]);
}

#[test]
fn damaged_adapter_is_refused_by_generate_too() {
    let s = Scratch::new("adapter-generate");
    let dir = adapter_copy(&s, "alpha-qv", "alpha-dora");
    edit_json(&dir.join("adapter_config.json"), |c| {
        c.insert("use_dora".into(), json!(true));
    });
    let e = generate_err(&tiny(), &["--adapter", p(&dir)]);
    assert_mentions(&e, &["adapter alpha-dora", "use_dora"]);
}

// ---- bad command-line values --------------------------------------------------------------------

#[test]
fn unknown_dtype_is_refused_naming_the_value() {
    let s = Scratch::new("cli-dtype");
    let out = s.join("x.safetensors");
    let e = cli_err(&[
        "eval",
        "logits",
        "--model",
        p(&tiny()),
        "--dtype",
        "f16",
        "--prompt-tokens",
        "0,1,2",
        "--out",
        p(&out),
    ]);
    assert_mentions(&e, &["f16", "--dtype", "int4 or f32"]);
    assert!(!out.exists());
}

#[test]
fn group_size_not_a_multiple_of_32_is_refused_naming_it() {
    let s = Scratch::new("cli-group");
    for g in ["48", "0", "16"] {
        let out = s.join("x.safetensors");
        let e = cli_err(&[
            "eval",
            "logits",
            "--model",
            p(&tiny()),
            "--group-size",
            g,
            "--prompt-tokens",
            "0,1,2",
            "--out",
            p(&out),
        ]);
        assert_mentions(&e, &[&format!("group size {g}"), "multiple of 32"]);
        assert!(!out.exists());
    }
    let e = load_err_opts(
        &tiny(),
        &LoadOptions {
            dtype: WeightDtype::Int4,
            group_size: 48,
            q8_embeddings: false,
        },
    );
    assert_mentions(&e, &["group size 48", "multiple of 32"]);
}

fn load_err_opts(path: &Path, opts: &LoadOptions) -> String {
    match Model::load(path, opts) {
        Ok(_) => panic!("{} loaded with bad options {opts:?}", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn token_outside_the_vocabulary_is_refused_naming_it() {
    let s = Scratch::new("cli-token");
    let out = s.join("x.safetensors");
    let e = cli_err(&[
        "eval",
        "logits",
        "--model",
        p(&tiny()),
        "--dtype",
        "f32",
        "--prompt-tokens",
        "0,99999",
        "--out",
        p(&out),
    ]);
    assert_mentions(&e, &["token id 99999", "outside the vocabulary", "512"]);
    assert!(!out.exists());

    // Exactly one past the end, through generate.
    let e = cli_err(&[
        "generate",
        "--model",
        p(&tiny()),
        "--dtype",
        "f32",
        "--prompt-tokens",
        "3,512",
        "--max-tokens",
        "2",
    ]);
    assert_mentions(&e, &["token id 512", "outside the vocabulary"]);
}

#[test]
fn unparsable_or_missing_prompt_tokens_are_refused() {
    let e = cli_err(&["generate", "--model", p(&tiny()), "--prompt-tokens", "0,x"]);
    assert_mentions(&e, &["'x'", "--prompt-tokens"]);
    let e = cli_err(&["generate", "--model", p(&tiny()), "--prompt-tokens", "0,-1"]);
    assert_mentions(&e, &["--prompt-tokens"]);
    let e = cli_err(&["generate", "--model", p(&tiny()), "--dtype", "f32"]);
    assert_mentions(&e, &["--prompt", "--chat", "--prompt-tokens"]);
}

#[test]
fn bad_sampling_and_cache_values_are_refused_naming_them() {
    let tiny = tiny();
    let e = generate_err(&tiny, &["--temperature=-1"]);
    assert_mentions(&e, &["temperature"]);
    let e = generate_err(&tiny, &["--top-p", "0"]);
    assert_mentions(&e, &["top_p"]);
    let e = generate_err(&tiny, &["--repetition-penalty", "0"]);
    assert_mentions(&e, &["repetition"]);
    let e = generate_err(&tiny, &["--page-size", "0"]);
    assert_mentions(&e, &["--page-size"]);
    let e = generate_err(&tiny, &["--kv", "f8"]);
    assert_mentions(&e, &["f8", "--kv"]);
}

#[test]
fn model_path_that_does_not_exist_is_refused_naming_it() {
    let s = Scratch::new("cli-nomodel");
    let missing = s.join("no-such-model");
    assert_mentions(&load_err(&missing), &["no-such-model"]);
    assert_mentions(&logits_err(&s, &missing, &[]), &["no-such-model"]);
}

/// Desired behaviour: a GGUF cut anywhere in its header says it is truncated. Today only cuts that
/// land inside a fixed-size field do ("needs 8 bytes, only 2 left (truncated file?)"); a cut that
/// leaves a count or length prefix whole reports "count N cannot fit in the M bytes left" without
/// the word, which reads like a corrupt count rather than a short file.
#[test]
fn every_gguf_header_cut_says_the_file_is_truncated() {
    let Some(real) = smollm2_path() else { return };
    let bytes = std::fs::read(&real).expect("read SmolLM2 GGUF");
    let f = GgufFile::open(&real).expect("the real GGUF parses");
    let s = Scratch::new("gguf-cut-word");
    let tokens = metadata_key_offset(&bytes, "tokenizer.ggml.tokens");
    let merges = metadata_key_offset(&bytes, "tokenizer.ggml.merges");
    let mid = &f.tensors()[f.tensors().len() / 2];
    let name_at = tensor_info_offset(&bytes, f.data_offset(), &mid.name) + 8 + 2;
    for n in [24, 100, tokens + 100_000, merges, merges + 100, name_at] {
        let path = s.join(&format!("cut-{n}.gguf"));
        std::fs::write(&path, &bytes[..n]).unwrap();
        let e = load_err(&path);
        assert!(
            e.contains("truncated"),
            "GGUF cut to {n} bytes: the error does not say the file is truncated:\n{e}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
