//! Measures the transport on loopback: full mTLS handshake, request/response round trips
//! with 1 and with 64 requests in flight, and datagram round trips.
//!
//! ```text
//! cargo run --release -p starling-transport --example transport_bench [-- --quick]
//! ```
//!
//! A benchmark, not a test: it prints figures and asserts nothing about them.

use std::time::{Duration, Instant};

use starling_transport::{
    CertOptions, ClusterCa, ClusterId, Connection, Endpoint, EndpointConfig, Inbound, NodeId,
    PeerPolicy, Protocol, Role, ring_provider,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>, wall: Option<Duration>) {
    samples.sort();
    let rate = wall
        .map(|w| format!(" | {:>9.0}/s", samples.len() as f64 / w.as_secs_f64()))
        .unwrap_or_default();
    println!(
        "| {name:<34} | {:>7} | {:>9.1?} | {:>9.1?} | {:>9.1?}{rate}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        percentile(&samples, 0.999),
    );
}

async fn round_trips(
    conn: &Connection,
    in_flight: usize,
    total: usize,
    body: &[u8],
) -> (Vec<Duration>, Duration) {
    let per_task = total / in_flight;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let conn = conn.clone();
        let body = body.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                if conn.request(&body).await.is_ok() {
                    out.push(t.elapsed());
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (all, start.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let ca = ClusterCa::create(ClusterId::new("bench")?)?;
    let opts = CertOptions::default();
    let server_id = NodeId::new("server")?;
    let server = Endpoint::bind(
        EndpointConfig::default(),
        ring_provider(),
        Some(ca.issue(&server_id, &Role::MANAGER, &opts)?),
    )?;
    let client = Endpoint::bind(
        EndpointConfig::default(),
        ring_provider(),
        Some(ca.issue(&NodeId::new("client")?, &Role::WORKER, &opts)?),
    )?;
    let proto = Protocol::new("bench/echo/1", PeerPolicy::any_member())?;
    let mut listener = server.listen(&proto)?;
    tokio::spawn(async move {
        while let Some(conn) = listener.accept().await {
            let dg = conn.clone();
            tokio::spawn(async move {
                while let Ok(f) = dg.read_datagram().await {
                    let _ = dg.send_datagram(f.as_bytes());
                }
            });
            tokio::spawn(async move {
                while let Ok(Inbound::Request(req)) = conn.accept().await {
                    tokio::spawn(async move {
                        let body = req.body().clone();
                        let _ = req.respond(body.as_bytes()).await;
                    });
                }
            });
        }
    });
    let addr = server.local_addr();
    let (rcv, snd) = server.socket_buffers();
    println!(
        "starling-transport loopback benchmark — {} cores, socket buffers granted rcv={rcv} snd={snd}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!(
        "| measure                            |       n |       p50 |       p99 |     p99.9 | throughput"
    );
    println!("|---|---|---|---|---|---|");

    // Handshake: a fresh connection each time (dial + TLS 1.3 mTLS + admission).
    let mut hs = Vec::new();
    for _ in 0..(500 / scale) {
        let t = Instant::now();
        let c = client.connect(&proto, &server_id, addr).await?;
        hs.push(t.elapsed());
        c.close(starling_transport::CloseCode::SHUTDOWN, "bench");
    }
    report("mTLS handshake + admission", hs, None);

    let conn = client.connect(&proto, &server_id, addr).await?;
    let body = vec![0x5a; 64];
    // Warm-up.
    let _ = round_trips(&conn, 8, 2000 / scale, &body).await;
    let (s, w) = round_trips(&conn, 1, 20_000 / scale, &body).await;
    report("request/response 64 B, 1 in flight", s, Some(w));
    let (s, w) = round_trips(&conn, 64, 64_000 / scale, &body).await;
    report("request/response 64 B, 64 in flight", s, Some(w));
    let big = vec![0x5a; 4096];
    let (s, w) = round_trips(&conn, 1, 10_000 / scale, &big).await;
    report("request/response 4 KiB, 1 in flight", s, Some(w));

    // Datagrams: one at a time, 1 s deadline each; losses are counted, not timed.
    let dg_body = vec![0xa5; 512];
    let mut dg = Vec::new();
    let mut lost = 0;
    for _ in 0..(20_000 / scale) {
        let t = Instant::now();
        conn.send_datagram(&dg_body)?;
        match tokio::time::timeout(Duration::from_secs(1), conn.read_datagram()).await {
            Ok(Ok(_)) => dg.push(t.elapsed()),
            _ => lost += 1,
        }
    }
    report("datagram echo 512 B", dg, None);
    println!();
    println!("datagrams lost: {lost}");
    client.close().await;
    server.close().await;
    Ok(())
}
