//! The tokio driver: one task owns the [`GossipCore`] and feeds it what arrives (QUIC
//! datagrams and requests on ALPN `starling/gossip/3`, answers, its timers on tokio's
//! clock); what the core asks to send goes out on the endpoint's pooled connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use starling_transport::{Connection, Endpoint, Inbound, NodeId, PeerPolicy, Protocol};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::debug;

use crate::catalog::{ServiceEndpoint, SharedCatalog};
use crate::core::{GossipCore, GossipEvent, GossipSettings, MemberView, Transmit};
use crate::identity::GossipId;

/// The ALPN of the gossip protocol.
pub const GOSSIP_ALPN: &[u8] = b"starling/gossip/3";

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

enum Input {
    Data(Bytes),
    Request {
        body: Bytes,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    Response {
        id: u64,
        answer: Option<Vec<u8>>,
    },
    Publish {
        endpoints: Vec<ServiceEndpoint>,
        labels: BTreeMap<String, String>,
        done: oneshot::Sender<(u64, u64)>,
    },
    Leave(oneshot::Sender<()>),
    Connection(Connection),
    Seeds(Vec<(String, SocketAddr)>),
}

/// A running gossip member.
pub struct GossipNode {
    tx: mpsc::Sender<Input>,
    shared: SharedCatalog,
    events: broadcast::Sender<GossipEvent>,
    members: Arc<Mutex<BTreeMap<SocketAddr, MemberView>>>,
    /// Whether the core has synced its catalog with a peer since the start.
    synced: Arc<std::sync::atomic::AtomicBool>,
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

impl GossipNode {
    /// Starts gossip on `endpoint` (which serves ALPN `starling/gossip/3` from now on) and
    /// announces to the seeds.
    pub async fn start(endpoint: Endpoint, settings: GossipSettings) -> Result<Self, GossipError> {
        let protocol = gossip_protocol().map_err(|e| GossipError::Listen(e.to_string()))?;
        let mut listener = endpoint
            .listen(&protocol)
            .map_err(|e| GossipError::Listen(e.to_string()))?;
        let (tx, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(4096);
        let id = settings.id.clone();
        let core = GossipCore::new(settings, std::time::Instant::now());
        let shared = core.catalog().clone();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let synced = Arc::new(std::sync::atomic::AtomicBool::new(core.is_synced()));
        let ctx = Arc::new(Ctx {
            endpoint,
            protocol,
            events: events.clone(),
            tx: tx.clone(),
            shutdown: shutdown_rx,
            synced: synced.clone(),
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
        let task = tokio::spawn(run(ctx, core, rx, members.clone()));
        Ok(GossipNode {
            tx,
            shared,
            events,
            members,
            synced,
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

    /// Service name → endpoints on live nodes: this one and the members SWIM reports
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

    /// The endpoints of `service` on nodes that are up (this one included), each with its
    /// node and whether gossip suspects that node.
    pub fn endpoints(&self, service: &str) -> Vec<(String, ServiceEndpoint, bool)> {
        let members = self.members();
        let state = |node: &str| -> Option<bool> {
            if node == self.id.node {
                return Some(false);
            }
            members
                .iter()
                .find(|m| m.id.node == node && m.up)
                .map(|m| m.suspected)
        };
        let all = self.shared.lock().services();
        all.get(service)
            .into_iter()
            .flatten()
            .filter_map(|(node, e)| Some((node.clone(), e.clone(), state(node)?)))
            .collect()
    }

    /// What this node's DNS answers from now: the healthy endpoints of nodes that are up
    /// and not suspected (a suspected or Down node's endpoints are hidden, not deleted: they
    /// come back as soon as it is alive again), and the live nodes' addresses by id and by
    /// host name (the `hostname` label of their record).
    pub fn dns_view(&self, ttl: u32) -> crate::dns::DnsView {
        let live: BTreeMap<String, std::net::IpAddr> = self
            .members()
            .into_iter()
            .filter(|m| m.up && !m.suspected)
            .map(|m| (m.id.node, m.id.addr.ip()))
            .chain([(self.id.node.clone(), self.id.addr.ip())])
            .collect();
        let catalog = self.shared.lock();
        let mut services = BTreeMap::new();
        for (svc, list) in catalog.services() {
            let healthy: Vec<(String, ServiceEndpoint)> = list
                .into_iter()
                .filter(|(node, e)| {
                    live.contains_key(node) && e.health == crate::catalog::Health::Healthy
                })
                .collect();
            if !healthy.is_empty() {
                services.insert(svc.to_ascii_lowercase(), healthy);
            }
        }
        let mut nodes = BTreeMap::new();
        for (node, ip) in &live {
            nodes.insert(node.to_ascii_lowercase(), *ip);
            if let Some(host) = catalog.record(node).and_then(|r| r.labels.get("hostname")) {
                nodes.insert(host.to_ascii_lowercase(), *ip);
            }
        }
        crate::dns::DnsView {
            services,
            nodes,
            ttl,
            syncing: !self.synced.load(std::sync::atomic::Ordering::Relaxed),
        }
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

struct Ctx {
    endpoint: Endpoint,
    protocol: Protocol,
    events: broadcast::Sender<GossipEvent>,
    tx: mpsc::Sender<Input>,
    /// Becomes true when the node stops: every task it spawned ends.
    shutdown: watch::Receiver<bool>,
    /// The core's [`GossipCore::is_synced`], for readers outside the driver.
    synced: Arc<std::sync::atomic::AtomicBool>,
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

/// Reads a peer's datagrams and hands its requests to the core (which answers them).
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
                let (reply, answer) = oneshot::channel();
                let body = Bytes::copy_from_slice(req.body().as_bytes());
                if ctx.tx.send(Input::Request { body, reply }).await.is_err() {
                    return;
                }
                match answer.await {
                    Ok(Some(bytes)) => {
                        let _ = req.respond(&bytes).await;
                    }
                    Ok(None) => req.refuse(starling_transport::StreamCode::UNDECODABLE),
                    Err(_) => {}
                }
            });
        }
    });
}

async fn run(
    ctx: Arc<Ctx>,
    mut core: GossipCore,
    mut rx: mpsc::Receiver<Input>,
    members: Arc<Mutex<BTreeMap<SocketAddr, MemberView>>>,
) {
    let mut leaving: Option<oneshot::Sender<()>> = None;
    let mut published = None;
    loop {
        flush(&ctx, &mut core, &members, &mut published);
        if core.is_closed() {
            if let Some(done) = leaving.take() {
                let _ = done.send(());
            }
            return;
        }
        let next = core.poll_timeout();
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else { break };
                let now = std::time::Instant::now();
                match input {
                    Input::Data(data) => core.handle_datagram(now, &data),
                    Input::Request { body, reply } => {
                        let _ = reply.send(core.handle_request(now, &body));
                    }
                    Input::Response { id, answer } => {
                        core.handle_response(now, id, answer.as_deref());
                    }
                    Input::Publish { endpoints, labels, done } => {
                        let _ = done.send(core.publish(now, endpoints, labels));
                    }
                    Input::Connection(conn) => serve_connection(ctx.clone(), conn),
                    Input::Seeds(seeds) => core.add_seeds(now, seeds),
                    Input::Leave(done) => {
                        core.leave(now);
                        leaving = Some(done);
                    }
                }
            }
            _ = sleep_until(next) => core.handle_timeout(std::time::Instant::now()),
        }
    }
}

async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Sends what the core asked for, publishes its events and its member view.
fn flush(
    ctx: &Arc<Ctx>,
    core: &mut GossipCore,
    members: &Arc<Mutex<BTreeMap<SocketAddr, MemberView>>>,
    published: &mut Option<u64>,
) {
    while let Some(t) = core.poll_transmit() {
        let ctx = ctx.clone();
        match t {
            // Each direction uses the connection its sender dialed: what this node sends
            // goes on its pooled connection, what peers send arrives on theirs.
            Transmit::Datagram { to, bytes } => {
                tokio::spawn(async move {
                    let Ok(node) = NodeId::new(to.node.clone()) else {
                        return;
                    };
                    let dial = ctx.endpoint.connection(&ctx.protocol, &node, to.addr);
                    match ctx.unless_stopped(dial).await {
                        Some(Ok(conn)) => {
                            if let Err(e) = conn.send_datagram(&bytes) {
                                debug!(peer = %to.node, error = %e, "gossip datagram not sent");
                            }
                        }
                        Some(Err(e)) => {
                            debug!(peer = %to.node, error = %e, "gossip peer unreachable")
                        }
                        None => {}
                    }
                });
            }
            Transmit::Request { id, to, body, .. } => {
                tokio::spawn(async move {
                    let answer = request(&ctx, &to, &body).await;
                    let _ = ctx.tx.send(Input::Response { id, answer }).await;
                });
            }
        }
    }
    while let Some(e) = core.poll_event() {
        let _ = ctx.events.send(e);
    }
    ctx.synced
        .store(core.is_synced(), std::sync::atomic::Ordering::Relaxed);
    // The view is copied only when it changed (O(members) per copy, not per input).
    if *published != Some(core.members_version()) {
        *published = Some(core.members_version());
        *members.lock().unwrap_or_else(|p| p.into_inner()) = core.members();
    }
}

async fn request(ctx: &Ctx, to: &GossipId, body: &[u8]) -> Option<Vec<u8>> {
    let node = NodeId::new(to.node.clone()).ok()?;
    let reply = ctx
        .unless_stopped(ctx.endpoint.request(&ctx.protocol, &node, to.addr, body))
        .await?
        .map_err(|e| debug!(peer = %to.node, error = %e, "gossip request failed"))
        .ok()?;
    Some(reply.as_bytes().to_vec())
}
