//! Liveness reconciliation: the Raft leader turns gossip's view of members into node status
//! in the replicated state — `down` after a grace period, `ready` when the node is back — and
//! marks nothing down for a longer grace right after it became leader (a new leader's gossip
//! view may still be settling). Pure: it takes `now` and returns the commands to write.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use starling_raft_store::{Command, NodeRecord, NodeStatus};

/// Grace periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// A node gossip reports Down for this long is marked `down`.
    pub down_after: Duration,
    /// After becoming leader, mark nothing down for this long.
    pub leader_grace: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            // Gossip's Down is itself confirmed: a suspicion that lasted 2.5 s and that the
            // suspect did not answer over a reliable request (see starling-gossip's core).
            down_after: Duration::from_secs(1),
            leader_grace: Duration::from_secs(10),
        }
    }
}

/// The reconciler's memory between rounds.
#[derive(Debug, Default)]
pub struct Liveness {
    /// Since when each node has been seen not-alive (this leadership).
    not_alive_since: BTreeMap<String, Instant>,
    leader_since: Option<Instant>,
}

impl Liveness {
    /// A reconciler that has not led yet.
    pub fn new() -> Self {
        Liveness::default()
    }

    /// One round. `leading`: whether this manager leads now; `alive`: node ids gossip reports
    /// alive (this node included); `unreachable`: nodes whose agent session went silent and
    /// that failed a direct probe (two signals: marked `down` at once, without the grace
    /// gossip alone gets); `records`: the nodes in the replicated state. Returns the status
    /// changes to write.
    pub fn round(
        &mut self,
        cfg: &LivenessConfig,
        now: Instant,
        leading: bool,
        alive: &BTreeSet<String>,
        unreachable: &BTreeSet<String>,
        records: &[NodeRecord],
    ) -> Vec<Command> {
        if !leading {
            self.leader_since = None;
            self.not_alive_since.clear();
            return Vec::new();
        }
        let since = *self.leader_since.get_or_insert(now);
        let in_grace = now.duration_since(since) < cfg.leader_grace;
        let mut out = Vec::new();
        for r in records {
            // Two direct signals (its session with this manager went silent, and it fails a
            // probe) need no settling time: not even a new leader's grace.
            if unreachable.contains(&r.id) {
                if r.status != NodeStatus::Down {
                    out.push(Command::SetNodeStatus {
                        id: r.id.clone(),
                        status: NodeStatus::Down,
                    });
                }
                self.not_alive_since.entry(r.id.clone()).or_insert(now);
                continue;
            }
            if alive.contains(&r.id) {
                self.not_alive_since.remove(&r.id);
                if r.status != NodeStatus::Ready {
                    out.push(Command::SetNodeStatus {
                        id: r.id.clone(),
                        status: NodeStatus::Ready,
                    });
                }
                continue;
            }
            let first = *self.not_alive_since.entry(r.id.clone()).or_insert(now);
            if r.status == NodeStatus::Down || in_grace {
                continue;
            }
            if now.duration_since(first) >= cfg.down_after {
                out.push(Command::SetNodeStatus {
                    id: r.id.clone(),
                    status: NodeStatus::Down,
                });
            }
        }
        self.not_alive_since
            .retain(|id, _| records.iter().any(|r| &r.id == id));
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use starling_raft_store::{Availability, NodeRole};

    fn rec(id: &str, status: NodeStatus) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            hostname: id.into(),
            addr: "127.0.0.1:1".into(),
            role: NodeRole::Worker,
            desired_role: NodeRole::Worker,
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

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn down_after_grace_ready_when_back_nothing_while_following() {
        let cfg = LivenessConfig {
            // Gossip's Down is itself confirmed: a suspicion that lasted 2.5 s and that the
            // suspect did not answer over a reliable request (see starling-gossip's core).
            down_after: Duration::from_secs(1),
            leader_grace: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut l = Liveness::new();
        let records = vec![rec("a", NodeStatus::Ready), rec("b", NodeStatus::Ready)];
        // Fresh leader: nothing is marked down during its grace.
        assert!(
            l.round(&cfg, t0, true, &set(&["a"]), &BTreeSet::new(), &records)
                .is_empty()
        );
        assert!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(9),
                true,
                &set(&["a"]),
                &BTreeSet::new(),
                &records
            )
            .is_empty()
        );
        // After the grace, b (not alive for ≥ 3 s) goes down.
        let out = l.round(
            &cfg,
            t0 + Duration::from_secs(11),
            true,
            &set(&["a"]),
            &BTreeSet::new(),
            &records,
        );
        assert_eq!(
            out,
            vec![Command::SetNodeStatus {
                id: "b".into(),
                status: NodeStatus::Down
            }]
        );
        // Once down, it is not written again; back alive, it is ready.
        let records = vec![rec("a", NodeStatus::Ready), rec("b", NodeStatus::Down)];
        assert!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(12),
                true,
                &set(&["a"]),
                &BTreeSet::new(),
                &records
            )
            .is_empty()
        );
        let out = l.round(
            &cfg,
            t0 + Duration::from_secs(13),
            true,
            &set(&["a", "b"]),
            &BTreeSet::new(),
            &records,
        );
        assert_eq!(
            out,
            vec![Command::SetNodeStatus {
                id: "b".into(),
                status: NodeStatus::Ready
            }]
        );
        // A follower writes nothing, and leading again starts a new grace.
        assert!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(14),
                false,
                &set(&[]),
                &BTreeSet::new(),
                &records
            )
            .is_empty()
        );
        let records = vec![rec("a", NodeStatus::Ready), rec("b", NodeStatus::Ready)];
        assert!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(15),
                true,
                &set(&["a"]),
                &BTreeSet::new(),
                &records
            )
            .is_empty()
        );
        assert!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(20),
                true,
                &set(&["a"]),
                &BTreeSet::new(),
                &records
            )
            .is_empty()
        );
        assert_eq!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(26),
                true,
                &set(&["a"]),
                &BTreeSet::new(),
                &records
            )
            .len(),
            1
        );
    }

    #[test]
    fn a_brief_absence_is_forgiven() {
        let cfg = LivenessConfig {
            // Gossip's Down is itself confirmed: a suspicion that lasted 2.5 s and that the
            // suspect did not answer over a reliable request (see starling-gossip's core).
            down_after: Duration::from_secs(1),
            leader_grace: Duration::ZERO,
        };
        let t0 = Instant::now();
        let mut l = Liveness::new();
        let records = vec![rec("a", NodeStatus::Ready)];
        assert!(
            l.round(&cfg, t0, true, &set(&[]), &BTreeSet::new(), &records)
                .is_empty()
        );
        assert!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(2),
                true,
                &set(&["a"]),
                &BTreeSet::new(),
                &records
            )
            .is_empty()
        );
        // The clock restarts after it was seen alive.
        assert!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(4),
                true,
                &set(&[]),
                &BTreeSet::new(),
                &records
            )
            .is_empty()
        );
        assert_eq!(
            l.round(
                &cfg,
                t0 + Duration::from_secs(7),
                true,
                &set(&[]),
                &BTreeSet::new(),
                &records
            )
            .len(),
            1
        );
    }

    #[test]
    fn a_node_with_a_silent_session_that_fails_a_probe_is_down_at_once() {
        let cfg = LivenessConfig::default();
        let t0 = Instant::now();
        let mut l = Liveness::new();
        let records = vec![rec("a", NodeStatus::Ready), rec("b", NodeStatus::Ready)];
        let gone = set(&["b"]);
        // At once, though gossip still calls it alive and the leader is new.
        let out = l.round(&cfg, t0, true, &set(&["a", "b"]), &gone, &records);
        assert_eq!(
            out,
            vec![Command::SetNodeStatus {
                id: "b".into(),
                status: NodeStatus::Down
            }]
        );
    }
}
