//! XA scenarios (DTM's xa checklist): the test plays the application and the resource managers
//! (prepare, registerBranch with the phase-2 URL, submit or abort) against a real server.

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

fn branch(gid: &str, bank: &Bank, branch_id: &str, route: &str) -> Value {
    json!({"gid": gid, "trans_type": "xa", "branch_id": branch_id, "url": bank.url(route)})
}

/// Prepares an xa and registers XaOut as 01 and XaIn as 02.
async fn prepare_transfer(server: &TestServer, bank: &Bank, gid: &str) {
    let (code, reply) = server.post("prepare", json!({"gid": gid, "trans_type": "xa"})).await;
    assert_eq!((code, reply), (200, json!({"dtm_result": "SUCCESS"})));
    for (id, route) in [("01", "XaOut"), ("02", "XaIn")] {
        let (code, reply) = server.post("registerBranch", branch(gid, bank, id, route)).await;
        assert_eq!((code, reply), (200, json!({"dtm_result": "SUCCESS"})));
    }
    assert_eq!(server.state(gid).await, state(P, &[P, P, P, P]));
}

/// (route, branch_id, op, method, body) of every call for a gid.
fn seen(bank: &Bank, gid: &str) -> Vec<(String, String, String, String, String)> {
    bank.calls_for(gid)
        .into_iter()
        .map(|c| (c.route, c.branch_id, c.op, c.method.to_string(), c.body))
        .collect()
}

fn call(route: &str, branch_id: &str, op: &str) -> (String, String, String, String, String) {
    (
        route.to_owned(),
        branch_id.to_owned(),
        op.to_owned(),
        "POST".to_owned(),
        String::new(),
    )
}

#[tokio::test]
async fn xa_normal_commits_first_to_last_with_post() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "xa-normal").await;
    let (code, body) = server
        .post("submit", json!({"gid": "xa-normal", "trans_type": "xa"}))
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    // Rows: rollback01, commit01, rollback02, commit02.
    assert_eq!(server.wait_status("xa-normal", S).await, state(S, &[P, S, P, S]));
    assert_eq!(
        seen(&bank, "xa-normal"),
        [call("XaOut", "01", "commit"), call("XaIn", "02", "commit")],
        "POST even with an empty body"
    );
    assert!(bank.calls_for("xa-normal").iter().all(|c| c.trans_type == "xa"));
    let (_, query) = server.get("query?gid=xa-normal").await;
    let layout: Vec<(&str, &str)> = query["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["branch_id"].as_str().unwrap(), b["op"].as_str().unwrap()))
        .collect();
    assert_eq!(
        layout,
        [
            ("01", "rollback"),
            ("01", "commit"),
            ("02", "rollback"),
            ("02", "commit")
        ]
    );
    assert_eq!(server.advance_and_tick(3600).await, 0);
}

#[tokio::test]
async fn xa_branch_data_is_sent_as_the_body() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "xa-data", "trans_type": "xa"}))
        .await;
    let mut body = branch("xa-data", &bank, "01", "XaOut");
    body["data"] = json!("{\"amount\":30}");
    server.post("registerBranch", body).await;
    let (code, _) = server
        .post(
            "submit",
            json!({"gid": "xa-data", "trans_type": "xa", "wait_result": true}),
        )
        .await;
    assert_eq!(code, 200);
    let calls = bank.calls_for("xa-data");
    assert_eq!(
        (calls[0].method.as_str(), calls[0].body.as_str()),
        ("POST", "{\"amount\":30}")
    );
}

#[tokio::test]
async fn xa_abort_rolls_back_first_to_last() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "xa-abort").await;
    let (code, body) = server
        .post(
            "abort",
            json!({"gid": "xa-abort", "trans_type": "xa", "rollback_reason": "local error"}),
        )
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.wait_status("xa-abort", F).await, state(F, &[S, P, S, P]));
    assert_eq!(
        seen(&bank, "xa-abort"),
        [call("XaOut", "01", "rollback"), call("XaIn", "02", "rollback")]
    );
    assert_eq!(server.transaction("xa-abort").await["rollback_reason"], "local error");
}

#[tokio::test]
async fn xa_rollback_with_only_the_first_branch_registered() {
    // XaRollback: the second branch failed locally before registering.
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "xa-rb", "trans_type": "xa"}))
        .await;
    server
        .post("registerBranch", branch("xa-rb", &bank, "01", "XaOut"))
        .await;
    server.post("abort", json!({"gid": "xa-rb", "trans_type": "xa"})).await;
    assert_eq!(server.wait_status("xa-rb", F).await, state(F, &[S, P]));
    assert_eq!(seen(&bank, "xa-rb"), [call("XaOut", "01", "rollback")]);
}

#[tokio::test]
async fn xa_timeout_aborts() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    // XaTimeout: no branch registered yet.
    server
        .post("prepare", json!({"gid": "xa-timeout", "trans_type": "xa"}))
        .await;
    prepare_transfer(&server, &bank, "xa-timeout2").await;
    assert_eq!(server.advance_and_tick(30).await, 0);
    assert_eq!(server.advance_and_tick(6).await, 2);
    assert_eq!(server.state("xa-timeout").await, state(F, &[]));
    assert_eq!(server.state("xa-timeout2").await, state(F, &[S, P, S, P]));
    for gid in ["xa-timeout", "xa-timeout2"] {
        assert_eq!(
            server.transaction(gid).await["rollback_reason"],
            "Timeout after 35 seconds"
        );
    }
    assert_eq!(
        seen(&bank, "xa-timeout2"),
        [call("XaOut", "01", "rollback"), call("XaIn", "02", "rollback")]
    );
    // A resource manager registering late is refused.
    let (code, body) = server
        .post("registerBranch", branch("xa-timeout", &bank, "01", "XaOut"))
        .await;
    assert_eq!(code, 409, "{body}");
}

#[tokio::test]
async fn xa_commit_ongoing_once_stays_submitted_then_succeeds() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("XaOut", &[Reply::Ongoing]);
    prepare_transfer(&server, &bank, "xa-ongoing").await;
    server
        .post("submit", json!({"gid": "xa-ongoing", "trans_type": "xa"}))
        .await;
    let trans = server.wait_parked("xa-ongoing").await;
    assert_eq!(trans["status"], "submitted");
    assert_eq!(trans["next_cron_interval"], 10, "ongoing does not back off");
    assert_eq!(server.state("xa-ongoing").await.1, rows(&[P, P, P, P]));
    assert_eq!(seen(&bank, "xa-ongoing"), [call("XaOut", "01", "commit")]);
    assert_eq!(server.advance_and_tick(5).await, 0);
    assert_eq!(server.advance_and_tick(6).await, 1);
    assert_eq!(server.state("xa-ongoing").await, state(S, &[P, S, P, S]));
    assert_eq!(
        seen(&bank, "xa-ongoing"),
        [
            call("XaOut", "01", "commit"),
            call("XaOut", "01", "commit"),
            call("XaIn", "02", "commit")
        ]
    );
}

#[tokio::test]
async fn xa_commit_error_backs_off_and_is_retried() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("XaIn", &[Reply::Error, Reply::Failure]);
    prepare_transfer(&server, &bank, "xa-err").await;
    server
        .post("submit", json!({"gid": "xa-err", "trans_type": "xa"}))
        .await;
    let trans = server.wait_parked("xa-err").await;
    assert_eq!(trans["next_cron_interval"], 20);
    assert_eq!(server.state("xa-err").await, state("submitted", &[P, S, P, P]));
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert_eq!(server.transaction("xa-err").await["next_cron_interval"], 40);
    assert_eq!(server.advance_and_tick(41).await, 1);
    assert_eq!(server.state("xa-err").await, state(S, &[P, S, P, S]));
    assert_eq!(bank.count("xa-err", "XaOut"), 1);
    assert_eq!(bank.count("xa-err", "XaIn"), 3);
}

#[tokio::test]
async fn xa_submit_with_wait_result_reports_an_unfinished_commit() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("XaIn", &[Reply::Error]);
    prepare_transfer(&server, &bank, "xa-wait").await;
    let (code, body) = server
        .post(
            "submit",
            json!({"gid": "xa-wait", "trans_type": "xa", "wait_result": true}),
        )
        .await;
    assert_ne!(code, 200, "{body}");
    assert_eq!(server.state("xa-wait").await, state("submitted", &[P, S, P, P]));
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert_eq!(server.state("xa-wait").await, state(S, &[P, S, P, S]));
}

#[tokio::test]
async fn xa_register_xa_branch_alias_works() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "xa-alias", "trans_type": "xa"}))
        .await;
    let (code, body) = server
        .post("registerXaBranch", branch("xa-alias", &bank, "01", "XaOut"))
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    // Registering again (a retried request) is harmless.
    let (code, _) = server
        .post("registerXaBranch", branch("xa-alias", &bank, "01", "XaOut"))
        .await;
    assert_eq!(code, 200);
    let (code, body) = server
        .post("registerXaBranch", branch("xa-alias", &bank, "01", "Elsewhere"))
        .await;
    assert_eq!(code, 409, "{body}");
    server
        .post("submit", json!({"gid": "xa-alias", "trans_type": "xa"}))
        .await;
    assert_eq!(server.wait_status("xa-alias", S).await, state(S, &[P, S]));
    assert_eq!(seen(&bank, "xa-alias"), [call("XaOut", "01", "commit")]);
}

#[tokio::test]
async fn xa_register_branch_needs_an_http_url() {
    let (server, _bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "xa-bad", "trans_type": "xa"}))
        .await;
    let (code, body) = server
        .post(
            "registerBranch",
            json!({"gid": "xa-bad", "trans_type": "xa", "branch_id": "01", "url": "localhost:50051/xa"}),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server
        .post(
            "registerBranch",
            json!({"gid": "xa-bad", "trans_type": "saga", "branch_id": "01", "url": "http://x/y"}),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(server.state("xa-bad").await, state(P, &[]));
}

#[tokio::test]
async fn xa_abort_with_wait_result_answers_success_once_rolled_back() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    prepare_transfer(&server, &bank, "xa-abort-wait").await;
    let (code, body) = server
        .post(
            "abort",
            json!({"gid": "xa-abort-wait", "trans_type": "xa", "wait_result": true}),
        )
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("xa-abort-wait").await, state(F, &[S, P, S, P]));
}

#[tokio::test]
async fn xa_tcc_branch_cannot_be_registered_into_an_xa() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server
        .post("prepare", json!({"gid": "xa-mode", "trans_type": "xa"}))
        .await;
    let tcc = json!({
        "gid": "xa-mode", "trans_type": "tcc", "branch_id": "01", "data": "",
        "confirm": bank.url("Confirm"), "cancel": bank.url("Cancel"),
    });
    let (code, body) = server.post("registerBranch", tcc).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(server.state("xa-mode").await, state(P, &[]));
}
