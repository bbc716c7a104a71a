//! In-process managers over real mTLS QUIC on 127.0.0.1.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use starling_raft_store::*;
use starling_transport::{
    CertOptions, ClusterCa, ClusterId, Endpoint, EndpointConfig, NodeCredentials, NodeId, Role,
    ring_provider,
};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

pub struct Manager {
    pub id: u64,
    pub store: Store,
    pub endpoint: Endpoint,
}

pub struct TestCluster {
    pub ca: ClusterCa,
    pub dir: tempfile::TempDir,
    pub managers: Vec<Option<Manager>>,
    pub addrs: Vec<SocketAddr>,
    pub creds: Vec<NodeCredentials>,
    pub snapshot_interval: u64,
    pub watch_buffer: usize,
}

pub fn put(k: &str, v: &str) -> Command {
    Command::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
    }
}

impl TestCluster {
    /// `n` managers, the first initialized, the others added as voters.
    pub async fn start(n: u64, snapshot_interval: u64) -> Self {
        Self::start_with(n, snapshot_interval, WATCH_BUFFER).await
    }

    /// As [`TestCluster::start`], with `watch_buffer` changes buffered for live watchers.
    pub async fn start_with(n: u64, snapshot_interval: u64, watch_buffer: usize) -> Self {
        init_tracing();
        let ca = ClusterCa::create(ClusterId::new("rs").unwrap()).unwrap();
        let mut c = TestCluster {
            ca,
            dir: tempfile::tempdir().unwrap(),
            managers: Vec::new(),
            addrs: Vec::new(),
            creds: Vec::new(),
            snapshot_interval,
            watch_buffer,
        };
        for id in 1..=n {
            c.add_manager_process(id).await;
        }
        c.m(1).store.initialize().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.m(1).store.status().is_leader {
            assert!(Instant::now() < deadline, "m1 did not become leader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for id in 2..=n {
            c.join_through(1, id).await;
        }
        c.wait_leader(Duration::from_secs(10)).await;
        c
    }

    /// Creates manager `id` (endpoint and store) without joining it to the group.
    pub async fn add_manager_process(&mut self, id: u64) {
        let creds = self
            .ca
            .issue(
                &NodeId::new(format!("m{id}")).unwrap(),
                &Role::MANAGER,
                &CertOptions::default(),
            )
            .unwrap();
        let endpoint = Endpoint::bind(
            EndpointConfig::default(),
            ring_provider(),
            Some(creds.clone()),
        )
        .unwrap();
        self.addrs.push(endpoint.local_addr());
        self.creds.push(creds);
        let store = Store::open(self.config(id), endpoint.clone())
            .await
            .unwrap();
        self.managers.push(Some(Manager {
            id,
            store,
            endpoint,
        }));
    }

    pub fn node(&self, id: u64) -> ManagerNode {
        ManagerNode {
            name: format!("m{id}"),
            addr: self.addrs[(id - 1) as usize].to_string(),
        }
    }

    pub fn config(&self, id: u64) -> StoreConfig {
        let mut cfg = StoreConfig::new(self.data_dir(id), id, self.node(id));
        cfg.snapshot_interval = self.snapshot_interval;
        cfg.watch_buffer = self.watch_buffer;
        cfg
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("m{id}"))
    }

    /// Adds manager `id` as a learner (caught up) and then as a voter, through the leader.
    pub async fn join(&self, id: u64) {
        let leader = self
            .running()
            .find(|m| m.store.status().is_leader)
            .map(|m| m.id)
            .expect("a leader");
        self.join_through(leader, id).await;
    }

    pub async fn join_through(&self, leader: u64, id: u64) {
        let l = self.m(leader);
        l.store.add_learner(id, self.node(id)).await.unwrap();
        l.store.promote(id).await.unwrap();
    }

    pub fn m(&self, id: u64) -> &Manager {
        self.managers[(id - 1) as usize].as_ref().unwrap()
    }

    pub fn running(&self) -> impl Iterator<Item = &Manager> {
        self.managers.iter().flatten()
    }

    /// Stops manager `id` like a crash: its endpoint closes, its store stops.
    pub async fn stop(&mut self, id: u64) {
        if let Some(m) = self.managers[(id - 1) as usize].take() {
            m.store.shutdown().await.unwrap();
            m.endpoint.close().await;
        }
    }

    /// Restarts manager `id` on its old address and data directory.
    pub async fn restart(&mut self, id: u64) {
        let addr = self.addrs[(id - 1) as usize];
        let cfg = EndpointConfig {
            listen: addr,
            ..EndpointConfig::default()
        };
        let creds = self.creds[(id - 1) as usize].clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let endpoint = loop {
            match Endpoint::bind(cfg.clone(), ring_provider(), Some(creds.clone())) {
                Ok(e) => break e,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {addr}: {e}"),
            }
        };
        let store = Store::open(self.config(id), endpoint.clone())
            .await
            .unwrap();
        self.managers[(id - 1) as usize] = Some(Manager {
            id,
            store,
            endpoint,
        });
    }

    /// The leader all running managers agree on.
    pub async fn leader_id(&self, within: Duration) -> u64 {
        self.wait_leader(within).await
    }

    pub async fn wait_leader(&self, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let leaders: Vec<u64> = self
                .running()
                .filter(|m| m.store.status().is_leader)
                .map(|m| m.id)
                .collect();
            if let [l] = leaders[..]
                && self.running().all(|m| m.store.status().leader == Some(l))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running manager applied at least `revision`.
    pub async fn wait_applied(&self, revision: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.running().any(|m| m.store.status().applied < revision) {
            assert!(
                Instant::now() < deadline,
                "not all applied {revision}: {:?}",
                self.running()
                    .map(|m| (m.id, m.store.status().applied))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        for id in 1..=self.managers.len() as u64 {
            self.stop(id).await;
        }
    }
}

pub async fn get(store: &Store, key: &str, c: Consistency) -> (Option<Vec<u8>>, u64) {
    store
        .read(c, |s| s.get(key).map(|e| e.value.clone()))
        .await
        .unwrap()
}
