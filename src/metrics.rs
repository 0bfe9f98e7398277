//! Prometheus metrics shared by the scheduler and the API.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of an API request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// Route name (`submit`, `query`, ...).
    pub api: String,
    /// HTTP status code.
    pub code: u16,
}

/// Labels of an API latency sample.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name.
    pub api: String,
}

/// Labels of a finished transaction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransLabels {
    /// Mode.
    pub trans_type: &'static str,
    /// Final status.
    pub status: &'static str,
}

/// Labels of a branch call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BranchLabels {
    /// Mode.
    pub trans_type: &'static str,
    /// Operation (`other` for a workflow's resume call).
    pub op: &'static str,
    /// `success`, `failure`, `ongoing` or `error`.
    pub outcome: &'static str,
}

/// Labels of a gauge by transaction status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// `prepared`, `submitted` or `aborting`.
    pub status: &'static str,
}

/// Labels of a branch call latency sample (fixed sets: 5 modes, 9 ops).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Mode.
    pub trans_type: &'static str,
    /// Operation (`other` for a workflow's resume call).
    pub op: &'static str,
}

/// Labels of a store call (a fixed set: the store trait's method names).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// Store method.
    pub op: &'static str,
}

/// Labels of an operator metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Resource kind (`Saga`, `Tcc`, `Msg`).
    pub kind: String,
}

/// Labels of a failed reconcile.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Resource kind.
    pub kind: String,
    /// Error category.
    pub error: String,
}

/// All metrics of one process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// API requests by route and status code.
    pub api_requests: Family<ApiLabels, Counter>,
    /// API latency by route.
    pub api_duration: Family<RouteLabels, Histogram>,
    /// Transactions that reached a final status.
    pub transactions_finished: Family<TransLabels, Counter>,
    /// Seconds from creation to the final status.
    pub transaction_duration: Family<RouteLabels, Histogram>,
    /// Branch calls by outcome.
    pub branch_calls: Family<BranchLabels, Counter>,
    /// Handles of `branch_calls` and `branch_call_duration` by label set, kept once made (see
    /// [`Metrics::record_branch_call`]); the label sets are fixed, so this stays small.
    branch_call_handles: std::sync::RwLock<Vec<(BranchLabels, Counter, Histogram)>>,
    /// Processing passes run by the scheduler (API-triggered and recovered).
    pub passes: Counter,
    /// Passes that stopped because another process took the lease or the status moved.
    pub leases_lost: Counter,
    /// Passes not started at once for want of a free slot (left to the scheduler).
    pub passes_deferred: Counter,
    /// Alert webhooks sent.
    pub alerts: Counter,
    /// Operator reconcile passes by kind.
    pub reconciles: Family<KindLabels, Counter>,
    /// Operator reconciles that failed, by kind and error category.
    pub reconcile_failures: Family<FailureLabels, Counter>,
    /// Status writes by kind.
    pub status_writes: Family<KindLabels, Counter>,
    /// Status writes skipped because nothing changed.
    pub status_skips: Family<KindLabels, Counter>,
    /// Unfinished transactions by status (refreshed from the store on every scrape).
    pub unfinished: Family<StatusLabels, Gauge>,
    /// Seconds since the earliest due unfinished transaction became due (0: none overdue).
    pub oldest_due_seconds: Gauge<f64, AtomicU64>,
    /// Duration of processing passes by mode.
    pub pass_duration: Family<RouteLabels, Histogram>,
    /// Branch call latency by mode and op.
    pub branch_call_duration: Family<CallLabels, Histogram>,
    /// Store call latency by method.
    pub store_duration: Family<StoreLabels, Histogram>,
    /// Store calls that failed, by method.
    pub store_errors: Family<StoreLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kubetx");
        let api_requests = Family::<ApiLabels, Counter>::default();
        let api_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let transactions_finished = Family::<TransLabels, Counter>::default();
        let transaction_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 20))
        });
        let branch_calls = Family::<BranchLabels, Counter>::default();
        let passes = Counter::default();
        let leases_lost = Counter::default();
        let passes_deferred = Counter::default();
        let alerts = Counter::default();
        let reconciles = Family::<KindLabels, Counter>::default();
        let reconcile_failures = Family::<FailureLabels, Counter>::default();
        let status_writes = Family::<KindLabels, Counter>::default();
        let status_skips = Family::<KindLabels, Counter>::default();
        registry.register(
            "api_requests",
            "DTM API requests by route and status code",
            api_requests.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "DTM API latency by route",
            api_duration.clone(),
        );
        registry.register(
            "transactions_finished",
            "Transactions that reached succeed or failed",
            transactions_finished.clone(),
        );
        registry.register(
            "transaction_duration_seconds",
            "Seconds from creation to the final status, by mode",
            transaction_duration.clone(),
        );
        registry.register(
            "branch_calls",
            "Branch calls by mode, op and outcome",
            branch_calls.clone(),
        );
        registry.register("passes", "Processing passes run", passes.clone());
        registry.register(
            "leases_lost",
            "Passes stopped because the lease or status moved",
            leases_lost.clone(),
        );
        registry.register(
            "passes_deferred",
            "Passes left to the scheduler for want of a free slot",
            passes_deferred.clone(),
        );
        registry.register("alerts", "Alert webhooks sent", alerts.clone());
        registry.register("reconciles", "Operator reconcile passes by kind", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Operator reconciles that failed, by kind and error",
            reconcile_failures.clone(),
        );
        registry.register("status_writes", "Resource status writes", status_writes.clone());
        registry.register(
            "status_skips",
            "Resource status writes skipped because nothing changed",
            status_skips.clone(),
        );
        let unfinished = Family::<StatusLabels, Gauge>::default();
        let oldest_due_seconds = Gauge::<f64, AtomicU64>::default();
        let pass_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let branch_call_duration = Family::<CallLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 18))
        });
        let store_duration = Family::<StoreLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let store_errors = Family::<StoreLabels, Counter>::default();
        registry.register(
            "unfinished_transactions",
            "Unfinished transactions by status, read from the store at scrape time",
            unfinished.clone(),
        );
        registry.register(
            "oldest_due_seconds",
            "Seconds the earliest due unfinished transaction has been waiting (0: none overdue)",
            oldest_due_seconds.clone(),
        );
        registry.register(
            "pass_duration_seconds",
            "Processing pass duration by mode",
            pass_duration.clone(),
        );
        registry.register(
            "branch_call_duration_seconds",
            "Branch call latency by mode and op",
            branch_call_duration.clone(),
        );
        registry.register(
            "store_duration_seconds",
            "Store call latency by method",
            store_duration.clone(),
        );
        registry.register(
            "store_errors",
            "Store calls that failed, by method",
            store_errors.clone(),
        );
        Metrics {
            registry,
            unfinished,
            oldest_due_seconds,
            pass_duration,
            branch_call_duration,
            store_duration,
            store_errors,
            api_requests,
            api_duration,
            transactions_finished,
            transaction_duration,
            branch_calls,
            branch_call_handles: std::sync::RwLock::default(),
            passes,
            leases_lost,
            passes_deferred,
            alerts,
            reconciles,
            reconcile_failures,
            status_writes,
            status_skips,
        }
    }

    /// Sets the gauges of unfinished transactions from a store summary taken at `now`.
    pub fn set_unfinished(&self, summary: &crate::store::UnfinishedSummary, now: crate::model::Millis) {
        for (status, count) in &summary.counts {
            self.unfinished
                .get_or_create(&StatusLabels {
                    status: status.as_str(),
                })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
        let overdue = summary.earliest_due.map_or(0, |at| (now - at).max(0));
        self.oldest_due_seconds.set(overdue as f64 / 1000.0);
    }

    /// Counts an API request (an HTTP route or an RPC) by its answer's status code and times it.
    pub fn record_request(&self, api: String, code: u16, took: std::time::Duration) {
        let labels = ApiLabels { api, code };
        self.api_requests.get_or_create(&labels).inc();
        self.api_duration
            .get_or_create(&RouteLabels { api: labels.api })
            .observe(took.as_secs_f64());
    }

    /// Counts a branch call by its labels and times it. The handles are kept after the first
    /// call with the same labels: a scan of a few entries under a read lock costs less than
    /// `Family::get_or_create`'s lock and label hash, twice per call (BENCHMARKS.md, issue 15).
    pub fn record_branch_call(&self, labels: BranchLabels, took: std::time::Duration) {
        let kept = self.branch_call_handles.read().ok().and_then(|handles| {
            handles
                .iter()
                .find(|(kept, ..)| *kept == labels)
                .map(|(_, calls, duration)| (calls.clone(), duration.clone()))
        });
        let (calls, duration) = kept.unwrap_or_else(|| self.keep_branch_call_handles(labels));
        calls.inc();
        duration.observe(took.as_secs_f64());
    }

    fn keep_branch_call_handles(&self, labels: BranchLabels) -> (Counter, Histogram) {
        let calls = self.branch_calls.get_or_create(&labels).clone();
        let duration = self
            .branch_call_duration
            .get_or_create(&CallLabels {
                trans_type: labels.trans_type,
                op: labels.op,
            })
            .clone();
        if let Ok(mut handles) = self.branch_call_handles.write()
            && !handles.iter().any(|(kept, ..)| *kept == labels)
        {
            handles.push((labels, calls.clone(), duration.clone()));
        }
        (calls, duration)
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_branch_call_handles_count_in_the_rendered_families() {
        let metrics = Metrics::new();
        let labels = |outcome| BranchLabels {
            trans_type: "saga",
            op: "action",
            outcome,
        };
        for _ in 0..3 {
            metrics.record_branch_call(labels("success"), std::time::Duration::from_millis(2));
        }
        metrics.record_branch_call(labels("error"), std::time::Duration::from_millis(2));
        let text = metrics.render();
        assert!(
            text.contains(r#"kubetx_branch_calls_total{trans_type="saga",op="action",outcome="success"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kubetx_branch_calls_total{trans_type="saga",op="action",outcome="error"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kubetx_branch_call_duration_seconds_count{trans_type="saga",op="action"} 4"#),
            "{text}"
        );
        assert_eq!(metrics.branch_call_handles.read().expect("lock").len(), 2);
    }
}
