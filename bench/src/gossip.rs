//! The gossip simulator at scale (virtual time, seeded, deterministic): dissemination of a
//! record change to 99 % / 99.9 % of nodes, the time until a killed node is Down on every
//! live node, false Downs under 10 % datagram loss, and steady-state bytes per node, beside
//! the Serf model (99.9 % of 1 000 nodes in 1.84 s with 200 ms gossip intervals, fanout 3).

use std::time::{Duration, Instant};

use starling_gossip::sim::{SimConfig, Simulator};
use starling_gossip::{Health, ServiceEndpoint};

const STEP: Duration = Duration::from_millis(10);

/// The Serf model's time to reach 99.9 % of 1 000 nodes.
pub const SERF_999: Duration = Duration::from_millis(1840);

/// How the simulated cluster comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Every node joins through node 0 at once; measures start when every node knows every
    /// member and record.
    Join,
    /// Every node starts knowing every member and record ([`Simulator::formed`]): the state
    /// a join converges to, without the join storm (n²·log n piggybacked updates).
    Formed,
}

/// What the simulation measured.
#[derive(Debug, Clone)]
pub struct GossipFigures {
    /// Nodes.
    pub nodes: usize,
    /// How the cluster started.
    pub start: Start,
    /// Time to build the cluster (the formed state, or the join until converged).
    pub start_wall: Duration,
    /// Resident memory the first cluster added to the process (bytes).
    pub memory: u64,
    /// Change → 99 % of nodes, median over the repetitions.
    pub p99: Duration,
    /// Change → 99.9 % of nodes, median and max.
    pub p999: (Duration, Duration),
    /// Killed node Down on every live node.
    pub detect: Option<Duration>,
    /// False Down declarations with 10 % loss for 60 s.
    pub false_downs: u64,
    /// Steady-state bytes sent per node per second.
    pub idle_bytes_per_node_s: f64,
    /// Wall time of the simulation.
    pub wall: Duration,
}

/// `n` nodes started as `start` says (seed `seed`), once every node knows every member
/// (and, when `catalogs`, every record).
fn started(n: usize, seed: u64, start: Start, catalogs: bool) -> Simulator {
    let cfg = SimConfig {
        seed,
        ..SimConfig::default()
    };
    match start {
        Start::Formed => Simulator::formed(cfg, n),
        Start::Join => {
            let mut sim = Simulator::cluster(cfg, n);
            sim.run_until(Duration::from_millis(100), Duration::from_secs(600), |s| {
                s.live().all(|i| s.members_seen(i) == n - 1)
                    && (!catalogs || s.live().all(|i| s.catalog(i).len() == n))
            });
            sim
        }
    }
}

/// Runs the simulation with `n` nodes.
pub fn simulate(n: usize, start: Start) -> GossipFigures {
    let wall = Instant::now();
    let rss_before = crate::machine::rss_kib() * 1024;
    let mut sim = started(n, 1, start, true);
    let start_wall = wall.elapsed();
    let memory = (crate::machine::rss_kib() * 1024).saturating_sub(rss_before);
    let phase = |what: &str| eprintln!("gossip {n}: {what} at {:.0?}", wall.elapsed());
    phase("started");
    sim.run_for(Duration::from_secs(10));
    let before: u64 = (0..n).map(|i| sim.sent_bytes(i)).sum();
    sim.run_for(Duration::from_secs(20));
    let after: u64 = (0..n).map(|i| sim.sent_bytes(i)).sum();
    let idle = (after - before) as f64 / n as f64 / 20.0;

    let (mut p99, mut p999) = (Vec::new(), Vec::new());
    for k in 0..10 {
        let origin = (k * 97 + 13) % n;
        let stamp = sim.publish(
            origin,
            vec![ServiceEndpoint {
                service: format!("svc{k}"),
                task: "t".into(),
                slot: "1".into(),
                addr: "10.9.0.1".into(),
                port: 80,
                ports: std::collections::BTreeMap::from([("http".into(), 80)]),
                health: Health::Healthy,
                ttl: None,
            }],
        );
        let a = sim.run_until(STEP, Duration::from_secs(60), |s| {
            s.fraction_with(origin, stamp) >= 0.99
        });
        let b = sim.run_until(STEP, Duration::from_secs(60), |s| {
            s.fraction_with(origin, stamp) >= 0.999
        });
        if let (Some(a), Some(b)) = (a, b) {
            p99.push(a);
            p999.push(a + b);
        }
        sim.run_for(Duration::from_secs(5));
    }
    phase("record changes measured");
    p99.sort();
    p999.sort();
    let victim = n / 2;
    sim.kill(victim);
    let detect = sim.run_until(Duration::from_millis(50), Duration::from_secs(120), |s| {
        s.live().all(|i| s.sees_down(i, victim))
    });

    phase("kill measured");
    // One cluster at a time (10 000 nodes take ~9 GB).
    drop(sim);
    let mut lossy = started(n, 2, start, false);
    phase("second cluster started");
    let base = lossy.false_downs();
    lossy.set_loss(0.10);
    lossy.run_for(Duration::from_secs(60));
    let false_downs = lossy.false_downs() - base;
    let median = |v: &[Duration]| v.get(v.len() / 2).copied().unwrap_or_default();
    GossipFigures {
        nodes: n,
        start,
        start_wall,
        memory,
        p99: median(&p99),
        p999: (median(&p999), p999.last().copied().unwrap_or_default()),
        detect,
        false_downs: false_downs as u64,
        idle_bytes_per_node_s: idle,
        wall: wall.elapsed(),
    }
}

impl GossipFigures {
    /// The markdown table.
    pub fn markdown(&self) -> String {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        let start = match self.start {
            Start::Join => format!(
                "every node joined through one at once, converged in {:.0} s of wall time",
                self.start_wall.as_secs_f64()
            ),
            Start::Formed => format!(
                "started as a formed cluster — every node knowing every member and record, the \
                 state a join converges to, without the join storm — in {:.0} s of wall time",
                self.start_wall.as_secs_f64()
            ),
        };
        format!(
            "### Gossip ({} nodes, simulated)\n\nThe shipped protocol (`GossipCore`, the code the QUIC driver runs) in the \
             deterministic simulator (virtual time, 0.5–1 ms one-way latency, seed 1; {}; \
             {:.1} GB of memory for the cluster; {:.0} s of wall time in all, the 10 % loss run \
             on a second cluster included). The Serf model is HashiCorp's convergence simulator \
             at the same interval (200 ms) and fanout (3).\n\n| measure | Starling | Serf model | Starling/Serf |\n|---|---|---|---|\n\
             | record change → 99 % of nodes (median of 10) | {} | | |\n\
             | record change → 99.9 % of nodes (median, max) | {}, {} | {} | {:.2}× |\n\
             | killed node Down on every live node | {} | | |\n\
             | false Downs, 10 % datagram loss for 60 s | {} | | |\n\
             | bytes sent per node per second, steady state | {:.0} | | |\n\n",
            self.nodes,
            start,
            self.memory as f64 / 1e9,
            self.wall.as_secs_f64(),
            ms(self.p99),
            ms(self.p999.0),
            ms(self.p999.1),
            ms(SERF_999),
            self.p999.0.as_secs_f64() / SERF_999.as_secs_f64(),
            self.detect
                .map_or_else(|| "not within 120 s".to_owned(), ms),
            self.false_downs,
            self.idle_bytes_per_node_s,
        )
    }
}

/// DNS queries per second one node's server answers (the real server: UDP on loopback, the
/// answer built from a view of 100 services × 3 endpoints), from `clients` Rust clients each
/// keeping one query in flight, for `window`.
pub async fn dns_load(clients: usize, window: Duration) -> anyhow::Result<String> {
    use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, TYPE};
    use starling_gossip::dns::{DEFAULT_TTL, DnsView};
    let mut view = DnsView {
        ttl: DEFAULT_TTL,
        ..DnsView::default()
    };
    for s in 0..100u16 {
        let eps = (0..3u16)
            .map(|t| {
                (
                    format!("n{t}"),
                    ServiceEndpoint {
                        service: format!("svc{s}"),
                        task: format!("t{s}-{t}"),
                        slot: t.to_string(),
                        addr: format!("10.0.{s}.{}", t + 1),
                        port: 30000 + t,
                        ports: std::collections::BTreeMap::from([("http".into(), 30000 + t)]),
                        health: Health::Healthy,
                        ttl: None,
                    },
                )
            })
            .collect();
        view.services.insert(format!("svc{s}"), eps);
    }
    let (udp, tcp) = starling_gossip::dns::bind("127.0.0.1:0".parse()?).await?;
    let addr = udp.local_addr()?;
    let counters = std::sync::Arc::new(starling_gossip::dns::DnsCounters::default());
    let view = std::sync::Arc::new(view);
    let server = tokio::spawn(starling_gossip::dns::serve(
        udp,
        tcp,
        std::sync::Arc::new(move || (*view).clone()),
        counters.clone(),
    ));
    let deadline = Instant::now() + window;
    let mut tasks = Vec::new();
    for c in 0..clients {
        tasks.push(tokio::spawn(async move {
            let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            sock.connect(addr).await?;
            let mut buf = [0u8; 1500];
            let mut n = 0u64;
            let mut i = 0usize;
            while Instant::now() < deadline {
                let name = format!("svc{}.svc.starling", (c * 7 + i) % 100);
                i += 1;
                let mut q = Packet::new_query((i % 65_536) as u16);
                q.questions.push(Question::new(
                    Name::new_unchecked(&name),
                    QTYPE::TYPE(TYPE::A),
                    QCLASS::CLASS(CLASS::IN),
                    false,
                ));
                sock.send(&q.build_bytes_vec()?).await?;
                if tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf))
                    .await
                    .is_ok()
                {
                    n += 1;
                }
            }
            anyhow::Ok(n)
        }));
    }
    let mut answered = 0u64;
    for t in tasks {
        answered += t.await??;
    }
    server.abort();
    let qps = answered as f64 / window.as_secs_f64();
    Ok(format!(
        "### DNS (one node's server, in process)\n\n{clients} Rust clients on loopback, each with \
         one UDP query in flight, for {} s; A queries of 100 services × 3 endpoints.\n\n\
         | measure | Starling | target |\n|---|---|---|\n\
         | DNS queries answered per second | **{qps:.0}** | ≥ 50 000 |\n\n",
        window.as_secs()
    ))
}

/// `n` simulated nodes (seed `seed`) once every node sees every other as a member.
fn settled_cluster(n: usize, seed: u64) -> Simulator {
    started(n, seed, Start::Join, false)
}

/// Failure detection at one cluster size, in the simulator.
#[derive(Debug, Clone)]
pub struct Detection {
    /// Nodes.
    pub nodes: usize,
    /// Kill → suspected or Down (hidden from DNS) on every live node, sorted.
    pub hidden: Vec<Duration>,
    /// Kill → Down on every live node, sorted.
    pub down: Vec<Duration>,
    /// Seconds of 10 % datagram loss the false-Down counts cover.
    pub lossy_secs: u64,
    /// False Downs in that time.
    pub false_downs: usize,
    /// The same without the reliable requests (the probe asked again, and the suspect's
    /// answer, dropped): SWIM alone.
    pub false_downs_without_answer: usize,
    /// Wall time.
    pub wall: Duration,
}

/// Kills `victims` nodes one at a time (each restarted, and the cluster settled, before the
/// next) and times hiding and Down everywhere; then counts false Downs under 10 % loss for
/// `lossy` of virtual time, with and without the reliable requests.
pub fn detection(n: usize, victims: usize, lossy: Duration) -> Detection {
    let wall = Instant::now();
    let settled = |s: &Simulator| s.live().all(|i| s.members_seen(i) == n - 1);
    let mut sim = settled_cluster(n, 5);
    let (mut hidden, mut down) = (Vec::new(), Vec::new());
    for k in 0..victims {
        let v = (k * 7919 + 3) % n;
        // Killed, `v` is no longer among the live nodes the predicates read.
        sim.kill(v);
        let h = sim.run_until(STEP, Duration::from_secs(60), |s| {
            s.live()
                .all(|i| s.sees_suspected(i, v) || s.sees_down(i, v))
        });
        let d = sim.run_until(STEP, Duration::from_secs(60), |s| {
            s.live().all(|i| s.sees_down(i, v))
        });
        if let (Some(h), Some(d)) = (h, d) {
            hidden.push(h);
            down.push(h + d);
        }
        sim.restart(v);
        sim.run_until(
            Duration::from_millis(100),
            Duration::from_secs(120),
            settled,
        );
        sim.run_for(Duration::from_secs(2));
    }
    hidden.sort();
    down.sort();
    let lossy_run = |answer: bool| {
        let mut s = settled_cluster(n, 6);
        if !answer {
            s.drop_requests(starling_gossip::RpcKind::Suspected, 1.0);
            s.drop_requests(starling_gossip::RpcKind::Probe, 1.0);
        }
        let base = s.false_downs();
        let before = s.detector_stats();
        s.set_loss(0.10);
        s.run_for(lossy);
        let after = s.detector_stats();
        eprintln!(
            "{n} nodes, reliable requests {answer}: probes rescued {}, suspected {}, answered {}, stale {}, declared Down {}, false Downs {}",
            after.rescued - before.rescued,
            after.suspected - before.suspected,
            after.answered - before.answered,
            after.gone - before.gone,
            after.declared_down - before.declared_down,
            s.false_downs() - base
        );
        s.false_downs() - base
    };
    Detection {
        nodes: n,
        hidden,
        down,
        lossy_secs: lossy.as_secs(),
        false_downs: lossy_run(true),
        false_downs_without_answer: lossy_run(false),
        wall: wall.elapsed(),
    }
}

/// The markdown table of detection figures.
pub fn detection_markdown(rows: &[Detection]) -> String {
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let stat = |v: &[Duration]| match (v.get(v.len() / 2), v.last()) {
        (Some(m), Some(x)) => format!("{}, {}", ms(*m), ms(*x)),
        _ => "not measured".to_owned(),
    };
    let mut out = String::from(
        "### Failure detection (simulated, the shipped core)\n\n\
         A node killed (each victim restarted and the cluster settled before the next): the time \
         until every live node hides it from DNS (suspected or Down) and until every live node \
         has it Down; then false Downs under 10 % datagram loss, with the reliable requests (a \
         probe unanswered by datagram asked again over QUIC, and a suspicion put to the \
         suspect) and without them (SWIM alone).\n\n\
         | nodes | kill → hidden everywhere (median, max) | kill → Down everywhere (median, max) | false Downs, 10 % loss | without the reliable requests | wall |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} in {} s | {} in {} s | {:.0} s |\n",
            r.nodes,
            stat(&r.hidden),
            stat(&r.down),
            r.false_downs,
            r.lossy_secs,
            r.false_downs_without_answer,
            r.lossy_secs,
            r.wall.as_secs_f64(),
        ));
    }
    out.push('\n');
    out
}
