//! The generated CRDs: committed files match, shape is right, and the CEL rules reject what they
//! must (evaluated with kube's client-side CEL validator, as the API server would).

use std::path::Path;

use kube::CustomResourceExt;
use kube::core::cel::validate_cel_update;
use kubetx::operator::crd::{Msg, Saga, Tcc, all_crds, crd_files};
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
                ("GID", ".status.gid"),
            ]
        );
        let priorities: Vec<i32> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.priority.unwrap_or(0))
            .collect();
        assert_eq!(
            priorities,
            [0, 0, 0, 0, 0, 1],
            "only GID is hidden from the default view"
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

    // Unique names and dangling `dependsOn` are no CEL rules (they would be quadratic): the
    // list types below and the controller refuse them.
    let dangling = saga(json!({"steps": [step("out", &["nowhere"])]}));
    assert!(validate_cel_update(&dangling, &dangling).is_ok());

    let ftp = saga(json!({"steps": [{"name": "a", "action": {"url": "ftp://bank/a"}}]}));
    assert!(
        rejection(validate_cel_update(&ftp, &ftp))
            .contains("url must start with http://, https://, grpc:// or grpcs://")
    );
    let etcd = saga(json!({"steps": [{"name": "a", "action": {"url": "etcd://127.0.0.1:2379/busi/busi.Busi/A"}}]}));
    assert!(rejection(validate_cel_update(&etcd, &etcd)).contains("url must start with"));
    let grpc = saga(
        json!({"steps": [{"name": "a", "action": {"url": "grpc://bank.svc:50051/busi.Busi/A"},
        "payloadBase64": "CB4SAnUx"}]}),
    );
    assert!(validate_cel_update(&grpc, &grpc).is_ok());

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

/// The schema node at `path` (property names; `[]` steps into `items`) of a CRD's
/// `openAPIV3Schema`.
fn schema_at(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    path: &[&str],
) -> Value {
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
    let mut node = &schema["openAPIV3Schema"];
    for key in path {
        node = if *key == "[]" {
            &node["items"]
        } else {
            &node["properties"][key]
        };
    }
    assert!(node.is_object(), "{}: no schema at {path:?}", crd.spec.names.kind);
    node.clone()
}

#[test]
fn names_are_unique_by_list_type_and_depends_on_is_a_set() {
    for (crd, lists) in [
        (Saga::crd(), ["steps", "headers"]),
        (Tcc::crd(), ["branches", "headers"]),
        (Msg::crd(), ["steps", "headers"]),
    ] {
        for list in lists {
            let node = schema_at(&crd, &["spec", list]);
            let kind = &crd.spec.names.kind;
            assert_eq!(node["x-kubernetes-list-type"], "map", "{kind} {list}");
            assert_eq!(node["x-kubernetes-list-map-keys"], json!(["name"]), "{kind} {list}");
            // A map key must be required (or defaulted) for the API server to accept the CRD.
            let required = node["items"]["required"].as_array().cloned().unwrap_or_default();
            assert!(required.contains(&json!("name")), "{kind} {list}: name is not required");
        }
    }
    let depends_on = schema_at(&Saga::crd(), &["spec", "steps", "[]", "dependsOn"]);
    assert_eq!(depends_on["x-kubernetes-list-type"], "set");
    assert_eq!(depends_on["items"]["type"], "string");
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
        let value: Value = yaml_serde::from_str(&text).expect("valid YAML");
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
    assert_eq!(checked, 6);
}

// ---------------------------------------------------------------------------------------------
// Bounds and CEL cost: a real API server refuses a CRD whose rules may cost more than its budget
// ---------------------------------------------------------------------------------------------

/// The `openAPIV3Schema` of every CRD, by kind.
fn schemas() -> Vec<(String, Value)> {
    all_crds()
        .iter()
        .map(|crd| {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
            (crd.spec.names.kind.clone(), schema["openAPIV3Schema"].clone())
        })
        .collect()
}

/// The children of a schema node, with the path suffix of each; `metadata`, `apiVersion` and
/// `kind` at the root are the API server's, not the schema's.
fn children(schema: &Value, root: bool) -> Vec<(String, &Value)> {
    let mut out: Vec<(String, &Value)> = schema["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| !(root && matches!(key.as_str(), "metadata" | "apiVersion" | "kind")))
        .map(|(key, sub)| (format!(".{key}"), sub))
        .collect();
    out.extend(schema.get("items").map(|items| ("[*]".to_owned(), items)));
    out.extend(
        schema
            .get("additionalProperties")
            .filter(|a| a.is_object())
            .map(|a| ("{*}".to_owned(), a)),
    );
    out
}

/// A typeless `x-kubernetes-preserve-unknown-fields` node (a payload): the API server does not
/// declare it to CEL at all, so no rule can read it.
fn invisible_to_cel(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"] == true && schema.get("type").is_none()
}

fn unbounded(schema: &Value, path: &str, root: bool, found: &mut Vec<String>) {
    if invisible_to_cel(schema) {
        return;
    }
    let missing = match schema["type"].as_str() {
        Some("array") if schema.get("maxItems").is_none() => Some("maxItems"),
        Some("string") if schema.get("maxLength").is_none() && schema.get("enum").is_none() => Some("maxLength"),
        _ if schema["additionalProperties"].is_object() && schema.get("maxProperties").is_none() => {
            Some("maxProperties")
        }
        _ => None,
    };
    found.extend(missing.map(|m| format!("{path}: no {m}")));
    for (suffix, child) in children(schema, root) {
        unbounded(child, &format!("{path}{suffix}"), false, found);
    }
}

#[test]
fn every_list_string_and_map_in_the_schemas_is_bounded() {
    // The walk finds what it must, and lets payloads and the API server's fields be.
    let mut found = Vec::new();
    let synthetic = json!({"type": "object", "properties": {
        "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
        "spec": {"type": "object", "properties": {
            "names": {"type": "array", "items": {"type": "string", "maxLength": 63}},
            "phase": {"type": "string", "enum": ["A", "B"]},
            "at": {"type": "string", "format": "date-time"},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
            "payload": {"x-kubernetes-preserve-unknown-fields": true},
        }},
    }});
    unbounded(&synthetic, "X", true, &mut found);
    found.sort();
    assert_eq!(
        found,
        [
            "X.spec.at: no maxLength",
            "X.spec.labels: no maxProperties",
            "X.spec.names: no maxItems"
        ]
    );

    found.clear();
    for (kind, schema) in schemas() {
        unbounded(&schema, &kind, true, &mut found);
    }
    assert!(found.is_empty(), "unbounded in the CRD schemas:\n{}", found.join("\n"));
}

/// Cost limit of one CEL expression in a real API server (k8s.io/apiserver/pkg/apis/cel
/// `PerCallLimit`).
const PER_CALL_LIMIT: f64 = 1_000_000.0;
/// Cost per byte of a string compared or traversed (cel-go's `StringTraversalCostFactor`).
const COST_PER_BYTE: f64 = 0.1;
/// Keys of a map without `propertyNames.maxLength`: a Kubernetes name at most.
const MAP_KEY_BOUND: f64 = 253.0;

/// Largest size in bytes of a value of this schema as CEL sees it (infinite when unbounded).
fn max_size(schema: &Value) -> f64 {
    if invisible_to_cel(schema) {
        return 0.0;
    }
    let number = |field: &str| schema[field].as_f64().unwrap_or(f64::INFINITY);
    match schema["type"].as_str() {
        Some("string") => match schema["enum"].as_array() {
            Some(values) if schema.get("maxLength").is_none() => {
                values.iter().map(|v| v.to_string().len() as f64).fold(0.0, f64::max)
            }
            _ => number("maxLength"),
        },
        Some("integer" | "number" | "boolean") => 20.0,
        Some("array") => number("maxItems") * (max_size(&schema["items"]) + 1.0),
        _ => {
            let fields: f64 = schema["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(key, sub)| key.len() as f64 + 3.0 + max_size(sub))
                .sum();
            let map = match schema.get("additionalProperties").filter(|a| a.is_object()) {
                Some(values) => {
                    let key = schema["propertyNames"]["maxLength"].as_f64().unwrap_or(MAP_KEY_BOUND);
                    number("maxProperties") * (key + 3.0 + max_size(values))
                }
                None => 0.0,
            };
            fields + map
        }
    }
}

/// Most elements of any list (or entries of any map) CEL can see in this subtree; 1 if none.
fn max_collection(schema: &Value) -> f64 {
    if invisible_to_cel(schema) {
        return 1.0;
    }
    let own = match schema["type"].as_str() {
        Some("array") => schema["maxItems"].as_f64().unwrap_or(f64::INFINITY),
        _ if schema["additionalProperties"].is_object() => schema["maxProperties"].as_f64().unwrap_or(f64::INFINITY),
        _ => 1.0,
    };
    children(schema, false)
        .into_iter()
        .map(|(_, child)| max_collection(child))
        .fold(own, f64::max)
}

/// What a rule at `node` can read: the fields it names as `self.<field>` / `oldSelf.<field>`
/// when it only ever reaches through a field of an object, else the whole node.
fn visible<'a>(node: &'a Value, rule: &str) -> Vec<&'a Value> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut fields = std::collections::BTreeMap::new();
    let mut rest = rule;
    while let Some(at) = rest.find(ident) {
        let end = rest[at..].find(|c| !ident(c)).map_or(rest.len(), |e| at + e);
        let word = &rest[at..end];
        rest = &rest[end..];
        if word != "self" && word != "oldSelf" {
            continue;
        }
        let field: String = rest
            .strip_prefix('.')
            .unwrap_or("")
            .chars()
            .take_while(|c| ident(*c))
            .collect();
        match node["properties"].get(&field) {
            Some(sub) => fields.insert(field, sub),
            None => return vec![node],
        };
    }
    fields.into_values().collect()
}

/// A conservative bound of the cost of `rule` at schema `node`: every byte it can see, compared
/// once per iteration of every comprehension it runs, each over the longest list in reach.
fn cost_bound(node: &Value, rule: &str) -> f64 {
    let seen = visible(node, rule);
    let size: f64 = seen.iter().map(|n| max_size(n)).sum();
    let longest = seen.iter().map(|n| max_collection(n)).fold(1.0, f64::max);
    let macros = [".all(", ".exists(", ".exists_one(", ".map(", ".filter("]
        .iter()
        .map(|m| rule.matches(m).count())
        .sum::<usize>();
    COST_PER_BYTE * size * longest.powi(macros as i32) + 100.0
}

/// Every `(path, rule, bound)` in a schema.
fn rule_costs(schema: &Value, path: &str, root: bool, out: &mut Vec<(String, String, f64)>) {
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        let text = rule["rule"].as_str().expect("a rule has rule text");
        out.push((path.to_owned(), text.to_owned(), cost_bound(schema, text)));
    }
    for (suffix, child) in children(schema, root) {
        rule_costs(child, &format!("{path}{suffix}"), false, out);
    }
}

#[test]
fn every_cel_rule_fits_the_cost_budget_with_a_10x_margin() {
    let limit = PER_CALL_LIMIT / 10.0;
    // The estimator refuses the quadratic rule that used to check dependsOn, so it cannot pass
    // for want of looking.
    let old_rule = "self.steps.all(s, !has(s.dependsOn) || s.dependsOn.all(d, self.steps.exists(t, t.name == d)))";
    let synthetic = json!({"type": "object", "properties": {"steps": {
        "type": "array", "maxItems": 64, "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 63},
            "dependsOn": {"type": "array", "maxItems": 16, "items": {"type": "string", "maxLength": 63}},
        }},
    }}});
    let old_cost = cost_bound(&synthetic, old_rule);
    assert!(old_cost > limit, "the old dependsOn rule is estimated at {old_cost}");
    // Nor the uniqueness rule.
    let unique = cost_bound(
        &synthetic,
        "self.steps.all(s, self.steps.exists_one(t, t.name == s.name))",
    );
    assert!(unique > limit, "the old uniqueness rule is estimated at {unique}");

    let mut costs = Vec::new();
    for (kind, schema) in schemas() {
        rule_costs(&schema, &kind, true, &mut costs);
    }
    assert!(costs.len() >= 10, "too few rules found: {costs:?}");
    let over: Vec<String> = costs
        .iter()
        .filter(|(_, _, bound)| *bound > limit)
        .map(|(path, rule, bound)| format!("{path}: {rule:?} may cost {bound:.0}"))
        .collect();
    assert!(
        over.is_empty(),
        "rules over {limit} (a tenth of the API server's limit):\n{}",
        over.join("\n")
    );
    let (path, rule, bound) = costs.iter().max_by(|a, b| a.2.total_cmp(&b.2)).expect("rules");
    eprintln!("largest CEL cost bound: {bound:.0} of {limit} ({path}: {rule})");
}
