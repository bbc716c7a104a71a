//! A joiner's CSR bytes: the CA must reject anything but a well-signed P-256 request, never
//! panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use starling_transport::{CertOptions, ClusterCa, ClusterId, NodeId, Role};

fn ca() -> Option<&'static ClusterCa> {
    static CA: OnceLock<Option<ClusterCa>> = OnceLock::new();
    CA.get_or_init(|| ClusterId::new("fuzz").ok().and_then(|id| ClusterCa::create(id).ok()))
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let (Some(ca), Ok(node)) = (ca(), NodeId::new("n1")) else {
        return;
    };
    let _ = ca.sign_csr(data, &node, &Role::WORKER, &CertOptions::default());
});
