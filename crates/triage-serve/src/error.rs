//! The error answer of every endpoint, [`ApiError`]: an HTTP status, a stable code and a
//! message, sent as `{"error": {"code", "message", ...details}}`. A leaf module: the handlers
//! (`api`, `jobs`), the state and the disk quota build it; it depends on none of them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use triage_train::admission::{LimitError, MemoryError};

/// An error answer: `{"error": {"code", "message", ...details}}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// What happened and what to do.
    pub message: String,
    /// Machine-readable facts merged into the error object (e.g. `field` and `limit` of a
    /// `limit_exceeded`).
    pub details: Vec<(&'static str, Value)>,
    retry_after: Option<u64>,
}

impl ApiError {
    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422 with `code`.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 with `Retry-After`.
    pub fn busy(retry_after_s: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after_s),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "all workers are busy and the queue is full; retry after the Retry-After delay",
            )
        }
    }

    /// 504.
    pub fn timeout(what: &str) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("the request timed out {what}; retry later or send less text"),
        )
    }

    /// 500 (the cause is logged; the answer says only what failed).
    pub fn internal(what: &str, cause: impl std::fmt::Display) -> Self {
        tracing::error!("{what}: {cause}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what} failed: {cause}"),
        )
    }

    /// 503 `warming_up` with `Retry-After`: the model is not ready yet.
    pub fn warming_up(retry_after_s: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after_s),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "warming_up",
                "the model is warming up",
            )
        }
    }

    /// Any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after: None,
        }
    }

    /// Adds a machine-readable fact to the error object.
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        self.details.push((key, value.into()));
        self
    }

    /// The JSON body, `{"error": {"code", "message", ...details}}`.
    pub(crate) fn body(&self) -> Value {
        let mut e = serde_json::Map::new();
        e.insert("code".into(), self.code.into());
        e.insert("message".into(), self.message.clone().into());
        e.extend(self.details.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        serde_json::json!({ "error": e })
    }
}

/// A size outside its bounds: 422 `limit_exceeded` with `field`, `value` and `limit`.
impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        ApiError::unprocessable("limit_exceeded", e.to_string())
            .with("field", e.field)
            .with("value", e.value)
            .with("limit", e.limit)
    }
}

/// Work that does not fit in memory: 507 `insufficient_memory` with the figures in bytes.
impl From<MemoryError> for ApiError {
    fn from(e: MemoryError) -> Self {
        tracing::warn!("refused: {e}");
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_memory",
            e.to_string(),
        )
        .with("need_bytes", e.need)
        .with("available_bytes", e.available)
        .with("reserve_bytes", e.reserve)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}
