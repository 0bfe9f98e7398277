//! TCC with the Rust SDK against a running kubetx (`cargo run --release`, or `KUBETX_DTM`):
//! try both branches then confirm, then a transfer whose TransIn try answers FAILURE, so every
//! registered branch is cancelled.
//!
//! Run with `cargo run --example tcc`.

#[path = "sdk_bank/mod.rs"]
mod sdk_bank;

use kubetx_client::{Dtm, TccBuilder, WithOptions};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dtm = Dtm::new(&sdk_bank::dtm_url())?;
    let bank = sdk_bank::Bank::start().await?;
    for refuse in [false, true] {
        bank.refuse_trans_in(refuse);
        let gid = dtm.new_gid().await?;
        println!("tcc {gid}{}", if refuse { " (TransIn's try refuses)" } else { "" });
        let b = bank.clone();
        let outcome = TccBuilder::new(&dtm, &gid)
            .wait_result(true)
            .run(|tcc| async move {
                let body = json!({"amount": 30});
                tcc.call_branch(
                    &body,
                    &b.at("TransOutTry"),
                    &b.at("TransOutConfirm"),
                    &b.at("TransOutCancel"),
                )
                .await?;
                tcc.call_branch(
                    &body,
                    &b.at("TransInTry"),
                    &b.at("TransInConfirm"),
                    &b.at("TransInCancel"),
                )
                .await?;
                Ok(())
            })
            .await;
        // Cancelling runs after the abort's answer: wait for the end before printing.
        let status = dtm
            .wait_finished(
                &gid,
                std::time::Duration::from_secs(30),
                std::time::Duration::from_millis(50),
            )
            .await?;
        bank.print_log();
        let (a, b) = bank.balances().await?;
        println!("  => {outcome:?}, {status}; balances A={a} B={b}\n");
    }
    Ok(())
}
