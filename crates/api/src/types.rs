//! Request and response bodies, one type per resource. Enum values are stable lower-case
//! names; byte values travel as base64 beside a UTF-8 rendering, so nothing is lossy.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Holds the replicated state and votes.
    Manager,
    /// Runs tasks; no vote.
    Worker,
}

/// Whether the scheduler may place work on a node (`docker node update --availability`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Takes new work.
    Active,
    /// Keeps its work, takes no new work.
    Pause,
    /// Its work is moved elsewhere.
    Drain,
}

impl std::str::FromStr for Availability {
    type Err = crate::ApiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            other => Err(crate::ApiError::invalid(format!(
                "availability must be active, pause or drain, not {other:?}"
            ))),
        }
    }
}

/// What the cluster knows of a node's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Alive.
    Ready,
    /// Not heard from past the grace period.
    Down,
    /// Not yet known (just joined, or after a leader change).
    Unknown,
}

/// A manager's standing in the Raft group, as `docker node ls` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ManagerStatus {
    /// Leads the group.
    Leader,
    /// Answers the leader's heartbeats.
    Reachable,
    /// In the Raft group as a learner, catching up with the log before it becomes a voter
    /// (a manager that just joined or was promoted).
    Joining,
    /// Does not.
    Unreachable,
}

/// The wire name of each value (what serde writes), as `as_str` and `Display`.
macro_rules! wire_names {
    ($($t:ident { $($v:ident => $s:literal),* $(,)? })*) => {$(
        impl $t {
            /// The value's wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $s),*
                }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

wire_names! {
    NodeRole { Manager => "manager", Worker => "worker" }
    Availability { Active => "active", Pause => "pause", Drain => "drain" }
    NodeStatus { Ready => "ready", Down => "down", Unknown => "unknown" }
    ManagerStatus { Leader => "leader", Reachable => "reachable", Joining => "joining", Unreachable => "unreachable" }
    MemberState { Alive => "alive", Down => "down" }
    ClientRole { Admin => "admin", Viewer => "viewer" }
}

impl From<starling_state::NodeRole> for NodeRole {
    fn from(r: starling_state::NodeRole) -> Self {
        match r {
            starling_state::NodeRole::Manager => NodeRole::Manager,
            starling_state::NodeRole::Worker => NodeRole::Worker,
        }
    }
}

impl From<starling_state::Availability> for Availability {
    fn from(a: starling_state::Availability) -> Self {
        match a {
            starling_state::Availability::Active => Availability::Active,
            starling_state::Availability::Pause => Availability::Pause,
            starling_state::Availability::Drain => Availability::Drain,
        }
    }
}

impl From<Availability> for starling_state::Availability {
    fn from(a: Availability) -> Self {
        match a {
            Availability::Active => starling_state::Availability::Active,
            Availability::Pause => starling_state::Availability::Pause,
            Availability::Drain => starling_state::Availability::Drain,
        }
    }
}

impl From<starling_state::NodeStatus> for NodeStatus {
    fn from(s: starling_state::NodeStatus) -> Self {
        match s {
            starling_state::NodeStatus::Ready => NodeStatus::Ready,
            starling_state::NodeStatus::Down => NodeStatus::Down,
            starling_state::NodeStatus::Unknown => NodeStatus::Unknown,
        }
    }
}

/// `GET /v1/info`: the node that answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Info {
    /// Its node id.
    pub node_id: String,
    /// Its cluster.
    pub cluster_id: String,
    /// Its role.
    pub role: NodeRole,
    /// The address it is reached at.
    pub addr: String,
    /// Its Starling version.
    pub version: String,
    /// Its view of Raft (managers only).
    pub raft: Option<RaftInfo>,
}

/// A manager's view of Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RaftInfo {
    /// Its Raft id.
    pub id: u64,
    /// The leader's Raft id, if known.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Last applied log index: the revision its state reflects.
    pub applied: u64,
    /// Number of voters.
    pub voters: u64,
    /// On a follower: milliseconds since it last heard the leader (Consul's `last_contact`);
    /// absent on the leader and before any contact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact_ms: Option<u64>,
    /// Set when this manager's Raft stopped after a fatal error (a full or failing disk):
    /// why. It then serves no reads or writes until restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// One row of `GET /v1/nodes` (`starling node ls`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeSummary {
    /// Node id.
    pub id: String,
    /// Host name it reported.
    pub hostname: String,
    /// Role.
    pub role: NodeRole,
    /// Liveness.
    pub status: NodeStatus,
    /// Scheduling availability.
    pub availability: Availability,
    /// For managers, their standing in Raft; `null` for workers.
    pub manager_status: Option<ManagerStatus>,
    /// Address.
    pub addr: String,
    /// The Starling version the node runs (from its gossip record; empty until heard).
    pub version: String,
}

/// `GET /v1/nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeList {
    /// The nodes.
    pub nodes: Vec<NodeSummary>,
    /// Set when the list is this manager's local state (no quorum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `GET /v1/nodes/{id}` (`starling node inspect`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeDetail {
    /// Node id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Current role.
    pub role: NodeRole,
    /// Role it is being moved to; equal to `role` at rest.
    pub desired_role: NodeRole,
    /// Liveness.
    pub status: NodeStatus,
    /// Availability.
    pub availability: Availability,
    /// Address.
    pub addr: String,
    /// Operator labels.
    pub labels: BTreeMap<String, String>,
    /// Serial of its current certificate, hex.
    pub cert_serial: String,
    /// When that certificate expires, seconds since the Unix epoch (0: not known).
    #[serde(default)]
    pub cert_not_after: u64,
    /// SHA-256 of the root CA certificate that signed it, hex (empty: not known).
    #[serde(default)]
    pub cert_ca: String,
    /// The Starling version it runs (empty until heard).
    pub version: String,
    /// Bumped on every change of the node's record.
    pub record_version: u64,
    /// Revision that created the record.
    pub created_revision: u64,
    /// Revision of its last change.
    pub updated_revision: u64,
    /// What its agent reported of its machine (absent until its agent's first session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<NodeMachine>,
}

/// A node's machine as its agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeMachine {
    /// Memory (bytes).
    pub memory_bytes: u64,
    /// CPUs, in billionths.
    pub nano_cpus: u64,
    /// First host port tasks may be given.
    pub port_min: u16,
    /// Last host port tasks may be given.
    pub port_max: u16,
    /// How its tasks are isolated: `process-group`, or `cgroup-v2 (…)` with the limits it
    /// enforces.
    pub isolation: String,
}

/// `PUT /v1/nodes/{id}/availability`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AvailabilityUpdate {
    /// The new availability.
    pub availability: Availability,
}

/// The revision a write was committed at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Written {
    /// The revision (Raft log index).
    pub revision: u64,
}

/// `POST /v1/nodes/{id}/promote`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Promoted {
    /// The revision that recorded the wish.
    pub revision: u64,
    /// The node.
    pub promoted: String,
}

/// `POST /v1/nodes/{id}/demote`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Demoted {
    /// The node.
    pub demoted: String,
}

/// `DELETE /v1/nodes/{id}` query.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Remove it even if it is not down.
    #[serde(default)]
    pub force: Option<bool>,
}

/// Which state a read reflects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Confirmed by the leader: reflects every write acknowledged before the read began.
    #[default]
    Linearizable,
    /// This manager's local state now, with the revision it reflects; answered without a
    /// quorum.
    Stale,
}

/// Query of key reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// `linearizable` (default) or `stale`.
    #[serde(default)]
    pub consistency: Option<Consistency>,
}

/// Query of `GET /v1/kv`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Keys starting with this (default: all).
    #[serde(default)]
    pub prefix: Option<String>,
    /// `linearizable` (default) or `stale`.
    #[serde(default)]
    pub consistency: Option<Consistency>,
}

/// Query of `PUT /v1/kv/{key}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PutQuery {
    /// Compare-and-swap: write only if the key's `mod_revision` is this (0: only if absent).
    #[serde(default, rename = "expect-revision")]
    #[param(rename = "expect-revision", minimum = 0)]
    pub expect_revision: Option<u64>,
}

/// A key's value with its history counters (etcd's `KeyValue`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value as text, or `null` when it is not UTF-8 (`value_base64` always holds it).
    pub value: Option<String>,
    /// The value, base64 (standard alphabet, padded).
    pub value_base64: String,
    /// Revision that created the key (since its last deletion).
    pub create_revision: u64,
    /// Revision of its last change.
    pub mod_revision: u64,
    /// Changes since creation, from 1.
    pub version: u64,
    /// The revision the read reflects.
    pub revision: u64,
}

impl KvEntry {
    /// The entry for `key` as state holds it, read at `revision`.
    pub fn new(key: &str, e: &starling_state::KvEntry, revision: u64) -> Self {
        KvEntry {
            key: key.to_owned(),
            value: String::from_utf8(e.value.clone()).ok(),
            value_base64: encode_bytes(&e.value),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            version: e.version,
            revision,
        }
    }

    /// The value's bytes (from `value_base64`).
    pub fn bytes(&self) -> Result<Vec<u8>, crate::ApiError> {
        decode_bytes(&self.value_base64)
    }

    /// The JSON of `KvEntry::new(key, e, revision)`, byte for byte, written straight from the
    /// state's entry into one buffer: no owned key, text or base64 copy of the value on the
    /// way (a GET's answer, rendered while the state is read).
    pub fn json_of(
        key: &str,
        e: &starling_state::KvEntry,
        revision: u64,
    ) -> Result<Vec<u8>, serde_json::Error> {
        /// The field order and names of [`KvEntry`], borrowed.
        #[derive(Serialize)]
        struct View<'a> {
            key: &'a str,
            value: Option<&'a str>,
            value_base64: Base64<'a>,
            create_revision: u64,
            mod_revision: u64,
            version: u64,
            revision: u64,
        }
        struct Base64<'a>(&'a [u8]);
        impl Serialize for Base64<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&base64::display::Base64Display::new(
                    self.0,
                    &base64::engine::general_purpose::STANDARD,
                ))
            }
        }
        // Text (escapes aside) and base64 of the value, the key, and the fixed part.
        let mut out = Vec::with_capacity(key.len() + e.value.len() * 7 / 3 + 160);
        serde_json::to_writer(
            &mut out,
            &View {
                key,
                value: std::str::from_utf8(&e.value).ok(),
                value_base64: Base64(&e.value),
                create_revision: e.create_revision,
                mod_revision: e.mod_revision,
                version: e.version,
                revision,
            },
        )?;
        Ok(out)
    }
}

/// `GET /v1/kv`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KvList {
    /// The keys, in order.
    pub keys: Vec<KvEntry>,
    /// The revision the read reflects.
    pub revision: u64,
}

/// `DELETE /v1/kv/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KvDeleted {
    /// The revision of the delete.
    pub revision: u64,
    /// Whether the key existed.
    pub deleted: bool,
}

/// Query of `GET /v1/watch`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// Keys starting with this (default: all).
    #[serde(default)]
    pub prefix: Option<String>,
    /// First revision to report (default 0: everything still kept).
    #[serde(default)]
    #[param(minimum = 0)]
    pub from: Option<u64>,
    /// Seconds to wait for the first event (default 30; the node caps it, by default at 300).
    #[serde(default)]
    #[param(minimum = 0)]
    pub wait: Option<u64>,
}

/// A change's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// The key was set.
    Put,
    /// The key was removed.
    Delete,
}

/// One change under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WatchEvent {
    /// Revision of the change.
    pub revision: u64,
    /// The key.
    pub key: String,
    /// Put or delete.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The new value as text (`null` for a delete or a value that is not UTF-8).
    pub value: Option<String>,
    /// The new value, base64 (`null` for a delete).
    pub value_base64: Option<String>,
}

impl WatchEvent {
    /// The event as state reports it.
    pub fn new(e: &starling_state::KvEvent) -> Self {
        WatchEvent {
            revision: e.revision,
            key: e.key.clone(),
            kind: if e.entry.is_some() {
                EventType::Put
            } else {
                EventType::Delete
            },
            value: e
                .entry
                .as_ref()
                .and_then(|v| String::from_utf8(v.value.clone()).ok()),
            value_base64: e.entry.as_ref().map(|v| encode_bytes(&v.value)),
        }
    }
}

/// `GET /v1/watch`: the changes found, oldest first (at most 1 000).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WatchEvents {
    /// The changes.
    pub events: Vec<WatchEvent>,
}

/// A gossip member's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Declared down.
    Down,
}

/// One gossip member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Member {
    /// Node id.
    pub node: String,
    /// Address.
    pub addr: String,
    /// State.
    pub state: MemberState,
    /// Generation (grows on every restart).
    pub generation: u64,
}

/// This node in the gossip view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SelfMember {
    /// Node id.
    pub node: String,
    /// Its generation.
    pub generation: u64,
}

/// `GET /v1/members`: the gossip view of the node that answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemberList {
    /// The answering node.
    #[serde(rename = "self")]
    pub me: SelfMember,
    /// The other members.
    pub members: Vec<Member>,
}

/// `GET /v1/join-token/{role}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenView {
    /// The role it admits.
    pub role: NodeRole,
    /// The token.
    pub token: String,
}

/// `POST /v1/leave`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Left {
    /// The node that left.
    pub left: String,
    /// A manager was demoted first.
    #[serde(default)]
    pub demoted: bool,
}

/// What an API client certificate may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientRole {
    /// Every operation.
    Admin,
    /// Reads (`GET`) only.
    Viewer,
}

impl From<starling_state::ClientRole> for ClientRole {
    fn from(r: starling_state::ClientRole) -> Self {
        match r {
            starling_state::ClientRole::Admin => ClientRole::Admin,
            starling_state::ClientRole::Viewer => ClientRole::Viewer,
        }
    }
}

impl From<ClientRole> for starling_state::ClientRole {
    fn from(r: ClientRole) -> Self {
        match r {
            ClientRole::Admin => starling_state::ClientRole::Admin,
            ClientRole::Viewer => starling_state::ClientRole::Viewer,
        }
    }
}

/// `POST /v1/certs`: sign a client certificate for a key that stays with the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CertRequest {
    /// A name for it, unique among clients (a DNS label: `a-z`, `0-9`, `-`).
    pub name: String,
    /// What it may do.
    pub role: ClientRole,
    /// A PKCS#10 CSR, DER, base64.
    pub csr_base64: String,
    /// Lifetime in seconds (default 30 days).
    #[serde(default)]
    pub lifetime_secs: Option<u64>,
}

/// A manager, as a client dials it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct ManagerAddr {
    /// Node id (the certificate name to expect).
    pub node_id: String,
    /// UDP address.
    pub addr: String,
}

/// An issued client certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IssuedCert {
    /// The client's record.
    pub client: ClientView,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The cluster CA, PEM.
    pub ca_pem: String,
    /// The cluster.
    pub cluster_id: String,
    /// The managers to dial.
    pub managers: Vec<ManagerAddr>,
}

/// An API client as the cluster records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientView {
    /// Its name.
    pub name: String,
    /// Its certificate's CN.
    pub id: String,
    /// What it may do.
    pub role: ClientRole,
    /// Certificate serial, hex.
    pub cert_serial: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: u64,
    /// Refused from now on.
    pub revoked: bool,
}

impl From<&starling_state::ClientRecord> for ClientView {
    fn from(c: &starling_state::ClientRecord) -> Self {
        ClientView {
            name: c.name.clone(),
            id: c.id.clone(),
            role: c.role.clone().into(),
            cert_serial: c.cert_serial.clone(),
            not_after: c.not_after,
            revoked: c.revoked,
        }
    }
}

/// `GET /v1/certs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientList {
    /// The clients, by name.
    pub clients: Vec<ClientView>,
}

/// Bytes as this API's base64 (standard alphabet, padded).
pub fn encode_bytes(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Bytes from this API's base64; `invalid_argument` if it is not.
pub fn decode_bytes(text: &str) -> Result<Vec<u8>, crate::ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| crate::ApiError::invalid(format!("not base64: {e}")))
}

/// The DER bytes of the first PEM block in `text` (a certificate).
pub fn pem_to_der(text: &str) -> Result<Vec<u8>, crate::ApiError> {
    pem::parse(text)
        .map(pem::Pem::into_contents)
        .map_err(|e| crate::ApiError::invalid(format!("not PEM: {e}")))
}

/// A DER certificate as PEM.
pub fn certificate_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kv_entry_written_from_the_state_is_the_entry_serialised() {
        let values: [&[u8]; 5] = [
            b"",
            b"plain text",
            "quotes \" and \\ and \n, \u{1} and é".as_bytes(),
            &[0xff, 0x00, 0x80, b'a'],
            &[b'x'; 1000],
        ];
        for (i, value) in values.into_iter().enumerate() {
            let e = starling_state::KvEntry {
                value: value.to_vec(),
                create_revision: 3,
                mod_revision: 7 + i as u64,
                version: 2,
            };
            for key in ["k", "a \"quoted\"/key\t"] {
                let built = serde_json::to_vec(&KvEntry::new(key, &e, 42)).ok();
                assert_eq!(
                    KvEntry::json_of(key, &e, 42).ok(),
                    built,
                    "{value:?} {key:?}"
                );
            }
        }
    }

    #[test]
    fn wire_names_are_what_serde_writes() {
        fn same<T: Serialize + std::fmt::Display>(v: T) {
            assert_eq!(
                serde_json::to_value(&v).ok(),
                Some(serde_json::Value::String(v.to_string()))
            );
        }
        for v in [NodeRole::Manager, NodeRole::Worker] {
            same(v);
        }
        for v in [
            Availability::Active,
            Availability::Pause,
            Availability::Drain,
        ] {
            same(v);
        }
        for v in [NodeStatus::Ready, NodeStatus::Down, NodeStatus::Unknown] {
            same(v);
        }
        for v in [
            ManagerStatus::Leader,
            ManagerStatus::Reachable,
            ManagerStatus::Joining,
            ManagerStatus::Unreachable,
        ] {
            same(v);
        }
        for v in [MemberState::Alive, MemberState::Down] {
            same(v);
        }
        for v in [ClientRole::Admin, ClientRole::Viewer] {
            same(v);
        }
    }
}

/// One service endpoint as the answering node's gossip state has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EndpointView {
    /// Service name.
    pub service: String,
    /// Task id.
    pub task: String,
    /// Slot number, or the node id of a global service's task.
    pub slot: String,
    /// Node id.
    pub node: String,
    /// Address.
    pub addr: String,
    /// Ports by name (lower case).
    pub ports: BTreeMap<String, u16>,
    /// `healthy`, `unhealthy` or `unknown`.
    pub health: String,
    /// Its node is suspected by gossip (its probes failed): DNS hides it meanwhile.
    pub suspected: bool,
}

/// `GET /v1/services/{name}/endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EndpointList {
    /// Changes whenever the list does: pass it back as `index` to wait for the next change
    /// (Consul's blocking query).
    pub index: u64,
    /// The endpoints, by node and task.
    pub endpoints: Vec<EndpointView>,
}

/// The shortest lifetime `PATCH /v1/cluster` accepts for node certificates (as Docker swarm).
pub const MIN_CERT_EXPIRY_SECS: u64 = 3600;
/// The longest lifetime for node certificates: 10 years.
pub const MAX_CERT_EXPIRY_SECS: u64 = 10 * 365 * 24 * 3600;
/// The longest renewal grace after expiry: one year.
pub const MAX_CERT_GRACE_SECS: u64 = 365 * 24 * 3600;

/// `GET /v1/cluster`: the cluster's identity and settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    /// The cluster's id.
    pub cluster_id: String,
    /// SHA-256 of the root CA certificate, hex: what join tokens pin.
    pub ca_digest: String,
    /// A root CA rotation under way (`starling ca rotate`), if any.
    #[serde(default)]
    pub ca_rotation: Option<CaRotationView>,
    /// Its settings.
    pub settings: ClusterSettings,
}

/// A root CA rotation under way: every node renews onto the new root while both roots are
/// trusted; when every node not down is on it, the old root is dropped and the join tokens
/// change (they pin the CA digest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CaRotationView {
    /// SHA-256 of the new root CA certificate, hex.
    pub new_ca_digest: String,
    /// When it started, seconds since the Unix epoch.
    pub started_at: u64,
    /// Nodes not down whose certificate the new root signed.
    pub nodes_on_new_root: Vec<String>,
    /// Nodes not down still on the old root: the rotation waits for them.
    pub nodes_pending: Vec<String>,
    /// Nodes down: not waited for; they renew on the expired-certificate path when they
    /// come back (within the renewal grace), or rejoin.
    pub nodes_down: Vec<String>,
}

/// Cluster-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterSettings {
    /// Lifetime of node certificates issued from now on, seconds (nodes renew at a random
    /// 50–80 % of it).
    pub cert_expiry_secs: u64,
    /// How long after its certificate expired a node may still renew it with that
    /// certificate (a node that was off), seconds; beyond, it must rejoin with a token.
    pub cert_grace_secs: u64,
    /// Autopilot: the leader removes managers down longer than
    /// `autopilot_dead_after_secs` from the voters (when the others keep a quorum) and
    /// promotes workers to keep the managers odd and at least `autopilot_min_managers`.
    pub autopilot_cleanup_dead_managers: bool,
    /// The number of managers autopilot keeps.
    pub autopilot_min_managers: u32,
    /// How long a manager is down before autopilot removes it, seconds.
    pub autopilot_dead_after_secs: u64,
    /// Which workers autopilot may promote (`node.labels.zone==a`; none: any ready, active
    /// worker).
    pub autopilot_promote_constraints: Vec<String>,
}

/// `PATCH /v1/cluster`: the settings to change; those left out keep their value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterUpdate {
    /// Lifetime of node certificates issued from now on, seconds (at least
    /// [`MIN_CERT_EXPIRY_SECS`], at most [`MAX_CERT_EXPIRY_SECS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_expiry_secs: Option<u64>,
    /// Renewal grace after expiry, seconds (at most [`MAX_CERT_GRACE_SECS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_grace_secs: Option<u64>,
    /// Autopilot on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autopilot_cleanup_dead_managers: Option<bool>,
    /// The number of managers autopilot keeps (1 to 9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autopilot_min_managers: Option<u32>,
    /// How long a manager is down before autopilot removes it, seconds (at least
    /// [`MIN_AUTOPILOT_DEAD_AFTER_SECS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autopilot_dead_after_secs: Option<u64>,
    /// Which workers autopilot may promote; an empty list: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autopilot_promote_constraints: Option<Vec<String>>,
}

/// The shortest time autopilot waits before it removes a down manager.
pub const MIN_AUTOPILOT_DEAD_AFTER_SECS: u64 = 5;
