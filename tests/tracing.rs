//! Trace propagation end to end: a client's `traceparent` on submit, kubetx's spans exported
//! over OTLP/HTTP to a receiver in this test, and the `traceparent` every branch service on
//! 127.0.0.1 receives. One tree: client span, `dtm submit`, `pass`, one `branch` per call.
//!
//! The subscriber is process-wide, so this file holds one test.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{Bank, Reply, TestServer, transfer_saga};
use kubetx::config::LogFormat;
use serde_json::{Value, json};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One exported span, the fields the test reads.
#[derive(Debug, Clone)]
struct Exported {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: Vec<(String, String)>,
}

impl Exported {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

type Received = Arc<Mutex<Vec<Value>>>;

/// An OTLP/HTTP receiver: keeps every JSON export request.
async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|State(received): State<Received>, body: Bytes| async move {
                let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                received.lock().expect("lock").push(value);
                axum::Json(json!({}))
            }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

fn spans(received: &Received) -> Vec<Exported> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_ascii_lowercase();
    let mut out = Vec::new();
    for request in received.lock().expect("lock").iter() {
        for resource in request["resourceSpans"].as_array().into_iter().flatten() {
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    let attributes = span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            (
                                text(&a["key"]),
                                a["value"]["stringValue"].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect();
                    out.push(Exported {
                        trace_id: text(&span["traceId"]),
                        span_id: text(&span["spanId"]),
                        parent: text(&span["parentSpanId"]),
                        name: span["name"].as_str().unwrap_or_default().to_owned(),
                        attributes,
                    });
                }
            }
        }
    }
    out
}

/// Exports what is buffered and waits until spans named `names` of the trace arrived.
async fn collect(telemetry: &Arc<kubetx::telemetry::Telemetry>, received: &Received, names: &[&str]) -> Vec<Exported> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let flushing = Arc::clone(telemetry);
        tokio::task::spawn_blocking(move || flushing.flush())
            .await
            .expect("flush");
        let found: Vec<Exported> = spans(received).into_iter().filter(|s| s.trace_id == TRACE_ID).collect();
        if names
            .iter()
            .all(|n| found.iter().filter(|s| s.name == *n).count() >= names.iter().filter(|m| *m == n).count())
        {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans never arrived: {found:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The `(trace id, parent span id)` of a W3C traceparent.
fn parts(traceparent: &str) -> (String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    (fields[1].to_owned(), fields[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_runs_from_the_client_through_kubetx_into_every_branch() {
    let (endpoint, received) = receiver().await;
    let telemetry = Arc::new(kubetx::telemetry::init("warn", LogFormat::Text, &endpoint).expect("telemetry"));
    let ts = TestServer::start().await;
    let bank = Bank::start().await;

    // The client's request, inside the client's span.
    let mut body = transfer_saga("traced-1", &bank);
    body["wait_result"] = json!(true);
    bank.script("TransIn", &[Reply::Error]);
    let response = ts
        .http
        .post(ts.url("submit"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .json(&body)
        .send()
        .await
        .expect("submit");
    assert!(response.status().is_success() || response.status().as_u16() == 425);
    ts.wait_parked("traced-1").await;

    // A retry, run from what the store holds (as after a restart), continues the trace.
    ts.advance_and_tick(60).await;
    ts.wait_status("traced-1", "succeed").await;

    let calls = bank.calls_for("traced-1");
    assert_eq!(calls.len(), 3, "TransOut, TransIn (500), TransIn");
    let headers: Vec<(String, String)> = calls
        .iter()
        .map(|c| {
            parts(
                c.headers
                    .get("traceparent")
                    .expect("traceparent")
                    .to_str()
                    .expect("ascii"),
            )
        })
        .collect();
    assert!(headers.iter().all(|(trace, _)| trace == TRACE_ID), "{headers:?}");

    let found = collect(
        &telemetry,
        &received,
        &[
            "dtm submit",
            "pass",
            "pass",
            "branch action",
            "branch action",
            "branch action",
        ],
    )
    .await;
    let one = |name: &str| found.iter().filter(|s| s.name == name).cloned().collect::<Vec<_>>();
    let submit = &one("dtm submit")[0];
    assert_eq!(
        submit.parent, CLIENT_SPAN,
        "the client's span is the parent of the submit"
    );
    let passes = one("pass");
    assert_eq!(passes.len(), 2);
    for pass in &passes {
        assert_eq!(
            pass.parent, submit.span_id,
            "passes continue the trace the submit stored"
        );
        assert_eq!(pass.attribute("gid"), Some("traced-1"));
        assert_eq!(pass.attribute("mode"), Some("saga"));
    }
    let branches = one("branch action");
    assert_eq!(branches.len(), 3);
    for branch in &branches {
        assert!(
            passes.iter().any(|p| p.span_id == branch.parent),
            "a branch call is a child of a pass"
        );
        assert_eq!(branch.attribute("op"), Some("action"));
        assert!(matches!(branch.attribute("branch"), Some("01" | "02")));
    }
    // Each service received the span of its own call as the parent.
    let mut sent: Vec<String> = headers.into_iter().map(|(_, parent)| parent).collect();
    let mut spans: Vec<String> = branches.iter().map(|b| b.span_id.clone()).collect();
    sent.sort();
    spans.sort();
    assert_eq!(sent, spans);
}
