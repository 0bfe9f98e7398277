//! `/healthz`, `/readyz` and `/metrics` of the operator.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Debug, Default)]
pub struct Health {
    /// The controllers' watches have listed everything once.
    pub synced: AtomicBool,
    /// This replica runs the controllers.
    pub leading: AtomicBool,
    /// This replica waits for the leader Lease (healthy, ready to take over).
    pub standby: AtomicBool,
}

impl Health {
    /// Ready: leading with synced watches, or standing by.
    pub fn ready(&self) -> bool {
        let leading = self.leading.load(Ordering::SeqCst) && self.synced.load(Ordering::SeqCst);
        leading || self.standby.load(Ordering::SeqCst)
    }
}

/// The probe and metrics routes.
pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State((health, _)): State<(Arc<Health>, Arc<Metrics>)>| async move {
                if health.ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready: watches not synced")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State((_, metrics)): State<(Arc<Health>, Arc<Metrics>)>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
                    .into_response()
            }),
        )
        .with_state((health, metrics))
}
