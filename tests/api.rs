//! DTM's API and store checklist (§20 of the protocol notes) against a real kubetx server:
//! version, newGid, query, all, KV, metrics, ping, cron resets, forceStop, topics and the
//! response envelope.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Bank, Reply, TestServer, transfer_saga};
use kubetx::scheduler::Clock as _;
use serde_json::{Value, json};

const SUCCESS: &str = r#"{"dtm_result":"SUCCESS"}"#;

fn success() -> Value {
    serde_json::from_str(SUCCESS).expect("literal")
}

/// Submits a saga and waits until its first pass has released the lease.
async fn submit_parked(ts: &TestServer, body: Value) -> Value {
    let gid = body["gid"].as_str().expect("gid").to_owned();
    let (code, reply) = ts.post("submit", body).await;
    assert_eq!((code, reply), (200, success()));
    ts.wait_parked(&gid).await
}

fn gids(page: &Value) -> Vec<String> {
    page["transactions"]
        .as_array()
        .unwrap_or_else(|| panic!("transactions is an array: {page}"))
        .iter()
        .map(|t| t["gid"].as_str().expect("gid").to_owned())
        .collect()
}

/// Follows `/all` pages of `limit` until `next_position` is empty; returns every gid in order.
async fn all_pages(ts: &TestServer, filters: &str, limit: usize) -> (Vec<String>, usize) {
    let mut position = String::new();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (code, page) = ts.get(&format!("all?limit={limit}&position={position}{filters}")).await;
        assert_eq!(code, 200, "{page}");
        pages += 1;
        let batch = gids(&page);
        assert!(batch.len() <= limit, "page larger than the limit: {page}");
        seen.extend(batch.iter().cloned());
        position = page["next_position"]
            .as_str()
            .expect("next_position is a string")
            .to_owned();
        if position.is_empty() {
            assert!(batch.len() < limit, "an empty next_position ends the listing: {page}");
            return (seen, pages);
        }
        assert_eq!(batch.len(), limit, "a full page carries a next_position: {page}");
        assert!(pages < 100, "pagination does not end");
    }
}

fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

async fn metrics_text(ts: &TestServer) -> String {
    let response = ts
        .http
        .get(format!("http://{}/api/metrics", ts.server.addr))
        .send()
        .await
        .expect("metrics reachable");
    assert_eq!(response.status().as_u16(), 200);
    response.text().await.expect("metrics body")
}

#[tokio::test]
async fn version_reports_the_build() {
    let ts = TestServer::start().await;
    let (code, body) = ts.get("version").await;
    assert_eq!(code, 200);
    assert_eq!(body, json!({"version": concat!("v", env!("CARGO_PKG_VERSION"))}));
}

#[tokio::test]
async fn new_gid_is_a_unique_22_char_base57_id() {
    let ts = TestServer::start().await;
    let alphabet: HashSet<char> = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
        .chars()
        .collect();
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let (code, body) = ts.get("newGid").await;
        assert_eq!(code, 200);
        assert_eq!(body["dtm_result"], "SUCCESS", "{body}");
        let gid = body["gid"].as_str().expect("gid").to_owned();
        assert_eq!(gid.chars().count(), 22, "{gid}");
        assert!(gid.chars().all(|c| alphabet.contains(&c)), "{gid} is not base57");
        assert!(seen.insert(gid.clone()), "duplicate gid {gid}");
    }
    // A generated gid is a valid gid.
    let bank = Bank::start().await;
    let gid = seen.into_iter().next().expect("one gid");
    assert_eq!(ts.post("submit", transfer_saga(&gid, &bank)).await.0, 200);
    ts.wait_status(&gid, "succeed").await;
}

#[tokio::test]
async fn query_without_gid_unknown_gid_and_known_gid() {
    let ts = TestServer::start().await;
    for route in ["query", "query?gid=", "query?other=1"] {
        let (code, body) = ts.get(route).await;
        // DTM answers 500 here; a missing parameter is the client's mistake.
        assert_eq!(code, 400, "{route}: {body}");
        assert_eq!(body, json!({"message": "no gid specified"}), "{route}");
    }

    let (code, body) = ts.get("query?gid=nobody-knows-me").await;
    assert_eq!(code, 200);
    assert_eq!(body, json!({"transaction": null, "branches": []}));

    let bank = Bank::start().await;
    assert_eq!(ts.post("submit", transfer_saga("q-known", &bank)).await.0, 200);
    ts.wait_status("q-known", "succeed").await;
    ts.wait_parked("q-known").await;
    let (code, body) = ts.get("query?gid=q-known").await;
    assert_eq!(code, 200);
    let trans = &body["transaction"];
    assert_eq!(trans["gid"], "q-known");
    assert_eq!(trans["trans_type"], "saga");
    assert_eq!(trans["status"], "succeed");
    assert_eq!(trans["protocol"], "http");
    assert_eq!(trans["concurrent"], false);
    assert!(trans["id"].as_i64().is_some_and(|id| id > 0), "{trans}");
    assert!(trans["options"].is_string(), "{trans}");
    assert!(trans["finish_time"].is_string(), "{trans}");
    assert!(
        trans.get("owner").is_none(),
        "a finished transaction holds no lease: {trans}"
    );
    let branches = body["branches"].as_array().expect("branches");
    let shape: Vec<(String, String, String)> = branches
        .iter()
        .map(|b| {
            (
                b["branch_id"].as_str().unwrap_or_default().to_owned(),
                b["op"].as_str().unwrap_or_default().to_owned(),
                b["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("01", "compensate", "prepared"),
        ("01", "action", "succeed"),
        ("02", "compensate", "prepared"),
        ("02", "action", "succeed"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(shape, expected);
    // bin_data is the payload, base64 encoded ({"amount":30}).
    assert_eq!(branches[1]["bin_data"], "eyJhbW91bnQiOjMwfQ==");
    assert_eq!(branches[1]["url"], bank.url("TransOut"));
    assert_eq!(branches[1]["gid"], "q-known");
}

#[tokio::test]
async fn all_paginates_with_limit_one_and_filters() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let t0 = ts.clock.now();

    // Created "long ago": three succeeded sagas.
    let mut created = Vec::new();
    for i in 0..3 {
        let gid = format!("all-ok-{i}");
        assert_eq!(ts.post("submit", transfer_saga(&gid, &bank)).await.0, 200);
        ts.wait_status(&gid, "succeed").await;
        created.push(gid);
    }
    ts.clock.advance(Duration::from_secs(1000));
    let t1 = ts.clock.now();
    // Created "now": a failed saga and a prepared tcc.
    bank.script("TransIn", &[Reply::Failure]);
    assert_eq!(ts.post("submit", transfer_saga("all-failed", &bank)).await.0, 200);
    ts.wait_status("all-failed", "failed").await;
    created.push("all-failed".to_owned());
    let (code, _) = ts.post("prepare", json!({"gid": "all-tcc", "trans_type": "tcc"})).await;
    assert_eq!(code, 200);
    created.push("all-tcc".to_owned());

    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    let (seen, pages) = all_pages(&ts, "", 1).await;
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 6, "five full pages, then an empty one");
    let (seen, pages) = all_pages(&ts, "", 2).await;
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 3);
    // The default limit (100) returns everything at once.
    let (code, page) = ts.get("all").await;
    assert_eq!(code, 200);
    assert_eq!(gids(&page), newest_first);
    assert_eq!(page["next_position"], "");

    let filtered = |f: &'static str| {
        let ts = &ts;
        async move { all_pages(ts, f, 1).await.0 }
    };
    assert_eq!(filtered("&status=succeed").await, ["all-ok-2", "all-ok-1", "all-ok-0"]);
    assert_eq!(filtered("&status=failed").await, ["all-failed"]);
    assert_eq!(filtered("&status=prepared").await, ["all-tcc"]);
    assert!(filtered("&status=aborting").await.is_empty());
    assert_eq!(filtered("&transType=tcc").await, ["all-tcc"]);
    assert_eq!(
        filtered("&transType=saga").await,
        ["all-failed", "all-ok-2", "all-ok-1", "all-ok-0"]
    );
    assert_eq!(
        filtered("&transType=saga&status=succeed").await,
        ["all-ok-2", "all-ok-1", "all-ok-0"]
    );

    // createTimeStart / createTimeEnd are milliseconds since the epoch, inclusive.
    let middle = t0 + 500_000;
    let (_, page) = ts.get(&format!("all?createTimeStart={middle}")).await;
    assert_eq!(gids(&page), ["all-tcc", "all-failed"]);
    let (_, page) = ts.get(&format!("all?createTimeEnd={middle}")).await;
    assert_eq!(gids(&page), ["all-ok-2", "all-ok-1", "all-ok-0"]);
    let (_, page) = ts
        .get(&format!("all?createTimeStart={t0}&createTimeEnd={}", t1 + 60_000))
        .await;
    assert_eq!(gids(&page), newest_first);
    let (_, page) = ts
        .get(&format!("all?createTimeStart={middle}&createTimeEnd={middle}"))
        .await;
    assert!(gids(&page).is_empty());
    let (_, page) = ts
        .get(&format!("all?createTimeStart={middle}&status=failed&limit=1"))
        .await;
    assert_eq!(gids(&page), ["all-failed"]);
    assert_ne!(page["next_position"], "", "a full page carries a position");

    // gid: that one transaction; the position is echoed.
    let (code, page) = ts.get("all?gid=all-ok-1&position=77").await;
    assert_eq!(code, 200);
    assert_eq!(gids(&page), ["all-ok-1"]);
    assert_eq!(page["next_position"], "77");
    let (code, page) = ts.get("all?gid=nobody").await;
    assert_eq!(code, 200);
    assert!(gids(&page).is_empty());
}

#[tokio::test]
async fn scan_kv_and_query_kv_list_topics() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    for (topic, route) in [("t-a", "A1"), ("t-a", "A2"), ("t-b", "B1"), ("t-c", "C1")] {
        let (code, body) = ts
            .get(&format!(
                "subscribe?topic={topic}&url={}&remark=r-{route}",
                bank.url(route)
            ))
            .await;
        assert_eq!((code, body), (200, success()));
    }

    let (code, page) = ts.get("scanKV?cat=topics&limit=2").await;
    assert_eq!(code, 200, "{page}");
    let first = page["kv"].as_array().expect("kv").clone();
    assert_eq!(first.len(), 2);
    let position = page["next_position"].as_str().expect("position").to_owned();
    assert!(!position.is_empty());
    let (code, page) = ts.get(&format!("scanKV?cat=topics&limit=2&position={position}")).await;
    assert_eq!(code, 200);
    let second = page["kv"].as_array().expect("kv").clone();
    assert_eq!(second.len(), 1);
    assert_eq!(page["next_position"], "");
    let keys: Vec<&str> = first
        .iter()
        .chain(&second)
        .map(|kv| kv["k"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(keys, ["t-a", "t-b", "t-c"]);
    for kv in first.iter().chain(&second) {
        assert_eq!(kv["cat"], "topics");
        assert!(kv["id"].as_i64().is_some() && kv["create_time"].is_string(), "{kv}");
    }
    // Default limit (100) lists all of them.
    let (_, page) = ts.get("scanKV?cat=topics").await;
    assert_eq!(page["kv"].as_array().map(Vec::len), Some(3));
    assert_eq!(page["next_position"], "");

    let (code, body) = ts.get("queryKV?cat=topics&key=t-a").await;
    assert_eq!(code, 200);
    let kv = &body["kv"][0];
    assert_eq!(kv["k"], "t-a");
    assert_eq!(kv["version"], 2, "created, then one more subscriber");
    let subscribers: Value = serde_json::from_str(kv["v"].as_str().expect("v is JSON text")).expect("v parses");
    assert_eq!(
        subscribers,
        json!([{"url": bank.url("A1"), "remark": "r-A1"}, {"url": bank.url("A2"), "remark": "r-A2"}])
    );

    let (code, body) = ts.get("queryKV?cat=topics&key=unknown").await;
    assert_eq!((code, body), (200, json!({"kv": []})));
    let (code, body) = ts.get("scanKV?cat=other").await;
    assert_eq!((code, body), (200, json!({"kv": [], "next_position": ""})));
    for route in [
        "scanKV",
        "queryKV?cat=topics",
        "queryKV?key=t-a",
        "scanKV?cat=topics&limit=0",
    ] {
        let (code, body) = ts.get(route).await;
        assert_eq!(code, 400, "{route}: {body}");
        assert!(body["message"].is_string(), "{route}: {body}");
    }
}

#[tokio::test]
async fn metrics_count_requests_and_branch_calls() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    assert_eq!(ts.post("submit", transfer_saga("metrics-1", &bank)).await.0, 200);
    ts.wait_status("metrics-1", "succeed").await;
    ts.wait_parked("metrics-1").await;

    let text = metrics_text(&ts).await;
    assert!(text.contains("kubetx_api_requests_total"), "{text}");
    assert!(text.contains("kubetx_branch_calls_total"), "{text}");
    assert_eq!(
        metric_value(&text, "kubetx_api_requests_total", &["api=\"submit\"", "code=\"200\""]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "kubetx_branch_calls_total",
            &["trans_type=\"saga\"", "op=\"action\"", "outcome=\"success\""]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "kubetx_transactions_finished_total",
            &["trans_type=\"saga\"", "status=\"succeed\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains("kubetx_api_request_duration_seconds"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");

    // A failing call is counted under its status code.
    ts.get("query").await;
    let text = metrics_text(&ts).await;
    assert_eq!(
        metric_value(&text, "kubetx_api_requests_total", &["api=\"query\"", "code=\"400\""]),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn ping_answers_pong_to_any_method() {
    let ts = TestServer::start().await;
    let url = format!("http://{}/api/ping", ts.server.addr);
    for request in [ts.http.get(&url), ts.http.post(&url), ts.http.put(&url)] {
        let response = request.send().await.expect("ping");
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body, json!({"msg": "pong"}));
    }
}

#[tokio::test]
async fn reset_cron_time_makes_far_backed_off_transactions_due() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    // Three sagas back off far (retry_interval 100 s, doubled after the error: 200 s, beyond the
    // default window of 3 x 35 s); a fourth backs off only 20 s and stays untouched.
    bank.script("TransIn", &[Reply::Error; 4]);
    for i in 0..3 {
        let mut body = transfer_saga(&format!("rct-far-{i}"), &bank);
        body["retry_interval"] = json!(100);
        let trans = submit_parked(&ts, body).await;
        assert_eq!(trans["status"], "submitted");
        assert_eq!(trans["next_cron_interval"], 200, "{trans}");
    }
    let near = submit_parked(&ts, transfer_saga("rct-near", &bank)).await;
    assert_eq!(near["next_cron_interval"], 20, "{near}");
    assert_eq!(ts.advance_and_tick(0).await, 0, "nothing is due yet");

    let (code, body) = ts.get("resetCronTime?limit=2").await;
    assert_eq!((code, body), (200, json!({"has_remaining": true, "succeed_count": 2})));
    let (code, body) = ts.get("resetCronTime?limit=2").await;
    assert_eq!((code, body), (200, json!({"has_remaining": false, "succeed_count": 1})));
    let (code, body) = ts.get("resetCronTime").await;
    assert_eq!((code, body), (200, json!({"has_remaining": false, "succeed_count": 0})));

    assert_eq!(
        ts.advance_and_tick(0).await,
        3,
        "the three reset transactions are due now"
    );
    for i in 0..3 {
        ts.wait_status(&format!("rct-far-{i}"), "succeed").await;
    }
    assert_eq!(ts.state("rct-near").await.0, "submitted");

    // An explicit small window catches the near one too.
    let (code, body) = ts.get("resetCronTime?timeout=5").await;
    assert_eq!((code, body), (200, json!({"has_remaining": false, "succeed_count": 1})));
    assert_eq!(ts.advance_and_tick(0).await, 1);
    ts.wait_status("rct-near", "succeed").await;

    for route in [
        "resetCronTime?limit=0",
        "resetCronTime?timeout=-1",
        "resetCronTime?limit=x",
    ] {
        let (code, body) = ts.get(route).await;
        assert_eq!(code, 400, "{route}: {body}");
        assert!(body["message"].is_string());
    }
}

#[tokio::test]
async fn reset_next_cron_time_makes_one_transaction_due() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;

    let (code, body) = ts.post("resetNextCronTime", json!({"gid": "nobody"})).await;
    assert_eq!(code, 404, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("nobody")), "{body}");
    let (code, body) = ts.post("resetNextCronTime", json!({})).await;
    assert_eq!(code, 400, "{body}");

    bank.script("TransIn", &[Reply::Error]);
    let trans = submit_parked(&ts, transfer_saga("rnct", &bank)).await;
    assert_eq!(trans["status"], "submitted");
    assert_eq!(ts.advance_and_tick(0).await, 0, "backed off");

    let (code, body) = ts.post("resetNextCronTime", json!({"gid": "rnct"})).await;
    assert_eq!((code, body), (200, success()));
    assert_eq!(ts.advance_and_tick(0).await, 1, "the next tick processes it");
    assert_eq!(
        ts.state("rnct").await,
        (
            "succeed".to_owned(),
            vec!["prepared".into(), "succeed".into(), "prepared".into(), "succeed".into()]
        )
    );

    // Any status is accepted (DTM); a finished transaction is never due anyway.
    let (code, body) = ts.post("resetNextCronTime", json!({"gid": "rnct"})).await;
    assert_eq!((code, body), (200, success()));
    assert_eq!(ts.advance_and_tick(0).await, 0);
}

#[tokio::test]
async fn force_stop_fails_unfinished_without_compensation_and_refuses_finished() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;

    bank.script("TransIn", &[Reply::Error]);
    submit_parked(&ts, transfer_saga("fs-open", &bank)).await;
    let (code, body) = ts.post("forceStop", json!({"gid": "fs-open"})).await;
    assert_eq!((code, body), (200, success()));
    let (status, branches) = ts.state("fs-open").await;
    assert_eq!(status, "failed");
    assert_eq!(branches, ["prepared", "succeed", "prepared", "prepared"]);
    assert_eq!(
        ts.advance_and_tick(3600).await,
        0,
        "a stopped transaction is never resumed"
    );
    assert_eq!(
        bank.routes("fs-open"),
        ["TransOut", "TransIn"],
        "no compensation was called"
    );
    let trans = ts.transaction("fs-open").await;
    assert!(trans.get("owner").is_none(), "{trans}");
    assert!(trans["rollback_time"].is_string(), "{trans}");

    // Stopping again, or stopping a succeeded one: 409 FAILURE.
    let (code, body) = ts.post("forceStop", json!({"gid": "fs-open"})).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
    assert_eq!(body["message"], "global transaction force stop error. status: failed");
    assert_eq!(ts.post("submit", transfer_saga("fs-done", &bank)).await.0, 200);
    ts.wait_status("fs-done", "succeed").await;
    let (code, body) = ts.post("forceStop", json!({"gid": "fs-done"})).await;
    assert_eq!(code, 409);
    assert_eq!(
        body,
        json!({"dtm_result": "FAILURE", "message": "global transaction force stop error. status: succeed"})
    );
    assert_eq!(ts.state("fs-done").await.0, "succeed", "a refused stop changes nothing");

    let (code, body) = ts.post("forceStop", json!({"gid": "fs-nobody"})).await;
    assert_eq!(code, 404, "{body}");
    assert!(body["message"].is_string());

    // A prepared tcc can be stopped too; its cancel is never called.
    assert_eq!(
        ts.post("prepare", json!({"gid": "fs-tcc", "trans_type": "tcc"}))
            .await
            .0,
        200
    );
    let register = json!({"gid": "fs-tcc", "trans_type": "tcc", "branch_id": "01", "data": "{}",
        "confirm": bank.url("Confirm"), "cancel": bank.url("Cancel")});
    assert_eq!(ts.post("registerBranch", register).await.0, 200);
    let (code, body) = ts.post("forceStop", json!({"gid": "fs-tcc"})).await;
    assert_eq!((code, body), (200, success()));
    assert_eq!(ts.advance_and_tick(3600).await, 0);
    assert!(bank.routes("fs-tcc").is_empty());
    assert_eq!(
        ts.state("fs-tcc").await,
        ("failed".to_owned(), vec!["prepared".into(), "prepared".into()])
    );
}

#[tokio::test]
async fn force_stop_wins_over_a_pass_in_flight() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    bank.script("TransIn", &[Reply::Slow(1500)]);
    assert_eq!(ts.post("submit", transfer_saga("fs-flight", &bank)).await.0, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bank.count("fs-flight", "TransIn") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "TransIn never called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // TransOut's success is recorded while TransIn is still in flight: a pass holds outcomes
    // back for at most 100 ms, slow calls or not.
    while ts.state("fs-flight").await.1 != ["prepared", "succeed", "prepared", "prepared"] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "TransOut's outcome never recorded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        ts.transaction("fs-flight").await.get("owner").is_some(),
        "the pass holds the lease"
    );
    let (code, body) = ts.post("forceStop", json!({"gid": "fs-flight"})).await;
    assert_eq!((code, body), (200, success()));

    // The pass returns from its slow call, finds the transaction moved, and stops.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics_text(&ts).await;
        if metric_value(&text, "kubetx_leases_lost_total", &[]).unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the pass never noticed: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, branches) = ts.state("fs-flight").await;
    assert_eq!(status, "failed");
    assert_eq!(
        branches,
        ["prepared", "succeed", "prepared", "prepared"],
        "the late reply is not recorded"
    );
    assert_eq!(ts.advance_and_tick(3600).await, 0);
    assert_eq!(bank.routes("fs-flight"), ["TransOut", "TransIn"], "no compensation");
}

#[tokio::test]
async fn topics_subscribe_unsubscribe_delete_and_their_errors() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let a = bank.url("SubA");
    let b = bank.url("SubB");

    let expect_error = |route: String, code: u16, message: &'static str| {
        let ts = &ts;
        async move {
            let (got, body) = ts.get(&route).await;
            assert_eq!(got, code, "{route}: {body}");
            let text = body["message"]
                .as_str()
                .unwrap_or_else(|| panic!("{route}: no message in {body}"));
            assert!(text.contains(message), "{route}: {text:?} lacks {message:?}");
            if code == 409 {
                assert_eq!(body["dtm_result"], "FAILURE");
            }
        }
    };

    expect_error(format!("subscribe?url={a}"), 400, "topic is required").await;
    expect_error("subscribe?topic=t1".to_owned(), 400, "url is required").await;
    expect_error("subscribe?topic=t1&url=".to_owned(), 400, "url is required").await;
    expect_error(
        "subscribe?topic=t1&url=not-a-url".to_owned(),
        400,
        "not an http or https URL",
    )
    .await;
    assert_eq!(ts.get(&format!("subscribe?topic=t1&url={a}")).await, (200, success()));
    expect_error(format!("subscribe?topic=t1&url={a}"), 409, "this url exists").await;
    assert_eq!(
        ts.get(&format!("subscribe?topic=t1&url={b}&remark=second")).await,
        (200, success())
    );

    // A msg to the topic reaches both subscribers (branch ids 01-01, 01-02).
    let msg = json!({"gid": "topic-msg", "trans_type": "msg",
        "steps": [{"action": "topic://t1"}], "payloads": ["{\"n\":1}"]});
    assert_eq!(ts.post("submit", msg).await, (200, success()));
    ts.wait_status("topic-msg", "succeed").await;
    let mut reached: Vec<(String, String)> = bank
        .calls()
        .into_iter()
        .filter(|c| c.gid == "topic-msg")
        .map(|c| (c.route, c.branch_id))
        .collect();
    reached.sort();
    assert_eq!(
        reached,
        [
            ("SubA".to_owned(), "01-01".to_owned()),
            ("SubB".to_owned(), "01-02".to_owned())
        ]
    );
    let msg = json!({"gid": "topic-none", "trans_type": "msg", "steps": [{"action": "topic://nosuch"}],
        "payloads": ["{}"]});
    let (code, body) = ts.post("submit", msg).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("topic not found")),
        "{body}"
    );
    assert_eq!(ts.transaction("topic-none").await, Value::Null, "nothing created");

    expect_error(format!("unsubscribe?url={a}"), 400, "topic is required").await;
    expect_error("unsubscribe?topic=t1".to_owned(), 400, "url is required").await;
    expect_error(format!("unsubscribe?topic=nosuch&url={a}"), 404, "no such a topic").await;
    expect_error(
        format!("unsubscribe?topic=t1&url={}", bank.url("Other")),
        404,
        "no such an url",
    )
    .await;
    assert_eq!(ts.get(&format!("unsubscribe?topic=t1&url={a}")).await, (200, success()));
    expect_error(format!("unsubscribe?topic=t1&url={a}"), 404, "no such an url").await;
    assert_eq!(ts.get(&format!("unsubscribe?topic=t1&url={b}")).await, (200, success()));
    expect_error(format!("unsubscribe?topic=t1&url={b}"), 404, "this topic is empty").await;
    // An empty topic still exists, and a msg to it is refused.
    let (_, body) = ts.get("queryKV?cat=topics&key=t1").await;
    assert_eq!(body["kv"][0]["v"], "[]");
    let msg = json!({"gid": "topic-empty", "trans_type": "msg", "steps": [{"action": "topic://t1"}],
        "payloads": ["{}"]});
    let (code, body) = ts.post("submit", msg).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("no subscribers")),
        "{body}"
    );

    let delete = |name: &'static str| {
        let ts = &ts;
        async move {
            let response = ts
                .http
                .delete(ts.url(&format!("topic/{name}")))
                .send()
                .await
                .expect("delete reaches kubetx");
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.expect("JSON body"))
        }
    };
    assert_eq!(delete("t1").await, (200, success()));
    let (code, body) = delete("t1").await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("topic not found")),
        "{body}"
    );
    assert_eq!(ts.get("queryKV?cat=topics&key=t1").await, (200, json!({"kv": []})));
    // Re-subscribing creates the topic afresh.
    assert_eq!(ts.get(&format!("subscribe?topic=t1&url={a}")).await, (200, success()));
    let (_, body) = ts.get("queryKV?cat=topics&key=t1").await;
    assert_eq!(body["kv"][0]["version"], 1);
}

#[tokio::test]
async fn concurrent_subscribes_all_land() {
    let ts = std::sync::Arc::new(TestServer::start().await);
    const TASKS: usize = 40;
    let mut handles = Vec::new();
    for i in 0..TASKS {
        let ts = ts.clone();
        handles.push(tokio::spawn(async move {
            let url = format!("http://127.0.0.1:9/api/sub{i}");
            let (code, body) = ts.get(&format!("subscribe?topic=conc&url={url}")).await;
            (url, code, body)
        }));
    }
    let mut landed = HashSet::new();
    let mut lost = Vec::new();
    for handle in handles {
        let (url, code, body) = handle.await.expect("task");
        match code {
            200 => {
                assert_eq!(body, success());
                landed.insert(url);
            }
            // A lost optimistic race is DTM's FAILURE: the client may retry.
            409 => {
                assert_eq!(body["dtm_result"], "FAILURE", "{body}");
                lost.push(url);
            }
            other => panic!("subscribe answered {other}: {body}"),
        }
    }
    // Within one process topic writes are serialized, so none loses a race; across processes the
    // version check makes the loser answer 409 and retry.
    assert!(lost.is_empty(), "lost races: {lost:?}");
    assert_eq!(landed.len(), TASKS);

    let stored = |ts: std::sync::Arc<TestServer>| async move {
        let (_, body) = ts.get("queryKV?cat=topics&key=conc").await;
        let kv = body["kv"][0].clone();
        let urls: Vec<String> = serde_json::from_str::<Vec<Value>>(kv["v"].as_str().expect("v"))
            .expect("v parses")
            .iter()
            .map(|s| s["url"].as_str().expect("url").to_owned())
            .collect();
        (kv["version"].as_u64().expect("version") as usize, urls)
    };
    let (version, urls) = stored(ts.clone()).await;
    assert_eq!(version, landed.len(), "one version per successful subscription");
    assert_eq!(urls.len(), landed.len(), "no subscription lost, none duplicated");
    assert_eq!(urls.iter().cloned().collect::<HashSet<_>>(), landed);

    // A duplicate is still refused afterwards.
    let (code, body) = ts.get("subscribe?topic=conc&url=http://127.0.0.1:9/api/sub0").await;
    assert_eq!(code, 409, "{body}");

    // Concurrent unsubscribes of half of them all land too.
    let mut handles = Vec::new();
    for i in (0..TASKS).step_by(2) {
        let ts = ts.clone();
        handles.push(tokio::spawn(async move {
            ts.get(&format!("unsubscribe?topic=conc&url=http://127.0.0.1:9/api/sub{i}"))
                .await
        }));
    }
    for handle in handles {
        assert_eq!(handle.await.expect("task"), (200, success()));
    }
    let (version, urls) = stored(ts.clone()).await;
    assert_eq!(version, TASKS + TASKS / 2);
    let expected: HashSet<String> = (1..TASKS)
        .step_by(2)
        .map(|i| format!("http://127.0.0.1:9/api/sub{i}"))
        .collect();
    assert_eq!(urls.into_iter().collect::<HashSet<_>>(), expected);
}

#[tokio::test]
async fn response_envelope_success_failure_and_ongoing() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;

    // Success: exactly {"dtm_result":"SUCCESS"}.
    let response = ts
        .http
        .post(ts.url("submit"))
        .json(&transfer_saga("env-ok", &bank))
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/json"))
    );
    assert_eq!(response.text().await.expect("body"), SUCCESS);
    ts.wait_status("env-ok", "succeed").await;

    // FAILURE: 409 with a message.
    let (code, body) = ts.post("submit", transfer_saga("env-ok", &bank)).await;
    assert_eq!(code, 409);
    assert_eq!(
        body,
        json!({"dtm_result": "FAILURE", "message": "current status 'succeed', cannot submit"})
    );
    let (code, body) = ts
        .post(
            "prepare",
            json!({"gid": "env-ok", "trans_type": "msg",
        "steps": [{"action": bank.url("X")}], "payloads": ["{}"], "query_prepared": bank.url("Q")}),
        )
        .await;
    assert_eq!(code, 409);
    assert_eq!(
        body,
        json!({"dtm_result": "FAILURE", "message": "current status 'succeed', cannot prepare"})
    );

    // wait_result: SUCCESS when the pass finished it.
    let mut body = transfer_saga("env-wait-ok", &bank);
    body["wait_result"] = json!(true);
    assert_eq!(ts.post("submit", body).await, (200, success()));
    assert_eq!(ts.state("env-wait-ok").await.0, "succeed", "finished before the answer");

    // wait_result on a branch answering ONGOING: 425 ONGOING (DTM answers 409 here).
    bank.script("TransIn", &[Reply::Ongoing]);
    let mut body = transfer_saga("env-ongoing", &bank);
    body["wait_result"] = json!(true);
    let (code, body) = ts.post("submit", body).await;
    assert_eq!(code, 425, "{body}");
    assert_eq!(body["dtm_result"], "ONGOING");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("still submitted"), "{message}");
    assert!(
        message.contains("still working"),
        "the branch's reply is quoted: {message}"
    );
    let (status, branches) = ts.state("env-ongoing").await;
    assert_eq!(status, "submitted");
    assert_eq!(branches, ["prepared", "succeed", "prepared", "prepared"]);
    assert_eq!(ts.advance_and_tick(30).await, 1);
    assert_eq!(ts.state("env-ongoing").await.0, "succeed");

    // wait_result on a retryable error: also ONGOING, with the error quoted.
    bank.script("TransIn", &[Reply::Error]);
    let mut body = transfer_saga("env-error", &bank);
    body["wait_result"] = json!(true);
    let (code, body) = ts.post("submit", body).await;
    assert_eq!(code, 425, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("database is down")),
        "{body}"
    );

    // wait_result on a FAILURE: 409 carrying the rollback reason.
    bank.script("TransIn", &[Reply::Failure]);
    let mut body = transfer_saga("env-failed", &bank);
    body["wait_result"] = json!(true);
    let (code, body) = ts.post("submit", body).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("business refused")),
        "{body}"
    );
    let (status, branches) = ts.state("env-failed").await;
    assert_eq!(status, "failed");
    // DTM compensates the failed step itself too.
    assert_eq!(branches, ["succeed", "succeed", "succeed", "failed"]);

    // Errors that are not DTM results carry only a message.
    let (code, body) = ts.post("abort", json!({"gid": "env-none", "trans_type": "tcc"})).await;
    assert_eq!(code, 404);
    assert!(
        body.get("dtm_result").is_none() && body["message"].is_string(),
        "{body}"
    );
}

/// A branch service whose calls wait until the test opens it; counts the calls that arrived.
struct Gate {
    addr: std::net::SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    arrived: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    async fn start() -> Self {
        let (open, opened) = tokio::sync::watch::channel(false);
        let arrived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = arrived.clone();
        let app = axum::Router::new().fallback(axum::routing::any(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut opened = opened.clone();
            async move {
                // A closed channel only means the test is over.
                let _ = opened.wait_for(|open| *open).await;
                "SUCCESS"
            }
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gate");
        let addr = listener.local_addr().expect("gate addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Gate { addr, open, arrived }
    }

    fn arrived(&self) -> usize {
        self.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn non_waiting_submits_beyond_the_free_slots_are_left_to_the_scheduler() {
    let ts = TestServer::start_with(|c| c.max_concurrent_passes = 1).await;
    let bank = Bank::start().await;
    let gate = Gate::start().await;
    // The only slot is held by a pass waiting at the gate.
    let holder = json!({"gid": "holder", "trans_type": "saga",
        "steps": [{"action": format!("http://{}/api/Hold", gate.addr), "compensate": ""}], "payloads": ["{}"]});
    assert_eq!(ts.post("submit", holder).await, (200, success()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gate.arrived() == 0 {
        assert!(std::time::Instant::now() < deadline, "the holder's call never arrived");
        tokio::task::yield_now().await;
    }
    for i in 0..20 {
        assert_eq!(
            ts.post("submit", transfer_saga(&format!("flood-{i}"), &bank)).await,
            (200, success())
        );
    }
    // Nothing was spawned for them: each is in the store, unowned and due now.
    assert!(bank.calls().is_empty(), "no pass ran beyond the slot");
    for i in 0..20 {
        let flood = ts.transaction(&format!("flood-{i}")).await;
        assert_eq!(flood["status"], "submitted");
        assert!(flood.get("owner").is_none(), "handed back: {flood}");
    }
    let metrics = metrics_text(&ts).await;
    assert!(metrics.contains("kubetx_passes_deferred_total 20"), "{metrics}");
    // The scheduler runs them all; nothing is lost.
    gate.open.send_replace(true);
    for i in 0..20 {
        let gid = format!("flood-{i}");
        while ts.state(&gid).await.0 != "succeed" {
            assert!(
                std::time::Instant::now() < deadline + Duration::from_secs(10),
                "{gid} not done"
            );
            ts.server.coordinator.tick().await.expect("tick");
        }
    }
    assert_eq!(bank.calls().len(), 40);
}

#[tokio::test]
async fn a_request_timeout_beyond_the_cap_is_cut_to_it() {
    let ts = TestServer::start_with(|c| {
        c.request_timeout = 1;
        c.max_request_timeout = 1;
    })
    .await;
    let gate = Gate::start().await;
    let body = json!({"gid": "capped", "trans_type": "saga", "wait_result": true, "request_timeout": 3600,
        "steps": [{"action": format!("http://{}/api/Hold", gate.addr), "compensate": ""}], "payloads": ["{}"]});
    let started = std::time::Instant::now();
    let (code, reply) = ts.post("submit", body).await;
    assert_eq!(code, 425, "{reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| m.contains("timeout")),
        "{reply}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "cut to the 1 s cap");
}

#[tokio::test]
async fn a_request_longer_than_the_http_timeout_is_a_503() {
    let ts = TestServer::start_with(|c| c.http_timeout = 1).await;
    let gate = Gate::start().await;
    let body = json!({"gid": "slow-answer", "trans_type": "saga", "wait_result": true,
        "steps": [{"action": format!("http://{}/api/Hold", gate.addr), "compensate": ""}], "payloads": ["{}"]});
    let (code, _) = ts.post("submit", body).await;
    assert_eq!(code, 503);
    // The transaction is safe in the store; the pass resumes after its lease.
    assert_eq!(ts.transaction("slow-answer").await["status"], "submitted");
}

/// A branch that answers 500 with an HTML page that happens to contain the word FAILURE.
async fn failing_proxy() -> String {
    let app = axum::Router::new().fallback(axum::routing::any(|| async {
        (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "<html>upstream FAILURE</html>",
        )
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/api/TransOut")
}

#[tokio::test]
async fn a_500_saying_failure_is_a_failure_unless_results_are_strict() {
    let url = failing_proxy().await;
    let body = json!({"gid": "five-hundred", "trans_type": "saga", "wait_result": true,
        "steps": [{"action": url, "compensate": ""}], "payloads": ["{}"]});
    // DTM's rule, kept by default: the word FAILURE anywhere in the body, whatever the status.
    let dtm = TestServer::start().await;
    let (code, reply) = dtm.post("submit", body.clone()).await;
    assert_eq!(code, 409, "{reply}");
    assert_eq!(dtm.state("five-hundred").await.0, "failed");
    // --strict-results: a 500 is an unknown outcome, retried, never a rollback.
    let strict = TestServer::start_with(|c| c.strict_results = true).await;
    let (code, reply) = strict.post("submit", body).await;
    assert_eq!(code, 425, "{reply}");
    assert_eq!(strict.state("five-hundred").await.0, "submitted");
}

#[tokio::test]
async fn with_tokens_every_route_needs_one_of_them() {
    let ts = TestServer::start_with(|c| c.api_tokens = vec!["tok-old".to_owned(), "tok-new".to_owned()]).await;
    let api = ts.server.dtm_url();
    let base = format!("http://{}", ts.server.addr);
    let routes: Vec<(reqwest::Method, String)> = [
        ("GET", "version"),
        ("GET", "newGid"),
        ("GET", "query?gid=g"),
        ("GET", "all"),
        ("GET", "resetCronTime"),
        ("GET", "subscribe?topic=t&url=http://127.0.0.1:1/x"),
        ("GET", "unsubscribe?topic=t&url=http://127.0.0.1:1/x"),
        ("GET", "scanKV?cat=topics"),
        ("GET", "queryKV?cat=topics&key=t"),
        ("POST", "prepare"),
        ("POST", "submit"),
        ("POST", "abort"),
        ("POST", "forceStop"),
        ("POST", "registerBranch"),
        ("POST", "registerXaBranch"),
        ("POST", "registerTccBranch"),
        ("POST", "prepareWorkflow"),
        ("POST", "resetNextCronTime"),
        ("DELETE", "topic/t"),
    ]
    .into_iter()
    .map(|(method, route)| (method.parse().expect("method"), format!("{api}/{route}")))
    .chain([(reqwest::Method::GET, format!("{base}/api/metrics"))])
    .collect();
    let send = |method: reqwest::Method, url: String, token: Option<&'static str>| {
        let mut request = ts.http.request(method, url).json(&json!({"gid": "auth-probe"}));
        if let Some(token) = token {
            request = request.header("authorization", token);
        }
        async move { request.send().await.expect("request").status().as_u16() }
    };
    for (method, url) in &routes {
        assert_eq!(
            send(method.clone(), url.clone(), None).await,
            401,
            "{method} {url} without a token"
        );
        for wrong in ["Bearer tok", "Bearer tok-old2", "Basic tok-old", "tok-new"] {
            assert_eq!(
                send(method.clone(), url.clone(), Some(wrong)).await,
                401,
                "{method} {url} {wrong}"
            );
        }
        for right in ["Bearer tok-old", "bearer tok-new"] {
            assert_ne!(
                send(method.clone(), url.clone(), Some(right)).await,
                401,
                "{method} {url} {right}"
            );
        }
    }
    // Probes stay open.
    assert_eq!(send(reqwest::Method::GET, format!("{base}/api/ping"), None).await, 200);
    assert_eq!(send(reqwest::Method::GET, format!("{base}/readyz"), None).await, 200);
}

/// The test CA, and a certificate for 127.0.0.1 and localhost it signed (valid for a century;
/// made with `openssl req -x509` and `openssl x509 -req`, the key unencrypted).
fn tls_fixture(name: &str) -> String {
    format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn tls_end_to_end_with_a_test_ca() {
    let ts = TestServer::start_with(|c| {
        c.tls_cert_file = tls_fixture("server.pem");
        c.tls_key_file = tls_fixture("server.key");
    })
    .await;
    let url = ts.url("version");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(tls_fixture("ca.pem")).expect("ca file")).expect("ca");
    let trusting = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .expect("client");
    let response = trusting.get(&url).send().await.expect("https request");
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.text().await.expect("body").contains("version"));
    // Plain HTTP on the TLS port gets no answer; a client that does not trust the CA refuses.
    let plain = reqwest::Client::new()
        .get(url.replacen("https://", "http://", 1))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status().as_u16() != 200));
    assert!(reqwest::Client::new().get(&url).send().await.is_err());
    // The server keeps serving after those failed handshakes.
    assert_eq!(trusting.get(&url).send().await.expect("again").status().as_u16(), 200);
}

#[tokio::test]
async fn a_certificate_without_its_key_is_a_configuration_error() {
    let dir = tempfile::tempdir().expect("dir");
    let config = kubetx::config::Config {
        listen: "127.0.0.1:0".to_owned(),
        grpc_listen: String::new(),
        tls_cert_file: tls_fixture("server.pem"),
        ..kubetx::config::Config::default()
    };
    assert!(config.validate().is_err());
    let config = kubetx::config::Config {
        tls_key_file: tls_fixture("ca.pem"),
        sqlite: kubetx::config::SqliteConfig {
            path: dir.path().join("kubetx.db").display().to_string(),
            ..Default::default()
        },
        ..config
    };
    let clock = std::sync::Arc::new(kubetx::scheduler::OffsetClock::default());
    let error = kubetx::server::Server::start(&config, clock, false)
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("ca.pem"), "{error}");
}

#[tokio::test]
async fn mtls_refuses_a_client_without_a_certificate() {
    let ts = TestServer::start_with(|c| {
        c.tls_cert_file = tls_fixture("server.pem");
        c.tls_key_file = tls_fixture("server.key");
        c.tls_client_ca_file = tls_fixture("client-ca.pem");
    })
    .await;
    let url = ts.url("version");
    let ca = || reqwest::Certificate::from_pem(&std::fs::read(tls_fixture("ca.pem")).expect("ca file")).expect("ca");
    let anonymous = reqwest::Client::builder()
        .add_root_certificate(ca())
        .build()
        .expect("client");
    assert!(anonymous.get(&url).send().await.is_err(), "no client certificate");
    let mut pem = std::fs::read(tls_fixture("client.pem")).expect("client cert");
    pem.extend(std::fs::read(tls_fixture("client.key")).expect("client key"));
    let identified = reqwest::Client::builder()
        .add_root_certificate(ca())
        .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
        .build()
        .expect("client");
    let response = identified.get(&url).send().await.expect("mTLS request");
    assert_eq!(response.status().as_u16(), 200);
}

/// Polls `check` every 100 ms until it holds, for at most 15 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tokens_are_rotated_by_editing_their_file() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# rotated by hand\ntok-a\n").expect("writes");
    let path = file.display().to_string();
    let ts = TestServer::start_with(|c| {
        c.api_tokens_file = path;
        c.reload_interval = 1;
    })
    .await;
    let url = ts.url("version");
    let status = |token: &'static str| {
        let request = ts.http.get(&url).bearer_auth(token);
        async move { request.send().await.expect("request").status().as_u16() }
    };
    assert_eq!((status("tok-a").await, status("tok-b").await), (200, 401));
    // Both during the rotation, then only the new one: no restart.
    std::fs::write(&file, "tok-a\ntok-b\n").expect("writes");
    eventually("tok-b accepted", || async { status("tok-b").await == 200 }).await;
    assert_eq!(status("tok-a").await, 200);
    std::fs::write(&file, "tok-b\n").expect("writes");
    eventually("tok-a refused", || async { status("tok-a").await == 401 }).await;
    assert_eq!(status("tok-b").await, 200);
}

#[test]
fn a_token_file_without_tokens_is_refused_rather_than_opening_the_api() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# all commented out\n\n").expect("writes");
    let config = kubetx::config::Config {
        api_tokens_file: file.display().to_string(),
        ..kubetx::config::Config::default()
    };
    let error = config.token_set().err().expect("refused");
    assert!(error.to_string().contains("holds no token"), "{error}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(tls_fixture("server.pem"), &cert).expect("copies");
    std::fs::copy(tls_fixture("server.key"), &key).expect("copies");
    let (cert_path, key_path) = (cert.display().to_string(), key.display().to_string());
    let ts = TestServer::start_with(|c| {
        c.tls_cert_file = cert_path;
        c.tls_key_file = key_path;
        c.reload_interval = 1;
    })
    .await;
    let url = ts.url("version");
    // A new client per attempt: each request is a new connection and handshake.
    let trusting = |ca: &str| {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(tls_fixture(ca)).expect("ca file")).expect("ca");
        let client = reqwest::Client::builder().tls_certs_only([ca]).build().expect("client");
        let url = url.clone();
        async move { client.get(url).send().await.is_ok_and(|r| r.status().as_u16() == 200) }
    };
    assert!(trusting("ca.pem").await && !trusting("ca2.pem").await);
    // Key first, as a careless renewal would: the mismatched pair is not loaded meanwhile.
    std::fs::copy(tls_fixture("server2.key"), &key).expect("copies");
    std::fs::copy(tls_fixture("server2.pem"), &cert).expect("copies");
    eventually("the renewed certificate served", || trusting("ca2.pem")).await;
    assert!(!trusting("ca.pem").await, "the old certificate is gone");
}
