//! The PostgreSQL store: several kubetx replicas share one database.
//!
//! Every write is a single statement where it can be (multi-row work goes through `UNNEST`
//! arrays). With group commit (`StoreOptions::group_commit`, on by default), the writes that
//! touch one transaction (or one key) go through writer tasks that commit every queued write in
//! one database transaction, its creates and status changes in one statement (see
//! [`pg_batch`]); with it off, each write is its own transaction on the pool, one round trip a
//! call. Reads, and the bulk writes of the scheduler and retention, run on the pool. Claiming uses
//! `FOR UPDATE SKIP LOCKED` over a partial index of the unfinished transactions, so replicas
//! never wait for each other.
//!
//! [`pg_batch`]: super::pg_batch

use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Postgres, Row};

use super::pg_batch::Writer;

use super::decode::{self, BRANCH_COLUMNS, FINISHED, GLOBAL_COLUMNS, KV_COLUMNS, UNFINISHED};
use super::sql::Reachability;
use super::sql::db;
use super::{
    AddBranches, Guard, KvEntry, Lease, ListQuery, Result, StatusChange, Store, StoreError, StoreOptions,
    branches_to_add, check_branches, check_change, check_key, check_new, check_text,
};
use crate::engine::BranchUpdate;
use crate::model::{Branch, GlobalTrans, Millis, TransStatus};

// Every dynamic SQL string below is assembled from constants of this file and of `decode`, never
// from input.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The conditional status change of a [`StatusChange`], bound by [`bind_change`] as `$1..$11`.
static UPDATE_STATUS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE trans_global SET {} WHERE gid = $8 AND status = $9 AND ($10::text IS NULL OR owner = $10) \
         AND ($11::text IS NULL OR trans_type = $11)",
        status_set(["$1", "$2", "$3", "$4", "$5", "$6", "$7"])
    )
});

/// The `SET` list of a status change from its values' names: the status, the time, then, each
/// kept when NULL, the rollback reason, the result, the custom data, the owner and the next cron
/// time.
pub(super) fn status_set(values: [&str; 7]) -> String {
    let [to, now, reason, result, custom_data, owner, next_cron_time] = values;
    format!(
        "status = {to}, update_time = {now}, rollback_reason = COALESCE({reason}, rollback_reason), \
         result = COALESCE({result}, result), custom_data = COALESCE({custom_data}, custom_data), \
         owner = COALESCE({owner}, owner), next_cron_time = COALESCE({next_cron_time}, next_cron_time), \
         finish_time = CASE WHEN {to} = 'succeed' THEN {now} ELSE finish_time END, \
         rollback_time = CASE WHEN {to} = 'failed' THEN {now} ELSE rollback_time END"
    )
}

/// Binds the parameters of [`UPDATE_STATUS`].
fn bind_change<'q>(
    query: Query<'q, Postgres, PgArguments>,
    change: &'q StatusChange,
) -> Query<'q, Postgres, PgArguments> {
    let (owner, next_cron_time) = change.owner_and_expiry();
    query
        .bind(change.to.as_str())
        .bind(change.now)
        .bind(&change.rollback_reason)
        .bind(&change.result)
        .bind(&change.custom_data)
        .bind(owner)
        .bind(next_cron_time)
        .bind(&change.gid)
        .bind(change.from.as_str())
        .bind(&change.owner)
        .bind(change.trans_type.map(|t| t.as_str()))
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    reach: Arc<Reachability>,
    /// The group-commit writers, when `StoreOptions::group_commit` asks for them.
    writer: Option<Writer>,
}

/// How long a batched write waits for a row lock held by someone else (another process, a
/// person's session) before it fails alone: the writer's other writes wait behind it. Longer
/// than PostgreSQL's default `deadlock_timeout` (1 s), so a deadlock is detected first.
const WRITER_LOCK_TIMEOUT: &str = "5s";

/// The writers' statements find every row they touch by key. Their plans are generic (made once
/// per connection, possibly on an empty table, where a sequential scan and a hash join look as
/// cheap); these settings keep the bulk statement's joins index lookups whatever the statistics
/// said when its plan was made.
const WRITER_PLANNER: [(&str, &str); 3] = [
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
];

/// A write of one transaction (or one key), as the writer task runs it.
#[derive(Debug)]
pub(super) enum Write {
    Create(Box<GlobalTrans>, String, Vec<Branch>),
    ChangeStatus(StatusChange),
    ChangeStatusAndLoad(StatusChange),
    AddBranches(String, Vec<Branch>),
    UpdateBranches(Guard, Vec<BranchUpdate>, Millis),
    Claim(String, Lease, Millis),
    ExtendLease(Guard, Millis),
    Release(Guard, Millis, i64, Millis),
    ResetNextCronTime(String, Millis),
    KvCreate(String, String, String, Millis),
    KvUpdate(String, String, String, i64, Millis),
    KvDelete(String, String),
}

/// What a [`Write`] answers.
#[derive(Debug)]
pub(super) enum Reply {
    Flag(bool),
    Added(AddBranches),
    Loaded(Option<Box<(GlobalTrans, Vec<Branch>)>>),
}

impl Write {
    /// The rows this write locks, as a key of the one order in which every batch takes its
    /// locks: transactions by gid (the global row first, then its branch rows), then keys.
    pub(super) fn lock_key(&self) -> (u8, &str, &str) {
        let gid = match self {
            Write::Create(global, _, _) => &global.gid,
            Write::ChangeStatus(change) | Write::ChangeStatusAndLoad(change) => &change.gid,
            Write::AddBranches(gid, _) | Write::Claim(gid, _, _) | Write::ResetNextCronTime(gid, _) => gid,
            Write::UpdateBranches(guard, _, _) | Write::ExtendLease(guard, _) | Write::Release(guard, _, _, _) => {
                &guard.gid
            }
            Write::KvCreate(cat, key, _, _) | Write::KvUpdate(cat, key, _, _, _) | Write::KvDelete(cat, key) => {
                return (1, cat, key);
            }
        };
        (0, gid, "")
    }

    /// Whether [`Write::apply`] is one statement (then it needs no transaction of its own):
    /// everything but the branch registration.
    pub(super) fn single_statement(&self) -> bool {
        !matches!(self, Write::AddBranches(..))
    }

    /// Runs the write on `conn` as a transaction of its own (without group commit): a single
    /// statement commits by itself, the branch registration's statements in a transaction.
    async fn apply_alone(&self, conn: &mut PgConnection) -> Result<Reply, sqlx::Error> {
        if self.single_statement() {
            return self.apply(conn).await;
        }
        let mut tx = conn.begin().await?;
        let reply = self.apply(&mut tx).await?;
        tx.commit().await?;
        Ok(reply)
    }

    /// Runs the write on `conn`, inside the writer's transaction.
    pub(super) async fn apply(&self, conn: &mut PgConnection) -> Result<Reply, sqlx::Error> {
        Ok(match self {
            Write::Create(global, options, branches) => Reply::Flag(create(conn, global, options, branches).await?),
            Write::ChangeStatus(change) => Reply::Flag(change_status(conn, change).await?),
            Write::ChangeStatusAndLoad(change) => Reply::Loaded(change_and_load(conn, change).await?.map(Box::new)),
            Write::AddBranches(gid, branches) => Reply::Added(add_branches_tx(conn, gid, branches).await?),
            Write::UpdateBranches(guard, updates, now) => {
                Reply::Flag(update_branches(conn, guard, updates, *now).await?)
            }
            Write::Claim(gid, lease, now) => Reply::Flag(claim(conn, gid, lease, *now).await?),
            Write::ExtendLease(guard, until) => Reply::Flag(extend_lease(conn, guard, *until).await?),
            Write::Release(guard, next_cron_time, interval, now) => {
                Reply::Flag(release(conn, guard, *next_cron_time, *interval, *now).await?)
            }
            Write::ResetNextCronTime(gid, now) => Reply::Flag(reset_next_cron_time(conn, gid, *now).await?),
            Write::KvCreate(cat, key, value, now) => Reply::Flag(kv_create(conn, cat, key, value, *now).await?),
            Write::KvUpdate(cat, key, value, version, now) => {
                Reply::Flag(kv_update(conn, cat, key, value, *version, *now).await?)
            }
            Write::KvDelete(cat, key) => Reply::Flag(kv_delete(conn, cat, key).await?),
        })
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// Branch rows as column arrays, for `UNNEST`, each with its transaction's gid (which only the
/// bulk statement binds: one transaction's statements bind its gid once).
#[derive(Default)]
pub(super) struct BranchRows<'a> {
    pub(super) gid: Vec<&'a str>,
    pub(super) url: Vec<&'a str>,
    pub(super) bin_data: Vec<&'a [u8]>,
    pub(super) branch_id: Vec<&'a str>,
    pub(super) op: Vec<&'a str>,
    pub(super) status: Vec<&'static str>,
    pub(super) create_time: Vec<Millis>,
    pub(super) update_time: Vec<Millis>,
    pub(super) finish_time: Vec<Option<Millis>>,
    pub(super) rollback_time: Vec<Option<Millis>>,
}

impl<'a> BranchRows<'a> {
    fn of(gid: &'a str, branches: &'a [Branch]) -> Self {
        let mut rows = BranchRows::default();
        rows.push(gid, branches);
        rows
    }

    /// Adds `branches` of transaction `gid`.
    pub(super) fn push(&mut self, gid: &'a str, branches: &'a [Branch]) {
        for branch in branches {
            self.gid.push(gid);
            self.url.push(&branch.url);
            self.bin_data.push(&branch.bin_data);
            self.branch_id.push(&branch.branch_id);
            self.op.push(&branch.op);
            self.status.push(branch.status.as_str());
            self.create_time.push(branch.create_time);
            self.update_time.push(branch.update_time);
            self.finish_time.push(branch.finish_time);
            self.rollback_time.push(branch.rollback_time);
        }
    }
}

/// `SELECT` of branch rows (and their position `n`) from the `UNNEST` arrays bound at
/// `$first..$first+8`.
fn unnest_branches(first: usize) -> String {
    let p = |i: usize| format!("${}", first + i);
    format!(
        "SELECT v.url, v.bin_data, v.branch_id, v.op, v.status, v.create_time, v.update_time, v.finish_time, \
         v.rollback_time, v.n FROM UNNEST({}::text[], {}::bytea[], {}::text[], {}::text[], {}::text[], {}::int8[], \
         {}::int8[], {}::int8[], {}::int8[]) WITH ORDINALITY AS v(url, bin_data, branch_id, op, status, \
         create_time, update_time, finish_time, rollback_time, n)",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8)
    )
}

impl PgStore {
    /// Connects, and runs the migrations unless `options.migrate` is false. With
    /// `options.group_commit` above 0, writes go through group-commit writers.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("invalid PostgreSQL URL: {e}")))?
            .application_name("kubetx")
            // Every statement is a key lookup or a small indexed range, which a generic plan
            // serves as well as a custom one; without this PostgreSQL re-plans the first
            // executions of each prepared statement on every pooled connection and, for the
            // statements whose custom plan looks cheaper, every execution (the planner was the
            // top of the server's profile under the benchmark).
            .options([("plan_cache_mode", "force_generic_plan")]);
        let pool = pool_options(options.max_connections.max(1), options)
            .connect_with(connect.clone())
            .await?;
        if options.migrate {
            MIGRATOR
                .run(&pool)
                .await
                .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        }
        let reach = Reachability::new(
            "postgres",
            super::sql::connect_probe::<PgConnection>(connect.clone(), options.acquire_timeout),
        );
        let writer = (options.group_commit > 0).then(|| {
            // A connection per writer, named so that they can be told apart in pg_stat_activity.
            let writers = writers(options.max_connections);
            let writer_pool = pool_options(writers as u32, options).connect_lazy_with(
                connect
                    .application_name("kubetx-writer")
                    .options([("lock_timeout", WRITER_LOCK_TIMEOUT)])
                    .options(WRITER_PLANNER),
            );
            Writer::start(writer_pool, reach.clone(), writers, options.group_commit)
        });
        Ok(PgStore { pool, reach, writer })
    }

    /// Runs a write: through the group-commit writers, or alone on a pooled connection.
    async fn write(&self, write: Write) -> Result<Reply> {
        match &self.writer {
            Some(writer) => {
                self.reach.check()?;
                writer.write(write).await
            }
            // Boxed: inline, the statements' futures would set the size of every write's
            // future, group commit or not: about 9.5 KB copied into each store call's box
            // (BENCHMARKS.md, issue 15).
            None => Box::pin(self.write_alone(write)).await,
        }
    }

    /// One write in an autocommit statement of its own, on a pooled connection (`db!` checks
    /// that the database is reachable).
    async fn write_alone(&self, write: Write) -> Result<Reply> {
        db!(self.reach, {
            let mut conn = self.pool.acquire().await?;
            write.apply_alone(&mut conn).await
        })
    }

    async fn write_flag(&self, write: Write) -> Result<bool> {
        match self.write(write).await? {
            Reply::Flag(flag) => Ok(flag),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }
}

/// Writer tasks beside a read pool of `max_connections`: one per 16 connections, 1 to 4 (one with
/// the default pool of 16). A batch's creates and status changes are one statement, so one
/// writer's batches grow with the load while its round trips stay one per batch; more writers
/// make smaller batches (more statements and commits), which on the benchmark machine cost more
/// than the overlap of their round trips saved (BENCHMARKS.md). A larger pool, typical of a
/// distant database, gets more writers to overlap the writes that are statements of their own.
fn writers(max_connections: u32) -> usize {
    (max_connections / 16).clamp(1, 4) as usize
}

/// A pool of up to `size` connections.
fn pool_options(size: u32, options: &StoreOptions) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(options.acquire_timeout)
        // Ping only connections that sat idle (HikariCP's rule): one round trip saved per
        // call under load, while a connection broken during an outage is still caught.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > super::sql::PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// The insert of a transaction and its branch rows, one statement.
static CREATE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH g AS (INSERT INTO trans_global (gid, trans_type, status, query_prepared, protocol, custom_data, \
         options, create_time, update_time, finish_time, rollback_time, next_cron_time, next_cron_interval, \
         owner, result, rollback_reason, ext_data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
         $13, $14, $15, $16, $17) ON CONFLICT (gid) DO NOTHING RETURNING id), \
         b AS (INSERT INTO trans_branch_op (gid, url, bin_data, branch_id, op, status, create_time, \
         update_time, finish_time, rollback_time) SELECT $1, url, bin_data, branch_id, op, status, \
         create_time, update_time, finish_time, rollback_time FROM ({}) AS v WHERE EXISTS (SELECT 1 FROM g) \
         ORDER BY n) \
         SELECT count(*) FROM g",
        unnest_branches(18)
    )
});

async fn create(
    conn: &mut PgConnection,
    global: &GlobalTrans,
    options: &str,
    branches: &[Branch],
) -> Result<bool, sqlx::Error> {
    let columns = BranchRows::of(&global.gid, branches);
    let inserted: i64 = sqlx::query_scalar(AssertSqlSafe(CREATE.as_str()))
        .bind(&global.gid)
        .bind(global.trans_type.as_str())
        .bind(global.status.as_str())
        .bind(&global.query_prepared)
        .bind(&global.protocol)
        .bind(&global.custom_data)
        .bind(options)
        .bind(global.create_time)
        .bind(global.update_time)
        .bind(global.finish_time)
        .bind(global.rollback_time)
        .bind(global.next_cron_time)
        .bind(global.next_cron_interval)
        .bind(&global.owner)
        .bind(&global.result)
        .bind(&global.rollback_reason)
        .bind(&global.ext_data)
        .bind(&columns.url)
        .bind(&columns.bin_data)
        .bind(&columns.branch_id)
        .bind(&columns.op)
        .bind(&columns.status)
        .bind(&columns.create_time)
        .bind(&columns.update_time)
        .bind(&columns.finish_time)
        .bind(&columns.rollback_time)
        .fetch_one(conn)
        .await?;
    Ok(inserted == 1)
}

/// The conditional status change with the branch outcomes it records, one statement: the branch
/// rows change only when the status does.
static CHANGE_STATUS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH g AS ({} RETURNING id), {} SELECT count(*) FROM g",
        *UPDATE_STATUS,
        record_outcomes("$8", "$2", 12)
    )
});

/// The `u` step of a statement whose `g` step returns the transaction's row when the write may
/// happen: sets the outcomes given as four arrays from parameter `$first` on (branch ids, ops,
/// statuses, times) on the rows of transaction `gid`, stamped `now` (parameter names).
fn record_outcomes(gid: &str, now: &str, first: usize) -> String {
    let [ids, ops, statuses, ats] = [first, first + 1, first + 2, first + 3];
    format!(
        "u AS (UPDATE trans_branch_op b SET {} \
         FROM UNNEST(${ids}::text[], ${ops}::text[], ${statuses}::text[], ${ats}::int8[]) \
         AS v(branch_id, op, status, at) \
         WHERE b.gid = {gid} AND b.branch_id = v.branch_id AND b.op = v.op AND EXISTS (SELECT 1 FROM g) \
         RETURNING 1)",
        outcome_set("v", now)
    )
}

/// The `SET` list of a branch row `b` taking the outcome in row `outcome` (its `status` and
/// `at`), stamped `now`.
pub(super) fn outcome_set(outcome: &str, now: &str) -> String {
    format!(
        "status = {outcome}.status, update_time = {now}, \
         finish_time = CASE WHEN {outcome}.status = 'succeed' THEN {outcome}.at ELSE b.finish_time END, \
         rollback_time = CASE WHEN {outcome}.status = 'failed' THEN {outcome}.at ELSE b.rollback_time END"
    )
}

/// Branch outcomes under the lease guard. The shared lock on the global row orders this write
/// against a takeover: a claim by another process either commits first (then the guard fails)
/// or waits for this one.
static UPDATE_BRANCHES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH g AS (SELECT id FROM trans_global WHERE gid = $1 AND owner = $2 AND status = $3 FOR SHARE), \
         {} SELECT count(*) FROM g",
        record_outcomes("$1", "$4", 5)
    )
});

async fn change_status(conn: &mut PgConnection, change: &StatusChange) -> Result<bool, sqlx::Error> {
    let updates = Outcomes::of(&change.gid, &change.branch_updates);
    let done: i64 = bind_change(sqlx::query(AssertSqlSafe(CHANGE_STATUS.as_str())), change)
        .bind(&updates.branch_id)
        .bind(&updates.op)
        .bind(&updates.status)
        .bind(&updates.at)
        .fetch_one(conn)
        .await?
        .try_get(0)?;
    Ok(done == 1)
}

/// The conditional status change (without branch outcomes) and, when it happened, the changed
/// row joined with its branch rows (one result row each): one statement.
static CHANGE_AND_LOAD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH g AS ({} RETURNING {GLOBAL_COLUMNS}) \
         SELECT g.*, {} FROM g LEFT JOIN trans_branch_op b ON b.gid = g.gid ORDER BY b.id",
        *UPDATE_STATUS,
        BRANCH_COLUMNS
            .split(", ")
            .map(|c| format!("b.{c} AS b_{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
});

async fn change_and_load(
    conn: &mut PgConnection,
    change: &StatusChange,
) -> Result<Option<(GlobalTrans, Vec<Branch>)>, sqlx::Error> {
    let rows = bind_change(sqlx::query(AssertSqlSafe(CHANGE_AND_LOAD.as_str())), change)
        .fetch_all(conn)
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let global = decode::global(first).map_err(super::sql::corrupt)?;
    let mut branches = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get::<Option<i64>, _>("b_id")?.is_some() {
            branches.push(decode::branch(&decode::Prefixed::new(row, "b_")).map_err(super::sql::corrupt)?);
        }
    }
    Ok(Some((global, branches)))
}

/// Registers branches of a `prepared` transaction, inside the writer's transaction (its only
/// write is the last statement, so an early answer leaves nothing to undo).
async fn add_branches_tx(conn: &mut PgConnection, gid: &str, branches: &[Branch]) -> Result<AddBranches, sqlx::Error> {
    // Locking the global row orders registrations against each other and against the status
    // change that ends `prepared`: once that commits, no registration can slip in.
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM trans_global WHERE gid = $1 FOR UPDATE")
        .bind(gid)
        .fetch_optional(&mut *conn)
        .await?;
    let status = match status.as_deref().map(TransStatus::parse) {
        None => None,
        Some(Some(status)) => Some(status),
        Some(None) => {
            return Err(super::sql::corrupt(StoreError::Corrupt(format!(
                "unknown status {status:?}"
            ))));
        }
    };
    if status != Some(TransStatus::Prepared) {
        return Ok(AddBranches::WrongStatus(status));
    }
    let stored = sqlx::query("SELECT branch_id, op, url, bin_data, status FROM trans_branch_op WHERE gid = $1")
        .bind(gid)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(decode::stored_branch)
        .collect::<Result<Vec<_>>>()
        .map_err(super::sql::corrupt)?;
    let missing = match branches_to_add(branches, &stored) {
        Ok(missing) => missing,
        Err(answer) => return Ok(answer),
    };
    let columns = BranchRows::of(gid, &missing);
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO trans_branch_op (gid, url, bin_data, branch_id, op, status, create_time, update_time, \
         finish_time, rollback_time) SELECT $1, url, bin_data, branch_id, op, status, create_time, update_time, \
         finish_time, rollback_time FROM ({}) AS b ORDER BY n",
        unnest_branches(2)
    )))
    .bind(gid)
    .bind(&columns.url)
    .bind(&columns.bin_data)
    .bind(&columns.branch_id)
    .bind(&columns.op)
    .bind(&columns.status)
    .bind(&columns.create_time)
    .bind(&columns.update_time)
    .bind(&columns.finish_time)
    .bind(&columns.rollback_time)
    .execute(conn)
    .await?;
    Ok(AddBranches::Added)
}

async fn update_branches(
    conn: &mut PgConnection,
    guard: &Guard,
    updates: &[BranchUpdate],
    now: Millis,
) -> Result<bool, sqlx::Error> {
    let updates = Outcomes::of(&guard.gid, updates);
    let held: i64 = sqlx::query_scalar(AssertSqlSafe(UPDATE_BRANCHES.as_str()))
        .bind(&guard.gid)
        .bind(&guard.owner)
        .bind(guard.status.as_str())
        .bind(now)
        .bind(&updates.branch_id)
        .bind(&updates.op)
        .bind(&updates.status)
        .bind(&updates.at)
        .fetch_one(conn)
        .await?;
    Ok(held == 1)
}

/// The claim of one transaction: parked, or its lease expired.
static CLAIM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE trans_global SET owner = $1, next_cron_time = $2, update_time = $3 \
         WHERE gid = $4 AND status IN {UNFINISHED} AND (owner = '' OR next_cron_time <= $3)"
    )
});

async fn claim(conn: &mut PgConnection, gid: &str, lease: &Lease, now: Millis) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(AssertSqlSafe(CLAIM.as_str()))
        .bind(&lease.owner)
        .bind(lease.until)
        .bind(now)
        .bind(gid)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(done == 1)
}

async fn extend_lease(conn: &mut PgConnection, guard: &Guard, until: Millis) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE trans_global SET next_cron_time = $1 WHERE gid = $2 AND owner = $3 AND status = $4")
        .bind(until)
        .bind(&guard.gid)
        .bind(&guard.owner)
        .bind(guard.status.as_str())
        .execute(conn)
        .await?
        .rows_affected();
    Ok(done == 1)
}

async fn release(
    conn: &mut PgConnection,
    guard: &Guard,
    next_cron_time: Millis,
    interval: i64,
    now: Millis,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE trans_global SET owner = '', next_cron_time = $1, next_cron_interval = $2, \
         update_time = $3 WHERE gid = $4 AND owner = $5 AND status = $6",
    )
    .bind(next_cron_time)
    .bind(interval)
    .bind(now)
    .bind(&guard.gid)
    .bind(&guard.owner)
    .bind(guard.status.as_str())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(done == 1)
}

async fn reset_next_cron_time(conn: &mut PgConnection, gid: &str, now: Millis) -> Result<bool, sqlx::Error> {
    // A leased transaction is being driven right now; making it due would invite a second
    // driver, so only parked ones move.
    sqlx::query_scalar(
        "WITH u AS (UPDATE trans_global SET next_cron_time = $1 WHERE gid = $2 AND owner = '' RETURNING 1) \
         SELECT EXISTS (SELECT 1 FROM trans_global WHERE gid = $2)",
    )
    .bind(now)
    .bind(gid)
    .fetch_one(conn)
    .await
}

async fn kv_create(
    conn: &mut PgConnection,
    cat: &str,
    key: &str,
    value: &str,
    now: Millis,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO kv (cat, k, v, version, create_time, update_time) VALUES ($1, $2, $3, 1, $4, $4) \
         ON CONFLICT (cat, k) DO NOTHING",
    )
    .bind(cat)
    .bind(key)
    .bind(value)
    .bind(now)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(done == 1)
}

async fn kv_update(
    conn: &mut PgConnection,
    cat: &str,
    key: &str,
    value: &str,
    version: i64,
    now: Millis,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE kv SET v = $1, version = version + 1, update_time = $2 \
         WHERE cat = $3 AND k = $4 AND version = $5",
    )
    .bind(value)
    .bind(now)
    .bind(cat)
    .bind(key)
    .bind(version)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(done == 1)
}

async fn kv_delete(conn: &mut PgConnection, cat: &str, key: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM kv WHERE cat = $1 AND k = $2")
        .bind(cat)
        .bind(key)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(done == 1)
}

/// Branch outcomes as column arrays, for `UNNEST` (one statement whatever their number), each
/// with its transaction's gid (which, as for [`BranchRows`], only the bulk statement binds).
#[derive(Default)]
pub(super) struct Outcomes<'a> {
    pub(super) gid: Vec<&'a str>,
    pub(super) branch_id: Vec<&'a str>,
    pub(super) op: Vec<&'a str>,
    pub(super) status: Vec<&'static str>,
    pub(super) at: Vec<Millis>,
}

impl<'a> Outcomes<'a> {
    fn of(gid: &'a str, updates: &'a [BranchUpdate]) -> Self {
        let mut outcomes = Outcomes::default();
        outcomes.push(gid, updates);
        outcomes
    }

    /// Adds the outcomes `updates` of transaction `gid`.
    pub(super) fn push(&mut self, gid: &'a str, updates: &'a [BranchUpdate]) {
        for update in updates {
            self.gid.push(gid);
            self.branch_id.push(&update.branch_id);
            self.op.push(&update.op);
            self.status.push(update.status.as_str());
            self.at.push(update.at);
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<()> {
        db!(self.reach, sqlx::query("SELECT 1").execute(&self.pool).await)?;
        Ok(())
    }

    async fn create(&self, global: &GlobalTrans, branches: &[Branch]) -> Result<bool> {
        check_new(global, branches)?;
        let options = serde_json::to_string(&global.options).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.write_flag(Write::Create(Box::new(global.clone()), options, branches.to_vec()))
            .await
    }

    async fn find(&self, gid: &str) -> Result<Option<GlobalTrans>> {
        db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT {GLOBAL_COLUMNS} FROM trans_global WHERE gid = $1"
            )))
            .bind(gid)
            .fetch_optional(&self.pool)
            .await
        })?
        .as_ref()
        .map(decode::global)
        .transpose()
    }

    async fn branches(&self, gid: &str) -> Result<Vec<Branch>> {
        db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT {BRANCH_COLUMNS} FROM trans_branch_op WHERE gid = $1 ORDER BY id"
            )))
            .bind(gid)
            .fetch_all(&self.pool)
            .await
        })?
        .iter()
        .map(decode::branch)
        .collect()
    }

    async fn change_status(&self, change: &StatusChange) -> Result<bool> {
        check_change(change)?;
        self.write_flag(Write::ChangeStatus(change.clone())).await
    }

    async fn change_status_and_load(&self, change: &StatusChange) -> Result<Option<(GlobalTrans, Vec<Branch>)>> {
        if !change.branch_updates.is_empty() {
            return super::change_then_load(self, change).await;
        }
        check_change(change)?;
        match self.write(Write::ChangeStatusAndLoad(change.clone())).await? {
            Reply::Loaded(loaded) => Ok(loaded.map(|loaded| *loaded)),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn add_branches(&self, gid: &str, branches: &[Branch]) -> Result<AddBranches> {
        check_key("gid", gid)?;
        check_branches(branches)?;
        match self
            .write(Write::AddBranches(gid.to_owned(), branches.to_vec()))
            .await?
        {
            Reply::Added(added) => Ok(added),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn update_branches(&self, guard: &Guard, updates: &[BranchUpdate], now: Millis) -> Result<bool> {
        self.write_flag(Write::UpdateBranches(guard.clone(), updates.to_vec(), now))
            .await
    }

    async fn claim(&self, gid: &str, lease: &Lease, now: Millis) -> Result<bool> {
        self.write_flag(Write::Claim(gid.to_owned(), lease.clone(), now)).await
    }

    // The bulk writes below lock many rows in an order of their own, so they stay out of the
    // writer's batches (whose one lock order keeps replicas from deadlocking) and run on the
    // pool; the scheduler and retention call them now and then, not once per transition.

    async fn claim_due(&self, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>> {
        db!(self.reach, {
            sqlx::query_scalar(AssertSqlSafe(format!(
                "WITH due AS (SELECT id FROM trans_global WHERE status IN {UNFINISHED} AND next_cron_time <= $3 \
                     ORDER BY next_cron_time LIMIT $4 FOR UPDATE SKIP LOCKED) \
                     UPDATE trans_global t SET owner = $1, next_cron_time = $2, update_time = $3 \
                     FROM due WHERE t.id = due.id RETURNING t.gid"
            )))
            .bind(&lease.owner)
            .bind(lease.until)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        })
    }

    async fn reclaim_leases(&self, instance: &str, owner: &str, now: Millis) -> Result<u64> {
        // A process of the same instance is gone (one identity runs once: a pod name); leases of
        // other instances wait for expiry.
        let prefix = super::instance_prefix(instance);
        let done = db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE trans_global SET owner = '', next_cron_time = $1 \
                     WHERE status IN {UNFINISHED} AND left(owner, $2::int) = $3 AND owner <> $4"
            )))
            .bind(now)
            .bind(prefix.len() as i64)
            .bind(&prefix)
            .bind(owner)
            .execute(&self.pool)
            .await
        })?
        .rows_affected();
        Ok(done)
    }

    async fn extend_lease(&self, guard: &Guard, until: Millis) -> Result<bool> {
        self.write_flag(Write::ExtendLease(guard.clone(), until)).await
    }

    async fn release(&self, guard: &Guard, next_cron_time: Millis, interval: i64, now: Millis) -> Result<bool> {
        self.write_flag(Write::Release(guard.clone(), next_cron_time, interval, now))
            .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<GlobalTrans>> {
        db!(self.reach, {
            let mut sql = super::sql::list_query::<Postgres>(GLOBAL_COLUMNS, query);
            sql.build().fetch_all(&self.pool).await
        })?
        .iter()
        .map(decode::global)
        .collect()
    }

    async fn list_due(&self, after: Option<super::DuePosition>, limit: i64) -> Result<Vec<GlobalTrans>> {
        db!(self.reach, {
            let mut sql = super::sql::list_due_query::<Postgres>(GLOBAL_COLUMNS, after, limit);
            sql.build().fetch_all(&self.pool).await
        })?
        .iter()
        .map(decode::global)
        .collect()
    }

    async fn unfinished_summary(&self) -> Result<super::UnfinishedSummary> {
        let rows: Vec<(String, i64, Option<i64>)> = db!(self.reach, {
            sqlx::query_as(super::sql::SUMMARY_SQL).fetch_all(&self.pool).await
        })?;
        Ok(super::sql::summary_from(rows))
    }

    async fn reset_next_cron_time(&self, gid: &str, now: Millis) -> Result<bool> {
        self.write_flag(Write::ResetNextCronTime(gid.to_owned(), now)).await
    }

    async fn reset_cron_times(&self, after: Millis, now: Millis, limit: i64) -> Result<u64> {
        let done = db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE trans_global SET next_cron_time = $1 WHERE id IN (SELECT id FROM trans_global \
                     WHERE status IN {UNFINISHED} AND owner = '' AND next_cron_time > $2 LIMIT $3 \
                     FOR UPDATE SKIP LOCKED)"
            )))
            .bind(now)
            .bind(after)
            .bind(limit)
            .execute(&self.pool)
            .await
        })?
        .rows_affected();
        Ok(done)
    }

    async fn kv_get(&self, cat: &str, key: &str) -> Result<Option<KvEntry>> {
        db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT {KV_COLUMNS} FROM kv WHERE cat = $1 AND k = $2"
            )))
            .bind(cat)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
        })?
        .as_ref()
        .map(decode::kv)
        .transpose()
    }

    async fn kv_scan(&self, cat: &str, after_id: i64, limit: i64) -> Result<Vec<KvEntry>> {
        db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT {KV_COLUMNS} FROM kv WHERE cat = $1 AND id > $2 ORDER BY id LIMIT $3"
            )))
            .bind(cat)
            .bind(after_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
        })?
        .iter()
        .map(decode::kv)
        .collect()
    }

    async fn kv_create(&self, cat: &str, key: &str, value: &str, now: Millis) -> Result<bool> {
        check_key("category", cat)?;
        check_key("key", key)?;
        check_text("value", value)?;
        self.write_flag(Write::KvCreate(cat.to_owned(), key.to_owned(), value.to_owned(), now))
            .await
    }

    async fn kv_update(&self, cat: &str, key: &str, value: &str, version: i64, now: Millis) -> Result<bool> {
        check_text("value", value)?;
        self.write_flag(Write::KvUpdate(
            cat.to_owned(),
            key.to_owned(),
            value.to_owned(),
            version,
            now,
        ))
        .await
    }

    async fn kv_delete(&self, cat: &str, key: &str) -> Result<bool> {
        self.write_flag(Write::KvDelete(cat.to_owned(), key.to_owned())).await
    }

    async fn purge_finished(&self, before: Millis, limit: i64) -> Result<u64> {
        let deleted: i64 = db!(self.reach, {
            sqlx::query_scalar(AssertSqlSafe(format!(
                "WITH victims AS (SELECT id, gid FROM trans_global WHERE status IN {FINISHED} \
                     AND update_time < $1 ORDER BY update_time LIMIT $2 FOR UPDATE SKIP LOCKED), \
                     b AS (DELETE FROM trans_branch_op WHERE gid IN (SELECT gid FROM victims)), \
                     g AS (DELETE FROM trans_global WHERE id IN (SELECT id FROM victims) RETURNING 1) \
                     SELECT count(*) FROM g"
            )))
            .bind(before)
            .bind(limit)
            .fetch_one(&self.pool)
            .await
        })?;
        Ok(deleted as u64)
    }
}
