//! Services and tasks with real processes on loopback: a manager (drained) and three workers,
//! each on its own 127.0.0.x. Measures `service create --replicas 100` until 100 tasks run,
//! and a worker killed -9 until all its tasks run elsewhere (median and max of `rounds`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use starling_api::{Client, ServiceSpec};

use crate::cluster::{Proc, exited, free_port, poll, ready_nodes, starling_binary};

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
    quick: bool,
) -> anyhow::Result<String> {
    let bin = starling_binary()?;
    std::fs::create_dir_all(base)?;
    let result = measure(&bin, base, rounds, replicas, soak, quick).await;
    reap_tasks(base);
    result
}

async fn measure(
    bin: &Path,
    base: &Path,
    rounds: usize,
    replicas: u32,
    soak: Duration,
    quick: bool,
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
    // The manager and three workers; a node that exits ends the wait with its log.
    ready_nodes(&api, None, 4, Duration::from_secs(30), || {
        exited(
            base,
            nodes
                .iter_mut()
                .filter_map(|n| Some((n.name.as_str(), n.proc.as_mut()?))),
        )
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
    let (mut times, mut hidden_times, mut down_times) = (Vec::new(), Vec::new(), Vec::new());
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
        let victim_id = api
            .nodes()
            .await?
            .nodes
            .into_iter()
            .find(|n| n.hostname == name)
            .map(|n| n.id)
            .context("the victim's node id")?;
        let others: Vec<Client> = (0..nodes.len())
            .filter(|i| *i != victim)
            .map(|i| Client::unix(nodes[i].dir.join("control.sock")))
            .collect();
        let killed = Instant::now();
        if let Some(p) = nodes[victim].proc.take() {
            p.kill();
        }
        // Three clocks from the kill: its endpoints hidden on every other node (what their
        // DNS serves: the passing endpoints of their gossip state), the node `down` in
        // `node ls`, and its tasks running elsewhere.
        let (mut hidden_at, mut down_at, mut moved_at) = (None, None, None);
        while hidden_at.is_none() || down_at.is_none() || moved_at.is_none() {
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "round {round}: not hidden, down and moved within 60 s \
                 ({hidden_at:?}, {down_at:?}, {moved_at:?})"
            );
            if hidden_at.is_none() {
                let mut all = true;
                for c in &others {
                    let shown = match c.service_endpoints("six", true, None, None).await {
                        Ok(l) => l.endpoints.iter().any(|e| e.node == victim_id),
                        Err(_) => true,
                    };
                    all &= !shown;
                }
                if all {
                    hidden_at = Some(killed.elapsed());
                }
            }
            if down_at.is_none()
                && api.nodes().await.is_ok_and(|l| {
                    l.nodes
                        .iter()
                        .any(|n| n.id == victim_id && n.status == starling_api::NodeStatus::Down)
                })
            {
                down_at = Some(killed.elapsed());
            }
            if moved_at.is_none()
                && api.tasks(Some("six"), None).await.is_ok_and(|list| {
                    let r = running_on(&list);
                    r.len() == 6 && r.iter().all(|n| n.as_deref() != Some(name.as_str()))
                })
            {
                moved_at = Some(killed.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        hidden_times.extend(hidden_at);
        down_times.extend(down_at);
        times.extend(moved_at);
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
    // A rolling update of 30 replicas (quick: 10), parallelism 5, monitor 5 s (the defaults
    // otherwise).
    let updated = if quick { 10 } else { 30 };
    let mut thirty = spec("thirty", updated)?;
    thirty.update.parallelism = 5;
    api.create_service(&thirty).await?;
    poll("thirty running", Duration::from_secs(120), || async {
        let list = api.tasks(Some("thirty"), None).await.ok()?;
        (running_on(&list).len() == updated as usize).then_some(())
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
    let logs = logs(&api, if quick { 10_000 } else { 100_000 }).await?;

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
    hidden_times.sort();
    down_times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let mid_max = |v: &[Duration]| match (v.get(v.len() / 2), v.last()) {
        (Some(m), Some(x)) => format!("{:.2} s, {:.2} s", m.as_secs_f64(), x.as_secs_f64()),
        _ => "not measured".to_owned(),
    };
    Ok(format!(
        "## Services and tasks (processes on loopback)\n\nA manager (drained) and three workers, \
         each on its own 127.0.0.x; tasks are `sleep` processes.\n\n\
         | measure | figure | anchors |\n|---|---|---|\n\
         | `service create --replicas {replicas}` → {replicas} running | {:.2} s | |\n\
         | worker killed -9 → its tasks running elsewhere, median of {rounds} | **{:.2} s** (target ≤ 5 s) | SwarmKit ≈ 15–25 s, Nomad 20–30 s |\n\
         | same, max | {:.2} s | |\n\
         | worker killed -9 → its endpoints hidden on every other node (median, max of {rounds}) | {hidden} (target ≤ 3 s) | |\n\
         | worker killed -9 → `down` in `node ls` (median, max) | {down} (target ≤ 5 s) | |\n\
         | rolling update of {updated} replicas, parallelism 5, monitor {monitor_s} s, stop-first | \
         {update_s:.2} s (floor: {batches} batches × monitor = {floor_s} s) | |\n\
         {logs}\
         | {soak_s} s with every core busy ({cores} `sh` busy loops beside the cluster): tasks \
         replaced / checks of `node ls` with a node not ready | **{replaced}** / {not_ready} of \
         {checks} ({running_after} of 6 running at the end) | target 0 |\n\n\
         The floor of a kill: the agent session's silence threshold (2 s) plus a failed QUIC \
         probe (≤ 1.5 s, run while SWIM's own probes suspect the node: both are needed, so a \
         leader cut off from a worker but not from the others takes nothing for dead) plus the \
         liveness tick (≤ 0.5 s), then placement and start (≈ 0.1 s); or, when the worker's \
         session is with another manager, SWIM's Down (a failed probe, then 2.5 s without an \
         answer) and 1 s. Hiding needs only the suspicion.\n\n",
        create.as_secs_f64(),
        at(0.5).as_secs_f64(),
        at(1.0).as_secs_f64(),
        soak_s = soak.as_secs(),
        monitor_s = monitor.as_secs(),
        update_s = update.as_secs_f64(),
        batches = updated.div_ceil(5),
        floor_s = u64::from(updated.div_ceil(5)) * monitor.as_secs(),
        cores = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1,
        hidden = mid_max(&hidden_times),
        down = mid_max(&down_times),
    ))
}

/// `service logs` through the drained manager (every line fetched from a worker over
/// `starling/logs/1`): the backlog of 6 tasks that wrote `lines` lines each, then a follow of
/// 6 tasks writing as fast as `sh` and `seq` go, for 10 s. Table rows.
async fn logs(api: &Client, lines: u64) -> anyhow::Result<String> {
    let spec = |name: &str, script: String| -> anyhow::Result<ServiceSpec> {
        Ok(serde_json::from_value(serde_json::json!({
            "name": name, "replicas": 6, "command": ["sh", "-c", script],
            "constraints": ["node.role==worker"]
        }))?)
    };
    api.create_service(&spec(
        "backlog",
        format!("seq 1 {lines}; exec sleep 100000"),
    )?)
    .await?;
    let all = lines * 6;
    poll("every line written", Duration::from_secs(120), || async {
        (count_lines(api, "backlog").await? == all).then_some(())
    })
    .await?;
    let t0 = Instant::now();
    let n = count_lines(api, "backlog").await.unwrap_or(0);
    let backlog = t0.elapsed();
    api.remove_service("backlog").await?;

    api.create_service(&spec(
        "stream",
        "i=0; while :; do seq $i $((i+199)); i=$((i+200)); sleep 0.1; done".to_owned(),
    )?)
    .await?;
    poll("six streaming", Duration::from_secs(60), || async {
        let list = api.tasks(Some("stream"), None).await.ok()?;
        (running_on(&list).len() == 6).then_some(())
    })
    .await?;
    let follow = starling_api::LogsQuery {
        follow: true,
        tail: Some(0),
        since_ms: None,
    };
    let mut r = api.service_logs("stream", &follow).await?;
    let window = Duration::from_secs(10);
    let t0 = Instant::now();
    let (mut got, mut gaps) = (0u64, 0u64);
    let mut last: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut first: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    while t0.elapsed() < window {
        let Ok(Ok(Some(rec))) = tokio::time::timeout(Duration::from_secs(5), r.next()).await else {
            break;
        };
        if let starling_api::LogRecord::Line { task, line, .. } = rec {
            got += 1;
            let Ok(v) = line.trim().parse::<u64>() else {
                continue;
            };
            first.entry(task.clone()).or_insert(v);
            if let Some(prev) = last.insert(task, v)
                && v != prev + 1
            {
                gaps += 1;
            }
        }
    }
    let followed = t0.elapsed();
    // What the tasks wrote meanwhile, from their sequences.
    let written: u64 = last
        .iter()
        .map(|(t, v)| v + 1 - first.get(t).copied().unwrap_or(*v))
        .sum();
    drop(r);
    api.remove_service("stream").await?;
    Ok(format!(
        "| `service logs` of 6 tasks ({all} lines, backlog) through the manager | **{:.0} lines/s** ({n} lines in {:.2} s) | |\n\
         | `service logs --follow` of 6 tasks each writing 200 lines every 0.1 s, {} s | **{:.0} lines/s** delivered ({got} of the {written} lines written in the window), {gaps} gaps in the tasks' sequences | |\n",
        n as f64 / backlog.as_secs_f64(),
        backlog.as_secs_f64(),
        window.as_secs(),
        got as f64 / followed.as_secs_f64(),
    ))
}

/// The lines a full (not followed) `service logs` of `service` returns.
async fn count_lines(api: &Client, service: &str) -> Option<u64> {
    let q = starling_api::LogsQuery::default();
    let mut r = api.service_logs(service, &q).await.ok()?;
    let mut n = 0u64;
    while let Ok(Some(rec)) = r.next().await {
        if matches!(rec, starling_api::LogRecord::Line { .. }) {
            n += 1;
        }
    }
    Some(n)
}
