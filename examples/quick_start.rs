//! DTM's quick start, on kubetx: an inter-bank transfer as a saga.
//!
//! Starts kubetx (embedded SQLite in a temporary directory) and a small bank service on
//! 127.0.0.1, then runs two transfers through the DTM-compatible API:
//! 1. TransOut then TransIn, both succeed;
//! 2. TransIn answers FAILURE, so kubetx compensates: TransInRevert, then TransOutRevert.
//!
//! Run with `cargo run --example quick_start`.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use kubetx::config::Config;
use kubetx::scheduler::SystemClock;
use kubetx::server::Server;
use serde_json::{Value, json};

/// The bank's log of what it did, and whether TransIn should refuse.
#[derive(Default)]
struct Bank {
    log: Vec<String>,
    refuse_trans_in: bool,
}

type Shared = Arc<Mutex<Bank>>;

async fn branch(
    State(bank): State<Shared>,
    Path(name): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    body: String,
) -> (StatusCode, &'static str) {
    let mut bank = bank.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let amount = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["amount"].as_i64());
    let gid = query.get("gid").cloned().unwrap_or_default();
    if name == "TransIn" && bank.refuse_trans_in {
        bank.log
            .push(format!("  [bank] {name:<15} gid={gid}: refused (answering FAILURE)"));
        return (StatusCode::CONFLICT, "FAILURE");
    }
    let what = match name.as_str() {
        "TransOut" => "took the amount out of account A",
        "TransOutRevert" => "put the amount back into account A",
        "TransIn" => "paid the amount into account B",
        "TransInRevert" => "nothing to undo (TransIn never happened)",
        _ => "unknown step",
    };
    bank.log.push(format!(
        "  [bank] {name:<15} gid={gid} amount={}: {what}",
        amount.unwrap_or(0)
    ));
    (StatusCode::OK, "SUCCESS")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bank: Shared = Arc::default();
    let app = Router::new()
        .route("/api/{name}", post(branch))
        .with_state(Arc::clone(&bank));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bank_url = format!("http://{}/api", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let mut config = Config {
        listen: "127.0.0.1:0".to_owned(),
        // This example speaks HTTP only; the gRPC one is examples/grpc_quick_start.rs.
        grpc_listen: String::new(),
        ..Config::default()
    };
    config.sqlite.path = dir.path().join("kubetx.db").display().to_string();
    let server = Server::start(&config, Arc::new(SystemClock), true).await?;
    let dtm = server.dtm_url();
    println!("kubetx is serving the DTM API at {dtm}\n");

    let http = reqwest::Client::new();
    for (title, refuse) in [
        ("Transfer 1: both steps succeed", false),
        ("Transfer 2: TransIn fails, so the saga compensates", true),
    ] {
        bank.lock().unwrap_or_else(|p| p.into_inner()).refuse_trans_in = refuse;
        let gid: Value = http.get(format!("{dtm}/newGid")).send().await?.json().await?;
        let gid = gid["gid"].as_str().unwrap_or("quick-start").to_owned();
        println!("{title} (gid {gid})");
        let saga = json!({
            "gid": gid,
            "trans_type": "saga",
            "steps": [
                {"action": format!("{bank_url}/TransOut"), "compensate": format!("{bank_url}/TransOutRevert")},
                {"action": format!("{bank_url}/TransIn"), "compensate": format!("{bank_url}/TransInRevert")},
            ],
            "payloads": ["{\"amount\":30}", "{\"amount\":30}"],
            "wait_result": true,
        });
        let reply = http.post(format!("{dtm}/submit")).json(&saga).send().await?;
        let code = reply.status();
        let body: Value = reply.json().await?;
        for line in bank.lock().unwrap_or_else(|p| p.into_inner()).log.drain(..) {
            println!("{line}");
        }
        let query: Value = http.get(format!("{dtm}/query?gid={gid}")).send().await?.json().await?;
        let status = query["transaction"]["status"].as_str().unwrap_or("unknown");
        println!("  submit answered {code}: {body}");
        match status {
            "succeed" => println!("  => the transfer succeeded: 30 moved from A to B.\n"),
            "failed" => println!(
                "  => the transfer failed and was rolled back: TransOutRevert returned the 30 to A.\n     reason: {}\n",
                query["transaction"]["rollback_reason"].as_str().unwrap_or("")
            ),
            other => println!("  => the transfer is {other}\n"),
        }
    }
    server.stop().await?;
    Ok(())
}
