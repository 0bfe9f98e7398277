//! Read and housekeeping routes: version, newGid, query, all, cron resets, topics, KV.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::trans::TOPICS;
use super::wire::{self, TransRequest};
use super::{ApiError, ApiResult, AppState, JsonBody, success};
use crate::model::TransStatus;
use crate::store::ListQuery;

type Params = Query<HashMap<String, String>>;

/// Largest page of `/all` and `/scanKV`.
const MAX_PAGE: i64 = 1000;

/// `GET /version`.
pub(super) async fn version() -> ApiResult {
    Ok(Json(json!({"version": concat!("v", env!("CARGO_PKG_VERSION"))})))
}

/// `GET /newGid`: a 22-character base57 id, the shape DTM's shortuuid gives.
pub(super) async fn new_gid() -> ApiResult {
    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let gid: String = (0..22)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    Ok(Json(json!({"gid": gid, "dtm_result": "SUCCESS"})))
}

/// `GET /query?gid=`.
pub(super) async fn query(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let gid = params.get("gid").map(String::as_str).unwrap_or_default();
    if gid.is_empty() {
        return Err(ApiError::BadRequest("no gid specified".to_owned()));
    }
    let store = state.coordinator.store();
    let Some(global) = store.find(gid).await? else {
        return Ok(Json(json!({"transaction": null, "branches": []})));
    };
    let branches = store.branches(gid).await?;
    Ok(Json(json!({
        "transaction": wire::global_json(&global),
        "branches": branches.iter().map(wire::branch_json).collect::<Vec<_>>(),
    })))
}

/// `GET /all?position=&limit=&status=&transType=&createTimeStart=&createTimeEnd=` (times in ms).
pub(super) async fn all(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let store = state.coordinator.store();
    let position = params.get("position").cloned().unwrap_or_default();
    if let Some(gid) = params.get("gid").filter(|g| !g.is_empty()) {
        let found = store.find(gid).await?;
        return Ok(Json(json!({
            "transactions": found.iter().map(wire::global_json).collect::<Vec<_>>(),
            "next_position": position,
        })));
    }
    let limit = number(&params, "limit")?.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    let query = ListQuery {
        before_id: Some(position.as_str())
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse()
                    .map_err(|_| ApiError::BadRequest(format!("invalid position {p:?}")))
            })
            .transpose()?,
        limit,
        status: params
            .get("status")
            .filter(|s| !s.is_empty())
            .map(|s| TransStatus::parse(s).ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}"))))
            .transpose()?,
        trans_type: params
            .get("transType")
            .filter(|t| !t.is_empty())
            .map(|t| wire::parse_trans_type(t))
            .transpose()?,
        created_from: number(&params, "createTimeStart")?,
        created_to: number(&params, "createTimeEnd")?,
        gid_prefix: None,
    };
    let page = store.list(&query).await?;
    let next_position = match page.last() {
        Some(last) if page.len() as i64 == limit => last.id.to_string(),
        _ => String::new(),
    };
    Ok(Json(json!({
        "transactions": page.iter().map(wire::global_json).collect::<Vec<_>>(),
        "next_position": next_position,
    })))
}

/// `GET /resetCronTime?timeout=&limit=`: makes transactions backed off far into the future due now.
pub(super) async fn reset_cron_time(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let coordinator = &state.coordinator;
    let timeout = number(&params, "timeout")?.unwrap_or(3 * coordinator.config().policy.timeout_to_fail);
    let limit = number(&params, "limit")?.unwrap_or(100);
    if limit < 1 || timeout < 0 {
        return Err(ApiError::BadRequest("timeout must be >= 0 and limit >= 1".to_owned()));
    }
    wire::check_seconds("timeout", timeout)?;
    let now = coordinator.now();
    let count = coordinator
        .store()
        .reset_cron_times(crate::model::after_seconds(now, timeout), now, limit)
        .await?;
    if count > 0 {
        coordinator.wake();
    }
    Ok(Json(
        json!({"has_remaining": count as i64 == limit, "succeed_count": count}),
    ))
}

/// `POST /resetNextCronTime {gid}`: makes one transaction due now.
pub(super) async fn reset_next_cron_time(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<TransRequest>,
) -> ApiResult {
    let coordinator = &state.coordinator;
    let gid = req.gid()?;
    if !coordinator.store().reset_next_cron_time(gid, coordinator.now()).await? {
        return Err(ApiError::NotFound(format!("no transaction with gid {gid}")));
    }
    coordinator.wake();
    success()
}

/// One topic subscriber, as stored in the topic's KV value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Subscriber {
    pub url: String,
    #[serde(default)]
    pub remark: String,
}

/// Parses a topic's stored subscriber list.
pub(super) fn parse_subscribers(value: &str) -> Result<Vec<Subscriber>, ApiError> {
    serde_json::from_str(value).map_err(|e| ApiError::Internal(format!("stored topic is damaged: {e}")))
}

fn encode_subscribers(subscribers: &[Subscriber]) -> String {
    serde_json::to_string(subscribers).unwrap_or_else(|_| "[]".to_owned())
}

/// `GET /subscribe?topic=&url=&remark=`.
pub(super) async fn subscribe(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let coordinator = &state.coordinator;
    let topic = required(&params, "topic")?;
    let url = required(&params, "url")?;
    wire::check_url(coordinator.policy(), "url", url)?;
    let subscriber = Subscriber {
        url: url.to_owned(),
        remark: params.get("remark").cloned().unwrap_or_default(),
    };
    let _serialized = state.topic_writes.lock().await;
    let store = coordinator.store();
    for _ in 0..3 {
        let now = coordinator.now();
        match store.kv_get(TOPICS, topic).await? {
            None => {
                if store
                    .kv_create(
                        TOPICS,
                        topic,
                        &encode_subscribers(std::slice::from_ref(&subscriber)),
                        now,
                    )
                    .await?
                {
                    return success();
                }
            }
            Some(entry) => {
                let mut subscribers = parse_subscribers(&entry.value)?;
                if subscribers.iter().any(|s| s.url == url) {
                    return Err(ApiError::Failure("this url exists".to_owned()));
                }
                subscribers.push(subscriber.clone());
                if store
                    .kv_update(TOPICS, topic, &encode_subscribers(&subscribers), entry.version, now)
                    .await?
                {
                    return success();
                }
            }
        }
    }
    Err(ApiError::Failure(format!(
        "topic {topic} is changing concurrently; retry"
    )))
}

/// `GET /unsubscribe?topic=&url=`.
pub(super) async fn unsubscribe(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let coordinator = &state.coordinator;
    let topic = required(&params, "topic")?;
    let url = required(&params, "url")?;
    let _serialized = state.topic_writes.lock().await;
    let store = coordinator.store();
    for _ in 0..3 {
        let entry = store
            .kv_get(TOPICS, topic)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no such a topic: {topic}")))?;
        let mut subscribers = parse_subscribers(&entry.value)?;
        if subscribers.is_empty() {
            return Err(ApiError::NotFound(format!("this topic is empty: {topic}")));
        }
        let before = subscribers.len();
        subscribers.retain(|s| s.url != url);
        if subscribers.len() == before {
            return Err(ApiError::NotFound(format!("no such an url: {url}")));
        }
        if store
            .kv_update(
                TOPICS,
                topic,
                &encode_subscribers(&subscribers),
                entry.version,
                coordinator.now(),
            )
            .await?
        {
            return success();
        }
    }
    Err(ApiError::Failure(format!(
        "topic {topic} is changing concurrently; retry"
    )))
}

/// `DELETE /topic/{name}`.
pub(super) async fn delete_topic(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    if state.coordinator.store().kv_delete(TOPICS, &name).await? {
        success()
    } else {
        Err(ApiError::NotFound(format!("topic not found: {name}")))
    }
}

/// `GET /scanKV?cat=&position=&limit=`.
pub(super) async fn scan_kv(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let cat = required(&params, "cat")?;
    let after = number(&params, "position")?.unwrap_or(0);
    let limit = number(&params, "limit")?.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    let entries = state.coordinator.store().kv_scan(cat, after, limit).await?;
    let next_position = match entries.last() {
        Some(last) if entries.len() as i64 == limit => last.id.to_string(),
        _ => String::new(),
    };
    Ok(Json(json!({
        "kv": entries.iter().map(wire::kv_json).collect::<Vec<_>>(),
        "next_position": next_position,
    })))
}

/// `GET /queryKV?cat=&key=`.
pub(super) async fn query_kv(State(state): State<AppState>, Query(params): Params) -> ApiResult {
    let cat = required(&params, "cat")?;
    let key = required(&params, "key")?;
    let entry = state.coordinator.store().kv_get(cat, key).await?;
    Ok(Json(json!({"kv": entry.iter().map(wire::kv_json).collect::<Vec<_>>()})))
}

fn required<'a>(params: &'a HashMap<String, String>, name: &str) -> Result<&'a str, ApiError> {
    params
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::BadRequest(format!("{name} is required")))
}

fn number(params: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    params
        .get(name)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::BadRequest(format!("{name} must be an integer, got {v:?}")))
        })
        .transpose()
}
