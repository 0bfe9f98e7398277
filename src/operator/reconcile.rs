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

use super::crd::{Endpoint, GROUP, Phase, ServiceRef, TransactionStatus, VERSION};
use super::transaction::{
    CallTally, Transactional, engine_state, next_status, object_key, phase_of, row_names, time_text,
};
use crate::driver::{self, PassContext, PassSink};
use crate::engine::{BranchUpdate, Call, Outcome, Policy};
use crate::invoke::Invoker;
use crate::invoke::policy::Refusal;
use crate::metrics::{FailureLabels, KindLabels, Metrics};
use crate::model::{GlobalTrans, Millis, TransStatus, TransType};
use crate::scheduler::Clock;

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "kubetx";
/// Finalizer kept while a transaction is unfinished, so that deleting it rolls it back first.
pub const FINALIZER: &str = "kubetx.io/transaction";
/// Annotation that, set to "true" on a resource being deleted, removes it without rolling back.
pub const SKIP_COMPENSATION: &str = "kubetx.io/skip-compensation";
/// Annotation that makes an unfinished resource due at once with its backoff reset. Any new
/// value (a timestamp, say) asks again; the status records the last value served.
pub const RETRY_NOW: &str = "kubetx.io/retry-now";
/// Label a Secret must carry, set to "true", for transactions to send its values as headers:
/// without it, whoever may create a Saga could ship any Secret of the namespace to a service of
/// their choosing.
pub const SECRET_OPT_IN: &str = "kubetx.io/branch-headers";
/// Longest `kubetx.io/retry-now` value served (the status field's bound).
pub const MAX_RETRY_REQUEST_LEN: usize = 64;
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
    /// A header's Secret is not opted in to be sent ([`SECRET_OPT_IN`]).
    #[error("{0}")]
    SecretRefused(String),
    /// The SQL store holding branch detail failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A bug: a patch this code built is malformed.
    #[error("internal error: {0}")]
    Internal(String),
    /// This replica no longer holds the leader Lease: it stops acting.
    #[error("not the leader any more")]
    Fenced,
}

impl ReconcileError {
    /// Short category for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kube",
            ReconcileError::Timeout => "timeout",
            ReconcileError::Secret(_) | ReconcileError::SecretRefused(_) => "secret",
            ReconcileError::Internal(_) => "internal",
            ReconcileError::Store(_) => "store",
            ReconcileError::Fenced => "fenced",
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
    /// Longest branch call timeout, whatever a resource asks for.
    pub max_request_timeout: Duration,
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
    /// Whether this replica may act (it holds the leader Lease).
    pub fence: Arc<Fence>,
    /// This replica's identity (its pod name): the owner of what it writes to a SQL store.
    pub identity: String,
    /// Deletes the watches have seen, which a running pass checks between calls.
    pub deletions: Deletions,
}

/// Which objects are being deleted, as the controllers' watch caches see them now. A reconcile
/// learns of a delete when it starts; a pass already running asks here before each round of
/// branch calls and before it commits, so that a delete during a pass stops it and rolls the
/// transaction back instead of letting it run on to the end.
#[derive(Default)]
pub struct Deletions {
    probes: std::sync::RwLock<Vec<(&'static str, DeletionProbe)>>,
}

/// Answers whether the object (namespace, name, uid) is marked for deletion in one watch cache.
type DeletionProbe = Box<dyn Fn(&str, &str, &str) -> bool + Send + Sync>;

impl Deletions {
    /// Adds the watch cache of one controller.
    pub fn watch<K: Transactional>(&self, store: kube::runtime::reflector::Store<K>) {
        let probe: DeletionProbe = Box::new(move |namespace, name, uid| {
            let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
            store.get(&key).is_some_and(|cached| {
                cached.meta().deletion_timestamp.is_some() && cached.meta().uid.as_deref() == Some(uid)
            })
        });
        self.probes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((K::KIND, probe));
    }

    /// True when a watch cache has this very object (same uid) marked for deletion.
    pub fn requested<K: Transactional>(&self, obj: &K) -> bool {
        let (namespace, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let probes = self.probes.read().unwrap_or_else(|p| p.into_inner());
        probes
            .iter()
            .any(|(kind, probe)| *kind == K::KIND && probe(&namespace, &name, &uid))
    }
}

impl std::fmt::Debug for Deletions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.probes.read().map(|p| p.len()).unwrap_or_default();
        f.debug_struct("Deletions").field("watches", &count).finish()
    }
}

/// Until when this replica may act: renewed with the leader Lease, never past its renew deadline
/// (shorter than the Lease), so that a replica cut off from the API server stops calling branches
/// and writing before another one can take the Lease over.
pub struct Fence {
    valid_until: std::sync::atomic::AtomicI64,
    clock: Arc<dyn Clock>,
}

impl Fence {
    /// A fence that always holds (no leader election: this is the only replica).
    pub fn open(clock: Arc<dyn Clock>) -> Self {
        Fence {
            valid_until: std::sync::atomic::AtomicI64::new(Millis::MAX),
            clock,
        }
    }

    /// A fence that holds only once [`Fence::extend`] is called.
    pub fn closed(clock: Arc<dyn Clock>) -> Self {
        Fence {
            valid_until: std::sync::atomic::AtomicI64::new(Millis::MIN),
            clock,
        }
    }

    /// Lets this replica act until `until`.
    pub fn extend(&self, until: Millis) {
        self.valid_until.store(until, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops this replica acting at once.
    pub fn close(&self) {
        self.extend(Millis::MIN);
    }

    /// True while this replica may act.
    pub fn holds(&self) -> bool {
        self.clock.now() < self.valid_until.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How long this replica may still act (zero once the fence no longer holds).
    pub fn remaining(&self) -> Duration {
        let left = self
            .valid_until
            .load(std::sync::atomic::Ordering::SeqCst)
            .saturating_sub(self.clock.now());
        Duration::from_millis(left.max(0) as u64)
    }

    /// Resolves once the fence no longer holds. Polls, because the clock may be moved.
    pub async fn lapsed(&self) {
        loop {
            // Saturating: a closed fence is `Millis::MIN`, which a plain subtraction overflows.
            let left = self.remaining();
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.clamp(Duration::from_millis(1), Duration::from_millis(100))).await;
        }
    }
}

/// What this controller last wrote per object (by uid). The watch cache a reconcile starts from
/// can lag behind our own writes; acting on a stale status would repeat a decision already taken
/// (or worse, undo one), so until the cache catches up the last written state wins.
#[derive(Debug, Default)]
pub struct Written(std::sync::Mutex<HashMap<String, Seen>>);

/// The state a reconcile acts on: the status, whether our finalizer is on, and the
/// resourceVersion they were read or written at (every write is conditional on it).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    status: TransactionStatus,
    finalizer: bool,
    version: Option<String>,
}

impl Written {
    /// The state to act on.
    fn view<K: Transactional>(&self, obj: &K) -> Seen {
        let cached = Seen {
            status: obj.tx_status().cloned().unwrap_or_default(),
            finalizer: has_finalizer(obj),
            version: obj.meta().resource_version.clone(),
        };
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let mut memo = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match memo.get(&uid) {
            Some(written) if (&written.status, written.finalizer) != (&cached.status, cached.finalizer) => {
                written.clone()
            }
            Some(_) => {
                // The cache caught up.
                memo.remove(&uid);
                cached
            }
            None => cached,
        }
    }

    fn record<K: Resource>(&self, obj: &K, seen: &Seen) {
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let mut memo = self.0.lock().unwrap_or_else(|p| p.into_inner());
        memo.insert(uid, seen.clone());
    }

    /// Forgets what was written for `obj`: after a conflict, the API server's state wins.
    fn forget<K: Resource>(&self, obj: &K) {
        let uid = obj.meta().uid.clone().unwrap_or_default();
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
    }
}

/// Reconciles one resource of any transactional kind. Stops at once, without another call or
/// write, when this replica loses the leader Lease.
pub async fn reconcile<K: Transactional>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.metrics
        .reconciles
        .get_or_create(&KindLabels {
            kind: K::KIND.to_owned(),
        })
        .inc();
    if !ctx.fence.holds() {
        return Err(ReconcileError::Fenced);
    }
    let fence = Arc::clone(&ctx.fence);
    let result = tokio::select! {
        result = reconcile_fenced(Arc::clone(&obj), Arc::clone(&ctx)) => result,
        () = fence.lapsed() => Err(ReconcileError::Fenced),
    };
    if let Err(ReconcileError::Kube(error)) = &result
        && matches!(&**error, kube::Error::Api(s) if s.code == 409)
    {
        // Someone else wrote since our view: re-read and re-plan from what the server holds.
        ctx.written.forget(&*obj);
        return Ok(Action::requeue(Duration::ZERO));
    }
    result
}

async fn reconcile_fenced<K: Transactional>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let now = ctx.clock.now();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let mut seen = ctx.written.view(&*obj);
    let deleting = obj.meta().deletion_timestamp.is_some();

    if seen.status.phase.is_some_and(Phase::is_finished) {
        if seen.finalizer && deleting {
            remove_finalizer(&api, &*obj).await?;
        }
        return expire(&api, &*obj, &seen.status, &ctx, now).await;
    }
    if let Some(rejection) = check_spec(&*obj, &ctx) {
        let (reason, message) = rejection;
        return reject(&api, &obj, &ctx, reason, &message, now).await;
    }
    if deleting && obj.annotations().get(SKIP_COMPENSATION).is_some_and(|v| v == "true") {
        warn!(kind = K::KIND, object = %object_key(&*obj), "deleted with {SKIP_COMPENSATION}: not rolling back");
        if seen.finalizer {
            remove_finalizer(&api, &*obj).await?;
        }
        return Ok(Action::await_change());
    }
    if !seen.finalizer && !deleting {
        // Before any branch call: a delete from now on waits for the rollback.
        seen.version = add_finalizer(&api, &*obj, seen.version.as_deref()).await?;
        seen.finalizer = true;
        ctx.written.record(&*obj, &seen);
    }
    let headers = match headers(&*obj, &ctx.client).await {
        // Refused before anything ran: the resource fails with the reason. Later (the label
        // removed mid-flight) the error is retried, so that what ran can still finish.
        Err(ReconcileError::SecretRefused(message)) if seen.status.phase.is_none() => {
            return reject(&api, &obj, &ctx, "SecretRefused", &message, now).await;
        }
        other => other?,
    };
    run_and_record(&api, &obj, &ctx, seen, headers, deleting, now).await
}

/// A `kubetx.io/retry-now` value not served yet. A value too long for the status could never be
/// recorded as served, so it is ignored.
fn new_retry_request<K: Transactional>(obj: &K, old: &TransactionStatus) -> Option<String> {
    obj.annotations()
        .get(RETRY_NOW)
        .filter(|v| v.len() <= MAX_RETRY_REQUEST_LEN && old.retry_request.as_ref() != Some(*v))
        .cloned()
}

/// Why a spec is refused before any call: invalid, or an endpoint outside the allow-list.
fn check_spec<K: Transactional>(obj: &K, ctx: &Context) -> Option<(&'static str, String)> {
    if let Err(problem) = obj.validate() {
        return Some(("InvalidSpec", format!("invalid spec: {problem}")));
    }
    obj.endpoints().into_iter().find_map(|endpoint| {
        let problem = match resolve_url(endpoint, obj, &ctx.config.service_domain) {
            Ok(address) => ctx.invoker.check_address(&address).err()?,
            Err(refusal) => refusal.to_string(),
        };
        Some(("EndpointRefused", format!("endpoint refused: {problem}")))
    })
}

/// One processing pass and its single status write.
async fn run_and_record<K: Transactional>(
    api: &Api<K>,
    obj: &Arc<K>,
    ctx: &Context,
    seen: Seen,
    headers: BTreeMap<String, String>,
    deleting: bool,
    now: Millis,
) -> Result<Action, ReconcileError> {
    let old = seen.status.clone();
    let layout = obj.layout(
        &super::transaction::gid_of(&**obj),
        &|e| resolve(e, &**obj, &ctx.config.service_domain),
        now,
    );
    let shown = row_names(&layout);
    let (mut global, mut branches) = engine_state(&**obj, layout, headers, now);
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
    let retry_request = new_retry_request(&**obj, &old);
    if retry_request.is_some() {
        // Due at once, backoff from the start.
        global.next_cron_time = now;
        global.next_cron_interval = 0;
    }
    let mut decided: Option<(TransStatus, Option<String>)> = None;
    if deleting && obj.abort_on_delete(global.status) {
        decided = Some(delete_decision(global.trans_type));
    } else if old.phase.is_some() && global.next_cron_time > now && !deleting && !just_submitted {
        // Woken early (a watch event, not our requeue): nothing is due yet.
        return Ok(Action::requeue(until(global.next_cron_time, now)));
    }

    let mut tally = CallTally::default();
    let (mut global, branches) = match decided {
        Some(_) => (global, branches),
        None => {
            let (global, branches, pass_tally, decision) = run_engine(&**obj, ctx, global, branches).await;
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
        if !super::sql::save(
            store.as_ref(),
            &ctx.identity,
            saved_status,
            &without_header_values(&**obj, &global),
            &branches,
            &loaded,
            now,
        )
        .await?
        {
            // Another leader wrote since this pass read: its decision stands; re-read next time.
            return Err(ReconcileError::Fenced);
        }
    }
    let mut detailed = next_status(&old, &shown, &global, &branches, &tally, obj.meta().generation, now);
    detailed.retry_request = retry_request.or_else(|| old.retry_request.clone());
    let mut status = detailed.clone();
    if ctx.config.store.is_some() {
        status.branches.clear();
    }
    let version = write_status(api, &**obj, &seen, &status, ctx).await?;
    let finished = global.status.is_finished();
    ctx.written.record(
        &**obj,
        &Seen {
            status: status.clone(),
            finalizer: seen.finalizer,
            version,
        },
    );
    publish_transition(&**obj, &old, &detailed, &loaded, &global, ctx).await;
    if finished {
        if deleting && seen.finalizer {
            remove_finalizer(api, &**obj).await?;
        }
        return expire(api, &**obj, &status, ctx, now).await;
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
        max_request_timeout: ctx.config.max_request_timeout,
        now: &now,
        metrics: &ctx.metrics,
    };
    let abort_for_delete = |status: TransStatus| obj.abort_on_delete(status) && ctx.deletions.requested(obj);
    let mut sink = StatusSink {
        fence: Arc::clone(&ctx.fence),
        abort_for_delete: &abort_for_delete,
        tally: CallTally::default(),
        decision: None,
    };
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

/// The decision a delete of a running transaction takes: roll back (a saga, a TCC before its
/// confirm), or fail a Msg that was never submitted.
fn delete_decision(trans_type: TransType) -> (TransStatus, Option<String>) {
    match trans_type {
        TransType::Msg => (TransStatus::Failed, Some("deleted before it was submitted".to_owned())),
        _ => (
            TransStatus::Aborting,
            Some("deleted while running: rolling back".to_owned()),
        ),
    }
}

/// Collects the pass in memory. A decision (any transition short of the end) stops the pass so
/// that it is written before it is acted on.
struct StatusSink<'a> {
    fence: Arc<Fence>,
    /// Whether a delete seen since the pass began rolls back a transaction in this status.
    abort_for_delete: &'a (dyn Fn(TransStatus) -> bool + Sync),
    tally: CallTally,
    decision: Option<(TransStatus, Option<String>)>,
}

impl PassSink for StatusSink<'_> {
    type Error = std::convert::Infallible;

    async fn transition(
        &mut self,
        global: &GlobalTrans,
        _updates: &[BranchUpdate],
        to: TransStatus,
        reason: Option<&str>,
        _now: Millis,
    ) -> Result<bool, Self::Error> {
        let forward = !matches!(to, TransStatus::Aborting | TransStatus::Failed);
        if forward && (self.abort_for_delete)(global.status) {
            // Deleted before the commit was recorded: roll back what ran instead.
            self.decision = Some(delete_decision(global.trans_type));
            return Ok(false);
        }
        if to.is_finished() {
            return Ok(true);
        }
        self.decision = Some((to, reason.map(str::to_owned)));
        Ok(false)
    }

    async fn before_calls(&mut self, global: &GlobalTrans, _: Millis, _: Millis) -> Result<bool, Self::Error> {
        if (self.abort_for_delete)(global.status) {
            self.decision = Some(delete_decision(global.trans_type));
            return Ok(false);
        }
        // No call once this replica may have lost the Lease (a paused process wakes up here).
        Ok(self.fence.holds())
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

/// The URL an endpoint names: its `url`, or its Service's URL. One the policy could not build
/// is never called (the spec check refuses it first, and the invoker refuses the placeholder).
pub fn resolve<K: Resource>(endpoint: &Endpoint, obj: &K, domain: &str) -> String {
    resolve_url(endpoint, obj, domain).unwrap_or_else(|_| "invalid:endpoint".to_owned())
}

/// Like [`resolve`], with the reason a Service URL cannot be built.
pub fn resolve_url<K: Resource>(endpoint: &Endpoint, obj: &K, domain: &str) -> Result<String, Refusal> {
    match (&endpoint.url, &endpoint.service) {
        (Some(url), _) => Ok(url.clone()),
        (None, Some(service)) => {
            let namespace = service
                .namespace
                .clone()
                .or_else(|| obj.meta().namespace.clone())
                .unwrap_or_else(|| "default".to_owned());
            let url = service_url(service, &namespace, domain)?;
            match &service.grpc_method {
                // The same host and port, as a gRPC target; the method's form is checked by the
                // schema and again when the target is parsed.
                Some(method) => Ok(format!(
                    "grpc://{}:{}/{method}",
                    url.host_str().unwrap_or_default(),
                    url.port().unwrap_or(80)
                )),
                None => Ok(String::from(url)),
            }
        }
        (None, None) => Ok(String::new()),
    }
}

/// `http://name.namespace.domain:port/path`, built by the URL parser from validated labels.
fn service_url(service: &ServiceRef, namespace: &str, domain: &str) -> Result<url::Url, Refusal> {
    let invalid = |e: url::ParseError| Refusal::Invalid(e.to_string());
    let mut url = url::Url::parse("http://service.invalid/").map_err(invalid)?;
    let host = [service.name.as_str(), namespace, domain.trim_matches('.')].join(".");
    url.set_host(Some(&host)).map_err(invalid)?;
    url.set_port(Some(service.port.unwrap_or(80)))
        .map_err(|()| Refusal::Invalid("the port cannot be set".to_owned()))?;
    let path = service.path.as_deref().unwrap_or("/");
    match path.split_once('?') {
        Some((path, query)) => {
            url.set_path(path);
            url.set_query(Some(query));
        }
        None => url.set_path(path),
    }
    Ok(url)
}

/// `global` with each header's source in place of its value: what SQL may keep.
fn without_header_values<K: Transactional>(obj: &K, global: &GlobalTrans) -> GlobalTrans {
    let mut record = global.clone();
    record.options.branch_headers = obj.headers().iter().map(|h| (h.name.clone(), h.source())).collect();
    record
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
                if secret.labels().get(SECRET_OPT_IN).map(String::as_str) != Some("true") {
                    return Err(ReconcileError::SecretRefused(format!(
                        "secret {namespace}/{} is not labelled {SECRET_OPT_IN}=true: label it to let transactions send its values as headers",
                        reference.name
                    )));
                }
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
    let seen = ctx.written.view(&**obj);
    let old = &seen.status;
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
        retry_request: old.retry_request.clone(),
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
    if seen.finalizer {
        remove_finalizer(api, &**obj).await?;
    }
    let changed = old.phase.is_none() || *old != status;
    let version = write_status(api, &**obj, &seen, &status, ctx).await?;
    ctx.written.record(
        &**obj,
        &Seen {
            status,
            finalizer: false,
            version,
        },
    );
    if changed {
        publish(&**obj, ctx, EventType::Warning, reason, message).await;
    }
    Ok(Action::await_change())
}

/// Writes the status with server-side apply unless it is unchanged, conditional on the
/// resourceVersion it was computed from (a conflict means someone else decided since: the caller
/// re-reads and re-plans). Returns the resourceVersion the object has now.
async fn write_status<K: Transactional>(
    api: &Api<K>,
    obj: &K,
    seen: &Seen,
    status: &TransactionStatus,
    ctx: &Context,
) -> Result<Option<String>, ReconcileError> {
    let labels = KindLabels {
        kind: K::KIND.to_owned(),
    };
    if seen.status.phase.is_some() && seen.status == *status {
        ctx.metrics.status_skips.get_or_create(&labels).inc();
        return Ok(seen.version.clone());
    }
    if !ctx.fence.holds() {
        return Err(ReconcileError::Fenced);
    }
    let written = match apply_status(api, obj, seen.version.as_deref(), status).await {
        Err(ReconcileError::Kube(error)) if matches!(&*error, kube::Error::Api(s) if s.code == 409) => {
            // Something changed since our view. If it is not the status (an annotation, a label,
            // the deletion mark), no newer decision exists: write ours on the current version.
            // Otherwise the caller re-reads and re-plans.
            let current = timed(api.get_status(&obj.name_any())).await?;
            if current.tx_status().cloned().unwrap_or_default() != seen.status {
                return Err(ReconcileError::Kube(error));
            }
            apply_status(api, obj, current.meta().resource_version.as_deref(), status).await?
        }
        other => other?,
    };
    ctx.metrics.status_writes.get_or_create(&labels).inc();
    Ok(written.meta().resource_version.clone())
}

/// One server-side apply of the status, conditional on `version` when given.
async fn apply_status<K: Transactional>(
    api: &Api<K>,
    obj: &K,
    version: Option<&str>,
    status: &TransactionStatus,
) -> Result<K, ReconcileError> {
    let mut patch = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": K::KIND,
        "status": status,
    });
    if let Some(version) = version {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    timed(api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    ))
    .await
}

fn has_finalizer<K: Resource>(obj: &K) -> bool {
    obj.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds our finalizer, conditional on `version` (the view the pass starts from). Returns the
/// resourceVersion after the write.
async fn add_finalizer<K: Transactional>(
    api: &Api<K>,
    obj: &K,
    version: Option<&str>,
) -> Result<Option<String>, ReconcileError> {
    // JSON patch with a `test`: fails (and is retried) rather than overwrite a list that changed.
    let mut patch = if obj.finalizers().is_empty() {
        vec![
            json!({"op": "test", "path": "/metadata/finalizers", "value": null}),
            json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}),
        ]
    } else {
        vec![json!({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER})]
    };
    if let Some(version) = version {
        patch.insert(
            0,
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": version}),
        );
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(patch))
        .map_err(|e| ReconcileError::Internal(format!("bad patch: {e}")))?;
    let written = timed(api.patch(&obj.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch))).await?;
    Ok(written.meta().resource_version.clone())
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
    let due = crate::model::after_seconds(finished, ttl);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::SystemClock;

    #[tokio::test]
    async fn a_closed_fence_has_lapsed_and_has_no_time_left() {
        let fence = Fence::open(Arc::new(SystemClock));
        assert!(fence.holds());
        fence.close();
        assert!(!fence.holds());
        assert_eq!(fence.remaining(), Duration::ZERO);
        // `Millis::MIN` minus now overflowed here before (a panic in debug builds, a fence that
        // never lapsed in release builds, so in-flight calls were not cancelled).
        tokio::time::timeout(Duration::from_secs(5), fence.lapsed())
            .await
            .expect("lapsed at once");
        let never_opened = Fence::closed(Arc::new(SystemClock));
        tokio::time::timeout(Duration::from_secs(5), never_opened.lapsed())
            .await
            .expect("lapsed at once");
    }
}
