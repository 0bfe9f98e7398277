//! A 2-phase message with the Rust SDK against a running kubetx (`cargo run --release`, or
//! `KUBETX_DTM`): `do_and_submit` runs the local transaction (A pays 30) behind the msg
//! barrier and submits the message that pays B; a local transaction that fails aborts it.
//!
//! Run with `cargo run --example msg`.

#[path = "sdk_bank/mod.rs"]
mod sdk_bank;

use kubetx_client::{Dtm, Error, Msg, WithOptions};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dtm = Dtm::new(&sdk_bank::dtm_url())?;
    let bank = sdk_bank::Bank::start().await?;
    for amount in [30, 1_000_000] {
        let gid = dtm.new_gid().await?;
        println!("msg {gid}: A pays {amount} locally, then the message pays B");
        let pool = bank.pool().clone();
        let outcome = Msg::new(&dtm, &gid)
            .add(&bank.at("TransIn"), &json!({"amount": amount}))
            .wait_result(true)
            .do_and_submit(&bank.at("QueryPrepared"), |barrier| async move {
                barrier
                    .call(&pool, |tx| {
                        Box::pin(async move {
                            let done =
                                sqlx::query("UPDATE account SET balance = balance - ? WHERE id = 1 AND balance >= ?")
                                    .bind(amount)
                                    .bind(amount)
                                    .execute(&mut *tx)
                                    .await?;
                            if done.rows_affected() == 0 {
                                return Err(Error::Failure("insufficient balance".into()));
                            }
                            Ok(())
                        })
                    })
                    .await
                    .map(drop)
            })
            .await;
        let status = dtm.query_global(&gid).await?.map(|t| t.status).unwrap_or_default();
        bank.print_log();
        let (a, b) = bank.balances().await?;
        println!("  => {outcome:?}, msg {status}; balances A={a} B={b}\n");
    }
    Ok(())
}
