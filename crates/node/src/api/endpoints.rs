//! `GET /v1/services/{name}/endpoints`: a service's endpoints from the answering node's own
//! gossip state — served by every node, workers included, with or without a quorum — as a
//! Consul-style blocking query (`index` from the last answer, `wait` seconds).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use starling_api::{EndpointList, EndpointView};

use super::ApiState;

/// `?passing=&index=&wait=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct EndpointsQuery {
    /// Only endpoints DNS would serve: healthy, on nodes not suspected.
    #[serde(default)]
    passing: bool,
    /// The `index` of an earlier answer: wait until the list differs from it.
    index: Option<u64>,
    /// Seconds to wait for a change (default 30, capped by the node's `--watch-wait-max`).
    wait: Option<u64>,
}

fn list(state: &ApiState, name: &str, passing: bool) -> EndpointList {
    let node = state.node();
    let mut endpoints: Vec<EndpointView> = node
        .gossip
        .endpoints(name)
        .into_iter()
        .filter(|(_, e, suspected)| {
            !passing || (!suspected && e.health == starling_gossip::Health::Healthy)
        })
        .map(|(node, e, suspected)| EndpointView {
            service: e.service,
            task: e.task,
            slot: e.slot,
            node,
            addr: e.addr,
            ports: e.ports,
            health: match e.health {
                starling_gossip::Health::Healthy => "healthy",
                starling_gossip::Health::Unhealthy => "unhealthy",
                starling_gossip::Health::Starting => "starting",
                starling_gossip::Health::Draining => "draining",
            }
            .to_owned(),
            suspected,
        })
        .collect();
    endpoints.sort_by(|a, b| (&a.node, &a.task).cmp(&(&b.node, &b.task)));
    // The index is the list's own fingerprint: the same list, the same index, on any node.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serde_json::to_vec(&endpoints).unwrap_or_default() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    EndpointList {
        index: h.max(1),
        endpoints,
    }
}

/// A service's endpoints as this node's gossip state has them (every node answers).
#[utoipa::path(get, operation_id = "service_endpoints", path = "/v1/services/{id}/endpoints", tag = "services",
    params(("id" = String, Path, description = "Service name"), EndpointsQuery),
    responses((status = 200, description = "The endpoints (empty when none runs)", body = EndpointList)))]
pub(crate) async fn endpoints(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<EndpointsQuery>,
) -> Json<EndpointList> {
    let mut now = list(&state, &name, q.passing);
    let Some(index) = q.index.filter(|i| *i == now.index) else {
        return Json(now);
    };
    let wait = Duration::from_secs(q.wait.unwrap_or(30)).min(state.max_watch_wait());
    let deadline = tokio::time::Instant::now() + wait;
    let mut events = state.node().gossip.subscribe();
    while now.index == index && tokio::time::Instant::now() < deadline {
        // A catalog or membership event, or every 200 ms (suspicion comes and goes without
        // one).
        let tick = (tokio::time::Instant::now() + Duration::from_millis(200)).min(deadline);
        let _ = tokio::time::timeout_at(tick, events.recv()).await;
        now = list(&state, &name, q.passing);
    }
    Json(now)
}
