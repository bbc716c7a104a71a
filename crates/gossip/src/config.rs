//! Gossip settings, and the SWIM tuning derived from them.

use std::time::Duration;

use crate::swim::SwimConfig;

/// Settings of a node's gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipConfig {
    /// Largest gossip packet: it must fit in one QUIC datagram at the smallest path MTU
    /// (quinn allows 1162 bytes at MTU 1200).
    pub max_packet_size: usize,
    /// How often each node exchanges a catalog digest with one random member.
    pub sync_interval: Duration,
    /// First wait before announcing again to the seeds when no member is left.
    pub reannounce_min: Duration,
    /// Longest wait between such announcements.
    pub reannounce_max: Duration,
    /// How long a graceful leave lingers so the Down notice spreads.
    pub leave_linger: Duration,
    /// How often each node probes one member (SWIM's protocol period).
    pub probe_period: Duration,
    /// How long a direct probe waits for its ack before asking others to probe.
    pub probe_rtt: Duration,
    /// Members asked to probe for us when a direct probe fails.
    pub indirect_probes: usize,
    /// How long a member stays suspected before it is declared Down (unless it refutes).
    pub suspect_to_down: Duration,
    /// How often pending updates are gossiped to three members.
    pub gossip_interval: Duration,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            max_packet_size: 1100,
            sync_interval: Duration::from_secs(2),
            reannounce_min: Duration::from_millis(500),
            reannounce_max: Duration::from_secs(30),
            leave_linger: Duration::from_millis(500),
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            indirect_probes: 5,
            suspect_to_down: Duration::from_millis(2500),
            gossip_interval: Duration::from_millis(100),
        }
    }
}

impl GossipConfig {
    /// The SWIM tuning: memberlist's LAN defaults with faster failure detection — a probe
    /// every 500 ms (200 ms for the ack), five indirect probes, pending updates gossiped to
    /// three members every 100 ms, Down 2.5 s after a suspicion — so a dead node is
    /// suspected, and hidden from DNS, everywhere in about a second, and Down in about three
    /// and a half. What keeps that from taking live members for dead under loss or load:
    /// each suspicion is also put to the suspect over a reliable request (its answer refutes
    /// it at once; see `GossipCore`), every update is sent at least six times (4 × log10(n+1)
    /// in larger clusters), and a node that sees its own timers run late slows its own
    /// probing (Lifeguard's local health). Packets fit a QUIC datagram.
    pub fn swim_config(&self) -> SwimConfig {
        SwimConfig {
            probe_period: self.probe_period,
            probe_rtt: self.probe_rtt.min(self.probe_period / 2),
            indirect_probes: self.indirect_probes.max(1),
            suspect_to_down: self.suspect_to_down,
            remove_down_after: Duration::from_secs(24 * 3600),
            min_transmissions: 6,
            gossip_interval: self.gossip_interval,
            gossip_fanout: 3,
            announce_interval: Duration::from_secs(30),
            announce_down_interval: Duration::from_secs(65),
            announce_down_count: 2,
            max_packet_size: self.max_packet_size.max(512),
        }
    }
}
