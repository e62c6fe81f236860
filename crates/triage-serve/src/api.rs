//! Request and response types, the request-body readers, and the structuring handlers
//! (`/v1/tickets`, `/v1/tickets:batch`, `/api/v1/classify`). The error answer is
//! [`crate::error::ApiError`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use triage_infer::{InferError, Meta, Structured};
use triage_train::admission::fmt_bytes;

use crate::error::ApiError;
use crate::state::{AppState, Engine};

/// A deadline this far away never comes (a request timeout longer than an `Instant` can hold).
const FAR_FUTURE: std::time::Duration = std::time::Duration::from_secs(30 * 365 * 86_400);

/// The request body, or 413 naming the limit and the flag that sets it (`flag`) when it was
/// over `limit` bytes.
pub(crate) fn body(b: Result<Bytes, BytesRejection>, limit: usize, flag: &str) -> Result<Bytes, ApiError> {
    b.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request body is over the limit of {limit} bytes ({}): send less, or start the \
                 server with a higher {flag}",
                fmt_bytes(limit as u64)
            ),
        )
        .with("field", "body")
        .with("limit", limit),
        status => ApiError::new(status, "bad_body", r.body_text()),
    })
}

/// Maps a structuring failure to its status: input problems are 422, a passed deadline 504.
fn infer_error(e: InferError) -> ApiError {
    match e {
        InferError::EmptyInput => ApiError::unprocessable("empty_text", "the incident text is empty"),
        InferError::TooLong { tokens, budget } => ApiError::unprocessable(
            "text_too_long",
            format!(
                "the prompt has {tokens} tokens; the budget is {budget} (the model's context less \
                 --max-new-tokens): send a shorter text"
            ),
        )
        .with("field", "text")
        .with("limit", budget),
        InferError::Deadline { .. } => ApiError::timeout("while decoding"),
        e @ InferError::RemoteInvalid { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, "backend_invalid_answer", e.to_string())
        }
        e @ InferError::Remote { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, "backend_unavailable", e.to_string())
        }
        other => ApiError::internal("structuring", other),
    }
}

/// A JSON endpoint's body (413 over `--max-body-bytes`).
pub(crate) fn json_body(s: &AppState, b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body(b, s.config.max_body_bytes, "--max-body-bytes")
}

/// Parses a JSON body, naming the line and column of a syntax error and the field of a
/// type error (`rank: invalid value: integer `-1`, expected usize`).
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (status, code) = match inner.classify() {
            serde_json::error::Category::Data => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            _ => (StatusCode::BAD_REQUEST, "malformed_json"),
        };
        match path.as_str() {
            "." | "" => ApiError::new(status, code, format!("request body: {inner}")),
            p => ApiError::new(status, code, format!("request body: {p}: {inner}")).with("field", p),
        }
    })?;
    // Trailing characters after the value are a syntax error, as with `from_slice`.
    de.end()
        .map_err(|e| ApiError::bad_request("malformed_json", format!("request body: {e}")))?;
    Ok(value)
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
    /// Forward passes this ticket shared with other tickets decoded at the same time (0: it
    /// was decoded alone).
    pub shared_passes: usize,
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
        shared_passes: m.shared_passes,
        taxonomy: taxonomy.to_owned(),
        adapter: adapter.map(str::to_owned),
        warnings: m.warnings.clone(),
    }
}

impl AppState {
    /// Checks the texts, waits for a worker, and structures them within the request's
    /// deadline. A batch also takes the workers that are idle at that moment (never waiting
    /// for more) and decodes that many items at once; their forward passes are shared (see
    /// `triage_infer`'s batcher), and the results keep the request's order. Also gives the
    /// desk's name and the engine the texts were decoded with (its adapter and taxonomy).
    async fn structure(
        &self,
        taxonomy: Option<&str>,
        texts: Vec<String>,
    ) -> Result<(Vec<Result<Structured, ApiError>>, String, Arc<Engine>), ApiError> {
        if !self.is_ready() {
            return Err(ApiError::warming_up(self.config.retry_after_s));
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
                    format!(
                        "the text has {n} characters; the limit is {max}: send a shorter text (the \
                         server's --max-input-chars sets the limit)"
                    ),
                )
                .with("field", "text")
                .with("limit", max)),
                _ => Ok(t),
            });
        }
        let start = tokio::time::Instant::now();
        // A library caller may set any Duration; past what an Instant holds, the deadline is
        // 30 years away (tokio's own "far future") instead of an overflow panic.
        let deadline = start
            .checked_add(self.config.request_timeout)
            .unwrap_or_else(|| start + FAR_FUTURE);
        let permit = self.admission.enter(deadline, self.config.retry_after_s).await?;
        let mut permits = vec![permit];
        let wanted = checked.iter().filter(|t| t.is_ok()).count();
        permits.extend(self.admission.idle(wanted.saturating_sub(1)));
        self.metrics.queue_wait(start.elapsed().as_secs_f64());
        let engine = desk.engine();
        let std_deadline =
            std::time::Instant::now() + deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = engine.clone();
        let results = tokio::task::spawn_blocking(move || {
            let concurrency = permits.len();
            let _permits = permits;
            // Items refused by the checks keep their error; the others are decoded.
            let (texts, mut results): (Vec<_>, Vec<_>) = checked
                .into_iter()
                .map(|c| match c {
                    Ok(t) => (Some(t), None),
                    Err(e) => (None, Some(Err(e))),
                })
                .unzip();
            triage_infer::for_each_concurrently(
                texts.len(),
                concurrency,
                |i| {
                    texts[i].as_ref().map(|t| {
                        e.tickets()
                            .structure_until(t, Some(std_deadline))
                            .map_err(infer_error)
                    })
                },
                |i, r| {
                    if let Some(r) = r {
                        results[i] = Some(r);
                    }
                    true
                },
            );
            results
                .into_iter()
                .map(|r: Option<Result<Structured, ApiError>>| {
                    r.unwrap_or_else(|| Err(ApiError::internal("the structuring worker", "no result")))
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ApiError::internal("the structuring worker", e))?;
        for r in results.iter().flatten() {
            self.metrics.ticket(&r.meta);
        }
        Ok((results, desk.name().to_owned(), engine))
    }
}

/// `POST /v1/tickets`: one incident → `{ticket, meta}`.
pub async fn tickets(
    State(s): State<Arc<AppState>>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TicketRequest = parse_json(&json_body(&s, b)?)?;
    let (mut r, taxonomy, engine) = s.structure(req.taxonomy.as_deref(), vec![req.text]).await?;
    let st = r.pop().expect("one result per text")?;
    let meta = ticket_meta(&st.meta, &taxonomy, engine.adapter.as_deref());
    Ok(Json(serde_json::json!({"ticket": st.ticket, "meta": meta})))
}

/// `POST /v1/tickets:batch`: up to `max_batch` incidents → per-item `{id, ticket, meta}` or
/// `{id, error}` (one bad item does not fail the others).
pub async fn tickets_batch(
    State(s): State<Arc<AppState>>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: BatchRequest = parse_json(&json_body(&s, b)?)?;
    if req.items.is_empty() || req.items.len() > s.config.max_batch {
        return Err(ApiError::unprocessable(
            "batch_size",
            format!(
                "a batch holds 1 to {} items; got {}: split it (the server's --max-batch sets the \
                 limit)",
                s.config.max_batch,
                req.items.len()
            ),
        )
        .with("field", "items")
        .with("limit", s.config.max_batch));
    }
    let ids: Vec<Option<String>> = req.items.iter().map(|i| i.id.clone()).collect();
    let texts = req.items.into_iter().map(|i| i.text).collect();
    let (results, taxonomy, engine) = s.structure(req.taxonomy.as_deref(), texts).await?;
    let items: Vec<Value> = results
        .into_iter()
        .zip(ids)
        .map(|(r, id)| match r {
            Ok(st) => serde_json::json!({
                "id": id, "ticket": st.ticket, "meta": ticket_meta(&st.meta, &taxonomy, engine.adapter.as_deref())
            }),
            Err(e) => serde_json::json!({"id": id, "error": e.body()["error"]}),
        })
        .collect();
    Ok(Json(serde_json::json!({ "results": items })))
}

/// `POST /api/v1/classify`: Open Ticket AI's classify call. `predicted_label` is the value of
/// the taxonomy's first enum field (the category) and `confidence` its probability; the full
/// ticket comes along.
pub async fn classify(
    State(s): State<Arc<AppState>>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: ClassifyRequest = parse_json(&json_body(&s, b)?)?;
    let (mut r, taxonomy, engine) = s.structure(None, vec![req.ticket_data]).await?;
    let st = r.pop().expect("one result per text")?;
    // By name, not position: a remote backend may give no confidence for some field.
    let field = engine
        .structurer
        .taxonomy()
        .fields
        .first()
        .map_or("", |f| f.name.as_str());
    let confidence = st.meta.confidence.iter().find(|c| c.field == field);
    Ok(Json(serde_json::json!({
        "predicted_label": st.ticket.get(field),
        "confidence": confidence.map(|c| c.confidence),
        "ticket": st.ticket,
        "meta": ticket_meta(&st.meta, &taxonomy, engine.adapter.as_deref()),
    })))
}
