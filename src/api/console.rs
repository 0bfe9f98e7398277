//! The console's routes (`/api/admin/...`, behind the API's tokens) and its static page at `/`.
//!
//! Every action the page offers is a route here first, usable without the browser. Answers reuse
//! the DTM routes' JSON (`global_json`, `branch_json`), so secrets are redacted the same way.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::wire::{self, TransRequest};
use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::engine;
use crate::model::{Branch, GlobalTrans, Millis, TransStatus, TransType};
use crate::scheduler::Coordinator;
use crate::store::{DuePosition, ListQuery, StatusChange};

type Params = Query<HashMap<String, String>>;

/// Default and largest page of the console's lists.
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

/// The page, its script and its style, embedded in the binary (no CDN, no runtime download).
const INDEX_HTML: &str = include_str!("../../console/index.html");
const APP_JS: &str = include_str!("../../console/app.js");
const STYLE_CSS: &str = include_str!("../../console/style.css");

/// Headers of every console file: no caching of a page that may show a login, and a policy that
/// allows only this origin's script and style (no inline code, no third-party host).
const SECURITY_HEADERS: [(header::HeaderName, &str); 3] = [
    (header::CACHE_CONTROL, "no-store"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
         form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
];

/// `GET /`: the console's page. Open without a token: it holds no data, and asks for a token
/// before it calls any data route.
pub(super) async fn index() -> impl IntoResponse {
    file("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /console/app.js`.
pub(super) async fn app_js() -> impl IntoResponse {
    file("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /console/style.css`.
pub(super) async fn style_css() -> impl IntoResponse {
    file("text/css; charset=utf-8", STYLE_CSS)
}

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    let [a, b, c] = SECURITY_HEADERS;
    ([(header::CONTENT_TYPE, content_type), a, b, c], body)
}

/// `GET /api/admin/transactions?status=&mode=&gid=&from=&to=&before=&limit=`: newest first,
/// keyset paging on the store id (`before` is the previous page's `next`); times in ms.
pub(super) async fn list(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let limit = page_size(&params)?;
    let query = ListQuery {
        before_id: number(&params, "before")?,
        limit,
        status: text(&params, "status")
            .map(|s| TransStatus::parse(s).ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}"))))
            .transpose()?,
        trans_type: text(&params, "mode")
            .map(|t| TransType::parse(t).ok_or_else(|| ApiError::BadRequest(format!("unknown mode {t:?}"))))
            .transpose()?,
        created_from: number(&params, "from")?,
        created_to: number(&params, "to")?,
        gid_prefix: text(&params, "gid")
            .map(|g| wire::check_gid(g).map(|()| g.to_owned()))
            .transpose()?,
    };
    let page = state.coordinator.store().list(&query).await?;
    let next = match page.last() {
        Some(last) if page.len() as i64 == limit => Value::from(last.id.to_string()),
        _ => Value::Null,
    };
    let now = state.coordinator.now();
    Ok(Json(json!({
        "transactions": page.iter().map(|g| row_json(g, now)).collect::<Vec<_>>(),
        "next": next,
    })))
}

/// `GET /api/admin/due?after=&limit=`: unfinished transactions, the one due longest ago first;
/// `after` is the previous page's `next` (`<next_cron_time>.<id>`).
pub(super) async fn due(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let limit = page_size(&params)?;
    let after = text(&params, "after").map(parse_due_position).transpose()?;
    let page = state.coordinator.store().list_due(after, limit).await?;
    let next = match page.last() {
        Some(last) if page.len() as i64 == limit => Value::from(format!("{}.{}", last.next_cron_time, last.id)),
        _ => Value::Null,
    };
    let now = state.coordinator.now();
    Ok(Json(json!({
        "transactions": page.iter().map(|g| row_json(g, now)).collect::<Vec<_>>(),
        "next": next,
    })))
}

/// `GET /api/admin/summary`: unfinished transactions by status and the oldest due one's age.
pub(super) async fn summary(State(state): State<AppState>) -> ApiResult {
    let summary = state.coordinator.store().unfinished_summary().await?;
    let now = state.coordinator.now();
    let counts: serde_json::Map<String, Value> = summary
        .counts
        .iter()
        .map(|(status, count)| (status.as_str().to_owned(), Value::from(*count)))
        .collect();
    Ok(Json(json!({
        "unfinished": counts,
        "oldest_due_age_ms": summary.earliest_due.map(|at| (now - at).max(0)),
    })))
}

/// The transaction `gid` names and its branches; 404 when there is none.
async fn load(coordinator: &Coordinator, gid: &str) -> Result<(GlobalTrans, Vec<Branch>), ApiError> {
    wire::check_gid(gid)?;
    let store = coordinator.store();
    let global = store
        .find(gid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no transaction with gid {gid}")))?;
    Ok((global, store.branches(gid).await?))
}

/// `GET /api/admin/transactions/{gid}`: the transaction, its branch operations in order with what
/// this process saw of their calls, and which actions apply.
pub(super) async fn detail(State(state): State<AppState>, Path(gid): Path<String>) -> ApiResult {
    let coordinator = &state.coordinator;
    let (global, branches) = load(coordinator, &gid).await?;
    let activity = coordinator.activity().of(&gid);
    let operations: Vec<Value> = branches
        .iter()
        .map(|branch| {
            let mut row = wire::branch_json(branch);
            let seen = activity
                .iter()
                .find(|a| a.branch_id == branch.branch_id && a.op == branch.op);
            if let (Value::Object(map), Some(seen)) = (&mut row, seen) {
                map.insert("attempts".to_owned(), Value::from(seen.attempts));
                map.insert("last_outcome".to_owned(), Value::from(seen.last_outcome));
                map.insert("last_error".to_owned(), json!(seen.last_error));
                map.insert("last_call_time".to_owned(), wire::time_text(seen.last_call_time));
            }
            row
        })
        .collect();
    let finished = global.status.is_finished();
    Ok(Json(json!({
        "transaction": row_json(&global, coordinator.now()),
        "branches": operations,
        "actions": {
            "force_stop": !finished,
            "retry_now": !finished,
            "retry_compensation": global.status == TransStatus::Failed && engine::compensation_pending(&global, &branches),
        },
    })))
}

/// `POST /api/admin/transactions/{gid}/force-stop`: DTM's `forceStop` (failed, no compensation).
pub(super) async fn force_stop(State(state): State<AppState>, Path(gid): Path<String>) -> ApiResult {
    let request = TransRequest {
        gid,
        ..TransRequest::default()
    };
    super::trans::force_stop(State(state), JsonBody(request)).await
}

/// `POST /api/admin/transactions/{gid}/retry-now`: an unfinished transaction becomes due at once
/// (its backoff is skipped; one in a pass right now is left to that pass).
pub(super) async fn retry_now(State(state): State<AppState>, Path(gid): Path<String>) -> ApiResult {
    wire::check_gid(&gid)?;
    let coordinator = &state.coordinator;
    let global = coordinator
        .store()
        .find(&gid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no transaction with gid {gid}")))?;
    if global.status.is_finished() {
        return Err(ApiError::Failure(format!(
            "transaction {gid} is {}: nothing to retry",
            global.status
        )));
    }
    coordinator
        .store()
        .reset_next_cron_time(&gid, coordinator.now())
        .await?;
    coordinator.wake();
    super::success()
}

/// `POST /api/admin/transactions/{gid}/retry-compensation`: a failed saga whose compensations did
/// not all run (force-stopped, or stopped by a limit) rolls back again: `failed` to `aborting`,
/// driven at once.
pub(super) async fn retry_compensation(State(state): State<AppState>, Path(gid): Path<String>) -> ApiResult {
    let coordinator = &state.coordinator;
    let (global, branches) = load(coordinator, &gid).await?;
    if global.trans_type != TransType::Saga
        || global.status != TransStatus::Failed
        || !engine::compensation_pending(&global, &branches)
    {
        return Err(ApiError::Failure(format!(
            "transaction {gid} is a {} {}: only a failed saga with compensations left can retry them",
            global.trans_type, global.status
        )));
    }
    let now = coordinator.now();
    let mut change = StatusChange::new(&gid, TransStatus::Failed, TransStatus::Aborting, now);
    change.lease = Some(coordinator.lease(now));
    if !coordinator.store().change_status(&change).await? {
        return Err(ApiError::Failure(format!(
            "transaction {gid} is changing concurrently; retry"
        )));
    }
    coordinator.spawn_pass(gid);
    super::success()
}

/// A transaction as the console lists it: the DTM fields plus times in ms and the due delay.
fn row_json(global: &GlobalTrans, now: Millis) -> Value {
    let mut row = wire::global_json(global);
    if let Value::Object(map) = &mut row {
        map.insert("create_time_ms".to_owned(), Value::from(global.create_time));
        map.insert("next_cron_time_ms".to_owned(), Value::from(global.next_cron_time));
        map.insert(
            "overdue_ms".to_owned(),
            Value::from((now - global.next_cron_time).max(0)),
        );
        if let Some(resource) = resource_of(&global.ext_data) {
            map.insert("resource".to_owned(), resource);
        }
    }
    row
}

/// The Kubernetes resource (`{kind, namespace, name}`) the operator recorded for a transaction.
fn resource_of(ext_data: &str) -> Option<Value> {
    if ext_data.is_empty() {
        return None;
    }
    let mut value: Value = serde_json::from_str(ext_data).ok()?;
    let resource = value.get_mut("resource")?.take();
    let text = |key: &str| resource.get(key).and_then(Value::as_str).map(str::to_owned);
    Some(json!({"kind": text("kind")?, "namespace": text("namespace")?, "name": text("name")?}))
}

fn parse_due_position(text: &str) -> Result<DuePosition, ApiError> {
    let invalid = || ApiError::BadRequest(format!("invalid position {text:?}"));
    let (time, id) = text.split_once('.').ok_or_else(invalid)?;
    Ok(DuePosition {
        next_cron_time: time.parse().map_err(|_| invalid())?,
        id: id.parse().map_err(|_| invalid())?,
    })
}

fn page_size(params: &HashMap<String, String>) -> Result<i64, ApiError> {
    let limit = number(params, "limit")?.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    Ok(limit)
}

fn text<'a>(params: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    params.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

fn number(params: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    text(params, name)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::BadRequest(format!("{name} must be an integer, got {v:?}")))
        })
        .transpose()
}
