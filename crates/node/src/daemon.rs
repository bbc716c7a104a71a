//! A running manager: its endpoint, Raft store, gossip and control socket.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use starling_api::dispatch::NodeDirective;
use starling_gossip::{
    FileGeneration, GenerationStore, GossipConfig, GossipId, GossipNode, GossipSettings,
};
use starling_raft_store::{
    Availability, ClusterInfo, Command, ManagerNode, NodeRecord, NodeRole, NodeStatus, Settings,
    Store, StoreConfig,
};
use starling_transport::{
    CertOptions, ClusterCa, ClusterId, Endpoint, EndpointConfig, JoinSecret, NodeCredentials,
    NodeId, Role, ring_provider,
};
use tracing::{info, warn};

use crate::datadir::{DataDir, NodeState, random_id};

/// Log entries between a manager's snapshots, when the daemon's flags set it (by `main`,
/// before the node starts); otherwise [`StoreConfig`]'s default.
pub static SNAPSHOT_INTERVAL: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// The host ports tasks on this node may be given, when the daemon's flags set them.
pub static TASK_PORTS: std::sync::OnceLock<(u16, u16)> = std::sync::OnceLock::new();

/// Whether this node runs an agent (tasks), when the daemon's flags set it; default yes.
pub static RUN_TASKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Where the node's DNS server listens (`None`: off), when the daemon's flags set it;
/// default [`starling_gossip::dns::DEFAULT_LISTEN`].
pub static DNS_LISTEN: std::sync::OnceLock<Option<SocketAddr>> = std::sync::OnceLock::new();

/// What a node's gossip record carries besides its endpoints: the Starling it runs (`node
/// ls` shows it) and its host name (DNS answers `<hostname>.node.starling`).
fn node_labels(state: &NodeState) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            crate::api::nodes::VERSION_LABEL.to_owned(),
            starling_api::VERSION.to_owned(),
        ),
        ("hostname".to_owned(), state.hostname.clone()),
    ])
}

/// The node's DNS server, answering from its gossip state (see [`starling_gossip::dns`]):
/// on `--dns-listen` (default 127.0.0.1:8600). An address that cannot be bound (another
/// node on this host has it) is logged, and the node runs without DNS.
fn start_dns(gossip: Arc<GossipNode>) -> Option<tokio::task::JoinHandle<()>> {
    let addr = match DNS_LISTEN.get() {
        Some(None) => return None,
        Some(Some(a)) => *a,
        None => starling_gossip::dns::DEFAULT_LISTEN.parse().ok()?,
    };
    // In the background: the node's start (its control socket) does not wait for it.
    Some(tokio::spawn(serve_dns(addr, gossip)))
}

async fn serve_dns(addr: SocketAddr, gossip: Arc<GossipNode>) {
    // A restart of the node's components (a role change) binds again right after the
    // previous server let go.
    let mut tries = 0;
    let (udp, tcp) = loop {
        match starling_gossip::dns::bind(addr).await {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 10 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "DNS not served (--dns-listen ADDR or off)");
                return;
            }
        }
    };
    tracing::info!(%addr, "DNS served");
    let view: Arc<dyn Fn() -> starling_gossip::dns::DnsView + Send + Sync> =
        Arc::new(move || gossip.dns_view(starling_gossip::dns::DEFAULT_TTL));
    starling_gossip::dns::serve(udp, tcp, view, Arc::default()).await;
}

/// Options of `starling init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Data directory.
    pub data_dir: DataDir,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Address others reach this node at (default: `listen`).
    pub advertise: Option<SocketAddr>,
    /// Host name to report (default: the machine's).
    pub hostname: Option<String>,
    /// Lifetime of node certificates (default 90 days).
    pub cert_expiry: Option<std::time::Duration>,
}

/// Everything a running node holds.
pub struct RunningNode {
    /// Its identity file.
    pub state: NodeState,
    /// The replicated store (managers only).
    pub store: Option<Arc<Store>>,
    /// Gossip.
    pub gossip: Arc<GossipNode>,
    /// The QUIC endpoint.
    pub endpoint: Endpoint,
    /// The data directory.
    pub data_dir: DataDir,
    /// Notified when the node should stop (after `leave`).
    pub stop: Arc<tokio::sync::Notify>,
    /// Counters for `--metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Background tasks of this role (join server, liveness), ended by `stop_components`.
    pub tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// A manager's remote API listener (`starling/api/1`), until [`RunningNode::serve_api`]
    /// takes it.
    pub api_listener: std::sync::Mutex<Option<starling_transport::Listener>>,
    /// What the managers want of this node (its role), as its dispatcher session tells it;
    /// `None` when the node runs no agent.
    pub directive: Option<tokio::sync::watch::Receiver<Option<NodeDirective>>>,
}

impl RunningNode {
    /// Serves the remote `api` on a manager (a task of this role, stopped with
    /// it); nothing on a worker.
    pub fn serve_api(&self, api: crate::api::Api) {
        let listener = self
            .api_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(listener), Some(store)) = (listener, self.store.clone()) {
            let task = tokio::spawn(crate::api::serve_quic(listener, api, store));
            self.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(task);
        }
    }

    /// Stops what this role runs (store, gossip, background tasks), keeping the endpoint:
    /// before a role change, or at shutdown.
    pub async fn stop_components(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
            // Awaited so that what the task owns (the join listener's ALPN) is released
            // before the next role listens on the same endpoint.
            let _ = t.await;
        }
        if let Some(store) = &self.store {
            let _ = store.shutdown().await;
        }
        self.gossip.halt_shared().await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn bind(
    dir: &DataDir,
    listen: SocketAddr,
    creds: Option<NodeCredentials>,
) -> anyhow::Result<Endpoint> {
    let cfg = EndpointConfig {
        listen,
        reset_key: Some(dir.reset_key()?),
        ..EndpointConfig::default()
    };
    let endpoint = Endpoint::bind(cfg, ring_provider(), creds)
        .with_context(|| format!("cannot listen on {listen}"))?;
    crate::busy_poll::watch(&endpoint);
    Ok(endpoint)
}

/// Creates a new cluster with this node as its first manager, and runs it.
pub async fn init(opts: InitOptions) -> anyhow::Result<RunningNode> {
    let dir = opts.data_dir.clone();
    if dir.is_initialised() {
        anyhow::bail!(
            "{} already holds a node (use `starling run --data-dir {}`)",
            dir.0.display(),
            dir.0.display()
        );
    }
    let settings = Settings {
        cert_lifetime_secs: opts
            .cert_expiry
            .map_or(Settings::default().cert_lifetime_secs, |d| d.as_secs()),
        ..Settings::default()
    };
    crate::api::cluster::check_cert_expiry(settings.cert_lifetime_secs)
        .map_err(|e| anyhow::anyhow!("--cert-expiry: {e}"))?;
    dir.create()
        .with_context(|| format!("cannot create {}", dir.0.display()))?;
    let cluster_id = random_id()?;
    let node_id = random_id()?;
    // The CA lives in the replicated state only (every manager can sign; a root rotation
    // forgets the old key everywhere): never in a file.
    let ca = ClusterCa::create(ClusterId::new(cluster_id.clone())?)?;
    let creds = ca.issue(
        &NodeId::new(node_id.clone())?,
        &Role::MANAGER,
        &CertOptions {
            lifetime: std::time::Duration::from_secs(settings.cert_lifetime_secs),
            ..CertOptions::default()
        },
    )?;
    creds.save(&dir.0)?;
    let cert_key = starling_transport::key_digest(creds.certificate())?;
    let advertise = opts.advertise.unwrap_or(opts.listen);
    let state = NodeState {
        node_id: node_id.clone(),
        cluster_id: cluster_id.clone(),
        role: "manager".into(),
        raft_id: Some(1),
        listen: opts.listen,
        advertise,
        hostname: opts.hostname.unwrap_or_else(hostname),
        managers: vec![(node_id.clone(), advertise)],
    };
    let endpoint = bind(&dir, opts.listen, Some(creds.clone()))?;
    dir.save(&state)?;
    let manager = start_manager(dir, state, endpoint, creds).await?;
    let store = manager
        .store
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no store"))?;
    store.initialize().await?;
    let (ca_cert, ca_key) = ca.to_pem();
    let mut join_secrets = BTreeMap::new();
    for role in ["manager", "worker"] {
        join_secrets.insert(role.to_owned(), JoinSecret::generate()?.as_bytes().to_vec());
    }
    store
        .write(Command::SetCluster {
            info: ClusterInfo {
                cluster_id,
                ca_cert_pem: ca_cert,
                ca_key_pem: ca_key,
                join_secrets,
                settings,
                ..ClusterInfo::default()
            },
        })
        .await?;
    store
        .write(Command::UpsertNode {
            node: NodeRecord {
                id: node_id,
                hostname: manager.state.hostname.clone(),
                addr: advertise.to_string(),
                role: NodeRole::Manager,
                desired_role: NodeRole::Manager,
                availability: Availability::Active,
                status: NodeStatus::Ready,
                labels: BTreeMap::new(),
                cert_serial: manager
                    .endpoint
                    .identity()
                    .map(|i| i.serial.to_string())
                    .unwrap_or_default(),
                cert_not_after: manager
                    .endpoint
                    .identity()
                    .map_or(0, |i| crate::renewal::unix_secs(i.not_after)),
                cert_ca: ca.digest().to_string(),
                cert_key,
                version: 0,
                created_revision: 0,
                updated_revision: 0,
            },
        })
        .await?;
    info!(cluster = %manager.state.cluster_id, node = %manager.state.node_id, "cluster initialised");
    Ok(manager)
}

/// Restarts the node in `dir` (identity, certificate, log); with `force_new_cluster`, as the
/// single manager of its cluster (see [`force_new_cluster`]).
pub async fn run(dir: DataDir, force_new_cluster: bool) -> anyhow::Result<RunningNode> {
    if force_new_cluster {
        let lost = self::force_new_cluster(&dir).await?;
        let m = Box::pin(run(dir, false)).await?;
        if let Some(store) = m.store.clone() {
            let task = tokio::spawn(forget_lost_managers(store, lost));
            m.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        }
        return Ok(m);
    }
    let mut state = dir.load()?;
    let creds = NodeCredentials::load(&dir.0)?;
    if creds.identity().not_after > std::time::SystemTime::now() {
        let endpoint = bind(&dir, state.listen, Some(creds.clone()))?;
        return if state.role == "manager" {
            start_manager(dir, state, endpoint, creds).await
        } else {
            start_worker(dir, state, endpoint).await
        };
    }
    // The certificate expired while the node was off. The endpoint starts without one; a
    // manager renews its own from the CA in its state once its store is open, a worker asks
    // the managers on the expired-certificate path.
    info!(node = %state.node_id, "the node's certificate has expired; renewing it");
    let endpoint = bind(&dir, state.listen, None)?;
    if state.role != "manager" {
        renew_expired_worker(&dir, &state, &endpoint, &creds).await?;
        state = dir.load()?;
    }
    if state.role == "manager" {
        start_manager(dir, state, endpoint, creds).await
    } else {
        start_worker(dir, state, endpoint).await
    }
}

/// The leader's autopilot (see [`starling_manager::autopilot`]), when the cluster's settings
/// turn it on: every second, at most one step, logged. How long each node has been down is
/// counted from when this manager first saw it down (a new leader starts counting afresh).
async fn autopilot_loop(store: Arc<Store>) {
    use starling_manager::autopilot::{Step, View, next_step};
    let mut down_since: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ((records, cfg), _) = store.read_applied(|s| {
            (
                s.nodes().cloned().collect::<Vec<_>>(),
                s.cluster().settings.autopilot.clone(),
            )
        });
        let now = tokio::time::Instant::now();
        down_since.retain(|id, _| {
            records
                .iter()
                .any(|r| r.id == *id && r.status == NodeStatus::Down)
        });
        for r in records.iter().filter(|r| r.status == NodeStatus::Down) {
            down_since.entry(r.id.clone()).or_insert(now);
        }
        let status = store.status();
        if !status.is_leader || !cfg.cleanup_dead_managers {
            continue;
        }
        let names: BTreeMap<u64, String> = status
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.name.clone()))
            .collect();
        let answered = |v: &u64| {
            *v == status.id
                || status
                    .acked
                    .get(v)
                    .is_some_and(|d| *d < std::time::Duration::from_secs(3))
        };
        let view = View {
            nodes: records.iter().collect(),
            voters: status
                .voters
                .iter()
                .filter_map(|v| names.get(v).cloned())
                .collect(),
            reachable: status
                .voters
                .iter()
                .filter(|v| answered(v))
                .filter_map(|v| names.get(v).cloned())
                .collect(),
            down_for: down_since
                .iter()
                .map(|(id, t)| (id.clone(), now.duration_since(*t)))
                .collect(),
        };
        match next_step(&cfg, &view) {
            None => {}
            Some(Step::Remove { node, why }) => {
                warn!(%node, %why, "autopilot: removing a dead manager from the voters");
                let voter = status.nodes.iter().any(|(_, n)| n.name == node);
                let reply = if voter {
                    crate::join::demote_on_leader(&store, &node).await
                } else {
                    // Out of the Raft group already: only the record is left to retire.
                    match store
                        .write(Command::RetireManager { node: node.clone() })
                        .await
                    {
                        Ok(_) => crate::join::JoinReply::Demoted,
                        Err(e) => crate::join::JoinReply::Unavailable(e.to_string()),
                    }
                };
                match reply {
                    crate::join::JoinReply::Demoted => {
                        info!(%node, "autopilot: dead manager removed; it stays listed as a worker")
                    }
                    other => {
                        warn!(%node, answer = ?other, "autopilot: removal not done; trying again")
                    }
                }
            }
            Some(Step::Promote { node, why }) => {
                warn!(%node, %why, "autopilot: promoting a worker");
                if let Err(e) = store
                    .write(Command::SetNodeRole {
                        id: node.clone(),
                        role: NodeRole::Worker,
                        desired_role: NodeRole::Manager,
                    })
                    .await
                {
                    warn!(%node, error = %e, "autopilot: promotion not recorded; trying again");
                }
            }
        }
    }
}

/// Closes the connections a demoted node still holds with its manager certificate (it may
/// dial with it until it renews): the cluster honours it no more. Its renewal (on the join
/// protocol) is left open, so that it can fetch its worker certificate.
fn close_demoted(endpoint: &Endpoint, records: &[NodeRecord]) {
    for r in records {
        if r.role != NodeRole::Worker || r.desired_role != NodeRole::Worker {
            continue;
        }
        let Ok(id) = NodeId::new(r.id.clone()) else {
            continue;
        };
        let closed = endpoint.close_peer(
            &id,
            |c| {
                c.peer().is_some_and(|p| p.role == Role::MANAGER)
                    && c.alpn() != crate::join::JOIN_ALPN
            },
            starling_transport::CloseCode::REVOKED,
            "demoted: its manager certificate is no longer honoured",
        );
        if closed > 0 {
            info!(node = %r.id, closed, "closed a demoted node's manager connections");
        }
    }
}

/// Makes the manager in `dir` the single voter of its cluster, offline, before its store
/// opens (see [`starling_raft_store::force_new_cluster`]); returns the node ids of the
/// managers it leaves behind.
async fn force_new_cluster(dir: &DataDir) -> anyhow::Result<Vec<String>> {
    let mut state = dir.load()?;
    let raft_id = match (&state.role[..], state.raft_id) {
        ("manager", Some(id)) => id,
        _ => anyhow::bail!(
            "--force-new-cluster recovers a cluster from one of its managers; {} is a {}",
            state.node_id,
            state.role
        ),
    };
    let node = ManagerNode {
        name: state.node_id.clone(),
        addr: state.advertise.to_string(),
    };
    let r = starling_raft_store::force_new_cluster(&dir.raft_dir(), raft_id, node)
        .await
        .context("--force-new-cluster")?;
    let lost: Vec<String> = r
        .former_voters
        .iter()
        .filter(|(id, n)| **id != raft_id && n.name != state.node_id)
        .map(|(_, n)| n.name.clone())
        .collect();
    warn!(
        last_index = r.last_index,
        replayed = r.replayed,
        ?lost,
        "forced a new cluster: this manager is its only voter; the lost managers will be removed"
    );
    state.managers = vec![(state.node_id.clone(), state.advertise)];
    dir.save(&state)?;
    Ok(lost)
}

/// After a forced new cluster: the lost managers leave the node list and stay refused
/// (their Raft ids released, their node ids revoked), once this manager leads.
async fn forget_lost_managers(store: Arc<Store>, lost: Vec<String>) {
    for node in lost {
        for cmd in [
            Command::RetireManager { node: node.clone() },
            Command::RemoveNode { id: node.clone() },
        ] {
            let mut pause = std::time::Duration::from_millis(200);
            loop {
                match store.write(cmd.clone()).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, %node, "removing a lost manager; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
        }
        info!(%node, "lost manager removed from the cluster");
    }
}

/// Renews a worker's expired certificate at start (see [`crate::renewal`]): managers that
/// cannot be reached are tried again for a minute; a refusal (beyond the grace period, a
/// removed node) ends the start with the manager's reason.
async fn renew_expired_worker(
    dir: &DataDir,
    state: &NodeState,
    endpoint: &Endpoint,
    creds: &NodeCredentials,
) -> anyhow::Result<()> {
    let csr = creds.node_key()?.csr()?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let reply = loop {
        match crate::renewal::ask_expired(endpoint, state, creds, &csr).await {
            Ok(r) => break r,
            Err(e)
                if e.downcast_ref::<crate::renewal::Refused>().is_some()
                    || tokio::time::Instant::now() >= deadline =>
            {
                return Err(e.context("the node's certificate expired and could not be renewed"));
            }
            Err(e) => {
                warn!(error = %e, "no manager renewed the expired certificate yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    };
    crate::renewal::accept(dir, state, endpoint, creds, reply)?;
    Ok(())
}

/// Options of `starling join`.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Data directory.
    pub data_dir: DataDir,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Address others reach this node at (default: `listen`).
    pub advertise: Option<SocketAddr>,
    /// Host name to report.
    pub hostname: Option<String>,
    /// The join token.
    pub token: String,
    /// A manager to join through.
    pub manager: SocketAddr,
}

/// Joins a cluster through a manager with a token, and runs the node.
pub async fn join(opts: JoinOptions) -> anyhow::Result<RunningNode> {
    use crate::join::{JoinReply, JoinRequest, call, join_protocol};
    let dir = opts.data_dir.clone();
    if dir.is_initialised() {
        anyhow::bail!(
            "{} already holds a node (use `starling run --data-dir {}`)",
            dir.0.display(),
            dir.0.display()
        );
    }
    let token: starling_transport::JoinToken = opts.token.parse().context("bad --token")?;
    // Saved with the node's other files once the join succeeded.
    let reset_key = crate::datadir::new_reset_key()?;
    let cfg = EndpointConfig {
        listen: opts.listen,
        reset_key: Some(reset_key.clone()),
        ..EndpointConfig::default()
    };
    let endpoint = Endpoint::bind(cfg, ring_provider(), None)
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    crate::busy_poll::watch(&endpoint);
    let protocol = join_protocol()?;
    let conn = endpoint
        .connect_pinned(&protocol, opts.manager, &token)
        .await
        .with_context(|| format!("cannot join through {}", opts.manager))?;
    let key = starling_transport::NodeKey::generate()?;
    let advertise = opts.advertise.unwrap_or(opts.listen);
    let hostname = opts.hostname.unwrap_or_else(hostname);
    let reply = call(
        &conn,
        &JoinRequest::Join {
            token: opts.token.clone(),
            csr: key.csr()?,
            hostname: hostname.clone(),
            advertise,
        },
    )
    .await?;
    let (node_id, cluster_id, role, raft_id, cert, roots, chain, managers) = match reply {
        JoinReply::Joined {
            node_id,
            cluster_id,
            role,
            raft_id,
            cert,
            roots,
            chain,
            managers,
        } => (
            node_id, cluster_id, role, raft_id, cert, roots, chain, managers,
        ),
        JoinReply::Refused(why) => anyhow::bail!("join refused: {why}"),
        other => anyhow::bail!("unexpected answer to a join: {other:?}"),
    };
    conn.close(starling_transport::CloseCode::SHUTDOWN, "joined");
    let creds = crate::join::credentials(cert, key, roots, chain)?;
    dir.create()
        .with_context(|| format!("cannot create {}", dir.0.display()))?;
    creds.save(&dir.0)?;
    dir.save_reset_key(&reset_key)?;
    endpoint.rotate(creds.clone())?;
    let state = NodeState {
        node_id,
        cluster_id,
        role: role.clone(),
        raft_id,
        listen: opts.listen,
        advertise,
        hostname,
        managers,
    };
    dir.save(&state)?;
    if role != "manager" {
        return start_worker(dir, state, endpoint).await;
    }
    let raft_id = raft_id.ok_or_else(|| anyhow::anyhow!("a manager join without a raft id"))?;
    let seeds = state.managers.clone();
    let node = start_manager(dir, state, endpoint.clone(), creds).await?;
    let store = node
        .store
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a manager started without a store"))?;
    enter_raft_group(&endpoint, &seeds, raft_id, &store).await?;
    Ok(node)
}

/// Asks the leader to add this manager to the Raft group: learner first, voter once caught
/// up. The leader is found through `seeds` at first, then through this manager's own Raft
/// store, which learns the leader as soon as this manager is a learner: a seed that went
/// away in the middle (killed, or its leadership lost) does not strand the entry.
pub async fn enter_raft_group(
    endpoint: &Endpoint,
    seeds: &[(String, SocketAddr)],
    raft_id: u64,
    store: &Store,
) -> anyhow::Result<()> {
    use crate::join::{JoinReply, JoinRequest, call, join_protocol};
    let protocol = join_protocol()?;
    let me = endpoint.identity().map(|i| i.node_id.to_string());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut hint: Option<(String, SocketAddr)> = None;
    let mut attempt = 0usize;
    let mut last_error = String::from("no manager to ask");
    while tokio::time::Instant::now() < deadline {
        attempt += 1;
        // Already a voter, and elected leader meanwhile (the manager it joined through died
        // before answering): only the record is left to write, here.
        let status = store.status();
        if status.is_leader && status.voters.contains(&raft_id) {
            let node = endpoint
                .identity()
                .map(|i| i.node_id.to_string())
                .ok_or_else(|| anyhow::anyhow!("the endpoint has no identity"))?;
            match store
                .write(starling_raft_store::Command::SetNodeRole {
                    id: node,
                    role: starling_raft_store::NodeRole::Manager,
                    desired_role: starling_raft_store::NodeRole::Manager,
                })
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    last_error = e.to_string();
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some((leader_id, addr)) = hint
            .take()
            .or_else(|| store_leader(store))
            .or_else(|| pick_manager(seeds, store, me.as_deref(), attempt))
        else {
            break;
        };
        let reply = match NodeId::new(leader_id.clone()) {
            Ok(id) => match endpoint.connect(&protocol, &id, addr).await {
                Ok(conn) => call(&conn, &JoinRequest::AddManager { raft_id }).await,
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        };
        match reply {
            Ok(JoinReply::Added) => return Ok(()),
            Ok(JoinReply::NotLeader { leader }) => hint = leader,
            // Another manager's change was under way (through another manager): retry.
            Ok(JoinReply::MembershipBusy) => {}
            // The leader could not finish it now (lost quorum or leadership): ask again.
            Ok(JoinReply::Unavailable(why)) => {
                tracing::info!(%why, "raft group entry not finished yet; asking again");
                last_error = why;
            }
            Ok(JoinReply::Refused(why)) => anyhow::bail!("could not join the raft group: {why}"),
            Ok(other) => anyhow::bail!("unexpected answer: {other:?}"),
            // No answer (a loaded leader still catching this manager up, or a manager that
            // went away): asking again is safe, a manager already in the group is answered
            // `Added`.
            Err(e) => {
                tracing::info!(manager = %leader_id, error = %e, "no answer to the raft group entry yet; asking again");
                last_error = e.to_string();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    anyhow::bail!("no leader accepted this manager into the raft group: {last_error}")
}

/// The leader as this manager's own store knows it (once it is a learner), unless it is
/// this manager itself.
fn store_leader(store: &Store) -> Option<(String, SocketAddr)> {
    let status = store.status();
    let leader = status.leader.filter(|l| *l != status.id)?;
    status
        .nodes
        .into_iter()
        .find(|(id, _)| *id == leader)
        .and_then(|(_, n)| Some((n.name, n.addr.parse().ok()?)))
}

/// The managers this one knows of (the seeds, then the Raft membership it has seen), taken
/// in turn as attempts go by.
fn pick_manager(
    seeds: &[(String, SocketAddr)],
    store: &Store,
    me: Option<&str>,
    attempt: usize,
) -> Option<(String, SocketAddr)> {
    let mut known: Vec<(String, SocketAddr)> = seeds.to_vec();
    for (_, n) in store.status().nodes {
        if let Ok(addr) = n.addr.parse()
            && !known.iter().any(|(k, _)| *k == n.name)
        {
            known.push((n.name, addr));
        }
    }
    known.retain(|(n, _)| Some(n.as_str()) != me);
    if known.is_empty() {
        return None;
    }
    let i = attempt % known.len();
    Some(known.swap_remove(i))
}

/// The node as it runs now: replaced when its role changes.
pub type Current = Arc<std::sync::RwLock<Arc<RunningNode>>>;

/// A role change granted by a manager, saved to disk and in effect on the endpoint once the
/// old role's components are stopped; what is left is to start the new role's components.
pub(crate) struct RoleChange {
    /// The node's state in its new role.
    pub(crate) state: NodeState,
    /// Its certificate for the new role.
    pub(crate) creds: NodeCredentials,
    /// The old role's components are stopped (done once).
    pub(crate) stopped: bool,
}

/// Stops the old role (once) and starts the new one on the same endpoint.
pub(crate) async fn start_role(
    m: &RunningNode,
    change: &RoleChange,
) -> anyhow::Result<RunningNode> {
    let dir = m.data_dir.clone();
    let state = change.state.clone();
    let creds = change.creds.clone();
    if !change.stopped {
        m.stop_components().await;
        m.endpoint.rotate(creds.clone())?;
        // A fresh log: a Raft id is new on every promotion, never shared with an earlier
        // life, and a worker keeps no log.
        let _ = std::fs::remove_dir_all(dir.raft_dir());
    }
    let mut new = if state.role == "manager" {
        let raft_id = state
            .raft_id
            .ok_or_else(|| anyhow::anyhow!("a promotion without a raft id"))?;
        let seeds = state.managers.clone();
        let new = start_manager(dir, state, m.endpoint.clone(), creds).await?;
        let store = new
            .store
            .clone()
            .ok_or_else(|| anyhow::anyhow!("a manager started without a store"))?;
        if let Err(e) = enter_raft_group(&m.endpoint, &seeds, raft_id, &store).await {
            new.stop_components().await;
            return Err(e);
        }
        new
    } else {
        start_worker(dir, state, m.endpoint.clone()).await?
    };
    new.stop = m.stop.clone();
    Ok(new)
}

/// The leader's liveness loop: every half second, gossip's view becomes node status in Raft.
async fn reconcile_liveness(
    store: Arc<Store>,
    endpoint: Endpoint,
    gossip: Arc<GossipNode>,
    me: String,
    metrics: Arc<crate::metrics::Metrics>,
    sessions: starling_manager::dispatcher::Sessions,
) {
    let mut last_leader = None;
    use crate::liveness::{Liveness, LivenessConfig};
    let cfg = LivenessConfig::default();
    let mut liveness = Liveness::new();
    let mut seeded: Vec<(String, SocketAddr)> = Vec::new();
    let mut revoked: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let status = store.status();
        if status.leader != last_leader {
            if last_leader.is_some() {
                metrics
                    .leader_changes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            last_leader = status.leader;
        }
        let leading = status.is_leader;
        let alive: std::collections::BTreeSet<String> = gossip
            .members()
            .into_iter()
            .filter(|m| m.up)
            .map(|m| m.id.node)
            .chain([me.clone()])
            .collect();
        let (records, removed) = match store
            .read(starling_raft_store::Consistency::Stale, |s| {
                (
                    s.nodes().cloned().collect::<Vec<_>>(),
                    s.system().revoked.iter().cloned().collect::<Vec<_>>(),
                )
            })
            .await
        {
            Ok((r, _)) => r,
            Err(_) => continue,
        };
        // The Raft group's members are gossip seeds too (the first round runs at once): a
        // manager restarted alone (the cluster's first, told of no other) finds the others
        // through them.
        let raft_members: Vec<(String, SocketAddr)> = status
            .nodes
            .iter()
            .filter(|(_, n)| n.name != me)
            .filter_map(|(_, n)| Some((n.name.clone(), n.addr.parse().ok()?)))
            .collect();
        if raft_members != seeded && gossip.add_seeds(raft_members.clone()).await.is_ok() {
            seeded = raft_members;
        }
        // Every manager, leader or not, refuses removed nodes and revoked API clients.
        if removed != revoked {
            endpoint.revoke(removed.iter().filter_map(|id| NodeId::new(id.clone()).ok()));
            revoked = removed;
        }
        close_demoted(&endpoint, &records);
        let mut unreachable = if leading {
            confirm_unreachable(&endpoint, &sessions, &records).await
        } else {
            std::collections::BTreeSet::new()
        };
        // Gossip has the last word, read after the probes (which ran while SWIM's own probes
        // went on): a node alive and not suspected is not taken for dead. That keeps a leader
        // cut off from the workers (but not from the other managers) from declaring them all
        // down: SWIM's probes go through other members, which still reach them.
        let trusted: std::collections::BTreeSet<String> = gossip
            .members()
            .into_iter()
            .filter(|m| m.up && !m.suspected)
            .map(|m| m.id.node)
            .collect();
        unreachable.retain(|id| !trusted.contains(id));
        let now = std::time::Instant::now();
        for cmd in liveness.round(&cfg, now, leading, &alive, &unreachable, &records) {
            if let Err(e) = store.write(cmd).await {
                tracing::debug!(error = %e, "liveness update not written");
                break;
            }
        }
    }
}

/// A node's agent session here has been silent this long: its node is probed.
const SESSION_SILENCE: std::time::Duration = starling_api::dispatch::SESSION_SILENCE;
/// How long a probe (a QUIC handshake with the node) may take.
/// (Longer than QUIC's first retransmission, ~1 s: one lost packet does not fail it.)
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1_500);

/// Nodes with two direct signs of death: their agent session with this manager has been
/// silent for [`SESSION_SILENCE`] and a fresh QUIC handshake with them fails within
/// [`PROBE_TIMEOUT`] (the caller adds gossip's view as the third). A node that answers the
/// probe is forgotten by the session table (its agent may have moved to another manager).
async fn confirm_unreachable(
    endpoint: &Endpoint,
    sessions: &starling_manager::dispatcher::Sessions,
    records: &[starling_raft_store::NodeRecord],
) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let Ok(protocol) = starling_gossip::gossip_protocol() else {
        return out;
    };
    let mut probes = tokio::task::JoinSet::new();
    // A node down this long is left to gossip: its stale session entry goes.
    for id in sessions.silent(std::time::Duration::from_secs(300)) {
        sessions.forget(&id);
    }
    // Down nodes are probed too, so that gossip's slower view cannot mark one ready again
    // while its session is silent and it does not answer.
    for id in sessions.silent(SESSION_SILENCE) {
        let Some(record) = records.iter().find(|r| r.id == id) else {
            sessions.forget(&id);
            continue;
        };
        let (Ok(node), Ok(addr)) = (NodeId::new(id.clone()), record.addr.parse::<SocketAddr>())
        else {
            continue;
        };
        let endpoint = endpoint.clone();
        let protocol = protocol.clone();
        probes.spawn(async move {
            let answered =
                match tokio::time::timeout(PROBE_TIMEOUT, endpoint.connect(&protocol, &node, addr))
                    .await
                {
                    Ok(Ok(conn)) => {
                        conn.close(starling_transport::CloseCode::SHUTDOWN, "probe");
                        true
                    }
                    _ => false,
                };
            (id, answered)
        });
    }
    while let Some(Ok((id, answered))) = probes.join_next().await {
        if answered {
            sessions.forget(&id);
        } else {
            tracing::debug!(node = %id, "agent session silent and the node does not answer");
            out.insert(id);
        }
    }
    out
}

async fn start_gossip(
    dir: &DataDir,
    state: &NodeState,
    endpoint: &Endpoint,
) -> anyhow::Result<GossipNode> {
    let generation = FileGeneration(dir.generation_file()).next_generation()?;
    let gossip = GossipNode::start(
        endpoint.clone(),
        GossipSettings {
            id: GossipId::new(state.node_id.clone(), state.advertise, generation),
            seeds: state
                .managers
                .iter()
                .filter(|(n, _)| *n != state.node_id)
                .map(|(n, a)| (n.clone(), *a))
                .collect(),
            config: GossipConfig::default(),
            rng_seed: generation ^ u64::from_str_radix(&state.node_id, 16).unwrap_or(7),
        },
    )
    .await?;
    gossip.publish(Vec::new(), node_labels(state)).await?;
    Ok(gossip)
}

/// The node's agent: it runs the tasks the managers assign to this node. Its dispatchers
/// are the managers the node knows (on a manager, its own in process). None when the node
/// was started with `--run-tasks false`.
fn start_agent(
    dir: &DataDir,
    state: &NodeState,
    endpoint: &Endpoint,
    store: Option<Arc<Store>>,
    gossip: Arc<GossipNode>,
) -> Agent {
    if RUN_TASKS.get() == Some(&false) {
        return Agent {
            tasks: Vec::new(),
            directive: None,
        };
    }
    let (directive, directive_rx) = tokio::sync::watch::channel(None);
    // The endpoints of the tasks running here go into this node's gossip record.
    let (endpoints, mut published) = tokio::sync::watch::channel(Vec::new());
    let labels = node_labels(state);
    let publisher = tokio::spawn(async move {
        while published.changed().await.is_ok() {
            let now = published.borrow_and_update().clone();
            if let Err(e) = gossip.publish(now, labels.clone()).await {
                tracing::warn!(error = %e, "task endpoints not published");
            }
        }
    });
    let mut managers = state.managers.clone();
    if state.role == "manager" {
        managers.retain(|(n, _)| *n != state.node_id);
        managers.insert(0, (state.node_id.clone(), state.advertise));
    }
    let (port_min, port_max) = TASK_PORTS
        .get()
        .copied()
        .unwrap_or(starling_manager::scheduler::DEFAULT_PORT_RANGE);
    let cgroups = starling_agent::cgroup::Cgroups::detect(&state.node_id);
    let agent = starling_agent::spawn(
        endpoint.clone(),
        managers,
        starling_agent::AgentConfig {
            local: store.map(|store| {
                let node = state.node_id.clone();
                let open: starling_agent::LocalDispatcher = Arc::new(move || {
                    starling_manager::dispatcher::local_session(store.clone(), node.clone())
                });
                open
            }),
            tasks_dir: dir.0.join("tasks"),
            host_ip: state.advertise.ip().to_string(),
            description: starling_agent::describe_machine(port_min, port_max, cgroups.as_ref()),
            cgroups,
            // This binary (`/proc/self/exe` stays valid when the file is replaced by an
            // upgrade): `starling task-exec` puts a task into its cgroup before it runs.
            launcher: Some(std::path::PathBuf::from("/proc/self/exe"))
                .filter(|p| p.exists())
                .or_else(|| std::env::current_exe().ok()),
            endpoints: Some(endpoints),
            directive: Some(directive),
        },
    );
    Agent {
        tasks: vec![agent, publisher],
        directive: Some(directive_rx),
    }
}

/// A node's agent as it runs: its tasks, and what its dispatcher session says of the node.
struct Agent {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    directive: Option<tokio::sync::watch::Receiver<Option<NodeDirective>>>,
}

async fn start_worker(
    dir: DataDir,
    state: NodeState,
    endpoint: Endpoint,
) -> anyhow::Result<RunningNode> {
    let gossip = Arc::new(start_gossip(&dir, &state, &endpoint).await?);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let agent = start_agent(&dir, &state, &endpoint, None, gossip.clone());
    let mut tasks = agent.tasks;
    tasks.extend(start_dns(gossip.clone()));
    let api_listener = None;
    Ok(RunningNode {
        state,
        store: None,
        gossip,
        endpoint,
        data_dir: dir,
        stop: Arc::new(tokio::sync::Notify::new()),
        metrics,
        tasks: std::sync::Mutex::new(tasks),
        api_listener: std::sync::Mutex::new(api_listener),
        directive: agent.directive,
    })
}

async fn start_manager(
    dir: DataDir,
    state: NodeState,
    endpoint: Endpoint,
    creds: NodeCredentials,
) -> anyhow::Result<RunningNode> {
    let raft_id = state
        .raft_id
        .ok_or_else(|| anyhow::anyhow!("manager state without a raft id"))?;
    // The ALPN listeners first, so a start that fails leaves nothing running.
    let listener = endpoint.listen(&crate::join::join_server_protocol()?)?;
    let api_listener = Some(endpoint.listen(&crate::api::api_server_protocol()?)?);
    let dispatch_listener = endpoint.listen(&starling_manager::dispatcher::protocol()?)?;
    let sessions = starling_manager::dispatcher::Sessions::default();
    let mut config = StoreConfig::new(
        dir.raft_dir(),
        raft_id,
        ManagerNode {
            name: state.node_id.clone(),
            addr: state.advertise.to_string(),
        },
    );
    if let Some(n) = SNAPSHOT_INTERVAL.get() {
        config.snapshot_interval = *n;
    }
    config.poll_before_sleep = crate::busy_poll::policy();
    let store = Store::open(config, endpoint.clone()).await?;
    let store = Arc::new(store);
    // Earlier versions also kept the first CA in files beside the node's: never read, and a
    // key a root rotation must be able to forget.
    for f in ["ca.key", "ca.crt"] {
        let _ = std::fs::remove_file(dir.0.join(f));
    }
    if endpoint.identity().is_none() {
        // Started with an expired certificate: renewed from the CA in the local state, if
        // that state still has this node as a manager.
        let wanted = crate::renewal::local_record_wants_manager(&store, &state.node_id);
        let renewed = if !wanted {
            Err(anyhow::anyhow!(
                "this node is no longer a manager of its cluster (demoted or removed while it was off)"
            ))
        } else {
            Ok(())
        };
        let renewed = renewed.and_then(|()| {
            creds
                .node_key()
                .and_then(|k| k.csr())
                .map_err(anyhow::Error::from)
                .and_then(|csr| crate::renewal::self_issue(&store, &creds, &csr))
                .and_then(|reply| {
                    let accepted =
                        crate::renewal::accept(&dir, &state, &endpoint, &creds, reply.clone())?;
                    crate::renewal::record_in_background(store.clone(), endpoint.clone(), &reply);
                    Ok(accepted)
                })
        });
        if let Err(e) = renewed {
            let _ = store.shutdown().await;
            return Err(e.context("the manager's certificate expired and could not be renewed"));
        }
    }
    let gossip = match start_gossip(&dir, &state, &endpoint).await {
        Ok(g) => Arc::new(g),
        Err(e) => {
            let _ = store.shutdown().await;
            return Err(e);
        }
    };
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let mut tasks = vec![tokio::spawn(crate::join::serve(
        store.clone(),
        listener,
        metrics.clone(),
    ))];
    tasks.push(tokio::spawn(reconcile_liveness(
        store.clone(),
        endpoint.clone(),
        gossip.clone(),
        state.node_id.clone(),
        metrics.clone(),
        sessions.clone(),
    )));
    tasks.push(tokio::spawn(autopilot_loop(store.clone())));
    tasks.push(tokio::spawn(crate::rotation::rotation_loop(store.clone())));
    tasks.push(tokio::spawn(starling_manager::supervisor::run(
        store.clone(),
        starling_manager::OrchestratorConfig::default(),
    )));
    tasks.push(tokio::spawn(starling_manager::dispatcher::serve(
        dispatch_listener,
        store.clone(),
        sessions,
    )));
    let agent = start_agent(&dir, &state, &endpoint, Some(store.clone()), gossip.clone());
    tasks.extend(agent.tasks);
    tasks.extend(start_dns(gossip.clone()));
    Ok(RunningNode {
        state,
        store: Some(store),
        gossip,
        endpoint,
        data_dir: dir,
        stop: Arc::new(tokio::sync::Notify::new()),
        metrics,
        tasks: std::sync::Mutex::new(tasks),
        api_listener: std::sync::Mutex::new(api_listener),
        directive: agent.directive,
    })
}
