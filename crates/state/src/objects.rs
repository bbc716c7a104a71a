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
        /// Digest (hex SHA-256) of the root CA certificate that signed it (empty: not known).
        pub cert_ca: String,
        /// Digest (hex SHA-256) of that certificate's public key (renewals keep the key):
        /// what a certificate of a dropped root must carry to be renewed (empty: not known).
        pub cert_key: String,
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
        #[serde(with = "serde_bytes")]
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
        /// Not read: each manager's timeouts come from its own store configuration
        /// (`StoreConfig::timing_multiplier`). Kept so that stored snapshots still read.
        pub timing_multiplier: u32,
        /// Lifetime of node certificates, seconds.
        pub cert_lifetime_secs: u64,
        /// How long after its certificate expired a node may still renew it with that
        /// certificate (a node powered off for a while), seconds; beyond, it rejoins.
        pub cert_grace_secs: u64,
        /// Not read: each manager snapshots as its own `--snapshot-interval` says. Kept so
        /// that stored snapshots still read.
        pub snapshot_interval: u64,
        /// Autopilot (off by default).
        pub autopilot: Autopilot,
    }
);

wire_type!(
    /// Autopilot, as Consul's: the leader removes a manager that has been down for
    /// `dead_after_secs` from the voters (only when the others keep a quorum) and promotes
    /// healthy workers to keep the managers odd and at least `min_managers`.
    pub struct Autopilot {
        /// Whether the leader does it at all (default false).
        pub cleanup_dead_managers: bool,
        /// The number of managers it keeps (default 3).
        pub min_managers: u32,
        /// How long a manager is down before it is removed, seconds (default 600).
        pub dead_after_secs: u64,
        /// Which workers may be promoted (none: any ready, active worker).
        pub promote_constraints: Vec<crate::service::Constraint>,
    }
);

impl Default for Autopilot {
    fn default() -> Self {
        Autopilot {
            cleanup_dead_managers: false,
            min_managers: 3,
            dead_after_secs: 600,
            promote_constraints: Vec::new(),
        }
    }
}

wire_type!(
    /// A change of settings: the fields given replace their values, the others stay.
    #[derive(Default)]
    pub struct SettingsChange {
        /// Lifetime of node certificates issued from now on, seconds.
        pub cert_lifetime_secs: Option<u64>,
        /// Renewal grace after expiry, seconds.
        pub cert_grace_secs: Option<u64>,
        /// Autopilot on or off.
        pub autopilot_cleanup_dead_managers: Option<bool>,
        /// Autopilot's manager count.
        pub autopilot_min_managers: Option<u32>,
        /// Autopilot's threshold, seconds.
        pub autopilot_dead_after_secs: Option<u64>,
        /// Which workers autopilot may promote.
        pub autopilot_promote_constraints: Option<Vec<crate::service::Constraint>>,
    }
);

impl SettingsChange {
    /// Applies the change to `s`.
    pub fn apply_to(&self, s: &mut Settings) {
        if let Some(v) = self.cert_lifetime_secs {
            s.cert_lifetime_secs = v;
        }
        if let Some(v) = self.cert_grace_secs {
            s.cert_grace_secs = v;
        }
        if let Some(v) = self.autopilot_cleanup_dead_managers {
            s.autopilot.cleanup_dead_managers = v;
        }
        if let Some(v) = self.autopilot_min_managers {
            s.autopilot.min_managers = v;
        }
        if let Some(v) = self.autopilot_dead_after_secs {
            s.autopilot.dead_after_secs = v;
        }
        if let Some(v) = &self.autopilot_promote_constraints {
            s.autopilot.promote_constraints = v.clone();
        }
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == SettingsChange::default()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timing_multiplier: 1,
            cert_lifetime_secs: 90 * 24 * 3600,
            cert_grace_secs: 30 * 24 * 3600,
            snapshot_interval: 100_000,
            autopilot: Autopilot::default(),
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
        /// A root CA rotation under way (`starling ca rotate`).
        pub rotation: Option<CaRotation>,
        /// The root the last completed rotation replaced, PEM (its key is gone), and the
        /// new root cross-signed by it: nodes keep presenting both, so a node that was off
        /// during the rotation can still verify a manager and renew with its old certificate.
        pub previous_ca_cert_pem: String,
        /// The current root's certificate signed by the previous root's key, PEM.
        pub previous_cross_signed_pem: String,
    }
);

wire_type!(
    /// A root CA rotation under way: new certificates are signed by the new root, every
    /// node trusts both roots and presents the cross-signed certificate, until every node
    /// not down is on the new root; then the old root is dropped.
    pub struct CaRotation {
        /// The new root's certificate, PEM.
        pub new_cert_pem: String,
        /// The new root's private key, PEM.
        pub new_key_pem: String,
        /// The new root's certificate signed by the current root's key, PEM.
        pub cross_signed_pem: String,
        /// Digest (hex SHA-256) of the new root's certificate.
        pub new_digest: String,
        /// When it started, Unix seconds.
        pub started_at: u64,
    }
);

impl ClusterInfo {
    /// The CA that signs new certificates (certificate and key, PEM): the new root during
    /// a rotation.
    pub fn signing_ca_pem(&self) -> (&str, &str) {
        match &self.rotation {
            Some(r) => (&r.new_cert_pem, &r.new_key_pem),
            None => (&self.ca_cert_pem, &self.ca_key_pem),
        }
    }

    /// The roots a node trusts, PEM, the signing one first: both during a rotation.
    pub fn trusted_roots_pem(&self) -> Vec<&str> {
        match &self.rotation {
            Some(r) => vec![&r.new_cert_pem, &self.ca_cert_pem],
            None => vec![&self.ca_cert_pem],
        }
    }

    /// What a node presents after its own certificate, PEM: during a rotation the
    /// cross-signed new root; after one, that certificate and the old root.
    pub fn chain_pem(&self) -> Vec<&str> {
        match &self.rotation {
            Some(r) => vec![&r.cross_signed_pem],
            None if !self.previous_cross_signed_pem.is_empty() => {
                vec![&self.previous_cross_signed_pem, &self.previous_ca_cert_pem]
            }
            None => Vec::new(),
        }
    }
}

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
