//! The dispatcher: serves every node's agent session on any manager (ALPN
//! `starling/dispatch/1`). At session start it records the node's machine and the agent's
//! full report, sends the node's whole task set, then sends what changes as entries are
//! applied; reports are coalesced for up to [`COALESCE`] into one Raft write per node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use starling_api::dispatch::{
    AgentMessage, DISPATCH_ALPN, ManagerMessage, read_message, write_message,
};
use starling_raft_store::Store;
use starling_state::{Command, Task, TaskReport};
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
    let (mut rx, mut tx) = tokio::io::split(stream);
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
    let (same, _) = store.read_applied(|s| s.node_description(&node) == Some(&description));
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
    let (report_tx, report_rx) = tokio::sync::mpsc::channel::<Vec<TaskReport>>(64);
    let _ = report_tx.send(reports).await;
    let writer = tokio::spawn(write_reports(store.clone(), node.clone(), report_rx));
    let sender = {
        let store = store.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let mut applied = store.applied_changes();
            let mut sent: BTreeMap<String, u64> = BTreeMap::new();
            let mut full = true;
            loop {
                let (current, _) = store.read_applied(|s| {
                    s.tasks_on(&node)
                        .filter(|t| !t.status.state.is_terminal())
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
                if full || !tasks.is_empty() || !removed.is_empty() {
                    let managers = store
                        .managers()
                        .into_iter()
                        .map(|(_, n)| format!("{}@{}", n.name, n.addr))
                        .collect();
                    let msg = ManagerMessage::Assignments {
                        full,
                        tasks,
                        removed,
                        managers,
                    };
                    if write_message(&mut tx, &msg).await.is_err() {
                        return;
                    }
                    full = false;
                    sent = current
                        .iter()
                        .map(|(id, t)| (id.clone(), t.version))
                        .collect();
                }
                if applied.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let result = loop {
        let msg = read_message::<AgentMessage>(&mut rx).await;
        if let (Ok(Some(_)), Some(s)) = (&msg, sessions) {
            s.heard(&node);
        }
        match msg {
            Ok(Some(AgentMessage::Heartbeat)) => {}
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
