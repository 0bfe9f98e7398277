//! The barrier over sqlx: PostgreSQL, MySQL/MariaDB and SQLite, in the caller's transaction.
//!
//! ```no_run
//! # #[cfg(feature = "sqlite")]
//! # async fn handler(pool: sqlx::SqlitePool, params: kubetx_client::BranchParams) -> kubetx_client::Result<()> {
//! use kubetx_client::barrier::BranchBarrier;
//! let barrier = BranchBarrier::from_params(&params)?;
//! barrier
//!     .call(&pool, |tx| Box::pin(async move {
//!         sqlx::query("UPDATE account SET balance = balance - 30 WHERE id = 1").execute(&mut *tx).await?;
//!         Ok(())
//!     }))
//!     .await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;

use super::{BarrierRow, BranchBarrier, Decision, decide, origin_op};
use crate::error::{Error, Result};

/// A boxed future borrowing the transaction's connection, as barrier business logic returns.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use kubetx_client::barrier::sql::BoxFuture;
/// fn busi(tx: &mut sqlx::SqliteConnection) -> BoxFuture<'_, kubetx_client::Result<()>> {
///     Box::pin(async move { sqlx::query("SELECT 1").execute(&mut *tx).await?; Ok(()) })
/// }
/// # }
/// ```
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A database connection the barrier can write its rows on.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use kubetx_client::barrier::sql::BarrierConnection;
/// assert_eq!(<sqlx::SqliteConnection as BarrierConnection>::DEFAULT_TABLE, "dtm_barrier");
/// # }
/// ```
pub trait BarrierConnection: Send {
    /// The table DTM uses on this database.
    const DEFAULT_TABLE: &'static str;
    /// DTM's schema of the barrier table on this database (`CREATE ... IF NOT EXISTS`).
    const SCHEMA: &'static str;

    /// Inserts `row` unless (gid, branch_id, op, barrier_id) exists; the rows added (0 or 1).
    fn insert_barrier(&mut self, table: &str, row: &BarrierRow) -> impl Future<Output = Result<u64>> + Send;

    /// The reason of a row, when it exists.
    fn barrier_reason(&mut self, table: &str, row: &BarrierRow) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Creates the barrier table (and its schema or database) if missing.
    fn create_barrier_table(&mut self) -> impl Future<Output = Result<()>> + Send;
}

macro_rules! barrier_connection {
    ($feature:literal, $conn:ty, $table:literal, $insert:literal, $select:literal, $schema:expr) => {
        #[cfg(feature = $feature)]
        impl BarrierConnection for $conn {
            const DEFAULT_TABLE: &'static str = $table;
            const SCHEMA: &'static str = $schema;

            fn insert_barrier(&mut self, table: &str, row: &BarrierRow) -> impl Future<Output = Result<u64>> + Send {
                let sql = checked_table(table).map(|table| format!($insert, table = table));
                let row = row.clone();
                async move {
                    let sql = sql?;
                    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&row.trans_type)
                        .bind(&row.gid)
                        .bind(&row.branch_id)
                        .bind(&row.op)
                        .bind(&row.barrier_id)
                        .bind(&row.reason)
                        .execute(&mut *self)
                        .await?;
                    Ok(done.rows_affected())
                }
            }

            fn barrier_reason(
                &mut self,
                table: &str,
                row: &BarrierRow,
            ) -> impl Future<Output = Result<Option<String>>> + Send {
                let sql = checked_table(table).map(|table| format!($select, table = table));
                let row = row.clone();
                async move {
                    let sql = sql?;
                    let reason: Option<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                        .bind(&row.gid)
                        .bind(&row.branch_id)
                        .bind(&row.op)
                        .bind(&row.barrier_id)
                        .fetch_optional(&mut *self)
                        .await?;
                    Ok(reason.map(|r| r.0))
                }
            }

            fn create_barrier_table(&mut self) -> impl Future<Output = Result<()>> + Send {
                async move {
                    sqlx::raw_sql(Self::SCHEMA).execute(&mut *self).await?;
                    Ok(())
                }
            }
        }
    };
}

barrier_connection!(
    "postgres",
    sqlx::PgConnection,
    "dtm_barrier.barrier",
    "INSERT INTO {table}(trans_type, gid, branch_id, op, barrier_id, reason) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (gid, branch_id, op, barrier_id) DO NOTHING",
    "SELECT reason FROM {table} WHERE gid = $1 AND branch_id = $2 AND op = $3 AND barrier_id = $4",
    include_str!("schema/postgres.sql")
);

barrier_connection!(
    "mysql",
    sqlx::MySqlConnection,
    "dtm_barrier.barrier",
    "INSERT IGNORE INTO {table}(trans_type, gid, branch_id, op, barrier_id, reason) VALUES (?, ?, ?, ?, ?, ?)",
    "SELECT reason FROM {table} WHERE gid = ? AND branch_id = ? AND op = ? AND barrier_id = ?",
    include_str!("schema/mysql.sql")
);

barrier_connection!(
    "sqlite",
    sqlx::SqliteConnection,
    "dtm_barrier",
    "INSERT OR IGNORE INTO {table}(trans_type, gid, branch_id, op, barrier_id, reason) VALUES (?, ?, ?, ?, ?, ?)",
    "SELECT reason FROM {table} WHERE gid = ? AND branch_id = ? AND op = ? AND barrier_id = ?",
    include_str!("schema/sqlite.sql")
);

/// A table name is spliced into SQL: only `[A-Za-z0-9_]` with at most one dot is accepted.
fn checked_table(table: &str) -> Result<&str> {
    let ok = !table.is_empty()
        && table.len() <= 128
        && table.split('.').count() <= 2
        && table
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    if ok {
        Ok(table)
    } else {
        Err(Error::Invalid(format!(
            "barrier table name {table:?} is not a plain identifier"
        )))
    }
}

impl BranchBarrier {
    fn row(&self, op: &str, barrier_id: &str, reason: &str) -> BarrierRow {
        BarrierRow {
            trans_type: self.params.trans_type.clone(),
            gid: self.params.gid.clone(),
            branch_id: self.params.branch_id.clone(),
            op: op.to_owned(),
            barrier_id: barrier_id.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// Writes this call's barrier rows on `conn` (inside the caller's transaction) in the
    /// default table, and says whether the business logic should run.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn run(pool: sqlx::PgPool, barrier: kubetx_client::barrier::BranchBarrier) -> kubetx_client::Result<()> {
    /// use kubetx_client::barrier::Decision;
    /// let mut tx = pool.begin().await?;
    /// if barrier.enter(&mut *tx).await? == Decision::Run {
    ///     sqlx::query("UPDATE account SET balance = balance + 30").execute(&mut *tx).await?;
    /// }
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn enter<C: BarrierConnection>(&self, conn: &mut C) -> Result<Decision> {
        self.enter_table(conn, C::DEFAULT_TABLE).await
    }

    /// [`BranchBarrier::enter`] with another table name (DTM's `SetBarrierTableName`).
    ///
    /// ```no_run
    /// # #[cfg(feature = "mysql")]
    /// # async fn run(conn: &mut sqlx::MySqlConnection, b: kubetx_client::barrier::BranchBarrier) -> kubetx_client::Result<()> {
    /// b.enter_table(conn, "shop.barrier").await?;
    /// # Ok(()) }
    /// ```
    pub async fn enter_table<C: BarrierConnection>(&self, conn: &mut C, table: &str) -> Result<Decision> {
        let barrier_id = self.next_barrier_id();
        let op = self.params.op.as_str();
        let origin_inserted = match origin_op(op) {
            Some(origin) => conn.insert_barrier(table, &self.row(origin, &barrier_id, op)).await?,
            None => 0,
        };
        let current_inserted = conn.insert_barrier(table, &self.row(op, &barrier_id, op)).await?;
        decide(op, origin_inserted, current_inserted)
    }

    /// Runs `busi` in a transaction of `pool` behind the barrier: `Some(result)` when it ran,
    /// `None` when the barrier skipped it (repeated call, null compensation, late action). An
    /// error from `busi` rolls everything back, barrier rows included.
    ///
    /// ```no_run
    /// # #[cfg(feature = "mysql")]
    /// # async fn run(pool: sqlx::MySqlPool, b: kubetx_client::barrier::BranchBarrier) -> kubetx_client::Result<()> {
    /// let ran = b.call(&pool, |tx| Box::pin(async move {
    ///     sqlx::query("UPDATE account SET balance = balance - 30 WHERE id = 1").execute(&mut *tx).await?;
    ///     Ok(())
    /// })).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call<DB, T, F>(&self, pool: &sqlx::Pool<DB>, busi: F) -> Result<Option<T>>
    where
        DB: sqlx::Database,
        DB::Connection: BarrierConnection,
        F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T>>,
    {
        let mut tx = pool.begin().await?;
        let decision = match self.enter(&mut *tx).await {
            Ok(decision) => decision,
            Err(e) => {
                tx.rollback().await?;
                return Err(e);
            }
        };
        if decision == Decision::Skip {
            tx.commit().await?;
            return Ok(None);
        }
        match busi(&mut *tx).await {
            Ok(value) => {
                tx.commit().await?;
                Ok(Some(value))
            }
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    /// A msg back-check (`QueryPrepared`) over SQL: marks the msg rolled back unless its local
    /// transaction already committed its barrier row. `Err(Failure)` means "rolled back".
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlite")]
    /// # async fn run(pool: sqlx::SqlitePool, b: kubetx_client::barrier::BranchBarrier) -> kubetx_client::Result<()> {
    /// b.query_prepared(&pool).await?; // Ok: the local transaction committed
    /// # Ok(()) }
    /// ```
    pub async fn query_prepared<DB>(&self, pool: &sqlx::Pool<DB>) -> Result<()>
    where
        DB: sqlx::Database,
        DB::Connection: BarrierConnection,
    {
        let mut conn = pool.acquire().await?;
        let table = <DB::Connection as BarrierConnection>::DEFAULT_TABLE;
        let row = BarrierRow {
            trans_type: self.params.trans_type.clone(),
            gid: self.params.gid.clone(),
            branch_id: "00".to_owned(),
            op: "msg".to_owned(),
            barrier_id: "01".to_owned(),
            reason: "rollback".to_owned(),
        };
        conn.insert_barrier(table, &row).await?;
        match conn.barrier_reason(table, &row).await?.as_deref() {
            Some("rollback") => Err(Error::Failure("the msg's local transaction was rolled back".to_owned())),
            Some(_) => Ok(()),
            None => Err(Error::Unknown("the barrier row vanished".to_owned())),
        }
    }
}

/// Creates DTM's barrier table on `pool` if it is missing.
///
/// ```no_run
/// # #[cfg(feature = "sqlite")]
/// # async fn run(pool: sqlx::SqlitePool) -> kubetx_client::Result<()> {
/// kubetx_client::barrier::sql::create_table(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn create_table<DB>(pool: &sqlx::Pool<DB>) -> Result<()>
where
    DB: sqlx::Database,
    DB::Connection: BarrierConnection,
{
    let mut conn = pool.acquire().await?;
    conn.create_barrier_table().await
}

#[cfg(test)]
mod tests {
    use super::checked_table;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(checked_table("dtm_barrier.barrier").is_ok());
        assert!(checked_table("barrier").is_ok());
        assert!(checked_table("a.b.c").is_err());
        assert!(checked_table("x; DROP TABLE y").is_err());
        assert!(checked_table("").is_err());
    }
}
