//! Services and their tasks: create, list, inspect, update, scale, remove; `GET /v1/tasks`.

use axum::Json;
use axum::extract::{Path, Query, State};
use bytes::Bytes;
use serde::Deserialize;
use starling_api::{
    ApiError, ScaleRequest, ServiceList, ServiceSpec, ServiceView, TaskList, TaskView,
};
use starling_raft_store::{ClusterState, Command, Consistency, Store};
use starling_state::{Outcome, Service, ServiceMode, TaskState, node_schedulable};

use super::{Answer, ApiState, Failure, store_of};

/// A JSON body, or `invalid_argument` naming what it should have been.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes, what: &str) -> Result<T, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure(ApiError::invalid(format!("the body is not a {what}: {e}"))))
}

/// The service `key` names: its id, its name, or a unique prefix of its id.
pub(crate) fn find<'a>(s: &'a ClusterState, key: &str) -> Result<&'a Service, ApiError> {
    match s.service(key).or_else(|| s.service_by_name(key)) {
        Some(svc) => Ok(svc),
        None => by_prefix(key, "service", s.services(), |svc| &svc.id),
    }
}

/// The one item whose id starts with `key` (ids are typed abbreviated, as Docker's are).
pub(crate) fn by_prefix<'a, T: 'a>(
    key: &str,
    kind: &str,
    items: impl Iterator<Item = &'a T>,
    id: impl Fn(&T) -> &str,
) -> Result<&'a T, ApiError> {
    let mut matches = items.filter(|t| id(t).starts_with(key));
    match (matches.next(), matches.next()) {
        (Some(t), None) if !key.is_empty() => Ok(t),
        (Some(_), Some(_)) => Err(ApiError::conflict(format!(
            "{key:?} is the prefix of more than one {kind} id"
        ))),
        _ => Err(ApiError::not_found(format!("no such {kind}: {key}"))),
    }
}

/// The view of a service, with how many of its tasks run and how many it wants.
fn view(s: &ClusterState, svc: &Service) -> ServiceView {
    let running = s
        .tasks_of(&svc.id)
        .filter(|t| t.status.state == TaskState::Running && t.desired <= TaskState::Running)
        .count() as u32;
    let desired = match svc.spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::Global => s
            .nodes()
            .filter(|n| {
                node_schedulable(n)
                    && starling_manager::constraints_hold(&svc.spec.task.placement, n)
            })
            .count() as u32,
    };
    ServiceView {
        id: svc.id.clone(),
        spec: ServiceSpec::from_state(&svc.spec),
        version: svc.version,
        spec_version: svc.spec_version,
        previous_spec: svc.previous_spec.as_ref().map(ServiceSpec::from_state),
        update_status: svc
            .update_status
            .as_ref()
            .map(starling_api::UpdateStatusView::from_state),
        running,
        desired,
        created_at: svc.created_at,
        updated_at: svc.updated_at,
    }
}

/// The outcome of a service write as an answer.
async fn answer(store: &Store, outcome: Outcome) -> Answer<ServiceView> {
    match outcome {
        Outcome::Service { service } => {
            let (v, _) = store
                .read(Consistency::Stale, |s| view(s, &service))
                .await?;
            Ok(Json(v))
        }
        Outcome::NoSuchService { id } => Err(Failure(ApiError::not_found(format!(
            "no such service: {id}"
        )))),
        Outcome::ServiceNameTaken { name } => Err(Failure(ApiError::conflict(format!(
            "a service named {name:?} exists"
        )))),
        Outcome::ServiceVersionConflict { current } => Err(Failure(ApiError::conflict(format!(
            "the service changed meanwhile (now at version {current}); read it and try again"
        )))),
        Outcome::InvalidSpec { why } => Err(Failure(ApiError::invalid(why))),
        other => Err(Failure(ApiError::internal(format!(
            "unexpected outcome: {other:?}"
        )))),
    }
}

/// Every service, like `docker service ls`.
#[utoipa::path(get, operation_id = "list_services", path = "/v1/services", tag = "services",
    responses(
        (status = 200, description = "The services", body = ServiceList),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn list(State(state): State<ApiState>) -> Answer<ServiceList> {
    let store = store_of(&state.node())?;
    let (mut services, _) = store
        .read(Consistency::Linearizable, |s| {
            s.services().map(|svc| view(s, svc)).collect::<Vec<_>>()
        })
        .await?;
    services.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    Ok(Json(ServiceList { services }))
}

/// One service (by id, name or id prefix).
#[utoipa::path(get, operation_id = "inspect_service", path = "/v1/services/{id}", tag = "services",
    params(("id" = String, Path, description = "Service id, name or id prefix")),
    responses(
        (status = 200, description = "The service", body = ServiceView),
        (status = 404, description = "No such service", body = ApiError),
        (status = 409, description = "An ambiguous prefix", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn inspect(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<ServiceView> {
    let store = store_of(&state.node())?;
    let (v, _) = store
        .read(Consistency::Linearizable, |s| {
            find(s, &id).map(|svc| view(s, svc))
        })
        .await?;
    Ok(Json(v.map_err(Failure)?))
}

/// Creates a service; its tasks are placed and started as the cluster gets to them.
#[utoipa::path(post, operation_id = "create_service", path = "/v1/services", tag = "services",
    params(ResolveQuery),
    request_body = ServiceSpec,
    responses(
        (status = 200, description = "Created", body = ServiceView),
        (status = 400, description = "An invalid spec", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 409, description = "The name is taken", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
        (status = 504, description = "Outcome unknown", body = ApiError),
    ))]
pub(crate) async fn create(
    State(state): State<ApiState>,
    Query(q): Query<ResolveQuery>,
    body: Bytes,
) -> Answer<ServiceView> {
    let spec: ServiceSpec = parse(&body, "service spec")?;
    let spec = spec.to_state().map_err(|e| Failure(ApiError::invalid(e)))?;
    if q.resolve_program.unwrap_or(true) {
        resolve(&spec.task.process)?;
    }
    let store = store_of(&state.node())?;
    let per_task = spec.task.ports.len();
    if let (starling_state::ServiceMode::Replicated { replicas }, true) = (&spec.mode, per_task > 0)
    {
        let (room, _) = store
            .read(Consistency::Linearizable, |s| {
                starling_manager::port_capacity(s, &spec.task.placement, per_task)
            })
            .await?;
        if u64::from(*replicas) > room {
            return Err(Failure(ApiError::invalid(format!(
                "port range exhausted: {replicas} tasks of {per_task} host port(s) each, the nodes' free ports hold {room} (widen their --task-ports range)"
            ))));
        }
    }
    let r = store
        .write(Command::CreateService {
            spec,
            at: starling_api::unix_ms(),
        })
        .await
        .map_err(super::write_error)?;
    answer(&store, r.outcome).await
}

/// `?resolve_program=false` on a create.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct ResolveQuery {
    /// Refuse a program this manager cannot find (default `true`; `false` when it exists only
    /// on the workers).
    resolve_program: Option<bool>,
}

/// `?version=N` on an update.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct VersionQuery {
    /// Apply only if the service is at this version.
    version: Option<u64>,
    /// Refuse a new program this manager cannot find (default `true`).
    resolve_program: Option<bool>,
}

/// A program the managers' own machine cannot find is most likely a typo: refused before
/// anything is written, in one line (as docker refuses an image it cannot resolve).
fn resolve(p: &starling_state::ProcessSpec) -> Result<(), Failure> {
    let program = p.argv.first().map_or("", String::as_str);
    let cwd = p.cwd.as_deref().map(std::path::Path::new);
    starling_agent::exec::resolve_program(program, &starling_agent::exec::task_path(&p.env), cwd)
        .map(drop)
        .map_err(|why| {
            Failure(ApiError::invalid(format!(
                "{why} on this manager (resolve_program=false, or --no-resolve-program, if it exists only on the workers)"
            )))
        })
}

/// Replaces a service's spec; tasks of an older template are replaced one at a time.
#[utoipa::path(put, operation_id = "update_service", path = "/v1/services/{id}", tag = "services",
    params(("id" = String, Path, description = "Service id, name or id prefix"), VersionQuery),
    request_body = ServiceSpec,
    responses(
        (status = 200, description = "Updated", body = ServiceView),
        (status = 400, description = "An invalid spec", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such service", body = ApiError),
        (status = 409, description = "Changed meanwhile, or the name is taken", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
        (status = 504, description = "Outcome unknown", body = ApiError),
    ))]
pub(crate) async fn update(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<VersionQuery>,
    body: Bytes,
) -> Answer<ServiceView> {
    let spec: ServiceSpec = parse(&body, "service spec")?;
    let spec = spec.to_state().map_err(|e| Failure(ApiError::invalid(e)))?;
    let store = store_of(&state.node())?;
    let (found, _) = store
        .read(Consistency::Linearizable, |s| {
            find(s, &id).map(|svc| (svc.id.clone(), svc.spec.task.process.argv.first().cloned()))
        })
        .await?;
    let (found, program) = found.map_err(Failure)?;
    if q.resolve_program.unwrap_or(true) && program.as_ref() != spec.task.process.argv.first() {
        resolve(&spec.task.process)?;
    }
    let r = store
        .write(Command::UpdateService {
            id: found,
            spec,
            expected_version: q.version.unwrap_or(0),
            at: starling_api::unix_ms(),
        })
        .await
        .map_err(super::write_error)?;
    answer(&store, r.outcome).await
}

/// Sets a replicated service's number of tasks.
#[utoipa::path(post, operation_id = "scale_service", path = "/v1/services/{id}/scale", tag = "services",
    params(("id" = String, Path, description = "Service id, name or id prefix")),
    request_body = ScaleRequest,
    responses(
        (status = 200, description = "Scaled", body = ServiceView),
        (status = 400, description = "A global service, or not a number", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such service", body = ApiError),
        (status = 409, description = "Changed meanwhile", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
        (status = 504, description = "Outcome unknown", body = ApiError),
    ))]
pub(crate) async fn scale(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer<ServiceView> {
    let req: ScaleRequest = parse(&body, "scale request ({\"replicas\": N})")?;
    let store = store_of(&state.node())?;
    let (found, _) = store
        .read(Consistency::Linearizable, |s| {
            find(s, &id).map(|svc| (svc.id.clone(), svc.version, svc.spec.clone()))
        })
        .await?;
    let (sid, version, mut spec) = found.map_err(Failure)?;
    if spec.mode == ServiceMode::Global {
        return Err(Failure(ApiError::invalid(format!(
            "{} is a global service: it runs one task per eligible node",
            spec.name
        ))));
    }
    spec.mode = ServiceMode::Replicated {
        replicas: req.replicas,
    };
    let r = store
        .write(Command::UpdateService {
            id: sid,
            spec,
            expected_version: version,
            at: starling_api::unix_ms(),
        })
        .await
        .map_err(super::write_error)?;
    answer(&store, r.outcome).await
}

/// Returns a service to its previous spec (`service rollback`); its tasks are replaced with
/// the rollback settings.
#[utoipa::path(post, operation_id = "rollback_service", path = "/v1/services/{id}/rollback", tag = "services",
    params(("id" = String, Path, description = "Service id, name or id prefix")),
    responses(
        (status = 200, description = "Rolling back", body = ServiceView),
        (status = 400, description = "No previous spec", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such service", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
        (status = 504, description = "Outcome unknown", body = ApiError),
    ))]
pub(crate) async fn rollback(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<ServiceView> {
    let store = store_of(&state.node())?;
    let (found, _) = store
        .read(Consistency::Linearizable, |s| {
            find(s, &id).map(|svc| svc.id.clone())
        })
        .await?;
    let r = store
        .write(Command::RollbackService {
            id: found.map_err(Failure)?,
            at: starling_api::unix_ms(),
        })
        .await
        .map_err(super::write_error)?;
    answer(&store, r.outcome).await
}

/// Removes a service; its tasks are stopped.
#[utoipa::path(delete, operation_id = "remove_service", path = "/v1/services/{id}", tag = "services",
    params(("id" = String, Path, description = "Service id, name or id prefix")),
    responses(
        (status = 200, description = "Removed", body = ServiceView),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 404, description = "No such service", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
        (status = 504, description = "Outcome unknown", body = ApiError),
    ))]
pub(crate) async fn remove(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<ServiceView> {
    let store = store_of(&state.node())?;
    let (found, _) = store
        .read(Consistency::Linearizable, |s| {
            find(s, &id).map(|svc| view(s, svc))
        })
        .await?;
    let before = found.map_err(Failure)?;
    let r = store
        .write(Command::RemoveService {
            id: before.id.clone(),
        })
        .await
        .map_err(super::write_error)?;
    match r.outcome {
        Outcome::Service { .. } => Ok(Json(before)),
        other => answer(&store, other).await,
    }
}

/// `?service=S&node=N` on a task list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct TaskQuery {
    /// Only this service's tasks (id, name or id prefix).
    service: Option<String>,
    /// Only tasks on this node (id or host name).
    node: Option<String>,
}

/// Tasks, like `docker service ps` and `docker node ps`.
#[utoipa::path(get, operation_id = "list_tasks", path = "/v1/tasks", tag = "services",
    params(TaskQuery),
    responses(
        (status = 200, description = "The tasks", body = TaskList),
        (status = 404, description = "No such service or node", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn tasks(
    State(state): State<ApiState>,
    Query(q): Query<TaskQuery>,
) -> Answer<TaskList> {
    let store = store_of(&state.node())?;
    let (tasks, _) = store
        .read(Consistency::Linearizable, |s| {
            let service = match &q.service {
                Some(key) => Some(find(s, key)?.id.clone()),
                None => None,
            };
            let node = match &q.node {
                Some(key) => Some(
                    s.node(key)
                        .or_else(|| s.nodes().find(|n| n.hostname == *key))
                        .map(|n| n.id.clone())
                        .ok_or_else(|| ApiError::not_found(format!("no such node: {key}")))?,
                ),
                None => None,
            };
            let hostname = |id: &Option<String>| {
                id.as_ref()
                    .and_then(|n| s.node(n))
                    .map(|n| n.hostname.clone())
            };
            let mut list: Vec<TaskView> = s
                .tasks()
                .filter(|t| service.as_ref().is_none_or(|sv| t.service == *sv))
                .filter(|t| node.is_none() || t.node == node)
                .map(|t| TaskView::from_state(t, hostname(&t.node)))
                .collect();
            list.sort_by(|a, b| {
                (
                    a.service.as_str(),
                    slot_key(&a.slot),
                    std::cmp::Reverse(a.created_at),
                    a.id.as_str(),
                )
                    .cmp(&(
                        b.service.as_str(),
                        slot_key(&b.slot),
                        std::cmp::Reverse(b.created_at),
                        b.id.as_str(),
                    ))
            });
            Ok::<_, ApiError>(list)
        })
        .await?;
    Ok(Json(TaskList {
        tasks: tasks.map_err(Failure)?,
    }))
}

/// Slots sort by number, then node id.
fn slot_key(slot: &str) -> (u64, &str) {
    (slot.parse().unwrap_or(u64::MAX), slot)
}
