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

/// How many more tasks needing `ports_per_task` host ports the nodes that `placement` allows
/// (ready and active) can take, by their free host ports alone: what a new
/// service's replicas are checked against before it is created.
pub fn port_capacity(state: &ClusterState, placement: &Placement, ports_per_task: usize) -> u64 {
    if ports_per_task == 0 {
        return u64::MAX;
    }
    state
        .nodes()
        .filter(|n| node_schedulable(n) && constraints_hold(placement, n))
        .map(|n| {
            // A node whose agent has not reported yet counts with the default range (the
            // one the scheduler assumes too): a service created right after a join fits.
            let (min, max) = state
                .node_description(&n.id)
                .map_or(DEFAULT_PORT_RANGE, |d| (d.port_min, d.port_max));
            let range = u64::from(max.saturating_sub(min)) + 1;
            let used: u64 = state
                .tasks_on(&n.id)
                .filter(|t| !t.status.state.is_terminal())
                .map(|t| t.ports.len() as u64)
                .sum();
            range.saturating_sub(used) / ports_per_task as u64
        })
        .sum()
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
///
/// Per service, the filters that do not change as tasks are placed (ready and active, an
/// agent, constraints) run once per node; each task then takes the best of the eligible
/// nodes in one pass over plain vectors, what is left on the chosen node updated as it goes.
pub fn schedule(state: &ClusterState) -> Vec<TaskOp> {
    let nodes: Vec<&NodeRecord> = state.nodes().collect();
    let mut rooms: Vec<NodeRoom> = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let desc = state.node_description(&node.id);
        let mut room = NodeRoom {
            memory: desc.map(|d| d.memory_bytes),
            cpus: desc.map(|d| d.nano_cpus),
            ports: desc.map_or(DEFAULT_PORT_RANGE, |d| (d.port_min, d.port_max)),
            used_ports: BTreeSet::new(),
            total: 0,
            by_service: BTreeMap::new(),
        };
        // A task holds its node's memory, CPUs and ports until it has ended (a stopping
        // task still binds its port); only runnable ones count for spreading.
        for t in state
            .tasks_on(&node.id)
            .filter(|t| !t.status.state.is_terminal())
        {
            if t.is_runnable() {
                room.total += 1;
                *room.by_service.entry(t.service.clone()).or_default() += 1;
            }
            let r = &t.template.resources;
            if let (Some(m), Some(used)) = (room.memory.as_mut(), r.memory_bytes) {
                *m = m.saturating_sub(used);
            }
            if let (Some(c), Some(used)) = (room.cpus.as_mut(), r.nano_cpus) {
                *c = c.saturating_sub(used);
            }
            room.used_ports.extend(t.ports.iter().map(|p| p.port));
        }
        rooms.push(room);
    }
    let mut ops = Vec::new();
    // Pending tasks, oldest first, grouped by service.
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
        // Indices (into `nodes`) of the nodes the static filters let through.
        let mut eligible: Vec<usize> = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if !node_schedulable(node) {
                *static_rejects.entry(Filter::NotReady).or_default() += 1;
                continue;
            }
            if state.node_description(&node.id).is_none() {
                *static_rejects.entry(Filter::NoAgent).or_default() += 1;
                continue;
            }
            match placement.constraints.iter().position(|c| !holds(c, node)) {
                Some(c) => *static_rejects.entry(Filter::Constraint(c)).or_default() += 1,
                None => eligible.push(i),
            }
        }
        // Tasks of this service on each eligible node, and per spread-label value.
        let mut mine: Vec<u32> = eligible
            .iter()
            .map(|&i| rooms[i].by_service.get(service).copied().unwrap_or(0))
            .collect();
        let spread = placement.preferences.first().map(|p| p.label.as_str());
        let mut groups: Vec<usize> = Vec::with_capacity(eligible.len());
        let mut group_counts: Vec<u32> = Vec::new();
        if let Some(label) = spread {
            let mut ids: BTreeMap<Option<&str>, usize> = BTreeMap::new();
            for (k, &i) in eligible.iter().enumerate() {
                let value = nodes[i].labels.get(label).map(String::as_str);
                let next = ids.len();
                let g = *ids.entry(value).or_insert(next);
                if g == group_counts.len() {
                    group_counts.push(0);
                }
                group_counts[g] += mine[k];
                groups.push(g);
            }
        }
        for task in tasks {
            let res = &task.template.resources;
            let want_ports = task.template.ports.len();
            // A global task belongs to its node: only that node's room is checked.
            let pinned = match &task.slot {
                starling_state::Slot::Node(n) => Some(n.as_str()),
                starling_state::Slot::Number(_) => None,
            };
            let mut rejects = if pinned.is_some() {
                BTreeMap::new()
            } else {
                static_rejects.clone()
            };
            if let Some(n) = pinned
                && !eligible.iter().any(|&i| nodes[i].id == n)
            {
                *rejects.entry(Filter::NotReady).or_default() += 1;
            }
            let mut best: Option<(usize, (u32, u32, u32))> = None;
            for (k, &i) in eligible.iter().enumerate() {
                if pinned.is_some_and(|n| nodes[i].id != n) {
                    continue;
                }
                let room = &rooms[i];
                let key = (
                    if spread.is_some() {
                        group_counts[groups[k]]
                    } else {
                        0
                    },
                    mine[k],
                    room.total,
                );
                if best.is_some_and(|(_, b)| key >= b) {
                    continue;
                }
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
                } else if want_ports > 0 && free_ports(room, want_ports).is_none() {
                    Some(Filter::Ports)
                } else {
                    None
                };
                match fail {
                    Some(f) => *rejects.entry(f).or_default() += 1,
                    None => best = Some((k, key)),
                }
            }
            match best {
                Some((k, _)) => {
                    let i = eligible[k];
                    let room = &mut rooms[i];
                    let ports: Vec<AssignedPort> = free_ports(room, want_ports)
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
                    mine[k] += 1;
                    if spread.is_some() {
                        group_counts[groups[k]] += 1;
                    }
                    if let (Some(m), Some(used)) = (room.memory.as_mut(), res.memory_bytes) {
                        *m = m.saturating_sub(used);
                    }
                    if let (Some(c), Some(used)) = (room.cpus.as_mut(), res.nano_cpus) {
                        *c = c.saturating_sub(used);
                    }
                    ops.push(TaskOp::Assign {
                        task: task.id.clone(),
                        node: nodes[i].id.clone(),
                        ports,
                    });
                }
                None => {
                    // Nodes skipped as worse than the best never got here: with no best,
                    // every eligible node was checked and rejected.
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
