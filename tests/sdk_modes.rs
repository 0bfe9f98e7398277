//! The Rust SDK (`kubetx-client`) end to end: every mode against the real kubetx server, with
//! real HTTP services on 127.0.0.1, over success, FAILURE, ONGOING and unknown outcomes.

mod common;

use common::{Bank, Reply, TestServer};
use kubetx_client::{Dtm, Error, Msg, Saga, TccBuilder, WithOptions, XaBuilder};
use serde_json::json;

fn dtm(server: &TestServer) -> Dtm {
    Dtm::new(&server.server.dtm_url()).expect("dtm url")
}

fn transfer(dtm: &Dtm, gid: &str, bank: &Bank) -> Saga {
    Saga::new(dtm, gid)
        .add(
            &bank.url("TransOut"),
            &bank.url("TransOutRevert"),
            &json!({"amount": 30}),
        )
        .add(&bank.url("TransIn"), &bank.url("TransInRevert"), &json!({"amount": 30}))
}

#[tokio::test]
async fn new_gid_and_query_helpers() {
    let server = TestServer::start().await;
    let dtm = dtm(&server);
    let (a, b) = (dtm.new_gid().await.unwrap(), dtm.new_gid().await.unwrap());
    assert!(!a.is_empty() && a != b, "{a} {b}");
    let unknown = dtm.query("no-such-gid").await.unwrap();
    assert!(unknown.transaction.is_none() && unknown.branches.is_empty());
    assert!(dtm.query_global("no-such-gid").await.unwrap().is_none());
}

#[tokio::test]
async fn an_unreachable_coordinator_is_an_unknown_outcome() {
    let addr = common::free_addr();
    let dtm = Dtm::new(&format!("http://{addr}/api/dtmsvr")).unwrap();
    let err = dtm.new_gid().await.unwrap_err();
    assert!(err.is_unknown() && !err.is_failure() && !err.is_ongoing(), "{err}");
}

#[tokio::test]
async fn saga_succeeds_and_carries_options_to_the_branches() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = dtm(&server);
    transfer(&dtm, "sdk-saga-ok", &bank)
        .wait_result(true)
        .branch_header("x-tenant", "acme")
        .submit()
        .await
        .unwrap();
    assert_eq!(bank.routes("sdk-saga-ok"), ["TransOut", "TransIn"]);
    let call = &bank.calls_for("sdk-saga-ok")[0];
    assert_eq!(
        (call.branch_id.as_str(), call.op.as_str(), call.body.as_str()),
        ("01", "action", "{\"amount\":30}")
    );
    assert_eq!(call.headers["x-tenant"], "acme");
    let q = dtm.query("sdk-saga-ok").await.unwrap();
    assert_eq!(q.transaction.unwrap().status, "succeed");
    assert_eq!(q.branches.len(), 4);
}

#[tokio::test]
async fn saga_failure_rolls_back_and_says_failure() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    bank.script("TransIn", &[Reply::Failure]);
    let err = transfer(&dtm(&server), "sdk-saga-fail", &bank)
        .wait_result(true)
        .submit()
        .await
        .unwrap_err();
    assert!(err.is_failure(), "{err}");
    assert_eq!(
        bank.routes("sdk-saga-fail"),
        ["TransOut", "TransIn", "TransInRevert", "TransOutRevert"]
    );
    assert_eq!(server.state("sdk-saga-fail").await.0, "failed");
    // The rollback reason says FAILURE: the query is still a successful reply.
    let failed = dtm(&server).query_global("sdk-saga-fail").await.unwrap().unwrap();
    assert!(failed.rollback_reason.contains("FAILURE"), "{failed:?}");
}

#[tokio::test]
async fn saga_ongoing_and_unknown_branches_answer_ongoing_then_finish_on_retry() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = dtm(&server);
    for (gid, reply) in [("sdk-saga-ongoing", Reply::Ongoing), ("sdk-saga-unknown", Reply::Error)] {
        bank.script("TransOut", &[reply]);
        let err = transfer(&dtm, gid, &bank).wait_result(true).submit().await.unwrap_err();
        assert!(err.is_ongoing(), "{gid}: {err}");
        assert_eq!(server.state(gid).await.0, "submitted");
        server.advance_and_tick(3600).await;
        assert_eq!(server.state(gid).await.0, "succeed", "{gid}");
        assert!(
            !bank.routes(gid).iter().any(|r| r.ends_with("Revert")),
            "never compensated on {reply:?}"
        );
    }
}

#[tokio::test]
async fn concurrent_saga_honours_branch_orders() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    transfer(&dtm(&server), "sdk-saga-dag", &bank)
        .concurrent()
        .add_branch_order(1, &[0])
        .wait_result(true)
        .submit()
        .await
        .unwrap();
    assert_eq!(bank.routes("sdk-saga-dag"), ["TransOut", "TransIn"]);
    assert_eq!(server.state("sdk-saga-dag").await.0, "succeed");
}

#[tokio::test]
async fn a_bad_branch_url_is_refused_before_any_call() {
    let server = TestServer::start().await;
    let err = Saga::new(&dtm(&server), "sdk-saga-bad")
        .add("file:///etc/passwd", "", &json!({}))
        .submit()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(dtm(&server).query_global("sdk-saga-bad").await.unwrap().is_none());
}

#[tokio::test]
async fn msg_prepare_submit_and_topics() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = dtm(&server);
    let mut msg = Msg::new(&dtm, "sdk-msg").add(&bank.url("TransIn"), &json!({"amount": 30}));
    msg.prepare(&bank.url("QueryPrepared")).await.unwrap();
    assert_eq!(server.state("sdk-msg").await.0, "prepared");
    msg.submit().await.unwrap();
    server.wait_status("sdk-msg", "succeed").await;
    assert_eq!(bank.routes("sdk-msg"), ["TransIn"]);

    dtm.subscribe("transfers", &bank.url("Audit"), "audit").await.unwrap();
    Msg::new(&dtm, "sdk-msg-topic")
        .add_topic("transfers", &json!({"amount": 30}))
        .wait_result(true)
        .submit()
        .await
        .unwrap();
    assert_eq!(bank.routes("sdk-msg-topic"), ["Audit"]);
    let err = Msg::new(&dtm, "sdk-msg-no-topic")
        .add_topic("nobody", &1)
        .submit()
        .await
        .unwrap_err();
    assert!(!err.is_ongoing(), "{err}");
}

/// `do_and_submit` decides by the local transaction's outcome, asking the back-check itself
/// when that outcome is unknown.
#[tokio::test]
async fn msg_do_and_submit_over_every_outcome() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = dtm(&server);
    let qp = bank.url("QueryPrepared");
    let new = |gid: &str| Msg::new(&dtm, gid).add(&bank.url("TransIn"), &json!({"amount": 30}));

    new("sdk-dos-ok")
        .do_and_submit(&qp, |_| async { Ok(()) })
        .await
        .unwrap();
    server.wait_status("sdk-dos-ok", "succeed").await;

    let err = new("sdk-dos-fail")
        .do_and_submit(&qp, |_| async { Err(Error::Failure("no money".into())) })
        .await
        .unwrap_err();
    assert!(err.is_failure());
    assert_eq!(server.state("sdk-dos-fail").await.0, "failed");
    assert!(bank.routes("sdk-dos-fail").is_empty());

    // Unknown local outcome: the back-check says it committed, so the msg is submitted.
    let err = new("sdk-dos-unknown-ok")
        .do_and_submit(&qp, |_| async { Err(Error::Unknown("commit timed out".into())) })
        .await
        .unwrap_err();
    assert!(err.is_unknown());
    server.wait_status("sdk-dos-unknown-ok", "succeed").await;
    assert_eq!(bank.routes("sdk-dos-unknown-ok"), ["QueryPrepared", "TransIn"]);
    let check = &bank.calls_for("sdk-dos-unknown-ok")[0];
    assert_eq!((check.branch_id.as_str(), check.op.as_str()), ("00", "msg"));

    // The back-check says it rolled back: aborted.
    bank.script("QueryPrepared", &[Reply::Failure]);
    new("sdk-dos-unknown-no")
        .do_and_submit(&qp, |_| async { Err(Error::Unknown("commit timed out".into())) })
        .await
        .unwrap_err();
    assert_eq!(server.state("sdk-dos-unknown-no").await.0, "failed");

    // The back-check cannot tell either: left prepared for the coordinator's back-check.
    bank.script("QueryPrepared", &[Reply::Ongoing]);
    new("sdk-dos-unknown-later")
        .do_and_submit(&qp, |_| async { Err(Error::Unknown("commit timed out".into())) })
        .await
        .unwrap_err();
    assert_eq!(server.state("sdk-dos-unknown-later").await.0, "prepared");
    server.advance_and_tick(3600).await;
    assert_eq!(server.state("sdk-dos-unknown-later").await.0, "succeed");
}

fn tcc_routes(bank: &Bank, gid: &str) -> Vec<String> {
    bank.routes(gid)
}

#[tokio::test]
async fn tcc_confirms_on_success() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = dtm(&server);
    let body = json!({"amount": 30});
    let (b1, b2) = (body.clone(), body.clone());
    let bank2 = bank.clone();
    TccBuilder::new(&dtm, "sdk-tcc-ok")
        .wait_result(true)
        .run(|tcc| async move {
            tcc.call_branch(
                &b1,
                &bank2.url("OutTry"),
                &bank2.url("OutConfirm"),
                &bank2.url("OutCancel"),
            )
            .await?;
            tcc.call_branch(
                &b2,
                &bank2.url("InTry"),
                &bank2.url("InConfirm"),
                &bank2.url("InCancel"),
            )
            .await?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(server.state("sdk-tcc-ok").await.0, "succeed");
    let routes = tcc_routes(&bank, "sdk-tcc-ok");
    assert_eq!(routes[..2], ["OutTry", "InTry"]);
    assert!(routes.contains(&"OutConfirm".to_owned()) && routes.contains(&"InConfirm".to_owned()));
    let tries = bank.calls_on("InTry");
    assert_eq!((tries[0].branch_id.as_str(), tries[0].op.as_str()), ("02", "try"));
    assert!(tries[0].query.contains_key("dtm"));
}

#[tokio::test]
async fn tcc_cancels_every_registered_branch_on_failure_ongoing_and_unknown() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = dtm(&server);
    for (gid, reply) in [
        ("sdk-tcc-failure", Reply::Failure),
        ("sdk-tcc-ongoing", Reply::Ongoing),
        ("sdk-tcc-unknown", Reply::Error),
    ] {
        bank.script("InTry", &[reply]);
        let bank2 = bank.clone();
        let err = dtm
            .tcc_global_transaction(gid, |tcc| async move {
                tcc.call_branch(
                    &1,
                    &bank2.url("OutTry"),
                    &bank2.url("OutConfirm"),
                    &bank2.url("OutCancel"),
                )
                .await?;
                tcc.call_branch(&1, &bank2.url("InTry"), &bank2.url("InConfirm"), &bank2.url("InCancel"))
                    .await?;
                Ok(())
            })
            .await
            .unwrap_err();
        match reply {
            Reply::Failure => assert!(err.is_failure(), "{err}"),
            Reply::Ongoing => assert!(err.is_ongoing(), "{err}"),
            _ => assert!(err.is_unknown(), "{err}"),
        }
        server.wait_status(gid, "failed").await;
        let routes = bank.routes(gid);
        assert!(
            routes.contains(&"InCancel".to_owned()) && routes.contains(&"OutCancel".to_owned()),
            "{routes:?}"
        );
        assert!(!routes.iter().any(|r| r.ends_with("Confirm")), "{routes:?}");
        let reason = server.transaction(gid).await["rollback_reason"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(!reason.is_empty(), "{gid}: the abort carries the reason");
    }
}

#[tokio::test]
async fn xa_application_side_calls_branches_with_their_phase2_url_and_aborts_on_error() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = dtm(&server);
    bank.script("XaIn", &[Reply::Failure]);
    let bank2 = bank.clone();
    let err = XaBuilder::new(&dtm, "sdk-xa-ap")
        .run(|xa| async move {
            xa.call_branch(&json!({"amount": 30}), &bank2.url("XaOut")).await?;
            xa.call_branch(&json!({"amount": 30}), &bank2.url("XaIn")).await?;
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(err.is_failure(), "{err}");
    let call = &bank.calls_on("XaOut")[0];
    assert_eq!((call.branch_id.as_str(), call.op.as_str()), ("01", "action"));
    assert_eq!(call.query["phase2_url"], bank.url("XaOut"));
    server.wait_status("sdk-xa-ap", "failed").await;
}

/// The axum helpers on a real service: parameters from the query or the `dtm-*` headers, 400
/// without them, and results answered so that kubetx classifies them right.
#[tokio::test]
async fn axum_helpers_read_branch_parameters_and_answer_as_dtm_expects() {
    use axum::Router;
    use axum::extract::Path;
    use axum::routing::any;
    use kubetx_client::BranchParams;
    use kubetx_client::axum::Success;

    async fn branch(Path(outcome): Path<String>, params: BranchParams) -> kubetx_client::Result<Success> {
        assert!(!params.gid.is_empty());
        match outcome.as_str() {
            "failure" => Err(Error::Failure("no money".into())),
            "ongoing" => Err(Error::Ongoing("later".into())),
            // An unknown outcome whose text happens to say FAILURE must stay unknown.
            "unknown" => Err(Error::Unknown("the FAILURE of a disk".into())),
            _ => Ok(Success),
        }
    }
    let app = Router::new().route("/api/{outcome}", any(branch));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let query = "gid=g&trans_type=saga&branch_id=01&op=action";
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(http.get(format!("{base}/ok?{query}")).send().await.unwrap()),
        200
    );
    assert_eq!(
        status(http.get(format!("{base}/failure?{query}")).send().await.unwrap()),
        409
    );
    assert_eq!(
        status(http.get(format!("{base}/ongoing?{query}")).send().await.unwrap()),
        425
    );
    let unknown = http.get(format!("{base}/unknown?{query}")).send().await.unwrap();
    assert_eq!(unknown.status(), 500);
    assert!(!unknown.text().await.unwrap().contains("FAILURE"));
    let missing = http.get(format!("{base}/ok?gid=g")).send().await.unwrap();
    assert_eq!(missing.status(), 400);
    let by_headers = http
        .get(format!("{base}/ok"))
        .header("dtm-gid", "g")
        .header("dtm-trans_type", "tcc")
        .header("dtm-branch_id", "01")
        .header("dtm-op", "try")
        .send()
        .await
        .unwrap();
    assert_eq!(by_headers.status(), 200);

    // kubetx reads those answers: the 409 rolls a saga back, the 500 is retried.
    let server = TestServer::start().await;
    let dtm = dtm(&server);
    let err = Saga::new(&dtm, "sdk-axum-fail")
        .add(&format!("{base}/ok"), &format!("{base}/ok"), &1)
        .add(&format!("{base}/failure"), &format!("{base}/ok"), &1)
        .wait_result(true)
        .submit()
        .await
        .unwrap_err();
    assert!(err.is_failure(), "{err}");
    let err = Saga::new(&dtm, "sdk-axum-unknown")
        .add(&format!("{base}/unknown"), &format!("{base}/ok"), &1)
        .wait_result(true)
        .submit()
        .await
        .unwrap_err();
    assert!(err.is_ongoing(), "{err}");
    assert_eq!(
        server.state("sdk-axum-unknown").await.0,
        "submitted",
        "never rolled back"
    );
}

/// DTM's options travel with the transaction: the server stores and applies them.
#[tokio::test]
async fn options_reach_the_server() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = dtm(&server);
    transfer(&dtm, "sdk-options", &bank)
        .timeout_to_fail(120)
        .retry_interval(15)
        .request_timeout(7)
        .retry_limit(2)
        .wait_result(true)
        .submit()
        .await
        .unwrap();
    let stored = server.transaction("sdk-options").await.to_string();
    for expected in [
        "\"timeout_to_fail\":120",
        "\"retry_interval\":15",
        "\"request_timeout\":7",
        "\"retry_limit\":2",
    ] {
        assert!(stored.contains(expected), "{expected} not in {stored}");
    }

    // Msg: a delay holds delivery back; concurrent is accepted.
    let mut msg = Msg::new(&dtm, "sdk-msg-delay")
        .add(&bank.url("TransIn"), &1)
        .delay(30)
        .concurrent();
    msg.submit().await.unwrap();
    server.wait_parked("sdk-msg-delay").await;
    assert!(bank.routes("sdk-msg-delay").is_empty(), "delayed");
    server.advance_and_tick(60).await;
    assert_eq!(server.state("sdk-msg-delay").await.0, "succeed");
    assert_eq!(bank.routes("sdk-msg-delay"), ["TransIn"]);
}
