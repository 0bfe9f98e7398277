//! Command line: `kubetx serve` (the default) with flags and `KUBETX_*` environment variables
//! over an optional YAML file.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use std::time::Duration;

use crate::config::{Config, ConfigError, LogFormat};
use crate::metrics::Metrics;
use crate::operator::leader::LeaderConfig;
use crate::operator::reconcile::ReconcileConfig;
use crate::operator::{DEFAULT_LEASE_DURATION, Operator, OperatorConfig, health};
use crate::scheduler::Clock;
use crate::scheduler::SystemClock;
use crate::server::{ServeError, Server, shutdown_signal};
use crate::store::StoreKind;
use crate::store::Synchronous;
use crate::telemetry;

/// Errors of a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Tracing could not be set up.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes client could not be configured.
    #[error("cannot reach Kubernetes: {0}")]
    Kube(#[source] Box<kube::Error>),
    /// The operator stopped with an error.
    #[error(transparent)]
    Operator(#[from] crate::operator::OperatorError),
    /// The CRDs could not be rendered.
    #[error("cannot render CRDs: {0}")]
    Crd(#[from] yaml_serde::Error),
    /// The benchmark failed.
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
}

/// kubetx: distributed transactions (saga, TCC, 2-phase message, XA, workflow) with a
/// DTM-compatible API.
#[derive(Debug, Parser)]
#[command(name = "kubetx", version, about)]
pub struct Cli {
    /// What to run; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve the DTM-compatible API (SQLite by default; PostgreSQL or MySQL with --store).
    Serve(ServeArgs),
    /// Run the Kubernetes operator (Saga, Tcc and Msg controllers) and the DTM API beside it
    /// (`--listen ""` turns the API off).
    Operator(OperatorArgs),
    /// Run the demo bank service the examples call.
    Bank {
        /// Address to listen on.
        #[arg(long, env = "BANK_LISTEN", default_value = "0.0.0.0:8080")]
        listen: String,
        /// Address of the bank's gRPC side, `busi.Busi` (DTM's quick-start service), for gRPC
        /// branches; empty: HTTP only.
        #[arg(long, env = "BANK_GRPC_LISTEN", default_value = "")]
        grpc_listen: String,
    },
    /// Benchmark kubetx against a trivial bank service on 127.0.0.1 (see BENCHMARKS.md).
    Bench(crate::bench::BenchArgs),
    /// Print the CustomResourceDefinitions (YAML) of Saga, Tcc and Msg, or write one file per
    /// CRD into a directory.
    Crd {
        /// Directory to write `<plural>.kubetx.io.yaml` files into, instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

/// Flags of `serve`; each overrides the config file and has a `KUBETX_*` variable.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// YAML configuration file (see config/kubetx.yaml).
    #[arg(short, long, env = "KUBETX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API. For `kubetx operator`, an empty value (`--listen ""`) turns the
    /// DTM API off: only the controllers and the health port run.
    #[arg(long, env = "KUBETX_LISTEN")]
    pub listen: Option<String>,
    /// Address of DTM's gRPC API (dtmgimp.Dtm); an empty value (`--grpc-listen ""`) turns it off.
    #[arg(long, env = "KUBETX_GRPC_LISTEN")]
    pub grpc_listen: Option<String>,
    /// Store URL: postgres://..., mysql://..., redis://... (rediss:// for TLS; password also from
    /// KUBETX_REDIS_PASSWORD), sqlite://path or a path; empty for --db.
    #[arg(long, env = "KUBETX_STORE")]
    pub store: Option<String>,
    /// Do not run the store's schema migrations on start.
    #[arg(long, env = "KUBETX_SKIP_MIGRATIONS", num_args = 0..=1, default_missing_value = "true")]
    pub skip_migrations: Option<bool>,
    /// Connection pool size of the PostgreSQL and MySQL stores.
    #[arg(long, env = "KUBETX_STORE_MAX_CONNECTIONS")]
    pub store_max_connections: Option<u32>,
    /// Milliseconds a call waits for a database connection before failing with 503.
    #[arg(long, env = "KUBETX_STORE_ACQUIRE_TIMEOUT_MS")]
    pub store_acquire_timeout_ms: Option<u64>,
    /// PostgreSQL group commit: up to this many writes committed together in one transaction
    /// (default 64; 0: each write its own statement).
    #[arg(long, env = "KUBETX_STORE_GROUP_COMMIT")]
    pub store_group_commit: Option<usize>,
    /// Seconds after which finished transactions are deleted; 0 keeps them.
    #[arg(long, env = "KUBETX_RETENTION")]
    pub retention: Option<u64>,
    /// Seconds between retention sweeps.
    #[arg(long, env = "KUBETX_RETENTION_INTERVAL")]
    pub retention_interval: Option<u64>,
    /// SQLite database file.
    #[arg(long, env = "KUBETX_DB")]
    pub db: Option<String>,
    /// SQLite durability: full (survives power loss) or normal.
    #[arg(long, env = "KUBETX_SQLITE_SYNCHRONOUS")]
    pub sqlite_synchronous: Option<Synchronous>,
    /// Base retry interval in seconds.
    #[arg(long, env = "KUBETX_RETRY_INTERVAL")]
    pub retry_interval: Option<i64>,
    /// Backoff cap in seconds.
    #[arg(long, env = "KUBETX_MAX_RETRY_INTERVAL")]
    pub max_retry_interval: Option<i64>,
    /// Default timeout of msg, tcc and xa in seconds.
    #[arg(long, env = "KUBETX_TIMEOUT_TO_FAIL")]
    pub timeout_to_fail: Option<i64>,
    /// Default branch call timeout in seconds.
    #[arg(long, env = "KUBETX_REQUEST_TIMEOUT")]
    pub request_timeout: Option<u64>,
    /// Longest branch call timeout in seconds, whatever a transaction asks for.
    #[arg(long, env = "KUBETX_MAX_REQUEST_TIMEOUT")]
    pub max_request_timeout: Option<u64>,
    /// Most passes running at once; beyond it, non-waiting submits are left to the scheduler.
    #[arg(long, env = "KUBETX_MAX_CONCURRENT_PASSES")]
    pub max_concurrent_passes: Option<usize>,
    /// Longest time spent on one API request in seconds (503 after it).
    #[arg(long, env = "KUBETX_HTTP_TIMEOUT")]
    pub http_timeout: Option<u64>,
    /// Most API requests handled at once.
    #[arg(long, env = "KUBETX_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Lease length in seconds.
    #[arg(long, env = "KUBETX_LEASE")]
    pub lease: Option<u64>,
    /// This process's identity on a shared store (a pod name; empty: fresh per process). A
    /// restart under the same identity resumes its predecessor's transactions at once.
    #[arg(long, env = "KUBETX_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Idle polling interval of the scheduler in milliseconds.
    #[arg(long, env = "KUBETX_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<u64>,
    /// Largest request body in bytes.
    #[arg(long, env = "KUBETX_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Alert webhook URL.
    #[arg(long, env = "KUBETX_ALERT_WEBHOOK")]
    pub alert_webhook: Option<String>,
    /// Backoff doublings before an alert.
    #[arg(long, env = "KUBETX_ALERT_RETRY_LIMIT")]
    pub alert_retry_limit: Option<u32>,
    /// Seconds to drain in-flight work on SIGTERM.
    #[arg(long, env = "KUBETX_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<u64>,
    /// Log filter.
    #[arg(long, env = "KUBETX_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, env = "KUBETX_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// OTLP/HTTP collector base URL; spans are exported to `<url>/v1/traces`. Empty: none.
    #[arg(long, env = "KUBETX_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Hosts branches may be called on (`name`, `*.suffix` or `*`; comma-separated). `serve`
    /// allows every host when neither this nor --allow-cidrs is set; the operator always allows
    /// cluster services.
    #[arg(long, env = "KUBETX_ALLOW_HOSTS", value_delimiter = ',')]
    pub allow_hosts: Vec<String>,
    /// Address ranges branches may be called on (comma-separated CIDRs).
    #[arg(long, env = "KUBETX_ALLOW_CIDRS", value_delimiter = ',')]
    pub allow_cidrs: Vec<String>,
    /// Classify branch replies by status and a JSON `dtm_result` only (not by the words
    /// FAILURE and ONGOING anywhere in the body, as DTM does).
    #[arg(long, env = "KUBETX_STRICT_RESULTS", num_args = 0..=1, default_missing_value = "true")]
    pub strict_results: Option<bool>,
    /// PEM certificate chain of the API listener (HTTPS with --tls-key-file).
    #[arg(long, env = "KUBETX_TLS_CERT_FILE")]
    pub tls_cert_file: Option<String>,
    /// PEM private key of the API listener.
    #[arg(long, env = "KUBETX_TLS_KEY_FILE")]
    pub tls_key_file: Option<String>,
    /// PEM bundle of the CAs whose client certificates the API requires (mTLS).
    #[arg(long, env = "KUBETX_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<String>,
    /// Seconds between checks of the token file and the TLS files for changes.
    #[arg(long, env = "KUBETX_RELOAD_INTERVAL")]
    pub reload_interval: Option<u64>,
    /// File of bearer tokens the DTM API and metrics require, one per line.
    #[arg(long, env = "KUBETX_API_TOKENS_FILE")]
    pub api_tokens_file: Option<String>,
    /// PEM bundle of CAs trusted for HTTPS branch calls, besides the system's roots.
    #[arg(long, env = "KUBETX_BRANCH_CA_FILE")]
    pub branch_ca_file: Option<String>,
    /// PEM certificate chain presented to HTTPS branches (mTLS; with --branch-client-key-file).
    #[arg(long, env = "KUBETX_BRANCH_CLIENT_CERT_FILE")]
    pub branch_client_cert_file: Option<String>,
    /// PEM private key of --branch-client-cert-file.
    #[arg(long, env = "KUBETX_BRANCH_CLIENT_KEY_FILE")]
    pub branch_client_key_file: Option<String>,
}

/// Flags of `operator`.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Settings of the DTM API that runs beside the controllers.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Namespaces to watch (comma-separated); all when empty.
    #[arg(long, env = "KUBETX_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Elect a leader among replicas through a Lease.
    #[arg(long, env = "KUBETX_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "KUBETX_LEASE_NAME", default_value = "kubetx-operator")]
    pub lease_name: String,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the election.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "KUBETX_HEALTH_LISTEN", default_value = "0.0.0.0:8080")]
    pub health_listen: String,
    /// Seconds to keep finished resources that set no ttlSecondsAfterFinished (0 keeps them).
    #[arg(long, env = "KUBETX_DEFAULT_TTL", default_value_t = 7 * 24 * 3600)]
    pub default_ttl: i64,
    /// Resources reconciled at once per kind.
    #[arg(long, env = "KUBETX_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    /// DNS suffix of Service endpoints.
    #[arg(long, env = "KUBETX_SERVICE_DOMAIN", default_value = "svc")]
    pub service_domain: String,
}

impl ServeArgs {
    /// Defaults, then the file, then these flags.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(value) = self.$flag.clone() { config.$($field).+ = value; })*
            };
        }
        set!(
            listen => listen,
            grpc_listen => grpc_listen,
            store => store,
            skip_migrations => skip_migrations,
            store_max_connections => store_max_connections,
            store_acquire_timeout_ms => store_acquire_timeout_ms,
            store_group_commit => store_group_commit,
            retention => retention,
            retention_interval => retention_interval,
            db => sqlite.path,
            sqlite_synchronous => sqlite.synchronous,
            retry_interval => retry_interval,
            max_retry_interval => max_retry_interval,
            timeout_to_fail => timeout_to_fail,
            request_timeout => request_timeout,
            max_request_timeout => max_request_timeout,
            max_concurrent_passes => max_concurrent_passes,
            http_timeout => http_timeout,
            max_concurrent_requests => max_concurrent_requests,
            lease => lease,
            instance_id => instance_id,
            poll_interval_ms => poll_interval_ms,
            max_body_bytes => max_body_bytes,
            alert_webhook => alert_webhook,
            alert_retry_limit => alert_retry_limit,
            drain_timeout => drain_timeout,
            log_level => log_level,
            log_format => log_format,
            otlp_endpoint => otlp_endpoint,
            strict_results => strict_results,
            api_tokens_file => api_tokens_file,
            tls_cert_file => tls_cert_file,
            tls_key_file => tls_key_file,
            tls_client_ca_file => tls_client_ca_file,
            reload_interval => reload_interval,
            branch_ca_file => branch_ca_file,
            branch_client_cert_file => branch_client_cert_file,
            branch_client_key_file => branch_client_key_file,
        );
        // Bearer tokens come from the environment (comma-separated) or a file, never from the
        // command line, which every user of the machine can read.
        if let Ok(tokens) = std::env::var("KUBETX_API_TOKENS") {
            config.api_tokens = tokens.split(',').map(str::to_owned).collect();
        }
        if !self.allow_hosts.is_empty() {
            config.allow_hosts.clone_from(&self.allow_hosts);
        }
        if !self.allow_cidrs.is_empty() {
            config.allow_cidrs.clone_from(&self.allow_cidrs);
        }
        config.validate()?;
        Ok(config)
    }
}

/// The demo bank: HTTP on `listen`, and `busi.Busi` over gRPC on `grpc_listen` when set.
async fn bank(listen: &str, grpc_listen: &str) -> Result<(), CliError> {
    init_logging("info", LogFormat::Text);
    let bind = |addr: &str| {
        let addr = addr.to_owned();
        async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|source| CliError::Serve(ServeError::Bind { addr, source }))
        }
    };
    let accounts = crate::bank::Shared::default();
    if !grpc_listen.is_empty() {
        let incoming = tonic::transport::server::TcpIncoming::from(bind(grpc_listen).await?);
        let service = crate::bank::grpc_service(accounts.clone());
        tracing::info!(%grpc_listen, "demo bank serving busi.Busi over gRPC");
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, shutdown_signal())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the bank's gRPC side stopped");
            }
        });
    }
    let listener = bind(listen).await?;
    tracing::info!(%listen, "demo bank serving");
    axum::serve(listener, crate::bank::router_with(accounts))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| CliError::Serve(ServeError::Http(e)))
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(&args.config()?).await,
        Command::Operator(args) => operator(&args).await,
        Command::Bank { listen, grpc_listen } => bank(&listen, &grpc_listen).await,
        Command::Bench(args) => Ok(crate::bench::main(&args).await?),
        Command::Crd { out_dir: None } => {
            print!("{}", crate::operator::crd::crds_yaml()?);
            Ok(())
        }
        Command::Crd { out_dir: Some(dir) } => {
            for (name, yaml) in crate::operator::crd::crd_files()? {
                let path = dir.join(name);
                std::fs::write(&path, yaml).map_err(|source| CliError::Write { path, source })?;
            }
            Ok(())
        }
    }
}

async fn serve(config: &Config) -> Result<(), CliError> {
    // Only the operator has something to do without its API.
    if config.listen.is_empty() {
        return Err(ConfigError::Invalid("listen is empty: `kubetx serve` needs an API address".to_owned()).into());
    }
    let telemetry = telemetry::init(&config.log_level, config.log_format, &config.otlp_endpoint)?;
    let server = Server::start(config, Arc::new(SystemClock), true).await?;
    shutdown_signal().await;
    let stopped = server.stop().await;
    flush_spans(telemetry).await;
    stopped?;
    Ok(())
}

async fn operator(args: &OperatorArgs) -> Result<(), CliError> {
    let config = args.serve.config()?;
    let telemetry = telemetry::init(&config.log_level, config.log_format, &config.otlp_endpoint)?;
    let result = run_operator(args, config).await;
    flush_spans(telemetry).await;
    result
}

/// Exports the spans still buffered (the exporter blocks, so off the async threads).
async fn flush_spans(telemetry: telemetry::Telemetry) {
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
}

async fn run_operator(args: &OperatorArgs, config: Config) -> Result<(), CliError> {
    let metrics = Arc::new(Metrics::new());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // One policy for the controllers and the DTM API beside them.
    let policy = config.operator_policy(&args.service_domain)?;
    let invoker = config.invoker(policy).map_err(|e| CliError::Serve(e.into()))?;
    let server =
        Server::start_with_invoker(&config, Arc::clone(&clock), true, Arc::clone(&metrics), invoker.clone()).await?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| CliError::Kube(Box::new(e)))?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("kubetx-{:08x}", rand::random::<u32>()));
    let operator_config = OperatorConfig {
        namespaces: args.namespaces.iter().filter(|n| !n.is_empty()).cloned().collect(),
        leader: args.leader_election.then(|| LeaderConfig {
            lease_name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone(),
            identity: identity.clone(),
            lease_duration: DEFAULT_LEASE_DURATION,
        }),
        reconcile: ReconcileConfig {
            policy: config.scheduler().policy,
            request_timeout: Duration::from_secs(config.request_timeout),
            max_request_timeout: Duration::from_secs(config.max_request_timeout),
            default_ttl: Some(args.default_ttl).filter(|ttl| *ttl > 0),
            service_domain: args.service_domain.clone(),
            // With PostgreSQL, MySQL or Redis, branch detail goes to the store and the status keeps
            // a summary.
            store: match config.store_kind()? {
                StoreKind::Postgres(_) | StoreKind::MySql(_) | StoreKind::Redis(_) => {
                    Some(Arc::clone(server.coordinator.store()))
                }
                StoreKind::Sqlite(_) => None,
            },
        },
        concurrency: args.concurrency,
        reporter: identity,
    };
    let operator = Operator::start(client, operator_config, clock, Arc::clone(&metrics), invoker);
    let health = health::router(Arc::clone(&operator.health), metrics);
    let listener = tokio::net::TcpListener::bind(&args.health_listen)
        .await
        .map_err(|source| {
            CliError::Serve(ServeError::Bind {
                addr: args.health_listen.clone(),
                source,
            })
        })?;
    let stop = operator.shutdown_token();
    let probes = tokio::spawn(async move {
        axum::serve(listener, health)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    let token = operator.shutdown_token();
    tokio::select! {
        _ = shutdown_signal() => token.cancel(),
        _ = token.cancelled() => {}
    }
    let result = operator.stop().await;
    // The probes stop with the operator's token; their own error matters less than its.
    let _ = probes.await;
    server.stop().await?;
    result.map_err(CliError::Operator)
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
