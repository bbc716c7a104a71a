//! Lays out the functions an idle node runs together at the start of the release binary's code.
//!
//! A process's resident memory counts every page of its binary it has mapped, and Linux maps
//! the 64 KiB around each page of a file a process touches. The few MiB of code an idle
//! manager or worker runs were spread over the binary's 13 MiB of `.text`, so ~10 MiB of it
//! stayed resident in every node. `link/startup.order` lists those functions (written by
//! `link/regenerate.sh`, which records them under valgrind); the release build hands it to the
//! linker, which places them first and in that order. Names the binary no longer has are
//! skipped: a stale list costs memory, never a build.
//!
//! Only where the linker is known to be LLD: Rust's default on x86_64 Linux (GNU). A build
//! that names another linker in its flags, or sets `STARLING_LINK_ORDER=off`, links as usual.

fn main() {
    println!("cargo:rerun-if-changed=link/startup.order");
    println!("cargo:rerun-if-env-changed=STARLING_LINK_ORDER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let default_lld = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let other_linker = flags.contains("linker") || flags.contains("fuse-ld");
    let target_linker = std::env::vars().any(|(k, _)| {
        k.starts_with("CARGO_TARGET_") && k.ends_with("_LINKER") && k != "CARGO_TARGET_DIR"
    });
    if !release
        || !default_lld
        || other_linker
        || target_linker
        || var("STARLING_LINK_ORDER") == "off"
    {
        return;
    }
    let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link/startup.order");
    if order.exists() {
        println!(
            "cargo:rustc-link-arg-bin=starling=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=starling=-Wl,--no-warn-symbol-ordering");
    }
}
