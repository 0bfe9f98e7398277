//! 2-phase message scenarios (DTM's msg checklist) against a real server, a real SQLite file
//! and real HTTP branches.

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

/// A 2-step transfer message with a back-check URL.
fn transfer_msg(gid: &str, bank: &Bank) -> Value {
    json!({
        "gid": gid,
        "trans_type": "msg",
        "steps": [{"action": bank.url("TransOut")}, {"action": bank.url("TransIn")}],
        "payloads": ["{\"amount\":30}", "{\"amount\":40}"],
        "query_prepared": bank.url("QueryPrepared"),
    })
}

fn with(mut body: Value, extra: Value) -> Value {
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    body
}

/// Percent-encodes a query value (enough for the URLs used here).
fn enc(text: &str) -> String {
    text.replace('%', "%25")
        .replace(':', "%3A")
        .replace('/', "%2F")
        .replace('?', "%3F")
        .replace('&', "%26")
        .replace('=', "%3D")
}

fn message(body: &Value) -> String {
    body["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn msg_normal_submit_without_prepare_delivers_in_order() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (code, body) = server.post("submit", transfer_msg("msg-normal", &bank)).await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.wait_status("msg-normal", S).await, state(S, &[S, S]));
    let calls = bank.calls_for("msg-normal");
    assert_eq!(bank.routes("msg-normal"), ["TransOut", "TransIn"]);
    for (call, (branch_id, body)) in calls.iter().zip([("01", "{\"amount\":30}"), ("02", "{\"amount\":40}")]) {
        assert_eq!(call.method, "POST");
        assert_eq!(
            (call.trans_type.as_str(), call.branch_id.as_str(), call.op.as_str()),
            ("msg", branch_id, "action")
        );
        assert_eq!(call.body, body);
        assert_eq!(call.headers["content-type"], "application/json");
        // The server sends exactly gid, trans_type, branch_id and op.
        let mut keys: Vec<&str> = call.query.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["branch_id", "gid", "op", "trans_type"]);
    }
    assert_eq!(bank.count("msg-normal", "QueryPrepared"), 0);
    // Finished: the scheduler has nothing left to do.
    assert_eq!(server.advance_and_tick(3600).await, 0);
}

#[tokio::test]
async fn msg_branch_without_payload_is_called_with_get() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let body = json!({
        "gid": "msg-get",
        "trans_type": "msg",
        "steps": [{"action": bank.url("Notify")}],
        "payloads": [""],
        "wait_result": true,
    });
    let (code, reply) = server.post("submit", body).await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(server.state("msg-get").await, state(S, &[S]));
    let call = &bank.calls_for("msg-get")[0];
    assert_eq!(call.method, "GET");
    assert_eq!(call.body, "");
}

#[tokio::test]
async fn msg_prepare_then_submit() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (code, body) = server.post("prepare", transfer_msg("msg-ps", &bank)).await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("msg-ps").await, state(P, &[P, P]));
    assert!(bank.calls_for("msg-ps").is_empty());
    let trans = server.transaction("msg-ps").await;
    assert_eq!(trans["query_prepared"], bank.url("QueryPrepared"));
    let (code, _) = server.post("submit", transfer_msg("msg-ps", &bank)).await;
    assert_eq!(code, 200);
    assert_eq!(server.wait_status("msg-ps", S).await, state(S, &[S, S]));
    assert_eq!(bank.routes("msg-ps"), ["TransOut", "TransIn"]);
    // Submitting a finished msg is refused.
    let (code, body) = server.post("submit", transfer_msg("msg-ps", &bank)).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
}

#[tokio::test]
async fn msg_timeout_back_check_success_submits_and_delivers() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepare", transfer_msg("msg-ts", &bank)).await;
    // Not due before the default 35 s timeout.
    assert_eq!(server.advance_and_tick(30).await, 0);
    assert!(bank.calls_for("msg-ts").is_empty());
    assert_eq!(server.advance_and_tick(6).await, 1);
    assert_eq!(server.state("msg-ts").await, state(S, &[S, S]));
    assert_eq!(bank.routes("msg-ts"), ["QueryPrepared", "TransOut", "TransIn"]);
    let check = &bank.calls_for("msg-ts")[0];
    assert_eq!(check.method, "GET");
    assert_eq!(
        (
            check.gid.as_str(),
            check.trans_type.as_str(),
            check.branch_id.as_str(),
            check.op.as_str()
        ),
        ("msg-ts", "msg", "00", "msg")
    );
    assert_eq!(check.body, "");
}

#[tokio::test]
async fn msg_back_check_ongoing_stays_prepared_and_checks_again() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("QueryPrepared", &[Reply::Ongoing]);
    server.post("prepare", transfer_msg("msg-to", &bank)).await;
    assert_eq!(server.advance_and_tick(36).await, 1);
    assert_eq!(server.state("msg-to").await, state(P, &[P, P]));
    assert_eq!(bank.routes("msg-to"), ["QueryPrepared"]);
    let trans = server.transaction("msg-to").await;
    assert_eq!(
        trans["next_cron_interval"], 10,
        "an ongoing back-check does not back off"
    );
    // Checked again one interval later; this time the local transaction committed.
    assert_eq!(server.advance_and_tick(5).await, 0);
    assert_eq!(server.advance_and_tick(6).await, 1);
    assert_eq!(server.state("msg-to").await, state(S, &[S, S]));
    assert_eq!(
        bank.routes("msg-to"),
        ["QueryPrepared", "QueryPrepared", "TransOut", "TransIn"]
    );
}

#[tokio::test]
async fn msg_back_check_error_backs_off() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("QueryPrepared", &[Reply::Error]);
    server.post("prepare", transfer_msg("msg-te", &bank)).await;
    assert_eq!(server.advance_and_tick(36).await, 1);
    assert_eq!(server.state("msg-te").await, state(P, &[P, P]));
    assert_eq!(server.transaction("msg-te").await["next_cron_interval"], 20);
    assert_eq!(server.advance_and_tick(15).await, 0);
    assert_eq!(server.advance_and_tick(6).await, 1);
    assert_eq!(server.state("msg-te").await, state(S, &[S, S]));
}

#[tokio::test]
async fn msg_back_check_failure_fails_without_touching_branches() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("QueryPrepared", &[Reply::Failure]);
    server.post("prepare", transfer_msg("msg-tf", &bank)).await;
    assert_eq!(server.advance_and_tick(36).await, 1);
    assert_eq!(server.state("msg-tf").await, state(F, &[P, P]));
    assert_eq!(bank.routes("msg-tf"), ["QueryPrepared"]);
    assert_eq!(server.advance_and_tick(3600).await, 0);
}

#[tokio::test]
async fn msg_custom_timeout_delays_the_back_check() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let body = with(transfer_msg("msg-tc", &bank), json!({"timeout_to_fail": 120}));
    server.post("prepare", body).await;
    assert_eq!(server.advance_and_tick(60).await, 0);
    assert!(bank.calls_for("msg-tc").is_empty());
    assert_eq!(server.state("msg-tc").await, state(P, &[P, P]));
    assert_eq!(server.advance_and_tick(120).await, 1);
    assert_eq!(server.state("msg-tc").await, state(S, &[S, S]));
    assert_eq!(bank.routes("msg-tc"), ["QueryPrepared", "TransOut", "TransIn"]);
}

#[tokio::test]
async fn msg_abnormal_prepare_twice_then_prepare_after_submit_is_refused() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (code, _) = server.post("prepare", transfer_msg("msg-ab", &bank)).await;
    assert_eq!(code, 200);
    let (code, body) = server.post("prepare", transfer_msg("msg-ab", &bank)).await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("msg-ab").await, state(P, &[P, P]), "no duplicate rows");
    server.post("submit", transfer_msg("msg-ab", &bank)).await;
    server.wait_status("msg-ab", S).await;
    let (code, body) = server.post("prepare", transfer_msg("msg-ab", &bank)).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
    assert!(message(&body).contains("cannot prepare"), "{body}");
    assert_eq!(server.state("msg-ab").await, state(S, &[S, S]));
}

#[tokio::test]
async fn msg_abort_of_a_prepared_msg_fails_it() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepare", transfer_msg("msg-abort", &bank)).await;
    let (code, body) = server
        .post("abort", json!({"gid": "msg-abort", "trans_type": "msg"}))
        .await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(server.state("msg-abort").await, state(F, &[P, P]));
    assert!(bank.calls_for("msg-abort").is_empty());
    // Nothing left for the scheduler, and it cannot be submitted any more.
    assert_eq!(server.advance_and_tick(3600).await, 0);
    let (code, body) = server.post("submit", transfer_msg("msg-abort", &bank)).await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = server
        .post("abort", json!({"gid": "msg-abort", "trans_type": "msg"}))
        .await;
    assert_eq!(code, 409, "{body}");
}

#[tokio::test]
async fn msg_delay_given_at_submit_postpones_delivery() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let body = with(
        transfer_msg("msg-delay", &bank),
        json!({"custom_data": "{\"delay\":10}"}),
    );
    let (code, _) = server.post("submit", body).await;
    assert_eq!(code, 200);
    let trans = server.wait_parked("msg-delay").await;
    assert_eq!(trans["status"], "submitted");
    assert!(bank.calls_for("msg-delay").is_empty(), "not called at +0 s");
    assert_eq!(server.advance_and_tick(8).await, 0);
    assert!(bank.calls_for("msg-delay").is_empty(), "not called at +8 s");
    assert_eq!(server.advance_and_tick(4).await, 1);
    assert_eq!(server.state("msg-delay").await, state(S, &[S, S]));
    assert_eq!(bank.routes("msg-delay"), ["TransOut", "TransIn"]);
}

#[tokio::test]
async fn msg_delay_given_at_submit_of_a_prepared_msg_is_persisted() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server.post("prepare", transfer_msg("msg-pdelay", &bank)).await;
    let body = with(
        transfer_msg("msg-pdelay", &bank),
        json!({"custom_data": "{\"delay\":10}"}),
    );
    let (code, _) = server.post("submit", body).await;
    assert_eq!(code, 200);
    let trans = server.wait_parked("msg-pdelay").await;
    assert_eq!(trans["status"], "submitted");
    assert_eq!(trans["custom_data"], "{\"delay\":10}");
    assert!(bank.calls_for("msg-pdelay").is_empty());
    assert_eq!(server.advance_and_tick(8).await, 0);
    assert!(bank.calls_for("msg-pdelay").is_empty());
    assert_eq!(server.advance_and_tick(4).await, 1);
    assert_eq!(server.state("msg-pdelay").await, state(S, &[S, S]));
}

#[tokio::test]
async fn msg_invalid_delay_is_rejected() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let body = with(
        transfer_msg("msg-baddelay", &bank),
        json!({"custom_data": "{\"delay\":-1}"}),
    );
    let (code, body) = server.post("submit", body).await;
    assert_eq!(code, 400, "{body}");
    let body = with(transfer_msg("msg-baddelay", &bank), json!({"custom_data": "not json"}));
    let (code, body) = server.post("submit", body).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(server.transaction("msg-baddelay").await, Value::Null);
}

#[tokio::test]
async fn msg_concurrent_calls_every_branch_in_one_pass() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransOut", &[Reply::Error]);
    let body = json!({
        "gid": "msg-con",
        "trans_type": "msg",
        "steps": [
            {"action": bank.url("TransOut")},
            {"action": bank.url("TransIn")},
            {"action": bank.url("Notify")},
        ],
        "payloads": ["{\"amount\":30}", "{\"amount\":30}", "{\"amount\":30}"],
        "concurrent": true,
    });
    server.post("submit", body).await;
    let trans = server.wait_parked("msg-con").await;
    assert_eq!(trans["status"], "submitted");
    assert_eq!(trans["concurrent"], true);
    assert_eq!(server.state("msg-con").await.1, rows(&[P, S, S]));
    let mut routes = bank.routes("msg-con");
    routes.sort();
    assert_eq!(
        routes,
        ["Notify", "TransIn", "TransOut"],
        "all called despite the error"
    );
    // Only the failed branch is retried.
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert_eq!(server.state("msg-con").await, state(S, &[S, S, S]));
    assert_eq!(bank.count("msg-con", "TransOut"), 2);
    assert_eq!(bank.count("msg-con", "TransIn"), 1);
    assert_eq!(bank.count("msg-con", "Notify"), 1);
}

#[tokio::test]
async fn msg_sequential_stops_at_the_first_error() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransOut", &[Reply::Error]);
    server.post("submit", transfer_msg("msg-seq", &bank)).await;
    let trans = server.wait_parked("msg-seq").await;
    assert_eq!(trans["status"], "submitted");
    assert_eq!(server.state("msg-seq").await.1, rows(&[P, P]));
    assert_eq!(bank.routes("msg-seq"), ["TransOut"]);
}

#[tokio::test]
async fn msg_branch_failure_or_ongoing_is_retried_not_terminal() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransIn", &[Reply::Failure, Reply::Ongoing]);
    server.post("submit", transfer_msg("msg-fail", &bank)).await;
    let trans = server.wait_parked("msg-fail").await;
    assert_eq!(trans["status"], "submitted");
    assert_eq!(server.state("msg-fail").await.1, rows(&[S, P]));
    assert_eq!(
        trans["next_cron_interval"], 20,
        "FAILURE from a msg branch counts as an error"
    );
    assert_eq!(server.advance_and_tick(21).await, 1);
    // ONGOING keeps the interval.
    let trans = server.transaction("msg-fail").await;
    assert_eq!(
        (trans["status"].clone(), trans["next_cron_interval"].clone()),
        (json!("submitted"), json!(20))
    );
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert_eq!(server.state("msg-fail").await, state(S, &[S, S]));
    assert_eq!(bank.routes("msg-fail"), ["TransOut", "TransIn", "TransIn", "TransIn"]);
}

#[tokio::test]
async fn msg_erroring_branch_backs_off_up_to_the_cap_then_succeeds() {
    let bank = Bank::start().await;
    let server = TestServer::start_with(|c| c.max_retry_interval = 40).await;
    bank.script("TransIn", &[Reply::Error; 4]);
    server.post("submit", transfer_msg("msg-backoff", &bank)).await;
    let trans = server.wait_parked("msg-backoff").await;
    assert_eq!(trans["next_cron_interval"], 20);
    assert_eq!(
        server.advance_and_tick(15).await,
        0,
        "not due before the backed-off interval"
    );
    assert_eq!(server.advance_and_tick(6).await, 1);
    assert_eq!(server.transaction("msg-backoff").await["next_cron_interval"], 40);
    assert_eq!(server.advance_and_tick(35).await, 0);
    assert_eq!(server.advance_and_tick(6).await, 1);
    assert_eq!(
        server.transaction("msg-backoff").await["next_cron_interval"],
        40,
        "capped by max_retry_interval"
    );
    assert_eq!(server.advance_and_tick(41).await, 1);
    assert_eq!(server.transaction("msg-backoff").await["next_cron_interval"], 40);
    assert_eq!(server.state("msg-backoff").await, state("submitted", &[S, P]));
    assert_eq!(server.advance_and_tick(41).await, 1);
    assert_eq!(server.state("msg-backoff").await, state(S, &[S, S]));
    assert_eq!(bank.count("msg-backoff", "TransIn"), 5);
    assert_eq!(
        bank.count("msg-backoff", "TransOut"),
        1,
        "a succeeded branch is not called again"
    );
}

#[tokio::test]
async fn msg_topic_fans_out_to_every_subscriber() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    for (route, remark) in [("In1", "first"), ("In2", "second")] {
        let (code, body) = server
            .get(&format!(
                "subscribe?topic=transfer&url={}&remark={remark}",
                enc(&bank.url(route))
            ))
            .await;
        assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    }
    let (code, body) = server.get("queryKV?cat=topics&key=transfer").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["kv"][0]["version"], 2);
    let stored: Value = serde_json::from_str(body["kv"][0]["v"].as_str().unwrap()).unwrap();
    assert_eq!(
        stored,
        json!([{"url": bank.url("In1"), "remark": "first"}, {"url": bank.url("In2"), "remark": "second"}])
    );
    let body = json!({
        "gid": "msg-topic",
        "trans_type": "msg",
        "steps": [{"action": "topic://transfer"}, {"action": bank.url("Notify")}],
        "payloads": ["{\"amount\":30}", "{\"n\":1}"],
    });
    let (code, reply) = server.post("submit", body).await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(server.wait_status("msg-topic", S).await, state(S, &[S, S, S]));
    let calls = bank.calls_for("msg-topic");
    let seen: Vec<(&str, &str, &str)> = calls
        .iter()
        .map(|c| (c.route.as_str(), c.branch_id.as_str(), c.body.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("In1", "01-01", "{\"amount\":30}"),
            ("In2", "01-02", "{\"amount\":30}"),
            ("Notify", "02", "{\"n\":1}"),
        ]
    );
    let (_, query) = server.get("query?gid=msg-topic").await;
    let ids: Vec<&str> = query["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["branch_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["01-01", "01-02", "02"]);
}

#[tokio::test]
async fn msg_topic_with_one_subscriber_uses_the_plain_branch_id() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    server
        .get(&format!("subscribe?topic=solo&url={}", enc(&bank.url("In1"))))
        .await;
    let body = json!({
        "gid": "msg-solo",
        "trans_type": "msg",
        "steps": [{"action": "topic://solo"}],
        "payloads": ["{}"],
    });
    server.post("submit", body).await;
    server.wait_status("msg-solo", S).await;
    assert_eq!(bank.calls_for("msg-solo")[0].branch_id, "01");
}

#[tokio::test]
async fn msg_unknown_topic_is_refused() {
    let (server, _bank) = (TestServer::start().await, Bank::start().await);
    let body = json!({
        "gid": "msg-notopic",
        "trans_type": "msg",
        "steps": [{"action": "topic://nowhere"}],
        "payloads": ["{}"],
    });
    for route in ["prepare", "submit"] {
        let (code, reply) = server.post(route, body.clone()).await;
        assert!((400..500).contains(&code), "{route}: {code} {reply}");
        assert!(message(&reply).contains("topic not found"), "{reply}");
    }
    assert_eq!(
        server.transaction("msg-notopic").await,
        Value::Null,
        "nothing was stored"
    );
}

#[tokio::test]
async fn topic_subscribe_unsubscribe_and_delete_error_cases() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let in1 = enc(&bank.url("In1"));
    let in2 = enc(&bank.url("In2"));
    // Missing parameters.
    let (code, body) = server.get(&format!("subscribe?topic=&url={in1}")).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server.get("subscribe?topic=t1&url=").await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server.get("subscribe?topic=t1&url=ftp%3A%2F%2Fx").await;
    assert_eq!(code, 400, "{body}");
    // Subscribe, then the same URL again.
    assert_eq!(server.get(&format!("subscribe?topic=t1&url={in1}")).await.0, 200);
    let (code, body) = server.get(&format!("subscribe?topic=t1&url={in1}")).await;
    assert_eq!(code, 409, "{body}");
    assert!(message(&body).contains("this url exists"), "{body}");
    assert_eq!(server.get(&format!("subscribe?topic=t1&url={in2}")).await.0, 200);
    // Unsubscribe errors.
    let (code, body) = server.get(&format!("unsubscribe?topic=&url={in1}")).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server.get("unsubscribe?topic=t1&url=").await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = server.get(&format!("unsubscribe?topic=nope&url={in1}")).await;
    assert_eq!(code, 404, "{body}");
    assert!(message(&body).contains("no such a topic"), "{body}");
    let other = enc(&bank.url("Other"));
    let (code, body) = server.get(&format!("unsubscribe?topic=t1&url={other}")).await;
    assert_eq!(code, 404, "{body}");
    assert!(message(&body).contains("no such an url"), "{body}");
    // Unsubscribe everything: the topic stays, empty.
    assert_eq!(server.get(&format!("unsubscribe?topic=t1&url={in1}")).await.0, 200);
    assert_eq!(server.get(&format!("unsubscribe?topic=t1&url={in2}")).await.0, 200);
    let (code, body) = server.get(&format!("unsubscribe?topic=t1&url={in1}")).await;
    assert_eq!(code, 404, "{body}");
    assert!(message(&body).contains("this topic is empty"), "{body}");
    let (_, kv) = server.get("queryKV?cat=topics&key=t1").await;
    assert_eq!(kv["kv"][0]["v"], "[]");
    assert_eq!(kv["kv"][0]["version"], 4);
    // A msg to an empty topic is refused.
    let msg = json!({
        "gid": "msg-empty-topic",
        "trans_type": "msg",
        "steps": [{"action": "topic://t1"}],
        "payloads": ["{}"],
    });
    let (code, body) = server.post("submit", msg).await;
    assert!((400..500).contains(&code), "{code} {body}");
    // Delete, then delete again.
    let response = server
        .http
        .delete(server.url("topic/t1"))
        .send()
        .await
        .expect("delete reaches kubetx");
    assert_eq!(response.status().as_u16(), 200);
    let response = server
        .http
        .delete(server.url("topic/t1"))
        .send()
        .await
        .expect("delete reaches kubetx");
    assert_eq!(response.status().as_u16(), 404);
    let (_, kv) = server.get("queryKV?cat=topics&key=t1").await;
    assert_eq!(kv["kv"], json!([]));
}

#[tokio::test]
async fn alert_webhook_receives_repeated_errors() {
    let bank = Bank::start().await;
    let webhook = bank.url("Alert");
    let server = TestServer::start_with(|c| c.alert_webhook = webhook).await;
    bank.script("TransIn", &[Reply::Error; 3]);
    server.post("submit", transfer_msg("msg-alert", &bank)).await;
    server.wait_parked("msg-alert").await;
    // Interval 20 then 40: fewer than 3 doublings, no alert yet.
    assert_eq!(server.advance_and_tick(21).await, 1);
    assert!(bank.calls_on("Alert").is_empty());
    // Third error: interval 80 = 3 doublings of 10.
    assert_eq!(server.advance_and_tick(41).await, 1);
    let alert = bank.wait_calls_on("Alert", 1).await.remove(0);
    assert_eq!(alert.method, "POST");
    let body: Value = serde_json::from_str(&alert.body).expect("alert body is JSON");
    assert_eq!(body["gid"], "msg-alert");
    assert_eq!(body["status"], "submitted");
    assert_eq!(body["branch"], bank.url("TransIn"));
    assert!(body["error"].as_str().unwrap().contains("database is down"), "{body}");
    assert_eq!(body["retry_count"], 3);
    assert_eq!(server.advance_and_tick(81).await, 1);
    assert_eq!(server.state("msg-alert").await, state(S, &[S, S]));
}

#[tokio::test]
async fn failing_alert_webhook_does_not_break_processing() {
    let bank = Bank::start().await;
    let webhook = bank.url("Alert");
    let server = TestServer::start_with(|c| {
        c.alert_webhook = webhook;
        c.alert_retry_limit = 1;
    })
    .await;
    bank.script("Alert", &[Reply::Error, Reply::Error]);
    bank.script("TransIn", &[Reply::Error; 2]);
    server.post("submit", transfer_msg("msg-alert-err", &bank)).await;
    server.wait_parked("msg-alert-err").await;
    bank.wait_calls_on("Alert", 1).await;
    assert_eq!(server.advance_and_tick(21).await, 1);
    bank.wait_calls_on("Alert", 2).await;
    assert_eq!(server.state("msg-alert-err").await, state("submitted", &[S, P]));
    assert_eq!(server.advance_and_tick(41).await, 1);
    assert_eq!(server.state("msg-alert-err").await, state(S, &[S, S]));
}

#[tokio::test]
async fn msg_branch_headers_reach_the_back_check_and_the_branches() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let body = with(
        transfer_msg("msg-headers", &bank),
        json!({"branch_headers": {"X-Request-Id": "r-1"}}),
    );
    server.post("prepare", body).await;
    assert_eq!(server.advance_and_tick(36).await, 1);
    assert_eq!(server.state("msg-headers").await, state(S, &[S, S]));
    let calls = bank.calls_for("msg-headers");
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert_eq!(call.headers["x-request-id"], "r-1", "{}", call.route);
    }
}
