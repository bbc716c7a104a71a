//! The process executor: a task is an OS process in its own process group, its output in
//! size-capped log files under the task's directory, stopped with its stop signal and then
//! killed as a group after the grace period. What a started process is (pid and start time)
//! is written beside it so an agent that restarts adopts it instead of starting it twice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use starling_state::{ExitInfo, Task};

/// Each log file is cut to this size (the older part moves to `<name>.1`).
pub const LOG_CAP: u64 = 8 << 20;

/// How tasks are isolated on this node.
pub fn isolation() -> &'static str {
    // cgroup v2 limits are not applied yet: tasks are process groups.
    "process-group"
}

/// What is written beside a started task.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    /// Its process id (also its process group id).
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22), so a pid
    /// reused by another process is not mistaken for it.
    pub start_time: u64,
}

/// The environment and identity a task starts with, beyond its spec.
#[derive(Clone, Debug)]
pub struct Context {
    /// The node's advertised IP (`STARLING_HOST_IP`).
    pub host_ip: String,
    /// The directory for this task (logs, `started.json`, default working directory).
    pub dir: PathBuf,
}

/// A spawned task process.
pub struct Spawned {
    /// The child (waited on by the driver).
    pub child: tokio::process::Child,
    /// What was recorded of it.
    pub started: Started,
}

/// Starts `task`'s process. An error is the reason to report it `rejected`.
pub fn spawn(task: &Task, ctx: &Context) -> Result<Spawned, String> {
    let p = &task.template.process;
    let program = p.argv.first().ok_or("the task has no program")?;
    std::fs::create_dir_all(&ctx.dir).map_err(|e| format!("{}: {e}", ctx.dir.display()))?;
    let log = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(ctx.dir.join(name))
            .map_err(|e| format!("{name}: {e}"))
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&p.argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("STARLING_TASK_ID", &task.id)
        .env("STARLING_SERVICE", &task.service_name)
        .env("STARLING_SERVICE_ID", &task.service)
        .env(
            "STARLING_TASK_SLOT",
            match &task.slot {
                starling_state::Slot::Number(n) => n.to_string(),
                starling_state::Slot::Node(n) => n.clone(),
            },
        )
        .env("STARLING_HOST_IP", &ctx.host_ip)
        .envs(&p.env)
        .current_dir(p.cwd.as_deref().map_or(ctx.dir.clone(), PathBuf::from))
        .stdin(std::process::Stdio::null())
        .stdout(log("stdout.log")?)
        .stderr(log("stderr.log")?)
        .process_group(0)
        .kill_on_drop(false);
    for (i, port) in task.ports.iter().enumerate() {
        cmd.env(
            format!("STARLING_PORT_{}", port.name),
            port.port.to_string(),
        );
        if i == 0 {
            cmd.env("PORT", port.port.to_string());
        }
    }
    if let Some(user) = &p.user {
        if !nix::unistd::geteuid().is_root() {
            return Err(format!("cannot run as {user}: the agent is not root"));
        }
        let (uid, gid) = lookup_user(user)?;
        cmd.uid(uid).gid(gid);
    }
    let child = cmd.spawn().map_err(|e| format!("{program}: {e}"))?;
    let pid = child.id().ok_or("the process ended at once")? as i32;
    let started = Started {
        pid,
        start_time: start_time(pid).unwrap_or(0),
    };
    let record = serde_json::to_vec(&started).map_err(|e| e.to_string())?;
    std::fs::write(ctx.dir.join("started.json"), record)
        .map_err(|e| format!("started.json: {e}"))?;
    Ok(Spawned { child, started })
}

fn lookup_user(user: &str) -> Result<(u32, u32), String> {
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(format!("no such user: {user}")),
        Err(e) => Err(format!("cannot look up user {user}: {e}")),
    }
}

/// Sends `signal` to the process group `pgid` (an unknown signal number sends SIGKILL).
pub fn signal_group(pgid: i32, signal: i32) {
    if pgid > 0 {
        let sig =
            nix::sys::signal::Signal::try_from(signal).unwrap_or(nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig);
    }
}

/// The start time of `pid` (clock ticks since boot), if it runs.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process recorded in `started` still runs (the same process, not a reused pid).
pub fn alive(started: &Started) -> bool {
    start_time(started.pid).is_some_and(|t| t == started.start_time) && !zombie(started.pid)
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// What was recorded of the task in `dir`, if anything.
pub fn recorded(dir: &Path) -> Option<Started> {
    serde_json::from_slice(&std::fs::read(dir.join("started.json")).ok()?).ok()
}

/// Kills (SIGKILL, the whole process group) every task process recorded under `tasks_dir`
/// that still runs: what a test or an operator cleaning up a node's data directory needs.
pub fn kill_recorded(tasks_dir: &Path) {
    let Ok(dirs) = std::fs::read_dir(tasks_dir) else {
        return;
    };
    for dir in dirs.flatten() {
        if let Some(started) = recorded(&dir.path())
            && alive(&started)
        {
            signal_group(started.pid, 9);
        }
    }
}

/// How an exit status reads: the exit info and whether it is a success.
pub fn exit_info(status: std::process::ExitStatus) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitInfo::Code(c),
        (None, Some(s)) => ExitInfo::Signal(s),
        (None, None) => ExitInfo::Code(-1),
    }
}

/// Cuts each log file of `dir` over [`LOG_CAP`]: its content moves to `<name>.1` (replacing
/// the older one) and the file restarts empty (the process appends, so it writes on at the
/// new end).
pub fn rotate_logs(dir: &Path) {
    for name in ["stdout.log", "stderr.log"] {
        let path = dir.join(name);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_CAP) {
            let _ = std::fs::copy(&path, dir.join(format!("{name}.1")));
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                let _ = f.set_len(0);
            }
        }
    }
}

/// Waits up to `within` for the process `pid` to be gone (an adopted process, which is not
/// our child to wait on).
pub async fn wait_gone(started: &Started, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while alive(started) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}
