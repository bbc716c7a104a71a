//! The tokio driver: one task owns the foca instance and its one ordered timer queue;
//! packets travel as QUIC datagrams on ALPN `starling/gossip/1`; catalog pulls, digests and
//! membership push-pull are requests on the same connections.

use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, Member, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use starling_transport::{Connection, Endpoint, Inbound, NodeId, PeerPolicy, Protocol};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::catalog::{
    Digest, NodeRecord, NoticeHandler, ServiceEndpoint, SharedCatalog, VersionNotice, encode_notice,
};
use crate::config::GossipConfig;
use crate::identity::GossipId;

/// The ALPN of the gossip protocol.
pub const GOSSIP_ALPN: &[u8] = b"starling/gossip/1";

/// The gossip protocol: any member of the cluster.
pub fn gossip_protocol() -> Result<Protocol, starling_transport::ConfigError> {
    // Nodes only: API client certificates (admin, viewer) come from the same CA but must
    // not take part in membership or publish catalog records.
    Protocol::new(
        GOSSIP_ALPN,
        PeerPolicy::roles([
            starling_transport::Role::MANAGER,
            starling_transport::Role::WORKER,
        ]),
    )
}

/// What happened, for subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GossipEvent {
    /// A member became active.
    MemberUp(GossipId),
    /// A member was declared Down.
    MemberDown(GossipId),
    /// A member came back with a new identity (a restart: new generation).
    Restarted {
        /// The identity it had.
        old: GossipId,
        /// The identity it has.
        new: GossipId,
    },
    /// This node was declared Down by the others and rejoined under a new generation;
    /// persist it ([`GenerationStore::observed`](crate::GenerationStore::observed)) so the
    /// next start goes above it.
    Rejoined(GossipId),
    /// A node's catalog record changed.
    CatalogChanged {
        /// Whose record.
        node: String,
        /// Its new `(generation, version)`.
        stamp: (u64, u64),
    },
}

/// A member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// Its identity.
    pub id: GossipId,
    /// Whether it is active (false once foca declared it Down; a suspected member is still
    /// active).
    pub up: bool,
    /// Active but suspected: a probe of it failed, directly and through other members, and
    /// it has not refuted that yet (SWIM's Suspect state).
    pub suspected: bool,
}

/// Why the gossip node could not start or act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GossipError {
    /// The gossip protocol could not be registered on the endpoint.
    #[error("cannot listen for gossip: {0}")]
    Listen(String),
    /// The node's task has stopped.
    #[error("the gossip node is stopped")]
    Stopped,
}

/// Settings of one node's gossip.
#[derive(Debug, Clone)]
pub struct GossipSettings {
    /// This node's identity (with this start's generation).
    pub id: GossipId,
    /// Nodes to announce to when joining or when no member is left.
    pub seeds: Vec<(String, SocketAddr)>,
    /// Tuning.
    pub config: GossipConfig,
    /// Seed of foca's random choices (use a random one outside tests).
    pub rng_seed: u64,
}

#[derive(Serialize, Deserialize)]
enum Rpc {
    /// Send me these nodes' records.
    Pull(Vec<String>),
    /// My digest and member count: send what I lack (and your members if our counts
    /// differ), and list what you lack.
    Digest { digest: Digest, members: usize },
    /// Records you said you lacked.
    Push(Vec<NodeRecord>),
    /// My membership (the second half of a push-pull).
    Members(Vec<Member<GossipId>>),
    /// A sync round's first message: the catalog's fingerprint and the member count; the
    /// answer says whether they match (then nothing more is sent).
    Fingerprint { fingerprint: u64, members: usize },
}

#[derive(Serialize, Deserialize, Default)]
struct DigestReply {
    records: Vec<NodeRecord>,
    need: Vec<String>,
    members: Option<Vec<Member<GossipId>>>,
}

enum Input {
    Data(Bytes),
    Publish {
        endpoints: Vec<ServiceEndpoint>,
        labels: BTreeMap<String, String>,
        done: oneshot::Sender<(u64, u64)>,
    },
    Members(Vec<Member<GossipId>>),
    MembershipFor(oneshot::Sender<(usize, Vec<Member<GossipId>>)>),
    Leave(oneshot::Sender<()>),
    Connection(Connection),
    Seeds(Vec<(String, SocketAddr)>),
}

enum Due {
    Foca(Timer<GossipId>),
    Sync,
    Reannounce,
}

struct Scheduled {
    at: Instant,
    seq: u64,
    due: Due,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// A running gossip member.
pub struct GossipNode {
    tx: mpsc::Sender<Input>,
    shared: SharedCatalog,
    events: broadcast::Sender<GossipEvent>,
    members: Arc<Mutex<BTreeMap<SocketAddr, MemberView>>>,
    id: GossipId,
    /// The driver task and the accept loop (which owns the ALPN listener); taken when they
    /// are awaited after a halt.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for GossipNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

struct Ctx {
    endpoint: Endpoint,
    protocol: Protocol,
    shared: SharedCatalog,
    events: broadcast::Sender<GossipEvent>,
    tx: mpsc::Sender<Input>,
    /// Becomes true when the node stops: every task it spawned ends.
    shutdown: watch::Receiver<bool>,
    own: String,
}

impl Ctx {
    /// Runs `f` unless or until the node stops.
    async fn unless_stopped<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        let mut stop = self.shutdown.clone();
        tokio::select! {
            r = f => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        }
    }
}

/// The largest record accepted from a peer, encoded.
const MAX_RECORD_BYTES: usize = 64 * 1024;

impl GossipNode {
    /// Starts gossip on `endpoint` (which serves ALPN `starling/gossip/1` from now on) and
    /// announces to the seeds.
    pub async fn start(endpoint: Endpoint, settings: GossipSettings) -> Result<Self, GossipError> {
        let protocol = gossip_protocol().map_err(|e| GossipError::Listen(e.to_string()))?;
        let mut listener = endpoint
            .listen(&protocol)
            .map_err(|e| GossipError::Listen(e.to_string()))?;
        let (tx, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(4096);
        let shared = SharedCatalog::default();
        shared.lock().merge(NodeRecord::empty(
            settings.id.node.clone(),
            settings.id.generation,
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let ctx = Arc::new(Ctx {
            endpoint,
            protocol,
            shared: shared.clone(),
            events: events.clone(),
            tx: tx.clone(),
            shutdown: shutdown_rx,
            own: settings.id.node.clone(),
        });
        let members = Arc::new(Mutex::new(BTreeMap::new()));
        let accept_tx = tx.clone();
        let listener = tokio::spawn(async move {
            while let Some(conn) = listener.accept().await {
                if accept_tx.send(Input::Connection(conn)).await.is_err() {
                    break;
                }
            }
        });
        let id = settings.id.clone();
        let task = tokio::spawn(run(ctx, settings, rx, members.clone()));
        Ok(GossipNode {
            tx,
            shared,
            events,
            members,
            id,
            tasks: Mutex::new(vec![task, listener]),
            shutdown,
        })
    }

    /// This node's identity.
    pub fn id(&self) -> &GossipId {
        &self.id
    }

    /// Publishes this node's endpoints and labels (its record's version goes up); returns
    /// the new `(generation, version)`.
    pub async fn publish(
        &self,
        endpoints: Vec<ServiceEndpoint>,
        labels: BTreeMap<String, String>,
    ) -> Result<(u64, u64), GossipError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Input::Publish {
                endpoints,
                labels,
                done,
            })
            .await
            .map_err(|_| GossipError::Stopped)?;
        rx.await.map_err(|_| GossipError::Stopped)
    }

    /// Adds nodes to announce to when this one is alone (joining, or every member lost):
    /// for a node that learns of peers after it started, such as a cluster's first manager
    /// restarted. Known seeds are ignored; if this node has no member, it announces to the
    /// new ones at once.
    pub async fn add_seeds(&self, seeds: Vec<(String, SocketAddr)>) -> Result<(), GossipError> {
        self.tx
            .send(Input::Seeds(seeds))
            .await
            .map_err(|_| GossipError::Stopped)
    }

    /// Membership and catalog events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<GossipEvent> {
        self.events.subscribe()
    }

    /// Every member this node knows, with its state.
    pub fn members(&self) -> Vec<MemberView> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The catalog.
    pub fn catalog(&self) -> crate::catalog::Catalog {
        self.shared.lock().clone()
    }

    /// Service name → endpoints on live nodes: this one and the members foca reports
    /// active (a node never seen alive, such as one already Down when this node joined, is
    /// not listed).
    pub fn services(&self) -> BTreeMap<String, Vec<(String, ServiceEndpoint)>> {
        let up: std::collections::BTreeSet<String> = self
            .members()
            .into_iter()
            .filter(|m| m.up)
            .map(|m| m.id.node)
            .chain([self.id.node.clone()])
            .collect();
        let mut all = self.shared.lock().services();
        for list in all.values_mut() {
            list.retain(|(node, _)| up.contains(node));
        }
        all.retain(|_, l| !l.is_empty());
        all
    }

    /// Leaves gracefully: tells the members this node is going, lingers so the news
    /// spreads, then stops.
    pub async fn leave(self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Input::Leave(done)).await.is_ok() {
            let _ = rx.await;
        }
        self.halt();
    }

    /// Like [`GossipNode::leave`] through a shared handle: announces the departure, lingers,
    /// and stops gossiping (the handle stays, inert).
    pub async fn leave_shared(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Input::Leave(done)).await.is_ok() {
            let _ = rx.await;
        }
        self.halt();
    }

    /// Stops at once, telling nobody (as a crash would).
    pub fn stop(self) {
        self.halt();
    }

    /// Stops at once through a shared handle, telling nobody (a restart follows). Returns
    /// once the driver and its listener are gone, so the gossip ALPN is free to listen on
    /// again on the same endpoint.
    pub async fn halt_shared(&self) {
        self.halt();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            // Aborted: the error says so, and is the expected outcome.
            let _ = t.await;
        }
    }

    fn halt(&self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

impl Drop for GossipNode {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn request<T: for<'de> Deserialize<'de>>(ctx: &Ctx, to: &GossipId, rpc: &Rpc) -> Option<T> {
    let node = NodeId::new(to.node.clone()).ok()?;
    let body = postcard::to_stdvec(rpc).ok()?;
    let reply = ctx
        .unless_stopped(ctx.endpoint.request(&ctx.protocol, &node, to.addr, &body))
        .await?
        .map_err(|e| debug!(peer = %to.node, error = %e, "gossip request failed"))
        .ok()?;
    postcard::from_bytes(reply.as_bytes()).ok()
}

/// Merges records from peers. This node's own record is never taken from a peer, and
/// oversized records are dropped.
fn merge_records(ctx: &Ctx, records: Vec<NodeRecord>) {
    let records = records.into_iter().filter(|r| {
        r.node != ctx.own
            && postcard::experimental::serialized_size(r).is_ok_and(|n| n <= MAX_RECORD_BYTES)
    });
    merge_checked(ctx, records);
}

fn merge_checked(ctx: &Ctx, records: impl Iterator<Item = NodeRecord>) {
    let mut changed = Vec::new();
    {
        let mut c = ctx.shared.lock();
        for r in records {
            let stamp = r.stamp();
            let node = r.node.clone();
            if c.merge(r) {
                changed.push((node, stamp));
            }
        }
    }
    for (node, stamp) in changed {
        let _ = ctx.events.send(GossipEvent::CatalogChanged { node, stamp });
    }
}

/// Serves a peer's requests and reads its datagrams.
fn serve_connection(ctx: Arc<Ctx>, conn: Connection) {
    let dg = conn.clone();
    let tx = ctx.tx.clone();
    let stop_dg = ctx.clone();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = stop_dg.unless_stopped(dg.read_datagram()).await {
            if tx
                .send(Input::Data(Bytes::copy_from_slice(frame.as_bytes())))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(Ok(Inbound::Request(req))) = ctx.unless_stopped(conn.accept()).await {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let Ok(rpc) = postcard::from_bytes::<Rpc>(req.body().as_bytes()) else {
                    req.refuse(starling_transport::StreamCode::UNDECODABLE);
                    return;
                };
                let reply: Vec<u8> = match rpc {
                    Rpc::Pull(nodes) => {
                        postcard::to_stdvec(&ctx.shared.lock().records(&nodes)).unwrap_or_default()
                    }
                    Rpc::Digest { digest, members } => {
                        let mut reply = {
                            let c = ctx.shared.lock();
                            DigestReply {
                                records: c.newer_than(&digest),
                                need: c.lacking(&digest),
                                members: None,
                            }
                        };
                        let (tx, rx) = oneshot::channel();
                        if ctx.tx.send(Input::MembershipFor(tx)).await.is_ok()
                            && let Ok((count, mine)) = rx.await
                            && count != members
                        {
                            reply.members = Some(mine);
                        }
                        postcard::to_stdvec(&reply).unwrap_or_default()
                    }
                    Rpc::Push(records) => {
                        merge_records(&ctx, records);
                        Vec::new()
                    }
                    Rpc::Members(members) => {
                        let _ = ctx.tx.send(Input::Members(members)).await;
                        Vec::new()
                    }
                    Rpc::Fingerprint {
                        fingerprint,
                        members,
                    } => {
                        let mine = ctx.shared.lock().fingerprint();
                        let (tx, rx) = oneshot::channel();
                        let count = if ctx.tx.send(Input::MembershipFor(tx)).await.is_ok() {
                            rx.await.map(|(c, _)| c).ok()
                        } else {
                            None
                        };
                        let in_sync = mine == fingerprint && count == Some(members);
                        postcard::to_stdvec(&in_sync).unwrap_or_default()
                    }
                };
                let _ = req.respond(&reply).await;
            });
        }
    });
}

struct State {
    foca: Foca<GossipId, PostcardCodec, StdRng, NoticeHandler>,
    runtime: AccumulatingRuntime<GossipId>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    rng: StdRng,
    settings: GossipSettings,
    idle_backoff: Duration,
    /// Whether a re-announce chain is already scheduled.
    reannouncing: bool,
}

impl State {
    fn schedule(&mut self, after: Duration, due: Due) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: Instant::now() + after,
            seq: self.seq,
            due,
        });
    }

    /// Active members and this node (under its current identity), for a push-pull: Down
    /// members are left out so a peer that already forgot them does not resurrect them.
    fn membership(&self) -> (usize, Vec<Member<GossipId>>) {
        let mut v: Vec<Member<GossipId>> = self.foca.iter_members().cloned().collect();
        v.push(Member::alive(self.settings.id.clone()));
        (self.foca.num_members(), v)
    }
}

async fn run(
    ctx: Arc<Ctx>,
    settings: GossipSettings,
    mut rx: mpsc::Receiver<Input>,
    members: Arc<Mutex<BTreeMap<SocketAddr, MemberView>>>,
) {
    let foca = Foca::with_custom_broadcast(
        settings.id.clone(),
        settings.config.foca_config(settings.seeds.len() + 1),
        StdRng::seed_from_u64(settings.rng_seed),
        PostcardCodec,
        NoticeHandler::new(ctx.shared.clone(), settings.id.node.clone()),
    );
    let mut st = State {
        foca,
        runtime: AccumulatingRuntime::new(),
        queue: BinaryHeap::new(),
        seq: 0,
        rng: StdRng::seed_from_u64(settings.rng_seed ^ 0x5eed),
        idle_backoff: settings.config.reannounce_min,
        settings,
        reannouncing: true,
    };
    announce(&mut st);
    // Until a seed answers, keep announcing (with backoff): foca reports Idle only after
    // having been connected once.
    let first = st.settings.config.reannounce_min;
    st.schedule(first, Due::Reannounce);
    // Tell the cluster this generation's (empty) record exists, so peers holding an older
    // generation's endpoints drop them without waiting for a digest exchange.
    let id = st.settings.id.clone();
    let notice = VersionNotice {
        node: id.node.clone(),
        generation: id.generation,
        version: 0,
    };
    let _ = st.foca.add_broadcast(&encode_notice(&notice));
    let sync = st.settings.config.sync_interval;
    st.schedule(sync, Due::Sync);
    loop {
        let next = st.queue.peek().map(|s| s.at);
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else { break };
                match input {
                    Input::Data(data) => {
                        if let Err(e) = st.foca.handle_data(&data, &mut st.runtime) {
                            debug!(error = %e, "gossip packet refused");
                        }
                    }
                    Input::Publish { endpoints, labels, done } => {
                        let stamp = publish(&ctx, &mut st, endpoints, labels);
                        let _ = done.send(stamp);
                    }
                    Input::Members(m) => {
                        if let Err(e) = st.foca.apply_many(m.into_iter(), false, &mut st.runtime) {
                            warn!(error = %e, "membership from a peer not applied");
                        }
                    }
                    Input::MembershipFor(tx) => {
                        let _ = tx.send(st.membership());
                    }
                    Input::Connection(conn) => serve_connection(ctx.clone(), conn),
                    Input::Seeds(seeds) => {
                        let mut added = false;
                        for seed in seeds {
                            if seed.0 != st.settings.id.node && !st.settings.seeds.contains(&seed) {
                                st.settings.seeds.push(seed);
                                added = true;
                            }
                        }
                        // Alone and newly told where others are: announce now rather than
                        // at the next (backed-off) re-announcement.
                        if added && st.foca.num_members() == 0 {
                            announce(&mut st);
                        }
                    }
                    Input::Leave(done) => {
                        // Announce the departure, then keep gossiping it while lingering:
                        // one round to three members could be lost.
                        let _ = st.foca.leave_cluster(&mut st.runtime);
                        drain(&ctx, &mut st, &members);
                        let until = Instant::now() + st.settings.config.leave_linger;
                        while Instant::now() < until {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let _ = st.foca.gossip(&mut st.runtime);
                            drain(&ctx, &mut st, &members);
                        }
                        let _ = done.send(());
                        return;
                    }
                }
            }
            _ = sleep_until(next) => {
                let now = Instant::now();
                // Every timer that is due, in order: foca requires all of them, in order.
                while st.queue.peek().is_some_and(|s| s.at <= now) {
                    let Some(s) = st.queue.pop() else { break };
                    match s.due {
                        Due::Foca(t) => {
                            if let Err(e) = st.foca.handle_timer(t, &mut st.runtime) {
                                warn!(error = %e, "gossip timer failed");
                            }
                        }
                        Due::Sync => {
                            st.schedule(sync, Due::Sync);
                            start_sync(&ctx, &mut st);
                        }
                        Due::Reannounce => {
                            if st.foca.num_members() == 0 {
                                announce(&mut st);
                                st.idle_backoff = (st.idle_backoff * 2).min(st.settings.config.reannounce_max);
                                let b = st.idle_backoff;
                                st.schedule(b, Due::Reannounce);
                            } else {
                                st.reannouncing = false;
                            }
                        }
                    }
                }
            }
        }
        drain(&ctx, &mut st, &members);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn announce(st: &mut State) {
    let seeds: Vec<(String, SocketAddr)> = st
        .settings
        .seeds
        .iter()
        .filter(|(n, _)| *n != st.settings.id.node)
        .cloned()
        .collect();
    for (node, addr) in seeds {
        let _ = st
            .foca
            .announce(GossipId::new(node, addr, 0), &mut st.runtime);
    }
}

/// After a rejoin under `new`: this node's record moves to the new generation and is
/// announced, so peers drop what the old identity published.
fn rejoined(ctx: &Arc<Ctx>, st: &mut State, new: &GossipId) {
    let mut rec = ctx
        .shared
        .lock()
        .record(&new.node)
        .cloned()
        .unwrap_or_else(|| NodeRecord::empty(new.node.clone(), new.generation));
    rec.generation = new.generation;
    rec.version = 0;
    let endpoints = std::mem::take(&mut rec.endpoints);
    let labels = std::mem::take(&mut rec.labels);
    merge_checked(ctx, std::iter::once(rec));
    publish(ctx, st, endpoints, labels);
}

fn publish(
    ctx: &Arc<Ctx>,
    st: &mut State,
    endpoints: Vec<ServiceEndpoint>,
    labels: BTreeMap<String, String>,
) -> (u64, u64) {
    let id = &st.settings.id;
    let mut rec = ctx
        .shared
        .lock()
        .record(&id.node)
        .cloned()
        .unwrap_or_else(|| NodeRecord::empty(id.node.clone(), id.generation));
    rec.version += 1;
    rec.endpoints = endpoints;
    rec.labels = labels;
    let notice = VersionNotice {
        node: rec.node.clone(),
        generation: rec.generation,
        version: rec.version,
    };
    let stamp = rec.stamp();
    merge_checked(ctx, std::iter::once(rec));
    if let Err(e) = st.foca.add_broadcast(&encode_notice(&notice)) {
        warn!(error = %e, "version notice not queued");
    }
    let _ = st.foca.broadcast(&mut st.runtime);
    stamp
}

/// One anti-entropy round with a random member: digests both ways, membership push-pull
/// when the member counts differ.
fn start_sync(ctx: &Arc<Ctx>, st: &mut State) {
    let members: Vec<GossipId> = st.foca.iter_members().map(|m| m.id().clone()).collect();
    if members.is_empty() {
        return;
    }
    let peer = members[st.rng.random_range(0..members.len())].clone();
    let (digest, fingerprint) = {
        let c = ctx.shared.lock();
        (c.digest(), c.fingerprint())
    };
    let count = st.foca.num_members();
    let (_, mine) = st.membership();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        // Most rounds end here: same catalog, same member count.
        let probe = Rpc::Fingerprint {
            fingerprint,
            members: count,
        };
        if request::<bool>(&ctx, &peer, &probe).await != Some(false) {
            return;
        }
        let rpc = Rpc::Digest {
            digest,
            members: count,
        };
        let Some(reply) = request::<DigestReply>(&ctx, &peer, &rpc).await else {
            return;
        };
        merge_records(&ctx, reply.records);
        if let Some(m) = reply.members {
            let _ = ctx.tx.send(Input::Members(m)).await;
            let _ = request::<()>(&ctx, &peer, &Rpc::Members(mine)).await;
        }
        if !reply.need.is_empty() {
            let back = ctx.shared.lock().records(&reply.need);
            let _ = request::<()>(&ctx, &peer, &Rpc::Push(back)).await;
        }
    });
}

fn drain(ctx: &Arc<Ctx>, st: &mut State, members: &Arc<Mutex<BTreeMap<SocketAddr, MemberView>>>) {
    while let Some((dst, data)) = st.runtime.to_send() {
        // Each direction uses the connection its sender dialed: what this node sends goes
        // on its pooled connection, what peers send arrives on theirs, through the listener.
        let ctx2 = ctx.clone();
        tokio::spawn(async move {
            let Ok(node) = NodeId::new(dst.node.clone()) else {
                return;
            };
            let dial = ctx2.endpoint.connection(&ctx2.protocol, &node, dst.addr);
            match ctx2.unless_stopped(dial).await {
                Some(Ok(conn)) => {
                    if let Err(e) = conn.send_datagram(&data) {
                        debug!(peer = %dst.node, error = %e, "gossip datagram not sent");
                    }
                }
                Some(Err(e)) => debug!(peer = %dst.node, error = %e, "gossip peer unreachable"),
                None => {}
            }
        });
    }
    while let Some((after, timer)) = st.runtime.to_schedule() {
        st.schedule(after, Due::Foca(timer));
    }
    let mut retune = false;
    while let Some(n) = st.runtime.to_notify() {
        let mut view = members.lock().unwrap_or_else(|p| p.into_inner());
        // News about an older identity at an address never overrides a newer one.
        let stale = |view: &BTreeMap<SocketAddr, MemberView>, id: &GossipId| {
            view.get(&id.addr)
                .is_some_and(|m| m.id.generation > id.generation)
        };
        let event = match n {
            OwnedNotification::MemberUp(id) if !stale(&view, &id) => {
                ctx.shared.lock().mark_up(&id.node, id.generation);
                view.insert(
                    id.addr,
                    MemberView {
                        id: id.clone(),
                        up: true,
                        suspected: false,
                    },
                );
                retune = true;
                Some(GossipEvent::MemberUp(id))
            }
            OwnedNotification::MemberDown(id) if !stale(&view, &id) => {
                ctx.shared.lock().mark_down(&id.node, id.generation);
                view.insert(
                    id.addr,
                    MemberView {
                        id: id.clone(),
                        up: false,
                        suspected: false,
                    },
                );
                retune = true;
                Some(GossipEvent::MemberDown(id))
            }
            OwnedNotification::Rename(old, new) => {
                ctx.shared.lock().mark_up(&new.node, new.generation);
                view.insert(
                    new.addr,
                    MemberView {
                        id: new.clone(),
                        up: true,
                        suspected: false,
                    },
                );
                Some(GossipEvent::Restarted { old, new })
            }
            OwnedNotification::Rejoin(new) => {
                drop(view);
                st.settings.id = new.clone();
                rejoined(ctx, st, &new);
                Some(GossipEvent::Rejoined(new))
            }
            OwnedNotification::Idle => {
                drop(view);
                if !st.reannouncing {
                    st.reannouncing = true;
                    let b = st.idle_backoff;
                    st.schedule(b, Due::Reannounce);
                }
                None
            }
            OwnedNotification::Active => {
                st.idle_backoff = st.settings.config.reannounce_min;
                None
            }
            _ => None,
        };
        if let Some(e) = event {
            let _ = ctx.events.send(e);
        }
    }
    // Suspicion comes and goes without a notification: read from foca after every step.
    {
        let suspects: std::collections::BTreeSet<&SocketAddr> = st
            .foca
            .iter_members()
            .filter(|m| m.state() == foca::State::Suspect)
            .map(|m| &m.id().addr)
            .collect();
        let mut view = members.lock().unwrap_or_else(|p| p.into_inner());
        for (addr, m) in view.iter_mut() {
            m.suspected = m.up && suspects.contains(addr);
        }
    }
    if retune {
        let cfg = st.settings.config.foca_config(st.foca.num_members() + 1);
        if let Err(e) = st.foca.set_config(cfg) {
            warn!(error = %e, "gossip configuration not re-tuned");
        }
    }
    // Pull records whose notices arrived: from the relay, or the origin if the relay lacks
    // them.
    for want in ctx.shared.take_wants() {
        let ctx = ctx.clone();
        let origin = st
            .foca
            .iter_members()
            .map(|m| m.id().clone())
            .find(|m| m.node == want.notice.node);
        tokio::spawn(async move {
            let nodes = vec![want.notice.node.clone()];
            for peer in [want.from, origin].into_iter().flatten() {
                if let Some(records) =
                    request::<Vec<NodeRecord>>(&ctx, &peer, &Rpc::Pull(nodes.clone())).await
                {
                    // Only what was asked for.
                    let asked = records.into_iter().filter(|r| nodes.contains(&r.node));
                    merge_records(&ctx, asked.collect());
                }
                if !ctx.shared.lock().wants(&want.notice) {
                    break;
                }
            }
        });
    }
}
