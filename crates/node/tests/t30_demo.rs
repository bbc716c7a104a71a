//! The README's run command.
#![allow(clippy::unwrap_used, missing_docs)]

#[test]
fn t30_demo_runs_a_cluster_survives_the_leader_kill_and_exits_0() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .arg("demo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("new leader:"), "{text}");
    assert!(
        text.contains("kv put demo/after-failover -> revision"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("done"), "{text}");
}
