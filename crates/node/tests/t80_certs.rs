//! The certificate lifecycle: certificates of 20 s renew themselves on a 5-node cluster for
//! 3 minutes with no failed request; nodes off past their certificate's expiry renew it
//! within the grace period (a manager from its own CA, a worker through a manager) and are
//! told to rejoin beyond it; idle workers send no renewal requests.
//!
//! The short lifetimes need the hidden `STARLING_TEST_MIN_CERT_EXPIRY_SECS` (a floor under
//! the usual 1 hour, read from the environment only, logged as a warning when set).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use starling_api::{Client, Context, ManagerStatus, NodeDetail, NodeList, NodeRole, NodeStatus};

mod common;
use common::{
    Daemon, free_port, join_args, poll, rt, spawn_with_env, starling, unix, wait_serving,
};

const FLOOR: (&str, &str) = ("STARLING_TEST_MIN_CERT_EXPIRY_SECS", "10");

fn nodes(rt: &tokio::runtime::Runtime, dir: &Path) -> Option<NodeList> {
    rt.block_on(unix(dir).nodes()).ok()
}

/// The record of the node named `hostname`, as `node inspect` shows it.
fn record(rt: &tokio::runtime::Runtime, via: &Path, hostname: &str) -> Option<NodeDetail> {
    let list = nodes(rt, via)?;
    let id = &list.nodes.iter().find(|n| n.hostname == hostname)?.id;
    rt.block_on(unix(via).node(id)).ok()
}

/// When the certificate in a node's data directory expires.
fn cert_expiry(dir: &Path) -> SystemTime {
    starling_transport::NodeCredentials::load(dir)
        .unwrap()
        .identity()
        .not_after
}

fn init(dir: &Path, addr: &str, expiry: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "init",
        "--data-dir",
        dir.to_str().unwrap(),
        "--listen",
        addr,
        "--hostname",
        "m1",
        "--cert-expiry",
        expiry,
    ];
    args.extend_from_slice(extra);
    spawn_with_env(&args, &[FLOOR])
}

fn join(dir: &Path, name: &str, token: &str, manager: &str) -> Daemon {
    let args = join_args(dir, name, token, manager);
    spawn_with_env(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[FLOOR],
    )
}

fn run(dir: &Path) -> Daemon {
    spawn_with_env(&["run", "--data-dir", dir.to_str().unwrap()], &[FLOOR])
}

fn token(rt: &tokio::runtime::Runtime, dir: &Path, role: &str) -> String {
    rt.block_on(unix(dir).join_token(role)).unwrap().token
}

/// Waits until `name` is in node ls, ready, and (a manager) reachable.
fn wait_ready(rt: &tokio::runtime::Runtime, via: &Path, name: &str, within: Duration) {
    poll(&format!("{name} ready"), within, || {
        let list = nodes(rt, via)?;
        list.nodes
            .iter()
            .any(|n| {
                n.hostname == name
                    && n.status == NodeStatus::Ready
                    && (n.role == NodeRole::Worker
                        || matches!(
                            n.manager_status,
                            Some(ManagerStatus::Leader | ManagerStatus::Reachable)
                        ))
            })
            .then_some(())
    });
}

#[test]
fn t80_certificates_of_20s_renew_for_3_minutes_without_a_failed_request() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let mut daemons: BTreeMap<&str, Daemon> = BTreeMap::new();
    daemons.insert("m1", init(&dir("m1"), &m1_addr, "20s", &[]));
    poll("m1 serves", Duration::from_secs(20), || {
        nodes(&rt, &dir("m1"))
    });
    let (mt, wt) = (
        token(&rt, &dir("m1"), "manager"),
        token(&rt, &dir("m1"), "worker"),
    );
    for name in ["m2", "m3", "w1", "w2"] {
        let t = if name.starts_with('m') { &mt } else { &wt };
        daemons.insert(name, join(&dir(name), name, t, &m1_addr));
        // One manager at a time: Raft takes one membership change at a time.
        wait_ready(&rt, &dir("m1"), name, Duration::from_secs(30));
    }
    let cluster = rt.block_on(unix(&dir("m1")).cluster()).unwrap();
    assert_eq!(cluster.settings.cert_expiry_secs, 20);

    // A remote admin client; every request below dials a manager afresh, so each one
    // checks that manager's current certificate in a new handshake.
    let ctx = tmp.path().join("ctx");
    let issued = starling(&[
        "cert",
        "issue",
        "--data-dir",
        dir("m1").to_str().unwrap(),
        "--role",
        "admin",
        "--name",
        "ops",
        "--out",
        ctx.to_str().unwrap(),
    ]);
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let context = Context::load(&ctx).unwrap();
    let managers = context.meta.managers.clone();
    assert_eq!(managers.len(), 3, "{managers:?}");

    let mut serials: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let _in_runtime = rt.enter();
    let start = Instant::now();
    let mut requests = 0usize;
    let mut last_seen = Instant::now() - Duration::from_secs(10);
    while start.elapsed() < Duration::from_secs(180) {
        let m = &managers[requests % managers.len()];
        let client = Client::remote(
            context.credentials().unwrap(),
            vec![m.clone()],
            Duration::from_secs(5),
        )
        .unwrap();
        let key = format!("k{}", requests % 10);
        let put = rt.block_on(client.kv_put(&key, format!("v{requests}").into_bytes()));
        assert!(
            put.is_ok(),
            "request {requests} through {} failed after {:?}: {:?}",
            m.node_id,
            start.elapsed(),
            put.err()
        );
        requests += 1;
        if last_seen.elapsed() >= Duration::from_secs(2) {
            last_seen = Instant::now();
            for name in ["m1", "m2", "m3", "w1", "w2"] {
                let n = record(&rt, &dir("m1"), name).unwrap();
                serials.entry(n.hostname).or_default().insert(n.cert_serial);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Renewed at 50-80 % of what is left: every 10-16 s, so about a dozen times each.
    assert_eq!(serials.len(), 5, "{serials:?}");
    for (node, s) in &serials {
        assert!(s.len() >= 6, "{node} renewed only {} times", s.len() - 1);
    }
    assert!(requests >= 500, "{requests} requests");
    // Every node still ready; a restarted worker comes back with its current certificate.
    for name in ["m1", "m2", "m3", "w1", "w2"] {
        wait_ready(&rt, &dir("m1"), name, Duration::from_secs(10));
    }
    daemons.remove("w1");
    daemons.insert("w1", run(&dir("w1")));
    // The new process serves (the old one's row stays ready for a few seconds, so the
    // managers' view alone would not show it), and the managers see it ready.
    wait_serving(&rt, &dir("w1"), "w1");
    wait_ready(&rt, &dir("m1"), "w1", Duration::from_secs(30));
}

#[test]
fn t81_nodes_off_past_their_expiry_renew_within_the_grace_and_rejoin_beyond_it() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let (m1, w1): (PathBuf, PathBuf) = (tmp.path().join("m1"), tmp.path().join("w1"));
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let mut manager = Some(init(&m1, &m1_addr, "15s", &[]));
    poll("m1 serves", Duration::from_secs(20), || nodes(&rt, &m1));
    let wt = token(&rt, &m1, "worker");
    let mut worker = Some(join(&w1, "w1", &wt, &m1_addr));
    wait_ready(&rt, &m1, "w1", Duration::from_secs(30));
    // Its record is written before the joiner saves its state: wait for the node itself.
    poll("w1 serves", Duration::from_secs(30), || {
        rt.block_on(unix(&w1).info()).ok()
    });

    // Both off until both certificates expired.
    worker.take();
    manager.take();
    let expired = cert_expiry(&m1).max(cert_expiry(&w1));
    poll("both certificates expired", Duration::from_secs(60), || {
        (SystemTime::now() > expired + Duration::from_secs(1)).then_some(())
    });
    // The manager renews its own from the CA in its state; the worker through it.
    manager = Some(run(&m1));
    poll("m1 serves again", Duration::from_secs(30), || {
        nodes(&rt, &m1)
    });
    assert!(cert_expiry(&m1) > SystemTime::now());
    worker = Some(run(&w1));
    poll(
        "w1 back with a new certificate",
        Duration::from_secs(30),
        || {
            let list = nodes(&rt, &m1)?;
            let n = list.nodes.iter().find(|n| n.hostname == "w1")?;
            let fresh = cert_expiry(&w1) > SystemTime::now();
            (n.status == NodeStatus::Ready && fresh).then_some(())
        },
    );
    // The record follows each renewal.
    poll(
        "w1's record names its certificate",
        Duration::from_secs(10),
        || {
            let n = record(&rt, &m1, "w1")?;
            let on_disk = starling_transport::NodeCredentials::load(&w1)
                .unwrap()
                .identity()
                .serial
                .to_string();
            (n.cert_serial == on_disk && n.cert_not_after > 0).then_some(())
        },
    );

    // Beyond the grace: refused, with what to do.
    let update = starling(&[
        "cluster",
        "update",
        "--data-dir",
        m1.to_str().unwrap(),
        "--cert-grace",
        "0s",
    ]);
    assert!(
        update.status.success(),
        "{}",
        String::from_utf8_lossy(&update.stderr)
    );
    assert!(String::from_utf8_lossy(&update.stdout).contains("Renewal grace:       0s"));
    worker.take();
    let expired = cert_expiry(&w1);
    poll("w1's certificate expired", Duration::from_secs(60), || {
        (SystemTime::now() > expired + Duration::from_secs(1)).then_some(())
    });
    let mut again = run(&w1);
    let status = poll("w1 gives up", Duration::from_secs(30), || {
        again.0.try_wait().unwrap()
    });
    assert!(!status.success());
    let log = std::fs::read_to_string(format!("{}.log", w1.display())).unwrap();
    assert!(
        log.contains("beyond the renewal grace") && log.contains("rejoin with a token"),
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
    drop(manager);
}

#[test]
fn t82_idle_workers_send_no_renewal_requests() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let m1 = tmp.path().join("m1");
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let _m1 = init(&m1, &m1_addr, "90d", &["--metrics", &metrics]);
    poll("m1 serves", Duration::from_secs(20), || nodes(&rt, &m1));
    let wt = token(&rt, &m1, "worker");
    let _workers: Vec<Daemon> = (0..20)
        .map(|i| {
            let name = format!("w{i}");
            join(&tmp.path().join(&name), &name, &wt, &m1_addr)
        })
        .collect();
    poll("20 workers ready", Duration::from_secs(60), || {
        let list = nodes(&rt, &m1)?;
        let ready = list
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::Worker && n.status == NodeStatus::Ready)
            .count();
        (ready == 20).then_some(())
    });
    let requests = || -> u64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("starling_join_requests_total "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = requests();
    // The measurement window: with a role check per node per second (the old design) this
    // was 1 200 requests.
    std::thread::sleep(Duration::from_secs(60));
    let during = requests() - before;
    assert!(
        during <= 1,
        "{during} join-protocol requests from 20 idle workers in 60 s"
    );
}

#[test]
fn t83_root_ca_rotation_survives_a_leader_change_and_a_node_that_was_down() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let mut daemons: BTreeMap<&str, Daemon> = BTreeMap::new();
    daemons.insert("m1", init(&dir("m1"), &m1_addr, "1h", &[]));
    poll("m1 serves", Duration::from_secs(20), || {
        nodes(&rt, &dir("m1"))
    });
    let (mt, wt) = (
        token(&rt, &dir("m1"), "manager"),
        token(&rt, &dir("m1"), "worker"),
    );
    for name in ["m2", "m3", "w1", "w2", "w3"] {
        let t = if name.starts_with('m') { &mt } else { &wt };
        daemons.insert(name, join(&dir(name), name, t, &m1_addr));
        wait_ready(&rt, &dir("m1"), name, Duration::from_secs(30));
    }
    let old = rt.block_on(unix(&dir("m1")).cluster()).unwrap();
    assert!(old.ca_rotation.is_none());
    // Its record is written before the joiner saves its state: wait for the node itself.
    poll("w3 serves", Duration::from_secs(30), || {
        rt.block_on(unix(&dir("w3")).info()).ok()
    });

    // w3 goes away and the rotation starts at once, so it waits for w3 until the managers
    // see it down; meanwhile its leader (m1, which initialised the cluster) is killed.
    daemons.remove("w3");
    let started = starling(&[
        "ca",
        "rotate",
        "--detach",
        "--data-dir",
        dir("m1").to_str().unwrap(),
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let out = String::from_utf8_lossy(&started.stdout).to_string();
    assert!(out.contains("Rotating the root CA from sha256:"), "{out}");
    daemons.remove("m1");
    let at_kill = rt.block_on(unix(&dir("m2")).cluster());
    let new_digest = poll(
        "the rotation as m2 sees it",
        Duration::from_secs(20),
        || {
            let v = rt.block_on(unix(&dir("m2")).cluster()).ok()?;
            v.ca_rotation.map(|r| r.new_ca_digest)
        },
    );
    assert_ne!(new_digest, old.ca_digest);
    // Another leader finishes it once m1 and w3 are seen down.
    let done = poll("the rotation finished", Duration::from_secs(60), || {
        let v = rt.block_on(unix(&dir("m2")).cluster()).ok()?;
        (v.ca_rotation.is_none() && v.ca_digest == new_digest).then_some(v)
    });
    assert_eq!(done.ca_digest, new_digest, "{at_kill:?}");
    let finished_by_another = ["m2", "m3"].iter().any(|m| {
        std::fs::read_to_string(format!("{}.log", dir(m).display()))
            .unwrap_or_default()
            .contains("root CA rotation finished")
    });
    assert!(
        finished_by_another,
        "no other manager finished the rotation"
    );
    let status = starling(&["ca", "status", "--data-dir", dir("m2").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        text.contains(&format!("sha256:{new_digest}")) && text.contains("none under way"),
        "{text}"
    );
    // Every node that was up trusts only the new root now.
    for name in ["m2", "m3", "w1", "w2"] {
        poll(
            &format!("{name} on the new root only"),
            Duration::from_secs(20),
            || {
                let creds = starling_transport::NodeCredentials::load(&dir(name)).ok()?;
                let roots: Vec<String> = creds
                    .roots()
                    .iter()
                    .map(|r| starling_transport::CaDigest::of_certificate(r).to_string())
                    .collect();
                (roots == [new_digest.clone()]).then_some(())
            },
        );
    }

    // The old worker token no longer admits anyone; the new one does.
    let w4 = dir("w4");
    let m2_addr = rt.block_on(unix(&dir("m2")).info()).unwrap().addr;
    let mut refused = join(&w4, "w4", &wt, &m2_addr);
    let status = poll("the old token refused", Duration::from_secs(30), || {
        refused.0.try_wait().unwrap()
    });
    assert!(!status.success());
    let why = std::fs::read_to_string(format!("{}.log", w4.display())).unwrap();
    assert!(why.contains("join token is not valid"), "{why}");
    drop(refused);
    let _ = std::fs::remove_dir_all(&w4);
    let new_wt = token(&rt, &dir("m2"), "worker");
    assert_ne!(new_wt, wt);
    daemons.insert("w4", join(&w4, "w4", &new_wt, &m2_addr));
    wait_ready(&rt, &dir("m2"), "w4", Duration::from_secs(30));

    // The nodes that were down come back with certificates of the dropped root: w3 (while
    // m1 is still off, so only managers that dropped the old root can answer it) renews on
    // the expired-certificate path; m1 catches up and renews from its own CA.
    daemons.insert("w3", run(&dir("w3")));
    poll("w3 back on the new root", Duration::from_secs(60), || {
        let n = record(&rt, &dir("m2"), "w3")?;
        (n.status == NodeStatus::Ready && n.cert_ca == new_digest).then_some(())
    });
    daemons.insert("m1", run(&dir("m1")));
    poll("m1 back on the new root", Duration::from_secs(60), || {
        let creds = starling_transport::NodeCredentials::load(&dir("m1")).ok()?;
        let n = record(&rt, &dir("m2"), "m1")?;
        (n.cert_ca == new_digest && creds.roots().len() == 1).then_some(())
    });
    wait_ready(&rt, &dir("m2"), "m1", Duration::from_secs(30));
    let renewed_expired = ["m1", "m2", "m3"]
        .iter()
        .map(|m| {
            std::fs::read_to_string(format!("{}.log", dir(m).display()))
                .unwrap_or_default()
                .matches("renewing an expired certificate")
                .count()
        })
        .sum::<usize>();
    assert!(
        renewed_expired >= 1,
        "w3 did not take the expired-certificate path"
    );

    // Every node on the new root: another rotation may start; the command follows it to the
    // end, showing progress.
    let mut cli = std::process::Command::new(common::BIN)
        .args(["ca", "rotate", "--data-dir", dir("m2").to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = poll("the second rotation", Duration::from_secs(60), || {
        cli.try_wait().unwrap()
    });
    let out = cli.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("nodes on the new root") && text.contains("Root CA rotated to sha256:"),
        "{text}"
    );
    let third = rt.block_on(unix(&dir("m2")).cluster()).unwrap();
    assert_ne!(third.ca_digest, new_digest);
}
