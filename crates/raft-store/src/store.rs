//! The typed handle the node crate uses: open a manager's store, write (forwarded to the
//! leader), read with a consistency level, watch, and change the voter set.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use starling_transport::{Endpoint, NodeId, Protocol};
use tokio::sync::broadcast;
use tracing::{debug, info};

use crate::forward::ForwardStats;
use crate::log_store::LogStore;
use crate::network::{
    CallError, LeaderReply, Network, Raft, RaftRpc, RaftServer, call, leader_read_index,
    leader_write, raft_protocol,
};
use crate::poll::PollBeforeSleep;
use crate::sm_store::{Shared, StateMachine, WatchSignal};
use crate::types::{ManagerNode, TypeConfig};
use crate::wal::WalOptions;
use starling_state::{ClusterState, Command, CommandResult, KvEvent};

/// Settings of a manager's store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Where the log and snapshots live (created if missing).
    pub data_dir: PathBuf,
    /// This manager's Raft id: assigned once by the cluster, never reused.
    pub raft_id: u64,
    /// This manager's transport node id and address, as other managers reach it.
    pub node: ManagerNode,
    /// Scales heartbeat and election timeouts (1 = 30 ms heartbeat, 80–120 ms election
    /// timeout, pre-vote on: a follower that misses heartbeats asks before it campaigns, and
    /// peers that still hear the leader refuse, so a slow moment does not depose a healthy
    /// leader). Raise it on slow or heavily loaded machines.
    pub timing_multiplier: u32,
    /// Time for a write or read to be answered once a leader is known.
    pub request_timeout: Duration,
    /// Log entries between snapshots (100 000 by default, etcd's snapshot count). The log
    /// since the last snapshot is held in memory and replayed at start; each snapshot
    /// encodes and syncs the whole state on every manager (28 MB for 100 000 keys of 256
    /// bytes), so under a steady write load fewer snapshots cost less CPU and disk.
    pub snapshot_interval: u64,
    /// How long a new manager may take to catch up before it becomes a voter.
    pub catch_up_timeout: Duration,
    /// Changes buffered for live watchers ([`WATCH_BUFFER`] by default); a watcher that
    /// falls further behind catches up from the kept history, unseen by its reader.
    pub watch_buffer: usize,
    /// Whether the log's writer thread polls its queue briefly before it sleeps while busy
    /// (off by default; see [`PollBeforeSleep`]).
    pub poll_before_sleep: PollBeforeSleep,
}

/// The default [`StoreConfig::watch_buffer`]: every slot is allocated up front (about 120
/// bytes each), so this is memory an idle manager holds.
pub const WATCH_BUFFER: usize = 4096;

impl StoreConfig {
    /// A configuration with default timing for `raft_id` / `node` in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>, raft_id: u64, node: ManagerNode) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            raft_id,
            node,
            timing_multiplier: 1,
            request_timeout: Duration::from_secs(5),
            snapshot_interval: 100_000,
            catch_up_timeout: Duration::from_secs(120),
            watch_buffer: WATCH_BUFFER,
            poll_before_sleep: PollBeforeSleep::default(),
        }
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(HEARTBEAT_MS * u64::from(self.timing_multiplier.max(1)))
    }

    /// The longest election timeout.
    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(ELECTION_MAX_MS * u64::from(self.timing_multiplier.max(1)))
    }

    /// The bound on a write or linearizable read that cannot reach a quorum:
    /// 2 × the election timeout plus the request timeout.
    pub fn quorum_deadline(&self) -> Duration {
        2 * self.election_timeout_max() + self.request_timeout
    }

    fn raft_config(&self) -> Result<openraft::Config, StoreError> {
        let m = u64::from(self.timing_multiplier.max(1));
        let config = openraft::Config {
            cluster_name: "starling".into(),
            heartbeat_interval: HEARTBEAT_MS * m,
            election_timeout_min: ELECTION_MIN_MS * m,
            election_timeout_max: ELECTION_MAX_MS * m,
            // A restarted leader must win an election again: its commit mark may not have
            // reached the disk before the crash, and resuming leadership on a stale commit
            // index could serve stale linearizable reads.
            enable_leader_restore: Some(false),
            // Per request here; snapshots are chunked with a timeout per chunk.
            install_snapshot_timeout: 1000 * m,
            enable_pre_vote: Some(true),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_interval),
            max_in_snapshot_log_to_keep: 1_000,
            max_payload_entries: 512,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| StoreError::Config(e.to_string()))
    }
}

/// An operation that must run on the leader: locally when this node leads, else forwarded.
trait LeaderCall: Send + Sync {
    type Out: serde::de::DeserializeOwned + Send;
    /// Whether the call may be repeated when its answer is lost (reads may, writes not).
    const REPEATABLE: bool;
    /// Sends the call to the leader `node` from `store`, a follower.
    fn forward(
        &self,
        store: &Store,
        node: &ManagerNode,
    ) -> impl Future<Output = Result<LeaderReply<Self::Out>, CallError>> + Send;
    fn local(&self, raft: &Raft) -> impl Future<Output = LeaderReply<Self::Out>> + Send;
}

/// Where a call to the leader goes.
#[derive(Debug)]
enum Leader {
    /// No leader known (or not in the membership yet): wait for one.
    Unknown,
    /// This manager.
    Here,
    /// Another manager: forwarded to it.
    There(u64, ManagerNode),
}

/// A write (shared: the Raft log's entries hold it without copying the key and value) and
/// its encoded size.
struct WriteCall(Arc<Command>, usize);

impl LeaderCall for WriteCall {
    type Out = CommandResult;
    const REPEATABLE: bool = false;
    /// In a batch with the writes this manager forwards beside it.
    fn forward(
        &self,
        store: &Store,
        node: &ManagerNode,
    ) -> impl Future<Output = Result<LeaderReply<CommandResult>, CallError>> + Send {
        store.pipes.write(node, self.0.clone(), self.1)
    }
    fn local(&self, raft: &Raft) -> impl Future<Output = LeaderReply<CommandResult>> + Send {
        leader_write(raft, self.0.clone())
    }
}

struct ReadIndexCall;

impl LeaderCall for ReadIndexCall {
    type Out = u64;
    const REPEATABLE: bool = true;
    async fn forward(
        &self,
        store: &Store,
        node: &ManagerNode,
    ) -> Result<LeaderReply<u64>, CallError> {
        call(&store.endpoint, &store.protocol, node, &RaftRpc::ReadIndex).await
    }
    fn local(&self, raft: &Raft) -> impl Future<Output = LeaderReply<u64>> + Send {
        leader_read_index(raft)
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read began (Raft read index, confirmed
    /// with a quorum by the leader).
    #[default]
    Linearizable,
    /// This manager's local state, answered even without a quorum; the revision says how
    /// current it is.
    Stale,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No quorum of managers answered within the deadline. Nothing was acknowledged; a
    /// write may still be committed if the quorum comes back before a new leader is chosen.
    #[error(
        "no quorum: {reachable} of {voters} managers reachable, {needed} needed (gave up after {waited:?})"
    )]
    NoQuorum {
        /// Managers (this one included) that answered a probe.
        reachable: usize,
        /// Voting managers.
        voters: usize,
        /// Needed for a quorum.
        needed: usize,
        /// How long the operation waited.
        waited: Duration,
    },
    /// The outcome is unknown: the request reached the leader, but its answer was lost.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// `watch` asked for revisions that are no longer kept.
    #[error("revision {requested} is compacted; the oldest available is {oldest}")]
    Compacted {
        /// Requested start.
        requested: u64,
        /// Oldest revision still available.
        oldest: u64,
    },
    /// The command is larger than [`MAX_COMMAND_BYTES`]; nothing was written.
    #[error("command of {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Its encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// This node is not the leader, for an operation that must run there.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<String>,
    },
    /// The log or snapshot files could not be read or written.
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    /// openraft reported an error.
    #[error("raft: {0}")]
    Raft(String),
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Raft takes one membership change at a time and an earlier one was still being
    /// committed when the deadline passed; nothing changed, and the call may be retried.
    #[error("another membership change is still being committed; retry")]
    MembershipChangeInProgress,
    /// This manager's Raft stopped after a fatal error (its disk full or failing): it serves
    /// neither reads nor writes until it is restarted once the cause is fixed; the other
    /// managers go on without it. Nothing was done.
    #[error("this manager's raft stopped after a fatal error ({0}); fix the cause and restart it")]
    Stopped(String),
    /// A linearizable read: this manager did not apply the leader's commit index in time
    /// (it is behind); nothing was read, and another manager may answer.
    #[error("this manager did not catch up to revision {index} in time")]
    Lagging {
        /// The revision it had to reach.
        index: u64,
    },
}

impl StoreError {
    /// The same error again (for every read of a batch whose leader call failed).
    fn duplicate(&self) -> StoreError {
        use StoreError::*;
        match self {
            NoQuorum {
                reachable,
                voters,
                needed,
                waited,
            } => NoQuorum {
                reachable: *reachable,
                voters: *voters,
                needed: *needed,
                waited: *waited,
            },
            Unknown(s) => Unknown(s.clone()),
            Compacted { requested, oldest } => Compacted {
                requested: *requested,
                oldest: *oldest,
            },
            TooLarge { size, max } => TooLarge {
                size: *size,
                max: *max,
            },
            NotLeader { leader } => NotLeader {
                leader: leader.clone(),
            },
            Storage(e) => Storage(std::io::Error::new(e.kind(), e.to_string())),
            Raft(s) => Raft(s.clone()),
            Config(s) => Config(s.clone()),
            MembershipChangeInProgress => MembershipChangeInProgress,
            Stopped(s) => Stopped(s.clone()),
            Lagging { index } => Lagging { index: *index },
        }
    }
}

/// The largest command a write may carry, encoded (etcd's default request limit is 1.5 MiB).
/// Keeping commands well under the transport's frame limit keeps every replication batch
/// sendable.
pub const MAX_COMMAND_BYTES: usize = 1 << 20;

/// A learner this close to the leader's last entry counts as caught up.
const CAUGHT_UP_LAG: u64 = 64;

/// Time given to probing the other managers when reporting a lost quorum.
const PROBE_TIME: Duration = Duration::from_millis(300);

/// The leader's heartbeat interval, ms (× `timing_multiplier`).
const HEARTBEAT_MS: u64 = 30;
/// The election timeout range, ms (× `timing_multiplier`). openraft keeps a follower's lease
/// on its leader for the longest election timeout and starts counting the election timeout
/// after it, so a follower stands for election `ELECTION_MAX_MS` + a random timeout in this
/// range after the last heartbeat it heard: that sum is both the failover time and the
/// longest pause of the leader's heartbeats a follower tolerates (200–240 ms).
const ELECTION_MIN_MS: u64 = 80;
const ELECTION_MAX_MS: u64 = 120;

/// Linearizable reads waiting for a read index: one leader call serves every read that
/// arrived while the call before it was in flight (a read index must be asked after the
/// read began, so a read never shares a call already sent).
#[derive(Default)]
struct ReadBatch {
    state: std::sync::Mutex<BatchState>,
}

#[derive(Default)]
struct BatchState {
    /// Whether a read is asking the leader now (or the turn is on its way to one).
    asking: bool,
    /// Reads that arrived meanwhile; the next call serves them.
    waiting: Vec<tokio::sync::oneshot::Sender<BatchAnswer>>,
}

enum BatchAnswer {
    /// The read index of the call made for this read's group.
    Index(u64),
    /// This read asks the leader next, for itself and the group in the turn.
    Ask(Turn),
    /// The group's call failed with this error.
    Failed(StoreError),
}

impl ReadBatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The read index for one read: asked with `ask` by this read, or taken from the next
    /// call another read makes after this one arrived. `ask` gets the time its read arrived,
    /// the earliest of its group (reads queue in arrival order), to keep every read of the
    /// group within its deadline although it waited for the call before.
    async fn share<F, Fut>(self: &Arc<Self>, ask: F) -> Result<u64, StoreError>
    where
        F: Fn(Instant) -> Fut,
        Fut: Future<Output = Result<u64, StoreError>>,
    {
        let arrived = Instant::now();
        let rx = {
            let mut st = self.lock();
            if st.asking {
                let (tx, rx) = tokio::sync::oneshot::channel();
                st.waiting.push(tx);
                Some(rx)
            } else {
                st.asking = true;
                None
            }
        };
        let mut turn = match rx {
            None => Turn {
                batch: Some(self.clone()),
                group: Vec::new(),
            },
            Some(rx) => match rx.await {
                Ok(BatchAnswer::Index(index)) => return Ok(index),
                Ok(BatchAnswer::Failed(e)) => return Err(e),
                Ok(BatchAnswer::Ask(turn)) => turn,
                // The read asking for this one went away mid-call: ask alone.
                Err(_) => return ask(arrived).await,
            },
        };
        let result = ask(arrived).await;
        for tx in std::mem::take(&mut turn.group) {
            let answer = match &result {
                Ok(index) => BatchAnswer::Index(*index),
                Err(e) => BatchAnswer::Failed(e.duplicate()),
            };
            let _ = tx.send(answer);
        }
        // Hands the reads that arrived meanwhile to the next asker (also when this read is
        // dropped mid-call).
        drop(turn);
        result
    }
}

/// The turn to ask the leader, with the reads to answer. However it ends — the asker done,
/// dropped mid-call, or the turn dropped before its read took it — the reads that arrived
/// meanwhile are handed to one of them (or asking stops), so no read waits on a turn nobody
/// holds; a group dropped unanswered sees its senders gone and asks alone.
struct Turn {
    /// `None` once handed on (nothing left to do on drop).
    batch: Option<Arc<ReadBatch>>,
    group: Vec<tokio::sync::oneshot::Sender<BatchAnswer>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(batch) = self.batch.take() else {
            return;
        };
        let mut st = batch.lock();
        let mut next = std::mem::take(&mut st.waiting);
        while !next.is_empty() {
            let first = next.remove(0);
            let turn = Turn {
                batch: Some(batch.clone()),
                group: next,
            };
            match first.send(BatchAnswer::Ask(turn)) {
                Ok(()) => return,
                // That read is gone: take the group back and offer the turn to the next.
                Err(BatchAnswer::Ask(mut back)) => {
                    back.batch = None;
                    next = std::mem::take(&mut back.group);
                }
                Err(_) => return,
            }
        }
        st.asking = false;
    }
}

/// A manager's replicated store.
pub struct Store {
    raft: Raft,
    sm: Arc<Shared>,
    endpoint: Endpoint,
    protocol: Protocol,
    config: StoreConfig,
    server: tokio::task::JoinHandle<()>,
    contact: crate::network::LeaderContact,
    reads: Arc<ReadBatch>,
    /// Writes forwarded to the leader, batched.
    pipes: crate::forward::Pipes,
    /// Stops upgrading when the log is closed.
    log_closed: std::sync::Weak<crate::wal::Wal>,
}

/// How long opening waits for a closing store's log lock, and shutdown for the log to close.
const LOG_LOCK_WAIT: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("raft_id", &self.config.raft_id)
            .field("node", &self.config.node)
            .finish_non_exhaustive()
    }
}

/// A Raft status summary, for `node ls` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    /// This manager's Raft id.
    pub id: u64,
    /// Whether it leads.
    pub is_leader: bool,
    /// The leader's Raft id, if known.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Voting members.
    pub voters: BTreeSet<u64>,
    /// Non-voting members.
    pub learners: BTreeSet<u64>,
    /// Members and where they are reached.
    pub nodes: Vec<(u64, ManagerNode)>,
    /// Last log index applied here (the revision of the local state).
    pub applied: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// On the leader: how long ago each follower last acknowledged a heartbeat (absent:
    /// never). Empty on followers.
    pub acked: std::collections::BTreeMap<u64, Duration>,
}

/// Keeps `flag` set while every quorum of this member's membership can form without it
/// (`me`), until Raft stops. Read by the log store to gather the leader's own syncs.
async fn watch_quorum_without(
    mut rx: openraft::alias::WatchReceiverOf<
        TypeConfig,
        openraft::metrics::RaftServerMetrics<TypeConfig>,
    >,
    me: u64,
    flag: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        let without = quorum_without(me, rx.borrow_and_update().membership_config.membership());
        flag.store(without, std::sync::atomic::Ordering::Relaxed);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Whether a majority of every configuration of `membership` (two during a joint change)
/// can be found among its voters other than `me`: three voters or more, or `me` not a voter.
fn quorum_without(me: u64, membership: &openraft::Membership<u64, ManagerNode>) -> bool {
    membership.get_joint_config().iter().all(|voters| {
        let others = voters.iter().filter(|id| **id != me).count();
        others > voters.len() / 2
    })
}

/// Milliseconds since each follower last acknowledged the leader's heartbeat (empty unless
/// `raft` leads).
pub(crate) fn acks_of(raft: &Raft) -> std::collections::BTreeMap<u64, u64> {
    let m = raft.metrics().borrow_watched().clone();
    m.heartbeat
        .as_ref()
        .map(|h| {
            h.iter()
                .filter_map(|(id, at)| {
                    at.as_ref().map(|t| {
                        use openraft::Instant as _;
                        (
                            *id,
                            u64::try_from((**t).elapsed().as_millis()).unwrap_or(u64::MAX),
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A stream of key-value changes under a prefix.
pub struct Watch {
    sm: Arc<Shared>,
    backlog: std::collections::VecDeque<Arc<KvEvent>>,
    live: broadcast::Receiver<WatchSignal>,
    prefix: String,
    /// Live events below this revision were already in the backlog.
    live_from: u64,
    /// Revision of the last event returned (to say where to resume).
    last: Option<u64>,
    /// How many events of revision `last` were returned (a transaction has several).
    at_last: usize,
    /// Set once events may have been missed: the watch only reports that from then on.
    broken: Option<u64>,
}

impl Watch {
    /// The next change, in revision order, with no gap and no duplicate; `Err` with the
    /// revision to resume from if this watcher fell too far behind the live stream.
    pub async fn next(&mut self) -> Result<Arc<KvEvent>, StoreError> {
        if let Some(oldest) = self.broken {
            return Err(self.compacted(oldest));
        }
        loop {
            if let Some(e) = self.backlog.pop_front() {
                return Ok(self.returned(e));
            }
            match self.live.recv().await {
                Ok(WatchSignal::Event(e))
                    if e.revision >= self.live_from && e.key.starts_with(&self.prefix) =>
                {
                    return Ok(self.returned(e));
                }
                Ok(WatchSignal::Event(_)) => {}
                Ok(WatchSignal::Reset { revision }) if revision >= self.live_from => {
                    // A snapshot replaced the state: changes up to it were never seen here.
                    self.broken = Some(revision + 1);
                    return Err(self.compacted(revision + 1));
                }
                Ok(WatchSignal::Reset { .. }) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Events were dropped for this slow watcher: it catches up from the
                    // history when that still holds them, else the caller resumes with a
                    // new watch from the revision after the last one it got.
                    if self.catch_up() {
                        continue;
                    }
                    let next = self.resume_from();
                    self.broken = Some(next);
                    return Err(self.compacted(next));
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(StoreError::Raft("store closed".into()));
                }
            }
        }
    }

    fn returned(&mut self, e: Arc<KvEvent>) -> Arc<KvEvent> {
        if self.last == Some(e.revision) {
            self.at_last += 1;
        } else {
            self.last = Some(e.revision);
            self.at_last = 1;
        }
        e
    }

    /// After a lag: the changes since the last one returned, from the kept history, then
    /// live ones again. False if the history no longer reaches back that far.
    fn catch_up(&mut self) -> bool {
        // Subscribed before the history is read, as at the start.
        let live = self.sm.events.subscribe();
        let st = self.sm.read();
        let from = self.last.unwrap_or(self.live_from);
        let Ok(events) = st.data.history_since(&self.prefix, from) else {
            return false;
        };
        // The events of revision `last` already returned come first: skip them.
        let skip = if self.last.is_some() { self.at_last } else { 0 };
        let mut seen = 0;
        self.backlog = events
            .into_iter()
            .filter(|e| {
                if e.revision == from && seen < skip {
                    seen += 1;
                    false
                } else {
                    true
                }
            })
            .collect();
        self.live = live;
        self.live_from = (st.data.revision() + 1).max(self.live_from);
        true
    }

    /// The revision to start a new watch from to continue this one. Events of the last
    /// revision already returned are delivered again from there if that revision held
    /// several (a transaction); skip those by key.
    pub fn resume_from(&self) -> u64 {
        self.last.map_or(self.live_from, |r| r + 1)
    }

    fn compacted(&self, oldest: u64) -> StoreError {
        StoreError::Compacted {
            requested: self.resume_from(),
            oldest,
        }
    }
}

impl Store {
    /// Opens the store in `config.data_dir` and starts Raft; serves the Raft protocol on
    /// `endpoint` (which must hold a manager certificate). A new store is empty until
    /// [`Store::initialize`] (first manager) or until a leader adds it.
    pub async fn open(config: StoreConfig, endpoint: Endpoint) -> Result<Self, StoreError> {
        let raft_config = Arc::new(config.raft_config()?);
        std::fs::create_dir_all(&config.data_dir)?;
        let log_dir = config.data_dir.join("log");
        // A store of this process closed just now on the same directory may still be
        // letting go of its log (openraft's tasks drop it after the core stops): wait for
        // it a little rather than refuse; another process's open log is refused after that.
        let deadline = Instant::now() + LOG_LOCK_WAIT;
        let wal_options = WalOptions::default().poll_before_sleep(config.poll_before_sleep);
        let log = loop {
            match LogStore::open_with(&log_dir, wal_options.clone()) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => break other?.of_member(config.raft_id),
            }
        };
        let log_closed = log.closed_when_dropped();
        let quorum_without_me = log.quorum_without_me();
        let sm = StateMachine::open_with(&config.data_dir.join("state"), config.watch_buffer)?;
        let shared = sm.shared.clone();
        let protocol = raft_protocol().map_err(|e| StoreError::Config(e.to_string()))?;
        let listener = endpoint
            .listen(&protocol)
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let network = Network::new(
            endpoint.clone(),
            protocol.clone(),
            Duration::from_millis(500 * u64::from(config.timing_multiplier.max(1))),
        );
        let raft = Raft::new(config.raft_id, raft_config, network, log, sm)
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))?;
        tokio::spawn(watch_quorum_without(
            raft.server_metrics(),
            config.raft_id,
            quorum_without_me,
        ));
        let contact = crate::network::LeaderContact::new();
        let server = tokio::spawn(RaftServer::new(raft.clone(), contact.clone()).serve(listener));
        info!(raft_id = config.raft_id, node = %config.node, "raft store open");
        let pipes = crate::forward::Pipes::new(endpoint.clone(), protocol.clone());
        Ok(Store {
            raft,
            sm: shared,
            endpoint,
            protocol,
            config,
            server,
            contact,
            reads: Arc::default(),
            pipes,
            log_closed,
        })
    }

    /// Makes this manager the single voter of a new cluster. Does nothing if the store
    /// already belongs to a cluster.
    pub async fn initialize(&self) -> Result<(), StoreError> {
        if self
            .raft
            .is_initialized()
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))?
        {
            return Ok(());
        }
        let mut members = std::collections::BTreeMap::new();
        members.insert(self.config.raft_id, self.config.node.clone());
        self.raft
            .initialize(members)
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))
    }

    /// This manager's Raft id.
    pub fn raft_id(&self) -> u64 {
        self.config.raft_id
    }

    /// The current Raft status.
    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        RaftStatus {
            id: self.config.raft_id,
            is_leader: m.state == ServerState::Leader,
            leader: m.current_leader,
            term: m.current_term,
            voters,
            learners,
            nodes: membership.nodes().map(|(i, n)| (*i, n.clone())).collect(),
            applied: self.sm.read().data.revision(),
            last_log_index: m.last_log_index.unwrap_or(0),
            acked: acks_of(&self.raft)
                .into_iter()
                .map(|(id, ms)| (id, Duration::from_millis(ms)))
                .collect(),
        }
    }

    /// The members of the Raft group (voters and learners) with their addresses: the part
    /// of [`Store::status`] that callers on a hot path need, without copying the metrics.
    pub fn managers(&self) -> Vec<(u64, ManagerNode)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .membership()
            .nodes()
            .map(|(i, n)| (*i, n.clone()))
            .collect()
    }

    /// The log index of the membership in effect: it changes whenever the managers or
    /// their addresses change (for caches of [`Store::managers`]).
    pub fn membership_index(&self) -> u64 {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config.log_id().as_ref().map_or(0, |l| l.index)
    }

    fn leader_node(&self) -> Option<(u64, ManagerNode)> {
        self.leader_view().1
    }

    /// The leader this manager knows of, and its node if it is in the membership (one read
    /// of the server metrics, borrowed, not cloned).
    fn leader_view(&self) -> (Option<u64>, Option<(u64, ManagerNode)>) {
        let metrics = self.raft.server_metrics();
        let m = metrics.borrow_watched();
        let Some(id) = m.current_leader else {
            return (None, None);
        };
        let node = m.membership_config.membership().get_node(&id).cloned();
        (Some(id), node.map(|n| (id, n)))
    }

    /// The leader this manager knows of, and where a call goes: here, or to its node (if it
    /// is in the membership). Runs for every write and read index: one borrowed read of the
    /// server metrics, and the node copied only when the call is forwarded.
    ///
    /// From the server metrics, which [`Store::leader_view_leaves`] waits on: openraft
    /// sends them before the full metrics, so a call that read its leader from the full
    /// metrics could see no leader there while the wait sees one, and loop without ever
    /// waiting (a hot spin on its thread, up to the quorum deadline, until the full metrics
    /// caught up).
    fn leader_for_call(&self) -> (Option<u64>, Leader) {
        let metrics = self.raft.server_metrics();
        let m = metrics.borrow_watched();
        let Some(id) = m.current_leader else {
            return (None, Leader::Unknown);
        };
        if id == self.config.raft_id {
            return (Some(id), Leader::Here);
        }
        let there = match m.membership_config.membership().get_node(&id) {
            Some(node) => Leader::There(id, node.clone()),
            None => Leader::Unknown,
        };
        (Some(id), there)
    }

    /// Runs `op` on the leader (here, or forwarded), retrying while there is no leader or
    /// the leader moved, until the quorum deadline.
    async fn on_leader<L: LeaderCall>(&self, op: L) -> Result<L::Out, StoreError> {
        self.on_leader_since(op, Instant::now()).await
    }

    /// [`Store::on_leader`] for an operation that began at `started`: it gives up within the
    /// quorum deadline from then (a batched read that waited for the call before its own).
    async fn on_leader_since<L: LeaderCall>(
        &self,
        op: L,
        started: Instant,
    ) -> Result<L::Out, StoreError> {
        // Keep time for the reachability probes of a no-quorum answer inside the bound.
        let deadline = started + self.config.quorum_deadline() - PROBE_TIME;
        let mut hint: Option<(u64, ManagerNode)> = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.no_quorum(started.elapsed()).await);
            }
            let (seen, known) = self.leader_for_call();
            let target = match hint.take() {
                Some((id, _)) if id == self.config.raft_id => Leader::Here,
                Some((id, node)) => Leader::There(id, node),
                None => known,
            };
            debug!(?target, elapsed = ?started.elapsed(), "leader call");
            let reply = match target {
                Leader::Unknown => None,
                Leader::Here => match tokio::time::timeout(remaining, op.local(&self.raft)).await {
                    Ok(r) => Some(r),
                    Err(_) => return Err(self.no_quorum(started.elapsed()).await),
                },
                // A leader not heard from for longer than an election timeout is cut off
                // from this manager (a partition): sending it the call would only make its
                // outcome unknown. Wait for it to be heard again or replaced, or for the
                // deadline (no quorum).
                Leader::There(..)
                    if self
                        .contact
                        .silence()
                        .is_none_or(|s| s > 2 * self.config.election_timeout_max()) =>
                {
                    None
                }
                Leader::There(id, node) => {
                    // Dial first: nothing is sent yet, so giving up when the leader moves
                    // (a dead leader's address would take the whole connect timeout) is safe.
                    let dialed = tokio::select! {
                        d = tokio::time::timeout(remaining, self.dial(&node)) => match d {
                            Ok(ok) => ok,
                            Err(_) => return Err(self.no_quorum(started.elapsed()).await),
                        },
                        // Nothing sent: go to the new leader at once.
                        _ = self.leader_moves_from(id, seen) => continue,
                    };
                    // A write forwarded to a leader that has gone quiet (not heard for
                    // more than a heartbeat: a partition may have just begun) would have an
                    // unknown outcome if no answer came. Ask first whether it answers at
                    // all; if not, nothing is sent and the call waits as for no leader.
                    // A leader elected meanwhile ends the question (a dead leader's ping
                    // would otherwise hold the call for the whole probe time).
                    let dialed = dialed
                        && (L::REPEATABLE
                            || self
                                .contact
                                .silence()
                                .is_some_and(|s| s <= self.config.heartbeat())
                            || tokio::select! {
                                r = tokio::time::timeout(
                                    PROBE_TIME.min(remaining),
                                    call::<()>(&self.endpoint, &self.protocol, &node, &RaftRpc::Ping),
                                ) => r.is_ok_and(|r| r.is_ok()),
                                _ = self.leader_moves_from(id, seen) => continue,
                            });
                    if dialed {
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        // A leader that died without closing its connection looks alive
                        // until the idle timeout: stop waiting for it once another leader
                        // is known.
                        let sent = tokio::select! {
                            r = tokio::time::timeout(remaining, op.forward(self, &node)) => Some(r),
                            _ = self.leader_moves_from(id, seen) => None,
                        };
                        match sent {
                            Some(Ok(Ok(r))) => Some(r),
                            Some(Ok(Err(CallError::NotSent(e)))) => {
                                debug!(leader = %node, error = %e, "leader unreachable; retrying");
                                None
                            }
                            Some(Ok(Err(e))) if !L::REPEATABLE => {
                                return Err(StoreError::Unknown(e.to_string()));
                            }
                            Some(Ok(Err(_))) => None,
                            Some(Err(_)) if !L::REPEATABLE => {
                                return Err(StoreError::Unknown(format!(
                                    "no answer from the leader {node} within the deadline"
                                )));
                            }
                            Some(Err(_)) => return Err(self.no_quorum(started.elapsed()).await),
                            None if !L::REPEATABLE => {
                                return Err(StoreError::Unknown(format!(
                                    "the leader {node} was replaced while the write was in flight"
                                )));
                            }
                            // A read not answered by a replaced leader: ask the new one now.
                            None => continue,
                        }
                    } else {
                        None
                    }
                }
            };
            match reply {
                Some(LeaderReply::Done(v)) => return Ok(v),
                Some(LeaderReply::NotLeader(h)) => hint = h,
                Some(LeaderReply::NoQuorum(_)) => {}
                Some(LeaderReply::Failed(e)) => return Err(StoreError::Raft(e)),
                None => {}
            }
            // A leader is being elected or moved: look again when this manager learns of
            // another leader, or after a heartbeat.
            self.leader_other_than(seen, self.config.heartbeat()).await;
        }
    }

    /// Returns once this manager's view of the leader is no longer `seen`, or after `within`.
    async fn leader_other_than(&self, seen: Option<u64>, within: Duration) {
        let _ = tokio::time::timeout(within, self.leader_view_leaves(&[seen])).await;
    }

    /// Opens (or reuses) the pooled connection to `node`; false if it cannot be reached.
    async fn dial(&self, node: &ManagerNode) -> bool {
        let (Ok(name), Ok(addr)) = (NodeId::new(node.name.clone()), node.addr.parse()) else {
            return false;
        };
        self.endpoint
            .connection(&self.protocol, &name, addr)
            .await
            .is_ok()
    }

    /// Returns once this manager learns of a leader other than `id`, the node a call went to,
    /// and other than `seen`, its view when the call chose `id` (they differ when the call
    /// followed another manager's hint: a view that still lags behind the hint is no news).
    async fn leader_moves_from(&self, id: u64, seen: Option<u64>) {
        self.leader_view_leaves(&[Some(id), seen]).await;
    }

    /// Returns once this manager's view of the leader is none of `views`. Watches the server
    /// metrics, which change only with the server's state (the full metrics change with every
    /// applied entry and would wake each waiting call).
    async fn leader_view_leaves(&self, views: &[Option<u64>]) {
        let mut rx = self.raft.server_metrics();
        loop {
            // borrow_and_update marks the value seen, so `changed` then waits for a new one
            // (borrowing without it would make `changed` return at once, forever).
            if !views.contains(&rx.borrow_and_update().current_leader) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Counts the managers that answer now, for a no-quorum error.
    async fn no_quorum(&self, waited: Duration) -> StoreError {
        let status = self.status();
        let probes = status
            .nodes
            .iter()
            .filter(|(id, _)| status.voters.contains(id) && *id != self.config.raft_id)
            .map(|(_, node)| {
                let endpoint = self.endpoint.clone();
                let protocol = self.protocol.clone();
                let node = node.clone();
                async move {
                    // A round trip, not just a pooled connection: a killed peer's connection
                    // looks alive until the idle timeout.
                    tokio::time::timeout(
                        PROBE_TIME,
                        call::<()>(&endpoint, &protocol, &node, &RaftRpc::Ping),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok())
                }
            });
        let answered = futures::future::join_all(probes).await;
        let me = usize::from(status.voters.contains(&self.config.raft_id));
        let voters = status.voters.len();
        StoreError::NoQuorum {
            reachable: me + answered.into_iter().filter(|ok| *ok).count(),
            voters,
            needed: voters / 2 + 1,
            waited,
        }
    }

    /// Commits `cmd` through the leader and returns its result (with its revision). Fails
    /// with [`StoreError::NoQuorum`] within [`StoreConfig::quorum_deadline`].
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, StoreError> {
        let size = postcard::experimental::serialized_size(&cmd).unwrap_or(usize::MAX);
        if size > MAX_COMMAND_BYTES {
            return Err(StoreError::TooLarge {
                size,
                max: MAX_COMMAND_BYTES,
            });
        }
        self.running()?;
        self.on_leader(WriteCall(Arc::new(cmd), size)).await
    }

    /// Fails with [`StoreError::Stopped`] once this manager's Raft stopped after a fatal
    /// error.
    fn running(&self) -> Result<(), StoreError> {
        match &self.raft.metrics().borrow_watched().running_state {
            Ok(()) => Ok(()),
            Err(fatal) => Err(StoreError::Stopped(fatal.to_string())),
        }
    }

    /// The writes this manager forwarded to leaders, and the requests they went in
    /// (concurrent writes go together).
    pub fn forwarded(&self) -> ForwardStats {
        self.pipes.stats()
    }

    /// How long since this manager last heard a leader's AppendEntries or heartbeat (`None`:
    /// never, or it leads). Consul's `last_contact`.
    pub fn last_contact(&self) -> Option<Duration> {
        if self.status().is_leader {
            return None;
        }
        self.contact.silence()
    }

    /// Why this manager's Raft stopped, if it did (a fatal storage error): it then serves
    /// nothing until restarted.
    pub fn stopped(&self) -> Option<String> {
        self.running().err().map(|e| match e {
            StoreError::Stopped(why) => why,
            other => other.to_string(),
        })
    }

    /// Runs `f` on the state at the requested consistency; returns its answer and the
    /// revision the state reflected.
    pub async fn read<T>(
        &self,
        consistency: Consistency,
        f: impl FnOnce(&ClusterState) -> T,
    ) -> Result<(T, u64), StoreError> {
        // A stopped manager's state is behind by an unknown amount: even a stale read is
        // refused, so clients go to a manager that follows the log.
        self.running()?;
        if consistency == Consistency::Linearizable {
            let started = Instant::now();
            let index = self.read_index().await?;
            let left = self
                .config
                .quorum_deadline()
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(100));
            if let Err(e) = self.wait_applied(index, left).await {
                return Err(self.running().err().unwrap_or(e));
            }
        }
        let st = self.sm.read();
        Ok((f(&st.data), st.data.revision()))
    }

    /// The index a linearizable read must wait for, from the leader: one call serves every
    /// read that arrived while the call before it was in flight, so concurrent reads cost
    /// one leader round (a forwarded request, a lease check) per batch instead of each.
    async fn read_index(&self) -> Result<u64, StoreError> {
        self.reads
            .share(|arrived| self.on_leader_since(ReadIndexCall, arrived))
            .await
    }

    /// Runs `f` on this manager's last applied state, whether or not its Raft still runs: for
    /// the manager's own checks (is this client revoked?), never for answers to clients,
    /// which [`Store::read`] refuses once Raft stopped.
    pub fn read_applied<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> (T, u64) {
        let st = self.sm.read();
        (f(&st.data), st.data.revision())
    }

    /// A receiver of this manager's applied revision: it changes whenever entries are
    /// applied (the orchestrators and the dispatcher wake on it).
    pub fn applied_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sm.applied.subscribe()
    }

    /// A receiver of the last applied revision that changed more than user keys: it changes
    /// when an applied entry changes the nodes, services, tasks, cluster settings or the
    /// managers, when a leader's term begins, and when a snapshot is installed — not for
    /// writes of user keys. What the managers' loops (orchestration, the dispatcher's
    /// sessions, certificate rotation) wake on, so a key-value workload does not wake them
    /// with every applied entry.
    pub fn object_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sm.objects.subscribe()
    }

    /// Waits until this manager applied `index`.
    async fn wait_applied(&self, index: u64, within: Duration) -> Result<(), StoreError> {
        let mut rx = self.sm.applied.subscribe();
        let wait = rx.wait_for(|applied| *applied >= index);
        match tokio::time::timeout(within, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Raft("store closed".into())),
            Err(_) => Err(StoreError::Lagging { index }),
        }
    }

    /// Watches keys under `prefix` from `from_revision` on: first the kept history, then
    /// live changes, with no gap and no duplicate.
    pub fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch, StoreError> {
        // Subscribe before reading history so nothing falls between the two.
        let live = self.sm.events.subscribe();
        let st = self.sm.read();
        let backlog = st
            .data
            .history_since(prefix, from_revision)
            .map_err(|oldest| StoreError::Compacted {
                requested: from_revision,
                oldest,
            })?;
        // Every event up to the current revision is in the history just read.
        let live_from = (st.data.revision() + 1).max(from_revision);
        Ok(Watch {
            sm: self.sm.clone(),
            backlog: backlog.into(),
            live,
            prefix: prefix.to_owned(),
            live_from,
            last: None,
            at_last: 0,
            broken: None,
        })
    }

    fn must_lead(&self) -> Result<(), StoreError> {
        let s = self.status();
        if s.is_leader {
            Ok(())
        } else {
            Err(StoreError::NotLeader {
                leader: self.leader_node().map(|(_, n)| n.to_string()),
            })
        }
    }

    /// Adds a manager as a learner and waits until it has caught up (run on the leader).
    pub async fn add_learner(&self, id: u64, node: ManagerNode) -> Result<(), StoreError> {
        self.must_lead()?;
        self.bounded(|| self.raft.add_learner(id, node.clone(), false))
            .await?;
        self.wait_caught_up(id).await
    }

    /// Waits until `id` has replicated close to the leader's last log entry (it may need
    /// a snapshot first), for at most [`StoreConfig::catch_up_timeout`].
    async fn wait_caught_up(&self, id: u64) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.config.catch_up_timeout;
        let mut rx = self.raft.metrics();
        loop {
            let lag = {
                let m = rx.borrow_and_update();
                let last = m.last_log_index.unwrap_or(0);
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map_or(0, |l| l.index);
                last.saturating_sub(matched)
            };
            if lag <= CAUGHT_UP_LAG {
                return Ok(());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(StoreError::Raft(format!(
                    "manager {id} is still {lag} entries behind after {:?}",
                    self.config.catch_up_timeout
                )));
            }
            let _ =
                tokio::time::timeout(remaining.min(Duration::from_millis(100)), rx.changed()).await;
            self.must_lead()?;
        }
    }

    /// Runs a membership change, failing with [`StoreError::NoQuorum`] past the deadline.
    ///
    /// Raft takes one membership change at a time: while an earlier one (or the initial
    /// membership) is still being committed, the change is retried until the deadline.
    async fn bounded<T, F>(&self, mut op: impl FnMut() -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, RaftError<TypeConfig, ClientWriteError<TypeConfig>>>>,
    {
        let started = Instant::now();
        let deadline = started + self.config.quorum_deadline() - PROBE_TIME;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, op()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                )))) => {
                    if Instant::now() >= deadline {
                        return Err(StoreError::MembershipChangeInProgress);
                    }
                    tokio::time::sleep(self.config.heartbeat()).await;
                }
                Ok(Err(e)) => return Err(StoreError::Raft(e.to_string())),
                Err(_) => return Err(self.no_quorum(started.elapsed()).await),
            }
        }
    }

    /// Makes a caught-up learner a voter (run on the leader).
    pub async fn promote(&self, id: u64) -> Result<(), StoreError> {
        self.must_lead()?;
        self.wait_caught_up(id).await?;
        let ids: BTreeSet<u64> = [id].into();
        self.bounded(|| {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(ids.clone()), true)
        })
        .await
        .map(|_| ())
    }

    /// Turns a voter back into a learner (run on the leader).
    pub async fn demote(&self, id: u64) -> Result<(), StoreError> {
        self.must_lead()?;
        let ids: BTreeSet<u64> = [id].into();
        self.bounded(|| {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(ids.clone()), true)
        })
        .await
        .map(|_| ())
    }

    /// Removes a manager from the group entirely (run on the leader).
    pub async fn remove(&self, id: u64) -> Result<(), StoreError> {
        self.must_lead()?;
        let ids: BTreeSet<u64> = [id].into();
        let status = self.status();
        if status.voters.contains(&id) {
            self.bounded(|| {
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
            })
            .await?;
        }
        if self.status().learners.contains(&id) {
            self.bounded(|| {
                self.raft
                    .change_membership(ChangeMembers::RemoveNodes(ids.clone()), false)
            })
            .await?;
        }
        Ok(())
    }

    /// Asks the leader (this node) to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), StoreError> {
        self.must_lead()?;
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))
    }

    /// The leader's view of the managers: how long ago each answered its heartbeats (this
    /// manager asks the leader if it is not the leader itself). `None` without a reachable
    /// leader.
    pub async fn leader_acks(&self) -> Option<std::collections::BTreeMap<u64, Duration>> {
        let s = self.status();
        if s.is_leader {
            return Some(s.acked);
        }
        let (_, node) = self.leader_node()?;
        let acks = tokio::time::timeout(
            PROBE_TIME,
            call::<std::collections::BTreeMap<u64, u64>>(
                &self.endpoint,
                &self.protocol,
                &node,
                &RaftRpc::Acks,
            ),
        )
        .await
        .ok()?
        .ok()?;
        Some(
            acks.into_iter()
                .map(|(id, ms)| (id, Duration::from_millis(ms)))
                .collect(),
        )
    }

    /// Takes a snapshot now (and purges the log up to it).
    pub async fn snapshot(&self) -> Result<(), StoreError> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))
    }

    /// Stops Raft and the protocol server. The data stays on disk.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.server.abort();
        let done = self
            .raft
            .shutdown()
            .await
            .map_err(|e| StoreError::Raft(e.to_string()));
        // The log (and its directory lock) goes with openraft's last task: wait for it,
        // bounded, so the directory can be opened again as soon as this returns.
        let deadline = Instant::now() + LOG_LOCK_WAIT;
        while self.log_closed.strong_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        done
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod read_batch_tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A leader stand-in: each call takes `delay` and answers its own number (calls counted
    /// from 0); it records when each call started.
    struct Asker {
        calls: AtomicU64,
        started: Mutex<Vec<(u64, Instant)>>,
        delay: Duration,
    }

    impl Asker {
        async fn ask(&self) -> Result<u64, StoreError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            self.started.lock().unwrap().push((n, Instant::now()));
            tokio::time::sleep(self.delay).await;
            Ok(n)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_share_calls_but_never_one_sent_before_they_began() {
        let batch = Arc::new(ReadBatch::default());
        let asker = Asker {
            calls: AtomicU64::new(0),
            started: Mutex::new(Vec::new()),
            delay: Duration::from_millis(5),
        };
        let reads = (0..200u64).map(|i| {
            let batch = batch.clone();
            let asker = &asker;
            async move {
                tokio::time::sleep(Duration::from_micros(i * 150)).await;
                let began = Instant::now();
                let call = batch.share(|_| asker.ask()).await.unwrap();
                (began, call)
            }
        });
        let done = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(reads))
            .await
            .expect("reads wedged");
        let calls = asker.calls.load(Ordering::SeqCst);
        assert!(calls < 100, "{calls} calls for 200 reads: not shared");
        let started = asker.started.lock().unwrap().clone();
        for (began, call) in done {
            let sent = started.iter().find(|(n, _)| *n == call).unwrap().1;
            assert!(
                sent >= began,
                "a read got the answer of a call sent before it began"
            );
        }
        assert!(!batch.lock().asking, "asking left set");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_dropped_mid_call_or_before_its_turn_wedges_nobody() {
        let batch = Arc::new(ReadBatch::default());
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let ask = {
            let (gate, calls) = (gate.clone(), calls.clone());
            move |_: Instant| {
                let (gate, calls) = (gate.clone(), calls.clone());
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    // The first call blocks until released; later ones answer at once.
                    if n == 0 {
                        let _ = gate.acquire().await;
                    }
                    Ok(n)
                }
            }
        };
        // A asks (and blocks); B and C wait for the next call.
        let a = tokio::spawn({
            let (batch, ask) = (batch.clone(), ask.clone());
            async move { batch.share(ask).await }
        });
        while !batch.lock().asking {
            tokio::task::yield_now().await;
        }
        let b = tokio::spawn({
            let (batch, ask) = (batch.clone(), ask.clone());
            async move { batch.share(ask).await }
        });
        let c = tokio::spawn({
            let (batch, ask) = (batch.clone(), ask.clone());
            async move { batch.share(ask).await }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while batch.lock().waiting.len() < 2 {
            assert!(Instant::now() < deadline, "B and C never queued");
            tokio::task::yield_now().await;
        }
        // B gives up while waiting, A is dropped mid-call: C must get the turn and answer.
        b.abort();
        a.abort();
        let c = tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("C wedged after its asker was dropped")
            .unwrap()
            .unwrap();
        assert!(c >= 1, "C was answered by the call sent before it began");
        // And the batch is free again: a new read asks at once.
        let d = tokio::time::timeout(Duration::from_secs(5), batch.share(ask.clone()))
            .await
            .expect("a later read wedged")
            .unwrap();
        assert!(d > c);
        assert!(!batch.lock().asking);
    }
}

#[cfg(test)]
mod quorum_tests {
    use super::*;

    fn membership(configs: &[&[u64]]) -> openraft::Membership<u64, ManagerNode> {
        let configs: Vec<BTreeSet<u64>> = configs
            .iter()
            .map(|c| c.iter().copied().collect())
            .collect();
        openraft::Membership::new_with_defaults(configs, [])
    }

    #[test]
    fn a_quorum_without_the_leader_needs_three_voters_in_every_configuration() {
        assert!(!quorum_without(1, &membership(&[&[1]])), "alone");
        assert!(!quorum_without(1, &membership(&[&[1, 2]])), "two voters");
        assert!(quorum_without(1, &membership(&[&[1, 2, 3]])));
        assert!(quorum_without(1, &membership(&[&[1, 2, 3, 4]])));
        assert!(quorum_without(1, &membership(&[&[1, 2, 3, 4, 5]])));
        // Not a voter: every quorum is of others.
        assert!(quorum_without(9, &membership(&[&[1]])));
        // A joint change needs both halves: from one voter to three, then the other way.
        assert!(!quorum_without(1, &membership(&[&[1], &[1, 2, 3]])));
        assert!(!quorum_without(1, &membership(&[&[1, 2, 3], &[1, 2]])));
        assert!(quorum_without(
            1,
            &membership(&[&[1, 2, 3], &[1, 2, 3, 4, 5]])
        ));
    }
}
