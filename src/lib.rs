//! kubetx: a distributed transaction coordinator (saga, TCC, 2-phase message, XA, workflow)
//! with a DTM-compatible HTTP API and a Kubernetes operator.
//!
//! Layers, dependencies pointing down only: [`model`] and [`engine`] are pure; [`invoke`] calls
//! branches; [`store`] persists; [`scheduler`] drives; [`api`] serves HTTP.

pub mod activity;
pub mod api;
pub mod bank;
pub mod bench;
pub mod cli;
pub mod config;
pub mod driver;
pub mod engine;
pub mod invoke;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod operator;
pub mod proto;
pub mod reload;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod timed_store;
pub mod tls;
