//! What `/query` answers: the global transaction and its branch rows.

use serde::{Deserialize, Deserializer};

/// The reply of `GET /query?gid=`.
///
/// ```
/// let q: kubetx_client::QueryResult =
///     serde_json::from_str(r#"{"transaction":null,"branches":[]}"#).unwrap();
/// assert!(q.transaction.is_none());
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct QueryResult {
    /// The global transaction, `None` for an unknown gid.
    pub transaction: Option<TransGlobal>,
    /// Branch rows in creation order.
    #[serde(deserialize_with = "null_default")]
    pub branches: Vec<BranchRow>,
}

/// A global transaction as the server reports it (the fields the SDK uses; others ignored).
///
/// ```
/// let t: kubetx_client::TransGlobal =
///     serde_json::from_str(r#"{"gid":"g","trans_type":"saga","status":"succeed"}"#).unwrap();
/// assert_eq!(t.status, "succeed");
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TransGlobal {
    /// Global transaction id.
    #[serde(deserialize_with = "null_default")]
    pub gid: String,
    /// saga, msg, tcc, xa or workflow.
    #[serde(deserialize_with = "null_default")]
    pub trans_type: String,
    /// prepared, submitted, aborting, succeed or failed.
    #[serde(deserialize_with = "null_default")]
    pub status: String,
    /// Why it rolled back, when it did.
    #[serde(deserialize_with = "null_default")]
    pub rollback_reason: String,
    /// A workflow's result (base64).
    #[serde(deserialize_with = "null_default")]
    pub result: String,
    /// The workflow resume URL, or the msg back-check URL.
    #[serde(deserialize_with = "null_default")]
    pub query_prepared: String,
    /// Mode-specific data (workflow: name and input).
    #[serde(deserialize_with = "null_default")]
    pub custom_data: String,
}

/// One branch operation row.
///
/// ```
/// let b: kubetx_client::BranchRow = serde_json::from_str(
///     r#"{"branch_id":"01","op":"action","status":"succeed","url":"http://x","bin_data":"e30="}"#,
/// ).unwrap();
/// assert_eq!(b.op, "action");
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct BranchRow {
    /// Branch id ("01", "02", ...).
    #[serde(deserialize_with = "null_default")]
    pub branch_id: String,
    /// action, compensate, try, confirm, cancel, commit or rollback.
    #[serde(deserialize_with = "null_default")]
    pub op: String,
    /// prepared, succeed or failed.
    #[serde(deserialize_with = "null_default")]
    pub status: String,
    /// The URL the server calls.
    #[serde(deserialize_with = "null_default")]
    pub url: String,
    /// The payload, base64.
    #[serde(deserialize_with = "null_default")]
    pub bin_data: String,
}

/// DTM's JSON may carry `null` where a value is expected: read it as the default.
fn null_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}
