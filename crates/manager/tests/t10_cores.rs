//! The orchestrator and the scheduler, driven in-process against the pure state machine with
//! a simulated agent: seeded random event orders (nodes dying and coming back, drains, tasks
//! failing, scaling) always converge to the declared number of running tasks, a slot never
//! holds two runnable tasks (but a start-first pair), and placements spread within one task.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use starling_manager::{OrchestratorConfig, reconcile, schedule};
use starling_state::{
    Availability, ClusterState, Command, NodeDescription, NodeRecord, NodeRole, NodeStatus,
    Outcome, Slot, Task, TaskReport, TaskState, TaskStatus,
};

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

struct Sim {
    s: ClusterState,
    rev: u64,
    now: u64,
}

impl Sim {
    fn apply(&mut self, cmd: Command) -> Outcome {
        self.rev += 1;
        self.s.apply(self.rev, &cmd).0.outcome
    }

    fn new(nodes: usize) -> Sim {
        let mut sim = Sim {
            s: ClusterState::new(),
            rev: 0,
            now: 1_000_000,
        };
        for i in 0..nodes {
            let id = format!("n{i}");
            sim.apply(Command::UpsertNode { node: node(&id) });
            sim.apply(Command::SetNodeDescription {
                id,
                description: NodeDescription {
                    memory_bytes: 1 << 34,
                    nano_cpus: 8_000_000_000,
                    port_min: 30_000,
                    port_max: 32_767,
                    isolation: "process-group".into(),
                },
            });
        }
        sim
    }

    fn service(&mut self, name: &str, replicas: u32) -> String {
        let spec: starling_api::ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": name, "replicas": replicas, "command": ["sleep", "1"],
            "restart_delay_ms": 0
        }))
        .unwrap();
        match self.apply(Command::CreateService {
            spec: spec.to_state().unwrap(),
            at: self.now,
        }) {
            Outcome::Service { service } => service.id,
            other => panic!("{other:?}"),
        }
    }

    /// One round of the leader (orchestrator and scheduler) and of every live agent.
    fn round(&mut self, cfg: &OrchestratorConfig) {
        self.now += 1_000;
        let plan = reconcile(&self.s, self.now, cfg);
        let mut ops = plan.ops;
        ops.extend(schedule(&self.s));
        if !ops.is_empty() {
            self.apply(Command::WriteTasks { at: self.now, ops });
        }
        // Agents of ready nodes: start what is assigned, stop what is no longer wanted.
        let mut by_node: BTreeMap<String, Vec<TaskReport>> = BTreeMap::new();
        for t in self.s.tasks() {
            let Some(n) = &t.node else { continue };
            if self.s.node(n).is_none_or(|r| r.status != NodeStatus::Ready) {
                continue;
            }
            let to = if t.desired <= TaskState::Running && t.status.state < TaskState::Running {
                // A program named `fail` fails at once.
                if t.template.process.argv.first().map(String::as_str) == Some("fail") {
                    TaskState::Failed
                } else {
                    TaskState::Running
                }
            } else if t.desired > TaskState::Running && !t.status.state.is_terminal() {
                TaskState::Shutdown
            } else {
                continue;
            };
            by_node.entry(n.clone()).or_default().push(TaskReport {
                task: t.id.clone(),
                status: TaskStatus::new(to, "", self.now),
            });
        }
        for (node, reports) in by_node {
            self.apply(Command::ReportTasks { node, reports });
        }
    }

    fn running(&self, service: &str) -> Vec<&Task> {
        self.s
            .tasks_of(service)
            .filter(|t| t.status.state == TaskState::Running && t.desired <= TaskState::Running)
            .collect()
    }

    /// A slot holds at most one runnable task, or a start-first pair.
    fn check_slots(&self) -> Result<(), String> {
        let mut slots: BTreeMap<(String, Slot), Vec<&Task>> = BTreeMap::new();
        for t in self.s.tasks().filter(|t| t.is_runnable()) {
            slots
                .entry((t.service.clone(), t.slot.clone()))
                .or_default()
                .push(t);
        }
        for ts in slots.values() {
            let pair = ts.len() == 2
                && (ts[1].replaces.as_ref() == Some(&ts[0].id)
                    || ts[0].replaces.as_ref() == Some(&ts[1].id));
            if ts.len() > 1 && !pair {
                return Err(format!("slot with {} runnable tasks: {ts:#?}", ts.len()));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Event {
    NodeDown(usize),
    NodeBack(usize),
    Drain(usize),
    Activate(usize),
    Fail(usize),
    Scale(u32),
    Round,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0usize..4).prop_map(Event::NodeDown),
        (0usize..4).prop_map(Event::NodeBack),
        (0usize..4).prop_map(Event::Drain),
        (0usize..4).prop_map(Event::Activate),
        (0usize..16).prop_map(Event::Fail),
        (0u32..8).prop_map(Event::Scale),
        Just(Event::Round),
        Just(Event::Round),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_event_order_converges_and_slots_stay_single(events in prop::collection::vec(event(), 0..40)) {
        let cfg = OrchestratorConfig::default();
        let mut sim = Sim::new(4);
        let svc = sim.service("web", 4);
        let mut replicas = 4;
        for e in &events {
            match e {
                Event::NodeDown(i) => { sim.apply(Command::SetNodeStatus { id: format!("n{i}"), status: NodeStatus::Down }); }
                Event::NodeBack(i) => { sim.apply(Command::SetNodeStatus { id: format!("n{i}"), status: NodeStatus::Ready }); }
                Event::Drain(i) => { sim.apply(Command::SetNodeAvailability { id: format!("n{i}"), availability: Availability::Drain }); }
                Event::Activate(i) => { sim.apply(Command::SetNodeAvailability { id: format!("n{i}"), availability: Availability::Active }); }
                Event::Fail(k) => {
                    let victim = sim.running(&svc).get(*k % 4).map(|t| (t.id.clone(), t.node.clone().unwrap()));
                    if let Some((task, node)) = victim {
                        sim.apply(Command::ReportTasks { node, reports: vec![TaskReport {
                            task, status: TaskStatus::new(TaskState::Failed, "exit code 1", sim.now) }] });
                    }
                }
                Event::Scale(n) => {
                    let mut spec = sim.s.service(&svc).unwrap().spec.clone();
                    spec.mode = starling_state::ServiceMode::Replicated { replicas: *n };
                    replicas = *n;
                    sim.apply(Command::UpdateService { id: svc.clone(), spec, expected_version: 0, at: sim.now });
                }
                Event::Round => sim.round(&cfg),
            }
            sim.check_slots().map_err(TestCaseError::fail)?;
        }
        // Every node back and active: the service converges.
        for i in 0..4 {
            sim.apply(Command::SetNodeStatus { id: format!("n{i}"), status: NodeStatus::Ready });
            sim.apply(Command::SetNodeAvailability { id: format!("n{i}"), availability: Availability::Active });
        }
        for _ in 0..12 {
            sim.round(&cfg);
            sim.check_slots().map_err(TestCaseError::fail)?;
        }
        prop_assert_eq!(sim.running(&svc).len(), replicas as usize);
        // And stays put: a converged state plans nothing.
        let plan = reconcile(&sim.s, sim.now, &cfg);
        prop_assert!(plan.ops.is_empty() && schedule(&sim.s).is_empty(), "{:?}", plan.ops);
    }

    #[test]
    fn placements_spread_within_one(nodes in 1usize..12, replicas in 0u32..60) {
        let cfg = OrchestratorConfig::default();
        let mut sim = Sim::new(nodes);
        let svc = sim.service("web", replicas);
        for _ in 0..3 {
            sim.round(&cfg);
        }
        let running = sim.running(&svc);
        prop_assert_eq!(running.len(), replicas as usize);
        let mut per: BTreeMap<String, usize> = (0..nodes).map(|i| (format!("n{i}"), 0)).collect();
        for t in &running {
            *per.get_mut(t.node.as_ref().unwrap()).unwrap() += 1;
        }
        let (lo, hi) = (per.values().min().unwrap(), per.values().max().unwrap());
        prop_assert!(hi - lo <= 1, "{per:?}");
    }
}

#[test]
fn a_drained_single_replica_keeps_a_running_task_at_every_step() {
    let cfg = OrchestratorConfig {
        drain_monitor_ms: 0,
        ..OrchestratorConfig::default()
    };
    let mut sim = Sim::new(2);
    let svc = sim.service("one", 1);
    sim.round(&cfg);
    sim.round(&cfg);
    let on = sim.running(&svc)[0].node.clone().unwrap();
    sim.apply(Command::SetNodeAvailability {
        id: on.clone(),
        availability: Availability::Drain,
    });
    for _ in 0..6 {
        sim.round(&cfg);
        assert!(
            !sim.running(&svc).is_empty(),
            "no running task during the drain"
        );
    }
    let now_on = sim.running(&svc);
    assert_eq!(now_on.len(), 1);
    assert_ne!(now_on[0].node.as_ref(), Some(&on));
}

#[test]
fn a_constraint_no_node_meets_is_explained_and_retried() {
    let cfg = OrchestratorConfig::default();
    let mut sim = Sim::new(3);
    let spec: starling_api::ServiceSpec = serde_json::from_value(serde_json::json!({
        "name": "picky", "replicas": 1, "command": ["x"],
        "constraints": ["node.labels.zone==b"], "memory_bytes": 1u64 << 40
    }))
    .unwrap();
    let Outcome::Service { service } = sim.apply(Command::CreateService {
        spec: spec.to_state().unwrap(),
        at: 0,
    }) else {
        panic!()
    };
    sim.round(&cfg);
    sim.round(&cfg);
    let t = sim.s.tasks_of(&service.id).next().unwrap();
    assert_eq!(
        t.pending_reason.as_deref(),
        Some("no suitable node (constraint node.labels.zone==b: 3 nodes)")
    );
    sim.apply(Command::SetNodeLabels {
        id: "n1".into(),
        add: [("zone".to_owned(), "b".to_owned())].into(),
        remove: vec![],
    });
    sim.round(&cfg);
    let t = sim.s.tasks_of(&service.id).next().unwrap();
    assert_eq!(
        t.pending_reason.as_deref(),
        Some("no suitable node (constraint node.labels.zone==b: 2 nodes; memory: 1 node)")
    );
}

#[test]
fn global_tasks_get_their_ports_and_wait_for_room_on_their_own_node() {
    let cfg = OrchestratorConfig::default();
    let mut sim = Sim::new(3);
    // n2 has too little memory for the service.
    sim.apply(Command::SetNodeDescription {
        id: "n2".into(),
        description: NodeDescription {
            memory_bytes: 1 << 20,
            nano_cpus: 1_000_000_000,
            port_min: 40_000,
            port_max: 40_010,
            isolation: "process-group".into(),
        },
    });
    let spec: starling_api::ServiceSpec = serde_json::from_value(serde_json::json!({
        "name": "agent", "mode": "global", "command": ["x"],
        "memory_bytes": 1u64 << 30,
        "ports": [{"name": "HTTP", "protocol": "tcp"}]
    }))
    .unwrap();
    let Outcome::Service { service } = sim.apply(Command::CreateService {
        spec: spec.to_state().unwrap(),
        at: 0,
    }) else {
        panic!()
    };
    sim.round(&cfg);
    sim.round(&cfg);
    let tasks: Vec<&Task> = sim.s.tasks_of(&service.id).collect();
    assert_eq!(tasks.len(), 3, "{tasks:#?}");
    for t in &tasks {
        let Slot::Node(pinned) = &t.slot else {
            panic!("{t:?}")
        };
        if pinned == "n2" {
            assert_eq!(t.status.state, TaskState::Pending);
            assert_eq!(t.node, None);
            assert_eq!(
                t.pending_reason.as_deref(),
                Some("no suitable node (memory: 1 node)")
            );
        } else {
            assert_eq!(t.node.as_ref(), Some(pinned), "placed on its own node");
            assert_eq!(t.status.state, TaskState::Running);
            assert_eq!(t.ports.len(), 1);
            assert!((30_000..=32_767).contains(&t.ports[0].port));
        }
    }
}

#[test]
fn an_update_goes_in_batches_pauses_on_a_failure_and_a_rollback_leaves_untouched_slots() {
    let cfg = OrchestratorConfig::default();
    let mut sim = Sim::new(3);
    let id = sim.service("web", 6);
    for _ in 0..3 {
        sim.round(&cfg);
    }
    assert_eq!(sim.running(&id).len(), 6);
    let update = |sim: &mut Sim, argv: &[&str]| {
        let svc = sim.s.service(&id).unwrap().clone();
        let mut spec = svc.spec.clone();
        spec.task.process.argv = argv.iter().map(|a| a.to_string()).collect();
        spec.update.parallelism = 2;
        spec.update.monitor_ms = 1_500;
        let now = sim.now;
        sim.apply(Command::UpdateService {
            id: id.clone(),
            spec,
            expected_version: svc.version,
            at: now,
        });
    };
    update(&mut sim, &["sleep", "2"]);
    let new = |sim: &Sim| {
        let svc = sim.s.service(&id).unwrap();
        sim.s
            .tasks_of(&id)
            .filter(|t| t.template == svc.spec.task)
            .count()
    };
    let mut last = 0;
    for _ in 0..30 {
        sim.round(&cfg);
        let n = new(&sim);
        assert!(n - last <= 2, "{} new tasks in one round", n - last);
        last = n;
        sim.check_slots().unwrap();
    }
    let svc = sim.s.service(&id).unwrap().clone();
    assert_eq!(
        svc.update_status.as_ref().unwrap().state,
        starling_state::UpdateState::Completed
    );
    assert_eq!(new(&sim), 6, "each slot replaced once");
    assert_eq!(sim.running(&id).len(), 6);
    let before: Vec<String> = sim.running(&id).iter().map(|t| t.id.clone()).collect();

    // A failing program: paused after the first batch, the other slots untouched.
    update(&mut sim, &["fail"]);
    for _ in 0..10 {
        sim.round(&cfg);
    }
    let svc = sim.s.service(&id).unwrap().clone();
    let status = svc.update_status.clone().unwrap();
    assert_eq!(
        status.state,
        starling_state::UpdateState::Paused,
        "{status:?}"
    );
    assert!(status.message.contains("failed"), "{status:?}");
    let kept = sim
        .running(&id)
        .iter()
        .filter(|t| before.contains(&t.id))
        .count();
    assert_eq!(kept, 4, "only the first batch was touched");

    // Rolled back: the two slots return, the four untouched tasks stay as they are.
    let now = sim.now;
    sim.apply(Command::RollbackService {
        id: id.clone(),
        at: now,
    });
    for _ in 0..20 {
        sim.round(&cfg);
        sim.check_slots().unwrap();
    }
    let svc = sim.s.service(&id).unwrap().clone();
    assert_eq!(
        svc.update_status.as_ref().unwrap().state,
        starling_state::UpdateState::RolledBack
    );
    let running = sim.running(&id);
    assert_eq!(running.len(), 6);
    assert_eq!(running.iter().filter(|t| before.contains(&t.id)).count(), 4);
    assert!(running.iter().all(|t| t.template == svc.spec.task));
}

#[test]
fn a_start_first_replacement_waits_for_its_health_check_to_pass() {
    let cfg = OrchestratorConfig {
        drain_monitor_ms: 0,
        ..OrchestratorConfig::default()
    };
    let mut sim = Sim::new(2);
    let spec: starling_api::ServiceSpec = serde_json::from_value(serde_json::json!({
        "name": "checked", "replicas": 1, "command": ["sleep", "1"],
        "health_check": {"type": "command", "command": ["true"]}
    }))
    .unwrap();
    let Outcome::Service { service } = sim.apply(Command::CreateService {
        spec: spec.to_state().unwrap(),
        at: sim.now,
    }) else {
        panic!("not created");
    };
    sim.round(&cfg);
    sim.round(&cfg);
    let old = sim.running(&service.id)[0].clone();
    sim.apply(Command::SetNodeAvailability {
        id: old.node.clone().unwrap(),
        availability: Availability::Drain,
    });
    // The replacement runs, but no check has passed: the old task keeps serving.
    for _ in 0..5 {
        sim.round(&cfg);
        assert_eq!(
            sim.s.task(&old.id).unwrap().desired,
            TaskState::Running,
            "the old task was stopped before its replacement was healthy"
        );
    }
    let new = sim
        .running(&service.id)
        .into_iter()
        .find(|t| t.id != old.id)
        .cloned()
        .expect("a replacement runs");
    assert!(!new.is_ready());
    sim.apply(Command::ReportTasks {
        node: new.node.clone().unwrap(),
        reports: vec![TaskReport {
            task: new.id.clone(),
            status: TaskStatus {
                health: Some(starling_state::TaskHealth::Healthy),
                ..TaskStatus::new(TaskState::Running, "", sim.now)
            },
        }],
    });
    let new = sim.s.task(&new.id).unwrap();
    assert!(
        new.is_ready(),
        "the health report applies to a running task"
    );
    sim.round(&cfg);
    assert!(sim.s.task(&old.id).unwrap().desired > TaskState::Running);
}
