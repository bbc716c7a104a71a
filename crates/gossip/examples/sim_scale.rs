//! Times the simulator at scale: join N nodes, converge, 10 s more (`sim_scale N`); or
//! start N nodes as a formed cluster and run 10 s (`sim_scale N formed`), then 10 s at 10 %
//! datagram loss (`sim_scale N formed loss`).
use starling_gossip::sim::{SimConfig, Simulator};
use std::time::{Duration, Instant};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let formed = std::env::args().nth(2).is_some_and(|a| a == "formed");
    let t = Instant::now();
    let mut sim = if formed {
        Simulator::formed(SimConfig::default(), n)
    } else {
        Simulator::cluster(SimConfig::default(), n)
    };
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
    if std::env::args().nth(3).is_some_and(|a| a == "loss") {
        let before = sim.detector_stats();
        let sent: u64 = (0..n).map(|i| sim.sent_bytes(i)).sum();
        sim.set_loss(0.10);
        let t3 = Instant::now();
        sim.run_for(Duration::from_secs(10));
        let after = sim.detector_stats();
        let sent2: u64 = (0..n).map(|i| sim.sent_bytes(i)).sum();
        eprintln!(
            "10 virtual s at 10 % loss: wall {:?}, suspected {}, declared Down {}, false Downs {}, {} B per node per s",
            t3.elapsed(),
            after.suspected - before.suspected,
            after.declared_down - before.declared_down,
            sim.false_downs(),
            (sent2 - sent) / n as u64 / 10
        );
        report(&sim);
    }
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
