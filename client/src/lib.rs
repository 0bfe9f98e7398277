//! `kubetx-client`: the Rust SDK for kubetx (and DTM, whose HTTP protocol kubetx speaks).
//!
//! Every DTM mode from one crate: [`Saga`], [`Msg`] (with `do_and_submit` behind the barrier),
//! TCC ([`Dtm::tcc_global_transaction`]), XA ([`Dtm::xa_global_transaction`] and, with the
//! `postgres`/`mysql` features, [`xa::ResourceManager`]) and [`workflow`]; DTM's
//! sub-transaction [`barrier`] over sqlx (features `sqlite`, `postgres`, `mysql`) and Redis
//! (feature `redis`); and, with the `axum` feature, the branch parameters as an extractor and
//! DTM's answers (200, 409 FAILURE, 425 ONGOING) for `Result`.
//!
//! ```no_run
//! # async fn run() -> kubetx_client::Result<()> {
//! use kubetx_client::{Dtm, Saga, WithOptions};
//! let dtm = Dtm::new("http://127.0.0.1:36789/api/dtmsvr")?;
//! let gid = dtm.new_gid().await?;
//! Saga::new(&dtm, &gid)
//!     .add("http://bank/TransOut", "http://bank/TransOutRevert", &serde_json::json!({"amount": 30}))
//!     .add("http://bank/TransIn", "http://bank/TransInRevert", &serde_json::json!({"amount": 30}))
//!     .wait_result(true)
//!     .submit()
//!     .await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "axum")]
pub mod axum;
pub mod barrier;
mod base;
mod branch;
pub mod error;
mod msg;
mod options;
mod query;
mod saga;
mod tcc;
mod transport;
pub mod workflow;
pub mod xa;

pub use branch::BranchParams;
pub use error::{Error, Result};
pub use msg::Msg;
pub use options::{TransOptions, WithOptions};
pub use query::{BranchRow, QueryResult, TransGlobal};
pub use saga::Saga;
pub use tcc::{Tcc, TccBuilder};
pub use transport::{Dtm, install_crypto_provider};
pub use workflow::{Workflow, WorkflowRegistry};
pub use xa::{Xa, XaBuilder};
