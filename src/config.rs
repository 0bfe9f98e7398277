//! Server configuration: defaults, then a YAML file, then environment variables, then flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::auth::{TokenSet, Tokens};
use crate::engine::Policy;
use crate::invoke::policy::OutboundPolicy;
use crate::invoke::{InvokeError, Invoker};
use crate::limits::{self, MAX_CALL_TIMEOUT_SECONDS};
use crate::reload;
use crate::scheduler::SchedulerConfig;
use crate::store::retention::Retention;
use crate::store::{StoreKind, StoreOptions, Synchronous};

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML for this configuration.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: yaml_serde::Error,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The embedded store's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteConfig {
    /// Database file.
    pub path: String,
    /// `full` survives power loss; `normal` survives process crashes only, and is faster.
    pub synchronous: Synchronous,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            path: "./kubetx.db".to_owned(),
            synchronous: Synchronous::Full,
        }
    }
}

/// Everything `kubetx serve` can be told. Durations are in seconds unless the name says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the DTM-compatible HTTP API.
    pub listen: String,
    /// Address of DTM's gRPC API (`dtmgimp.Dtm`); empty turns it off, and so does an empty
    /// `listen` (the operator without its DTM API). Same TLS and tokens as the HTTP API.
    pub grpc_listen: String,
    /// Where transactions live: empty for the SQLite file of `sqlite.path`; `postgres://...` or
    /// `mysql://...` or `redis://...` for a database several replicas share; `sqlite://path` or a
    /// path for SQLite.
    pub store: String,
    /// Do not run the store's schema migrations on start.
    pub skip_migrations: bool,
    /// Connection pool size of the PostgreSQL and MySQL stores.
    pub store_max_connections: u32,
    /// How long a call waits for a database connection before it fails (503), in milliseconds.
    pub store_acquire_timeout_ms: u64,
    /// PostgreSQL group commit: up to this many queued writes committed together in one
    /// database transaction (64 by default); 0 runs every write as its own statement.
    pub store_group_commit: usize,
    /// The embedded SQLite store.
    pub sqlite: SqliteConfig,
    /// Finished transactions are deleted this long after their last write; 0 keeps them forever.
    pub retention: u64,
    /// Transactions deleted per retention batch.
    pub retention_batch: i64,
    /// Pause between retention sweeps.
    pub retention_interval: u64,
    /// Base retry interval of transactions that set none.
    pub retry_interval: i64,
    /// Cap of the exponential backoff.
    pub max_retry_interval: i64,
    /// Timeout of msg, tcc and xa transactions that set none.
    pub timeout_to_fail: i64,
    /// Branch call timeout of transactions that set none.
    pub request_timeout: u64,
    /// Longest branch call timeout, whatever a transaction or resource asks for (at most the
    /// schema's bound, 3,600).
    pub max_request_timeout: u64,
    /// Most passes running at once in this process; a transaction submitted without
    /// `wait_result` beyond it is left due in the store for the scheduler.
    pub max_concurrent_passes: usize,
    /// Longest time the API spends on one request (a `wait_result` pass included), in seconds:
    /// 503 after it.
    pub http_timeout: u64,
    /// Most API requests handled at once; more wait (within `http_timeout`).
    pub max_concurrent_requests: usize,
    /// How long a process may drive a transaction before another may take it over.
    pub lease: u64,
    /// This process's identity on a shared store (the chart sets the pod name): a restart under
    /// the same identity resumes its predecessor's transactions at once instead of waiting for
    /// their leases to expire. Empty: a fresh identity per process. At most one live process
    /// may use an identity.
    pub instance_id: String,
    /// How often the scheduler looks for due transactions when idle, in milliseconds.
    pub poll_interval_ms: u64,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// URL that receives a POST when a transaction keeps failing; empty for none.
    pub alert_webhook: String,
    /// Backoff doublings before the alert webhook is called.
    pub alert_retry_limit: u32,
    /// On SIGTERM, how long to wait for in-flight transactions.
    pub drain_timeout: u64,
    /// Log filter (`info`, `kubetx=debug`, ...); `RUST_LOG` wins when set.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// OTLP/HTTP collector base URL (`http://collector:4318`): spans go to `<it>/v1/traces`.
    /// Empty: no spans are exported (a client's `traceparent` still reaches the branches).
    pub otlp_endpoint: String,
    /// Host patterns branches may be called on (`name`, `*.suffix`, `*`). With `allow_cidrs`
    /// both empty, every host and address may be called except link-local and metadata ones.
    pub allow_hosts: Vec<String>,
    /// Address ranges branches may be called on (CIDRs or addresses).
    pub allow_cidrs: Vec<String>,
    /// Classify branch replies by status and a JSON `dtm_result` only, not by the words FAILURE
    /// and ONGOING anywhere in the body (DTM's rule).
    pub strict_results: bool,
    /// File of bearer tokens for the DTM API and metrics, one per line (`#` starts a comment);
    /// empty for none. Several tokens allow rotation.
    pub api_tokens_file: String,
    /// Tokens given by the environment (`KUBETX_API_TOKENS`), never read from or written to a
    /// file.
    #[serde(skip)]
    pub api_tokens: Vec<String>,
    /// PEM certificate chain of the API listener; with `tls_key_file`, the API speaks HTTPS
    /// only. Empty: plain HTTP.
    pub tls_cert_file: String,
    /// PEM private key of the API listener.
    pub tls_key_file: String,
    /// How often the token file and the listener's TLS files are checked for changes, in
    /// seconds; a change takes effect without a restart.
    pub reload_interval: u64,
    /// PEM bundle of the CAs whose client certificates the API requires (mTLS); empty: none.
    pub tls_client_ca_file: String,
    /// PEM bundle of CAs trusted for HTTPS branch calls, besides the system's roots; empty:
    /// the system's only.
    pub branch_ca_file: String,
    /// PEM certificate chain presented to HTTPS branches that ask for one (mTLS); with
    /// `branch_client_key_file`.
    pub branch_client_cert_file: String,
    /// PEM private key of `branch_client_cert_file`.
    pub branch_client_key_file: String,
}

/// Largest PostgreSQL group commit: a batch holds its row locks until it commits.
const MAX_GROUP_COMMIT: usize = 4096;
/// PostgreSQL group commit's default batch: the writes of 64 clients' transactions at once.
const DEFAULT_GROUP_COMMIT: usize = 64;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:36789".to_owned(),
            grpc_listen: "127.0.0.1:36790".to_owned(),
            store: String::new(),
            skip_migrations: false,
            store_max_connections: 16,
            store_acquire_timeout_ms: 2000,
            store_group_commit: DEFAULT_GROUP_COMMIT,
            sqlite: SqliteConfig::default(),
            retention: 7 * 24 * 3600,
            retention_batch: 500,
            retention_interval: 60,
            retry_interval: 10,
            max_retry_interval: 300,
            timeout_to_fail: 35,
            request_timeout: 3,
            max_request_timeout: 600,
            max_concurrent_passes: 1024,
            http_timeout: 60,
            max_concurrent_requests: 1024,
            lease: 30,
            instance_id: String::new(),
            poll_interval_ms: 1000,
            max_body_bytes: 1024 * 1024,
            alert_webhook: String::new(),
            alert_retry_limit: 3,
            drain_timeout: 30,
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            otlp_endpoint: String::new(),
            allow_hosts: Vec::new(),
            allow_cidrs: Vec::new(),
            strict_results: false,
            api_tokens_file: String::new(),
            api_tokens: Vec::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_client_ca_file: String::new(),
            reload_interval: 10,
            branch_ca_file: String::new(),
            branch_client_cert_file: String::new(),
            branch_client_key_file: String::new(),
        }
    }
}

impl Config {
    /// Reads a YAML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        yaml_serde::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("retry_interval", self.retry_interval),
            ("max_retry_interval", self.max_retry_interval),
            ("timeout_to_fail", self.timeout_to_fail),
            ("request_timeout", self.request_timeout as i64),
            ("lease", self.lease as i64),
            ("poll_interval_ms", self.poll_interval_ms as i64),
            ("max_body_bytes", self.max_body_bytes as i64),
            ("store_max_connections", self.store_max_connections as i64),
            ("store_acquire_timeout_ms", self.store_acquire_timeout_ms as i64),
            ("retention_batch", self.retention_batch),
            ("retention_interval", self.retention_interval as i64),
            ("http_timeout", self.http_timeout as i64),
            ("reload_interval", self.reload_interval as i64),
            ("max_concurrent_passes", self.max_concurrent_passes as i64),
            ("max_concurrent_requests", self.max_concurrent_requests as i64),
        ];
        for (name, value) in positive {
            if value <= 0 {
                return Err(ConfigError::Invalid(format!("{name} must be positive")));
            }
        }
        if self.store_group_commit > MAX_GROUP_COMMIT {
            return Err(ConfigError::Invalid(format!(
                "store_group_commit must be at most {MAX_GROUP_COMMIT}"
            )));
        }
        if self.max_retry_interval < self.retry_interval {
            return Err(ConfigError::Invalid(
                "max_retry_interval must not be below retry_interval".to_owned(),
            ));
        }
        limits::check_range(
            "max_request_timeout",
            self.max_request_timeout as i64,
            self.request_timeout as i64,
            MAX_CALL_TIMEOUT_SECONDS,
        )
        .map_err(ConfigError::Invalid)?;
        // An interval past a day is a mistake, and a huge one would overflow the timer.
        limits::check_range("reload_interval", self.reload_interval as i64, 1, 86_400).map_err(ConfigError::Invalid)?;
        if self.lease <= self.request_timeout {
            return Err(ConfigError::Invalid(
                "lease must be longer than request_timeout".to_owned(),
            ));
        }
        check_instance_id(&self.instance_id).map_err(ConfigError::Invalid)?;
        self.store_kind()?;
        self.outbound_policy()?;
        if !self.tls_client_ca_file.is_empty() && self.tls_cert_file.is_empty() {
            return Err(ConfigError::Invalid(
                "tls_client_ca_file needs tls_cert_file and tls_key_file".to_owned(),
            ));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return Err(ConfigError::Invalid(
                "tls_cert_file and tls_key_file go together".to_owned(),
            ));
        }
        if self.branch_client_cert_file.is_empty() != self.branch_client_key_file.is_empty() {
            return Err(ConfigError::Invalid(
                "branch_client_cert_file and branch_client_key_file go together".to_owned(),
            ));
        }
        Ok(())
    }

    /// The API's bearer tokens: the environment's and the file's; none means no authentication.
    /// A token file that holds no token is an error rather than an open API.
    pub fn token_set(&self) -> Result<TokenSet, ConfigError> {
        let mut tokens = self.api_tokens.clone();
        if !self.api_tokens_file.is_empty() {
            let text = std::fs::read_to_string(&self.api_tokens_file).map_err(|source| ConfigError::Read {
                path: self.api_tokens_file.clone(),
                source,
            })?;
            let before = tokens.len();
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty() && !line.starts_with('#'))
                    .map(str::to_owned),
            );
            if tokens.len() == before {
                return Err(ConfigError::Invalid(format!(
                    "api_tokens_file {} holds no token",
                    self.api_tokens_file
                )));
            }
        }
        Ok(TokenSet::new(tokens))
    }

    /// The API's bearer tokens, re-read every `reload_interval` from the token file when there is
    /// one, until `stop`.
    pub fn tokens(&self, stop: &CancellationToken) -> Result<Tokens, ConfigError> {
        if self.api_tokens_file.is_empty() {
            return Ok(watch::channel(self.token_set()?).1.into());
        }
        let config = self.clone();
        let tokens = reload::watch_files(
            "API tokens",
            vec![PathBuf::from(&self.api_tokens_file)],
            Duration::from_secs(self.reload_interval),
            move || config.token_set(),
            stop.clone(),
        )?;
        Ok(tokens.into())
    }

    /// The branch client of `kubetx serve` (its policy and classification).
    pub fn invoker(&self, policy: OutboundPolicy) -> Result<Invoker, InvokeError> {
        let mut builder = Invoker::builder(policy).strict_results(self.strict_results);
        if !self.branch_ca_file.is_empty() {
            builder = builder.ca_file(&self.branch_ca_file);
        }
        if !self.branch_client_cert_file.is_empty() || !self.branch_client_key_file.is_empty() {
            builder = builder.client_identity_files(&self.branch_client_cert_file, &self.branch_client_key_file);
        }
        builder.build()
    }

    /// The outbound policy of `kubetx serve`: exactly the allowed hosts and CIDRs, or, when
    /// neither is set, everything but link-local and metadata addresses.
    pub fn outbound_policy(&self) -> Result<OutboundPolicy, ConfigError> {
        if self.allow_hosts.is_empty() && self.allow_cidrs.is_empty() {
            return Ok(OutboundPolicy::permissive());
        }
        OutboundPolicy::new(&self.allow_hosts, &self.allow_cidrs).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// The outbound policy of `kubetx operator`, for its controllers and its DTM API: cluster
    /// services plus the allowed hosts and CIDRs.
    pub fn operator_policy(&self, service_domain: &str) -> Result<OutboundPolicy, ConfigError> {
        OutboundPolicy::cluster(&self.allow_hosts, &self.allow_cidrs, service_domain)
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// The store the `store` key (or, when empty, `sqlite.path`) names.
    pub fn store_kind(&self) -> Result<StoreKind, ConfigError> {
        StoreKind::parse(&self.store, &self.sqlite.path).map_err(|e| ConfigError::Invalid(format!("store: {e}")))
    }

    /// How to open the store.
    pub fn store_options(&self) -> Result<StoreOptions, ConfigError> {
        Ok(StoreOptions {
            kind: self.store_kind()?,
            synchronous: self.sqlite.synchronous,
            migrate: !self.skip_migrations,
            max_connections: self.store_max_connections,
            acquire_timeout: Duration::from_millis(self.store_acquire_timeout_ms),
            group_commit: self.store_group_commit,
        })
    }

    /// Retention settings.
    pub fn retention(&self) -> Retention {
        Retention {
            max_age: (self.retention > 0).then(|| Duration::from_secs(self.retention)),
            batch: self.retention_batch,
            interval: Duration::from_secs(self.retention_interval),
        }
    }

    /// The scheduler's view of this configuration.
    pub fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            policy: Policy {
                retry_interval: self.retry_interval,
                max_retry_interval: self.max_retry_interval,
                timeout_to_fail: self.timeout_to_fail,
            },
            request_timeout: Duration::from_secs(self.request_timeout),
            max_request_timeout: Duration::from_secs(self.max_request_timeout),
            max_concurrent_passes: self.max_concurrent_passes,
            lease: Duration::from_secs(self.lease),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            alert_webhook: Some(self.alert_webhook.clone()).filter(|w| !w.is_empty()),
            alert_retry_limit: self.alert_retry_limit,
            instance_id: self.instance_id.clone(),
            ..SchedulerConfig::default()
        }
    }
}

/// An instance id is empty (generated) or a short name of letters, digits, `.`, `_` and `-`
/// (a pod name): it starts every lease owner, so it must not contain the owner's `/`.
fn check_instance_id(id: &str) -> Result<(), String> {
    limits::check_len("instance_id", id, limits::MAX_INSTANCE_ID_LEN)?;
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("instance_id: only letters, digits, '.', '_' and '-' are allowed".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_file_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubetx.yaml");
        let config = Config::from_file(&path).expect("sample config parses");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = yaml_serde::from_str::<Config>("listne: 1.2.3.4:5").unwrap_err();
        assert!(error.to_string().contains("listne"), "{error}");
    }

    #[test]
    fn store_urls_are_checked_and_default_to_the_sqlite_path() {
        let config = Config::default();
        assert_eq!(
            config.store_kind().ok(),
            Some(StoreKind::Sqlite("./kubetx.db".to_owned()))
        );
        let config = Config {
            store: "postgres://kubetx@db/app".to_owned(),
            ..Config::default()
        };
        assert!(matches!(config.store_kind(), Ok(StoreKind::Postgres(_))));
        let config = Config {
            store: "redis://cache".to_owned(),
            ..Config::default()
        };
        assert!(matches!(config.store_kind(), Ok(StoreKind::Redis(_))));
        let config = Config {
            store: "memcached://cache".to_owned(),
            ..Config::default()
        };
        assert!(config.validate().is_err());
        assert!(Config::default().retention().max_age.is_some());
        let keep = Config {
            retention: 0,
            ..Config::default()
        };
        assert_eq!(keep.retention().max_age, None);
    }

    #[test]
    fn ranges_are_checked() {
        let config = Config {
            lease: 2,
            request_timeout: 3,
            ..Config::default()
        };
        assert!(config.validate().is_err());
        assert!(Config::default().validate().is_ok());
        for (id, ok) in [
            ("kubetx-7d9f8-abcde", true),
            ("a/b", false),
            ("has space", false),
            (&"x".repeat(limits::MAX_INSTANCE_ID_LEN + 1), false),
        ] {
            let config = Config {
                instance_id: id.to_owned(),
                ..Config::default()
            };
            assert_eq!(config.validate().is_ok(), ok, "{id}");
        }
        for (group_commit, ok) in [(0, true), (MAX_GROUP_COMMIT, true), (MAX_GROUP_COMMIT + 1, false)] {
            let config = Config {
                store_group_commit: group_commit,
                ..Config::default()
            };
            assert_eq!(config.validate().is_ok(), ok, "{group_commit}");
        }
    }
}
