//! The SDK's sub-transaction barrier on real databases: SQLite files, PostgreSQL, MariaDB
//! (`KUBETX_TEST_POSTGRES_URL`, `KUBETX_TEST_MYSQL_URL`) and Redis (`KUBETX_TEST_REDIS_URL`):
//! duplicate calls racing, null compensation and the refused late action, msg `do_and_submit`
//! racing the back-check, and rows identical to those DTM's barrier writes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::any;
use common::TestServer;
use common::db::{Backend, available};
use kubetx_client::axum::Success;
use kubetx_client::barrier::sql::{BoxFuture, create_table};
use kubetx_client::barrier::{BranchBarrier, Decision};
use kubetx_client::{BranchParams, Dtm, Error, Msg};
use sqlx::AssertSqlSafe;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A database with DTM's barrier table and a business table `table(gid, note)`.
struct Setup<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    table: String,
    _dir: Option<tempfile::TempDir>,
}

async fn prepare<DB>(pool: sqlx::Pool<DB>, dir: Option<tempfile::TempDir>) -> Setup<DB>
where
    DB: sqlx::Database,
    DB::Connection: kubetx_client::barrier::sql::BarrierConnection,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    // Tests create the shared table concurrently; a lost race on the catalog is retried.
    for attempt in 0.. {
        match create_table(&pool).await {
            Ok(()) => break,
            Err(e) if attempt < 5 => eprintln!("creating the barrier table, retrying: {e}"),
            Err(e) => panic!("barrier table: {e}"),
        }
    }
    let table = unique("sdk_applied");
    let ddl = format!("CREATE TABLE {table} (gid varchar(128), note varchar(64))");
    sqlx::raw_sql(AssertSqlSafe(ddl))
        .execute(&pool)
        .await
        .expect("business table");
    Setup { pool, table, _dir: dir }
}

/// Drops the business table (the barrier table stays: it is DTM's, shared).
async fn cleanup<DB>(s: &Setup<DB>)
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    let sql = format!("DROP TABLE {}", s.table);
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&s.pool)
        .await
        .expect("drop business table");
}

async fn sqlite() -> Option<Setup<sqlx::Sqlite>> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    let dir = tempfile::tempdir().expect("temp dir");
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("bank.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .expect("sqlite");
    Some(prepare(pool, Some(dir)).await)
}

async fn postgres() -> Option<Setup<sqlx::Postgres>> {
    if !available(Backend::Postgres, "sdk_barrier") {
        return None;
    }
    let url = Backend::Postgres.server_url()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("postgres");
    Some(prepare(pool, None).await)
}

async fn mysql() -> Option<Setup<sqlx::MySql>> {
    if !available(Backend::MySql, "sdk_barrier") {
        return None;
    }
    let url = Backend::MySql.server_url()?;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("mysql");
    Some(prepare(pool, None).await)
}

/// The bank's QueryPrepared (the barrier's back-check) and TransIn, over one pool.
async fn msg_service<DB>(pool: sqlx::Pool<DB>) -> String
where
    DB: sqlx::Database,
    DB::Connection: kubetx_client::barrier::sql::BarrierConnection,
{
    async fn query_prepared<DB>(
        State(pool): State<sqlx::Pool<DB>>,
        params: BranchParams,
    ) -> kubetx_client::Result<Success>
    where
        DB: sqlx::Database,
        DB::Connection: kubetx_client::barrier::sql::BarrierConnection,
    {
        BranchBarrier::from_params(&params)?.query_prepared(&pool).await?;
        Ok(Success)
    }
    let app = Router::new()
        .route("/api/QueryPrepared", any(query_prepared::<DB>))
        .route("/api/TransIn", any(|| async { Success }))
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/api", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

macro_rules! barrier_suite {
    ($module:ident, $db:ty, $connect:path) => {
        mod $module {
            use super::*;

            type Conn = <$db as sqlx::Database>::Connection;

            /// Business logic: one row in the business table.
            fn insert(
                table: &str,
                gid: &str,
                note: &'static str,
            ) -> impl for<'c> FnOnce(&'c mut Conn) -> BoxFuture<'c, kubetx_client::Result<()>> {
                let sql = format!("INSERT INTO {table}(gid, note) VALUES ('{gid}', '{note}')");
                move |tx| {
                    Box::pin(async move {
                        sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
                        Ok(())
                    })
                }
            }

            async fn applied(s: &Setup<$db>, gid: &str, note: &str) -> i64 {
                let sql = format!(
                    "SELECT COUNT(*) FROM {} WHERE gid = '{gid}' AND note = '{note}'",
                    s.table
                );
                let (n,): (i64,) = sqlx::query_as(AssertSqlSafe(sql))
                    .fetch_one(&s.pool)
                    .await
                    .expect("count");
                n
            }

            fn barrier(gid: &str, op: &str) -> BranchBarrier {
                BranchBarrier::new("saga", gid, "01", op).expect("barrier")
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn duplicate_calls_racing_apply_once() {
                let Some(s) = $connect().await else { return };
                let s = Arc::new(s);
                let gid = unique("dup");
                let tasks: Vec<_> = (0..8)
                    .map(|_| {
                        let (s, gid) = (Arc::clone(&s), gid.clone());
                        tokio::spawn(async move {
                            barrier(&gid, "action")
                                .call(&s.pool, insert(&s.table, &gid, "action"))
                                .await
                        })
                    })
                    .collect();
                let mut ran = 0;
                for task in tasks {
                    if task.await.expect("task").expect("barrier call").is_some() {
                        ran += 1;
                    }
                }
                assert_eq!(ran, 1, "exactly one of the racing calls runs the business logic");
                assert_eq!(applied(&s, &gid, "action").await, 1);
                cleanup(&s).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_compensation_first_is_null_and_the_late_action_is_refused() {
                let Some(s) = $connect().await else { return };
                let gid = unique("null");
                let compensated = barrier(&gid, "compensate")
                    .call(&s.pool, insert(&s.table, &gid, "compensate"))
                    .await;
                assert_eq!(
                    compensated.expect("compensate"),
                    None,
                    "null compensation: nothing to undo"
                );
                let late = barrier(&gid, "action")
                    .call(&s.pool, insert(&s.table, &gid, "action"))
                    .await;
                assert_eq!(late.expect("late action"), None, "the hanging action is refused");
                assert_eq!(
                    applied(&s, &gid, "action").await + applied(&s, &gid, "compensate").await,
                    0
                );
                // The same for TCC: cancel before try.
                let cancel = BranchBarrier::new("tcc", &gid, "02", "cancel").unwrap();
                assert_eq!(
                    cancel
                        .call(&s.pool, insert(&s.table, &gid, "cancel"))
                        .await
                        .unwrap(),
                    None
                );
                let try_ = BranchBarrier::new("tcc", &gid, "02", "try").unwrap();
                assert_eq!(
                    try_.call(&s.pool, insert(&s.table, &gid, "try")).await.unwrap(),
                    None
                );
                cleanup(&s).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn action_then_compensation_each_run_once() {
                let Some(s) = $connect().await else { return };
                let gid = unique("pair");
                for (op, runs) in [
                    ("action", true),
                    ("action", false),
                    ("compensate", true),
                    ("compensate", false),
                ] {
                    let ran = barrier(&gid, op)
                        .call(
                            &s.pool,
                            insert(
                                &s.table,
                                &gid,
                                if op == "action" { "action" } else { "compensate" },
                            ),
                        )
                        .await
                        .unwrap();
                    assert_eq!(ran.is_some(), runs, "{op}");
                }
                assert_eq!(
                    (
                        applied(&s, &gid, "action").await,
                        applied(&s, &gid, "compensate").await
                    ),
                    (1, 1)
                );
                // Two uses of the barrier within one request get barrier ids 01 and 02.
                let gid2 = unique("two");
                let b = barrier(&gid2, "action");
                assert!(
                    b.call(&s.pool, insert(&s.table, &gid2, "action"))
                        .await
                        .unwrap()
                        .is_some()
                );
                assert!(
                    b.call(&s.pool, insert(&s.table, &gid2, "action"))
                        .await
                        .unwrap()
                        .is_some()
                );
                assert_eq!(applied(&s, &gid2, "action").await, 2);
                cleanup(&s).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_failing_business_rolls_its_barrier_rows_back() {
                let Some(s) = $connect().await else { return };
                let gid = unique("fail");
                let err = barrier(&gid, "action")
                    .call(
                        &s.pool,
                        |_tx: &mut Conn| -> BoxFuture<'_, kubetx_client::Result<()>> {
                            Box::pin(async { Err(Error::Failure("insufficient balance".into())) })
                        },
                    )
                    .await
                    .unwrap_err();
                assert!(err.is_failure());
                let retried = barrier(&gid, "action")
                    .call(&s.pool, insert(&s.table, &gid, "action"))
                    .await
                    .unwrap();
                assert!(retried.is_some(), "the failed attempt left no barrier row behind");
                cleanup(&s).await;
            }

            /// Local transactions through `do_and_submit` race the back-check the coordinator
            /// (here: the test) sends: whichever comes first wins, and the three views agree.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn msg_do_and_submit_races_the_back_check() {
                let Some(s) = $connect().await else { return };
                let s = Arc::new(s);
                let server = TestServer::start().await;
                let dtm = Dtm::new(&server.server.dtm_url()).unwrap();
                let service = msg_service(s.pool.clone()).await;
                let http = reqwest::Client::new();

                // The back-check first: the local transaction is refused and the msg aborted.
                let gid = unique("msg_late");
                let check = http
                    .get(format!(
                        "{service}/QueryPrepared?gid={gid}&trans_type=msg&branch_id=00&op=msg"
                    ))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(check.status(), 409);
                let pool = s.pool.clone();
                let table = s.table.clone();
                let err = Msg::new(&dtm, &gid)
                    .add(&format!("{service}/TransIn"), &1)
                    .do_and_submit(&format!("{service}/QueryPrepared"), |b| async move {
                        b.call(&pool, insert(&table, &gid, "msg")).await.map(drop)
                    })
                    .await
                    .unwrap_err();
                assert!(matches!(err, Error::Duplicated), "{err}");

                // Racing: 12 messages, each against a concurrent back-check.
                let mut tasks = Vec::new();
                for _ in 0..12 {
                    let gid = unique("msg_race");
                    let (s, dtm, service, http) = (Arc::clone(&s), dtm.clone(), service.clone(), http.clone());
                    tasks.push(tokio::spawn(async move {
                        let (pool, table, g) = (s.pool.clone(), s.table.clone(), gid.clone());
                        let qp = format!("{service}/QueryPrepared");
                        let local = Msg::new(&dtm, &gid)
                            .add(&format!("{service}/TransIn"), &1)
                            .do_and_submit(&qp, |b| async move {
                                b.call(&pool, insert(&table, &g, "msg")).await.map(drop)
                            });
                        let url = format!("{service}/QueryPrepared?gid={gid}&trans_type=msg&branch_id=00&op=msg");
                        // The back-check is sent once the msg is prepared, as the coordinator's
                        // would be, so it meets the local transaction in flight.
                        let check = async {
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                            while dtm.query_global(&gid).await.expect("query").is_none() {
                                assert!(tokio::time::Instant::now() < deadline, "{gid} never prepared");
                                tokio::task::yield_now().await;
                            }
                            http.get(url).send().await.map(|r| r.status().as_u16())
                        };
                        let (local, check) = tokio::join!(local, check);
                        (gid, local.is_ok(), check.expect("back-check reachable"))
                    }));
                }
                let mut committed = 0;
                for task in tasks {
                    let (gid, local_ok, check) = task.await.expect("task");
                    let rows = applied(&s, &gid, "msg").await;
                    assert_eq!(
                        local_ok,
                        rows == 1,
                        "{gid}: do_and_submit Ok iff the local transaction committed"
                    );
                    assert_eq!(
                        check == 200,
                        rows == 1,
                        "{gid}: the back-check saw what happened ({check})"
                    );
                    let status = server.wait_finished_or_failed(&gid).await;
                    assert_eq!(status == "succeed", rows == 1, "{gid}: msg {status}");
                    committed += rows;
                }
                eprintln!(
                    "{}: {committed} of 12 local transactions won the race",
                    stringify!($module)
                );
                cleanup(&s).await;
            }
        }
    };
}

barrier_suite!(sqlite_barrier, sqlx::Sqlite, sqlite);
barrier_suite!(postgres_barrier, sqlx::Postgres, postgres);
barrier_suite!(mysql_barrier, sqlx::MySql, mysql);

trait WaitFinished {
    async fn wait_finished_or_failed(&self, gid: &str) -> String;
}

impl WaitFinished for TestServer {
    async fn wait_finished_or_failed(&self, gid: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.state(gid).await.0;
            if status == "succeed" || status == "failed" {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "{gid} stayed {status}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The rows DTM's barrier writes for one scenario: saga action, its compensation, a null
/// compensation and a late action, TCC cancel before try, msg local transaction and back-check.
fn dtm_rows(gid: &str) -> Vec<[String; 6]> {
    [
        ["saga", "01", "action", "01", "action"],
        ["saga", "01", "compensate", "01", "compensate"],
        ["saga", "02", "action", "01", "compensate"],
        ["saga", "02", "compensate", "01", "compensate"],
        ["tcc", "01", "try", "01", "cancel"],
        ["tcc", "01", "cancel", "01", "cancel"],
        ["msg", "00", "msg", "01", "msg"],
        ["msg", "00", "msg", "01", "rollback"],
    ]
    .iter()
    .map(|[t, b, op, id, reason]| {
        let gid = if *t == "msg" && *reason == "rollback" {
            format!("{gid}-2")
        } else {
            gid.to_owned()
        };
        [
            t.to_string(),
            gid,
            b.to_string(),
            op.to_string(),
            id.to_string(),
            reason.to_string(),
        ]
    })
    .collect()
}

/// Drives the scenario of [`dtm_rows`] through the barrier into `table`.
async fn write_scenario<C>(conn: &mut C, table: &str, gid: &str)
where
    C: kubetx_client::barrier::sql::BarrierConnection,
{
    for (t, b, op) in [
        ("saga", "01", "action"),
        ("saga", "01", "compensate"),
        ("saga", "02", "compensate"),
        ("saga", "02", "action"),
        ("tcc", "01", "cancel"),
        ("tcc", "01", "try"),
        ("msg", "00", "msg"),
    ] {
        let barrier = BranchBarrier::new(t, gid, b, op).unwrap();
        barrier.enter_table(conn, table).await.expect("barrier");
    }
    // A back-check that comes first writes its "rollback" row; then the local one is refused.
    let late = BranchBarrier::new("msg", &format!("{gid}-2"), "00", "msg").unwrap();
    let row = kubetx_client::barrier::BarrierRow {
        trans_type: "msg".into(),
        gid: format!("{gid}-2"),
        branch_id: "00".into(),
        op: "msg".into(),
        barrier_id: "01".into(),
        reason: "rollback".into(),
    };
    conn.insert_barrier(table, &row).await.expect("back-check row");
    assert!(matches!(late.enter_table(conn, table).await, Err(Error::Duplicated)));
}

async fn rows_of<DB>(pool: &sqlx::Pool<DB>, table: &str, gid: &str) -> Vec<[String; 6]>
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'r> (String, String, String, String, String, String): sqlx::FromRow<'r, DB::Row>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let sql = format!(
        "SELECT trans_type, gid, branch_id, op, barrier_id, reason FROM {table} WHERE gid LIKE '{gid}%' ORDER BY id"
    );
    let rows: Vec<(String, String, String, String, String, String)> =
        sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool).await.expect("rows");
    rows.into_iter().map(|(a, b, c, d, e, f)| [a, b, c, d, e, f]).collect()
}

#[tokio::test]
async fn postgres_rows_are_dtms_rows_in_dtms_table() {
    let Some(s) = postgres().await else { return };
    let schema = unique("sdk_fixture");
    let ddl = include_str!("fixtures/dtm_barrier.postgres.sql").replace("{schema}", &schema);
    sqlx::raw_sql(AssertSqlSafe(ddl))
        .execute(&s.pool)
        .await
        .expect("DTM's table from the fixture");
    let gid = unique("interop");
    let mut conn = s.pool.acquire().await.unwrap();
    write_scenario(&mut *conn, &format!("{schema}.barrier"), &gid).await;
    assert_eq!(
        rows_of(&s.pool, &format!("{schema}.barrier"), &gid).await,
        dtm_rows(&gid)
    );
    // The table this crate creates has DTM's columns, types and lengths.
    let columns = |schema: String| {
        let pool = s.pool.clone();
        async move {
            let rows: Vec<(String, String, Option<i32>)> = sqlx::query_as(
                "SELECT column_name::text, data_type::text, character_maximum_length FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = 'barrier' ORDER BY ordinal_position",
            )
            .bind(schema)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows
        }
    };
    assert_eq!(columns("dtm_barrier".into()).await, columns(schema.clone()).await);
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&s.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn mysql_rows_are_dtms_rows_in_dtms_table() {
    let Some(s) = mysql().await else { return };
    let schema = unique("sdk_fixture");
    let ddl = include_str!("fixtures/dtm_barrier.mysql.sql").replace("{schema}", &schema);
    sqlx::raw_sql(AssertSqlSafe(ddl))
        .execute(&s.pool)
        .await
        .expect("DTM's table from the fixture");
    let gid = unique("interop");
    let mut conn = s.pool.acquire().await.unwrap();
    write_scenario(&mut *conn, &format!("{schema}.barrier"), &gid).await;
    assert_eq!(
        rows_of(&s.pool, &format!("{schema}.barrier"), &gid).await,
        dtm_rows(&gid)
    );
    let columns = |schema: String| {
        let pool = s.pool.clone();
        async move {
            let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
                "SELECT CAST(column_name AS CHAR), CAST(column_type AS CHAR), CAST(character_maximum_length AS SIGNED) \
                 FROM information_schema.columns WHERE table_schema = ? AND table_name = 'barrier' ORDER BY ordinal_position",
            )
            .bind(schema)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows
        }
    };
    assert_eq!(columns("dtm_barrier".into()).await, columns(schema.clone()).await);
    sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE {schema}")))
        .execute(&s.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn sqlite_rows_are_dtms_rows() {
    let Some(s) = sqlite().await else { return };
    let gid = unique("interop");
    let mut conn = s.pool.acquire().await.unwrap();
    write_scenario(&mut *conn, "dtm_barrier", &gid).await;
    assert_eq!(rows_of(&s.pool, "dtm_barrier", &gid).await, dtm_rows(&gid));
    let names: Vec<(String,)> = sqlx::query_as("SELECT name FROM pragma_table_info('dtm_barrier') ORDER BY cid")
        .fetch_all(&s.pool)
        .await
        .unwrap();
    let names: Vec<String> = names.into_iter().map(|n| n.0).collect();
    assert_eq!(
        names,
        [
            "id",
            "trans_type",
            "gid",
            "branch_id",
            "op",
            "barrier_id",
            "reason",
            "create_time",
            "update_time"
        ]
    );
}

mod redis_barrier {
    use super::*;
    use redis::AsyncCommands;

    /// A connection to the test Redis (`KUBETX_TEST_REDIS_URL`, its own database number).
    async fn redis() -> Option<redis::aio::MultiplexedConnection> {
        let Some(url) = std::env::var("KUBETX_TEST_REDIS_URL").ok().filter(|u| !u.is_empty()) else {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: sdk_barrier on redis (set KUBETX_TEST_REDIS_URL to run it)"
                );
            }
            return None;
        };
        let client = redis::Client::open(url).expect("redis url");
        Some(client.get_multiplexed_async_connection().await.expect("redis"))
    }

    async fn balance(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
        conn.get(key).await.expect("balance")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn duplicate_calls_racing_apply_once() {
        let Some(mut conn) = redis().await else { return };
        let (gid, key) = (unique("rdup"), unique("sdk:balance"));
        let _: () = conn.set_ex(&key, 100, 600).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (mut conn, gid, key) = (conn.clone(), gid.clone(), key.clone());
                tokio::spawn(async move {
                    let b = BranchBarrier::new("saga", &gid, "01", "action").unwrap();
                    b.redis_check_adjust_amount(&mut conn, &key, -30, 600).await
                })
            })
            .collect();
        let mut ran = 0;
        for task in tasks {
            if task.await.unwrap().unwrap() == Decision::Run {
                ran += 1;
            }
        }
        assert_eq!(ran, 1);
        assert_eq!(balance(&mut conn, &key).await, 70);
        // DTM's keys and values.
        let value: String = conn.get(format!("{gid}-01-action-01")).await.unwrap();
        assert_eq!(value, "op");
    }

    #[tokio::test]
    async fn a_compensation_first_is_null_and_the_late_action_is_refused() {
        let Some(mut conn) = redis().await else { return };
        let (gid, key) = (unique("rnull"), unique("sdk:balance"));
        let _: () = conn.set_ex(&key, 100, 600).await.unwrap();
        let comp = BranchBarrier::new("saga", &gid, "01", "compensate").unwrap();
        assert_eq!(
            comp.redis_check_adjust_amount(&mut conn, &key, 30, 600).await.unwrap(),
            Decision::Skip
        );
        let origin: String = conn.get(format!("{gid}-01-action-01")).await.unwrap();
        assert_eq!(origin, "rollback", "the null compensation marks the action");
        let action = BranchBarrier::new("saga", &gid, "01", "action").unwrap();
        assert_eq!(
            action
                .redis_check_adjust_amount(&mut conn, &key, -30, 600)
                .await
                .unwrap(),
            Decision::Skip
        );
        assert_eq!(balance(&mut conn, &key).await, 100, "neither ran");
        // Insufficient balance is a FAILURE, and leaves the barrier untouched.
        let big = BranchBarrier::new("saga", &gid, "02", "action").unwrap();
        assert!(
            big.redis_check_adjust_amount(&mut conn, &key, -500, 600)
                .await
                .unwrap_err()
                .is_failure()
        );
        let again = BranchBarrier::new("saga", &gid, "02", "action").unwrap();
        assert_eq!(
            again
                .redis_check_adjust_amount(&mut conn, &key, -50, 600)
                .await
                .unwrap(),
            Decision::Run
        );
        assert_eq!(balance(&mut conn, &key).await, 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn msg_local_transactions_race_the_back_check() {
        let Some(conn) = redis().await else { return };
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (mut a, mut b) = (conn.clone(), conn.clone());
            let (gid, key) = (unique("rmsg"), unique("sdk:balance"));
            tasks.push(tokio::spawn(async move {
                let _: () = a.set_ex(&key, 100, 600).await.unwrap();
                let local = BranchBarrier::new("msg", &gid, "00", "msg").unwrap();
                let check = BranchBarrier::new("msg", &gid, "00", "msg").unwrap();
                let (local, check) = tokio::join!(
                    local.redis_check_adjust_amount(&mut a, &key, -30, 600),
                    check.redis_query_prepared(&mut b, 600)
                );
                let after = balance(&mut a, &key).await;
                (local, check, after)
            }));
        }
        for task in tasks {
            let (local, check, after) = task.await.unwrap();
            match local {
                Ok(Decision::Run) => assert!(check.is_ok() && after == 70),
                Err(Error::Duplicated) => assert!(check.unwrap_err().is_failure() && after == 100),
                other => panic!("unexpected local outcome {other:?}"),
            }
        }
    }
}
