//! Assembles store, invoker, scheduler and API into a running server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{self, ApiConfig};
use crate::config::Config;
use crate::invoke::{InvokeError, Invoker};
use crate::metrics::Metrics;
use crate::scheduler::{Clock, Coordinator, SchedulerError};
use crate::store::{self, Store, StoreError, retention};
use crate::{reload, tls};

/// How long `/readyz` waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The API's certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
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
    /// The gRPC server could not be set up or failed.
    #[error("grpc server failed: {0}")]
    Grpc(String),
}

/// A running server.
pub struct Server {
    /// The address actually bound (useful with port 0); `0.0.0.0:0` when the API is off (an
    /// empty `listen`, which only `kubetx operator` accepts).
    pub addr: SocketAddr,
    /// The address the gRPC API bound, when it is on.
    pub grpc_addr: Option<SocketAddr>,
    /// The scheduler, for tests that step time by hand.
    pub coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
    tls: bool,
    http: JoinHandle<Result<(), std::io::Error>>,
    grpc: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    scheduler: Option<JoinHandle<()>>,
    retention: Option<JoinHandle<()>>,
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
        let invoker = config.invoker(config.outbound_policy()?)?;
        Self::start_with_invoker(config, clock, run_scheduler, metrics, invoker).await
    }

    /// Like [`Server::start_with_metrics`], calling branches through `invoker` (the operator's,
    /// so that both front doors obey one policy).
    pub async fn start_with_invoker(
        config: &Config,
        clock: Arc<dyn Clock>,
        run_scheduler: bool,
        metrics: Arc<Metrics>,
        invoker: Invoker,
    ) -> Result<Self, ServeError> {
        config.validate()?;
        let options = config.store_options()?;
        let store: Arc<dyn Store> = Arc::new(crate::timed_store::TimedStore::new(
            store::open(&options).await?,
            Arc::clone(&metrics),
        ));
        let coordinator = Arc::new(Coordinator::new(store, invoker, clock, config.scheduler(), metrics));
        // Before the API answers: a restarted process resumes its predecessor's work at once.
        coordinator.reclaim_leases().await.map_err(|error| match error {
            SchedulerError::Store(error) => ServeError::Store(error),
            other => ServeError::Store(StoreError::Unavailable(other.to_string())),
        })?;
        // An empty address turns the API off: store, scheduler and retention still run (the
        // operator's controllers use the store, and transactions already in it are finished).
        let listener = match config.listen.is_empty() {
            true => None,
            false => Some(
                TcpListener::bind(&config.listen)
                    .await
                    .map_err(|source| ServeError::Bind {
                        addr: config.listen.clone(),
                        source,
                    })?,
            ),
        };
        let addr = match &listener {
            Some(listener) => listener.local_addr().map_err(ServeError::Http)?,
            None => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let ready_store = Arc::clone(coordinator.store());
        let shutdown = CancellationToken::new();
        // One set for both front doors, reloaded from its file.
        let tokens = config.tokens(&shutdown)?;
        let api_state = api::AppState::new(Arc::clone(&coordinator));
        let router = api::router_with(
            api_state.clone(),
            &ApiConfig {
                max_body_bytes: config.max_body_bytes,
                timeout: Duration::from_secs(config.http_timeout),
                max_concurrent_requests: config.max_concurrent_requests,
                tokens: tokens.clone(),
            },
        )
        .route("/readyz", get(move || readyz(Arc::clone(&ready_store))));
        let tls = match config.tls_cert_file.is_empty() {
            true => None,
            false => Some(reloading_tls(config, &shutdown, b"http/1.1")?),
        };
        let http = match listener {
            Some(listener) => serve_http(listener, tls.clone(), router, shutdown.clone()).map_err(ServeError::Http)?,
            None => tokio::spawn(async { Ok(()) }),
        };
        // An empty `listen` turns the whole DTM API off (the operator without it), gRPC included.
        let (grpc_addr, grpc) = match config.grpc_listen.is_empty() || config.listen.is_empty() {
            true => (None, None),
            false => {
                let (addr, task) = serve_grpc(config, api_state, tokens, shutdown.clone()).await?;
                (Some(addr), Some(task))
            }
        };
        let scheduler = run_scheduler.then(|| tokio::spawn(Arc::clone(&coordinator).run(shutdown.clone())));
        let retention = run_scheduler.then(|| {
            let clock = Arc::clone(&coordinator);
            tokio::spawn(retention::run(
                Arc::clone(coordinator.store()),
                config.retention(),
                move || clock.now(),
                shutdown.clone(),
            ))
        });
        match config.listen.is_empty() {
            true => info!(store = %options.kind.describe(), "the DTM API is off (empty listen address)"),
            false => info!(%addr, store = %options.kind.describe(), "kubetx serving the DTM API"),
        }
        if let Some(grpc_addr) = grpc_addr {
            info!(%grpc_addr, "kubetx serving the DTM gRPC API");
        }
        Ok(Server {
            addr,
            grpc_addr,
            grpc,
            coordinator,
            shutdown,
            tls: tls.is_some(),
            http,
            scheduler,
            retention,
            drain_timeout: Duration::from_secs(config.drain_timeout),
        })
    }

    /// Base URL of the DTM API (`http://addr/api/dtmsvr`, `https://` with TLS).
    pub fn dtm_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/api/dtmsvr", self.addr)
    }

    /// Stops accepting requests, stops the scheduler loop and drains in-flight passes.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        let served = self.http.await;
        if let Some(grpc) = self.grpc {
            match grpc.await {
                Ok(Err(error)) => tracing::warn!(%error, "grpc server failed"),
                Err(error) => tracing::warn!(%error, "grpc server panicked"),
                Ok(Ok(())) => {}
            }
        }
        if let Some(scheduler) = self.scheduler {
            // A panicked loop has nothing left to drain.
            let _ = scheduler.await;
        }
        if let Some(retention) = self.retention {
            // Stops at the next batch boundary; a panicked sweep has nothing to finish.
            let _ = retention.await;
        }
        self.coordinator.drain(self.drain_timeout).await;
        match served {
            Ok(result) => result.map_err(ServeError::Http),
            Err(join) => Err(ServeError::Http(std::io::Error::other(join))),
        }
    }
}

/// A listener's TLS configuration offering `alpn`, rebuilt when the certificate, key or client
/// CA files change.
fn reloading_tls(
    config: &Config,
    stop: &CancellationToken,
    alpn: &'static [u8],
) -> Result<watch::Receiver<Arc<rustls::ServerConfig>>, ServeError> {
    let files: Vec<PathBuf> = [&config.tls_cert_file, &config.tls_key_file, &config.tls_client_ca_file]
        .into_iter()
        .filter(|file| !file.is_empty())
        .map(PathBuf::from)
        .collect();
    let build = {
        let config = config.clone();
        move || {
            tls::server_config(
                Path::new(&config.tls_cert_file),
                Path::new(&config.tls_key_file),
                Some(Path::new(&config.tls_client_ca_file)).filter(|p| !p.as_os_str().is_empty()),
                alpn,
            )
        }
    };
    let tls = reload::watch_files(
        "API TLS certificate",
        files,
        Duration::from_secs(config.reload_interval),
        build,
        stop.clone(),
    )?;
    Ok(tls)
}

/// Binds `grpc_listen` and serves DTM's gRPC API there until `stop`: the same coordinator,
/// tokens, request size, timeout, concurrency bound and TLS files as the HTTP API.
async fn serve_grpc(
    config: &Config,
    state: api::AppState,
    tokens: api::auth::Tokens,
    stop: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<(), tonic::transport::Error>>), ServeError> {
    let listener = TcpListener::bind(&config.grpc_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.grpc_listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    // One bound for the whole listener, as the HTTP API has: a client opening many connections
    // gets no more requests in flight than one.
    let mut builder = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(config.http_timeout))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.max_concurrent_requests.max(1),
        ));
    let service = api::grpc::service(state, tokens, config.max_body_bytes);
    let router = builder.add_service(service);
    let stopped = stop.clone();
    let until_stopped = async move { stopped.cancelled().await };
    let task = match config.tls_cert_file.is_empty() {
        true => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(async move { router.serve_with_incoming_shutdown(incoming, until_stopped).await })
        }
        // The HTTP API's files, reloaded the same way, offering HTTP/2 (gRPC clients require it).
        false => {
            let tls = reloading_tls(config, &stop, b"h2")?;
            let listener = tls::TlsListener::new(listener, tls, stop.clone()).map_err(ServeError::Http)?;
            let incoming = futures::stream::unfold(listener, |mut listener| async move {
                let (stream, _) = axum::serve::Listener::accept(&mut listener).await;
                Some((Ok::<_, std::io::Error>(stream), listener))
            });
            tokio::spawn(async move { router.serve_with_incoming_shutdown(incoming, until_stopped).await })
        }
    };
    Ok((addr, task))
}

/// Serves the router on `listener`, over TLS when configured, until `stop`.
fn serve_http(
    listener: TcpListener,
    tls: Option<watch::Receiver<Arc<rustls::ServerConfig>>>,
    router: axum::Router,
    stop: CancellationToken,
) -> std::io::Result<JoinHandle<Result<(), std::io::Error>>> {
    let stopped = stop.clone();
    let until_stopped = async move { stopped.cancelled().await };
    Ok(match tls {
        None => tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(until_stopped)
                .await
        }),
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config, stop)?;
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(until_stopped)
                    .await
            })
        }
    })
}

/// `GET /readyz`: 200 when the store answers (with the store's durability warnings, if any),
/// 503 with the reason when it does not.
async fn readyz(store: Arc<dyn Store>) -> Response {
    let answer = match tokio::time::timeout(READY_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => {
            let warnings = tokio::time::timeout(READY_TIMEOUT, store.warnings())
                .await
                .unwrap_or_default();
            let body = match warnings.is_empty() {
                true => json!({"status": "ready"}),
                false => json!({"status": "ready", "warnings": warnings}),
            };
            return (StatusCode::OK, Json(body)).into_response();
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("store did not answer within {} ms", READY_TIMEOUT.as_millis()),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "unavailable", "message": answer})),
    )
        .into_response()
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
