//! The load generator: closed-loop clients that play a DTM SDK against kubetx, or call the bank
//! directly for the raw ceiling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::bank::{Bank, Tracker};

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The bank alone: one branch-like call per request (the ceiling).
    Raw,
    /// 2-step saga, submitted without waiting.
    Saga,
    /// 2-step saga with `wait_result`.
    SagaWait,
    /// 2-step saga whose second action answers FAILURE: both steps are compensated.
    SagaFail,
    /// 2-branch msg: prepare, then submit (DTM's `DoAndSubmit` without the local transaction).
    Msg,
    /// 2-branch TCC: prepare, then per branch registerBranch and the try, then submit.
    Tcc,
}

impl Scenario {
    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Raw => "raw",
            Scenario::Saga => "saga",
            Scenario::SagaWait => "saga-wait",
            Scenario::SagaFail => "saga-fail",
            Scenario::Msg => "msg",
            Scenario::Tcc => "tcc",
        }
    }

    /// Bank calls that complete one transaction.
    fn expected_calls(self) -> u8 {
        match self {
            Scenario::Raw => 1,
            Scenario::Saga | Scenario::SagaWait | Scenario::Msg => 2,
            // action, failed action, both compensations; two tries and two confirms.
            Scenario::SagaFail | Scenario::Tcc => 4,
        }
    }
}

/// What the clients measured.
#[derive(Debug, Default)]
pub struct ClientFigures {
    /// Latencies (µs) of the submits started inside the window.
    pub submit_us: Vec<u32>,
    /// Requests sent to kubetx inside the window (prepare, registerBranch, submit).
    pub api_requests: u64,
    /// Requests that failed or answered other than expected (any time).
    pub errors: u64,
    /// First error seen, for the report.
    pub first_error: Option<String>,
}

/// Everything a client needs.
pub struct Load {
    /// The scenario.
    pub scenario: Scenario,
    /// Shared HTTP client (pooled keep-alive).
    pub http: reqwest::Client,
    /// `http://addr/api/dtmsvr`, unused by [`Scenario::Raw`].
    pub dtm_url: String,
    /// Bank URLs.
    pub ok_url: String,
    /// URL of the refusing route.
    pub fail_url: String,
    /// Unique per run, so that runs may share a database.
    pub tag: String,
    /// Completion tracking.
    pub tracker: Arc<Tracker>,
    /// Set when the clients should stop.
    pub stop: AtomicBool,
    /// Most transactions one client keeps submitted but not complete at the bank (0: no limit).
    pub outstanding: usize,
    next_seq: AtomicU64,
}

impl Load {
    /// A load against `bank` and, unless raw, the kubetx at `dtm_url`.
    pub fn new(
        scenario: Scenario,
        http: reqwest::Client,
        dtm_url: String,
        bank: &Bank,
        tag: String,
        tracker: Arc<Tracker>,
        outstanding: usize,
    ) -> Self {
        Load {
            scenario,
            http,
            dtm_url,
            ok_url: bank.url("ok"),
            fail_url: bank.url("fail"),
            tag,
            tracker,
            stop: AtomicBool::new(false),
            outstanding,
            next_seq: AtomicU64::new(1),
        }
    }

    /// One client: runs transactions back to back until told to stop.
    pub async fn client(self: Arc<Self>) -> ClientFigures {
        let mut figures = ClientFigures::default();
        let submit_url = format!("{}/submit", self.dtm_url);
        let prepare_url = format!("{}/prepare", self.dtm_url);
        let register_url = format!("{}/registerBranch", self.dtm_url);
        let slots = (self.outstanding > 0).then(|| Arc::new(Semaphore::new(self.outstanding)));
        while !self.stop.load(Ordering::Relaxed) {
            let slot = match &slots {
                Some(slots) => match tokio::time::timeout(SLOT_WAIT, Arc::clone(slots).acquire_owned()).await {
                    Ok(Ok(slot)) => Some(slot),
                    // Look at the stop flag again; the semaphore is never closed.
                    _ => continue,
                },
                None => None,
            };
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let gid = format!("bench-{}-{seq}", self.tag);
            let started = self.tracker.now_us();
            let counted = self.tracker.in_window(started);
            self.tracker.start(seq, started, self.scenario.expected_calls(), slot);
            let result = match self.scenario {
                Scenario::Raw => {
                    let url = format!("{}?gid={gid}&trans_type=saga&branch_id=01&op=action", self.ok_url);
                    let result = send(&self.http, &url, PAYLOAD.to_owned()).await;
                    self.record_submit(&mut figures, started, counted);
                    result
                }
                Scenario::Saga | Scenario::SagaWait | Scenario::SagaFail => {
                    let body = self.saga_body(&gid);
                    let result = send(&self.http, &submit_url, body).await;
                    self.record_submit(&mut figures, started, counted);
                    figures.api_requests += u64::from(counted);
                    result
                }
                Scenario::Msg => {
                    let body = self.msg_body(&gid);
                    let mut result = send(&self.http, &prepare_url, body.clone()).await;
                    figures.api_requests += u64::from(counted);
                    if result.is_ok() {
                        let submit_started = self.tracker.now_us();
                        result = send(&self.http, &submit_url, body).await;
                        self.record_submit(&mut figures, submit_started, counted);
                        figures.api_requests += u64::from(counted);
                    }
                    result
                }
                Scenario::Tcc => {
                    self.tcc(&gid, &mut figures, counted, [&prepare_url, &register_url, &submit_url])
                        .await
                }
            };
            if let Err(error) = result {
                figures.errors += 1;
                figures.first_error.get_or_insert(error);
                self.tracker.abandon(seq);
                // Do not spin against a server that refuses everything.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        figures
    }

    fn record_submit(&self, figures: &mut ClientFigures, started: u64, counted: bool) {
        if counted {
            let took = self.tracker.now_us().saturating_sub(started);
            figures.submit_us.push(took.min(u32::MAX as u64) as u32);
        }
    }

    fn saga_body(&self, gid: &str) -> String {
        let (ok, second) = match self.scenario {
            Scenario::SagaFail => (&self.ok_url, &self.fail_url),
            _ => (&self.ok_url, &self.ok_url),
        };
        let wait = self.scenario == Scenario::SagaWait;
        format!(
            r#"{{"gid":"{gid}","trans_type":"saga","wait_result":{wait},"steps":[{{"action":"{ok}","compensate":"{ok}"}},{{"action":"{second}","compensate":"{ok}"}}],"payloads":["{{\"amount\":30}}","{{\"amount\":30}}"]}}"#
        )
    }

    fn msg_body(&self, gid: &str) -> String {
        let ok = &self.ok_url;
        format!(
            r#"{{"gid":"{gid}","trans_type":"msg","query_prepared":"{ok}","steps":[{{"action":"{ok}"}},{{"action":"{ok}"}}],"payloads":["{{\"amount\":30}}","{{\"amount\":30}}"]}}"#
        )
    }

    /// Prepare; registerBranch then the try, per branch (as DTM's TCC SDK does); submit.
    async fn tcc(
        &self,
        gid: &str,
        figures: &mut ClientFigures,
        counted: bool,
        [prepare, register, submit]: [&String; 3],
    ) -> Result<(), String> {
        let head = format!(r#"{{"gid":"{gid}","trans_type":"tcc"}}"#);
        send(&self.http, prepare, head.clone()).await?;
        figures.api_requests += u64::from(counted);
        let ok = &self.ok_url;
        for branch in ["01", "02"] {
            let body = format!(
                r#"{{"gid":"{gid}","trans_type":"tcc","branch_id":"{branch}","data":"{{\"amount\":30}}","confirm":"{ok}","cancel":"{ok}"}}"#
            );
            send(&self.http, register, body).await?;
            figures.api_requests += u64::from(counted);
            let try_url = format!("{ok}?gid={gid}&trans_type=tcc&branch_id={branch}&op=try");
            send(&self.http, &try_url, PAYLOAD.to_owned()).await?;
        }
        let submit_started = self.tracker.now_us();
        let result = send(&self.http, submit, head).await;
        self.record_submit(figures, submit_started, counted);
        figures.api_requests += u64::from(counted);
        result
    }
}

/// How long a client waits for a free slot before it looks at the stop flag again.
const SLOT_WAIT: Duration = Duration::from_millis(100);

/// The body of every branch call.
const PAYLOAD: &str = r#"{"amount":30}"#;

/// POSTs JSON; an answer other than 200 is an error.
async fn send(http: &reqwest::Client, url: &str, body: String) -> Result<(), String> {
    let response = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let text = response.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url}: {status}: {}", String::from_utf8_lossy(&text)))
    }
}
