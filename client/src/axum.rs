//! Helpers for branch services written with axum: the branch parameters as an extractor, and
//! results answered the way DTM expects (200 SUCCESS, 409 FAILURE, 425 ONGOING).
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use kubetx_client::{BranchParams, Error, axum::Success};
//! async fn trans_in(params: BranchParams) -> kubetx_client::Result<Success> {
//!     if params.gid.is_empty() { return Err(Error::Failure("no gid".into())); }
//!     Ok(Success)
//! }
//! let app: Router = Router::new().route("/api/TransIn", post(trans_in));
//! ```

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::branch::BranchParams;
use crate::error::Error;
use crate::workflow::WorkflowRegistry;

/// Reads `gid`, `trans_type`, `branch_id` and `op` from the query string, or else from the
/// `dtm-gid`, `dtm-trans_type`, `dtm-branch_id`, `dtm-op` headers; 400 when one is missing.
///
/// ```no_run
/// use axum::{Router, routing::post};
/// use kubetx_client::{BranchParams, axum::Success};
/// async fn trans_out(params: BranchParams) -> kubetx_client::Result<Success> {
///     println!("{} {}", params.gid, params.op);
///     Ok(Success)
/// }
/// let app: Router = Router::new().route("/TransOut", post(trans_out));
/// ```
impl<S: Send + Sync> FromRequestParts<S> for BranchParams {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let from_query = BranchParams::from_query(query);
        let params = match from_query {
            Ok(params) => Ok(params),
            Err(_) => {
                let pairs: std::collections::HashMap<String, String> =
                    url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
                let headers = &parts.headers;
                BranchParams::from_lookup(|name| {
                    let from_header = headers
                        .get(format!("dtm-{name}"))
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    pairs.get(name).cloned().or(from_header)
                })
            }
        };
        params.map_err(|e| (StatusCode::BAD_REQUEST, Json(json!({"message": e.to_string()}))).into_response())
    }
}

/// DTM's success answer: 200 `{"dtm_result":"SUCCESS"}`.
///
/// ```
/// use axum::response::IntoResponse;
/// assert_eq!(kubetx_client::axum::Success.into_response().status(), 200);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Success;

impl IntoResponse for Success {
    fn into_response(self) -> Response {
        Json(json!({"dtm_result": "SUCCESS"})).into_response()
    }
}

/// Errors answer as DTM's SDKs answer them: [`Error::Failure`] 409 and [`Error::Ongoing`] 425
/// (each with `dtm_result`), anything else 500, whose outcome the coordinator treats as unknown.
///
/// ```
/// use axum::response::IntoResponse;
/// use kubetx_client::Error;
/// assert_eq!(Error::Failure("no".into()).into_response().status(), 409);
/// assert_eq!(Error::Ongoing("later".into()).into_response().status(), 425);
/// assert_eq!(Error::Unknown("db down".into()).into_response().status(), 500);
/// ```
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let message = match &self {
            Error::Failure(m) | Error::Ongoing(m) => m.clone(),
            other => other.to_string(),
        };
        match self {
            Error::Failure(_) => (
                StatusCode::CONFLICT,
                Json(json!({"dtm_result": "FAILURE", "message": message})),
            )
                .into_response(),
            Error::Ongoing(_) => (
                StatusCode::TOO_EARLY,
                Json(json!({"dtm_result": "ONGOING", "message": message})),
            )
                .into_response(),
            // Not the words FAILURE or ONGOING: a 500 must stay an unknown outcome.
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"message": message.replace("FAILURE", "failure").replace("ONGOING", "ongoing")})),
            )
                .into_response(),
        }
    }
}

/// The handler of a workflow service's resume route: the coordinator calls it (op = the
/// workflow's name, body = its input) to resume a workflow left unfinished.
///
/// ```no_run
/// use axum::{Router, routing::post};
/// # fn f(registry: kubetx_client::WorkflowRegistry) {
/// let app: Router = Router::new()
///     .route("/workflow/resume", post(kubetx_client::axum::workflow_resume))
///     .with_state(registry);
/// # }
/// ```
pub async fn workflow_resume(
    State(registry): State<WorkflowRegistry>,
    params: BranchParams,
    body: Bytes,
) -> Result<Success, Error> {
    registry.execute_by_query(&params, &body).await.map(|_| Success)
}
