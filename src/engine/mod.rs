//! Per-mode state machines. Pure: no I/O, time is a parameter.
//!
//! A driver runs one *pass* over a transaction it holds the lease of:
//!
//! 1. [`plan`] looks at the transaction, its branches and what happened so far in this pass
//!    ([`Pass`]) and returns the next [`Plan`]: call some branches, change the global status,
//!    or park the transaction until a given time.
//! 2. The driver performs the calls, then feeds each [`Outcome`] to [`absorb`], which updates
//!    the in-memory branches and returns the [`BranchUpdate`]s to persist.
//! 3. Repeat until the plan is [`Plan::Park`] or [`Plan::Finished`].

mod layout;
mod msg;
mod phase2;
mod saga;
mod workflow;

use std::collections::{HashMap, HashSet};

pub use layout::{
    MsgCustom, MsgTarget, SagaOrders, SagaStep, WorkflowCustom, msg_branches, null_default, saga_branches,
    tcc_branches, tcc_resource_branches, xa_branches,
};

pub use saga::compensation_pending;

use crate::model::{Branch, BranchStatus, GlobalTrans, Millis, TransStatus, TransType, op, without_userinfo};

/// What a branch call produced, as classified by the invoke layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The service did it.
    Success,
    /// The service refused for good (HTTP 409 or a FAILURE body); the text is the reply.
    Failure(String),
    /// The service is still working on it (HTTP 425 or an ONGOING body).
    Ongoing(String),
    /// Unknown outcome: transport error, timeout, 5xx or any other status. Never a failure.
    Error(String),
}

/// Server-wide defaults the engine needs. All durations in seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Base retry interval when the transaction sets none.
    pub retry_interval: i64,
    /// Cap of the exponential backoff.
    pub max_retry_interval: i64,
    /// Timeout of msg, tcc and xa transactions that set none (sagas have none by default).
    pub timeout_to_fail: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            retry_interval: 10,
            max_retry_interval: 300,
            timeout_to_fail: 35,
        }
    }
}

/// What a call is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The branch row at this index.
    Branch(usize),
    /// The msg back-check (`query_prepared`, branch `00`, op `msg`).
    QueryPrepared,
    /// The workflow resume callback (`query_prepared`, branch `00`, op = workflow name).
    WorkflowResume,
}

/// One call the driver must make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// What the outcome will be recorded against.
    pub target: Target,
    /// Endpoint; empty means immediate success.
    pub url: String,
    /// `branch_id` query parameter.
    pub branch_id: String,
    /// `op` query parameter.
    pub op: String,
    /// Body sent as-is.
    pub body: Vec<u8>,
}

/// The next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Make these calls (concurrently), then [`absorb`] every outcome.
    Invoke(Vec<Call>),
    /// Change the global status, conditional on it still being the current one.
    Transition {
        /// New status.
        to: TransStatus,
        /// Rollback reason to record, if any.
        reason: Option<String>,
    },
    /// Nothing more in this pass: release the lease and look again at `at`.
    Park {
        /// Next time the scheduler should look at the transaction.
        at: Millis,
        /// Retry interval (seconds) to persist.
        interval: i64,
    },
    /// Finished; nothing will ever happen again.
    Finished,
}

/// A branch status change to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchUpdate {
    /// Store id of the row.
    pub id: i64,
    /// Branch id (with `op`, the row's unique key inside the transaction).
    pub branch_id: String,
    /// Operation.
    pub op: String,
    /// New status.
    pub status: BranchStatus,
    /// When.
    pub at: Millis,
}

/// What happened so far in the current pass. Starts empty for every pass.
#[derive(Debug, Clone, Default)]
pub struct Pass {
    attempted: HashSet<Target>,
    retries: HashMap<usize, i64>,
    retry_exhausted: bool,
    saw_error: bool,
    saw_ongoing: bool,
    saw_success: bool,
    failure_reason: Option<String>,
    verdict: Option<(TransStatus, Option<String>)>,
    last_error: Option<(String, String)>,
}

impl Pass {
    /// True when a call made in this pass errored or failed in a retryable way.
    pub fn saw_error(&self) -> bool {
        self.saw_error
    }

    /// URL and message of the last retryable error seen in this pass (for the alert webhook).
    pub fn last_error(&self) -> Option<&(String, String)> {
        self.last_error.as_ref()
    }

    fn attempted(&self, target: Target) -> bool {
        self.attempted.contains(&target)
    }
}

/// Decides the next step for a transaction.
pub fn plan(global: &GlobalTrans, branches: &[Branch], pass: &Pass, now: Millis, policy: &Policy) -> Plan {
    if global.status.is_finished() {
        return Plan::Finished;
    }
    match global.trans_type {
        TransType::Saga => saga::plan(global, branches, pass, now, policy),
        TransType::Msg => msg::plan(global, branches, pass, now, policy),
        TransType::Tcc => phase2::plan(global, branches, pass, now, policy, phase2::TCC),
        TransType::Xa => phase2::plan(global, branches, pass, now, policy, phase2::XA),
        TransType::Workflow => workflow::plan(global, pass, now, policy),
    }
}

/// Records the outcome of a call made from a [`Plan::Invoke`].
///
/// Updates `branches` in memory and returns the change to persist, if the row changed.
pub fn absorb(
    global: &GlobalTrans,
    branches: &mut [Branch],
    pass: &mut Pass,
    call: &Call,
    outcome: &Outcome,
    now: Millis,
) -> Option<BranchUpdate> {
    pass.attempted.insert(call.target);
    match call.target {
        Target::QueryPrepared => {
            match outcome {
                Outcome::Success => pass.verdict = Some((TransStatus::Submitted, None)),
                Outcome::Failure(text) => {
                    pass.verdict = Some((
                        TransStatus::Failed,
                        Some(format!("query_prepared returned failure: {text}")),
                    ))
                }
                // DTM resets the interval on an ongoing back-check: not an error.
                Outcome::Ongoing(_) => {}
                Outcome::Error(text) => note_error(pass, &call.url, text),
            }
            None
        }
        Target::WorkflowResume => {
            if let Outcome::Error(text) | Outcome::Failure(text) | Outcome::Ongoing(text) = outcome {
                note_error(pass, &call.url, text);
            }
            None
        }
        Target::Branch(index) => {
            let row = branches.get_mut(index)?;
            // FAILURE is final for a saga action and for a try (the resource's TCC runs its own tries).
            let terminal_failure = (global.trans_type == TransType::Saga && row.op == op::ACTION) || row.op == op::TRY;
            let new_status = match outcome {
                Outcome::Success => {
                    pass.saw_success = true;
                    BranchStatus::Succeed
                }
                Outcome::Failure(text) if terminal_failure => {
                    pass.failure_reason = Some(without_userinfo(&format!(
                        "url:{} return failed: {} FAILURE",
                        row.url,
                        text.trim()
                    )));
                    BranchStatus::Failed
                }
                // FAILURE anywhere but a saga action must not stop the transaction: retry it.
                Outcome::Failure(text) | Outcome::Error(text) => {
                    note_error(pass, &row.url, text);
                    saga::allow_retry(global, pass, index);
                    return None;
                }
                Outcome::Ongoing(_) => {
                    pass.saw_ongoing = true;
                    saga::allow_retry(global, pass, index);
                    return None;
                }
            };
            row.status = new_status;
            row.update_time = now;
            match new_status {
                BranchStatus::Succeed => row.finish_time = Some(now),
                BranchStatus::Failed => row.rollback_time = Some(now),
                BranchStatus::Prepared => {}
            }
            Some(BranchUpdate {
                id: row.id,
                branch_id: row.branch_id.clone(),
                op: row.op.clone(),
                status: new_status,
                at: now,
            })
        }
    }
}

fn note_error(pass: &mut Pass, url: &str, text: &str) {
    pass.saw_error = true;
    pass.last_error = Some((without_userinfo(url), without_userinfo(text)));
}

/// Base retry interval of a transaction in seconds (DTM's rule, §10.3 of the protocol notes).
pub fn base_interval(global: &GlobalTrans, policy: &Policy) -> i64 {
    let options = &global.options;
    if options.retry_interval > 0 {
        options.retry_interval
    } else if options.timeout_to_fail > 0 && options.timeout_to_fail < policy.retry_interval {
        options.timeout_to_fail
    } else {
        policy.retry_interval.max(1)
    }
}

/// How many times the interval has doubled since the base (for the alert webhook).
pub fn retry_count(interval: i64, base: i64) -> u32 {
    let mut count = 0;
    let mut current = base.max(1);
    while current < interval {
        current *= 2;
        count += 1;
    }
    count
}

/// Park at the next retry time, following the pass's outcomes: backoff (doubling, capped) after
/// an error, the same interval after an ongoing reply, the base interval otherwise. A pass that
/// made progress (some branch succeeded) restarts the backoff from the base interval.
fn park_after_pass(global: &GlobalTrans, pass: &Pass, now: Millis, policy: &Policy) -> Plan {
    let base = base_interval(global, policy);
    let current = if global.next_cron_interval > 0 && !pass.saw_success {
        global.next_cron_interval
    } else {
        base
    };
    let interval = if pass.saw_error {
        let cap = policy.max_retry_interval.max(base);
        current.saturating_mul(2).min(cap)
    } else if pass.saw_ongoing {
        current
    } else {
        base
    };
    Plan::Park {
        at: crate::model::after_seconds(now, interval),
        interval,
    }
}

/// Park until a fixed instant (a timeout or a delay), keeping the interval.
fn park_until(global: &GlobalTrans, at: Millis, policy: &Policy) -> Plan {
    let interval = if global.next_cron_interval > 0 {
        global.next_cron_interval
    } else {
        base_interval(global, policy)
    };
    Plan::Park { at, interval }
}

/// The effective timeout of a transaction in seconds, 0 for none.
pub fn timeout_seconds(global: &GlobalTrans, policy: &Policy) -> i64 {
    match (global.options.timeout_to_fail, global.trans_type) {
        (t, _) if t > 0 => t,
        (_, TransType::Saga | TransType::Workflow) => 0,
        _ => policy.timeout_to_fail,
    }
}

/// Instant at which the transaction times out, if it can.
fn deadline(global: &GlobalTrans, policy: &Policy) -> Option<Millis> {
    match timeout_seconds(global, policy) {
        0 => None,
        t => Some(crate::model::after_seconds(global.create_time, t)),
    }
}

fn timeout_reason(global: &GlobalTrans, policy: &Policy) -> String {
    format!("Timeout after {} seconds", timeout_seconds(global, policy))
}

/// Calls the given rows that were not attempted yet in this pass, or parks when none is left.
fn invoke_or_park(
    global: &GlobalTrans,
    branches: &[Branch],
    pass: &Pass,
    now: Millis,
    policy: &Policy,
    rows: impl IntoIterator<Item = usize>,
) -> Plan {
    let calls: Vec<Call> = rows
        .into_iter()
        .filter(|&row| !pass.attempted(Target::Branch(row)))
        .map(|row| call_for(branches, row))
        .collect();
    if calls.is_empty() {
        park_after_pass(global, pass, now, policy)
    } else {
        Plan::Invoke(calls)
    }
}

fn call_for(branches: &[Branch], index: usize) -> Call {
    let row = &branches[index];
    Call {
        target: Target::Branch(index),
        url: row.url.clone(),
        branch_id: row.branch_id.clone(),
        op: row.op.clone(),
        body: row.bin_data.clone(),
    }
}

#[cfg(test)]
mod tests;
