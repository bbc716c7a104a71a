//! The dispatcher: serves every node's agent session on any manager (ALPN
//! `starling/dispatch/1`). At session start it records the node's machine and the agent's
//! full report, sends the node's whole task set, then sends what changes as entries are
//! applied; reports are coalesced for up to [`COALESCE`] into one Raft write per node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use starling_api::dispatch::{
    AgentMessage, DISPATCH_ALPN, HEARTBEAT, ManagerMessage, NodeDirective, read_message,
    write_message,
};
use starling_raft_store::{Consistency, Store};
use starling_state::{Command, NodeStatus, Task, TaskReport};
use starling_transport::{Connection, Listener, PeerPolicy, Protocol, Role};
use tracing::{debug, info, warn};

/// Reports are gathered this long before they are written.
pub const COALESCE: Duration = Duration::from_millis(100);

/// The agent sessions this manager serves: when each node's agent last spoke. A session
/// that ends cleanly is forgotten; one whose node died stays, silent, until its connection
/// times out, which is what [`Sessions::silent`] finds.
#[derive(Clone, Debug, Default)]
pub struct Sessions(Arc<std::sync::Mutex<BTreeMap<String, tokio::time::Instant>>>);

impl Sessions {
    fn heard(&self, node: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned(), tokio::time::Instant::now());
    }

    fn ended(&self, node: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    /// Forgets a node's session (its node answered otherwise: it may serve its session with
    /// another manager now).
    pub fn forget(&self, node: &str) {
        self.ended(node);
    }

    /// Nodes whose session here has been silent for at least `for_at_least`.
    pub fn silent(&self, for_at_least: Duration) -> Vec<String> {
        let now = tokio::time::Instant::now();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= for_at_least)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// The dispatcher's protocol: nodes (managers and workers) only.
pub fn protocol() -> Result<Protocol, starling_transport::ConfigError> {
    Protocol::new(
        DISPATCH_ALPN,
        PeerPolicy::roles([Role::MANAGER, Role::WORKER]),
    )
}

/// Digests (hex) of the roots a node is to trust, the signing one first.
pub fn trusted_root_digests(info: &starling_state::ClusterInfo) -> Vec<String> {
    info.trusted_roots_pem()
        .into_iter()
        .filter_map(starling_transport::CaDigest::of_pem_certificate)
        .map(|d| d.to_string())
        .collect()
}

/// [`trusted_root_digests`] for callers that ask on every applied entry: the PEM texts are
/// compared with the last ones seen, and parsed and hashed again only when they changed.
#[derive(Debug, Default)]
pub struct RootDigests {
    pems: Vec<String>,
    digests: Vec<String>,
}

impl RootDigests {
    /// The digests of the roots `info` has nodes trust.
    pub fn of(&mut self, info: &starling_state::ClusterInfo) -> Vec<String> {
        let pems = info.trusted_roots_pem();
        if pems != self.pems {
            self.pems = pems.iter().map(|p| (*p).to_owned()).collect();
            self.digests = trusted_root_digests(info);
        }
        self.digests.clone()
    }
}

/// Serves the sessions `listener` (on [`protocol`]) accepts, until it closes.
pub async fn serve(mut listener: Listener, store: Arc<Store>, sessions: Sessions) {
    while let Some(conn) = listener.accept().await {
        let store = store.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            if let Err(e) = session(conn, store, sessions).await {
                debug!(error = %e, "agent session ended");
            }
        });
    }
}

async fn session(conn: Connection, store: Arc<Store>, sessions: Sessions) -> Result<(), String> {
    let node = conn
        .peer()
        .map(|p| p.node_id.as_str().to_owned())
        .ok_or("an anonymous peer")?;
    let (known, _) = store.read_applied(|s| s.node(&node).is_some() && !s.is_revoked(&node));
    if !known {
        conn.close(
            starling_transport::CloseCode::REVOKED,
            "not a node of the cluster",
        );
        return Err(format!("{node} is not a node of the cluster"));
    }
    let stream = conn.accept_stream().await.map_err(|e| e.to_string())?;
    sessions.heard(&node);
    let result = run_session(stream, node.clone(), store, Some(&sessions)).await;
    // Whatever the end (a clean close, or an error once the connection timed out), the
    // entry goes: only a session that is open and silent counts as a sign of death.
    sessions.ended(&node);
    result
}

/// A session of this manager's own agent, in process (a node does not dial itself): the
/// agent's end of an in-memory stream whose other end this dispatcher serves.
pub fn local_session(store: Arc<Store>, node: String) -> tokio::io::DuplexStream {
    let (agent_end, dispatcher_end) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Err(e) = run_session(dispatcher_end, node, store, None).await {
            debug!(error = %e, "local agent session ended");
        }
    });
    agent_end
}

async fn run_session<S>(
    stream: S,
    node: String,
    store: Arc<Store>,
    sessions: Option<&Sessions>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rx, tx) = tokio::io::split(stream);
    let hello = tokio::time::timeout(
        Duration::from_secs(10),
        read_message::<AgentMessage>(&mut rx),
    )
    .await
    .map_err(|_| "no hello within 10s".to_owned())?
    .map_err(|e| e.to_string())?;
    let Some(AgentMessage::Hello {
        description,
        reports,
    }) = hello
    else {
        return Err("the session did not start with a hello".into());
    };
    info!(%node, tasks = reports.len(), "agent session");
    // Written until the state holds it: `apply` drops a description that arrives before
    // the node's record (a first session racing its join), and a node without one is never
    // scheduled. Checked again on every heartbeat.
    let record_description = {
        let store = store.clone();
        let node = node.clone();
        let description = description.clone();
        move || {
            let (same, _) = store.read_applied(|s| s.node_description(&node) == Some(&description));
            let (store, node, description) = (store.clone(), node.clone(), description.clone());
            async move {
                if !same
                    && let Err(e) = store
                        .write(Command::SetNodeDescription {
                            id: node.clone(),
                            description,
                        })
                        .await
                {
                    warn!(%node, error = %e, "recording the node's description failed");
                }
            }
        }
    };
    record_description().await;
    // A node is `unknown` from its join until its agent's first session: only then is it
    // `ready` (and schedulable). Later changes are liveness's, from gossip and probes.
    let (fresh, _) = store.read_applied(|s| {
        s.node(&node)
            .is_some_and(|n| n.status == NodeStatus::Unknown)
    });
    if fresh
        && let Err(e) = store
            .write(Command::SetNodeStatus {
                id: node.clone(),
                status: NodeStatus::Ready,
            })
            .await
    {
        warn!(%node, error = %e, "marking the node ready failed");
    }
    let (report_tx, report_rx) = tokio::sync::mpsc::channel::<Vec<TaskReport>>(64);
    let _ = report_tx.send(reports).await;
    let writer = tokio::spawn(write_reports(store.clone(), node.clone(), report_rx));
    let mut sender = tokio::spawn(send_assignments(store.clone(), node.clone(), tx));
    let result = loop {
        let msg = tokio::select! {
            msg = read_message::<AgentMessage>(&mut rx) => msg,
            // The sending half ended (the agent stopped reading, or this manager is cut off
            // from the leader): the session ends, the agent fails over.
            r = &mut sender => break r.unwrap_or_else(|e| Err(e.to_string())),
        };
        if let (Ok(Some(_)), Some(s)) = (&msg, sessions) {
            s.heard(&node);
        }
        match msg {
            Ok(Some(AgentMessage::Heartbeat)) => record_description().await,
            Ok(Some(AgentMessage::Reports(reports))) => {
                if report_tx.send(reports).await.is_err() {
                    break Ok(());
                }
            }
            Ok(Some(AgentMessage::Hello { .. })) => break Err("a second hello".to_owned()),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        }
    };
    sender.abort();
    drop(report_tx);
    let _ = writer.await;
    result
}

/// How long a follower may go without hearing a leader before its sessions end (so their
/// agents fail over to a manager that follows the log, not one cut off from it).
const CUT_OFF: Duration = Duration::from_secs(3);

/// The sending half of a session: the node's full task set once this manager is caught up
/// with the leader (a read-index barrier), then what changes, and a heartbeat every
/// [`HEARTBEAT`]. Ends with an error when the agent stops reading or this manager has been
/// out of touch with a leader for [`CUT_OFF`].
async fn send_assignments<W>(store: Arc<Store>, node: String, mut tx: W) -> Result<(), String>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    // A full set from a lagging follower would lack the newest tasks, and the agent stops
    // what the full set leaves out: first catch up with the leader's commit index.
    // Heartbeats go on meanwhile, so the agent does not take a slow barrier (an election)
    // for a dead manager.
    let mut beat = tokio::time::interval(HEARTBEAT);
    let barrier = store.read(Consistency::Linearizable, |_| ());
    tokio::pin!(barrier);
    loop {
        tokio::select! {
            r = &mut barrier => {
                r.map_err(|e| format!("not caught up with a leader: {e}"))?;
                break;
            }
            _ = beat.tick() => {
                write_message(&mut tx, &ManagerMessage::Heartbeat)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let mut applied = store.object_changes();
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    let mut full = true;
    let mut out_of_touch: Option<tokio::time::Instant> = None;
    // The agent fails over to these: a change (a manager joined, left, moved) is sent too.
    let mut sent_managers: Vec<String> = Vec::new();
    let mut sent_directive: Option<NodeDirective> = None;
    let mut root_digests = RootDigests::default();
    loop {
        let (directive, _) = store.read_applied(|s| {
            s.node(&node).map(|n| NodeDirective {
                role: n.desired_role.clone(),
                roots: root_digests.of(s.cluster()),
            })
        });
        if directive.is_some() && directive != sent_directive {
            if let Some(d) = &directive {
                write_message(&mut tx, &ManagerMessage::Node(d.clone()))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            sent_directive = directive;
        }
        let (current, _) = store.read_applied(|s| {
            // Ended tasks too, until they are reaped: the agent keeps their files (logs)
            // while the managers list them.
            s.tasks_on(&node)
                .map(|t| (t.id.clone(), t.clone()))
                .collect::<BTreeMap<String, Task>>()
        });
        let tasks: Vec<Task> = current
            .values()
            .filter(|t| sent.get(&t.id) != Some(&t.version))
            .cloned()
            .collect();
        let removed: Vec<String> = sent
            .keys()
            .filter(|id| !current.contains_key(*id))
            .cloned()
            .collect();
        let managers = manager_list(&store);
        if full || !tasks.is_empty() || !removed.is_empty() || managers != sent_managers {
            sent_managers = managers.clone();
            let msg = ManagerMessage::Assignments {
                full,
                tasks,
                removed,
                managers,
            };
            write_message(&mut tx, &msg)
                .await
                .map_err(|e| e.to_string())?;
            full = false;
            sent = current
                .iter()
                .map(|(id, t)| (id.clone(), t.version))
                .collect();
        }
        loop {
            tokio::select! {
                r = applied.changed() => {
                    r.map_err(|_| "the store closed".to_owned())?;
                    break;
                }
                _ = beat.tick() => {
                    if manager_list(&store) != sent_managers {
                        break;
                    }
                    if in_touch(&store) {
                        out_of_touch = None;
                    } else if out_of_touch.get_or_insert_with(tokio::time::Instant::now).elapsed() >= CUT_OFF {
                        return Err("this manager is out of touch with a leader".to_owned());
                    }
                    write_message(&mut tx, &ManagerMessage::Heartbeat)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
}

/// The managers as agents are told of them, `node_id@addr`.
fn manager_list(store: &Store) -> Vec<String> {
    store
        .managers()
        .into_iter()
        .map(|(_, n)| format!("{}@{}", n.name, n.addr))
        .collect()
}

/// Whether this manager follows a leader it heard within [`CUT_OFF`], or leads and a majority
/// of the voters answered it within [`CUT_OFF`].
fn in_touch(store: &Store) -> bool {
    let status = store.status();
    if status.is_leader {
        let answered = status
            .voters
            .iter()
            .filter(|v| **v == status.id || status.acked.get(v).is_some_and(|d| *d < CUT_OFF))
            .count();
        return answered > status.voters.len() / 2;
    }
    status.leader.is_some() && store.last_contact().is_some_and(|d| d < CUT_OFF)
}

/// Writes the reports of one node's session, coalesced: the latest status of each task
/// gathered over [`COALESCE`] goes in one entry; a failed write is tried again.
async fn write_reports(
    store: Arc<Store>,
    node: String,
    mut rx: tokio::sync::mpsc::Receiver<Vec<TaskReport>>,
) {
    let mut pending: BTreeMap<String, TaskReport> = BTreeMap::new();
    let mut open = true;
    while open || !pending.is_empty() {
        if pending.is_empty() {
            match rx.recv().await {
                Some(batch) => add(&mut pending, batch),
                None => return,
            }
        }
        let deadline = tokio::time::Instant::now() + COALESCE;
        while open {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(batch)) => add(&mut pending, batch),
                Ok(None) => open = false,
                Err(_) => break,
            }
        }
        let reports: Vec<TaskReport> = pending.values().cloned().collect();
        match store
            .write(Command::ReportTasks {
                node: node.clone(),
                reports,
            })
            .await
        {
            Ok(_) => pending.clear(),
            Err(e) => {
                warn!(%node, error = %e, "task reports not written; trying again");
                if !open {
                    // The session is over: its next one re-reports everything.
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Keeps, per task, the most advanced status (a replayed older one never wins).
fn add(pending: &mut BTreeMap<String, TaskReport>, batch: Vec<TaskReport>) {
    for r in batch {
        match pending.get(&r.task) {
            Some(old) if old.status.state > r.status.state => {}
            _ => {
                pending.insert(r.task.clone(), r);
            }
        }
    }
}
