//! How service and task commands change the state, and the read views the orchestrators,
//! the scheduler and the API use. Everything here is pure and deterministic: ids come from
//! the revision, times from the command.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{OpRefusal, Outcome};
use crate::objects::{Availability, NodeRecord, NodeStatus};
use crate::service::{Service, ServiceMode, ServiceSpec, UpdateState, UpdateStatus};
use crate::state::{ClusterState, StateImage};
use crate::task::{
    AssignedPort, NodeDescription, Slot, Task, TaskOp, TaskRefusal, TaskReport, TaskState,
    TaskStatus, check_report,
};

/// Task ids by service and by node, derived from the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TaskIndex {
    by_service: BTreeMap<String, BTreeSet<String>>,
    by_node: BTreeMap<String, BTreeSet<String>>,
    by_slot: BTreeMap<(String, Slot), BTreeSet<String>>,
}

impl TaskIndex {
    /// The index of `image`'s tasks.
    pub(crate) fn of(image: &StateImage) -> TaskIndex {
        let mut index = TaskIndex::default();
        for t in image.tasks.values() {
            index.add(t);
        }
        index
    }

    fn add(&mut self, t: &Task) {
        self.by_slot
            .entry((t.service.clone(), t.slot.clone()))
            .or_default()
            .insert(t.id.clone());
        self.by_service
            .entry(t.service.clone())
            .or_default()
            .insert(t.id.clone());
        if let Some(n) = &t.node {
            self.by_node
                .entry(n.clone())
                .or_default()
                .insert(t.id.clone());
        }
    }

    fn remove(&mut self, t: &Task) {
        let key = (t.service.clone(), t.slot.clone());
        if let Some(set) = self.by_slot.get_mut(&key) {
            set.remove(&t.id);
            if set.is_empty() {
                self.by_slot.remove(&key);
            }
        }
        if let Some(set) = self.by_service.get_mut(&t.service) {
            set.remove(&t.id);
            if set.is_empty() {
                self.by_service.remove(&t.service);
            }
        }
        if let Some(n) = &t.node
            && let Some(set) = self.by_node.get_mut(n)
        {
            set.remove(&t.id);
            if set.is_empty() {
                self.by_node.remove(n);
            }
        }
    }
}

/// A stable 64-bit FNV-1a hash: ids must be the same on every manager and every version.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The id of the `n`th object of `kind` created at `revision`: unique (the revision is), the
/// same on every manager, and not guessable from a count.
fn make_id(kind: &str, cluster: &str, revision: u64, n: u32) -> String {
    format!(
        "{:016x}",
        fnv(&[
            kind.as_bytes(),
            cluster.as_bytes(),
            &revision.to_le_bytes(),
            &n.to_le_bytes()
        ])
    )
}

/// Whether a node takes new tasks: ready and active.
pub fn node_schedulable(n: &NodeRecord) -> bool {
    n.status == NodeStatus::Ready && n.availability == Availability::Active
}

impl ClusterState {
    pub(crate) fn create_service(&mut self, revision: u64, spec: &ServiceSpec, at: u64) -> Outcome {
        if let Some(why) = spec.invalid() {
            return Outcome::InvalidSpec { why };
        }
        if self.service_by_name(&spec.name).is_some() {
            return Outcome::ServiceNameTaken {
                name: spec.name.clone(),
            };
        }
        let mut n = 0;
        let id = loop {
            let id = make_id("service", &self.image.cluster.cluster_id, revision, n);
            if !self.image.services.contains_key(&id) {
                break id;
            }
            n += 1;
        };
        let service = Service {
            id: id.clone(),
            spec: spec.clone(),
            version: 1,
            spec_version: 1,
            previous_spec: None,
            update_status: None,
            created_at: at,
            updated_at: at,
            created_revision: revision,
            updated_revision: revision,
        };
        self.image.services.insert(id, service.clone());
        Outcome::Service {
            service: Box::new(service),
        }
    }

    pub(crate) fn update_service(
        &mut self,
        revision: u64,
        id: &str,
        spec: &ServiceSpec,
        expected_version: u64,
        at: u64,
    ) -> Outcome {
        let Some(current) = self.image.services.get(id) else {
            return Outcome::NoSuchService { id: id.to_owned() };
        };
        if expected_version != 0 && expected_version != current.version {
            return Outcome::ServiceVersionConflict {
                current: current.version,
            };
        }
        if let Some(why) = spec.invalid() {
            return Outcome::InvalidSpec { why };
        }
        if spec.name != current.spec.name && self.service_by_name(&spec.name).is_some() {
            return Outcome::ServiceNameTaken {
                name: spec.name.clone(),
            };
        }
        let mode_changed =
            std::mem::discriminant(&spec.mode) != std::mem::discriminant(&current.spec.mode);
        if mode_changed {
            return Outcome::InvalidSpec {
                why: "a service's mode (replicated or global) cannot change".to_owned(),
            };
        }
        let Some(s) = self.image.services.get_mut(id) else {
            return Outcome::NoSuchService { id: id.to_owned() };
        };
        if spec.task != s.spec.task {
            // A new template: what runs now is what a rollback returns to.
            s.spec_version += 1;
            s.update_status = Some(UpdateStatus {
                state: UpdateState::Updating,
                message: String::new(),
                spec_version: s.spec_version,
                started_at: at,
                started_revision: revision,
                ended_at: None,
            });
            s.previous_spec = Some(std::mem::replace(&mut s.spec, spec.clone()));
        } else {
            // The same template (a scale, new settings): no rollout, and the spec to roll
            // back to stays the last one that ran other tasks.
            s.spec = spec.clone();
        }
        s.version += 1;
        s.updated_at = at;
        s.updated_revision = revision;
        Outcome::Service {
            service: Box::new(s.clone()),
        }
    }

    /// Swaps a service's spec with its previous one (a rollback) if it is still at
    /// `expected_spec_version` (0: any).
    pub(crate) fn rollback_service(
        &mut self,
        revision: u64,
        id: &str,
        expected_spec_version: u64,
        message: &str,
        at: u64,
    ) -> Result<Service, TaskRefusal> {
        let current = self
            .image
            .services
            .get(id)
            .ok_or(TaskRefusal::NoSuchService)?;
        if expected_spec_version != 0 && current.spec_version != expected_spec_version {
            return Err(TaskRefusal::StaleSpec);
        }
        let previous = current
            .previous_spec
            .as_ref()
            .ok_or(TaskRefusal::NoPreviousSpec)?;
        if previous.name != current.spec.name
            && self
                .service_by_name(&previous.name)
                .is_some_and(|other| other.id != id)
        {
            return Err(TaskRefusal::StaleSpec);
        }
        let s = self
            .image
            .services
            .get_mut(id)
            .ok_or(TaskRefusal::NoSuchService)?;
        let Some(previous) = s.previous_spec.take() else {
            return Err(TaskRefusal::NoPreviousSpec);
        };
        let failed = std::mem::replace(&mut s.spec, previous);
        s.previous_spec = Some(failed);
        s.spec_version += 1;
        s.version += 1;
        s.updated_at = at;
        s.updated_revision = revision;
        s.update_status = Some(UpdateStatus {
            state: UpdateState::RollingBack,
            message: message.to_owned(),
            spec_version: s.spec_version,
            started_at: at,
            started_revision: revision,
            ended_at: None,
        });
        Ok(s.clone())
    }

    pub(crate) fn remove_service(&mut self, revision: u64, id: &str) -> Outcome {
        let Some(service) = self.image.services.remove(id) else {
            return Outcome::NoSuchService { id: id.to_owned() };
        };
        for tid in self.task_ids_of(id) {
            self.change_task(revision, &tid, |t| {
                t.desired = t.desired.max(TaskState::Remove);
                if t.status.state < TaskState::Assigned {
                    t.status = TaskStatus::new(
                        TaskState::Shutdown,
                        "service removed before the task was placed",
                        t.status.timestamp,
                    );
                }
            });
        }
        Outcome::Service {
            service: Box::new(service),
        }
    }

    pub(crate) fn write_tasks(&mut self, revision: u64, at: u64, ops: &[TaskOp]) -> Outcome {
        let mut created = Vec::new();
        let mut refused = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            match self.task_op(revision, at, index, op) {
                Ok(Some(id)) => created.push(id),
                Ok(None) => {}
                Err(refusal) => refused.push(OpRefusal {
                    index,
                    task: op_task(op),
                    refusal,
                }),
            }
        }
        Outcome::Tasks { created, refused }
    }

    pub(crate) fn report_tasks(
        &mut self,
        revision: u64,
        node: &str,
        reports: &[TaskReport],
    ) -> Outcome {
        let (mut applied, mut unchanged, mut refused) = (0, 0, Vec::new());
        for (i, r) in reports.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let verdict = match self.image.tasks.get(&r.task) {
                None => Err(TaskRefusal::NoSuchTask),
                Some(t) if t.node.as_deref() != Some(node) => Err(TaskRefusal::WrongNode),
                Some(t) => check_report(t.status.state, r.status.state),
            };
            match verdict {
                Ok(true) => {
                    applied += 1;
                    self.change_task(revision, &r.task, |t| t.status = r.status.clone());
                }
                // The same state with another health: only the health changes (the state's
                // time stays that of the state).
                Ok(false)
                    if self.image.tasks.get(&r.task).is_some_and(|t| {
                        t.status.state == TaskState::Running && t.status.health != r.status.health
                    }) =>
                {
                    applied += 1;
                    self.change_task(revision, &r.task, |t| t.status.health = r.status.health);
                }
                Ok(false) => unchanged += 1,
                Err(refusal) => refused.push(OpRefusal {
                    index,
                    task: Some(r.task.clone()),
                    refusal,
                }),
            }
        }
        Outcome::TaskReports {
            applied,
            unchanged,
            refused,
        }
    }

    fn task_op(
        &mut self,
        revision: u64,
        at: u64,
        index: u32,
        op: &TaskOp,
    ) -> Result<Option<String>, TaskRefusal> {
        match op {
            TaskOp::Create {
                service,
                slot,
                node,
                not_before,
                restarts,
                replaces,
                start_first,
                lost,
            } => {
                let svc = self
                    .image
                    .services
                    .get(service)
                    .ok_or(TaskRefusal::NoSuchService)?;
                if let Some(old) = replaces {
                    let old = self.image.tasks.get(old).ok_or(TaskRefusal::NoSuchTask)?;
                    if old.service != *service || old.slot != *slot {
                        return Err(TaskRefusal::OtherSlot);
                    }
                }
                if let Some(busy) = self
                    .tasks_in_slot(service, slot)
                    .find(|t| t.is_runnable() && Some(&t.id) != replaces.as_ref())
                {
                    return Err(TaskRefusal::SlotOccupied {
                        task: busy.id.clone(),
                    });
                }
                // A global task is pinned to its node (its slot) but still waits for the
                // scheduler, which checks the node's room (memory, CPUs, ports) and gives
                // it its ports.
                let status = match node {
                    Some(n) => {
                        if !self.image.nodes.get(n).is_some_and(node_schedulable) {
                            return Err(TaskRefusal::NodeUnavailable);
                        }
                        TaskStatus::new(TaskState::Pending, format!("waiting for room on {n}"), at)
                    }
                    None => TaskStatus::new(TaskState::Pending, "waiting for a node", at),
                };
                let mut n = index;
                let id = loop {
                    let id = make_id("task", &self.image.cluster.cluster_id, revision, n);
                    if !self.image.tasks.contains_key(&id) {
                        break id;
                    }
                    n = n.wrapping_add(1 << 20);
                };
                let task = Task {
                    id: id.clone(),
                    service: service.clone(),
                    service_name: svc.spec.name.clone(),
                    slot: slot.clone(),
                    spec_version: svc.spec_version,
                    template: svc.spec.task.clone(),
                    // Set by the scheduler's assignment (a global task's node is its slot).
                    node: None,
                    desired: TaskState::Running,
                    status,
                    ports: Vec::new(),
                    not_before: *not_before,
                    restarts: restarts.clone(),
                    replaces: replaces.clone(),
                    pending_reason: None,
                    created_at: at,
                    version: 1,
                    created_revision: revision,
                    updated_revision: revision,
                };
                if let Some(old) = replaces
                    && !start_first
                {
                    let replaced_by = id.clone();
                    self.change_task(revision, old, |t| {
                        t.desired = t.desired.max(TaskState::Shutdown);
                        if *lost && !t.status.state.is_terminal() {
                            t.status = TaskStatus::new(
                                TaskState::Orphaned,
                                format!("node lost; replaced by {replaced_by}"),
                                at,
                            );
                        }
                    });
                }
                self.index.add(&task);
                self.image.tasks.insert(id.clone(), task);
                Ok(Some(id))
            }
            TaskOp::Assign { task, node, ports } => {
                let t = self.image.tasks.get(task).ok_or(TaskRefusal::NoSuchTask)?;
                if t.status.state != TaskState::Pending || t.desired > TaskState::Running {
                    return Err(TaskRefusal::WrongState {
                        state: t.status.state,
                    });
                }
                if !self.image.nodes.get(node).is_some_and(node_schedulable) {
                    return Err(TaskRefusal::NodeUnavailable);
                }
                if let Some(port) = self.first_taken_port(node, ports, task) {
                    return Err(TaskRefusal::PortTaken { port });
                }
                let old = t.clone();
                self.index.remove(&old);
                self.change_task(revision, task, |t| {
                    t.node = Some(node.clone());
                    t.ports = ports.clone();
                    t.pending_reason = None;
                    t.status =
                        TaskStatus::new(TaskState::Assigned, format!("assigned to {node}"), at);
                });
                if let Some(t) = self.image.tasks.get(task) {
                    self.index.add(&t.clone());
                }
                Ok(None)
            }
            TaskOp::SetDesired { task, desired } => {
                let t = self.image.tasks.get(task).ok_or(TaskRefusal::NoSuchTask)?;
                if *desired < t.desired {
                    return Err(TaskRefusal::DesiredBackwards {
                        from: t.desired,
                        to: *desired,
                    });
                }
                self.change_task(revision, task, |t| {
                    t.desired = *desired;
                    // Never given to a node: nothing runs, it ends here.
                    if *desired >= TaskState::Shutdown && t.status.state < TaskState::Assigned {
                        t.status = TaskStatus::new(
                            TaskState::Shutdown,
                            "stopped before it was placed",
                            at,
                        );
                    }
                });
                Ok(None)
            }
            TaskOp::Explain { task, why } => {
                let t = self.image.tasks.get(task).ok_or(TaskRefusal::NoSuchTask)?;
                if t.status.state != TaskState::Pending {
                    return Err(TaskRefusal::WrongState {
                        state: t.status.state,
                    });
                }
                if t.pending_reason.as_deref() != Some(why.as_str()) {
                    self.change_task(revision, task, |t| t.pending_reason = Some(why.clone()));
                }
                Ok(None)
            }
            TaskOp::Orphan { task } => {
                let t = self.image.tasks.get(task).ok_or(TaskRefusal::NoSuchTask)?;
                let state = t.status.state;
                if !(TaskState::Assigned..=TaskState::Running).contains(&state) {
                    return Err(TaskRefusal::WrongState { state });
                }
                self.change_task(revision, task, |t| {
                    t.desired = t.desired.max(TaskState::Shutdown);
                    t.status = TaskStatus::new(TaskState::Orphaned, "node lost", at);
                });
                Ok(None)
            }
            TaskOp::Delete { task } => {
                let t = self.image.tasks.get(task).ok_or(TaskRefusal::NoSuchTask)?;
                if !t.status.state.is_terminal() {
                    return Err(TaskRefusal::NotEnded);
                }
                if let Some(t) = self.image.tasks.remove(task) {
                    self.index.remove(&t);
                }
                Ok(None)
            }
            TaskOp::SetUpdateState {
                service,
                spec_version,
                state,
                message,
            } => {
                let s = self
                    .image
                    .services
                    .get_mut(service)
                    .ok_or(TaskRefusal::NoSuchService)?;
                let Some(u) = s.update_status.as_mut() else {
                    return Err(TaskRefusal::StaleSpec);
                };
                if s.spec_version != *spec_version || u.spec_version != *spec_version {
                    return Err(TaskRefusal::StaleSpec);
                }
                if u.state != *state || u.message != *message {
                    u.state = state.clone();
                    u.message = message.clone();
                    u.ended_at = (!state.is_active()).then_some(at);
                    s.version += 1;
                    s.updated_revision = revision;
                }
                Ok(None)
            }
            TaskOp::Rollback {
                service,
                spec_version,
                message,
            } => {
                self.rollback_service(revision, service, (*spec_version).max(1), message, at)?;
                Ok(None)
            }
        }
    }

    /// The first of `ports` that a runnable task other than `except` holds on `node`.
    fn first_taken_port(&self, node: &str, ports: &[AssignedPort], except: &str) -> Option<u16> {
        if ports.is_empty() {
            return None;
        }
        let held: BTreeSet<u16> = self
            .tasks_on(node)
            .filter(|t| t.id != except && !t.status.state.is_terminal())
            .flat_map(|t| t.ports.iter().map(|p| p.port))
            .collect();
        ports.iter().map(|p| p.port).find(|p| held.contains(p))
    }

    fn change_task(&mut self, revision: u64, id: &str, f: impl FnOnce(&mut Task)) {
        if let Some(t) = self.image.tasks.get_mut(id) {
            f(t);
            t.version += 1;
            t.updated_revision = revision;
        }
    }

    fn task_ids_of(&self, service: &str) -> Vec<String> {
        self.index
            .by_service
            .get(service)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// A service by id.
    pub fn service(&self, id: &str) -> Option<&Service> {
        self.image.services.get(id)
    }

    /// A service by name.
    pub fn service_by_name(&self, name: &str) -> Option<&Service> {
        self.image.services.values().find(|s| s.spec.name == name)
    }

    /// Every service, by id.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.image.services.values()
    }

    /// A task by id.
    pub fn task(&self, id: &str) -> Option<&Task> {
        self.image.tasks.get(id)
    }

    /// Every task, by id.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.image.tasks.values()
    }

    /// The tasks of a service (also of one just removed, until they are reaped).
    pub fn tasks_of<'a>(&'a self, service: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.index
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.image.tasks.get(id))
    }

    /// The tasks of a service's slot.
    pub fn tasks_in_slot<'a>(
        &'a self,
        service: &str,
        slot: &Slot,
    ) -> impl Iterator<Item = &'a Task> + 'a {
        self.index
            .by_slot
            .get(&(service.to_owned(), slot.clone()))
            .into_iter()
            .flatten()
            .filter_map(|id| self.image.tasks.get(id))
    }

    /// The tasks assigned to a node.
    pub fn tasks_on<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.index
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.image.tasks.get(id))
    }

    /// What a node's agent reported of its machine.
    pub fn node_description(&self, node: &str) -> Option<&NodeDescription> {
        self.image.node_descriptions.get(node)
    }

    /// The number of slots a service wants (replicated), or `None` for a global one.
    pub fn replicas(&self, service: &str) -> Option<u32> {
        match self.image.services.get(service)?.spec.mode {
            ServiceMode::Replicated { replicas } => Some(replicas),
            ServiceMode::Global => None,
        }
    }

    /// Whether the derived index matches the tasks (for tests).
    pub fn index_is_consistent(&self) -> bool {
        self.index == TaskIndex::of(&self.image)
    }

    /// The slot key of a node for a global service.
    pub fn global_slot(node: &str) -> Slot {
        Slot::Node(node.to_owned())
    }
}

fn op_task(op: &TaskOp) -> Option<String> {
    match op {
        TaskOp::Create { replaces, .. } => replaces.clone(),
        TaskOp::Assign { task, .. }
        | TaskOp::SetDesired { task, .. }
        | TaskOp::Explain { task, .. }
        | TaskOp::Orphan { task }
        | TaskOp::Delete { task } => Some(task.clone()),
        TaskOp::SetUpdateState { .. } | TaskOp::Rollback { .. } => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::command::Command;
    use crate::objects::NodeRole;
    use crate::service::{
        Placement, ProcessSpec, Resources, RestartPolicy, TaskTemplate, UpdateConfig,
    };

    fn spec(name: &str, replicas: u32) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            labels: BTreeMap::new(),
            mode: ServiceMode::Replicated { replicas },
            task: TaskTemplate {
                process: ProcessSpec {
                    argv: vec!["sleep".into(), "1000".into()],
                    env: BTreeMap::new(),
                    cwd: None,
                    user: None,
                    stop_signal: 15,
                    stop_grace_ms: 10_000,
                },
                resources: Resources::default(),
                restart: RestartPolicy::default(),
                placement: Placement::default(),
                ports: Vec::new(),
                force_update: 0,
                health: None,
                drain_delay_ms: 0,
                dns_ttl_s: 5,
            },
            update: UpdateConfig::default(),
            rollback: UpdateConfig::default(),
        }
    }

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            hostname: id.into(),
            addr: "127.0.0.1:1".into(),
            role: NodeRole::Worker,
            desired_role: NodeRole::Worker,
            availability: Availability::Active,
            status: NodeStatus::Ready,
            labels: BTreeMap::new(),
            cert_serial: "01".into(),
            cert_not_after: 0,
            cert_ca: String::new(),
            cert_key: String::new(),
            version: 0,
            created_revision: 0,
            updated_revision: 0,
        }
    }

    /// A state with nodes w1, w2 and a service `web`; returns its id.
    fn setup() -> (ClusterState, String) {
        let mut s = ClusterState::new();
        s.apply(1, &Command::UpsertNode { node: node("w1") });
        s.apply(2, &Command::UpsertNode { node: node("w2") });
        let (r, _) = s.apply(
            3,
            &Command::CreateService {
                spec: spec("web", 2),
                at: 1,
            },
        );
        let Outcome::Service { service } = r.outcome else {
            panic!("{:?}", r.outcome)
        };
        (s, service.id)
    }

    fn create(service: &str, slot: u32) -> TaskOp {
        TaskOp::Create {
            service: service.into(),
            slot: Slot::Number(slot),
            node: None,
            not_before: 0,
            restarts: Vec::new(),
            replaces: None,
            start_first: false,
            lost: false,
        }
    }

    fn created(r: &crate::CommandResult) -> Vec<String> {
        match &r.outcome {
            Outcome::Tasks { created, .. } => created.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_are_unique_and_specs_checked() {
        let (mut s, _) = setup();
        let (r, _) = s.apply(
            4,
            &Command::CreateService {
                spec: spec("web", 1),
                at: 2,
            },
        );
        assert_eq!(r.outcome, Outcome::ServiceNameTaken { name: "web".into() });
        let mut bad = spec("Bad_Name", 1);
        let (r, _) = s.apply(
            5,
            &Command::CreateService {
                spec: bad.clone(),
                at: 2,
            },
        );
        assert!(matches!(r.outcome, Outcome::InvalidSpec { .. }));
        bad.name = "ok".into();
        bad.task.process.argv.clear();
        let (r, _) = s.apply(6, &Command::CreateService { spec: bad, at: 2 });
        assert!(matches!(r.outcome, Outcome::InvalidSpec { why } if why.contains("program")));
    }

    #[test]
    fn updates_compare_versions_and_bump_the_spec_version_only_for_the_template() {
        let (mut s, id) = setup();
        let mut scaled = spec("web", 5);
        let (r, _) = s.apply(
            4,
            &Command::UpdateService {
                id: id.clone(),
                spec: scaled.clone(),
                expected_version: 1,
                at: 2,
            },
        );
        let Outcome::Service { service } = r.outcome else {
            panic!()
        };
        assert_eq!((service.version, service.spec_version), (2, 1));
        scaled.task.process.argv.push("more".into());
        let (r, _) = s.apply(
            5,
            &Command::UpdateService {
                id: id.clone(),
                spec: scaled.clone(),
                expected_version: 1,
                at: 3,
            },
        );
        assert_eq!(r.outcome, Outcome::ServiceVersionConflict { current: 2 });
        let (r, _) = s.apply(
            6,
            &Command::UpdateService {
                id,
                spec: scaled,
                expected_version: 2,
                at: 3,
            },
        );
        let Outcome::Service { service } = r.outcome else {
            panic!()
        };
        assert_eq!((service.version, service.spec_version), (3, 2));
        assert_eq!(
            service.previous_spec.unwrap().mode,
            ServiceMode::Replicated { replicas: 5 }
        );
    }

    #[test]
    fn a_slot_holds_one_runnable_task_and_a_replay_is_refused() {
        let (mut s, id) = setup();
        let (r, _) = s.apply(
            4,
            &Command::WriteTasks {
                at: 5,
                ops: vec![create(&id, 1), create(&id, 2)],
            },
        );
        let ids = created(&r);
        assert_eq!(ids.len(), 2);
        // The same batch again (a write whose answer was lost, sent by a new leader).
        let (r, _) = s.apply(
            5,
            &Command::WriteTasks {
                at: 6,
                ops: vec![create(&id, 1), create(&id, 2)],
            },
        );
        let Outcome::Tasks { created, refused } = r.outcome else {
            panic!()
        };
        assert!(created.is_empty());
        assert_eq!(refused.len(), 2);
        assert!(matches!(
            refused[0].refusal,
            TaskRefusal::SlotOccupied { .. }
        ));
        assert!(s.index_is_consistent());
    }

    #[test]
    fn assignment_reports_and_replacement() {
        let (mut s, id) = setup();
        let (r, _) = s.apply(
            4,
            &Command::WriteTasks {
                at: 5,
                ops: vec![create(&id, 1)],
            },
        );
        let t = created(&r).remove(0);
        let assign = |node: &str, port: u16| TaskOp::Assign {
            task: t.clone(),
            node: node.into(),
            ports: vec![AssignedPort {
                name: "HTTP".into(),
                port,
            }],
        };
        // Not a node, then a drained node: refused.
        s.apply(
            5,
            &Command::SetNodeAvailability {
                id: "w2".into(),
                availability: Availability::Drain,
            },
        );
        let (r, _) = s.apply(
            6,
            &Command::WriteTasks {
                at: 6,
                ops: vec![assign("nope", 1), assign("w2", 1)],
            },
        );
        let Outcome::Tasks { refused, .. } = r.outcome else {
            panic!()
        };
        assert!(
            refused
                .iter()
                .all(|r| r.refusal == TaskRefusal::NodeUnavailable)
        );
        s.apply(
            7,
            &Command::WriteTasks {
                at: 7,
                ops: vec![assign("w1", 30000)],
            },
        );
        assert_eq!(s.tasks_on("w1").count(), 1);
        let report = |state: TaskState| TaskReport {
            task: t.clone(),
            status: TaskStatus::new(state, state.as_str(), 8),
        };
        // Another node cannot report it; an agent cannot set Orphaned; forward is fine.
        let (r, _) = s.apply(
            8,
            &Command::ReportTasks {
                node: "w2".into(),
                reports: vec![report(TaskState::Running)],
            },
        );
        assert!(
            matches!(&r.outcome, Outcome::TaskReports { refused, .. } if refused[0].refusal == TaskRefusal::WrongNode)
        );
        let (r, _) = s.apply(
            9,
            &Command::ReportTasks {
                node: "w1".into(),
                reports: vec![
                    report(TaskState::Orphaned),
                    report(TaskState::Running),
                    report(TaskState::Running),
                    report(TaskState::Starting),
                ],
            },
        );
        let Outcome::TaskReports {
            applied,
            unchanged,
            refused,
        } = r.outcome
        else {
            panic!()
        };
        assert_eq!((applied, unchanged, refused.len()), (1, 1, 2));
        assert_eq!(s.task(&t).unwrap().status.state, TaskState::Running);
        // The node is lost: a replacement in the same slot orphans it, in one entry.
        let (r, _) = s.apply(
            10,
            &Command::WriteTasks {
                at: 10,
                ops: vec![TaskOp::Create {
                    service: id.clone(),
                    slot: Slot::Number(1),
                    node: None,
                    not_before: 0,
                    restarts: vec![],
                    replaces: Some(t.clone()),
                    start_first: false,
                    lost: true,
                }],
            },
        );
        assert_eq!(created(&r).len(), 1);
        let old = s.task(&t).unwrap();
        assert_eq!(
            (old.status.state, old.desired),
            (TaskState::Orphaned, TaskState::Shutdown)
        );
        // The orphan's late report of Complete is refused: it never comes back.
        let (r, _) = s.apply(
            11,
            &Command::ReportTasks {
                node: "w1".into(),
                reports: vec![report(TaskState::Complete)],
            },
        );
        assert!(matches!(&r.outcome, Outcome::TaskReports { refused, .. } if refused.len() == 1));
        // Ended: the reaper may delete it.
        let (r, _) = s.apply(
            12,
            &Command::WriteTasks {
                at: 12,
                ops: vec![TaskOp::Delete { task: t.clone() }],
            },
        );
        assert!(matches!(&r.outcome, Outcome::Tasks { refused, .. } if refused.is_empty()));
        assert!(s.task(&t).is_none() && s.index_is_consistent());
    }

    #[test]
    fn removing_a_service_ends_its_unplaced_tasks_and_wants_the_others_removed() {
        let (mut s, id) = setup();
        let (r, _) = s.apply(
            4,
            &Command::WriteTasks {
                at: 5,
                ops: vec![create(&id, 1), create(&id, 2)],
            },
        );
        let ids = created(&r);
        s.apply(
            5,
            &Command::WriteTasks {
                at: 5,
                ops: vec![TaskOp::Assign {
                    task: ids[0].clone(),
                    node: "w1".into(),
                    ports: vec![],
                }],
            },
        );
        s.apply(6, &Command::RemoveService { id: id.clone() });
        assert!(s.service(&id).is_none());
        let placed = s.task(&ids[0]).unwrap();
        assert_eq!(
            (placed.status.state, placed.desired),
            (TaskState::Assigned, TaskState::Remove)
        );
        let unplaced = s.task(&ids[1]).unwrap();
        assert_eq!(unplaced.status.state, TaskState::Shutdown);
    }

    #[test]
    fn labels_survive_a_node_upsert() {
        let (mut s, _) = setup();
        s.apply(
            4,
            &Command::SetNodeLabels {
                id: "w1".into(),
                add: [("zone".to_owned(), "a".to_owned())].into(),
                remove: vec![],
            },
        );
        s.apply(5, &Command::UpsertNode { node: node("w1") });
        assert_eq!(
            s.node("w1").unwrap().labels.get("zone").map(String::as_str),
            Some("a")
        );
        s.apply(
            6,
            &Command::SetNodeLabels {
                id: "w1".into(),
                add: BTreeMap::new(),
                remove: vec!["zone".into()],
            },
        );
        assert!(s.node("w1").unwrap().labels.is_empty());
    }

    fn arb_op(ids: Vec<String>) -> impl Strategy<Value = Command> {
        let task = prop::sample::select(ids);
        let state = prop::sample::select(TaskState::ALL.to_vec());
        let node = prop::sample::select(vec!["w1".to_owned(), "w2".to_owned()]);
        prop_oneof![
            (
                1u32..4,
                prop::option::of(task.clone()),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(slot, replaces, start_first, lost)| Command::WriteTasks {
                    at: 1,
                    ops: vec![TaskOp::Create {
                        service: "S".into(),
                        slot: Slot::Number(slot),
                        node: None,
                        not_before: 0,
                        restarts: vec![],
                        replaces,
                        start_first,
                        lost,
                    }],
                }),
            (task.clone(), node.clone()).prop_map(|(task, node)| Command::WriteTasks {
                at: 1,
                ops: vec![TaskOp::Assign {
                    task,
                    node,
                    ports: vec![]
                }],
            }),
            (task.clone(), state.clone()).prop_map(|(task, desired)| Command::WriteTasks {
                at: 1,
                ops: vec![TaskOp::SetDesired { task, desired }],
            }),
            task.clone().prop_map(|task| Command::WriteTasks {
                at: 1,
                ops: vec![TaskOp::Orphan { task }]
            }),
            task.clone().prop_map(|task| Command::WriteTasks {
                at: 1,
                ops: vec![TaskOp::Delete { task }]
            }),
            (task, node, state).prop_map(|(task, node, state)| Command::ReportTasks {
                node,
                reports: vec![TaskReport {
                    task,
                    status: TaskStatus::new(state, "", 1)
                }],
            }),
        ]
    }

    proptest! {
        /// Whatever the order of task commands: a task's state and desired state never go
        /// down, a slot never holds two runnable tasks unless one is a start-first
        /// replacement of the other, and the index follows the tasks.
        #[test]
        fn task_states_are_monotonic_and_slots_single(
            cmds in (0usize..1).prop_flat_map(|_| {
                // Task ids are deterministic: precompute the ones creations will produce.
                let mut s = base();
                let mut ids = Vec::new();
                for r in 10..70u64 {
                    ids.push(make_id("task", &s.image.cluster.cluster_id, r, 0));
                }
                s.advance(9);
                prop::collection::vec(arb_op(ids), 1..60)
            })
        ) {
            let mut s = base();
            for (i, c) in cmds.iter().enumerate() {
                let before: BTreeMap<String, (TaskState, TaskState)> = s.tasks().map(|t| (t.id.clone(), (t.status.state, t.desired))).collect();
                s.apply(10 + i as u64, c);
                for t in s.tasks() {
                    if let Some((state, desired)) = before.get(&t.id) {
                        prop_assert!(t.status.state >= *state, "{} went from {state} to {}", t.id, t.status.state);
                        prop_assert!(t.desired >= *desired);
                    }
                }
                let mut by_slot: BTreeMap<&Slot, Vec<&Task>> = BTreeMap::new();
                for t in s.tasks().filter(|t| t.is_runnable()) {
                    by_slot.entry(&t.slot).or_default().push(t);
                }
                for tasks in by_slot.values() {
                    let pair = tasks.len() == 2 && (tasks[0].replaces.as_ref() == Some(&tasks[1].id) || tasks[1].replaces.as_ref() == Some(&tasks[0].id));
                    prop_assert!(tasks.len() <= 1 || pair, "{tasks:?}");
                }
                prop_assert!(s.index_is_consistent());
            }
        }
    }

    /// Nodes w1, w2 and a service with the fixed id "S" (at revision 3).
    fn base() -> ClusterState {
        let (mut s, id) = setup();
        let svc = s.image.services.remove(&id).unwrap();
        s.image.services.insert(
            "S".into(),
            Service {
                id: "S".into(),
                ..svc
            },
        );
        s
    }
}
