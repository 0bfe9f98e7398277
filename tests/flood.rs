//! A flood of non-waiting submits against the real `kubetx serve` binary while the bank holds
//! every call until the flood is over: the process's peak memory stays bounded (a submit beyond `--max-concurrent-passes` is left due in
//! the store, not spawned), and every transaction still finishes, each branch called once.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use common::{free_addr, print_log_tail};
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Transactions in the flood.
const SAGAS: usize = 4_000;
/// Submits in flight at once from the test.
const CLIENTS: usize = 64;
/// Passes kubetx runs at once.
const MAX_PASSES: &str = "32";
/// Bytes of each step's payload: a transaction held in memory weighs at least twice this.
const PAYLOAD_BYTES: usize = 16 * 1024;
/// Peak resident memory allowed to kubetx, in KiB. Bounded, a debug build peaks near 45 MiB
/// here; holding every submitted transaction in a pass of its own (the unbounded behaviour)
/// needs more than SAGAS × 2 × PAYLOAD_BYTES = 125 MiB on top.
const MAX_PEAK_RSS_KIB: u64 = 96 * 1024;

/// Calls per (gid, route).
type Calls = Arc<Mutex<HashMap<(String, String), u32>>>;

/// A bank on 127.0.0.1 that holds every call until `open` is true, then answers SUCCESS and
/// counts it: passes pile up in kubetx unless they are bounded.
async fn gated_bank(open: tokio::sync::watch::Receiver<bool>) -> (SocketAddr, Calls) {
    let calls: Calls = Arc::default();
    let router = axum::Router::new()
        .route(
            "/api/{route}",
            axum::routing::post(
                |State((calls, mut open)): State<(Calls, tokio::sync::watch::Receiver<bool>)>,
                 axum::extract::Path(route): axum::extract::Path<String>,
                 Query(query): Query<HashMap<String, String>>| async move {
                    // A closed gate (the test ended) lets the call through too.
                    let _ = open.wait_for(|open| *open).await;
                    let gid = query.get("gid").cloned().unwrap_or_default();
                    *calls.lock().expect("calls").entry((gid, route)).or_default() += 1;
                    axum::Json(json!({"dtm_result": "SUCCESS"}))
                },
            ),
        )
        .with_state((Arc::clone(&calls), open));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, calls)
}

/// `kubetx serve` as a child process, SIGKILLed when dropped.
struct Kubetx(Child);

impl Drop for Kubetx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A line of `/proc/<pid>/status`, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

async fn wait_ready(http: &reqwest::Client, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("http://{addr}/api/ping"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "kubetx never answered /api/ping");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn saga(gid: &str, bank: SocketAddr) -> Value {
    let url = |route: &str| format!("http://{bank}/api/{route}");
    let payload = json!({"memo": "x".repeat(PAYLOAD_BYTES)}).to_string();
    json!({
        "gid": gid, "trans_type": "saga",
        "steps": [
            {"action": url("TransOut"), "compensate": url("TransOutRevert")},
            {"action": url("TransIn"), "compensate": url("TransInRevert")},
        ],
        "payloads": [payload, payload],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_non_waiting_submits_keeps_memory_bounded_and_loses_nothing() {
    kubetx::invoke::install_crypto_provider();
    let (gate, open) = tokio::sync::watch::channel(false);
    let (bank, calls) = gated_bank(open).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let log = dir.path().join("kubetx.log");
    let child = Command::new(env!("CARGO_BIN_EXE_kubetx"))
        .args(["serve", "--listen", &addr.to_string(), "--grpc-listen", "", "--db"])
        .arg(dir.path().join("kubetx.db"))
        .args(["--max-concurrent-passes", MAX_PASSES, "--poll-interval-ms", "50"])
        // Held calls must not time out while the flood lasts.
        .args(["--request-timeout", "120", "--lease", "180"])
        .args(["--log-level", "warn"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("kubetx starts");
    let kubetx = Kubetx(child);
    let pid = kubetx.0.id();
    let http = reqwest::Client::new();
    wait_ready(&http, addr).await;

    let gids: Vec<String> = (0..SAGAS).map(|i| format!("flood-{i}")).collect();
    let submit = format!("http://{addr}/api/dtmsvr/submit");
    let refused: Vec<String> = stream::iter(&gids)
        .map(|gid| {
            let request = http.post(&submit).json(&saga(gid, bank));
            async move { (gid, request.send().await.map(|r| r.status().as_u16())) }
        })
        .buffer_unordered(CLIENTS)
        .filter_map(|(gid, answer)| async move { (!matches!(answer, Ok(200))).then(|| format!("{gid}: {answer:?}")) })
        .collect()
        .await;
    assert!(
        refused.is_empty(),
        "submits not accepted: {:?}",
        &refused[..refused.len().min(5)]
    );
    let peak = proc_status_kib(pid, "VmHWM:");
    gate.send_replace(true);

    // Every accepted transaction finishes: each step called once.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = calls
            .lock()
            .expect("calls")
            .keys()
            .filter(|(_, route)| route == "TransIn")
            .count();
        if done == SAGAS {
            break;
        }
        if Instant::now() > deadline {
            print_log_tail(&log, 30);
            panic!("{done} of {SAGAS} sagas reached TransIn");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = calls.lock().expect("calls").clone();
    for gid in &gids {
        for route in ["TransOut", "TransIn"] {
            assert_eq!(counts.get(&(gid.clone(), route.to_owned())), Some(&1), "{gid} {route}");
        }
    }
    assert_eq!(counts.len(), 2 * SAGAS, "no compensation ran");
    let query = format!("http://{addr}/api/dtmsvr/query?gid={}", gids[SAGAS - 1]);
    let last: Value = http.get(query).send().await.expect("query").json().await.expect("JSON");
    assert_eq!(last["transaction"]["status"], "succeed", "{last}");
    eprintln!("peak RSS of kubetx over {SAGAS} flooding submits: {} MiB", peak / 1024);
    assert!(
        peak < MAX_PEAK_RSS_KIB,
        "kubetx peaked at {} MiB (bound {} MiB)",
        peak / 1024,
        MAX_PEAK_RSS_KIB / 1024
    );
}
