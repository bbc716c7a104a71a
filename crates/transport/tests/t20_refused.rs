//! Peers and bytes that must be refused, each with the close code or error that says why.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use starling_transport::*;

fn refused_with(err: &ConnectError, want: CloseCode) -> bool {
    matches!(err, ConnectError::Refused { code, .. } if *code == want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_no_certificate_on_a_certificate_alpn() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &gossip());
    serve_echo(&server, &join());
    // A peer with no certificate that trusts the server: refused on a member protocol...
    let err = raw_dial(
        None,
        &[&c.ca],
        GOSSIP,
        "m1.c1.starling",
        server.local_addr(),
    )
    .await
    .unwrap_err();
    assert!(closed_with(&err, CloseCode::NO_CERTIFICATE), "{err}");
    // ...and admitted on the anonymous join protocol.
    raw_dial(None, &[&c.ca], JOIN, "m1.c1.starling", server.local_addr())
        .await
        .unwrap();
    // The library's own pinned dial refuses a policy that would trust any member as server.
    let mut secrets = JoinSecrets::new(c.ca.digest());
    secrets.rotate(Role::WORKER).unwrap();
    let token = secrets.token(&Role::WORKER).unwrap();
    let anon = Endpoint::bind(config(), ring_provider(), None).unwrap();
    let err = anon
        .connect_pinned(&gossip(), server.local_addr(), &token)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::PolicyTooWide), "{err}");
}

/// Credentials signed by `signer` that trust `trusted`'s CA.
fn forge(signer: &Cluster, trusted: &Cluster) -> NodeCredentials {
    let key = NodeKey::generate().unwrap();
    let cert = signer
        .ca
        .sign_csr(
            &key.csr().unwrap(),
            &id("w1"),
            &Role::WORKER,
            &CertOptions::default(),
        )
        .unwrap();
    NodeCredentials::new(cert, key, vec![trusted.ca.certificate().clone()]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_certificate_from_another_ca() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &gossip());
    let addr = server.local_addr();

    // A certificate of another cluster's CA: the server does not know the issuer.
    let stranger = Cluster::new("c2");
    let creds = stranger.creds("w1", Role::WORKER);
    let err = raw_dial(
        Some((&creds, &stranger.ca)),
        &[&c.ca],
        GOSSIP,
        "m1.c1.starling",
        addr,
    )
    .await
    .unwrap_err();
    assert!(alerted(&err, rustls::AlertDescription::UnknownCA), "{err}");

    // A forged CA that copies this cluster's id (so its name matches the real issuer's):
    // the signature does not verify.
    let forger = Cluster::new("c1");
    let creds = forger.creds("w1", Role::WORKER);
    let err = raw_dial(
        Some((&creds, &forger.ca)),
        &[&c.ca],
        GOSSIP,
        "m1.c1.starling",
        addr,
    )
    .await
    .unwrap_err();
    assert!(
        alerted(&err, rustls::AlertDescription::DecryptError),
        "{err}"
    );

    // The library refuses to even load credentials that its roots did not sign...
    let client = Endpoint::bind(config(), ring_provider(), Some(forge(&forger, &c)));
    assert!(matches!(client, Err(EndpointError::BadCredentials(_))));
    // ...and a node of the other CA does not trust this server.
    let other = Endpoint::bind(
        config(),
        ring_provider(),
        Some(forger.creds("w1", Role::WORKER)),
    )
    .unwrap();
    let err = other.connect(&gossip(), &id("m1"), addr).await.unwrap_err();
    assert!(matches!(err, ConnectError::Untrusted(_)), "{err}");

    // A server that trusts two clusters' CAs still refuses the other cluster's nodes.
    let dir = tempfile::tempdir().unwrap();
    let m2 = c.creds("m2", Role::MANAGER);
    m2.save(dir.path()).unwrap();
    let mut pem = std::fs::read_to_string(dir.path().join("node.pem")).unwrap();
    pem.push_str(&stranger.ca.to_pem().0);
    std::fs::write(dir.path().join("node.pem"), pem).unwrap();
    let m2 = NodeCredentials::load(dir.path()).unwrap();
    assert_eq!(m2.roots().len(), 2);
    let server2 = Endpoint::bind(config(), ring_provider(), Some(m2)).unwrap();
    serve_echo(&server2, &gossip());
    let creds = stranger.creds("w1", Role::WORKER);
    let err = raw_dial(
        Some((&creds, &stranger.ca)),
        &[&c.ca],
        GOSSIP,
        "m2.c1.starling",
        server2.local_addr(),
    )
    .await
    .unwrap_err();
    assert!(closed_with(&err, CloseCode::WRONG_CLUSTER), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_expired_certificate() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &gossip());
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    let opts = CertOptions {
        lifetime: Duration::from_secs(24 * 3600),
        ..CertOptions::default()
    };
    let expired =
        c.ca.issue_at(&id("w1"), &Role::WORKER, &opts, two_days_ago)
            .unwrap();
    assert!(expired.identity().not_after < SystemTime::now());
    let err = raw_dial(
        Some((&expired, &c.ca)),
        &[&c.ca],
        GOSSIP,
        "m1.c1.starling",
        server.local_addr(),
    )
    .await
    .unwrap_err();
    assert!(
        alerted(&err, rustls::AlertDescription::CertificateExpired),
        "{err}"
    );
    // The library does not install expired credentials in the first place.
    let local = Endpoint::bind(config(), ring_provider(), Some(expired));
    assert!(matches!(local, Err(EndpointError::BadCredentials(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23_worker_on_a_manager_only_alpn() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    let admitted = serve_echo(&server, &raft());
    let worker = c.endpoint("w1", Role::WORKER);
    let err = worker
        .connect(&raft(), &id("m1"), server.local_addr())
        .await
        .unwrap_err();
    assert!(refused_with(&err, CloseCode::ROLE_FORBIDDEN), "{err}");
    assert_eq!(admitted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t24_dialing_a_but_reaching_b() {
    let c = Cluster::new("c1");
    let b = c.endpoint("b", Role::MANAGER);
    serve_echo(&b, &gossip());
    let client = c.endpoint("w1", Role::WORKER);
    // B's certificate is valid in this cluster, but it is not A's.
    let err = client
        .connect(&gossip(), &id("a"), b.local_addr())
        .await
        .unwrap_err();
    match err {
        ConnectError::Untrusted(reason) => {
            assert!(
                reason.contains("not valid for name") || reason.contains("NotValidForName"),
                "{reason}"
            )
        }
        other => panic!("expected Untrusted, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t25_join_pin_with_a_mismatching_digest() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &join());
    let other = Cluster::new("c1");
    let mut secrets = JoinSecrets::new(other.ca.digest());
    secrets.rotate(Role::WORKER).unwrap();
    let token = secrets.token(&Role::WORKER).unwrap();
    let joiner = Endpoint::bind(config(), ring_provider(), None).unwrap();
    let err = joiner
        .connect_pinned(&join(), server.local_addr(), &token)
        .await
        .unwrap_err();
    match err {
        ConnectError::Untrusted(reason) => assert!(reason.contains("digest"), "{reason}"),
        other => panic!("expected Untrusted, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t26_malformed_frames() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &gossip());
    let client = c.endpoint("w1", Role::WORKER);
    let conn = client
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();

    // A frame whose header promises more than the stream carries.
    let (mut send, mut recv) = conn.quinn().open_bi().await.unwrap();
    send.write_all(&100u32.to_be_bytes()).await.unwrap();
    send.write_all(b"short").await.unwrap();
    send.finish().unwrap();
    let err = recv.read_to_end(1024).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "read error: stream reset by peer: error {}",
            StreamCode::MALFORMED_FRAME.0
        ),
    );

    // Bytes after the frame.
    let (mut send, mut recv) = conn.quinn().open_bi().await.unwrap();
    send.write_all(&1u32.to_be_bytes()).await.unwrap();
    send.write_all(b"ab").await.unwrap();
    send.finish().unwrap();
    assert!(recv.read_to_end(1024).await.is_err());

    // A well-framed body that is not an `Echo`: the handler's decode fails with a typed
    // error and it refuses the request.
    let err = conn
        .request(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff")
        .await
        .unwrap_err();
    assert!(
        matches!(err, MessageError::Refused(StreamCode::UNDECODABLE)),
        "{err}"
    );
    let garbage = Frame::copy_from(&[0xff; 9]);
    let decode_err = garbage.decode::<Echo>().unwrap_err();
    assert!(decode_err.type_name.contains("Echo"), "{decode_err}");

    // The connection survives all of it.
    let r: Echo = conn
        .call(&Echo {
            seq: 1,
            text: "ok".into(),
        })
        .await
        .unwrap();
    assert_eq!(r.text, "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t27_frame_over_the_limit() {
    let c = Cluster::new("c1");
    let small = EndpointConfig {
        max_frame_size: 1024,
        ..config()
    };
    let server =
        Endpoint::bind(small, ring_provider(), Some(c.creds("m1", Role::MANAGER))).unwrap();
    serve_echo(&server, &gossip());
    let client = c.endpoint("w1", Role::WORKER);
    let conn = client
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    let err = conn.request(&vec![7u8; 4096]).await.unwrap_err();
    assert!(
        matches!(err, MessageError::Refused(StreamCode::FRAME_TOO_LARGE)),
        "{err}"
    );
    // A header that claims 4 GiB is refused before anything is allocated.
    let (mut send, mut recv) = conn.quinn().open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let err = recv.read_to_end(1024).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&StreamCode::FRAME_TOO_LARGE.0.to_string()),
        "{err}"
    );
    // The sender's own limit is checked before sending.
    let tiny = EndpointConfig {
        max_frame_size: 16,
        ..config()
    };
    let client2 = Endpoint::bind(tiny, ring_provider(), Some(c.creds("w2", Role::WORKER))).unwrap();
    let conn2 = client2
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    let err = conn2.request(&[0u8; 17]).await.unwrap_err();
    assert!(
        matches!(err, MessageError::FrameTooLarge { size: 17, max: 16 }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t28_unknown_alpn() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    serve_echo(&server, &gossip());
    let client = c.endpoint("w1", Role::WORKER);
    let unknown = Protocol::new("test/nope/1", PeerPolicy::any_member()).unwrap();
    let err = client
        .connect(&unknown, &id("m1"), server.local_addr())
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t29_bad_config_is_a_clear_error() {
    let c = Cluster::new("c1");
    let bad = EndpointConfig {
        keep_alive: Duration::from_secs(60),
        ..config()
    };
    let err = Endpoint::bind(bad, ring_provider(), Some(c.creds("m1", Role::MANAGER))).unwrap_err();
    assert!(
        matches!(
            err,
            EndpointError::Config(ConfigError {
                field: "keep_alive",
                ..
            })
        ),
        "{err}"
    );
    assert!(Protocol::new(Vec::new(), PeerPolicy::any_member()).is_err());
    let server = c.endpoint("m1", Role::MANAGER);
    let _l = server.listen(&gossip()).unwrap();
    assert!(matches!(
        server.listen(&gossip()),
        Err(EndpointError::AlreadyListening(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_a_revoked_node_is_refused_both_ways() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    let _admitted = serve_echo(&server, &gossip());
    let w1 = c.endpoint("w1", Role::WORKER);
    let _w1_listens = serve_echo(&w1, &gossip());
    // Admitted before the revocation: that connection is closed by it...
    let open = w1
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    let other = c.endpoint("w3", Role::WORKER);
    let unaffected = other
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    server.revoke([id("w1")]);
    let closed = tokio::time::timeout(Duration::from_secs(1), open.closed())
        .await
        .expect("the revoked node's open connection is closed within a second");
    assert!(
        closed.to_string().contains("removed from the cluster"),
        "{closed}"
    );
    assert!(unaffected.close_reason().is_none());
    // ...and it is refused after it, with its own close code, when it dials...
    w1.disconnect(&id("m1"));
    let err = w1
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap_err();
    assert!(refused_with(&err, CloseCode::REVOKED), "{err}");
    // ...and when it is dialed.
    let err = server
        .connect(&gossip(), &id("w1"), w1.local_addr())
        .await
        .unwrap_err();
    assert!(refused_with(&err, CloseCode::REVOKED), "{err}");
    // Other members are not affected; an empty set lifts the revocation.
    assert!(unaffected.close_reason().is_none());
    let w2 = c.endpoint("w2", Role::WORKER);
    w2.connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    server.revoke([]);
    w1.connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_close_peer_closes_only_the_connections_of_that_role() {
    let c = Cluster::new("c1");
    let server = c.endpoint("m1", Role::MANAGER);
    let _admitted = serve_echo(&server, &gossip());
    // n2 connects as a manager, is demoted, and connects again with a worker certificate.
    let as_manager = c.endpoint("n2", Role::MANAGER);
    let old = as_manager
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    let as_worker = c.endpoint("n2", Role::WORKER);
    let new = as_worker
        .connect(&gossip(), &id("m1"), server.local_addr())
        .await
        .unwrap();
    let manager_role = |c: &Connection| c.peer().is_some_and(|p| p.role == Role::MANAGER);
    let closed = server.close_peer(&id("n2"), manager_role, CloseCode::REVOKED, "demoted");
    assert_eq!(closed, 1);
    tokio::time::timeout(Duration::from_secs(1), old.closed())
        .await
        .expect("the manager-role connection is closed");
    assert!(new.close_reason().is_none());
    assert_eq!(
        server.close_peer(&id("nobody"), |_| true, CloseCode::REVOKED, "x"),
        0
    );
}
