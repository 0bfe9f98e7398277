//! The console in a real headless browser: Debian's `chromium` driven by playwright-core
//! (tests/browser/console.mjs). This test runs kubetx with its scheduler and a bearer token,
//! fills the store with a few hundred transactions of every mode and outcome, then runs the
//! script, which signs in, filters, pages, opens a stuck saga, retries it, force-stops another
//! and retries its compensation. Screenshots go to tests/browser/artifacts/.
//!
//! Without node, chromium or `npm ci` in tests/browser the test prints SKIP and passes, unless
//! `KUBETX_REQUIRE_BROWSER=1` (set by .ci/run) makes that a failure.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{Bank, Reply};
use kubetx::config::Config;
use kubetx::scheduler::SystemClock;
use kubetx::server::Server;
use serde_json::{Value, json};

const TOKEN: &str = "console-browser-token";
const SECRET: &str = "header-secret-4711";

/// Transactions of each kind the store gets.
const SAGAS_OK: usize = 100;
const SAGAS_FAILED: usize = 30;
const SAGAS_STUCK: usize = 20;
const MSGS_OK: usize = 50;
const MSGS_PREPARED: usize = 10;
const TCCS_OK: usize = 30;
const TCCS_ABORTED: usize = 10;
const XAS_OK: usize = 20;
const WORKFLOWS: usize = 10;

/// Where the browser pieces are, or why the test cannot run here.
fn browser_setup() -> Result<(PathBuf, PathBuf), String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        return Err("tests/browser/node_modules is missing (run npm ci there)".to_owned());
    }
    let chromium = PathBuf::from(std::env::var("KUBETX_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned()));
    if !chromium.is_file() {
        return Err(format!("{} is missing (apt-get install chromium)", chromium.display()));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is not installed".to_owned());
    }
    Ok((dir, chromium))
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn post(&self, route: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/api/dtmsvr/{route}", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("reaches kubetx");
        let code = response.status().as_u16();
        let reply: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(code, 200, "{route} {body}: {reply}");
        reply
    }

    async fn admin(&self, route: &str) -> Value {
        self.http
            .get(format!("{}/api/admin/{route}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("reaches kubetx")
            .json()
            .await
            .expect("json")
    }
}

fn saga(gid: &str, bank: &Bank, first: &str, second: &str) -> Value {
    json!({
        "gid": gid,
        "trans_type": "saga",
        "steps": [
            {"action": bank.url(first), "compensate": bank.url("TransOutRevert")},
            {"action": bank.url(second), "compensate": bank.url("TransInRevert")},
        ],
        "payloads": ["{\"amount\":30}", "{\"amount\":30}"],
        "retry_interval": 3600,
    })
}

fn msg(gid: &str, bank: &Bank) -> Value {
    json!({
        "gid": gid,
        "trans_type": "msg",
        "steps": [{"action": bank.url("TransOut")}, {"action": bank.url("TransIn")}],
        "payloads": ["{\"amount\":30}", "{\"amount\":40}"],
        "query_prepared": bank.url("QueryPrepared"),
        "timeout_to_fail": 3600,
    })
}

async fn tcc(client: &Client, bank: &Bank, gid: &str, abort: bool) {
    client.post("prepare", json!({"gid": gid, "trans_type": "tcc"})).await;
    for (id, name) in [("01", "TransOut"), ("02", "TransIn")] {
        let branch = json!({
            "gid": gid, "trans_type": "tcc", "branch_id": id, "data": "{\"amount\":30}",
            "confirm": bank.url(&format!("{name}Confirm")), "cancel": bank.url(&format!("{name}Cancel")),
        });
        client.post("registerBranch", branch).await;
    }
    let route = if abort { "abort" } else { "submit" };
    client.post(route, json!({"gid": gid, "trans_type": "tcc"})).await;
}

async fn xa(client: &Client, bank: &Bank, gid: &str) {
    client.post("prepare", json!({"gid": gid, "trans_type": "xa"})).await;
    for (id, route) in [("01", "XaOut"), ("02", "XaIn")] {
        let branch = json!({"gid": gid, "trans_type": "xa", "branch_id": id, "url": bank.url(route)});
        client.post("registerBranch", branch).await;
    }
    client.post("submit", json!({"gid": gid, "trans_type": "xa"})).await;
}

async fn workflow(client: &Client, bank: &Bank, gid: &str) {
    let data = base64::engine::general_purpose::STANDARD.encode("{\"amount\":30}");
    let body = json!({
        "gid": gid, "trans_type": "workflow", "protocol": "http", "query_prepared": bank.url("Resume"),
        "custom_data": json!({"name": "transfer-wf", "data": data}).to_string(),
    });
    client.post("prepareWorkflow", body).await;
}

/// Fills the store: every mode, finished and unfinished, in batches of concurrent clients.
async fn seed(client: &Client, bank: &Bank, server: &Server) {
    bank.script("Down", &[Reply::Error; 1000]);
    bank.script("Refuse", &[Reply::Failure; SAGAS_FAILED]);
    bank.script("Flaky", &[Reply::Error]);
    let mut jobs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>> = Vec::new();
    for i in 0..SAGAS_OK {
        jobs.push(Box::pin(async move {
            client
                .post("submit", saga(&format!("saga-ok-{i:03}"), bank, "TransOut", "TransIn"))
                .await;
        }));
    }
    for i in 0..SAGAS_FAILED {
        jobs.push(Box::pin(async move {
            client
                .post("submit", saga(&format!("saga-fail-{i:03}"), bank, "Refuse", "TransIn"))
                .await;
        }));
    }
    for i in 0..SAGAS_STUCK {
        jobs.push(Box::pin(async move {
            client
                .post("submit", saga(&format!("saga-stuck-{i:03}"), bank, "TransOut", "Down"))
                .await;
        }));
    }
    for i in 0..MSGS_OK {
        jobs.push(Box::pin(async move {
            client.post("submit", msg(&format!("msg-ok-{i:03}"), bank)).await;
        }));
    }
    for i in 0..MSGS_PREPARED {
        jobs.push(Box::pin(async move {
            client.post("prepare", msg(&format!("msg-prep-{i:03}"), bank)).await;
        }));
    }
    for i in 0..TCCS_OK {
        jobs.push(Box::pin(tcc_job(client, bank, format!("tcc-ok-{i:03}"), false)));
    }
    for i in 0..TCCS_ABORTED {
        jobs.push(Box::pin(tcc_job(client, bank, format!("tcc-abort-{i:03}"), true)));
    }
    for i in 0..XAS_OK {
        jobs.push(Box::pin(
            async move { xa(client, bank, &format!("xa-ok-{i:03}")).await },
        ));
    }
    for i in 0..WORKFLOWS {
        jobs.push(Box::pin(
            async move { workflow(client, bank, &format!("wf-{i:03}")).await },
        ));
    }
    let mut jobs = jobs.into_iter();
    loop {
        let batch: Vec<_> = jobs.by_ref().take(16).collect();
        if batch.is_empty() {
            break;
        }
        futures::future::join_all(batch).await;
    }
    let mut retry = saga("retry-me", bank, "TransOut", "Flaky");
    retry["branch_headers"] = json!({"X-Api-Key": SECRET});
    client.post("submit", retry).await;
    client.post("submit", saga("stop-me", bank, "TransOut", "Down")).await;
    operator_row(server).await;
    client.post("submit", saga("newest", bank, "TransOut", "TransIn")).await;
}

/// A transaction as `kubetx operator` with a SQL store records one of its resources.
async fn operator_row(server: &Server) {
    let coordinator = &server.coordinator;
    let now = coordinator.now();
    let global = kubetx::model::GlobalTrans {
        finish_time: Some(now),
        ext_data: json!({"resource": {"kind": "Saga", "namespace": "default", "name": "transfer-1"}}).to_string(),
        ..common::saga_global("default-transfer-1-abcdef12", kubetx::model::TransStatus::Succeed, now)
    };
    assert!(coordinator.store().create(&global, &[]).await.expect("create"));
}

async fn tcc_job(client: &Client, bank: &Bank, gid: String, abort: bool) {
    tcc(client, bank, &gid, abort).await;
}

/// Waits until every first pass is over: the unfinished counts are the stuck ones only.
async fn settle(client: &Client) {
    let wanted = json!({"prepared": MSGS_PREPARED + WORKFLOWS, "submitted": SAGAS_STUCK + 2, "aborting": 0});
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let summary = client.admin("summary").await;
        if summary["unfinished"] == wanted {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "store never settled: {summary}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let (dir, chromium) = match browser_setup() {
        Ok(found) => found,
        Err(problem) => {
            assert!(
                std::env::var("KUBETX_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "KUBETX_REQUIRE_BROWSER=1 but {problem}"
            );
            eprintln!("SKIP: the console is not checked in a browser: {problem}");
            return;
        }
    };
    let store_dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config {
        listen: "127.0.0.1:0".to_owned(),
        // Not the fixed gRPC port: a kubetx already running on this machine holds it.
        grpc_listen: String::new(),
        api_tokens: vec![TOKEN.to_owned()],
        // Nothing comes due again while the browser reads the views: the oldest due transaction
        // noted below stays the oldest (with 10 s, a loaded machine let the scheduler retry and
        // re-park it first). The page's retry-now still makes one due at once.
        retry_interval: 3600,
        max_retry_interval: 3600,
        timeout_to_fail: 3600,
        ..Config::default()
    };
    config.sqlite.path = store_dir.path().join("kubetx.db").display().to_string();
    let server = Server::start(&config, Arc::new(SystemClock), true)
        .await
        .expect("server starts");
    let bank = Bank::start().await;
    let client = Client {
        http: reqwest::Client::new(),
        base: format!("http://{}", server.addr),
    };
    seed(&client, &bank, &server).await;
    settle(&client).await;
    let oldest = client.admin("due?limit=1").await["transactions"][0]["gid"].clone();
    let expect = json!({
        "newest_gid": "newest",
        "failed_sagas": SAGAS_FAILED,
        "msgs": MSGS_OK + MSGS_PREPARED,
        "tcc_aborted": TCCS_ABORTED,
        "oldest_due_gid": oldest,
        "stuck_gid": "saga-stuck-000",
        "retry_gid": "retry-me",
        "stop_gid": "stop-me",
        "secret": SECRET,
        "resource_gid": "default-transfer-1-abcdef12",
    });
    let expect_file = store_dir.path().join("expect.json");
    std::fs::write(&expect_file, expect.to_string()).expect("write expectations");
    let artifacts = dir.join("artifacts");
    let output = tokio::process::Command::new("node")
        .arg("console.mjs")
        .current_dir(&dir)
        .env("KUBETX_URL", &client.base)
        .env("KUBETX_TOKEN", TOKEN)
        .env("KUBETX_EXPECT", &expect_file)
        .env("KUBETX_ARTIFACTS", &artifacts)
        .env("KUBETX_CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "browser checks failed (screenshots in {}):\n{log}",
        artifacts.display()
    );
    eprintln!("{log}screenshots in {}", artifacts.display());

    // What the page did, seen through the API.
    let retried = client.admin("transactions/retry-me").await;
    assert_eq!(retried["transaction"]["status"], "succeed", "{retried}");
    let stopped = client.admin("transactions/stop-me").await;
    assert_eq!(stopped["transaction"]["status"], "failed");
    assert_eq!(stopped["transaction"]["rollback_reason"], "force stopped");
    assert_eq!(bank.count("stop-me", "TransOutRevert"), 1);
    server.stop().await.expect("server stops");
}
