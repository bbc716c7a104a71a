//! The control API: HTTP/JSON on the node's Unix socket (see `API.md`).

use std::sync::Arc;

use serde_json::{Value, json};
use starling_raft_store::{Command, Consistency, NodeRole, Outcome, Store, StoreError};
use starling_transport::{CaDigest, JoinSecret, JoinToken};

use crate::daemon::Manager;
use crate::http::{HttpRequest, HttpResponse};

/// A manager that answered the leader's heartbeats this recently is reachable.
const REACHABLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

fn lower<T: std::fmt::Debug>(v: &T) -> String {
    format!("{v:?}").to_lowercase()
}

fn store_error(e: &StoreError) -> HttpResponse {
    let status = match e {
        StoreError::NoQuorum { .. } => 503,
        StoreError::TooLarge { .. } => 413,
        _ => 500,
    };
    HttpResponse::error(status, e)
}

fn consistency(req: &HttpRequest) -> Result<Consistency, HttpResponse> {
    match req.param("consistency") {
        None | Some("linearizable") => Ok(Consistency::Linearizable),
        Some("stale") => Ok(Consistency::Stale),
        Some(other) => Err(HttpResponse::error(
            400,
            format!("unknown consistency {other:?}: use linearizable or stale"),
        )),
    }
}

/// Routes one request.
pub async fn handle(m: Arc<Manager>, req: HttpRequest) -> HttpResponse {
    let path = req.path.clone();
    let method = req.method.as_str();
    let Some(store) = m.store.clone() else {
        return match (method, path.as_str()) {
            ("GET", "/v1/info") => info(&m),
            ("GET", "/v1/members") => members(&m),
            ("POST", "/v1/leave") => {
                // Leave gossip (managers see it Down at once), then stop the daemon.
                m.gossip.leave_shared().await;
                m.stop.notify_one();
                HttpResponse::json(200, &json!({"left": m.state.node_id}))
            }
            _ => HttpResponse::error(
                503,
                "this node is a worker: run this command against a manager's data directory",
            ),
        };
    };
    let store = &*store;
    if let Some(key) = path.strip_prefix("/v1/kv/") {
        return kv(store, &m.metrics, method, key, &req).await;
    }
    match (method, path.as_str()) {
        ("GET", "/v1/info") => info(&m),
        ("GET", "/v1/nodes") => nodes(&m, store).await,
        ("GET", "/v1/watch") => watch(store, &req).await,
        ("POST", p) if role_action(p).is_some() => {
            let (id, promote) = role_action(p).unwrap_or_default();
            role_change(&m, store, id, promote).await
        }
        (_, p) if p.starts_with("/v1/nodes/") => {
            node_op(store, method, &p["/v1/nodes/".len()..], &req).await
        }
        ("GET", "/v1/members") => members(&m),
        ("GET", "/v1/kv") => kv_list(store, &req).await,
        ("POST", p) if rotate_role(p).is_some() => {
            rotate_token(store, rotate_role(p).unwrap_or_default()).await
        }
        ("GET", p) if p.starts_with("/v1/join-token/") => {
            join_token(store, &p["/v1/join-token/".len()..]).await
        }
        ("POST", "/v1/leave") => {
            // A manager is demoted first (through the leader; refused for the last one),
            // then leaves like a worker.
            let id = m.state.node_id.clone();
            let demoted = role_change(&m, store, &id, false).await;
            if demoted.status != 200 {
                return demoted;
            }
            m.gossip.leave_shared().await;
            m.stop.notify_one();
            HttpResponse::json(200, &json!({"left": id, "demoted": true}))
        }
        (_, "/v1/info" | "/v1/nodes" | "/v1/members" | "/v1/kv") => {
            HttpResponse::error(405, format!("{method} is not allowed on {path}"))
        }
        _ => HttpResponse::error(404, format!("no such endpoint: {path}")),
    }
}

fn info(m: &Manager) -> HttpResponse {
    let raft = m.store.as_ref().map(|st| {
        let s = st.status();
        json!({"id": s.id, "leader": s.leader, "term": s.term, "applied": s.applied, "voters": s.voters.len()})
    });
    HttpResponse::json(
        200,
        &json!({
            "node_id": m.state.node_id,
            "cluster_id": m.state.cluster_id,
            "role": m.state.role,
            "addr": m.state.advertise.to_string(),
            "raft": raft,
        }),
    )
}

async fn nodes(m: &Manager, store: &Store) -> HttpResponse {
    // docker node ls reads through the leader; without a quorum, answer from local state
    // and say so.
    let read = |s: &starling_raft_store::ClusterState| s.nodes().cloned().collect::<Vec<_>>();
    let (records, note) = match store.read(Consistency::Linearizable, read).await {
        Ok((r, _)) => (r, None),
        Err(e @ StoreError::NoQuorum { .. }) => match store.read(Consistency::Stale, read).await {
            Ok((r, _)) => (r, Some(format!("{e}; showing this manager's local state"))),
            Err(e) => return store_error(&e),
        },
        Err(e) => return store_error(&e),
    };
    let status = store.status();
    let acks = store.leader_acks().await;
    let up: std::collections::BTreeSet<String> = m
        .gossip
        .members()
        .into_iter()
        .filter(|v| v.up)
        .map(|v| v.id.node)
        .chain([m.state.node_id.clone()])
        .collect();
    let list: Vec<Value> = records
        .iter()
        .map(|n| {
            let raft_id = status
                .nodes
                .iter()
                .find(|(_, node)| node.name == n.id)
                .map(|(id, _)| *id);
            // From Raft: the leader knows when each manager last answered its heartbeats
            // (asked of the leader when this manager follows); without a leader, gossip's
            // view stands in.
            let raft_reachable = |id: u64| match &acks {
                Some(acks) => {
                    Some(id) == status.leader
                        || acks.get(&id).is_some_and(|d| *d < REACHABLE_WITHIN)
                }
                None => up.contains(&n.id),
            };
            let manager_status = match (n.role.clone(), raft_id) {
                (NodeRole::Manager, Some(id)) if status.leader == Some(id) => json!("leader"),
                (NodeRole::Manager, Some(id)) if raft_reachable(id) => json!("reachable"),
                (NodeRole::Manager, _) => json!("unreachable"),
                (NodeRole::Worker, _) => Value::Null,
            };
            json!({
                "id": n.id,
                "hostname": n.hostname,
                "role": lower(&n.role),
                "status": lower(&n.status),
                "availability": lower(&n.availability),
                "manager_status": manager_status,
                "addr": n.addr,
                "version": n.version,
            })
        })
        .collect();
    let mut body = json!({ "nodes": list });
    if let Some(note) = note {
        body["warning"] = json!(note);
    }
    HttpResponse::json(200, &body)
}

/// Promotion records the wish (the node picks up a manager certificate on its next renewal
/// and joins the Raft group); demotion goes through the leader, which takes the node out of
/// the Raft group first (handing leadership over if it is the node itself).
async fn role_change(m: &Manager, store: &Store, id: &str, promote: bool) -> HttpResponse {
    use crate::join::{JoinReply, JoinRequest, call, demote_on_leader, join_protocol};
    let record = match store
        .read(Consistency::Linearizable, |s| s.node(id).cloned())
        .await
    {
        Ok((Some(r), _)) => r,
        Ok((None, _)) => return HttpResponse::error(404, format!("no such node: {id}")),
        Err(e) => return store_error(&e),
    };
    if promote {
        if record.role == NodeRole::Manager {
            return HttpResponse::error(409, format!("node {id} is already a manager"));
        }
        return match store
            .write(Command::SetNodeRole {
                id: id.to_owned(),
                role: record.role,
                desired_role: NodeRole::Manager,
            })
            .await
        {
            Ok(r) => HttpResponse::json(200, &json!({"revision": r.revision, "promoted": id})),
            Err(e) => store_error(&e),
        };
    }
    if record.role != NodeRole::Manager {
        return HttpResponse::error(409, format!("node {id} is not a manager"));
    }
    // Without a quorum there is no leader to run the change: say so, with the count.
    if let Err(e) = store.read(Consistency::Linearizable, |_| ()).await {
        return store_error(&e);
    }
    let Ok(protocol) = join_protocol() else {
        return HttpResponse::error(500, "join protocol");
    };
    for _ in 0..20 {
        let reply = if store.status().is_leader {
            demote_on_leader(store, id).await
        } else {
            let leader = store.status().leader.and_then(|l| {
                store
                    .status()
                    .nodes
                    .into_iter()
                    .find(|(i, _)| *i == l)
                    .map(|(_, n)| n)
            });
            match leader {
                Some(n) => {
                    let (Ok(node), Ok(addr)) = (
                        starling_transport::NodeId::new(n.name.clone()),
                        n.addr.parse(),
                    ) else {
                        return HttpResponse::error(500, "bad leader address");
                    };
                    match m.endpoint.connect(&protocol, &node, addr).await {
                        Ok(conn) => match call(
                            &conn,
                            &JoinRequest::Demote {
                                node_id: id.to_owned(),
                            },
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(e) => JoinReply::Refused(e.to_string()),
                        },
                        Err(e) => JoinReply::Refused(format!("cannot reach the leader: {e}")),
                    }
                }
                None => JoinReply::NotLeader { leader: None },
            }
        };
        match reply {
            JoinReply::Demoted => return HttpResponse::json(200, &json!({"demoted": id})),
            JoinReply::NotLeader { .. } => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            JoinReply::MembershipBusy => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            JoinReply::Refused(why) => return HttpResponse::error(409, why),
            other => return HttpResponse::error(500, format!("unexpected answer: {other:?}")),
        }
    }
    HttpResponse::error(503, "no leader completed the demotion")
}

fn node_json(n: &starling_raft_store::NodeRecord) -> Value {
    json!({
        "id": n.id,
        "hostname": n.hostname,
        "role": lower(&n.role),
        "desired_role": lower(&n.desired_role),
        "status": lower(&n.status),
        "availability": lower(&n.availability),
        "addr": n.addr,
        "labels": n.labels,
        "cert_serial": n.cert_serial,
        "version": n.version,
        "created_revision": n.created_revision,
        "updated_revision": n.updated_revision,
    })
}

/// `GET /v1/nodes/{id}`, `PUT /v1/nodes/{id}/availability` (body: active|pause|drain),
/// `DELETE /v1/nodes/{id}[?force=true]`.
async fn node_op(store: &Store, method: &str, rest: &str, req: &HttpRequest) -> HttpResponse {
    use starling_raft_store::{Availability, NodeStatus};
    let (id, sub) = rest.split_once('/').unwrap_or((rest, ""));
    let record = match store
        .read(Consistency::Linearizable, |s| s.node(id).cloned())
        .await
    {
        Ok((Some(r), _)) => r,
        Ok((None, _)) => return HttpResponse::error(404, format!("no such node: {id}")),
        Err(e) => return store_error(&e),
    };
    match (method, sub) {
        ("GET", "") => HttpResponse::json(200, &node_json(&record)),
        ("PUT", "availability") => {
            let availability = match std::str::from_utf8(&req.body).map(str::trim) {
                Ok("active") => Availability::Active,
                Ok("pause") => Availability::Pause,
                Ok("drain") => Availability::Drain,
                _ => {
                    return HttpResponse::error(400, "availability must be active, pause or drain");
                }
            };
            match store
                .write(Command::SetNodeAvailability {
                    id: id.to_owned(),
                    availability,
                })
                .await
            {
                Ok(r) => HttpResponse::json(200, &json!({"revision": r.revision})),
                Err(e) => store_error(&e),
            }
        }
        ("DELETE", "") => {
            let force = req.param("force") == Some("true");
            if record.status != NodeStatus::Down && !force {
                return HttpResponse::error(
                    409,
                    format!(
                        "node {id} is {} (not down): use --force to remove it anyway",
                        lower(&record.status)
                    ),
                );
            }
            if record.role == NodeRole::Manager {
                return HttpResponse::error(
                    409,
                    format!(
                        "node {id} is a manager: demote it first (managers are never removed from the voter set implicitly)"
                    ),
                );
            }
            // One entry removes the record and revokes the id.
            match store.write(Command::RemoveNode { id: id.to_owned() }).await {
                Ok(r) => HttpResponse::json(200, &json!({"revision": r.revision})),
                Err(e) => store_error(&e),
            }
        }
        _ => HttpResponse::error(405, format!("{method} is not allowed on /v1/nodes/{rest}")),
    }
}

/// `GET /v1/watch?prefix=P&from=N`: the changes under `P` from revision `N` on, waiting up
/// to `wait` seconds (default 30) for the first one: long polling, so a client resumes from
/// the last revision it got plus one, with no gap and no duplicate.
async fn watch(store: &Store, req: &HttpRequest) -> HttpResponse {
    let prefix = req.param("prefix").unwrap_or("");
    let from = match req.param("from").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return HttpResponse::error(400, "from must be a revision number"),
    };
    let wait = req
        .param("wait")
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(30)
        .min(300);
    let mut w = match store.watch(prefix, from) {
        Ok(w) => w,
        Err(e) => return HttpResponse::error(410, e),
    };
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    loop {
        let timeout = if events.is_empty() {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            std::time::Duration::from_millis(0)
        };
        match tokio::time::timeout(timeout, w.next()).await {
            Ok(Ok(e)) => {
                events.push(json!({
                    "revision": e.revision,
                    "key": e.key,
                    "type": if e.entry.is_some() { "put" } else { "delete" },
                    "value": e.entry.map(|v| String::from_utf8_lossy(&v.value).into_owned()),
                }));
                if events.len() >= 1000 {
                    break;
                }
            }
            Ok(Err(e)) => {
                if events.is_empty() {
                    return HttpResponse::error(410, e);
                }
                break;
            }
            Err(_) => break,
        }
    }
    HttpResponse::json(200, &json!({"events": events}))
}

fn members(m: &Manager) -> HttpResponse {
    let list: Vec<Value> = m
        .gossip
        .members()
        .into_iter()
        .map(|v| {
            json!({
                "node": v.id.node,
                "addr": v.id.addr.to_string(),
                "state": if v.up { "alive" } else { "down" },
                "generation": v.id.generation,
            })
        })
        .collect();
    HttpResponse::json(
        200,
        &json!({ "self": {"node": m.state.node_id, "generation": m.gossip.id().generation}, "members": list }),
    )
}

fn entry_json(key: &str, e: &starling_raft_store::KvEntry, revision: u64) -> Value {
    json!({
        "key": key,
        "value": String::from_utf8_lossy(&e.value),
        "create_revision": e.create_revision,
        "mod_revision": e.mod_revision,
        "version": e.version,
        "revision": revision,
    })
}

async fn kv(
    store: &Store,
    metrics: &crate::metrics::Metrics,
    method: &str,
    key: &str,
    req: &HttpRequest,
) -> HttpResponse {
    let started = std::time::Instant::now();
    let r = kv_inner(store, method, key, req).await;
    if method != "GET" && r.status == 200 {
        metrics.write_took(started.elapsed());
    }
    r
}

async fn kv_inner(store: &Store, method: &str, key: &str, req: &HttpRequest) -> HttpResponse {
    if key.is_empty() {
        return HttpResponse::error(400, "empty key");
    }
    match method {
        "GET" => {
            let c = match consistency(req) {
                Ok(c) => c,
                Err(r) => return r,
            };
            match store.read(c, |s| s.get(key).cloned()).await {
                Ok((Some(e), rev)) => HttpResponse::json(200, &entry_json(key, &e, rev)),
                Ok((None, rev)) => HttpResponse::json(
                    404,
                    &json!({"error": format!("key {key:?} not found"), "revision": rev}),
                ),
                Err(e) => store_error(&e),
            }
        }
        "PUT" => {
            let value = req.body.clone();
            let cmd = match req.param("expect-revision").map(str::parse::<u64>) {
                None => Command::Put {
                    key: key.to_owned(),
                    value,
                },
                Some(Ok(rev)) => Command::cas_revision(key, rev, value),
                Some(Err(_)) => {
                    return HttpResponse::error(400, "expect-revision must be a number");
                }
            };
            match store.write(cmd).await {
                Ok(r) => match r.outcome {
                    Outcome::Txn { succeeded: false } => HttpResponse::json(
                        412,
                        &json!({"error": format!("compare failed: {key:?} is not at revision {}", req.param("expect-revision").unwrap_or("?")), "revision": r.revision}),
                    ),
                    _ => HttpResponse::json(200, &json!({"revision": r.revision})),
                },
                Err(e) => store_error(&e),
            }
        }
        "DELETE" => match store
            .write(Command::Delete {
                key: key.to_owned(),
            })
            .await
        {
            Ok(r) => {
                let deleted = matches!(r.outcome, Outcome::Deleted { prev: Some(_) });
                HttpResponse::json(200, &json!({"revision": r.revision, "deleted": deleted}))
            }
            Err(e) => store_error(&e),
        },
        _ => HttpResponse::error(405, format!("{method} is not allowed on keys")),
    }
}

async fn kv_list(store: &Store, req: &HttpRequest) -> HttpResponse {
    let c = match consistency(req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let prefix = req.param("prefix").unwrap_or("").to_owned();
    match store.read(c, |s| s.range(&prefix)).await {
        Ok((entries, rev)) => {
            let list: Vec<Value> = entries.iter().map(|(k, e)| entry_json(k, e, rev)).collect();
            HttpResponse::json(200, &json!({"keys": list, "revision": rev}))
        }
        Err(e) => store_error(&e),
    }
}

/// Replaces a role's join secret: tokens issued before stop working.
/// `(id, promote?)` from `/v1/nodes/{id}/promote` or `/v1/nodes/{id}/demote`.
fn role_action(path: &str) -> Option<(&str, bool)> {
    let (id, action) = path.strip_prefix("/v1/nodes/")?.rsplit_once('/')?;
    match action {
        "promote" => Some((id, true)),
        "demote" => Some((id, false)),
        _ => None,
    }
}

/// The role in `/v1/join-token/{role}/rotate`, if `path` has that shape.
fn rotate_role(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/join-token/")?
        .strip_suffix("/rotate")
}

async fn rotate_token(store: &Store, role: &str) -> HttpResponse {
    if role != "worker" && role != "manager" {
        return HttpResponse::error(400, format!("unknown role {role:?}: use worker or manager"));
    }
    let mut info = match store
        .read(Consistency::Linearizable, |s| s.cluster().clone())
        .await
    {
        Ok((i, _)) => i,
        Err(e) => return store_error(&e),
    };
    let secret = match JoinSecret::generate() {
        Ok(s) => s,
        Err(e) => return HttpResponse::error(500, e),
    };
    info.join_secrets
        .insert(role.to_owned(), secret.as_bytes().to_vec());
    if let Err(e) = store.write(Command::SetCluster { info }).await {
        return store_error(&e);
    }
    join_token(store, role).await
}

async fn join_token(store: &Store, role: &str) -> HttpResponse {
    if role != "worker" && role != "manager" {
        return HttpResponse::error(400, format!("unknown role {role:?}: use worker or manager"));
    }
    let read = store
        .read(Consistency::Stale, |s| {
            let c = s.cluster();
            (c.ca_cert_pem.clone(), c.join_secrets.get(role).cloned())
        })
        .await;
    let ((ca_pem, secret), _) = match read {
        Ok(v) => v,
        Err(e) => return store_error(&e),
    };
    let Some(secret) = secret.and_then(|s| <[u8; 16]>::try_from(s.as_slice()).ok()) else {
        return HttpResponse::error(500, "the cluster has no join secret for this role");
    };
    let Some(digest) = CaDigest::of_pem_certificate(&ca_pem) else {
        return HttpResponse::error(500, "the cluster CA certificate is unreadable");
    };
    let token = JoinToken::new(digest, JoinSecret::from_bytes(secret));
    HttpResponse::json(200, &json!({"role": role, "token": token.to_string()}))
}

#[cfg(test)]
mod tests {
    use super::{role_action, rotate_role};

    #[test]
    fn role_paths_parse() {
        assert_eq!(role_action("/v1/nodes/n1/promote"), Some(("n1", true)));
        assert_eq!(role_action("/v1/nodes/n1/demote"), Some(("n1", false)));
        assert_eq!(role_action("/v1/nodes/promote"), None);
        assert_eq!(role_action("/v1/nodes/n1/other"), None);
    }

    #[test]
    fn rotate_paths_parse_without_panicking() {
        assert_eq!(rotate_role("/v1/join-token/worker/rotate"), Some("worker"));
        assert_eq!(rotate_role("/v1/join-token//rotate"), Some(""));
        // Prefix and suffix overlap: this used to slice out of bounds.
        assert_eq!(rotate_role("/v1/join-token/rotate"), None);
        assert_eq!(rotate_role("/v1/join-token/worker"), None);
    }
}
