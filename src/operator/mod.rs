//! The Kubernetes operator: `Saga`, `Tcc` and `Msg` resources reconciled with the status as the
//! store, behind leader election, with health endpoints.

pub mod crd;
pub mod health;
pub mod leader;
pub mod reconcile;
pub mod sql;
pub mod transaction;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use futures::{FutureExt, StreamExt};
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::crd::{Msg, Saga, Tcc};
use self::health::Health;
use self::leader::{LeaderConfig, LeaderElector};
use self::reconcile::{Context, Fence, ReconcileConfig, error_policy, reconcile};
use self::transaction::Transactional;
use crate::invoke::Invoker;
use crate::metrics::Metrics;
use crate::scheduler::Clock;

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Another replica took the leader Lease; this one stops so that it never drives a
    /// transaction the new leader drives.
    #[error("lost the leader lease")]
    LeadershipLost,
    /// The operator task panicked.
    #[error("operator task failed: {0}")]
    Task(String),
}

/// Operator settings.
#[derive(Clone)]
pub struct OperatorConfig {
    /// Namespaces to watch; empty for all.
    pub namespaces: Vec<String>,
    /// Leader election; `None` when a single replica runs.
    pub leader: Option<LeaderConfig>,
    /// Reconcile settings.
    pub reconcile: ReconcileConfig,
    /// Most resources reconciled at once per kind and namespace.
    pub concurrency: u16,
    /// Name reported on Events.
    pub reporter: String,
}

/// A running operator.
pub struct Operator {
    /// Liveness and readiness.
    pub health: Arc<Health>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), OperatorError>>,
}

impl Operator {
    /// Starts the controllers (after winning the election, when configured).
    pub fn start(
        client: Client,
        config: OperatorConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        invoker: Invoker,
    ) -> Self {
        let health = Arc::new(Health::default());
        let health_of_task = Arc::clone(&health);
        let shutdown = CancellationToken::new();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "kubetx".to_owned(),
                instance: Some(config.reporter.clone()),
            },
        );
        let fence = Arc::new(match config.leader {
            Some(_) => Fence::closed(Arc::clone(&clock)),
            None => Fence::open(Arc::clone(&clock)),
        });
        let context = Arc::new(Context {
            client: client.clone(),
            invoker,
            metrics,
            recorder,
            config: config.reconcile.clone(),
            clock: Arc::clone(&clock),
            written: Default::default(),
            fence,
            identity: config.reporter.clone(),
            deletions: Default::default(),
        });
        let stopped = shutdown.clone();
        let task = tokio::spawn(async move {
            let result = run(
                client,
                config,
                context,
                clock,
                Arc::clone(&health_of_task),
                stopped.clone(),
            )
            .await;
            // However it ended (a lost Lease above all), whoever waits on the token learns it:
            // the process exits, and its restart stands by for the Lease again.
            stopped.cancel();
            result
        });
        Operator { health, shutdown, task }
    }

    /// Stops the controllers, letting in-flight reconciles finish, and gives up the Lease.
    pub async fn stop(self) -> Result<(), OperatorError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the operator stops on its own (it lost the Lease) or is stopped.
    pub async fn wait(self) -> Result<(), OperatorError> {
        self.task.await.map_err(|e| OperatorError::Task(e.to_string()))?
    }

    /// A token that stops the operator when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

async fn run(
    client: Client,
    config: OperatorConfig,
    context: Arc<Context>,
    clock: Arc<dyn Clock>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), OperatorError> {
    let Some(leader) = config.leader.clone() else {
        health.leading.store(true, Ordering::SeqCst);
        run_controllers(&client, &config, context, &health, shutdown).await;
        return Ok(());
    };
    let elector = Arc::new(LeaderElector::new(client.clone(), leader));
    let fence = Arc::clone(&context.fence);
    // Stand by until the Lease is ours.
    loop {
        let attempt = clock.now();
        match elector.try_acquire_or_renew(attempt).await {
            Ok(true) => {
                fence.extend(attempt.saturating_add(elector.renew_deadline().as_millis() as i64));
                break;
            }
            Ok(false) => health.standby.store(true, Ordering::SeqCst),
            Err(error) => warn!(%error, "leader election failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(elector.renew_interval()) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    health.standby.store(false, Ordering::SeqCst);
    health.leading.store(true, Ordering::SeqCst);
    let lost = shutdown.child_token();
    let renewer = tokio::spawn(renew(Arc::clone(&elector), clock, Arc::clone(&fence), lost.clone()));
    run_controllers(&client, &config, context, &health, lost.clone()).await;
    health.leading.store(false, Ordering::SeqCst);
    renewer.abort();
    fence.close();
    if shutdown.is_cancelled() {
        elector.release().await;
        return Ok(());
    }
    Err(OperatorError::LeadershipLost)
}

/// Renews the Lease, extending the fence to the renew deadline after each renewal; closes the
/// fence and cancels `lost` when another replica holds the Lease or the deadline passes without a
/// renewal. In-flight passes stop when the fence lapses, before the Lease can expire.
async fn renew(elector: Arc<LeaderElector>, clock: Arc<dyn Clock>, fence: Arc<Fence>, lost: CancellationToken) {
    let deadline = elector.renew_deadline().as_millis() as i64;
    let mut pause = elector.renew_interval();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = lost.cancelled() => return,
            () = fence.lapsed() => {
                warn!("leader lease not renewed before its renew deadline; stopping");
                break;
            }
        }
        // The Lease runs from when the renewal was sent, not from when it was answered; an
        // answer may take as long as the fence still holds, and a failure is retried soon.
        let attempt = clock.now();
        let renewal = tokio::time::timeout(fence.remaining(), elector.try_acquire_or_renew(attempt)).await;
        pause = elector.retry_period();
        match renewal {
            Ok(Ok(true)) => {
                fence.extend(attempt.saturating_add(deadline));
                pause = elector.renew_interval();
            }
            Ok(Ok(false)) => {
                warn!("another replica holds the leader lease; stopping");
                break;
            }
            Ok(Err(error)) => warn!(%error, "cannot renew the leader lease; retrying"),
            Err(_) => warn!("renewing the leader lease timed out; retrying"),
        }
        if !fence.holds() {
            warn!("leader lease not renewed before its renew deadline; stopping");
            break;
        }
    }
    fence.close();
    lost.cancel();
}

async fn run_controllers(
    client: &Client,
    config: &OperatorConfig,
    context: Arc<Context>,
    health: &Health,
    stop: CancellationToken,
) {
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let mut runs: Vec<BoxFuture<'static, ()>> = Vec::new();
    let mut synced: Vec<BoxFuture<'static, ()>> = Vec::new();
    for scope in &scopes {
        add_controller::<Saga>(client, scope, config, &context, &stop, &mut runs, &mut synced);
        add_controller::<Tcc>(client, scope, config, &context, &stop, &mut runs, &mut synced);
        add_controller::<Msg>(client, scope, config, &context, &stop, &mut runs, &mut synced);
    }
    info!(namespaces = ?config.namespaces, "controllers started");
    let ready = async {
        join_all(synced).await;
        health.synced.store(true, Ordering::SeqCst);
        info!("watches synced");
        // Keep this branch pending so that only the controllers end the select.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = join_all(runs) => {}
        _ = ready => {}
    }
    health.synced.store(false, Ordering::SeqCst);
}

fn add_controller<K: Transactional>(
    client: &Client,
    scope: &Option<String>,
    config: &OperatorConfig,
    context: &Arc<Context>,
    stop: &CancellationToken,
    runs: &mut Vec<BoxFuture<'static, ()>>,
    synced: &mut Vec<BoxFuture<'static, ()>>,
) {
    let api: Api<K> = match scope {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let controller = Controller::new(api, watcher::Config::default().any_semantic())
        .with_config(controller::Config::default().concurrency(config.concurrency))
        .graceful_shutdown_on(stop.clone().cancelled_owned());
    let store = controller.store();
    context.deletions.watch(store.clone());
    synced.push(
        async move {
            // Err only when the controller is gone, which the runs branch notices.
            let _ = store.wait_until_ready().await;
        }
        .boxed(),
    );
    runs.push(
        controller
            .run(reconcile::<K>, error_policy::<K>, Arc::clone(context))
            .for_each(|_| async {})
            .boxed(),
    );
}

/// Default lease duration of the leader election.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
