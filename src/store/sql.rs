//! What the PostgreSQL and MySQL stores share: error classification, retries of deadlocked
//! writes, a reachability tracker that makes calls fail fast while the database is gone, and
//! the query of `/all`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use sqlx::QueryBuilder;

use super::decode::UNFINISHED;
use super::{DuePosition, ListQuery, Result, StoreError, UNFINISHED_STATUSES, UnfinishedSummary};

/// How often a write that lost a deadlock or a serialization race is tried in all.
const ATTEMPTS: usize = 4;

/// A pooled connection idle for longer than this is pinged before use.
pub(super) const PING_IF_IDLE_FOR: Duration = Duration::from_millis(500);

/// Pause between reachability probes while the database is down.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// What went wrong with a database call, as far as the caller is concerned.
#[derive(Debug)]
pub(super) enum Failure {
    /// The database cannot be reached (connection refused, reset, pool timeout).
    Connectivity(StoreError),
    /// A deadlock or serialization failure: the same write may simply be tried again.
    Retry(StoreError),
    /// Anything else.
    Other(StoreError),
}

/// Classifies a driver error.
pub(super) fn classify(error: sqlx::Error) -> Failure {
    let text = error.to_string();
    if is_connectivity(&error) {
        return Failure::Connectivity(StoreError::Unavailable(text));
    }
    match &error {
        sqlx::Error::PoolClosed => Failure::Other(StoreError::Closed),
        sqlx::Error::Database(db) => {
            let state = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if matches!(state.as_str(), "40001" | "40P01") || text.contains("Lock wait timeout") {
                Failure::Retry(StoreError::Unavailable(text))
            } else if state.starts_with("22") || state.starts_with("23") {
                Failure::Other(StoreError::Invalid(db.message().to_owned()))
            } else {
                Failure::Other(StoreError::Unavailable(text))
            }
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            Failure::Other(StoreError::Corrupt(text))
        }
        _ => Failure::Other(StoreError::Unavailable(text)),
    }
}

/// Whether `error` says the database or the connection to it is out of reach (a terminated
/// backend, a server shutting down, a broken socket): what the statement did is unknown and
/// the connection is not to be used again.
pub(super) fn is_connectivity(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|state| state.starts_with("08") || matches!(&*state, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// A boxed probe: one fresh connection and `SELECT 1`, true when it worked.
pub(super) type Probe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A probe that opens a connection of its own with `connect`, pings the server and closes the
/// connection, all within `timeout` (the pool is not used: it is what is failing).
pub(super) fn connect_probe<C>(connect: <C as sqlx::Connection>::Options, timeout: Duration) -> Probe
where
    C: sqlx::Connection,
{
    Arc::new(move || {
        let connect = connect.clone();
        Box::pin(async move {
            let attempt = async {
                let mut conn = C::connect_with(&connect).await?;
                conn.ping().await?;
                conn.close().await
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("connection attempt timed out".to_owned()),
            }
        })
    })
}

/// Tracks whether the database answers. After a connectivity failure a background probe
/// connects outside the pool until the database answers again; meanwhile every call fails at
/// once with `Unavailable` instead of waiting for the pool's acquire timeout.
pub(super) struct Reachability {
    down: AtomicBool,
    probing: AtomicBool,
    last_error: Mutex<String>,
    probe: Probe,
    name: &'static str,
}

impl Reachability {
    /// A tracker for a database reached through `probe`.
    pub(super) fn new(name: &'static str, probe: Probe) -> Arc<Self> {
        Arc::new(Reachability {
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            probe,
            name,
        })
    }

    /// Fails fast while the database is known to be down.
    pub(super) fn check(&self) -> Result<()> {
        if self.down.load(Ordering::Acquire) {
            let last = self.last_error.lock().map(|e| e.clone()).unwrap_or_default();
            return Err(StoreError::Unavailable(format!(
                "{} is unreachable ({last}); retry later",
                self.name
            )));
        }
        Ok(())
    }

    fn start_probe(self: &Arc<Self>, error: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = error;
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut reported = false;
            loop {
                match (this.probe)().await {
                    Ok(()) => break,
                    Err(error) => {
                        if !reported {
                            warn!(store = this.name, %error, "database unreachable; calls fail fast until it answers");
                            reported = true;
                        }
                        if let Ok(mut last) = this.last_error.lock() {
                            *last = error;
                        }
                        this.down.store(true, Ordering::Release);
                        tokio::time::sleep(PROBE_INTERVAL).await;
                    }
                }
            }
            if this.down.swap(false, Ordering::AcqRel) {
                info!(store = this.name, "database reachable again");
            }
            this.probing.store(false, Ordering::Release);
        });
    }

    /// Turns a failed attempt into the error to return, or `None` when attempt number
    /// `attempt` lost a deadlock and may be tried again. Connectivity failures start the probe.
    pub(super) fn failed(self: &Arc<Self>, error: sqlx::Error, attempt: usize) -> Option<StoreError> {
        match classify(error) {
            Failure::Retry(_) if attempt < ATTEMPTS => None,
            Failure::Connectivity(error) => {
                self.start_probe(error.to_string());
                Some(error)
            }
            Failure::Retry(error) | Failure::Other(error) => Some(error),
        }
    }

    /// A short random pause before a retried attempt.
    pub(super) async fn backoff(&self) {
        tokio::time::sleep(Duration::from_millis(rand::random_range(1..20))).await;
    }
}

/// Runs a database call (an expression that may `.await` and use `?` on `sqlx::Error`): fails
/// fast while the database is known to be down, retries deadlocks, and reports connectivity
/// failures to the probe. Evaluates to `Result<T, StoreError>`.
macro_rules! db {
    ($reach:expr, $body:expr) => {{
        let reach = &$reach;
        match reach.check() {
            Err(error) => Err(error),
            Ok(()) => {
                let mut attempt = 1;
                loop {
                    let result: ::std::result::Result<_, ::sqlx::Error> = async { $body }.await;
                    match result {
                        Ok(value) => break Ok(value),
                        Err(error) => match reach.failed(error, attempt) {
                            Some(error) => break Err(error),
                            None => {
                                attempt += 1;
                                reach.backoff().await;
                            }
                        },
                    }
                }
            }
        }
    }};
}
pub(super) use db;

/// `sqlx::Error` for a value the store itself refuses to decode.
pub(super) fn corrupt(error: StoreError) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(error))
}

/// `SELECT <columns> FROM trans_global` with the filters and the page of `/all`, newest first.
pub(super) fn list_query<DB>(columns: &str, query: &ListQuery) -> QueryBuilder<DB>
where
    DB: sqlx::Database,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    &'static str: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut sql = QueryBuilder::new(format!("SELECT {columns} FROM trans_global WHERE 1 = 1"));
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
    if let Some((low, high)) = query.gid_range() {
        sql.push(" AND gid >= ")
            .push_bind(low)
            .push(" AND gid < ")
            .push_bind(high);
    }
    sql.push(" ORDER BY id DESC LIMIT ").push_bind(query.limit);
    sql
}

/// `SELECT <columns>` of unfinished transactions, earliest due first, after a keyset position.
pub(super) fn list_due_query<DB>(columns: &str, after: Option<DuePosition>, limit: i64) -> QueryBuilder<DB>
where
    DB: sqlx::Database,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut sql = QueryBuilder::new(format!(
        "SELECT {columns} FROM trans_global WHERE status IN {UNFINISHED}"
    ));
    if let Some(after) = after {
        sql.push(" AND (next_cron_time > ")
            .push_bind(after.next_cron_time)
            .push(" OR (next_cron_time = ")
            .push_bind(after.next_cron_time)
            .push(" AND id > ")
            .push_bind(after.id)
            .push("))");
    }
    sql.push(" ORDER BY next_cron_time, id LIMIT ").push_bind(limit);
    sql
}

/// Counts and earliest due time of unfinished transactions, one row per status present.
pub(super) const SUMMARY_SQL: &str = "SELECT status, COUNT(*), MIN(next_cron_time) FROM trans_global \
    WHERE status IN ('prepared', 'submitted', 'aborting') GROUP BY status";

/// Builds the summary from `(status, count, earliest due)` rows.
pub(super) fn summary_from(rows: impl IntoIterator<Item = (String, i64, Option<i64>)>) -> UnfinishedSummary {
    let mut summary = UnfinishedSummary {
        counts: UNFINISHED_STATUSES.iter().map(|&s| (s, 0)).collect(),
        earliest_due: None,
    };
    for (status, count, earliest) in rows {
        if let Some(slot) = summary.counts.iter_mut().find(|(s, _)| s.as_str() == status) {
            slot.1 = count.max(0) as u64;
        }
        summary.earliest_due = match (summary.earliest_due, earliest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    summary
}
