//! Figures of one run, the table, the JSON lines and the targets of issues 6 and 15.

use std::fmt::Write as _;

use serde::Serialize;

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// `sqlite`, `postgres`, `mysql`, or `-` for the raw ceiling.
    pub store: String,
    /// Workload.
    pub scenario: &'static str,
    /// Concurrent clients.
    pub clients: usize,
    /// How kubetx ran: `child`, `in-process` (CPU and memory then include the load generator
    /// and the bank), `target`, or `none` for the raw ceiling.
    pub kubetx: &'static str,
    /// Length of the measured window in seconds.
    pub window_s: f64,
    /// Transactions whose last branch call reached the bank inside the window.
    pub completed: u64,
    /// `completed` per second.
    pub tps: f64,
    /// Submit latency percentiles in milliseconds (for raw: the request).
    pub submit_p50_ms: Option<f64>,
    /// 99th percentile of the submit latency.
    pub submit_p99_ms: Option<f64>,
    /// Submit (first request of the transaction) to last branch call, median, milliseconds.
    pub e2e_p50_ms: Option<f64>,
    /// 99th percentile of the end-to-end latency.
    pub e2e_p99_ms: Option<f64>,
    /// kubetx CPU seconds per completed transaction.
    pub cpu_s_per_tx: Option<f64>,
    /// kubetx CPU use over the window, in cores.
    pub cpu_cores: Option<f64>,
    /// CPU seconds per completed transaction of the benchmark's own process: the load generator
    /// and the bank (for raw: both ends of each request). None with an in-process kubetx.
    pub load_cpu_s_per_tx: Option<f64>,
    /// kubetx resident memory before the load, MB.
    pub rss_idle_mb: Option<f64>,
    /// kubetx peak resident memory (VmHWM), MB.
    pub rss_peak_mb: Option<f64>,
    /// Branch calls received by the bank per second inside the window.
    pub branch_calls_per_s: f64,
    /// Requests sent to kubetx per second inside the window.
    pub api_requests_per_s: f64,
    /// (branch calls + API requests) per second over the raw ceiling's requests per second.
    pub efficiency: Option<f64>,
    /// Failed requests.
    pub errors: u64,
    /// First error, if any.
    pub first_error: Option<String>,
    /// Transactions still incomplete when the run was stopped after its drain.
    pub unfinished: u64,
}

/// Percentile of sorted microsecond samples, in milliseconds.
pub fn percentile_ms(sorted_us: &[u32], p: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((p * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    Some(f64::from(sorted_us[rank - 1]) / 1000.0)
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The table of all runs.
pub fn table(results: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| store | scenario | clients | tx/s | submit p50/p99 ms | e2e p50/p99 ms | CPU ms/tx | CPU cores | load CPU ms/tx | RSS idle/peak MB | efficiency | errors |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} / {} | {} / {} | {} | {} | {} | {} / {} | {} | {} |",
            r.store,
            r.scenario,
            r.clients,
            r.tps,
            opt(r.submit_p50_ms, 2),
            opt(r.submit_p99_ms, 2),
            opt(r.e2e_p50_ms, 2),
            opt(r.e2e_p99_ms, 2),
            opt(r.cpu_s_per_tx.map(|s| s * 1000.0), 3),
            opt(r.cpu_cores, 2),
            opt(r.load_cpu_s_per_tx.map(|s| s * 1000.0), 3),
            opt(r.rss_idle_mb, 1),
            opt(r.rss_peak_mb, 1),
            r.efficiency
                .map_or_else(|| "-".to_owned(), |e| format!("{:.0}%", e * 100.0)),
            r.errors,
        );
    }
    out
}

fn find<'a>(results: &'a [RunResult], store: &str, scenario: &str, clients: usize) -> Option<&'a RunResult> {
    results
        .iter()
        .find(|r| r.store == store && r.scenario == scenario && r.clients == clients)
}

/// `run`'s rate as a fraction of `of`'s (0 when `of` did nothing, rather than a division by 0).
fn share(run: &RunResult, of: &RunResult) -> f64 {
    run.tps / of.tps.max(f64::MIN_POSITIVE)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// Each figure of issue 6 against its target, for every store measured.
pub fn targets(results: &[RunResult]) -> String {
    let mut out = String::new();
    let mut stores: Vec<&str> = results.iter().map(|r| r.store.as_str()).filter(|s| *s != "-").collect();
    stores.dedup();
    for store in stores {
        let floor = match store {
            "sqlite" => 10_000.0,
            "postgres" => 5_000.0,
            _ => 3_000.0,
        };
        if let Some(saga) = find(results, store, "saga", 16) {
            let _ = writeln!(
                out,
                "{store}: 2-step sagas at 16 clients {:.0}/s, target >= {floor:.0}: {}",
                saga.tps,
                verdict(saga.tps >= floor)
            );
            if store == "sqlite" {
                if let Some(p50) = saga.e2e_p50_ms {
                    let _ = writeln!(
                        out,
                        "{store}: e2e p50 {p50:.2} ms, target < 5 ms: {}",
                        verdict(p50 < 5.0)
                    );
                }
                if let Some(p99) = saga.e2e_p99_ms {
                    let _ = writeln!(
                        out,
                        "{store}: e2e p99 {p99:.2} ms, target < 25 ms: {}",
                        verdict(p99 < 25.0)
                    );
                }
            }
        }
        for clients in [16, 64] {
            let Some(saga) = find(results, store, "saga", clients) else {
                continue;
            };
            if let Some(fail) = find(results, store, "saga-fail", clients) {
                let ratio = share(fail, saga);
                let _ = writeln!(
                    out,
                    "{store}: compensating sagas at {clients} clients {:.0}/s = {:.0}% of saga, target >= 50%: {}",
                    fail.tps,
                    ratio * 100.0,
                    verdict(ratio >= 0.5)
                );
            }
            for mode in ["msg", "tcc"] {
                if let Some(run) = find(results, store, mode, clients) {
                    let ratio = share(run, saga);
                    let _ = writeln!(
                        out,
                        "{store}: {mode} at {clients} clients {:.0}/s = {:.0}% of saga, target >= 70%: {}",
                        run.tps,
                        ratio * 100.0,
                        verdict(ratio >= 0.7)
                    );
                }
            }
        }
        let peak = results
            .iter()
            .filter(|r| r.store == store && r.clients == 64)
            .filter_map(|r| r.rss_peak_mb)
            .fold(None, |max: Option<f64>, v| Some(max.map_or(v, |m| m.max(v))));
        if let Some(peak) = peak {
            let _ = writeln!(
                out,
                "{store}: peak RSS at 64 clients {peak:.1} MB, target < 150 MB: {}",
                verdict(peak < 150.0)
            );
        }
        let idle = results
            .iter()
            .filter(|r| r.store == store)
            .filter_map(|r| r.rss_idle_mb)
            .fold(None, |max: Option<f64>, v| Some(max.map_or(v, |m| m.max(v))));
        if let Some(idle) = idle {
            let _ = writeln!(
                out,
                "{store}: idle RSS {idle:.1} MB (largest before any run), target < 30 MB: {}",
                verdict(idle < 30.0)
            );
        }
    }
    out
}

/// Issue 15's cost targets for 2-step sagas at 16 clients: kubetx's CPU per saga, sagas/s
/// against the raw ceiling of the same bench (the load generator and the bank alone, requests/s),
/// and PostgreSQL's rate against SQLite's. `cores` is what the load generator, the bank and
/// kubetx shared.
pub fn cost_targets(results: &[RunResult], cores: usize) -> String {
    let mut out = String::new();
    let raw = find(results, "-", "raw", 16);
    let sqlite = find(results, "sqlite", "saga", 16);
    for saga in results.iter().filter(|r| r.scenario == "saga" && r.clients == 16) {
        let store = &saga.store;
        if let Some(cpu) = saga.cpu_s_per_tx.filter(|_| saga.kubetx != "in-process") {
            let ms = cpu * 1000.0;
            let _ = writeln!(
                out,
                "{store}: kubetx CPU {ms:.3} ms per saga, target <= 0.1 ms: {}",
                verdict(ms <= 0.1)
            );
        }
        if let Some(raw) = raw {
            against_raw_ceiling(&mut out, saga, raw, cores);
        }
        if store == "postgres"
            && let Some(sqlite) = sqlite
        {
            let ratio = share(saga, sqlite);
            let _ = writeln!(
                out,
                "postgres: {:.0}% of the SQLite rate ({:.0}/s), target >= 60%: {}",
                ratio * 100.0,
                sqlite.tps,
                verdict(ratio >= 0.6)
            );
        }
    }
    out
}

/// The saga rate against the raw ceiling, and what a rate of 25% of it would leave kubetx and its
/// store (a database server on the same cores included): the shared cores' CPU per saga at that
/// rate less what the load generator and the bank spend on each saga, which no coordinator can
/// make smaller (BENCHMARKS.md, issue 15).
fn against_raw_ceiling(out: &mut String, saga: &RunResult, raw: &RunResult, cores: usize) {
    let store = &saga.store;
    let ratio = share(saga, raw);
    let _ = writeln!(
        out,
        "{store}: {:.0} sagas/s = {:.1}% of the raw ceiling ({:.0} requests/s), target >= 25%: {}",
        saga.tps,
        ratio * 100.0,
        raw.tps,
        verdict(ratio >= 0.25)
    );
    if let Some(load) = saga.load_cpu_s_per_tx.filter(|_| raw.tps > 0.0) {
        let quarter = raw.tps / 4.0;
        let budget = cores as f64 / quarter - load;
        let _ = writeln!(
            out,
            "{store}: at {quarter:.0} sagas/s, {cores} cores leave kubetx and its store {:.3} ms per saga beside \
             the load generator and bank's {:.3} ms",
            budget.max(0.0) * 1000.0,
            load * 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store: &str, scenario: &'static str, tps: f64, cpu_s_per_tx: Option<f64>) -> RunResult {
        RunResult {
            store: store.to_owned(),
            scenario,
            clients: 16,
            kubetx: "child",
            window_s: 10.0,
            completed: (tps * 10.0) as u64,
            tps,
            submit_p50_ms: None,
            submit_p99_ms: None,
            e2e_p50_ms: None,
            e2e_p99_ms: None,
            cpu_s_per_tx,
            cpu_cores: None,
            load_cpu_s_per_tx: None,
            rss_idle_mb: None,
            rss_peak_mb: None,
            branch_calls_per_s: 0.0,
            api_requests_per_s: 0.0,
            efficiency: None,
            errors: 0,
            first_error: None,
            unfinished: 0,
        }
    }

    #[test]
    fn cost_targets_compare_cpu_the_raw_ceiling_and_postgres_with_sqlite() {
        let sqlite = RunResult {
            load_cpu_s_per_tx: Some(0.000_06),
            ..run("sqlite", "saga", 5_000.0, Some(0.000_2))
        };
        let results = [
            run("-", "raw", 40_000.0, None),
            sqlite,
            run("postgres", "saga", 3_100.0, Some(0.000_09)),
        ];
        let verdicts = cost_targets(&results, 2);
        assert_eq!(
            verdicts.lines().collect::<Vec<_>>(),
            [
                "sqlite: kubetx CPU 0.200 ms per saga, target <= 0.1 ms: MISSED",
                "sqlite: 5000 sagas/s = 12.5% of the raw ceiling (40000 requests/s), target >= 25%: MISSED",
                "sqlite: at 10000 sagas/s, 2 cores leave kubetx and its store 0.140 ms per saga beside the load generator and bank's 0.060 ms",
                "postgres: kubetx CPU 0.090 ms per saga, target <= 0.1 ms: met",
                "postgres: 3100 sagas/s = 7.8% of the raw ceiling (40000 requests/s), target >= 25%: MISSED",
                "postgres: 62% of the SQLite rate (5000/s), target >= 60%: met",
            ]
        );
    }

    /// Issue 15's lines for a SQLite saga run whose load generator and bank used `load` CPU
    /// seconds per saga, beside a raw ceiling of `raw_tps`, on 2 cores.
    fn budget_lines(raw_tps: f64, load: f64) -> String {
        let saga = RunResult {
            load_cpu_s_per_tx: Some(load),
            ..run("sqlite", "saga", 5_000.0, None)
        };
        cost_targets(&[run("-", "raw", raw_tps, None), saga], 2)
    }

    #[test]
    fn a_load_generator_that_fills_the_cores_leaves_kubetx_nothing() {
        let verdicts = budget_lines(40_000.0, 0.000_3);
        assert!(
            verdicts.ends_with(
                "2 cores leave kubetx and its store 0.000 ms per saga beside the load generator and bank's 0.300 ms\n"
            ),
            "{verdicts}"
        );
    }

    #[test]
    fn a_raw_ceiling_that_did_nothing_gives_no_budget() {
        let verdicts = budget_lines(0.0, 0.000_05);
        assert!(verdicts.contains("of the raw ceiling (0 requests/s)"), "{verdicts}");
        assert!(!verdicts.contains("leave kubetx"), "{verdicts}");
    }

    #[test]
    fn percentiles_pick_the_rank() {
        let samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&samples, 0.5), Some(50.0));
        assert_eq!(percentile_ms(&samples, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&[7000], 0.99), Some(7.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }
}
