//! XA: the application runs a global transaction whose branches are resource managers that
//! prepare a local database transaction; the coordinator commits or rolls back all of them.
//!
//! ```no_run
//! # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
//! dtm.xa_global_transaction("gid-1", |xa| async move {
//!     xa.call_branch(&30, "http://bank/api/xa/TransOut").await?;
//!     Ok(())
//! }).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;

use crate::base::{BranchIds, TransBase, check_url, payload};
use crate::branch::call_branch;
use crate::error::Result;
use crate::options::impl_with_options;
use crate::transport::Dtm;

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod rm;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use rm::{ResourceManager, XaConnection};

/// An XA global transaction in progress, handed to the closure of [`Dtm::xa_global_transaction`].
///
/// ```no_run
/// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
/// dtm.xa_global_transaction(&dtm.new_gid().await?, |xa| async move {
///     xa.call_branch(&serde_json::json!({"amount": 30}), "http://bank-a/xa/TransOut").await?;
///     xa.call_branch(&serde_json::json!({"amount": 30}), "http://bank-b/xa/TransIn").await?;
///     Ok(())
/// }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Xa {
    inner: Arc<(TransBase, BranchIds)>,
}

/// Options of an XA transaction before it starts.
///
/// ```
/// use kubetx_client::{Dtm, XaBuilder, WithOptions};
/// let dtm = Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
/// let b = XaBuilder::new(&dtm, "g").wait_result(true);
/// assert!(b.options().wait_result);
/// ```
#[derive(Debug)]
pub struct XaBuilder {
    pub(crate) base: TransBase,
}

impl_with_options!(XaBuilder);

impl XaBuilder {
    /// An XA transaction with this gid, not started yet.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let b = kubetx_client::XaBuilder::new(&dtm, "g");
    /// ```
    pub fn new(dtm: &Dtm, gid: &str) -> Self {
        XaBuilder {
            base: TransBase::new(dtm, gid, "xa"),
        }
    }

    /// Prepares, runs `body`, then submits (phase 2 commit) on `Ok` or aborts (rollback).
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// kubetx_client::XaBuilder::new(&dtm, "g").run(|xa| async move { Ok(()) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn run<T, F, Fut>(self, body: F) -> Result<T>
    where
        F: FnOnce(Xa) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.base.send("prepare").await?;
        let base = self.base.clone();
        let xa = Xa {
            inner: Arc::new((self.base, BranchIds::new(""))),
        };
        base.submit_or_abort(body(xa).await).await
    }
}

impl Dtm {
    /// Runs an XA global transaction with default options (see [`XaBuilder`]).
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// dtm.xa_global_transaction("g", |xa| async move { Ok(()) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn xa_global_transaction<T, F, Fut>(&self, gid: &str, body: F) -> Result<T>
    where
        F: FnOnce(Xa) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        XaBuilder::new(self, gid).run(body).await
    }
}

impl Xa {
    /// The gid.
    ///
    /// ```no_run
    /// # fn f(xa: kubetx_client::Xa) { println!("{}", xa.gid()); }
    /// ```
    pub fn gid(&self) -> &str {
        &self.inner.0.gid
    }

    /// Calls a resource manager's branch URL (it is also its phase-2 URL) with `body`.
    ///
    /// ```no_run
    /// # async fn run(xa: kubetx_client::Xa) -> kubetx_client::Result<()> {
    /// xa.call_branch(&30, "http://bank/xa/TransOut").await?;
    /// # Ok(()) }
    /// ```
    pub async fn call_branch(&self, body: &impl Serialize, url: &str) -> Result<Vec<u8>> {
        check_url(url, false)?;
        let (base, ids) = &*self.inner;
        let query = [
            ("dtm", base.dtm.url().to_string()),
            ("gid", base.gid.clone()),
            ("trans_type", "xa".to_owned()),
            ("branch_id", ids.next()?),
            ("op", "action".to_owned()),
            ("phase2_url", url.to_owned()),
        ];
        let data = payload(body)?.into_bytes();
        call_branch(base.dtm.http(), url, &query, &base.options.branch_headers, Some(data)).await
    }
}
