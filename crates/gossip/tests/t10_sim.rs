//! Seeded simulations: 100 nodes on virtual time over a simulated network.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use starling_gossip::sim::{SimConfig, Simulator};
use starling_gossip::{Health, ServiceEndpoint};

const STEP: Duration = Duration::from_millis(50);
const N: usize = 100;

fn endpoint(service: &str, port: u16) -> ServiceEndpoint {
    ServiceEndpoint {
        service: service.into(),
        task: format!("{service}.1"),
        slot: "1".into(),
        addr: "10.1.0.1".into(),
        port,
        ports: std::collections::BTreeMap::from([("http".into(), port)]),
        health: Health::Healthy,
        ttl: None,
    }
}

fn converged(sim: &Simulator) -> bool {
    let live: Vec<usize> = sim.live().collect();
    live.iter().all(|i| sim.members_seen(*i) == live.len() - 1)
}

fn catalogs_full(sim: &Simulator) -> bool {
    sim.live().all(|i| sim.catalog(i).len() == sim.len())
}

fn cluster(seed: u64, loss: f64) -> Simulator {
    let cfg = SimConfig {
        seed,
        loss,
        ..SimConfig::default()
    };
    let mut sim = Simulator::cluster(cfg, N);
    let took = sim.run_until(STEP, Duration::from_secs(60), |s| {
        converged(s) && catalogs_full(s)
    });
    assert!(
        took.is_some(),
        "100 nodes did not converge in 60 s of virtual time"
    );
    sim
}

#[test]
fn t10_hundred_nodes_converge() {
    let sim = cluster(1, 0.0);
    for i in sim.live() {
        assert_eq!(sim.members_seen(i), N - 1);
        // Every node holds every node's (empty) record too.
        assert_eq!(sim.catalog(i).len(), N, "node {i}");
    }
}

#[test]
fn t11_killed_node_is_down_everywhere_within_the_bound() {
    let mut sim = cluster(2, 0.0);
    sim.kill(42);
    // 500 ms probes, Down 2.5 s after a suspicion; allow a few probe rounds.
    let bound = Duration::from_secs(20);
    let took = sim.run_until(STEP, bound, |s| s.live().all(|i| s.sees_down(i, 42)));
    assert!(
        took.is_some(),
        "node 42 not Down everywhere within {bound:?}"
    );
    // Its record is kept, marked: its endpoints leave the service view.
    assert!(sim.live().all(|i| sim.catalog(i).is_down("n42")));
}

#[test]
fn t12_record_change_reaches_every_live_node() {
    let mut sim = cluster(3, 0.0);
    let stamp = sim.publish(7, vec![endpoint("web", 8080)]);
    let took = sim.run_until(STEP, Duration::from_secs(10), |s| {
        s.fraction_with(7, stamp) == 1.0
    });
    assert!(took.is_some());
    for i in sim.live() {
        let services = sim.catalog(i).services();
        assert_eq!(services["web"][0].0, "n7");
    }
    // A second change supersedes the first everywhere.
    let stamp2 = sim.publish(7, vec![endpoint("web", 8081)]);
    assert!(stamp2 > stamp);
    assert!(
        sim.run_until(STEP, Duration::from_secs(10), |s| s
            .fraction_with(7, stamp2)
            == 1.0)
            .is_some()
    );
}

#[test]
fn t13_partition_heals() {
    let mut sim = cluster(4, 0.0);
    let a: Vec<usize> = (0..N / 2).collect();
    let b: Vec<usize> = (N / 2..N).collect();
    sim.partition(&a, &b);
    // Each side declares the other Down.
    let split = sim.run_until(STEP, Duration::from_secs(60), |s| {
        a.iter().all(|i| s.members_seen(*i) == a.len() - 1)
            && b.iter().all(|i| s.members_seen(*i) == b.len() - 1)
    });
    assert!(split.is_some(), "the sides did not separate");
    // A change on one side while split.
    let stamp = sim.publish(3, vec![endpoint("db", 5432)]);
    sim.heal();
    // SWIM announces to Down members periodically (every 65 s); refuted nodes
    // rejoin with a new generation.
    let healed = sim.run_until(STEP, Duration::from_secs(240), converged);
    assert!(healed.is_some(), "the partition did not heal");
    assert!(
        sim.run_until(STEP, Duration::from_secs(30), |s| s.fraction_with(3, stamp)
            == 1.0)
            .is_some()
    );
}

#[test]
fn t14_late_joiner_converges_without_new_changes() {
    let mut sim = cluster(5, 0.0);
    let mut stamps = Vec::new();
    for i in [1, 20, 55, 99] {
        stamps.push((i, sim.publish(i, vec![endpoint(&format!("s{i}"), 9000)])));
    }
    sim.run_for(Duration::from_secs(30));
    // Long after the notices stopped circulating, a new node joins.
    let late = sim.add_node();
    let took = sim.run_until(STEP, Duration::from_secs(60), |s| {
        stamps
            .iter()
            .all(|(i, st)| s.stamp_seen(late, *i).is_some_and(|x| x >= *st))
            && s.members_seen(late) == N
    });
    assert!(took.is_some(), "the late joiner did not converge");
    assert_eq!(sim.catalog(late).len(), N + 1);
}

#[test]
fn t15_restart_with_new_generation_replaces_old_identity() {
    let mut sim = cluster(6, 0.0);
    sim.kill(9);
    sim.run_for(Duration::from_secs(2));
    sim.restart(9);
    let stamp = sim.publish(9, vec![endpoint("api", 443)]);
    assert_eq!(stamp.0, 2, "second generation");
    let took = sim.run_until(STEP, Duration::from_secs(60), |s| {
        s.live()
            .filter(|i| *i != 9)
            .all(|i| s.generation_seen(i, 9) == Some(2))
            && s.fraction_with(9, stamp) == 1.0
    });
    assert!(took.is_some(), "the restarted node was not adopted");
    // No flood: never two identities of one node, and the restarted node learns everyone.
    let settled = sim.run_until(STEP, Duration::from_secs(10), |s| {
        assert!(
            s.live().all(|i| s.members_seen(i) < N),
            "a node counted twice"
        );
        converged(s)
    });
    assert!(settled.is_some(), "the membership did not settle");
}

#[test]
fn t16_same_seed_same_run() {
    let run = |seed| {
        let mut sim = Simulator::cluster(
            SimConfig {
                seed,
                loss: 0.05,
                ..SimConfig::default()
            },
            30,
        );
        sim.run_for(Duration::from_secs(10));
        let s = sim.publish(3, vec![endpoint("x", 1)]);
        sim.run_for(Duration::from_secs(3));
        (0..30)
            .map(|i| {
                (
                    sim.members_seen(i),
                    sim.stamp_seen(i, 3) >= Some(s),
                    sim.sent_bytes(i),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(9), run(9));
}

#[test]
fn t17_a_dead_member_stays_dead_through_push_pulls() {
    let mut sim = cluster(7, 0.0);
    sim.kill(17);
    let bound = Duration::from_secs(30);
    assert!(
        sim.run_until(STEP, bound, |s| s.live().all(|i| s.sees_down(i, 17)))
            .is_some()
    );
    // Many sync rounds later (each may push-pull memberships), nobody brought it back.
    for _ in 0..6 {
        sim.run_for(Duration::from_secs(10));
        assert!(sim.live().all(|i| sim.sees_down(i, 17)));
        assert!(sim.live().all(|i| sim.members_seen(i) == N - 2));
    }
}

#[test]
fn t18_a_graceful_leave_is_seen_everywhere() {
    let mut sim = cluster(8, 0.0);
    sim.leave(33);
    // Seen gone by every other node, and itself done lingering.
    let took = sim.run_until(STEP, Duration::from_secs(10), |s| {
        s.live()
            .all(|i| i != 33 && s.generation_seen(i, 33).is_none())
    });
    assert!(took.is_some(), "the leave did not spread");
    assert_eq!(sim.live().count(), N - 1);
}

#[test]
fn t19_changes_converge_without_pulls_and_without_digests() {
    use starling_gossip::RpcKind;
    // Without pulls (notices arrive, records never fetched that way): the digest exchange
    // brings the record everywhere.
    let mut sim = cluster(10, 0.0);
    sim.drop_requests(RpcKind::Pull, 1.0);
    let stamp = sim.publish(5, vec![endpoint("a", 1)]);
    assert!(
        sim.run_until(STEP, Duration::from_secs(60), |s| s.fraction_with(5, stamp)
            == 1.0)
            .is_some(),
        "digests alone did not converge"
    );
    // Without sync rounds: notices and pulls do it.
    let mut sim = cluster(11, 0.0);
    sim.drop_requests(RpcKind::Fingerprint, 1.0);
    sim.drop_requests(RpcKind::Digest, 1.0);
    let stamp = sim.publish(6, vec![endpoint("b", 2)]);
    assert!(
        sim.run_until(STEP, Duration::from_secs(10), |s| s.fraction_with(6, stamp)
            == 1.0)
            .is_some(),
        "notices alone did not converge"
    );
}

#[test]
fn t20_under_10_percent_loss_no_live_node_is_declared_down_and_the_dead_are_hidden_fast() {
    let cfg = SimConfig {
        seed: 11,
        ..SimConfig::default()
    };
    let mut sim = Simulator::cluster(cfg, 50);
    sim.run_until(STEP, Duration::from_secs(60), converged);
    sim.set_loss(0.10);
    let before = sim.detector_stats();
    sim.run_for(Duration::from_secs(300));
    let mid = sim.detector_stats();
    // Datagrams lost make direct probes fail; the member answers the probe asked again
    // over the reliable channel, so no suspicion is raised (and none gossiped).
    assert!(mid.rescued > before.rescued, "{mid:?}");
    assert_eq!(mid.suspected, before.suspected, "{mid:?}");
    assert_eq!(sim.false_downs(), 0, "{mid:?}");
    // Without that probe, suspicions follow, and every suspect answers the reliable
    // suspicion request. (Without both — SWIM alone — runs like this one declared a
    // live node Down.)
    sim.drop_requests(starling_gossip::RpcKind::Probe, 1.0);
    sim.run_for(Duration::from_secs(300));
    let stats = sim.detector_stats();
    assert!(stats.suspected > mid.suspected, "{stats:?}");
    assert!(stats.answered > mid.answered, "{stats:?}");
    assert_eq!(sim.false_downs(), 0, "{stats:?}");
    // A node that dies is still hidden from every other node's DNS within seconds.
    sim.kill(7);
    let hidden = sim.run_until(STEP, Duration::from_secs(10), |s| {
        s.live()
            .all(|i| s.sees_suspected(i, 7) || s.sees_down(i, 7))
    });
    assert!(hidden.is_some(), "the dead node is not hidden everywhere");
    let down = sim.run_until(STEP, Duration::from_secs(20), |s| {
        s.live().all(|i| s.sees_down(i, 7))
    });
    assert!(down.is_some(), "the dead node is not Down everywhere");
}

#[test]
fn t21_a_formed_cluster_is_the_state_a_join_converges_to_and_runs_the_same() {
    let joined = cluster(12, 0.0);
    let mut formed = Simulator::formed(
        SimConfig {
            seed: 12,
            ..SimConfig::default()
        },
        N,
    );
    // Every node already knows every member and record, as the joined nodes came to.
    assert!(converged(&formed) && catalogs_full(&formed));
    for i in 0..N {
        assert_eq!(
            formed.core(i).swim().fingerprint(),
            joined.core(i).swim().fingerprint(),
            "members of node {i}"
        );
        assert_eq!(
            formed.catalog(i).fingerprint(),
            joined.catalog(i).fingerprint(),
            "records of node {i}"
        );
        assert!(formed.core(i).is_synced());
    }
    // Steady: nothing to disseminate, nobody suspected.
    formed.run_for(Duration::from_secs(10));
    assert!(converged(&formed));
    assert_eq!(formed.false_downs(), 0);
    assert!((0..N).all(|i| formed.core(i).backlog().0 == 0));
    // A change reaches every node; a killed node is Down everywhere.
    let stamp = formed.publish(33, vec![endpoint("api", 9000)]);
    let reached = formed.run_until(STEP, Duration::from_secs(10), |s| {
        s.fraction_with(33, stamp) == 1.0
    });
    assert!(reached.is_some(), "the change did not reach every node");
    formed.kill(64);
    let down = formed.run_until(STEP, Duration::from_secs(20), |s| {
        s.live().all(|i| s.sees_down(i, 64))
    });
    assert!(down.is_some(), "the killed node is not Down everywhere");
    assert!(formed.live().all(|i| formed.catalog(i).is_down("n64")));
}
