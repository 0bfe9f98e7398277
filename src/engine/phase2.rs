//! TCC and XA: the client ran phase one; the server confirms/commits or cancels/rolls back.

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
        TransStatus::Prepared => {
            return match deadline(global, policy) {
                Some(d) if now >= d => Plan::Transition {
                    to: TransStatus::Aborting,
                    reason: Some(timeout_reason(global, policy)),
                },
                Some(d) => park_until(global, d, policy),
                None => park_after_pass(global, pass, now, policy),
            };
        }
        TransStatus::Submitted => (mode.commit_op, TransStatus::Succeed),
        TransStatus::Aborting => (mode.rollback_op, TransStatus::Failed),
        TransStatus::Succeed | TransStatus::Failed => return Plan::Finished,
    };
    let mut pending: Vec<usize> = branches
        .iter()
        .enumerate()
        .filter(|(_, row)| row.op == wanted_op && row.status != BranchStatus::Succeed)
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
