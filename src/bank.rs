//! A demo bank service for the examples (`kubetx bank`): two accounts and the endpoints of a
//! transfer as saga, TCC and message branches.
//!
//! Every operation deduplicates on `(gid, branch_id, op)` and records compensations before the
//! action they undo, like DTM's sub-transaction barrier: a repeated call changes nothing, and an
//! action arriving after its compensation is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::proto::busi::busi_server::{Busi, BusiServer};
use crate::proto::busi::{BusiReply, BusiReq};

/// Balances and applied operations.
#[derive(Debug)]
pub struct Bank {
    balances: HashMap<&'static str, i64>,
    done: HashSet<(String, String, String)>,
}

impl Default for Bank {
    fn default() -> Self {
        Bank {
            balances: HashMap::from([("A", 10_000), ("B", 10_000)]),
            done: HashSet::new(),
        }
    }
}

/// The bank's state, shared by its HTTP and gRPC sides.
pub type Shared = Arc<Mutex<Bank>>;

/// The bank's routes under `/api`: `TransOut`, `TransOutRevert`, `TransIn`, `TransInRevert`,
/// `TransInFail` (always refuses), `TransOutTry`/`Confirm`/`Cancel`,
/// `TransInTry`/`Confirm`/`Cancel`, `Notify` (msg) and `QueryPrepared`; `GET /balances`.
pub fn router() -> Router {
    router_with(Shared::default())
}

/// [`router`] on a given bank, so that its gRPC side ([`grpc_service`]) moves the same accounts.
pub fn router_with(bank: Shared) -> Router {
    Router::new()
        .route("/api/{operation}", any(operation))
        .route("/balances", get(balances))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(bank)
}

async fn balances(State(bank): State<Shared>) -> Json<Value> {
    let bank = bank.lock().unwrap_or_else(|p| p.into_inner());
    Json(json!(bank.balances))
}

async fn operation(
    State(bank): State<Shared>,
    Path(operation): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: String,
) -> (StatusCode, Json<Value>) {
    let amount = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["amount"].as_i64())
        .unwrap_or(0);
    let param = |k: &str| query.get(k).cloned().unwrap_or_default();
    if operation == "TransInFail" {
        info!(gid = %param("gid"), "TransInFail refuses the transfer");
        return (StatusCode::CONFLICT, Json(json!({"dtm_result": "FAILURE"})));
    }
    let key = (param("gid"), param("branch_id"), param("op"));
    match apply(&bank, &operation, key, amount) {
        Some(note) => (StatusCode::OK, Json(json!({"dtm_result": "SUCCESS", "note": note}))),
        None => (StatusCode::NOT_FOUND, Json(json!({"message": "no such operation"}))),
    }
}

/// Applies one operation once per `(gid, branch_id, op)`; `None` for an unknown operation,
/// otherwise what happened ("applied", "duplicate ignored", "nothing to undo").
fn apply(bank: &Shared, operation: &str, key: (String, String, String), amount: i64) -> Option<&'static str> {
    let (account, delta, undoes): (&str, i64, bool) = match operation {
        "TransOut" | "TransOutTry" => ("A", -amount, false),
        "TransOutRevert" | "TransOutCancel" => ("A", amount, true),
        "TransIn" | "TransInConfirm" | "Notify" => ("B", amount, false),
        "TransInRevert" => ("B", -amount, true),
        "TransOutConfirm" | "TransInTry" | "TransInCancel" | "QueryPrepared" => ("A", 0, false),
        _ => return None,
    };
    let mut bank = bank.lock().unwrap_or_else(|p| p.into_inner());
    if !bank.done.insert(key.clone()) {
        return Some("duplicate ignored");
    }
    let (gid, branch_id, op) = key;
    if undoes {
        // Mark the original as done too: if it never ran, a late arrival must not apply it.
        let original = if op == "cancel" { "try" } else { "action" };
        if bank.done.insert((gid.clone(), branch_id.clone(), original.to_owned())) {
            return Some("nothing to undo");
        }
    }
    *bank.balances.entry(account).or_default() += delta;
    info!(%operation, %gid, %branch_id, %op, amount, "applied");
    Some("applied")
}

/// The bank's gRPC side, `busi.Busi` (DTM's quick-start service): the same accounts and
/// deduplication as the HTTP routes, keyed by the `dtm-gid`, `dtm-branch_id` and `dtm-op`
/// metadata a coordinator sends; `TransOutResult`/`TransInResult` FAILURE refuse with `Aborted`.
pub fn grpc_service(bank: Shared) -> BusiServer<GrpcBank> {
    BusiServer::new(GrpcBank(bank))
}

/// Implementation of `busi.Busi` over a [`Shared`] bank.
#[derive(Debug, Clone)]
pub struct GrpcBank(Shared);

impl GrpcBank {
    fn call(&self, operation: &str, request: &Request<BusiReq>) -> Result<Response<BusiReply>, Status> {
        let meta = |key: &str| {
            let value = request.metadata().get(key).and_then(|v| v.to_str().ok());
            value.unwrap_or_default().to_owned()
        };
        let req = request.get_ref();
        let refusal = match operation {
            "TransOut" => req.trans_out_result.as_str(),
            "TransIn" => req.trans_in_result.as_str(),
            _ => "",
        };
        if refusal == "FAILURE" {
            info!(gid = %meta("dtm-gid"), %operation, "refused as the request asks");
            return Err(Status::aborted("FAILURE"));
        }
        let key = (meta("dtm-gid"), meta("dtm-branch_id"), meta("dtm-op"));
        let note = apply(&self.0, operation, key, req.amount).unwrap_or("no such operation");
        Ok(Response::new(BusiReply {
            message: note.to_owned(),
        }))
    }
}

#[tonic::async_trait]
impl Busi for GrpcBank {
    async fn trans_out(&self, request: Request<BusiReq>) -> Result<Response<BusiReply>, Status> {
        self.call("TransOut", &request)
    }

    async fn trans_out_revert(&self, request: Request<BusiReq>) -> Result<Response<BusiReply>, Status> {
        self.call("TransOutRevert", &request)
    }

    async fn trans_in(&self, request: Request<BusiReq>) -> Result<Response<BusiReply>, Status> {
        self.call("TransIn", &request)
    }

    async fn trans_in_revert(&self, request: Request<BusiReq>) -> Result<Response<BusiReply>, Status> {
        self.call("TransInRevert", &request)
    }
}
