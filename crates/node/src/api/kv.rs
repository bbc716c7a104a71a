//! The user key-value store: `/v1/kv/{key}`, `/v1/kv?prefix=`, `/v1/watch`. No key is
//! reserved or interpreted; system records are not reachable from here.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequest as _, Path, Query, Request, State};
use axum::http::{Method, Uri};
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use starling_api::{
    ApiError, Consistency, ErrorCode, KvDeleted, KvEntry, KvList, ListQuery, PutQuery, ReadQuery,
    WatchEvent, WatchEvents, WatchQuery, Written,
};
use starling_raft_store::{Command, Outcome};

use super::{Answer, ApiState, Failure, store_of};

fn consistency(c: Option<Consistency>) -> starling_raft_store::Consistency {
    match c.unwrap_or_default() {
        Consistency::Linearizable => starling_raft_store::Consistency::Linearizable,
        Consistency::Stale => starling_raft_store::Consistency::Stale,
    }
}

/// A read or write of one key, as the route `/v1/kv/{*key}` and its handlers' extractors
/// would read it: the API answers it without the router (its matching, the parameters and
/// matched path it puts on each request, the boxed future of each route). Reads and writes
/// of keys are most of the API's requests.
#[derive(Debug)]
pub(crate) enum KeyCall {
    Get(String, ReadQuery),
    Put(String, PutQuery),
}

impl KeyCall {
    /// The call `GET` or `PUT /v1/kv/{key}` makes when the router would accept its path and
    /// query: the key percent-decoded as a path parameter, the query as `Query` parses it.
    /// `None` for every other request and for one the router would refuse, which then goes
    /// through the router and gets its answer (the same error as always).
    pub(crate) fn of(method: &Method, uri: &Uri) -> Option<KeyCall> {
        let raw = uri.path().strip_prefix("/v1/kv/")?;
        if raw.is_empty() {
            return None;
        }
        let key = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .ok()?
            .into_owned();
        match *method {
            Method::GET => Some(KeyCall::Get(key, Query::try_from_uri(uri).ok()?.0)),
            Method::PUT => Some(KeyCall::Put(key, Query::try_from_uri(uri).ok()?.0)),
            _ => None,
        }
    }

    /// Answers as the route's handler does; a `PUT`'s body is read as its `Bytes`
    /// extractor reads it (within the API's body limit, set on `req`).
    ///
    /// The request is dropped as soon as it is read: its head and a small body are slices
    /// of the connection's read buffer, which HTTP/1 reads into again while the answer is
    /// pending (to see the connection close); while a slice lives, that read allocates a
    /// new buffer (8 KiB) instead of reusing the one it has.
    pub(crate) async fn answer(self, state: ApiState, req: Request) -> Response {
        match self {
            KeyCall::Get(key, q) => {
                drop(req);
                get(State(state), Path(key), Query(q)).await.into_response()
            }
            KeyCall::Put(key, q) => match Bytes::from_request(req, &state).await {
                Ok(body) => put(State(state), Path(key), Query(q), body)
                    .await
                    .into_response(),
                Err(refused) => refused.into_response(),
            },
        }
    }
}

/// A key's value and counters.
#[utoipa::path(get, operation_id = "kv_get", path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key, percent-encoded"), ReadQuery),
    responses(
        (status = 200, description = "The entry", body = KvEntry),
        (status = 400, description = "Bad query", body = ApiError),
        (status = 404, description = "No such key (with the revision read)", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn get(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Response, Failure> {
    let store = store_of(&state.node())?;
    // The answer is rendered from the entry in place (no copy of the entry, no owned
    // `KvEntry`): the read lock is held for one small serialisation.
    let (json, rev) = store
        .read(consistency(q.consistency), |s| {
            s.get(&key).map(|e| KvEntry::json_of(&key, e, s.revision()))
        })
        .await?;
    match json {
        Some(Ok(body)) => Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()),
        Some(Err(e)) => Err(Failure(ApiError::internal(format!(
            "cannot render {key:?}: {e}"
        )))),
        None => Err(Failure(
            ApiError::not_found(format!("key {key:?} not found")).at_revision(rev),
        )),
    }
}

/// Sets a key to the body's bytes; with `expect-revision`, only if the key is at that
/// revision (0: only if absent).
#[utoipa::path(put, operation_id = "kv_put", path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key, percent-encoded"), PutQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The value"),
    responses(
        (status = 200, description = "Written", body = Written),
        (status = 400, description = "Bad query", body = ApiError),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 412, description = "Compare failed (with the revision)", body = ApiError),
        (status = 413, description = "Too large", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
        (status = 504, description = "Outcome unknown", body = ApiError),
    ))]
pub(crate) async fn put(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    Query(q): Query<PutQuery>,
    body: Bytes,
) -> Answer<Written> {
    let node = state.node();
    let store = store_of(&node)?;
    let started = Instant::now();
    let value = body.to_vec();
    // The body may be a slice of the connection's read buffer (see `KeyCall::answer`).
    drop(body);
    let cmd = match q.expect_revision {
        None => Command::Put {
            key: key.clone(),
            value,
        },
        Some(rev) => Command::cas_revision(key.clone(), rev, value),
    };
    let r = store.write(cmd).await.map_err(super::write_error)?;
    if r.outcome == (Outcome::Txn { succeeded: false }) {
        return Err(Failure(
            ApiError::new(
                ErrorCode::CompareFailed,
                format!(
                    "compare failed: {key:?} is not at revision {}",
                    q.expect_revision.unwrap_or_default()
                ),
            )
            .at_revision(r.revision),
        ));
    }
    node.metrics.write_took(started.elapsed());
    Ok(Json(Written {
        revision: r.revision,
    }))
}

/// Removes a key (no error if it was absent: `deleted` says).
#[utoipa::path(delete, operation_id = "kv_delete", path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key, percent-encoded")),
    responses(
        (status = 200, description = "Done", body = KvDeleted),
        (status = 403, description = "A viewer", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
        (status = 504, description = "Outcome unknown", body = ApiError),
    ))]
pub(crate) async fn delete(
    State(state): State<ApiState>,
    Path(key): Path<String>,
) -> Answer<KvDeleted> {
    let node = state.node();
    let store = store_of(&node)?;
    let started = Instant::now();
    let r = store
        .write(Command::Delete { key })
        .await
        .map_err(super::write_error)?;
    node.metrics.write_took(started.elapsed());
    Ok(Json(KvDeleted {
        revision: r.revision,
        deleted: matches!(r.outcome, Outcome::Deleted { prev: Some(_) }),
    }))
}

/// The keys under a prefix, in order.
#[utoipa::path(get, operation_id = "kv_list", path = "/v1/kv", tag = "kv",
    params(ListQuery),
    responses(
        (status = 200, description = "The keys", body = KvList),
        (status = 400, description = "Bad query", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn list(
    State(state): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> Answer<KvList> {
    let store = store_of(&state.node())?;
    let prefix = q.prefix.unwrap_or_default();
    let (entries, revision) = store
        .read(consistency(q.consistency), |s| s.range(&prefix))
        .await?;
    Ok(Json(KvList {
        keys: entries
            .iter()
            .map(|(k, e)| KvEntry::new(k, e, revision))
            .collect(),
        revision,
    }))
}

/// Long poll: the changes under `prefix` from revision `from` on, waiting up to `wait`
/// seconds (default 30, capped by the node's `--watch-wait-max`, default 300) for the first;
/// resume with `from` = last revision + 1 (no gap, no duplicate).
#[utoipa::path(get, operation_id = "watch", path = "/v1/watch", tag = "kv",
    params(WatchQuery),
    responses(
        (status = 200, description = "The changes (possibly none)", body = WatchEvents),
        (status = 400, description = "Bad query", body = ApiError),
        (status = 410, description = "Compacted, or the watcher fell behind", body = ApiError),
        (status = 503, description = "A worker", body = ApiError),
    ))]
pub(crate) async fn watch(
    State(state): State<ApiState>,
    Query(q): Query<WatchQuery>,
) -> Answer<WatchEvents> {
    let store = store_of(&state.node())?;
    let prefix = q.prefix.unwrap_or_default();
    let wait = Duration::from_secs(q.wait.unwrap_or(30)).min(state.max_watch_wait());
    let compacted =
        |e: starling_raft_store::StoreError| Failure(ApiError::new(ErrorCode::Compacted, e));
    let mut w = store
        .watch(&prefix, q.from.unwrap_or(0))
        .map_err(compacted)?;
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let timeout = if events.is_empty() {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::ZERO
        };
        match tokio::time::timeout(timeout, w.next()).await {
            Ok(Ok(e)) => {
                events.push(WatchEvent::new(&e));
                if events.len() >= 1000 {
                    break;
                }
            }
            Ok(Err(e)) => {
                if events.is_empty() {
                    return Err(compacted(e));
                }
                break;
            }
            Err(_) => break,
        }
    }
    Ok(Json(WatchEvents { events }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get as route_get;
    use tower::ServiceExt as _;

    /// What the route's extractors make of a request: the key and the query, or the
    /// router's refusal (its status).
    async fn by_the_router(method: Method, uri: &str) -> Result<String, u16> {
        let echo = Router::new().route(
            "/v1/kv/{*key}",
            route_get(
                |Path(key): Path<String>, Query(q): Query<ReadQuery>| async move {
                    format!("get {key:?} {:?}", q.consistency)
                },
            )
            .put(
                |Path(key): Path<String>, Query(q): Query<PutQuery>| async move {
                    format!("put {key:?} {:?}", q.expect_revision)
                },
            ),
        );
        let req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = echo.oneshot(req).await.unwrap();
        if !resp.status().is_success() {
            return Err(resp.status().as_u16());
        }
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }

    fn by_key_call(method: Method, uri: &str) -> Option<String> {
        Some(match KeyCall::of(&method, &uri.parse().unwrap())? {
            KeyCall::Get(key, q) => format!("get {key:?} {:?}", q.consistency),
            KeyCall::Put(key, q) => format!("put {key:?} {:?}", q.expect_revision),
        })
    }

    #[tokio::test]
    async fn a_key_call_reads_a_request_as_the_router_does_and_leaves_it_the_rest() {
        let uris = [
            "/v1/kv/a",
            "/v1/kv/a/b/c",
            "/v1/kv/a%2Fb",
            "/v1/kv/a%20b+c",
            "/v1/kv/%E2%9C%93",
            "/v1/kv//lead",
            "/v1/kv/%FF",
            "/v1/kv/%",
            "/v1/kv/",
            "/v1/kv",
            "/v1/kvx/a",
            "/v1/kv/a?consistency=stale",
            "/v1/kv/a?consistency=linearizable&other=1",
            "/v1/kv/a?consistency=bogus",
            "/v1/kv/a?consistency=stale&consistency=stale",
            "/v1/kv/a?expect-revision=3",
            "/v1/kv/a?expect-revision=0",
            "/v1/kv/a?expect-revision=-1",
            "/v1/kv/a?expect-revision=x",
            "/v1/kv/a?%ZZ",
        ];
        let methods = [
            Method::GET,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::POST,
        ];
        let mut taken = 0;
        for uri in uris {
            for method in &methods {
                let router = by_the_router(method.clone(), uri).await;
                match by_key_call(method.clone(), uri) {
                    // Taken: exactly what the route's handler would have been given.
                    Some(call) => {
                        taken += 1;
                        assert_eq!(router, Ok(call), "{method} {uri}");
                    }
                    // Left to the router: anything it refuses, every other method, and
                    // nothing else.
                    None => assert!(
                        router.is_err() || !matches!(*method, Method::GET | Method::PUT),
                        "{method} {uri} is left to the router, which takes it: {router:?}"
                    ),
                }
            }
        }
        assert!(taken >= 20, "{taken} calls taken");
    }
}
