//! With a SQL store configured, the branch detail of each resource lives in SQL (the same tables
//! the DTM API uses, so `/api/dtmsvr/query?gid=<status.gid>` shows it) and the resource's status
//! keeps a summary: fewer and smaller API writes, and no status near etcd's object size limit.

use crate::engine::BranchUpdate;
use crate::model::{Branch, GlobalTrans, Millis, TransStatus};
use crate::store::{Guard, StatusChange, Store, StoreError};

/// Lease owner of operator transactions in SQL. Their lease never expires, so the DTM server's
/// scheduler sharing the database never claims them: the controller drives them.
pub const OPERATOR_OWNER: &str = "kubetx-operator";

/// A lease expiry that never comes.
const NEVER: Millis = i64::MAX / 4;

/// Overlays the branch statuses recorded in SQL on `branches`. Returns the transaction's status
/// in SQL, `None` when it was never saved.
pub async fn load(store: &dyn Store, gid: &str, branches: &mut [Branch]) -> Result<Option<TransStatus>, StoreError> {
    let Some(global) = store.find(gid).await? else {
        return Ok(None);
    };
    for saved in store.branches(gid).await? {
        if let Some(row) = branches
            .iter_mut()
            .find(|b| b.branch_id == saved.branch_id && b.op == saved.op)
        {
            row.status = saved.status;
            row.finish_time = saved.finish_time;
            row.rollback_time = saved.rollback_time;
        }
    }
    Ok(Some(global.status))
}

/// Records a pass: the whole transaction the first time, then the branches that changed and the
/// status. `loaded` are the rows as they were before the pass.
pub async fn save(
    store: &dyn Store,
    saved_status: Option<TransStatus>,
    global: &GlobalTrans,
    branches: &[Branch],
    loaded: &[Branch],
    now: Millis,
) -> Result<(), StoreError> {
    let Some(saved_status) = saved_status else {
        let mut row = global.clone();
        row.owner = OPERATOR_OWNER.to_owned();
        row.next_cron_time = NEVER;
        store.create(&row, branches).await?;
        return Ok(());
    };
    let updates: Vec<BranchUpdate> = branches
        .iter()
        .zip(loaded)
        .filter(|(now_row, before)| now_row.status != before.status)
        .map(|(row, _)| BranchUpdate {
            id: row.id,
            branch_id: row.branch_id.clone(),
            op: row.op.clone(),
            status: row.status,
            at: row.finish_time.or(row.rollback_time).unwrap_or(now),
        })
        .collect();
    if !updates.is_empty() {
        let guard = Guard {
            gid: global.gid.clone(),
            owner: OPERATOR_OWNER.to_owned(),
            status: saved_status,
        };
        store.update_branches(&guard, &updates, now).await?;
    }
    if global.status != saved_status {
        let mut change = StatusChange::new(&global.gid, saved_status, global.status, now);
        change.owner = Some(OPERATOR_OWNER.to_owned());
        change.rollback_reason = Some(global.rollback_reason.clone()).filter(|r| !r.is_empty());
        store.change_status(&change).await?;
    }
    Ok(())
}
