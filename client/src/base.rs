//! The JSON body every mode sends to the coordinator, and branch-id generation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::options::TransOptions;
use crate::transport::Dtm;

/// A global transaction's body (DTM's `TransBase`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TransBase {
    #[serde(skip)]
    pub dtm: Dtm,
    pub gid: String,
    pub trans_type: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub custom_data: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub payloads: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub query_prepared: String,
    pub protocol: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rollback_reason: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub req_extra: BTreeMap<String, String>,
    #[serde(flatten)]
    pub options: TransOptions,
}

impl TransBase {
    pub fn new(dtm: &Dtm, gid: &str, trans_type: &'static str) -> Self {
        TransBase {
            dtm: dtm.clone(),
            gid: gid.to_owned(),
            trans_type,
            custom_data: String::new(),
            steps: Vec::new(),
            payloads: Vec::new(),
            query_prepared: String::new(),
            protocol: "http",
            rollback_reason: String::new(),
            req_extra: BTreeMap::new(),
            options: TransOptions::default(),
        }
    }

    /// Sends this body to `route`.
    pub async fn send(&self, route: &str) -> Result<()> {
        if self.gid.is_empty() {
            return Err(Error::Invalid("gid is empty".to_owned()));
        }
        self.dtm.call(route, self).await.map(drop)
    }

    /// Ends a TCC or XA global transaction on what its body returned: submit on success, abort
    /// with the error as the rollback reason otherwise (the body's error is the one returned).
    pub async fn submit_or_abort<T>(mut self, outcome: Result<T>) -> Result<T> {
        match outcome {
            Ok(value) => {
                self.send("submit").await?;
                Ok(value)
            }
            Err(e) => {
                self.rollback_reason = e.to_string().chars().take(1024).collect();
                // The abort's own error matters less than why we aborted.
                let _ = self.dtm.call("abort", &self.short()).await;
                Err(e)
            }
        }
    }

    /// `{gid, trans_type}` plus a rollback reason: what abort and the phase-2 submits need.
    pub fn short(&self) -> serde_json::Value {
        serde_json::json!({
            "gid": self.gid,
            "trans_type": self.trans_type,
            "rollback_reason": self.rollback_reason,
        })
    }
}

/// Branch ids as DTM's SDKs make them: `parent` + "01", "02", ... up to "99".
#[derive(Debug, Default)]
pub(crate) struct BranchIds {
    parent: String,
    next: AtomicU32,
}

impl BranchIds {
    pub fn new(parent: &str) -> Self {
        BranchIds {
            parent: parent.to_owned(),
            next: AtomicU32::new(0),
        }
    }

    pub fn next(&self) -> Result<String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        if n > 99 || self.parent.len() >= 20 {
            return Err(Error::Invalid("branch ids exhausted (99 branches at most)".to_owned()));
        }
        Ok(format!("{}{n:02}", self.parent))
    }
}

/// Serialises a payload as the JSON text DTM stores.
pub(crate) fn payload(body: &impl Serialize) -> Result<String> {
    Ok(serde_json::to_string(body)?)
}

/// Checks a branch URL: http(s) and parseable (empty allowed where DTM allows it).
pub(crate) fn check_url(url: &str, may_be_empty: bool) -> Result<()> {
    if url.is_empty() && may_be_empty {
        return Ok(());
    }
    if url.starts_with("topic://") {
        return Ok(());
    }
    let parsed = url::Url::parse(url)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::Invalid(format!(
            "branch URL must be http(s): {}",
            parsed.scheme()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_ids_count_from_01_and_stop_at_99() {
        let ids = BranchIds::new("");
        assert_eq!(ids.next().unwrap(), "01");
        assert_eq!(ids.next().unwrap(), "02");
        for _ in 3..=99 {
            ids.next().unwrap();
        }
        assert!(ids.next().is_err());
        assert_eq!(BranchIds::new("01").next().unwrap(), "0101");
    }

    #[test]
    fn urls_must_be_http() {
        assert!(check_url("http://a/b", false).is_ok());
        assert!(check_url("", true).is_ok());
        assert!(check_url("", false).is_err());
        assert!(check_url("file:///etc/passwd", false).is_err());
    }
}
