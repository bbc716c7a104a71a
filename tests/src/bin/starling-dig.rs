//! Asks a DNS server questions over UDP, one packet each, and prints each answer as one line
//! of JSON: `starling-dig <server> <name> <type> [<name> <type> …]` (type `A`, `AAAA`,
//! `SRV`, `SOA` or `ANY`). An answer is `{"rcode", "answers", "authority", "additional"}`,
//! each record `{"name", "type"}` with `ip` (A, AAAA) or `port` and `target` (SRV); a
//! question without an answer within 500 ms is `{"error"}`. Exit 2 for bad arguments.
//! The multi-host tests run it inside a host's network namespace, whose loopback is the
//! host's own.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use serde_json::{Value, json};
use simple_dns::rdata::RData;
use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, ResourceRecord, TYPE};

fn qtype(text: &str) -> Option<QTYPE> {
    Some(match text.to_ascii_uppercase().as_str() {
        "A" => QTYPE::TYPE(TYPE::A),
        "AAAA" => QTYPE::TYPE(TYPE::AAAA),
        "SRV" => QTYPE::TYPE(TYPE::SRV),
        "SOA" => QTYPE::TYPE(TYPE::SOA),
        "ANY" => QTYPE::ANY,
        _ => return None,
    })
}

fn record(r: &ResourceRecord<'_>) -> Value {
    let name = r.name.to_string();
    match &r.rdata {
        RData::A(a) => {
            json!({"name": name, "type": "A", "ip": Ipv4Addr::from(a.address).to_string()})
        }
        RData::AAAA(a) => {
            json!({"name": name, "type": "AAAA", "ip": Ipv6Addr::from(a.address).to_string()})
        }
        RData::SRV(s) => json!({
            "name": name,
            "type": "SRV",
            "port": s.port,
            "target": s.target.to_string(),
        }),
        RData::SOA(_) => json!({"name": name, "type": "SOA"}),
        other => json!({"name": name, "type": format!("{:?}", other.type_code())}),
    }
}

fn ask(sock: &UdpSocket, server: SocketAddr, id: u16, name: &str, t: QTYPE) -> Value {
    let mut q = Packet::new_query(id);
    let Ok(qname) = Name::new(name) else {
        return json!({"error": format!("{name:?} is not a DNS name")});
    };
    q.questions
        .push(Question::new(qname, t, QCLASS::CLASS(CLASS::IN), false));
    let bytes = match q.build_bytes_vec() {
        Ok(b) => b,
        Err(e) => return json!({"error": format!("cannot build the query: {e}")}),
    };
    if let Err(e) = sock.send_to(&bytes, server) {
        return json!({"error": format!("send to {server}: {e}")});
    }
    let mut buf = [0u8; 4096];
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => return json!({"error": format!("no answer from {server}: {e}")}),
        };
        // An answer to an earlier question that came late: not this one's.
        let Ok(p) = Packet::parse(&buf[..n]) else {
            return json!({"error": "an answer that does not parse"});
        };
        if p.id() != id {
            continue;
        }
        return json!({
            "rcode": format!("{:?}", p.rcode()),
            "answers": p.answers.iter().map(record).collect::<Vec<_>>(),
            "authority": p.name_servers.iter().map(record).collect::<Vec<_>>(),
            "additional": p.additional_records.iter().map(record).collect::<Vec<_>>(),
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("usage: starling-dig <server> <name> <type> [<name> <type> …]");
        std::process::exit(2);
    };
    let Some((server, questions)) = args.split_first() else {
        usage()
    };
    let Ok(server) = server.parse::<SocketAddr>() else {
        usage()
    };
    if questions.is_empty() || questions.len() % 2 != 0 {
        usage()
    }
    let bind = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("starling-dig: bind: {e}");
            std::process::exit(2);
        }
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(500)));
    for (n, pair) in questions.chunks(2).enumerate() {
        let Some(t) = qtype(&pair[1]) else { usage() };
        let id = u16::try_from(n + 1).unwrap_or(u16::MAX);
        println!("{}", ask(&sock, server, id, &pair[0], t));
    }
}
