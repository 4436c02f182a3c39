//! Admin routes: the adapter registry over HTTP (`/v1/adapters`), behind the admin token.
//!
//! `GET /v1/adapters` lists every registered pack with its residency; `POST /v1/adapters`
//! imports a PEFT folder that is already on the box (under the adapters directory, so a remote
//! admin cannot make the daemon read arbitrary paths); `DELETE /v1/adapters/{id}` removes a pack
//! that no request is using (409 while one is).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::handlers::{bearer, read_json, ready, same_secret};
use super::{ApiError, AppState, EngineMsg, Ready};
use crate::adapters::pack::{ImportRequest, PackError};
use crate::adapters::registry::{EntryState, RegistryEntry, validate_id};
use crate::adapters::residency::ResidentState;

type ApiResult<T> = Result<T, ApiError>;

/// A shared table read under its lock (a poisoned lock is a 500 naming the table).
pub(super) fn read_lock<'a, T>(
    l: &'a std::sync::RwLock<T>,
    what: &str,
) -> ApiResult<std::sync::RwLockReadGuard<'a, T>> {
    l.read()
        .map_err(|_| ApiError::internal(format!("{what} lock poisoned")))
}

pub(super) fn write_lock<'a, T>(
    l: &'a std::sync::RwLock<T>,
    what: &str,
) -> ApiResult<std::sync::RwLockWriteGuard<'a, T>> {
    l.write()
        .map_err(|_| ApiError::internal(format!("{what} lock poisoned")))
}

/// Requests in flight per adapter id; an entry lives while its guard does.
pub type InUseMap = Arc<Mutex<HashMap<String, usize>>>;

pub struct InUse {
    map: InUseMap,
    id: String,
}

impl InUse {
    pub fn new(map: &InUseMap, id: &str) -> Self {
        if let Ok(mut m) = map.lock() {
            *m.entry(id.to_string()).or_default() += 1;
        }
        Self {
            map: map.clone(),
            id: id.to_string(),
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock()
            && let Some(n) = m.get_mut(&self.id)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.id);
            }
        }
    }
}

/// Admin routes need the admin token: none configured → 403 (the routes are off), the user
/// key → 403, anything else → 401.
fn check_admin(s: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let given = bearer(headers);
    let Some(admin) = &s.admin_token else {
        return Err(ApiError::forbidden(
            "admin routes are disabled: configure an admin token (--admin-token, `admin_token` \
             or $EDGELORA_ADMIN_TOKEN)",
        ));
    };
    match given {
        Some(g) if same_secret(g, admin) => Ok(()),
        Some(g) if s.api_key.as_deref().is_some_and(|k| same_secret(g, k)) => Err(
            ApiError::forbidden("this route needs the admin token, not the API key"),
        ),
        _ => Err(ApiError::unauthorized()),
    }
}

fn entry_json(r: &Ready, id: &str, e: &RegistryEntry) -> Value {
    let residency = r.residency.lock().ok().and_then(|v| v.get(id).cloned());
    let (res, pins, pages, load_error) = match residency {
        None => ("cold", 0, 0, None),
        Some(ResidentState::Loading) => ("loading", 0, 0, None),
        Some(ResidentState::Resident { pins, pages }) => ("resident", pins, pages, None),
        Some(ResidentState::Failed(m)) => ("failed", 0, 0, Some(m)),
    };
    // A pack whose payload failed to load (digest, I/O) is as unavailable as one refused at
    // start.
    let (state, error) = match (&e.state, &load_error) {
        (EntryState::Unavailable(msg, kind), _) => {
            ("unavailable", Some(json!({"kind": kind, "message": msg})))
        }
        (EntryState::Available, Some(m)) => (
            "unavailable",
            Some(json!({"kind": "load_failed", "message": m})),
        ),
        (EntryState::Available, None) => ("available", None),
    };
    let in_use = r
        .in_use
        .lock()
        .ok()
        .and_then(|m| m.get(id).copied())
        .unwrap_or(0);
    let mut v = json!({
        "id": id, "object": "adapter", "state": state, "error": error,
        "residency": res, "pinned_by": pins, "pool_pages": pages, "load_error": load_error,
        "requests_in_flight": in_use, "path": e.path,
    });
    if let Some(info) = &e.info {
        let m = &info.manifest;
        v["display_name"] = json!(m.display_name);
        v["contributor"] = json!(m.contributor);
        v["license"] = json!(m.license);
        v["source_digest"] = json!(m.source_digest);
        v["created"] = json!(m.created);
        v["rank"] = json!(info.rank);
        v["scaling"] = json!(info.scaling);
        v["dtype"] = json!(format!("{:?}", info.dtype).to_lowercase());
        v["targets"] = json!(info.targets.iter().map(|p| p.hf_name()).collect::<Vec<_>>());
        v["bytes"] = json!(info.file_len);
        v["payload_blake3"] = json!(hex(&info.payload_digest));
    }
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub async fn list_adapters(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let r = ready(&s)?;
    let reg = read_lock(&r.registry, "registry")?;
    let data: Vec<Value> = reg
        .ids()
        .filter_map(|id| reg.get(id).map(|e| entry_json(r, id, e)))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

pub async fn show_adapter(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let r = ready(&s)?;
    let reg = read_lock(&r.registry, "registry")?;
    let e = reg.get(&id).ok_or_else(|| adapter_not_found(&id))?;
    Ok(axum::Json(entry_json(r, &id, e)).into_response())
}

fn adapter_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("No adapter `{id}` is registered (GET /v1/adapters lists them)"),
    )
    .code("adapter_not_found")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    /// A PEFT folder on the box, under the adapters directory.
    path: String,
    id: String,
    contributor: String,
    license: Option<String>,
    display_name: Option<String>,
    #[serde(default)]
    replace: bool,
}

pub async fn import_adapter(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let r = ready(&s)?;
    let b: ImportBody = read_json(&s, &headers, body).await?;
    validate_id(&b.id).map_err(|e| ApiError::invalid("id", e))?;
    if b.id == r.base_id {
        return Err(ApiError::invalid(
            "id",
            format!("`{}` is the base model's id", b.id),
        ));
    }
    if b.contributor.trim().is_empty() {
        return Err(ApiError::invalid("contributor", "contributor is empty"));
    }
    let (src, dir, fingerprint) = {
        let reg = read_lock(&r.registry, "registry")?;
        if !b.replace && reg.get(&b.id).is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                format!(
                    "adapter `{}` exists (send \"replace\": true to replace it)",
                    b.id
                ),
            )
            .param("id")
            .code("adapter_exists"));
        }
        let src = reg
            .resolve_in_dir(std::path::Path::new(&b.path))
            .map_err(|e| ApiError::invalid("path", e))?;
        (src, reg.dir().to_path_buf(), *reg.fingerprint())
    };
    if b.replace && in_use(r, &b.id) > 0 {
        return Err(in_use_error(&b.id));
    }
    let req = ImportRequest {
        id: b.id.clone(),
        contributor: b.contributor,
        license: b.license,
        display_name: b.display_name,
        replace: b.replace,
    };
    let model = r.model.clone();
    // Conversion reads and writes files: off the async workers, and outside the registry's
    // lock so requests keep resolving their adapters meanwhile.
    let info = tokio::task::spawn_blocking(move || {
        crate::adapters::registry::convert(&dir, &fingerprint, &src, &req, &model.config)
    })
    .await
    .map_err(|e| ApiError::internal(format!("import task: {e}")))?
    .map_err(import_error)?;
    write_lock(&r.registry, "registry")?.insert(info);
    // A replaced pack's old copy must not be served again.
    let _ = r.tx.send(EngineMsg::Forget(b.id.clone()));
    let reg = read_lock(&r.registry, "registry")?;
    let e = reg.get(&b.id).ok_or_else(|| adapter_not_found(&b.id))?;
    Ok((StatusCode::CREATED, axum::Json(entry_json(r, &b.id, e))).into_response())
}

fn import_error(e: PackError) -> ApiError {
    match &e {
        PackError::Io { .. } => ApiError::invalid("path", e.to_string()),
        _ => ApiError::bad_request(e.to_string()).code("invalid_adapter"),
    }
}

fn in_use(r: &Ready, id: &str) -> usize {
    r.in_use
        .lock()
        .ok()
        .and_then(|m| m.get(id).copied())
        .unwrap_or(0)
}

fn in_use_error(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "invalid_request_error",
        format!("adapter `{id}` is serving requests; retry when they finish"),
    )
    .code("adapter_in_use")
}

pub async fn delete_adapter(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let r = ready(&s)?;
    let mut reg = write_lock(&r.registry, "registry")?;
    if reg.get(&id).is_none() {
        return Err(adapter_not_found(&id));
    }
    // Checked under the registry's write lock: no new request can resolve it meanwhile.
    if in_use(r, &id) > 0 {
        return Err(in_use_error(&id));
    }
    reg.remove(&id)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    drop(reg);
    let _ = r.tx.send(EngineMsg::Forget(id.clone()));
    Ok(axum::Json(json!({"id": id, "object": "adapter", "deleted": true})).into_response())
}

// ---------------------------------------------------------------- /v1/prompts

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptBody {
    id: String,
    /// A minijinja template; a request fills it with `prompt_vars`.
    template: String,
    contributor: String,
    #[serde(default)]
    replace: bool,
}

fn prompt_json(t: &crate::attribution::PromptTemplate) -> Value {
    json!({"id": t.id, "object": "prompt_template", "template": t.template,
           "contributor": t.contributor, "created": t.created})
}

pub async fn list_prompts(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let r = ready(&s)?;
    let store = read_lock(&r.prompts, "prompt store")?;
    let data: Vec<Value> = store.list().map(prompt_json).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

pub async fn register_prompt(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let r = ready(&s)?;
    let b: PromptBody = read_json(&s, &headers, body).await?;
    let mut store = write_lock(&r.prompts, "prompt store")?;
    let t = store
        .register(&b.id, &b.template, &b.contributor, b.replace)
        .map_err(|e| match e {
            crate::attribution::prompts::PromptError::Io { .. } => {
                ApiError::internal(e.to_string())
            }
            _ => ApiError::bad_request(e.to_string()).code("invalid_prompt_template"),
        })?;
    Ok((StatusCode::CREATED, axum::Json(prompt_json(t))).into_response())
}

pub async fn delete_prompt(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let r = ready(&s)?;
    let mut store = write_lock(&r.prompts, "prompt store")?;
    if !store
        .remove(&id)
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("No prompt template `{id}` is registered"),
        )
        .code("prompt_not_found"));
    }
    Ok(axum::Json(json!({"id": id, "object": "prompt_template", "deleted": true})).into_response())
}

// ---------------------------------------------------------------- /v1/attribution

fn ledger(r: &Ready) -> ApiResult<&edgelora_ledger::LedgerHandle> {
    r.ledger.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the attribution ledger is not open",
        )
    })
}

fn ledger_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("attribution ledger: {e}"))
}

/// Requests, prompt and completion tokens per contributor and kind, as derived from the log.
pub async fn attribution_counters(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let l = ledger(ready(&s)?)?;
    let counters = l.counters();
    let data: Vec<Value> = counters
        .iter()
        .map(|(who, kind, c)| {
            json!({"contributor": who, "kind": kind.name(), "requests": c.requests,
                   "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list", "data": data, "events": l.event_count(),
        "checkpoint": l.latest_checkpoint().map(|c| c.note().to_string()),
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

pub async fn attribution_events(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<EventsQuery>,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let l = ledger(ready(&s)?)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "limit must be in [1, 1000]"));
    }
    let events = l
        .events(q.since.unwrap_or(0), limit)
        .map_err(ledger_error)?;
    let data: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(&e.body).unwrap_or(Value::Null);
            v["seq"] = json!(e.seq);
            v["request_digest"] = json!(hex(&e.body.request_digest));
            v
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofQuery {
    seq: u64,
}

/// An inclusion proof of event `seq` in the tree of the latest signed checkpoint.
pub async fn attribution_proof(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ProofQuery>,
) -> ApiResult<Response> {
    check_admin(&s, &headers)?;
    let l = ledger(ready(&s)?)?;
    // An event after the last checkpoint: sign one now, then prove against it.
    let p = l
        .inclusion_proof(q.seq)
        .or_else(|_| {
            if q.seq < l.next_seq() {
                l.checkpoint_now()?;
            }
            l.inclusion_proof(q.seq)
        })
        .map_err(|e| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                e.to_string(),
            )
            .param("seq")
        })?;
    let mut event = serde_json::to_value(&p.event.body).unwrap_or(Value::Null);
    event["seq"] = json!(p.event.seq);
    event["request_digest"] = json!(hex(&p.event.body.request_digest));
    Ok(axum::Json(json!({
        "object": "inclusion_proof", "event": event, "leaf_index": p.leaf_index,
        "leaf_hash": hex(&p.leaf_hash), "path": p.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        "checkpoint": p.checkpoint.note(), "public_key": l.public_key().to_verifier_string(),
    }))
    .into_response())
}
