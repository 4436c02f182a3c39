//! A `tokenizers::Tokenizer` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, so that a
//! model needs nothing beside its `.gguf`.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE). The pre-tokenizer is chosen by
//! `tokenizer.ggml.pre` with the regexes llama.cpp uses for that value, applied in sequence (each
//! later regex splits the pieces of the earlier ones, and unmatched text stays a piece of its own),
//! followed by the byte-to-unicode mapping. Tokens of type control (3) and user-defined (4) are
//! matched whole in the input before any of that, as llama.cpp does.
//!
//! Deliberately *not* done here: adding BOS/EOS. `add_bos`/`add_eos` report what the file asks
//! for and the caller decides (SmolLM2's BOS is `<|im_start|>`, which must not be prepended to a
//! raw prompt).
//!
//! `tokenizer.ggml.model = "llama"` (SentencePiece) is rejected with
//! [`GgufError::UnsupportedTokenizer`]: without a real SPM model to check against, an
//! approximation that silently mis-tokenizes would be worse than a clear error.

use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::model::gguf::{GgufError, GgufFile};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// GPT-2's split (llama.cpp's version, without HF's trailing `|\s+`: whitespace it leaves
/// unmatched stays a piece of its own anyway).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split, with llama.cpp's case-insensitive contractions spelled out.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: as Llama 3 but single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer plus the special-token facts the engine needs.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (default false for gpt2 vocabularies). Reported, never applied.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token` (default false). Reported, never applied.
    pub add_eos: bool,
    pub chat_template: Option<String>,
    /// Ids of control tokens (`token_type` 3), in id order: the ids a detokenizer for display
    /// may want to hide, and which generated text should never contain.
    pub control_ids: Vec<u32>,
    /// Things that were accepted but may tokenize differently from llama.cpp (unknown
    /// `tokenizer.ggml.pre`, duplicate vocabulary entries, unusable merges, ...).
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("control_ids", &self.control_ids.len())
            .field("warnings", &self.warnings)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> GgufError {
    GgufError::Tokenizer(e.to_string())
}

/// Builds the tokenizer described by `f`'s metadata.
pub fn build_tokenizer(f: &GgufFile) -> Result<GgufTokenizer, GgufError> {
    let model = f.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedTokenizer {
            model: model.into(),
        });
    }
    let tokens = f.get_str_array("tokenizer.ggml.tokens")?;
    let n_vocab = tokens.len();
    let types = match f.get("tokenizer.ggml.token_type") {
        Some(_) => f.get_i32_array("tokenizer.ggml.token_type")?,
        None => vec![1; n_vocab],
    };
    if types.len() != n_vocab {
        return Err(tok_err(format!(
            "tokenizer.ggml.token_type has {} entries for {n_vocab} tokens",
            types.len()
        )));
    }
    let mut warnings = Vec::new();
    let mut tokenizer = build_byte_level_bpe(f, &tokens, &mut warnings)?;

    // Control and user-defined tokens are split out of the input before pre-tokenization. Their ids
    // already exist in the BPE vocabulary, so adding them only registers them for whole matching.
    let mut control_ids = Vec::new();
    let (mut special, mut user) = (Vec::new(), Vec::new());
    for (id, (&text, &ty)) in tokens.iter().zip(&types).enumerate() {
        match ty {
            TOKEN_TYPE_CONTROL => {
                control_ids.push(id as u32);
                special.push(AddedToken::from(text, true).normalized(false));
            }
            TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(text, false).normalized(false)),
            _ => {}
        }
    }
    tokenizer.add_special_tokens(special).map_err(tok_err)?;
    tokenizer.add_tokens(user).map_err(tok_err)?;

    let mut id_key = |key: &str| -> Result<Option<u32>, GgufError> {
        Ok(f.get_u32_opt(key)?.filter(|&id| {
            let ok = (id as usize) < n_vocab;
            if !ok {
                warnings.push(format!(
                    "{key} = {id} is outside the {n_vocab}-token vocabulary; ignored"
                ));
            }
            ok
        }))
    };
    let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
    let eos_id = id_key("tokenizer.ggml.eos_token_id")?;
    Ok(GgufTokenizer {
        tokenizer,
        bos_id,
        eos_id,
        add_bos: f
            .get_bool_opt("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false),
        add_eos: f
            .get_bool_opt("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
        chat_template: f.get_str_opt("tokenizer.chat_template")?.map(String::from),
        control_ids,
        warnings,
    })
}

/// The pre-tokenizer regexes llama.cpp applies for a `tokenizer.ggml.pre` value, and whether it
/// looks whole pieces up in the vocabulary before merging (`ignore_merges`, Llama 3 only).
/// Unknown or missing values fall back to the GPT-2 split with a warning.
fn pre_tokenizer_regexes(
    pre: Option<&str>,
    warnings: &mut Vec<String>,
) -> (Vec<&'static str>, bool) {
    match pre {
        Some(
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b",
        ) => (vec![r"\p{N}", GPT2], false),
        Some("gpt2" | "gpt-2" | "phi-2" | "roberta-bpe" | "mpt" | "olmo" | "jais") => {
            (vec![GPT2], false)
        }
        Some(
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe",
        ) => (vec![LLAMA3], true),
        Some("qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez") => (vec![QWEN2], false),
        // llama.cpp's catch-all type: punctuation runs first, then GPT-2, then digit runs/triples.
        Some("default") => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
        ),
        other => {
            warnings.push(format!(
                "tokenizer.ggml.pre = {other:?} is not known here; using the GPT-2 split, so \
                 tokenization may differ from llama.cpp"
            ));
            (vec![GPT2], false)
        }
    }
}

fn build_byte_level_bpe(
    f: &GgufFile,
    tokens: &[&str],
    warnings: &mut Vec<String>,
) -> Result<Tokenizer, GgufError> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| (t.to_string(), i as u32))
        .collect();
    if vocab.len() != tokens.len() {
        warnings.push(format!(
            "{} duplicate token strings in tokenizer.ggml.tokens; for each, only the last id is produced",
            tokens.len() - vocab.len()
        ));
    }
    // A merge is "left right", split at the first space after the first character (a token may
    // itself be a space in some vocabularies).
    // Rank = position; a repeated pair keeps its first (best) rank, as in llama.cpp.
    let mut merges: Merges = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut skipped = 0usize;
    for m in f.get_str_array("tokenizer.ggml.merges")? {
        let split = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| (&m[..i], &m[i + 1..]));
        match split {
            Some((a, b))
                if vocab.contains_key(a)
                    && vocab.contains_key(b)
                    && vocab.contains_key(&format!("{a}{b}")) =>
            {
                if seen.insert((a, b)) {
                    merges.push((a.to_string(), b.to_string()));
                }
            }
            _ => skipped += 1,
        }
    }
    if skipped > 0 {
        warnings.push(format!(
            "{skipped} merges without a space, or with a part or result outside the vocabulary, were skipped"
        ));
    }
    let (regexes, ignore_merges) =
        pre_tokenizer_regexes(f.get_str_opt("tokenizer.ggml.pre")?, warnings);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(tok_err)?;
    let mut pre: Vec<PreTokenizerWrapper> = regexes
        .into_iter()
        .map(|r| {
            Split::new(
                SplitPattern::Regex(r.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::from)
        })
        .collect::<Result<_, _>>()
        .map_err(tok_err)?;
    // Bytes → GPT-2's printable characters; no prefix space, no regex (the splits above did that).
    pre.push(ByteLevel::new(false, false, false).into());
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(Sequence::new(pre)));
    t.with_decoder(Some(ByteLevel::default()));
    Ok(t)
}
