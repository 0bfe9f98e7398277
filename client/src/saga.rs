//! Saga: steps with compensations, run in order (or as a DAG when concurrent).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::base::{TransBase, check_url, payload};
use crate::error::{Error, Result};
use crate::options::impl_with_options;
use crate::transport::Dtm;

/// A saga under construction; [`Saga::submit`] hands it to the coordinator.
///
/// ```no_run
/// # async fn run() -> kubetx_client::Result<()> {
/// use kubetx_client::{Dtm, Saga, WithOptions};
/// let dtm = Dtm::new("http://127.0.0.1:36789/api/dtmsvr")?;
/// let gid = dtm.new_gid().await?;
/// Saga::new(&dtm, &gid)
///     .add("http://bank/TransOut", "http://bank/TransOutRevert", &serde_json::json!({"amount": 30}))
///     .add("http://bank/TransIn", "http://bank/TransInRevert", &serde_json::json!({"amount": 30}))
///     .wait_result(true)
///     .submit()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Saga {
    pub(crate) base: TransBase,
    orders: BTreeMap<usize, Vec<usize>>,
    concurrent: bool,
    invalid: Option<String>,
}

impl_with_options!(Saga);

impl Saga {
    /// A new saga with this gid.
    ///
    /// ```
    /// let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let saga = kubetx_client::Saga::new(&dtm, "gid-1");
    /// assert_eq!(saga.gid(), "gid-1");
    /// ```
    pub fn new(dtm: &Dtm, gid: &str) -> Self {
        Saga {
            base: TransBase::new(dtm, gid, "saga"),
            orders: BTreeMap::new(),
            concurrent: false,
            invalid: None,
        }
    }

    /// The gid.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// assert_eq!(kubetx_client::Saga::new(&dtm, "g").gid(), "g");
    /// ```
    pub fn gid(&self) -> &str {
        &self.base.gid
    }

    /// Adds a step: `action` forward, `compensate` to undo it (may be empty), `body` as JSON.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let saga = kubetx_client::Saga::new(&dtm, "g").add("http://a/out", "http://a/revert", &30);
    /// ```
    pub fn add(mut self, action: &str, compensate: &str, body: &impl Serialize) -> Self {
        let step = BTreeMap::from([
            ("action".to_owned(), action.to_owned()),
            ("compensate".to_owned(), compensate.to_owned()),
        ]);
        match payload(body) {
            Ok(p) => self.base.payloads.push(p),
            Err(e) => self.invalid = Some(e.to_string()),
        }
        self.base.steps.push(step);
        self
    }

    /// Runs the steps concurrently, constrained by [`Saga::add_branch_order`].
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let saga = kubetx_client::Saga::new(&dtm, "g").concurrent();
    /// ```
    pub fn concurrent(mut self) -> Self {
        self.concurrent = true;
        self
    }

    /// Step `step` (0-based) runs only after every step of `after` succeeded.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let saga = kubetx_client::Saga::new(&dtm, "g").concurrent().add_branch_order(2, &[0, 1]);
    /// ```
    pub fn add_branch_order(mut self, step: usize, after: &[usize]) -> Self {
        self.orders.entry(step).or_default().extend_from_slice(after);
        self
    }

    /// Submits the saga. With `wait_result`, a rollback answers [`Error::Failure`].
    ///
    /// ```no_run
    /// # async fn run(saga: kubetx_client::Saga) -> kubetx_client::Result<()> {
    /// saga.submit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn submit(mut self) -> Result<()> {
        if let Some(e) = self.invalid.take() {
            return Err(Error::Invalid(e));
        }
        for step in &self.base.steps {
            for url in step.values() {
                check_url(url, true)?;
            }
        }
        if self.concurrent {
            let orders: HashMap<String, &Vec<usize>> = self.orders.iter().map(|(k, v)| (k.to_string(), v)).collect();
            self.base.custom_data = serde_json::json!({"concurrent": true, "orders": orders}).to_string();
        }
        self.base.send("submit").await
    }
}
