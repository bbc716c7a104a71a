//! Joining through a token: a worker and a second manager join the first manager; bad tokens
//! are refused with a clear message.
#![allow(clippy::unwrap_used, missing_docs)]

use starling_node::join::{JoinReply, JoinRequest, call, join_protocol};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{free_port, poll, rt, spawn, starling, wait_serving};

fn nodes(dir: &Path) -> Option<Vec<serde_json::Value>> {
    let out = starling(&[
        "node",
        "ls",
        "--data-dir",
        dir.to_str()?,
        "--format",
        "json",
    ]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()?
        .as_array()
        .cloned()
}

#[test]
fn t20_worker_and_manager_join_with_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let m1 = tmp.path().join("m1");
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let _m1 = spawn(&[
        "init",
        "--data-dir",
        m1.to_str().unwrap(),
        "--listen",
        &m1_addr,
        "--hostname",
        "m1",
    ]);
    poll("m1 ready", Duration::from_secs(20), || nodes(&m1));
    let token = |role: &str| {
        String::from_utf8(
            starling(&["join-token", "--data-dir", m1.to_str().unwrap(), role, "-q"]).stdout,
        )
        .unwrap()
        .trim()
        .to_owned()
    };
    let (wt, mt) = (token("worker"), token("manager"));

    let w1 = tmp.path().join("w1");
    let _w1 = spawn(&[
        "join",
        "--data-dir",
        w1.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--hostname",
        "w1",
        "--token",
        &wt,
        "--manager",
        &m1_addr,
    ]);
    let m2 = tmp.path().join("m2");
    let _m2 = spawn(&[
        "join",
        "--data-dir",
        m2.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--hostname",
        "m2",
        "--token",
        &mt,
        "--manager",
        &m1_addr,
    ]);

    let list = poll("three nodes, m2 reachable", Duration::from_secs(30), || {
        let list = nodes(&m1)?;
        let m2_ok = list
            .iter()
            .any(|n| n["hostname"] == "m2" && n["manager_status"] == "reachable");
        (list.len() == 3 && m2_ok).then_some(list)
    });
    let by = |h: &str| list.iter().find(|n| n["hostname"] == h).unwrap().clone();
    assert_eq!(by("m1")["manager_status"], "leader");
    assert_eq!(by("w1")["role"], "worker");
    assert_eq!(by("w1")["manager_status"], serde_json::Value::Null);
    assert_eq!(by("m2")["role"], "manager");
    // The second manager answers too, from the same replicated state.
    poll("m2 serves node ls", Duration::from_secs(20), || {
        nodes(&m2).filter(|l| l.len() == 3)
    });
    // A worker has no cluster state to show.
    wait_serving(&rt(), &w1, "w1");
    let on_worker = starling(&["node", "ls", "--data-dir", w1.to_str().unwrap()]);
    assert!(!on_worker.status.success());
    assert!(String::from_utf8_lossy(&on_worker.stderr).contains("worker"));

    // Bad tokens: malformed, and well-formed but wrong.
    let x = tmp.path().join("x");
    let listen = format!("127.0.0.1:{}", free_port());
    let bad = starling(&[
        "join",
        "--data-dir",
        x.to_str().unwrap(),
        "--listen",
        &listen,
        "--token",
        "STRL-1-aaa-bbb",
        "--manager",
        &m1_addr,
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad --token"));
    // Change a character in the middle of the secret (the last one carries padding bits).
    let mut chars: Vec<char> = wt.chars().collect();
    let i = chars.len() - 5;
    chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
    let wrong: String = chars.into_iter().collect();
    let refused = starling(&[
        "join",
        "--data-dir",
        x.to_str().unwrap(),
        "--listen",
        &listen,
        "--token",
        &wrong,
        "--manager",
        &m1_addr,
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not valid for this cluster"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        !x.join("node.json").exists(),
        "a refused join leaves no node behind"
    );

    // The membership requests behind the CLI check who asks: a worker certificate cannot
    // demote or enter the Raft group, and a manager cannot enter it under a made-up Raft id.
    let leader = starling_node::datadir::DataDir(m1.clone()).load().unwrap();
    let ask = |dir: &Path, req: JoinRequest| {
        let creds = starling_transport::NodeCredentials::load(dir).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let cfg = starling_transport::EndpointConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..Default::default()
            };
            let ep = starling_transport::Endpoint::bind(
                cfg,
                starling_transport::ring_provider(),
                Some(creds),
            )
            .unwrap();
            let conn = ep
                .connect(
                    &join_protocol().unwrap(),
                    &starling_transport::NodeId::new(leader.node_id.clone()).unwrap(),
                    leader.listen,
                )
                .await
                .unwrap();
            call(&conn, &req).await.unwrap()
        })
    };
    let refused = |reply: JoinReply, why: &str| match reply {
        JoinReply::Refused(r) => assert!(r.contains(why), "{r}"),
        other => panic!("expected a refusal ({why}), got {other:?}"),
    };
    let m2_id = starling_node::datadir::DataDir(m2.clone())
        .load()
        .unwrap()
        .node_id;
    refused(
        ask(&w1, JoinRequest::Demote { node_id: m2_id }),
        "only a manager",
    );
    refused(
        ask(&w1, JoinRequest::AddManager { raft_id: 4242 }),
        "manager certificate",
    );
    refused(
        ask(&m2, JoinRequest::AddManager { raft_id: 4242 }),
        "was not allocated",
    );
    assert_eq!(nodes(&m1).unwrap().len(), 3, "nothing changed");
}

#[test]
fn t21_killed_worker_goes_down_and_comes_back_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let m1 = tmp.path().join("m1");
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let _m1 = spawn(&[
        "init",
        "--data-dir",
        m1.to_str().unwrap(),
        "--listen",
        &m1_addr,
        "--hostname",
        "m1",
    ]);
    poll("m1 ready", Duration::from_secs(20), || nodes(&m1));
    let wt = String::from_utf8(
        starling(&[
            "join-token",
            "--data-dir",
            m1.to_str().unwrap(),
            "worker",
            "-q",
        ])
        .stdout,
    )
    .unwrap();
    let status_of = |host: &str| {
        nodes(&m1).and_then(|l| {
            l.iter()
                .find(|n| n["hostname"] == host)
                .map(|n| n["status"].as_str().unwrap_or_default().to_owned())
        })
    };
    // A node that joins (a certificate issued, a record written) but never runs its agent
    // is `unknown`, then `down`: never `ready`, so never given work.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reply = rt.block_on(async {
        let ep = starling_transport::Endpoint::bind(
            starling_transport::EndpointConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..Default::default()
            },
            starling_transport::ring_provider(),
            None,
        )
        .unwrap();
        let token: starling_transport::JoinToken = wt.trim().parse().unwrap();
        let conn = ep
            .connect_pinned(&join_protocol().unwrap(), m1_addr.parse().unwrap(), &token)
            .await
            .unwrap();
        let key = starling_transport::NodeKey::generate().unwrap();
        call(
            &conn,
            &JoinRequest::Join {
                token: wt.trim().to_owned(),
                csr: key.csr().unwrap(),
                hostname: "ghost".into(),
                advertise: "127.0.0.1:9".parse().unwrap(),
            },
        )
        .await
        .unwrap()
    });
    assert!(matches!(reply, JoinReply::Joined { .. }), "{reply:?}");
    let seen = poll("ghost down", Duration::from_secs(30), || {
        let s = status_of("ghost")?;
        assert_ne!(s, "ready", "a node whose agent never ran is not ready");
        (s == "down").then_some(s)
    });
    assert_eq!(seen, "down");
    let w1 = tmp.path().join("w1");
    let w1_addr = format!("127.0.0.1:{}", free_port());
    let worker = spawn(&[
        "join",
        "--data-dir",
        w1.to_str().unwrap(),
        "--listen",
        &w1_addr,
        "--hostname",
        "w1",
        "--token",
        wt.trim(),
        "--manager",
        &m1_addr,
    ]);
    let status = |want: &str| status_of("w1").filter(|s| s == want).map(|_| ());
    poll("w1 ready", Duration::from_secs(20), || status("ready"));
    // kill -9: gossip declares it Down, the leader marks it down after its grace periods.
    drop(worker);
    poll("w1 down", Duration::from_secs(60), || status("down"));
    // Restarted from its data directory (new gossip generation): ready again.
    let _worker = spawn(&["run", "--data-dir", w1.to_str().unwrap()]);
    poll("w1 ready again", Duration::from_secs(60), || {
        status("ready")
    });
}

#[test]
fn t22_rotated_token_is_refused_and_a_worker_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let m1 = tmp.path().join("m1");
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let _m1 = spawn(&[
        "init",
        "--data-dir",
        m1.to_str().unwrap(),
        "--listen",
        &m1_addr,
        "--hostname",
        "m1",
    ]);
    poll("m1 ready", Duration::from_secs(20), || nodes(&m1));
    let token = |args: &[&str]| {
        let mut all = vec![
            "join-token",
            "--data-dir",
            m1.to_str().unwrap(),
            "worker",
            "-q",
        ];
        all.extend_from_slice(args);
        String::from_utf8(starling(&all).stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    let old = token(&[]);
    let new = token(&["--rotate"]);
    assert_ne!(old, new);
    assert_eq!(token(&[]), new);
    let x = tmp.path().join("x");
    let refused = starling(&[
        "join",
        "--data-dir",
        x.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--token",
        &old,
        "--manager",
        &m1_addr,
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not valid"));

    let w1 = tmp.path().join("w1");
    let mut worker = spawn(&[
        "join",
        "--data-dir",
        w1.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--hostname",
        "w1",
        "--token",
        &new,
        "--manager",
        &m1_addr,
    ]);
    poll("w1 ready", Duration::from_secs(20), || {
        nodes(&m1)?
            .iter()
            .find(|n| n["hostname"] == "w1" && n["status"] == "ready")
            .map(|_| ())
    });
    // The only manager cannot leave (it would have to be demoted, and it is the last one).
    let m_leave = starling(&["leave", "--data-dir", m1.to_str().unwrap()]);
    assert!(!m_leave.status.success());
    assert!(String::from_utf8_lossy(&m_leave.stderr).contains("last manager"));
    // The worker leaves: its process ends, and the managers mark it down. (Ready for the
    // managers comes before the worker's control socket is bound: wait for that too.)
    wait_serving(&rt(), &w1, "w1");
    let left = starling(&["leave", "--data-dir", w1.to_str().unwrap()]);
    assert!(
        left.status.success(),
        "{}",
        String::from_utf8_lossy(&left.stderr)
    );
    poll("the worker process exits", Duration::from_secs(20), || {
        worker.0.try_wait().unwrap().map(|_| ())
    });
    poll("w1 down", Duration::from_secs(60), || {
        nodes(&m1)?
            .iter()
            .find(|n| n["hostname"] == "w1" && n["status"] == "down")
            .map(|_| ())
    });
}

fn id_of(list: &[serde_json::Value], host: &str) -> String {
    list.iter()
        .find(|n| n["hostname"] == host)
        .and_then(|n| n["id"].as_str())
        .unwrap()
        .to_owned()
}

#[test]
fn t23_promote_a_worker_then_demote_managers_down_to_the_last() {
    let tmp = tempfile::tempdir().unwrap();
    let m1 = tmp.path().join("m1");
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let _m1 = spawn(&[
        "init",
        "--data-dir",
        m1.to_str().unwrap(),
        "--listen",
        &m1_addr,
        "--hostname",
        "m1",
    ]);
    poll("m1 ready", Duration::from_secs(20), || nodes(&m1));
    let wt = String::from_utf8(
        starling(&[
            "join-token",
            "--data-dir",
            m1.to_str().unwrap(),
            "worker",
            "-q",
        ])
        .stdout,
    )
    .unwrap();
    let w1 = tmp.path().join("w1");
    let _w1 = spawn(&[
        "join",
        "--data-dir",
        w1.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--hostname",
        "w1",
        "--token",
        wt.trim(),
        "--manager",
        &m1_addr,
    ]);
    let list = poll("w1 joined", Duration::from_secs(20), || {
        nodes(&m1).filter(|l| l.len() == 2)
    });
    let (m1_id, w1_id) = (id_of(&list, "m1"), id_of(&list, "w1"));

    // Promote: the worker gets a manager certificate, joins the Raft group, serves node ls.
    let out = starling(&[
        "node",
        "promote",
        "--data-dir",
        m1.to_str().unwrap(),
        &w1_id,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll("w1 is a reachable manager", Duration::from_secs(30), || {
        nodes(&m1)?
            .iter()
            .find(|n| {
                n["hostname"] == "w1"
                    && n["role"] == "manager"
                    && n["manager_status"] == "reachable"
            })
            .map(|_| ())
    });
    poll("w1 serves node ls", Duration::from_secs(30), || {
        nodes(&w1).filter(|l| l.len() == 2)
    });
    let again = starling(&[
        "node",
        "promote",
        "--data-dir",
        m1.to_str().unwrap(),
        &w1_id,
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already a manager"));

    // Demote the leader (m1): leadership moves to w1 first; m1 becomes a worker.
    let out = starling(&["node", "demote", "--data-dir", m1.to_str().unwrap(), &m1_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll("w1 leads, m1 is a worker", Duration::from_secs(30), || {
        let l = nodes(&w1)?;
        let w = l.iter().find(|n| n["hostname"] == "w1")?;
        let m = l.iter().find(|n| n["hostname"] == "m1")?;
        (w["manager_status"] == "leader" && m["role"] == "worker").then_some(())
    });
    poll("m1 runs as a worker", Duration::from_secs(30), || {
        let out = starling(&["node", "ls", "--data-dir", m1.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stderr)
            .contains("worker")
            .then_some(())
    });
    // The last manager cannot be demoted.
    let last = starling(&["node", "demote", "--data-dir", w1.to_str().unwrap(), &w1_id]);
    assert!(!last.status.success());
    assert!(String::from_utf8_lossy(&last.stderr).contains("last manager"));
    // Writes go on through the new manager.
    assert!(
        starling(&[
            "kv",
            "put",
            "--data-dir",
            w1.to_str().unwrap(),
            "after",
            "demotion"
        ])
        .status
        .success()
    );
}

#[test]
fn t24_killed_leader_restarted_with_run_is_reachable_again_and_a_manager_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (1..=3).map(|i| tmp.path().join(format!("m{i}"))).collect();
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let mut daemons = vec![spawn(&[
        "init",
        "--data-dir",
        dirs[0].to_str().unwrap(),
        "--listen",
        &m1_addr,
        "--hostname",
        "m1",
    ])];
    poll("m1 ready", Duration::from_secs(20), || nodes(&dirs[0]));
    let mt = String::from_utf8(
        starling(&[
            "join-token",
            "--data-dir",
            dirs[0].to_str().unwrap(),
            "manager",
            "-q",
        ])
        .stdout,
    )
    .unwrap();
    for (i, d) in dirs.iter().enumerate().skip(1) {
        let host = format!("m{}", i + 1);
        daemons.push(spawn(&[
            "join",
            "--data-dir",
            d.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--hostname",
            &host,
            "--token",
            mt.trim(),
            "--manager",
            &m1_addr,
        ]));
    }
    let reachable = |d: &Path, n: usize| {
        nodes(d).filter(|l| {
            l.iter()
                .filter(|x| x["manager_status"] == "leader" || x["manager_status"] == "reachable")
                .count()
                == n
        })
    };
    poll("three managers", Duration::from_secs(30), || {
        reachable(&dirs[0], 3)
    });
    // Each joiner has finished its entry (it serves its control socket once the leader
    // confirmed it) and sees the three: killing the leader before that could leave a voter
    // that never heard of the group (a test of a different failure).
    for d in &dirs[1..] {
        poll(
            "every manager serves and sees three",
            Duration::from_secs(60),
            || reachable(d, 3),
        );
    }
    // kill -9 the leader (m1), a new leader answers through m2, then m1 comes back with `run`.
    let old = daemons.remove(0);
    drop(old);
    poll("a new leader", Duration::from_secs(30), || {
        nodes(&dirs[1])?
            .iter()
            .find(|n| n["manager_status"] == "leader" && n["hostname"] != "m1")
            .map(|_| ())
    });
    assert!(
        starling(&[
            "kv",
            "put",
            "--data-dir",
            dirs[1].to_str().unwrap(),
            "k",
            "v"
        ])
        .status
        .success()
    );
    let _m1 = spawn(&["run", "--data-dir", dirs[0].to_str().unwrap()]);
    poll("m1 reachable again", Duration::from_secs(30), || {
        nodes(&dirs[1])?
            .iter()
            .find(|n| n["hostname"] == "m1" && n["manager_status"] == "reachable")
            .map(|_| ())
    });
    // A manager leaves: it is demoted first, then goes.
    let out = starling(&["leave", "--data-dir", dirs[2].to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll("m3 is no longer a manager", Duration::from_secs(30), || {
        nodes(&dirs[1])?
            .iter()
            .find(|n| n["hostname"] == "m3" && n["role"] == "worker")
            .map(|_| ())
    });
}

#[test]
fn t25_without_quorum_writes_fail_fast_and_local_reads_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (1..=3).map(|i| tmp.path().join(format!("m{i}"))).collect();
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let _m1 = spawn(&[
        "init",
        "--data-dir",
        dirs[0].to_str().unwrap(),
        "--listen",
        &m1_addr,
        "--hostname",
        "m1",
    ]);
    poll("m1 ready", Duration::from_secs(20), || nodes(&dirs[0]));
    let d0 = dirs[0].to_str().unwrap();
    assert!(
        starling(&["kv", "put", "--data-dir", d0, "q", "before"])
            .status
            .success()
    );
    let mt = String::from_utf8(starling(&["join-token", "--data-dir", d0, "manager", "-q"]).stdout)
        .unwrap();
    let mut others = Vec::new();
    for (i, d) in dirs.iter().enumerate().skip(1) {
        let host = format!("m{}", i + 1);
        others.push(spawn(&[
            "join",
            "--data-dir",
            d.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--hostname",
            &host,
            "--token",
            mt.trim(),
            "--manager",
            &m1_addr,
        ]));
    }
    poll("three voters", Duration::from_secs(30), || {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "--unix-socket",
                dirs[0].join("control.sock").to_str()?,
                "http://x/v1/info",
            ])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["raft"]["voters"] == 3).then_some(())
    });
    drop(others); // kill -9 two of three managers
    let started = Instant::now();
    let put = starling(&["kv", "put", "--data-dir", d0, "q", "after"]);
    assert!(!put.status.success());
    let err = String::from_utf8_lossy(&put.stderr);
    assert!(
        err.contains("no quorum") && err.contains("1 of 3 managers reachable"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // Local state still answers, and says so.
    let stale = starling(&["kv", "get", "--data-dir", d0, "q", "--consistency", "stale"]);
    assert_eq!(String::from_utf8_lossy(&stale.stdout).trim(), "before");
    assert!(String::from_utf8_lossy(&stale.stderr).contains("stale"));
    let ls = starling(&["node", "ls", "--data-dir", d0]);
    assert!(ls.status.success());
    assert!(String::from_utf8_lossy(&ls.stderr).contains("no quorum"));
    // So does a join: refused with the quorum error.
    let wt = String::from_utf8(starling(&["join-token", "--data-dir", d0, "worker", "-q"]).stdout)
        .unwrap();
    let x = tmp.path().join("x");
    let join = starling(&[
        "join",
        "--data-dir",
        x.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--token",
        wt.trim(),
        "--manager",
        &m1_addr,
    ]);
    assert!(!join.status.success());
    assert!(
        String::from_utf8_lossy(&join.stderr).contains("no quorum"),
        "{}",
        String::from_utf8_lossy(&join.stderr)
    );
}
