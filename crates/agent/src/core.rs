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
    /// Report a task that was assigned here but is no longer wanted before it ever started:
    /// it ends `shutdown` without running.
    NeverStarted(String),
}

/// The actions for `assigned` (the node's non-ended tasks as the managers see them) and
/// `local` (what runs here) at `now`, and when to look again for a delayed start. Until
/// `synced` (the first full assignment set of the agent's life has arrived), nothing local
/// is stopped or forgotten: an agent that restarts keeps its adopted tasks running until it
/// knows what the managers want.
pub fn plan(
    assigned: &BTreeMap<String, Task>,
    local: &BTreeMap<String, Phase>,
    synced: bool,
    now: u64,
) -> (Vec<Action>, Option<u64>) {
    let mut actions = Vec::new();
    let mut wake: Option<u64> = None;
    for (id, t) in assigned {
        if local.contains_key(id) || t.status.state.is_terminal() {
            continue;
        }
        if t.desired > TaskState::Running {
            actions.push(Action::NeverStarted(id.clone()));
            continue;
        }
        if t.not_before > now {
            wake = Some(wake.map_or(t.not_before, |w| w.min(t.not_before)));
            continue;
        }
        actions.push(Action::Start(Box::new(t.clone())));
    }
    if !synced {
        return (actions, wake);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn task(id: &str, desired: TaskState, state: TaskState, not_before: u64) -> Task {
        let mut t = crate::testing::task(id, &["sleep"], state);
        t.desired = desired;
        t.not_before = not_before;
        t
    }

    #[test]
    fn adopted_tasks_are_kept_until_the_first_full_set() {
        let local = BTreeMap::from([("a".to_owned(), Phase::Running)]);
        let none = BTreeMap::new();
        assert!(plan(&none, &local, false, 0).0.is_empty());
        let (actions, _) = plan(&none, &local, true, 0);
        assert!(matches!(&actions[..], [Action::Stop { task, .. }] if task == "a"));
    }

    #[test]
    fn starts_waits_for_a_delay_and_ends_what_never_started() {
        let assigned = BTreeMap::from([
            (
                "now".to_owned(),
                task("now", TaskState::Running, TaskState::Assigned, 0),
            ),
            (
                "later".to_owned(),
                task("later", TaskState::Running, TaskState::Assigned, 50),
            ),
            (
                "gone".to_owned(),
                task("gone", TaskState::Remove, TaskState::Assigned, 0),
            ),
        ]);
        let (actions, wake) = plan(&assigned, &BTreeMap::new(), true, 10);
        assert_eq!(wake, Some(50));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Start(t) if t.id == "now"))
        );
        assert!(actions.contains(&Action::NeverStarted("gone".into())));
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::Start(t) if t.id == "later"))
        );
    }
}
