//! API client certificates: `POST /v1/certs` signs a CSR (the key stays with the client),
//! `GET /v1/certs` lists them, `DELETE /v1/certs/{name}` revokes one (every manager's
//! endpoint refuses it from then on).

use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, State};
use starling_api::{
    ApiError, CertRequest, ClientList, ClientView, IssuedCert, ManagerAddr, decode_bytes,
};
use starling_raft_store::{ClientRecord, Command, Consistency, Outcome};
use starling_transport::{CertOptions, ClusterCa, NodeId, PeerIdentity, Role};

use super::{Answer, ApiState, Failure, store_of};

/// Client certificates live this long unless asked otherwise.
pub(crate) const DEFAULT_CLIENT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The longest lifetime a client certificate may be given.
pub(crate) const MAX_CLIENT_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// Signs a client certificate for the CSR's key, with role admin or viewer, and records it.
#[utoipa::path(post, operation_id = "issue_cert", path = "/v1/certs", tag = "certs",
    request_body = CertRequest,
    responses(
        (status = 200, description = "The certificate and what a context needs", body = IssuedCert),
        (status = 400, description = "Bad name, CSR or lifetime", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 409, description = "A client of that name exists", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn issue(
    State(state): State<ApiState>,
    Json(req): Json<CertRequest>,
) -> Answer<IssuedCert> {
    starling_api::check_name(&req.name).map_err(|e| Failure(ApiError::invalid(e)))?;
    let lifetime = req
        .lifetime_secs
        .map_or(DEFAULT_CLIENT_LIFETIME, Duration::from_secs);
    if lifetime < Duration::from_secs(60) || lifetime > MAX_CLIENT_LIFETIME {
        return Err(Failure(ApiError::invalid(format!(
            "lifetime must be between 60 s and {} days",
            MAX_CLIENT_LIFETIME.as_secs() / 86_400
        ))));
    }
    let csr = decode_bytes(&req.csr_base64)?;
    let node = state.node();
    let store = store_of(&node)?;
    let ((info, existing), _) = store
        .read(Consistency::Linearizable, |s| {
            (
                s.cluster().clone(),
                s.system()
                    .clients
                    .get(&req.name)
                    .is_some_and(|c| !c.revoked),
            )
        })
        .await?;
    if existing {
        return Err(Failure(ApiError::conflict(format!(
            "a client named {:?} exists: revoke it first (starling cert revoke {})",
            req.name, req.name
        ))));
    }
    // The root that signs now: the new one during a root rotation, so the certificate
    // outlives the rotation's end.
    let (ca_cert_pem, ca_key_pem) = info.signing_ca_pem();
    let ca =
        ClusterCa::from_pem(ca_cert_pem, ca_key_pem).map_err(|e| Failure(ApiError::internal(e)))?;
    let ca_pem = ca_cert_pem.to_owned();
    let id = crate::datadir::random_id().map_err(|e| Failure(ApiError::internal(e)))?;
    let node_id = NodeId::new(id.clone()).map_err(|e| Failure(ApiError::internal(e)))?;
    let role = Role::new(req.role.as_str()).map_err(|e| Failure(ApiError::internal(e)))?;
    let opts = CertOptions {
        lifetime,
        ..CertOptions::default()
    };
    let cert = ca
        .sign_csr(&csr, &node_id, &role, &opts)
        .map_err(|e| Failure(ApiError::invalid(format!("cannot sign the CSR: {e}"))))?;
    let identity =
        PeerIdentity::from_certificate(&cert).map_err(|e| Failure(ApiError::internal(e)))?;
    let not_after = identity
        .not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let r = store
        .write(Command::AddClient {
            client: ClientRecord {
                name: req.name.clone(),
                id,
                role: req.role.into(),
                cert_serial: identity.serial.to_string(),
                not_after,
                revoked: false,
                created_revision: 0,
            },
        })
        .await
        .map_err(super::write_error)?;
    let client = match r.outcome {
        Outcome::Client { client } => client,
        Outcome::ClientExists { name } => {
            return Err(Failure(ApiError::conflict(format!(
                "a client named {name:?} exists: revoke it first"
            ))));
        }
        other => {
            return Err(Failure(ApiError::internal(format!(
                "unexpected outcome: {other:?}"
            ))));
        }
    };
    Ok(Json(IssuedCert {
        client: ClientView::from(&client),
        cert_pem: starling_api::certificate_pem(&cert),
        ca_pem,
        cluster_id: info.cluster_id,
        managers: store
            .status()
            .nodes
            .into_iter()
            .map(|(_, n)| ManagerAddr {
                node_id: n.name,
                addr: n.addr,
            })
            .collect(),
    }))
}

/// The API clients the cluster issued certificates to, revoked ones included.
#[utoipa::path(get, operation_id = "list_certs", path = "/v1/certs", tag = "certs",
    responses(
        (status = 200, description = "The clients", body = ClientList),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn list(State(state): State<ApiState>) -> Answer<ClientList> {
    let store = store_of(&state.node())?;
    let (clients, _) = store
        .read(Consistency::Linearizable, |s| {
            s.system()
                .clients
                .values()
                .map(ClientView::from)
                .collect::<Vec<_>>()
        })
        .await?;
    Ok(Json(ClientList { clients }))
}

/// Revokes an API client: every manager refuses its certificate from then on.
#[utoipa::path(delete, operation_id = "revoke_cert", path = "/v1/certs/{name}", tag = "certs",
    params(("name" = String, Path, description = "The client's name")),
    responses(
        (status = 200, description = "Revoked", body = ClientView),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such client", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn revoke(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Answer<ClientView> {
    let store = store_of(&state.node())?;
    let r = store
        .write(Command::RevokeClient { name })
        .await
        .map_err(super::write_error)?;
    match r.outcome {
        Outcome::Client { client } => Ok(Json(ClientView::from(&client))),
        Outcome::NoSuchClient { name } => Err(Failure(ApiError::not_found(format!(
            "no such client: {name}"
        )))),
        other => Err(Failure(ApiError::internal(format!(
            "unexpected outcome: {other:?}"
        )))),
    }
}
