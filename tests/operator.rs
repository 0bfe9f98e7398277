//! The real controllers (kube::Client, kube-runtime) against an in-process Kubernetes API double
//! speaking the real HTTP API, with real HTTP branch services on 127.0.0.1.

mod common;
mod kube_double;

use std::sync::Arc;
use std::time::Duration;

use common::{Bank, Reply};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use kube_double::{KubeDouble, ResourceKind};
use kubetx::engine::Policy;
use kubetx::invoke::Invoker;
use kubetx::invoke::policy::OutboundPolicy;
use kubetx::metrics::Metrics;
use kubetx::operator::crd::{Msg, Saga, Tcc};
use kubetx::operator::leader::LeaderConfig;
use kubetx::operator::reconcile::{FINALIZER, RETRY_NOW, ReconcileConfig, SECRET_OPT_IN};
use kubetx::operator::{Operator, OperatorConfig};
use kubetx::scheduler::{Clock, OffsetClock};
use serde_json::{Value, json};

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(20);

/// An invoker with the operator's default policy (cluster services) plus `cidrs`.
fn invoker_for(cidrs: &[&str]) -> kubetx::invoke::InvokerBuilder {
    let cidrs: Vec<String> = cidrs.iter().map(|c| (*c).to_owned()).collect();
    Invoker::builder(OutboundPolicy::cluster(&[], &cidrs, "svc").expect("valid policy"))
}

struct Env {
    double: KubeDouble,
    bank: Bank,
    clock: Arc<OffsetClock>,
    metrics: Arc<Metrics>,
}

impl Env {
    async fn new() -> Self {
        let double = KubeDouble::start(&[
            ResourceKind::of_crd::<Saga>(),
            ResourceKind::of_crd::<Tcc>(),
            ResourceKind::of_crd::<Msg>(),
        ])
        .await;
        Env {
            double,
            bank: Bank::start().await,
            clock: Arc::new(OffsetClock::default()),
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn config(&self) -> OperatorConfig {
        OperatorConfig {
            namespaces: vec![],
            leader: None,
            reconcile: ReconcileConfig {
                policy: Policy {
                    retry_interval: 1,
                    max_retry_interval: 4,
                    timeout_to_fail: 35,
                },
                request_timeout: Duration::from_secs(2),
                max_request_timeout: Duration::from_secs(600),
                default_ttl: None,
                service_domain: "svc".to_owned(),
                store: None,
            },
            concurrency: 8,
            reporter: "test".to_owned(),
        }
    }

    /// The test configuration with leader election under `identity` on a 3-second Lease.
    fn elected(&self, identity: &str) -> OperatorConfig {
        let mut config = self.config();
        config.leader = Some(LeaderConfig {
            lease_name: "kubetx-operator".to_owned(),
            namespace: NS.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(3),
        });
        config
    }

    /// Deletes a saga and waits until the API server has removed it (its finalizer gone).
    async fn delete_saga_and_wait_gone(&self, name: &str) {
        let api: Api<Saga> = Api::namespaced(self.double.client(), NS);
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete accepted");
        self.double
            .wait_for("sagas", NS, name, WAIT, |o| o.is_none())
            .await
            .expect("the saga is gone");
    }

    fn start(&self) -> Operator {
        self.start_with(self.config())
    }

    fn start_with(&self, config: OperatorConfig) -> Operator {
        self.start_on(
            self.double.client(),
            config,
            invoker_for(&["127.0.0.0/8"]).build().expect("client"),
        )
    }

    fn start_on(&self, client: kube::Client, config: OperatorConfig, invoker: Invoker) -> Operator {
        let clock: Arc<dyn Clock> = self.clock.clone();
        Operator::start(client, config, clock, Arc::clone(&self.metrics), invoker)
    }

    fn url(&self, route: &str) -> Value {
        json!({"url": self.bank.url(route)})
    }

    fn transfer(&self, name: &str, trans_in: &str) -> Value {
        json!({
            "apiVersion": "kubetx.io/v1alpha1", "kind": "Saga",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "steps": [
                    {"name": "out", "action": self.url("TransOut"), "compensate": self.url("TransOutRevert"),
                     "payload": {"amount": 30}},
                    {"name": "in", "action": self.url(trans_in), "compensate": self.url("TransInRevert"),
                     "payload": {"amount": 30}},
                ],
                "options": {"retryIntervalSeconds": 1},
            },
        })
    }

    async fn create(&self, plural: &str, obj: Value) {
        let api: Api<kube::core::DynamicObject> =
            Api::namespaced_with(self.double.client(), NS, &self.double.kind(plural).api_resource());
        let obj: kube::core::DynamicObject = serde_json::from_value(obj).expect("object");
        api.create(&PostParams::default(), &obj).await.expect("created");
    }

    async fn wait_phase(&self, plural: &str, name: &str, phase: &str) -> Value {
        let found = self
            .double
            .wait_for(plural, NS, name, WAIT, |o| {
                o.is_some_and(|o| o["status"]["phase"] == phase)
            })
            .await;
        found.unwrap_or_else(|e| panic!("{e}")).expect("object exists")
    }

    /// Event reasons, once at least `count` were recorded.
    async fn event_reasons(&self, count: usize) -> Vec<String> {
        self.double
            .wait_until(WAIT, |d| (d.events().len() >= count).then_some(()))
            .await
            .expect("events recorded");
        self.double.events().iter().filter_map(|e| e.reason.clone()).collect()
    }

    /// A finished resource keeps the finalizer until it is deleted (added before the first call,
    /// removing it at the end would cost a write per transaction).
    async fn wait_finalizer_kept(&self, plural: &str, name: &str) {
        let obj = self.double.get_json(plural, NS, name).expect("exists");
        let finalizers = obj["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
        assert_eq!(finalizers, [json!(FINALIZER)]);
    }

    fn branch_states(obj: &Value) -> Vec<(String, String, String)> {
        obj["status"]["branches"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["name"].as_str().unwrap_or("").to_owned(),
                    b["op"].as_str().unwrap_or("").to_owned(),
                    b["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

fn rows(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

#[tokio::test]
async fn a_two_step_saga_succeeds_within_four_api_writes() {
    let env = Env::new().await;
    let operator = env.start();
    env.create("sagas", env.transfer("ok", "TransIn")).await;
    let saga = env.wait_phase("sagas", "ok", "Succeeded").await;
    assert_eq!(saga["status"]["progress"], "2/2");
    assert_eq!(
        Env::branch_states(&saga),
        rows(&[
            ("out", "compensate", "prepared"),
            ("out", "action", "succeed"),
            ("in", "compensate", "prepared"),
            ("in", "action", "succeed"),
        ])
    );
    let gid = saga["status"]["gid"].as_str().expect("gid").to_owned();
    assert_eq!(env.bank.routes(&gid), ["TransOut", "TransIn"]);
    let ready = saga["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
        .expect("Ready condition");
    assert_eq!(ready["status"], "True");
    // Let the controller settle, then count every write: create, the finalizer (added before the
    // first branch call), status, the Succeeded event.
    assert_eq!(env.event_reasons(1).await, ["Succeeded"]);
    operator.stop().await.expect("stops");
    let writes = env.double.writes();
    assert_eq!(writes.len(), 4, "{writes:#?}");
    let status_writes = writes.iter().filter(|w| w.is_status()).count();
    assert_eq!(status_writes, 1, "one status write for the whole saga");
}

#[tokio::test]
async fn a_failing_step_compensates_the_completed_ones() {
    let env = Env::new().await;
    let operator = env.start();
    env.bank.script("TransIn", &[Reply::Failure]);
    env.create("sagas", env.transfer("rollback", "TransIn")).await;
    let saga = env.wait_phase("sagas", "rollback", "Failed").await;
    assert_eq!(
        Env::branch_states(&saga),
        rows(&[
            ("out", "compensate", "succeed"),
            ("out", "action", "succeed"),
            ("in", "compensate", "succeed"),
            ("in", "action", "failed"),
        ])
    );
    let gid = saga["status"]["gid"].as_str().expect("gid");
    assert_eq!(
        env.bank.routes(gid),
        ["TransOut", "TransIn", "TransInRevert", "TransOutRevert"]
    );
    let message = saga["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("business refused"), "{message}");
    let reasons = env.event_reasons(4).await;
    assert_eq!(reasons, ["Started", "StepFailed", "Compensating", "Failed"]);
    env.wait_finalizer_kept("sagas", "rollback").await;
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_branch_error_is_retried_with_backoff_and_counted() {
    let env = Env::new().await;
    let operator = env.start();
    env.bank.script("TransIn", &[Reply::Error, Reply::Error]);
    env.create("sagas", env.transfer("flaky", "TransIn")).await;
    let running = env
        .double
        .wait_for("sagas", NS, "flaky", WAIT, |o| {
            o.is_some_and(|o| o["status"]["retries"].as_u64() == Some(1))
        })
        .await
        .expect("first retry recorded")
        .expect("exists");
    assert_eq!(running["status"]["phase"], "Running");
    assert_eq!(running["status"]["retryIntervalSeconds"], 2, "the interval doubled");
    assert!(
        running["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
    );
    let message = running["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("retrying in action") && message.contains("database is down"),
        "{message}"
    );
    let saga = env.wait_phase("sagas", "flaky", "Succeeded").await;
    let trans_in = saga["status"]["branches"][3].clone();
    assert_eq!(
        (trans_in["op"].clone(), trans_in["attempts"].clone()),
        (json!("action"), json!(3))
    );
    assert_eq!(saga["status"]["retries"], 2);
    env.wait_finalizer_kept("sagas", "flaky").await;
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_concurrent_saga_follows_its_dag() {
    let env = Env::new().await;
    let operator = env.start();
    let step = |name: &str, depends: &[&str]| {
        json!({"name": name, "action": env.url(&format!("A-{name}")), "compensate": env.url(&format!("C-{name}")),
               "dependsOn": depends})
    };
    env.create(
        "sagas",
        json!({
            "apiVersion": "kubetx.io/v1alpha1", "kind": "Saga",
            "metadata": {"name": "dag", "namespace": NS},
            "spec": {"steps": [step("a", &[]), step("b", &[]), step("c", &["a", "b"])]},
        }),
    )
    .await;
    let saga = env.wait_phase("sagas", "dag", "Succeeded").await;
    let routes = env.bank.routes(saga["status"]["gid"].as_str().expect("gid"));
    assert_eq!(routes.len(), 3);
    assert_eq!(routes[2], "A-c", "{routes:?}");
    operator.stop().await.expect("stops");
}

fn tcc(env: &Env, name: &str) -> Value {
    let branch = |n: &str| {
        json!({"name": n.to_lowercase(), "try": env.url(&format!("{n}Try")), "confirm": env.url(&format!("{n}Confirm")),
               "cancel": env.url(&format!("{n}Cancel")), "payload": {"amount": 5}})
    };
    json!({
        "apiVersion": "kubetx.io/v1alpha1", "kind": "Tcc",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"branches": [branch("Out"), branch("In")], "options": {"retryIntervalSeconds": 1}},
    })
}

#[tokio::test]
async fn a_tcc_tries_every_branch_then_confirms_all() {
    let env = Env::new().await;
    let operator = env.start();
    env.create("tccs", tcc(&env, "tcc-ok")).await;
    let obj = env.wait_phase("tccs", "tcc-ok", "Succeeded").await;
    let gid = obj["status"]["gid"].as_str().expect("gid");
    assert_eq!(env.bank.routes(gid), ["OutTry", "InTry", "InConfirm", "OutConfirm"]);
    assert_eq!(obj["status"]["progress"], "4/4");
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_tcc_whose_try_fails_cancels_every_branch_it_tried() {
    let env = Env::new().await;
    let operator = env.start();
    env.bank.script("InTry", &[Reply::Failure]);
    env.create("tccs", tcc(&env, "tcc-cancel")).await;
    let obj = env.wait_phase("tccs", "tcc-cancel", "Failed").await;
    let gid = obj["status"]["gid"].as_str().expect("gid");
    assert_eq!(env.bank.routes(gid), ["OutTry", "InTry", "InCancel", "OutCancel"]);
    operator.stop().await.expect("stops");
}

fn msg(env: &Env, name: &str, submitted: bool) -> Value {
    msg_checked_at(env, name, submitted, "QueryPrepared")
}

fn msg_checked_at(env: &Env, name: &str, submitted: bool, query_route: &str) -> Value {
    json!({
        "apiVersion": "kubetx.io/v1alpha1", "kind": "Msg",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "submitted": submitted,
            "queryPrepared": env.url(query_route),
            "steps": [{"name": "notify", "action": env.url("Notify"), "payload": {"n": 1}}],
            "options": {"timeoutSeconds": 30, "retryIntervalSeconds": 1},
        },
    })
}

#[tokio::test]
async fn a_msg_is_delivered_once_its_owner_submits_it() {
    let env = Env::new().await;
    let operator = env.start();
    env.create("msgs", msg(&env, "m-submit", false)).await;
    let prepared = env.wait_phase("msgs", "m-submit", "Prepared").await;
    let gid = prepared["status"]["gid"].as_str().expect("gid").to_owned();
    assert!(env.bank.routes(&gid).is_empty(), "nothing before submit");
    env.double
        .patch_json("msgs", NS, "m-submit", json!({"spec": {"submitted": true}}))
        .expect("patched");
    env.wait_phase("msgs", "m-submit", "Succeeded").await;
    assert_eq!(env.bank.routes(&gid), ["Notify"]);
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn an_unsubmitted_msg_is_back_checked_after_its_timeout() {
    let env = Env::new().await;
    let operator = env.start();
    env.bank.script("QueryRolledBack", &[Reply::Failure]);
    env.create("msgs", msg_checked_at(&env, "m-dropped", false, "QueryRolledBack"))
        .await;
    env.create("msgs", msg(&env, "m-checked", false)).await;
    env.wait_phase("msgs", "m-dropped", "Prepared").await;
    env.wait_phase("msgs", "m-checked", "Prepared").await;
    env.clock.advance(Duration::from_secs(31));
    // The controller requeued for the real deadline; a touch makes it look again now.
    for name in ["m-dropped", "m-checked"] {
        env.double
            .patch_json("msgs", NS, name, json!({"metadata": {"annotations": {"poke": "1"}}}))
            .expect("patched");
    }
    let dropped = env.wait_phase("msgs", "m-dropped", "Failed").await;
    let checked = env.wait_phase("msgs", "m-checked", "Succeeded").await;
    let dropped_gid = dropped["status"]["gid"].as_str().expect("gid");
    let checked_gid = checked["status"]["gid"].as_str().expect("gid");
    assert_eq!(env.bank.routes(dropped_gid), ["QueryRolledBack"]);
    assert_eq!(env.bank.routes(checked_gid), ["QueryPrepared", "Notify"]);
    let check = env
        .bank
        .calls()
        .into_iter()
        .find(|c| c.gid == checked_gid)
        .expect("back-check");
    assert_eq!((check.branch_id.as_str(), check.op.as_str()), ("00", "msg"));
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn deleting_a_running_saga_compensates_it_first() {
    let env = Env::new().await;
    let operator = env.start();
    env.bank.script("TransIn", &[Reply::Ongoing; 50]);
    env.create("sagas", env.transfer("doomed", "TransIn")).await;
    let running = env
        .double
        .wait_for("sagas", NS, "doomed", WAIT, |o| {
            o.is_some_and(|o| {
                o["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()) && o["status"]["gid"].is_string()
            })
        })
        .await
        .expect("finalizer added")
        .expect("exists");
    let gid = running["status"]["gid"].as_str().expect("gid").to_owned();
    env.delete_saga_and_wait_gone("doomed").await;
    let routes = env.bank.routes(&gid);
    assert!(
        routes.ends_with(&["TransInRevert".to_owned(), "TransOutRevert".to_owned()]),
        "{routes:?}"
    );
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_saga_deleted_during_its_first_pass_compensates() {
    let env = Env::new().await;
    let operator = env.start();
    env.bank.script("TransOut", &[Reply::Slow(300)]);
    env.bank.script("TransIn", &[Reply::Ongoing; 50]);
    env.create("sagas", env.transfer("pruned", "TransIn")).await;
    // Deleted while the first branch call is in flight, as a script or a GitOps prune would.
    let calls = env.bank.wait_calls_on("TransOut", 1).await;
    env.delete_saga_and_wait_gone("pruned").await;
    let routes = env.bank.routes(&calls[0].gid);
    assert!(routes.contains(&"TransOutRevert".to_owned()), "{routes:?}");
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_saga_deleted_while_a_step_runs_calls_no_further_step_and_rolls_back() {
    let env = Env::new().await;
    let operator = env.start();
    // TransOut succeeds, slowly; TransIn would succeed at once.
    env.bank.script("TransOut", &[Reply::Slow(500)]);
    env.create("sagas", env.transfer("stopped", "TransIn")).await;
    let calls = env.bank.wait_calls_on("TransOut", 1).await;
    env.delete_saga_and_wait_gone("stopped").await;
    let routes = env.bank.routes(&calls[0].gid);
    // TransIn was never called; its compensation may be (the engine cannot tell a step it never
    // called from one a crashed pass called), TransOut's must be, last.
    assert!(
        !routes.contains(&"TransIn".to_owned()),
        "the delete stopped the pass between its steps: {routes:?}"
    );
    assert_eq!(routes.last().map(String::as_str), Some("TransOutRevert"), "{routes:?}");
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_saga_deleted_while_its_last_step_runs_rolls_back_instead_of_committing() {
    let env = Env::new().await;
    let operator = env.start();
    env.bank.script("TransIn", &[Reply::Slow(500)]);
    env.create("sagas", env.transfer("last", "TransIn")).await;
    let calls = env.bank.wait_calls_on("TransIn", 1).await;
    env.delete_saga_and_wait_gone("last").await;
    let routes = env.bank.routes(&calls[0].gid);
    assert!(
        routes.ends_with(&["TransInRevert".to_owned(), "TransOutRevert".to_owned()]),
        "deleted before its success was recorded, so it rolled back: {routes:?}"
    );
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_retry_now_annotation_makes_a_backed_off_saga_due_at_once() {
    let env = Env::new().await;
    let mut config = env.config();
    config.reconcile.policy.retry_interval = 3600;
    config.reconcile.policy.max_retry_interval = 3600;
    let operator = env.start_with(config);
    env.bank.script("TransIn", &[Reply::Error]);
    env.create("sagas", env.transfer("stuck", "TransIn")).await;
    let calls = env.bank.wait_calls_on("TransIn", 1).await;
    env.double
        .wait_for("sagas", NS, "stuck", WAIT, |o| {
            o.is_some_and(|o| o["status"]["retries"].as_u64() == Some(1))
        })
        .await
        .expect("backed off for an hour");
    env.double
        .patch_json(
            "sagas",
            NS,
            "stuck",
            json!({"metadata": {"annotations": {RETRY_NOW: "2026-12-01T12:00:00Z"}}}),
        )
        .expect("annotated");
    let saga = env.wait_phase("sagas", "stuck", "Succeeded").await;
    assert_eq!(saga["status"]["retryRequest"], "2026-12-01T12:00:00Z");
    assert_eq!(env.bank.count(&calls[0].gid, "TransIn"), 2);
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn an_annotation_deletes_a_running_saga_without_compensating() {
    let env = Env::new().await;
    let operator = env.start();
    env.bank.script("TransIn", &[Reply::Ongoing; 50]);
    env.create("sagas", env.transfer("abandoned", "TransIn")).await;
    let running = env
        .double
        .wait_for("sagas", NS, "abandoned", WAIT, |o| {
            o.is_some_and(|o| {
                o["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()) && o["status"]["gid"].is_string()
            })
        })
        .await
        .expect("running")
        .expect("exists");
    let gid = running["status"]["gid"].as_str().expect("gid").to_owned();
    env.double
        .patch_json(
            "sagas",
            NS,
            "abandoned",
            json!({"metadata": {"annotations": {"kubetx.io/skip-compensation": "true"}}}),
        )
        .expect("annotated");
    env.delete_saga_and_wait_gone("abandoned").await;
    assert!(
        !env.bank.routes(&gid).iter().any(|r| r.ends_with("Revert")),
        "nothing was compensated"
    );
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn finished_resources_are_deleted_after_their_ttl() {
    let env = Env::new().await;
    let operator = env.start();
    let mut saga = env.transfer("short-lived", "TransIn");
    saga["spec"]["ttlSecondsAfterFinished"] = json!(1);
    env.create("sagas", saga).await;
    env.wait_phase("sagas", "short-lived", "Succeeded").await;
    env.double
        .wait_for("sagas", NS, "short-lived", WAIT, |o| o.is_none())
        .await
        .expect("deleted by TTL");
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn an_invalid_spec_fails_with_a_precise_message() {
    let env = Env::new().await;
    let operator = env.start();
    let step = |name: &str, depends: &str| json!({"name": name, "action": env.url("A"), "dependsOn": [depends]});
    env.create(
        "sagas",
        json!({
            "apiVersion": "kubetx.io/v1alpha1", "kind": "Saga",
            "metadata": {"name": "cycle", "namespace": NS},
            "spec": {"steps": [step("a", "b"), step("b", "a")]},
        }),
    )
    .await;
    let saga = env.wait_phase("sagas", "cycle", "Failed").await;
    assert_eq!(saga["status"]["message"], "invalid spec: dependsOn contains a cycle");
    assert!(env.bank.calls().is_empty());
    // The API server (the double evaluating the CRD's CEL rules) rejects what CEL can express.
    let api: Api<Saga> = Api::namespaced(env.double.client(), NS);
    let duplicate: Saga = serde_json::from_value(json!({
        "apiVersion": "kubetx.io/v1alpha1", "kind": "Saga",
        "metadata": {"name": "dup", "namespace": NS},
        "spec": {"steps": [{"name": "a", "action": env.url("A")}, {"name": "a", "action": env.url("A")}]},
    }))
    .expect("saga");
    let error = api
        .create(&PostParams::default(), &duplicate)
        .await
        .expect_err("rejected");
    assert!(error.to_string().contains("Duplicate value"), "{error}");
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_branch_host_outside_the_allow_list_is_refused() {
    let env = Env::new().await;
    let operator = env.start();
    let mut saga = env.transfer("metadata", "TransIn");
    saga["spec"]["steps"][1]["action"] = json!({"url": "http://169.254.169.254/latest/meta-data"});
    env.create("sagas", saga).await;
    let saga = env.wait_phase("sagas", "metadata", "Failed").await;
    let message = saga["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("endpoint refused:") && message.contains("metadata"),
        "{message}"
    );
    assert!(env.bank.calls().is_empty(), "no branch was called");
    assert_eq!(env.event_reasons(1).await, ["EndpointRefused"]);
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn headers_come_from_secrets() {
    let env = Env::new().await;
    env.double
        .create_secret(NS, "bank-token", &[("token", "Bearer s3cret")]);
    let operator = env.start();
    // Not opted in: refused before any call, with the reason.
    let mut refused = env.transfer("unlabelled-secret", "TransIn");
    refused["spec"]["headers"] =
        json!([{"name": "authorization", "valueFrom": {"secretKeyRef": {"name": "bank-token", "key": "token"}}}]);
    env.create("sagas", refused).await;
    let refused = env.wait_phase("sagas", "unlabelled-secret", "Failed").await;
    assert_eq!(
        refused["status"]["message"],
        format!(
            "secret default/bank-token is not labelled {SECRET_OPT_IN}=true: label it to let transactions send its values as headers"
        )
    );
    assert!(env.bank.calls().is_empty(), "nothing was called");
    env.double
        .patch_json(
            "secrets",
            NS,
            "bank-token",
            json!({"metadata": {"labels": {SECRET_OPT_IN: "true"}}}),
        )
        .expect("labelled");
    let mut saga = env.transfer("with-secret", "TransIn");
    saga["spec"]["headers"] = json!([
        {"name": "authorization", "valueFrom": {"secretKeyRef": {"name": "bank-token", "key": "token"}}},
        {"name": "x-tenant", "value": "blue"},
    ]);
    env.create("sagas", saga).await;
    let saga = env.wait_phase("sagas", "with-secret", "Succeeded").await;
    let gid = saga["status"]["gid"].as_str().expect("gid");
    for call in env.bank.calls().iter().filter(|c| c.gid == gid) {
        assert_eq!(call.headers["authorization"], "Bearer s3cret");
        assert_eq!(call.headers["x-tenant"], "blue");
    }
    // Sent, never shown: neither the status nor an event holds a header value.
    let events = format!("{:?}", env.double.events());
    for shown in [saga["status"].to_string(), events] {
        assert!(!shown.contains("s3cret") && !shown.contains("blue"), "{shown}");
    }
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_restarted_controller_resumes_a_saga_in_the_middle() {
    let env = Env::new().await;
    let first = env.start();
    env.bank.script("TransIn", &[Reply::Ongoing]);
    env.create("sagas", env.transfer("resumed", "TransIn")).await;
    let running = env
        .double
        .wait_for("sagas", NS, "resumed", WAIT, |o| {
            o.is_some_and(|o| o["status"]["phase"] == "Running")
        })
        .await
        .expect("running")
        .expect("exists");
    first.stop().await.expect("stops");
    let gid = running["status"]["gid"].as_str().expect("gid").to_owned();
    let second = env.start();
    env.wait_phase("sagas", "resumed", "Succeeded").await;
    assert_eq!(
        env.bank.count(&gid, "TransOut"),
        1,
        "the finished step was not repeated"
    );
    assert_eq!(env.bank.count(&gid, "TransIn"), 2);
    second.stop().await.expect("stops");
}

#[tokio::test]
async fn with_leader_election_only_the_leader_calls_branches() {
    let env = Env::new().await;
    let elected = |identity: &str| env.elected(identity);
    let leader = env.start_with(elected("replica-a"));
    env.double
        .wait_until(WAIT, |_| leader.health.ready().then_some(()))
        .await
        .expect("leader ready");
    let standby = env.start_with(elected("replica-b"));
    env.double
        .wait_until(WAIT, |_| standby.health.ready().then_some(()))
        .await
        .expect("standby ready");
    for i in 0..3 {
        env.create("sagas", env.transfer(&format!("ha-{i}"), "TransIn")).await;
    }
    for i in 0..3 {
        env.wait_phase("sagas", &format!("ha-{i}"), "Succeeded").await;
    }
    let lease = env.double.get_json("leases", NS, "kubetx-operator").expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");
    assert!(!standby.health.leading.load(std::sync::atomic::Ordering::SeqCst));
    // Every branch was called once: by the leader only.
    assert_eq!(env.bank.calls().len(), 6);
    // When the leader steps down, the standby takes over.
    leader.stop().await.expect("leader stops");
    env.double
        .wait_until(WAIT, |_| {
            standby
                .health
                .leading
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        })
        .await
        .expect("standby took over");
    env.create("sagas", env.transfer("after-failover", "TransIn")).await;
    env.wait_phase("sagas", "after-failover", "Succeeded").await;
    standby.stop().await.expect("standby stops");
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_stops_before_the_standby_takes_over() {
    let env = Env::new().await;
    let elected = |identity: &str| env.elected(identity);
    // The leader reaches the API server through a proxy the test can cut; each replica calls
    // branches from its own address, so that the bank tells who called.
    let proxy = common::FreezableProxy::start(env.double.addr()).await;
    let mut proxied = kube::Config::new(format!("http://{}", proxy.addr).parse().expect("url"));
    proxied.default_namespace = NS.to_owned();
    let leader_ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let standby_ip: std::net::IpAddr = [127, 0, 0, 3].into();
    let leader = env.start_on(
        kube::Client::try_from(proxied).expect("client"),
        elected("replica-a"),
        invoker_for(&["127.0.0.0/8"])
            .source_address(leader_ip)
            .build()
            .expect("invoker"),
    );
    env.double
        .wait_until(WAIT, |_| leader.health.ready().then_some(()))
        .await
        .expect("leader ready");
    let standby = env.start_on(
        env.double.client(),
        elected("replica-b"),
        invoker_for(&["127.0.0.0/8"])
            .source_address(standby_ip)
            .build()
            .expect("invoker"),
    );
    env.bank.script("TransIn", &[Reply::Ongoing; 1000]);
    env.create("sagas", env.transfer("partitioned", "TransIn")).await;
    env.double
        .wait_until(WAIT, |_| {
            let calls = env.bank.calls_on("TransIn");
            calls.iter().any(|c| c.peer.ip() == leader_ip).then_some(())
        })
        .await
        .expect("the leader drives the saga");
    // Cut the leader off: it can neither renew its Lease nor write, and must stop calling.
    proxy.freeze();
    let leading = |operator: &Operator| operator.health.leading.load(std::sync::atomic::Ordering::SeqCst);
    env.double
        .wait_until(WAIT, |_| leading(&standby).then_some(()))
        .await
        .expect("the standby took the Lease over");
    env.bank.unscript("TransIn");
    let saga = env.wait_phase("sagas", "partitioned", "Succeeded").await;
    // The old leader comes back: it must not write or call anything.
    let token = leader.shutdown_token();
    proxy.thaw();
    // Its shutdown token fires, so that `kubetx operator` exits and restarts as a standby.
    tokio::time::timeout(WAIT, token.cancelled())
        .await
        .expect("the old leader shuts down");
    let stopped = tokio::time::timeout(WAIT, leader.wait())
        .await
        .expect("the old leader stops");
    assert!(stopped.is_err(), "it stopped because it lost the Lease");
    let calls = env.bank.calls();
    let first_by_standby = calls
        .iter()
        .filter(|c| c.peer.ip() == standby_ip)
        .map(|c| c.at)
        .min()
        .expect("the standby called branches");
    let late: Vec<_> = calls
        .iter()
        .filter(|c| c.peer.ip() == leader_ip && c.at >= first_by_standby)
        .map(|c| &c.route)
        .collect();
    assert!(
        late.is_empty(),
        "the old leader called {late:?} after the new one started"
    );
    let now = env.double.get_json("sagas", NS, "partitioned").expect("saga");
    assert_eq!(now["status"]["phase"], "Succeeded", "no status went backwards");
    assert_eq!(now["status"]["gid"], saga["status"]["gid"]);
    standby.stop().await.expect("standby stops");
}

/// A SQLite detail store in `dir` (`detail.db`).
async fn detail_store(dir: &tempfile::TempDir) -> Arc<dyn kubetx::store::Store> {
    kubetx::store::open(&kubetx::store::StoreOptions {
        kind: kubetx::store::StoreKind::Sqlite(dir.path().join("detail.db").display().to_string()),
        synchronous: kubetx::store::Synchronous::Normal,
        migrate: true,
        max_connections: 4,
        acquire_timeout: Duration::from_secs(2),
        group_commit: 0,
    })
    .await
    .expect("store opens")
}

#[tokio::test]
async fn with_a_sql_store_secret_header_values_are_sent_but_never_written() {
    let env = Env::new().await;
    env.double
        .create_secret(NS, "bank-token", &[("token", "Bearer s3cret")]);
    env.double
        .patch_json(
            "secrets",
            NS,
            "bank-token",
            json!({"metadata": {"labels": {SECRET_OPT_IN: "true"}}}),
        )
        .expect("labelled");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = detail_store(&dir).await;
    let mut config = env.config();
    config.reconcile.store = Some(Arc::clone(&store));
    let operator = env.start_with(config);
    let mut saga = env.transfer("sql-secret", "TransIn");
    saga["spec"]["headers"] = json!([
        {"name": "authorization", "valueFrom": {"secretKeyRef": {"name": "bank-token", "key": "token"}}},
        {"name": "x-tenant", "value": "blue"},
    ]);
    env.create("sagas", saga).await;
    let saga = env.wait_phase("sagas", "sql-secret", "Succeeded").await;
    let gid = saga["status"]["gid"].as_str().expect("gid");
    let calls = env.bank.calls();
    assert!(calls.iter().any(|c| c.gid == gid), "the bank was called");
    for call in calls.iter().filter(|c| c.gid == gid) {
        assert_eq!(call.headers["authorization"], "Bearer s3cret");
    }
    // SQL keeps where each value comes from, never the value.
    let global = store.find(gid).await.expect("reads").expect("saved");
    assert_eq!(
        global.options.branch_headers,
        [
            (
                "authorization".to_owned(),
                "(from secret bank-token key token)".to_owned()
            ),
            ("x-tenant".to_owned(), "(inline in the resource spec)".to_owned()),
        ]
        .into()
    );
    operator.stop().await.expect("stops");
    drop(store);
    // The store's threads close their connections after the drop, and the last one folds the
    // WAL into the database file and deletes it: wait for that (a while at most), and skip a
    // file that vanishes between the listing and the read.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(dir.path())
        .expect("lists")
        .any(|file| file.expect("entry").file_name().to_string_lossy().ends_with("-wal"))
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for file in std::fs::read_dir(dir.path()).expect("lists") {
        let bytes = match std::fs::read(file.expect("entry").path()) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            read => read.expect("reads"),
        };
        assert!(
            !bytes.windows(6).any(|w| w == b"s3cret"),
            "a database file holds the secret value"
        );
    }
}

#[tokio::test]
async fn with_a_sql_store_the_status_keeps_a_summary_in_three_writes() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = detail_store(&dir).await;
    let mut config = env.config();
    config.reconcile.store = Some(Arc::clone(&store));
    let operator = env.start_with(config);
    env.bank.script("TransIn", &[Reply::Failure]);
    env.create("sagas", env.transfer("sql-ok", "TransOut")).await;
    env.create("sagas", env.transfer("sql-rollback", "TransIn")).await;
    let saga = env.wait_phase("sagas", "sql-ok", "Succeeded").await;
    let rolled_back = env.wait_phase("sagas", "sql-rollback", "Failed").await;
    for obj in [&saga, &rolled_back] {
        assert!(
            obj["status"].get("branches").is_none(),
            "summary only: {}",
            obj["status"]
        );
    }
    assert_eq!(saga["status"]["progress"], "2/2");
    // The detail is in SQL, under the gid the status names.
    let detail = |gid: String| {
        let store = Arc::clone(&store);
        async move {
            let global = store.find(&gid).await.expect("reads").expect("saved");
            let rows: Vec<String> = store
                .branches(&gid)
                .await
                .expect("reads")
                .iter()
                .map(|b| b.status.to_string())
                .collect();
            (global.status.to_string(), rows)
        }
    };
    let gid = |obj: &Value| obj["status"]["gid"].as_str().expect("gid").to_owned();
    assert_eq!(
        detail(gid(&saga)).await,
        (
            "succeed".to_owned(),
            vec!["prepared".into(), "succeed".into(), "prepared".into(), "succeed".into()]
        )
    );
    assert_eq!(
        detail(gid(&rolled_back)).await,
        (
            "failed".to_owned(),
            vec!["succeed".into(), "succeed".into(), "succeed".into(), "failed".into()]
        )
    );
    // The row names its resource, for the console.
    let row = store.find(&gid(&saga)).await.expect("reads").expect("saved");
    let ext: Value = serde_json::from_str(&row.ext_data).expect("ext_data is JSON");
    assert_eq!(ext["resource"]["kind"], "Saga");
    assert_eq!(ext["resource"]["name"], "sql-ok");
    assert_eq!(ext["resource"]["namespace"], saga["metadata"]["namespace"]);
    env.event_reasons(5).await;
    operator.stop().await.expect("stops");
    let ok_writes = env
        .double
        .count_writes(|w| w.name == "sql-ok" || (w.plural == "events" && w.name.starts_with("sql-ok")));
    assert_eq!(
        ok_writes,
        4,
        "create, finalizer, status, Succeeded event: {:#?}",
        env.double.writes()
    );
}

/// The operator with cluster services and 127.0.0.1 allowed, where `bank.default.svc` resolves
/// to 127.0.0.1 and `trap.default.svc` to 127.0.0.2 (refused: a cluster name pointing at the
/// operator's own host).
fn locked_down_invoker() -> Invoker {
    invoker_for(&["127.0.0.1/32"])
        .static_host("bank.default.svc", &[[127, 0, 0, 1].into()])
        .static_host("trap.default.svc", &[[127, 0, 0, 2].into()])
        .build()
        .expect("client")
}

#[tokio::test]
async fn every_spelling_of_a_refused_address_fails_the_resource_before_any_call() {
    let env = Env::new().await;
    let trap = common::Trap::start([127, 0, 0, 2]).await;
    let operator = env.start_on(env.double.client(), env.config(), locked_down_invoker());
    let spellings = common::address_spellings([127, 0, 0, 2], trap.addr.port(), "bank.default.svc");
    for (index, url) in spellings.iter().enumerate() {
        let mut saga = env.transfer(&format!("spelled-{index}"), "TransIn");
        saga["spec"]["steps"][1]["action"] = json!({ "url": url });
        env.create("sagas", saga).await;
    }
    for (index, url) in spellings.iter().enumerate() {
        let saga = env.wait_phase("sagas", &format!("spelled-{index}"), "Failed").await;
        let message = saga["status"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("endpoint refused: "), "{url}: {message}");
    }
    assert!(env.bank.calls().is_empty(), "no step of a refused saga was called");
    assert_eq!(trap.hits(), 0);
    operator.stop().await.expect("stops");
}

#[tokio::test]
async fn a_service_resolving_to_a_refused_address_or_redirecting_is_never_followed() {
    let env = Env::new().await;
    let trap = common::Trap::start([127, 0, 0, 2]).await;
    let redirector = common::Trap::redirecting([127, 0, 0, 1], trap.url("/stolen")).await;
    let operator = env.start_on(env.double.client(), env.config(), locked_down_invoker());
    let service = |name: &str, port: u16, path: &str| json!({"service": {"name": name, "port": port, "path": path}});
    let mut saga = env.transfer("dns", "TransIn");
    saga["spec"]["steps"][0]["action"] = service("bank", env.bank.addr.port(), "/api/TransOut");
    saga["spec"]["steps"][1]["action"] = service("trap", trap.addr.port(), "/x");
    env.create("sagas", saga).await;
    let mut saga = env.transfer("redirect", "TransIn");
    saga["spec"]["steps"][1]["action"] = json!({ "url": redirector.url("/go") });
    env.create("sagas", saga).await;
    let last_error = |name: &'static str, expected: &'static str| {
        env.double.wait_for("sagas", NS, name, WAIT, move |o| {
            o.and_then(|o| o["status"]["branches"].as_array().cloned())
                .into_iter()
                .flatten()
                .any(|b| b["lastError"].as_str().is_some_and(|e| e.contains(expected)))
        })
    };
    last_error("dns", "resolves only to refused addresses: 127.0.0.2")
        .await
        .expect("dns refused");
    last_error("redirect", "status 302")
        .await
        .expect("redirect not followed");
    assert!(
        env.bank.calls_on("TransOut").len() >= 2,
        "the allowed Service name was called"
    );
    assert!(redirector.hits() >= 1);
    assert_eq!(trap.hits(), 0, "neither DNS nor a redirect reached 127.0.0.2");
    operator.stop().await.expect("stops");
}

mod grpc_bank;

/// A saga whose steps are gRPC methods: one by `grpc://` URL, one by Service with `grpcMethod`
/// (resolved through a static host entry, checked by the cluster policy), payloads as base64
/// bytes sent verbatim; an `Aborted` TransIn rolls it back over gRPC.
#[tokio::test]
async fn a_grpc_saga_calls_grpc_methods_with_base64_payloads_and_rolls_back_on_aborted() {
    use base64::Engine as _;
    use grpc_bank::{GReply, GrpcBank, busi};
    let env = Env::new().await;
    let bank = GrpcBank::start().await;
    let invoker = invoker_for(&["127.0.0.0/8"])
        .static_host("bank.default.svc", &["127.0.0.1".parse().expect("ip")])
        .build()
        .expect("client");
    let operator = env.start_on(env.double.client(), env.config(), invoker);
    let payload = base64::engine::general_purpose::STANDARD.encode(busi(30));
    let service = |method: &str| json!({"service": {"name": "bank", "port": bank.addr.port(), "grpcMethod": format!("busi.Busi/{method}")}});
    let saga = |name: &str| {
        json!({
            "apiVersion": "kubetx.io/v1alpha1", "kind": "Saga",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "steps": [
                    {"name": "out", "action": {"url": format!("grpc://{}", bank.target("TransOut"))},
                     "compensate": {"url": format!("grpc://{}", bank.target("TransOutRevert"))},
                     "payloadBase64": payload},
                    {"name": "in", "action": service("TransIn"), "compensate": service("TransInRevert"),
                     "payloadBase64": payload},
                ],
                "options": {"retryIntervalSeconds": 1},
            },
        })
    };
    env.create("sagas", saga("grpc-ok")).await;
    let done = env.wait_phase("sagas", "grpc-ok", "Succeeded").await;
    let gid = done["status"]["gid"].as_str().expect("gid").to_owned();
    assert_eq!(bank.methods(&gid), ["TransOut", "TransIn"]);
    for call in bank.calls_for(&gid) {
        assert_eq!((call.trans_type.as_str(), call.op.as_str()), ("saga", "action"));
        assert_eq!(call.body, busi(30), "the bytes are sent verbatim");
    }
    bank.script("TransIn", &[GReply::Aborted]);
    env.create("sagas", saga("grpc-rollback")).await;
    let failed = env.wait_phase("sagas", "grpc-rollback", "Failed").await;
    let gid = failed["status"]["gid"].as_str().expect("gid").to_owned();
    assert_eq!(
        bank.methods(&gid),
        ["TransOut", "TransIn", "TransInRevert", "TransOutRevert"]
    );
    // A step with both payload forms is refused before any call.
    let mut both = saga("grpc-both");
    both["spec"]["steps"][0]["payload"] = json!({"amount": 30});
    env.create("sagas", both).await;
    let refused = env.wait_phase("sagas", "grpc-both", "Failed").await;
    let message = refused["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("payload or payloadBase64"), "{message}");
    operator.stop().await.expect("stops");
}

/// `examples/saga-grpc.yaml` as shipped (only the bank's port differs) against the demo bank's
/// gRPC side, `kubetx bank --grpc-listen`: the money moves, and with the FAILURE payload its
/// comment gives, TransIn refuses and the transfer is rolled back.
#[tokio::test]
async fn the_grpc_example_transfers_at_the_demo_banks_grpc_side_and_rolls_back_on_failure() {
    let env = Env::new().await;
    let accounts = kubetx::bank::Shared::default();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let grpc_port = grpc.local_addr().expect("addr").port();
    let service = kubetx::bank::grpc_service(accounts.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc)),
    );
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let balances_url = format!("http://{}/balances", http.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(http, kubetx::bank::router_with(accounts)).await });
    let invoker = invoker_for(&["127.0.0.0/8"])
        .static_host("bank.default.svc", &["127.0.0.1".parse().expect("ip")])
        .build()
        .expect("client");
    let operator = env.start_on(env.double.client(), env.config(), invoker);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/saga-grpc.yaml");
    let mut example: Value = yaml_serde::from_str(&std::fs::read_to_string(path).expect("example")).expect("YAML");
    example["metadata"]["namespace"] = json!(NS);
    for step in example["spec"]["steps"].as_array_mut().expect("steps") {
        for endpoint in ["action", "compensate"] {
            step[endpoint]["service"]["port"] = json!(grpc_port);
        }
    }
    env.create("sagas", example.clone()).await;
    env.wait_phase("sagas", "transfer-grpc", "Succeeded").await;
    let balances = |url: String| async move {
        reqwest::get(url)
            .await
            .expect("get")
            .json::<Value>()
            .await
            .expect("json")
    };
    assert_eq!(balances(balances_url.clone()).await, json!({"A": 9970, "B": 10030}));

    example["metadata"]["name"] = json!("transfer-grpc-failing");
    example["spec"]["steps"][1]["payloadBase64"] = json!("CB4iB0ZBSUxVUkU=");
    env.create("sagas", example).await;
    let failed = env.wait_phase("sagas", "transfer-grpc-failing", "Failed").await;
    let message = failed["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("busi.Busi/TransIn") && message.contains("FAILURE"),
        "{message}"
    );
    assert_eq!(
        balances(balances_url).await,
        json!({"A": 9970, "B": 10030}),
        "rolled back"
    );
    operator.stop().await.expect("stops");
}

/// A Tcc over gRPC (the controller calls try itself) and a Msg delivered to a gRPC method.
#[tokio::test]
async fn a_grpc_tcc_tries_then_cancels_and_a_grpc_msg_is_delivered() {
    use base64::Engine as _;
    use grpc_bank::{GReply, GrpcBank, busi};
    let env = Env::new().await;
    let bank = GrpcBank::start().await;
    let operator = env.start();
    let payload = base64::engine::general_purpose::STANDARD.encode(busi(5));
    let grpc = |method: &str| json!({"url": format!("grpc://{}", bank.target(method))});
    let branch = |n: &str| {
        json!({"name": n.to_lowercase(), "try": grpc(&format!("{n}Try")), "confirm": grpc(&format!("{n}Confirm")),
               "cancel": grpc(&format!("{n}Cancel")), "payloadBase64": payload})
    };
    bank.script("InTry", &[GReply::Aborted]);
    env.create(
        "tccs",
        json!({
            "apiVersion": "kubetx.io/v1alpha1", "kind": "Tcc",
            "metadata": {"name": "grpc-tcc", "namespace": NS},
            "spec": {"branches": [branch("Out"), branch("In")], "options": {"retryIntervalSeconds": 1}},
        }),
    )
    .await;
    let tcc = env.wait_phase("tccs", "grpc-tcc", "Failed").await;
    let gid = tcc["status"]["gid"].as_str().expect("gid").to_owned();
    assert_eq!(bank.methods(&gid), ["OutTry", "InTry", "InCancel", "OutCancel"]);
    let try_call = &bank.calls_for(&gid)[0];
    assert_eq!((try_call.op.as_str(), try_call.body.clone()), ("try", busi(5)));
    env.create(
        "msgs",
        json!({
            "apiVersion": "kubetx.io/v1alpha1", "kind": "Msg",
            "metadata": {"name": "grpc-msg", "namespace": NS},
            "spec": {
                "submitted": true,
                "steps": [{"name": "notify", "action": grpc("Notify"), "payloadBase64": payload}],
                "options": {"retryIntervalSeconds": 1},
            },
        }),
    )
    .await;
    let msg = env.wait_phase("msgs", "grpc-msg", "Succeeded").await;
    let gid = msg["status"]["gid"].as_str().expect("gid").to_owned();
    assert_eq!(bank.methods(&gid), ["Notify"]);
    operator.stop().await.expect("stops");
}
