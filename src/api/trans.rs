//! Routes that create and move transactions: prepare, submit, abort, forceStop,
//! registerBranch, prepareWorkflow. Idempotency follows DTM (§4.6 of the protocol notes).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};

use super::wire::{self, TransRequest, branch_request, check_url};
use super::{ApiError, ApiResult, AppState, JsonBody, success};
use crate::engine::{self, MsgTarget, SagaOrders, SagaStep, WorkflowCustom};
use crate::invoke::grpc::{self, GrpcTarget};
use crate::model::{Branch, BranchStatus, GlobalTrans, Millis, TransStatus, TransType, after_seconds};
use crate::scheduler::{Coordinator, PassReport};
use crate::store::{AddBranches, StatusChange, StoreError};

/// Category of topic records in the KV store.
pub(super) const TOPICS: &str = "topics";

/// How often a request re-reads after losing a race with another writer.
const RACE_RETRIES: usize = 3;

/// `POST /prepare`: msg, tcc and xa start here.
pub(super) async fn prepare(State(state): State<AppState>, JsonBody(req): JsonBody<TransRequest>) -> ApiResult {
    let coordinator = &state.coordinator;
    let gid = req.gid()?;
    let trans_type = req.trans_type()?;
    if !matches!(trans_type, TransType::Msg | TransType::Tcc | TransType::Xa) {
        return Err(ApiError::BadRequest(format!(
            "prepare is for msg, tcc and xa; a {trans_type} starts with {}",
            if trans_type == TransType::Workflow {
                "prepareWorkflow"
            } else {
                "submit"
            }
        )));
    }
    for _ in 0..RACE_RETRIES {
        match create_first(coordinator, &req, trans_type, TransStatus::Prepared).await? {
            Fresh::Created(..) => return success(),
            Fresh::Exists(Some(existing)) if existing.trans_type != trans_type && !existing.status.is_finished() => {
                return Err(type_mismatch(gid, existing.trans_type, trans_type));
            }
            Fresh::Exists(Some(existing)) if existing.status == TransStatus::Prepared => return success(),
            Fresh::Exists(Some(existing)) => {
                return Err(ApiError::Failure(format!(
                    "current status '{}', cannot prepare",
                    existing.status
                )));
            }
            // Gone between the refused insert and the read (retention): try again.
            Fresh::Exists(None) => {}
        }
    }
    Err(ApiError::Failure(format!(
        "transaction {gid} is changing concurrently; retry"
    )))
}

/// `POST /submit`: creates and runs a saga or msg, or commits a prepared msg, tcc or xa, or
/// records a workflow's final status.
pub(super) async fn submit(State(state): State<AppState>, JsonBody(req): JsonBody<TransRequest>) -> ApiResult {
    let coordinator = &state.coordinator;
    let gid = req.gid()?;
    let trans_type = req.trans_type()?;
    if trans_type == TransType::Workflow {
        return submit_workflow(coordinator, &req).await;
    }
    if trans_type == TransType::Msg
        && let Some(answer) = submit_prepared_msg(coordinator, &req).await?
    {
        return answer;
    }
    for _ in 0..RACE_RETRIES {
        let now = coordinator.now();
        // A saga is always new at its submit: insert at once. A msg is often prepared already,
        // and a refused insert would cost a write: look first.
        let existing = if trans_type == TransType::Saga {
            match create_first(coordinator, &req, trans_type, TransStatus::Submitted).await? {
                Fresh::Created(global, branches) => {
                    return drive_created(coordinator, global, branches, req.wait_result).await;
                }
                Fresh::Exists(existing) => existing,
            }
        } else {
            coordinator.store().find(gid).await?
        };
        match existing {
            None if matches!(trans_type, TransType::Tcc | TransType::Xa) => {
                return Err(ApiError::NotFound(format!(
                    "no transaction with gid {gid}: a {trans_type} must be prepared first"
                )));
            }
            None => {
                if let Fresh::Created(global, branches) =
                    create_first(coordinator, &req, trans_type, TransStatus::Submitted).await?
                {
                    return drive_created(coordinator, global, branches, req.wait_result).await;
                }
            }
            Some(existing) if existing.trans_type != trans_type && !existing.status.is_finished() => {
                return Err(type_mismatch(gid, existing.trans_type, trans_type));
            }
            Some(existing) => match existing.status {
                TransStatus::Prepared => {
                    let mut change = StatusChange::new(gid, TransStatus::Prepared, TransStatus::Submitted, now);
                    change.lease = Some(coordinator.lease(now));
                    // A msg delay given only at submit must survive retries (DTM loses it).
                    let custom_data = req.custom_data();
                    if existing.trans_type == TransType::Msg && !custom_data.is_empty() {
                        wire::msg_custom(&custom_data)?;
                        change.custom_data = Some(custom_data);
                    }
                    if coordinator.store().change_status(&change).await? {
                        let wait_result = req.wait_result || existing.options.wait_result;
                        return drive_changed(coordinator, existing, &change, wait_result, wait_answer).await;
                    }
                }
                TransStatus::Submitted => {
                    // Submitting twice is fine; it also hurries a parked transaction along.
                    if coordinator.store().claim(gid, &coordinator.lease(now), now).await? {
                        return drive(coordinator, gid, req.wait_result).await;
                    }
                    return success();
                }
                status => {
                    return Err(ApiError::Failure(format!("current status '{status}', cannot submit")));
                }
            },
        }
    }
    Err(ApiError::Failure(format!(
        "transaction {gid} is changing concurrently; retry"
    )))
}

/// The usual msg `submit`, right after its `prepare`: one store call moves it from `prepared` to
/// `submitted` under this process's lease and loads it with its branches. `None` when the msg is
/// not a prepared one (or the request is not plain): the general path then answers, with its
/// reads and its errors.
async fn submit_prepared_msg(
    coordinator: &Arc<Coordinator>,
    req: &TransRequest,
) -> Result<Option<ApiResult>, ApiError> {
    let now = coordinator.now();
    let mut change = StatusChange::new(req.gid()?, TransStatus::Prepared, TransStatus::Submitted, now);
    change.trans_type = Some(TransType::Msg);
    change.lease = Some(coordinator.lease(now));
    // A msg delay given only at submit must survive retries (DTM loses it).
    let custom_data = req.custom_data();
    if !custom_data.is_empty() {
        if wire::msg_custom(&custom_data).is_err() {
            return Ok(None);
        }
        change.custom_data = Some(custom_data);
    }
    let Some((global, branches)) = coordinator.store().change_status_and_load(&change).await? else {
        return Ok(None);
    };
    let wait_result = req.wait_result || global.options.wait_result;
    Ok(Some(drive_created(coordinator, global, branches, wait_result).await))
}

/// Runs the first pass: in the background, or before answering when `wait_result` is set.
async fn drive(coordinator: &Arc<Coordinator>, gid: &str, wait_result: bool) -> ApiResult {
    if !wait_result {
        coordinator.spawn_pass(gid.to_owned());
        return success();
    }
    let report = coordinator.run_pass(gid).await?;
    wait_answer(&report)
}

/// Runs the first pass from memory, on rows this request has just written or loaded.
async fn drive_created(
    coordinator: &Arc<Coordinator>,
    global: GlobalTrans,
    branches: Vec<Branch>,
    wait_result: bool,
) -> ApiResult {
    if !wait_result {
        coordinator.spawn_pass_from(global, Some(branches)).await?;
        return success();
    }
    let report = coordinator.run_pass_from(global, Some(branches)).await?;
    wait_answer(&report)
}

/// Runs the first pass after this request's status change took the lease: the transaction as
/// the change left it is known, only its branches are read.
async fn drive_changed(
    coordinator: &Arc<Coordinator>,
    existing: GlobalTrans,
    change: &StatusChange,
    wait_result: bool,
    answer: fn(&PassReport) -> ApiResult,
) -> ApiResult {
    let global = changed(existing, change);
    if !wait_result {
        coordinator.spawn_pass_from(global, None).await?;
        return success();
    }
    let report = coordinator.run_pass_from(global, None).await?;
    answer(&report)
}

/// A transaction as the store holds it after `change` succeeded on it (the fields of
/// [`StatusChange`], applied as the store applies them).
fn changed(mut global: GlobalTrans, change: &StatusChange) -> GlobalTrans {
    global.status = change.to;
    global.update_time = change.now;
    if let Some(reason) = &change.rollback_reason {
        global.rollback_reason.clone_from(reason);
    }
    if let Some(result) = &change.result {
        global.result.clone_from(result);
    }
    if let Some(custom_data) = &change.custom_data {
        global.custom_data.clone_from(custom_data);
    }
    let (owner, expiry) = change.owner_and_expiry();
    if let Some(owner) = owner {
        global.owner = owner;
    }
    if let Some(expiry) = expiry {
        global.next_cron_time = expiry;
    }
    match change.to {
        TransStatus::Succeed => global.finish_time = Some(change.now),
        TransStatus::Failed => global.rollback_time = Some(change.now),
        _ => {}
    }
    global
}

/// What [`create_first`] found.
enum Fresh {
    /// This request created the transaction, as given.
    Created(GlobalTrans, Vec<Branch>),
    /// The gid exists: the stored transaction (`None` if it vanished since).
    Exists(Option<GlobalTrans>),
}

/// Creates a new transaction without reading first: most requests that name a new gid are new,
/// and the conditional insert tells an existing one. When the gid exists, or when the request is
/// invalid for a new transaction, the stored transaction is read, so that the caller answers
/// exactly as if it had looked first (an invalid request for an unknown gid gets its error). A
/// `submitted` transaction is created with this process's lease, to be driven at once.
async fn create_first(
    coordinator: &Coordinator,
    req: &TransRequest,
    trans_type: TransType,
    status: TransStatus,
) -> Result<Fresh, ApiError> {
    let gid = req.gid()?;
    let now = coordinator.now();
    let built = match new_branches(coordinator, req, trans_type, now).await {
        Ok(branches) => new_global(coordinator, req, trans_type, status, now).map(|global| (global, branches)),
        Err(error) => Err(error),
    };
    let (mut global, branches) = match built {
        Ok(built) => built,
        Err(error) => return existing_or(coordinator, gid, error).await,
    };
    if status == TransStatus::Submitted {
        let lease = coordinator.lease(now);
        global.owner = lease.owner;
        global.next_cron_time = lease.until;
    }
    match coordinator.store().create(&global, &branches).await {
        Ok(true) => Ok(Fresh::Created(global, branches)),
        Ok(false) => Ok(Fresh::Exists(coordinator.store().find(gid).await?)),
        Err(error @ StoreError::Invalid(_)) => existing_or(coordinator, gid, error.into()).await,
        Err(error) => Err(error.into()),
    }
}

/// The stored transaction, or `error` when there is none.
async fn existing_or(coordinator: &Coordinator, gid: &str, error: ApiError) -> Result<Fresh, ApiError> {
    match coordinator.store().find(gid).await? {
        None => Err(error),
        existing => Ok(Fresh::Exists(existing)),
    }
}

/// Runs the first rollback pass of an abort, like [`drive`].
async fn drive_abort(coordinator: &Arc<Coordinator>, gid: &str, wait_result: bool) -> ApiResult {
    if !wait_result {
        coordinator.spawn_pass(gid.to_owned());
        return success();
    }
    let report = coordinator.run_pass(gid).await?;
    abort_answer(&report)
}

/// `wait_result` answer: SUCCESS once succeeded; FAILURE when it failed or is rolling back;
/// ONGOING when it may still succeed (DTM answers FAILURE there too; see docs/compatibility.md).
fn wait_answer(report: &PassReport) -> ApiResult {
    let global = &report.global;
    let problem = problem_text(report);
    match global.status {
        TransStatus::Succeed => success(),
        TransStatus::Failed | TransStatus::Aborting => Err(ApiError::Failure(if global.rollback_reason.is_empty() {
            format!("transaction {} is {}", global.gid, global.status)
        } else {
            global.rollback_reason.clone()
        })),
        status => Err(ApiError::Ongoing(format!(
            "transaction {} is still {status}{problem}",
            global.gid
        ))),
    }
}

/// `wait_result` answer of an abort: SUCCESS once rolled back (as DTM answers), ONGOING while
/// still rolling back.
fn abort_answer(report: &PassReport) -> ApiResult {
    let global = &report.global;
    match global.status {
        TransStatus::Failed => success(),
        status => Err(ApiError::Ongoing(format!(
            "transaction {} is still {status}{}",
            global.gid,
            problem_text(report)
        ))),
    }
}

/// `": <last branch problem>"`, or nothing when the pass saw none.
fn problem_text(report: &PassReport) -> String {
    match &report.last_problem {
        Some(engine::Outcome::Error(text) | engine::Outcome::Ongoing(text) | engine::Outcome::Failure(text)) => {
            format!(": {}", text.trim())
        }
        _ => String::new(),
    }
}

/// A request naming another mode than the stored unfinished transaction's: refused, since acting
/// on it would skip or strand the stored transaction's own phase two. (A finished one gets DTM's
/// status message instead.)
fn type_mismatch(gid: &str, stored: TransType, requested: TransType) -> ApiError {
    ApiError::Failure(format!(
        "gid {gid} belongs to a {stored} transaction, not a {requested}"
    ))
}

async fn submit_workflow(coordinator: &Arc<Coordinator>, req: &TransRequest) -> ApiResult {
    let gid = req.gid()?;
    let wanted = match req.extra("status").as_str() {
        "succeed" => TransStatus::Succeed,
        "failed" => TransStatus::Failed,
        other => {
            return Err(ApiError::BadRequest(format!(
                "workflow submit needs req_extra.status \"succeed\" or \"failed\", got {other:?}"
            )));
        }
    };
    let existing = coordinator
        .store()
        .find(gid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no workflow with gid {gid}: call prepareWorkflow first")))?;
    if existing.trans_type != TransType::Workflow {
        return Err(type_mismatch(gid, existing.trans_type, TransType::Workflow));
    }
    match existing.status {
        TransStatus::Prepared => {
            let mut change = StatusChange::new(gid, TransStatus::Prepared, wanted, coordinator.now());
            change.rollback_reason = Some(req.extra("rollback_reason")).filter(|r| !r.is_empty());
            change.result = Some(req.extra("result")).filter(|r| !r.is_empty());
            if coordinator.store().change_status(&change).await? {
                return success();
            }
            Err(ApiError::Failure(format!("workflow {gid} changed concurrently; retry")))
        }
        status if status == wanted => success(),
        status => Err(ApiError::Failure(format!("current status '{status}', cannot submit"))),
    }
}

/// `POST /abort`: rolls back a prepared tcc or xa, or fails a prepared msg.
pub(super) async fn abort(State(state): State<AppState>, JsonBody(req): JsonBody<TransRequest>) -> ApiResult {
    let coordinator = &state.coordinator;
    let gid = req.gid()?;
    let reason = Some(req.rollback_reason.clone()).filter(|r| !r.is_empty());
    let requested = Some(req.trans_type.as_str())
        .filter(|t| !t.is_empty())
        .map(wire::parse_trans_type)
        .transpose()?;
    for _ in 0..RACE_RETRIES {
        let now = coordinator.now();
        let existing = coordinator
            .store()
            .find(gid)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no transaction with gid {gid}")))?;
        if let Some(requested) = requested.filter(|&t| t != existing.trans_type && !existing.status.is_finished()) {
            return Err(type_mismatch(gid, existing.trans_type, requested));
        }
        let wait_result = req.wait_result || existing.options.wait_result;
        match (existing.trans_type, existing.status) {
            (TransType::Msg, TransStatus::Prepared) => {
                let mut change = StatusChange::new(gid, TransStatus::Prepared, TransStatus::Failed, now);
                change.rollback_reason = reason.clone();
                if coordinator.store().change_status(&change).await? {
                    return success();
                }
            }
            (TransType::Tcc | TransType::Xa, TransStatus::Prepared) => {
                let mut change = StatusChange::new(gid, TransStatus::Prepared, TransStatus::Aborting, now);
                change.rollback_reason = reason.clone();
                change.lease = Some(coordinator.lease(now));
                if coordinator.store().change_status(&change).await? {
                    return drive_changed(coordinator, existing, &change, wait_result, abort_answer).await;
                }
            }
            (TransType::Tcc | TransType::Xa, TransStatus::Aborting) => {
                if coordinator.store().claim(gid, &coordinator.lease(now), now).await? {
                    return drive_abort(coordinator, gid, wait_result).await;
                }
                return success();
            }
            (trans_type, status) => {
                return Err(ApiError::Failure(format!(
                    "trans type: '{trans_type}' current status '{status}', cannot abort"
                )));
            }
        }
    }
    Err(ApiError::Failure(format!(
        "transaction {gid} is changing concurrently; retry"
    )))
}

/// `POST /forceStop`: marks an unfinished transaction failed without compensating.
pub(super) async fn force_stop(State(state): State<AppState>, JsonBody(req): JsonBody<TransRequest>) -> ApiResult {
    let coordinator = &state.coordinator;
    let gid = req.gid()?;
    for _ in 0..RACE_RETRIES {
        let existing = coordinator
            .store()
            .find(gid)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no transaction with gid {gid}")))?;
        if existing.status.is_finished() {
            return Err(ApiError::Failure(format!(
                "global transaction force stop error. status: {}",
                existing.status
            )));
        }
        let mut change = StatusChange::new(gid, existing.status, TransStatus::Failed, coordinator.now());
        change.rollback_reason = Some("force stopped".to_owned());
        if coordinator.store().change_status(&change).await? {
            return success();
        }
    }
    Err(ApiError::Failure(format!(
        "transaction {gid} is changing concurrently; retry"
    )))
}

/// `POST /registerBranch` (and its aliases): adds tcc, xa or workflow branches to a prepared
/// transaction.
pub(super) async fn register_branch(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult {
    let fields = branch_request(body)?;
    let data = fields.get("data").cloned().unwrap_or_default().into_bytes();
    register(&state.coordinator, &fields, data).await
}

/// Registers branches from the string `fields` of a registerBranch request and the branch
/// payload `data` (the HTTP body's `data`, gRPC's `BusiPayload`): both front doors end here.
pub(super) async fn register(
    coordinator: &Arc<Coordinator>,
    fields: &BTreeMap<String, String>,
    data: Vec<u8>,
) -> ApiResult {
    let field = |key: &str| fields.get(key).map(String::as_str).unwrap_or_default();
    let gid = field("gid");
    wire::check_gid(gid)?;
    let branch_id = field("branch_id");
    if branch_id.is_empty() {
        return Err(ApiError::BadRequest("branch_id is required".to_owned()));
    }
    let now = coordinator.now();
    let data = data.as_slice();
    let trans_type = wire::parse_trans_type(field("trans_type"))?;
    let rows = match trans_type {
        TransType::Tcc => {
            check_url(coordinator.policy(), "confirm", field("confirm"))?;
            check_url(coordinator.policy(), "cancel", field("cancel"))?;
            if [field("confirm"), field("cancel")]
                .iter()
                .any(|t| GrpcTarget::is_grpc(t))
            {
                grpc_ids(gid, branch_id)?;
            }
            engine::tcc_branches(gid, branch_id, field("confirm"), field("cancel"), data, now)
        }
        TransType::Xa => {
            check_url(coordinator.policy(), "url", field("url"))?;
            if GrpcTarget::is_grpc(field("url")) {
                grpc_ids(gid, branch_id)?;
            }
            engine::xa_branches(gid, branch_id, field("url"), data, now)
        }
        TransType::Workflow => {
            let operation = field("op");
            if operation.is_empty() {
                return Err(ApiError::BadRequest("op is required for a workflow branch".to_owned()));
            }
            let status = match BranchStatus::parse(field("status")) {
                Some(status @ (BranchStatus::Succeed | BranchStatus::Failed)) => status,
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "workflow branch status must be \"succeed\" or \"failed\", got {:?}",
                        field("status")
                    )));
                }
            };
            let mut row = Branch::new(gid, branch_id, operation, "", data.to_vec(), now);
            row.status = status;
            match status {
                BranchStatus::Succeed => row.finish_time = Some(now),
                _ => row.rollback_time = Some(now),
            }
            vec![row]
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "registerBranch is for tcc, xa and workflow, not {other}"
            )));
        }
    };
    // The mode never changes, so this read cannot race: rows of another mode would never be
    // driven by the stored transaction's phase two.
    if let Some(existing) = coordinator.store().find(gid).await?
        && existing.trans_type != trans_type
        && !existing.status.is_finished()
    {
        return Err(type_mismatch(gid, existing.trans_type, trans_type));
    }
    match coordinator.store().add_branches(gid, &rows).await? {
        AddBranches::Added | AddBranches::AlreadyRegistered => success(),
        AddBranches::Conflict(message) => Err(ApiError::Failure(message)),
        AddBranches::WrongStatus(None) => Err(ApiError::NotFound(format!("no transaction with gid {gid}"))),
        AddBranches::WrongStatus(Some(status)) => Err(ApiError::Failure(format!(
            "transaction {gid} is {status}: branches can only be registered while it is prepared"
        ))),
    }
}

/// `POST /prepareWorkflow`: creates the workflow if new; returns it with its recorded progress.
pub(super) async fn prepare_workflow(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<TransRequest>,
) -> ApiResult {
    let (global, progresses) = workflow_progress(&state.coordinator, &req).await?;
    Ok(Json(json!({
        "transaction": wire::global_json(&global),
        "progresses": progresses.iter().map(wire::branch_json).collect::<Vec<_>>(),
    })))
}

/// The workflow of a prepareWorkflow request, created if new, with its recorded progress: both
/// front doors end here.
pub(super) async fn workflow_progress(
    coordinator: &Arc<Coordinator>,
    req: &TransRequest,
) -> Result<(GlobalTrans, Vec<Branch>), ApiError> {
    let gid = req.gid()?;
    if !req.trans_type.is_empty() && req.trans_type()? != TransType::Workflow {
        return Err(ApiError::BadRequest(
            "prepareWorkflow needs trans_type \"workflow\"".to_owned(),
        ));
    }
    for _ in 0..RACE_RETRIES {
        if let Some(existing) = coordinator.store().find(gid).await? {
            if existing.trans_type != TransType::Workflow {
                return Err(ApiError::Failure(format!(
                    "gid {gid} belongs to a {} transaction",
                    existing.trans_type
                )));
            }
            let progresses = coordinator.store().branches(gid).await?;
            return Ok((existing, progresses));
        }
        let now = coordinator.now();
        let global = new_global(coordinator, req, TransType::Workflow, TransStatus::Prepared, now)?;
        coordinator.store().create(&global, &[]).await?;
    }
    Err(ApiError::Failure(format!(
        "transaction {gid} is changing concurrently; retry"
    )))
}

/// A new global from a request, validated. The caller sets the lease when it drives it at once.
fn new_global(
    coordinator: &Coordinator,
    req: &TransRequest,
    trans_type: TransType,
    status: TransStatus,
    now: Millis,
) -> Result<GlobalTrans, ApiError> {
    req.check_protocol()?;
    let custom_data = req.custom_data();
    if req.protocol == "grpc" {
        check_grpc_metadata(req, trans_type, &custom_data)?;
    }
    match trans_type {
        TransType::Saga => {
            SagaOrders::parse(&custom_data)
                .and_then(|orders| orders.validate(req.steps.len()))
                .map_err(ApiError::BadRequest)?;
        }
        TransType::Msg => {
            wire::msg_custom(&custom_data)?;
            check_url(coordinator.policy(), "query_prepared", &req.query_prepared)?;
            // Without a back-check a prepared msg would be delivered blindly at its timeout.
            if status == TransStatus::Prepared && req.query_prepared.is_empty() {
                return Err(ApiError::BadRequest(
                    "a prepared msg needs query_prepared, the back-check called if it is never submitted".to_owned(),
                ));
            }
        }
        TransType::Workflow => {
            let custom = WorkflowCustom::parse(&custom_data).map_err(ApiError::BadRequest)?;
            if custom.name.is_empty() {
                return Err(ApiError::BadRequest("workflow custom_data needs a name".to_owned()));
            }
            check_url(coordinator.policy(), "query_prepared", &req.query_prepared)?;
        }
        TransType::Tcc | TransType::Xa => {}
    }
    let mut global = GlobalTrans {
        id: 0,
        gid: req.gid()?.to_owned(),
        trans_type,
        status,
        query_prepared: req.query_prepared.clone(),
        protocol: if req.protocol.is_empty() {
            "http".to_owned()
        } else {
            req.protocol.clone()
        },
        custom_data,
        options: req.options()?,
        create_time: now,
        update_time: now,
        finish_time: None,
        rollback_time: None,
        next_cron_time: now,
        next_cron_interval: 0,
        owner: String::new(),
        result: String::new(),
        rollback_reason: String::new(),
        // The trace the client's request belongs to: the passes continue it.
        ext_data: crate::telemetry::new_ext_data(&req.gid),
    };
    let policy = &coordinator.config().policy;
    global.next_cron_interval = engine::base_interval(&global, policy);
    // A prepared transaction needs attention at its timeout (back-check or abort), or, for a
    // workflow, after one interval (resume).
    global.next_cron_time = match engine::timeout_seconds(&global, policy) {
        // A workflow never times out: its timeout_to_fail must not postpone the first resume.
        _ if trans_type == TransType::Workflow => after_seconds(now, global.next_cron_interval),
        0 => after_seconds(now, global.next_cron_interval),
        timeout => after_seconds(now, timeout),
    };
    Ok(global)
}

/// What a gRPC transaction sends as metadata on every call (gid, workflow name as `dtm-op`,
/// `branch_headers`) must be sendable, or every call would fail forever.
fn check_grpc_metadata(req: &TransRequest, trans_type: TransType, custom_data: &str) -> Result<(), ApiError> {
    let name = match trans_type {
        TransType::Workflow => WorkflowCustom::parse(custom_data).unwrap_or_default().name,
        _ => String::new(),
    };
    let headers = req
        .branch_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref().unwrap_or_default()));
    grpc::check_metadata(
        [("dtm-gid", req.gid.as_str()), ("dtm-op", name.as_str())]
            .into_iter()
            .chain(headers),
    )
    .map_err(|reason| ApiError::BadRequest(format!("protocol grpc: {reason}")))
}

/// The gid and branch id of a branch called over gRPC, as metadata.
fn grpc_ids(gid: &str, branch_id: &str) -> Result<(), ApiError> {
    grpc::check_metadata([("dtm-gid", gid), ("dtm-branch_id", branch_id)])
        .map_err(|reason| ApiError::BadRequest(format!("gRPC branch: {reason}")))
}

/// The branch rows a saga or msg creates; none for the other modes.
async fn new_branches(
    coordinator: &Coordinator,
    req: &TransRequest,
    trans_type: TransType,
    now: Millis,
) -> Result<Vec<Branch>, ApiError> {
    let gid = req.gid()?;
    let steps = req.steps()?;
    match trans_type {
        TransType::Saga => {
            for step in &steps {
                check_url(coordinator.policy(), "action", &step.action)?;
                check_url(coordinator.policy(), "compensate", &step.compensate)?;
            }
            let specs: Vec<SagaStep<'_>> = steps
                .iter()
                .map(|s| SagaStep {
                    action: &s.action,
                    compensate: &s.compensate,
                    payload: &s.payload,
                })
                .collect();
            Ok(engine::saga_branches(gid, &specs, now))
        }
        TransType::Msg => {
            let mut subscribers = Vec::with_capacity(steps.len());
            for step in &steps {
                subscribers.push(match step.action.strip_prefix("topic://") {
                    Some(topic) => Some(topic_subscribers(coordinator, topic).await?),
                    None => {
                        check_url(coordinator.policy(), "action", &step.action)?;
                        None
                    }
                });
            }
            let targets: Vec<MsgTarget<'_>> = steps
                .iter()
                .zip(subscribers)
                .map(|(step, subs)| match subs {
                    Some(subscribers) => MsgTarget::Topic {
                        subscribers,
                        payload: &step.payload,
                    },
                    None => MsgTarget::Url {
                        url: &step.action,
                        payload: &step.payload,
                    },
                })
                .collect();
            Ok(engine::msg_branches(gid, &targets, now))
        }
        TransType::Tcc | TransType::Xa | TransType::Workflow => {
            if !steps.is_empty() {
                return Err(ApiError::BadRequest(format!("a {trans_type} takes no steps")));
            }
            Ok(Vec::new())
        }
    }
}

/// Subscriber URLs of a topic.
async fn topic_subscribers(coordinator: &Coordinator, topic: &str) -> Result<Vec<String>, ApiError> {
    let entry = coordinator
        .store()
        .kv_get(TOPICS, topic)
        .await?
        .ok_or_else(|| ApiError::BadRequest(format!("topic not found: {topic}")))?;
    let subscribers = super::admin::parse_subscribers(&entry.value)?;
    if subscribers.is_empty() {
        return Err(ApiError::BadRequest(format!("topic {topic} has no subscribers")));
    }
    Ok(subscribers.into_iter().map(|s| s.url).collect())
}
