//! DNS on every node, answered from the node's own gossip state only (so it answers without
//! a Raft leader or quorum): the pure [`answer`] for one query packet, and UDP and TCP
//! servers around it. Packets are parsed and built by `simple-dns`; nothing here reads the
//! wire by hand.
//!
//! | name | answer |
//! |---|---|
//! | `<svc>.svc.starling`, `tasks.<svc>.svc.starling` | A / AAAA of the service's healthy endpoints |
//! | `_<port>._tcp.<svc>.svc.starling` | SRV: each endpoint's port of that name, target `<node>.node.starling`, its A in ADDITIONAL |
//! | `<node>.node.starling` (id or host name) | A / AAAA of the node |
//! | any other name under `starling` | NXDOMAIN with the zone's SOA |
//! | names outside `starling` | REFUSED |
//!
//! Names are case-insensitive; a UDP answer larger than the client's buffer (512 bytes, or
//! its EDNS size) goes out empty with the TC bit so the client retries over TCP; a packet
//! that is not a DNS query is dropped and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use simple_dns::rdata::{A, AAAA, RData, SOA, SRV};
use simple_dns::{CLASS, Name, OPCODE, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::catalog::ServiceEndpoint;

/// The zone every name is under.
pub const ZONE: &str = "starling";

/// The TTL of answers unless configured otherwise.
pub const DEFAULT_TTL: u32 = 5;

/// Where a node's DNS server listens unless configured otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8600";

/// What DNS answers from: the node's gossip view at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsView {
    /// Service name (lower case) → its healthy endpoints on live, unsuspected nodes, each
    /// with its node's id.
    pub services: BTreeMap<String, Vec<(String, ServiceEndpoint)>>,
    /// Node id and host name (lower case) → address.
    pub nodes: BTreeMap<String, IpAddr>,
    /// TTL of the answers.
    pub ttl: u32,
    /// The node has not synced its catalog with a peer yet (it just started or joined):
    /// names under the zone get SERVFAIL — "ask again or elsewhere" — rather than an
    /// NXDOMAIN a resolver would cache for a name that exists.
    pub syncing: bool,
}

/// Counters of a DNS server.
#[derive(Debug, Default)]
pub struct DnsCounters {
    /// Queries answered.
    pub answered: AtomicU64,
    /// Packets dropped: not a DNS query.
    pub malformed: AtomicU64,
    /// UDP answers cut to the TC bit.
    pub truncated: AtomicU64,
}

/// What one query name is, within the zone.
enum Target<'a> {
    Apex,
    Service(&'a str),
    Srv { port: &'a str, service: &'a str },
    Node(&'a str),
    Unknown,
}

fn classify<'a>(labels: &[&'a str]) -> Option<Target<'a>> {
    let (&last, rest) = labels.split_last()?;
    if last != ZONE {
        return None;
    }
    Some(match rest {
        [] => Target::Apex,
        [svc, "svc"] | ["tasks", svc, "svc"] => Target::Service(svc),
        [port, "_tcp", svc, "svc"] if port.len() > 1 && port.starts_with('_') => Target::Srv {
            port: &port[1..],
            service: svc,
        },
        [node, "node"] => Target::Node(node),
        _ => Target::Unknown,
    })
}

fn ip_record<'a>(name: Name<'a>, ip: IpAddr, ttl: u32) -> ResourceRecord<'a> {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A {
            address: u32::from(v4),
        }),
        IpAddr::V6(v6) => RData::AAAA(AAAA {
            address: u128::from(v6),
        }),
    };
    ResourceRecord::new(name, CLASS::IN, ttl, data)
}

fn wants(qtype: QTYPE, ip: IpAddr) -> bool {
    match qtype {
        QTYPE::ANY => true,
        QTYPE::TYPE(TYPE::A) => ip.is_ipv4(),
        QTYPE::TYPE(TYPE::AAAA) => ip.is_ipv6(),
        _ => false,
    }
}

/// The answer to one query packet (`udp`: the answer must fit the client's UDP buffer), or
/// `None` when the packet is not a DNS query (it is dropped).
pub fn answer(view: &DnsView, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let packet = Packet::parse(query).ok()?;
    if packet.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    let limit = if udp {
        packet
            .opt()
            .map_or(512, |o| usize::from(o.udp_packet_size).clamp(512, 4096))
    } else {
        65_535
    };
    let mut reply = Packet::new_reply(packet.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    if packet.opcode() != OPCODE::StandardQuery {
        *reply.rcode_mut() = RCODE::NotImplemented;
        return reply.build_bytes_vec().ok();
    }
    let [question] = packet.questions.as_slice() else {
        *reply.rcode_mut() = RCODE::FormatError;
        return reply.build_bytes_vec().ok();
    };
    reply.questions.push(question.clone());
    let name = question.qname.to_string().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let labels: Vec<&str> = name.split('.').collect();
    let Some(target) = classify(&labels) else {
        *reply.rcode_mut() = RCODE::Refused;
        return reply.build_bytes_vec().ok();
    };
    if view.syncing && !matches!(target, Target::Apex) {
        *reply.rcode_mut() = RCODE::ServerFailure;
        return reply.build_bytes_vec().ok();
    }
    let ttl = view.ttl;
    let qname = Name::new_unchecked(name).into_owned();
    let qtype = question.qtype;
    // Names of SRV targets, owned while the packet borrows them.
    let mut targets: BTreeMap<String, IpAddr> = BTreeMap::new();
    let mut found = true;
    match target {
        Target::Apex => {
            if matches!(qtype, QTYPE::TYPE(TYPE::SOA) | QTYPE::ANY) {
                reply.answers.push(soa(ttl));
            }
        }
        Target::Service(svc) => match view.services.get(svc) {
            Some(list) => {
                let ttl = service_ttl(list, ttl);
                let ips: BTreeSet<IpAddr> = list
                    .iter()
                    .filter_map(|(_, e)| e.addr.parse().ok())
                    .collect();
                for ip in ips.into_iter().filter(|ip| wants(qtype, *ip)) {
                    reply.answers.push(ip_record(qname.clone(), ip, ttl));
                }
            }
            None => found = false,
        },
        Target::Srv { port, service } => {
            let list: Vec<&(String, ServiceEndpoint)> = view
                .services
                .get(service)
                .map(|l| {
                    l.iter()
                        .filter(|(_, e)| e.ports.contains_key(port))
                        .collect()
                })
                .unwrap_or_default();
            if list.is_empty() {
                found = false;
            } else if matches!(qtype, QTYPE::TYPE(TYPE::SRV) | QTYPE::ANY) {
                let ttl = service_ttl(list.iter().copied(), ttl);
                for (node, e) in list {
                    let (Ok(ip), Some(p)) = (e.addr.parse::<IpAddr>(), e.ports.get(port)) else {
                        continue;
                    };
                    let target = format!("{node}.node.{ZONE}");
                    reply.answers.push(ResourceRecord::new(
                        qname.clone(),
                        CLASS::IN,
                        ttl,
                        RData::SRV(SRV {
                            priority: 1,
                            weight: 1,
                            port: *p,
                            target: Name::new_unchecked(&target).into_owned(),
                        }),
                    ));
                    targets.insert(target, ip);
                }
            }
        }
        Target::Node(node) => match view.nodes.get(node) {
            Some(ip) if wants(qtype, *ip) => reply.answers.push(ip_record(qname.clone(), *ip, ttl)),
            Some(_) => {}
            None => found = false,
        },
        Target::Unknown => found = false,
    }
    // Each SRV target's address in ADDITIONAL (RFC 2782; swarm never filled these).
    let ttl = reply.answers.iter().map(|r| r.ttl).min().unwrap_or(ttl);
    for (t, ip) in &targets {
        reply
            .additional_records
            .push(ip_record(Name::new_unchecked(t).into_owned(), *ip, ttl));
    }
    if !found {
        *reply.rcode_mut() = RCODE::NameError;
    }
    if reply.answers.is_empty() {
        // NXDOMAIN or no data of that type: the SOA says for how long to remember it.
        reply.name_servers.push(soa(ttl));
    }
    let bytes = reply.build_bytes_vec_compressed().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut cut = Packet::new_reply(packet.id());
    cut.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::TRUNCATION);
    cut.questions.push(question.clone());
    cut.build_bytes_vec().ok()
}

/// The TTL of an answer naming these endpoints: the smallest any of them asks for.
fn service_ttl<'a>(list: impl IntoIterator<Item = &'a (String, ServiceEndpoint)>, ttl: u32) -> u32 {
    list.into_iter()
        .map(|(_, e)| e.ttl.unwrap_or(ttl))
        .min()
        .unwrap_or(ttl)
}

fn soa(ttl: u32) -> ResourceRecord<'static> {
    ResourceRecord::new(
        Name::new_unchecked(ZONE),
        CLASS::IN,
        ttl,
        RData::SOA(SOA {
            mname: Name::new_unchecked("ns.starling"),
            rname: Name::new_unchecked("hostmaster.starling"),
            serial: 1,
            refresh: 3600,
            retry: 600,
            expire: 86_400,
            minimum: ttl,
        }),
    )
}

/// A view that is rebuilt at most every `FRESH` (a query storm does not rebuild it per
/// packet; a change shows within that).
struct Cached {
    build: Arc<dyn Fn() -> DnsView + Send + Sync>,
    at: std::sync::Mutex<Option<(Instant, Arc<DnsView>)>>,
}

const FRESH: Duration = Duration::from_millis(100);

impl Cached {
    fn get(&self) -> Arc<DnsView> {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, v)) = at.as_ref()
            && t.elapsed() < FRESH
        {
            return v.clone();
        }
        let v = Arc::new((self.build)());
        *at = Some((Instant::now(), v.clone()));
        v
    }
}

/// Binds the DNS server's UDP and TCP sockets on `addr`.
pub async fn bind(
    addr: SocketAddr,
) -> std::io::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    let tcp = tokio::net::TcpListener::bind(udp.local_addr()?).await?;
    Ok((udp, tcp))
}

/// Serves DNS on `udp` and `tcp` from the views `view` builds, until the task is dropped.
pub async fn serve(
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    view: Arc<dyn Fn() -> DnsView + Send + Sync>,
    counters: Arc<DnsCounters>,
) {
    let cached = Arc::new(Cached {
        build: view,
        at: std::sync::Mutex::new(None),
    });
    let tcp_cached = cached.clone();
    let tcp_counters = counters.clone();
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let cached = tcp_cached.clone();
            let counters = tcp_counters.clone();
            tokio::spawn(async move {
                let _ = serve_tcp(stream, &cached, &counters).await;
            });
        }
    });
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _tcp = Abort(tcp_task);
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = udp.recv_from(&mut buf).await else {
            continue;
        };
        let view = cached.get();
        match answer(&view, &buf[..n], true) {
            Some(bytes) => {
                count(&counters, &bytes);
                let _ = udp.send_to(&bytes, from).await;
            }
            None => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn count(counters: &DnsCounters, bytes: &[u8]) {
    counters.answered.fetch_add(1, Ordering::Relaxed);
    // The TC bit: byte 2, bit 1.
    if bytes.get(2).is_some_and(|b| b & 0x02 != 0) {
        counters.truncated.fetch_add(1, Ordering::Relaxed);
    }
}

/// One TCP connection: length-prefixed queries until the client closes or idles 10 s.
async fn serve_tcp(
    mut stream: tokio::net::TcpStream,
    cached: &Cached,
    counters: &DnsCounters,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut msg))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let view = cached.get();
        let Some(bytes) = answer(&view, &msg, false) else {
            counters.malformed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        count(counters, &bytes);
        let n = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        stream.write_all(&n.to_be_bytes()).await?;
        stream.write_all(&bytes[..usize::from(n)]).await?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::catalog::Health;

    fn ep(service: &str, task: &str, addr: &str, http: u16) -> ServiceEndpoint {
        ServiceEndpoint {
            service: service.into(),
            task: task.into(),
            slot: "1".into(),
            addr: addr.into(),
            port: http,
            ports: BTreeMap::from([("http".into(), http)]),
            health: Health::Healthy,
            ttl: None,
        }
    }

    fn view() -> DnsView {
        DnsView {
            services: BTreeMap::from([(
                "web".into(),
                vec![
                    ("n1".into(), ep("web", "t1", "10.0.0.1", 30001)),
                    ("n2".into(), ep("web", "t2", "10.0.0.2", 30002)),
                    ("n2".into(), ep("web", "t3", "10.0.0.2", 30003)),
                ],
            )]),
            nodes: BTreeMap::from([
                ("n1".into(), "10.0.0.1".parse().unwrap()),
                ("w1".into(), "10.0.0.1".parse().unwrap()),
            ]),
            ttl: DEFAULT_TTL,
            syncing: false,
        }
    }

    fn ask(name: &str, qtype: TYPE, udp: bool) -> Vec<u8> {
        ask_view(&view(), name, qtype, udp)
    }

    fn ask_view(v: &DnsView, name: &str, qtype: TYPE, udp: bool) -> Vec<u8> {
        let mut q = Packet::new_query(7);
        q.questions.push(simple_dns::Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        answer(v, &q.build_bytes_vec().unwrap(), udp).unwrap()
    }

    fn parse(bytes: &[u8]) -> Packet<'_> {
        Packet::parse(bytes).unwrap()
    }

    fn ips(p: &Packet<'_>) -> Vec<String> {
        p.answers
            .iter()
            .filter_map(|r| match &r.rdata {
                RData::A(a) => Some(std::net::Ipv4Addr::from(a.address).to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn services_nodes_and_srv_answer_case_insensitively() {
        let p_bytes = ask("WEB.svc.Starling", TYPE::A, true);
        let p = parse(&p_bytes);
        assert_eq!(p.rcode(), RCODE::NoError);
        assert_eq!(ips(&p), ["10.0.0.1", "10.0.0.2"]);
        assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
        assert_eq!(
            ips(&parse(&ask("tasks.web.svc.starling", TYPE::A, true))).len(),
            2
        );
        assert_eq!(
            ips(&parse(&ask("w1.node.starling", TYPE::A, true))),
            ["10.0.0.1"]
        );
        let srv_bytes = ask("_http._tcp.web.svc.starling", TYPE::SRV, true);
        let srv = parse(&srv_bytes);
        let ports: BTreeSet<u16> = srv
            .answers
            .iter()
            .filter_map(|r| match &r.rdata {
                RData::SRV(s) => Some(s.port),
                _ => None,
            })
            .collect();
        assert_eq!(ports, BTreeSet::from([30001, 30002, 30003]));
        let extra: BTreeSet<String> = srv
            .additional_records
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(
            extra,
            BTreeSet::from(["n1.node.starling".to_owned(), "n2.node.starling".to_owned()])
        );
        // No data of that type: NOERROR, empty, with the SOA.
        let p_bytes = ask("web.svc.starling", TYPE::AAAA, true);
        let p = parse(&p_bytes);
        assert_eq!(
            (p.rcode(), p.answers.len(), p.name_servers.len()),
            (RCODE::NoError, 0, 1)
        );
    }

    #[test]
    fn a_node_still_syncing_says_servfail_not_nxdomain() {
        let v = DnsView {
            syncing: true,
            ..view()
        };
        let bytes = ask_view(&v, "web.svc.starling", TYPE::A, true);
        let p = parse(&bytes);
        assert_eq!((p.rcode(), p.answers.len()), (RCODE::ServerFailure, 0));
    }

    #[test]
    fn a_service_ttl_is_the_smallest_its_endpoints_ask_for() {
        let mut v = view();
        if let Some(list) = v.services.get_mut("web") {
            list[1].1.ttl = Some(30);
            list[2].1.ttl = Some(2);
        }
        let ask = |name: &str, qtype: TYPE| ask_view(&v, name, qtype, true);
        for (name, qtype) in [
            ("web.svc.starling", TYPE::A),
            ("_http._tcp.web.svc.starling", TYPE::SRV),
        ] {
            let bytes = ask(name, qtype);
            let p = parse(&bytes);
            assert!(!p.answers.is_empty());
            assert!(p.answers.iter().all(|r| r.ttl == 2), "{name}");
            assert!(p.additional_records.iter().all(|r| r.ttl == 2), "{name}");
        }
        // Names not of a service keep the node's TTL.
        let bytes = ask("w1.node.starling", TYPE::A);
        assert_eq!(parse(&bytes).answers[0].ttl, DEFAULT_TTL);
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_zones_refused() {
        for name in [
            "db.svc.starling",
            "nosuch.node.starling",
            "_grpc._tcp.web.svc.starling",
            "a.b.c.starling",
        ] {
            let p_bytes = ask(name, TYPE::A, true);
            let p = parse(&p_bytes);
            assert_eq!(p.rcode(), RCODE::NameError, "{name}");
            assert_eq!(p.name_servers.len(), 1, "{name}: the SOA");
        }
        assert_eq!(
            parse(&ask("example.com", TYPE::A, true)).rcode(),
            RCODE::Refused
        );
        assert_eq!(parse(&ask("starling", TYPE::SOA, true)).answers.len(), 1);
    }

    #[test]
    fn a_large_udp_answer_is_truncated_and_whole_over_tcp() {
        let mut v = view();
        let many: Vec<(String, ServiceEndpoint)> = (0..200u16)
            .map(|i| {
                (
                    format!("n{i}"),
                    ep(
                        "big",
                        &format!("t{i}"),
                        &format!("10.1.{}.{}", i / 250, i % 250 + 1),
                        8000 + i,
                    ),
                )
            })
            .collect();
        v.services.insert("big".into(), many);
        let mut q = Packet::new_query(9);
        q.questions.push(simple_dns::Question::new(
            Name::new_unchecked("big.svc.starling"),
            QTYPE::TYPE(TYPE::A),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let query = q.build_bytes_vec().unwrap();
        let udp = answer(&v, &query, true).unwrap();
        let p = Packet::parse(&udp).unwrap();
        assert!(p.has_flags(PacketFlag::TRUNCATION));
        assert!(p.answers.is_empty() && udp.len() <= 512);
        let tcp = answer(&v, &query, false).unwrap();
        assert_eq!(Packet::parse(&tcp).unwrap().answers.len(), 200);
    }

    #[test]
    fn garbage_and_answers_are_dropped_never_a_panic() {
        assert!(answer(&view(), b"", true).is_none());
        assert!(answer(&view(), b"\x00\x01\x02", true).is_none());
        let mut reply = Packet::new_reply(1);
        reply.questions.push(simple_dns::Question::new(
            Name::new_unchecked("web.svc.starling"),
            QTYPE::TYPE(TYPE::A),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        assert!(answer(&view(), &reply.build_bytes_vec().unwrap(), true).is_none());
        // Random bytes: whatever they are, no panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = answer(&view(), &bytes, len % 2 == 0);
        }
    }
}
