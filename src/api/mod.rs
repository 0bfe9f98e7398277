//! The DTM-compatible HTTP API (`/api/dtmsvr/...`), plus `/api/ping`, `/api/metrics`, the
//! console (`/` and `/api/admin/...`), and DTM's gRPC API ([`grpc`]) over the same handlers.

mod admin;
pub mod auth;
mod console;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod grpc;
mod layer;
mod trans;
mod wire;

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use futures::future::BoxFuture;

use crate::metrics::Metrics;
use crate::scheduler::{Coordinator, SchedulerError};
use crate::store::StoreError;
use layer::{WrapLayer, Wrapper};

pub use wire::{branch_json, global_json};

/// Errors answered by the API, each with DTM's envelope and a precise status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid input: 400.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown gid or topic: 404.
    #[error("{0}")]
    NotFound(String),
    /// Body over the configured limit: 413.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// DTM's FAILURE: the request conflicts with the transaction's state, 409.
    #[error("{0}")]
    Failure(String),
    /// DTM's ONGOING: not finished yet, 425.
    #[error("{0}")]
    Ongoing(String),
    /// The store is unreachable: 503, retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: 500.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) | StoreError::Closed => ApiError::Unavailable(error.to_string()),
            StoreError::Corrupt(_) => ApiError::Internal(error.to_string()),
            StoreError::Invalid(_) => ApiError::BadRequest(error.to_string()),
        }
    }
}

impl From<SchedulerError> for ApiError {
    fn from(error: SchedulerError) -> Self {
        match error {
            SchedulerError::Store(store) => store.into(),
            SchedulerError::NotFound(_) => ApiError::NotFound(error.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::Failure(message) => (
                StatusCode::CONFLICT,
                json!({"dtm_result": "FAILURE", "message": message}),
            ),
            ApiError::Ongoing(message) => (
                StatusCode::TOO_EARLY,
                json!({"dtm_result": "ONGOING", "message": message}),
            ),
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, json!({"message": message})),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, json!({"message": message})),
            ApiError::PayloadTooLarge(message) => (StatusCode::PAYLOAD_TOO_LARGE, json!({"message": message})),
            ApiError::Unavailable(message) => (StatusCode::SERVICE_UNAVAILABLE, json!({"message": message})),
            ApiError::Internal(message) => (StatusCode::INTERNAL_SERVER_ERROR, json!({"message": message})),
        };
        (status, Json(body)).into_response()
    }
}

/// Result of a handler: a JSON value on success.
pub type ApiResult = Result<Json<Value>, ApiError>;

/// DTM's answer when a handler has nothing to return.
pub fn success() -> ApiResult {
    Ok(Json(json!({"dtm_result": "SUCCESS"})))
}

/// API settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Longest time spent on one request, waiting for a slot included: 503 after it.
    pub timeout: std::time::Duration,
    /// Most requests handled at once; more wait for a slot.
    pub max_concurrent_requests: usize,
    /// Bearer tokens of the DTM routes and metrics; empty: no authentication.
    pub tokens: auth::Tokens,
}

/// Shared state of the handlers, one per process: the HTTP routes and the gRPC service share it.
#[derive(Clone)]
pub struct AppState {
    coordinator: Arc<Coordinator>,
    /// Serializes topic writes of this process: concurrent subscribers would otherwise keep
    /// losing the optimistic race to each other. The version check still guards other processes.
    topic_writes: Arc<tokio::sync::Mutex<()>>,
}

impl AppState {
    /// State over `coordinator`, shared by the routes (and RPCs) built from it.
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        AppState {
            coordinator,
            topic_writes: Arc::default(),
        }
    }
}

/// A JSON body parsed with precise errors: 413 over the limit, 400 for non-UTF-8 or bad JSON.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("request body is larger than the configured limit".to_owned())
            } else {
                ApiError::BadRequest(format!("cannot read request body: {rejection}"))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::BadRequest("request body is empty".to_owned()));
        }
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("request body is not valid UTF-8: {e}")))?;
        serde_json::from_str(text)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// Builds the router.
pub fn router(coordinator: Arc<Coordinator>, config: &ApiConfig) -> Router {
    router_with(AppState::new(coordinator), config)
}

/// Builds the router over `state` (shared with the gRPC service).
pub fn router_with(state: AppState, config: &ApiConfig) -> Router {
    let dtm = Router::new()
        .route("/api/dtmsvr/version", get(admin::version))
        .route("/api/dtmsvr/newGid", get(admin::new_gid))
        .route("/api/dtmsvr/prepare", post(trans::prepare))
        .route("/api/dtmsvr/submit", post(trans::submit))
        .route("/api/dtmsvr/abort", post(trans::abort))
        .route("/api/dtmsvr/forceStop", post(trans::force_stop))
        .route("/api/dtmsvr/registerBranch", post(trans::register_branch))
        .route("/api/dtmsvr/registerXaBranch", post(trans::register_branch))
        .route("/api/dtmsvr/registerTccBranch", post(trans::register_branch))
        .route("/api/dtmsvr/prepareWorkflow", post(trans::prepare_workflow))
        .route("/api/dtmsvr/query", get(admin::query))
        .route("/api/dtmsvr/all", get(admin::all))
        .route("/api/dtmsvr/resetCronTime", get(admin::reset_cron_time))
        .route("/api/dtmsvr/resetNextCronTime", post(admin::reset_next_cron_time))
        .route("/api/dtmsvr/subscribe", get(admin::subscribe))
        .route("/api/dtmsvr/unsubscribe", get(admin::unsubscribe))
        .route("/api/dtmsvr/topic/{name}", delete(admin::delete_topic))
        .route("/api/dtmsvr/scanKV", get(admin::scan_kv))
        .route("/api/dtmsvr/queryKV", get(admin::query_kv))
        .route_layer(WrapLayer(auth::DtmGate(config.tokens.clone())));
    let console = Router::new()
        .route("/transactions", get(console::list))
        .route("/transactions/{gid}", get(console::detail))
        .route("/transactions/{gid}/force-stop", post(console::force_stop))
        .route("/transactions/{gid}/retry-now", post(console::retry_now))
        .route(
            "/transactions/{gid}/retry-compensation",
            post(console::retry_compensation),
        )
        .route("/due", get(console::due))
        .route("/summary", get(console::summary))
        .route_layer(middleware::from_fn_with_state(
            config.tokens.clone(),
            auth::require_token,
        ));
    let metrics = Router::new()
        .route("/api/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            config.tokens.clone(),
            auth::require_token,
        ));
    let routes = Router::new()
        // Merged at their full paths rather than nested: a nested router strips its prefix
        // from every request's URI, and its routes are one router deeper.
        .merge(dtm)
        .nest("/api/admin", console)
        .merge(metrics)
        .route("/", get(console::index))
        .route("/console/app.js", get(console::app_js))
        .route("/console/style.css", get(console::style_css))
        .route("/api/ping", any(|| async { Json(json!({"msg": "pong"})) }))
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(json!({"message": "method not allowed on this route"})),
            )
        })
        .fallback(|| async { ApiError::NotFound("no such route".to_owned()) })
        .layer(WrapLayer(Observe(Arc::clone(state.coordinator.metrics()))))
        .with_state(state);
    // The limits wrap the whole router once, not every route: `Router::layer` puts each layer
    // around each route as a boxed service of its own, which axum clones, level by level, on
    // every request (BENCHMARKS.md, issue 15). Routes the caller adds stay outside the limits.
    Router::new().fallback_service(
        tower::ServiceBuilder::new()
            .layer(TimeoutLayer::with_status_code(
                StatusCode::SERVICE_UNAVAILABLE,
                config.timeout,
            ))
            .layer(GlobalConcurrencyLimitLayer::new(config.max_concurrent_requests.max(1)))
            .layer(DefaultBodyLimit::max(config.max_body_bytes))
            .service(routes),
    )
}

async fn metrics(State(state): State<AppState>) -> Response {
    // The gauges of unfinished transactions are read from the store at scrape time, so that
    // every replica reports the shared store's truth.
    state.coordinator.refresh_gauges().await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        Body::from(state.coordinator.metrics().render()),
    )
        .into_response()
}

/// Counts requests by route and status code and times them.
#[derive(Clone)]
struct Observe(Arc<Metrics>);

impl Wrapper for Observe {
    fn wrap<F>(&self, request: Request, next: impl FnOnce(Request) -> F) -> BoxFuture<'static, Response>
    where
        F: std::future::Future<Output = Response> + Send + 'static,
    {
        let api = request
            .extensions()
            .get::<MatchedPath>()
            .map(|path| route_name(path.as_str()))
            .unwrap_or_else(|| "unmatched".to_owned());
        let started = Instant::now();
        let response = next(request);
        let metrics = Arc::clone(&self.0);
        Box::pin(async move {
            let response = response.await;
            metrics.record_request(api, response.status().as_u16(), started.elapsed());
            response
        })
    }
}

/// Last literal path segment, lowercased (DTM's `api` label).
fn route_name(path: &str) -> String {
    path.rsplit('/')
        .find(|segment| !segment.is_empty() && !segment.starts_with('{'))
        .unwrap_or("root")
        .to_ascii_lowercase()
}
