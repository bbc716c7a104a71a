//! Linearizability under faults: five clients put, get and compare-and-swap a few registers
//! through different managers for 30 s while a nemesis kills, pauses, partitions and drops
//! packets to managers;
//! the recorded history is checked per key. Needs root, `ip` and `nft`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use starling_tests::cluster::{CallError, Cluster, call, encode, poll};
use starling_tests::linearizability::{Event, History, Op, Outcome, Ret};

const KEYS: [&str; 3] = ["r0", "r1", "r2"];
const CLIENTS: usize = 5;
const RUN: Duration = Duration::from_secs(30);
/// A client gives up on an answer after this long and records the outcome as unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(4);

/// A small deterministic generator (xorshift64*): the run's choices follow from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One client: operations against one manager's control socket until `stop`.
fn client(id: usize, socket: PathBuf, t0: Instant, stop: &AtomicBool, seed: u64) -> Vec<Event> {
    let mut rng = Rng(seed);
    let mut events = Vec::new();
    let mut process = id as u64;
    let mut seq = 0u64;
    let mut last_rev = [0u64; KEYS.len()];
    let ns = |t: Instant| t.duration_since(t0).as_nanos() as u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.below(KEYS.len() as u64) as usize;
        let key = KEYS[k];
        let path = format!("/v1/kv/{}", encode(key));
        let choice = rng.below(10);
        seq += 1;
        let value = format!("c{id}-{seq}");
        let (op, method, target, body) = match choice {
            0..=3 => (
                Op::Put {
                    value: value.clone(),
                },
                "PUT",
                path.clone(),
                value.clone(),
            ),
            4..=7 => (
                Op::Get,
                "GET",
                format!("{path}?consistency=linearizable"),
                String::new(),
            ),
            _ => (
                Op::Cas {
                    expect_revision: last_rev[k],
                    value: value.clone(),
                },
                "PUT",
                format!("{path}?expect-revision={}", last_rev[k]),
                value.clone(),
            ),
        };
        let invoke = ns(Instant::now());
        let answer = call(&socket, method, &target, body.as_bytes(), CLIENT_TIMEOUT);
        let complete = ns(Instant::now());
        let outcome = match (&op, answer) {
            // Never delivered: it had no effect, and is not part of the history.
            (_, Err(CallError::NotSent(_))) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            (Op::Get, Ok((200, v))) => {
                let rev = v["mod_revision"].as_u64().unwrap_or(0);
                last_rev[k] = rev;
                Outcome::Ok(Ret::Read(Some((
                    v["value"].as_str().unwrap_or_default().to_owned(),
                    rev,
                ))))
            }
            (Op::Get, Ok((404, _))) => {
                last_rev[k] = 0;
                Outcome::Ok(Ret::Read(None))
            }
            // A read that failed changed nothing.
            (Op::Get, _) => continue,
            (_, Ok((200, v))) => {
                let revision = v["revision"].as_u64().unwrap_or(0);
                last_rev[k] = revision;
                Outcome::Ok(Ret::Written { revision })
            }
            (Op::Cas { .. }, Ok((412, _))) => Outcome::Ok(Ret::CasFailed),
            // A write that failed (no quorum, leader change) or got no answer may still be
            // committed later.
            (_, _) => Outcome::Unknown,
        };
        let unknown = outcome == Outcome::Unknown;
        events.push(Event {
            client: process,
            key: key.to_owned(),
            op,
            invoke,
            outcome,
            complete,
        });
        if unknown {
            // A process whose operation is in doubt never issues another one (Jepsen's rule).
            process += 100;
        }
    }
    events
}

#[test]
fn t20_put_get_cas_histories_stay_linearizable_under_kills_pauses_and_partitions() {
    // The managers run tokio's current-thread runtime, as test and bench clusters on one
    // machine do (`STARLING_THREADS=1`); the other multi-host tests run the default
    // multi-thread runtime.
    let mut c = Cluster::form_with_env(3, 0, &[("STARLING_THREADS", "1")]);
    let sockets: Vec<PathBuf> = (0..3).map(|i| c.socket(i)).collect();
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let mut faults = Vec::new();
    let events: Vec<Event> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let socket = sockets[id % 3].clone();
                let stop = &stop;
                s.spawn(move || client(id, socket, t0, stop, 0x5eed + id as u64))
            })
            .collect();
        // The nemesis: one fault at a time, each for ~3 s, then 2 s of calm.
        let mut rng = Rng(0xfa017);
        let mut round = 0;
        while t0.elapsed() < RUN {
            let victim = rng.below(3) as usize;
            // Every kind of fault in turn, on a manager chosen at random.
            let fault = round % 5;
            round += 1;
            let what = match fault {
                0 => {
                    c.kill(victim);
                    std::thread::sleep(Duration::from_secs(3));
                    c.restart(victim);
                    "kill -9, restart"
                }
                1 => {
                    c.pause(victim);
                    std::thread::sleep(Duration::from_secs(3));
                    c.resume(victim);
                    "SIGSTOP, SIGCONT"
                }
                2 => {
                    c.net.isolate(victim).unwrap();
                    std::thread::sleep(Duration::from_secs(3));
                    c.net.heal().unwrap();
                    "isolated, healed"
                }
                3 => {
                    c.net.loss(victim, 30).unwrap();
                    std::thread::sleep(Duration::from_secs(3));
                    c.net.heal().unwrap();
                    "30 % packet loss, healed"
                }
                _ => {
                    let other = (victim + 1) % 3;
                    c.net.drop_from(victim, other).unwrap();
                    std::thread::sleep(Duration::from_secs(3));
                    c.net.heal().unwrap();
                    "one-way drop, healed"
                }
            };
            faults.push(format!("{:?} h{}: {what}", t0.elapsed(), victim + 1));
            std::thread::sleep(Duration::from_secs(2));
        }
        stop.store(true, Ordering::Relaxed);
        clients
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    eprintln!("faults:\n  {}", faults.join("\n  "));
    // Calm: every register read once more through every manager.
    c.wait_leader(&[0, 1, 2], Duration::from_secs(30));
    let mut history = History::new();
    for e in events {
        history.push(e);
    }
    let ns = |t: Instant| t.duration_since(t0).as_nanos() as u64;
    for (i, socket) in sockets.iter().enumerate() {
        for key in KEYS {
            let target = format!("/v1/kv/{}?consistency=linearizable", encode(key));
            // A manager just restarted may still be catching up: its reads fail until then.
            let (invoke, read) = poll(
                &format!("a linearizable read of {key} on h{}", i + 1),
                Duration::from_secs(30),
                || {
                    let invoke = ns(Instant::now());
                    match call(socket, "GET", &target, b"", Duration::from_secs(10)) {
                        Ok((200, v)) => Some((
                            invoke,
                            Some((
                                v["value"].as_str().unwrap_or_default().to_owned(),
                                v["mod_revision"].as_u64().unwrap_or(0),
                            )),
                        )),
                        Ok((404, _)) => Some((invoke, None)),
                        _ => None,
                    }
                },
            );
            history.push(Event {
                client: 1000 + i as u64,
                key: key.to_owned(),
                op: Op::Get,
                invoke,
                outcome: Outcome::Ok(Ret::Read(read)),
                complete: ns(Instant::now()),
            });
        }
    }
    let ok = history
        .events()
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Ok(_)))
        .count();
    let writes_ok = history
        .events()
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Ok(Ret::Written { .. })))
        .count();
    let unknown = history.len() - ok;
    eprintln!(
        "history: {} operations, {ok} answered ({writes_ok} writes), {unknown} unknown",
        history.len(),
    );
    assert!(!faults.is_empty());
    assert!(
        writes_ok >= 50,
        "too few acknowledged writes to judge: {writes_ok}"
    );
    let started = Instant::now();
    if let Err(v) = history.check() {
        panic!("not linearizable:\n{v}");
    }
    eprintln!("checked in {:?}", started.elapsed());
}
