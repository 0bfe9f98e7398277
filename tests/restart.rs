//! Crash recovery and graceful shutdown with the real `kubetx` binary: SIGKILL while many sagas
//! and TCCs are mid-flight, then a new process on the same database finishes every one of them;
//! SIGTERM drains the passes in flight, exits 0 and leaves no lease held.
//!
//! Restarts resume at once, not after the dead process's leases expire: on SQLite (whose lock
//! file proves the restarted process alone, and refuses a second one), and on PostgreSQL and
//! MySQL for a replica restarted under the same `--instance-id`, while a replica of another
//! identity waits for the leases to expire.

mod common;
mod grpc_bank;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::db::{Backend, TestDb};
use common::{Bank, Reply, free_addr, transfer_saga};
use futures::future::join_all;
use kubetx::model::{Branch, GlobalTrans};
use kubetx::store::{ListQuery, SqliteStore, Store as _, Synchronous};
use serde_json::{Value, json};
use tokio::time::Instant;

const SAGAS: usize = 20;
const TCCS: usize = 10;

/// A `kubetx serve` child process; killed (SIGKILL) when dropped, its log shown on failure.
struct Kubetx {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    http: reqwest::Client,
}

impl Kubetx {
    async fn start(db: &Path, log: PathBuf) -> Self {
        Self::start_with(&db_args(db), "2", log).await
    }

    /// Like `start`, serving the gRPC API on `grpc` too.
    async fn start_with_grpc(db: &Path, log: PathBuf, grpc: SocketAddr) -> Self {
        let mut args = db_args(db);
        args.extend(["--grpc-listen".to_owned(), grpc.to_string()]);
        Self::start_with(&args, "2", log).await
    }

    /// A process on the store `store_args` names, with leases of `lease` seconds.
    async fn start_with(store_args: &[String], lease: &str, log: PathBuf) -> Self {
        let kubetx = Self::spawn(store_args, lease, &log);
        kubetx.wait_ready().await;
        kubetx
    }

    fn spawn(store_args: &[String], lease: &str, log: &Path) -> Self {
        // reqwest is built without a default TLS provider.
        kubetx::invoke::install_crypto_provider();
        let addr = free_addr();
        let stderr = std::fs::File::create(log).expect("log file");
        // The fixed-port gRPC listener is off unless asked for: tests run in parallel.
        let grpc_off = ["--grpc-listen", ""];
        let grpc_off = match store_args.iter().any(|a| a == "--grpc-listen") {
            true => &[][..],
            false => &grpc_off[..],
        };
        let child = Command::new(env!("CARGO_BIN_EXE_kubetx"))
            .args(["serve", "--listen", &addr.to_string()])
            .args(grpc_off)
            .args(store_args)
            .args([
                "--lease",
                lease,
                "--poll-interval-ms",
                "100",
                "--retry-interval",
                "1",
                "--max-retry-interval",
                "2",
                // The lease must outlast a branch call.
                "--request-timeout",
                "1",
                "--log-level",
                "kubetx=debug",
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("kubetx starts");
        Kubetx {
            child,
            addr,
            log: log.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ping = self
                .http
                .get(format!("http://{}/api/ping", self.addr))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if let Ok(response) = ping
                && response.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "kubetx never answered /api/ping");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, route: &str) -> String {
        format!("http://{}/api/dtmsvr/{route}", self.addr)
    }

    async fn post(&self, route: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(route))
            .json(&body)
            .send()
            .await
            .expect("request reaches kubetx");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, route: &str) -> Value {
        let response = self
            .http
            .get(self.url(route))
            .send()
            .await
            .expect("request reaches kubetx");
        assert_eq!(response.status().as_u16(), 200);
        response.json().await.expect("JSON")
    }

    /// SIGKILL, and reap.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM, then wait (polling, with a deadline) for the exit.
    async fn terminate(mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "kubetx did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Kubetx {
    fn drop(&mut self) {
        // Never leave a server behind, even when the test fails.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            common::print_log_tail(&self.log, 80);
        }
    }
}

fn db_args(db: &Path) -> Vec<String> {
    vec!["--db".to_owned(), db.display().to_string()]
}

fn saga_gid(i: usize) -> String {
    format!("crash-saga-{i:02}")
}

fn tcc_gid(i: usize) -> String {
    format!("crash-tcc-{i:02}")
}

async fn submit_saga(k: &Kubetx, bank: &Bank, gid: &str) {
    assert_eq!(
        k.post("submit", transfer_saga(gid, bank)).await,
        (200, json!({"dtm_result": "SUCCESS"}))
    );
}

async fn run_tcc(k: &Kubetx, bank: &Bank, gid: &str) {
    let ok = (200, json!({"dtm_result": "SUCCESS"}));
    assert_eq!(k.post("prepare", json!({"gid": gid, "trans_type": "tcc"})).await, ok);
    for branch in ["01", "02"] {
        let register = json!({"gid": gid, "trans_type": "tcc", "branch_id": branch, "data": "{\"amount\":30}",
            "confirm": bank.url("TransConfirm"), "cancel": bank.url("TransCancel")});
        assert_eq!(k.post("registerBranch", register).await, ok);
        // The client's own try call.
        let tried = k
            .http
            .post(bank.url("TransTry"))
            .query(&[
                ("gid", gid),
                ("trans_type", "tcc"),
                ("branch_id", branch),
                ("op", "try"),
            ])
            .body("{\"amount\":30}")
            .send()
            .await
            .expect("try");
        assert_eq!(tried.status().as_u16(), 200);
    }
    assert_eq!(k.post("submit", json!({"gid": gid, "trans_type": "tcc"})).await, ok);
}

/// Submits every saga and tcc concurrently.
async fn submit_all(k: &Kubetx, bank: &Bank, sagas: usize, tccs: usize) {
    let saga_gids: Vec<String> = (0..sagas).map(saga_gid).collect();
    let tcc_gids: Vec<String> = (0..tccs).map(tcc_gid).collect();
    futures::join!(
        join_all(saga_gids.iter().map(|gid| submit_saga(k, bank, gid))),
        join_all(tcc_gids.iter().map(|gid| run_tcc(k, bank, gid))),
    );
}

/// Waits until the bank has received at least `n` calls of `route`.
async fn wait_calls(bank: &Bank, route: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = bank.calls().iter().filter(|c| c.route == route).count();
        if seen >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{route}: only {seen} of {n} calls arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads the database file directly (no server running): every transaction and its branches.
async fn read_db(db: &Path) -> Vec<(GlobalTrans, Vec<Branch>)> {
    let store = SqliteStore::open(db.to_str().expect("utf-8 path"), Synchronous::Full)
        .await
        .expect("open the database");
    let globals = store
        .list(&ListQuery {
            limit: 10_000,
            ..ListQuery::default()
        })
        .await
        .expect("list");
    let mut out = Vec::new();
    for global in globals {
        let branches = store.branches(&global.gid).await.expect("branches");
        out.push((global, branches));
    }
    out
}

/// Waits (polling, with a deadline) until all `expected` transactions succeeded.
async fn wait_all_succeed(k: &Kubetx, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let page = k.get("all?status=succeed&limit=1000").await;
        let done = page["transactions"].as_array().map(Vec::len).unwrap_or(0);
        if done == expected {
            return;
        }
        if Instant::now() >= deadline {
            let all = k.get("all?limit=1000").await;
            let open: Vec<String> = all["transactions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["status"] != "succeed")
                .map(|t| format!("{} {} owner={}", t["gid"], t["status"], t["owner"]))
                .collect();
            panic!("only {done} of {expected} succeeded; still open: {open:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every expected effect was applied at least once, and no compensation or cancel ran for a
/// transaction that succeeded. Returns how many effects were applied more than once.
async fn assert_effects(k: &Kubetx, bank: &Bank, sagas: usize, tccs: usize) -> usize {
    let applied = bank.applied();
    let key = |gid: &str, branch: &str, op: &str| (gid.to_owned(), branch.to_owned(), op.to_owned());
    let mut expected = HashSet::new();
    for gid in (0..sagas).map(saga_gid) {
        expected.insert(key(&gid, "01", "action"));
        expected.insert(key(&gid, "02", "action"));
    }
    for gid in (0..tccs).map(tcc_gid) {
        expected.insert(key(&gid, "01", "try"));
        expected.insert(key(&gid, "02", "try"));
        expected.insert(key(&gid, "01", "confirm"));
        expected.insert(key(&gid, "02", "confirm"));
    }
    for effect in &expected {
        assert!(
            applied.get(effect).copied().unwrap_or(0) >= 1,
            "{effect:?} was never applied"
        );
    }
    let unexpected: Vec<_> = applied.keys().filter(|k| !expected.contains(*k)).collect();
    assert!(
        unexpected.is_empty(),
        "effects applied that must not be (compensations or cancels of succeeded transactions): {unexpected:?}"
    );
    for call in bank.calls() {
        assert!(
            !matches!(call.op.as_str(), "compensate" | "cancel"),
            "{} {} {} was called",
            call.gid,
            call.branch_id,
            call.op
        );
    }
    // The stored branches agree: every forward op succeeded, no rollback op ran.
    for gid in (0..sagas).map(saga_gid).chain((0..tccs).map(tcc_gid)) {
        let body = k.get(&format!("query?gid={gid}")).await;
        assert_eq!(body["transaction"]["status"], "succeed", "{body}");
        assert!(body["transaction"].get("owner").is_none(), "{body}");
        for branch in body["branches"].as_array().expect("branches") {
            let forward = matches!(branch["op"].as_str(), Some("action" | "confirm"));
            let want = if forward { "succeed" } else { "prepared" };
            assert_eq!(branch["status"], want, "{gid}: {branch}");
        }
    }
    expected
        .iter()
        .filter(|e| applied.get(*e).copied().unwrap_or(0) > 1)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_flight_then_a_new_process_finishes_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("kubetx.db");
    let bank = Bank::start().await;
    // Every saga's TransIn and every tcc's first confirm is slow, so all of them are mid-call when
    // the process dies; later calls answer ONGOING or fail for a while before succeeding.
    let mut transin = vec![Reply::Slow(800); SAGAS];
    transin.extend([Reply::Ongoing; 5]);
    transin.extend([Reply::Error; 5]);
    bank.script("TransIn", &transin);
    let mut confirm = vec![Reply::Slow(800); TCCS];
    confirm.extend([Reply::Error; 3]);
    confirm.extend([Reply::Ongoing; 2]);
    bank.script("TransConfirm", &confirm);

    let first = Kubetx::start(&db, dir.path().join("first.log")).await;
    submit_all(&first, &bank, SAGAS, TCCS).await;
    wait_calls(&bank, "TransIn", SAGAS).await;
    wait_calls(&bank, "TransConfirm", TCCS).await;
    first.kill();
    let calls_before_restart = bank.calls().len();

    // The crash left work behind: unfinished transactions whose leases the dead process holds.
    let crashed = read_db(&db).await;
    assert_eq!(crashed.len(), SAGAS + TCCS, "every acknowledged transaction is stored");
    let unfinished: Vec<&str> = crashed
        .iter()
        .filter(|(g, _)| !g.status.is_finished())
        .map(|(g, _)| g.gid.as_str())
        .collect();
    let leased = crashed.iter().filter(|(g, _)| !g.owner.is_empty()).count();
    assert!(
        unfinished.len() >= (SAGAS + TCCS) / 2,
        "the kill came while they were in flight: {unfinished:?}"
    );
    assert!(leased > 0, "the dead process held leases");

    let second = Kubetx::start(&db, dir.path().join("second.log")).await;
    wait_all_succeed(&second, SAGAS + TCCS).await;
    let repeated = assert_effects(&second, &bank, SAGAS, TCCS).await;
    eprintln!(
        "{} unfinished at the crash, {leased} leased; {repeated} effects were applied twice",
        unfinished.len()
    );
    // The new process resumed every transaction the crash left unfinished.
    let resumed: HashSet<String> = bank.calls()[calls_before_restart..]
        .iter()
        .map(|c| c.gid.clone())
        .collect();
    for gid in &unfinished {
        assert!(resumed.contains(*gid), "{gid} was not resumed by the new process");
    }
    let log = second.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_passes_in_flight_exits_0_and_a_restart_completes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("kubetx.db");
    let bank = Bank::start().await;
    let sagas = 12;
    let tccs = 6;
    // The first pass of every transaction is slow; half the sagas then hit an error that parks
    // them for a retry, which the drained process never makes.
    let mut transin = vec![Reply::Slow(500); sagas / 2];
    transin.extend(vec![Reply::Error; sagas / 2]);
    bank.script("TransOut", &vec![Reply::Slow(500); sagas]);
    bank.script("TransIn", &transin);
    bank.script("TransConfirm", &vec![Reply::Slow(500); tccs]);

    let first = Kubetx::start(&db, dir.path().join("first.log")).await;
    submit_all(&first, &bank, sagas, tccs).await;
    wait_calls(&bank, "TransOut", sagas).await;
    wait_calls(&bank, "TransConfirm", tccs).await;
    // Every saga is now inside its slow TransOut call, every tcc inside its slow confirm.
    let in_flight: HashMap<String, usize> = bank.calls().iter().fold(HashMap::new(), |mut m, c| {
        *m.entry(c.gid.clone()).or_default() += 1;
        m
    });
    assert_eq!(in_flight.len(), sagas + tccs);
    let started = Instant::now();
    let status = first.terminate().await;
    assert!(status.success(), "kubetx exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it drained, it did not wait out a timeout"
    );

    // The passes finished: no lease is held, and the slow calls in flight were recorded.
    let drained = read_db(&db).await;
    assert_eq!(drained.len(), sagas + tccs);
    for (global, branches) in &drained {
        assert!(
            global.owner.is_empty(),
            "{} still leased by {} after the drain",
            global.gid,
            global.owner
        );
        let first_forward = branches
            .iter()
            .find(|b| b.op == "action" || (b.op == "confirm" && b.branch_id == "02"))
            .expect("a forward branch");
        assert_eq!(
            first_forward.status.as_str(),
            "succeed",
            "{}: the call in flight at SIGTERM was completed and recorded",
            global.gid
        );
    }
    let finished = drained.iter().filter(|(g, _)| g.status.is_finished()).count();
    let parked = drained.len() - finished;
    assert!(parked > 0, "some transactions were left for a retry");
    // The log shows passes finishing after the shutdown began, then the drain completing.
    let log = std::fs::read_to_string(dir.path().join("first.log")).unwrap_or_default();
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file carries no colour codes: {log}"
    );
    let requested = log.find("shutdown requested").unwrap_or_else(|| panic!("{log}"));
    let after = &log[requested..];
    assert!(
        after.contains("transaction finished"),
        "nothing finished during the drain: {log}"
    );
    assert!(after.contains("in-flight transactions drained"), "{log}");

    let second = Kubetx::start(&db, dir.path().join("second.log")).await;
    wait_all_succeed(&second, sagas + tccs).await;
    let repeated = assert_effects(&second, &bank, sagas, tccs).await;
    assert_eq!(repeated, 0, "a drained process leaves nothing to redo");
    eprintln!("{finished} finished during the drain, {parked} parked and finished after the restart");
}

/// A lease far longer than any deadline below: a transaction resumed before it could expire was
/// taken back by the restart, not after expiry.
const LONG_LEASE: &str = "60";
/// How long a restart may take to finish what the crash left (generous for a loaded machine;
/// the time itself is a benchmark figure, printed, not asserted).
const RESUME_DEADLINE: Duration = Duration::from_secs(20);

/// Submits 2-step sagas whose second step is slow, and waits until every one is inside that
/// call: each is then leased by the process, mid-flight.
async fn submit_slow_sagas(k: &Kubetx, bank: &Bank, gids: &[String]) {
    bank.script("TransIn", &vec![Reply::Slow(800); gids.len()]);
    join_all(gids.iter().map(|gid| submit_saga(k, bank, gid))).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reached: HashSet<String> = bank
            .calls_on("TransIn")
            .into_iter()
            .map(|c| c.gid)
            .filter(|gid| gids.contains(gid))
            .collect();
        if reached.len() == gids.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} sagas reached TransIn",
            reached.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (polling, with a deadline) until every one of `gids` succeeded; returns how long it took.
async fn wait_gids_succeed(k: &Kubetx, gids: &[String], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let page = k.get("all?status=succeed&limit=1000").await;
        let done: HashSet<&str> = page["transactions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["gid"].as_str())
            .collect();
        let open: Vec<&String> = gids.iter().filter(|gid| !done.contains(gid.as_str())).collect();
        if open.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{} of {} still unfinished after {within:?}: {open:?}",
            open.len(),
            gids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_on_the_same_sqlite_file_resumes_at_once_not_after_the_lease() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("kubetx.db");
    let bank = Bank::start().await;
    let gids: Vec<String> = (0..SAGAS).map(saga_gid).collect();
    let first = Kubetx::start_with(&db_args(&db), LONG_LEASE, dir.path().join("first.log")).await;
    submit_slow_sagas(&first, &bank, &gids).await;
    first.kill();

    let crashed = read_db(&db).await;
    let leased = crashed
        .iter()
        .filter(|(g, _)| !g.status.is_finished() && !g.owner.is_empty())
        .count();
    assert_eq!(leased, SAGAS, "every saga was mid-call, leased by the dead process");

    let second = Kubetx::start_with(&db_args(&db), LONG_LEASE, dir.path().join("second.log")).await;
    let took = wait_gids_succeed(&second, &gids, RESUME_DEADLINE).await;
    eprintln!("SQLite: {SAGAS} sagas leased by the killed process finished {took:?} after the restart answered");
    assert_effects(&second, &bank, SAGAS, 0).await;
    let log = second.log_text();
    assert!(log.contains("took back the leases of a previous process"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_process_on_the_same_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("kubetx.db");
    let bank = Bank::start().await;
    let first = Kubetx::start(&db, dir.path().join("first.log")).await;

    let mut second = Kubetx::spawn(&db_args(&db), "2", &dir.path().join("second.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the second process kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "the second process exited with {status}");
    let log = second.log_text();
    assert!(log.contains("is in use by another kubetx process"), "{log}");
    assert!(log.contains(&format!("{}.lock", db.display())), "{log}");

    // The first one is untouched and keeps working.
    let gid = "after-refusal".to_owned();
    submit_saga(&first, &bank, &gid).await;
    wait_gids_succeed(&first, &[gid], RESUME_DEADLINE).await;
}

fn shared_args(url: &str, instance: &str) -> Vec<String> {
    ["--store", url, "--instance-id", instance].map(str::to_owned).to_vec()
}

/// The transactions of a PostgreSQL or MySQL database or a Redis, read straight from it.
async fn read_shared(url: &str, gids: &[String]) -> Vec<GlobalTrans> {
    let store = kubetx::store::open(&kubetx::store::StoreOptions {
        kind: kubetx::store::StoreKind::parse(url, "").expect("url"),
        synchronous: Synchronous::Normal,
        migrate: false,
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        group_commit: 0,
    })
    .await
    .expect("open the database");
    let mut out = Vec::new();
    for gid in gids {
        out.push(store.find(gid).await.expect("find").expect("stored"));
    }
    out
}

/// The instant of a wall-clock time in epoch milliseconds (lease expiries are stored so).
fn instant_of(epoch_ms: i64) -> std::time::Instant {
    let now = std::time::Instant::now();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    let offset = Duration::from_millis(epoch_ms.abs_diff(now_ms));
    if epoch_ms >= now_ms { now + offset } else { now - offset }
}

/// A replica SIGKILLed mid-flight and restarted under the same `--instance-id` resumes at once;
/// one killed and followed by a replica of another identity leaves its transactions alone until
/// their leases expire.
async fn replica_restart(backend: Backend) {
    let db = TestDb::create(backend).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let bank = Bank::start().await;
    let n = 12;

    // Same identity: back at once.
    let same: Vec<String> = (0..n).map(|i| format!("same-id-{i:02}")).collect();
    let a = Kubetx::start_with(
        &shared_args(&db.url, "replica-a"),
        LONG_LEASE,
        dir.path().join("a1.log"),
    )
    .await;
    submit_slow_sagas(&a, &bank, &same).await;
    a.kill();
    for global in read_shared(&db.url, &same).await {
        assert!(!global.status.is_finished(), "{} finished before the kill", global.gid);
        assert!(
            global.owner.starts_with("replica-a/"),
            "{}: {}",
            global.gid,
            global.owner
        );
    }
    let a = Kubetx::start_with(
        &shared_args(&db.url, "replica-a"),
        LONG_LEASE,
        dir.path().join("a2.log"),
    )
    .await;
    let took = wait_gids_succeed(&a, &same, RESUME_DEADLINE).await;
    eprintln!(
        "{}: {n} sagas of the killed replica finished {took:?} after its restart answered",
        backend.name()
    );
    let log = a.log_text();
    assert!(log.contains("took back the leases of a previous process"), "{log}");
    a.kill();

    // Another identity: only after expiry.
    let other: Vec<String> = (0..n).map(|i| format!("other-id-{i:02}")).collect();
    let b = Kubetx::start_with(&shared_args(&db.url, "replica-b"), "4", dir.path().join("b.log")).await;
    submit_slow_sagas(&b, &bank, &other).await;
    b.kill();
    let killed_at = std::time::Instant::now();
    let mut expiry = HashMap::new();
    for global in read_shared(&db.url, &other).await {
        assert!(
            global.owner.starts_with("replica-b/"),
            "{}: {}",
            global.gid,
            global.owner
        );
        expiry.insert(global.gid.clone(), instant_of(global.next_cron_time));
    }
    let c = Kubetx::start_with(&shared_args(&db.url, "replica-c"), "4", dir.path().join("c.log")).await;
    wait_gids_succeed(&c, &other, RESUME_DEADLINE).await;
    let log = c.log_text();
    assert!(!log.contains("took back the leases"), "{log}");
    for gid in &other {
        let first_after_kill = bank
            .calls_for(gid)
            .into_iter()
            .map(|call| call.at)
            .find(|at| *at > killed_at)
            .expect("resumed after the kill");
        // A millisecond of slack: the stored expiry is in whole milliseconds.
        assert!(
            first_after_kill + Duration::from_millis(1) >= expiry[gid],
            "{gid} was resumed {:?} before its lease expired",
            expiry[gid] - first_after_kill
        );
    }
    // No effect ran twice except the calls in flight at each kill, which the bank dedupes.
    let applied = bank.applied();
    for gid in same.iter().chain(&other) {
        for (branch, op) in [("01", "action"), ("02", "action")] {
            let key = (gid.clone(), branch.to_owned(), op.to_owned());
            assert!(applied.get(&key).copied().unwrap_or(0) >= 1, "{key:?} never applied");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_replica_restarted_under_its_identity_resumes_at_once() {
    if common::db::available(Backend::Postgres, "the SQL replica restart test") {
        replica_restart(Backend::Postgres).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mysql_replica_restarted_under_its_identity_resumes_at_once() {
    if common::db::available(Backend::MySql, "the SQL replica restart test") {
        replica_restart(Backend::MySql).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_replica_restarted_under_its_identity_resumes_at_once() {
    if common::db::available(Backend::Redis, "the Redis replica restart test") {
        replica_restart(Backend::Redis).await;
    }
}

/// The crash test with gRPC branches, submitted through the gRPC API: every saga's TransIn is
/// mid-call on a real tonic bank when the process is SIGKILLed; a new process on the same
/// database (and gRPC port) finishes every one, without a compensation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_flight_with_grpc_branches_then_a_new_process_finishes_everything() {
    use grpc_bank::{GReply, GrpcBank, busi};
    use kubetx::proto::dtmgimp::DtmRequest;
    use kubetx::proto::dtmgimp::dtm_client::DtmClient;
    const N: usize = 12;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("kubetx.db");
    let bank = GrpcBank::start().await;
    let mut transin = vec![GReply::Slow(800); N];
    transin.extend([GReply::Unavailable; 4]);
    transin.extend([GReply::Ongoing; 2]);
    bank.script("TransIn", &transin);
    let grpc = free_addr();
    let first = Kubetx::start_with_grpc(&db, dir.path().join("first.log"), grpc).await;
    let mut dtm = DtmClient::connect(format!("http://{grpc}")).await.expect("gRPC API");
    let gids: Vec<String> = (0..N).map(|i| format!("crash-grpc-{i:02}")).collect();
    for gid in &gids {
        let steps = json!([
            {"action": bank.target("TransOut"), "compensate": bank.target("TransOutRevert")},
            {"action": bank.target("TransIn"), "compensate": bank.target("TransInRevert")},
        ]);
        dtm.submit(DtmRequest {
            gid: gid.clone(),
            trans_type: "saga".to_owned(),
            steps: steps.to_string(),
            bin_payloads: vec![busi(30), busi(30)],
            ..DtmRequest::default()
        })
        .await
        .expect("Submit over gRPC");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while bank.calls().iter().filter(|c| c.method == "TransIn").count() < N {
        assert!(Instant::now() < deadline, "the TransIn calls never all arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill();
    let crashed = read_db(&db).await;
    assert_eq!(crashed.len(), N, "every acknowledged transaction is stored");
    let unfinished = crashed.iter().filter(|(g, _)| !g.status.is_finished()).count();
    assert!(unfinished >= N / 2, "the kill came while they were in flight");
    assert!(crashed.iter().all(|(g, _)| g.protocol == "grpc"));

    let second = Kubetx::start_with_grpc(&db, dir.path().join("second.log"), grpc).await;
    wait_all_succeed(&second, N).await;
    for gid in &gids {
        let body = second.get(&format!("query?gid={gid}")).await;
        assert_eq!(body["transaction"]["protocol"], "grpc", "{body}");
        for branch in body["branches"].as_array().expect("branches") {
            let want = if branch["op"] == "action" {
                "succeed"
            } else {
                "prepared"
            };
            assert_eq!(branch["status"], want, "{gid}: {branch}");
        }
    }
    assert!(
        !bank.calls().iter().any(|c| c.op == "compensate"),
        "no compensation ran for a saga that succeeded"
    );
    let log = second.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
