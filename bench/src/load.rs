//! Closed-loop load: N clients, each with its own connection, each sending its next request
//! when the last one is answered; latencies in an HDR histogram per client, merged.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What one run of a workload measured.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Operations answered successfully in the measured window.
    pub ops: u64,
    /// Operations that failed in the measured window.
    pub errors: u64,
    /// The measured window.
    pub window: Duration,
    /// Latency percentiles in microseconds: p50, p99, p99.9.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// CPU time spent over the window, when measured ([`run_measured`]).
    pub cpu: Option<CpuSpent>,
}

/// CPU time (user + system) spent over a measured window.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSpent {
    /// By the system's member processes together.
    pub members: Duration,
    /// By this process: the clients.
    pub client: Duration,
}

/// CPU time of a process so far (user + system, from `/proc/PID/stat`); zero if it is gone.
pub fn cpu_time(pid: Option<u32>) -> Duration {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    // utime and stime are fields 14 and 15, so the 12th and 13th after it.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

fn cpu_now(members: &[u32]) -> CpuSpent {
    CpuSpent {
        members: members.iter().map(|p| cpu_time(Some(*p))).sum(),
        client: cpu_time(None),
    }
}

impl Figures {
    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Microseconds of CPU per successful operation: by the members, by the client.
    pub fn cpu_per_op_us(&self) -> Option<(f64, f64)> {
        let cpu = self.cpu.filter(|_| self.ops > 0)?;
        let ops = self.ops as f64;
        Some((
            cpu.members.as_secs_f64() * 1e6 / ops,
            cpu.client.as_secs_f64() * 1e6 / ops,
        ))
    }
}

/// The key of operation `n` of client `client`: 8 bytes over a 100 000-key space, spread by
/// a multiplicative hash so clients do not walk the same keys in step.
pub fn key(client: usize, n: u64, space: u64) -> String {
    let x =
        (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (client as u64).wrapping_mul(0xC2B2_AE3D)) % space;
    format!("{x:08}")
}

/// A 256-byte value.
pub fn value() -> Vec<u8> {
    vec![b'v'; 256]
}

/// Runs `clients` for `warmup` (not recorded) then `window` (recorded); returns the merged
/// figures. `op(client, index, n)` does operation `n` of client `index` and hands the client
/// back with the outcome.
pub async fn run<C, F, Fut>(clients: Vec<C>, warmup: Duration, window: Duration, op: F) -> Figures
where
    C: Send + 'static,
    F: Fn(C, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (C, Result<(), String>)> + Send,
{
    run_from(
        Instant::now() + Duration::from_millis(20),
        clients,
        warmup,
        window,
        op,
    )
    .await
}

/// [`run`], the clients starting at `start`.
async fn run_from<C, F, Fut>(
    start: Instant,
    clients: Vec<C>,
    warmup: Duration,
    window: Duration,
    op: F,
) -> Figures
where
    C: Send + 'static,
    F: Fn(C, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (C, Result<(), String>)> + Send,
{
    let record_from = start + warmup;
    let end = record_from + window;
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
            let (mut ops, mut errors) = (0u64, 0u64);
            tokio::time::sleep_until(start.into()).await;
            let mut n = 0u64;
            let mut c = Some(c);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let Some(client) = c.take() else { break };
                let (client, r) = op(client, i, n).await;
                c = Some(client);
                n += 1;
                if t >= record_from {
                    match r {
                        Ok(()) => {
                            ops += 1;
                            let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, ops, errors)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
    let (mut ops, mut errors) = (0, 0);
    for t in tasks {
        if let Ok((h, o, e)) = t.await {
            let _ = all.add(&h);
            ops += o;
            errors += e;
        }
    }
    Figures {
        ops,
        errors,
        window,
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        p999_us: all.value_at_quantile(0.999),
        cpu: None,
    }
}

/// [`run`], with the CPU time the processes `members` and this process spent over the
/// measured window.
pub async fn run_measured<C, F, Fut>(
    members: Vec<u32>,
    clients: Vec<C>,
    warmup: Duration,
    window: Duration,
    op: F,
) -> Figures
where
    C: Send + 'static,
    F: Fn(C, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (C, Result<(), String>)> + Send,
{
    let start = Instant::now() + Duration::from_millis(20);
    let record_from = start + warmup;
    let end = record_from + window;
    // Asked once here, not inside the first sample.
    clock_ticks();
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(record_from.into()).await;
        let a = cpu_now(&members);
        tokio::time::sleep_until(end.into()).await;
        let b = cpu_now(&members);
        CpuSpent {
            members: b.members.saturating_sub(a.members),
            client: b.client.saturating_sub(a.client),
        }
    });
    let mut f = run_from(start, clients, warmup, window, op).await;
    f.cpu = sampler.await.ok();
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_eight_bytes_in_the_space() {
        for c in 0..4 {
            for n in 0..1000 {
                let k = key(c, n, 100_000);
                assert_eq!(k.len(), 8);
                assert!(k.parse::<u64>().is_ok_and(|x| x < 100_000));
            }
        }
        assert_eq!(value().len(), 256);
    }

    #[tokio::test]
    async fn a_run_counts_only_the_window_and_reports_errors() {
        let f = run(
            vec![0u64; 4],
            Duration::from_millis(50),
            Duration::from_millis(200),
            |c: u64, _, n| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let r = if n % 10 == 9 { Err("x".into()) } else { Ok(()) };
                (c + 1, r)
            },
        )
        .await;
        assert!(f.ops > 100, "{f:?}");
        assert!(f.errors > 0 && f.errors < f.ops, "{f:?}");
        assert!(f.cpu.is_none());
        assert!(f.p50_us >= 1000, "{f:?}");
        assert!(f.rate() > 0.0);
    }

    #[tokio::test]
    async fn a_measured_run_counts_the_cpu_of_its_window() {
        // This process plays the member too: both figures read the same counters.
        let me = std::process::id();
        let f = run_measured(
            vec![me],
            vec![0u64],
            Duration::from_millis(20),
            Duration::from_millis(300),
            |c: u64, _, _| async move {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(5) {
                    std::hint::spin_loop();
                }
                // Let the sampler run on this (single-threaded) runtime, as network waits do.
                tokio::task::yield_now().await;
                (c, Ok(()))
            },
        )
        .await;
        let cpu = f.cpu.expect("measured");
        assert!(cpu.client > Duration::ZERO, "{cpu:?}");
        let gap = cpu.client.abs_diff(cpu.members);
        assert!(gap <= Duration::from_millis(20), "{cpu:?}");
        let (m, c) = f.cpu_per_op_us().expect("measured");
        assert!(m > 0.0 && c > 0.0);
        assert_eq!(cpu_time(Some(u32::MAX)), Duration::ZERO, "no such process");
    }
}
