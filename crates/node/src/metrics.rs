//! Prometheus metrics, served on the opt-in `--metrics IP:PORT` address.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::daemon::RunningNode;

/// Counters kept by the node.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Nodes admitted through this manager's join protocol.
    pub joins: AtomicU64,
    /// Requests served on this manager's join protocol (joins, renewals, role checks).
    pub join_requests: AtomicU64,
    /// Node certificates this manager issued to running nodes (renewals, role changes).
    pub renewals: AtomicU64,
    /// Times this node saw the Raft leader change.
    pub leader_changes: AtomicU64,
    /// Writes committed through this node's control API and joins, and their total time.
    pub writes: AtomicU64,
    /// Total write time, microseconds.
    pub write_micros: AtomicU64,
}

impl Metrics {
    /// Records one committed write that took `took`.
    pub fn write_took(&self, took: Duration) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// The metrics in Prometheus' text format.
pub fn render(m: &RunningNode) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        ));
    };
    if let Some(store) = &m.store {
        let s = store.status();
        gauge(
            "starling_raft_term",
            "Current Raft term.",
            s.term.to_string(),
        );
        gauge(
            "starling_raft_is_leader",
            "1 if this manager leads.",
            u8::from(s.is_leader).to_string(),
        );
        gauge(
            "starling_raft_applied_index",
            "Last log index applied here (the revision).",
            s.applied.to_string(),
        );
        gauge(
            "starling_raft_last_log_index",
            "Last log index here.",
            s.last_log_index.to_string(),
        );
        gauge(
            "starling_raft_voters",
            "Voting managers.",
            s.voters.len().to_string(),
        );
    }
    let members = m.gossip.members();
    let alive = members.iter().filter(|v| v.up).count();
    out.push_str("# HELP starling_gossip_members Gossip members this node knows, by state.\n# TYPE starling_gossip_members gauge\n");
    out.push_str(&format!(
        "starling_gossip_members{{state=\"alive\"}} {alive}\n"
    ));
    out.push_str(&format!(
        "starling_gossip_members{{state=\"down\"}} {}\n",
        members.len() - alive
    ));
    let c = &m.metrics;
    let mut counter = |name: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        ));
    };
    counter(
        "starling_joins_total",
        "Nodes admitted through this manager.",
        c.joins.load(Ordering::Relaxed),
    );
    counter(
        "starling_join_requests_total",
        "Requests served on this manager's join protocol (joins, renewals, role checks).",
        c.join_requests.load(Ordering::Relaxed),
    );
    counter(
        "starling_certificate_renewals_total",
        "Node certificates this manager issued to running nodes.",
        c.renewals.load(Ordering::Relaxed),
    );
    counter(
        "starling_leader_changes_total",
        "Raft leader changes seen by this node.",
        c.leader_changes.load(Ordering::Relaxed),
    );
    counter(
        "starling_writes_total",
        "Writes committed through this node's API.",
        c.writes.load(Ordering::Relaxed),
    );
    out.push_str(&format!(
        "# HELP starling_write_seconds_sum Time those writes took to commit.\n# TYPE starling_write_seconds_sum counter\nstarling_write_seconds_sum {:.6}\n",
        c.write_micros.load(Ordering::Relaxed) as f64 / 1e6
    ));
    out
}
