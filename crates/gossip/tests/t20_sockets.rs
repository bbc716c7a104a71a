//! Eight gossip nodes in one process over mTLS QUIC datagrams on loopback.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use starling_gossip::*;
use starling_transport::{
    CertOptions, ClusterCa, ClusterId, Endpoint, EndpointConfig, NodeCredentials, NodeId, Role,
    ring_provider,
};

const N: usize = 8;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn bind(creds: &NodeCredentials, addr: Option<SocketAddr>) -> Endpoint {
    let cfg = EndpointConfig {
        listen: addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()),
        ..EndpointConfig::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Endpoint::bind(cfg.clone(), ring_provider(), Some(creds.clone())) {
            Ok(e) => return e,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn up_members(n: &GossipNode) -> usize {
    n.members().iter().filter(|m| m.up).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_eight_nodes_join_publish_fail_and_return() {
    init_tracing();
    let ca = ClusterCa::create(ClusterId::new("g").unwrap()).unwrap();
    let creds: Vec<NodeCredentials> = (0..N)
        .map(|i| {
            let role = if i == 0 { Role::MANAGER } else { Role::WORKER };
            ca.issue(
                &NodeId::new(format!("n{i}")).unwrap(),
                &role,
                &CertOptions::default(),
            )
            .unwrap()
        })
        .collect();
    let mut endpoints = Vec::new();
    for c in &creds {
        endpoints.push(Some(bind(c, None).await));
    }
    let seed = (
        "n0".to_string(),
        endpoints[0].as_ref().unwrap().local_addr(),
    );
    let mut nodes: Vec<Option<GossipNode>> = Vec::new();
    for (i, ep) in endpoints.iter().flatten().enumerate() {
        let settings = GossipSettings {
            id: GossipId::new(format!("n{i}"), ep.local_addr(), 1),
            seeds: vec![seed.clone()],
            config: GossipConfig::default(),
            rng_seed: i as u64 + 1,
        };
        nodes.push(Some(GossipNode::start(ep.clone(), settings).await.unwrap()));
    }
    let live = |nodes: &Vec<Option<GossipNode>>| nodes.iter().flatten().count();
    eventually("membership converged", Duration::from_secs(30), || {
        nodes.iter().flatten().all(|n| up_members(n) == N - 1)
    })
    .await;

    // Publish on one node: every node sees the endpoint.
    let mut events = nodes[0].as_ref().unwrap().subscribe();
    let stamp = nodes[5]
        .as_ref()
        .unwrap()
        .publish(
            vec![ServiceEndpoint {
                service: "web".into(),
                task: "web.1".into(),
                slot: "1".into(),
                addr: "10.0.0.5".into(),
                port: 8080,
                ports: BTreeMap::from([("http".into(), 8080)]),
                health: Health::Healthy,
                ttl: None,
            }],
            BTreeMap::new(),
        )
        .await
        .unwrap();
    eventually("record everywhere", Duration::from_secs(10), || {
        nodes
            .iter()
            .flatten()
            .all(|n| n.catalog().stamp_of("n5") >= Some(stamp))
    })
    .await;
    for n in nodes.iter().flatten() {
        assert_eq!(n.services()["web"][0].0, "n5");
    }
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(GossipEvent::CatalogChanged { node, stamp: s }) = events.recv().await
                && node == "n5"
                && s == stamp
            {
                return true;
            }
        }
    })
    .await;
    assert_eq!(seen, Ok(true), "catalog change event");

    // Stop node 3 abruptly: Down on every other node.
    let victim = 3;
    let old_ep = endpoints[victim].take().unwrap();
    let old_addr = old_ep.local_addr();
    nodes[victim].take().unwrap().stop();
    old_ep.close().await;
    drop(old_ep);
    eventually("n3 Down everywhere", Duration::from_secs(30), || {
        nodes
            .iter()
            .flatten()
            .all(|n| n.members().iter().any(|m| m.id.node == "n3" && !m.up))
    })
    .await;
    assert_eq!(live(&nodes), N - 1);
    assert!(
        nodes
            .iter()
            .flatten()
            .all(|n| !n.services().contains_key("n3"))
    );

    // Start it again with the next generation: Up everywhere with that generation.
    let ep = bind(&creds[victim], Some(old_addr)).await;
    endpoints[victim] = Some(ep.clone());
    let settings = GossipSettings {
        id: GossipId::new("n3", ep.local_addr(), 2),
        seeds: vec![seed.clone()],
        config: GossipConfig::default(),
        rng_seed: 99,
    };
    nodes[victim] = Some(GossipNode::start(ep, settings).await.unwrap());
    eventually("n3 back with generation 2", Duration::from_secs(30), || {
        nodes
            .iter()
            .flatten()
            .filter(|n| n.id().node != "n3")
            .all(|n| {
                n.members()
                    .iter()
                    .any(|m| m.id.node == "n3" && m.up && m.id.generation == 2)
            })
    })
    .await;
    eventually("n3 sees everyone", Duration::from_secs(30), || {
        up_members(nodes[victim].as_ref().unwrap()) == N - 1
    })
    .await;

    // A graceful leave is seen as Down: at once by the members its notice reaches while it
    // lingers, within SWIM's suspicion time by any it missed (a loaded CI machine: the
    // deadline is generous, the typical figure is well under a second).
    let leaving = nodes[7].take().unwrap();
    let left = Instant::now();
    leaving.leave().await;
    eventually("n7 left", Duration::from_secs(30), || {
        nodes
            .iter()
            .flatten()
            .all(|n| n.members().iter().any(|m| m.id.node == "n7" && !m.up))
    })
    .await;
    eprintln!("n7's leave seen everywhere after {:?}", left.elapsed());
    for ep in endpoints.iter().flatten() {
        ep.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_node_started_before_its_seed_joins_when_the_seed_appears() {
    init_tracing();
    let ca = ClusterCa::create(ClusterId::new("g2").unwrap()).unwrap();
    let seed_creds = ca
        .issue(
            &NodeId::new("s").unwrap(),
            &Role::MANAGER,
            &CertOptions::default(),
        )
        .unwrap();
    let late_creds = ca
        .issue(
            &NodeId::new("w").unwrap(),
            &Role::WORKER,
            &CertOptions::default(),
        )
        .unwrap();
    let seed_ep = bind(&seed_creds, None).await;
    let w_ep = bind(&late_creds, None).await;
    // The worker starts first: its announcements find no gossip listener yet.
    let w = GossipNode::start(
        w_ep.clone(),
        GossipSettings {
            id: GossipId::new("w", w_ep.local_addr(), 1),
            seeds: vec![("s".into(), seed_ep.local_addr())],
            config: GossipConfig::default(),
            rng_seed: 7,
        },
    )
    .await
    .unwrap();
    // Part of the scenario, not a wait for a result: let the first announcements fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = GossipNode::start(
        seed_ep.clone(),
        GossipSettings {
            id: GossipId::new("s", seed_ep.local_addr(), 1),
            seeds: vec![],
            config: GossipConfig::default(),
            rng_seed: 8,
        },
    )
    .await
    .unwrap();
    eventually(
        "the worker joined through the late seed",
        Duration::from_secs(20),
        || up_members(&w) == 1 && up_members(&s) == 1,
    )
    .await;
    drop((w, s));
    w_ep.close().await;
    seed_ep.close().await;
}
