//! Tasks: one run of a service's template in a slot (replicated) or on a node (global),
//! with the monotonic state ladder of swarm and the rules `apply` enforces on it.

use serde::{Deserialize, Serialize};

use crate::service::TaskTemplate;

wire_type!(
    /// A task's state, in swarm's order: a task only moves down this list.
    #[derive(Copy, PartialOrd, Ord, Hash)]
    pub enum TaskState {
        /// Created.
        New,
        /// Waiting for a node.
        Pending,
        /// Given to a node.
        Assigned,
        /// The node's agent took it.
        Accepted,
        /// The agent prepares it (directories, ports).
        Preparing,
        /// Prepared; waits to be started (a delayed restart waits here).
        Ready,
        /// Being started.
        Starting,
        /// Its process runs.
        Running,
        /// Exited with status 0.
        Complete,
        /// Stopped on purpose.
        Shutdown,
        /// Exited with an error, was killed, or could not start after it was accepted.
        Failed,
        /// Refused by the agent before it ran (a program that does not exist, …).
        Rejected,
        /// To be removed (a desired state only).
        Remove,
        /// Its node was lost and it was replaced elsewhere.
        Orphaned,
    }
);

impl TaskState {
    /// Every state, in order.
    pub const ALL: [TaskState; 14] = [
        TaskState::New,
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Accepted,
        TaskState::Preparing,
        TaskState::Ready,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Shutdown,
        TaskState::Failed,
        TaskState::Rejected,
        TaskState::Remove,
        TaskState::Orphaned,
    ];

    /// Past `Running`: the task will not run (again).
    pub fn is_terminal(self) -> bool {
        self > TaskState::Running
    }

    /// The stable lower-case name (as `service ps` prints it).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Accepted => "accepted",
            TaskState::Preparing => "preparing",
            TaskState::Ready => "ready",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Shutdown => "shutdown",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Remove => "remove",
            TaskState::Orphaned => "orphaned",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

wire_type!(
    /// How a task's process ended.
    pub enum ExitInfo {
        /// It exited with this status.
        Code(i32),
        /// A signal ended it.
        Signal(i32),
        /// The kernel killed it for exceeding its memory limit.
        OomKilled,
    }
);

wire_type!(
    /// What is known of a task as it runs.
    pub struct TaskStatus {
        /// Its state.
        pub state: TaskState,
        /// What happened last, in words.
        pub message: String,
        /// The error, for a failed or rejected task.
        pub error: Option<String>,
        /// How its process ended.
        pub exit: Option<ExitInfo>,
        /// When the reporter saw this state (ms since the Unix epoch, its clock).
        pub timestamp: u64,
        /// Its health, for a running task with a health check.
        pub health: Option<TaskHealth>,
    }
);

wire_type!(
    /// A checked task's health.
    #[derive(Copy)]
    pub enum TaskHealth {
        /// No check has passed yet.
        Starting,
        /// The last check passed.
        Healthy,
        /// Checks failed `retries` times in a row.
        Unhealthy,
    }
);

impl TaskHealth {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskHealth::Starting => "starting",
            TaskHealth::Healthy => "healthy",
            TaskHealth::Unhealthy => "unhealthy",
        }
    }
}

impl TaskStatus {
    /// A status with a state and message, nothing else.
    pub fn new(state: TaskState, message: impl Into<String>, timestamp: u64) -> TaskStatus {
        TaskStatus {
            state,
            message: message.into(),
            error: None,
            exit: None,
            timestamp,
            health: None,
        }
    }
}

wire_type!(
    /// Where a task belongs: a slot number (replicated) or a node (global).
    #[derive(PartialOrd, Ord, Hash)]
    pub enum Slot {
        /// Replicated service slot (1-based).
        Number(u32),
        /// Global service: the node id.
        Node(String),
    }
);

wire_type!(
    /// A port allocated to a task on its node.
    pub struct AssignedPort {
        /// The spec's port name.
        pub name: String,
        /// The host port.
        pub port: u16,
    }
);

wire_type!(
    /// A task as the cluster records it.
    pub struct Task {
        /// Id (never reused).
        pub id: String,
        /// Its service's id.
        pub service: String,
        /// Its service's name when it was created.
        pub service_name: String,
        /// Its slot.
        pub slot: Slot,
        /// The service's `spec_version` it was made from.
        pub spec_version: u64,
        /// What it runs (a copy of the service's template at `spec_version`).
        pub template: TaskTemplate,
        /// The node it was assigned to.
        pub node: Option<String>,
        /// What the managers want of it.
        pub desired: TaskState,
        /// What is known of it.
        pub status: TaskStatus,
        /// Ports allocated on its node.
        pub ports: Vec<AssignedPort>,
        /// Not to be started before this time (ms since the Unix epoch; a delayed restart).
        pub not_before: u64,
        /// Restarts of its slot counted for the restart policy (their times), carried from
        /// task to task in the slot so a leader change does not reset them.
        pub restarts: Vec<u64>,
        /// The task this one replaced, if any.
        pub replaces: Option<String>,
        /// Why the scheduler could not place it yet.
        pub pending_reason: Option<String>,
        /// Creation time (the proposing manager's clock).
        pub created_at: u64,
        /// Bumped by every change.
        pub version: u64,
        /// Revision that created it.
        pub created_revision: u64,
        /// Revision of the last change.
        pub updated_revision: u64,
    }
);

impl Task {
    /// Whether it holds its slot: wanted running (or about to be) and not ended.
    pub fn is_runnable(&self) -> bool {
        self.desired <= TaskState::Running && !self.status.state.is_terminal()
    }

    /// Whether it runs and serves: running, and healthy if it has a health check. A new
    /// task of a start-first replacement or a rolling update counts once it is ready.
    pub fn is_ready(&self) -> bool {
        self.status.state == TaskState::Running
            && (self.template.health.is_none() || self.status.health == Some(TaskHealth::Healthy))
    }
}

wire_type!(
    /// One change to tasks, written by the leader's orchestrators and scheduler in a batch
    /// ([`crate::Command::WriteTasks`]). Each op applies whole or not at all; a refused op
    /// leaves the others of its batch to apply.
    pub enum TaskOp {
        /// A new task in `slot` of `service`, from the service's current template.
        Create {
            /// Service id.
            service: String,
            /// Slot.
            slot: Slot,
            /// For a global service, its node (the task is then created assigned).
            node: Option<String>,
            /// Not to be started before (ms; 0 = at once).
            not_before: u64,
            /// Restart times carried over from the slot's previous task.
            restarts: Vec<u64>,
            /// The task it replaces: it is stopped in the same entry (desired `Shutdown`,
            /// or `Orphaned` when `lost`), unless `start_first`.
            replaces: Option<String>,
            /// The replaced task keeps running until the new one runs (start-first).
            start_first: bool,
            /// The replaced task's node is lost: it becomes `Orphaned`.
            lost: bool,
        },
        /// Give a pending task to a node, with its ports.
        Assign {
            /// Task id.
            task: String,
            /// Node id.
            node: String,
            /// Ports allocated there.
            ports: Vec<AssignedPort>,
        },
        /// Raise a task's desired state (to `Running` after a delay, `Shutdown`, `Remove`).
        SetDesired {
            /// Task id.
            task: String,
            /// New desired state.
            desired: TaskState,
        },
        /// Record why a task is still pending (written only when the text changes).
        Explain {
            /// Task id.
            task: String,
            /// The reason.
            why: String,
        },
        /// A task on a lost node that was replaced: `Orphaned`.
        Orphan {
            /// Task id.
            task: String,
        },
        /// Remove a task record (the reaper: old terminal tasks).
        Delete {
            /// Task id.
            task: String,
        },
        /// Record where a service's rolling update stands (the updater: paused, completed,
        /// rolled back). Refused unless the service is still at `spec_version`.
        SetUpdateState {
            /// Service id.
            service: String,
            /// The spec version the update brings tasks to.
            spec_version: u64,
            /// The new state.
            state: crate::service::UpdateState,
            /// Why.
            message: String,
        },
        /// Return a service to its previous spec (the updater's automatic rollback after
        /// failed tasks). Refused unless the service is still at `spec_version`.
        Rollback {
            /// Service id.
            service: String,
            /// The spec version that failed.
            spec_version: u64,
            /// Why.
            message: String,
        },
    }
);

wire_type!(
    /// A task's new status as its node's agent reports it.
    pub struct TaskReport {
        /// Task id.
        pub task: String,
        /// The status.
        pub status: TaskStatus,
    }
);

wire_type!(
    /// Why one task op or report was refused; the task is unchanged.
    pub enum TaskRefusal {
        /// No such task.
        NoSuchTask,
        /// No such service.
        NoSuchService,
        /// No such node, or it is not ready and active.
        NodeUnavailable,
        /// The state would go backwards or leave a terminal state.
        Backwards {
            /// The state it has.
            from: TaskState,
            /// The state asked for.
            to: TaskState,
        },
        /// The desired state would go down.
        DesiredBackwards {
            /// The desired state it has.
            from: TaskState,
            /// The one asked for.
            to: TaskState,
        },
        /// The reporter may not set this state (an agent sets `Accepted` to `Rejected`).
        NotAllowed {
            /// The state asked for.
            to: TaskState,
        },
        /// The report came from a node the task is not assigned to.
        WrongNode,
        /// The slot already has a runnable task (not the one replaced).
        SlotOccupied {
            /// That task.
            task: String,
        },
        /// The task is not pending (an assignment), or not on a node (an orphaning).
        WrongState {
            /// Its state.
            state: TaskState,
        },
        /// A port is taken on that node.
        PortTaken {
            /// The port.
            port: u16,
        },
        /// The task still runs or is wanted: only ended tasks are deleted.
        NotEnded,
        /// A replacement names a task of another service or slot.
        OtherSlot,
        /// The service's spec changed since the plan was made.
        StaleSpec,
        /// The service has no previous spec to return to.
        NoPreviousSpec,
    }
);

impl std::fmt::Display for TaskRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskRefusal::NoSuchTask => write!(f, "no such task"),
            TaskRefusal::NoSuchService => write!(f, "no such service"),
            TaskRefusal::NodeUnavailable => write!(f, "the node is not ready and active"),
            TaskRefusal::Backwards { from, to } => write!(f, "state {from} cannot become {to}"),
            TaskRefusal::DesiredBackwards { from, to } => {
                write!(f, "desired state {from} cannot become {to}")
            }
            TaskRefusal::NotAllowed { to } => write!(f, "an agent cannot set state {to}"),
            TaskRefusal::WrongNode => write!(f, "the task is assigned to another node"),
            TaskRefusal::StaleSpec => write!(f, "the service's spec changed meanwhile"),
            TaskRefusal::NoPreviousSpec => write!(f, "the service has no previous spec"),
            TaskRefusal::SlotOccupied { task } => write!(f, "the slot already runs task {task}"),
            TaskRefusal::WrongState { state } => write!(f, "the task is {state}"),
            TaskRefusal::PortTaken { port } => write!(f, "port {port} is taken on that node"),
            TaskRefusal::NotEnded => write!(f, "the task has not ended"),
            TaskRefusal::OtherSlot => write!(f, "the replaced task is of another slot"),
        }
    }
}

/// Whether an agent may move a task from `from` to `to` (`Ok(false)`: the same state again,
/// which every new session re-reports, changes nothing).
pub fn check_report(from: TaskState, to: TaskState) -> Result<bool, TaskRefusal> {
    if !(TaskState::Accepted..=TaskState::Rejected).contains(&to) {
        return Err(TaskRefusal::NotAllowed { to });
    }
    if from == to {
        return Ok(false);
    }
    if to < from || from.is_terminal() {
        return Err(TaskRefusal::Backwards { from, to });
    }
    // Rejected means "never ran": not after Running.
    if to == TaskState::Rejected && from >= TaskState::Running {
        return Err(TaskRefusal::Backwards { from, to });
    }
    Ok(true)
}

wire_type!(
    /// What a node's agent reported of its machine at its session start: the scheduler reads
    /// it beside the node record.
    pub struct NodeDescription {
        /// Memory (bytes).
        pub memory_bytes: u64,
        /// CPUs, in billionths.
        pub nano_cpus: u64,
        /// First host port tasks may be given.
        pub port_min: u16,
        /// Last host port tasks may be given.
        pub port_max: u16,
        /// How tasks are isolated: `process-group`, or `cgroup-v2 (…)` with what it enforces.
        pub isolation: String,
    }
);
