//! The cluster state every manager holds: nodes, the key-value store and the cluster's own
//! settings, changed only by [`ClusterState::apply`], a pure function of the state, the
//! command and its revision (the Raft log index that carries it).
//!
//! Being pure, it is tested without Raft, sockets or clocks; the Raft state machine only
//! feeds it committed entries in log order.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Revisions kept for `watch` to resume from; older ones are compacted.
pub const WATCH_HISTORY: usize = 100_000;

macro_rules! wire_type {
    ($(#[$m:meta])* $vis:vis $kind:ident $name:ident $body:tt) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        $vis $kind $name $body
    };
}

wire_type!(
    /// A node's role in the cluster.
    pub enum NodeRole {
        /// Holds the replicated state and votes.
        Manager,
        /// Runs tasks; no vote.
        Worker,
    }
);

wire_type!(
    /// Whether the scheduler may place work on a node (as `docker node update --availability`).
    pub enum Availability {
        /// Takes new work.
        Active,
        /// Keeps its work, takes no new work.
        Pause,
        /// Its work is moved elsewhere.
        Drain,
    }
);

wire_type!(
    /// What the cluster knows of a node's liveness.
    pub enum NodeStatus {
        /// Alive.
        Ready,
        /// Not heard from past the grace period.
        Down,
        /// Not yet known (just joined, or after a leader change).
        Unknown,
    }
);

wire_type!(
    /// A node as the cluster records it.
    pub struct NodeRecord {
        /// Node id (never reused).
        pub id: String,
        /// Host name the node reported.
        pub hostname: String,
        /// Address other nodes reach it at.
        pub addr: String,
        /// Current role.
        pub role: NodeRole,
        /// Role it is being moved to (promotion, demotion), equal to `role` at rest.
        pub desired_role: NodeRole,
        /// Scheduling availability.
        pub availability: Availability,
        /// Liveness.
        pub status: NodeStatus,
        /// Operator labels.
        pub labels: BTreeMap<String, String>,
        /// Serial of the node's current certificate, hex.
        pub cert_serial: String,
        /// Bumped on every change of this record.
        pub version: u64,
        /// Revision that created it.
        pub created_revision: u64,
        /// Revision of its last change.
        pub updated_revision: u64,
    }
);

wire_type!(
    /// A value in the key-value store with its history counters (as etcd's `KeyValue`).
    pub struct KvEntry {
        /// The value.
        pub value: Vec<u8>,
        /// Revision that created the key (since its last deletion).
        pub create_revision: u64,
        /// Revision of its last change.
        pub mod_revision: u64,
        /// Number of changes since creation, from 1.
        pub version: u64,
    }
);

wire_type!(
    /// Cluster-wide settings, replicated like everything else.
    pub struct Settings {
        /// Scales heartbeat and election timeouts (1 = defaults).
        pub timing_multiplier: u32,
        /// Lifetime of node certificates, seconds.
        pub cert_lifetime_secs: u64,
        /// Log entries between snapshots.
        pub snapshot_interval: u64,
    }
);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timing_multiplier: 1,
            cert_lifetime_secs: 90 * 24 * 3600,
            snapshot_interval: 50_000,
        }
    }
}

wire_type!(
    /// The cluster's identity material: the CA (so any manager can sign) and the join secrets.
    #[derive(Default)]
    pub struct ClusterInfo {
        /// Cluster id.
        pub cluster_id: String,
        /// CA certificate, PEM.
        pub ca_cert_pem: String,
        /// CA private key, PEM.
        pub ca_key_pem: String,
        /// Join secret per role name.
        pub join_secrets: BTreeMap<String, Vec<u8>>,
        /// Settings.
        pub settings: Settings,
    }
);

wire_type!(
    /// A condition of a transaction (etcd's `Compare`).
    pub enum Compare {
        /// The key's `mod_revision` equals this; 0 means "the key does not exist".
        ModRevision {
            /// The key.
            key: String,
            /// Expected mod revision.
            revision: u64,
        },
        /// The key's value equals this; `None` means "the key does not exist".
        Value {
            /// The key.
            key: String,
            /// Expected value.
            value: Option<Vec<u8>>,
        },
    }
);

wire_type!(
    /// A write inside a transaction.
    pub enum TxnOp {
        /// Set a key.
        Put {
            /// The key.
            key: String,
            /// The value.
            value: Vec<u8>,
        },
        /// Remove a key (no error if absent).
        Delete {
            /// The key.
            key: String,
        },
    }
);

wire_type!(
    /// A change to the cluster state: what a Raft log entry carries.
    pub enum Command {
        /// Changes nothing (used to commit a barrier).
        Noop,
        /// Set a key.
        Put {
            /// The key.
            key: String,
            /// The value.
            value: Vec<u8>,
        },
        /// Remove a key.
        Delete {
            /// The key.
            key: String,
        },
        /// If every compare holds, apply `success`, else `failure`; all or nothing.
        Txn {
            /// Conditions.
            compares: Vec<Compare>,
            /// Writes if all hold.
            success: Vec<TxnOp>,
            /// Writes otherwise.
            failure: Vec<TxnOp>,
        },
        /// Create a node record or replace its descriptive fields (hostname, address, role,
        /// labels, certificate serial); liveness and availability are kept if it exists.
        UpsertNode {
            /// The record; counters are set by `apply`.
            node: NodeRecord,
        },
        /// Set a node's liveness.
        SetNodeStatus {
            /// Node id.
            id: String,
            /// New status.
            status: NodeStatus,
        },
        /// Set a node's availability.
        SetNodeAvailability {
            /// Node id.
            id: String,
            /// New availability.
            availability: Availability,
        },
        /// Set a node's role and desired role.
        SetNodeRole {
            /// Node id.
            id: String,
            /// Current role.
            role: NodeRole,
            /// Desired role.
            desired_role: NodeRole,
        },
        /// Remove a node record.
        RemoveNode {
            /// Node id.
            id: String,
        },
        /// Replace the cluster's identity material and settings.
        SetCluster {
            /// The new value.
            info: ClusterInfo,
        },
    }
);

impl Command {
    /// Compare-and-swap on the key's mod revision (0: only if absent).
    pub fn cas_revision(key: impl Into<String>, revision: u64, value: Vec<u8>) -> Self {
        let key = key.into();
        Command::Txn {
            compares: vec![Compare::ModRevision {
                key: key.clone(),
                revision,
            }],
            success: vec![TxnOp::Put { key, value }],
            failure: vec![],
        }
    }

    /// Compare-and-swap on the key's value (`None`: only if absent).
    pub fn cas_value(key: impl Into<String>, expected: Option<Vec<u8>>, value: Vec<u8>) -> Self {
        let key = key.into();
        Command::Txn {
            compares: vec![Compare::Value {
                key: key.clone(),
                value: expected,
            }],
            success: vec![TxnOp::Put { key, value }],
            failure: vec![],
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Noop => write!(f, "noop"),
            Command::Put { key, value } => write!(f, "put {key} ({} bytes)", value.len()),
            Command::Delete { key } => write!(f, "delete {key}"),
            Command::Txn { compares, .. } => write!(f, "txn ({} compares)", compares.len()),
            Command::UpsertNode { node } => write!(f, "upsert node {}", node.id),
            Command::SetNodeStatus { id, status } => write!(f, "node {id} status {status:?}"),
            Command::SetNodeAvailability { id, availability } => {
                write!(f, "node {id} availability {availability:?}")
            }
            Command::SetNodeRole { id, role, .. } => write!(f, "node {id} role {role:?}"),
            Command::RemoveNode { id } => write!(f, "remove node {id}"),
            Command::SetCluster { info } => write!(f, "set cluster {}", info.cluster_id),
        }
    }
}

wire_type!(
    /// What applying a command did.
    pub enum Outcome {
        /// Nothing to report (noop, membership, settings).
        Done,
        /// A key was set; its previous value, if any.
        Put {
            /// Previous entry.
            prev: Option<KvEntry>,
        },
        /// A key was removed, if it existed.
        Deleted {
            /// Its entry before removal.
            prev: Option<KvEntry>,
        },
        /// A transaction ran; whether its compares held.
        Txn {
            /// True if `success` ran.
            succeeded: bool,
        },
        /// A node record after the change.
        Node {
            /// The record.
            node: NodeRecord,
        },
        /// The command named a node that does not exist; nothing changed.
        NoSuchNode {
            /// The id.
            id: String,
        },
    }
);

wire_type!(
    /// The answer to a committed command.
    pub struct CommandResult {
        /// The revision (log index) the command was applied at.
        pub revision: u64,
        /// What it did.
        pub outcome: Outcome,
    }
);

wire_type!(
    /// One change to the key-value store, as `watch` reports it.
    pub struct KvEvent {
        /// Revision of the change.
        pub revision: u64,
        /// The key.
        pub key: String,
        /// The new entry, or `None` for a deletion.
        pub entry: Option<KvEntry>,
    }
);

wire_type!(
    /// Everything a snapshot holds.
    #[derive(Default)]
    pub struct StateImage {
        /// Revision (log index) this image reflects.
        pub revision: u64,
        /// Nodes by id.
        pub nodes: BTreeMap<String, NodeRecord>,
        /// Key-value store.
        pub kv: BTreeMap<String, KvEntry>,
        /// Cluster identity and settings.
        pub cluster: ClusterInfo,
    }
);

/// The state machine's data and the recent history for `watch`.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    image: StateImage,
    history: VecDeque<KvEvent>,
    /// Events with a revision below this are no longer in `history`.
    compacted_before: u64,
}

impl ClusterState {
    /// An empty state at revision 0.
    pub fn new() -> Self {
        ClusterState::default()
    }

    /// A state from a snapshot image. Its history starts empty: a watch that wants older
    /// revisions is told they are compacted.
    pub fn from_image(image: StateImage) -> Self {
        let compacted_before = image.revision + 1;
        ClusterState {
            image,
            history: VecDeque::new(),
            compacted_before,
        }
    }

    /// The data, for a snapshot.
    pub fn image(&self) -> &StateImage {
        &self.image
    }

    /// The revision (last applied log index) the state reflects.
    pub fn revision(&self) -> u64 {
        self.image.revision
    }

    /// Notes that log entry `revision` carried no command (a blank or membership entry).
    pub fn advance(&mut self, revision: u64) {
        self.image.revision = self.image.revision.max(revision);
    }

    /// Applies `cmd`, committed at log index `revision`, and returns what it did together
    /// with the key-value events it produced (for watchers).
    pub fn apply(&mut self, revision: u64, cmd: &Command) -> (CommandResult, Vec<KvEvent>) {
        self.advance(revision);
        let mut events = Vec::new();
        let outcome = match cmd {
            Command::Noop => Outcome::Done,
            Command::Put { key, value } => Outcome::Put {
                prev: self.put(revision, key, value, &mut events),
            },
            Command::Delete { key } => Outcome::Deleted {
                prev: self.delete(revision, key, &mut events),
            },
            Command::Txn {
                compares,
                success,
                failure,
            } => {
                let succeeded = compares.iter().all(|c| self.holds(c));
                let ops = if succeeded { success } else { failure };
                for op in ops {
                    match op {
                        TxnOp::Put { key, value } => {
                            self.put(revision, key, value, &mut events);
                        }
                        TxnOp::Delete { key } => {
                            self.delete(revision, key, &mut events);
                        }
                    }
                }
                Outcome::Txn { succeeded }
            }
            Command::UpsertNode { node } => {
                let record = match self.image.nodes.get(&node.id) {
                    Some(old) => NodeRecord {
                        status: old.status.clone(),
                        availability: old.availability.clone(),
                        version: old.version + 1,
                        created_revision: old.created_revision,
                        updated_revision: revision,
                        ..node.clone()
                    },
                    None => NodeRecord {
                        version: 1,
                        created_revision: revision,
                        updated_revision: revision,
                        ..node.clone()
                    },
                };
                self.image.nodes.insert(node.id.clone(), record.clone());
                Outcome::Node { node: record }
            }
            Command::SetNodeStatus { id, status } => {
                self.change_node(revision, id, |n| n.status = status.clone())
            }
            Command::SetNodeAvailability { id, availability } => {
                self.change_node(revision, id, |n| n.availability = availability.clone())
            }
            Command::SetNodeRole {
                id,
                role,
                desired_role,
            } => self.change_node(revision, id, |n| {
                n.role = role.clone();
                n.desired_role = desired_role.clone();
            }),
            Command::RemoveNode { id } => match self.image.nodes.remove(id) {
                Some(node) => Outcome::Node { node },
                None => Outcome::NoSuchNode { id: id.clone() },
            },
            Command::SetCluster { info } => {
                self.image.cluster = info.clone();
                Outcome::Done
            }
        };
        for e in &events {
            self.history.push_back(e.clone());
        }
        while self.history.len() > WATCH_HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted_before = old.revision + 1;
            }
        }
        (CommandResult { revision, outcome }, events)
    }

    fn change_node(&mut self, revision: u64, id: &str, f: impl FnOnce(&mut NodeRecord)) -> Outcome {
        match self.image.nodes.get_mut(id) {
            Some(n) => {
                f(n);
                n.version += 1;
                n.updated_revision = revision;
                Outcome::Node { node: n.clone() }
            }
            None => Outcome::NoSuchNode { id: id.to_owned() },
        }
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision { key, revision } => {
                self.image.kv.get(key).map_or(0, |e| e.mod_revision) == *revision
            }
            Compare::Value { key, value } => {
                self.image.kv.get(key).map(|e| &e.value) == value.as_ref()
            }
        }
    }

    fn put(
        &mut self,
        revision: u64,
        key: &str,
        value: &[u8],
        events: &mut Vec<KvEvent>,
    ) -> Option<KvEntry> {
        let prev = self.image.kv.get(key).cloned();
        let entry = match &prev {
            Some(p) => KvEntry {
                value: value.to_vec(),
                create_revision: p.create_revision,
                mod_revision: revision,
                version: p.version + 1,
            },
            None => KvEntry {
                value: value.to_vec(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
            },
        };
        self.image.kv.insert(key.to_owned(), entry.clone());
        events.push(KvEvent {
            revision,
            key: key.to_owned(),
            entry: Some(entry),
        });
        prev
    }

    fn delete(&mut self, revision: u64, key: &str, events: &mut Vec<KvEvent>) -> Option<KvEntry> {
        let prev = self.image.kv.remove(key);
        if prev.is_some() {
            events.push(KvEvent {
                revision,
                key: key.to_owned(),
                entry: None,
            });
        }
        prev
    }

    /// A key's entry.
    pub fn get(&self, key: &str) -> Option<&KvEntry> {
        self.image.kv.get(key)
    }

    /// Keys starting with `prefix`, in order.
    pub fn range(&self, prefix: &str) -> Vec<(String, KvEntry)> {
        self.image
            .kv
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A node record.
    pub fn node(&self, id: &str) -> Option<&NodeRecord> {
        self.image.nodes.get(id)
    }

    /// All node records, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.image.nodes.values()
    }

    /// The cluster's identity and settings.
    pub fn cluster(&self) -> &ClusterInfo {
        &self.image.cluster
    }

    /// Events for keys under `prefix` with a revision ≥ `from`, or `Err(first)` with the
    /// oldest revision still available if `from` is older than that.
    pub fn history_since(&self, prefix: &str, from: u64) -> Result<Vec<KvEvent>, u64> {
        if from < self.compacted_before {
            return Err(self.compacted_before);
        }
        let start = self.history.partition_point(|e| e.revision < from);
        Ok(self
            .history
            .range(start..)
            .filter(|e| e.key.starts_with(prefix))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put(k: &str, v: &str) -> Command {
        Command::Put {
            key: k.into(),
            value: v.as_bytes().to_vec(),
        }
    }

    #[test]
    fn revisions_and_versions_follow_etcd() {
        let mut s = ClusterState::new();
        s.apply(3, &put("a", "1"));
        s.apply(5, &put("a", "2"));
        let e = s.get("a").unwrap();
        assert_eq!((e.create_revision, e.mod_revision, e.version), (3, 5, 2));
        s.apply(6, &Command::Delete { key: "a".into() });
        assert!(s.get("a").is_none());
        s.apply(8, &put("a", "3"));
        let e = s.get("a").unwrap();
        assert_eq!((e.create_revision, e.mod_revision, e.version), (8, 8, 1));
        assert_eq!(s.revision(), 8);
    }

    #[test]
    fn cas_on_revision_and_value() {
        let mut s = ClusterState::new();
        let (r, _) = s.apply(1, &Command::cas_revision("k", 0, b"x".to_vec()));
        assert_eq!(r.outcome, Outcome::Txn { succeeded: true });
        let (r, _) = s.apply(2, &Command::cas_revision("k", 0, b"y".to_vec()));
        assert_eq!(r.outcome, Outcome::Txn { succeeded: false });
        assert_eq!(s.get("k").unwrap().value, b"x");
        let (r, _) = s.apply(3, &Command::cas_revision("k", 1, b"y".to_vec()));
        assert_eq!(r.outcome, Outcome::Txn { succeeded: true });
        let (r, _) = s.apply(
            4,
            &Command::cas_value("k", Some(b"x".to_vec()), b"z".to_vec()),
        );
        assert_eq!(r.outcome, Outcome::Txn { succeeded: false });
        let (r, _) = s.apply(
            5,
            &Command::cas_value("k", Some(b"y".to_vec()), b"z".to_vec()),
        );
        assert_eq!(r.outcome, Outcome::Txn { succeeded: true });
        assert_eq!(s.get("k").unwrap().value, b"z");
    }

    #[test]
    fn txn_is_all_or_nothing() {
        let mut s = ClusterState::new();
        s.apply(1, &put("a", "1"));
        let txn = Command::Txn {
            compares: vec![
                Compare::Value {
                    key: "a".into(),
                    value: Some(b"1".to_vec()),
                },
                Compare::ModRevision {
                    key: "b".into(),
                    revision: 7,
                },
            ],
            success: vec![
                TxnOp::Put {
                    key: "b".into(),
                    value: b"2".to_vec(),
                },
                TxnOp::Delete { key: "a".into() },
            ],
            failure: vec![TxnOp::Put {
                key: "c".into(),
                value: b"failed".to_vec(),
            }],
        };
        let (r, events) = s.apply(2, &txn);
        assert_eq!(r.outcome, Outcome::Txn { succeeded: false });
        assert!(s.get("b").is_none());
        assert_eq!(s.get("a").unwrap().value, b"1");
        assert_eq!(s.get("c").unwrap().value, b"failed");
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn range_is_by_prefix_in_order() {
        let mut s = ClusterState::new();
        for (i, k) in ["b/2", "a/1", "b/1", "b", "c"].iter().enumerate() {
            s.apply(i as u64 + 1, &put(k, "v"));
        }
        let keys: Vec<String> = s.range("b/").into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["b/1", "b/2"]);
        assert_eq!(s.range("").len(), 5);
        assert!(s.range("z").is_empty());
    }

    #[test]
    fn nodes_keep_liveness_across_upserts() {
        let mut s = ClusterState::new();
        let node = NodeRecord {
            id: "n1".into(),
            hostname: "h".into(),
            addr: "127.0.0.1:1".into(),
            role: NodeRole::Worker,
            desired_role: NodeRole::Worker,
            availability: Availability::Active,
            status: NodeStatus::Unknown,
            labels: BTreeMap::new(),
            cert_serial: "01".into(),
            version: 0,
            created_revision: 0,
            updated_revision: 0,
        };
        s.apply(1, &Command::UpsertNode { node: node.clone() });
        s.apply(
            2,
            &Command::SetNodeStatus {
                id: "n1".into(),
                status: NodeStatus::Ready,
            },
        );
        let (r, _) = s.apply(
            3,
            &Command::UpsertNode {
                node: NodeRecord {
                    hostname: "h2".into(),
                    ..node
                },
            },
        );
        let Outcome::Node { node } = r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!(node.status, NodeStatus::Ready);
        assert_eq!(node.hostname, "h2");
        assert_eq!(
            (node.version, node.created_revision, node.updated_revision),
            (3, 1, 3)
        );
        let (r, _) = s.apply(4, &Command::RemoveNode { id: "zz".into() });
        assert_eq!(r.outcome, Outcome::NoSuchNode { id: "zz".into() });
    }

    #[test]
    fn watch_history_resumes_without_gap_and_reports_compaction() {
        let mut s = ClusterState::new();
        for i in 1..=10u64 {
            s.apply(i, &put(if i % 2 == 0 { "w/even" } else { "w/odd" }, "v"));
        }
        let evs = s.history_since("w/even", 5).unwrap();
        assert_eq!(
            evs.iter().map(|e| e.revision).collect::<Vec<_>>(),
            vec![6, 8, 10]
        );
        let restored = ClusterState::from_image(s.image().clone());
        assert_eq!(restored.history_since("w/", 3), Err(11));
        assert!(restored.history_since("w/", 11).unwrap().is_empty());
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let key = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
        let val = prop::collection::vec(0u8..3, 0..3);
        prop_oneof![
            (key.clone(), val.clone()).prop_map(|(key, value)| Command::Put { key, value }),
            key.clone().prop_map(|key| Command::Delete { key }),
            (key.clone(), 0u64..20, val.clone())
                .prop_map(|(k, r, v)| Command::cas_revision(k, r, v)),
            (key, prop::option::of(val.clone()), val)
                .prop_map(|(k, e, v)| Command::cas_value(k, e, v)),
        ]
    }

    proptest! {
        /// Replaying the same log gives the same state (determinism), and revisions only grow.
        #[test]
        fn apply_is_deterministic(cmds in prop::collection::vec(arb_command(), 0..60)) {
            let mut a = ClusterState::new();
            let mut b = ClusterState::new();
            for (i, c) in cmds.iter().enumerate() {
                let (ra, _) = a.apply(i as u64 + 1, c);
                let (rb, _) = b.apply(i as u64 + 1, c);
                prop_assert_eq!(ra, rb);
            }
            prop_assert_eq!(a.image(), b.image());
            for (_, e) in a.range("") {
                prop_assert!(e.create_revision <= e.mod_revision);
                prop_assert!(e.mod_revision <= a.revision());
            }
        }

        /// Of N racing CAS writes on the same expected revision, exactly one wins.
        #[test]
        fn racing_cas_one_winner(n in 1usize..10, start in 0u64..3) {
            let mut s = ClusterState::new();
            let mut rev = 1;
            if start > 0 {
                s.apply(rev, &put("k", "seed"));
                rev += 1;
            }
            let expected = s.get("k").map_or(0, |e| e.mod_revision);
            let mut wins = 0;
            for i in 0..n {
                let (r, _) = s.apply(rev, &Command::cas_revision("k", expected, vec![i as u8]));
                rev += 1;
                if r.outcome == (Outcome::Txn { succeeded: true }) {
                    wins += 1;
                }
            }
            prop_assert_eq!(wins, 1);
        }

        /// The watch history for a prefix is exactly the events the applies returned.
        #[test]
        fn history_matches_events(cmds in prop::collection::vec(arb_command(), 0..60)) {
            let mut s = ClusterState::new();
            let mut all = Vec::new();
            for (i, c) in cmds.iter().enumerate() {
                let (_, evs) = s.apply(i as u64 + 1, c);
                all.extend(evs);
            }
            prop_assert_eq!(s.history_since("", 0).unwrap(), all);
        }
    }
}
