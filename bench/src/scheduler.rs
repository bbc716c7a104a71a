//! The scheduler in process: placements per second for many tasks on many simulated nodes,
//! and the replicated state's memory per 10 000 tasks.

use std::collections::BTreeMap;
use std::time::Instant;

use starling_manager::{OrchestratorConfig, reconcile, schedule};
use starling_state::{
    Availability, ClusterState, Command, NodeDescription, NodeRecord, NodeRole, NodeStatus,
    Outcome, TaskOp,
};

/// Places `tasks` replicas on `nodes` nodes; returns the report section.
pub fn run(nodes: usize, tasks: u32) -> anyhow::Result<String> {
    let mut s = ClusterState::new();
    let mut rev = 0u64;
    let mut apply = |s: &mut ClusterState, cmd: Command| {
        rev += 1;
        s.apply(rev, &cmd).0.outcome
    };
    for i in 0..nodes {
        let id = format!("node{i:05}");
        apply(
            &mut s,
            Command::UpsertNode {
                node: NodeRecord {
                    id: id.clone(),
                    hostname: id.clone(),
                    addr: "127.0.0.1:1".into(),
                    role: NodeRole::Worker,
                    desired_role: NodeRole::Worker,
                    availability: Availability::Active,
                    status: NodeStatus::Ready,
                    labels: BTreeMap::from([("zone".to_owned(), format!("z{}", i % 3))]),
                    cert_serial: "01".into(),
                    cert_not_after: 0,
                    cert_ca: String::new(),
                    cert_key: String::new(),
                    version: 0,
                    created_revision: 0,
                    updated_revision: 0,
                },
            },
        );
        apply(
            &mut s,
            Command::SetNodeDescription {
                id,
                description: NodeDescription {
                    memory_bytes: 64 << 30,
                    nano_cpus: 32_000_000_000,
                    port_min: 30_000,
                    port_max: 32_767,
                    isolation: "process-group".into(),
                },
            },
        );
    }
    let spec: starling_api::ServiceSpec = serde_json::from_value(serde_json::json!({
        "name": "bench", "replicas": tasks, "command": ["sleep", "1000"],
        "memory_bytes": 1u64 << 20
    }))?;
    let spec = spec.to_state().map_err(anyhow::Error::msg)?;
    let Outcome::Service { .. } = apply(&mut s, Command::CreateService { spec, at: 0 }) else {
        anyhow::bail!("the service was not created");
    };
    let rss_before = crate::machine::rss_kib();
    let t0 = Instant::now();
    let plan = reconcile(&s, 0, &OrchestratorConfig::default());
    let orchestrate = t0.elapsed();
    let created = plan.ops.len();
    let t1 = Instant::now();
    for chunk in plan.ops.chunks(2_000) {
        apply(
            &mut s,
            Command::WriteTasks {
                at: 0,
                ops: chunk.to_vec(),
            },
        );
    }
    let apply_create = t1.elapsed();
    let rss_tasks = crate::machine::rss_kib().saturating_sub(rss_before);
    let t2 = Instant::now();
    let placements = schedule(&s);
    let sched = t2.elapsed();
    let placed = placements
        .iter()
        .filter(|o| matches!(o, TaskOp::Assign { .. }))
        .count();
    let t3 = Instant::now();
    for chunk in placements.chunks(2_000) {
        apply(
            &mut s,
            Command::WriteTasks {
                at: 0,
                ops: chunk.to_vec(),
            },
        );
    }
    let apply_assign = t3.elapsed();
    let per_s = placed as f64 / sched.as_secs_f64();
    let per_s_with_apply = placed as f64 / (sched + apply_assign).as_secs_f64();
    Ok(format!(
        "## Scheduler (in process)\n\n{tasks} replicas of one service on {nodes} simulated nodes \
         (1 MiB each, fewest tasks of the service first).\n\n\
         | step | time | rate |\n|---|---|---|\n\
         | orchestrator: {created} creations planned | {:.1} ms | |\n\
         | apply the creations (2 000 per entry) | {:.1} ms | |\n\
         | scheduler: {placed} placements decided | {:.1} ms | **{:.0} placements/s** (target ≥ 20 000) |\n\
         | apply the placements (2 000 per entry) | {:.1} ms | {:.0} placements/s decided and applied |\n\n\
         The state's memory for these tasks: {:.1} MiB RSS, {:.2} MiB per 10 000 tasks \
         (process RSS before and after the creations were applied).\n\n",
        orchestrate.as_secs_f64() * 1e3,
        apply_create.as_secs_f64() * 1e3,
        sched.as_secs_f64() * 1e3,
        per_s,
        apply_assign.as_secs_f64() * 1e3,
        per_s_with_apply,
        rss_tasks as f64 / 1024.0,
        rss_tasks as f64 / 1024.0 / (f64::from(tasks) / 10_000.0),
    ))
}
