//! cgroup v2 isolation, when the agent runs as root on a host with a cgroup2 hierarchy
//! mounted: each task gets its own group `<mount>/starling-<node>/<task>`, with
//! `memory.max` and `cpu.max` from its limits when those controllers can be enabled, and is
//! stopped with `cgroup.kill`, which reaches every process it started — those that left its
//! process group (`setsid`, daemons) included. Without cgroup2 (or not root) tasks are process
//! groups only; [`Cgroups::describe`] says which.
//!
//! On a hybrid host (cgroup v1 controllers, cgroup2 at `/sys/fs/cgroup/unified`) the memory
//! and cpu controllers belong to v1 and cannot be enabled in v2: tasks get `cgroup.kill` but
//! no limits, and `describe` says so.

use std::path::{Path, PathBuf};

use starling_state::Resources;

/// The cgroup period `cpu.max` is given in (µs).
const CPU_PERIOD_US: u64 = 100_000;

/// The controllers whose limits the agent applies.
const WANTED: [&str; 3] = ["memory", "cpu", "pids"];

/// The most processes and threads one task may have (`pids.max`): far above what a service
/// needs, far below what would take the node down (a fork bomb stops here).
pub const PIDS_MAX: u64 = 16_384;

/// This node's cgroup for tasks, and the controllers enabled under it.
#[derive(Clone, Debug)]
pub struct Cgroups {
    root: PathBuf,
    controllers: Vec<String>,
}

impl Cgroups {
    /// Finds a cgroup2 mount this agent may create groups in and makes the node's group,
    /// enabling what it can of memory, cpu and pids. `None`: process groups only.
    pub fn detect(node: &str) -> Option<Cgroups> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let mount = cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
        let name: String = node.chars().take(16).collect();
        let root = mount.join(format!("starling-{name}"));
        let available =
            std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        let mut cg = Cgroups {
            root,
            controllers: Vec::new(),
        };
        if let Err(e) = cg.make_root(&mount, &available) {
            tracing::info!(path = %cg.root.display(), error = %e, "no cgroup for tasks: process groups only");
            return None;
        }
        Some(cg)
    }

    /// Makes the node's group (again, if it was removed while empty) with the controllers
    /// it can have.
    fn make_root(&mut self, mount: &Path, available: &str) -> std::io::Result<()> {
        if let Err(e) = std::fs::create_dir(&self.root)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(e);
        }
        self.controllers.clear();
        for c in WANTED {
            if !available.split_whitespace().any(|a| a == c) {
                continue;
            }
            // Enabled in the mount's root for the node's group, then in the node's group for
            // its tasks (a group with tasks under it holds no process itself).
            let on =
                |dir: &Path| std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
            if on(mount).is_ok() && on(&self.root).is_ok() {
                self.controllers.push(c.to_owned());
            }
        }
        Ok(())
    }

    /// What `node inspect` shows.
    pub fn describe(&self) -> String {
        if self.controllers.is_empty() {
            "cgroup-v2 (cgroup.kill; no memory/cpu/pids controller: limits not enforced)".to_owned()
        } else {
            format!("cgroup-v2 ({}; cgroup.kill)", self.controllers.join(", "))
        }
    }

    /// `task`'s group.
    pub fn dir(&self, task: &str) -> PathBuf {
        self.root.join(task)
    }

    /// Makes `task`'s group with its limits (an existing one is reused: a restarted agent).
    pub fn create(&self, task: &str, limits: &Resources) -> Result<(), String> {
        if !self.root.exists()
            && let Some(mount) = self.root.parent()
        {
            // Removed while it was empty (by a cleanup): made again, the same way.
            let available =
                std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            let mut again = self.clone();
            again
                .make_root(mount, &available)
                .map_err(|e| format!("cgroup {}: {e}", self.root.display()))?;
        }
        let dir = self.dir(task);
        if let Err(e) = std::fs::create_dir(&dir)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(format!("cgroup {}: {e}", dir.display()));
        }
        let set = |file: &str, value: String| {
            std::fs::write(dir.join(file), &value)
                .map_err(|e| format!("cgroup {}/{file} = {value}: {e}", dir.display()))
        };
        if self.has("memory")
            && let Some(bytes) = limits.memory_bytes
        {
            set("memory.max", bytes.to_string())?;
            // No swapping around the limit: the task is killed at it, as docker's --memory.
            let _ = set("memory.swap.max", "0".to_owned());
        }
        if self.has("cpu")
            && let Some(nano) = limits.nano_cpus
        {
            let quota = (nano.saturating_mul(CPU_PERIOD_US) / 1_000_000_000).max(1_000);
            set("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
        }
        if self.has("pids") {
            set("pids.max", PIDS_MAX.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` file of `task`'s group (a process writing `0` to it enters it).
    pub fn procs(&self, task: &str) -> PathBuf {
        self.dir(task).join("cgroup.procs")
    }

    /// Moves `pid` into `task`'s group.
    pub fn enter(&self, task: &str, pid: i32) -> Result<(), String> {
        let procs = self.procs(task);
        std::fs::write(&procs, pid.to_string()).map_err(|e| format!("{}: {e}", procs.display()))
    }

    /// Kills every process of `task`'s group.
    pub fn kill(&self, task: &str) {
        let _ = std::fs::write(self.dir(task).join("cgroup.kill"), "1");
    }

    /// Whether the kernel killed a process of `task`'s group for its memory limit.
    pub fn oom_killed(&self, task: &str) -> bool {
        std::fs::read_to_string(self.dir(task).join("memory.events"))
            .ok()
            .and_then(|events| {
                events
                    .lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    /// Whether any process is left in `task`'s group.
    pub fn populated(&self, task: &str) -> bool {
        std::fs::read_to_string(self.dir(task).join("cgroup.procs"))
            .is_ok_and(|p| !p.trim().is_empty())
    }

    /// Removes `task`'s group once it is empty.
    pub fn remove(&self, task: &str) {
        let _ = std::fs::remove_dir(self.dir(task));
    }

    /// Removes the node's group once no task group is left under it.
    pub fn remove_node(&self) {
        let _ = std::fs::remove_dir(&self.root);
    }

    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// Kills every process of the group `dir` and removes it (waiting up to a second for it to
/// empty), and its node's group if no other task is left there: a task's group found in its
/// record.
pub fn kill_and_remove(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        return;
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() {
            if let Some(node) = dir.parent() {
                let _ = std::fs::remove_dir(node);
            }
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Removes the group of node `node` if no task group is left in it (a node gone for good, or
/// a test cleaning up).
pub fn remove_node_group(node: &str) {
    let Some(mount) = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| cgroup2_mount(&m))
    else {
        return;
    };
    let name: String = node.chars().take(16).collect();
    let _ = std::fs::remove_dir(mount.join(format!("starling-{name}")));
}

/// The mount point of the cgroup2 hierarchy in `mountinfo` (`/sys/fs/cgroup` on a unified
/// host, `/sys/fs/cgroup/unified` on a hybrid one), if any.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent major:minor root mountpoint options [optional…] - fstype source super`
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_unified_and_hybrid_hosts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory\n\
                      36 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount("22 1 0:21 / /proc rw - proc proc rw\n"), None);
    }
}
