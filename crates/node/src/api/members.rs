//! The gossip view (`GET /v1/members`) and leaving the cluster (`POST /v1/leave`).

use axum::extract::State;
use axum::{Extension, Json};
use starling_api::{ApiError, Left, Member, MemberList, MemberState, SelfMember};

use super::{Answer, ApiState, Caller, Failure};

/// The gossip members this node knows, with their states and generations.
#[utoipa::path(get, operation_id = "members", path = "/v1/members", tag = "members",
    responses((status = 200, description = "The gossip view", body = MemberList)))]
pub(crate) async fn members(State(state): State<ApiState>) -> Json<MemberList> {
    let node = state.node();
    let members = node
        .gossip
        .members()
        .into_iter()
        .map(|v| Member {
            node: v.id.node,
            addr: v.id.addr.to_string(),
            state: if v.up {
                MemberState::Alive
            } else {
                MemberState::Down
            },
            generation: v.id.generation,
        })
        .collect();
    Json(MemberList {
        me: SelfMember {
            node: node.state.node_id.clone(),
            generation: node.gossip.id().generation,
        },
        members,
    })
}

/// The answering node leaves: a manager is demoted first (through the leader; refused for
/// the last one), then the node leaves gossip and its daemon stops. Only on the node's own
/// control socket.
#[utoipa::path(post, operation_id = "leave", path = "/v1/leave", tag = "members",
    responses(
        (status = 200, description = "The node left", body = Left),
        (status = 403, description = "Asked remotely", body = ApiError),
        (status = 409, description = "The last manager", body = ApiError),
        (status = 503, description = "No quorum or no leader", body = ApiError),
    ))]
pub(crate) async fn leave(
    State(state): State<ApiState>,
    caller: Option<Extension<super::Caller>>,
) -> Answer<Left> {
    if !caller.is_some_and(|Extension(c)| c == Caller::Local) {
        return Err(Failure(ApiError::permission_denied(
            "leave is served only on the node's own control socket",
        )));
    }
    let node = state.node();
    let id = node.state.node_id.clone();
    let demoted = match &node.store {
        Some(store) => {
            super::nodes::role_change(&node, store, &id, false).await?;
            true
        }
        None => false,
    };
    // Leave gossip (managers see it Down at once), then stop the daemon.
    node.gossip.leave_shared().await;
    node.stop.notify_one();
    Ok(Json(Left { left: id, demoted }))
}
