//! The two systems under test, each as three real processes on loopback with data on disk:
//! Starling (the `starling` binary: `init`, then two `join --token`) and etcd 3.4 (`etcd` from
//! Debian's `etcd-server`). Both are killed (by pid) and their data removed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// A process killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc(Child);

impl Proc {
    /// Starts `cmd` with its stderr appended to `log`.
    pub fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(Proc(child))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }

    /// kill -9 and reap.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port on 127.0.0.1 free for both UDP and TCP right now, never handed out before by this
/// process, below the kernel's ephemeral range (32768 and up on Linux).
///
/// A node binds UDP (QUIC) on it and its clients TCP, some time after this returns. A port
/// the kernel chose (bind to port 0) could be chosen again in between — for the next node
/// (101 draws repeat one in about a sixth of the runs) or for a client's socket — and that
/// node would fail with "address already in use".
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Runs beside each other start far apart (a multiplicative hash of the pid), then go up
    // one port at a time.
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(port).expect("below 32 000");
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!(
        "no port free for both UDP and TCP on 127.0.0.1 from {LOW} to {}",
        LOW + SPAN - 1
    )
}

/// Polls `f` until it returns `Some`, at most `within`.
pub async fn poll<T, F, Fut>(what: &str, within: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits `within` until `want` nodes are ready as `client` lists them (of `role`, or of
/// any role with `None`; a manager also reachable in the Raft group). `gone` is asked
/// before each look; an error from it (a node's process that exited, see [`exited`]) ends
/// the wait at once.
pub async fn ready_nodes(
    client: &starling_api::Client,
    role: Option<starling_api::NodeRole>,
    want: usize,
    within: Duration,
    mut gone: impl FnMut() -> Option<anyhow::Error>,
) -> anyhow::Result<()> {
    let what = match role {
        Some(role) => format!("{want} {role:?} node(s) ready"),
        None => format!("{want} node(s) ready"),
    };
    poll(&what, within, || {
        let gone = gone();
        async move {
            if let Some(e) = gone {
                return Some(Err(e));
            }
            let list = client.nodes().await.ok()?;
            let n = list
                .nodes
                .iter()
                .filter(|n| role.is_none_or(|r| n.role == r))
                .filter(|n| n.status == starling_api::NodeStatus::Ready)
                // A manager is ready in gossip before it has entered the Raft group: count
                // it once it is reachable there too (the next join is then not a second
                // membership change under way).
                .filter(|n| {
                    n.role != starling_api::NodeRole::Manager
                        || matches!(
                            n.manager_status,
                            Some(
                                starling_api::ManagerStatus::Leader
                                    | starling_api::ManagerStatus::Reachable
                            )
                        )
                })
                .count();
            (n >= want).then_some(Ok(()))
        }
    })
    .await?
}

/// An error naming the first of `procs` (each with its name, its log at `base/<name>.log`)
/// that has exited, with the end of its log: a node that cannot start is reported at once,
/// not after the whole wait for every node to be ready.
pub fn exited<'a>(
    base: &Path,
    procs: impl IntoIterator<Item = (&'a str, &'a mut Proc)>,
) -> Option<anyhow::Error> {
    let (name, status) = procs
        .into_iter()
        .find_map(|(name, p)| p.exited().map(|status| (name, status)))?;
    let log = base.join(format!("{name}.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Some(anyhow::anyhow!(
        "{name} exited ({status}) before the cluster was ready; the end of {}:\n{}",
        log.display(),
        tail.join("\n")
    ))
}

/// The `starling` binary built beside this one (built first when run under cargo).
pub fn starling_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("STARLING_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/starling-bench, or target/<profile>/deps/<test> in tests.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "starling-node", "--bin", "starling"]);
        // Under `cargo run`, this process has the bench package's CARGO_PKG_* and
        // CARGO_MANIFEST_* variables; build scripts that watch them (ring's does) would see
        // them change from a plain `cargo build` and rebuild ring and everything above it.
        for (name, _) in std::env::vars_os() {
            let name_str = name.to_string_lossy();
            if name_str.starts_with("CARGO_PKG_")
                || name_str.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&name_str.as_ref())
            {
                cmd.env_remove(&name);
            }
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status()?;
        if !status.success() {
            bail!("building the starling binary failed");
        }
    }
    let bin = dir.join("starling");
    if !bin.exists() {
        bail!(
            "no starling binary at {}: build it (cargo build --release -p starling-node) or set STARLING_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// Three members of each system share this machine's cores: each Starling node runs its
/// async code on one thread (tokio's current-thread runtime) and each etcd member one Go
/// scheduler thread (`GOMAXPROCS`), so neither wakes idle threads of its own on every request.
pub const THREADS: (&str, &str) = ("STARLING_THREADS", "1");

/// A command running the `starling` binary `bin` as a bench node (with [`THREADS`]).
fn node_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env(THREADS.0, THREADS.1);
    cmd
}

/// The same for etcd: see [`THREADS`].
pub const GO_THREADS: (&str, &str) = ("GOMAXPROCS", "1");

/// A Starling manager.
#[derive(Debug)]
pub struct StarlingMember {
    /// Data directory.
    pub dir: PathBuf,
    /// UDP address.
    pub addr: SocketAddr,
    /// Node id (the name a remote client expects in its certificate).
    pub node_id: String,
    proc: Option<Proc>,
}

impl StarlingMember {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Its control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
}

/// Three Starling managers (and any workers joined for the join measure).
#[derive(Debug)]
pub struct Starling {
    bin: PathBuf,
    base: PathBuf,
    /// The managers.
    pub members: Vec<StarlingMember>,
    workers: Vec<Proc>,
    /// An admin client certificate for the remote API (`starling cert issue`), with the CA.
    pub admin: Option<starling_transport::NodeCredentials>,
}

/// One control call on a fresh connection; `(status, body)`.
pub async fn control(socket: &Path, method: &str, target: &str) -> Option<(u16, Value)> {
    let method = starling_api::http::Method::from_bytes(method.as_bytes()).ok()?;
    let r = starling_api::Client::unix(socket)
        .raw(method, target, bytes::Bytes::new())
        .await
        .ok()?;
    Some((
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    ))
}

impl Starling {
    /// The process ids of the running managers.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(StarlingMember::pid)
            .collect()
    }

    /// Starts `n` managers under `base`.
    pub async fn start(base: &Path, n: usize) -> anyhow::Result<Starling> {
        let bin = starling_binary()?;
        std::fs::create_dir_all(base)?;
        let mut s = Starling {
            bin,
            base: base.to_path_buf(),
            members: Vec::new(),
            workers: Vec::new(),
            admin: None,
        };
        for i in 0..n {
            let dir = base.join(format!("m{i}"));
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            let listen = addr.to_string();
            let d = dir.display().to_string();
            let name = format!("m{i}");
            let mut args = vec!["--data-dir", &d, "--listen", &listen, "--hostname", &name];
            let token;
            let via;
            let mut cmd = node_command(&s.bin);
            if i == 0 {
                cmd.arg("init");
            } else {
                token = s.token("manager").await?;
                via = s.members[0].addr.to_string();
                cmd.arg("join");
                args.extend(["--token", &token, "--manager", &via]);
            }
            cmd.args(&args);
            let proc = Proc::spawn(&mut cmd, &base.join(format!("m{i}.log")))?;
            s.members.push(StarlingMember {
                dir,
                addr,
                node_id: String::new(),
                proc: Some(proc),
            });
            s.wait_serving(i).await?;
            let info = starling_api::Client::unix(s.members[i].socket())
                .info()
                .await
                .context("node info")?;
            s.members[i].node_id = info.node_id;
        }
        s.wait_healthy().await?;
        s.admin = Some(s.issue_admin()?);
        Ok(s)
    }

    /// An admin certificate for the remote API, issued the way an operator does it.
    fn issue_admin(&self) -> anyhow::Result<starling_transport::NodeCredentials> {
        let ctx = self.base.join("context");
        let out = Command::new(&self.bin)
            .args([
                "cert", "issue", "--role", "admin", "--name", "bench", "--out",
            ])
            .arg(&ctx)
            .arg("--data-dir")
            .arg(&self.members[0].dir)
            .env("STARLING_HOME", self.base.join("home"))
            .output()?;
        if !out.status.success() {
            bail!(
                "starling cert issue: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(starling_api::Context::load(&ctx)?.credentials()?)
    }

    /// A remote API client (QUIC, `starling/api/1`) of manager `i` alone.
    pub fn remote_client(&self, i: usize) -> anyhow::Result<starling_api::Client> {
        let creds = self.admin.clone().context("no admin certificate")?;
        let m = &self.members[i];
        Ok(starling_api::Client::remote(
            creds,
            vec![starling_api::ManagerAddr {
                node_id: m.node_id.clone(),
                addr: m.addr.to_string(),
            }],
            Duration::from_secs(5),
        )?)
    }

    /// A QUIC endpoint with the admin certificate, for remote clients to share
    /// ([`starling_api::Client::remote_on`]).
    pub fn client_endpoint(&self) -> anyhow::Result<starling_transport::Endpoint> {
        let creds = self.admin.clone().context("no admin certificate")?;
        let cfg = starling_transport::EndpointConfig {
            listen: "127.0.0.1:0".parse()?,
            ..starling_transport::EndpointConfig::default()
        };
        Ok(starling_transport::Endpoint::bind(
            cfg,
            starling_transport::ring_provider(),
            Some(creds),
        )?)
    }

    async fn token(&self, role: &str) -> anyhow::Result<String> {
        let (_, v) = control(
            &self.members[0].socket(),
            "GET",
            &format!("/v1/join-token/{role}"),
        )
        .await
        .context("no join token")?;
        Ok(v["token"].as_str().unwrap_or_default().to_owned())
    }

    async fn wait_serving(&self, i: usize) -> anyhow::Result<()> {
        let socket = self.members[i].socket();
        poll(
            "a Starling manager serving",
            Duration::from_secs(30),
            || {
                let socket = socket.clone();
                async move {
                    control(&socket, "GET", "/v1/info")
                        .await
                        .filter(|(s, _)| *s == 200)
                }
            },
        )
        .await
        .map(|_| ())
    }

    /// The index of the leader, when every running manager agrees on it.
    pub async fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        for m in self.members.iter().filter(|m| m.proc.is_some()) {
            let (_, v) = control(&m.socket(), "GET", "/v1/info").await?;
            ids.push((v["raft"]["id"].as_u64()?, v["raft"]["leader"].as_u64()?));
        }
        let leader = ids.first()?.1;
        if ids.iter().any(|(_, l)| *l != leader) {
            return None;
        }
        ids.iter().position(|(id, _)| *id == leader)
    }

    /// The highest Raft term of the running managers.
    pub async fn term(&self) -> anyhow::Result<u64> {
        let mut term = 0;
        for m in self.members.iter().filter(|m| m.proc.is_some()) {
            let (_, v) = control(&m.socket(), "GET", "/v1/info")
                .await
                .ok_or_else(|| anyhow::anyhow!("{}: no /v1/info", m.node_id))?;
            let t = v["raft"]["term"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("{}: no raft term in /v1/info", m.node_id))?;
            term = term.max(t);
        }
        Ok(term)
    }

    /// Waits until all managers agree on a leader and every one is reachable.
    pub async fn wait_healthy(&self) -> anyhow::Result<usize> {
        poll(
            "the Starling managers healthy",
            Duration::from_secs(60),
            || async {
                let l = self.leader().await?;
                let (_, v) = control(&self.members[l].socket(), "GET", "/v1/nodes").await?;
                let rows = v["nodes"].as_array()?;
                let managers: Vec<&Value> =
                    rows.iter().filter(|r| r["role"] == "manager").collect();
                (managers.len() == self.members.len()
                    && managers.iter().all(|r| {
                        r["manager_status"] == "leader" || r["manager_status"] == "reachable"
                    }))
                .then_some(l)
            },
        )
        .await
    }

    /// kill -9 manager `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Restarts manager `i` on its data directory.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let d = self.members[i].dir.display().to_string();
        let mut cmd = node_command(&self.bin);
        cmd.args(["run", "--data-dir", &d]);
        let proc = Proc::spawn(&mut cmd, &self.base.join(format!("m{i}.log")))?;
        self.members[i].proc = Some(proc);
        self.wait_serving(i).await
    }

    /// A keep-alive client of manager `i`.
    pub fn client(&self, i: usize) -> starling_api::Client {
        starling_api::Client::unix(self.members[i].socket())
    }

    /// Starts `starling join` for a new worker and returns the time until `ready` in
    /// `node ls` (polled every 2 ms on the leader).
    pub async fn join_worker(&mut self, n: usize) -> anyhow::Result<Duration> {
        let token = self.token("worker").await?;
        let dir = self.base.join(format!("w{n}"));
        let d = dir.display().to_string();
        let listen = format!("127.0.0.1:{}", free_port()?);
        let name = format!("w{n}");
        let via = self.members[0].addr.to_string();
        let leader = self.leader().await.context("no leader")?;
        let socket = self.members[leader].socket();
        let mut cmd = node_command(&self.bin);
        cmd.args([
            "join",
            "--data-dir",
            &d,
            "--listen",
            &listen,
            "--hostname",
            &name,
            "--token",
            &token,
            "--manager",
            &via,
        ]);
        let t0 = Instant::now();
        self.workers
            .push(Proc::spawn(&mut cmd, &self.base.join(format!("w{n}.log")))?);
        let client = starling_api::Client::unix(&socket);
        loop {
            if let Ok(list) = client.nodes().await {
                let ready = list.nodes.iter().any(|r| {
                    r.hostname == name.as_str() && r.status == starling_api::NodeStatus::Ready
                });
                if ready {
                    return Ok(t0.elapsed());
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("worker {name} not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// An etcd member.
#[derive(Debug)]
pub struct EtcdMember {
    /// `e0`, `e1`, …
    pub name: String,
    /// The client URL (`http://127.0.0.1:port`).
    pub client_url: String,
    peer_url: String,
    dir: PathBuf,
    proc: Option<Proc>,
}

/// Three etcd members.
#[derive(Debug)]
pub struct Etcd {
    base: PathBuf,
    initial_cluster: String,
    /// The members.
    pub members: Vec<EtcdMember>,
}

/// Whether `etcd` is on PATH, with how to get it if not.
pub fn etcd_available() -> anyhow::Result<String> {
    match Command::new("etcd").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()),
        _ => bail!(
            "etcd is not on PATH: install etcd 3.4 (Debian: apt-get install -y etcd-server) to run the comparison"
        ),
    }
}

impl Etcd {
    /// The process ids of the running members.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.proc.as_ref().map(Proc::pid))
            .collect()
    }

    /// Starts `n` members under `base`. Ports are picked free but could be taken by another
    /// process before etcd binds them (tests run beside each other): a cluster not healthy
    /// within 30 s is stopped and started again on new ports, three times at most; the error
    /// then carries the members' logs.
    pub async fn start(base: &Path, n: usize) -> anyhow::Result<Etcd> {
        etcd_available()?;
        let mut why = String::new();
        for attempt in 1..=3 {
            let dir = base.join(format!("start-{attempt}"));
            let e = Self::start_once(&dir, n).await?;
            match e.wait_healthy_within(Duration::from_secs(30)).await {
                Ok(_) => return Ok(e),
                Err(err) => {
                    why = format!("attempt {attempt}: {err}\n{}", e.log_tails());
                    eprintln!("starling-bench: etcd not healthy, starting again: {why}");
                }
            }
        }
        bail!("etcd did not start in 3 attempts; the last: {why}")
    }

    /// The last lines of each member's log.
    fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.base.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                format!("{}:\n{tail}", m.name)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn start_once(base: &Path, n: usize) -> anyhow::Result<Etcd> {
        std::fs::create_dir_all(base)?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(EtcdMember {
                name: format!("e{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()?),
                peer_url: format!("http://127.0.0.1:{}", free_port()?),
                dir: base.join(format!("e{i}")),
                proc: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut e = Etcd {
            base: base.to_path_buf(),
            initial_cluster,
            members,
        };
        for i in 0..n {
            e.spawn(i)?;
        }
        Ok(e)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &self.members[i];
        let mut cmd = Command::new("etcd");
        cmd.env(GO_THREADS.0, GO_THREADS.1);
        cmd.args([
            "--name",
            &m.name,
            "--data-dir",
            &m.dir.display().to_string(),
            "--listen-client-urls",
            &m.client_url,
            "--advertise-client-urls",
            &m.client_url,
            "--listen-peer-urls",
            &m.peer_url,
            "--initial-advertise-peer-urls",
            &m.peer_url,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &format!("bench-{}", std::process::id()),
            "--log-level",
            "error",
        ]);
        let proc = Proc::spawn(&mut cmd, &self.base.join(format!("{}.log", m.name)))?;
        self.members[i].proc = Some(proc);
        Ok(())
    }

    /// A client of member `i` only.
    pub async fn client(&self, i: usize) -> anyhow::Result<etcd_client::Client> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Ok(etcd_client::Client::connect([self.members[i].client_url.as_str()], Some(opts)).await?)
    }

    /// The index of the leader, when every running member agrees on it.
    pub async fn leader(&self) -> Option<usize> {
        let mut views = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.proc.is_none() {
                continue;
            }
            let mut c = self.client(i).await.ok()?;
            let s = c.status().await.ok()?;
            views.push((s.header()?.member_id(), s.leader()));
        }
        let leader = views.first()?.1;
        if leader == 0 || views.iter().any(|(_, l)| *l != leader) {
            return None;
        }
        // Member ids come from the status of each member, in member order.
        let mut i = 0;
        for (idx, m) in self.members.iter().enumerate() {
            if m.proc.is_none() {
                continue;
            }
            if views[i].0 == leader {
                return Some(idx);
            }
            i += 1;
        }
        None
    }

    /// The highest Raft term of the running members.
    pub async fn term(&self) -> anyhow::Result<u64> {
        let mut term = 0;
        for (i, m) in self.members.iter().enumerate() {
            if m.proc.is_some() {
                let status = self.client(i).await?.status().await?;
                term = term.max(status.raft_term());
            }
        }
        Ok(term)
    }

    /// Waits until every member runs and all agree on a leader.
    pub async fn wait_healthy(&self) -> anyhow::Result<usize> {
        self.wait_healthy_within(Duration::from_secs(60)).await
    }

    async fn wait_healthy_within(&self, within: Duration) -> anyhow::Result<usize> {
        poll("the etcd members healthy", within, || async {
            if self.members.iter().any(|m| m.proc.is_none()) {
                return None;
            }
            self.leader().await
        })
        .await
    }

    /// kill -9 member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Restarts member `i` on its data directory.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i)
    }
}
