//! The measures: each runs the same workload against Starling and etcd, alternating which
//! goes first, and renders a markdown table with the ratio Starling/etcd.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cluster::{Etcd, Starling};
use crate::load::{Figures, key, run_measured, value};
use crate::machine::Machine;

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Unrecorded time before each measurement.
    pub warmup: Duration,
    /// Recorded time of each measurement.
    pub window: Duration,
    /// Concurrent clients for `writes`.
    pub write_clients: Vec<usize>,
    /// Concurrent clients for `reads`.
    pub read_clients: Vec<usize>,
    /// Keys written before `reads`.
    pub preload: u64,
    /// The key space.
    pub keys: u64,
    /// Leader kills in `failover`.
    pub failovers: usize,
    /// Worker joins in `join`.
    pub joins: usize,
    /// Nodes in the gossip simulation.
    pub gossip_nodes: usize,
    /// Nodes in the gossip simulation at scale (started formed).
    pub gossip_scale_nodes: usize,
    /// Rounds of the most clients' writes in `under-load`.
    pub load_rounds: usize,
}

impl Plan {
    /// The full run: 10 s windows, 1–256 clients, 10 failovers, 20 joins, 1 000 nodes.
    pub fn full() -> Plan {
        Plan {
            warmup: Duration::from_secs(2),
            window: Duration::from_secs(10),
            write_clients: vec![1, 16, 64, 256],
            read_clients: vec![1, 64],
            preload: 100_000,
            keys: 100_000,
            failovers: 10,
            joins: 20,
            gossip_nodes: 1000,
            gossip_scale_nodes: 10_000,
            load_rounds: 10,
        }
    }

    /// A run of seconds that exercises every path (for `cargo test`).
    pub fn quick() -> Plan {
        Plan {
            warmup: Duration::from_millis(100),
            window: Duration::from_millis(500),
            write_clients: vec![1, 4],
            read_clients: vec![1, 4],
            preload: 500,
            keys: 100_000,
            failovers: 1,
            joins: 2,
            gossip_nodes: 24,
            gossip_scale_nodes: 200,
            load_rounds: 2,
        }
    }
}

/// Which way a Starling client reaches its manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The remote API: HTTP/1.1 over QUIC (`starling/api/1`) with an admin client
    /// certificate — a network client API, as etcd's gRPC over TCP.
    Quic,
    /// The manager's control socket (HTTP/1.1 over a Unix socket): local callers only.
    Unix,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Quic => "remote API over QUIC",
            Api::Unix => "control socket (Unix)",
        }
    }
}

/// A Starling client: the typed API client of one manager (one keep-alive connection,
/// started afresh after an abandoned request).
pub struct StarlingClient {
    make: Box<dyn Fn() -> Result<starling_api::Client, String> + Send>,
    client: Option<starling_api::Client>,
}

impl StarlingClient {
    /// A client of the manager whose control socket is `socket`.
    pub fn new(socket: PathBuf) -> Self {
        StarlingClient {
            make: Box::new(move || Ok(starling_api::Client::unix(&socket))),
            client: None,
        }
    }

    /// A client of manager `i` through `api`; remote clients go through `endpoint` (one
    /// bound with the admin certificate, shared by the clients of a load).
    pub fn to(
        st: &Starling,
        i: usize,
        api: Api,
        endpoint: Option<&starling_transport::Endpoint>,
    ) -> Self {
        match (api, endpoint) {
            (Api::Quic, Some(endpoint)) => {
                let endpoint = endpoint.clone();
                let m = starling_api::ManagerAddr {
                    node_id: st.members[i].node_id.clone(),
                    addr: st.members[i].addr.to_string(),
                };
                StarlingClient {
                    make: Box::new(move || {
                        starling_api::Client::remote_on(
                            &endpoint,
                            vec![m.clone()],
                            Duration::from_secs(5),
                        )
                        .map_err(|e| e.to_string())
                    }),
                    client: None,
                }
            }
            (Api::Quic, None) => StarlingClient {
                make: Box::new(|| Err("no client endpoint".into())),
                client: None,
            },
            (Api::Unix, _) => StarlingClient::new(st.members[i].socket()),
        }
    }

    /// Drops the connection (after an abandoned request) and starts afresh.
    pub fn reset(&mut self) {
        self.client = None;
    }

    /// One request; `Ok` for a 2xx answer (or 404 on a read).
    pub async fn call(&mut self, method: &str, target: &str, body: &[u8]) -> Result<(), String> {
        let m =
            starling_api::http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        if self.client.is_none() {
            self.client = Some((self.make)()?);
        }
        let client = self.client.as_ref().ok_or("no client")?;
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.raw(m, target, bytes::Bytes::copy_from_slice(body)),
        )
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match answer {
            Ok(r) if (200..300).contains(&r.status) || (method == "GET" && r.status == 404) => {
                Ok(())
            }
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => {
                self.client = None;
                Err(e)
            }
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "—".into()
    }
}

/// A table row with both systems' figures.
fn row(label: &str, s: &Figures, e: Option<&Figures>) -> String {
    match e {
        Some(e) => format!(
            "| {label} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |\n",
            s.rate(),
            ms(s.p50_us),
            ms(s.p99_us),
            ms(s.p999_us),
            e.rate(),
            ms(e.p50_us),
            ms(e.p99_us),
            ms(e.p999_us),
            ratio(s.rate(), e.rate()),
            ratio(s.p50_us as f64, e.p50_us as f64),
        ),
        None => format!(
            "| {label} | {:.0} | {} | {} | {} | — | — | — | — | — | — |\n",
            s.rate(),
            ms(s.p50_us),
            ms(s.p99_us),
            ms(s.p999_us),
        ),
    }
}

/// A row of CPU time per operation: the members of each system together, and the client.
fn cpu_row(label: &str, s: &Figures, e: Option<&Figures>) -> String {
    let us = |f: Option<&Figures>| {
        f.and_then(Figures::cpu_per_op_us)
            .map(|(m, c)| (format!("{m:.0} µs"), format!("{c:.0} µs"), m))
            .unwrap_or_else(|| ("—".into(), "—".into(), f64::NAN))
    };
    let (sm, sc, sv) = us(Some(s));
    let (em, ec, ev) = us(e);
    let r = if sv.is_finite() && ev.is_finite() {
        ratio(sv, ev)
    } else {
        "—".into()
    };
    format!("| {label} | {sm} | {sc} | {em} | {ec} | {r} |\n")
}

const CPU_HEADER: &str = "CPU time per operation over the same windows (user + system, from \
    /proc): the three members together, and the client process.\n\n\
    | workload | Starling members | Starling client | etcd members | etcd client | members Starling/etcd |\n\
    |---|---|---|---|---|---|\n";

const HEADER: &str = "| workload | Starling ops/s | p50 | p99 | p99.9 | etcd ops/s | p50 | p99 | p99.9 | ops/s Starling/etcd | p50 Starling/etcd |\n|---|---|---|---|---|---|---|---|---|---|---|\n";

fn errors_note(s: &Figures, e: &Figures) -> String {
    if s.errors + e.errors > 0 {
        format!(" (errors: Starling {}, etcd {})", s.errors, e.errors)
    } else {
        String::new()
    }
}

/// What a client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A durable PUT.
    Put,
    /// A linearizable GET.
    Get,
    /// A GET from the member's local state (Starling `stale`, etcd `serializable`).
    LocalGet,
}

/// Where clients send their requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Client `i` to member `i mod 3`.
    Spread,
    /// Every client to the leader.
    Leader,
}

impl Placement {
    fn label(self) -> &'static str {
        match self {
            Placement::Spread => "spread over the members",
            Placement::Leader => "all to the leader",
        }
    }
}

/// `clients` Starling clients doing `work` for the plan's window.
pub async fn starling_load(
    st: &Starling,
    plan: &Plan,
    clients: usize,
    to: Option<usize>,
    work: Work,
    api: Api,
) -> Figures {
    let n = st.members.len();
    // The remote clients share one QUIC endpoint (one UDP socket), as the clients of one
    // process would; each still has its own connection, like each etcd client.
    let endpoint = match api {
        // Without one every call fails, and the figures count the errors.
        Api::Quic => st
            .client_endpoint()
            .map_err(|e| eprintln!("no client endpoint: {e:#}"))
            .ok(),
        Api::Unix => None,
    };
    let cs: Vec<StarlingClient> = (0..clients)
        .map(|i| StarlingClient::to(st, to.unwrap_or(i % n), api, endpoint.as_ref()))
        .collect();
    let space = plan.keys;
    let v = std::sync::Arc::new(value());
    run_measured(
        st.pids(),
        cs,
        plan.warmup,
        plan.window,
        move |mut c: StarlingClient, i, n| {
            let v = v.clone();
            async move {
                let k = key(i, n, space);
                let r = match work {
                    Work::Put => c.call("PUT", &format!("/v1/kv/{k}"), &v).await,
                    Work::Get => {
                        c.call("GET", &format!("/v1/kv/{k}?consistency=linearizable"), b"")
                            .await
                    }
                    Work::LocalGet => {
                        c.call("GET", &format!("/v1/kv/{k}?consistency=stale"), b"")
                            .await
                    }
                };
                (c, r)
            }
        },
    )
    .await
}

/// `clients` etcd clients (each its own connection) doing `work` for the plan's window.
pub async fn etcd_load(
    e: &Etcd,
    plan: &Plan,
    clients: usize,
    to: Option<usize>,
    work: Work,
) -> anyhow::Result<Figures> {
    let n = e.members.len();
    let mut cs = Vec::with_capacity(clients);
    for i in 0..clients {
        cs.push(e.client(to.unwrap_or(i % n)).await?.kv_client());
    }
    let space = plan.keys;
    let v = std::sync::Arc::new(value());
    Ok(run_measured(
        e.pids(),
        cs,
        plan.warmup,
        plan.window,
        move |mut kv: etcd_client::KvClient, i, n| {
            let v = v.clone();
            async move {
                let k = key(i, n, space);
                let r = match work {
                    Work::Put => kv.put(k, v.to_vec(), None).await.map(|_| ()),
                    Work::Get => kv.get(k, None).await.map(|_| ()),
                    Work::LocalGet => kv
                        .get(k, Some(etcd_client::GetOptions::new().with_serializable()))
                        .await
                        .map(|_| ()),
                };
                (kv, r.map_err(|e| e.to_string()))
            }
        },
    )
    .await)
}

/// One cell measured on both systems; which goes first alternates with `turn`.
async fn both(
    st: &Starling,
    e: &Etcd,
    plan: &Plan,
    clients: usize,
    placement: Placement,
    work: Work,
    turn: usize,
) -> anyhow::Result<(Figures, Figures)> {
    let (to_s, to_e) = match placement {
        Placement::Spread => (None, None),
        Placement::Leader => (
            Some(st.wait_healthy().await?),
            Some(e.wait_healthy().await?),
        ),
    };
    Ok(if turn.is_multiple_of(2) {
        let s = starling_load(st, plan, clients, to_s, work, Api::Quic).await;
        (s, etcd_load(e, plan, clients, to_e, work).await?)
    } else {
        let f = etcd_load(e, plan, clients, to_e, work).await?;
        (
            starling_load(st, plan, clients, to_s, work, Api::Quic).await,
            f,
        )
    })
}

/// `writes`: durable PUTs with each client count, spread and all to the leader, then the
/// floor under them on this machine ([`floor`]).
pub async fn writes(
    st: &Starling,
    e: &Etcd,
    plan: &Plan,
    machine: &Machine,
) -> anyhow::Result<String> {
    let mut out = format!(
        "### Durable writes\n\nPUT of a 256-byte value under an 8-byte key drawn from {} keys; \
         closed loop, one connection per client; {:?} per cell after {:?} of warm-up.\n\n{HEADER}",
        plan.keys, plan.window, plan.warmup
    );
    let mut turn = 0;
    let mut notes = String::new();
    let mut cpu = String::from(CPU_HEADER);
    // The cells to the leader (the one-client and the busiest), for the floor.
    let mut to_leader: Vec<(usize, Figures, Figures)> = Vec::new();
    for &clients in &plan.write_clients {
        for placement in [Placement::Spread, Placement::Leader] {
            let (s, f) = both(st, e, plan, clients, placement, Work::Put, turn).await?;
            turn += 1;
            let label = format!("{clients} clients, {}", placement.label());
            out.push_str(&row(&label, &s, Some(&f)));
            cpu.push_str(&cpu_row(&label, &s, Some(&f)));
            let n = errors_note(&s, &f);
            if !n.is_empty() {
                notes.push_str(&format!("- {label}{n}\n"));
            }
            if placement == Placement::Leader {
                to_leader.push((clients, s, f));
            }
        }
    }
    // The same single client through the control socket, the path the figures before the
    // remote API used.
    let leader = st.wait_healthy().await?;
    let s = starling_load(st, plan, 1, Some(leader), Work::Put, Api::Unix).await;
    let label = format!("1 client, all to the leader, {}", Api::Unix.label());
    out.push_str(&row(&label, &s, None));
    cpu.push_str(&cpu_row(&label, &s, None));
    out.push('\n');
    out.push_str(&cpu);
    out.push('\n');
    out.push_str(&format!(
        "Starling's clients use the {} (etcd's, gRPC over TCP) except in the last row.\n",
        Api::Quic.label()
    ));
    out.push_str(&notes);
    let one = to_leader.iter().find(|(c, ..)| *c == 1);
    let most = to_leader.iter().max_by_key(|(c, ..)| *c);
    if let (Some((_, s_one, e_one)), Some((clients, s_most, e_most))) = (one, most) {
        let (s_rtt, e_rtt) = both(st, e, plan, 1, Placement::Leader, Work::LocalGet, turn).await?;
        out.push_str(&floor(
            machine,
            (&s_rtt, &e_rtt),
            (s_one, e_one),
            (*clients, s_most, e_most),
        ));
    }
    Ok(out)
}

/// What bounds a durable write on this machine, from the run's own figures.
///
/// Latency (`one` client writing to the leader): a write is answered once the leader has it
/// and a majority has it on disk; with the leader's sync beside the follower's, that is at
/// least one fdatasync and two round trips (client → leader → client, leader → follower →
/// leader), each at least a request on a connection that touches no disk (`round_trip`: one
/// client's local GETs to the leader). Throughput (the `most` clients' cell): when the cores
/// are the limit, `cores` seconds of CPU per second over the CPU every process spends per
/// write (members and client alike: they share the cores).
fn floor(
    machine: &Machine,
    round_trip: (&Figures, &Figures),
    one: (&Figures, &Figures),
    most: (usize, &Figures, &Figures),
) -> String {
    let fsync = machine.fdatasync_floor_us();
    let three = machine.fdatasync_three_us.0;
    let us = |v: f64| format!("{v:.0} µs");
    let floor_with = |sync: u64, rtt: &Figures| sync as f64 + 2.0 * rtt.p50_us as f64;
    let (s_floor, s_p50) = (floor_with(fsync, round_trip.0), one.0.p50_us as f64);
    let (e_floor, e_p50) = (floor_with(fsync, round_trip.1), one.1.p50_us as f64);
    let (s_floor3, e_floor3) = (
        floor_with(three, round_trip.0),
        floor_with(three, round_trip.1),
    );
    let target = 0.5 * e_p50;
    let against = |floor: f64| {
        if floor <= target {
            format!("{} below it", us(target - floor))
        } else {
            format!("out of reach: {} above it", us(floor - target))
        }
    };
    let mut out = format!(
        "\n### The floor under a durable write\n\n\
         A write is answered once the leader has it and a majority of members has it on disk: \
         at least one fdatasync (the leader's beside a follower's) and two round trips \
         (client → leader → client, leader → follower → leader). A round trip is taken as \
         the p50 of one client's local reads from the leader over its API (Starling \
         `consistency=stale` over QUIC, etcd `serializable` over gRPC: the same connection \
         and request path, no disk), measured after the writes. On this one machine the three \
         members sync on the same disk at about the same time, so the sync a write waits for \
         is also taken as it is then: three at once.\n\n\
         | | Starling | etcd |\n|---|---|---|\n\
         | fdatasync p50 (this disk, the faster of in place and append) | {fsync} µs | {fsync} µs |\n\
         | fdatasync p50, three at once (the members' syncs of one write, one disk) | {three} µs | {three} µs |\n\
         | round trip p50 (1 client, to the leader) | {} | {} |\n\
         | floor: fdatasync + 2 round trips | {} | {} |\n\
         | floor with the three syncs at once | {} | {} |\n\
         | 1 client writing to the leader, p50 | {} | {} |\n\
         | above the floor | {} ({:.1}× the floor) | {} ({:.1}× the floor) |\n\
         | above the floor with the syncs at once | {} ({:.1}×) | {} ({:.1}×) |\n\
         | target: ≤ 0.5 × etcd's p50 | {} (the floor is {}; with the syncs at once, {}) | |\n",
        us(round_trip.0.p50_us as f64),
        us(round_trip.1.p50_us as f64),
        us(s_floor),
        us(e_floor),
        us(s_floor3),
        us(e_floor3),
        us(s_p50),
        us(e_p50),
        us(s_p50 - s_floor),
        s_p50 / s_floor.max(1.0),
        us(e_p50 - e_floor),
        e_p50 / e_floor.max(1.0),
        us(s_p50 - s_floor3),
        s_p50 / s_floor3.max(1.0),
        us(e_p50 - e_floor3),
        e_p50 / e_floor3.max(1.0),
        us(target),
        against(s_floor),
        against(s_floor3),
    );
    let (clients, s, e) = most;
    let total = |f: &Figures| f.cpu_per_op_us().map(|(m, c)| m + c);
    if let (Some(s_cpu), Some(e_cpu)) = (total(s), total(e)) {
        let budget = machine.cores as f64 * 1e6;
        let needed = budget / (3.0 * e.rate()).max(1.0);
        out.push_str(&format!(
            "\nThroughput, {clients} clients writing to the leader: every process of a system \
             (members and client) shares the {cores} cores, so when they are the limit a \
             system writes at most {cores} s of CPU per second over the CPU it spends per \
             write.\n\n\
             | | Starling | etcd |\n|---|---|---|\n\
             | CPU per write, members + client | {} | {} |\n\
             | ceiling: {cores} cores / CPU per write | {:.0}/s | {:.0}/s |\n\
             | measured | {:.0}/s ({:.0} % of the ceiling) | {:.0}/s ({:.0} % of the ceiling) |\n\
             | 3 × etcd's measured rate needs | ≤ {} of CPU per write ({:.2}× what Starling spends) | |\n",
            us(s_cpu),
            us(e_cpu),
            budget / s_cpu,
            budget / e_cpu,
            s.rate(),
            100.0 * s.rate() * s_cpu / budget,
            e.rate(),
            100.0 * e.rate() * e_cpu / budget,
            us(needed),
            needed / s_cpu,
            cores = machine.cores,
        ));
    }
    out
}

/// Writes `plan.preload` keys to both systems (so reads find values).
async fn preload(st: &Starling, e: &Etcd, plan: &Plan) -> anyhow::Result<()> {
    let writers = 32u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut sc = StarlingClient::new(st.members[w as usize % st.members.len()].socket());
        let mut kv = e.client(w as usize % e.members.len()).await?.kv_client();
        let (total, v) = (plan.preload, value());
        tasks.push(tokio::spawn(async move {
            let mut k = w;
            while k < total {
                let key = format!("{k:08}");
                sc.call("PUT", &format!("/v1/kv/{key}"), &v).await?;
                kv.put(key, v.clone(), None)
                    .await
                    .map_err(|e| e.to_string())?;
                k += writers;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await?.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// `reads`: linearizable GETs with each client count, and member-local reads.
pub async fn reads(st: &Starling, e: &Etcd, plan: &Plan) -> anyhow::Result<String> {
    preload(st, e, plan).await?;
    let mut out = format!(
        "### Reads\n\nGET of keys drawn from {} keys, {} of them written first; clients spread \
         over the members; {:?} per cell after {:?} of warm-up. Linearizable: Starling's \
         read index through the leader, etcd's default (quorum) read. Local: Starling \
         `consistency=stale`, etcd `serializable`.\n\n{HEADER}",
        plan.keys, plan.preload, plan.window, plan.warmup
    );
    let mut turn = 0;
    let mut cpu = String::from(CPU_HEADER);
    for &clients in &plan.read_clients {
        let (s, f) = both(st, e, plan, clients, Placement::Spread, Work::Get, turn).await?;
        turn += 1;
        let label = format!("linearizable, {clients} clients");
        out.push_str(&row(&label, &s, Some(&f)));
        cpu.push_str(&cpu_row(&label, &s, Some(&f)));
    }
    let clients = plan.read_clients.iter().copied().max().unwrap_or(1);
    let (s, f) = both(
        st,
        e,
        plan,
        clients,
        Placement::Spread,
        Work::LocalGet,
        turn,
    )
    .await?;
    let label = format!("local (stale / serializable), {clients} clients");
    out.push_str(&row(&label, &s, Some(&f)));
    cpu.push_str(&cpu_row(&label, &s, Some(&f)));
    let s = starling_load(st, plan, 1, None, Work::Get, Api::Unix).await;
    let label = format!("linearizable, 1 client, {}", Api::Unix.label());
    out.push_str(&row(&label, &s, None));
    cpu.push_str(&cpu_row(&label, &s, None));
    out.push('\n');
    out.push_str(&cpu);
    out.push('\n');
    out.push_str(&format!(
        "Starling's clients use the {} except in the last row.\n",
        Api::Quic.label()
    ));
    Ok(out)
}

/// A write attempt during a failover is abandoned after this long and a new one sent, for
/// both systems alike (a request to a member that lost its leader may otherwise wait for its
/// server-side timeout).
const ATTEMPT: Duration = Duration::from_millis(250);

async fn starling_failover(st: &mut Starling) -> anyhow::Result<Duration> {
    let l = st.wait_healthy().await?;
    let f = (l + 1) % st.members.len();
    let mut c = StarlingClient::new(st.members[f].socket());
    let v = value();
    for n in 0..20 {
        c.call("PUT", &format!("/v1/kv/{}", key(0, n, 100_000)), &v)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    st.kill(l);
    let killed = Instant::now();
    let mut n = 1000;
    let took = loop {
        n += 1;
        let target = format!("/v1/kv/{}", key(0, n, 100_000));
        let attempt = c.call("PUT", &target, &v);
        if let Ok(Ok(())) = tokio::time::timeout(ATTEMPT, attempt).await {
            break killed.elapsed();
        }
        // An abandoned attempt leaves its connection mid-answer: start a new one.
        c.reset();
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "no write acknowledged within 60 s of the kill"
        );
    };
    st.restart(l).await?;
    st.wait_healthy().await?;
    Ok(took)
}

async fn etcd_failover(e: &mut Etcd) -> anyhow::Result<Duration> {
    let l = e.wait_healthy().await?;
    let f = (l + 1) % e.members.len();
    let mut kv = e.client(f).await?.kv_client();
    let v = value();
    for n in 0..20 {
        kv.put(key(0, n, 100_000), v.clone(), None).await?;
    }
    e.kill(l);
    let killed = Instant::now();
    let mut n = 1000;
    let took = loop {
        n += 1;
        let attempt = kv.put(key(0, n, 100_000), v.clone(), None);
        if let Ok(Ok(_)) = tokio::time::timeout(ATTEMPT, attempt).await {
            break killed.elapsed();
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "no write acknowledged within 60 s of the kill"
        );
    };
    e.restart(l)?;
    e.wait_healthy().await?;
    Ok(took)
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// `failover`: one client writes in a loop through a follower; the leader is killed -9;
/// the time from the kill to the first acknowledged write. The killed member is restarted
/// and the cluster healthy again before the next round.
pub async fn failover(st: &mut Starling, e: &mut Etcd, plan: &Plan) -> anyhow::Result<String> {
    let (mut s, mut f) = (Vec::new(), Vec::new());
    for round in 0..plan.failovers {
        if round.is_multiple_of(2) {
            s.push(starling_failover(st).await?);
            f.push(etcd_failover(e).await?);
        } else {
            f.push(etcd_failover(e).await?);
            s.push(starling_failover(st).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let list = |v: &[Duration]| v.iter().map(|d| fmt_ms(*d)).collect::<Vec<_>>().join(", ");
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    Ok(format!(
        "### Leader failover\n\nOne client writes in a loop through a follower; the leader is \
         killed with SIGKILL; the time from the kill to the first write acknowledged after it \
         (an attempt unanswered after {:?} is abandoned and another sent, for both systems). \
         {} rounds; the killed member is restarted and the cluster healthy before the next. \
         etcd runs with its defaults (100 ms heartbeat, 1 s election timeout).\n\n\
         | system | median | max | rounds |\n|---|---|---|---|\n\
         | Starling | {} | {} | {} |\n| etcd | {} | {} | {} |\n| Starling/etcd | {} | {} | |\n\n",
        ATTEMPT,
        plan.failovers,
        fmt_ms(median(&s)),
        fmt_ms(max(&s)),
        list(&s),
        fmt_ms(median(&f)),
        fmt_ms(max(&f)),
        list(&f),
        ratio(median(&s).as_secs_f64(), median(&f).as_secs_f64()),
        ratio(max(&s).as_secs_f64(), max(&f).as_secs_f64()),
    ))
}

/// `under-load`: rounds of writes by the most clients of the plan, spread over the members,
/// on each system in turn; the elections during each round (the highest term of the members
/// after it minus before it) and the requests that failed.
pub async fn under_load(st: &Starling, e: &Etcd, plan: &Plan) -> anyhow::Result<String> {
    let clients = plan.write_clients.iter().copied().max().unwrap_or(1);
    let mut rows = String::new();
    let mut totals = [0u64; 4];
    for round in 0..plan.load_rounds {
        st.wait_healthy().await?;
        e.wait_healthy().await?;
        let before = st.term().await?;
        let s = starling_load(st, plan, clients, None, Work::Put, Api::Quic).await;
        let s_elections = st.term().await?.saturating_sub(before);
        let before = e.term().await?;
        let f = etcd_load(e, plan, clients, None, Work::Put).await?;
        let e_elections = e.term().await?.saturating_sub(before);
        for (t, v) in totals
            .iter_mut()
            .zip([s_elections, s.errors, e_elections, f.errors])
        {
            *t += v;
        }
        rows.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.0} | {} | {} |\n",
            round + 1,
            s.rate(),
            s_elections,
            s.errors,
            f.rate(),
            e_elections,
            f.errors
        ));
    }
    Ok(format!(
        "### Under load\n\n{} rounds of {} clients writing (as in Durable writes, spread over \
         the members, {:?} after {:?} of warm-up), Starling then etcd; elections are the rise of \
         the highest term of the members over the round, errors the requests that failed (a \
         Starling client over the remote API; etcd's over gRPC).\n\n\
         | round | Starling ops/s | elections | errors | etcd ops/s | elections | errors |\n\
         |---|---|---|---|---|---|---|\n{rows}| total | | {} | {} | | {} | {} |\n\n",
        plan.load_rounds,
        clients,
        plan.window,
        plan.warmup,
        totals[0],
        totals[1],
        totals[2],
        totals[3],
    ))
}

/// `join`: `starling join` of a worker → `ready` in `node ls` (polled every 2 ms).
pub async fn join(st: &mut Starling, plan: &Plan) -> anyhow::Result<String> {
    let mut times = Vec::new();
    for n in 0..plan.joins {
        times.push(st.join_worker(n).await?);
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok(format!(
        "### Worker join\n\nFrom starting `starling join --token …` (a new process, fresh data \
         directory) to the worker listed `ready` by `node ls` on the leader; {} joins one \
         after another. etcd has no counterpart (target: ≤ 150 ms).\n\n\
         | system | median | p90 | max |\n|---|---|---|---|\n| Starling | {:.1} ms | {:.1} ms | {:.1} ms |\n\n",
        plan.joins,
        at(0.5).as_secs_f64() * 1000.0,
        at(0.9).as_secs_f64() * 1000.0,
        at(1.0).as_secs_f64() * 1000.0,
    ))
}
