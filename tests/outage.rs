//! Database outage: kubetx reaches PostgreSQL (or MariaDB/MySQL, or Redis) through a TCP proxy that the
//! test cuts mid-run, with sagas in flight. While the database is gone the API answers 503 at
//! once with a clear message and `/readyz` reports it; `/api/ping` stays up. When the proxy
//! comes back everything resumes and no acknowledged saga is lost.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::db::{Backend, TestDb};
use common::{Bank, Reply, transfer_saga};
use kubetx::config::Config;
use kubetx::scheduler::SystemClock;
use kubetx::server::Server;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_fails_fast_and_loses_nothing() {
    if common::db::available(Backend::Postgres, "the outage suite") {
        outage(Backend::Postgres).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_fails_fast_and_loses_nothing() {
    if common::db::available(Backend::Redis, "the outage suite") {
        outage(Backend::Redis).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_outage_fails_fast_and_loses_nothing() {
    if common::db::available(Backend::MySql, "the outage suite") {
        outage(Backend::MySql).await;
    }
}

/// A TCP proxy that can be cut (listener closed, every connection dropped) and restored on
/// the same port.
struct Proxy {
    addr: SocketAddr,
    upstream: String,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let proxy = Proxy {
            addr: "127.0.0.1:0".parse().expect("addr"),
            upstream,
            tasks: Arc::default(),
            accept: Mutex::new(None),
        };
        proxy.listen().await
    }

    async fn listen(mut self) -> Proxy {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(self.addr).expect("bind proxy");
        let listener = socket.listen(1024).expect("listen");
        self.addr = listener.local_addr().expect("addr");
        let (upstream, tasks) = (self.upstream.clone(), Arc::clone(&self.tasks));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().expect("tasks").push(task);
            }
        });
        *self.accept.lock().expect("accept") = Some(accept);
        self
    }

    /// Refuses new connections and drops every open one.
    async fn cut(&self) {
        let accept = self.accept.lock().expect("accept").take();
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await;
        }
        let tasks: Vec<_> = self.tasks.lock().expect("tasks").drain(..).collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    /// Accepts connections again on the same port.
    async fn restore(self) -> Proxy {
        self.listen().await
    }
}

/// `host:port` of a database URL.
fn upstream_of(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    authority
        .rsplit_once('@')
        .map(|(_, host)| host)
        .unwrap_or(authority)
        .to_owned()
}

async fn post(http: &reqwest::Client, server: &Server, route: &str, body: &Value) -> (u16, Value) {
    let response = http
        .post(format!("{}/{route}", server.dtm_url()))
        .json(body)
        .send()
        .await
        .expect("kubetx answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(http: &reqwest::Client, url: String) -> (u16, Value) {
    let response = http.get(url).send().await.expect("kubetx answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn outage(backend: Backend) {
    let db = TestDb::create(backend).await;
    let proxy = Proxy::start(upstream_of(&db.url)).await;
    let config = Config {
        listen: "127.0.0.1:0".to_owned(),
        grpc_listen: String::new(),
        store: db.url_via(proxy.addr),
        store_max_connections: 4,
        store_acquire_timeout_ms: 1_000,
        lease: 2,
        poll_interval_ms: 100,
        retry_interval: 1,
        max_retry_interval: 2,
        request_timeout: 1,
        ..Config::default()
    };
    let server = Server::start(&config, Arc::new(SystemClock), true)
        .await
        .expect("server starts");
    let http = reqwest::Client::new();
    let bank = Bank::start().await;
    let base = format!("http://{}", server.addr);
    assert_eq!(get(&http, format!("{base}/readyz")).await.0, 200);

    // Sagas in flight: every TransIn is slow, so the cut lands mid-call.
    const BEFORE: usize = 20;
    bank.script("TransIn", &[Reply::Slow(400); BEFORE]);
    let before: Vec<String> = (0..BEFORE).map(|i| format!("{}-before-{i}", backend.name())).collect();
    for gid in &before {
        assert_eq!(post(&http, &server, "submit", &transfer_saga(gid, &bank)).await.0, 200);
    }
    bank.wait_calls_on("TransIn", BEFORE / 2).await;

    proxy.cut().await;
    // While the database is gone: 503 with a clear message, at once after the first failure.
    const DURING: usize = 10;
    let during: Vec<String> = (0..DURING).map(|i| format!("{}-during-{i}", backend.name())).collect();
    let mut first = Duration::ZERO;
    let mut slowest_after_first = Duration::ZERO;
    for (i, gid) in during.iter().enumerate() {
        let started = Instant::now();
        let (code, body) = post(&http, &server, "submit", &transfer_saga(gid, &bank)).await;
        let took = started.elapsed();
        assert_eq!(code, 503, "{body}");
        let message = body["message"].as_str().unwrap_or_default().to_owned();
        assert!(
            message.contains("unavailable") || message.contains("unreachable"),
            "{message}"
        );
        assert!(took < Duration::from_millis(1_500), "503 took {took:?}");
        if i == 0 {
            first = took;
        } else {
            slowest_after_first = slowest_after_first.max(took);
        }
        let (code, body) = get(&http, format!("{}/query?gid={}", server.dtm_url(), before[0])).await;
        assert_eq!(code, 503, "{body}");
    }
    assert!(
        slowest_after_first < Duration::from_millis(200),
        "once the outage is known, calls fail fast: {slowest_after_first:?}"
    );
    eprintln!(
        "{}: during the outage the first 503 took {first:?}, the slowest later one {slowest_after_first:?}",
        backend.name()
    );
    let (code, body) = get(&http, format!("{base}/readyz")).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(get(&http, format!("{base}/api/ping")).await.0, 200, "liveness stays up");

    let proxy = proxy.restore().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(&http, format!("{base}/readyz")).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready again after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Clients retry what was refused.
    for gid in &during {
        let (code, body) = post(&http, &server, "submit", &transfer_saga(gid, &bank)).await;
        assert_eq!(code, 200, "{body}");
    }

    // Nothing lost: every acknowledged saga finishes, without compensation.
    let deadline = Instant::now() + Duration::from_secs(40);
    for gid in before.iter().chain(&during) {
        loop {
            let (code, body) = get(&http, format!("{}/query?gid={gid}", server.dtm_url())).await;
            if code == 200 && body["transaction"]["status"] == "succeed" {
                break;
            }
            assert!(Instant::now() < deadline, "{gid} did not finish: {code} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let applied = bank.applied();
    for gid in before.iter().chain(&during) {
        for branch in ["01", "02"] {
            let key = (gid.clone(), branch.to_owned(), "action".to_owned());
            assert!(applied.get(&key).copied().unwrap_or(0) >= 1, "{key:?} never applied");
        }
    }
    assert!(
        bank.calls().iter().all(|c| c.op != "compensate"),
        "an outage is never a reason to compensate"
    );
    server.stop().await.expect("stops");
    drop(proxy);
}
