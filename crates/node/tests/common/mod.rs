//! What the node's integration tests share: running the `starling` binary, daemons that are
//! killed when dropped, free ports and polling with a deadline.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_starling");

/// A daemon process, killed and reaped when dropped. Its stderr (the log) goes to
/// `<data dir>.log`, printed when the test fails so a failure shows what the node did.
pub(crate) struct Daemon(pub(crate) Child, pub(crate) Option<std::path::PathBuf>);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        // The node's (empty) cgroup for tasks goes with it.
        if let Some(dir) = self
            .1
            .as_ref()
            .and_then(|l| l.to_str()?.strip_suffix(".log"))
            && let Ok(state) = std::fs::read(std::path::Path::new(dir).join("node.json"))
            && let Ok(state) = serde_json::from_slice::<serde_json::Value>(&state)
            && let Some(id) = state["node_id"].as_str()
        {
            starling_agent::cgroup::remove_node_group(id);
        }
        if std::thread::panicking()
            && let Some(log) = &self.1
            && let Ok(text) = std::fs::read_to_string(log)
        {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("---- log of {} (last {} lines)", log.display(), tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// A current-thread runtime for the tests' API clients.
pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A client of the node in `dir`, on its control socket.
pub(crate) fn unix(dir: &std::path::Path) -> starling_api::Client {
    starling_api::Client::unix(dir.join("control.sock"))
}

/// Waits until the node in `dir` (called `name`) answers on its own control socket: the
/// leader lists a joining node before that node has bound its socket.
pub(crate) fn wait_serving(rt: &tokio::runtime::Runtime, dir: &std::path::Path, name: &str) {
    let client = unix(dir);
    poll(
        &format!("{name} serves its control socket"),
        Duration::from_secs(30),
        || rt.block_on(client.info()).ok(),
    );
}

/// The arguments of `starling join` for a node named `name` in `dir`, on a free port.
pub(crate) fn join_args(
    dir: &std::path::Path,
    name: &str,
    token: &str,
    manager: &str,
) -> Vec<String> {
    [
        "join",
        "--data-dir",
        dir.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--hostname",
        name,
        "--token",
        token,
        "--manager",
        manager,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A free UDP port on 127.0.0.1, below the kernel's ephemeral range (32768 and up on
/// Linux). A node stopped and started again on its port (a restart, a renewal test) would
/// otherwise find it taken in between by another process's ephemeral socket — a client's
/// endpoint, a test running beside it — and fail with "address already in use".
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test processes running beside each other start at places far apart (a multiplicative
    // hash of the pid), then go up one port at a time.
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(port).unwrap();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free UDP port on 127.0.0.1 from {LOW} to {}",
        LOW + SPAN - 1
    );
}

pub(crate) fn starling(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

pub(crate) fn spawn(args: &[&str]) -> Daemon {
    spawn_with_env(args, &[])
}

/// [`spawn`] with environment variables set for the daemon.
pub(crate) fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
    let log = args
        .iter()
        .position(|a| *a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(|d| std::path::PathBuf::from(format!("{d}.log")));
    let stderr = match &log {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
        None => Stdio::null(),
    };
    let child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    Daemon(child, log)
}

pub(crate) fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
