//! The dispatcher protocol between a node's agent and a manager (ALPN
//! [`DISPATCH_ALPN`]): one session per node on one QUIC bi-stream, ordered frames each way
//! (a 4-byte big-endian length, then a postcard body).
//!
//! The agent opens the session with [`AgentMessage::Hello`] (its machine and a report of
//! every task it knows); the manager answers with the full set of the node's tasks, then
//! increments as they change; the agent sends status reports as tasks move. Any manager
//! serves sessions; reports are written through Raft by whichever manager took them.

use serde::{Deserialize, Serialize};
use starling_state::{NodeDescription, NodeRole, Task, TaskReport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The dispatcher's ALPN.
pub const DISPATCH_ALPN: &[u8] = b"starling/dispatch/1";

/// The largest frame either side accepts (a full assignment set of a busy node fits).
pub const MAX_DISPATCH_FRAME: usize = 16 << 20;

/// From an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// The first message of a session.
    Hello {
        /// The node's machine.
        description: NodeDescription,
        /// Every task the agent knows, as it is now (a full re-report).
        reports: Vec<TaskReport>,
    },
    /// Tasks that changed state.
    Reports(Vec<TaskReport>),
    /// Sent every [`HEARTBEAT`] while nothing else is: the dispatcher counts a session silent
    /// for a few of them as lost.
    Heartbeat,
}

/// How often each side speaks on a session at least.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(500);

/// A session silent this long is taken for lost (by the agent; the leader's liveness uses
/// the same figure before it probes the node).
pub const SESSION_SILENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// From a manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerMessage {
    /// The node's tasks: the whole set (`full`) or what changed since the last message.
    Assignments {
        /// Whether `tasks` is the whole set (the agent forgets tasks not in it).
        full: bool,
        /// Tasks new or changed.
        tasks: Vec<Task>,
        /// Tasks no longer the node's (reaped, or moved).
        removed: Vec<String>,
        /// The managers, `node_id@addr`, for the agent to fail over to.
        managers: Vec<String>,
    },
    /// Sent every [`HEARTBEAT`]: an agent that hears nothing for [`SESSION_SILENCE`] takes
    /// the manager for gone (a killed process closes no QUIC connection) and fails over.
    Heartbeat,
    /// What the managers want of the node itself: sent when the session starts and whenever
    /// it changes, so a node learns of its promotion or demotion without asking.
    Node(NodeDirective),
}

/// What the managers want of a node itself, from its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDirective {
    /// The role the node is to hold: a node whose certificate names another role asks for a
    /// new certificate at once (a promotion or a demotion).
    pub role: NodeRole,
    /// Digests (hex SHA-256) of the root CA certificates the node is to trust, the one that
    /// signs new certificates first: a node that trusts others (a root CA rotation started
    /// or finished) asks for a certificate of the first and the new trust at once.
    pub roots: Vec<String>,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// A frame over [`MAX_DISPATCH_FRAME`].
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// A frame that is not a message of the protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Writes one message.
pub async fn write_message<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), FrameError> {
    let body = postcard::to_stdvec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_DISPATCH_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one message; `Ok(None)` at a clean end of the stream.
pub async fn read_message<T: for<'de> Deserialize<'de>>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_DISPATCH_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msg = AgentMessage::Reports(Vec::new());
        write_message(&mut a, &msg).await.unwrap();
        assert_eq!(
            read_message::<AgentMessage>(&mut b).await.unwrap(),
            Some(msg)
        );
        // A length over the limit, then garbage.
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_message::<AgentMessage>(&mut b).await,
            Err(FrameError::TooLarge(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(
            read_message::<AgentMessage>(&mut b).await,
            Err(FrameError::Malformed(_))
        ));
        drop(a);
        assert!(
            read_message::<AgentMessage>(&mut b)
                .await
                .unwrap()
                .is_none()
        );
    }
}
