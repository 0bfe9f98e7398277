//! The MySQL / MariaDB store: several kubetx replicas share one database.
//!
//! Sessions run at READ COMMITTED, so InnoDB takes no gap locks and a locking read sees the
//! latest committed row. Every trait call is one short transaction; branch rows go in
//! multi-row statements. Claiming uses `FOR UPDATE SKIP LOCKED` (MySQL 8, MariaDB 10.6+) over
//! an index of a generated column that only unfinished transactions fill, so replicas never
//! wait for each other and finished rows are never scanned.

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::mysql::{MySqlArguments, MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Connection, MySql, MySqlConnection, QueryBuilder, Row};

use super::decode::{self, BRANCH_COLUMNS, GLOBAL_COLUMNS, KV_COLUMNS, UNFINISHED};
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
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");

/// Seconds a statement waits for a row lock before it gives up (and is retried).
const LOCK_WAIT_SECONDS: u32 = 10;

/// The MySQL / MariaDB store.
#[derive(Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    reach: Arc<Reachability>,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore").finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// Connects, and runs the migrations unless `options.migrate` is false.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let connect = MySqlConnectOptions::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("invalid MySQL URL: {e}")))?
            .charset("utf8mb4");
        let pool = MySqlPoolOptions::new()
            .max_connections(options.max_connections.max(1))
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
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query(AssertSqlSafe(format!(
                        "SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}"
                    )))
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .connect_with(connect.clone())
            .await?;
        if options.migrate {
            MIGRATOR
                .run(&pool)
                .await
                .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;
        }
        let reach = Reachability::new(
            "mysql",
            super::sql::connect_probe::<MySqlConnection>(connect, options.acquire_timeout),
        );
        Ok(MySqlStore { pool, reach })
    }
}

fn is_duplicate(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

async fn insert_branches(conn: &mut MySqlConnection, gid: &str, branches: &[Branch]) -> Result<(), sqlx::Error> {
    if branches.is_empty() {
        return Ok(());
    }
    let mut insert: QueryBuilder<MySql> = QueryBuilder::new(
        "INSERT INTO trans_branch_op (gid, url, bin_data, branch_id, op, status, create_time, update_time, \
         finish_time, rollback_time) ",
    );
    insert.push_values(branches, |mut row, branch| {
        row.push_bind(gid)
            .push_bind(&branch.url)
            .push_bind(&branch.bin_data)
            .push_bind(&branch.branch_id)
            .push_bind(&branch.op)
            .push_bind(branch.status.as_str())
            .push_bind(branch.create_time)
            .push_bind(branch.update_time)
            .push_bind(branch.finish_time)
            .push_bind(branch.rollback_time);
    });
    insert.build().execute(conn).await?;
    Ok(())
}

async fn create_tx(
    pool: &MySqlPool,
    global: &GlobalTrans,
    options: &str,
    branches: &[Branch],
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO trans_global (gid, trans_type, status, query_prepared, protocol, custom_data, options, \
         create_time, update_time, finish_time, rollback_time, next_cron_time, next_cron_interval, owner, \
         result, rollback_reason, ext_data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(error) if is_duplicate(&error) => {
            tx.rollback().await?;
            return Ok(false);
        }
        Err(error) => return Err(error),
    }
    insert_branches(&mut tx, &global.gid, branches).await?;
    tx.commit().await?;
    Ok(true)
}

async fn add_branches_tx(pool: &MySqlPool, gid: &str, branches: &[Branch]) -> Result<AddBranches, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Locking the global row orders registrations against each other and against the status
    // change that ends `prepared`: once that commits, no registration can slip in.
    let row = sqlx::query("SELECT status FROM trans_global WHERE gid = ? FOR UPDATE")
        .bind(gid)
        .fetch_optional(&mut *tx)
        .await?;
    let status = match &row {
        None => None,
        Some(row) => {
            let text: String = row.try_get_unchecked(0)?;
            Some(
                TransStatus::parse(&text)
                    .ok_or_else(|| super::sql::corrupt(StoreError::Corrupt(format!("unknown status {text:?}"))))?,
            )
        }
    };
    if status != Some(TransStatus::Prepared) {
        tx.rollback().await?;
        return Ok(AddBranches::WrongStatus(status));
    }
    let stored = sqlx::query("SELECT branch_id, op, url, bin_data, status FROM trans_branch_op WHERE gid = ?")
        .bind(gid)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(decode::stored_branch)
        .collect::<Result<Vec<_>>>()
        .map_err(super::sql::corrupt)?;
    let missing = match branches_to_add(branches, &stored) {
        Ok(missing) => missing,
        Err(answer) => {
            tx.rollback().await?;
            return Ok(answer);
        }
    };
    insert_branches(&mut tx, gid, &missing).await?;
    tx.commit().await?;
    Ok(AddBranches::Added)
}

async fn update_branches_tx(
    pool: &MySqlPool,
    guard: &Guard,
    updates: &[BranchUpdate],
    now: Millis,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // The shared lock on the global row orders this write against a takeover: a claim by
    // another process either commits first (then the guard fails) or waits for this one.
    let held = sqlx::query("SELECT id FROM trans_global WHERE gid = ? AND owner = ? AND status = ? LOCK IN SHARE MODE")
        .bind(&guard.gid)
        .bind(&guard.owner)
        .bind(guard.status.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    if !held {
        tx.rollback().await?;
        return Ok(false);
    }
    record_branches(&mut tx, &guard.gid, updates, now).await?;
    tx.commit().await?;
    Ok(true)
}

async fn record_branches(
    tx: &mut sqlx::MySqlConnection,
    gid: &str,
    updates: &[BranchUpdate],
    now: Millis,
) -> Result<(), sqlx::Error> {
    for update in updates {
        sqlx::query(
            "UPDATE trans_branch_op SET update_time = ?, \
             finish_time = CASE WHEN ? = 'succeed' THEN ? ELSE finish_time END, \
             rollback_time = CASE WHEN ? = 'failed' THEN ? ELSE rollback_time END, \
             status = ? WHERE gid = ? AND branch_id = ? AND op = ?",
        )
        .bind(now)
        .bind(update.status.as_str())
        .bind(update.at)
        .bind(update.status.as_str())
        .bind(update.at)
        .bind(update.status.as_str())
        .bind(gid)
        .bind(&update.branch_id)
        .bind(&update.op)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Changes the status and, if it changed, records the branch outcomes with it, in one
/// transaction (the status update's row lock orders it against a takeover).
async fn change_status_tx(pool: &MySqlPool, change: &StatusChange) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let done = change_status_query(change).execute(&mut *tx).await?.rows_affected() == 1;
    if done {
        record_branches(&mut tx, &change.gid, &change.branch_updates, change.now).await?;
    }
    tx.commit().await?;
    Ok(done)
}

/// The conditional status update of `change`.
fn change_status_query(change: &StatusChange) -> sqlx::query::Query<'_, MySql, MySqlArguments> {
    let (owner, next_cron_time) = change.owner_and_expiry();
    let to = change.to.as_str();
    // MySQL assigns left to right; every CASE reads a parameter, never a column set earlier in
    // the statement.
    sqlx::query(
        "UPDATE trans_global SET status = ?, update_time = ?, \
         rollback_reason = COALESCE(?, rollback_reason), result = COALESCE(?, result), \
         custom_data = COALESCE(?, custom_data), owner = COALESCE(?, owner), \
         next_cron_time = COALESCE(?, next_cron_time), \
         finish_time = CASE WHEN ? = 'succeed' THEN ? ELSE finish_time END, \
         rollback_time = CASE WHEN ? = 'failed' THEN ? ELSE rollback_time END \
         WHERE gid = ? AND status = ? AND (? IS NULL OR owner = ?) AND (? IS NULL OR trans_type = ?)",
    )
    .bind(to)
    .bind(change.now)
    .bind(&change.rollback_reason)
    .bind(&change.result)
    .bind(&change.custom_data)
    .bind(owner)
    .bind(next_cron_time)
    .bind(to)
    .bind(change.now)
    .bind(to)
    .bind(change.now)
    .bind(&change.gid)
    .bind(change.from.as_str())
    .bind(&change.owner)
    .bind(&change.owner)
    .bind(change.trans_type.map(|t| t.as_str()))
    .bind(change.trans_type.map(|t| t.as_str()))
}

async fn claim_due_tx(pool: &MySqlPool, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, gid FROM trans_global WHERE due_time <= ? ORDER BY due_time LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut gids = Vec::with_capacity(rows.len());
    for row in &rows {
        ids.push(row.try_get::<i64, _>(0)?);
        gids.push(row.try_get_unchecked::<String, _>(1)?);
    }
    let mut update: QueryBuilder<MySql> = QueryBuilder::new("UPDATE trans_global SET owner = ");
    update
        .push_bind(&lease.owner)
        .push(", next_cron_time = ")
        .push_bind(lease.until)
        .push(", update_time = ")
        .push_bind(now)
        .push(" WHERE id IN (");
    let mut separated = update.separated(", ");
    for id in &ids {
        separated.push_bind(*id);
    }
    update.push(")");
    update.build().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(gids)
}

async fn purge_tx(pool: &MySqlPool, before: Millis, limit: i64) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, gid FROM trans_global WHERE finished_time < ? ORDER BY finished_time LIMIT ? \
         FOR UPDATE SKIP LOCKED",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let mut branches: QueryBuilder<MySql> = QueryBuilder::new("DELETE FROM trans_branch_op WHERE gid IN (");
    let mut separated = branches.separated(", ");
    for row in &rows {
        separated.push_bind(row.try_get_unchecked::<String, _>(1)?);
    }
    branches.push(")");
    branches.build().execute(&mut *tx).await?;
    let mut globals: QueryBuilder<MySql> = QueryBuilder::new("DELETE FROM trans_global WHERE id IN (");
    let mut separated = globals.separated(", ");
    for row in &rows {
        separated.push_bind(row.try_get::<i64, _>(0)?);
    }
    globals.push(")");
    let deleted = globals.build().execute(&mut *tx).await?.rows_affected();
    tx.commit().await?;
    Ok(deleted)
}

#[async_trait]
impl Store for MySqlStore {
    async fn ping(&self) -> Result<()> {
        db!(self.reach, sqlx::query("SELECT 1").execute(&self.pool).await)?;
        Ok(())
    }

    async fn create(&self, global: &GlobalTrans, branches: &[Branch]) -> Result<bool> {
        check_new(global, branches)?;
        let options = serde_json::to_string(&global.options).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        db!(self.reach, create_tx(&self.pool, global, &options, branches).await)
    }

    async fn find(&self, gid: &str) -> Result<Option<GlobalTrans>> {
        db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT {GLOBAL_COLUMNS} FROM trans_global WHERE gid = ?"
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
                "SELECT {BRANCH_COLUMNS} FROM trans_branch_op WHERE gid = ? ORDER BY id"
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
        if change.branch_updates.is_empty() {
            let done = db!(self.reach, change_status_query(change).execute(&self.pool).await)?;
            return Ok(done.rows_affected() == 1);
        }
        db!(self.reach, change_status_tx(&self.pool, change).await)
    }

    async fn add_branches(&self, gid: &str, branches: &[Branch]) -> Result<AddBranches> {
        check_key("gid", gid)?;
        check_branches(branches)?;
        db!(self.reach, add_branches_tx(&self.pool, gid, branches).await)
    }

    async fn update_branches(&self, guard: &Guard, updates: &[BranchUpdate], now: Millis) -> Result<bool> {
        if let [update] = updates {
            // The usual case (a sequential step), in one statement instead of a transaction of
            // four: InnoDB takes a shared lock on the joined global row, as the transaction's
            // `LOCK IN SHARE MODE` does, so a takeover is ordered against this write alike.
            // Rows are counted as found, not as changed (sqlx asks for CLIENT_FOUND_ROWS).
            let done = db!(self.reach, {
                sqlx::query(
                    "UPDATE trans_branch_op b JOIN trans_global g ON g.gid = b.gid \
                     SET b.update_time = ?, \
                     b.finish_time = CASE WHEN ? = 'succeed' THEN ? ELSE b.finish_time END, \
                     b.rollback_time = CASE WHEN ? = 'failed' THEN ? ELSE b.rollback_time END, \
                     b.status = ? \
                     WHERE b.gid = ? AND b.branch_id = ? AND b.op = ? AND g.owner = ? AND g.status = ?",
                )
                .bind(now)
                .bind(update.status.as_str())
                .bind(update.at)
                .bind(update.status.as_str())
                .bind(update.at)
                .bind(update.status.as_str())
                .bind(&guard.gid)
                .bind(&update.branch_id)
                .bind(&update.op)
                .bind(&guard.owner)
                .bind(guard.status.as_str())
                .execute(&self.pool)
                .await
            })?;
            return Ok(done.rows_affected() == 1);
        }
        db!(self.reach, update_branches_tx(&self.pool, guard, updates, now).await)
    }

    async fn claim(&self, gid: &str, lease: &Lease, now: Millis) -> Result<bool> {
        let done = db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE trans_global SET owner = ?, next_cron_time = ?, update_time = ? \
                     WHERE gid = ? AND status IN {UNFINISHED} AND (owner = '' OR next_cron_time <= ?)"
            )))
            .bind(&lease.owner)
            .bind(lease.until)
            .bind(now)
            .bind(gid)
            .bind(now)
            .execute(&self.pool)
            .await
        })?
        .rows_affected();
        Ok(done == 1)
    }

    async fn claim_due(&self, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>> {
        db!(self.reach, claim_due_tx(&self.pool, lease, now, limit).await)
    }

    async fn reclaim_leases(&self, instance: &str, owner: &str, now: Millis) -> Result<u64> {
        // A process of the same instance is gone (one identity runs once: a pod name); leases of
        // other instances wait for expiry.
        let prefix = super::instance_prefix(instance);
        let done = db!(self.reach, {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE trans_global SET owner = '', next_cron_time = ? \
                     WHERE status IN {UNFINISHED} AND LEFT(owner, ?) = ? AND owner <> ?"
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
        let done = db!(self.reach, {
            sqlx::query("UPDATE trans_global SET next_cron_time = ? WHERE gid = ? AND owner = ? AND status = ?")
                .bind(until)
                .bind(&guard.gid)
                .bind(&guard.owner)
                .bind(guard.status.as_str())
                .execute(&self.pool)
                .await
        })?
        .rows_affected();
        Ok(done == 1)
    }

    async fn release(&self, guard: &Guard, next_cron_time: Millis, interval: i64, now: Millis) -> Result<bool> {
        let done = db!(self.reach, {
            sqlx::query(
                "UPDATE trans_global SET owner = '', next_cron_time = ?, next_cron_interval = ?, \
                     update_time = ? WHERE gid = ? AND owner = ? AND status = ?",
            )
            .bind(next_cron_time)
            .bind(interval)
            .bind(now)
            .bind(&guard.gid)
            .bind(&guard.owner)
            .bind(guard.status.as_str())
            .execute(&self.pool)
            .await
        })?
        .rows_affected();
        Ok(done == 1)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<GlobalTrans>> {
        db!(self.reach, {
            let mut sql = super::sql::list_query::<MySql>(GLOBAL_COLUMNS, query);
            sql.build().fetch_all(&self.pool).await
        })?
        .iter()
        .map(decode::global)
        .collect()
    }

    async fn list_due(&self, after: Option<super::DuePosition>, limit: i64) -> Result<Vec<GlobalTrans>> {
        db!(self.reach, {
            let mut sql = super::sql::list_due_query::<MySql>(GLOBAL_COLUMNS, after, limit);
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
        // A leased transaction is being driven right now; making it due would invite a second
        // driver, so only parked ones move.
        db!(self.reach, {
            sqlx::query("UPDATE trans_global SET next_cron_time = ? WHERE gid = ? AND owner = ''")
                .bind(now)
                .bind(gid)
                .execute(&self.pool)
                .await?;
            Ok(sqlx::query("SELECT 1 FROM trans_global WHERE gid = ?")
                .bind(gid)
                .fetch_optional(&self.pool)
                .await?
                .is_some())
        })
    }

    async fn reset_cron_times(&self, after: Millis, now: Millis, limit: i64) -> Result<u64> {
        let done = db!(self.reach, {
            sqlx::query("UPDATE trans_global SET next_cron_time = ? WHERE due_time > ? AND owner = '' LIMIT ?")
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
                "SELECT {KV_COLUMNS} FROM kv WHERE cat = ? AND k = ?"
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
                "SELECT {KV_COLUMNS} FROM kv WHERE cat = ? AND id > ? ORDER BY id LIMIT ?"
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
        db!(self.reach, {
            let inserted =
                sqlx::query("INSERT INTO kv (cat, k, v, version, create_time, update_time) VALUES (?, ?, ?, 1, ?, ?)")
                    .bind(cat)
                    .bind(key)
                    .bind(value)
                    .bind(now)
                    .bind(now)
                    .execute(&self.pool)
                    .await;
            match inserted {
                Ok(_) => Ok(true),
                Err(error) if is_duplicate(&error) => Ok(false),
                Err(error) => Err(error),
            }
        })
    }

    async fn kv_update(&self, cat: &str, key: &str, value: &str, version: i64, now: Millis) -> Result<bool> {
        check_text("value", value)?;
        let done = db!(self.reach, {
            sqlx::query(
                "UPDATE kv SET v = ?, version = version + 1, update_time = ? \
                     WHERE cat = ? AND k = ? AND version = ?",
            )
            .bind(value)
            .bind(now)
            .bind(cat)
            .bind(key)
            .bind(version)
            .execute(&self.pool)
            .await
        })?
        .rows_affected();
        Ok(done == 1)
    }

    async fn kv_delete(&self, cat: &str, key: &str) -> Result<bool> {
        let done = db!(self.reach, {
            sqlx::query("DELETE FROM kv WHERE cat = ? AND k = ?")
                .bind(cat)
                .bind(key)
                .execute(&self.pool)
                .await
        })?
        .rows_affected();
        Ok(done == 1)
    }

    async fn purge_finished(&self, before: Millis, limit: i64) -> Result<u64> {
        db!(self.reach, purge_tx(&self.pool, before, limit).await)
    }
}
