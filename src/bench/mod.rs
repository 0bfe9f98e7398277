//! `kubetx bench`: the benchmark of issue 6.
//!
//! It starts a trivial bank service on 127.0.0.1 (in this process), starts kubetx (a child
//! `kubetx serve`, so that CPU and memory are kubetx's alone; or in this process; or a running one
//! at `--target`), and drives closed-loop clients that play a DTM SDK: 2-step sagas submitted
//! without waiting, with `wait_result`, sagas whose second step fails, 2-branch msgs and 2-branch
//! TCCs, plus the raw ceiling (the same client against the bank alone). A transaction is complete
//! when the bank has received all its branch calls; throughput and end-to-end latency are counted
//! there.

mod bank;
mod kubetx;
mod load;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;

pub use bank::Tracker;
pub use kubetx::{Launch, ProcStats, StoreSpec};
pub use load::Scenario;
pub use report::{RunResult, cost_targets, percentile_ms, table, targets};

use crate::store::Synchronous;
use bank::Bank;
use kubetx::Kubetx;
use load::{ClientFigures, Load};

/// Environment variable with a PostgreSQL URL to benchmark as well (as in the tests).
pub const POSTGRES_URL_ENV: &str = "KUBETX_TEST_POSTGRES_URL";
/// Environment variable with a MySQL/MariaDB URL to benchmark as well.
pub const MYSQL_URL_ENV: &str = "KUBETX_TEST_MYSQL_URL";

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// kubetx or the bank could not be started.
    #[error("cannot start: {0}")]
    Start(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The JSON lines could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Nothing to measure.
    #[error("{0}")]
    Usage(String),
}

/// Flags of `kubetx bench`.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench")]
pub struct BenchArgs {
    /// Seconds measured per run.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Seconds of load before the measured window of each run.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Concurrent clients per run (comma-separated; each count is one run per scenario).
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub clients: Vec<usize>,
    /// Workloads (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "raw,saga,saga-wait,saga-fail,msg,tcc"
    )]
    pub scenarios: Vec<Scenario>,
    /// Stores (comma-separated): `sqlite`, or database URLs handed to `kubetx serve --store`.
    /// Default: sqlite, plus the URLs in KUBETX_TEST_POSTGRES_URL and KUBETX_TEST_MYSQL_URL.
    #[arg(long, value_delimiter = ',')]
    pub stores: Vec<String>,
    /// Benchmark a running kubetx at this base URL (`http://127.0.0.1:36789`) instead of
    /// starting one; its store is whatever it was started with.
    #[arg(long)]
    pub target: Option<String>,
    /// Process id of the `--target` kubetx, for its CPU and memory figures.
    #[arg(long)]
    pub target_pid: Option<u32>,
    /// Run kubetx inside this process (its figures then include the load generator and bank).
    #[arg(long)]
    pub in_process: bool,
    /// kubetx executable to start; default: this one.
    #[arg(long)]
    pub kubetx_bin: Option<PathBuf>,
    /// Log filter of the started kubetx (like DTM's benchmark, which ran at warn).
    #[arg(long, default_value = "warn")]
    pub kubetx_log_level: String,
    /// Directory of the SQLite files (one fresh file per run); default: the temp directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// SQLite durability of the started kubetx.
    #[arg(long, value_enum, default_value = "full")]
    pub sqlite_synchronous: Synchronous,
    /// Transactions one client may keep submitted but not yet complete at the bank; it waits
    /// for one to complete before submitting more. With 1 (the default), N clients keep N
    /// transactions in flight whether or not they wait for results, which makes the figures
    /// of the modes comparable; without a bound (0), clients that do not wait outrun any server
    /// and the measure becomes the growth of a backlog.
    #[arg(long, default_value_t = 1)]
    pub outstanding: usize,
    /// Seconds to wait after a run for its last transactions to complete.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Write the JSON lines to this file (appending) instead of after the table.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl BenchArgs {
    fn launch(&self) -> Result<Launch, BenchError> {
        if let Some(url) = &self.target {
            return Ok(Launch::Target {
                url: url.clone(),
                pid: self.target_pid,
            });
        }
        if self.in_process {
            return Ok(Launch::InProcess);
        }
        let bin = match &self.kubetx_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .map_err(|e| BenchError::Start(format!("cannot find the kubetx executable: {e}")))?,
        };
        Ok(Launch::Child {
            bin,
            log_level: self.kubetx_log_level.clone(),
        })
    }

    fn stores(&self) -> Vec<StoreSpec> {
        let dir = self.data_dir.clone().unwrap_or_else(std::env::temp_dir);
        let mut names = self.stores.clone();
        if names.is_empty() {
            names.push("sqlite".to_owned());
            if self.target.is_none() {
                for var in [POSTGRES_URL_ENV, MYSQL_URL_ENV] {
                    if let Ok(url) = std::env::var(var)
                        && !url.is_empty()
                    {
                        names.push(url);
                    }
                }
            }
        }
        names
            .into_iter()
            .map(|name| match name.as_str() {
                "sqlite" => StoreSpec::Sqlite {
                    dir: dir.clone(),
                    synchronous: self.sqlite_synchronous,
                },
                _ => StoreSpec::Url(name),
            })
            .collect()
    }
}

/// CPU seconds a process used between two readings, when both were taken.
fn cpu_between(before: Option<ProcStats>, after: Option<ProcStats>) -> Option<f64> {
    Some(after?.cpu_seconds - before?.cpu_seconds)
}

/// Runs the benchmark, printing the table, the targets and the JSON lines.
pub async fn main(args: &BenchArgs) -> Result<(), BenchError> {
    let results = run(args).await?;
    println!("{}", table(&results));
    let verdicts = targets(&results);
    if !verdicts.is_empty() {
        println!("Targets (issue 6):\n{verdicts}");
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let verdicts = cost_targets(&results, cores);
    if !verdicts.is_empty() {
        println!("Targets (issue 15):\n{verdicts}");
    }
    let lines: String = results
        .iter()
        .filter_map(|r| serde_json::to_string(r).ok())
        .map(|line| line + "\n")
        .collect();
    match &args.json {
        None => print!("{lines}"),
        Some(path) => {
            use std::io::Write as _;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut file| file.write_all(lines.as_bytes()))
                .map_err(|source| BenchError::Write {
                    path: path.clone(),
                    source,
                })?;
        }
    }
    Ok(())
}

/// Runs every (store, scenario, clients) combination and returns the figures; progress goes to
/// stderr. The raw ceiling runs first, once per client count.
pub async fn run(args: &BenchArgs) -> Result<Vec<RunResult>, BenchError> {
    if args.clients.is_empty() || args.clients.contains(&0) || args.scenarios.is_empty() {
        return Err(BenchError::Usage(
            "need at least one scenario and client counts above 0".to_owned(),
        ));
    }
    if !(args.duration > 0.0 && args.warmup >= 0.0 && args.drain >= 0.0) {
        return Err(BenchError::Usage("durations must be positive".to_owned()));
    }
    crate::invoke::install_crypto_provider();
    let launch = args.launch()?;
    let mut results = Vec::new();
    let mut ceilings = Vec::new();
    if args.scenarios.contains(&Scenario::Raw) {
        for &clients in &args.clients {
            let result = run_one(args, &launch, None, Scenario::Raw, clients, None).await?;
            progress(&result);
            ceilings.push((clients, result.tps));
            results.push(result);
        }
    }
    for store in args.stores() {
        for &scenario in args.scenarios.iter().filter(|&&s| s != Scenario::Raw) {
            for &clients in &args.clients {
                let ceiling = ceilings.iter().find(|(c, _)| *c == clients).map(|(_, tps)| *tps);
                match run_one(args, &launch, Some(&store), scenario, clients, ceiling).await {
                    Ok(result) => {
                        progress(&result);
                        results.push(result);
                    }
                    // A store that cannot start (e.g. a URL this kubetx does not support) is
                    // reported and skipped; the others still run.
                    Err(BenchError::Start(error)) => {
                        eprintln!("{} {}: skipped: {error}", store.name(), scenario.name());
                        break;
                    }
                    Err(other) => return Err(other),
                }
            }
        }
    }
    Ok(results)
}

fn progress(r: &RunResult) {
    eprintln!(
        "{:>8} {:<9} {:>3} clients: {:>7.0} tx/s  e2e p50 {} ms  p99 {} ms  errors {}{}",
        r.store,
        r.scenario,
        r.clients,
        r.tps,
        r.e2e_p50_ms.map_or("-".to_owned(), |v| format!("{v:.2}")),
        r.e2e_p99_ms.map_or("-".to_owned(), |v| format!("{v:.2}")),
        r.errors,
        r.first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
    );
}

fn run_tag() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{millis:x}{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The load generator's client: pooled keep-alive connections, enough idle slots for every
/// client, no Nagle delay.
fn http_client(clients: usize) -> Result<reqwest::Client, BenchError> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn run_one(
    args: &BenchArgs,
    launch: &Launch,
    store: Option<&StoreSpec>,
    scenario: Scenario,
    clients: usize,
    ceiling: Option<f64>,
) -> Result<RunResult, BenchError> {
    let tag = run_tag();
    let tracker = Arc::new(Tracker::default());
    let bank = Bank::start(Arc::clone(&tracker))
        .await
        .map_err(|e| BenchError::Start(format!("bank: {e}")))?;
    let http = http_client(clients)?;
    let kubetx = match store {
        Some(store) => Some(Kubetx::start(launch, store, &tag, &http).await?),
        None => None,
    };
    // Let the fresh process settle before its idle figure.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = kubetx.as_ref().and_then(Kubetx::stats);
    let dtm_url = kubetx.as_ref().map(|k| k.dtm_url.clone()).unwrap_or_default();
    let load = Arc::new(Load::new(
        scenario,
        http,
        dtm_url,
        &bank,
        tag,
        Arc::clone(&tracker),
        args.outstanding,
    ));
    let tasks: Vec<_> = (0..clients).map(|_| tokio::spawn(Arc::clone(&load).client())).collect();
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let before = kubetx.as_ref().and_then(Kubetx::stats);
    let load_before = ProcStats::read(std::process::id());
    let opened = tracker.open_window();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let closed = tracker.close_window();
    let after = kubetx.as_ref().and_then(Kubetx::stats);
    let load_after = ProcStats::read(std::process::id());
    load.stop.store(true, Ordering::Relaxed);
    let mut figures = ClientFigures::default();
    for task in tasks {
        // A panicked client only loses its own samples.
        if let Ok(client) = task.await {
            figures.submit_us.extend(client.submit_us);
            figures.api_requests += client.api_requests;
            figures.errors += client.errors;
            if figures.first_error.is_none() {
                figures.first_error = client.first_error;
            }
        }
    }
    let drain_until = tokio::time::Instant::now() + Duration::from_secs_f64(args.drain);
    while tracker.in_flight() > 0 && tokio::time::Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unfinished = tracker.in_flight();
    let mode = kubetx.as_ref().map_or("none", |_| launch.mode());
    if let Some(kubetx) = kubetx {
        kubetx.stop().await;
    }
    drop(bank);

    let window_s = (closed - opened) as f64 / 1e6;
    let completed = tracker.completed_in_window();
    let tps = completed as f64 / window_s;
    let mut e2e = tracker.e2e_latencies();
    e2e.sort_unstable();
    let mut submit = figures.submit_us;
    submit.sort_unstable();
    let branch_calls_per_s = tracker.calls_in_window() as f64 / window_s;
    let api_requests_per_s = figures.api_requests as f64 / window_s;
    let cpu = cpu_between(before, after);
    // An in-process kubetx runs in this process: the load's CPU cannot be told from kubetx's.
    let load_cpu = cpu_between(load_before, load_after).filter(|_| mode != "in-process");
    let per_tx = |cpu: Option<f64>| cpu.filter(|_| completed > 0).map(|s| s / completed as f64);
    let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(RunResult {
        // A running kubetx's store is whatever it was started with.
        store: match (store, launch) {
            (None, _) => "-".to_owned(),
            (Some(_), Launch::Target { .. }) => "target".to_owned(),
            (Some(store), _) => store.name(),
        },
        scenario: scenario.name(),
        clients,
        kubetx: mode,
        window_s,
        completed,
        tps,
        submit_p50_ms: percentile_ms(&submit, 0.50),
        submit_p99_ms: percentile_ms(&submit, 0.99),
        e2e_p50_ms: (scenario != Scenario::Raw).then(|| percentile_ms(&e2e, 0.50)).flatten(),
        e2e_p99_ms: (scenario != Scenario::Raw).then(|| percentile_ms(&e2e, 0.99)).flatten(),
        cpu_s_per_tx: per_tx(cpu),
        cpu_cores: cpu.map(|s| s / window_s),
        load_cpu_s_per_tx: per_tx(load_cpu),
        rss_idle_mb: idle.map(|s| mb(s.rss_bytes)),
        rss_peak_mb: after.map(|s| mb(s.peak_rss_bytes)),
        branch_calls_per_s,
        api_requests_per_s,
        efficiency: ceiling
            .filter(|&c| c > 0.0)
            .map(|c| (branch_calls_per_s + api_requests_per_s) / c),
        errors: figures.errors,
        first_error: figures.first_error,
        unfinished,
    })
}
