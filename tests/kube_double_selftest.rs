//! Proves the in-process Kubernetes API double (tests/kube_double) against the real
//! `kube::Client` and `kube::runtime` helpers.

mod kube_double;

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::{DynamicObject, ObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use kube_double::{Fault, KubeDouble, PatchType, ResourceKind, Verb};
use serde_json::{Value, json};

const NS: &str = "default";
const STEP: Duration = Duration::from_secs(5);

fn widgets() -> ResourceKind {
    ResourceKind::new("example.io", "v1", "Widget", "widgets")
}

async fn start() -> (KubeDouble, Api<DynamicObject>) {
    let double = KubeDouble::start(&[widgets()]).await;
    let api = Api::namespaced_with(double.client(), NS, &widgets().api_resource());
    (double, api)
}

fn widget(name: &str, spec: Value) -> DynamicObject {
    let mut obj = DynamicObject::new(name, &widgets().api_resource()).within(NS);
    obj.data = json!({ "spec": spec });
    obj
}

fn api_err(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn next<S, T>(stream: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(STEP, stream.next())
        .await
        .expect("no event before the deadline")
        .expect("stream ended")
}

fn rv(obj: &impl Resource) -> u64 {
    obj.resource_version()
        .expect("resourceVersion")
        .parse()
        .expect("numeric resourceVersion")
}

#[tokio::test]
async fn typed_lease_and_secret_with_conflicts() {
    let double = KubeDouble::start(&[]).await;
    let leases: Api<Lease> = Api::default_namespaced(double.client());

    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("leader".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some(NS));
    assert!(!created.uid().unwrap().is_empty());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, None, "built-ins carry no generation");

    let again = api_err(leases.create(&PostParams::default(), &lease).await.unwrap_err());
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));

    let mut fresh = leases.get("leader").await.unwrap();
    assert_eq!(fresh.resource_version(), created.resource_version());
    fresh.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let replaced = leases.replace("leader", &PostParams::default(), &fresh).await.unwrap();
    assert_eq!(rv(&replaced), rv(&created) + 1);
    assert_eq!(replaced.spec.as_ref().unwrap().holder_identity.as_deref(), Some("b"));

    // `fresh` now carries a stale resourceVersion.
    fresh.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let conflict = api_err(
        leases
            .replace("leader", &PostParams::default(), &fresh)
            .await
            .unwrap_err(),
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert!(conflict.is_conflict());
    assert_eq!(
        leases
            .get("leader")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );

    let patched = leases
        .patch(
            "leader",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "d"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().holder_identity.as_deref(), Some("d"));

    let missing = api_err(leases.get("nope").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "leases.coordination.k8s.io \"nope\" not found");

    // Secrets: seeded through the helper, read and replaced through the API.
    double.create_secret(NS, "creds", &[("token", "s3cret")]);
    let secrets: Api<Secret> = Api::default_namespaced(double.client());
    let mut secret = secrets.get("creds").await.unwrap();
    assert_eq!(secret.data.as_ref().unwrap()["token"], ByteString(b"s3cret".to_vec()));
    let stale = secret.clone();
    secret
        .data
        .as_mut()
        .unwrap()
        .insert("token".into(), ByteString(b"rotated".to_vec()));
    secrets.replace("creds", &PostParams::default(), &secret).await.unwrap();
    let conflict = api_err(
        secrets
            .replace("creds", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!(conflict.code, 409);
    let stored: Secret = double.get_as(NS, "creds").unwrap();
    assert_eq!(stored.data.unwrap()["token"], ByteString(b"rotated".to_vec()));
    let dup = api_err(secrets.create(&PostParams::default(), &stale).await.unwrap_err());
    assert_eq!(dup.code, 500, "resourceVersion set on create is refused");
}

#[tokio::test]
async fn dynamic_kind_create_list_and_patches() {
    let (double, api) = start().await;

    let mut w = widget("w1", json!({"size": 1}));
    w.data["status"] = json!({"phase": "Forged"});
    w.metadata.labels = Some([("tier".to_owned(), "gold".to_owned())].into());
    let created = api.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.data["spec"], json!({"size": 1}));
    assert!(
        created.data.get("status").is_none(),
        "status is dropped on create when it is a subresource"
    );
    let ts = created.metadata.creation_timestamp.clone().unwrap();
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(ts.0);
    assert!(age.as_secs() < 60, "creationTimestamp is wall-clock: {ts:?}");

    api.create(&PostParams::default(), &widget("w2", json!({"size": 5})))
        .await
        .unwrap();
    let other_ns: Api<DynamicObject> = Api::namespaced_with(double.client(), "other", &widgets().api_resource());
    let mut w3 = widget("w3", json!({"size": 9}));
    w3.metadata.namespace = Some("other".into());
    other_ns.create(&PostParams::default(), &w3).await.unwrap();

    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.items.iter().map(|o| o.name_any()).collect::<Vec<_>>(),
        ["w1", "w2"]
    );
    assert_eq!(
        list.metadata.resource_version.as_deref(),
        Some(double.resource_version().to_string().as_str())
    );
    let all: Api<DynamicObject> = Api::all_with(double.client(), &widgets().api_resource());
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 3);
    let gold = api.list(&ListParams::default().labels("tier=gold")).await.unwrap();
    assert_eq!(gold.items.len(), 1);
    assert_eq!(gold.items[0].name_any(), "w1");

    // Merge patch of spec bumps generation; a label-only patch does not.
    let merged = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.metadata.generation, Some(2));
    assert_eq!(merged.data["spec"]["size"], 2);
    let labelled = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"seen": "yes"}}})),
        )
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(2));
    assert_eq!(rv(&labelled), rv(&merged) + 1);

    // A no-op patch does not bump resourceVersion (like the apiserver).
    let noop = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(rv(&noop), rv(&labelled));

    // A merge patch with a stale resourceVersion is a conflict.
    let stale = api_err(
        api.patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": merged.resource_version()}, "spec": {"size": 7}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));

    // JSON patch whose test holds.
    let json_ok: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/size", "value": 2},
        {"op": "replace", "path": "/spec/size", "value": 3},
    ]))
    .unwrap();
    let patched = api
        .patch("w1", &PatchParams::default(), &Patch::Json::<()>(json_ok))
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["size"], 3);
    assert_eq!(patched.metadata.generation, Some(3));

    // JSON patch whose test fails: 422 and nothing changes.
    let json_bad: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/size", "value": 2},
        {"op": "replace", "path": "/spec/size", "value": 4},
    ]))
    .unwrap();
    let failed = api_err(
        api.patch("w1", &PatchParams::default(), &Patch::Json::<()>(json_bad))
            .await
            .unwrap_err(),
    );
    assert_eq!((failed.code, failed.reason.as_str()), (422, "Invalid"));
    assert_eq!(double.get_json("widgets", NS, "w1").unwrap()["spec"]["size"], 3);

    // Server-side apply on the main resource: merges, and removes what this manager dropped.
    let applied = api
        .patch(
            "w1",
            &PatchParams::apply("tester").force(),
            &Patch::Apply(json!({
                "apiVersion": "example.io/v1", "kind": "Widget",
                "spec": {"color": "red"},
            })),
        )
        .await
        .unwrap();
    assert_eq!(applied.data["spec"], json!({"size": 3, "color": "red"}));
    assert_eq!(applied.metadata.generation, Some(4));
    let reapplied = api
        .patch(
            "w1",
            &PatchParams::apply("tester"),
            &Patch::Apply(json!({
                "apiVersion": "example.io/v1", "kind": "Widget",
                "spec": {"shape": "round"},
            })),
        )
        .await
        .unwrap();
    assert_eq!(reapplied.data["spec"], json!({"size": 3, "shape": "round"}));
    let no_manager = api_err(
        api.patch(
            "w1",
            &PatchParams::default(),
            &Patch::Apply(json!({"apiVersion": "example.io/v1", "kind": "Widget"})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(no_manager.code, 400);

    // Apply creates a missing object.
    let upserted = api
        .patch(
            "w9",
            &PatchParams::apply("tester"),
            &Patch::Apply(json!({
                "apiVersion": "example.io/v1", "kind": "Widget",
                "metadata": {"name": "w9"}, "spec": {"size": 9},
            })),
        )
        .await
        .unwrap();
    assert_eq!(upserted.metadata.generation, Some(1));
    assert_eq!(upserted.data["spec"]["size"], 9);

    // Status subresource via apply: spec and generation untouched.
    let before = api.get("w1").await.unwrap();
    let with_status = api
        .patch_status(
            "w1",
            &PatchParams::apply("kubetx").force(),
            &Patch::Apply(json!({
                "apiVersion": "example.io/v1", "kind": "Widget",
                "spec": {"size": 100},
                "status": {"phase": "Ready", "attempts": 1},
            })),
        )
        .await
        .unwrap();
    assert_eq!(with_status.data["status"], json!({"phase": "Ready", "attempts": 1}));
    assert_eq!(with_status.data["spec"], before.data["spec"]);
    assert_eq!(with_status.metadata.generation, before.metadata.generation);
    assert_eq!(rv(&with_status), double.resource_version());
    assert!(rv(&with_status) > rv(&before));
    let narrowed = api
        .patch_status(
            "w1",
            &PatchParams::apply("kubetx").force(),
            &Patch::Apply(json!({
                "apiVersion": "example.io/v1", "kind": "Widget",
                "status": {"phase": "Done"},
            })),
        )
        .await
        .unwrap();
    assert_eq!(narrowed.data["status"], json!({"phase": "Done"}));

    // Main-resource writes cannot change status; status writes cannot change spec.
    let sneaky = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Hacked"}})),
        )
        .await
        .unwrap();
    assert_eq!(sneaky.data["status"], json!({"phase": "Done"}));
    let status_merge = api
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 0}, "status": {"note": "hi"}})),
        )
        .await
        .unwrap();
    assert_eq!(status_merge.data["status"], json!({"phase": "Done", "note": "hi"}));
    assert_eq!(status_merge.data["spec"]["size"], 3);
    let status_get = api.get_status("w1").await.unwrap();
    assert_eq!(status_get.data["status"]["note"], "hi");

    // The validation hook turns into 422 Invalid.
    double.set_validator("widgets", |obj| match obj["spec"]["size"].as_i64() {
        Some(n) if n > 10 => Err(format!("spec.size: Invalid value: {n}: must be <= 10")),
        _ => Ok(()),
    });
    let invalid = api_err(
        api.patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 11}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    assert!(invalid.is_invalid());
    assert_eq!(
        invalid.message,
        "Widget.example.io \"w1\" is invalid: spec.size: Invalid value: 11: must be <= 10"
    );
    assert_eq!(double.get_json("widgets", NS, "w1").unwrap()["spec"]["size"], 3);
}

#[derive(Debug, thiserror::Error)]
#[error("reconcile failed")]
struct ReconcileError;

#[tokio::test]
async fn delete_with_finalizer_through_the_runtime_finalizer_helper() {
    let (double, api) = start().await;
    const FINALIZER: &str = "example.io/cleanup";
    let created = api
        .create(&PostParams::default(), &widget("w1", json!({"size": 1})))
        .await
        .unwrap();

    // 1st pass: the helper adds the finalizer (JSON patch testing /metadata/finalizers == null).
    let action = finalizer(&api, FINALIZER, Arc::new(created.clone()), |_| async {
        panic!("no reconcile before the finalizer is in place");
        #[allow(unreachable_code)]
        Ok::<_, ReconcileError>(Action::await_change())
    })
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
    let with_finalizer = api.get("w1").await.unwrap();
    assert_eq!(with_finalizer.finalizers(), [FINALIZER]);

    // Replaying the stale object makes its `test` fail: 422, and the helper reports it.
    let err = finalizer(&api, FINALIZER, Arc::new(created), |_| async {
        Ok::<_, ReconcileError>(Action::await_change())
    })
    .await
    .unwrap_err();
    match err {
        kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422)
        }
        other => panic!("expected AddFinalizer(422), got {other:?}"),
    }

    // 2nd pass: Apply.
    let seen = finalizer(&api, FINALIZER, Arc::new(with_finalizer.clone()), |ev| async move {
        match ev {
            FinalizerEvent::Apply(_) => Ok::<_, ReconcileError>(Action::requeue(Duration::from_secs(7))),
            FinalizerEvent::Cleanup(_) => panic!("not deleting yet"),
        }
    })
    .await
    .unwrap();
    assert_eq!(seen, Action::requeue(Duration::from_secs(7)));

    // Delete: only a deletionTimestamp while the finalizer is there.
    let pending = api.delete("w1", &DeleteParams::default()).await.unwrap();
    let marked = pending.left().expect("object still present");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.metadata.generation, Some(2), "deletion bumps generation");
    let terminating = api.get("w1").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());

    // Adding a finalizer to a terminating object is refused.
    let refused = api_err(
        api.patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": [FINALIZER, "other/x"]}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(refused.code, 422);

    // 3rd pass: Cleanup, then the helper removes the finalizer and the object is gone.
    let cleaned = finalizer(&api, FINALIZER, Arc::new(terminating), |ev| async move {
        match ev {
            FinalizerEvent::Cleanup(_) => Ok::<_, ReconcileError>(Action::await_change()),
            FinalizerEvent::Apply(_) => panic!("deleting"),
        }
    })
    .await
    .unwrap();
    assert_eq!(cleaned, Action::await_change());
    assert!(double.get_json("widgets", NS, "w1").is_none());
    assert_eq!(api_err(api.get("w1").await.unwrap_err()).code, 404);

    // Without finalizers a delete is immediate.
    api.create(&PostParams::default(), &widget("w2", json!({})))
        .await
        .unwrap();
    let gone = api.delete("w2", &DeleteParams::default()).await.unwrap();
    assert!(gone.left().is_some_and(|o| o.name_any() == "w2"));
    assert!(double.get_json("widgets", NS, "w2").is_none());

    // Helper delete mirrors the API.
    double
        .create_json(
            "widgets",
            NS,
            json!({"metadata": {"name": "w3", "finalizers": ["a/b"]}, "spec": {}}),
        )
        .unwrap();
    let held = double.delete("widgets", NS, "w3").unwrap().expect("held by finalizer");
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    double
        .patch_json("widgets", NS, "w3", json!({"metadata": {"finalizers": null}}))
        .unwrap();
    assert!(double.get_json("widgets", NS, "w3").is_none());
}

#[tokio::test]
async fn default_watcher_sees_initial_list_then_changes() {
    let (double, api) = start().await;
    api.create(&PostParams::default(), &widget("w1", json!({"size": 1})))
        .await
        .unwrap();

    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next(&mut stream).await.unwrap(), watcher::Event::Init));
    match next(&mut stream).await.unwrap() {
        watcher::Event::InitApply(o) => assert_eq!(o.name_any(), "w1"),
        other => panic!("expected InitApply(w1), got {other:?}"),
    }
    assert!(matches!(next(&mut stream).await.unwrap(), watcher::Event::InitDone));
    // The default config lists, then watches from the list's resourceVersion.
    assert_eq!(double.count_requests(|r| r.verb == Verb::List), 1);

    api.create(&PostParams::default(), &widget("w2", json!({"size": 2})))
        .await
        .unwrap();
    match next(&mut stream).await.unwrap() {
        watcher::Event::Apply(o) => assert_eq!((o.name_any(), o.data["spec"]["size"].clone()), ("w2".into(), json!(2))),
        other => panic!("expected Apply(w2), got {other:?}"),
    }
    let patched = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 10}})),
        )
        .await
        .unwrap();
    match next(&mut stream).await.unwrap() {
        watcher::Event::Apply(o) => {
            assert_eq!(o.name_any(), "w1");
            assert_eq!(o.resource_version(), patched.resource_version());
            assert_eq!(o.data["spec"]["size"], 10);
        }
        other => panic!("expected Apply(w1), got {other:?}"),
    }
    api.delete("w2", &DeleteParams::default()).await.unwrap();
    match next(&mut stream).await.unwrap() {
        watcher::Event::Delete(o) => assert_eq!(o.name_any(), "w2"),
        other => panic!("expected Delete(w2), got {other:?}"),
    }

    // Streaming lists (sendInitialEvents) are served too.
    let mut streaming = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    assert!(matches!(next(&mut streaming).await.unwrap(), watcher::Event::Init));
    match next(&mut streaming).await.unwrap() {
        watcher::Event::InitApply(o) => assert_eq!(o.name_any(), "w1"),
        other => panic!("expected InitApply(w1), got {other:?}"),
    }
    assert!(matches!(next(&mut streaming).await.unwrap(), watcher::Event::InitDone));
    api.create(&PostParams::default(), &widget("w3", json!({})))
        .await
        .unwrap();
    match next(&mut streaming).await.unwrap() {
        watcher::Event::Apply(o) => assert_eq!(o.name_any(), "w3"),
        other => panic!("expected Apply(w3), got {other:?}"),
    }
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version_and_expires_after_compaction() {
    let (double, api) = start().await;
    let a = api
        .create(&PostParams::default(), &widget("a", json!({"size": 1})))
        .await
        .unwrap();
    let from = a.resource_version().unwrap();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"size": 2}})),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &widget("b", json!({})))
        .await
        .unwrap();

    let mut events = api.watch(&WatchParams::default(), &from).await.unwrap().boxed();
    match next(&mut events).await.unwrap() {
        WatchEvent::Modified(o) => {
            assert_eq!(o.name_any(), "a");
            assert_eq!(o.data["spec"]["size"], 2);
        }
        other => panic!("expected MODIFIED a, got {other:?}"),
    }
    match next(&mut events).await.unwrap() {
        WatchEvent::Added(o) => assert_eq!(o.name_any(), "b"),
        other => panic!("expected ADDED b, got {other:?}"),
    }
    // Live events continue on the same stream.
    api.delete("a", &DeleteParams::default()).await.unwrap();
    match next(&mut events).await.unwrap() {
        WatchEvent::Deleted(o) => assert_eq!(o.name_any(), "a"),
        other => panic!("expected DELETED a, got {other:?}"),
    }

    // Field selectors filter the stream.
    let mut only_c = api
        .watch(&WatchParams::default().fields("metadata.name=c"), "0")
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &widget("d", json!({})))
        .await
        .unwrap();
    api.create(&PostParams::default(), &widget("c", json!({})))
        .await
        .unwrap();
    match next(&mut only_c).await.unwrap() {
        WatchEvent::Added(o) => assert_eq!(o.name_any(), "c"),
        other => panic!("expected ADDED c, got {other:?}"),
    }

    // The server-side timeout ends the stream (with a closing bookmark).
    let mut short = api
        .watch(
            &WatchParams::default().timeout(1),
            &double.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    match next(&mut short).await.unwrap() {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, double.resource_version().to_string())
        }
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(STEP, short.next()).await.unwrap().is_none(),
        "stream ends after timeoutSeconds"
    );

    double.compact();
    let mut expired = api.watch(&WatchParams::default(), &from).await.unwrap().boxed();
    match next(&mut expired).await.unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
}

#[tokio::test]
async fn write_log_counts_every_mutating_request() {
    let (double, api) = start().await;
    api.create(&PostParams::default(), &widget("w1", json!({"size": 1})))
        .await
        .unwrap();
    api.get("w1").await.unwrap();
    api.list(&ListParams::default()).await.unwrap();
    api.patch_status(
        "w1",
        &PatchParams::apply("kubetx").force(),
        &Patch::Apply(json!({"apiVersion": "example.io/v1", "kind": "Widget", "status": {"phase": "Ok"}})),
    )
    .await
    .unwrap();
    let conflict = api
        .create(&PostParams::default(), &widget("w1", json!({})))
        .await
        .unwrap_err();
    assert_eq!(api_err(conflict).code, 409);
    // Helpers do not count.
    double
        .create_json("widgets", NS, json!({"metadata": {"name": "seed"}, "spec": {}}))
        .unwrap();

    let writes = double.writes();
    assert_eq!(writes.len(), 3, "{writes:#?}");
    assert_eq!(writes[0].verb, Verb::Create);
    assert_eq!(writes[0].plural, "widgets");
    assert_eq!(writes[0].resource(), "widgets.example.io");
    assert_eq!(writes[0].namespace.as_deref(), Some(NS));
    assert_eq!(writes[0].name, "w1");
    assert_eq!(writes[0].code, 201);
    assert_eq!(writes[1].verb, Verb::Patch);
    assert_eq!(writes[1].subresource.as_deref(), Some("status"));
    assert_eq!(writes[1].patch_type, Some(PatchType::Apply));
    assert_eq!(writes[1].field_manager.as_deref(), Some("kubetx"));
    assert_eq!(writes[1].code, 200);
    assert!(!writes[2].succeeded());
    assert_eq!(double.count_writes(|w| w.is_for("widgets") && w.succeeded()), 2);
    assert_eq!(double.count_writes(|w| w.is_status()), 1);
    assert_eq!(double.count_requests(|r| !r.verb.is_write()), 2);
    double.clear_requests();
    assert!(double.writes().is_empty());
}

#[tokio::test]
async fn recorder_events_are_recorded() {
    let (double, api) = start().await;
    let w = api
        .create(&PostParams::default(), &widget("w1", json!({})))
        .await
        .unwrap();
    let recorder = Recorder::new(double.client(), "kubetx-operator".into());
    let event = RecorderEvent {
        type_: EventType::Normal,
        reason: "StepSucceeded".into(),
        note: Some("step 1 of 2".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = w.object_ref(&widgets().api_resource());
    recorder.publish(&event, &reference).await.unwrap();

    let events = double.events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.reason.as_deref(), Some("StepSucceeded"));
    assert_eq!(e.note.as_deref(), Some("step 1 of 2"));
    assert_eq!(e.type_.as_deref(), Some("Normal"));
    assert_eq!(e.reporting_controller.as_deref(), Some("kubetx-operator"));
    let regarding = e.regarding.as_ref().unwrap();
    assert_eq!(regarding.name.as_deref(), Some("w1"));
    assert_eq!(regarding.kind.as_deref(), Some("Widget"));
    assert_eq!(e.metadata.namespace.as_deref(), Some(NS));

    // The same event again becomes a series (a merge patch of the stored event).
    recorder.publish(&event, &reference).await.unwrap();
    let events = double.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(
        double.count_writes(|w| w.plural == "events" && w.group == "events.k8s.io"),
        2
    );
}

#[tokio::test]
async fn injected_faults_and_outages() {
    let (double, api) = start().await;

    double.fail_next_writes("widgets", 1);
    let failed = api_err(
        api.create(&PostParams::default(), &widget("w1", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((failed.code, failed.reason.as_str()), (500, "InternalError"));
    assert!(double.get_json("widgets", NS, "w1").is_none());
    api.create(&PostParams::default(), &widget("w1", json!({})))
        .await
        .unwrap();
    assert_eq!(double.pending_faults(), 0);

    // A lost reply: the write lands, the client sees 500.
    double.inject(
        Fault::new(|r| r.verb == Verb::Patch && r.name == "w1")
            .after_apply()
            .code(500),
    );
    let lost = api_err(
        api.patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 5}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(lost.code, 500);
    assert_eq!(double.get_json("widgets", NS, "w1").unwrap()["spec"]["size"], 5);

    // 503 is retried by kube's client on its own: two injected 503s stay invisible.
    double.inject(Fault::writes_to("widgets.example.io").times(2).code(503));
    api.patch(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"size": 6}})),
    )
    .await
    .unwrap();
    assert_eq!(double.count_writes(|w| w.verb == Verb::Patch && w.code == 503), 2);

    // Outage: connections refused while stopped; a running watcher resumes afterwards from
    // its last resourceVersion and sees what happened in between.
    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next(&mut stream).await.unwrap(), watcher::Event::Init));
    assert!(matches!(next(&mut stream).await.unwrap(), watcher::Event::InitApply(_)));
    assert!(matches!(next(&mut stream).await.unwrap(), watcher::Event::InitDone));
    // Polling on opens the watch.
    api.create(&PostParams::default(), &widget("before", json!({})))
        .await
        .unwrap();
    match next(&mut stream).await.unwrap() {
        watcher::Event::Apply(o) => assert_eq!(o.name_any(), "before"),
        other => panic!("expected Apply(before), got {other:?}"),
    }

    double.stop().await;
    assert!(!double.is_running());
    let refused = api.get("w1").await.unwrap_err();
    assert!(
        !matches!(refused, kube::Error::Api(_)),
        "expected a transport error, got {refused:?}"
    );
    double
        .create_json("widgets", NS, json!({"metadata": {"name": "during"}, "spec": {}}))
        .unwrap();
    double.restart().await;
    assert!(double.is_running());
    assert_eq!(api.get("w1").await.unwrap().data["spec"]["size"], 6);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let item = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("watcher resumed before the deadline")
            .expect("stream open");
        match item {
            Ok(watcher::Event::Apply(o)) if o.name_any() == "during" => break,
            Ok(watcher::Event::Init) => panic!("resume should not relist"),
            Ok(_) => {}
            // Depending on timing the cut watch surfaces as errors before the re-watch works.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(
        double.count_requests(|r| r.verb == Verb::Watch && r.succeeded()),
        2,
        "one watch before the outage, one resumed after it"
    );
}

#[tokio::test]
async fn wait_for_helper_observes_changes() {
    let (double, api) = start().await;
    let waiter = {
        let api = api.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            api.create(&PostParams::default(), &widget("late", json!({"size": 1})))
                .await
                .unwrap();
        })
    };
    let seen = double
        .wait_for("widgets", NS, "late", STEP, |o| o.is_some())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen["spec"]["size"], 1);
    waiter.await.unwrap();
    let timeout = double
        .wait_for("widgets", NS, "never", Duration::from_millis(100), |o| o.is_some())
        .await
        .unwrap_err();
    assert!(timeout.contains("<absent>"), "{timeout}");
}

// --- a derived CRD with schema + CEL rules, driven by a real Controller --------------------

mod gadget {
    use kube::{CustomResource, KubeSchema};
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    #[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
    #[kube(
        group = "example.io",
        version = "v1",
        kind = "Gadget",
        namespaced,
        status = "GadgetStatus",
        validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("spec is immutable")
    )]
    #[serde(rename_all = "camelCase")]
    pub struct GadgetSpec {
        #[schemars(range(min = 1, max = 10))]
        pub size: i64,
        // Bounded, as every string under a CEL rule must be (the root's, here).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(max = 63))]
        pub label: Option<String>,
    }

    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct GadgetStatus {
        #[schemars(length(max = 63))]
        pub phase: String,
        pub observed_size: i64,
    }
}

use gadget::{Gadget, GadgetSpec, GadgetStatus};

const GADGET_FINALIZER: &str = "example.io/gadget";

async fn reconcile_gadget(
    obj: Arc<Gadget>,
    api: Arc<Api<Gadget>>,
) -> Result<Action, kube::runtime::finalizer::Error<ReconcileError>> {
    finalizer(&api, GADGET_FINALIZER, obj, |ev| async {
        match ev {
            FinalizerEvent::Apply(g) => {
                let desired = GadgetStatus {
                    phase: "Ready".into(),
                    observed_size: g.spec.size,
                };
                if g.status.as_ref() != Some(&desired) {
                    api.patch_status(
                        &g.name_any(),
                        &PatchParams::apply("gadget-controller").force(),
                        &Patch::Apply(json!({
                            "apiVersion": "example.io/v1", "kind": "Gadget", "status": desired,
                        })),
                    )
                    .await
                    .map_err(|_| ReconcileError)?;
                }
                Ok(Action::await_change())
            }
            FinalizerEvent::Cleanup(_) => Ok(Action::await_change()),
        }
    })
    .await
}

#[tokio::test]
async fn controller_with_crd_schema_cel_and_finalizer() {
    use kube::runtime::Controller;

    let double = KubeDouble::start(&[ResourceKind::of_crd::<Gadget>()]).await;
    let api: Api<Gadget> = Api::default_namespaced(double.client());

    // Schema: bounds and CEL rules are enforced; unknown fields are pruned.
    let too_big = api_err(
        api.create(
            &PostParams::default(),
            &Gadget::new("big", GadgetSpec { size: 11, label: None }),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(too_big.code, 422);
    assert!(
        too_big.message.contains("spec.size") && too_big.message.contains("less than or equal to 10"),
        "{}",
        too_big.message
    );
    let dynamic: Api<DynamicObject> =
        Api::default_namespaced_with(double.client(), &ResourceKind::of_crd::<Gadget>().api_resource());
    let mut extra = DynamicObject::new("extra", &ResourceKind::of_crd::<Gadget>().api_resource());
    extra.data = json!({"spec": {"size": 2, "bogus": true}, "junk": 1});
    let pruned = dynamic.create(&PostParams::default(), &extra).await.unwrap();
    assert_eq!(pruned.data, json!({"spec": {"size": 2}}));
    dynamic.delete("extra", &DeleteParams::default()).await.unwrap();
    let missing_size = api_err(
        dynamic
            .create(&PostParams::default(), &{
                let mut o = extra.clone();
                o.data = json!({"spec": {"label": "x"}});
                o
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(
        missing_size.message,
        "Gadget.example.io \"extra\" is invalid: spec.size: Required value"
    );
    double.clear_requests();

    let shared = Arc::new(api.clone());
    let controller = tokio::spawn(
        Controller::new(api.clone(), watcher::Config::default())
            .run(
                reconcile_gadget,
                |_, _, _| Action::requeue(Duration::from_millis(100)),
                shared,
            )
            .for_each(|_| async {}),
    );

    api.create(
        &PostParams::default(),
        &Gadget::new(
            "g1",
            GadgetSpec {
                size: 3,
                label: Some("first".into()),
            },
        ),
    )
    .await
    .unwrap();
    let ready = double
        .wait_for("gadgets", NS, "g1", STEP, |o| {
            o.is_some_and(|o| o["status"]["phase"] == "Ready")
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ready["status"], json!({"phase": "Ready", "observedSize": 3}));
    assert_eq!(ready["metadata"]["finalizers"], json!([GADGET_FINALIZER]));
    assert_eq!(ready["metadata"]["generation"], 1);
    // The controller reconciles again after its own writes, but finds nothing to do; the writes
    // settle at create + add finalizer + status.
    let settled = double
        .wait_until(Duration::from_millis(500), |d| {
            (d.count_writes(|_| true) > 3).then_some(())
        })
        .await;
    assert!(settled.is_none(), "unexpected writes: {:#?}", double.writes());
    assert_eq!(
        double
            .writes()
            .iter()
            .map(|w| (w.verb, w.patch_type, w.subresource.clone()))
            .collect::<Vec<_>>(),
        [
            (Verb::Create, None, None),
            (Verb::Patch, Some(PatchType::Json), None),
            (Verb::Patch, Some(PatchType::Apply), Some("status".to_owned())),
        ]
    );

    // CEL transition rule: spec is immutable.
    let immutable = api_err(
        api.patch(
            "g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 4}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(immutable.code, 422);
    assert_eq!(
        immutable.message,
        "Gadget.example.io \"g1\" is invalid: <nil>: Invalid value: \"object\": spec is immutable"
    );

    // Deletion runs the cleanup, removes the finalizer, and the object goes away.
    api.delete("g1", &DeleteParams::default()).await.unwrap();
    double
        .wait_for("gadgets", NS, "g1", STEP, |o| o.is_none())
        .await
        .unwrap();
    assert_eq!(
        double.count_writes(|w| w.verb == Verb::Patch && w.patch_type == Some(PatchType::Json)),
        2
    );
    controller.abort();
}

// --- what a real apiserver refuses: unbounded CEL rules, duplicate list keys --------------------

/// A CRD of `example.io/v1 Thing` with this schema.
fn thing_crd(schema: Value) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.io"},
        "spec": {"group": "example.io", "scope": "Namespaced",
                 "names": {"kind": "Thing", "plural": "things", "singular": "thing"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": schema}}]},
    })
}

/// A spec with a list of named items, unique by name, and a CEL rule walking it.
fn thing_schema(bounded: bool) -> Value {
    let mut name = json!({"type": "string", "pattern": "^[a-z]+$"});
    let mut items = json!({"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
    "items": {"type": "object", "required": ["name"], "properties": {
        "name": name.clone(),
        "tags": {"type": "array", "x-kubernetes-list-type": "set", "maxItems": 4,
                 "items": {"type": "string", "maxLength": 8}},
        "payload": {"x-kubernetes-preserve-unknown-fields": true},
    }}});
    if bounded {
        name["maxLength"] = json!(16);
        items["maxItems"] = json!(4);
        items["items"]["properties"]["name"] = name;
    }
    json!({"type": "object", "properties": {"spec": {
        "type": "object", "properties": {"items": items},
        "x-kubernetes-validations": [{"rule": "self.items.all(i, i.name != 'forbidden')", "message": "no"}],
    }}})
}

#[tokio::test]
async fn a_crd_with_a_cel_rule_over_unbounded_fields_is_refused() {
    let double = KubeDouble::start(&[ResourceKind::crds()]).await;
    let crds: Api<DynamicObject> = Api::all_with(double.client(), &ResourceKind::crds().api_resource());
    let crd = |schema| serde_json::from_value::<DynamicObject>(thing_crd(schema)).expect("a CRD");
    let refused = api_err(
        crds.create(&PostParams::default(), &crd(thing_schema(false)))
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code, 422);
    assert_eq!(refused.reason, "Invalid");
    assert_eq!(
        refused.message,
        "CustomResourceDefinition.apiextensions.k8s.io \"things.example.io\" is invalid: \
         spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule: Forbidden: \
         estimated rule cost exceeds budget: properties[items], properties[items].items.properties[name] unbounded \
         (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and \
         strings are declared)"
    );
    // Bounded (the payload, invisible to CEL, needs no bound), it is accepted.
    crds.create(&PostParams::default(), &crd(thing_schema(true)))
        .await
        .unwrap();

    // Registered in the test itself, it is a set-up error.
    let unbounded = std::panic::catch_unwind(|| {
        ResourceKind::new("example.io", "v1", "Thing", "things").with_schema(thing_schema(false))
    });
    let message = unbounded.expect_err("refused").downcast::<String>().expect("a message");
    assert!(message.contains("estimated rule cost exceeds budget"), "{message}");
    let unbounded_gadget = std::panic::catch_unwind(|| {
        let mut crd = <Gadget as kube::CustomResourceExt>::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .expect("schema");
        let spec = schema
            .properties
            .as_mut()
            .and_then(|p| p.get_mut("spec"))
            .expect("spec");
        spec.properties
            .as_mut()
            .expect("spec fields")
            .get_mut("label")
            .expect("label")
            .max_length = None;
        ResourceKind::from_crd(&crd)
    });
    let message = unbounded_gadget
        .expect_err("refused")
        .downcast::<String>()
        .expect("a message");
    assert!(
        message.contains(
            "openAPIV3Schema.x-kubernetes-validations[0].rule: Forbidden: estimated rule cost exceeds budget: \
             properties[spec].properties[label] unbounded"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn list_type_keys_and_string_patterns_are_enforced() {
    let things = ResourceKind::new("example.io", "v1", "Thing", "things").with_schema(thing_schema(true));
    let double = KubeDouble::start(std::slice::from_ref(&things)).await;
    let api: Api<DynamicObject> = Api::namespaced_with(double.client(), NS, &things.api_resource());
    let thing = |items: Value| {
        let mut obj = DynamicObject::new("t", &things.api_resource()).within(NS);
        obj.data = json!({"spec": {"items": items}});
        obj
    };
    let message = |items: Value| {
        let api = api.clone();
        async move { api_err(api.create(&PostParams::default(), &thing(items)).await.unwrap_err()).message }
    };
    let prefix = "Thing.example.io \"t\" is invalid: ";
    assert_eq!(
        message(json!([{"name": "a"}, {"name": "b"}, {"name": "a"}])).await,
        format!("{prefix}spec.items[2]: Duplicate value: {{\"name\":\"a\"}}")
    );
    assert_eq!(
        message(json!([{"name": "a", "tags": ["x", "y", "x"]}])).await,
        format!("{prefix}spec.items[0].tags[2]: Duplicate value: \"x\"")
    );
    assert_eq!(
        message(json!([{"name": "A1"}])).await,
        format!(
            "{prefix}spec.items[0].name: Invalid value: \"A1\": spec.items[0].name in body should match '^[a-z]+$'"
        )
    );
    // CEL still runs after the schema checks.
    assert_eq!(
        message(json!([{"name": "forbidden"}])).await,
        format!("{prefix}spec: Invalid value: \"object\": no")
    );
    // Distinct keys, a payload of any shape: accepted.
    let created = api
        .create(
            &PostParams::default(),
            &thing(json!([{"name": "a", "tags": ["x", "y"], "payload": {"any": [1]}}, {"name": "b"}])),
        )
        .await
        .unwrap();
    assert_eq!(created.data["spec"]["items"][1]["name"], "b");
}
