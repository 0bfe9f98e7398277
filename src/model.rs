//! Plain data: global transactions, branches, statuses and per-transaction options.
//!
//! Nothing here performs I/O; every other layer builds on these types.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch. Time is always passed in, never read here.
pub type Millis = i64;

/// `at` plus `seconds`, saturating: no duration a client or a resource gives can wrap a time.
pub fn after_seconds(at: Millis, seconds: i64) -> Millis {
    at.saturating_add(seconds.saturating_mul(1000))
}

/// Status of a global transaction (DTM's `trans_global.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransStatus {
    /// Registered but not yet committed by the client (msg, tcc, xa, workflow).
    Prepared,
    /// Committed by the client: the forward phase runs.
    Submitted,
    /// Rolling back: compensations, cancels or rollbacks run.
    Aborting,
    /// Finished: every forward branch succeeded.
    Succeed,
    /// Finished: rolled back, back-check said no, or force-stopped.
    Failed,
}

impl TransStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TransStatus; 5] = [
        TransStatus::Prepared,
        TransStatus::Submitted,
        TransStatus::Aborting,
        TransStatus::Succeed,
        TransStatus::Failed,
    ];

    /// The wire and storage spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TransStatus::Prepared => "prepared",
            TransStatus::Submitted => "submitted",
            TransStatus::Aborting => "aborting",
            TransStatus::Succeed => "succeed",
            TransStatus::Failed => "failed",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// True for `succeed` and `failed`: nothing will ever happen to the transaction again.
    pub fn is_finished(self) -> bool {
        matches!(self, TransStatus::Succeed | TransStatus::Failed)
    }
}

impl fmt::Display for TransStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status of one branch operation row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BranchStatus {
    /// Not done yet, or its outcome is unknown.
    Prepared,
    /// The service answered SUCCESS.
    Succeed,
    /// The service answered FAILURE (saga actions and workflow steps only).
    Failed,
}

impl BranchStatus {
    /// The wire and storage spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BranchStatus::Prepared => "prepared",
            BranchStatus::Succeed => "succeed",
            BranchStatus::Failed => "failed",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(text: &str) -> Option<Self> {
        [BranchStatus::Prepared, BranchStatus::Succeed, BranchStatus::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

impl fmt::Display for BranchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transaction mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransType {
    /// Forward actions with compensations.
    Saga,
    /// Two-phase message: prepared, then delivered to every branch.
    Msg,
    /// Try / confirm / cancel.
    Tcc,
    /// XA two-phase commit driven by the resource managers.
    Xa,
    /// Client-driven workflow; the server stores progress and resumes it.
    Workflow,
}

impl TransType {
    /// The wire and storage spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TransType::Saga => "saga",
            TransType::Msg => "msg",
            TransType::Tcc => "tcc",
            TransType::Xa => "xa",
            TransType::Workflow => "workflow",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(text: &str) -> Option<Self> {
        [
            TransType::Saga,
            TransType::Msg,
            TransType::Tcc,
            TransType::Xa,
            TransType::Workflow,
        ]
        .into_iter()
        .find(|t| t.as_str() == text)
    }
}

impl fmt::Display for TransType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Branch operation names used on the wire (`op` query parameter and stored rows).
pub mod op {
    /// Saga forward step, msg delivery, workflow forward step.
    pub const ACTION: &str = "action";
    /// Saga compensation.
    pub const COMPENSATE: &str = "compensate";
    /// TCC try (called by the client, never stored).
    pub const TRY: &str = "try";
    /// TCC confirm.
    pub const CONFIRM: &str = "confirm";
    /// TCC cancel.
    pub const CANCEL: &str = "cancel";
    /// XA and workflow phase-2 commit.
    pub const COMMIT: &str = "commit";
    /// XA and workflow phase-2 rollback.
    pub const ROLLBACK: &str = "rollback";
    /// Msg back-check (`query_prepared`).
    pub const MSG: &str = "msg";
}

/// Per-transaction options, persisted with the transaction and re-read on every pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransOptions {
    /// Run the first pass before answering the submit.
    #[serde(skip_serializing_if = "is_false")]
    pub wait_result: bool,
    /// Seconds after creation at which the transaction gives up (0: mode default).
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_to_fail: i64,
    /// Base retry interval in seconds (0: server default).
    #[serde(skip_serializing_if = "is_zero")]
    pub retry_interval: i64,
    /// Branch call timeout in seconds (0: server default).
    #[serde(skip_serializing_if = "is_zero")]
    pub request_timeout: i64,
    /// Extra headers sent on every branch call.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub branch_headers: BTreeMap<String, String>,
    /// Msg: deliver to all branches at once.
    pub concurrent: bool,
    /// Saga: immediate re-invocations allowed for an action that errors or is ongoing.
    #[serde(skip_serializing_if = "is_zero")]
    pub retry_limit: i64,
}

/// What replaces a redacted value in answers.
pub const REDACTED: &str = "<redacted>";

/// `text` with the userinfo (`user:password@`) of every URL in it removed: error texts and
/// rollback reasons quote URLs, and a URL's credentials must never be shown or stored in clear.
/// The authority ends where the URL parser ends it (`/`, `\`, `?`, `#`), or at whitespace or a
/// quote; its userinfo is everything up to its last `@`.
pub fn without_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '\\' | '?' | '#' | '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        out.push_str(authority.rsplit_once('@').map_or(authority, |(_, host)| host));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// A global transaction as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalTrans {
    /// Store-assigned sequence number (0 before the first save); orders `/all`.
    pub id: i64,
    /// Globally unique id chosen by the client or by `newGid`.
    pub gid: String,
    /// Mode.
    pub trans_type: TransType,
    /// Current status.
    pub status: TransStatus,
    /// Msg back-check URL; workflow resume URL.
    pub query_prepared: String,
    /// Branch protocol (`http`).
    pub protocol: String,
    /// Mode-specific JSON text (saga orders, msg delay, workflow name and input).
    pub custom_data: String,
    /// Options.
    pub options: TransOptions,
    /// Creation time.
    pub create_time: Millis,
    /// Last write.
    pub update_time: Millis,
    /// When it reached `succeed`.
    pub finish_time: Option<Millis>,
    /// When it reached `failed`.
    pub rollback_time: Option<Millis>,
    /// When the scheduler should next look at it; while `owner` is set, the lease expiry.
    pub next_cron_time: Millis,
    /// Current retry interval in seconds (grows with backoff).
    pub next_cron_interval: i64,
    /// Process holding the lease, empty when parked.
    pub owner: String,
    /// Workflow result (base64 text from the client).
    pub result: String,
    /// Why it rolled back.
    pub rollback_reason: String,
    /// Free-form extension data.
    pub ext_data: String,
}

/// One branch operation row: several rows share a `branch_id` (e.g. action and compensate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    /// Store-assigned sequence number; branches are always read in this order.
    pub id: i64,
    /// The transaction.
    pub gid: String,
    /// Endpoint to call; empty means "nothing to do, counts as success".
    pub url: String,
    /// Request body sent as-is.
    pub bin_data: Vec<u8>,
    /// Branch id shared by the operations of one logical branch ("01", "02", ...).
    pub branch_id: String,
    /// Operation name (see [`op`]).
    pub op: String,
    /// Current status.
    pub status: BranchStatus,
    /// Creation time.
    pub create_time: Millis,
    /// Last write.
    pub update_time: Millis,
    /// When it succeeded.
    pub finish_time: Option<Millis>,
    /// When it failed.
    pub rollback_time: Option<Millis>,
}

impl Branch {
    /// A new `prepared` row.
    pub fn new(gid: &str, branch_id: &str, op: &str, url: &str, bin_data: Vec<u8>, now: Millis) -> Self {
        Branch {
            id: 0,
            gid: gid.to_owned(),
            url: url.to_owned(),
            bin_data,
            branch_id: branch_id.to_owned(),
            op: op.to_owned(),
            status: BranchStatus::Prepared,
            create_time: now,
            update_time: now,
            finish_time: None,
            rollback_time: None,
        }
    }
}

/// Branch id of the n-th (0-based) top-level branch: "01", "02", ...
pub fn branch_id_for(index: usize) -> String {
    format!("{:02}", index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_removed_from_every_url_in_a_text() {
        assert_eq!(
            without_userinfo("url:http://u:p4ss@bank:80/x?a=b@c return failed: see https://t@h/y"),
            "url:http://bank:80/x?a=b@c return failed: see https://h/y"
        );
        assert_eq!(without_userinfo("(http://a:b@c@host)"), "(http://host)");
        assert_eq!(without_userinfo("http://h\\\\@x/"), "http://h\\\\@x/");
        assert_eq!(without_userinfo("no url, a@b"), "no url, a@b");
        assert_eq!(without_userinfo("\"http://k:s@h\" x"), "\"http://h\" x");
    }
}
