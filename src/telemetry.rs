//! Logging and OpenTelemetry tracing. Spans: one per DTM API request (`dtm submit`, ...), one per
//! processing pass (`pass`) and one per branch call (`branch`), with the gid, mode, branch and op
//! as attributes. A client's W3C `traceparent` on a DTM request is the parent of the request's
//! span; the transaction stores the trace context (in `ext_data`), so that its passes, retries
//! after a restart included, continue that trace; and every branch call carries `traceparent`.
//! Spans are exported over OTLP/HTTP (JSON) only when an endpoint is configured; without one,
//! the client's `traceparent` is still passed on to the branches unchanged.
//!
//! The spans are at DEBUG level: at the default log level they exist only when they are
//! exported. Formatting every span's fields into the log context, with no line logged inside most
//! of them, was a fifth of kubetx's instructions per saga at `info` (BENCHMARKS.md, issue 15);
//! the lines logged inside them name their transaction themselves.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use futures::future::BoxFuture;
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Instrument as _, Level, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::LogFormat;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// How long one export to the collector may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// The validated `traceparent` of the DTM request being handled (when tracing is not
    /// exported there is no span context to carry it).
    static INCOMING: Option<String>;
}

/// Errors setting up tracing.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP endpoint is not an http(s) URL.
    #[error("invalid OTLP endpoint {0:?}: an http:// or https:// URL is required")]
    Endpoint(String),
    /// The exporter could not be built.
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
}

/// Installed tracing; [`Telemetry::shutdown`] flushes the spans not yet exported.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter. Blocks: call it off the async threads.
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
    }

    /// Exports what is buffered. Blocks: call it off the async threads.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

/// Installs the process's subscriber: log lines on stderr filtered by `level` (`RUST_LOG` wins;
/// colours only on a terminal), and, when `otlp_endpoint` is set (the collector's base URL, e.g.
/// `http://otel:4318`), spans of kubetx exported to `<endpoint>/v1/traces` with kubetx's events
/// at INFO and above. Needs a Tokio runtime. A second call (tests) keeps the first subscriber.
pub fn init(level: &str, format: LogFormat, otlp_endpoint: &str) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let log = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = match otlp_endpoint.trim() {
        "" => None,
        endpoint => Some(provider(endpoint)?),
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("kubetx"))
            .with_filter(filter_fn(|meta| {
                meta.target().starts_with("kubetx") && (meta.is_span() || *meta.level() <= Level::INFO)
            }))
    });
    let _ = tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(spans)
        .try_init();
    Ok(Telemetry { provider })
}

fn provider(endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let mut url = url::Url::parse(endpoint).map_err(|_| TelemetryError::Endpoint(endpoint.to_owned()))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(TelemetryError::Endpoint(endpoint.to_owned()));
    }
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().extend(["v1", "traces"]);
    }
    crate::invoke::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(url.as_str())
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(Exporter { client, runtime })
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("kubetx").build())
        .build())
}

/// The exporter's HTTP client: the project's reqwest, run on the Tokio runtime (the batch
/// processor exports from a thread of its own, where reqwest cannot run by itself).
#[derive(Debug)]
struct Exporter {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Exporter {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<Bytes>,
    ) -> Result<opentelemetry_http::Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let (status, body) = self
            .runtime
            .spawn(async move {
                let response = client.execute(request).await?.error_for_status()?;
                Ok::<_, reqwest::Error>((response.status(), response.bytes().await?))
            })
            .await??;
        Ok(opentelemetry_http::Response::builder().status(status).body(body)?)
    }
}

/// The trace context a W3C `traceparent` names, if it is well-formed and valid.
fn context_of(traceparent: &str) -> Option<Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// The `traceparent` of a trace context, if it has a valid span.
fn traceparent_of(context: &Context) -> Option<String> {
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// A `traceparent` as kubetx passes it on: parsed and written again (invalid: `None`).
pub fn normalized(traceparent: &str) -> Option<String> {
    context_of(traceparent.trim()).and_then(|context| traceparent_of(&context))
}

/// The trace context to continue now: the current span's when spans are exported, else the
/// validated `traceparent` of the DTM request being handled.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&Span::current().context()).or_else(|| INCOMING.try_with(Clone::clone).ok().flatten())
}

/// `ext_data` of transaction `gid`, created now: the trace to continue, or empty. Records the
/// gid on the request's span.
pub fn new_ext_data(gid: &str) -> String {
    Span::current().record("gid", gid);
    current_traceparent()
        .map(|traceparent| serde_json::json!({ TRACEPARENT: traceparent }).to_string())
        .unwrap_or_default()
}

/// The trace context a transaction stored when it was created.
pub fn stored_traceparent(ext_data: &str) -> Option<String> {
    if ext_data.is_empty() {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(ext_data).ok()?;
    value.get(TRACEPARENT)?.as_str().and_then(normalized)
}

/// Makes `span` a child of the stored trace (nothing without one).
pub fn continue_trace(span: &Span, ext_data: &str) {
    if let Some(context) = stored_traceparent(ext_data).as_deref().and_then(context_of) {
        let _ = span.set_parent(context);
    }
}

/// The `traceparent` a branch call carries: the current (branch call) span's context when spans
/// are exported, else the trace the transaction stored.
pub fn outgoing_traceparent(stored: Option<&str>) -> Option<String> {
    traceparent_of(&Span::current().context()).or_else(|| stored.map(str::to_owned))
}

/// Runs a DTM request (sent on by `next`) in a span of its own, child of the client's
/// `traceparent`.
pub fn trace_request<F>(request: Request, next: impl FnOnce(Request) -> F) -> BoxFuture<'static, Response>
where
    F: std::future::Future<Output = Response> + Send + 'static,
{
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|path| path.as_str().rsplit('/').find(|s| !s.is_empty() && !s.starts_with('{')))
        .unwrap_or("dtm")
        .to_owned();
    let traceparent = request
        .headers()
        .get(TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let response = next(request);
    Box::pin(async move { traced(&route, traceparent.as_deref(), response).await })
}

/// Runs the handler of one DTM request (HTTP route or gRPC call) in a span of its own, child
/// of the client's `traceparent` (an HTTP header, or gRPC metadata) when it is valid.
pub async fn traced<F: std::future::Future>(route: &str, traceparent: Option<&str>, handler: F) -> F::Output {
    let incoming = traceparent.and_then(normalized);
    let span = tracing::debug_span!(
        "dtm",
        otel.name = %format!("dtm {route}"),
        otel.kind = "server",
        route = %route,
        gid = tracing::field::Empty,
    );
    if let Some(context) = incoming.as_deref().and_then(context_of) {
        let _ = span.set_parent(context);
    }
    INCOMING.scope(incoming, handler.instrument(span)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn only_valid_trace_contexts_are_kept() {
        assert_eq!(normalized(PARENT).as_deref(), Some(PARENT));
        for bad in [
            "",
            "00-0000-00-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "zz",
        ] {
            assert_eq!(normalized(bad), None, "{bad}");
        }
        let stored = serde_json::json!({"traceparent": PARENT}).to_string();
        assert_eq!(stored_traceparent(&stored).as_deref(), Some(PARENT));
        assert_eq!(stored_traceparent("not json"), None);
        assert_eq!(stored_traceparent(""), None);
    }

    #[test]
    fn without_exported_spans_the_stored_trace_is_passed_on() {
        assert_eq!(outgoing_traceparent(Some(PARENT)).as_deref(), Some(PARENT));
        assert_eq!(outgoing_traceparent(None), None);
        assert_eq!(new_ext_data("g"), "");
    }

    #[test]
    fn only_http_endpoints_are_accepted() {
        for bad in ["collector:4318", "ftp://c/", "mailto:x@y"] {
            assert!(matches!(provider(bad), Err(TelemetryError::Endpoint(_))), "{bad}");
        }
    }
}
