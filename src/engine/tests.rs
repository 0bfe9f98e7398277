//! Pure scenario tests of the engine.
//!
//! A small driver ([`Tx::run`]) performs one pass the way the scheduler does: plan, make the
//! calls with scripted outcomes, absorb them, apply transitions to the in-memory global, and stop
//! at `Park` or `Finished`. Outcomes are scripted per `(branch_id, op)`; an empty URL is an
//! immediate success without a call, as in the invoke layer.

use std::collections::{HashMap, VecDeque};

use base64::Engine as _;

use super::*;
use crate::model::BranchStatus::{Failed as F, Prepared as P, Succeed as S};
use crate::model::{
    Branch, BranchStatus, GlobalTrans, Millis, TransOptions, TransStatus, TransType, branch_id_for, op,
};

const GID: &str = "gid-engine";
const T0: Millis = 1_700_000_000_000;
const SEC: Millis = 1_000;
const QUERY_URL: &str = "http://busi/msg/query";
const RESUME_URL: &str = "http://busi/workflow/resume";

fn failure() -> Outcome {
    Outcome::Failure("{\"dtm_result\":\"FAILURE\"}".to_owned())
}

fn ongoing() -> Outcome {
    Outcome::Ongoing("{\"dtm_result\":\"ONGOING\"}".to_owned())
}

fn error() -> Outcome {
    Outcome::Error("connection refused".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

/// Scripted outcomes per `(branch_id, op)`: a queue consumed first, then a standing outcome,
/// then success.
#[derive(Default)]
struct Script {
    queued: HashMap<(String, String), VecDeque<Outcome>>,
    always: HashMap<(String, String), Outcome>,
}

impl Script {
    fn queue(&mut self, branch_id: &str, op: &str, outcomes: impl IntoIterator<Item = Outcome>) {
        self.queued
            .entry((branch_id.to_owned(), op.to_owned()))
            .or_default()
            .extend(outcomes);
    }

    fn always(&mut self, branch_id: &str, op: &str, outcome: Outcome) {
        self.always.insert((branch_id.to_owned(), op.to_owned()), outcome);
    }

    fn next(&mut self, call: &Call) -> Outcome {
        let key = (call.branch_id.clone(), call.op.clone());
        if let Some(outcome) = self.queued.get_mut(&key).and_then(VecDeque::pop_front) {
            return outcome;
        }
        self.always.get(&key).cloned().unwrap_or(Outcome::Success)
    }

    /// Queued outcomes nobody consumed (a scenario that scripted more than happened).
    fn unused(&self) -> usize {
        self.queued.values().map(VecDeque::len).sum()
    }
}

/// What one pass did.
#[derive(Debug)]
struct PassLog {
    invokes: Vec<Vec<Call>>,
    transitions: Vec<(TransStatus, Option<String>)>,
    updates: Vec<BranchUpdate>,
    /// Calls that reached a service (non-empty URL), as `op:branch_id`.
    reached: Vec<String>,
    end: Plan,
    pass: Pass,
}

impl PassLog {
    /// The invokes as `op:branch_id` labels, one inner list per `Plan::Invoke`.
    fn calls(&self) -> Vec<Vec<String>> {
        self.invokes
            .iter()
            .map(|batch| batch.iter().map(label).collect())
            .collect()
    }

    fn parked(&self) -> (Millis, i64) {
        match self.end {
            Plan::Park { at, interval } => (at, interval),
            ref other => panic!("expected Park, got {other:?}"),
        }
    }
}

/// The `Park` plan expected at `at` with `interval`.
fn park(at: Millis, interval: i64) -> Plan {
    Plan::Park { at, interval }
}

fn label(call: &Call) -> String {
    format!("{}:{}", call.op, call.branch_id)
}

/// A transaction held in memory, as the scheduler would hold it during a pass.
struct Tx {
    global: GlobalTrans,
    branches: Vec<Branch>,
    policy: Policy,
    script: Script,
}

impl Tx {
    fn new(trans_type: TransType, status: TransStatus, mut branches: Vec<Branch>) -> Self {
        for (index, row) in branches.iter_mut().enumerate() {
            row.id = 101 + index as i64;
        }
        Tx {
            global: new_global(trans_type, status),
            branches,
            policy: Policy::default(),
            script: Script::default(),
        }
    }

    fn statuses(&self) -> Vec<BranchStatus> {
        self.branches.iter().map(|row| row.status).collect()
    }

    /// Runs one pass at `now`, like the scheduler: plan, invoke, absorb, transition, park.
    fn run(&mut self, now: Millis) -> PassLog {
        let mut pass = Pass::default();
        let mut invokes = Vec::new();
        let mut transitions = Vec::new();
        let mut updates = Vec::new();
        let mut reached = Vec::new();
        for _ in 0..200 {
            match plan(&self.global, &self.branches, &pass, now, &self.policy) {
                Plan::Invoke(calls) => {
                    assert!(!calls.is_empty(), "an Invoke must carry at least one call");
                    let outcomes: Vec<Outcome> = calls
                        .iter()
                        .map(|call| {
                            if call.url.is_empty() {
                                Outcome::Success
                            } else {
                                reached.push(label(call));
                                self.script.next(call)
                            }
                        })
                        .collect();
                    for (call, outcome) in calls.iter().zip(&outcomes) {
                        if let Some(update) = absorb(&self.global, &mut self.branches, &mut pass, call, outcome, now) {
                            updates.push(update);
                        }
                    }
                    invokes.push(calls);
                }
                Plan::Transition { to, reason } => {
                    assert_ne!(to, self.global.status, "a transition must change the status");
                    self.global.status = to;
                    if let Some(text) = &reason {
                        self.global.rollback_reason = text.clone();
                    }
                    self.global.update_time = now;
                    match to {
                        TransStatus::Succeed => self.global.finish_time = Some(now),
                        TransStatus::Failed => self.global.rollback_time = Some(now),
                        _ => {}
                    }
                    transitions.push((to, reason));
                }
                end @ (Plan::Park { .. } | Plan::Finished) => {
                    if let Plan::Park { at, interval } = end {
                        assert!(at >= now, "parked in the past: {at} < {now}");
                        assert!(interval > 0, "non-positive interval {interval}");
                        self.global.next_cron_time = at;
                        self.global.next_cron_interval = interval;
                    }
                    return PassLog {
                        invokes,
                        transitions,
                        updates,
                        reached,
                        end,
                        pass,
                    };
                }
            }
        }
        panic!("the pass did not settle after 200 plans");
    }
}

fn new_global(trans_type: TransType, status: TransStatus) -> GlobalTrans {
    GlobalTrans {
        id: 1,
        gid: GID.to_owned(),
        trans_type,
        status,
        query_prepared: String::new(),
        protocol: "http".to_owned(),
        custom_data: String::new(),
        options: TransOptions::default(),
        create_time: T0,
        update_time: T0,
        finish_time: None,
        rollback_time: None,
        next_cron_time: T0 + 10 * SEC,
        next_cron_interval: 10,
        owner: String::new(),
        result: String::new(),
        rollback_reason: String::new(),
        ext_data: String::new(),
    }
}

fn action_url(step: usize) -> String {
    format!("http://busi/saga/action{step}")
}

fn compensate_url(step: usize) -> String {
    format!("http://busi/saga/compensate{step}")
}

/// A submitted saga of `steps` steps (1-based URLs `action1`, `compensate1`, ...).
fn saga(steps: usize) -> Tx {
    let parts: Vec<(String, String, Vec<u8>)> = (1..=steps)
        .map(|i| {
            (
                action_url(i),
                compensate_url(i),
                format!("{{\"step\":{i}}}").into_bytes(),
            )
        })
        .collect();
    let specs: Vec<SagaStep<'_>> = parts
        .iter()
        .map(|(action, compensate, payload)| SagaStep {
            action,
            compensate,
            payload,
        })
        .collect();
    Tx::new(TransType::Saga, TransStatus::Submitted, saga_branches(GID, &specs, T0))
}

fn concurrent_saga(steps: usize, custom_data: &str) -> Tx {
    let mut tx = saga(steps);
    tx.global.custom_data = custom_data.to_owned();
    tx
}

fn msg_url(step: usize) -> String {
    format!("http://busi/msg/step{step}")
}

/// A msg with `steps` plain URL steps.
fn msg(status: TransStatus, steps: usize) -> Tx {
    let urls: Vec<String> = (1..=steps).map(msg_url).collect();
    let targets: Vec<MsgTarget<'_>> = urls
        .iter()
        .map(|url| MsgTarget::Url {
            url,
            payload: b"{\"amount\":30}",
        })
        .collect();
    let mut tx = Tx::new(TransType::Msg, status, msg_branches(GID, &targets, T0));
    tx.global.query_prepared = QUERY_URL.to_owned();
    tx
}

/// A TCC with `count` registered branches "01", "02", ...
fn tcc(status: TransStatus, count: usize) -> Tx {
    let rows = (0..count)
        .flat_map(|i| {
            let branch_id = branch_id_for(i);
            tcc_branches(
                GID,
                &branch_id,
                &format!("http://busi/tcc/confirm{}", i + 1),
                &format!("http://busi/tcc/cancel{}", i + 1),
                b"{\"amount\":30}",
                T0,
            )
        })
        .collect();
    Tx::new(TransType::Tcc, status, rows)
}

/// An XA with `count` registered branches "01", "02", ...
fn xa(status: TransStatus, count: usize) -> Tx {
    let rows = (0..count)
        .flat_map(|i| xa_branches(GID, &branch_id_for(i), "http://busi/xa/phase2", b"{\"amount\":30}", T0))
        .collect();
    Tx::new(TransType::Xa, status, rows)
}

fn workflow(status: TransStatus, name: &str, input: &[u8]) -> Tx {
    let mut tx = Tx::new(TransType::Workflow, status, Vec::new());
    tx.global.query_prepared = RESUME_URL.to_owned();
    tx.global.custom_data = format!(
        "{{\"name\":\"{name}\",\"data\":\"{}\"}}",
        base64::engine::general_purpose::STANDARD.encode(input)
    );
    tx
}

fn saga_failure_reason(step: usize) -> String {
    format!(
        "url:{} return failed: {{\"dtm_result\":\"FAILURE\"}} FAILURE",
        action_url(step)
    )
}

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

fn shape(rows: &[Branch]) -> Vec<(String, String, String, Vec<u8>)> {
    rows.iter()
        .map(|r| (r.branch_id.clone(), r.op.clone(), r.url.clone(), r.bin_data.clone()))
        .collect()
}

fn row(branch_id: &str, op: &str, url: &str, data: &[u8]) -> (String, String, String, Vec<u8>) {
    (branch_id.to_owned(), op.to_owned(), url.to_owned(), data.to_vec())
}

fn assert_fresh(rows: &[Branch], now: Millis) {
    for r in rows {
        assert_eq!(r.gid, "g");
        assert_eq!(r.id, 0);
        assert_eq!(r.status, P);
        assert_eq!(r.create_time, now);
        assert_eq!(r.update_time, now);
        assert_eq!(r.finish_time, None);
        assert_eq!(r.rollback_time, None);
    }
}

#[test]
fn layout_saga_compensate_then_action_per_step() {
    let steps = [
        SagaStep {
            action: "http://a1",
            compensate: "http://c1",
            payload: b"p1",
        },
        SagaStep {
            action: "http://a2",
            compensate: "",
            payload: b"",
        },
    ];
    let rows = saga_branches("g", &steps, 5);
    assert_eq!(
        shape(&rows),
        vec![
            row("01", "compensate", "http://c1", b"p1"),
            row("01", "action", "http://a1", b"p1"),
            row("02", "compensate", "", b""),
            row("02", "action", "http://a2", b""),
        ]
    );
    assert_fresh(&rows, 5);
    assert!(saga_branches("g", &[], 5).is_empty());
}

#[test]
fn layout_msg_topics_and_urls() {
    let targets = [
        MsgTarget::Topic {
            subscribers: vec!["http://s1".to_owned(), "http://s2".to_owned()],
            payload: b"t",
        },
        MsgTarget::Url {
            url: "http://u",
            payload: b"u",
        },
        MsgTarget::Topic {
            subscribers: vec!["http://only".to_owned()],
            payload: b"o",
        },
    ];
    let rows = msg_branches("g", &targets, 9);
    assert_eq!(
        shape(&rows),
        vec![
            row("01-01", "action", "http://s1", b"t"),
            row("01-02", "action", "http://s2", b"t"),
            row("02", "action", "http://u", b"u"),
            row("03", "action", "http://only", b"o"),
        ]
    );
    assert_fresh(&rows, 9);
}

#[test]
fn layout_tcc_cancel_then_confirm() {
    let rows = tcc_branches("g", "07", "http://confirm", "http://cancel", b"d", 3);
    assert_eq!(
        shape(&rows),
        vec![
            row("07", "cancel", "http://cancel", b"d"),
            row("07", "confirm", "http://confirm", b"d"),
        ]
    );
    assert_fresh(&rows, 3);
}

#[test]
fn layout_xa_rollback_then_commit_same_url() {
    let rows = xa_branches("g", "01", "http://rm/phase2", b"d", 4);
    assert_eq!(
        shape(&rows),
        vec![
            row("01", "rollback", "http://rm/phase2", b"d"),
            row("01", "commit", "http://rm/phase2", b"d"),
        ]
    );
    assert_fresh(&rows, 4);
}

// ---------------------------------------------------------------------------------------------
// Saga, sequential
// ---------------------------------------------------------------------------------------------

#[test]
fn saga_normal_succeeds() {
    let mut tx = saga(2);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"], vec!["action:02"]]);
    assert_eq!(log.transitions, vec![(TransStatus::Succeed, None)]);
    assert_eq!(log.end, Plan::Finished);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
    assert_eq!(tx.global.rollback_reason, "");

    // The call carries the row's identity and payload.
    assert_eq!(
        log.invokes[0][0],
        Call {
            target: Target::Branch(1),
            url: action_url(1),
            branch_id: "01".to_owned(),
            op: op::ACTION.to_owned(),
            body: b"{\"step\":1}".to_vec(),
        }
    );
    assert_eq!(log.invokes[1][0].target, Target::Branch(3));
    assert_eq!(log.invokes[1][0].body, b"{\"step\":2}".to_vec());

    // One update per changed row, with the store id.
    assert_eq!(
        log.updates,
        vec![
            BranchUpdate {
                id: 102,
                branch_id: "01".to_owned(),
                op: "action".to_owned(),
                status: S,
                at: T0,
            },
            BranchUpdate {
                id: 104,
                branch_id: "02".to_owned(),
                op: "action".to_owned(),
                status: S,
                at: T0,
            },
        ]
    );
    assert_eq!(tx.branches[1].finish_time, Some(T0));
    assert_eq!(tx.branches[1].update_time, T0);
    assert_eq!(tx.branches[0].finish_time, None);

    // A finished saga never does anything again.
    let again = tx.run(T0 + SEC);
    assert!(again.invokes.is_empty());
    assert_eq!(again.end, Plan::Finished);
}

#[test]
fn saga_sequential_one_action_per_invoke_in_order() {
    let mut tx = saga(4);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![
            vec!["action:01"],
            vec!["action:02"],
            vec!["action:03"],
            vec!["action:04"]
        ]
    );
    assert_eq!(tx.statuses(), vec![P, S, P, S, P, S, P, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn saga_without_steps_succeeds_at_once() {
    let mut tx = saga(0);
    let log = tx.run(T0);
    assert!(log.invokes.is_empty());
    assert_eq!(log.transitions, vec![(TransStatus::Succeed, None)]);
}

#[test]
fn saga_action_failure_rolls_back_in_reverse() {
    let mut tx = saga(2);
    tx.script.queue("02", op::ACTION, [failure()]);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![
            vec!["action:01"],
            vec!["action:02"],
            vec!["compensate:02"],
            vec!["compensate:01"]
        ]
    );
    let reason = saga_failure_reason(2);
    assert_eq!(
        reason,
        "url:http://busi/saga/action2 return failed: {\"dtm_result\":\"FAILURE\"} FAILURE"
    );
    assert_eq!(
        log.transitions,
        vec![
            (TransStatus::Aborting, Some(reason.clone())),
            (TransStatus::Failed, None)
        ]
    );
    assert_eq!(log.end, Plan::Finished);
    assert_eq!(tx.statuses(), vec![S, S, S, F]);
    assert_eq!(tx.global.status, TransStatus::Failed);
    assert_eq!(tx.global.rollback_reason, reason);
    assert!(tx.global.rollback_reason.contains(&action_url(2)));
    assert!(tx.global.rollback_reason.contains("FAILURE"));
    assert_eq!(tx.branches[3].rollback_time, Some(T0));
    assert_eq!(tx.branches[3].finish_time, None);
    assert_eq!(tx.script.unused(), 0);
}

#[test]
fn saga_three_steps_compensate_last_to_first() {
    let mut tx = saga(3);
    tx.script.queue("03", op::ACTION, [failure()]);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![
            vec!["action:01"],
            vec!["action:02"],
            vec!["action:03"],
            vec!["compensate:03"],
            vec!["compensate:02"],
            vec!["compensate:01"],
        ]
    );
    assert_eq!(tx.statuses(), vec![S, S, S, S, S, F]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn saga_first_action_failure_compensates_only_it() {
    let mut tx = saga(2);
    tx.script.queue("01", op::ACTION, [failure()]);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"], vec!["compensate:01"]]);
    assert_eq!(tx.statuses(), vec![S, F, P, P]);
    assert_eq!(tx.global.status, TransStatus::Failed);
    assert_eq!(tx.global.rollback_reason, saga_failure_reason(1));
}

#[test]
fn saga_ongoing_action_keeps_interval_then_succeeds() {
    let mut tx = saga(2);
    tx.global.next_cron_interval = 40; // grown by earlier errors: ONGOING keeps it
    tx.script.queue("01", op::ACTION, [ongoing()]);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"]]);
    assert!(log.transitions.is_empty());
    assert_eq!(log.end, park(T0 + 40 * SEC, 40));
    assert!(log.updates.is_empty());
    assert!(!log.pass.saw_error());
    assert_eq!(tx.statuses(), vec![P, P, P, P]);
    assert_eq!(tx.global.status, TransStatus::Submitted);
    assert_eq!(tx.global.next_cron_time, T0 + 40 * SEC);

    let later = tx.run(T0 + 40 * SEC);
    assert_eq!(later.calls(), vec![vec!["action:01"], vec!["action:02"]]);
    assert_eq!(later.transitions, vec![(TransStatus::Succeed, None)]);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
}

#[test]
fn saga_ongoing_with_default_interval_parks_at_base() {
    let mut tx = saga(1);
    tx.script.queue("01", op::ACTION, [ongoing()]);
    assert_eq!(tx.run(T0).end, park(T0 + 10 * SEC, 10));
}

#[test]
fn saga_error_backs_off_doubling_up_to_cap() {
    let mut tx = saga(2);
    tx.script.always("01", op::ACTION, error());
    let mut now = T0;
    let mut intervals = Vec::new();
    for _ in 0..7 {
        let log = tx.run(now);
        assert_eq!(log.calls(), vec![vec!["action:01"]]);
        assert!(log.transitions.is_empty());
        assert!(log.pass.saw_error());
        assert_eq!(
            log.pass.last_error(),
            Some(&(action_url(1), "connection refused".to_owned()))
        );
        let (at, interval) = log.parked();
        assert_eq!(at, now + interval * SEC);
        intervals.push(interval);
        now = at;
    }
    assert_eq!(intervals, vec![20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(tx.statuses(), vec![P, P, P, P]);
    assert_eq!(tx.global.status, TransStatus::Submitted);

    // Recovery: the branch answers again and the saga completes.
    tx.script = Script::default();
    let log = tx.run(now);
    assert_eq!(log.transitions, vec![(TransStatus::Succeed, None)]);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
}

#[test]
fn saga_custom_retry_interval_backs_off_from_it() {
    // DTM's SagaOptionsRetryError: retry_interval 150, error, the retry at +300 s succeeds.
    let mut tx = saga(2);
    tx.global.options.retry_interval = 150;
    tx.global.next_cron_interval = 150;
    tx.script.queue("02", op::ACTION, [error()]);
    let log = tx.run(T0);
    assert_eq!(log.end, park(T0 + 300 * SEC, 300));
    assert_eq!(tx.statuses(), vec![P, S, P, P]);

    let later = tx.run(T0 + 360 * SEC);
    assert_eq!(later.calls(), vec![vec!["action:02"]]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
}

#[test]
fn saga_compensation_error_stays_aborting_then_fails_next_pass() {
    let mut tx = saga(2);
    tx.script.queue("02", op::ACTION, [failure()]);
    tx.script.queue("02", op::COMPENSATE, [error()]);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![vec!["action:01"], vec!["action:02"], vec!["compensate:02"]]
    );
    assert_eq!(
        log.transitions,
        vec![(TransStatus::Aborting, Some(saga_failure_reason(2)))]
    );
    assert_eq!(log.end, park(T0 + 20 * SEC, 20));
    assert_eq!(tx.statuses(), vec![P, S, P, F]);
    assert_eq!(tx.global.status, TransStatus::Aborting);

    let later = tx.run(T0 + 20 * SEC);
    assert_eq!(later.calls(), vec![vec!["compensate:02"], vec!["compensate:01"]]);
    assert_eq!(later.transitions, vec![(TransStatus::Failed, None)]);
    assert_eq!(tx.statuses(), vec![S, S, S, F]);
    assert_eq!(tx.global.status, TransStatus::Failed);
    // The reason recorded by the first pass survives.
    assert_eq!(tx.global.rollback_reason, saga_failure_reason(2));
}

#[test]
fn saga_compensation_failure_is_retried_not_terminal() {
    let mut tx = saga(2);
    tx.script.queue("02", op::ACTION, [failure()]);
    tx.script.queue("02", op::COMPENSATE, [failure(), failure()]);
    let first = tx.run(T0);
    assert_eq!(first.end, park(T0 + 20 * SEC, 20));
    assert_eq!(tx.statuses(), vec![P, S, P, F]);
    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.calls(), vec![vec!["compensate:02"]]);
    assert_eq!(second.end, park(T0 + 60 * SEC, 40));
    assert_eq!(tx.global.status, TransStatus::Aborting);
    let third = tx.run(T0 + 60 * SEC);
    assert_eq!(third.calls(), vec![vec!["compensate:02"], vec!["compensate:01"]]);
    assert_eq!(tx.global.status, TransStatus::Failed);
    assert_eq!(tx.statuses(), vec![S, S, S, F]);
}

#[test]
fn saga_compensation_ongoing_keeps_interval() {
    let mut tx = saga(2);
    tx.script.queue("02", op::ACTION, [failure()]);
    tx.script.queue("02", op::COMPENSATE, [ongoing()]);
    let log = tx.run(T0);
    assert_eq!(log.end, park(T0 + 10 * SEC, 10));
    assert_eq!(tx.global.status, TransStatus::Aborting);
    assert_eq!(tx.statuses(), vec![P, S, P, F]);
}

#[test]
fn saga_empty_url_counts_as_success() {
    let parts = [("", "", b"".as_slice()), ("http://a2", "http://c2", b"x".as_slice())];
    let specs: Vec<SagaStep<'_>> = parts
        .iter()
        .map(|&(action, compensate, payload)| SagaStep {
            action,
            compensate,
            payload,
        })
        .collect();
    let mut tx = Tx::new(TransType::Saga, TransStatus::Submitted, saga_branches(GID, &specs, T0));
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"], vec!["action:02"]]);
    assert_eq!(log.reached, vec!["action:02"]);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);

    // Rolling back: the empty compensation is a success too.
    let mut tx = Tx::new(TransType::Saga, TransStatus::Submitted, saga_branches(GID, &specs, T0));
    tx.script.queue("02", op::ACTION, [failure()]);
    let log = tx.run(T0);
    assert_eq!(log.reached, vec!["action:02", "compensate:02"]);
    assert_eq!(tx.statuses(), vec![S, S, S, F]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn saga_timeout_after_ongoing_compensates_the_started_step() {
    let mut tx = saga(2);
    tx.global.options.timeout_to_fail = 1800;
    tx.script.always("01", op::ACTION, ongoing());
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["action:01"]]);
    assert_eq!(first.end, park(T0 + 10 * SEC, 10));

    // Just before the deadline the action is retried; at it the saga aborts.
    let before = tx.run(T0 + 1800 * SEC - 1);
    assert_eq!(before.calls(), vec![vec!["action:01"]]);
    assert_eq!(tx.global.status, TransStatus::Submitted);

    let log = tx.run(T0 + 3600 * SEC);
    assert_eq!(
        log.transitions,
        vec![
            (TransStatus::Aborting, Some("Timeout after 1800 seconds".to_owned())),
            (TransStatus::Failed, None)
        ]
    );
    assert_eq!(log.calls(), vec![vec!["compensate:01"]]);
    assert_eq!(tx.statuses(), vec![S, P, P, P]);
    assert_eq!(tx.global.status, TransStatus::Failed);
    assert_eq!(tx.global.rollback_reason, "Timeout after 1800 seconds");
}

#[test]
fn saga_timeout_is_inclusive_and_stays_aborting_while_compensation_errors() {
    let mut tx = saga(2);
    tx.global.options.timeout_to_fail = 60;
    tx.script.queue("01", op::COMPENSATE, [error()]);
    let log = tx.run(T0 + 60 * SEC);
    assert!(!log.calls().iter().flatten().any(|c| c.starts_with("action")));
    assert_eq!(
        log.transitions,
        vec![(TransStatus::Aborting, Some("Timeout after 60 seconds".to_owned()))]
    );
    assert_eq!(log.calls(), vec![vec!["compensate:01"]]);
    assert_eq!(tx.global.status, TransStatus::Aborting);
    assert_eq!(tx.statuses(), vec![P, P, P, P]);
    // base_interval: timeout_to_fail (60) is not below the server's 10 s: base 10, doubled.
    assert_eq!(log.end, park(T0 + 80 * SEC, 20));
}

#[test]
fn saga_without_timeout_never_times_out() {
    // The policy's default timeout applies to msg, tcc and xa only.
    let mut tx = saga(1);
    tx.script.queue("01", op::ACTION, [ongoing()]);
    let log = tx.run(T0 + 10 * 24 * 3600 * SEC);
    assert!(log.transitions.is_empty());
    assert_eq!(tx.global.status, TransStatus::Submitted);
    assert_eq!(timeout_seconds(&tx.global, &tx.policy), 0);
}

#[test]
fn saga_retry_limit_retries_errors_within_the_pass() {
    let mut tx = saga(2);
    tx.global.options.retry_limit = 3;
    tx.script.queue("02", op::ACTION, [error(), error(), error()]);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![
            vec!["action:01"],
            vec!["action:02"],
            vec!["action:02"],
            vec!["action:02"],
            vec!["action:02"]
        ]
    );
    assert_eq!(log.transitions, vec![(TransStatus::Succeed, None)]);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
    assert_eq!(tx.script.unused(), 0);
}

#[test]
fn saga_retry_limit_retries_ongoing_within_the_pass() {
    let mut tx = saga(1);
    tx.global.options.retry_limit = 2;
    tx.script.queue("01", op::ACTION, [ongoing(), ongoing()]);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"]; 3]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn saga_retry_limit_exhausted_rolls_back() {
    let mut tx = saga(2);
    tx.global.options.retry_limit = 1;
    tx.script.always("02", op::ACTION, error());
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![
            vec!["action:01"],
            vec!["action:02"],
            vec!["action:02"],
            vec!["compensate:02"],
            vec!["compensate:01"]
        ]
    );
    assert_eq!(
        log.transitions,
        vec![
            (
                TransStatus::Aborting,
                Some("RetryCount is greater than RetryLimit, RetryLimit: 1".to_owned())
            ),
            (TransStatus::Failed, None)
        ]
    );
    assert_eq!(tx.statuses(), vec![S, S, S, P]);
    assert_eq!(tx.global.status, TransStatus::Failed);
    assert_eq!(
        tx.global.rollback_reason,
        "RetryCount is greater than RetryLimit, RetryLimit: 1"
    );
}

#[test]
fn saga_retry_limit_does_not_repeat_compensations() {
    let mut tx = saga(2);
    tx.global.options.retry_limit = 5;
    tx.script.queue("02", op::ACTION, [failure()]);
    tx.script.always("02", op::COMPENSATE, error());
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![vec!["action:01"], vec!["action:02"], vec!["compensate:02"]]
    );
    assert_eq!(tx.global.status, TransStatus::Aborting);
}

#[test]
fn saga_failed_action_from_an_earlier_pass_rolls_back_with_lost_reason() {
    let mut tx = saga(2);
    tx.branches[1].status = S;
    tx.branches[3].status = F;
    let log = tx.run(T0);
    assert_eq!(
        log.transitions,
        vec![
            (TransStatus::Aborting, Some("fail message lost".to_owned())),
            (TransStatus::Failed, None)
        ]
    );
    assert_eq!(log.calls(), vec![vec!["compensate:02"], vec!["compensate:01"]]);
}

#[test]
fn saga_prepared_only_waits() {
    let mut tx = saga(2);
    tx.global.status = TransStatus::Prepared;
    let log = tx.run(T0);
    assert!(log.invokes.is_empty());
    assert_eq!(log.end, park(T0 + 10 * SEC, 10));
}

#[test]
fn saga_resumed_aborting_pass_skips_done_compensations() {
    // A crash after c02 succeeded: the next pass only compensates step 1.
    let mut tx = saga(2);
    tx.global.status = TransStatus::Aborting;
    tx.branches[1].status = S;
    tx.branches[3].status = F;
    tx.branches[2].status = S;
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["compensate:01"]]);
    assert_eq!(tx.statuses(), vec![S, S, S, F]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

// ---------------------------------------------------------------------------------------------
// Saga, concurrent
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_saga_respects_orders() {
    let mut tx = concurrent_saga(2, r#"{"concurrent":true,"orders":{"1":[0]}}"#);
    tx.script.queue("01", op::ACTION, [ongoing()]);
    let first = tx.run(T0);
    // Step 1 waits for step 0, which is still ongoing.
    assert_eq!(first.calls(), vec![vec!["action:01"]]);
    assert_eq!(tx.statuses(), vec![P, P, P, P]);
    assert_eq!(first.end, park(T0 + 10 * SEC, 10));

    let second = tx.run(T0 + 10 * SEC);
    assert_eq!(second.calls(), vec![vec!["action:01"], vec!["action:02"]]);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn concurrent_saga_without_orders_runs_all_at_once() {
    let mut tx = concurrent_saga(3, r#"{"concurrent":true}"#);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01", "action:02", "action:03"]]);
    assert_eq!(tx.statuses(), vec![P, S, P, S, P, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn concurrent_saga_null_orders_is_parallel() {
    let mut tx = concurrent_saga(2, r#"{"concurrent":true,"orders":null}"#);
    assert_eq!(tx.run(T0).calls(), vec![vec!["action:01", "action:02"]]);
}

#[test]
fn concurrent_saga_fan_out_dag() {
    let mut tx = concurrent_saga(3, r#"{"concurrent":true,"orders":{"1":[0],"2":[0]}}"#);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"], vec!["action:02", "action:03"]]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn concurrent_saga_backward_order_runs_later_step_first() {
    let mut tx = concurrent_saga(2, r#"{"concurrent":true,"orders":{"0":[1]}}"#);
    tx.script.queue("01", op::ACTION, [failure()]);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![
            vec!["action:02"],
            vec!["action:01"],
            vec!["compensate:01"],
            vec!["compensate:02"]
        ]
    );
    assert_eq!(tx.statuses(), vec![S, F, S, S]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn concurrent_saga_rollback_order_when_first_fails() {
    // DTM's SagaConRollbackOrder: step 1 after step 0, a01 fails.
    let mut tx = concurrent_saga(2, r#"{"concurrent":true,"orders":{"1":[0]}}"#);
    tx.script.queue("01", op::ACTION, [failure()]);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"], vec!["compensate:01"]]);
    assert_eq!(tx.statuses(), vec![S, F, P, P]);
    assert_eq!(tx.global.status, TransStatus::Failed);
    assert_eq!(tx.global.rollback_reason, saga_failure_reason(1));
}

#[test]
fn concurrent_saga_compensation_follows_reverse_dag() {
    // DTM's SagaConRollbackOrder2: step 1 after step 0, a02 fails.
    let mut tx = concurrent_saga(2, r#"{"concurrent":true,"orders":{"1":[0]}}"#);
    tx.script.queue("02", op::ACTION, [failure()]);
    tx.script.queue("02", op::COMPENSATE, [error()]);
    let first = tx.run(T0);
    assert_eq!(
        first.calls(),
        vec![vec!["action:01"], vec!["action:02"], vec!["compensate:02"]]
    );
    // compensate01 must wait for its dependant's compensation.
    assert_eq!(tx.statuses(), vec![P, S, P, F]);
    assert_eq!(tx.global.status, TransStatus::Aborting);

    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.calls(), vec![vec!["compensate:02"], vec!["compensate:01"]]);
    assert_eq!(tx.statuses(), vec![S, S, S, F]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn concurrent_saga_fan_out_compensates_leaves_together_then_root() {
    let mut tx = concurrent_saga(3, r#"{"concurrent":true,"orders":{"1":[0],"2":[0]}}"#);
    tx.script.queue("03", op::ACTION, [failure()]);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![
            vec!["action:01"],
            vec!["action:02", "action:03"],
            vec!["compensate:02", "compensate:03"],
            vec!["compensate:01"],
        ]
    );
    assert_eq!(tx.statuses(), vec![S, S, S, S, S, F]);
}

#[test]
fn concurrent_saga_failure_compensates_unknown_parallel_steps() {
    let mut tx = concurrent_saga(2, r#"{"concurrent":true}"#);
    tx.script.queue("01", op::ACTION, [failure()]);
    tx.script.queue("02", op::ACTION, [error()]);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![vec!["action:01", "action:02"], vec!["compensate:01", "compensate:02"]]
    );
    // a02's outcome is unknown: it stays prepared but is compensated.
    assert_eq!(tx.statuses(), vec![S, F, S, P]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn concurrent_saga_committed_ongoing() {
    // DTM's SagaConCommittedOngoing: [P,P,P,S] then [P,S,P,S].
    let mut tx = concurrent_saga(2, r#"{"concurrent":true}"#);
    tx.script.queue("01", op::ACTION, [ongoing()]);
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["action:01", "action:02"]]);
    assert_eq!(tx.statuses(), vec![P, P, P, S]);
    assert_eq!(first.end, park(T0 + 10 * SEC, 10));
    assert_eq!(tx.global.status, TransStatus::Submitted);

    let second = tx.run(T0 + 10 * SEC);
    assert_eq!(second.calls(), vec![vec!["action:01"]]);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn concurrent_saga_rollback_with_ongoing_compensation() {
    // DTM's SagaConRollbackNormal: compensation ONGOING -> aborting; next pass -> failed.
    let mut tx = concurrent_saga(2, r#"{"concurrent":true}"#);
    tx.script.queue("02", op::ACTION, [failure()]);
    tx.script.queue("02", op::COMPENSATE, [ongoing()]);
    let first = tx.run(T0);
    assert_eq!(
        first.calls(),
        vec![vec!["action:01", "action:02"], vec!["compensate:01", "compensate:02"]]
    );
    assert_eq!(tx.statuses(), vec![S, S, P, F]);
    assert_eq!(tx.global.status, TransStatus::Aborting);
    assert_eq!(first.end, park(T0 + 10 * SEC, 10));

    let second = tx.run(T0 + 10 * SEC);
    assert_eq!(second.calls(), vec![vec!["compensate:02"]]);
    assert_eq!(tx.statuses(), vec![S, S, S, F]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn saga_invalid_custom_data_falls_back_to_sequential() {
    let mut tx = concurrent_saga(2, "not json");
    assert_eq!(tx.run(T0).calls(), vec![vec!["action:01"], vec!["action:02"]]);
}

#[test]
fn saga_orders_parse() {
    let empty = SagaOrders::parse("").unwrap();
    assert!(!empty.concurrent);
    assert!(empty.orders.is_empty());
    let nulls = SagaOrders::parse(r#"{"concurrent":null,"orders":null}"#).unwrap();
    assert!(!nulls.concurrent);
    assert!(nulls.orders.is_empty());
    let full = SagaOrders::parse(r#"{"concurrent":true,"orders":{"1":[0],"2":[0,1]},"other":1}"#).unwrap();
    assert!(full.concurrent);
    assert_eq!(full.orders["1"], vec![0]);
    assert_eq!(full.orders["2"], vec![0, 1]);
    let err = SagaOrders::parse("not json").unwrap_err();
    assert!(err.starts_with("invalid saga custom_data: "), "{err}");
}

fn orders(json: &str) -> SagaOrders {
    SagaOrders::parse(json).unwrap()
}

#[test]
fn saga_orders_validate() {
    assert_eq!(orders(r#"{"orders":{"1":[0],"2":[0,1]}}"#).validate(3), Ok(()));
    assert_eq!(
        orders(r#"{"concurrent":true,"orders":{"0":[2],"1":[2]}}"#).validate(3),
        Ok(())
    );
    assert_eq!(orders(r#"{"orders":{"1":[0,0]}}"#).validate(2), Ok(()));
    assert_eq!(orders("").validate(0), Ok(()));
    assert_eq!(orders("").validate(4), Ok(()));

    assert_eq!(
        orders(r#"{"orders":{"0":[1],"1":[0]}}"#).validate(2),
        Err("saga orders contain a cycle".to_owned())
    );
    assert_eq!(
        orders(r#"{"orders":{"0":[2],"1":[0],"2":[1]}}"#).validate(4),
        Err("saga orders contain a cycle".to_owned())
    );
    assert_eq!(
        orders(r#"{"orders":{"1":[1]}}"#).validate(2),
        Err("saga orders: step 1 waits for itself".to_owned())
    );
    assert_eq!(
        orders(r#"{"orders":{"2":[0]}}"#).validate(2),
        Err("saga orders: step 2 does not exist (2 steps)".to_owned())
    );
    assert_eq!(
        orders(r#"{"orders":{"1":[5]}}"#).validate(2),
        Err("saga orders: step 1 waits for step 5, which does not exist".to_owned())
    );
    assert_eq!(
        orders(r#"{"orders":{"x":[0]}}"#).validate(2),
        Err("saga orders: step key \"x\" is not a step index".to_owned())
    );
    assert_eq!(
        orders(r#"{"orders":{"-1":[0]}}"#).validate(2),
        Err("saga orders: step key \"-1\" is not a step index".to_owned())
    );
}

// ---------------------------------------------------------------------------------------------
// Msg
// ---------------------------------------------------------------------------------------------

#[test]
fn msg_prepared_before_timeout_parks_at_deadline() {
    let mut tx = msg(TransStatus::Prepared, 2);
    let log = tx.run(T0 + 5 * SEC);
    assert!(log.invokes.is_empty());
    assert_eq!(log.end, park(T0 + 35 * SEC, 10));
    assert_eq!(tx.global.status, TransStatus::Prepared);

    // A custom timeout moves the deadline; the interval is kept.
    let mut tx = msg(TransStatus::Prepared, 2);
    tx.global.options.timeout_to_fail = 120;
    tx.global.next_cron_interval = 40;
    let log = tx.run(T0 + 60 * SEC);
    assert!(log.invokes.is_empty());
    assert_eq!(log.end, park(T0 + 120 * SEC, 40));
}

#[test]
fn msg_backcheck_success_submits_and_delivers() {
    let mut tx = msg(TransStatus::Prepared, 2);
    let log = tx.run(T0 + 35 * SEC);
    assert_eq!(log.calls(), vec![vec!["msg:00"], vec!["action:01"], vec!["action:02"]]);
    assert_eq!(
        log.invokes[0][0],
        Call {
            target: Target::QueryPrepared,
            url: QUERY_URL.to_owned(),
            branch_id: "00".to_owned(),
            op: op::MSG.to_owned(),
            body: Vec::new(),
        }
    );
    assert_eq!(
        log.invokes[1][0],
        Call {
            target: Target::Branch(0),
            url: msg_url(1),
            branch_id: "01".to_owned(),
            op: op::ACTION.to_owned(),
            body: b"{\"amount\":30}".to_vec(),
        }
    );
    assert_eq!(
        log.transitions,
        vec![(TransStatus::Submitted, None), (TransStatus::Succeed, None)]
    );
    assert_eq!(log.end, Plan::Finished);
    assert_eq!(tx.statuses(), vec![S, S]);
    // The back-check writes no branch row.
    assert_eq!(log.updates.len(), 2);
    assert_eq!(log.updates[0].id, 101);
}

#[test]
fn msg_backcheck_failure_fails() {
    let mut tx = msg(TransStatus::Prepared, 2);
    tx.script.queue("00", op::MSG, [failure()]);
    let log = tx.run(T0 + 60 * SEC);
    assert_eq!(log.calls(), vec![vec!["msg:00"]]);
    assert_eq!(
        log.transitions,
        vec![(
            TransStatus::Failed,
            Some("query_prepared returned failure: {\"dtm_result\":\"FAILURE\"}".to_owned())
        )]
    );
    assert_eq!(log.end, Plan::Finished);
    assert_eq!(tx.statuses(), vec![P, P]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn msg_backcheck_ongoing_resets_interval() {
    let mut tx = msg(TransStatus::Prepared, 2);
    tx.global.next_cron_interval = 80;
    tx.script.queue("00", op::MSG, [ongoing()]);
    let log = tx.run(T0 + 60 * SEC);
    assert_eq!(log.calls(), vec![vec!["msg:00"]]);
    assert!(log.transitions.is_empty());
    assert!(!log.pass.saw_error());
    assert_eq!(log.end, park(T0 + 70 * SEC, 10));
    assert_eq!(tx.global.status, TransStatus::Prepared);
    assert_eq!(tx.statuses(), vec![P, P]);

    // DTM's MsgTimeoutSuccess: the next back-check says yes.
    let later = tx.run(T0 + 70 * SEC);
    assert_eq!(
        later.calls(),
        vec![vec!["msg:00"], vec!["action:01"], vec!["action:02"]]
    );
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn msg_backcheck_error_backs_off() {
    let mut tx = msg(TransStatus::Prepared, 1);
    tx.script.always("00", op::MSG, error());
    let first = tx.run(T0 + 60 * SEC);
    assert_eq!(first.calls(), vec![vec!["msg:00"]]);
    assert_eq!(first.end, park(T0 + 80 * SEC, 20));
    assert_eq!(
        first.pass.last_error(),
        Some(&(QUERY_URL.to_owned(), "connection refused".to_owned()))
    );
    let second = tx.run(T0 + 80 * SEC);
    assert_eq!(second.calls(), vec![vec!["msg:00"]]);
    assert_eq!(second.end, park(T0 + 120 * SEC, 40));
    assert_eq!(tx.global.status, TransStatus::Prepared);
}

#[test]
fn msg_backcheck_uses_custom_timeout() {
    // DTM's MsgTimeoutCustom: timeout 120 -> nothing at +60, back-check at +180.
    let mut tx = msg(TransStatus::Prepared, 1);
    tx.global.options.timeout_to_fail = 120;
    assert!(tx.run(T0 + 60 * SEC).invokes.is_empty());
    let log = tx.run(T0 + 180 * SEC);
    assert_eq!(log.calls(), vec![vec!["msg:00"], vec!["action:01"]]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn msg_delay_parks_until_create_plus_delay() {
    let mut tx = msg(TransStatus::Submitted, 1);
    tx.global.custom_data = r#"{"delay":10}"#.to_owned();
    let at_once = tx.run(T0);
    assert!(at_once.invokes.is_empty());
    assert_eq!(at_once.end, park(T0 + 10 * SEC, 10));
    let early = tx.run(T0 + 8 * SEC);
    assert!(early.invokes.is_empty());
    assert_eq!(early.end, park(T0 + 10 * SEC, 10));
    let due = tx.run(T0 + 12 * SEC);
    assert_eq!(due.calls(), vec![vec!["action:01"]]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn msg_delay_after_backcheck() {
    let mut tx = msg(TransStatus::Prepared, 1);
    tx.global.custom_data = r#"{"delay":100}"#.to_owned();
    let log = tx.run(T0 + 40 * SEC);
    assert_eq!(log.calls(), vec![vec!["msg:00"]]);
    assert_eq!(log.transitions, vec![(TransStatus::Submitted, None)]);
    assert_eq!(log.end, park(T0 + 100 * SEC, 10));
    let due = tx.run(T0 + 100 * SEC);
    assert_eq!(due.calls(), vec![vec!["action:01"]]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn msg_custom_data_parse() {
    assert_eq!(MsgCustom::parse("").unwrap().delay, 0);
    assert_eq!(MsgCustom::parse(r#"{"delay":null}"#).unwrap().delay, 0);
    assert_eq!(MsgCustom::parse(r#"{"delay":7,"x":1}"#).unwrap().delay, 7);
    assert!(
        MsgCustom::parse("{")
            .unwrap_err()
            .starts_with("invalid msg custom_data: ")
    );
}

#[test]
fn msg_sequential_stops_at_first_non_success() {
    let mut tx = msg(TransStatus::Submitted, 3);
    tx.script.queue("02", op::ACTION, [error()]);
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["action:01"], vec!["action:02"]]);
    assert_eq!(first.end, park(T0 + 20 * SEC, 20));
    assert_eq!(tx.statuses(), vec![S, P, P]);
    assert_eq!(tx.global.status, TransStatus::Submitted);

    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.calls(), vec![vec!["action:02"], vec!["action:03"]]);
    assert_eq!(tx.statuses(), vec![S, S, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn msg_sequential_ongoing_keeps_interval() {
    let mut tx = msg(TransStatus::Submitted, 2);
    tx.global.next_cron_interval = 40;
    tx.script.queue("01", op::ACTION, [ongoing()]);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"]]);
    assert_eq!(log.end, park(T0 + 40 * SEC, 40));
    assert_eq!(tx.statuses(), vec![P, P]);
}

#[test]
fn msg_concurrent_invokes_all_at_once() {
    let mut tx = msg(TransStatus::Submitted, 3);
    tx.global.options.concurrent = true;
    tx.script.queue("02", op::ACTION, [error()]);
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["action:01", "action:02", "action:03"]]);
    assert_eq!(tx.statuses(), vec![S, P, S]);
    assert_eq!(first.end, park(T0 + 20 * SEC, 20));

    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.calls(), vec![vec!["action:02"]]);
    assert_eq!(tx.statuses(), vec![S, S, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn msg_branch_failure_is_retried_not_terminal() {
    let mut tx = msg(TransStatus::Submitted, 2);
    tx.script.queue("01", op::ACTION, [failure()]);
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["action:01"]]);
    assert!(first.transitions.is_empty());
    assert!(first.updates.is_empty());
    assert_eq!(first.end, park(T0 + 20 * SEC, 20));
    assert_eq!(
        first.pass.last_error(),
        Some(&(msg_url(1), "{\"dtm_result\":\"FAILURE\"}".to_owned()))
    );
    assert_eq!(tx.statuses(), vec![P, P]);
    assert_eq!(tx.global.status, TransStatus::Submitted);

    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.calls(), vec![vec!["action:01"], vec!["action:02"]]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn msg_submitted_never_times_out() {
    let mut tx = msg(TransStatus::Submitted, 1);
    tx.script.queue("01", op::ACTION, [ongoing()]);
    let log = tx.run(T0 + 3600 * SEC);
    assert!(log.transitions.is_empty());
    assert_eq!(tx.global.status, TransStatus::Submitted);
}

#[test]
fn msg_aborting_fails_without_calls() {
    let mut tx = msg(TransStatus::Aborting, 2);
    let log = tx.run(T0);
    assert!(log.invokes.is_empty());
    assert_eq!(log.transitions, vec![(TransStatus::Failed, None)]);
    assert_eq!(tx.statuses(), vec![P, P]);
}

#[test]
fn msg_topic_subscribers_delivered_in_order() {
    let targets = [MsgTarget::Topic {
        subscribers: vec!["http://s1".to_owned(), "http://s2".to_owned()],
        payload: b"t",
    }];
    let mut tx = Tx::new(TransType::Msg, TransStatus::Submitted, msg_branches(GID, &targets, T0));
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01-01"], vec!["action:01-02"]]);
    assert_eq!(tx.statuses(), vec![S, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

// ---------------------------------------------------------------------------------------------
// TCC
// ---------------------------------------------------------------------------------------------

#[test]
fn tcc_confirm_last_to_first() {
    let mut tx = tcc(TransStatus::Submitted, 3);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![vec!["confirm:03"], vec!["confirm:02"], vec!["confirm:01"]]
    );
    assert_eq!(log.invokes[0][0].url, "http://busi/tcc/confirm3");
    assert_eq!(log.invokes[0][0].target, Target::Branch(5));
    assert_eq!(log.transitions, vec![(TransStatus::Succeed, None)]);
    assert_eq!(tx.statuses(), vec![P, S, P, S, P, S]);
}

#[test]
fn tcc_cancel_last_to_first() {
    let mut tx = tcc(TransStatus::Aborting, 3);
    tx.global.rollback_reason = "try failed: FAILURE".to_owned();
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![vec!["cancel:03"], vec!["cancel:02"], vec!["cancel:01"]]
    );
    assert_eq!(log.invokes[0][0].url, "http://busi/tcc/cancel3");
    assert_eq!(log.transitions, vec![(TransStatus::Failed, None)]);
    assert_eq!(tx.statuses(), vec![S, P, S, P, S, P]);
    assert_eq!(tx.global.rollback_reason, "try failed: FAILURE");
}

#[test]
fn tcc_prepared_parks_until_default_timeout() {
    let mut tx = tcc(TransStatus::Prepared, 2);
    let log = tx.run(T0 + 35 * SEC - 1);
    assert!(log.invokes.is_empty());
    assert_eq!(log.end, park(T0 + 35 * SEC, 10));
}

#[test]
fn tcc_prepared_times_out_under_default_policy() {
    let mut tx = tcc(TransStatus::Prepared, 2);
    let log = tx.run(T0 + 35 * SEC);
    assert_eq!(
        log.transitions,
        vec![
            (TransStatus::Aborting, Some("Timeout after 35 seconds".to_owned())),
            (TransStatus::Failed, None)
        ]
    );
    assert_eq!(log.calls(), vec![vec!["cancel:02"], vec!["cancel:01"]]);
    assert_eq!(tx.statuses(), vec![S, P, S, P]);
    assert_eq!(tx.global.rollback_reason, "Timeout after 35 seconds");
}

#[test]
fn tcc_prepared_without_any_timeout_parks_at_base() {
    let mut tx = tcc(TransStatus::Prepared, 1);
    tx.policy.timeout_to_fail = 0;
    tx.global.next_cron_interval = 40;
    let log = tx.run(T0 + 3600 * SEC);
    assert!(log.transitions.is_empty());
    assert_eq!(log.end, park(T0 + 3610 * SEC, 10));
}

#[test]
fn tcc_confirm_failure_is_retried_not_terminal() {
    let mut tx = tcc(TransStatus::Submitted, 2);
    tx.script.queue("02", op::CONFIRM, [failure()]);
    let first = tx.run(T0);
    // Stops at the first branch that did not succeed.
    assert_eq!(first.calls(), vec![vec!["confirm:02"]]);
    assert!(first.transitions.is_empty());
    assert_eq!(first.end, park(T0 + 20 * SEC, 20));
    assert_eq!(tx.statuses(), vec![P, P, P, P]);
    assert_eq!(tx.global.status, TransStatus::Submitted);

    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.calls(), vec![vec!["confirm:02"], vec!["confirm:01"]]);
    assert_eq!(tx.statuses(), vec![P, S, P, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn tcc_cancel_ongoing_then_failed() {
    // DTM's TccRollback: cancel ONGOING once -> aborting; cron -> failed [S,P,S,P].
    let mut tx = tcc(TransStatus::Aborting, 2);
    tx.script.queue("01", op::CANCEL, [ongoing()]);
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["cancel:02"], vec!["cancel:01"]]);
    assert_eq!(first.end, park(T0 + 10 * SEC, 10));
    assert_eq!(tx.statuses(), vec![P, P, S, P]);
    assert_eq!(tx.global.status, TransStatus::Aborting);

    let second = tx.run(T0 + 10 * SEC);
    assert_eq!(second.calls(), vec![vec!["cancel:01"]]);
    assert_eq!(tx.statuses(), vec![S, P, S, P]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn tcc_cancel_error_backs_off() {
    let mut tx = tcc(TransStatus::Aborting, 2);
    tx.script.queue("02", op::CANCEL, [error(), error()]);
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["cancel:02"]]);
    assert_eq!(first.end, park(T0 + 20 * SEC, 20));
    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.end, park(T0 + 60 * SEC, 40));
    let third = tx.run(T0 + 60 * SEC);
    assert_eq!(third.calls(), vec![vec!["cancel:02"], vec!["cancel:01"]]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn tcc_without_branches_finishes_at_once() {
    let mut tx = tcc(TransStatus::Submitted, 0);
    assert_eq!(tx.run(T0).transitions, vec![(TransStatus::Succeed, None)]);
    let mut tx = tcc(TransStatus::Aborting, 0);
    assert_eq!(tx.run(T0).transitions, vec![(TransStatus::Failed, None)]);
}

// ---------------------------------------------------------------------------------------------
// XA
// ---------------------------------------------------------------------------------------------

#[test]
fn xa_commit_first_to_last() {
    let mut tx = xa(TransStatus::Submitted, 3);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![vec!["commit:01"], vec!["commit:02"], vec!["commit:03"]]
    );
    assert_eq!(log.invokes[0][0].url, "http://busi/xa/phase2");
    assert_eq!(log.invokes[0][0].target, Target::Branch(1));
    assert_eq!(tx.statuses(), vec![P, S, P, S, P, S]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn xa_rollback_first_to_last() {
    let mut tx = xa(TransStatus::Aborting, 2);
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["rollback:01"], vec!["rollback:02"]]);
    assert_eq!(tx.statuses(), vec![S, P, S, P]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn xa_commit_stops_at_first_non_success() {
    // DTM's XaNotTimeout: commit ONGOING once -> submitted; cron -> succeed.
    let mut tx = xa(TransStatus::Submitted, 2);
    tx.script.queue("01", op::COMMIT, [ongoing()]);
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["commit:01"]]);
    assert_eq!(first.end, park(T0 + 10 * SEC, 10));
    assert_eq!(tx.global.status, TransStatus::Submitted);
    let second = tx.run(T0 + 10 * SEC);
    assert_eq!(second.calls(), vec![vec!["commit:01"], vec!["commit:02"]]);
    assert_eq!(tx.global.status, TransStatus::Succeed);
}

#[test]
fn xa_rollback_failure_is_retried() {
    let mut tx = xa(TransStatus::Aborting, 2);
    tx.script.queue("02", op::ROLLBACK, [failure()]);
    let first = tx.run(T0);
    assert_eq!(first.calls(), vec![vec!["rollback:01"], vec!["rollback:02"]]);
    assert_eq!(first.end, park(T0 + 20 * SEC, 20));
    assert_eq!(tx.statuses(), vec![S, P, P, P]);
    assert_eq!(tx.global.status, TransStatus::Aborting);
    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.calls(), vec![vec!["rollback:02"]]);
    assert_eq!(tx.global.status, TransStatus::Failed);
}

#[test]
fn xa_timeout_without_branches() {
    let mut tx = xa(TransStatus::Prepared, 0);
    let log = tx.run(T0 + 35 * SEC);
    assert!(log.invokes.is_empty());
    assert_eq!(
        log.transitions,
        vec![
            (TransStatus::Aborting, Some("Timeout after 35 seconds".to_owned())),
            (TransStatus::Failed, None)
        ]
    );
}

#[test]
fn xa_custom_timeout() {
    let mut tx = xa(TransStatus::Prepared, 1);
    tx.global.options.timeout_to_fail = 5;
    tx.global.next_cron_interval = 5;
    let early = tx.run(T0 + SEC);
    assert_eq!(early.end, park(T0 + 5 * SEC, 5));
    let log = tx.run(T0 + 5 * SEC);
    assert_eq!(
        log.transitions[0],
        (TransStatus::Aborting, Some("Timeout after 5 seconds".to_owned()))
    );
    assert_eq!(log.calls(), vec![vec!["rollback:01"]]);
}

// ---------------------------------------------------------------------------------------------
// Workflow
// ---------------------------------------------------------------------------------------------

#[test]
fn workflow_prepared_resumes_once_per_pass() {
    let mut tx = workflow(TransStatus::Prepared, "wf_saga", b"{\"amount\":30}");
    let first = tx.run(T0 + 10 * SEC);
    assert_eq!(
        first.invokes,
        vec![vec![Call {
            target: Target::WorkflowResume,
            url: RESUME_URL.to_owned(),
            branch_id: "00".to_owned(),
            op: "wf_saga".to_owned(),
            body: b"{\"amount\":30}".to_vec(),
        }]]
    );
    assert!(first.transitions.is_empty());
    assert!(first.updates.is_empty());
    assert_eq!(first.end, park(T0 + 20 * SEC, 10));
    assert_eq!(tx.global.status, TransStatus::Prepared);

    let second = tx.run(T0 + 20 * SEC);
    assert_eq!(second.calls(), vec![vec!["wf_saga:00"]]);
    assert_eq!(second.end, park(T0 + 30 * SEC, 10));
}

#[test]
fn workflow_resume_success_resets_interval() {
    let mut tx = workflow(TransStatus::Prepared, "wf", b"x");
    tx.global.next_cron_interval = 80;
    assert_eq!(tx.run(T0).end, park(T0 + 10 * SEC, 10));
}

#[test]
fn workflow_resume_non_success_backs_off() {
    for outcome in [error(), failure(), ongoing()] {
        let mut tx = workflow(TransStatus::Prepared, "wf", b"x");
        tx.script.queue("00", "wf", [outcome.clone()]);
        let log = tx.run(T0);
        assert_eq!(log.calls(), vec![vec!["wf:00"]], "{outcome:?}");
        assert!(log.transitions.is_empty(), "{outcome:?}");
        assert!(log.pass.saw_error(), "{outcome:?}");
        assert_eq!(log.end, park(T0 + 20 * SEC, 20), "{outcome:?}");
        assert_eq!(tx.global.status, TransStatus::Prepared);
    }
}

#[test]
fn workflow_never_times_out() {
    let mut tx = workflow(TransStatus::Prepared, "wf", b"x");
    let log = tx.run(T0 + 10 * 24 * 3600 * SEC);
    assert_eq!(log.calls(), vec![vec!["wf:00"]]);
    assert!(log.transitions.is_empty());
    assert_eq!(timeout_seconds(&tx.global, &tx.policy), 0);
}

#[test]
fn workflow_finished_is_finished() {
    for status in [TransStatus::Succeed, TransStatus::Failed] {
        let mut tx = workflow(status, "wf", b"x");
        let log = tx.run(T0);
        assert!(log.invokes.is_empty());
        assert_eq!(log.end, Plan::Finished);
    }
}

#[test]
fn workflow_submitted_or_aborting_only_waits() {
    for status in [TransStatus::Submitted, TransStatus::Aborting] {
        let mut tx = workflow(status, "wf", b"x");
        let log = tx.run(T0);
        assert!(log.invokes.is_empty());
        assert_eq!(log.end, park(T0 + 10 * SEC, 10));
    }
}

#[test]
fn workflow_custom_data_parse_and_input() {
    let custom = WorkflowCustom::parse(r#"{"name":"wf","data":"aGVsbG8="}"#).unwrap();
    assert_eq!(custom.name, "wf");
    assert_eq!(custom.input(), b"hello".to_vec());
    let nulls = WorkflowCustom::parse(r#"{"name":null,"data":null}"#).unwrap();
    assert_eq!(nulls.name, "");
    assert!(nulls.input().is_empty());
    let bad = WorkflowCustom::parse(r#"{"name":"wf","data":"%%%"}"#).unwrap();
    assert!(bad.input().is_empty());
    assert!(
        WorkflowCustom::parse("[")
            .unwrap_err()
            .starts_with("invalid workflow custom_data: ")
    );

    // Empty custom_data: a resume with an empty op and body.
    let mut tx = Tx::new(TransType::Workflow, TransStatus::Prepared, Vec::new());
    tx.global.query_prepared = RESUME_URL.to_owned();
    let log = tx.run(T0);
    assert_eq!(log.invokes[0][0].op, "");
    assert!(log.invokes[0][0].body.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Backoff, timeouts, generic plan/absorb behaviour
// ---------------------------------------------------------------------------------------------

#[test]
fn base_interval_rules() {
    let policy = Policy::default();
    let mut global = new_global(TransType::Saga, TransStatus::Submitted);
    assert_eq!(base_interval(&global, &policy), 10);

    global.options.retry_interval = 150;
    assert_eq!(base_interval(&global, &policy), 150);

    // retry_interval wins over a small timeout.
    global.options.timeout_to_fail = 5;
    global.options.retry_interval = 3;
    assert_eq!(base_interval(&global, &policy), 3);

    global.options.retry_interval = 0;
    assert_eq!(base_interval(&global, &policy), 5);
    global.options.timeout_to_fail = 10;
    assert_eq!(base_interval(&global, &policy), 10);
    global.options.timeout_to_fail = 20;
    assert_eq!(base_interval(&global, &policy), 10);

    let zero = Policy {
        retry_interval: 0,
        ..Policy::default()
    };
    global.options.timeout_to_fail = 0;
    assert_eq!(base_interval(&global, &zero), 1);
    global.options.timeout_to_fail = 5;
    assert_eq!(base_interval(&global, &zero), 1);
}

#[test]
fn retry_count_counts_doublings() {
    assert_eq!(retry_count(10, 10), 0);
    assert_eq!(retry_count(20, 10), 1);
    assert_eq!(retry_count(40, 10), 2);
    assert_eq!(retry_count(80, 10), 3);
    assert_eq!(retry_count(160, 10), 4);
    // A capped interval counts as the doubling that reached it.
    assert_eq!(retry_count(300, 10), 5);
    assert_eq!(retry_count(5, 10), 0);
    assert_eq!(retry_count(4, 0), 2);
    assert_eq!(retry_count(300, 150), 1);
}

fn pass_with(saw_error: bool, saw_ongoing: bool) -> Pass {
    Pass {
        saw_error,
        saw_ongoing,
        ..Pass::default()
    }
}

#[test]
fn park_after_pass_rules() {
    let policy = Policy::default();
    let mut global = new_global(TransType::Saga, TransStatus::Submitted);
    global.next_cron_interval = 40;
    let now = T0;
    let after = |g: &GlobalTrans, p: &Pass| park_after_pass(g, p, now, &policy);

    assert_eq!(after(&global, &pass_with(false, false)), park(now + 10 * SEC, 10));
    assert_eq!(after(&global, &pass_with(false, true)), park(now + 40 * SEC, 40));
    assert_eq!(after(&global, &pass_with(true, false)), park(now + 80 * SEC, 80));
    // An error wins over an ongoing reply.
    assert_eq!(after(&global, &pass_with(true, true)), park(now + 80 * SEC, 80));

    // Cap.
    global.next_cron_interval = 200;
    assert_eq!(after(&global, &pass_with(true, false)), park(now + 300 * SEC, 300));
    global.next_cron_interval = 300;
    assert_eq!(after(&global, &pass_with(true, false)), park(now + 300 * SEC, 300));

    // No stored interval yet: start from the base.
    global.next_cron_interval = 0;
    assert_eq!(after(&global, &pass_with(true, false)), park(now + 20 * SEC, 20));
    assert_eq!(after(&global, &pass_with(false, true)), park(now + 10 * SEC, 10));

    // A base above the cap is never lowered by the cap.
    global.options.retry_interval = 600;
    global.next_cron_interval = 600;
    assert_eq!(after(&global, &pass_with(true, false)), park(now + 600 * SEC, 600));

    // No overflow on absurd stored intervals.
    global.options.retry_interval = 0;
    global.next_cron_interval = i64::MAX;
    assert_eq!(after(&global, &pass_with(true, false)), park(now + 300 * SEC, 300));
}

#[test]
fn timeouts_per_mode() {
    let policy = Policy::default();
    let expected = [
        (TransType::Saga, 0),
        (TransType::Workflow, 0),
        (TransType::Msg, 35),
        (TransType::Tcc, 35),
        (TransType::Xa, 35),
    ];
    for (mode, seconds) in expected {
        let mut global = new_global(mode, TransStatus::Prepared);
        assert_eq!(timeout_seconds(&global, &policy), seconds, "{mode}");
        global.options.timeout_to_fail = 100;
        assert_eq!(timeout_seconds(&global, &policy), 100, "{mode}");
        assert_eq!(deadline(&global, &policy), Some(T0 + 100 * SEC), "{mode}");
    }
    let saga = new_global(TransType::Saga, TransStatus::Submitted);
    assert_eq!(deadline(&saga, &policy), None);
}

#[test]
fn finished_transactions_plan_finished_in_every_mode() {
    for mode in [
        TransType::Saga,
        TransType::Msg,
        TransType::Tcc,
        TransType::Xa,
        TransType::Workflow,
    ] {
        for status in [TransStatus::Succeed, TransStatus::Failed] {
            let global = new_global(mode, status);
            assert_eq!(
                plan(&global, &[], &Pass::default(), T0, &Policy::default()),
                Plan::Finished,
                "{mode} {status}"
            );
        }
    }
}

#[test]
fn absorb_records_each_outcome_on_a_saga_action() {
    let global = new_global(TransType::Saga, TransStatus::Submitted);
    let fresh = || saga(1).branches;

    // Success: row updated and reported.
    let mut branches = fresh();
    let mut pass = Pass::default();
    let call = call_for(&branches, 1);
    let update = absorb(&global, &mut branches, &mut pass, &call, &Outcome::Success, T0 + 7);
    assert_eq!(
        update,
        Some(BranchUpdate {
            id: 102,
            branch_id: "01".to_owned(),
            op: "action".to_owned(),
            status: S,
            at: T0 + 7,
        })
    );
    assert_eq!(branches[1].status, S);
    assert_eq!(branches[1].update_time, T0 + 7);
    assert_eq!(branches[1].finish_time, Some(T0 + 7));
    assert!(pass.attempted(Target::Branch(1)));
    assert!(!pass.saw_error());

    // Failure on a saga action is terminal.
    let mut branches = fresh();
    let mut pass = Pass::default();
    let update = absorb(
        &global,
        &mut branches,
        &mut pass,
        &call,
        &Outcome::Failure("  no money  ".to_owned()),
        T0 + 8,
    );
    assert_eq!(update.map(|u| u.status), Some(F));
    assert_eq!(branches[1].rollback_time, Some(T0 + 8));
    assert_eq!(
        pass.failure_reason.as_deref(),
        Some("url:http://busi/saga/action1 return failed: no money FAILURE")
    );
    assert!(!pass.saw_error());

    // Error: nothing to persist, noted for backoff and the alert.
    let mut branches = fresh();
    let mut pass = Pass::default();
    let update = absorb(&global, &mut branches, &mut pass, &call, &error(), T0 + 9);
    assert_eq!(update, None);
    assert_eq!(branches, fresh());
    assert!(pass.saw_error());
    assert!(!pass.saw_ongoing);
    assert_eq!(
        pass.last_error(),
        Some(&(action_url(1), "connection refused".to_owned()))
    );

    // Ongoing: nothing to persist, not an error.
    let mut branches = fresh();
    let mut pass = Pass::default();
    let update = absorb(&global, &mut branches, &mut pass, &call, &ongoing(), T0 + 9);
    assert_eq!(update, None);
    assert_eq!(branches, fresh());
    assert!(!pass.saw_error());
    assert!(pass.saw_ongoing);
    assert_eq!(pass.last_error(), None);
}

#[test]
fn absorb_failure_on_a_compensation_is_an_error() {
    let mut global = new_global(TransType::Saga, TransStatus::Aborting);
    global.options.retry_limit = 3;
    let mut branches = saga(1).branches;
    let mut pass = Pass::default();
    let call = call_for(&branches, 0);
    assert_eq!(absorb(&global, &mut branches, &mut pass, &call, &failure(), T0), None);
    assert_eq!(branches[0].status, P);
    assert!(pass.saw_error());
    assert!(pass.failure_reason.is_none());
    // No immediate retry outside the forward phase.
    assert!(pass.attempted(Target::Branch(0)));
    assert!(pass.retries.is_empty());
}

#[test]
fn absorb_out_of_range_row_is_ignored() {
    let global = new_global(TransType::Saga, TransStatus::Submitted);
    let mut branches = saga(1).branches;
    let mut pass = Pass::default();
    let call = Call {
        target: Target::Branch(9),
        url: "http://x".to_owned(),
        branch_id: "09".to_owned(),
        op: op::ACTION.to_owned(),
        body: Vec::new(),
    };
    assert_eq!(
        absorb(&global, &mut branches, &mut pass, &call, &Outcome::Success, T0),
        None
    );
    assert_eq!(branches, saga(1).branches);
}

#[test]
fn every_outcome_in_every_mode_settles() {
    // Whatever a single branch answers, each mode ends the pass parked or finished, never
    // loops, and only moves along its state machine.
    let outcomes = [Outcome::Success, failure(), ongoing(), error()];
    for outcome in outcomes {
        let cases: Vec<(Tx, &str, &str, TransStatus, Vec<BranchStatus>)> = vec![
            (saga(2), "02", op::ACTION, TransStatus::Submitted, vec![P, S, P, S]),
            (
                msg(TransStatus::Submitted, 2),
                "01",
                op::ACTION,
                TransStatus::Submitted,
                vec![S, S],
            ),
            (
                tcc(TransStatus::Submitted, 2),
                "01",
                op::CONFIRM,
                TransStatus::Submitted,
                vec![P, S, P, S],
            ),
            (
                xa(TransStatus::Aborting, 2),
                "02",
                op::ROLLBACK,
                TransStatus::Aborting,
                vec![S, P, S, P],
            ),
        ];
        for (mut tx, branch_id, op, start, succeeded) in cases {
            tx.script.queue(branch_id, op, [outcome.clone()]);
            let mode = tx.global.trans_type;
            let log = tx.run(T0);
            let what = format!("{mode} {branch_id}/{op} {outcome:?}");
            match (&outcome, mode) {
                (Outcome::Success, _) => {
                    assert!(tx.global.status.is_finished(), "{what}");
                    assert_eq!(tx.statuses(), succeeded, "{what}");
                }
                (Outcome::Failure(_), TransType::Saga) => {
                    assert_eq!(tx.global.status, TransStatus::Failed, "{what}");
                    assert_eq!(tx.statuses(), vec![S, S, S, F], "{what}");
                }
                (Outcome::Failure(_) | Outcome::Error(_), _) => {
                    assert_eq!(tx.global.status, start, "{what}");
                    assert!(log.pass.saw_error(), "{what}");
                    assert_eq!(log.parked().1, 20, "{what}");
                }
                (Outcome::Ongoing(_), _) => {
                    assert_eq!(tx.global.status, start, "{what}");
                    assert!(!log.pass.saw_error(), "{what}");
                    assert_eq!(log.parked().1, 10, "{what}");
                }
            }
        }
    }
}

#[test]
fn saga_orders_validate_sequential_saga_includes_implicit_order() {
    // Sequential: every step already waits for the previous one, so an order pointing at a later
    // step is a cycle (the saga would otherwise never call anything and park forever).
    assert_eq!(
        orders(r#"{"orders":{"0":[1]}}"#).validate(2),
        Err("saga orders contain a cycle".to_owned())
    );
    assert_eq!(
        orders(r#"{"concurrent":false,"orders":{"1":[2]}}"#).validate(3),
        Err("saga orders contain a cycle".to_owned())
    );
    // Orders consistent with the sequence stay valid; the same order is fine when concurrent.
    assert_eq!(orders(r#"{"orders":{"2":[0]}}"#).validate(3), Ok(()));
    assert_eq!(orders(r#"{"concurrent":true,"orders":{"0":[1]}}"#).validate(2), Ok(()));

    // What validate now rejects is indeed a dead end for the engine.
    let mut tx = concurrent_saga(2, r#"{"orders":{"0":[1]}}"#);
    let log = tx.run(T0 + 3600 * SEC);
    assert!(log.invokes.is_empty());
    assert_eq!(tx.global.status, TransStatus::Submitted);
}

#[test]
fn saga_whose_actions_all_succeeded_completes_even_past_its_deadline() {
    let mut tx = saga(2);
    tx.global.options.timeout_to_fail = 60;
    for row in tx.branches.iter_mut().filter(|b| b.op == op::ACTION) {
        row.status = S;
    }
    let log = tx.run(T0 + 3600 * SEC);
    assert_eq!(log.transitions, vec![(TransStatus::Succeed, None)]);
    assert!(log.calls().is_empty());
}

#[test]
fn progress_in_a_pass_restarts_the_backoff_from_the_base_interval() {
    let mut tx = saga(2);
    tx.global.next_cron_interval = 160;
    tx.script.always("02", op::ACTION, error());
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["action:01"], vec!["action:02"]]);
    assert_eq!(log.end, park(T0 + 20 * SEC, 20));
    // No progress in the next pass: the backoff grows again.
    let log = tx.run(T0 + 20 * SEC);
    assert_eq!(log.end, park(T0 + 60 * SEC, 40));
}

#[test]
fn saga_orders_listing_a_step_twice_are_rejected() {
    let orders = SagaOrders::parse(r#"{"concurrent":true,"orders":{"1":[0],"01":[0]}}"#).unwrap();
    assert_eq!(
        orders.validate(2),
        Err("saga orders: step 1 is listed twice".to_owned())
    );
}

/// A `Tcc` resource's rows: the controller runs the tries itself.
fn tcc_resource(count: usize) -> Tx {
    let rows = (0..count)
        .flat_map(|i| {
            let id = branch_id_for(i);
            let urls = [
                format!("http://busi/try{}", i + 1),
                format!("http://busi/confirm{}", i + 1),
                format!("http://busi/cancel{}", i + 1),
            ];
            tcc_resource_branches(GID, &id, [&urls[0], &urls[1], &urls[2]], b"{}", T0)
        })
        .collect();
    Tx::new(TransType::Tcc, TransStatus::Prepared, rows)
}

#[test]
fn tcc_resource_tries_in_order_then_decides_to_confirm() {
    let mut tx = tcc_resource(2);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![vec!["try:01"], vec!["try:02"], vec!["confirm:02"], vec!["confirm:01"]]
    );
    assert_eq!(
        log.transitions,
        vec![(TransStatus::Submitted, None), (TransStatus::Succeed, None)]
    );
    assert_eq!(tx.statuses(), vec![S, P, S, S, P, S]);
}

#[test]
fn tcc_resource_try_failure_cancels_only_the_branches_tried() {
    let mut tx = tcc_resource(3);
    tx.script.queue("02", op::TRY, [failure()]);
    let log = tx.run(T0);
    assert_eq!(
        log.calls(),
        vec![vec!["try:01"], vec!["try:02"], vec!["cancel:02"], vec!["cancel:01"]]
    );
    assert_eq!(log.transitions[0].0, TransStatus::Aborting);
    assert!(log.transitions[0].1.as_deref().unwrap_or_default().contains("FAILURE"));
    assert_eq!(tx.global.status, TransStatus::Failed);
    assert_eq!(tx.statuses(), vec![S, S, P, F, S, P, P, P, P]);
}

#[test]
fn tcc_resource_try_error_is_retried_until_the_timeout_cancels() {
    let mut tx = tcc_resource(2);
    tx.global.options.timeout_to_fail = 60;
    tx.script.always("02", op::TRY, error());
    let log = tx.run(T0);
    assert_eq!(log.calls(), vec![vec!["try:01"], vec!["try:02"]]);
    assert_eq!(tx.global.status, TransStatus::Prepared);
    let log = tx.run(T0 + 60 * SEC);
    assert_eq!(log.calls(), vec![vec!["cancel:02"], vec!["cancel:01"]]);
    assert_eq!(tx.global.status, TransStatus::Failed);
    assert_eq!(tx.global.rollback_reason, "Timeout after 60 seconds");
}
