//! What the coordinator tells a branch: `gid`, `trans_type`, `branch_id`, `op`.

use std::collections::HashMap;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The parameters of one branch call, from its query string (HTTP) or its `dtm-*` metadata.
///
/// ```
/// use kubetx_client::BranchParams;
/// let p = BranchParams::from_query("gid=g1&trans_type=saga&branch_id=01&op=action").unwrap();
/// assert_eq!((p.gid.as_str(), p.op.as_str()), ("g1", "action"));
/// assert!(BranchParams::from_query("gid=g1").is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct BranchParams {
    /// Global transaction id.
    pub gid: String,
    /// saga, msg, tcc, xa or workflow.
    pub trans_type: String,
    /// The branch ("01", "02", ...; "00" for a msg back-check or a workflow resume).
    pub branch_id: String,
    /// action, compensate, try, confirm, cancel, commit, rollback, msg, or a workflow's name.
    pub op: String,
    /// The coordinator's URL, when the caller sent it (DTM's SDKs do on try and XA calls).
    pub dtm: String,
    /// XA: the URL of the resource manager's phase-2 handler.
    pub phase2_url: String,
}

impl BranchParams {
    /// Reads the parameters from a URL query string; all four of gid, trans_type, branch_id
    /// and op are required.
    ///
    /// ```
    /// let p = kubetx_client::BranchParams::from_query("gid=a%20b&trans_type=tcc&branch_id=01&op=try").unwrap();
    /// assert_eq!(p.gid, "a b");
    /// ```
    pub fn from_query(query: &str) -> Result<Self> {
        let pairs: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        Self::from_lookup(|name| pairs.get(name).cloned())
    }

    /// Reads the parameters through `get`, which answers one name (`gid`, `trans_type`,
    /// `branch_id`, `op`, `dtm`, `phase2_url`).
    ///
    /// ```
    /// let p = kubetx_client::BranchParams::from_lookup(|n| Some(format!("v-{n}"))).unwrap();
    /// assert_eq!(p.branch_id, "v-branch_id");
    /// ```
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let field = |name: &str| get(name).unwrap_or_default();
        let params = BranchParams {
            gid: field("gid"),
            trans_type: field("trans_type"),
            branch_id: field("branch_id"),
            op: field("op"),
            dtm: field("dtm"),
            phase2_url: field("phase2_url"),
        };
        params.check()?;
        Ok(params)
    }

    /// Fails when one of the four required parameters is empty or too long.
    ///
    /// ```
    /// assert!(kubetx_client::BranchParams::default().check().is_err());
    /// ```
    pub fn check(&self) -> Result<()> {
        for (name, value) in [
            ("gid", &self.gid),
            ("trans_type", &self.trans_type),
            ("branch_id", &self.branch_id),
            ("op", &self.op),
        ] {
            if value.is_empty() {
                return Err(Error::Invalid(format!("missing branch parameter {name}")));
            }
            // The barrier table's columns: gid and branch_id 128, the others 45.
            let max = if matches!(name, "gid" | "branch_id") { 128 } else { 45 };
            if value.len() > max {
                return Err(Error::Invalid(format!(
                    "branch parameter {name} longer than {max} bytes"
                )));
            }
        }
        Ok(())
    }

    /// The query pairs the coordinator sends, for calling a branch the same way.
    ///
    /// ```
    /// let p = kubetx_client::BranchParams::from_query("gid=g&trans_type=saga&branch_id=01&op=action").unwrap();
    /// assert_eq!(p.query_pairs().len(), 4);
    /// ```
    pub fn query_pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("gid", self.gid.clone()),
            ("trans_type", self.trans_type.clone()),
            ("branch_id", self.branch_id.clone()),
            ("op", self.op.clone()),
        ]
    }
}

/// Calls a branch URL with its parameters as DTM does (POST with a JSON body), classifying the
/// reply; returns the reply body.
pub(crate) async fn call_branch(
    http: &reqwest::Client,
    url: &str,
    query: &[(&str, String)],
    headers: &std::collections::BTreeMap<String, String>,
    body: Option<Vec<u8>>,
) -> Result<Vec<u8>> {
    let mut request = match body {
        Some(body) => http
            .post(url::Url::parse(url)?)
            .header("content-type", "application/json")
            .body(body),
        None => http.get(url::Url::parse(url)?),
    };
    request = request.query(query);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let reply = request.send().await?;
    let status = reply.status().as_u16();
    let bytes = reply.bytes().await?;
    crate::error::classify(status, &bytes)?;
    Ok(bytes.to_vec())
}
