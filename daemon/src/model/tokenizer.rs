//! Text <-> token ids, and chat rendering, for every model source.
//!
//! Built on the `tokenizers` crate (from `tokenizer.json`, or constructed from GGUF vocab and merges)
//! and on [`ChatTemplate`] (minijinja, Hugging Face semantics). Where BOS comes from differs by
//! source: a Hugging Face `tokenizer.json` adds it in its post-processor, a GGUF file says so with
//! `tokenizer.ggml.add_bos_token`; chat templates write their own, so chat prompts are encoded
//! without special tokens, as `apply_chat_template` does.

use std::path::Path;

use serde_json::Value;

use super::chat::{ChatMessage, ChatTemplate};
use super::{ModelConfig, ModelError};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    /// Prepend `bos_id` when encoding with special tokens (GGUF `add_bos_token`); Hugging Face
    /// tokenizers do it in their post-processor instead.
    prepend_bos: bool,
    chat: Option<ChatTemplate>,
}

/// `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        prepend_bos: bool,
        chat_template: Option<&str>,
    ) -> Result<Self, ModelError> {
        let tok = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
        let chat = match chat_template {
            Some(src) => Some(
                ChatTemplate::new(
                    src,
                    tok(bos_id).as_deref(),
                    tok(eos_ids.first().copied()).as_deref(),
                )
                .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            inner,
            bos_id,
            eos_ids,
            prepend_bos,
            chat,
        })
    }

    /// `tokenizer.json` + `tokenizer_config.json` (special tokens, chat template) of a HF folder.
    pub fn from_hf_folder(dir: &Path, config: &ModelConfig) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.exists() {
            Some(super::hf::read_json(&tc_path)?)
        } else {
            None
        };
        let tc = tc.as_ref();
        let lookup = |key: &str| {
            token_string(tc.and_then(|t| t.get(key))).and_then(|s| inner.token_to_id(&s))
        };
        let bos_id = config.bos_token_id.or_else(|| lookup("bos_token"));
        let mut eos_ids = config.eos_token_ids.clone();
        if let Some(e) = lookup("eos_token")
            && !eos_ids.contains(&e)
        {
            eos_ids.push(e);
        }
        let template = match tc.and_then(|t| t.get("chat_template")) {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str).map(str::to_owned)),
            _ => None,
        };
        let template = match template {
            Some(t) => Some(t),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.exists() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
                } else {
                    None
                }
            }
        };
        // Chat template variables use the tokenizer_config strings even when the ids come from config.json.
        let mut t = Self::new(inner, bos_id, eos_ids, false, template.as_deref())?;
        if let (Some(src), Some(tc)) = (template.as_deref(), tc) {
            t.chat = Some(
                ChatTemplate::new(
                    src,
                    token_string(tc.get("bos_token")).as_deref(),
                    token_string(tc.get("eos_token")).as_deref(),
                )
                .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))?,
            );
        }
        Ok(t)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text. `add_special`: add what the model adds to a raw prompt (BOS where it uses one).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special
            && self.prepend_bos
            && let Some(b) = self.bos_id
            && ids.first() != Some(&b)
        {
            ids.insert(0, b);
        }
        Ok(ids)
    }

    /// Whether encoding a raw prompt with special tokens starts it with BOS.
    pub fn adds_bos(&self) -> bool {
        self.bos_id.is_some()
            && self.encode("", true).ok().and_then(|v| v.first().copied()) == self.bos_id
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let t = self
            .chat
            .as_ref()
            .ok_or_else(|| ModelError::Tokenizer("this model has no chat template".into()))?;
        t.render(messages, add_generation_prompt)
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))
    }

    /// Renders a conversation and encodes it without adding special tokens (the template writes them).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        let text = self.render_chat(messages, true)?;
        self.encode(&text, false)
    }
}
