//! The store contract: every `Store` method, conditional updates, unique conflicts, claiming
//! (concurrent claimers never get the same gid), lease fencing and retention, run against SQLite,
//! PostgreSQL and MariaDB/MySQL alike. The SQL servers come from `KUBETX_TEST_POSTGRES_URL` and
//! `KUBETX_TEST_MYSQL_URL`; without them those runs print SKIPPED and pass.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::db::{Backend, TestDb};
use kubetx::engine::BranchUpdate;
use kubetx::model::{Branch, BranchStatus, GlobalTrans, Millis, TransOptions, TransStatus, TransType};
use kubetx::store::{
    self, AddBranches, Guard, Lease, ListQuery, MAX_KEY_LEN, StatusChange, Store, StoreError, StoreKind, StoreOptions,
    Synchronous,
};
use tempfile::TempDir;

/// A store under test with whatever keeps its database alive.
struct Harness {
    store: Arc<dyn Store>,
    _dir: Option<TempDir>,
    _db: Option<TestDb>,
}

fn options(kind: StoreKind) -> StoreOptions {
    StoreOptions {
        kind,
        synchronous: Synchronous::Normal,
        migrate: true,
        max_connections: 8,
        acquire_timeout: Duration::from_secs(5),
        group_commit: 0,
    }
}

/// Opens a fresh store of `backend`; `None` (and a SKIPPED line) when its server is not set.
async fn harness(backend: Backend) -> Option<Harness> {
    harness_with(backend, 0).await
}

/// [`harness`] with PostgreSQL's group commit batching up to `group_commit` writes.
async fn harness_with(backend: Backend, group_commit: usize) -> Option<Harness> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("kubetx.db").display().to_string();
            let store = store::open(&options(StoreKind::Sqlite(path)))
                .await
                .expect("sqlite opens");
            Some(Harness {
                store,
                _dir: Some(dir),
                _db: None,
            })
        }
        Backend::Postgres | Backend::MySql | Backend::Redis => {
            if !common::db::available(backend, "the store contract suite") {
                return None;
            }
            let db = TestDb::create(backend).await;
            let kind = StoreKind::parse(&db.url, "").expect("url");
            let store = store::open(&StoreOptions {
                group_commit,
                ..options(kind)
            })
            .await
            .expect("store opens");
            Some(Harness {
                store,
                _dir: None,
                _db: Some(db),
            })
        }
    }
}

/// One test per backend for each contract check.
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        $(
            mod $check {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    if let Some(h) = harness(Backend::Sqlite).await {
                        super::$check(h.store.clone()).await;
                    }
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    if let Some(h) = harness(Backend::Postgres).await {
                        super::$check(h.store.clone()).await;
                    }
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres_group_commit() {
                    if let Some(h) = harness_with(Backend::Postgres, 64).await {
                        super::$check(h.store.clone()).await;
                    }
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn mysql() {
                    if let Some(h) = harness(Backend::MySql).await {
                        super::$check(h.store.clone()).await;
                    }
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn redis() {
                    if let Some(h) = harness(Backend::Redis).await {
                        super::$check(h.store.clone()).await;
                    }
                }
            }
        )*
    };
}

contract!(
    ping_answers,
    create_is_insert_if_absent_and_round_trips_every_field,
    keys_compare_byte_for_byte,
    change_status_is_conditional,
    add_branches_registers_idempotently_and_only_while_prepared,
    update_branches_requires_the_lease_and_the_status,
    a_status_change_records_branch_outcomes_only_when_it_happens,
    change_status_and_load_returns_the_changed_transaction_and_its_branches,
    claim_takes_parked_or_expired_only,
    claim_due_takes_due_work_earliest_first_under_a_lease,
    concurrent_claimers_never_get_the_same_gid,
    a_lost_lease_fences_every_write,
    extend_and_release_need_the_guard,
    list_filters_and_pages_newest_first,
    reset_cron_times_moves_only_parked_work,
    kv_is_versioned,
    purge_finished_deletes_old_finished_transactions_in_batches,
    invalid_input_is_refused_alike,
    large_values_round_trip,
    operator_leaders_write_under_their_own_identity,
);

const T0: Millis = 1_700_000_000_000;

fn global(gid: &str, status: TransStatus, next_cron_time: Millis) -> GlobalTrans {
    GlobalTrans {
        next_cron_time,
        ..common::saga_global(gid, status, T0)
    }
}

fn saga_branches(gid: &str) -> Vec<Branch> {
    vec![
        Branch::new(
            gid,
            "01",
            "compensate",
            "http://bank/out-revert",
            b"{\"a\":1}".to_vec(),
            T0,
        ),
        Branch::new(gid, "01", "action", "http://bank/out", b"{\"a\":1}".to_vec(), T0),
        Branch::new(
            gid,
            "02",
            "compensate",
            "http://bank/in-revert",
            b"{\"a\":2}".to_vec(),
            T0,
        ),
        Branch::new(gid, "02", "action", "http://bank/in", b"{\"a\":2}".to_vec(), T0),
    ]
}

async fn create(store: &dyn Store, gid: &str, status: TransStatus, next_cron_time: Millis) {
    assert!(
        store
            .create(&global(gid, status, next_cron_time), &saga_branches(gid))
            .await
            .expect("create"),
        "{gid} is new"
    );
}

async fn find(store: &dyn Store, gid: &str) -> GlobalTrans {
    store
        .find(gid)
        .await
        .expect("find")
        .unwrap_or_else(|| panic!("{gid} exists"))
}

fn lease(owner: &str, until: Millis) -> Lease {
    Lease {
        owner: owner.to_owned(),
        until,
    }
}

fn guard(gid: &str, owner: &str, status: TransStatus) -> Guard {
    Guard {
        gid: gid.to_owned(),
        owner: owner.to_owned(),
        status,
    }
}

fn update(branch_id: &str, op: &str, status: BranchStatus, at: Millis) -> BranchUpdate {
    BranchUpdate {
        id: 0,
        branch_id: branch_id.to_owned(),
        op: op.to_owned(),
        status,
        at,
    }
}

async fn ping_answers(store: Arc<dyn Store>) {
    store.ping().await.expect("ping");
}

async fn create_is_insert_if_absent_and_round_trips_every_field(store: Arc<dyn Store>) {
    let mut headers = BTreeMap::new();
    headers.insert("X-Trace".to_owned(), "t-1".to_owned());
    let mut g = global("gid-ünïcode-✓", TransStatus::Submitted, T0 + 5_000);
    g.trans_type = TransType::Msg;
    g.query_prepared = "http://bank/query".to_owned();
    g.custom_data = "{\"delay\":3}".to_owned();
    g.options = TransOptions {
        wait_result: true,
        timeout_to_fail: 60,
        retry_interval: 7,
        request_timeout: 2,
        branch_headers: headers,
        concurrent: true,
        retry_limit: 2,
    };
    g.owner = "replica-a".to_owned();
    g.result = "cmVzdWx0".to_owned();
    g.rollback_reason = "none yet".to_owned();
    g.ext_data = "{\"x\":1}".to_owned();
    g.finish_time = Some(T0 + 1);
    let mut branches = saga_branches(&g.gid);
    branches[1].bin_data = vec![0, 159, 146, 150, 255];
    branches[1].status = BranchStatus::Succeed;
    branches[1].finish_time = Some(T0 + 2);
    branches[3].rollback_time = Some(T0 + 3);
    assert!(store.create(&g, &branches).await.expect("create"));

    let stored = find(store.as_ref(), &g.gid).await;
    assert!(stored.id > 0);
    assert_eq!(
        GlobalTrans {
            id: 0,
            ..stored.clone()
        },
        g
    );
    let rows = store.branches(&g.gid).await.expect("branches");
    assert_eq!(rows.len(), branches.len());
    let mut last_id = 0;
    for (row, want) in rows.iter().zip(&branches) {
        assert!(row.id > last_id, "insertion order");
        last_id = row.id;
        assert_eq!(&Branch { id: 0, ..row.clone() }, want);
    }

    // Unique conflict: a second create of the gid changes nothing.
    let mut other = global(&g.gid, TransStatus::Prepared, T0);
    other.trans_type = TransType::Tcc;
    assert!(!store.create(&other, &[]).await.expect("create again"));
    assert_eq!(find(store.as_ref(), &g.gid).await, stored);
    assert_eq!(store.branches(&g.gid).await.expect("branches").len(), 4);

    assert_eq!(store.find("no-such-gid").await.expect("find"), None);
    assert!(store.branches("no-such-gid").await.expect("branches").is_empty());

    // Many concurrent creates of one gid: exactly one wins.
    let wins = futures::future::join_all((0..8).map(|_| {
        let store = Arc::clone(&store);
        async move {
            store
                .create(
                    &global("contended", TransStatus::Submitted, T0),
                    &saga_branches("contended"),
                )
                .await
                .expect("create")
        }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{wins:?}");
    assert_eq!(store.branches("contended").await.expect("branches").len(), 4);
}

async fn keys_compare_byte_for_byte(store: Arc<dyn Store>) {
    for gid in ["Case", "case", "trail", "trail ", "e\u{301}", "\u{e9}"] {
        create(store.as_ref(), gid, TransStatus::Submitted, T0).await;
    }
    for gid in ["Case", "case", "trail", "trail ", "e\u{301}", "\u{e9}"] {
        assert_eq!(find(store.as_ref(), gid).await.gid, gid);
    }
    assert!(store.kv_create("topics", "Topic", "[]", T0).await.expect("kv"));
    assert!(store.kv_create("topics", "topic", "[]", T0).await.expect("kv"));
    assert!(store.kv_create("topics", "topic ", "[]", T0).await.expect("kv"));
    assert_eq!(
        store.kv_get("topics", "topic ").await.expect("kv").map(|e| e.key),
        Some("topic ".to_owned())
    );
}

async fn change_status_is_conditional(store: Arc<dyn Store>) {
    create(store.as_ref(), "cs", TransStatus::Prepared, T0).await;
    // Wrong expected status: nothing happens.
    let wrong = StatusChange::new("cs", TransStatus::Submitted, TransStatus::Aborting, T0 + 1);
    assert!(!store.change_status(&wrong).await.expect("change"));
    assert!(
        !store
            .change_status(&StatusChange::new(
                "nope",
                TransStatus::Prepared,
                TransStatus::Submitted,
                T0
            ))
            .await
            .expect("change")
    );
    // Right status, taking the lease in the same write, replacing custom_data.
    let mut submit = StatusChange::new("cs", TransStatus::Prepared, TransStatus::Submitted, T0 + 10);
    submit.lease = Some(lease("a", T0 + 30_000));
    submit.custom_data = Some("{\"delay\":5}".to_owned());
    assert!(store.change_status(&submit).await.expect("submit"));
    let g = find(store.as_ref(), "cs").await;
    assert_eq!(
        (
            g.status,
            g.owner.as_str(),
            g.next_cron_time,
            g.update_time,
            g.custom_data.as_str()
        ),
        (TransStatus::Submitted, "a", T0 + 30_000, T0 + 10, "{\"delay\":5}")
    );
    // The same change again fails: the status moved.
    assert!(!store.change_status(&submit).await.expect("again"));
    // Requiring the lease: another owner cannot.
    let mut abort = StatusChange::new("cs", TransStatus::Submitted, TransStatus::Aborting, T0 + 20);
    abort.owner = Some("b".to_owned());
    abort.rollback_reason = Some("refused".to_owned());
    assert!(!store.change_status(&abort).await.expect("abort by b"));
    abort.owner = Some("a".to_owned());
    assert!(store.change_status(&abort).await.expect("abort by a"));
    let g = find(store.as_ref(), "cs").await;
    assert_eq!(
        (g.status, g.rollback_reason.as_str(), g.owner.as_str()),
        (TransStatus::Aborting, "refused", "a")
    );
    // Absent optional fields keep their values; finishing clears the lease and records the time.
    let mut fail = StatusChange::new("cs", TransStatus::Aborting, TransStatus::Failed, T0 + 30);
    fail.owner = Some("a".to_owned());
    assert!(store.change_status(&fail).await.expect("fail"));
    let g = find(store.as_ref(), "cs").await;
    assert_eq!(
        (
            g.status,
            g.owner.as_str(),
            g.rollback_time,
            g.finish_time,
            g.rollback_reason.as_str()
        ),
        (TransStatus::Failed, "", Some(T0 + 30), None, "refused")
    );
    // Succeed records finish_time and a result.
    create(store.as_ref(), "cs2", TransStatus::Submitted, T0).await;
    let mut done = StatusChange::new("cs2", TransStatus::Submitted, TransStatus::Succeed, T0 + 40);
    done.result = Some("b2s=".to_owned());
    assert!(store.change_status(&done).await.expect("succeed"));
    let g = find(store.as_ref(), "cs2").await;
    assert_eq!(
        (g.finish_time, g.result.as_str(), g.update_time),
        (Some(T0 + 40), "b2s=", T0 + 40)
    );
}

async fn add_branches_registers_idempotently_and_only_while_prepared(store: Arc<dyn Store>) {
    let tcc = |branch_id: &str, data: &[u8]| {
        vec![
            Branch::new("tcc", branch_id, "cancel", "http://bank/cancel", data.to_vec(), T0),
            Branch::new("tcc", branch_id, "confirm", "http://bank/confirm", data.to_vec(), T0),
        ]
    };
    assert_eq!(
        store.add_branches("tcc", &tcc("01", b"x")).await.expect("add"),
        AddBranches::WrongStatus(None)
    );
    store
        .create(&global("tcc", TransStatus::Prepared, T0), &[])
        .await
        .expect("create");
    assert_eq!(
        store.add_branches("tcc", &tcc("01", b"x")).await.expect("add"),
        AddBranches::Added
    );
    assert_eq!(
        store.add_branches("tcc", &tcc("01", b"x")).await.expect("retry"),
        AddBranches::AlreadyRegistered
    );
    assert!(matches!(
        store.add_branches("tcc", &tcc("01", b"other")).await.expect("conflict"),
        AddBranches::Conflict(_)
    ));
    // A registration with a row stored alike and a row not stored adds the missing row only; one
    // with a row stored with other content adds nothing, not even its missing rows.
    let [cancel_01, _] = <[Branch; 2]>::try_from(tcc("01", b"x")).expect("two rows");
    let [cancel_40, _] = <[Branch; 2]>::try_from(tcc("40", b"w")).expect("two rows");
    let [cancel_41, _] = <[Branch; 2]>::try_from(tcc("41", b"w")).expect("two rows");
    let [_, confirm_01_other] = <[Branch; 2]>::try_from(tcc("01", b"other")).expect("two rows");
    assert_eq!(
        store
            .add_branches("tcc", &[cancel_01, cancel_40])
            .await
            .expect("partly new"),
        AddBranches::Added
    );
    assert!(matches!(
        store
            .add_branches("tcc", &[cancel_41, confirm_01_other])
            .await
            .expect("partly conflicting"),
        AddBranches::Conflict(_)
    ));
    let stored: Vec<(String, String)> = store
        .branches("tcc")
        .await
        .expect("branches")
        .into_iter()
        .map(|b| (b.branch_id, b.op))
        .collect();
    let key = |id: &str, op: &str| (id.to_owned(), op.to_owned());
    assert_eq!(stored, [key("01", "cancel"), key("01", "confirm"), key("40", "cancel")]);
    // Concurrent registrations of distinct branches all land.
    let results = futures::future::join_all((2..10).map(|i| {
        let store = Arc::clone(&store);
        let rows = tcc(&format!("{i:02}"), b"y");
        async move { store.add_branches("tcc", &rows).await.expect("add") }
    }))
    .await;
    assert!(results.iter().all(|r| *r == AddBranches::Added), "{results:?}");
    // Concurrent registrations of one branch: one adds, the others see it registered.
    let results = futures::future::join_all((0..6).map(|_| {
        let store = Arc::clone(&store);
        let rows = tcc("20", b"z");
        async move { store.add_branches("tcc", &rows).await.expect("add") }
    }))
    .await;
    assert_eq!(
        results.iter().filter(|r| **r == AddBranches::Added).count(),
        1,
        "{results:?}"
    );
    assert_eq!(store.branches("tcc").await.expect("branches").len(), 2 * 10 + 1);

    let submit = StatusChange::new("tcc", TransStatus::Prepared, TransStatus::Submitted, T0 + 1);
    assert!(store.change_status(&submit).await.expect("submit"));
    assert_eq!(
        store.add_branches("tcc", &tcc("30", b"x")).await.expect("late"),
        AddBranches::WrongStatus(Some(TransStatus::Submitted))
    );
}

async fn update_branches_requires_the_lease_and_the_status(store: Arc<dyn Store>) {
    let mut g = global("ub", TransStatus::Submitted, T0 + 30_000);
    g.owner = "a".to_owned();
    store.create(&g, &saga_branches("ub")).await.expect("create");
    let updates = [
        update("01", "action", BranchStatus::Succeed, T0 + 5),
        update("02", "action", BranchStatus::Failed, T0 + 6),
    ];
    assert!(
        !store
            .update_branches(&guard("ub", "b", TransStatus::Submitted), &updates, T0 + 7)
            .await
            .expect("wrong owner")
    );
    assert!(
        !store
            .update_branches(&guard("ub", "a", TransStatus::Aborting), &updates, T0 + 7)
            .await
            .expect("wrong status")
    );
    assert!(
        store
            .branches("ub")
            .await
            .expect("branches")
            .iter()
            .all(|b| b.status == BranchStatus::Prepared)
    );
    assert!(
        store
            .update_branches(&guard("ub", "a", TransStatus::Submitted), &updates, T0 + 7)
            .await
            .expect("update")
    );
    let rows = store.branches("ub").await.expect("branches");
    let get = |branch_id: &str, op: &str| {
        rows.iter()
            .find(|b| b.branch_id == branch_id && b.op == op)
            .cloned()
            .expect("row")
    };
    let out = get("01", "action");
    assert_eq!(
        (out.status, out.finish_time, out.update_time),
        (BranchStatus::Succeed, Some(T0 + 5), T0 + 7)
    );
    let inn = get("02", "action");
    assert_eq!(
        (inn.status, inn.rollback_time, inn.finish_time),
        (BranchStatus::Failed, Some(T0 + 6), None)
    );
    assert_eq!(get("01", "compensate").status, BranchStatus::Prepared);
}

async fn a_status_change_records_branch_outcomes_only_when_it_happens(store: Arc<dyn Store>) {
    let mut g = global("sb", TransStatus::Submitted, T0 + 30_000);
    g.owner = "a".to_owned();
    store.create(&g, &saga_branches("sb")).await.expect("create");
    let change = |owner: &str, from: TransStatus| {
        let mut change = StatusChange::new("sb", from, TransStatus::Succeed, T0 + 9);
        change.owner = Some(owner.to_owned());
        change.branch_updates = vec![
            update("01", "action", BranchStatus::Succeed, T0 + 5),
            update("02", "action", BranchStatus::Succeed, T0 + 8),
        ];
        change
    };
    let statuses = || async {
        let rows = store.branches("sb").await.expect("branches");
        rows.iter()
            .map(|b| (b.branch_id.clone(), b.op.clone(), b.status))
            .collect::<Vec<_>>()
    };
    let before = statuses().await;
    assert!(
        !store
            .change_status(&change("b", TransStatus::Submitted))
            .await
            .expect("wrong owner")
    );
    assert!(
        !store
            .change_status(&change("a", TransStatus::Aborting))
            .await
            .expect("wrong status")
    );
    assert_eq!(statuses().await, before, "a refused change records no outcome");

    assert!(
        store
            .change_status(&change("a", TransStatus::Submitted))
            .await
            .expect("change")
    );
    let done = find(store.as_ref(), "sb").await;
    assert_eq!((done.status, done.finish_time), (TransStatus::Succeed, Some(T0 + 9)));
    let rows = store.branches("sb").await.expect("branches");
    let get = |branch_id: &str, op: &str| {
        rows.iter()
            .find(|b| b.branch_id == branch_id && b.op == op)
            .cloned()
            .expect("row")
    };
    let step2 = get("02", "action");
    assert_eq!(
        (step2.status, step2.finish_time, step2.update_time),
        (BranchStatus::Succeed, Some(T0 + 8), T0 + 9)
    );
    assert_eq!(get("01", "action").status, BranchStatus::Succeed);
    assert_eq!(get("01", "compensate").status, BranchStatus::Prepared);
    // Replaying the same change is refused and changes nothing.
    assert!(
        !store
            .change_status(&change("a", TransStatus::Submitted))
            .await
            .expect("replay")
    );
}

async fn change_status_and_load_returns_the_changed_transaction_and_its_branches(store: Arc<dyn Store>) {
    let mut g = global("cl", TransStatus::Prepared, T0 + 30_000);
    g.trans_type = TransType::Msg;
    store.create(&g, &saga_branches("cl")).await.expect("create");
    let change = |trans_type: TransType, from: TransStatus| {
        let mut change = StatusChange::new("cl", from, TransStatus::Submitted, T0 + 9);
        change.trans_type = Some(trans_type);
        change.lease = Some(lease("me", T0 + 60_000));
        change.custom_data = Some(r#"{"delay":3}"#.to_owned());
        change
    };
    assert_eq!(
        store
            .change_status_and_load(&change(TransType::Tcc, TransStatus::Prepared))
            .await
            .expect("wrong mode"),
        None
    );
    assert_eq!(
        store
            .change_status_and_load(&change(TransType::Msg, TransStatus::Submitted))
            .await
            .expect("wrong status"),
        None
    );
    assert_eq!(
        find(store.as_ref(), "cl").await.status,
        TransStatus::Prepared,
        "refused: unchanged"
    );

    let (loaded, branches) = store
        .change_status_and_load(&change(TransType::Msg, TransStatus::Prepared))
        .await
        .expect("change")
        .expect("changed");
    assert_eq!(loaded, find(store.as_ref(), "cl").await, "the row as stored");
    assert_eq!(
        (
            loaded.status,
            loaded.owner.as_str(),
            loaded.next_cron_time,
            loaded.custom_data.as_str()
        ),
        (TransStatus::Submitted, "me", T0 + 60_000, r#"{"delay":3}"#)
    );
    assert_eq!(
        branches,
        store.branches("cl").await.expect("branches"),
        "every row, in order"
    );
    assert_eq!(branches.len(), saga_branches("cl").len());
    // A plain status change names the mode too.
    let mut wrong_mode = StatusChange::new("cl", TransStatus::Submitted, TransStatus::Succeed, T0 + 10);
    wrong_mode.trans_type = Some(TransType::Saga);
    assert!(!store.change_status(&wrong_mode).await.expect("wrong mode"));
}

async fn claim_takes_parked_or_expired_only(store: Arc<dyn Store>) {
    let now = T0 + 100_000;
    // Parked (no owner), due later: claimable (a submit hurries it along).
    create(store.as_ref(), "parked", TransStatus::Submitted, now + 60_000).await;
    assert!(
        store
            .claim("parked", &lease("a", now + 30_000), now)
            .await
            .expect("claim")
    );
    let g = find(store.as_ref(), "parked").await;
    assert_eq!((g.owner.as_str(), g.next_cron_time), ("a", now + 30_000));
    // Leased and unexpired: not claimable by anyone, the holder included.
    assert!(
        !store
            .claim("parked", &lease("b", now + 30_000), now + 1)
            .await
            .expect("claim")
    );
    assert!(
        !store
            .claim("parked", &lease("a", now + 30_000), now + 1)
            .await
            .expect("claim")
    );
    // Expired: claimable.
    assert!(
        store
            .claim("parked", &lease("b", now + 90_000), now + 30_000)
            .await
            .expect("claim")
    );
    assert_eq!(find(store.as_ref(), "parked").await.owner, "b");
    // Finished and unknown: never.
    create(store.as_ref(), "done", TransStatus::Succeed, T0).await;
    assert!(!store.claim("done", &lease("a", now), now).await.expect("claim"));
    assert!(!store.claim("unknown", &lease("a", now), now).await.expect("claim"));
}

async fn claim_due_takes_due_work_earliest_first_under_a_lease(store: Arc<dyn Store>) {
    let now = T0 + 100_000;
    create(store.as_ref(), "due-3", TransStatus::Aborting, now - 1_000).await;
    create(store.as_ref(), "due-1", TransStatus::Submitted, now - 3_000).await;
    create(store.as_ref(), "due-2", TransStatus::Prepared, now - 2_000).await;
    create(store.as_ref(), "later", TransStatus::Submitted, now + 1_000).await;
    create(store.as_ref(), "finished", TransStatus::Succeed, now - 9_000).await;
    create(store.as_ref(), "failed", TransStatus::Failed, now - 9_000).await;

    let first = store.claim_due(&lease("a", now + 30_000), now, 2).await.expect("claim");
    assert_eq!(
        first.iter().cloned().collect::<HashSet<_>>(),
        HashSet::from(["due-1".to_owned(), "due-2".to_owned()])
    );
    for gid in &first {
        let g = find(store.as_ref(), gid).await;
        assert_eq!(
            (g.owner.as_str(), g.next_cron_time, g.update_time),
            ("a", now + 30_000, now)
        );
    }
    let second = store
        .claim_due(&lease("b", now + 30_000), now, 10)
        .await
        .expect("claim");
    assert_eq!(second, vec!["due-3".to_owned()]);
    assert!(
        store
            .claim_due(&lease("c", now + 30_000), now, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    // Leases expire: everything leased is due again, and what became due too.
    let later = now + 30_000;
    let third: HashSet<String> = store
        .claim_due(&lease("c", later + 30_000), later, 10)
        .await
        .expect("claim")
        .into_iter()
        .collect();
    assert_eq!(
        third,
        ["due-1", "due-2", "due-3", "later"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}

async fn concurrent_claimers_never_get_the_same_gid(store: Arc<dyn Store>) {
    const N: usize = 240;
    let now = T0 + 100_000;
    let rows: Vec<GlobalTrans> = (0..N)
        .map(|i| global(&format!("q-{i:03}"), TransStatus::Submitted, now - i as Millis))
        .collect();
    futures::future::join_all(rows.iter().map(|g| {
        let store = Arc::clone(&store);
        async move { store.create(g, &saga_branches(&g.gid)).await.expect("create") }
    }))
    .await;
    let claimers = (0..8).map(|c| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let owner = format!("claimer-{c}");
            let mut mine = Vec::new();
            loop {
                let got = store
                    .claim_due(&lease(&owner, now + 60_000), now, 7)
                    .await
                    .expect("claim");
                if got.is_empty() {
                    return (owner, mine);
                }
                mine.extend(got);
            }
        })
    });
    let results = futures::future::join_all(claimers).await;
    let mut seen = HashSet::new();
    for result in results {
        let (owner, gids) = result.expect("claimer");
        for gid in gids {
            assert!(seen.insert(gid.clone()), "{gid} was claimed twice");
            assert_eq!(
                find(store.as_ref(), &gid).await.owner,
                owner,
                "{gid}: the store names its claimer"
            );
        }
    }
    assert_eq!(seen.len(), N, "every due transaction was claimed once");
}

async fn a_lost_lease_fences_every_write(store: Arc<dyn Store>) {
    let now = T0 + 100_000;
    create(store.as_ref(), "fence", TransStatus::Submitted, now - 1).await;
    assert_eq!(
        store
            .claim_due(&lease("old", now + 10_000), now, 1)
            .await
            .expect("claim"),
        vec!["fence"]
    );
    // The old owner stalls past its lease; a new one takes over.
    let later = now + 10_000;
    assert_eq!(
        store
            .claim_due(&lease("new", later + 10_000), later, 1)
            .await
            .expect("takeover"),
        vec!["fence"]
    );
    let stale = guard("fence", "old", TransStatus::Submitted);
    let updates = [update("01", "action", BranchStatus::Succeed, later)];
    assert!(!store.update_branches(&stale, &updates, later).await.expect("update"));
    assert!(!store.extend_lease(&stale, later + 99_000).await.expect("extend"));
    assert!(!store.release(&stale, later + 5, 20, later).await.expect("release"));
    let mut finish = StatusChange::new("fence", TransStatus::Submitted, TransStatus::Succeed, later);
    finish.owner = Some("old".to_owned());
    assert!(!store.change_status(&finish).await.expect("finish"));
    let g = find(store.as_ref(), "fence").await;
    assert_eq!(
        (g.status, g.owner.as_str(), g.next_cron_time),
        (TransStatus::Submitted, "new", later + 10_000)
    );
    assert!(
        store
            .branches("fence")
            .await
            .expect("b")
            .iter()
            .all(|b| b.status == BranchStatus::Prepared)
    );
    // The new owner can.
    let current = guard("fence", "new", TransStatus::Submitted);
    assert!(store.update_branches(&current, &updates, later).await.expect("update"));
    finish.owner = Some("new".to_owned());
    assert!(store.change_status(&finish).await.expect("finish"));
}

async fn extend_and_release_need_the_guard(store: Arc<dyn Store>) {
    let now = T0 + 100_000;
    create(store.as_ref(), "lease", TransStatus::Submitted, now - 1).await;
    assert!(
        store
            .claim("lease", &lease("a", now + 10_000), now)
            .await
            .expect("claim")
    );
    let held = guard("lease", "a", TransStatus::Submitted);
    assert!(store.extend_lease(&held, now + 50_000).await.expect("extend"));
    assert_eq!(find(store.as_ref(), "lease").await.next_cron_time, now + 50_000);
    assert!(
        !store
            .extend_lease(&guard("lease", "a", TransStatus::Aborting), now)
            .await
            .expect("extend")
    );
    assert!(store.release(&held, now + 20_000, 20, now + 1).await.expect("release"));
    let g = find(store.as_ref(), "lease").await;
    assert_eq!(
        (g.owner.as_str(), g.next_cron_time, g.next_cron_interval, g.update_time),
        ("", now + 20_000, 20, now + 1)
    );
    // Released: the guard no longer holds.
    assert!(!store.release(&held, now, 10, now).await.expect("release again"));
    assert!(!store.extend_lease(&held, now).await.expect("extend"));
}

async fn list_filters_and_pages_newest_first(store: Arc<dyn Store>) {
    for i in 0..7 {
        let mut g = global(
            &format!("l-{i}"),
            if i % 2 == 0 {
                TransStatus::Succeed
            } else {
                TransStatus::Submitted
            },
            T0,
        );
        g.trans_type = if i < 4 { TransType::Saga } else { TransType::Msg };
        g.create_time = T0 + i * 1_000;
        assert!(store.create(&g, &[]).await.expect("create"));
    }
    let gids = |rows: Vec<GlobalTrans>| rows.into_iter().map(|g| g.gid).collect::<Vec<_>>();
    let page = |before_id, limit| ListQuery {
        before_id,
        limit,
        ..ListQuery::default()
    };
    let first = store.list(&page(None, 3)).await.expect("list");
    assert_eq!(gids(first.clone()), ["l-6", "l-5", "l-4"]);
    let second = store.list(&page(Some(first[2].id), 3)).await.expect("list");
    assert_eq!(gids(second.clone()), ["l-3", "l-2", "l-1"]);
    let third = store.list(&page(Some(second[2].id), 3)).await.expect("list");
    assert_eq!(gids(third), ["l-0"]);
    let filtered = store
        .list(&ListQuery {
            limit: 100,
            status: Some(TransStatus::Succeed),
            trans_type: Some(TransType::Saga),
            ..ListQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(gids(filtered), ["l-2", "l-0"]);
    let window = store
        .list(&ListQuery {
            limit: 100,
            created_from: Some(T0 + 2_000),
            created_to: Some(T0 + 4_000),
            ..ListQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(gids(window), ["l-4", "l-3", "l-2"]);
}

async fn reset_cron_times_moves_only_parked_work(store: Arc<dyn Store>) {
    let now = T0 + 100_000;
    create(store.as_ref(), "far-1", TransStatus::Submitted, now + 500_000).await;
    create(store.as_ref(), "far-2", TransStatus::Aborting, now + 600_000).await;
    create(store.as_ref(), "far-3", TransStatus::Prepared, now + 700_000).await;
    create(store.as_ref(), "near", TransStatus::Submitted, now + 1_000).await;
    create(store.as_ref(), "far-done", TransStatus::Succeed, now + 900_000).await;
    let mut leased = global("far-leased", TransStatus::Submitted, now + 800_000);
    leased.owner = "a".to_owned();
    store.create(&leased, &[]).await.expect("create");

    // One gid: only when parked.
    assert!(store.reset_next_cron_time("far-leased", now).await.expect("reset"));
    assert_eq!(find(store.as_ref(), "far-leased").await.next_cron_time, now + 800_000);
    assert!(!store.reset_next_cron_time("unknown", now).await.expect("reset"));

    // In bulk: parked, unfinished, scheduled after `after`; limited.
    let after = now + 100_000;
    let first = store.reset_cron_times(after, now, 2).await.expect("reset");
    assert_eq!(first, 2);
    let rest = store.reset_cron_times(after, now, 2).await.expect("reset");
    assert_eq!(rest, 1);
    assert_eq!(store.reset_cron_times(after, now, 2).await.expect("reset"), 0);
    for gid in ["far-1", "far-2", "far-3"] {
        assert_eq!(find(store.as_ref(), gid).await.next_cron_time, now, "{gid}");
    }
    assert_eq!(find(store.as_ref(), "near").await.next_cron_time, now + 1_000);
    assert_eq!(find(store.as_ref(), "far-done").await.next_cron_time, now + 900_000);
    assert_eq!(find(store.as_ref(), "far-leased").await.next_cron_time, now + 800_000);

    create(store.as_ref(), "single", TransStatus::Submitted, now + 500_000).await;
    assert!(store.reset_next_cron_time("single", now).await.expect("reset"));
    assert_eq!(find(store.as_ref(), "single").await.next_cron_time, now);
}

async fn kv_is_versioned(store: Arc<dyn Store>) {
    assert!(store.kv_create("topics", "orders", "[1]", T0).await.expect("create"));
    assert!(!store.kv_create("topics", "orders", "[2]", T0).await.expect("duplicate"));
    let entry = store.kv_get("topics", "orders").await.expect("get").expect("exists");
    assert_eq!(
        (
            entry.cat.as_str(),
            entry.key.as_str(),
            entry.value.as_str(),
            entry.version,
            entry.create_time
        ),
        ("topics", "orders", "[1]", 1, T0)
    );
    assert!(
        !store
            .kv_update("topics", "orders", "[3]", 2, T0 + 1)
            .await
            .expect("stale version")
    );
    assert!(
        store
            .kv_update("topics", "orders", "[3]", 1, T0 + 1)
            .await
            .expect("update")
    );
    let entry = store.kv_get("topics", "orders").await.expect("get").expect("exists");
    assert_eq!(
        (entry.value.as_str(), entry.version, entry.update_time),
        ("[3]", 2, T0 + 1)
    );
    assert!(
        !store
            .kv_update("topics", "orders", "[4]", 1, T0 + 2)
            .await
            .expect("lost race")
    );
    assert_eq!(store.kv_get("other", "orders").await.expect("get"), None);

    for i in 0..5 {
        assert!(
            store
                .kv_create("scan", &format!("k{i}"), "v", T0)
                .await
                .expect("create")
        );
    }
    let page = store.kv_scan("scan", 0, 3).await.expect("scan");
    assert_eq!(
        page.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["k0", "k1", "k2"]
    );
    let rest = store.kv_scan("scan", page[2].id, 3).await.expect("scan");
    assert_eq!(rest.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["k3", "k4"]);

    assert!(store.kv_delete("topics", "orders").await.expect("delete"));
    assert!(!store.kv_delete("topics", "orders").await.expect("delete again"));
    assert_eq!(store.kv_get("topics", "orders").await.expect("get"), None);
    assert!(
        store
            .kv_create("topics", "orders", "[5]", T0)
            .await
            .expect("create after delete")
    );
}

async fn purge_finished_deletes_old_finished_transactions_in_batches(store: Arc<dyn Store>) {
    let cutoff = T0 + 1_000_000;
    // Old finished: deleted with their branches.
    for i in 0..7 {
        let status = if i % 2 == 0 {
            TransStatus::Succeed
        } else {
            TransStatus::Failed
        };
        let mut g = global(&format!("old-{i}"), status, T0);
        g.update_time = cutoff - 10_000 + i;
        assert!(store.create(&g, &saga_branches(&g.gid)).await.expect("create"));
    }
    // Finished recently, unfinished of any age: kept.
    let mut recent = global("recent", TransStatus::Succeed, T0);
    recent.update_time = cutoff;
    store.create(&recent, &saga_branches("recent")).await.expect("create");
    for status in [TransStatus::Prepared, TransStatus::Submitted, TransStatus::Aborting] {
        let gid = format!("open-{status}");
        let g = global(&gid, status, T0);
        store.create(&g, &saga_branches(&gid)).await.expect("create");
    }
    assert!(store.kv_create("topics", "keep", "[]", T0).await.expect("kv"));

    assert_eq!(store.purge_finished(cutoff, 3).await.expect("purge"), 3);
    // Oldest first.
    for i in 0..3 {
        assert_eq!(store.find(&format!("old-{i}")).await.expect("find"), None);
    }
    assert!(store.find("old-3").await.expect("find").is_some());
    assert_eq!(store.purge_finished(cutoff, 3).await.expect("purge"), 3);
    assert_eq!(store.purge_finished(cutoff, 3).await.expect("purge"), 1);
    assert_eq!(store.purge_finished(cutoff, 3).await.expect("purge"), 0);
    for i in 0..7 {
        let gid = format!("old-{i}");
        assert_eq!(store.find(&gid).await.expect("find"), None, "{gid}");
        assert!(store.branches(&gid).await.expect("branches").is_empty(), "{gid}");
    }
    for gid in ["recent", "open-prepared", "open-submitted", "open-aborting"] {
        assert!(store.find(gid).await.expect("find").is_some(), "{gid}");
        assert_eq!(store.branches(gid).await.expect("branches").len(), 4, "{gid}");
    }
    assert!(store.kv_get("topics", "keep").await.expect("kv").is_some());
    // A purged gid can be used again.
    create(store.as_ref(), "old-0", TransStatus::Submitted, T0).await;
    assert_eq!(store.branches("old-0").await.expect("branches").len(), 4);

    // The sweep helper drains everything due in batches.
    for i in 0..25 {
        let mut g = global(&format!("bulk-{i}"), TransStatus::Succeed, T0);
        g.update_time = T0;
        store.create(&g, &saga_branches(&g.gid)).await.expect("create");
    }
    let swept = store::retention::sweep(store.as_ref(), Duration::from_secs(1), 4, cutoff)
        .await
        .expect("sweep");
    assert_eq!(swept, 25);
    assert!(store.find("recent").await.expect("find").is_some());
}

async fn invalid_input_is_refused_alike(store: Arc<dyn Store>) {
    let invalid = |result: Result<bool, StoreError>| matches!(result, Err(StoreError::Invalid(_)));
    let long = "g".repeat(MAX_KEY_LEN + 1);
    assert!(invalid(
        store.create(&global(&long, TransStatus::Submitted, T0), &[]).await
    ));
    let mut nul = global("nul", TransStatus::Submitted, T0);
    nul.custom_data = "a\0b".to_owned();
    assert!(invalid(store.create(&nul, &[]).await));
    let mut rows = saga_branches("dup");
    rows.push(rows[0].clone());
    assert!(invalid(
        store.create(&global("dup", TransStatus::Submitted, T0), &rows).await
    ));
    let mut long_branch = saga_branches("lb");
    long_branch[0].branch_id = long.clone();
    assert!(invalid(
        store
            .create(&global("lb", TransStatus::Submitted, T0), &long_branch)
            .await
    ));
    // Nothing was stored by the refused calls.
    for gid in ["nul", "dup", "lb"] {
        assert_eq!(store.find(gid).await.expect("find"), None, "{gid}");
    }
    store
        .create(&global("reg", TransStatus::Prepared, T0), &[])
        .await
        .expect("create");
    assert!(matches!(
        store
            .add_branches("reg", &[Branch::new("reg", &long, "try", "", vec![], T0)])
            .await,
        Err(StoreError::Invalid(_))
    ));
    let mut change = StatusChange::new("reg", TransStatus::Prepared, TransStatus::Failed, T0);
    change.rollback_reason = Some("\0".to_owned());
    assert!(invalid(store.change_status(&change).await));
    assert!(invalid(store.kv_create("topics", &long, "[]", T0).await));
    assert!(invalid(store.kv_create("topics", "t", "\0", T0).await));
    // The store still works.
    assert_eq!(find(store.as_ref(), "reg").await.status, TransStatus::Prepared);
}

async fn large_values_round_trip(store: Arc<dyn Store>) {
    let mut g = global("big", TransStatus::Submitted, T0);
    g.custom_data = "c".repeat(300_000);
    g.ext_data = "é".repeat(100_000);
    let mut rows = saga_branches("big");
    rows[1].bin_data = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    rows[1].url = format!("http://bank/{}", "p".repeat(5_000));
    assert!(store.create(&g, &rows).await.expect("create"));
    let stored = find(store.as_ref(), "big").await;
    assert_eq!((stored.custom_data.len(), stored.ext_data), (300_000, g.ext_data));
    let branches = store.branches("big").await.expect("branches");
    assert_eq!(branches[1].bin_data, rows[1].bin_data);
    assert_eq!(branches[1].url, rows[1].url);
}

/// The server's retention task deletes finished transactions once they are old enough (time
/// moved by the injected clock), keeps unfinished ones, and `/readyz` reports the store.
async fn retention_runs_in_the_server(backend: Backend) {
    use kubetx::config::Config;
    use kubetx::scheduler::OffsetClock;
    use kubetx::server::Server;

    let dir = tempfile::tempdir().expect("temp dir");
    let db = match backend {
        Backend::Sqlite => None,
        _ => Some(TestDb::create(backend).await),
    };
    let config = Config {
        listen: "127.0.0.1:0".to_owned(),
        grpc_listen: String::new(),
        store: db.as_ref().map(|db| db.url.clone()).unwrap_or_default(),
        retention: 3_600,
        retention_interval: 1,
        retention_batch: 2,
        sqlite: kubetx::config::SqliteConfig {
            path: dir.path().join("kubetx.db").display().to_string(),
            ..Default::default()
        },
        ..Config::default()
    };
    let clock = Arc::new(OffsetClock::default());
    let server = Server::start(&config, clock.clone(), true)
        .await
        .expect("server starts");
    let store = Arc::clone(server.coordinator.store());
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("http://{}/readyz", server.addr))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);

    let now = clock_now(&server);
    for i in 0..5 {
        let mut g = global(&format!("r-{i}"), TransStatus::Succeed, now);
        g.update_time = now;
        store.create(&g, &saga_branches(&g.gid)).await.expect("create");
    }
    let open = global("r-open", TransStatus::Prepared, now + 86_400_000);
    store.create(&open, &[]).await.expect("create");
    // Not old enough yet.
    assert!(store.find("r-0").await.expect("find").is_some());
    clock.advance(Duration::from_secs(2 * 3_600));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut left = 0;
        for i in 0..5 {
            left += usize::from(store.find(&format!("r-{i}")).await.expect("find").is_some());
        }
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "retention never deleted them");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..5 {
        assert!(store.branches(&format!("r-{i}")).await.expect("branches").is_empty());
    }
    assert!(
        store.find("r-open").await.expect("find").is_some(),
        "unfinished work is kept"
    );
    server.stop().await.expect("stops");
}

fn clock_now(server: &kubetx::server::Server) -> Millis {
    server.coordinator.now()
}

mod retention_in_the_server {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        retention_runs_in_the_server(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        if common::db::available(Backend::Postgres, "the store contract suite") {
            retention_runs_in_the_server(Backend::Postgres).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mysql() {
        if common::db::available(Backend::MySql, "the store contract suite") {
            retention_runs_in_the_server(Backend::MySql).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis() {
        if common::db::available(Backend::Redis, "the store contract suite") {
            retention_runs_in_the_server(Backend::Redis).await;
        }
    }
}

/// The operator's SQL detail (src/operator/sql.rs): a new leader takes a transaction over, and
/// from then on the store refuses what the previous leader writes from its stale view.
async fn operator_leaders_write_under_their_own_identity(store: Arc<dyn Store>) {
    use kubetx::operator::sql;
    let gid = "op-fenced";
    let mut running = global(gid, TransStatus::Submitted, T0);
    let branches = saga_branches(gid);
    assert!(
        sql::save(store.as_ref(), "replica-a", None, &running, &branches, &branches, T0)
            .await
            .expect("save")
    );
    let mut a_view = saga_branches(gid);
    let a_saved = sql::load(store.as_ref(), gid, &mut a_view)
        .await
        .expect("load")
        .expect("saved");
    assert_eq!(a_saved.owner, "replica-a");
    // Replica b leads now: it reads, takes over and records an outcome.
    let mut b_view = saga_branches(gid);
    let b_saved = sql::load(store.as_ref(), gid, &mut b_view).await.expect("load");
    let mut b_after = b_view.clone();
    b_after[1].status = BranchStatus::Succeed;
    b_after[1].finish_time = Some(T0 + 1);
    assert!(
        sql::save(
            store.as_ref(),
            "replica-b",
            b_saved,
            &running,
            &b_after,
            &b_view,
            T0 + 1
        )
        .await
        .expect("save")
    );
    assert_eq!(find(store.as_ref(), gid).await.owner, "replica-b");
    // Replica a wakes up with its old view and decides to roll back: refused, nothing recorded.
    running.status = TransStatus::Aborting;
    let mut a_after = a_view.clone();
    a_after[3].status = BranchStatus::Failed;
    assert!(
        !sql::save(
            store.as_ref(),
            "replica-a",
            Some(a_saved),
            &running,
            &a_after,
            &a_view,
            T0 + 2
        )
        .await
        .expect("save")
    );
    assert_eq!(find(store.as_ref(), gid).await.status, TransStatus::Submitted);
    let rows = store.branches(gid).await.expect("branches");
    assert_eq!(rows[3].status, BranchStatus::Prepared);
}
