//! Services and tasks on the wire: what `service create|ls|ps|inspect|update|scale|rm` and
//! `node ps` send and receive. Enum values are lower-case names; durations milliseconds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Replicated (a number of tasks) or global (one per eligible node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `replicas` tasks.
    #[default]
    Replicated,
    /// One task per eligible node.
    Global,
}

/// When an ended task is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Always (the default).
    #[default]
    Any,
    /// After a failure only.
    OnFailure,
    /// Never (a lost node's tasks are still replaced unless `replace_on_node_loss` is off).
    None,
}

/// A port a task needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortRequest {
    /// Name: upper-case letters, digits and `_` (`STARLING_PORT_<NAME>`).
    pub name: String,
    /// `tcp` (default) or `udp`.
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "tcp".to_owned()
}

fn default_replicas() -> u32 {
    1
}

fn default_signal() -> i32 {
    15
}

fn default_grace() -> u64 {
    10_000
}

fn default_delay() -> u64 {
    5_000
}

fn yes() -> bool {
    true
}

fn default_drain() -> u64 {
    starling_state::DRAIN_DELAY_MS
}

fn default_ttl() -> u32 {
    starling_state::DNS_TTL_S
}

fn default_interval() -> u64 {
    starling_state::CHECK_INTERVAL_MS
}

fn default_timeout() -> u64 {
    starling_state::CHECK_TIMEOUT_MS
}

fn default_retries() -> u32 {
    starling_state::CHECK_RETRIES
}

/// What a health check probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    /// A TCP connection to the named port.
    Tcp,
    /// An HTTP GET of `path` on the named port; a 2xx or 3xx answer passes.
    Http,
    /// A program run beside the task; exit 0 passes.
    Command,
}

/// A task's health check, run by its node's agent. A checked task is `starting` until a
/// check passes, `healthy` while they pass, `unhealthy` after `retries` failures in a row
/// (then it is stopped and counts as failed, as in Docker swarm). DNS and the endpoint API
/// serve only healthy tasks; start-first replacements and rolling updates wait for them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthCheckSpec {
    /// `tcp`, `http` or `command`.
    #[serde(rename = "type")]
    pub kind: CheckType,
    /// The port's name (`tcp`, `http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// The request path (`http`; default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Program and arguments (`command`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Time between checks (ms, default 5 000).
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// A check taking longer fails (ms, default 2 000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Failures in a row that make a task unhealthy (default 3).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Failures in this time after the start do not count (ms, default 0).
    #[serde(default)]
    pub start_period_ms: u64,
}

impl HealthCheckSpec {
    fn to_state(&self) -> Result<starling_state::HealthCheck, String> {
        use starling_state::CheckKind;
        let port = || {
            self.port
                .clone()
                .ok_or_else(|| "health check: a tcp or http check names a port".to_owned())
        };
        let kind = match self.kind {
            CheckType::Tcp => CheckKind::Tcp { port: port()? },
            CheckType::Http => CheckKind::Http {
                port: port()?,
                path: self.path.clone().unwrap_or_else(|| "/".to_owned()),
            },
            CheckType::Command => CheckKind::Command {
                argv: self.command.clone(),
            },
        };
        Ok(starling_state::HealthCheck {
            kind,
            interval_ms: self.interval_ms,
            timeout_ms: self.timeout_ms,
            retries: self.retries,
            start_period_ms: self.start_period_ms,
        })
    }

    fn from_state(h: &starling_state::HealthCheck) -> HealthCheckSpec {
        use starling_state::CheckKind;
        let (kind, port, path, command) = match &h.kind {
            CheckKind::Tcp { port } => (CheckType::Tcp, Some(port.clone()), None, vec![]),
            CheckKind::Http { port, path } => (
                CheckType::Http,
                Some(port.clone()),
                Some(path.clone()),
                vec![],
            ),
            CheckKind::Command { argv } => (CheckType::Command, None, None, argv.clone()),
        };
        HealthCheckSpec {
            kind,
            port,
            path,
            command,
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            retries: h.retries,
            start_period_ms: h.start_period_ms,
        }
    }
}

/// What a rolling update (or rollback) does when a new task fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Stop replacing tasks (the default); `service update` resumes, `service rollback`
    /// returns.
    #[default]
    Pause,
    /// Go on.
    Continue,
    /// Return to the previous spec (for a rollback: pause).
    Rollback,
}

/// The order of a replacement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Stop the old task, then start the new one (the default).
    #[default]
    StopFirst,
    /// Start the new task; the old one stops once the new one runs.
    StartFirst,
}

/// How tasks are replaced when the spec changes (`update`) or returns (`rollback`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpdateSettings {
    /// Tasks replaced in one batch (0: all at once).
    #[serde(default = "default_replicas")]
    pub parallelism: u32,
    /// Pause between batches (ms).
    #[serde(default)]
    pub delay_ms: u64,
    /// What a failed new task does.
    #[serde(default)]
    pub failure_action: FailureAction,
    /// Failed new tasks tolerated, as a fraction of the tasks (0 to 1).
    #[serde(default)]
    pub max_failure_ratio: f64,
    /// Stop-first or start-first.
    #[serde(default)]
    pub order: UpdateOrder,
    /// How long a new task must run to count as a success (ms).
    #[serde(default = "default_delay")]
    pub monitor_ms: u64,
}

impl Eq for UpdateSettings {}

impl Default for UpdateSettings {
    fn default() -> Self {
        UpdateSettings {
            parallelism: 1,
            delay_ms: 0,
            failure_action: FailureAction::Pause,
            max_failure_ratio: 0.0,
            order: UpdateOrder::StopFirst,
            monitor_ms: 5_000,
        }
    }
}

impl UpdateSettings {
    fn to_state(&self, what: &str) -> Result<starling_state::UpdateConfig, String> {
        use starling_state as st;
        if !(0.0..=1.0).contains(&self.max_failure_ratio) {
            return Err(format!(
                "{what} max failure ratio {} is not between 0 and 1",
                self.max_failure_ratio
            ));
        }
        Ok(st::UpdateConfig {
            parallelism: self.parallelism,
            delay_ms: self.delay_ms,
            failure_action: match self.failure_action {
                FailureAction::Pause => st::FailureAction::Pause,
                FailureAction::Continue => st::FailureAction::Continue,
                FailureAction::Rollback => st::FailureAction::Rollback,
            },
            order: match self.order {
                UpdateOrder::StopFirst => st::UpdateOrder::StopFirst,
                UpdateOrder::StartFirst => st::UpdateOrder::StartFirst,
            },
            monitor_ms: self.monitor_ms,
            max_failure_permille: (self.max_failure_ratio * 1000.0).round() as u32,
        })
    }

    fn from_state(c: &starling_state::UpdateConfig) -> UpdateSettings {
        use starling_state as st;
        UpdateSettings {
            parallelism: c.parallelism,
            delay_ms: c.delay_ms,
            failure_action: match c.failure_action {
                st::FailureAction::Pause => FailureAction::Pause,
                st::FailureAction::Continue => FailureAction::Continue,
                st::FailureAction::Rollback => FailureAction::Rollback,
            },
            max_failure_ratio: f64::from(c.max_failure_permille) / 1000.0,
            order: match c.order {
                st::UpdateOrder::StopFirst => UpdateOrder::StopFirst,
                st::UpdateOrder::StartFirst => UpdateOrder::StartFirst,
            },
            monitor_ms: c.monitor_ms,
        }
    }
}

/// Where a service's last rolling update stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UpdateStatusView {
    /// `updating`, `paused`, `completed`, `rolling_back`, `rollback_paused` or `rolled_back`.
    pub state: String,
    /// Why (a pause's failed task, a rollback's cause).
    pub message: String,
    /// The spec version it brings tasks to.
    pub spec_version: u64,
    /// Started (ms since the Unix epoch).
    pub started_at: u64,
    /// Completed, paused or rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
}

impl UpdateStatusView {
    /// The wire form.
    pub fn from_state(u: &starling_state::UpdateStatus) -> UpdateStatusView {
        UpdateStatusView {
            state: u.state.as_str().to_owned(),
            message: u.message.clone(),
            spec_version: u.spec_version,
            started_at: u.started_at,
            ended_at: u.ended_at,
        }
    }
}

/// A service as an operator declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceSpec {
    /// Unique name, a DNS label (1–63 of `a-z 0-9 -`).
    pub name: String,
    /// `replicated` (default) or `global`.
    #[serde(default)]
    pub mode: Mode,
    /// Tasks wanted (replicated only; default 1).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the task's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User to run as (when the agent runs as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Signal that stops it (default 15).
    #[serde(default = "default_signal")]
    pub stop_signal: i32,
    /// Grace after the stop signal before a kill (ms, default 10 000).
    #[serde(default = "default_grace")]
    pub stop_grace_ms: u64,
    /// Memory reserved and limited (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPUs reserved and limited (billionths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nano_cpus: Option<u64>,
    /// Restart condition (`any`, `on-failure`, `none`).
    #[serde(default)]
    pub restart_condition: RestartCondition,
    /// Delay before a restart (ms, default 5 000).
    #[serde(default = "default_delay")]
    pub restart_delay_ms: u64,
    /// Restarts allowed in the window (0: unlimited).
    #[serde(default)]
    pub restart_max_attempts: u32,
    /// The window restarts are counted in (ms; 0: unbounded).
    #[serde(default)]
    pub restart_window_ms: u64,
    /// Replace the tasks of a node that is lost or drained whatever the condition (default true).
    #[serde(default = "yes")]
    pub replace_on_node_loss: bool,
    /// Constraints, as `node.labels.zone==b`, `node.role!=manager`, `node.hostname==h1`, `node.id==ID`.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// Placement preferences, as `spread=node.labels.zone`.
    #[serde(default)]
    pub preferences: Vec<String>,
    /// Ports to allocate.
    #[serde(default)]
    pub ports: Vec<PortRequest>,
    /// Service labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How a change of the spec rolls out.
    #[serde(default)]
    pub update: UpdateSettings,
    /// How a rollback away from this spec rolls out.
    #[serde(default)]
    pub rollback: UpdateSettings,
    /// Bumped to replace every task without another change (`service update --force`).
    #[serde(default)]
    pub force_update: u64,
    /// The tasks' health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// How long a stopping task's endpoint is published as draining, so clients stop
    /// receiving it, before its stop signal (ms, default 2 000).
    #[serde(default = "default_drain")]
    pub drain_delay_ms: u64,
    /// TTL of the DNS answers naming its tasks (s, default 5).
    #[serde(default = "default_ttl")]
    pub dns_ttl_s: u32,
}

/// A service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceView {
    /// Id.
    pub id: String,
    /// The spec in force.
    pub spec: ServiceSpec,
    /// Bumped by every change (give it to an update to guard against a lost update).
    pub version: u64,
    /// Bumped by every change of what tasks run.
    pub spec_version: u64,
    /// The spec before the last update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_spec: Option<ServiceSpec>,
    /// The last rolling update's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatusView>,
    /// Tasks running now.
    pub running: u32,
    /// Tasks wanted (for a global service: the eligible nodes).
    pub desired: u32,
    /// Created (ms since the Unix epoch).
    pub created_at: u64,
    /// Last changed.
    pub updated_at: u64,
}

/// `GET /v1/services`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    /// The services, by name.
    pub services: Vec<ServiceView>,
}

/// `POST /v1/services/{id}/scale`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScaleRequest {
    /// Tasks wanted.
    pub replicas: u32,
}

/// A port given to a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskPort {
    /// The spec's name.
    pub name: String,
    /// The host port.
    pub port: u16,
}

/// A task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    /// Id.
    pub id: String,
    /// Service id.
    pub service_id: String,
    /// Service name.
    pub service: String,
    /// Slot number, or the node id of a global service's task.
    pub slot: String,
    /// Node id, once assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Node host name, once assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_hostname: Option<String>,
    /// What the managers want: `running`, `shutdown`, `remove`, …
    pub desired_state: String,
    /// Where it is: `pending`, `running`, `failed`, `orphaned`, …
    pub state: String,
    /// What happened last.
    pub message: String,
    /// The error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Exit status, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When it reached its state (ms since the Unix epoch).
    pub timestamp: u64,
    /// `starting`, `healthy` or `unhealthy`, for a running task with a health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Ports given to it.
    pub ports: Vec<TaskPort>,
    /// Why it is not placed yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
    /// The service's spec version it runs.
    pub spec_version: u64,
    /// Restarts counted for its slot's restart policy.
    pub restarts: u32,
    /// Created (ms since the Unix epoch).
    pub created_at: u64,
}

/// `GET /v1/tasks`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    /// The tasks, by service, slot and newest first.
    pub tasks: Vec<TaskView>,
}

/// `PUT /v1/nodes/{id}/labels`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct LabelChange {
    /// Labels to set.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Labels to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Parses `node.<key>==value` or `!=`.
pub fn parse_constraint(text: &str) -> Result<starling_state::Constraint, String> {
    use starling_state::{Constraint, ConstraintKey};
    let (lhs, rhs, equal) = if let Some((l, r)) = text.split_once("==") {
        (l, r, true)
    } else if let Some((l, r)) = text.split_once("!=") {
        (l, r, false)
    } else {
        return Err(format!(
            "constraint {text:?}: expected node.<attribute>==<value> or !="
        ));
    };
    let (lhs, value) = (lhs.trim(), rhs.trim());
    if value.is_empty() {
        return Err(format!("constraint {text:?}: no value"));
    }
    let key = match lhs {
        "node.id" => ConstraintKey::Id,
        "node.hostname" => ConstraintKey::Hostname,
        "node.role" => {
            if value != "manager" && value != "worker" {
                return Err(format!(
                    "constraint {text:?}: node.role is manager or worker"
                ));
            }
            ConstraintKey::Role
        }
        l => match l.strip_prefix("node.labels.") {
            Some(label) if !label.is_empty() => ConstraintKey::Label(label.to_owned()),
            _ => {
                return Err(format!(
                    "constraint {text:?}: the attribute is node.id, node.hostname, node.role or node.labels.<name>"
                ));
            }
        },
    };
    Ok(Constraint {
        key,
        equal,
        value: value.to_owned(),
    })
}

impl ServiceSpec {
    /// The replicated spec, or why it is invalid (one clear line).
    pub fn to_state(&self) -> Result<starling_state::ServiceSpec, String> {
        use starling_state as st;
        let constraints = self
            .constraints
            .iter()
            .map(|c| parse_constraint(c))
            .collect::<Result<Vec<_>, _>>()?;
        let preferences = self
            .preferences
            .iter()
            .map(|p| {
                p.strip_prefix("spread=node.labels.")
                    .filter(|l| !l.is_empty())
                    .map(|l| st::Spread {
                        label: l.to_owned(),
                    })
                    .ok_or_else(|| {
                        format!("placement preference {p:?}: expected spread=node.labels.<name>")
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ports = self
            .ports
            .iter()
            .map(|p| {
                let protocol = match p.protocol.as_str() {
                    "tcp" => st::PortProtocol::Tcp,
                    "udp" => st::PortProtocol::Udp,
                    other => {
                        return Err(format!("port {}: protocol {other:?} is tcp or udp", p.name));
                    }
                };
                Ok(st::PortSpec {
                    name: p.name.clone(),
                    protocol,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if !(1..=64).contains(&self.stop_signal) {
            return Err(format!("stop signal {} is not a signal", self.stop_signal));
        }
        let spec = st::ServiceSpec {
            name: self.name.clone(),
            labels: self.labels.clone(),
            mode: match self.mode {
                Mode::Replicated => st::ServiceMode::Replicated {
                    replicas: self.replicas,
                },
                Mode::Global => st::ServiceMode::Global,
            },
            task: st::TaskTemplate {
                process: st::ProcessSpec {
                    argv: self.command.clone(),
                    env: self.env.clone(),
                    cwd: self.workdir.clone(),
                    user: self.user.clone(),
                    stop_signal: self.stop_signal,
                    stop_grace_ms: self.stop_grace_ms,
                },
                resources: st::Resources {
                    memory_bytes: self.memory_bytes,
                    nano_cpus: self.nano_cpus,
                },
                restart: st::RestartPolicy {
                    condition: match self.restart_condition {
                        RestartCondition::Any => st::RestartCondition::Any,
                        RestartCondition::OnFailure => st::RestartCondition::OnFailure,
                        RestartCondition::None => st::RestartCondition::None,
                    },
                    delay_ms: self.restart_delay_ms,
                    max_attempts: self.restart_max_attempts,
                    window_ms: self.restart_window_ms,
                    replace_on_node_loss: self.replace_on_node_loss,
                },
                placement: st::Placement {
                    constraints,
                    preferences,
                },
                ports,
                force_update: self.force_update,
                health: self
                    .health_check
                    .as_ref()
                    .map(HealthCheckSpec::to_state)
                    .transpose()?,
                drain_delay_ms: self.drain_delay_ms,
                dns_ttl_s: self.dns_ttl_s,
            },
            update: self.update.to_state("update")?,
            rollback: self.rollback.to_state("rollback")?,
        };
        match spec.invalid() {
            Some(why) => Err(why),
            None => Ok(spec),
        }
    }

    /// The wire form of a replicated spec.
    pub fn from_state(s: &starling_state::ServiceSpec) -> ServiceSpec {
        use starling_state as st;
        let t = &s.task;
        ServiceSpec {
            name: s.name.clone(),
            mode: match s.mode {
                st::ServiceMode::Replicated { .. } => Mode::Replicated,
                st::ServiceMode::Global => Mode::Global,
            },
            replicas: match s.mode {
                st::ServiceMode::Replicated { replicas } => replicas,
                st::ServiceMode::Global => 0,
            },
            command: t.process.argv.clone(),
            env: t.process.env.clone(),
            workdir: t.process.cwd.clone(),
            user: t.process.user.clone(),
            stop_signal: t.process.stop_signal,
            stop_grace_ms: t.process.stop_grace_ms,
            memory_bytes: t.resources.memory_bytes,
            nano_cpus: t.resources.nano_cpus,
            restart_condition: match t.restart.condition {
                st::RestartCondition::Any => RestartCondition::Any,
                st::RestartCondition::OnFailure => RestartCondition::OnFailure,
                st::RestartCondition::None => RestartCondition::None,
            },
            restart_delay_ms: t.restart.delay_ms,
            restart_max_attempts: t.restart.max_attempts,
            restart_window_ms: t.restart.window_ms,
            replace_on_node_loss: t.restart.replace_on_node_loss,
            constraints: t
                .placement
                .constraints
                .iter()
                .map(|c| {
                    let key = match &c.key {
                        st::ConstraintKey::Id => "node.id".to_owned(),
                        st::ConstraintKey::Hostname => "node.hostname".to_owned(),
                        st::ConstraintKey::Role => "node.role".to_owned(),
                        st::ConstraintKey::Label(l) => format!("node.labels.{l}"),
                    };
                    format!("{key}{}{}", if c.equal { "==" } else { "!=" }, c.value)
                })
                .collect(),
            preferences: t
                .placement
                .preferences
                .iter()
                .map(|p| format!("spread=node.labels.{}", p.label))
                .collect(),
            ports: t
                .ports
                .iter()
                .map(|p| PortRequest {
                    name: p.name.clone(),
                    protocol: match p.protocol {
                        st::PortProtocol::Tcp => "tcp".into(),
                        st::PortProtocol::Udp => "udp".into(),
                    },
                })
                .collect(),
            labels: s.labels.clone(),
            update: UpdateSettings::from_state(&s.update),
            rollback: UpdateSettings::from_state(&s.rollback),
            force_update: t.force_update,
            health_check: t.health.as_ref().map(HealthCheckSpec::from_state),
            drain_delay_ms: t.drain_delay_ms,
            dns_ttl_s: t.dns_ttl_s,
        }
    }
}

impl TaskView {
    /// The wire form of a task; `hostname` names its node.
    pub fn from_state(t: &starling_state::Task, hostname: Option<String>) -> TaskView {
        TaskView {
            id: t.id.clone(),
            service_id: t.service.clone(),
            service: t.service_name.clone(),
            slot: match &t.slot {
                starling_state::Slot::Number(n) => n.to_string(),
                starling_state::Slot::Node(n) => n.clone(),
            },
            node: t.node.clone(),
            node_hostname: hostname,
            desired_state: t.desired.as_str().to_owned(),
            state: t.status.state.as_str().to_owned(),
            message: t.status.message.clone(),
            error: t.status.error.clone(),
            exit_code: match t.status.exit {
                Some(starling_state::ExitInfo::Code(c)) => Some(c),
                _ => None,
            },
            timestamp: t.status.timestamp,
            health: t.status.health.map(|h| h.as_str().to_owned()),
            ports: t
                .ports
                .iter()
                .map(|p| TaskPort {
                    name: p.name.clone(),
                    port: p.port,
                })
                .collect(),
            pending_reason: t.pending_reason.clone(),
            spec_version: t.spec_version,
            restarts: u32::try_from(t.restarts.len()).unwrap_or(u32::MAX),
            created_at: t.created_at,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_and_bad_ones_say_why() {
        let c = parse_constraint("node.labels.zone==b").unwrap();
        assert_eq!(c.key, starling_state::ConstraintKey::Label("zone".into()));
        assert!(!parse_constraint("node.role!=manager").unwrap().equal);
        for bad in [
            "zone=b",
            "node.color==red",
            "node.labels.==x",
            "node.role==boss",
            "node.id==",
        ] {
            assert!(parse_constraint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spec_round_trips_through_the_state_form() {
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "replicas": 3,
            "command": ["python3", "-m", "http.server"],
            "constraints": ["node.labels.zone==b"],
            "preferences": ["spread=node.labels.zone"],
            "ports": [{"name": "HTTP"}],
            "restart_condition": "on-failure",
            "health_check": {"type": "http", "port": "HTTP", "path": "/health", "interval_ms": 1000}
        }))
        .unwrap();
        let st = spec.to_state().unwrap();
        assert_eq!(ServiceSpec::from_state(&st), spec);
        let mut bad = spec.clone();
        bad.command.clear();
        assert!(bad.to_state().unwrap_err().contains("program"));
        let mut bad = spec.clone();
        if let Some(h) = &mut bad.health_check {
            h.port = Some("WEB".into());
        }
        assert!(
            bad.to_state()
                .unwrap_err()
                .contains("no port named \"WEB\"")
        );
        let mut bad = spec.clone();
        if let Some(h) = &mut bad.health_check {
            h.retries = 0;
        }
        assert!(bad.to_state().unwrap_err().contains("retries"));
    }
}
