//! Joining a cluster: ALPN `starling/join/1`, the only protocol that admits a peer without a
//! certificate. The joiner pins the CA by the token's digest and sends the token's secret and
//! a CSR; a manager checks the secret (constant time), assigns a node id, signs the CSR with
//! fresh parameters, commits the node record and answers with the certificate. A new
//! manager then asks the leader (now with its certificate) to add it to the Raft group.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use starling_raft_store::{
    Availability, Command, Consistency, ManagerNode, NodeRecord, NodeRole, NodeStatus, Outcome,
    Store, StoreError,
};
use starling_transport::{
    CaDigest, CertOptions, ClusterCa, Connection, Inbound, JoinSecret, JoinSecrets, JoinToken,
    NodeCredentials, NodeKey, PeerPolicy, Protocol, Role, certificate_from_pem, check_renewal,
    key_digest,
};
use tracing::{info, warn};

use crate::datadir::random_id;

/// The ALPN of the join protocol.
pub const JOIN_ALPN: &[u8] = b"starling/join/1";

/// The join protocol as a dialer uses it: the server must be a manager; no certificate is
/// needed to dial (a joiner has none yet).
pub fn join_protocol() -> anyhow::Result<Protocol> {
    Ok(Protocol::new(
        JOIN_ALPN,
        PeerPolicy::roles([Role::MANAGER]).allow_anonymous(),
    )?)
}

/// The join protocol as a manager serves it: joiners without a certificate, and members of
/// either role (a worker renews its certificate after a promotion). Each request checks the
/// role it needs.
pub fn join_server_protocol() -> anyhow::Result<Protocol> {
    Ok(Protocol::new(
        JOIN_ALPN,
        PeerPolicy::roles([Role::MANAGER, Role::WORKER]).allow_anonymous(),
    )?)
}

/// What a joiner sends.
#[derive(Serialize, Deserialize, Debug)]
pub enum JoinRequest {
    /// Join with a token.
    Join {
        /// The token's text.
        token: String,
        /// A CSR for the joiner's key (DER).
        csr: Vec<u8>,
        /// Its host name.
        hostname: String,
        /// Where it is reached.
        advertise: SocketAddr,
    },
    /// A joined manager, now holding its certificate, asks to be added to the Raft group.
    AddManager {
        /// Its Raft id.
        raft_id: u64,
    },
    /// A member asks for a new certificate for the CSR's key: for the role its record wants
    /// (a promotion, a demotion), or, with `force`, a renewal of the same role. Without
    /// `force` and with the role unchanged, the answer is [`JoinReply::Unchanged`].
    Renew {
        /// A CSR (DER), for the node's current key unless it rotates it.
        csr: Vec<u8>,
        /// Renew even if the role is unchanged.
        force: bool,
        /// Digests (hex) of the roots the node trusts now: a node that trusts others than
        /// the cluster wants (a root rotation it was not told of) is renewed.
        #[serde(default)]
        roots: Vec<String>,
    },
    /// A node whose certificate expired (it was off for a while) renews it on a connection
    /// without a client certificate, presenting the expired certificate and a CSR for the
    /// same key; accepted within the cluster's grace period if the node is still a member.
    RenewExpired {
        /// The expired certificate (DER).
        cert: Vec<u8>,
        /// A CSR for the certificate's key (DER).
        csr: Vec<u8>,
    },
    /// A manager asks the leader to demote a manager (remove it from the Raft group).
    Demote {
        /// The node to demote.
        node_id: String,
    },
}

/// A manager's answer.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum JoinReply {
    /// Admitted.
    Joined {
        /// The id assigned.
        node_id: String,
        /// The cluster.
        cluster_id: String,
        /// `manager` or `worker`.
        role: String,
        /// Raft id, for a manager.
        raft_id: Option<u64>,
        /// The signed certificate (DER).
        cert: Vec<u8>,
        /// The CA certificates to trust (DER), the one that signed `cert` first.
        roots: Vec<Vec<u8>>,
        /// The certificates to present after `cert` (DER): during and after a root rotation.
        chain: Vec<Vec<u8>>,
        /// Managers: node id and address.
        managers: Vec<(String, SocketAddr)>,
    },
    /// Added to the Raft group as a voter.
    Added,
    /// Demoted.
    Demoted,
    /// The role did not change.
    Unchanged,
    /// A certificate for the node's new role.
    Renewed {
        /// `manager` or `worker`.
        role: String,
        /// Raft id, for a manager.
        raft_id: Option<u64>,
        /// The certificate (DER).
        cert: Vec<u8>,
        /// The CA certificates to trust (DER), the one that signed `cert` first.
        roots: Vec<Vec<u8>>,
        /// The certificates to present after `cert` (DER).
        chain: Vec<Vec<u8>>,
        /// Managers: node id and address.
        managers: Vec<(String, SocketAddr)>,
    },
    /// Ask the leader instead.
    NotLeader {
        /// The leader's node id and address, if known.
        leader: Option<(String, SocketAddr)>,
    },
    /// Raft was still committing another membership change: nothing changed; ask again.
    MembershipBusy,
    /// The cluster could not carry the request out now (no quorum, leadership lost, a
    /// storage error): it may have been partly done; asking again finishes it.
    Unavailable(String),
    /// Refused, with the reason.
    Refused(String),
}

fn managers(store: &Store) -> Vec<(String, SocketAddr)> {
    store
        .status()
        .nodes
        .into_iter()
        .filter_map(|(_, n)| n.addr.parse().ok().map(|a| (n.name, a)))
        .collect()
}

fn leader(store: &Store) -> Option<(String, SocketAddr)> {
    let s = store.status();
    let id = s.leader?;
    s.nodes
        .into_iter()
        .find(|(i, _)| *i == id)
        .and_then(|(_, n)| n.addr.parse().ok().map(|a| (n.name, a)))
}

/// Serves the join protocol on a manager.
pub async fn serve(
    store: Arc<Store>,
    mut listener: starling_transport::Listener,
    metrics: Arc<crate::metrics::Metrics>,
) {
    // Raft takes one membership change at a time: managers joining together queue here.
    let membership = Arc::new(tokio::sync::Mutex::new(()));
    while let Some(conn) = listener.accept().await {
        let store = store.clone();
        let membership = membership.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while let Ok(Inbound::Request(req)) = conn.accept().await {
                metrics
                    .join_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let reply = match decode_request(req.body().as_bytes()) {
                    Some(r) => {
                        let reply = handle(&store, &conn, r, &membership).await;
                        let counter = match reply {
                            JoinReply::Joined { .. } => Some(&metrics.joins),
                            JoinReply::Renewed { .. } => Some(&metrics.renewals),
                            _ => None,
                        };
                        if let Some(c) = counter {
                            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        reply
                    }
                    None => JoinReply::Refused("malformed join request".into()),
                };
                let _ = req.respond(&encode(&reply)).await;
            }
        });
    }
}

fn decode_request(bytes: &[u8]) -> Option<JoinRequest> {
    serde_json::from_slice(bytes).ok()
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

async fn handle(
    store: &Store,
    conn: &Connection,
    req: JoinRequest,
    membership: &tokio::sync::Mutex<()>,
) -> JoinReply {
    match req {
        JoinRequest::Join {
            token,
            csr,
            hostname,
            advertise,
        } => match admit(store, &token, &csr, hostname, advertise).await {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = %conn.remote_address(), error = %e, "join refused");
                JoinReply::Refused(e.to_string())
            }
        },
        JoinRequest::Renew { csr, force, roots } => {
            let Some(peer) = conn.peer() else {
                return JoinReply::Refused("a renewal needs the node's current certificate".into());
            };
            match renew(store, peer, &csr, force, &roots).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(node = %peer.node_id, error = %e, "renewal refused");
                    JoinReply::Refused(e.to_string())
                }
            }
        }
        JoinRequest::RenewExpired { cert, csr } => match renew_expired(store, &cert, &csr).await {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = %conn.remote_address(), error = %e, "renewal of an expired certificate refused");
                JoinReply::Refused(e.to_string())
            }
        },
        JoinRequest::Demote { node_id } => {
            let Some(peer) = conn.peer().filter(|p| p.role == Role::MANAGER) else {
                return JoinReply::Refused("only a manager can demote".into());
            };
            // A manager certificate outlives a demotion until its renewal; only a current
            // member of the Raft group may demote.
            let member = store
                .status()
                .nodes
                .iter()
                .any(|(_, n)| n.name == peer.node_id.as_str());
            if !member {
                return JoinReply::Refused(format!(
                    "{} is not a member of the raft group and cannot demote",
                    peer.node_id
                ));
            }
            let _one_at_a_time = membership.lock().await;
            demote_on_leader(store, &node_id).await
        }
        JoinRequest::AddManager { raft_id } => {
            let Some(peer) = conn.peer().filter(|p| p.role == Role::MANAGER) else {
                return JoinReply::Refused(
                    "only a node with a manager certificate can be added".into(),
                );
            };
            if !store.status().is_leader {
                return JoinReply::NotLeader {
                    leader: leader(store),
                };
            }
            let node = ManagerNode {
                name: peer.node_id.to_string(),
                addr: conn.remote_address().to_string(),
            };
            let addr = store
                .read(Consistency::Stale, |s| {
                    s.node(peer.node_id.as_str()).map(|n| n.addr.clone())
                })
                .await
                .ok()
                .and_then(|(a, _)| a);
            let node = ManagerNode {
                addr: addr.unwrap_or(node.addr),
                ..node
            };
            let _one_at_a_time = membership.lock().await;
            // Only a node the cluster wants as a manager, with the Raft id the cluster gave
            // it, is added: a stale manager certificate or a made-up id is refused.
            if let Err(reason) = check_add_manager(store, peer.node_id.as_str(), raft_id).await {
                warn!(node = %peer.node_id, raft_id, %reason, "add-manager refused");
                return JoinReply::Refused(reason);
            }
            // Asked again after an answer was lost: already a voter, only the record is left.
            let voter = store.status().voters.contains(&raft_id);
            match async {
                if !voter {
                    store.add_learner(raft_id, node).await?;
                    store.promote(raft_id).await?;
                }
                store
                    .write(Command::SetNodeRole {
                        id: peer.node_id.to_string(),
                        role: NodeRole::Manager,
                        desired_role: NodeRole::Manager,
                    })
                    .await
                    .map(|_| ())
            }
            .await
            {
                Ok(()) => {
                    info!(node = %peer.node_id, raft_id, "manager added to the raft group");
                    JoinReply::Added
                }
                Err(e) => refusal(e),
            }
        }
    }
}

/// Whether `node` may enter the Raft group as `raft_id`: its record must want it to be a
/// manager and `raft_id` must be the id allocated to it.
async fn check_add_manager(store: &Store, node: &str, raft_id: u64) -> Result<(), String> {
    let ((wanted, allocated), _) = store
        .read(Consistency::Linearizable, |s| {
            (
                s.node(node).map(|r| r.desired_role == NodeRole::Manager),
                s.raft_id(node),
            )
        })
        .await
        .map_err(|e| e.to_string())?;
    match (wanted, allocated) {
        (None, _) => Err(format!("node {node} is not in the cluster")),
        (Some(false), _) => Err(format!("node {node} is not meant to be a manager")),
        (Some(true), Some(id)) if id == raft_id => Ok(()),
        (Some(true), _) => Err(format!("raft id {raft_id} was not allocated to {node}")),
    }
}

/// The leader demotes `node_id`: out of the Raft group, recorded as a worker. The last
/// manager is refused; the leader itself hands leadership over first.
pub async fn demote_on_leader(store: &Store, node_id: &str) -> JoinReply {
    let s = store.status();
    if !s.is_leader {
        return JoinReply::NotLeader {
            leader: leader(store),
        };
    }
    let Some((raft_id, _)) = s.nodes.iter().find(|(_, n)| n.name == node_id) else {
        // Out of the Raft group but still recorded as a manager: an earlier demotion
        // stopped after the membership change. Recording it finishes the demotion.
        let recorded = store
            .read(Consistency::Linearizable, |st| {
                st.node(node_id).map(|n| n.role == NodeRole::Manager)
            })
            .await;
        return match recorded {
            Ok((Some(true), _)) => match store
                .write(Command::RetireManager {
                    node: node_id.to_owned(),
                })
                .await
            {
                Ok(_) => JoinReply::Demoted,
                Err(e) => refusal(e),
            },
            Ok(_) => JoinReply::Refused(format!("{node_id} is not a manager")),
            Err(e) => refusal(e),
        };
    };
    let raft_id = *raft_id;
    if s.voters.len() <= 1 && s.voters.contains(&raft_id) {
        return JoinReply::Refused("the last manager cannot be demoted".into());
    }
    if raft_id == s.id {
        // Demoting the leader: hand leadership to another voter first; the caller retries
        // with the new leader.
        let Some(other) = s.voters.iter().copied().find(|v| *v != s.id) else {
            return JoinReply::Refused("the last manager cannot be demoted".into());
        };
        if let Err(e) = store.transfer_leader(other).await {
            return JoinReply::Refused(e.to_string());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while store.status().is_leader && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        return JoinReply::NotLeader {
            leader: leader(store),
        };
    }
    let result = async {
        store.demote(raft_id).await?;
        store.remove(raft_id).await?;
        // Recorded as a worker and its Raft id released, in one entry: a later promotion
        // gets a new id (ids are never reused).
        store
            .write(Command::RetireManager {
                node: node_id.to_owned(),
            })
            .await
    }
    .await;
    match result {
        Ok(_) => {
            info!(node = %node_id, raft_id, "manager demoted");
            JoinReply::Demoted
        }
        Err(e) => refusal(e),
    }
}

/// A store error as an answer: a membership change still in progress is worth retrying;
/// the others say the cluster could not do it now (not that the request was refused).
fn refusal(e: StoreError) -> JoinReply {
    match e {
        StoreError::MembershipChangeInProgress => JoinReply::MembershipBusy,
        e => JoinReply::Unavailable(e.to_string()),
    }
}

/// The Raft id allocated to `node`: the one it holds, else a new one (never reused).
async fn raft_id_for(store: &Store, node: &str) -> Result<u64, StoreError> {
    let r = store
        .write(Command::AssignRaftId {
            node: node.to_owned(),
        })
        .await?;
    match r.outcome {
        Outcome::RaftId { id } => Ok(id),
        other => Err(StoreError::Raft(format!(
            "unexpected outcome of a raft id assignment: {other:?}"
        ))),
    }
}

async fn renew(
    store: &Store,
    peer: &starling_transport::PeerIdentity,
    csr: &[u8],
    force: bool,
    roots: &[String],
) -> anyhow::Result<JoinReply> {
    let node = peer.node_id.as_str();
    let ((record, info, revoked), _) = store
        .read(Consistency::Linearizable, |s| {
            (
                s.node(node).cloned(),
                s.cluster().clone(),
                s.is_revoked(node),
            )
        })
        .await?;
    let record = match record {
        Some(r) if !revoked => r,
        _ => anyhow::bail!("node {node} was removed from the cluster"),
    };
    let want = if record.desired_role == NodeRole::Manager {
        Role::MANAGER
    } else {
        Role::WORKER
    };
    // On the roots the cluster wants (a node without a dispatcher session is not told of a
    // root rotation: it learns here): nothing to do.
    let wanted_roots = starling_manager::dispatcher::trusted_root_digests(&info);
    let signing = wanted_roots.first().cloned().unwrap_or_default();
    let settled = roots == wanted_roots.as_slice() && record.cert_ca == signing;
    if want == peer.role && !force && settled {
        return Ok(JoinReply::Unchanged);
    }
    issue(store, &info, &record.id, &want, csr).await
}

/// Signs `csr` for `node` with `role` and the cluster's certificate lifetime, records the
/// certificate in the node's record, and answers with it (and a Raft id for a manager).
async fn issue(
    store: &Store,
    info: &starling_raft_store::ClusterInfo,
    node: &str,
    role: &Role,
    csr: &[u8],
) -> anyhow::Result<JoinReply> {
    let raft_id = if *role == Role::MANAGER {
        Some(raft_id_for(store, node).await?)
    } else {
        None
    };
    let (ca, cert) = sign(info, node, role, csr)?;
    let (roots, chain) = trust(info)?;
    let issued = starling_transport::PeerIdentity::from_certificate(&cert)?;
    store
        .write(Command::SetNodeCert {
            id: node.to_owned(),
            serial: issued.serial.to_string(),
            not_after: crate::renewal::unix_secs(issued.not_after),
            ca: ca.digest().to_string(),
            key: key_digest(&cert)?,
        })
        .await?;
    info!(%node, %role, serial = %issued.serial, "certificate issued");
    Ok(JoinReply::Renewed {
        role: role.to_string(),
        raft_id,
        cert: cert.to_vec(),
        roots,
        chain,
        managers: managers(store),
    })
}

/// Signs `csr` for `node` with `role` and the cluster's certificate lifetime, with the CA in
/// `info` that signs new certificates (the new root during a rotation); returns that CA and
/// the certificate (DER).
pub(crate) fn sign(
    info: &starling_raft_store::ClusterInfo,
    node: &str,
    role: &Role,
    csr: &[u8],
) -> anyhow::Result<(ClusterCa, Vec<u8>)> {
    let (cert_pem, key_pem) = info.signing_ca_pem();
    let ca = ClusterCa::from_pem(cert_pem, key_pem)?;
    let opts = CertOptions {
        lifetime: std::time::Duration::from_secs(info.settings.cert_lifetime_secs),
        ..CertOptions::default()
    };
    let node_id = starling_transport::NodeId::new(node.to_owned())?;
    let cert = ca.sign_csr(csr, &node_id, role, &opts)?;
    Ok((ca, cert.to_vec()))
}

/// Certificates, DER.
type Ders = Vec<Vec<u8>>;

/// What a node is to trust and present, from the cluster's state (DER): the roots, the one
/// that signs new certificates first, and the certificates presented after its own.
pub(crate) fn trust(info: &starling_raft_store::ClusterInfo) -> anyhow::Result<(Ders, Ders)> {
    let der = |pem: &str| certificate_from_pem(pem).map(|c| c.to_vec());
    let roots = info
        .trusted_roots_pem()
        .into_iter()
        .map(der)
        .collect::<Result<Vec<_>, _>>()?;
    let chain = info
        .chain_pem()
        .into_iter()
        .map(der)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((roots, chain))
}

/// A node's credentials from a manager's answer: `cert` for `key`, the roots and chain.
pub(crate) fn credentials(
    cert: Vec<u8>,
    key: NodeKey,
    roots: Vec<Vec<u8>>,
    chain: Vec<Vec<u8>>,
) -> anyhow::Result<NodeCredentials> {
    Ok(NodeCredentials::new(
        cert.into(),
        key,
        roots.into_iter().map(Into::into).collect(),
    )?
    .with_chain(chain.into_iter().map(Into::into).collect()))
}

/// Renews the certificate of a node that presents it expired: checked against the CA and
/// the grace period, for the same key, and only for a node still in the cluster. The role is
/// the certificate's, except that a node demoted meanwhile gets a worker's (a promotion
/// meanwhile happens afterwards, as for a running node).
async fn renew_expired(store: &Store, cert: &[u8], csr: &[u8]) -> anyhow::Result<JoinReply> {
    // Checked against this manager's applied state first: an anonymous peer with nothing
    // valid to show costs no quorum round.
    let (applied, _) = store.read_applied(|s| s.cluster().clone());
    let now = std::time::SystemTime::now();
    let (presented, from_previous) = check_presented(&applied, cert, csr, now)?;
    let node = presented.node_id.as_str();
    let ((record, revoked, info), _) = store
        .read(Consistency::Linearizable, |s| {
            (
                s.node(node).cloned(),
                s.is_revoked(node),
                s.cluster().clone(),
            )
        })
        .await?;
    let record = match record {
        Some(r) if !revoked => r,
        _ => anyhow::bail!("node {node} was removed from the cluster; it must rejoin with a token"),
    };
    // A certificate of the root the cluster rotated away from is taken only for the key the
    // cluster last issued to that node: whoever still holds the old root's key cannot mint
    // one for a key of their own, and the CSR proves the presenter holds this one.
    if from_previous {
        check_previous_key(&record, cert)?;
    }
    // The role is the record's (a node demoted meanwhile gets a worker's; a promotion
    // meanwhile happens afterwards, as for a running node).
    let role = if record.role == NodeRole::Manager {
        Role::MANAGER
    } else {
        Role::WORKER
    };
    info!(%node, from_previous, "renewing an expired certificate");
    issue(store, &info, node, &role, csr).await
}

/// A certificate of a dropped root is renewed only for the key the cluster last issued to
/// that node (renewals keep the key).
fn check_previous_key(record: &NodeRecord, cert: &[u8]) -> anyhow::Result<()> {
    if record.cert_key.is_empty() || record.cert_key != key_digest(cert)? {
        return Err(rejoin(
            &"a certificate of the root the cluster rotated away from, for a key the cluster did not issue to this node",
        ));
    }
    Ok(())
}

fn rejoin(e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "{e}; the node must rejoin with a token (stop it, clear its data directory, then \
         `starling join`)"
    )
}

/// Checks a certificate presented on the expired-certificate path against the roots the
/// cluster trusts, then the root it rotated away from; says which root took it.
fn check_presented(
    info: &starling_raft_store::ClusterInfo,
    cert: &[u8],
    csr: &[u8],
    now: std::time::SystemTime,
) -> anyhow::Result<(starling_transport::PeerIdentity, bool)> {
    let cluster = starling_transport::ClusterId::new(info.cluster_id.clone())?;
    let grace = std::time::Duration::from_secs(info.settings.cert_grace_secs);
    let mut first_error = None;
    for root in info.trusted_roots_pem() {
        match check_renewal(
            &certificate_from_pem(root)?,
            &cluster,
            cert,
            csr,
            now,
            grace,
        ) {
            Ok(id) => return Ok((id, false)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if !info.previous_ca_cert_pem.is_empty() {
        let previous = certificate_from_pem(&info.previous_ca_cert_pem)?;
        if let Ok(id) = check_renewal(&previous, &cluster, cert, csr, now, grace) {
            return Ok((id, true));
        }
    }
    Err(match first_error {
        Some(e) => rejoin(&e),
        None => rejoin(&"the cluster trusts no root"),
    })
}

async fn admit(
    store: &Store,
    token: &str,
    csr: &[u8],
    hostname: String,
    advertise: SocketAddr,
) -> anyhow::Result<JoinReply> {
    let token: JoinToken = token.parse().context("bad join token")?;
    let (info, _) = store
        .read(Consistency::Linearizable, |s| s.cluster().clone())
        .await?;
    let digest = CaDigest::of_pem_certificate(&info.ca_cert_pem)
        .ok_or_else(|| anyhow::anyhow!("the cluster CA certificate is unreadable"))?;
    let mut secrets = JoinSecrets::new(digest);
    for (role, secret) in &info.join_secrets {
        if let Ok(bytes) = <[u8; 16]>::try_from(secret.as_slice()) {
            secrets.set(Role::new(role.clone())?, JoinSecret::from_bytes(bytes));
        }
    }
    let role = secrets.authorize(&token).ok_or_else(|| {
        anyhow::anyhow!(
            "the join token is not valid for this cluster (wrong, rotated, or for another cluster)"
        )
    })?;
    let node_id = random_id()?;
    let raft_id = if role == Role::MANAGER {
        Some(raft_id_for(store, &node_id).await?)
    } else {
        None
    };
    let (signer, cert) = sign(&info, &node_id, &role, csr)?;
    let (roots, chain) = trust(&info)?;
    let issued = starling_transport::PeerIdentity::from_certificate(&cert)?;
    let node_role = if role == Role::MANAGER {
        NodeRole::Manager
    } else {
        NodeRole::Worker
    };
    store
        .write(Command::UpsertNode {
            node: NodeRecord {
                id: node_id.clone(),
                hostname,
                addr: advertise.to_string(),
                role: node_role.clone(),
                desired_role: node_role,
                availability: Availability::Active,
                status: NodeStatus::Unknown,
                labels: BTreeMap::new(),
                cert_serial: issued.serial.to_string(),
                cert_not_after: crate::renewal::unix_secs(issued.not_after),
                cert_ca: signer.digest().to_string(),
                cert_key: key_digest(&cert)?,
                version: 0,
                created_revision: 0,
                updated_revision: 0,
            },
        })
        .await?;
    info!(node = %node_id, %role, %advertise, "node joined");
    Ok(JoinReply::Joined {
        node_id,
        cluster_id: info.cluster_id,
        role: role.to_string(),
        raft_id,
        cert: cert.to_vec(),
        roots,
        chain,
        managers: managers(store),
    })
}

/// Sends a join request and decodes the reply.
pub async fn call(conn: &Connection, req: &JoinRequest) -> anyhow::Result<JoinReply> {
    let reply = conn.request(&encode(req)).await?;
    serde_json::from_slice(reply.as_bytes()).context("malformed join reply")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use starling_raft_store::{CaRotation, ClusterInfo};
    use starling_transport::{ClusterId, NodeId};

    fn pem(der: &[u8]) -> String {
        ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
    }

    #[test]
    fn a_dropped_roots_certificate_renews_only_for_the_key_the_cluster_issued() {
        let old = ClusterCa::create(ClusterId::new("c1").unwrap()).unwrap();
        let (new, cross) = old.rotated_at(std::time::SystemTime::now()).unwrap();
        let node = NodeId::new("w1").unwrap();
        let mine = old
            .issue(&node, &Role::WORKER, &CertOptions::default())
            .unwrap();
        // The cluster after the rotation: the new root, the old one kept without its key.
        let (new_cert, new_key) = new.to_pem();
        let info = ClusterInfo {
            cluster_id: "c1".into(),
            ca_cert_pem: new_cert,
            ca_key_pem: new_key,
            previous_ca_cert_pem: old.to_pem().0,
            previous_cross_signed_pem: pem(&cross),
            ..ClusterInfo::default()
        };
        let record = NodeRecord {
            id: "w1".into(),
            hostname: "w1".into(),
            addr: "127.0.0.1:1".into(),
            role: NodeRole::Worker,
            desired_role: NodeRole::Worker,
            availability: Availability::Active,
            status: NodeStatus::Down,
            labels: BTreeMap::new(),
            cert_serial: mine.identity().serial.to_string(),
            cert_not_after: 0,
            cert_ca: old.digest().to_string(),
            cert_key: key_digest(mine.certificate()).unwrap(),
            version: 1,
            created_revision: 1,
            updated_revision: 1,
        };
        let now = std::time::SystemTime::now();
        // The node itself: its certificate and a CSR for its key.
        let csr = mine.node_key().unwrap().csr().unwrap();
        let (id, from_previous) = check_presented(&info, mine.certificate(), &csr, now).unwrap();
        assert_eq!((id.node_id.as_str(), from_previous), ("w1", true));
        check_previous_key(&record, mine.certificate()).unwrap();
        // Whoever kept the old root's key mints a certificate for w1, with the serial the
        // record shows, for a key of their own: it checks out against the old root, but not
        // against the key the cluster issued.
        let forged = old
            .issue(&node, &Role::MANAGER, &CertOptions::default())
            .unwrap();
        let csr = forged.node_key().unwrap().csr().unwrap();
        let (_, from_previous) = check_presented(&info, forged.certificate(), &csr, now).unwrap();
        assert!(from_previous);
        let e = check_previous_key(&record, forged.certificate()).unwrap_err();
        assert!(e.to_string().contains("did not issue"), "{e}");
        // A record from before keys were recorded: refused too.
        let unknown = NodeRecord {
            cert_key: String::new(),
            ..record
        };
        assert!(check_previous_key(&unknown, mine.certificate()).is_err());
        // A certificate of neither root: told to rejoin.
        let foreign = ClusterCa::create(ClusterId::new("c1").unwrap())
            .unwrap()
            .issue(&node, &Role::WORKER, &CertOptions::default())
            .unwrap();
        let csr = foreign.node_key().unwrap().csr().unwrap();
        let e = check_presented(&info, foreign.certificate(), &csr, now).unwrap_err();
        assert!(e.to_string().contains("rejoin with a token"), "{e}");
        // During a rotation both roots are trusted: the old root's certificate is taken as
        // a current one.
        let rotating = ClusterInfo {
            ca_cert_pem: old.to_pem().0,
            ca_key_pem: old.to_pem().1,
            previous_ca_cert_pem: String::new(),
            previous_cross_signed_pem: String::new(),
            rotation: Some(CaRotation {
                new_cert_pem: new.to_pem().0,
                new_key_pem: new.to_pem().1,
                cross_signed_pem: pem(&cross),
                new_digest: new.digest().to_string(),
                started_at: 0,
            }),
            ..info
        };
        let csr = mine.node_key().unwrap().csr().unwrap();
        let (_, from_previous) = check_presented(&rotating, mine.certificate(), &csr, now).unwrap();
        assert!(!from_previous);
    }
}
