//! Bad input gets a clear 4xx in DTM's envelope (JSON with a "message"), never a 5xx or a
//! panic, creates nothing, and leaves the other transactions of the server untouched.

mod common;

use std::time::Duration;

use common::{Bank, Reply, TestServer, transfer_saga};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One bad request and what it must produce.
struct Case {
    name: &'static str,
    route: &'static str,
    body: Vec<u8>,
    status: u16,
    message: &'static str,
    /// A gid that must not exist afterwards.
    gid: Option<String>,
}

fn case(name: &'static str, route: &'static str, body: Value, status: u16, message: &'static str) -> Case {
    let gid = body["gid"].as_str().map(str::to_owned);
    Case {
        name,
        route,
        body: body.to_string().into_bytes(),
        status,
        message,
        gid,
    }
}

fn raw(name: &'static str, route: &'static str, body: &[u8], status: u16, message: &'static str) -> Case {
    Case {
        name,
        route,
        body: body.to_vec(),
        status,
        message,
        gid: None,
    }
}

/// Checks DTM's error envelope: a JSON object with a message, plus `dtm_result` on 409/425.
fn assert_envelope(name: &str, code: u16, body: &Value, status: u16, message: &str) {
    assert_eq!(code, status, "{name}: {body}");
    assert!(code < 500, "{name}: a 5xx for bad input: {body}");
    let text = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: no message in {body}"));
    assert!(
        text.contains(message),
        "{name}: message {text:?} should mention {message:?}"
    );
    match code {
        409 => assert_eq!(body["dtm_result"], "FAILURE", "{name}"),
        425 => assert_eq!(body["dtm_result"], "ONGOING", "{name}"),
        _ => assert!(body.get("dtm_result").is_none(), "{name}: {body}"),
    }
}

async fn run_cases(ts: &TestServer, cases: Vec<Case>) {
    for case in cases {
        // The transaction the request names (if any) is exactly the same afterwards.
        let query = case
            .gid
            .as_deref()
            .filter(|g| !g.is_empty())
            .map(|gid| format!("query?gid={}", urlencode(gid)));
        let before = match &query {
            Some(query) => Some(ts.get(query).await),
            None => None,
        };
        let (code, body) = ts.post_raw(case.route, case.body.clone()).await;
        assert_envelope(case.name, code, &body, case.status, case.message);
        if let (Some(query), Some(before)) = (&query, before) {
            assert_eq!(ts.get(query).await, before, "{}: bad input changed {query}", case.name);
        }
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A transaction left parked mid-way, to show bad input never touches it.
async fn bystander(ts: &TestServer, bank: &Bank) -> Value {
    bank.script("TransIn", &[Reply::Error]);
    assert_eq!(ts.post("submit", transfer_saga("bystander", bank)).await.0, 200);
    let parked = ts.wait_parked("bystander").await;
    assert_eq!(parked["status"], "submitted");
    parked
}

/// After the bad input: the bystander is exactly as it was and still completes, and a new
/// transaction succeeds.
async fn others_untouched(ts: &TestServer, bank: &Bank, before: &Value) {
    let now = ts.transaction("bystander").await;
    assert_eq!(&now, before, "bad input changed another transaction");
    assert_eq!(
        ts.state("bystander").await.1,
        ["prepared", "succeed", "prepared", "prepared"]
    );
    assert_eq!(ts.advance_and_tick(3600).await, 1);
    ts.wait_status("bystander", "succeed").await;
    assert_eq!(ts.post("submit", transfer_saga("after-bad-input", bank)).await.0, 200);
    ts.wait_status("after-bad-input", "succeed").await;
}

#[tokio::test]
async fn malformed_bodies_get_400_with_a_message() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let before = bystander(&ts, &bank).await;
    let deep = format!(
        r#"{{"gid":"deep","trans_type":"saga","custom_data":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_register = format!(
        r#"{{"gid":"bystander","trans_type":"tcc","branch_id":"01","data":{}{}}}"#,
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    let mut cases = Vec::new();
    for route in [
        "submit",
        "prepare",
        "abort",
        "forceStop",
        "registerBranch",
        "prepareWorkflow",
        "resetNextCronTime",
    ] {
        cases.extend([
            raw(
                "malformed JSON",
                route,
                br#"{"gid":"bad-1","trans_type":"saga""#,
                400,
                "invalid JSON body",
            ),
            raw("empty body", route, b"", 400, "request body is empty"),
            raw("blank body", route, b" \n\t ", 400, "request body is empty"),
            raw("JSON null", route, b"null", 400, "invalid JSON body"),
            raw("JSON array", route, b"[1,2]", 400, "invalid JSON body"),
            raw("JSON string", route, br#""saga""#, 400, "invalid JSON body"),
            raw("trailing garbage", route, br#"{"gid":"x"} {"#, 400, "invalid JSON body"),
            raw(
                "not UTF-8",
                route,
                b"{\"gid\":\"\xff\xfe\",\"trans_type\":\"saga\"}",
                400,
                "not valid UTF-8",
            ),
            raw("latin-1 body", route, b"{\"gid\":\"caf\xe9\"}", 400, "not valid UTF-8"),
        ]);
    }
    cases.extend([
        raw("nesting bomb", "submit", deep.as_bytes(), 400, "invalid JSON body"),
        raw(
            "nesting bomb",
            "registerBranch",
            deep_register.as_bytes(),
            400,
            "invalid JSON body",
        ),
        case(
            "gid of the wrong type",
            "submit",
            json!({"gid": 12, "trans_type": "saga"}),
            400,
            "invalid JSON body",
        ),
        case(
            "steps of the wrong type",
            "submit",
            json!({"gid": "bad-steps", "trans_type": "saga", "steps": "x"}),
            400,
            "invalid JSON body",
        ),
        case(
            "timeout as a string",
            "submit",
            json!({"gid": "bad-timeout-type", "trans_type": "saga", "timeout_to_fail": "10"}),
            400,
            "invalid JSON body",
        ),
        case(
            "timeout beyond i64",
            "submit",
            json!({"gid": "bad-timeout-big", "trans_type": "saga", "timeout_to_fail": 1e30}),
            400,
            "invalid JSON body",
        ),
        case(
            "wait_result as a number",
            "submit",
            json!({"gid": "bad-wait", "trans_type": "saga", "wait_result": 1}),
            400,
            "invalid JSON body",
        ),
    ]);
    run_cases(&ts, cases).await;
    others_untouched(&ts, &bank, &before).await;
}

#[tokio::test]
async fn missing_or_invalid_fields_get_400_with_a_message() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let before = bystander(&ts, &bank).await;
    let ok_steps = json!([{"action": bank.url("TransOut"), "compensate": bank.url("TransOutRevert")}]);
    let saga = |gid: &str, extra: Value| {
        let mut body = json!({"gid": gid, "trans_type": "saga", "steps": ok_steps, "payloads": ["{}"]});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    let long_gid = "g".repeat(129);
    let cases = vec![
        case(
            "missing gid",
            "submit",
            json!({"trans_type": "saga", "steps": ok_steps}),
            400,
            "gid is required",
        ),
        case(
            "null gid",
            "submit",
            json!({"gid": null, "trans_type": "saga"}),
            400,
            "gid is required",
        ),
        case(
            "empty gid",
            "prepare",
            json!({"gid": "", "trans_type": "tcc"}),
            400,
            "gid is required",
        ),
        case("missing gid", "forceStop", json!({}), 400, "gid is required"),
        case(
            "missing gid",
            "abort",
            json!({"trans_type": "tcc"}),
            400,
            "gid is required",
        ),
        case(
            "gid too long",
            "submit",
            json!({"gid": long_gid, "trans_type": "saga"}),
            400,
            "gid: at most 128 bytes allowed",
        ),
        case(
            "gid with newline",
            "submit",
            json!({"gid": "a\nb", "trans_type": "saga"}),
            400,
            "control characters",
        ),
        case(
            "missing trans_type",
            "submit",
            json!({"gid": "bad-no-type"}),
            400,
            "trans_type is required",
        ),
        case(
            "unknown trans_type",
            "submit",
            json!({"gid": "bad-type", "trans_type": "sagaa"}),
            400,
            "unknown trans_type",
        ),
        case(
            "unknown trans_type",
            "prepare",
            json!({"gid": "bad-type", "trans_type": "2pc"}),
            400,
            "unknown trans_type",
        ),
        case(
            "upper-case trans_type",
            "submit",
            json!({"gid": "bad-type", "trans_type": "SAGA"}),
            400,
            "unknown trans_type",
        ),
        case(
            "prepare a saga",
            "prepare",
            saga("bad-prep-saga", json!({})),
            400,
            "prepare is for msg, tcc and xa",
        ),
        case(
            "non-http action",
            "submit",
            json!({"gid": "bad-url-1", "trans_type": "saga",
                "steps": [{"action": "ftp://bank/TransOut", "compensate": bank.url("TransOutRevert")}]}),
            400,
            "not an http or https URL",
        ),
        case(
            "grpc compensate through service discovery",
            "submit",
            json!({"gid": "bad-url-2", "trans_type": "saga",
                "steps": [{"action": bank.url("TransOut"), "compensate": "etcd://localhost:2379/busi/busi.Busi/TransOutRevert"}]}),
            400,
            "service discovery is not supported",
        ),
        case(
            "URL without host",
            "submit",
            json!({"gid": "bad-url-3", "trans_type": "saga", "steps": [{"action": "http:///x", "compensate": ""}]}),
            400,
            "has no host",
        ),
        case(
            "non-http msg step",
            "submit",
            json!({"gid": "bad-url-4", "trans_type": "msg", "steps": [{"action": "mailto:a@b"}], "payloads": ["{}"]}),
            400,
            "not an http or https URL",
        ),
        case(
            "non-http query_prepared",
            "prepare",
            json!({"gid": "bad-url-5", "trans_type": "msg", "steps": [{"action": bank.url("X")}],
                "payloads": ["{}"], "query_prepared": "file:///etc/passwd"}),
            400,
            "not an http or https URL",
        ),
        case(
            "step not an object",
            "submit",
            json!({"gid": "bad-step", "trans_type": "saga", "steps": ["http://x/y"]}),
            400,
            "steps[0] must be an object",
        ),
        case(
            "step URL not a string",
            "submit",
            json!({"gid": "bad-step-2", "trans_type": "saga", "steps": [{"action": 5, "compensate": ""}]}),
            400,
            "steps[0].action must be a string",
        ),
        case(
            "payload not a string",
            "submit",
            saga("bad-payload", json!({"payloads": [{"amount": 30}]})),
            400,
            "payloads[0] must be a string",
        ),
        case(
            "cyclic orders",
            "submit",
            json!({"gid": "bad-cycle", "trans_type": "saga",
                "steps": [{"action": bank.url("A"), "compensate": ""}, {"action": bank.url("B"), "compensate": ""},
                          {"action": bank.url("C"), "compensate": ""}],
                "payloads": ["{}", "{}", "{}"],
                "custom_data": "{\"concurrent\":true,\"orders\":{\"0\":[2],\"1\":[0],\"2\":[1]}}"}),
            400,
            "cycle",
        ),
        case(
            "order on itself",
            "submit",
            saga(
                "bad-self",
                json!({"custom_data": "{\"concurrent\":true,\"orders\":{\"0\":[0]}}"}),
            ),
            400,
            "waits for itself",
        ),
        case(
            "order on a missing step",
            "submit",
            saga(
                "bad-missing",
                json!({"custom_data": "{\"concurrent\":true,\"orders\":{\"0\":[7]}}"}),
            ),
            400,
            "does not exist",
        ),
        case(
            "sequential saga waiting for a later step",
            "submit",
            json!({"gid": "bad-seq", "trans_type": "saga",
                "steps": [{"action": bank.url("A"), "compensate": ""}, {"action": bank.url("B"), "compensate": ""}],
                "payloads": ["{}", "{}"], "custom_data": "{\"orders\":{\"0\":[1]}}"}),
            400,
            "cycle",
        ),
        case(
            "custom_data not JSON",
            "submit",
            saga("bad-custom", json!({"custom_data": "{orders"})),
            400,
            "invalid saga custom_data",
        ),
        case(
            "negative timeout_to_fail",
            "submit",
            saga("bad-neg-1", json!({"timeout_to_fail": -1})),
            400,
            "timeout_to_fail must be between 0 and",
        ),
        case(
            "negative timeout_to_fail",
            "prepare",
            json!({"gid": "bad-neg-2", "trans_type": "tcc", "timeout_to_fail": -30}),
            400,
            "timeout_to_fail must be between 0 and",
        ),
        case(
            "negative retry_interval",
            "submit",
            saga("bad-neg-3", json!({"retry_interval": -5})),
            400,
            "retry_interval must be between 0 and",
        ),
        case(
            "negative request_timeout",
            "submit",
            saga("bad-neg-4", json!({"request_timeout": -1})),
            400,
            "request_timeout must be between 0 and",
        ),
        case(
            "negative retry_limit",
            "submit",
            saga("bad-neg-5", json!({"retry_limit": -1})),
            400,
            "retry_limit must be between 0 and",
        ),
        case(
            "negative msg delay",
            "submit",
            json!({"gid": "bad-delay", "trans_type": "msg", "steps": [{"action": bank.url("X")}],
                "payloads": ["{}"], "custom_data": "{\"delay\":-3}"}),
            400,
            "delay must be between 0 and",
        ),
        case(
            "json-rpc protocol",
            "submit",
            saga("bad-proto", json!({"protocol": "json-rpc"})),
            400,
            "not supported",
        ),
        case(
            "tcc with steps",
            "prepare",
            json!({"gid": "bad-tcc-steps", "trans_type": "tcc", "steps": ok_steps}),
            400,
            "takes no steps",
        ),
        case(
            "workflow without name",
            "prepareWorkflow",
            json!({"gid": "bad-wf", "trans_type": "workflow", "query_prepared": bank.url("Resume")}),
            400,
            "needs a name",
        ),
        case(
            "workflow submit without status",
            "submit",
            json!({"gid": "bad-wf-2", "trans_type": "workflow"}),
            400,
            "req_extra.status",
        ),
    ];
    run_cases(&ts, cases).await;
    others_untouched(&ts, &bank, &before).await;
}

/// Values so large that time arithmetic would overflow: refused up front, never a panic in a
/// handler or, worse, in every later pass over the transaction.
#[tokio::test]
async fn absurdly_large_durations_are_refused() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let before = bystander(&ts, &bank).await;
    let saga = |gid: &str, key: &str, value: i64| {
        let mut body = transfer_saga(gid, &bank);
        body[key] = json!(value);
        body
    };
    let mut cases = Vec::new();
    for (index, key) in ["timeout_to_fail", "retry_interval", "request_timeout"]
        .into_iter()
        .enumerate()
    {
        cases.push(case(
            "huge duration",
            "submit",
            saga(&format!("huge-{index}"), key, i64::MAX),
            400,
            key,
        ));
        let gid = format!("huge-tcc-{index}");
        cases.push(case(
            "huge duration",
            "prepare",
            json!({"gid": gid, "trans_type": "tcc", key: i64::MAX / 1000 + 1}),
            400,
            key,
        ));
    }
    cases.push(case(
        "huge msg delay",
        "submit",
        json!({"gid": "huge-delay", "trans_type": "msg", "steps": [{"action": bank.url("X")}],
            "payloads": ["{}"], "custom_data": format!("{{\"delay\":{}}}", i64::MAX)}),
        400,
        "delay",
    ));
    // A delay given only at submit of a prepared msg is checked as well.
    let prepared = json!({"gid": "huge-late-delay", "trans_type": "msg", "steps": [{"action": bank.url("X")}],
        "payloads": ["{}"], "query_prepared": bank.url("Query")});
    assert_eq!(ts.post("prepare", prepared.clone()).await.0, 200);
    for delay in [i64::MAX, -1] {
        let mut late = prepared.clone();
        late["custom_data"] = json!(format!("{{\"delay\":{delay}}}"));
        cases.push(case("bad delay at submit", "submit", late, 400, "msg delay must"));
    }
    run_cases(&ts, cases).await;
    // The server is alive and well, and the prepared msg still submits.
    assert_eq!(ts.get("version").await.0, 200);
    assert_eq!(ts.post("submit", prepared).await.0, 200);
    ts.wait_status("huge-late-delay", "succeed").await;
    others_untouched(&ts, &bank, &before).await;
}

#[tokio::test]
async fn invalid_branch_headers_are_refused() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let before = bystander(&ts, &bank).await;
    let saga = |gid: &'static str, headers: Value| {
        let mut body = transfer_saga(gid, &bank);
        body["branch_headers"] = headers;
        body
    };
    let cases = vec![
        case(
            "header name with a space",
            "submit",
            saga("hdr-1", json!({"bad name": "x"})),
            400,
            "branch_headers",
        ),
        case(
            "empty header name",
            "submit",
            saga("hdr-2", json!({"": "x"})),
            400,
            "branch_headers",
        ),
        case(
            "header value with a newline",
            "submit",
            saga("hdr-3", json!({"X-Ok": "a\r\nX-Evil: 1"})),
            400,
            "branch_headers",
        ),
        case(
            "header value not a string",
            "submit",
            saga("hdr-4", json!({"X-Ok": 1})),
            400,
            "invalid JSON body",
        ),
        // Framing headers would cut or garble every body sent to the branches.
        case(
            "content-length header",
            "submit",
            saga("hdr-5", json!({"Content-Length": "1"})),
            400,
            "cannot be set",
        ),
        case(
            "transfer-encoding header",
            "submit",
            saga("hdr-6", json!({"transfer-encoding": "chunked"})),
            400,
            "cannot be set",
        ),
    ];
    run_cases(&ts, cases).await;
    // Valid headers still work and reach the branch.
    assert_eq!(
        ts.post("submit", saga("hdr-ok", json!({"X-Trace": "abc", "x-null": null})))
            .await
            .0,
        200
    );
    ts.wait_status("hdr-ok", "succeed").await;
    let call = bank.calls().into_iter().find(|c| c.gid == "hdr-ok").expect("called");
    assert_eq!(call.headers.get("x-trace").and_then(|v| v.to_str().ok()), Some("abc"));
    assert_eq!(call.body, "{\"amount\":30}");
    // A custom content-type replaces the default instead of being sent twice (as Go's client does).
    assert_eq!(
        ts.post("submit", saga("hdr-ctype", json!({"Content-Type": "text/plain"})))
            .await
            .0,
        200
    );
    ts.wait_status("hdr-ctype", "succeed").await;
    let call = bank.calls().into_iter().find(|c| c.gid == "hdr-ctype").expect("called");
    let types: Vec<&str> = call
        .headers
        .get_all("content-type")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(types, ["text/plain"]);
    others_untouched(&ts, &bank, &before).await;
}

#[tokio::test]
async fn register_branch_bad_input() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let before = bystander(&ts, &bank).await;
    let tcc = |gid: &str, branch: &str| {
        json!({"gid": gid, "trans_type": "tcc", "branch_id": branch, "data": "{}",
            "confirm": bank.url("Confirm"), "cancel": bank.url("Cancel")})
    };
    // A finished tcc and a prepared one.
    assert_eq!(
        ts.post("prepare", json!({"gid": "reg-done", "trans_type": "tcc"}))
            .await
            .0,
        200
    );
    assert_eq!(ts.post("registerBranch", tcc("reg-done", "01")).await.0, 200);
    assert_eq!(
        ts.post("submit", json!({"gid": "reg-done", "trans_type": "tcc"}))
            .await
            .0,
        200
    );
    ts.wait_status("reg-done", "succeed").await;
    assert_eq!(
        ts.post("prepare", json!({"gid": "reg-open", "trans_type": "tcc"}))
            .await
            .0,
        200
    );
    assert_eq!(ts.post("registerBranch", tcc("reg-open", "01")).await.0, 200);

    let mut changed = tcc("reg-open", "01");
    changed["confirm"] = json!(bank.url("OtherConfirm"));
    let cases = vec![
        case(
            "finished transaction",
            "registerBranch",
            tcc("reg-done", "02"),
            409,
            "can only be registered while it is prepared",
        ),
        case(
            "unknown transaction",
            "registerBranch",
            tcc("reg-nobody", "01"),
            404,
            "no transaction with gid reg-nobody",
        ),
        case(
            "non-string value",
            "registerBranch",
            json!({"gid": "reg-open", "trans_type": "tcc", "branch_id": 2, "confirm": "", "cancel": ""}),
            400,
            "\"branch_id\" must be a string",
        ),
        case(
            "object value",
            "registerBranch",
            json!({"gid": "reg-open", "trans_type": "tcc", "branch_id": "02", "data": {"amount": 30}}),
            400,
            "\"data\" must be a string",
        ),
        case(
            "boolean value",
            "registerBranch",
            json!({"gid": "reg-open", "trans_type": "tcc", "branch_id": "02", "sync": true}),
            400,
            "\"sync\" must be a string",
        ),
        case(
            "missing branch_id",
            "registerBranch",
            json!({"gid": "reg-open", "trans_type": "tcc", "confirm": bank.url("C"), "cancel": bank.url("D")}),
            400,
            "branch_id is required",
        ),
        case(
            "missing gid",
            "registerBranch",
            json!({"trans_type": "tcc", "branch_id": "01"}),
            400,
            "gid is required",
        ),
        case(
            "saga type",
            "registerBranch",
            json!({"gid": "reg-open", "trans_type": "saga", "branch_id": "02"}),
            400,
            "registerBranch is for tcc, xa and workflow",
        ),
        case(
            "bad confirm URL",
            "registerTccBranch",
            json!({"gid": "reg-open", "trans_type": "tcc", "branch_id": "02", "confirm": "tcp://x", "cancel": ""}),
            400,
            "not an http or https URL",
        ),
        case(
            "bad xa URL",
            "registerXaBranch",
            json!({"gid": "reg-open", "trans_type": "xa", "branch_id": "02", "url": "x"}),
            400,
            "not an http or https URL",
        ),
        case(
            "same branch, other content",
            "registerBranch",
            changed,
            409,
            "already registered with other content",
        ),
        case(
            "workflow branch without op",
            "registerBranch",
            json!({"gid": "reg-open", "trans_type": "workflow", "branch_id": "02", "status": "succeed"}),
            400,
            "op is required",
        ),
        case(
            "workflow branch with prepared status",
            "registerBranch",
            json!({"gid": "reg-open", "trans_type": "workflow", "branch_id": "02", "op": "action", "status": "prepared"}),
            400,
            "must be \"succeed\" or \"failed\"",
        ),
    ];
    run_cases(&ts, cases).await;
    // None of it added a row.
    assert_eq!(
        ts.state("reg-done").await,
        ("succeed".to_owned(), vec!["prepared".into(), "succeed".into()])
    );
    assert_eq!(
        ts.state("reg-open").await,
        ("prepared".to_owned(), vec!["prepared".into(), "prepared".into()])
    );
    // The idempotent retry of the same registration is fine, and the tcc still completes.
    assert_eq!(ts.post("registerBranch", tcc("reg-open", "01")).await.0, 200);
    assert_eq!(
        ts.post("submit", json!({"gid": "reg-open", "trans_type": "tcc"}))
            .await
            .0,
        200
    );
    ts.wait_status("reg-open", "succeed").await;
    others_untouched(&ts, &bank, &before).await;
}

#[tokio::test]
async fn state_conflicts_get_409_or_404() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let before = bystander(&ts, &bank).await;
    let cases = vec![
        case(
            "submit unknown tcc",
            "submit",
            json!({"gid": "sc-none", "trans_type": "tcc"}),
            404,
            "must be prepared first",
        ),
        case(
            "abort unknown",
            "abort",
            json!({"gid": "sc-none", "trans_type": "tcc"}),
            404,
            "no transaction",
        ),
        case(
            "abort a saga",
            "abort",
            json!({"gid": "bystander", "trans_type": "saga"}),
            409,
            "cannot abort",
        ),
        case(
            "prepare over a saga",
            "prepare",
            json!({"gid": "bystander", "trans_type": "tcc"}),
            409,
            "belongs to a saga",
        ),
        case(
            "submit as another mode",
            "submit",
            json!({"gid": "bystander", "trans_type": "msg"}),
            409,
            "belongs to a saga",
        ),
        case(
            "workflow over a saga",
            "prepareWorkflow",
            json!({"gid": "bystander", "trans_type": "workflow", "custom_data": "{\"name\":\"w\"}",
                "query_prepared": bank.url("Resume")}),
            409,
            "belongs to a saga",
        ),
    ];
    run_cases(&ts, cases).await;
    others_untouched(&ts, &bank, &before).await;
}

#[tokio::test]
async fn bad_query_parameters_get_400() {
    let ts = TestServer::start().await;
    for (route, message) in [
        ("all?limit=0", "limit must be between"),
        ("all?limit=-1", "limit must be between"),
        ("all?limit=100000", "limit must be between"),
        ("all?limit=ten", "limit must be an integer"),
        ("all?position=abc", "invalid position"),
        ("all?status=done", "unknown status"),
        ("all?transType=2pc", "unknown trans_type"),
        ("all?createTimeStart=yesterday", "createTimeStart must be an integer"),
        ("scanKV?cat=topics&position=x", "position must be an integer"),
        ("resetCronTime?timeout=soon", "timeout must be an integer"),
        (
            "resetCronTime?timeout=9223372036854775807",
            "timeout must be between 0 and 31536000",
        ),
        (
            "resetCronTime?timeout=99999999999999999999",
            "timeout must be an integer",
        ),
    ] {
        let (code, body) = ts.get(route).await;
        assert_envelope(route, code, &body, 400, message);
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let ts = TestServer::start().await;
    let base = format!("http://{}", ts.server.addr);
    for (method, path, status) in [
        ("GET", "/api/dtmsvr/nothing", 404),
        ("POST", "/api/dtmsvr/submitt", 404),
        // `GET /` is the console (tests/console_api.rs); anything else there is JSON.
        ("GET", "/nothing", 404),
        ("POST", "/", 405),
        ("POST", "/api/other", 404),
        ("DELETE", "/api/dtmsvr/topic", 404),
        ("GET", "/api/dtmsvr/submit", 405),
        ("POST", "/api/dtmsvr/query", 405),
        ("PUT", "/api/dtmsvr/topic/x", 405),
    ] {
        let response = ts
            .http
            .request(method.parse().expect("method"), format!("{base}{path}"))
            .send()
            .await
            .expect("reaches kubetx");
        let code = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text:?}"));
        assert_envelope(&format!("{method} {path}"), code, &body, status, "");
    }
}

#[tokio::test]
async fn bodies_over_the_configured_limit_get_413() {
    let ts = TestServer::start_with(|c| c.max_body_bytes = 1024).await;
    let bank = Bank::start().await;
    let before = bystander(&ts, &bank).await;

    let mut big = transfer_saga("too-big", &bank);
    big["payloads"] = json!(["x".repeat(2000), "{}"]);
    let (code, body) = ts.post("submit", big).await;
    assert_envelope("over the limit", code, &body, 413, "larger than the configured limit");
    assert_eq!(ts.transaction("too-big").await, Value::Null);

    // Just under the limit is fine.
    let mut small = transfer_saga("fits", &bank);
    let size = small.to_string().len();
    assert!(size < 1024);
    small["payloads"][0] = json!("y".repeat(1024 - size - 2));
    assert!(small.to_string().len() <= 1024);
    assert_eq!(ts.post("submit", small).await.0, 200);
    ts.wait_status("fits", "succeed").await;

    // Without a Content-Length (chunked) the limit holds as well.
    let request = "POST /api/dtmsvr/submit HTTP/1.1\r\nhost: kubetx\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(ts.server.addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write head");
    let chunk = format!(
        "{{\"gid\":\"chunked\",\"trans_type\":\"saga\",\"x\":\"{}\"}}",
        "z".repeat(4000)
    );
    // Send in pieces; the server may answer and close before all of it is written.
    for piece in chunk.as_bytes().chunks(500) {
        let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
        framed.extend_from_slice(piece);
        framed.extend_from_slice(b"\r\n");
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than the configured limit"), "{answer}");
    assert_eq!(ts.transaction("chunked").await, Value::Null);

    others_untouched(&ts, &bank, &before).await;
}

#[tokio::test]
async fn the_default_limit_accepts_900_kib_and_refuses_over_1_mib() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let payload = format!("{{\"blob\":\"{}\"}}", "p".repeat(900 * 1024));
    let mut body = transfer_saga("big-ok", &bank);
    body["payloads"] = json!([payload, "{}"]);
    assert_eq!(ts.post("submit", body).await.0, 200);
    ts.wait_status("big-ok", "succeed").await;
    let call = bank
        .calls()
        .into_iter()
        .find(|c| c.gid == "big-ok" && c.route == "TransOut")
        .expect("TransOut called");
    assert_eq!(call.body, payload, "the payload reaches the branch intact");

    let mut body = transfer_saga("big-no", &bank);
    body["payloads"] = json!(["q".repeat(1024 * 1024), "{}"]);
    let (code, reply) = ts.post("submit", body).await;
    assert_envelope("over 1 MiB", code, &reply, 413, "larger than the configured limit");
    assert_eq!(ts.transaction("big-no").await, Value::Null);
}

/// Odd but valid gids (spaces, URL syntax, non-ASCII) round-trip: the branch receives them
/// intact in its query string, and `/query` finds them.
#[tokio::test]
async fn odd_but_valid_gids_work() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    for gid in [
        "a b&c=d/e?f#g",
        "100%;DROP TABLE",
        "ü-日本-🙂",
        "'\"<>\\",
        &"x".repeat(128),
    ] {
        let (code, body) = ts.post("submit", transfer_saga(gid, &bank)).await;
        assert_eq!(code, 200, "{gid}: {body}");
        let query = format!("query?gid={}", urlencode(gid));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (code, body) = ts.get(&query).await;
            assert_eq!(code, 200, "{gid}: {body}");
            assert_eq!(body["transaction"]["gid"], gid, "{body}");
            if body["transaction"]["status"] == "succeed" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{gid} did not succeed: {body}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let calls: Vec<_> = bank.calls().into_iter().filter(|c| c.gid == gid).collect();
        assert_eq!(calls.len(), 2, "{gid}: the branches received the gid intact");
        let (code, page) = ts.get(&format!("all?gid={}", urlencode(gid))).await;
        assert_eq!(code, 200);
        assert_eq!(page["transactions"][0]["gid"], gid);
    }
}
