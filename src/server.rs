//! Assembles store, invoker, scheduler and API into a running server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{self, ApiConfig};
use crate::config::Config;
use crate::invoke::{InvokeError, Invoker};
use crate::metrics::Metrics;
use crate::scheduler::{Clock, Coordinator};
use crate::store::{SqliteStore, Store, StoreError};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("http server failed: {0}")]
    Http(#[source] std::io::Error),
}

/// A running server.
pub struct Server {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// The scheduler, for tests that step time by hand.
    pub coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
    http: JoinHandle<Result<(), std::io::Error>>,
    scheduler: Option<JoinHandle<()>>,
    drain_timeout: Duration,
}

impl Server {
    /// Opens the store, binds the API and starts the scheduler loop (unless `run_scheduler` is
    /// false: tests then call [`Coordinator::tick`] themselves).
    pub async fn start(config: &Config, clock: Arc<dyn Clock>, run_scheduler: bool) -> Result<Self, ServeError> {
        Self::start_with_metrics(config, clock, run_scheduler, Arc::new(Metrics::new())).await
    }

    /// Like [`Server::start`], recording into `metrics` (shared with the operator).
    pub async fn start_with_metrics(
        config: &Config,
        clock: Arc<dyn Clock>,
        run_scheduler: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServeError> {
        config.validate()?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.sqlite.path, config.sqlite.synchronous).await?);
        let coordinator = Arc::new(Coordinator::new(
            store,
            Invoker::new()?,
            clock,
            config.scheduler(),
            metrics,
        ));
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(ServeError::Http)?;
        let router = api::router(
            Arc::clone(&coordinator),
            &ApiConfig {
                max_body_bytes: config.max_body_bytes,
            },
        );
        let shutdown = CancellationToken::new();
        let http = tokio::spawn({
            let stop = shutdown.clone();
            async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }
        });
        let scheduler = run_scheduler.then(|| tokio::spawn(Arc::clone(&coordinator).run(shutdown.clone())));
        info!(%addr, db = %config.sqlite.path, "kubetx serving the DTM API");
        Ok(Server {
            addr,
            coordinator,
            shutdown,
            http,
            scheduler,
            drain_timeout: Duration::from_secs(config.drain_timeout),
        })
    }

    /// Base URL of the DTM API (`http://addr/api/dtmsvr`).
    pub fn dtm_url(&self) -> String {
        format!("http://{}/api/dtmsvr", self.addr)
    }

    /// Stops accepting requests, stops the scheduler loop and drains in-flight passes.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        let served = self.http.await;
        if let Some(scheduler) = self.scheduler {
            // A panicked loop has nothing left to drain.
            let _ = scheduler.await;
        }
        self.coordinator.drain(self.drain_timeout).await;
        match served {
            Ok(result) => result.map_err(ServeError::Http),
            Err(join) => Err(ServeError::Http(std::io::Error::other(join))),
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        // If the handler cannot be installed, only SIGTERM stops the server.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    info!("shutdown requested; draining");
}
