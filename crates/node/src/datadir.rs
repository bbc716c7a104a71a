//! A node's data directory: its identity file, credentials, CA (managers), Raft data,
//! gossip generation and control socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a node remembers about itself between restarts (`node.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Its node id (certificate CN).
    pub node_id: String,
    /// Its cluster.
    pub cluster_id: String,
    /// `manager` or `worker`.
    pub role: String,
    /// Its Raft id, for a manager.
    pub raft_id: Option<u64>,
    /// Address it binds.
    pub listen: SocketAddr,
    /// Address others reach it at.
    pub advertise: SocketAddr,
    /// Host name it reports.
    pub hostname: String,
    /// Managers it knows (node id, address), for gossip seeds.
    pub managers: Vec<(String, SocketAddr)>,
}

/// The data directory.
#[derive(Clone, Debug)]
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// `node.json`.
    pub fn state_file(&self) -> PathBuf {
        self.0.join("node.json")
    }

    /// The control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }

    /// Raft log and snapshots.
    pub fn raft_dir(&self) -> PathBuf {
        self.0.join("raft")
    }

    /// The gossip generation file.
    pub fn generation_file(&self) -> PathBuf {
        self.0.join("generation")
    }

    /// Whether a node was initialised here.
    pub fn is_initialised(&self) -> bool {
        self.state_file().exists()
    }

    /// Creates the directory (mode 0700).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.0)?;
        std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700))
    }

    /// Loads `node.json`, with a clear error if it is missing or damaged.
    pub fn load(&self) -> anyhow::Result<NodeState> {
        let path = self.state_file();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (no node was initialised in {}; use `starling init` or `starling join`)",
                path.display(),
                self.0.display()
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: damaged node state: {e}", path.display()))
    }

    /// Saves `node.json` atomically, mode 0600.
    pub fn save(&self, state: &NodeState) -> anyhow::Result<()> {
        write_private(
            &self.state_file(),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
        std::fs::File::open(&self.0)?.sync_all()?;
        Ok(())
    }
}

impl DataDir {
    /// The node's QUIC stateless-reset key (`reset.key`, 32 random bytes, mode 0600),
    /// created on first use: the same key across restarts lets the restarted node tell peers
    /// at once that their connections to its previous process are gone.
    pub fn reset_key(&self) -> anyhow::Result<starling_transport::ResetKey> {
        let path = self.0.join("reset.key");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    anyhow::anyhow!(
                        "{}: damaged ({} bytes, expected 32); delete it and a new one is made",
                        path.display(),
                        bytes.len()
                    )
                })?;
                Ok(starling_transport::ResetKey(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = new_reset_key()?;
                self.save_reset_key(&key)?;
                Ok(key)
            }
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    /// Writes `reset.key` atomically, mode 0600.
    pub fn save_reset_key(&self, key: &starling_transport::ResetKey) -> anyhow::Result<()> {
        write_private(&self.0.join("reset.key"), &key.0)
    }
}

/// Writes `bytes` to `path` atomically (a synced temporary file renamed over it), mode 0600.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A fresh random stateless-reset key.
pub fn new_reset_key() -> anyhow::Result<starling_transport::ResetKey> {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| anyhow::anyhow!("no randomness for the reset key"))?;
    Ok(starling_transport::ResetKey(key))
}

/// A random id: 12 lower-case hex characters (a DNS label, never reused in practice).
pub fn random_id() -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 6];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the OS random number generator is unavailable"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_damage_is_clear() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir(dir.path().join("n"));
        d.create().unwrap();
        assert!(!d.is_initialised());
        assert!(d.load().unwrap_err().to_string().contains("starling init"));
        let s = NodeState {
            node_id: random_id().unwrap(),
            cluster_id: "c".into(),
            role: "manager".into(),
            raft_id: Some(1),
            listen: "127.0.0.1:1".parse().unwrap(),
            advertise: "127.0.0.1:1".parse().unwrap(),
            hostname: "h".into(),
            managers: vec![],
        };
        d.save(&s).unwrap();
        assert_eq!(d.load().unwrap(), s);
        std::fs::write(d.state_file(), "{").unwrap();
        assert!(d.load().unwrap_err().to_string().contains("damaged"));
    }
}
