//! Test harness: a real kubetx server on 127.0.0.1 with a real SQLite file (or, with
//! `KUBETX_TEST_STORE=postgres|mysql`, a fresh schema on a real database server) and an injected
//! clock, and a real HTTP bank service whose replies can be scripted per call.
#![allow(dead_code)]

pub mod db;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use kubetx::config::Config;
use kubetx::scheduler::OffsetClock;
use kubetx::server::Server;
use serde_json::{Value, json};
use tempfile::TempDir;

/// A kubetx server with its own database file. The scheduler loop is off: tests call `tick`
/// after moving the clock, the way DTM's own tests drive their cron by hand.
pub struct TestServer {
    pub server: Server,
    pub clock: Arc<OffsetClock>,
    pub http: reqwest::Client,
    pub dir: TempDir,
    /// The PostgreSQL schema or MySQL database of this server (dropped last).
    pub db: Option<db::TestDb>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            listen: "127.0.0.1:0".to_owned(),
            grpc_listen: "127.0.0.1:0".to_owned(),
            ..Config::default()
        };
        config.sqlite.path = dir.path().join("kubetx.db").display().to_string();
        let db = db::TestDb::from_env().await;
        if let Some(db) = &db {
            config.store = db.url.clone();
            config.store_max_connections = 4;
        }
        adjust(&mut config);
        let clock = Arc::new(OffsetClock::default());
        let server = Server::start(&config, clock.clone(), false)
            .await
            .expect("server starts");
        TestServer {
            server,
            clock,
            http: reqwest::Client::new(),
            dir,
            db,
        }
    }

    pub fn url(&self, route: &str) -> String {
        format!("{}/{}", self.server.dtm_url(), route.trim_start_matches('/'))
    }

    /// POSTs JSON to a DTM route; returns status and body.
    pub async fn post(&self, route: &str, body: Value) -> (u16, Value) {
        self.post_raw(route, body.to_string().into_bytes()).await
    }

    pub async fn post_raw(&self, route: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(route))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request reaches kubetx");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, route_and_query: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(route_and_query))
            .send()
            .await
            .expect("request reaches kubetx");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Global status and the ordered branch statuses.
    pub async fn state(&self, gid: &str) -> (String, Vec<String>) {
        let (code, body) = self.get(&format!("query?gid={gid}")).await;
        assert_eq!(code, 200, "{body}");
        let status = body["transaction"]["status"].as_str().unwrap_or("<none>").to_owned();
        let branches = body["branches"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| r["status"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        (status, branches)
    }

    pub async fn transaction(&self, gid: &str) -> Value {
        self.get(&format!("query?gid={gid}")).await.1["transaction"].clone()
    }

    /// Waits (polling, with a deadline) until the transaction reaches `status`.
    pub async fn wait_status(&self, gid: &str, status: &str) -> (String, Vec<String>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let state = self.state(gid).await;
            if state.0 == status {
                return state;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{gid} did not reach {status}; last state {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until no pass holds the transaction's lease (the background pass finished).
    pub async fn wait_parked(&self, gid: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let trans = self.transaction(gid).await;
            if trans.get("owner").is_none() {
                return trans;
            }
            assert!(tokio::time::Instant::now() < deadline, "{gid} never parked: {trans}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Moves time forward and runs every due transaction to the end of its pass.
    pub async fn advance_and_tick(&self, seconds: u64) -> usize {
        self.clock.advance(Duration::from_secs(seconds));
        self.server.coordinator.tick().await.expect("tick")
    }
}

/// What a bank endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Success,
    /// HTTP 409.
    Failure,
    /// HTTP 425.
    Ongoing,
    /// HTTP 500.
    Error,
    /// Sleeps longer than the test's request timeout, then answers 200.
    Slow(u64),
}

/// One call the bank received.
#[derive(Debug, Clone)]
pub struct Received {
    pub route: String,
    pub method: Method,
    pub gid: String,
    pub trans_type: String,
    pub branch_id: String,
    pub op: String,
    pub body: String,
    pub headers: HeaderMap,
    /// Every query parameter of the call.
    pub query: HashMap<String, String>,
    /// Where the call came from.
    pub peer: SocketAddr,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct BankState {
    script: HashMap<String, VecDeque<Reply>>,
    calls: Vec<Received>,
    /// Effects applied, deduplicated by (gid, branch_id, op) like a sub-transaction barrier.
    applied: HashMap<(String, String, String), u32>,
}

/// A bank service on 127.0.0.1: any path `/api/<route>` answers SUCCESS unless scripted.
#[derive(Clone)]
pub struct Bank {
    pub addr: SocketAddr,
    state: Arc<Mutex<BankState>>,
}

impl Bank {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(BankState::default()));
        let app = Router::new()
            .route("/api/{route}", any(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind bank");
        let addr = listener.local_addr().expect("bank addr");
        tokio::spawn(
            async move { axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await },
        );
        Bank { addr, state }
    }

    pub fn url(&self, route: &str) -> String {
        format!("http://{}/api/{}", self.addr, route)
    }

    /// Drops the replies still queued for a route: it answers SUCCESS from now on.
    pub fn unscript(&self, route: &str) {
        self.state.lock().expect("bank lock").script.remove(route);
    }

    /// Queues replies for a route; once used up the route answers SUCCESS again.
    pub fn script(&self, route: &str, replies: &[Reply]) {
        self.state
            .lock()
            .expect("bank lock")
            .script
            .entry(route.to_owned())
            .or_default()
            .extend(replies.iter().copied());
    }

    pub fn calls(&self) -> Vec<Received> {
        self.state.lock().expect("bank lock").calls.clone()
    }

    /// Routes called for a gid, in order.
    pub fn routes(&self, gid: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.gid == gid)
            .map(|c| c.route)
            .collect()
    }

    pub fn count(&self, gid: &str, route: &str) -> usize {
        self.calls().iter().filter(|c| c.gid == gid && c.route == route).count()
    }

    /// Calls received for a gid, in order.
    pub fn calls_for(&self, gid: &str) -> Vec<Received> {
        self.calls().into_iter().filter(|c| c.gid == gid).collect()
    }

    /// Calls received on a route (any gid), in order.
    pub fn calls_on(&self, route: &str) -> Vec<Received> {
        self.calls().into_iter().filter(|c| c.route == route).collect()
    }

    /// Waits (polling, with a deadline) until `route` has received at least `n` calls; returns them.
    pub async fn wait_calls_on(&self, route: &str, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let calls = self.calls_on(route);
            if calls.len() >= n {
                return calls;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{route} received {} calls, expected {n}",
                calls.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many times each successful (gid, branch_id, op) effect was applied (always 1 with a
    /// barrier; the map shows whether a retry tried to apply it again).
    pub fn applied(&self) -> HashMap<(String, String, String), u32> {
        self.state.lock().expect("bank lock").applied.clone()
    }
}

async fn handle(
    State(state): State<Arc<Mutex<BankState>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(route): Path<String>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let param = |k: &str| query.get(k).cloned().unwrap_or_default();
    let received = Received {
        route: route.clone(),
        method,
        gid: param("gid"),
        trans_type: param("trans_type"),
        branch_id: param("branch_id"),
        op: param("op"),
        body: String::from_utf8_lossy(&body).into_owned(),
        headers,
        query: query.clone(),
        peer,
        at: std::time::Instant::now(),
    };
    let reply = {
        let mut bank = state.lock().expect("bank lock");
        let reply = bank
            .script
            .get_mut(&route)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Reply::Success);
        if matches!(reply, Reply::Success | Reply::Slow(_)) {
            let key = (received.gid.clone(), received.branch_id.clone(), received.op.clone());
            *bank.applied.entry(key).or_default() += 1;
        }
        bank.calls.push(received);
        reply
    };
    match reply {
        Reply::Success => (StatusCode::OK, axum::Json(json!({"dtm_result": "SUCCESS"}))).into_response(),
        Reply::Failure => (StatusCode::CONFLICT, "business refused").into_response(),
        Reply::Ongoing => (StatusCode::TOO_EARLY, "still working").into_response(),
        Reply::Error => (StatusCode::INTERNAL_SERVER_ERROR, "database is down").into_response(),
        Reply::Slow(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            StatusCode::OK.into_response()
        }
    }
}

/// A submitted saga's global row as a store receives it: created at `now`, due at `now`, every
/// optional field empty. Tests change what they need with struct update syntax.
pub fn saga_global(
    gid: &str,
    status: kubetx::model::TransStatus,
    now: kubetx::model::Millis,
) -> kubetx::model::GlobalTrans {
    kubetx::model::GlobalTrans {
        id: 0,
        gid: gid.to_owned(),
        trans_type: kubetx::model::TransType::Saga,
        status,
        query_prepared: String::new(),
        protocol: "http".to_owned(),
        custom_data: String::new(),
        options: kubetx::model::TransOptions::default(),
        create_time: now,
        update_time: now,
        finish_time: None,
        rollback_time: None,
        next_cron_time: now,
        next_cron_interval: 10,
        owner: String::new(),
        result: String::new(),
        rollback_reason: String::new(),
        ext_data: String::new(),
    }
}

/// A 2-step transfer saga body.
pub fn transfer_saga(gid: &str, bank: &Bank) -> Value {
    json!({
        "gid": gid,
        "trans_type": "saga",
        "steps": [
            {"action": bank.url("TransOut"), "compensate": bank.url("TransOutRevert")},
            {"action": bank.url("TransIn"), "compensate": bank.url("TransInRevert")},
        ],
        "payloads": ["{\"amount\":30}", "{\"amount\":30}"],
    })
}

/// A free local port: bind to port 0, note the port, let it go.
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// Prints the last `lines` lines of a child process's log, for a test that is failing.
pub fn print_log_tail(log: &std::path::Path, lines: usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    eprintln!("--- last lines of {} ---", log.display());
    for line in tail.into_iter().rev() {
        eprintln!("{line}");
    }
}

/// A TCP proxy on 127.0.0.1 that can be frozen: while frozen it accepts connections but forwards
/// nothing in either direction, as a network partition does; thawed, it forwards what it held.
pub struct FreezableProxy {
    pub addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl FreezableProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (frozen, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(pump(in_read, out_write, watch.clone()), pump(out_read, in_write, watch));
                });
            }
        });
        FreezableProxy { addr, frozen }
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A service that counts every request it receives: on an address the outbound policy refuses,
/// it proves that no call reached it. A redirecting one answers 302 to a fixed URL.
pub struct Trap {
    pub addr: SocketAddr,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl Trap {
    /// Answers 200 "trapped" on `ip` (a 127.0.0.x address).
    pub async fn start(ip: [u8; 4]) -> Self {
        Self::serve(ip, None).await
    }

    /// Answers 302 to `location` on `ip`.
    pub async fn redirecting(ip: [u8; 4], location: String) -> Self {
        Self::serve(ip, Some(location)).await
    }

    async fn serve(ip: [u8; 4], location: Option<String>) -> Self {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        let app = Router::new().fallback(any(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let location = location.clone();
            async move {
                match location {
                    Some(to) => (StatusCode::FOUND, [(axum::http::header::LOCATION, to)], "moved").into_response(),
                    None => (StatusCode::OK, "trapped").into_response(),
                }
            }
        }));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0)))
            .await
            .expect("bind trap");
        let addr = listener.local_addr().expect("trap addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Trap { addr, hits }
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `http://addr/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// Spellings of `ip:port` that every URL parser of kubetx must see as that address, with the
/// bypass tricks of the outbound-policy issue; `decoy` is an allowed host name.
pub fn address_spellings(ip: [u8; 4], port: u16, decoy: &str) -> Vec<String> {
    let [a, b, c, d] = ip;
    let number = u32::from_be_bytes(ip);
    vec![
        format!("http://{a}.{b}.{c}.{d}:{port}/x"),
        format!("http://{number}:{port}/x"),
        format!("http://0{a:o}.0.0.0{d:o}:{port}/x"),
        format!("http://0x{a:x}.{b}.{c}.0x{d:x}:{port}/x"),
        format!("http://0x{number:x}:{port}/x"),
        format!("http://{a}.{d}:{port}/x"),
        format!("http://{a}.{b}.{c}.{d}.:{port}/x"),
        format!("http://[::ffff:{a}.{b}.{c}.{d}]:{port}/x"),
        format!(
            "http://[::ffff:{:x}:{:x}]:{port}/x",
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d])
        ),
        format!("http://{a}.{b}.{c}.{d}:{port}\\@{decoy}/x"),
        format!("http://{decoy}@{a}.{b}.{c}.{d}:{port}/x"),
        format!("http://{decoy}:80@{a}.{b}.{c}.{d}:{port}/x"),
        format!("https://{a}.{b}.{c}.{d}:{port}/x#@{decoy}"),
        format!("http://[::1]:{port}/x"),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://[::ffff:169.254.169.254]/latest/meta-data".to_owned(),
        "http://0xa9fea9fe/latest/meta-data".to_owned(),
        "http://[fe80::1]/".to_owned(),
    ]
}
