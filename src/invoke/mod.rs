//! Calls one branch over HTTP or gRPC ([`grpc`]), through the one outbound policy ([`policy`]),
//! and classifies the reply exactly as DTM does.

pub mod grpc;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use url::Url;

use self::grpc::{GrpcCall, GrpcInvoker, GrpcTarget, PolicyConnector};
use self::policy::{OutboundPolicy, Refusal};
use crate::engine::Outcome;
use crate::model::without_userinfo;

/// Longest part of a reply body kept for classification and error messages.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Errors building the HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The TLS or connection-pool setup failed.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// A CA bundle, client certificate or key file is unreadable or unusable. The reason never
    /// quotes the file.
    #[error("cannot use {path}: {reason}")]
    Pem {
        /// File.
        path: String,
        /// Cause.
        reason: String,
    },
}

/// One branch call.
#[derive(Debug, Clone, Copy)]
pub struct BranchCall<'a> {
    /// Endpoint (an http(s) URL or a gRPC target); empty means immediate success.
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
    /// W3C trace context the transaction stored; the current span's wins when spans are exported.
    pub traceparent: Option<&'a str>,
}

/// One pooled keep-alive HTTP client for every outbound call, and one pooled gRPC channel per
/// gRPC target, behind the outbound policy.
#[derive(Debug, Clone)]
pub struct Invoker {
    client: reqwest::Client,
    /// Plain `http://` branch calls (the common case inside a cluster): hyper's pooled client
    /// directly, dialing through the policy's connector. reqwest's layers (its URL conversions,
    /// the redirect layer even with redirects off) were a tenth of kubetx's instructions per saga
    /// (BENCHMARKS.md, issue 15). HTTPS, and URLs with userinfo, go through `client`.
    plain: HyperClient<PolicyConnector, Full<Bytes>>,
    grpc: GrpcInvoker,
    policy: Arc<OutboundPolicy>,
    strict: bool,
}

/// Builds an [`Invoker`].
#[derive(Debug)]
pub struct InvokerBuilder {
    policy: OutboundPolicy,
    source: Option<IpAddr>,
    hosts: HashMap<String, Vec<IpAddr>>,
    strict: bool,
    ca_file: Option<PathBuf>,
    identity_files: Option<(PathBuf, PathBuf)>,
}

impl InvokerBuilder {
    /// Trusts the CAs of the PEM bundle `file` (one or more certificates) for HTTPS branches, in
    /// addition to the system's roots.
    pub fn ca_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(file.into());
        self
    }

    /// Presents the PEM certificate chain `cert_file` with the PEM private key `key_file` to
    /// HTTPS branches that ask for a client certificate (mTLS).
    pub fn client_identity_files(mut self, cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        self.identity_files = Some((cert_file.into(), key_file.into()));
        self
    }

    /// Branch calls leave from `source` (a node with several addresses, where branch services
    /// tell replicas apart by address).
    pub fn source_address(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// Classifies replies strictly ([`classify_strict`]) instead of as DTM does ([`classify`]).
    pub fn strict_results(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Resolves `name` to `addresses` instead of asking the system resolver (a hosts file of
    /// this client; tests). The policy still checks the addresses.
    pub fn static_host(mut self, name: &str, addresses: &[IpAddr]) -> Self {
        self.hosts.insert(normal_name(name), addresses.to_vec());
        self
    }

    /// Builds the shared client: no redirects, no proxies, every resolved address checked.
    pub fn build(self) -> Result<Invoker, InvokeError> {
        install_crypto_provider();
        let policy = Arc::new(self.policy);
        let hosts = Arc::new(self.hosts);
        let resolver = PolicyResolver {
            policy: Arc::clone(&policy),
            hosts: Arc::clone(&hosts),
        };
        // Same pool settings as `client`; hyper never follows redirects. `plain_request` sets
        // `Host` itself, from the URL the policy has already parsed.
        let plain = HyperClient::builder(TokioExecutor::new())
            .set_host(false)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .build(PolicyConnector::new(
                Arc::clone(&policy),
                Arc::clone(&hosts),
                self.source,
            ));
        let grpc = GrpcInvoker::new(
            Arc::clone(&policy),
            hosts,
            self.source,
            grpc_tls(self.ca_file.as_deref(), self.identity_files.as_ref())?,
        );
        let mut builder = reqwest::Client::builder();
        if let Some(file) = &self.ca_file {
            builder = builder.tls_certs_merge(ca_bundle(file)?);
        }
        if let Some((cert_file, key_file)) = &self.identity_files {
            builder = builder.identity(client_identity(cert_file, key_file)?);
        }
        let client = builder
            .local_address(self.source)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            // DTM does not follow redirects: a 3xx is an unknown outcome, and a redirect cannot
            // lead a call past the policy.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve and dial for us, out of the policy's sight.
            .no_proxy()
            .dns_resolver(resolver)
            // Branch calls are HTTP/1, where reqwest's default policy (protocol NACKs of HTTP/2
            // and 3) never retries; without it no request is cloned for a retry that never comes.
            // Retrying is the engine's job, with backoff.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .build()?;
        Ok(Invoker {
            client,
            plain,
            grpc,
            policy,
            strict: self.strict,
        })
    }
}

impl Invoker {
    /// A builder of a client that obeys `policy`.
    pub fn builder(policy: OutboundPolicy) -> InvokerBuilder {
        InvokerBuilder {
            policy,
            source: None,
            hosts: HashMap::new(),
            strict: false,
            ca_file: None,
            identity_files: None,
        }
    }

    /// The shared client, obeying `policy`.
    pub fn new(policy: OutboundPolicy) -> Result<Self, InvokeError> {
        Self::builder(policy).build()
    }

    /// The outbound policy every call obeys.
    pub fn policy(&self) -> &OutboundPolicy {
        &self.policy
    }

    /// Checks a branch address against the policy before any call: an http(s) URL, or a gRPC
    /// target. The reason says why it is refused.
    pub fn check_address(&self, address: &str) -> Result<(), String> {
        if !GrpcTarget::is_grpc(address) {
            return self.policy.allows(address).map_err(|r| r.to_string());
        }
        let url = GrpcTarget::parse(address).and_then(|target| target.policy_url())?;
        self.policy.check_url(&url).map_err(|r| r.to_string())
    }

    /// POSTs a JSON body (the alert webhook) under the same policy; the error is redacted.
    pub async fn post_json(&self, url: &str, body: &serde_json::Value, timeout: Duration) -> Result<(), String> {
        let url = self
            .policy
            .check(url)
            .map_err(|refusal| format!("endpoint refused: {refusal}"))?;
        match self.client.post(url).json(body).timeout(timeout).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("status {}", response.status().as_u16())),
            Err(error) => Err(describe(error)),
        }
    }

    /// Calls a branch and classifies the reply. A URL the policy refuses is an error outcome
    /// (retried), never a call.
    pub async fn call(&self, call: BranchCall<'_>) -> Outcome {
        if call.url.is_empty() {
            return Outcome::Success;
        }
        if GrpcTarget::is_grpc(call.url) {
            return self
                .grpc
                .call(GrpcCall {
                    address: call.url,
                    gid: call.gid,
                    trans_type: call.trans_type,
                    branch_id: call.branch_id,
                    op: call.op,
                    body: call.body,
                    headers: call.headers,
                    traceparent: call.traceparent,
                    timeout: call.timeout,
                })
                .await;
        }
        let mut url = match self.policy.check(call.url) {
            Ok(url) => url,
            Err(refusal) => return Outcome::Error(format!("endpoint refused: {refusal}")),
        };
        if url.scheme() == "http" && url.username().is_empty() && url.password().is_none() && url.fragment().is_none() {
            return self.call_plain(&url, &call).await;
        }
        url.query_pairs_mut()
            .append_pair("gid", call.gid)
            .append_pair("trans_type", call.trans_type)
            .append_pair("branch_id", call.branch_id)
            .append_pair("op", call.op);
        let method = if call.force_post || !call.body.is_empty() {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let mut request = self
            .client
            .request(method, url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(call.timeout);
        // The trace this call belongs to (a `traceparent` in branch_headers replaces it).
        if let Some(traceparent) = crate::telemetry::outgoing_traceparent(call.traceparent) {
            request = request.header(crate::telemetry::TRACEPARENT, traceparent);
        }
        // `branch_headers` replace the defaults (a custom content-type is not sent twice).
        if !call.headers.is_empty() {
            match header_map(call.headers) {
                Ok(headers) => request = request.headers(headers),
                Err(outcome) => return outcome,
            }
        }
        if !call.body.is_empty() {
            request = request.body(call.body.to_vec());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Outcome::Error(describe(error)),
        };
        let status = response.status().as_u16();
        match read_limited(response).await {
            Ok(body) if self.strict => classify_strict(status, &body),
            Ok(body) => classify(status, &body),
            Err(error) => Outcome::Error(describe(error)),
        }
    }
}

impl Invoker {
    /// A plain-HTTP call on hyper's client, with the same request and classification as the
    /// reqwest path: the query parameters, `content-type`, `accept`, the trace, the branch headers
    /// last (they replace the defaults), one timeout for the whole call.
    async fn call_plain(&self, url: &Url, call: &BranchCall<'_>) -> Outcome {
        let request = match plain_request(url, call) {
            Ok(request) => request,
            Err(outcome) => return outcome,
        };
        let reply = tokio::time::timeout(call.timeout, async {
            let response = self.plain.request(request).await.map_err(|e| describe_chain(&e))?;
            let status = response.status().as_u16();
            let body = read_plain(response.into_body()).await.map_err(|e| describe_chain(&e))?;
            Ok::<_, String>((status, body))
        })
        .await;
        match reply {
            Ok(Ok((status, body))) if self.strict => classify_strict(status, &body),
            Ok(Ok((status, body))) => classify(status, &body),
            Ok(Err(error)) => Outcome::Error(error),
            Err(_) => Outcome::Error(format!("timeout after {} ms", call.timeout.as_millis())),
        }
    }
}

/// The request of a plain-HTTP call to `url` (checked by the policy; no userinfo, no fragment).
fn plain_request(url: &Url, call: &BranchCall<'_>) -> Result<hyper::Request<Full<Bytes>>, Outcome> {
    use hyper::header::{ACCEPT, CONTENT_TYPE, HOST, HeaderValue};
    // Host and port as the URL spells them (`url` leaves out a scheme's default port, as `Host`
    // does), without formatting them again.
    let host = HeaderValue::from_str(&url[url::Position::BeforeHost..url::Position::AfterPort])
        .map_err(|_| Outcome::Error("invalid branch URL host".to_owned()))?;
    let mut target = String::with_capacity(url.as_str().len() + 64 + call.gid.len() + call.branch_id.len());
    target.push_str(url.as_str());
    // The pairs are appended as `Url::query_pairs_mut` would: after `?`, or `&` after a query.
    let start = match url.query() {
        Some(query) => target.len() - query.len(),
        None => {
            target.push('?');
            target.len()
        }
    };
    url::form_urlencoded::Serializer::for_suffix(&mut target, start)
        .append_pair("gid", call.gid)
        .append_pair("trans_type", call.trans_type)
        .append_pair("branch_id", call.branch_id)
        .append_pair("op", call.op)
        .finish();
    let uri = hyper::Uri::try_from(target).map_err(|e| Outcome::Error(format!("invalid branch URL: {e}")))?;
    let mut request = hyper::Request::new(Full::new(Bytes::copy_from_slice(call.body)));
    *request.method_mut() = if call.force_post || !call.body.is_empty() {
        hyper::Method::POST
    } else {
        hyper::Method::GET
    };
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(HOST, host);
    headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // The trace this call belongs to (a `traceparent` in branch_headers replaces it).
    if let Some(traceparent) = crate::telemetry::outgoing_traceparent(call.traceparent) {
        let value = HeaderValue::try_from(traceparent).map_err(|_| Outcome::Error("invalid traceparent".to_owned()))?;
        headers.insert(crate::telemetry::TRACEPARENT, value);
    }
    if !call.headers.is_empty() {
        headers.extend(header_map(call.headers)?);
    }
    Ok(request)
}

/// The reply body, its first [`MAX_REPLY_BYTES`] only.
async fn read_plain(mut body: hyper::body::Incoming) -> Result<String, hyper::Error> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame?.into_data() else {
            continue;
        };
        if append_limited(&mut bytes, &chunk) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Appends what fits of `chunk` under [`MAX_REPLY_BYTES`]; true once the body is full.
fn append_limited(body: &mut Vec<u8>, chunk: &[u8]) -> bool {
    let room = MAX_REPLY_BYTES - body.len();
    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    body.len() >= MAX_REPLY_BYTES
}

/// The text of a call error: a refusal of the policy (the resolver hook's or the connector's) as
/// such, otherwise the error and its causes, with userinfo removed (the text goes into statuses,
/// events and answers).
fn describe_chain(error: &(dyn std::error::Error + 'static)) -> String {
    if let Some(refusal) = refusal_in_chain(error) {
        return format!("endpoint refused: {refusal}");
    }
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    without_userinfo(&text)
}

/// The policy's refusal anywhere in `error`'s chain of causes.
fn refusal_in_chain<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut next = Some(error);
    while let Some(inner) = next {
        if let Some(refusal) = refusal_in(inner) {
            return Some(refusal);
        }
        next = inner.source();
    }
    None
}

/// The policy's refusal, when `error` is one or an I/O error that carries one (an I/O error's
/// `source` skips the error it wraps).
fn refusal_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    error.downcast_ref::<Refusal>().or_else(|| {
        error
            .downcast_ref::<std::io::Error>()?
            .get_ref()?
            .downcast_ref::<Refusal>()
    })
}

/// TLS of `grpcs://` branch calls: the system's roots plus the branch CA bundle, and the client
/// certificate, the same files as the HTTPS branch calls (already checked by the HTTP side).
fn grpc_tls(
    ca_file: Option<&Path>,
    identity_files: Option<&(PathBuf, PathBuf)>,
) -> Result<Option<tonic::transport::ClientTlsConfig>, InvokeError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(file) = ca_file {
        let bytes = std::fs::read(file).map_err(|e| pem_error(file, e.to_string()))?;
        tls = tls.ca_certificate(Certificate::from_pem(bytes));
    }
    if let Some((cert_file, key_file)) = identity_files {
        let cert = std::fs::read(cert_file).map_err(|e| pem_error(cert_file, e.to_string()))?;
        let key = std::fs::read(key_file).map_err(|e| pem_error(key_file, e.to_string()))?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(Some(tls))
}

fn pem_error(path: &Path, reason: impl Into<String>) -> InvokeError {
    InvokeError::Pem {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Every certificate of a PEM file (at least one). Errors say what is wrong, never what the file
/// holds.
fn pem_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, InvokeError> {
    let bytes = std::fs::read(file).map_err(|e| pem_error(file, e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| pem_error(file, "not a valid PEM file"))?;
    if certs.is_empty() {
        return Err(pem_error(file, "no PEM certificate"));
    }
    Ok(certs)
}

/// The CA certificates of a PEM bundle, each checked to be a usable trust anchor.
fn ca_bundle(file: &Path) -> Result<Vec<reqwest::Certificate>, InvokeError> {
    let mut roots = Vec::new();
    for cert in pem_certificates(file)? {
        rustls::RootCertStore::empty()
            .add(cert.clone())
            .map_err(|e| pem_error(file, format!("invalid CA certificate: {e}")))?;
        roots.push(reqwest::Certificate::from_der(&cert).map_err(|_| pem_error(file, "invalid CA certificate"))?);
    }
    Ok(roots)
}

/// A client certificate chain and its private key, checked to belong together.
fn client_identity(cert_file: &Path, key_file: &Path) -> Result<reqwest::Identity, InvokeError> {
    let chain = pem_certificates(cert_file)?;
    let bytes = std::fs::read(key_file).map_err(|e| pem_error(key_file, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| pem_error(key_file, "no PEM private key"))?;
    let label = match &key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let key_der = key.secret_der().to_vec();
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider)
        .map_err(|e| pem_error(key_file, format!("unusable with {}: {e}", cert_file.display())))?;
    // reqwest takes the identity as one PEM text; written afresh, so that only the certificates
    // and the key reach it.
    let mut pem = String::new();
    for cert in &chain {
        pem_section(&mut pem, "CERTIFICATE", cert);
    }
    pem_section(&mut pem, label, &key_der);
    reqwest::Identity::from_pem(pem.as_bytes()).map_err(|_| pem_error(key_file, "unusable client identity"))
}

fn pem_section(pem: &mut String, label: &str, der: &[u8]) {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    pem.push_str(&format!("-----BEGIN {label}-----\n"));
    for line in text.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
}

fn header_map(headers: &BTreeMap<String, String>) -> Result<reqwest::header::HeaderMap, Outcome> {
    let mut map = reqwest::header::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        match (
            reqwest::header::HeaderName::from_bytes(name.as_bytes()),
            reqwest::header::HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(mut value)) => {
                value.set_sensitive(true);
                map.insert(name, value);
            }
            _ => return Err(Outcome::Error(format!("invalid branch header {name:?}"))),
        }
    }
    Ok(map)
}

/// Resolves names for the client and keeps only the addresses the policy allows: the check on
/// the address actually dialed (IP-literal hosts never reach a resolver; the policy checks them
/// before the call).
#[derive(Debug, Clone)]
struct PolicyResolver {
    policy: Arc<OutboundPolicy>,
    hosts: Arc<HashMap<String, Vec<IpAddr>>>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found = match this.hosts.get(&normal_name(&host)) {
                Some(addresses) => addresses.clone(),
                None => tokio::net::lookup_host((host.as_str(), 0))
                    .await?
                    .map(|address| address.ip())
                    .collect(),
            };
            let allowed = this.policy.filter_resolved(&host, &found)?;
            let addresses: reqwest::dns::Addrs = Box::new(allowed.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addresses)
        })
    }
}

fn normal_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// DTM's classification, in its exact order: ONGOING (425 or the word anywhere in the body,
/// whatever the status), then FAILURE (409 or the word anywhere in the body, whatever the status:
/// a 500 whose body contains `FAILURE` is a failure), then anything but 200 is an error (an
/// unknown outcome, retried), and only then success.
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

/// The strict classification (`--strict-results`): only the status or a JSON body's
/// `dtm_result` field count. ONGOING is 425 or `"dtm_result":"ONGOING"`, FAILURE is 409 or
/// `"dtm_result":"FAILURE"`; any other status than 200 is an error whatever the body says.
pub fn classify_strict(status: u16, body: &str) -> Outcome {
    let result = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|json| json.get("dtm_result")?.as_str().map(str::to_owned));
    match (status, result.as_deref()) {
        (425, _) | (_, Some("ONGOING")) => Outcome::Ongoing(body.to_owned()),
        (409, _) | (_, Some("FAILURE")) => Outcome::Failure(body.to_owned()),
        (200, _) => Outcome::Success,
        _ => Outcome::Error(format!("status {status}: {body}")),
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<String, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if append_limited(&mut body, &chunk) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The text of a call error: a refusal of the resolver hook as such, otherwise the error and its
/// causes, with the URL's userinfo removed (the text goes into statuses, events and answers).
fn describe(mut error: reqwest::Error) -> String {
    if let Some(url) = error.url_mut() {
        // Only fails for URLs that cannot have credentials, which then have none.
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    // A refusal of the resolver hook says all there is to say; otherwise the source chain
    // carries the useful part ("connection refused").
    if error.is_timeout() && refusal_in_chain(&error).is_none() {
        return format!("timeout: {error}");
    }
    describe_chain(&error)
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
    fn plain_requests_name_the_host_and_port_the_url_gives() {
        let headers = BTreeMap::new();
        let call = BranchCall {
            url: "",
            gid: "g 1",
            trans_type: "saga",
            branch_id: "01",
            op: "action",
            body: b"{}",
            force_post: false,
            headers: &headers,
            timeout: Duration::from_secs(1),
            traceparent: None,
        };
        for (url, host) in [
            ("http://bank.default.svc:8080/api/TransOut", "bank.default.svc:8080"),
            ("http://127.0.0.1/api/TransOut?x=1", "127.0.0.1"),
            ("http://bank:80/api", "bank"),
            ("http://[::1]:81/api", "[::1]:81"),
        ] {
            let parsed = Url::parse(url).expect("test URL");
            let request = plain_request(&parsed, &call).expect("request");
            assert_eq!(request.headers()[hyper::header::HOST], host, "{url}");
            assert_eq!(request.method(), hyper::Method::POST);
            let query = request.uri().query().unwrap_or_default();
            assert!(
                query.ends_with("gid=g+1&trans_type=saga&branch_id=01&op=action"),
                "{query}"
            );
        }
    }

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

    #[test]
    fn strict_classification_reads_only_the_status_and_dtm_result() {
        let html = "<h1>502: upstream FAILURE</h1>";
        assert!(matches!(classify(502, html), Outcome::Failure(_)), "DTM's rule");
        assert!(matches!(classify_strict(502, html), Outcome::Error(_)));
        assert!(matches!(classify_strict(200, "ONGOING FAILURE"), Outcome::Success));
        assert!(matches!(classify_strict(409, ""), Outcome::Failure(_)));
        assert!(matches!(classify_strict(425, ""), Outcome::Ongoing(_)));
        assert!(matches!(
            classify_strict(200, r#"{"dtm_result":"FAILURE"}"#),
            Outcome::Failure(_)
        ));
        assert!(matches!(
            classify_strict(500, r#"{"dtm_result":"ONGOING"}"#),
            Outcome::Ongoing(_)
        ));
        assert!(matches!(classify_strict(500, "FAILURE"), Outcome::Error(_)));
        assert!(matches!(classify_strict(302, ""), Outcome::Error(_)));
    }
}
