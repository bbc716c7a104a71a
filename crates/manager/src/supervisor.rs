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

/// Runs the supervisor until the store closes.
pub async fn run(store: Arc<Store>, cfg: OrchestratorConfig) {
    let mut applied = store.applied_changes();
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
        for chunk in ops.chunks(BATCH) {
            match store
                .write(Command::WriteTasks {
                    at: now,
                    ops: chunk.to_vec(),
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
