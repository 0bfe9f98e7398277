//! kubetx on the test's own `redis-server`. A Redis crash mid-run: kubetx runs on the test's own
//! `redis-server` (another 127.0.0.1 port, a temporary directory, `appendonly yes` +
//! `appendfsync always`, no RDB snapshots). Sagas are submitted continuously; Redis is SIGKILLed
//! and restarted on the same data while they flow. Every saga whose submit was acknowledged
//! (200) is still there afterwards and succeeds, with both of its effects applied. `/readyz` says
//! nothing with AOF always, and warns once the server runs with a weaker setting.
//!
//! Also on the test's own server: a password, from the URL or from `KUBETX_REDIS_PASSWORD`, and
//! never in a log line or an error.
//!
//! And `rediss://`: TLS to a TLS-only port of the test's server, trusted through the CA that
//! `SSL_CERT_FILE` names and refused without it.
//!
//! Needs the `redis-server` binary (override with `KUBETX_TEST_REDIS_SERVER`); without it the
//! test prints SKIPPED and passes.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Bank, free_addr, transfer_saga};
use futures::StreamExt;
use kubetx::config::Config;
use kubetx::model::TransStatus;
use kubetx::scheduler::SystemClock;
use kubetx::server::Server;
use kubetx::store::{self, StoreKind, StoreOptions, Synchronous};
use serde_json::Value;
use tokio::time::Instant;

/// Sagas acknowledged before the crash, and again after the restart.
const PER_PHASE: usize = 150;

fn redis_server_bin() -> Option<String> {
    let bin = std::env::var("KUBETX_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
    let found = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found.then_some(bin)
}

/// The test's own Redis, killed (SIGKILL) when dropped.
struct RedisProcess {
    child: Child,
    log: PathBuf,
}

impl RedisProcess {
    async fn start(bin: &str, addr: SocketAddr, dir: &Path, generation: usize) -> RedisProcess {
        Self::start_with(bin, addr, dir, generation, &[], None).await
    }

    /// Starts one with extra arguments; `password` is what its PING needs.
    async fn start_with(
        bin: &str,
        addr: SocketAddr,
        dir: &Path,
        generation: usize,
        extra: &[&str],
        password: Option<&str>,
    ) -> RedisProcess {
        let log = dir.join(format!("redis-{generation}.log"));
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--dir", &dir.display().to_string()])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .args(["--logfile", &log.display().to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let process = RedisProcess { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while redis_ping(addr, password).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server on {addr} never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process
    }

    fn crash(&mut self) {
        self.child.kill().expect("SIGKILL redis-server");
        let _ = self.child.wait();
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            common::print_log_tail(&self.log, 20);
        }
    }
}

async fn redis_ping(addr: SocketAddr, password: Option<&str>) -> redis::RedisResult<()> {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let client = redis::Client::open(format!("redis://{auth}{addr}/0"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ())
}

async fn redis_config_set(addr: SocketAddr, name: &str, value: &str) {
    let client = redis::Client::open(format!("redis://{addr}/0")).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
}

/// Submits one saga; true when kubetx acknowledged it.
async fn submit(http: &reqwest::Client, server: &str, body: &Value) -> bool {
    let sent = http
        .post(format!("{server}/submit"))
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    matches!(sent, Ok(r) if r.status().as_u16() == 200)
}

/// Waits (polling) until `acknowledged` holds at least `n` gids.
async fn wait_acknowledged(acknowledged: &Mutex<Vec<String>>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.lock().expect("acks").len() < n {
        assert!(Instant::now() < deadline, "fewer than {n} submits acknowledged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn readyz(http: &reqwest::Client, addr: SocketAddr) -> Value {
    let response = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .expect("readyz answers");
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.expect("readyz JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_crash_loses_no_acknowledged_saga_with_aof_always() {
    let Some(bin) = redis_server_bin() else {
        eprintln!("SKIPPED: the Redis restart test (no redis-server binary)");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let mut redis = RedisProcess::start(&bin, addr, dir.path(), 0).await;
    let url = format!("redis://{addr}/0?prefix=restart");
    let config = Config {
        listen: "127.0.0.1:0".to_owned(),
        // Not the fixed gRPC port: a kubetx already running on this machine holds it.
        grpc_listen: String::new(),
        store: url.clone(),
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
    let ready = readyz(&http, server.addr).await;
    assert!(ready.get("warnings").is_none(), "AOF always: no warning: {ready}");
    let bank = Bank::start().await;

    // Submitters run until told to stop, recording what kubetx acknowledged.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let running = Arc::new(AtomicBool::new(true));
    let submitters = tokio::spawn({
        let (acknowledged, running, http, bank, dtm) = (
            Arc::clone(&acknowledged),
            Arc::clone(&running),
            http.clone(),
            bank.clone(),
            server.dtm_url(),
        );
        async move {
            futures::stream::iter(0..)
                .take_while(|_| std::future::ready(running.load(Ordering::SeqCst)))
                .for_each_concurrent(16, |i| {
                    let (acknowledged, http, bank, dtm) = (&acknowledged, &http, &bank, &dtm);
                    async move {
                        let gid = format!("crash-{i:06}");
                        if submit(http, dtm, &transfer_saga(&gid, bank)).await {
                            acknowledged.lock().expect("acks").push(gid);
                        }
                    }
                })
                .await;
        }
    });

    wait_acknowledged(&acknowledged, PER_PHASE).await;
    redis.crash();
    let at_crash = acknowledged.lock().expect("acks").len();
    redis = RedisProcess::start(&bin, addr, dir.path(), 1).await;
    wait_acknowledged(&acknowledged, at_crash + PER_PHASE).await;
    running.store(false, Ordering::SeqCst);
    submitters.await.expect("submitters");
    let acknowledged: Vec<String> = acknowledged.lock().expect("acks").clone();

    // Every acknowledged saga is in the restarted Redis and succeeds.
    let reader = store::open(&StoreOptions {
        kind: StoreKind::parse(&url, "").expect("url"),
        synchronous: Synchronous::Normal,
        migrate: false,
        max_connections: 1,
        acquire_timeout: Duration::from_secs(5),
        group_commit: 0,
    })
    .await
    .expect("reader opens");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending: HashSet<String> = acknowledged.iter().cloned().collect();
    while !pending.is_empty() {
        let mut still = HashSet::new();
        for gid in &pending {
            match reader.find(gid).await.expect("find") {
                Some(g) if g.status == TransStatus::Succeed => {}
                Some(g) => {
                    assert!(!g.status.is_finished(), "{gid} ended {}", g.status);
                    still.insert(gid.clone());
                }
                None => panic!("{gid} was acknowledged and is gone after the Redis restart"),
            }
        }
        pending = still;
        assert!(
            Instant::now() < deadline,
            "{} acknowledged sagas never finished",
            pending.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let applied = bank.applied();
    for gid in &acknowledged {
        for op in ["01", "02"] {
            let key = (gid.clone(), op.to_owned(), "action".to_owned());
            assert!(applied.contains_key(&key), "{gid} branch {op} never applied");
        }
    }
    let repeats = applied.values().filter(|n| **n > 1).count();
    eprintln!(
        "redis restart: {} sagas acknowledged ({at_crash} before the SIGKILL), all succeeded after the \
         restart; {repeats} effects delivered more than once (the barrier absorbs them)",
        acknowledged.len()
    );

    // Weaker settings are reported.
    redis_config_set(addr, "appendfsync", "everysec").await;
    let ready = readyz(&http, server.addr).await;
    assert!(
        ready["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .contains("appendfsync everysec"),
        "{ready}"
    );
    redis_config_set(addr, "appendonly", "no").await;
    let ready = readyz(&http, server.addr).await;
    assert!(
        ready["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .contains("without AOF"),
        "{ready}"
    );
    server.stop().await.expect("stops");
    drop(redis);
}

fn store_options(url: &str) -> StoreOptions {
    StoreOptions {
        kind: StoreKind::parse(url, "").expect("url"),
        synchronous: Synchronous::Normal,
        migrate: true,
        max_connections: 1,
        acquire_timeout: Duration::from_secs(5),
        group_commit: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_comes_from_the_url_or_the_environment_and_is_never_shown() {
    let Some(bin) = redis_server_bin() else {
        eprintln!("SKIPPED: the Redis password test (no redis-server binary)");
        return;
    };
    const SECRET: &str = "s3cret-Pw";
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let _redis = RedisProcess::start_with(&bin, addr, dir.path(), 0, &["--requirepass", SECRET], Some(SECRET)).await;

    // In the URL.
    let store = store::open(&store_options(&format!("redis://:{SECRET}@{addr}/0?prefix=auth")))
        .await
        .expect("opens with the URL's password");
    store.ping().await.expect("ping");
    let kind = StoreKind::parse(&format!("redis://:{SECRET}@{addr}/0"), "").expect("url");
    assert!(!kind.describe().contains(SECRET), "{}", kind.describe());
    // A wrong one is refused, and the error does not quote it.
    let wrong = match store::open(&store_options(&format!("redis://:not-{SECRET}@{addr}/0"))).await {
        Ok(_) => panic!("a wrong password was accepted"),
        Err(error) => error.to_string(),
    };
    assert!(!wrong.contains(SECRET), "{wrong}");

    // From the environment: a real `kubetx serve`, whose log must not show it either.
    let log = dir.path().join("kubetx.log");
    let store = format!("redis://{addr}/0?prefix=auth");
    let ready = serve_until_ready(&store, &log, &[("KUBETX_REDIS_PASSWORD", SECRET)]).await;
    assert!(
        ready,
        "kubetx never became ready with the password from KUBETX_REDIS_PASSWORD"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains(SECRET), "the log shows the password");
}

/// Runs `kubetx serve --store <store>` with `env` until `/readyz` answers 200 (true) or the
/// process exits (false); then kills it.
async fn serve_until_ready(store: &str, log: &Path, env: &[(&str, &str)]) -> bool {
    let listen = free_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubetx"))
        .args([
            "serve",
            "--listen",
            &listen.to_string(),
            "--grpc-listen",
            "",
            "--store",
            store,
        ])
        .args(["--log-level", "debug"])
        .env_remove("RUST_LOG")
        .env_remove("KUBETX_CONFIG")
        .env_remove("SSL_CERT_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("kubetx starts");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let ready = http.get(format!("http://{listen}/readyz")).send().await;
        if matches!(&ready, Ok(r) if r.status().is_success()) {
            break true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            break false;
        }
        assert!(Instant::now() < deadline, "kubetx neither became ready nor exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_trusts_the_configured_ca_only() {
    let Some(bin) = redis_server_bin() else {
        eprintln!("SKIPPED: the rediss:// test (no redis-server binary)");
        return;
    };
    let fixture = |name: &str| format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let (plain, tls) = (free_addr(), free_addr());
    let tls_port = tls.port().to_string();
    let (cert, key, ca) = (fixture("server.pem"), fixture("server.key"), fixture("ca.pem"));
    let args = [
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ];
    let _redis = RedisProcess::start_with(&bin, plain, dir.path(), 0, &args, None).await;
    let store = format!("rediss://{tls}/0?prefix=tls");
    let trusted = serve_until_ready(&store, &dir.path().join("trusted.log"), &[("SSL_CERT_FILE", &ca)]).await;
    if !trusted {
        common::print_log_tail(&dir.path().join("trusted.log"), 20);
    }
    assert!(trusted, "kubetx reaches Redis over TLS with the CA trusted");
    let untrusted = serve_until_ready(&store, &dir.path().join("untrusted.log"), &[]).await;
    assert!(!untrusted, "an unknown CA is refused");
    let log = std::fs::read_to_string(dir.path().join("untrusted.log")).expect("log");
    assert!(log.to_lowercase().contains("certificate"), "{log}");
}

/// Every key of the key prefix `prefix`, sorted.
async fn keys_of(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}*"))
        .query_async(conn)
        .await
        .expect("KEYS");
    keys.sort();
    keys
}

/// The gids of a sorted set with their scores.
async fn index(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<(String, i64)> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await
        .expect("ZRANGE")
}

/// A private redis-server and a store on it with a single shard under `prefix`. Dropped in
/// field order: the store, then the server, then its directory.
struct OneShard {
    store: Arc<dyn store::Store>,
    addr: SocketAddr,
    _redis: RedisProcess,
    _dir: tempfile::TempDir,
}

/// [`OneShard`]; `None` (and a SKIPPED line naming `what`) without a redis-server binary.
async fn one_shard(what: &str, prefix: &str) -> Option<OneShard> {
    let Some(bin) = redis_server_bin() else {
        eprintln!("SKIPPED: {what} (no redis-server binary)");
        return None;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let redis = RedisProcess::start(&bin, addr, dir.path(), 0).await;
    let store = store::open(&store_options(&format!("redis://{addr}/0?prefix={prefix}&shards=1")))
        .await
        .expect("opens");
    Some(OneShard {
        store,
        addr,
        _redis: redis,
        _dir: dir,
    })
}

/// The layout of docs/redis.md, read back from Redis: one shard's keys for a transaction, its
/// index entries following its status and lease in the same writes, nothing left after
/// retention; and a data set refuses to be reopened with another shard count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_indexes_follow_the_records_and_the_shard_count_is_pinned() {
    use kubetx::model::{Branch, GlobalTrans};
    use kubetx::store::{Lease, StatusChange, StoreError};
    // Bound whole: a pattern leaving fields out would drop the server at once.
    let Some(shard) = one_shard("the Redis layout test", "lay").await else {
        return;
    };
    let (store, addr) = (&shard.store, shard.addr);
    let client = redis::Client::open(format!("redis://{addr}/0")).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");

    let t0 = 1_700_000_000_000;
    let global = GlobalTrans {
        next_cron_time: t0 + 5_000,
        ..common::saga_global("g1", TransStatus::Submitted, t0)
    };
    let branch = Branch::new("g1", "01", "action", "http://bank/a", b"{}".to_vec(), t0);
    assert!(store.create(&global, &[branch]).await.expect("create"));
    assert_eq!(
        keys_of(&mut conn, "lay").await,
        [
            "{lay:0}:bd:g1",
            "{lay:0}:bs:g1",
            "{lay:0}:due",
            "{lay:0}:g:g1",
            "{lay:0}:ids",
            "{lay}:seq",
            "{lay}:shards"
        ]
    );
    assert_eq!(index(&mut conn, "{lay:0}:due").await, [("g1".to_owned(), t0 + 5_000)]);

    // A lease moves the due entry to its expiry; finishing moves it to the retention index.
    let lease = Lease {
        owner: "a".to_owned(),
        until: t0 + 30_000,
    };
    assert!(store.claim("g1", &lease, t0).await.expect("claim"));
    assert_eq!(index(&mut conn, "{lay:0}:due").await, [("g1".to_owned(), t0 + 30_000)]);
    let mut finish = StatusChange::new("g1", TransStatus::Submitted, TransStatus::Succeed, t0 + 1);
    finish.owner = Some("a".to_owned());
    assert!(store.change_status(&finish).await.expect("finish"));
    assert!(index(&mut conn, "{lay:0}:due").await.is_empty());
    assert_eq!(index(&mut conn, "{lay:0}:done").await, [("g1".to_owned(), t0 + 1)]);

    // Retention leaves only the counters.
    assert_eq!(store.purge_finished(t0 + 2, 10).await.expect("purge"), 1);
    assert_eq!(keys_of(&mut conn, "lay").await, ["{lay}:seq", "{lay}:shards"]);

    // Another shard count would map gids elsewhere: refused.
    let other = store::open(&store_options(&format!("redis://{addr}/0?prefix=lay&shards=2"))).await;
    assert!(matches!(other, Err(StoreError::Invalid(_))), "{:?}", other.err());
}

/// A restart's `reclaim_leases` walks a shard's due index a page (256 entries) at a time:
/// every lease of a previous process of the instance is released, over several pages, and
/// nothing else is touched (another instance's leases, parked retries, the new process's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaiming_a_restarted_instance_s_leases_walks_every_page_and_nothing_else() {
    let Some(shard) = one_shard("the Redis lease reclaim test", "rec").await else {
        return;
    };
    let store = &shard.store;
    let t0 = 1_700_000_000_000;
    let lease_end = t0 + 30_000;
    let groups = [
        ("old", "inst/old", 600),
        ("other", "other/x", 5),
        ("parked", "", 5),
        ("mine", "inst/new", 3),
    ];
    for (name, owner, n) in groups {
        for i in 0..n {
            let global = kubetx::model::GlobalTrans {
                owner: owner.to_owned(),
                next_cron_time: lease_end,
                ..common::saga_global(&format!("{name}-{i:03}"), TransStatus::Submitted, t0)
            };
            assert!(store.create(&global, &[]).await.expect("create"));
        }
    }
    assert_eq!(
        store.reclaim_leases("inst", "inst/new", t0 + 1).await.expect("reclaim"),
        600
    );
    for (name, owner, n) in groups {
        for i in 0..n {
            let global = store
                .find(&format!("{name}-{i:03}"))
                .await
                .expect("find")
                .expect("stored");
            let want = if name == "old" {
                ("", t0 + 1)
            } else {
                (owner, lease_end)
            };
            assert_eq!((global.owner.as_str(), global.next_cron_time), want, "{}", global.gid);
        }
    }
    // Released means due: the scheduler's claim finds them at once.
    let lease = kubetx::store::Lease {
        owner: "inst/new".to_owned(),
        until: t0 + 60_000,
    };
    assert_eq!(store.claim_due(&lease, t0 + 2, 1_000).await.expect("claim").len(), 600);
}
