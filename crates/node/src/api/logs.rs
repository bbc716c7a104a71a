//! `service logs`: a service's or a task's output, fetched from the nodes that run its tasks
//! (ALPN `starling/logs/1`, this node's own agent read in process) and streamed to the
//! client as NDJSON [`LogRecord`]s — the backlog in time order, then, when it follows, new
//! lines and the tasks that start meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use starling_api::dispatch::{read_message, write_message};
use starling_api::logs::{LOGS_ALPN, LogsFrame, LogsRequest};
use starling_api::{ApiError, LogRecord};
use starling_raft_store::{ClusterState, Consistency, Store};
use starling_state::{NodeStatus, Slot, Task};
use starling_transport::{Endpoint, NodeId, PeerPolicy, Protocol};
use tokio::sync::mpsc;

use super::{ApiState, Failure, store_of};

/// How long the backlog waits for a node before it goes out without that node's lines (they
/// follow when they come).
const BACKLOG_WAIT: Duration = Duration::from_secs(10);

/// How long a node has to accept the logs connection.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// `?follow=&tail=&since=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct LogsQuery {
    /// Keep streaming: new lines, and the tasks of the service that start meanwhile, until
    /// the client goes or nothing came for the node's long-poll cap (then an `idle` record).
    #[serde(default)]
    follow: bool,
    /// Only the last N lines of each task.
    tail: Option<u64>,
    /// Only lines written at or after this time (ms since the Unix epoch).
    since: Option<u64>,
}

/// A task whose logs are asked for, with where it runs.
#[derive(Clone, Debug)]
struct Source {
    task: String,
    service: String,
    slot: String,
    node: String,
    hostname: String,
    addr: String,
    down: bool,
}

fn sources<'a>(s: &ClusterState, tasks: impl Iterator<Item = &'a Task>) -> Vec<Source> {
    tasks
        .filter_map(|t| {
            let node = s.node(t.node.as_deref()?)?;
            Some(Source {
                task: t.id.clone(),
                service: t.service_name.clone(),
                slot: match &t.slot {
                    Slot::Number(n) => n.to_string(),
                    Slot::Node(n) => n.clone(),
                },
                node: node.id.clone(),
                hostname: node.hostname.clone(),
                addr: node.addr.clone(),
                down: node.status == NodeStatus::Down,
            })
        })
        .collect()
}

/// The task `key` names: its id or a unique prefix of it.
fn find_task<'a>(s: &'a ClusterState, key: &str) -> Result<&'a Task, ApiError> {
    match s.task(key) {
        Some(t) => Ok(t),
        None => super::services::by_prefix(key, "task", s.tasks(), |t| &t.id),
    }
}

/// A service's logs: every task it has (running, and ended ones until they are reaped).
#[utoipa::path(get, operation_id = "service_logs", path = "/v1/services/{id}/logs", tag = "services",
    params(("id" = String, Path, description = "Service id, name or id prefix"), LogsQuery),
    responses(
        (status = 200, description = "NDJSON, one record per line", body = LogRecord, content_type = "application/x-ndjson"),
        (status = 404, description = "No such service", body = ApiError),
        (status = 409, description = "An ambiguous prefix", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn service_logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, Failure> {
    logs_of(state, q, |s| {
        super::services::find(s, &id)
            .map(|svc| (Some(svc.id.clone()), sources(s, s.tasks_of(&svc.id))))
    })
    .await
}

/// One task's logs.
#[utoipa::path(get, operation_id = "task_logs", path = "/v1/tasks/{id}/logs", tag = "services",
    params(("id" = String, Path, description = "Task id or id prefix"), LogsQuery),
    responses(
        (status = 200, description = "NDJSON, one record per line", body = LogRecord, content_type = "application/x-ndjson"),
        (status = 404, description = "No such task", body = ApiError),
        (status = 409, description = "An ambiguous prefix", body = ApiError),
        (status = 503, description = "No quorum, or a worker", body = ApiError),
    ))]
pub(crate) async fn task_logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, Failure> {
    logs_of(state, q, |s| {
        let list = find_task(s, &id).map(|t| sources(s, std::iter::once(t)))?;
        if list.is_empty() {
            return Err(ApiError::not_found(format!(
                "task {id} was never placed on a node: it has no logs"
            )));
        }
        Ok((None, list))
    })
    .await
}

/// The logs of the tasks `pick` finds (with the service, when a follow may pick up new ones).
async fn logs_of(
    state: ApiState,
    q: LogsQuery,
    pick: impl FnOnce(&ClusterState) -> Result<(Option<String>, Vec<Source>), ApiError>,
) -> Result<Response, Failure> {
    let store = store_of(&state.node())?;
    let (found, _) = store.read(Consistency::Linearizable, pick).await?;
    let (service, list) = found.map_err(Failure)?;
    Ok(respond(state, store, list, service, q))
}

/// What the node fetchers send the merger.
enum Msg {
    Frame(String, LogsFrame),
    /// A node's stream ended (with why, when it failed).
    Ended(String, Option<String>),
    Notice(String),
}

/// Where this node's agent keeps its tasks, and how to reach the others.
#[derive(Clone)]
struct Reach {
    me: String,
    tasks_dir: PathBuf,
    endpoint: Endpoint,
}

fn respond(
    state: ApiState,
    store: Arc<Store>,
    list: Vec<Source>,
    service: Option<String>,
    q: LogsQuery,
) -> Response {
    let node = state.node();
    let reach = Reach {
        me: node.state.node_id.clone(),
        tasks_dir: node.data_dir.0.join("tasks"),
        endpoint: node.endpoint.clone(),
    };
    let (out, body) = mpsc::channel::<Bytes>(64);
    tokio::spawn(merge(
        reach,
        store,
        list,
        service,
        q,
        state.max_watch_wait(),
        out,
    ));
    let stream = futures::stream::unfold(body, |mut rx| async move {
        rx.recv().await.map(|b| {
            (
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)),
                rx,
            )
        })
    });
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::new(http_body_util::StreamBody::new(
            stream,
        )))
        .unwrap_or_else(|e| {
            axum::response::IntoResponse::into_response(Failure(ApiError::internal(format!(
                "cannot build the answer: {e}"
            ))))
        })
}

/// Starts one fetcher per node for `list` (a down node is reported, not asked).
fn start(reach: &Reach, list: &[Source], req: &LogsRequest, tx: &mpsc::Sender<Msg>) -> usize {
    let mut by_node: BTreeMap<&str, Vec<&Source>> = BTreeMap::new();
    for s in list {
        by_node.entry(s.node.as_str()).or_default().push(s);
    }
    let mut started = 0;
    for (node, group) in by_node {
        let first = group[0];
        if first.down {
            let _ = tx.try_send(Msg::Notice(format!(
                "node {} is down: the logs of {} task(s) on it are not available",
                first.hostname,
                group.len()
            )));
            continue;
        }
        let req = LogsRequest {
            tasks: group.iter().map(|s| s.task.clone()).collect(),
            ..req.clone()
        };
        started += 1;
        tokio::spawn(fetch(
            reach.clone(),
            node.to_owned(),
            first.hostname.clone(),
            first.addr.clone(),
            req,
            tx.clone(),
        ));
    }
    started
}

/// One node's frames into `tx`: this node's own agent read in process, another over QUIC.
async fn fetch(
    reach: Reach,
    node: String,
    hostname: String,
    addr: String,
    req: LogsRequest,
    tx: mpsc::Sender<Msg>,
) {
    let failure = if node == reach.me {
        let (ftx, mut frames) = mpsc::channel(16);
        let reader = tokio::spawn(starling_agent::logs::stream(reach.tasks_dir, req, ftx));
        while let Some(f) = frames.recv().await {
            if tx.send(Msg::Frame(node.clone(), f)).await.is_err() {
                break;
            }
        }
        reader.abort();
        None
    } else {
        remote(&reach.endpoint, &node, &addr, &req, &tx).await.err()
    };
    let why = failure.map(|e| format!("node {hostname} ({addr}): {e}"));
    let _ = tx.send(Msg::Ended(node, why)).await;
}

async fn remote(
    endpoint: &Endpoint,
    node: &str,
    addr: &str,
    req: &LogsRequest,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), String> {
    let protocol = Protocol::new(LOGS_ALPN, PeerPolicy::any_member()).map_err(|e| e.to_string())?;
    let id = NodeId::new(node.to_owned()).map_err(|e| e.to_string())?;
    let addr = addr.parse().map_err(|e| format!("bad address: {e}"))?;
    let open = async {
        let conn = endpoint
            .connect(&protocol, &id, addr)
            .await
            .map_err(|e| e.to_string())?;
        conn.open_stream().await.map_err(|e| e.to_string())
    };
    let stream = tokio::time::timeout(DIAL_TIMEOUT, open)
        .await
        .map_err(|_| format!("unreachable (no answer within {DIAL_TIMEOUT:?})"))??;
    let (mut rx, mut wire) = tokio::io::split(stream);
    write_message(&mut wire, req)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match read_message::<LogsFrame>(&mut rx).await {
            Ok(Some(f)) => {
                if tx.send(Msg::Frame(node.to_owned(), f)).await.is_err() {
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("logs stream lost: {e}")),
        }
    }
}

fn encode(r: &LogRecord) -> Bytes {
    let mut v = Vec::new();
    encode_into(&mut v, r);
    Bytes::from(v)
}

fn encode_into(buf: &mut Vec<u8>, r: &LogRecord) {
    if serde_json::to_writer(&mut *buf, r).is_ok() {
        buf.push(b'\n');
    }
}

/// Records go out in chunks of about this many bytes (one HTTP chunk each, not one per line).
const CHUNK: usize = 64 * 1024;

/// Sends `records` as NDJSON in chunks; `Err` when the client is gone.
async fn send_all(
    out: &mpsc::Sender<Bytes>,
    records: impl IntoIterator<Item = LogRecord>,
) -> Result<bool, ()> {
    let mut buf = Vec::with_capacity(CHUNK);
    let mut any = false;
    for r in records {
        encode_into(&mut buf, &r);
        any = true;
        if buf.len() >= CHUNK {
            out.send(Bytes::from(std::mem::replace(
                &mut buf,
                Vec::with_capacity(CHUNK),
            )))
            .await
            .map_err(|_| ())?;
        }
    }
    if !buf.is_empty() {
        out.send(Bytes::from(buf)).await.map_err(|_| ())?;
    }
    Ok(any)
}

/// Fetches, merges and writes the records into `out` until done (or the client goes).
async fn merge(
    reach: Reach,
    store: Arc<Store>,
    list: Vec<Source>,
    service: Option<String>,
    q: LogsQuery,
    idle_cap: Duration,
    out: mpsc::Sender<Bytes>,
) {
    let req = LogsRequest {
        tasks: Vec::new(),
        tail: q.tail,
        since_ms: q.since,
        follow: q.follow,
    };
    let (tx, mut rx) = mpsc::channel::<Msg>(256);
    let mut known: BTreeMap<String, Source> =
        list.iter().map(|s| (s.task.clone(), s.clone())).collect();
    let mut open = start(&reach, &list, &req, &tx);
    let mut waiting: BTreeSet<String> = list
        .iter()
        .filter(|s| !s.down)
        .map(|s| s.node.clone())
        .collect();
    let record = |known: &BTreeMap<String, Source>, line: starling_api::logs::TaskLine| {
        let s = known.get(&line.task)?;
        Some(LogRecord::Line {
            task: line.task,
            service: s.service.clone(),
            slot: s.slot.clone(),
            node: s.hostname.clone(),
            stream: line.stream,
            time: line.time_ms,
            line: line.line,
        })
    };
    // The backlog: every node's, merged by time.
    let mut backlog: Vec<LogRecord> = Vec::new();
    let mut notices: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + BACKLOG_WAIT;
    while !waiting.is_empty() {
        let msg = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(_) => {
                for n in &waiting {
                    let host = known
                        .values()
                        .find(|s| s.node == *n)
                        .map_or(n.as_str(), |s| s.hostname.as_str());
                    notices.push(format!(
                        "node {host} has not sent its logs within {BACKLOG_WAIT:?}"
                    ));
                }
                break;
            }
        };
        match msg {
            Msg::Frame(_, LogsFrame::Lines(lines)) => {
                backlog.extend(lines.into_iter().filter_map(|l| record(&known, l)));
            }
            Msg::Frame(_, LogsFrame::Missing { task, why }) => {
                notices.push(format!("task {task}: {why}"));
            }
            Msg::Frame(node, LogsFrame::CaughtUp) => {
                waiting.remove(&node);
            }
            Msg::Frame(_, LogsFrame::Heartbeat) => {}
            Msg::Ended(node, why) => {
                waiting.remove(&node);
                open -= 1;
                notices.extend(why);
            }
            Msg::Notice(n) => notices.push(n),
        }
    }
    backlog.sort_by_key(|r| match r {
        LogRecord::Line { time, stream, .. } => (*time, *stream),
        _ => (0, starling_api::LogStream::Stdout),
    });
    let first = notices
        .into_iter()
        .map(|message| LogRecord::Notice { message })
        .chain(backlog);
    if send_all(&out, first).await.is_err() {
        return;
    }
    if !q.follow {
        return;
    }
    // Following: new lines as they come, new tasks of the service as they are placed.
    let mut last_sent = tokio::time::Instant::now();
    let mut look = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let r = match msg {
                    Some(Msg::Frame(_, LogsFrame::Lines(lines))) => {
                        let records = lines.into_iter().filter_map(|l| record(&known, l));
                        let Ok(sent) = send_all(&out, records).await else {
                            return;
                        };
                        if sent {
                            last_sent = tokio::time::Instant::now();
                        }
                        continue;
                    }
                    Some(Msg::Frame(_, LogsFrame::Missing { task, why })) => {
                        LogRecord::Notice { message: format!("task {task}: {why}") }
                    }
                    Some(Msg::Frame(_, _)) => continue,
                    Some(Msg::Ended(_, why)) => {
                        open -= 1;
                        match why {
                            Some(message) => LogRecord::Notice { message },
                            None => continue,
                        }
                    }
                    Some(Msg::Notice(message)) => LogRecord::Notice { message },
                    None => return,
                };
                if out.send(encode(&r)).await.is_err() {
                    return;
                }
            }
            _ = look.tick() => {
                if out.is_closed() {
                    return;
                }
                let quiet = last_sent.elapsed();
                if quiet >= idle_cap {
                    let r = LogRecord::Idle { quiet_ms: quiet.as_millis() as u64 };
                    let _ = out.send(encode(&r)).await;
                    return;
                }
                let Some(service) = &service else {
                    if open == 0 {
                        return;
                    }
                    continue;
                };
                let Ok((fresh, _)) = store
                    .read(Consistency::Stale, |s| {
                        sources(s, s.tasks_of(service).filter(|t| !known.contains_key(&t.id)))
                    })
                    .await
                else {
                    continue;
                };
                if fresh.is_empty() {
                    continue;
                }
                for s in &fresh {
                    known.insert(s.task.clone(), s.clone());
                }
                // A task placed after the request: all it wrote.
                let all = LogsRequest { tail: None, ..req.clone() };
                open += start(&reach, &fresh, &all, &tx);
            }
        }
    }
}
