//! Polling for work before sleeping, while busy: the rule the log writer and a node's
//! runtime share.
//!
//! A thread that sleeps is woken through the kernel, and on a virtual machine whose idle CPUs
//! halt (no guest halt-polling) that wake-up goes through the host: tens of microseconds,
//! several times per replicated write at one client. A thread that is still running when
//! its work arrives needs none. Go's scheduler, which etcd runs on, spins likewise before it
//! parks.
//!
//! Whether a thread is busy is judged from its recent sleeps ([`Sleeps`], a moving average):
//! an idle node's thread, woken every 30 ms by heartbeats for a few short sleeps in a row,
//! averages well above the threshold, sleeps at once and spends nothing; one serving a client
//! write after write sleeps for tenths of a millisecond each time and polls.

use std::time::Duration;

/// How long a thread about to sleep first polls for work, from its recent sleeps. The
/// default polls never.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollBeforeSleep {
    /// The most one sleep starts with polling; zero turns polling off.
    pub budget: Duration,
}

impl PollBeforeSleep {
    /// The thread polls only while its sleeps average at most this many budgets.
    pub const BUSY_FACTOR: u32 = 4;

    /// Polling for at most `budget` per sleep.
    pub fn new(budget: Duration) -> Self {
        PollBeforeSleep { budget }
    }

    /// How long to poll before the next sleep.
    pub fn poll_for(&self, sleeps: &Sleeps) -> Duration {
        match sleeps.average {
            Some(average) if average <= self.threshold() => self.budget,
            _ => Duration::ZERO,
        }
    }

    /// Records a sleep that lasted `slept` (polling included).
    pub fn record(&self, sleeps: &mut Sleeps, slept: Duration) {
        // One long sleep counts as at most ten thresholds, so a thread busy again after a
        // pause of seconds polls within a few dozen sleeps.
        let sample = slept.min(self.threshold() * 10);
        sleeps.average = Some(match sleeps.average {
            None => sample,
            Some(average) if sample >= average => average + (sample - average) / 8,
            Some(average) => average - (average - sample) / 8,
        });
    }

    fn threshold(&self) -> Duration {
        self.budget * Self::BUSY_FACTOR
    }
}

/// One thread's recent sleeps: their moving average (weight 1/8 on the last).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sleeps {
    average: Option<Duration>,
}

impl Sleeps {
    /// The moving average; `None` before the first sleep.
    pub fn average(&self) -> Option<Duration> {
        self.average
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// Records `n` sleeps of `each`.
    fn sleep(p: &PollBeforeSleep, s: &mut Sleeps, n: usize, each: Duration) {
        for _ in 0..n {
            p.record(s, each);
        }
    }

    #[test]
    fn polls_while_sleeps_are_short_and_not_between_heartbeats() {
        let p = PollBeforeSleep::new(250 * US);
        let mut s = Sleeps::default();
        assert_eq!(
            p.poll_for(&s),
            Duration::ZERO,
            "the first sleep starts at once"
        );
        // A client's writes, one after another: sleeps of tenths of a millisecond.
        sleep(&p, &mut s, 1, 300 * US);
        assert_eq!(p.poll_for(&s), 250 * US);
        sleep(&p, &mut s, 50, 150 * US);
        assert_eq!(p.poll_for(&s), 250 * US);
        // Idle: a heartbeat every 30 ms, each followed by two short sleeps.
        for _ in 0..100 {
            sleep(&p, &mut s, 1, Duration::from_millis(30));
            assert_eq!(p.poll_for(&s), Duration::ZERO);
            sleep(&p, &mut s, 2, 100 * US);
            assert_eq!(p.poll_for(&s), Duration::ZERO, "{s:?}");
        }
        // Busy again after a pause of seconds: polling within a few dozen sleeps.
        sleep(&p, &mut s, 1, Duration::from_secs(5));
        sleep(&p, &mut s, 20, 200 * US);
        assert_eq!(p.poll_for(&s), 250 * US, "{s:?}");
    }

    #[test]
    fn a_zero_budget_never_polls() {
        let off = PollBeforeSleep::default();
        let mut s = Sleeps::default();
        sleep(&off, &mut s, 10, Duration::ZERO);
        assert_eq!(off.poll_for(&s), Duration::ZERO);
    }
}
