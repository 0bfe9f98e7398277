//! Drives transactions: runs passes (engine + invoke + store) under a lease, and a background
//! loop that claims due transactions (retries, timeouts, crash recovery).
//!
//! The happy path never waits for the loop: the API runs the first pass at once in the process
//! that accepted the request. The loop only serves retries and recovery.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, debug_span, info, warn};

use crate::activity::Activity;
use crate::driver::{self, PassContext, PassSink};
use crate::engine::{self, BranchUpdate, Call, Outcome, Policy};
use crate::invoke::Invoker;
use crate::invoke::policy::OutboundPolicy;
use crate::metrics::{Metrics, RouteLabels, TransLabels};
use crate::model::{Branch, GlobalTrans, Millis, TransStatus};
use crate::store::{Guard, Lease, StatusChange, Store, StoreError};

/// How often the background loop refreshes the gauges of unfinished transactions (a scrape of
/// `/api/metrics` refreshes them too; the operator's `/metrics` relies on this).
const GAUGE_REFRESH: Duration = Duration::from_secs(10);

/// Longest pause of the background loop while the store keeps failing.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(5);

/// Errors of the scheduler layer.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The store failed; the lease expires and the transaction is picked up again.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transaction does not exist.
    #[error("no transaction with gid {0}")]
    NotFound(String),
}

/// Source of the current time, injectable so tests can move time forward.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now(&self) -> Millis;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or_default()
    }
}

/// The system clock shifted by an adjustable offset (tests: "pretend an hour has passed").
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_ms: AtomicI64,
}

impl OffsetClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.offset_ms.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Millis {
        SystemClock.now() + self.offset_ms.load(Ordering::SeqCst)
    }
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Engine policy (retry interval, backoff cap, default timeout).
    pub policy: Policy,
    /// Branch call timeout when the transaction sets none.
    pub request_timeout: Duration,
    /// Longest branch call timeout, whatever the transaction asks for.
    pub max_request_timeout: Duration,
    /// How long a claim lasts before another process may take the transaction over.
    pub lease: Duration,
    /// How often the loop looks for due transactions when idle.
    pub poll_interval: Duration,
    /// Most transactions claimed at once.
    pub claim_batch: i64,
    /// Most passes running at once in this process.
    pub max_concurrent_passes: usize,
    /// POST target for alerts about transactions that keep failing.
    pub alert_webhook: Option<String>,
    /// Backoff doublings before an alert is sent.
    pub alert_retry_limit: u32,
    /// This process's stable identity on a shared store (a pod name): a restart under the same
    /// identity takes its predecessor's leases back at once. Empty: a fresh one per process.
    pub instance_id: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            policy: Policy::default(),
            request_timeout: Duration::from_secs(3),
            max_request_timeout: Duration::from_secs(600),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            claim_batch: 64,
            max_concurrent_passes: 1024,
            alert_webhook: None,
            alert_retry_limit: 3,
            instance_id: String::new(),
        }
    }
}

/// How a pass ended.
#[derive(Debug, Clone)]
pub struct PassReport {
    /// The transaction as this pass left it.
    pub global: GlobalTrans,
    /// False when the pass stopped because another process or an API call moved the transaction.
    pub held_lease: bool,
    /// Last non-success outcome of the pass, for `wait_result` answers.
    pub last_problem: Option<Outcome>,
}

/// Drives transactions for one process.
pub struct Coordinator {
    store: Arc<dyn Store>,
    invoker: Invoker,
    clock: Arc<dyn Clock>,
    config: SchedulerConfig,
    instance: String,
    owner: String,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    wake: Notify,
    activity: Activity,
}

impl Coordinator {
    /// Creates a coordinator with a fresh lease-owner id, `{instance}/{nonce}`: the instance
    /// says whose leases a restart may take back, the nonce keeps a previous process of the same
    /// instance from writing after a restart has taken them.
    pub fn new(
        store: Arc<dyn Store>,
        invoker: Invoker,
        clock: Arc<dyn Clock>,
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let instance = match config.instance_id.is_empty() {
            true => format!("kubetx-{:016x}", rand::random::<u64>()),
            false => config.instance_id.clone(),
        };
        let owner = format!(
            "{}{:016x}",
            crate::store::instance_prefix(&instance),
            rand::random::<u64>()
        );
        let permits = Arc::new(Semaphore::new(config.max_concurrent_passes.max(1)));
        Coordinator {
            store,
            invoker,
            clock,
            config,
            instance,
            owner,
            metrics,
            tracker: TaskTracker::new(),
            permits,
            wake: Notify::new(),
            activity: Activity::default(),
        }
    }

    /// What this process saw of recent branch calls (the console's attempts and last errors).
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Reads the unfinished counts and the earliest due time from the store into the gauges. A
    /// failed read leaves the last values (the failure shows in `kubetx_store_errors`).
    pub async fn refresh_gauges(&self) {
        if let Ok(summary) = self.store.unfinished_summary().await {
            self.metrics.set_unfinished(&summary, self.clock.now());
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// Settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The outbound policy every branch URL must pass.
    pub fn policy(&self) -> &OutboundPolicy {
        self.invoker.policy()
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A lease for this process starting now.
    pub fn lease(&self, now: Millis) -> Lease {
        Lease {
            owner: self.owner.clone(),
            until: now + self.config.lease.as_millis() as Millis,
        }
    }

    /// This process's lease-owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// This process's instance identity.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Takes back at once the leases a previous process of this instance held (on SQLite, whose
    /// file lock proves the previous owner gone, every lease), making them due now; call it
    /// before the loop starts. Returns how many.
    pub async fn reclaim_leases(&self) -> Result<u64, SchedulerError> {
        let now = self.clock.now();
        let reclaimed = self.store.reclaim_leases(&self.instance, &self.owner, now).await?;
        if reclaimed > 0 {
            info!(reclaimed, instance = %self.instance, "took back the leases of a previous process; resuming them now");
        }
        Ok(reclaimed)
    }

    /// Wakes the background loop (something became due now).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs a pass in the background on a free slot; the caller holds the lease. Without a free
    /// slot nothing is spawned: the transaction stays in the store and its lease expires, after
    /// which the scheduler takes it (see [`Coordinator::spawn_pass_from`], which hands it back at
    /// once). Clients that do not wait can never grow this process's work without bound.
    pub fn spawn_pass(self: &Arc<Self>, gid: String) {
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            self.metrics.passes_deferred.inc();
            debug!(%gid, "no free slot; the scheduler takes the transaction when its lease expires");
            return;
        };
        let this = Arc::clone(self);
        self.tracker.spawn(async move {
            let _permit = permit;
            if let Err(error) = this.run_pass(&gid).await {
                warn!(%gid, %error, "pass failed; the transaction is retried when its lease expires");
            }
        });
    }

    /// Like [`Coordinator::spawn_pass`], over the transaction as the caller just wrote it (see
    /// [`Coordinator::run_pass_from`]). Without a free slot the transaction is handed back to the
    /// scheduler, due at once.
    pub async fn spawn_pass_from(
        self: &Arc<Self>,
        global: GlobalTrans,
        branches: Option<Vec<Branch>>,
    ) -> Result<(), SchedulerError> {
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            return self.defer(&global).await;
        };
        let this = Arc::clone(self);
        self.tracker.spawn(async move {
            let _permit = permit;
            let gid = global.gid.clone();
            // Boxed, so that the spawned future stays small: tokio moves it several times on
            // its way into the task, and a pass's state is kilobytes (BENCHMARKS.md, issue 15).
            if let Err(error) = Box::pin(this.run_pass_from(global, branches)).await {
                warn!(%gid, %error, "pass failed; the transaction is retried when its lease expires");
            }
        });
        Ok(())
    }

    /// Gives a transaction this process holds back to the scheduler, due now.
    async fn defer(&self, global: &GlobalTrans) -> Result<(), SchedulerError> {
        self.metrics.passes_deferred.inc();
        let now = self.clock.now();
        let guard = Guard {
            gid: global.gid.clone(),
            owner: self.owner.clone(),
            status: global.status,
        };
        self.store.release(&guard, now, global.next_cron_interval, now).await?;
        self.wake();
        Ok(())
    }

    /// Claims the due transactions and runs their passes to completion. Returns how many ran.
    /// The background loop uses [`Coordinator::run`]; tests call this to step time by hand.
    pub async fn tick(&self) -> Result<usize, SchedulerError> {
        let now = self.clock.now();
        let gids = self
            .store
            .claim_due(&self.lease(now), now, self.config.claim_batch)
            .await?;
        let results = join_all(gids.iter().map(|gid| self.run_pass(gid))).await;
        for (gid, result) in gids.iter().zip(results) {
            if let Err(error) = result {
                warn!(%gid, %error, "pass failed");
            }
        }
        Ok(gids.len())
    }

    /// The background loop: claim due transactions, run them, sleep when idle, back off
    /// while the store fails. Returns when `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        let mut gauges_at: Option<std::time::Instant> = None;
        loop {
            if gauges_at.is_none_or(|at| at.elapsed() >= GAUGE_REFRESH) {
                self.refresh_gauges().await;
                gauges_at = Some(std::time::Instant::now());
            }
            let idle = match self.claim_and_spawn().await {
                Ok(claimed) => {
                    if failures > 0 {
                        info!(failures, "store answers again; claiming resumed");
                        failures = 0;
                    }
                    claimed == 0
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 {
                        warn!(%error, "cannot claim due transactions; backing off");
                    } else {
                        debug!(%error, failures, "still cannot claim due transactions");
                    }
                    true
                }
            };
            if idle {
                // Exponential while the store fails, capped (the poll interval if that is longer).
                let pause = (self.config.poll_interval * 2u32.pow(failures.min(8)))
                    .min(MAX_CLAIM_BACKOFF.max(self.config.poll_interval));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.wake.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
            } else if shutdown.is_cancelled() {
                return;
            }
        }
    }

    async fn claim_and_spawn(self: &Arc<Self>) -> Result<usize, SchedulerError> {
        // Claim no more than can start now: a claimed transaction waiting for a slot would only
        // see its lease run down.
        let free = self.permits.available_permits() as i64;
        if free == 0 {
            return Ok(0);
        }
        let now = self.clock.now();
        let gids = self
            .store
            .claim_due(&self.lease(now), now, self.config.claim_batch.min(free))
            .await?;
        let claimed = gids.len();
        for gid in gids {
            self.spawn_pass(gid);
        }
        Ok(claimed)
    }

    /// Waits for in-flight passes to finish, at most `timeout`. Returns false on timeout (the
    /// leases then expire and another start resumes the work).
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.tracker.close();
        let drained = tokio::time::timeout(timeout, self.tracker.wait()).await.is_ok();
        if drained {
            info!("in-flight transactions drained");
        } else {
            warn!("drain timed out; unfinished passes resume after their lease expires");
        }
        drained
    }

    /// Runs one pass over a transaction whose lease this process holds.
    pub async fn run_pass(&self, gid: &str) -> Result<PassReport, SchedulerError> {
        self.metrics.passes.inc();
        let global = self
            .store
            .find(gid)
            .await?
            .ok_or_else(|| SchedulerError::NotFound(gid.to_owned()))?;
        self.pass_over(global, None).await
    }

    /// Runs one pass over a transaction whose lease this process holds, starting from the state
    /// the caller has just written (the API after a create or a status change): no read-back of
    /// the transaction, nor of its branches when given. Every write of the pass is still guarded
    /// by lease and status, so a concurrent change stops it exactly as with [`Coordinator::run_pass`].
    pub async fn run_pass_from(
        &self,
        global: GlobalTrans,
        branches: Option<Vec<Branch>>,
    ) -> Result<PassReport, SchedulerError> {
        self.metrics.passes.inc();
        self.pass_over(global, branches).await
    }

    async fn pass_over(
        &self,
        global: GlobalTrans,
        branches: Option<Vec<Branch>>,
    ) -> Result<PassReport, SchedulerError> {
        if global.owner != self.owner {
            return Ok(self.lost(global, None));
        }
        let branches = match branches {
            Some(branches) => branches,
            None => self.store.branches(&global.gid).await?,
        };
        let clock = Arc::clone(&self.clock);
        let now = move || clock.now();
        let context = PassContext {
            invoker: &self.invoker,
            policy: &self.config.policy,
            request_timeout: self.config.request_timeout,
            max_request_timeout: self.config.max_request_timeout,
            now: &now,
            metrics: &self.metrics,
        };
        let mut sink = StoreSink {
            store: self.store.as_ref(),
            owner: &self.owner,
            lease: self.config.lease.as_millis() as Millis,
            lease_until: global.next_cron_time,
            activity: &self.activity,
            gid: global.gid.clone(),
        };
        let trans_type = global.trans_type;
        let span = debug_span!("pass", gid = %global.gid, mode = %trans_type, status = %global.status);
        crate::telemetry::continue_trace(&span, &global.ext_data);
        let started = std::time::Instant::now();
        let result = driver::run_pass(global, branches, &context, &mut sink)
            .instrument(span)
            .await;
        self.metrics
            .pass_duration
            .get_or_create(&RouteLabels {
                api: trans_type.as_str().to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
        let result = result?;
        if !result.completed {
            return Ok(self.lost(result.global, result.last_problem));
        }
        let global = result.global;
        if global.status.is_finished() {
            self.record_finish(&global, self.clock.now());
        } else if result.pass.saw_error() {
            self.maybe_alert(&global, &result.pass, global.next_cron_interval);
        }
        Ok(PassReport {
            global,
            held_lease: true,
            last_problem: result.last_problem,
        })
    }

    fn lost(&self, global: GlobalTrans, last_problem: Option<Outcome>) -> PassReport {
        self.metrics.leases_lost.inc();
        debug!(gid = %global.gid, "lease or status moved; pass stopped");
        PassReport {
            global,
            held_lease: false,
            last_problem,
        }
    }

    fn record_finish(&self, global: &GlobalTrans, now: Millis) {
        self.metrics
            .transactions_finished
            .get_or_create(&TransLabels {
                trans_type: global.trans_type.as_str(),
                status: global.status.as_str(),
            })
            .inc();
        self.metrics
            .transaction_duration
            .get_or_create(&RouteLabels {
                api: global.trans_type.as_str().to_owned(),
            })
            .observe((now - global.create_time).max(0) as f64 / 1000.0);
        info!(gid = %global.gid, trans_type = %global.trans_type, status = %global.status, "transaction finished");
    }

    fn maybe_alert(&self, global: &GlobalTrans, pass: &engine::Pass, interval: i64) {
        let Some(webhook) = self.config.alert_webhook.clone() else {
            return;
        };
        let retry_count = engine::retry_count(interval, engine::base_interval(global, &self.config.policy));
        if retry_count < self.config.alert_retry_limit {
            return;
        }
        let (branch, error) = pass.last_error().cloned().unwrap_or_default();
        let body = serde_json::json!({
            "gid": global.gid,
            "status": global.status.as_str(),
            "branch": branch,
            "error": error,
            "retry_count": retry_count,
        });
        let invoker = self.invoker.clone();
        let gid = global.gid.clone();
        self.metrics.alerts.inc();
        self.tracker.spawn(async move {
            if let Err(error) = invoker.post_json(&webhook, &body, Duration::from_secs(3)).await {
                // The webhook URL may carry a token: never logged.
                warn!(gid = %gid, %error, "alert webhook failed");
            }
        });
    }
}

/// Makes every step of a pass durable in the store, guarded by this process's lease.
struct StoreSink<'a> {
    store: &'a dyn Store,
    owner: &'a str,
    lease: Millis,
    lease_until: Millis,
    activity: &'a Activity,
    gid: String,
}

impl StoreSink<'_> {
    fn guard(&self, global: &GlobalTrans) -> Guard {
        Guard {
            gid: global.gid.clone(),
            owner: self.owner.to_owned(),
            status: global.status,
        }
    }
}

impl PassSink for StoreSink<'_> {
    type Error = SchedulerError;

    fn call_made(&mut self, call: &Call, outcome: &Outcome, now: Millis) {
        self.activity.record(&self.gid, &call.branch_id, &call.op, outcome, now);
    }

    async fn transition(
        &mut self,
        global: &GlobalTrans,
        updates: &[BranchUpdate],
        to: TransStatus,
        reason: Option<&str>,
        now: Millis,
    ) -> Result<bool, SchedulerError> {
        let mut change = StatusChange::new(&global.gid, global.status, to, now);
        change.owner = Some(self.owner.to_owned());
        change.rollback_reason = reason.map(str::to_owned);
        change.branch_updates = updates.to_vec();
        Ok(self.store.change_status(&change).await?)
    }

    async fn before_calls(
        &mut self,
        global: &GlobalTrans,
        deadline: Millis,
        now: Millis,
    ) -> Result<bool, SchedulerError> {
        // Keep the lease beyond the slowest call, with a margin, so nobody takes over mid-call.
        let needed = deadline + 5_000;
        if self.lease_until >= needed {
            return Ok(true);
        }
        self.lease_until = needed.max(now + self.lease);
        Ok(self.store.extend_lease(&self.guard(global), self.lease_until).await?)
    }

    async fn branches_updated(
        &mut self,
        global: &GlobalTrans,
        updates: &[BranchUpdate],
        now: Millis,
    ) -> Result<bool, SchedulerError> {
        Ok(self.store.update_branches(&self.guard(global), updates, now).await?)
    }

    async fn park(
        &mut self,
        global: &GlobalTrans,
        at: Millis,
        interval: i64,
        now: Millis,
    ) -> Result<bool, SchedulerError> {
        Ok(self.store.release(&self.guard(global), at, interval, now).await?)
    }

    async fn reload_branches(&mut self, global: &GlobalTrans) -> Result<Option<Vec<Branch>>, SchedulerError> {
        Ok(Some(self.store.branches(&global.gid).await?))
    }
}
