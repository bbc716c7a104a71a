//! Root CA rotation (`starling ca rotate`), as SwarmKit's: a new root is created and
//! cross-signed by the current one; the new root signs every certificate from then on while
//! every node trusts both and presents the cross-signed certificate (so a node that still
//! trusts only the old root accepts it); each node renews as soon as its dispatcher session
//! (or, on a manager, its own store) tells it the roots changed. When no node that is not
//! down is left on the old root, the leader finishes: the old root is dropped (its key is
//! forgotten, its certificate kept for nodes that were off, which renew on the
//! expired-certificate path) and the join secrets change with the CA digest their tokens pin.
//!
//! Everything is in the replicated state, so a new leader resumes where the old one was.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use starling_raft_store::{CaRotation, ClusterInfo, Command, Outcome, Store};
use starling_transport::{ClusterCa, JoinSecret};
use tracing::{info, warn};

/// A new root for the cluster whose identity is `info`, cross-signed by its current root.
pub fn new_root(info: &ClusterInfo) -> anyhow::Result<CaRotation> {
    let current = ClusterCa::from_pem(&info.ca_cert_pem, &info.ca_key_pem)?;
    let (next, cross) = current.rotated_at(std::time::SystemTime::now())?;
    let (new_cert_pem, new_key_pem) = next.to_pem();
    Ok(CaRotation {
        new_cert_pem,
        new_key_pem,
        cross_signed_pem: pem::encode(&pem::Pem::new("CERTIFICATE", cross.to_vec())),
        new_digest: next.digest().to_string(),
        started_at: crate::renewal::unix_secs(std::time::SystemTime::now()),
    })
}

/// On the leader: finishes a rotation every node not down has renewed onto, as soon as the
/// last renewal is applied (and checks at least every second, for nodes going down).
pub async fn rotation_loop(store: Arc<Store>) {
    let mut applied = store.object_changes();
    let mut reported = None;
    loop {
        // Woken by every applied change to the cluster's objects (a rotation starting, a
        // node's renewal recorded), and at least once a second (nodes going down).
        tokio::select! {
            r = applied.changed() => if r.is_err() {
                return;
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        // The cheap question first: this runs on every applied change of those.
        let rotating = store.read_applied(|s| s.cluster().rotation.is_some()).0;
        if !rotating {
            reported = None;
            continue;
        }
        if !store.status().is_leader {
            continue;
        }
        let (state, _) = store.read_applied(|s| {
            s.cluster().rotation.as_ref().map(|r| {
                (
                    r.new_digest.clone(),
                    starling_manager::ca_rotation::progress(s.nodes(), &r.new_digest),
                )
            })
        });
        let Some((digest, progress)) = state else {
            reported = None;
            continue;
        };
        let counts = (progress.on_new_root.len(), progress.counted());
        if reported != Some(counts) {
            info!(
                on_new_root = counts.0,
                nodes = counts.1,
                down = progress.down.len(),
                "root CA rotation: {} of {} nodes on the new root",
                counts.0,
                counts.1
            );
            reported = Some(counts);
        }
        if !progress.done() {
            continue;
        }
        let mut join_secrets = BTreeMap::new();
        for role in ["manager", "worker"] {
            match JoinSecret::generate() {
                Ok(s) => {
                    join_secrets.insert(role.to_owned(), s.as_bytes().to_vec());
                }
                Err(e) => {
                    warn!(error = %e, "no randomness for the new join secrets");
                    continue;
                }
            }
        }
        if join_secrets.len() != 2 {
            continue;
        }
        match store
            .write(Command::FinishCaRotation {
                new_digest: digest.clone(),
                join_secrets,
            })
            .await
        {
            Ok(r) if r.outcome == Outcome::Done => info!(
                ca = %digest,
                down = ?progress.down,
                "root CA rotation finished: the old root is no longer trusted and the join tokens changed"
            ),
            Ok(r) => warn!(outcome = ?r.outcome, "finishing the root CA rotation"),
            Err(e) => warn!(error = %e, "finishing the root CA rotation"),
        }
    }
}
