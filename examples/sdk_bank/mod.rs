//! The examples' bank: two accounts in a SQLite file, every operation behind the SDK's
//! sub-transaction barrier, answering as DTM expects (200, 409 FAILURE).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::any;
use kubetx_client::axum::Success;
use kubetx_client::barrier::BranchBarrier;
use kubetx_client::{BranchParams, Error};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};

/// The bank service.
#[derive(Clone)]
pub struct Bank {
    /// Where its routes are: `{url}/TransOut` and so on.
    pub url: String,
    state: Arc<BankState>,
}

struct BankState {
    pool: SqlitePool,
    log: Mutex<Vec<String>>,
    refuse_trans_in: AtomicBool,
    _dir: tempfile::TempDir,
}

/// What an operation does to which account (1 = A, 2 = B).
fn effect(name: &str) -> Option<(i64, i64)> {
    Some(match name {
        "TransOut" | "TransOutTry" | "XaTransOut" => (1, -1),
        "TransOutRevert" | "TransOutCancel" | "XaTransOutRollback" => (1, 1),
        "TransIn" | "TransInConfirm" | "XaTransIn" => (2, 1),
        "TransInRevert" => (2, -1),
        _ => return None,
    })
}

impl Bank {
    /// Starts the bank on 127.0.0.1 (a free port), its accounts in a fresh SQLite file.
    pub async fn start() -> Result<Bank, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("bank.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePool::connect_with(options).await?;
        kubetx_client::barrier::sql::create_table(&pool).await?;
        sqlx::raw_sql(
            "CREATE TABLE account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
             INSERT INTO account VALUES (1, 10000), (2, 10000);",
        )
        .execute(&pool)
        .await?;
        let state = Arc::new(BankState {
            pool,
            log: Mutex::default(),
            refuse_trans_in: AtomicBool::new(false),
            _dir: dir,
        });
        let app = Router::new()
            .route("/api/QueryPrepared", any(query_prepared))
            .route("/api/{name}", any(operation))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/api", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Bank { url, state })
    }

    /// The URL of one operation.
    pub fn at(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// Makes TransIn (and TransInTry) answer FAILURE, or not.
    pub fn refuse_trans_in(&self, refuse: bool) {
        self.state.refuse_trans_in.store(refuse, Ordering::SeqCst);
    }

    /// Takes the log of what the bank did since the last call.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.state.log.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The bank's database (for a local transaction of its own, as a msg's).
    pub fn pool(&self) -> &SqlitePool {
        &self.state.pool
    }

    /// Prints and clears the log.
    pub fn print_log(&self) {
        for line in self.take_log() {
            println!("{line}");
        }
    }

    /// Balances of A and B.
    pub async fn balances(&self) -> Result<(i64, i64), sqlx::Error> {
        let rows: Vec<(i64,)> = sqlx::query_as("SELECT balance FROM account ORDER BY id")
            .fetch_all(&self.state.pool)
            .await?;
        Ok((rows.first().map_or(0, |r| r.0), rows.get(1).map_or(0, |r| r.0)))
    }
}

async fn operation(
    State(bank): State<Arc<BankState>>,
    Path(name): Path<String>,
    params: BranchParams,
    body: Bytes,
) -> kubetx_client::Result<Success> {
    let amount = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["amount"].as_i64())
        .unwrap_or(0);
    let refuse = bank.refuse_trans_in.load(Ordering::SeqCst) && matches!(name.as_str(), "TransIn" | "TransInTry");
    let barrier = BranchBarrier::from_params(&params)?;
    let change = effect(&name).map(|(account, sign)| (account, sign * amount));
    let ran = barrier
        .call(&bank.pool, |tx| {
            Box::pin(async move {
                if refuse {
                    return Err(Error::Failure("TransIn refused".into()));
                }
                if let Some((account, delta)) = change {
                    let done =
                        sqlx::query("UPDATE account SET balance = balance + ? WHERE id = ? AND balance + ? >= 0")
                            .bind(delta)
                            .bind(account)
                            .bind(delta)
                            .execute(&mut *tx)
                            .await?;
                    if done.rows_affected() == 0 {
                        return Err(Error::Failure("insufficient balance".into()));
                    }
                }
                Ok(())
            })
        })
        .await;
    let what = match (&ran, change) {
        (Ok(Some(())), Some((account, delta))) => {
            format!("{} {delta:+}", if account == 1 { "A" } else { "B" })
        }
        (Ok(Some(())), None) => "nothing to change".to_owned(),
        (Ok(None), _) => "skipped by the barrier (repeated, or nothing to undo)".to_owned(),
        (Err(e), _) => format!("answered {e}"),
    };
    let line = format!(
        "  [bank] {name:<15} branch {} op {:<10} {what}",
        params.branch_id, params.op
    );
    bank.log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    ran.map(|_| Success)
}

/// The msg back-check: committed when the local transaction's barrier row is there.
async fn query_prepared(State(bank): State<Arc<BankState>>, params: BranchParams) -> kubetx_client::Result<Success> {
    BranchBarrier::from_params(&params)?.query_prepared(&bank.pool).await?;
    Ok(Success)
}

/// The coordinator's URL: `KUBETX_DTM`, or the one `cargo run --release` serves.
pub fn dtm_url() -> String {
    std::env::var("KUBETX_DTM").unwrap_or_else(|_| "http://127.0.0.1:36789/api/dtmsvr".to_owned())
}
