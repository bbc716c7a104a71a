//! Autopilot (off by default, as Consul's): the leader removes a manager that has been down
//! too long from the voters, and promotes healthy workers to keep the managers odd and at a
//! minimum. This is the pure decision, one step at a time; the leader's driver feeds it what
//! it observes, carries the step out (a demotion through Raft, or a promotion the worker
//! picks up through its dispatcher session) and logs it.
//!
//! It never acts without a quorum, never removes the last manager, removes a dead manager
//! only when the live voters remain a majority of those left, and promotes only while every
//! voter answers (adding a voter to an unhealthy group could cost the quorum it has).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use starling_state::{Autopilot, Availability, NodeRecord, NodeRole, NodeStatus, Placement};

/// What the leader sees.
#[derive(Debug, Clone, Default)]
pub struct View<'a> {
    /// Every node's record.
    pub nodes: Vec<&'a NodeRecord>,
    /// The voters, by node id.
    pub voters: BTreeSet<String>,
    /// The voters that answered the leader lately, the leader included.
    pub reachable: BTreeSet<String>,
    /// For nodes marked down: how long they have been down, as this leader saw it.
    pub down_for: BTreeMap<String, Duration>,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Take this dead manager out of the voters (it stays in the node list, as a worker that
    /// is down).
    Remove {
        /// Its node id.
        node: String,
        /// Why, for the log.
        why: String,
    },
    /// Make this worker a manager.
    Promote {
        /// Its node id.
        node: String,
        /// Why, for the log.
        why: String,
    },
}

/// The next step, if any.
pub fn next_step(cfg: &Autopilot, view: &View<'_>) -> Option<Step> {
    if !cfg.cleanup_dead_managers || view.voters.is_empty() {
        return None;
    }
    let voters = view.voters.len();
    let live: BTreeSet<&String> = view.voters.intersection(&view.reachable).collect();
    if live.len() * 2 <= voters {
        return None;
    }
    // A manager record out of the voters whose node is down: a demotion that stopped half
    // way, or a promotion its node never took up. Finished first (retired), or it would
    // block everything below.
    if let Some(stuck) = view.nodes.iter().find(|n| {
        (n.role == NodeRole::Manager || n.desired_role == NodeRole::Manager)
            && !view.voters.contains(&n.id)
            && n.status == NodeStatus::Down
    }) {
        return Some(Step::Remove {
            node: stuck.id.clone(),
            why: "recorded as a manager (or being promoted) but out of the voters, and down".into(),
        });
    }
    // One membership change at a time: a promotion still under way comes first.
    let promoting = view
        .nodes
        .iter()
        .any(|n| n.desired_role == NodeRole::Manager && !view.voters.contains(&n.id));
    if promoting {
        return None;
    }
    let dead_after = Duration::from_secs(cfg.dead_after_secs);
    let mut dead: Vec<(&String, Duration)> = view
        .voters
        .iter()
        .filter(|v| !view.reachable.contains(*v))
        .filter_map(|v| view.down_for.get(v).map(|d| (v, *d)))
        .filter(|(_, d)| *d >= dead_after)
        .collect();
    dead.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if let Some((node, down)) = dead.first()
        && voters > 1
        && live.len() * 2 > voters - 1
    {
        return Some(Step::Remove {
            node: (*node).clone(),
            why: format!(
                "down for {} s (threshold {} s); {} of the {} other voters answer",
                down.as_secs(),
                cfg.dead_after_secs,
                live.len(),
                voters - 1
            ),
        });
    }
    if live.len() < voters {
        return None;
    }
    let below = voters < cfg.min_managers as usize;
    if !below && voters % 2 == 1 {
        return None;
    }
    let placement = Placement {
        constraints: cfg.promote_constraints.clone(),
        ..Placement::default()
    };
    let mut candidates: Vec<&&NodeRecord> = view
        .nodes
        .iter()
        .filter(|n| {
            n.role == NodeRole::Worker
                && n.desired_role == NodeRole::Worker
                && n.status == NodeStatus::Ready
                && n.availability == Availability::Active
                && crate::scheduler::constraints_hold(&placement, n)
        })
        .collect();
    candidates.sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
    let chosen = candidates.first()?;
    Some(Step::Promote {
        node: chosen.id.clone(),
        why: if below {
            format!(
                "{voters} managers, fewer than the minimum {}",
                cfg.min_managers
            )
        } else {
            format!("{voters} managers: an even count")
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use starling_state::{Constraint, ConstraintKey};

    fn node(id: &str, role: NodeRole, status: NodeStatus) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            hostname: id.into(),
            addr: "127.0.0.1:1".into(),
            role: role.clone(),
            desired_role: role,
            availability: Availability::Active,
            status,
            labels: BTreeMap::new(),
            cert_serial: String::new(),
            cert_not_after: 0,
            cert_ca: String::new(),
            cert_key: String::new(),
            version: 1,
            created_revision: 1,
            updated_revision: 1,
        }
    }

    fn on() -> Autopilot {
        Autopilot {
            cleanup_dead_managers: true,
            min_managers: 3,
            dead_after_secs: 600,
            promote_constraints: Vec::new(),
        }
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// m1..m3 voters (m3 down for `m3_down`), w1 and w2 ready workers.
    fn cluster(m3_down: Option<u64>) -> (Vec<NodeRecord>, BTreeMap<String, Duration>) {
        let m3 = if m3_down.is_some() {
            NodeStatus::Down
        } else {
            NodeStatus::Ready
        };
        let nodes = vec![
            node("m1", NodeRole::Manager, NodeStatus::Ready),
            node("m2", NodeRole::Manager, NodeStatus::Ready),
            node("m3", NodeRole::Manager, m3),
            node("w2", NodeRole::Worker, NodeStatus::Ready),
            node("w1", NodeRole::Worker, NodeStatus::Ready),
        ];
        let down = m3_down
            .map(|s| BTreeMap::from([("m3".to_owned(), Duration::from_secs(s))]))
            .unwrap_or_default();
        (nodes, down)
    }

    fn view<'a>(
        nodes: &'a [NodeRecord],
        voters: &[&str],
        reachable: &[&str],
        down_for: BTreeMap<String, Duration>,
    ) -> View<'a> {
        View {
            nodes: nodes.iter().collect(),
            voters: set(voters),
            reachable: set(reachable),
            down_for,
        }
    }

    #[test]
    fn off_by_default_and_nothing_to_do_when_healthy() {
        let (nodes, down) = cluster(Some(3600));
        let v = view(&nodes, &["m1", "m2", "m3"], &["m1", "m2"], down);
        assert_eq!(next_step(&Autopilot::default(), &v), None);
        let (nodes, _) = cluster(None);
        let v = view(
            &nodes,
            &["m1", "m2", "m3"],
            &["m1", "m2", "m3"],
            BTreeMap::new(),
        );
        assert_eq!(next_step(&on(), &v), None);
    }

    #[test]
    fn a_manager_down_past_the_threshold_is_removed_then_a_worker_promoted() {
        let (nodes, down) = cluster(Some(599));
        let v = view(&nodes, &["m1", "m2", "m3"], &["m1", "m2"], down);
        assert_eq!(next_step(&on(), &v), None, "not yet: below the threshold");
        let (nodes, down) = cluster(Some(601));
        let v = view(&nodes, &["m1", "m2", "m3"], &["m1", "m2"], down.clone());
        assert!(matches!(next_step(&on(), &v), Some(Step::Remove { node, .. }) if node == "m3"));
        // Removed (recorded as a worker, down): two voters, both live, fewer than three:
        // the first ready worker by name.
        let mut nodes = nodes;
        nodes[2].role = NodeRole::Worker;
        nodes[2].desired_role = NodeRole::Worker;
        let v = view(&nodes, &["m1", "m2"], &["m1", "m2"], down);
        let Some(Step::Promote { node, why }) = next_step(&on(), &v) else {
            panic!("expected a promotion");
        };
        assert_eq!(node, "w1");
        assert!(why.contains("fewer than the minimum 3"), "{why}");
    }

    #[test]
    fn never_without_quorum_and_never_the_last_manager() {
        let (nodes, down) = cluster(Some(3600));
        // Two of three unreachable: no quorum, no step.
        let v = view(&nodes, &["m1", "m2", "m3"], &["m1"], down.clone());
        assert_eq!(next_step(&on(), &v), None);
        // Two voters, one dead: removing it would leave one of one, but the group has no
        // quorum now (1 of 2), so nothing is done.
        let v = view(&nodes, &["m1", "m3"], &["m1"], down.clone());
        assert_eq!(next_step(&on(), &v), None);
        // A single voter is never removed (it is the leader, and reachable anyway).
        let v = view(&nodes, &["m3"], &["m3"], down);
        assert!(!matches!(next_step(&on(), &v), Some(Step::Remove { .. })));
    }

    #[test]
    fn removal_keeps_a_majority_of_the_voters_left() {
        // Five voters, two dead: removing one leaves 3 live of 4: allowed.
        let mut nodes = vec![];
        for m in ["m1", "m2", "m3", "m4", "m5"] {
            nodes.push(node(m, NodeRole::Manager, NodeStatus::Ready));
        }
        let down = BTreeMap::from([
            ("m4".to_owned(), Duration::from_secs(700)),
            ("m5".to_owned(), Duration::from_secs(900)),
        ]);
        let v = view(
            &nodes,
            &["m1", "m2", "m3", "m4", "m5"],
            &["m1", "m2", "m3"],
            down,
        );
        // The one down longest first.
        assert!(matches!(next_step(&on(), &v), Some(Step::Remove { node, .. }) if node == "m5"));
    }

    #[test]
    fn a_half_done_demotion_or_a_dead_promotion_is_finished_first() {
        let (mut nodes, _) = cluster(None);
        // m3 out of the voters, still recorded as a manager, down.
        nodes[2].status = NodeStatus::Down;
        let v = view(&nodes, &["m1", "m2"], &["m1", "m2"], BTreeMap::new());
        assert!(matches!(next_step(&on(), &v), Some(Step::Remove { node, .. }) if node == "m3"));
        // w1 being promoted, but down.
        let (mut nodes, _) = cluster(None);
        nodes[4].desired_role = NodeRole::Manager;
        nodes[4].status = NodeStatus::Down;
        let three = ["m1", "m2", "m3"];
        let v = view(&nodes, &three, &three, BTreeMap::new());
        assert!(matches!(next_step(&on(), &v), Some(Step::Remove { node, .. }) if node == "w1"));
    }

    #[test]
    fn promotion_waits_for_a_promotion_under_way_and_an_unhealthy_group() {
        let (mut nodes, _) = cluster(None);
        // Two voters, m3 still a worker being promoted: wait.
        nodes[2].role = NodeRole::Worker;
        let v = view(&nodes, &["m1", "m2"], &["m1", "m2"], BTreeMap::new());
        assert_eq!(next_step(&on(), &v), None);
        // Two voters, one not answering (below the threshold): no promotion.
        let (nodes, down) = cluster(Some(10));
        let v = view(&nodes, &["m1", "m3"], &["m1"], down);
        assert_eq!(next_step(&on(), &v), None);
    }

    #[test]
    fn an_even_count_is_made_odd_and_constraints_choose_the_worker() {
        let (mut nodes, _) = cluster(None);
        let four = ["m1", "m2", "m3", "w9"];
        nodes.push(node("w9", NodeRole::Manager, NodeStatus::Ready));
        nodes[4].labels.insert("zone".into(), "b".into());
        let cfg = Autopilot {
            promote_constraints: vec![Constraint {
                key: ConstraintKey::Label("zone".into()),
                equal: true,
                value: "b".into(),
            }],
            ..on()
        };
        let v = view(&nodes, &four, &four, BTreeMap::new());
        let Some(Step::Promote { node, why }) = next_step(&cfg, &v) else {
            panic!("expected a promotion");
        };
        assert_eq!(node, "w1", "the only worker in zone b");
        assert!(why.contains("even"), "{why}");
        // No worker qualifies: nothing.
        nodes[4].labels.clear();
        let v = view(&nodes, &four, &four, BTreeMap::new());
        assert_eq!(next_step(&cfg, &v), None);
        // A drained or down worker is never promoted.
        let (mut nodes, _) = cluster(None);
        nodes[3].availability = Availability::Drain;
        nodes[4].status = NodeStatus::Down;
        let v = view(&nodes, &["m1", "m2"], &["m1", "m2"], BTreeMap::new());
        assert_eq!(next_step(&on(), &v), None);
    }
}
