//! Per-transaction options, as DTM's SDKs send them.

use std::collections::BTreeMap;

use serde::Serialize;

/// Options of one global transaction; serialised flat into its JSON body.
///
/// ```
/// use kubetx_client::TransOptions;
/// let o = TransOptions { wait_result: true, timeout_to_fail: 60, ..Default::default() };
/// let json = serde_json::to_value(&o).unwrap();
/// assert_eq!(json["wait_result"], true);
/// assert!(json.get("retry_interval").is_none());
/// ```
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TransOptions {
    /// Process before answering, and answer the outcome.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub wait_result: bool,
    /// Seconds after which an unfinished transaction fails (rolls back).
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_to_fail: i64,
    /// Base retry interval, seconds.
    #[serde(skip_serializing_if = "is_zero")]
    pub retry_interval: i64,
    /// Timeout of each branch call, seconds.
    #[serde(skip_serializing_if = "is_zero")]
    pub request_timeout: i64,
    /// Headers sent on every branch call.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub branch_headers: BTreeMap<String, String>,
    /// Saga: in-pass retries of a branch before rolling back.
    #[serde(skip_serializing_if = "is_zero")]
    pub retry_limit: i64,
    /// Msg: run the steps concurrently.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub concurrent: bool,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Builder methods for the options, on every transaction type.
///
/// ```
/// use kubetx_client::{Dtm, Saga, WithOptions};
/// let dtm = Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
/// let saga = Saga::new(&dtm, "gid-1").wait_result(true).retry_interval(15).branch_header("x-tenant", "a");
/// assert_eq!(saga.options().retry_interval, 15);
/// ```
pub trait WithOptions: Sized {
    /// The options being built.
    fn options_mut(&mut self) -> &mut TransOptions;

    /// The options as they are.
    fn options(&self) -> &TransOptions;

    /// Wait for the outcome when submitting.
    fn wait_result(mut self, wait: bool) -> Self {
        self.options_mut().wait_result = wait;
        self
    }

    /// Fail (roll back) after this many seconds unfinished.
    fn timeout_to_fail(mut self, seconds: i64) -> Self {
        self.options_mut().timeout_to_fail = seconds;
        self
    }

    /// Base retry interval in seconds.
    fn retry_interval(mut self, seconds: i64) -> Self {
        self.options_mut().retry_interval = seconds;
        self
    }

    /// Timeout of each branch call in seconds.
    fn request_timeout(mut self, seconds: i64) -> Self {
        self.options_mut().request_timeout = seconds;
        self
    }

    /// A header sent on every branch call.
    fn branch_header(mut self, name: &str, value: &str) -> Self {
        self.options_mut()
            .branch_headers
            .insert(name.to_owned(), value.to_owned());
        self
    }

    /// Saga: retries of a branch within a pass before rolling back.
    fn retry_limit(mut self, limit: i64) -> Self {
        self.options_mut().retry_limit = limit;
        self
    }

    /// Replaces every option at once.
    fn with_options(mut self, options: TransOptions) -> Self {
        *self.options_mut() = options;
        self
    }
}

macro_rules! impl_with_options {
    ($($t:ty),*) => {$(
        impl $crate::options::WithOptions for $t {
            fn options_mut(&mut self) -> &mut $crate::options::TransOptions {
                &mut self.base.options
            }
            fn options(&self) -> &$crate::options::TransOptions {
                &self.base.options
            }
        }
    )*};
}
pub(crate) use impl_with_options;
