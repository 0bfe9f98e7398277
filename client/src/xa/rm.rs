//! The resource-manager side of XA over sqlx: PostgreSQL (`PREPARE TRANSACTION`) and
//! MySQL/MariaDB (`XA START/END/PREPARE`).

use std::future::Future;

use crate::barrier::BarrierRow;
use crate::barrier::sql::{BarrierConnection, BoxFuture};
use crate::branch::BranchParams;
use crate::error::{Error, Result};
use crate::transport::Dtm;

/// A connection that can run one branch of an XA transaction (PostgreSQL and MySQL/MariaDB).
///
/// ```no_run
/// # #[cfg(feature = "mysql")]
/// # async fn run(conn: &mut sqlx::MySqlConnection) -> kubetx_client::Result<()> {
/// use kubetx_client::xa::XaConnection;
/// conn.xa_finish("gid-01", true).await?; // XA COMMIT 'gid-01', a no-op when already done
/// # Ok(()) }
/// ```
pub trait XaConnection: BarrierConnection + Sized {
    /// Starts the local transaction `xid`.
    fn xa_start(&mut self, xid: &str) -> impl Future<Output = Result<()>> + Send;
    /// Ends and prepares it (phase 1).
    fn xa_prepare(&mut self, xid: &str) -> impl Future<Output = Result<()>> + Send;
    /// Rolls back a local transaction that was not prepared.
    fn xa_abort(&mut self, xid: &str) -> impl Future<Output = Result<()>> + Send;
    /// Commits (`commit == true`) or rolls back a prepared transaction; one that does not exist
    /// (already done) is not an error.
    fn xa_finish(&mut self, xid: &str, commit: bool) -> impl Future<Output = Result<()>> + Send;
}

macro_rules! exec {
    ($conn:expr, $sql:expr) => {
        sqlx::raw_sql(sqlx::AssertSqlSafe($sql)).execute(&mut *$conn).await
    };
}

#[cfg(feature = "postgres")]
impl XaConnection for sqlx::PgConnection {
    async fn xa_start(&mut self, _xid: &str) -> Result<()> {
        exec!(self, "BEGIN".to_owned())?;
        Ok(())
    }
    fn xa_prepare(&mut self, xid: &str) -> impl Future<Output = Result<()>> + Send {
        let sql = format!("PREPARE TRANSACTION '{xid}'");
        async move {
            exec!(self, sql)?;
            Ok(())
        }
    }
    async fn xa_abort(&mut self, _xid: &str) -> Result<()> {
        exec!(self, "ROLLBACK".to_owned())?;
        Ok(())
    }
    fn xa_finish(&mut self, xid: &str, commit: bool) -> impl Future<Output = Result<()>> + Send {
        let verb = if commit { "COMMIT" } else { "ROLLBACK" };
        let sql = format!("{verb} PREPARED '{xid}'");
        async move {
            match exec!(self, sql) {
                Ok(_) => Ok(()),
                Err(e) if e.to_string().contains("does not exist") => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    }
}

#[cfg(feature = "mysql")]
impl XaConnection for sqlx::MySqlConnection {
    fn xa_start(&mut self, xid: &str) -> impl Future<Output = Result<()>> + Send {
        let sql = format!("XA START '{xid}'");
        async move {
            exec!(self, sql)?;
            Ok(())
        }
    }
    fn xa_prepare(&mut self, xid: &str) -> impl Future<Output = Result<()>> + Send {
        let (end, prepare) = (format!("XA END '{xid}'"), format!("XA PREPARE '{xid}'"));
        async move {
            exec!(self, end)?;
            exec!(self, prepare)?;
            Ok(())
        }
    }
    fn xa_abort(&mut self, xid: &str) -> impl Future<Output = Result<()>> + Send {
        let (end, rollback) = (format!("XA END '{xid}'"), format!("XA ROLLBACK '{xid}'"));
        async move {
            // END fails when the branch already ended; ROLLBACK is what matters.
            let _ = exec!(self, end);
            exec!(self, rollback)?;
            Ok(())
        }
    }
    fn xa_finish(&mut self, xid: &str, commit: bool) -> impl Future<Output = Result<()>> + Send {
        let verb = if commit { "COMMIT" } else { "ROLLBACK" };
        let sql = format!("XA {verb} '{xid}'");
        async move {
            match exec!(self, sql) {
                Ok(_) => Ok(()),
                // XAER_NOTA: unknown xid, i.e. finished already.
                Err(e) if e.to_string().contains("XAER_NOTA") => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// One database as an XA resource manager: runs local transactions as XA branches and answers
/// the coordinator's phase 2.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn run(pool: sqlx::PgPool, dtm: kubetx_client::Dtm, params: kubetx_client::BranchParams) -> kubetx_client::Result<()> {
/// let rm = kubetx_client::xa::ResourceManager::new(&dtm, pool);
/// // In the branch handler (op "action"):
/// rm.local_transaction(&params, |tx| Box::pin(async move {
///     sqlx::query("UPDATE account SET balance = balance - 30 WHERE id = 1").execute(&mut *tx).await?;
///     Ok(())
/// })).await?;
/// // In the same handler for op "commit" or "rollback":
/// rm.phase2(&params).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ResourceManager<DB: sqlx::Database> {
    dtm: Dtm,
    pool: sqlx::Pool<DB>,
}

impl<DB> ResourceManager<DB>
where
    DB: sqlx::Database,
    DB::Connection: XaConnection,
{
    /// A resource manager on `pool`, registering branches with `dtm`.
    ///
    /// ```no_run
    /// # #[cfg(feature = "mysql")]
    /// # fn f(pool: sqlx::MySqlPool, dtm: kubetx_client::Dtm) {
    /// let rm = kubetx_client::xa::ResourceManager::new(&dtm, pool);
    /// # }
    /// ```
    pub fn new(dtm: &Dtm, pool: sqlx::Pool<DB>) -> Self {
        ResourceManager { dtm: dtm.clone(), pool }
    }

    /// Handles a branch call: op `action` is refused here (use
    /// [`ResourceManager::local_transaction`]), `commit` and `rollback` run phase 2.
    ///
    /// ```no_run
    /// # #[cfg(feature = "mysql")]
    /// # async fn f(rm: kubetx_client::xa::ResourceManager<sqlx::MySql>, p: kubetx_client::BranchParams) -> kubetx_client::Result<()> {
    /// rm.phase2(&p).await?;
    /// # Ok(()) }
    /// ```
    pub async fn phase2(&self, params: &BranchParams) -> Result<()> {
        params.check()?;
        let commit = match params.op.as_str() {
            "commit" => true,
            "rollback" => false,
            other => {
                return Err(Error::Invalid(format!(
                    "XA phase 2 op must be commit or rollback, not {other}"
                )));
            }
        };
        let xid = xid(params)?;
        let mut conn = self.pool.acquire().await?;
        conn.xa_finish(&xid, commit).await?;
        if !commit {
            // A late local transaction of this branch must not prepare after the rollback.
            let row = barrier_row(params, "rollback");
            conn.insert_barrier(<DB::Connection as BarrierConnection>::DEFAULT_TABLE, &row)
                .await?;
        }
        Ok(())
    }

    /// Runs `busi` as this branch's local transaction: starts it, writes the barrier row,
    /// runs `busi`, registers the branch (its phase-2 URL) with the coordinator and prepares.
    /// On any error the local transaction is rolled back.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn f(rm: kubetx_client::xa::ResourceManager<sqlx::Postgres>, p: kubetx_client::BranchParams) -> kubetx_client::Result<()> {
    /// rm.local_transaction(&p, |tx| Box::pin(async move { Ok(()) })).await?;
    /// # Ok(()) }
    /// ```
    pub async fn local_transaction<T, F>(&self, params: &BranchParams, busi: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T>>,
    {
        params.check()?;
        if params.phase2_url.is_empty() {
            return Err(Error::Invalid("missing branch parameter phase2_url".to_owned()));
        }
        let xid = xid(params)?;
        // A connection of its own: if this future is dropped mid-way, the half-done local
        // transaction dies with the connection instead of going back to the pool.
        let mut conn = self.pool.acquire().await?.detach();
        conn.xa_start(&xid).await?;
        let result = self.branch_body(&mut conn, params, busi).await;
        let result = match result {
            Ok(value) => conn.xa_prepare(&xid).await.map(|()| value),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = conn.xa_abort(&xid).await;
        }
        let _ = sqlx::Connection::close(conn).await;
        result
    }

    async fn branch_body<T, F>(&self, conn: &mut DB::Connection, params: &BranchParams, busi: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T>>,
    {
        let table = <DB::Connection as BarrierConnection>::DEFAULT_TABLE;
        if conn.insert_barrier(table, &barrier_row(params, "action")).await? == 0 {
            return Err(Error::Failure("this XA branch was rolled back already".to_owned()));
        }
        let value = busi(conn).await?;
        let register = serde_json::json!({
            "gid": params.gid,
            "trans_type": "xa",
            "branch_id": params.branch_id,
            "url": params.phase2_url,
        });
        self.dtm.call("registerBranch", &register).await?;
        Ok(value)
    }
}

/// The XA barrier row DTM writes: op `action`, barrier "01", the reason says who wrote it.
fn barrier_row(params: &BranchParams, reason: &str) -> BarrierRow {
    BarrierRow {
        trans_type: "xa".to_owned(),
        gid: params.gid.clone(),
        branch_id: params.branch_id.clone(),
        op: "action".to_owned(),
        barrier_id: "01".to_owned(),
        reason: reason.to_owned(),
    }
}

/// The XA transaction id `gid-branch_id`, spliced into SQL: only a safe alphabet is accepted.
fn xid(params: &BranchParams) -> Result<String> {
    let xid = format!("{}-{}", params.gid, params.branch_id);
    let safe = xid.len() <= 64
        && xid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if safe {
        Ok(xid)
    } else {
        Err(Error::Invalid(format!(
            "XA id {xid:?}: at most 64 bytes of [A-Za-z0-9-_.:]"
        )))
    }
}
