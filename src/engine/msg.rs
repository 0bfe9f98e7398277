//! 2-phase message: back-check while prepared, then deliver to every branch.

use serde::Deserialize;

use super::{Call, Pass, Plan, Policy, Target, deadline, invoke_or_park, park_after_pass, park_until};
use crate::model::{Branch, BranchStatus, GlobalTrans, Millis, TransStatus, op};

/// Msg options carried in `custom_data`: `{"delay":10}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MsgCustom {
    /// Seconds after creation before the branches are called.
    #[serde(deserialize_with = "crate::engine::layout::null_default")]
    pub delay: i64,
}

impl MsgCustom {
    /// Parses `custom_data`; empty text means no delay.
    pub fn parse(custom_data: &str) -> Result<Self, String> {
        if custom_data.trim().is_empty() {
            return Ok(MsgCustom::default());
        }
        serde_json::from_str(custom_data).map_err(|e| format!("invalid msg custom_data: {e}"))
    }
}

pub(super) fn plan(global: &GlobalTrans, branches: &[Branch], pass: &Pass, now: Millis, policy: &Policy) -> Plan {
    match global.status {
        TransStatus::Prepared => {
            if let Some(d) = deadline(global, policy)
                && now < d
            {
                return park_until(global, d, policy);
            }
            if let Some((to, reason)) = &pass.verdict {
                return Plan::Transition {
                    to: *to,
                    reason: reason.clone(),
                };
            }
            if pass.attempted(Target::QueryPrepared) {
                return park_after_pass(global, pass, now, policy);
            }
            Plan::Invoke(vec![Call {
                target: Target::QueryPrepared,
                url: global.query_prepared.clone(),
                branch_id: "00".to_owned(),
                op: op::MSG.to_owned(),
                body: Vec::new(),
            }])
        }
        TransStatus::Submitted => {
            let delay = MsgCustom::parse(&global.custom_data).unwrap_or_default().delay;
            let due = crate::model::after_seconds(global.create_time, delay);
            if delay > 0 && now < due {
                return park_until(global, due, policy);
            }
            let pending: Vec<usize> = branches
                .iter()
                .enumerate()
                .filter(|(_, row)| row.op == op::ACTION && row.status != BranchStatus::Succeed)
                .map(|(index, _)| index)
                .collect();
            if pending.is_empty() {
                return Plan::Transition {
                    to: TransStatus::Succeed,
                    reason: None,
                };
            }
            // Sequential delivery stops at the first branch that did not succeed.
            let due = if global.options.concurrent {
                pending
            } else {
                vec![pending[0]]
            };
            invoke_or_park(global, branches, pass, now, policy, due)
        }
        // A msg is never rolled back branch by branch: an abort ends it.
        TransStatus::Aborting => Plan::Transition {
            to: TransStatus::Failed,
            reason: None,
        },
        TransStatus::Succeed | TransStatus::Failed => Plan::Finished,
    }
}
