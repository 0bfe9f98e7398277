//! The reconciler shared by `Saga`, `Tcc` and `Msg`: one processing pass per reconcile, the
//! status subresource as the store.
//!
//! A pass runs in memory and ends with at most one status write (server-side apply, skipped when
//! nothing changed). Every decision (roll back, confirm, deliver) ends the pass and is written
//! before anything acts on it, so a controller restart can never act against a decision it had
//! already taken: after a crash, the forward calls made since the last write are made again,
//! which branches tolerate (every call may arrive more than once).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::crd::{Endpoint, GROUP, Phase, TransactionStatus, VERSION};
use super::outbound::AllowList;
use super::transaction::{
    CallTally, Transactional, engine_state, next_status, object_key, phase_of, row_names, time_text,
};
use crate::driver::{self, PassContext, PassSink};
use crate::engine::{BranchUpdate, Call, Outcome, Policy};
use crate::invoke::Invoker;
use crate::metrics::{FailureLabels, KindLabels, Metrics};
use crate::model::{GlobalTrans, Millis, TransStatus, TransType};
use crate::scheduler::Clock;

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "kubetx";
/// Finalizer kept while a transaction is unfinished, so that deleting it rolls it back first.
pub const FINALIZER: &str = "kubetx.io/transaction";
/// Annotation that, set to "true" on a resource being deleted, removes it without rolling back.
pub const SKIP_COMPENSATION: &str = "kubetx.io/skip-compensation";
/// Timeout of every Kubernetes API call.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of a reconcile; each is retried with backoff by the controller.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] Box<kube::Error>),
    /// A Kubernetes API call did not answer in time.
    #[error("kubernetes API call timed out")]
    Timeout,
    /// A header's Secret or key is missing.
    #[error("{0}")]
    Secret(String),
    /// The SQL store holding branch detail failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A bug: a patch this code built is malformed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ReconcileError {
    /// Short category for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kube",
            ReconcileError::Timeout => "timeout",
            ReconcileError::Secret(_) => "secret",
            ReconcileError::Internal(_) => "internal",
            ReconcileError::Store(_) => "store",
        }
    }
}

impl From<kube::Error> for ReconcileError {
    fn from(error: kube::Error) -> Self {
        ReconcileError::Kube(Box::new(error))
    }
}

async fn timed<T>(call: impl Future<Output = Result<T, kube::Error>>) -> Result<T, ReconcileError> {
    tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| ReconcileError::Timeout)?
        .map_err(ReconcileError::from)
}

/// Operator settings used while reconciling.
#[derive(Clone)]
pub struct ReconcileConfig {
    /// Engine defaults (retry interval, backoff cap, default timeout).
    pub policy: Policy,
    /// Branch call timeout when a resource sets none.
    pub request_timeout: Duration,
    /// Hosts branches may be called on.
    pub allow_list: AllowList,
    /// Seconds to keep finished resources when they set no TTL; `None` keeps them.
    pub default_ttl: Option<i64>,
    /// Cluster DNS domain suffix for Service endpoints (`svc` or `svc.cluster.local`).
    pub service_domain: String,
    /// SQL store for branch detail; the status then keeps a summary.
    pub store: Option<Arc<dyn crate::store::Store>>,
}

/// Shared state of the reconcilers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Branch HTTP client.
    pub invoker: Invoker,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Settings.
    pub config: ReconcileConfig,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// What this controller last wrote, per object.
    pub written: Written,
}

/// What this controller last wrote per object (by uid). The watch cache a reconcile starts from
/// can lag behind our own writes; acting on a stale status would repeat a decision already taken
/// (or worse, undo one), so until the cache catches up the last written state wins.
#[derive(Debug, Default)]
pub struct Written(std::sync::Mutex<HashMap<String, (TransactionStatus, bool)>>);

impl Written {
    /// The status and finalizer presence to act on.
    fn view<K: Transactional>(&self, obj: &K) -> (TransactionStatus, bool) {
        let cached = (obj.tx_status().cloned().unwrap_or_default(), has_finalizer(obj));
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let mut memo = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match memo.get(&uid) {
            Some(written) if *written != cached => written.clone(),
            Some(_) => {
                // The cache caught up.
                memo.remove(&uid);
                cached
            }
            None => cached,
        }
    }

    fn record<K: Resource>(&self, obj: &K, status: &TransactionStatus, finalizer: bool) {
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let mut memo = self.0.lock().unwrap_or_else(|p| p.into_inner());
        memo.insert(uid, (status.clone(), finalizer));
    }
}

/// Reconciles one resource of any transactional kind.
pub async fn reconcile<K: Transactional>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.metrics
        .reconciles
        .get_or_create(&KindLabels {
            kind: K::KIND.to_owned(),
        })
        .inc();
    let now = ctx.clock.now();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let (old, finalizer) = ctx.written.view(&*obj);
    let deleting = obj.meta().deletion_timestamp.is_some();

    if old.phase.is_some_and(Phase::is_finished) {
        if finalizer {
            remove_finalizer(&api, &*obj).await?;
            ctx.written.record(&*obj, &old, false);
        }
        return expire(&api, &*obj, &old, &ctx, now).await;
    }
    if let Err(problem) = obj.validate() {
        return reject(
            &api,
            &obj,
            &ctx,
            "InvalidSpec",
            &format!("invalid spec: {problem}"),
            now,
        )
        .await;
    }
    for endpoint in obj.endpoints() {
        let url = resolve(endpoint, &*obj, &ctx.config.service_domain);
        if let Err(problem) = ctx.config.allow_list.check(&url) {
            return reject(
                &api,
                &obj,
                &ctx,
                "EndpointRefused",
                &format!("endpoint refused: {problem}"),
                now,
            )
            .await;
        }
    }
    let headers = headers(&*obj, &ctx.client).await?;
    let layout = obj.layout(
        &super::transaction::gid_of(&*obj),
        &|e| resolve(e, &*obj, &ctx.config.service_domain),
        now,
    );
    let shown = row_names(&layout);
    let (mut global, mut branches) = engine_state(&*obj, layout, headers, now);
    let saved_status = match &ctx.config.store {
        Some(store) => super::sql::load(store.as_ref(), &global.gid, &mut branches).await?,
        None => None,
    };
    let loaded = branches.clone();
    // A Msg whose owner set `submitted` since the last pass: deliver now.
    let just_submitted =
        global.status == TransStatus::Prepared && obj.submitted() && global.trans_type == TransType::Msg;
    if just_submitted {
        global.status = TransStatus::Submitted;
    }
    let mut decided: Option<(TransStatus, Option<String>)> = None;
    if deleting && obj.annotations().get(SKIP_COMPENSATION).is_some_and(|v| v == "true") {
        warn!(kind = K::KIND, object = %object_key(&*obj), "deleted with {SKIP_COMPENSATION}: not rolling back");
        if finalizer {
            remove_finalizer(&api, &*obj).await?;
        }
        return Ok(Action::await_change());
    }
    if deleting && obj.abort_on_delete(global.status) {
        decided = Some(match global.trans_type {
            TransType::Msg => (TransStatus::Failed, Some("deleted before it was submitted".to_owned())),
            _ => (
                TransStatus::Aborting,
                Some("deleted while running: rolling back".to_owned()),
            ),
        });
    } else if old.phase.is_some() && global.next_cron_time > now && !deleting && !just_submitted {
        // Woken early (a watch event, not our requeue): nothing is due yet.
        return Ok(Action::requeue(until(global.next_cron_time, now)));
    }

    let mut tally = CallTally::default();
    let (mut global, branches) = match decided {
        Some(_) => (global, branches),
        None => {
            let (global, branches, pass_tally, decision) = run_engine(&*obj, &ctx, global, branches).await;
            tally = pass_tally;
            decided = decision;
            (global, branches)
        }
    };
    let now = ctx.clock.now();
    if let Some((to, reason)) = decided {
        // Written below before anything acts on it; due at once.
        apply_decision(&mut global, to, reason, now);
    }
    if let Some(store) = &ctx.config.store {
        // The detail is durable before the summary that points at it.
        super::sql::save(store.as_ref(), saved_status, &global, &branches, &loaded, now).await?;
    }
    let detailed = next_status(&old, &shown, &global, &branches, &tally, obj.meta().generation, now);
    let mut status = detailed.clone();
    if ctx.config.store.is_some() {
        status.branches.clear();
    }
    let finished = global.status.is_finished();
    let mut finalizer = finalizer;
    if !finished && !finalizer && !deleting {
        add_finalizer(&api, &*obj).await?;
        finalizer = true;
    }
    write_status(&api, &*obj, &old, &status, &ctx).await?;
    ctx.written.record(&*obj, &status, finalizer);
    publish_transition(&*obj, &old, &detailed, &loaded, &global, &ctx).await;
    if finished {
        if finalizer {
            remove_finalizer(&api, &*obj).await?;
            ctx.written.record(&*obj, &status, false);
        }
        return expire(&api, &*obj, &status, &ctx, now).await;
    }
    Ok(Action::requeue(until(global.next_cron_time, now)))
}

/// One engine pass in memory. Returns the state it left, the calls it made, and the decision
/// that stopped it, if any.
async fn run_engine<K: Transactional>(
    obj: &K,
    ctx: &Context,
    global: GlobalTrans,
    branches: Vec<crate::model::Branch>,
) -> (
    GlobalTrans,
    Vec<crate::model::Branch>,
    CallTally,
    Option<(TransStatus, Option<String>)>,
) {
    let clock = Arc::clone(&ctx.clock);
    let now = move || clock.now();
    let policy = Policy {
        max_retry_interval: obj
            .options()
            .max_retry_interval_seconds
            .unwrap_or(ctx.config.policy.max_retry_interval),
        ..ctx.config.policy.clone()
    };
    let context = PassContext {
        invoker: &ctx.invoker,
        policy: &policy,
        request_timeout: ctx.config.request_timeout,
        now: &now,
        metrics: &ctx.metrics,
    };
    let mut sink = StatusSink::default();
    let result = match driver::run_pass(global, branches, &context, &mut sink).await {
        Ok(result) => result,
        Err(never) => match never {},
    };
    (result.global, result.branches, sink.tally, sink.decision)
}

/// What the controller does after a failed reconcile: count it and retry with backoff.
pub fn error_policy<K: Transactional>(obj: Arc<K>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failures
        .get_or_create(&FailureLabels {
            kind: K::KIND.to_owned(),
            error: error.metric_label().to_owned(),
        })
        .inc();
    warn!(kind = K::KIND, object = %object_key(&*obj), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn until(at: Millis, now: Millis) -> Duration {
    Duration::from_millis((at - now).max(0) as u64)
}

fn apply_decision(global: &mut GlobalTrans, to: TransStatus, reason: Option<String>, now: Millis) {
    global.status = to;
    if let Some(reason) = reason {
        global.rollback_reason = reason;
    }
    global.next_cron_time = now;
}

/// Collects the pass in memory. A decision (any transition short of the end) stops the pass so
/// that it is written before it is acted on.
#[derive(Default)]
struct StatusSink {
    tally: CallTally,
    decision: Option<(TransStatus, Option<String>)>,
}

impl PassSink for StatusSink {
    type Error = std::convert::Infallible;

    async fn transition(
        &mut self,
        _global: &GlobalTrans,
        _updates: &[BranchUpdate],
        to: TransStatus,
        reason: Option<&str>,
        _now: Millis,
    ) -> Result<bool, Self::Error> {
        if to.is_finished() {
            return Ok(true);
        }
        self.decision = Some((to, reason.map(str::to_owned)));
        Ok(false)
    }

    async fn before_calls(&mut self, _: &GlobalTrans, _: Millis, _: Millis) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn branches_updated(&mut self, _: &GlobalTrans, _: &[BranchUpdate], _: Millis) -> Result<bool, Self::Error> {
        Ok(true)
    }

    fn call_made(&mut self, call: &Call, outcome: &Outcome, _now: Millis) {
        let key = (call.branch_id.clone(), call.op.clone());
        *self.tally.attempts.entry(key.clone()).or_default() += 1;
        match outcome {
            Outcome::Success => {
                self.tally.errors.remove(&key);
            }
            Outcome::Failure(text) | Outcome::Ongoing(text) | Outcome::Error(text) => {
                self.tally.failures += 1;
                let kind = match outcome {
                    Outcome::Failure(_) => "FAILURE",
                    Outcome::Ongoing(_) => "ONGOING",
                    _ => "error",
                };
                self.tally.errors.insert(key, format!("{kind}: {}", text.trim()));
            }
        }
    }

    async fn park(&mut self, _: &GlobalTrans, _: Millis, _: i64, _: Millis) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// An endpoint's URL: as given, or the Service's cluster DNS name.
pub fn resolve<K: Resource>(endpoint: &Endpoint, obj: &K, domain: &str) -> String {
    match (&endpoint.url, &endpoint.service) {
        (Some(url), _) => url.clone(),
        (None, Some(service)) => {
            let namespace = service
                .namespace
                .clone()
                .or_else(|| obj.meta().namespace.clone())
                .unwrap_or_else(|| "default".to_owned());
            let path = service.path.as_deref().unwrap_or("/");
            let path = if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            };
            format!(
                "http://{}.{namespace}.{domain}:{}{path}",
                service.name,
                service.port.unwrap_or(80)
            )
        }
        (None, None) => String::new(),
    }
}

/// Header values, reading Secrets in the resource's namespace.
async fn headers<K: Transactional>(obj: &K, client: &Client) -> Result<BTreeMap<String, String>, ReconcileError> {
    let mut out = BTreeMap::new();
    let namespace = obj.namespace().unwrap_or_default();
    for header in obj.headers() {
        let value = match (&header.value, &header.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(source)) => {
                let reference = &source.secret_key_ref;
                let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
                let secret = timed(secrets.get_opt(&reference.name)).await?.ok_or_else(|| {
                    ReconcileError::Secret(format!("secret {}/{} not found", namespace, reference.name))
                })?;
                let bytes = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&reference.key))
                    .map(|b| b.0.clone())
                    .or_else(|| {
                        secret
                            .string_data
                            .as_ref()
                            .and_then(|d| d.get(&reference.key))
                            .map(|s| s.clone().into_bytes())
                    })
                    .ok_or_else(|| {
                        ReconcileError::Secret(format!(
                            "secret {}/{} has no key {}",
                            namespace, reference.name, reference.key
                        ))
                    })?;
                String::from_utf8(bytes).map_err(|_| {
                    ReconcileError::Secret(format!(
                        "secret {}/{} key {} is not UTF-8",
                        namespace, reference.name, reference.key
                    ))
                })?
            }
            (None, None) => String::new(),
        };
        out.insert(header.name.clone(), value);
    }
    Ok(out)
}

/// Fails the resource for good with a clear message (invalid spec, refused endpoint).
async fn reject<K: Transactional>(
    api: &Api<K>,
    obj: &Arc<K>,
    ctx: &Context,
    reason: &str,
    message: &str,
    now: Millis,
) -> Result<Action, ReconcileError> {
    let (old, finalizer) = ctx.written.view(&**obj);
    let mut status = TransactionStatus {
        phase: Some(Phase::Failed),
        message: Some(message.to_owned()),
        start_time: old.start_time.clone().or_else(|| Some(time_text(now))),
        finish_time: Some(old.finish_time.clone().unwrap_or_else(|| time_text(now))),
        observed_generation: obj.meta().generation,
        gid: old.gid.clone(),
        progress: old.progress.clone(),
        retries: old.retries,
        branches: old.branches.clone(),
        ..TransactionStatus::default()
    };
    status.conditions = vec![super::crd::Condition {
        type_: "Ready".to_owned(),
        status: "False".to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: time_text(now),
        observed_generation: obj.meta().generation,
    }];
    if finalizer {
        remove_finalizer(api, &**obj).await?;
    }
    let changed = write_status(api, &**obj, &old, &status, ctx).await?;
    ctx.written.record(&**obj, &status, false);
    if changed {
        publish(&**obj, ctx, EventType::Warning, reason, message).await;
    }
    Ok(Action::await_change())
}

/// Writes the status with server-side apply unless it is unchanged. Returns whether it wrote.
async fn write_status<K: Transactional>(
    api: &Api<K>,
    obj: &K,
    old: &TransactionStatus,
    status: &TransactionStatus,
    ctx: &Context,
) -> Result<bool, ReconcileError> {
    let labels = KindLabels {
        kind: K::KIND.to_owned(),
    };
    if old.phase.is_some() && old == status {
        ctx.metrics.status_skips.get_or_create(&labels).inc();
        return Ok(false);
    }
    let patch = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": K::KIND,
        "status": status,
    });
    timed(api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    ))
    .await?;
    ctx.metrics.status_writes.get_or_create(&labels).inc();
    Ok(true)
}

fn has_finalizer<K: Resource>(obj: &K) -> bool {
    obj.finalizers().iter().any(|f| f == FINALIZER)
}

async fn add_finalizer<K: Transactional>(api: &Api<K>, obj: &K) -> Result<(), ReconcileError> {
    // JSON patch with a `test`: fails (and is retried) rather than overwrite a list that changed.
    let patch = if obj.finalizers().is_empty() {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        json!([{"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}])
    };
    patch_json(api, &obj.name_any(), patch).await
}

async fn remove_finalizer<K: Transactional>(api: &Api<K>, obj: &K) -> Result<(), ReconcileError> {
    // The cached object may not show our finalizer yet: read the current list.
    let Some(current) = timed(api.get_opt(&obj.name_any())).await? else {
        return Ok(());
    };
    let Some(index) = current.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch = json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]);
    patch_json(api, &obj.name_any(), patch).await
}

async fn patch_json<K: Transactional>(
    api: &Api<K>,
    name: &str,
    patch: serde_json::Value,
) -> Result<(), ReconcileError> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|e| ReconcileError::Internal(format!("bad patch: {e}")))?;
    match timed(api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))).await {
        Err(ReconcileError::Kube(error)) if matches!(&*error, kube::Error::Api(s) if s.code == 404) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Deletes a finished resource once its TTL has passed, or requeues for then.
async fn expire<K: Transactional>(
    api: &Api<K>,
    obj: &K,
    status: &TransactionStatus,
    ctx: &Context,
    now: Millis,
) -> Result<Action, ReconcileError> {
    let Some(ttl) = obj.ttl().or(ctx.config.default_ttl) else {
        return Ok(Action::await_change());
    };
    let finished = status
        .finish_time
        .as_deref()
        .and_then(super::transaction::parse_time)
        .unwrap_or(now);
    let due = finished + ttl * 1000;
    if now < due {
        return Ok(Action::requeue(until(due, now)));
    }
    if obj.meta().deletion_timestamp.is_none() {
        info!(kind = K::KIND, object = %object_key(obj), "TTL expired; deleting");
        match timed(api.delete(&obj.name_any(), &DeleteParams::background())).await {
            Err(ReconcileError::Kube(error)) if matches!(&*error, kube::Error::Api(s) if s.code == 404) => {}
            other => {
                other?;
            }
        }
    }
    Ok(Action::await_change())
}

/// Events on phase transitions only.
async fn publish_transition<K: Transactional>(
    obj: &K,
    old: &TransactionStatus,
    new: &TransactionStatus,
    before: &[crate::model::Branch],
    global: &GlobalTrans,
    ctx: &Context,
) {
    // A transaction finished by its first pass needs no Started: its final event says it all,
    // and each event is an API write.
    if old.phase.is_none() && !global.status.is_finished() {
        let note = format!("{} started as transaction {}", K::KIND, global.gid);
        publish(obj, ctx, EventType::Normal, "Started", &note).await;
    }
    // Rows and their states before the pass are aligned with the new status's rows.
    for (row, previous) in new.branches.iter().zip(before) {
        if row.state == "failed" && previous.status != crate::model::BranchStatus::Failed {
            let note = format!(
                "{} {} failed: {}",
                row.name,
                row.op,
                row.last_error.as_deref().unwrap_or("FAILURE")
            );
            publish(obj, ctx, EventType::Warning, "StepFailed", &note).await;
        }
    }
    let phase = phase_of(global.status, global.trans_type);
    if old.phase == Some(phase) {
        return;
    }
    let (type_, reason, note) = match phase {
        Phase::Succeeded => (
            EventType::Normal,
            "Succeeded",
            format!("{} {} succeeded", K::KIND, global.gid),
        ),
        Phase::Failed => (
            EventType::Warning,
            "Failed",
            format!("{} failed: {}", K::KIND, global.rollback_reason),
        ),
        Phase::Compensating => (
            EventType::Warning,
            "Compensating",
            format!("rolling back: {}", global.rollback_reason),
        ),
        // Running or waiting is covered by Started.
        Phase::Prepared | Phase::Trying | Phase::Running => return,
    };
    publish(obj, ctx, type_, reason, &note).await;
}

async fn publish<K: Transactional>(obj: &K, ctx: &Context, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    let reference = obj.object_ref(&());
    match tokio::time::timeout(API_TIMEOUT, ctx.recorder.publish(&event, &reference)).await {
        Ok(Ok(())) => {}
        // Events are best effort: a lost one must not fail the reconcile.
        Ok(Err(error)) => warn!(%error, "cannot publish event"),
        Err(_) => warn!("publishing an event timed out"),
    }
}
