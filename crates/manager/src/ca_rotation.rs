//! How far a root CA rotation is: which nodes are on the new root, which are not yet, which
//! are down (they renew when they come back, on the expired-certificate path). The leader
//! finishes the rotation when no node that is not down is left on the old root.

use starling_state::{NodeRecord, NodeStatus};

/// Where the cluster's nodes stand in a rotation to the root of digest `new_digest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Nodes not down whose certificate the new root signed.
    pub on_new_root: Vec<String>,
    /// Nodes not down still on another root: the rotation waits for them.
    pub pending: Vec<String>,
    /// Nodes down: not waited for.
    pub down: Vec<String>,
}

impl Progress {
    /// Whether every node not down is on the new root (and there is one at all).
    pub fn done(&self) -> bool {
        self.pending.is_empty() && !self.on_new_root.is_empty()
    }

    /// The nodes counted: those not down.
    pub fn counted(&self) -> usize {
        self.on_new_root.len() + self.pending.len()
    }
}

/// The progress of a rotation to `new_digest` over `nodes`.
pub fn progress<'a>(nodes: impl IntoIterator<Item = &'a NodeRecord>, new_digest: &str) -> Progress {
    let mut p = Progress::default();
    for n in nodes {
        if n.status == NodeStatus::Down {
            p.down.push(n.id.clone());
        } else if n.cert_ca == new_digest {
            p.on_new_root.push(n.id.clone());
        } else {
            p.pending.push(n.id.clone());
        }
    }
    p
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use starling_state::{Availability, NodeRole};

    fn node(id: &str, status: NodeStatus, ca: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            hostname: id.into(),
            addr: "127.0.0.1:1".into(),
            role: NodeRole::Worker,
            desired_role: NodeRole::Worker,
            availability: Availability::Active,
            status,
            labels: Default::default(),
            cert_serial: String::new(),
            cert_not_after: 0,
            cert_ca: ca.into(),
            cert_key: String::new(),
            version: 1,
            created_revision: 1,
            updated_revision: 1,
        }
    }

    #[test]
    fn waits_for_every_node_not_down_and_never_for_the_down() {
        let nodes = [
            node("a", NodeStatus::Ready, "new"),
            node("b", NodeStatus::Unknown, "old"),
            node("c", NodeStatus::Down, "old"),
        ];
        let p = progress(&nodes, "new");
        assert_eq!(p.on_new_root, vec!["a"]);
        assert_eq!(p.pending, vec!["b"]);
        assert_eq!(p.down, vec!["c"]);
        assert_eq!(p.counted(), 2);
        assert!(!p.done());
        let nodes = [
            node("a", NodeStatus::Ready, "new"),
            node("b", NodeStatus::Ready, "new"),
            node("c", NodeStatus::Down, "old"),
        ];
        assert!(progress(&nodes, "new").done());
        // Nobody up: nothing to finish with.
        assert!(!progress(&[node("c", NodeStatus::Down, "old")], "new").done());
    }
}
