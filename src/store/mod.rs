//! Durable state behind one trait: SQLite (embedded), PostgreSQL and MySQL/MariaDB (shared by
//! several kubetx replicas). [`open`] picks one from a URL.
//!
//! Every write is conditional so that several processes can share one store safely:
//! - status changes name the status they expect (`UPDATE … WHERE status = ?`);
//! - branch inserts require the global to be `prepared`;
//! - a process drives a transaction only while it holds its *lease* (`owner` plus
//!   `next_cron_time` as the expiry), and every write made while driving names the owner, so a
//!   process that lost its lease (it stalled, another took over) cannot write any more.

mod decode;
mod mysql;
mod pg_batch;
mod pg_bulk;
mod postgres;
mod redis;
mod redis_lua;
pub mod retention;
mod sql;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use mysql::MySqlStore;
pub use postgres::PgStore;
pub use redis::{RedisStore, RedisTarget};
pub use sqlite::{SqliteStore, Synchronous};

use crate::engine::BranchUpdate;
use crate::model::{Branch, GlobalTrans, Millis, TransStatus, TransType};

/// Errors of the store layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored row could not be decoded (a damaged or foreign database).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The store is shutting down.
    #[error("store is closed")]
    Closed,
    /// A value cannot be stored as given (too long, a NUL character, a duplicate key in one
    /// request): the caller's input is at fault, retrying will not help.
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

/// Result alias of the store layer.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// "I hold the lease of `gid` and its status is `status`": the guard of every write made while
/// driving a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// Transaction.
    pub gid: String,
    /// Lease holder (this process).
    pub owner: String,
    /// Expected global status.
    pub status: TransStatus,
}

/// A lease to take: `owner` drives the transaction until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// New lease holder.
    pub owner: String,
    /// Lease expiry.
    pub until: Millis,
}

/// A conditional status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// Transaction.
    pub gid: String,
    /// Status it must have now.
    pub from: TransStatus,
    /// Status to set.
    pub to: TransStatus,
    /// When set, the change also requires this process to hold the lease.
    pub owner: Option<String>,
    /// When set, the change also requires the transaction to be of this mode.
    pub trans_type: Option<TransType>,
    /// Take the lease in the same write (API calls that then drive the transaction).
    pub lease: Option<Lease>,
    /// Rollback reason to record.
    pub rollback_reason: Option<String>,
    /// Workflow result to record.
    pub result: Option<String>,
    /// Replace `custom_data` (e.g. a msg delay given only at submit).
    pub custom_data: Option<String>,
    /// Branch outcomes to record in the same write, only if the change happens: the last step
    /// of a pass and the transition it causes are one durable write, not two.
    pub branch_updates: Vec<BranchUpdate>,
    /// When.
    pub now: Millis,
}

impl StatusChange {
    /// A change with no extra fields.
    pub fn new(gid: &str, from: TransStatus, to: TransStatus, now: Millis) -> Self {
        StatusChange {
            gid: gid.to_owned(),
            from,
            to,
            owner: None,
            trans_type: None,
            lease: None,
            rollback_reason: None,
            result: None,
            custom_data: None,
            branch_updates: Vec::new(),
            now,
        }
    }

    /// The `owner` and `next_cron_time` the change writes (`None`: unchanged). Finishing clears
    /// the owner; taking a lease sets the owner and its expiry.
    pub(crate) fn owner_and_expiry(&self) -> (Option<String>, Option<Millis>) {
        match (&self.lease, self.to.is_finished()) {
            (_, true) => (Some(String::new()), None),
            (Some(lease), false) => (Some(lease.owner.clone()), Some(lease.until)),
            (None, false) => (None, None),
        }
    }
}

/// Result of inserting branches through `registerBranch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddBranches {
    /// Inserted.
    Added,
    /// Every row already existed with the same endpoint and data: an idempotent retry.
    AlreadyRegistered,
    /// A row with the same `(branch_id, op)` exists with other content.
    Conflict(String),
    /// The global is not `prepared` (or does not exist: `None`).
    WrongStatus(Option<TransStatus>),
}

/// Filters and pagination of `/all`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only ids below this one (the previous page's last id); `None` for the first page.
    pub before_id: Option<i64>,
    /// Page size.
    pub limit: i64,
    /// Only this status.
    pub status: Option<TransStatus>,
    /// Only this mode.
    pub trans_type: Option<TransType>,
    /// Created at or after.
    pub created_from: Option<Millis>,
    /// Created at or before.
    pub created_to: Option<Millis>,
    /// Only gids starting with this (the console's search box).
    pub gid_prefix: Option<String>,
}

impl ListQuery {
    /// The gid range `[prefix, upper)` holding every gid that starts with the prefix: keys compare
    /// byte for byte in every store, and no gid character sorts after U+10FFFF. A range, unlike
    /// `LIKE`, needs no escaping and uses the gid index.
    pub fn gid_range(&self) -> Option<(String, String)> {
        let prefix = self.gid_prefix.as_deref().filter(|p| !p.is_empty())?;
        Some((prefix.to_owned(), format!("{prefix}\u{10FFFF}")))
    }
}

/// Keyset position in the list of unfinished transactions, ordered by when they are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuePosition {
    /// `next_cron_time` of the previous page's last row.
    pub next_cron_time: Millis,
    /// Its id (ties on the time).
    pub id: i64,
}

/// How many unfinished transactions there are and how long the oldest has been due.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnfinishedSummary {
    /// Count per unfinished status (`prepared`, `submitted`, `aborting`), zero ones included.
    pub counts: Vec<(TransStatus, u64)>,
    /// Earliest `next_cron_time` of an unfinished transaction, if any.
    pub earliest_due: Option<Millis>,
}

/// The unfinished statuses, in lifecycle order.
pub const UNFINISHED_STATUSES: [TransStatus; 3] =
    [TransStatus::Prepared, TransStatus::Submitted, TransStatus::Aborting];

/// A key-value record (topics live under category `topics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// Store id (pagination of `scanKV`).
    pub id: i64,
    /// Category.
    pub cat: String,
    /// Key.
    pub key: String,
    /// Value (JSON text for topics).
    pub value: String,
    /// Optimistic-concurrency version, starting at 1.
    pub version: i64,
    /// Creation time.
    pub create_time: Millis,
    /// Last write.
    pub update_time: Millis,
}

/// The store every backend implements.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Checks that the store answers.
    async fn ping(&self) -> Result<()>;

    /// What an operator should know about the store's durability (`/readyz` shows it), e.g. a
    /// Redis server running without AOF. Empty when there is nothing to say.
    async fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Inserts a transaction and its branches unless the gid exists. Returns false when it did.
    async fn create(&self, global: &GlobalTrans, branches: &[Branch]) -> Result<bool>;

    /// Loads a transaction.
    async fn find(&self, gid: &str) -> Result<Option<GlobalTrans>>;

    /// Loads a transaction's branches in insertion order.
    async fn branches(&self, gid: &str) -> Result<Vec<Branch>>;

    /// Changes the status if it is still `change.from` (and the lease is held, when asked), and
    /// records `change.branch_updates` with it, atomically.
    async fn change_status(&self, change: &StatusChange) -> Result<bool>;

    /// Changes the status like [`Store::change_status`] and, when it changed, returns the
    /// transaction as changed with its branch rows in insertion order (a msg `submit` needs both
    /// to drive it). A store that can do it in one round trip overrides this.
    async fn change_status_and_load(&self, change: &StatusChange) -> Result<Option<(GlobalTrans, Vec<Branch>)>> {
        change_then_load(self, change).await
    }

    /// Inserts branches of a `prepared` transaction (registerBranch).
    async fn add_branches(&self, gid: &str, branches: &[Branch]) -> Result<AddBranches>;

    /// Records branch outcomes while holding the lease. False when the guard no longer holds.
    async fn update_branches(&self, guard: &Guard, updates: &[BranchUpdate], now: Millis) -> Result<bool>;

    /// Takes the lease of one transaction if it is unfinished and parked or its lease expired.
    async fn claim(&self, gid: &str, lease: &Lease, now: Millis) -> Result<bool>;

    /// Takes the leases of up to `limit` due transactions, earliest first. Never blocks on others.
    async fn claim_due(&self, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>>;

    /// Releases, due at once, the leases of unfinished transactions that a previous process of
    /// this instance held, so that a restart resumes them without waiting for expiry: on a
    /// shared database the owners `{instance}/…` other than `owner`; on a store that proves it
    /// has no other process (SQLite's file lock), every lease other than `owner`. Returns how
    /// many were released. A store that cannot prove either releases nothing (the default).
    async fn reclaim_leases(&self, instance: &str, owner: &str, now: Millis) -> Result<u64> {
        let _ = (instance, owner, now);
        Ok(0)
    }

    /// Extends a held lease.
    async fn extend_lease(&self, guard: &Guard, until: Millis) -> Result<bool>;

    /// Gives the lease back and sets when to look at the transaction again.
    async fn release(&self, guard: &Guard, next_cron_time: Millis, interval: i64, now: Millis) -> Result<bool>;

    /// Lists transactions, newest first.
    async fn list(&self, query: &ListQuery) -> Result<Vec<GlobalTrans>>;

    /// Unfinished transactions, earliest due first, after `after` (keyset paging).
    async fn list_due(&self, after: Option<DuePosition>, limit: i64) -> Result<Vec<GlobalTrans>> {
        list_due_by_scan(self, after, limit).await
    }

    /// Counts unfinished transactions by status and finds the earliest due one (gauges).
    async fn unfinished_summary(&self) -> Result<UnfinishedSummary> {
        summary_by_scan(self).await
    }

    /// Makes a parked transaction due now. False when the gid is unknown.
    async fn reset_next_cron_time(&self, gid: &str, now: Millis) -> Result<bool>;

    /// Makes due now up to `limit` parked unfinished transactions scheduled after `after`.
    async fn reset_cron_times(&self, after: Millis, now: Millis, limit: i64) -> Result<u64>;

    /// Reads one key.
    async fn kv_get(&self, cat: &str, key: &str) -> Result<Option<KvEntry>>;

    /// Lists a category by id, after `after_id`.
    async fn kv_scan(&self, cat: &str, after_id: i64, limit: i64) -> Result<Vec<KvEntry>>;

    /// Creates a key (version 1). False when it exists.
    async fn kv_create(&self, cat: &str, key: &str, value: &str, now: Millis) -> Result<bool>;

    /// Replaces a value if its version is still `version` (then version + 1).
    async fn kv_update(&self, cat: &str, key: &str, value: &str, version: i64, now: Millis) -> Result<bool>;

    /// Deletes a key. False when it did not exist.
    async fn kv_delete(&self, cat: &str, key: &str) -> Result<bool>;

    /// Deletes up to `limit` finished (succeeded or failed) transactions whose last write is
    /// older than `before`, with their branches, oldest first. Returns how many were deleted.
    /// Each call is one short write that locks only the rows it deletes.
    async fn purge_finished(&self, before: Millis, limit: i64) -> Result<u64>;
}

/// [`Store::change_status_and_load`] in three calls: the change, then reads of the transaction
/// and its branches.
pub(crate) async fn change_then_load<S: Store + ?Sized>(
    store: &S,
    change: &StatusChange,
) -> Result<Option<(GlobalTrans, Vec<Branch>)>> {
    if !store.change_status(change).await? {
        return Ok(None);
    }
    // The change took the lease (or finished the transaction): nobody else writes it now.
    let Some(global) = store.find(&change.gid).await? else {
        return Ok(None);
    };
    Ok(Some((global, store.branches(&change.gid).await?)))
}

/// [`Store::list_due`] through [`Store::list`] (a store without a query of its own): reads every
/// unfinished transaction, so fine for small stores only. The SQL stores override it.
async fn list_due_by_scan<S: Store + ?Sized>(
    store: &S,
    after: Option<DuePosition>,
    limit: i64,
) -> Result<Vec<GlobalTrans>> {
    let mut rows = all_unfinished(store).await?;
    rows.retain(|g| after.is_none_or(|a| (g.next_cron_time, g.id) > (a.next_cron_time, a.id)));
    rows.sort_by_key(|g| (g.next_cron_time, g.id));
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    Ok(rows)
}

/// [`Store::unfinished_summary`] through [`Store::list`].
async fn summary_by_scan<S: Store + ?Sized>(store: &S) -> Result<UnfinishedSummary> {
    let rows = all_unfinished(store).await?;
    Ok(UnfinishedSummary {
        counts: UNFINISHED_STATUSES
            .iter()
            .map(|&s| (s, rows.iter().filter(|g| g.status == s).count() as u64))
            .collect(),
        earliest_due: rows.iter().map(|g| g.next_cron_time).min(),
    })
}

async fn all_unfinished<S: Store + ?Sized>(store: &S) -> Result<Vec<GlobalTrans>> {
    let mut rows = Vec::new();
    for status in UNFINISHED_STATUSES {
        let mut query = ListQuery {
            limit: 1000,
            status: Some(status),
            ..ListQuery::default()
        };
        loop {
            let page = store.list(&query).await?;
            let full = page.len() as i64 == query.limit;
            query.before_id = page.last().map(|g| g.id);
            rows.extend(page);
            if !full {
                break;
            }
        }
    }
    Ok(rows)
}

/// The start of every lease owner of a scheduler running as `instance`: `{instance}/`, then a
/// per-process nonce.
pub fn instance_prefix(instance: &str) -> String {
    format!("{instance}/")
}

/// Longest gid, branch id, op, KV category and KV key every store accepts (DTM's width).
pub const MAX_KEY_LEN: usize = 128;

/// Checks a key column: at most [`MAX_KEY_LEN`] bytes, no NUL.
pub(crate) fn check_key(what: &str, value: &str) -> Result<()> {
    if value.len() > MAX_KEY_LEN {
        return Err(StoreError::Invalid(format!(
            "{what} is longer than {MAX_KEY_LEN} bytes"
        )));
    }
    check_text(what, value)
}

/// Checks a text column: no NUL character (PostgreSQL cannot store one; the other stores refuse
/// it too so that every store behaves alike).
pub(crate) fn check_text(what: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(StoreError::Invalid(format!("{what} contains a NUL character")));
    }
    Ok(())
}

/// Checks what `create` stores.
pub(crate) fn check_new(global: &GlobalTrans, branches: &[Branch]) -> Result<()> {
    check_key("gid", &global.gid)?;
    for (what, value) in [
        ("query_prepared", &global.query_prepared),
        ("protocol", &global.protocol),
        ("custom_data", &global.custom_data),
        ("result", &global.result),
        ("rollback_reason", &global.rollback_reason),
        ("ext_data", &global.ext_data),
    ] {
        check_text(what, value)?;
    }
    check_branches(branches)
}

/// Checks branch rows before they are inserted.
pub(crate) fn check_branches(branches: &[Branch]) -> Result<()> {
    // Sorted keys find a repeat by comparing neighbours: no hashing of every key (a saga's few
    // rows were a visible cost of each submit).
    let mut keys: Vec<(&str, &str)> = Vec::with_capacity(branches.len());
    for branch in branches {
        check_key("gid", &branch.gid)?;
        check_key("branch_id", &branch.branch_id)?;
        check_key("op", &branch.op)?;
        check_text("url", &branch.url)?;
        keys.push((branch.branch_id.as_str(), branch.op.as_str()));
    }
    keys.sort_unstable();
    if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
        let (branch_id, op) = pair[0];
        return Err(StoreError::Invalid(format!("branch {branch_id} op {op} appears twice")));
    }
    Ok(())
}

/// A stored branch row as `registerBranch` compares it with a new registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredBranch {
    branch_id: String,
    op: String,
    url: String,
    bin_data: Vec<u8>,
    status: String,
}

/// The branches of a registration that are not stored yet. `Err` answers the registration
/// without a write: one is stored with other content (`Conflict`), or all are stored alike
/// (`AlreadyRegistered`, an idempotent retry).
pub(crate) fn branches_to_add(requested: &[Branch], stored: &[StoredBranch]) -> Result<Vec<Branch>, AddBranches> {
    let mut missing = Vec::new();
    for branch in requested {
        match stored
            .iter()
            .find(|row| row.branch_id == branch.branch_id && row.op == branch.op)
        {
            None => missing.push(branch.clone()),
            Some(row)
                if row.url == branch.url && row.bin_data == branch.bin_data && row.status == branch.status.as_str() => {
            }
            Some(_) => {
                return Err(AddBranches::Conflict(format!(
                    "branch {} op {} is already registered with other content",
                    branch.branch_id, branch.op
                )));
            }
        }
    }
    if missing.is_empty() {
        return Err(AddBranches::AlreadyRegistered);
    }
    Ok(missing)
}

/// Checks the free-text fields of a status change.
pub(crate) fn check_change(change: &StatusChange) -> Result<()> {
    for (what, value) in [
        ("rollback_reason", &change.rollback_reason),
        ("result", &change.result),
        ("custom_data", &change.custom_data),
    ] {
        if let Some(value) = value {
            check_text(what, value)?;
        }
    }
    Ok(())
}

/// Which backend a store URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// An SQLite file at this path.
    Sqlite(String),
    /// A PostgreSQL URL (`postgres://...`).
    Postgres(String),
    /// A MySQL or MariaDB URL (`mysql://...`).
    MySql(String),
    /// A Redis URL (`redis://...` or `rediss://...`).
    Redis(String),
}

impl StoreKind {
    /// Parses a store setting: `postgres://` or `postgresql://`, `mysql://` or `mariadb://`,
    /// `sqlite://path` or `sqlite:path`, or a plain path (SQLite). Empty means `default_sqlite`.
    pub fn parse(url: &str, default_sqlite: &str) -> Result<Self> {
        let url = url.trim();
        if url.is_empty() {
            return Ok(StoreKind::Sqlite(default_sqlite.to_owned()));
        }
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(StoreKind::Postgres(url.to_owned()));
        }
        if lower.starts_with("mysql://") {
            return Ok(StoreKind::MySql(url.to_owned()));
        }
        if lower.starts_with("redis://") || lower.starts_with("rediss://") {
            return Ok(StoreKind::Redis(url.to_owned()));
        }
        if lower.starts_with("mariadb://") {
            return Ok(StoreKind::MySql(format!("mysql://{}", &url["mariadb://".len()..])));
        }
        if let Some(path) = lower.starts_with("sqlite:").then(|| &url["sqlite:".len()..]) {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(StoreError::Invalid("sqlite store URL names no file".to_owned()));
            }
            return Ok(StoreKind::Sqlite(path.to_owned()));
        }
        if url.contains("://") {
            return Err(StoreError::Invalid(format!(
                "unsupported store URL {:?}: use postgres://, mysql://, redis:// or sqlite://",
                redact(url)
            )));
        }
        Ok(StoreKind::Sqlite(url.to_owned()))
    }

    /// A name for logs: the backend and, for SQL servers, the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreKind::Sqlite(path) => format!("sqlite://{path}"),
            StoreKind::Postgres(url) | StoreKind::MySql(url) | StoreKind::Redis(url) => redact(url),
        }
    }
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            if user_info.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                url.to_owned()
            }
        }
        None => url.to_owned(),
    }
}

/// How to open a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Which backend, and where.
    pub kind: StoreKind,
    /// SQLite durability.
    pub synchronous: Synchronous,
    /// Run the schema migrations on open.
    pub migrate: bool,
    /// Connection pool size (PostgreSQL and MySQL).
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails with `Unavailable`.
    pub acquire_timeout: Duration,
    /// PostgreSQL group commit: most writes one writer commits together in one database
    /// transaction (see `pg_batch`); 0 runs every write as its own statement on the pool.
    pub group_commit: usize,
}

/// Opens the store `options` names.
pub async fn open(options: &StoreOptions) -> Result<Arc<dyn Store>> {
    Ok(match &options.kind {
        StoreKind::Sqlite(path) => Arc::new(SqliteStore::open_with(path, options.synchronous, options.migrate).await?),
        StoreKind::Postgres(url) => Arc::new(PgStore::open(url, options).await?),
        StoreKind::MySql(url) => Arc::new(MySqlStore::open(url, options).await?),
        StoreKind::Redis(url) => Arc::new(RedisStore::open(url, options).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_classified() {
        let parse = |url: &str| StoreKind::parse(url, "./kubetx.db").unwrap();
        assert_eq!(parse(""), StoreKind::Sqlite("./kubetx.db".into()));
        assert_eq!(parse("/var/lib/k.db"), StoreKind::Sqlite("/var/lib/k.db".into()));
        assert_eq!(parse("sqlite:///var/k.db"), StoreKind::Sqlite("/var/k.db".into()));
        assert_eq!(parse("sqlite://k.db"), StoreKind::Sqlite("k.db".into()));
        assert_eq!(parse("sqlite:k.db"), StoreKind::Sqlite("k.db".into()));
        assert_eq!(
            parse("postgres://u:p@h/db"),
            StoreKind::Postgres("postgres://u:p@h/db".into())
        );
        assert_eq!(
            parse("mariadb://root@h/db"),
            StoreKind::MySql("mysql://root@h/db".into())
        );
        assert_eq!(parse("redis://h:6379/2"), StoreKind::Redis("redis://h:6379/2".into()));
        assert_eq!(parse("rediss://h"), StoreKind::Redis("rediss://h".into()));
        assert!(StoreKind::parse("memcached://h", "").is_err());
        assert!(StoreKind::parse("sqlite://", "").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(redact("/path/k.db"), "/path/k.db");
    }

    #[test]
    fn keys_and_text_are_checked() {
        assert!(check_key("gid", &"g".repeat(MAX_KEY_LEN)).is_ok());
        assert!(matches!(
            check_key("gid", &"g".repeat(MAX_KEY_LEN + 1)),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(check_text("url", "a\0b"), Err(StoreError::Invalid(_))));
    }
}
