//! Retention: deletes finished transactions once they are older than the configured age, in
//! small batches, so that no store grows forever (DTM never deletes; its issue #479).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Store;
use crate::model::Millis;

/// Pause between two batches of one sweep, so that a large backlog never monopolises the store.
const BATCH_PAUSE: Duration = Duration::from_millis(20);

/// Retention settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Finished transactions whose last write is older than this are deleted; `None` keeps
    /// them forever.
    pub max_age: Option<Duration>,
    /// Transactions deleted per batch (one short write each).
    pub batch: i64,
    /// Pause between sweeps.
    pub interval: Duration,
}

/// Deletes everything due now, batch after batch. Returns how many transactions were deleted.
pub async fn sweep(store: &dyn Store, max_age: Duration, batch: i64, now: Millis) -> super::Result<u64> {
    let before = now - max_age.as_millis() as Millis;
    let mut total = 0;
    loop {
        let deleted = store.purge_finished(before, batch.max(1)).await?;
        total += deleted;
        if deleted < batch.max(1) as u64 {
            return Ok(total);
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
}

/// Sweeps every `retention.interval` until `shutdown`; store errors are logged and retried at
/// the next sweep.
pub async fn run(
    store: Arc<dyn Store>,
    retention: Retention,
    now: impl Fn() -> Millis + Send + Sync + 'static,
    shutdown: CancellationToken,
) {
    let Some(max_age) = retention.max_age else {
        return;
    };
    loop {
        let swept = tokio::select! {
            swept = sweep(store.as_ref(), max_age, retention.batch, now()) => swept,
            _ = shutdown.cancelled() => return,
        };
        match swept {
            Ok(0) => debug!("retention: nothing to delete"),
            Ok(deleted) => info!(deleted, "retention: deleted finished transactions"),
            Err(error) => warn!(%error, "retention sweep failed; retrying at the next sweep"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retention.interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
