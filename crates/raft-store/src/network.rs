//! Raft over the transport: ALPN `starling/raft/1`, managers only. Each RPC is one request
//! on the pooled connection to the target manager; snapshots go as a series of chunk
//! requests, each with its own timeout, so any size streams through. The same protocol
//! carries writes and read-index requests forwarded from followers to the leader.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{LinearizerOption, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use starling_transport::{Endpoint, NodeId, PeerPolicy, Protocol, Role};
use tracing::{debug, warn};

use crate::types::{ManagerNode, SnapshotMeta, TypeConfig, Vote, decode, encode};
use starling_state::{Command, CommandResult};

/// The ALPN of the managers' Raft protocol.
pub const RAFT_ALPN: &[u8] = b"starling/raft/1";

/// Bytes of snapshot per chunk request.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// A partly received snapshot is dropped after this long without a new chunk.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(60);

pub(crate) type Raft = openraft::Raft<TypeConfig, crate::sm_store::StateMachine>;

/// The Raft protocol: managers only, both ways.
pub fn raft_protocol() -> Result<Protocol, starling_transport::ConfigError> {
    Protocol::new(RAFT_ALPN, PeerPolicy::roles([Role::MANAGER]))
}

#[derive(Serialize, Deserialize)]
pub(crate) enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    SnapshotChunk {
        transfer: u64,
        offset: u64,
        data: Vec<u8>,
        /// Set on the last chunk: install with this vote and meta.
        finish: Option<(Vote, SnapshotMeta)>,
    },
    /// A client write forwarded by a follower.
    Write(Arc<Command>),
    /// A follower asks the leader for a linearizable read index.
    ReadIndex,
    /// Are you there? (Counting reachable managers for a no-quorum error.)
    Ping,
    /// The leader's view of its followers: milliseconds since each last answered a
    /// heartbeat.
    Acks,
    /// Client writes forwarded by a follower together; answered one reply each, in order.
    WriteBatch(Vec<Arc<Command>>),
}

/// The answer to a forwarded write or read index.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum LeaderReply<T> {
    Done(T),
    /// This node is not the leader; try that one (if known).
    NotLeader(Option<(u64, ManagerNode)>),
    /// The leader could not reach a quorum.
    NoQuorum(String),
    Failed(String),
}

/// Why a remote call failed, before any Raft semantics.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CallError {
    /// The request did not leave: no connection, or it was closed before sending.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The request is larger than a frame may be; nothing was sent.
    #[error("too large to send: {0}")]
    TooLarge(String),
    /// The request may have arrived, but no answer came back.
    #[error("no answer: {0}")]
    Lost(String),
    #[error("{0}")]
    Remote(String),
    #[error("bad reply: {0}")]
    Decode(String),
    /// The peer could not read the request (a message of a newer version) and refused it
    /// unread: it was not acted on.
    #[error("not understood: {0}")]
    Undecodable(String),
}

/// Sends one RPC to `node` and decodes the reply as `Result<T, String>`.
pub(crate) async fn call<T: DeserializeOwned>(
    endpoint: &Endpoint,
    protocol: &Protocol,
    node: &ManagerNode,
    rpc: &RaftRpc,
) -> Result<T, CallError> {
    use starling_transport::{MessageError, RequestError};
    let not_sent = |why: String| CallError::NotSent(format!("{node}: {why}"));
    let name = NodeId::new(node.name.clone()).map_err(|e| not_sent(e.to_string()))?;
    let addr: SocketAddr = node
        .addr
        .parse()
        .map_err(|e: std::net::AddrParseError| not_sent(e.to_string()))?;
    let body = encode(rpc).map_err(|e| CallError::Decode(e.to_string()))?;
    let reply = endpoint
        .request(protocol, &name, addr, &body)
        .await
        .map_err(|e| match e {
            RequestError::Message(MessageError::FrameTooLarge { .. }) => {
                CallError::TooLarge(format!("{node}: {e}"))
            }
            RequestError::Connect(_) | RequestError::Message(MessageError::NotSent(_)) => {
                not_sent(e.to_string())
            }
            RequestError::Message(MessageError::Refused(code))
                if code == starling_transport::StreamCode::UNDECODABLE =>
            {
                CallError::Undecodable(format!("{node}: {e}"))
            }
            other => CallError::Lost(format!("{node}: {other}")),
        })?;
    let result: Result<T, String> =
        decode(reply.as_bytes()).map_err(|e| CallError::Decode(e.to_string()))?;
    result.map_err(CallError::Remote)
}

/// Makes a Raft client per target manager.
#[derive(Clone)]
pub(crate) struct Network {
    endpoint: Endpoint,
    protocol: Protocol,
    min_budget: Duration,
}

impl Network {
    /// `min_budget` is the least time an RPC gets: openraft hands replication and
    /// heartbeats only a heartbeat interval, which must also cover a (re)connect and the
    /// follower's fsync on a loaded machine.
    pub(crate) fn new(endpoint: Endpoint, protocol: Protocol, min_budget: Duration) -> Self {
        Network {
            endpoint,
            protocol,
            min_budget,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &ManagerNode) -> Self::Network {
        PeerClient {
            target,
            node: node.clone(),
            endpoint: self.endpoint.clone(),
            protocol: self.protocol.clone(),
            min_budget: self.min_budget,
        }
    }
}

/// The Raft client to one manager.
pub(crate) struct PeerClient {
    target: u64,
    node: ManagerNode,
    endpoint: Endpoint,
    protocol: Protocol,
    min_budget: Duration,
}

fn rpc_error(e: CallError) -> RPCError<TypeConfig> {
    match e {
        // Unreachable makes openraft back off (200 ms doubling to 1 s): right for a peer
        // that cannot be dialed or is shutting down, wrong for one lost message.
        CallError::NotSent(_) | CallError::Remote(_) | CallError::TooLarge(_) => {
            RPCError::Unreachable(Unreachable::from_string(e.to_string()))
        }
        CallError::Lost(_) | CallError::Decode(_) | CallError::Undecodable(_) => {
            RPCError::Network(NetworkError::from_string(e.to_string()))
        }
    }
}

impl PeerClient {
    async fn try_rpc<T: DeserializeOwned>(
        &self,
        rpc: &RaftRpc,
        option: &RPCOption,
    ) -> Result<T, CallError> {
        let budget = option.hard_ttl().max(self.min_budget);
        match tokio::time::timeout(
            budget,
            call(&self.endpoint, &self.protocol, &self.node, rpc),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(CallError::Lost(format!(
                "no answer from {} within {budget:?}",
                self.node
            ))),
        }
    }

    async fn rpc<T: DeserializeOwned>(
        &self,
        rpc: &RaftRpc,
        option: &RPCOption,
    ) -> Result<T, RPCError<TypeConfig>> {
        self.try_rpc(rpc, option).await.map_err(rpc_error)
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = crate::sm_store::SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // A batch over the frame limit is sent in halves: the follower takes a prefix and
        // openraft, told of the partial success, sends the rest next.
        let total = rpc.entries.len();
        let mut n = total;
        loop {
            let mut part = rpc.clone();
            part.entries.truncate(n);
            let last = part.entries.last().map(|e| e.log_id);
            match self.try_rpc(&RaftRpc::Append(part), &option).await {
                Ok(AppendEntriesResponse::Success) if n < total => {
                    return Ok(AppendEntriesResponse::PartialSuccess(last));
                }
                Ok(resp) => return Ok(resp),
                Err(CallError::TooLarge(_)) if n > 1 => n /= 2,
                Err(e) => return Err(rpc_error(e)),
            }
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(&RaftRpc::Vote(rpc), &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(&RaftRpc::PreVote(rpc), &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.rpc(&RaftRpc::TransferLeader(req), &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, Self::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // openraft gives the whole transfer one short deadline; the transport's request
        // timeout applies to each chunk instead, so a snapshot of any size gets through.
        let data = snapshot.snapshot;
        let transfer = u64::from_le_bytes(rand_bytes());
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(SNAPSHOT_CHUNK).collect()
        };
        let last = chunks.len() - 1;
        let started = Instant::now();
        tokio::pin!(cancel);
        let mut offset = 0u64;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let rpc = RaftRpc::SnapshotChunk {
                transfer,
                offset,
                data: chunk.to_vec(),
                finish: (i == last).then(|| (vote, snapshot.meta.clone())),
            };
            let sent = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                r = call::<Option<SnapshotResponse<TypeConfig>>>(&self.endpoint, &self.protocol, &self.node, &rpc) => r,
            };
            match sent {
                Ok(Some(resp)) => {
                    debug!(target = self.target, bytes = data.len(), elapsed = ?started.elapsed(), "snapshot sent");
                    return Ok(resp);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(StreamingError::Unreachable(Unreachable::from_string(
                        e.to_string(),
                    )));
                }
            }
            offset += chunk.len() as u64;
        }
        Err(StreamingError::Network(NetworkError::from_string(
            "the receiver did not install the snapshot after the last chunk",
        )))
    }
}

fn rand_bytes() -> [u8; 8] {
    // Uniqueness per sender is enough (transfers are keyed by peer too); the clock and a
    // counter give that without a random number generator.
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_left(40)).to_le_bytes()
}

struct Incoming {
    data: Vec<u8>,
    last_chunk: Instant,
}

/// Answers Raft RPCs from other managers.
#[derive(Clone)]
pub(crate) struct RaftServer {
    raft: Raft,
    transfers: Arc<Mutex<HashMap<(String, u64), Incoming>>>,
    contact: LeaderContact,
}

/// When this manager last heard a leader's AppendEntries (heartbeats included).
#[derive(Clone, Debug)]
pub(crate) struct LeaderContact {
    base: Instant,
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl LeaderContact {
    pub(crate) fn new() -> Self {
        LeaderContact {
            base: Instant::now(),
            last_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    fn heard(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms
            .store(ms.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since a leader was last heard (`None`: never).
    pub(crate) fn silence(&self) -> Option<std::time::Duration> {
        match self.last_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.base
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(ms)),
            ),
        }
    }
}

impl RaftServer {
    pub(crate) fn new(raft: Raft, contact: LeaderContact) -> Self {
        RaftServer {
            raft,
            transfers: Arc::new(Mutex::new(HashMap::new())),
            contact,
        }
    }

    /// Serves admitted connections until the listener ends.
    pub(crate) async fn serve(self, mut listener: starling_transport::Listener) {
        while let Some(conn) = listener.accept().await {
            let server = self.clone();
            tokio::spawn(async move {
                let peer = conn
                    .peer()
                    .map(|p| p.node_id.to_string())
                    .unwrap_or_default();
                loop {
                    match conn.accept().await {
                        Ok(starling_transport::Inbound::Request(req)) => {
                            let server = server.clone();
                            let peer = peer.clone();
                            tokio::spawn(async move {
                                let reply = match decode::<RaftRpc>(req.body().as_bytes()) {
                                    Ok(rpc) => server.handle(&peer, rpc).await,
                                    Err(e) => {
                                        warn!(%peer, error = %e, "undecodable raft message");
                                        req.refuse(starling_transport::StreamCode::UNDECODABLE);
                                        return;
                                    }
                                };
                                if let Err(e) = req.respond(&reply).await {
                                    debug!(%peer, error = %e, "raft reply not delivered");
                                }
                            });
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
        }
    }

    async fn handle(&self, peer: &str, rpc: RaftRpc) -> Vec<u8> {
        fn reply<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Vec<u8> {
            let r = r.map_err(|e| e.to_string());
            encode(&r).unwrap_or_default()
        }
        match rpc {
            RaftRpc::Append(req) => {
                self.contact.heard();
                reply(self.raft.append_entries(req).await)
            }
            RaftRpc::Vote(req) => reply(self.raft.vote(req).await),
            RaftRpc::PreVote(req) => reply(self.raft.pre_vote(req).await),
            RaftRpc::TransferLeader(req) => reply(self.raft.handle_transfer_leader(req).await),
            RaftRpc::SnapshotChunk {
                transfer,
                offset,
                data,
                finish,
            } => reply(
                self.snapshot_chunk(peer, transfer, offset, data, finish)
                    .await,
            ),
            RaftRpc::Write(cmd) => reply(Ok::<_, String>(leader_write(&self.raft, cmd).await)),
            // Submitted together, so they share the leader's appends and replication rounds;
            // answered in the batch's order.
            RaftRpc::WriteBatch(cmds) => {
                let writes = cmds.into_iter().map(|cmd| leader_write(&self.raft, cmd));
                reply(Ok::<_, String>(futures::future::join_all(writes).await))
            }
            RaftRpc::ReadIndex => reply(Ok::<_, String>(leader_read_index(&self.raft).await)),
            RaftRpc::Ping => reply(Ok::<_, String>(())),
            RaftRpc::Acks => {
                let acks = crate::store::acks_of(&self.raft);
                reply(Ok::<_, String>(acks))
            }
        }
    }

    async fn snapshot_chunk(
        &self,
        peer: &str,
        transfer: u64,
        offset: u64,
        data: Vec<u8>,
        finish: Option<(Vote, SnapshotMeta)>,
    ) -> Result<Option<SnapshotResponse<TypeConfig>>, String> {
        let key = (peer.to_owned(), transfer);
        let complete = {
            let mut transfers = self.transfers.lock().unwrap_or_else(|p| p.into_inner());
            // One transfer per peer: a new one (a retry) replaces an unfinished one, and
            // idle transfers are dropped, so memory stays bounded by the number of managers.
            transfers.retain(|(p, t), inc| {
                inc.last_chunk.elapsed() < SNAPSHOT_IDLE && (p != peer || *t == transfer)
            });
            let entry = transfers.entry(key.clone()).or_insert_with(|| Incoming {
                data: Vec::new(),
                last_chunk: Instant::now(),
            });
            let received = entry.data.len();
            if received as u64 != offset {
                transfers.remove(&key);
                return Err(format!(
                    "snapshot chunk at offset {offset} does not follow the {received} bytes received"
                ));
            }
            entry.data.extend_from_slice(&data);
            entry.last_chunk = Instant::now();
            match finish {
                Some(f) => transfers.remove(&key).map(|t| (t.data, f)),
                None => None,
            }
        };
        let Some((data, (vote, meta))) = complete else {
            return Ok(None);
        };
        let snapshot = openraft::alias::SnapshotOf::<TypeConfig, crate::sm_store::SnapshotData> {
            meta,
            snapshot: Arc::new(data),
        };
        self.raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

fn leader_hint(
    raft: &Raft,
    f: &openraft::errors::ForwardToLeader<TypeConfig>,
) -> Option<(u64, ManagerNode)> {
    if let (Some(id), Some(node)) = (f.leader_id, f.leader_node.clone()) {
        return Some((id, node));
    }
    let m = raft.metrics().borrow_watched().clone();
    let id = m.current_leader?;
    let node = m.membership_config.membership().get_node(&id)?.clone();
    Some((id, node))
}

/// Runs a write on this node as leader.
///
/// openraft takes a write only while the leader's lease holds: a quorum acknowledged it
/// less than a lease (the longest election timeout) ago. A leader just elected has no
/// acknowledgement until its first append comes back, a millisecond or two later; a write
/// arriving in between (the client's retry after a failover, which is what a failover is
/// timed by) waits here for the acknowledgement instead of bouncing and being retried a
/// heartbeat later. It waits one lease at most: a leader not acknowledged by then is cut off
/// and the write is answered as not the leader, as before.
pub(crate) async fn leader_write(raft: &Raft, cmd: Arc<Command>) -> LeaderReply<CommandResult> {
    use openraft::errors::{ClientWriteError, ForwardReason, RaftError};
    type Metrics = openraft::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>;
    let mut lease: Option<(Instant, Metrics)> = None;
    loop {
        match raft.client_write(cmd.clone()).await {
            Ok(resp) => return LeaderReply::Done(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                if f.reason == ForwardReason::LeaseExpired =>
            {
                match &mut lease {
                    // Watch the metrics (an acknowledgement changes them), then try once
                    // more at once: the acknowledgement may have come before the watch.
                    None => {
                        let mut rx = raft.metrics();
                        rx.borrow_and_update();
                        let until = Instant::now()
                            + Duration::from_millis(raft.config().election_timeout_max);
                        lease = Some((until, rx));
                    }
                    Some((until, rx)) => {
                        let changed = tokio::time::timeout_at((*until).into(), rx.changed()).await;
                        if !changed.is_ok_and(|r| r.is_ok()) {
                            return LeaderReply::NotLeader(leader_hint(raft, &f));
                        }
                    }
                }
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                return LeaderReply::NotLeader(leader_hint(raft, &f));
            }
            Err(e) => return LeaderReply::Failed(e.to_string()),
        }
    }
}

/// Confirms leadership and returns the index a linearizable read must wait for.
///
/// Leadership is confirmed by the leader lease: a quorum acknowledged a heartbeat or an
/// append this leader *sent* less than the lease ago (the longest election timeout, 120 ms
/// by default), and a voter grants no vote, pre-vote or real, until that long after it last
/// heard a leader — so no other leader can exist yet and the leader's commit index is the
/// latest. Only when the last acknowledgement is older does the read send a heartbeat round
/// and wait for a quorum (up to one lease), as a read index does every time. This holds
/// while the managers' monotonic clocks run at nearly the same rate over one lease (they
/// need not agree on the time); a clock that jumps forward on a follower, or stands still
/// on the leader while time passes, breaks it. Reads forwarded by followers are confirmed
/// the same way.
pub(crate) async fn leader_read_index(raft: &Raft) -> LeaderReply<u64> {
    use openraft::errors::{LinearizableReadError, RaftError};
    // `None`: an acknowledgement up to one lease old will do; `true`: if it is older, send a
    // heartbeat round at once rather than waiting for the next periodic one.
    match raft
        .ensure_linearizable(LinearizerOption::new(None, true))
        .await
    {
        Ok(read) => LeaderReply::Done(read.log_id().index),
        Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
            LeaderReply::NotLeader(leader_hint(raft, &f))
        }
        Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q))) => {
            LeaderReply::NoQuorum(q.to_string())
        }
        Err(e) => LeaderReply::Failed(e.to_string()),
    }
}
