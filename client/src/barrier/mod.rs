//! DTM's sub-transaction barrier: every branch call may arrive twice, a compensation may arrive
//! before (or without) its action, and a late action must not run after its compensation.
//!
//! Rows go to DTM's table `dtm_barrier.barrier` (SQL) or DTM's keys (Redis), with DTM's values,
//! so a service using this barrier and one using DTM's Go barrier can share a database.

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub mod sql;

#[cfg(feature = "redis")]
pub mod redis;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::branch::BranchParams;
use crate::error::{Error, Result};

/// What the barrier decided for one call.
///
/// ```
/// use kubetx_client::barrier::{Decision, decide};
/// assert_eq!(decide("action", 0, 1).unwrap(), Decision::Run);
/// assert_eq!(decide("action", 0, 0).unwrap(), Decision::Skip); // duplicate, or after its compensation
/// assert_eq!(decide("compensate", 1, 1).unwrap(), Decision::Skip); // null compensation
/// assert!(decide("msg", 0, 0).is_err()); // the back-check decided first
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// First time: run the business logic.
    Run,
    /// A repeated request, a null compensation or a late (hanging) action: do nothing, succeed.
    Skip,
}

/// DTM's rules, given how many rows the two inserts added (the origin op's row and this op's).
///
/// ```
/// assert!(kubetx_client::barrier::decide("cancel", 1, 1).is_ok());
/// ```
pub fn decide(op: &str, origin_inserted: u64, current_inserted: u64) -> Result<Decision> {
    if op == "msg" && current_inserted == 0 {
        return Err(Error::Duplicated);
    }
    if origin_op(op).is_some() && origin_inserted > 0 {
        return Ok(Decision::Skip);
    }
    if current_inserted == 0 {
        return Ok(Decision::Skip);
    }
    Ok(Decision::Run)
}

/// The op a compensating op undoes: cancel undoes try, compensate and rollback undo action.
///
/// ```
/// assert_eq!(kubetx_client::barrier::origin_op("cancel"), Some("try"));
/// assert_eq!(kubetx_client::barrier::origin_op("action"), None);
/// ```
pub fn origin_op(op: &str) -> Option<&'static str> {
    match op {
        "cancel" => Some("try"),
        "compensate" | "rollback" => Some("action"),
        _ => None,
    }
}

/// One branch call's barrier. Make a fresh one per incoming request: each use inside the same
/// request takes the next barrier id ("01", "02", ...), and a retried request starts at "01"
/// again, which is how it is recognised.
///
/// ```
/// use kubetx_client::{BranchParams, barrier::BranchBarrier};
/// let p = BranchParams::from_query("gid=g&trans_type=saga&branch_id=01&op=action").unwrap();
/// let barrier = BranchBarrier::from_params(&p).unwrap();
/// assert_eq!(barrier.gid(), "g");
/// ```
#[derive(Debug)]
pub struct BranchBarrier {
    params: BranchParams,
    barrier_id: AtomicU32,
}

impl BranchBarrier {
    /// A barrier for the branch call described by `params` (all four parameters required).
    ///
    /// ```
    /// assert!(kubetx_client::barrier::BranchBarrier::from_params(&Default::default()).is_err());
    /// ```
    pub fn from_params(params: &BranchParams) -> Result<Self> {
        params.check()?;
        Ok(BranchBarrier {
            params: params.clone(),
            barrier_id: AtomicU32::new(0),
        })
    }

    /// A barrier from its four parts.
    ///
    /// ```
    /// let b = kubetx_client::barrier::BranchBarrier::new("msg", "g", "00", "msg").unwrap();
    /// assert_eq!(b.op(), "msg");
    /// ```
    pub fn new(trans_type: &str, gid: &str, branch_id: &str, op: &str) -> Result<Self> {
        Self::from_params(&BranchParams {
            gid: gid.to_owned(),
            trans_type: trans_type.to_owned(),
            branch_id: branch_id.to_owned(),
            op: op.to_owned(),
            ..BranchParams::default()
        })
    }

    /// The global transaction id.
    ///
    /// ```
    /// # let b = kubetx_client::barrier::BranchBarrier::new("saga", "g", "01", "action").unwrap();
    /// assert_eq!(b.gid(), "g");
    /// ```
    pub fn gid(&self) -> &str {
        &self.params.gid
    }

    /// The op of the call.
    ///
    /// ```
    /// # let b = kubetx_client::barrier::BranchBarrier::new("saga", "g", "01", "action").unwrap();
    /// assert_eq!(b.op(), "action");
    /// ```
    pub fn op(&self) -> &str {
        &self.params.op
    }

    /// The branch parameters.
    ///
    /// ```
    /// # let b = kubetx_client::barrier::BranchBarrier::new("saga", "g", "01", "action").unwrap();
    /// assert_eq!(b.params().branch_id, "01");
    /// ```
    pub fn params(&self) -> &BranchParams {
        &self.params
    }

    /// Takes the next barrier id of this request: "01" first (for barriers on other stores).
    ///
    /// ```
    /// # let b = kubetx_client::barrier::BranchBarrier::new("saga", "g", "01", "action").unwrap();
    /// assert_eq!(b.next_barrier_id(), "01");
    /// assert_eq!(b.next_barrier_id(), "02");
    /// ```
    pub fn next_barrier_id(&self) -> String {
        format!("{:02}", self.barrier_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// The row one barrier insert writes (DTM's columns, DTM's values).
///
/// ```
/// let row = kubetx_client::barrier::BarrierRow {
///     trans_type: "saga".into(), gid: "g".into(), branch_id: "01".into(),
///     op: "action".into(), barrier_id: "01".into(), reason: "compensate".into(),
/// };
/// assert_eq!(row.reason, "compensate"); // written by a compensation that came first
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierRow {
    /// Transaction type.
    pub trans_type: String,
    /// Global transaction id.
    pub gid: String,
    /// Branch id.
    pub branch_id: String,
    /// The op the row stands for.
    pub op: String,
    /// "01", "02", ... within one request.
    pub barrier_id: String,
    /// The op of the call that inserted the row.
    pub reason: String,
}
