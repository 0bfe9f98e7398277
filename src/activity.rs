//! What this process saw of recent branch calls: attempts, the last outcome and error of every
//! branch operation. The store keeps only each row's status; the console shows this beside it
//! so that a person sees *why* a transaction is stuck. Held in memory, bounded, and lost on
//! restart (the console says so).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

use crate::engine::Outcome;
use crate::model::{Millis, without_userinfo};

/// Transactions remembered at most; the oldest is forgotten first.
pub const MAX_TRANSACTIONS: usize = 10_000;

/// Longest error text kept, in bytes.
pub const MAX_ERROR_BYTES: usize = 512;

/// What was seen of one branch operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpActivity {
    /// Branch id.
    pub branch_id: String,
    /// Operation.
    pub op: String,
    /// Calls made by this process.
    pub attempts: u64,
    /// `success`, `failure`, `ongoing` or `error`.
    pub last_outcome: &'static str,
    /// Text of the last non-success outcome (URL credentials removed, bounded).
    pub last_error: Option<String>,
    /// When the last call returned.
    pub last_call_time: Millis,
}

/// Recent branch-call activity, by transaction.
#[derive(Debug, Default)]
pub struct Activity {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_gid: HashMap<String, Vec<OpActivity>>,
    order: VecDeque<String>,
}

impl Activity {
    /// Records one call's outcome.
    pub fn record(&self, gid: &str, branch_id: &str, op: &str, outcome: &Outcome, now: Millis) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if !inner.by_gid.contains_key(gid) {
            if inner.order.len() >= MAX_TRANSACTIONS
                && let Some(oldest) = inner.order.pop_front()
            {
                inner.by_gid.remove(&oldest);
            }
            inner.order.push_back(gid.to_owned());
        }
        let ops = inner.by_gid.entry(gid.to_owned()).or_default();
        let index = match ops.iter().position(|o| o.branch_id == branch_id && o.op == op) {
            Some(index) => index,
            None => {
                ops.push(OpActivity {
                    branch_id: branch_id.to_owned(),
                    op: op.to_owned(),
                    attempts: 0,
                    last_outcome: "",
                    last_error: None,
                    last_call_time: now,
                });
                ops.len() - 1
            }
        };
        let entry = &mut ops[index];
        entry.attempts += 1;
        entry.last_call_time = now;
        let (label, text) = describe(outcome);
        entry.last_outcome = label;
        if let Some(text) = text {
            entry.last_error = Some(bounded(&without_userinfo(text)));
        }
    }

    /// What was seen of a transaction's operations, in first-call order.
    pub fn of(&self, gid: &str) -> Vec<OpActivity> {
        self.inner
            .lock()
            .ok()
            .and_then(|inner| inner.by_gid.get(gid).cloned())
            .unwrap_or_default()
    }
}

fn describe(outcome: &Outcome) -> (&'static str, Option<&str>) {
    match outcome {
        Outcome::Success => ("success", None),
        Outcome::Failure(text) => ("failure", Some(text)),
        Outcome::Ongoing(text) => ("ongoing", Some(text)),
        Outcome::Error(text) => ("error", Some(text)),
    }
}

fn bounded(text: &str) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_and_the_last_error_are_kept_per_operation() {
        let activity = Activity::default();
        activity.record("g", "01", "action", &Outcome::Error("http://u:p@h/x 503".into()), 1);
        activity.record("g", "01", "action", &Outcome::Success, 2);
        activity.record("g", "01", "compensate", &Outcome::Failure("no".into()), 3);
        let ops = activity.of("g");
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].attempts, ops[0].last_outcome), (2, "success"));
        assert_eq!(ops[0].last_error.as_deref(), Some("http://h/x 503"));
        assert_eq!(ops[1].last_error.as_deref(), Some("no"));
        assert!(activity.of("other").is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let activity = Activity::default();
        for i in 0..=MAX_TRANSACTIONS {
            activity.record(&format!("g{i}"), "01", "action", &Outcome::Success, 0);
        }
        assert!(activity.of("g0").is_empty());
        assert_eq!(activity.of(&format!("g{MAX_TRANSACTIONS}")).len(), 1);
        let long = "é".repeat(MAX_ERROR_BYTES);
        activity.record("x", "01", "action", &Outcome::Error(long), 0);
        assert!(
            activity.of("x")[0]
                .last_error
                .as_ref()
                .is_some_and(|e| e.len() <= MAX_ERROR_BYTES + 3)
        );
    }
}
