//! Nodes: list, inspect, promote, demote, availability, remove.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use bytes::Bytes;
use starling_api::{
    ApiError, AvailabilityUpdate, Demoted, ManagerStatus, NodeDetail, NodeList, NodeSummary,
    Promoted, RemoveQuery, Written,
};
use starling_raft_store::{
    ClusterState, Command, Consistency, NodeRecord, NodeRole, NodeStatus, Outcome, Store,
    StoreError,
};

use super::{Answer, ApiState, Failure, store_of};
use crate::daemon::RunningNode;

/// A manager that answered the leader's heartbeats this recently is reachable.
const REACHABLE_WITHIN: Duration = Duration::from_secs(2);

/// The gossip label in which every node publishes its Starling version.
pub(crate) const VERSION_LABEL: &str = "starling.version";

/// The Starling version of every node this one has heard from, by node id: its own, and each
/// gossip record's label.
fn versions(node: &RunningNode) -> BTreeMap<String, String> {
    let catalog = node.gossip.catalog();
    let mut out: BTreeMap<String, String> = catalog
        .digest()
        .into_iter()
        .filter_map(|(id, _)| {
            let version = catalog.record(&id)?.labels.get(VERSION_LABEL)?.clone();
            Some((id, version))
        })
        .collect();
    out.insert(node.state.node_id.clone(), starling_api::VERSION.to_owned());
    out
}

/// Every node, like `docker node ls`: read through the leader; without a quorum, this
/// manager's local state with a `warning`.
#[utoipa::path(get, operation_id = "list_nodes", path = "/v1/nodes", tag = "nodes",
    responses(
        (status = 200, description = "The nodes", body = NodeList),
        (status = 503, description = "A worker", body = ApiError),
    ))]
pub(crate) async fn list(State(state): State<ApiState>) -> Answer<NodeList> {
    let node = state.node();
    let store = store_of(&node)?;
    let read = |s: &ClusterState| s.nodes().cloned().collect::<Vec<_>>();
    let (records, warning) = match store.read(Consistency::Linearizable, read).await {
        Ok((r, _)) => (r, None),
        Err(e @ StoreError::NoQuorum { .. }) => {
            let (r, _) = store.read(Consistency::Stale, read).await?;
            (r, Some(format!("{e}; showing this manager's local state")))
        }
        Err(e) => return Err(e.into()),
    };
    let status = store.status();
    let acks = store.leader_acks().await;
    let up: BTreeSet<String> = node
        .gossip
        .members()
        .into_iter()
        .filter(|v| v.up)
        .map(|v| v.id.node)
        .chain([node.state.node_id.clone()])
        .collect();
    let versions = versions(&node);
    let nodes = records
        .iter()
        .map(|n| {
            let raft_id = status
                .nodes
                .iter()
                .find(|(_, m)| m.name == n.id)
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
            let manager_status = match (&n.role, raft_id) {
                (NodeRole::Manager, Some(id)) if status.leader == Some(id) => {
                    Some(ManagerStatus::Leader)
                }
                (NodeRole::Manager, Some(id)) if !status.voters.contains(&id) => {
                    Some(ManagerStatus::Joining)
                }
                (NodeRole::Manager, Some(id)) if raft_reachable(id) => {
                    Some(ManagerStatus::Reachable)
                }
                (NodeRole::Manager, _) => Some(ManagerStatus::Unreachable),
                (NodeRole::Worker, _) => None,
            };
            NodeSummary {
                id: n.id.clone(),
                hostname: n.hostname.clone(),
                role: n.role.clone().into(),
                status: n.status.clone().into(),
                availability: n.availability.clone().into(),
                manager_status,
                addr: n.addr.clone(),
                version: versions.get(&n.id).cloned().unwrap_or_default(),
            }
        })
        .collect();
    Ok(Json(NodeList { nodes, warning }))
}

async fn record(store: &Store, id: &str) -> Result<NodeRecord, Failure> {
    match store
        .read(Consistency::Linearizable, |s| s.node(id).cloned())
        .await?
    {
        (Some(r), _) => Ok(r),
        (None, rev) => Err(Failure(
            ApiError::not_found(format!("no such node: {id}")).at_revision(rev),
        )),
    }
}

/// One node in detail.
#[utoipa::path(get, operation_id = "inspect_node", path = "/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "The node", body = NodeDetail),
        (status = 404, description = "No such node", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn inspect(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<NodeDetail> {
    let node = state.node();
    let store = store_of(&node)?;
    let n = record(&store, &id).await?;
    let (machine, _) = store
        .read(Consistency::Stale, |s| s.node_description(&id).cloned())
        .await?;
    Ok(Json(NodeDetail {
        machine: machine.map(|d| starling_api::NodeMachine {
            memory_bytes: d.memory_bytes,
            nano_cpus: d.nano_cpus,
            port_min: d.port_min,
            port_max: d.port_max,
            isolation: d.isolation,
        }),
        version: versions(&node).get(&n.id).cloned().unwrap_or_default(),
        id: n.id,
        hostname: n.hostname,
        role: n.role.into(),
        desired_role: n.desired_role.into(),
        status: n.status.into(),
        availability: n.availability.into(),
        addr: n.addr,
        labels: n.labels,
        cert_serial: n.cert_serial,
        cert_not_after: n.cert_not_after,
        cert_ca: n.cert_ca,
        record_version: n.version,
        created_revision: n.created_revision,
        updated_revision: n.updated_revision,
    }))
}

/// Sets a node's availability. The body is `{"availability": "active|pause|drain"}` (the
/// bare word is accepted too).
#[utoipa::path(put, operation_id = "set_node_availability", path = "/v1/nodes/{id}/availability", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    request_body = AvailabilityUpdate,
    responses(
        (status = 200, description = "Written", body = Written),
        (status = 400, description = "Not an availability", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn availability(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<Written> {
    let availability = match serde_json::from_slice::<AvailabilityUpdate>(&body) {
        Ok(u) => u.availability,
        Err(json_error) => match std::str::from_utf8(&body) {
            Ok(word) if !word.trim_start().starts_with('{') => word.parse()?,
            _ => {
                return Err(Failure(ApiError::invalid(format!(
                    "body must be {{\"availability\": \"active|pause|drain\"}}: {json_error}"
                ))));
            }
        },
    };
    let store = store_of(&state.node())?;
    record(&store, &id).await?;
    let r = store
        .write(Command::SetNodeAvailability {
            id,
            availability: availability.into(),
        })
        .await
        .map_err(super::write_error)?;
    Ok(Json(Written {
        revision: r.revision,
    }))
}

/// Adds and removes node labels (`node update --label-add/--label-rm`), which placement
/// constraints and preferences read.
#[utoipa::path(put, operation_id = "set_node_labels", path = "/v1/nodes/{id}/labels", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    request_body = starling_api::LabelChange,
    responses(
        (status = 200, description = "Written", body = Written),
        (status = 400, description = "Not a label change", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn labels(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<Written> {
    let change: starling_api::LabelChange = super::services::parse(
        &body,
        "label change ({\"add\": {\"k\": \"v\"}, \"remove\": [\"k\"]})",
    )?;
    if let Some(bad) = change
        .add
        .keys()
        .chain(&change.remove)
        .find(|k| k.is_empty())
    {
        return Err(Failure(ApiError::invalid(format!(
            "label name {bad:?} is empty"
        ))));
    }
    let store = store_of(&state.node())?;
    record(&store, &id).await?;
    let r = store
        .write(Command::SetNodeLabels {
            id,
            add: change.add,
            remove: change.remove,
        })
        .await
        .map_err(super::write_error)?;
    Ok(Json(Written {
        revision: r.revision,
    }))
}

/// Removes a node from the cluster and revokes it (refused by every manager from then on).
/// A node that is not down needs `force`; a manager must be demoted first.
#[utoipa::path(delete, operation_id = "remove_node", path = "/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "Node id"), RemoveQuery),
    responses(
        (status = 200, description = "Removed", body = Written),
        (status = 400, description = "Bad query", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 409, description = "Not down, or a manager", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn remove(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Answer<Written> {
    let store = store_of(&state.node())?;
    let n = record(&store, &id).await?;
    if n.status != NodeStatus::Down && !q.force.unwrap_or(false) {
        let status: starling_api::NodeStatus = n.status.into();
        return Err(Failure(ApiError::conflict(format!(
            "node {id} is {status} (not down): use --force to remove it anyway"
        ))));
    }
    if n.role == NodeRole::Manager {
        return Err(Failure(ApiError::conflict(format!(
            "node {id} is a manager: demote it first (managers are never removed from the voter set implicitly)"
        ))));
    }
    // One entry removes the record and revokes the id; it refuses a node that became (or
    // is becoming) a manager since the checks above.
    let r = store
        .write(Command::RemoveNode { id: id.clone() })
        .await
        .map_err(super::write_error)?;
    match r.outcome {
        Outcome::NodeIsManager { .. } => Err(Failure(ApiError::conflict(format!(
            "node {id} is a manager or being promoted: demote it first"
        )))),
        Outcome::NoSuchNode { .. } => {
            Err(Failure(ApiError::not_found(format!("no such node: {id}"))))
        }
        _ => Ok(Json(Written {
            revision: r.revision,
        })),
    }
}

/// Makes a worker a manager: it picks up a manager certificate and joins the Raft group.
#[utoipa::path(post, operation_id = "promote_node", path = "/v1/nodes/{id}/promote", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Recorded", body = Promoted),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 409, description = "Already a manager", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn promote(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<Promoted> {
    let node = state.node();
    let store = store_of(&node)?;
    let revision = role_change(&node, &store, &id, true).await?;
    Ok(Json(Promoted {
        revision: revision.unwrap_or_default(),
        promoted: id,
    }))
}

/// Makes a manager a worker, through the leader (which hands leadership over first if it
/// is the one demoted); the last manager cannot be demoted.
#[utoipa::path(post, operation_id = "demote_node", path = "/v1/nodes/{id}/demote", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Demoted", body = Demoted),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such node", body = ApiError),
        (status = 409, description = "Not a manager, or the last one", body = ApiError),
        (status = 503, description = "No quorum, no leader, or a worker", body = ApiError),
    ))]
pub(crate) async fn demote(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<Demoted> {
    let node = state.node();
    let store = store_of(&node)?;
    role_change(&node, &store, &id, false).await?;
    Ok(Json(Demoted { demoted: id }))
}

/// Promotion records the wish (the node picks up a manager certificate on its next renewal
/// and joins the Raft group); demotion goes through the leader, which takes the node out of
/// the Raft group first (handing leadership over if it is the node itself). Returns the
/// revision of a promotion.
pub(crate) async fn role_change(
    node: &RunningNode,
    store: &Store,
    id: &str,
    promote: bool,
) -> Result<Option<u64>, Failure> {
    use crate::join::{JoinReply, JoinRequest, call, demote_on_leader, join_protocol};
    let record = record(store, id).await?;
    if promote {
        if record.role == NodeRole::Manager {
            return Err(Failure(ApiError::conflict(format!(
                "node {id} is already a manager"
            ))));
        }
        let r = store
            .write(Command::SetNodeRole {
                id: id.to_owned(),
                role: record.role,
                desired_role: NodeRole::Manager,
            })
            .await
            .map_err(super::write_error)?;
        return Ok(Some(r.revision));
    }
    if record.role != NodeRole::Manager && record.desired_role == NodeRole::Manager {
        // A promotion that has not happened yet (the node never picked up its manager
        // certificate, or is down): demoting cancels it, releasing any Raft id it was given.
        store
            .write(Command::RetireManager {
                node: id.to_owned(),
            })
            .await
            .map_err(super::write_error)?;
        return Ok(None);
    }
    if record.role != NodeRole::Manager {
        return Err(Failure(ApiError::conflict(format!(
            "node {id} is not a manager"
        ))));
    }
    // Without a quorum there is no leader to run the change: say so, with the count.
    store.read(Consistency::Linearizable, |_| ()).await?;
    let protocol = join_protocol().map_err(|e| Failure(ApiError::internal(e)))?;
    for _ in 0..20 {
        let status = store.status();
        let reply = if status.is_leader {
            demote_on_leader(store, id).await
        } else {
            let leader = status.leader.and_then(|l| {
                status
                    .nodes
                    .iter()
                    .find(|(i, _)| *i == l)
                    .map(|(_, n)| n.clone())
            });
            match leader {
                Some(n) => {
                    let (Ok(leader_id), Ok(addr)) = (
                        starling_transport::NodeId::new(n.name.clone()),
                        n.addr.parse(),
                    ) else {
                        return Err(Failure(ApiError::internal(format!(
                            "the leader's record is unreadable: {} at {}",
                            n.name, n.addr
                        ))));
                    };
                    match node.endpoint.connect(&protocol, &leader_id, addr).await {
                        Ok(conn) => match call(
                            &conn,
                            &JoinRequest::Demote {
                                node_id: id.to_owned(),
                            },
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(e) => {
                                return Err(Failure(ApiError::new(
                                    starling_api::ErrorCode::OutcomeUnknown,
                                    format!("the leader did not answer the demotion: {e}"),
                                )));
                            }
                        },
                        // Not sent: the leader may be changing; ask again.
                        Err(_) => JoinReply::NotLeader { leader: None },
                    }
                }
                None => JoinReply::NotLeader { leader: None },
            }
        };
        match reply {
            JoinReply::Demoted => return Ok(None),
            JoinReply::NotLeader { .. } | JoinReply::MembershipBusy => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            JoinReply::Refused(why) => return Err(Failure(ApiError::conflict(why))),
            JoinReply::Unavailable(why) => {
                return Err(Failure(ApiError::new(
                    starling_api::ErrorCode::OutcomeUnknown,
                    format!("the demotion did not finish ({why}): run it again to complete it"),
                )));
            }
            other => {
                return Err(Failure(ApiError::internal(format!(
                    "unexpected answer: {other:?}"
                ))));
            }
        }
    }
    Err(Failure(ApiError::unavailable(
        "no leader completed the demotion: the leader kept changing",
    )))
}
