//! gRPC branch calls, as DTM makes them: the target `host:port/package.Service/Method`, the
//! stored payload sent verbatim (a raw codec, no re-encoding), the `dtm-*` metadata plus
//! `branch_headers`, the request timeout as deadline, and DTM's classification of the status
//! (`Aborted` is FAILURE, `FailedPrecondition` is ONGOING, anything else is an unknown outcome).
//!
//! One lazily connected, pooled HTTP/2 channel per target, dialed through a connector that
//! resolves the name and checks every address with the outbound policy, like the HTTP client's
//! resolver hook: the policy sees the address actually dialed.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};
use tonic::{Code, Status};
use url::{Host, Url};

use super::policy::{OutboundPolicy, Refusal};
use crate::engine::Outcome;

/// Scheme of a plaintext (h2c) target, the same as the bare DTM form.
const PLAIN: &str = "grpc://";
/// Scheme of a target called over TLS, with the branch CA bundle and client certificate.
const TLS: &str = "grpcs://";
/// Most channels kept; beyond, the pool starts afresh (targets come from clients).
const MAX_CHANNELS: usize = 4096;

/// A gRPC branch address: DTM's `host:port/package.Service/Method`, optionally prefixed with
/// `grpc://` (the same) or `grpcs://` (TLS). Other schemes are DTM's service-discovery drivers
/// (`etcd://`, `discovery://`, ...), which kubetx does not implement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcTarget {
    /// Host name or address, as the URL parser normalizes it.
    pub host: String,
    /// Port (required: gRPC has no default port).
    pub port: u16,
    /// `/package.Service/Method`.
    pub path: String,
    /// Call over TLS.
    pub tls: bool,
}

impl GrpcTarget {
    /// True when `address` is not an http(s) URL, so a gRPC target (or nothing valid).
    pub fn is_grpc(address: &str) -> bool {
        let lower = address.get(..8).unwrap_or(address).to_ascii_lowercase();
        !(lower.starts_with("http://") || lower.starts_with("https://"))
    }

    /// Parses a target; the error says what is wrong with it.
    pub fn parse(address: &str) -> Result<Self, String> {
        let lower = address.to_ascii_lowercase();
        let (rest, tls) = if lower.starts_with(TLS) {
            (&address[TLS.len()..], true)
        } else if lower.starts_with(PLAIN) {
            (&address[PLAIN.len()..], false)
        } else if let Some((scheme, _)) = address.split_once("://") {
            return Err(format!(
                "scheme {scheme}:// is not supported (service discovery is not supported: give a gRPC target as host:port/package.Service/Method)"
            ));
        } else {
            (address, false)
        };
        let (authority, method) = rest
            .split_once('/')
            .ok_or("a gRPC target is host:port/package.Service/Method")?;
        let mut parts = method.split('/');
        let (Some(service), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err("the method of a gRPC target is package.Service/Method".to_owned());
        };
        let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
        if !valid(service) || !valid(name) {
            return Err("the method of a gRPC target is package.Service/Method".to_owned());
        }
        if authority.contains(['@', '?', '#', '\\']) || authority.is_empty() {
            return Err("a gRPC target is host:port/package.Service/Method".to_owned());
        }
        let url = Url::parse(&format!("http://{authority}/")).map_err(|e| format!("invalid host:port: {e}"))?;
        let host = match url.host() {
            Some(Host::Domain(name)) => name.to_owned(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return Err("a gRPC target needs a host".to_owned()),
        };
        // The URL parser drops port 80 as http's default; gRPC has none, so look at the text.
        let port = url
            .port()
            .or_else(|| authority.ends_with(":80").then_some(80))
            .ok_or("a gRPC target needs a port (host:port/package.Service/Method)")?;
        Ok(GrpcTarget {
            host,
            port,
            path: format!("/{service}/{name}"),
            tls,
        })
    }

    /// The URL the outbound policy checks (its host and port are the ones dialed).
    pub fn policy_url(&self) -> Result<Url, String> {
        Url::parse(&format!("http://{}:{}/", self.host, self.port)).map_err(|e| format!("invalid host:port: {e}"))
    }

    fn endpoint_uri(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

/// One gRPC branch call.
#[derive(Debug, Clone, Copy)]
pub struct GrpcCall<'a> {
    /// The target.
    pub address: &'a str,
    /// `dtm-gid`.
    pub gid: &'a str,
    /// `dtm-trans_type`.
    pub trans_type: &'a str,
    /// `dtm-branch_id`.
    pub branch_id: &'a str,
    /// `dtm-op`.
    pub op: &'a str,
    /// The request message, already encoded: sent as is.
    pub body: &'a [u8],
    /// `branch_headers`, sent as metadata.
    pub headers: &'a BTreeMap<String, String>,
    /// The trace context stored with the transaction, for when no span is current.
    pub traceparent: Option<&'a str>,
    /// Deadline of the call.
    pub timeout: Duration,
}

/// The gRPC side of the invoker: the channel pool and its policy-checked connector.
#[derive(Debug, Clone)]
pub struct GrpcInvoker {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    connector: PolicyConnector,
    tls: Option<ClientTlsConfig>,
}

impl GrpcInvoker {
    /// Channels that dial through `policy`; `tls` for `grpcs://` targets.
    pub fn new(
        policy: Arc<OutboundPolicy>,
        hosts: Arc<HashMap<String, Vec<IpAddr>>>,
        source: Option<IpAddr>,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        GrpcInvoker {
            channels: Arc::default(),
            connector: PolicyConnector::new(policy, hosts, source),
            tls,
        }
    }

    /// Calls the target and classifies the reply.
    pub async fn call(&self, call: GrpcCall<'_>) -> Outcome {
        let target = match GrpcTarget::parse(call.address) {
            Ok(target) => target,
            Err(reason) => return Outcome::Error(format!("invalid gRPC target: {reason}")),
        };
        let checked = target.policy_url().and_then(|url| {
            self.connector
                .policy
                .check_url(&url)
                .map_err(|r| format!("endpoint refused: {r}"))
        });
        if let Err(reason) = checked {
            return Outcome::Error(reason);
        }
        let channel = match self.channel(&target) {
            Ok(channel) => channel,
            Err(error) => return Outcome::Error(error),
        };
        let request = match request(&call) {
            Ok(request) => request,
            Err(error) => return Outcome::Error(error),
        };
        let path = match tonic::codegen::http::uri::PathAndQuery::from_str(&target.path) {
            Ok(path) => path,
            Err(error) => return Outcome::Error(format!("invalid gRPC method: {error}")),
        };
        let mut client = tonic::client::Grpc::new(channel);
        let reply = tokio::time::timeout(call.timeout, async {
            client.ready().await.map_err(|e| Status::unavailable(describe(&e)))?;
            client.unary(request, path, RawCodec).await
        })
        .await;
        match reply {
            Ok(Ok(_)) => Outcome::Success,
            Ok(Err(status)) => classify(&status),
            Err(_) => Outcome::Error(format!("timeout after {} ms", call.timeout.as_millis())),
        }
    }

    /// The pooled channel of a target, made on first use (it connects lazily, and reconnects by
    /// itself after the peer goes away).
    fn channel(&self, target: &GrpcTarget) -> Result<Channel, String> {
        let key = target.endpoint_uri();
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        let mut endpoint = Endpoint::from_shared(key.clone())
            .map_err(|e| format!("invalid gRPC target: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if target.tls {
            let tls = self
                .tls
                .clone()
                .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS setup for {key}: {e}"))?;
        }
        let channel = endpoint.connect_with_connector_lazy(self.connector.clone());
        if channels.len() >= MAX_CHANNELS {
            channels.clear();
        }
        channels.insert(key, channel.clone());
        Ok(channel)
    }
}

/// Checks that every pair can travel as gRPC ASCII metadata (a visible-ASCII value, a lowercase
/// name that does not end in `-bin`); a pair that cannot would fail every call of a branch, so
/// it is refused before the transaction exists. The error names the pair, never its value.
pub fn check_metadata<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<(), String> {
    for (name, value) in pairs {
        MetadataKey::<tonic::metadata::Ascii>::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} cannot be sent as gRPC metadata"))?;
        // The gRPC spec's ASCII-Value (tonic alone would also pass bytes above 0x7f, which
        // other implementations refuse).
        if !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(format!(
                "the value of {name:?} cannot be sent as gRPC metadata (printable ASCII only)"
            ));
        }
    }
    Ok(())
}

/// The request: the payload and DTM's metadata, then `branch_headers`.
fn request(call: &GrpcCall<'_>) -> Result<tonic::Request<Vec<u8>>, String> {
    let mut request = tonic::Request::new(call.body.to_vec());
    request.set_timeout(call.timeout);
    let fixed = [
        ("dtm-gid", call.gid),
        ("dtm-trans_type", call.trans_type),
        ("dtm-branch_id", call.branch_id),
        ("dtm-op", call.op),
        ("dtm-dtm", ""),
    ];
    // DTM's XA resource managers read their phase-2 address from `dtm-phase2_url`.
    let phase2 = (call.trans_type == "xa").then_some(("dtm-phase2_url", call.address));
    // The trace this call belongs to, as W3C metadata (a `traceparent` in branch_headers
    // replaces it, as on HTTP).
    let traceparent = crate::telemetry::outgoing_traceparent(call.traceparent);
    let trace = traceparent.as_deref().map(|t| (crate::telemetry::TRACEPARENT, t));
    let headers = call.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let metadata = request.metadata_mut();
    for (name, value) in fixed.into_iter().chain(phase2).chain(trace).chain(headers) {
        check_metadata([(name, value)])?;
        let key = MetadataKey::from_bytes(name.as_bytes()).map_err(|_| format!("invalid metadata name {name:?}"))?;
        let value: MetadataValue<_> = value
            .parse()
            .map_err(|_| format!("the value of metadata {name:?} is not valid ASCII metadata"))?;
        metadata.insert(key, value);
    }
    Ok(request)
}

/// DTM's classification of a gRPC status: `Aborted` is FAILURE (or ONGOING when its message is
/// exactly `ONGOING`, DTM's legacy form), `FailedPrecondition` is ONGOING, and every other code
/// is an unknown outcome, retried and never compensated.
pub fn classify(status: &Status) -> Outcome {
    let message = status.message().to_owned();
    match status.code() {
        Code::Ok => Outcome::Success,
        Code::Aborted if message == "ONGOING" => Outcome::Ongoing(message),
        Code::Aborted => Outcome::Failure(message),
        Code::FailedPrecondition => Outcome::Ongoing(message),
        code => Outcome::Error(format!("grpc status {code:?}: {message}")),
    }
}

fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        // A policy refusal says all there is to say.
        if let Some(refusal) = inner.downcast_ref::<Refusal>() {
            return format!("endpoint refused: {refusal}");
        }
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// DTM's raw codec: the stored bytes are the encoded request message, sent without re-encoding;
/// the reply is read and ignored.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// Longest wait for a TCP connection to a branch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Dials a target's host: resolves it (or takes the static hosts), keeps only the addresses the
/// policy allows, and connects to the first that answers.
#[derive(Debug, Clone)]
pub(super) struct PolicyConnector {
    policy: Arc<OutboundPolicy>,
    hosts: Arc<HashMap<String, Vec<IpAddr>>>,
    source: Option<IpAddr>,
}

impl PolicyConnector {
    /// A connector that dials through `policy`, from `source` when set.
    pub(super) fn new(
        policy: Arc<OutboundPolicy>,
        hosts: Arc<HashMap<String, Vec<IpAddr>>>,
        source: Option<IpAddr>,
    ) -> Self {
        PolicyConnector { policy, hosts, source }
    }

    async fn addresses(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = IpAddr::from_str(bare) {
            self.policy.check_literal(ip).map_err(std::io::Error::other)?;
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let found: Vec<IpAddr> = match self.hosts.get(&super::normal_name(host)) {
            Some(addresses) => addresses.clone(),
            None => tokio::net::lookup_host((host, port)).await?.map(|a| a.ip()).collect(),
        };
        let allowed = self
            .policy
            .filter_resolved(host, &found)
            .map_err(std::io::Error::other)?;
        Ok(allowed.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
    }

    async fn connect(self, uri: Uri) -> std::io::Result<TokioIo<TcpStream>> {
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host} has no address"));
        for address in self.addresses(&host, port).await? {
            let socket = match address {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            if let Some(source) = self.source {
                socket.bind(SocketAddr::new(source, 0))?;
            }
            match socket.connect(address).await {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(TokioIo::new(stream));
                }
                Err(error) => last = error,
            }
        }
        Err(last)
    }
}

impl tower::Service<Uri> for PolicyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connect = self.clone().connect(uri);
        Box::pin(async move {
            tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_dtm_writes_them() {
        let target = GrpcTarget::parse("localhost:58081/busi.Busi/TransOut").expect("parses");
        assert_eq!(
            (target.host.as_str(), target.port, target.path.as_str(), target.tls),
            ("localhost", 58081, "/busi.Busi/TransOut", false)
        );
        let target = GrpcTarget::parse("grpcs://10.0.0.1:443/pkg.v1.Bank/Pay").expect("parses");
        assert!(target.tls && target.host == "10.0.0.1" && target.port == 443);
        assert_eq!(GrpcTarget::parse("grpc://[::1]:80/S/M").map(|t| t.port), Ok(80));
        for bad in [
            "etcd://127.0.0.1:2379/dtmservice/busi.Busi/TransOut",
            "discovery:///busi/busi.Busi/TransOut",
            "localhost/busi.Busi/TransOut",
            "localhost:1/busi.Busi",
            "localhost:1/busi.Busi/TransOut/extra",
            "user@localhost:1/busi.Busi/TransOut",
            "localhost:1/busi Busi/TransOut",
            ":1/S/M",
        ] {
            assert!(GrpcTarget::parse(bad).is_err(), "{bad}");
        }
        assert!(
            GrpcTarget::parse("etcd://x/S/M")
                .unwrap_err()
                .contains("service discovery is not supported")
        );
        assert!(GrpcTarget::is_grpc("localhost:1/S/M") && !GrpcTarget::is_grpc("HTTP://x/"));
    }

    #[test]
    fn metadata_that_grpc_cannot_carry_is_refused() {
        assert!(check_metadata([("dtm-gid", "g-1"), ("x-tenant", "t1")]).is_ok());
        assert!(check_metadata([("dtm-gid", "gid-é")]).is_err());
        assert!(check_metadata([("x-trace-bin", "abc")]).is_err());
        assert!(check_metadata([("bad name", "v")]).is_err());
    }

    #[test]
    fn statuses_are_classified_as_dtm_does() {
        assert!(matches!(classify(&Status::aborted("no money")), Outcome::Failure(_)));
        assert!(matches!(classify(&Status::aborted("ONGOING")), Outcome::Ongoing(_)));
        assert!(matches!(
            classify(&Status::failed_precondition("wait")),
            Outcome::Ongoing(_)
        ));
        for status in [
            Status::unavailable("down"),
            Status::deadline_exceeded("slow"),
            Status::internal("bug"),
            Status::unknown("?"),
            Status::invalid_argument("bad"),
            Status::unimplemented("no such method"),
        ] {
            assert!(matches!(classify(&status), Outcome::Error(_)), "{status:?}");
        }
    }
}
