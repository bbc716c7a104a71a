//! The API's typed errors through the Unix socket and through QUIC (`starling/api/1`), client
//! certificates (admin, viewer, revoked), node certificates refused on the API protocol, and
//! context failover when a manager dies.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use starling_api::{Client, ClientError, Consistency, Context, ErrorCode, ManagerAddr};

mod common;
use common::{BIN, Daemon, free_port, poll, rt, spawn, starling, wait_serving};

fn with_home(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("STARLING_HOME", home)
        .env_remove("STARLING_CONTEXT")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> Option<ErrorCode> {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

struct Cluster {
    // Dropped in this order: the daemons, then the mounts under the directory, then it.
    daemons: Vec<Option<Daemon>>,
    _mounts: Vec<Tmpfs>,
    dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

/// A tmpfs of a given size mounted on a directory for the guard's life (needs root, as
/// the netns tests do); unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test fills a small tmpfs and needs root to mount it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }

    /// Writes zeros into `name` until the file system is full.
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join(name)).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

impl Cluster {
    fn dir(&self, i: usize) -> &str {
        self.dirs[i].to_str().unwrap()
    }

    fn unix(&self, i: usize) -> Client {
        Client::unix(self.dirs[i].join("control.sock"))
    }
}

/// Three managers and a worker on loopback.
fn cluster() -> Cluster {
    cluster_with(|_| Vec::new())
}

/// Three managers and a worker on loopback, `mounts` made on their directories (m1, m2, m3,
/// w1) before anything starts.
fn cluster_with(mounts: impl FnOnce(&[PathBuf]) -> Vec<Tmpfs>) -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = ["m1", "m2", "m3", "w1"]
        .iter()
        .map(|n| tmp.path().join(n))
        .collect();
    let mounts = mounts(&dirs);
    let m1_addr = format!("127.0.0.1:{}", free_port());
    let mut daemons = vec![Some(spawn(&[
        "init",
        "--data-dir",
        dirs[0].to_str().unwrap(),
        "--listen",
        &m1_addr,
        "--hostname",
        "m1",
    ]))];
    let rt = rt();
    let c0 = Client::unix(dirs[0].join("control.sock"));
    poll("m1 serves", Duration::from_secs(20), || {
        rt.block_on(c0.nodes()).ok()
    });
    let mt = rt.block_on(c0.join_token("manager")).unwrap().token;
    let wt = rt.block_on(c0.join_token("worker")).unwrap().token;
    for (i, name) in ["m2", "m3", "w1"].iter().enumerate() {
        let token = if *name == "w1" { &wt } else { &mt };
        daemons.push(Some(spawn(&[
            "join",
            "--data-dir",
            dirs[i + 1].to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--hostname",
            name,
            "--token",
            token,
            "--manager",
            &m1_addr,
        ])));
        // One manager join at a time: Raft takes one membership change at a time.
        poll(
            &format!("{name} in node ls"),
            Duration::from_secs(30),
            || {
                let list = rt.block_on(c0.nodes()).ok()?;
                list.nodes
                    .iter()
                    .any(|n| {
                        n.hostname == *name
                            && (n.role == starling_api::NodeRole::Worker
                                || n.manager_status == Some(starling_api::ManagerStatus::Reachable))
                    })
                    .then_some(())
            },
        );
        wait_serving(&rt, &dirs[i + 1], name);
    }
    Cluster {
        daemons,
        _mounts: mounts,
        dirs,
        _tmp: tmp,
    }
}

#[test]
fn t50_typed_errors_certificates_and_context_failover() {
    let mut c = cluster();
    let rt = rt();
    // QUIC clients bind their endpoint on this runtime.
    let _in_runtime = rt.enter();
    let home = c._tmp.path().join("home");
    let ctx_dir = |n: &str| c._tmp.path().join(format!("ctx-{n}"));
    // A fresh client of a context, dials bounded by `secs`.
    let remote = |n: &str, secs: u64| {
        Context::load(&ctx_dir(n))
            .unwrap()
            .client(Duration::from_secs(secs))
            .unwrap()
    };

    // A QUIC endpoint on loopback with `creds` (or none).
    let bind_endpoint = |creds: Option<starling_transport::NodeCredentials>| {
        starling_transport::Endpoint::bind(
            starling_transport::EndpointConfig::default(),
            starling_transport::ring_provider(),
            creds,
        )
        .unwrap()
    };

    // Typed errors through the Unix socket.
    let local = c.unix(0);
    rt.block_on(local.kv_put("k", "v")).unwrap();
    assert_eq!(
        code(rt.block_on(local.kv_get("missing", Consistency::Linearizable))),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(rt.block_on(local.kv_cas("k", 9_999, "x"))),
        Some(ErrorCode::CompareFailed)
    );
    assert_eq!(
        code(rt.block_on(local.join_token("bogus"))),
        Some(ErrorCode::InvalidArgument)
    );
    let m1_id = rt.block_on(local.info()).unwrap().node_id;
    assert_eq!(
        code(rt.block_on(local.promote(&m1_id))),
        Some(ErrorCode::Conflict)
    );
    let raw = rt
        .block_on(local.raw(
            starling_api::http::Method::DELETE,
            "/v1/info",
            bytes::Bytes::new(),
        ))
        .unwrap();
    let e: starling_api::ApiError = serde_json::from_slice(&raw.body).unwrap();
    assert_eq!((raw.status, e.code), (405, ErrorCode::MethodNotAllowed));
    assert_eq!(
        code(rt.block_on(c.unix(3).nodes())),
        Some(ErrorCode::Unavailable),
        "a worker serves no cluster state"
    );
    // Over the command limit (1 MiB), and over the body limit (16 MiB): too_large.
    assert_eq!(
        code(rt.block_on(local.kv_put("big", vec![7u8; 2 << 20]))),
        Some(ErrorCode::TooLarge)
    );
    assert_eq!(
        code(rt.block_on(local.kv_put("huge", vec![7u8; 17 << 20]))),
        Some(ErrorCode::TooLarge)
    );
    // A value that is not UTF-8 round-trips.
    let bytes: Vec<u8> = vec![0xff, 0x00, 0xfe, b'a'];
    rt.block_on(local.kv_put("bin", bytes.clone())).unwrap();
    let e = rt
        .block_on(local.kv_get("bin", Consistency::Linearizable))
        .unwrap();
    assert_eq!((e.value.clone(), e.bytes().unwrap()), (None, bytes));

    // Client certificates: the key is made by the CLI, the context written and registered.
    for (name, role) in [("ops", "admin"), ("ro", "viewer"), ("tmp", "admin")] {
        ok(&with_home(
            &home,
            &[
                "cert",
                "issue",
                "--data-dir",
                c.dir(0),
                "--role",
                role,
                "--name",
                name,
                "--out",
                ctx_dir(name).to_str().unwrap(),
            ],
        ));
    }
    let listed = ok(&with_home(&home, &["context", "ls"]));
    assert!(listed.contains("ops") && listed.contains("ro"), "{listed}");
    let ls = ok(&with_home(&home, &["--context", "ops", "node", "ls"]));
    assert_eq!(ls.lines().count(), 5, "{ls}");
    assert!(ls.contains(starling_api::VERSION), "{ls}");
    // The context in use serves commands given neither --context nor --data-dir; a context
    // directory works as well as a name; a removed name no longer resolves.
    ok(&with_home(&home, &["context", "use", "ops"]));
    assert!(ok(&with_home(&home, &["context", "ls"])).contains("* ops"));
    assert_eq!(ok(&with_home(&home, &["node", "ls"])).lines().count(), 5);
    let by_dir = ctx_dir("ro");
    let members = ok(&with_home(
        &home,
        &["--context", by_dir.to_str().unwrap(), "members"],
    ));
    assert!(members.contains("alive"), "{members}");
    ok(&with_home(&home, &["context", "rm", "tmp"]));
    let gone = with_home(&home, &["--context", "tmp", "node", "ls"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no context"));
    ok(&with_home(
        &home,
        &["context", "import", ctx_dir("tmp").to_str().unwrap()],
    ));
    // A context is never written over a directory that is not one (a node's data dir).
    let clobber = with_home(
        &home,
        &[
            "cert",
            "issue",
            "--data-dir",
            c.dir(0),
            "--role",
            "admin",
            "--name",
            "x",
            "--out",
            c.dir(1),
        ],
    );
    assert!(!clobber.status.success());
    assert!(String::from_utf8_lossy(&clobber.stderr).contains("not a context directory"));
    let certs = ok(&with_home(&home, &["cert", "ls", "--data-dir", c.dir(0)]));
    assert!(
        !certs.lines().any(|l| l.starts_with("x ")),
        "a refused issue recorded a client: {certs}"
    );
    // Typed errors through QUIC.
    let admin = remote("ops", 2);
    let viewer = remote("ro", 2);
    assert_eq!(
        rt.block_on(viewer.kv_get("k", Consistency::Linearizable))
            .unwrap()
            .value
            .as_deref(),
        Some("v")
    );
    assert_eq!(
        code(rt.block_on(viewer.kv_put("k", "w"))),
        Some(ErrorCode::PermissionDenied)
    );
    assert_eq!(
        code(rt.block_on(viewer.join_token("manager"))),
        Some(ErrorCode::PermissionDenied),
        "a viewer must not read the keys to the cluster"
    );
    // API client certificates are not gossip members.
    {
        let creds = Context::load(&ctx_dir("ops"))
            .unwrap()
            .credentials()
            .unwrap();
        let endpoint = bind_endpoint(Some(creds));
        let gossip = starling_transport::Protocol::new(
            b"starling/gossip/3".to_vec(),
            starling_transport::PeerPolicy::roles([starling_transport::Role::MANAGER]),
        )
        .unwrap();
        let m1 = rt.block_on(local.info()).unwrap();
        let r = rt.block_on(endpoint.connect(
            &gossip,
            &starling_transport::NodeId::new(m1.node_id.clone()).unwrap(),
            m1.addr.parse().unwrap(),
        ));
        assert!(r.is_err(), "an admin certificate joined gossip");
    }
    let denied = with_home(&home, &["--context", "ro", "kv", "put", "k", "w"]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("viewer"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    assert_eq!(
        code(rt.block_on(admin.kv_get("missing", Consistency::Stale))),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(rt.block_on(admin.kv_cas("k", 9_999, "x"))),
        Some(ErrorCode::CompareFailed)
    );
    assert_eq!(
        code(rt.block_on(admin.join_token("bogus"))),
        Some(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        code(rt.block_on(admin.promote(&m1_id))),
        Some(ErrorCode::Conflict)
    );
    assert_eq!(
        code(rt.block_on(admin.leave())),
        Some(ErrorCode::PermissionDenied),
        "a remote client cannot make a manager leave"
    );
    assert_eq!(
        code(rt.block_on(admin.kv_put("big", vec![7u8; 2 << 20]))),
        Some(ErrorCode::TooLarge)
    );
    let raw = rt
        .block_on(admin.raw(
            starling_api::http::Method::DELETE,
            "/v1/info",
            bytes::Bytes::new(),
        ))
        .unwrap();
    let e: starling_api::ApiError = serde_json::from_slice(&raw.body).unwrap();
    assert_eq!((raw.status, e.code), (405, ErrorCode::MethodNotAllowed));
    assert_eq!(
        rt.block_on(admin.kv_get("k", Consistency::Linearizable))
            .unwrap()
            .value
            .as_deref(),
        Some("v")
    );

    // Node certificates are refused on the API protocol, manager and worker alike.
    let managers = admin.managers();
    for node in [1, 3] {
        let creds = starling_transport::NodeCredentials::load(&c.dirs[node]).unwrap();
        let as_node = Client::remote(creds, managers.clone(), Duration::from_secs(2)).unwrap();
        let r = rt.block_on(as_node.info());
        assert!(
            matches!(r, Err(ClientError::NotSent(_))),
            "a node certificate reached the API: {r:?}"
        );
    }

    // Clients made on one endpoint share its socket: their calls run at once, each on its
    // own connection, and when the endpoint closes none of them can send.
    let ops_creds = Context::load(&ctx_dir("ops"))
        .unwrap()
        .credentials()
        .unwrap();
    let shared = bind_endpoint(Some(ops_creds));
    let on_shared: Vec<Client> = (0..6)
        .map(|_| Client::remote_on(&shared, managers.clone(), Duration::from_secs(2)).unwrap())
        .collect();
    let written = rt.block_on(futures::future::join_all(on_shared.iter().enumerate().map(
        |(i, c)| async move { c.kv_put(&format!("shared-{i}"), format!("v{i}")).await },
    )));
    assert!(written.iter().all(Result::is_ok), "{written:?}");
    for (i, c) in on_shared.iter().enumerate() {
        let e = rt
            .block_on(c.kv_get(
                &format!("shared-{}", (i + 1) % 6),
                Consistency::Linearizable,
            ))
            .unwrap();
        assert_eq!(e.value, Some(format!("v{}", (i + 1) % 6)));
    }
    rt.block_on(shared.close());
    for c in &on_shared {
        let r = rt.block_on(c.info());
        assert!(
            matches!(r, Err(ClientError::NotSent(_))),
            "a client of a closed endpoint still sends: {r:?}"
        );
    }
    let bare = bind_endpoint(None);
    let r = Client::remote_on(&bare, managers.clone(), Duration::from_secs(2));
    assert!(
        matches!(r, Err(ClientError::NotSent(ref e)) if e.contains("no client certificate")),
        "{r:?}"
    );

    // A revoked client certificate is refused by every manager.
    let tmp_client = remote("tmp", 2);
    rt.block_on(tmp_client.info()).unwrap();
    ok(&with_home(
        &home,
        &["cert", "revoke", "--data-dir", c.dir(0), "tmp"],
    ));
    let certs = ok(&with_home(&home, &["cert", "ls", "--data-dir", c.dir(0)]));
    assert!(certs.contains("tmp"), "{certs}");
    // Refused on the connection it already has open, and on new ones.
    poll(
        "the revoked client refused on its open connection",
        Duration::from_secs(10),
        || rt.block_on(tmp_client.info()).is_err().then_some(()),
    );
    poll(
        "the revoked client refused",
        Duration::from_secs(10),
        || {
            let fresh = remote("tmp", 2);
            rt.block_on(fresh.info()).is_err().then_some(())
        },
    );

    // A write whose answer is lost is outcome_unknown (504), through both transports: the
    // leader is paused (SIGSTOP) just before a follower forwards two writes to it, and the
    // other two managers elect a new leader while the writes are in flight.
    let (leader_idx, follower_idx) = {
        let infos: Vec<_> = (0..3)
            .map(|i| rt.block_on(c.unix(i).info()).unwrap())
            .collect();
        let leader = infos[0].raft.as_ref().unwrap().leader.unwrap();
        let l = (0..3)
            .find(|i| infos[*i].raft.as_ref().unwrap().id == leader)
            .unwrap();
        (l, (l + 1) % 3)
    };
    let follower_addr = ManagerAddr {
        node_id: rt.block_on(c.unix(follower_idx).info()).unwrap().node_id,
        addr: rt.block_on(c.unix(follower_idx).info()).unwrap().addr,
    };
    let through_follower = Client::remote(
        Context::load(&ctx_dir("ops"))
            .unwrap()
            .credentials()
            .unwrap(),
        vec![follower_addr],
        Duration::from_secs(2),
    )
    .unwrap();
    rt.block_on(through_follower.info()).unwrap();
    let via_socket = c.unix(follower_idx);
    rt.block_on(via_socket.info()).unwrap();
    let leader_pid = c.daemons[leader_idx].as_ref().unwrap().0.id().to_string();
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &leader_pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let (a, b) = rt.block_on(async {
        tokio::join!(
            via_socket.kv_put("in-flight", "1"),
            through_follower.kv_put("in-flight", "2")
        )
    });
    signal("-CONT");
    // Forwarded to the stopped leader, a write has no answer: outcome_unknown, never retried.
    // A follower that already found the leader quiet (a loaded machine, a late request)
    // waits for the new leader instead, and the write is acknowledged: also right. Nothing
    // else is.
    for r in [a, b] {
        match r {
            Ok(_) => {}
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::OutcomeUnknown), "{e}"),
        }
    }
    poll("three managers again", Duration::from_secs(30), || {
        let list = rt.block_on(local.nodes()).ok()?;
        let ok = list
            .nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.manager_status,
                    Some(
                        starling_api::ManagerStatus::Leader
                            | starling_api::ManagerStatus::Reachable
                    )
                )
            })
            .count();
        (ok == 3).then_some(())
    });

    // Failover: with one manager killed, a command through the context succeeds through
    // another within 3 s, whichever manager it tries first.
    let ids: Vec<u64> = (0..3)
        .map(|i| rt.block_on(c.unix(i).info()).unwrap().raft.unwrap().id)
        .collect();
    let leader = rt.block_on(local.info()).unwrap().raft.unwrap().leader;
    let leader_idx = (0..3).find(|i| Some(ids[*i]) == leader).unwrap();
    let follower = (0..3).find(|i| *i != leader_idx).unwrap();
    // The killed manager first in the context.
    let mut ctx = Context::load(&ctx_dir("ops")).unwrap();
    let killed_id = rt.block_on(c.unix(follower).info()).unwrap().node_id;
    let mut first: Vec<ManagerAddr> = ctx.meta.managers.clone();
    first.sort_by_key(|m| m.node_id != killed_id);
    ctx.meta.managers = first;
    starling_api::Context::save(&ctx.dir, &ctx.meta, &ctx.credentials().unwrap()).unwrap();
    c.daemons[follower] = None;
    for _ in 0..3 {
        let started = Instant::now();
        let out = with_home(&home, &["--context", "ops", "kv", "get", "k"]);
        let took = started.elapsed();
        assert_eq!(ok(&out).trim(), "v");
        assert!(took < Duration::from_secs(3), "failover took {took:?}");
    }

    // Without a quorum: no_quorum through the leader's socket, within a bounded time.
    let other = (0..3).find(|i| *i != follower && *i != leader_idx).unwrap();
    c.daemons[other] = None;
    let r = rt.block_on(c.unix(leader_idx).kv_put("k", "lost"));
    assert_eq!(code(r), Some(ErrorCode::NoQuorum));
    // And through QUIC: the client passes over the dead managers to the live one.
    let fresh = remote("ops", 1);
    let r = rt.block_on(fresh.kv_put("k", "lost"));
    assert_eq!(code(r), Some(ErrorCode::NoQuorum));
    let _ = starling(&["node", "ls", "--data-dir", c.dir(leader_idx)]);
}

#[test]
fn t51_a_manager_whose_disk_fills_up_answers_unavailable_and_nothing_is_lost() {
    let mut c = cluster_with(|dirs| vec![Tmpfs::mount(&dirs[1], "32m")]);
    let rt = rt();
    let _in_runtime = rt.enter();
    let local = c.unix(0);
    let m2 = c.unix(1);
    for i in 0..20 {
        rt.block_on(local.kv_put(&format!("before-{i}"), "1"))
            .unwrap();
    }
    poll("m2 has every write", Duration::from_secs(20), || {
        rt.block_on(m2.kv_get("before-19", Consistency::Stale)).ok()
    });
    let ctx = c._tmp.path().join("ctx");
    let issued = starling(&[
        "cert",
        "issue",
        "--data-dir",
        c.dir(0),
        "--role",
        "admin",
        "--name",
        "ops",
        "--out",
        ctx.to_str().unwrap(),
    ]);
    ok(&issued);
    let context = Context::load(&ctx).unwrap();
    let m2_id = rt.block_on(m2.info()).unwrap().node_id;
    // A fresh client that knows only m2 (a client learns the other managers from its
    // first answer, and then fails over to them).
    let only_m2 = || {
        Client::remote(
            context.credentials().unwrap(),
            context
                .meta
                .managers
                .iter()
                .filter(|m| m.node_id == m2_id)
                .cloned()
                .collect(),
            Duration::from_secs(2),
        )
        .unwrap()
    };
    rt.block_on(only_m2().info()).unwrap();

    // m2's disk fills up. The majority (m1, m3) goes on taking writes; m2's log append fails
    // and its Raft stops, while the process keeps serving its API.
    c._mounts[0].fill("filler");
    // Values larger than a page: the log's last page has no room for them.
    let big = "2".repeat(16 << 10);
    for i in 0..20 {
        rt.block_on(local.kv_put(&format!("during-{i}"), big.clone()))
            .unwrap();
    }
    let unavailable = |r: Result<starling_api::KvEntry, ClientError>| match r {
        Err(ClientError::Api(e)) if e.code == ErrorCode::Unavailable => Some(e.error),
        _ => None,
    };
    let why = poll(
        "m2 unavailable through its socket",
        Duration::from_secs(30),
        || unavailable(rt.block_on(m2.kv_get("during-19", Consistency::Linearizable))),
    );
    assert!(why.contains("No space left on device"), "{why}");
    let why = unavailable(rt.block_on(only_m2().kv_get("during-19", Consistency::Linearizable)))
        .unwrap_or_else(|| {
            panic!(
                "{:?}",
                rt.block_on(only_m2().kv_get("during-19", Consistency::Linearizable))
                    .err()
            )
        });
    assert!(why.contains("No space left on device"), "{why}");
    let stopped = rt.block_on(m2.info()).unwrap().raft.unwrap().stopped;
    assert!(
        stopped
            .as_deref()
            .is_some_and(|s| s.contains("No space left on device")),
        "{stopped:?}"
    );
    // Stale reads and writes are refused too: a stopped manager is behind by an unknown
    // amount.
    let r = rt.block_on(m2.kv_get("before-0", Consistency::Stale));
    assert_eq!(code(r), Some(ErrorCode::Unavailable));
    let r = rt.block_on(only_m2().kv_put("refused", "x"));
    assert_eq!(code(r), Some(ErrorCode::Unavailable));
    assert!(
        c.daemons[1]
            .as_mut()
            .unwrap()
            .0
            .try_wait()
            .unwrap()
            .is_none(),
        "m2 exited"
    );
    // A client of the whole context passes over m2 to a manager that answers.
    for _ in 0..5 {
        let client = context.client(Duration::from_secs(2)).unwrap();
        let got = rt.block_on(client.kv_get("during-19", Consistency::Linearizable));
        assert_eq!(got.unwrap().value.as_deref(), Some(big.as_str()));
    }

    // Space freed and m2 restarted: it catches up and has every acknowledged write.
    std::fs::remove_file(c.dirs[1].join("filler")).unwrap();
    c.daemons[1] = None;
    c.daemons[1] = Some(spawn(&["run", "--data-dir", c.dir(1)]));
    poll(
        "m2 reads linearizably again",
        Duration::from_secs(30),
        || {
            rt.block_on(m2.kv_get("during-19", Consistency::Linearizable))
                .ok()
        },
    );
    for key in (0..20).flat_map(|i| [format!("before-{i}"), format!("during-{i}")]) {
        let e = rt.block_on(m2.kv_get(&key, Consistency::Stale)).unwrap();
        assert!(e.value.is_some(), "{key} lost");
    }
    rt.block_on(only_m2().kv_put("after", "3")).unwrap();
    let r = rt.block_on(local.kv_get("refused", Consistency::Linearizable));
    assert_eq!(code(r), Some(ErrorCode::NotFound));
}
