//! The benchmark's bank: a trivial branch service on 127.0.0.1 that answers at once and records,
//! per transaction, when its last expected branch call arrived.
//!
//! The load generator registers every transaction in the [`Tracker`] before its first request,
//! with the number of branch calls that complete it. The bank counts the calls it receives; the
//! call that reaches the expected number completes the transaction, and its arrival time minus
//! the registration time is the end-to-end latency.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

/// Shards of the tracker's map: enough that 64 clients and the bank rarely meet on one lock.
const SHARDS: usize = 64;

/// Reply of a branch that succeeded.
const SUCCESS: &str = r#"{"dtm_result":"SUCCESS"}"#;
/// Reply of a branch that refuses (DTM's FAILURE, HTTP 409).
const FAILURE: &str = r#"{"dtm_result":"FAILURE"}"#;

#[derive(Debug)]
struct Pending {
    started_us: u64,
    expected: u8,
    seen: u8,
    /// The client's slot for an outstanding transaction, freed when it completes.
    _slot: Option<OwnedSemaphorePermit>,
}

#[derive(Debug, Default)]
struct Shard {
    pending: HashMap<u64, Pending>,
    /// End-to-end latencies (µs) of transactions completed inside the window.
    e2e_us: Vec<u32>,
}

/// Transactions in flight, the measuring window, and what the bank saw inside it.
#[derive(Debug)]
pub struct Tracker {
    base: Instant,
    shards: Vec<Mutex<Shard>>,
    window_start_us: AtomicU64,
    window_end_us: AtomicU64,
    calls_in_window: AtomicU64,
    completed_in_window: AtomicU64,
    in_flight: AtomicU64,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            base: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            window_start_us: AtomicU64::new(u64::MAX),
            window_end_us: AtomicU64::new(u64::MAX),
            calls_in_window: AtomicU64::new(0),
            completed_in_window: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }
}

impl Tracker {
    /// Microseconds since the tracker was created.
    pub fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Opens the measuring window now.
    pub fn open_window(&self) -> u64 {
        let now = self.now_us();
        self.window_start_us.store(now, Ordering::SeqCst);
        now
    }

    /// Closes the measuring window now.
    pub fn close_window(&self) -> u64 {
        let now = self.now_us();
        self.window_end_us.store(now, Ordering::SeqCst);
        now
    }

    /// True when `at` lies inside the window.
    pub fn in_window(&self, at: u64) -> bool {
        at >= self.window_start_us.load(Ordering::Relaxed) && at < self.window_end_us.load(Ordering::Relaxed)
    }

    fn shard(&self, seq: u64) -> &Mutex<Shard> {
        &self.shards[(seq % SHARDS as u64) as usize]
    }

    /// Registers a transaction that completes after `expected` branch calls; `slot` is released
    /// when it completes (or is abandoned).
    pub fn start(&self, seq: u64, started_us: u64, expected: u8, slot: Option<OwnedSemaphorePermit>) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(seq).lock().unwrap_or_else(|p| p.into_inner());
        shard.pending.insert(
            seq,
            Pending {
                started_us,
                expected,
                seen: 0,
                _slot: slot,
            },
        );
    }

    /// Forgets a transaction the client gave up on (its submit failed).
    pub fn abandon(&self, seq: u64) {
        let mut shard = self.shard(seq).lock().unwrap_or_else(|p| p.into_inner());
        if shard.pending.remove(&seq).is_some() {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Records one branch call of transaction `seq`.
    fn branch_called(&self, seq: Option<u64>) {
        let now = self.now_us();
        let inside = self.in_window(now);
        if inside {
            self.calls_in_window.fetch_add(1, Ordering::Relaxed);
        }
        let Some(seq) = seq else { return };
        let mut shard = self.shard(seq).lock().unwrap_or_else(|p| p.into_inner());
        let Some(pending) = shard.pending.get_mut(&seq) else {
            return;
        };
        pending.seen = pending.seen.saturating_add(1);
        if pending.seen < pending.expected {
            return;
        }
        let started = pending.started_us;
        shard.pending.remove(&seq);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if inside {
            shard
                .e2e_us
                .push(now.saturating_sub(started).min(u32::MAX as u64) as u32);
            self.completed_in_window.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Transactions registered and not completed yet.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Branch calls received inside the window.
    pub fn calls_in_window(&self) -> u64 {
        self.calls_in_window.load(Ordering::Relaxed)
    }

    /// Transactions completed inside the window.
    pub fn completed_in_window(&self) -> u64 {
        self.completed_in_window.load(Ordering::Relaxed)
    }

    /// End-to-end latencies (µs) of the transactions completed inside the window.
    pub fn e2e_latencies(&self) -> Vec<u32> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            all.extend_from_slice(&shard.e2e_us);
        }
        all
    }
}

/// The sequence number the load generator put at the end of the gid (`bench-<tag>-<seq>`).
fn seq_of(query: Option<&str>) -> Option<u64> {
    let query = query?;
    let gid = query.split('&').find_map(|pair| pair.strip_prefix("gid="))?;
    gid.rsplit('-').next()?.parse().ok()
}

/// A running bank.
pub struct Bank {
    /// Address bound on 127.0.0.1.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Bank {
    /// Binds 127.0.0.1:0 and serves `/ok` (SUCCESS) and `/fail` (FAILURE, 409) for any method.
    pub async fn start(tracker: Arc<Tracker>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/ok", any(ok))
            .route("/fail", any(fail))
            .with_state(tracker);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            // The bank lives as long as the benchmark; an accept error ends it early and the
            // run then reports errors.
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        Ok(Bank { addr, stop })
    }

    /// URL of a route (`ok` or `fail`).
    pub fn url(&self, route: &str) -> String {
        format!("http://{}/{route}", self.addr)
    }
}

impl Drop for Bank {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn ok(State(tracker): State<Arc<Tracker>>, RawQuery(query): RawQuery) -> Response {
    tracker.branch_called(seq_of(query.as_deref()));
    reply(StatusCode::OK, SUCCESS)
}

async fn fail(State(tracker): State<Arc<Tracker>>, RawQuery(query): RawQuery) -> Response {
    tracker.branch_called(seq_of(query.as_deref()));
    reply(StatusCode::CONFLICT, FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_number_comes_from_the_gid() {
        assert_eq!(
            seq_of(Some("gid=bench-k3x-42&trans_type=saga&branch_id=01&op=action")),
            Some(42)
        );
        assert_eq!(seq_of(Some("trans_type=saga&gid=bench-a-7")), Some(7));
        assert_eq!(seq_of(Some("op=action")), None);
        assert_eq!(seq_of(None), None);
    }

    #[test]
    fn a_transaction_completes_at_its_last_expected_call() {
        let tracker = Tracker::default();
        tracker.open_window();
        tracker.start(1, tracker.now_us(), 2, None);
        tracker.branch_called(Some(1));
        assert_eq!(tracker.completed_in_window(), 0);
        tracker.branch_called(Some(1));
        assert_eq!(tracker.completed_in_window(), 1);
        assert_eq!(tracker.calls_in_window(), 2);
        assert_eq!(tracker.in_flight(), 0);
        assert_eq!(tracker.e2e_latencies().len(), 1);
    }
}
