//! TCC scenarios (DTM's tcc checklist): the test plays the client (prepare, registerBranch, the
//! try calls it would make itself, submit or abort) against a real server and real branches.

mod common;

use common::{Bank, Reply, TestServer};
use serde_json::{Value, json};

const P: &str = "prepared";
const S: &str = "succeed";
const F: &str = "failed";

fn rows(statuses: &[&str]) -> Vec<String> {
    statuses.iter().map(|s| s.to_string()).collect()
}

fn state(status: &str, branches: &[&str]) -> (String, Vec<String>) {
    (status.to_owned(), rows(branches))
}

fn branch(gid: &str, bank: &Bank, branch_id: &str, name: &str, amount: u32) -> Value {
    json!({
        "gid": gid,
        "trans_type": "tcc",
        "branch_id": branch_id,
        "data": format!("{{\"amount\":{amount}}}"),
        "confirm": bank.url(&format!("{name}Confirm")),
        "cancel": bank.url(&format!("{name}Cancel")),
    })
}

/// Prepares a tcc and registers TransOut as 01 and TransIn as 02.
async fn prepare_transfer(server: &TestServer, bank: &Bank, gid: &str, options: Value) {
    let mut body = json!({"gid": gid, "trans_type": "tcc"});
    if let (Value::Object(map), Value::Object(more)) = (&mut body, options) {
        map.extend(more);
    }
    let (code, reply) = server.post("prepare", body).await;
    assert_eq!((code, reply), (200, json!({"dtm_result": "SUCCESS"})));
    for (id, name, amount) in [("01", "TransOut", 30), ("02", "TransIn", 40)] {
        let (code, reply) = server.post("registerBranch", branch(gid, bank, id, name, amount)).await;
        assert_eq!((code, reply), (200, json!({"dtm_result": "SUCCESS"})));
    }
    assert_eq!(server.state(gid).await, state(P, &[P, P, P, P]));
}

fn message(body: &Value) -> String {
    body["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn tcc_normal_confirms_last_to_first() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-normal", json!({})).await;
    let (code, body) = server
        .post("submit", json!({"gid": "tcc-normal", "trans_type": "tcc"}))
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    // Rows: cancel01, confirm01, cancel02, confirm02.
    assert_eq!(server.wait_status("tcc-normal", S).await, state(S, &[P, S, P, S]));
    let calls = bank.calls_for("tcc-normal");
    let seen: Vec<(&str, &str, &str, &str)> = calls
        .iter()
        .map(|c| (c.route.as_str(), c.branch_id.as_str(), c.op.as_str(), c.body.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("TransInConfirm", "02", "confirm", "{\"amount\":40}"),
            ("TransOutConfirm", "01", "confirm", "{\"amount\":30}"),
        ]
    );
    for call in &calls {
        assert_eq!(call.method, "POST");
        assert_eq!(call.trans_type, "tcc");
        assert_eq!(call.gid, "tcc-normal");
    }
    let (_, query) = server.get("query?gid=tcc-normal").await;
    let layout: Vec<(&str, &str)> = query["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["branch_id"].as_str().unwrap(), b["op"].as_str().unwrap()))
        .collect();
    assert_eq!(
        layout,
        [("01", "cancel"), ("01", "confirm"), ("02", "cancel"), ("02", "confirm")]
    );
    assert_eq!(server.advance_and_tick(3600).await, 0);
}

#[tokio::test]
async fn tcc_submit_with_wait_result_answers_after_the_confirms() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-wait", json!({})).await;
    let (code, body) = server
        .post(
            "submit",
            json!({"gid": "tcc-wait", "trans_type": "tcc", "wait_result": true}),
        )
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("tcc-wait").await, state(S, &[P, S, P, S]));
}

#[tokio::test]
async fn tcc_abort_cancels_last_to_first_and_stores_the_reason() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-abort", json!({})).await;
    let reason = "url:TransIn try returned: insufficient balance FAILURE";
    let (code, body) = server
        .post(
            "abort",
            json!({"gid": "tcc-abort", "trans_type": "tcc", "rollback_reason": reason}),
        )
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.wait_status("tcc-abort", F).await, state(F, &[S, P, S, P]));
    let calls = bank.calls_for("tcc-abort");
    let seen: Vec<(&str, &str, &str, &str)> = calls
        .iter()
        .map(|c| (c.route.as_str(), c.branch_id.as_str(), c.op.as_str(), c.body.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("TransInCancel", "02", "cancel", "{\"amount\":40}"),
            ("TransOutCancel", "01", "cancel", "{\"amount\":30}"),
        ]
    );
    assert!(calls.iter().all(|c| c.method == "POST"));
    assert_eq!(server.transaction("tcc-abort").await["rollback_reason"], reason);
    // A finished tcc can be neither submitted nor aborted.
    let (code, body) = server
        .post("submit", json!({"gid": "tcc-abort", "trans_type": "tcc"}))
        .await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = server
        .post("abort", json!({"gid": "tcc-abort", "trans_type": "tcc"}))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
}

#[tokio::test]
async fn tcc_cancel_ongoing_once_stays_aborting_then_fails_on_the_next_tick() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransInCancel", &[Reply::Ongoing]);
    prepare_transfer(&server, &bank, "tcc-ongoing", json!({})).await;
    server
        .post(
            "abort",
            json!({"gid": "tcc-ongoing", "trans_type": "tcc", "rollback_reason": "try FAILURE"}),
        )
        .await;
    let trans = server.wait_parked("tcc-ongoing").await;
    assert_eq!(trans["status"], "aborting");
    assert_eq!(server.state("tcc-ongoing").await.1, rows(&[P, P, P, P]));
    assert_eq!(
        bank.routes("tcc-ongoing"),
        ["TransInCancel"],
        "stops at the first non-success"
    );
    assert_eq!(server.advance_and_tick(11).await, 1);
    assert_eq!(server.state("tcc-ongoing").await, state(F, &[S, P, S, P]));
    assert_eq!(
        bank.routes("tcc-ongoing"),
        ["TransInCancel", "TransInCancel", "TransOutCancel"]
    );
    let reason = server.transaction("tcc-ongoing").await["rollback_reason"].clone();
    assert!(reason.as_str().unwrap().contains("FAILURE"), "{reason}");
}

#[tokio::test]
async fn tcc_abort_while_aborting_is_accepted() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransInCancel", &[Reply::Error]);
    prepare_transfer(&server, &bank, "tcc-abort2", json!({})).await;
    server
        .post("abort", json!({"gid": "tcc-abort2", "trans_type": "tcc"}))
        .await;
    assert_eq!(server.wait_parked("tcc-abort2").await["status"], "aborting");
    // A second abort hurries the parked transaction along.
    let (code, body) = server
        .post("abort", json!({"gid": "tcc-abort2", "trans_type": "tcc"}))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(server.wait_status("tcc-abort2", F).await, state(F, &[S, P, S, P]));
}

#[tokio::test]
async fn tcc_timeout_aborts_and_cancels() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-timeout", json!({})).await;
    assert_eq!(server.advance_and_tick(30).await, 0);
    assert!(bank.calls_for("tcc-timeout").is_empty());
    assert_eq!(server.advance_and_tick(6).await, 1);
    assert_eq!(server.state("tcc-timeout").await, state(F, &[S, P, S, P]));
    assert_eq!(bank.routes("tcc-timeout"), ["TransInCancel", "TransOutCancel"]);
    assert_eq!(
        server.transaction("tcc-timeout").await["rollback_reason"],
        "Timeout after 35 seconds"
    );
    // The client's late submit is refused.
    let (code, body) = server
        .post("submit", json!({"gid": "tcc-timeout", "trans_type": "tcc"}))
        .await;
    assert_eq!(code, 409, "{body}");
}

#[tokio::test]
async fn tcc_custom_timeout_is_used() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-timeout2", json!({"timeout_to_fail": 300})).await;
    assert_eq!(server.advance_and_tick(100).await, 0);
    assert_eq!(server.advance_and_tick(201).await, 1);
    assert_eq!(server.state("tcc-timeout2").await, state(F, &[S, P, S, P]));
    assert_eq!(
        server.transaction("tcc-timeout2").await["rollback_reason"],
        "Timeout after 300 seconds"
    );
}

#[tokio::test]
async fn tcc_register_branch_after_submit_is_refused() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-late", json!({})).await;
    server
        .post("submit", json!({"gid": "tcc-late", "trans_type": "tcc"}))
        .await;
    server.wait_status("tcc-late", S).await;
    let (code, body) = server
        .post("registerBranch", branch("tcc-late", &bank, "03", "Fee", 1))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
    assert_eq!(server.state("tcc-late").await, state(S, &[P, S, P, S]));
    // Unknown gid.
    let (code, body) = server
        .post("registerBranch", branch("tcc-unknown", &bank, "01", "Fee", 1))
        .await;
    assert!((400..500).contains(&code), "{code} {body}");
}

#[tokio::test]
async fn tcc_register_branch_is_idempotent_and_detects_conflicts() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-dup", json!({})).await;
    let (code, body) = server
        .post("registerBranch", branch("tcc-dup", &bank, "01", "TransOut", 30))
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("tcc-dup").await.1.len(), 4, "no duplicate rows");
    let (code, body) = server
        .post("registerBranch", branch("tcc-dup", &bank, "01", "TransOut", 99))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
    let (code, body) = server
        .post("registerBranch", branch("tcc-dup", &bank, "01", "Other", 30))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(server.state("tcc-dup").await.1.len(), 4);
    // The original registration is the one confirmed.
    server
        .post("submit", json!({"gid": "tcc-dup", "trans_type": "tcc"}))
        .await;
    server.wait_status("tcc-dup", S).await;
    let out = bank
        .calls_for("tcc-dup")
        .into_iter()
        .find(|c| c.branch_id == "01")
        .unwrap();
    assert_eq!(
        (out.route.as_str(), out.body.as_str()),
        ("TransOutConfirm", "{\"amount\":30}")
    );
}

#[tokio::test]
async fn tcc_register_branch_input_errors() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "tcc-bad", "trans_type": "tcc"}))
        .await;
    let mut missing_id = branch("tcc-bad", &bank, "01", "TransOut", 30);
    missing_id["branch_id"] = json!("");
    let (code, body) = server.post("registerBranch", missing_id).await;
    assert_eq!(code, 400, "{body}");
    let mut not_string = branch("tcc-bad", &bank, "01", "TransOut", 30);
    not_string["data"] = json!({"amount": 30});
    let (code, body) = server.post("registerBranch", not_string).await;
    assert_eq!(code, 400, "{body}");
    let mut bad_url = branch("tcc-bad", &bank, "01", "TransOut", 30);
    bad_url["confirm"] = json!("etcd://grpc-host:50051/svc/Confirm");
    let (code, body) = server.post("registerBranch", bad_url).await;
    assert_eq!(code, 400, "{body}");
    assert!(message(&body).contains("confirm"), "{body}");
    assert_eq!(server.state("tcc-bad").await, state(P, &[]));
}

#[tokio::test]
async fn tcc_python_client_status_key_is_ignored() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "tcc-py", "trans_type": "tcc"}))
        .await;
    let mut body = branch("tcc-py", &bank, "01", "TransOut", 30);
    body["status"] = json!("prepared");
    let (code, reply) = server.post("registerBranch", body).await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(server.state("tcc-py").await, state(P, &[P, P]));
}

#[tokio::test]
async fn tcc_register_tcc_branch_alias_works() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "tcc-alias", "trans_type": "tcc"}))
        .await;
    let (code, body) = server
        .post("registerTccBranch", branch("tcc-alias", &bank, "01", "TransOut", 30))
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    server
        .post("submit", json!({"gid": "tcc-alias", "trans_type": "tcc"}))
        .await;
    assert_eq!(server.wait_status("tcc-alias", S).await, state(S, &[P, S]));
    assert_eq!(bank.routes("tcc-alias"), ["TransOutConfirm"]);
}

#[tokio::test]
async fn tcc_branch_headers_reach_confirm_calls_also_on_retry() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransInConfirm", &[Reply::Error]);
    prepare_transfer(
        &server,
        &bank,
        "tcc-headers",
        json!({"branch_headers": {"X-Tenant": "acme", "Authorization": "Bearer t0k"}}),
    )
    .await;
    server
        .post("submit", json!({"gid": "tcc-headers", "trans_type": "tcc"}))
        .await;
    assert_eq!(server.wait_parked("tcc-headers").await["status"], "submitted");
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert_eq!(server.state("tcc-headers").await, state(S, &[P, S, P, S]));
    let calls = bank.calls_for("tcc-headers");
    assert_eq!(
        bank.routes("tcc-headers"),
        ["TransInConfirm", "TransInConfirm", "TransOutConfirm"]
    );
    for call in &calls {
        assert_eq!(call.headers["x-tenant"], "acme", "{}", call.route);
        assert_eq!(call.headers["authorization"], "Bearer t0k");
    }
    // Sent on every call, never shown back (issue 11): names kept, values redacted.
    let trans = server.transaction("tcc-headers").await;
    assert_eq!(trans["branch_headers"]["X-Tenant"], "<redacted>");
    assert!(!trans.to_string().contains("t0k"), "{trans}");
}

#[tokio::test]
async fn tcc_confirm_failure_is_retried_not_terminal() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransInConfirm", &[Reply::Failure]);
    prepare_transfer(&server, &bank, "tcc-cfail", json!({})).await;
    server
        .post("submit", json!({"gid": "tcc-cfail", "trans_type": "tcc"}))
        .await;
    let trans = server.wait_parked("tcc-cfail").await;
    assert_eq!(trans["status"], "submitted");
    assert_eq!(trans["next_cron_interval"], 20);
    assert_eq!(server.state("tcc-cfail").await.1, rows(&[P, P, P, P]));
    assert_eq!(bank.routes("tcc-cfail"), ["TransInConfirm"]);
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert_eq!(server.state("tcc-cfail").await, state(S, &[P, S, P, S]));
    assert_eq!(
        bank.routes("tcc-cfail"),
        ["TransInConfirm", "TransInConfirm", "TransOutConfirm"]
    );
}

#[tokio::test]
async fn tcc_confirm_resumes_where_it_stopped() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransOutConfirm", &[Reply::Error]);
    prepare_transfer(&server, &bank, "tcc-resume", json!({})).await;
    server
        .post("submit", json!({"gid": "tcc-resume", "trans_type": "tcc"}))
        .await;
    assert_eq!(server.wait_parked("tcc-resume").await["status"], "submitted");
    assert_eq!(server.state("tcc-resume").await.1, rows(&[P, P, P, S]));
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert_eq!(server.state("tcc-resume").await, state(S, &[P, S, P, S]));
    assert_eq!(
        bank.count("tcc-resume", "TransInConfirm"),
        1,
        "a confirmed branch is not confirmed again"
    );
    assert_eq!(bank.count("tcc-resume", "TransOutConfirm"), 2);
}

#[tokio::test]
async fn tcc_without_branches_succeeds_or_fails_at_once() {
    let (server, _bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "tcc-empty", "trans_type": "tcc"}))
        .await;
    server
        .post("submit", json!({"gid": "tcc-empty", "trans_type": "tcc"}))
        .await;
    assert_eq!(server.wait_status("tcc-empty", S).await, state(S, &[]));
    server
        .post("prepare", json!({"gid": "tcc-empty2", "trans_type": "tcc"}))
        .await;
    server
        .post("abort", json!({"gid": "tcc-empty2", "trans_type": "tcc"}))
        .await;
    assert_eq!(server.wait_status("tcc-empty2", F).await, state(F, &[]));
}

#[tokio::test]
async fn tcc_submit_without_prepare_is_refused() {
    let (server, _bank) = (TestServer::start().await, Bank::start().await);
    let (code, body) = server
        .post("submit", json!({"gid": "tcc-none", "trans_type": "tcc"}))
        .await;
    assert!((400..500).contains(&code), "{code} {body}");
    assert_eq!(server.transaction("tcc-none").await, Value::Null);
}

#[tokio::test]
async fn tcc_abort_with_wait_result_answers_success_once_rolled_back() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-abort-wait", json!({})).await;
    let (code, body) = server
        .post(
            "abort",
            json!({"gid": "tcc-abort-wait", "trans_type": "tcc", "wait_result": true}),
        )
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("tcc-abort-wait").await, state(F, &[S, P, S, P]));
    // A cancel still ongoing: the abort cannot report success yet.
    bank.script("TransInCancel", &[Reply::Ongoing]);
    prepare_transfer(&server, &bank, "tcc-abort-wait2", json!({"wait_result": true})).await;
    let (code, body) = server
        .post("abort", json!({"gid": "tcc-abort-wait2", "trans_type": "tcc"}))
        .await;
    assert_eq!(code, 425, "{body}");
    assert_eq!(body["dtm_result"], "ONGOING");
    assert_eq!(server.state("tcc-abort-wait2").await, state("aborting", &[P, P, P, P]));
    assert_eq!(server.advance_and_tick(11).await, 1);
    assert_eq!(server.state("tcc-abort-wait2").await, state(F, &[S, P, S, P]));
}

#[tokio::test]
async fn tcc_requests_naming_another_mode_are_refused() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "tcc-mode", json!({})).await;
    // xa rows would never be driven by a tcc's confirm/cancel phase.
    let (code, body) = server
        .post(
            "registerBranch",
            json!({"gid": "tcc-mode", "trans_type": "xa", "branch_id": "03", "url": bank.url("Xa")}),
        )
        .await;
    assert_eq!(code, 409, "{body}");
    assert!(message(&body).contains("tcc"), "{body}");
    let workflow_step = json!({
        "gid": "tcc-mode", "trans_type": "workflow", "branch_id": "03", "op": "action",
        "status": "succeed", "data": "",
    });
    let (code, body) = server.post("registerBranch", workflow_step).await;
    assert_eq!(code, 409, "{body}");
    // A workflow submit would mark it succeed without confirming anything.
    let (code, body) = server
        .post(
            "submit",
            json!({"gid": "tcc-mode", "trans_type": "workflow", "req_extra": {"status": "succeed"}}),
        )
        .await;
    assert_eq!(code, 409, "{body}");
    // A msg prepared under the same gid would never be delivered.
    let msg = json!({
        "gid": "tcc-mode", "trans_type": "msg",
        "steps": [{"action": bank.url("Notify")}], "payloads": ["{}"],
    });
    let (code, body) = server.post("prepare", msg.clone()).await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = server.post("submit", msg).await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = server
        .post("abort", json!({"gid": "tcc-mode", "trans_type": "xa"}))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(server.state("tcc-mode").await, state(P, &[P, P, P, P]));
    assert!(bank.calls_for("tcc-mode").is_empty());
    // The right mode still works.
    server
        .post("submit", json!({"gid": "tcc-mode", "trans_type": "tcc"}))
        .await;
    assert_eq!(server.wait_status("tcc-mode", S).await, state(S, &[P, S, P, S]));
}

#[tokio::test]
async fn tcc_submitted_never_times_out_into_a_rollback() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransInConfirm", &[Reply::Error; 3]);
    prepare_transfer(&server, &bank, "tcc-late-confirm", json!({})).await;
    server
        .post("submit", json!({"gid": "tcc-late-confirm", "trans_type": "tcc"}))
        .await;
    assert_eq!(server.wait_parked("tcc-late-confirm").await["status"], "submitted");
    // Well past the 35 s timeout: a committed tcc keeps confirming, it never cancels.
    for seconds in [21, 41, 81] {
        assert_eq!(server.advance_and_tick(seconds).await, 1);
    }
    assert_eq!(server.state("tcc-late-confirm").await, state(S, &[P, S, P, S]));
    assert!(bank.routes("tcc-late-confirm").iter().all(|r| r.ends_with("Confirm")));
    assert!(
        server
            .transaction("tcc-late-confirm")
            .await
            .get("rollback_reason")
            .is_none()
    );
}
