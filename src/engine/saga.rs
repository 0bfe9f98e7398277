//! Saga: forward actions in order (or as a dependency DAG), compensations in reverse.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Pass, Plan, Policy, Target, deadline, invoke_or_park, park_after_pass, timeout_reason};
use crate::model::{Branch, BranchStatus, GlobalTrans, Millis, TransStatus, TransType, op};

/// Saga ordering carried in `custom_data`: `{"concurrent":true,"orders":{"1":[0]}}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SagaOrders {
    /// Run independent steps at once.
    #[serde(deserialize_with = "crate::engine::layout::null_default")]
    pub concurrent: bool,
    /// Step index (as text) to the steps it waits for (0-based).
    #[serde(deserialize_with = "crate::engine::layout::null_default")]
    pub orders: BTreeMap<String, Vec<usize>>,
}

impl SagaOrders {
    /// Parses `custom_data`; empty text means a sequential saga.
    pub fn parse(custom_data: &str) -> Result<Self, String> {
        if custom_data.trim().is_empty() {
            return Ok(SagaOrders::default());
        }
        serde_json::from_str(custom_data).map_err(|e| format!("invalid saga custom_data: {e}"))
    }

    /// Checks that every order names existing steps and that there is no cycle.
    pub fn validate(&self, steps: usize) -> Result<(), String> {
        let mut prereqs = self.prerequisites(steps)?;
        if !self.concurrent {
            // A sequential saga also waits for the previous step (see `Saga::ready`), so an order
            // pointing at a later step can never be met.
            for (step, before) in prereqs.iter_mut().enumerate().skip(1) {
                before.push(step - 1);
            }
        }
        // Kahn's algorithm: a DAG drains completely.
        let mut remaining: Vec<usize> = prereqs.iter().map(Vec::len).collect();
        let mut ready: Vec<usize> = (0..steps).filter(|&s| remaining[s] == 0).collect();
        let mut done = 0;
        while let Some(step) = ready.pop() {
            done += 1;
            for (other, pre) in prereqs.iter().enumerate() {
                for &p in pre {
                    if p == step {
                        remaining[other] -= 1;
                        if remaining[other] == 0 {
                            ready.push(other);
                        }
                    }
                }
            }
        }
        if done == steps {
            Ok(())
        } else {
            Err("saga orders contain a cycle".to_owned())
        }
    }

    fn prerequisites(&self, steps: usize) -> Result<Vec<Vec<usize>>, String> {
        let mut prereqs = vec![Vec::new(); steps];
        for (key, before) in &self.orders {
            let step: usize = key
                .parse()
                .map_err(|_| format!("saga orders: step key {key:?} is not a step index"))?;
            if step >= steps {
                return Err(format!("saga orders: step {step} does not exist ({steps} steps)"));
            }
            if !prereqs[step].is_empty() {
                return Err(format!("saga orders: step {step} is listed twice"));
            }
            for &p in before {
                if p >= steps {
                    return Err(format!(
                        "saga orders: step {step} waits for step {p}, which does not exist"
                    ));
                }
                if p == step {
                    return Err(format!("saga orders: step {step} waits for itself"));
                }
            }
            prereqs[step] = before.clone();
        }
        Ok(prereqs)
    }
}

/// Row indices of one saga step.
struct Step {
    compensate: usize,
    action: usize,
}

struct Saga<'a> {
    branches: &'a [Branch],
    steps: Vec<Step>,
    concurrent: bool,
    prereqs: Vec<Vec<usize>>,
}

impl<'a> Saga<'a> {
    fn new(global: &GlobalTrans, branches: &'a [Branch]) -> Self {
        let mut steps: Vec<Step> = Vec::new();
        let mut pending_compensate: Option<(usize, &str)> = None;
        for (index, row) in branches.iter().enumerate() {
            match row.op.as_str() {
                op::COMPENSATE => pending_compensate = Some((index, row.branch_id.as_str())),
                op::ACTION => {
                    if let Some((compensate, branch_id)) = pending_compensate.take()
                        && branch_id == row.branch_id
                    {
                        steps.push(Step {
                            compensate,
                            action: index,
                        });
                    }
                }
                _ => {}
            }
        }
        let orders = SagaOrders::parse(&global.custom_data).unwrap_or_default();
        let prereqs = orders
            .prerequisites(steps.len())
            .unwrap_or_else(|_| vec![Vec::new(); steps.len()]);
        Saga {
            branches,
            concurrent: orders.concurrent,
            steps,
            prereqs,
        }
    }

    fn action(&self, step: usize) -> BranchStatus {
        self.branches[self.steps[step].action].status
    }

    fn compensate(&self, step: usize) -> BranchStatus {
        self.branches[self.steps[step].compensate].status
    }

    /// All the steps a step waits for have succeeded.
    fn ready(&self, step: usize) -> bool {
        let previous_done = self.concurrent || step == 0 || self.action(step - 1) == BranchStatus::Succeed;
        previous_done
            && self.prereqs[step]
                .iter()
                .all(|&p| self.action(p) == BranchStatus::Succeed)
    }

    /// The action may have run: it answered, or it was eligible and its outcome is unknown.
    fn maybe_executed(&self, step: usize) -> bool {
        self.action(step) != BranchStatus::Prepared || self.ready(step)
    }

    fn needs_compensation(&self, step: usize) -> bool {
        self.compensate(step) != BranchStatus::Succeed && self.maybe_executed(step)
    }

    /// Steps that must be rolled back before this one: later steps, or dependants in a DAG.
    fn rolled_back_after(&self, step: usize) -> bool {
        (0..self.steps.len())
            .filter(|&other| {
                if self.concurrent {
                    self.prereqs[other].contains(&step)
                } else {
                    other > step
                }
            })
            .all(|other| !self.needs_compensation(other))
    }
}

pub(super) fn plan(global: &GlobalTrans, branches: &[Branch], pass: &Pass, now: Millis, policy: &Policy) -> Plan {
    let saga = Saga::new(global, branches);
    let count = saga.steps.len();
    match global.status {
        TransStatus::Submitted => {
            // A saga whose every action already succeeded is done, even past its deadline:
            // compensating finished work would undo a transaction that completed.
            if (0..count).all(|s| saga.action(s) == BranchStatus::Succeed) {
                return Plan::Transition {
                    to: TransStatus::Succeed,
                    reason: None,
                };
            }
            if deadline(global, policy).is_some_and(|d| now >= d) {
                return Plan::Transition {
                    to: TransStatus::Aborting,
                    reason: Some(timeout_reason(global, policy)),
                };
            }
            if (0..count).any(|s| saga.action(s) == BranchStatus::Failed) {
                let reason = pass
                    .failure_reason
                    .clone()
                    .unwrap_or_else(|| "fail message lost".to_owned());
                return Plan::Transition {
                    to: TransStatus::Aborting,
                    reason: Some(reason),
                };
            }
            if pass.retry_exhausted {
                return Plan::Transition {
                    to: TransStatus::Aborting,
                    reason: Some(format!(
                        "RetryCount is greater than RetryLimit, RetryLimit: {}",
                        global.options.retry_limit
                    )),
                };
            }
            if (0..count).all(|s| saga.action(s) == BranchStatus::Succeed) {
                return Plan::Transition {
                    to: TransStatus::Succeed,
                    reason: None,
                };
            }
            let due = (0..count)
                .filter(|&s| saga.action(s) == BranchStatus::Prepared && saga.ready(s))
                .map(|s| saga.steps[s].action);
            invoke_or_park(global, branches, pass, now, policy, due)
        }
        TransStatus::Aborting => {
            if (0..count).all(|s| !saga.needs_compensation(s)) {
                return Plan::Transition {
                    to: TransStatus::Failed,
                    reason: None,
                };
            }
            let due = (0..count)
                .filter(|&s| saga.needs_compensation(s) && saga.rolled_back_after(s))
                .map(|s| saga.steps[s].compensate);
            invoke_or_park(global, branches, pass, now, policy, due)
        }
        // A saga is created submitted; a prepared one only waits for its submit.
        TransStatus::Prepared => park_after_pass(global, pass, now, policy),
        TransStatus::Succeed | TransStatus::Failed => Plan::Finished,
    }
}

/// True when a saga has a step that may have run and is not compensated: a failed saga that
/// was force-stopped (or stopped by a limit) before its compensations ran.
pub fn compensation_pending(global: &GlobalTrans, branches: &[Branch]) -> bool {
    let saga = Saga::new(global, branches);
    global.trans_type == TransType::Saga && (0..saga.steps.len()).any(|s| saga.needs_compensation(s))
}

/// Saga `retry_limit`: an action that errored or is ongoing may be re-invoked at once in the same
/// pass, up to the limit; past it the saga rolls back.
pub(super) fn allow_retry(global: &GlobalTrans, pass: &mut Pass, row: usize) {
    let limit = global.options.retry_limit;
    if global.trans_type != TransType::Saga || global.status != TransStatus::Submitted || limit <= 0 {
        return;
    }
    let used = pass.retries.entry(row).or_insert(0);
    if *used < limit {
        *used += 1;
        pass.attempted.remove(&Target::Branch(row));
    } else {
        pass.retry_exhausted = true;
    }
}
