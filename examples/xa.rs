//! XA with the Rust SDK against a running kubetx (`cargo run --release`, or `KUBETX_DTM`): a
//! resource manager on MariaDB/MySQL (`KUBETX_XA_MYSQL_URL`, by default
//! `mysql://root@127.0.0.1:3306/test`) prepares each branch with `XA PREPARE`; kubetx commits
//! both, or rolls both back when one refuses.
//!
//! Run with `cargo run --example xa`.

#[path = "sdk_bank/mod.rs"]
mod sdk_bank;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use kubetx_client::axum::Success;
use kubetx_client::xa::ResourceManager;
use kubetx_client::{BranchParams, Dtm, Error, WithOptions, XaBuilder};
use serde_json::json;
use sqlx::MySqlPool;

/// A branch call: op `action` runs the local transaction and prepares it, `commit` and
/// `rollback` are kubetx's phase 2.
async fn branch(
    State(rm): State<Arc<ResourceManager<sqlx::MySql>>>,
    Path(name): Path<String>,
    params: BranchParams,
    body: Bytes,
) -> kubetx_client::Result<Success> {
    if params.op != "action" {
        rm.phase2(&params).await?;
        println!("  [rm] {name:<9} {}", params.op);
        return Ok(Success);
    }
    let amount = serde_json::from_slice::<serde_json::Value>(&body)?["amount"]
        .as_i64()
        .unwrap_or(0);
    let (account, delta) = if name == "TransOut" { (1, -amount) } else { (2, amount) };
    let prepared = rm
        .local_transaction(&params, |tx| {
            Box::pin(async move {
                let done =
                    sqlx::query("UPDATE sdk_xa_example SET balance = balance + ? WHERE id = ? AND balance + ? >= 0")
                        .bind(delta)
                        .bind(account)
                        .bind(delta)
                        .execute(&mut *tx)
                        .await?;
                if done.rows_affected() == 0 {
                    return Err(Error::Failure("insufficient balance".into()));
                }
                Ok(())
            })
        })
        .await;
    println!("  [rm] {name:<9} prepared: {prepared:?}");
    prepared.map(|()| Success)
}

async fn balances(pool: &MySqlPool) -> Result<Vec<i64>, sqlx::Error> {
    let rows: Vec<(i64,)> = sqlx::query_as("SELECT balance FROM sdk_xa_example ORDER BY id")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dtm = Dtm::new(&sdk_bank::dtm_url())?;
    let url = std::env::var("KUBETX_XA_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    let pool = MySqlPool::connect(&url).await?;
    kubetx_client::barrier::sql::create_table(&pool).await?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS sdk_xa_example;
         CREATE TABLE sdk_xa_example (id int PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO sdk_xa_example VALUES (1, 10000), (2, 10000);",
    )
    .execute(&pool)
    .await?;
    let rm = Arc::new(ResourceManager::new(&dtm, pool.clone()));
    let app = Router::new().route("/api/xa/{name}", post(branch)).with_state(rm);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/api/xa", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    for amount_out in [30, 1_000_000] {
        let gid = dtm.new_gid().await?;
        println!("xa {gid}: A pays {amount_out}, B receives 30");
        let base = base.clone();
        let outcome = XaBuilder::new(&dtm, &gid)
            .wait_result(true)
            .run(|xa| async move {
                xa.call_branch(&json!({"amount": 30}), &format!("{base}/TransIn"))
                    .await?;
                xa.call_branch(&json!({"amount": amount_out}), &format!("{base}/TransOut"))
                    .await?;
                Ok(())
            })
            .await;
        let status = dtm
            .wait_finished(
                &gid,
                std::time::Duration::from_secs(30),
                std::time::Duration::from_millis(50),
            )
            .await?;
        println!("  => {outcome:?}, {status}; balances {:?}\n", balances(&pool).await?);
    }
    sqlx::raw_sql("DROP TABLE sdk_xa_example").execute(&pool).await?;
    Ok(())
}
