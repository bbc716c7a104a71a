//! `starling-bench`: Starling beside etcd 3.4 on this machine, in one run.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use starling_bench::cluster::{Etcd, Starling, etcd_available};
use starling_bench::machine::Machine;
use starling_bench::measures::{self, Plan};

/// jemalloc, not glibc's malloc: the clients of both systems run in this process and share the
/// machine's cores with the members, so they cost as little as they can (the `starling`
/// binary keeps glibc's: jemalloc put an idle worker over its 15 MiB budget).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Measure {
    /// Durable PUTs, 1–256 clients, spread and to the leader.
    Writes,
    /// Linearizable and local GETs.
    Reads,
    /// Leader killed → first acknowledged write.
    Failover,
    /// Worker `starling join` → `ready`.
    Join,
    /// 10 rounds of 256-client writes on each system: elections and client errors.
    UnderLoad,
    /// The gossip simulator at 1 000 nodes beside the Serf model.
    Gossip,
    /// The gossip simulator at 10 000 nodes, started as a formed cluster (the same measures
    /// as `gossip`).
    GossipScale,
    /// Failure detection in the simulator: kill → hidden and Down everywhere, false Downs
    /// under 10 % loss (6, 100 and 1 000 nodes).
    Detection,
    /// The scheduler in process: 100 000 tasks on 1 000 simulated nodes.
    Scheduler,
    /// Services with real processes: 100 replicas created, a worker killed 10 times, then
    /// 10 minutes at full CPU counting false reschedules.
    Tasks,
    /// Certificates: join-protocol requests from 100 idle workers over 60 s, the spread of
    /// 1 000 nodes' renewals, and `ca rotate` on a 20-node cluster (5 rotations).
    Certs,
    /// Idle memory: a fresh manager and a worker joined to it, beside an idle etcd member.
    Memory,
    /// Everything, written to bench/RESULTS.md.
    All,
}

#[derive(Parser, Debug)]
#[command(
    name = "starling-bench",
    about = "Starling beside etcd 3.4, in one run"
)]
struct Args {
    /// What to measure.
    measure: Measure,
    /// A run of seconds (for tests): short windows, few clients and rounds, 24 gossip nodes.
    #[arg(long)]
    quick: bool,
    /// Where the clusters keep their data (default: a temporary directory under target/).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also write the report to this file (`all` without --quick writes bench/RESULTS.md).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the clusters' data directories and logs after the run (their path is printed).
    #[arg(long)]
    keep_data: bool,
    /// How long `tasks` keeps every core busy, counting false reschedules (default 600; 10
    /// with --quick).
    #[arg(long)]
    soak_secs: Option<u64>,
    /// Only these client counts in `writes` and `reads` (e.g. `--clients 256` or `--clients
    /// 1,64`), to profile or compare one cell; `all` then leaves RESULTS.md alone.
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<usize>>,
}

#[tokio::main]
async fn main() {
    if let Err(e) = real_main().await {
        eprintln!("starling-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(clients) = &args.clients {
        anyhow::ensure!(
            !clients.is_empty() && !clients.contains(&0),
            "--clients takes client counts of at least 1"
        );
        plan.write_clients = clients.clone();
        plan.read_clients = clients.clone();
    }
    let needs_clusters = !matches!(
        args.measure,
        Measure::Gossip
            | Measure::GossipScale
            | Measure::Detection
            | Measure::Scheduler
            | Measure::Tasks
            | Measure::Certs
            | Measure::Memory
    );
    let etcd_version = if needs_clusters || args.measure == Measure::Memory {
        etcd_available()?
    } else {
        String::new()
    };
    let base = match &args.data_dir {
        Some(d) => d.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data"),
    };
    std::fs::create_dir_all(&base).with_context(|| format!("{}", base.display()))?;
    let base = base.canonicalize().unwrap_or(base);
    let tmp = tempfile::Builder::new().prefix("run-").tempdir_in(&base)?;
    let machine = Machine::measure(tmp.path(), if args.quick { 20 } else { 500 })?;
    let command = format!(
        "cargo run --release -p starling-bench -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let mut report = format!(
        "# Starling beside etcd\n\n{}Command: `{}`. {}, 3 members on 127.0.0.1; Starling `{}` \
         3 managers, {} build. Data of both on the same disk under `{}`. The members share the \
         cores: each Starling node runs with `STARLING_THREADS=1` (tokio's current-thread runtime, \
         polling its socket up to 250 µs before it sleeps while busy: `STARLING_BUSY_POLL_US`'s \
         default) and each etcd member with `GOMAXPROCS=1`. The clients of both systems run in the bench's \
         own process (allocator: jemalloc).\n\n",
        machine.markdown(),
        command,
        if !etcd_version.is_empty() {
            etcd_version.as_str()
        } else {
            "etcd not started"
        },
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug (figures not meaningful)"
        } else {
            "release"
        },
        base.display(),
    );
    print!("{report}");
    let mut clusters = None;
    if needs_clusters {
        let st = Starling::start(&tmp.path().join("starling"), 3).await?;
        let e = Etcd::start(&tmp.path().join("etcd"), 3).await?;
        clusters = Some((st, e));
    }
    let wants = |m: Measure| args.measure == m || args.measure == Measure::All;
    let mut emit = |section: String| {
        print!("{section}");
        report.push_str(&section);
    };
    if let Some((st, e)) = clusters.as_mut() {
        if wants(Measure::Writes) {
            emit(measures::writes(st, e, &plan, &machine).await?);
        }
        if wants(Measure::Reads) {
            emit(measures::reads(st, e, &plan).await?);
        }
        if wants(Measure::UnderLoad) {
            emit(measures::under_load(st, e, &plan).await?);
        }
        if wants(Measure::Failover) {
            emit(measures::failover(st, e, &plan).await?);
        }
        if wants(Measure::Join) {
            emit(measures::join(st, &plan).await?);
        }
    }
    // The simulator needs no cluster: stop them first so they do not share the cores.
    drop(clusters);
    if wants(Measure::Memory) {
        let (rounds, idle) = if args.quick { (1, 3) } else { (3, 30) };
        emit(
            starling_bench::memory::run(
                &tmp.path().join("memory"),
                rounds,
                std::time::Duration::from_secs(idle),
            )
            .await?,
        );
    }
    if wants(Measure::Gossip) {
        let n = plan.gossip_nodes;
        let figures = tokio::task::spawn_blocking(move || {
            starling_bench::gossip::simulate(n, starling_bench::gossip::Start::Join)
        })
        .await?;
        emit(figures.markdown());
        let window = std::time::Duration::from_secs(if args.quick { 1 } else { 5 });
        emit(starling_bench::gossip::dns_load(8, window).await?);
    }
    if wants(Measure::GossipScale) {
        let n = plan.gossip_scale_nodes;
        let figures = tokio::task::spawn_blocking(move || {
            starling_bench::gossip::simulate(n, starling_bench::gossip::Start::Formed)
        })
        .await?;
        emit(figures.markdown());
    }
    if wants(Measure::Detection) {
        // `STARLING_DETECT=n:victims:secs,…` measures other sizes.
        let custom: Option<Vec<(usize, usize, u64)>> =
            std::env::var("STARLING_DETECT").ok().map(|v| {
                v.split(',')
                    .filter_map(|t| {
                        let mut f = t.split(':').map(|x| x.parse::<u64>().ok());
                        Some((f.next()?? as usize, f.next()?? as usize, f.next()??))
                    })
                    .collect()
            });
        let sizes: Vec<(usize, usize, u64)> = if let Some(c) = custom {
            c
        } else if args.quick {
            vec![(6, 3, 30)]
        } else {
            vec![(6, 20, 600), (100, 20, 600), (1_000, 10, 60)]
        };
        let rows = tokio::task::spawn_blocking(move || {
            sizes
                .into_iter()
                .map(|(n, victims, secs)| {
                    starling_bench::gossip::detection(
                        n,
                        victims,
                        std::time::Duration::from_secs(secs),
                    )
                })
                .collect::<Vec<_>>()
        })
        .await?;
        emit(starling_bench::gossip::detection_markdown(&rows));
    }
    if wants(Measure::Tasks) {
        let (rounds, replicas) = if args.quick { (2, 12) } else { (10, 100) };
        let soak = std::time::Duration::from_secs(args.soak_secs.unwrap_or(if args.quick {
            10
        } else {
            600
        }));
        emit(
            starling_bench::tasks::run(
                &tmp.path().join("tasks"),
                rounds,
                replicas,
                soak,
                args.quick,
            )
            .await?,
        );
    }
    if wants(Measure::Certs) {
        let (workers, window) = if args.quick { (3, 5) } else { (100, 60) };
        let (rotation_nodes, rounds) = if args.quick {
            ((1, 2), 1)
        } else {
            ((3, 17), 5)
        };
        emit(
            starling_bench::certs::run(
                &tmp.path().join("certs"),
                workers,
                std::time::Duration::from_secs(window),
                rotation_nodes,
                rounds,
            )
            .await?,
        );
    }
    if wants(Measure::Scheduler) {
        let (nodes, tasks) = if args.quick {
            (50, 2_000)
        } else {
            (1_000, 100_000)
        };
        let section =
            tokio::task::spawn_blocking(move || starling_bench::scheduler::run(nodes, tasks))
                .await??;
        emit(section);
    }
    let out = args.out.clone().or_else(|| {
        // Only the full plan replaces RESULTS.md (not a run of a few client counts).
        (args.measure == Measure::All && !args.quick && args.clients.is_none())
            .then(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md"))
    });
    if let Some(path) = out {
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let text = report.replacen(
            "# Starling beside etcd\n\n",
            &format!("# Starling beside etcd\n\nRun of {date}. "),
            1,
        );
        std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if args.keep_data {
        eprintln!("data and logs kept in {}", tmp.keep().display());
    }
    Ok(())
}
