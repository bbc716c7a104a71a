//! The replicated objects: nodes, keys, the cluster's identity and settings, and the system
//! records no client API can write directly (revocations, Raft ids, API clients).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

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
        /// When that certificate expires, Unix seconds (0: not known).
        pub cert_not_after: u64,
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
        /// How long after its certificate expired a node may still renew it with that
        /// certificate (a node powered off for a while), seconds; beyond, it rejoins.
        pub cert_grace_secs: u64,
        /// Log entries between snapshots.
        pub snapshot_interval: u64,
    }
);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timing_multiplier: 1,
            cert_lifetime_secs: 90 * 24 * 3600,
            cert_grace_secs: 30 * 24 * 3600,
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
    /// What an API client certificate may do on the remote API (`starling/api/1`).
    pub enum ClientRole {
        /// Every operation.
        Admin,
        /// Reads only.
        Viewer,
    }
);

wire_type!(
    /// An API client certificate the cluster issued (`starling cert issue`).
    pub struct ClientRecord {
        /// The name the operator gave it (unique among clients).
        pub name: String,
        /// Its certificate's CN: a fresh id, never reused, in the same space as node ids so
        /// the endpoint's revocation list covers both.
        pub id: String,
        /// What it may do.
        pub role: ClientRole,
        /// Its certificate's serial, hex.
        pub cert_serial: String,
        /// When the certificate stops being valid, seconds since the Unix epoch.
        pub not_after: u64,
        /// Revoked (`starling cert revoke`): refused by every manager from then on.
        pub revoked: bool,
        /// Revision that created it.
        pub created_revision: u64,
    }
);

wire_type!(
    /// The records Starling keeps for itself. They live beside the key-value store, never in
    /// it: no `kv` operation can read or change them.
    #[derive(Default)]
    pub struct SystemRecords {
        /// Certificate CNs refused by every manager: removed nodes and revoked API clients.
        /// Ids are never reused, so the set only grows.
        pub revoked: BTreeSet<String>,
        /// The Raft id allocated to each manager (or node being promoted).
        pub raft_ids: BTreeMap<String, u64>,
        /// The next Raft id to allocate (the first manager has 1); ids are never reused.
        pub next_raft_id: u64,
        /// API client certificates by name.
        pub clients: BTreeMap<String, ClientRecord>,
    }
);

impl SystemRecords {
    /// The first Raft id [`Command::AssignRaftId`](crate::Command::AssignRaftId) hands out:
    /// the cluster's first manager holds 1.
    pub const FIRST_ALLOCATED_RAFT_ID: u64 = 2;
}
