//! Services across network namespaces: a leader cut off from its workers (but not from the
//! other managers) takes none of them for dead, stops none of their tasks, and everything
//! goes on once the link heals. Needs root, `ip` and `nft`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use starling_tests::cluster::{Cluster, poll};

const SETTLE: Duration = Duration::from_secs(30);

/// Kills the task processes the agents recorded under these data directories (the daemons
/// go with the cluster; the tasks they started are separate process groups).
struct TaskReaper(Vec<PathBuf>);

impl Drop for TaskReaper {
    fn drop(&mut self) {
        for dir in &self.0 {
            starling_agent::exec::kill_recorded(&dir.join("tasks"));
        }
    }
}

/// `(task id → (node, state))` of a service's tasks wanted running, through host `i`.
fn tasks(c: &Cluster, i: usize, service: &str) -> Option<BTreeMap<String, (String, String)>> {
    let (status, v) = c
        .api(i, "GET", &format!("/v1/tasks?service={service}"), b"")
        .ok()?;
    (status == 200).then_some(())?;
    Some(
        v["tasks"]
            .as_array()?
            .iter()
            .filter(|t| t["desired_state"] == "running")
            .map(|t| {
                (
                    t["id"].as_str().unwrap_or("").to_owned(),
                    (
                        t["node"].as_str().unwrap_or("").to_owned(),
                        t["state"].as_str().unwrap_or("").to_owned(),
                    ),
                )
            })
            .collect(),
    )
}

fn create(c: &Cluster, i: usize, spec: Value) {
    let (status, v) = c
        .api(i, "POST", "/v1/services", spec.to_string().as_bytes())
        .unwrap();
    assert_eq!(status, 200, "{v}");
}

#[test]
fn t30_a_leader_cut_off_from_its_workers_stops_nothing_and_heals() {
    let c = Cluster::form(3, 3);
    let _reaper = TaskReaper((0..6).map(|i| c.dir(i).to_owned()).collect());
    let rows = c.nodes(0).unwrap();
    for r in rows.iter().filter(|r| r["role"] == "manager") {
        let id = r["id"].as_str().unwrap();
        let (status, v) = c
            .api(0, "PUT", &format!("/v1/nodes/{id}/availability"), b"drain")
            .unwrap();
        assert_eq!(status, 200, "{v}");
    }
    create(
        &c,
        0,
        json!({"name": "work", "replicas": 6, "command": ["sleep", "1000"]}),
    );
    let placed = poll("six tasks running on the workers", SETTLE, || {
        let t = tasks(&c, 0, "work")?;
        (t.len() == 6 && t.values().all(|(_, s)| s == "running")).then_some(t)
    });
    let pids = poll("six task processes", SETTLE, || {
        let p = c.task_processes(3..6);
        (p.len() == 6).then_some(p)
    });
    let leader = c.wait_leader(&[0, 1, 2], SETTLE);
    let other = (0..3).find(|&m| m != leader).unwrap();
    let sessions_opened = |w: usize| c.log(w).matches("dispatcher session open").count();
    let before: Vec<usize> = (3..6).map(sessions_opened).collect();
    // The scenario needs workers whose session is with the leader (they dial the manager
    // they joined through first, host 1, which formed the cluster and leads it).
    let leader_id = c.info(leader).unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let with_leader = (3..6)
        .filter(|&w| {
            c.log(w)
                .lines()
                .rfind(|l| l.contains("dispatcher session open"))
                .is_some_and(|l| l.contains(&leader_id))
        })
        .count();
    assert!(
        with_leader > 0,
        "no worker has its session with the leader (host {})",
        leader + 1
    );

    // Cut: the leader hears no worker, the workers no leader; the other managers hear all.
    c.net.partition(&[leader], &[3, 4, 5]).unwrap();
    let cut = Instant::now();
    // Past the session silence (2 s), the probe (1.5 s), the leader's grace for gossip's
    // view (3 s) and a few liveness rounds: nothing may change, seen from another manager.
    while cut.elapsed() < Duration::from_secs(12) {
        if let Some(rows) = c.nodes(other) {
            for r in rows.iter().filter(|r| r["role"] == "worker") {
                assert_eq!(r["status"], "ready", "a worker taken for dead: {rows:#?}");
            }
        }
        if let Some(t) = tasks(&c, other, "work") {
            assert_eq!(t, placed, "the tasks changed while the leader was cut off");
        }
        assert_eq!(c.task_processes(3..6), pids, "a task process stopped");
        std::thread::sleep(Duration::from_millis(500));
    }
    let moved: Vec<bool> = (3..6)
        .zip(&before)
        .map(|(w, b)| sessions_opened(w) > *b)
        .collect();
    eprintln!(
        "cut for {:?}; workers whose session moved: {moved:?}",
        cut.elapsed()
    );

    // Healed: still nothing stopped, and the cluster places new work on every worker.
    c.net.heal().unwrap();
    create(
        &c,
        other,
        json!({"name": "after", "replicas": 3, "command": ["sleep", "1000"]}),
    );
    let after = poll("three new tasks running", SETTLE, || {
        let t = tasks(&c, leader, "after")?;
        (t.len() == 3 && t.values().all(|(_, s)| s == "running")).then_some(t)
    });
    assert_eq!(tasks(&c, leader, "work").unwrap(), placed);
    let live = c.task_processes(3..6);
    assert_eq!(live.len(), 9, "{live:?}");
    for (task, pid) in &pids {
        assert_eq!(live.get(task), Some(pid), "{task} was restarted");
    }
    assert!(after.keys().all(|t| live.contains_key(t)));
}
