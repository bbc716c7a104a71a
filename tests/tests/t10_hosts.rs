//! Multi-host scenarios: each node a real `starling` process in its own network namespace
//! (198.18.0.0/24 on one bridge), with kill -9, SIGSTOP and nftables faults.
//! Needs root, `ip` and `nft`; the tests run one at a time.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use starling_tests::cluster::{Cluster, encode, poll};

const SETTLE: Duration = Duration::from_secs(30);

fn id_of(c: &Cluster, host: usize) -> String {
    c.info(host).unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn row<'a>(rows: &'a [Value], hostname: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["hostname"] == hostname)
}

/// `(id, role, status)` of every node, sorted: what two managers must agree on.
fn summary(rows: &[Value]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or("").to_owned(),
                r["role"].as_str().unwrap_or("").to_owned(),
                r["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// How many other members host `i` sees alive through gossip.
fn alive_members(c: &Cluster, i: usize) -> usize {
    let Ok((_, v)) = c.api(i, "GET", "/v1/members", b"") else {
        return 0;
    };
    v["members"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["state"] == "alive").count())
}

fn applied(c: &Cluster, i: usize) -> Option<u64> {
    c.info(i)?["raft"]["applied"].as_u64()
}

/// Polls until a write through host `i` succeeds; returns its revision.
fn put_eventually(c: &Cluster, i: usize, key: &str, value: &str) -> u64 {
    poll(&format!("a write through host {}", i + 1), SETTLE, || {
        c.put(i, key, value).ok()
    })
}

/// Polls until every host in `hosts` has applied the same index and answers `key` with
/// `value` from its local state.
fn converged(c: &Cluster, hosts: &[usize], key: &str, value: &str) {
    poll(
        "the managers at one revision with the last write",
        SETTLE,
        || {
            let revs: Vec<u64> = hosts.iter().filter_map(|&i| applied(c, i)).collect();
            let same = revs.len() == hosts.len() && revs.windows(2).all(|w| w[0] == w[1]);
            let seen = hosts
                .iter()
                .all(|&i| matches!(c.get(i, key, "stale"), Ok((Some((v, _)), _)) if v == value));
            (same && seen).then_some(())
        },
    );
}

#[test]
fn t10_three_managers_and_three_workers_form_a_cluster_on_six_hosts() {
    let c = Cluster::form(3, 3);
    let on_first = poll("node ls on every manager", SETTLE, || {
        let first = summary(&c.nodes(0)?);
        (1..3)
            .all(|i| c.nodes(i).is_some_and(|r| summary(&r) == first))
            .then_some(first)
    });
    assert_eq!(on_first.len(), 6);
    let rows = c.nodes(1).unwrap();
    for i in 0..6 {
        let r = row(&rows, &format!("h{}", i + 1)).unwrap();
        // Each node reports the address of its own host, not loopback.
        assert_eq!(r["addr"], c.addr(i), "{r}");
        assert_eq!(r["status"], "ready");
        assert_eq!(r["role"], if i < 3 { "manager" } else { "worker" });
    }
    let leaders = rows
        .iter()
        .filter(|r| r["manager_status"] == "leader")
        .count();
    assert_eq!(leaders, 1);
    // Workers hold no cluster state: they say so instead of answering.
    let (status, body) = c.api(4, "GET", "/v1/nodes", b"").unwrap();
    assert_eq!(status, 503, "{body}");
    // Gossip spans every host: a worker sees all six alive.
    poll("a worker sees the five others alive", SETTLE, || {
        (alive_members(&c, 5) == 5).then_some(())
    });
}

#[test]
fn t11_killed_leader_is_replaced_and_rejoins_as_a_follower() {
    let mut c = Cluster::form(3, 0);
    let all = [0, 1, 2];
    let old = c.wait_leader(&all, SETTLE);
    c.put(old, "k", "before").unwrap();
    c.kill(old);
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    let new = c.wait_leader(&rest, SETTLE);
    assert_ne!(new, old);
    put_eventually(&c, rest[0], "k", "during");
    put_eventually(&c, rest[1], "k", "after");
    c.restart(old);
    // The old leader follows the new one and has the writes made without it.
    poll("the old leader follows", SETTLE, || {
        let l = c.leader(&all)?;
        (l != old).then_some(())
    });
    converged(&c, &all, "k", "after");
    let (v, _) = c.get(old, "k", "linearizable").unwrap();
    assert_eq!(v.unwrap().0, "after");
    poll(
        "the old leader reachable and ready in node ls",
        SETTLE,
        || {
            let rows = c.nodes(new)?;
            let r = row(&rows, &format!("h{}", old + 1))?;
            (r["manager_status"] == "reachable" && r["status"] == "ready").then_some(())
        },
    );
    // Back in gossip too, under a new generation, seen alive by the others and seeing them.
    poll("the old leader alive in gossip both ways", SETTLE, || {
        (alive_members(&c, old) == 2 && rest.iter().all(|&i| alive_members(&c, i) == 2))
            .then_some(())
    });
    // And it stays so (the leader's liveness would flip it to down within ~12 s otherwise).
    std::thread::sleep(Duration::from_secs(15));
    let rows = c.nodes(new).unwrap();
    assert_eq!(
        row(&rows, &format!("h{}", old + 1)).unwrap()["status"],
        "ready"
    );
    assert_eq!(alive_members(&c, old), 2);
}

#[test]
fn t12_a_manager_cut_off_cannot_write_while_the_majority_can_and_catches_up() {
    let c = Cluster::form(3, 0);
    let all = [0, 1, 2];
    let leader = c.wait_leader(&all, SETTLE);
    let island = (leader + 1) % 3;
    let majority: Vec<usize> = all.iter().copied().filter(|&i| i != island).collect();
    c.put(leader, "k", "before").unwrap();
    // The write is acknowledged once two of three have it: the island must have it too
    // before it is cut off, or its stale read below has nothing to show.
    converged(&c, &all, "k", "before");
    c.net.isolate(island).unwrap();
    // Once the island has noticed that its leader went quiet, it has no quorum: its write
    // fails, fast and clearly. (A write sent before it noticed would be outcome_unknown: it
    // may have reached the leader.)
    poll("the island notices the silence", SETTLE, || {
        (c.info(island)?["raft"]["last_contact_ms"].as_u64()? > 500).then_some(())
    });
    let started = Instant::now();
    let err = poll("the island refuses a write", SETTLE, || {
        c.put(island, "k", "island").err()
    });
    assert_eq!(err.0, 503, "{err:?}");
    assert!(err.1.contains("no quorum"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The majority goes on.
    for i in 0..20 {
        put_eventually(&c, majority[i % 2], "k", &format!("majority-{i}"));
    }
    let (v, _) = c.get(island, "k", "stale").unwrap();
    assert_eq!(
        v.unwrap().0,
        "before",
        "the island saw a write it could not have"
    );
    c.net.heal().unwrap();
    converged(&c, &all, "k", "majority-19");
    // And it writes again.
    put_eventually(&c, island, "k", "healed");
    converged(&c, &all, "k", "healed");
}

#[test]
fn t13_all_managers_killed_then_restarted_one_by_one() {
    let mut c = Cluster::form(3, 0);
    let all = [0, 1, 2];
    let leader = c.wait_leader(&all, SETTLE);
    let mut acked = Vec::new();
    for i in 0..50 {
        let key = format!("k{i}");
        c.put(leader, &key, &format!("v{i}")).unwrap();
        acked.push(key);
    }
    for i in all {
        c.kill(i);
    }
    c.restart(0);
    // Alone, it serves nothing that needs a quorum.
    let err = c.put(0, "late", "x").unwrap_err();
    assert_eq!(err.0, 503, "{err:?}");
    assert!(c.get(0, "k0", "linearizable").is_err());
    c.restart(1);
    put_eventually(&c, 1, "late", "y");
    for (i, key) in acked.iter().enumerate() {
        let (v, _) = c.get(0, key, "linearizable").unwrap();
        assert_eq!(
            v.unwrap().0,
            format!("v{i}"),
            "acknowledged write {key} lost"
        );
    }
    let (v, _) = c.get(0, "late", "linearizable").unwrap();
    assert_eq!(v.unwrap().0, "y", "the refused write must not appear");
    c.restart(2);
    converged(&c, &all, "late", "y");
    let (v, _) = c.get(2, "k49", "stale").unwrap();
    assert_eq!(v.unwrap().0, "v49");
}

#[test]
fn t14_without_quorum_writes_and_joins_fail_fast_and_everything_resumes() {
    let mut c = Cluster::new(6);
    c.init(0);
    let mt = c.token(0, "manager");
    let wt = c.token(0, "worker");
    c.join(1, &mt, 0);
    c.join(2, &mt, 0);
    c.join(3, &wt, 0);
    c.join(4, &wt, 0);
    poll("five ready", SETTLE, || {
        let rows = c.nodes(0)?;
        (rows.len() == 5 && rows.iter().all(|r| r["status"] == "ready")).then_some(())
    });
    put_eventually(&c, 0, "k", "before");
    // Every worker has met every manager before they go.
    poll("the workers see the four others alive", SETTLE, || {
        [3, 4]
            .iter()
            .all(|&w| alive_members(&c, w) == 4)
            .then_some(())
    });
    c.kill(1);
    c.kill(2);
    let started = Instant::now();
    let err = c.put(0, "k", "lost").unwrap_err();
    assert_eq!(err.0, 503, "{err:?}");
    assert!(
        err.1.contains("no quorum") && err.1.contains("1 of 3"),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // A join fails, and says why.
    let joined = c.join_to_end(5, &wt, 0, Duration::from_secs(40));
    assert_eq!(joined, Some(false), "a join without quorum must fail");
    assert!(c.log(5).contains("no quorum"), "{}", c.log(5));
    // Stale reads answer; node ls answers from local state with a warning.
    let (v, _) = c.get(0, "k", "stale").unwrap();
    assert_eq!(v.unwrap().0, "before");
    let (status, body) = c.api(0, "GET", "/v1/nodes", b"").unwrap();
    assert_eq!(status, 200);
    assert!(body["warning"].as_str().unwrap_or("").contains("no quorum"));
    // Workers keep gossiping with each other and the remaining manager.
    let mut last = Value::Null;
    let deadline = Instant::now() + SETTLE;
    let gossiping = std::iter::from_fn(|| {
        std::thread::sleep(Duration::from_millis(100));
        (Instant::now() < deadline).then_some(())
    })
    .any(|()| {
        let Ok((_, v)) = c.api(3, "GET", "/v1/members", b"") else {
            return false;
        };
        last = v.clone();
        let Some(members) = v["members"].as_array() else {
            return false;
        };
        let alive = |addr: &str| {
            members
                .iter()
                .any(|m| m["addr"] == addr && m["state"] == "alive")
        };
        let down = |addr: &str| {
            members
                .iter()
                .any(|m| m["addr"] == addr && m["state"] == "down")
        };
        alive(&c.addr(0)) && alive(&c.addr(4)) && down(&c.addr(1)) && down(&c.addr(2))
    });
    assert!(gossiping, "workers do not gossip on: h4 sees {last}");
    // Managers back: everything resumes by itself.
    // The failed join left nothing behind to clean; a second join starts afresh.
    assert!(!c.dir(5).join("node.json").exists());
    c.restart(1);
    c.restart(2);
    put_eventually(&c, 0, "k", "after");
    c.join(5, &wt, 0);
    poll("six ready", SETTLE, || {
        let rows = c.nodes(0)?;
        (rows.len() == 6 && rows.iter().all(|r| r["status"] == "ready")).then_some(())
    });
}

#[test]
fn t15_a_killed_worker_goes_down_on_every_manager_and_comes_back_ready() {
    let mut c = Cluster::form(3, 1);
    let status_everywhere = |c: &Cluster, want: &str| {
        (0..3).all(|i| {
            c.nodes(i)
                .and_then(|rows| row(&rows, "h4").map(|r| r["status"] == want))
                .unwrap_or(false)
        })
    };
    c.kill(3);
    let started = Instant::now();
    // The bound: a failed probe (≤ 1 s with 500 ms probes), Down 2.5 s after the unanswered
    // suspicion, then the leader's 1 s before it records `down` and a liveness round
    // (0.5 s) — about 5 s, or ~3.8 s when the worker's agent session was with the leader
    // (session silence + a failed handshake + suspicion). It was ~11.6 s with foca's LAN
    // preset (the gossip crate has its own SWIM since). The bound leaves room for a loaded machine.
    let bound = Duration::from_secs(20);
    poll("the worker down on every manager", bound, || {
        status_everywhere(&c, "down").then_some(())
    });
    eprintln!("worker down everywhere after {:?}", started.elapsed());
    c.restart(3);
    poll("the worker ready again", SETTLE, || {
        status_everywhere(&c, "ready").then_some(())
    });
}

#[test]
fn t16_promote_a_worker_and_demote_a_manager_across_hosts() {
    let mut c = Cluster::form(3, 1);
    let worker = id_of(&c, 3);
    let (status, body) = c
        .api(1, "POST", &format!("/v1/nodes/{worker}/promote"), b"")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    poll("four voters and h4 a reachable manager", SETTLE, || {
        let l = c.leader(&[0, 1, 2, 3])?;
        let voters = c.info(l)?["raft"]["voters"].as_u64()?;
        let rows = c.nodes(l)?;
        let r = row(&rows, "h4")?;
        (voters == 4 && r["role"] == "manager" && r["manager_status"] != "unreachable")
            .then_some(())
    });
    // h4 now serves manager calls itself.
    poll("h4 serves node ls", SETTLE, || c.nodes(3));
    // Demote the leader, across hosts: leadership moves, the voter set shrinks to three.
    let leader = c.wait_leader(&[0, 1, 2, 3], SETTLE);
    let demoted_id = id_of(&c, leader);
    let via = (leader + 1) % 4;
    let (status, body) = c
        .api(via, "POST", &format!("/v1/nodes/{demoted_id}/demote"), b"")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let managers: Vec<usize> = (0..4).filter(|&i| i != leader).collect();
    poll("three voters, the old leader a worker", SETTLE, || {
        let l = c.leader(&managers)?;
        let voters = c.info(l)?["raft"]["voters"].as_u64()?;
        let rows = c.nodes(l)?;
        let r = row(&rows, &format!("h{}", leader + 1))?;
        (voters == 3 && r["role"] == "worker").then_some(())
    });
    poll("the demoted node runs as a worker", SETTLE, || {
        let (status, _) = c.api(leader, "GET", "/v1/nodes", b"").ok()?;
        (status == 503).then_some(())
    });
    // Quorum is two of the three managers now: one more down, writes go on.
    let l = c.wait_leader(&managers, SETTLE);
    let victim = *managers.iter().find(|&&i| i != l).unwrap();
    c.kill(victim);
    put_eventually(&c, l, "k", "two of three");
}

#[test]
fn t17_a_manager_joining_after_20000_writes_catches_up_by_snapshot() {
    let mut c = Cluster::new(4);
    // Snapshots every 5 000 entries (the log behind them trimmed to 1 000): the new manager
    // cannot be sent the log from the start.
    c.set_env("STARLING_SNAPSHOT_INTERVAL", "5000");
    c.init(0);
    let mt = c.token(0, "manager");
    c.join(1, &mt, 0);
    c.join(2, &mt, 0);
    let leader = c.wait_leader(&[0, 1, 2], SETTLE);
    // 20 000 writes from 16 clients.
    std::thread::scope(|s| {
        for t in 0..16 {
            let c = &c;
            s.spawn(move || {
                for n in (t..20_000).step_by(16) {
                    c.put(leader, &format!("key/{n:05}"), &format!("value-{n}"))
                        .unwrap();
                }
            });
        }
    });
    let before = applied(&c, leader).unwrap();
    assert!(before >= 20_000);
    c.join(3, &mt, leader);
    poll("the new manager votes", Duration::from_secs(60), || {
        let l = c.leader(&[0, 1, 2, 3])?;
        let voters = c.info(l)?["raft"]["voters"].as_u64()?;
        (voters == 4).then_some(())
    });
    let log = c.log(3);
    assert!(
        log.contains("snapshot installed"),
        "the new manager did not install a snapshot:\n{}",
        c.log_tail(3, 30)
    );
    let (v, _) = c.get(3, "key/19999", "stale").unwrap();
    assert_eq!(v.unwrap().0, "value-19999");
    let (v, _) = c.get(3, "key/00000", "stale").unwrap();
    assert_eq!(v.unwrap().0, "value-0");
}

#[test]
fn t18_a_paused_leader_is_replaced_and_steps_down_when_resumed() {
    use starling_tests::linearizability::{Event, History, Op, Outcome, Ret};
    let mut c = Cluster::form(3, 0);
    let all = [0, 1, 2];
    let old = c.wait_leader(&all, SETTLE);
    c.put(old, "p", "first").unwrap();
    let t0 = Instant::now();
    let ns = |t: Instant| t.duration_since(t0).as_nanos() as u64;
    let mut history = History::new();
    c.pause(old);
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    std::thread::scope(|s| {
        // A write sent to the paused leader: no answer while it sleeps.
        let socket = c.socket(old);
        let paused_write = s.spawn(move || {
            let invoke = ns(Instant::now());
            let r = starling_tests::cluster::call(
                &socket,
                "PUT",
                "/v1/kv/p",
                b"while-paused",
                Duration::from_secs(30),
            );
            (invoke, r, ns(Instant::now()))
        });
        let new = c.wait_leader(&rest, SETTLE);
        assert_ne!(new, old);
        let invoke = ns(Instant::now());
        let rev = put_eventually(&c, new, "p", "new-leader");
        history.push(Event {
            client: 2,
            key: "p".into(),
            op: Op::Put {
                value: "new-leader".into(),
            },
            invoke,
            outcome: Outcome::Ok(Ret::Written { revision: rev }),
            complete: ns(Instant::now()),
        });
        c.resume(old);
        let (invoke, r, complete) = paused_write.join().unwrap();
        history.push(Event {
            client: 1,
            key: "p".into(),
            op: Op::Put {
                value: "while-paused".into(),
            },
            invoke,
            outcome: match r {
                Ok((200, v)) => Outcome::Ok(Ret::Written {
                    revision: v["revision"].as_u64().unwrap(),
                }),
                _ => Outcome::Unknown,
            },
            complete,
        });
    });
    // The old leader steps down and follows.
    poll("the resumed leader follows", SETTLE, || {
        let l = c.leader(&all)?;
        (l != old).then_some(())
    });
    for i in all {
        let invoke = ns(Instant::now());
        let (v, _) = c.get(i, "p", "linearizable").unwrap();
        history.push(Event {
            client: 10 + i as u64,
            key: "p".into(),
            op: Op::Get,
            invoke,
            outcome: Outcome::Ok(Ret::Read(v)),
            complete: ns(Instant::now()),
        });
    }
    if let Err(v) = history.check() {
        panic!("{v}");
    }
}

#[test]
fn t19_foreign_removed_and_misplaced_peers_are_refused_across_hosts() {
    let mut c = Cluster::new(5);
    c.init(0);
    let wt = c.token(0, "worker");
    c.join(1, &wt, 0);
    c.join(2, &wt, 0);
    // Another cluster on host 4.
    c.init(3);
    let probe = std::path::Path::new(env!("CARGO_BIN_EXE_starling-probe"));
    let manager = id_of(&c, 0);
    let dial = |c: &Cluster, from: usize, creds: usize, alpn: &str| {
        starling_tests::probe::dial(
            probe,
            &c.net.hosts[from].ns,
            c.dir(creds),
            alpn,
            &manager,
            &c.addr(0),
        )
    };
    // A worker of this cluster reaches gossip but not Raft.
    let ok = dial(&c, 1, 1, "starling/gossip/3");
    assert!(ok.is_ok(), "{ok:?}");
    let raft = dial(&c, 1, 1, "starling/raft/1");
    assert!(raft.is_err(), "a worker reached the raft protocol");
    // A node of another cluster is refused, whatever the protocol.
    for alpn in ["starling/gossip/3", "starling/raft/1"] {
        let r = dial(&c, 3, 3, alpn);
        assert!(r.is_err(), "a foreign node reached {alpn}");
    }
    // A removed node is refused.
    let removed = id_of(&c, 2);
    c.kill(2);
    poll("h3 down", SETTLE, || {
        let rows = c.nodes(0)?;
        (row(&rows, "h3")?["status"] == "down").then_some(())
    });
    let (status, body) = c
        .api(0, "DELETE", &format!("/v1/nodes/{removed}"), b"")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    poll("the removed node refused", SETTLE, || {
        dial(&c, 2, 2, "starling/gossip/3").is_err().then_some(())
    });
    // The keys that once held system state are user data now: deleting or writing them
    // changes nothing but user data, and the removed node stays refused.
    for (method, key, body) in [
        ("DELETE", format!("_starling/removed/{removed}"), ""),
        ("PUT", "_starling/raft-id/x".to_owned(), "1"),
        ("PUT", "_starling/next-raft-id".to_owned(), "2"),
    ] {
        let (status, body) = c
            .api(
                0,
                method,
                &format!("/v1/kv/{}", encode(&key)),
                body.as_bytes(),
            )
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // Managers re-read the revoked set every second: it must hold across several rounds.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let r = dial(&c, 2, 2, "starling/gossip/3");
        assert!(r.is_err(), "the removed node was let back in: {r:?}");
    }
    // A wrong token, and a token of the other cluster, are refused with a clear error.
    let other = c.token(3, "worker");
    for token in [wt.replace(&wt[wt.len() - 6..], "AAAAAA"), other] {
        let _ = std::fs::remove_dir_all(c.dir(4));
        let joined = c.join_to_end(4, &token, 0, Duration::from_secs(30));
        assert_eq!(
            joined,
            Some(false),
            "a join with token {token} was not refused"
        );
    }
    let rows = c.nodes(0).unwrap();
    assert_eq!(rows.len(), 2, "only h1 and h2 remain: {rows:?}");
}
