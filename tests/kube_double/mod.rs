//! An in-process double of the Kubernetes API server, for tests that drive the real `kube`
//! client and runtime (`Controller`, `watcher`, `finalizer`, `events::Recorder`,
//! `Api::patch_status` with server-side apply) without a cluster.
//!
//! It speaks the real HTTP API on `127.0.0.1:<random port>`: the same URLs, query parameters,
//! patch content types, watch streams (newline-delimited `WatchEvent`s) and `Status` errors that
//! an apiserver sends, backed by an in-memory store with one global resourceVersion counter and
//! an in-memory event history from which watches are replayed.
//!
//! ```ignore
//! mod kube_double;
//! use kube_double::{KubeDouble, ResourceKind};
//!
//! let widgets = ResourceKind::new("example.io", "v1", "Widget", "widgets");
//! let double = KubeDouble::start(&[widgets.clone()]).await;
//! let client = double.client(); // a real kube::Client, default namespace "default"
//! let api: kube::Api<kube::core::DynamicObject> =
//!     kube::Api::namespaced_with(client, "default", &widgets.api_resource());
//! // ... drive the operator ...
//! assert!(double.count_writes(|w| w.plural == "widgets") <= 4);
//! ```
//!
//! Test binaries include this file with `mod kube_double;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use json_patch::PatchOperation;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Resource kinds
// ---------------------------------------------------------------------------------------------

/// A validation hook run on every create and update (including status writes) of a kind. The
/// arguments are the object as it would be stored and, for updates, the stored object; an
/// `Err(message)` becomes a 422 `Invalid` `Status`, the way a CRD's OpenAPI schema or CEL rule
/// (transition rules included) rejects a write.
pub type Validator = Arc<dyn Fn(&Value, Option<&Value>) -> Result<(), String> + Send + Sync>;

/// One kind the double serves.
#[derive(Clone)]
pub struct ResourceKind {
    /// API group; `""` for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    /// Whether the kind has a `/status` subresource: then main-resource writes never change
    /// `.status`, and `/status` writes change nothing but `.status`.
    pub status_subresource: bool,
    /// Custom resources (everything made with [`ResourceKind::new`]) get `metadata.generation`,
    /// return the deleted object from DELETE and refuse strategic-merge patches; the built-in
    /// kinds (secrets, events, leases) behave like their apiserver counterparts instead.
    custom: bool,
    validator: Option<Validator>,
    /// The CRD's `openAPIV3Schema`: writes are pruned, defaulted and validated against it
    /// (types, required, enum, bounds, and `x-kubernetes-validations` CEL rules).
    schema: Option<Arc<Value>>,
}

impl std::fmt::Debug for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceKind")
            .field("group", &self.group)
            .field("version", &self.version)
            .field("kind", &self.kind)
            .field("plural", &self.plural)
            .field("namespaced", &self.namespaced)
            .field("status_subresource", &self.status_subresource)
            .field("custom", &self.custom)
            .field("validator", &self.validator.is_some())
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

impl ResourceKind {
    /// A namespaced custom resource with a `/status` subresource (what `#[kube(status = ..)]`
    /// generates). Use the builder methods to change that.
    pub fn new(group: &str, version: &str, kind: &str, plural: &str) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            kind: kind.to_owned(),
            plural: plural.to_owned(),
            namespaced: true,
            status_subresource: true,
            custom: true,
            validator: None,
            schema: None,
        }
    }

    /// The kind of a `kube::CustomResource` (or any `kube::Resource` with `DynamicType = ()`).
    pub fn of<K>() -> Self
    where
        K: kube::Resource<DynamicType = ()>,
        K::Scope: 'static,
    {
        let mut kind = Self::new(&K::group(&()), &K::version(&()), &K::kind(&()), &K::plural(&()));
        kind.namespaced =
            std::any::TypeId::of::<K::Scope>() == std::any::TypeId::of::<k8s_openapi::NamespaceResourceScope>();
        kind
    }

    pub fn cluster_scoped(mut self) -> Self {
        self.namespaced = false;
        self
    }

    pub fn without_status_subresource(mut self) -> Self {
        self.status_subresource = false;
        self
    }

    /// Adds a validation hook on the new object (see [`Validator`]).
    pub fn with_validator(mut self, validator: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static) -> Self {
        self.validator = Some(Arc::new(move |new, _old| validator(new)));
        self
    }

    /// Adds a validation hook that also sees the stored object on updates (`None` on create).
    pub fn with_update_validator(
        mut self,
        validator: impl Fn(&Value, Option<&Value>) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validator = Some(Arc::new(validator));
        self
    }

    /// Validates, prunes and defaults writes with this `openAPIV3Schema`, as the apiserver does
    /// for a CRD (see [`ResourceKind::from_crd`]). Panics, as [`ResourceKind::from_crd`] does,
    /// when a real apiserver would refuse the schema for its CEL rules' cost.
    pub fn with_schema(mut self, schema: Value) -> Self {
        let mut errors = Vec::new();
        rule_cost_errors(&schema, "openAPIV3Schema", true, &mut errors);
        assert!(errors.is_empty(), "kube double: invalid schema: {}", errors.join("; "));
        self.schema = Some(Arc::new(schema));
        self
    }

    /// Everything the double needs from a CRD: group, kind, plural, scope, the status
    /// subresource and the schema of the storage version (or the first one).
    ///
    /// Panics when a real apiserver would refuse the CRD: a CEL rule over a list, string or map
    /// without maxItems, maxLength or maxProperties (see [`crd_errors`]).
    pub fn from_crd(
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> Self {
        let errors = crd_errors(&serde_json::to_value(crd).expect("CRD json"));
        assert!(
            errors.is_empty(),
            "kube double: CustomResourceDefinition.apiextensions.k8s.io {:?} is invalid: {}",
            crd.metadata.name.as_deref().unwrap_or_default(),
            errors.join("; ")
        );
        let spec = &crd.spec;
        let version = spec
            .versions
            .iter()
            .find(|v| v.storage)
            .or_else(|| spec.versions.first())
            .expect("CRD has a version");
        let mut kind = Self::new(&spec.group, &version.name, &spec.names.kind, &spec.names.plural);
        kind.namespaced = spec.scope == "Namespaced";
        kind.status_subresource = version.subresources.as_ref().is_some_and(|s| s.status.is_some());
        kind.schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .map(|s| Arc::new(serde_json::to_value(s).expect("schema json")));
        kind
    }

    /// [`ResourceKind::from_crd`] for a `#[derive(CustomResource)]` type.
    pub fn of_crd<K: kube::CustomResourceExt>() -> Self {
        Self::from_crd(&K::crd())
    }

    fn builtin(group: &str, version: &str, kind: &str, plural: &str) -> Self {
        Self {
            status_subresource: false,
            custom: false,
            ..Self::new(group, version, kind, plural)
        }
    }

    /// core/v1 Secret (always served).
    pub fn secrets() -> Self {
        Self::builtin("", "v1", "Secret", "secrets")
    }

    /// events.k8s.io/v1 Event (always served; what `kube::runtime::events::Recorder` writes).
    pub fn events() -> Self {
        Self::builtin("events.k8s.io", "v1", "Event", "events")
    }

    /// coordination.k8s.io/v1 Lease (always served).
    pub fn leases() -> Self {
        Self::builtin("coordination.k8s.io", "v1", "Lease", "leases")
    }

    /// apiextensions.k8s.io/v1 CustomResourceDefinition, served when passed to
    /// [`KubeDouble::start`]: a CRD is refused as a real apiserver refuses it for its CEL rules'
    /// cost (see [`crd_errors`]). Creating one does not serve its kind.
    pub fn crds() -> Self {
        Self::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
        )
        .cluster_scoped()
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group` (`widgets.example.io`), or the plural alone for the core group: the
    /// resource name that apiserver messages use, and the key the helpers accept.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// For `Api::<DynamicObject>::namespaced_with(client, ns, &kind.api_resource())`.
    pub fn api_resource(&self) -> kube::core::ApiResource {
        kube::core::ApiResource {
            group: self.group.clone(),
            version: self.version.clone(),
            api_version: self.api_version(),
            kind: self.kind.clone(),
            plural: self.plural.clone(),
        }
    }

    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request log and faults
// ---------------------------------------------------------------------------------------------

/// The API verb of a request, as the apiserver's audit log would name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Verb {
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Verb::Create | Verb::Update | Verb::Patch | Verb::Delete | Verb::DeleteCollection
        )
    }
}

/// The patch flavour of a PATCH request, from its Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PatchType {
    /// `application/merge-patch+json` (RFC 7386)
    Merge,
    /// `application/json-patch+json` (RFC 6902)
    Json,
    /// `application/apply-patch+yaml` (server-side apply)
    Apply,
    /// `application/strategic-merge-patch+json`
    Strategic,
}

impl PatchType {
    fn from_content_type(ct: &str) -> Option<Self> {
        let ct = ct.split(';').next().unwrap_or("").trim();
        match ct {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            _ => None,
        }
    }
}

/// One request the double answered (every request that named a served resource is logged,
/// reads included; see [`KubeDouble::writes`] for the mutating ones).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub verb: Verb,
    /// API group of the resource (`""` for core).
    pub group: String,
    /// Resource plural, e.g. `widgets`.
    pub plural: String,
    /// `Some("status")` for requests to the status subresource.
    pub subresource: Option<String>,
    /// `None` for cluster-scoped kinds and all-namespace lists/watches.
    pub namespace: Option<String>,
    /// The object's name; `""` for collection requests (list, watch, deletecollection). For a
    /// create, the name in the body (or the generated one).
    pub name: String,
    pub patch_type: Option<PatchType>,
    pub field_manager: Option<String>,
    /// The HTTP status code answered (200/201 for success, 4xx/5xx for failures, including
    /// injected faults).
    pub code: u16,
}

impl RequestRecord {
    /// `plural.group`, or the plural for the core group.
    pub fn resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// True if this request names the resource `plural` (either `widgets` or
    /// `widgets.example.io`).
    pub fn is_for(&self, plural: &str) -> bool {
        self.plural == plural || self.resource() == plural
    }

    pub fn is_status(&self) -> bool {
        self.subresource.as_deref() == Some("status")
    }

    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

type Matcher = Arc<dyn Fn(&RequestRecord) -> bool + Send + Sync>;

/// An injected failure: the next `times` requests matching the predicate are answered with a
/// `Status` of the given code instead of being served (or, with [`Fault::after_apply`], are
/// served and *then* answered with the error, as when a reply is lost).
#[derive(Clone)]
pub struct Fault {
    matcher: Matcher,
    times: usize,
    code: u16,
    after_apply: bool,
}

impl Fault {
    /// Fails the next request matching `matcher` with a 500 InternalError.
    pub fn new(matcher: impl Fn(&RequestRecord) -> bool + Send + Sync + 'static) -> Self {
        Self {
            matcher: Arc::new(matcher),
            times: 1,
            code: 500,
            after_apply: false,
        }
    }

    /// Any mutating request to `plural` (`widgets` or `widgets.example.io`).
    pub fn writes_to(plural: &str) -> Self {
        let plural = plural.to_owned();
        Self::new(move |r| r.verb.is_write() && r.is_for(&plural))
    }

    pub fn times(mut self, times: usize) -> Self {
        self.times = times;
        self
    }

    /// The HTTP code to answer. Note that `kube::Client` by default retries 429, 503 and 504
    /// itself (up to 15 times), so a fault with one of those codes and `times` below that is
    /// invisible to the caller except in the request log.
    pub fn code(mut self, code: u16) -> Self {
        self.code = code;
        self
    }

    /// Apply the write, then answer the error anyway.
    pub fn after_apply(mut self) -> Self {
        self.after_apply = true;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A failure, rendered on the wire as a `meta.k8s.io/v1 Status`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    details: Option<Value>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.to_owned(),
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, kind: &ResourceKind, name: &str, kind_field: &str) -> Self {
        self.details = Some(json!({"name": name, "group": kind.group, "kind": kind_field}));
        self
    }

    fn not_found(kind: &ResourceKind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", kind.group_resource(), name),
        )
        .with_details(kind, name, &kind.plural)
    }

    fn already_exists(kind: &ResourceKind, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{}\" already exists", kind.group_resource(), name),
        )
        .with_details(kind, name, &kind.plural)
    }

    fn conflict(kind: &ResourceKind, name: &str) -> Self {
        Self::conflict_because(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    fn conflict_because(kind: &ResourceKind, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": {}",
                kind.group_resource(),
                name,
                why
            ),
        )
        .with_details(kind, name, &kind.plural)
    }

    fn invalid(kind: &ResourceKind, name: &str, why: &str) -> Self {
        let mut err = Self::new(
            422,
            "Invalid",
            format!("{} \"{}\" is invalid: {}", kind.qualified_kind(), name, why),
        );
        err.details = Some(json!({
            "name": name, "group": kind.group, "kind": kind.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": why}],
        }));
        err
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    fn resource_not_found() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource")
    }

    fn from_code(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Self::new(code, reason, format!("injected fault: {reason} (kube double)"))
    }

    /// The `Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

// ---------------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Clone, Debug)]
struct HistEvent {
    rv: u64,
    ty: EventType,
    object: Value,
    prev: Option<Value>,
}

type ObjKey = (String, String);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AppliedKey {
    resource: String,
    namespace: String,
    name: String,
    manager: String,
    status: bool,
}

#[derive(Clone, Copy, Default)]
struct WriteOpts {
    dry_run: bool,
    /// Test helpers write as an all-powerful user: no status-subresource restrictions.
    privileged: bool,
}

struct Store {
    kinds: Vec<ResourceKind>,
    rv: u64,
    uid_seed: u64,
    uid_counter: u64,
    objects: HashMap<String, BTreeMap<ObjKey, Value>>,
    history: HashMap<String, Vec<HistEvent>>,
    compacted: HashMap<String, u64>,
    applied: HashMap<AppliedKey, Value>,
    validators: HashMap<String, Validator>,
    requests: Vec<RequestRecord>,
    faults: Vec<Fault>,
    changes: watch::Sender<u64>,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let map = obj.as_object_mut().expect("object");
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut().expect("metadata object")
}

fn finalizers(obj: &Value) -> Vec<Value> {
    obj.get("metadata")
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn set_field(obj: &mut Value, field: &str, value: Option<&Value>) {
    if let Some(map) = obj.as_object_mut() {
        match value {
            Some(v) => {
                map.insert(field.to_owned(), v.clone());
            }
            None => {
                map.remove(field);
            }
        }
    }
}

/// Metadata fields only the server sets: copied from the stored object over whatever a write
/// sent.
const SERVER_META: [&str; 9] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

fn restore_server_meta(new: &mut Value, old: &Value) {
    let old_meta = old.get("metadata").and_then(Value::as_object).cloned();
    let meta = meta_mut(new);
    for field in SERVER_META {
        match old_meta.as_ref().and_then(|m| m.get(field)) {
            Some(v) => {
                meta.insert(field.to_owned(), v.clone());
            }
            None => {
                meta.remove(field);
            }
        }
    }
}

fn normalize_meta(meta: &mut Map<String, Value>) {
    meta.retain(|_, v| !v.is_null());
    for field in ["labels", "annotations"] {
        if meta.get(field).and_then(Value::as_object).is_some_and(Map::is_empty) {
            meta.remove(field);
        }
    }
    for field in ["finalizers", "ownerReferences", "managedFields"] {
        if meta.get(field).and_then(Value::as_array).is_some_and(Vec::is_empty) {
            meta.remove(field);
        }
    }
}

/// What `metadata.generation` tracks: everything but metadata (and status, where it is a
/// subresource).
fn spec_view(kind: &ResourceKind, obj: &Value) -> Value {
    let mut view = obj.clone();
    if let Some(map) = view.as_object_mut() {
        map.remove("metadata");
        if kind.status_subresource {
            map.remove("status");
        }
    }
    view
}

fn check_type_meta(kind: &ResourceKind, body: &Value, required: bool) -> Result<(), ApiError> {
    let api_version = body.get("apiVersion").and_then(Value::as_str);
    let body_kind = body.get("kind").and_then(Value::as_str);
    if required && (api_version.is_none() || body_kind.is_none()) {
        return Err(ApiError::bad_request(format!(
            "invalid object type: {}, Kind={}",
            api_version.unwrap_or("/"),
            body_kind.unwrap_or("")
        )));
    }
    if let Some(v) = api_version
        && v != kind.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({v}) does not match the expected API version ({})",
            kind.api_version()
        )));
    }
    if let Some(k) = body_kind
        && k != kind.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            kind.kind
        )));
    }
    Ok(())
}

impl Store {
    fn kind(&self, resource: &str) -> ResourceKind {
        let exact: Vec<_> = self.kinds.iter().filter(|k| k.group_resource() == resource).collect();
        if let [k] = exact.as_slice() {
            return (*k).clone();
        }
        let by_plural: Vec<_> = self.kinds.iter().filter(|k| k.plural == resource).collect();
        match by_plural.as_slice() {
            [k] => (*k).clone(),
            [] => panic!("kube double: no kind with plural {resource:?} is served"),
            _ => panic!(
                "kube double: plural {resource:?} is ambiguous; use plural.group (e.g. {:?})",
                by_plural[0].group_resource()
            ),
        }
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn ns_key(kind: &ResourceKind, ns: &str) -> String {
        if kind.namespaced { ns.to_owned() } else { String::new() }
    }

    fn get(&self, kind: &ResourceKind, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&kind.group_resource())?
            .get(&(Self::ns_key(kind, ns), name.to_owned()))
    }

    fn list(&self, kind: &ResourceKind, filter: &Filter) -> Vec<Value> {
        self.objects
            .get(&kind.group_resource())
            .map(|objs| objs.values().filter(|o| filter.matches(o)).cloned().collect())
            .unwrap_or_default()
    }

    fn new_uid(&mut self) -> String {
        self.uid_counter += 1;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (self.uid_seed >> 32) as u32,
            (self.uid_seed >> 16) as u16,
            (self.uid_seed & 0xfff) as u16,
            (self.uid_counter >> 48) & 0xfff,
            self.uid_counter & 0xffff_ffff_ffff
        )
    }

    /// Admission: the schema's pruning, defaulting and validation (if the kind has a schema),
    /// then the kind's validation hook.
    fn admit(&self, kind: &ResourceKind, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").unwrap_or("").to_owned();
        if kind.group_resource() == ResourceKind::crds().group_resource() {
            match crd_errors(obj).as_slice() {
                [] => {}
                [one] => return Err(ApiError::invalid(kind, &name, one)),
                many => return Err(ApiError::invalid(kind, &name, &format!("[{}]", many.join(", ")))),
            }
        }
        if let Some(schema) = &kind.schema {
            schema_prune(schema, obj, true);
            *obj = kube::core::cel::apply_defaults(schema, obj);
            let mut errors = Vec::new();
            schema_check(schema, obj, "", true, &mut errors);
            if errors.is_empty()
                && let Err(cel) = kube::core::cel::Validator::new().validate(schema, obj, old)
            {
                errors.extend(cel.as_slice().iter().map(|e| {
                    if e.field_path.is_empty() {
                        format!("<nil>: Invalid value: \"object\": {}", e.message)
                    } else {
                        format!("{}: Invalid value: \"object\": {}", e.field_path, e.message)
                    }
                }));
            }
            match errors.as_slice() {
                [] => {}
                [one] => return Err(ApiError::invalid(kind, &name, one)),
                many => return Err(ApiError::invalid(kind, &name, &format!("[{}]", many.join(", ")))),
            }
        }
        if let Some(validator) = self.validators.get(&kind.group_resource()) {
            validator(obj, old).map_err(|why| ApiError::invalid(kind, &name, &why))?;
        }
        Ok(())
    }

    fn push_event(&mut self, kind: &ResourceKind, ev: HistEvent) {
        self.history.entry(kind.group_resource()).or_default().push(ev);
        self.notify();
    }

    /// Stores `obj` (created when `old` is None, updated otherwise), doing the server's share of
    /// the metadata, and records the watch event. Returns the object as stored.
    fn commit(
        &mut self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        old: Option<&Value>,
        mut obj: Value,
        opts: WriteOpts,
    ) -> Value {
        if let Some(map) = obj.as_object_mut() {
            map.insert("apiVersion".into(), kind.api_version().into());
            map.insert("kind".into(), kind.kind.clone().into());
        }
        let old_gen = old
            .and_then(|o| o.get("metadata"))
            .and_then(|m| m.get("generation"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let newly_deleting = old.is_some_and(|o| meta_str(o, "deletionTimestamp").is_none())
            && meta_str(&obj, "deletionTimestamp").is_some();
        let spec_changed = old.is_some_and(|o| spec_view(kind, o) != spec_view(kind, &obj));
        {
            let meta = meta_mut(&mut obj);
            meta.insert("name".into(), name.into());
            if kind.namespaced {
                meta.insert("namespace".into(), ns.into());
            } else {
                meta.remove("namespace");
            }
            normalize_meta(meta);
            if kind.custom {
                let generation = if old.is_none() {
                    1
                } else if spec_changed || (newly_deleting && old_gen > 0) {
                    old_gen + 1
                } else {
                    old_gen
                };
                meta.insert("generation".into(), generation.into());
            } else {
                meta.remove("generation");
            }
            if let Some(old) = old
                && let Some(rv) = meta_str(old, "resourceVersion")
            {
                meta.insert("resourceVersion".into(), rv.into());
            }
        }
        if let Some(old) = old
            && *old == obj
        {
            // A no-op write: the apiserver neither bumps resourceVersion nor emits an event.
            return obj;
        }
        if opts.dry_run {
            return obj;
        }
        let deleting = meta_str(&obj, "deletionTimestamp").is_some() && finalizers(&obj).is_empty();
        if deleting {
            return self.remove(kind, ns, name, obj, opts);
        }
        self.rv += 1;
        let rv = self.rv;
        meta_mut(&mut obj).insert("resourceVersion".into(), rv.to_string().into());
        self.objects
            .entry(kind.group_resource())
            .or_default()
            .insert((Self::ns_key(kind, ns), name.to_owned()), obj.clone());
        let ty = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.push_event(
            kind,
            HistEvent {
                rv,
                ty,
                object: obj.clone(),
                prev: old.cloned(),
            },
        );
        obj
    }

    fn remove(&mut self, kind: &ResourceKind, ns: &str, name: &str, mut obj: Value, opts: WriteOpts) -> Value {
        if opts.dry_run {
            return obj;
        }
        self.rv += 1;
        let rv = self.rv;
        meta_mut(&mut obj).insert("resourceVersion".into(), rv.to_string().into());
        let ns_key = Self::ns_key(kind, ns);
        let prev = self
            .objects
            .entry(kind.group_resource())
            .or_default()
            .remove(&(ns_key.clone(), name.to_owned()));
        let resource = kind.group_resource();
        self.applied
            .retain(|k, _| !(k.resource == resource && k.namespace == ns_key && k.name == name));
        self.push_event(
            kind,
            HistEvent {
                rv,
                ty: EventType::Deleted,
                object: obj.clone(),
                prev,
            },
        );
        obj
    }

    fn create(&mut self, kind: &ResourceKind, ns: &str, mut body: Value, opts: WriteOpts) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the body of the request must be a JSON object"));
        }
        check_type_meta(kind, &body, false)?;
        let (name, has_rv) = {
            let meta = meta_mut(&mut body);
            if kind.namespaced
                && let Some(body_ns) = meta.get("namespace").and_then(Value::as_str)
                && !body_ns.is_empty()
                && body_ns != ns
            {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            let name = meta
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .map(str::to_owned);
            let generate = meta
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .map(str::to_owned);
            let has_rv = meta
                .get("resourceVersion")
                .and_then(Value::as_str)
                .is_some_and(|rv| !rv.is_empty());
            (name.ok_or(generate), has_rv)
        };
        let name = match name {
            Ok(name) => name,
            Err(Some(prefix)) => {
                self.uid_counter += 1;
                let mut n = self.uid_counter.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.uid_seed;
                let mut suffix = String::new();
                for _ in 0..5 {
                    suffix.push(b"bcdfghjklmnpqrstvwxz2456789"[(n % 27) as usize] as char);
                    n /= 27;
                }
                format!("{prefix}{suffix}")
            }
            Err(None) => {
                return Err(ApiError::invalid(
                    kind,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        };
        if has_rv {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        if self.get(kind, ns, &name).is_some() {
            return Err(ApiError::already_exists(kind, &name));
        }
        let uid = self.new_uid();
        {
            let meta = meta_mut(&mut body);
            for field in SERVER_META {
                meta.remove(field);
            }
            meta.remove("managedFields");
            meta.insert("name".into(), name.clone().into());
            meta.insert("uid".into(), uid.into());
            meta.insert("creationTimestamp".into(), now_rfc3339().into());
        }
        if kind.status_subresource
            && !opts.privileged
            && let Some(map) = body.as_object_mut()
        {
            map.remove("status");
        }
        self.admit(kind, &mut body, None)?;
        Ok(self.commit(kind, ns, &name, None, body, opts))
    }

    /// Shared tail of PUT and PATCH: the preconditions and subresource rules, then validation
    /// and commit. `candidate` is the full object the write asked for.
    #[allow(clippy::too_many_arguments)]
    fn finish_update(
        &mut self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        old: &Value,
        mut candidate: Value,
        status_sub: bool,
        opts: WriteOpts,
    ) -> Result<Value, ApiError> {
        if let Some(rv) = meta_str(&candidate, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(old, "resourceVersion")
        {
            return Err(ApiError::conflict(kind, name));
        }
        if let Some(uid) = meta_str(&candidate, "uid")
            && !uid.is_empty()
            && Some(uid) != meta_str(old, "uid")
        {
            return Err(ApiError::conflict_because(
                kind,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(old, "uid").unwrap_or("")
                ),
            ));
        }
        let mut new = if status_sub {
            let mut new = old.clone();
            set_field(&mut new, "status", candidate.get("status"));
            new
        } else {
            restore_server_meta(&mut candidate, old);
            if kind.status_subresource && !opts.privileged {
                set_field(&mut candidate, "status", old.get("status"));
            }
            candidate
        };
        if meta_str(old, "deletionTimestamp").is_some() {
            let before = finalizers(old);
            if finalizers(&new).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    kind,
                    name,
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                ));
            }
        }
        self.admit(kind, &mut new, Some(old))?;
        Ok(self.commit(kind, ns, name, Some(old), new, opts))
    }

    fn replace(
        &mut self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        body: Value,
        status_sub: bool,
        opts: WriteOpts,
    ) -> Result<Value, ApiError> {
        let old = self
            .get(kind, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        if !body.is_object() {
            return Err(ApiError::bad_request("the body of the request must be a JSON object"));
        }
        check_type_meta(kind, &body, false)?;
        if let Some(body_name) = meta_str(&body, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        self.finish_update(kind, ns, name, &old, body, status_sub, opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn patch(
        &mut self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        patch_type: PatchType,
        body: &[u8],
        status_sub: bool,
        field_manager: Option<&str>,
        opts: WriteOpts,
    ) -> Result<(u16, Value), ApiError> {
        let old = self.get(kind, ns, name).cloned();
        match patch_type {
            PatchType::Apply => {
                let applied = parse_apply_body(body)?;
                check_type_meta(kind, &applied, true)?;
                let manager = field_manager
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| ApiError::bad_request("fieldManager is required for apply requests"))?;
                if let Some(applied_name) = meta_str(&applied, "name")
                    && applied_name != name
                {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({applied_name}) does not match the name on the URL ({name})"
                    )));
                }
                let key = AppliedKey {
                    resource: kind.group_resource(),
                    namespace: Self::ns_key(kind, ns),
                    name: name.to_owned(),
                    manager: manager.to_owned(),
                    status: status_sub,
                };
                let Some(old) = old else {
                    if status_sub {
                        return Err(ApiError::not_found(kind, name));
                    }
                    let mut obj = json!({});
                    ssa_apply(&mut obj, &applied, None);
                    meta_mut(&mut obj).insert("name".into(), name.into());
                    let created = self.create(kind, ns, obj, opts)?;
                    if !opts.dry_run {
                        self.applied.insert(key, applied);
                    }
                    return Ok((201, created));
                };
                let prev = self.applied.get(&key).cloned();
                let mut candidate = old.clone();
                let remember = if status_sub {
                    let applied_status = applied.get("status").cloned().unwrap_or(json!({}));
                    let had_status = old.get("status").is_some();
                    let mut live = old.get("status").cloned().unwrap_or(json!({}));
                    ssa_apply(&mut live, &applied_status, prev.as_ref());
                    if had_status || applied.get("status").is_some() {
                        set_field(&mut candidate, "status", Some(&live));
                    }
                    applied_status
                } else {
                    ssa_apply(&mut candidate, &applied, prev.as_ref());
                    applied.clone()
                };
                // An apply may carry a resourceVersion precondition.
                let rv = meta_str(&applied, "resourceVersion").map(str::to_owned);
                if let Some(rv) = rv {
                    meta_mut(&mut candidate).insert("resourceVersion".into(), rv.into());
                }
                let stored = self.finish_update(kind, ns, name, &old, candidate, status_sub, opts)?;
                if !opts.dry_run {
                    self.applied.insert(key, remember);
                }
                Ok((200, stored))
            }
            PatchType::Merge | PatchType::Strategic => {
                if patch_type == PatchType::Strategic && kind.custom {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                let old = old.ok_or_else(|| ApiError::not_found(kind, name))?;
                let patch: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                if !patch.is_object() {
                    return Err(ApiError::bad_request(
                        "error decoding patch: a merge patch must be a JSON object",
                    ));
                }
                let mut candidate = old.clone();
                json_patch::merge(&mut candidate, &patch);
                // A resourceVersion in the patch body is a precondition (checked against the
                // stored object in finish_update); without one the patch is unconditional.
                if meta_str(&patch, "resourceVersion").is_none() {
                    restore_rv(&mut candidate, &old);
                }
                let stored = self.finish_update(kind, ns, name, &old, candidate, status_sub, opts)?;
                Ok((200, stored))
            }
            PatchType::Json => {
                let old = old.ok_or_else(|| ApiError::not_found(kind, name))?;
                let ops: json_patch::Patch = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                let mut candidate = old.clone();
                apply_json_patch(&mut candidate, &ops).map_err(|why| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the server rejected our request due to an error in our request: {why}"),
                    )
                })?;
                let stored = self.finish_update(kind, ns, name, &old, candidate, status_sub, opts)?;
                Ok((200, stored))
            }
        }
    }

    fn delete(
        &mut self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        options: &Value,
        opts: WriteOpts,
    ) -> Result<(u16, Value), ApiError> {
        let old = self
            .get(kind, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        if let Some(pre) = options.get("preconditions") {
            if let Some(uid) = pre.get("uid").and_then(Value::as_str)
                && Some(uid) != meta_str(&old, "uid")
            {
                return Err(ApiError::conflict_because(
                    kind,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&old, "uid").unwrap_or("")
                    ),
                ));
            }
            if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
                && Some(rv) != meta_str(&old, "resourceVersion")
            {
                return Err(ApiError::conflict_because(
                    kind,
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        meta_str(&old, "resourceVersion").unwrap_or("")
                    ),
                ));
            }
        }
        if !finalizers(&old).is_empty() {
            if meta_str(&old, "deletionTimestamp").is_some() {
                return Ok((200, old));
            }
            let mut marked = old.clone();
            let meta = meta_mut(&mut marked);
            meta.insert("deletionTimestamp".into(), now_rfc3339().into());
            meta.insert("deletionGracePeriodSeconds".into(), 0.into());
            let stored = self.commit(kind, ns, name, Some(&old), marked, opts);
            return Ok((200, stored));
        }
        let gone = self.remove(kind, ns, name, old, opts);
        if kind.custom {
            Ok((200, gone))
        } else {
            Ok((
                200,
                json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {
                        "name": name, "group": kind.group, "kind": kind.plural,
                        "uid": meta_str(&gone, "uid"),
                    },
                }),
            ))
        }
    }
}

fn restore_rv(candidate: &mut Value, old: &Value) {
    let rv = meta_str(old, "resourceVersion").map(str::to_owned);
    let meta = meta_mut(candidate);
    match rv {
        Some(rv) => {
            meta.insert("resourceVersion".into(), rv.into());
        }
        None => {
            meta.remove("resourceVersion");
        }
    }
}

fn parse_apply_body(body: &[u8]) -> Result<Value, ApiError> {
    let value = match serde_json::from_slice::<Value>(body) {
        Ok(v) => v,
        Err(_) => yaml_serde::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
    };
    if !value.is_object() {
        return Err(ApiError::bad_request("apply patch must be an object"));
    }
    Ok(value)
}

/// RFC 6902 with the apiserver's (evanphx/json-patch) `test` semantics: testing a missing path
/// against `null` succeeds.
fn apply_json_patch(doc: &mut Value, ops: &json_patch::Patch) -> Result<(), String> {
    for op in &ops.0 {
        match op {
            PatchOperation::Test(test) => {
                let path = test.path.as_str();
                match doc.pointer(path) {
                    None if test.value.is_null() => {}
                    Some(v) if *v == test.value => {}
                    Some(v) => {
                        return Err(format!(
                            "testing value {path} failed: expected {}, found {v}",
                            test.value
                        ));
                    }
                    None => return Err(format!("testing value {path} failed: path not found")),
                }
            }
            other => json_patch::patch(doc, std::slice::from_ref(other)).map_err(|e| e.to_string())?,
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server-side apply (approximation)
// ---------------------------------------------------------------------------------------------

/// Metadata fields a field manager can own.
const APPLY_META: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

/// Approximates server-side apply for one field manager: the fields this manager applied last
/// time but left out now are removed; then the applied configuration is merged in (maps merged
/// key by key, lists replaced whole, except `metadata.finalizers` which is a set). Ownership by
/// other managers and apply conflicts are not modelled (every apply behaves as `force=true`).
fn ssa_apply(live: &mut Value, applied: &Value, prev: Option<&Value>) {
    if let Some(prev) = prev {
        ssa_remove_stale(live, prev, applied, &mut Vec::new());
    }
    ssa_merge(live, applied, &mut Vec::new());
}

fn ssa_remove_stale(live: &mut Value, prev: &Value, new: &Value, path: &mut Vec<String>) {
    let (Some(prev_map), Some(live_map)) = (prev.as_object(), live.as_object_mut()) else {
        return;
    };
    let in_meta = path.len() == 1 && path[0] == "metadata";
    for (key, prev_value) in prev_map {
        if path.is_empty() && (key == "apiVersion" || key == "kind") {
            continue;
        }
        if in_meta && !APPLY_META.contains(&key.as_str()) {
            continue;
        }
        let new_value = new.as_object().and_then(|m| m.get(key));
        if in_meta && key == "finalizers" {
            let keep = new_value.and_then(Value::as_array).cloned().unwrap_or_default();
            let stale: Vec<Value> = prev_value
                .as_array()
                .map(|a| a.iter().filter(|v| !keep.contains(v)).cloned().collect())
                .unwrap_or_default();
            if let Some(Value::Array(live_list)) = live_map.get_mut(key) {
                live_list.retain(|v| !stale.contains(v));
            }
            continue;
        }
        match new_value {
            None => {
                live_map.remove(key);
            }
            Some(new_value) if prev_value.is_object() && new_value.is_object() => {
                if let Some(live_value) = live_map.get_mut(key) {
                    path.push(key.clone());
                    ssa_remove_stale(live_value, prev_value, new_value, path);
                    path.pop();
                }
            }
            Some(_) => {}
        }
    }
}

fn ssa_merge(live: &mut Value, applied: &Value, path: &mut Vec<String>) {
    let Some(applied_map) = applied.as_object() else {
        *live = applied.clone();
        return;
    };
    if !live.is_object() {
        *live = json!({});
    }
    let live_map = live.as_object_mut().expect("object");
    let in_meta = path.len() == 1 && path[0] == "metadata";
    for (key, value) in applied_map {
        if in_meta && !APPLY_META.contains(&key.as_str()) {
            continue;
        }
        if in_meta && key == "finalizers" {
            let entry = live_map.entry(key.clone()).or_insert_with(|| json!([]));
            if let (Some(list), Some(add)) = (entry.as_array_mut(), value.as_array()) {
                for f in add {
                    if !list.contains(f) {
                        list.push(f.clone());
                    }
                }
            }
            continue;
        }
        if value.is_object() {
            let entry = live_map.entry(key.clone()).or_insert_with(|| json!({}));
            path.push(key.clone());
            ssa_merge(entry, value, path);
            path.pop();
        } else {
            live_map.insert(key.clone(), value.clone());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Structural schema (CRD openAPIV3Schema): pruning and validation
// ---------------------------------------------------------------------------------------------

fn schema_flag(schema: &Value, flag: &str) -> bool {
    schema.get(flag).and_then(Value::as_bool) == Some(true)
}

/// Drops fields the schema does not know (unless `x-kubernetes-preserve-unknown-fields`) and
/// `null`s of non-nullable fields, as the apiserver does before defaulting.
fn schema_prune(schema: &Value, value: &mut Value, root: bool) {
    let preserve = schema_flag(schema, "x-kubernetes-preserve-unknown-fields");
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let additional_schema = additional.filter(|a| a.is_object());
            let any_additional = additional == Some(&Value::Bool(true));
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match props.and_then(|p| p.get(&key)).or(additional_schema) {
                    Some(sub) => {
                        let field = map.get_mut(&key).expect("key present");
                        if field.is_null() && !schema_flag(sub, "nullable") {
                            map.remove(&key);
                        } else {
                            schema_prune(sub, field, false);
                        }
                    }
                    None if preserve || any_additional => {}
                    None => {
                        map.remove(&key);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    schema_prune(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The OpenAPI checks the apiserver applies to custom resources: type, required, enum,
/// minimum/maximum, minLength/maxLength, pattern, minItems/maxItems, and the uniqueness of
/// `x-kubernetes-list-type` `map` keys and `set` items (no `format`).
fn schema_check(schema: &Value, value: &Value, path: &str, root: bool, errors: &mut Vec<String>) {
    let shown = if path.is_empty() { "<nil>" } else { path };
    let int_or_string = schema_flag(schema, "x-kubernetes-int-or-string");
    if value.is_null() {
        if !schema_flag(schema, "nullable") && schema.get("type").is_some() {
            errors.push(format!(
                "{shown}: Invalid value: \"null\": {shown} in body must be of type {}: \"null\"",
                schema["type"].as_str().unwrap_or("object")
            ));
        }
        return;
    }
    let actual = json_type_name(value);
    if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let ok = match expected {
            "number" => value.is_number(),
            "integer" => actual == "integer" || (int_or_string && actual == "string"),
            "string" => actual == "string" || (int_or_string && actual == "integer"),
            other => other == actual,
        };
        if !ok {
            errors.push(format!(
                "{shown}: Invalid value: \"{actual}\": {shown} in body must be of type {expected}: \"{actual}\""
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(format!(
            "{shown}: Unsupported value: {value}: supported values: {}",
            list.join(", ")
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            let exclusive = schema_flag(schema, "exclusiveMinimum");
            if n < min || (exclusive && n == min) {
                errors.push(format!(
                    "{shown}: Invalid value: {value}: {shown} in body should be greater than {}{min}",
                    if exclusive { "" } else { "or equal to " }
                ));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            let exclusive = schema_flag(schema, "exclusiveMaximum");
            if n > max || (exclusive && n == max) {
                errors.push(format!(
                    "{shown}: Invalid value: {value}: {shown} in body should be less than {}{max}",
                    if exclusive { "" } else { "or equal to " }
                ));
            }
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            errors.push(format!(
                "{shown}: Invalid value: {value}: {shown} in body should be at least {min} chars long"
            ));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            errors.push(format!("{shown}: Too long: may not be more than {max} bytes"));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            match pattern_matches(pattern, s) {
                Ok(true) => {}
                Ok(false) => errors.push(format!(
                    "{shown}: Invalid value: {value}: {shown} in body should match '{pattern}'"
                )),
                Err(why) => errors.push(format!("{shown}: Invalid value: {value}: {why}")),
            }
        }
    }
    match value {
        Value::Array(items) => {
            let len = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && len < min
            {
                errors.push(format!(
                    "{shown}: Invalid value: {len}: {shown} in body should have at least {min} items"
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && len > max
            {
                errors.push(format!("{shown}: Too many: {len}: must have at most {max} items"));
            }
            check_list_type(schema, items, path, errors);
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    schema_check(item_schema, item, &format!("{path}[{i}]"), false, errors);
                }
            }
        }
        Value::Object(map) => {
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errors.push(format!("{}: Required value", child_path(path, r)));
                    }
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, field) in map {
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(key)).or(additional) {
                    schema_check(sub, field, &child_path(path, key), false, errors);
                }
            }
        }
        _ => {}
    }
}

/// `pattern` (an RE2-style regular expression in Kubernetes; the `regex` crate's syntax is
/// close enough), compiled once.
fn pattern_matches(pattern: &str, text: &str) -> Result<bool, String> {
    static COMPILED: std::sync::LazyLock<Mutex<HashMap<String, regex::Regex>>> =
        std::sync::LazyLock::new(Default::default);
    let mut compiled = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    if !compiled.contains_key(pattern) {
        let re = regex::Regex::new(pattern).map_err(|e| format!("pattern {pattern:?} does not compile: {e}"))?;
        compiled.insert(pattern.to_owned(), re);
    }
    Ok(compiled[pattern].is_match(text))
}

/// `x-kubernetes-list-type`: `map` items are unique by their `x-kubernetes-list-map-keys`, `set`
/// items are unique.
fn check_list_type(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<String>) {
    let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let identity = |item: &Value| -> Option<String> {
        match schema["x-kubernetes-list-type"].as_str() {
            Some("map") => {
                let tuple: Map<String, Value> = keys
                    .iter()
                    .filter_map(|k| item.get(*k).map(|v| ((*k).to_owned(), v.clone())))
                    .collect();
                Some(Value::Object(tuple).to_string())
            }
            Some("set") => Some(item.to_string()),
            _ => None,
        }
    };
    let mut seen = std::collections::HashSet::new();
    for (i, item) in items.iter().enumerate() {
        if let Some(id) = identity(item)
            && !seen.insert(id.clone())
        {
            errors.push(format!("{path}[{i}]: Duplicate value: {id}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRD registration: the CEL cost budget
// ---------------------------------------------------------------------------------------------

/// A typeless `x-kubernetes-preserve-unknown-fields` node (a payload): the apiserver declares no
/// CEL type for it, so no rule can read it and its size costs nothing.
fn invisible_to_cel(schema: &Value) -> bool {
    schema_flag(schema, "x-kubernetes-preserve-unknown-fields") && schema.get("type").is_none()
}

/// The child schemas of a node, with their path in the apiserver's notation
/// (`properties[spec].items`); `metadata`, `apiVersion` and `kind` at the root are the server's.
fn schema_children(schema: &Value, root: bool) -> Vec<(String, &Value)> {
    let mut out: Vec<(String, &Value)> = schema["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| !(root && matches!(key.as_str(), "metadata" | "apiVersion" | "kind")))
        .map(|(key, sub)| (format!(".properties[{key}]"), sub))
        .collect();
    out.extend(schema.get("items").map(|items| (".items".to_owned(), items)));
    out.extend(
        schema
            .get("additionalProperties")
            .filter(|a| a.is_object())
            .map(|a| (".additionalProperties".to_owned(), a)),
    );
    out
}

/// The lists without maxItems, strings without maxLength (or enum) and maps without
/// maxProperties of a subtree that CEL can see.
fn unbounded_fields(schema: &Value, path: &str, root: bool, found: &mut Vec<String>) {
    if invisible_to_cel(schema) {
        return;
    }
    let unbounded = match schema["type"].as_str() {
        Some("array") => schema.get("maxItems").is_none(),
        Some("string") => schema.get("maxLength").is_none() && schema.get("enum").is_none(),
        _ => schema["additionalProperties"].is_object() && schema.get("maxProperties").is_none(),
    };
    if unbounded {
        found.push(if path.is_empty() {
            "self".to_owned()
        } else {
            path[1..].to_owned()
        });
    }
    for (suffix, child) in schema_children(schema, root) {
        unbounded_fields(child, &format!("{path}{suffix}"), false, found);
    }
}

/// The apiserver's refusals of CEL rules whose cost it cannot bound: a rule over an unbounded
/// list, string or map (one the rule may walk: the double does not estimate which it does).
fn rule_cost_errors(schema: &Value, path: &str, root: bool, errors: &mut Vec<String>) {
    if invisible_to_cel(schema) {
        return;
    }
    let rules = schema["x-kubernetes-validations"].as_array().map_or(0, Vec::len);
    if rules > 0 {
        let mut unbounded = Vec::new();
        unbounded_fields(schema, "", root, &mut unbounded);
        if !unbounded.is_empty() {
            errors.extend((0..rules).map(|i| {
                format!(
                    "{path}.x-kubernetes-validations[{i}].rule: Forbidden: estimated rule cost exceeds budget: \
                     {} unbounded (try simplifying the rule, or adding maxItems, maxProperties, and maxLength \
                     where arrays, maps, and strings are declared)",
                    unbounded.join(", ")
                )
            }));
        }
    }
    for (suffix, child) in schema_children(schema, root) {
        rule_cost_errors(child, &format!("{path}{suffix}"), false, errors);
    }
}

/// Why a real apiserver would refuse this CustomResourceDefinition (as JSON): the CEL rules of
/// every version's schema must have a bounded cost.
pub fn crd_errors(crd: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, version) in crd["spec"]["versions"].as_array().into_iter().flatten().enumerate() {
        if let Some(schema) = version["schema"].get("openAPIV3Schema") {
            let path = format!("spec.versions[{i}].schema.openAPIV3Schema");
            rule_cost_errors(schema, &path, true, &mut errors);
        }
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<Req>,
    fields: Vec<Req>,
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_selector(s: &str) -> Result<Vec<Req>, String> {
    let mut reqs = Vec::new();
    for term in split_top_level(s) {
        let set_op = [" notin ", " in "]
            .iter()
            .find_map(|op| term.find(op).map(|i| (op.trim(), i, op.len())));
        if let Some((op, i, len)) = set_op {
            let key = term[..i].trim().to_owned();
            let values = term[i + len..]
                .trim()
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| format!("invalid selector term {term:?}"))?
                .split(',')
                .map(|v| v.trim().to_owned())
                .collect();
            reqs.push(if op == "in" {
                Req::In(key, values)
            } else {
                Req::NotIn(key, values)
            });
        } else if let Some((k, v)) = term.split_once("!=") {
            reqs.push(Req::NotEq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = term.split_once("==") {
            reqs.push(Req::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = term.split_once('=') {
            reqs.push(Req::Eq(k.trim().into(), v.trim().into()));
        } else if let Some(k) = term.strip_prefix('!') {
            reqs.push(Req::NotExists(k.trim().into()));
        } else {
            reqs.push(Req::Exists(term));
        }
    }
    Ok(reqs)
}

fn req_matches(req: &Req, lookup: &dyn Fn(&str) -> Option<String>) -> bool {
    match req {
        Req::Eq(k, v) => lookup(k).as_deref() == Some(v.as_str()),
        Req::NotEq(k, v) => lookup(k).as_deref() != Some(v.as_str()),
        Req::In(k, vs) => lookup(k).is_some_and(|x| vs.contains(&x)),
        Req::NotIn(k, vs) => !lookup(k).is_some_and(|x| vs.contains(&x)),
        Req::Exists(k) => lookup(k).is_some(),
        Req::NotExists(k) => lookup(k).is_none(),
    }
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && meta_str(obj, "namespace") != Some(ns.as_str())
        {
            return false;
        }
        let labels = obj.get("metadata").and_then(|m| m.get("labels"));
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str).map(str::to_owned);
        let field = |k: &str| {
            let mut cur = obj;
            for part in k.split('.') {
                cur = cur.get(part)?;
            }
            match cur {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        };
        self.labels.iter().all(|r| req_matches(r, &label)) && self.fields.iter().all(|r| req_matches(r, &field))
    }

    /// The watch event type a watcher with this filter sees for `ev`, if any: an object that
    /// starts (stops) matching is ADDED (DELETED) for it, as with the apiserver's watch cache.
    fn view(&self, ev: &HistEvent) -> Option<&'static str> {
        let now = self.matches(&ev.object);
        match ev.ty {
            EventType::Added => now.then_some("ADDED"),
            EventType::Deleted => now.then_some("DELETED"),
            EventType::Modified => {
                let before = ev.prev.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

struct Inner {
    kinds: Vec<ResourceKind>,
    store: Mutex<Store>,
    cancel: Mutex<CancellationToken>,
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Target {
    kind: ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Json(Value),
    Resource(Target),
    NotFound,
}

fn resource_list(kinds: &[ResourceKind], group: &str, version: &str) -> Option<Value> {
    let served: Vec<Value> = kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .flat_map(|k| {
            let mut entries = vec![json!({
                "name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            })];
            if k.status_subresource {
                entries.push(json!({
                    "name": format!("{}/status", k.plural), "singularName": "",
                    "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"],
                }));
            }
            entries
        })
        .collect();
    if served.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": served}))
}

fn route(kinds: &[ResourceKind], path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["version"] => {
            return Route::Json(json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-double",
                "platform": "linux/amd64",
            }));
        }
        ["api"] => {
            return Route::Json(json!({"kind": "APIVersions", "versions": ["v1"]}));
        }
        ["apis"] => {
            let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for k in kinds.iter().filter(|k| !k.group.is_empty()) {
                let versions = groups.entry(&k.group).or_default();
                if !versions.contains(&k.version.as_str()) {
                    versions.push(&k.version);
                }
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            return Route::Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
        }
        ["api", "v1"] => {
            return resource_list(kinds, "", "v1").map_or(Route::NotFound, Route::Json);
        }
        ["apis", g, v] => {
            return resource_list(kinds, g, v).map_or(Route::NotFound, Route::Json);
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Route::NotFound,
    };
    let (namespace, plural, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] => (Some((*ns).to_owned()), *plural, tail),
        [plural, tail @ ..] => (None, *plural, tail),
        [] => return Route::NotFound,
    };
    if tail.len() > 2 {
        return Route::NotFound;
    }
    let Some(kind) = kinds
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
    else {
        return Route::NotFound;
    };
    let name = tail.first().map(|s| (*s).to_owned());
    if (namespace.is_some() && !kind.namespaced) || (kind.namespaced && namespace.is_none() && name.is_some()) {
        return Route::NotFound;
    }
    Route::Resource(Target {
        kind: kind.clone(),
        namespace,
        name,
        subresource: tail.get(1).map(|s| (*s).to_owned()),
    })
}

fn json_response(code: u16, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(serde_json::to_vec(body).expect("json")));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(err: &ApiError) -> Response {
    json_response(err.code, &err.to_status())
}

async fn handle(State(inner): State<Arc<Inner>>, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let query: HashMap<String, String> = Query::try_from_uri(&parts.uri).map(|Query(q)| q).unwrap_or_default();
    let body = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    match route(&inner.kinds, parts.uri.path()) {
        Route::Json(v) => json_response(200, &v),
        Route::NotFound => error_response(&ApiError::resource_not_found()),
        Route::Resource(target) => handle_resource(&inner, &parts.method, &parts.headers, &query, target, &body),
    }
}

fn handle_resource(
    inner: &Arc<Inner>,
    method: &Method,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    target: Target,
    body: &Bytes,
) -> Response {
    let Target {
        kind,
        namespace,
        name,
        subresource,
    } = target;
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (method, name.is_some()) {
        (&Method::GET, false) if is_watch => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (&Method::GET, true) => Verb::Get,
        (&Method::POST, false) => Verb::Create,
        (&Method::PUT, true) => Verb::Update,
        (&Method::PATCH, true) => Verb::Patch,
        (&Method::DELETE, true) => Verb::Delete,
        (&Method::DELETE, false) => Verb::DeleteCollection,
        _ => {
            return error_response(&ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ));
        }
    };
    if let Some(sub) = &subresource
        && !(sub == "status" && kind.status_subresource && matches!(verb, Verb::Get | Verb::Update | Verb::Patch))
    {
        return error_response(&ApiError::resource_not_found());
    }
    let patch_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(PatchType::from_content_type);
    if verb == Verb::Patch && patch_type.is_none() {
        return error_response(&ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        ));
    }
    let parsed_body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).unwrap_or(Value::Null)
    };
    let record_name = match (&name, verb) {
        (Some(n), _) => n.clone(),
        (None, Verb::Create) => meta_str(&parsed_body, "name").unwrap_or("").to_owned(),
        _ => String::new(),
    };
    let mut record = RequestRecord {
        verb,
        group: kind.group.clone(),
        plural: kind.plural.clone(),
        subresource: subresource.clone(),
        namespace: namespace.clone(),
        name: record_name,
        patch_type: if verb == Verb::Patch { patch_type } else { None },
        field_manager: query.get("fieldManager").cloned(),
        code: 0,
    };
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All")
        || parsed_body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v == "All"));
    let opts = WriteOpts {
        dry_run,
        privileged: false,
    };
    let ns = namespace.clone().unwrap_or_default();
    let status_sub = subresource.is_some();

    let mut store = inner.store();
    let fault = {
        let mut found = None;
        for fault in store.faults.iter_mut() {
            if fault.times > 0 && (fault.matcher)(&record) {
                fault.times -= 1;
                found = Some((fault.code, fault.after_apply));
                break;
            }
        }
        store.faults.retain(|f| f.times > 0);
        found
    };
    if let Some((code, false)) = fault {
        record.code = code;
        store.requests.push(record);
        store.notify();
        return error_response(&ApiError::from_code(code));
    }

    if verb == Verb::Watch {
        let filter = match build_filter(namespace.clone(), query) {
            Ok(f) => f,
            Err(e) => {
                record.code = 400;
                store.requests.push(record);
                return error_response(&ApiError::bad_request(e));
            }
        };
        record.code = 200;
        store.requests.push(record);
        store.notify();
        let cancel = inner.cancel.lock().unwrap_or_else(|e| e.into_inner()).clone();
        return start_watch(inner, &mut store, &kind, filter, query, cancel);
    }

    let result: Result<(u16, Value), ApiError> = match verb {
        Verb::Get => store
            .get(&kind, &ns, name.as_deref().unwrap_or(""))
            .cloned()
            .map(|o| (200, o))
            .ok_or_else(|| ApiError::not_found(&kind, name.as_deref().unwrap_or(""))),
        Verb::List => build_filter(namespace.clone(), query)
            .map_err(ApiError::bad_request)
            .map(|filter| {
                let items = store.list(&kind, &filter);
                (
                    200,
                    json!({
                        "kind": format!("{}List", kind.kind),
                        "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": store.rv.to_string()},
                        "items": items,
                    }),
                )
            }),
        Verb::Create => store.create(&kind, &ns, parsed_body.clone(), opts).map(|o| (201, o)),
        Verb::Update => store
            .replace(
                &kind,
                &ns,
                name.as_deref().unwrap_or(""),
                parsed_body.clone(),
                status_sub,
                opts,
            )
            .map(|o| (200, o)),
        Verb::Patch => store.patch(
            &kind,
            &ns,
            name.as_deref().unwrap_or(""),
            patch_type.expect("checked above"),
            body,
            status_sub,
            query.get("fieldManager").map(String::as_str),
            opts,
        ),
        Verb::Delete => store.delete(&kind, &ns, name.as_deref().unwrap_or(""), &parsed_body, opts),
        Verb::DeleteCollection => build_filter(namespace.clone(), query)
            .map_err(ApiError::bad_request)
            .and_then(|filter| {
                let victims = store.list(&kind, &filter);
                let mut items = Vec::new();
                for v in victims {
                    let v_ns = meta_str(&v, "namespace").unwrap_or("").to_owned();
                    let v_name = meta_str(&v, "name").unwrap_or("").to_owned();
                    let (_, obj) = store.delete(&kind, &v_ns, &v_name, &parsed_body, opts)?;
                    items.push(obj);
                }
                Ok((
                    200,
                    json!({
                        "kind": format!("{}List", kind.kind),
                        "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": store.rv.to_string()},
                        "items": items,
                    }),
                ))
            }),
        Verb::Watch => unreachable!("handled above"),
    };
    let response = match (result, fault) {
        (Ok(_), Some((code, true))) => Err(ApiError::from_code(code)),
        (result, _) => result,
    };
    let (code, resp) = match response {
        Ok((code, body)) => (code, json_response(code, &body)),
        Err(err) => (err.code, error_response(&err)),
    };
    record.code = code;
    store.requests.push(record);
    store.notify();
    resp
}

fn build_filter(namespace: Option<String>, query: &HashMap<String, String>) -> Result<Filter, String> {
    Ok(Filter {
        namespace,
        labels: query
            .get("labelSelector")
            .map(|s| parse_selector(s))
            .transpose()?
            .unwrap_or_default(),
        fields: query
            .get("fieldSelector")
            .map(|s| parse_selector(s))
            .transpose()?
            .unwrap_or_default(),
    })
}

fn watch_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": object})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(kind: &ResourceKind, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": meta})
}

fn start_watch(
    inner: &Arc<Inner>,
    store: &mut Store,
    kind: &ResourceKind,
    filter: Filter,
    query: &HashMap<String, String>,
    cancel: CancellationToken,
) -> Response {
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let resource = kind.group_resource();
    let compacted = store.compacted.get(&resource).copied().unwrap_or(0);

    let mut initial = Vec::new();
    let mut expired = None;
    let start = if send_initial || rv_param.is_empty() || rv_param == "0" {
        for obj in store.list(kind, &filter) {
            initial.push(watch_line("ADDED", &obj));
        }
        if send_initial {
            initial.push(watch_line("BOOKMARK", &bookmark(kind, store.rv, true)));
        }
        store.rv
    } else {
        match rv_param.parse::<u64>() {
            Ok(rv) if rv < compacted => {
                expired = Some(rv);
                rv
            }
            Ok(rv) => rv,
            Err(_) => {
                return error_response(&ApiError::bad_request(format!("invalid resource version: {rv_param}")));
            }
        }
    };
    let mut changes = store.changes.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let inner = Arc::clone(inner);
    let kind = kind.clone();
    tokio::spawn(async move {
        if let Some(rv) = expired {
            let status =
                ApiError::new(410, "Expired", format!("too old resource version: {rv} ({compacted})")).to_status();
            let _ = tx.send(Ok(watch_line("ERROR", &status))).await;
            return;
        }
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut cursor = start;
        loop {
            changes.borrow_and_update();
            let (lines, gone) = {
                let store = inner.store();
                let compacted = store.compacted.get(&resource).copied().unwrap_or(0);
                if cursor < compacted {
                    (Vec::new(), true)
                } else {
                    let lines: Vec<Bytes> = store
                        .history
                        .get(&resource)
                        .map(|h| {
                            h.iter()
                                .filter(|e| e.rv > cursor)
                                .filter_map(|e| filter.view(e).map(|ty| watch_line(ty, &e.object)))
                                .collect()
                        })
                        .unwrap_or_default();
                    cursor = cursor.max(store.rv);
                    (lines, false)
                }
            };
            if gone {
                let status = ApiError::new(410, "Expired", format!("too old resource version: {cursor}")).to_status();
                let _ = tx.send(Ok(watch_line("ERROR", &status))).await;
                return;
            }
            for line in lines {
                if tx.send(Ok(line)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let _ = tx.send(Ok(watch_line("BOOKMARK", &bookmark(&kind, cursor, false)))).await;
                    }
                    return;
                }
                () = tx.closed() => return,
                () = cancel.cancelled() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

async fn serve(listener: TcpListener, app: Router, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        () = cancel.cancelled() => {}
                    }
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The double
// ---------------------------------------------------------------------------------------------

/// The running double. Dropping it stops the server.
pub struct KubeDouble {
    inner: Arc<Inner>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        self.inner.cancel.lock().unwrap_or_else(|e| e.into_inner()).cancel();
    }
}

impl KubeDouble {
    /// Starts serving `resources` plus the built-ins (core/v1 secrets, events.k8s.io/v1 events,
    /// coordination.k8s.io/v1 leases) on 127.0.0.1 with a random port.
    pub async fn start(resources: &[ResourceKind]) -> KubeDouble {
        let mut kinds = vec![ResourceKind::secrets(), ResourceKind::events(), ResourceKind::leases()];
        for r in resources {
            kinds.retain(|k| k.group_resource() != r.group_resource());
            kinds.push(r.clone());
        }
        let validators = kinds
            .iter()
            .filter_map(|k| k.validator.clone().map(|v| (k.group_resource(), v)))
            .collect();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("kube double: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (changes, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            kinds: kinds.clone(),
            store: Mutex::new(Store {
                kinds,
                rv: 0,
                uid_seed: seed,
                uid_counter: 0,
                objects: HashMap::new(),
                history: HashMap::new(),
                compacted: HashMap::new(),
                applied: HashMap::new(),
                validators,
                requests: Vec::new(),
                faults: Vec::new(),
                changes,
            }),
            cancel: Mutex::new(CancellationToken::new()),
        });
        let double = KubeDouble {
            inner,
            addr,
            server: Mutex::new(None),
        };
        double.spawn_server(listener);
        double
    }

    fn spawn_server(&self, listener: TcpListener) {
        let token = CancellationToken::new();
        *self.inner.cancel.lock().unwrap_or_else(|e| e.into_inner()) = token.clone();
        let app = Router::new().fallback(handle).with_state(Arc::clone(&self.inner));
        let handle = tokio::spawn(serve(listener, app, token));
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A real `kube::Client` for the double, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        self.client_in("default")
    }

    /// A real `kube::Client` for the double with the given default namespace.
    pub fn client_in(&self, namespace: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("double url"));
        config.default_namespace = namespace.to_owned();
        kube::Client::try_from(config).expect("kube client for the double")
    }

    /// Stops serving: open connections (watches included) are cut and new ones are refused
    /// until [`KubeDouble::restart`]. The stored objects are kept.
    pub async fn stop(&self) {
        self.inner.cancel.lock().unwrap_or_else(|e| e.into_inner()).cancel();
        let handle = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }

    /// Serves again on the same address, with the same objects and history.
    pub async fn restart(&self) {
        self.stop().await;
        let mut last_err = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.spawn_server(listener);
                    return;
                }
                Err(e) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("kube double: cannot rebind {}: {last_err:?}", self.addr);
    }

    pub fn is_running(&self) -> bool {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.inner.store()
    }

    /// The kind served under `resource` (`widgets` or `widgets.example.io`). Panics if none.
    pub fn kind(&self, resource: &str) -> ResourceKind {
        self.store().kind(resource)
    }

    // --- request log -----------------------------------------------------------------------

    /// Every request that named a served resource, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.store().requests.clone()
    }

    /// The mutating requests (create, update, patch, delete, deletecollection), whether they
    /// succeeded or not. Writes made through the test helpers below are not included.
    pub fn writes(&self) -> Vec<RequestRecord> {
        self.store()
            .requests
            .iter()
            .filter(|r| r.verb.is_write())
            .cloned()
            .collect()
    }

    pub fn count_writes(&self, pred: impl Fn(&RequestRecord) -> bool) -> usize {
        self.store()
            .requests
            .iter()
            .filter(|r| r.verb.is_write() && pred(r))
            .count()
    }

    pub fn count_requests(&self, pred: impl Fn(&RequestRecord) -> bool) -> usize {
        self.store().requests.iter().filter(|r| pred(r)).count()
    }

    pub fn clear_requests(&self) {
        self.store().requests.clear();
    }

    // --- faults ----------------------------------------------------------------------------

    pub fn inject(&self, fault: Fault) {
        self.store().faults.push(fault);
    }

    /// The next `n` writes to `resource` answer 500 InternalError without being applied.
    pub fn fail_next_writes(&self, resource: &str, n: usize) {
        self.inject(Fault::writes_to(resource).times(n));
    }

    /// Faults not yet used up.
    pub fn pending_faults(&self) -> usize {
        self.store().faults.iter().map(|f| f.times).sum()
    }

    pub fn clear_faults(&self) {
        self.store().faults.clear();
    }

    /// Replaces the validation hook of a kind (see [`Validator`]).
    pub fn set_validator(
        &self,
        resource: &str,
        validator: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
    ) {
        let mut store = self.store();
        let key = store.kind(resource).group_resource();
        store.validators.insert(key, Arc::new(move |new, _old| validator(new)));
    }

    /// Replaces the validation hook of a kind with one that also sees the stored object.
    pub fn set_update_validator(
        &self,
        resource: &str,
        validator: impl Fn(&Value, Option<&Value>) -> Result<(), String> + Send + Sync + 'static,
    ) {
        let mut store = self.store();
        let key = store.kind(resource).group_resource();
        store.validators.insert(key, Arc::new(validator));
    }

    pub fn clear_validator(&self, resource: &str) {
        let mut store = self.store();
        let key = store.kind(resource).group_resource();
        store.validators.remove(&key);
    }

    // --- state -----------------------------------------------------------------------------

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.store().rv
    }

    /// Forgets the watch history: watches resumed from an older resourceVersion get a
    /// `410 Expired` ERROR event (and kube's watcher relists), as after etcd compaction.
    pub fn compact(&self) {
        let mut store = self.store();
        let rv = store.rv;
        let resources: Vec<String> = store.kinds.iter().map(|k| k.group_resource()).collect();
        for r in resources {
            store.compacted.insert(r, rv);
        }
        store.history.clear();
        store.notify();
    }

    /// The stored object, with `ns` ignored for cluster-scoped kinds.
    pub fn get_json(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let store = self.store();
        let kind = store.kind(resource);
        store.get(&kind, ns, name).cloned()
    }

    /// A stored object as a typed resource (e.g. `Secret`, or a `CustomResource`).
    pub fn get_as<K>(&self, ns: &str, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned,
        K::Scope: 'static,
    {
        let resource = ResourceKind::of::<K>().group_resource();
        self.get_json(&resource, ns, name)
            .map(|v| serde_json::from_value(v).expect("stored object deserializes"))
    }

    /// Stored objects of a kind, in one namespace or (None) all, ordered by namespace and name.
    pub fn list_json(&self, resource: &str, ns: Option<&str>) -> Vec<Value> {
        let store = self.store();
        let kind = store.kind(resource);
        let filter = Filter {
            namespace: ns.filter(|_| kind.namespaced).map(str::to_owned),
            ..Filter::default()
        };
        store.list(&kind, &filter)
    }

    /// Creates an object as an all-powerful user (its `.status` is kept). Not in the request
    /// log; watchers see it like any other create.
    pub fn create_json(&self, resource: &str, ns: &str, obj: Value) -> Result<Value, ApiError> {
        let mut store = self.store();
        let kind = store.kind(resource);
        store.create(
            &kind,
            ns,
            obj,
            WriteOpts {
                privileged: true,
                ..WriteOpts::default()
            },
        )
    }

    /// Applies a JSON merge patch to any part of an object, `.status` included (as a user who
    /// writes both the resource and its status would). Not in the request log.
    pub fn patch_json(&self, resource: &str, ns: &str, name: &str, merge_patch: Value) -> Result<Value, ApiError> {
        let mut store = self.store();
        let kind = store.kind(resource);
        let body = serde_json::to_vec(&merge_patch).expect("json");
        store
            .patch(
                &kind,
                ns,
                name,
                PatchType::Merge,
                &body,
                false,
                None,
                WriteOpts {
                    privileged: true,
                    ..WriteOpts::default()
                },
            )
            .map(|(_, v)| v)
    }

    /// Edits an object in place with a closure (any part, `.status` included). Not in the
    /// request log.
    pub fn update_json(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> Result<Value, ApiError> {
        let mut store = self.store();
        let kind = store.kind(resource);
        let old = store
            .get(&kind, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&kind, name))?;
        let mut new = old.clone();
        edit(&mut new);
        store.finish_update(
            &kind,
            ns,
            name,
            &old,
            new,
            false,
            WriteOpts {
                privileged: true,
                ..WriteOpts::default()
            },
        )
    }

    /// Deletes like the API does: with finalizers the object only gets a deletionTimestamp
    /// (returned as `Some`); without, it is gone (`None`). Not in the request log.
    pub fn delete(&self, resource: &str, ns: &str, name: &str) -> Result<Option<Value>, ApiError> {
        let mut store = self.store();
        let kind = store.kind(resource);
        let (_, obj) = store.delete(&kind, ns, name, &Value::Null, WriteOpts::default())?;
        Ok(store.get(&kind, ns, name).map(|_| obj))
    }

    /// Creates an Opaque core/v1 Secret with the given string data (stored base64-encoded in
    /// `.data`, as the apiserver does). Not in the request log.
    pub fn create_secret(&self, ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
        use k8s_openapi::ByteString;
        use k8s_openapi::api::core::v1::Secret;
        let secret = Secret {
            metadata: kube::core::ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                ..Default::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        };
        let mut obj = serde_json::to_value(&secret).expect("secret json");
        obj["apiVersion"] = "v1".into();
        obj["kind"] = "Secret".into();
        self.create_json("secrets", ns, obj)
            .expect("kube double: create secret")
    }

    /// The events.k8s.io/v1 Events stored (e.g. published by `kube::runtime::events::Recorder`),
    /// across all namespaces.
    pub fn events(&self) -> Vec<k8s_openapi::api::events::v1::Event> {
        self.list_json("events.events.k8s.io", None)
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("stored event deserializes"))
            .collect()
    }

    // --- waiting ---------------------------------------------------------------------------

    /// Re-evaluates `probe` after every change in the double (object writes and logged
    /// requests) until it returns `Some` or `timeout` passes.
    pub async fn wait_until<T>(&self, timeout: Duration, mut probe: impl FnMut(&KubeDouble) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.store().changes.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(found) = probe(self) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return probe(self),
            }
        }
    }

    /// Waits until `pred` holds for the object (`None` while it does not exist). Returns the
    /// object seen when it held, or an error naming the last state seen.
    pub async fn wait_for(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        timeout: Duration,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Result<Option<Value>, String> {
        let found = self
            .wait_until(timeout, |d| {
                let obj = d.get_json(resource, ns, name);
                pred(obj.as_ref()).then_some(obj)
            })
            .await;
        found.ok_or_else(|| {
            format!(
                "timed out after {timeout:?} waiting on {resource} {ns}/{name}; last seen: {}",
                self.get_json(resource, ns, name)
                    .map_or_else(|| "<absent>".to_owned(), |v| v.to_string())
            )
        })
    }
}
