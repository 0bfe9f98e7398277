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
use kubetx::engine::BranchUpdate;
use kubetx::model::{Branch, BranchStatus, GlobalTrans, Millis, TransStatus};
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

/// Two steps of a saga, both actions and compensations, `prepared`.
fn steps(gid: &str) -> Vec<Branch> {
    ["01", "02"]
        .iter()
        .flat_map(|id| {
            ["compensate", "action"].map(|op| Branch::new(gid, id, op, "http://127.0.0.1:1/x", b"{}".to_vec(), NOW))
        })
        .collect()
}

fn succeeded(branch_id: &str) -> BranchUpdate {
    BranchUpdate {
        id: 0,
        branch_id: branch_id.to_owned(),
        op: "action".to_owned(),
        status: BranchStatus::Succeed,
        at: NOW + 1,
    }
}

/// The actions' statuses of `gid`'s branch rows, in order.
async fn action_statuses(store: &dyn Store, gid: &str) -> Vec<BranchStatus> {
    let branches = store.branches(gid).await.expect("branches");
    branches.iter().filter(|b| b.op == "action").map(|b| b.status).collect()
}

/// Counts the statements that write `trans_global`, by statement-level triggers.
async fn count_statements(conn: &mut PgConnection) {
    for statement in [
        "CREATE TABLE statements (n int NOT NULL)",
        "INSERT INTO statements VALUES (0)",
        "CREATE FUNCTION count_statement() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN UPDATE statements SET n = n + 1; RETURN NULL; END $$",
        "CREATE TRIGGER count_statement AFTER INSERT OR UPDATE ON trans_global \
         FOR EACH STATEMENT EXECUTE FUNCTION count_statement()",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *conn)
            .await
            .expect("statement counter");
    }
}

#[tokio::test]
async fn a_batch_writes_its_creates_and_status_changes_in_one_statement_with_their_conditions() {
    let Some((db, store)) = setup().await else { return };
    for gid in ["g-existing", "g-changed", "g-refused"] {
        assert!(store.create(&global(gid), &steps(gid)).await.expect("create"));
    }
    let mut conn = connect(&db).await;
    count_statements(&mut conn).await;
    let existing_again = GlobalTrans {
        status: TransStatus::Aborting,
        ..global("g-existing")
    };
    let changed = StatusChange {
        branch_updates: vec![succeeded("01"), succeeded("02")],
        ..finish("g-changed", TransStatus::Submitted)
    };
    // Refused (the status is not `aborting`): its outcome must not be recorded either.
    let refused = StatusChange {
        branch_updates: vec![succeeded("01")],
        ..finish("g-refused", TransStatus::Aborting)
    };
    let twice = finish("g-twice", TransStatus::Submitted);
    let (new, new_steps, twice_global) = (global("g-new"), steps("g-new"), global("g-twice"));
    let (new, again, twice_created, changed_done, refused_done, twice_done) = tokio::join!(
        store.create(&new, &new_steps),
        store.create(&existing_again, &[]),
        store.create(&twice_global, &[]),
        store.change_status(&changed),
        store.change_status(&refused),
        // The second write of one gid in the batch runs after the first.
        store.change_status(&twice),
    );
    let answers = [new, again, twice_created, changed_done, refused_done, twice_done].map(|r| r.expect("write"));
    assert_eq!(answers, [true, false, true, true, false, true]);

    assert_eq!(status(&*store, "g-new").await, TransStatus::Submitted);
    assert_eq!(store.branches("g-new").await.expect("branches").len(), 4);
    assert_eq!(status(&*store, "g-existing").await, TransStatus::Submitted);
    assert_eq!(store.branches("g-existing").await.expect("branches").len(), 4);
    let done = store.find("g-changed").await.expect("find").expect("row");
    assert_eq!((done.status, done.finish_time), (TransStatus::Succeed, Some(NOW + 1)));
    assert_eq!(action_statuses(&*store, "g-changed").await, [BranchStatus::Succeed; 2]);
    assert_eq!(status(&*store, "g-refused").await, TransStatus::Submitted);
    assert_eq!(action_statuses(&*store, "g-refused").await, [BranchStatus::Prepared; 2]);
    assert_eq!(status(&*store, "g-twice").await, TransStatus::Succeed);

    let written: Vec<String> = ["g-new", "g-changed", "g-twice"].map(str::to_owned).to_vec();
    assert_eq!(writing_transactions(&mut conn, &written).await, 1, "not one batch");
    // One INSERT and one UPDATE for the five first writes of their gids, one UPDATE for g-twice's
    // change: three statements, where one per write would have been six.
    let statements: i32 = sqlx::query_scalar("SELECT n FROM statements")
        .fetch_one(&mut conn)
        .await
        .expect("counter");
    assert_eq!(statements, 3);
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
