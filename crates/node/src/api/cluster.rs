//! The cluster's identity and settings: `GET /v1/cluster`, `PATCH /v1/cluster`.

use axum::Json;
use axum::extract::State;
use starling_api::{
    ApiError, CaRotationView, ClusterSettings, ClusterUpdate, ClusterView, MAX_CERT_EXPIRY_SECS,
    MAX_CERT_GRACE_SECS, MIN_AUTOPILOT_DEAD_AFTER_SECS, MIN_CERT_EXPIRY_SECS,
};
use starling_raft_store::{ClusterState, Command, Consistency, SettingsChange};
use starling_transport::CaDigest;

use super::{Answer, ApiState, Failure, store_of};

/// A shorter floor for certificate lifetimes, for tests that watch renewals happen (set by
/// `main` from the hidden `STARLING_TEST_MIN_CERT_EXPIRY_SECS`, logged as a warning when
/// used; never by a flag).
pub static TEST_MIN_CERT_EXPIRY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn view(state: &ClusterState) -> ClusterView {
    let info = state.cluster();
    let ca_digest = CaDigest::of_pem_certificate(&info.ca_cert_pem)
        .map(|d| d.to_string())
        .unwrap_or_default();
    let ca_rotation = info.rotation.as_ref().map(|r| {
        let p = starling_manager::ca_rotation::progress(state.nodes(), &r.new_digest);
        CaRotationView {
            new_ca_digest: r.new_digest.clone(),
            started_at: r.started_at,
            nodes_on_new_root: p.on_new_root,
            nodes_pending: p.pending,
            nodes_down: p.down,
        }
    });
    ClusterView {
        cluster_id: info.cluster_id.clone(),
        ca_digest,
        ca_rotation,
        settings: ClusterSettings {
            cert_expiry_secs: info.settings.cert_lifetime_secs,
            cert_grace_secs: info.settings.cert_grace_secs,
            autopilot_cleanup_dead_managers: info.settings.autopilot.cleanup_dead_managers,
            autopilot_min_managers: info.settings.autopilot.min_managers,
            autopilot_dead_after_secs: info.settings.autopilot.dead_after_secs,
            autopilot_promote_constraints: info
                .settings
                .autopilot
                .promote_constraints
                .iter()
                .map(starling_manager::constraint_text)
                .collect(),
        },
    }
}

/// The cluster's id, CA digest and settings.
#[utoipa::path(get, operation_id = "cluster", path = "/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The cluster", body = ClusterView),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn inspect(State(state): State<ApiState>) -> Answer<ClusterView> {
    let store = store_of(&state.node())?;
    let (view, _) = store.read(Consistency::Linearizable, view).await?;
    Ok(Json(view))
}

/// Changes cluster settings. A new certificate lifetime applies to certificates issued from
/// then on; each node moves to it at its next renewal.
#[utoipa::path(patch, operation_id = "update_cluster", path = "/v1/cluster", tag = "cluster",
    request_body = ClusterUpdate,
    responses(
        (status = 200, description = "The cluster with its new settings", body = ClusterView),
        (status = 400, description = "A setting out of range", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn update(
    State(state): State<ApiState>,
    Json(req): Json<ClusterUpdate>,
) -> Answer<ClusterView> {
    let change = check(&req).map_err(|e| Failure(ApiError::invalid(e)))?;
    let store = store_of(&state.node())?;
    store
        .write(Command::UpdateSettings { change })
        .await
        .map_err(super::write_error)?;
    let (view, _) = store.read(Consistency::Linearizable, view).await?;
    Ok(Json(view))
}

/// Starts a root CA rotation: a new root is created and cross-signed by the current one;
/// every node renews onto it (nodes down meanwhile renew when they return); when every node
/// not down is on it, the old root is dropped and the join tokens change. Follow it with
/// `GET /v1/cluster`.
#[utoipa::path(post, operation_id = "rotate_ca", path = "/v1/cluster/ca/rotate", tag = "cluster",
    responses(
        (status = 200, description = "The cluster with the rotation under way", body = ClusterView),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 409, description = "A rotation is already under way", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn rotate_ca(State(state): State<ApiState>) -> Answer<ClusterView> {
    let store = store_of(&state.node())?;
    let ((info, behind), _) = store
        .read(Consistency::Linearizable, |s| {
            let current = CaDigest::of_pem_certificate(&s.cluster().ca_cert_pem)
                .map(|d| d.to_string())
                .unwrap_or_default();
            let behind: Vec<String> = s
                .nodes()
                .filter(|n| !n.cert_ca.is_empty() && n.cert_ca != current)
                .map(|n| format!("{} ({})", n.id, n.hostname))
                .collect();
            (s.cluster().clone(), behind)
        })
        .await?;
    // A node still on the root the last rotation replaced renews with it only while the
    // cluster keeps that root; another rotation would forget it.
    if info.rotation.is_none() && !behind.is_empty() {
        return Err(Failure(ApiError::conflict(format!(
            "nodes still hold certificates of the root the last rotation replaced: {}; bring \
             them back so they renew, or remove them (`starling node rm`), before rotating again",
            behind.join(", ")
        ))));
    }
    if let Some(r) = &info.rotation {
        return Err(Failure(ApiError::conflict(format!(
            "a root CA rotation to {} is already under way; follow it with `starling ca status`",
            r.new_digest
        ))));
    }
    let rotation = crate::rotation::new_root(&info).map_err(|e| Failure(ApiError::internal(e)))?;
    let result = store
        .write(Command::StartCaRotation { rotation })
        .await
        .map_err(super::write_error)?;
    if let starling_raft_store::Outcome::CaRotation { why } = result.outcome {
        return Err(Failure(ApiError::conflict(why)));
    }
    let (view, _) = store.read(Consistency::Linearizable, view).await?;
    Ok(Json(view))
}

/// Whether `secs` is an acceptable lifetime for node certificates: between an hour (or the
/// test floor) and ten years.
pub fn check_cert_expiry(secs: u64) -> Result<(), String> {
    let floor = TEST_MIN_CERT_EXPIRY
        .get()
        .copied()
        .unwrap_or(MIN_CERT_EXPIRY_SECS);
    if !(floor..=MAX_CERT_EXPIRY_SECS).contains(&secs) {
        return Err(format!(
            "a certificate lifetime must be between {floor} s (1 hour) and {MAX_CERT_EXPIRY_SECS} s (10 years), not {secs} s"
        ));
    }
    Ok(())
}

/// The change `req` asks for, if every value is in range.
fn check(req: &ClusterUpdate) -> Result<SettingsChange, String> {
    if let Some(e) = req.cert_expiry_secs {
        check_cert_expiry(e)?;
    }
    if let Some(m) = req.autopilot_min_managers
        && !(1..=9).contains(&m)
    {
        return Err(format!(
            "autopilot_min_managers must be between 1 and 9, not {m}"
        ));
    }
    if let Some(d) = req.autopilot_dead_after_secs
        && !(MIN_AUTOPILOT_DEAD_AFTER_SECS..=30 * 86_400).contains(&d)
    {
        return Err(format!(
            "autopilot_dead_after_secs must be between {MIN_AUTOPILOT_DEAD_AFTER_SECS} and 2592000 (30 days), not {d}"
        ));
    }
    let constraints = match &req.autopilot_promote_constraints {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|c| starling_api::parse_constraint(c))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    if let Some(g) = req.cert_grace_secs
        && g > MAX_CERT_GRACE_SECS
    {
        return Err(format!(
            "cert_grace_secs must be at most {MAX_CERT_GRACE_SECS} (one year), not {g}"
        ));
    }
    let change = SettingsChange {
        cert_lifetime_secs: req.cert_expiry_secs,
        cert_grace_secs: req.cert_grace_secs,
        autopilot_cleanup_dead_managers: req.autopilot_cleanup_dead_managers,
        autopilot_min_managers: req.autopilot_min_managers,
        autopilot_dead_after_secs: req.autopilot_dead_after_secs,
        autopilot_promote_constraints: constraints,
    };
    if change.is_empty() {
        return Err("nothing to change: give at least one setting".into());
    }
    Ok(change)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_refused() {
        let ok = |e, g| {
            check(&ClusterUpdate {
                cert_expiry_secs: e,
                cert_grace_secs: g,
                ..ClusterUpdate::default()
            })
        };
        assert!(ok(Some(3600), None).is_ok());
        assert!(ok(None, Some(0)).is_ok());
        assert!(ok(Some(90 * 86_400), Some(30 * 86_400)).is_ok());
        assert!(ok(Some(59), None).unwrap_err().contains("between 3600 s"));
        assert!(ok(Some(u64::MAX), None).is_err());
        assert!(ok(None, Some(MAX_CERT_GRACE_SECS + 1)).is_err());
        assert!(ok(None, None).unwrap_err().contains("nothing to change"));
        let autopilot = |min, dead, constraints: Option<Vec<&str>>| {
            check(&ClusterUpdate {
                autopilot_cleanup_dead_managers: Some(true),
                autopilot_min_managers: min,
                autopilot_dead_after_secs: dead,
                autopilot_promote_constraints: constraints
                    .map(|c| c.into_iter().map(str::to_owned).collect()),
                ..ClusterUpdate::default()
            })
        };
        let change = autopilot(Some(3), Some(600), Some(vec!["node.labels.zone==a"])).unwrap();
        assert_eq!(change.autopilot_promote_constraints.unwrap().len(), 1);
        assert!(autopilot(Some(0), None, None).is_err());
        assert!(autopilot(Some(10), None, None).is_err());
        assert!(autopilot(None, Some(1), None).is_err());
        assert!(autopilot(None, None, Some(vec!["zone=a"])).is_err());
    }
}
