//! The `starling` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use starling_api::{Client, ClientError, Consistency, LogsQuery, Registry};
use starling_node::datadir::DataDir;
use starling_node::{api, busy_poll, daemon};

mod demo;

#[derive(Parser)]
#[command(
    name = "starling",
    version,
    about = "Starling: a swarm-mode control plane on Raft and SWIM over mTLS QUIC"
)]
struct Cli {
    /// A TOML file with defaults for the flags (flags and STARLING_* variables win).
    #[arg(long, global = true, env = "STARLING_CONFIG")]
    config: Option<PathBuf>,
    /// Talk to the cluster remotely through this context (a name registered with `starling
    /// context` or a context directory) instead of a node's data directory.
    #[arg(long, global = true, env = "STARLING_CONTEXT")]
    context: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

static FILE_CONFIG: std::sync::OnceLock<starling_node::config::FileConfig> =
    std::sync::OnceLock::new();

fn file_config() -> &'static starling_node::config::FileConfig {
    FILE_CONFIG.get_or_init(Default::default)
}

#[derive(clap::Args, Clone)]
struct DirArg {
    /// The node's data directory.
    #[arg(long, env = "STARLING_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl DirArg {
    fn path(&self) -> anyhow::Result<PathBuf> {
        starling_node::config::required(self.data_dir.clone(), &file_config().data_dir, "data-dir")
    }

    fn given(&self) -> Option<PathBuf> {
        self.data_dir
            .clone()
            .or_else(|| file_config().data_dir.clone())
    }
}

#[derive(clap::Args, Clone)]
struct DaemonArgs {
    /// Serve Prometheus metrics on this TCP address (off by default).
    #[arg(long, env = "STARLING_METRICS")]
    metrics: Option<SocketAddr>,
    /// A manager snapshots its state (and trims its log) after this many new log entries
    /// (default 100 000, etcd's snapshot count; the log since the last snapshot is held in
    /// memory and replayed at start).
    #[arg(long, env = "STARLING_SNAPSHOT_INTERVAL", value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_interval: Option<u64>,
    /// The longest a watch long poll (`GET /v1/watch`) waits for its first event, whatever
    /// the client asks (`30d`, `12h`, `90m`, `45s`; default 300s). Lower it below the idle
    /// timeout of a proxy in front of the API.
    #[arg(long, env = "STARLING_WATCH_WAIT_MAX", value_parser = parse_duration)]
    watch_wait_max: Option<std::time::Duration>,
    /// Run the tasks the managers assign to this node (default true); `false` makes a node
    /// that runs none (the scheduler passes over it).
    #[arg(long, env = "STARLING_RUN_TASKS")]
    run_tasks: Option<bool>,
    /// Host ports this node's tasks may be given, `MIN-MAX` (default 30000-32767).
    #[arg(long, env = "STARLING_TASK_PORTS", value_parser = parse_port_range)]
    task_ports: Option<(u16, u16)>,
    /// Serve DNS (UDP and TCP) for `*.starling` on `IP:PORT`, from this node's gossip state
    /// (default 127.0.0.1:8600; `off` serves none; port 53 needs root).
    #[arg(long, env = "STARLING_DNS_LISTEN", value_parser = parse_dns_listen)]
    dns_listen: Option<DnsListen>,
}

/// `--dns-listen`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
struct DnsListen(Option<SocketAddr>);

fn parse_dns_listen(text: &str) -> Result<DnsListen, String> {
    if text == "off" {
        return Ok(DnsListen(None));
    }
    text.parse()
        .map(|a| DnsListen(Some(a)))
        .map_err(|_| format!("{text:?} is not IP:PORT (such as 127.0.0.1:8600) or off"))
}

/// `MIN-MAX`, both ports, MIN ≤ MAX.
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{text:?} is not a port range MIN-MAX (such as 30000-32767)");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

impl DaemonArgs {
    /// Hands the Raft tuning to the daemon before the node starts.
    fn tune(&self) {
        if let Some(n) = self.snapshot_interval.or(file_config().snapshot_interval) {
            let _ = daemon::SNAPSHOT_INTERVAL.set(n);
        }
        if let Some(run) = self.run_tasks {
            let _ = daemon::RUN_TASKS.set(run);
        }
        if let Some(range) = self.task_ports {
            let _ = daemon::TASK_PORTS.set(range);
        }
        if let Some(dns) = self.dns_listen {
            let _ = daemon::DNS_LISTEN.set(dns.0);
        }
        // Hidden, for tests that watch certificates renew within minutes.
        if let Some(floor) = std::env::var("STARLING_TEST_MIN_CERT_EXPIRY_SECS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            tracing::warn!(
                floor,
                "STARLING_TEST_MIN_CERT_EXPIRY_SECS is set: certificate lifetimes down to this many seconds are accepted (for tests only)"
            );
            let _ = api::cluster::TEST_MIN_CERT_EXPIRY.set(floor);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Create a new cluster with this node as its first manager, and run it.
    Init {
        #[command(flatten)]
        dir: DirArg,
        /// Address to listen on (UDP).
        #[arg(long, env = "STARLING_LISTEN")]
        listen: Option<SocketAddr>,
        /// Address other nodes reach this one at (default: --listen).
        #[arg(long, env = "STARLING_ADVERTISE")]
        advertise: Option<SocketAddr>,
        /// Host name to report (default: this machine's).
        #[arg(long)]
        hostname: Option<String>,
        /// Lifetime of node certificates (like 90d or 2160h; at least 1h): nodes renew theirs
        /// at a random 50–80 % of it. Default 90d; `starling cluster update` changes it.
        #[arg(long, value_parser = parse_duration)]
        cert_expiry: Option<std::time::Duration>,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Join a cluster with a token, through any manager, and run the node.
    Join {
        #[command(flatten)]
        dir: DirArg,
        /// Address to listen on (UDP).
        #[arg(long, env = "STARLING_LISTEN")]
        listen: Option<SocketAddr>,
        /// Address other nodes reach this one at (default: --listen).
        #[arg(long, env = "STARLING_ADVERTISE")]
        advertise: Option<SocketAddr>,
        /// Host name to report (default: this machine's).
        #[arg(long)]
        hostname: Option<String>,
        /// The join token (`starling join-token worker|manager` on a manager).
        #[arg(long, env = "STARLING_TOKEN")]
        token: Option<String>,
        /// A manager's address.
        #[arg(long, env = "STARLING_MANAGER")]
        manager: Option<SocketAddr>,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Run the node already set up in the data directory.
    Run {
        #[command(flatten)]
        dir: DirArg,
        /// Disaster recovery, on a manager whose fellow managers are lost for good: it
        /// becomes the single manager of the same cluster with everything its log holds;
        /// the lost managers are removed (and stay refused). Workers and their tasks stay;
        /// new managers join with a token.
        #[arg(long)]
        force_new_cluster: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Start a local cluster (3 managers, 3 workers) on loopback, kill its leader, show
    /// that writes go on, then stop and clean up.
    Demo,
    /// Nodes of the cluster.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Services: programs the cluster keeps running as tasks on its nodes.
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// The replicated key-value store.
    Kv {
        #[command(subcommand)]
        cmd: KvCmd,
    },
    /// The gossip view: members, addresses, states, generations.
    Members {
        #[command(flatten)]
        dir: DirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Print the token that lets a node join with a role.
    JoinToken {
        #[command(flatten)]
        dir: DirArg,
        /// `worker` or `manager`.
        role: String,
        /// Print only the token.
        #[arg(short, long)]
        quiet: bool,
        /// Replace the role's secret first: earlier tokens stop working.
        #[arg(long)]
        rotate: bool,
    },
    /// Leave the cluster: a worker leaves gossip and stops; a manager is demoted first
    /// (refused for the last one).
    Leave {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Client certificates for the remote API (`starling/api/1`).
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Contexts: what a remote client needs to reach a cluster, by name.
    Context {
        #[command(subcommand)]
        cmd: ContextCmd,
    },
    /// The cluster's identity and settings.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// The cluster's root certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Rotate the root CA: a new root, cross-signed by the current one, onto which every node
    /// renews; then the old root is dropped and the join tokens change. Nodes down meanwhile
    /// renew when they return (within the renewal grace). Shows progress until it is done;
    /// it goes on in the cluster if this command is stopped.
    Rotate {
        #[command(flatten)]
        dir: DirArg,
        /// Start it and return at once (follow it with `starling ca status`).
        #[arg(long)]
        detach: bool,
    },
    /// The root CA's digest and a rotation under way, if any.
    Status {
        #[command(flatten)]
        dir: DirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Show the cluster's id, CA digest and settings.
    Inspect {
        #[command(flatten)]
        dir: DirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Change cluster settings.
    Update {
        #[command(flatten)]
        dir: DirArg,
        /// Lifetime of node certificates issued from now on (like 90d or 2160h; at least 1h,
        /// at most 10 years). Each node moves to it at its next renewal.
        #[arg(long, value_parser = parse_duration)]
        cert_expiry: Option<std::time::Duration>,
        /// How long after its certificate expired a node that was off may still renew it
        /// (like 30d; 0 to refuse expired certificates); beyond, it rejoins with a token.
        #[arg(long, value_parser = parse_duration)]
        cert_grace: Option<std::time::Duration>,
        /// Autopilot (off by default): the leader removes managers down longer than
        /// --autopilot-dead-after from the voters, when the others keep a quorum, and
        /// promotes workers to keep the managers odd and at --autopilot-min-managers.
        #[arg(long, value_name = "true|false")]
        autopilot_cleanup_dead_managers: Option<bool>,
        /// The number of managers autopilot keeps (default 3).
        #[arg(long)]
        autopilot_min_managers: Option<u32>,
        /// How long a manager is down before autopilot removes it (default 10m; at least 5s).
        #[arg(long, value_parser = parse_duration)]
        autopilot_dead_after: Option<std::time::Duration>,
        /// A constraint a worker must meet to be promoted by autopilot (`node.labels.zone==a`;
        /// repeatable; `--autopilot-promote-constraint none` clears them).
        #[arg(long)]
        autopilot_promote_constraint: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Issue a client certificate (the key is made here and never leaves this machine) and
    /// write a context to DIR, registered under NAME.
    Issue {
        #[command(flatten)]
        dir: DirArg,
        /// `admin` (every operation) or `viewer` (reads only).
        #[arg(long, value_enum)]
        role: CertRole,
        /// A name for the client and its context (a DNS label).
        #[arg(long)]
        name: String,
        /// Where to write the context (created, mode 0700).
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate lives (`30d`, `12h`, `90m`, `3600s`; default 30d).
        #[arg(long, value_parser = parse_duration)]
        lifetime: Option<std::time::Duration>,
    },
    /// List the client certificates the cluster issued.
    Ls {
        #[command(flatten)]
        dir: DirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Revoke a client certificate: every manager refuses it from now on.
    Revoke {
        #[command(flatten)]
        dir: DirArg,
        /// The client's name.
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CertRole {
    Admin,
    Viewer,
}

#[derive(Subcommand)]
enum ContextCmd {
    /// List the registered contexts (`*` marks the one in use).
    Ls,
    /// Use this context when neither --context nor --data-dir is given.
    Use {
        /// A registered name.
        name: String,
    },
    /// Forget a registered context (its directory stays).
    Rm {
        /// A registered name.
        name: String,
    },
    /// Register a context directory (written by `starling cert issue`).
    Import {
        /// The directory.
        dir: PathBuf,
        /// The name to register it under (default: the name it was issued under).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Make a worker a manager: it gets a manager certificate and joins the Raft group.
    Promote {
        #[command(flatten)]
        dir: DirArg,
        /// Node id.
        id: String,
    },
    /// Make a manager a worker: it leaves the Raft group (the leader hands over first; the
    /// last manager cannot be demoted) and gets a worker certificate.
    Demote {
        #[command(flatten)]
        dir: DirArg,
        /// Node id.
        id: String,
    },
    /// Show one node in detail.
    Inspect {
        #[command(flatten)]
        dir: DirArg,
        /// Node id.
        id: String,
    },
    /// Change a node's availability or labels.
    Update {
        #[command(flatten)]
        dir: DirArg,
        /// `active`, `pause` or `drain`.
        #[arg(long)]
        availability: Option<String>,
        /// Add or change a label `K=V` (repeatable).
        #[arg(long)]
        label_add: Vec<String>,
        /// Remove a label (repeatable).
        #[arg(long)]
        label_rm: Vec<String>,
        /// Node id.
        id: String,
    },
    /// List the tasks on a node (default: this one).
    Ps {
        #[command(flatten)]
        dir: DirArg,
        /// Node id or host name.
        node: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Remove a node from the cluster (a node that is not down needs --force).
    Rm {
        #[command(flatten)]
        dir: DirArg,
        /// Node id.
        id: String,
        /// Remove it even if it is not down.
        #[arg(long)]
        force: bool,
    },
    /// List the nodes, like `docker node ls`.
    Ls {
        #[command(flatten)]
        dir: DirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ServiceCmd {
    /// Create a service: `starling service create --name web --replicas 3 -- python3 -m http.server`.
    Create {
        #[command(flatten)]
        dir: DirArg,
        /// Name (a DNS label; default: the program's name).
        #[arg(long)]
        name: Option<String>,
        /// Tasks wanted.
        #[arg(long, conflicts_with = "mode")]
        replicas: Option<u32>,
        /// `replicated` or `global` (one task per eligible node).
        #[arg(long, value_enum)]
        mode: Option<ServiceMode>,
        /// Environment variable `K=V` (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Working directory.
        #[arg(long)]
        workdir: Option<String>,
        /// User to run as (the agent must run as root).
        #[arg(long)]
        user: Option<String>,
        /// Constraint such as `node.labels.zone==b` or `node.role!=manager` (repeatable).
        #[arg(long)]
        constraint: Vec<String>,
        /// Placement preference `spread=node.labels.<name>` (repeatable).
        #[arg(long)]
        placement_pref: Vec<String>,
        /// `any` (default), `on-failure` or `none`.
        #[arg(long)]
        restart_condition: Option<String>,
        /// Delay before a restart (`5s`, `1m`).
        #[arg(long, value_parser = parse_duration)]
        restart_delay: Option<std::time::Duration>,
        /// Restarts allowed (0: unlimited).
        #[arg(long)]
        restart_max_attempts: Option<u32>,
        /// Window the restarts are counted in.
        #[arg(long, value_parser = parse_duration)]
        restart_window: Option<std::time::Duration>,
        /// Memory limit and reservation (`512M`, `2G`, bytes).
        #[arg(long, value_parser = parse_bytes)]
        limit_memory: Option<u64>,
        /// CPU limit and reservation (`0.5`, `2`).
        #[arg(long, value_parser = parse_cpus)]
        limit_cpu: Option<u64>,
        /// A port to allocate, by name (`HTTP`; repeatable): `STARLING_PORT_HTTP`, and `PORT`
        /// for the first.
        #[arg(long)]
        port: Vec<String>,
        #[command(flatten)]
        rollout: RolloutFlags,
        #[command(flatten)]
        health: HealthFlags,
        /// Do not check that the program exists on the manager (it exists only on the
        /// workers).
        #[arg(long)]
        no_resolve_program: bool,
        /// Print only the id.
        #[arg(short, long)]
        quiet: bool,
        /// Program and arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List the services.
    Ls {
        #[command(flatten)]
        dir: DirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// List a service's tasks, with their history.
    Ps {
        #[command(flatten)]
        dir: DirArg,
        /// Service id, name or id prefix.
        service: String,
        /// Only `desired-state=running|shutdown|…`.
        #[arg(long)]
        filter: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show a service in full.
    Inspect {
        #[command(flatten)]
        dir: DirArg,
        /// Service id, name or id prefix.
        service: String,
    },
    /// Change a service: its tasks are replaced one at a time.
    Update {
        #[command(flatten)]
        dir: DirArg,
        /// Service id, name or id prefix.
        service: String,
        /// Tasks wanted.
        #[arg(long)]
        replicas: Option<u32>,
        /// Set an environment variable `K=V` (repeatable).
        #[arg(long)]
        env_add: Vec<String>,
        /// Remove an environment variable (repeatable).
        #[arg(long)]
        env_rm: Vec<String>,
        /// Replace every task even if nothing else changes.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        rollout: RolloutFlags,
        #[command(flatten)]
        health: HealthFlags,
        /// Replace the program and arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// A service's or a task's output, each line prefixed with `service.slot.task@node`:
    /// `starling service logs web --tail 20 --follow`.
    Logs {
        #[command(flatten)]
        dir: DirArg,
        /// Service (id, name or id prefix) or task (id or id prefix).
        target: String,
        /// Keep printing new lines, and those of tasks that start meanwhile (Ctrl-C ends).
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of each task (`all`: every line).
        #[arg(short = 'n', long, value_parser = parse_tail)]
        tail: Option<Tail>,
        /// Only lines since a time: RFC 3339 (`2026-12-01T10:00:00Z`), Unix seconds, or a
        /// duration ago (`10m`, `2h`).
        #[arg(long, value_parser = parse_since)]
        since: Option<u64>,
        /// Show each line's time (RFC 3339, UTC, to the agent's 250 ms index).
        #[arg(short, long)]
        timestamps: bool,
        /// `table` prints lines; `json` one record per line as the API sends it.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// A service's endpoints as this node's gossip state has them (what its DNS serves):
    /// works on any node, workers included, with or without a quorum.
    Endpoints {
        #[command(flatten)]
        dir: DirArg,
        /// Service name.
        service: String,
        /// Only those DNS serves: healthy, on nodes gossip does not suspect.
        #[arg(long)]
        passing: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Return a service to its previous spec, with its rollback settings.
    Rollback {
        #[command(flatten)]
        dir: DirArg,
        /// Service id, name or id prefix.
        service: String,
    },
    /// Set services' task counts: `starling service scale web=5 api=2`.
    Scale {
        #[command(flatten)]
        dir: DirArg,
        /// `SERVICE=REPLICAS` (repeatable).
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Remove services; their tasks stop.
    Rm {
        #[command(flatten)]
        dir: DirArg,
        /// Service ids, names or id prefixes.
        #[arg(required = true)]
        services: Vec<String>,
    },
}

/// A service's health check, drain delay and DNS TTL (`docker service create --health-*`).
#[derive(clap::Args, Debug, Default)]
struct HealthFlags {
    /// Health check: a command run beside each task through `sh -c` (exit 0: healthy).
    #[arg(long)]
    health_cmd: Option<String>,
    /// Health check: a TCP connection to the task's port of this name.
    #[arg(long, conflicts_with = "health_cmd")]
    health_tcp: Option<String>,
    /// Health check: an HTTP GET, `PORT` or `PORT/path` (`HTTP/healthz`); 2xx or 3xx passes.
    #[arg(long, conflicts_with_all = ["health_cmd", "health_tcp"])]
    health_http: Option<String>,
    /// Time between checks (default 5s).
    #[arg(long, value_parser = parse_duration)]
    health_interval: Option<std::time::Duration>,
    /// A check taking longer fails (default 2s).
    #[arg(long, value_parser = parse_duration)]
    health_timeout: Option<std::time::Duration>,
    /// Failures in a row that make a task unhealthy (default 3); it is then replaced.
    #[arg(long)]
    health_retries: Option<u32>,
    /// Failures this soon after the start do not count (default 0s).
    #[arg(long, value_parser = parse_duration)]
    health_start_period: Option<std::time::Duration>,
    /// Remove the health check.
    #[arg(long, conflicts_with_all = ["health_cmd", "health_tcp", "health_http"])]
    no_healthcheck: bool,
    /// How long a stopping task's endpoint is published as draining before its stop signal,
    /// so clients stop using it first (default 2s; 0s: none).
    #[arg(long, value_parser = parse_duration)]
    drain_delay: Option<std::time::Duration>,
    /// TTL of the DNS answers naming the service's tasks (default 5s).
    #[arg(long, value_parser = parse_duration)]
    dns_ttl: Option<std::time::Duration>,
}

impl HealthFlags {
    fn apply(&self, spec: &mut starling_api::ServiceSpec) -> anyhow::Result<()> {
        use starling_api::{CheckType, HealthCheckSpec};
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let kind = if let Some(cmd) = &self.health_cmd {
            Some((
                CheckType::Command,
                None,
                None,
                vec!["sh".into(), "-c".into(), cmd.clone()],
            ))
        } else if let Some(port) = &self.health_tcp {
            Some((CheckType::Tcp, Some(port.clone()), None, vec![]))
        } else if let Some(target) = &self.health_http {
            let (port, path) = match target.split_once('/') {
                Some((port, path)) => (port.to_owned(), format!("/{path}")),
                None => (target.clone(), "/".to_owned()),
            };
            Some((CheckType::Http, Some(port), Some(path), vec![]))
        } else {
            None
        };
        if self.no_healthcheck {
            spec.health_check = None;
        }
        if let Some((kind, port, path, command)) = kind {
            let base = spec.health_check.take();
            spec.health_check = Some(HealthCheckSpec {
                kind,
                port,
                path,
                command,
                interval_ms: base
                    .as_ref()
                    .map_or(starling_state::CHECK_INTERVAL_MS, |b| b.interval_ms),
                timeout_ms: base
                    .as_ref()
                    .map_or(starling_state::CHECK_TIMEOUT_MS, |b| b.timeout_ms),
                retries: base
                    .as_ref()
                    .map_or(starling_state::CHECK_RETRIES, |b| b.retries),
                start_period_ms: base.as_ref().map_or(0, |b| b.start_period_ms),
            });
        }
        let tuning = self.health_interval.is_some()
            || self.health_timeout.is_some()
            || self.health_retries.is_some()
            || self.health_start_period.is_some();
        match &mut spec.health_check {
            Some(h) => {
                if let Some(d) = self.health_interval {
                    h.interval_ms = ms(d);
                }
                if let Some(d) = self.health_timeout {
                    h.timeout_ms = ms(d);
                }
                if let Some(n) = self.health_retries {
                    h.retries = n;
                }
                if let Some(d) = self.health_start_period {
                    h.start_period_ms = ms(d);
                }
            }
            None if tuning => anyhow::bail!(
                "--health-interval, --health-timeout, --health-retries and --health-start-period \
                 tune a health check: give one with --health-cmd, --health-tcp or --health-http"
            ),
            None => {}
        }
        if let Some(d) = self.drain_delay {
            spec.drain_delay_ms = ms(d);
        }
        if let Some(d) = self.dns_ttl {
            spec.dns_ttl_s = u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        }
        Ok(())
    }
}

/// How a service's spec changes (and rollbacks) roll out, as `docker service` sets them.
#[derive(clap::Args, Debug, Default)]
struct RolloutFlags {
    /// Tasks replaced in one batch of an update (0: all at once; default 1).
    #[arg(long)]
    update_parallelism: Option<u32>,
    /// Pause between batches of an update (`10s`).
    #[arg(long, value_parser = parse_duration)]
    update_delay: Option<std::time::Duration>,
    /// How long a new task must run to count as a success (default 5s).
    #[arg(long, value_parser = parse_duration)]
    update_monitor: Option<std::time::Duration>,
    /// `pause` (default), `continue` or `rollback` when a new task fails.
    #[arg(long)]
    update_failure_action: Option<String>,
    /// Failed new tasks tolerated, as a fraction (0 to 1; default 0).
    #[arg(long)]
    update_max_failure_ratio: Option<f64>,
    /// `stop-first` (default) or `start-first`.
    #[arg(long)]
    update_order: Option<String>,
    /// Tasks replaced in one batch of a rollback.
    #[arg(long)]
    rollback_parallelism: Option<u32>,
    /// Pause between batches of a rollback.
    #[arg(long, value_parser = parse_duration)]
    rollback_delay: Option<std::time::Duration>,
    /// How long a task of a rollback must run to count as a success.
    #[arg(long, value_parser = parse_duration)]
    rollback_monitor: Option<std::time::Duration>,
    /// `pause` (default) or `continue` when a task of a rollback fails.
    #[arg(long)]
    rollback_failure_action: Option<String>,
    /// Failed tasks of a rollback tolerated, as a fraction.
    #[arg(long)]
    rollback_max_failure_ratio: Option<f64>,
    /// `stop-first` or `start-first` for a rollback.
    #[arg(long)]
    rollback_order: Option<String>,
}

impl RolloutFlags {
    fn apply(&self, spec: &mut starling_api::ServiceSpec) -> anyhow::Result<()> {
        fn word<T: serde::de::DeserializeOwned>(
            flag: &str,
            v: &str,
            choices: &str,
        ) -> anyhow::Result<T> {
            serde_json::from_value(serde_json::Value::String(v.to_owned()))
                .map_err(|_| anyhow::anyhow!("--{flag} {v:?}: {choices}"))
        }
        let sets = [
            (
                "update",
                &mut spec.update,
                self.update_parallelism,
                self.update_delay,
                self.update_monitor,
                &self.update_failure_action,
                self.update_max_failure_ratio,
                &self.update_order,
            ),
            (
                "rollback",
                &mut spec.rollback,
                self.rollback_parallelism,
                self.rollback_delay,
                self.rollback_monitor,
                &self.rollback_failure_action,
                self.rollback_max_failure_ratio,
                &self.rollback_order,
            ),
        ];
        for (what, u, parallelism, delay, monitor, action, ratio, order) in sets {
            if let Some(p) = parallelism {
                u.parallelism = p;
            }
            if let Some(d) = delay {
                u.delay_ms = d.as_millis() as u64;
            }
            if let Some(m) = monitor {
                u.monitor_ms = m.as_millis() as u64;
            }
            if let Some(a) = action {
                u.failure_action = word(
                    &format!("{what}-failure-action"),
                    a,
                    "pause, continue or rollback",
                )?;
            }
            if let Some(r) = ratio {
                if !(0.0..=1.0).contains(&r) {
                    anyhow::bail!("--{what}-max-failure-ratio {r}: between 0 and 1");
                }
                u.max_failure_ratio = r;
            }
            if let Some(o) = order {
                u.order = word(&format!("{what}-order"), o, "stop-first or start-first")?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ServiceMode {
    Replicated,
    Global,
}

#[derive(Subcommand)]
enum KvCmd {
    /// Set a key.
    Put {
        #[command(flatten)]
        dir: DirArg,
        key: String,
        value: String,
    },
    /// Read a key.
    Get {
        #[command(flatten)]
        dir: DirArg,
        key: String,
        /// `linearizable` (default) or `stale`.
        #[arg(long, default_value = "linearizable")]
        consistency: String,
    },
    /// Delete a key.
    Del {
        #[command(flatten)]
        dir: DirArg,
        key: String,
    },
    /// Set a key only if it is at the given revision (0: only if absent).
    Cas {
        #[command(flatten)]
        dir: DirArg,
        key: String,
        /// The revision the key must be at.
        #[arg(long)]
        expect_revision: u64,
        value: String,
    },
    /// Print every change under a prefix as it happens, from a revision on.
    Watch {
        #[command(flatten)]
        dir: DirArg,
        prefix: String,
        /// First revision to report (default: from now on).
        #[arg(long)]
        from_revision: Option<u64>,
    },
    /// List the keys under a prefix.
    Ls {
        #[command(flatten)]
        dir: DirArg,
        prefix: String,
    },
}

async fn serve_until_signal(m: daemon::RunningNode, args: DaemonArgs) -> anyhow::Result<()> {
    let sock = m.data_dir.control_socket();
    let listener =
        api::bind_unix(&sock).with_context(|| format!("cannot bind {}", sock.display()))?;
    let stop = m.stop.clone();
    let current: daemon::Current = Arc::new(std::sync::RwLock::new(Arc::new(m)));
    let now = |c: &daemon::Current| c.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mut state = api::ApiState::new(current.clone());
    if let Some(cap) = args.watch_wait_max {
        state = state.with_max_watch_wait(cap);
    }
    if let Some(addr) = args.metrics.or(file_config().metrics) {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tokio::spawn(api::serve_tcp(tcp, api::metrics_router(state.clone())));
    }
    let router = api::router(state);
    now(&current).serve_api(router.clone());
    let server = tokio::spawn(api::serve_unix(listener, router.clone()));
    let renewal = tokio::spawn(starling_node::renewal::renewal_loop(
        current.clone(),
        router,
    ));
    {
        let m = now(&current);
        eprintln!(
            "starling: node {} of cluster {} ({}) serving on {}; control socket {}",
            m.state.node_id,
            m.state.cluster_id,
            m.state.role,
            m.state.advertise,
            sock.display()
        );
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = stop.notified() => {}
    }
    eprintln!("starling: shutting down");
    renewal.abort();
    server.abort();
    let _ = std::fs::remove_file(&sock);
    let m = now(&current);
    // A worker leaves gossip first, so managers see it go at once; a manager's store stops
    // with it (its peers elect without it if it led).
    if m.store.is_none() {
        m.gossip.leave_shared().await;
    }
    m.stop_components().await;
    m.endpoint.close().await;
    Ok(())
}

/// How long a remote command waits for each manager's handshake before trying the next.
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where a client command goes: the context given (flag or `STARLING_CONTEXT`), else the
/// data directory given (flag, variable or config file), else the context in use.
struct Target {
    client: Client,
    context: Option<starling_api::Context>,
}

impl Target {
    fn open(dir: &DirArg, context: &Option<String>) -> anyhow::Result<Target> {
        let remote = |name: &str| -> anyhow::Result<Target> {
            let ctx = Registry::user()?.resolve(name)?;
            Ok(Target {
                client: ctx.client(DIAL_TIMEOUT)?,
                context: Some(ctx),
            })
        };
        if let Some(name) = context {
            return remote(name);
        }
        if let Some(path) = dir.given() {
            return Ok(Target {
                client: Client::unix(DataDir(path).control_socket()),
                context: None,
            });
        }
        if let Ok(registry) = Registry::user()
            && let Some(name) = registry.current()?
        {
            return remote(&name);
        }
        // Says which flag is missing.
        dir.path()?;
        anyhow::bail!("give --data-dir or --context")
    }

    /// Keeps what the client learned of the managers for the next command.
    fn remember(&mut self) {
        if let Some(ctx) = &mut self.context {
            let managers = self.client.managers();
            if let Err(e) = ctx.update_managers(managers) {
                tracing::debug!(error = %e, "context not updated");
            }
        }
    }
}

/// Runs one client call against the command's target, then keeps what the client learned.
macro_rules! call {
    ($dir:expr, $ctx:expr, |$c:ident| $body:expr) => {{
        let mut target = Target::open($dir, $ctx)?;
        let result: Result<_, ClientError> = {
            let $c = &target.client;
            $body
        };
        target.remember();
        result?
    }};
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn print_nodes(list: &starling_api::NodeList, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&list.nodes)?),
        Format::Table => {
            println!(
                "{:<14} {:<20} {:<8} {:<13} {:<15} VERSION",
                "ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"
            );
            for n in &list.nodes {
                println!(
                    "{:<14} {:<20} {:<8} {:<13} {:<15} {}",
                    n.id,
                    n.hostname,
                    capitalised(n.status.as_str()),
                    capitalised(n.availability.as_str()),
                    n.manager_status
                        .map(|m| capitalised(m.as_str()))
                        .unwrap_or_default(),
                    n.version
                );
            }
        }
    }
    if let Some(w) = &list.warning {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// `30d`, `12h`, `90m`, `45s` or a number of seconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like 30d, 12h, 90m, 45s, 500ms)"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return Err(format!("unknown unit {unit:?}: use d, h, m, s or ms")),
    };
    Ok(std::time::Duration::from_millis(ms))
}

/// `--tail N` or `--tail all` (`None`).
#[derive(Clone, Copy, Debug)]
struct Tail(Option<u64>);

fn parse_tail(text: &str) -> Result<Tail, String> {
    if text == "all" {
        return Ok(Tail(None));
    }
    text.parse()
        .map(|n| Tail(Some(n)))
        .map_err(|_| format!("{text:?}: expected a number of lines or `all`"))
}

/// `--since`: RFC 3339, Unix seconds, or a duration ago; as ms since the Unix epoch.
fn parse_since(text: &str) -> Result<u64, String> {
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| format!("{text:?} is before 1970"));
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs.saturating_mul(1000));
    }
    match parse_duration(text) {
        Ok(ago) => Ok(starling_api::unix_ms().saturating_sub(ago.as_millis() as u64)),
        Err(_) => Err(format!(
            "{text:?}: expected an RFC 3339 time (2026-12-01T10:00:00Z), Unix seconds, or a duration ago (10m)"
        )),
    }
}

/// A time (ms since the Unix epoch) in RFC 3339, UTC, to the millisecond.
fn rfc3339(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_else(|_| ms.to_string())
}

/// `service logs`: the service's (or, when no service has that name, the task's) records,
/// printed as they come; a follow that the manager ends for being idle is asked again from
/// where it stopped.
async fn print_logs(
    client: &starling_api::Client,
    what: &str,
    q: LogsQuery,
    timestamps: bool,
    format: Format,
) -> anyhow::Result<()> {
    match stream_logs(client, what, q, timestamps, format).await {
        // The reader went (`| head`): nothing more to say.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        r => r,
    }
}

async fn stream_logs(
    client: &starling_api::Client,
    what: &str,
    mut q: LogsQuery,
    timestamps: bool,
    format: Format,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let asked = starling_api::unix_ms();
    let mut reader = match client.service_logs(what, &q).await {
        Err(e) if e.code() == Some(starling_api::ErrorCode::NotFound) => {
            match client.task_logs(what, &q).await {
                Err(t) if t.code() == Some(starling_api::ErrorCode::NotFound) => {
                    anyhow::bail!("no such service or task: {what}")
                }
                r => (r?, true),
            }
        }
        r => (r?, false),
    };
    let mut last: Option<u64> = None;
    loop {
        let Some(record) = reader.0.next().await? else {
            return Ok(());
        };
        let mut out = std::io::stdout().lock();
        if format == Format::Json {
            writeln!(out, "{}", serde_json::to_string(&record)?)?;
        }
        match &record {
            starling_api::LogRecord::Line {
                time, stream, line, ..
            } => {
                last = Some(*time);
                if format == Format::Json {
                    continue;
                }
                let prefix = record.prefix().unwrap_or_default();
                let text = if timestamps {
                    format!("{} {prefix} | {line}", rfc3339(*time))
                } else {
                    format!("{prefix} | {line}")
                };
                if *stream == starling_api::LogStream::Stderr {
                    drop(out);
                    writeln!(std::io::stderr().lock(), "{text}")?;
                } else {
                    writeln!(out, "{text}")?;
                }
            }
            starling_api::LogRecord::Notice { message } => {
                if format == Format::Table {
                    drop(out);
                    eprintln!("starling: {message}");
                }
            }
            starling_api::LogRecord::Idle { .. } => {
                // Quiet for the manager's long-poll cap: go on from the last line seen.
                drop(out);
                q.tail = None;
                q.since_ms = Some(last.map_or(asked.max(q.since_ms.unwrap_or(0)), |t| t + 1));
                reader.0 = if reader.1 {
                    client.task_logs(what, &q).await?
                } else {
                    client.service_logs(what, &q).await?
                };
            }
        }
    }
}

/// jemalloc, not glibc's malloc: a manager answering bursts of requests frees many small
/// blocks of each size, which glibc's allocator sorts back into its bins (its `malloc`/`free`
/// family was ~13 % of the leader's CPU at 256 writing clients, by perf, even with a
/// 256-block per-thread cache). Measured with `starling-bench writes --clients 256`,
/// alternated twice (bench/RESULTS-remote-api.md, run 17): the members' CPU per write 54–58
/// → 45–50 µs, writes/s 21 700–23 800 → 25 900–26 500; idle worker / manager RSS 9.4 / 13.3
/// → 9.5 / 12.9 MiB (with `crates/node/link/startup.order` regenerated).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // The agent starts each task through this binary when it confines tasks in cgroups: it
    // enters the task's group, then executes the task's program (no runtime, no logging).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == starling_agent::exec::LAUNCH_COMMAND)
    {
        return std::process::ExitCode::from(starling_agent::exec::launch(&args[2..]));
    }
    // Parsed once, here: a bad flag is reported before anything starts.
    let cli = Cli::parse();
    // STARLING_THREADS: the runtime's worker threads (default: one per CPU). One is best
    // when several nodes share a few cores (a test or bench cluster on one machine): fewer
    // threads waking each other for every request. One means tokio's current-thread
    // runtime, everything on the main thread: at 256 clients on 2 cores with 3 managers it
    // took 12.7 % more writes/s to the leader and 5.3 % more spread than a multi-thread
    // runtime of one worker (bench/RESULTS-remote-api.md, run 22).
    let threads = match std::env::var_os("STARLING_THREADS") {
        None => None,
        Some(v) => match v.to_str().and_then(|s| s.trim().parse::<usize>().ok()) {
            Some(n) if (1..=1024).contains(&n) => Some(n),
            _ => {
                eprintln!(
                    "error: STARLING_THREADS={}: expected a number of threads from 1 to 1024",
                    v.to_string_lossy()
                );
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    // STARLING_BUSY_POLL_US: how long a busy node's threads poll for work before they sleep
    // (starling_node::busy_poll): the log writer with any runtime, the runtime's one thread
    // with STARLING_THREADS=1.
    let busy_poll = match busy_poll::policy_from_env() {
        Ok(policy) => policy,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    busy_poll::set_policy(busy_poll);
    if threads == Some(1) && !busy_poll.budget.is_zero() {
        let hooks = Arc::new(busy_poll::BusyPoll::new(busy_poll));
        let after = hooks.clone();
        builder
            .on_thread_park(move || hooks.before_park())
            .on_thread_unpark(move || after.after_unpark());
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line per cause, no backtrace: this is for operators.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STARLING_LOG")
                // openraft warns on every failed heartbeat and replication attempt (25 a
                // second per unreachable peer); an unreachable manager shows in `node ls`.
                .unwrap_or_else(|_| {
                    "warn,starling=info,openraft::core::heartbeat=error,openraft::replication=error,openraft::engine::handler::replication_handler=error".into()
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(path) = &cli.config {
        let _ = FILE_CONFIG.set(starling_node::config::FileConfig::load(path)?);
    }
    let fc = file_config();
    let ctx = &cli.context;
    use starling_node::config::required;
    match cli.command {
        Cmd::Init {
            dir,
            listen,
            advertise,
            hostname,
            cert_expiry,
            daemon: args,
        } => {
            args.tune();
            let m = daemon::init(daemon::InitOptions {
                data_dir: DataDir(dir.path()?),
                listen: required(listen, &fc.listen, "listen")?,
                advertise: advertise.or(fc.advertise),
                hostname: hostname.or_else(|| fc.hostname.clone()),
                cert_expiry,
            })
            .await?;
            serve_until_signal(m, args).await
        }
        Cmd::Join {
            dir,
            listen,
            advertise,
            hostname,
            token,
            manager,
            daemon: args,
        } => {
            args.tune();
            let m = daemon::join(daemon::JoinOptions {
                data_dir: DataDir(dir.path()?),
                listen: required(listen, &fc.listen, "listen")?,
                advertise: advertise.or(fc.advertise),
                hostname: hostname.or_else(|| fc.hostname.clone()),
                token: required(token, &fc.token, "token")?,
                manager: required(manager, &fc.manager, "manager")?,
            })
            .await?;
            serve_until_signal(m, args).await
        }
        Cmd::Run {
            dir,
            force_new_cluster,
            daemon: args,
        } => {
            args.tune();
            let m = daemon::run(DataDir(dir.path()?), force_new_cluster).await?;
            serve_until_signal(m, args).await
        }
        Cmd::Node { cmd } => node(cmd, ctx).await,
        Cmd::Members { dir, format } => {
            let v = call!(&dir, ctx, |c| c.members().await);
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Format::Table => {
                    println!("{:<14} {:<22} {:<6} GENERATION", "NODE", "ADDRESS", "STATE");
                    for m in &v.members {
                        println!(
                            "{:<14} {:<22} {:<6} {}",
                            m.node, m.addr, m.state, m.generation
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Leave { dir } => {
            let v = call!(&dir, ctx, |c| c.leave().await);
            println!("left: {}", v.left);
            Ok(())
        }
        Cmd::JoinToken {
            dir,
            role,
            quiet,
            rotate,
        } => {
            let v = if rotate {
                call!(&dir, ctx, |c| c.rotate_join_token(&role).await)
            } else {
                call!(&dir, ctx, |c| c.join_token(&role).await)
            };
            if quiet {
                println!("{}", v.token);
            } else {
                println!(
                    "To add a {role} to this cluster, run:\n\n    starling join --token {} --manager <MANAGER-IP:PORT> --data-dir <DIR> --listen <IP:PORT>\n",
                    v.token
                );
            }
            Ok(())
        }
        Cmd::Kv { cmd } => kv(cmd, ctx).await,
        Cmd::Service { cmd } => service(cmd, ctx).await,
        Cmd::Cert { cmd } => cert(cmd, ctx).await,
        Cmd::Context { cmd } => context(cmd),
        Cmd::Cluster { cmd } => cluster(cmd, ctx).await,
        Cmd::Ca { cmd } => ca(cmd, ctx).await,
        Cmd::Demo => tokio::task::spawn_blocking(demo::run).await?,
    }
}

async fn cluster(cmd: ClusterCmd, ctx: &Option<String>) -> anyhow::Result<()> {
    let v = match cmd {
        ClusterCmd::Inspect { dir, format } => {
            let v = call!(&dir, ctx, |c| c.cluster().await);
            if format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            v
        }
        ClusterCmd::Update {
            dir,
            cert_expiry,
            cert_grace,
            autopilot_cleanup_dead_managers,
            autopilot_min_managers,
            autopilot_dead_after,
            autopilot_promote_constraint,
        } => {
            let constraints = match &autopilot_promote_constraint[..] {
                [] => None,
                [none] if none == "none" => Some(Vec::new()),
                list => Some(list.to_vec()),
            };
            let update = starling_api::ClusterUpdate {
                cert_expiry_secs: cert_expiry.map(|d| d.as_secs()),
                cert_grace_secs: cert_grace.map(|d| d.as_secs()),
                autopilot_cleanup_dead_managers,
                autopilot_min_managers,
                autopilot_dead_after_secs: autopilot_dead_after.map(|d| d.as_secs()),
                autopilot_promote_constraints: constraints,
            };
            if update == starling_api::ClusterUpdate::default() {
                anyhow::bail!(
                    "nothing to change: give --cert-expiry, --cert-grace or an --autopilot-* setting"
                );
            }
            call!(&dir, ctx, |c| c.update_cluster(&update).await)
        }
    };
    println!("ID:                  {}", v.cluster_id);
    println!("CA digest:           sha256:{}", v.ca_digest);
    print_rotation(&v);
    println!(
        "Certificate expiry:  {}",
        human_duration(v.settings.cert_expiry_secs)
    );
    println!(
        "Renewal grace:       {}",
        human_duration(v.settings.cert_grace_secs)
    );
    let s = &v.settings;
    if s.autopilot_cleanup_dead_managers {
        println!(
            "Autopilot:           on: keeps {} managers, removes one down for {}{}",
            s.autopilot_min_managers,
            human_duration(s.autopilot_dead_after_secs),
            if s.autopilot_promote_constraints.is_empty() {
                String::new()
            } else {
                format!(
                    ", promotes workers with {}",
                    s.autopilot_promote_constraints.join(", ")
                )
            }
        );
    } else {
        println!("Autopilot:           off");
    }
    Ok(())
}

async fn ca(cmd: CaCmd, ctx: &Option<String>) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Status { dir, format } => {
            let v = call!(&dir, ctx, |c| c.cluster().await);
            if format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("CA digest:           sha256:{}", v.ca_digest);
                print_rotation(&v);
            }
            Ok(())
        }
        CaCmd::Rotate { dir, detach } => {
            let started = std::time::Instant::now();
            let v = call!(&dir, ctx, |c| c.rotate_ca().await);
            let Some(r) = v.ca_rotation.clone() else {
                anyhow::bail!("the cluster answered without a rotation under way");
            };
            println!(
                "Rotating the root CA from sha256:{} to sha256:{}.",
                v.ca_digest, r.new_ca_digest
            );
            if ctx.is_some() {
                println!(
                    "API client certificates of the old root stop working when it ends: issue new ones with `starling cert issue`."
                );
            }
            if detach {
                println!("Follow it with `starling ca status`.");
                return Ok(());
            }
            let mut target = Target::open(&dir, ctx)?;
            let mut shown = None;
            let mut failures = 0u32;
            loop {
                let v = match target.client.cluster().await {
                    Ok(v) => {
                        failures = 0;
                        v
                    }
                    Err(e) if failures < 20 => {
                        // A leader change or a lost connection: the rotation goes on; ask again.
                        failures += 1;
                        eprintln!("(asking again: {e})");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        target = Target::open(&dir, ctx)?;
                        continue;
                    }
                    Err(e) => anyhow::bail!(
                        "no answer for 20 s ({e}); the rotation goes on in the cluster (`starling ca status` on a manager). If this client's certificate is of the old root, the rotation has probably finished: issue a new one with `starling cert issue`."
                    ),
                };
                match &v.ca_rotation {
                    Some(p) => {
                        let line = rotation_line(p);
                        if shown.as_ref() != Some(&line) {
                            println!("{line}");
                            shown = Some(line);
                        }
                    }
                    None if v.ca_digest == r.new_ca_digest => {
                        target.remember();
                        println!(
                            "Root CA rotated to sha256:{} in {:.1} s: the old root is no longer trusted and the join tokens changed (`starling join-token worker`).",
                            v.ca_digest,
                            started.elapsed().as_secs_f64()
                        );
                        println!(
                            "API client certificates of the old root stop working: issue new ones with `starling cert issue`."
                        );
                        return Ok(());
                    }
                    None => anyhow::bail!(
                        "the cluster's root is now sha256:{}, not the one this rotation started",
                        v.ca_digest
                    ),
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
}

fn rotation_line(p: &starling_api::CaRotationView) -> String {
    let counted = p.nodes_on_new_root.len() + p.nodes_pending.len();
    let mut line = format!(
        "{} of {} nodes on the new root",
        p.nodes_on_new_root.len(),
        counted
    );
    if !p.nodes_down.is_empty() {
        line.push_str(&format!(
            " ({} down, not waited for: {})",
            p.nodes_down.len(),
            p.nodes_down.join(", ")
        ));
    }
    line
}

fn print_rotation(v: &starling_api::ClusterView) {
    match &v.ca_rotation {
        Some(p) => println!(
            "CA rotation:         to sha256:{}: {}",
            p.new_ca_digest,
            rotation_line(p)
        ),
        None => println!("CA rotation:         none under way"),
    }
}

/// `90d`, `12h`, `30m` or `45s`: the largest unit that divides the duration.
fn human_duration(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

async fn node(cmd: NodeCmd, ctx: &Option<String>) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Ls { dir, format } => {
            let v = call!(&dir, ctx, |c| c.nodes().await);
            print_nodes(&v, format)
        }
        NodeCmd::Promote { dir, id } => {
            call!(&dir, ctx, |c| c.promote(&id).await);
            println!("Node {id} promoted to a manager in the cluster.");
            Ok(())
        }
        NodeCmd::Demote { dir, id } => {
            call!(&dir, ctx, |c| c.demote(&id).await);
            println!("Manager {id} demoted in the cluster.");
            Ok(())
        }
        NodeCmd::Inspect { dir, id } => {
            let v = call!(&dir, ctx, |c| c.node(&id).await);
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        NodeCmd::Update {
            dir,
            availability,
            label_add,
            label_rm,
            id,
        } => {
            if availability.is_none() && label_add.is_empty() && label_rm.is_empty() {
                anyhow::bail!("nothing to change: give --availability, --label-add or --label-rm");
            }
            let change = starling_api::LabelChange {
                add: pairs(&label_add, "--label-add")?,
                remove: label_rm,
            };
            if let Some(a) = availability {
                let availability: starling_api::Availability = a.parse()?;
                call!(&dir, ctx, |c| c.set_availability(&id, availability).await);
            }
            if !change.add.is_empty() || !change.remove.is_empty() {
                call!(&dir, ctx, |c| c.node_labels(&id, &change).await);
            }
            println!("{id}");
            Ok(())
        }
        NodeCmd::Ps { dir, node, format } => {
            let node = match node {
                Some(n) => n,
                None => call!(&dir, ctx, |c| c.info().await).node_id,
            };
            let v = call!(&dir, ctx, |c| c.tasks(None, Some(&node)).await);
            print_tasks(&v.tasks, format)
        }
        NodeCmd::Rm { dir, id, force } => {
            call!(&dir, ctx, |c| c.remove_node(&id, force).await);
            println!("{id}");
            Ok(())
        }
    }
}

/// `K=V` arguments as a map.
fn pairs(
    args: &[String],
    flag: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(anyhow::anyhow!("{flag} {a:?}: expected KEY=VALUE")),
        })
        .collect()
}

/// `512M`, `2G`, `64k` or bytes.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (n, mult) = match t.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a size (512M, 2G, bytes)"))
}

/// `0.5`, `2`: CPUs, as billionths.
fn parse_cpus(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|c| c.is_finite() && *c > 0.0 && *c <= 4096.0)
        .map(|c| (c * 1e9).round() as u64)
        .ok_or_else(|| format!("{text:?} is not a number of CPUs (0.5, 2)"))
}

fn ago(ms: u64) -> String {
    let s = starling_api::unix_ms().saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s} seconds ago"),
        60..=3599 => format!("{} minutes ago", s / 60),
        3600..=86_399 => format!("{} hours ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

fn print_tasks(tasks: &[starling_api::TaskView], format: Format) -> anyhow::Result<()> {
    if let Format::Json = format {
        println!("{}", serde_json::to_string_pretty(tasks)?);
        return Ok(());
    }
    println!(
        "{:<17} {:<22} {:<16} {:<14} {:<38} {:<30} PORTS",
        "ID", "NAME", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR"
    );
    let mut last_slot: Option<(String, String)> = None;
    for t in tasks {
        let slot = (t.service_id.clone(), t.slot.clone());
        let name = if last_slot.as_ref() == Some(&slot) {
            format!(" \\_ {}.{}", t.service, t.slot)
        } else {
            format!("{}.{}", t.service, t.slot)
        };
        last_slot = Some(slot);
        let error = t
            .error
            .clone()
            .or_else(|| t.pending_reason.clone())
            .unwrap_or_default();
        let ports: Vec<String> = t
            .ports
            .iter()
            .map(|p| format!("{}={}", p.name, p.port))
            .collect();
        println!(
            "{:<17} {:<22} {:<16} {:<14} {:<38} {:<30} {}",
            t.id,
            name,
            t.node_hostname.clone().unwrap_or_default(),
            capitalised(&t.desired_state),
            match &t.health {
                Some(h) => format!("{} {} ({h})", capitalised(&t.state), ago(t.timestamp)),
                None => format!("{} {}", capitalised(&t.state), ago(t.timestamp)),
            },
            error,
            ports.join(",")
        );
    }
    Ok(())
}

async fn service(cmd: ServiceCmd, ctx: &Option<String>) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create {
            dir,
            name,
            replicas,
            mode,
            env,
            workdir,
            user,
            constraint,
            placement_pref,
            restart_condition,
            restart_delay,
            restart_max_attempts,
            restart_window,
            limit_memory,
            limit_cpu,
            port,
            rollout,
            health,
            no_resolve_program,
            quiet,
            command,
        } => {
            let program = command.first().cloned().unwrap_or_default();
            let default_name = std::path::Path::new(&program)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("service")
                .to_ascii_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-");
            let mut spec: starling_api::ServiceSpec = serde_json::from_value(serde_json::json!({
                "name": name.unwrap_or(default_name),
                "command": command,
            }))?;
            spec.mode = match mode {
                Some(ServiceMode::Global) => starling_api::Mode::Global,
                _ => starling_api::Mode::Replicated,
            };
            spec.replicas = replicas.unwrap_or(1);
            spec.env = pairs(&env, "--env")?;
            spec.workdir = workdir;
            spec.user = user;
            spec.constraints = constraint;
            spec.preferences = placement_pref;
            if let Some(c) = restart_condition {
                spec.restart_condition =
                    serde_json::from_value(serde_json::Value::String(c.clone())).map_err(|_| {
                        anyhow::anyhow!("--restart-condition {c:?}: any, on-failure or none")
                    })?;
            }
            if let Some(d) = restart_delay {
                spec.restart_delay_ms = d.as_millis() as u64;
            }
            if let Some(n) = restart_max_attempts {
                spec.restart_max_attempts = n;
            }
            if let Some(w) = restart_window {
                spec.restart_window_ms = w.as_millis() as u64;
            }
            spec.memory_bytes = limit_memory;
            spec.nano_cpus = limit_cpu;
            spec.ports = port
                .into_iter()
                .map(|name| starling_api::PortRequest {
                    name,
                    protocol: "tcp".into(),
                })
                .collect();
            rollout.apply(&mut spec)?;
            health.apply(&mut spec)?;
            // Checked here first: one clear line, nothing sent.
            spec.to_state().map_err(|e| anyhow::anyhow!(e))?;
            let v = call!(&dir, ctx, |c| c
                .create_service_with(&spec, !no_resolve_program)
                .await);
            if quiet {
                println!("{}", v.id);
            } else {
                println!(
                    "{}\nService {} created; `starling service ps {}` shows its tasks.",
                    v.id, v.spec.name, v.spec.name
                );
            }
        }
        ServiceCmd::Ls { dir, format } => {
            let v = call!(&dir, ctx, |c| c.services().await);
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&v.services)?),
                Format::Table => {
                    println!(
                        "{:<17} {:<20} {:<11} {:<9} {:<16} {:<30} PORTS",
                        "ID", "NAME", "MODE", "REPLICAS", "UPDATE", "COMMAND"
                    );
                    for s in &v.services {
                        let ports: Vec<&str> =
                            s.spec.ports.iter().map(|p| p.name.as_str()).collect();
                        let mode = match s.spec.mode {
                            starling_api::Mode::Replicated => "replicated",
                            starling_api::Mode::Global => "global",
                        };
                        let mut command = s.spec.command.join(" ");
                        if command.len() > 29 {
                            command.truncate(26);
                            command.push_str("...");
                        }
                        let update = s.update_status.as_ref().map_or("", |u| u.state.as_str());
                        println!(
                            "{:<17} {:<20} {:<11} {:<9} {:<16} {:<30} {}",
                            s.id,
                            s.spec.name,
                            mode,
                            format!("{}/{}", s.running, s.desired),
                            update,
                            command,
                            ports.join(",")
                        );
                    }
                }
            }
        }
        ServiceCmd::Ps {
            dir,
            service,
            filter,
            format,
        } => {
            let wanted = match filter.as_deref() {
                None => None,
                Some(f) => Some(
                    f.strip_prefix("desired-state=")
                        .ok_or_else(|| {
                            anyhow::anyhow!("--filter {f:?}: only desired-state=<state> is known")
                        })?
                        .to_owned(),
                ),
            };
            let v = call!(&dir, ctx, |c| c.tasks(Some(&service), None).await);
            let tasks: Vec<_> = v
                .tasks
                .into_iter()
                .filter(|t| wanted.as_ref().is_none_or(|w| t.desired_state == *w))
                .collect();
            print_tasks(&tasks, format)?;
        }
        ServiceCmd::Inspect { dir, service } => {
            let v = call!(&dir, ctx, |c| c.service(&service).await);
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ServiceCmd::Update {
            dir,
            service,
            replicas,
            env_add,
            env_rm,
            force,
            rollout,
            health,
            command,
        } => {
            let current = call!(&dir, ctx, |c| c.service(&service).await);
            let mut spec = current.spec.clone();
            rollout.apply(&mut spec)?;
            health.apply(&mut spec)?;
            if force {
                spec.force_update += 1;
            }
            if let Some(r) = replicas {
                spec.replicas = r;
            }
            spec.env.extend(pairs(&env_add, "--env-add")?);
            for k in env_rm {
                spec.env.remove(&k);
            }
            if !command.is_empty() {
                spec.command = command;
            }
            spec.to_state().map_err(|e| anyhow::anyhow!(e))?;
            let v = call!(&dir, ctx, |c| c
                .update_service(&current.id, &spec, Some(current.version))
                .await);
            println!("{}", v.id);
        }
        ServiceCmd::Logs {
            dir,
            target: what,
            follow,
            tail,
            since,
            timestamps,
            format,
        } => {
            let mut target = Target::open(&dir, ctx)?;
            let result = print_logs(
                &target.client,
                &what,
                LogsQuery {
                    follow,
                    tail: tail.and_then(|t| t.0),
                    since_ms: since,
                },
                timestamps,
                format,
            )
            .await;
            target.remember();
            result?;
        }
        ServiceCmd::Endpoints {
            dir,
            service,
            passing,
            format,
        } => {
            let list = call!(&dir, ctx, |c| c
                .service_endpoints(&service, passing, None, None)
                .await);
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&list.endpoints)?),
                Format::Table => {
                    println!(
                        "{:<18} {:<6} {:<14} {:<16} {:<24} HEALTH",
                        "TASK", "SLOT", "NODE", "ADDRESS", "PORTS"
                    );
                    for e in &list.endpoints {
                        let ports: Vec<String> =
                            e.ports.iter().map(|(n, p)| format!("{n}={p}")).collect();
                        let health = if e.suspected {
                            format!("{} (node suspected)", e.health)
                        } else {
                            e.health.clone()
                        };
                        println!(
                            "{:<18} {:<6} {:<14} {:<16} {:<24} {health}",
                            e.task,
                            e.slot,
                            e.node,
                            e.addr,
                            ports.join(",")
                        );
                    }
                }
            }
        }
        ServiceCmd::Rollback { dir, service } => {
            let v = call!(&dir, ctx, |c| c.rollback_service(&service).await);
            println!(
                "{}\nService {} rolling back to its previous spec; `starling service inspect {}` shows the progress.",
                v.id, v.spec.name, v.spec.name
            );
        }
        ServiceCmd::Scale { dir, pairs: args } => {
            let mut wanted = Vec::new();
            for a in &args {
                let (name, n) = a
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("{a:?}: expected SERVICE=REPLICAS"))?;
                let n: u32 = n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{a:?}: replicas must be a number ≥ 0"))?;
                wanted.push((name.to_owned(), n));
            }
            for (name, n) in wanted {
                call!(&dir, ctx, |c| c.scale_service(&name, n).await);
                println!("{name} scaled to {n}");
            }
        }
        ServiceCmd::Rm { dir, services } => {
            for s in services {
                let v = call!(&dir, ctx, |c| c.remove_service(&s).await);
                println!("{}", v.spec.name);
            }
        }
    }
    Ok(())
}

async fn kv(cmd: KvCmd, ctx: &Option<String>) -> anyhow::Result<()> {
    match cmd {
        KvCmd::Put { dir, key, value } => {
            let v = call!(&dir, ctx, |c| c.kv_put(&key, value.into_bytes()).await);
            println!("revision {}", v.revision);
        }
        KvCmd::Cas {
            dir,
            key,
            expect_revision,
            value,
        } => {
            let v = call!(&dir, ctx, |c| c
                .kv_cas(&key, expect_revision, value.into_bytes())
                .await);
            println!("revision {}", v.revision);
        }
        KvCmd::Get {
            dir,
            key,
            consistency,
        } => {
            let level = match consistency.as_str() {
                "linearizable" => Consistency::Linearizable,
                "stale" => Consistency::Stale,
                other => {
                    anyhow::bail!("unknown consistency {other:?}: use linearizable or stale")
                }
            };
            let v = call!(&dir, ctx, |c| c.kv_get(&key, level).await);
            let bytes = v.bytes()?;
            {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.write_all(b"\n")?;
            }
            let stale = if level == Consistency::Stale {
                " — a stale read of this manager's local state"
            } else {
                ""
            };
            eprintln!(
                "revision {} (mod_revision {}){stale}",
                v.revision, v.mod_revision
            );
        }
        KvCmd::Del { dir, key } => {
            let v = call!(&dir, ctx, |c| c.kv_delete(&key).await);
            println!(
                "revision {}{}",
                v.revision,
                if v.deleted { "" } else { " (no such key)" }
            );
        }
        KvCmd::Watch {
            dir,
            prefix,
            from_revision,
        } => {
            let mut target = Target::open(&dir, ctx)?;
            let mut from = match from_revision {
                Some(r) => r,
                None => {
                    let info = target.client.info().await?;
                    info.raft.map_or(0, |r| r.applied) + 1
                }
            };
            target.remember();
            loop {
                let v = target.client.watch(&prefix, from, 30).await?;
                for e in &v.events {
                    match e.kind {
                        starling_api::EventType::Put => println!(
                            "{} PUT {} {}",
                            e.revision,
                            e.key,
                            e.value.clone().unwrap_or_else(|| format!(
                                "(base64) {}",
                                e.value_base64.clone().unwrap_or_default()
                            ))
                        ),
                        starling_api::EventType::Delete => {
                            println!("{} DELETE {}", e.revision, e.key)
                        }
                    }
                    from = from.max(e.revision + 1);
                }
            }
        }
        KvCmd::Ls { dir, prefix } => {
            let v = call!(&dir, ctx, |c| c
                .kv_list(&prefix, Consistency::Linearizable)
                .await);
            for k in &v.keys {
                println!(
                    "{}\t{}",
                    k.key,
                    k.value
                        .clone()
                        .unwrap_or_else(|| format!("(base64) {}", k.value_base64))
                );
            }
            eprintln!("revision {}", v.revision);
        }
    }
    Ok(())
}

async fn cert(cmd: CertCmd, ctx: &Option<String>) -> anyhow::Result<()> {
    match cmd {
        CertCmd::Issue {
            dir,
            role,
            name,
            out,
            lifetime,
        } => {
            starling_api::check_name(&name)?;
            // Before anything is issued: a certificate nobody can store is not recorded.
            starling_api::Context::check_target(&out)?;
            let key = starling_transport::NodeKey::generate()?;
            let req = starling_api::CertRequest {
                name: name.clone(),
                role: match role {
                    CertRole::Admin => starling_api::ClientRole::Admin,
                    CertRole::Viewer => starling_api::ClientRole::Viewer,
                },
                csr_base64: starling_api::encode_bytes(&key.csr()?),
                lifetime_secs: lifetime.map(|d| d.as_secs()),
            };
            let issued = call!(&dir, ctx, |c| c.issue_cert(&req).await);
            let cert = starling_api::pem_to_der(&issued.cert_pem)?;
            let ca = starling_api::pem_to_der(&issued.ca_pem)?;
            let creds =
                starling_transport::NodeCredentials::new(cert.into(), key, vec![ca.into()])?;
            let meta = starling_api::ContextMeta {
                name: name.clone(),
                cluster_id: issued.cluster_id.clone(),
                role: issued.client.role,
                managers: issued.managers.clone(),
            };
            starling_api::Context::save(&out, &meta, &creds)?;
            Registry::user()?.register(&name, &out)?;
            println!(
                "Context {name} ({}) written to {} and registered: `starling --context {name} node ls`.",
                issued.client.role,
                out.display()
            );
            Ok(())
        }
        CertCmd::Ls { dir, format } => {
            let v = call!(&dir, ctx, |c| c.certs().await);
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&v.clients)?),
                Format::Table => {
                    println!(
                        "{:<20} {:<14} {:<7} {:<8} EXPIRES (unix)",
                        "NAME", "ID", "ROLE", "REVOKED"
                    );
                    for c in &v.clients {
                        println!(
                            "{:<20} {:<14} {:<7} {:<8} {}",
                            c.name, c.id, c.role, c.revoked, c.not_after
                        );
                    }
                }
            }
            Ok(())
        }
        CertCmd::Revoke { dir, name } => {
            call!(&dir, ctx, |c| c.revoke_cert(&name).await);
            println!("{name} revoked");
            Ok(())
        }
    }
}

fn context(cmd: ContextCmd) -> anyhow::Result<()> {
    let registry = Registry::user()?;
    match cmd {
        ContextCmd::Ls => {
            let current = registry.current()?;
            println!("{:<2}{:<20} DIRECTORY", "", "NAME");
            for (name, dir) in registry.list()? {
                let mark = if current.as_deref() == Some(name.as_str()) {
                    "*"
                } else {
                    ""
                };
                println!("{mark:<2}{name:<20} {}", dir.display());
            }
        }
        ContextCmd::Use { name } => {
            registry.use_context(&name)?;
            println!("using context {name}");
        }
        ContextCmd::Rm { name } => {
            registry.remove(&name)?;
            println!("{name} removed");
        }
        ContextCmd::Import { dir, name } => {
            let ctx = starling_api::Context::load(&dir)?;
            let name = name.unwrap_or(ctx.meta.name);
            registry.register(&name, &dir)?;
            println!("{name} registered");
        }
    }
    Ok(())
}
