//! The exact bytes DTM's Go client (`dtmcli`) and Python client (`dtmcli` 1.7.7 on PyPI) send
//! (§16, §17 of the protocol notes) are accepted as they are, and the transactions complete.
//! Every answer is judged the way the clients judge it: success iff HTTP 200 and the body does
//! not contain `FAILURE`.

mod common;

use common::{Bank, Reply, TestServer};
use serde_json::{Value, json};

/// POSTs raw bytes as the SDKs do (`Content-Type: application/json`); returns status and text.
async fn send(ts: &TestServer, route: &str, body: &str) -> (u16, String) {
    let response = ts
        .http
        .post(ts.url(route))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request reaches kubetx");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// `TransCallDtmExt` (Go) and `utils.check_result` (Python): 200 and no `FAILURE` in the body.
fn client_accepts(answer: &(u16, String)) -> bool {
    answer.0 == 200 && !answer.1.contains("FAILURE")
}

async fn must_succeed(ts: &TestServer, route: &str, body: &str) {
    let answer = send(ts, route, body).await;
    assert!(client_accepts(&answer), "{route} {body}\n -> {answer:?}");
    assert_eq!(answer.1, r#"{"dtm_result":"SUCCESS"}"#);
}

/// Python's `json.dumps` of a payload dict: `{"amount": 30}` (with a space).
const PY_PAYLOAD: &str = r#"{\"amount\": 30}"#;
const GO_PAYLOAD: &str = r#"{\"amount\":30}"#;

/// The TransBase dict Python 1.7.7 posts for a saga or msg, key order and nulls included.
fn python_trans_base(gid: &str, trans_type: &str, steps: &str, payloads: &str, query_prepared: &str) -> String {
    format!(
        r#"{{"gid": "{gid}", "trans_type": "{trans_type}", "custom_data": null, "steps": {steps}, "payloads": {payloads}, "query_prepared": {query_prepared}, "protocol": null, "wait_result": false, "timeout_to_fail": 0, "request_timeout": 8, "retry_interval": 0, "passthrough_headers": [], "branch_headers": {{}}, "concurrent": false}}"#
    )
}

#[tokio::test]
async fn python_new_gid_is_read_from_json() {
    let ts = TestServer::start().await;
    let response = ts.http.get(ts.url("newGid")).send().await.expect("newGid");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    assert!(client_accepts(&(status, text.clone())), "{text}");
    let gid = serde_json::from_str::<Value>(&text).expect("JSON")["gid"]
        .as_str()
        .expect("gid")
        .to_owned();
    assert_eq!(gid.len(), 22);
}

#[tokio::test]
async fn python_saga_with_nulls_and_passthrough_headers() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let steps = format!(
        r#"[{{"action": "{}", "compensate": "{}"}}, {{"action": "{}", "compensate": "{}"}}]"#,
        bank.url("TransOut"),
        bank.url("TransOutRevert"),
        bank.url("TransIn"),
        bank.url("TransInRevert")
    );
    let payloads = format!(r#"["{PY_PAYLOAD}", "{PY_PAYLOAD}"]"#);
    let body = python_trans_base("py-saga", "saga", &steps, &payloads, "null");
    must_succeed(&ts, "submit", &body).await;
    let (status, branches) = ts.wait_status("py-saga", "succeed").await;
    assert_eq!(status, "succeed");
    assert_eq!(branches, ["prepared", "succeed", "prepared", "succeed"]);
    let calls: Vec<_> = bank.calls().into_iter().filter(|c| c.gid == "py-saga").collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].route, "TransOut");
    assert_eq!(calls[0].body, r#"{"amount": 30}"#, "the payload string is sent as is");
    assert_eq!(
        (
            calls[0].trans_type.as_str(),
            calls[0].branch_id.as_str(),
            calls[0].op.as_str()
        ),
        ("saga", "01", "action")
    );
    // request_timeout 8 became the transaction's branch timeout.
    let trans = ts.transaction("py-saga").await;
    assert_eq!(trans["request_timeout"], 8, "{trans}");
    assert_eq!(trans["protocol"], "http");
}

#[tokio::test]
async fn python_saga_rolls_back_on_failure() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    bank.script("TransIn", &[Reply::Failure]);
    let steps = format!(
        r#"[{{"action": "{}", "compensate": "{}"}}, {{"action": "{}", "compensate": "{}"}}]"#,
        bank.url("TransOut"),
        bank.url("TransOutRevert"),
        bank.url("TransIn"),
        bank.url("TransInRevert")
    );
    let payloads = format!(r#"["{PY_PAYLOAD}", "{PY_PAYLOAD}"]"#);
    must_succeed(
        &ts,
        "submit",
        &python_trans_base("py-saga-rb", "saga", &steps, &payloads, "null"),
    )
    .await;
    let (_, branches) = ts.wait_status("py-saga-rb", "failed").await;
    assert_eq!(branches, ["succeed", "succeed", "succeed", "failed"]);
    assert_eq!(
        bank.routes("py-saga-rb"),
        ["TransOut", "TransIn", "TransInRevert", "TransOutRevert"]
    );
}

/// The older `dtmcli-py` Saga posts only gid, trans_type and steps carrying `data`.
#[tokio::test]
async fn python_legacy_saga_with_step_data() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let body = format!(
        r#"{{"gid": "py-legacy", "trans_type": "saga", "steps": [{{"data": "{PY_PAYLOAD}", "action": "{}", "compensate": "{}"}}, {{"data": "{{\"amount\": 31}}", "action": "{}", "compensate": "{}"}}]}}"#,
        bank.url("TransOut"),
        bank.url("TransOutRevert"),
        bank.url("TransIn"),
        bank.url("TransInRevert")
    );
    must_succeed(&ts, "submit", &body).await;
    ts.wait_status("py-legacy", "succeed").await;
    let bodies: Vec<String> = bank
        .calls()
        .into_iter()
        .filter(|c| c.gid == "py-legacy")
        .map(|c| c.body)
        .collect();
    assert_eq!(bodies, [r#"{"amount": 30}"#, r#"{"amount": 31}"#]);
}

/// `Msg.do_and_submit`: prepare (with query_prepared), the local business, then submit with the
/// same dict.
#[tokio::test]
async fn python_msg_do_and_submit() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let steps = format!(
        r#"[{{"action": "{}"}}, {{"action": "{}"}}]"#,
        bank.url("TransIn"),
        bank.url("TransInOther")
    );
    let payloads = format!(r#"["{PY_PAYLOAD}", "{PY_PAYLOAD}"]"#);
    let query_prepared = format!(r#""{}""#, bank.url("QueryPrepared"));
    let body = python_trans_base("py-msg", "msg", &steps, &payloads, &query_prepared);
    must_succeed(&ts, "prepare", &body).await;
    assert_eq!(ts.state("py-msg").await.0, "prepared");
    assert!(bank.routes("py-msg").is_empty(), "nothing runs before the submit");
    must_succeed(&ts, "submit", &body).await;
    let (_, branches) = ts.wait_status("py-msg", "succeed").await;
    assert_eq!(branches, ["succeed", "succeed"]);
    assert_eq!(bank.routes("py-msg"), ["TransIn", "TransInOther"]);
    assert_eq!(
        ts.transaction("py-msg").await["query_prepared"],
        bank.url("QueryPrepared")
    );

    // The business failed with FAILURE: the client aborts with the same dict.
    let body = python_trans_base("py-msg-abort", "msg", &steps, &payloads, &query_prepared);
    must_succeed(&ts, "prepare", &body).await;
    must_succeed(&ts, "abort", &body).await;
    assert_eq!(ts.state("py-msg-abort").await.0, "failed");
    assert_eq!(ts.advance_and_tick(3600).await, 0);
    assert!(bank.routes("py-msg-abort").is_empty());

    // The client crashed between prepare and submit: the server's back-check (GET with
    // branch_id 00, op msg) finds it committed and delivers.
    let body = python_trans_base("py-msg-lost", "msg", &steps, &payloads, &query_prepared);
    must_succeed(&ts, "prepare", &body).await;
    assert_eq!(
        ts.advance_and_tick(40).await,
        1,
        "the default 35 s timeout triggers the back-check"
    );
    ts.wait_status("py-msg-lost", "succeed").await;
    let check = bank
        .calls()
        .into_iter()
        .find(|c| c.gid == "py-msg-lost")
        .expect("back-check");
    assert_eq!(check.route, "QueryPrepared");
    assert_eq!((check.branch_id.as_str(), check.op.as_str()), ("00", "msg"));
    assert_eq!(check.method, "GET");
}

/// `tcc_global_transaction` + `Tcc.call_branch`: prepare `{gid, trans_type}`, register (with the
/// extra `status: "prepared"`), the client calls try itself, then submit `{gid, trans_type}`.
#[tokio::test]
async fn python_tcc_flow() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let http = reqwest::Client::new();
    let tbody = r#"{"gid": "py-tcc", "trans_type": "tcc"}"#;
    must_succeed(&ts, "prepare", tbody).await;
    for (branch, amount) in [("01", 30), ("02", 40)] {
        let register = format!(
            r#"{{"gid": "py-tcc", "branch_id": "{branch}", "trans_type": "tcc", "status": "prepared", "data": "{{\"amount\": {amount}}}", "confirm": "{}", "cancel": "{}"}}"#,
            bank.url("TransConfirm"),
            bank.url("TransCancel")
        );
        must_succeed(&ts, "registerBranch", &register).await;
        // requests.post(tryUrl, json=body, params={gid, trans_type, branch_id, op})
        let tried = http
            .post(bank.url("TransTry"))
            .query(&[
                ("gid", "py-tcc"),
                ("trans_type", "tcc"),
                ("branch_id", branch),
                ("op", "try"),
            ])
            .json(&json!({"amount": amount}))
            .send()
            .await
            .expect("try");
        assert_eq!(tried.status().as_u16(), 200);
    }
    assert_eq!(
        ts.state("py-tcc").await,
        ("prepared".to_owned(), vec!["prepared".into(); 4])
    );
    must_succeed(&ts, "submit", tbody).await;
    let (_, branches) = ts.wait_status("py-tcc", "succeed").await;
    // Rows are (cancel, confirm) per branch.
    assert_eq!(branches, ["prepared", "succeed", "prepared", "succeed"]);
    let confirms: Vec<(String, String, String)> = bank
        .calls()
        .into_iter()
        .filter(|c| c.gid == "py-tcc" && c.route == "TransConfirm")
        .map(|c| (c.branch_id, c.op, c.body))
        .collect();
    assert_eq!(
        confirms,
        [
            ("02".to_owned(), "confirm".to_owned(), r#"{"amount": 40}"#.to_owned()),
            ("01".to_owned(), "confirm".to_owned(), r#"{"amount": 30}"#.to_owned()),
        ],
        "confirm runs last to first with the registered data"
    );

    // A try failed: the client aborts with the same two keys; cancel runs.
    let tbody = r#"{"gid": "py-tcc-abort", "trans_type": "tcc"}"#;
    must_succeed(&ts, "prepare", tbody).await;
    let register = format!(
        r#"{{"gid": "py-tcc-abort", "branch_id": "01", "trans_type": "tcc", "status": "prepared", "data": "{PY_PAYLOAD}", "confirm": "{}", "cancel": "{}"}}"#,
        bank.url("TransConfirm"),
        bank.url("TransCancel")
    );
    must_succeed(&ts, "registerBranch", &register).await;
    must_succeed(&ts, "abort", tbody).await;
    let (_, branches) = ts.wait_status("py-tcc-abort", "failed").await;
    assert_eq!(branches, ["succeed", "prepared"]);
    assert_eq!(bank.routes("py-tcc-abort"), ["TransCancel"]);
}

#[tokio::test]
async fn go_saga_as_the_go_client_marshals_it() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let body = format!(
        r#"{{"gid":"go-saga","trans_type":"saga","concurrent":false,"steps":[{{"action":"{}","compensate":"{}"}},{{"action":"{}","compensate":"{}"}}],"payloads":["{GO_PAYLOAD}","{GO_PAYLOAD}"],"protocol":""}}"#,
        bank.url("TransOut"),
        bank.url("TransOutRevert"),
        bank.url("TransIn"),
        bank.url("TransInRevert")
    );
    must_succeed(&ts, "submit", &body).await;
    ts.wait_status("go-saga", "succeed").await;
    // Submitting again after it succeeded is refused, as DTM does.
    let again = send(&ts, "submit", &body).await;
    assert!(!client_accepts(&again), "{again:?}");
    assert_eq!(again.0, 409);
    assert_eq!(bank.routes("go-saga"), ["TransOut", "TransIn"]);
    let out = bank.calls().into_iter().find(|c| c.gid == "go-saga").expect("called");
    assert_eq!(out.body, r#"{"amount":30}"#);
    assert_eq!(out.method, "POST");
    assert!(
        out.headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/json"))
    );
}

/// `Saga.Add(action, compensate, nil)` marshals the body to `null`: sent as the body `null`.
#[tokio::test]
async fn go_saga_with_nil_payload_and_headers() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let body = format!(
        r#"{{"gid":"go-nil","trans_type":"saga","branch_headers":{{"test_header":"yes"}},"concurrent":false,"steps":[{{"action":"{}","compensate":"{}"}}],"payloads":["null"],"protocol":""}}"#,
        bank.url("TransOut"),
        bank.url("TransOutRevert")
    );
    must_succeed(&ts, "submit", &body).await;
    ts.wait_status("go-nil", "succeed").await;
    let call = bank.calls().into_iter().find(|c| c.gid == "go-nil").expect("called");
    assert_eq!(call.body, "null");
    assert_eq!(call.method, "POST");
    assert_eq!(
        call.headers.get("test_header").and_then(|v| v.to_str().ok()),
        Some("yes")
    );
}

/// `SetConcurrent()` + `AddBranchOrder(1, []int{0})`: custom_data with sorted keys, and the option.
#[tokio::test]
async fn go_concurrent_saga_with_orders() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let custom = r#"{\"concurrent\":true,\"orders\":{\"1\":[0]}}"#;
    let body = format!(
        r#"{{"gid":"go-con","trans_type":"saga","custom_data":"{custom}","concurrent":true,"steps":[{{"action":"{}","compensate":"{}"}},{{"action":"{}","compensate":"{}"}},{{"action":"{}","compensate":"{}"}}],"payloads":["{GO_PAYLOAD}","{GO_PAYLOAD}","{GO_PAYLOAD}"],"protocol":""}}"#,
        bank.url("Step0"),
        bank.url("Step0Revert"),
        bank.url("Step1"),
        bank.url("Step1Revert"),
        bank.url("Step2"),
        bank.url("Step2Revert")
    );
    must_succeed(&ts, "submit", &body).await;
    let (_, branches) = ts.wait_status("go-con", "succeed").await;
    assert_eq!(
        branches,
        ["prepared", "succeed", "prepared", "succeed", "prepared", "succeed"]
    );
    let routes = bank.routes("go-con");
    let at = |r: &str| {
        routes
            .iter()
            .position(|x| x == r)
            .unwrap_or_else(|| panic!("{r} not called"))
    };
    assert!(at("Step1") > at("Step0"), "step 1 waits for step 0: {routes:?}");
    assert_eq!(routes.len(), 3);
    assert_eq!(ts.transaction("go-con").await["custom_data"], custom.replace('\\', ""));

    // Step 0 fails: step 1 (waiting for it) never runs; step 2, if it ran concurrently, is
    // compensated.
    bank.script("Step0", &[Reply::Failure]);
    let body = body.replace("go-con", "go-con-rb");
    must_succeed(&ts, "submit", &body).await;
    let (_, branches) = ts.wait_status("go-con-rb", "failed").await;
    assert_eq!(branches[1], "failed");
    assert_eq!(branches[3], "prepared", "step 1 never ran");
    assert_eq!(bank.count("go-con-rb", "Step1"), 0);
    assert_eq!(bank.count("go-con-rb", "Step1Revert"), 0);
    if bank.count("go-con-rb", "Step2") > 0 {
        assert_eq!(bank.count("go-con-rb", "Step2Revert"), 1);
    }
}

/// DTM's SagaCompatibleNormal: raw JSON with `steps[].data` (no payloads).
#[tokio::test]
async fn go_legacy_saga_with_step_data() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let body = format!(
        r#"{{"gid":"go-legacy","trans_type":"saga","steps":[{{"action":"{}","compensate":"{}","data":"{GO_PAYLOAD}"}},{{"action":"{}","compensate":"{}","data":"{GO_PAYLOAD}"}}],"protocol":""}}"#,
        bank.url("TransOut"),
        bank.url("TransOutRevert"),
        bank.url("TransIn"),
        bank.url("TransInRevert")
    );
    must_succeed(&ts, "submit", &body).await;
    let (_, branches) = ts.wait_status("go-legacy", "succeed").await;
    assert_eq!(branches, ["prepared", "succeed", "prepared", "succeed"]);
    for call in bank.calls().into_iter().filter(|c| c.gid == "go-legacy") {
        assert_eq!(call.body, r#"{"amount":30}"#);
    }
}

/// `Msg.DoAndSubmit`: prepare, business, submit. `SetDelay` adds custom_data only at submit;
/// kubetx keeps it (DTM loses it when the msg was prepared first).
#[tokio::test]
async fn go_msg_do_and_submit_with_delay() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let prepare = format!(
        r#"{{"gid":"go-msg","trans_type":"msg","concurrent":false,"steps":[{{"action":"{}"}}],"payloads":["{GO_PAYLOAD}"],"query_prepared":"{}","protocol":""}}"#,
        bank.url("TransIn"),
        bank.url("QueryPrepared")
    );
    must_succeed(&ts, "prepare", &prepare).await;
    must_succeed(&ts, "prepare", &prepare).await; // prepare twice is fine
    must_succeed(&ts, "submit", &prepare).await;
    ts.wait_status("go-msg", "succeed").await;
    assert_eq!(bank.routes("go-msg"), ["TransIn"]);
    let again = send(&ts, "prepare", &prepare).await;
    assert_eq!(again.0, 409, "prepare after submit is refused");
    assert!(!client_accepts(&again));

    let prepare = prepare.replace("go-msg", "go-msg-delay");
    let submit = prepare.replace(
        r#""trans_type":"msg","#,
        r#""trans_type":"msg","custom_data":"{\"delay\":10}","#,
    );
    must_succeed(&ts, "prepare", &prepare).await;
    must_succeed(&ts, "submit", &submit).await;
    ts.wait_parked("go-msg-delay").await;
    assert_eq!(ts.state("go-msg-delay").await.0, "submitted");
    assert!(bank.routes("go-msg-delay").is_empty(), "delayed");
    assert_eq!(ts.advance_and_tick(5).await, 0, "not yet");
    assert_eq!(ts.advance_and_tick(7).await, 1);
    ts.wait_status("go-msg-delay", "succeed").await;
    assert_eq!(bank.routes("go-msg-delay"), ["TransIn"]);
}

/// `TccGlobalTransaction`: prepare and submit with the TransBase JSON; `CallBranch` registers with
/// a map marshalled with sorted keys; an error aborts with the rollback reason.
#[tokio::test]
async fn go_tcc_flow_and_abort() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let tbody = r#"{"gid":"go-tcc","trans_type":"tcc","concurrent":false,"protocol":""}"#;
    must_succeed(&ts, "prepare", tbody).await;
    for branch in ["01", "02"] {
        let register = format!(
            r#"{{"branch_id":"{branch}","cancel":"{}","confirm":"{}","data":"{GO_PAYLOAD}","gid":"go-tcc","trans_type":"tcc"}}"#,
            bank.url("TransCancel"),
            bank.url("TransConfirm")
        );
        must_succeed(&ts, "registerBranch", &register).await;
    }
    must_succeed(&ts, "submit", tbody).await;
    let (_, branches) = ts.wait_status("go-tcc", "succeed").await;
    assert_eq!(branches, ["prepared", "succeed", "prepared", "succeed"]);
    assert_eq!(bank.routes("go-tcc"), ["TransConfirm", "TransConfirm"]);

    let tbody = r#"{"gid":"go-tcc-2","trans_type":"tcc","concurrent":false,"protocol":""}"#;
    must_succeed(&ts, "prepare", tbody).await;
    let register = format!(
        r#"{{"branch_id":"01","cancel":"{}","confirm":"{}","data":"{GO_PAYLOAD}","gid":"go-tcc-2","trans_type":"tcc"}}"#,
        bank.url("TransCancel"),
        bank.url("TransConfirm")
    );
    must_succeed(&ts, "registerBranch", &register).await;
    let abort = r#"{"gid":"go-tcc-2","trans_type":"tcc","concurrent":false,"protocol":"","rollback_reason":"insufficient balance"}"#;
    must_succeed(&ts, "abort", abort).await;
    let (_, branches) = ts.wait_status("go-tcc-2", "failed").await;
    assert_eq!(branches, ["succeed", "prepared"]);
    assert_eq!(bank.routes("go-tcc-2"), ["TransCancel"]);
    assert_eq!(
        ts.transaction("go-tcc-2").await["rollback_reason"],
        "insufficient balance"
    );
}

/// `XaGlobalTransaction`: prepare, register with the phase-2 URL, submit; commit is a POST.
#[tokio::test]
async fn go_xa_flow() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let tbody = r#"{"gid":"go-xa","trans_type":"xa","concurrent":false,"protocol":""}"#;
    must_succeed(&ts, "prepare", tbody).await;
    for branch in ["01", "02"] {
        let register = format!(
            r#"{{"branch_id":"{branch}","gid":"go-xa","trans_type":"xa","url":"{}"}}"#,
            bank.url("XaPhase2")
        );
        must_succeed(&ts, "registerXaBranch", &register).await;
    }
    must_succeed(&ts, "submit", tbody).await;
    let (_, branches) = ts.wait_status("go-xa", "succeed").await;
    assert_eq!(branches, ["prepared", "succeed", "prepared", "succeed"]);
    let commits: Vec<(String, String, String)> = bank
        .calls()
        .into_iter()
        .filter(|c| c.gid == "go-xa")
        .map(|c| (c.branch_id, c.op, c.method.to_string()))
        .collect();
    assert_eq!(
        commits,
        [
            ("01".to_owned(), "commit".to_owned(), "POST".to_owned()),
            ("02".to_owned(), "commit".to_owned(), "POST".to_owned()),
        ]
    );
}

/// Every error a client can meet fails the clients' check, and every success passes it.
#[tokio::test]
async fn clients_tell_success_from_failure() {
    let ts = TestServer::start().await;
    let bank = Bank::start().await;
    let saga = |gid: &str, wait: bool| {
        format!(
            r#"{{"gid":"{gid}","trans_type":"saga","wait_result":{wait},"concurrent":false,"steps":[{{"action":"{}","compensate":"{}"}}],"payloads":["{GO_PAYLOAD}"],"protocol":""}}"#,
            bank.url("TransIn"),
            bank.url("TransInRevert")
        )
    };
    must_succeed(&ts, "submit", &saga("ok-1", true)).await;
    // 409 FAILURE: rolled back.
    bank.script("TransIn", &[Reply::Failure]);
    let answer = send(&ts, "submit", &saga("rb-1", true)).await;
    assert_eq!(answer.0, 409);
    assert!(answer.1.contains("FAILURE") && !client_accepts(&answer));
    // 425 ONGOING: not a success either (the client then queries).
    bank.script("TransIn", &[Reply::Ongoing]);
    let answer = send(&ts, "submit", &saga("og-1", true)).await;
    assert_eq!(answer.0, 425);
    assert!(answer.1.contains("ONGOING") && !client_accepts(&answer));
    // 4xx without a DTM result.
    let answer = send(&ts, "submit", r#"{"gid":"","trans_type":"saga"}"#).await;
    assert_eq!(answer.0, 400);
    assert!(!client_accepts(&answer));
    // A body without a content type, as some HTTP clients send it, is accepted.
    let response = ts
        .http
        .post(ts.url("submit"))
        .body(saga("no-ctype", false))
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status().as_u16(), 200);
    ts.wait_status("no-ctype", "succeed").await;
}
