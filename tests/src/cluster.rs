//! Real `starling` processes, one per network namespace, and blocking calls to their control
//! sockets through the typed API client.
//!
//! Each host runs the daemon as `ip netns exec <ns> starling …` (the `ip` process execs into
//! `starling`, so the child's pid is the daemon's). Its log (stderr) goes to `<dir>.log`, and
//! the tail of every log is printed when a test fails. The control socket is a Unix socket in
//! the data directory, reachable from the test process whatever the network namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::net::Net;

/// The UDP port every daemon listens on (each host has its own address).
pub const PORT: u16 = 7700;

static SERIAL: Mutex<()> = Mutex::new(());

/// The `starling` binary: `STARLING_BIN`, or the one cargo built beside this test.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("STARLING_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/starling
    let profile_dir = exe.parent().and_then(Path::parent);
    let bin = profile_dir.map(|d| d.join("starling")).unwrap_or_default();
    // Under `cargo test` (which sets CARGO), bring the binary up to date first: `cargo test
    // -p starling-tests` alone would not build another package's binary.
    static BUILT: std::sync::Once = std::sync::Once::new();
    if let Some(cargo) = std::env::var_os("CARGO") {
        BUILT.call_once(|| {
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "-p", "starling-node", "--bin", "starling"]);
            if profile_dir.and_then(Path::file_name) == Some(std::ffi::OsStr::new("release")) {
                cmd.arg("--release");
            }
            match cmd.status() {
                Ok(s) if s.success() => {}
                other => panic!("building the starling binary failed: {other:?}"),
            }
        });
    }
    assert!(
        bin.exists(),
        "the starling binary is not at {}: build it first (`cargo build -p starling-node`; \
         `cargo test --workspace` builds it) or set STARLING_BIN",
        bin.display()
    );
    bin
}

/// Polls `f` every 50 ms until it returns `Some`, panicking with `what` after `within`.
pub fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Why a control call has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The request was never delivered (no socket, connection refused): it had no effect.
    NotSent(String),
    /// The request was sent but no answer came (timeout, connection lost): it may or may not
    /// have taken effect.
    Unknown(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotSent(e) => write!(f, "not sent: {e}"),
            CallError::Unknown(e) => write!(f, "no answer: {e}"),
        }
    }
}

/// One request over a control socket with the typed API client, answered as `(status,
/// JSON body)`; blocking (a runtime of its own), bounded by `timeout`.
pub fn call(
    socket: &Path,
    method: &str,
    target: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Value), CallError> {
    let method = starling_api::http::Method::from_bytes(method.as_bytes())
        .map_err(|e| CallError::NotSent(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CallError::NotSent(e.to_string()))?;
    let client = starling_api::Client::unix(socket);
    let body = bytes::Bytes::copy_from_slice(body);
    let answer = runtime
        .block_on(async { tokio::time::timeout(timeout, client.raw(method, target, body)).await });
    match answer {
        Ok(Ok(r)) => {
            let value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()));
            Ok((r.status, value))
        }
        Ok(Err(starling_api::ClientError::NotSent(e))) => Err(CallError::NotSent(e)),
        Ok(Err(e)) => Err(CallError::Unknown(e.to_string())),
        Err(_) => Err(CallError::Unknown(format!("no answer within {timeout:?}"))),
    }
}

/// A key's value and `mod_revision`, or `None` if absent.
pub type KvRead = Option<(String, u64)>;

/// Percent-encodes a key for a path.
pub fn encode(key: &str) -> String {
    starling_api::percent_encode(key)
}

/// A daemon process, by pid.
#[derive(Debug)]
struct Proc {
    child: Child,
    paused: bool,
}

impl Proc {
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }
}

/// The hosts of one test, each with a data directory and maybe a running daemon. Dropping it
/// kills every daemon (by pid), removes the namespaces and the directories.
#[derive(Debug)]
pub struct Cluster {
    procs: Vec<Option<Proc>>,
    /// The namespaces and faults.
    pub net: Net,
    dirs: Vec<PathBuf>,
    env: Vec<(String, String)>,
    bin: PathBuf,
    tmp: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// `n` hosts, no daemon running yet. Tests in one process run one at a time.
    pub fn new(n: usize) -> Cluster {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = crate::net::preflight() {
            panic!("{e}");
        }
        let bin = binary();
        let net = Net::new(n).unwrap_or_else(|e| panic!("cannot build the test network: {e}"));
        let tmp = tempfile::Builder::new()
            .prefix("starling-netns-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let dirs = (0..n)
            .map(|i| tmp.path().join(format!("h{}", i + 1)))
            .collect();
        Cluster {
            procs: (0..n).map(|_| None).collect(),
            net,
            dirs,
            env: Vec::new(),
            bin,
            tmp,
            _serial: serial,
        }
    }

    /// Adds a host (a new namespace on the bridge, a data directory, no daemon yet): a
    /// machine that comes after the cluster formed. Returns its index, for [`Cluster::join`].
    pub fn add_host(&mut self) -> usize {
        let i = self
            .net
            .add_host()
            .unwrap_or_else(|e| panic!("cannot add a host to the test network: {e}"));
        self.dirs.push(self.tmp.path().join(format!("h{}", i + 1)));
        self.procs.push(None);
        i
    }

    /// Sets an environment variable for every daemon started from now on (such as
    /// `STARLING_SNAPSHOT_INTERVAL`).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// How many hosts.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// Whether there are no hosts.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Host `i`'s daemon address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}:{PORT}", self.net.hosts[i].addr)
    }

    /// Host `i`'s data directory.
    pub fn dir(&self, i: usize) -> &Path {
        &self.dirs[i]
    }

    /// The live task processes the agents of `hosts` recorded under their data
    /// directories: task id → pid.
    pub fn task_processes(
        &self,
        hosts: impl IntoIterator<Item = usize>,
    ) -> std::collections::BTreeMap<String, i32> {
        let mut live = std::collections::BTreeMap::new();
        for i in hosts {
            for t in std::fs::read_dir(self.dir(i).join("tasks"))
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Some(s) = starling_agent::exec::recorded(&t.path())
                    && starling_agent::exec::alive(&s)
                {
                    live.insert(t.file_name().to_string_lossy().into_owned(), s.pid);
                }
            }
        }
        live
    }

    /// Host `i`'s control socket.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.dirs[i].join("control.sock")
    }

    /// A scratch directory that goes away with the cluster.
    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }

    fn spawn(&mut self, i: usize, args: &[&str]) {
        assert!(
            self.procs[i].is_none(),
            "host {} already runs a daemon",
            i + 1
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap_or_else(|e| panic!("log file: {e}"));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.net.hosts[i].ns])
            .arg(&self.bin)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start starling on host {}: {e}", i + 1));
        self.procs[i] = Some(Proc {
            child,
            paused: false,
        });
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.tmp.path().join(format!("h{}.log", i + 1))
    }

    fn host_args(&self, i: usize) -> (String, String, String) {
        (
            self.dirs[i].display().to_string(),
            self.addr(i),
            format!("h{}", i + 1),
        )
    }

    /// `starling init` on host `i`; returns once its control socket answers.
    pub fn init(&mut self, i: usize) {
        let (dir, addr, name) = self.host_args(i);
        self.spawn(
            i,
            &[
                "init",
                "--data-dir",
                &dir,
                "--listen",
                &addr,
                "--hostname",
                &name,
            ],
        );
        self.wait_serving(i);
    }

    /// `starling join` on host `i` with `token` through the manager on host `via`; returns
    /// once its control socket answers.
    pub fn join(&mut self, i: usize, token: &str, via: usize) {
        let args = self.join_args(i, token, via);
        self.spawn(i, &args.iter().map(String::as_str).collect::<Vec<_>>());
        self.wait_serving(i);
    }

    /// `starling join` on host `i` that is expected to end (be refused): its exit status,
    /// or `None` if it still runs after `within` (then it is killed).
    pub fn join_to_end(
        &mut self,
        i: usize,
        token: &str,
        via: usize,
        within: Duration,
    ) -> Option<bool> {
        let args = self.join_args(i, token, via);
        self.run_to_end(
            i,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            within,
        )
    }

    fn join_args(&self, i: usize, token: &str, via: usize) -> Vec<String> {
        let (dir, addr, name) = self.host_args(i);
        [
            "join",
            "--data-dir",
            &dir,
            "--listen",
            &addr,
            "--hostname",
            &name,
            "--token",
            token,
            "--manager",
            &self.addr(via),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `starling run` on host `i` (a restart on its data directory).
    pub fn restart(&mut self, i: usize) {
        self.restart_with(i, &[]);
    }

    /// `starling run` on host `i` with extra arguments (`--force-new-cluster`); returns once
    /// its control socket answers.
    pub fn restart_with(&mut self, i: usize, extra: &[&str]) {
        let dir = self.dirs[i].display().to_string();
        let mut args = vec!["run", "--data-dir", &dir];
        args.extend_from_slice(extra);
        self.spawn(i, &args);
        self.wait_serving(i);
    }

    /// Starts `starling <args>` on host `i` without waiting (for a join that should fail).
    /// Returns its exit status and log once it ends, or `None` if it still runs after
    /// `within` (then it is killed).
    pub fn run_to_end(&mut self, i: usize, args: &[&str], within: Duration) -> Option<bool> {
        self.spawn(i, args);
        let deadline = Instant::now() + within;
        loop {
            let p = self.procs[i].as_mut()?;
            if let Ok(Some(status)) = p.child.try_wait() {
                self.procs[i] = None;
                return Some(status.success());
            }
            if Instant::now() >= deadline {
                self.kill(i);
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_serving(&mut self, i: usize) {
        let socket = self.socket(i);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if call(&socket, "GET", "/v1/info", b"", Duration::from_secs(2))
                .is_ok_and(|(s, _)| s == 200)
            {
                return;
            }
            if let Some(p) = self.procs[i].as_mut()
                && let Ok(Some(status)) = p.child.try_wait()
            {
                self.procs[i] = None;
                panic!(
                    "the daemon on host {} exited ({status}) before serving:\n{}",
                    i + 1,
                    self.log_tail(i, 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "host {} not serving its control socket within 30 s",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether host `i` runs a daemon (that has not exited).
    pub fn running(&mut self, i: usize) -> bool {
        match self.procs[i].as_mut() {
            Some(p) => !matches!(p.child.try_wait(), Ok(Some(_))),
            None => false,
        }
    }

    /// kill -9 host `i`'s daemon and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// SIGSTOP host `i`'s daemon.
    pub fn pause(&mut self, i: usize) {
        if let Some(p) = self.procs[i].as_mut() {
            p.signal("-STOP");
            p.paused = true;
        }
    }

    /// SIGCONT host `i`'s daemon.
    pub fn resume(&mut self, i: usize) {
        if let Some(p) = self.procs[i].as_mut() {
            p.signal("-CONT");
            p.paused = false;
        }
    }

    /// A control call to host `i` with a 10 s timeout.
    pub fn api(
        &self,
        i: usize,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> Result<(u16, Value), CallError> {
        call(
            &self.socket(i),
            method,
            target,
            body,
            Duration::from_secs(10),
        )
    }

    /// `GET /v1/info` on host `i`.
    pub fn info(&self, i: usize) -> Option<Value> {
        match self.api(i, "GET", "/v1/info", b"") {
            Ok((200, v)) => Some(v),
            _ => None,
        }
    }

    /// `node ls` on host `i` as JSON rows, when it answers with 200 and no warning.
    pub fn nodes(&self, i: usize) -> Option<Vec<Value>> {
        match self.api(i, "GET", "/v1/nodes", b"") {
            Ok((200, v)) if v.get("warning").is_none_or(Value::is_null) => {
                v["nodes"].as_array().cloned()
            }
            _ => None,
        }
    }

    /// The join token for `role` from manager `i`.
    pub fn token(&self, i: usize, role: &str) -> String {
        match self.api(i, "GET", &format!("/v1/join-token/{role}"), b"") {
            Ok((200, v)) => v["token"].as_str().unwrap_or_default().to_owned(),
            other => panic!("join-token {role} on host {}: {other:?}", i + 1),
        }
    }

    /// `PUT /v1/kv/{key}` on host `i`: the revision, or the error status and message.
    pub fn put(&self, i: usize, key: &str, value: &str) -> Result<u64, (u16, String)> {
        match self.api(
            i,
            "PUT",
            &format!("/v1/kv/{}", encode(key)),
            value.as_bytes(),
        ) {
            Ok((200, v)) => Ok(v["revision"].as_u64().unwrap_or(0)),
            Ok((s, v)) => Err((s, v["error"].as_str().unwrap_or_default().to_owned())),
            Err(e) => Err((0, e.to_string())),
        }
    }

    /// `GET /v1/kv/{key}` on host `i`: `(value, mod_revision)` or `None` if absent, with the
    /// revision the answer reflects.
    pub fn get(
        &self,
        i: usize,
        key: &str,
        consistency: &str,
    ) -> Result<(KvRead, u64), (u16, String)> {
        let target = format!("/v1/kv/{}?consistency={consistency}", encode(key));
        match self.api(i, "GET", &target, b"") {
            Ok((200, v)) => Ok((
                Some((
                    v["value"].as_str().unwrap_or_default().to_owned(),
                    v["mod_revision"].as_u64().unwrap_or(0),
                )),
                v["revision"].as_u64().unwrap_or(0),
            )),
            Ok((404, v)) => Ok((None, v["revision"].as_u64().unwrap_or(0))),
            Ok((s, v)) => Err((s, v["error"].as_str().unwrap_or_default().to_owned())),
            Err(e) => Err((0, e.to_string())),
        }
    }

    /// The host whose daemon leads, as every answering manager among `managers` sees it:
    /// `Some` only when they agree.
    pub fn leader(&self, managers: &[usize]) -> Option<usize> {
        let infos: Vec<(usize, Value)> = managers
            .iter()
            .filter_map(|&i| self.info(i).map(|v| (i, v)))
            .collect();
        let leader_raft_id = infos.first()?.1["raft"]["leader"].as_u64()?;
        if infos
            .iter()
            .any(|(_, v)| v["raft"]["leader"].as_u64() != Some(leader_raft_id))
        {
            return None;
        }
        infos
            .iter()
            .find(|(_, v)| v["raft"]["id"].as_u64() == Some(leader_raft_id))
            .map(|(i, _)| *i)
    }

    /// Polls until `managers` agree on a leader among themselves; returns it.
    pub fn wait_leader(&self, managers: &[usize], within: Duration) -> usize {
        poll("one leader agreed by the managers", within, || {
            self.leader(managers)
        })
    }

    /// The last `lines` lines of host `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Host `i`'s whole log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// A cluster of `managers` managers (hosts 0..managers) and `workers` workers (the next
    /// hosts), formed through tokens from host 0; returns once every node is `ready` in
    /// `node ls` and the managers are all reachable.
    pub fn form(managers: usize, workers: usize) -> Cluster {
        Cluster::form_with_env(managers, workers, &[])
    }

    /// [`Cluster::form`] with environment variables set for every daemon (see
    /// [`Cluster::set_env`]).
    pub fn form_with_env(managers: usize, workers: usize, env: &[(&str, &str)]) -> Cluster {
        let mut c = Cluster::new(managers + workers);
        for (k, v) in env {
            c.set_env(k, v);
        }
        c.init(0);
        let mt = c.token(0, "manager");
        let wt = c.token(0, "worker");
        for i in 1..managers {
            c.join(i, &mt, 0);
        }
        for i in managers..managers + workers {
            c.join(i, &wt, 0);
        }
        let total = managers + workers;
        poll(
            "every node ready, every manager reachable",
            Duration::from_secs(60),
            || {
                let rows = c.nodes(0)?;
                let ok = rows.len() == total
                    && rows.iter().all(|r| r["status"] == "ready")
                    && rows.iter().filter(|r| r["role"] == "manager").count() == managers
                    && rows.iter().all(|r| {
                        r["role"] != "manager"
                            || r["manager_status"] == "leader"
                            || r["manager_status"] == "reachable"
                    });
                ok.then_some(())
            },
        );
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            if let Some(p) = self.procs[i].as_mut()
                && p.paused
            {
                p.signal("-CONT");
            }
            self.kill(i);
        }
        if std::thread::panicking() {
            for i in 0..self.dirs.len() {
                eprintln!("---- log of host {} ({})", i + 1, self.net.hosts[i].addr);
                eprintln!("{}", self.log_tail(i, 40));
            }
        }
    }
}
