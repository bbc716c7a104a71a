//! The replicated object model of a Starling cluster and its pure state machine.
//!
//! This crate owns *what* the managers replicate — nodes, the key-value store, the cluster's
//! identity and settings, and the system records Starling keeps for itself (the revoked set,
//! Raft-id allocation, API client certificates) — and how a committed [`Command`] changes it.
//! It has no tokio, no openraft and no I/O: [`ClusterState::apply`] is a function of the
//! state, the command and its revision, tested without Raft, sockets or clocks.
//!
//! ```text
//!   starling-node (CLI, control API handlers)      starling-api (wire types)
//!          │ Command                                      │ views of the objects
//!          ▼                                              ▼
//!   starling-raft-store ── replicates, then in log order ──▶ ClusterState::apply(rev, &cmd)
//!                                                            │
//!                         nodes · kv · cluster · system ◀────┘ (CommandResult, KvEvents)
//! ```
//!
//! The key-value space belongs to users: no key is reserved or interpreted, and no `kv`
//! command can read or change a system record.
//!
//! ```
//! use starling_state::{ClusterState, Command, Outcome};
//!
//! let mut state = ClusterState::new();
//! state.apply(1, &Command::Put { key: "_starling/removed/w1".into(), value: vec![] });
//! assert!(!state.is_revoked("w1"), "a key is only a key");
//! let (result, _) = state.apply(2, &Command::AssignRaftId { node: "m2".into() });
//! assert_eq!(result.outcome, Outcome::RaftId { id: 2 });
//! ```

/// Derives what every replicated type needs: serde (the Raft log, through postcard) and rkyv
/// (snapshots).
macro_rules! wire_type {
    ($(#[$m:meta])* $vis:vis $kind:ident $name:ident $body:tt) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        $vis $kind $name $body
    };
}

mod command;
mod objects;
mod service;
mod state;
mod task;
mod workload;

pub use workload::node_schedulable;

pub use command::{Command, CommandResult, Compare, KvEvent, OpRefusal, Outcome, TxnOp};
pub use objects::{
    Autopilot, Availability, CaRotation, ClientRecord, ClientRole, ClusterInfo, KvEntry,
    NodeRecord, NodeRole, NodeStatus, Settings, SettingsChange, SystemRecords,
};
pub use service::{
    CHECK_INTERVAL_MS, CHECK_RETRIES, CHECK_TIMEOUT_MS, CheckKind, Constraint, ConstraintKey,
    DNS_TTL_S, DRAIN_DELAY_MS, FailureAction, HealthCheck, MAX_REPLICAS, Placement, PortProtocol,
    PortSpec, ProcessSpec, Resources, RestartCondition, RestartPolicy, Service, ServiceMode,
    ServiceSpec, Spread, TaskTemplate, UpdateConfig, UpdateOrder, UpdateState, UpdateStatus,
    dns_label_error,
};
pub use state::{ClusterState, StateImage, WATCH_HISTORY};
pub use task::{
    AssignedPort, ExitInfo, NodeDescription, Slot, Task, TaskHealth, TaskOp, TaskRefusal,
    TaskReport, TaskState, TaskStatus, check_report,
};
