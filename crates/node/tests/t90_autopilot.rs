//! Autopilot: with it on, a manager killed for good is taken out of the voters once it has
//! been down past the threshold, and a worker is promoted to keep three managers; writes go
//! on. With it off (the default) nothing of the kind happens (the unit tests of the pure
//! decision cover its rules: quorum, the last manager, odd counts, constraints).
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use starling_api::{ManagerStatus, NodeRole, NodeStatus};

mod common;
use common::{Daemon, free_port, join_args, poll, rt, spawn, starling, unix};

#[test]
fn t90_autopilot_replaces_a_dead_manager_with_a_worker_and_keeps_three_voters() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let mut daemons: Vec<(&str, Daemon)> = vec![(
        "m1",
        spawn(&[
            "init",
            "--data-dir",
            dir("m1").to_str().unwrap(),
            "--listen",
            &m1_addr,
            "--hostname",
            "m1",
        ]),
    )];
    let c1 = unix(&dir("m1"));
    poll("m1 serves", Duration::from_secs(20), || {
        rt.block_on(c1.nodes()).ok()
    });
    let mt = rt.block_on(c1.join_token("manager")).unwrap().token;
    let wt = rt.block_on(c1.join_token("worker")).unwrap().token;
    for name in ["m2", "m3", "w1"] {
        let token = if name == "w1" { &wt } else { &mt };
        let args = join_args(&dir(name), name, token, &m1_addr);
        daemons.push((
            name,
            spawn(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        ));
        poll(&format!("{name} in"), Duration::from_secs(30), || {
            let list = rt.block_on(c1.nodes()).ok()?;
            list.nodes
                .iter()
                .any(|n| {
                    n.hostname == name
                        && n.status == NodeStatus::Ready
                        && (n.role == NodeRole::Worker
                            || n.manager_status == Some(ManagerStatus::Reachable))
                })
                .then_some(())
        });
    }
    let out = starling(&[
        "cluster",
        "update",
        "--data-dir",
        dir("m1").to_str().unwrap(),
        "--autopilot-cleanup-dead-managers=true",
        "--autopilot-min-managers",
        "3",
        "--autopilot-dead-after",
        "5s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Autopilot:           on: keeps 3 managers, removes one down for 5s"),
        "{text}"
    );

    // m3 dies for good.
    daemons.retain(|(n, _)| *n != "m3");
    let list = poll(
        "m3 out of the voters and w1 a manager",
        Duration::from_secs(90),
        || {
            let list = rt.block_on(c1.nodes()).ok()?;
            let by = |h: &str| list.nodes.iter().find(|n| n.hostname == h).cloned();
            let (m3, w1) = (by("m3")?, by("w1")?);
            let done = m3.role == NodeRole::Worker
                && m3.status == NodeStatus::Down
                && w1.role == NodeRole::Manager
                && matches!(
                    w1.manager_status,
                    Some(ManagerStatus::Reachable | ManagerStatus::Leader)
                );
            done.then_some(list)
        },
    );
    let voters = rt
        .block_on(c1.info())
        .unwrap()
        .raft
        .map(|r| r.voters)
        .unwrap_or_default();
    assert_eq!(voters, 3, "{list:?}");
    // The promoted worker holds a manager certificate and serves the managers' API.
    poll("w1 serves node ls", Duration::from_secs(30), || {
        rt.block_on(unix(&dir("w1")).nodes()).ok()
    });
    rt.block_on(c1.kv_put("after", b"1".to_vec())).unwrap();
    // Logged by whichever manager led.
    let log: String = ["m1", "m2"]
        .iter()
        .map(|m| std::fs::read_to_string(tmp.path().join(format!("{m}.log"))).unwrap_or_default())
        .collect();
    assert!(
        log.contains("autopilot: removing a dead manager")
            && log.contains("autopilot: promoting a worker"),
        "the decisions are logged"
    );
}
