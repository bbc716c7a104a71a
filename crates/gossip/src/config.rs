//! Gossip settings, and the foca configuration derived from them for a cluster size.

use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::time::Duration;

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
    /// foca's configuration for `members` nodes: its LAN preset (memberlist's defaults)
    /// with faster failure detection — a probe every 500 ms (200 ms for the ack), five
    /// indirect probes, pending updates gossiped every 100 ms, Down 2.5 s after a suspicion
    /// — so a dead node is suspected, and hidden from DNS, everywhere in about a second, and
    /// Down in about three and a half. What keeps that from taking live members for dead
    /// under loss or load: each suspicion is also put to the suspect over a reliable request
    /// (its answer refutes it at once; see `GossipCore`), retransmissions are at least six,
    /// and a node that sees its own timers run late slows its own probing (Lifeguard's local
    /// health). Also the packet size of a QUIC datagram.
    pub fn foca_config(&self, members: usize) -> foca::Config {
        let n = NonZeroU32::new(u32::try_from(members.max(1)).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN);
        let mut c = foca::Config::new_lan(n);
        c.max_packet_size =
            NonZeroUsize::new(self.max_packet_size.max(512)).unwrap_or(NonZeroUsize::MIN);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt.min(self.probe_period / 2);
        c.num_indirect_probes =
            NonZeroUsize::new(self.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN);
        c.max_transmissions = c
            .max_transmissions
            .max(NonZeroU8::new(6).unwrap_or(NonZeroU8::MIN));
        c.suspect_to_down_after = self.suspect_to_down;
        if let Some(g) = &mut c.periodic_gossip {
            g.frequency = self.gossip_interval;
        }
        c
    }
}
