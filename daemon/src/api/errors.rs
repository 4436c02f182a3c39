//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 `invalid_request_error` naming the offending parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).param(param)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }

    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist (GET /v1/models lists them)"),
        )
        .param("model")
        .code("model_not_found")
    }

    /// A registered adapter that cannot be served (its pack was refused or failed to load).
    pub fn adapter_unavailable(message: &str) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .param("model")
            .code("adapter_unavailable")
    }

    /// 403: a valid key without the right (an admin route with a user key).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message).code("forbidden")
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Missing or incorrect API key: send `Authorization: Bearer <key>`",
        )
        .code("invalid_api_key")
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body exceeds {limit} bytes"),
        )
        .code("request_too_large")
    }

    pub fn loading() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The model is still loading",
        )
        .code("model_loading")
    }

    /// 503: the unsynced attribution log is over the device's cap; nothing was accepted.
    pub fn attribution_backlog_full(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .code("attribution_backlog_full")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A serde error on the request body as a 400, naming the field when serde does.
pub fn from_json_error(e: &serde_json::Error) -> ApiError {
    let msg = e.to_string();
    let param = msg
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
        .or_else(|| {
            msg.strip_prefix("missing field `")
                .and_then(|r| r.split('`').next())
        })
        .map(str::to_string);
    let message = if e.is_syntax() || e.is_eof() {
        format!("The request body is not valid JSON: {msg}")
    } else if msg.starts_with("unknown field") {
        format!("Unrecognized request argument supplied: {msg}")
    } else {
        format!("Invalid request: {msg}")
    };
    let mut err = ApiError::bad_request(message);
    err.param = param;
    err
}
