//! Starling gossip: SWIM membership and the service catalog on foca (filled by its own issue).
