//! A deterministic simulator: N foca instances with their catalogs in one thread, virtual
//! time, one ordered event queue (every foca timer delivered, in order), and a simulated
//! network with latency, loss and partitions. No sockets, no clock; the same seed gives the
//! same run. Used by the tests and by the gossip benchmark.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, Identity, Member, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::catalog::{
    Catalog, NodeRecord, NoticeHandler, ServiceEndpoint, SharedCatalog, VersionNotice,
    encode_notice,
};
use crate::config::GossipConfig;
use crate::identity::GossipId;

type SimFoca = Foca<GossipId, PostcardCodec, StdRng, NoticeHandler>;

/// Settings of a simulated network.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of every random choice (foca's and the network's).
    pub seed: u64,
    /// One-way delay of every message.
    pub latency: Duration,
    /// Extra random delay, up to this much.
    pub jitter: Duration,
    /// Probability that a gossip datagram is lost (pulls ride reliable streams).
    pub loss: f64,
    /// Gossip settings of every node.
    pub gossip: GossipConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            latency: Duration::from_micros(500),
            jitter: Duration::from_micros(500),
            loss: 0.0,
            gossip: GossipConfig::default(),
        }
    }
}

#[derive(Debug)]
enum Event {
    /// A foca timer of node `.0` in its life `.1` (timers of a previous life are dropped).
    Timer(usize, u64, Timer<GossipId>),
    Packet {
        from: usize,
        to: usize,
        data: Bytes,
    },
    SyncTick(usize),
    Digest {
        from: usize,
        to: usize,
        digest: crate::catalog::Digest,
        members: usize,
    },
    Members {
        to: usize,
        from: usize,
        members: Vec<Member<GossipId>>,
    },
    /// A sync round's first message: fingerprint and member count only.
    Fingerprint {
        from: usize,
        to: usize,
        fingerprint: u64,
        members: usize,
    },
    /// The peer's answer to a fingerprint that differs: send the full digest.
    SendDigest {
        to: usize,
        from: usize,
    },
    Pull {
        from: usize,
        to: usize,
        want: VersionNotice,
        fallback: bool,
    },
    Records {
        to: usize,
        from: usize,
        records: Vec<NodeRecord>,
        want: Option<VersionNotice>,
        /// The responder's membership, sent when the two disagreed on the member count;
        /// the requester then sends its own back (memberlist's push-pull, only on need).
        members: Option<Vec<Member<GossipId>>>,
        /// Nodes whose records the requester's digest showed newer: send them back.
        need: Vec<String>,
    },
    Reannounce(usize),
}

struct Queued {
    at: Duration,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reversed: the heap pops the earliest first, ties in submission order.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// One simulated node.
struct SimNode {
    id: GossipId,
    foca: SimFoca,
    shared: SharedCatalog,
    runtime: AccumulatingRuntime<GossipId>,
    alive: bool,
    /// Nodes this node currently believes Down, with when it learned so.
    down: BTreeMap<String, Duration>,
    /// Every node it ever saw declared Down, with the time (for false-Down counting).
    down_log: Vec<(String, Duration)>,
    idle_backoff: Duration,
    sent_bytes: u64,
}

/// The simulator.
pub struct Simulator {
    cfg: SimConfig,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Queued>,
    rng: StdRng,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    blocked: BTreeSet<(usize, usize)>,
    seeds: Vec<usize>,
}

fn sim_addr(i: usize) -> SocketAddr {
    let i = i as u32;
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7946))
}

impl Simulator {
    /// An empty network.
    pub fn new(cfg: SimConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Simulator {
            cfg,
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            rng,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            blocked: BTreeSet::new(),
            seeds: vec![0],
        }
    }

    /// A network of `n` nodes that all joined through node 0, run until membership settled.
    pub fn cluster(cfg: SimConfig, n: usize) -> Self {
        let mut sim = Simulator::new(cfg);
        for _ in 0..n {
            sim.add_node();
        }
        sim
    }

    /// Virtual time now.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Number of nodes ever added.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was added.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        self.queue.push(Queued {
            at: self.now + after,
            seq: self.seq,
            event,
        });
    }

    fn delay(&mut self) -> Duration {
        let j = self.cfg.jitter.as_nanos() as u64;
        let extra = if j == 0 {
            0
        } else {
            self.rng.random_range(0..=j)
        };
        self.cfg.latency + Duration::from_nanos(extra)
    }

    fn new_node(&mut self, id: GossipId, n_hint: usize) -> SimNode {
        let shared = SharedCatalog::default();
        let seed: u64 = self.rng.random();
        let foca = Foca::with_custom_broadcast(
            id.clone(),
            self.cfg.gossip.foca_config(n_hint),
            StdRng::seed_from_u64(seed),
            PostcardCodec,
            NoticeHandler::new(shared.clone(), id.node.clone()),
        );
        shared
            .lock()
            .merge(NodeRecord::empty(id.node.clone(), id.generation));
        SimNode {
            id,
            foca,
            shared,
            runtime: AccumulatingRuntime::new(),
            alive: true,
            down: BTreeMap::new(),
            down_log: Vec::new(),
            idle_backoff: self.cfg.gossip.reannounce_min,
            sent_bytes: 0,
        }
    }

    /// Adds a node that joins by announcing to the seed nodes; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let id = GossipId::new(format!("n{i}"), sim_addr(i), 1);
        let n = self.nodes.len() + 1;
        let node = self.new_node(id, n);
        self.nodes.push(node);
        self.by_addr.insert(sim_addr(i), i);
        if i != 0 {
            self.announce(i);
            let b = self.cfg.gossip.reannounce_min;
            self.schedule(b, Event::Reannounce(i));
        }
        let first = self.cfg.gossip.sync_interval;
        let offset =
            Duration::from_millis(self.rng.random_range(0..first.as_millis().max(1) as u64));
        self.schedule(offset, Event::SyncTick(i));
        i
    }

    fn announce(&mut self, i: usize) {
        let seeds: Vec<usize> = self
            .seeds
            .iter()
            .copied()
            .filter(|s| *s != i && self.nodes[*s].alive)
            .collect();
        for s in seeds {
            let dst = self.nodes[s].id.clone();
            let node = &mut self.nodes[i];
            let _ = node.foca.announce(dst, &mut node.runtime);
        }
        self.drain(i);
    }

    /// Stops node `i` abruptly (a crash): it sends and receives nothing from now on.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Restarts a killed node with the next generation and an empty catalog; it re-joins
    /// through the seeds.
    pub fn restart(&mut self, i: usize) {
        let mut id = self.nodes[i].id.clone();
        id.generation += 1;
        let n = self.live().count() + 1;
        let node = self.new_node(id, n);
        self.nodes[i] = node;
        self.announce(i);
    }

    /// Drops every message between the two sets of nodes, both ways.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        for x in a {
            for y in b {
                self.blocked.insert((*x, *y));
                self.blocked.insert((*y, *x));
            }
        }
    }

    /// Sets the gossip datagram loss probability from now on.
    pub fn set_loss(&mut self, loss: f64) {
        self.cfg.loss = loss.clamp(0.0, 1.0);
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Node `i` publishes `endpoints` as its new record (its version goes up).
    pub fn publish(&mut self, i: usize, endpoints: Vec<ServiceEndpoint>) -> (u64, u64) {
        let node = &mut self.nodes[i];
        let mut rec = node
            .shared
            .lock()
            .record(&node.id.node)
            .cloned()
            .unwrap_or_else(|| NodeRecord::empty(node.id.node.clone(), node.id.generation));
        rec.version += 1;
        rec.endpoints = endpoints;
        let stamp = rec.stamp();
        node.shared.lock().merge(rec.clone());
        let notice = VersionNotice {
            node: rec.node.clone(),
            generation: rec.generation,
            version: rec.version,
        };
        let _ = node.foca.add_broadcast(&encode_notice(&notice));
        let _ = node.foca.broadcast(&mut node.runtime);
        self.drain(i);
        stamp
    }

    /// Runs the network for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while let Some(q) = self.queue.peek() {
            if q.at > until {
                break;
            }
            let Some(q) = self.queue.pop() else { break };
            self.now = q.at;
            self.handle(q.event);
        }
        self.now = until;
    }

    /// Runs in steps of `step` until `done` holds or `max` passes; returns the time taken.
    pub fn run_until(
        &mut self,
        step: Duration,
        max: Duration,
        mut done: impl FnMut(&Simulator) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        while self.now - start <= max {
            if done(self) {
                return Some(self.now - start);
            }
            self.run_for(step);
        }
        None
    }

    fn reachable(&self, from: usize, to: usize) -> bool {
        self.nodes[to].alive && self.nodes[from].alive && !self.blocked.contains(&(from, to))
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Timer(i, life, t) => {
                if !self.nodes[i].alive || self.nodes[i].id.generation != life {
                    return;
                }
                let node = &mut self.nodes[i];
                let _ = node.foca.handle_timer(t, &mut node.runtime);
                self.drain(i);
            }
            Event::Packet { from, to, data } => {
                if !self.reachable(from, to) {
                    return;
                }
                let node = &mut self.nodes[to];
                let _ = node.foca.handle_data(&data, &mut node.runtime);
                self.drain(to);
            }
            Event::SyncTick(i) => {
                let interval = self.cfg.gossip.sync_interval;
                self.schedule(interval, Event::SyncTick(i));
                if !self.nodes[i].alive {
                    return;
                }
                let members: Vec<usize> = self.nodes[i]
                    .foca
                    .iter_members()
                    .filter_map(|m| self.by_addr.get(&m.id().addr()).copied())
                    .collect();
                if members.is_empty() {
                    return;
                }
                let peer = members[self.rng.random_range(0..members.len())];
                let fingerprint = self.nodes[i].shared.lock().fingerprint();
                self.nodes[i].sent_bytes += 16;
                let d = self.delay();
                self.schedule(
                    d,
                    Event::Fingerprint {
                        from: i,
                        to: peer,
                        fingerprint,
                        members: self.nodes[i].foca.num_members(),
                    },
                );
            }
            Event::Fingerprint {
                from,
                to,
                fingerprint,
                members,
            } => {
                if !self.reachable(from, to) {
                    return;
                }
                let same = self.nodes[to].shared.lock().fingerprint() == fingerprint
                    && self.nodes[to].foca.num_members() == members;
                if same {
                    return;
                }
                self.nodes[to].sent_bytes += 8;
                let d = self.delay();
                self.schedule(d, Event::SendDigest { to: from, from: to });
            }
            Event::SendDigest { to, from } => {
                if !self.reachable(from, to) {
                    return;
                }
                let digest = self.nodes[to].shared.lock().digest();
                self.nodes[to].sent_bytes += digest_size(&digest);
                let d = self.delay();
                self.schedule(
                    d,
                    Event::Digest {
                        from: to,
                        to: from,
                        digest,
                        members: self.nodes[to].foca.num_members(),
                    },
                );
            }
            Event::Members { to, from, members } => {
                if self.reachable(from, to) {
                    self.apply_members(to, members);
                }
            }
            Event::Digest {
                from,
                to,
                digest,
                members,
            } => {
                if !self.reachable(from, to) {
                    return;
                }
                let (records, need) = {
                    let catalog = self.nodes[to].shared.lock();
                    let need = catalog.lacking(&digest);
                    (catalog.newer_than(&digest), need)
                };
                let mismatch = self.nodes[to].foca.num_members() != members;
                if records.is_empty() && !mismatch && need.is_empty() {
                    return;
                }
                let members = mismatch.then(|| self.membership(to));
                self.nodes[to].sent_bytes += members.as_ref().map_or(0, |m| members_size(m));
                self.nodes[to].sent_bytes += records_size(&records);
                let d = self.delay();
                self.schedule(
                    d,
                    Event::Records {
                        to: from,
                        from: to,
                        records,
                        want: None,
                        members,
                        need,
                    },
                );
            }
            Event::Pull {
                from,
                to,
                want,
                fallback,
            } => {
                if !self.reachable(from, to) {
                    return;
                }
                let records = self.nodes[to]
                    .shared
                    .lock()
                    .records(std::slice::from_ref(&want.node));
                self.nodes[to].sent_bytes += records_size(&records);
                let d = self.delay();
                let want = (!fallback).then_some(want);
                self.schedule(
                    d,
                    Event::Records {
                        to: from,
                        from: to,
                        records,
                        want,
                        members: None,
                        need: Vec::new(),
                    },
                );
            }
            Event::Records {
                to,
                from,
                records,
                want,
                members,
                need,
            } => {
                if !self.reachable(from, to) {
                    return;
                }
                if !need.is_empty() {
                    let back = self.nodes[to].shared.lock().records(&need);
                    self.nodes[to].sent_bytes += records_size(&back);
                    let d = self.delay();
                    self.schedule(
                        d,
                        Event::Records {
                            to: from,
                            from: to,
                            records: back,
                            want: None,
                            members: None,
                            need: Vec::new(),
                        },
                    );
                }
                if let Some(m) = members {
                    self.apply_members(to, m);
                    let mine = self.membership(to);
                    self.nodes[to].sent_bytes += members_size(&mine);
                    let d = self.delay();
                    self.schedule(
                        d,
                        Event::Members {
                            to: from,
                            from: to,
                            members: mine,
                        },
                    );
                }
                let mut catalog = self.nodes[to].shared.lock();
                for r in records {
                    catalog.merge(r);
                }
                let still = want.filter(|w| catalog.wants(w));
                drop(catalog);
                // The relay did not have it yet: ask the node that published it.
                if let Some(w) = still
                    && let Some(&origin) = self.by_node(&w.node)
                    && origin != to
                {
                    let d = self.delay();
                    self.schedule(
                        d,
                        Event::Pull {
                            from: to,
                            to: origin,
                            want: w,
                            fallback: true,
                        },
                    );
                }
            }
            Event::Reannounce(i) => {
                if self.nodes[i].alive && self.nodes[i].foca.num_members() == 0 {
                    self.announce(i);
                    let next = (self.nodes[i].idle_backoff * 2).min(self.cfg.gossip.reannounce_max);
                    self.nodes[i].idle_backoff = next;
                    self.schedule(next, Event::Reannounce(i));
                }
            }
        }
    }

    fn by_node(&self, node: &str) -> Option<&usize> {
        node.strip_prefix('n')
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|i| *i < self.nodes.len())
            .map(|i| &self.nodes[i])
            .and_then(|n| self.by_addr.get(&n.id.addr))
    }

    /// Node `i`'s view of the membership, itself included, for a push-pull.
    fn membership(&self, i: usize) -> Vec<Member<GossipId>> {
        let node = &self.nodes[i];
        let mut v: Vec<Member<GossipId>> = node.foca.iter_membership_state().cloned().collect();
        v.push(Member::alive(node.id.clone()));
        v
    }

    fn apply_members(&mut self, i: usize, members: Vec<Member<GossipId>>) {
        let node = &mut self.nodes[i];
        let _ = node
            .foca
            .apply_many(members.into_iter(), false, &mut node.runtime);
        self.drain(i);
    }

    /// Moves what node `i`'s foca produced into the queue.
    fn drain(&mut self, i: usize) {
        while let Some((dst, data)) = self.nodes[i].runtime.to_send() {
            self.nodes[i].sent_bytes += data.len() as u64;
            let Some(&j) = self.by_addr.get(&dst.addr()) else {
                continue;
            };
            if self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss) {
                continue;
            }
            let d = self.delay();
            self.schedule(
                d,
                Event::Packet {
                    from: i,
                    to: j,
                    data,
                },
            );
        }
        while let Some((after, timer)) = self.nodes[i].runtime.to_schedule() {
            let life = self.nodes[i].id.generation;
            self.schedule(after, Event::Timer(i, life, timer));
        }
        let mut retune = false;
        while let Some(n) = self.nodes[i].runtime.to_notify() {
            let now = self.now;
            let node = &mut self.nodes[i];
            match n {
                OwnedNotification::MemberDown(id) => {
                    node.shared.lock().mark_down(&id.node, id.generation);
                    node.down.insert(id.node.clone(), now);
                    node.down_log.push((id.node.clone(), now));
                    retune = true;
                }
                OwnedNotification::MemberUp(id) => {
                    if node.down.remove(&id.node).is_some() {
                        node.shared.lock().mark_up(&id.node, id.generation);
                    }
                    retune = true;
                }
                OwnedNotification::Rename(_, new) => {
                    node.down.remove(&new.node);
                    node.shared.lock().mark_up(&new.node, new.generation);
                }
                OwnedNotification::Idle => {
                    let b = node.idle_backoff;
                    self.schedule(b, Event::Reannounce(i));
                }
                OwnedNotification::Active => {
                    self.nodes[i].idle_backoff = self.cfg.gossip.reannounce_min;
                }
                _ => {}
            }
        }
        if retune {
            let n = self.nodes[i].foca.num_members() + 1;
            let cfg = self.cfg.gossip.foca_config(n);
            let _ = self.nodes[i].foca.set_config(cfg);
        }
        // Pull the records whose notices arrived.
        for want in self.nodes[i].shared.take_wants() {
            let relay = want
                .from
                .as_ref()
                .and_then(|f| self.by_addr.get(&f.addr()).copied());
            let target = relay.or_else(|| self.by_node(&want.notice.node).copied());
            if let Some(t) = target
                && t != i
            {
                let d = self.delay();
                self.schedule(
                    d,
                    Event::Pull {
                        from: i,
                        to: t,
                        want: want.notice,
                        fallback: false,
                    },
                );
            }
        }
    }

    /// Indices of live nodes.
    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].alive)
    }

    /// Active members node `i` sees.
    pub fn members_seen(&self, i: usize) -> usize {
        self.nodes[i].foca.num_members()
    }

    /// The generation of node `j` that node `i` sees as an active member, if any.
    pub fn generation_seen(&self, i: usize, j: usize) -> Option<u64> {
        let addr = self.nodes[j].id.addr;
        self.nodes[i]
            .foca
            .iter_members()
            .find(|m| m.id().addr == addr)
            .map(|m| m.id().generation)
    }

    /// Whether node `i` currently believes node `j` is Down.
    pub fn sees_down(&self, i: usize, j: usize) -> bool {
        self.nodes[i].down.contains_key(&self.nodes[j].id.node)
            && self.generation_seen(i, j).is_none()
    }

    /// Node `i`'s catalog.
    pub fn catalog(&self, i: usize) -> Catalog {
        self.nodes[i].shared.lock().clone()
    }

    /// The stamp of `j`'s record as node `i` holds it.
    pub fn stamp_seen(&self, i: usize, j: usize) -> Option<(u64, u64)> {
        self.nodes[i].shared.lock().stamp_of(&self.nodes[j].id.node)
    }

    /// The fraction of live nodes that hold `j`'s record at `stamp` or newer.
    pub fn fraction_with(&self, j: usize, stamp: (u64, u64)) -> f64 {
        let live: Vec<usize> = self.live().collect();
        let have = live
            .iter()
            .filter(|i| self.stamp_seen(**i, j).is_some_and(|s| s >= stamp))
            .count();
        have as f64 / live.len().max(1) as f64
    }

    /// Down declarations about nodes that were alive and reachable (false positives), over
    /// all live observers.
    pub fn false_downs(&self) -> usize {
        self.live()
            .map(|i| {
                self.nodes[i]
                    .down_log
                    .iter()
                    .filter(|(node, _)| self.by_node(node).is_some_and(|j| self.nodes[*j].alive))
                    .count()
            })
            .sum()
    }

    /// Bytes node `i` sent so far (gossip datagrams and catalog transfers).
    pub fn sent_bytes(&self, i: usize) -> u64 {
        self.nodes[i].sent_bytes
    }

    /// Node `i`'s identity.
    pub fn id(&self, i: usize) -> &GossipId {
        &self.nodes[i].id
    }
}

fn digest_size(d: &crate::catalog::Digest) -> u64 {
    d.iter().map(|(n, _)| n.len() as u64 + 16).sum()
}

fn members_size(m: &[Member<GossipId>]) -> u64 {
    m.iter().map(|m| m.id().node.len() as u64 + 18 + 4).sum()
}

fn records_size(r: &[NodeRecord]) -> u64 {
    r.iter()
        .map(|r| postcard::to_stdvec(r).map(|v| v.len() as u64).unwrap_or(0))
        .sum()
}
