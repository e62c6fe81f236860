//! The HTTP service behind `triage serve` (axum on tokio).
//!
//! * Native API: `POST /v1/tickets` (`{text, taxonomy?}` → `{ticket, meta}`) and
//!   `POST /v1/tickets:batch`.
//! * Open Ticket AI compatible: `POST /api/v1/classify`, `POST /api/v1/train-data` (CSV),
//!   `POST /api/v1/train`, `GET /api/v1/train/{id}`, plus `POST /api/v1/train/{id}/activate`
//!   and `GET /api/v1/train` (every job, those of earlier runs included: job statuses are kept
//!   in the data folder and survive a restart).
//! * Operations: `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus), `GET /openapi.json`.
//!
//! Safety: bearer-token auth ([`ServeConfig::token`]), requests from other web origins and,
//! without a token, `Host` names other than loopback refused (403: a web page the user visits
//! cannot drive the service on the user's machine), body limits (413), input limits (422),
//! a fixed number of workers sharing one model instance and its system-prompt cache, a bounded
//! queue (503 + `Retry-After` when full), a per-request deadline enforced between decoding
//! steps (504), graceful shutdown that finishes requests in flight and checkpoints a running
//! training job. Every error is a JSON body `{"error": {"code", "message"}}`.
//!
//! Admission control, so that no request, configuration or upload can exhaust the machine
//! (`docs/limits.md` lists every limit and its default):
//! * every user-controlled size is bounded: text length and batch size of ticket requests,
//!   rows and bytes of uploads, and rank, steps, learning rate, batch, accumulation and
//!   sequence length of training jobs ([`limits::TrainLimits`]); a request outside is a 422
//!   `limit_exceeded` naming the field, its bound and the flag that moves it;
//! * a training job, an adapter activation (and, in `triage serve`, the model and each
//!   taxonomy at startup) is admitted only when its estimated memory fits in what the process
//!   may use (cgroup limit or `MemAvailable`) less what serving needs (507
//!   `insufficient_memory`);
//! * datasets, runs and adapters share a disk quota with a retention rule (see the `disk`
//!   module); what does not fit is a 507 `insufficient_storage`, and no write leaves a
//!   partial file.

mod api;
mod disk;
mod error;
#[cfg(test)]
mod fuzz_tests;
mod jobs;
pub mod limits;
mod metrics;
mod openapi;
mod state;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sha2::{Digest, Sha256};

pub use disk::{recover_swaps, QuotaError};
pub use error::ApiError;
pub use jobs::{JobState, JobStatus};
pub use limits::TrainLimits;
pub use openapi::ROUTES;
pub use state::{AppState, Desk, Engine, ServeConfig, TrainContext};

/// The service's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let c = &state.config;
    let upload = Router::new()
        .route("/api/v1/train-data", post(jobs::train_data))
        .layer(DefaultBodyLimit::max(c.max_upload_bytes));
    let json = Router::new()
        .route("/v1/tickets", post(api::tickets))
        .route("/v1/tickets:batch", post(api::tickets_batch))
        .route("/api/v1/classify", post(api::classify))
        .route("/api/v1/train", post(jobs::train_start).get(jobs::train_list))
        .route("/api/v1/train/{id}", get(jobs::train_status))
        .route("/api/v1/train/{id}/activate", post(jobs::train_activate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .layer(DefaultBodyLimit::max(c.max_body_bytes));
    Router::new()
        .merge(upload)
        .merge(json)
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves; requests in flight are
/// finished, and a running training job is asked to checkpoint and stop: this returns once it
/// has (its record then says `stopped`, listed as `interrupted` at the next start).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = state.stop.clone();
    let app = router(state.clone());
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing requests in flight");
            stop.store(true, Ordering::SeqCst);
        })
        .await;
    if let Some(id) = state.jobs.running_id() {
        tracing::info!("shutting down: waiting for training job {id} to checkpoint");
        while state.jobs.running() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    served
}

/// Whether `bind` may be served without a token (loopback only).
pub fn is_loopback(bind: &std::net::SocketAddr) -> bool {
    bind.ip().is_loopback()
}

/// Authentication (all but `/healthz` and `/readyz`), the browser checks of [`browser_refusal`]
/// and request metrics.
async fn guard(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let open = matches!(route.as_str(), "/healthz" | "/readyz");
    let response = if let Some(refused) = browser_refusal(&req, s.config.token.is_none()) {
        refused.into_response()
    } else {
        match (&s.config.token, open) {
            (Some(token), false) if !authorized(&req, token) => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send the header `Authorization: Bearer <token>` with the server's token",
            )
            .into_response(),
            _ => next.run(req).await,
        }
    };
    s.metrics
        .request(&route, response.status().as_u16(), t0.elapsed().as_secs_f64());
    response
}

/// The host part of a `Host` header or of an origin's authority (`[::1]:8080` → `[::1]`).
fn host_name(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        // Up to and including the `]`; without one, the whole (refused) authority.
        Some(v6) => v6.find(']').map_or(authority, |i| &authority[..i + 2]),
        None => authority.split(':').next().unwrap_or(authority),
    }
}

/// Refuses what only a web page the user is visiting would send, so that a page cannot use
/// a service on the user's machine (which needs no token on loopback):
/// * a request whose `Origin` is not the service's own (a cross-site `fetch`, even a "simple"
///   `no-cors` POST that skips the CORS preflight, carries its page's origin); clients that
///   are not browsers send no `Origin` and are not affected;
/// * without a token, a `Host` that is not a loopback name: a DNS-rebinding page reaches
///   127.0.0.1 under its own domain name.
fn browser_refusal(req: &Request, tokenless: bool) -> Option<ApiError> {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if authority.is_none() || authority != host {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "requests from web pages of another origin ({origin}) are refused; \
                     call the service from a program (no `Origin` header) or from its own origin"
                ),
            ));
        }
    }
    if let (true, Some(host)) = (tokenless, host) {
        let name = host_name(host);
        let loopback = name.eq_ignore_ascii_case("localhost")
            || name == "[::1]"
            || name
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                format!(
                    "Host `{host}` is not a loopback name: without a token the service answers \
                     only localhost, 127.0.0.1 and [::1] (set a token to serve other names)"
                ),
            ));
        }
    }
    None
}

/// Compares digests, so the comparison time does not depend on the token's prefix. The
/// scheme is case-insensitive (RFC 9110), and both tokens are trimmed (a token read from a
/// secret file often ends in a newline).
fn authorized(req: &Request, token: &str) -> bool {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, t)| t);
    let token = token.trim();
    !token.is_empty() && Sha256::digest(given.trim().as_bytes()) == Sha256::digest(token.as_bytes())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let desks: Vec<serde_json::Value> = s
        .desks()
        .iter()
        .map(|d| serde_json::json!({"taxonomy": d.name(), "adapter": d.engine().adapter}))
        .collect();
    let body = Json(serde_json::json!({"ready": s.is_ready(), "taxonomies": desks}));
    match s.is_ready() {
        true => body.into_response(),
        false => {
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.config.retry_after_s));
            r
        }
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let text = s.metrics.render(
        s.admission.busy(s.config.workers),
        s.admission.waiting(),
        s.is_ready(),
        s.jobs.running(),
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn openapi_json(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(openapi::document(&s))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see /openapi.json")
}

/// A known route with another method: 405 with the JSON error body (axum adds `Allow`).
async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not served here; the methods are in the Allow header and /openapi.json"),
    )
}
