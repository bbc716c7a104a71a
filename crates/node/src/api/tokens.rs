//! Join tokens: `GET /v1/join-token/{role}`, `POST /v1/join-token/{role}/rotate`.

use axum::Json;
use axum::extract::{Path, State};
use starling_api::{ApiError, JoinTokenView, NodeRole};
use starling_raft_store::{Command, Consistency, Store};
use starling_transport::{CaDigest, JoinSecret, JoinToken};

use super::{Answer, ApiState, Failure, store_of};

fn role(text: &str) -> Result<NodeRole, Failure> {
    match text {
        "worker" => Ok(NodeRole::Worker),
        "manager" => Ok(NodeRole::Manager),
        other => Err(Failure(ApiError::invalid(format!(
            "unknown role {other:?}: use worker or manager"
        )))),
    }
}

/// The token that admits a node with `role`.
#[utoipa::path(get, operation_id = "join_token", path = "/v1/join-token/{role}", tag = "tokens",
    params(("role" = String, Path, description = "worker or manager")),
    responses(
        (status = 200, description = "The token", body = JoinTokenView),
        (status = 400, description = "Unknown role", body = ApiError),
        (status = 503, description = "A worker", body = ApiError),
    ))]
pub(crate) async fn show(
    State(state): State<ApiState>,
    Path(role_name): Path<String>,
) -> Answer<JoinTokenView> {
    let role = role(&role_name)?;
    let store = store_of(&state.node())?;
    token(&store, role).await
}

/// Replaces the role's secret: tokens issued before stop working.
#[utoipa::path(post, operation_id = "rotate_join_token", path = "/v1/join-token/{role}/rotate", tag = "tokens",
    params(("role" = String, Path, description = "worker or manager")),
    responses(
        (status = 200, description = "The new token", body = JoinTokenView),
        (status = 400, description = "Unknown role", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn rotate(
    State(state): State<ApiState>,
    Path(role_name): Path<String>,
) -> Answer<JoinTokenView> {
    let role = role(&role_name)?;
    let store = store_of(&state.node())?;
    let secret = JoinSecret::generate().map_err(|e| Failure(ApiError::internal(e)))?;
    store
        .write(Command::SetJoinSecret {
            role: role.to_string(),
            secret: secret.as_bytes().to_vec(),
        })
        .await
        .map_err(super::write_error)?;
    // The answer is the secret just written, not a read of it (a follower may not have
    // applied the write yet).
    let (ca_pem, _) = store
        .read(Consistency::Stale, |s| s.cluster().ca_cert_pem.clone())
        .await?;
    Ok(Json(JoinTokenView {
        role,
        token: JoinToken::new(digest(&ca_pem)?, secret).to_string(),
    }))
}

fn digest(ca_pem: &str) -> Result<CaDigest, Failure> {
    CaDigest::of_pem_certificate(ca_pem).ok_or_else(|| {
        Failure(ApiError::internal(
            "the cluster CA certificate is unreadable",
        ))
    })
}

async fn token(store: &Store, role: NodeRole) -> Answer<JoinTokenView> {
    let name = role.to_string();
    let ((ca_pem, secret), _) = store
        .read(Consistency::Stale, |s| {
            let c = s.cluster();
            (c.ca_cert_pem.clone(), c.join_secrets.get(&name).cloned())
        })
        .await?;
    let secret = secret
        .and_then(|s| <[u8; 16]>::try_from(s.as_slice()).ok())
        .ok_or_else(|| {
            Failure(ApiError::internal(
                "the cluster has no join secret for this role",
            ))
        })?;
    let token = JoinToken::new(digest(&ca_pem)?, JoinSecret::from_bytes(secret));
    Ok(Json(JoinTokenView {
        role,
        token: token.to_string(),
    }))
}
