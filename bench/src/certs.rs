//! Certificate renewal: the join-protocol requests (joins, renewals, role checks) that reach
//! a manager from idle workers, counted on its metrics, and how the renewals of many nodes
//! whose certificates were issued in the same second spread over time.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use crate::cluster::{Proc, exited, free_port, poll, ready_nodes, starling_binary};

/// A cluster on loopback: `managers` managers (the first with `--metrics` on the returned
/// address, when `metrics`) and `workers` workers, returned once every node is ready, the
/// first manager first and the workers last. None serves DNS.
pub(crate) async fn start(
    base: &Path,
    managers: usize,
    workers: usize,
    metrics: bool,
) -> anyhow::Result<(Vec<Proc>, starling_api::Client, String)> {
    let bin = starling_binary()?;
    std::fs::create_dir_all(base)?;
    let m0 = base.join("m0");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut init = Command::new(&bin);
    init.args(["init", "--listen", &addr, "--dns-listen", "off"]);
    let metrics = if metrics {
        let at = format!("127.0.0.1:{}", free_port()?);
        init.args(["--metrics", &at]);
        at
    } else {
        String::new()
    };
    let mut procs = vec![Proc::spawn(
        init.arg("--data-dir").arg(&m0),
        &base.join("m0.log"),
    )?];
    let client = starling_api::Client::unix(m0.join("control.sock"));
    poll("the manager serves", Duration::from_secs(30), || async {
        client.nodes().await.ok()
    })
    .await?;
    let mut names = vec!["m0".to_owned()];
    let manager_token = client.join_token("manager").await?.token;
    for i in 1..managers {
        names.push(format!("m{i}"));
        procs.push(join(base, &bin, &manager_token, &addr, &names[i])?);
        // One at a time: Raft takes one membership change at a time.
        let wait = Duration::from_secs(60);
        let role = starling_api::NodeRole::Manager;
        ready(base, &client, &mut procs, &names, role, i + 1, wait).await?;
    }
    let token = client.join_token("worker").await?.token;
    for i in 0..workers {
        names.push(format!("w{i}"));
        procs.push(join(base, &bin, &token, &addr, &names[managers + i])?);
    }
    let wait = Duration::from_secs(30 + 2 * workers as u64);
    let role = starling_api::NodeRole::Worker;
    ready(base, &client, &mut procs, &names, role, workers, wait).await?;
    Ok((procs, client, metrics))
}

/// Waits `within` until `want` nodes of `role` are ready, and fails at once when one of
/// `procs` (called `names`, their logs in `base`) has exited.
async fn ready(
    base: &Path,
    client: &starling_api::Client,
    procs: &mut [Proc],
    names: &[String],
    role: starling_api::NodeRole,
    want: usize,
    within: Duration,
) -> anyhow::Result<()> {
    ready_nodes(client, Some(role), want, within, || {
        exited(base, names.iter().map(String::as_str).zip(procs.iter_mut()))
    })
    .await
}

fn join(base: &Path, bin: &Path, token: &str, manager: &str, name: &str) -> anyhow::Result<Proc> {
    Proc::spawn(
        Command::new(bin)
            .args(["join", "--token", token, "--manager", manager, "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()?))
            .args(["--hostname", name, "--data-dir"])
            .arg(base.join(name))
            // Many nodes on one host: none serves DNS.
            .args(["--dns-listen", "off"]),
        &base.join(format!("{name}.log")),
    )
}

/// One manager (with `--metrics`) and `workers` workers on loopback; once every worker is
/// ready, the manager's `starling_join_requests_total` is read before and after `window`.
pub async fn idle_requests(
    base: &Path,
    workers: usize,
    window: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let (procs, _client, metrics) = start(base, 1, workers, true).await?;
    let before = join_requests(&metrics).await?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let after = join_requests(&metrics).await?;
    drop(procs);
    Ok((after.saturating_sub(before), t0.elapsed()))
}

/// How long `starling ca rotate` takes on a cluster of `managers` + `workers` nodes, for
/// `rounds` rotations one after another: from the request until the cluster reports the
/// new root as its CA (every node renewed onto it, then the old root dropped). Also the time
/// until every node was on the new root (the first phase).
pub async fn rotation(
    base: &Path,
    managers: usize,
    workers: usize,
    rounds: usize,
) -> anyhow::Result<Vec<(Duration, Duration)>> {
    let (procs, client, _) = start(base, managers, workers, false).await?;
    let mut out = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let started = client.rotate_ca().await?;
        let digest = started
            .ca_rotation
            .context("no rotation under way after ca rotate")?
            .new_ca_digest;
        let mut all_on_new = None;
        loop {
            let v = client.cluster().await?;
            match &v.ca_rotation {
                Some(r) if r.nodes_pending.is_empty() => {
                    all_on_new.get_or_insert_with(|| t0.elapsed());
                }
                Some(_) => {}
                None if v.ca_digest == digest => break,
                None => anyhow::bail!("the cluster rotated to another root"),
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(120),
                "the rotation did not finish in 2 minutes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let done = t0.elapsed();
        out.push((all_on_new.unwrap_or(done), done));
        // Every node drops the old root before the next round.
        for n in client.nodes().await?.nodes {
            let detail = client.node(&n.id).await?;
            anyhow::ensure!(
                detail.cert_ca == digest,
                "{} not on the new root after the rotation",
                n.hostname
            );
        }
    }
    drop(procs);
    Ok(out)
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
pub async fn run(
    base: &Path,
    workers: usize,
    window: Duration,
    rotation_nodes: (usize, usize),
    rotation_rounds: usize,
) -> anyhow::Result<String> {
    let (requests, took) = idle_requests(&base.join("idle"), workers, window).await?;
    let rotations = rotation(
        &base.join("rotation"),
        rotation_nodes.0,
        rotation_nodes.1,
        rotation_rounds,
    )
    .await?;
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
    let (m, w) = rotation_nodes;
    writeln!(
        out,
        "\n`starling ca rotate` on {} nodes ({m} managers, {w} workers) on loopback, {} rotations one after another: from the request until the cluster reports the new root as its CA (every node renewed onto the new root, then the old root dropped and the tokens changed):\n",
        m + w,
        rotations.len()
    )?;
    writeln!(out, "| rotation | every node on the new root | done |")?;
    writeln!(out, "|---|---|---|")?;
    for (i, (on_new, done)) in rotations.iter().enumerate() {
        writeln!(
            out,
            "| {} | {:.0} ms | {:.0} ms |",
            i + 1,
            on_new.as_secs_f64() * 1e3,
            done.as_secs_f64() * 1e3
        )?;
    }
    let mut done: Vec<Duration> = rotations.iter().map(|r| r.1).collect();
    done.sort();
    if let Some(median) = done.get(done.len() / 2) {
        writeln!(out, "\nMedian: **{:.2} s**.", median.as_secs_f64())?;
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
