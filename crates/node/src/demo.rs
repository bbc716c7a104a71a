//! `starling demo`: a local cluster on loopback — 3 managers and 3 workers as child
//! processes on 127.0.0.x addresses in a temporary directory — then the leader is killed and
//! writes go on. Everything is stopped and removed at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

struct Proc {
    name: String,
    dir: PathBuf,
    child: Child,
}

struct Demo {
    exe: PathBuf,
    root: PathBuf,
    procs: Vec<Proc>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if p.child.try_wait().ok().flatten().is_none() {
                let _ = Command::new("kill")
                    .args(["-TERM", &p.child.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in &mut self.procs {
            while p.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind((ip, 0))?.local_addr()?.port())
}

impl Demo {
    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(&self.exe).args(args).output()?)
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let dir = self.root.join(name);
        let log = std::fs::File::create(self.root.join(format!("{name}.log")))?;
        let mut all = args.to_vec();
        let d = dir.to_string_lossy().into_owned();
        all.extend(["--data-dir", &d, "--hostname", name]);
        let mut command = Command::new(&self.exe);
        // Six nodes share this machine's cores: one thread each spares them waking each
        // other's threads on every request (README, "Threads"), unless the user chose.
        if std::env::var_os("STARLING_THREADS").is_none() {
            command.env("STARLING_THREADS", "1");
        }
        let child = command
            .args(&all)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.procs.push(Proc {
            name: name.to_owned(),
            dir,
            child,
        });
        Ok(())
    }

    fn nodes(&self, dir: &Path) -> Option<Vec<serde_json::Value>> {
        let out = self
            .run(&[
                "node",
                "ls",
                "--data-dir",
                dir.to_str()?,
                "--format",
                "json",
            ])
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()?
            .as_array()
            .cloned()
    }

    fn wait<T>(
        &self,
        what: &str,
        within: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = f() {
                return Ok(v);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{what} did not happen within {within:?} (logs in {})",
                    self.root.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn show(&self, dir: &Path) -> anyhow::Result<()> {
        let out = self.run(&["node", "ls", "--data-dir", &dir.to_string_lossy()])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        Ok(())
    }
}

/// Runs the demo; returns once everything is stopped and removed.
pub(crate) fn run() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let root = std::env::temp_dir().join(format!("starling-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let mut demo = Demo {
        exe,
        root: root.clone(),
        procs: Vec::new(),
    };
    println!(
        "starling demo: 3 managers and 3 workers on 127.0.0.11-16, data in {}",
        root.display()
    );

    let addr = |i: u8| -> anyhow::Result<String> {
        let ip = format!("127.0.0.{}", 10 + i);
        Ok(format!("{ip}:{}", free_port(&ip)?))
    };
    let m1_addr = addr(1)?;
    demo.spawn("m1", &["init", "--listen", &m1_addr])?;
    let m1_dir = root.join("m1");
    demo.wait("the first manager", Duration::from_secs(30), || {
        demo.nodes(&m1_dir)
    })?;
    let token = |role: &str| -> anyhow::Result<String> {
        let out = demo.run(&[
            "join-token",
            "--data-dir",
            &m1_dir.to_string_lossy(),
            role,
            "-q",
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let (mt, wt) = (token("manager")?, token("worker")?);
    for (i, name) in [(2u8, "m2"), (3, "m3")] {
        let a = addr(i)?;
        demo.spawn(
            name,
            &[
                "join",
                "--listen",
                &a,
                "--token",
                &mt,
                "--manager",
                &m1_addr,
            ],
        )?;
    }
    for (i, name) in [(4u8, "w1"), (5, "w2"), (6, "w3")] {
        let a = addr(i)?;
        demo.spawn(
            name,
            &[
                "join",
                "--listen",
                &a,
                "--token",
                &wt,
                "--manager",
                &m1_addr,
            ],
        )?;
    }
    // Through every manager, not m1 alone: a manager is reachable in the leader's view before
    // it has finished entering the Raft group, and killing the leader then could leave it a
    // voter that never heard of the group.
    let manager_dirs = ["m1", "m2", "m3"].map(|m| root.join(m));
    demo.wait(
        "six nodes with three managers, seen by each manager",
        Duration::from_secs(60),
        || {
            manager_dirs
                .iter()
                .all(|dir| {
                    let Some(list) = demo.nodes(dir) else {
                        return false;
                    };
                    let count = |f: &dyn Fn(&serde_json::Value) -> bool| {
                        list.iter().filter(|n| f(n)).count()
                    };
                    list.len() == 6
                        && count(&|n| n["manager_status"].is_string()) == 3
                        && count(&|n| {
                            n["manager_status"] == "reachable" || n["manager_status"] == "leader"
                        }) == 3
                        && count(&|n| n["manager_status"] == "leader") == 1
                        && list.iter().all(|n| n["status"] == "ready")
                })
                .then_some(())
        },
    )?;
    println!();
    demo.show(&m1_dir)?;

    let put = demo.run(&[
        "kv",
        "put",
        "--data-dir",
        &m1_dir.to_string_lossy(),
        "demo/greeting",
        "hello",
    ])?;
    println!(
        "\nkv put demo/greeting hello -> {}",
        String::from_utf8_lossy(&put.stdout).trim()
    );

    // Kill the leader (kill -9).
    let list = demo.nodes(&m1_dir).context("node ls")?;
    let leader = list
        .iter()
        .find(|n| n["manager_status"] == "leader")
        .and_then(|n| n["hostname"].as_str())
        .context("no leader")?
        .to_owned();
    let idx = demo
        .procs
        .iter()
        .position(|p| p.name == leader)
        .context("leader process")?;
    let killed = Instant::now();
    demo.procs[idx].child.kill()?;
    let _ = demo.procs[idx].child.wait();
    println!("\nkilled the leader {leader} (kill -9)");
    let survivor = demo
        .procs
        .iter()
        .find(|p| p.name.starts_with('m') && p.name != leader)
        .map(|p| p.dir.clone())
        .context("a surviving manager")?;
    let new_leader = demo.wait("a new leader", Duration::from_secs(30), || {
        let list = demo.nodes(&survivor)?;
        list.iter()
            .find(|n| n["manager_status"] == "leader" && n["hostname"] != leader.as_str())
            .and_then(|n| n["hostname"].as_str().map(str::to_owned))
    })?;
    println!(
        "new leader: {new_leader} ({} ms after the kill)",
        killed.elapsed().as_millis()
    );
    let put = demo.run(&[
        "kv",
        "put",
        "--data-dir",
        &survivor.to_string_lossy(),
        "demo/after-failover",
        "still writing",
    ])?;
    if !put.status.success() {
        anyhow::bail!(
            "write after failover failed: {}",
            String::from_utf8_lossy(&put.stderr)
        );
    }
    println!(
        "kv put demo/after-failover -> {}\n",
        String::from_utf8_lossy(&put.stdout).trim()
    );
    demo.show(&survivor)?;
    println!("\nstopping everything and removing {}", root.display());
    drop(demo);
    println!("done");
    Ok(())
}
