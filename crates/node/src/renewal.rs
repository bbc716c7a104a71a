//! Keeping a node's certificate valid and in the role the managers want.
//!
//! A node renews its certificate, with the same key, at a random point between 50 % and 80 %
//! of the time it has left, so nodes whose certificates were issued together spread their
//! renewals. It asks for a new one at once when the managers want it in another role: its
//! dispatcher session pushes the role its record wants (on a manager, its own store does),
//! so nothing is asked while nothing changes. A certificate that expired anyway (the node
//! was off for a while) is renewed by presenting it on a connection without a client
//! certificate, within the cluster's grace period; a manager renews its own from the CA in
//! its local state, which needs no quorum (the other managers may be as expired as it is).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use starling_api::dispatch::NodeDirective;
use starling_manager::dispatcher::RootDigests;
use starling_raft_store::{NodeRole, Store};
use starling_transport::{
    CaDigest, Endpoint, NodeCredentials, NodeId, PeerIdentity, Role, renewal_time,
};
use tracing::{info, warn};

use crate::daemon::{Current, RunningNode};
use crate::datadir::{DataDir, NodeState};
use crate::join::{JoinReply, JoinRequest, call, join_protocol};

/// Seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a node asks for a certificate now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The managers want it in another role.
    Role,
    /// The roots it is to trust changed (a root CA rotation started or finished): a
    /// certificate of the root that signs now, and the new trust.
    Roots,
    /// Its renewal time came.
    Due,
    /// It expired: the expired-certificate path.
    Expired,
    /// Its role may have changed without its hearing of it (a manager taken out of the Raft
    /// group no longer learns from its own store; a node without an agent has no session):
    /// ask a manager.
    Check,
}

/// What to do, from the certificate's role and expiry, the role the managers want (when
/// known), whether the roots they want trusted differ from the node's, the renewal time and
/// the time: the first of expiry, a role change, new roots and the renewal time that applies.
pub fn need(
    cert_role: &Role,
    wanted: Option<&NodeRole>,
    roots_differ: bool,
    not_after: SystemTime,
    renew_at: SystemTime,
    now: SystemTime,
) -> Option<Need> {
    if now >= not_after {
        return Some(Need::Expired);
    }
    if wanted.is_some_and(|w| role_of(w) != *cert_role) {
        return Some(Need::Role);
    }
    if roots_differ {
        return Some(Need::Roots);
    }
    (now >= renew_at).then_some(Need::Due)
}

fn role_of(r: &NodeRole) -> Role {
    match r {
        NodeRole::Manager => Role::MANAGER,
        NodeRole::Worker => Role::WORKER,
    }
}

fn node_role(r: &Role) -> NodeRole {
    if *r == Role::MANAGER {
        NodeRole::Manager
    } else {
        NodeRole::Worker
    }
}

fn role_of_state(state: &NodeState) -> Role {
    if state.role == "manager" {
        Role::MANAGER
    } else {
        Role::WORKER
    }
}

/// How often a node checks what it cannot be told: a manager whether it was taken out of
/// the Raft group, a node without an agent whether its role changed.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// A node without a dispatcher session asks a manager whether its role changed this often
/// (and, if its certificate is of a root the managers no longer trust, renews it).
const CHECK_WITHOUT_SESSION: Duration = Duration::from_secs(15);
/// A manager that has not heard from a leader for this long asks another manager whether
/// it is still one.
const ORPHANED_AFTER: Duration = Duration::from_secs(10);

/// A manager refused to renew the certificate; the reason says why and what to do.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "renewal refused: {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// Keeps the node's certificate valid and in the wanted role (see the module docs). On a
/// role change it stops what the old role ran and starts the new one on the same endpoint;
/// a new role that fails to start is retried every second until it runs.
pub async fn renewal_loop(current: Current, api: crate::api::Api) {
    let mut pending: Option<crate::daemon::RoleChange> = None;
    let mut scheduled: Option<(starling_transport::CertSerial, SystemTime)> = None;
    let mut backoff = Duration::from_secs(1);
    let mut last_check = tokio::time::Instant::now();
    // Since when the loop watches the node as it runs now (it is replaced on a role change).
    let mut watching: Option<(Arc<RunningNode>, tokio::time::Instant)> = None;
    loop {
        let m = current.read().unwrap_or_else(|p| p.into_inner()).clone();
        let since = match &watching {
            Some((w, t)) if Arc::ptr_eq(w, &m) => *t,
            _ => {
                let t = tokio::time::Instant::now();
                watching = Some((m.clone(), t));
                t
            }
        };
        if let Some(mut change) = pending.take() {
            let started = crate::daemon::start_role(&m, &change).await;
            change.stopped = true;
            match started {
                Ok(new) => {
                    new.serve_api(api.clone());
                    *current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
                }
                Err(e) => {
                    warn!(error = %e, role = %change.state.role, "starting the new role failed; retrying");
                    pending = Some(change);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            continue;
        }
        let Some(me) = m.endpoint.identity() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let renew_at = match &scheduled {
            Some((serial, at)) if *serial == me.serial => *at,
            _ => {
                let at = renewal_time(SystemTime::now(), me.not_after, jitter());
                info!(
                    expires_in_s = me
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .as_secs(),
                    renews_in_s = at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .as_secs(),
                    "certificate renewal scheduled"
                );
                scheduled = Some((me.serial.clone(), at));
                at
            }
        };
        let why = wait(&m, &me, renew_at, &mut last_check, since).await;
        match renew(&m, why, since).await {
            Ok(Some(change)) => {
                backoff = Duration::from_secs(1);
                pending = Some(change);
            }
            // Renewed (a new certificate in use), or a check that found nothing to do.
            Ok(None)
                if why == Need::Check
                    || m.endpoint
                        .identity()
                        .is_some_and(|id| id.serial != me.serial) =>
            {
                backoff = Duration::from_secs(1);
                if why == Need::Roots {
                    // The roots may still differ for a moment (the session's directive lags
                    // the answering manager): one renewal a second at most meanwhile.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            // A renewal that came back unchanged (a role the managers want but did not grant
            // yet: a lagging manager): asked again after a pause, as after a failure, never
            // in a tight loop.
            Ok(None) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
            Err(e) => {
                warn!(error = format!("{e:#}"), need = ?why, retry_in = ?backoff, "certificate renewal failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// A uniform draw from `[0, 1]` (the middle if the OS has no randomness to give).
fn jitter() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0x80u8, 0, 0, 0];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    f64::from(u32::from_be_bytes(b)) / f64::from(u32::MAX)
}

/// Waits until the node must ask for a certificate, and says why. Only local facts are
/// read while waiting: the session's directive, the manager's own store, the clock.
async fn wait(
    m: &RunningNode,
    me: &PeerIdentity,
    renew_at: SystemTime,
    last_check: &mut tokio::time::Instant,
    since: tokio::time::Instant,
) -> Need {
    let mut directive = m.directive.clone();
    let mut applied = m.store.as_ref().map(|s| s.object_changes());
    let mut digests = RootDigests::default();
    loop {
        let now = SystemTime::now();
        // A certificate of another role than the node runs as (a crash between saving the
        // one and the other): the managers' answer settles it.
        let wanted = if role_of_state(&m.state) != me.role {
            Some(node_role(&role_of_state(&m.state)))
        } else {
            wanted_role(m, directive.as_ref())
        };
        let roots_differ = wanted_roots(m, directive.as_ref(), &mut digests).is_some_and(|want| {
            let have: Vec<String> = m
                .endpoint
                .trusted_roots()
                .iter()
                .map(ToString::to_string)
                .collect();
            !want.is_empty() && want != have
        });
        if let Some(n) = need(
            &me.role,
            wanted.as_ref(),
            roots_differ,
            me.not_after,
            renew_at,
            now,
        ) {
            return n;
        }
        // No session (none yet, or lost): nothing tells this node of changes.
        let no_session =
            m.store.is_none() && m.directive.as_ref().is_none_or(|rx| rx.borrow().is_none());
        let check_every = if no_session {
            Some(CHECK_WITHOUT_SESSION)
        } else if orphaned(m, since) {
            Some(CHECK_EVERY)
        } else {
            None
        };
        if check_every.is_some_and(|every| last_check.elapsed() >= every) {
            *last_check = tokio::time::Instant::now();
            return Need::Check;
        }
        let until = renew_at
            .min(me.not_after)
            .duration_since(now)
            .unwrap_or_default()
            .min(CHECK_EVERY);
        match (directive.as_mut(), applied.as_mut()) {
            (Some(rx), _) => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() {
                        // The agent stopped (a role change is under way): the clock only.
                        directive = None;
                    },
                    _ = tokio::time::sleep(until) => {}
                }
            }
            // A manager without an agent: its own store tells it.
            (None, Some(rx)) => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() {
                        applied = None;
                    },
                    _ = tokio::time::sleep(until) => {}
                }
            }
            (None, None) => tokio::time::sleep(until).await,
        }
    }
}

/// The role the managers want for this node: from its dispatcher session, else (a manager
/// without an agent) from its own store.
fn wanted_role(
    m: &RunningNode,
    directive: Option<&tokio::sync::watch::Receiver<Option<NodeDirective>>>,
) -> Option<NodeRole> {
    if let Some(d) = directive.and_then(|rx| rx.borrow().clone()) {
        return Some(d.role);
    }
    let store = m.store.as_ref()?;
    store
        .read_applied(|s| s.node(&m.state.node_id).map(|n| n.desired_role.clone()))
        .0
}

/// The roots (hex digests, the signing one first) the managers want this node to trust:
/// from its dispatcher session, else (a manager) from its own store.
fn wanted_roots(
    m: &RunningNode,
    directive: Option<&tokio::sync::watch::Receiver<Option<NodeDirective>>>,
    digests: &mut RootDigests,
) -> Option<Vec<String>> {
    if let Some(d) = directive.and_then(|rx| rx.borrow().clone()) {
        return Some(d.roots);
    }
    let store = m.store.as_ref()?;
    Some(store.read_applied(|s| digests.of(s.cluster())).0)
}

/// Whether this manager may have been taken out of the Raft group without its own store
/// telling it (a removed member receives no more entries): not a voter in its own view, or
/// no word from a leader for [`ORPHANED_AFTER`] (never, since it started `since`).
fn orphaned(m: &RunningNode, since: tokio::time::Instant) -> bool {
    let (Some(store), Some(id)) = (&m.store, m.state.raft_id) else {
        return false;
    };
    let s = store.status();
    if s.is_leader {
        return false;
    }
    let silent = match store.last_contact() {
        Some(d) => d > ORPHANED_AFTER,
        None => since.elapsed() > ORPHANED_AFTER,
    };
    (!s.voters.is_empty() && !s.voters.contains(&id)) || silent
}

/// Whether a manager may sign its own renewal from its local CA: it hears a leader, and its
/// own record (as its store has it) wants it a manager and is not revoked. Otherwise it asks
/// another manager, which knows better.
fn may_self_issue(m: &RunningNode, store: &Store, since: tokio::time::Instant) -> bool {
    !orphaned(m, since) && local_record_wants_manager(store, &m.state.node_id)
}

/// Whether the local state has `node` as a manager (wanted so) and not revoked.
pub(crate) fn local_record_wants_manager(store: &Store, node: &str) -> bool {
    store
        .read_applied(|s| {
            !s.is_revoked(node)
                && s.node(node)
                    .is_some_and(|n| n.desired_role == NodeRole::Manager)
        })
        .0
}

/// Asks for a certificate for `why`; on an answer, saves it and puts it in use. A new role
/// comes back as a [`crate::daemon::RoleChange`] for the caller to start.
async fn renew(
    m: &RunningNode,
    why: Need,
    since: tokio::time::Instant,
) -> anyhow::Result<Option<crate::daemon::RoleChange>> {
    let creds = NodeCredentials::load(&m.data_dir.0)?;
    let csr = creds.node_key()?.csr()?;
    let reply = match (&m.store, why) {
        // A manager renews its own certificate from the CA in its state: no quorum needed.
        (Some(store), Need::Due | Need::Expired | Need::Roots)
            if may_self_issue(m, store, since) =>
        {
            let r = self_issue(store, &creds, &csr)?;
            let change = accept(&m.data_dir, &m.state, &m.endpoint, &creds, r.clone())?;
            // Once in use: a newer certificate put in use meanwhile stops the recording.
            record_in_background(store.clone(), m.endpoint.clone(), &r);
            return Ok(change);
        }
        _ if why == Need::Expired => ask_expired(&m.endpoint, &m.state, &creds, &csr).await?,
        // A role change asks for a new certificate even if the answering manager's view has
        // the role unchanged: its answer names the role to run as. A node the managers do
        // not take (its certificate is of a root they dropped while it was off) renews on
        // the expired-certificate path.
        _ => match ask(m, &csr, why != Need::Check).await {
            Ok(r) => r,
            Err(e) if e.downcast_ref::<CertRefused>().is_some() => {
                match ask_expired(&m.endpoint, &m.state, &creds, &csr).await {
                    Ok(r) => r,
                    Err(e2) => {
                        return Err(e2.context(format!(
                            "the managers refused this node's certificate ({e:#}), and the \
                             expired-certificate path failed too"
                        )));
                    }
                }
            }
            Err(e) => return Err(e),
        },
    };
    accept(&m.data_dir, &m.state, &m.endpoint, &creds, reply)
}

/// A manager certificate a manager signs for itself from the CA in its local state (the
/// caller checked that its record wants it a manager). No grace period applies: the node
/// holds the CA key, and a cluster whose managers were all off for months must come back.
pub(crate) fn self_issue(
    store: &Store,
    creds: &NodeCredentials,
    csr: &[u8],
) -> anyhow::Result<JoinReply> {
    let me = creds.identity();
    let ((info, raft_id), _) =
        store.read_applied(|s| (s.cluster().clone(), s.raft_id(me.node_id.as_str())));
    let (_, cert) = crate::join::sign(&info, me.node_id.as_str(), &Role::MANAGER, csr)?;
    let (roots, chain) = crate::join::trust(&info)?;
    info!(node = %me.node_id, "manager certificate renewed from the local CA");
    Ok(JoinReply::Renewed {
        role: Role::MANAGER.to_string(),
        raft_id,
        cert: cert.to_vec(),
        roots,
        chain,
        managers: Vec::new(),
    })
}

/// Records a self-issued certificate, already in use, in the node's record once the cluster
/// can commit, unless the node moved on to a newer one meanwhile (an older record never
/// overwrites a newer one).
pub(crate) fn record_in_background(store: Arc<Store>, endpoint: Endpoint, reply: &JoinReply) {
    let JoinReply::Renewed { cert, roots, .. } = reply else {
        return;
    };
    let Ok(issued) = PeerIdentity::from_certificate(cert) else {
        return;
    };
    let ca = roots
        .first()
        .map(|r| CaDigest::of_certificate(r).to_string())
        .unwrap_or_default();
    let Ok(key) = starling_transport::key_digest(cert) else {
        return;
    };
    tokio::spawn(async move {
        let cmd = starling_raft_store::Command::SetNodeCert {
            id: issued.node_id.to_string(),
            serial: issued.serial.to_string(),
            not_after: unix_secs(issued.not_after),
            ca,
            key,
        };
        for _ in 0..60 {
            // Put in use after this was spawned; replaced since by a newer one: not ours
            // to record any more.
            let current = endpoint.identity().map(|id| id.serial);
            if current.is_some_and(|s| s != issued.serial) {
                return;
            }
            if store.write(cmd.clone()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        warn!("the renewed certificate was not recorded: no quorum for 5 minutes");
    });
}

/// The managers to ask, current Raft members first (a manager knows them), then those this
/// node was told of; never itself.
fn targets(m: &RunningNode) -> Vec<(String, SocketAddr)> {
    let mut targets: Vec<(String, SocketAddr)> = Vec::new();
    if let Some(store) = &m.store {
        for (_, n) in store.status().nodes {
            if let Ok(a) = n.addr.parse() {
                targets.push((n.name, a));
            }
        }
    }
    targets.extend(m.state.managers.iter().cloned());
    targets.retain(|(n, _)| *n != m.state.node_id);
    let mut seen = std::collections::BTreeSet::new();
    targets.retain(|t| seen.insert(t.clone()));
    targets
}

/// No manager answered, and one at least refused this node's certificate in the handshake
/// or presented one this node does not trust: the cluster's root was probably rotated while
/// it was away.
#[derive(Debug)]
pub struct CertRefused(pub String);

impl std::fmt::Display for CertRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the managers and this node do not trust each other's certificates: {}",
            self.0
        )
    }
}

impl std::error::Error for CertRefused {}

/// Asks the managers, one after another, for a certificate for the CSR with this node's
/// current certificate: the first answer counts.
async fn ask(m: &RunningNode, csr: &[u8], force: bool) -> anyhow::Result<JoinReply> {
    let protocol = join_protocol()?;
    let mut last = anyhow::anyhow!("no manager known");
    let mut refused = 0usize;
    for (node, addr) in targets(m) {
        let Ok(id) = NodeId::new(node.clone()) else {
            continue;
        };
        let dial = m.endpoint.connect(&protocol, &id, addr);
        let conn = match tokio::time::timeout(Duration::from_secs(2), dial).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if matches!(
                    e,
                    starling_transport::ConnectError::HandshakeRejected { .. }
                        | starling_transport::ConnectError::Untrusted(_)
                ) {
                    refused += 1;
                }
                last = anyhow::anyhow!("{node}: {e}");
                continue;
            }
            Err(_) => {
                last = anyhow::anyhow!("{node}: no answer within 2 s");
                continue;
            }
        };
        let req = JoinRequest::Renew {
            csr: csr.to_vec(),
            force,
            roots: m
                .endpoint
                .trusted_roots()
                .iter()
                .map(ToString::to_string)
                .collect(),
        };
        let reply = call(&conn, &req).await;
        conn.close(starling_transport::CloseCode::SHUTDOWN, "renewed");
        match reply {
            Ok(JoinReply::Renewed { .. } | JoinReply::Unchanged | JoinReply::Refused(_)) => {
                return reply;
            }
            Ok(other) => last = anyhow::anyhow!("{node}: {other:?}"),
            Err(e) => last = e.context(node.clone()),
        }
    }
    // No answer, and at least one manager (the others may be down) refused this node's
    // certificate or was not trusted by it.
    if refused > 0 {
        return Err(CertRefused(format!("{last:#}")).into());
    }
    Err(last)
}

/// Asks the managers to renew an expired certificate: on connections without a client
/// certificate (the expired one would be refused in the handshake), trusting a manager
/// whose CA is the one this node has.
pub(crate) async fn ask_expired(
    endpoint: &Endpoint,
    state: &NodeState,
    creds: &NodeCredentials,
    csr: &[u8],
) -> anyhow::Result<JoinReply> {
    let protocol = join_protocol()?;
    let ca = creds
        .roots()
        .first()
        .map(|r| CaDigest::of_certificate(r))
        .context("no trusted CA certificate")?;
    let mut last = anyhow::anyhow!("no manager known");
    for (node, addr) in state.managers.iter().filter(|(n, _)| *n != state.node_id) {
        let conn = match endpoint.connect_anonymous(&protocol, *addr, ca).await {
            Ok(c) => c,
            Err(e) => {
                last = anyhow::anyhow!("{node}: {e}");
                continue;
            }
        };
        let req = JoinRequest::RenewExpired {
            cert: creds.certificate().to_vec(),
            csr: csr.to_vec(),
        };
        let reply = call(&conn, &req).await;
        conn.close(starling_transport::CloseCode::SHUTDOWN, "renewed");
        match reply {
            Ok(JoinReply::Renewed { .. }) => return reply,
            Ok(JoinReply::Refused(why)) => return Err(Refused(why).into()),
            Ok(other) => last = anyhow::anyhow!("{node}: {other:?}"),
            Err(e) => last = e.context(node.clone()),
        }
    }
    Err(last)
}

/// Takes a manager's answer: a new certificate is saved, then put in use on the endpoint
/// (same role) or handed back as a role change to start.
pub(crate) fn accept(
    dir: &DataDir,
    state: &NodeState,
    endpoint: &Endpoint,
    creds: &NodeCredentials,
    reply: JoinReply,
) -> anyhow::Result<Option<crate::daemon::RoleChange>> {
    let (role, raft_id, cert, roots, chain, managers) = match reply {
        JoinReply::Unchanged => return Ok(None),
        JoinReply::Renewed {
            role,
            raft_id,
            cert,
            roots,
            chain,
            managers,
        } => (role, raft_id, cert, roots, chain, managers),
        JoinReply::Refused(why) => anyhow::bail!("renewal refused: {why}"),
        other => anyhow::bail!("unexpected answer to a renewal: {other:?}"),
    };
    if roots.is_empty() {
        anyhow::bail!("a renewal answer without a CA certificate");
    }
    let new = creds
        .renewed(
            cert.into(),
            Some(roots.into_iter().map(Into::into).collect()),
        )?
        .with_chain(chain.into_iter().map(Into::into).collect());
    if new.identity().node_id != creds.identity().node_id
        || new.identity().cluster_id != creds.identity().cluster_id
    {
        anyhow::bail!(
            "a manager answered with a certificate for {} of {}, not this node",
            new.identity().node_id,
            new.identity().cluster_id
        );
    }
    new.save(&dir.0)?;
    let mut next = state.clone();
    if !managers.is_empty() {
        next.managers = managers;
    }
    if role == state.role {
        endpoint.rotate(new.clone())?;
        if next.managers != state.managers {
            dir.save(&next)?;
        }
        info!(
            serial = %new.identity().serial,
            expires_in_s = new.identity().not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
            "certificate renewed"
        );
        return Ok(None);
    }
    info!(node = %state.node_id, %role, "role changed; restarting this node's role");
    if role == "manager" && raft_id.is_none() {
        anyhow::bail!("a promotion without a raft id");
    }
    next.role = role;
    next.raft_id = raft_id;
    dir.save(&next)?;
    Ok(Some(crate::daemon::RoleChange {
        state: next,
        creds: new,
        stopped: false,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn expiry_first_then_role_then_time() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_after = t0 + Duration::from_secs(100);
        let renew_at = t0 + Duration::from_secs(60);
        let w = Role::WORKER;
        let m = Some(&NodeRole::Manager);
        let same = Some(&NodeRole::Worker);
        assert_eq!(need(&w, None, false, not_after, renew_at, t0), None);
        assert_eq!(need(&w, same, false, not_after, renew_at, t0), None);
        assert_eq!(
            need(&w, m, false, not_after, renew_at, t0),
            Some(Need::Role)
        );
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            need(&w, same, false, not_after, renew_at, later),
            Some(Need::Due)
        );
        assert_eq!(
            need(&w, m, false, not_after, renew_at, later),
            Some(Need::Role)
        );
        assert_eq!(
            need(&w, m, false, not_after, renew_at, not_after),
            Some(Need::Expired)
        );
        assert_eq!(
            need(
                &Role::MANAGER,
                Some(&NodeRole::Worker),
                false,
                not_after,
                renew_at,
                t0
            ),
            Some(Need::Role)
        );
    }

    #[test]
    fn new_roots_come_after_a_role_change_and_before_the_renewal_time() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_after = t0 + Duration::from_secs(100);
        let renew_at = t0 + Duration::from_secs(60);
        let w = Role::WORKER;
        let same = Some(&NodeRole::Worker);
        assert_eq!(
            need(&w, same, true, not_after, renew_at, t0),
            Some(Need::Roots)
        );
        assert_eq!(
            need(&w, None, true, not_after, renew_at, t0),
            Some(Need::Roots)
        );
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            need(&w, same, true, not_after, renew_at, later),
            Some(Need::Roots)
        );
        assert_eq!(
            need(&w, Some(&NodeRole::Manager), true, not_after, renew_at, t0),
            Some(Need::Role)
        );
        assert_eq!(
            need(&w, same, true, not_after, renew_at, not_after),
            Some(Need::Expired)
        );
    }

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..=1.0).contains(&j), "{j}");
        }
    }
}
