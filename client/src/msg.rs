//! 2-phase message: prepare, run the local transaction, submit; the coordinator back-checks a
//! msg left prepared.

use std::collections::BTreeMap;
use std::future::Future;

use serde::Serialize;

use crate::barrier::BranchBarrier;
use crate::base::{TransBase, check_url, payload};
use crate::branch::call_branch;
use crate::error::{Error, Result};
use crate::options::impl_with_options;
use crate::transport::Dtm;

/// A 2-phase message.
///
/// ```no_run
/// # async fn run() -> kubetx_client::Result<()> {
/// use kubetx_client::{Dtm, Msg};
/// let dtm = Dtm::new("http://127.0.0.1:36789/api/dtmsvr")?;
/// Msg::new(&dtm, &dtm.new_gid().await?)
///     .add("http://bank/TransIn", &serde_json::json!({"amount": 30}))
///     .add_topic("transfers", &serde_json::json!({"amount": 30}))
///     .submit()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Msg {
    pub(crate) base: TransBase,
    delay: u64,
    invalid: Option<String>,
}

impl_with_options!(Msg);

impl Msg {
    /// A new message with this gid.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let msg = kubetx_client::Msg::new(&dtm, "gid-1");
    /// ```
    pub fn new(dtm: &Dtm, gid: &str) -> Self {
        Msg {
            base: TransBase::new(dtm, gid, "msg"),
            delay: 0,
            invalid: None,
        }
    }

    /// Adds a step: `action` receives `body` once the message is submitted.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let msg = kubetx_client::Msg::new(&dtm, "g").add("http://bank/TransIn", &30);
    /// ```
    pub fn add(mut self, action: &str, body: &impl Serialize) -> Self {
        self.base
            .steps
            .push(BTreeMap::from([("action".to_owned(), action.to_owned())]));
        match payload(body) {
            Ok(p) => self.base.payloads.push(p),
            Err(e) => self.invalid = Some(e.to_string()),
        }
        self
    }

    /// Adds a step delivered to every subscriber of `topic`.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let msg = kubetx_client::Msg::new(&dtm, "g").add_topic("orders", &"paid");
    /// ```
    pub fn add_topic(self, topic: &str, body: &impl Serialize) -> Self {
        self.add(&format!("topic://{topic}"), body)
    }

    /// Runs the steps concurrently.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let msg = kubetx_client::Msg::new(&dtm, "g").concurrent();
    /// ```
    pub fn concurrent(mut self) -> Self {
        self.base.options.concurrent = true;
        self
    }

    /// Delivers no earlier than `seconds` after creation.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let msg = kubetx_client::Msg::new(&dtm, "g").delay(10);
    /// ```
    pub fn delay(mut self, seconds: u64) -> Self {
        self.delay = seconds;
        self
    }

    fn ready(&mut self) -> Result<()> {
        if let Some(e) = self.invalid.take() {
            return Err(Error::Invalid(e));
        }
        for step in &self.base.steps {
            for url in step.values() {
                check_url(url, false)?;
            }
        }
        if self.delay > 0 {
            self.base.custom_data = serde_json::json!({"delay": self.delay}).to_string();
        }
        Ok(())
    }

    /// Prepares the message with its back-check URL.
    ///
    /// ```no_run
    /// # async fn run(mut msg: kubetx_client::Msg) -> kubetx_client::Result<()> {
    /// msg.prepare("http://shop/QueryPrepared").await?;
    /// # Ok(()) }
    /// ```
    pub async fn prepare(&mut self, query_prepared: &str) -> Result<()> {
        check_url(query_prepared, false)?;
        self.base.query_prepared = query_prepared.to_owned();
        self.ready()?;
        self.base.send("prepare").await
    }

    /// Submits: the coordinator delivers every step.
    ///
    /// ```no_run
    /// # async fn run(mut msg: kubetx_client::Msg) -> kubetx_client::Result<()> {
    /// msg.submit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn submit(&mut self) -> Result<()> {
        self.ready()?;
        self.base.send("submit").await
    }

    /// Aborts a prepared message.
    ///
    /// ```no_run
    /// # async fn run(msg: kubetx_client::Msg) -> kubetx_client::Result<()> {
    /// msg.abort().await?;
    /// # Ok(()) }
    /// ```
    pub async fn abort(&self) -> Result<()> {
        self.base.dtm.call("abort", &self.base.short()).await.map(drop)
    }

    /// DTM's `DoAndSubmit`: prepares, runs the local transaction `busi` behind the msg barrier
    /// (branch "00", op "msg"), then submits. A [`Error::Failure`] from `busi` aborts; another
    /// error asks the back-check itself and submits or aborts on its answer (or leaves the
    /// decision to the coordinator's back-check). `busi`'s error is returned.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlite")]
    /// # async fn run(msg: kubetx_client::Msg, pool: sqlx::SqlitePool) -> kubetx_client::Result<()> {
    /// msg.do_and_submit("http://shop/QueryPrepared", |barrier| async move {
    ///     barrier.call(&pool, |tx| Box::pin(async move {
    ///         sqlx::query("UPDATE account SET balance = balance - 30").execute(&mut *tx).await?;
    ///         Ok(())
    ///     })).await.map(drop)
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn do_and_submit<F, Fut>(mut self, query_prepared: &str, busi: F) -> Result<()>
    where
        F: FnOnce(BranchBarrier) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let barrier = BranchBarrier::new("msg", &self.base.gid, "00", "msg")?;
        self.prepare(query_prepared).await?;
        let busi_result = busi(barrier).await;
        let decided = match &busi_result {
            Ok(()) => Ok(()),
            Err(e) if e.is_failure() => Err(Error::Failure(e.to_string())),
            Err(_) => self.back_check().await,
        };
        match decided {
            Ok(()) => self.submit().await?,
            Err(e) if e.is_failure() => self.abort().await?,
            // Unknown: the coordinator's own back-check decides later.
            Err(_) => {}
        }
        busi_result
    }

    async fn back_check(&self) -> Result<()> {
        let query = [
            ("dtm", self.base.dtm.url().to_string()),
            ("gid", self.base.gid.clone()),
            ("trans_type", "msg".to_owned()),
            ("branch_id", "00".to_owned()),
            ("op", "msg".to_owned()),
        ];
        let headers = &self.base.options.branch_headers;
        call_branch(self.base.dtm.http(), &self.base.query_prepared, &query, headers, None)
            .await
            .map(drop)
    }
}
