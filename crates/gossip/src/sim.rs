//! A deterministic simulator: N [`GossipCore`]s — the protocol code the driver ships, not a
//! copy — in one thread, on virtual time, over a simulated network with latency, loss and
//! partitions. The simulator only carries bytes and wakes cores when they asked; the same
//! seed gives the same run. Used by the tests and by the gossip benchmark.
//!
//! ```text
//!   event queue (virtual time) ── Wake(node) ──────────▶ core.handle_timeout
//!                              ── Datagram(from, to) ──▶ core.handle_datagram   (lossy)
//!                              ── Request(from, to) ───▶ core.handle_request ─▶ Response
//!                              ── Response(to, id) ────▶ core.handle_response   (failed when
//!                                                                                unreachable)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::catalog::{Catalog, NodeRecord, ServiceEndpoint};
use crate::config::GossipConfig;
use crate::core::{GossipCore, GossipEvent, GossipSettings, RpcKind, Transmit};
use crate::identity::GossipId;
use crate::timers::TimerQueue;

/// Settings of a simulated network.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of every random choice (the cores' and the network's).
    pub seed: u64,
    /// One-way delay of every message.
    pub latency: Duration,
    /// Extra random delay, up to this much.
    pub jitter: Duration,
    /// Probability that a gossip datagram is lost (requests ride reliable streams).
    pub loss: f64,
    /// How long a request to a node that cannot be reached takes to fail.
    pub request_timeout: Duration,
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
            request_timeout: Duration::from_secs(5),
            gossip: GossipConfig::default(),
        }
    }
}

#[derive(Debug)]
enum Event {
    /// Node `.0` in its life `.1` asked to be woken now.
    Wake(usize, u64),
    Datagram {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    Request {
        from: usize,
        life: u64,
        to: usize,
        id: u64,
        body: Vec<u8>,
    },
    Response {
        to: usize,
        life: u64,
        id: u64,
        answer: Option<Vec<u8>>,
    },
}

/// One simulated node.
struct SimNode {
    core: GossipCore,
    alive: bool,
    /// Bumped by a restart: wakes and answers meant for a previous life are dropped.
    life: u64,
    /// The earliest wake queued for this life.
    wake_at: Option<Duration>,
    /// Nodes this node currently believes Down, with when it learned so.
    down: BTreeMap<String, Duration>,
    /// Every node it ever saw declared Down, with the time (for false-Down counting).
    /// Every Down this node saw: the node, whether it was false (that identity was alive),
    /// when.
    down_log: Vec<(String, bool, Duration)>,
    sent_bytes: u64,
}

/// The simulator.
pub struct Simulator {
    cfg: SimConfig,
    epoch: Instant,
    now: Duration,
    queue: TimerQueue<Duration, Event>,
    rng: StdRng,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    by_name: HashMap<String, usize>,
    blocked: BTreeSet<(usize, usize)>,
    /// Requests each kind of which is dropped with this probability (failing as if the
    /// peer were unreachable).
    drop_kind: BTreeMap<RpcKind, f64>,
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
            epoch: Instant::now(),
            now: Duration::ZERO,
            queue: TimerQueue::new(),
            rng,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            by_name: HashMap::new(),
            blocked: BTreeSet::new(),
            drop_kind: BTreeMap::new(),
        }
    }

    /// A network of `n` nodes that all joined through node 0.
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

    fn instant(&self) -> Instant {
        self.epoch + self.now
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.queue.push(self.now + after, event);
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

    /// Settings of node `i`: it joins (and re-joins) through node 0.
    fn settings_for(&mut self, id: GossipId, i: usize) -> GossipSettings {
        let seeds = if i == 0 {
            Vec::new()
        } else {
            vec![("n0".to_owned(), sim_addr(0))]
        };
        GossipSettings {
            id,
            seeds,
            config: self.cfg.gossip.clone(),
            rng_seed: self.rng.random(),
        }
    }

    fn core_for(&mut self, id: GossipId, i: usize) -> GossipCore {
        let settings = self.settings_for(id, i);
        GossipCore::new(settings, self.instant())
    }

    /// A network of `n` nodes that formed a cluster already: every node knows every other
    /// one alive and holds its record (empty, generation 1) — the state
    /// [`Simulator::cluster`]'s nodes converge to, without the join storm that takes
    /// them there (n²·log n piggybacked updates: the part of a 10 000-node run that does
    /// not fit in memory or in minutes). Identities, names and records are shared by all
    /// the nodes' tables; what changes later is each node's own.
    pub fn formed(cfg: SimConfig, n: usize) -> Self {
        let mut sim = Simulator::new(cfg);
        let ids: Vec<Arc<GossipId>> = (0..n)
            .map(|i| Arc::new(GossipId::new(format!("n{i}"), sim_addr(i), 1)))
            .collect();
        let mut records: Vec<(Arc<str>, Arc<NodeRecord>)> = ids
            .iter()
            .map(|id| {
                let record = NodeRecord::empty(id.node.clone(), id.generation);
                (Arc::from(id.node.as_str()), Arc::new(record))
            })
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, id) in ids.iter().enumerate() {
            let id = GossipId::clone(id);
            sim.by_addr.insert(id.addr, i);
            sim.by_name.insert(id.node.clone(), i);
            let settings = sim.settings_for(id, i);
            let core = GossipCore::new_formed(
                settings,
                sim.instant(),
                ids.iter().cloned(),
                records.iter().cloned(),
            );
            sim.push(core);
        }
        sim
    }

    fn push(&mut self, core: GossipCore) {
        self.nodes.push(SimNode {
            core,
            alive: true,
            life: 0,
            wake_at: None,
            down: BTreeMap::new(),
            down_log: Vec::new(),
            sent_bytes: 0,
        });
        self.flush(self.nodes.len() - 1);
    }

    /// Adds a node that joins by announcing to node 0; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let id = GossipId::new(format!("n{i}"), sim_addr(i), 1);
        self.by_addr.insert(sim_addr(i), i);
        self.by_name.insert(id.node.clone(), i);
        let core = self.core_for(id, i);
        self.push(core);
        i
    }

    /// Stops node `i` abruptly (a crash): it sends and receives nothing from now on.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Restarts a killed node with the next generation and an empty catalog; it re-joins
    /// through node 0.
    pub fn restart(&mut self, i: usize) {
        let mut id = self.nodes[i].core.id().clone();
        id.generation += 1;
        let core = self.core_for(id, i);
        let node = &mut self.nodes[i];
        node.core = core;
        node.alive = true;
        node.life += 1;
        node.wake_at = None;
        node.down.clear();
        self.flush(i);
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

    /// Fails requests of `kind` with probability `p` from now on (as if the peer could not
    /// be reached): what converges anyway does not depend on them.
    pub fn drop_requests(&mut self, kind: RpcKind, p: f64) {
        self.drop_kind.insert(kind, p.clamp(0.0, 1.0));
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Node `i` publishes `endpoints` as its new record (its version goes up).
    pub fn publish(&mut self, i: usize, endpoints: Vec<ServiceEndpoint>) -> (u64, u64) {
        let now = self.instant();
        let stamp = self.nodes[i].core.publish(now, endpoints, BTreeMap::new());
        self.flush(i);
        stamp
    }

    /// Node `i` leaves gracefully (it lingers, then stops).
    pub fn leave(&mut self, i: usize) {
        let now = self.instant();
        self.nodes[i].core.leave(now);
        self.flush(i);
    }

    /// Runs the network for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while let Some((at, event)) = self.queue.pop_due(until) {
            self.now = at;
            self.handle(event);
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
        let now = self.instant();
        match event {
            Event::Wake(i, life) => {
                let node = &mut self.nodes[i];
                if !node.alive || node.life != life {
                    return;
                }
                node.wake_at = None;
                node.core.handle_timeout(now);
                self.flush(i);
            }
            Event::Datagram { from, to, bytes } => {
                if !self.reachable(from, to) {
                    return;
                }
                self.nodes[to].core.handle_datagram(now, &bytes);
                self.flush(to);
            }
            Event::Request {
                from,
                life,
                to,
                id,
                body,
            } => {
                if !self.reachable(from, to) {
                    let t = self.cfg.request_timeout;
                    self.schedule(
                        t,
                        Event::Response {
                            to: from,
                            life,
                            id,
                            answer: None,
                        },
                    );
                    return;
                }
                let answer = self.nodes[to].core.handle_request(now, &body);
                self.flush(to);
                self.nodes[to].sent_bytes += answer.as_ref().map_or(0, |a| a.len() as u64);
                let d = self.delay();
                self.schedule(
                    d,
                    Event::Response {
                        to: from,
                        life,
                        id,
                        answer,
                    },
                );
            }
            Event::Response {
                to,
                life,
                id,
                answer,
            } => {
                let node = &mut self.nodes[to];
                if !node.alive || node.life != life {
                    return;
                }
                node.core.handle_response(now, id, answer.as_deref());
                self.flush(to);
            }
        }
    }

    /// Carries what node `i`'s core asked to send, notes its events, and queues its wake.
    fn flush(&mut self, i: usize) {
        while let Some(t) = self.nodes[i].core.poll_transmit() {
            match t {
                Transmit::Datagram { to, bytes } => {
                    self.nodes[i].sent_bytes += bytes.len() as u64;
                    let Some(&j) = self.by_addr.get(&to.addr) else {
                        continue;
                    };
                    if self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss) {
                        continue;
                    }
                    let d = self.delay();
                    self.schedule(
                        d,
                        Event::Datagram {
                            from: i,
                            to: j,
                            bytes,
                        },
                    );
                }
                Transmit::Request { id, to, kind, body } => {
                    self.nodes[i].sent_bytes += body.len() as u64;
                    let life = self.nodes[i].life;
                    let dropped = self
                        .drop_kind
                        .get(&kind)
                        .is_some_and(|p| *p > 0.0 && self.rng.random_bool(*p));
                    match self.by_addr.get(&to.addr).copied() {
                        Some(j) if !dropped => {
                            let d = self.delay();
                            self.schedule(
                                d,
                                Event::Request {
                                    from: i,
                                    life,
                                    to: j,
                                    id,
                                    body,
                                },
                            );
                        }
                        _ => {
                            let t = self.cfg.request_timeout;
                            self.schedule(
                                t,
                                Event::Response {
                                    to: i,
                                    life,
                                    id,
                                    answer: None,
                                },
                            );
                        }
                    }
                }
            }
        }
        let now = self.now;
        while let Some(e) = self.nodes[i].core.poll_event() {
            // A Down of the identity a live node runs under now (not of an earlier life of
            // a node that restarted) is a false one.
            let live_identity = |id: &GossipId| {
                self.by_name.get(&id.node).is_some_and(|j| {
                    self.nodes[*j].alive && self.nodes[*j].core.id().generation == id.generation
                })
            };
            let is_false = matches!(&e, GossipEvent::MemberDown(id) if live_identity(id));
            let node = &mut self.nodes[i];
            match e {
                GossipEvent::MemberDown(id) => {
                    node.down.insert(id.node.clone(), now);
                    node.down_log.push((id.node, is_false, now));
                }
                GossipEvent::MemberUp(id) | GossipEvent::Restarted { new: id, .. } => {
                    node.down.remove(&id.node);
                }
                _ => {}
            }
        }
        let node = &self.nodes[i];
        if let Some(at) = node.core.poll_timeout() {
            let at = at.saturating_duration_since(self.epoch);
            if node.wake_at.is_none_or(|w| at < w) {
                let life = node.life;
                self.nodes[i].wake_at = Some(at);
                let after = at.saturating_sub(self.now);
                self.schedule(after, Event::Wake(i, life));
            }
        }
    }

    /// Indices of live nodes.
    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].alive && !self.nodes[*i].core.is_closed())
    }

    /// Active members node `i` sees.
    pub fn members_seen(&self, i: usize) -> usize {
        self.nodes[i].core.num_members()
    }

    /// The generation of node `j` that node `i` sees as an active member, if any.
    pub fn generation_seen(&self, i: usize, j: usize) -> Option<u64> {
        self.nodes[i]
            .core
            .member(&sim_addr(j))
            .filter(|m| m.up)
            .map(|m| m.id.generation)
    }

    /// Whether node `i` currently sees node `j` suspected (active, a probe failed).
    pub fn sees_suspected(&self, i: usize, j: usize) -> bool {
        self.nodes[i]
            .core
            .member(&sim_addr(j))
            .is_some_and(|m| m.suspected)
    }

    /// Whether node `i` currently believes node `j` is Down.
    pub fn sees_down(&self, i: usize, j: usize) -> bool {
        self.nodes[i]
            .down
            .contains_key(&self.nodes[j].core.id().node)
            && self.generation_seen(i, j).is_none()
    }

    /// Node `i`'s catalog.
    pub fn catalog(&self, i: usize) -> Catalog {
        self.nodes[i].core.catalog().lock().clone()
    }

    /// The stamp of `j`'s record as node `i` holds it.
    pub fn stamp_seen(&self, i: usize, j: usize) -> Option<(u64, u64)> {
        self.nodes[i]
            .core
            .catalog()
            .lock()
            .stamp_of(&self.nodes[j].core.id().node)
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

    /// Down declarations about identities that were alive (false positives: not a Down of
    /// an earlier life of a node that restarted), over all live observers.
    pub fn false_downs(&self) -> usize {
        self.live()
            .map(|i| {
                self.nodes[i]
                    .down_log
                    .iter()
                    .filter(|(_, is_false, _)| *is_false)
                    .count()
            })
            .sum()
    }

    /// The failure detectors' counts, summed over every node's current life.
    pub fn detector_stats(&self) -> crate::core::DetectorStats {
        let mut sum = crate::core::DetectorStats::default();
        for n in &self.nodes {
            let s = n.core.detector_stats();
            sum.suspected += s.suspected;
            sum.answered += s.answered;
            sum.gone += s.gone;
            sum.declared_down += s.declared_down;
            sum.rescued += s.rescued;
        }
        sum
    }

    /// Bytes node `i` sent so far (gossip datagrams, requests and answers).
    pub fn sent_bytes(&self, i: usize) -> u64 {
        self.nodes[i].sent_bytes
    }

    /// Node `i`'s gossip core.
    pub fn core(&self, i: usize) -> &GossipCore {
        &self.nodes[i].core
    }

    /// Events waiting in the simulated network.
    pub fn queued_events(&self) -> usize {
        self.queue.len()
    }

    /// Node `i`'s identity.
    pub fn id(&self, i: usize) -> &GossipId {
        self.nodes[i].core.id()
    }
}
