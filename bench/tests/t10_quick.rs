//! A tiny run of every measure: the bench works end to end (both clusters start, every
//! workload runs against both, the tables come out). Needs `etcd` on PATH.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_starling-bench");

#[test]
fn t10_every_measure_runs_quickly_against_both_systems() {
    let data = tempfile::tempdir().unwrap();
    let out_file = data.path().join("report.md");
    let out = Command::new(BIN)
        .args(["all", "--quick", "--data-dir"])
        .arg(data.path())
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for section in [
        "### Durable writes",
        "### The floor under a durable write",
        "### Reads",
        "### Leader failover",
        "### Under load",
        "### Worker join",
        "### Idle memory",
        "### Gossip",
        "fdatasync",
    ] {
        assert!(stdout.contains(section), "{section} missing:\n{stdout}");
    }
    // Every comparison row has figures for both systems and a ratio.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains("clients") && !l.contains("µs"))
        .collect();
    assert_eq!(rows.len(), 4 + 3, "{stdout}");
    // Beside each, the CPU time per operation of both systems' members and clients (the
    // kernel counts it in 10 ms ticks: a cell of the short quick windows may read 0).
    let cpu: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains("clients") && l.contains("µs"))
        .collect();
    assert_eq!(cpu.len(), 4 + 3, "{stdout}");
    for r in cpu {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        for c in &cells[2..6] {
            let us = c.strip_suffix(" µs").map(str::parse::<f64>);
            assert!(us.is_some_and(|v| v.is_ok_and(|v| v >= 0.0)), "{r}");
        }
        assert!(cells[6].ends_with('×') || cells[6] == "—", "{r}");
    }
    for r in rows {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        assert!(cells[2].parse::<f64>().unwrap() > 0.0, "{r}");
        assert!(cells[6].parse::<f64>().unwrap() > 0.0, "{r}");
        assert!(cells[10].ends_with('×'), "{r}");
    }
    // Starling's comparison rows go through the remote API over QUIC; the single-client
    // rows through the control socket are there beside them, with figures.
    assert!(stdout.contains("remote API over QUIC"), "{stdout}");
    let unix: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains("control socket (Unix)") && !l.contains("µs"))
        .collect();
    assert_eq!(unix.len(), 2, "{stdout}");
    for r in unix {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        assert!(cells[2].parse::<f64>().unwrap() > 0.0, "{r}");
    }
    assert!(stdout.contains("| etcd | "), "{stdout}");
    // Under load: a row per round and a total of elections and errors for each system.
    let total = stdout
        .lines()
        .find(|l| l.starts_with("| total |"))
        .unwrap_or_else(|| panic!("no under-load total:\n{stdout}"));
    let cells: Vec<&str> = total.split('|').map(str::trim).collect();
    for i in [3, 4, 6, 7] {
        cells[i]
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{total}"));
    }
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap().lines().count(),
        stdout.lines().count()
    );
}

#[test]
fn t11_bad_input_is_a_clear_error() {
    let out = Command::new(BIN).arg("sideways").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'sideways'"));
    for bad in ["0", "4,0", "many"] {
        let out = Command::new(BIN)
            .args(["writes", "--quick", "--clients", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--clients {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("client counts of at least 1") || err.contains("invalid value 'many'"),
            "--clients {bad}: {err}"
        );
    }
    // Without etcd the comparison cannot run, and says how to get it.
    let out = Command::new(BIN)
        .args(["writes", "--quick"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install -y etcd-server"), "{err}");
}
