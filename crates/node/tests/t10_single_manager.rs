//! The `starling` binary as an operator uses it: init, client commands over the control
//! socket, restart with `run`, and clear errors for bad input.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{BIN, Daemon, free_port, spawn, starling};

fn wait_ready(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = starling(&[
            "node",
            "ls",
            "--data-dir",
            dir.to_str().unwrap(),
            "--format",
            "json",
        ]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node not ready: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn terminate(mut d: Daemon) {
    let pid = d.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if d.0.try_wait().unwrap().is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "no clean exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn t10_init_commands_restart_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m1");
    let d = dir.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = spawn(&[
        "init",
        "--data-dir",
        d,
        "--listen",
        &listen,
        "--hostname",
        "alpha",
    ]);
    wait_ready(&dir);

    let ls = starling(&["node", "ls", "--data-dir", d, "--format", "json"]);
    let nodes: serde_json::Value = serde_json::from_str(&stdout(&ls)).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    let me = &nodes[0];
    for key in [
        "id",
        "hostname",
        "role",
        "status",
        "availability",
        "manager_status",
        "addr",
        "version",
    ] {
        assert!(me.get(key).is_some(), "missing {key}");
    }
    assert_eq!(me["hostname"], "alpha");
    assert_eq!(me["role"], "manager");
    assert_eq!(me["status"], "ready");
    assert_eq!(me["manager_status"], "leader");
    let table = stdout(&starling(&["node", "ls", "--data-dir", d]));
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("Leader"), "{table}");

    // Key-value: put, get, compare-and-swap (a stale expectation fails with a reason).
    let put = starling(&["kv", "put", "--data-dir", d, "greeting", "hello"]);
    assert!(put.status.success());
    let rev: u64 = stdout(&put)
        .trim()
        .trim_start_matches("revision ")
        .parse()
        .unwrap();
    let get = starling(&["kv", "get", "--data-dir", d, "greeting"]);
    assert_eq!(stdout(&get).trim(), "hello");
    let bad_cas = starling(&[
        "kv",
        "cas",
        "--data-dir",
        d,
        "greeting",
        "--expect-revision",
        &(rev + 100).to_string(),
        "x",
    ]);
    assert!(!bad_cas.status.success());
    let err = String::from_utf8_lossy(&bad_cas.stderr);
    assert!(
        err.contains("compare failed") && !err.contains("backtrace"),
        "{err}"
    );
    let cas = starling(&[
        "kv",
        "cas",
        "--data-dir",
        d,
        "greeting",
        "--expect-revision",
        &rev.to_string(),
        "hi",
    ]);
    assert!(
        cas.status.success(),
        "{}",
        String::from_utf8_lossy(&cas.stderr)
    );
    let stale = starling(&[
        "kv",
        "get",
        "--data-dir",
        d,
        "greeting",
        "--consistency",
        "stale",
    ]);
    assert_eq!(stdout(&stale).trim(), "hi");
    let bad = starling(&[
        "kv",
        "get",
        "--data-dir",
        d,
        "greeting",
        "--consistency",
        "eventual",
    ]);
    assert!(!bad.status.success());

    // Node operations: update availability, inspect, refuse to remove a live manager.
    let id = me["id"].as_str().unwrap().to_owned();
    assert!(
        starling(&[
            "node",
            "update",
            "--data-dir",
            d,
            "--availability",
            "drain",
            &id
        ])
        .status
        .success()
    );
    let inspect: serde_json::Value = serde_json::from_str(&stdout(&starling(&[
        "node",
        "inspect",
        "--data-dir",
        d,
        &id,
    ])))
    .unwrap();
    assert_eq!(inspect["availability"], "drain");
    let bad = starling(&[
        "node",
        "update",
        "--data-dir",
        d,
        "--availability",
        "sideways",
        &id,
    ]);
    assert!(!bad.status.success());
    let rm = starling(&["node", "rm", "--data-dir", d, &id]);
    assert!(String::from_utf8_lossy(&rm.stderr).contains("not down"));
    let rm = starling(&["node", "rm", "--data-dir", d, &id, "--force"]);
    assert!(String::from_utf8_lossy(&rm.stderr).contains("demote it first"));
    let missing = starling(&["node", "inspect", "--data-dir", d, "nosuchnode"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such node"));

    // Watch from a revision: history first, then live changes, in order.
    let mut watch = Command::new(BIN)
        .args([
            "kv",
            "watch",
            "--data-dir",
            d,
            "greeting",
            "--from-revision",
            &rev.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let del = starling(&["kv", "del", "--data-dir", d, "greeting"]);
    assert!(del.status.success());
    let stdout_pipe = watch.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout_pipe)
            .lines()
            .take(3)
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines.is_finished() {
        assert!(Instant::now() < deadline, "watch printed too little");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let lines = lines.join().unwrap();
    assert!(lines[0].ends_with("PUT greeting hello"), "{lines:?}");
    assert!(lines[1].ends_with("PUT greeting hi"), "{lines:?}");
    assert!(lines[2].ends_with("DELETE greeting"), "{lines:?}");
    assert!(
        starling(&["kv", "put", "--data-dir", d, "greeting", "hi"])
            .status
            .success()
    );

    // Join tokens parse and differ per role.
    let w = stdout(&starling(&["join-token", "--data-dir", d, "worker", "-q"]));
    let m = stdout(&starling(&["join-token", "--data-dir", d, "manager", "-q"]));
    let wt: starling_transport::JoinToken = w.trim().parse().unwrap();
    let mt: starling_transport::JoinToken = m.trim().parse().unwrap();
    assert_eq!(wt.ca_digest, mt.ca_digest);
    assert_ne!(wt, mt);

    // Bad input: a second init on the same directory; the same port taken.
    let again = starling(&[
        "init",
        "--data-dir",
        d,
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a node"));
    let other = tmp.path().join("other");
    let busy = starling(&[
        "init",
        "--data-dir",
        other.to_str().unwrap(),
        "--listen",
        &listen,
    ]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("cannot listen"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );

    // SIGTERM, then `run` brings back the same node with its data.
    let id = me["id"].as_str().unwrap().to_owned();
    terminate(daemon);
    let _daemon = spawn(&["run", "--data-dir", d]);
    wait_ready(&dir);
    let get = starling(&["kv", "get", "--data-dir", d, "greeting"]);
    assert_eq!(stdout(&get).trim(), "hi");
    let ls = stdout(&starling(&[
        "node",
        "ls",
        "--data-dir",
        d,
        "--format",
        "json",
    ]));
    assert!(ls.contains(&id));

    // A client pointed at a directory with no node says so.
    let none = starling(&[
        "node",
        "ls",
        "--data-dir",
        tmp.path().join("nothing").to_str().unwrap(),
    ]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("control socket"));
}

#[test]
fn t11_config_file_supplies_flags_and_mistakes_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let cfg = tmp.path().join("starling.toml");
    let listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\nlisten = \"{listen}\"\nhostname = \"from-file\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let _d = spawn(&["--config", cfg.to_str().unwrap(), "init"]);
    wait_ready(&dir);
    let ls = stdout(&starling(&[
        "--config",
        cfg.to_str().unwrap(),
        "node",
        "ls",
        "--format",
        "json",
    ]));
    assert!(ls.contains("from-file"), "{ls}");

    // No listen address anywhere: the error says the three ways to give one.
    let other = tmp.path().join("o");
    let out = starling(&["init", "--data-dir", other.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen is required") && err.contains("STARLING_LISTEN"),
        "{err}"
    );
    // A typo in the file is named.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "listn = \"127.0.0.1:1\"\n").unwrap();
    let out = starling(&["--config", bad.to_str().unwrap(), "init"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listn"));
}
