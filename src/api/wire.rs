//! DTM's JSON shapes: lenient request parsing (nulls accepted, unknown keys ignored) and the
//! response rendering of transactions and branches.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::ApiError;
use axum::http::{HeaderName, HeaderValue};

use crate::engine::{MsgCustom, null_default};
use crate::invoke::grpc::GrpcTarget;
use crate::invoke::policy::OutboundPolicy;
use crate::model::{Branch, GlobalTrans, Millis, REDACTED, TransOptions, TransType, without_userinfo};
use crate::store::KvEntry;

use crate::limits::{
    self, MAX_CALL_TIMEOUT_SECONDS, MAX_GID_LEN, MAX_HEADER_NAME_LEN, MAX_HEADER_VALUE_LEN, MAX_HEADERS,
    MAX_RETRY_INTERVAL_SECONDS, MAX_RETRY_LIMIT, MAX_STEPS, MAX_TIMEOUT_SECONDS, MAX_URL_LEN,
};

/// Body of prepare / submit / abort / forceStop / prepareWorkflow / resetNextCronTime.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TransRequest {
    #[serde(deserialize_with = "null_default")]
    pub gid: String,
    #[serde(deserialize_with = "null_default")]
    pub trans_type: String,
    #[serde(deserialize_with = "null_default")]
    pub steps: Vec<Value>,
    #[serde(deserialize_with = "null_default")]
    pub payloads: Vec<Value>,
    #[serde(deserialize_with = "null_default")]
    pub query_prepared: String,
    #[serde(deserialize_with = "null_default")]
    pub protocol: String,
    #[serde(deserialize_with = "null_default")]
    pub custom_data: Value,
    #[serde(deserialize_with = "null_default")]
    pub rollback_reason: String,
    #[serde(deserialize_with = "null_default")]
    pub wait_result: bool,
    #[serde(deserialize_with = "null_default")]
    pub timeout_to_fail: i64,
    #[serde(deserialize_with = "null_default")]
    pub retry_interval: i64,
    #[serde(deserialize_with = "null_default")]
    pub request_timeout: i64,
    #[serde(deserialize_with = "null_default")]
    pub branch_headers: BTreeMap<String, Option<String>>,
    #[serde(deserialize_with = "null_default")]
    pub concurrent: bool,
    #[serde(deserialize_with = "null_default")]
    pub retry_limit: i64,
    #[serde(deserialize_with = "null_default")]
    pub req_extra: BTreeMap<String, Option<String>>,
    /// Step payloads as bytes (gRPC's `BinPayloads`); when set, they replace `payloads`.
    #[serde(skip)]
    pub bin_payloads: Option<Vec<Vec<u8>>>,
}

/// One saga or msg step after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    pub action: String,
    pub compensate: String,
    pub payload: Vec<u8>,
}

impl TransRequest {
    /// The gid, checked.
    pub fn gid(&self) -> Result<&str, ApiError> {
        check_gid(&self.gid)?;
        Ok(&self.gid)
    }

    /// The mode, checked.
    pub fn trans_type(&self) -> Result<TransType, ApiError> {
        parse_trans_type(&self.trans_type)
    }

    /// `custom_data` as text (DTM sends a JSON string; an object is accepted too).
    pub fn custom_data(&self) -> String {
        match &self.custom_data {
            Value::Null => String::new(),
            Value::String(text) => text.clone(),
            other => other.to_string(),
        }
    }

    /// The options to persist, checked.
    pub fn options(&self) -> Result<TransOptions, ApiError> {
        for (name, value, max) in [
            ("timeout_to_fail", self.timeout_to_fail, MAX_TIMEOUT_SECONDS),
            ("retry_interval", self.retry_interval, MAX_RETRY_INTERVAL_SECONDS),
            ("request_timeout", self.request_timeout, MAX_CALL_TIMEOUT_SECONDS),
            ("retry_limit", self.retry_limit, MAX_RETRY_LIMIT),
        ] {
            limits::check_range(name, value, 0, max).map_err(ApiError::BadRequest)?;
        }
        limits::check_count("branch_headers", self.branch_headers.len(), MAX_HEADERS).map_err(ApiError::BadRequest)?;
        // An invalid header would make every call of every branch fail, forever; a framing
        // header would cut or garble every body (Go's DTM ignores those, the way net/http does).
        for (name, value) in &self.branch_headers {
            if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(ApiError::BadRequest(format!(
                    "branch_headers: {name:?} is derived from the payload and cannot be set"
                )));
            }
            limits::check_len("branch_headers: name", name, MAX_HEADER_NAME_LEN).map_err(ApiError::BadRequest)?;
            let value_text = value.as_deref().unwrap_or_default();
            limits::check_len(
                &format!("branch_headers: the value of {name}"),
                value_text,
                MAX_HEADER_VALUE_LEN,
            )
            .map_err(ApiError::BadRequest)?;
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ApiError::BadRequest(format!("branch_headers: {name:?} is not a valid header name")))?;
            HeaderValue::from_str(value.as_deref().unwrap_or_default()).map_err(|_| {
                ApiError::BadRequest(format!(
                    "branch_headers: the value of {name:?} is not a valid header value"
                ))
            })?;
        }
        Ok(TransOptions {
            wait_result: self.wait_result,
            timeout_to_fail: self.timeout_to_fail,
            retry_interval: self.retry_interval,
            request_timeout: self.request_timeout,
            branch_headers: self
                .branch_headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                .collect(),
            concurrent: self.concurrent,
            retry_limit: self.retry_limit,
        })
    }

    /// Checks the protocol: HTTP (the default) or gRPC. Each branch is called over the
    /// protocol its address names (an `http(s)://` URL or a gRPC `host:port/pkg.Service/Method`).
    pub fn check_protocol(&self) -> Result<(), ApiError> {
        match self.protocol.as_str() {
            "" | "http" | "grpc" => Ok(()),
            other => Err(ApiError::BadRequest(format!(
                "protocol {other:?} is not supported: kubetx calls branches over http(s) and grpc"
            ))),
        }
    }

    /// Steps with their payloads. DTM's legacy form puts a `data` string in a step; those are
    /// appended after `payloads`.
    pub fn steps(&self) -> Result<Vec<StepSpec>, ApiError> {
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        for (index, payload) in self.payloads.iter().enumerate() {
            payloads.push(match payload {
                Value::Null => Vec::new(),
                Value::String(text) => text.clone().into_bytes(),
                _ => return Err(ApiError::BadRequest(format!("payloads[{index}] must be a string"))),
            });
        }
        if let Some(binary) = &self.bin_payloads {
            limits::check_count("BinPayloads", binary.len(), MAX_STEPS).map_err(ApiError::BadRequest)?;
            payloads.clone_from(binary);
        }
        limits::check_count("steps", self.steps.len(), MAX_STEPS).map_err(ApiError::BadRequest)?;
        limits::check_count("payloads", self.payloads.len(), MAX_STEPS).map_err(ApiError::BadRequest)?;
        let mut steps = Vec::new();
        for (index, step) in self.steps.iter().enumerate() {
            let Value::Object(fields) = step else {
                return Err(ApiError::BadRequest(format!("steps[{index}] must be an object")));
            };
            let action = string_field(fields, "action", index)?;
            let compensate = string_field(fields, "compensate", index)?;
            if fields.contains_key("data") {
                payloads.push(string_field(fields, "data", index)?.into_bytes());
            }
            steps.push(StepSpec {
                action,
                compensate,
                payload: Vec::new(),
            });
        }
        for (step, payload) in steps.iter_mut().zip(payloads) {
            step.payload = payload;
        }
        Ok(steps)
    }

    /// `req_extra[key]`, empty when absent.
    pub fn extra(&self, key: &str) -> String {
        self.req_extra.get(key).cloned().flatten().unwrap_or_default()
    }
}

/// Checks a duration in seconds: not negative, at most [`MAX_TIMEOUT_SECONDS`].
pub fn check_seconds(name: &str, value: i64) -> Result<(), ApiError> {
    limits::check_range(name, value, 0, MAX_TIMEOUT_SECONDS).map_err(ApiError::BadRequest)
}

/// A msg's `custom_data`, checked.
pub fn msg_custom(custom_data: &str) -> Result<MsgCustom, ApiError> {
    let custom = MsgCustom::parse(custom_data).map_err(ApiError::BadRequest)?;
    check_seconds("msg delay", custom.delay)?;
    Ok(custom)
}

fn string_field(fields: &Map<String, Value>, key: &str, index: usize) -> Result<String, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(ApiError::BadRequest(format!("steps[{index}].{key} must be a string"))),
    }
}

/// Checks a gid: required, at most 128 bytes, no control characters.
pub fn check_gid(gid: &str) -> Result<(), ApiError> {
    if gid.is_empty() {
        return Err(ApiError::BadRequest("gid is required".to_owned()));
    }
    limits::check_len("gid", gid, MAX_GID_LEN).map_err(ApiError::BadRequest)?;
    if gid.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "gid must not contain control characters".to_owned(),
        ));
    }
    Ok(())
}

/// Parses a mode name.
pub fn parse_trans_type(text: &str) -> Result<TransType, ApiError> {
    if text.is_empty() {
        return Err(ApiError::BadRequest("trans_type is required".to_owned()));
    }
    TransType::parse(text).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "unknown trans_type {text:?}: expected saga, msg, tcc, xa or workflow"
        ))
    })
}

/// Checks a branch endpoint: empty (nothing to call), an http(s) URL, or a gRPC target
/// (`host:port/package.Service/Method`), that the outbound policy allows (a refused one is a 400
/// with the reason, before any call).
pub fn check_url(policy: &OutboundPolicy, what: &str, url: &str) -> Result<(), ApiError> {
    if url.is_empty() {
        return Ok(());
    }
    limits::check_len(what, url, MAX_URL_LEN).map_err(ApiError::BadRequest)?;
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix("http://").or_else(|| lower.strip_prefix("https://")) else {
        let target = GrpcTarget::parse(url)
            .and_then(|target| target.policy_url())
            .map_err(|reason| {
                ApiError::BadRequest(format!(
                    "{what} {url:?} is not an http or https URL nor a gRPC target: {reason}"
                ))
            })?;
        return policy
            .check_url(&target)
            .map_err(|refusal| ApiError::BadRequest(format!("endpoint refused: {what}: {refusal}")));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(ApiError::BadRequest(format!("{what} {url:?} has no host")));
    }
    policy
        .allows(url)
        .map_err(|refusal| ApiError::BadRequest(format!("endpoint refused: {what}: {refusal}")))
}

/// Body of registerBranch: a flat map of strings.
pub fn branch_request(body: Map<String, Value>) -> Result<BTreeMap<String, String>, ApiError> {
    body.into_iter()
        .map(|(key, value)| match value {
            Value::Null => Ok((key, String::new())),
            Value::String(text) => Ok((key, text)),
            _ => Err(ApiError::BadRequest(format!(
                "registerBranch field {key:?} must be a string"
            ))),
        })
        .collect()
}

/// RFC 3339 in UTC, seconds precision.
pub fn time_text(at: Millis) -> Value {
    DateTime::from_timestamp_millis(at)
        .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Secs, true)))
        .unwrap_or(Value::Null)
}

fn optional_time(at: Option<Millis>) -> Option<Value> {
    at.map(time_text)
}

/// Options as answers show them: header names kept, values redacted.
fn shown_options(options: &TransOptions) -> TransOptions {
    let mut shown = options.clone();
    for value in shown.branch_headers.values_mut() {
        *value = REDACTED.to_owned();
    }
    shown
}

/// A transaction as `/query`, `/all` and `/prepareWorkflow` return it: header values redacted,
/// URL userinfo removed.
pub fn global_json(global: &GlobalTrans) -> Value {
    let options = &shown_options(&global.options);
    let mut out = json!({
        "id": global.id,
        "create_time": time_text(global.create_time),
        "update_time": time_text(global.update_time),
        "gid": global.gid,
        "trans_type": global.trans_type.as_str(),
        "status": global.status.as_str(),
        "protocol": if global.protocol.is_empty() { "http" } else { global.protocol.as_str() },
        "options": serde_json::to_string(options).unwrap_or_default(),
        "next_cron_interval": global.next_cron_interval,
        "next_cron_time": time_text(global.next_cron_time),
        "concurrent": options.concurrent,
    });
    let fields = [
        (
            "query_prepared",
            Some(Value::from(without_userinfo(&global.query_prepared))),
        ),
        ("custom_data", Some(Value::from(global.custom_data.as_str()))),
        ("result", Some(Value::from(global.result.as_str()))),
        (
            "rollback_reason",
            Some(Value::from(without_userinfo(&global.rollback_reason))),
        ),
        ("owner", Some(Value::from(global.owner.as_str()))),
        ("ext_data", Some(Value::from(global.ext_data.as_str()))),
        ("finish_time", optional_time(global.finish_time)),
        ("rollback_time", optional_time(global.rollback_time)),
        ("wait_result", Some(Value::from(options.wait_result))),
        ("timeout_to_fail", Some(Value::from(options.timeout_to_fail))),
        ("retry_interval", Some(Value::from(options.retry_interval))),
        ("request_timeout", Some(Value::from(options.request_timeout))),
        ("retry_limit", Some(Value::from(options.retry_limit))),
    ];
    if let Value::Object(map) = &mut out {
        // DTM omits empty fields (Go's omitempty).
        for (key, value) in fields {
            match value {
                Some(Value::String(text)) if text.is_empty() => {}
                Some(Value::Bool(false)) => {}
                Some(Value::Number(n)) if n.as_i64() == Some(0) => {}
                Some(value) => {
                    map.insert(key.to_owned(), value);
                }
                None => {}
            }
        }
        if !options.branch_headers.is_empty() {
            map.insert("branch_headers".to_owned(), json!(options.branch_headers));
        }
    }
    out
}

/// A branch row as `/query` returns it, URL userinfo removed.
pub fn branch_json(branch: &Branch) -> Value {
    let mut out = json!({
        "id": branch.id,
        "create_time": time_text(branch.create_time),
        "update_time": time_text(branch.update_time),
        "gid": branch.gid,
        "url": without_userinfo(&branch.url),
        "bin_data": base64::engine::general_purpose::STANDARD.encode(&branch.bin_data),
        "branch_id": branch.branch_id,
        "op": branch.op,
        "status": branch.status.as_str(),
    });
    if let Value::Object(map) = &mut out {
        if let Some(at) = optional_time(branch.finish_time) {
            map.insert("finish_time".to_owned(), at);
        }
        if let Some(at) = optional_time(branch.rollback_time) {
            map.insert("rollback_time".to_owned(), at);
        }
    }
    out
}

/// A KV record as `/scanKV` and `/queryKV` return it.
pub fn kv_json(entry: &KvEntry) -> Value {
    json!({
        "id": entry.id,
        "create_time": time_text(entry.create_time),
        "update_time": time_text(entry.update_time),
        "cat": entry.cat,
        "k": entry.key,
        "v": without_userinfo(&entry.value),
        "version": entry.version,
    })
}
