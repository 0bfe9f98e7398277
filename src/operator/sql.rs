//! With a SQL store configured, the branch detail of each resource lives in SQL (the same tables
//! the DTM API uses, so `/api/dtmsvr/query?gid=<status.gid>` shows it) and the resource's status
//! keeps a summary: fewer and smaller API writes, and no status near etcd's object size limit.
//!
//! Each leader writes under its own identity (its pod name) with a lease that never expires, so
//! the DTM server's scheduler sharing the database never claims these transactions, and a new
//! leader takes each one over before writing: the store then refuses the writes a previous
//! leader makes from a stale view.

use crate::engine::BranchUpdate;
use crate::model::{Branch, GlobalTrans, Millis, TransStatus};
use crate::store::{Guard, Lease, StatusChange, Store, StoreError};

/// A lease expiry that never comes.
const NEVER: Millis = i64::MAX / 4;

/// What SQL holds of a transaction: its status and the leader that wrote it last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Global status.
    pub status: TransStatus,
    /// Identity of the replica whose writes the store accepts.
    pub owner: String,
}

/// Overlays the branch statuses recorded in SQL on `branches`. Returns what SQL holds, `None`
/// when the transaction was never saved.
pub async fn load(store: &dyn Store, gid: &str, branches: &mut [Branch]) -> Result<Option<Saved>, StoreError> {
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
    Ok(Some(Saved {
        status: global.status,
        owner: global.owner,
    }))
}

/// Records a pass under `identity`: the whole transaction the first time, then the branches that
/// changed and the status. `global`'s header values must already be replaced by their sources
/// (values are resolved from the resource at every pass and never written to SQL). `loaded` are the rows as they were before the pass. A new leader first
/// takes the transaction over from the previous one, whose writes the store refuses from then on.
/// False when another replica wrote since this pass read the transaction: nothing was recorded.
pub async fn save(
    store: &dyn Store,
    identity: &str,
    saved: Option<Saved>,
    global: &GlobalTrans,
    branches: &[Branch],
    loaded: &[Branch],
    now: Millis,
) -> Result<bool, StoreError> {
    let Some(Saved {
        status: saved_status,
        owner,
    }) = saved
    else {
        let mut row = global.clone();
        row.owner = identity.to_owned();
        row.next_cron_time = NEVER;
        return store.create(&row, branches).await;
    };
    if owner != identity
        && !saved_status.is_finished()
        && !take_over(store, identity, &global.gid, saved_status, now).await?
    {
        return Ok(false);
    }
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
            owner: identity.to_owned(),
            status: saved_status,
        };
        if !store.update_branches(&guard, &updates, now).await? {
            return Ok(false);
        }
    }
    if global.status != saved_status {
        let mut change = StatusChange::new(&global.gid, saved_status, global.status, now);
        change.owner = Some(identity.to_owned());
        change.rollback_reason = Some(global.rollback_reason.clone()).filter(|r| !r.is_empty());
        return store.change_status(&change).await;
    }
    Ok(true)
}

/// Makes `identity` the owner, conditional on the status this pass started from.
async fn take_over(
    store: &dyn Store,
    identity: &str,
    gid: &str,
    status: TransStatus,
    now: Millis,
) -> Result<bool, StoreError> {
    let mut change = StatusChange::new(gid, status, status, now);
    change.lease = Some(Lease {
        owner: identity.to_owned(),
        until: NEVER,
    });
    store.change_status(&change).await
}
