//! Request and response types, the error body, and the structuring handlers
//! (`/v1/tickets`, `/v1/tickets:batch`, `/api/v1/classify`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use triage_infer::{InferError, Meta, Structured};

use crate::state::AppState;

/// An error answer: `{"error": {"code", "message"}}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// What happened and what to do.
    pub message: String,
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

    /// Any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn body(&self) -> Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
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

/// Maps a structuring failure to its status: input problems are 422, a passed deadline 504.
fn infer_error(e: InferError) -> ApiError {
    match e {
        InferError::EmptyInput => ApiError::unprocessable("empty_text", "the incident text is empty"),
        InferError::TooLong { tokens, budget } => ApiError::unprocessable(
            "text_too_long",
            format!("the prompt has {tokens} tokens; the budget is {budget}: send a shorter text"),
        ),
        InferError::Deadline { .. } => ApiError::timeout("while decoding"),
        other => ApiError::internal("structuring", other),
    }
}

/// Parses a JSON body, naming the line and column of a syntax error and the field of a
/// type error.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => "invalid_request",
            _ => "malformed_json",
        };
        let status = match code {
            "invalid_request" => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, code, format!("request body: {e}"))
    })
}

/// `POST /v1/tickets` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    /// The incident, free text.
    pub text: String,
    /// Taxonomy name (default: the first one served).
    #[serde(default)]
    pub taxonomy: Option<String>,
}

/// `POST /v1/tickets:batch` item.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    /// Caller's id, echoed back.
    #[serde(default)]
    pub id: Option<String>,
    /// The incident, free text.
    pub text: String,
}

/// `POST /v1/tickets:batch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The incidents.
    pub items: Vec<BatchItem>,
    /// Taxonomy name (default: the first one served).
    #[serde(default)]
    pub taxonomy: Option<String>,
}

/// `POST /api/v1/classify` body (Open Ticket AI compatible).
#[derive(Debug, Deserialize)]
pub struct ClassifyRequest {
    /// The ticket text.
    pub ticket_data: String,
}

/// The `meta` of a ticket answer.
#[derive(Debug, Serialize)]
pub struct TicketMeta {
    /// Probability of the chosen value, per enum field.
    pub confidence: serde_json::Map<String, Value>,
    /// Whether a field is under the review threshold.
    pub needs_review: bool,
    /// Milliseconds: prefill, decode, mask, total.
    pub timings: triage_infer::Timings,
    /// Taxonomy used.
    pub taxonomy: String,
    /// Adapter used (`null`: the base model).
    pub adapter: Option<String>,
    /// Input hygiene notes (truncation, lossy UTF-8).
    pub warnings: Vec<String>,
}

fn ticket_meta(m: &Meta, taxonomy: &str, adapter: Option<&str>) -> TicketMeta {
    TicketMeta {
        confidence: m
            .confidence
            .iter()
            .map(|c| (c.field.clone(), Value::from(c.confidence as f64)))
            .collect(),
        needs_review: m.needs_review,
        timings: m.timings.clone(),
        taxonomy: taxonomy.to_owned(),
        adapter: adapter.map(str::to_owned),
        warnings: m.warnings.clone(),
    }
}

impl AppState {
    /// Checks the texts, waits for a worker, and structures them in order on a blocking
    /// thread, within the request's deadline.
    async fn structure(
        &self,
        taxonomy: Option<&str>,
        texts: Vec<String>,
    ) -> Result<(Vec<Result<Structured, ApiError>>, String, Option<String>), ApiError> {
        if !self.is_ready() {
            return Err(ApiError {
                retry_after: Some(self.config.retry_after_s),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "warming_up",
                    "the model is warming up",
                )
            });
        }
        let desk = self.desk(taxonomy)?;
        let max = self.config.max_input_chars;
        let mut checked = Vec::with_capacity(texts.len());
        for t in texts {
            let n = t.chars().count();
            checked.push(match n {
                _ if t.trim().is_empty() => Err(ApiError::unprocessable(
                    "empty_text",
                    "the incident text is empty",
                )),
                n if n > max => Err(ApiError::unprocessable(
                    "text_too_long",
                    format!("the text has {n} characters; the limit is {max}"),
                )),
                _ => Ok(t),
            });
        }
        let start = tokio::time::Instant::now();
        let deadline = start + self.config.request_timeout;
        let permit = self.admission.enter(deadline, self.config.retry_after_s).await?;
        self.metrics.queue_wait(start.elapsed().as_secs_f64());
        let engine = desk.engine();
        let std_deadline =
            std::time::Instant::now() + deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = engine.clone();
        let results = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            checked
                .into_iter()
                .map(|t| {
                    t.and_then(|t| {
                        e.structurer
                            .structure_until(&t, Some(std_deadline))
                            .map_err(infer_error)
                    })
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ApiError::internal("the structuring worker", e))?;
        for r in results.iter().flatten() {
            self.metrics.ticket(&r.meta);
        }
        Ok((results, desk.name().to_owned(), engine.adapter.clone()))
    }
}

/// `POST /v1/tickets`: one incident → `{ticket, meta}`.
pub async fn tickets(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: TicketRequest = parse_json(&body)?;
    let (mut r, taxonomy, adapter) = s.structure(req.taxonomy.as_deref(), vec![req.text]).await?;
    let st = r.pop().expect("one result per text")?;
    let meta = ticket_meta(&st.meta, &taxonomy, adapter.as_deref());
    Ok(Json(serde_json::json!({"ticket": st.ticket, "meta": meta})))
}

/// `POST /v1/tickets:batch`: up to `max_batch` incidents → per-item `{id, ticket, meta}` or
/// `{id, error}` (one bad item does not fail the others).
pub async fn tickets_batch(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: BatchRequest = parse_json(&body)?;
    if req.items.is_empty() || req.items.len() > s.config.max_batch {
        return Err(ApiError::unprocessable(
            "batch_size",
            format!(
                "a batch holds 1 to {} items; got {}",
                s.config.max_batch,
                req.items.len()
            ),
        ));
    }
    let ids: Vec<Option<String>> = req.items.iter().map(|i| i.id.clone()).collect();
    let texts = req.items.into_iter().map(|i| i.text).collect();
    let (results, taxonomy, adapter) = s.structure(req.taxonomy.as_deref(), texts).await?;
    let items: Vec<Value> = results
        .into_iter()
        .zip(ids)
        .map(|(r, id)| match r {
            Ok(st) => serde_json::json!({
                "id": id, "ticket": st.ticket, "meta": ticket_meta(&st.meta, &taxonomy, adapter.as_deref())
            }),
            Err(e) => serde_json::json!({"id": id, "error": e.body()["error"]}),
        })
        .collect();
    Ok(Json(serde_json::json!({ "results": items })))
}

/// `POST /api/v1/classify`: Open Ticket AI's classify call. `predicted_label` is the value of
/// the taxonomy's first enum field (the category) and `confidence` its probability; the full
/// ticket comes along.
pub async fn classify(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: ClassifyRequest = parse_json(&body)?;
    let (mut r, taxonomy, adapter) = s.structure(None, vec![req.ticket_data]).await?;
    let st = r.pop().expect("one result per text")?;
    let first = st.meta.confidence.first();
    Ok(Json(serde_json::json!({
        "predicted_label": first.map(|c| c.value.clone()),
        "confidence": first.map(|c| c.confidence),
        "ticket": st.ticket,
        "meta": ticket_meta(&st.meta, &taxonomy, adapter.as_deref()),
    })))
}
