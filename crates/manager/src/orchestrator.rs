//! The orchestrators, pure: from the state and the time, the task changes that bring every
//! service to what it declares. Replicated services keep one runnable task per slot
//! 1..=replicas; global services one per eligible node. Ended tasks are replaced as their
//! restart policy says; tasks of a node that is down are replaced *whatever* the policy
//! (unless it opts out), and tasks of a drained node are replaced start-first: the old task
//! stops once its replacement runs. Old ended tasks are reaped, keeping a short history.
//!
//! Everything is level-triggered: the same state gives the same plan, a plan already applied
//! gives an empty one, so a new leader (or a lost answer) simply runs it again.

use std::collections::BTreeMap;

use starling_state::{
    ClusterState, FailureAction, NodeRecord, NodeStatus, RestartCondition, Service, ServiceMode,
    Slot, Task, TaskOp, TaskState, UpdateOrder, UpdateState, node_schedulable,
};

use crate::scheduler::constraints_hold;

/// Settings of the orchestrators.
#[derive(Clone, Debug)]
pub struct OrchestratorConfig {
    /// Ended tasks kept per slot for `service ps` (swarm's task history limit, 5).
    pub history_limit: usize,
    /// How long a start-first replacement must run before the task it replaces stops (ms).
    pub drain_monitor_ms: u64,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            history_limit: 5,
            drain_monitor_ms: 1_000,
        }
    }
}

/// What the orchestrators want done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Task changes, to write in one batch.
    pub ops: Vec<TaskOp>,
    /// When to look again even if nothing changes (a delayed restart coming due), ms.
    pub wake_at: Option<u64>,
}

impl Plan {
    fn wake(&mut self, at: u64) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// The plan for the whole cluster at time `now` (ms since the Unix epoch).
pub fn reconcile(state: &ClusterState, now: u64, cfg: &OrchestratorConfig) -> Plan {
    let mut plan = Plan::default();
    for service in state.services() {
        let mut slots: BTreeMap<Slot, Vec<&Task>> = BTreeMap::new();
        for t in state.tasks_of(&service.id) {
            slots.entry(t.slot.clone()).or_default().push(t);
        }
        // The slots the service has now, for the rolling update after the slots' own care.
        let mut wanted: Vec<(Slot, Option<&NodeRecord>, Vec<&Task>)> = Vec::new();
        match service.spec.mode {
            ServiceMode::Replicated { replicas } => {
                for n in 1..=replicas {
                    let tasks = slots.remove(&Slot::Number(n)).unwrap_or_default();
                    reconcile_slot(
                        state,
                        service,
                        Slot::Number(n),
                        None,
                        &tasks,
                        now,
                        cfg,
                        &mut plan,
                    );
                    wanted.push((Slot::Number(n), None, tasks));
                }
            }
            ServiceMode::Global => {
                for node in state.nodes() {
                    let slot = Slot::Node(node.id.clone());
                    let tasks = slots.remove(&slot).unwrap_or_default();
                    if eligible_for_global(service, node)
                        && state.node_description(&node.id).is_some()
                    {
                        reconcile_slot(
                            state,
                            service,
                            slot.clone(),
                            Some(node),
                            &tasks,
                            now,
                            cfg,
                            &mut plan,
                        );
                        wanted.push((slot, Some(node), tasks));
                    } else {
                        // Not (or no longer) a node for this service: its task stops, and is
                        // not replaced elsewhere.
                        stop_all(state, &tasks, TaskState::Shutdown, &mut plan);
                    }
                }
            }
        }
        // Slots the service no longer has (scaled down, or nodes that left): their tasks go.
        for tasks in slots.values() {
            stop_all(state, tasks, TaskState::Remove, &mut plan);
        }
        roll(state, service, &wanted, now, &mut plan);
    }
    // Tasks of removed services: stopped by the removal; orphaned if their node is gone.
    for t in state.tasks() {
        if state.service(&t.service).is_none() && lost(state, t) {
            plan.ops.push(TaskOp::Orphan { task: t.id.clone() });
        }
    }
    reap(state, cfg, &mut plan);
    plan
}

fn eligible_for_global(service: &Service, node: &NodeRecord) -> bool {
    node_schedulable(node) && constraints_hold(&service.spec.task.placement, node)
}

/// Whether `t` is assigned and its node is down or gone, while it has not ended.
fn lost(state: &ClusterState, t: &Task) -> bool {
    let Some(node) = &t.node else { return false };
    (TaskState::Assigned..=TaskState::Running).contains(&t.status.state)
        && state
            .node(node)
            .is_none_or(|n| n.status == NodeStatus::Down)
}

fn stop_all(state: &ClusterState, tasks: &[&Task], desired: TaskState, plan: &mut Plan) {
    for t in tasks {
        if lost(state, t) {
            plan.ops.push(TaskOp::Orphan { task: t.id.clone() });
        } else if t.desired < desired && !t.status.state.is_terminal() {
            plan.ops.push(TaskOp::SetDesired {
                task: t.id.clone(),
                desired,
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn reconcile_slot(
    state: &ClusterState,
    service: &Service,
    slot: Slot,
    node: Option<&NodeRecord>,
    tasks: &[&Task],
    now: u64,
    cfg: &OrchestratorConfig,
    plan: &mut Plan,
) {
    let policy = &service.spec.task.restart;
    let create = |replaces: Option<&Task>,
                  start_first: bool,
                  lost: bool,
                  restarts: Vec<u64>,
                  not_before: u64| {
        TaskOp::Create {
            service: service.id.clone(),
            slot: slot.clone(),
            node: node.map(|n| n.id.clone()),
            not_before,
            restarts,
            replaces: replaces.map(|t| t.id.clone()),
            start_first,
            lost,
        }
    };
    let mut runnable: Vec<&Task> = tasks.iter().copied().filter(|t| t.is_runnable()).collect();
    runnable.sort_by_key(|t| t.created_revision);
    match runnable.as_slice() {
        [] => {
            // Nothing holds the slot: start a task, unless the last one ended in a way the
            // policy does not restart.
            let last = tasks.iter().max_by_key(|t| t.created_revision);
            let Some(last) = last else {
                plan.ops.push(create(None, false, false, Vec::new(), 0));
                return;
            };
            let stopped_on_purpose =
                last.desired >= TaskState::Shutdown && last.status.state != TaskState::Orphaned;
            let node_lost = last.status.state == TaskState::Orphaned;
            if node_lost && policy.replace_on_node_loss || stopped_on_purpose {
                // Not a restart of the program: no delay, nothing counted.
                plan.ops
                    .push(create(Some(last), false, false, last.restarts.clone(), 0));
                return;
            }
            let failed = matches!(
                last.status.state,
                TaskState::Failed | TaskState::Rejected | TaskState::Orphaned
            );
            let restart = match policy.condition {
                RestartCondition::Any => true,
                RestartCondition::OnFailure => failed,
                RestartCondition::None => false,
            };
            if !restart {
                return;
            }
            let ended_at = last.status.timestamp.max(last.created_at);
            let mut history: Vec<u64> = last.restarts.clone();
            if policy.window_ms > 0 {
                history.retain(|t| now.saturating_sub(*t) < policy.window_ms);
            }
            if policy.max_attempts > 0 && history.len() >= policy.max_attempts as usize {
                return;
            }
            history.push(now);
            // Only what the policy counts is kept: unlimited restarts keep no history, and a
            // limit keeps its last attempts (a task record stays small however long it loops).
            let keep = policy.max_attempts as usize;
            if history.len() > keep {
                history.drain(..history.len() - keep);
            }
            let not_before = ended_at.saturating_add(policy.delay_ms);
            if not_before > now {
                plan.wake(not_before);
            }
            plan.ops
                .push(create(Some(last), false, false, history, not_before));
        }
        [old] => {
            let t = *old;
            if lost(state, t) {
                if policy.replace_on_node_loss {
                    plan.ops
                        .push(create(Some(t), false, true, t.restarts.clone(), 0));
                }
                return;
            }
            let on_drained = t
                .node
                .as_ref()
                .and_then(|n| state.node(n))
                .is_some_and(|n| n.availability == starling_state::Availability::Drain);
            if on_drained && node.is_none() && policy.replace_on_node_loss {
                // Start-first: the old task serves until its replacement runs.
                plan.ops
                    .push(create(Some(t), true, false, t.restarts.clone(), 0));
            }
            // A task of an older template is replaced by the rolling update ([`roll`]), in
            // batches, not here.
        }
        [old, new, ..] => {
            // A start-first pair: the old one stops once the new one is ready (running, and
            // healthy if it is checked) and has run long enough.
            let (old, new) = (*old, *new);
            if new.is_ready() && now.saturating_sub(new.status.timestamp) >= cfg.drain_monitor_ms {
                plan.ops.push(TaskOp::SetDesired {
                    task: old.id.clone(),
                    desired: TaskState::Shutdown,
                });
            } else if new.is_ready() {
                plan.wake(new.status.timestamp.saturating_add(cfg.drain_monitor_ms));
            }
            if lost(state, old) {
                plan.ops.push(TaskOp::Orphan {
                    task: old.id.clone(),
                });
            }
        }
    }
}

/// The rolling update of `service` (or its rollback), level-triggered like the rest: which
/// slots still run another template, which new tasks are within their monitor period, and
/// which failed are all read from the tasks, so a new leader resumes an update where it was
/// and never replaces a task twice. A batch of `parallelism` slots is replaced once the
/// previous batch's tasks have all run for `monitor` and `delay` has passed; failed new tasks
/// beyond `max_failure_ratio` pause the update or roll it back. A task is up to date when
/// its template is the service's (a rollback leaves the tasks the update never reached
/// alone). Monitor periods compare the agent's clock (when the task started) with the
/// leader's: a skew between them lengthens or shortens them by as much.
fn roll(
    state: &ClusterState,
    service: &Service,
    slots: &[(Slot, Option<&NodeRecord>, Vec<&Task>)],
    now: u64,
    plan: &mut Plan,
) {
    let Some(status) = &service.update_status else {
        return;
    };
    let target = service.spec_version;
    if !status.state.is_active() || status.spec_version != target {
        return;
    }
    let rolling_back = status.state == UpdateState::RollingBack;
    // A rollback rolls out with the settings of the spec it leaves.
    let conf = if rolling_back {
        service
            .previous_spec
            .as_ref()
            .map_or(&service.spec.rollback, |failed| &failed.rollback)
    } else {
        &service.spec.update
    };
    let set_state = |state: UpdateState, message: String| TaskOp::SetUpdateState {
        service: service.id.clone(),
        spec_version: target,
        state,
        message,
    };
    let slot_name = |slot: &Slot| match slot {
        Slot::Number(n) => n.to_string(),
        Slot::Node(n) => n.clone(),
    };
    let current = |t: &Task| t.template == service.spec.task;
    // This update's tasks that failed, and the slots they were in: a failed slot is done
    // (failed) for the update; the restart policy looks after it, not the updater.
    let mut failed: Vec<(&Slot, &Task)> = Vec::new();
    for (slot, _, tasks) in slots {
        for t in tasks {
            if t.created_revision > status.started_revision
                && matches!(t.status.state, TaskState::Failed | TaskState::Rejected)
                && current(t)
            {
                failed.push((slot, t));
            }
        }
    }
    failed.sort_by_key(|(_, t)| t.status.timestamp);
    let failed_slots: std::collections::BTreeSet<&Slot> = failed.iter().map(|(s, _)| *s).collect();
    let tolerated = conf.max_failure_permille as usize * slots.len() / 1000;
    if failed_slots.len() > tolerated && conf.failure_action != FailureAction::Continue {
        let (slot, t) = failed[failed.len() - 1];
        let why = format!(
            "task {}.{} failed: {}",
            service.spec.name,
            slot_name(slot),
            t.status.error.as_deref().unwrap_or(&t.status.message)
        );
        plan.ops.push(match (&conf.failure_action, rolling_back) {
            (FailureAction::Rollback, false) => TaskOp::Rollback {
                service: service.id.clone(),
                spec_version: target,
                message: format!("rolled back after a failure: {why}"),
            },
            (_, true) => set_state(
                UpdateState::RollbackPaused,
                format!("rollback paused: {why}"),
            ),
            _ => set_state(UpdateState::Paused, format!("update paused: {why}")),
        });
        return;
    }
    let mut old: Vec<(&Slot, Option<&NodeRecord>, &Task)> = Vec::new();
    let mut in_flight = 0usize;
    let mut waiting: Option<String> = None;
    let mut last_done = 0u64;
    for (slot, node, tasks) in slots {
        if failed_slots.contains(slot) {
            continue;
        }
        let runnable: Vec<&Task> = tasks.iter().copied().filter(|t| t.is_runnable()).collect();
        let new = runnable.iter().find(|t| current(t));
        // A task on a lost node is the lost-node path's (which honours the opt-out).
        let older = runnable.iter().find(|t| !current(t) && !lost(state, t));
        match (new, older) {
            // A new task counts once it is ready (healthy, if checked) and ran for `monitor`.
            (Some(n), None) if n.is_ready() => {
                let done_at = n.status.timestamp.saturating_add(conf.monitor_ms);
                if now >= done_at {
                    last_done = last_done.max(done_at);
                } else {
                    in_flight += 1;
                    plan.wake(done_at);
                }
            }
            (Some(n), _) => {
                in_flight += 1;
                if let Some(why) = &n.pending_reason {
                    waiting.get_or_insert_with(|| {
                        format!(
                            "task {}.{} pending: {why}",
                            service.spec.name,
                            slot_name(slot)
                        )
                    });
                }
            }
            (None, Some(o)) => old.push((slot, *node, o)),
            // An empty slot gets a task of the new template from the restart logic.
            (None, None) => {}
        }
    }
    if old.is_empty() && in_flight == 0 {
        // A rollback keeps its cause in the message; a completed update says nothing.
        let (done, message) = if rolling_back {
            (UpdateState::RolledBack, status.message.clone())
        } else {
            (UpdateState::Completed, String::new())
        };
        plan.ops.push(set_state(done, message));
        return;
    }
    // One batch at a time: the next starts once this one's tasks have all run for the
    // monitor period, and the delay has passed. A batch held up says why.
    if in_flight > 0 {
        if let Some(why) = waiting
            && why != status.message
        {
            plan.ops.push(set_state(status.state.clone(), why));
        }
        return;
    }
    if last_done > 0 && now < last_done.saturating_add(conf.delay_ms) {
        plan.wake(last_done.saturating_add(conf.delay_ms));
        return;
    }
    let batch = match conf.parallelism {
        0 => usize::MAX,
        n => n as usize,
    };
    for (slot, node, t) in old.into_iter().take(batch) {
        plan.ops.push(TaskOp::Create {
            service: service.id.clone(),
            slot: slot.clone(),
            node: node.map(|n| n.id.clone()),
            not_before: 0,
            restarts: Vec::new(),
            replaces: Some(t.id.clone()),
            start_first: conf.order == UpdateOrder::StartFirst,
            lost: false,
        });
    }
}

/// Deletes ended tasks beyond the history limit of each slot, and every ended task of a
/// removed service.
fn reap(state: &ClusterState, cfg: &OrchestratorConfig, plan: &mut Plan) {
    let mut ended: BTreeMap<(&str, &Slot), Vec<&Task>> = BTreeMap::new();
    for t in state.tasks() {
        if !t.status.state.is_terminal() {
            continue;
        }
        if state.service(&t.service).is_none() {
            plan.ops.push(TaskOp::Delete { task: t.id.clone() });
            continue;
        }
        ended
            .entry((t.service.as_str(), &t.slot))
            .or_default()
            .push(t);
    }
    for tasks in ended.values_mut() {
        if tasks.len() <= cfg.history_limit {
            continue;
        }
        tasks.sort_by_key(|t| std::cmp::Reverse(t.created_revision));
        for t in &tasks[cfg.history_limit..] {
            plan.ops.push(TaskOp::Delete { task: t.id.clone() });
        }
    }
}
