//! The optional TOML configuration file. Command-line flags and `STARLING_*` environment
//! variables take precedence over it.
//!
//! ```toml
//! data_dir = "/var/lib/starling"
//! listen = "10.0.0.5:4700"
//! advertise = "10.0.0.5:4700"
//! hostname = "node-5"
//! metrics = "127.0.0.1:9470"
//! manager = "10.0.0.1:4700"   # for `join`
//! token = "STRL-1-…"          # for `join`
//! snapshot_interval = 100000  # log entries between a manager's snapshots
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file's settings; every one optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Address to bind.
    pub listen: Option<SocketAddr>,
    /// Address others reach the node at.
    pub advertise: Option<SocketAddr>,
    /// Host name to report.
    pub hostname: Option<String>,
    /// Prometheus metrics address.
    pub metrics: Option<SocketAddr>,
    /// A manager to join through.
    pub manager: Option<SocketAddr>,
    /// The join token.
    pub token: Option<String>,
    /// Log entries between a manager's snapshots.
    pub snapshot_interval: Option<u64>,
}

impl FileConfig {
    /// Reads and checks the file; unknown keys and bad values are clear errors.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parses the TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

/// Picks the flag's value, else the file's, else fails naming all three ways to set it.
pub fn required<T: Clone>(flag: Option<T>, file: &Option<T>, name: &str) -> anyhow::Result<T> {
    flag.or_else(|| file.clone()).ok_or_else(|| {
        anyhow::anyhow!(
            "--{name} is required (a flag, STARLING_{} in the environment, or `{}` in the --config file)",
            name.replace('-', "_").to_uppercase(),
            name.replace('-', "_")
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_mistakes() {
        let c = FileConfig::parse("listen = \"127.0.0.1:4700\"\nhostname = \"a\"\n").unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:4700".parse().unwrap()));
        assert_eq!(c.hostname.as_deref(), Some("a"));
        assert!(FileConfig::parse("listn = \"x\"").is_err(), "unknown key");
        assert!(FileConfig::parse("listen = \"not an address\"").is_err());
        assert!(FileConfig::parse("listen = ").is_err());
        let none: Option<SocketAddr> = None;
        let err = required(none, &None, "listen").unwrap_err().to_string();
        assert!(
            err.contains("STARLING_LISTEN") && err.contains("--config"),
            "{err}"
        );
        assert_eq!(required(None, &Some(3), "x").unwrap(), 3);
        assert_eq!(required(Some(4), &Some(3), "x").unwrap(), 4);
    }
}
