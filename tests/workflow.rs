//! Workflow scenarios: the server stores the client's progress and resumes a workflow left
//! `prepared` by calling its resume URL. The test plays the workflow client.

mod common;

use base64::Engine as _;
use common::{Bank, Reply, TestServer};
use serde_json::{Value, json};

const S: &str = "succeed";
const F: &str = "failed";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The prepareWorkflow body the Go SDK sends.
fn workflow(gid: &str, bank: &Bank) -> Value {
    json!({
        "gid": gid,
        "trans_type": "workflow",
        "protocol": "http",
        "query_prepared": bank.url("Resume"),
        "custom_data": json!({"name": "transfer-wf", "data": b64("{\"amount\":30}")}).to_string(),
    })
}

fn progress(gid: &str, branch_id: &str, op: &str, status: &str, data: &str) -> Value {
    json!({
        "gid": gid,
        "trans_type": "workflow",
        "branch_id": branch_id,
        "op": op,
        "status": status,
        "data": data,
    })
}

fn finish(gid: &str, extra: Value) -> Value {
    json!({"gid": gid, "trans_type": "workflow", "req_extra": extra})
}

fn message(body: &Value) -> String {
    body["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn prepare_workflow_creates_it_prepared_and_returns_no_progress() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (code, body) = server.post("prepareWorkflow", workflow("wf-new", &bank)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["transaction"]["gid"], "wf-new");
    assert_eq!(body["transaction"]["trans_type"], "workflow");
    assert_eq!(body["transaction"]["status"], "prepared");
    assert_eq!(body["transaction"]["query_prepared"], bank.url("Resume"));
    assert_eq!(body["progresses"], json!([]));
    assert_eq!(server.state("wf-new").await, ("prepared".to_owned(), vec![]));
    assert!(
        bank.calls_for("wf-new").is_empty(),
        "the server does not run the workflow itself"
    );
}

#[tokio::test]
async fn registered_progress_is_returned_by_the_next_prepare_workflow() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepareWorkflow", workflow("wf-progress", &bank)).await;
    for body in [
        progress("wf-progress", "01", "action", "succeed", "{\"balance\":70}"),
        progress("wf-progress", "02", "action", "failed", "insufficient balance"),
        progress("wf-progress", "01", "rollback", "succeed", ""),
    ] {
        let (code, reply) = server.post("registerBranch", body).await;
        assert_eq!((code, reply), (200, json!({"dtm_result": "SUCCESS"})));
    }
    let (code, body) = server.post("prepareWorkflow", workflow("wf-progress", &bank)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["transaction"]["status"], "prepared");
    let progresses: Vec<(String, String, String, String)> = body["progresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["branch_id"].as_str().unwrap().to_owned(),
                p["op"].as_str().unwrap().to_owned(),
                p["status"].as_str().unwrap().to_owned(),
                p["bin_data"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("01", "action", "succeed", b64("{\"balance\":70}")),
        ("02", "action", "failed", b64("insufficient balance")),
        ("01", "rollback", "succeed", String::new()),
    ]
    .map(|(a, b, c, d)| (a.to_owned(), b.to_owned(), c.to_owned(), d));
    assert_eq!(progresses, expected);
    assert_eq!(
        server.state("wf-progress").await,
        (
            "prepared".to_owned(),
            ["succeed", "failed", "succeed"].map(str::to_owned).to_vec()
        )
    );
    // The same progress recorded again is a retried request; different content is a conflict.
    let (code, _) = server
        .post(
            "registerBranch",
            progress("wf-progress", "01", "action", "succeed", "{\"balance\":70}"),
        )
        .await;
    assert_eq!(code, 200);
    let (code, body) = server
        .post(
            "registerBranch",
            progress("wf-progress", "01", "action", "failed", "boom"),
        )
        .await;
    assert_eq!(code, 409, "{body}");
}

#[tokio::test]
async fn submit_succeed_stores_the_result() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepareWorkflow", workflow("wf-ok", &bank)).await;
    server
        .post("registerBranch", progress("wf-ok", "01", "action", "succeed", "done"))
        .await;
    let result = b64("{\"receipt\":42}");
    let (code, body) = server
        .post(
            "submit",
            finish("wf-ok", json!({"status": "succeed", "result": result})),
        )
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("wf-ok").await, (S.to_owned(), vec!["succeed".to_owned()]));
    let trans = server.transaction("wf-ok").await;
    assert_eq!(trans["result"], result);
    assert!(trans.get("finish_time").is_some(), "{trans}");
    // A client replaying the workflow sees the final state and its result.
    let (code, body) = server.post("prepareWorkflow", workflow("wf-ok", &bank)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["transaction"]["status"], S);
    assert_eq!(body["transaction"]["result"], result);
    // Submitting the same outcome again is idempotent; the opposite one is refused.
    let (code, _) = server
        .post(
            "submit",
            finish("wf-ok", json!({"status": "succeed", "result": result})),
        )
        .await;
    assert_eq!(code, 200);
    let (code, body) = server
        .post("submit", finish("wf-ok", json!({"status": "failed"})))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
    // Finished: never resumed.
    assert_eq!(server.advance_and_tick(3600).await, 0);
    assert!(bank.calls_for("wf-ok").is_empty());
}

#[tokio::test]
async fn submit_failed_stores_the_rollback_reason() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepareWorkflow", workflow("wf-fail", &bank)).await;
    server
        .post(
            "registerBranch",
            progress("wf-fail", "01", "action", "failed", "insufficient balance"),
        )
        .await;
    let (code, body) = server
        .post(
            "submit",
            finish(
                "wf-fail",
                json!({"status": "failed", "rollback_reason": "insufficient balance"}),
            ),
        )
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("wf-fail").await, (F.to_owned(), vec!["failed".to_owned()]));
    let trans = server.transaction("wf-fail").await;
    assert_eq!(trans["rollback_reason"], "insufficient balance");
    assert!(trans.get("rollback_time").is_some(), "{trans}");
}

#[tokio::test]
async fn prepared_workflow_is_resumed_after_the_retry_interval() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepareWorkflow", workflow("wf-resume", &bank)).await;
    assert_eq!(server.advance_and_tick(5).await, 0);
    assert!(bank.calls_for("wf-resume").is_empty());
    assert_eq!(server.advance_and_tick(6).await, 1);
    let calls = bank.calls_for("wf-resume");
    assert_eq!(calls.len(), 1);
    let resume = &calls[0];
    assert_eq!(resume.route, "Resume");
    assert_eq!(resume.method, "POST");
    assert_eq!(
        (
            resume.trans_type.as_str(),
            resume.branch_id.as_str(),
            resume.op.as_str()
        ),
        ("workflow", "00", "transfer-wf")
    );
    assert_eq!(resume.body, "{\"amount\":30}");
    assert_eq!(
        server.state("wf-resume").await.0,
        "prepared",
        "the client decides the outcome"
    );
    // Resumed again every interval while still prepared.
    assert_eq!(server.advance_and_tick(11).await, 1);
    assert_eq!(bank.count("wf-resume", "Resume"), 2);
    // The resumed client finishes it; no more resumes.
    server
        .post("submit", finish("wf-resume", json!({"status": "succeed"})))
        .await;
    assert_eq!(server.advance_and_tick(3600).await, 0);
    assert_eq!(bank.count("wf-resume", "Resume"), 2);
    assert_eq!(server.state("wf-resume").await.0, S);
}

#[tokio::test]
async fn resume_uses_the_custom_retry_interval_and_get_without_input() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let mut body = workflow("wf-get", &bank);
    body["custom_data"] = json!({"name": "no-input"}).to_string().into();
    body["retry_interval"] = json!(30);
    let (code, reply) = server.post("prepareWorkflow", body).await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(server.advance_and_tick(11).await, 0);
    assert_eq!(server.advance_and_tick(20).await, 1);
    let resume = &bank.calls_for("wf-get")[0];
    assert_eq!(
        (resume.method.as_str(), resume.op.as_str(), resume.body.as_str()),
        ("GET", "no-input", "")
    );
}

#[tokio::test]
async fn failed_resume_is_retried() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("Resume", &[Reply::Error]);
    server.post("prepareWorkflow", workflow("wf-rerr", &bank)).await;
    assert_eq!(server.advance_and_tick(11).await, 1);
    assert_eq!(bank.count("wf-rerr", "Resume"), 1);
    let interval = server.transaction("wf-rerr").await["next_cron_interval"]
        .as_i64()
        .unwrap();
    assert_eq!(server.advance_and_tick(interval as u64 + 1).await, 1);
    assert_eq!(bank.count("wf-rerr", "Resume"), 2);
    assert_eq!(server.state("wf-rerr").await.0, "prepared");
}

#[tokio::test]
async fn register_branch_after_submit_is_refused() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepareWorkflow", workflow("wf-late", &bank)).await;
    server
        .post("submit", finish("wf-late", json!({"status": "succeed"})))
        .await;
    let (code, body) = server
        .post("registerBranch", progress("wf-late", "01", "action", "succeed", "late"))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
    assert_eq!(server.state("wf-late").await, (S.to_owned(), vec![]));
}

#[tokio::test]
async fn bad_input_is_rejected() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepareWorkflow", workflow("wf-bad", &bank)).await;
    for status in ["prepared", "done", ""] {
        let (code, body) = server
            .post("registerBranch", progress("wf-bad", "01", "action", status, "x"))
            .await;
        assert_eq!(code, 400, "{status:?}: {body}");
        assert!(message(&body).contains("status"), "{body}");
    }
    let mut no_op = progress("wf-bad", "01", "action", "succeed", "x");
    no_op["op"] = json!("");
    let (code, body) = server.post("registerBranch", no_op).await;
    assert_eq!(code, 400, "{body}");
    for extra in [json!({"status": "bogus"}), json!({}), json!({"status": "prepared"})] {
        let (code, body) = server.post("submit", finish("wf-bad", extra.clone())).await;
        assert_eq!(code, 400, "{extra}: {body}");
    }
    assert_eq!(server.state("wf-bad").await, ("prepared".to_owned(), vec![]));
    // A workflow needs a name; prepareWorkflow is only for workflows.
    let mut unnamed = workflow("wf-unnamed", &bank);
    unnamed["custom_data"] = json!("{}");
    let (code, body) = server.post("prepareWorkflow", unnamed).await;
    assert_eq!(code, 400, "{body}");
    let mut saga = workflow("wf-saga", &bank);
    saga["trans_type"] = json!("saga");
    let (code, body) = server.post("prepareWorkflow", saga).await;
    assert_eq!(code, 400, "{body}");
    // Submitting an unknown workflow.
    let (code, body) = server
        .post("submit", finish("wf-unknown", json!({"status": "succeed"})))
        .await;
    assert!((400..500).contains(&code), "{code} {body}");
    // A workflow starts with prepareWorkflow, not prepare.
    let (code, body) = server
        .post("prepare", json!({"gid": "wf-prep", "trans_type": "workflow"}))
        .await;
    assert_eq!(code, 400, "{body}");
}

#[tokio::test]
async fn timeout_to_fail_does_not_postpone_the_first_resume() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let mut body = workflow("wf-timeout", &bank);
    body["timeout_to_fail"] = json!(60);
    server.post("prepareWorkflow", body).await;
    assert_eq!(server.advance_and_tick(11).await, 1);
    assert_eq!(bank.count("wf-timeout", "Resume"), 1);
    // And a workflow never times out by itself.
    assert_eq!(server.advance_and_tick(3600).await, 1);
    assert_eq!(server.state("wf-timeout").await.0, "prepared");
}

#[tokio::test]
async fn other_modes_cannot_submit_or_prepare_a_workflow_gid() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepareWorkflow", workflow("wf-mode", &bank)).await;
    let msg = json!({
        "gid": "wf-mode", "trans_type": "msg",
        "steps": [{"action": bank.url("Notify")}], "payloads": ["{}"],
    });
    let (code, body) = server.post("submit", msg.clone()).await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = server.post("prepare", msg).await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = server
        .post("submit", json!({"gid": "wf-mode", "trans_type": "tcc"}))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(server.state("wf-mode").await, ("prepared".to_owned(), vec![]));
    // And a workflow submit cannot finish a msg.
    let prepared_msg = json!({
        "gid": "msg-not-wf", "trans_type": "msg", "query_prepared": bank.url("QueryPrepared"),
        "steps": [{"action": bank.url("Notify")}], "payloads": ["{}"],
    });
    server.post("prepare", prepared_msg).await;
    let (code, body) = server
        .post("submit", finish("msg-not-wf", json!({"status": "succeed"})))
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        server.state("msg-not-wf").await,
        ("prepared".to_owned(), vec!["prepared".to_owned()])
    );
}
