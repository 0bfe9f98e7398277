//! A saga with the Rust SDK against a running kubetx (`cargo run --release`, or `KUBETX_DTM`):
//! a transfer that succeeds, then one whose TransIn answers FAILURE and is compensated.
//!
//! Run with `cargo run --example saga`.

#[path = "sdk_bank/mod.rs"]
mod sdk_bank;

use kubetx_client::{Dtm, Saga, WithOptions};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dtm = Dtm::new(&sdk_bank::dtm_url())?;
    let bank = sdk_bank::Bank::start().await?;
    for refuse in [false, true] {
        bank.refuse_trans_in(refuse);
        let gid = dtm.new_gid().await?;
        println!("saga {gid}{}", if refuse { " (TransIn refuses)" } else { "" });
        let outcome = Saga::new(&dtm, &gid)
            .add(&bank.at("TransOut"), &bank.at("TransOutRevert"), &json!({"amount": 30}))
            .add(&bank.at("TransIn"), &bank.at("TransInRevert"), &json!({"amount": 30}))
            .wait_result(true)
            .submit()
            .await;
        bank.print_log();
        let (a, b) = bank.balances().await?;
        println!("  => {outcome:?}; balances A={a} B={b}\n");
    }
    Ok(())
}
