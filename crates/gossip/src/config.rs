//! Gossip settings, and the foca configuration derived from them for a cluster size.

use std::num::{NonZeroU32, NonZeroUsize};
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
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            max_packet_size: 1100,
            sync_interval: Duration::from_secs(2),
            reannounce_min: Duration::from_millis(500),
            reannounce_max: Duration::from_secs(30),
            leave_linger: Duration::from_millis(500),
        }
    }
}

impl GossipConfig {
    /// foca's LAN preset for `members` nodes (memberlist's defaults: 1 s probes, 3 indirect
    /// probes, gossip to 3 members every 200 ms, retransmissions and suspicion scaled with
    /// log n), with the packet size of a QUIC datagram.
    pub fn foca_config(&self, members: usize) -> foca::Config {
        let n = NonZeroU32::new(u32::try_from(members.max(1)).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN);
        let mut c = foca::Config::new_lan(n);
        c.max_packet_size =
            NonZeroUsize::new(self.max_packet_size.max(512)).unwrap_or(NonZeroUsize::MIN);
        c.num_indirect_probes = NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN);
        c
    }
}
