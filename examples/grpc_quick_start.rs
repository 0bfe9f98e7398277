//! DTM's gRPC quick start, on kubetx: an inter-bank transfer as a saga over gRPC.
//!
//! Starts kubetx (embedded SQLite in a temporary directory, gRPC API on 127.0.0.1) and a gRPC
//! bank (`busi.Busi/TransOut`, `TransIn` and their reverts, DTM's names) on 127.0.0.1, then,
//! with a client generated from the same `dtmgimp` proto DTM's SDKs use:
//! 1. TransOut then TransIn, both succeed;
//! 2. TransIn answers `Aborted` (DTM's FAILURE), so kubetx compensates over gRPC;
//! 3. times a run of sequential `wait_result` sagas, through the gRPC API and the HTTP API.
//!
//! Run with `cargo run --example grpc_quick_start`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Buf;
use kubetx::config::Config;
use kubetx::proto::dtmgimp::dtm_client::DtmClient;
use kubetx::proto::dtmgimp::{DtmRequest, DtmTransOptions};
use kubetx::scheduler::SystemClock;
use kubetx::server::Server;
use serde_json::json;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::{Request, Response, Status};

/// DTM's `busi.BusiReq`.
#[derive(Clone, PartialEq, prost::Message)]
struct BusiReq {
    #[prost(int64, tag = "1")]
    amount: i64,
    #[prost(string, tag = "2")]
    user_id: String,
}

/// The bank: its log, and whether TransIn refuses.
#[derive(Clone, Default)]
struct Bank {
    log: Arc<Mutex<Vec<String>>>,
    refuse_trans_in: Arc<Mutex<bool>>,
    quiet: Arc<Mutex<bool>>,
}

impl Bank {
    fn handle(&self, method: &str, request: &Request<Vec<u8>>) -> Result<(), Status> {
        let gid = request
            .metadata()
            .get("dtm-gid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let amount = <BusiReq as prost::Message>::decode(request.get_ref().as_slice())
            .map(|r| r.amount)
            .unwrap_or_default();
        let refuse = method == "TransIn" && *self.refuse_trans_in.lock().unwrap_or_else(|p| p.into_inner());
        if !*self.quiet.lock().unwrap_or_else(|p| p.into_inner()) {
            let what = if refuse { "refused (Aborted)" } else { "done" };
            self.log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("  [bank] {method:<15} gid={gid} amount={amount}: {what}"));
        }
        if refuse {
            return Err(Status::aborted("FAILURE: account B is closed"));
        }
        Ok(())
    }

    fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
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
        Box::pin(async move { Ok(tonic::server::Grpc::new(BytesCodec).unary(handler, request).await) })
    }
}

struct Method {
    bank: Bank,
    method: String,
}

impl tonic::server::UnaryService<Vec<u8>> for Method {
    type Response = ();
    type Future = std::future::Ready<Result<Response<()>, Status>>;

    fn call(&mut self, request: Request<Vec<u8>>) -> Self::Future {
        std::future::ready(self.bank.handle(&self.method, &request).map(Response::new))
    }
}

/// Reads the request message's bytes; answers `google.protobuf.Empty`.
#[derive(Clone, Copy)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = ();
    type Decode = Vec<u8>;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self {
        BytesCodec
    }
    fn decoder(&mut self) -> Self {
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

/// The transfer saga, as `dtmgrpc.NewSagaGrpc(...).Add(...).Add(...)` sends it.
fn transfer(gid: &str, bank: &str, amount: i64) -> DtmRequest {
    let target = |method: &str| format!("{bank}/busi.Busi/{method}");
    let payload = prost::Message::encode_to_vec(&BusiReq {
        amount,
        user_id: "alice".to_owned(),
    });
    DtmRequest {
        gid: gid.to_owned(),
        trans_type: "saga".to_owned(),
        trans_options: Some(DtmTransOptions {
            wait_result: true,
            ..DtmTransOptions::default()
        }),
        steps: json!([
            {"action": target("TransOut"), "compensate": target("TransOutRevert")},
            {"action": target("TransIn"), "compensate": target("TransInRevert")},
        ])
        .to_string(),
        bin_payloads: vec![payload.clone(), payload],
        ..DtmRequest::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        listen: "127.0.0.1:0".to_owned(),
        grpc_listen: "127.0.0.1:0".to_owned(),
        ..Config::default()
    };
    config.sqlite.path = dir.path().join("kubetx.db").display().to_string();
    let server = Server::start(&config, Arc::new(SystemClock), true).await?;
    let grpc = server.grpc_addr.ok_or("the gRPC API is off")?;

    let bank = Bank::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bank_addr = listener.local_addr()?.to_string();
    let service = bank.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    println!("kubetx gRPC API on {grpc}, bank on {bank_addr}\n");
    let mut dtm = DtmClient::connect(format!("http://{grpc}")).await?;

    let gid = dtm.new_gid(()).await?.into_inner().gid;
    println!("1. transfer {gid}: TransOut, then TransIn");
    let answer = dtm.submit(transfer(&gid, &bank_addr, 30)).await;
    println!("{}", bank.take_log().join("\n"));
    println!(
        "   Submit (wait_result): {}\n",
        if answer.is_ok() { "OK" } else { "error" }
    );

    *bank.refuse_trans_in.lock().unwrap_or_else(|p| p.into_inner()) = true;
    let gid = dtm.new_gid(()).await?.into_inner().gid;
    println!("2. transfer {gid}: TransIn refuses, kubetx compensates");
    let answer = dtm.submit(transfer(&gid, &bank_addr, 30)).await;
    println!("{}", bank.take_log().join("\n"));
    match answer {
        Err(status) => println!("   Submit (wait_result): {:?}: {}\n", status.code(), status.message()),
        Ok(_) => println!("   Submit (wait_result): OK (unexpected)\n"),
    }

    *bank.refuse_trans_in.lock().unwrap_or_else(|p| p.into_inner()) = false;
    *bank.quiet.lock().unwrap_or_else(|p| p.into_inner()) = true;
    let runs = 200;
    let started = Instant::now();
    for i in 0..runs {
        dtm.submit(transfer(&format!("timed-{i}"), &bank_addr, 1)).await?;
    }
    let elapsed = started.elapsed();
    println!(
        "3. {runs} sequential wait_result sagas over gRPC (2 gRPC branch calls each): {:.1} ms each, {:.0} per second",
        elapsed.as_secs_f64() * 1000.0 / f64::from(runs),
        f64::from(runs) / elapsed.as_secs_f64()
    );
    // The same sagas through the HTTP API, for comparison: same store, same gRPC branches.
    let http = reqwest::Client::new();
    let payload = String::from_utf8(prost::Message::encode_to_vec(&BusiReq {
        amount: 1,
        user_id: "alice".to_owned(),
    }))?;
    let target = |method: &str| format!("{bank_addr}/busi.Busi/{method}");
    let started = Instant::now();
    for i in 0..runs {
        let body = json!({
            "gid": format!("timed-http-{i}"), "trans_type": "saga", "protocol": "grpc", "wait_result": true,
            "steps": [
                {"action": target("TransOut"), "compensate": target("TransOutRevert")},
                {"action": target("TransIn"), "compensate": target("TransInRevert")},
            ],
            "payloads": [payload, payload],
        });
        let response = http
            .post(format!("{}/submit", server.dtm_url()))
            .json(&body)
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!("HTTP submit answered {}", response.status()).into());
        }
    }
    let elapsed = started.elapsed();
    println!(
        "   the same through the HTTP API: {:.1} ms each, {:.0} per second",
        elapsed.as_secs_f64() * 1000.0 / f64::from(runs),
        f64::from(runs) / elapsed.as_secs_f64()
    );
    server.stop().await?;
    Ok(())
}
