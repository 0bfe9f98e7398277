//! From a resource to the engine's view and back: spec and status become a global transaction
//! with branch rows; a pass's result becomes the next status.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat};
use kube::core::NamespaceResourceScope;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::crd::{
    BranchState, Condition, Endpoint, Header, Msg, Phase, Saga, Tcc, TransactionOptions, TransactionStatus,
};
use sha2::{Digest, Sha256};

use crate::engine::{self, MsgTarget, SagaOrders, SagaStep};
use crate::invoke::grpc::GrpcTarget;
use crate::limits::{
    self, MAX_CALL_TIMEOUT_SECONDS, MAX_DEPENDS_ON, MAX_HEADER_NAME_LEN, MAX_HEADER_VALUE_LEN, MAX_HEADERS,
    MAX_NAME_LEN, MAX_PATH_LEN, MAX_PAYLOAD_BASE64_LEN, MAX_RETRY_INTERVAL_SECONDS, MAX_RETRY_LIMIT, MAX_STEPS,
    MAX_TIMEOUT_SECONDS, MAX_URL_LEN,
};
use crate::model::{
    Branch, BranchStatus, GlobalTrans, Millis, TransOptions, TransStatus, TransType, branch_id_for, op,
};

/// Longest error text kept in a branch's status.
const MAX_ERROR_CHARS: usize = 200;
/// Longest message in the status, in characters (its schema allows 4,096 bytes).
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// The engine's layout of a resource: its mode, rows and the names to show for them.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Mode.
    pub trans_type: TransType,
    /// Engine custom data (saga orders, msg delay).
    pub custom_data: String,
    /// Msg back-check URL.
    pub query_prepared: String,
    /// Status of a resource that was never processed.
    pub initial: TransStatus,
    /// Branch rows with the step name each belongs to.
    pub rows: Vec<(String, Branch)>,
    /// Operations counted by `progress`.
    pub forward_ops: &'static [&'static str],
    /// Msg: deliver to all at once.
    pub concurrent: bool,
}

/// What the reconciler needs from each kind.
pub trait Transactional:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Kind name.
    const KIND: &'static str;
    /// The status, if any.
    fn tx_status(&self) -> Option<&TransactionStatus>;
    /// Headers sent on every call.
    fn headers(&self) -> &[Header];
    /// Timeouts and retries.
    fn options(&self) -> &TransactionOptions;
    /// Seconds to keep the resource after it finished.
    fn ttl(&self) -> Option<i64>;
    /// Every endpoint the resource calls (checked against the allow-list before any call).
    fn endpoints(&self) -> Vec<&Endpoint>;
    /// Checks what the schema cannot (a `dependsOn` cycle).
    fn validate(&self) -> Result<(), String>;
    /// The engine's layout, with endpoints resolved to URLs.
    fn layout(&self, gid: &str, resolve: &dyn Fn(&Endpoint) -> String, now: Millis) -> Layout;
    /// Msg: the owner has committed (always true for the other kinds).
    fn submitted(&self) -> bool {
        true
    }
    /// Whether deleting it while unfinished rolls it back (saga, tcc before its decision).
    fn abort_on_delete(&self, status: TransStatus) -> bool;
}

/// The accessors every kind implements the same way (the specs share these fields).
macro_rules! common_accessors {
    () => {
        fn tx_status(&self) -> Option<&TransactionStatus> {
            self.status.as_ref()
        }

        fn headers(&self) -> &[Header] {
            &self.spec.headers
        }

        fn options(&self) -> &TransactionOptions {
            &self.spec.options
        }

        fn ttl(&self) -> Option<i64> {
            self.spec.ttl_seconds_after_finished
        }
    };
}

/// The body of a step or branch: `payloadBase64` decoded (checked by `validate`), or the JSON
/// text of `payload`.
fn payload_bytes(payload: &Option<serde_json::Value>, payload_base64: &Option<String>) -> Vec<u8> {
    use base64::Engine as _;
    if let Some(encoded) = payload_base64 {
        return base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .unwrap_or_default();
    }
    payload
        .as_ref()
        .map(|value| serde_json::to_vec(value).unwrap_or_default())
        .unwrap_or_default()
}

/// A step's or branch's body: `payload` or `payloadBase64`, not both; base64 within its bound.
fn check_payload(
    what: &str,
    payload: &Option<serde_json::Value>,
    payload_base64: &Option<String>,
) -> Result<(), String> {
    use base64::Engine as _;
    let Some(encoded) = payload_base64 else {
        return Ok(());
    };
    if payload.is_some() {
        return Err(format!("{what}: give payload or payloadBase64, not both"));
    }
    limits::check_len(&format!("{what}.payloadBase64"), encoded, MAX_PAYLOAD_BASE64_LEN)?;
    base64::engine::general_purpose::STANDARD
        .decode(encoded.as_bytes())
        .map(drop)
        .map_err(|e| format!("{what}.payloadBase64 is not valid base64: {e}"))
}

impl Transactional for Saga {
    const KIND: &'static str = "Saga";

    common_accessors!();

    fn endpoints(&self) -> Vec<&Endpoint> {
        self.spec
            .steps
            .iter()
            .flat_map(|s| std::iter::once(&s.action).chain(s.compensate.as_ref()))
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        let names: Vec<&str> = self.spec.steps.iter().map(|s| s.name.as_str()).collect();
        check_common(self, "steps", &names)?;
        for step in &self.spec.steps {
            check_payload(&format!("steps[{}]", step.name), &step.payload, &step.payload_base64)?;
            limits::check_count(
                &format!("steps[{}].dependsOn", step.name),
                step.depends_on.len(),
                MAX_DEPENDS_ON,
            )?;
        }
        let orders = saga_orders(self)?;
        orders.validate(self.spec.steps.len())
    }

    fn layout(&self, gid: &str, resolve: &dyn Fn(&Endpoint) -> String, now: Millis) -> Layout {
        let urls: Vec<(String, String, Vec<u8>)> = self
            .spec
            .steps
            .iter()
            .map(|s| {
                (
                    resolve(&s.action),
                    s.compensate.as_ref().map(resolve).unwrap_or_default(),
                    payload_bytes(&s.payload, &s.payload_base64),
                )
            })
            .collect();
        let steps: Vec<SagaStep<'_>> = urls
            .iter()
            .map(|(action, compensate, payload)| SagaStep {
                action,
                compensate,
                payload,
            })
            .collect();
        let rows = engine::saga_branches(gid, &steps, now)
            .into_iter()
            .enumerate()
            .map(|(index, row)| (self.spec.steps[index / 2].name.clone(), row))
            .collect();
        let custom_data = match saga_orders(self) {
            Ok(orders) if orders.concurrent => {
                serde_json::json!({"concurrent": true, "orders": orders.orders}).to_string()
            }
            _ => String::new(),
        };
        Layout {
            trans_type: TransType::Saga,
            custom_data,
            query_prepared: String::new(),
            initial: TransStatus::Submitted,
            rows,
            forward_ops: &[op::ACTION],
            concurrent: false,
        }
    }

    fn abort_on_delete(&self, status: TransStatus) -> bool {
        status == TransStatus::Submitted
    }
}

/// `dependsOn` names as engine orders; any dependency makes the saga a DAG.
fn saga_orders(saga: &Saga) -> Result<SagaOrders, String> {
    let index: HashMap<&str, usize> = saga
        .spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut orders = BTreeMap::new();
    for (i, step) in saga.spec.steps.iter().enumerate() {
        if step.depends_on.is_empty() {
            continue;
        }
        let before = step
            .depends_on
            .iter()
            .map(|name| {
                index.get(name.as_str()).copied().ok_or_else(|| {
                    format!(
                        "dependsOn must name steps of this saga: step {} depends on unknown step {name}",
                        step.name
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        orders.insert(i.to_string(), before);
    }
    let concurrent = !orders.is_empty();
    let orders = SagaOrders { concurrent, orders };
    orders
        .validate(saga.spec.steps.len())
        .map_err(|e| e.replace("saga orders contain a cycle", "dependsOn contains a cycle"))?;
    Ok(orders)
}

impl Transactional for Tcc {
    const KIND: &'static str = "Tcc";

    common_accessors!();

    fn endpoints(&self) -> Vec<&Endpoint> {
        self.spec
            .branches
            .iter()
            .flat_map(|b| [&b.try_, &b.confirm, &b.cancel])
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        let names: Vec<&str> = self.spec.branches.iter().map(|b| b.name.as_str()).collect();
        check_common(self, "branches", &names)?;
        for branch in &self.spec.branches {
            check_payload(
                &format!("branches[{}]", branch.name),
                &branch.payload,
                &branch.payload_base64,
            )?;
        }
        Ok(())
    }

    fn layout(&self, gid: &str, resolve: &dyn Fn(&Endpoint) -> String, now: Millis) -> Layout {
        let mut rows = Vec::new();
        for (index, branch) in self.spec.branches.iter().enumerate() {
            let endpoints = [resolve(&branch.try_), resolve(&branch.confirm), resolve(&branch.cancel)];
            let data = payload_bytes(&branch.payload, &branch.payload_base64);
            let [try_url, confirm, cancel] = &endpoints;
            for row in engine::tcc_resource_branches(gid, &branch_id_for(index), [try_url, confirm, cancel], &data, now)
            {
                rows.push((branch.name.clone(), row));
            }
        }
        Layout {
            trans_type: TransType::Tcc,
            custom_data: String::new(),
            query_prepared: String::new(),
            initial: TransStatus::Prepared,
            rows,
            forward_ops: &[op::TRY, op::CONFIRM],
            concurrent: false,
        }
    }

    fn abort_on_delete(&self, status: TransStatus) -> bool {
        status == TransStatus::Prepared
    }
}

impl Transactional for Msg {
    const KIND: &'static str = "Msg";

    common_accessors!();

    fn endpoints(&self) -> Vec<&Endpoint> {
        self.spec
            .steps
            .iter()
            .map(|s| &s.action)
            .chain(self.spec.query_prepared.as_ref())
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        let names: Vec<&str> = self.spec.steps.iter().map(|s| s.name.as_str()).collect();
        check_common(self, "steps", &names)?;
        for step in &self.spec.steps {
            check_payload(&format!("steps[{}]", step.name), &step.payload, &step.payload_base64)?;
        }
        limits::check_range(
            "delaySeconds",
            self.spec.delay_seconds.unwrap_or(0),
            0,
            MAX_TIMEOUT_SECONDS,
        )
    }

    fn layout(&self, gid: &str, resolve: &dyn Fn(&Endpoint) -> String, now: Millis) -> Layout {
        let urls: Vec<(String, Vec<u8>)> = self
            .spec
            .steps
            .iter()
            .map(|s| (resolve(&s.action), payload_bytes(&s.payload, &s.payload_base64)))
            .collect();
        let targets: Vec<MsgTarget<'_>> = urls
            .iter()
            .map(|(url, payload)| MsgTarget::Url { url, payload })
            .collect();
        let rows = engine::msg_branches(gid, &targets, now)
            .into_iter()
            .enumerate()
            .map(|(index, row)| (self.spec.steps[index].name.clone(), row))
            .collect();
        Layout {
            trans_type: TransType::Msg,
            custom_data: match self.spec.delay_seconds {
                Some(delay) if delay > 0 => serde_json::json!({"delay": delay}).to_string(),
                _ => String::new(),
            },
            query_prepared: self.spec.query_prepared.as_ref().map(resolve).unwrap_or_default(),
            initial: if self.spec.submitted {
                TransStatus::Submitted
            } else {
                TransStatus::Prepared
            },
            rows,
            forward_ops: &[op::ACTION],
            concurrent: self.spec.concurrent,
        }
    }

    fn submitted(&self) -> bool {
        self.spec.submitted
    }

    fn abort_on_delete(&self, status: TransStatus) -> bool {
        status == TransStatus::Prepared
    }
}

/// The gid of a resource: readable and unique per object (its uid), at most
/// [`MAX_GID_LEN`](limits::MAX_GID_LEN) bytes so that DTM's barrier tables at the branches accept
/// it. A longer `namespace-name-uid` keeps its head and replaces the tail with a hash of the whole.
pub fn gid_of<K: Resource>(obj: &K) -> String {
    let uid = obj.meta().uid.clone().unwrap_or_default();
    let full = format!(
        "{}-{}-{}",
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
        uid.get(..8).unwrap_or(&uid)
    );
    if full.len() <= limits::MAX_GID_LEN {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    // Namespaces and names are ASCII (DNS names), so any byte index is a char boundary; the
    // check keeps that true for any input.
    let mut head = limits::MAX_GID_LEN - hash.len() - 1;
    while !full.is_char_boundary(head) {
        head -= 1;
    }
    format!("{}-{hash}", &full[..head])
}

/// The checks every kind shares: names, counts and lengths within [`limits`], as the CRD schema
/// states them (a server that skipped the schema cannot make the controller exceed them).
fn check_common<K: Transactional>(obj: &K, list: &str, names: &[&str]) -> Result<(), String> {
    limits::check_count(list, names.len(), MAX_STEPS)?;
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !limits::is_dns_label(name) {
            return Err(format!(
                "{list}: name {name:?} must be a DNS label of at most {MAX_NAME_LEN} characters"
            ));
        }
        if !seen.insert(*name) {
            return Err(format!("{list}: names must be unique: {name} appears twice"));
        }
    }
    for endpoint in obj.endpoints() {
        check_endpoint(endpoint)?;
    }
    let headers = obj.headers();
    limits::check_count("headers", headers.len(), MAX_HEADERS)?;
    for header in headers {
        if !limits::is_token(&header.name) {
            return Err(format!("headers: {:?} is not a valid header name", header.name));
        }
        limits::check_len("headers: name", &header.name, MAX_HEADER_NAME_LEN)?;
        limits::check_len(
            &format!("headers: the value of {}", header.name),
            header.value.as_deref().unwrap_or_default(),
            MAX_HEADER_VALUE_LEN,
        )?;
    }
    let options = obj.options();
    for (what, value, min, max) in [
        ("timeoutSeconds", options.timeout_seconds, 1, MAX_TIMEOUT_SECONDS),
        (
            "callTimeoutSeconds",
            options.call_timeout_seconds,
            1,
            MAX_CALL_TIMEOUT_SECONDS,
        ),
        (
            "retryIntervalSeconds",
            options.retry_interval_seconds,
            1,
            MAX_RETRY_INTERVAL_SECONDS,
        ),
        (
            "maxRetryIntervalSeconds",
            options.max_retry_interval_seconds,
            1,
            MAX_RETRY_INTERVAL_SECONDS,
        ),
        ("retryLimit", options.retry_limit, 0, MAX_RETRY_LIMIT),
        ("ttlSecondsAfterFinished", obj.ttl(), 0, MAX_TIMEOUT_SECONDS),
    ] {
        if let Some(value) = value {
            limits::check_range(what, value, min, max)?;
        }
    }
    Ok(())
}

fn check_endpoint(endpoint: &Endpoint) -> Result<(), String> {
    if let Some(url) = &endpoint.url {
        limits::check_len("url", url, MAX_URL_LEN)?;
        if GrpcTarget::is_grpc(url) {
            GrpcTarget::parse(url).map_err(|reason| format!("url {url:?}: {reason}"))?;
        }
    }
    if let Some(service) = &endpoint.service {
        for (what, value) in [
            ("service.name", Some(&service.name)),
            ("service.namespace", service.namespace.as_ref()),
        ] {
            if let Some(value) = value.filter(|v| !limits::is_dns_label(v)) {
                return Err(format!(
                    "{what} {value:?} must be a DNS label of at most {MAX_NAME_LEN} characters"
                ));
            }
        }
        limits::check_len(
            "service.path",
            service.path.as_deref().unwrap_or_default(),
            MAX_PATH_LEN,
        )?;
        if let Some(method) = &service.grpc_method {
            if service.path.is_some() {
                return Err("service: give path (HTTP) or grpcMethod (gRPC), not both".to_owned());
            }
            limits::check_len("service.grpcMethod", method, limits::MAX_GRPC_METHOD_LEN)?;
        }
    }
    Ok(())
}

/// Engine status of a phase.
pub fn trans_status(phase: Phase) -> TransStatus {
    match phase {
        Phase::Prepared | Phase::Trying => TransStatus::Prepared,
        Phase::Running => TransStatus::Submitted,
        Phase::Compensating => TransStatus::Aborting,
        Phase::Succeeded => TransStatus::Succeed,
        Phase::Failed => TransStatus::Failed,
    }
}

/// Phase of an engine status.
pub fn phase_of(status: TransStatus, trans_type: TransType) -> Phase {
    match status {
        TransStatus::Prepared if trans_type == TransType::Tcc => Phase::Trying,
        TransStatus::Prepared => Phase::Prepared,
        TransStatus::Submitted => Phase::Running,
        TransStatus::Aborting => Phase::Compensating,
        TransStatus::Succeed => Phase::Succeeded,
        TransStatus::Failed => Phase::Failed,
    }
}

/// RFC 3339 text of a time.
pub fn time_text(at: Millis) -> String {
    DateTime::from_timestamp_millis(at)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Parses RFC 3339 text.
pub fn parse_time(text: &str) -> Option<Millis> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_millis())
}

/// The engine's transaction for a resource: spec rows overlaid with the recorded status.
pub fn engine_state<K: Transactional>(
    obj: &K,
    layout: Layout,
    headers: BTreeMap<String, String>,
    now: Millis,
) -> (GlobalTrans, Vec<Branch>) {
    let status = obj.tx_status().cloned().unwrap_or_default();
    let gid = status.gid.clone().unwrap_or_else(|| gid_of(obj));
    let options = obj.options();
    let started = status
        .start_time
        .as_deref()
        .and_then(parse_time)
        .or_else(|| obj.meta().creation_timestamp.as_ref().map(|t| t.0.as_millisecond()))
        .unwrap_or(now);
    let recorded: HashMap<(&str, &str), &BranchState> = status
        .branches
        .iter()
        .map(|b| ((b.branch_id.as_str(), b.op.as_str()), b))
        .collect();
    let branches: Vec<Branch> = layout
        .rows
        .into_iter()
        .map(|(_, mut row)| {
            if let Some(state) = recorded.get(&(row.branch_id.as_str(), row.op.as_str())) {
                row.status = BranchStatus::parse(&state.state).unwrap_or(BranchStatus::Prepared);
                row.finish_time = state.finished_at.as_deref().and_then(parse_time);
            }
            row
        })
        .collect();
    let global = GlobalTrans {
        id: 0,
        gid,
        trans_type: layout.trans_type,
        status: status.phase.map(trans_status).unwrap_or(layout.initial),
        query_prepared: layout.query_prepared,
        protocol: "http".to_owned(),
        custom_data: layout.custom_data,
        options: TransOptions {
            wait_result: false,
            timeout_to_fail: options.timeout_seconds.unwrap_or(0),
            retry_interval: options.retry_interval_seconds.unwrap_or(0),
            request_timeout: options.call_timeout_seconds.unwrap_or(0),
            branch_headers: headers,
            concurrent: layout.concurrent,
            retry_limit: options.retry_limit.unwrap_or(0),
        },
        create_time: started,
        update_time: now,
        finish_time: None,
        rollback_time: None,
        next_cron_time: status.next_retry_time.as_deref().and_then(parse_time).unwrap_or(now),
        next_cron_interval: status.retry_interval_seconds.unwrap_or(0),
        owner: String::new(),
        result: String::new(),
        rollback_reason: status.message.clone().unwrap_or_default(),
        // Which resource this is, for the console (with a SQL store the row is all it sees).
        ext_data: serde_json::json!({"resource": {
            "kind": K::kind(&()),
            "namespace": obj.meta().namespace.clone().unwrap_or_default(),
            "name": obj.meta().name.clone().unwrap_or_default(),
        }})
        .to_string(),
    };
    (global, branches)
}

/// Per-row call tallies of a pass.
#[derive(Debug, Default, Clone)]
pub struct CallTally {
    /// Calls per `(branch_id, op)`.
    pub attempts: HashMap<(String, String), u32>,
    /// Last error per `(branch_id, op)`.
    pub errors: HashMap<(String, String), String>,
    /// Calls that did not succeed.
    pub failures: u32,
}

/// The next status from the engine's state after a pass.
pub fn next_status(
    old: &TransactionStatus,
    rows_shown: &RowNames,
    global: &GlobalTrans,
    branches: &[Branch],
    tally: &CallTally,
    generation: Option<i64>,
    now: Millis,
) -> TransactionStatus {
    let phase = phase_of(global.status, global.trans_type);
    let old_rows: HashMap<(&str, &str), &BranchState> = old
        .branches
        .iter()
        .map(|b| ((b.branch_id.as_str(), b.op.as_str()), b))
        .collect();
    let rows: Vec<BranchState> = branches
        .iter()
        .zip(&rows_shown.names)
        .map(|(row, name)| {
            let key = (row.branch_id.clone(), row.op.clone());
            let previous = old_rows.get(&(row.branch_id.as_str(), row.op.as_str()));
            BranchState {
                name: name.clone(),
                branch_id: row.branch_id.clone(),
                op: row.op.clone(),
                state: row.status.as_str().to_owned(),
                attempts: previous.map(|p| p.attempts).unwrap_or(0) + tally.attempts.get(&key).copied().unwrap_or(0),
                last_error: tally
                    .errors
                    .get(&key)
                    .map(|e| shorten(e))
                    .or_else(|| previous.and_then(|p| p.last_error.clone())),
                finished_at: row.finish_time.map(time_text),
            }
        })
        .collect();
    let forward: Vec<&Branch> = branches
        .iter()
        .filter(|b| rows_shown.forward_ops.contains(&b.op.as_str()))
        .collect();
    let done = forward.iter().filter(|b| b.status == BranchStatus::Succeed).count();
    let finished = global.status.is_finished();
    let message = match phase {
        Phase::Succeeded => None,
        Phase::Failed | Phase::Compensating => {
            Some(shorten_to(&global.rollback_reason, MAX_MESSAGE_CHARS)).filter(|m| !m.is_empty())
        }
        _ => last_error_message(&rows),
    };
    TransactionStatus {
        phase: Some(phase),
        gid: Some(global.gid.clone()),
        progress: Some(format!("{done}/{}", forward.len())),
        retries: old.retries + tally.failures,
        branches: rows,
        conditions: conditions(old, phase, message.as_deref(), generation, now),
        observed_generation: generation,
        next_retry_time: (!finished).then(|| time_text(global.next_cron_time)),
        retry_interval_seconds: (!finished).then_some(global.next_cron_interval).filter(|i| *i > 0),
        start_time: Some(old.start_time.clone().unwrap_or_else(|| time_text(global.create_time))),
        finish_time: if finished {
            Some(old.finish_time.clone().unwrap_or_else(|| time_text(now)))
        } else {
            None
        },
        message,
        retry_request: None,
    }
}

fn last_error_message(rows: &[BranchState]) -> Option<String> {
    rows.iter().filter(|r| r.state != "succeed").find_map(|r| {
        r.last_error
            .as_ref()
            .map(|e| format!("retrying {} {}: {e}", r.name, r.op))
    })
}

fn shorten(text: &str) -> String {
    shorten_to(text, MAX_ERROR_CHARS)
}

/// At most `max` characters of `text`, trimmed, with an ellipsis when cut. A status message must
/// fit its schema's `maxLength` (4 KiB), and a character is at most 4 bytes.
pub fn shorten_to(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}…")
}

/// `Ready` and `Progressing` conditions; a transition time moves only when the status does.
fn conditions(
    old: &TransactionStatus,
    phase: Phase,
    message: Option<&str>,
    generation: Option<i64>,
    now: Millis,
) -> Vec<Condition> {
    let (ready, ready_reason) = match phase {
        Phase::Succeeded => ("True", "Succeeded"),
        Phase::Failed => ("False", "Failed"),
        _ => ("False", "InProgress"),
    };
    let (progressing, progressing_reason) = match phase {
        Phase::Succeeded | Phase::Failed => ("False", "Finished"),
        Phase::Compensating => ("True", "Compensating"),
        Phase::Prepared => ("True", "WaitingForSubmit"),
        Phase::Trying | Phase::Running => ("True", "Running"),
    };
    [
        ("Ready", ready, ready_reason),
        ("Progressing", progressing, progressing_reason),
    ]
    .into_iter()
    .map(|(type_, status, reason)| {
        let previous = old.conditions.iter().find(|c| c.type_ == type_);
        let last_transition_time = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => time_text(now),
        };
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.unwrap_or_default().to_owned(),
            last_transition_time,
            observed_generation: generation,
        }
    })
    .collect()
}

/// How a layout's rows are shown: the step name of each row and the operations counted by
/// `progress`.
#[derive(Debug, Clone)]
pub struct RowNames {
    /// Step name per row, in row order.
    pub names: Vec<String>,
    /// Operations counted by `progress`.
    pub forward_ops: &'static [&'static str],
}

/// The names of a layout's rows.
pub fn row_names(layout: &Layout) -> RowNames {
    RowNames {
        names: layout.rows.iter().map(|(name, _)| name.clone()).collect(),
        forward_ops: layout.forward_ops,
    }
}

/// Namespace and name of an object, for messages.
pub fn object_key<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}
