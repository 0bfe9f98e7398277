//! Calls one branch over HTTP and classifies the reply exactly as DTM does.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::engine::Outcome;

/// Longest part of a reply body kept for classification and error messages.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Errors building the HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The TLS or connection-pool setup failed.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// One branch call.
#[derive(Debug, Clone, Copy)]
pub struct BranchCall<'a> {
    /// Endpoint (http or https); empty means immediate success.
    pub url: &'a str,
    /// `gid` query parameter.
    pub gid: &'a str,
    /// `trans_type` query parameter.
    pub trans_type: &'a str,
    /// `branch_id` query parameter.
    pub branch_id: &'a str,
    /// `op` query parameter.
    pub op: &'a str,
    /// Body sent as-is; POST when non-empty (or when `force_post`), GET otherwise.
    pub body: &'a [u8],
    /// XA phase-2 calls are always POST.
    pub force_post: bool,
    /// Extra headers (`branch_headers`).
    pub headers: &'a BTreeMap<String, String>,
    /// Whole-call timeout.
    pub timeout: Duration,
}

/// One pooled keep-alive HTTP client for every branch call.
#[derive(Debug, Clone)]
pub struct Invoker {
    client: reqwest::Client,
}

impl Invoker {
    /// Builds the shared client.
    pub fn new() -> Result<Self, InvokeError> {
        Self::build(None)
    }

    /// A client whose branch calls leave from `source` (a node with several addresses, where
    /// branch services tell replicas apart by address).
    pub fn with_source_address(source: std::net::IpAddr) -> Result<Self, InvokeError> {
        Self::build(Some(source))
    }

    fn build(source: Option<std::net::IpAddr>) -> Result<Self, InvokeError> {
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .local_address(source)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            // Branch calls are HTTP/1, where reqwest's default policy (protocol NACKs of HTTP/2
            // and 3) never retries; without it no request is cloned for a retry that never comes.
            // Retrying is the engine's job, with backoff.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .build()?;
        Ok(Invoker { client })
    }

    /// The underlying client, for other outbound calls (alert webhook).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Calls a branch and classifies the reply.
    pub async fn call(&self, call: BranchCall<'_>) -> Outcome {
        if call.url.is_empty() {
            return Outcome::Success;
        }
        let method = if call.force_post || !call.body.is_empty() {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let mut request = self
            .client
            .request(method, call.url)
            .query(&[
                ("gid", call.gid),
                ("trans_type", call.trans_type),
                ("branch_id", call.branch_id),
                ("op", call.op),
            ])
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(call.timeout);
        // `branch_headers` replace the defaults (a custom content-type is not sent twice).
        if !call.headers.is_empty() {
            let mut headers = reqwest::header::HeaderMap::with_capacity(call.headers.len());
            for (name, value) in call.headers {
                match (
                    reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                    reqwest::header::HeaderValue::from_str(value),
                ) {
                    (Ok(name), Ok(value)) => {
                        headers.insert(name, value);
                    }
                    _ => return Outcome::Error(format!("invalid branch header {name:?}")),
                }
            }
            request = request.headers(headers);
        }
        if !call.body.is_empty() {
            request = request.body(call.body.to_vec());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Outcome::Error(describe(&error)),
        };
        let status = response.status().as_u16();
        match read_limited(response).await {
            Ok(body) => classify(status, &body),
            Err(error) => Outcome::Error(describe(&error)),
        }
    }
}

/// DTM's classification, in its exact order: ONGOING (425 or the word in the body), then FAILURE
/// (409 or the word), then anything but 200 is an error, and only then success.
pub fn classify(status: u16, body: &str) -> Outcome {
    if status == 425 || body.contains("ONGOING") {
        Outcome::Ongoing(body.to_owned())
    } else if status == 409 || body.contains("FAILURE") {
        Outcome::Failure(body.to_owned())
    } else if status != 200 {
        Outcome::Error(format!("status {status}: {body}"))
    } else {
        Outcome::Success
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<String, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_REPLY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_REPLY_BYTES {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        format!("timeout: {error}")
    } else {
        // The source chain carries the useful part ("connection refused").
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(inner) = source {
            text.push_str(": ");
            text.push_str(&inner.to_string());
            source = inner.source();
        }
        text
    }
}

/// rustls needs one process-wide crypto provider; ring is the one kube already uses.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_dtm_order() {
        assert_eq!(classify(200, ""), Outcome::Success);
        assert_eq!(classify(200, "{\"dtm_result\":\"SUCCESS\"}"), Outcome::Success);
        assert_eq!(classify(200, "some error text"), Outcome::Success);
        assert!(matches!(classify(425, ""), Outcome::Ongoing(_)));
        assert!(matches!(classify(409, "ONGOING"), Outcome::Ongoing(_)));
        assert!(matches!(
            classify(200, "{\"dtm_result\":\"ONGOING\"}"),
            Outcome::Ongoing(_)
        ));
        assert!(matches!(classify(409, ""), Outcome::Failure(_)));
        assert!(matches!(classify(500, "FAILURE"), Outcome::Failure(_)));
        assert!(matches!(
            classify(200, "{\"dtm_result\":\"FAILURE\"}"),
            Outcome::Failure(_)
        ));
        assert!(matches!(classify(500, ""), Outcome::Error(_)));
        assert!(matches!(classify(201, ""), Outcome::Error(_)));
        assert!(matches!(classify(204, ""), Outcome::Error(_)));
        assert!(matches!(classify(404, "not found"), Outcome::Error(_)));
    }
}
