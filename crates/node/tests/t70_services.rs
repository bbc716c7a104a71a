//! Services and tasks with real processes on loopback (each test's nodes on their own
//! 127.0.<n>.x addresses): placement and spreading, tasks that
//! answer on their ports, a worker killed -9 (its tasks run elsewhere, nothing runs twice
//! after it returns), restart policies, scaling, global services, constraints and the
//! `no suitable node` explanation.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use starling_api::{Client, ServiceSpec, TaskView};

mod common;
use common::{Daemon, free_port, poll, rt, spawn, starling};

/// Kills every task process the agents under `root` recorded (their process groups), so a
/// failing test leaves nothing running.
struct TaskReaper(PathBuf);

impl Drop for TaskReaper {
    fn drop(&mut self) {
        for node in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            starling_agent::exec::kill_recorded(&node.path().join("tasks"));
        }
    }
}

struct Cluster {
    daemons: BTreeMap<String, Daemon>,
    dirs: BTreeMap<String, PathBuf>,
    addrs: BTreeMap<String, String>,
    token: String,
    /// Its nodes are on 127.0.<net>.x: tests running at once never share an address, so
    /// their tasks never compete for a port.
    net: u8,
    _reaper: TaskReaper,
    tmp: tempfile::TempDir,
}

impl Cluster {
    fn dir(&self, name: &str) -> &Path {
        &self.dirs[name]
    }

    fn client(&self) -> Client {
        Client::unix(self.dir("m1").join("control.sock"))
    }

    /// Each node on its own loopback address (127.0.0.2, .3, …), as if on its own host: its
    /// tasks bind to it, so two nodes may give the same port number.
    fn join(&mut self, name: &str) {
        let dir = self.tmp.path().join(name);
        let addr = format!("127.0.{}.{}:{}", self.net, self.dirs.len() + 1, free_port());
        let d = spawn(&[
            "join",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &addr,
            "--hostname",
            name,
            "--dns-listen",
            &format!("127.0.{}.{}:8600", self.net, self.dirs.len() + 1),
            "--token",
            &self.token,
            "--manager",
            &self.addrs["m1"],
        ]);
        self.daemons.insert(name.to_owned(), d);
        self.dirs.insert(name.to_owned(), dir);
        self.addrs.insert(name.to_owned(), addr);
    }

    fn restart(&mut self, name: &str) {
        let d = spawn(&["run", "--data-dir", self.dirs[name].to_str().unwrap()]);
        self.daemons.insert(name.to_owned(), d);
    }
}

/// A manager (drained: it runs no tasks) and three workers, all ready.
fn cluster() -> Cluster {
    cluster_of(0, 1, 3)
}

/// `managers` managers (drained: they run no tasks) and `workers` workers on 127.0.`net`.x,
/// all ready.
fn cluster_of(net: u8, managers: usize, workers: usize) -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let m1 = tmp.path().join("m1");
    let addr = format!("127.0.{net}.1:{}", free_port());
    let d = spawn(&[
        "init",
        "--data-dir",
        m1.to_str().unwrap(),
        "--listen",
        &addr,
        "--hostname",
        "m1",
        "--dns-listen",
        &format!("127.0.{net}.1:8600"),
    ]);
    let rt = rt();
    let c0 = Client::unix(m1.join("control.sock"));
    poll("m1 serves", Duration::from_secs(20), || {
        rt.block_on(c0.nodes()).ok()
    });
    let token = rt.block_on(c0.join_token("worker")).unwrap().token;
    let manager_token = rt.block_on(c0.join_token("manager")).unwrap().token;
    let mut c = Cluster {
        daemons: BTreeMap::from([("m1".to_owned(), d)]),
        dirs: BTreeMap::from([("m1".to_owned(), m1)]),
        addrs: BTreeMap::from([("m1".to_owned(), addr)]),
        token: manager_token,
        net,
        _reaper: TaskReaper(tmp.path().to_owned()),
        tmp,
    };
    for i in 2..=managers {
        c.join(&format!("m{i}"));
    }
    c.token = token;
    for i in 1..=workers {
        c.join(&format!("w{i}"));
    }
    poll("every node ready", Duration::from_secs(30), || {
        let list = rt.block_on(c0.nodes()).ok()?;
        let voters = list
            .nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.manager_status,
                    Some(
                        starling_api::ManagerStatus::Leader
                            | starling_api::ManagerStatus::Reachable
                    )
                )
            })
            .count();
        (voters == managers
            && list
                .nodes
                .iter()
                .filter(|n| n.status == starling_api::NodeStatus::Ready)
                .count()
                == managers + workers)
            .then_some(list)
    });
    // Ready to run tasks: every node's agent has reported its machine (the scheduler places
    // nothing on a node before that).
    poll("every agent reported", Duration::from_secs(30), || {
        let list = rt.block_on(c0.nodes()).ok()?;
        list.nodes
            .iter()
            .all(|n| {
                rt.block_on(c0.node(&n.id))
                    .is_ok_and(|d| d.machine.is_some())
            })
            .then_some(())
    });
    for n in rt.block_on(c0.nodes()).unwrap().nodes {
        if n.role == starling_api::NodeRole::Manager {
            rt.block_on(c0.set_availability(&n.id, starling_api::Availability::Drain))
                .unwrap();
        }
    }
    c
}

fn spec(name: &str, replicas: u32, command: &[&str]) -> ServiceSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "replicas": replicas,
        "command": command,
    }))
    .unwrap()
}

fn running(tasks: &[TaskView]) -> Vec<&TaskView> {
    tasks
        .iter()
        .filter(|t| t.state == "running" && t.desired_state == "running")
        .collect()
}

fn per_node(tasks: &[&TaskView]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in tasks {
        *m.entry(t.node_hostname.clone().unwrap_or_default())
            .or_default() += 1;
    }
    m
}

#[test]
fn t70_services_place_run_recover_restart_scale_and_explain() {
    let mut c = cluster();
    let rt = rt();
    let api = c.client();

    // Six replicas of an HTTP server on three workers: two each, each answering on its port.
    let mut web = spec(
        "web",
        6,
        &[
            "python3",
            "-c",
            "import http.server,os; http.server.HTTPServer((os.environ['STARLING_HOST_IP'], int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler).serve_forever()",
        ],
    );
    web.ports = vec![starling_api::PortRequest {
        name: "HTTP".into(),
        protocol: "tcp".into(),
    }];
    web.constraints = vec!["node.role==worker".into()];
    rt.block_on(api.create_service(&web)).unwrap();
    let tasks = poll("six web tasks running", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
        (running(&list.tasks).len() == 6).then_some(list.tasks)
    });
    let spread = per_node(&running(&tasks));
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{spread:?}"
    );
    for t in running(&tasks) {
        let port = t.ports[0].port;
        poll(
            "the task answers on its port",
            Duration::from_secs(20),
            || {
                let ip = c.addrs[t.node_hostname.as_deref().unwrap()]
                    .split(':')
                    .next()
                    .unwrap()
                    .to_owned();
                std::net::TcpStream::connect((ip.as_str(), port)).ok()
            },
        );
    }
    let out = starling(&["service", "ls", "--data-dir", c.dir("m1").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("6/6"));

    // A worker killed -9: its tasks run elsewhere; `service ps` shows the old ones orphaned.
    let killed = Instant::now();
    c.daemons.remove("w1");
    let tasks = poll(
        "six web tasks on w2 and w3",
        Duration::from_secs(60),
        || {
            let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
            let r = running(&list.tasks);
            (r.len() == 6 && r.iter().all(|t| t.node_hostname.as_deref() != Some("w1")))
                .then_some(list.tasks)
        },
    );
    eprintln!(
        "worker killed -> its tasks running elsewhere: {:?}",
        killed.elapsed()
    );
    let orphans = tasks
        .iter()
        .filter(|t| t.node_hostname.as_deref() == Some("w1") && t.state == "orphaned")
        .count();
    assert_eq!(orphans, 2, "{tasks:#?}");
    // It comes back: its old processes are stopped, nothing runs twice.
    c.restart("w1");
    poll(
        "w1's orphaned processes stopped",
        Duration::from_secs(30),
        || {
            let w1_tasks = std::fs::read_dir(c.dir("w1").join("tasks")).ok()?;
            let alive = w1_tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("started.json"))
                        .ok()
                        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                        .and_then(|v| v["pid"].as_i64())
                        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
                })
                .count();
            (alive == 0).then_some(())
        },
    );
    let list = rt.block_on(api.tasks(Some("web"), None)).unwrap();
    assert_eq!(running(&list.tasks).len(), 6);

    // Scale down and up.
    rt.block_on(api.scale_service("web", 2)).unwrap();
    poll("two web tasks", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
        let live = list.tasks.iter().filter(|t| t.state == "running").count();
        (live == 2).then_some(())
    });

    // A program that fails: restarted per policy, then left failed.
    let mut fail = spec("fail", 1, &["sh", "-c", "exit 3"]);
    fail.restart_max_attempts = 2;
    fail.restart_delay_ms = 100;
    rt.block_on(api.create_service(&fail)).unwrap();
    let tasks = poll("three failed attempts", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(Some("fail"), None)).ok()?;
        (list.tasks.len() == 3 && list.tasks.iter().all(|t| t.state == "failed"))
            .then_some(list.tasks)
    });
    assert!(tasks.iter().all(|t| t.exit_code == Some(3)), "{tasks:#?}");
    std::thread::sleep(Duration::from_millis(1500));
    let list = rt.block_on(api.tasks(Some("fail"), None)).unwrap();
    assert_eq!(list.tasks.len(), 3, "no fourth attempt: {:#?}", list.tasks);

    // A constraint no node meets: pending, with why.
    let mut picky = spec("picky", 1, &["sleep", "1000"]);
    picky.constraints = vec!["node.labels.zone==b".into()];
    rt.block_on(api.create_service(&picky)).unwrap();
    let why = poll("an explanation", Duration::from_secs(20), || {
        let list = rt.block_on(api.tasks(Some("picky"), None)).ok()?;
        list.tasks.first()?.pending_reason.clone()
    });
    assert!(
        why.contains("constraint node.labels.zone==b: 3 nodes")
            && why.contains("not ready or not active: 1 node"),
        "{why}"
    );
    // A label makes it fit.
    let w2 = rt
        .block_on(api.nodes())
        .unwrap()
        .nodes
        .into_iter()
        .find(|n| n.hostname == "w2")
        .unwrap()
        .id;
    let out = starling(&[
        "node",
        "update",
        "--data-dir",
        c.dir("m1").to_str().unwrap(),
        "--label-add",
        "zone=b",
        &w2,
    ]);
    assert!(out.status.success());
    poll("picky running on w2", Duration::from_secs(20), || {
        let list = rt.block_on(api.tasks(Some("picky"), None)).ok()?;
        list.tasks
            .iter()
            .any(|t| t.state == "running" && t.node_hostname.as_deref() == Some("w2"))
            .then_some(())
    });

    // A global service runs on every eligible node, one joining later included.
    let global: ServiceSpec = serde_json::from_value(serde_json::json!({
        "name": "agent", "mode": "global", "command": ["sleep", "1000"]
    }))
    .unwrap();
    rt.block_on(api.create_service(&global)).unwrap();
    c.join("w4");
    poll(
        "a global task on each of the four workers",
        Duration::from_secs(40),
        || {
            let list = rt.block_on(api.tasks(Some("agent"), None)).ok()?;
            let r = running(&list.tasks);
            let nodes = per_node(&r);
            (r.len() == 4 && nodes.len() == 4 && !nodes.contains_key("m1")).then_some(())
        },
    );

    // Isolation as `node inspect` shows it; with cgroups (root, cgroup2 mounted: CI), a
    // task's process that left its process group (`setsid`) still goes with the task.
    let w2_detail = rt.block_on(api.node(&w2)).unwrap();
    let isolation = w2_detail.machine.expect("w2's machine").isolation;
    eprintln!("isolation: {isolation}");
    assert!(
        isolation == "process-group" || isolation.starts_with("cgroup-v2"),
        "{isolation}"
    );
    let m1 = c.dir("m1").to_str().unwrap().to_owned();
    let out = starling(&["node", "inspect", "--data-dir", &m1, &w2]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&isolation),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    if isolation.starts_with("cgroup-v2") {
        let mut escape = spec(
            "escape",
            1,
            &[
                "sh",
                "-c",
                "setsid sleep 1000 & echo $! > escaped; exec sleep 1000",
            ],
        );
        escape.constraints = vec![format!("node.id=={w2}")];
        rt.block_on(api.create_service(&escape)).unwrap();
        let task = poll("the escape task running", Duration::from_secs(20), || {
            let list = rt.block_on(api.tasks(Some("escape"), None)).ok()?;
            list.tasks.into_iter().find(|t| t.state == "running")
        });
        let file = c.dir("w2").join("tasks").join(&task.id).join("escaped");
        let escaped: u32 = poll("the escaped pid", Duration::from_secs(20), || {
            std::fs::read_to_string(&file).ok()?.trim().parse().ok()
        });
        let proc_dir = PathBuf::from(format!("/proc/{escaped}"));
        assert!(proc_dir.exists());
        rt.block_on(api.remove_service("escape")).unwrap();
        poll(
            "the escaped process gone with its task",
            Duration::from_secs(30),
            || {
                let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
                // Gone, or a zombie waiting for its parent (init) to reap it.
                (stat.is_empty()
                    || stat
                        .rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z')))
                .then_some(())
            },
        );
    }

    // Bad input: one clear line, nothing written.
    for (args, needle) in [
        (vec!["--constraint", "zone=b"], "expected node.<attribute>"),
        (vec!["--replicas", "-1"], "-1"),
        (vec!["--name", "Bad_Name"], "service name"),
        (vec!["--name", "web"], "exists"),
        (
            vec!["--name", "typo", "--", "no-such-program-xyz"],
            "no-such-program-xyz: not found",
        ),
        (
            vec!["--name", "wide", "--replicas", "20000", "--port", "HTTP"],
            "port range exhausted",
        ),
    ] {
        let mut all = vec!["service", "create", "--data-dir", &m1];
        all.extend(args.iter().copied());
        if !args.contains(&"--") {
            all.extend(["--", "sleep", "1"]);
        }
        let out = starling(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    let names: Vec<String> = rt
        .block_on(api.services())
        .unwrap()
        .services
        .into_iter()
        .map(|s| s.spec.name)
        .collect();
    assert_eq!(names, ["agent", "fail", "picky", "web"]);

    // Removal stops every task.
    for s in ["web", "fail", "picky", "agent"] {
        rt.block_on(api.remove_service(s)).unwrap();
    }
    poll("no task left", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(None, None)).ok()?;
        list.tasks.is_empty().then_some(())
    });
}

/// The live task processes under every node's data directory: task id → pid.
fn live_processes(c: &Cluster) -> BTreeMap<String, i32> {
    let mut live = BTreeMap::new();
    for dir in c.dirs.values() {
        for t in std::fs::read_dir(dir.join("tasks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(started) = starling_agent::exec::recorded(&t.path())
                && starling_agent::exec::alive(&started)
            {
                live.insert(t.file_name().to_string_lossy().into_owned(), started.pid);
            }
        }
    }
    live
}

/// The node that leads, by host name.
fn leader(rt: &tokio::runtime::Runtime, api: &Client) -> Option<String> {
    rt.block_on(api.nodes())
        .ok()?
        .nodes
        .into_iter()
        .find(|n| n.manager_status == Some(starling_api::ManagerStatus::Leader))
        .map(|n| n.hostname)
}

#[test]
fn t71_start_first_drain_keeps_serving_leader_killed_mid_reconciliation_and_quorum_lost() {
    let mut c = cluster_of(1, 3, 3);
    let rt = rt();
    let api = c.client();

    // A 1-replica HTTP service keeps answering while its node is drained: the replacement
    // runs (1 s) before the old task is stopped.
    let mut web = spec(
        "web",
        1,
        &[
            "python3",
            "-c",
            "import http.server,os; http.server.HTTPServer((os.environ['STARLING_HOST_IP'], int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler).serve_forever()",
        ],
    );
    web.ports = vec![starling_api::PortRequest {
        name: "HTTP".into(),
        protocol: "tcp".into(),
    }];
    web.constraints = vec!["node.role==worker".into()];
    rt.block_on(api.create_service(&web)).unwrap();
    let addrs = c.addrs.clone();
    let endpoint = move |t: &TaskView| {
        let ip = addrs[t.node_hostname.as_deref()?]
            .split(':')
            .next()?
            .to_owned();
        Some((ip, t.ports.first()?.port))
    };
    let first = poll("web answers", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
        let t = list.tasks.into_iter().find(|t| t.state == "running")?;
        let (ip, port) = endpoint(&t)?;
        std::net::TcpStream::connect((ip.as_str(), port)).ok()?;
        Some(t)
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let api = c.client();
        let endpoint = endpoint.clone();
        std::thread::spawn(move || {
            let rt = self::rt();
            let (mut polls, mut misses) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                polls += 1;
                let tasks = rt
                    .block_on(api.tasks(Some("web"), None))
                    .map(|l| l.tasks)
                    .unwrap_or_default();
                let answered = tasks.iter().filter(|t| t.state == "running").any(|t| {
                    endpoint(t).is_some_and(|(ip, port)| {
                        let addr = std::net::SocketAddr::new(ip.parse().unwrap(), port);
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                            .is_ok()
                    })
                });
                if !answered {
                    misses.push(format!("poll {polls}: {tasks:?}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (polls, misses)
        })
    };
    let drained = first.node.clone().unwrap();
    rt.block_on(api.set_availability(&drained, starling_api::Availability::Drain))
        .unwrap();
    poll(
        "web moved off the drained node, the old task shut down",
        Duration::from_secs(30),
        || {
            let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
            let old = list.tasks.iter().find(|t| t.id == first.id)?;
            let moved = list
                .tasks
                .iter()
                .any(|t| t.state == "running" && t.node.as_deref() != Some(drained.as_str()));
            (moved && old.state == "shutdown").then_some(())
        },
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (polls, misses) = prober.join().unwrap();
    assert!(polls >= 10, "only {polls} polls");
    assert!(
        misses.is_empty(),
        "{} of {polls} polls unanswered: {misses:#?}",
        misses.len()
    );
    rt.block_on(api.set_availability(&drained, starling_api::Availability::Active))
        .unwrap();

    // The agent of web's node killed -9 and started again at once: it adopts the running
    // process (same task, same pid), nothing is started twice.
    let (task, host) = poll("web running", Duration::from_secs(20), || {
        let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
        let t = list.tasks.into_iter().find(|t| t.state == "running")?;
        let host = t.node_hostname.clone()?;
        Some((t, host))
    });
    let started = starling_agent::exec::recorded(&c.dir(&host).join("tasks").join(&task.id))
        .expect("the task's record");
    let log = c.dir(&host).with_extension("log");
    let sessions = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("dispatcher session open")
            .count()
    };
    let before = sessions(&log);
    c.daemons.remove(&host);
    c.restart(&host);
    poll("the agent back in session", Duration::from_secs(30), || {
        (sessions(&log) > before).then_some(())
    });
    let list = rt.block_on(api.tasks(Some("web"), None)).unwrap();
    let live: Vec<&TaskView> = list
        .tasks
        .iter()
        .filter(|t| t.desired_state == "running")
        .collect();
    assert_eq!(live.len(), 1, "{live:#?}");
    assert_eq!(live[0].id, task.id, "the same task");
    assert_eq!(live[0].state, "running");
    assert!(starling_agent::exec::alive(&started), "the same process");

    // The leader killed while it reconciles 30 new replicas: a new leader finishes the job,
    // with one task per slot and one process per task.
    let old_leader = poll("a leader", Duration::from_secs(10), || leader(&rt, &api));
    let via = ["m1", "m2", "m3"]
        .into_iter()
        .find(|m| *m != old_leader)
        .unwrap()
        .to_owned();
    let api = Client::unix(c.dir(&via).join("control.sock"));
    let mut many = spec("many", 30, &["sleep", "1000"]);
    many.constraints = vec!["node.role==worker".into()];
    rt.block_on(api.create_service(&many)).unwrap();
    c.daemons.remove(&old_leader);
    let new_leader = poll("a new leader", Duration::from_secs(30), || {
        leader(&rt, &api).filter(|l| *l != old_leader)
    });
    eprintln!("{old_leader} killed, {new_leader} leads");
    let running_many = || {
        let list = rt.block_on(api.tasks(Some("many"), None)).ok()?;
        let r: Vec<TaskView> = list
            .tasks
            .into_iter()
            .filter(|t| t.state == "running" && t.desired_state == "running")
            .collect();
        (r.len() == 30).then_some(r)
    };
    let tasks = poll(
        "30 many tasks running",
        Duration::from_secs(60),
        running_many,
    );
    let slots: std::collections::BTreeSet<_> = tasks.iter().map(|t| t.slot.clone()).collect();
    assert_eq!(slots.len(), 30, "{tasks:#?}");
    let ids: std::collections::BTreeSet<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let live = poll("one process per task", Duration::from_secs(30), || {
        let live = live_processes(&c);
        // The 30 of many and the one of web: nothing else.
        let others = live.keys().filter(|id| !ids.contains(*id)).count();
        (live.len() == 31 && others == 1).then_some(live)
    });

    // Quorum lost (one manager of three left): the tasks keep running, a new service is
    // refused with the quorum error.
    let other = ["m1", "m2", "m3"]
        .into_iter()
        .find(|m| *m != old_leader && *m != via)
        .unwrap()
        .to_owned();
    c.daemons.remove(&other);
    let late = spec("late", 1, &["sleep", "1000"]);
    let err = poll("the quorum error", Duration::from_secs(30), || {
        match rt.block_on(api.create_service(&late)) {
            Err(starling_api::ClientError::Api(e))
                if e.code == starling_api::ErrorCode::NoQuorum =>
            {
                Some(e)
            }
            Err(_) => None,
            Ok(v) => panic!("a service created without quorum: {v:?}"),
        }
    });
    assert!(err.error.contains("1 of 3"), "{err:?}");
    assert_eq!(live_processes(&c), live, "the running tasks are untouched");
}

/// The service's state as `service inspect` shows it, and its tasks wanted running.
fn service_and_tasks(
    rt: &tokio::runtime::Runtime,
    api: &Client,
    name: &str,
) -> Option<(starling_api::ServiceView, Vec<TaskView>)> {
    let v = rt.block_on(api.service(name)).ok()?;
    let tasks = rt.block_on(api.tasks(Some(name), None)).ok()?.tasks;
    Some((v, tasks))
}

fn update_state(v: &starling_api::ServiceView) -> &str {
    v.update_status.as_ref().map_or("", |u| u.state.as_str())
}

#[test]
fn t72_rolling_update_answers_throughout_pauses_rolls_back_and_survives_the_leader() {
    let mut c = cluster_of(2, 3, 3);
    let rt = rt();
    let api = c.client();
    let mut web = spec(
        "web",
        6,
        &[
            "python3",
            "-c",
            "import http.server,os; http.server.HTTPServer((os.environ['STARLING_HOST_IP'], int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler).serve_forever()",
        ],
    );
    web.ports = vec![starling_api::PortRequest {
        name: "HTTP".into(),
        protocol: "tcp".into(),
    }];
    web.constraints = vec!["node.role==worker".into()];
    web.update.parallelism = 2;
    web.update.order = starling_api::UpdateOrder::StartFirst;
    web.update.monitor_ms = 1_000;
    web.rollback.parallelism = 3;
    web.rollback.monitor_ms = 500;
    rt.block_on(api.create_service(&web)).unwrap();
    let addrs = c.addrs.clone();
    let endpoint = move |t: &TaskView| {
        let ip = addrs[t.node_hostname.as_deref()?]
            .split(':')
            .next()?
            .to_owned();
        Some((ip, t.ports.first()?.port))
    };
    poll("six web tasks answer", Duration::from_secs(60), || {
        let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
        let r = running(&list.tasks);
        (r.len() == 6
            && r.iter().all(|t| {
                endpoint(t).is_some_and(|(ip, port)| {
                    std::net::TcpStream::connect((ip.as_str(), port)).is_ok()
                })
            }))
        .then_some(())
    });

    // An update, parallelism 2, start-first: some task answers at every 50 ms poll, and no
    // more than two slots are in flight at once.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let api = c.client();
        let endpoint = endpoint.clone();
        std::thread::spawn(move || {
            let rt = self::rt();
            let (mut polls, mut misses, mut most_runnable) = (0u32, Vec::new(), 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                polls += 1;
                let tasks = rt
                    .block_on(api.tasks(Some("web"), None))
                    .map(|l| l.tasks)
                    .unwrap_or_default();
                let runnable = tasks
                    .iter()
                    .filter(|t| {
                        t.desired_state == "running"
                            && !["complete", "shutdown", "failed", "rejected", "orphaned"]
                                .contains(&t.state.as_str())
                    })
                    .count();
                most_runnable = most_runnable.max(runnable);
                let answered = tasks.iter().filter(|t| t.state == "running").any(|t| {
                    endpoint(t).is_some_and(|(ip, port)| {
                        let addr = std::net::SocketAddr::new(ip.parse().unwrap(), port);
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                            .is_ok()
                    })
                });
                if !answered {
                    misses.push(format!("poll {polls}: {tasks:?}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (polls, misses, most_runnable)
        })
    };
    let current = rt.block_on(api.service("web")).unwrap();
    let mut v2 = current.spec.clone();
    v2.env.insert("VERSION".into(), "2".into());
    rt.block_on(api.update_service("web", &v2, Some(current.version)))
        .unwrap();
    let (done, tasks) = poll("the update completed", Duration::from_secs(90), || {
        let (v, tasks) = service_and_tasks(&rt, &api, "web")?;
        let r = running(&tasks);
        (update_state(&v) == "completed"
            && r.len() == 6
            && r.iter().all(|t| t.spec_version == v.spec_version))
        .then_some((v, tasks))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (polls, misses, most_runnable) = prober.join().unwrap();
    assert!(polls >= 10, "only {polls} polls");
    assert!(
        misses.is_empty(),
        "{} of {polls} polls unanswered: {misses:#?}",
        misses.len()
    );
    assert!(most_runnable <= 8, "{most_runnable} runnable tasks at once");
    // Each slot replaced exactly once.
    let new: Vec<&TaskView> = tasks
        .iter()
        .filter(|t| t.spec_version == done.spec_version)
        .collect();
    assert_eq!(new.len(), 6, "{tasks:#?}");

    // An update to a program that exits at once: paused after the first batch, with why.
    let mut broken = done.spec.clone();
    broken.command = vec!["sh".into(), "-c".into(), "echo broken >&2; exit 3".into()];
    broken.update.order = starling_api::UpdateOrder::StopFirst;
    let broken_version = rt
        .block_on(api.update_service("web", &broken, Some(done.version)))
        .unwrap()
        .spec_version;
    let paused = poll("the update paused", Duration::from_secs(60), || {
        let (v, _) = service_and_tasks(&rt, &api, "web")?;
        (update_state(&v) == "paused").then_some(v)
    });
    let why = &paused.update_status.as_ref().unwrap().message;
    assert!(
        why.contains("update paused") && why.contains("exit code 3"),
        "{why}"
    );
    let (_, tasks) = service_and_tasks(&rt, &api, "web").unwrap();
    let old_running = running(&tasks)
        .iter()
        .filter(|t| t.spec_version == done.spec_version)
        .count();
    assert!(
        old_running >= 4,
        "only the first batch is touched: {tasks:#?}"
    );
    // `service rollback` returns every slot to the working spec.
    let out = starling(&[
        "service",
        "rollback",
        "--data-dir",
        c.dir("m1").to_str().unwrap(),
        "web",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (rolled, tasks) = poll("rolled back", Duration::from_secs(90), || {
        let (v, tasks) = service_and_tasks(&rt, &api, "web")?;
        let r = running(&tasks);
        (update_state(&v) == "rolled_back"
            && r.len() == 6
            && r.iter().all(|t| t.spec_version != broken_version))
        .then_some((v, tasks))
    });
    assert_eq!(rolled.spec.command, done.spec.command);
    // Only the slots the update reached were replaced back: the others kept their tasks.
    let untouched = running(&tasks)
        .iter()
        .filter(|t| t.spec_version == done.spec_version)
        .count();
    assert!(untouched >= 4, "{tasks:#?}");
    assert_eq!(
        rolled.spec.env.get("VERSION").map(String::as_str),
        Some("2")
    );

    // Failure action rollback: the cluster rolls back by itself.
    let mut broken = rolled.spec.clone();
    broken.command = vec!["sh".into(), "-c".into(), "exit 4".into()];
    broken.update.failure_action = starling_api::FailureAction::Rollback;
    let broken_version = rt
        .block_on(api.update_service("web", &broken, Some(rolled.version)))
        .unwrap()
        .spec_version;
    let auto = poll("rolled back by itself", Duration::from_secs(90), || {
        let (v, tasks) = service_and_tasks(&rt, &api, "web")?;
        let r = running(&tasks);
        (update_state(&v) == "rolled_back"
            && r.len() == 6
            && r.iter().all(|t| t.spec_version != broken_version))
        .then_some(v)
    });
    assert_eq!(auto.spec.command, done.spec.command);
    assert!(
        auto.update_status
            .as_ref()
            .unwrap()
            .message
            .contains("exit code 4"),
        "{:?}",
        auto.update_status
    );

    // `--force`, parallelism 1, and the leader killed after the first slot: the update
    // finishes under the new leader, every slot replaced exactly once.
    let out = starling(&[
        "service",
        "update",
        "--data-dir",
        c.dir("m1").to_str().unwrap(),
        "--force",
        "--update-parallelism",
        "1",
        "--update-order",
        "start-first",
        "web",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forced = rt.block_on(api.service("web")).unwrap();
    assert_eq!(forced.spec.force_update, 1);
    poll("the first slot replaced", Duration::from_secs(60), || {
        let (v, tasks) = service_and_tasks(&rt, &api, "web")?;
        running(&tasks)
            .iter()
            .any(|t| t.spec_version == v.spec_version)
            .then_some(())
    });
    let old_leader = poll("a leader", Duration::from_secs(10), || leader(&rt, &api));
    let via = if old_leader == "m1" { "m2" } else { "m1" };
    c.daemons.remove(&old_leader);
    let api = Client::unix(c.dir(via).join("control.sock"));
    let (v, tasks) = poll(
        "the forced update completed under a new leader",
        Duration::from_secs(120),
        || {
            let (v, tasks) = service_and_tasks(&rt, &api, "web")?;
            let r = running(&tasks);
            (update_state(&v) == "completed"
                && r.len() == 6
                && r.iter().all(|t| t.spec_version == v.spec_version))
            .then_some((v, tasks))
        },
    );
    let mut per_slot: BTreeMap<&str, usize> = BTreeMap::new();
    for t in tasks.iter().filter(|t| t.spec_version == v.spec_version) {
        *per_slot.entry(t.slot.as_str()).or_default() += 1;
    }
    assert_eq!(per_slot.len(), 6, "{tasks:#?}");
    assert!(per_slot.values().all(|n| *n == 1), "{per_slot:?}");
}

/// Reads records until `done` says enough (or the deadline): every line and notice seen.
fn read_until(
    rt: &tokio::runtime::Runtime,
    reader: &mut starling_api::RecordReader,
    within: Duration,
    mut done: impl FnMut(&[starling_api::LogRecord]) -> bool,
) -> Vec<starling_api::LogRecord> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    rt.block_on(async {
        while !done(&seen) {
            match tokio::time::timeout_at(deadline, reader.next()).await {
                Ok(Ok(Some(r))) => seen.push(r),
                Ok(Ok(None)) => break,
                Ok(Err(e)) => panic!("logs stream: {e}"),
                Err(_) => break,
            }
        }
    });
    seen
}

fn lines(records: &[starling_api::LogRecord]) -> Vec<(String, starling_api::LogStream, u64, &str)> {
    records
        .iter()
        .filter_map(|r| match r {
            starling_api::LogRecord::Line {
                stream, time, line, ..
            } => Some((r.prefix().unwrap(), *stream, *time, line.as_str())),
            _ => None,
        })
        .collect()
}

#[test]
fn t73_service_logs_follow_tasks_on_three_nodes_and_keep_a_failed_tasks_tail() {
    let mut c = cluster_of(3, 1, 3);
    let rt = rt();
    let api = c.client();
    let talk = [
        "sh",
        "-c",
        "i=0; while :; do echo \"out $STARLING_TASK_SLOT $i\"; echo \"err $STARLING_TASK_SLOT $i\" >&2; i=$((i+1)); sleep 0.2; done",
    ];
    rt.block_on(api.create_service(&spec("talk", 6, &talk)))
        .unwrap();
    poll("six talk tasks running", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(Some("talk"), None)).ok()?;
        (running(&list.tasks).len() == 6).then_some(())
    });

    // Following: lines of every slot, both streams, from the three workers, through m1
    // (which runs no task: every line crossed `starling/logs/1`).
    let follow = starling_api::LogsQuery {
        follow: true,
        tail: Some(1),
        since_ms: None,
    };
    let mut reader = rt.block_on(api.service_logs("talk", &follow)).unwrap();
    let started = Instant::now();
    let complete = |seen: &[starling_api::LogRecord]| {
        let l = lines(seen);
        let slots: std::collections::BTreeSet<String> = l
            .iter()
            .filter(|(_, s, _, text)| {
                *s == starling_api::LogStream::Stderr
                    && text.starts_with("err ")
                    && text.ends_with(" 20")
            })
            .map(|(p, ..)| p.clone())
            .collect();
        slots.len() == 6
    };
    let seen = read_until(&rt, &mut reader, Duration::from_secs(60), complete);
    assert!(complete(&seen), "{seen:#?}");
    eprintln!(
        "followed 6 tasks to their 20th line in {:?}",
        started.elapsed()
    );
    let l = lines(&seen);
    let nodes: std::collections::BTreeSet<&str> = l
        .iter()
        .map(|(p, ..)| p.rsplit_once('@').unwrap().1)
        .collect();
    assert_eq!(nodes, ["w1", "w2", "w3"].into_iter().collect(), "{l:?}");
    // Each task's lines come in order, stdout's and stderr's each counting up by one.
    let mut last: BTreeMap<(String, starling_api::LogStream), (u64, u64)> = BTreeMap::new();
    for (p, s, t, text) in &l {
        let n: u64 = text.rsplit(' ').next().unwrap().parse().unwrap();
        if let Some((pt, pn)) = last.get(&(p.clone(), *s)) {
            assert!(*t >= *pt, "{p} went back in time");
            assert_eq!(n, pn + 1, "{p} {s:?}: a line lost or repeated");
        }
        last.insert((p.clone(), *s), (*t, n));
    }
    drop(reader);

    // Not following: the last 2 lines of each task, and the CLI prints them prefixed.
    let q = starling_api::LogsQuery {
        follow: false,
        tail: Some(2),
        since_ms: None,
    };
    let mut reader = rt.block_on(api.service_logs("talk", &q)).unwrap();
    let all = read_until(&rt, &mut reader, Duration::from_secs(30), |_| false);
    assert_eq!(lines(&all).len(), 12, "{all:#?}");
    let out = starling(&[
        "service",
        "logs",
        "--data-dir",
        c.dir("m1").to_str().unwrap(),
        "talk",
        "--tail",
        "1",
        "--timestamps",
    ]);
    assert!(out.status.success(), "{out:?}");
    // Each task's last line (stderr's lines go to stderr, as docker prints them).
    let printed =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(printed.lines().count(), 6, "{printed}");
    assert!(
        printed
            .lines()
            .all(|l| l.contains(" talk.") && l.contains(" | ") && l.starts_with("20")),
        "{printed}"
    );

    // A task that fails: its last words stay readable through the service and the task.
    let crash = [
        "sh",
        "-c",
        "echo about to fail; echo 'fatal: disk on fire' >&2; exit 3",
    ];
    let mut crash_spec = spec("crash", 1, &crash);
    crash_spec.restart_condition = starling_api::RestartCondition::None;
    rt.block_on(api.create_service(&crash_spec)).unwrap();
    let failed = poll("crash failed", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(Some("crash"), None)).ok()?;
        list.tasks.into_iter().find(|t| t.state == "failed")
    });
    let q = starling_api::LogsQuery {
        follow: false,
        tail: Some(5),
        since_ms: None,
    };
    for by_task in [false, true] {
        let mut reader = if by_task {
            rt.block_on(api.task_logs(&failed.id[..8], &q)).unwrap()
        } else {
            rt.block_on(api.service_logs("crash", &q)).unwrap()
        };
        let got = read_until(&rt, &mut reader, Duration::from_secs(30), |_| false);
        let texts: Vec<(starling_api::LogStream, &str)> =
            lines(&got).into_iter().map(|(_, s, _, t)| (s, t)).collect();
        assert_eq!(
            texts,
            [
                (starling_api::LogStream::Stdout, "about to fail"),
                (starling_api::LogStream::Stderr, "fatal: disk on fire")
            ],
            "{got:#?}"
        );
    }
    let out = starling(&[
        "service",
        "logs",
        "--data-dir",
        c.dir("m1").to_str().unwrap(),
        "nosuch",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such service or task: nosuch"),
        "{out:?}"
    );

    // A node that is down is reported, not waited for.
    let on_w3 = rt
        .block_on(api.tasks(Some("talk"), Some("w3")))
        .unwrap()
        .tasks
        .len();
    assert!(on_w3 > 0);
    c.daemons.remove("w3");
    poll("w3 down", Duration::from_secs(60), || {
        let list = rt.block_on(api.nodes()).ok()?;
        list.nodes
            .iter()
            .any(|n| n.hostname == "w3" && n.status == starling_api::NodeStatus::Down)
            .then_some(())
    });
    let asked = Instant::now();
    let mut reader = rt.block_on(api.service_logs("talk", &q)).unwrap();
    let got = read_until(&rt, &mut reader, Duration::from_secs(30), |_| false);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        got.iter()
            .any(|r| matches!(r, starling_api::LogRecord::Notice { message }
            if message.contains("node w3 is down"))),
        "{got:#?}"
    );
    assert!(lines(&got).iter().any(|(p, ..)| p.ends_with("@w1")));
}

/// Asks the DNS server at `server` for `name` (type `qtype`) over UDP: the parsed answer's
/// bytes, or `None` when no answer came.
fn ask(server: &str, name: &str, qtype: simple_dns::TYPE) -> Option<Vec<u8>> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut q = simple_dns::Packet::new_query(42);
    q.questions.push(simple_dns::Question::new(
        simple_dns::Name::new_unchecked(name),
        simple_dns::QTYPE::TYPE(qtype),
        simple_dns::QCLASS::CLASS(simple_dns::CLASS::IN),
        false,
    ));
    sock.send_to(&q.build_bytes_vec().ok()?, server).ok()?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    simple_dns::Packet::parse(&buf[..n]).ok()?;
    Some(buf[..n].to_vec())
}

/// [`ask`]: the answer's code, A addresses and SRV ports.
fn dig(
    server: &str,
    name: &str,
    qtype: simple_dns::TYPE,
) -> Option<(
    simple_dns::RCODE,
    std::collections::BTreeSet<String>,
    std::collections::BTreeSet<u16>,
)> {
    use simple_dns::rdata::RData;
    let bytes = ask(server, name, qtype)?;
    let p = simple_dns::Packet::parse(&bytes).ok()?;
    let mut ips = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for r in &p.answers {
        match &r.rdata {
            RData::A(a) => {
                ips.insert(std::net::Ipv4Addr::from(a.address).to_string());
            }
            RData::SRV(s) => {
                ports.insert(s.port);
            }
            _ => {}
        }
    }
    Some((p.rcode(), ips, ports))
}

#[test]
fn t74_every_node_resolves_the_running_endpoints_from_gossip_alone() {
    let mut c = cluster_of(4, 1, 3);
    let rt = rt();
    let api = c.client();
    let mut web = spec("web", 3, &["sleep", "100000"]);
    web.ports = vec![serde_json::from_value(serde_json::json!({"name": "HTTP"})).unwrap()];
    rt.block_on(api.create_service(&web)).unwrap();
    let tasks = poll("three web tasks running", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
        let r: Vec<TaskView> = running(&list.tasks).into_iter().cloned().collect();
        (r.len() == 3).then_some(r)
    });
    let want_ports: std::collections::BTreeSet<u16> =
        tasks.iter().map(|t| t.ports[0].port).collect();
    let want_ips: std::collections::BTreeSet<String> = ["2", "3", "4"]
        .iter()
        .map(|i| format!("127.0.4.{i}"))
        .collect();
    let servers: Vec<String> = (1..=4).map(|i| format!("127.0.4.{i}:8600")).collect();
    // Every node, the manager included, answers the same from its own gossip state.
    let started = Instant::now();
    for server in &servers {
        poll(
            &format!("{server} resolves web"),
            Duration::from_secs(20),
            || {
                let (rcode, ips, _) = dig(server, "web.svc.starling", simple_dns::TYPE::A)?;
                (rcode == simple_dns::RCODE::NoError && ips == want_ips).then_some(())
            },
        );
        let (_, _, ports) =
            dig(server, "_http._tcp.WEB.svc.starling", simple_dns::TYPE::SRV).unwrap();
        assert_eq!(ports, want_ports, "{server}: SRV ports");
        let (rcode, ips, _) = dig(server, "w2.node.starling", simple_dns::TYPE::A).unwrap();
        assert_eq!((rcode, ips.len()), (simple_dns::RCODE::NoError, 1));
        let (rcode, ..) = dig(server, "nosuch.svc.starling", simple_dns::TYPE::A).unwrap();
        assert_eq!(rcode, simple_dns::RCODE::NameError);
    }
    eprintln!(
        "3 endpoints resolvable on 4 nodes {:?} after running",
        started.elapsed()
    );
    // The same from a worker's API and CLI (gossip state, no manager involved).
    let w1 = Client::unix(c.dir("w1").join("control.sock"));
    let before = rt
        .block_on(w1.service_endpoints("web", true, None, None))
        .unwrap();
    assert_eq!(before.endpoints.len(), 3, "{before:?}");
    let out = starling(&[
        "service",
        "endpoints",
        "--data-dir",
        c.dir("w1").to_str().unwrap(),
        "web",
        "--passing",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);
    // A blocking query on the worker's index returns when the list changes.
    rt.block_on(api.scale_service("web", 1)).unwrap();
    let changed = rt
        .block_on(w1.service_endpoints("web", true, Some(before.index), Some(30)))
        .unwrap();
    assert_ne!(changed.index, before.index);
    // Scaled to 1: the stopped tasks leave every node's answers.
    let one = poll("one web task running", Duration::from_secs(30), || {
        let list = rt.block_on(api.tasks(Some("web"), None)).ok()?;
        let r: Vec<TaskView> = running(&list.tasks).into_iter().cloned().collect();
        (r.len() == 1).then_some(r)
    });
    let port = one[0].ports[0].port;
    for server in &servers {
        poll(
            &format!("{server} forgets the stopped tasks"),
            Duration::from_secs(20),
            || {
                let (_, _, ports) =
                    dig(server, "_http._tcp.web.svc.starling", simple_dns::TYPE::SRV)?;
                (ports == std::collections::BTreeSet::from([port])).then_some(())
            },
        );
    }
    // Without any manager (quorum gone), the workers keep answering.
    drop(c.daemons.remove("m1"));
    for server in &servers[1..] {
        let (rcode, _, ports) =
            dig(server, "_http._tcp.web.svc.starling", simple_dns::TYPE::SRV).unwrap();
        assert_eq!(
            (rcode, ports),
            (
                simple_dns::RCODE::NoError,
                std::collections::BTreeSet::from([port])
            )
        );
    }
}

/// The task directory of `t` on its node.
fn task_dir(c: &Cluster, t: &TaskView) -> PathBuf {
    c.dir(t.node_hostname.as_deref().unwrap())
        .join("tasks")
        .join(&t.id)
}

#[test]
fn t75_health_checks_gate_dns_replace_unhealthy_tasks_and_drain_before_stopping() {
    let c = cluster_of(5, 1, 2);
    let rt = rt();
    let api = c.client();
    // An HTTP server of its task directory: GET /health passes once a file `health` is there.
    let out = starling(&[
        "service",
        "create",
        "--data-dir",
        c.dir("m1").to_str().unwrap(),
        "--name",
        "checked",
        "--replicas",
        "2",
        "--port",
        "HTTP",
        "--health-http",
        "HTTP/health",
        "--health-interval",
        "300ms",
        "--health-retries",
        "2",
        "--health-start-period",
        "120s",
        "--restart-delay",
        "500ms",
        "--drain-delay",
        "3s",
        "--dns-ttl",
        "7s",
        "--",
        "python3",
        "-c",
        "import http.server,os; http.server.HTTPServer((os.environ['STARLING_HOST_IP'], int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler).serve_forever()",
    ]);
    assert!(out.status.success(), "{out:?}");
    let servers: Vec<String> = (1..=3).map(|i| format!("127.0.5.{i}:8600")).collect();
    let tasks = |rt: &tokio::runtime::Runtime| {
        rt.block_on(api.tasks(Some("checked"), None))
            .map(|l| running(&l.tasks).into_iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    // Running but starting: the check fails (no file) within the start period, so the
    // tasks are neither replaced nor served.
    let starting = poll(
        "two tasks running, starting",
        Duration::from_secs(30),
        || {
            let r = tasks(&rt);
            (r.len() == 2 && r.iter().all(|t| t.health.as_deref() == Some("starting"))).then_some(r)
        },
    );
    let w1 = Client::unix(c.dir("w1").join("control.sock"));
    poll(
        "w1 sees two starting endpoints",
        Duration::from_secs(20),
        || {
            let l = rt
                .block_on(w1.service_endpoints("checked", false, None, None))
                .ok()?;
            (l.endpoints.len() == 2 && l.endpoints.iter().all(|e| e.health == "starting"))
                .then_some(())
        },
    );
    for server in &servers {
        let (rcode, ..) = dig(server, "checked.svc.starling", simple_dns::TYPE::A).unwrap();
        assert_eq!(rcode, simple_dns::RCODE::NameError, "{server}");
    }

    // Healthy once the file is there: served by every node, with the service's TTL.
    for t in &starting {
        std::fs::write(task_dir(&c, t).join("health"), b"ok").unwrap();
    }
    poll("two healthy tasks", Duration::from_secs(30), || {
        let r = tasks(&rt);
        (r.len() == 2 && r.iter().all(|t| t.health.as_deref() == Some("healthy"))).then_some(())
    });
    let ip_of = |t: &TaskView| {
        c.addrs[t.node_hostname.as_deref().unwrap()]
            .split(':')
            .next()
            .unwrap()
            .to_owned()
    };
    let want_ips: std::collections::BTreeSet<String> = starting.iter().map(ip_of).collect();
    let want_ports: std::collections::BTreeSet<u16> =
        starting.iter().map(|t| t.ports[0].port).collect();
    for server in &servers {
        poll(
            &format!("{server} serves both"),
            Duration::from_secs(20),
            || {
                let (_, ips, _) = dig(server, "checked.svc.starling", simple_dns::TYPE::A)?;
                (ips == want_ips).then_some(())
            },
        );
        let (_, _, ports) = dig(
            server,
            "_http._tcp.checked.svc.starling",
            simple_dns::TYPE::SRV,
        )
        .unwrap();
        assert_eq!(ports, want_ports);
    }
    let ttl = dig_ttl(&servers[0], "checked.svc.starling").unwrap();
    assert_eq!(ttl, 7);
    let out = starling(&[
        "service",
        "ps",
        "--data-dir",
        c.dir("m1").to_str().unwrap(),
        "checked",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("(healthy)").count(), 2, "{text}");

    // Unhealthy: its check fails twice in a row, so it is stopped, failed with the reason,
    // gone from every node's answers, and replaced.
    let sick = &starting[0];
    std::fs::remove_file(task_dir(&c, sick).join("health")).unwrap();
    let failed = poll("the sick task failed", Duration::from_secs(30), || {
        let l = rt.block_on(api.tasks(Some("checked"), None)).ok()?;
        l.tasks
            .into_iter()
            .find(|t| t.id == sick.id && t.state == "failed")
    });
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("unhealthy") && e.contains("404")),
        "{failed:?}"
    );
    let healthy_ip = ip_of(&starting[1]);
    for server in &servers {
        poll(
            &format!("{server} stops serving the sick task"),
            Duration::from_secs(20),
            || {
                let (_, ips, _) = dig(server, "checked.svc.starling", simple_dns::TYPE::A)?;
                (ips == std::collections::BTreeSet::from([healthy_ip.clone()])).then_some(())
            },
        );
    }
    let replacement = poll("a replacement runs", Duration::from_secs(30), || {
        tasks(&rt)
            .into_iter()
            .find(|t| t.slot == sick.slot && t.id != sick.id)
    });
    std::fs::write(task_dir(&c, &replacement).join("health"), b"ok").unwrap();
    poll("two healthy tasks again", Duration::from_secs(30), || {
        let r = tasks(&rt);
        (r.len() == 2 && r.iter().all(|t| t.health.as_deref() == Some("healthy"))).then_some(())
    });

    // Scaled to 1: the task that goes is published draining (not served) while its process
    // still answers, for the drain delay, and only then stopped.
    rt.block_on(api.scale_service("checked", 1)).unwrap();
    let (draining, seen) = poll("an endpoint draining", Duration::from_secs(20), || {
        let l = rt
            .block_on(w1.service_endpoints("checked", false, None, None))
            .ok()?;
        l.endpoints
            .into_iter()
            .find(|e| e.health == "draining")
            .map(|e| (e, Instant::now()))
    });
    let port = draining.ports["http"];
    let addr: std::net::SocketAddr = format!("{}:{port}", draining.addr).parse().unwrap();
    // Every node stops serving it while its process still answers.
    for server in &servers {
        poll(
            &format!("{server} stops serving the draining task"),
            Duration::from_secs(10),
            || {
                let (_, ips, _) = dig(server, "checked.svc.starling", simple_dns::TYPE::A)?;
                (!ips.contains(&draining.addr)).then_some(())
            },
        );
    }
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok(),
        "the draining task answers after every node stopped serving it"
    );
    poll("the drained task stopped", Duration::from_secs(30), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .is_err()
            .then_some(())
    });
    let answered_for = seen.elapsed();
    eprintln!("the draining task answered for {answered_for:?} after it was published draining");
    assert!(
        answered_for >= Duration::from_millis(1500),
        "stopped {answered_for:?} after draining began (drain delay 3 s)"
    );
}

/// The TTL of the first answer to an A query for `name`.
fn dig_ttl(server: &str, name: &str) -> Option<u32> {
    let bytes = ask(server, name, simple_dns::TYPE::A)?;
    let p = simple_dns::Packet::parse(&bytes).ok()?;
    p.answers.first().map(|r| r.ttl)
}
