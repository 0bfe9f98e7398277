//! The console's routes through the API, without a browser: lists with filters and keyset
//! paging, the unfinished/oldest-due view, the detail with attempts and last errors, and the
//! actions (retry now, force stop, retry compensation), against a real server and bank.

mod common;

use std::collections::HashSet;

use common::{Bank, Reply, TestServer, transfer_saga};
use serde_json::{Value, json};

fn admin_url(ts: &TestServer, route: &str) -> String {
    format!("http://{}/api/admin/{route}", ts.server.addr)
}

async fn admin_get(ts: &TestServer, route: &str) -> (u16, Value) {
    let response = ts.http.get(admin_url(ts, route)).send().await.expect("reaches kubetx");
    let code = response.status().as_u16();
    (code, response.json().await.unwrap_or(Value::Null))
}

async fn admin_post(ts: &TestServer, route: &str) -> (u16, Value) {
    let response = ts.http.post(admin_url(ts, route)).send().await.expect("reaches kubetx");
    let code = response.status().as_u16();
    (code, response.json().await.unwrap_or(Value::Null))
}

fn gids(page: &Value) -> Vec<String> {
    page["transactions"]
        .as_array()
        .unwrap_or_else(|| panic!("transactions: {page}"))
        .iter()
        .map(|t| t["gid"].as_str().expect("gid").to_owned())
        .collect()
}

/// Follows a list's `next` cursor; returns every gid in order and the number of pages.
async fn every_page(ts: &TestServer, route: &str, cursor: &str, limit: usize) -> (Vec<String>, usize) {
    let mut seen = Vec::new();
    let mut next = String::new();
    for pages in 1..200 {
        let (code, page) = admin_get(ts, &format!("{route}limit={limit}&{cursor}={next}")).await;
        assert_eq!(code, 200, "{page}");
        let batch = gids(&page);
        assert!(batch.len() <= limit);
        seen.extend(batch);
        match page["next"].as_str() {
            Some(cursor) => next = cursor.to_owned(),
            None => return (seen, pages),
        }
    }
    panic!("paging does not end");
}

/// A saga whose second action answers 500 until unscripted: it stays submitted, parked.
async fn stuck_saga(ts: &TestServer, bank: &Bank, gid: &str) {
    bank.script("TransIn", &[Reply::Error; 50]);
    let (code, body) = ts.post("submit", transfer_saga(gid, bank)).await;
    assert_eq!(code, 200, "{body}");
    ts.wait_parked(gid).await;
    assert_eq!(ts.state(gid).await.0, "submitted");
}

#[tokio::test]
async fn lists_filter_by_status_mode_gid_and_time_and_page_by_keyset() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let mut created = Vec::new();
    for i in 0..24 {
        let gid = format!("{}-{i:02}", if i % 3 == 0 { "order" } else { "pay" });
        let mut body = transfer_saga(&gid, &bank);
        if i % 4 == 0 {
            body = json!({"gid": gid, "trans_type": "msg", "steps": [{"action": bank.url("TransIn")}], "payloads": ["{}"]});
        }
        if i == 5 {
            bank.script("TransOut", &[Reply::Failure]);
        }
        let (code, reply) = ts.post("submit", body).await;
        assert_eq!(code, 200, "{reply}");
        ts.wait_parked(&gid).await;
        created.push(gid);
        ts.clock.advance(std::time::Duration::from_millis(10));
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    let (all, pages) = every_page(&ts, "transactions?", "before", 5).await;
    assert_eq!(all, newest_first, "newest first, each once");
    assert_eq!(pages, 5);

    let (orders, _) = every_page(&ts, "transactions?gid=order-&", "before", 3).await;
    assert_eq!(orders.len(), 8);
    assert!(orders.iter().all(|g| g.starts_with("order-")));

    let (msgs, _) = every_page(&ts, "transactions?mode=msg&", "before", 4).await;
    assert_eq!(msgs.len(), 6);
    let (failed, _) = every_page(&ts, "transactions?status=failed&", "before", 4).await;
    assert_eq!(failed, vec!["pay-05".to_owned()]);

    let time_of = |page: &Value| {
        page["transactions"][0]["create_time_ms"]
            .as_i64()
            .expect("create_time_ms")
    };
    let from = time_of(&admin_get(&ts, &format!("transactions?gid={}", created[10])).await.1);
    let to = time_of(&admin_get(&ts, &format!("transactions?gid={}", created[12])).await.1);
    let (window, _) = every_page(&ts, &format!("transactions?from={from}&to={to}&"), "before", 10).await;
    assert_eq!(window, [&created[12], &created[11], &created[10]].map(|g| g.clone()));

    for bad in [
        "status=nope",
        "mode=nope",
        "limit=0",
        "limit=501",
        "before=x",
        "from=yesterday",
    ] {
        let (code, body) = admin_get(&ts, &format!("transactions?{bad}")).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
}

#[tokio::test]
async fn the_due_view_lists_unfinished_ones_oldest_due_first_and_pages() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let mut stuck = Vec::new();
    for i in 0..7 {
        let gid = format!("stuck-{i}");
        stuck_saga(&ts, &bank, &gid).await;
        stuck.push(gid);
        ts.clock.advance(std::time::Duration::from_secs(1));
    }
    let (code, body) = ts.post("submit", transfer_saga("done-1", &bank)).await;
    assert_eq!(code, 200, "{body}");
    bank.unscript("TransIn");
    ts.wait_status("done-1", "succeed").await;

    let (due, pages) = every_page(&ts, "due?", "after", 3).await;
    assert_eq!(due, stuck, "earliest due first, finished ones left out");
    assert_eq!(pages, 3);
    let (_, first) = admin_get(&ts, "due?limit=1").await;
    assert!(
        first["transactions"][0]["overdue_ms"]
            .as_i64()
            .is_some_and(|ms| ms >= 0)
    );

    let (code, summary) = admin_get(&ts, "summary").await;
    assert_eq!(code, 200);
    assert_eq!(
        summary["unfinished"],
        json!({"prepared": 0, "submitted": 7, "aborting": 0})
    );
    assert!(summary["oldest_due_age_ms"].is_i64(), "{summary}");
    assert_eq!(admin_get(&ts, "due?after=12").await.0, 400);
}

#[tokio::test]
async fn the_detail_shows_branches_in_order_with_attempts_and_the_last_error_redacted() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let mut body = transfer_saga("detail-1", &bank);
    body["branch_headers"] = json!({"Authorization": "Bearer s3cret-value"});
    body["steps"][1]["action"] = Value::from(bank.url("TransIn").replace("http://", "http://user:pw@"));
    bank.script("TransIn", &[Reply::Error; 50]);
    let (code, reply) = ts.post("submit", body).await;
    assert_eq!(code, 200, "{reply}");
    ts.wait_parked("detail-1").await;

    let (code, detail) = admin_get(&ts, "transactions/detail-1").await;
    assert_eq!(code, 200, "{detail}");
    let text = detail.to_string();
    assert!(!text.contains("s3cret-value") && !text.contains("user:pw"), "{text}");
    let ops: Vec<(String, String)> = detail["branches"]
        .as_array()
        .expect("branches")
        .iter()
        .map(|b| {
            (
                b["branch_id"].as_str().unwrap_or("").to_owned(),
                b["op"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("01", "compensate"),
            ("01", "action"),
            ("02", "compensate"),
            ("02", "action")
        ]
        .map(|(b, o)| (b.to_owned(), o.to_owned()))
    );
    let second = &detail["branches"][3];
    assert_eq!(second["attempts"], 1);
    assert_eq!(second["last_outcome"], "error");
    assert!(
        second["last_error"].as_str().is_some_and(|e| e.contains("500")),
        "{second}"
    );
    assert_eq!(detail["branches"][1]["last_outcome"], "success");
    assert_eq!(
        detail["actions"],
        json!({"force_stop": true, "retry_now": true, "retry_compensation": false})
    );
    assert_eq!(admin_get(&ts, "transactions/nope").await.0, 404);
}

#[tokio::test]
async fn retry_now_makes_a_backed_off_transaction_due_at_once() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    stuck_saga(&ts, &bank, "retry-1").await;
    // Its backoff puts the next try in the future: a tick now does nothing.
    assert_eq!(ts.server.coordinator.tick().await.expect("tick"), 0);
    bank.unscript("TransIn");
    let (code, body) = admin_post(&ts, "transactions/retry-1/retry-now").await;
    assert_eq!((code, body), (200, json!({"dtm_result": "SUCCESS"})));
    assert_eq!(
        ts.server.coordinator.tick().await.expect("tick"),
        1,
        "due at once, no clock change"
    );
    ts.wait_status("retry-1", "succeed").await;
    let (code, body) = admin_post(&ts, "transactions/retry-1/retry-now").await;
    assert_eq!(code, 409, "a finished transaction has nothing to retry: {body}");
    assert_eq!(admin_post(&ts, "transactions/nope/retry-now").await.0, 404);
}

#[tokio::test]
async fn force_stop_then_retry_compensation_rolls_a_stopped_saga_back() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    stuck_saga(&ts, &bank, "stop-1").await;
    let (code, body) = admin_post(&ts, "transactions/stop-1/force-stop").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(ts.state("stop-1").await.0, "failed");
    assert!(
        bank.count("stop-1", "TransOutRevert") == 0,
        "force stop compensates nothing"
    );
    assert_eq!(admin_post(&ts, "transactions/stop-1/force-stop").await.0, 409);

    let (_, detail) = admin_get(&ts, "transactions/stop-1").await;
    assert_eq!(detail["actions"]["retry_compensation"], true, "{detail}");
    let (code, body) = admin_post(&ts, "transactions/stop-1/retry-compensation").await;
    assert_eq!(code, 200, "{body}");
    let (status, branches) = ts.wait_status("stop-1", "failed").await;
    assert_eq!(status, "failed");
    ts.wait_parked("stop-1").await;
    assert_eq!(bank.count("stop-1", "TransOutRevert"), 1);
    assert_eq!(
        bank.count("stop-1", "TransInRevert"),
        1,
        "the unknown step is compensated too"
    );
    assert_eq!(branches.len(), 4);
    let (_, detail) = admin_get(&ts, "transactions/stop-1").await;
    assert_eq!(detail["actions"]["retry_compensation"], false, "{detail}");
    assert_eq!(admin_post(&ts, "transactions/stop-1/retry-compensation").await.0, 409);

    bank.unscript("TransIn");
    let (code, _) = ts.post("submit", transfer_saga("fine-1", &bank)).await;
    assert_eq!(code, 200);
    ts.wait_status("fine-1", "succeed").await;
    assert_eq!(admin_post(&ts, "transactions/fine-1/retry-compensation").await.0, 409);
}

#[tokio::test]
async fn the_console_routes_require_the_token_and_the_page_holds_no_data() {
    let ts = TestServer::start_with(|c| c.api_tokens = vec!["console-token".to_owned()]).await;
    let routes = [
        ("GET", "transactions"),
        ("GET", "transactions/g1"),
        ("GET", "due"),
        ("GET", "summary"),
        ("POST", "transactions/g1/force-stop"),
        ("POST", "transactions/g1/retry-now"),
        ("POST", "transactions/g1/retry-compensation"),
    ];
    for (method, route) in routes {
        let request = |token: Option<&str>| {
            let builder = match method {
                "GET" => ts.http.get(admin_url(&ts, route)),
                _ => ts.http.post(admin_url(&ts, route)),
            };
            match token {
                Some(token) => builder.bearer_auth(token),
                None => builder,
            }
        };
        for token in [None, Some("wrong")] {
            let code = request(token).send().await.expect("reaches").status().as_u16();
            assert_eq!(code, 401, "{method} {route} with {token:?}");
        }
        let code = request(Some("console-token"))
            .send()
            .await
            .expect("reaches")
            .status()
            .as_u16();
        assert_ne!(code, 401, "{method} {route} with the token");
    }
    let page = ts
        .http
        .get(format!("http://{}/", ts.server.addr))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = page.text().await.expect("html");
    assert!(html.contains("<main") && html.contains("console/app.js"));
    let mut seen = HashSet::new();
    for asset in ["console/app.js", "console/style.css"] {
        let response = ts
            .http
            .get(format!("http://{}/{asset}", ts.server.addr))
            .send()
            .await
            .expect("asset");
        assert_eq!(response.status(), 200, "{asset}");
        seen.insert(response.headers()["content-type"].to_str().expect("type").to_owned());
    }
    assert_eq!(seen.len(), 2);
}

/// The value of one sample of `/api/metrics` (`name{labels}` exactly as rendered), 0 if absent.
async fn sample(ts: &TestServer, series: &str) -> f64 {
    let text = ts
        .http
        .get(format!("http://{}/api/metrics", ts.server.addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|value| value.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn gauges_move_as_transactions_start_stall_and_finish() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let submitted = r#"kubetx_unfinished_transactions{status="submitted"}"#;
    let prepared = r#"kubetx_unfinished_transactions{status="prepared"}"#;
    let oldest = "kubetx_oldest_due_seconds";
    assert_eq!((sample(&ts, submitted).await, sample(&ts, oldest).await), (0.0, 0.0));

    stuck_saga(&ts, &bank, "gauge-1").await;
    assert_eq!(sample(&ts, submitted).await, 1.0, "started and stalled");
    assert_eq!(sample(&ts, oldest).await, 0.0, "backing off, not due yet");
    let msg = json!({"gid": "gauge-msg", "trans_type": "msg", "steps": [{"action": bank.url("TransIn")}],
        "payloads": ["{}"], "query_prepared": bank.url("QueryPrepared")});
    assert_eq!(ts.post("prepare", msg).await.0, 200);
    assert_eq!(sample(&ts, prepared).await, 1.0);

    // Nobody runs the scheduler: the saga stays due, and the gauge shows for how long.
    ts.clock.advance(std::time::Duration::from_secs(100));
    let overdue = sample(&ts, oldest).await;
    assert!((80.0..=100.0).contains(&overdue), "overdue by about 90 s: {overdue}");

    bank.unscript("TransIn");
    // The tick retries the saga and checks the msg back (its 35 s timeout passed): both finish.
    assert_eq!(ts.server.coordinator.tick().await.expect("tick"), 2);
    ts.wait_status("gauge-1", "succeed").await;
    ts.wait_status("gauge-msg", "succeed").await;
    assert_eq!(sample(&ts, submitted).await, 0.0, "finished");
    assert_eq!(sample(&ts, prepared).await, 0.0);
    assert_eq!(sample(&ts, oldest).await, 0.0);

    assert!(sample(&ts, r#"kubetx_pass_duration_seconds_count{api="saga"}"#).await >= 2.0);
    let calls = r#"kubetx_branch_call_duration_seconds_count{trans_type="saga",op="action"}"#;
    assert!(sample(&ts, calls).await >= 3.0);
    assert!(sample(&ts, r#"kubetx_store_duration_seconds_count{op="create"}"#).await >= 2.0);
    assert_eq!(sample(&ts, r#"kubetx_store_errors_total{op="create"}"#).await, 0.0);
}

#[tokio::test]
async fn without_an_exporter_the_clients_traceparent_reaches_every_branch() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut body = transfer_saga("traced-off", &bank);
    body["wait_result"] = json!(true);
    let response = ts
        .http
        .post(ts.url("submit"))
        .header("traceparent", traceparent)
        .json(&body)
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status(), 200);
    let calls = bank.calls_for("traced-off");
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(
            call.headers.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(traceparent)
        );
    }
    // Stored with the transaction, so that retries (after a restart too) continue the trace.
    let stored = ts.transaction("traced-off").await["ext_data"].clone();
    assert_eq!(stored, json!(json!({"traceparent": traceparent}).to_string()));

    // A malformed header is ignored, never passed on.
    let mut body = transfer_saga("traced-bad", &bank);
    body["wait_result"] = json!(true);
    let response = ts
        .http
        .post(ts.url("submit"))
        .header("traceparent", "00-zz-01")
        .json(&body)
        .send()
        .await;
    assert_eq!(response.expect("submit").status(), 200);
    assert!(
        bank.calls_for("traced-bad")
            .iter()
            .all(|c| c.headers.get("traceparent").is_none())
    );
}

#[tokio::test]
async fn a_transaction_of_an_operator_resource_names_it() {
    let ts = TestServer::start().await;
    let now = ts.server.coordinator.now();
    let mut global = kubetx::model::GlobalTrans {
        next_cron_time: now + 3_600_000,
        ext_data: json!({"resource": {"kind": "Saga", "namespace": "default", "name": "transfer-1"}}).to_string(),
        ..common::saga_global(
            "default-transfer-1-abcdef12",
            kubetx::model::TransStatus::Submitted,
            now,
        )
    };
    assert!(
        ts.server
            .coordinator
            .store()
            .create(&global, &[])
            .await
            .expect("create")
    );
    let (_, detail) = admin_get(&ts, &format!("transactions/{}", global.gid)).await;
    assert_eq!(
        detail["transaction"]["resource"],
        json!({"kind": "Saga", "namespace": "default", "name": "transfer-1"})
    );
    let (_, page) = admin_get(&ts, "transactions?gid=default-").await;
    assert_eq!(page["transactions"][0]["resource"]["name"], "transfer-1");
    global.gid = "plain-1".to_owned();
    global.ext_data = "{\"traceparent\":\"x\"}".to_owned();
    assert!(
        ts.server
            .coordinator
            .store()
            .create(&global, &[])
            .await
            .expect("create")
    );
    let (_, detail) = admin_get(&ts, "transactions/plain-1").await;
    assert!(detail["transaction"].get("resource").is_none(), "{detail}");
}
