//! The one error type of the SDK, shaped by DTM's three outcomes of a call.

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
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Classifies a reply the way DTM does, in this order: 425 or `ONGOING` in the body is ongoing;
/// 409 or `FAILURE` in the body is a failure; any other status than 200 is unknown.
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
    // The words are searched in the whole body; the error keeps a bounded excerpt.
    let text = || full.chars().take(1024).collect::<String>();
    if status == 425 || full.contains("ONGOING") {
        Err(Error::Ongoing(text()))
    } else if status == 409 || full.contains("FAILURE") {
        Err(Error::Failure(text()))
    } else if status != 200 {
        Err(Error::Unknown(format!("status {status}: {}", text())))
    } else {
        Ok(())
    }
}
