//! The gossip simulator at scale: dissemination of a record change to 99 % / 99.9 % of
//! nodes, time until a killed node is Down everywhere, false Downs under 10 % packet loss,
//! and bytes per node per second, beside the Serf model (99.9 % of 1 000 nodes in 1.84 s at
//! 200 ms gossip intervals and fanout 3).
//!
//! ```text
//! cargo run --release -p starling-gossip --example gossip_bench [-- --nodes 1000]
//! ```
//!
//! A benchmark, not a test: virtual time, seeded, deterministic.

use std::time::{Duration, Instant};

use starling_gossip::sim::{SimConfig, Simulator};
use starling_gossip::{Health, ServiceEndpoint};

const STEP: Duration = Duration::from_millis(10);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--nodes")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let wall = Instant::now();
    let mut sim = Simulator::cluster(SimConfig::default(), n);
    let converge = sim.run_until(Duration::from_millis(100), Duration::from_secs(600), |s| {
        s.live().all(|i| s.members_seen(i) == n - 1) && s.live().all(|i| s.catalog(i).len() == n)
    });
    println!("starling-gossip simulator, {n} nodes, 0.5–1 ms one-way latency, seed 1");
    println!(
        "membership and catalogs converged after {:?} of virtual time ({:?} wall)",
        converge,
        wall.elapsed()
    );
    sim.run_for(Duration::from_secs(10));

    // Steady-state traffic.
    let before: u64 = (0..n).map(|i| sim.sent_bytes(i)).sum();
    sim.run_for(Duration::from_secs(20));
    let after: u64 = (0..n).map(|i| sim.sent_bytes(i)).sum();
    let idle_bps = (after - before) as f64 / n as f64 / 20.0;

    // Dissemination of one change, 10 repetitions from different nodes.
    let mut p99 = Vec::new();
    let mut p999 = Vec::new();
    for k in 0..10 {
        let origin = (k * 97 + 13) % n;
        let stamp = sim.publish(
            origin,
            vec![ServiceEndpoint {
                service: format!("svc{k}"),
                task: "t".into(),
                addr: "10.9.0.1".into(),
                port: 80,
                health: Health::Healthy,
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
    p99.sort();
    p999.sort();

    // Failure detection.
    let victim = n / 2;
    sim.kill(victim);
    let detect = sim.run_until(Duration::from_millis(50), Duration::from_secs(120), |s| {
        s.live().all(|i| s.sees_down(i, victim))
    });

    // False Downs under 10 % loss, on a fresh cluster.
    let mut lossy = Simulator::cluster(
        SimConfig {
            seed: 2,
            ..SimConfig::default()
        },
        n,
    );
    lossy.run_until(Duration::from_millis(100), Duration::from_secs(600), |s| {
        s.live().all(|i| s.members_seen(i) == n - 1)
    });
    let base = lossy.false_downs();
    let mut lossy_cfg_note = String::new();
    {
        // Loss applies from now on.
        lossy_cfg_note.push_str("10 % of gossip datagrams dropped for 60 s");
    }
    lossy.set_loss(0.10);
    lossy.run_for(Duration::from_secs(60));
    let false_downs = lossy.false_downs() - base;

    let median = |v: &Vec<Duration>| v.get(v.len() / 2).copied().unwrap_or_default();
    println!();
    println!("| measure | Starling (simulated) | Serf model |");
    println!("|---|---|---|");
    println!(
        "| record change → 99 % of nodes (median of {}) | {:?} | |",
        p99.len(),
        median(&p99)
    );
    println!(
        "| record change → 99.9 % of nodes (median, max) | {:?}, {:?} | 1.84 s |",
        median(&p999),
        p999.last().copied().unwrap_or_default()
    );
    println!("| killed node Down on every live node | {:?} | |", detect);
    println!("| false Down declarations, {lossy_cfg_note} | {false_downs} | |");
    println!("| bytes sent per node per second, steady state | {idle_bps:.0} | |");
    println!();
    println!("wall time {:?}", wall.elapsed());
}
