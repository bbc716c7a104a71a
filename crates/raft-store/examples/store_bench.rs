//! Measures a 3-manager store over mTLS QUIC on loopback, data on disk: durable writes with
//! 1, 16, 64 and 256 concurrent writers (256-byte values), linearizable and stale reads with
//! 64 readers, and the time from stopping the leader to the first acknowledged write.
//!
//! ```text
//! cargo run --release -p starling-raft-store --example store_bench [-- --quick]
//! ```
//!
//! A benchmark, not a test: it prints figures and asserts nothing about them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use starling_raft_store::{Command, Consistency, ManagerNode, Store, StoreConfig};
use starling_transport::{
    CertOptions, ClusterCa, ClusterId, Endpoint, EndpointConfig, NodeCredentials, NodeId, Role,
    ring_provider,
};

struct Manager {
    store: Arc<Store>,
    endpoint: Endpoint,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn row(name: &str, mut lat: Vec<Duration>, wall: Duration, errors: u64) {
    lat.sort();
    println!(
        "| {name:<36} | {:>9.0} | {:>9.2?} | {:>9.2?} | {:>9.2?} | {errors} |",
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
    );
}

async fn start(
    id: u64,
    dir: &std::path::Path,
    creds: &NodeCredentials,
    addr: Option<SocketAddr>,
) -> Result<Manager, Box<dyn std::error::Error>> {
    let cfg = EndpointConfig {
        listen: addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        ..EndpointConfig::default()
    };
    let endpoint = loop {
        match Endpoint::bind(cfg.clone(), ring_provider(), Some(creds.clone())) {
            Ok(e) => break e,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let node = ManagerNode {
        name: format!("m{id}"),
        addr: endpoint.local_addr().to_string(),
    };
    let store = Store::open(
        StoreConfig::new(dir.join(format!("m{id}")), id, node),
        endpoint.clone(),
    )
    .await?;
    Ok(Manager {
        store: Arc::new(store),
        endpoint,
    })
}

async fn leader(managers: &[Option<Manager>]) -> usize {
    loop {
        for (i, m) in managers.iter().enumerate() {
            if let Some(m) = m
                && m.store.status().is_leader
            {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn writes(
    store: &Arc<Store>,
    clients: usize,
    duration: Duration,
) -> (Vec<Duration>, Duration, u64) {
    let stop = Instant::now() + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let store = store.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < stop {
                let key = format!("{:08x}", (c as u64 * 7919 + i * 104_729) % 100_000);
                i += 1;
                let t = Instant::now();
                match store
                    .write(Command::Put {
                        key,
                        value: vec![0x61; 256],
                    })
                    .await
                {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (all, started.elapsed(), errors.load(Ordering::Relaxed))
}

async fn reads(
    store: &Arc<Store>,
    clients: usize,
    duration: Duration,
    c: Consistency,
) -> (Vec<Duration>, Duration, u64) {
    let stop = Instant::now() + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..clients {
        let store = store.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < stop {
                let key = format!("{:08x}", (n as u64 * 31 + i * 7) % 100_000);
                i += 1;
                let t = Instant::now();
                match store.read(c, |s| s.get(&key).map(|e| e.value.len())).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (all, started.elapsed(), errors.load(Ordering::Relaxed))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let only_failover = std::env::args().any(|a| a == "--failover");
    let secs = Duration::from_secs(if quick { 1 } else { 10 });
    let dir = tempfile::tempdir()?;
    let ca = ClusterCa::create(ClusterId::new("bench")?)?;
    let creds: Vec<NodeCredentials> = (1..=3)
        .map(|i| {
            ca.issue(
                &NodeId::new(format!("m{i}")).expect("valid id"),
                &Role::MANAGER,
                &CertOptions::default(),
            )
        })
        .collect::<Result<_, _>>()?;
    let mut managers: Vec<Option<Manager>> = Vec::new();
    for (i, c) in creds.iter().enumerate() {
        managers.push(Some(start(i as u64 + 1, dir.path(), c, None).await?));
    }
    let m = |v: &Vec<Option<Manager>>, i: usize| v[i].as_ref().map(|m| m.store.clone());
    let first = m(&managers, 0).ok_or("m1")?;
    first.initialize().await?;
    while !first.status().is_leader {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for id in 2..=3u64 {
        let node = ManagerNode {
            name: format!("m{id}"),
            addr: managers[(id - 1) as usize]
                .as_ref()
                .ok_or("m")?
                .endpoint
                .local_addr()
                .to_string(),
        };
        first.add_learner(id, node).await?;
        first.promote(id).await?;
    }
    println!(
        "starling-raft-store: 3 managers, mTLS QUIC on loopback, WAL on {}",
        dir.path().display()
    );
    println!(
        "{} cores; each measure runs {secs:?} after a 1 s warm-up",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!(
        "| measure                              |     ops/s |       p50 |       p99 |     p99.9 | errors |"
    );
    println!("|---|---|---|---|---|---|");
    let li = leader(&managers).await;
    let leader_store = m(&managers, li).ok_or("leader")?;
    let follower_store = m(&managers, (li + 1) % 3).ok_or("follower")?;
    let _ = writes(&leader_store, 16, Duration::from_secs(1)).await;
    let term_before = leader_store.status().term;
    for clients in [1, 16, 64, 256].into_iter().filter(|_| !only_failover) {
        let (lat, wall, err) = writes(&leader_store, clients, secs).await;
        row(
            &format!("durable writes, {clients} clients (leader)"),
            lat,
            wall,
            err,
        );
    }
    if !only_failover {
        let (lat, wall, err) = writes(&follower_store, 64, secs).await;
        row("durable writes, 64 clients (follower)", lat, wall, err);
        for (name, store) in [("leader", &leader_store), ("follower", &follower_store)] {
            let (lat, wall, err) = reads(store, 64, secs, Consistency::Linearizable).await;
            row(
                &format!("linearizable reads, 64 clients ({name})"),
                lat,
                wall,
                err,
            );
        }
        let (lat, wall, err) = reads(&follower_store, 64, secs, Consistency::Stale).await;
        row("stale reads, 64 clients (follower)", lat, wall, err);
        let (lat, wall, err) = reads(&leader_store, 1, secs, Consistency::Linearizable).await;
        row("linearizable reads, 1 client (leader)", lat, wall, err);
    }

    let term_after = m(&managers, 0).ok_or("m1")?.status().term;
    println!();
    println!(
        "term before the load: {term_before}, after: {term_after} ({} elections under load)",
        term_after - term_before
    );

    // Failover: a client writes in a loop through a follower; the leader is stopped.
    // (Handles to a stopped manager's store would keep its socket bound.)
    drop((leader_store, follower_store, first));
    println!();
    let mut failovers = Vec::new();
    for round in 0..(if quick { 2 } else { 5 }) {
        let li = leader(&managers).await;
        let writer = m(&managers, (li + 1) % 3).ok_or("writer")?;
        writer.write(Command::Noop).await?;
        let old = managers[li].take().ok_or("leader")?;
        let old_addr = old.endpoint.local_addr();
        let stopped = Instant::now();
        old.store.shutdown().await?;
        // Closing the endpoint waits for peers to acknowledge (up to a few PTOs): do that
        // in the background, as a crashed process would not wait either.
        let closing = tokio::spawn(async move {
            old.endpoint.close().await;
            drop(old);
        });
        loop {
            if writer
                .write(Command::Put {
                    key: "failover".into(),
                    value: vec![round],
                })
                .await
                .is_ok()
            {
                break;
            }
        }
        let took = stopped.elapsed();
        failovers.push(took);
        println!(
            "failover round {round}: leader m{} stopped -> first acknowledged write {took:?}",
            li + 1
        );
        let _ = closing.await;
        managers[li] = Some(start(li as u64 + 1, dir.path(), &creds[li], Some(old_addr)).await?);
        // Let the restarted manager catch up before the next round.
        let target = writer.status().applied;
        let deadline = Instant::now() + Duration::from_secs(30);
        while m(&managers, li).ok_or("restarted")?.status().applied < target {
            if Instant::now() > deadline {
                return Err(format!(
                    "restarted m{} did not catch up to {target}: {:?}",
                    li + 1,
                    m(&managers, li).ok_or("m")?.status()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    failovers.sort();
    println!(
        "failover: median {:?}, max {:?}",
        percentile(&failovers, 0.5),
        failovers.last().copied().unwrap_or_default()
    );
    for m in managers.into_iter().flatten() {
        let _ = m.store.shutdown().await;
        m.endpoint.close().await;
    }
    Ok(())
}
