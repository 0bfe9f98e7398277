//! A store that times every call and counts its failures (`kubetx_store_duration_seconds`,
//! `kubetx_store_errors`), wrapped around whichever backend is configured.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::engine::BranchUpdate;
use crate::metrics::{Metrics, StoreLabels};
use crate::model::{Branch, GlobalTrans, Millis};
use crate::store::{
    AddBranches, DuePosition, Guard, KvEntry, Lease, ListQuery, Result, StatusChange, Store, UnfinishedSummary,
};

/// Times and counts the calls of the store it wraps; otherwise passes everything through.
pub struct TimedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl TimedStore {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        TimedStore { inner, metrics }
    }

    async fn timed<T>(&self, op: &'static str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let result = call.await;
        let labels = StoreLabels { op };
        self.metrics
            .store_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.store_errors.get_or_create(&labels).inc();
        }
        result
    }
}

#[async_trait]
impl Store for TimedStore {
    async fn ping(&self) -> Result<()> {
        self.timed("ping", self.inner.ping()).await
    }
    // Every method is forwarded, those with a default in the trait too: a default here would
    // silently replace the wrapped store's own (Redis's warnings, SQLite's lease reclaim).
    async fn warnings(&self) -> Vec<String> {
        self.inner.warnings().await
    }
    async fn reclaim_leases(&self, instance: &str, owner: &str, now: Millis) -> Result<u64> {
        self.timed("reclaim_leases", self.inner.reclaim_leases(instance, owner, now))
            .await
    }
    async fn create(&self, global: &GlobalTrans, branches: &[Branch]) -> Result<bool> {
        self.timed("create", self.inner.create(global, branches)).await
    }
    async fn find(&self, gid: &str) -> Result<Option<GlobalTrans>> {
        self.timed("find", self.inner.find(gid)).await
    }
    async fn branches(&self, gid: &str) -> Result<Vec<Branch>> {
        self.timed("branches", self.inner.branches(gid)).await
    }
    async fn change_status(&self, change: &StatusChange) -> Result<bool> {
        self.timed("change_status", self.inner.change_status(change)).await
    }
    async fn change_status_and_load(&self, change: &StatusChange) -> Result<Option<(GlobalTrans, Vec<Branch>)>> {
        self.timed("change_status_and_load", self.inner.change_status_and_load(change))
            .await
    }
    async fn add_branches(&self, gid: &str, branches: &[Branch]) -> Result<AddBranches> {
        self.timed("add_branches", self.inner.add_branches(gid, branches)).await
    }
    async fn update_branches(&self, guard: &Guard, updates: &[BranchUpdate], now: Millis) -> Result<bool> {
        self.timed("update_branches", self.inner.update_branches(guard, updates, now))
            .await
    }
    async fn claim(&self, gid: &str, lease: &Lease, now: Millis) -> Result<bool> {
        self.timed("claim", self.inner.claim(gid, lease, now)).await
    }
    async fn claim_due(&self, lease: &Lease, now: Millis, limit: i64) -> Result<Vec<String>> {
        self.timed("claim_due", self.inner.claim_due(lease, now, limit)).await
    }
    async fn extend_lease(&self, guard: &Guard, until: Millis) -> Result<bool> {
        self.timed("extend_lease", self.inner.extend_lease(guard, until)).await
    }
    async fn release(&self, guard: &Guard, next_cron_time: Millis, interval: i64, now: Millis) -> Result<bool> {
        self.timed("release", self.inner.release(guard, next_cron_time, interval, now))
            .await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<GlobalTrans>> {
        self.timed("list", self.inner.list(query)).await
    }
    async fn list_due(&self, after: Option<DuePosition>, limit: i64) -> Result<Vec<GlobalTrans>> {
        self.timed("list_due", self.inner.list_due(after, limit)).await
    }
    async fn unfinished_summary(&self) -> Result<UnfinishedSummary> {
        self.timed("unfinished_summary", self.inner.unfinished_summary()).await
    }
    async fn reset_next_cron_time(&self, gid: &str, now: Millis) -> Result<bool> {
        self.timed("reset_next_cron_time", self.inner.reset_next_cron_time(gid, now))
            .await
    }
    async fn reset_cron_times(&self, after: Millis, now: Millis, limit: i64) -> Result<u64> {
        self.timed("reset_cron_times", self.inner.reset_cron_times(after, now, limit))
            .await
    }
    async fn kv_get(&self, cat: &str, key: &str) -> Result<Option<KvEntry>> {
        self.timed("kv_get", self.inner.kv_get(cat, key)).await
    }
    async fn kv_scan(&self, cat: &str, after_id: i64, limit: i64) -> Result<Vec<KvEntry>> {
        self.timed("kv_scan", self.inner.kv_scan(cat, after_id, limit)).await
    }
    async fn kv_create(&self, cat: &str, key: &str, value: &str, now: Millis) -> Result<bool> {
        self.timed("kv_create", self.inner.kv_create(cat, key, value, now))
            .await
    }
    async fn kv_update(&self, cat: &str, key: &str, value: &str, version: i64, now: Millis) -> Result<bool> {
        self.timed("kv_update", self.inner.kv_update(cat, key, value, version, now))
            .await
    }
    async fn kv_delete(&self, cat: &str, key: &str) -> Result<bool> {
        self.timed("kv_delete", self.inner.kv_delete(cat, key)).await
    }
    async fn purge_finished(&self, before: Millis, limit: i64) -> Result<u64> {
        self.timed("purge_finished", self.inner.purge_finished(before, limit))
            .await
    }
}
