//! The generated CRDs: committed files match, shape is right, and the CEL rules reject what they
//! must (evaluated with kube's client-side CEL validator, as the API server would).

use std::path::Path;

use kube::CustomResourceExt;
use kube::core::cel::validate_cel_update;
use kubetx::operator::crd::{Msg, Saga, Tcc, crd_files};
use serde_json::{Value, json};

#[test]
fn committed_crds_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, generated) in crd_files().expect("CRDs render") {
        for dir in ["crds", "charts/kubetx/crds"] {
            let path = root.join(dir).join(&name);
            if dir.starts_with("charts") && !root.join(dir).exists() {
                continue;
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == generated,
                "{} is out of date: run `cargo run -- crd --out-dir {dir}`",
                path.display()
            );
        }
    }
}

#[test]
fn crds_have_group_version_names_columns_and_status() {
    for (crd, plural, short) in [
        (Saga::crd(), "sagas", "sg"),
        (Tcc::crd(), "tccs", "tcc"),
        (Msg::crd(), "msgs", "msg"),
    ] {
        assert_eq!(crd.spec.group, "kubetx.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&[short.to_owned()][..]));
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["kubetx".to_owned()][..]));
        assert_eq!(crd.spec.versions.len(), 1);
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<(&str, &str)> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("Phase", ".status.phase"),
                ("Progress", ".status.progress"),
                ("Retries", ".status.retries"),
                ("Age", ".metadata.creationTimestamp"),
                ("Message", ".status.message"),
            ]
        );
        let schema = serde_json::to_value(&version.schema).expect("schema");
        let conditions = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    }
}

fn saga(spec: Value) -> Saga {
    serde_json::from_value(json!({
        "apiVersion": "kubetx.io/v1alpha1", "kind": "Saga",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": spec,
    }))
    .expect("saga parses")
}

fn step(name: &str, depends_on: &[&str]) -> Value {
    json!({"name": name, "action": {"url": format!("http://bank/{name}")}, "dependsOn": depends_on})
}

fn rejection(result: Result<(), impl std::fmt::Debug>) -> String {
    format!("{:?}", result.expect_err("the rule rejects it"))
}

#[test]
fn cel_rules_reject_invalid_sagas_with_precise_messages() {
    let valid = saga(json!({"steps": [step("out", &[]), step("in", &["out"])]}));
    assert!(validate_cel_update(&valid, &valid).is_ok());

    let duplicate = saga(json!({"steps": [step("out", &[]), step("out", &[])]}));
    assert!(rejection(validate_cel_update(&duplicate, &duplicate)).contains("step names must be unique"));

    let dangling = saga(json!({"steps": [step("out", &["nowhere"])]}));
    assert!(rejection(validate_cel_update(&dangling, &dangling)).contains("dependsOn must name steps"));

    let ftp = saga(json!({"steps": [{"name": "a", "action": {"url": "ftp://bank/a"}}]}));
    assert!(rejection(validate_cel_update(&ftp, &ftp)).contains("url must start with http:// or https://"));

    let both = saga(json!({"steps": [{"name": "a", "action": {
        "url": "http://bank/a", "service": {"name": "bank"}}}]}));
    assert!(rejection(validate_cel_update(&both, &both)).contains("exactly one of url or service"));

    let changed = saga(json!({"steps": [step("out", &[]), step("in", &[])]}));
    assert!(rejection(validate_cel_update(&changed, &valid)).contains("spec is immutable"));
}

#[test]
fn msg_may_only_go_from_prepared_to_submitted() {
    let msg = |submitted: bool| -> Msg {
        serde_json::from_value(json!({
            "apiVersion": "kubetx.io/v1alpha1", "kind": "Msg",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": {"submitted": submitted, "queryPrepared": {"url": "http://bank/query"},
                     "steps": [{"name": "in", "action": {"url": "http://bank/in"}}]},
        }))
        .expect("msg parses")
    };
    assert!(validate_cel_update(&msg(true), &msg(false)).is_ok());
    assert!(rejection(validate_cel_update(&msg(false), &msg(true))).contains("cannot be un-submitted"));
}

#[test]
fn tcc_branch_names_are_unique() {
    let branch = json!({"name": "a", "try": {"url": "http://bank/try"}, "confirm": {"url": "http://bank/c"},
                        "cancel": {"url": "http://bank/x"}});
    let tcc: Tcc = serde_json::from_value(json!({
        "apiVersion": "kubetx.io/v1alpha1", "kind": "Tcc",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {"branches": [branch.clone(), branch]},
    }))
    .expect("tcc parses");
    assert!(rejection(validate_cel_update(&tcc, &tcc)).contains("branch names must be unique"));
}

#[test]
fn example_manifests_are_valid_resources() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        let value: Value = serde_yaml::from_str(&text).expect("valid YAML");
        let result = match value["kind"].as_str() {
            Some("Saga") => {
                let saga: Saga = serde_json::from_value(value).expect("a Saga");
                validate_cel_update(&saga, &saga)
            }
            Some("Tcc") => {
                let tcc: Tcc = serde_json::from_value(value).expect("a Tcc");
                validate_cel_update(&tcc, &tcc)
            }
            Some("Msg") => {
                let msg: Msg = serde_json::from_value(value).expect("a Msg");
                validate_cel_update(&msg, &msg)
            }
            other => panic!("{}: unexpected kind {other:?}", path.display()),
        };
        assert!(result.is_ok(), "{}: {result:?}", path.display());
        checked += 1;
    }
    assert_eq!(checked, 5);
}
