//! The scheduler, pure: pending tasks are placed on nodes that pass every filter (ready and
//! active, constraints, resources, free ports), preferring the node with the fewest tasks of
//! the service (after any spread preference), then the fewest tasks in all. A task that fits
//! nowhere gets a reason that says which filter turned how many nodes away, e.g.
//! `no suitable node (constraint node.labels.zone==b: 3 nodes; memory: 1 node)`.

use std::collections::{BTreeMap, BTreeSet};

use starling_state::{
    AssignedPort, ClusterState, Constraint, ConstraintKey, NodeRecord, NodeRole, Placement, TaskOp,
    TaskState, node_schedulable,
};

/// Host ports given to tasks on a node that did not report a range.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (30_000, 32_767);

/// Whether every constraint of `placement` holds on `node`.
pub fn constraints_hold(placement: &Placement, node: &NodeRecord) -> bool {
    placement.constraints.iter().all(|c| holds(c, node))
}

fn holds(c: &Constraint, node: &NodeRecord) -> bool {
    let role;
    let actual: Option<&str> = match &c.key {
        ConstraintKey::Id => Some(&node.id),
        ConstraintKey::Hostname => Some(&node.hostname),
        ConstraintKey::Role => {
            role = match node.role {
                NodeRole::Manager => "manager",
                NodeRole::Worker => "worker",
            };
            Some(role)
        }
        ConstraintKey::Label(l) => node.labels.get(l).map(String::as_str),
    };
    let same = actual.is_some_and(|a| a.eq_ignore_ascii_case(&c.value));
    same == c.equal
}

/// A constraint as the operator wrote it (`node.labels.zone==b`).
pub fn constraint_text(c: &Constraint) -> String {
    let key = match &c.key {
        ConstraintKey::Id => "node.id".to_owned(),
        ConstraintKey::Hostname => "node.hostname".to_owned(),
        ConstraintKey::Role => "node.role".to_owned(),
        ConstraintKey::Label(l) => format!("node.labels.{l}"),
    };
    format!("{key}{}{}", if c.equal { "==" } else { "!=" }, c.value)
}

/// What one node has left while a batch is placed.
#[derive(Clone, Debug)]
struct NodeRoom {
    memory: Option<u64>,
    cpus: Option<u64>,
    ports: (u16, u16),
    used_ports: BTreeSet<u16>,
    total: u32,
    by_service: BTreeMap<String, u32>,
}

/// Why a node was turned away, counted per filter for the explanation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Filter {
    NotReady,
    NoAgent,
    Constraint(usize),
    Memory,
    Cpu,
    Ports,
}

/// The scheduler's changes for the pending tasks of `state`: `Assign` for each task placed,
/// `Explain` (only when the reason changed) for each task that fits nowhere.
pub fn schedule(state: &ClusterState) -> Vec<TaskOp> {
    let mut rooms: BTreeMap<String, NodeRoom> = BTreeMap::new();
    for node in state.nodes() {
        let desc = state.node_description(&node.id);
        let mut room = NodeRoom {
            memory: desc.map(|d| d.memory_bytes),
            cpus: desc.map(|d| d.nano_cpus),
            ports: desc.map_or(DEFAULT_PORT_RANGE, |d| (d.port_min, d.port_max)),
            used_ports: BTreeSet::new(),
            total: 0,
            by_service: BTreeMap::new(),
        };
        for t in state.tasks_on(&node.id).filter(|t| t.is_runnable()) {
            room.total += 1;
            *room.by_service.entry(t.service.clone()).or_default() += 1;
            let r = &t.template.resources;
            if let (Some(m), Some(used)) = (room.memory.as_mut(), r.memory_bytes) {
                *m = m.saturating_sub(used);
            }
            if let (Some(c), Some(used)) = (room.cpus.as_mut(), r.nano_cpus) {
                *c = c.saturating_sub(used);
            }
            room.used_ports.extend(t.ports.iter().map(|p| p.port));
        }
        rooms.insert(node.id.clone(), room);
    }
    let mut ops = Vec::new();
    // Pending tasks, oldest first, grouped by service so the filters that do not change as
    // tasks are placed run once per service and node.
    let mut pending: BTreeMap<&str, Vec<&starling_state::Task>> = BTreeMap::new();
    for t in state.tasks() {
        if t.status.state == TaskState::Pending && t.desired <= TaskState::Running {
            pending.entry(t.service.as_str()).or_default().push(t);
        }
    }
    for (service, mut tasks) in pending {
        tasks.sort_by_key(|t| (t.created_revision, t.id.clone()));
        let placement = &tasks[0].template.placement;
        let mut static_rejects: BTreeMap<Filter, u32> = BTreeMap::new();
        let mut eligible: Vec<&NodeRecord> = Vec::new();
        for node in state.nodes() {
            if !node_schedulable(node) {
                *static_rejects.entry(Filter::NotReady).or_default() += 1;
                continue;
            }
            if state.node_description(&node.id).is_none() {
                *static_rejects.entry(Filter::NoAgent).or_default() += 1;
                continue;
            }
            match placement.constraints.iter().position(|c| !holds(c, node)) {
                Some(i) => *static_rejects.entry(Filter::Constraint(i)).or_default() += 1,
                None => eligible.push(node),
            }
        }
        let spread = placement.preferences.first().map(|p| p.label.clone());
        for task in tasks {
            let res = &task.template.resources;
            let mut rejects = static_rejects.clone();
            let mut best: Option<(&NodeRecord, (u32, u32, u32))> = None;
            // Tasks of the service per spread-label value, for the preference.
            let spread_counts: BTreeMap<Option<&String>, u32> = match &spread {
                Some(label) => {
                    let mut m = BTreeMap::new();
                    for n in &eligible {
                        let c = rooms[&n.id].by_service.get(service).copied().unwrap_or(0);
                        *m.entry(n.labels.get(label)).or_default() += c;
                    }
                    m
                }
                None => BTreeMap::new(),
            };
            for node in &eligible {
                let room = &rooms[&node.id];
                let fail = if res
                    .memory_bytes
                    .is_some_and(|m| room.memory.is_some_and(|r| r < m))
                {
                    Some(Filter::Memory)
                } else if res
                    .nano_cpus
                    .is_some_and(|c| room.cpus.is_some_and(|r| r < c))
                {
                    Some(Filter::Cpu)
                } else if free_ports(room, task.template.ports.len()).is_none() {
                    Some(Filter::Ports)
                } else {
                    None
                };
                if let Some(f) = fail {
                    *rejects.entry(f).or_default() += 1;
                    continue;
                }
                let spread_key = spread.as_ref().map_or(0, |l| {
                    spread_counts.get(&node.labels.get(l)).copied().unwrap_or(0)
                });
                let key = (
                    spread_key,
                    room.by_service.get(service).copied().unwrap_or(0),
                    room.total,
                );
                if best.as_ref().is_none_or(|(_, k)| key < *k) {
                    best = Some((node, key));
                }
            }
            match best {
                Some((node, _)) => {
                    let Some(room) = rooms.get_mut(&node.id) else {
                        continue;
                    };
                    let ports: Vec<AssignedPort> = free_ports(room, task.template.ports.len())
                        .unwrap_or_default()
                        .into_iter()
                        .zip(&task.template.ports)
                        .map(|(port, spec)| AssignedPort {
                            name: spec.name.clone(),
                            port,
                        })
                        .collect();
                    room.used_ports.extend(ports.iter().map(|p| p.port));
                    room.total += 1;
                    *room.by_service.entry(service.to_owned()).or_default() += 1;
                    if let (Some(m), Some(used)) = (room.memory.as_mut(), res.memory_bytes) {
                        *m = m.saturating_sub(used);
                    }
                    if let (Some(c), Some(used)) = (room.cpus.as_mut(), res.nano_cpus) {
                        *c = c.saturating_sub(used);
                    }
                    ops.push(TaskOp::Assign {
                        task: task.id.clone(),
                        node: node.id.clone(),
                        ports,
                    });
                }
                None => {
                    let why = explain(&rejects, placement);
                    if task.pending_reason.as_deref() != Some(why.as_str()) {
                        ops.push(TaskOp::Explain {
                            task: task.id.clone(),
                            why,
                        });
                    }
                }
            }
        }
    }
    ops
}

/// The first `n` free ports of a node's range, if it has that many.
fn free_ports(room: &NodeRoom, n: usize) -> Option<Vec<u16>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let ports: Vec<u16> = (room.ports.0..=room.ports.1)
        .filter(|p| !room.used_ports.contains(p))
        .take(n)
        .collect();
    (ports.len() == n).then_some(ports)
}

fn explain(rejects: &BTreeMap<Filter, u32>, placement: &Placement) -> String {
    if rejects.is_empty() {
        return "no suitable node (the cluster has no nodes)".to_owned();
    }
    let nodes = |n: u32| {
        if n == 1 {
            "1 node".to_owned()
        } else {
            format!("{n} nodes")
        }
    };
    let parts: Vec<String> = rejects
        .iter()
        .map(|(f, n)| {
            let what = match f {
                Filter::NotReady => "not ready or not active".to_owned(),
                Filter::NoAgent => "no agent session yet".to_owned(),
                Filter::Constraint(i) => format!(
                    "constraint {}",
                    placement
                        .constraints
                        .get(*i)
                        .map(constraint_text)
                        .unwrap_or_default()
                ),
                Filter::Memory => "memory".to_owned(),
                Filter::Cpu => "cpu".to_owned(),
                Filter::Ports => "host ports".to_owned(),
            };
            format!("{what}: {}", nodes(*n))
        })
        .collect();
    format!("no suitable node ({})", parts.join("; "))
}
