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
use tracing::info;

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

type Shared = Arc<Mutex<Bank>>;

/// The bank's routes under `/api`: `TransOut`, `TransOutRevert`, `TransIn`, `TransInRevert`,
/// `TransInFail` (always refuses), `TransOutTry`/`Confirm`/`Cancel`,
/// `TransInTry`/`Confirm`/`Cancel`, `Notify` (msg) and `QueryPrepared`; `GET /balances`.
pub fn router() -> Router {
    let bank: Shared = Arc::default();
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
    let (gid, branch_id, op) = (param("gid"), param("branch_id"), param("op"));
    let (account, delta, undoes): (&str, i64, Option<&str>) = match operation.as_str() {
        "TransOut" | "TransOutTry" => ("A", -amount, None),
        "TransOutRevert" | "TransOutCancel" => ("A", amount, Some("action")),
        "TransIn" | "TransInConfirm" | "Notify" => ("B", amount, None),
        "TransInRevert" => ("B", -amount, Some("action")),
        "TransOutConfirm" | "TransInTry" | "TransInCancel" | "QueryPrepared" => ("A", 0, None),
        "TransInFail" => {
            info!(%gid, "TransInFail refuses the transfer");
            return (StatusCode::CONFLICT, Json(json!({"dtm_result": "FAILURE"})));
        }
        _ => return (StatusCode::NOT_FOUND, Json(json!({"message": "no such operation"}))),
    };
    let mut bank = bank.lock().unwrap_or_else(|p| p.into_inner());
    let key = (gid.clone(), branch_id.clone(), op.clone());
    if !bank.done.insert(key) {
        return (
            StatusCode::OK,
            Json(json!({"dtm_result": "SUCCESS", "note": "duplicate ignored"})),
        );
    }
    if let Some(original) = undoes.map(|_| if op == "cancel" { "try" } else { "action" }) {
        // Mark the original as done too: if it never ran, a late arrival must not apply it.
        if bank.done.insert((gid.clone(), branch_id.clone(), original.to_owned())) {
            return (
                StatusCode::OK,
                Json(json!({"dtm_result": "SUCCESS", "note": "nothing to undo"})),
            );
        }
    }
    *bank.balances.entry(account).or_default() += delta;
    info!(%operation, %gid, %branch_id, %op, amount, "applied");
    (StatusCode::OK, Json(json!({"dtm_result": "SUCCESS"})))
}
