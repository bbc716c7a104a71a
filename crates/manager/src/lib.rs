//! What runs on the managers beside Raft: the orchestrators that turn services into tasks,
//! the scheduler that places them, the reaper, and the dispatcher that hands tasks to the
//! nodes' agents and takes their reports.
//!
//! Each component is a pure core over a read-only [`ClusterState`] (tested without Raft,
//! sockets or clocks) and a thin driver: the [`supervisor`] runs the cores on the Raft
//! leader only and writes their plans as batched [`Command::WriteTasks`] entries; the
//! [`dispatcher`] serves every node's agent session from any manager.
//!
//! ```text
//!   agents ──starling/dispatch/1──▶ dispatcher ──ReportTasks──▶ Raft ──▶ ClusterState
//!      ▲                                 │                                  │
//!      └──────── assignments ◀───────────┘          supervisor (leader): orchestrator::reconcile
//!                                                               + scheduler::schedule ──WriteTasks──▶ Raft
//! ```
//!
//! [`ClusterState`]: starling_state::ClusterState
//! [`Command::WriteTasks`]: starling_state::Command::WriteTasks

pub mod autopilot;
pub mod ca_rotation;
pub mod dispatcher;
pub mod orchestrator;
pub mod scheduler;
pub mod supervisor;

pub use orchestrator::{OrchestratorConfig, Plan, reconcile};
pub use scheduler::{constraint_text, constraints_hold, port_capacity, schedule};
