//! The PostgreSQL store's group commit: concurrent writes of one process share one database
//! transaction, a write that fails inside a batch fails alone while its neighbours commit, and a
//! batch whose transaction dies fails every write in it (no caller sees a false success). Needs
//! `KUBETX_TEST_POSTGRES_URL`; without it the tests print SKIPPED and pass.
//!
//! The tests run on the current-thread runtime: writes started together by one `join` are all
//! queued before the writer task runs, so they form one batch.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::db::{Backend, TestDb};
use futures::future::join_all;
use kubetx::model::{GlobalTrans, Millis, TransStatus};
use kubetx::store::{self, StatusChange, Store, StoreError, StoreKind, StoreOptions, Synchronous};
use sqlx::{Connection, PgConnection};
use tokio::time::Instant;

const NOW: Millis = 1_700_000_000_000;

/// A fresh schema and a store on it; `None` (and a SKIPPED line) without a PostgreSQL server.
async fn setup() -> Option<(TestDb, Arc<dyn Store>)> {
    if !common::db::available(Backend::Postgres, "the PostgreSQL group commit tests") {
        return None;
    }
    let db = TestDb::create(Backend::Postgres).await;
    let store = store::open(&StoreOptions {
        kind: StoreKind::parse(&db.url, "").expect("url"),
        synchronous: Synchronous::Normal,
        migrate: true,
        max_connections: 4,
        acquire_timeout: Duration::from_secs(5),
        group_commit: 64,
    })
    .await
    .expect("store opens");
    Some((db, store))
}

/// A connection of the test's own into the same schema.
async fn connect(db: &TestDb) -> PgConnection {
    PgConnection::connect(&db.url).await.expect("PostgreSQL answers")
}

fn global(gid: &str) -> GlobalTrans {
    common::saga_global(gid, TransStatus::Submitted, NOW)
}

fn finish(gid: &str, from: TransStatus) -> StatusChange {
    StatusChange::new(gid, from, TransStatus::Succeed, NOW + 1)
}

/// How many database transactions wrote the current versions of these rows.
async fn writing_transactions(conn: &mut PgConnection, gids: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM trans_global WHERE gid = ANY($1)")
        .bind(gids)
        .fetch_one(conn)
        .await
        .expect("xmin query")
}

async fn status(store: &dyn Store, gid: &str) -> TransStatus {
    store.find(gid).await.expect("find").expect("row exists").status
}

#[tokio::test]
async fn concurrent_writes_share_one_commit() {
    let Some((db, store)) = setup().await else { return };
    let gids: Vec<String> = (0..20).map(|i| format!("g-{i:02}")).collect();
    let created = join_all(gids.iter().map(|gid| {
        let store = store.clone();
        let global = global(gid);
        async move { store.create(&global, &[]).await }
    }))
    .await;
    assert!(created.iter().all(|c| matches!(c, Ok(true))), "{created:?}");
    let mut conn = connect(&db).await;
    assert_eq!(
        writing_transactions(&mut conn, &gids).await,
        1,
        "20 concurrent creates were not committed as one batch"
    );
}

#[tokio::test]
async fn a_failing_write_fails_alone_and_its_neighbours_commit() {
    let Some((db, store)) = setup().await else { return };
    let good: Vec<String> = (0..10).map(|i| format!("g-{i:02}")).collect();
    for gid in good
        .iter()
        .chain(["g-poison".to_owned(), "g-refused".to_owned()].iter())
    {
        assert!(store.create(&global(gid), &[]).await.expect("create"));
    }
    // A statement that fails inside the batch: a trigger refuses every update of one row. The
    // poisoned write sorts after the good ones, so they have already run when it fails.
    let mut conn = connect(&db).await;
    for statement in [
        "CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
        "CREATE TRIGGER refuse_update BEFORE UPDATE ON trans_global FOR EACH ROW \
         WHEN (NEW.gid = 'g-poison') EXECUTE FUNCTION refuse_update()",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
            .expect("trigger");
    }
    let mut changes: Vec<StatusChange> = good.iter().map(|gid| finish(gid, TransStatus::Submitted)).collect();
    changes.push(finish("g-poison", TransStatus::Submitted));
    // A conditional change that is refused (wrong status) is an answer, not a failure.
    changes.push(finish("g-refused", TransStatus::Aborting));
    let results = join_all(changes.iter().map(|change| {
        let store = store.clone();
        async move { store.change_status(change).await }
    }))
    .await;
    for (change, result) in changes.iter().zip(&results) {
        match change.gid.as_str() {
            "g-poison" => assert!(
                matches!(result, Err(StoreError::Unavailable(message)) if message.contains("refused by the test")),
                "{result:?}"
            ),
            "g-refused" => assert!(matches!(result, Ok(false)), "{result:?}"),
            _ => assert!(matches!(result, Ok(true)), "{}: {result:?}", change.gid),
        }
    }
    for gid in &good {
        assert_eq!(status(&*store, gid).await, TransStatus::Succeed, "{gid}");
    }
    assert_eq!(status(&*store, "g-poison").await, TransStatus::Submitted);
    assert_eq!(status(&*store, "g-refused").await, TransStatus::Submitted);
    // (Their rows' xmin cannot show that they committed together: after the failure each write
    // runs under a savepoint, a subtransaction with an id of its own.)
}

#[tokio::test]
async fn a_batch_whose_transaction_dies_fails_every_write_in_it() {
    let Some((db, store)) = setup().await else { return };
    for gid in ["g-a", "g-locked"] {
        assert!(store.create(&global(gid), &[]).await.expect("create"));
    }
    // The test holds the row lock of g-locked, so the batch (g-a, then g-locked: the writer's
    // lock order) waits inside its transaction after g-a's update has run.
    let mut locker = connect(&db).await;
    let locker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut locker)
        .await
        .expect("pid");
    sqlx::raw_sql("BEGIN; SELECT 1 FROM trans_global WHERE gid = 'g-locked' FOR UPDATE")
        .execute(&mut locker)
        .await
        .expect("lock");
    let mut monitor = connect(&db).await;
    let a = finish("g-a", TransStatus::Submitted);
    let locked = finish("g-locked", TransStatus::Submitted);
    let kill = async {
        // The writer's backend, once it waits for the test's lock, is terminated mid-batch.
        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            let waiting: Option<i32> =
                sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                    .bind(locker_pid)
                    .fetch_optional(&mut monitor)
                    .await
                    .expect("pg_stat_activity");
            if let Some(pid) = waiting {
                let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                    .bind(pid)
                    .fetch_one(&mut monitor)
                    .await
                    .expect("terminate");
                assert!(killed);
                return;
            }
            assert!(Instant::now() < deadline, "the batch never waited for the lock");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (a_result, locked_result, ()) = tokio::join!(store.change_status(&a), store.change_status(&locked), kill);
    assert!(matches!(a_result, Err(StoreError::Unavailable(_))), "{a_result:?}");
    assert!(
        matches!(locked_result, Err(StoreError::Unavailable(_))),
        "{locked_result:?}"
    );
    sqlx::raw_sql("ROLLBACK").execute(&mut locker).await.expect("unlock");
    // Nothing of the dead batch was written, and the store recovers (a new writer connection
    // once the probe has seen the database answer).
    let mut check = connect(&db).await;
    let stored: String = sqlx::query_scalar("SELECT status FROM trans_global WHERE gid = 'g-a'")
        .fetch_one(&mut check)
        .await
        .expect("status");
    assert_eq!(stored, "submitted");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.change_status(&a).await {
            Ok(done) => {
                assert!(done);
                break;
            }
            Err(error) => assert!(Instant::now() < deadline, "the store did not recover: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&*store, "g-a").await, TransStatus::Succeed);
}
