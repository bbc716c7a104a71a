//! Services: what an operator declares ("3 replicas of this program"), from which the
//! managers derive tasks. Durations are milliseconds and sizes bytes, so every value has one
//! exact encoding in the log and in snapshots.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

wire_type!(
    /// How many tasks a service wants.
    pub enum ServiceMode {
        /// `replicas` tasks, in slots 1..=replicas, placed by the scheduler.
        Replicated {
            /// Desired number of tasks.
            replicas: u32,
        },
        /// One task on every eligible node (ready, active, its constraints hold).
        Global,
    }
);

wire_type!(
    /// When a task that ended is replaced (as `docker service create --restart-condition`).
    pub enum RestartCondition {
        /// Whatever the exit (the default).
        Any,
        /// Only after a failure (non-zero exit, signal, rejected).
        OnFailure,
        /// Never after an exit. A task whose *node* is lost is still replaced unless the
        /// policy opts out with `replace_on_node_loss: false` (moby/moby#32979).
        None,
    }
);

wire_type!(
    /// The restart policy of a service's tasks.
    pub struct RestartPolicy {
        /// When to restart.
        pub condition: RestartCondition,
        /// Delay before a replacement starts (ms; default 5 000, as swarm).
        pub delay_ms: u64,
        /// Restarts allowed within `window_ms`; 0 = unlimited.
        pub max_attempts: u32,
        /// The window the attempts are counted in (ms); 0 = since the spec version began.
        pub window_ms: u64,
        /// Replace tasks of a node that went down or was drained, whatever `condition`
        /// says (default true).
        pub replace_on_node_loss: bool,
    }
);

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay_ms: 5_000,
            max_attempts: 0,
            window_ms: 0,
            replace_on_node_loss: true,
        }
    }
}

wire_type!(
    /// The node attribute a constraint reads.
    pub enum ConstraintKey {
        /// `node.id`.
        Id,
        /// `node.hostname`.
        Hostname,
        /// `node.role` (`manager` or `worker`).
        Role,
        /// `node.labels.<name>`.
        Label(String),
    }
);

wire_type!(
    /// A placement constraint: `node.<key> == value` or `!=`.
    pub struct Constraint {
        /// What it reads.
        pub key: ConstraintKey,
        /// `==` (true) or `!=` (false).
        pub equal: bool,
        /// The value compared with (case-insensitively, as swarm).
        pub value: String,
    }
);

wire_type!(
    /// A placement preference: spread the tasks evenly over the values of a node label.
    pub struct Spread {
        /// The label name (`spread=node.labels.<label>`).
        pub label: String,
    }
);

wire_type!(
    /// Where a service's tasks may run.
    #[derive(Default)]
    pub struct Placement {
        /// Every constraint must hold.
        pub constraints: Vec<Constraint>,
        /// Spread preferences, the first the strongest.
        pub preferences: Vec<Spread>,
    }
);

wire_type!(
    /// What a task reserves on its node; the scheduler places only where it fits. Absent
    /// values reserve nothing.
    #[derive(Default)]
    pub struct Resources {
        /// Memory limit and reservation (bytes).
        pub memory_bytes: Option<u64>,
        /// CPU limit and reservation, in billionths of a CPU.
        pub nano_cpus: Option<u64>,
    }
);

wire_type!(
    /// The transport protocol of a port.
    pub enum PortProtocol {
        /// TCP.
        Tcp,
        /// UDP.
        Udp,
    }
);

wire_type!(
    /// A port a task needs: allocated on its node, passed as `STARLING_PORT_<NAME>`.
    pub struct PortSpec {
        /// Name (upper-case letters, digits, `_`).
        pub name: String,
        /// Protocol.
        pub protocol: PortProtocol,
    }
);

wire_type!(
    /// The program a task runs.
    pub struct ProcessSpec {
        /// Program and arguments (not empty).
        pub argv: Vec<String>,
        /// Environment added to the agent's clean environment.
        pub env: BTreeMap<String, String>,
        /// Working directory (the task's directory if absent).
        pub cwd: Option<String>,
        /// User to run as (only when the agent runs as root).
        pub user: Option<String>,
        /// Signal that asks it to stop (default 15, SIGTERM).
        pub stop_signal: i32,
        /// Time between the stop signal and a kill of its process group (ms; default 10 000).
        pub stop_grace_ms: u64,
    }
);

wire_type!(
    /// What a health check probes.
    pub enum CheckKind {
        /// A TCP connection to the task's port of this name.
        Tcp {
            /// The port's name (one of the template's ports).
            port: String,
        },
        /// An HTTP GET of `path` on the task's port of this name: a 2xx or 3xx passes.
        Http {
            /// The port's name.
            port: String,
            /// The request path (starts with `/`).
            path: String,
        },
        /// A program run beside the task (its environment and directory): exit 0 passes.
        Command {
            /// Program and arguments.
            argv: Vec<String>,
        },
    }
);

wire_type!(
    /// A task's health check, run by its node's agent (as Docker's `HEALTHCHECK`): a task
    /// is `starting` until a check passes, `healthy` while they pass, and `unhealthy` after
    /// `retries` failures in a row — then it is stopped and counts as failed.
    pub struct HealthCheck {
        /// What is probed.
        pub kind: CheckKind,
        /// Time between checks (ms).
        pub interval_ms: u64,
        /// A check that takes longer fails (ms).
        pub timeout_ms: u64,
        /// Failures in a row that make a task unhealthy (at least 1).
        pub retries: u32,
        /// Failures in this time after the start do not count (ms).
        pub start_period_ms: u64,
    }
);

/// Default check interval (ms).
pub const CHECK_INTERVAL_MS: u64 = 5_000;
/// Default check timeout (ms).
pub const CHECK_TIMEOUT_MS: u64 = 2_000;
/// Default failures in a row before a task is unhealthy.
pub const CHECK_RETRIES: u32 = 3;
/// Default time a stopping task's endpoint is published as draining before it is signalled
/// (ms).
pub const DRAIN_DELAY_MS: u64 = 2_000;
/// Default TTL of a service's DNS answers (s).
pub const DNS_TTL_S: u32 = 5;

wire_type!(
    /// Everything a task of a service is made from.
    pub struct TaskTemplate {
        /// The program.
        pub process: ProcessSpec,
        /// Reservations and limits.
        pub resources: Resources,
        /// Restart policy.
        pub restart: RestartPolicy,
        /// Placement.
        pub placement: Placement,
        /// Ports to allocate.
        pub ports: Vec<PortSpec>,
        /// Bumped by `service update --force`: a new template, so every task is replaced.
        pub force_update: u64,
        /// Its health check, if any (a task without one is healthy while it runs).
        pub health: Option<HealthCheck>,
        /// How long its endpoint is published as draining before a stop signal (ms).
        pub drain_delay_ms: u64,
        /// The TTL of DNS answers naming it (s).
        pub dns_ttl_s: u32,
    }
);

wire_type!(
    /// What to do when an update's task fails.
    pub enum FailureAction {
        /// Stop the update (the default).
        Pause,
        /// Go on.
        Continue,
        /// Return to the previous spec.
        Rollback,
    }
);

wire_type!(
    /// The order of a replacement.
    pub enum UpdateOrder {
        /// Stop the old task, then start the new one.
        StopFirst,
        /// Start the new task; stop the old one once the new one runs.
        StartFirst,
    }
);

wire_type!(
    /// How a spec change rolls out.
    pub struct UpdateConfig {
        /// Tasks replaced at once (default 1).
        pub parallelism: u32,
        /// Pause between batches (ms).
        pub delay_ms: u64,
        /// On a failed task.
        pub failure_action: FailureAction,
        /// Replacement order.
        pub order: UpdateOrder,
        /// How long a new task must run to count as a success (ms; default 5 000).
        pub monitor_ms: u64,
        /// Failed new tasks tolerated, per mille of the tasks (0: the first failure acts).
        pub max_failure_permille: u32,
    }
);

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
            failure_action: FailureAction::Pause,
            order: UpdateOrder::StopFirst,
            monitor_ms: 5_000,
            max_failure_permille: 0,
        }
    }
}

wire_type!(
    /// What an operator declares.
    pub struct ServiceSpec {
        /// Unique name, a DNS label.
        pub name: String,
        /// Operator labels.
        pub labels: BTreeMap<String, String>,
        /// Replicated or global.
        pub mode: ServiceMode,
        /// The tasks' template.
        pub task: TaskTemplate,
        /// Rolling updates.
        pub update: UpdateConfig,
        /// How a rollback away from this spec rolls out.
        pub rollback: UpdateConfig,
    }
);

wire_type!(
    /// Where a rolling update stands.
    pub enum UpdateState {
        /// Tasks are being replaced with the new spec.
        Updating,
        /// Stopped after failed tasks (the reason in the message); `service update` or
        /// `service rollback` goes on.
        Paused,
        /// Every task runs the new spec.
        Completed,
        /// Tasks are being returned to the previous spec.
        RollingBack,
        /// A rollback stopped after failed tasks.
        RollbackPaused,
        /// Every task runs the previous spec again.
        RolledBack,
    }
);

impl UpdateState {
    /// Whether tasks are being replaced now.
    pub fn is_active(&self) -> bool {
        matches!(self, UpdateState::Updating | UpdateState::RollingBack)
    }

    /// Its wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            UpdateState::Updating => "updating",
            UpdateState::Paused => "paused",
            UpdateState::Completed => "completed",
            UpdateState::RollingBack => "rolling_back",
            UpdateState::RollbackPaused => "rollback_paused",
            UpdateState::RolledBack => "rolled_back",
        }
    }
}

wire_type!(
    /// The replicated state of a service's last update: a leader change resumes it where it
    /// was (which tasks are replaced is read from the tasks' spec versions).
    pub struct UpdateStatus {
        /// Where it stands.
        pub state: UpdateState,
        /// Why (a pause's failed task, a rollback's cause).
        pub message: String,
        /// The spec version it brings tasks to.
        pub spec_version: u64,
        /// When it started (ms since the Unix epoch).
        pub started_at: u64,
        /// The revision that started it: tasks created after it are this update's.
        pub started_revision: u64,
        /// When it completed, paused or rolled back.
        pub ended_at: Option<u64>,
    }
);

/// The most tasks one replicated service may want.
pub const MAX_REPLICAS: u32 = 100_000;

impl ServiceSpec {
    /// Why this spec cannot be accepted, if it cannot: the checks `apply` makes, so racing
    /// creations meet the same rules the API checks first.
    pub fn invalid(&self) -> Option<String> {
        if let Some(why) = dns_label_error(&self.name) {
            return Some(format!("service name {:?}: {why}", self.name));
        }
        if let ServiceMode::Replicated { replicas } = self.mode
            && replicas > MAX_REPLICAS
        {
            return Some(format!(
                "{replicas} replicas is over the limit of {MAX_REPLICAS}"
            ));
        }
        let p = &self.task.process;
        if p.argv.first().is_none_or(|a| a.is_empty()) {
            return Some("a service needs a program to run".to_owned());
        }
        let mut seen = std::collections::BTreeSet::new();
        for port in &self.task.ports {
            if port.name.is_empty()
                || !port
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return Some(format!(
                    "port name {:?}: use upper-case letters, digits and _",
                    port.name
                ));
            }
            if !seen.insert(&port.name) {
                return Some(format!("port {:?} is named twice", port.name));
            }
        }
        for c in &self.task.placement.constraints {
            if let ConstraintKey::Label(l) = &c.key
                && l.is_empty()
            {
                return Some("a label constraint needs a label name".to_owned());
            }
        }
        if let Some(why) = self.task.health.as_ref().and_then(|h| h.invalid(&seen)) {
            return Some(format!("health check: {why}"));
        }
        if self.task.drain_delay_ms > 10 * 60_000 {
            return Some("a drain delay is at most 10 minutes".to_owned());
        }
        if self.task.dns_ttl_s > 86_400 {
            return Some("a DNS TTL is at most a day (86400 s)".to_owned());
        }
        None
    }
}

impl HealthCheck {
    /// Why the check cannot run, given the names of the template's ports.
    fn invalid(&self, ports: &std::collections::BTreeSet<&String>) -> Option<String> {
        let port = match &self.kind {
            CheckKind::Tcp { port } => Some(port),
            CheckKind::Http { port, path } => {
                if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ')
                {
                    return Some(format!(
                        "path {path:?} must start with / and hold no spaces"
                    ));
                }
                Some(port)
            }
            CheckKind::Command { argv } => {
                if argv.first().is_none_or(|a| a.is_empty()) {
                    return Some("a command check needs a program".to_owned());
                }
                None
            }
        };
        if let Some(port) = port
            && !ports.contains(port)
        {
            return Some(format!("the service has no port named {port:?}"));
        }
        if self.interval_ms < 100 || self.interval_ms > 3_600_000 {
            return Some("the interval is between 100 ms and an hour".to_owned());
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms.max(1_000) * 10 {
            return Some("the timeout is above 0 and at most ten intervals".to_owned());
        }
        if self.retries == 0 || self.retries > 100 {
            return Some("retries are between 1 and 100".to_owned());
        }
        None
    }
}

/// Why `name` is not a DNS label (1–63 of `a-z 0-9 -`, not starting or ending with `-`).
pub fn dns_label_error(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 63 {
        return Some("must be 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("may hold only lower-case letters, digits and -");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("may not start or end with -");
    }
    None
}

wire_type!(
    /// A service as the cluster records it.
    pub struct Service {
        /// Id (never reused).
        pub id: String,
        /// The spec in force.
        pub spec: ServiceSpec,
        /// Bumped by every change to the service (compare-and-swap for updates).
        pub version: u64,
        /// Bumped when the task template changes: tasks of an older one are replaced.
        pub spec_version: u64,
        /// The spec before the last update (for rollback).
        pub previous_spec: Option<ServiceSpec>,
        /// The last update's progress (none before the first).
        pub update_status: Option<UpdateStatus>,
        /// Creation time on the proposing manager's clock (ms since the Unix epoch).
        pub created_at: u64,
        /// Last change, same clock.
        pub updated_at: u64,
        /// Revision that created it.
        pub created_revision: u64,
        /// Revision of the last change.
        pub updated_revision: u64,
    }
);
