//! Writes forwarded by a follower to the leader, batched: the writes a follower has to
//! forward at the same moment go to the leader as one request, which submits them to Raft
//! together and answers each.
//!
//! ```text
//!   write ─▶ Store::on_leader_since ─▶ Pipes::write ─▶ pipe task (one per leader) ─▶ batch task
//!      ◀── its own LeaderReply / CallError ◀── oneshot ◀────────────────────── ◀── RaftRpc::WriteBatch
//! ```
//!
//! Nothing waits to fill a batch: the pipe task takes what is queued when it runs (it
//! yields once first, so the requests the runtime is about to serve join), sends it at
//! once and goes back for more while the batch is in flight. A lone write goes as
//! [`RaftRpc::Write`], as before. Each write keeps the outcome it would have had alone: the
//! leader answers each entry of the batch, and a batch that failed on the way fails every
//! write in it the same way (not sent: none was; lost: each may have been applied). A
//! leader that cannot read a batch (an older version) refuses the stream unread, and its
//! writes are sent one by one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use starling_state::{Command, CommandResult};
use starling_transport::{Endpoint, Protocol};
use tokio::sync::{mpsc, oneshot};

use crate::network::{CallError, LeaderReply, RaftRpc, call};
use crate::types::ManagerNode;

/// Writes in one batch at most.
const MAX_BATCH: usize = 512;

/// A batch stops taking writes once it holds this many bytes of commands (a command is at
/// most 1 MiB, so a batch stays well under the transport's 8 MiB frame).
const MAX_BATCH_BYTES: usize = 2 << 20;

/// The answer to one forwarded write.
pub(crate) type Forwarded = Result<LeaderReply<CommandResult>, CallError>;

struct Item {
    cmd: Arc<Command>,
    size: usize,
    reply: oneshot::Sender<Forwarded>,
}

/// What a manager forwarded to leaders since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForwardStats {
    /// Writes forwarded.
    pub writes: u64,
    /// Requests they went in (a batch is one).
    pub requests: u64,
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    requests: AtomicU64,
}

/// The pipes of one manager: one per leader it has forwarded to. The pipe tasks end when
/// this is dropped (their queues close), once their last batch is sent.
pub(crate) struct Pipes {
    endpoint: Endpoint,
    protocol: Protocol,
    pipes: Mutex<HashMap<ManagerNode, mpsc::UnboundedSender<Item>>>,
    counters: Arc<Counters>,
}

impl Pipes {
    pub(crate) fn new(endpoint: Endpoint, protocol: Protocol) -> Self {
        Pipes {
            endpoint,
            protocol,
            pipes: Mutex::default(),
            counters: Arc::default(),
        }
    }

    pub(crate) fn stats(&self) -> ForwardStats {
        ForwardStats {
            writes: self.counters.writes.load(Ordering::Relaxed),
            requests: self.counters.requests.load(Ordering::Relaxed),
        }
    }

    /// Forwards `cmd` (of `size` encoded bytes) to the leader `node`, in a batch with the
    /// writes forwarded beside it. Dropping the future does not withdraw the write.
    pub(crate) async fn write(
        &self,
        node: &ManagerNode,
        cmd: Arc<Command>,
        size: usize,
    ) -> Forwarded {
        let (reply, answer) = oneshot::channel();
        let item = Item { cmd, size, reply };
        {
            let mut pipes = self.pipes.lock().unwrap_or_else(|p| p.into_inner());
            // A pipe lives as long as this manager's store: one per manager that has led
            // while this one followed (a few idle tasks at most). One whose task is gone
            // (its runtime stopped) is replaced.
            let item = match pipes.get(node) {
                Some(pipe) => pipe
                    .send(item)
                    .err()
                    .map(|mpsc::error::SendError(item)| item),
                None => Some(item),
            };
            if let Some(item) = item {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(
                    self.endpoint.clone(),
                    self.protocol.clone(),
                    node.clone(),
                    rx,
                    self.counters.clone(),
                ));
                if tx.send(item).is_err() {
                    return Err(CallError::NotSent(format!(
                        "{node}: no task to forward the write"
                    )));
                }
                pipes.insert(node.clone(), tx);
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(CallError::Lost(format!(
                "{node}: the forwarding task ended with the write in flight"
            )))
        })
    }
}

/// One leader's pipe: takes what is queued, sends it, comes back for more.
async fn run(
    endpoint: Endpoint,
    protocol: Protocol,
    node: ManagerNode,
    mut queue: mpsc::UnboundedReceiver<Item>,
    counters: Arc<Counters>,
) {
    while let Some(first) = queue.recv().await {
        // Let the requests the runtime has ready queue their writes first.
        tokio::task::yield_now().await;
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(item) => {
                    bytes += item.size;
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        counters
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        counters.requests.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(send(
            endpoint.clone(),
            protocol.clone(),
            node.clone(),
            batch,
        ));
    }
}

/// Sends one batch and hands each write its answer.
async fn send(endpoint: Endpoint, protocol: Protocol, node: ManagerNode, batch: Vec<Item>) {
    if batch.len() == 1 {
        return send_one(&endpoint, &protocol, &node, batch).await;
    }
    let (cmds, replies): (Vec<Arc<Command>>, Vec<oneshot::Sender<Forwarded>>) =
        batch.into_iter().map(|i| (i.cmd, i.reply)).unzip();
    let rpc = RaftRpc::WriteBatch(cmds);
    match call::<Vec<LeaderReply<CommandResult>>>(&endpoint, &protocol, &node, &rpc).await {
        Ok(answers) if answers.len() == replies.len() => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Ok(answers) => {
            let why = format!(
                "{node}: {} answers to a batch of {} writes",
                answers.len(),
                replies.len()
            );
            for reply in replies {
                let _ = reply.send(Err(CallError::Lost(why.clone())));
            }
        }
        // Refused unread (a leader that does not know batches): nothing was applied.
        Err(CallError::Undecodable(_)) => {
            if let RaftRpc::WriteBatch(cmds) = rpc {
                let items = cmds.into_iter().zip(replies).map(|(cmd, reply)| Item {
                    cmd,
                    size: 0,
                    reply,
                });
                send_one(&endpoint, &protocol, &node, items.collect()).await;
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

async fn send_one(endpoint: &Endpoint, protocol: &Protocol, node: &ManagerNode, batch: Vec<Item>) {
    for item in batch {
        let rpc = RaftRpc::Write(item.cmd);
        let answer = call::<LeaderReply<CommandResult>>(endpoint, protocol, node, &rpc).await;
        let _ = item.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
    use serde::{Deserialize, Serialize};
    use starling_state::Outcome;
    use starling_transport::{
        CertOptions, ClusterCa, ClusterId, EndpointConfig, Inbound, Listener, NodeId, Role,
        StreamCode, ring_provider,
    };

    use super::*;
    use crate::network::raft_protocol;
    use crate::types::{SnapshotMeta, TypeConfig, Vote, decode, encode};

    /// The Raft messages of a version before batches: `RaftRpc` without `WriteBatch`, the
    /// same variants in the same order (postcard writes a variant as its index, so this is
    /// what such a version decodes).
    #[derive(Serialize, Deserialize)]
    #[allow(dead_code)]
    enum OldRaftRpc {
        Append(AppendEntriesRequest<TypeConfig>),
        Vote(VoteRequest<TypeConfig>),
        PreVote(VoteRequest<TypeConfig>),
        TransferLeader(TransferLeaderRequest<TypeConfig>),
        SnapshotChunk {
            transfer: u64,
            offset: u64,
            data: Vec<u8>,
            finish: Option<(Vote, SnapshotMeta)>,
        },
        Write(Box<Command>),
        ReadIndex,
        Ping,
        Acks,
    }

    /// A leader of that version: refuses what it cannot decode unread, as `network.rs`
    /// does, and applies each write it can read at the revision its key names (`k7` at 7).
    /// `seen` records what it was sent, in order.
    async fn old_leader(mut listener: Listener, seen: Arc<Mutex<Vec<String>>>) {
        while let Some(conn) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok(Inbound::Request(req)) = conn.accept().await {
                    let cmd = match decode::<OldRaftRpc>(req.body().as_bytes()) {
                        Ok(OldRaftRpc::Write(cmd)) => cmd,
                        Ok(_) => {
                            seen.lock().unwrap().push("another message".into());
                            req.refuse(StreamCode::UNDECODABLE);
                            continue;
                        }
                        Err(_) => {
                            seen.lock().unwrap().push("refused unread".into());
                            req.refuse(StreamCode::UNDECODABLE);
                            continue;
                        }
                    };
                    let Command::Put { key, .. } = *cmd else {
                        panic!("only puts are sent here");
                    };
                    seen.lock().unwrap().push(format!("write {key}"));
                    let revision = key.trim_start_matches('k').parse().unwrap();
                    let reply: Result<LeaderReply<CommandResult>, String> =
                        Ok(LeaderReply::Done(CommandResult {
                            revision,
                            outcome: Outcome::Put { prev: None },
                        }));
                    req.respond(&encode(&reply).unwrap()).await.unwrap();
                }
            });
        }
    }

    fn manager_endpoint(ca: &ClusterCa, name: &str) -> Endpoint {
        let creds = ca
            .issue(
                &NodeId::new(name).unwrap(),
                &Role::MANAGER,
                &CertOptions::default(),
            )
            .unwrap();
        Endpoint::bind(EndpointConfig::default(), ring_provider(), Some(creds)).unwrap()
    }

    #[tokio::test]
    async fn a_batch_an_older_leader_cannot_read_goes_again_write_by_write() {
        let ca = ClusterCa::create(ClusterId::new("fw").unwrap()).unwrap();
        let (old, new) = (manager_endpoint(&ca, "m1"), manager_endpoint(&ca, "m2"));
        let protocol = raft_protocol().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(old_leader(old.listen(&protocol).unwrap(), seen.clone()));
        let node = ManagerNode {
            name: "m1".into(),
            addr: old.local_addr().to_string(),
        };

        let (mut batch, mut answers) = (Vec::new(), Vec::new());
        for i in 1..=3 {
            let (reply, answer) = oneshot::channel();
            let cmd = Arc::new(Command::Put {
                key: format!("k{i}"),
                value: vec![1; 8],
            });
            batch.push(Item {
                cmd,
                size: 16,
                reply,
            });
            answers.push(answer);
        }
        send(new.clone(), protocol, node, batch).await;

        // Each write has its own answer, in order, from the writes sent one by one after
        // the batch was refused unread (so none of them was applied twice).
        for (i, answer) in (1..).zip(answers) {
            match answer.await.unwrap() {
                Ok(LeaderReply::Done(r)) => assert_eq!(r.revision, i),
                other => panic!("write {i}: {other:?}"),
            }
        }
        assert_eq!(
            *seen.lock().unwrap(),
            ["refused unread", "write k1", "write k2", "write k3"]
        );
        new.close().await;
        old.close().await;
    }
}
