//! Lays out the functions an idle node runs together at the start of the release binary's code.
//!
//! A process's resident memory counts every page of its binary it has mapped, and Linux maps
//! the 64 KiB around each page of a file a process touches. The few MiB of code an idle
//! manager or worker runs were spread over the binary's 13 MiB of `.text`, so ~10 MiB of it
//! stayed resident in every node. `link/startup.order` lists those functions (written by
//! `link/regenerate.sh`, which records them under valgrind); the release build hands it to the
//! linker, which places them first and in that order. Names the binary no longer has are
//! skipped: a stale list costs memory, never a build. The names are those of a build of this
//! package alone (`cargo build --release -p starling-node`, as the bench builds it, or `cargo
//! install --path crates/node`): a build that also selects the bench unifies the dependencies'
//! features with etcd-client's, which renames most of them. `starling-bench memory` reports
//! how many the measured binary has and where they lie.
//!
//! Only where the linker takes the list (LLD's `--symbol-ordering-file`: Rust's default on
//! x86_64 Linux): a release build first links an empty program with the same flags, linker and
//! target, and links as usual if that fails. `STARLING_LINK_ORDER=off` also links as usual.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=link/startup.order");
    let target = var("TARGET");
    let target_env = target.to_uppercase().replace('-', "_");
    for name in [
        "STARLING_LINK_ORDER".to_owned(),
        "RUSTFLAGS".to_owned(),
        "CARGO_ENCODED_RUSTFLAGS".to_owned(),
        "CARGO_BUILD_RUSTFLAGS".to_owned(),
        format!("CARGO_TARGET_{target_env}_LINKER"),
        format!("CARGO_TARGET_{target_env}_RUSTFLAGS"),
    ] {
        println!("cargo:rerun-if-env-changed={name}");
    }
    if var("PROFILE") != "release" || var("STARLING_LINK_ORDER") == "off" {
        return;
    }
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("link/startup.order");
    let args = [
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        "-Wl,--no-warn-symbol-ordering".to_owned(),
    ];
    if order.exists() && linker_takes(&target, &args) {
        for arg in args {
            println!("cargo:rustc-link-arg-bin=starling={arg}");
        }
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// Whether an empty program links with `args` added, as this build links (its rustc, target,
/// flags and linker).
fn linker_takes(target: &str, args: &[String]) -> bool {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let source = out.join("link_probe.rs");
    if std::fs::write(&source, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let mut cmd = Command::new(rustc);
    cmd.args(["--crate-type", "bin", "--target", target, "-o"])
        .arg(out.join("link_probe"))
        .arg(&source);
    for flag in var("CARGO_ENCODED_RUSTFLAGS")
        .split('\x1f')
        .filter(|f| !f.is_empty())
    {
        cmd.arg(flag);
    }
    if let Some(linker) = std::env::var_os("RUSTC_LINKER") {
        let mut flag = OsString::from("linker=");
        flag.push(linker);
        cmd.arg("-C").arg(flag);
    }
    for arg in args {
        cmd.arg("-C").arg(format!("link-arg={arg}"));
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
