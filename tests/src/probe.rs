//! Runs `starling-probe` (this package's binary) inside a host's namespace: can a node with
//! these credentials reach that node on that protocol?

use std::path::Path;
use std::process::Command;

/// Dials `node` at `addr` on `alpn` from namespace `ns` with the credentials in `creds_dir`.
/// `Ok` with the probe's line when admitted, `Err` with its line when refused.
pub fn dial(
    probe: &Path,
    ns: &str,
    creds_dir: &Path,
    alpn: &str,
    node: &str,
    addr: &str,
) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(probe)
        .arg(creds_dir)
        .args([alpn, node, addr])
        .output()
        .map_err(|e| format!("cannot run the probe: {e}"))?;
    let line = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    match out.status.code() {
        Some(0) => Ok(line),
        Some(1) => Err(line),
        _ => panic!("the probe could not run: {line}"),
    }
}
