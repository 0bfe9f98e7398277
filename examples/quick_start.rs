//! DTM's quick start in Rust: an inter-bank transfer written as a *workflow* with the SDK
//! (`kubetx-client`), each bank operation behind the sub-transaction barrier on a SQLite file.
//!
//! 1. the workflow moves 30 from A to B: TransOut, then TransIn, both succeed;
//! 2. the same workflow with TransIn answering FAILURE: the branches' `on_rollback` run in
//!    reverse, TransInRevert (nothing to undo: the barrier records a null compensation) and
//!    TransOutRevert (the 30 go back to A).
//!
//! Run with `cargo run --example quick_start` (kubetx runs in-process on a temporary SQLite
//! file), or against a running kubetx with `KUBETX_DTM=http://127.0.0.1:36789/api/dtmsvr`.

#[path = "sdk_bank/mod.rs"]
mod sdk_bank;

use std::sync::Arc;

use axum::Router;
use axum::routing::post;
use kubetx::config::Config;
use kubetx::scheduler::SystemClock;
use kubetx::server::Server;
use kubetx_client::workflow::post_branch;
use kubetx_client::{Dtm, WorkflowRegistry};
use sdk_bank::Bank;

/// DTM's quick-start workflow: each branch registers its rollback, then runs its action.
fn register_transfer(workflows: &WorkflowRegistry, bank: &Bank) {
    let bank = bank.clone();
    workflows.register("quick-start-transfer", move |wf, input| {
        let bank = bank.clone();
        async move {
            let revert = bank.at("TransOutRevert");
            let body = input.clone();
            wf.new_branch()?
                .on_rollback(move |p| async move { post_branch(&p, &revert, &body).await.map(drop) })
                .post(&bank.at("TransOut"), &input)
                .await?;
            let revert = bank.at("TransInRevert");
            let body = input.clone();
            wf.new_branch()?
                .on_rollback(move |p| async move { post_branch(&p, &revert, &body).await.map(drop) })
                .post(&bank.at("TransIn"), &input)
                .await?;
            Ok(b"transferred 30 from A to B".to_vec())
        }
    });
}

/// The coordinator: `KUBETX_DTM`, or kubetx started here on a temporary SQLite file.
async fn coordinator() -> Result<(String, Option<(Server, tempfile::TempDir)>), Box<dyn std::error::Error>> {
    if let Ok(url) = std::env::var("KUBETX_DTM") {
        return Ok((url, None));
    }
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        listen: "127.0.0.1:0".to_owned(),
        // This example speaks HTTP only; the gRPC one is examples/grpc_quick_start.rs.
        grpc_listen: String::new(),
        ..Config::default()
    };
    config.sqlite.path = dir.path().join("kubetx.db").display().to_string();
    let server = Server::start(&config, Arc::new(SystemClock), true).await?;
    Ok((server.dtm_url(), Some((server, dir))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dtm_url, server) = coordinator().await?;
    println!("kubetx is serving the DTM API at {dtm_url}\n");
    let dtm = Dtm::new(&dtm_url)?;
    let bank = Bank::start().await?;

    // The workflow service: kubetx calls this route back to resume an unfinished workflow.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let resume = format!("http://{}/workflow/resume", listener.local_addr()?);
    let workflows = WorkflowRegistry::new(&dtm, &resume)?;
    register_transfer(&workflows, &bank);
    let app = Router::new()
        .route("/workflow/resume", post(kubetx_client::axum::workflow_resume))
        .with_state(workflows.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    for (title, refuse) in [
        ("Workflow 1: move 30 from A to B", false),
        ("Workflow 2: the same, with TransIn answering FAILURE", true),
    ] {
        bank.refuse_trans_in(refuse);
        let gid = dtm.new_gid().await?;
        println!("{title} (gid {gid})");
        let outcome = workflows
            .execute("quick-start-transfer", &gid, br#"{"amount":30}"#)
            .await;
        for line in bank.take_log() {
            println!("{line}");
        }
        let (a, b) = bank.balances().await?;
        match outcome {
            Ok(result) => println!("  => succeeded: {}", String::from_utf8_lossy(&result)),
            Err(e) => println!("  => rolled back: {e}"),
        }
        let status = dtm.query_global(&gid).await?.map(|t| t.status).unwrap_or_default();
        println!("  kubetx says the workflow {status}; balances A={a} B={b}\n");
    }
    if let Some((server, _dir)) = server {
        server.stop().await?;
    }
    Ok(())
}
