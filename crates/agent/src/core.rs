//! The agent's pure core: from the tasks the managers assigned to this node and what runs
//! locally, the actions that make them agree. No processes, no clock: the driver feeds it.

use std::collections::BTreeMap;

use starling_state::{Task, TaskState};

/// What the agent knows of a task it started (or adopted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Its process runs.
    Running,
    /// A stop was asked; waiting for the process to end.
    Stopping,
    /// It ended (its final status is reported).
    Ended,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start this task's process.
    Start(Box<Task>),
    /// Stop a running task: its stop signal, then a kill after the grace.
    Stop {
        /// Task id.
        task: String,
        /// Signal.
        signal: i32,
        /// Grace before the kill (ms).
        grace_ms: u64,
    },
    /// Forget an ended task the managers no longer list (its files stay until reaped).
    Forget(String),
}

/// The actions for `assigned` (the node's non-ended tasks as the managers see them) and
/// `local` (what runs here) at `now`, and when to look again for a delayed start.
pub fn plan(
    assigned: &BTreeMap<String, Task>,
    local: &BTreeMap<String, Phase>,
    now: u64,
) -> (Vec<Action>, Option<u64>) {
    let mut actions = Vec::new();
    let mut wake: Option<u64> = None;
    for (id, t) in assigned {
        if local.contains_key(id) || t.desired > TaskState::Running || t.status.state.is_terminal()
        {
            continue;
        }
        if t.not_before > now {
            wake = Some(wake.map_or(t.not_before, |w| w.min(t.not_before)));
            continue;
        }
        actions.push(Action::Start(Box::new(t.clone())));
    }
    for (id, phase) in local {
        let wanted = assigned
            .get(id)
            .is_some_and(|t| t.desired <= TaskState::Running && !t.status.state.is_terminal());
        match phase {
            Phase::Running if !wanted => {
                let (signal, grace_ms) = assigned.get(id).map_or((15, 10_000), |t| {
                    (
                        t.template.process.stop_signal,
                        t.template.process.stop_grace_ms,
                    )
                });
                actions.push(Action::Stop {
                    task: id.clone(),
                    signal,
                    grace_ms,
                });
            }
            Phase::Ended if !assigned.contains_key(id) => actions.push(Action::Forget(id.clone())),
            _ => {}
        }
    }
    (actions, wake)
}
