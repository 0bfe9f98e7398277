//! The HTTP transport: one pooled client talking to kubetx's (or DTM's) HTTP API.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use crate::error::{Error, Result, classify_coordinator};
use crate::query::{QueryResult, TransGlobal};

/// A handle on the coordinator's HTTP API (`http://host:36789/api/dtmsvr`). Cheap to clone:
/// every clone shares one keep-alive connection pool.
///
/// ```
/// let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
/// assert_eq!(dtm.url().as_str(), "http://127.0.0.1:36789/api/dtmsvr");
/// ```
#[derive(Debug, Clone)]
pub struct Dtm {
    base: Url,
    http: reqwest::Client,
}

impl Dtm {
    /// A client for the API at `url` (http or https), with a 10 s timeout per request.
    ///
    /// ```
    /// assert!(kubetx_client::Dtm::new("ftp://x").is_err());
    /// ```
    pub fn new(url: &str) -> Result<Self> {
        let http = http_client(Duration::from_secs(10))?;
        Self::with_client(url, http)
    }

    /// A client for the API at `url` using a reqwest client of the caller's (built after
    /// [`install_crypto_provider`], or with a rustls provider of the caller's).
    ///
    /// ```
    /// kubetx_client::install_crypto_provider();
    /// let http = reqwest::Client::new();
    /// let dtm = kubetx_client::Dtm::with_client("http://127.0.0.1:36789/api/dtmsvr", http).unwrap();
    /// # let _ = dtm;
    /// ```
    pub fn with_client(url: &str, http: reqwest::Client) -> Result<Self> {
        let mut base = Url::parse(url)?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::Invalid(format!(
                "the DTM API URL must be http(s), not {}",
                base.scheme()
            )));
        }
        let path = base.path().trim_end_matches('/').to_owned();
        base.set_path(&path);
        Ok(Dtm { base, http })
    }

    /// The API's base URL.
    ///
    /// ```
    /// let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr/").unwrap();
    /// assert_eq!(dtm.url().path(), "/api/dtmsvr");
    /// ```
    pub fn url(&self) -> &Url {
        &self.base
    }

    /// The shared HTTP client (also used for branch calls made by the SDK).
    ///
    /// ```
    /// let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let _client: &reqwest::Client = dtm.http();
    /// ```
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn route(&self, route: &str) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(route);
        }
        url
    }

    /// A new global transaction id from the server (`GET /newGid`).
    ///
    /// ```no_run
    /// # async fn run() -> kubetx_client::Result<()> {
    /// let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr")?;
    /// let gid = dtm.new_gid().await?;
    /// # Ok(()) }
    /// ```
    pub async fn new_gid(&self) -> Result<String> {
        let reply: Value = self.get("newGid", &[]).await?;
        reply["gid"]
            .as_str()
            .filter(|gid| !gid.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| Error::Unknown(format!("newGid answered without a gid: {reply}")))
    }

    /// The transaction and its branch rows (`GET /query`); `transaction` is `None` when the
    /// gid is unknown.
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// let q = dtm.query("gid-1").await?;
    /// println!("{:?} with {} branch rows", q.transaction.map(|t| t.status), q.branches.len());
    /// # Ok(()) }
    /// ```
    pub async fn query(&self, gid: &str) -> Result<QueryResult> {
        self.get("query", &[("gid", gid)]).await
    }

    /// Only the global transaction (`None` when unknown).
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// if let Some(t) = dtm.query_global("gid-1").await? { println!("{}", t.status); }
    /// # Ok(()) }
    /// ```
    pub async fn query_global(&self, gid: &str) -> Result<Option<TransGlobal>> {
        Ok(self.query(gid).await?.transaction)
    }

    /// Waits, polling every `every`, until the transaction is `succeed` or `failed`, or
    /// `timeout` passes (then [`Error::Ongoing`]). Returns the final status.
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// use std::time::Duration;
    /// let status = dtm.wait_finished("gid-1", Duration::from_secs(10), Duration::from_millis(50)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn wait_finished(&self, gid: &str, timeout: Duration, every: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(t) = self.query_global(gid).await?
                && (t.status == "succeed" || t.status == "failed")
            {
                return Ok(t.status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Ongoing(format!("{gid} not finished after {timeout:?}")));
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Subscribes `url` to the msg topic `topic` (steps `topic://<topic>` reach it).
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// dtm.subscribe("transfers", "http://audit/api/Record", "audit log").await?;
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, topic: &str, url: &str, remark: &str) -> Result<()> {
        crate::base::check_url(url, false)?;
        let _: Value = self
            .get("subscribe", &[("topic", topic), ("url", url), ("remark", remark)])
            .await?;
        Ok(())
    }

    /// Removes `url` from the subscribers of `topic`.
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// dtm.unsubscribe("transfers", "http://audit/api/Record").await?;
    /// # Ok(()) }
    /// ```
    pub async fn unsubscribe(&self, topic: &str, url: &str) -> Result<()> {
        let _: Value = self.get("unsubscribe", &[("topic", topic), ("url", url)]).await?;
        Ok(())
    }

    /// POSTs a JSON body to an API route and returns the JSON reply: 200 is success (unless
    /// its `dtm_result` says otherwise), 409 [`Error::Failure`], 425 [`Error::Ongoing`], anything
    /// else [`Error::Unknown`].
    ///
    /// ```no_run
    /// # async fn run(dtm: kubetx_client::Dtm) -> kubetx_client::Result<()> {
    /// let reply = dtm.call("forceStop", &serde_json::json!({"gid": "gid-1"})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call(&self, route: &str, body: &impl Serialize) -> Result<Value> {
        let reply = self.http.post(self.route(route)).json(body).send().await?;
        read_reply(reply).await
    }

    async fn get<T: DeserializeOwned>(&self, route: &str, query: &[(&str, &str)]) -> Result<T> {
        let reply = self.http.get(self.route(route)).query(query).send().await?;
        Ok(serde_json::from_value(read_reply(reply).await?)?)
    }
}

/// Reads and classifies a reply of the coordinator; the body as JSON (`null` when empty).
async fn read_reply(reply: reqwest::Response) -> Result<Value> {
    let status = reply.status().as_u16();
    let body = reply.bytes().await?;
    classify_coordinator(status, &body)?;
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| Error::Unknown(format!("reply is not JSON: {e}")))
}

/// Installs rustls' ring provider as the process default, unless one is installed already;
/// the SDK's own clients do it, a reqwest client of the caller's needs it (or another provider).
///
/// ```
/// kubetx_client::install_crypto_provider();
/// ```
pub fn install_crypto_provider() {
    // Err only means a provider is installed already, which is what we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The SDK's HTTP client: rustls on ring, no redirects (a 3xx is an unknown outcome, as DTM has it).
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    install_crypto_provider();
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}
