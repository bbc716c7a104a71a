//! Disaster recovery across network namespaces: of three managers two are destroyed (killed,
//! data directories deleted); `starling run --force-new-cluster` on the third makes it the
//! single manager of the same cluster with every acknowledged write, the worker and its
//! tasks stay, the lost managers are removed and stay refused, a new manager joins with a
//! token and writes go on. Needs root, `ip` and `nft`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use starling_tests::cluster::{Cluster, poll};

/// Kills the task processes the agents recorded under these data directories.
struct TaskReaper(Vec<PathBuf>);

impl Drop for TaskReaper {
    fn drop(&mut self) {
        for dir in &self.0 {
            starling_agent::exec::kill_recorded(&dir.join("tasks"));
        }
    }
}

fn running_tasks(c: &Cluster, i: usize) -> Option<Vec<(String, String)>> {
    let (status, v) = c.api(i, "GET", "/v1/tasks?service=web", b"").ok()?;
    (status == 200).then_some(())?;
    Some(
        v["tasks"]
            .as_array()?
            .iter()
            .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
            .map(|t| {
                (
                    t["id"].as_str().unwrap_or("").to_owned(),
                    t["node"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect(),
    )
}

fn node_id(c: &Cluster, i: usize) -> String {
    c.info(i).unwrap()["node_id"].as_str().unwrap().to_owned()
}

#[test]
fn t32_force_new_cluster_from_the_last_manager_keeps_every_acknowledged_write() {
    let mut c = Cluster::form(3, 1);
    let _reaper = TaskReaper((0..4).map(|i| c.dir(i).to_owned()).collect());
    let worker = 3;
    let worker_id = node_id(&c, worker);
    // A service whose tasks all run on the worker.
    let spec = json!({
        "name": "web",
        "command": ["sleep", "3600"],
        "replicas": 2,
        "constraints": [format!("node.id=={worker_id}")],
    });
    let (status, v) = c
        .api(0, "POST", "/v1/services", spec.to_string().as_bytes())
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let before = poll(
        "2 tasks running on the worker",
        Duration::from_secs(60),
        || running_tasks(&c, 0).filter(|t| t.len() == 2),
    );
    // Writes through every manager, each acknowledged.
    let mut acked = Vec::new();
    for k in 0..60 {
        let host = k % 3;
        let key = format!("k{k}");
        c.put(host, &key, &format!("v{k}"))
            .unwrap_or_else(|e| panic!("{key} through host {}: {e:?}", host + 1));
        acked.push(key);
    }
    // The leader is among the lost: the survivor is a follower.
    let leader = c.wait_leader(&[0, 1, 2], Duration::from_secs(20));
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    // A write is acknowledged once two of three have it: the survivor may not have been sent
    // the last ones yet. A linearizable read through it returns once it has applied them all.
    let (last, _) = c.get(survivor, "k59", "linearizable").unwrap();
    assert_eq!(last.map(|(v, _)| v).as_deref(), Some("v59"));
    let lost: Vec<usize> = (0..3).filter(|i| *i != survivor).collect();
    let lost_ids: Vec<String> = lost.iter().map(|i| node_id(&c, *i)).collect();
    for &i in &lost {
        c.kill(i);
        std::fs::remove_dir_all(c.dir(i)).unwrap();
    }
    // Without a majority the survivor takes no writes; then it is restarted, forced.
    assert!(c.put(survivor, "during", "x").is_err());
    c.kill(survivor);
    c.restart_with(survivor, &["--force-new-cluster"]);
    poll("the survivor leads alone", Duration::from_secs(20), || {
        let info = c.info(survivor)?;
        (info["raft"]["leader"] == info["raft"]["id"] && info["raft"]["voters"] == 1).then_some(())
    });
    for key in &acked {
        let (read, _) = c.get(survivor, key, "linearizable").unwrap();
        let want = format!("v{}", &key[1..]);
        assert_eq!(read.map(|(v, _)| v), Some(want), "{key}");
    }
    // The lost managers leave the node list; the worker stays, with its tasks.
    let rows = poll("the lost managers removed", Duration::from_secs(30), || {
        let rows = c.nodes(survivor)?;
        let gone = rows
            .iter()
            .all(|r| !lost_ids.iter().any(|id| r["id"] == id.as_str()));
        (gone && rows.len() == 2).then_some(rows)
    });
    let worker_row: &Value = rows.iter().find(|r| r["id"] == worker_id.as_str()).unwrap();
    assert_eq!(worker_row["status"], "ready", "{rows:?}");
    let after = poll(
        "the worker's tasks still running",
        Duration::from_secs(30),
        || running_tasks(&c, survivor).filter(|t| t.len() == 2),
    );
    assert_eq!(before, after, "the same tasks, not replacements");

    // A new manager joins on a lost host (a new data directory, a new node id).
    let token = c.token(survivor, "manager");
    let newcomer = lost[0];
    c.join(newcomer, &token, survivor);
    poll("two managers reachable", Duration::from_secs(60), || {
        let rows = c.nodes(survivor)?;
        let managers = rows
            .iter()
            .filter(|r| {
                r["role"] == "manager"
                    && (r["manager_status"] == "leader" || r["manager_status"] == "reachable")
            })
            .count();
        (managers == 2).then_some(())
    });
    assert!(!lost_ids.contains(&node_id(&c, newcomer)));
    // Writes go on, through either manager.
    c.put(survivor, "after", "1").unwrap();
    poll(
        "a write through the new manager",
        Duration::from_secs(20),
        || c.put(newcomer, "after-2", "2").ok(),
    );
    let (read, _) = c.get(newcomer, "k0", "linearizable").unwrap();
    assert_eq!(read.map(|(v, _)| v), Some("v0".to_owned()));
}
