//! TCC: a global transaction closure registers branches and calls their try; the coordinator
//! confirms them all, or cancels them all.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;

use crate::base::{BranchIds, TransBase, check_url, payload};
use crate::branch::call_branch;
use crate::error::{Error, Result};
use crate::options::{TransOptions, impl_with_options};
use crate::transport::Dtm;

/// A TCC global transaction in progress, handed to the closure of [`Dtm::tcc_global_transaction`].
/// Cheap to clone.
///
/// ```no_run
/// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
/// let body = serde_json::json!({"amount": 30});
/// dtm.tcc_global_transaction(&dtm.new_gid().await?, |tcc| async move {
///     tcc.call_branch(&body, "http://bank/TransOutTry", "http://bank/TransOutConfirm", "http://bank/TransOutCancel").await?;
///     tcc.call_branch(&body, "http://bank/TransInTry", "http://bank/TransInConfirm", "http://bank/TransInCancel").await?;
///     Ok(())
/// }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Tcc {
    inner: Arc<TccInner>,
}

#[derive(Debug)]
struct TccInner {
    base: TransBase,
    ids: BranchIds,
}

/// Options of a TCC transaction before it starts.
///
/// ```
/// use kubetx_client::{Dtm, TccBuilder, WithOptions};
/// let dtm = Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
/// let builder = TccBuilder::new(&dtm, "g").timeout_to_fail(30);
/// assert_eq!(builder.options().timeout_to_fail, 30);
/// ```
#[derive(Debug)]
pub struct TccBuilder {
    pub(crate) base: TransBase,
}

impl_with_options!(TccBuilder);

impl TccBuilder {
    /// A TCC transaction with this gid, not started yet.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let b = kubetx_client::TccBuilder::new(&dtm, "g");
    /// ```
    pub fn new(dtm: &Dtm, gid: &str) -> Self {
        TccBuilder {
            base: TransBase::new(dtm, gid, "tcc"),
        }
    }

    /// Prepares the transaction, runs `body`, then submits (confirm every branch) when it
    /// returned `Ok`, or aborts (cancel every branch) with its error as the rollback reason.
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// use kubetx_client::{TccBuilder, WithOptions};
    /// TccBuilder::new(&dtm, "g").wait_result(true).run(|tcc| async move { Ok(()) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn run<T, F, Fut>(self, body: F) -> Result<T>
    where
        F: FnOnce(Tcc) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.base.send("prepare").await?;
        let tcc = Tcc {
            inner: Arc::new(TccInner {
                base: self.base,
                ids: BranchIds::new(""),
            }),
        };
        let base = tcc.inner.base.clone();
        base.submit_or_abort(body(tcc).await).await
    }
}

impl Dtm {
    /// Runs a TCC global transaction with default options (see [`TccBuilder`]).
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// dtm.tcc_global_transaction("g", |tcc| async move { Ok(()) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn tcc_global_transaction<T, F, Fut>(&self, gid: &str, body: F) -> Result<T>
    where
        F: FnOnce(Tcc) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        TccBuilder::new(self, gid).run(body).await
    }
}

impl Tcc {
    /// The gid.
    ///
    /// ```no_run
    /// # fn f(tcc: kubetx_client::Tcc) { println!("{}", tcc.gid()); }
    /// ```
    pub fn gid(&self) -> &str {
        &self.inner.base.gid
    }

    /// The options this transaction was started with.
    ///
    /// ```no_run
    /// # fn f(tcc: kubetx_client::Tcc) { let _ = tcc.options().wait_result; }
    /// ```
    pub fn options(&self) -> &TransOptions {
        &self.inner.base.options
    }

    /// Registers a branch (its confirm and cancel URLs, `body` as their payload), then calls
    /// its try URL with `body`; returns try's reply body.
    ///
    /// ```no_run
    /// # async fn run(tcc: kubetx_client::Tcc) -> kubetx_client::Result<()> {
    /// tcc.call_branch(&30, "http://bank/Try", "http://bank/Confirm", "http://bank/Cancel").await?;
    /// # Ok(()) }
    /// ```
    pub async fn call_branch(
        &self,
        body: &impl Serialize,
        try_url: &str,
        confirm_url: &str,
        cancel_url: &str,
    ) -> Result<Vec<u8>> {
        for url in [try_url, confirm_url, cancel_url] {
            check_url(url, false)?;
        }
        let data = payload(body)?;
        let branch_id = self.inner.ids.next()?;
        let base = &self.inner.base;
        let register = serde_json::json!({
            "gid": base.gid,
            "trans_type": "tcc",
            "branch_id": branch_id,
            "data": data,
            "confirm": confirm_url,
            "cancel": cancel_url,
        });
        base.dtm.call("registerBranch", &register).await?;
        let query = [
            ("dtm", base.dtm.url().to_string()),
            ("gid", base.gid.clone()),
            ("trans_type", "tcc".to_owned()),
            ("branch_id", branch_id),
            ("op", "try".to_owned()),
        ];
        let reply = call_branch(
            base.dtm.http(),
            try_url,
            &query,
            &base.options.branch_headers,
            Some(data.into_bytes()),
        )
        .await;
        reply.map_err(|e| match e {
            Error::Failure(m) => Error::Failure(format!("try {try_url}: {m}")),
            other => other,
        })
    }
}
