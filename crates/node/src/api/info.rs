//! `GET /v1/info` and the OpenAPI document.

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use starling_api::{Info, NodeRole, RaftInfo};

use super::ApiState;

/// The node that answers: ids, role, address, version and its view of Raft.
#[utoipa::path(get, operation_id = "info", path = "/v1/info", tag = "info",
    responses((status = 200, description = "The answering node", body = Info)))]
pub(crate) async fn info(State(state): State<ApiState>) -> Json<Info> {
    let node = state.node();
    let raft = node.store.as_ref().map(|st| {
        let s = st.status();
        RaftInfo {
            id: s.id,
            leader: s.leader,
            term: s.term,
            applied: s.applied,
            voters: s.voters.len() as u64,
            last_contact_ms: st.last_contact().map(|d| d.as_millis() as u64),
            stopped: st.stopped(),
        }
    });
    Json(Info {
        node_id: node.state.node_id.clone(),
        cluster_id: node.state.cluster_id.clone(),
        role: if node.state.role == "manager" {
            NodeRole::Manager
        } else {
            NodeRole::Worker
        },
        addr: node.state.advertise.to_string(),
        version: starling_api::VERSION.to_owned(),
        raft,
    })
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, operation_id = "openapi", path = "/v1/openapi.json", tag = "info",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub(crate) async fn openapi_json() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
}
