//! A real gRPC bank on 127.0.0.1 for the gRPC tests: tonic serving `busi.Busi/<Method>` (any
//! method, DTM's busi service names) and `workflow.Workflow/Execute` (the generated server of
//! kubetx's own proto), replies scripted per method, every call recorded with its metadata.
//! It runs on a runtime of its own, on its own thread, so that `kill` drops every connection at
//! once, the way a crashed process does.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use kubetx::proto::workflow::WorkflowData;
use kubetx::proto::workflow::workflow_server::{Workflow, WorkflowServer};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

/// DTM's busi request message (`busi.BusiReq`), for realistic payloads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BusiReq {
    #[prost(int64, tag = "1")]
    pub amount: i64,
    #[prost(string, tag = "2")]
    pub user_id: String,
}

/// The encoded `BusiReq{amount, user_id: "u1"}`.
pub fn busi(amount: i64) -> Vec<u8> {
    prost::Message::encode_to_vec(&BusiReq {
        amount,
        user_id: "u1".to_owned(),
    })
}

/// What a method answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GReply {
    Ok,
    /// `Aborted`: DTM's FAILURE.
    Aborted,
    /// `FailedPrecondition`: DTM's ONGOING.
    Ongoing,
    /// `Unavailable`, an unknown outcome.
    Unavailable,
    /// Answers OK after this many milliseconds.
    Slow(u64),
    /// The process dies while handling the call: no answer, every connection dropped.
    Die,
}

/// One call the bank received.
#[derive(Debug, Clone)]
pub struct GCall {
    /// `TransOut`, `Execute`, ...
    pub method: String,
    pub gid: String,
    pub trans_type: String,
    pub branch_id: String,
    pub op: String,
    /// The `dtm-dtm` metadata, when present.
    pub dtm: Option<String>,
    pub metadata: MetadataMap,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct State {
    script: HashMap<String, VecDeque<GReply>>,
    calls: Vec<GCall>,
}

/// The bank; `kill` and `restart` model a crash and a restart on the same port.
pub struct GrpcBank {
    pub addr: SocketAddr,
    /// Serves TLS with the test server certificate (tests/fixtures/tls).
    tls: bool,
    /// With TLS, requires a client certificate signed by `client-ca.pem`.
    mtls: bool,
    state: Arc<Mutex<State>>,
    stop: Arc<Mutex<Option<std::sync::mpsc::Sender<()>>>>,
}

impl GrpcBank {
    pub async fn start() -> Self {
        Self::start_with(false, false).await
    }

    /// A bank that speaks TLS only, with `tests/fixtures/tls/server.pem` (localhost, 127.0.0.1).
    pub async fn start_tls() -> Self {
        Self::start_with(true, false).await
    }

    /// Like `start_tls`, requiring a client certificate signed by `client-ca.pem` (mTLS).
    pub async fn start_mtls() -> Self {
        Self::start_with(true, true).await
    }

    async fn start_with(tls: bool, mtls: bool) -> Self {
        let state = Arc::default();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let bank = GrpcBank {
            addr,
            tls,
            mtls,
            state,
            stop: Arc::default(),
        };
        bank.restart().await;
        bank
    }

    /// Starts serving again on the same port (after `kill`).
    pub async fn restart(&self) {
        let listener = std::net::TcpListener::bind(self.addr).expect("bind the bank's port");
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        *self.stop.lock().expect("stop") = Some(stop.clone());
        let service = Bank {
            state: Arc::clone(&self.state),
            die: stop,
        };
        let tls = self.tls.then(|| {
            let fixture = |name: &str| {
                std::fs::read(format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
            };
            let config = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
                fixture("server.pem"),
                fixture("server.key"),
            ));
            match self.mtls {
                true => config.client_ca_root(tonic::transport::Certificate::from_pem(fixture("client-ca.pem"))),
                false => config,
            }
        });
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("bank runtime");
            runtime.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let workflow = WorkflowServer::new(service.clone());
                let mut builder = tonic::transport::Server::builder();
                if let Some(tls) = tls {
                    builder = builder.tls_config(tls).expect("TLS config");
                }
                let _ = builder
                    .add_service(service)
                    .add_service(workflow)
                    .serve_with_incoming(incoming)
                    .await;
            });
            // Until killed; then the runtime and every connection go at once.
            let _ = stopped.recv();
            runtime.shutdown_background();
        });
    }

    /// Kills the bank: every connection drops, the port refuses.
    pub fn kill(&self) {
        if let Some(stop) = self.stop.lock().expect("stop").take() {
            let _ = stop.send(());
        }
    }

    /// `host:port/busi.Busi/<method>`, DTM's target form.
    pub fn target(&self, method: &str) -> String {
        format!("{}/busi.Busi/{method}", self.addr)
    }

    /// The workflow callback target.
    pub fn workflow_target(&self) -> String {
        format!("{}/workflow.Workflow/Execute", self.addr)
    }

    pub fn script(&self, method: &str, replies: &[GReply]) {
        self.state
            .lock()
            .expect("state")
            .script
            .insert(method.to_owned(), replies.iter().copied().collect());
    }

    pub fn calls(&self) -> Vec<GCall> {
        self.state.lock().expect("state").calls.clone()
    }

    pub fn calls_for(&self, gid: &str) -> Vec<GCall> {
        self.calls().into_iter().filter(|c| c.gid == gid).collect()
    }

    /// Methods called for `gid`, in order.
    pub fn methods(&self, gid: &str) -> Vec<String> {
        self.calls_for(gid).into_iter().map(|c| c.method).collect()
    }

    /// Waits (polling, with a deadline) until `gid` has `n` calls.
    pub async fn wait_calls(&self, gid: &str, n: usize) -> Vec<GCall> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let calls = self.calls_for(gid);
            if calls.len() >= n {
                return calls;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{gid}: {} calls, expected {n}",
                calls.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for GrpcBank {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone)]
struct Bank {
    state: Arc<Mutex<State>>,
    die: std::sync::mpsc::Sender<()>,
}

fn text(metadata: &MetadataMap, key: &str) -> Option<String> {
    metadata.get(key).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl Bank {
    /// Records the call and answers as scripted.
    async fn handle(&self, method: &str, metadata: MetadataMap, body: Vec<u8>) -> Result<(), Status> {
        let reply = {
            let mut state = self.state.lock().expect("state");
            let field = |key: &str| text(&metadata, key).unwrap_or_default();
            let call = GCall {
                method: method.to_owned(),
                gid: field("dtm-gid"),
                trans_type: field("dtm-trans_type"),
                branch_id: field("dtm-branch_id"),
                op: field("dtm-op"),
                dtm: text(&metadata, "dtm-dtm"),
                metadata: metadata.clone(),
                body,
            };
            state.calls.push(call);
            state
                .script
                .get_mut(method)
                .and_then(VecDeque::pop_front)
                .unwrap_or(GReply::Ok)
        };
        match reply {
            GReply::Ok => Ok(()),
            GReply::Aborted => Err(Status::aborted("FAILURE: insufficient balance")),
            GReply::Ongoing => Err(Status::failed_precondition("ONGOING")),
            GReply::Unavailable => Err(Status::unavailable("busy")),
            GReply::Slow(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
            GReply::Die => {
                let _ = self.die.send(());
                std::future::pending().await
            }
        }
    }
}

#[tonic::async_trait]
impl Workflow for Bank {
    async fn execute(&self, request: Request<WorkflowData>) -> Result<Response<()>, Status> {
        let metadata = request.metadata().clone();
        let body = prost::Message::encode_to_vec(request.get_ref());
        self.handle("Execute", metadata, body).await.map(Response::new)
    }
}

impl tonic::server::NamedService for Bank {
    const NAME: &'static str = "busi.Busi";
}

impl tower::Service<http::Request<tonic::body::Body>> for Bank {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
        let handler = Method {
            bank: self.clone(),
            method,
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(BytesCodec);
            Ok(grpc.unary(handler, request).await)
        })
    }
}

/// One busi method: the request bytes as they came.
struct Method {
    bank: Bank,
    method: String,
}

impl tonic::server::UnaryService<Vec<u8>> for Method {
    type Response = ();
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, Status>> + Send>>;

    fn call(&mut self, request: Request<Vec<u8>>) -> Self::Future {
        let bank = self.bank.clone();
        let method = self.method.clone();
        Box::pin(async move {
            let metadata = request.metadata().clone();
            bank.handle(&method, metadata, request.into_inner())
                .await
                .map(Response::new)
        })
    }
}

/// Reads the request bytes as they are; answers an empty message (`google.protobuf.Empty`).
#[derive(Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = ();
    type Decode = Vec<u8>;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = ();
    type Error = Status;

    fn encode(&mut self, _item: (), _dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}
