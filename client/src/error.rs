//! The one error type of the SDK, shaped by DTM's three outcomes of a call.
//!
//! ```
//! use kubetx_client::Error;
//! for e in [Error::Failure("x".into()), Error::Ongoing("x".into()), Error::Unknown("x".into())] {
//!     assert_eq!([e.is_failure(), e.is_ongoing(), e.is_unknown()].iter().filter(|b| **b).count(), 1);
//! }
//! ```

/// What went wrong. DTM's protocol distinguishes a definite failure ([`Error::Failure`], which
/// rolls a transaction back), a "not yet" ([`Error::Ongoing`], retried later) and everything
/// else, whose outcome is unknown and which is retried, never compensated.
///
/// ```
/// use kubetx_client::Error;
/// let e = Error::Failure("insufficient balance".into());
/// assert!(e.is_failure());
/// assert!(e.to_string().contains("FAILURE"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A definite failure (HTTP 409, or `FAILURE` in a reply body).
    #[error("FAILURE: {0}")]
    Failure(String),
    /// Not finished yet (HTTP 425, or `ONGOING` in a reply body): try again later.
    #[error("ONGOING: {0}")]
    Ongoing(String),
    /// The outcome is unknown: a transport error, a timeout, any other status.
    #[error("unknown outcome: {0}")]
    Unknown(String),
    /// The barrier saw this request before (msg: the back-check already decided a rollback).
    #[error("DUPLICATED: the request was already handled")]
    Duplicated,
    /// The caller's input is unusable (a bad URL, a missing branch parameter).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A database error from a barrier or an XA resource manager.
    #[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A Redis error from the Redis barrier.
    #[cfg(feature = "redis")]
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl Error {
    /// Whether this is a definite failure.
    ///
    /// ```
    /// assert!(kubetx_client::Error::Failure(String::new()).is_failure());
    /// ```
    pub fn is_failure(&self) -> bool {
        matches!(self, Error::Failure(_))
    }

    /// Whether this says "not finished yet".
    ///
    /// ```
    /// assert!(kubetx_client::Error::Ongoing(String::new()).is_ongoing());
    /// ```
    pub fn is_ongoing(&self) -> bool {
        matches!(self, Error::Ongoing(_))
    }

    /// Whether the outcome is unknown (neither a failure nor ongoing): retry, never compensate.
    ///
    /// ```
    /// assert!(kubetx_client::Error::Unknown("timeout".into()).is_unknown());
    /// ```
    pub fn is_unknown(&self) -> bool {
        !self.is_failure() && !self.is_ongoing()
    }
}

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Self {
        // Without the URL: it may carry userinfo or query values.
        Error::Unknown(e.without_url().to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Invalid(format!("json: {e}"))
    }
}

impl From<url::ParseError> for Error {
    fn from(e: url::ParseError) -> Self {
        Error::Invalid(format!("url: {e}"))
    }
}

/// The SDK's result type.
///
/// ```
/// fn check(amount: i64) -> kubetx_client::Result<()> {
///     if amount < 0 { return Err(kubetx_client::Error::Failure("negative".into())); }
///     Ok(())
/// }
/// assert!(check(-1).unwrap_err().is_failure());
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Classifies a branch's reply the way DTM does, in this order: 425 or `ONGOING` in the body
/// is ongoing; 409 or `FAILURE` in the body is a failure; any other status than 200 is unknown.
///
/// ```
/// use kubetx_client::error::classify;
/// assert!(classify(200, b"{}").is_ok());
/// assert!(classify(409, b"").unwrap_err().is_failure());
/// assert!(classify(200, b"{\"dtm_result\":\"ONGOING\"}").unwrap_err().is_ongoing());
/// assert!(classify(500, b"oops").unwrap_err().is_unknown());
/// ```
pub fn classify(status: u16, body: &[u8]) -> Result<()> {
    let full = String::from_utf8_lossy(body);
    if status == 425 || full.contains("ONGOING") {
        Err(Error::Ongoing(excerpt(body)))
    } else if status == 409 || full.contains("FAILURE") {
        Err(Error::Failure(excerpt(body)))
    } else if status != 200 {
        Err(Error::Unknown(format!("status {status}: {}", excerpt(body))))
    } else {
        Ok(())
    }
}

/// Classifies a reply of the coordinator: by its status, and on a 200 by an explicit
/// `dtm_result` (old servers), never by words inside the data (a query's rollback reason may
/// well say FAILURE).
///
/// ```
/// use kubetx_client::error::classify_coordinator;
/// assert!(classify_coordinator(200, br#"{"transaction":{"rollback_reason":"FAILURE"}}"#).is_ok());
/// assert!(classify_coordinator(200, br#"{"dtm_result":"FAILURE"}"#).unwrap_err().is_failure());
/// assert!(classify_coordinator(425, b"").unwrap_err().is_ongoing());
/// ```
pub fn classify_coordinator(status: u16, body: &[u8]) -> Result<()> {
    let result = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("dtm_result").and_then(|r| r.as_str()).map(str::to_owned));
    match (status, result.as_deref()) {
        (425, _) | (200, Some("ONGOING")) => Err(Error::Ongoing(excerpt(body))),
        (409, _) | (200, Some("FAILURE")) => Err(Error::Failure(excerpt(body))),
        (200, _) => Ok(()),
        _ => Err(Error::Unknown(format!("status {status}: {}", excerpt(body)))),
    }
}

/// The reply's `message` when it is DTM's JSON envelope, else its text; bounded.
fn excerpt(body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned));
    let text = message.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    text.chars().take(1024).collect()
}
