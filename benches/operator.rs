//! Operator-mode benchmark: the real controller (kube client and runtime) against the
//! in-process Kubernetes API double of the test suite, with a real bank service on 127.0.0.1.
//! It creates `--sagas` 2-step `Saga` resources, waits until every one has succeeded, and reports
//! the Kubernetes API writes per saga from the double's request log (at most 4 with either store:
//! create, finalizer, status, event), by kind. It also prints sagas per second, which measures the in-process
//! double (one in-memory store serialising every request) as much as the controller.
//!
//! ```sh
//! cargo bench --bench operator                                  # 500 sagas, status as the store
//! cargo bench --bench operator -- --sagas 2000 --store sqlite   # branch detail in an SQLite file
//! cargo bench --bench operator -- --store postgres://postgres@127.0.0.1:5432/kubetx_bench
//! ```
//!
//! No cluster is needed (none is available on the build machines); the double speaks the real
//! HTTP API, so the controller's requests are the ones it makes against an apiserver.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/kube_double/mod.rs"]
mod kube_double;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Bank;
use kube::Api;
use kube::api::PostParams;
use kube::core::DynamicObject;
use kube_double::{KubeDouble, ResourceKind};
use kubetx::engine::Policy;
use kubetx::invoke::Invoker;
use kubetx::invoke::policy::OutboundPolicy;
use kubetx::metrics::Metrics;
use kubetx::operator::crd::{Msg, Saga, Tcc};
use kubetx::operator::reconcile::ReconcileConfig;
use kubetx::operator::{Operator, OperatorConfig};
use kubetx::scheduler::{Clock, SystemClock};
use kubetx::store::{StoreKind, StoreOptions, Synchronous};
use serde_json::json;

const NS: &str = "bench";

/// Options: `--sagas N`, `--concurrency N` (reconciles at once), `--store sqlite|URL`,
/// `--json FILE` (appends one line), `--timeout SECONDS`.
struct Args {
    sagas: usize,
    concurrency: u16,
    store: Option<String>,
    json: Option<String>,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sagas: 500,
        concurrency: 16,
        store: None,
        json: None,
        timeout: Duration::from_secs(300),
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        // `cargo bench` passes `--bench` to every bench target; it means nothing here.
        if flag == "--bench" {
            continue;
        }
        let mut value = || given.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--sagas" => args.sagas = value()?.parse().map_err(|e| format!("--sagas: {e}"))?,
            "--concurrency" => args.concurrency = value()?.parse().map_err(|e| format!("--concurrency: {e}"))?,
            "--store" => args.store = Some(value()?),
            "--json" => args.json = Some(value()?),
            "--timeout" => args.timeout = Duration::from_secs(value()?.parse().map_err(|e| format!("--timeout: {e}"))?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.sagas == 0 {
        return Err("--sagas must be at least 1".to_owned());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("operator bench: {error}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("operator bench: cannot start a runtime: {error}");
            std::process::exit(1);
        }
    };
    if let Err(error) = runtime.block_on(run(args)) {
        eprintln!("operator bench: {error}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let double = KubeDouble::start(&[
        ResourceKind::of_crd::<Saga>(),
        ResourceKind::of_crd::<Tcc>(),
        ResourceKind::of_crd::<Msg>(),
    ])
    .await;
    let bank = Bank::start().await;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (store, store_label) = match args.store.as_deref() {
        None => (None, "status".to_owned()),
        Some(url) => {
            let default = dir.path().join("detail.db").display().to_string();
            let kind = StoreKind::parse(if url == "sqlite" { "" } else { url }, &default).map_err(|e| e.to_string())?;
            let label = if url == "sqlite" {
                "sqlite".to_owned()
            } else {
                kind.describe()
            };
            let store = kubetx::store::open(&StoreOptions {
                kind,
                synchronous: Synchronous::Full,
                migrate: true,
                max_connections: 16,
                acquire_timeout: Duration::from_secs(10),
                group_commit: 0,
            })
            .await
            .map_err(|e| format!("store: {e}"))?;
            (Some(store), label)
        }
    };
    let config = OperatorConfig {
        namespaces: vec![],
        leader: None,
        reconcile: ReconcileConfig {
            policy: Policy::default(),
            request_timeout: Duration::from_secs(5),
            max_request_timeout: Duration::from_secs(600),
            default_ttl: None,
            service_domain: "svc".to_owned(),
            store: store.clone(),
        },
        concurrency: args.concurrency,
        reporter: "bench".to_owned(),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let policy = OutboundPolicy::cluster(&[], &["127.0.0.0/8".to_owned()], "svc").map_err(|e| e.to_string())?;
    let invoker = Invoker::new(policy).map_err(|e| e.to_string())?;
    let operator = Operator::start(double.client(), config, clock, Arc::new(Metrics::new()), invoker);

    let api: Api<DynamicObject> = Api::namespaced_with(double.client(), NS, &double.kind("sagas").api_resource());
    let started = Instant::now();
    let creates = (0..args.sagas).map(|n| {
        let api = api.clone();
        let saga = saga(&bank, n);
        async move {
            let saga: DynamicObject = serde_json::from_value(saga).map_err(|e| e.to_string())?;
            api.create(&PostParams::default(), &saga)
                .await
                .map(|_| ())
                .map_err(|e| format!("create: {e}"))
        }
    });
    // At most 32 creates in flight, as a busy client would send them.
    let results: Vec<Result<(), String>> =
        futures::StreamExt::collect(futures::StreamExt::buffer_unordered(futures::stream::iter(creates), 32)).await;
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    let finished = double
        .wait_until(args.timeout, |d| {
            let sagas = d.list_json("sagas", Some(NS));
            let succeeded = sagas.iter().filter(|s| s["status"]["phase"] == "Succeeded").count();
            (succeeded == args.sagas).then_some(())
        })
        .await;
    let elapsed = started.elapsed();
    if finished.is_none() {
        return Err(format!("not every saga succeeded within {:?}", args.timeout));
    }
    // Let the events of the last transitions land, then stop and read the log.
    double
        .wait_until(Duration::from_secs(10), |d| {
            let events = d.count_writes(|w| w.plural == "events");
            (events >= args.sagas).then_some(())
        })
        .await;
    operator.stop().await.map_err(|e| e.to_string())?;

    let writes = double.writes();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for write in &writes {
        let kind = match (write.plural.as_str(), write.is_status()) {
            ("sagas", true) => "saga status".to_owned(),
            ("sagas", false) => format!("saga {:?}", write.verb).to_lowercase(),
            (plural, _) => format!("{plural} {:?}", write.verb).to_lowercase(),
        };
        *by_kind.entry(kind).or_default() += 1;
    }
    let per_saga = writes.len() as f64 / args.sagas as f64;
    // Create, the finalizer (added before the first branch call), one status write, the
    // Succeeded event: the same with a SQL store, which only shrinks the status.
    let limit = 4.0;
    let rate = args.sagas as f64 / elapsed.as_secs_f64();
    println!(
        "| store | sagas | seconds | sagas/s | API writes | writes per saga | target | verdict |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n\
         | {store_label} | {} | {:.2} | {rate:.0} | {} | {per_saga:.2} | <= {limit} | {} |",
        args.sagas,
        elapsed.as_secs_f64(),
        writes.len(),
        if per_saga <= limit { "met" } else { "MISSED" },
    );
    println!("writes by kind (whole run):");
    for (kind, count) in &by_kind {
        println!(
            "  {kind:<24} {count:>7}  ({:.2} per saga)",
            *count as f64 / args.sagas as f64
        );
    }
    let line = json!({
        "bench": "operator",
        "store": store_label,
        "sagas": args.sagas,
        "concurrency": args.concurrency,
        "seconds": elapsed.as_secs_f64(),
        "sagas_per_second": rate,
        "api_writes": writes.len(),
        "api_writes_per_saga": per_saga,
        "target_writes_per_saga": limit,
        "writes_by_kind": by_kind,
    });
    println!("{line}");
    if let Some(path) = &args.json {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{path}: {e}"))?;
        writeln!(file, "{line}").map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

/// A 2-step transfer saga whose steps succeed.
fn saga(bank: &Bank, n: usize) -> serde_json::Value {
    let url = |route: &str| json!({ "url": bank.url(route) });
    json!({
        "apiVersion": "kubetx.io/v1alpha1", "kind": "Saga",
        "metadata": {"name": format!("transfer-{n}"), "namespace": NS},
        "spec": {
            "steps": [
                {"name": "out", "action": url("TransOut"), "compensate": url("TransOutRevert"), "payload": {"amount": 30}},
                {"name": "in", "action": url("TransIn"), "compensate": url("TransInRevert"), "payload": {"amount": 30}},
            ],
        },
    })
}
