//! Turning stored rows into model values, the same for every store: each driver's row type
//! only says how to read one column ([`Columns`]).

use sqlx::Row;
use sqlx::mysql::MySqlRow;
use sqlx::postgres::PgRow;

use super::{KvEntry, Result, StoreError, StoredBranch};
use crate::model::{Branch, BranchStatus, GlobalTrans, Millis, TransOptions, TransStatus, TransType};

/// The statuses of unfinished transactions, as an SQL list.
pub(super) const UNFINISHED: &str = "('prepared', 'submitted', 'aborting')";

/// The statuses of finished transactions, as an SQL list.
pub(super) const FINISHED: &str = "('succeed', 'failed')";

/// The `trans_global` columns [`global`] reads.
pub(super) const GLOBAL_COLUMNS: &str = "id, gid, trans_type, status, query_prepared, protocol, custom_data, options, \
    create_time, update_time, finish_time, rollback_time, next_cron_time, next_cron_interval, owner, result, \
    rollback_reason, ext_data";

/// The `trans_branch_op` columns [`branch`] reads.
pub(super) const BRANCH_COLUMNS: &str =
    "id, gid, url, bin_data, branch_id, op, status, create_time, update_time, finish_time, rollback_time";

/// The `kv` columns [`kv`] reads.
pub(super) const KV_COLUMNS: &str = "id, cat, k, v, version, create_time, update_time";

/// Named columns of a row, whatever the driver.
pub(super) trait Columns {
    /// A text column.
    fn text(&self, column: &str) -> Result<String>;
    /// An integer column.
    fn int(&self, column: &str) -> Result<i64>;
    /// A nullable integer column.
    fn opt_int(&self, column: &str) -> Result<Option<Millis>>;
    /// A binary column.
    fn bytes(&self, column: &str) -> Result<Vec<u8>>;
}

/// `Columns` for a row type whose `$get` reads any decodable column; `$text` reads text.
macro_rules! columns {
    ($row:ty, $get:ident, $text:expr) => {
        impl Columns for $row {
            fn text(&self, column: &str) -> Result<String> {
                Ok($text(self, column)?)
            }
            fn int(&self, column: &str) -> Result<i64> {
                Ok(self.$get(column)?)
            }
            fn opt_int(&self, column: &str) -> Result<Option<i64>> {
                Ok(self.$get(column)?)
            }
            fn bytes(&self, column: &str) -> Result<Vec<u8>> {
                Ok(self.$get(column)?)
            }
        }
    };
}

columns!(PgRow, try_get, |row: &PgRow, column| row.try_get::<String, _>(column));
// The VARBINARY key columns are text to kubetx; sqlx would not decode them as strings.
columns!(MySqlRow, try_get, |row: &MySqlRow, column| row
    .try_get_unchecked::<String, _>(column));
columns!(rusqlite::Row<'_>, get, |row: &rusqlite::Row<'_>, column| row
    .get::<_, String>(column));

/// The columns of a row whose names carry a prefix (a joined table's columns, aliased).
pub(super) struct Prefixed<'r, R> {
    row: &'r R,
    prefix: &'static str,
}

impl<'r, R: Columns> Prefixed<'r, R> {
    /// Reads `column` of `row` as `<prefix><column>`.
    pub(super) fn new(row: &'r R, prefix: &'static str) -> Self {
        Prefixed { row, prefix }
    }

    fn name(&self, column: &str) -> String {
        format!("{}{column}", self.prefix)
    }
}

impl<R: Columns> Columns for Prefixed<'_, R> {
    fn text(&self, column: &str) -> Result<String> {
        self.row.text(&self.name(column))
    }
    fn int(&self, column: &str) -> Result<i64> {
        self.row.int(&self.name(column))
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        self.row.opt_int(&self.name(column))
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>> {
        self.row.bytes(&self.name(column))
    }
}

/// A stored transaction status.
pub(super) fn parse_status(text: &str) -> Result<TransStatus> {
    TransStatus::parse(text).ok_or_else(|| StoreError::Corrupt(format!("unknown status {text:?}")))
}

/// A `trans_global` row.
pub(super) fn global(row: &impl Columns) -> Result<GlobalTrans> {
    let trans_type = row.text("trans_type")?;
    let options = row.text("options")?;
    Ok(GlobalTrans {
        id: row.int("id")?,
        gid: row.text("gid")?,
        trans_type: TransType::parse(&trans_type)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown trans_type {trans_type:?}")))?,
        status: parse_status(&row.text("status")?)?,
        query_prepared: row.text("query_prepared")?,
        protocol: row.text("protocol")?,
        custom_data: row.text("custom_data")?,
        options: if options.is_empty() {
            TransOptions::default()
        } else {
            serde_json::from_str(&options).map_err(|e| StoreError::Corrupt(format!("options: {e}")))?
        },
        create_time: row.int("create_time")?,
        update_time: row.int("update_time")?,
        finish_time: row.opt_int("finish_time")?,
        rollback_time: row.opt_int("rollback_time")?,
        next_cron_time: row.int("next_cron_time")?,
        next_cron_interval: row.int("next_cron_interval")?,
        owner: row.text("owner")?,
        result: row.text("result")?,
        rollback_reason: row.text("rollback_reason")?,
        ext_data: row.text("ext_data")?,
    })
}

/// A `trans_branch_op` row.
pub(super) fn branch(row: &impl Columns) -> Result<Branch> {
    let status = row.text("status")?;
    Ok(Branch {
        id: row.int("id")?,
        gid: row.text("gid")?,
        url: row.text("url")?,
        bin_data: row.bytes("bin_data")?,
        branch_id: row.text("branch_id")?,
        op: row.text("op")?,
        status: BranchStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown branch status {status:?}")))?,
        create_time: row.int("create_time")?,
        update_time: row.int("update_time")?,
        finish_time: row.opt_int("finish_time")?,
        rollback_time: row.opt_int("rollback_time")?,
    })
}

/// A `kv` row.
pub(super) fn kv(row: &impl Columns) -> Result<KvEntry> {
    Ok(KvEntry {
        id: row.int("id")?,
        cat: row.text("cat")?,
        key: row.text("k")?,
        value: row.text("v")?,
        version: row.int("version")?,
        create_time: row.int("create_time")?,
        update_time: row.int("update_time")?,
    })
}

/// The columns `branch_id, op, url, bin_data, status` of a `trans_branch_op` row.
pub(super) fn stored_branch(row: &impl Columns) -> Result<StoredBranch> {
    Ok(StoredBranch {
        branch_id: row.text("branch_id")?,
        op: row.text("op")?,
        url: row.text("url")?,
        bin_data: row.bytes("bin_data")?,
        status: row.text("status")?,
    })
}
