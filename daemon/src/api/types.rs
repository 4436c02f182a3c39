//! Request bodies of the OpenAI endpoints. Unknown fields are rejected as OpenAI does; fields
//! OpenAI knows but this server ignores are accepted.

use serde::Deserialize;

/// `prompt`: a string, an array of strings, an array of token ids, or an array of those.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopInput::One(s) => vec![s],
            StopInput::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// Accepted for compatibility; usage chunks are never interleaved.
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    /// The prompt, unless `prompt_id` names a registered template.
    pub prompt: Option<PromptInput>,
    /// Extension: a registered prompt template, rendered with `prompt_vars`; its contributor is
    /// credited in the request's attribution event.
    pub prompt_id: Option<String>,
    pub prompt_vars: Option<serde_json::Value>,
    /// Extension: contributions the client reports (retrieved data chunks, tools), recorded in
    /// the attribution event as client-reported.
    pub attribution: Option<AttributionInput>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    pub n: Option<i64>,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Extension (as vLLM): each choice carries `prompt_token_ids` and `token_ids`.
    #[serde(default)]
    pub return_token_ids: bool,
    /// Extension (as vLLM): keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    pub repetition_penalty: Option<f32>,
    // Known to OpenAI, accepted and ignored here.
    pub user: Option<String>,
    pub best_of: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Value>,
    pub suffix: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ContentInput {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

impl ContentInput {
    pub fn text(&self) -> Result<String, String> {
        match self {
            ContentInput::Text(s) => Ok(s.clone()),
            ContentInput::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(format!(
                            "content parts of type `{}` are not supported",
                            p.kind
                        ));
                    }
                    out.push_str(p.text.as_deref().unwrap_or(""));
                }
                Ok(out)
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<ContentInput>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// Extension: a registered prompt template rendered with `prompt_vars` into a system message
    /// placed first.
    pub prompt_id: Option<String>,
    pub prompt_vars: Option<serde_json::Value>,
    /// Extension: client-reported contributions (see [`CompletionRequest::attribution`]).
    pub attribution: Option<AttributionInput>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    pub n: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub return_token_ids: bool,
    #[serde(default)]
    pub ignore_eos: bool,
    pub repetition_penalty: Option<f32>,
    // Known to OpenAI, accepted and ignored here.
    pub user: Option<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Value>,
    pub response_format: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    pub store: Option<bool>,
    pub metadata: Option<serde_json::Value>,
}

/// Contributions a client reports for its request (it retrieved these chunks, called these
/// tools); the server records them, marked as client-reported.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributionInput {
    #[serde(default)]
    pub data: Vec<DataChunkInput>,
    #[serde(default)]
    pub tools: Vec<ToolInput>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataChunkInput {
    pub datanet: String,
    pub chunk: String,
    pub contributor: String,
    pub score: Option<f32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolInput {
    pub id: String,
    pub contributor: String,
}
