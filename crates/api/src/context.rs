//! Contexts: what a remote client needs to reach a cluster (CA, client certificate and key,
//! managers), in a directory, and a registry of them by name — what `docker context`,
//! etcdctl's `--endpoints` and a kubeconfig give their users.
//!
//! ```text
//!   DIR/context.json   {name, cluster_id, role, managers: [{node_id, addr}]}
//!   DIR/node.pem       client certificate, its key and the cluster CA (mode 0600)
//!   $STARLING_HOME/contexts/NAME   -> the directory, registered under NAME
//!   $STARLING_HOME/current         the name `starling context use` chose
//! ```
//!
//! `STARLING_HOME` defaults to `$HOME/.starling`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use starling_transport::NodeCredentials;

use crate::client::{Client, ClientError};
use crate::types::{ClientRole, ManagerAddr};

/// Why a context could not be used. Reading changes nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// No registered context of that name, and no such directory.
    #[error(
        "no context {0:?}: not a registered name (see `starling context ls`) nor a context directory"
    )]
    Unknown(String),
    /// A file of the context is missing or unreadable.
    #[error("context {path}: {why}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A name is not a DNS label.
    #[error("context name {0:?} must be a DNS label (a-z, 0-9, '-', at most 63)")]
    BadName(String),
    /// The home directory could not be found.
    #[error("cannot find a home directory: set STARLING_HOME")]
    NoHome,
}

/// `context.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextMeta {
    /// The name it was issued under.
    pub name: String,
    /// The cluster.
    pub cluster_id: String,
    /// What its certificate may do.
    pub role: ClientRole,
    /// The managers to dial.
    pub managers: Vec<ManagerAddr>,
}

/// A context read from its directory.
#[derive(Debug, Clone)]
pub struct Context {
    /// Its directory.
    pub dir: PathBuf,
    /// What `context.json` says.
    pub meta: ContextMeta,
}

const META: &str = "context.json";
const TMP: &str = ".context.json.tmp";

fn bad(path: &Path, why: impl std::fmt::Display) -> ContextError {
    ContextError::Bad {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// Checks that a context (or client) name is a DNS label, the rule of certificate names.
pub fn check_name(name: &str) -> Result<(), ContextError> {
    starling_transport::check_label("context name", name)
        .map_err(|_| ContextError::BadName(name.to_owned()))
}

/// Writes `context.json` in `dir` through a temporary file and a rename.
fn write_meta(dir: &Path, meta: &ContextMeta) -> Result<(), ContextError> {
    let path = dir.join(META);
    let text = serde_json::to_string_pretty(meta).map_err(|e| bad(&path, e))?;
    let tmp = dir.join(TMP);
    std::fs::write(&tmp, text).map_err(|e| bad(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| bad(&path, e))
}

impl Context {
    /// Reads the context in `dir`.
    pub fn load(dir: &Path) -> Result<Context, ContextError> {
        let path = dir.join(META);
        let text = std::fs::read_to_string(&path).map_err(|e| bad(&path, e))?;
        let meta: ContextMeta = serde_json::from_str(&text).map_err(|e| bad(&path, e))?;
        Ok(Context {
            dir: dir.to_owned(),
            meta,
        })
    }

    /// Writes a context into `dir` (created if needed, mode 0700): credentials in
    /// `node.pem` (0600), the rest in `context.json`.
    pub fn save(
        dir: &Path,
        meta: &ContextMeta,
        credentials: &NodeCredentials,
    ) -> Result<Context, ContextError> {
        use std::os::unix::fs::PermissionsExt as _;
        Context::check_target(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| bad(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| bad(dir, e))?;
        credentials.save(dir).map_err(|e| bad(dir, e))?;
        write_meta(dir, meta)?;
        Ok(Context {
            dir: dir.to_owned(),
            meta: meta.clone(),
        })
    }

    /// Checks that a context may be written to `dir`: a new directory or an earlier
    /// context, never another directory (a node's data directory, whose `node.pem` is its
    /// identity). Checking changes nothing.
    pub fn check_target(dir: &Path) -> Result<(), ContextError> {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !matches!(name.as_ref(), META | "node.pem" | TMP) {
                    return Err(bad(
                        dir,
                        format!("holds {name}: not a context directory; choose a new one"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The client certificate, key and CA.
    pub fn credentials(&self) -> Result<NodeCredentials, ContextError> {
        NodeCredentials::load(&self.dir).map_err(|e| bad(&self.dir, e))
    }

    /// A client of this context's managers (dials bounded by `dial_timeout`).
    pub fn client(&self, dial_timeout: Duration) -> Result<Client, ClientError> {
        let creds = self
            .credentials()
            .map_err(|e| ClientError::NotSent(e.to_string()))?;
        Client::remote(creds, self.meta.managers.clone(), dial_timeout)
    }

    /// Records the managers a client learned, so the next command starts from them.
    pub fn update_managers(&mut self, managers: Vec<ManagerAddr>) -> Result<(), ContextError> {
        let mut sorted_new = managers.clone();
        sorted_new.sort();
        let mut sorted_old = self.meta.managers.clone();
        sorted_old.sort();
        if managers.is_empty() || sorted_new == sorted_old {
            return Ok(());
        }
        self.meta.managers = managers;
        write_meta(&self.dir, &self.meta)
    }
}

/// The registry of named contexts under `STARLING_HOME`.
#[derive(Debug, Clone)]
pub struct Registry {
    home: PathBuf,
}

impl Registry {
    /// The registry in `home`.
    pub fn at(home: impl Into<PathBuf>) -> Registry {
        Registry { home: home.into() }
    }

    /// The registry of this user: `$STARLING_HOME`, else `$HOME/.starling`.
    pub fn user() -> Result<Registry, ContextError> {
        if let Some(h) = std::env::var_os("STARLING_HOME").filter(|h| !h.is_empty()) {
            return Ok(Registry::at(h));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or(ContextError::NoHome)?;
        Ok(Registry::at(PathBuf::from(home).join(".starling")))
    }

    fn contexts(&self) -> PathBuf {
        self.home.join("contexts")
    }

    /// Registers the context in `dir` under `name` (replacing one of that name).
    pub fn register(&self, name: &str, dir: &Path) -> Result<(), ContextError> {
        check_name(name)?;
        Context::load(dir)?;
        let dir = std::fs::canonicalize(dir).map_err(|e| bad(dir, e))?;
        let contexts = self.contexts();
        std::fs::create_dir_all(&contexts).map_err(|e| bad(&contexts, e))?;
        let link = contexts.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link).map_err(|e| bad(&link, e))
    }

    /// Registered names and their directories, by name.
    pub fn list(&self) -> Result<Vec<(String, PathBuf)>, ContextError> {
        let contexts = self.contexts();
        let entries = match std::fs::read_dir(&contexts) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(bad(&contexts, e)),
        };
        let mut out: Vec<(String, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let target = std::fs::read_link(e.path()).unwrap_or_else(|_| e.path());
                Some((name, target))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Removes a registration (the directory stays).
    pub fn remove(&self, name: &str) -> Result<(), ContextError> {
        check_name(name)?;
        let link = self.contexts().join(name);
        std::fs::remove_file(&link).map_err(|_| ContextError::Unknown(name.to_owned()))?;
        if self.current()?.as_deref() == Some(name) {
            let _ = std::fs::remove_file(self.home.join("current"));
        }
        Ok(())
    }

    /// Makes `name` the context used when none is given.
    pub fn use_context(&self, name: &str) -> Result<(), ContextError> {
        self.resolve(name)?;
        std::fs::create_dir_all(&self.home).map_err(|e| bad(&self.home, e))?;
        let path = self.home.join("current");
        std::fs::write(&path, name).map_err(|e| bad(&path, e))
    }

    /// The context `starling context use` chose, if any.
    pub fn current(&self) -> Result<Option<String>, ContextError> {
        match std::fs::read_to_string(self.home.join("current")) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(bad(&self.home.join("current"), e)),
        }
    }

    /// A registered name, or a context directory.
    pub fn resolve(&self, name_or_dir: &str) -> Result<Context, ContextError> {
        if check_name(name_or_dir).is_ok() {
            let link = self.contexts().join(name_or_dir);
            if link.exists() {
                return Context::load(&link);
            }
        }
        let dir = Path::new(name_or_dir);
        if dir.join(META).is_file() {
            return Context::load(dir);
        }
        Err(ContextError::Unknown(name_or_dir.to_owned()))
    }
}
