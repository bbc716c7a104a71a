//! The gossip protocol without I/O: SWIM membership ([`Swim`]), its timers as data, the catalog, and
//! the anti-entropy, push-pull and pull decisions — driven by the tokio driver over QUIC and
//! by the simulator on virtual time, the same code in both (as quinn-proto under quinn).
//!
//! ```text
//!   inputs (each with `now`)            GossipCore                  outputs (polled)
//!   handle_datagram(bytes) ──┐   Swim (membership, outbox)    ┌──▶ poll_transmit(): Datagram | Request
//!   handle_request(body)   ──┼─▶ timers (ordered, as data)  ──┼──▶ poll_timeout(): next deadline
//!   handle_response(id, r) ──┤   catalog, members, pending    └──▶ poll_event(): GossipEvent
//!   handle_timeout()       ──┤   requests
//!   publish / add_seeds / leave
//! ```
//!
//! Every request the core sends gets exactly one [`GossipCore::handle_response`] (an answer
//! or a failure); requests from peers are answered at once by [`GossipCore::handle_request`].

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::catalog::{
    Digest, NodeRecord, NoticeHandler, ServiceEndpoint, SharedCatalog, VersionNotice, Want,
    encode_notice,
};
use crate::config::GossipConfig;
use crate::identity::GossipId;
use crate::swim::{Incarnation, Member, Notification, State, Swim, Timer};
use crate::timers::TimerQueue;

/// The largest record accepted from a peer, encoded.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

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
    /// Whether it is active (false once declared Down; a suspected member is still
    /// active).
    pub up: bool,
    /// Active but suspected: a probe of it failed, directly and through other members, and
    /// it has not refuted that yet (SWIM's Suspect state).
    pub suspected: bool,
}

/// What this node's failure detector did since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DetectorStats {
    /// Members this node's probes found unresponsive (suspected, and asked to answer).
    pub suspected: u64,
    /// Of those, members that answered over the reliable request (the suspicion ended).
    pub answered: u64,
    /// Of those, stale identities: another life of the node answered (declared Down at once).
    pub gone: u64,
    /// Members this node declared Down (a suspicion that ran out).
    pub declared_down: u64,
    /// Probes unanswered directly that the member answered over the reliable request
    /// (no suspicion raised).
    pub rescued: u64,
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
    /// Seed of the membership protocol's random choices (use a random one outside tests).
    pub rng_seed: u64,
}

/// The requests between members (postcard: the variant order is the wire tag).
#[derive(Serialize, Deserialize)]
enum Rpc {
    /// Send me these nodes' records.
    Pull(Vec<String>),
    /// My digest, member count and membership fingerprint: send what I lack (and your
    /// members if our views of the active members differ), and list what you lack.
    Digest {
        digest: Digest,
        members: usize,
        membership: u64,
        /// When the digest covers some buckets of node names only: how many buckets,
        /// which ones (sorted). Records outside them are not compared.
        scope: Option<Scope>,
        /// The same for members: `None`, send the whole membership if counts or
        /// fingerprints differ; some buckets, send the members in those (none: no push-pull).
        member_scope: Option<Scope>,
    },
    /// Records you said you lacked.
    Push(Vec<NodeRecord>),
    /// My membership (the second half of a push-pull).
    Members(Vec<Member>),
    /// A sync round's first message: the catalog's fingerprint, the member count and the
    /// fingerprint of the active members' states (so a suspicion, which decides what DNS
    /// serves, rides the sync too, not only SWIM's piggybacked copies); the answer
    /// ([`FingerprintReply`]) says whether they all match (then nothing more is sent) and
    /// if not, which buckets of node names to compare.
    Fingerprint {
        fingerprint: u64,
        members: usize,
        membership: u64,
    },
    /// "I suspect you (`id`) at this incarnation": the answer, `true` when `id` is the
    /// receiver, means it lives and has refuted the suspicion.
    Suspected {
        id: GossipId,
        incarnation: Incarnation,
    },
    /// "Are you `id`?" — a probe unanswered by datagram, asked over the reliable
    /// channel; `true` when `id` is the receiver (and it is not leaving).
    Probe { id: GossipId },
}

/// Some buckets of node names: how many (a power of two), which ones (sorted).
type Scope = (u32, Vec<u32>);

/// The answer to a sync round's fingerprint: for the records and for the members, `None`
/// when they match, else the answering node's fingerprints per bucket (records by node
/// name, members by address; one bucket for a small cluster: compare everything; see
/// [`crate::catalog::buckets_for`]), so the digest and the membership exchanged next cover
/// only the buckets that differ.
#[derive(Serialize, Deserialize, Default)]
struct FingerprintReply {
    records: Option<Vec<u64>>,
    members: Option<Vec<u64>>,
}

impl FingerprintReply {
    fn in_sync(&self) -> bool {
        self.records.is_none() && self.members.is_none()
    }
}

/// The buckets where `mine` and `theirs` differ, or `None` (compare everything) when
/// `theirs` is not a usable set of buckets.
fn differing(mine: impl FnOnce(usize) -> Vec<u64>, theirs: &[u64]) -> Option<Scope> {
    let count = theirs.len();
    if count <= 1 || count > crate::catalog::BUCKETS || !count.is_power_of_two() {
        return None;
    }
    let differ = mine(count)
        .iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (m, t))| m != t)
        .map(|(b, _)| b as u32)
        .collect();
    Some((count as u32, differ))
}

/// A scope as the catalog and SWIM take it.
fn scope_ref(scope: &Option<Scope>) -> Option<(usize, &[u32])> {
    scope.as_ref().map(|(n, b)| (*n as usize, b.as_slice()))
}

#[derive(Serialize, Deserialize, Default)]
struct DigestReply {
    records: Vec<NodeRecord>,
    need: Vec<String>,
    members: Option<Vec<Member>>,
}

/// What the kind of a request is (for a simulator that drops some kinds, and for logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RpcKind {
    /// Records asked for after a notice.
    Pull,
    /// A digest exchange.
    Digest,
    /// Records pushed back after a digest.
    Push,
    /// Membership pushed back after a digest.
    Members,
    /// A sync round's fingerprint.
    Fingerprint,
    /// A suspicion put to the suspect.
    Suspected,
    /// A probe unanswered by datagram, asked again over the reliable channel.
    Probe,
}

/// Something for the driver to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// A SWIM packet (an unreliable datagram).
    Datagram {
        /// To whom.
        to: GossipId,
        /// The packet.
        bytes: Vec<u8>,
    },
    /// A request; its answer or failure goes to [`GossipCore::handle_response`] with `id`.
    Request {
        /// Its id.
        id: u64,
        /// To whom.
        to: GossipId,
        /// What kind.
        kind: RpcKind,
        /// Its body.
        body: Vec<u8>,
    },
}

enum Due {
    Swim(Timer),
    Sync,
    Reannounce,
    Linger,
    /// No peer answered a sync by now: what this node holds is all it can know.
    SyncDeadline,
}

/// A request in flight, and what its answer leads to.
enum Pending {
    /// A sync round's first step. (The digest and the membership are taken only when the
    /// peer says they differ: most rounds end at the fingerprint, and copying a 1 000-node
    /// digest and member list every round was most of a simulated cluster's allocations.)
    Fingerprint { peer: GossipId },
    /// A sync round's digest exchange (the members compared: see [`Rpc::Digest`]).
    Digest {
        peer: GossipId,
        member_scope: Option<Scope>,
    },
    /// A pull for a notice; `then` is asked next if this one does not bring it.
    Pull { want: Want, then: Option<GossipId> },
    /// A probe asked over the reliable channel: an answer acks it.
    Probe { target: GossipId, number: u32 },
    /// A suspicion put to the suspect: its answer refutes it here.
    Buddy {
        member: GossipId,
        incarnation: Incarnation,
    },
    /// Nothing follows.
    OneWay,
}

/// One node's gossip: SWIM membership and the catalog, as a state machine.
pub struct GossipCore {
    id: GossipId,
    seeds: Vec<(String, SocketAddr)>,
    config: GossipConfig,
    swim: Swim,
    catalog: SharedCatalog,
    timers: TimerQueue<Instant, Due>,
    rng: StdRng,
    idle_backoff: Duration,
    /// Whether a re-announce chain is already scheduled.
    reannouncing: bool,
    /// Bumped whenever a member's view changes (up, down, renamed, suspected, cleared).
    members_version: u64,
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<GossipEvent>,
    /// Leaving: gossip the departure until then.
    leaving: Option<Instant>,
    /// Lifeguard's local health multiplier: raised when this node's own timers run late or
    /// it is itself suspected, lowered by each probe round on time. Its probe timers (and
    /// the wait before declaring a suspect Down) are stretched by `1 + health`, so a node
    /// that is slow itself accuses others less.
    health: u32,
    /// Whether a sync round with a peer has completed (or there was none to have): until
    /// then this node's catalog may lack what the cluster publishes, and DNS says so
    /// rather than deny names that exist.
    synced: bool,
    stats: DetectorStats,
    closed: bool,
}

impl std::fmt::Debug for GossipCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipCore")
            .field("id", &self.id)
            .field("members", &self.swim.num_members())
            .finish_non_exhaustive()
    }
}

impl GossipCore {
    /// A node that announces itself to its seeds at `now` (and again, backing off, until one
    /// answers), tells the cluster its generation's record exists, and syncs periodically.
    pub fn new(settings: GossipSettings, now: Instant) -> GossipCore {
        let mut core = GossipCore::unstarted(settings);
        core.announce();
        // Until a seed answers, keep announcing (with backoff): SWIM reports Idle only after
        // having been connected once.
        core.schedule(now, core.config.reannounce_min, Due::Reannounce);
        // Tell the cluster this generation's (empty) record exists, so peers holding an older
        // generation's endpoints drop them without waiting for a digest exchange.
        let notice = VersionNotice {
            node: core.id.node.clone(),
            generation: core.id.generation,
            version: 0,
        };
        core.swim.add_broadcast(&encode_notice(&notice));
        core.schedule_sync(now);
        // Even a node told of no seed may be a restarted member of a cluster (its seeds
        // come later): only a sync, or the deadline, makes its view authoritative.
        core.schedule(now, SYNC_DEADLINE, Due::SyncDeadline);
        core.pump(now);
        core
    }

    /// A node that is already a member of a formed cluster at `now`: it knows `members`
    /// (alive) and `records` (by node name), synced, with nothing to announce. Identities,
    /// names and records are shared with the caller, not copied. The simulator starts its
    /// 10 000-node runs this way: the state such a cluster converges to, without the join
    /// storm (every join disseminated to every node: n²·log n work) that reaching it
    /// costs. A record of this node itself is ignored (it publishes its own); `records`
    /// sorted by name are taken in linear time.
    pub fn new_formed(
        settings: GossipSettings,
        now: Instant,
        members: impl ExactSizeIterator<Item = Arc<GossipId>>,
        records: impl IntoIterator<Item = (Arc<str>, Arc<NodeRecord>)>,
    ) -> GossipCore {
        let mut core = GossipCore::unstarted(settings);
        core.catalog.lock().extend_shared(records);
        core.swim.preload(members);
        // The member view is new (a driver copies it when this moves).
        core.members_version += 1;
        core.reannouncing = false;
        core.synced = true;
        core.schedule_sync(now);
        core.pump(now);
        core
    }

    /// Sync rounds at a random phase, so nodes started together do not sync in step.
    fn schedule_sync(&mut self, now: Instant) {
        let sync = self.config.sync_interval;
        let phase = Duration::from_millis(
            self.rng
                .random_range(0..=u64::try_from(sync.as_millis()).unwrap_or(u64::MAX).max(1)),
        );
        self.schedule(now, phase, Due::Sync);
    }

    /// The state both constructors start from: this node's empty record, no timer.
    fn unstarted(settings: GossipSettings) -> GossipCore {
        let catalog = SharedCatalog::default();
        catalog.lock().merge(NodeRecord::empty(
            settings.id.node.clone(),
            settings.id.generation,
        ));
        let swim = Swim::new(
            settings.id.clone(),
            settings.config.swim_config(),
            settings.rng_seed,
            NoticeHandler::new(catalog.clone(), settings.id.node.clone()),
        );
        GossipCore {
            id: settings.id,
            seeds: settings.seeds,
            idle_backoff: settings.config.reannounce_min,
            config: settings.config,
            swim,
            catalog,
            timers: TimerQueue::new(),
            rng: StdRng::seed_from_u64(settings.rng_seed ^ 0x5eed),
            reannouncing: true,
            members_version: 0,
            next_id: 0,
            pending: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            leaving: None,
            health: 0,
            synced: false,
            stats: DetectorStats::default(),
            closed: false,
        }
    }

    /// Whether this node has synced its catalog with a peer since it started (or had none
    /// to sync with within [`SYNC_DEADLINE`]): before that its service view may be missing
    /// what others publish.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// What the failure detector did so far.
    pub fn detector_stats(&self) -> DetectorStats {
        self.stats
    }

    /// This node's identity (its generation changes on a rejoin).
    pub fn id(&self) -> &GossipId {
        &self.id
    }

    /// The catalog (shared: readers may hold a clone).
    pub fn catalog(&self) -> &SharedCatalog {
        &self.catalog
    }

    /// Every member this node knows (Down ones for 24 h), by address, with its state.
    /// O(members): a driver copies it only when [`GossipCore::members_version`] moved.
    pub fn members(&self) -> BTreeMap<SocketAddr, MemberView> {
        self.swim
            .iter_membership_state()
            .map(|m| (m.id().addr, member_view(m)))
            .collect()
    }

    /// The SWIM membership (read-only: incarnations, states, backlog).
    pub fn swim(&self) -> &Swim {
        &self.swim
    }

    /// The member at `addr`, with its state.
    pub fn member(&self, addr: &SocketAddr) -> Option<MemberView> {
        self.swim.member_at(addr).map(member_view)
    }

    /// Changes whenever [`GossipCore::members`] may have changed.
    pub fn members_version(&self) -> u64 {
        self.members_version
    }

    /// SWIM's backlog: updates and notices waiting to be piggybacked, and the entries
    /// their queues hold.
    pub fn backlog(&self) -> (usize, usize) {
        self.swim.backlog()
    }

    /// How many members are active (alive or suspected).
    pub fn num_members(&self) -> usize {
        self.swim.num_members()
    }

    /// Whether the node left (after [`GossipCore::leave`] and its linger): nothing more to
    /// drive.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<GossipEvent> {
        self.events.pop_front()
    }

    /// When [`GossipCore::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        self.timers.next_at()
    }

    /// A SWIM packet from a peer.
    pub fn handle_datagram(&mut self, now: Instant, bytes: &[u8]) {
        if self.closed {
            return;
        }
        if let Err(e) = self.swim.handle_data(bytes) {
            debug!(error = %e, "gossip packet refused");
        }
        self.pump(now);
    }

    /// Every timer due at `now`, in order.
    pub fn handle_timeout(&mut self, now: Instant) {
        while !self.closed {
            let Some((at, due)) = self.timers.pop_due(now) else {
                break;
            };
            match due {
                Due::Swim(t) => {
                    if now.saturating_duration_since(at) > LATE_TIMER {
                        self.health = (self.health + 1).min(MAX_HEALTH);
                    } else if matches!(t, Timer::Probe { .. }) {
                        self.health = self.health.saturating_sub(1);
                    }
                    if let Timer::SuspectToDown {
                        id, incarnation, ..
                    } = &t
                        && self.swim.is_suspect(id, *incarnation)
                    {
                        self.stats.declared_down += 1;
                    }
                    self.swim.handle_timer(t);
                }
                Due::Sync => {
                    self.schedule(now, self.config.sync_interval, Due::Sync);
                    self.start_sync();
                }
                Due::Reannounce => {
                    if self.swim.num_members() == 0 {
                        self.announce();
                        self.idle_backoff = (self.idle_backoff * 2).min(self.config.reannounce_max);
                        self.schedule(now, self.idle_backoff, Due::Reannounce);
                    } else {
                        self.reannouncing = false;
                    }
                }
                Due::SyncDeadline => self.synced = true,
                Due::Linger => {
                    if self.leaving.is_some_and(|until| now >= until) {
                        self.closed = true;
                        self.timers.clear();
                        self.pending.clear();
                        return;
                    }
                    self.swim.gossip();
                    self.schedule(now, LINGER_GOSSIP, Due::Linger);
                }
            }
            self.pump(now);
        }
    }

    /// A peer's request: the answer, or `None` when it is not a request of this protocol.
    pub fn handle_request(&mut self, now: Instant, body: &[u8]) -> Option<Vec<u8>> {
        if self.closed {
            return None;
        }
        let rpc = postcard::from_bytes::<Rpc>(body).ok()?;
        let reply = match rpc {
            Rpc::Pull(nodes) => postcard::to_stdvec(&self.catalog.lock().records(&nodes)),
            Rpc::Digest {
                digest,
                members,
                membership,
                scope,
                member_scope,
            } => {
                let mut reply = {
                    let c = self.catalog.lock();
                    DigestReply {
                        records: c.newer_than_in(&digest, scope_ref(&scope)),
                        need: c.lacking(&digest),
                        members: None,
                    }
                };
                let members_differ = match &member_scope {
                    Some((_, buckets)) => !buckets.is_empty(),
                    None => {
                        self.swim.num_members() != members || self.swim.fingerprint() != membership
                    }
                };
                if members_differ {
                    reply.members = Some(self.swim.membership(scope_ref(&member_scope)));
                }
                postcard::to_stdvec(&reply)
            }
            Rpc::Push(records) => {
                self.merge_records(records);
                postcard::to_stdvec(&())
            }
            Rpc::Members(members) => {
                self.apply_members(members);
                postcard::to_stdvec(&())
            }
            Rpc::Fingerprint {
                fingerprint,
                members,
                membership,
            } => {
                let c = self.catalog.lock();
                let count = crate::catalog::buckets_for(c.len().max(self.swim.num_members() + 1));
                let records =
                    (c.fingerprint() != fingerprint).then(|| c.bucket_fingerprints(count));
                drop(c);
                let members = (self.swim.num_members() != members
                    || self.swim.fingerprint() != membership)
                    .then(|| self.swim.bucket_fingerprints(count));
                postcard::to_stdvec(&FingerprintReply { records, members })
            }
            Rpc::Probe { id } => postcard::to_stdvec(&(id == self.id && self.leaving.is_none())),
            Rpc::Suspected { id, incarnation } => {
                // A node that is leaving does not refute: it is going.
                let me = id == self.id && self.leaving.is_none();
                if me {
                    // Refuted as a gossiped suspicion is (a new incarnation, and gossip
                    // about it); being suspected also says this node may be slow.
                    self.health = (self.health + 1).min(MAX_HEALTH);
                    let update = Member::new(id, incarnation, State::Suspect);
                    self.swim.apply_many([update], true);
                }
                postcard::to_stdvec(&me)
            }
        };
        self.pump(now);
        Some(reply.unwrap_or_default())
    }

    /// The answer to the request `id` (`None`: it failed, or no answer came).
    pub fn handle_response(&mut self, now: Instant, id: u64, answer: Option<&[u8]>) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match pending {
            Pending::OneWay => {}
            Pending::Probe { target, number } => {
                if decode::<bool>(answer) == Some(true) && self.swim.reliable_ack(&target, number) {
                    self.stats.rescued += 1;
                }
            }
            Pending::Buddy {
                member,
                incarnation,
            } => {
                // The suspect answered: it refuted with at least the next incarnation.
                match decode::<bool>(answer) {
                    // The suspect answered: it refuted with at least the next incarnation.
                    Some(true) => {
                        self.stats.answered += 1;
                        let alive =
                            Member::new(member, incarnation.saturating_add(1), State::Alive);
                        self.swim.apply_many([alive], true);
                    }
                    // Whoever is at its address now is not that identity (it restarted
                    // under a new generation, or is leaving): the suspect is gone for good.
                    Some(false) => {
                        self.stats.gone += 1;
                        self.swim.apply_many([Member::down(member)], true);
                    }
                    // No answer: the suspicion runs its course.
                    None => {}
                }
            }
            Pending::Fingerprint { peer } => {
                // Most rounds end here: same catalog, same member count.
                let reply = decode::<FingerprintReply>(answer);
                if reply.as_ref().is_some_and(FingerprintReply::in_sync) {
                    self.synced = true;
                }
                if let Some(reply) = reply.filter(|r| !r.in_sync()) {
                    let nothing = || Some((1, Vec::new()));
                    let c = self.catalog.lock();
                    // Only the buckets whose fingerprints differ (all of them for a small
                    // cluster; none of what matched).
                    let scope = match &reply.records {
                        None => nothing(),
                        Some(theirs) => differing(|n| c.bucket_fingerprints(n), theirs),
                    };
                    let digest = match &scope {
                        Some((count, buckets)) => c.digest_in(*count as usize, buckets),
                        None => c.digest(),
                    };
                    drop(c);
                    let member_scope = match &reply.members {
                        None => nothing(),
                        Some(theirs) => differing(|n| self.swim.bucket_fingerprints(n), theirs),
                    };
                    let rpc = Rpc::Digest {
                        digest,
                        members: self.swim.num_members(),
                        membership: self.swim.fingerprint(),
                        scope,
                        member_scope: member_scope.clone(),
                    };
                    self.request(
                        peer.clone(),
                        RpcKind::Digest,
                        &rpc,
                        Pending::Digest { peer, member_scope },
                    );
                }
            }
            Pending::Digest { peer, member_scope } => {
                if let Some(reply) = decode::<DigestReply>(answer) {
                    self.merge_records(reply.records);
                    self.synced = true;
                    if let Some(m) = reply.members {
                        // This node's view from before it applies the peer's.
                        let mine = self.swim.membership(scope_ref(&member_scope));
                        self.apply_members(m);
                        self.request(
                            peer.clone(),
                            RpcKind::Members,
                            &Rpc::Members(mine),
                            Pending::OneWay,
                        );
                    }
                    if !reply.need.is_empty() {
                        let back = self.catalog.lock().records(&reply.need);
                        self.request(peer, RpcKind::Push, &Rpc::Push(back), Pending::OneWay);
                    }
                }
            }
            Pending::Pull { want, then } => {
                let node = want.notice.node.clone();
                if let Some(records) = decode::<Vec<NodeRecord>>(answer) {
                    // Only what was asked for.
                    self.merge_records(records.into_iter().filter(|r| r.node == node).collect());
                }
                if let Some(next) = then
                    && self.catalog.lock().wants(&want.notice)
                {
                    let rpc = Rpc::Pull(vec![node]);
                    self.request(
                        next,
                        RpcKind::Pull,
                        &rpc,
                        Pending::Pull { want, then: None },
                    );
                }
            }
        }
        self.pump(now);
    }

    /// Publishes this node's endpoints and labels: its record's version goes up, and a
    /// notice of it piggybacks on SWIM's packets. Returns the new `(generation, version)`.
    pub fn publish(
        &mut self,
        now: Instant,
        endpoints: Vec<ServiceEndpoint>,
        labels: BTreeMap<String, String>,
    ) -> (u64, u64) {
        let stamp = self.publish_record(endpoints, labels);
        self.pump(now);
        stamp
    }

    /// Adds nodes to announce to when this one is alone; if it has no member, it announces
    /// to the new ones at once.
    pub fn add_seeds(&mut self, now: Instant, seeds: Vec<(String, SocketAddr)>) {
        let mut added = false;
        for seed in seeds {
            if seed.0 != self.id.node && !self.seeds.contains(&seed) {
                self.seeds.push(seed);
                added = true;
            }
        }
        if added && self.swim.num_members() == 0 {
            self.announce();
        }
        self.pump(now);
    }

    /// Leaves gracefully: the departure is announced, then gossiped for the configured
    /// linger; then [`GossipCore::is_closed`].
    pub fn leave(&mut self, now: Instant) {
        if self.leaving.is_some() || self.closed {
            return;
        }
        self.swim.leave_cluster();
        self.leaving = Some(now + self.config.leave_linger);
        // Only the linger's own gossip from now on.
        self.timers.clear();
        self.schedule(now, LINGER_GOSSIP, Due::Linger);
        self.pump(now);
    }

    fn schedule(&mut self, now: Instant, after: Duration, due: Due) {
        self.timers.push(now + after, due);
    }

    fn request(&mut self, to: GossipId, kind: RpcKind, rpc: &Rpc, then: Pending) {
        let Ok(body) = postcard::to_stdvec(rpc) else {
            return;
        };
        self.next_id += 1;
        let id = self.next_id;
        self.pending.insert(id, then);
        self.transmits
            .push_back(Transmit::Request { id, to, kind, body });
    }

    /// A peer's membership from a push-pull ([`Swim::membership`]: Down members included,
    /// as memberlist's push-pull does). A Down declaration rides the periodic exchange,
    /// not only SWIM's few retransmissions: a node that missed those (a partition that took
    /// half the cluster down at once overflows the piggyback budget) learns it at its next
    /// sync instead of when its own probe reaches the dead member, up to a full probe round
    /// (N seconds) later. Down members are kept 24 h; a Down update about an older identity
    /// at a peer's own address only confirms it.
    fn apply_members(&mut self, members: Vec<Member>) {
        self.swim.apply_many(members, false);
    }

    fn announce(&mut self) {
        let seeds: Vec<(String, SocketAddr)> = self
            .seeds
            .iter()
            .filter(|(n, _)| *n != self.id.node)
            .cloned()
            .collect();
        for (node, addr) in seeds {
            self.swim.announce(GossipId::new(node, addr, 0));
        }
    }

    /// Merges records from peers. This node's own record is never taken from a peer, and
    /// oversized records are dropped.
    fn merge_records(&mut self, records: Vec<NodeRecord>) {
        let own = self.id.node.clone();
        let records = records.into_iter().filter(|r| {
            r.node != own
                && postcard::experimental::serialized_size(r).is_ok_and(|n| n <= MAX_RECORD_BYTES)
        });
        self.merge_checked(records);
    }

    fn merge_checked(&mut self, records: impl Iterator<Item = NodeRecord>) {
        let mut c = self.catalog.lock();
        for r in records {
            let stamp = r.stamp();
            let node = r.node.clone();
            if c.merge(r) {
                self.events
                    .push_back(GossipEvent::CatalogChanged { node, stamp });
            }
        }
    }

    fn publish_record(
        &mut self,
        endpoints: Vec<ServiceEndpoint>,
        labels: BTreeMap<String, String>,
    ) -> (u64, u64) {
        let mut rec = self
            .catalog
            .lock()
            .record(&self.id.node)
            .cloned()
            .unwrap_or_else(|| NodeRecord::empty(self.id.node.clone(), self.id.generation));
        rec.version += 1;
        rec.endpoints = endpoints;
        rec.labels = labels;
        let notice = VersionNotice {
            node: rec.node.clone(),
            generation: rec.generation,
            version: rec.version,
        };
        let stamp = rec.stamp();
        self.merge_checked(std::iter::once(rec));
        if !self.swim.add_broadcast(&encode_notice(&notice)) {
            warn!(node = %notice.node, "version notice not queued");
        }
        self.swim.broadcast();
        stamp
    }

    /// After a rejoin under `new`: this node's record moves to the new generation and is
    /// announced, so peers drop what the old identity published.
    fn rejoined(&mut self, new: &GossipId) {
        let mut rec = self
            .catalog
            .lock()
            .record(&new.node)
            .cloned()
            .unwrap_or_else(|| NodeRecord::empty(new.node.clone(), new.generation));
        rec.generation = new.generation;
        rec.version = 0;
        let endpoints = std::mem::take(&mut rec.endpoints);
        let labels = std::mem::take(&mut rec.labels);
        self.merge_checked(std::iter::once(rec));
        self.publish_record(endpoints, labels);
    }

    /// One anti-entropy round with a random member: fingerprints, then digests both ways
    /// and a membership push-pull when they differ.
    /// Whether a sync round is in flight.
    fn syncing(&self) -> bool {
        self.pending
            .values()
            .any(|p| matches!(p, Pending::Fingerprint { .. } | Pending::Digest { .. }))
    }

    fn start_sync(&mut self) {
        let Some(peer) = self.swim.random_member() else {
            return;
        };
        let probe = Rpc::Fingerprint {
            fingerprint: self.catalog.lock().fingerprint(),
            members: self.swim.num_members(),
            membership: self.swim.fingerprint(),
        };
        self.request(
            peer.clone(),
            RpcKind::Fingerprint,
            &probe,
            Pending::Fingerprint { peer },
        );
    }

    /// Moves the packets and timers SWIM produced into the core's queues.
    fn take_output(&mut self, now: Instant) {
        while let Some((to, bytes)) = self.swim.out.sends.pop_front() {
            self.transmits.push_back(Transmit::Datagram { to, bytes });
        }
        let mut suspected = Vec::new();
        while let Some((after, timer)) = self.swim.out.timers.pop_front() {
            let stretch = match &timer {
                Timer::Probe { .. } | Timer::IndirectProbe { .. } => true,
                Timer::SuspectToDown {
                    id, incarnation, ..
                } => {
                    suspected.push((id.clone(), *incarnation));
                    self.stats.suspected += 1;
                    true
                }
                _ => false,
            };
            let after = if stretch {
                after * (1 + self.health)
            } else {
                after
            };
            self.schedule(now, after, Due::Swim(timer));
        }
        // A probe unanswered by datagram: ask over the reliable channel too.
        while let Some((target, number)) = self.swim.out.reliable.pop_front() {
            let rpc = Rpc::Probe { id: target.clone() };
            self.request(
                target.clone(),
                RpcKind::Probe,
                &rpc,
                Pending::Probe { target, number },
            );
        }
        // This node's probe found a member dead: put it to the member over a reliable
        // request too (a live one answers and the suspicion ends here at once, whatever
        // datagrams were lost), so only a member that cannot answer is declared Down.
        for (member, incarnation) in suspected {
            let rpc = Rpc::Suspected {
                id: member.clone(),
                incarnation,
            };
            self.request(
                member.clone(),
                RpcKind::Suspected,
                &rpc,
                Pending::Buddy {
                    member,
                    incarnation,
                },
            );
        }
    }

    /// Takes what SWIM produced (packets, timers, notifications) and what the catalog
    /// wants pulled, after every input.
    fn pump(&mut self, now: Instant) {
        self.take_output(now);
        while let Some(n) = self.swim.out.notes.pop_front() {
            // SWIM's table already refuses news about an older identity at an address, so
            // notifications about one address come in generation order.
            if matches!(
                n,
                Notification::MemberUp(_)
                    | Notification::MemberDown(_)
                    | Notification::Rename(..)
                    | Notification::Suspected(_)
                    | Notification::Cleared(_)
            ) {
                self.members_version += 1;
            }
            let event = match n {
                Notification::MemberUp(id) => {
                    self.catalog.lock().mark_up(&id.node, id.generation);
                    // A node that just joined syncs at once rather than at its next round.
                    if !self.synced && !self.syncing() {
                        self.start_sync();
                    }
                    Some(GossipEvent::MemberUp(id))
                }
                Notification::MemberDown(id) => {
                    self.catalog.lock().mark_down(&id.node, id.generation);
                    Some(GossipEvent::MemberDown(id))
                }
                Notification::Rename(old, new) => {
                    // The new identity may already be Down (it restarted and died before
                    // this node heard it alive): its record stays hidden then.
                    let active = self
                        .swim
                        .member_at(&new.addr)
                        .is_some_and(|m| m.id() == &new && m.state() != State::Down);
                    let mut c = self.catalog.lock();
                    if active {
                        c.mark_up(&new.node, new.generation);
                    } else {
                        c.mark_down(&new.node, new.generation);
                    }
                    drop(c);
                    Some(GossipEvent::Restarted { old, new })
                }
                Notification::Rejoin(new) => {
                    self.id = new.clone();
                    self.rejoined(&new);
                    Some(GossipEvent::Rejoined(new))
                }
                Notification::Idle => {
                    if !self.reannouncing && self.leaving.is_none() {
                        self.reannouncing = true;
                        self.schedule(now, self.idle_backoff, Due::Reannounce);
                    }
                    None
                }
                Notification::Active => {
                    self.idle_backoff = self.config.reannounce_min;
                    None
                }
                _ => None,
            };
            if let Some(e) = event {
                self.events.push_back(e);
            }
        }
        // Packets and timers a notification's handling produced (a rejoin's broadcast).
        self.take_output(now);
        // Pull records whose notices arrived: from the relay, then the origin if the relay
        // does not have them.
        for want in self.catalog.take_wants() {
            let origin = self.swim.active_named(&want.notice.node).cloned();
            let (first, then) = match (want.from.clone(), origin) {
                (Some(relay), origin) => {
                    let then = origin.filter(|o| o.node != relay.node);
                    (relay, then)
                }
                (None, Some(origin)) => (origin, None),
                (None, None) => continue,
            };
            let rpc = Rpc::Pull(vec![want.notice.node.clone()]);
            self.request(first, RpcKind::Pull, &rpc, Pending::Pull { want, then });
        }
    }
}

fn member_view(m: &Member) -> MemberView {
    MemberView {
        id: m.id().clone(),
        up: m.state() != State::Down,
        suspected: m.state() == State::Suspect,
    }
}

/// How long a node waits for its first sync before it answers from what it has.
const SYNC_DEADLINE: Duration = Duration::from_secs(5);

/// A SWIM timer handled this late says this node is slow (starved of CPU).
const LATE_TIMER: Duration = Duration::from_millis(50);

/// The largest local health multiplier (probes at most 9× slower).
const MAX_HEALTH: u32 = 8;

/// How often a leaving node gossips its departure while it lingers.
const LINGER_GOSSIP: Duration = Duration::from_millis(200);

fn decode<T: for<'de> Deserialize<'de>>(answer: Option<&[u8]>) -> Option<T> {
    postcard::from_bytes(answer?).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Cores wired to each other by hand: every transmit delivered at once, time advanced
    /// to the next timer. Nodes in `cut` send and receive nothing (a crash).
    struct Net {
        cores: Vec<GossipCore>,
        now: Instant,
        cut: std::collections::BTreeSet<usize>,
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i as u8 + 1], 7946))
    }

    impl Net {
        fn new(n: usize) -> Net {
            let now = Instant::now();
            let cores = (0..n)
                .map(|i| {
                    let seeds = if i == 0 {
                        Vec::new()
                    } else {
                        vec![("n0".to_owned(), addr(0))]
                    };
                    GossipCore::new(
                        GossipSettings {
                            id: GossipId::new(format!("n{i}"), addr(i), 1),
                            seeds,
                            config: GossipConfig::default(),
                            rng_seed: i as u64,
                        },
                        now,
                    )
                })
                .collect();
            Net {
                cores,
                now,
                cut: Default::default(),
            }
        }

        fn index(&self, id: &GossipId) -> usize {
            self.cores
                .iter()
                .position(|c| c.id().addr == id.addr)
                .unwrap()
        }

        fn deliver(&mut self) {
            loop {
                let mut out = Vec::new();
                for (i, c) in self.cores.iter_mut().enumerate() {
                    while let Some(t) = c.poll_transmit() {
                        out.push((i, t));
                    }
                    while c.poll_event().is_some() {}
                }
                if out.is_empty() {
                    return;
                }
                let now = self.now;
                for (i, t) in out {
                    if self.cut.contains(&i) {
                        continue;
                    }
                    match t {
                        Transmit::Datagram { to, bytes } => {
                            let j = self.index(&to);
                            if !self.cut.contains(&j) {
                                self.cores[j].handle_datagram(now, &bytes);
                            }
                        }
                        Transmit::Request { id, to, body, .. } => {
                            let j = self.index(&to);
                            let answer = if self.cut.contains(&j) {
                                None
                            } else {
                                self.cores[j].handle_request(now, &body)
                            };
                            self.cores[i].handle_response(now, id, answer.as_deref());
                        }
                    }
                }
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            loop {
                self.deliver();
                let next = self
                    .cores
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !self.cut.contains(i))
                    .filter_map(|(_, c)| c.poll_timeout())
                    .min();
                match next {
                    Some(at) if at <= end => {
                        self.now = self.now.max(at);
                        let now = self.now;
                        for (i, c) in self.cores.iter_mut().enumerate() {
                            if !self.cut.contains(&i) {
                                c.handle_timeout(now);
                            }
                        }
                    }
                    _ => {
                        self.now = end;
                        return;
                    }
                }
            }
        }
    }

    #[test]
    fn members_join_through_a_seed_and_a_push_pull_carries_the_dead_as_down() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(5));
        for c in &net.cores {
            assert_eq!(c.num_members(), 2, "{c:?}");
        }
        net.cut.insert(2);
        net.run(Duration::from_secs(60));
        let view = net.cores[0].member(&addr(2)).unwrap();
        assert!(!view.up, "n2 should be down: {view:?}");
        // A peer whose member count differs gets this node's membership, n2 as Down.
        let now = net.now;
        let ask = postcard::to_stdvec(&Rpc::Digest {
            digest: Digest::default(),
            members: 7,
            membership: 0,
            scope: None,
            member_scope: None,
        })
        .unwrap();
        let reply: DigestReply =
            postcard::from_bytes(&net.cores[0].handle_request(now, &ask).unwrap()).unwrap();
        let listed: BTreeMap<String, State> = reply
            .members
            .unwrap()
            .iter()
            .map(|m| (m.id().node.clone(), m.state()))
            .collect();
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert_eq!(listed["n2"], State::Down, "{listed:?}");
        assert_eq!(listed["n0"], State::Alive, "{listed:?}");
        // Garbage is not a request.
        assert!(net.cores[0].handle_request(now, b"\xff\xff\xff").is_none());
    }

    #[test]
    fn a_suspicion_rides_the_sync_when_member_counts_agree() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(5));
        let now = net.now;
        assert_eq!(
            net.cores[0].swim.fingerprint(),
            net.cores[1].swim.fingerprint(),
            "converged views fingerprint alike"
        );
        // n0 alone holds n2 suspected (as if every piggybacked copy missed n1).
        let n2 = net.cores[2].id().clone();
        let inc = net.cores[0].swim.member_at(&n2.addr).unwrap().incarnation();
        net.cores[0]
            .swim
            .apply_many([Member::new(n2.clone(), inc, State::Suspect)], false);
        let fp = |c: &GossipCore| Rpc::Fingerprint {
            fingerprint: c.catalog.lock().fingerprint(),
            members: c.num_members(),
            membership: c.swim.fingerprint(),
        };
        let ask = postcard::to_stdvec(&fp(&net.cores[1])).unwrap();
        let same: FingerprintReply =
            postcard::from_bytes(&net.cores[0].handle_request(now, &ask).unwrap()).unwrap();
        assert!(
            !same.in_sync(),
            "same member count, different suspicion: not in sync"
        );
        // The records match; three members: one bucket, compare them all.
        assert!(same.records.is_none());
        assert_eq!(same.members.as_ref().map(Vec::len), Some(1));
        // The digest step carries n0's members; applied at n1, n2 is suspected there.
        let ask = postcard::to_stdvec(&Rpc::Digest {
            digest: net.cores[1].catalog.lock().digest(),
            members: net.cores[1].num_members(),
            membership: net.cores[1].swim.fingerprint(),
            scope: None,
            member_scope: None,
        })
        .unwrap();
        let reply: DigestReply =
            postcard::from_bytes(&net.cores[0].handle_request(now, &ask).unwrap()).unwrap();
        net.cores[1].apply_members(reply.members.expect("members in the reply"));
        net.cores[1].pump(now);
        assert!(net.cores[1].member(&n2.addr).unwrap().suspected);
    }

    #[test]
    fn peers_cannot_overwrite_a_nodes_own_record_or_push_huge_ones() {
        let mut net = Net::new(2);
        net.run(Duration::from_secs(3));
        let now = net.now;
        let mine = net.cores[0].publish(now, Vec::new(), BTreeMap::new());
        let mut forged = NodeRecord::empty("n0", 1);
        forged.version = 99;
        let mut huge = NodeRecord::empty("x", 1);
        huge.labels.insert("k".into(), "v".repeat(MAX_RECORD_BYTES));
        let push = postcard::to_stdvec(&Rpc::Push(vec![forged, huge])).unwrap();
        net.cores[0].handle_request(now, &push).unwrap();
        let c = net.cores[0].catalog().lock().clone();
        assert_eq!(c.stamp_of("n0"), Some(mine));
        assert_eq!(c.stamp_of("x"), None);
    }

    #[test]
    fn a_pull_that_fails_at_the_relay_asks_the_origin() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(5));
        let now = net.now;
        let relay = net.cores[1].id().clone();
        let origin = net.cores[2].id().clone();
        let notice = VersionNotice {
            node: "n2".into(),
            generation: 1,
            version: 5,
        };
        net.cores[0].catalog().wants.lock().unwrap().push(Want {
            notice,
            from: Some(relay.clone()),
        });
        net.cores[0].add_seeds(now, Vec::new()); // any input pumps
        let first = std::iter::from_fn(|| net.cores[0].poll_transmit())
            .find_map(|t| match t {
                Transmit::Request {
                    id,
                    to,
                    kind: RpcKind::Pull,
                    ..
                } => Some((id, to)),
                _ => None,
            })
            .unwrap();
        assert_eq!(first.1, relay);
        net.cores[0].handle_response(now, first.0, None);
        let second = std::iter::from_fn(|| net.cores[0].poll_transmit())
            .find_map(|t| match t {
                Transmit::Request {
                    to,
                    kind: RpcKind::Pull,
                    ..
                } => Some(to),
                _ => None,
            })
            .unwrap();
        assert_eq!(second, origin);
    }

    #[test]
    fn a_leave_lingers_then_closes_and_the_others_see_it_go() {
        let mut net = Net::new(3);
        net.run(Duration::from_secs(5));
        let now = net.now;
        net.cores[2].leave(now);
        assert!(!net.cores[2].is_closed());
        net.run(Duration::from_secs(2));
        assert!(net.cores[2].is_closed());
        assert_eq!(net.cores[2].poll_timeout(), None);
        for c in &net.cores[..2] {
            assert!(!c.member(&addr(2)).unwrap().up, "{c:?}");
        }
    }
}
