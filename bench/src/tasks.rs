//! Services and tasks with real processes on loopback: a manager (drained) and three workers,
//! each on its own 127.0.0.x. Measures `service create --replicas 100` until 100 tasks run,
//! and a worker killed -9 until all its tasks run elsewhere (median and max of `rounds`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use starling_api::{Client, ServiceSpec};

use crate::cluster::{Proc, free_port, poll, starling_binary};

struct Node {
    name: String,
    dir: PathBuf,
    addr: String,
    proc: Option<Proc>,
}

/// Kills every task process recorded under `base` (their process groups).
fn reap_tasks(base: &Path) {
    for node in std::fs::read_dir(base).into_iter().flatten().flatten() {
        starling_agent::exec::kill_recorded(&node.path().join("tasks"));
    }
}

fn running_on(list: &starling_api::TaskList) -> Vec<Option<String>> {
    list.tasks
        .iter()
        .filter(|t| t.state == "running" && t.desired_state == "running")
        .map(|t| t.node_hostname.clone())
        .collect()
}

/// CPU burners (`sh` busy loops), killed when dropped.
struct Burners(Vec<std::process::Child>);

impl Burners {
    /// One busy loop per CPU, plus one: every core is busy all the time.
    fn start() -> anyhow::Result<Burners> {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .context("cannot start a CPU burner")?,
            );
        }
        Ok(Burners(v))
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The measure; `rounds` worker kills, then `soak` at full CPU.
pub async fn run(
    base: &Path,
    rounds: usize,
    replicas: u32,
    soak: Duration,
) -> anyhow::Result<String> {
    let bin = starling_binary()?;
    std::fs::create_dir_all(base)?;
    let result = measure(&bin, base, rounds, replicas, soak).await;
    reap_tasks(base);
    result
}

async fn measure(
    bin: &Path,
    base: &Path,
    rounds: usize,
    replicas: u32,
    soak: Duration,
) -> anyhow::Result<String> {
    let mut nodes: Vec<Node> = (0..4)
        .map(|i| {
            let name = if i == 0 {
                "m1".to_owned()
            } else {
                format!("w{i}")
            };
            Ok(Node {
                dir: base.join(&name),
                addr: format!("127.0.0.{}:{}", i + 1, free_port()?),
                name,
                proc: None,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let spawn = |n: &Node, args: &[&str]| -> anyhow::Result<Proc> {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Proc::spawn(&mut cmd, &base.join(format!("{}.log", n.name)))
    };
    let m = &nodes[0];
    let proc = spawn(
        m,
        &[
            "init",
            "--data-dir",
            &m.dir.display().to_string(),
            "--listen",
            &m.addr,
            "--hostname",
            "m1",
        ],
    )?;
    nodes[0].proc = Some(proc);
    let api = Client::unix(nodes[0].dir.join("control.sock"));
    poll("the manager serves", Duration::from_secs(20), || async {
        api.info().await.ok()
    })
    .await?;
    let me = api.info().await?.node_id;
    api.set_availability(&me, starling_api::Availability::Drain)
        .await?;
    let token = api.join_token("worker").await?.token;
    let manager = nodes[0].addr.clone();
    for n in nodes.iter_mut().skip(1) {
        let p = spawn(
            n,
            &[
                "join",
                "--data-dir",
                &n.dir.display().to_string(),
                "--listen",
                &n.addr,
                "--hostname",
                &n.name,
                "--token",
                &token,
                "--manager",
                &manager,
            ],
        )?;
        n.proc = Some(p);
    }
    poll("three workers ready", Duration::from_secs(30), || async {
        let list = api.nodes().await.ok()?;
        (list
            .nodes
            .iter()
            .filter(|n| n.status == starling_api::NodeStatus::Ready)
            .count()
            == 4)
            .then_some(())
    })
    .await?;

    // service create --replicas N of `sleep` → N running.
    let spec = |name: &str, n: u32| -> anyhow::Result<ServiceSpec> {
        Ok(serde_json::from_value(serde_json::json!({
            "name": name, "replicas": n, "command": ["sleep", "100000"],
            "constraints": ["node.role==worker"]
        }))?)
    };
    let t0 = Instant::now();
    api.create_service(&spec("many", replicas)?).await?;
    poll("all replicas running", Duration::from_secs(120), || async {
        let list = api.tasks(Some("many"), None).await.ok()?;
        (running_on(&list).len() == replicas as usize).then_some(())
    })
    .await?;
    let create = t0.elapsed();
    api.remove_service("many").await?;
    poll("the replicas stopped", Duration::from_secs(60), || async {
        let list = api.tasks(Some("many"), None).await.ok()?;
        list.tasks.is_empty().then_some(())
    })
    .await
    .ok();

    // A worker killed -9, `rounds` times (another worker each time; it then comes back).
    api.create_service(&spec("six", 6)?).await?;
    poll("six running", Duration::from_secs(60), || async {
        let list = api.tasks(Some("six"), None).await.ok()?;
        (running_on(&list).len() == 6).then_some(())
    })
    .await?;
    let mut times = Vec::new();
    for round in 0..rounds {
        let victim = 1 + round % 3;
        let name = nodes[victim].name.clone();
        // The victim must hold tasks: wait until the service is spread over every worker.
        poll("tasks on the victim", Duration::from_secs(60), || async {
            let list = api.tasks(Some("six"), None).await.ok()?;
            let r = running_on(&list);
            (r.len() == 6 && r.iter().any(|n| n.as_deref() == Some(name.as_str()))).then_some(())
        })
        .await
        .with_context(|| format!("round {round}"))?;
        let killed = Instant::now();
        if let Some(p) = nodes[victim].proc.take() {
            p.kill();
        }
        poll(
            "its tasks running elsewhere",
            Duration::from_secs(60),
            || async {
                let list = api.tasks(Some("six"), None).await.ok()?;
                let r = running_on(&list);
                (r.len() == 6 && r.iter().all(|n| n.as_deref() != Some(name.as_str())))
                    .then_some(())
            },
        )
        .await
        .with_context(|| format!("round {round}"))?;
        times.push(killed.elapsed());
        let n = &nodes[victim];
        let p = spawn(n, &["run", "--data-dir", &n.dir.display().to_string()])?;
        nodes[victim].proc = Some(p);
        poll(
            "the worker ready again",
            Duration::from_secs(30),
            || async {
                let list = api.nodes().await.ok()?;
                list.nodes
                    .iter()
                    .any(|n| n.hostname == name && n.status == starling_api::NodeStatus::Ready)
                    .then_some(())
            },
        )
        .await?;
        // Rebalance for the next round: scale down and up so the scheduler spreads again.
        api.scale_service("six", 0).await?;
        poll("none running", Duration::from_secs(30), || async {
            let list = api.tasks(Some("six"), None).await.ok()?;
            running_on(&list).is_empty().then_some(())
        })
        .await?;
        api.scale_service("six", 6).await?;
    }
    // A rolling update of 30 replicas, parallelism 5, monitor 5 s (the defaults otherwise).
    let mut thirty = spec("thirty", 30)?;
    thirty.update.parallelism = 5;
    api.create_service(&thirty).await?;
    poll("thirty running", Duration::from_secs(120), || async {
        let list = api.tasks(Some("thirty"), None).await.ok()?;
        (running_on(&list).len() == 30).then_some(())
    })
    .await?;
    let current = api.service("thirty").await?;
    let mut next = current.spec.clone();
    next.env.insert("VERSION".into(), "2".into());
    let t0 = Instant::now();
    api.update_service("thirty", &next, Some(current.version))
        .await?;
    poll("the update completed", Duration::from_secs(300), || async {
        let v = api.service("thirty").await.ok()?;
        (v.update_status.as_ref()?.state == "completed").then_some(())
    })
    .await?;
    let update = t0.elapsed();
    let monitor = Duration::from_millis(next.update.monitor_ms);
    api.remove_service("thirty").await.ok();

    // Soak: every core busy for `soak`; nothing should be taken for dead or replaced.
    poll("six running", Duration::from_secs(60), || async {
        let list = api.tasks(Some("six"), None).await.ok()?;
        (running_on(&list).len() == 6).then_some(())
    })
    .await?;
    let before: std::collections::BTreeSet<String> = api
        .tasks(Some("six"), None)
        .await?
        .tasks
        .into_iter()
        .map(|t| t.id)
        .collect();
    let burners = Burners::start()?;
    let started = Instant::now();
    let (mut not_ready, mut checks) = (0usize, 0usize);
    while started.elapsed() < soak {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(list) = api.nodes().await {
            checks += 1;
            if list
                .nodes
                .iter()
                .any(|n| n.status != starling_api::NodeStatus::Ready)
            {
                not_ready += 1;
            }
        }
    }
    drop(burners);
    let after = api.tasks(Some("six"), None).await?.tasks;
    let replaced = after.iter().filter(|t| !before.contains(&t.id)).count();
    let running_after = running_on(&api.tasks(Some("six"), None).await?).len();
    api.remove_service("six").await.ok();
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok(format!(
        "## Services and tasks (processes on loopback)\n\nA manager (drained) and three workers, \
         each on its own 127.0.0.x; tasks are `sleep` processes.\n\n\
         | measure | figure | anchors |\n|---|---|---|\n\
         | `service create --replicas {replicas}` → {replicas} running | {:.2} s | |\n\
         | worker killed -9 → its tasks running elsewhere, median of {rounds} | **{:.2} s** (target ≤ 5 s) | SwarmKit ≈ 15–25 s, Nomad 20–30 s |\n\
         | same, max | {:.2} s | |\n\
         | rolling update of 30 replicas, parallelism 5, monitor {monitor_s} s, stop-first | \
         {update_s:.2} s (floor: 6 batches × monitor = {floor_s} s) | |\n\
         | {soak_s} s with every core busy ({cores} `sh` busy loops beside the cluster): tasks \
         replaced / checks of `node ls` with a node not ready | **{replaced}** / {not_ready} of \
         {checks} ({running_after} of 6 running at the end) | target 0 |\n\n\
         The floor of a kill: the agent session's silence threshold (2 s) plus a failed QUIC \
         probe (≤ 1.5 s, run while SWIM's own probes suspect the node: both are needed, so a \
         leader cut off from a worker but not from the others takes nothing for dead) plus the \
         liveness tick (≤ 1 s), then placement and start (≈ 0.1 s).\n\n",
        create.as_secs_f64(),
        at(0.5).as_secs_f64(),
        at(1.0).as_secs_f64(),
        soak_s = soak.as_secs(),
        monitor_s = monitor.as_secs(),
        update_s = update.as_secs_f64(),
        floor_s = 6 * monitor.as_secs(),
        cores = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1,
    ))
}
