//! Task logs: what `service logs` streams, and the protocol a manager uses to fetch them
//! from the node that runs a task.
//!
//! ```text
//!   CLI ──GET /v1/services/{id}/logs──▶ any manager ──ALPN starling/logs/1──▶ each node's agent
//!       ◀── NDJSON LogRecords ────────── merges, adds ◀── LogsFrames (postcard) ─┘  (reads the
//!           (line | notice | idle)        task.slot@node                            task's files)
//! ```
//!
//! A task's output sits in its directory on its node (`stdout.log`, `stderr.log`, each cut
//! at a size cap into `.1`). The agent indexes each file every [`INDEX_TICK`]: an entry
//! `(time, length)` whenever it grew, so every line has a time — the first index entry that
//! covers its end — that is the same whichever manager asks and whenever. A follow only
//! sends indexed lines, so a stream resumed with `since` = the last time it saw plus one
//! loses nothing and repeats nothing once it ended idle.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The ALPN of the logs protocol (managers ask, every node's agent answers).
pub const LOGS_ALPN: &[u8] = b"starling/logs/1";

/// How often an agent indexes its running tasks' log files (the resolution of a line's time
/// and the delay of a followed line).
pub const INDEX_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// A line longer than this is cut into pieces of this size (as docker's 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

/// Which output of the task a line came from.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl LogStream {
    /// Both, stdout first (the order of lines with the same time).
    pub const ALL: [LogStream; 2] = [LogStream::Stdout, LogStream::Stderr];

    /// Its file's base name in a task's directory (`stdout`, `stderr`).
    pub fn name(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// A manager's request to an agent, the first frame of a logs stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Task ids (on the agent's node).
    pub tasks: Vec<String>,
    /// Only the last N lines of each task.
    pub tail: Option<u64>,
    /// Only lines at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Keep sending new lines after the backlog.
    pub follow: bool,
}

/// One line of one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLine {
    /// Task id.
    pub task: String,
    /// Which output.
    pub stream: LogStream,
    /// When it was written (ms since the Unix epoch, to [`INDEX_TICK`]).
    pub time_ms: u64,
    /// The text, without its newline (invalid UTF-8 replaced).
    pub line: String,
}

/// An agent's answer frames, after the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogsFrame {
    /// Lines, in time order per task.
    Lines(Vec<TaskLine>),
    /// A task whose logs this node does not have.
    Missing {
        /// Task id.
        task: String,
        /// Why.
        why: String,
    },
    /// The backlog of every task was sent; what follows is new.
    CaughtUp,
    /// Nothing new (sent now and then while following, so a gone reader is noticed).
    Heartbeat,
}

/// One NDJSON record of `GET /v1/services/{id}/logs` and `GET /v1/tasks/{id}/logs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogRecord {
    /// A line of a task's output.
    Line {
        /// Task id.
        task: String,
        /// Service name.
        service: String,
        /// Slot number, or the node id of a global service's task.
        slot: String,
        /// Host name of the task's node.
        node: String,
        /// Which output.
        stream: LogStream,
        /// When it was written (ms since the Unix epoch).
        time: u64,
        /// The text, without its newline.
        line: String,
    },
    /// Something the reader should know: a node that is down or unreachable, a task whose
    /// logs are gone.
    Notice {
        /// What happened.
        message: String,
    },
    /// A follow that had nothing to send for the node's long-poll cap ended; ask again with
    /// `since` = the last line's time + 1 to go on without a gap or a repeat.
    Idle {
        /// How long it was quiet (ms).
        quiet_ms: u64,
    },
}

impl LogRecord {
    /// `service.slot.task@node`, the prefix `service logs` prints before a line.
    pub fn prefix(&self) -> Option<String> {
        match self {
            LogRecord::Line {
                task,
                service,
                slot,
                node,
                ..
            } => Some(format!(
                "{service}.{slot}.{}@{node}",
                &task[..task.len().min(12)]
            )),
            _ => None,
        }
    }
}

/// Whether `id` may name a task directory: letters, digits, `-` and `_`, 1 to 64 of them
/// (what a hostile request cannot turn into a path elsewhere).
pub fn valid_task_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_travel_tagged_and_task_ids_are_checked() {
        let r = LogRecord::Line {
            task: "abcdef0123456789".into(),
            service: "web".into(),
            slot: "2".into(),
            node: "w1".into(),
            stream: LogStream::Stderr,
            time: 5,
            line: "hi".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""kind":"line""#), "{text}");
        assert!(text.contains(r#""stream":"stderr""#), "{text}");
        assert_eq!(serde_json::from_str::<LogRecord>(&text).unwrap(), r);
        assert_eq!(r.prefix().unwrap(), "web.2.abcdef012345@w1");
        for bad in ["", "../x", "a/b", ".", &"x".repeat(65)] {
            assert!(!valid_task_id(bad), "{bad}");
        }
        assert!(valid_task_id("t-1_Z"));
    }
}
