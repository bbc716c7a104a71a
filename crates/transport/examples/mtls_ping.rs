//! Creates a cluster CA and two node identities, serves and dials over mutually
//! authenticated QUIC on loopback, exchanges a request and a datagram, and prints `ok` with
//! the round-trip times.
//!
//! ```text
//! cargo run -p starling-transport --example mtls_ping
//! ```

use std::time::{Duration, Instant};

use starling_transport::rkyv::{Archive, Deserialize, Serialize};
use starling_transport::{
    CertOptions, ClusterCa, ClusterId, Endpoint, EndpointConfig, Inbound, NodeId, PeerPolicy,
    Protocol, Role, decode, ring_provider,
};

/// The message both sides speak.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
struct Ping {
    seq: u64,
    from: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = ClusterCa::create(ClusterId::new("example")?)?;
    let opts = CertOptions::default();
    let server_id = NodeId::new("server")?;
    let server_creds = ca.issue(&server_id, &Role::MANAGER, &opts)?;
    let client_creds = ca.issue(&NodeId::new("client")?, &Role::WORKER, &opts)?;

    let ping = Protocol::new("example/ping/1", PeerPolicy::any_member())?;
    let server = Endpoint::bind(
        EndpointConfig::default(),
        ring_provider(),
        Some(server_creds),
    )?;
    let mut listener = server.listen(&ping)?;
    tokio::spawn(async move {
        while let Some(conn) = listener.accept().await {
            // Echo datagrams back.
            let dg = conn.clone();
            tokio::spawn(async move {
                while let Ok(frame) = dg.read_datagram().await {
                    let _ = dg.send_datagram(frame.as_bytes());
                }
            });
            // Answer requests with the same Ping, signed by the server.
            tokio::spawn(async move {
                while let Ok(Inbound::Request(req)) = conn.accept().await {
                    match req.decode::<Ping>() {
                        Ok(p) => {
                            let reply = Ping {
                                seq: p.seq,
                                from: "server".into(),
                            };
                            let _ = req.respond_with(&reply).await;
                        }
                        Err(_) => req.refuse(starling_transport::StreamCode::UNDECODABLE),
                    }
                }
            });
        }
    });

    let client = Endpoint::bind(
        EndpointConfig::default(),
        ring_provider(),
        Some(client_creds),
    )?;
    let t0 = Instant::now();
    let conn = client
        .connect(&ping, &server_id, server.local_addr())
        .await?;
    let handshake = t0.elapsed();
    let peer = conn.peer().ok_or("server has no identity")?;
    println!(
        "connected to {} ({} of {}, certificate serial {})",
        peer.node_id, peer.role, peer.cluster_id, peer.serial
    );

    let t1 = Instant::now();
    let reply: Ping = conn
        .call(&Ping {
            seq: 1,
            from: "client".into(),
        })
        .await?;
    let request_rtt = t1.elapsed();
    assert_eq!(
        reply,
        Ping {
            seq: 1,
            from: "server".into()
        }
    );

    let body = starling_transport::Encode::encode(&Ping {
        seq: 2,
        from: "client".into(),
    })?;
    // Datagrams may be lost: retry a few times, each with a deadline.
    let mut datagram_rtt = None;
    for _ in 0..5 {
        let t2 = Instant::now();
        conn.send_datagram(&body)?;
        if let Ok(Ok(frame)) =
            tokio::time::timeout(Duration::from_secs(1), conn.read_datagram()).await
        {
            let echoed: Ping = decode(frame.as_bytes())?;
            assert_eq!(echoed.seq, 2);
            datagram_rtt = Some(t2.elapsed());
            break;
        }
    }
    let datagram_rtt = datagram_rtt.ok_or("no datagram echo after 5 tries")?;

    conn.close(starling_transport::CloseCode::SHUTDOWN, "done");
    client.close().await;
    server.close().await;
    println!(
        "ok handshake={handshake:?} request_rtt={request_rtt:?} datagram_rtt={datagram_rtt:?}"
    );
    Ok(())
}
