//! One processing pass over a transaction: the loop that joins the pure engine to branch calls.
//!
//! Where each step is made durable differs by front door: the DTM server writes every step to
//! its store under a lease, the operator keeps the pass in memory and writes the resource's
//! status once at the end. Both plug in through [`PassSink`].

use std::future::Future;
use std::time::Duration;

use futures::future::join_all;
use tracing::{Instrument as _, debug};

use crate::engine::{self, BranchUpdate, Call, Outcome, Pass, Plan, Policy, Target};
use crate::invoke::{BranchCall, Invoker};
use crate::metrics::{BranchLabels, Metrics};
use crate::model::{Branch, GlobalTrans, Millis, TransStatus, TransType, without_userinfo};

/// Where a pass's steps go. Every method may veto the rest of the pass by answering `false`
/// (e.g. the lease was lost); the pass then stops without further calls.
pub trait PassSink: Send {
    /// Error of the sink (store or API failure).
    type Error: Send;

    /// The global status is about to change from `global.status` to `to`, and `updates` (the
    /// outcomes that caused it, possibly none) are to be recorded with it.
    fn transition(
        &mut self,
        global: &GlobalTrans,
        updates: &[BranchUpdate],
        to: TransStatus,
        reason: Option<&str>,
        now: Millis,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Branches are about to be called; `deadline` is when the slowest call gives up.
    fn before_calls(
        &mut self,
        global: &GlobalTrans,
        deadline: Millis,
        now: Millis,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Outcomes changed these branch rows.
    fn branches_updated(
        &mut self,
        global: &GlobalTrans,
        updates: &[BranchUpdate],
        now: Millis,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// A call was made (for attempt counters and error messages); synchronous, in call order.
    fn call_made(&mut self, _call: &Call, _outcome: &Outcome, _now: Millis) {}

    /// The pass is over and the transaction is unfinished: look again at `at`.
    fn park(
        &mut self,
        global: &GlobalTrans,
        at: Millis,
        interval: i64,
        now: Millis,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Rows to use after leaving `prepared` (registrations can no longer race); `None` keeps
    /// the rows in memory.
    fn reload_branches(
        &mut self,
        _global: &GlobalTrans,
    ) -> impl Future<Output = Result<Option<Vec<Branch>>, Self::Error>> + Send {
        async { Ok(None) }
    }
}

/// What a pass needs besides the transaction.
pub struct PassContext<'a> {
    /// The shared HTTP client.
    pub invoker: &'a Invoker,
    /// Engine policy.
    pub policy: &'a Policy,
    /// Branch call timeout when the transaction sets none.
    pub request_timeout: Duration,
    /// Longest branch call timeout, whatever the transaction asks for.
    pub max_request_timeout: Duration,
    /// Current time.
    pub now: &'a (dyn Fn() -> Millis + Send + Sync),
    /// Branch call counters.
    pub metrics: &'a Metrics,
}

/// How a pass ended.
#[derive(Debug, Clone)]
pub struct PassResult {
    /// The transaction as the pass left it.
    pub global: GlobalTrans,
    /// Its branch rows.
    pub branches: Vec<Branch>,
    /// False when the sink vetoed the pass (another writer moved the transaction).
    pub completed: bool,
    /// Last non-success outcome, for `wait_result` answers.
    pub last_problem: Option<Outcome>,
    /// The engine's memory of the pass (errors seen, for alerts).
    pub pass: Pass,
}

/// Runs one pass: plan, call, absorb, until the engine parks or finishes the transaction.
pub async fn run_pass<S: PassSink>(
    mut global: GlobalTrans,
    mut branches: Vec<Branch>,
    context: &PassContext<'_>,
    sink: &mut S,
) -> Result<PassResult, S::Error> {
    let mut pass = Pass::default();
    let mut last_problem = None;
    // Branch outcomes not yet handed to the sink, and since when. They wait for the next step
    // of the pass so that, when they cause a transition (the last step succeeded, a step
    // failed), outcome and transition are one write; see [`hold_outcomes`] for how long.
    let mut unrecorded: Vec<BranchUpdate> = Vec::new();
    let mut held_since = Millis::MAX;
    let completed = loop {
        let now = (context.now)();
        let plan = engine::plan(&global, &branches, &pass, now, context.policy);
        if !unrecorded.is_empty() && !hold_outcomes(&plan, unrecorded.len(), held_since, now) {
            if !sink.branches_updated(&global, &unrecorded, now).await? {
                break false;
            }
            unrecorded.clear();
        }
        if unrecorded.is_empty() {
            held_since = Millis::MAX;
        }
        match plan {
            Plan::Finished => break true,
            Plan::Transition { to, reason } => {
                let updates = std::mem::take(&mut unrecorded);
                if !sink.transition(&global, &updates, to, reason.as_deref(), now).await? {
                    break false;
                }
                debug!(gid = %global.gid, from = %global.status, %to, "transition");
                let left_prepared = global.status == TransStatus::Prepared;
                global.status = to;
                global.update_time = now;
                if let Some(reason) = reason {
                    global.rollback_reason = reason;
                }
                match to {
                    TransStatus::Succeed => global.finish_time = Some(now),
                    TransStatus::Failed => global.rollback_time = Some(now),
                    _ => {}
                }
                if to.is_finished() {
                    global.owner.clear();
                    break true;
                }
                if left_prepared && let Some(fresh) = sink.reload_branches(&global).await? {
                    branches = fresh;
                }
            }
            Plan::Invoke(calls) => {
                let timeout = request_timeout(&global, context.request_timeout).min(context.max_request_timeout);
                if !sink
                    .before_calls(&global, now + timeout.as_millis() as Millis, now)
                    .await?
                {
                    break false;
                }
                let calls_made = join_all(calls.iter().map(|call| invoke(context, &global, call, timeout)));
                let Some(outcomes) =
                    call_recording_held(calls_made, sink, &global, &mut unrecorded, held_since, context.now).await?
                else {
                    break false;
                };
                if unrecorded.is_empty() {
                    held_since = Millis::MAX;
                }
                let now = (context.now)();
                for (call, outcome) in calls.iter().zip(&outcomes) {
                    sink.call_made(call, outcome, now);
                    if !matches!(outcome, Outcome::Success) {
                        last_problem = Some(outcome.clone());
                    }
                    if let Some(update) = engine::absorb(&global, &mut branches, &mut pass, call, outcome, now) {
                        unrecorded.push(update);
                        held_since = held_since.min(now);
                    }
                }
            }
            Plan::Park { at, interval } => {
                if !sink.park(&global, at, interval, now).await? {
                    break false;
                }
                global.owner.clear();
                global.next_cron_time = at;
                global.next_cron_interval = interval;
                break true;
            }
        }
    };
    Ok(PassResult {
        global,
        branches,
        completed,
        last_problem,
        pass,
    })
}

/// Most branch outcomes a pass holds back while it goes on calling (see [`hold_outcomes`]).
const MAX_HELD_OUTCOMES: usize = 16;

/// Longest a pass holds branch outcomes back while it goes on calling, in milliseconds.
const MAX_HOLD_MILLIS: Millis = 100;

/// Whether outcomes not yet recorded may wait past this step of the pass. A transition records
/// them with itself. Before a round of calls they may wait, for at most [`MAX_HELD_OUTCOMES`]
/// outcomes and [`MAX_HOLD_MILLIS`]: a quick saga's steps then cost one write at the end, not
/// one each (DTM updates branch rows asynchronously by default for the same reason). Should the
/// process die meanwhile, the next pass calls those branches again, which DTM's contract
/// (idempotent branches, the sub-transaction barrier) makes harmless. Anything else (a park,
/// the end of the pass) records them first.
fn hold_outcomes(plan: &Plan, held: usize, held_since: Millis, now: Millis) -> bool {
    match plan {
        Plan::Transition { .. } => true,
        Plan::Invoke(_) => held < MAX_HELD_OUTCOMES && now.saturating_sub(held_since) < MAX_HOLD_MILLIS,
        Plan::Park { .. } | Plan::Finished => false,
    }
}

/// Awaits a round of calls. Outcomes held back from earlier rounds are recorded once they have
/// waited [`MAX_HOLD_MILLIS`], while the calls go on: a slow call does not keep them unrecorded.
/// `None` when the sink vetoed that write (the calls are then dropped, as a veto before them
/// would have kept them from being made).
async fn call_recording_held<S: PassSink, T>(
    calls: impl Future<Output = T>,
    sink: &mut S,
    global: &GlobalTrans,
    unrecorded: &mut Vec<BranchUpdate>,
    held_since: Millis,
    clock: &(dyn Fn() -> Millis + Send + Sync),
) -> Result<Option<T>, S::Error> {
    if unrecorded.is_empty() {
        return Ok(Some(calls.await));
    }
    let held = u64::try_from(clock().saturating_sub(held_since)).unwrap_or(0);
    let wait = Duration::from_millis((MAX_HOLD_MILLIS as u64).saturating_sub(held));
    tokio::pin!(calls);
    tokio::select! {
        outcomes = &mut calls => return Ok(Some(outcomes)),
        () = tokio::time::sleep(wait) => {}
    }
    if !sink.branches_updated(global, unrecorded, clock()).await? {
        return Ok(None);
    }
    unrecorded.clear();
    Ok(Some(calls.await))
}

/// The branch call timeout of a transaction.
pub fn request_timeout(global: &GlobalTrans, default: Duration) -> Duration {
    match global.options.request_timeout {
        t if t > 0 => Duration::from_secs(t as u64),
        _ => default,
    }
}

/// A branch operation as a metric label: one of the fixed operations, or `other` (a workflow's
/// resume call carries the client-chosen workflow name, which must not become a series).
fn metric_op(operation: &str) -> &'static str {
    use crate::model::op;
    [
        op::ACTION,
        op::COMPENSATE,
        op::TRY,
        op::CONFIRM,
        op::CANCEL,
        op::COMMIT,
        op::ROLLBACK,
        op::MSG,
    ]
    .into_iter()
    .find(|known| *known == operation)
    .unwrap_or("other")
}

async fn invoke(context: &PassContext<'_>, global: &GlobalTrans, call: &Call, timeout: Duration) -> Outcome {
    let started = std::time::Instant::now();
    let span = tracing::debug_span!(
        "branch",
        otel.name = %format!("branch {}", metric_op(&call.op)),
        otel.kind = "client",
        gid = %global.gid,
        mode = %global.trans_type,
        branch = %call.branch_id,
        op = %call.op,
    );
    let traceparent = crate::telemetry::stored_traceparent(&global.ext_data);
    let outcome = context
        .invoker
        .call(BranchCall {
            url: &call.url,
            gid: &global.gid,
            trans_type: global.trans_type.as_str(),
            branch_id: &call.branch_id,
            op: &call.op,
            body: &call.body,
            force_post: global.trans_type == TransType::Xa && matches!(call.target, Target::Branch(_)),
            headers: &global.options.branch_headers,
            timeout,
            traceparent: traceparent.as_deref(),
        })
        .instrument(span)
        .await;
    let label = match &outcome {
        Outcome::Success => "success",
        Outcome::Failure(_) => "failure",
        Outcome::Ongoing(_) => "ongoing",
        Outcome::Error(_) => "error",
    };
    context.metrics.record_branch_call(
        BranchLabels {
            trans_type: global.trans_type.as_str(),
            op: metric_op(&call.op),
            outcome: label,
        },
        started.elapsed(),
    );
    if let Outcome::Error(text) | Outcome::Failure(text) = &outcome {
        let url = without_userinfo(&call.url);
        debug!(gid = %global.gid, %url, op = %call.op, error = %text, "branch did not succeed");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_of_operations_are_a_fixed_set() {
        assert_eq!(metric_op("compensate"), "compensate");
        assert_eq!(metric_op("msg"), "msg");
        assert_eq!(metric_op("my-workflow-name-4711"), "other");
    }

    #[test]
    fn outcomes_wait_only_for_a_transition_or_a_quick_round_of_calls() {
        let invoke = Plan::Invoke(Vec::new());
        let transition = Plan::Transition {
            to: TransStatus::Succeed,
            reason: None,
        };
        let park = Plan::Park {
            at: 5_000,
            interval: 10,
        };
        assert!(hold_outcomes(&invoke, 1, 1_000, 1_000));
        assert!(hold_outcomes(
            &invoke,
            MAX_HELD_OUTCOMES - 1,
            1_000,
            1_000 + MAX_HOLD_MILLIS - 1
        ));
        assert!(!hold_outcomes(&invoke, MAX_HELD_OUTCOMES, 1_000, 1_000), "too many");
        assert!(!hold_outcomes(&invoke, 1, 1_000, 1_000 + MAX_HOLD_MILLIS), "too old");
        assert!(
            hold_outcomes(&transition, 1_000, 0, 1_000_000),
            "recorded with the transition"
        );
        assert!(!hold_outcomes(&park, 1, 1_000, 1_000));
        assert!(!hold_outcomes(&Plan::Finished, 1, 1_000, 1_000));
    }
}
