//! Real PostgreSQL, MariaDB/MySQL and Redis databases for tests: each test gets its own
//! PostgreSQL schema, MySQL database or Redis key prefix, created here and dropped when the
//! handle is dropped, so tests run in parallel. The servers' URLs come from
//! `KUBETX_TEST_POSTGRES_URL`, `KUBETX_TEST_MYSQL_URL` and `KUBETX_TEST_REDIS_URL` (`.ci/run`
//! sets them); `KUBETX_TEST_STORE` (sqlite, postgres, mysql or redis) picks the store of
//! `TestServer`.
//!
//! Redis tests share one database number (the URL's) and are kept apart by key prefix: every
//! key of a test starts with `{<prefix>` (see `src/store/redis.rs`), which the handle deletes
//! with `SCAN MATCH` when dropped; no test flushes the database.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{Connection, Executor, MySqlConnection, PgConnection};

/// A store backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
    Redis,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
            Backend::Redis => "redis",
        }
    }

    /// The server URL of this backend from the environment; `None` for SQLite or when unset.
    pub fn server_url(self) -> Option<String> {
        let var = match self {
            Backend::Sqlite => return None,
            Backend::Postgres => "KUBETX_TEST_POSTGRES_URL",
            Backend::MySql => "KUBETX_TEST_MYSQL_URL",
            Backend::Redis => "KUBETX_TEST_REDIS_URL",
        };
        std::env::var(var).ok().filter(|url| !url.trim().is_empty())
    }

    /// The backend `KUBETX_TEST_STORE` names (SQLite when unset).
    pub fn from_env() -> Backend {
        match std::env::var("KUBETX_TEST_STORE").unwrap_or_default().as_str() {
            "" | "sqlite" => Backend::Sqlite,
            "postgres" | "postgresql" => Backend::Postgres,
            "mysql" | "mariadb" => Backend::MySql,
            "redis" => Backend::Redis,
            other => panic!("KUBETX_TEST_STORE={other:?}: use sqlite, postgres, mysql or redis"),
        }
    }
}

/// Whether `backend`'s server is configured; when it is not, says (once per suite and backend,
/// past the test harness's output capture) that `suite` is skipped on it.
pub fn available(backend: Backend, suite: &str) -> bool {
    if backend == Backend::Sqlite || backend.server_url().is_some() {
        return true;
    }
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let key = format!("{suite} on {}", backend.name());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.contains(&key) {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {key} (set KUBETX_TEST_{}_URL to run it)",
            backend.name().to_ascii_uppercase()
        );
        said.push(key);
    }
    false
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty database on a real server: a PostgreSQL schema or a MySQL database.
pub struct TestDb {
    /// The store URL that points into it.
    pub url: String,
    pub backend: Backend,
    server: String,
    name: String,
}

impl TestDb {
    /// A fresh database on `backend`'s server; panics when the server is not configured.
    pub async fn create(backend: Backend) -> TestDb {
        let server = backend
            .server_url()
            .unwrap_or_else(|| panic!("no server configured for {}", backend.name()));
        let name = format!(
            "kt_{}_{}_{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let url = match backend {
            Backend::Postgres => {
                let mut conn = PgConnection::connect(&server).await.expect("PostgreSQL answers");
                conn.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
                    .await
                    .expect("create schema");
                let separator = if server.contains('?') { '&' } else { '?' };
                format!("{server}{separator}options=-c%20search_path%3D{name}")
            }
            Backend::MySql => {
                let mut conn = MySqlConnection::connect(&server).await.expect("MySQL answers");
                conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .await
                    .expect("create database");
                with_database(&server, &name)
            }
            Backend::Redis => {
                let separator = if server.contains('?') { '&' } else { '?' };
                format!("{server}{separator}prefix={name}")
            }
            Backend::Sqlite => panic!("TestDb is for database servers"),
        };
        TestDb {
            url,
            backend,
            server,
            name,
        }
    }

    /// A fresh database of the backend `KUBETX_TEST_STORE` names; `None` for SQLite.
    pub async fn from_env() -> Option<TestDb> {
        match Backend::from_env() {
            Backend::Sqlite => None,
            backend => Some(TestDb::create(backend).await),
        }
    }

    /// The same database through another host and port (a proxy in front of the server).
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("URL has a scheme");
        let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let user = authority
            .rsplit_once('@')
            .map(|(user, _)| format!("{user}@"))
            .unwrap_or_default();
        format!("{scheme}://{user}{addr}{tail}")
    }
}

/// `server` with its database path replaced by `database`.
fn with_database(server: &str, database: &str) -> String {
    let (scheme, rest) = server.split_once("://").expect("URL has a scheme");
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let query = tail.find('?').map(|at| &tail[at..]).unwrap_or("");
    format!("{scheme}://{authority}/{database}{query}")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (backend, server, name) = (self.backend, self.server.clone(), self.name.clone());
        // Drop may run inside the test's runtime: clean up on a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                match backend {
                    Backend::Postgres => {
                        if let Ok(mut conn) = PgConnection::connect(&server).await {
                            let _ = conn.execute("SET lock_timeout = '10s'").await;
                            let _ = conn
                                .execute(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {name} CASCADE")))
                                .await;
                        }
                    }
                    Backend::MySql => {
                        if let Ok(mut conn) = MySqlConnection::connect(&server).await {
                            let _ = conn.execute("SET SESSION lock_wait_timeout = 10").await;
                            let _ = conn
                                .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                                .await;
                        }
                    }
                    Backend::Redis => delete_prefix(&server, &name).await,
                    Backend::Sqlite => {}
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Deletes every key of the Redis key prefix `prefix` (its shards' tags and its own).
async fn delete_prefix(server: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(server) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{{{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        // One key per DEL: a cluster-mode server refuses a DEL of keys in several slots.
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.del(key).ignore();
        }
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
