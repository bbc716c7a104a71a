//! A gossip member's identity: node id, address and generation.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Who a gossip member is. The generation grows on every restart (the caller persists it),
/// so a restarted node replaces its previous life at the same address instead of being
/// confused with it; kept small because it rides in every packet header.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GossipId {
    /// The node id (its certificate's CN).
    pub node: String,
    /// Where it receives gossip.
    pub addr: SocketAddr,
    /// Its generation.
    pub generation: u64,
}

impl GossipId {
    /// An identity.
    pub fn new(node: impl Into<String>, addr: SocketAddr, generation: u64) -> Self {
        GossipId {
            node: node.into(),
            addr,
            generation,
        }
    }
}

impl GossipId {
    /// A node whose identity was declared Down comes back with the next generation, which
    /// wins the address conflict.
    pub fn renew(&self) -> Self {
        GossipId {
            generation: self.generation.saturating_add(1),
            ..self.clone()
        }
    }

    /// Whether this identity keeps the address against `adversary`: the newer generation
    /// wins.
    pub fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // The node id breaks a tie, so two identities never both lose (or both win).
        (self.generation, &self.node) > (adversary.generation, &adversary.node)
    }
}

/// Where a node's generation is kept between restarts (a file in the data directory, for
/// the node crate; memory in tests).
pub trait GenerationStore {
    /// Returns the generation for this start: one more than the last one handed out.
    fn next_generation(&mut self) -> std::io::Result<u64>;

    /// Records that the node rejoined under `generation` while running (it renewed its
    /// identity after being declared Down), so the next start goes above it.
    fn observed(&mut self, generation: u64) -> std::io::Result<()>;
}

/// A generation kept in a file, replaced atomically.
#[derive(Debug, Clone)]
pub struct FileGeneration(pub std::path::PathBuf);

impl GenerationStore for FileGeneration {
    fn observed(&mut self, generation: u64) -> std::io::Result<()> {
        let last = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if generation > last {
            let tmp = self.0.with_extension("tmp");
            std::fs::write(&tmp, generation.to_string())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &self.0)?;
        }
        Ok(())
    }

    fn next_generation(&mut self) -> std::io::Result<u64> {
        let last = match std::fs::read_to_string(&self.0) {
            Ok(s) => s.trim().parse::<u64>().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a generation number: {e}", self.0.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let next = last + 1;
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, next.to_string())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.0)?;
        if let Some(dir) = self.0.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(next)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn newer_generation_wins_and_renew_bumps() {
        let a = GossipId::new("n1", "127.0.0.1:1".parse().unwrap(), 3);
        let b = a.renew();
        assert_eq!(b.generation, 4);
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
    }

    #[test]
    fn file_generation_grows_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = FileGeneration(dir.path().join("generation"));
        assert_eq!(g.next_generation().unwrap(), 1);
        assert_eq!(g.next_generation().unwrap(), 2);
        g.observed(7).unwrap();
        assert_eq!(g.next_generation().unwrap(), 8);
        std::fs::write(dir.path().join("generation"), "junk").unwrap();
        assert!(g.next_generation().is_err());
    }
}
