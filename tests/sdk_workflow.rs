//! The SDK's workflow against the real kubetx server, with real HTTP services on 127.0.0.1:
//! success, FAILURE (rollbacks), ONGOING and unknown steps resumed by kubetx's callback, and a
//! workflow service killed mid-way, restarted and resumed without repeating a recorded step.

mod common;

use std::net::SocketAddr;

use axum::Router;
use axum::routing::post;
use base64::Engine as _;
use common::{Bank, Reply, TestServer};
use kubetx_client::workflow::post_branch;
use kubetx_client::{Dtm, WorkflowRegistry};

/// A workflow service: the registry with DTM's quick-start transfer, serving its resume route.
struct Service {
    registry: WorkflowRegistry,
    task: tokio::task::JoinHandle<()>,
}

async fn service(server: &TestServer, bank: &Bank, addr: Option<SocketAddr>) -> (Service, SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
        .await
        .expect("bind workflow service");
    let addr = listener.local_addr().unwrap();
    let dtm = Dtm::new(&server.server.dtm_url()).unwrap();
    let registry = WorkflowRegistry::new(&dtm, &format!("http://{addr}/workflow/resume")).unwrap();
    let bank = bank.clone();
    registry.register("transfer", move |wf, input| {
        let bank = bank.clone();
        async move {
            let revert = bank.url("TransOutRevert");
            wf.new_branch()?
                .on_rollback(move |p| async move { post_branch(&p, &revert, b"{}").await.map(drop) })
                .post(&bank.url("TransOut"), &input)
                .await?;
            let revert = bank.url("TransInRevert");
            wf.new_branch()?
                .on_rollback(move |p| async move { post_branch(&p, &revert, b"{}").await.map(drop) })
                .post(&bank.url("TransIn"), &input)
                .await?;
            Ok(b"moved 30".to_vec())
        }
    });
    let app = Router::new()
        .route("/workflow/resume", post(kubetx_client::axum::workflow_resume))
        .with_state(registry.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (Service { registry, task }, addr)
}

/// (branch_id, op, status) of every recorded step.
async fn progress(server: &TestServer, gid: &str) -> Vec<(String, String, String)> {
    let (_, body) = server.get(&format!("query?gid={gid}")).await;
    body["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap_or_default().to_owned();
            (s("branch_id"), s("op"), s("status"))
        })
        .collect()
}

fn p(branch: &str, op: &str, status: &str) -> (String, String, String) {
    (branch.to_owned(), op.to_owned(), status.to_owned())
}

const INPUT: &[u8] = br#"{"amount":30}"#;

#[tokio::test]
async fn workflow_succeeds_records_each_step_and_replays_its_result() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (svc, _) = service(&server, &bank, None).await;
    let result = svc.registry.execute("transfer", "sdk-wf-ok", INPUT).await.unwrap();
    assert_eq!(result, b"moved 30");
    assert_eq!(bank.routes("sdk-wf-ok"), ["TransOut", "TransIn"]);
    let call = &bank.calls_on("TransOut")[0];
    assert_eq!(
        (call.trans_type.as_str(), call.branch_id.as_str(), call.op.as_str()),
        ("workflow", "01", "action")
    );
    assert_eq!(call.body, "{\"amount\":30}");
    assert_eq!(server.state("sdk-wf-ok").await.0, "succeed");
    assert_eq!(
        progress(&server, "sdk-wf-ok").await,
        [p("01", "action", "succeed"), p("02", "action", "succeed")]
    );
    let stored = server.transaction("sdk-wf-ok").await["result"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        base64::engine::general_purpose::STANDARD.decode(stored).unwrap(),
        b"moved 30"
    );
    // Executing a finished workflow answers its result without running anything.
    assert_eq!(
        svc.registry.execute("transfer", "sdk-wf-ok", INPUT).await.unwrap(),
        b"moved 30"
    );
    assert_eq!(bank.routes("sdk-wf-ok").len(), 2);
}

#[tokio::test]
async fn a_failure_rolls_back_every_branch_in_reverse() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (svc, _) = service(&server, &bank, None).await;
    bank.script("TransIn", &[Reply::Failure]);
    let err = svc
        .registry
        .execute("transfer", "sdk-wf-fail", INPUT)
        .await
        .unwrap_err();
    assert!(err.is_failure(), "{err}");
    assert_eq!(
        bank.routes("sdk-wf-fail"),
        ["TransOut", "TransIn", "TransInRevert", "TransOutRevert"]
    );
    let revert = &bank.calls_on("TransOutRevert")[0];
    assert_eq!((revert.branch_id.as_str(), revert.op.as_str()), ("01", "rollback"));
    assert_eq!(server.state("sdk-wf-fail").await.0, "failed");
    assert_eq!(
        progress(&server, "sdk-wf-fail").await,
        [
            p("01", "action", "succeed"),
            p("02", "action", "failed"),
            p("02", "rollback", "succeed"),
            p("01", "rollback", "succeed")
        ]
    );
    let again = svc
        .registry
        .execute("transfer", "sdk-wf-fail", INPUT)
        .await
        .unwrap_err();
    assert!(again.is_failure());
}

/// ONGOING and unknown step outcomes are not recorded: the workflow stays prepared and kubetx's
/// callback resumes it, skipping the steps that were.
#[tokio::test]
async fn ongoing_and_unknown_steps_are_resumed_by_the_callback() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (svc, _) = service(&server, &bank, None).await;
    for (gid, reply) in [("sdk-wf-ongoing", Reply::Ongoing), ("sdk-wf-unknown", Reply::Error)] {
        bank.script("TransIn", &[reply]);
        let err = svc.registry.execute("transfer", gid, INPUT).await.unwrap_err();
        match reply {
            Reply::Ongoing => assert!(err.is_ongoing(), "{err}"),
            _ => assert!(err.is_unknown(), "{err}"),
        }
        assert_eq!(server.state(gid).await.0, "prepared");
        assert_eq!(progress(&server, gid).await, [p("01", "action", "succeed")]);
        server.advance_and_tick(60).await;
        assert_eq!(server.state(gid).await.0, "succeed", "{gid}");
        assert_eq!(
            bank.count(gid, "TransOut"),
            1,
            "{gid}: the recorded step is not repeated"
        );
        assert_eq!(bank.count(gid, "TransIn"), 2, "{gid}");
    }
}

/// The service dies while TransIn is in flight; a new instance on the same address is resumed
/// by kubetx and finishes with the same result, TransOut not repeated.
#[tokio::test]
async fn a_killed_service_is_resumed_after_restart_without_repeating_steps() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (svc, addr) = service(&server, &bank, None).await;
    bank.script("TransIn", &[Reply::Slow(30_000)]);
    let registry = svc.registry.clone();
    let running = tokio::spawn(async move { registry.execute("transfer", "sdk-wf-crash", INPUT).await });
    bank.wait_calls_on("TransIn", 1).await;
    // Kill: the workflow's task and the service's listener go away mid-step.
    running.abort();
    svc.task.abort();
    let _ = running.await;
    let _ = svc.task.await;
    assert_eq!(server.state("sdk-wf-crash").await.0, "prepared");
    assert_eq!(progress(&server, "sdk-wf-crash").await, [p("01", "action", "succeed")]);

    let (restarted, _) = service(&server, &bank, Some(addr)).await;
    server.advance_and_tick(60).await;
    assert_eq!(server.state("sdk-wf-crash").await.0, "succeed");
    assert_eq!(
        bank.count("sdk-wf-crash", "TransOut"),
        1,
        "TransOut was recorded: not repeated"
    );
    assert_eq!(bank.count("sdk-wf-crash", "TransIn"), 2);
    assert_eq!(
        restarted
            .registry
            .execute("transfer", "sdk-wf-crash", INPUT)
            .await
            .unwrap(),
        b"moved 30"
    );
}

/// TCC-like branches: `on_commit` runs (and is recorded) when the workflow succeeds, and not
/// on a replay.
#[tokio::test]
async fn on_commit_runs_once_after_success() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let dtm = Dtm::new(&server.server.dtm_url()).unwrap();
    let registry = WorkflowRegistry::new(&dtm, &bank.url("Resume")).unwrap();
    let b = bank.clone();
    registry.register("tcc-like", move |wf, input| {
        let b = b.clone();
        async move {
            let (confirm, cancel) = (b.url("Confirm"), b.url("Cancel"));
            wf.new_branch()?
                .on_commit(move |p| async move { post_branch(&p, &confirm, b"{}").await.map(drop) })
                .on_rollback(move |p| async move { post_branch(&p, &cancel, b"{}").await.map(drop) })
                .post(&b.url("Try"), &input)
                .await?;
            Ok(Vec::new())
        }
    });
    registry.execute("tcc-like", "sdk-wf-commit", INPUT).await.unwrap();
    assert_eq!(bank.routes("sdk-wf-commit"), ["Try", "Confirm"]);
    let confirm = &bank.calls_on("Confirm")[0];
    assert_eq!((confirm.branch_id.as_str(), confirm.op.as_str()), ("01", "commit"));
    assert_eq!(
        progress(&server, "sdk-wf-commit").await,
        [p("01", "action", "succeed"), p("01", "commit", "succeed")]
    );
    registry.execute("tcc-like", "sdk-wf-commit", INPUT).await.unwrap();
    assert_eq!(
        bank.routes("sdk-wf-commit").len(),
        2,
        "a finished workflow runs nothing"
    );
}

/// A second phase must not fail: a rollback answering FAILURE is not recorded; the workflow
/// stays prepared and kubetx's callback retries the rollback until it succeeds.
#[tokio::test]
async fn a_failing_rollback_is_retried_not_recorded() {
    let (server, bank) = (TestServer::start().await, Bank::start().await);
    let (svc, _) = service(&server, &bank, None).await;
    bank.script("TransIn", &[Reply::Failure]);
    bank.script("TransOutRevert", &[Reply::Failure]);
    let err = svc
        .registry
        .execute("transfer", "sdk-wf-revert", INPUT)
        .await
        .unwrap_err();
    assert!(err.is_unknown(), "{err}");
    assert_eq!(server.state("sdk-wf-revert").await.0, "prepared");
    assert_eq!(
        progress(&server, "sdk-wf-revert").await,
        [
            p("01", "action", "succeed"),
            p("02", "action", "failed"),
            p("02", "rollback", "succeed")
        ]
    );
    server.advance_and_tick(60).await;
    assert_eq!(server.state("sdk-wf-revert").await.0, "failed");
    assert_eq!(bank.count("sdk-wf-revert", "TransOutRevert"), 2);
    assert_eq!(
        bank.count("sdk-wf-revert", "TransInRevert"),
        1,
        "recorded: not repeated"
    );
    assert_eq!(bank.count("sdk-wf-revert", "TransIn"), 1, "its FAILURE was recorded");
}
