//! A watch from a revision the node no longer keeps answers `compacted` (410), through the
//! control socket and through the remote API: after a restart from a snapshot, history
//! before the snapshot is gone.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use starling_api::{Client, ClientError, Context, ErrorCode};

mod common;
use common::{BIN, free_port, poll, spawn};

fn code(r: Result<starling_api::WatchEvents, ClientError>) -> Option<ErrorCode> {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

#[test]
fn t60_watch_from_a_compacted_revision_is_refused_through_both_transports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m1");
    let d = dir.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let local = Client::unix(dir.join("control.sock"));
    let daemon = spawn(&[
        "init",
        "--data-dir",
        d,
        "--listen",
        &listen,
        "--snapshot-interval",
        "5",
    ]);
    poll("m1 serves", Duration::from_secs(20), || {
        rt.block_on(local.nodes()).ok()
    });
    for i in 0..20 {
        rt.block_on(local.kv_put(&format!("k{i}"), "v")).unwrap();
    }
    // Kept history: a watch from revision 1 answers at once.
    assert!(
        !rt.block_on(local.watch("k", 1, 1))
            .unwrap()
            .events
            .is_empty()
    );
    let home = tmp.path().join("home");
    let ctx = tmp.path().join("ctx");
    let out = Command::new(BIN)
        .args([
            "cert",
            "issue",
            "--role",
            "viewer",
            "--name",
            "ro",
            "--data-dir",
            d,
        ])
        .arg("--out")
        .arg(&ctx)
        .env("STARLING_HOME", &home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Restarted from its snapshot, the node no longer has the early revisions.
    drop(daemon);
    let _daemon = spawn(&["run", "--data-dir", d, "--snapshot-interval", "5"]);
    poll("m1 serves again", Duration::from_secs(20), || {
        rt.block_on(local.nodes()).ok()
    });
    assert_eq!(
        code(rt.block_on(local.watch("k", 1, 1))),
        Some(ErrorCode::Compacted)
    );
    let remote = Context::load(&ctx)
        .unwrap()
        .client(Duration::from_secs(2))
        .unwrap();
    assert_eq!(
        code(rt.block_on(remote.watch("k", 1, 1))),
        Some(ErrorCode::Compacted)
    );
    // A watch from now on works through both.
    let now = rt.block_on(local.info()).unwrap().raft.unwrap().applied + 1;
    assert!(
        rt.block_on(remote.watch("k", now, 0))
            .unwrap()
            .events
            .is_empty()
    );
}
