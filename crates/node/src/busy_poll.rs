//! While a node is busy, its threads poll for work briefly before they sleep: the runtime
//! thread its sockets, the log writer its queue.
//!
//! A thread that sleeps in `epoll_wait` is woken through the kernel when a datagram arrives,
//! and on a virtual machine whose idle CPUs halt (no guest halt-polling) that wake-up goes
//! through the host: tens of microseconds, four to six times per replicated write at one
//! client. A thread still running when the datagram arrives needs none.
//!
//! The rule is [`PollBeforeSleep`]'s: poll for at most the budget (`STARLING_BUSY_POLL_US`,
//! default [`DEFAULT_BUDGET`]), and only while the thread's recent sleeps are short, so an
//! idle node, woken every 30 ms by heartbeats, sleeps at once and spends nothing.
//! The runtime's poll ends as soon as a watched socket has a datagram or another thread
//! scheduled a task, or at the budget. It yields the CPU between polls, so a process sharing
//! the core runs meanwhile. A timer due while the thread polls fires up to one budget late.
//!
//! Only tokio's current-thread runtime (`STARLING_THREADS=1`) polls its sockets: there the
//! thread that parks is the one that reads them. The log writer polls with any runtime.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use starling_raft_store::{PollBeforeSleep, Sleeps};
use starling_transport::{Endpoint, ReadinessProbe};

/// How long a thread polls at most, unless `STARLING_BUSY_POLL_US` says otherwise: long
/// enough to cover a follower's sync and a round trip between members (a replicated write's
/// longest wait at one client), short enough to cost little when nothing comes.
pub const DEFAULT_BUDGET: Duration = Duration::from_micros(250);

/// The most `STARLING_BUSY_POLL_US` accepts.
pub const MAX_BUDGET: Duration = Duration::from_millis(10);

/// The process's rule, set once at start ([`set_policy`]).
static POLICY: OnceLock<PollBeforeSleep> = OnceLock::new();

/// Sets the process's rule (the first call wins); the log writer of a store opened after
/// this follows it.
pub fn set_policy(policy: PollBeforeSleep) {
    let _ = POLICY.set(policy);
}

/// The process's rule: off unless [`set_policy`] was called.
pub fn policy() -> PollBeforeSleep {
    POLICY.get().copied().unwrap_or_default()
}

/// Reads `STARLING_BUSY_POLL_US`; unset means [`DEFAULT_BUDGET`].
pub fn policy_from_env() -> Result<PollBeforeSleep, String> {
    match std::env::var_os("STARLING_BUSY_POLL_US") {
        None => Ok(PollBeforeSleep::new(DEFAULT_BUDGET)),
        Some(v) => parse(&v),
    }
}

/// Parses a budget in microseconds, 0 (off) to 10 000.
pub fn parse(value: &std::ffi::OsStr) -> Result<PollBeforeSleep, String> {
    match value.to_str().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(us) if Duration::from_micros(us) <= MAX_BUDGET => {
            Ok(PollBeforeSleep::new(Duration::from_micros(us)))
        }
        _ => Err(format!(
            "STARLING_BUSY_POLL_US={}: expected microseconds from 0 (off) to {}",
            value.to_string_lossy(),
            MAX_BUDGET.as_micros()
        )),
    }
}

/// The sockets a parked runtime polls: every endpoint the node binds.
static WATCHED: Mutex<Vec<ReadinessProbe>> = Mutex::new(Vec::new());

/// Adds `endpoint`'s socket to those a parked runtime polls. Probes of closed endpoints are
/// dropped here.
pub fn watch(endpoint: &Endpoint) {
    let mut watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    watched.retain(ReadinessProbe::is_open);
    watched.push(endpoint.readiness_probe());
}

/// The runtime's park and unpark hooks (`on_thread_park`, `on_thread_unpark`).
#[derive(Debug)]
pub struct BusyPoll {
    policy: PollBeforeSleep,
    state: Mutex<Sleep>,
}

#[derive(Debug, Default)]
struct Sleep {
    /// When the current park began (its polling included).
    since: Option<Instant>,
    /// The recent ones.
    sleeps: Sleeps,
}

impl BusyPoll {
    /// Hooks that poll as `policy` says.
    pub fn new(policy: PollBeforeSleep) -> BusyPoll {
        BusyPoll {
            policy,
            state: Mutex::new(Sleep::default()),
        }
    }

    /// Before the thread sleeps: polls the watched sockets if the policy says so.
    pub fn before_park(&self) {
        let start = Instant::now();
        let poll_for = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.since = Some(start);
            self.policy.poll_for(&state.sleeps)
        };
        // The hook runs inside the runtime's context.
        if let (false, Ok(runtime)) = (poll_for.is_zero(), tokio::runtime::Handle::try_current()) {
            // Polled under the lock, which only `watch` takes besides, when a node binds.
            let watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
            poll_until(start + poll_for, &watched, &runtime.metrics());
        }
    }

    /// After the thread woke: records how long it was parked.
    pub fn after_unpark(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = state.since.take() {
            self.policy.record(&mut state.sleeps, since.elapsed());
        }
    }
}

/// Why a poll ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// A watched socket has a datagram.
    Datagram,
    /// Another thread scheduled a task on the runtime.
    Task,
    /// Nothing came before the deadline.
    Deadline,
}

/// Polls until a watched socket has a datagram, a task waits in the runtime's shared queue
/// (woken by another thread, such as the log writer's syncs), or the deadline.
fn poll_until(
    deadline: Instant,
    watched: &[ReadinessProbe],
    runtime: &tokio::runtime::RuntimeMetrics,
) -> Ended {
    loop {
        if runtime.global_queue_depth() > 0 {
            return Ended::Task;
        }
        if watched.iter().any(|p| p.datagram_waiting() == Some(true)) {
            return Ended::Datagram;
        }
        if Instant::now() >= deadline {
            return Ended::Deadline;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// An endpoint on a free loopback port; needs a runtime.
    fn loopback_endpoint() -> Endpoint {
        Endpoint::bind(
            starling_transport::EndpointConfig::default(),
            starling_transport::ring_provider(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_poll_ends_on_a_datagram_a_task_from_another_thread_or_the_deadline() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Inside block_on but without awaiting, as the park hook runs: the endpoint's driver
        // does not get to read the datagram.
        runtime.block_on(async {
            let endpoint = loopback_endpoint();
            let watched = [endpoint.readiness_probe()];
            let metrics = tokio::runtime::Handle::current().metrics();
            let soon = || Instant::now() + Duration::from_millis(2);
            assert_eq!(poll_until(soon(), &watched, &metrics), Ended::Deadline);
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            sender.send_to(b"not quic", endpoint.local_addr()).unwrap();
            let far = Instant::now() + Duration::from_secs(30);
            assert_eq!(poll_until(far, &watched, &metrics), Ended::Datagram);
            let handle = tokio::runtime::Handle::current();
            std::thread::spawn(move || drop(handle.spawn(async {})))
                .join()
                .unwrap();
            assert_eq!(poll_until(far, &[], &metrics), Ended::Task);
        });
    }

    #[test]
    fn the_hooks_measure_each_sleep_and_a_closed_endpoint_is_dropped() {
        let hooks = std::sync::Arc::new(BusyPoll::new(PollBeforeSleep::new(
            Duration::from_millis(1),
        )));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park({
                let h = hooks.clone();
                move || h.before_park()
            })
            .on_thread_unpark({
                let h = hooks.clone();
                move || h.after_unpark()
            })
            .build()
            .unwrap();
        let average = || hooks.state.lock().unwrap().sleeps.average().unwrap();
        runtime.block_on(async {
            let endpoint = loopback_endpoint();
            watch(&endpoint);
            tokio::time::sleep(Duration::from_millis(60)).await;
            // A sleep of 60 ms counts as 40 (ten thresholds of 4 ms), at a weight of 1/8.
            assert!(average() >= Duration::from_millis(5), "{:?}", average());
            let sleeps = hooks.state.lock().unwrap().sleeps;
            assert_eq!(hooks.policy.poll_for(&sleeps), Duration::ZERO);
            drop(endpoint);
            tokio::time::sleep(Duration::from_millis(10)).await;
        });
        drop(runtime);
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        other.block_on(async {
            let endpoint = loopback_endpoint();
            watch(&endpoint);
            let watched = WATCHED.lock().unwrap();
            assert!(watched.iter().all(ReadinessProbe::is_open));
        });
    }

    #[test]
    fn a_bad_budget_is_refused() {
        let parse = |v: &str| parse(std::ffi::OsStr::new(v)).map(|p| p.budget);
        assert_eq!(parse("250"), Ok(Duration::from_micros(250)));
        assert_eq!(parse(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse("10000"), Ok(MAX_BUDGET));
        let err = parse("10001").unwrap_err();
        assert!(err.contains("STARLING_BUSY_POLL_US=10001"), "{err}");
        assert!(parse("fast").is_err());
        assert!(parse("-1").is_err());
    }
}
