//! Commands (what a Raft log entry carries) and what applying them did.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::objects::{
    Availability, CaRotation, ClientRecord, ClusterInfo, KvEntry, NodeRecord, NodeRole, NodeStatus,
    SettingsChange,
};
use crate::service::{Service, ServiceSpec};
use crate::task::{NodeDescription, TaskOp, TaskRefusal, TaskReport};

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
            #[serde(with = "serde_bytes")]
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
            #[serde(with = "serde_bytes")]
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
            #[serde(with = "serde_bytes")]
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
        /// Remove a node record and revoke its id (refused by every manager from now on), in
        /// one entry. Refused ([`Outcome::NodeIsManager`]) for a manager, a node being
        /// promoted or one holding a Raft id.
        RemoveNode {
            /// Node id.
            id: String,
        },
        /// Record the certificate a node was just issued (a renewal or a role change).
        SetNodeCert {
            /// Node id.
            id: String,
            /// Its serial, hex.
            serial: String,
            /// When it expires, Unix seconds.
            not_after: u64,
            /// Digest (hex) of the root that signed it.
            ca: String,
            /// Digest (hex) of its public key.
            key: String,
        },
        /// Start a root CA rotation. Refused ([`Outcome::CaRotation`]) while one is under way.
        StartCaRotation {
            /// The new root and its cross-signed certificate.
            rotation: CaRotation,
        },
        /// Finish the rotation to the root of digest `new_digest`: it becomes the cluster's
        /// CA, the old root is kept (without its key) for nodes that missed the rotation, and
        /// the join secrets are replaced (tokens carry the CA digest: the old ones stop
        /// working). Refused ([`Outcome::CaRotation`]) if no such rotation is under way.
        FinishCaRotation {
            /// The new root's digest.
            new_digest: String,
            /// The new join secret per role.
            join_secrets: BTreeMap<String, Vec<u8>>,
        },
        /// Change cluster settings; a field left `None` keeps its value. Answers
        /// [`Outcome::Done`].
        UpdateSettings {
            /// What changes.
            change: SettingsChange,
        },
        /// Replace the cluster's identity material and settings.
        SetCluster {
            /// The new value.
            info: ClusterInfo,
        },
        /// Give `node` a Raft id: the one it already holds, else the next never-used one.
        /// Answers [`Outcome::RaftId`].
        AssignRaftId {
            /// Node id.
            node: String,
        },
        /// A manager left the Raft group: it is recorded as a worker and its Raft id is
        /// released (never handed out again), in one entry.
        RetireManager {
            /// Node id.
            node: String,
        },
        /// Record an API client certificate. Refused ([`Outcome::ClientExists`]) if a client
        /// of that name exists and is not revoked.
        AddClient {
            /// The record; `created_revision` is set by `apply`.
            client: ClientRecord,
        },
        /// Revoke an API client: its certificate is refused by every manager from now on.
        RevokeClient {
            /// Its name.
            name: String,
        },
        /// Replace one role's join secret (tokens with the old one stop working); the other
        /// roles' secrets are untouched, so concurrent rotations cannot undo each other.
        SetJoinSecret {
            /// The role (`manager`, `worker`).
            role: String,
            /// The new secret.
            secret: Vec<u8>,
        },
        /// Create a service. Refused if the spec is invalid ([`Outcome::InvalidSpec`]) or
        /// its name is taken ([`Outcome::ServiceNameTaken`]).
        CreateService {
            /// The spec.
            spec: ServiceSpec,
            /// The proposing manager's clock (ms since the Unix epoch).
            at: u64,
        },
        /// Replace a service's spec. `expected_version` (0: any) guards against a lost
        /// update ([`Outcome::ServiceVersionConflict`]); the previous spec is kept for
        /// rollback, and `spec_version` moves when the task template changed.
        UpdateService {
            /// Service id.
            id: String,
            /// The new spec.
            spec: ServiceSpec,
            /// The version the change was made against (0: any).
            expected_version: u64,
            /// The proposing manager's clock.
            at: u64,
        },
        /// Return a service to its previous spec (`service rollback`): the two specs swap,
        /// the spec version moves, and the tasks are replaced with the rollback settings.
        RollbackService {
            /// Service id.
            id: String,
            /// The proposing manager's clock.
            at: u64,
        },
        /// Remove a service: in the same entry its runnable tasks are wanted `Remove` and
        /// its tasks that never reached a node end.
        RemoveService {
            /// Service id.
            id: String,
        },
        /// A batch of task changes from the leader's orchestrators and scheduler: one log
        /// entry, each op whole or not at all ([`Outcome::Tasks`] lists the refused ones).
        WriteTasks {
            /// The proposing manager's clock.
            at: u64,
            /// The changes, applied in order.
            ops: Vec<TaskOp>,
        },
        /// Task statuses reported by `node`'s agent (coalesced by the dispatcher); a report
        /// for a task of another node, or one going backwards, is refused.
        ReportTasks {
            /// The reporting node.
            node: String,
            /// The statuses.
            reports: Vec<TaskReport>,
        },
        /// Add and remove node labels (`node update --label-add/--label-rm`).
        SetNodeLabels {
            /// Node id.
            id: String,
            /// Labels to set.
            add: BTreeMap<String, String>,
            /// Labels to remove.
            remove: Vec<String>,
        },
        /// What a node's agent reports of its machine.
        SetNodeDescription {
            /// Node id.
            id: String,
            /// The description.
            description: NodeDescription,
        },
    }
);

impl Command {
    /// Whether the command can change only user keys (or nothing): not the nodes, services,
    /// tasks or cluster settings the managers act on.
    pub fn keys_only(&self) -> bool {
        matches!(
            self,
            Command::Noop | Command::Put { .. } | Command::Delete { .. } | Command::Txn { .. }
        )
    }

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
            Command::SetNodeCert { id, serial, .. } => write!(f, "node {id} certificate {serial}"),
            Command::UpdateSettings { .. } => write!(f, "update cluster settings"),
            Command::StartCaRotation { rotation } => {
                write!(f, "start a root CA rotation to {}", rotation.new_digest)
            }
            Command::FinishCaRotation { new_digest, .. } => {
                write!(f, "finish the root CA rotation to {new_digest}")
            }
            Command::SetCluster { info } => write!(f, "set cluster {}", info.cluster_id),
            Command::AssignRaftId { node } => write!(f, "assign a raft id to {node}"),
            Command::RetireManager { node } => write!(f, "retire manager {node}"),
            Command::AddClient { client } => write!(f, "add api client {}", client.name),
            Command::RevokeClient { name } => write!(f, "revoke api client {name}"),
            Command::SetJoinSecret { role, .. } => write!(f, "new join secret for {role}"),
            Command::CreateService { spec, .. } => write!(f, "create service {}", spec.name),
            Command::UpdateService { id, .. } => write!(f, "update service {id}"),
            Command::RollbackService { id, .. } => write!(f, "roll back service {id}"),
            Command::RemoveService { id } => write!(f, "remove service {id}"),
            Command::WriteTasks { ops, .. } => write!(f, "write {} task changes", ops.len()),
            Command::ReportTasks { node, reports } => {
                write!(f, "{} task reports from {node}", reports.len())
            }
            Command::SetNodeLabels { id, .. } => write!(f, "node {id} labels"),
            Command::SetNodeDescription { id, .. } => write!(f, "node {id} description"),
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
        /// The Raft id the node holds.
        RaftId {
            /// The id.
            id: u64,
        },
        /// An API client record after the change.
        Client {
            /// The record.
            client: ClientRecord,
        },
        /// The command named an API client that does not exist; nothing changed.
        NoSuchClient {
            /// The name.
            name: String,
        },
        /// A client of that name exists and is not revoked; nothing changed.
        ClientExists {
            /// The name.
            name: String,
        },
        /// The node is a manager, is becoming one, or holds a Raft id: it must be demoted
        /// before it is removed. Nothing changed.
        NodeIsManager {
            /// The id.
            id: String,
        },
        /// The id is revoked: a removed node never comes back under its id. Nothing changed.
        Revoked {
            /// The id.
            id: String,
        },
        /// A service after the change (after its removal, for a removal).
        Service {
            /// The record.
            service: Box<Service>,
        },
        /// The command named a service that does not exist; nothing changed.
        NoSuchService {
            /// The id.
            id: String,
        },
        /// Another service has this name; nothing changed.
        ServiceNameTaken {
            /// The name.
            name: String,
        },
        /// The service changed since the version the update was made against; nothing
        /// changed.
        ServiceVersionConflict {
            /// Its version now.
            current: u64,
        },
        /// A root CA rotation command does not fit the rotation state; nothing changed.
        CaRotation {
            /// Why.
            why: String,
        },
        /// The spec is invalid; nothing changed.
        InvalidSpec {
            /// Why.
            why: String,
        },
        /// What a batch of task changes did.
        Tasks {
            /// Ids of the tasks created, in op order.
            created: Vec<String>,
            /// The ops refused (by index in the batch) and why; the others applied.
            refused: Vec<OpRefusal>,
        },
        /// What a batch of task reports did.
        TaskReports {
            /// Reports that changed a task.
            applied: u32,
            /// Reports of a state the task already had.
            unchanged: u32,
            /// Reports refused, and why.
            refused: Vec<OpRefusal>,
        },
    }
);

wire_type!(
    /// One refused op or report of a batch.
    pub struct OpRefusal {
        /// Its index in the batch.
        pub index: u32,
        /// The task it named, if any.
        pub task: Option<String>,
        /// Why.
        pub refusal: TaskRefusal,
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
