//! The embedded store: one SQLite file in WAL mode.
//!
//! Reads go through a small pool. Writes go through one writer task that owns one connection
//! and commits whatever is queued in a single transaction (group commit): under load, one
//! fsync covers many state transitions, and SQLite's single-writer rule never makes two of our
//! own writers wait on each other. Each queued write runs inside its own savepoint so that one
//! failing write does not undo the others.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::{
    AddBranches, Guard, KvEntry, Lease, ListQuery, Result, StatusChange, Store, StoreError, check_branches,
    check_change, check_key, check_new, check_text,
};
use crate::engine::BranchUpdate;
use crate::model::{Branch, BranchStatus, GlobalTrans, Millis, TransOptions, TransStatus, TransType};

// Every dynamic SQL string below is assembled from constants of this file only, never from input.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Most writes committed together.
const MAX_BATCH: usize = 512;

const UNFINISHED: &str = "('prepared', 'submitted', 'aborting')";

const FINISHED: &str = "('succeed', 'failed')";

const GLOBAL_COLUMNS: &str = "id, gid, trans_type, status, query_prepared, protocol, custom_data, options, \
    create_time, update_time, finish_time, rollback_time, next_cron_time, next_cron_interval, owner, result, \
    rollback_reason, ext_data";

const BRANCH_COLUMNS: &str =
    "id, gid, url, bin_data, branch_id, op, status, create_time, update_time, finish_time, rollback_time";

/// SQLite `synchronous` setting: how hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit: survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints: survives process crashes, may lose the last commits on power loss.
    Normal,
}

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    readers: SqlitePool,
    writer: mpsc::Sender<Job>,
}

#[derive(Debug)]
struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Reply>>,
}

#[derive(Debug)]
enum Write {
    Create(GlobalTrans, Vec<Branch>),
    ChangeStatus(StatusChange),
    AddBranches(String, Vec<Branch>),
    UpdateBranches(Guard, Vec<BranchUpdate>, Millis),
    Claim(String, Lease, Millis),
    ClaimDue(Lease, Millis, i64),
    ExtendLease(Guard, Millis),
    Release(Guard, Millis, i64, Millis),
    ResetNextCronTime(String, Millis),
    ResetCronTimes(Millis, Millis, i64),
    KvCreate(String, String, String, Millis),
    KvUpdate(String, String, String, i64, Millis),
    KvDelete(String, String),
    PurgeFinished(Millis, i64),
}

#[derive(Debug)]
enum Reply {
    Flag(bool),
    Gids(Vec<String>),
    Added(AddBranches),
    Count(u64),
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs the migrations.
    pub async fn open(path: &str, synchronous: Synchronous) -> Result<Self> {
        Self::open_with(path, synchronous, true).await
    }

    /// Opens (creating if needed) the database file, running the migrations when `migrate`.
    pub async fn open_with(path: &str, synchronous: Synchronous, migrate: bool) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10));
        let mut writer = SqliteConnection::connect_with(&options).await?;
        if migrate {
            MIGRATOR
                .run(&mut writer)
                .await
                .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        }
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        let (sender, receiver) = mpsc::channel(4096);
        tokio::spawn(run_writer(writer, receiver));
        Ok(SqliteStore {
            readers,
            writer: sender,
        })
    }

    async fn write(&self, write: Write) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Job { write, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn write_flag(&self, write: Write) -> Result<bool> {
        match self.write(write).await? {
            Reply::Flag(flag) => Ok(flag),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }
}

async fn run_writer(mut conn: SqliteConnection, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let replies = commit_batch(&mut conn, &mut batch).await;
        for (reply, result) in replies {
            // The caller may have given up waiting; nothing to do then.
            let _ = reply.send(result);
        }
    }
}

/// Runs a batch in one transaction; every write gets its own result, or the commit's error.
async fn commit_batch(
    conn: &mut SqliteConnection,
    batch: &mut Vec<Job>,
) -> Vec<(oneshot::Sender<Result<Reply>>, Result<Reply>)> {
    if let Err(error) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
        let error = StoreError::from(error);
        return batch.drain(..).map(|job| (job.reply, Err(error.clone()))).collect();
    }
    let mut results = Vec::with_capacity(batch.len());
    for job in batch.drain(..) {
        let result = apply_in_savepoint(conn, job.write).await;
        results.push((job.reply, result));
    }
    match sqlx::query("COMMIT").execute(&mut *conn).await {
        Ok(_) => results,
        Err(error) => {
            let error = StoreError::from(error);
            // Best effort: leave the connection usable for the next batch.
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            results
                .into_iter()
                .map(|(reply, _)| (reply, Err(error.clone())))
                .collect()
        }
    }
}

async fn apply_in_savepoint(conn: &mut SqliteConnection, write: Write) -> Result<Reply> {
    sqlx::query("SAVEPOINT w").execute(&mut *conn).await?;
    let result = apply(conn, write).await;
    let end = if result.is_ok() { "RELEASE w" } else { "ROLLBACK TO w" };
    sqlx::query(end).execute(&mut *conn).await?;
    if result.is_err() {
        sqlx::query("RELEASE w").execute(&mut *conn).await?;
    }
    result
}

async fn apply(conn: &mut SqliteConnection, write: Write) -> Result<Reply> {
    match write {
        Write::Create(global, branches) => {
            let options = serde_json::to_string(&global.options).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let inserted = sqlx::query(
                "INSERT INTO trans_global (gid, trans_type, status, query_prepared, protocol, custom_data, options, \
                 create_time, update_time, finish_time, rollback_time, next_cron_time, next_cron_interval, owner, \
                 result, rollback_reason, ext_data) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (gid) DO NOTHING",
            )
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
            .execute(&mut *conn)
            .await?
            .rows_affected()
                == 1;
            if inserted {
                insert_branches(conn, &branches).await?;
            }
            Ok(Reply::Flag(inserted))
        }
        Write::ChangeStatus(change) => {
            let (owner, next_cron_time) = match (&change.lease, change.to.is_finished()) {
                (_, true) => (Some(String::new()), None),
                (Some(lease), false) => (Some(lease.owner.clone()), Some(lease.until)),
                (None, false) => (None, None),
            };
            let done = sqlx::query(
                "UPDATE trans_global SET status = ?1, update_time = ?2, \
                 rollback_reason = COALESCE(?3, rollback_reason), result = COALESCE(?4, result), \
                 custom_data = COALESCE(?5, custom_data), owner = COALESCE(?6, owner), \
                 next_cron_time = COALESCE(?7, next_cron_time), \
                 finish_time = CASE WHEN ?1 = 'succeed' THEN ?2 ELSE finish_time END, \
                 rollback_time = CASE WHEN ?1 = 'failed' THEN ?2 ELSE rollback_time END \
                 WHERE gid = ?8 AND status = ?9 AND (?10 IS NULL OR owner = ?10)",
            )
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
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(Reply::Flag(done == 1))
        }
        Write::AddBranches(gid, branches) => Ok(Reply::Added(add_branches(conn, &gid, &branches).await?)),
        Write::UpdateBranches(guard, updates, now) => {
            if !guard_holds(conn, &guard).await? {
                return Ok(Reply::Flag(false));
            }
            for update in &updates {
                sqlx::query(
                    "UPDATE trans_branch_op SET status = ?1, update_time = ?2, \
                     finish_time = CASE WHEN ?1 = 'succeed' THEN ?3 ELSE finish_time END, \
                     rollback_time = CASE WHEN ?1 = 'failed' THEN ?3 ELSE rollback_time END \
                     WHERE gid = ?4 AND branch_id = ?5 AND op = ?6",
                )
                .bind(update.status.as_str())
                .bind(now)
                .bind(update.at)
                .bind(&guard.gid)
                .bind(&update.branch_id)
                .bind(&update.op)
                .execute(&mut *conn)
                .await?;
            }
            Ok(Reply::Flag(true))
        }
        Write::Claim(gid, lease, now) => {
            let done = sqlx::query(AssertSqlSafe(format!(
                "UPDATE trans_global SET owner = ?1, next_cron_time = ?2, update_time = ?3 \
                 WHERE gid = ?4 AND status IN {UNFINISHED} AND (owner = '' OR next_cron_time <= ?3)"
            )))
            .bind(&lease.owner)
            .bind(lease.until)
            .bind(now)
            .bind(&gid)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(Reply::Flag(done == 1))
        }
        Write::ClaimDue(lease, now, limit) => {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "UPDATE trans_global SET owner = ?1, next_cron_time = ?2, update_time = ?3 \
                 WHERE id IN (SELECT id FROM trans_global WHERE status IN {UNFINISHED} AND next_cron_time <= ?3 \
                 ORDER BY next_cron_time LIMIT ?4) RETURNING gid"
            )))
            .bind(&lease.owner)
            .bind(lease.until)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
            let gids = rows
                .iter()
                .map(|row| row.try_get::<String, _>(0))
                .collect::<Result<_, _>>()?;
            Ok(Reply::Gids(gids))
        }
        Write::ExtendLease(guard, until) => {
            let done =
                sqlx::query("UPDATE trans_global SET next_cron_time = ? WHERE gid = ? AND owner = ? AND status = ?")
                    .bind(until)
                    .bind(&guard.gid)
                    .bind(&guard.owner)
                    .bind(guard.status.as_str())
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
            Ok(Reply::Flag(done == 1))
        }
        Write::Release(guard, next_cron_time, interval, now) => {
            let done = sqlx::query(
                "UPDATE trans_global SET owner = '', next_cron_time = ?, next_cron_interval = ?, update_time = ? \
                 WHERE gid = ? AND owner = ? AND status = ?",
            )
            .bind(next_cron_time)
            .bind(interval)
            .bind(now)
            .bind(&guard.gid)
            .bind(&guard.owner)
            .bind(guard.status.as_str())
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(Reply::Flag(done == 1))
        }
        Write::ResetNextCronTime(gid, now) => {
            // A leased transaction is being driven right now; making it due would invite a
            // second driver, so only parked ones move.
            sqlx::query("UPDATE trans_global SET next_cron_time = ? WHERE gid = ? AND owner = ''")
                .bind(now)
                .bind(&gid)
                .execute(&mut *conn)
                .await?;
            let exists = sqlx::query("SELECT 1 FROM trans_global WHERE gid = ?")
                .bind(&gid)
                .fetch_optional(&mut *conn)
                .await?
                .is_some();
            Ok(Reply::Flag(exists))
        }
        Write::ResetCronTimes(after, now, limit) => {
            let done = sqlx::query(AssertSqlSafe(format!(
                "UPDATE trans_global SET next_cron_time = ?1 WHERE id IN (SELECT id FROM trans_global \
                 WHERE status IN {UNFINISHED} AND owner = '' AND next_cron_time > ?2 LIMIT ?3)"
            )))
            .bind(now)
            .bind(after)
            .bind(limit)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(Reply::Count(done))
        }
        Write::KvCreate(cat, key, value, now) => {
            let done = sqlx::query(
                "INSERT INTO kv (cat, k, v, version, create_time, update_time) VALUES (?, ?, ?, 1, ?, ?) \
                 ON CONFLICT (cat, k) DO NOTHING",
            )
            .bind(&cat)
            .bind(&key)
            .bind(&value)
            .bind(now)
            .bind(now)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(Reply::Flag(done == 1))
        }
        Write::KvUpdate(cat, key, value, version, now) => {
            let done = sqlx::query(
                "UPDATE kv SET v = ?, version = version + 1, update_time = ? WHERE cat = ? AND k = ? AND version = ?",
            )
            .bind(&value)
            .bind(now)
            .bind(&cat)
            .bind(&key)
            .bind(version)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(Reply::Flag(done == 1))
        }
        Write::PurgeFinished(before, limit) => {
            // One writer runs this batch alone, so both statements see the same victims.
            let victims = format!(
                "SELECT {{}} FROM trans_global WHERE status IN {FINISHED} AND update_time < ?1 \
                 ORDER BY update_time, id LIMIT ?2"
            );
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM trans_branch_op WHERE gid IN ({})",
                victims.replace("{}", "gid")
            )))
            .bind(before)
            .bind(limit)
            .execute(&mut *conn)
            .await?;
            let deleted = sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM trans_global WHERE id IN ({})",
                victims.replace("{}", "id")
            )))
            .bind(before)
            .bind(limit)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(Reply::Count(deleted))
        }
        Write::KvDelete(cat, key) => {
            let done = sqlx::query("DELETE FROM kv WHERE cat = ? AND k = ?")
                .bind(&cat)
                .bind(&key)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            Ok(Reply::Flag(done == 1))
        }
    }
}

async fn guard_holds(conn: &mut SqliteConnection, guard: &Guard) -> Result<bool> {
    Ok(
        sqlx::query("SELECT 1 FROM trans_global WHERE gid = ? AND status = ? AND owner = ?")
            .bind(&guard.gid)
            .bind(guard.status.as_str())
            .bind(&guard.owner)
            .fetch_optional(&mut *conn)
            .await?
            .is_some(),
    )
}

async fn insert_branches(conn: &mut SqliteConnection, branches: &[Branch]) -> Result<()> {
    for branch in branches {
        sqlx::query(
            "INSERT INTO trans_branch_op (gid, url, bin_data, branch_id, op, status, create_time, update_time, \
             finish_time, rollback_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&branch.gid)
        .bind(&branch.url)
        .bind(&branch.bin_data)
        .bind(&branch.branch_id)
        .bind(&branch.op)
        .bind(branch.status.as_str())
        .bind(branch.create_time)
        .bind(branch.update_time)
        .bind(branch.finish_time)
        .bind(branch.rollback_time)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn add_branches(conn: &mut SqliteConnection, gid: &str, branches: &[Branch]) -> Result<AddBranches> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM trans_global WHERE gid = ?")
        .bind(gid)
        .fetch_optional(&mut *conn)
        .await?;
    let status = status.map(|s| parse_status(&s)).transpose()?;
    if status != Some(TransStatus::Prepared) {
        return Ok(AddBranches::WrongStatus(status));
    }
    let mut missing = Vec::new();
    for branch in branches {
        let existing =
            sqlx::query("SELECT url, bin_data, status FROM trans_branch_op WHERE gid = ? AND branch_id = ? AND op = ?")
                .bind(gid)
                .bind(&branch.branch_id)
                .bind(&branch.op)
                .fetch_optional(&mut *conn)
                .await?;
        match existing {
            None => missing.push(branch.clone()),
            Some(row) => {
                let url: String = row.try_get(0)?;
                let data: Vec<u8> = row.try_get(1)?;
                let status: String = row.try_get(2)?;
                if url != branch.url || data != branch.bin_data || status != branch.status.as_str() {
                    return Ok(AddBranches::Conflict(format!(
                        "branch {} op {} is already registered with other content",
                        branch.branch_id, branch.op
                    )));
                }
            }
        }
    }
    if missing.is_empty() {
        return Ok(AddBranches::AlreadyRegistered);
    }
    insert_branches(conn, &missing).await?;
    Ok(AddBranches::Added)
}

fn parse_status(text: &str) -> Result<TransStatus> {
    TransStatus::parse(text).ok_or_else(|| StoreError::Corrupt(format!("unknown status {text:?}")))
}

fn decode_global(row: &SqliteRow) -> Result<GlobalTrans> {
    let trans_type: String = row.try_get("trans_type")?;
    let status: String = row.try_get("status")?;
    let options: String = row.try_get("options")?;
    Ok(GlobalTrans {
        id: row.try_get("id")?,
        gid: row.try_get("gid")?,
        trans_type: TransType::parse(&trans_type)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown trans_type {trans_type:?}")))?,
        status: parse_status(&status)?,
        query_prepared: row.try_get("query_prepared")?,
        protocol: row.try_get("protocol")?,
        custom_data: row.try_get("custom_data")?,
        options: if options.is_empty() {
            TransOptions::default()
        } else {
            serde_json::from_str(&options).map_err(|e| StoreError::Corrupt(format!("options: {e}")))?
        },
        create_time: row.try_get("create_time")?,
        update_time: row.try_get("update_time")?,
        finish_time: row.try_get("finish_time")?,
        rollback_time: row.try_get("rollback_time")?,
        next_cron_time: row.try_get("next_cron_time")?,
        next_cron_interval: row.try_get("next_cron_interval")?,
        owner: row.try_get("owner")?,
        result: row.try_get("result")?,
        rollback_reason: row.try_get("rollback_reason")?,
        ext_data: row.try_get("ext_data")?,
    })
}

fn decode_branch(row: &SqliteRow) -> Result<Branch> {
    let status: String = row.try_get("status")?;
    Ok(Branch {
        id: row.try_get("id")?,
        gid: row.try_get("gid")?,
        url: row.try_get("url")?,
        bin_data: row.try_get("bin_data")?,
        branch_id: row.try_get("branch_id")?,
        op: row.try_get("op")?,
        status: BranchStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown branch status {status:?}")))?,
        create_time: row.try_get("create_time")?,
        update_time: row.try_get("update_time")?,
        finish_time: row.try_get("finish_time")?,
        rollback_time: row.try_get("rollback_time")?,
    })
}

fn decode_kv(row: &SqliteRow) -> Result<KvEntry> {
    Ok(KvEntry {
        id: row.try_get("id")?,
        cat: row.try_get("cat")?,
        key: row.try_get("k")?,
        value: row.try_get("v")?,
        version: row.try_get("version")?,
        create_time: row.try_get("create_time")?,
        update_time: row.try_get("update_time")?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn create(&self, global: &GlobalTrans, branches: &[Branch]) -> Result<bool> {
        check_new(global, branches)?;
        self.write_flag(Write::Create(global.clone(), branches.to_vec())).await
    }

    async fn find(&self, gid: &str) -> Result<Option<GlobalTrans>> {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {GLOBAL_COLUMNS} FROM trans_global WHERE gid = ?"
        )))
        .bind(gid)
        .fetch_optional(&self.readers)
        .await?
        .as_ref()
        .map(decode_global)
        .transpose()
    }

    async fn branches(&self, gid: &str) -> Result<Vec<Branch>> {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {BRANCH_COLUMNS} FROM trans_branch_op WHERE gid = ? ORDER BY id"
        )))
        .bind(gid)
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(decode_branch)
        .collect()
    }

    async fn change_status(&self, change: &StatusChange) -> Result<bool> {
        check_change(change)?;
        self.write_flag(Write::ChangeStatus(change.clone())).await
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

    async fn claim_due(&self, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>> {
        match self.write(Write::ClaimDue(lease.clone(), now, limit)).await? {
            Reply::Gids(gids) => Ok(gids),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn extend_lease(&self, guard: &Guard, until: Millis) -> Result<bool> {
        self.write_flag(Write::ExtendLease(guard.clone(), until)).await
    }

    async fn release(&self, guard: &Guard, next_cron_time: Millis, interval: i64, now: Millis) -> Result<bool> {
        self.write_flag(Write::Release(guard.clone(), next_cron_time, interval, now))
            .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<GlobalTrans>> {
        let mut sql: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {GLOBAL_COLUMNS} FROM trans_global WHERE 1 = 1"));
        if let Some(before) = query.before_id {
            sql.push(" AND id < ").push_bind(before);
        }
        if let Some(status) = query.status {
            sql.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(trans_type) = query.trans_type {
            sql.push(" AND trans_type = ").push_bind(trans_type.as_str());
        }
        if let Some(from) = query.created_from {
            sql.push(" AND create_time >= ").push_bind(from);
        }
        if let Some(to) = query.created_to {
            sql.push(" AND create_time <= ").push_bind(to);
        }
        sql.push(" ORDER BY id DESC LIMIT ").push_bind(query.limit);
        sql.build()
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(decode_global)
            .collect()
    }

    async fn reset_next_cron_time(&self, gid: &str, now: Millis) -> Result<bool> {
        self.write_flag(Write::ResetNextCronTime(gid.to_owned(), now)).await
    }

    async fn reset_cron_times(&self, after: Millis, now: Millis, limit: i64) -> Result<u64> {
        match self.write(Write::ResetCronTimes(after, now, limit)).await? {
            Reply::Count(count) => Ok(count),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }

    async fn kv_get(&self, cat: &str, key: &str) -> Result<Option<KvEntry>> {
        sqlx::query("SELECT id, cat, k, v, version, create_time, update_time FROM kv WHERE cat = ? AND k = ?")
            .bind(cat)
            .bind(key)
            .fetch_optional(&self.readers)
            .await?
            .as_ref()
            .map(decode_kv)
            .transpose()
    }

    async fn kv_scan(&self, cat: &str, after_id: i64, limit: i64) -> Result<Vec<KvEntry>> {
        sqlx::query(
            "SELECT id, cat, k, v, version, create_time, update_time FROM kv WHERE cat = ? AND id > ? \
             ORDER BY id LIMIT ?",
        )
        .bind(cat)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(decode_kv)
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
        match self.write(Write::PurgeFinished(before, limit)).await? {
            Reply::Count(count) => Ok(count),
            other => Err(StoreError::Corrupt(format!("unexpected writer reply {other:?}"))),
        }
    }
}
