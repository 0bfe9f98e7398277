//! Saga scenarios (DTM's checklist) against a real server, real SQLite file and real HTTP branches.

mod common;

use common::{Bank, Reply, TestServer, transfer_saga};
use serde_json::json;

const P: &str = "prepared";
const S: &str = "succeed";
const F: &str = "failed";

fn rows(statuses: &[&str]) -> Vec<String> {
    statuses.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn saga_normal_runs_actions_in_order() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (code, body) = server.post("submit", transfer_saga("normal", &bank)).await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    let (status, branches) = server.wait_status("normal", S).await;
    assert_eq!(status, S);
    assert_eq!(branches, rows(&[P, S, P, S]));
    assert_eq!(bank.routes("normal"), ["TransOut", "TransIn"]);
    let call = &bank.calls()[0];
    assert_eq!(call.method, "POST");
    assert_eq!(
        (call.trans_type.as_str(), call.branch_id.as_str(), call.op.as_str()),
        ("saga", "01", "action")
    );
    assert_eq!(call.body, "{\"amount\":30}");
    assert!(server.transaction("normal").await.get("rollback_reason").is_none());
}

#[tokio::test]
async fn saga_rollback_compensates_the_failed_step_and_earlier_ones_in_reverse() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransIn", &[Reply::Failure]);
    server.post("submit", transfer_saga("rollback", &bank)).await;
    let (_, branches) = server.wait_status("rollback", F).await;
    assert_eq!(branches, rows(&[S, S, S, F]));
    assert_eq!(
        bank.routes("rollback"),
        ["TransOut", "TransIn", "TransInRevert", "TransOutRevert"]
    );
    let reason = server.transaction("rollback").await["rollback_reason"].clone();
    let reason = reason.as_str().unwrap_or_default();
    assert!(
        reason.contains("business refused") && reason.contains("TransIn"),
        "{reason}"
    );
}

#[tokio::test]
async fn saga_ongoing_step_is_retried_by_the_scheduler() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransOut", &[Reply::Ongoing]);
    server.post("submit", transfer_saga("ongoing", &bank)).await;
    let trans = server.wait_parked("ongoing").await;
    assert_eq!(trans["status"], "submitted");
    assert_eq!(server.state("ongoing").await.1, rows(&[P, P, P, P]));
    // Ongoing keeps the interval: due again after the 10 s default, not before.
    assert_eq!(server.advance_and_tick(5).await, 0);
    assert_eq!(server.advance_and_tick(6).await, 1);
    assert_eq!(server.state("ongoing").await, (S.to_owned(), rows(&[P, S, P, S])));
}

#[tokio::test]
async fn saga_compensation_error_leaves_it_aborting_until_a_retry_succeeds() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransIn", &[Reply::Failure]);
    bank.script("TransOutRevert", &[Reply::Error]);
    server.post("submit", transfer_saga("comp-error", &bank)).await;
    let trans = server.wait_parked("comp-error").await;
    assert_eq!(trans["status"], "aborting");
    assert_eq!(trans["next_cron_interval"], 20, "an error doubles the interval");
    assert_eq!(server.state("comp-error").await.1, rows(&[P, S, S, F]));
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert_eq!(server.state("comp-error").await, (F.to_owned(), rows(&[S, S, S, F])));
}

#[tokio::test]
async fn saga_submit_twice_is_accepted_and_submit_after_success_is_refused() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let mut body = transfer_saga("twice", &bank);
    body["wait_result"] = json!(true);
    assert_eq!(server.post("submit", body.clone()).await.0, 200);
    let (code, reply) = server.post("submit", body).await;
    assert_eq!(code, 409, "{reply}");
    assert_eq!(reply["dtm_result"], "FAILURE");
    assert_eq!(bank.count("twice", "TransOut"), 1, "no step ran again");

    bank.script("TransOut", &[Reply::Ongoing]);
    let pending = transfer_saga("pending", &bank);
    server.post("submit", pending.clone()).await;
    server.wait_parked("pending").await;
    // A second submit of an unfinished saga is fine and hurries it along from the stored rows.
    assert_eq!(server.post("submit", pending).await.0, 200);
    server.wait_status("pending", S).await;
    assert_eq!(bank.count("pending", "TransIn"), 1);
}

#[tokio::test]
async fn saga_empty_urls_count_as_success() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let body = json!({
        "gid": "empty-url", "trans_type": "saga", "wait_result": true,
        "steps": [{"action": "", "compensate": ""}, {"action": bank.url("TransIn"), "compensate": ""}],
        "payloads": ["", "{}"],
    });
    assert_eq!(server.post("submit", body).await.0, 200);
    assert_eq!(server.state("empty-url").await, (S.to_owned(), rows(&[P, S, P, S])));
    assert_eq!(bank.routes("empty-url"), ["TransIn"]);
}

#[tokio::test]
async fn saga_error_backs_off_with_the_retry_interval_and_succeeds_later() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransIn", &[Reply::Error]);
    let mut body = transfer_saga("retry-error", &bank);
    body["retry_interval"] = json!(150);
    server.post("submit", body).await;
    let trans = server.wait_parked("retry-error").await;
    assert_eq!(trans["next_cron_interval"], 300);
    assert_eq!(server.advance_and_tick(200).await, 0, "backed off past +200 s");
    assert_eq!(server.advance_and_tick(160).await, 1);
    assert_eq!(server.state("retry-error").await, (S.to_owned(), rows(&[P, S, P, S])));
}

#[tokio::test]
async fn backoff_is_capped_by_max_retry_interval() {
    let server = TestServer::start_with(|c| c.max_retry_interval = 40).await;
    let bank = Bank::start().await;
    bank.script("TransIn", &[Reply::Error; 5]);
    server.post("submit", transfer_saga("capped", &bank)).await;
    let mut intervals = vec![server.wait_parked("capped").await["next_cron_interval"].clone()];
    for _ in 0..3 {
        server.advance_and_tick(41).await;
        intervals.push(server.transaction("capped").await["next_cron_interval"].clone());
    }
    assert_eq!(intervals, [json!(20), json!(40), json!(40), json!(40)]);
}

#[tokio::test]
async fn saga_timeout_routes_into_compensation() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransOut", &[Reply::Ongoing]);
    let mut body = transfer_saga("timeout", &bank);
    body["timeout_to_fail"] = json!(1800);
    server.post("submit", body).await;
    server.wait_parked("timeout").await;
    assert_eq!(server.advance_and_tick(3600).await, 1);
    let (status, branches) = server.state("timeout").await;
    assert_eq!((status.as_str(), branches), (F, rows(&[S, P, P, P])));
    assert_eq!(
        server.transaction("timeout").await["rollback_reason"],
        "Timeout after 1800 seconds"
    );
    assert_eq!(bank.count("timeout", "TransIn"), 0);
}

#[tokio::test]
async fn saga_request_timeout_applies_per_transaction() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransOut", &[Reply::Slow(1500)]);
    let mut body = transfer_saga("slow-ok", &bank);
    body["request_timeout"] = json!(5);
    body["wait_result"] = json!(true);
    assert_eq!(server.post("submit", body).await.0, 200);

    let server = TestServer::start_with(|c| c.request_timeout = 1).await;
    bank.script("TransOut", &[Reply::Slow(1500)]);
    let mut body = transfer_saga("slow-timeout", &bank);
    body["wait_result"] = json!(true);
    let (code, reply) = server.post("submit", body).await;
    assert_eq!(code, 425, "a timeout is an unknown outcome, not a failure: {reply}");
    assert_eq!(
        server.state("slow-timeout").await,
        ("submitted".to_owned(), rows(&[P, P, P, P]))
    );
}

#[tokio::test]
async fn wait_result_reports_success_failure_and_ongoing() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let mut ok = transfer_saga("wait-ok", &bank);
    ok["wait_result"] = json!(true);
    assert_eq!(server.post("submit", ok).await, (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("wait-ok").await.0, S, "finished before the answer");

    bank.script("TransIn", &[Reply::Failure]);
    let mut failed = transfer_saga("wait-failed", &bank);
    failed["wait_result"] = json!(true);
    let (code, reply) = server.post("submit", failed).await;
    assert_eq!(code, 409);
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or_default()
            .contains("business refused"),
        "{reply}"
    );

    bank.script("TransOut", &[Reply::Ongoing]);
    let mut ongoing = transfer_saga("wait-ongoing", &bank);
    ongoing["wait_result"] = json!(true);
    let (code, reply) = server.post("submit", ongoing).await;
    assert_eq!((code, reply["dtm_result"].clone()), (425, json!("ONGOING")));
    server.advance_and_tick(11).await;
    assert_eq!(server.state("wait-ongoing").await.0, S);
}

#[tokio::test]
async fn branch_headers_reach_branches_also_on_retries() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransIn", &[Reply::Error]);
    let mut body = transfer_saga("headers", &bank);
    body["branch_headers"] = json!({"x-tenant": "blue", "authorization": "Bearer t"});
    server.post("submit", body).await;
    server.wait_parked("headers").await;
    server.advance_and_tick(21).await;
    let calls: Vec<_> = bank.calls().into_iter().filter(|c| c.gid == "headers").collect();
    assert_eq!(calls.len(), 3);
    for call in calls {
        assert_eq!(call.headers["x-tenant"], "blue");
        assert_eq!(call.headers["authorization"], "Bearer t");
        assert_eq!(call.headers["content-type"], "application/json");
    }
}

#[tokio::test]
async fn retry_limit_allows_that_many_immediate_retries() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransIn", &[Reply::Error, Reply::Error, Reply::Error]);
    let mut body = transfer_saga("limit-yes", &bank);
    body["retry_limit"] = json!(3);
    body["wait_result"] = json!(true);
    assert_eq!(server.post("submit", body).await.0, 200);
    assert_eq!(bank.count("limit-yes", "TransIn"), 4);

    bank.script("TransIn", &[Reply::Error; 2]);
    let mut body = transfer_saga("limit-no", &bank);
    body["retry_limit"] = json!(1);
    body["wait_result"] = json!(true);
    assert_eq!(server.post("submit", body).await.0, 409);
    assert_eq!(server.state("limit-no").await, (F.to_owned(), rows(&[S, S, S, P])));
    assert_eq!(
        server.transaction("limit-no").await["rollback_reason"],
        "RetryCount is greater than RetryLimit, RetryLimit: 1"
    );
}

fn concurrent_saga(gid: &str, bank: &Bank, orders: serde_json::Value) -> serde_json::Value {
    let custom = json!({"concurrent": true, "orders": orders}).to_string();
    json!({
        "gid": gid, "trans_type": "saga", "custom_data": custom, "concurrent": true,
        "steps": [
            {"action": bank.url("A1"), "compensate": bank.url("C1")},
            {"action": bank.url("A2"), "compensate": bank.url("C2")},
            {"action": bank.url("A3"), "compensate": bank.url("C3")},
        ],
        "payloads": ["{}", "{}", "{}"],
    })
}

#[tokio::test]
async fn concurrent_saga_runs_independent_steps_together_and_respects_orders() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    // Steps 0 and 1 are independent; step 2 waits for both.
    let mut body = concurrent_saga("con", &bank, json!({"2": [0, 1]}));
    body["wait_result"] = json!(true);
    assert_eq!(server.post("submit", body).await.0, 200);
    assert_eq!(server.state("con").await, (S.to_owned(), rows(&[P, S, P, S, P, S])));
    let routes = bank.routes("con");
    assert_eq!(routes.len(), 3);
    assert_eq!(routes[2], "A3", "the dependent step runs last: {routes:?}");
}

#[tokio::test]
async fn concurrent_saga_rollback_only_compensates_steps_that_may_have_run() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("A1", &[Reply::Failure]);
    // Step 1 after 0, step 2 after 1: a failing first step means the others never ran.
    let mut body = concurrent_saga("con-order", &bank, json!({"1": [0], "2": [1]}));
    body["wait_result"] = json!(true);
    assert_eq!(server.post("submit", body).await.0, 409);
    assert_eq!(
        server.state("con-order").await,
        (F.to_owned(), rows(&[S, F, P, P, P, P]))
    );
    assert_eq!(bank.routes("con-order"), ["A1", "C1"]);
}

#[tokio::test]
async fn concurrent_saga_compensates_dependants_before_their_prerequisites() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("A3", &[Reply::Failure]);
    let mut body = concurrent_saga("con-reverse", &bank, json!({"1": [0], "2": [1]}));
    body["wait_result"] = json!(true);
    assert_eq!(server.post("submit", body).await.0, 409);
    assert_eq!(
        server.state("con-reverse").await,
        (F.to_owned(), rows(&[S, S, S, S, S, F]))
    );
    assert_eq!(bank.routes("con-reverse"), ["A1", "A2", "A3", "C3", "C2", "C1"]);
}

#[tokio::test]
async fn concurrent_saga_with_an_ongoing_compensation_finishes_on_a_later_pass() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("A2", &[Reply::Failure]);
    bank.script("C1", &[Reply::Ongoing]);
    let body = concurrent_saga("con-comp-ongoing", &bank, json!({}));
    server.post("submit", body).await;
    let trans = server.wait_parked("con-comp-ongoing").await;
    assert_eq!(trans["status"], "aborting");
    server.advance_and_tick(11).await;
    assert_eq!(
        server.state("con-comp-ongoing").await,
        (F.to_owned(), rows(&[S, S, S, F, S, S]))
    );
}

#[tokio::test]
async fn concurrent_saga_committed_ongoing_completes_later() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("A1", &[Reply::Ongoing]);
    server
        .post("submit", concurrent_saga("con-ongoing", &bank, json!({})))
        .await;
    server.wait_parked("con-ongoing").await;
    assert_eq!(server.state("con-ongoing").await.1, rows(&[P, P, P, S, P, S]));
    server.advance_and_tick(11).await;
    assert_eq!(
        server.state("con-ongoing").await,
        (S.to_owned(), rows(&[P, S, P, S, P, S]))
    );
    assert_eq!(
        bank.count("con-ongoing", "A2"),
        1,
        "succeeded steps are not called again"
    );
}
