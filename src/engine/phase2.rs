//! TCC and XA: phase two, confirm/commit or cancel/rollback.
//!
//! Through the DTM API the client runs phase one (the tries) itself and only registers the
//! confirm and cancel rows. A `Tcc` resource has no client: its rows include `try`, and the
//! engine runs the tries in order while the transaction is prepared.

use super::{Pass, Plan, Policy, Target, call_for, deadline, park_after_pass, park_until, timeout_reason};
use crate::model::{Branch, BranchStatus, GlobalTrans, Millis, TransStatus, op};

/// The phase-two operations and call order of one mode.
pub(super) struct Phase2 {
    commit_op: &'static str,
    rollback_op: &'static str,
    last_to_first: bool,
}

/// TCC: confirm or cancel, last registered branch first.
pub(super) const TCC: Phase2 = Phase2 {
    commit_op: op::CONFIRM,
    rollback_op: op::CANCEL,
    last_to_first: true,
};

/// XA: commit or rollback, first registered branch first.
pub(super) const XA: Phase2 = Phase2 {
    commit_op: op::COMMIT,
    rollback_op: op::ROLLBACK,
    last_to_first: false,
};

pub(super) fn plan(
    global: &GlobalTrans,
    branches: &[Branch],
    pass: &Pass,
    now: Millis,
    policy: &Policy,
    mode: Phase2,
) -> Plan {
    let (wanted_op, done_status) = match global.status {
        TransStatus::Prepared => return plan_prepared(global, branches, pass, now, policy),
        TransStatus::Submitted => (mode.commit_op, TransStatus::Succeed),
        TransStatus::Aborting => (mode.rollback_op, TransStatus::Failed),
        TransStatus::Succeed | TransStatus::Failed => return Plan::Finished,
    };
    let tried = tried_branches(branches);
    let mut pending: Vec<usize> = branches
        .iter()
        .enumerate()
        .filter(|(_, row)| row.op == wanted_op && row.status != BranchStatus::Succeed)
        .filter(|(_, row)| tried.as_ref().is_none_or(|ids| ids.contains(&row.branch_id.as_str())))
        .map(|(index, _)| index)
        .collect();
    if mode.last_to_first {
        pending.reverse();
    }
    match pending.first() {
        None => Plan::Transition {
            to: done_status,
            reason: None,
        },
        // One at a time, and stop at the first branch that did not succeed in this pass.
        Some(&row) if pass.attempted(Target::Branch(row)) => park_after_pass(global, pass, now, policy),
        Some(&row) => Plan::Invoke(vec![call_for(branches, row)]),
    }
}

fn plan_prepared(global: &GlobalTrans, branches: &[Branch], pass: &Pass, now: Millis, policy: &Policy) -> Plan {
    let timed_out = deadline(global, policy).filter(|&d| now >= d);
    if timed_out.is_some() {
        return Plan::Transition {
            to: TransStatus::Aborting,
            reason: Some(timeout_reason(global, policy)),
        };
    }
    let tries: Vec<usize> = (0..branches.len()).filter(|&i| branches[i].op == op::TRY).collect();
    if tries.is_empty() {
        // DTM API: the client runs the tries and then submits or aborts; only the timeout is ours.
        return match deadline(global, policy) {
            Some(d) => park_until(global, d, policy),
            None => park_after_pass(global, pass, now, policy),
        };
    }
    if tries.iter().any(|&i| branches[i].status == BranchStatus::Failed) {
        let reason = pass.failure_reason.clone().unwrap_or_else(|| "a try failed".to_owned());
        return Plan::Transition {
            to: TransStatus::Aborting,
            reason: Some(reason),
        };
    }
    match tries.iter().find(|&&i| branches[i].status != BranchStatus::Succeed) {
        // Every try succeeded: the decision is to confirm.
        None => Plan::Transition {
            to: TransStatus::Submitted,
            reason: None,
        },
        Some(&row) if pass.attempted(Target::Branch(row)) => park_after_pass(global, pass, now, policy),
        Some(&row) => Plan::Invoke(vec![call_for(branches, row)]),
    }
}

/// With controller-run tries: the branches whose try may have run (every try up to and including
/// the first one that did not succeed; tries run in order). Only those are cancelled.
fn tried_branches(branches: &[Branch]) -> Option<Vec<&str>> {
    let mut tries = branches.iter().filter(|row| row.op == op::TRY).peekable();
    tries.peek()?;
    let mut ids = Vec::new();
    for row in tries {
        ids.push(row.branch_id.as_str());
        if row.status != BranchStatus::Succeed {
            break;
        }
    }
    Some(ids)
}
