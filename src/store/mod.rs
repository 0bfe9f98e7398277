//! Durable state behind one trait: SQLite now; PostgreSQL, MySQL and the Kubernetes status later.
//!
//! Every write is conditional so that several processes can share one store safely:
//! - status changes name the status they expect (`UPDATE … WHERE status = ?`);
//! - branch inserts require the global to be `prepared`;
//! - a process drives a transaction only while it holds its *lease* (`owner` plus
//!   `next_cron_time` as the expiry), and every write made while driving names the owner, so a
//!   process that lost its lease (it stalled, another took over) cannot write any more.

mod sqlite;

use async_trait::async_trait;

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
    /// Take the lease in the same write (API calls that then drive the transaction).
    pub lease: Option<Lease>,
    /// Rollback reason to record.
    pub rollback_reason: Option<String>,
    /// Workflow result to record.
    pub result: Option<String>,
    /// Replace `custom_data` (e.g. a msg delay given only at submit).
    pub custom_data: Option<String>,
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
            lease: None,
            rollback_reason: None,
            result: None,
            custom_data: None,
            now,
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
}

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

    /// Inserts a transaction and its branches unless the gid exists. Returns false when it did.
    async fn create(&self, global: &GlobalTrans, branches: &[Branch]) -> Result<bool>;

    /// Loads a transaction.
    async fn find(&self, gid: &str) -> Result<Option<GlobalTrans>>;

    /// Loads a transaction's branches in insertion order.
    async fn branches(&self, gid: &str) -> Result<Vec<Branch>>;

    /// Changes the status if it is still `change.from` (and the lease is held, when asked).
    async fn change_status(&self, change: &StatusChange) -> Result<bool>;

    /// Inserts branches of a `prepared` transaction (registerBranch).
    async fn add_branches(&self, gid: &str, branches: &[Branch]) -> Result<AddBranches>;

    /// Records branch outcomes while holding the lease. False when the guard no longer holds.
    async fn update_branches(&self, guard: &Guard, updates: &[BranchUpdate], now: Millis) -> Result<bool>;

    /// Takes the lease of one transaction if it is unfinished and parked or its lease expired.
    async fn claim(&self, gid: &str, lease: &Lease, now: Millis) -> Result<bool>;

    /// Takes the leases of up to `limit` due transactions, earliest first. Never blocks on others.
    async fn claim_due(&self, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>>;

    /// Extends a held lease.
    async fn extend_lease(&self, guard: &Guard, until: Millis) -> Result<bool>;

    /// Gives the lease back and sets when to look at the transaction again.
    async fn release(&self, guard: &Guard, next_cron_time: Millis, interval: i64, now: Millis) -> Result<bool>;

    /// Lists transactions, newest first.
    async fn list(&self, query: &ListQuery) -> Result<Vec<GlobalTrans>>;

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
}
