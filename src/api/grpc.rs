//! DTM's gRPC API (`dtmgimp.Dtm`, port 36790 by default). Every RPC decodes its message into the
//! request the HTTP route takes and calls the same function, so both front doors share one
//! implementation of every rule (idempotency, `wait_result`, validation, bounds); only the
//! encoding and the status codes differ. Transactions created here record `protocol: grpc`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde_json::Value;
use tonic::{Code, Request, Response, Status};

use super::wire::TransRequest;
use super::{ApiError, ApiResult, AppState, JsonBody, admin, auth::Tokens, trans};
use crate::proto::dtmgimp::dtm_server::{Dtm, DtmServer};
use crate::proto::dtmgimp::{
    DtmBranchRequest, DtmGidReply, DtmProgress, DtmProgressesReply, DtmRequest, DtmTopicRequest, DtmTransaction,
};

/// DTM's status codes: FAILURE is `Aborted`, ONGOING is `FailedPrecondition` (what DTM's SDKs
/// read); the other errors get the nearest gRPC code.
impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::Failure(message) => Status::aborted(message),
            ApiError::Ongoing(message) => Status::failed_precondition(message),
            ApiError::BadRequest(message) => Status::invalid_argument(message),
            ApiError::NotFound(message) => Status::not_found(message),
            ApiError::PayloadTooLarge(message) => Status::resource_exhausted(message),
            ApiError::Unavailable(message) => Status::unavailable(message),
            ApiError::Internal(message) => Status::internal(message),
        }
    }
}

/// The `dtmgimp.Dtm` service.
#[derive(Clone)]
pub struct DtmService {
    state: AppState,
}

/// The service, behind the bearer-token check of the HTTP API (`authorization` metadata) and
/// the request size limit.
pub fn service(
    state: AppState,
    tokens: Tokens,
    max_message_bytes: usize,
) -> tonic::service::interceptor::InterceptedService<DtmServer<DtmService>, impl tonic::service::Interceptor + Clone> {
    let service = DtmService { state };
    let check = move |request: Request<()>| -> Result<Request<()>, Status> {
        if tokens.is_empty() || bearer(&request).is_some_and(|token| tokens.accepts(token)) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "a valid bearer token is required (authorization: Bearer <token>)",
            ))
        }
    };
    tonic::service::interceptor::InterceptedService::new(
        DtmServer::new(service).max_decoding_message_size(max_message_bytes),
        check,
    )
}

/// The client's W3C `traceparent` metadata, continued by the call's span and branch calls.
fn traceparent(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let value = metadata.get(crate::telemetry::TRACEPARENT)?;
    value.to_str().ok().map(str::to_owned)
}

fn bearer(request: &Request<()>) -> Option<&str> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The HTTP body a `DtmRequest` stands for: `Steps` is the JSON text of the steps array, the
/// payloads are bytes, the options come from `TransOptions`.
pub fn trans_request(message: DtmRequest) -> Result<TransRequest, ApiError> {
    let steps = match message.steps.trim() {
        "" => Vec::new(),
        text => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(steps)) => steps,
            Ok(Value::Null) => Vec::new(),
            Ok(_) => return Err(ApiError::BadRequest("Steps must be a JSON array".to_owned())),
            Err(error) => return Err(ApiError::BadRequest(format!("Steps is not valid JSON: {error}"))),
        },
    };
    let options = message.trans_options.unwrap_or_default();
    Ok(TransRequest {
        gid: message.gid,
        trans_type: message.trans_type,
        steps,
        query_prepared: message.query_prepared,
        protocol: "grpc".to_owned(),
        custom_data: match message.customed_data {
            text if text.is_empty() => Value::Null,
            text => Value::String(text),
        },
        rollback_reason: message.rollback_reason,
        wait_result: options.wait_result,
        timeout_to_fail: options.timeout_to_fail,
        retry_interval: options.retry_interval,
        request_timeout: options.request_timeout,
        branch_headers: options.branch_headers.into_iter().map(|(k, v)| (k, Some(v))).collect(),
        retry_limit: options.retry_limit,
        req_extra: message.req_extra.into_iter().map(|(k, v)| (k, Some(v))).collect(),
        bin_payloads: Some(message.bin_payloads),
        ..TransRequest::default()
    })
}

/// The registerBranch fields a `DtmBranchRequest` stands for: its `Data` map plus the named
/// fields (which win), and its payload.
pub fn branch_fields(message: DtmBranchRequest) -> (BTreeMap<String, String>, Vec<u8>) {
    let mut fields: BTreeMap<String, String> = message.data.into_iter().collect();
    for (key, value) in [
        ("gid", message.gid),
        ("trans_type", message.trans_type),
        ("branch_id", message.branch_id),
        ("op", message.op),
    ] {
        if !value.is_empty() {
            fields.insert(key.to_owned(), value);
        }
    }
    (fields, message.busi_payload)
}

/// The HTTP status of the API error a gRPC code stands for (the inverse of `From<ApiError>`).
fn http_code(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Aborted => 409,
        Code::FailedPrecondition => 425,
        Code::InvalidArgument => 400,
        Code::NotFound => 404,
        Code::ResourceExhausted => 413,
        Code::Unavailable => 503,
        Code::Unauthenticated => 401,
        _ => 500,
    }
}

/// An answer without a value.
fn empty(result: ApiResult) -> Result<Response<()>, Status> {
    result.map(|_| Response::new(())).map_err(Status::from)
}

impl DtmService {
    fn state(&self) -> State<AppState> {
        State(self.state.clone())
    }

    /// Runs an RPC and records it in the API metrics as `grpc_<rpc>`, with the HTTP status the
    /// same outcome gets from the HTTP routes (200, 409 for FAILURE, 425 for ONGOING, ...), so
    /// that one dashboard reads both front doors.
    async fn observed<T>(
        &self,
        rpc: &str,
        traceparent: Option<String>,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = crate::telemetry::traced(rpc, traceparent.as_deref(), call).await;
        let code = result.as_ref().map_or_else(|status| http_code(status.code()), |_| 200);
        self.state
            .coordinator
            .metrics()
            .record_request(format!("grpc_{rpc}"), code, started.elapsed());
        result
    }

    fn topic_params(message: DtmTopicRequest) -> Query<HashMap<String, String>> {
        Query(HashMap::from([
            ("topic".to_owned(), message.topic),
            ("url".to_owned(), message.url),
            ("remark".to_owned(), message.remark),
        ]))
    }
}

#[tonic::async_trait]
impl Dtm for DtmService {
    async fn new_gid(&self, request: Request<()>) -> Result<Response<DtmGidReply>, Status> {
        self.observed("newgid", traceparent(request.metadata()), async {
            let Json(answer) = admin::new_gid().await?;
            let gid = answer.get("gid").and_then(Value::as_str).unwrap_or_default().to_owned();
            Ok(Response::new(DtmGidReply { gid }))
        })
        .await
    }

    async fn submit(&self, request: Request<DtmRequest>) -> Result<Response<()>, Status> {
        self.observed("submit", traceparent(request.metadata()), async {
            let body = trans_request(request.into_inner())?;
            empty(trans::submit(self.state(), JsonBody(body)).await)
        })
        .await
    }

    async fn prepare(&self, request: Request<DtmRequest>) -> Result<Response<()>, Status> {
        self.observed("prepare", traceparent(request.metadata()), async {
            let body = trans_request(request.into_inner())?;
            empty(trans::prepare(self.state(), JsonBody(body)).await)
        })
        .await
    }

    async fn abort(&self, request: Request<DtmRequest>) -> Result<Response<()>, Status> {
        self.observed("abort", traceparent(request.metadata()), async {
            let body = trans_request(request.into_inner())?;
            empty(trans::abort(self.state(), JsonBody(body)).await)
        })
        .await
    }

    async fn register_branch(&self, request: Request<DtmBranchRequest>) -> Result<Response<()>, Status> {
        self.observed("registerbranch", traceparent(request.metadata()), async {
            let (fields, data) = branch_fields(request.into_inner());
            empty(trans::register(&self.state.coordinator, &fields, data).await)
        })
        .await
    }

    async fn prepare_workflow(&self, request: Request<DtmRequest>) -> Result<Response<DtmProgressesReply>, Status> {
        self.observed("prepareworkflow", traceparent(request.metadata()), async {
            let body = trans_request(request.into_inner())?;
            let (global, branches) = trans::workflow_progress(&self.state.coordinator, &body).await?;
            Ok(Response::new(DtmProgressesReply {
                transaction: Some(DtmTransaction {
                    gid: global.gid,
                    status: global.status.as_str().to_owned(),
                    rollback_reason: global.rollback_reason,
                    result: global.result,
                }),
                progresses: branches
                    .into_iter()
                    .map(|branch| DtmProgress {
                        status: branch.status.as_str().to_owned(),
                        bin_data: branch.bin_data,
                        branch_id: branch.branch_id,
                        op: branch.op,
                    })
                    .collect(),
            }))
        })
        .await
    }

    async fn subscribe(&self, request: Request<DtmTopicRequest>) -> Result<Response<()>, Status> {
        self.observed("subscribe", traceparent(request.metadata()), async {
            empty(admin::subscribe(self.state(), Self::topic_params(request.into_inner())).await)
        })
        .await
    }

    async fn unsubscribe(&self, request: Request<DtmTopicRequest>) -> Result<Response<()>, Status> {
        self.observed("unsubscribe", traceparent(request.metadata()), async {
            empty(admin::unsubscribe(self.state(), Self::topic_params(request.into_inner())).await)
        })
        .await
    }

    async fn delete_topic(&self, request: Request<DtmTopicRequest>) -> Result<Response<()>, Status> {
        self.observed("deletetopic", traceparent(request.metadata()), async {
            empty(admin::delete_topic(self.state(), Path(request.into_inner().topic)).await)
        })
        .await
    }
}
