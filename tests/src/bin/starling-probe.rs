//! Dials a Starling node with the credentials of a data directory on one protocol and says
//! whether it was admitted: `starling-probe <data-dir> <alpn> <node-id> <addr>`.
//! Exit 0 and `admitted …` when the connection passed the handshake and the server's
//! admission; exit 1 and `refused: …` otherwise; exit 2 for bad arguments or credentials.
//! The multi-host tests run it inside a host's network namespace.

use std::path::PathBuf;
use std::time::Duration;

use starling_transport::{
    Endpoint, EndpointConfig, NodeCredentials, NodeId, PeerPolicy, Protocol, Role, ring_provider,
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, alpn, node, addr] = args.as_slice() else {
        eprintln!("usage: starling-probe <data-dir> <alpn> <node-id> <addr>");
        std::process::exit(2);
    };
    let setup = || -> Result<_, String> {
        let creds = NodeCredentials::load(&PathBuf::from(dir)).map_err(|e| e.to_string())?;
        let node = NodeId::new(node.clone()).map_err(|e| e.to_string())?;
        let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        // Servers of every protocol here are managers.
        let protocol = Protocol::new(alpn.as_bytes().to_vec(), PeerPolicy::roles([Role::MANAGER]))
            .map_err(|e| e.to_string())?;
        let config = EndpointConfig {
            listen: "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?,
            connect_timeout: Duration::from_secs(5),
            ..EndpointConfig::default()
        };
        let endpoint =
            Endpoint::bind(config, ring_provider(), Some(creds)).map_err(|e| e.to_string())?;
        Ok((endpoint, protocol, node, addr))
    };
    let (endpoint, protocol, node, addr) = match setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("starling-probe: {e}");
            std::process::exit(2);
        }
    };
    match endpoint.connect(&protocol, &node, addr).await {
        Ok(conn) => {
            println!("admitted by {node} on {alpn}");
            conn.close(starling_transport::CloseCode::SHUTDOWN, "probe done");
            endpoint.close().await;
        }
        Err(e) => {
            println!("refused: {e}");
            std::process::exit(1);
        }
    }
}
