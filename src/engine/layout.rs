//! Branch rows each mode creates, in the order DTM stores them (positions matter).

use serde::{Deserialize, Deserializer};

use crate::model::{Branch, Millis, branch_id_for, op};

pub use super::msg::MsgCustom;
pub use super::saga::SagaOrders;
pub use super::workflow::WorkflowCustom;

/// Deserializes JSON `null` as the type's default (DTM clients send nulls for empty fields).
pub fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// One saga step as submitted: action URL, compensation URL and payload.
pub struct SagaStep<'a> {
    /// Forward endpoint.
    pub action: &'a str,
    /// Compensation endpoint.
    pub compensate: &'a str,
    /// Body of both calls.
    pub payload: &'a [u8],
}

/// Saga rows: per step `compensate` then `action`, branch ids "01", "02", ...
pub fn saga_branches(gid: &str, steps: &[SagaStep<'_>], now: Millis) -> Vec<Branch> {
    steps
        .iter()
        .enumerate()
        .flat_map(|(index, step)| {
            let branch_id = branch_id_for(index);
            [
                Branch::new(
                    gid,
                    &branch_id,
                    op::COMPENSATE,
                    step.compensate,
                    step.payload.to_vec(),
                    now,
                ),
                Branch::new(gid, &branch_id, op::ACTION, step.action, step.payload.to_vec(), now),
            ]
        })
        .collect()
}

/// Where one msg step goes once topics are resolved.
pub enum MsgTarget<'a> {
    /// A plain endpoint.
    Url {
        /// Endpoint.
        url: &'a str,
        /// Body.
        payload: &'a [u8],
    },
    /// A topic's subscribers, in subscription order.
    Topic {
        /// Subscriber endpoints.
        subscribers: Vec<String>,
        /// Body.
        payload: &'a [u8],
    },
}

/// Msg rows: one `action` per URL step ("01"), one per topic subscriber ("01-01", "01-02"; or
/// just "01" for a single subscriber).
pub fn msg_branches(gid: &str, targets: &[MsgTarget<'_>], now: Millis) -> Vec<Branch> {
    let mut rows = Vec::new();
    for (index, target) in targets.iter().enumerate() {
        let branch_id = branch_id_for(index);
        match target {
            MsgTarget::Url { url, payload } => {
                rows.push(Branch::new(gid, &branch_id, op::ACTION, url, payload.to_vec(), now))
            }
            MsgTarget::Topic { subscribers, payload } if subscribers.len() == 1 => rows.push(Branch::new(
                gid,
                &branch_id,
                op::ACTION,
                &subscribers[0],
                payload.to_vec(),
                now,
            )),
            MsgTarget::Topic { subscribers, payload } => {
                for (sub, url) in subscribers.iter().enumerate() {
                    let sub_id = format!("{branch_id}-{}", branch_id_for(sub));
                    rows.push(Branch::new(gid, &sub_id, op::ACTION, url, payload.to_vec(), now));
                }
            }
        }
    }
    rows
}

/// TCC rows of one registered branch: `cancel` then `confirm`.
pub fn tcc_branches(gid: &str, branch_id: &str, confirm: &str, cancel: &str, data: &[u8], now: Millis) -> Vec<Branch> {
    vec![
        Branch::new(gid, branch_id, op::CANCEL, cancel, data.to_vec(), now),
        Branch::new(gid, branch_id, op::CONFIRM, confirm, data.to_vec(), now),
    ]
}

/// Rows of one branch of a `Tcc` resource, whose tries the controller runs: `try`, `cancel`,
/// `confirm`.
pub fn tcc_resource_branches(
    gid: &str,
    branch_id: &str,
    endpoints: [&str; 3],
    data: &[u8],
    now: Millis,
) -> Vec<Branch> {
    let [try_url, confirm, cancel] = endpoints;
    vec![
        Branch::new(gid, branch_id, op::TRY, try_url, data.to_vec(), now),
        Branch::new(gid, branch_id, op::CANCEL, cancel, data.to_vec(), now),
        Branch::new(gid, branch_id, op::CONFIRM, confirm, data.to_vec(), now),
    ]
}

/// XA rows of one registered branch: `rollback` then `commit`, both to the phase-2 URL.
pub fn xa_branches(gid: &str, branch_id: &str, url: &str, data: &[u8], now: Millis) -> Vec<Branch> {
    vec![
        Branch::new(gid, branch_id, op::ROLLBACK, url, data.to_vec(), now),
        Branch::new(gid, branch_id, op::COMMIT, url, data.to_vec(), now),
    ]
}
