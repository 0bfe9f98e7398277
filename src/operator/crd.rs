//! Custom resources: `Saga`, `Tcc` and `Msg` in `kubetx.io/v1alpha1`.
//!
//! The YAML under `crds/` is generated from these types (`kubetx crd`); a test fails when the
//! committed files drift. Validation lives in the schema and in CEL rules so that `kubectl apply`
//! rejects a bad manifest with a precise message; what CEL cannot express (a cycle in
//! `dependsOn`) the controller checks.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::limits::{
    DNS_LABEL_PATTERN, HEADER_NAME_PATTERN, MAX_CALL_TIMEOUT_SECONDS, MAX_DEPENDS_ON, MAX_GID_LEN, MAX_HEADER_NAME_LEN,
    MAX_HEADER_VALUE_LEN, MAX_HEADERS, MAX_NAME_LEN, MAX_OBJECT_NAME_LEN, MAX_PATH_LEN, MAX_RETRY_INTERVAL_SECONDS,
    MAX_RETRY_LIMIT, MAX_STEPS, MAX_TIMEOUT_SECONDS, MAX_URL_LEN,
};
use crate::limits::{GRPC_METHOD_PATTERN, MAX_GRPC_METHOD_LEN, MAX_PAYLOAD_BASE64_LEN};

/// Most status rows: three operations per Tcc branch.
const MAX_STATUS_ROWS: usize = 3 * MAX_STEPS;
/// Longest short text in the status (a time, a branch id, a state, a progress).
const MAX_SHORT_TEXT: usize = 64;
/// Longest message in the status (a condition's is 32 KiB in Kubernetes' own conditions).
const MAX_MESSAGE_LEN: usize = 4096;

/// API group of every kind.
pub const GROUP: &str = "kubetx.io";
/// API version of every kind.
pub const VERSION: &str = "v1alpha1";

/// Any JSON value, kept as it is by the API server.
fn any_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// Where a branch operation is called: a URL, or a Service in the cluster; over HTTP, or over
/// gRPC (a `grpc://` or `grpcs://` URL, or a Service with `grpcMethod`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.url) != has(self.service)").message("give exactly one of url or service"))]
pub struct Endpoint {
    /// Full http or https URL, or a gRPC target `grpc://host:port/package.Service/Method`
    /// (`grpcs://` for TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_URL_LEN))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('http://') || self.startsWith('https://') || self.startsWith('grpc://') || self.startsWith('grpcs://')").message("url must start with http://, https://, grpc:// or grpcs://"))]
    pub url: Option<String>,
    /// A Service, called at `http://<name>.<namespace>.svc:<port><path>`, or over gRPC with
    /// `grpcMethod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
}

/// A Kubernetes Service and the path (HTTP) or method (gRPC) to call on it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Service name (a DNS label).
    #[schemars(length(min = 1, max = MAX_NAME_LEN), pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// Namespace; the resource's own when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_LEN), pattern(DNS_LABEL_PATTERN))]
    pub namespace: Option<String>,
    /// Port; 80 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Kubernetes knows int32 and int64, and warns on every apply about any other format.
    #[schemars(range(min = 1, max = 65535), extend("format" = "int32"))]
    pub port: Option<u16>,
    /// Path, starting with `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_PATH_LEN), pattern("^/"))]
    pub path: Option<String>,
    /// gRPC method `package.Service/Method`: the Service is called over gRPC (plaintext HTTP/2)
    /// at `<name>.<namespace>.svc:<port>`, instead of over HTTP at `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = MAX_GRPC_METHOD_LEN), pattern(GRPC_METHOD_PATTERN))]
    pub grpc_method: Option<String>,
}

/// An HTTP header sent on every branch call, inline or from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.value) != has(self.valueFrom)").message("give exactly one of value or valueFrom"))]
pub struct Header {
    /// Header name (an RFC 9110 token).
    #[schemars(length(min = 1, max = MAX_HEADER_NAME_LEN), pattern(HEADER_NAME_PATTERN))]
    pub name: String,
    /// Inline value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_HEADER_VALUE_LEN))]
    pub value: Option<String>,
    /// Value read from a Secret in the resource's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<HeaderSource>,
}

impl Header {
    /// Where the value comes from, never the value: what a durable record of the transaction
    /// keeps, so that a database dump or `/query` cannot leak a Secret.
    pub fn source(&self) -> String {
        match &self.value_from {
            Some(HeaderSource { secret_key_ref: r }) => format!("(from secret {} key {})", r.name, r.key),
            None => "(inline in the resource spec)".to_owned(),
        }
    }
}

/// Where a header value comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderSource {
    /// A key of a Secret.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = MAX_OBJECT_NAME_LEN))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = MAX_OBJECT_NAME_LEN), pattern("^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Timeouts and retries shared by every kind. Durations in seconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransactionOptions {
    /// Give up after this long: a saga compensates, a Tcc cancels, a prepared Msg is back-checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub timeout_seconds: Option<i64>,
    /// Timeout of each branch call (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_CALL_TIMEOUT_SECONDS))]
    pub call_timeout_seconds: Option<i64>,
    /// First retry interval; doubled after every failed attempt (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_RETRY_INTERVAL_SECONDS))]
    pub retry_interval_seconds: Option<i64>,
    /// Cap of the retry interval (default: the controller's, 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_RETRY_INTERVAL_SECONDS))]
    pub max_retry_interval_seconds: Option<i64>,
    /// Saga: immediate retries of an action whose outcome is unknown before compensating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_RETRY_LIMIT))]
    pub retry_limit: Option<i64>,
}

/// One saga step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaStep {
    /// Unique name of the step.
    #[schemars(length(min = 1, max = MAX_NAME_LEN), pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// Forward operation.
    pub action: Endpoint,
    /// Undo operation, called in reverse order on rollback; none means nothing to undo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<Endpoint>,
    /// JSON body of both calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub payload: Option<Value>,
    /// The body as base64 bytes, sent verbatim instead of `payload`: the encoded request
    /// message of a gRPC method (or any binary body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PAYLOAD_BASE64_LEN), extend("format" = "byte"))]
    pub payload_base64: Option<String>,
    /// Steps that must succeed first. Any `dependsOn` makes the saga a DAG: steps without
    /// dependencies start at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_DEPENDS_ON), inner(length(min = 1, max = MAX_NAME_LEN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub depends_on: Vec<String>,
}

/// A saga: steps in order (or as a DAG with `dependsOn`), compensated in reverse on failure.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubetx.io",
    version = "v1alpha1",
    kind = "Saga",
    namespaced,
    status = "TransactionStatus",
    shortname = "sg",
    category = "kubetx",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Retries","type":"integer","jsonPath":".status.retries"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":0}"#,
    printcolumn = r#"{"name":"GID","type":"string","jsonPath":".status.gid","priority":1}"#,
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("spec is immutable once the saga exists: create a new Saga instead")
)]
#[serde(rename_all = "camelCase")]
pub struct SagaSpec {
    /// The steps.
    #[schemars(length(min = 1, max = MAX_STEPS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub steps: Vec<SagaStep>,
    /// Headers sent on every call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_HEADERS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub headers: Vec<Header>,
    /// Timeouts and retries.
    #[serde(default, skip_serializing_if = "is_default")]
    pub options: TransactionOptions,
    /// Delete the resource this long after it finished (default: the controller's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_TIMEOUT_SECONDS))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// One TCC branch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TccBranch {
    /// Unique name of the branch.
    #[schemars(length(min = 1, max = MAX_NAME_LEN), pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// Reserve resources.
    #[serde(rename = "try")]
    pub try_: Endpoint,
    /// Use the reservation; called on every branch once all tries succeeded.
    pub confirm: Endpoint,
    /// Release the reservation; called on every branch when a try failed or timed out.
    pub cancel: Endpoint,
    /// JSON body of all three calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub payload: Option<Value>,
    /// The body as base64 bytes, sent verbatim instead of `payload`: the encoded request
    /// message of a gRPC method (or any binary body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PAYLOAD_BASE64_LEN), extend("format" = "byte"))]
    pub payload_base64: Option<String>,
}

/// A TCC transaction: the controller calls try on every branch, then confirm on all or cancel
/// on all.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubetx.io",
    version = "v1alpha1",
    kind = "Tcc",
    namespaced,
    status = "TransactionStatus",
    shortname = "tcc",
    category = "kubetx",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Retries","type":"integer","jsonPath":".status.retries"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":0}"#,
    printcolumn = r#"{"name":"GID","type":"string","jsonPath":".status.gid","priority":1}"#,
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("spec is immutable once the transaction exists: create a new Tcc instead")
)]
#[serde(rename_all = "camelCase")]
pub struct TccSpec {
    /// The branches, tried in order; confirmed or cancelled last to first.
    #[schemars(length(min = 1, max = MAX_STEPS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub branches: Vec<TccBranch>,
    /// Headers sent on every call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_HEADERS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub headers: Vec<Header>,
    /// Timeouts and retries.
    #[serde(default, skip_serializing_if = "is_default")]
    pub options: TransactionOptions,
    /// Delete the resource this long after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_TIMEOUT_SECONDS))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// One message destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MsgStep {
    /// Unique name of the step.
    #[schemars(length(min = 1, max = MAX_NAME_LEN), pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// Endpoint that receives the message.
    pub action: Endpoint,
    /// JSON body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub payload: Option<Value>,
    /// The body as base64 bytes, sent verbatim instead of `payload`: the encoded request
    /// message of a gRPC method (or any binary body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PAYLOAD_BASE64_LEN), extend("format" = "byte"))]
    pub payload_base64: Option<String>,
}

/// A 2-phase message: once submitted, every step is delivered until it succeeds. Created with
/// `submitted: false` before a local transaction, it waits for the owner to set `submitted`; if
/// that never happens, the controller asks `queryPrepared` after the timeout.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubetx.io",
    version = "v1alpha1",
    kind = "Msg",
    namespaced,
    status = "TransactionStatus",
    shortname = "msg",
    category = "kubetx",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Retries","type":"integer","jsonPath":".status.retries"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":0}"#,
    printcolumn = r#"{"name":"GID","type":"string","jsonPath":".status.gid","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.submitted || has(self.queryPrepared)").message("a msg that is not submitted needs queryPrepared for the back-check"))]
#[x_kube(validation = kube::core::Rule::new("!oldSelf.submitted || self.submitted").message("a submitted msg cannot be un-submitted"))]
pub struct MsgSpec {
    /// Destinations, delivered in order (or all at once with `concurrent`).
    #[schemars(length(min = 1, max = MAX_STEPS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("steps are immutable"))]
    pub steps: Vec<MsgStep>,
    /// False while the owner's local transaction runs; set it to true to deliver.
    #[serde(default = "default_true")]
    pub submitted: bool,
    /// Back-check endpoint: SUCCESS delivers, FAILURE drops the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("queryPrepared is immutable"))]
    pub query_prepared: Option<Endpoint>,
    /// Deliver no earlier than this long after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_TIMEOUT_SECONDS))]
    pub delay_seconds: Option<i64>,
    /// Deliver to all steps at once.
    #[serde(default)]
    pub concurrent: bool,
    /// Headers sent on every call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_HEADERS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub headers: Vec<Header>,
    /// Timeouts and retries (`timeoutSeconds`: when an unsubmitted msg is back-checked).
    #[serde(default, skip_serializing_if = "is_default")]
    pub options: TransactionOptions,
    /// Delete the resource this long after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_TIMEOUT_SECONDS))]
    pub ttl_seconds_after_finished: Option<i64>,
}

fn default_true() -> bool {
    true
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Lifecycle phase shown by `kubectl get`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// A Msg waiting for `submitted` (or its back-check).
    Prepared,
    /// A Tcc calling try on its branches.
    Trying,
    /// Forward operations run (saga actions, tcc confirms, msg deliveries).
    Running,
    /// Undo operations run (saga compensations, tcc cancels).
    Compensating,
    /// Done: every forward operation succeeded.
    Succeeded,
    /// Done: rolled back, refused by the back-check, or rejected as invalid.
    Failed,
}

impl Phase {
    /// True for the final phases.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// State of one branch operation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BranchState {
    /// Step or branch name.
    #[schemars(length(max = MAX_NAME_LEN))]
    pub name: String,
    /// DTM branch id ("01", "02", ...), sent as `branch_id`.
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub branch_id: String,
    /// Operation: action, compensate, try, confirm, cancel.
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub op: String,
    /// prepared (not done or unknown), succeed, failed.
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub state: String,
    /// Calls made so far.
    #[serde(default)]
    #[schemars(extend("format" = "int64"))]
    pub attempts: u32,
    /// Last error, shortened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_MESSAGE_LEN))]
    pub last_error: Option<String>,
    /// When it finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub finished_at: Option<String>,
}

/// A condition, keyed by type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready` (finished successfully), `Progressing` or `Failed`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = MAX_SHORT_TEXT))]
    pub type_: String,
    /// "True", "False" or "Unknown".
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub status: String,
    /// PascalCase reason.
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    #[schemars(length(max = MAX_MESSAGE_LEN))]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub last_transition_time: String,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Status of every kind: the transaction's state, kept by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransactionStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Transaction id, sent to branches as `gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_GID_LEN))]
    pub gid: Option<String>,
    /// Forward operations done over their total, e.g. `1/2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub progress: Option<String>,
    /// Failed attempts so far, all branches together.
    #[serde(default)]
    #[schemars(extend("format" = "int64"))]
    pub retries: u32,
    /// One entry per branch operation, in call order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_STATUS_ROWS))]
    pub branches: Vec<BranchState>,
    /// Conditions, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Next retry (RFC 3339), while unfinished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub next_retry_time: Option<String>,
    /// Current retry interval in seconds (grows with backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_RETRY_INTERVAL_SECONDS))]
    pub retry_interval_seconds: Option<i64>,
    /// When processing started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub start_time: Option<String>,
    /// When it finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub finish_time: Option<String>,
    /// The last `kubetx.io/retry-now` annotation value served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_TEXT))]
    pub retry_request: Option<String>,
    /// Why it failed, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_MESSAGE_LEN))]
    pub message: Option<String>,
}

/// Every CRD, in a stable order.
pub fn all_crds() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![Saga::crd(), Tcc::crd(), Msg::crd()]
}

/// Each CRD as `(file name, YAML)`, the layout of the committed `crds/` directory.
pub fn crd_files() -> Result<Vec<(String, String)>, yaml_serde::Error> {
    all_crds()
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            Ok((name, yaml_serde::to_string(&crd)?))
        })
        .collect()
}

/// The CRDs as one multi-document YAML stream (what `kubetx crd` prints).
pub fn crds_yaml() -> Result<String, yaml_serde::Error> {
    let mut out = String::new();
    for (_, yaml) in crd_files()? {
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    Ok(out)
}
