//! The leader-only driver of the orchestrators, the scheduler and the reaper: it runs them
//! whenever this manager applies entries (debounced), when a delayed restart comes due, and
//! every second in any case, and writes their plan as batched [`Command::WriteTasks`]
//! entries. On a follower it does nothing; on a new leader it picks up where the state is.

use std::sync::Arc;
use std::time::Duration;

use starling_api::unix_ms;
use starling_raft_store::Store;
use starling_state::{Command, Outcome, TaskOp};
use tracing::{debug, info, warn};

use crate::orchestrator::{OrchestratorConfig, reconcile};
use crate::scheduler::schedule;

/// Ops per log entry: a batch stays far below the command size limit.
const BATCH: usize = 2_000;

/// The most encoded bytes of task changes in one write: half of what a Raft command may
/// hold, so a batch of long explanations never makes a write too large to commit.
const BATCH_BYTES: usize = starling_raft_store::MAX_COMMAND_BYTES / 2;

/// `ops` cut into writes of at most `max_ops` changes and `max_bytes` encoded bytes (a
/// single change larger than that, which the state's limits do not allow, is dropped with a
/// warning rather than stalling every later write).
pub fn batches(ops: Vec<TaskOp>, max_ops: usize, max_bytes: usize) -> Vec<Vec<TaskOp>> {
    let mut out: Vec<Vec<TaskOp>> = Vec::new();
    let mut current: Vec<TaskOp> = Vec::new();
    let mut bytes = 0usize;
    for op in ops {
        let size = postcard::experimental::serialized_size(&op).unwrap_or(usize::MAX);
        if size > max_bytes {
            warn!(size, "a task change too large to write, dropped");
            continue;
        }
        if !current.is_empty() && (current.len() == max_ops || bytes + size > max_bytes) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(op);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Runs the supervisor until the store closes.
pub async fn run(store: Arc<Store>, cfg: OrchestratorConfig) {
    let mut applied = store.object_changes();
    let mut wake_at: Option<u64> = None;
    let mut was_leader = false;
    loop {
        let now = unix_ms();
        let wait = wake_at
            .map_or(Duration::from_secs(1), |w| {
                Duration::from_millis(w.saturating_sub(now))
            })
            .min(Duration::from_secs(1));
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
        // Let a burst of entries land before looking.
        tokio::time::sleep(Duration::from_millis(20)).await;
        applied.borrow_and_update();
        let status = store.status();
        if !status.is_leader || store.stopped().is_some() {
            was_leader = false;
            continue;
        }
        if !was_leader {
            info!("leading: orchestrators and scheduler running");
            was_leader = true;
        }
        let now = unix_ms();
        let ((plan, placements), _) =
            store.read_applied(|s| (reconcile(s, now, &cfg), schedule(s)));
        wake_at = plan.wake_at;
        let mut ops: Vec<TaskOp> = plan.ops;
        ops.extend(placements);
        if ops.is_empty() {
            continue;
        }
        debug!(ops = ops.len(), "writing task changes");
        let mut refused_any = false;
        for chunk in batches(ops, BATCH, BATCH_BYTES) {
            match store
                .write(Command::WriteTasks {
                    at: now,
                    ops: chunk,
                })
                .await
            {
                Ok(r) => {
                    if let Outcome::Tasks { refused, .. } = r.outcome
                        && !refused.is_empty()
                    {
                        refused_any = true;
                        for r in refused.iter().take(5) {
                            debug!(op = r.index, task = ?r.task, reason = %r.refusal, "task change refused");
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "writing task changes failed; trying again");
                    break;
                }
            }
        }
        if refused_any {
            // The state moved under the plan; look again on the next tick rather than at
            // once, so a change refused for good cannot spin.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn explain(i: usize, why_len: usize) -> TaskOp {
        TaskOp::Explain {
            task: format!("task{i}"),
            why: "x".repeat(why_len),
        }
    }

    #[test]
    fn batches_hold_by_count_and_by_encoded_size() {
        let ops: Vec<TaskOp> = (0..10).map(|i| explain(i, 10)).collect();
        let b = batches(ops, 4, 1 << 20);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
        // 1 000-byte reasons, 4 000 bytes a batch: three a batch.
        let ops: Vec<TaskOp> = (0..7).map(|i| explain(i, 1_000)).collect();
        let b = batches(ops, 100, 4_000);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
        for batch in &b {
            let size: usize = batch
                .iter()
                .map(|o| postcard::experimental::serialized_size(o).unwrap())
                .sum();
            assert!(size <= 4_000);
        }
        // One change over the limit is dropped, the others go.
        let ops = vec![explain(0, 10), explain(1, 10_000), explain(2, 10)];
        let b = batches(ops, 100, 4_000);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].len(), 2);
    }
}
