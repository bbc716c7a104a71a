//! The agent every node runs: it keeps a session with a manager's dispatcher, runs the tasks
//! assigned to its node as processes, and reports how they go.
//!
//! ```text
//!   dispatcher (any manager) ──assignments──▶ session ──▶ core::plan ──▶ exec (processes)
//!            ▲                                                              │
//!            └──────────────── reports ◀──────────── exits, starts ◀────────┘
//! ```
//!
//! Tasks keep running while no manager is reachable; the next session re-reports every
//! task. An agent that restarts adopts the processes it had started (pid and start time are
//! recorded beside each task) rather than starting them again.

pub mod cgroup;
pub mod core;
pub mod exec;
pub mod health;
pub mod logs;

/// What the unit tests build tasks from.
#[cfg(test)]
pub(crate) mod testing {
    use starling_state::{
        Placement, ProcessSpec, Resources, RestartPolicy, Slot, Task, TaskState, TaskStatus,
        TaskTemplate,
    };

    /// Task `id` of service `s`, slot 1, on node `n`, running `argv`, wanted running, in
    /// `state`.
    pub(crate) fn task(id: &str, argv: &[&str], state: TaskState) -> Task {
        Task {
            id: id.into(),
            service: "s".into(),
            service_name: "s".into(),
            slot: Slot::Number(1),
            spec_version: 1,
            template: TaskTemplate {
                process: ProcessSpec {
                    argv: argv.iter().map(|a| a.to_string()).collect(),
                    env: std::collections::BTreeMap::new(),
                    cwd: None,
                    user: None,
                    stop_signal: 15,
                    stop_grace_ms: 100,
                },
                resources: Resources::default(),
                restart: RestartPolicy::default(),
                placement: Placement::default(),
                ports: vec![],
                force_update: 0,
                health: None,
                drain_delay_ms: 0,
                dns_ttl_s: 5,
            },
            node: Some("n".into()),
            desired: TaskState::Running,
            status: TaskStatus::new(state, "", 0),
            ports: vec![],
            not_before: 0,
            restarts: vec![],
            replaces: None,
            pending_reason: None,
            created_at: 0,
            version: 1,
            created_revision: 1,
            updated_revision: 1,
        }
    }
}

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use starling_api::dispatch::{
    AgentMessage, DISPATCH_ALPN, ManagerMessage, NodeDirective, read_message, write_message,
};
use starling_api::unix_ms;
use starling_gossip::Health;
use starling_gossip::ServiceEndpoint;
use starling_state::{
    ExitInfo, NodeDescription, Task, TaskHealth, TaskReport, TaskState, TaskStatus,
};
use starling_transport::{Endpoint, NodeId, PeerPolicy, Protocol, Role};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::core::{Action, Phase, plan};

/// Opens a session with this node's own dispatcher, in process (on a manager).
pub type LocalDispatcher = Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>;

/// What an agent needs to know about its node.
#[derive(Clone)]
pub struct AgentConfig {
    /// On a manager: its own dispatcher, used instead of dialing.
    pub local: Option<LocalDispatcher>,
    /// Where task directories go (`DIR/tasks`).
    pub tasks_dir: PathBuf,
    /// The node's advertised IP, given to tasks as `STARLING_HOST_IP`.
    pub host_ip: String,
    /// The node's machine, as reported to the managers.
    pub description: NodeDescription,
    /// The node's cgroup for tasks (cgroup v2, as root), else process groups only.
    pub cgroups: Option<cgroup::Cgroups>,
    /// The program that runs [`exec::launch`] (see [`exec::Context::launcher`]).
    pub launcher: Option<PathBuf>,
    /// Where the endpoints of the tasks running here go (the node publishes them by
    /// gossip): set whenever that set changes.
    pub endpoints: Option<tokio::sync::watch::Sender<Vec<ServiceEndpoint>>>,
    /// Where what the managers want of the node itself goes (its role, for the node's
    /// certificate renewal): set as the dispatcher sends it.
    pub directive: Option<tokio::sync::watch::Sender<Option<NodeDirective>>>,
}

/// The endpoints of the tasks that run here, from `published` (task id and how it is
/// served: its health, or `Draining` while it is being stopped): one per task, at the node's
/// address, with its ports by name and its service's DNS TTL.
pub fn endpoints(
    assigned: &BTreeMap<String, Task>,
    published: impl Iterator<Item = (String, Health)>,
    host_ip: &str,
) -> Vec<ServiceEndpoint> {
    let mut out: Vec<ServiceEndpoint> = published
        .filter_map(|(id, health)| Some((assigned.get(&id)?, health)))
        .filter(|(t, _)| !t.status.state.is_terminal())
        .map(|(t, health)| ServiceEndpoint {
            service: t.service_name.clone(),
            task: t.id.clone(),
            slot: match &t.slot {
                starling_state::Slot::Number(n) => n.to_string(),
                starling_state::Slot::Node(n) => n.clone(),
            },
            addr: host_ip.to_owned(),
            port: t.ports.first().map_or(0, |p| p.port),
            ports: t
                .ports
                .iter()
                .map(|p| (p.name.to_lowercase(), p.port))
                .collect(),
            health,
            ttl: Some(t.template.dns_ttl_s),
        })
        .collect();
    out.sort_by(|a, b| (&a.service, &a.task).cmp(&(&b.service, &b.task)));
    out
}

/// This machine's memory and CPUs, with the host-port range tasks may be given and how they
/// are isolated.
pub fn describe_machine(
    port_min: u16,
    port_max: u16,
    cgroups: Option<&cgroup::Cgroups>,
) -> NodeDescription {
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    NodeDescription {
        memory_bytes,
        nano_cpus: cpus * 1_000_000_000,
        port_min,
        port_max,
        isolation: exec::isolation(cgroups),
    }
}

/// A task the agent runs (or ran).
struct Local {
    phase: Phase,
    pgid: i32,
    started: Option<exec::Started>,
    stopping: bool,
    /// Its health, while it has a check.
    health: Option<TaskHealth>,
    /// Its probe loop.
    checks: Option<Owned>,
    /// Why its check made it unhealthy (it is being stopped for that).
    unhealthy: Option<String>,
    /// While being stopped: its endpoint is published draining until then (ms).
    drain_until: u64,
}

impl Local {
    fn running(started: exec::Started) -> Local {
        Local {
            phase: Phase::Running,
            pgid: started.pid,
            started: Some(started),
            stopping: false,
            health: None,
            checks: None,
            unhealthy: None,
            drain_until: 0,
        }
    }

    /// A task that is over here (rejected, never started, or ended while the agent was down).
    fn ended() -> Local {
        Local {
            phase: Phase::Ended,
            pgid: 0,
            started: None,
            stopping: false,
            health: None,
            checks: None,
            unhealthy: None,
            drain_until: 0,
        }
    }

    /// How its endpoint is published now, if it is.
    fn published(&self, checked: bool, now: u64) -> Option<Health> {
        match self.phase {
            Phase::Running if !self.stopping => Some(match self.health {
                Some(TaskHealth::Healthy) => Health::Healthy,
                Some(TaskHealth::Unhealthy) => Health::Unhealthy,
                Some(TaskHealth::Starting) => Health::Starting,
                None if checked => Health::Starting,
                None => Health::Healthy,
            }),
            Phase::Running | Phase::Stopping if now < self.drain_until => Some(Health::Draining),
            _ => None,
        }
    }

    /// Stops it: published as draining for `drain_ms`, then its stop signal, then a kill
    /// of its group after the grace.
    fn stop(
        &mut self,
        task: &str,
        signal: i32,
        grace_ms: u64,
        drain_ms: u64,
        cgroups: Option<cgroup::Cgroups>,
    ) {
        debug!(%task, signal, drain_ms, "stopping task");
        self.phase = Phase::Stopping;
        self.stopping = true;
        self.checks = None;
        self.drain_until = unix_ms().saturating_add(drain_ms);
        let pgid = self.pgid;
        let started = self.started.clone();
        let task = task.to_owned();
        tokio::spawn(async move {
            // Only the group of the process we started: never a reused id.
            let alive = || started.as_ref().is_some_and(exec::alive);
            if drain_ms > 0 {
                tokio::time::sleep(Duration::from_millis(drain_ms)).await;
            }
            if !alive() {
                return;
            }
            exec::signal_group(pgid, signal);
            tokio::time::sleep(Duration::from_millis(grace_ms)).await;
            if alive() {
                exec::signal_group(pgid, 9);
                if let Some(cg) = cgroups {
                    cg.kill(&task);
                }
            }
        });
    }
}

enum Event {
    Exited {
        task: String,
        exit: Option<ExitInfo>,
    },
}

type Statuses = Arc<Mutex<BTreeMap<String, TaskStatus>>>;

/// Runs the agent until the returned task is aborted. `managers` are the dispatchers to try
/// first (`node_id`, address); each session teaches the current list.
pub fn spawn(
    endpoint: Endpoint,
    managers: Vec<(String, SocketAddr)>,
    cfg: AgentConfig,
) -> tokio::task::JoinHandle<()> {
    // Managers read the tasks' logs from here (see [`logs`]).
    let logs = Protocol::new(
        starling_api::logs::LOGS_ALPN,
        PeerPolicy::roles([Role::MANAGER]),
    )
    .map_err(|e| e.to_string())
    .and_then(|p| endpoint.listen(&p).map_err(|e| e.to_string()));
    let logs = match logs {
        Ok(listener) => Some(listener),
        Err(e) => {
            warn!(error = %e, "cannot serve task logs");
            None
        }
    };
    tokio::spawn(run(endpoint, managers, cfg, logs))
}

/// A spawned task that ends with its owner (the agent's future is dropped when the node
/// stops it: what it spawned must go too).
struct Owned(tokio::task::JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(
    endpoint: Endpoint,
    managers: Vec<(String, SocketAddr)>,
    cfg: AgentConfig,
    logs: Option<starling_transport::Listener>,
) {
    let _logs = logs.map(|l| Owned(tokio::spawn(logs::serve(l, cfg.tasks_dir.clone()))));
    let statuses: Statuses = Arc::default();
    let (report_tx, report_rx) = mpsc::channel::<Vec<TaskReport>>(1024);
    let (assign_tx, mut assign_rx) = mpsc::channel::<ManagerMessage>(64);
    let (event_tx, mut events) = mpsc::channel::<Event>(256);
    let (health_tx, mut health_rx) = mpsc::channel::<health::Change>(256);
    let _session = Owned(tokio::spawn(session_loop(
        endpoint,
        managers,
        cfg.local.clone(),
        cfg.description.clone(),
        statuses.clone(),
        SessionIo {
            reports: report_rx,
            assignments: assign_tx,
            directive: cfg.directive.clone(),
        },
    )));
    let mut local: BTreeMap<String, Local> = BTreeMap::new();
    let mut assigned: BTreeMap<String, Task> = BTreeMap::new();
    // Set once the first full assignment set arrived: until then nothing local is stopped.
    let mut synced = false;
    let report = |statuses: &Statuses, task: &str, status: TaskStatus| {
        statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(task.to_owned(), status.clone());
        let _ = report_tx.try_send(vec![TaskReport {
            task: task.to_owned(),
            status,
        }]);
    };
    adopt(&cfg, &mut local, &statuses, &event_tx);
    let mut wake: Option<u64> = None;
    let mut tick = tokio::time::interval(starling_api::logs::INDEX_TICK);
    let mut ticks = 0u64;
    loop {
        let until_wake = wake.map_or(Duration::from_secs(3600), |w| {
            Duration::from_millis(w.saturating_sub(unix_ms()))
        });
        tokio::select! {
            msg = assign_rx.recv() => match msg {
                Some(ManagerMessage::Heartbeat) => {}
                // Handled by the session itself.
                Some(ManagerMessage::Node(_)) => {}
                Some(ManagerMessage::Assignments { full, tasks, removed, .. }) => {
                    if full {
                        assigned.clear();
                        synced = true;
                    }
                    for id in removed {
                        assigned.remove(&id);
                    }
                    for t in tasks {
                        assigned.insert(t.id.clone(), t);
                    }
                }
                None => break,
            },
            Some(Event::Exited { task, exit }) = events.recv() => {
                if let Some(l) = local.get_mut(&task) {
                    l.phase = Phase::Ended;
                    l.checks = None;
                    // What the task left behind goes with it (as a container's processes go
                    // when its main process ends).
                    let oom = cfg.cgroups.as_ref().is_some_and(|cg| {
                        cg.kill(&task);
                        cg.oom_killed(&task)
                    });
                    exec::signal_group(l.pgid, 9);
                    // Its last lines get their time; an agent that restarts knows it ended.
                    logs::maintain(&cfg.tasks_dir.join(&task), unix_ms());
                    let _ = std::fs::write(cfg.tasks_dir.join(&task).join("ended"), b"");
                    let exit = if oom { Some(ExitInfo::OomKilled) } else { exit };
                    let now = unix_ms();
                    let status = match (&exit, l.stopping) {
                        (_, true) if l.unhealthy.is_some() => {
                            let why = l.unhealthy.clone().unwrap_or_default();
                            TaskStatus {
                                error: Some(why.clone()),
                                exit: exit.clone(),
                                health: Some(TaskHealth::Unhealthy),
                                ..TaskStatus::new(TaskState::Failed, why, now)
                            }
                        }
                        (_, true) => TaskStatus::new(TaskState::Shutdown, "stopped", now),
                        (Some(ExitInfo::Code(0)), false) => {
                            TaskStatus::new(TaskState::Complete, "exited with status 0", now)
                        }
                        (Some(e), false) => TaskStatus {
                            error: Some(describe_exit(e)),
                            exit: Some(e.clone()),
                            ..TaskStatus::new(TaskState::Failed, describe_exit(e), now)
                        },
                        (None, false) => TaskStatus {
                            error: Some("the process ended while adopted; its exit status is unknown".into()),
                            ..TaskStatus::new(TaskState::Failed, "ended (exit status unknown)", now)
                        },
                    };
                    let status = TaskStatus { exit: exit.clone().or(status.exit.clone()), ..status };
                    info!(%task, state = %status.state, "task ended");
                    report(&statuses, &task, status);
                }
            },
            Some(change) = health_rx.recv() => {
                if let Some(l) = local.get_mut(&change.task).filter(|l| !l.stopping) {
                    l.health = Some(change.health);
                    let mut status = statuses
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&change.task)
                        .cloned()
                        .unwrap_or_else(|| TaskStatus::new(TaskState::Running, "running", unix_ms()));
                    status.health = Some(change.health);
                    info!(task = %change.task, health = change.health.as_str(), why = ?change.why, "task health");
                    report(&statuses, &change.task, status);
                    if change.health == TaskHealth::Unhealthy {
                        // As swarm does: an unhealthy task is stopped and counts as failed,
                        // so its restart policy replaces it. It is not served meanwhile.
                        let (signal, grace_ms) = assigned.get(&change.task).map_or((15, 10_000), |t| {
                            (t.template.process.stop_signal, t.template.process.stop_grace_ms)
                        });
                        let why = change.why.unwrap_or_else(|| "failing".to_owned());
                        l.unhealthy = Some(format!("unhealthy: {why}"));
                        l.stop(&change.task, signal, grace_ms, 0, cfg.cgroups.clone());
                    }
                }
            },
            _ = tick.tick() => {
                let now = unix_ms();
                for (id, l) in &local {
                    if l.phase != Phase::Ended {
                        logs::maintain(&cfg.tasks_dir.join(id), now);
                    }
                }
                // The plan runs once a second on the tick (besides every event); endpoints
                // are published on every tick (a drain delay ends between plans).
                ticks += 1;
                if !ticks.is_multiple_of(4) {
                    publish(&cfg, &assigned, &local);
                    continue;
                }
            },
            _ = tokio::time::sleep(until_wake) => {},
        }
        let phases: BTreeMap<String, Phase> = local
            .iter()
            .map(|(k, v)| (k.clone(), v.phase.clone()))
            .collect();
        let (actions, next) = plan(&assigned, &phases, synced, unix_ms());
        wake = next;
        for action in actions {
            match action {
                Action::Start(task) => {
                    let ctx = exec::Context {
                        host_ip: cfg.host_ip.clone(),
                        dir: cfg.tasks_dir.join(&task.id),
                        cgroups: cfg.cgroups.clone(),
                        launcher: cfg.launcher.clone(),
                    };
                    match exec::spawn(&task, &ctx) {
                        Ok(mut spawned) => {
                            let id = task.id.clone();
                            info!(task = %id, pid = spawned.started.pid, "task started");
                            local.insert(id.clone(), Local::running(spawned.started.clone()));
                            let checked = task.template.health.is_some();
                            report(
                                &statuses,
                                &id,
                                TaskStatus {
                                    health: checked.then_some(TaskHealth::Starting),
                                    ..TaskStatus::new(
                                        TaskState::Running,
                                        format!("started (pid {})", spawned.started.pid),
                                        unix_ms(),
                                    )
                                },
                            );
                            let events = event_tx.clone();
                            tokio::spawn(async move {
                                let exit = spawned.child.wait().await.ok().map(exec::exit_info);
                                let _ = events.send(Event::Exited { task: id, exit }).await;
                            });
                        }
                        Err(why) => {
                            warn!(task = %task.id, %why, "task rejected");
                            local.insert(task.id.clone(), Local::ended());
                            report(
                                &statuses,
                                &task.id,
                                TaskStatus {
                                    error: Some(why.clone()),
                                    ..TaskStatus::new(TaskState::Rejected, why, unix_ms())
                                },
                            );
                        }
                    }
                }
                Action::Stop {
                    task,
                    signal,
                    grace_ms,
                } => {
                    if let Some(l) = local.get_mut(&task) {
                        // A served task is published draining first, so clients stop using
                        // it before it stops.
                        let drain_ms = match assigned.get(&task) {
                            Some(t)
                                if l.published(t.template.health.is_some(), unix_ms())
                                    == Some(Health::Healthy) =>
                            {
                                t.template.drain_delay_ms
                            }
                            _ => 0,
                        };
                        l.stop(&task, signal, grace_ms, drain_ms, cfg.cgroups.clone());
                    }
                }
                Action::NeverStarted(task) => {
                    local.insert(task.clone(), Local::ended());
                    report(
                        &statuses,
                        &task,
                        TaskStatus::new(
                            TaskState::Shutdown,
                            "stopped before it started",
                            unix_ms(),
                        ),
                    );
                }
                Action::Forget(task) => {
                    // Reaped by the managers: its files (logs) go too.
                    local.remove(&task);
                    if starling_api::logs::valid_task_id(&task) {
                        let _ = std::fs::remove_dir_all(cfg.tasks_dir.join(&task));
                    }
                    if let Some(cg) = &cfg.cgroups {
                        cg.remove(&task);
                    }
                    statuses
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&task);
                }
            }
        }
        // Checked tasks that run get their probe loop (started, or adopted after a restart).
        for (id, l) in local.iter_mut() {
            if l.phase == Phase::Running
                && !l.stopping
                && l.checks.is_none()
                && let Some(t) = assigned.get(id).filter(|t| t.template.health.is_some())
            {
                let dir = cfg.tasks_dir.join(id);
                l.checks = health::spawn(t, cfg.host_ip.clone(), dir, unix_ms(), health_tx.clone())
                    .map(Owned);
            }
        }
        publish(&cfg, &assigned, &local);
    }
}

/// Sets the node's endpoints to what the local tasks serve now, if that changed.
fn publish(cfg: &AgentConfig, assigned: &BTreeMap<String, Task>, local: &BTreeMap<String, Local>) {
    let Some(tx) = &cfg.endpoints else {
        return;
    };
    let now = unix_ms();
    let published = local.iter().filter_map(|(id, l)| {
        let checked = assigned
            .get(id)
            .is_some_and(|t| t.template.health.is_some());
        l.published(checked, now).map(|h| (id.clone(), h))
    });
    let list = endpoints(assigned, published, &cfg.host_ip);
    tx.send_if_modified(|current| {
        let changed = *current != list;
        if changed {
            *current = list;
        }
        changed
    });
}

fn describe_exit(e: &ExitInfo) -> String {
    match e {
        ExitInfo::Code(c) => format!("exit code {c}"),
        ExitInfo::Signal(s) => format!("signal {s}"),
        ExitInfo::OomKilled => "OOM killed".to_owned(),
    }
}

/// Takes back the processes an earlier run of the agent started: alive ones are watched
/// until they end; dead ones are reported failed once.
fn adopt(
    cfg: &AgentConfig,
    local: &mut BTreeMap<String, Local>,
    statuses: &Statuses,
    events: &mpsc::Sender<Event>,
) {
    let Ok(dirs) = std::fs::read_dir(&cfg.tasks_dir) else {
        return;
    };
    for dir in dirs.flatten() {
        let path = dir.path();
        let Some(id) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        // A task that ended before is known as ended, so its files go when the managers
        // reap it.
        let Some(started) = exec::recorded(&path).filter(|_| !path.join("ended").exists()) else {
            local.insert(id, Local::ended());
            continue;
        };
        let now = unix_ms();
        if exec::alive(&started) {
            info!(task = %id, pid = started.pid, "adopting a running task");
            local.insert(id.clone(), Local::running(started.clone()));
            statuses.lock().unwrap_or_else(|p| p.into_inner()).insert(
                id.clone(),
                TaskStatus::new(
                    TaskState::Running,
                    format!("adopted (pid {})", started.pid),
                    now,
                ),
            );
            let events = events.clone();
            let marker = path.join("ended");
            tokio::spawn(async move {
                while !exec::wait_gone(&started, Duration::from_secs(3600)).await {}
                let _ = std::fs::write(marker, b"");
                let _ = events
                    .send(Event::Exited {
                        task: id,
                        exit: None,
                    })
                    .await;
            });
        } else {
            let _ = std::fs::write(path.join("ended"), b"");
            statuses.lock().unwrap_or_else(|p| p.into_inner()).insert(
                id.clone(),
                TaskStatus {
                    error: Some("the process ended while the agent was down".into()),
                    ..TaskStatus::new(TaskState::Failed, "ended while the agent was down", now)
                },
            );
            local.insert(id, Local::ended());
        }
    }
}

/// What a session loop exchanges with the rest of the agent and the node.
struct SessionIo {
    /// Task reports to send.
    reports: mpsc::Receiver<Vec<TaskReport>>,
    /// Where the managers' messages go.
    assignments: mpsc::Sender<ManagerMessage>,
    /// Cleared when a session is lost (the node's renewal loop then asks on its own).
    directive: Option<tokio::sync::watch::Sender<Option<NodeDirective>>>,
}

/// Keeps a session with a dispatcher (this manager's own, or some manager's over QUIC): hello
/// with a full report, then assignments in, reports out; on a failure the next manager.
async fn session_loop(
    endpoint: Endpoint,
    mut managers: Vec<(String, SocketAddr)>,
    local: Option<LocalDispatcher>,
    description: NodeDescription,
    statuses: Statuses,
    mut io: SessionIo,
) {
    let protocol = match Protocol::new(DISPATCH_ALPN, PeerPolicy::roles([Role::MANAGER])) {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "dispatch protocol");
            return;
        }
    };
    let mut attempt = 0usize;
    loop {
        let result = match &local {
            Some(open) => {
                let stream = open();
                session(
                    stream,
                    "local",
                    &description,
                    &statuses,
                    &mut io,
                    &mut managers,
                )
                .await
            }
            None if managers.is_empty() => Err("no manager known".to_owned()),
            None => {
                let (name, addr) = managers[attempt % managers.len()].clone();
                attempt += 1;
                match NodeId::new(name.clone()) {
                    Err(e) => Err(e.to_string()),
                    Ok(id) => match dial(&endpoint, &protocol, &id, addr).await {
                        Err(e) => Err(format!("{name}: {e}")),
                        Ok(stream) => {
                            session(
                                stream,
                                &name,
                                &description,
                                &statuses,
                                &mut io,
                                &mut managers,
                            )
                            .await
                        }
                    },
                }
            }
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                debug!(error = %e, "dispatcher session lost");
                // No word from the managers now: the node's renewal loop asks them itself
                // (its certificate may be of a root they no longer trust).
                if let Some(tx) = &io.directive {
                    tx.send_if_modified(|d| d.take().is_some());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long an agent waits for a manager's handshake and stream before it tries the next
/// (a killed manager answers nothing: without a bound the agent would wait for QUIC's idle
/// timeout while its tasks' changes pile up).
const DIAL_TIMEOUT: Duration = Duration::from_millis(1500);

async fn dial(
    endpoint: &Endpoint,
    protocol: &Protocol,
    id: &NodeId,
    addr: SocketAddr,
) -> Result<starling_transport::ByteStream, String> {
    let open = async {
        let conn = endpoint
            .connect(protocol, id, addr)
            .await
            .map_err(|e| e.to_string())?;
        conn.open_stream().await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(DIAL_TIMEOUT, open)
        .await
        .map_err(|_| format!("no answer within {DIAL_TIMEOUT:?}"))?
}

/// One session on `stream`; `Ok` when the agent is shutting down.
async fn session<S>(
    stream: S,
    name: &str,
    description: &NodeDescription,
    statuses: &Statuses,
    io: &mut SessionIo,
    managers: &mut Vec<(String, SocketAddr)>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rx, mut tx) = tokio::io::split(stream);
    let full: Vec<TaskReport> = statuses
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(task, status)| TaskReport {
            task: task.clone(),
            status: status.clone(),
        })
        .collect();
    write_message(
        &mut tx,
        &AgentMessage::Hello {
            description: description.clone(),
            reports: full,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    info!(manager = %name, "dispatcher session open");
    let (in_tx, mut in_rx) = mpsc::channel::<ManagerMessage>(16);
    let reader = tokio::spawn(async move {
        while let Ok(Some(msg)) = read_message::<ManagerMessage>(&mut rx).await {
            if in_tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut heartbeat = tokio::time::interval(starling_api::dispatch::HEARTBEAT);
    let mut heard = tokio::time::Instant::now();
    let outcome = loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if heard.elapsed() > starling_api::dispatch::SESSION_SILENCE {
                    break Err(format!("{name} silent for {:?}", heard.elapsed()));
                }
                if let Err(e) = write_message(&mut tx, &AgentMessage::Heartbeat).await {
                    break Err(e.to_string());
                }
            }
            msg = in_rx.recv() => match msg {
                Some(ManagerMessage::Heartbeat) => heard = tokio::time::Instant::now(),
                // Set here, in the task that clears it when the session ends, so a directive
                // of a lost session is never set after the clearing.
                Some(ManagerMessage::Node(d)) => {
                    heard = tokio::time::Instant::now();
                    if let Some(tx) = &io.directive {
                        tx.send_replace(Some(d));
                    }
                }
                Some(msg) => {
                    heard = tokio::time::Instant::now();
                    if let ManagerMessage::Assignments { managers: list, .. } = &msg {
                        let learned: Vec<(String, SocketAddr)> = list
                            .iter()
                            .filter_map(|m| {
                                let (n, a) = m.split_once('@')?;
                                Some((n.to_owned(), a.parse().ok()?))
                            })
                            .collect();
                        if !learned.is_empty() {
                            *managers = learned;
                        }
                    }
                    if io.assignments.send(msg).await.is_err() {
                        break Ok(());
                    }
                }
                None => break Err("the dispatcher closed the session".to_owned()),
            },
            batch = io.reports.recv() => match batch {
                Some(mut batch) => {
                    while let Ok(more) = io.reports.try_recv() {
                        batch.extend(more);
                    }
                    if let Err(e) = write_message(&mut tx, &AgentMessage::Reports(batch)).await {
                        break Err(e.to_string());
                    }
                }
                None => break Ok(()),
            },
        }
    };
    reader.abort();
    outcome
}
