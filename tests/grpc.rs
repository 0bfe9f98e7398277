//! DTM's gRPC API and gRPC branches: the scenario suite of the HTTP tests (saga sequential and
//! concurrent with rollback, msg with back-check, TCC confirm and cancel, XA, workflow with
//! resume) driven by a client generated from the same `.proto` DTM's clients use, against a real
//! kubetx and real tonic branch services on 127.0.0.1; branch faults; byte-level fixtures of the
//! messages DTM's Go client sends; the outbound policy, tokens and TLS on the gRPC side.

mod common;
mod grpc_bank;

use std::collections::HashMap;
use std::str::FromStr;

use common::TestServer;
use grpc_bank::{GReply, GrpcBank, busi};
use kubetx::invoke::grpc::RawCodec;
use kubetx::proto::dtmgimp::dtm_client::DtmClient;
use kubetx::proto::dtmgimp::{DtmBranchRequest, DtmRequest, DtmTransOptions};
use kubetx::proto::workflow::WorkflowData;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

const S: &str = "succeed";
const F: &str = "failed";
const P: &str = "prepared";

fn state(status: &str, branches: &[&str]) -> (String, Vec<String>) {
    (status.to_owned(), branches.iter().map(|s| s.to_string()).collect())
}

async fn client(server: &TestServer) -> DtmClient<Channel> {
    let addr = server.server.grpc_addr.expect("the gRPC API is on");
    DtmClient::connect(format!("http://{addr}")).await.expect("connects")
}

/// A 2-step transfer saga as DTM's `dtmgrpc.NewSagaGrpc(...).Add(...)` builds it.
fn transfer_saga(gid: &str, bank: &GrpcBank, options: DtmTransOptions) -> DtmRequest {
    let steps = json!([
        {"action": bank.target("TransOut"), "compensate": bank.target("TransOutRevert")},
        {"action": bank.target("TransIn"), "compensate": bank.target("TransInRevert")},
    ]);
    DtmRequest {
        gid: gid.to_owned(),
        trans_type: "saga".to_owned(),
        trans_options: Some(options),
        bin_payloads: vec![busi(30), busi(30)],
        steps: steps.to_string(),
        ..DtmRequest::default()
    }
}

#[tokio::test]
async fn grpc_saga_succeeds_with_dtm_metadata_and_records_protocol_grpc() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    let gid = dtm.new_gid(()).await.expect("NewGid").into_inner().gid;
    assert_eq!(gid.len(), 22, "{gid}");
    let options = DtmTransOptions {
        branch_headers: HashMap::from([("x-tenant".to_owned(), "t1".to_owned())]),
        request_timeout: 2,
        ..DtmTransOptions::default()
    };
    dtm.submit(transfer_saga(&gid, &bank, options)).await.expect("Submit");
    assert_eq!(server.wait_status(&gid, S).await, state(S, &[P, S, P, S]));
    let trans = server.transaction(&gid).await;
    assert_eq!(trans["protocol"], "grpc");
    assert_eq!(trans["request_timeout"], 2);
    let calls = bank.calls_for(&gid);
    assert_eq!(bank.methods(&gid), ["TransOut", "TransIn"]);
    for (call, branch_id) in calls.iter().zip(["01", "02"]) {
        assert_eq!(
            (call.trans_type.as_str(), call.branch_id.as_str(), call.op.as_str()),
            ("saga", branch_id, "action")
        );
        assert_eq!(call.dtm.as_deref(), Some(""), "dtm-dtm is sent, empty");
        assert_eq!(call.metadata.get("x-tenant").map(|v| v.to_str().ok()), Some(Some("t1")));
        // The payload arrives verbatim: it decodes as the message the client encoded.
        let req: grpc_bank::BusiReq = prost::Message::decode(call.body.as_slice()).expect("BusiReq");
        assert_eq!((req.amount, req.user_id.as_str()), (30, "u1"));
    }
    // A finished saga cannot be submitted again: DTM's FAILURE, as Aborted.
    let again = dtm
        .submit(transfer_saga(&gid, &bank, DtmTransOptions::default()))
        .await
        .expect_err("finished");
    assert_eq!(again.code(), Code::Aborted, "{again:?}");
    assert_eq!(server.advance_and_tick(3600).await, 0);
}

#[tokio::test]
async fn grpc_saga_aborted_branch_rolls_back_and_wait_result_answers_aborted() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    bank.script("TransIn", &[GReply::Aborted]);
    let options = DtmTransOptions {
        wait_result: true,
        ..DtmTransOptions::default()
    };
    let error = dtm
        .submit(transfer_saga("g-saga-rollback", &bank, options.clone()))
        .await
        .expect_err("the saga failed");
    assert_eq!(error.code(), Code::Aborted, "{error:?}");
    assert_eq!(server.state("g-saga-rollback").await, state(F, &[S, S, S, F]));
    assert_eq!(
        bank.methods("g-saga-rollback"),
        ["TransOut", "TransIn", "TransInRevert", "TransOutRevert"]
    );
    let reverts = bank.calls_for("g-saga-rollback");
    assert_eq!(reverts[2].op, "compensate");
    // And a saga that succeeds answers OK to wait_result.
    dtm.submit(transfer_saga("g-saga-ok", &bank, options))
        .await
        .expect("OK");
    assert_eq!(server.state("g-saga-ok").await.0, S);
    // Both answers are counted like the HTTP routes', with the HTTP status of the same outcome.
    let metrics = server
        .http
        .get(format!("http://{}/api/metrics", server.server.addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for code in ["200", "409"] {
        let series = metrics
            .lines()
            .any(|l| l.contains("api=\"grpc_submit\"") && l.contains(&format!("code=\"{code}\"")));
        assert!(series, "no grpc_submit {code} series in:\n{metrics}");
    }
}

#[tokio::test]
async fn grpc_concurrent_saga_rolls_back_through_custom_data() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    bank.script("TransIn", &[GReply::Aborted]);
    let mut saga = transfer_saga("g-conc", &bank, DtmTransOptions::default());
    saga.customed_data = json!({"concurrent": true, "orders": {}}).to_string();
    dtm.submit(saga).await.expect("Submit");
    assert_eq!(server.wait_status("g-conc", F).await.0, F);
    let mut methods = bank.methods("g-conc");
    methods.sort();
    assert_eq!(methods, ["TransIn", "TransInRevert", "TransOut", "TransOutRevert"]);
    assert_eq!(server.transaction("g-conc").await["protocol"], "grpc");
}

fn transfer_msg(gid: &str, bank: &GrpcBank) -> DtmRequest {
    DtmRequest {
        gid: gid.to_owned(),
        trans_type: "msg".to_owned(),
        bin_payloads: vec![busi(30), busi(40)],
        steps: json!([{"action": bank.target("TransOut")}, {"action": bank.target("TransIn")}]).to_string(),
        query_prepared: bank.target("QueryPrepared"),
        ..DtmRequest::default()
    }
}

#[tokio::test]
async fn grpc_msg_prepare_submit_and_back_check() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    // Prepared and submitted: delivered in order.
    dtm.prepare(transfer_msg("g-msg", &bank)).await.expect("Prepare");
    assert_eq!(server.state("g-msg").await, state(P, &[P, P]));
    dtm.submit(transfer_msg("g-msg", &bank)).await.expect("Submit");
    assert_eq!(server.wait_status("g-msg", S).await, state(S, &[S, S]));
    assert_eq!(bank.methods("g-msg"), ["TransOut", "TransIn"]);
    // Prepared and never submitted: the back-check decides, over gRPC.
    dtm.prepare(transfer_msg("g-msg-commit", &bank)).await.expect("Prepare");
    let mut refused = transfer_msg("g-msg-abort", &bank);
    refused.query_prepared = bank.target("QueryPreparedRefused");
    dtm.prepare(refused).await.expect("Prepare");
    bank.script("QueryPreparedRefused", &[GReply::Aborted]);
    server.advance_and_tick(40).await;
    let commit = server.wait_status("g-msg-commit", S).await;
    let abort = server.wait_status("g-msg-abort", F).await;
    assert_eq!((commit, abort), (state(S, &[S, S]), state(F, &[P, P])));
    let check = &bank.calls_for("g-msg-commit")[0];
    assert_eq!(
        (check.method.as_str(), check.branch_id.as_str(), check.op.as_str()),
        ("QueryPrepared", "00", "msg")
    );
    assert_eq!(bank.methods("g-msg-abort"), ["QueryPreparedRefused"]);
}

fn tcc_branch(gid: &str, bank: &GrpcBank, branch_id: &str, method: &str, amount: i64) -> DtmBranchRequest {
    DtmBranchRequest {
        gid: gid.to_owned(),
        trans_type: "tcc".to_owned(),
        branch_id: branch_id.to_owned(),
        op: "try".to_owned(),
        data: HashMap::from([
            ("confirm".to_owned(), bank.target(&format!("{method}Confirm"))),
            ("cancel".to_owned(), bank.target(&format!("{method}Cancel"))),
        ]),
        busi_payload: busi(amount),
    }
}

fn prepared(gid: &str, trans_type: &str) -> DtmRequest {
    DtmRequest {
        gid: gid.to_owned(),
        trans_type: trans_type.to_owned(),
        ..DtmRequest::default()
    }
}

#[tokio::test]
async fn grpc_tcc_confirms_on_submit_and_cancels_on_abort() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    for gid in ["g-tcc-ok", "g-tcc-cancel"] {
        dtm.prepare(prepared(gid, "tcc")).await.expect("Prepare");
        for (id, method) in [("01", "TransOut"), ("02", "TransIn")] {
            dtm.register_branch(tcc_branch(gid, &bank, id, method, 30))
                .await
                .expect("RegisterBranch");
        }
        // Registering twice is idempotent.
        dtm.register_branch(tcc_branch(gid, &bank, "01", "TransOut", 30))
            .await
            .expect("RegisterBranch again");
    }
    dtm.submit(prepared("g-tcc-ok", "tcc")).await.expect("Submit");
    assert_eq!(server.wait_status("g-tcc-ok", S).await.0, S);
    let mut confirmed = bank.methods("g-tcc-ok");
    confirmed.sort();
    assert_eq!(confirmed, ["TransInConfirm", "TransOutConfirm"]);
    let calls = bank.calls_for("g-tcc-ok");
    let confirm = calls.iter().find(|c| c.branch_id == "01").expect("01 confirmed");
    assert_eq!((confirm.op.as_str(), confirm.body.clone()), ("confirm", busi(30)));
    let mut abort = prepared("g-tcc-cancel", "tcc");
    abort.rollback_reason = "user gave up".to_owned();
    dtm.abort(abort).await.expect("Abort");
    assert_eq!(server.wait_status("g-tcc-cancel", F).await.0, F);
    let mut cancelled = bank.methods("g-tcc-cancel");
    cancelled.sort();
    assert_eq!(cancelled, ["TransInCancel", "TransOutCancel"]);
    // A finished transaction refuses more branches with DTM's FAILURE code.
    let late = dtm
        .register_branch(tcc_branch("g-tcc-ok", &bank, "03", "TransOut", 1))
        .await
        .expect_err("finished");
    assert_eq!(late.code(), Code::Aborted, "{late:?}");
}

#[tokio::test]
async fn grpc_xa_commits_registered_branches() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    dtm.prepare(prepared("g-xa", "xa")).await.expect("Prepare");
    for id in ["01", "02"] {
        dtm.register_branch(DtmBranchRequest {
            gid: "g-xa".to_owned(),
            trans_type: "xa".to_owned(),
            branch_id: id.to_owned(),
            op: "action".to_owned(),
            data: HashMap::from([("url".to_owned(), bank.target("XaNotify"))]),
            busi_payload: busi(5),
        })
        .await
        .expect("RegisterBranch");
    }
    dtm.submit(prepared("g-xa", "xa")).await.expect("Submit");
    assert_eq!(server.wait_status("g-xa", S).await.0, S);
    let ops: Vec<(String, String)> = bank
        .calls_for("g-xa")
        .into_iter()
        .map(|c| (c.branch_id, c.op))
        .collect();
    assert_eq!(
        ops,
        [
            ("01".to_owned(), "commit".to_owned()),
            ("02".to_owned(), "commit".to_owned())
        ]
    );
    // DTM's XA resource managers read their phase-2 address from the metadata.
    let phase2 = bank.calls_for("g-xa")[0].metadata.get("dtm-phase2_url").cloned();
    assert_eq!(
        phase2.and_then(|v| v.to_str().ok().map(str::to_owned)),
        Some(bank.target("XaNotify"))
    );
}

#[tokio::test]
async fn grpc_workflow_records_progress_and_resumes_through_workflow_execute() {
    use base64::Engine as _;
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    let input = busi(77);
    let workflow = DtmRequest {
        gid: "g-wf".to_owned(),
        trans_type: "workflow".to_owned(),
        customed_data: json!({
            "name": "transfer",
            "data": base64::engine::general_purpose::STANDARD.encode(&input),
        })
        .to_string(),
        query_prepared: bank.workflow_target(),
        ..DtmRequest::default()
    };
    let reply = dtm
        .prepare_workflow(workflow.clone())
        .await
        .expect("PrepareWorkflow")
        .into_inner();
    let trans = reply.transaction.expect("transaction");
    assert_eq!((trans.gid.as_str(), trans.status.as_str()), ("g-wf", P));
    assert!(reply.progresses.is_empty());
    // A step's result is recorded as bytes (a proto reply, not UTF-8 text).
    let result = vec![0x0a, 0x02, 0xff, 0x00];
    dtm.register_branch(DtmBranchRequest {
        gid: "g-wf".to_owned(),
        trans_type: "workflow".to_owned(),
        branch_id: "01".to_owned(),
        op: "action".to_owned(),
        data: HashMap::from([("status".to_owned(), S.to_owned())]),
        busi_payload: result.clone(),
    })
    .await
    .expect("RegisterBranch");
    let reply = dtm.prepare_workflow(workflow).await.expect("again").into_inner();
    assert_eq!(reply.progresses.len(), 1);
    let progress = &reply.progresses[0];
    assert_eq!(
        (
            progress.branch_id.as_str(),
            progress.op.as_str(),
            progress.status.as_str()
        ),
        ("01", "action", S)
    );
    assert_eq!(progress.bin_data, result, "bytes survive the round trip");
    // The client went away: kubetx resumes it through workflow.Workflow/Execute.
    server.advance_and_tick(60).await;
    let calls = bank.wait_calls("g-wf", 1).await;
    assert_eq!(
        (
            calls[0].method.as_str(),
            calls[0].branch_id.as_str(),
            calls[0].op.as_str()
        ),
        ("Execute", "00", "transfer")
    );
    let data: WorkflowData = prost::Message::decode(calls[0].body.as_slice()).expect("WorkflowData");
    assert_eq!(data.data, input);
    // The resumed client finishes it.
    dtm.submit(DtmRequest {
        gid: "g-wf".to_owned(),
        trans_type: "workflow".to_owned(),
        req_extra: HashMap::from([("status".to_owned(), S.to_owned())]),
        ..DtmRequest::default()
    })
    .await
    .expect("Submit");
    assert_eq!(server.state("g-wf").await.0, S);
    assert_eq!(server.transaction("g-wf").await["protocol"], "grpc");
}

#[tokio::test]
async fn grpc_branch_faults_are_unknown_outcomes_never_failures() {
    let (server, bank) = (
        TestServer::start_with(|c| c.request_timeout = 1).await,
        GrpcBank::start().await,
    );
    let mut dtm = client(&server).await;
    // Nobody listens: Unavailable.
    let closed = GrpcBank::start().await;
    closed.kill();
    let dead = closed.target("TransOut");
    drop(closed);
    let mut saga = transfer_saga("g-unavailable", &bank, DtmTransOptions::default());
    saga.steps = json!([{"action": dead, "compensate": bank.target("TransOutRevert")}]).to_string();
    saga.bin_payloads.truncate(1);
    dtm.submit(saga).await.expect("Submit");
    // Deadline exceeded, and an Unavailable status from a live server.
    bank.script("TransOut", &[GReply::Slow(3000), GReply::Unavailable]);
    dtm.submit(transfer_saga("g-slow", &bank, DtmTransOptions::default()))
        .await
        .expect("Submit");
    for gid in ["g-unavailable", "g-slow"] {
        let parked = server.wait_parked(gid).await;
        assert_eq!(parked["status"], "submitted", "{gid}: {parked}");
    }
    assert_eq!(server.state("g-slow").await, state("submitted", &[P, P, P, P]));
    assert_eq!(server.state("g-unavailable").await, state("submitted", &[P, P]));
    assert!(!bank.methods("g-slow").iter().any(|m| m.ends_with("Revert")));
    // The retry meets the scripted Unavailable: still unknown, still not compensated.
    server.advance_and_tick(20).await;
    assert_eq!(server.wait_parked("g-slow").await["status"], "submitted");
    // The third attempt succeeds.
    server.advance_and_tick(60).await;
    assert_eq!(server.wait_status("g-slow", S).await, state(S, &[P, S, P, S]));
    assert_eq!(bank.methods("g-slow"), ["TransOut", "TransOut", "TransOut", "TransIn"]);
}

#[tokio::test]
async fn grpc_branch_server_that_answers_then_dies_is_retried_after_it_returns() {
    let (server, bank) = (
        TestServer::start_with(|c| c.request_timeout = 2).await,
        GrpcBank::start().await,
    );
    let mut dtm = client(&server).await;
    bank.script("TransIn", &[GReply::Die]);
    dtm.submit(transfer_saga("g-dies", &bank, DtmTransOptions::default()))
        .await
        .expect("Submit");
    let parked = server.wait_parked("g-dies").await;
    assert_eq!(parked["status"], "submitted", "{parked}");
    assert_eq!(server.state("g-dies").await, state("submitted", &[P, S, P, P]));
    assert_eq!(bank.methods("g-dies"), ["TransOut", "TransIn"]);
    // Still down: the pooled channel's reconnect is refused, an unknown outcome again.
    server.advance_and_tick(20).await;
    assert_eq!(server.wait_parked("g-dies").await["status"], "submitted");
    // Back on the same port: the same channel reconnects and the saga completes.
    bank.restart().await;
    server.advance_and_tick(60).await;
    assert_eq!(server.wait_status("g-dies", S).await, state(S, &[P, S, P, S]));
    assert!(!bank.methods("g-dies").iter().any(|m| m.ends_with("Revert")));
}

#[tokio::test]
async fn grpc_errors_use_dtm_status_codes() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    let mut cases = vec![
        (prepared("", "saga"), Code::InvalidArgument, "gid is required"),
        (prepared("g-x", "nonsense"), Code::InvalidArgument, "unknown trans_type"),
    ];
    let mut bad_steps = transfer_saga("g-bad-steps", &bank, DtmTransOptions::default());
    bad_steps.steps = "{not json".to_owned();
    cases.push((bad_steps, Code::InvalidArgument, "Steps is not valid JSON"));
    let mut discovery = transfer_saga("g-etcd", &bank, DtmTransOptions::default());
    discovery.steps =
        json!([{"action": "etcd://127.0.0.1:2379/busi/busi.Busi/TransOut", "compensate": ""}]).to_string();
    cases.push((discovery, Code::InvalidArgument, "service discovery is not supported"));
    // What every call would carry as metadata must be sendable, or every call would fail.
    cases.push((
        transfer_saga("g-é", &bank, DtmTransOptions::default()),
        Code::InvalidArgument,
        "cannot be sent as gRPC metadata",
    ));
    let binary_header = DtmTransOptions {
        branch_headers: HashMap::from([("x-trace-bin".to_owned(), "abc".to_owned())]),
        ..DtmTransOptions::default()
    };
    cases.push((
        transfer_saga("g-bin", &bank, binary_header),
        Code::InvalidArgument,
        "cannot be sent as gRPC metadata",
    ));
    for (request, code, text) in cases {
        let error = dtm.submit(request).await.expect_err("refused");
        assert_eq!(error.code(), code, "{error:?}");
        assert!(error.message().contains(text), "{error:?} should mention {text}");
    }
    // FAILURE is Aborted: a prepared msg cannot be prepared as another mode's transaction.
    dtm.submit(transfer_saga("g-done", &bank, DtmTransOptions::default()))
        .await
        .expect("Submit");
    server.wait_status("g-done", S).await;
    let error = dtm.prepare(prepared("g-done", "tcc")).await.expect_err("finished");
    assert_eq!(error.code(), Code::Aborted, "{error:?}");
    // Abort of an unknown gid.
    let error = dtm.abort(prepared("g-none", "tcc")).await.expect_err("unknown");
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
}

#[tokio::test]
async fn grpc_topics_subscribe_and_deliver_msg_to_grpc_subscribers() {
    use kubetx::proto::dtmgimp::DtmTopicRequest;
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    let topic = |url: String| DtmTopicRequest {
        topic: "transfers".to_owned(),
        url,
        remark: "grpc".to_owned(),
    };
    dtm.subscribe(topic(bank.target("Audit"))).await.expect("Subscribe");
    dtm.subscribe(topic(bank.target("Ledger"))).await.expect("Subscribe");
    let twice = dtm.subscribe(topic(bank.target("Ledger"))).await.expect_err("twice");
    assert_eq!(twice.code(), Code::Aborted);
    let mut msg = transfer_msg("g-topic", &bank);
    msg.steps = json!([{"action": "topic://transfers"}]).to_string();
    msg.bin_payloads = vec![busi(9)];
    dtm.submit(msg).await.expect("Submit");
    assert_eq!(server.wait_status("g-topic", S).await, state(S, &[S, S]));
    let mut methods = bank.methods("g-topic");
    methods.sort();
    assert_eq!(methods, ["Audit", "Ledger"]);
    dtm.unsubscribe(topic(bank.target("Audit"))).await.expect("Unsubscribe");
    dtm.delete_topic(topic(String::new())).await.expect("DeleteTopic");
    let gone = dtm.delete_topic(topic(String::new())).await.expect_err("gone");
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn grpc_api_requires_the_http_api_tokens() {
    let server = TestServer::start_with(|c| c.api_tokens = vec!["s3cret".to_owned()]).await;
    let mut dtm = client(&server).await;
    let error = dtm.new_gid(()).await.expect_err("no token");
    assert_eq!(error.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("authorization", "Bearer wrong".parse().expect("ascii"));
    assert_eq!(
        dtm.new_gid(request).await.expect_err("wrong token").code(),
        Code::Unauthenticated
    );
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("ascii"));
    assert!(dtm.new_gid(request).await.is_ok());
}

#[tokio::test]
async fn grpc_api_over_tls_with_the_http_api_certificate() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let fixture = |name: &str| format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"));
    let server = TestServer::start_with(|c| {
        c.tls_cert_file = fixture("server.pem");
        c.tls_key_file = fixture("server.key");
    })
    .await;
    let addr = server.server.grpc_addr.expect("on");
    let ca = std::fs::read(fixture("ca.pem")).expect("ca");
    let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .expect("uri")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .expect("tls")
        .connect()
        .await
        .expect("TLS connection");
    let gid = DtmClient::new(channel).new_gid(()).await.expect("NewGid over TLS");
    assert_eq!(gid.into_inner().gid.len(), 22);
    // Plaintext is refused.
    let plain = DtmClient::connect(format!("http://{addr}")).await;
    let refused = match plain {
        Ok(mut client) => client.new_gid(()).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "plaintext gRPC must not be served next to TLS");
}

#[tokio::test]
async fn grpc_api_with_client_certificates_requires_one() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let fixture = |name: &str| format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| std::fs::read(fixture(name)).expect("fixture");
    let server = TestServer::start_with(|c| {
        c.tls_cert_file = fixture("server.pem");
        c.tls_key_file = fixture("server.key");
        c.tls_client_ca_file = fixture("client-ca.pem");
    })
    .await;
    let addr = server.server.grpc_addr.expect("on");
    let connect = |identity: Option<Identity>| {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.pem")));
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        let endpoint = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .expect("uri")
            .tls_config(tls)
            .expect("tls");
        async move {
            match endpoint.connect().await {
                Ok(channel) => DtmClient::new(channel).new_gid(()).await.is_ok(),
                Err(_) => false,
            }
        }
    };
    assert!(!connect(None).await, "a client without a certificate is refused");
    let identity = Identity::from_pem(read("client.pem"), read("client.key"));
    assert!(connect(Some(identity)).await, "a client with one is served");
}

#[tokio::test]
async fn outbound_policy_applies_to_grpc_targets_on_the_address_dialed() {
    // Only the name `localhost` is allowed, no address range: a literal 127.0.0.1 is refused at
    // submit, and `localhost` is refused when it resolves to a loopback address.
    let (server, bank) = (
        TestServer::start_with(|c| c.allow_hosts = vec!["localhost".to_owned()]).await,
        GrpcBank::start().await,
    );
    let mut dtm = client(&server).await;
    let error = dtm
        .submit(transfer_saga("g-literal", &bank, DtmTransOptions::default()))
        .await
        .expect_err("refused");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("endpoint refused"), "{error:?}");
    let by_name = format!("localhost:{}/busi.Busi/TransOut", bank.addr.port());
    let mut saga = transfer_saga("g-by-name", &bank, DtmTransOptions::default());
    saga.steps = json!([{"action": by_name, "compensate": ""}]).to_string();
    saga.bin_payloads.truncate(1);
    dtm.submit(saga).await.expect("the name is allowed");
    let parked = server.wait_parked("g-by-name").await;
    assert_eq!(parked["status"], "submitted", "{parked}");
    assert!(bank.calls().is_empty(), "no call reached the bank");
}

#[tokio::test]
async fn grpcs_branches_use_the_branch_ca_and_an_untrusted_server_is_an_unknown_outcome() {
    let fixture = |name: &str| format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"));
    let bank = GrpcBank::start_tls().await;
    let trusting = TestServer::start_with(|c| c.branch_ca_file = fixture("ca.pem")).await;
    let untrusting = TestServer::start_with(|c| c.request_timeout = 1).await;
    let tls_saga = |gid: &str| {
        let mut saga = transfer_saga(gid, &bank, DtmTransOptions::default());
        let target = |m: &str| format!("grpcs://localhost:{}/busi.Busi/{m}", bank.addr.port());
        saga.steps = json!([{"action": target("TransOut"), "compensate": target("TransOutRevert")}]).to_string();
        saga.bin_payloads.truncate(1);
        saga
    };
    client(&trusting).await.submit(tls_saga("g-tls")).await.expect("Submit");
    assert_eq!(trusting.wait_status("g-tls", S).await, state(S, &[P, S]));
    assert_eq!(bank.methods("g-tls"), ["TransOut"]);
    client(&untrusting)
        .await
        .submit(tls_saga("g-untrusted"))
        .await
        .expect("Submit");
    let parked = untrusting.wait_parked("g-untrusted").await;
    assert_eq!(parked["status"], "submitted", "{parked}");
    assert!(
        bank.methods("g-untrusted").is_empty(),
        "no call without a trusted handshake"
    );
}

#[tokio::test]
async fn grpcs_branches_present_the_branch_client_certificate() {
    let fixture = |name: &str| format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"));
    let bank = GrpcBank::start_mtls().await;
    let with_identity = TestServer::start_with(|c| {
        c.branch_ca_file = fixture("ca.pem");
        c.branch_client_cert_file = fixture("client.pem");
        c.branch_client_key_file = fixture("client.key");
    })
    .await;
    let anonymous = TestServer::start_with(|c| {
        c.branch_ca_file = fixture("ca.pem");
        c.request_timeout = 1;
    })
    .await;
    let saga = |gid: &str| {
        let mut saga = transfer_saga(gid, &bank, DtmTransOptions::default());
        let target = format!("grpcs://localhost:{}/busi.Busi/TransOut", bank.addr.port());
        saga.steps = json!([{"action": target, "compensate": ""}]).to_string();
        saga.bin_payloads.truncate(1);
        saga
    };
    client(&with_identity)
        .await
        .submit(saga("g-mtls"))
        .await
        .expect("Submit");
    assert_eq!(with_identity.wait_status("g-mtls", S).await.0, S);
    client(&anonymous)
        .await
        .submit(saga("g-anonymous"))
        .await
        .expect("Submit");
    assert_eq!(anonymous.wait_parked("g-anonymous").await["status"], "submitted");
    assert_eq!(bank.methods("g-mtls"), ["TransOut"]);
    assert!(bank.methods("g-anonymous").is_empty(), "refused at the handshake");
}

// ----- Byte-level fixtures: the exact messages DTM's Go client (dtmgrpc) sends. -----

/// Protobuf wire encoding by hand, so that the fixtures do not depend on the generated code.
fn field_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn field_varint(out: &mut Vec<u8>, field: u32, value: u64) {
    varint(out, u64::from(field << 3));
    varint(out, value);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn map_entry(key: &str, value: &str) -> Vec<u8> {
    let mut entry = Vec::new();
    field_bytes(&mut entry, 1, key.as_bytes());
    field_bytes(&mut entry, 2, value.as_bytes());
    entry
}

/// `DtmTransOptions` as dtmgrpc fills it from `TransOptions`.
fn options_bytes(wait_result: bool, timeout_to_fail: u64, retry_interval: u64, request_timeout: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if wait_result {
        field_varint(&mut out, 1, 1);
    }
    if timeout_to_fail > 0 {
        field_varint(&mut out, 2, timeout_to_fail);
    }
    if retry_interval > 0 {
        field_varint(&mut out, 3, retry_interval);
    }
    field_bytes(&mut out, 5, &map_entry("x-request-id", "r-1"));
    if request_timeout > 0 {
        field_varint(&mut out, 6, request_timeout);
    }
    out
}

/// Sends already-encoded bytes to a `dtmgimp.Dtm` method, as DTM's Go client puts them on the
/// wire.
async fn raw_call(server: &TestServer, method: &str, body: Vec<u8>) -> Result<(), tonic::Status> {
    let addr = server.server.grpc_addr.expect("on");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_str(&format!("/dtmgimp.Dtm/{method}")).expect("path");
    grpc.unary(tonic::Request::new(body), path, RawCodec).await.map(drop)
}

/// The parts of `/query` that the request decides (not ids, times, gids or the protocol).
async fn decided(server: &TestServer, gid: &str) -> Value {
    let (_, body) = server.get(&format!("query?gid={gid}")).await;
    let t = &body["transaction"];
    let branches: Vec<Value> = body["branches"]
        .as_array()
        .expect("branches")
        .iter()
        .map(|b| json!([b["url"], b["bin_data"], b["branch_id"], b["op"], b["status"]]))
        .collect();
    json!({
        "trans_type": t["trans_type"], "status": t["status"], "custom_data": t["custom_data"],
        "query_prepared": t["query_prepared"], "options": t["options"], "branches": branches,
        "rollback_reason": t["rollback_reason"],
    })
}

#[tokio::test]
async fn fixture_saga_submit_decodes_to_the_http_transaction() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let steps = json!([
        {"action": bank.target("TransOut"), "compensate": bank.target("TransOutRevert")},
        {"action": bank.target("TransIn"), "compensate": bank.target("TransInRevert")},
    ])
    .to_string();
    // dtmgrpc.NewSagaGrpc(dtm, gid).Add(out, outRevert, &BusiReq{30,"u1"}).Add(in, inRevert,
    // &BusiReq{30,"u1"}) with RequestTimeout 5, RetryInterval 7, TimeoutToFail 60, a branch header,
    // concurrent custom data, WaitResult.
    let custom = r#"{"concurrent":false,"orders":{}}"#;
    let mut message = Vec::new();
    field_bytes(&mut message, 1, b"fx-saga-grpc");
    field_bytes(&mut message, 2, b"saga");
    field_bytes(&mut message, 3, &options_bytes(true, 60, 7, 5));
    field_bytes(&mut message, 4, custom.as_bytes());
    field_bytes(&mut message, 5, &busi(30));
    field_bytes(&mut message, 5, &busi(30));
    field_bytes(&mut message, 7, steps.as_bytes());
    raw_call(&server, "Submit", message).await.expect("Submit");
    // The HTTP request DTM's Go HTTP client sends for the same saga.
    let payload = String::from_utf8(busi(30)).expect("ASCII bytes");
    let (code, body) = server
        .post(
            "submit",
            json!({
                "gid": "fx-saga-http", "trans_type": "saga", "steps": serde_json::from_str::<Value>(&steps).expect("steps"),
                "payloads": [payload, payload], "custom_data": custom, "wait_result": true,
                "timeout_to_fail": 60, "retry_interval": 7, "request_timeout": 5,
                "branch_headers": {"x-request-id": "r-1"},
            }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let grpc = decided(&server, "fx-saga-grpc").await;
    assert_eq!(grpc, decided(&server, "fx-saga-http").await);
    assert_eq!(grpc["status"], S);
    assert_eq!(server.transaction("fx-saga-grpc").await["protocol"], "grpc");
}

#[tokio::test]
async fn fixture_msg_prepare_and_tcc_register_decode_to_the_http_transactions() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    // dtmgrpc.NewMsgGrpc(dtm, gid).Add(out, &BusiReq{30,"u1"}).Prepare(queryPrepared)
    let steps = json!([{"action": bank.target("TransOut")}]).to_string();
    let mut message = Vec::new();
    field_bytes(&mut message, 1, b"fx-msg-grpc");
    field_bytes(&mut message, 2, b"msg");
    field_bytes(&mut message, 3, &options_bytes(false, 0, 0, 0));
    field_bytes(&mut message, 5, &busi(30));
    field_bytes(&mut message, 6, bank.target("QueryPrepared").as_bytes());
    field_bytes(&mut message, 7, steps.as_bytes());
    raw_call(&server, "Prepare", message).await.expect("Prepare");
    let payload = String::from_utf8(busi(30)).expect("ASCII bytes");
    let (code, body) = server
        .post(
            "prepare",
            json!({"gid": "fx-msg-http", "trans_type": "msg", "steps": [{"action": bank.target("TransOut")}],
                "payloads": [payload], "query_prepared": bank.target("QueryPrepared"),
                "branch_headers": {"x-request-id": "r-1"}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        decided(&server, "fx-msg-grpc").await,
        decided(&server, "fx-msg-http").await
    );

    // dtmgrpc.TccGlobalTransaction: Prepare, then CallBranch registers each branch with
    // DtmBranchRequest{Gid, TransType, BranchID, Op: "try", Data: {confirm, cancel}, BusiPayload}.
    let mut prepare = Vec::new();
    field_bytes(&mut prepare, 1, b"fx-tcc-grpc");
    field_bytes(&mut prepare, 2, b"tcc");
    field_bytes(&mut prepare, 3, &options_bytes(false, 0, 0, 0));
    raw_call(&server, "Prepare", prepare).await.expect("Prepare");
    let mut register = Vec::new();
    field_bytes(&mut register, 1, b"fx-tcc-grpc");
    field_bytes(&mut register, 2, b"tcc");
    field_bytes(&mut register, 3, b"01");
    field_bytes(&mut register, 4, b"try");
    field_bytes(&mut register, 5, &map_entry("confirm", &bank.target("TransOutConfirm")));
    field_bytes(&mut register, 5, &map_entry("cancel", &bank.target("TransOutCancel")));
    field_bytes(&mut register, 6, &busi(30));
    raw_call(&server, "RegisterBranch", register)
        .await
        .expect("RegisterBranch");
    let (code, body) = server
        .post(
            "prepare",
            json!({"gid": "fx-tcc-http", "trans_type": "tcc", "branch_headers": {"x-request-id": "r-1"}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = server
        .post(
            "registerBranch",
            json!({"gid": "fx-tcc-http", "trans_type": "tcc", "branch_id": "01", "op": "try",
                "confirm": bank.target("TransOutConfirm"), "cancel": bank.target("TransOutCancel"),
                "data": payload}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let tcc = decided(&server, "fx-tcc-grpc").await;
    assert_eq!(tcc, decided(&server, "fx-tcc-http").await);
    assert_eq!(tcc["branches"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn fixture_workflow_prepare_and_abort_decode_to_the_http_transactions() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let custom = r#"{"name":"wf","data":"CB4SAnUx"}"#;
    // dtmgrpc workflow: PrepareWorkflow(DtmRequest{Gid, TransType, CustomedData, QueryPrepared}).
    let mut message = Vec::new();
    field_bytes(&mut message, 1, b"fx-wf-grpc");
    field_bytes(&mut message, 2, b"workflow");
    field_bytes(&mut message, 3, &options_bytes(false, 0, 0, 0));
    field_bytes(&mut message, 4, custom.as_bytes());
    field_bytes(&mut message, 6, bank.workflow_target().as_bytes());
    raw_call(&server, "PrepareWorkflow", message)
        .await
        .expect("PrepareWorkflow");
    let (code, body) = server
        .post(
            "prepareWorkflow",
            json!({"gid": "fx-wf-http", "trans_type": "workflow", "custom_data": custom,
                "query_prepared": bank.workflow_target(), "branch_headers": {"x-request-id": "r-1"}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        decided(&server, "fx-wf-grpc").await,
        decided(&server, "fx-wf-http").await
    );
    // Abort(DtmRequest{Gid, TransType: "tcc", RollbackReason}) of a prepared tcc.
    for gid in ["fx-abort-grpc", "fx-abort-http"] {
        let (code, body) = server.post("prepare", json!({"gid": gid, "trans_type": "tcc"})).await;
        assert_eq!(code, 200, "{body}");
    }
    let mut abort = Vec::new();
    field_bytes(&mut abort, 1, b"fx-abort-grpc");
    field_bytes(&mut abort, 2, b"tcc");
    field_bytes(&mut abort, 9, b"client gave up");
    raw_call(&server, "Abort", abort).await.expect("Abort");
    let (code, body) = server
        .post(
            "abort",
            json!({"gid": "fx-abort-http", "trans_type": "tcc", "rollback_reason": "client gave up"}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    server.wait_status("fx-abort-grpc", F).await;
    server.wait_status("fx-abort-http", F).await;
    let aborted = decided(&server, "fx-abort-grpc").await;
    assert_eq!(aborted, decided(&server, "fx-abort-http").await);
    assert_eq!(aborted["rollback_reason"], "client gave up");
}

#[tokio::test]
async fn an_empty_listen_turns_the_grpc_api_off_too() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = kubetx::config::Config {
        listen: String::new(),
        grpc_listen: "127.0.0.1:0".to_owned(),
        ..kubetx::config::Config::default()
    };
    config.sqlite.path = dir.path().join("kubetx.db").display().to_string();
    let clock = std::sync::Arc::new(kubetx::scheduler::SystemClock);
    let server = kubetx::server::Server::start(&config, clock, false)
        .await
        .expect("starts");
    assert_eq!(
        server.grpc_addr, None,
        "the operator without its DTM API serves no gRPC either"
    );
    server.stop().await.expect("stops");
}

#[tokio::test]
async fn stopping_the_server_does_not_wait_for_idle_grpc_clients() {
    let server = TestServer::start().await;
    let mut dtm = client(&server).await;
    dtm.new_gid(()).await.expect("NewGid");
    // The client keeps its HTTP/2 connection open; a graceful stop must still end.
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(20), server.server.stop()).await;
    assert!(matches!(stopped, Ok(Ok(()))), "{stopped:?}");
    assert!(dtm.new_gid(()).await.is_err(), "the API is gone");
}

#[tokio::test]
async fn the_clients_traceparent_reaches_every_grpc_branch() {
    let (server, bank) = (TestServer::start().await, GrpcBank::start().await);
    let mut dtm = client(&server).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let options = DtmTransOptions {
        wait_result: true,
        ..DtmTransOptions::default()
    };
    let mut request = tonic::Request::new(transfer_saga("g-traced", &bank, options));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("metadata"));
    dtm.submit(request).await.expect("Submit");
    let calls = bank.calls_for("g-traced");
    assert_eq!(calls.len(), 2);
    for call in calls {
        let sent = call.metadata.get("traceparent").and_then(|v| v.to_str().ok());
        assert_eq!(sent, Some(traceparent), "{}", call.method);
    }
    // Stored with the transaction: retries, after a restart too, continue the same trace.
    let stored = server.transaction("g-traced").await["ext_data"].clone();
    assert_eq!(stored, json!(json!({"traceparent": traceparent}).to_string()));
}
