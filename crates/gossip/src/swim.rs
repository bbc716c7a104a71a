//! SWIM membership without I/O: probes (direct, then through others), suspicion and its
//! refutation by incarnation, Down declarations, piggybacked dissemination, joins by
//! announce/feed, graceful leave, and a rejoin under the next generation when the others
//! declared this node Down. The member table is indexed by address, so every update a
//! packet carries costs O(1) whatever the cluster size (a member list scanned per update
//! made a 10 000-node simulation quadratic in both time and work).
//!
//! Like the rest of the crate it is a state machine: inputs ([`Swim::handle_data`],
//! [`Swim::handle_timer`], [`Swim::apply_many`], …) leave packets, timers and
//! notifications in an [`Outbox`] the caller drains; it reads no clock.
//!
//! Wire format of a packet (at most `max_packet_size` bytes):
//!
//! ```text
//!   postcard(Header {src, src_incarnation, dst, message})
//!   u16 BE: number of member updates, then each postcard(Member)   (none for Announce)
//!   then, to the end: u16 BE length + bytes, one per version notice
//! ```

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::catalog::{BUCKETS, NoticeHandler, in_scope};

// Buckets of names are kept as u16.
const _: () = assert!(BUCKETS <= 1 << 16);
use crate::identity::GossipId;

/// A member's incarnation: raised by the member itself to refute a suspicion.
pub type Incarnation = u32;

/// What is known of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum State {
    /// Answering probes.
    Alive,
    /// A probe of it failed; it is still active until declared Down (or it refutes).
    Suspect,
    /// Declared dead (or it left). Final for this identity: it comes back only under a
    /// newer one.
    Down,
}

/// A member update: who, at which incarnation, in which state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Shared: a table entry, a queued probe and the probe round hold the same identity.
    id: Arc<GossipId>,
    incarnation: Incarnation,
    state: State,
}

impl Member {
    /// An update.
    pub fn new(id: GossipId, incarnation: Incarnation, state: State) -> Self {
        Member::shared(Arc::new(id), incarnation, state)
    }

    /// An update about an identity held elsewhere already (no copy of it).
    pub fn shared(id: Arc<GossipId>, incarnation: Incarnation, state: State) -> Self {
        Member {
            id,
            incarnation,
            state,
        }
    }

    /// `id` alive at incarnation 0.
    pub fn alive(id: GossipId) -> Self {
        Member::new(id, 0, State::Alive)
    }

    /// `id` declared Down.
    pub fn down(id: GossipId) -> Self {
        Member::new(id, 0, State::Down)
    }

    /// Whose update.
    pub fn id(&self) -> &GossipId {
        &self.id
    }

    /// Its incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// Its state.
    pub fn state(&self) -> State {
        self.state
    }

    fn is_active(&self) -> bool {
        self.state != State::Down
    }
}

/// What a packet is for (postcard: the variant order is the wire tag).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Message {
    Ping(u32),
    Ack(u32),
    /// Probe `target` for me and tell me.
    PingReq {
        target: GossipId,
        probe: u32,
    },
    /// A probe on behalf of `origin`.
    IndirectPing {
        origin: GossipId,
        probe: u32,
    },
    /// The answer to an indirect probe, back to the member that relayed it.
    IndirectAck {
        target: GossipId,
        probe: u32,
    },
    /// The relayed answer: `origin` (the probed member) answered.
    ForwardedAck {
        origin: GossipId,
        probe: u32,
    },
    /// I want to join: send me members.
    Announce,
    /// Members for an announcer (the piggyback holds random active members).
    Feed,
    /// Only the piggyback.
    Gossip,
    /// You are Down here: come back under a new identity.
    TurnUndead,
}

#[derive(Serialize, Deserialize)]
struct Header {
    src: GossipId,
    src_incarnation: Incarnation,
    dst: GossipId,
    message: Message,
}

/// A timer the caller runs: after the delay it asked for, hand it back to
/// [`Swim::handle_timer`]. Timers of an earlier life (before a rejoin or a leave) are
/// ignored by their token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Timer {
    /// A protocol period: conclude the previous probe, start the next.
    Probe {
        /// Life.
        token: u64,
    },
    /// The direct probe's ack deadline: ask others to probe `target`.
    IndirectProbe {
        /// The probed member.
        target: GossipId,
        /// Life.
        token: u64,
    },
    /// A suspicion this node raised runs out: Down unless refuted.
    SuspectToDown {
        /// The suspect.
        id: GossipId,
        /// At which incarnation it was suspected.
        incarnation: Incarnation,
        /// Life.
        token: u64,
    },
    /// Send pending updates to a few members.
    Gossip {
        /// Life.
        token: u64,
    },
    /// Announce to a random member (its feed fills gaps in this node's view).
    Announce {
        /// Life.
        token: u64,
    },
    /// Announce to a few Down members (two sides of a healed partition find each other).
    AnnounceDown {
        /// Life.
        token: u64,
    },
    /// Forget a Down member (it may rejoin under the same identity afterwards).
    RemoveDown(GossipId),
}

/// What changed, for the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// A member became active.
    MemberUp(GossipId),
    /// A member was declared Down.
    MemberDown(GossipId),
    /// A newer identity replaced an older one at the same address.
    Rename(GossipId, GossipId),
    /// This node was declared Down and continues under this new identity.
    Rejoin(GossipId),
    /// An active member is now suspected.
    Suspected(GossipId),
    /// A suspected member refuted the suspicion.
    Cleared(GossipId),
    /// This node has an active member again.
    Active,
    /// This node has no active member left.
    Idle,
}

/// What an input produced: packets to send, timers to run, notifications.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Packets, to whom.
    pub sends: VecDeque<(GossipId, Vec<u8>)>,
    /// Timers, after how long.
    pub timers: VecDeque<(Duration, Timer)>,
    /// Notifications.
    pub notes: VecDeque<Notification>,
    /// Members whose direct probe went unanswered, with the probe's number: the caller
    /// probes them over a reliable channel too (memberlist's TCP fallback) and reports an
    /// answer with [`Swim::reliable_ack`] — before the period ends, that ends the probe
    /// as an ack would, so datagrams lost both ways do not make a suspicion the whole
    /// cluster gossips.
    pub reliable: VecDeque<(GossipId, u32)>,
}

/// Tuning of the protocol (see `GossipConfig` for the values and why).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwimConfig {
    /// A protocol period: one member probed per period.
    pub probe_period: Duration,
    /// How long the direct probe waits before others are asked.
    pub probe_rtt: Duration,
    /// How many others are asked.
    pub indirect_probes: usize,
    /// How long a suspicion this node raised lasts before Down.
    pub suspect_to_down: Duration,
    /// How long a Down member is remembered.
    pub remove_down_after: Duration,
    /// The fewest transmissions of each update (more in larger clusters: 4 × log10(n+1)).
    pub min_transmissions: usize,
    /// How often pending updates go to `gossip_fanout` members.
    pub gossip_interval: Duration,
    /// How many members each gossip round goes to.
    pub gossip_fanout: usize,
    /// How often a random member is announced to.
    pub announce_interval: Duration,
    /// How often Down members are announced to, and how many.
    pub announce_down_interval: Duration,
    /// See `announce_down_interval`.
    pub announce_down_count: usize,
    /// The largest packet.
    pub max_packet_size: usize,
}

/// Why a packet was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwimError {
    /// Larger than the largest packet.
    #[error("packet of {0} bytes is over the limit")]
    TooBig(usize),
    /// Not a packet of this protocol, or cut short.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// From this node's own address.
    #[error("packet from ourselves")]
    FromOurselves,
}

/// The smallest piggybacked item worth trying to fit.
const MIN_ITEM: usize = 12;

/// Items that do not fit skipped per packet before the packet is sent as it is.
const MAX_SKIPS: usize = 8;

/// Updates waiting to be piggybacked, each sent a number of times, the least sent first.
/// A newer item under the same key replaces the queued one (left in place and dropped when
/// reached).
#[derive(Debug)]
struct Piggyback<K> {
    /// `buckets[r]`: items with `r` transmissions left.
    buckets: Vec<VecDeque<Item<K>>>,
    latest: HashMap<K, u64, foldhash::fast::RandomState>,
    seq: u64,
}

#[derive(Debug)]
struct Item<K> {
    key: K,
    seq: u64,
    data: Vec<u8>,
}

impl<K: Hash + Eq + Clone> Piggyback<K> {
    fn new() -> Self {
        Piggyback {
            buckets: Vec::new(),
            latest: HashMap::default(),
            seq: 0,
        }
    }

    fn add(&mut self, key: K, data: Vec<u8>, transmissions: usize) {
        let r = transmissions.max(1);
        self.seq += 1;
        self.latest.insert(key.clone(), self.seq);
        if self.buckets.len() <= r {
            self.buckets.resize_with(r + 1, VecDeque::new);
        }
        self.buckets[r].push_back(Item {
            key,
            seq: self.seq,
            data,
        });
    }

    fn len(&self) -> usize {
        self.latest.len()
    }

    fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    /// Writes items into `buf` up to `limit` bytes, each after `prefix(len)` bytes of
    /// framing; returns how many.
    fn fill(&mut self, buf: &mut Vec<u8>, limit: usize, prefixed: bool) -> u16 {
        let overhead = if prefixed { 2 } else { 0 };
        let mut count = 0u16;
        let mut skips = 0;
        let mut moved: Vec<(usize, Item<K>)> = Vec::new();
        'buckets: for r in (1..self.buckets.len()).rev() {
            let mut kept = Vec::new();
            while let Some(item) = self.buckets[r].pop_front() {
                if self.latest.get(&item.key) != Some(&item.seq) {
                    continue;
                }
                let need = item.data.len() + overhead;
                if buf.len() + need > limit {
                    kept.push(item);
                    skips += 1;
                    if skips >= MAX_SKIPS || buf.len() + MIN_ITEM > limit {
                        self.buckets[r].extend(kept);
                        break 'buckets;
                    }
                    continue;
                }
                if prefixed {
                    buf.extend_from_slice(&(item.data.len() as u16).to_be_bytes());
                }
                buf.extend_from_slice(&item.data);
                count = count.saturating_add(1);
                if r == 1 {
                    self.latest.remove(&item.key);
                } else {
                    moved.push((r - 1, item));
                }
                if count == u16::MAX {
                    self.buckets[r].extend(kept);
                    break 'buckets;
                }
            }
            // What did not fit this packet waits behind the rest of its bucket.
            self.buckets[r].extend(kept);
        }
        for (r, item) in moved {
            self.buckets[r].push_back(item);
        }
        // A burst (a thousand joins) leaves large queues behind: give the memory back once
        // drained (kept, it was most of a simulated 10 000-node cluster's memory).
        for b in &mut self.buckets {
            if b.is_empty() && b.capacity() > 64 {
                *b = VecDeque::new();
            }
        }
        count
    }
}

/// A member as the table holds it (24 bytes: there is one per member on every node).
#[derive(Debug, Clone)]
struct Entry {
    member: Member,
    /// Its place in `Table::active`, when active.
    active_at: Slot,
    /// The finest bucket of its address ([`addr_bucket`]).
    bucket: u16,
}

/// A position in `Table::active`, or none (4 bytes where `Option<u32>` takes 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot(u32);

impl Slot {
    const NONE: Slot = Slot(u32::MAX);

    fn get(self) -> Option<u32> {
        (self != Slot::NONE).then_some(self.0)
    }

    fn is_some(self) -> bool {
        self != Slot::NONE
    }
}

/// What applying an update did.
#[derive(Debug, Default)]
struct Applied {
    /// The table changed.
    changed: bool,
    was_active: bool,
    now_active: bool,
    was_suspect: bool,
    now_suspect: bool,
    /// The identity it replaced at the same address.
    replaced: Option<GossipId>,
    /// The entry at the update's address now (its own, or a newer identity's).
    index: u32,
}

/// Every member known, in a vector; indexes by address and by node name (raw hash tables
/// of positions in it: 4 bytes a slot, the key read from the entry); the active ones also
/// in a vector (random choice in O(1)).
#[derive(Default)]
struct Table {
    entries: Vec<Entry>,
    by_addr: HashTable<u32>,
    by_node: HashTable<u32>,
    active: Vec<u32>,
    hasher: foldhash::fast::RandomState,
    /// XOR of [`member_hash`] over the active members, kept as they change.
    active_fp: u64,
    /// The same per bucket of addresses ([`addr_bucket`], [`crate::catalog::BUCKETS`] of
    /// them; allocated when a first member is active).
    active_buckets: Vec<u64>,
}

/// FNV-1a of a member's identity, incarnation and state: the same on every node, so two
/// nodes' fingerprints of their active members compare.
fn member_hash(m: &Member) -> u64 {
    let ip = match m.id.addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    crate::catalog::fnv1a(&[
        m.id.node.as_bytes(),
        &[0xff],
        &ip,
        &m.id.addr.port().to_le_bytes(),
        &m.id.generation.to_le_bytes(),
        &m.incarnation.to_le_bytes(),
        &[m.state as u8],
    ])
}

/// Whether an update of the same identity at `incarnation` in `state` is news over `known`.
fn supersedes(known: &Member, incarnation: Incarnation, state: State) -> bool {
    match (known.state, state) {
        (State::Down, _) => false,
        (_, State::Down) => true,
        (State::Alive, State::Suspect) => incarnation >= known.incarnation,
        _ => incarnation > known.incarnation,
    }
}

/// A member update read in place from a packet (same encoding as [`Member`]): most updates
/// a packet carries are known already, and are dropped without a copy.
#[derive(Deserialize)]
struct MemberRef<'a> {
    #[serde(borrow)]
    id: IdRef<'a>,
    incarnation: Incarnation,
    state: State,
}

/// [`GossipId`] read in place.
#[derive(Deserialize)]
struct IdRef<'a> {
    node: &'a str,
    addr: SocketAddr,
    generation: u64,
}

impl MemberRef<'_> {
    fn to_member(&self) -> Member {
        Member::new(
            GossipId::new(self.id.node, self.id.addr, self.id.generation),
            self.incarnation,
            self.state,
        )
    }
}

/// The finest bucket of a member's address (its fingerprint and its push-pull go by it): by
/// address, not name, so the identities that contend for an address — an older life, a
/// newer one under another name — are always compared together.
fn addr_bucket(addr: &SocketAddr) -> usize {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    (crate::catalog::fnv1a(&[&ip, &addr.port().to_le_bytes()]) as usize) & (BUCKETS - 1)
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("entries", &self.entries.len())
            .field("active", &self.active.len())
            .finish_non_exhaustive()
    }
}

impl Table {
    fn reserve(&mut self, n: usize) {
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.by_addr
            .reserve(n, |&j| hasher.hash_one(entries[j as usize].member.id.addr));
        self.by_node.reserve(n, |&j| {
            hasher.hash_one(entries[j as usize].member.id.node.as_str())
        });
        self.entries.reserve_exact(n);
        self.active.reserve_exact(n);
    }

    fn index_of(&self, addr: &SocketAddr) -> Option<u32> {
        let h = self.hasher.hash_one(addr);
        self.by_addr
            .find(h, |&i| self.entries[i as usize].member.id.addr == *addr)
            .copied()
    }

    fn named(&self, node: &str) -> Option<u32> {
        let h = self.hasher.hash_one(node);
        self.by_node
            .find(h, |&i| self.entries[i as usize].member.id.node == node)
            .copied()
    }

    /// Whether applying `update` would change nothing (what [`Table::apply`] decides):
    /// the identity at its address is the same and the update is not news, or a newer
    /// identity holds the address.
    fn is_stale(&self, update: &MemberRef<'_>) -> bool {
        let id = &update.id;
        self.stale_at(
            id.node,
            id.addr,
            id.generation,
            update.incarnation,
            update.state,
        )
        .is_some()
    }

    /// [`Table::is_stale`] of an update given by parts: the entry at its address when
    /// applying it would change nothing.
    fn stale_at(
        &self,
        node: &str,
        addr: SocketAddr,
        generation: u64,
        incarnation: Incarnation,
        state: State,
    ) -> Option<u32> {
        let i = self.index_of(&addr)?;
        let known = &self.entries[i as usize].member;
        let stale = if known.id.node == node && known.id.generation == generation {
            !supersedes(known, incarnation, state)
        } else {
            (known.id.generation, known.id.node.as_str()) > (generation, node)
        };
        stale.then_some(i)
    }

    fn get(&self, addr: &SocketAddr) -> Option<&Member> {
        self.index_of(addr)
            .map(|i| &self.entries[i as usize].member)
    }

    /// Points the name of entry `i` at it (the newest entry of a name wins).
    fn index_name(&mut self, i: u32) {
        let (entries, hasher) = (&self.entries, &self.hasher);
        let node = &entries[i as usize].member.id.node;
        let h = hasher.hash_one(node.as_str());
        match self
            .by_node
            .find_mut(h, |&j| entries[j as usize].member.id.node == *node)
        {
            // An active entry of the name is not displaced by an inactive one.
            Some(slot) => {
                let held = &entries[*slot as usize];
                if !held.active_at.is_some() || entries[i as usize].member.is_active() {
                    *slot = i;
                }
            }
            None => {
                self.by_node.insert_unique(h, i, |&j| {
                    hasher.hash_one(entries[j as usize].member.id.node.as_str())
                });
            }
        }
    }

    /// Drops the name index of entry `i` if it points there.
    fn unindex_name(&mut self, i: u32) {
        let entries = &self.entries;
        let h = self
            .hasher
            .hash_one(entries[i as usize].member.id.node.as_str());
        if let Ok(slot) = self.by_node.find_entry(h, |&j| j == i) {
            slot.remove();
        }
    }

    /// Adds or takes out entry `i`'s part of the active fingerprint (call before and after
    /// changing it).
    fn toggle_fp(&mut self, i: u32) {
        let e = &self.entries[i as usize];
        if e.active_at.is_some() {
            let h = member_hash(&e.member);
            let b = usize::from(e.bucket);
            self.active_fp ^= h;
            if self.active_buckets.is_empty() {
                self.active_buckets = vec![0; BUCKETS];
            }
            self.active_buckets[b] ^= h;
        }
    }

    fn set_active(&mut self, i: u32, active: bool) {
        let at = self.entries[i as usize].active_at.get();
        match (at, active) {
            (None, true) => {
                self.entries[i as usize].active_at = Slot(self.active.len() as u32);
                self.active.push(i);
                self.index_name(i);
            }
            (Some(p), false) => {
                self.active.swap_remove(p as usize);
                if let Some(&moved) = self.active.get(p as usize) {
                    self.entries[moved as usize].active_at = Slot(p);
                }
                self.entries[i as usize].active_at = Slot::NONE;
            }
            _ => {}
        }
    }

    fn apply(&mut self, update: Member) -> Applied {
        let addr = update.id.addr;
        let Some(i) = self.index_of(&addr) else {
            let i = self.entries.len() as u32;
            let active = update.is_active();
            let suspect = update.state == State::Suspect;
            let bucket = addr_bucket(&addr) as u16;
            self.entries.push(Entry {
                member: update,
                active_at: Slot::NONE,
                bucket,
            });
            let (entries, hasher) = (&self.entries, &self.hasher);
            self.by_addr.insert_unique(hasher.hash_one(addr), i, |&j| {
                hasher.hash_one(entries[j as usize].member.id.addr)
            });
            self.index_name(i);
            self.set_active(i, active);
            self.toggle_fp(i);
            return Applied {
                changed: true,
                was_active: false,
                now_active: active,
                was_suspect: false,
                now_suspect: suspect,
                replaced: None,
                index: i,
            };
        };
        let known = &self.entries[i as usize].member;
        let was_active = known.is_active();
        let was_suspect = known.state == State::Suspect;
        let mut out = Applied {
            was_active,
            now_active: was_active,
            was_suspect,
            now_suspect: was_suspect,
            index: i,
            ..Applied::default()
        };
        let renamed = if known.id != update.id {
            if known.id.win_addr_conflict(&update.id) {
                return out;
            }
            out.replaced = Some(GossipId::clone(&known.id));
            known.id.node != update.id.node
        } else {
            if !supersedes(known, update.incarnation, update.state) {
                return out;
            }
            false
        };
        if renamed {
            self.unindex_name(i);
        }
        out.changed = true;
        out.now_active = update.is_active();
        out.now_suspect = update.state == State::Suspect;
        self.toggle_fp(i);
        self.entries[i as usize].member = update;
        if renamed {
            self.index_name(i);
        }
        self.set_active(i, out.now_active);
        self.toggle_fp(i);
        out
    }

    fn remove(&mut self, id: &GossipId) {
        let Some(i) = self.index_of(&id.addr) else {
            return;
        };
        if *self.entries[i as usize].member.id != *id {
            return;
        }
        self.toggle_fp(i);
        self.set_active(i, false);
        self.unindex_name(i);
        let h = self.hasher.hash_one(id.addr);
        if let Ok(slot) = self.by_addr.find_entry(h, |&j| j == i) {
            slot.remove();
        }
        let last = self.entries.len() as u32 - 1;
        if i != last {
            // The last entry moves to `i`: re-point its indexes first.
            let moved = &self.entries[last as usize];
            let ha = self.hasher.hash_one(moved.member.id.addr);
            if let Some(slot) = self.by_addr.find_mut(ha, |&j| j == last) {
                *slot = i;
            }
            let hn = self.hasher.hash_one(moved.member.id.node.as_str());
            if let Some(slot) = self.by_node.find_mut(hn, |&j| j == last) {
                *slot = i;
            }
            if let Some(p) = moved.active_at.get() {
                self.active[p as usize] = i;
            }
        }
        self.entries.swap_remove(i as usize);
    }

    /// Up to `k` distinct random active members for which `keep` holds.
    fn choose_active(
        &self,
        k: usize,
        rng: &mut StdRng,
        keep: impl Fn(&Member) -> bool,
    ) -> Vec<GossipId> {
        let n = self.active.len();
        let mut out = Vec::with_capacity(k.min(n));
        if k == 0 || n == 0 {
            return out;
        }
        if k * 4 >= n {
            // Most of them: a shuffle.
            let mut all: Vec<u32> = self.active.clone();
            all.shuffle(rng);
            for i in all {
                let m = &self.entries[i as usize].member;
                if keep(m) {
                    out.push(GossipId::clone(&m.id));
                    if out.len() == k {
                        break;
                    }
                }
            }
            return out;
        }
        let mut picked: Vec<u32> = Vec::with_capacity(k);
        // Random draws; a few more than k tries each, so a `keep` that refuses many ends.
        for _ in 0..k * 8 {
            let i = self.active[rng.random_range(0..n)];
            if picked.contains(&i) {
                continue;
            }
            picked.push(i);
            let m = &self.entries[i as usize].member;
            if keep(m) {
                out.push(GossipId::clone(&m.id));
                if out.len() == k {
                    break;
                }
            }
        }
        out
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Connection {
    /// No active member.
    Disconnected,
    Connected,
    /// Left (or declared Down without a way back): probes nothing, answers nothing.
    Undead,
}

/// The probe of one protocol period.
#[derive(Debug, Default)]
struct Probe {
    number: u32,
    target: Option<Member>,
    acked: bool,
}

/// One node's SWIM membership.
#[derive(Debug)]
pub struct Swim {
    id: GossipId,
    incarnation: Incarnation,
    config: SwimConfig,
    rng: StdRng,
    table: Table,
    updates: Piggyback<SocketAddr>,
    notices: Piggyback<String>,
    handler: NoticeHandler,
    probe: Probe,
    /// Members to probe (by their address), in a shuffled round: SWIM's randomised
    /// round-robin. The identities are shared with the table (8 bytes a member).
    probe_order: Vec<Arc<GossipId>>,
    connection: Connection,
    token: u64,
    /// What the inputs produced.
    pub out: Outbox,
}

impl Swim {
    /// A node known to nobody yet: it joins by [`Swim::announce`] to a member.
    pub fn new(id: GossipId, config: SwimConfig, rng_seed: u64, handler: NoticeHandler) -> Swim {
        Swim {
            id,
            incarnation: 0,
            config,
            rng: StdRng::seed_from_u64(rng_seed),
            table: Table::default(),
            updates: Piggyback::new(),
            notices: Piggyback::new(),
            handler,
            probe: Probe::default(),
            probe_order: Vec::new(),
            connection: Connection::Disconnected,
            token: 0,
            out: Outbox::default(),
        }
    }

    /// This node's identity.
    pub fn identity(&self) -> &GossipId {
        &self.id
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// A fingerprint of the active members' identities, incarnations and states, this
    /// node included (as alive at its incarnation): equal on two nodes that see the same.
    pub fn fingerprint(&self) -> u64 {
        self.table.active_fp ^ self.own_hash()
    }

    /// [`Swim::fingerprint`] per bucket of addresses, `count` buckets (a power of two up
    /// to [`crate::catalog::BUCKETS`]; bucket `b` covers the addresses whose finest bucket
    /// is `b` modulo `count`): two nodes that differ compare the members of the buckets
    /// that differ only.
    pub fn bucket_fingerprints(&self, count: usize) -> Vec<u64> {
        let count = count.clamp(1, BUCKETS);
        let mut out = vec![0; count];
        for (fine, fp) in self.table.active_buckets.iter().enumerate() {
            out[fine % count] ^= fp;
        }
        out[addr_bucket(&self.id.addr) % count] ^= self.own_hash();
        out
    }

    fn own_hash(&self) -> u64 {
        member_hash(&Member::new(
            self.id.clone(),
            self.incarnation,
            State::Alive,
        ))
    }

    /// Every member known (Down ones included) and this node itself, alive at its
    /// incarnation: what a membership push-pull sends. With `scope` (how many buckets,
    /// which ones, sorted), only the members whose addresses fall in those buckets.
    pub fn membership(&self, scope: Option<(usize, &[u32])>) -> Vec<Member> {
        let mut v: Vec<Member> = self
            .table
            .entries
            .iter()
            .filter(|e| in_scope(scope, e.bucket))
            .map(|e| e.member.clone())
            .collect();
        if in_scope(scope, addr_bucket(&self.id.addr) as u16) {
            v.push(Member::new(self.id.clone(), self.incarnation, State::Alive));
        }
        v
    }

    /// Active members (alive or suspected).
    pub fn num_members(&self) -> usize {
        self.table.active.len()
    }

    /// Active members.
    pub fn iter_members(&self) -> impl Iterator<Item = &Member> + '_ {
        self.table
            .active
            .iter()
            .map(|i| &self.table.entries[*i as usize].member)
    }

    /// Every member known, Down ones included.
    pub fn iter_membership_state(&self) -> impl Iterator<Item = &Member> + '_ {
        self.table.entries.iter().map(|e| &e.member)
    }

    /// The member known at `addr`.
    pub fn member_at(&self, addr: &SocketAddr) -> Option<&Member> {
        self.table.get(addr)
    }

    /// The active member named `node`.
    pub fn active_named(&self, node: &str) -> Option<&GossipId> {
        let i = self.table.named(node)?;
        let e = &self.table.entries[i as usize];
        e.active_at.get().map(|_| &*e.member.id)
    }

    /// A random active member.
    pub fn random_member(&mut self) -> Option<GossipId> {
        self.table.choose_active(1, &mut self.rng, |_| true).pop()
    }

    /// Whether `id` is suspected at `incarnation` (its suspicion has not moved on).
    pub fn is_suspect(&self, id: &GossipId, incarnation: Incarnation) -> bool {
        self.table.get(&id.addr).is_some_and(|m| {
            *m.id == *id && m.incarnation == incarnation && m.state == State::Suspect
        })
    }

    /// Updates and notices waiting to be sent, and the entries their queues hold (stale
    /// ones included).
    pub fn backlog(&self) -> (usize, usize) {
        (
            self.updates.len() + self.notices.len(),
            self.updates.queued() + self.notices.queued(),
        )
    }

    fn transmissions(&self) -> usize {
        let n = self.table.active.len() as f64 + 1.0;
        ((n + 1.0).log10() * 4.0)
            .ceil()
            .max(self.config.min_transmissions as f64) as usize
    }

    /// Starts as a member of a formed cluster: `members` are known already, alive at
    /// incarnation 0, and nothing is disseminated about them (every other member knows
    /// them too). The identities are shared, not copied. For a simulator starting a large
    /// cluster where a join storm would leave it: 10 000 nodes joining at once is
    /// n²·log n of piggybacked updates. A joining node uses [`Swim::announce`].
    pub fn preload(&mut self, members: impl ExactSizeIterator<Item = Arc<GossipId>>) {
        self.table.reserve(members.len());
        for id in members {
            if id.addr != self.id.addr {
                self.table.apply(Member::shared(id, 0, State::Alive));
            }
        }
        self.adjust_connection();
    }

    /// `target` answered the reliable probe of probe `number` (see [`Outbox::reliable`]):
    /// if that probe is still the current one and nothing else acked it, it succeeded
    /// thanks to this answer (returned).
    pub fn reliable_ack(&mut self, target: &GossipId, number: u32) -> bool {
        let current = self.probe.number == number
            && self.probe.target.as_ref().is_some_and(|t| *t.id == *target);
        let rescued = current && !self.probe.acked;
        if rescued {
            self.probe.acked = true;
        }
        rescued
    }

    /// Asks `dst` (a seed: its identity may be a guess at the address) for members.
    pub fn announce(&mut self, dst: GossipId) {
        self.send(dst, Message::Announce);
    }

    /// Sends pending updates to a few members now (a departure, a refutation).
    pub fn gossip(&mut self) {
        let k = self.config.indirect_probes;
        self.send_to_random(k, Message::Gossip);
    }

    /// Sends pending notices to a few members now.
    pub fn broadcast(&mut self) {
        if !self.notices.is_empty() {
            self.gossip();
        }
    }

    /// Queues a version notice of this node (the handler decides whether it is news).
    pub fn add_broadcast(&mut self, data: &[u8]) -> bool {
        if data.is_empty() || data.len() > self.max_item() {
            return false;
        }
        match self.handler.receive_item(data, None) {
            Ok(Some(key)) => {
                let tx = self.transmissions();
                self.notices.add(key.node().to_owned(), data.to_vec(), tx);
                true
            }
            _ => false,
        }
    }

    /// Leaves: a Down update about this node goes out, and it stops taking part.
    pub fn leave_cluster(&mut self) {
        let down = Member::down(self.id.clone());
        self.queue_update(&down);
        self.gossip();
        self.become_undead();
    }

    /// Applies updates (from a push-pull, or this node's own knowledge). Updates about
    /// this node are answered as SWIM answers them: a suspicion is refuted, a Down
    /// declaration makes it rejoin under its next identity.
    pub fn apply_many(&mut self, updates: impl IntoIterator<Item = Member>, broadcast: bool) {
        for update in updates {
            if *update.id == self.id {
                self.handle_self_update(update.incarnation, update.state);
            } else if update.id.addr == self.id.addr {
                // Another identity at this node's address: an older life of it, Down.
                self.apply_update(Member::shared(update.id, 0, State::Down), broadcast);
            } else {
                self.apply_update(update, broadcast);
            }
        }
        self.adjust_connection();
    }

    /// A packet from a peer.
    pub fn handle_data(&mut self, data: &[u8]) -> Result<(), SwimError> {
        if data.len() > self.config.max_packet_size {
            return Err(SwimError::TooBig(data.len()));
        }
        let (header, mut rest) = postcard::take_from_bytes::<Header>(data)
            .map_err(|_| SwimError::Malformed("header"))?;
        if header.src.addr == self.id.addr {
            return Err(SwimError::FromOurselves);
        }
        let addressed = header.dst == self.id
            || (header.message == Message::Announce && header.dst.addr == self.id.addr);
        if !addressed || self.connection == Connection::Undead {
            return Ok(());
        }
        let mut updates = Vec::new();
        if matches!(header.message, Message::Announce | Message::TurnUndead) {
            if !rest.is_empty() {
                return Err(SwimError::Malformed("bytes after a bare message"));
            }
        } else {
            let count = take_u16(&mut rest).ok_or(SwimError::Malformed("update count"))?;
            for _ in 0..count {
                let (m, r) = postcard::take_from_bytes::<MemberRef>(rest)
                    .map_err(|_| SwimError::Malformed("member update"))?;
                updates.push(m);
                rest = r;
            }
        }
        let Header {
            src,
            src_incarnation,
            message,
            ..
        } = header;
        // The sender is alive at its incarnation: most packets come from a member known
        // so, and that costs one lookup and no copy.
        let known = self.table.stale_at(
            &src.node,
            src.addr,
            src.generation,
            src_incarnation,
            State::Alive,
        );
        let sender_active = match known {
            Some(i) => {
                let m = &self.table.entries[i as usize].member;
                *m.id == src && m.is_active()
            }
            None => self.apply_update(
                Member::new(src.clone(), src_incarnation, State::Alive),
                true,
            ),
        };
        if !sender_active {
            // A member this node holds Down (or an older life at that address) is told so.
            if message == Message::TurnUndead {
                self.handle_self_update(0, State::Down);
            }
            self.send(src, Message::TurnUndead);
            return Ok(());
        }
        let me = self.id.clone();
        // Updates about this node's address go through apply_many's own rules; others
        // that change nothing are dropped without being copied.
        let fresh: Vec<Member> = updates
            .iter()
            .filter(|m| m.id.addr == self.id.addr || !self.table.is_stale(m))
            .map(MemberRef::to_member)
            .collect();
        self.apply_many(fresh, true);
        let notices = self.receive_notices(rest, &src);
        // An update in the packet made this node rejoin: the message was for its old life.
        if self.connection != Connection::Connected || self.id != me {
            return notices;
        }
        match message {
            Message::Ping(n) => self.send(src, Message::Ack(n)),
            Message::Ack(n) => {
                if self.probe.number == n
                    && self.probe.target.as_ref().is_some_and(|t| *t.id == src)
                {
                    self.probe.acked = true;
                }
            }
            Message::PingReq { target, probe } => {
                if target != self.id {
                    self.send(target, Message::IndirectPing { origin: src, probe });
                }
            }
            Message::IndirectPing { origin, probe } => {
                if origin != self.id {
                    self.send(
                        src,
                        Message::IndirectAck {
                            target: origin,
                            probe,
                        },
                    );
                }
            }
            Message::IndirectAck { target, probe } => {
                if target != self.id {
                    self.send(target, Message::ForwardedAck { origin: src, probe });
                }
            }
            Message::ForwardedAck { origin, probe } => {
                if self.probe.number == probe
                    && self.probe.target.as_ref().is_some_and(|t| *t.id == origin)
                {
                    self.probe.acked = true;
                }
            }
            Message::Announce => self.send(src, Message::Feed),
            Message::TurnUndead => self.handle_self_update(0, State::Down),
            Message::Gossip | Message::Feed => {}
        }
        notices
    }

    /// A timer the caller ran.
    pub fn handle_timer(&mut self, timer: Timer) {
        let live = |token: u64, s: &Swim| token == s.token && s.connection == Connection::Connected;
        match timer {
            Timer::Probe { token } if live(token, self) => self.probe_next(),
            Timer::IndirectProbe { target, token } if live(token, self) => {
                let probing = self.probe.target.as_ref().is_some_and(|t| *t.id == target);
                let active = self
                    .table
                    .get(&target.addr)
                    .is_some_and(|m| *m.id == target && m.is_active());
                if probing && !self.probe.acked && active {
                    let probe = self.probe.number;
                    self.out.reliable.push_back((target.clone(), probe));
                    let helpers =
                        self.table
                            .choose_active(self.config.indirect_probes, &mut self.rng, |m| {
                                *m.id != target
                            });
                    for h in helpers {
                        self.send(
                            h,
                            Message::PingReq {
                                target: target.clone(),
                                probe,
                            },
                        );
                    }
                }
            }
            Timer::SuspectToDown {
                id,
                incarnation,
                token,
            } if token == self.token && self.is_suspect(&id, incarnation) => {
                self.apply_update(Member::down(id), true);
                self.adjust_connection();
            }
            Timer::Gossip { token } if live(token, self) => {
                self.out
                    .timers
                    .push_back((self.config.gossip_interval, Timer::Gossip { token }));
                if !self.updates.is_empty() || !self.notices.is_empty() {
                    let k = self.config.gossip_fanout;
                    self.send_to_random(k, Message::Gossip);
                }
            }
            Timer::Announce { token } if live(token, self) => {
                self.out
                    .timers
                    .push_back((self.config.announce_interval, Timer::Announce { token }));
                self.send_to_random(1, Message::Announce);
            }
            Timer::AnnounceDown { token } if live(token, self) => {
                self.out.timers.push_back((
                    self.config.announce_down_interval,
                    Timer::AnnounceDown { token },
                ));
                let mut down: Vec<GossipId> = self
                    .table
                    .entries
                    .iter()
                    .filter(|e| !e.member.is_active() && e.member.id.addr != self.id.addr)
                    .map(|e| GossipId::clone(&e.member.id))
                    .collect();
                down.shuffle(&mut self.rng);
                down.truncate(self.config.announce_down_count);
                for d in down {
                    self.send(d, Message::Announce);
                }
            }
            Timer::RemoveDown(id)
                if self
                    .table
                    .get(&id.addr)
                    .is_some_and(|m| *m.id == id && !m.is_active()) =>
            {
                self.table.remove(&id);
            }
            _ => {}
        }
    }

    fn probe_next(&mut self) {
        let token = self.token;
        self.out
            .timers
            .push_back((self.config.probe_period, Timer::Probe { token }));
        // The previous period's probe, unanswered directly and through others: suspect.
        if let Some(failed) = self.probe.target.take()
            && !self.probe.acked
        {
            let suspect = Member::shared(failed.id.clone(), failed.incarnation, State::Suspect);
            let exists = self
                .table
                .get(&failed.id.addr)
                .is_some_and(|m| m.id == failed.id);
            if exists {
                self.apply_update(suspect, true);
                if self.is_suspect(&failed.id, failed.incarnation) {
                    self.out.timers.push_back((
                        self.config.suspect_to_down,
                        Timer::SuspectToDown {
                            id: GossipId::clone(&failed.id),
                            incarnation: failed.incarnation,
                            token,
                        },
                    ));
                }
            }
        }
        self.probe.acked = false;
        self.probe.number = self.probe.number.wrapping_add(1);
        let Some(target) = self.next_probe_target() else {
            return;
        };
        self.probe.target = Some(target.clone());
        let number = self.probe.number;
        self.send(GossipId::clone(&target.id), Message::Ping(number));
        self.out.timers.push_back((
            self.config.probe_rtt,
            Timer::IndirectProbe {
                target: GossipId::clone(&target.id),
                token,
            },
        ));
    }

    fn next_probe_target(&mut self) -> Option<Member> {
        for _ in 0..2 {
            while let Some(next) = self.probe_order.pop() {
                if let Some(m) = self.table.get(&next.addr)
                    && m.is_active()
                {
                    return Some(m.clone());
                }
            }
            // A new round: every active member once, in a random order.
            let mut round: Vec<Arc<GossipId>> = self
                .table
                .active
                .iter()
                .map(|i| self.table.entries[*i as usize].member.id.clone())
                .collect();
            round.shuffle(&mut self.rng);
            self.probe_order = round;
        }
        None
    }

    fn receive_notices(&mut self, mut data: &[u8], src: &GossipId) -> Result<(), SwimError> {
        while !data.is_empty() {
            let len = take_u16(&mut data).ok_or(SwimError::Malformed("notice length"))? as usize;
            if len == 0 || data.len() < len {
                return Err(SwimError::Malformed("notice cut short"));
            }
            let (item, rest) = data.split_at(len);
            data = rest;
            if item.len() > self.max_item() {
                return Err(SwimError::Malformed("notice too large"));
            }
            match self.handler.receive_item(item, Some(src)) {
                Ok(Some(key)) => {
                    let tx = self.transmissions();
                    self.notices.add(key.node().to_owned(), item.to_vec(), tx);
                }
                Ok(None) => {}
                Err(_) => return Err(SwimError::Malformed("notice")),
            }
        }
        Ok(())
    }

    fn handle_self_update(&mut self, incarnation: Incarnation, state: State) {
        match state {
            State::Alive => {}
            State::Suspect => {
                if incarnation >= self.incarnation {
                    if incarnation == Incarnation::MAX {
                        self.rejoin();
                        return;
                    }
                    self.incarnation = incarnation + 1;
                }
                // An older suspicion still going round: the refutation was missed there,
                // so it goes out again.
                self.gossip();
            }
            State::Down => {
                if self.connection != Connection::Undead {
                    self.rejoin();
                }
            }
        }
    }

    /// Declared Down by the others: continue under the next generation.
    fn rejoin(&mut self) {
        let new = self.id.renew();
        if !new.win_addr_conflict(&self.id) {
            // No generation left above this one: stop rather than loop.
            self.become_undead();
            return;
        }
        let old = std::mem::replace(&mut self.id, new);
        self.incarnation = 0;
        self.token += 1;
        self.probe = Probe::default();
        self.connection = Connection::Disconnected;
        let down = Member::down(old);
        self.queue_update(&down);
        self.out
            .notes
            .push_back(Notification::Rejoin(self.id.clone()));
        self.adjust_connection();
        self.gossip();
    }

    fn become_undead(&mut self) {
        self.connection = Connection::Undead;
        self.token += 1;
        self.probe = Probe::default();
    }

    fn adjust_connection(&mut self) {
        match self.connection {
            Connection::Disconnected if !self.table.active.is_empty() => {
                self.connection = Connection::Connected;
                let token = self.token;
                let c = &self.config;
                let jitter = |rng: &mut StdRng, d: Duration| {
                    Duration::from_micros(
                        rng.random_range(0..=u64::try_from(d.as_micros()).unwrap_or(1).max(1)),
                    )
                };
                let first_probe = jitter(&mut self.rng, c.probe_period);
                let timers = [
                    (first_probe, Timer::Probe { token }),
                    (c.gossip_interval, Timer::Gossip { token }),
                    (c.announce_interval, Timer::Announce { token }),
                    (c.announce_down_interval, Timer::AnnounceDown { token }),
                ];
                self.out.timers.extend(timers);
                self.out.notes.push_back(Notification::Active);
            }
            Connection::Connected if self.table.active.is_empty() => {
                self.connection = Connection::Disconnected;
                self.token += 1;
                self.probe = Probe::default();
                self.out.notes.push_back(Notification::Idle);
            }
            _ => {}
        }
    }

    /// Applies an update about another member; returns whether it is active now (false
    /// when the table holds it Down or a newer identity at its address).
    fn apply_update(&mut self, update: Member, broadcast: bool) -> bool {
        let id = update.id.clone();
        let applied = self.table.apply(update);
        if applied.changed {
            if broadcast {
                let m = self.table.entries[applied.index as usize].member.clone();
                self.queue_update(&m);
            }
            if !applied.now_active {
                self.out.timers.push_back((
                    self.config.remove_down_after,
                    Timer::RemoveDown(GossipId::clone(&id)),
                ));
            }
            if applied.now_active && !applied.was_active {
                // Somewhere in the current probe round.
                self.probe_order.push(id.clone());
                let last = self.probe_order.len() - 1;
                let at = self.rng.random_range(0..=last);
                self.probe_order.swap(at, last);
            }
        }
        if let Some(old) = applied.replaced {
            self.out
                .notes
                .push_back(Notification::Rename(old, GossipId::clone(&id)));
        }
        if applied.now_active != applied.was_active {
            self.out.notes.push_back(if applied.now_active {
                Notification::MemberUp(GossipId::clone(&id))
            } else {
                Notification::MemberDown(GossipId::clone(&id))
            });
        }
        if applied.changed && applied.now_active {
            if applied.now_suspect && !applied.was_suspect {
                self.out
                    .notes
                    .push_back(Notification::Suspected(GossipId::clone(&id)));
            } else if applied.was_suspect && !applied.now_suspect && applied.was_active {
                self.out
                    .notes
                    .push_back(Notification::Cleared(GossipId::clone(&id)));
            }
        }
        let m = &self.table.entries[applied.index as usize].member;
        m.id == id && m.is_active()
    }

    /// The largest piggybacked item: what fits beside the largest header with room to
    /// spare (a larger one would never be sent, and would hold up the queue).
    fn max_item(&self) -> usize {
        self.config.max_packet_size / 4
    }

    fn queue_update(&mut self, m: &Member) {
        if let Ok(data) = postcard::to_stdvec(m)
            && data.len() <= self.max_item()
        {
            let tx = self.transmissions();
            self.updates.add(m.id.addr, data, tx);
        }
    }

    fn send_to_random(&mut self, k: usize, message: Message) {
        for to in self.table.choose_active(k, &mut self.rng, |_| true) {
            self.send(to, message.clone());
        }
    }

    fn send(&mut self, dst: GossipId, message: Message) {
        let limit = self.config.max_packet_size;
        // An announce carries nothing; neither does TurnUndead (its receiver, held Down
        // here, drops what rides with it).
        let bare = matches!(message, Message::Announce | Message::TurnUndead);
        let feed = message == Message::Feed;
        let header = Header {
            src: self.id.clone(),
            src_incarnation: self.incarnation,
            dst,
            message,
        };
        let Ok(mut buf) = postcard::to_stdvec(&header) else {
            return;
        };
        if !bare && buf.len() + 2 <= limit {
            let at = buf.len();
            buf.extend_from_slice(&[0, 0]);
            let count = if feed {
                self.fill_feed(&mut buf, limit, &header.dst)
            } else {
                self.updates.fill(&mut buf, limit, false)
            };
            buf[at..at + 2].copy_from_slice(&count.to_be_bytes());
            self.notices.fill(&mut buf, limit, true);
        }
        self.out.sends.push_back((header.dst, buf));
    }

    /// Random active members for an announcer, as many as fit.
    fn fill_feed(&mut self, buf: &mut Vec<u8>, limit: usize, dst: &GossipId) -> u16 {
        let guess = (limit.saturating_sub(buf.len()) / 24).max(1);
        let chosen = self
            .table
            .choose_active(guess, &mut self.rng, |m| *m.id != *dst);
        let mut count = 0u16;
        for id in chosen {
            let Some(m) = self.table.get(&id.addr) else {
                continue;
            };
            let Ok(bytes) = postcard::to_stdvec(m) else {
                continue;
            };
            if buf.len() + bytes.len() > limit {
                break;
            }
            buf.extend_from_slice(&bytes);
            count += 1;
        }
        count
    }
}

fn take_u16(data: &mut &[u8]) -> Option<u16> {
    if data.len() < 2 {
        return None;
    }
    let v = u16::from_be_bytes([data[0], data[1]]);
    *data = &data[2..];
    Some(v)
}

impl<K> Piggyback<K> {
    fn queued(&self) -> usize {
        self.buckets.iter().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(i: u8, generation: u64) -> GossipId {
        GossipId::new(
            format!("n{i}"),
            SocketAddr::from(([10, 0, 0, i], 7946)),
            generation,
        )
    }

    #[test]
    fn the_table_follows_swims_precedence_and_indexes_stay_consistent() {
        let mut t = Table::default();
        assert!(t.apply(Member::alive(id(1, 1))).now_active);
        assert!(t.apply(Member::new(id(2, 1), 3, State::Alive)).changed);
        // Suspect at the same incarnation overrides Alive; Alive needs a higher one.
        assert!(
            t.apply(Member::new(id(2, 1), 3, State::Suspect))
                .now_suspect
        );
        assert!(!t.apply(Member::new(id(2, 1), 3, State::Alive)).changed);
        let cleared = t.apply(Member::new(id(2, 1), 4, State::Alive));
        assert!(cleared.changed && cleared.was_suspect && !cleared.now_suspect);
        // Down is final for an identity.
        assert!(!t.apply(Member::down(id(2, 1))).now_active);
        assert!(!t.apply(Member::new(id(2, 1), 9, State::Alive)).changed);
        assert_eq!(t.active.len(), 1);
        // A newer generation at the address replaces it; an older one loses.
        let renamed = t.apply(Member::alive(id(2, 2)));
        assert_eq!(renamed.replaced, Some(id(2, 1)));
        assert!(renamed.now_active && !renamed.was_active);
        assert!(!t.apply(Member::alive(id(2, 1))).changed);
        assert_eq!(t.active.len(), 2);
        // Removal keeps every index pointing at the right entry.
        t.apply(Member::alive(id(3, 1)));
        t.apply(Member::down(id(1, 1)));
        t.remove(&id(1, 1));
        assert_eq!(t.entries.len(), 2);
        for (i, e) in t.entries.iter().enumerate() {
            assert_eq!(t.index_of(&e.member.id.addr), Some(i as u32));
            assert_eq!(t.named(&e.member.id.node), Some(i as u32));
            if let Some(p) = e.active_at.get() {
                assert_eq!(t.active[p as usize] as usize, i);
            }
        }
        assert_eq!(t.active.len(), 2);
        // The kept fingerprint is the one computed from scratch.
        let fresh = t
            .entries
            .iter()
            .filter(|e| e.active_at.is_some())
            .fold(0, |fp, e| fp ^ member_hash(&e.member));
        assert_eq!(t.active_fp, fresh);
        // And per bucket of names.
        let mut buckets = vec![0; BUCKETS];
        for e in t.entries.iter().filter(|e| e.active_at.is_some()) {
            buckets[addr_bucket(&e.member.id.addr)] ^= member_hash(&e.member);
        }
        assert_eq!(t.active_buckets, buckets);
        for e in &t.entries {
            assert_eq!(usize::from(e.bucket), addr_bucket(&e.member.id.addr));
        }
        // One per member on every node: kept small.
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    fn swim(i: u8) -> Swim {
        let cfg = crate::config::GossipConfig::default().swim_config();
        let shared = crate::catalog::SharedCatalog::default();
        Swim::new(
            id(i, 1),
            cfg,
            u64::from(i),
            NoticeHandler::new(shared, format!("n{i}")),
        )
    }

    /// Delivers every queued packet between `nodes` until none is left; returns how many.
    fn exchange(nodes: &mut [Swim]) -> usize {
        let mut moved = 0;
        loop {
            let mut out = Vec::new();
            for n in nodes.iter_mut() {
                out.extend(n.out.sends.drain(..));
            }
            if out.is_empty() {
                return moved;
            }
            for (to, bytes) in out {
                moved += 1;
                if let Some(n) = nodes.iter_mut().find(|n| n.id.addr == to.addr) {
                    let _ = n.handle_data(&bytes);
                }
            }
        }
    }

    #[test]
    fn an_update_read_in_place_is_stale_exactly_when_applying_it_changes_nothing() {
        let mut t = Table::default();
        let updates = [
            Member::alive(id(1, 1)),
            Member::alive(id(1, 1)),
            Member::new(id(1, 1), 0, State::Suspect),
            Member::new(id(1, 1), 0, State::Suspect),
            Member::new(id(1, 1), 0, State::Alive),
            Member::new(id(1, 1), 1, State::Alive),
            Member::new(id(1, 1), 5, State::Suspect),
            Member::down(id(1, 1)),
            Member::new(id(1, 1), 9, State::Alive),
            Member::alive(id(1, 2)),
            Member::alive(id(1, 1)),
            Member::new(id(1, 2), 0, State::Suspect),
            Member::alive(id(2, 7)),
            Member::down(id(2, 6)),
        ];
        for (k, m) in updates.into_iter().enumerate() {
            // The same bytes as a packet carries, read without a copy.
            let bytes = postcard::to_stdvec(&m).unwrap();
            let (r, rest) = postcard::take_from_bytes::<MemberRef>(&bytes).unwrap();
            assert!(rest.is_empty());
            assert_eq!(r.to_member(), m, "update {k}");
            let stale = t.is_stale(&r);
            assert_eq!(t.apply(m).changed, !stale, "update {k}");
        }
    }

    #[test]
    fn bucket_fingerprints_fold_to_the_fingerprint_and_scope_the_membership() {
        let mut s = swim(0);
        s.apply_many((1..=200).map(|i| Member::alive(id(i, 1))), false);
        s.apply_many([Member::down(id(9, 1))], false);
        for count in [1, 2, 8, 64, BUCKETS] {
            let b = s.bucket_fingerprints(count);
            assert_eq!(b.iter().fold(0, |x, y| x ^ y), s.fingerprint(), "{count}");
        }
        // A second view differing in one member's state differs in that member's bucket.
        let mut t = swim(0);
        t.apply_many((1..=200).map(|i| Member::alive(id(i, 1))), false);
        t.apply_many([Member::down(id(9, 1))], false);
        assert_eq!(s.bucket_fingerprints(8), t.bucket_fingerprints(8));
        t.apply_many([Member::new(id(77, 1), 0, State::Suspect)], false);
        let (sb, tb) = (s.bucket_fingerprints(8), t.bucket_fingerprints(8));
        let differ: Vec<u32> = (0..8u32)
            .filter(|b| sb[*b as usize] != tb[*b as usize])
            .collect();
        assert_eq!(differ, vec![(addr_bucket(&id(77, 1).addr) % 8) as u32]);
        // The scoped membership holds that bucket's members (Down ones too), n77 among them.
        let scoped = t.membership(Some((8, &differ)));
        assert!(scoped.len() < 60, "{}", scoped.len());
        assert!(
            scoped
                .iter()
                .all(|m| addr_bucket(&m.id.addr) % 8 == differ[0] as usize)
        );
        assert!(
            scoped
                .iter()
                .any(|m| m.id.node == "n77" && m.state == State::Suspect)
        );
        // Unscoped: every member known and this node.
        assert_eq!(t.membership(None).len(), 201);
        s.apply_many(scoped, false);
        assert_eq!(s.fingerprint(), t.fingerprint());
    }

    #[test]
    fn a_newer_identity_held_down_at_an_address_reaches_a_view_that_holds_the_older_one() {
        let mut a = swim(0);
        let mut b = swim(0);
        a.apply_many((1..=100).map(|i| Member::alive(id(i, 1))), false);
        b.apply_many((1..=100).map(|i| Member::alive(id(i, 1))), false);
        // At n5's address a newer identity under another name came and went Down; only b
        // saw it (the Down is in no fingerprint, the older identity is in a's).
        let newer = GossipId::new("renamed", id(5, 1).addr, 2);
        b.apply_many([Member::alive(newer.clone())], false);
        b.apply_many([Member::down(newer.clone())], false);
        let (fa, fb) = (a.bucket_fingerprints(8), b.bucket_fingerprints(8));
        let differ: Vec<u32> = (0..8u32)
            .filter(|k| fa[*k as usize] != fb[*k as usize])
            .collect();
        assert_eq!(differ.len(), 1);
        // Members are bucketed by address: the push-pull of that bucket carries the Down.
        a.apply_many(b.membership(Some((8, &differ))), false);
        let held = a.member_at(&newer.addr).unwrap();
        assert_eq!((held.id(), held.state()), (&newer, State::Down));
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn a_node_held_down_rejoins_once_under_the_next_generation() {
        let mut nodes = [swim(1), swim(2)];
        nodes[1].announce(id(1, 0));
        exchange(&mut nodes);
        assert_eq!(nodes[0].num_members(), 1);
        assert_eq!(nodes[1].num_members(), 1);
        // n1 holds n2 Down; n2's next packet is answered with TurnUndead.
        nodes[0].apply_many([Member::down(id(2, 1))], true);
        nodes[1].out.notes.clear();
        nodes[1].gossip();
        exchange(&mut nodes);
        let rejoins: Vec<_> = nodes[1]
            .out
            .notes
            .iter()
            .filter(|n| matches!(n, Notification::Rejoin(_)))
            .collect();
        assert_eq!(rejoins, [&Notification::Rejoin(id(2, 2))]);
        assert_eq!(nodes[1].identity(), &id(2, 2));
        // n1 takes the new generation as n2, alive.
        let held = nodes[0].member_at(&id(2, 2).addr).unwrap();
        assert_eq!((held.id(), held.state()), (&id(2, 2), State::Alive));
    }

    #[test]
    fn an_item_too_large_for_a_packet_is_never_queued_and_blocks_nothing() {
        let mut nodes = [swim(1), swim(2)];
        nodes[1].announce(id(1, 0));
        exchange(&mut nodes);
        // Ten members whose updates could never fit a packet beside its header.
        for k in 0..10u8 {
            let mut huge = id(100 + k, 1);
            huge.node = format!("{k}{}", "x".repeat(600));
            nodes[0].apply_many([Member::alive(huge)], true);
        }
        nodes[0].apply_many([Member::alive(id(3, 1))], true);
        let (live, _) = nodes[0].backlog();
        // n3's update is queued (and n2's from the join); the huge one is not.
        assert!(live >= 1);
        nodes[0].gossip();
        exchange(&mut nodes);
        assert!(nodes[1].member_at(&id(3, 1).addr).is_some());
        // A packet over the limit is refused, not read.
        let big = vec![0u8; 2000];
        assert_eq!(nodes[1].handle_data(&big), Err(SwimError::TooBig(2000)));
        assert!(nodes[1].handle_data(&[0xff; 40]).is_err());
    }

    #[test]
    fn piggyback_sends_each_item_its_count_and_newer_replaces_older() {
        let mut p: Piggyback<u8> = Piggyback::new();
        p.add(1, vec![1; 10], 2);
        p.add(2, vec![2; 10], 3);
        p.add(1, vec![3; 10], 2);
        assert_eq!(p.len(), 2);
        let mut sent = 0;
        for _ in 0..10 {
            let mut buf = Vec::new();
            let n = p.fill(&mut buf, 100, false);
            // Never the same item twice in one packet, never the replaced one.
            assert!(n <= 2);
            assert!(!buf.contains(&1));
            sent += n as usize;
        }
        assert_eq!(sent, 5);
        assert!(p.is_empty());
        assert_eq!(p.queued(), 0);
        // What does not fit waits.
        p.add(9, vec![9; 50], 1);
        let mut buf = vec![0; 60];
        assert_eq!(p.fill(&mut buf, 100, true), 0);
        assert_eq!(p.len(), 1);
    }
}
