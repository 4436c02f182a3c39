//! Tests for `gguf_tokenizer.rs`: a synthetic vocabulary for the wiring, and the real SmolLM2
//! vocabulary against the golden prompts and the README's tokenization rules.

use serde_json::Value;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::model::gguf::{GgufError, GgufFile, GgufValue};
use crate::model::gguf_tests::{derived, fixture_path, real_model, write_gguf};
use crate::model::gguf_tokenizer::{GgufTokenizer, build_tokenizer};

fn encode(t: &GgufTokenizer, s: &str) -> Vec<u32> {
    t.tokenizer
        .encode(s, false)
        .unwrap_or_else(|e| panic!("encode {s:?}: {e}"))
        .get_ids()
        .to_vec()
}

fn strs(v: &[&str]) -> GgufValue {
    GgufValue::Array(v.iter().map(|s| GgufValue::String(s.to_string())).collect())
}

/// A tiny byte-level vocabulary: the 256 byte symbols, the merges "1 2", "a b", "Ġ a", one control
/// and one user-defined token.
fn synthetic(model: &str, pre: Option<&str>) -> GgufFile {
    let mut alphabet: Vec<String> = ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    alphabet.sort();
    let mut tokens: Vec<&str> = alphabet.iter().map(String::as_str).collect();
    tokens.extend(["12", "ab", "Ġa", "<|ctl|>", "<u>"]);
    let n = tokens.len() as i32;
    let types: Vec<GgufValue> = (0..n)
        .map(|i| {
            GgufValue::I32(if i == n - 2 {
                3
            } else if i == n - 1 {
                4
            } else {
                1
            })
        })
        .collect();
    let mut kvs = vec![
        ("tokenizer.ggml.model", GgufValue::String(model.into())),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        ("tokenizer.ggml.token_type", GgufValue::Array(types)),
        ("tokenizer.ggml.merges", strs(&["1 2", "a b", "Ġ a"])),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(n as u32 - 2)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(9999)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(true)),
    ];
    if let Some(p) = pre {
        kvs.push(("tokenizer.ggml.pre", GgufValue::String(p.into())));
    }
    GgufFile::from_bytes(write_gguf(3, &kvs, &[])).unwrap()
}

#[test]
fn pre_tokenizer_follows_tokenizer_ggml_pre() {
    let smollm = build_tokenizer(&synthetic("gpt2", Some("smollm"))).unwrap();
    let gpt2 = build_tokenizer(&synthetic("gpt2", Some("gpt-2"))).unwrap();
    let id = |t: &GgufTokenizer, s: &str| t.tokenizer.token_to_id(s).unwrap();
    // smollm isolates every digit before BPE, so the "1 2" merge can never apply.
    assert_eq!(encode(&smollm, "12"), [id(&smollm, "1"), id(&smollm, "2")]);
    assert_eq!(encode(&gpt2, "12"), [id(&gpt2, "12")]);
    assert_eq!(encode(&gpt2, "ab a"), [id(&gpt2, "ab"), id(&gpt2, "Ġa")]);
    let pre_warning = |t: &GgufTokenizer| t.warnings.iter().filter(|w| w.contains("GPT-2")).count();
    assert_eq!((pre_warning(&smollm), pre_warning(&gpt2)), (0, 0));
    for pre in [None, Some("mystery-pre")] {
        let t = build_tokenizer(&synthetic("gpt2", pre)).unwrap();
        assert_eq!(
            encode(&t, "12"),
            [id(&t, "12")],
            "falls back to the GPT-2 split"
        );
        assert_eq!(pre_warning(&t), 1, "{:?}", t.warnings);
    }
}

#[test]
fn control_and_user_defined_tokens_match_whole_and_ids_are_reported() {
    let t = build_tokenizer(&synthetic("gpt2", Some("smollm"))).unwrap();
    let (ctl, user) = (
        t.tokenizer.token_to_id("<|ctl|>").unwrap(),
        t.tokenizer.token_to_id("<u>").unwrap(),
    );
    let a = t.tokenizer.token_to_id("a").unwrap();
    assert_eq!(encode(&t, "a<|ctl|>a"), [a, ctl, a]);
    assert_eq!(encode(&t, "<u>"), [user]);
    assert_eq!(t.control_ids, [ctl]);
    assert_eq!(t.bos_id, Some(ctl));
    assert_eq!(t.eos_id, None, "out-of-vocabulary eos is dropped");
    assert!(
        t.warnings.iter().any(|w| w.contains("eos_token_id")),
        "{:?}",
        t.warnings
    );
    assert!(t.add_bos && !t.add_eos);
    assert_eq!(t.chat_template, None);
    // No post-processor: BOS is never inserted by the tokenizer even when add_bos is set.
    assert_eq!(t.tokenizer.encode("a", true).unwrap().get_ids(), [a]);
}

#[test]
fn unsupported_or_incomplete_tokenizers_are_errors() {
    let e = build_tokenizer(&synthetic("llama", None)).unwrap_err();
    assert!(
        matches!(&e, GgufError::UnsupportedTokenizer { model } if model == "llama"),
        "{e}"
    );
    let f = GgufFile::from_bytes(write_gguf(
        3,
        &[
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b"])),
        ],
        &[],
    ))
    .unwrap();
    let e = build_tokenizer(&f).unwrap_err();
    assert!(
        matches!(&e, GgufError::MissingKey { key } if key == "tokenizer.ggml.merges"),
        "{e}"
    );
    let f = GgufFile::from_bytes(write_gguf(
        3,
        &[
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b"])),
            (
                "tokenizer.ggml.token_type",
                GgufValue::Array(vec![GgufValue::I32(1)]),
            ),
            ("tokenizer.ggml.merges", strs(&[])),
        ],
        &[],
    ))
    .unwrap();
    assert!(matches!(build_tokenizer(&f), Err(GgufError::Tokenizer(_))));
}

// ---- the real SmolLM2 vocabulary ----------------------------------------------------------------------

fn real_tokenizer() -> Option<GgufTokenizer> {
    real_model().map(|f| build_tokenizer(&f).expect("SmolLM2 tokenizer builds"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn real_smollm2_golden_prompts_tokenize_exactly() {
    let Some(t) = real_tokenizer() else { return };
    let p = fixture_path("smollm2/golden.json");
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap();
    let prompts = golden["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 5);
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let text = match p["kind"].as_str().unwrap() {
            "raw" => p["text"].as_str().unwrap(),
            _ => p["rendered"].as_str().unwrap(),
        };
        assert_eq!(encode(&t, text), ids(&p["prompt_ids"]), "prompt {name}");
        assert_eq!(
            t.tokenizer.decode(&ids(&p["prompt_ids"]), false).unwrap(),
            text,
            "{name}"
        );
    }
}

#[test]
fn real_smollm2_readme_tokenization_rules() {
    let Some(t) = real_tokenizer() else { return };
    let fx = derived();
    let cases = fx["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(encode(&t, text), ids(&c["ids"]), "{text:?} ({})", c["why"]);
        let pieces: Vec<String> = ids(&c["ids"])
            .iter()
            .map(|&i| t.tokenizer.id_to_token(i).unwrap())
            .collect();
        let want: Vec<&str> = c["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(pieces, want, "{text:?}");
    }
    assert_eq!(encode(&t, "end.\n\nNext")[2..4], [198, 198]);
    assert_eq!(encode(&t, "end.\n\n").last(), Some(&1116));
}

#[test]
fn real_smollm2_round_trips_unicode_and_matches_specials_whole() {
    let Some(t) = real_tokenizer() else { return };
    for s in [
        "héllo wörld, naïve café",
        "日本語のテキスト と 한국어",
        "emoji 🦀🚀 and a family 👨‍👩‍👧 ok",
        "tabs\tand\r\nnewlines  \n\n  trailing ",
        "<|im_start|>user\nHi 42!<|im_end|>\n",
    ] {
        let enc = encode(&t, s);
        assert_eq!(
            t.tokenizer.decode(&enc, false).unwrap(),
            s,
            "{s:?} -> {enc:?}"
        );
    }
    assert_eq!(encode(&t, "<|im_start|>"), [1]);
    assert_eq!(encode(&t, "<|im_end|>"), [2]);
    assert_eq!(encode(&t, "x<|im_end|>y")[1], 2);
    assert!(
        !encode(&t, "<|im_start").contains(&1),
        "a partial special is plain text"
    );
    assert_eq!(
        t.tokenizer.decode(&[1, 2], true).unwrap(),
        "",
        "specials skip on request"
    );
}

#[test]
fn real_smollm2_special_token_facts() {
    let Some(t) = real_tokenizer() else { return };
    assert_eq!((t.bos_id, t.eos_id), (Some(1), Some(2)));
    assert!(!t.add_bos && !t.add_eos);
    assert_eq!(t.control_ids, (0..=16).collect::<Vec<u32>>());
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert_eq!(t.tokenizer.get_vocab_size(true), 49152);
    let tmpl = t.chat_template.as_deref().expect("chat template");
    assert!(tmpl.contains("im_start"), "{tmpl}");
}
