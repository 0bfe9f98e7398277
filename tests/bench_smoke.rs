//! Keeps `kubetx bench` from rotting: a very short run of every scenario at a tiny load, with
//! kubetx as a child process and once in-process. Only sanity is checked, never timing.

use clap::Parser;
use kubetx::bench::{self, BenchArgs, RunResult};

fn args(extra: &[&str], dir: &std::path::Path) -> BenchArgs {
    let mut argv = vec![
        "bench",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--clients",
        "2",
        "--stores",
        "sqlite",
        "--drain",
        "10",
        "--data-dir",
        dir.to_str().expect("utf-8 temp dir"),
    ];
    argv.extend_from_slice(extra);
    BenchArgs::try_parse_from(argv).expect("bench flags parse")
}

fn assert_sane(result: &RunResult, with_ceiling: bool) {
    let name = format!("{} {}", result.store, result.scenario);
    assert_eq!(result.errors, 0, "{name}: {:?}", result.first_error);
    assert!(result.completed > 0, "{name}: nothing completed");
    assert!(result.tps > 0.0, "{name}");
    assert!(result.window_s > 0.0, "{name}");
    assert!(result.branch_calls_per_s > 0.0, "{name}");
    let submit = result.submit_p50_ms.expect("submit latency");
    assert!(submit > 0.0 && submit <= result.submit_p99_ms.unwrap_or(0.0), "{name}");
    if result.scenario == "raw" {
        return;
    }
    let e2e = result.e2e_p50_ms.expect("end-to-end latency");
    assert!(e2e > 0.0 && e2e <= result.e2e_p99_ms.unwrap_or(0.0), "{name}");
    assert!(result.api_requests_per_s > 0.0, "{name}");
    assert!(result.cpu_s_per_tx.expect("cpu per transaction") >= 0.0, "{name}");
    assert!(result.rss_peak_mb.expect("peak rss") > 1.0, "{name}");
    assert!(result.rss_idle_mb.expect("idle rss") > 1.0, "{name}");
    if with_ceiling {
        assert!(result.efficiency.expect("efficiency") > 0.0, "{name}");
    }
    assert_eq!(result.unfinished, 0, "{name}: transactions left incomplete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_against_a_child_kubetx_yields_sane_figures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = args(&["--kubetx-bin", env!("CARGO_BIN_EXE_kubetx")], dir.path());
    let results = bench::run(&args).await.expect("benchmark runs");
    let scenarios: Vec<&str> = results.iter().map(|r| r.scenario).collect();
    assert_eq!(scenarios, ["raw", "saga", "saga-wait", "saga-fail", "msg", "tcc"]);
    for result in &results {
        assert_sane(result, true);
        assert_eq!(result.kubetx, if result.scenario == "raw" { "none" } else { "child" });
        // The benchmark's own process (load generator and bank) is measured apart from kubetx.
        let load_cpu = result.load_cpu_s_per_tx;
        assert!(load_cpu.is_some_and(|s| s >= 0.0), "{} {load_cpu:?}", result.scenario);
    }
    let table = bench::table(&results);
    assert_eq!(table.lines().count(), 2 + results.len(), "{table}");
    let targets = bench::targets(&results);
    assert!(targets.contains("idle RSS"), "{targets}");
    for line in results.iter().map(|r| serde_json::to_value(r).expect("json line")) {
        assert!(line["tps"].as_f64().is_some_and(|tps| tps > 0.0), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_kubetx_works_too() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = args(&["--in-process", "--scenarios", "saga"], dir.path());
    let results = bench::run(&args).await.expect("benchmark runs");
    assert_eq!(results.len(), 1);
    assert_sane(&results[0], false);
    assert_eq!(results[0].kubetx, "in-process");
    // kubetx's CPU is in the benchmark process's own here, so neither is reported apart.
    assert_eq!(results[0].load_cpu_s_per_tx, None);
}
