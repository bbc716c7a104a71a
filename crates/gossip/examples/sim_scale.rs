//! Times the simulator at scale: join N nodes, converge, disseminate one change.
use starling_gossip::sim::{SimConfig, Simulator};
use std::time::{Duration, Instant};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let t = Instant::now();
    let mut sim = Simulator::cluster(SimConfig::default(), n);
    eprintln!("added {n} in {:?}", t.elapsed());
    let mut last = Instant::now();
    let conv = sim.run_until(Duration::from_millis(500), Duration::from_secs(600), |s| {
        let m = s.live().filter(|i| s.members_seen(*i) == n - 1).count();
        if last.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  v={:?} full members at {m}/{n}, wall {:?}",
                s.now(),
                t.elapsed()
            );
            last = Instant::now();
        }
        m == n
    });
    report(&sim);
    eprintln!("converged members {conv:?} wall {:?}", t.elapsed());
    let t2 = Instant::now();
    sim.run_for(Duration::from_secs(10));
    eprintln!("10 virtual s steady: wall {:?}", t2.elapsed());
    report(&sim);
}

fn report(sim: &Simulator) {
    let n = sim.len();
    let (mut live, mut queued, mut max) = (0, 0, 0);
    for i in 0..n {
        let (l, q) = sim.core(i).backlog();
        live += l;
        queued += q;
        max = max.max(q);
    }
    eprintln!(
        "  backlog: live {live}, queued {queued} (max {max} per node); network events {}",
        sim.queued_events()
    );
}
