//! Certificate renewal: the join-protocol requests (joins, renewals, role checks) that reach
//! a manager from idle workers, counted on its metrics, and how the renewals of many nodes
//! whose certificates were issued in the same second spread over time.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use crate::cluster::{Proc, free_port, poll, starling_binary};

/// One manager (with `--metrics`) and `workers` workers on loopback; once every worker is
/// ready, the manager's `starling_join_requests_total` is read before and after `window`.
pub async fn idle_requests(
    base: &Path,
    workers: usize,
    window: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let bin = starling_binary()?;
    std::fs::create_dir_all(base)?;
    let m0 = base.join("m0");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let mut procs = vec![Proc::spawn(
        Command::new(&bin)
            .args([
                "init",
                "--listen",
                &addr,
                "--metrics",
                &metrics,
                "--data-dir",
            ])
            .arg(&m0),
        &base.join("m0.log"),
    )?];
    let client = starling_api::Client::unix(m0.join("control.sock"));
    poll("the manager serves", Duration::from_secs(30), || async {
        client.nodes().await.ok()
    })
    .await?;
    let token = client.join_token("worker").await?.token;
    for i in 0..workers {
        let dir = base.join(format!("w{i}"));
        procs.push(Proc::spawn(
            Command::new(&bin)
                .args(["join", "--token", &token, "--manager", &addr, "--listen"])
                .arg(format!("127.0.0.1:{}", free_port()?))
                .args(["--hostname", &format!("w{i}"), "--data-dir"])
                .arg(&dir)
                // Many nodes on one host: none serves DNS.
                .args(["--dns-listen", "off"]),
            &base.join(format!("w{i}.log")),
        )?);
    }
    poll(
        "every worker ready",
        Duration::from_secs(30 + 2 * workers as u64),
        || async {
            let list = client.nodes().await.ok()?;
            let ready = list
                .nodes
                .iter()
                .filter(|n| {
                    n.role == starling_api::NodeRole::Worker
                        && n.status == starling_api::NodeStatus::Ready
                })
                .count();
            (ready == workers).then_some(())
        },
    )
    .await?;
    let before = join_requests(&metrics).await?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let after = join_requests(&metrics).await?;
    drop(procs);
    Ok((after.saturating_sub(before), t0.elapsed()))
}

async fn join_requests(metrics: &str) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(metrics).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    text.lines()
        .find_map(|l| l.strip_prefix("starling_join_requests_total "))
        .context("no starling_join_requests_total in the metrics")?
        .trim()
        .parse()
        .context("a bad counter")
}

/// The most renewals in any one-second window when `nodes` certificates of `lifetime` are
/// issued in the same second, each node renewing at its own random point
/// ([`starling_transport::renewal_time`]); and the span they cover.
pub fn spread(nodes: usize, lifetime: Duration, seed: u64) -> (usize, Duration) {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let not_after = now + lifetime;
    let mut state = seed | 1;
    let mut secs: Vec<u64> = (0..nodes)
        .map(|_| {
            // xorshift64: uniform enough for a spread figure, and repeatable.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let jitter = (state >> 11) as f64 / (1u64 << 53) as f64;
            starling_transport::renewal_time(now, not_after, jitter)
                .duration_since(now)
                .map_or(0, |d| d.as_secs())
        })
        .collect();
    secs.sort_unstable();
    let mut most = 0;
    let mut lo = 0;
    for hi in 0..secs.len() {
        while secs[hi] - secs[lo] >= 1 {
            lo += 1;
        }
        most = most.max(hi - lo + 1);
    }
    let span = secs.last().zip(secs.first()).map_or(0, |(l, f)| l - f);
    (most, Duration::from_secs(span))
}

/// The section of the report.
pub async fn run(base: &Path, workers: usize, window: Duration) -> anyhow::Result<String> {
    let (requests, took) = idle_requests(base, workers, window).await?;
    let mut out = String::new();
    writeln!(out, "## Certificate renewal\n")?;
    writeln!(
        out,
        "Join-protocol requests (joins, renewals, role checks) reaching the manager from {workers} idle workers, counted on its metrics over {:.0} s once every worker was ready:\n",
        took.as_secs_f64()
    )?;
    writeln!(
        out,
        "| measure | Starling | before (a role check per node per second) |"
    )?;
    writeln!(out, "|---|---|---|")?;
    writeln!(
        out,
        "| requests/s from {workers} idle workers | **{:.3}** (target < 1) | {workers} |",
        requests as f64 / took.as_secs_f64()
    )?;
    writeln!(
        out,
        "\nRenewals of 1 000 nodes whose certificates were issued in the same second (each at its own random 50–80 % of the lifetime):\n"
    )?;
    writeln!(out, "| lifetime | most renewals in any 1 s | spread over |")?;
    writeln!(out, "|---|---|---|")?;
    for (name, lifetime) in [
        ("90 days (default)", Duration::from_secs(90 * 86_400)),
        ("1 hour (the shortest allowed)", Duration::from_secs(3600)),
    ] {
        let (most, span) = spread(1_000, lifetime, 0x5eed);
        writeln!(out, "| {name} | {most} | {:.0} s |", span.as_secs_f64())?;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renewals_spread_over_three_tenths_of_the_lifetime() {
        let (most, span) = spread(1_000, Duration::from_secs(3600), 7);
        // 1 000 renewals over 1 080 s: a handful in the busiest second, not a herd.
        assert!(most <= 8, "{most}");
        assert!(span >= Duration::from_secs(1_000), "{span:?}");
        let (one, _) = spread(1, Duration::from_secs(3600), 7);
        assert_eq!(one, 1);
        assert_eq!(spread(0, Duration::from_secs(3600), 7).0, 0);
    }
}
