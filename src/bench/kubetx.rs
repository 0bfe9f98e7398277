//! The kubetx under test: a child `kubetx serve` (CPU and memory are then kubetx's alone), a
//! server inside the benchmark's process on its own runtime, or a running one at a URL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::BenchError;
use crate::config::Config;
use crate::scheduler::SystemClock;
use crate::server::Server;
use crate::store::Synchronous;

/// CPU time and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User plus system CPU seconds so far.
    pub cpu_seconds: f64,
    /// Resident memory now, in bytes.
    pub rss_bytes: u64,
    /// Peak resident memory, in bytes.
    pub peak_rss_bytes: u64,
}

impl ProcStats {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` where `/proc` is missing.
    pub fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is parenthesised and may contain spaces.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        Some(ProcStats {
            cpu_seconds: (utime + stime) / clock_ticks(),
            rss_bytes: kb("VmRSS:"),
            peak_rss_bytes: kb("VmHWM:"),
        })
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 almost everywhere).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&ticks: &f64| ticks > 0.0)
            .unwrap_or(100.0)
    })
}

/// How the kubetx under test runs.
#[derive(Debug, Clone)]
pub enum Launch {
    /// `kubetx serve` as a child process.
    Child {
        /// The executable.
        bin: PathBuf,
        /// Log filter given to it.
        log_level: String,
    },
    /// A server inside this process, on its own runtime and threads.
    InProcess,
    /// A server somebody else started.
    Target {
        /// Its base URL (`http://host:port`).
        url: String,
        /// Its process id, for CPU and memory figures.
        pid: Option<u32>,
    },
}

impl Launch {
    /// The label printed with each run.
    pub fn mode(&self) -> &'static str {
        match self {
            Launch::Child { .. } => "child",
            Launch::InProcess => "in-process",
            Launch::Target { .. } => "target",
        }
    }
}

/// Where the store lives.
#[derive(Debug, Clone)]
pub enum StoreSpec {
    /// A fresh SQLite file per run in this directory.
    Sqlite {
        /// Directory of the files.
        dir: PathBuf,
        /// Durability.
        synchronous: Synchronous,
    },
    /// A database URL handed to `kubetx serve --store`.
    Url(String),
}

impl StoreSpec {
    /// `sqlite`, `postgres` or `mysql`.
    pub fn name(&self) -> String {
        match self {
            StoreSpec::Sqlite { .. } => "sqlite".to_owned(),
            StoreSpec::Url(url) => {
                let scheme = url.split(':').next().unwrap_or_default();
                match scheme {
                    "postgres" | "postgresql" => "postgres".to_owned(),
                    "mysql" | "mariadb" => "mysql".to_owned(),
                    other => other.to_owned(),
                }
            }
        }
    }
}

/// A running kubetx.
pub struct Kubetx {
    /// Base URL of the DTM API (`http://addr/api/dtmsvr`).
    pub dtm_url: String,
    /// Process to read CPU and memory from.
    pub pid: Option<u32>,
    child: Option<Child>,
    in_process: Option<InProcess>,
    db_file: Option<PathBuf>,
}

struct InProcess {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Kubetx {
    /// Starts (or attaches to) kubetx and waits until it answers `/api/ping`.
    pub async fn start(
        launch: &Launch,
        store: &StoreSpec,
        run: &str,
        http: &reqwest::Client,
    ) -> Result<Self, BenchError> {
        let db_file = match store {
            StoreSpec::Sqlite { dir, .. } => Some(dir.join(format!("kubetx-bench-{run}.db"))),
            StoreSpec::Url(_) => None,
        };
        let kubetx = match launch {
            Launch::Target { url, pid } => Kubetx {
                dtm_url: format!("{}/api/dtmsvr", url.trim_end_matches('/')),
                pid: *pid,
                child: None,
                in_process: None,
                db_file: None,
            },
            Launch::Child { bin, log_level } => {
                let addr = free_addr()?;
                let mut command = Command::new(bin);
                command
                    .arg("serve")
                    .arg("--listen")
                    .arg(&addr)
                    .arg("--grpc-listen=")
                    .arg("--log-level")
                    .arg(log_level)
                    .env_remove("RUST_LOG")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true);
                match store {
                    StoreSpec::Sqlite { synchronous, .. } => {
                        let path = db_file.as_deref().unwrap_or(Path::new("kubetx-bench.db"));
                        command
                            .arg("--db")
                            .arg(path)
                            .arg("--sqlite-synchronous")
                            .arg(match synchronous {
                                Synchronous::Full => "full",
                                Synchronous::Normal => "normal",
                            });
                    }
                    StoreSpec::Url(url) => {
                        command.arg("--store").arg(url);
                    }
                }
                let child = command
                    .spawn()
                    .map_err(|e| BenchError::Start(format!("cannot start {}: {e}", bin.display())))?;
                Kubetx {
                    dtm_url: format!("http://{addr}/api/dtmsvr"),
                    pid: child.id(),
                    child: Some(child),
                    in_process: None,
                    db_file: db_file.clone(),
                }
            }
            Launch::InProcess => {
                let StoreSpec::Sqlite { synchronous, .. } = store else {
                    return Err(BenchError::Start(
                        "an in-process kubetx runs on SQLite only; start one with --store and use --target".to_owned(),
                    ));
                };
                let mut config = Config {
                    listen: free_addr()?,
                    grpc_listen: String::new(),
                    ..Config::default()
                };
                config.sqlite.path = db_file
                    .as_deref()
                    .unwrap_or(Path::new("kubetx-bench.db"))
                    .display()
                    .to_string();
                config.sqlite.synchronous = *synchronous;
                let (in_process, addr) = start_in_process(config).await?;
                Kubetx {
                    dtm_url: format!("http://{addr}/api/dtmsvr"),
                    pid: Some(std::process::id()),
                    child: None,
                    in_process: Some(in_process),
                    db_file: db_file.clone(),
                }
            }
        };
        kubetx.wait_ready(http).await?;
        Ok(kubetx)
    }

    async fn wait_ready(&self, http: &reqwest::Client) -> Result<(), BenchError> {
        let ping = self.dtm_url.replace("/api/dtmsvr", "/api/ping");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = http.get(&ping).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BenchError::Start(format!(
                    "kubetx at {ping} did not answer within 20 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CPU and memory of the kubetx process, when known.
    pub fn stats(&self) -> Option<ProcStats> {
        ProcStats::read(self.pid?)
    }

    /// Stops what this started and deletes its database file.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            // The run is over: in-flight work does not matter, and the file is deleted.
            let _ = child.kill().await;
        }
        if let Some(in_process) = self.in_process.take() {
            let _ = in_process.stop.send(());
            let _ = tokio::task::spawn_blocking(move || in_process.thread.join()).await;
        }
        if let Some(file) = self.db_file.take() {
            for suffix in ["", "-wal", "-shm"] {
                let mut name = file.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(name);
            }
        }
    }
}

/// A free port on 127.0.0.1 (bound, then released for the server to take).
fn free_addr() -> Result<String, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| BenchError::Start(e.to_string()))?;
    let addr = listener.local_addr().map_err(|e| BenchError::Start(e.to_string()))?;
    Ok(addr.to_string())
}

/// Runs a server on a runtime of its own (two worker threads, like `kubetx serve` on this
/// machine) so that it does not share the load generator's threads.
async fn start_in_process(config: Config) -> Result<(InProcess, String), BenchError> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("kubetx-under-test".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready_tx.send(Err(error.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                match Server::start(&config, Arc::new(SystemClock), true).await {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok(server.addr.to_string()));
                        let _ = stopped.await;
                        let _ = server.stop().await;
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error.to_string()));
                    }
                }
            });
        })
        .map_err(|e| BenchError::Start(e.to_string()))?;
    match ready_rx.await {
        Ok(Ok(addr)) => Ok((InProcess { stop, thread }, addr)),
        Ok(Err(error)) => Err(BenchError::Start(error)),
        Err(_) => Err(BenchError::Start("the in-process server thread died".to_owned())),
    }
}
