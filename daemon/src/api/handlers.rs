//! The HTTP endpoints: validation, submission to the engine, and the OpenAI response shapes
//! (whole JSON bodies or server-sent events).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::admin::read_lock;
use super::errors::from_json_error;
use super::types::{ChatRequest, CompletionRequest, PromptInput, StopInput};
use super::{ApiError, AppState, Ready};
use crate::adapters::pack::PackInfo;
use crate::attribution::record::{RequestAttribution, outcome_of};
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{Event, GenRequest, TokenEvent};
use crate::model::chat::ChatMessage;
use crate::model::tokenizer::TextTokenizer;

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route(
            "/v1/adapters",
            get(super::admin::list_adapters).post(super::admin::import_adapter),
        )
        .route(
            "/v1/adapters/{id}",
            get(super::admin::show_adapter).delete(super::admin::delete_adapter),
        )
        .route(
            "/v1/prompts",
            get(super::admin::list_prompts).post(super::admin::register_prompt),
        )
        .route(
            "/v1/prompts/{id}",
            axum::routing::delete(super::admin::delete_prompt),
        )
        .route(
            "/v1/attribution/counters",
            get(super::admin::attribution_counters),
        )
        .route(
            "/v1/attribution/events",
            get(super::admin::attribution_events),
        )
        .route(
            "/v1/attribution/proof",
            get(super::admin::attribution_proof),
        )
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "Unknown endpoint (see /v1/completions, /v1/chat/completions, /v1/models, /health)",
    )
}

/// Prometheus text format: requests, tokens, latencies by model (base or adapter), queue, KV
/// pages, and GPU telemetry when the board has it.
async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Response> {
    check_auth(&s, &headers)?;
    if let Some(l) = s.ready.get().and_then(|r| r.ledger.as_ref()) {
        s.metrics.ledger_events.set(l.event_count() as i64);
        s.metrics
            .ledger_damaged_segments
            .set(l.damaged().len() as i64);
    }
    if let Some(st) = s
        .sync
        .lock()
        .ok()
        .and_then(|g| g.as_ref().map(|x| x.status()))
    {
        s.metrics.sync.set(&st);
    }
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &s.registry)
        .map_err(|e| ApiError::internal(format!("encoding metrics: {e}")))?;
    Ok((
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    match s.ready.get() {
        Some(r) => {
            let st = s.status.lock().map(|g| g.clone()).unwrap_or_default();
            let body = json!({
                "status": "ok", "device": r.device, "device_why": r.device_why,
                "adapter_storage": r.storage,
                "ledger": r.ledger.as_ref().map(|l| json!({
                    "events": l.event_count(), "next_seq": l.next_seq(),
                    "checkpoint_size": l.latest_checkpoint().map(|c| c.tree_size),
                    "damage": l.damaged().iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                })),
                "sync": s.sync.lock().ok().and_then(|g| g.as_ref().map(|x| x.health())),
                "running": st.running, "waiting": st.waiting,
                "steps": st.stats.steps, "preemptions": st.stats.preemptions,
                "cancelled": st.stats.cancelled, "prompt_tokens": st.stats.prompt_tokens,
                "generated_tokens": st.stats.generated_tokens,
            });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        None => ApiError::loading().into_response(),
    }
}

fn check_auth(s: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(key) = &s.api_key else {
        return Ok(());
    };
    if bearer(headers).is_some_and(|g| same_secret(g, key)) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Compares in constant time over the secret's length.
pub(super) fn same_secret(given: &str, secret: &str) -> bool {
    given.len() == secret.len()
        && given
            .bytes()
            .zip(secret.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Refuses new work while the unsynced attribution log is over its cap (policy "refuse").
fn check_backlog(s: &AppState) -> ApiResult<()> {
    let verdict = s
        .sync
        .lock()
        .ok()
        .and_then(|g| g.as_ref().map(|x| x.admission()));
    match verdict {
        Some(Err(msg)) => Err(ApiError::attribution_backlog_full(msg)),
        _ => Ok(()),
    }
}

pub(super) fn ready(s: &AppState) -> ApiResult<&Ready> {
    s.ready.get().ok_or_else(ApiError::loading)
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Response> {
    check_auth(&s, &headers)?;
    let r = ready(&s)?;
    let mut data = vec![json!({
        "id": r.base_id, "object": "model", "created": s.created, "owned_by": "edgelora",
        "root": r.base_id, "parent": null, "max_model_len": r.context,
    })];
    let reg = read_lock(&r.registry, "registry")?;
    for id in reg.ids() {
        if reg.get(id).is_some_and(|e| e.info.is_some()) {
            data.push(json!({
                "id": id, "object": "model", "created": s.created, "owned_by": "edgelora",
                "root": r.base_id, "parent": r.base_id, "max_model_len": r.context,
            }));
        }
    }
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<T> {
    Ok(read_json_raw(s, headers, body).await?.0)
}

/// As [`read_json`], with the body's bytes (their digest identifies the request in the ledger).
async fn read_json_raw<T: serde::de::DeserializeOwned>(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(T, axum::body::Bytes)> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > s.max_body_bytes) {
        return Err(ApiError::too_large(s.max_body_bytes));
    }
    let bytes = axum::body::to_bytes(body, s.max_body_bytes)
        .await
        .map_err(|_| ApiError::too_large(s.max_body_bytes))?;
    let v = serde_json::from_slice(&bytes).map_err(|e| from_json_error(&e))?;
    Ok((v, bytes))
}

/// `"<adapter>"`, `"<base>:<adapter>"` or the base model's id. An adapter whose pack was
/// refused (wrong base model, unknown version, corrupt) is named with the reason.
/// The adapter's in-use count is taken under the registry lock, so a concurrent delete either
/// sees it or the request sees the adapter gone.
fn resolve_model(r: &Ready, name: &str) -> ApiResult<Option<(Arc<PackInfo>, super::admin::InUse)>> {
    if name == r.base_id {
        return Ok(None);
    }
    let id = match name.split_once(':') {
        Some((base, id)) if base == r.base_id => id,
        _ => name,
    };
    let reg = read_lock(&r.registry, "registry")?;
    let e = reg.get(id).ok_or_else(|| ApiError::model_not_found(name))?;
    match (&e.state, &e.info) {
        (crate::adapters::registry::EntryState::Available, Some(info)) => Ok(Some((
            Arc::new(info.clone()),
            super::admin::InUse::new(&r.in_use, id),
        ))),
        (crate::adapters::registry::EntryState::Unavailable(msg, _), _) => {
            Err(ApiError::adapter_unavailable(msg))
        }
        (_, None) => Err(ApiError::adapter_unavailable(&format!(
            "adapter {id}: its pack could not be read"
        ))),
    }
}

/// Sampling options shared by both endpoints.
struct Common {
    sampling: SamplingParams,
    stops: Vec<String>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    return_token_ids: bool,
}

#[allow(clippy::too_many_arguments)]
fn common(
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    repetition_penalty: Option<f32>,
    stop: Option<StopInput>,
    n: Option<i64>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    return_token_ids: bool,
) -> ApiResult<Common> {
    if let Some(n) = n
        && n != 1
    {
        return Err(ApiError::invalid("n", "only n=1 is supported"));
    }
    let top_k = match top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1, 0 (off) or positive, got {k}"),
            ));
        }
    };
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_k,
        top_p: top_p.unwrap_or(1.0),
        repetition_penalty: repetition_penalty.unwrap_or(1.0),
        seed,
    };
    if !(0.0..=2.0).contains(&sampling.temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!(
                "temperature must be in [0, 2], got {}",
                sampling.temperature
            ),
        ));
    }
    sampling
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let stops = stop.map(StopInput::into_vec).unwrap_or_default();
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop takes at most 4 non-empty strings",
        ));
    }
    if include_usage && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    Ok(Common {
        sampling,
        stops,
        ignore_eos,
        stream,
        include_usage,
        return_token_ids,
    })
}

fn max_tokens(
    v: Option<i64>,
    prompt_len: usize,
    context: usize,
    default: usize,
) -> ApiResult<usize> {
    if prompt_len >= context {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {context} tokens; the prompt has {prompt_len}"
        ))
        .param("prompt")
        .code("context_length_exceeded"));
    }
    let left = context - prompt_len;
    let n = match v {
        None => default.min(left),
        Some(n) if n < 0 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens must be at least 0, got {n}"),
            ));
        }
        Some(n) => n as usize,
    };
    if n > left {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {context} tokens: {prompt_len} in the prompt \
             plus {n} requested (max_tokens) is too many"
        ))
        .param("max_tokens")
        .code("context_length_exceeded"));
    }
    Ok(n)
}

fn check_ids(ids: &[u32], vocab: usize, param: &str) -> ApiResult<()> {
    if ids.is_empty() {
        return Err(ApiError::invalid(param, "the prompt is empty"));
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            param,
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    Ok(())
}

/// Sets the cancel flags when dropped (the client went away, or the response is done), and
/// releases the adapter's in-use count.
struct CancelOnDrop(
    Vec<Arc<AtomicBool>>,
    #[allow(dead_code)] Option<super::admin::InUse>,
);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for c in &self.0 {
            c.store(true, Ordering::Relaxed);
        }
    }
}

/// One choice in flight: the engine's events turned into text, logprobs and a finish reason.
struct Choice {
    prompt: Vec<u32>,
    ids: Vec<u32>,
    lps: Vec<TokenEvent>,
    prompt_lps: Option<Vec<Option<TokenEvent>>>,
    text: String,
    sent: usize,
    /// Tokens already reported in stream chunks.
    sent_tokens: usize,
    stops: Vec<String>,
    finish: Option<&'static str>,
    cancel: Arc<AtomicBool>,
    /// Tokens generated, across the request's choices (the attribution guard reads it).
    generated: Arc<std::sync::atomic::AtomicU32>,
}

impl Choice {
    fn on_event(&mut self, ev: Event, tok: &TextTokenizer) -> ApiResult<()> {
        if self.finish.is_some() {
            return Ok(());
        }
        match ev {
            Event::PromptLogprobs(v) => self.prompt_lps = Some(v),
            Event::Token(t) => {
                self.generated.fetch_add(1, Ordering::Relaxed);
                self.ids.push(t.id);
                self.lps.push(t);
                let full = tok
                    .decode(&self.ids, true)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                // Search from what was already sent (earlier text held back no stop string).
                let from = self.sent.min(full.len());
                let from = if full.is_char_boundary(from) { from } else { 0 };
                let hit = self
                    .stops
                    .iter()
                    .filter_map(|s| full[from..].find(s.as_str()).map(|p| p + from))
                    .min();
                match hit {
                    Some(p) => {
                        self.text = full[..p].to_string();
                        self.finish = Some("stop");
                        self.cancel.store(true, Ordering::Relaxed);
                    }
                    None => self.text = full,
                }
            }
            Event::Done { finish, .. } => self.finish = Some(finish.as_str()),
            Event::Error(e) => return Err(ApiError::internal(e)),
            Event::AdapterFailed(e) => return Err(ApiError::adapter_unavailable(&e)),
        }
        Ok(())
    }

    /// Text that can be sent now: not a possible start of a stop string, not a partial
    /// character.
    fn take_delta(&mut self) -> String {
        let mut end = self.text.len();
        if self.finish.is_none() {
            if self.text.ends_with('\u{FFFD}') {
                end -= '\u{FFFD}'.len_utf8();
            }
            let hold = self.stops.iter().map(String::len).max().unwrap_or(1) - 1;
            end = end.saturating_sub(hold);
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
        }
        // Re-decoding can in principle rewrite earlier text; never slice past it.
        if end <= self.sent || !self.text.is_char_boundary(self.sent) {
            return String::new();
        }
        let d = self.text[self.sent..end].to_string();
        self.sent = end;
        d
    }
}

struct Submitted {
    choices: Vec<Choice>,
    rxs: Vec<UnboundedReceiver<Event>>,
    guard: CancelOnDrop,
}

#[allow(clippy::too_many_arguments)]
fn submit(
    r: &Ready,
    prompts: Vec<Vec<u32>>,
    adapter: Option<(Arc<PackInfo>, super::admin::InUse)>,
    c: &Common,
    max_tokens: Vec<usize>,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
    attr: &mut RequestAttribution,
) -> ApiResult<Submitted> {
    attr.set_prompt_tokens(prompts.iter().map(Vec::len).sum());
    let stop_ids = if c.ignore_eos {
        Vec::new()
    } else {
        r.model.tokenizer.eos_ids.clone()
    };
    let mut choices = Vec::new();
    let mut rxs = Vec::new();
    let mut cancels = Vec::new();
    // Counted until the response is done: an adapter in use cannot be deleted.
    let (adapter, in_use) = match adapter {
        Some((a, u)) => (Some(a), Some(u)),
        None => (None, None),
    };
    for (prompt, max_tokens) in prompts.into_iter().zip(max_tokens) {
        let (tx, rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let req = GenRequest {
            prompt: prompt.clone(),
            adapter: None,
            pack: adapter.clone(),
            sampling: c.sampling.clone(),
            max_tokens,
            stop_ids: stop_ids.clone(),
            top_logprobs: logprobs.unwrap_or(0),
            want_logprobs: logprobs.is_some(),
            prompt_logprobs,
            cancelled: cancel.clone(),
            events: tx,
        };
        r.tx.send(super::EngineMsg::Gen(req))
            .map_err(|_| ApiError::internal("the engine has stopped"))?;
        choices.push(Choice {
            prompt,
            ids: Vec::new(),
            lps: Vec::new(),
            prompt_lps: None,
            text: String::new(),
            sent: 0,
            sent_tokens: 0,
            stops: c.stops.clone(),
            finish: None,
            cancel: cancel.clone(),
            generated: attr.completion_tokens.clone(),
        });
        rxs.push(rx);
        cancels.push(cancel);
    }
    Ok(Submitted {
        choices,
        rxs,
        guard: CancelOnDrop(cancels, in_use),
    })
}

/// Waits for every choice to finish.
async fn collect(sub: &mut Submitted, tok: &TextTokenizer) -> ApiResult<()> {
    for (ch, rx) in sub.choices.iter_mut().zip(&mut sub.rxs) {
        while ch.finish.is_none() {
            match rx.recv().await {
                Some(ev) => ch.on_event(ev, tok)?,
                None => return Err(ApiError::internal("the engine dropped the request")),
            }
        }
    }
    Ok(())
}

fn usage(choices: &[Choice]) -> Value {
    let p: usize = choices.iter().map(|c| c.prompt.len()).sum();
    let g: usize = choices.iter().map(|c| c.ids.len()).sum();
    json!({"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g})
}

fn tok_str(tok: &TextTokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// The legacy completions `logprobs` object over `evs` (a `None` entry: no log-probability).
fn completion_logprobs(
    tok: &TextTokenizer,
    evs: &[(u32, Option<&TokenEvent>)],
    offset0: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offs = Vec::new();
    let mut off = offset0;
    for (id, ev) in evs {
        let s = tok_str(tok, *id);
        offs.push(off);
        off += s.len();
        tokens.push(s);
        lps.push(ev.and_then(|e| e.logprob));
        tops.push(ev.map(|e| {
            let m: serde_json::Map<String, Value> = e
                .top
                .iter()
                .map(|&(t, l)| (tok_str(tok, t), json!(l)))
                .collect();
            Value::Object(m)
        }));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

fn chat_logprobs(tok: &TextTokenizer, evs: &[TokenEvent]) -> Value {
    let content: Vec<Value> = evs
        .iter()
        .map(|e| {
            let s = tok_str(tok, e.id);
            json!({
                "token": s, "logprob": e.logprob, "bytes": s.as_bytes(),
                "top_logprobs": e.top.iter().map(|&(t, l)| {
                    let s = tok_str(tok, t);
                    json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"content": content})
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:06x}",
        now(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Server-sent events from a producer that writes `data:` payloads; dropping the body (the
/// client went away) cancels the requests.
fn sse(mut rx: UnboundedReceiver<String>, guard: CancelOnDrop) -> Response {
    let stream =
        futures_util::stream::unfold((rx_take(&mut rx), guard), |(mut rx, g)| async move {
            rx.recv().await.map(|s| {
                (
                    Ok::<_, std::convert::Infallible>(format!("data: {s}\n\n")),
                    (rx, g),
                )
            })
        });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

fn rx_take(rx: &mut UnboundedReceiver<String>) -> UnboundedReceiver<String> {
    let (_, empty) = unbounded_channel();
    std::mem::replace(rx, empty)
}

/// Merges the choices' event channels into one of `(choice index, event)`.
fn merged(rxs: Vec<UnboundedReceiver<Event>>) -> UnboundedReceiver<(usize, Event)> {
    let (tx, rx) = unbounded_channel();
    for (i, mut r) in rxs.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = r.recv().await {
                if tx.send((i, ev)).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

// ---------------------------------------------------------------- /v1/completions

async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_auth(&s, &headers)?;
    let r = ready(&s)?;
    check_backlog(&s)?;
    let (req, raw): (CompletionRequest, _) = read_json_raw(&s, &headers, body).await?;
    let adapter = resolve_model(r, &req.model)?;
    if let Some(b) = req.best_of
        && b != 1
    {
        return Err(ApiError::invalid("best_of", "only best_of=1 is supported"));
    }
    let c = common(
        req.temperature,
        req.top_p,
        req.top_k,
        req.seed,
        req.repetition_penalty,
        req.stop.clone(),
        req.n,
        req.ignore_eos,
        req.stream,
        req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        req.return_token_ids,
    )?;
    let logprobs = match req.logprobs {
        None => None,
        Some(n) if (0..=20).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be in [0, 20], got {n}"),
            ));
        }
    };
    let tok = &r.model.tokenizer;
    let vocab = r.model.config.vocab_size;
    let (prompt, template) = match (req.prompt, &req.prompt_id) {
        (Some(p), None) => (p, None),
        (None, Some(pid)) => {
            let (text, t) = render_template(r, pid, req.prompt_vars.as_ref())?;
            (PromptInput::Text(text), Some(t))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "prompt_id",
                "give either prompt or prompt_id, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "prompt",
                "missing field `prompt` (or `prompt_id` naming a registered template)",
            ));
        }
    };
    let prompts: Vec<Vec<u32>> = match prompt {
        PromptInput::Text(t) => vec![encode(tok, &t)?],
        PromptInput::Texts(v) => v.iter().map(|t| encode(tok, t)).collect::<ApiResult<_>>()?,
        PromptInput::Tokens(ids) => vec![ids],
        PromptInput::TokenLists(v) => v,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let mut maxes = Vec::new();
    for p in &prompts {
        check_ids(p, vocab, "prompt")?;
        maxes.push(max_tokens(req.max_tokens, p.len(), r.context, 16)?);
    }
    let echo = req.echo;
    let mut attr = attribution(
        r,
        &raw,
        adapter.as_ref(),
        template,
        req.attribution.as_ref(),
    )?;
    let mut sub = submit(
        r,
        prompts,
        adapter,
        &c,
        maxes,
        logprobs,
        echo && logprobs.is_some(),
        &mut attr,
    )?;
    let id = request_id("cmpl");
    let created = now();
    let model = req.model.clone();
    let state = s.clone();
    if !c.stream {
        if let Err(e) = collect(&mut sub, tok).await {
            // Failed, not answered: no attribution event.
            attr.discard();
            return Err(e);
        }
        record(&mut attr, &sub.choices).await?;
        let choices: Vec<Value> = sub
            .choices
            .iter()
            .enumerate()
            .map(|(i, ch)| {
                completion_choice(tok, ch, i, echo, logprobs.is_some(), c.return_token_ids)
            })
            .collect();
        return Ok(axum::Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(&sub.choices),
        }))
        .into_response());
    }
    let (out_tx, out_rx) = unbounded_channel::<String>();
    let Submitted {
        mut choices,
        rxs,
        guard,
    } = sub;
    let mut events = merged(rxs);
    tokio::spawn(async move {
        let tok = &state.ready.get().expect("ready").model.tokenizer;
        let chunk =
            |i: usize, text: String, lp: Value, finish: Option<&str>, ids: Option<Vec<u32>>| {
                let mut ch =
                    json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish});
                if let Some(ids) = ids {
                    ch["token_ids"] = json!(ids);
                }
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [ch]})
                .to_string()
            };
        if echo {
            for (i, ch) in choices.iter().enumerate() {
                let text = tok.decode(&ch.prompt, true).unwrap_or_default();
                let mut first =
                    json!({"index": i, "text": text, "logprobs": null, "finish_reason": null});
                if c.return_token_ids {
                    first["prompt_token_ids"] = json!(ch.prompt);
                }
                let v = json!({"id": id, "object": "text_completion", "created": created,
                               "model": model, "choices": [first]});
                if out_tx.send(v.to_string()).is_err() {
                    return;
                }
            }
        }
        let mut open = choices.len();
        while open > 0 {
            let Some((i, ev)) = events.recv().await else {
                let _ = out_tx.send(
                    ApiError::internal("the engine dropped the request")
                        .body()
                        .to_string(),
                );
                return;
            };
            let ch = &mut choices[i];
            let was_open = ch.finish.is_none();
            if let Err(e) = ch.on_event(ev, tok) {
                attr.discard();
                let _ = out_tx.send(e.body().to_string());
                return;
            }
            if ch.ids.len() == ch.sent_tokens && ch.finish.is_none() {
                continue;
            }
            let text = ch.take_delta();
            let new_ids: Vec<u32> = ch.ids[ch.sent_tokens..].to_vec();
            let lp = if logprobs.is_some() && !new_ids.is_empty() {
                let evs: Vec<(u32, Option<&TokenEvent>)> = ch.lps[ch.sent_tokens..]
                    .iter()
                    .map(|e| (e.id, Some(e)))
                    .collect();
                completion_logprobs(tok, &evs, ch.sent - text.len())
            } else {
                Value::Null
            };
            ch.sent_tokens = ch.ids.len();
            let finish = if was_open { ch.finish } else { None };
            if !was_open {
                continue;
            }
            if finish.is_some() {
                open -= 1;
                // The last choice's final chunk waits for the request's attribution event.
                if open == 0
                    && let Err(e) = record(&mut attr, &choices).await
                {
                    let _ = out_tx.send(e.body().to_string());
                    return;
                }
            }
            let ids = c.return_token_ids.then_some(new_ids);
            if out_tx.send(chunk(i, text, lp, finish, ids)).is_err() {
                return;
            }
        }
        if c.include_usage {
            let v = json!({"id": id, "object": "text_completion", "created": created,
                           "model": model, "choices": [], "usage": usage(&choices)});
            let _ = out_tx.send(v.to_string());
        }
        let _ = out_tx.send("[DONE]".into());
    });
    Ok(sse(out_rx, guard))
}

/// Who contributes to this request; a bad client-reported contribution is a 400 naming it.
fn attribution(
    r: &Ready,
    raw: &[u8],
    adapter: Option<&(Arc<PackInfo>, super::admin::InUse)>,
    template: Option<(String, String)>,
    client: Option<&super::types::AttributionInput>,
) -> ApiResult<RequestAttribution> {
    RequestAttribution::new(
        r.ledger.clone(),
        raw,
        (&r.base_id, &r.base_contributor),
        adapter.map(|(p, _)| (p.id(), p.manifest.contributor.as_str())),
        template,
        client,
    )
    .map_err(|e| ApiError::invalid("attribution", e))
}

/// Appends the request's attribution event; the answer is sent only once it is durable.
async fn record(attr: &mut RequestAttribution, choices: &[Choice]) -> ApiResult<()> {
    let prompt: usize = choices.iter().map(|c| c.prompt.len()).sum();
    let done: usize = choices.iter().map(|c| c.ids.len()).sum();
    // Several choices: `length` if any ran out, else `stop`.
    let finish = if choices.iter().any(|c| c.finish == Some("length")) {
        Some("length")
    } else {
        choices.first().and_then(|c| c.finish)
    };
    attr.record(prompt, done, outcome_of(finish))
        .await
        .map(|_| ())
        .map_err(ApiError::internal)
}

/// Renders registered template `id`; returns the text and (id, contributor) for attribution.
fn render_template(
    r: &Ready,
    id: &str,
    vars: Option<&Value>,
) -> ApiResult<(String, (String, String))> {
    let store = read_lock(&r.prompts, "prompt store")?;
    let (text, t) = store
        .render(id, vars.unwrap_or(&Value::Null))
        .map_err(|e| ApiError::invalid("prompt_id", e.to_string()))?;
    Ok((text, (t.id.clone(), t.contributor.clone())))
}

fn encode(tok: &TextTokenizer, text: &str) -> ApiResult<Vec<u32>> {
    tok.encode(text, true)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))
}

fn completion_choice(
    tok: &TextTokenizer,
    ch: &Choice,
    i: usize,
    echo: bool,
    logprobs: bool,
    return_ids: bool,
) -> Value {
    let prompt_text = if echo {
        tok.decode(&ch.prompt, true).unwrap_or_default()
    } else {
        String::new()
    };
    let lp = if logprobs {
        let mut evs: Vec<(u32, Option<&TokenEvent>)> = Vec::new();
        if echo {
            let pl = ch.prompt_lps.as_deref().unwrap_or(&[]);
            for (k, &id) in ch.prompt.iter().enumerate() {
                evs.push((id, pl.get(k).and_then(Option::as_ref)));
            }
        }
        evs.extend(ch.lps.iter().map(|e| (e.id, Some(e))));
        completion_logprobs(tok, &evs, 0)
    } else {
        Value::Null
    };
    let mut v = json!({
        "index": i, "text": format!("{prompt_text}{}", ch.text), "logprobs": lp,
        "finish_reason": ch.finish.unwrap_or("length"),
    });
    if return_ids {
        v["prompt_token_ids"] = json!(ch.prompt);
        v["token_ids"] = json!(ch.ids);
    }
    v
}

// ---------------------------------------------------------------- /v1/chat/completions

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_auth(&s, &headers)?;
    let r = ready(&s)?;
    check_backlog(&s)?;
    let (req, raw): (ChatRequest, _) = read_json_raw(&s, &headers, body).await?;
    let adapter = resolve_model(r, &req.model)?;
    let c = common(
        req.temperature,
        req.top_p,
        req.top_k,
        req.seed,
        req.repetition_penalty,
        req.stop.clone(),
        req.n,
        req.ignore_eos,
        req.stream,
        req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        req.return_token_ids,
    )?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        (true, None) => Some(0),
        (true, Some(n)) if (0..=20).contains(&n) => Some(n as usize),
        (true, Some(n)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be in [0, 20], got {n}"),
            ));
        }
    };
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut msgs = Vec::new();
    // A registered template renders the system message placed first.
    let template = match &req.prompt_id {
        Some(pid) => {
            let (text, t) = render_template(r, pid, req.prompt_vars.as_ref())?;
            msgs.push(ChatMessage::new("system", text));
            Some(t)
        }
        None => None,
    };
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!("unknown role {:?}", m.role),
            ));
        }
        let content = match &m.content {
            Some(c) => c
                .text()
                .map_err(|e| ApiError::invalid(&format!("messages[{i}].content"), e))?,
            None => String::new(),
        };
        let role = if m.role == "developer" {
            "system"
        } else {
            &m.role
        };
        msgs.push(ChatMessage::new(role, content));
    }
    let tok = &r.model.tokenizer;
    let prompt = tok
        .encode_chat(&msgs)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    check_ids(&prompt, r.model.config.vocab_size, "messages")?;
    let max = max_tokens(
        req.max_completion_tokens.or(req.max_tokens),
        prompt.len(),
        r.context,
        usize::MAX,
    )
    .map_err(|mut e| {
        if e.param.as_deref() == Some("prompt") {
            e.param = Some("messages".into());
        }
        e
    })?;
    let mut attr = attribution(
        r,
        &raw,
        adapter.as_ref(),
        template,
        req.attribution.as_ref(),
    )?;
    let mut sub = submit(
        r,
        vec![prompt],
        adapter,
        &c,
        vec![max],
        logprobs,
        false,
        &mut attr,
    )?;
    let id = request_id("chatcmpl");
    let created = now();
    let model = req.model.clone();
    if !c.stream {
        if let Err(e) = collect(&mut sub, tok).await {
            // Failed, not answered: no attribution event.
            attr.discard();
            return Err(e);
        }
        record(&mut attr, &sub.choices).await?;
        let ch = &sub.choices[0];
        let mut choice = json!({
            "index": 0,
            "message": {"role": "assistant", "content": ch.text},
            "logprobs": if logprobs.is_some() { chat_logprobs(tok, &ch.lps) } else { Value::Null },
            "finish_reason": ch.finish.unwrap_or("length"),
        });
        if c.return_token_ids {
            choice["prompt_token_ids"] = json!(ch.prompt);
            choice["token_ids"] = json!(ch.ids);
        }
        return Ok(axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage(&sub.choices),
        }))
        .into_response());
    }
    let (out_tx, out_rx) = unbounded_channel::<String>();
    let Submitted {
        mut choices,
        mut rxs,
        guard,
    } = sub;
    let mut events = rxs.remove(0);
    let state = s.clone();
    tokio::spawn(async move {
        let tok = &state.ready.get().expect("ready").model.tokenizer;
        let chunk = |delta: Value, lp: Value, finish: Option<&str>, ids: Option<Vec<u32>>| {
            let mut ch =
                json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish});
            if let Some(ids) = ids {
                ch["token_ids"] = json!(ids);
            }
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": [ch]})
            .to_string()
        };
        let ch = &mut choices[0];
        let first = chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
            None,
        );
        if out_tx.send(first).is_err() {
            return;
        }
        while ch.finish.is_none() {
            let Some(ev) = events.recv().await else {
                let _ = out_tx.send(
                    ApiError::internal("the engine dropped the request")
                        .body()
                        .to_string(),
                );
                return;
            };
            if let Err(e) = ch.on_event(ev, tok) {
                attr.discard();
                let _ = out_tx.send(e.body().to_string());
                return;
            }
            if ch.ids.len() == ch.sent_tokens && ch.finish.is_none() {
                continue;
            }
            let text = ch.take_delta();
            let new = &ch.lps[ch.sent_tokens..];
            let lp = if logprobs.is_some() && !new.is_empty() {
                chat_logprobs(tok, new)
            } else {
                Value::Null
            };
            let ids = c
                .return_token_ids
                .then(|| new.iter().map(|e| e.id).collect());
            ch.sent_tokens = ch.ids.len();
            let delta = if text.is_empty() {
                json!({})
            } else {
                json!({"content": text})
            };
            // The final chunk waits for the request's attribution event.
            if ch.finish.is_some()
                && let Err(e) = record(&mut attr, std::slice::from_ref(ch)).await
            {
                let _ = out_tx.send(e.body().to_string());
                return;
            }
            if out_tx.send(chunk(delta, lp, ch.finish, ids)).is_err() {
                return;
            }
        }
        if c.include_usage {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage(&choices)});
            let _ = out_tx.send(v.to_string());
        }
        let _ = out_tx.send("[DONE]".into());
    });
    Ok(sse(out_rx, guard))
}
