//! The `starling` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use starling_node::datadir::DataDir;
use starling_node::{control, daemon, http};

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
}

#[derive(clap::Args, Clone)]
struct DaemonArgs {
    /// Serve Prometheus metrics on this TCP address (off by default).
    #[arg(long, env = "STARLING_METRICS")]
    metrics: Option<SocketAddr>,
    /// A manager snapshots its state (and trims its log) after this many new log entries
    /// (default 50 000).
    #[arg(long, env = "STARLING_SNAPSHOT_INTERVAL", value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_interval: Option<u64>,
}

impl DaemonArgs {
    /// Hands the Raft tuning to the daemon before the node starts.
    fn tune(&self) {
        if let Some(n) = self.snapshot_interval.or(file_config().snapshot_interval) {
            let _ = daemon::SNAPSHOT_INTERVAL.set(n);
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

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
    /// Change a node's availability.
    Update {
        #[command(flatten)]
        dir: DirArg,
        /// `active`, `pause` or `drain`.
        #[arg(long)]
        availability: String,
        /// Node id.
        id: String,
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

async fn serve_until_signal(m: daemon::Manager, args: DaemonArgs) -> anyhow::Result<()> {
    let sock = m.data_dir.control_socket();
    let listener = http::bind(&sock).with_context(|| format!("cannot bind {}", sock.display()))?;
    let stop = m.stop.clone();
    let current: daemon::Current = Arc::new(std::sync::RwLock::new(Arc::new(m)));
    let now = |c: &daemon::Current| c.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(addr) = args.metrics.or(file_config().metrics) {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        let c = current.clone();
        tokio::spawn(http::serve_tcp(tcp, move |_req| {
            let m = now(&c);
            async move {
                http::HttpResponse {
                    status: 200,
                    body: starling_node::metrics::render(&m).into_bytes(),
                    content_type: "text/plain; version=0.0.4",
                }
            }
        }));
    }
    let c = current.clone();
    let server = tokio::spawn(http::serve(listener, move |req| {
        let m = now(&c);
        async move { control::handle(m, req).await }
    }));
    let renewal = tokio::spawn(daemon::renewal_loop(current.clone()));
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

async fn call(
    dir: &DirArg,
    method: &str,
    target: &str,
    body: &[u8],
) -> anyhow::Result<serde_json::Value> {
    let sock = DataDir(dir.path()?).control_socket();
    let r = http::call(&sock, method, target, body)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    if r.status >= 400 {
        let msg = v["error"].as_str().unwrap_or("request failed").to_owned();
        anyhow::bail!("{msg}");
    }
    Ok(v)
}

fn print_nodes(v: &serde_json::Value, format: Format) {
    let empty = Vec::new();
    let nodes = v["nodes"].as_array().unwrap_or(&empty);
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(nodes).unwrap_or_default()
        ),
        Format::Table => {
            println!(
                "{:<14} {:<20} {:<8} {:<13} {:<15} VERSION",
                "ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"
            );
            for n in nodes {
                let cap = |s: &serde_json::Value| {
                    let s = s.as_str().unwrap_or("");
                    let mut c = s.chars();
                    c.next()
                        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                        .unwrap_or_default()
                };
                println!(
                    "{:<14} {:<20} {:<8} {:<13} {:<15} {}",
                    n["id"].as_str().unwrap_or(""),
                    n["hostname"].as_str().unwrap_or(""),
                    cap(&n["status"]),
                    cap(&n["availability"]),
                    cap(&n["manager_status"]),
                    n["version"]
                );
            }
        }
    }
    if let Some(w) = v["warning"].as_str() {
        eprintln!("warning: {w}");
    }
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line per cause, no backtrace: this is for operators.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main() -> anyhow::Result<()> {
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
    let cli = Cli::parse();
    if let Some(path) = &cli.config {
        let _ = FILE_CONFIG.set(starling_node::config::FileConfig::load(path)?);
    }
    let fc = file_config();
    use starling_node::config::required;
    match cli.command {
        Cmd::Init {
            dir,
            listen,
            advertise,
            hostname,
            daemon: args,
        } => {
            args.tune();
            let m = daemon::init(daemon::InitOptions {
                data_dir: DataDir(dir.path()?),
                listen: required(listen, &fc.listen, "listen")?,
                advertise: advertise.or(fc.advertise),
                hostname: hostname.or_else(|| fc.hostname.clone()),
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
        Cmd::Run { dir, daemon: args } => {
            args.tune();
            serve_until_signal(daemon::run(DataDir(dir.path()?)).await?, args).await
        }
        Cmd::Node {
            cmd: NodeCmd::Ls { dir, format },
        } => {
            let v = call(&dir, "GET", "/v1/nodes", b"").await?;
            print_nodes(&v, format);
            Ok(())
        }
        Cmd::Node {
            cmd: NodeCmd::Promote { dir, id },
        } => {
            let path = format!("/v1/nodes/{}/promote", http::percent_encode(&id));
            call(&dir, "POST", &path, b"").await?;
            println!("Node {id} promoted to a manager in the cluster.");
            Ok(())
        }
        Cmd::Node {
            cmd: NodeCmd::Demote { dir, id },
        } => {
            let path = format!("/v1/nodes/{}/demote", http::percent_encode(&id));
            call(&dir, "POST", &path, b"").await?;
            println!("Manager {id} demoted in the cluster.");
            Ok(())
        }
        Cmd::Node {
            cmd: NodeCmd::Inspect { dir, id },
        } => {
            let path = format!("/v1/nodes/{}", http::percent_encode(&id));
            let v = call(&dir, "GET", &path, b"").await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Node {
            cmd:
                NodeCmd::Update {
                    dir,
                    availability,
                    id,
                },
        } => {
            let path = format!("/v1/nodes/{}/availability", http::percent_encode(&id));
            call(&dir, "PUT", &path, availability.as_bytes()).await?;
            println!("{id}");
            Ok(())
        }
        Cmd::Node {
            cmd: NodeCmd::Rm { dir, id, force },
        } => {
            let path = format!("/v1/nodes/{}?force={force}", http::percent_encode(&id));
            call(&dir, "DELETE", &path, b"").await?;
            println!("{id}");
            Ok(())
        }
        Cmd::Members { dir, format } => {
            let v = call(&dir, "GET", "/v1/members", b"").await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Format::Table => {
                    println!("{:<14} {:<22} {:<6} GENERATION", "NODE", "ADDRESS", "STATE");
                    for m in v["members"].as_array().into_iter().flatten() {
                        println!(
                            "{:<14} {:<22} {:<6} {}",
                            m["node"].as_str().unwrap_or(""),
                            m["addr"].as_str().unwrap_or(""),
                            m["state"].as_str().unwrap_or(""),
                            m["generation"]
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Leave { dir } => {
            let v = call(&dir, "POST", "/v1/leave", b"").await?;
            println!("left: {}", v["left"].as_str().unwrap_or(""));
            Ok(())
        }
        Cmd::JoinToken {
            dir,
            role,
            quiet,
            rotate,
        } => {
            let path = format!("/v1/join-token/{}", http::percent_encode(&role));
            let v = if rotate {
                call(&dir, "POST", &format!("{path}/rotate"), b"").await?
            } else {
                call(&dir, "GET", &path, b"").await?
            };
            let token = v["token"].as_str().unwrap_or("");
            if quiet {
                println!("{token}");
            } else {
                println!(
                    "To add a {role} to this cluster, run:\n\n    starling join --token {token} --manager <MANAGER-IP:PORT> --data-dir <DIR> --listen <IP:PORT>\n"
                );
            }
            Ok(())
        }
        Cmd::Kv { cmd } => kv(cmd).await,
        Cmd::Demo => tokio::task::spawn_blocking(demo::run).await?,
    }
}

async fn kv(cmd: KvCmd) -> anyhow::Result<()> {
    let key_path = |k: &str| format!("/v1/kv/{}", http::percent_encode(k));
    match cmd {
        KvCmd::Put { dir, key, value } => {
            let v = call(&dir, "PUT", &key_path(&key), value.as_bytes()).await?;
            println!("revision {}", v["revision"]);
        }
        KvCmd::Cas {
            dir,
            key,
            expect_revision,
            value,
        } => {
            let target = format!("{}?expect-revision={expect_revision}", key_path(&key));
            let v = call(&dir, "PUT", &target, value.as_bytes()).await?;
            println!("revision {}", v["revision"]);
        }
        KvCmd::Get {
            dir,
            key,
            consistency,
        } => {
            let target = format!(
                "{}?consistency={}",
                key_path(&key),
                http::percent_encode(&consistency)
            );
            let v = call(&dir, "GET", &target, b"").await?;
            println!("{}", v["value"].as_str().unwrap_or(""));
            let stale = if consistency == "stale" {
                " — a stale read of this manager's local state"
            } else {
                ""
            };
            eprintln!(
                "revision {} (mod_revision {}){stale}",
                v["revision"], v["mod_revision"]
            );
        }
        KvCmd::Del { dir, key } => {
            let v = call(&dir, "DELETE", &key_path(&key), b"").await?;
            println!(
                "revision {}{}",
                v["revision"],
                if v["deleted"] == true {
                    ""
                } else {
                    " (no such key)"
                }
            );
        }
        KvCmd::Watch {
            dir,
            prefix,
            from_revision,
        } => {
            let mut from = match from_revision {
                Some(r) => r,
                None => {
                    let info = call(&dir, "GET", "/v1/info", b"").await?;
                    info["raft"]["applied"].as_u64().unwrap_or(0) + 1
                }
            };
            loop {
                let target = format!(
                    "/v1/watch?prefix={}&from={from}&wait=30",
                    http::percent_encode(&prefix)
                );
                let v = call(&dir, "GET", &target, b"").await?;
                for e in v["events"].as_array().into_iter().flatten() {
                    let rev = e["revision"].as_u64().unwrap_or(from);
                    match e["type"].as_str() {
                        Some("put") => println!(
                            "{rev} PUT {} {}",
                            e["key"].as_str().unwrap_or(""),
                            e["value"].as_str().unwrap_or("")
                        ),
                        _ => println!("{rev} DELETE {}", e["key"].as_str().unwrap_or("")),
                    }
                    from = from.max(rev + 1);
                }
            }
        }
        KvCmd::Ls { dir, prefix } => {
            let v = call(
                &dir,
                "GET",
                &format!("/v1/kv?prefix={}", http::percent_encode(&prefix)),
                b"",
            )
            .await?;
            for k in v["keys"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}",
                    k["key"].as_str().unwrap_or(""),
                    k["value"].as_str().unwrap_or("")
                );
            }
            eprintln!("revision {}", v["revision"]);
        }
    }
    Ok(())
}
