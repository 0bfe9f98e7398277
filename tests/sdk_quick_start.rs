//! `cargo run --example quick_start` shows DTM's quick start as a workflow: run the example
//! binary and read what it printed.

use std::path::PathBuf;
use std::process::Command;

/// The example's binary beside this test's (`cargo test` builds examples; a lone
/// `cargo test --test sdk_quick_start` does not, so it is built then).
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = profile_dir.join("examples").join("quick_start");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--example", "quick_start"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the example");
    }
    path
}

#[test]
fn quick_start_moves_30_then_rolls_back_on_trans_in_failure() {
    let output = Command::new(example())
        .env_remove("KUBETX_DTM")
        .output()
        .expect("the example runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (first, second) = text.split_once("Workflow 2").expect("two workflows");
    for expected in [
        "TransOut        branch 01 op action     A -30",
        "TransIn         branch 02 op action     B +30",
        "=> succeeded: transferred 30 from A to B",
        "kubetx says the workflow succeed; balances A=9970 B=10030",
    ] {
        assert!(first.contains(expected), "{expected:?} missing from\n{first}");
    }
    for expected in [
        "TransIn         branch 02 op action     answered FAILURE",
        "TransInRevert   branch 02 op rollback   skipped by the barrier",
        "TransOutRevert  branch 01 op rollback   A +30",
        "=> rolled back: FAILURE",
        "kubetx says the workflow failed; balances A=9970 B=10030",
    ] {
        assert!(second.contains(expected), "{expected:?} missing from\n{second}");
    }
}
