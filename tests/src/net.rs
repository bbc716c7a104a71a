//! Hosts as Linux network namespaces on one bridge, and faults made with nftables.
//!
//! ```text
//!   netns stl<pid>b:  bridge br0 ── v1 ── v2 ── … vN   (veth ends, no address)
//!                                   │     │        │
//!   netns stl<pid>h1: eth0 198.18.0.11   h2: .12 … hN: .(10+N)   (each with lo up)
//! ```
//!
//! A partition is a set of `ip saddr X drop` rules in the *receiver's* namespace (silent, like a
//! lost link: the sender sees nothing); loss is an `numgen random` rule. Everything is removed
//! when the [`Net`] is dropped, on success or panic.

use std::net::Ipv4Addr;
use std::process::Command;

/// What a test needs from the machine, checked once: root, `ip` and `nft`.
pub fn preflight() -> Result<(), String> {
    let mut missing = Vec::new();
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    if uid != "0" {
        missing.push("root (network namespaces and nftables need it: run as root)".to_owned());
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            missing.push(format!("`{tool}` (apt-get install -y {package})"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the multi-host tests need {}; they do not skip themselves",
            missing.join(", ")
        ))
    }
}

/// Runs a command, returning its stderr on failure.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `nft -f -` with `script` on stdin inside namespace `ns`.
fn nft(ns: &str, script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("nft: no stdin")?
        .write_all(script.as_bytes())
        .map_err(|e| format!("nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {ns} failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One simulated host: a namespace with an address on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name.
    pub ns: String,
    /// Its address on the bridge.
    pub addr: Ipv4Addr,
}

/// Namespaces, a bridge and the faults in force; all removed on drop.
#[derive(Debug)]
pub struct Net {
    bridge_ns: String,
    /// The hosts, index 0 first.
    pub hosts: Vec<Host>,
}

impl Net {
    /// Creates `n` hosts (198.18.0.11, .12, …) on a bridge. Names carry this process's id so
    /// concurrent runs never collide.
    pub fn new(n: usize) -> Result<Net, String> {
        preflight()?;
        let pid = std::process::id();
        let mut net = Net {
            bridge_ns: format!("stl{pid}b"),
            hosts: Vec::new(),
        };
        // Namespaces left by an earlier process with the same pid (a crashed run).
        let _ = run("ip", &["netns", "del", &net.bridge_ns]);
        run("ip", &["netns", "add", &net.bridge_ns])?;
        let b = net.bridge_ns.clone();
        run("ip", &["-n", &b, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &b, "link", "set", "br0", "up"])?;
        run("ip", &["-n", &b, "link", "set", "lo", "up"])?;
        for _ in 0..n {
            net.add_host()?;
        }
        Ok(net)
    }

    /// Adds one more host on the bridge (the next address), with no fault: a machine that
    /// comes later. Returns its index.
    pub fn add_host(&mut self) -> Result<usize, String> {
        let i = self.hosts.len();
        let last = u8::try_from(11 + i)
            .ok()
            .filter(|l| *l < 255)
            .ok_or_else(|| format!("no address left on the bridge for host {}", i + 1))?;
        let pid = std::process::id();
        let ns = format!("stl{pid}h{}", i + 1);
        let _ = run("ip", &["netns", "del", &ns]);
        run("ip", &["netns", "add", &ns])?;
        // Pushed now so that a failure below still removes it.
        let addr = Ipv4Addr::new(198, 18, 0, last);
        self.hosts.push(Host {
            ns: ns.clone(),
            addr,
        });
        let b = &self.bridge_ns;
        let port = format!("v{}", i + 1);
        run(
            "ip",
            &[
                "-n", b, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run("ip", &["-n", b, "link", "set", &port, "master", "br0"])?;
        run("ip", &["-n", b, "link", "set", &port, "up"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        nft(
            &ns,
            "table inet starling_faults {\n  chain input {\n    type filter hook input priority 0; policy accept;\n  }\n}\n",
        )?;
        Ok(i)
    }

    /// Host `i` drops every packet from host `from` (one way: `from` still hears `i`).
    pub fn drop_from(&self, i: usize, from: usize) -> Result<(), String> {
        nft(
            &self.hosts[i].ns,
            &format!(
                "add rule inet starling_faults input ip saddr {} drop\n",
                self.hosts[from].addr
            ),
        )
    }

    /// Cuts every link between the hosts of `a` and those of `b`, both ways.
    pub fn partition(&self, a: &[usize], b: &[usize]) -> Result<(), String> {
        for &x in a {
            for &y in b {
                self.drop_from(x, y)?;
                self.drop_from(y, x)?;
            }
        }
        Ok(())
    }

    /// Cuts host `i` off from every other host (an island of one).
    pub fn isolate(&self, i: usize) -> Result<(), String> {
        let others: Vec<usize> = (0..self.hosts.len()).filter(|&j| j != i).collect();
        self.partition(&[i], &others)
    }

    /// Host `i` drops `percent` % of the packets it receives, at random.
    pub fn loss(&self, i: usize, percent: u32) -> Result<(), String> {
        nft(
            &self.hosts[i].ns,
            &format!(
                "add rule inet starling_faults input numgen random mod 100 < {percent} drop\n"
            ),
        )
    }

    /// Removes every fault on every host.
    pub fn heal(&self) -> Result<(), String> {
        for h in &self.hosts {
            nft(&h.ns, "flush chain inet starling_faults input\n")?;
        }
        Ok(())
    }

    /// The rules in force on host `i` (for messages).
    pub fn rules(&self, i: usize) -> String {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.hosts[i].ns,
                "nft",
                "list",
                "table",
                "inet",
                "starling_faults",
            ],
        )
        .unwrap_or_else(|e| e)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = run("ip", &["netns", "del", &h.ns]);
        }
        let _ = run("ip", &["netns", "del", &self.bridge_ns]);
    }
}
