//! Workflow, DTM's newest mode: the application writes the transaction as ordinary code; each
//! branch's definite result is recorded with the coordinator (`registerBranch`), so when the
//! coordinator calls the application back to resume an unfinished workflow, the recorded steps
//! are not run again. `on_rollback` and `on_commit` register the branch's second phase.
//!
//! ```no_run
//! # async fn run() -> kubetx_client::Result<()> {
//! use kubetx_client::{Dtm, WorkflowRegistry};
//! let dtm = Dtm::new("http://127.0.0.1:36789/api/dtmsvr")?;
//! // The coordinator calls this URL back to resume (see `kubetx_client::axum::workflow_resume`).
//! let workflows = WorkflowRegistry::new(&dtm, "http://127.0.0.1:8081/workflow/resume")?;
//! workflows.register("transfer", |wf, data| async move {
//!     wf.new_branch()?
//!         .on_rollback(|p| async move { kubetx_client::workflow::post_branch(&p, "http://bank/TransOutRevert", b"{}").await.map(drop) })
//!         .post("http://bank/TransOut", &data)
//!         .await?;
//!     wf.new_branch()?
//!         .on_rollback(|p| async move { kubetx_client::workflow::post_branch(&p, "http://bank/TransInRevert", b"{}").await.map(drop) })
//!         .post("http://bank/TransIn", &data)
//!         .await?;
//!     Ok(Vec::new())
//! });
//! workflows.execute("transfer", &dtm.new_gid().await?, br#"{"amount":30}"#).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use serde::Deserialize;

use crate::base::BranchIds;
use crate::branch::{BranchParams, call_branch};
use crate::error::{Error, Result};
use crate::options::TransOptions;
use crate::query::{BranchRow, TransGlobal};
use crate::transport::Dtm;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type WorkflowFn = Arc<dyn Fn(Workflow, Vec<u8>) -> BoxFuture<Result<Vec<u8>>> + Send + Sync>;
type Phase2Fn = Box<dyn FnOnce(BranchParams) -> BoxFuture<Result<()>> + Send>;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The registered workflows of one service, and where the coordinator calls it back.
/// Cheap to clone.
///
/// ```
/// let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
/// let registry = kubetx_client::WorkflowRegistry::new(&dtm, "http://127.0.0.1:8081/resume").unwrap();
/// registry.register("noop", |_wf, data| async move { Ok(data) });
/// ```
#[derive(Clone)]
pub struct WorkflowRegistry {
    dtm: Dtm,
    callback: String,
    options: TransOptions,
    workflows: Arc<RwLock<HashMap<String, WorkflowFn>>>,
}

impl std::fmt::Debug for WorkflowRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowRegistry")
            .field("callback", &self.callback)
            .finish_non_exhaustive()
    }
}

impl WorkflowRegistry {
    /// A registry whose workflows the coordinator resumes by calling `callback_url`.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// assert!(kubetx_client::WorkflowRegistry::new(&dtm, "not a url").is_err());
    /// ```
    pub fn new(dtm: &Dtm, callback_url: &str) -> Result<Self> {
        crate::base::check_url(callback_url, false)?;
        Ok(WorkflowRegistry {
            dtm: dtm.clone(),
            callback: callback_url.to_owned(),
            options: TransOptions::default(),
            workflows: Arc::default(),
        })
    }

    /// Options of every workflow started from this registry (retry interval, branch headers...).
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// let options = kubetx_client::TransOptions { retry_interval: 5, ..Default::default() };
    /// let r = kubetx_client::WorkflowRegistry::new(&dtm, "http://x/resume").unwrap().with_options(options);
    /// ```
    pub fn with_options(mut self, options: TransOptions) -> Self {
        self.options = options;
        self
    }

    /// Registers the workflow `name`: `body` gets the workflow and its input, and returns the
    /// result. A [`Error::Failure`] rolls the workflow back; another error leaves it to be resumed.
    ///
    /// ```
    /// # let dtm = kubetx_client::Dtm::new("http://127.0.0.1:36789/api/dtmsvr").unwrap();
    /// # let registry = kubetx_client::WorkflowRegistry::new(&dtm, "http://x/resume").unwrap();
    /// registry.register("echo", |_wf, data| async move { Ok(data) });
    /// ```
    pub fn register<F, Fut>(&self, name: &str, body: F)
    where
        F: Fn(Workflow, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>>> + Send + 'static,
    {
        let body: WorkflowFn = Arc::new(move |wf, data| Box::pin(body(wf, data)));
        self.workflows
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), body);
    }

    /// Runs (or resumes) the workflow `name` as transaction `gid` with `input`, and returns its
    /// result. A workflow that finished already answers its recorded outcome.
    ///
    /// ```no_run
    /// # async fn run(registry: kubetx_client::WorkflowRegistry) -> kubetx_client::Result<()> {
    /// let result = registry.execute("transfer", "gid-1", b"{}").await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute(&self, name: &str, gid: &str, input: &[u8]) -> Result<Vec<u8>> {
        let body = self
            .workflows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("no workflow named {name}")))?;
        let prepared = self.prepare(name, gid, input).await?;
        match prepared.transaction.status.as_str() {
            "succeed" => return Ok(B64.decode(prepared.transaction.result).unwrap_or_default()),
            "failed" => return Err(Error::Failure(prepared.transaction.rollback_reason)),
            _ => {}
        }
        let wf = Workflow::new(&self.dtm, gid, &prepared.progresses);
        let outcome = body(wf.clone(), input.to_vec()).await;
        wf.finish(outcome).await
    }

    /// The coordinator's resume call: `op` names the workflow, the body is its input.
    ///
    /// ```no_run
    /// # async fn run(registry: kubetx_client::WorkflowRegistry, params: kubetx_client::BranchParams) -> kubetx_client::Result<()> {
    /// registry.execute_by_query(&params, b"{}").await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute_by_query(&self, params: &BranchParams, input: &[u8]) -> Result<Vec<u8>> {
        params.check()?;
        self.execute(&params.op, &params.gid, input).await
    }

    async fn prepare(&self, name: &str, gid: &str, input: &[u8]) -> Result<Prepared> {
        let custom = serde_json::json!({"name": name, "data": B64.encode(input)}).to_string();
        let mut body = serde_json::to_value(&self.options)?;
        let fields = serde_json::json!({
            "gid": gid,
            "trans_type": "workflow",
            "protocol": "http",
            "query_prepared": self.callback,
            "custom_data": custom,
        });
        if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
            body.extend(fields.clone());
        }
        let reply = self.dtm.call("prepareWorkflow", &body).await?;
        serde_json::from_value(reply).map_err(|e| Error::Unknown(format!("prepareWorkflow reply: {e}")))
    }
}

#[derive(Debug, Deserialize)]
struct Prepared {
    transaction: TransGlobal,
    #[serde(default)]
    progresses: Option<Vec<BranchRow>>,
}

/// A recorded step result.
#[derive(Debug, Clone)]
struct Progress {
    succeeded: bool,
    data: Vec<u8>,
}

/// One execution of a workflow: hands out branches and records their results.
/// Cheap to clone.
///
/// ```no_run
/// # async fn f(wf: kubetx_client::Workflow) -> kubetx_client::Result<()> {
/// let reply = wf.new_branch()?.run(|params| async move { Ok(b"done".to_vec()) }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Workflow {
    inner: Arc<WorkflowInner>,
}

struct WorkflowInner {
    dtm: Dtm,
    gid: String,
    ids: BranchIds,
    progress: Mutex<BTreeMap<(String, String), Progress>>,
    rollbacks: Mutex<Vec<(String, Phase2Fn)>>,
    commits: Mutex<Vec<(String, Phase2Fn)>>,
}

impl std::fmt::Debug for Workflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workflow")
            .field("gid", &self.inner.gid)
            .finish_non_exhaustive()
    }
}

impl Workflow {
    fn new(dtm: &Dtm, gid: &str, progresses: &Option<Vec<BranchRow>>) -> Self {
        let progress = progresses
            .iter()
            .flatten()
            .filter(|row| row.status == "succeed" || row.status == "failed")
            .map(|row| {
                let progress = Progress {
                    succeeded: row.status == "succeed",
                    data: B64.decode(&row.bin_data).unwrap_or_default(),
                };
                ((row.branch_id.clone(), row.op.clone()), progress)
            })
            .collect();
        Workflow {
            inner: Arc::new(WorkflowInner {
                dtm: dtm.clone(),
                gid: gid.to_owned(),
                ids: BranchIds::new(""),
                progress: Mutex::new(progress),
                rollbacks: Mutex::default(),
                commits: Mutex::default(),
            }),
        }
    }

    /// The workflow's gid.
    ///
    /// ```no_run
    /// # fn f(wf: kubetx_client::Workflow) { println!("{}", wf.gid()); }
    /// ```
    pub fn gid(&self) -> &str {
        &self.inner.gid
    }

    /// The next branch ("01", "02", ... in call order, the same on every replay).
    ///
    /// ```no_run
    /// # fn f(wf: kubetx_client::Workflow) -> kubetx_client::Result<()> {
    /// let branch = wf.new_branch()?;
    /// assert_eq!(branch.params().branch_id, "01");
    /// # Ok(()) }
    /// ```
    pub fn new_branch(&self) -> Result<Branch> {
        Ok(Branch {
            wf: self.clone(),
            branch_id: self.inner.ids.next()?,
        })
    }

    fn recorded(&self, branch_id: &str, op: &str) -> Option<Progress> {
        let progress = self.inner.progress.lock().unwrap_or_else(|e| e.into_inner());
        progress.get(&(branch_id.to_owned(), op.to_owned())).cloned()
    }

    fn params(&self, branch_id: &str, op: &str) -> BranchParams {
        BranchParams {
            gid: self.inner.gid.clone(),
            trans_type: "workflow".to_owned(),
            branch_id: branch_id.to_owned(),
            op: op.to_owned(),
            dtm: self.inner.dtm.url().to_string(),
            phase2_url: String::new(),
        }
    }

    /// Records a definite result with the coordinator.
    async fn record(&self, branch_id: &str, op: &str, succeeded: bool, data: &[u8]) -> Result<()> {
        let body = serde_json::json!({
            "gid": self.inner.gid,
            "trans_type": "workflow",
            "branch_id": branch_id,
            "op": op,
            "status": if succeeded { "succeed" } else { "failed" },
            "data": String::from_utf8_lossy(data),
        });
        self.inner.dtm.call("registerBranch", &body).await?;
        let progress = Progress {
            succeeded,
            data: data.to_vec(),
        };
        let mut recorded = self.inner.progress.lock().unwrap_or_else(|e| e.into_inner());
        recorded.insert((branch_id.to_owned(), op.to_owned()), progress);
        Ok(())
    }

    /// Runs a step unless recorded; records definite results (success or FAILURE) only.
    async fn step<F, Fut>(&self, branch_id: &str, op: &str, f: F) -> Result<Vec<u8>>
    where
        F: FnOnce(BranchParams) -> Fut,
        Fut: Future<Output = Result<Vec<u8>>>,
    {
        if let Some(done) = self.recorded(branch_id, op) {
            return if done.succeeded {
                Ok(done.data)
            } else {
                Err(Error::Failure(String::from_utf8_lossy(&done.data).into_owned()))
            };
        }
        match f(self.params(branch_id, op)).await {
            Ok(data) => {
                self.record(branch_id, op, true, &data).await?;
                Ok(data)
            }
            Err(Error::Failure(message)) => {
                self.record(branch_id, op, false, message.as_bytes()).await?;
                Err(Error::Failure(message))
            }
            Err(other) => Err(other),
        }
    }

    /// Phase 2 and the final submit, from the workflow function's outcome.
    async fn finish(&self, outcome: Result<Vec<u8>>) -> Result<Vec<u8>> {
        let (list, op, status) = match &outcome {
            Ok(_) => (&self.inner.commits, "commit", "succeed"),
            Err(Error::Failure(_)) => (&self.inner.rollbacks, "rollback", "failed"),
            // Not definite: leave it prepared; the coordinator resumes it.
            Err(_) => return outcome,
        };
        let phase2 = std::mem::take(&mut *list.lock().unwrap_or_else(|e| e.into_inner()));
        for (branch_id, f) in phase2.into_iter().rev() {
            // A second phase must not fail: a FAILURE there is retried (on the next resume),
            // never recorded as the branch's final word.
            let run = |p| async move {
                match f(p).await {
                    Ok(()) => Ok(Vec::new()),
                    Err(Error::Failure(m)) => Err(Error::Unknown(format!("{op} answered FAILURE, retried: {m}"))),
                    Err(e) => Err(e),
                }
            };
            self.step(&branch_id, op, run).await?;
        }
        let mut extra = serde_json::json!({"status": status});
        match &outcome {
            Ok(result) => extra["result"] = B64.encode(result).into(),
            Err(e) => extra["rollback_reason"] = e.to_string().chars().take(1024).collect::<String>().into(),
        }
        let body = serde_json::json!({"gid": self.inner.gid, "trans_type": "workflow", "req_extra": extra});
        self.inner.dtm.call("submit", &body).await?;
        outcome
    }
}

/// One branch of a workflow: register its second phase, then run its action.
///
/// ```no_run
/// # async fn f(wf: kubetx_client::Workflow) -> kubetx_client::Result<()> {
/// wf.new_branch()?
///     .on_rollback(|p| async move { Ok(()) })
///     .on_commit(|p| async move { Ok(()) })
///     .run(|p| async move { Ok(Vec::new()) })
///     .await?;
/// # Ok(()) }
/// ```
pub struct Branch {
    wf: Workflow,
    branch_id: String,
}

impl Branch {
    /// This branch's parameters for its action (as a barrier needs them).
    ///
    /// ```no_run
    /// # fn f(b: kubetx_client::workflow::Branch) { assert_eq!(b.params().op, "action"); }
    /// ```
    pub fn params(&self) -> BranchParams {
        self.wf.params(&self.branch_id, "action")
    }

    /// What undoes this branch when the workflow fails; registered now, so it also runs for a
    /// branch whose action failed or never answered (a barrier turns that into a null
    /// compensation). Rollbacks run last-registered first, each recorded once done.
    ///
    /// ```no_run
    /// # fn f(b: kubetx_client::workflow::Branch) { b.on_rollback(|p| async move { Ok(()) }); }
    /// ```
    pub fn on_rollback<F, Fut>(self, f: F) -> Self
    where
        F: FnOnce(BranchParams) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let f: Phase2Fn = Box::new(move |p| Box::pin(f(p)));
        let mut list = self.wf.inner.rollbacks.lock().unwrap_or_else(|e| e.into_inner());
        list.push((self.branch_id.clone(), f));
        drop(list);
        self
    }

    /// What confirms this branch when the workflow succeeds (TCC-like branches).
    ///
    /// ```no_run
    /// # fn f(b: kubetx_client::workflow::Branch) { b.on_commit(|p| async move { Ok(()) }); }
    /// ```
    pub fn on_commit<F, Fut>(self, f: F) -> Self
    where
        F: FnOnce(BranchParams) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let f: Phase2Fn = Box::new(move |p| Box::pin(f(p)));
        let mut list = self.wf.inner.commits.lock().unwrap_or_else(|e| e.into_inner());
        list.push((self.branch_id.clone(), f));
        drop(list);
        self
    }

    /// Runs the action `f` (DTM's `wf.Do`), unless its result is recorded already: then the
    /// recorded result is returned without running it.
    ///
    /// ```no_run
    /// # async fn f(b: kubetx_client::workflow::Branch) -> kubetx_client::Result<()> {
    /// b.run(|p| async move { Ok(b"ok".to_vec()) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn run<F, Fut>(self, f: F) -> Result<Vec<u8>>
    where
        F: FnOnce(BranchParams) -> Fut,
        Fut: Future<Output = Result<Vec<u8>>>,
    {
        self.wf.step(&self.branch_id, "action", f).await
    }

    /// An HTTP action: POSTs `body` to `url` with the branch parameters in the query, as the
    /// coordinator would call it (DTM's `wf.NewRequest().Post`).
    ///
    /// ```no_run
    /// # async fn f(b: kubetx_client::workflow::Branch) -> kubetx_client::Result<()> {
    /// b.post("http://bank/TransOut", br#"{"amount":30}"#).await?;
    /// # Ok(()) }
    /// ```
    pub async fn post(self, url: &str, body: &[u8]) -> Result<Vec<u8>> {
        let url = url.to_owned();
        let body = body.to_vec();
        self.run(|p| async move { post_branch(&p, &url, &body).await }).await
    }
}

/// POSTs `body` to `url` with the branch parameters `p` in the query; the reply classified as
/// the coordinator classifies it. For phase-2 callbacks and steps that call HTTP services.
///
/// ```no_run
/// # async fn f(p: kubetx_client::BranchParams) -> kubetx_client::Result<()> {
/// kubetx_client::workflow::post_branch(&p, "http://bank/TransOutRevert", b"{}").await?;
/// # Ok(()) }
/// ```
pub async fn post_branch(p: &BranchParams, url: &str, body: &[u8]) -> Result<Vec<u8>> {
    crate::base::check_url(url, false)?;
    let http = shared_http()?;
    call_branch(&http, url, &p.query_pairs(), &BTreeMap::new(), Some(body.to_vec())).await
}

/// One pooled client for the steps' HTTP calls.
fn shared_http() -> Result<reqwest::Client> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client.clone());
    }
    let client = crate::transport::http_client(std::time::Duration::from_secs(10))?;
    Ok(CLIENT.get_or_init(|| client).clone())
}
