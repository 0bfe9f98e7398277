//! Scale-out: three real `kubetx serve` processes on one PostgreSQL database (and, separately,
//! one MariaDB/MySQL database, and one Redis key prefix). Thousands of sagas are submitted across them while random
//! replicas are SIGKILLed and restarted. Every saga reaches its terminal state, every branch
//! effect is applied exactly once by a bank that deduplicates like a barrier, and no saga is
//! ever driven by two replicas at the same moment: the bank records the interval of every call,
//! and the calls of one saga (whose steps run one after another) never overlap.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use common::db::{Backend, TestDb};
use common::free_addr;
use futures::StreamExt;
use kubetx::model::TransStatus;
use kubetx::store::{self, ListQuery, StoreKind, StoreOptions, Synchronous};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Sagas per run.
const SAGAS: usize = 2_500;
/// Submissions in flight at once.
const CLIENTS: usize = 48;
/// Every tenth saga's second step is refused, so that it compensates.
fn refused(index: usize) -> bool {
    index % 10 == 7
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_a_postgres_database_through_kills() {
    if common::db::available(Backend::Postgres, "the scale-out suite") {
        scale_out(Backend::Postgres, 0).await;
    }
}

/// The same with PostgreSQL group commit: three processes' batches on the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_with_group_commit_share_a_postgres_database_through_kills() {
    if common::db::available(Backend::Postgres, "the scale-out suite") {
        scale_out(Backend::Postgres, 256).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_a_mysql_database_through_kills() {
    if common::db::available(Backend::MySql, "the scale-out suite") {
        scale_out(Backend::MySql, 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_a_redis_through_kills() {
    if common::db::available(Backend::Redis, "the scale-out suite") {
        scale_out(Backend::Redis, 0).await;
    }
}

/// A `kubetx serve` child process; killed (SIGKILL) when dropped, its log shown on failure.
struct Replica {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Replica {
    async fn start(url: &str, group_commit: usize, log: PathBuf, http: &reqwest::Client) -> Replica {
        let addr = free_addr();
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(kubetx_bin())
            .args(["serve", "--grpc-listen=", "--listen", &addr.to_string(), "--store", url])
            .args([
                "--lease",
                "2",
                "--poll-interval-ms",
                "100",
                "--retry-interval",
                "1",
                "--max-retry-interval",
                "2",
                "--request-timeout",
                "1",
                "--store-max-connections",
                "8",
                "--log-level",
                "kubetx=info",
            ])
            .env_remove("RUST_LOG")
            .env_remove("KUBETX_CONFIG")
            .env("KUBETX_STORE_GROUP_COMMIT", group_commit.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("kubetx starts");
        let replica = Replica { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("http://{addr}/readyz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&ready, Ok(r) if r.status().is_success()) {
                return replica;
            }
            assert!(Instant::now() < deadline, "replica on {addr} never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            common::print_log_tail(&self.log, 30);
        }
    }
}

/// One call the bank served, with when it started and ended.
#[derive(Debug, Clone)]
struct Served {
    route: String,
    branch_id: String,
    op: String,
    start: Instant,
    end: Instant,
}

#[derive(Default)]
struct Ledger {
    calls: HashMap<String, Vec<Served>>,
    /// Effects applied, keyed by (gid, branch_id, op): the barrier lets each through once.
    applied: HashMap<(String, String, String), u32>,
    /// Deliveries of an effect already applied (retries the barrier absorbed).
    duplicates: usize,
}

/// A bank behind a sub-transaction barrier that records every call's interval.
#[derive(Clone)]
struct Bank {
    addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
}

impl Bank {
    async fn start() -> Bank {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let app = Router::new()
            .route("/api/{route}", any(serve))
            .with_state(ledger.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind bank");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Bank { addr, ledger }
    }

    fn url(&self, route: &str) -> String {
        format!("http://{}/api/{route}", self.addr)
    }
}

async fn serve(
    State(ledger): State<Arc<Mutex<Ledger>>>,
    UrlPath(route): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let start = Instant::now();
    let param = |k: &str| query.get(k).cloned().unwrap_or_default();
    let (gid, branch_id, op) = (param("gid"), param("branch_id"), param("op"));
    // A little work, so that two drivers of one saga would overlap.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let index: usize = gid.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let refuse = route == "TransIn" && refused(index);
    let mut ledger = ledger.lock().expect("ledger");
    if !refuse {
        let count = ledger
            .applied
            .entry((gid.clone(), branch_id.clone(), op.clone()))
            .or_default();
        *count += 1;
        if *count > 1 {
            *count = 1;
            ledger.duplicates += 1;
        }
    }
    ledger.calls.entry(gid).or_default().push(Served {
        route,
        branch_id,
        op,
        start,
        end: Instant::now(),
    });
    drop(ledger);
    if refuse {
        (StatusCode::CONFLICT, "insufficient balance").into_response()
    } else {
        (StatusCode::OK, axum::Json(json!({"dtm_result": "SUCCESS"}))).into_response()
    }
}

fn gid(backend: Backend, index: usize) -> String {
    format!("scale-{}-{index:05}", backend.name())
}

/// The live replicas' addresses, for clients to pick from.
type Pool = Arc<RwLock<Vec<SocketAddr>>>;

fn pick(pool: &Pool) -> SocketAddr {
    let live = pool.read().expect("pool");
    live[rand::random_range(0..live.len())]
}

/// Submits one saga to random replicas until one acknowledges it. A resubmission after a lost
/// answer may find it already finished (409): the first submission was stored then.
async fn submit(http: &reqwest::Client, pool: &Pool, body: &Value) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = http
            .post(format!("http://{}/api/dtmsvr/submit", pick(pool)))
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent.map(|r| r.status().as_u16()) {
            Ok(200) => return attempts,
            Ok(409) if attempts > 1 => return attempts,
            Ok(code) => assert!(code == 503 || code == 409, "submit answered {code}"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "{body} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The two runs take turns: each gets the machine's CPUs to itself.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The server binary: this build's, or `KUBETX_SCALE_OUT_BIN` (e.g. a release build, to measure).
fn kubetx_bin() -> String {
    std::env::var("KUBETX_SCALE_OUT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kubetx").to_owned())
}

async fn scale_out(backend: Backend, group_commit: usize) {
    let _turn = ONE_AT_A_TIME.lock().await;
    kubetx::invoke::install_crypto_provider();
    let db = TestDb::create(backend).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let http = reqwest::Client::new();
    let bank = Bank::start().await;
    let log = |name: String| dir.path().join(format!("{name}.log"));

    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Replica::start(&db.url, group_commit, log(format!("replica-{i}")), &http).await);
    }
    let pool: Pool = Arc::new(RwLock::new(replicas.iter().map(|r| r.addr).collect()));
    let replicas = Arc::new(tokio::sync::Mutex::new(replicas));

    // Chaos: while sagas flow, SIGKILL a random replica and start a new one in its place.
    let submitting = Arc::new(AtomicBool::new(true));
    let kills = Arc::new(AtomicUsize::new(0));
    let chaos = tokio::spawn({
        let (replicas, pool, submitting, kills, http, url) = (
            Arc::clone(&replicas),
            Arc::clone(&pool),
            Arc::clone(&submitting),
            Arc::clone(&kills),
            http.clone(),
            db.url.clone(),
        );
        let logs = dir.path().to_path_buf();
        async move {
            let mut generation = 0;
            // At least three kills, however fast the submissions go.
            while submitting.load(Ordering::SeqCst) || kills.load(Ordering::SeqCst) < 3 {
                // Pacing of the chaos, not synchronisation: kills land at random moments.
                tokio::time::sleep(Duration::from_millis(rand::random_range(600..1200))).await;
                let mut replicas = replicas.lock().await;
                let victim = rand::random_range(0..replicas.len());
                let addr = replicas[victim].addr;
                pool.write().expect("pool").retain(|a| *a != addr);
                replicas[victim].child.kill().expect("SIGKILL");
                let _ = replicas[victim].child.wait();
                kills.fetch_add(1, Ordering::SeqCst);
                generation += 1;
                let fresh = Replica::start(
                    &url,
                    group_commit,
                    logs.join(format!("restart-{generation}.log")),
                    &http,
                )
                .await;
                pool.write().expect("pool").push(fresh.addr);
                replicas[victim] = fresh;
            }
        }
    });

    let started = Instant::now();
    let bodies: Vec<Value> = (0..SAGAS)
        .map(|i| {
            json!({
                "gid": gid(backend, i),
                "trans_type": "saga",
                "steps": [
                    {"action": bank.url("TransOut"), "compensate": bank.url("TransOutRevert")},
                    {"action": bank.url("TransIn"), "compensate": bank.url("TransInRevert")},
                ],
                "payloads": ["{\"amount\":30}", "{\"amount\":30}"],
            })
        })
        .collect();
    let resubmits: usize = futures::stream::iter(bodies.iter())
        .map(|body| submit(&http, &pool, body))
        .buffer_unordered(CLIENTS)
        .map(|attempts| attempts - 1)
        .fold(0, |sum, n| async move { sum + n })
        .await;
    let submitted_in = started.elapsed();
    submitting.store(false, Ordering::SeqCst);
    chaos.await.expect("chaos task");

    // Every saga reaches its terminal state (read straight from the database).
    let reader = store::open(&StoreOptions {
        kind: StoreKind::parse(&db.url, "").expect("url"),
        synchronous: Synchronous::Normal,
        migrate: false,
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        group_commit: 0,
    })
    .await
    .expect("open the database");
    let deadline = Instant::now() + Duration::from_secs(60);
    let statuses = loop {
        let mut statuses = HashMap::new();
        let mut before_id = None;
        loop {
            let page = reader
                .list(&ListQuery {
                    before_id,
                    limit: 1_000,
                    ..ListQuery::default()
                })
                .await
                .expect("list");
            let Some(last) = page.last() else { break };
            before_id = Some(last.id);
            for g in page {
                statuses.insert(g.gid, g.status);
            }
        }
        let open = statuses.values().filter(|s| !s.is_finished()).count();
        if statuses.len() == SAGAS && open == 0 {
            break statuses;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {SAGAS} stored, {open} still unfinished",
            statuses.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let finished_in = started.elapsed();

    let ledger = bank.ledger.lock().expect("ledger");
    let key = |gid: &str, branch: &str, op: &str| (gid.to_owned(), branch.to_owned(), op.to_owned());
    let mut expected = HashSet::new();
    for i in 0..SAGAS {
        let g = gid(backend, i);
        let want = if refused(i) {
            TransStatus::Failed
        } else {
            TransStatus::Succeed
        };
        assert_eq!(statuses.get(&g), Some(&want), "{g}");
        expected.insert(key(&g, "01", "action"));
        if refused(i) {
            expected.insert(key(&g, "01", "compensate"));
            expected.insert(key(&g, "02", "compensate"));
        } else {
            expected.insert(key(&g, "02", "action"));
        }
    }
    // Exactly the expected effects, each applied once.
    let applied: HashSet<_> = ledger.applied.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&applied).take(5).collect();
    let extra: Vec<_> = applied.difference(&expected).take(5).collect();
    assert!(missing.is_empty(), "effects never applied: {missing:?}");
    assert!(extra.is_empty(), "effects that must not happen: {extra:?}");
    assert!(ledger.applied.values().all(|n| *n == 1));

    // No saga was driven by two replicas at once: its calls never overlap in time.
    let mut calls = 0;
    for (gid, served) in &ledger.calls {
        let mut served = served.clone();
        served.sort_by_key(|c| c.start);
        calls += served.len();
        for pair in served.windows(2) {
            assert!(
                pair[1].start >= pair[0].end,
                "{gid}: {} {} {} overlapped {} {} {}: two drivers at once",
                pair[1].route,
                pair[1].branch_id,
                pair[1].op,
                pair[0].route,
                pair[0].branch_id,
                pair[0].op,
            );
        }
    }
    let kills = kills.load(Ordering::SeqCst);
    let report = format!(
        "scale-out on {}: {SAGAS} sagas across 3 replicas, {kills} SIGKILLs; submitted in {:.1}s \
         ({:.0}/s, {resubmits} resubmissions), all terminal after {:.1}s ({:.0} sagas/s); {calls} branch calls, \
         {} duplicate deliveries absorbed by the barrier, no overlapping drivers",
        backend.name(),
        submitted_in.as_secs_f64(),
        SAGAS as f64 / submitted_in.as_secs_f64(),
        finished_in.as_secs_f64(),
        SAGAS as f64 / finished_in.as_secs_f64(),
        ledger.duplicates,
    );
    drop(ledger);
    // The replicas shared the work: each process's log counts the transactions it finished.
    let finished = finishes_per_process(dir.path());
    let first_three: usize = (0..3)
        .map(|i| finished.get(&format!("replica-{i}")).copied().unwrap_or(0))
        .sum();
    // A process killed between a finishing write and its log line finished one more than it logged.
    let logged: usize = finished.values().sum();
    assert!(logged <= SAGAS, "no saga finished twice: {finished:?}");
    assert!(
        finished.values().filter(|n| **n > 0).count() >= 3,
        "the load was shared: {finished:?}"
    );
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "{report}; {logged} finishes logged, {first_three} by the first three processes, {} by restarted ones",
        logged - first_three
    );
}

/// Transactions finished per process (log file stem); fails on a panic in any log.
fn finishes_per_process(dir: &Path) -> HashMap<String, usize> {
    let mut finished = HashMap::new();
    for entry in std::fs::read_dir(dir).expect("log dir").flatten() {
        let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(!log.contains("panicked"), "{}: {log}", entry.path().display());
        let name = entry
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        finished.insert(name, log.matches("transaction finished").count());
    }
    finished
}
