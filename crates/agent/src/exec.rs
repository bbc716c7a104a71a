//! The process executor: a task is an OS process in its own process group, its output in
//! size-capped log files under the task's directory, stopped with its stop signal and then
//! killed as a group after the grace period. What a started process is (pid and start time)
//! is written beside it so an agent that restarts adopts it instead of starting it twice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use starling_state::{ExitInfo, Task};

use crate::cgroup::Cgroups;

/// How tasks are isolated on this node, as `node inspect` shows it.
pub fn isolation(cgroups: Option<&Cgroups>) -> String {
    cgroups.map_or_else(|| "process-group".to_owned(), Cgroups::describe)
}

/// Where `program` (a task's `argv[0]`) is: a path (relative ones against `cwd`) that must
/// be an executable file, or a name looked up in `path` (a `PATH` value). The error says
/// what is missing, in one line.
pub fn resolve_program(program: &str, path: &str, cwd: Option<&Path>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.is_empty() {
        return Err("the task has no program".to_owned());
    }
    if program.contains('/') {
        let p = match cwd {
            Some(dir) if !program.starts_with('/') => dir.join(program),
            _ => PathBuf::from(program),
        };
        return if executable(&p) {
            Ok(p)
        } else if p.exists() {
            Err(format!("{program}: not an executable file"))
        } else {
            Err(format!("{program}: no such file"))
        };
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("{program}: not found in PATH ({path})"))
}

/// The `PATH` a task starts with: its spec's, else the agent's, else a default.
pub fn task_path(env: &std::collections::BTreeMap<String, String>) -> String {
    env.get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
}

/// What is written beside a started task.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    /// Its process id (also its process group id).
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22), so a pid
    /// reused by another process is not mistaken for it.
    pub start_time: u64,
    /// Its cgroup's directory, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// The environment and identity a task starts with, beyond its spec.
#[derive(Clone, Debug)]
pub struct Context {
    /// The node's advertised IP (`STARLING_HOST_IP`).
    pub host_ip: String,
    /// The directory for this task (logs, `started.json`, default working directory).
    pub dir: PathBuf,
    /// The node's cgroup for tasks, when it has one.
    pub cgroups: Option<Cgroups>,
    /// A program that runs [`launch`] (the `starling` binary: `starling task-exec`): it puts
    /// itself into the task's cgroup before it executes the task's program, so nothing the
    /// task starts is ever outside it. Without one the process is moved into its group just
    /// after it started (what it forked in that instant stays outside).
    pub launcher: Option<PathBuf>,
}

/// The word a launcher is called with: `<launcher> task-exec <cgroup.procs> <uid|-> <gid|->
/// <program> [args…]`.
pub const LAUNCH_COMMAND: &str = "task-exec";

/// The launcher's side (called by the binary's `main` before anything else when its first
/// argument is [`LAUNCH_COMMAND`], with the arguments after it): enters the cgroup, drops to
/// the task's user, executes the program. Returns only on failure, with the exit code.
pub fn launch(args: &[std::ffi::OsString]) -> u8 {
    use std::os::unix::process::CommandExt;
    let [procs, uid, gid, program, rest @ ..] = args else {
        eprintln!("usage: task-exec <cgroup.procs> <uid|-> <gid|-> <program> [args…]");
        return 2;
    };
    if let Err(e) = std::fs::write(procs, "0") {
        eprintln!(
            "starling: cannot enter the task's cgroup ({}): {e}",
            Path::new(procs).display()
        );
        return 126;
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    let id = |s: &std::ffi::OsString| s.to_str().and_then(|s| s.parse::<u32>().ok());
    if uid != "-" {
        let (Some(u), Some(g)) = (id(uid), id(gid)) else {
            eprintln!("starling: bad user ids {uid:?} {gid:?}");
            return 2;
        };
        cmd.uid(u).gid(g);
    }
    let e = cmd.exec();
    eprintln!("starling: {}: {e}", Path::new(program).display());
    127
}

/// A spawned task process.
pub struct Spawned {
    /// The child (waited on by the driver).
    pub child: tokio::process::Child,
    /// What was recorded of it.
    pub started: Started,
}

/// The environment a task's process (and its health-check command) runs with: a `PATH`,
/// the `STARLING_*` variables, the spec's variables, then its ports (`STARLING_PORT_<NAME>`,
/// and `PORT` for the first).
pub fn environment(task: &Task, host_ip: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), task_path(&BTreeMap::new())),
        ("STARLING_TASK_ID".to_owned(), task.id.clone()),
        ("STARLING_SERVICE".to_owned(), task.service_name.clone()),
        ("STARLING_SERVICE_ID".to_owned(), task.service.clone()),
        (
            "STARLING_TASK_SLOT".to_owned(),
            match &task.slot {
                starling_state::Slot::Number(n) => n.to_string(),
                starling_state::Slot::Node(n) => n.clone(),
            },
        ),
        ("STARLING_HOST_IP".to_owned(), host_ip.to_owned()),
    ]);
    env.extend(task.template.process.env.clone());
    for (i, port) in task.ports.iter().enumerate() {
        env.insert(
            format!("STARLING_PORT_{}", port.name),
            port.port.to_string(),
        );
        if i == 0 {
            env.insert("PORT".to_owned(), port.port.to_string());
        }
    }
    env
}

/// The directory a task's process starts in: its spec's, else its task directory.
pub fn workdir(task: &Task, dir: &Path) -> PathBuf {
    task.template
        .process
        .cwd
        .as_deref()
        .map_or(dir.to_path_buf(), PathBuf::from)
}

/// Starts `task`'s process. An error is the reason to report it `rejected`.
pub fn spawn(task: &Task, ctx: &Context) -> Result<Spawned, String> {
    let p = &task.template.process;
    let program = p.argv.first().ok_or("the task has no program")?;
    let cwd = workdir(task, &ctx.dir);
    // Checked first, so a missing program is a clear `rejected`, not a bare OS error.
    resolve_program(program, &task_path(&p.env), Some(&cwd))?;
    std::fs::create_dir_all(&ctx.dir).map_err(|e| format!("{}: {e}", ctx.dir.display()))?;
    let log = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(ctx.dir.join(name))
            .map_err(|e| format!("{name}: {e}"))
    };
    let user = match &p.user {
        Some(user) if !nix::unistd::geteuid().is_root() => {
            return Err(format!("cannot run as {user}: the agent is not root"));
        }
        Some(user) => Some(lookup_user(user)?),
        None => None,
    };
    let launched = ctx.cgroups.as_ref().zip(ctx.launcher.as_ref());
    let mut cmd = match launched {
        Some((cg, launcher)) => {
            let mut cmd = tokio::process::Command::new(launcher);
            let ids = user.map_or(("-".to_owned(), "-".to_owned()), |(u, g)| {
                (u.to_string(), g.to_string())
            });
            cmd.arg(LAUNCH_COMMAND)
                .arg(cg.procs(&task.id))
                .args([ids.0, ids.1])
                .args(&p.argv);
            cmd
        }
        None => {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(&p.argv[1..]);
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
            cmd
        }
    };
    cmd.env_clear()
        .envs(environment(task, &ctx.host_ip))
        .current_dir(&cwd)
        .stdin(std::process::Stdio::null())
        .stdout(log("stdout.log")?)
        .stderr(log("stderr.log")?)
        .process_group(0)
        .kill_on_drop(false);
    if let Some(cg) = &ctx.cgroups {
        cg.create(&task.id, &task.template.resources)?;
    }
    let child = cmd.spawn().map_err(|e| format!("{program}: {e}"))?;
    let pid = child.id().ok_or("the process ended at once")? as i32;
    let started = Started {
        pid,
        start_time: start_time(pid).unwrap_or(0),
        cgroup: ctx.cgroups.as_ref().map(|cg| cg.dir(&task.id)),
    };
    // A process that cannot be confined or recorded is not left running unseen.
    let undo = |why: String| {
        signal_group(pid, 9);
        if let Some(cg) = &ctx.cgroups {
            cg.kill(&task.id);
        }
        why
    };
    if let (Some(cg), None) = (&ctx.cgroups, launched) {
        cg.enter(&task.id, pid).map_err(undo)?;
    }
    let record = serde_json::to_vec(&started).map_err(|e| undo(e.to_string()))?;
    std::fs::write(ctx.dir.join("started.json"), record)
        .map_err(|e| undo(format!("started.json: {e}")))?;
    Ok(Spawned { child, started })
}

/// The uid and gid of a user name.
pub fn lookup_user(user: &str) -> Result<(u32, u32), String> {
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

/// Kills (SIGKILL, the whole process group, and the whole cgroup when it had one) every
/// task process recorded under `tasks_dir` that still runs: what a test or an operator
/// cleaning up a node's data directory needs.
pub fn kill_recorded(tasks_dir: &Path) {
    let Ok(dirs) = std::fs::read_dir(tasks_dir) else {
        return;
    };
    for dir in dirs.flatten() {
        let Some(started) = recorded(&dir.path()) else {
            continue;
        };
        if alive(&started) {
            signal_group(started.pid, 9);
        }
        if let Some(cg) = &started.cgroup {
            crate::cgroup::kill_and_remove(cg);
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use starling_state::TaskState;

    use super::*;

    fn task(id: &str, argv: &[&str]) -> Task {
        crate::testing::task(id, argv, TaskState::Assigned)
    }

    #[test]
    fn programs_are_resolved_on_the_path_or_refused_in_one_line() {
        assert!(resolve_program("sh", "/nonexistent:/bin:/usr/bin", None).is_ok());
        let e = resolve_program("no-such-program-xyz", "/bin:/usr/bin", None).unwrap_err();
        assert!(e.contains("not found in PATH"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("plain");
        std::fs::write(&plain, "not a program").unwrap();
        let e = resolve_program(plain.to_str().unwrap(), "", None).unwrap_err();
        assert!(e.contains("not an executable file"), "{e}");
        let e = resolve_program("./run.sh", "", Some(Path::new("/nonexistent"))).unwrap_err();
        assert!(e.contains("no such file"), "{e}");
        assert!(resolve_program("", "/bin", None).is_err());
    }

    #[tokio::test]
    async fn a_missing_program_is_rejected_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = Context {
            host_ip: "127.0.0.1".into(),
            dir: tmp.path().join("t1"),
            cgroups: None,
            launcher: None,
        };
        let Err(why) = spawn(&task("t1", &["no-such-program-xyz"]), &ctx) else {
            panic!("spawned a missing program");
        };
        assert!(why.contains("no-such-program-xyz: not found"), "{why}");
    }

    /// As root with cgroup2 mounted (CI's machines): the task runs in its own group and
    /// `cgroup.kill` ends it. (That it reaches processes which left the task's process group
    /// is shown end to end, through the `starling` launcher, in the node's t70.)
    #[tokio::test]
    async fn a_task_runs_in_its_cgroup_and_cgroup_kill_ends_it() {
        let has_cgroup2 = std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.contains(" - cgroup2 "));
        if !nix::unistd::geteuid().is_root() || !has_cgroup2 {
            eprintln!("not root with cgroup2 mounted: process groups only, nothing to test");
            return;
        }
        let node = format!("test{}", std::process::id());
        let cg = Cgroups::detect(&node).expect("root with cgroup2 mounted: a cgroup for tasks");
        assert!(isolation(Some(&cg)).starts_with("cgroup-v2"));
        let tmp = tempfile::tempdir().unwrap();
        let ctx = Context {
            host_ip: "127.0.0.1".into(),
            dir: tmp.path().join("t2"),
            cgroups: Some(cg.clone()),
            launcher: None,
        };
        let mut spawned = spawn(&task("t2", &["sleep", "1000"]), &ctx).unwrap();
        let procs = std::fs::read_to_string(cg.procs("t2")).unwrap();
        assert!(
            procs.lines().any(|p| p == spawned.started.pid.to_string()),
            "{procs}"
        );
        cg.kill("t2");
        let status = tokio::time::timeout(Duration::from_secs(10), spawned.child.wait())
            .await
            .expect("cgroup.kill ended the task")
            .unwrap();
        assert_eq!(exit_info(status), ExitInfo::Signal(9));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cg.populated("t2") {
            assert!(
                std::time::Instant::now() < deadline,
                "the group stays populated"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cg.remove("t2");
        cg.remove_node();
    }
}
