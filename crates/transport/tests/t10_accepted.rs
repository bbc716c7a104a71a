//! Connections that must work: every ALPN a role allows, each message kind, the pool,
//! rotation and the CA-pinned join.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use starling_transport::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_every_role_on_every_alpn_it_may_use() {
    let c = Cluster::new("c1");
    let m1 = c.endpoint("m1", Role::MANAGER);
    for p in [raft(), gossip(), join()] {
        serve_echo(&m1, &p);
    }
    let m2 = c.endpoint("m2", Role::MANAGER);
    let w1 = c.endpoint("w1", Role::WORKER);
    let cases = [
        (&m2, raft(), Role::MANAGER),
        (&m2, gossip(), Role::MANAGER),
        (&m2, join(), Role::MANAGER),
        (&w1, gossip(), Role::WORKER),
    ];
    for (ep, proto, role) in cases {
        let conn = ep
            .connect(&proto, &id("m1"), m1.local_addr())
            .await
            .unwrap();
        assert_eq!(conn.alpn(), proto.alpn());
        let peer = conn.peer().unwrap();
        assert_eq!(peer.node_id, id("m1"));
        assert_eq!(peer.role, Role::MANAGER);
        assert_eq!(peer.cluster_id.as_str(), "c1");
        let reply: Echo = conn
            .call(&Echo {
                seq: 1,
                text: format!("{role}"),
            })
            .await
            .unwrap();
        assert_eq!(reply.text, role.as_str().to_uppercase());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_request_one_way_and_datagram() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &gossip());
    let client = c.endpoint("w1", Role::WORKER);
    let conn = client
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();

    // Request/response, several in flight at once.
    let mut calls = Vec::new();
    for seq in 0..32u64 {
        let conn = conn.clone();
        calls.push(tokio::spawn(async move {
            conn.call::<Echo, Echo>(&Echo {
                seq,
                text: format!("m{seq}"),
            })
            .await
        }));
    }
    for (seq, call) in calls.into_iter().enumerate() {
        let reply = call.await.unwrap().unwrap();
        assert_eq!(reply.seq, seq as u64);
        assert_eq!(reply.text, format!("M{seq}"));
    }

    // One-way: the server echoes it back one-way, which arrives through accept().
    conn.send_message(&Echo {
        seq: 99,
        text: "one-way".into(),
    })
    .await
    .unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), conn.accept())
        .await
        .unwrap()
        .unwrap();
    match back {
        Inbound::Message(frame) => assert_eq!(frame.decode::<Echo>().unwrap().seq, 99),
        other => panic!("expected a one-way message, got {other:?}"),
    }

    // Datagrams: size checked against the connection's limit, echo received.
    let max = conn.max_datagram_size().unwrap();
    assert!(max >= 1000, "datagram limit {max}");
    let err = conn.send_datagram(&vec![0u8; max + 1]).unwrap_err();
    assert!(matches!(err, MessageError::DatagramTooLarge { size, .. } if size == max + 1));
    let body = Encode::encode(&Echo {
        seq: 5,
        text: "dg".into(),
    })
    .unwrap();
    let mut echoed = None;
    for _ in 0..10 {
        conn.send_datagram(&body).unwrap();
        if let Ok(Ok(f)) =
            tokio::time::timeout(Duration::from_millis(500), conn.read_datagram()).await
        {
            echoed = Some(f);
            break;
        }
    }
    let echoed = echoed.expect("no datagram echoed in 10 tries");
    assert_eq!(echoed.decode::<Echo>().unwrap().seq, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12_pool_dials_once_and_reconnects_after_server_restart() {
    let c = Cluster::new("c1");
    let server_creds = c.creds("m1", Role::MANAGER);
    let server = Endpoint::bind(config(), ring_provider(), Some(server_creds.clone())).unwrap();
    let addr = server.local_addr();
    let admitted = serve_echo(&server, &gossip());
    let client = c.endpoint("w1", Role::WORKER);

    // Many concurrent callers, one dial.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .connection(&gossip(), &id("m1"), addr)
                .await
                .map(|c| c.quinn().stable_id())
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one pooled connection for all callers");
    assert!(
        eventually(Duration::from_secs(5), || admitted
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1)
        .await
    );

    let body = Encode::encode(&Echo {
        seq: 1,
        text: "a".into(),
    })
    .unwrap();
    let reply = client
        .request(&gossip(), &id("m1"), addr, &body)
        .await
        .unwrap();
    assert_eq!(reply.decode::<Echo>().unwrap().text, "A");

    // Restart the server on the same address with the same identity.
    server.close().await;
    drop(server);
    let cfg = EndpointConfig {
        listen: addr,
        ..config()
    };
    // The old socket is released once quinn's driver has finished; poll for it.
    let mut rebound = None;
    for _ in 0..500 {
        match Endpoint::bind(cfg.clone(), ring_provider(), Some(server_creds.clone())) {
            Ok(ep) => {
                rebound = Some(ep);
                break;
            }
            Err(EndpointError::Bind { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let server = rebound.expect("address not released within 5 s");
    let admitted = serve_echo(&server, &gossip());

    // The pooled connection learned of the close; the pool redials once.
    let reply = client
        .request(&gossip(), &id("m1"), addr, &body)
        .await
        .unwrap();
    assert_eq!(reply.decode::<Echo>().unwrap().text, "A");
    assert_eq!(admitted.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Dialing oneself is refused, pooled or not.
    let err = client
        .connection(&gossip(), &id("w1"), addr)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::DialSelf), "{err}");
    let err = client
        .connect(&gossip(), &id("m1"), client.local_addr())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::DialSelf), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13_rotation_new_connections_see_new_serial_old_ones_keep_working() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    let first_serial = server.identity().unwrap().serial;
    serve_echo(&server, &gossip());
    let client = c.endpoint("w1", Role::WORKER);
    let old = client
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    assert_eq!(old.peer().unwrap().serial, first_serial);

    // Promotion: a new certificate with another role, swapped in without a restart.
    server.rotate(c.creds("m1", Role::WORKER)).unwrap();
    let second_serial = server.identity().unwrap().serial;
    assert_ne!(first_serial, second_serial);
    let new = client
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    assert_eq!(new.peer().unwrap().serial, second_serial);
    assert_eq!(new.peer().unwrap().role, Role::WORKER);

    for conn in [&old, &new] {
        let r: Echo = conn
            .call(&Echo {
                seq: 3,
                text: "x".into(),
            })
            .await
            .unwrap();
        assert_eq!(r.text, "X");
    }

    // The client rotates too: the server sees its new serial on a new connection.
    let client_serial = client.identity().unwrap().serial;
    client.rotate(c.creds("w1", Role::WORKER)).unwrap();
    assert_ne!(client.identity().unwrap().serial, client_serial);
    let _raft = server.listen(&raft()).unwrap();
    client.rotate(c.creds("w1", Role::MANAGER)).unwrap();
    let dialed = client
        .connect(&raft(), &id("m1"), server.local_addr())
        .await;
    // The server now holds a worker certificate: a raft dialer refuses it.
    assert!(
        matches!(dialed, Err(ConnectError::ServerRoleForbidden(_))),
        "{dialed:?}"
    );

    // Rotating to another node's credentials is refused.
    let err = client.rotate(c.creds("w2", Role::WORKER)).unwrap_err();
    assert!(
        matches!(err, EndpointError::IdentityChanged { .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t14_join_with_token_pins_the_ca() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    let mut listener = server.listen(&join()).unwrap();
    let mut secrets = JoinSecrets::new(c.ca.digest());
    secrets.rotate(Role::WORKER).unwrap();
    let token = secrets.token(&Role::WORKER).unwrap();

    // A node with no credentials at all.
    let joiner = Endpoint::bind(config(), ring_provider(), None).unwrap();
    assert!(joiner.identity().is_none());
    let err = joiner
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::NoCredentials));

    let join_protocol = join();
    let dial = joiner.connect_pinned(&join_protocol, server.local_addr(), &token);
    let (conn, accepted) = tokio::join!(dial, listener.accept());
    let conn = conn.unwrap();
    let accepted = accepted.unwrap();
    assert!(accepted.peer().is_none(), "the joiner is anonymous");
    assert_eq!(conn.peer().unwrap().node_id, id("m1"));

    // The joiner sends its secret and CSR; the manager checks, signs and answers.
    let key = NodeKey::generate().unwrap();
    let csr = key.csr().unwrap();
    let manager = tokio::spawn(async move {
        let Ok(Inbound::Request(req)) = accepted.accept().await else {
            panic!("no request")
        };
        let (token_text, csr): (String, Vec<u8>) = req.decode().unwrap();
        let token: JoinToken = token_text.parse().unwrap();
        let role = secrets.authorize(&token).unwrap();
        let cert =
            c.ca.sign_csr(&csr, &id("w7"), &role, &CertOptions::default())
                .unwrap();
        req.respond_with(&(cert.to_vec(), c.ca.certificate().to_vec()))
            .await
            .unwrap();
        c
    });
    let (cert, ca): (Vec<u8>, Vec<u8>) = conn.call(&(token.to_string(), csr)).await.unwrap();
    let c = manager.await.unwrap();
    let creds = NodeCredentials::new(cert.into(), key, vec![ca.into()]).unwrap();
    assert_eq!(creds.identity().node_id, id("w7"));

    // The joined node installs its credentials on the same endpoint and is now a member.
    joiner.rotate(creds).unwrap();
    serve_echo(&server, &gossip());
    let member = joiner
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    let r: Echo = member
        .call(&Echo {
            seq: 1,
            text: "in".into(),
        })
        .await
        .unwrap();
    assert_eq!(r.text, "IN");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_close_ends_listeners_and_dials() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    let mut listener = server.listen(&gossip()).unwrap();
    let waiting = tokio::spawn(async move { listener.accept().await.is_none() });
    server.close().await;
    assert!(
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap(),
        "accept returns None after close"
    );
    let err = server
        .connect(&gossip(), &id("m2"), "127.0.0.1:9".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Closed), "{err}");
    assert!(matches!(server.listen(&raft()), Err(EndpointError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t16_dropped_listener_unregisters_its_alpn() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &gossip());
    let listener = server.listen(&raft()).unwrap();
    drop(listener);
    let m2 = c.endpoint("m2", Role::MANAGER);
    let err = m2
        .connect(&raft(), &id("m1"), server.local_addr())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::HandshakeRejected {
                alert: rustls::AlertDescription::NoApplicationProtocol,
                ..
            }
        ),
        "{err}"
    );
    // The other protocol is untouched.
    m2.connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_full_accept_queue_refuses_with_overloaded() {
    let c = Cluster::new("c1");
    let cfg = EndpointConfig {
        accept_queue: 1,
        ..config()
    };
    let server = Endpoint::bind(cfg, ring_provider(), Some(c.creds("m1", Role::MANAGER))).unwrap();
    let _listener = server.listen(&gossip()).unwrap(); // never accepts
    let a = c.endpoint("w1", Role::WORKER);
    let b = c.endpoint("w2", Role::WORKER);
    a.connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    let err = b
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Refused { code, .. } if code == CloseCode::OVERLOADED),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t18_pinned_dial_refuses_a_worker_posing_as_manager() {
    let c = Cluster::new("c1");
    // A worker (valid certificate of the pinned CA) answers on the join protocol.
    let worker = c.endpoint("w1", Role::WORKER);
    serve_echo(&worker, &join());
    let mut secrets = JoinSecrets::new(c.ca.digest());
    secrets.rotate(Role::MANAGER).unwrap();
    let token = secrets.token(&Role::MANAGER).unwrap();
    let joiner = Endpoint::bind(config(), ring_provider(), None).unwrap();
    let err = joiner
        .connect_pinned(&join(), worker.local_addr(), &token)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::ServerRoleForbidden(ref r) if *r == Role::WORKER),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t19_trusted_roots_rotate_while_running() {
    // CA rotation: nodes of a new CA are admitted once the server trusts it too.
    let c = Cluster::new("c1");
    let next = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &gossip());
    let key = NodeKey::generate().unwrap();
    let cert = next
        .ca
        .sign_csr(
            &key.csr().unwrap(),
            &id("w1"),
            &Role::WORKER,
            &CertOptions::default(),
        )
        .unwrap();
    let creds = NodeCredentials::new(
        cert,
        key,
        vec![next.ca.certificate().clone(), c.ca.certificate().clone()],
    )
    .unwrap();
    let client = Endpoint::bind(config(), ring_provider(), Some(creds)).unwrap();
    let before = client
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await;
    assert!(
        matches!(before, Err(ConnectError::HandshakeRejected { .. })),
        "{before:?}"
    );

    let key = NodeKey::generate().unwrap();
    let cert =
        c.ca.sign_csr(
            &key.csr().unwrap(),
            &id("m1"),
            &Role::MANAGER,
            &CertOptions::default(),
        )
        .unwrap();
    let both = NodeCredentials::new(
        cert,
        key,
        vec![c.ca.certificate().clone(), next.ca.certificate().clone()],
    )
    .unwrap();
    server.rotate(both).unwrap();
    let conn = client
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    let r: Echo = conn
        .call(&Echo {
            seq: 1,
            text: "new ca".into(),
        })
        .await
        .unwrap();
    assert_eq!(r.text, "NEW CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t19b_concurrent_callers_share_one_failed_dial() {
    let c = Cluster::new("c1");
    let cfg = EndpointConfig {
        connect_timeout: Duration::from_millis(500),
        ..config()
    };
    let client = Endpoint::bind(cfg, ring_provider(), Some(c.creds("w1", Role::WORKER))).unwrap();
    // Nothing listens there.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.connection(&gossip(), &id("m9"), addr).await
        }));
    }
    let mut shared_failures = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => panic!("dial to a dead address succeeded"),
            Err(ConnectError::DialFailed(_)) => shared_failures += 1,
            Err(_) => {}
        }
    }
    assert_eq!(shared_failures, 7, "waiters got the first dial's failure");
    // One timeout, not eight in a row (a bound on correctness, not a speed target).
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t19c_cross_signed_root_rotation_keeps_every_pair_talking() {
    // A root CA rotation as the cluster runs it: nodes renewed onto the new root present the
    // new root cross-signed by the old one, so nodes that still trust only the old root
    // accept them; once the old root is dropped, its certificates are refused, while an
    // anonymous dial pinned to the old root (a node that missed the rotation) still reaches
    // a manager to renew.
    let c = Cluster::new("c1");
    let (next, cross) = c.ca.rotated_at(std::time::SystemTime::now()).unwrap();
    assert_ne!(next.digest(), c.ca.digest());
    let old_root = c.ca.certificate().clone();
    let new_root = next.certificate().clone();
    let issue =
        |ca: &ClusterCa, node: &str, roots: Vec<rustls::pki_types::CertificateDer<'static>>| {
            let key = NodeKey::generate().unwrap();
            let cert = ca
                .sign_csr(
                    &key.csr().unwrap(),
                    &id(node),
                    &Role::MANAGER,
                    &CertOptions::default(),
                )
                .unwrap();
            NodeCredentials::new(cert, key, roots).unwrap()
        };
    // Not yet renewed: the old root only.
    let a_creds = issue(&c.ca, "a", vec![old_root.clone()]);
    // Renewed during the rotation: both roots, the cross-signed certificate presented.
    let b_creds =
        issue(&next, "b", vec![new_root.clone(), old_root.clone()]).with_chain(vec![cross.clone()]);
    // After the rotation: the new root only; the old one still presented for stragglers.
    let c_creds =
        issue(&next, "c", vec![new_root.clone()]).with_chain(vec![cross.clone(), old_root.clone()]);
    // A certificate of the new root is usable for a node that trusts the old one only
    // when it has the cross-signed certificate.
    let d = issue(&next, "d", vec![old_root.clone()]);
    assert!(d.check_usable(std::time::SystemTime::now()).is_err());
    d.with_chain(vec![cross.clone()])
        .check_usable(std::time::SystemTime::now())
        .unwrap();
    for creds in [&a_creds, &b_creds, &c_creds] {
        creds.check_usable(std::time::SystemTime::now()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    c_creds.save(dir.path()).unwrap();
    let back = NodeCredentials::load(dir.path()).unwrap();
    assert_eq!(back.chain(), c_creds.chain());
    assert_eq!(back.roots(), c_creds.roots());
    b_creds.save(dir.path()).unwrap();
    a_creds.save(dir.path()).unwrap();
    assert!(
        NodeCredentials::load(dir.path())
            .unwrap()
            .chain()
            .is_empty()
    );

    let bind = |creds: &NodeCredentials| {
        Endpoint::bind(config(), ring_provider(), Some(creds.clone())).unwrap()
    };
    let (a, b, cc) = (bind(&a_creds), bind(&b_creds), bind(&c_creds));
    for e in [&a, &b, &cc] {
        serve_echo(e, &gossip());
        serve_echo(e, &join());
    }
    let call = |from: &Endpoint, to: &Endpoint, name: &str| {
        let (from, to_addr, name) = (from.clone(), to.local_addr(), name.to_owned());
        async move {
            let conn = from
                .connect(&gossip(), &id(&name), to_addr)
                .await
                .map_err(|e| e.to_string())?;
            let r: Echo = conn
                .call(&Echo {
                    seq: 1,
                    text: "x".into(),
                })
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(r.text, "X");
            Ok::<_, String>(())
        }
    };
    // During the rotation every pair talks, both ways.
    call(&a, &b, "b").await.unwrap();
    call(&b, &a, "a").await.unwrap();
    // After it: renewed nodes talk; the old root's certificate is refused by a node that
    // dropped that root, though the straggler itself can verify that node.
    call(&b, &cc, "c").await.unwrap();
    call(&cc, &b, "b").await.unwrap();
    assert!(call(&a, &cc, "c").await.is_err());
    assert!(call(&cc, &a, "a").await.is_err());
    // Pinned dials: the straggler reaches the renewed manager with the old digest; a new
    // token's digest reaches it too; the straggler itself has nothing of the new root.
    let anon = Endpoint::bind(config(), ring_provider(), None).unwrap();
    for target in [&b, &cc] {
        anon.connect_anonymous(&join(), target.local_addr(), c.ca.digest())
            .await
            .unwrap();
        anon.connect_anonymous(&join(), target.local_addr(), next.digest())
            .await
            .unwrap();
    }
    assert!(
        anon.connect_anonymous(&join(), a.local_addr(), next.digest())
            .await
            .is_err()
    );
    assert_eq!(cc.trusted_roots(), vec![next.digest()]);
    assert_eq!(b.trusted_roots(), vec![next.digest(), c.ca.digest()]);
}
