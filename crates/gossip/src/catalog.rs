//! The service catalog: one versioned record per node, merged by version, exchanged as small
//! version notices (piggybacked on the SWIM packets) and full records pulled on demand, plus a
//! periodic digest exchange so late joiners converge. Pure: no I/O, no clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::identity::GossipId;

/// Health of one endpoint, as its node reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// Passing its checks (or running without any).
    Healthy,
    /// Failing its checks.
    Unhealthy,
    /// Checked, and no check has passed yet.
    Starting,
    /// Being stopped: published for its drain delay so clients stop using it first.
    Draining,
}

/// One service endpoint a node offers: a running task of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEndpoint {
    /// Service name.
    pub service: String,
    /// Task that serves it.
    pub task: String,
    /// The task's slot (a replica number, or the node id of a global service's task).
    pub slot: String,
    /// IP address.
    pub addr: String,
    /// Its first port (0: it has none).
    pub port: u16,
    /// Every port it was given, by name (lower case).
    pub ports: BTreeMap<String, u16>,
    /// Health.
    pub health: Health,
    /// TTL of DNS answers naming it (s; none: the node's default).
    pub ttl: Option<u32>,
}

/// Everything one node publishes. Newer means a higher `(generation, version)`: a restarted
/// node (new generation) supersedes whatever its previous life published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub node: String,
    /// The node's generation (grows on every restart).
    pub generation: u64,
    /// Bumped on every change within a generation.
    pub version: u64,
    /// Endpoints.
    pub endpoints: Vec<ServiceEndpoint>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl NodeRecord {
    /// An empty record for `node` in `generation`, version 0.
    pub fn empty(node: impl Into<String>, generation: u64) -> Self {
        NodeRecord {
            node: node.into(),
            generation,
            version: 0,
            endpoints: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    /// `(generation, version)`: what "newer" compares.
    pub fn stamp(&self) -> (u64, u64) {
        (self.generation, self.version)
    }
}

/// The small notice a node broadcasts when its record changes; peers that see a newer stamp
/// pull the full record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionNotice {
    /// Whose record.
    pub node: String,
    /// Its generation.
    pub generation: u64,
    /// Its version.
    pub version: u64,
}

impl VersionNotice {
    /// The stamp the notice announces.
    pub fn stamp(&self) -> (u64, u64) {
        (self.generation, self.version)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// Shared, never changed in place: a newer record replaces it (readers holding the
    /// old one keep it), and many catalogs may hold the same one (the simulator's).
    record: Arc<NodeRecord>,
    down: bool,
    /// The finest bucket of the node's name ([`bucket_of`]; in the padding: the entry
    /// stays 16 bytes).
    bucket: u16,
}

/// Whether the finest bucket `fine` is among `buckets` (sorted) of `count`; every one is
/// without a scope.
pub(crate) fn in_scope(scope: Option<(usize, &[u32])>, fine: u16) -> bool {
    scope.is_none_or(|(count, buckets)| {
        let count = count.clamp(1, BUCKETS);
        buckets
            .binary_search(&((usize::from(fine) % count) as u32))
            .is_ok()
    })
}

/// The catalog as one node sees it.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    entries: BTreeMap<Arc<str>, Entry>,
    /// The XOR of every entry's stamp hash, kept as entries change.
    fingerprint: u64,
    /// The same per bucket of node names ([`BUCKETS`] of them, by a hash of the name;
    /// allocated with the first record): a sync between two large catalogs that differ
    /// exchanges the digests of the buckets that differ, not of every record.
    buckets: Vec<u64>,
}

/// Two catalogs are equal when they hold the same records, marked the same (the
/// fingerprints follow from those).
impl PartialEq for Catalog {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for Catalog {}

/// Buckets of node names the catalog keeps a fingerprint of; a sync compares a power of
/// two of them up to this many (each the XOR of the finer ones it covers).
pub(crate) const BUCKETS: usize = 1024;

/// Records per bucket a sync aims at: a catalog of `n` records is compared in
/// `n / BUCKET_TARGET` buckets (a power of two, 1 to [`BUCKETS`]).
const BUCKET_TARGET: usize = 32;

/// The finest bucket of a node's name (records here, members in SWIM's table).
pub(crate) fn bucket_of(node: &str) -> usize {
    (fnv1a(&[node.as_bytes()]) as usize) & (BUCKETS - 1)
}

/// How many buckets a sync with a catalog of `records` records compares.
pub(crate) fn buckets_for(records: usize) -> usize {
    (records / BUCKET_TARGET)
        .next_power_of_two()
        .clamp(1, BUCKETS)
}

/// FNV-1a over `parts` in order: the same on every node (no per-process seed), for
/// fingerprints two nodes compare.
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A node and its stamp, hashed.
fn stamp_hash(node: &str, stamp: (u64, u64)) -> u64 {
    fnv1a(&[
        node.as_bytes(),
        &[0xff],
        &stamp.0.to_le_bytes(),
        &stamp.1.to_le_bytes(),
    ])
}

/// A digest: the stamp of every record a node holds.
pub type Digest = Vec<(String, (u64, u64))>;

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Catalog::default()
    }

    /// Takes `record` if it is newer than what is held; returns whether it was. A newer
    /// generation also clears a Down mark (the node is back).
    pub fn merge(&mut self, record: NodeRecord) -> bool {
        let record = Arc::new(record);
        match self.entries.get_mut(record.node.as_str()) {
            Some(e) if e.record.stamp() >= record.stamp() => false,
            Some(e) => {
                if record.generation > e.record.generation {
                    e.down = false;
                }
                let old = e.record.stamp();
                e.record = record.clone();
                self.toggle(&record.node, old);
                self.toggle(&record.node, record.stamp());
                true
            }
            None => {
                self.toggle(&record.node, record.stamp());
                let name: Arc<str> = Arc::from(record.node.as_str());
                self.entries.insert(
                    name,
                    Entry {
                        bucket: bucket_of(&record.node) as u16,
                        record,
                        down: false,
                    },
                );
                true
            }
        }
    }

    /// Takes records held elsewhere too (shared, not copied), in bulk: what a node of a
    /// formed cluster starts with. Nodes already held keep their record. Linear when
    /// `records` come sorted by name.
    pub fn extend_shared(
        &mut self,
        records: impl IntoIterator<Item = (Arc<str>, Arc<NodeRecord>)>,
    ) {
        let mut new: BTreeMap<Arc<str>, Entry> = records
            .into_iter()
            .filter(|(name, record)| **name == *record.node && !self.entries.contains_key(&**name))
            .map(|(name, record)| {
                (
                    name,
                    Entry {
                        bucket: bucket_of(&record.node) as u16,
                        record,
                        down: false,
                    },
                )
            })
            .collect();
        for (name, e) in &new {
            self.toggle(name, e.record.stamp());
        }
        self.entries.append(&mut new);
    }

    /// Adds (or takes out) `node` at `stamp` to the fingerprints.
    fn toggle(&mut self, node: &str, stamp: (u64, u64)) {
        let h = stamp_hash(node, stamp);
        self.fingerprint ^= h;
        if self.buckets.is_empty() {
            self.buckets = vec![0; BUCKETS];
        }
        self.buckets[bucket_of(node)] ^= h;
    }

    /// The fingerprints of `count` buckets (a power of two up to [`BUCKETS`]): bucket `b`
    /// covers the names whose finest bucket is `b` modulo `count`.
    pub fn bucket_fingerprints(&self, count: usize) -> Vec<u64> {
        let count = count.clamp(1, BUCKETS);
        let mut out = vec![0; count];
        for (fine, fp) in self.buckets.iter().enumerate() {
            out[fine % count] ^= fp;
        }
        out
    }

    /// The digest of the records in `buckets` (of `count`; sorted).
    pub fn digest_in(&self, count: usize, buckets: &[u32]) -> Digest {
        self.entries
            .iter()
            .filter(|(_, e)| in_scope(Some((count, buckets)), e.bucket))
            .map(|(n, e)| (n.to_string(), e.record.stamp()))
            .collect()
    }

    /// The stamp held for `node`.
    pub fn stamp_of(&self, node: &str) -> Option<(u64, u64)> {
        self.entries.get(node).map(|e| e.record.stamp())
    }

    /// The record held for `node`.
    pub fn record(&self, node: &str) -> Option<&NodeRecord> {
        self.entries.get(node).map(|e| &*e.record)
    }

    /// Whether a notice announces something newer than what is held.
    pub fn wants(&self, notice: &VersionNotice) -> bool {
        self.stamp_of(&notice.node)
            .is_none_or(|held| held < notice.stamp())
    }

    /// Every stamp held, by node.
    pub fn digest(&self) -> Digest {
        self.entries
            .iter()
            .map(|(n, e)| (n.to_string(), e.record.stamp()))
            .collect()
    }

    /// A short fingerprint of the digest (the XOR of an FNV-1a hash of every node and its
    /// stamp, kept as records change: O(1) to read): two catalogs with the same
    /// fingerprint almost surely hold the same records, so a sync round sends a digest
    /// only when fingerprints differ (and then of the buckets that differ only).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The records held that are newer than (or absent from) `digest`: what a peer that
    /// sent that digest lacks.
    pub fn newer_than(&self, digest: &Digest) -> Vec<NodeRecord> {
        self.newer_than_in(digest, None)
    }

    /// [`Catalog::newer_than`] for a digest of some buckets only (`scope`: how many
    /// buckets, which ones, sorted): records outside them are not compared.
    pub fn newer_than_in(
        &self,
        digest: &Digest,
        scope: Option<(usize, &[u32])>,
    ) -> Vec<NodeRecord> {
        let theirs: BTreeMap<&str, (u64, u64)> =
            digest.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        self.entries
            .values()
            .filter(|e| {
                in_scope(scope, e.bucket)
                    && theirs
                        .get(e.record.node.as_str())
                        .is_none_or(|s| *s < e.record.stamp())
            })
            .map(|e| NodeRecord::clone(&e.record))
            .collect()
    }

    /// The nodes whose records in `digest` are newer than (or absent from) this catalog:
    /// what to ask the peer that sent the digest for.
    pub fn lacking(&self, digest: &Digest) -> Vec<String> {
        digest
            .iter()
            .filter(|(n, st)| self.stamp_of(n).is_none_or(|mine| mine < *st))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Records of these nodes, for a pull.
    pub fn records(&self, nodes: &[String]) -> Vec<NodeRecord> {
        nodes
            .iter()
            .filter_map(|n| {
                self.entries
                    .get(n.as_str())
                    .map(|e| NodeRecord::clone(&e.record))
            })
            .collect()
    }

    /// Marks `node` Down: its record is kept (and still served to peers) but its endpoints
    /// leave the service view until it comes back.
    pub fn mark_down(&mut self, node: &str, generation: u64) {
        if let Some(e) = self.entries.get_mut(node)
            && e.record.generation <= generation
        {
            e.down = true;
        }
    }

    /// Clears a Down mark: the node is alive in `generation` (an older generation's
    /// late "up" does not revive a newer record's mark).
    pub fn mark_up(&mut self, node: &str, generation: u64) {
        if let Some(e) = self.entries.get_mut(node)
            && generation >= e.record.generation
        {
            e.down = false;
        }
    }

    /// Forgets `node` (removed from the cluster).
    pub fn remove(&mut self, node: &str) {
        if let Some(e) = self.entries.remove(node) {
            self.toggle(node, e.record.stamp());
        }
    }

    /// Whether `node` is marked Down.
    pub fn is_down(&self, node: &str) -> bool {
        self.entries.get(node).is_some_and(|e| e.down)
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Service name → endpoints on nodes not marked Down, ordered by service, node, task.
    pub fn services(&self) -> BTreeMap<String, Vec<(String, ServiceEndpoint)>> {
        let mut out: BTreeMap<String, Vec<(String, ServiceEndpoint)>> = BTreeMap::new();
        for e in self.entries.values().filter(|e| !e.down) {
            for ep in &e.record.endpoints {
                out.entry(ep.service.clone())
                    .or_default()
                    .push((e.record.node.clone(), ep.clone()));
            }
        }
        out
    }
}

/// A record change to pull: the notice and the peer that relayed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// What was announced.
    pub notice: VersionNotice,
    /// Who relayed it (it has the record, or will soon), if known.
    pub from: Option<GossipId>,
}

/// The newest stamp whose notice was seen, per node.
pub type SeenStamps = HashMap<String, (u64, u64), foldhash::fast::RandomState>;

/// The catalog shared between a node's membership protocol (which sees notices) and its driver
/// (which pulls and serves records).
#[derive(Clone, Debug, Default)]
pub struct SharedCatalog {
    /// The catalog.
    pub catalog: Arc<Mutex<Catalog>>,
    /// Notices of newer records, waiting to be pulled.
    pub wants: Arc<Mutex<Vec<Want>>>,
    /// The newest stamp whose notice was seen, per node: a notice is news (and passed on)
    /// only the first time, whether or not its record has been pulled yet.
    pub seen: Arc<Mutex<SeenStamps>>,
}

impl SharedCatalog {
    /// Locks the catalog.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the pending wants.
    pub fn take_wants(&self) -> Vec<Want> {
        std::mem::take(&mut *self.wants.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The key a notice is queued under: a newer notice of the same node replaces an older one
/// still waiting to be retransmitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoticeKey {
    node: String,
    stamp: (u64, u64),
}

impl NoticeKey {
    /// Whose notice: a newer notice of the node replaces the queued one.
    pub fn node(&self) -> &str {
        &self.node
    }
}

/// A notice that could not be decoded; the packet's remaining notices are dropped.
#[derive(Debug, thiserror::Error)]
#[error("bad version notice: {0}")]
pub struct NoticeError(String);

/// What the membership protocol does with the version notices a packet carries.
#[derive(Clone, Debug, Default)]
pub struct NoticeHandler {
    shared: SharedCatalog,
    own: String,
}

impl NoticeHandler {
    /// A handler over `shared` for the node `own` (whose own notices it always accepts:
    /// the handler is asked for the key of every notice given to it to send, too).
    pub fn new(shared: SharedCatalog, own: impl Into<String>) -> Self {
        NoticeHandler {
            shared,
            own: own.into(),
        }
    }
}

/// Encodes a notice for `Foca::add_broadcast`.
pub fn encode_notice(notice: &VersionNotice) -> Vec<u8> {
    postcard::to_stdvec(notice).unwrap_or_default()
}

impl NoticeHandler {
    /// A notice from `sender` (`None`: this node's own, to send): its key when it is news
    /// (to be passed on), `None` when not.
    pub fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&GossipId>,
    ) -> Result<Option<NoticeKey>, NoticeError> {
        let notice: VersionNotice =
            postcard::from_bytes(data).map_err(|e| NoticeError(e.to_string()))?;
        if notice.node == self.own {
            // Ours: it is being queued for sending (or it came back around). Only the
            // newest stamp is worth sending; never pull our own record.
            let held = self.shared.lock().stamp_of(&notice.node);
            return Ok(held
                .is_none_or(|h| h <= notice.stamp())
                .then(|| NoticeKey {
                    node: notice.node.clone(),
                    stamp: notice.stamp(),
                })
                .filter(|_| sender.is_none()));
        }
        // Only news is kept and passed on (`Some` means "new"): a stamp
        // newer than both any notice seen before and the record held. The seen map first:
        // most notices are repeats (each arrives about 4·log10(n) times), and it is one
        // hash lookup.
        {
            let mut seen = self.shared.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.get(&notice.node).is_some_and(|s| *s >= notice.stamp()) {
                return Ok(None);
            }
            if !self.shared.lock().wants(&notice) {
                return Ok(None);
            }
            seen.insert(notice.node.clone(), notice.stamp());
        }
        let key = NoticeKey {
            node: notice.node.clone(),
            stamp: notice.stamp(),
        };
        let mut wants = self.shared.wants.lock().unwrap_or_else(|p| p.into_inner());
        // One pending pull per node, for the newest stamp seen.
        wants.retain(|w| w.notice.node != notice.node || w.notice.stamp() > notice.stamp());
        if !wants.iter().any(|w| w.notice.node == notice.node) {
            wants.push(Want {
                notice,
                from: sender.cloned(),
            });
        }
        Ok(Some(key))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(node: &str, generation: u64, version: u64) -> NodeRecord {
        NodeRecord {
            node: node.into(),
            generation,
            version,
            endpoints: vec![ServiceEndpoint {
                service: format!("svc-{version}"),
                task: "t".into(),
                slot: "1".into(),
                addr: "10.0.0.1".into(),
                port: 80,
                ports: BTreeMap::from([("http".into(), 80)]),
                health: Health::Healthy,
                ttl: None,
            }],
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn newer_wins_and_generation_beats_version() {
        let mut c = Catalog::new();
        assert!(c.merge(rec("a", 1, 5)));
        assert!(!c.merge(rec("a", 1, 4)));
        assert!(!c.merge(rec("a", 1, 5)));
        assert!(c.merge(rec("a", 1, 6)));
        c.mark_down("a", 1);
        assert!(c.is_down("a"));
        assert!(c.services().is_empty());
        // A late "up" of an older generation does not clear the mark of a newer one.
        c.mark_up("a", 0);
        assert!(c.is_down("a"));
        // A restart (new generation) wins even with a lower version, and clears Down.
        assert!(c.merge(rec("a", 2, 0)));
        assert!(!c.is_down("a"));
        assert_eq!(c.stamp_of("a"), Some((2, 0)));
        // A Down notice about the old generation does not hide the new one.
        c.mark_down("a", 1);
        assert!(!c.is_down("a"));
    }

    #[test]
    fn fingerprint_follows_the_stamps() {
        let mut a = Catalog::new();
        let mut b = Catalog::new();
        assert_eq!(a.fingerprint(), b.fingerprint());
        a.merge(rec("x", 1, 1));
        assert_ne!(a.fingerprint(), b.fingerprint());
        b.merge(rec("x", 1, 1));
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.merge(rec("x", 1, 2));
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn shared_records_in_bulk_are_held_as_if_merged_one_by_one() {
        let shared: Vec<(Arc<str>, Arc<NodeRecord>)> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, n)| (Arc::from(*n), Arc::new(rec(n, 1, i as u64))))
            .collect();
        let mut merged = Catalog::new();
        merged.merge(rec("b", 2, 0));
        let mut bulk = merged.clone();
        for (_, r) in &shared {
            merged.merge(NodeRecord::clone(r));
        }
        // "b" is held at a newer stamp already: kept, like merge keeps it.
        bulk.extend_shared(shared.iter().cloned());
        assert_eq!(bulk.digest(), merged.digest());
        assert_eq!(bulk.fingerprint(), merged.fingerprint());
        // Not copied: the catalog holds the caller's record.
        assert!(std::ptr::eq(bulk.record("a").unwrap(), &*shared[0].1));
        // A name that is not the record's node is refused.
        let mut odd = Catalog::new();
        odd.extend_shared([(Arc::from("z"), Arc::new(rec("y", 1, 0)))]);
        assert!(odd.is_empty());
    }

    #[test]
    fn bucket_fingerprints_name_the_buckets_that_differ() {
        let mut a = Catalog::new();
        for i in 0..300 {
            a.merge(rec(&format!("n{i}"), 1, 0));
        }
        let mut b = a.clone();
        let count = buckets_for(a.len());
        assert_eq!(count, 16);
        // The buckets fold to the whole fingerprint at every size.
        for c in [1, 2, 16, BUCKETS] {
            let folded = a.bucket_fingerprints(c).iter().fold(0, |x, y| x ^ y);
            assert_eq!(folded, a.fingerprint(), "{c} buckets");
        }
        assert_eq!(a.bucket_fingerprints(count), b.bucket_fingerprints(count));
        // One newer record on each side, in different buckets or the same.
        a.merge(rec("n7", 1, 1));
        b.merge(rec("n250", 1, 1));
        let differ: Vec<u32> = a
            .bucket_fingerprints(count)
            .iter()
            .zip(b.bucket_fingerprints(count))
            .enumerate()
            .filter(|(_, (x, y))| **x != *y)
            .map(|(i, _)| i as u32)
            .collect();
        assert!(!differ.is_empty() && differ.len() <= 2, "{differ:?}");
        // The scoped exchange: a's digest of those buckets only, b answers within them.
        let digest = a.digest_in(count, &differ);
        assert!(
            digest.len() < a.len() / 4,
            "{} of {}",
            digest.len(),
            a.len()
        );
        let scope = Some((count, differ.as_slice()));
        let newer = b.newer_than_in(&digest, scope);
        assert_eq!(newer.len(), 1);
        assert_eq!(newer[0].node, "n250");
        assert_eq!(b.lacking(&digest), vec!["n7".to_owned()]);
        a.merge(newer[0].clone());
        b.merge(a.record("n7").unwrap().clone());
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.bucket_fingerprints(BUCKETS),
            b.bucket_fingerprints(BUCKETS)
        );
        // Removing a record takes it out of its bucket too.
        a.remove("n7");
        b.remove("n7");
        assert_eq!(a.bucket_fingerprints(count), b.bucket_fingerprints(count));
    }

    #[test]
    fn digest_exchange_fills_the_gaps() {
        let mut a = Catalog::new();
        let mut b = Catalog::new();
        a.merge(rec("x", 1, 3));
        a.merge(rec("y", 1, 1));
        b.merge(rec("x", 1, 1));
        b.merge(rec("z", 1, 1));
        for r in a.newer_than(&b.digest()) {
            b.merge(r);
        }
        for r in b.newer_than(&a.digest()) {
            a.merge(r);
        }
        assert_eq!(a, b);
        assert!(a.newer_than(&b.digest()).is_empty());
    }

    #[test]
    fn handler_keeps_only_news() {
        let shared = SharedCatalog::default();
        shared.lock().merge(rec("a", 1, 2));
        let mut h = NoticeHandler::new(shared.clone(), "me");
        let old = encode_notice(&VersionNotice {
            node: "a".into(),
            generation: 1,
            version: 2,
        });
        assert!(h.receive_item(&old, None).unwrap().is_none());
        let new = encode_notice(&VersionNotice {
            node: "a".into(),
            generation: 1,
            version: 3,
        });
        assert!(h.receive_item(&new, None).unwrap().is_some());
        // The same notice again (another relay) is not news, even before the pull.
        assert!(h.receive_item(&new, None).unwrap().is_none());
        assert_eq!(shared.take_wants().len(), 1);
        assert!(h.receive_item(b"\xff\xff\xff", None).is_err());
    }

    fn arb_records() -> impl Strategy<Value = Vec<NodeRecord>> {
        prop::collection::vec(
            (
                prop::sample::select(vec!["a", "b", "c", "d"]),
                0u64..3,
                0u64..5,
            ),
            0..40,
        )
        .prop_map(|v| v.into_iter().map(|(n, g, ver)| rec(n, g, ver)).collect())
    }

    proptest! {
        /// Any delivery order of the same records gives the same catalog.
        #[test]
        fn merge_is_order_independent(records in arb_records(), seed in any::<u64>()) {
            let mut a = Catalog::new();
            for r in &records {
                a.merge(r.clone());
            }
            let mut shuffled = records.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut b = Catalog::new();
            for r in shuffled {
                b.merge(r);
            }
            prop_assert_eq!(a.digest(), b.digest());
            prop_assert_eq!(a, b);
        }

        /// Two catalogs that exchange digests both ways end equal.
        #[test]
        fn digest_exchange_converges(x in arb_records(), y in arb_records()) {
            let mut a = Catalog::new();
            let mut b = Catalog::new();
            for r in x { a.merge(r); }
            for r in y { b.merge(r); }
            for r in a.newer_than(&b.digest()) { b.merge(r); }
            for r in b.newer_than(&a.digest()) { a.merge(r); }
            prop_assert_eq!(a.digest(), b.digest());
        }
    }
}
