//! Builds the eBPF object (enforcer-ebpf) with the pinned nightly and
//! bpf-linker through aya-build.
//!
//! An empty stub object is written instead when `AYA_BUILD_SKIP=1`, or when
//! the eBPF toolchain (bpf-linker, the pinned nightly with rust-src) is not
//! installed: `cargo check`/`cargo clippy` then work on any machine, and the
//! resulting binary refuses to load the stub with an error that says to run
//! scripts/setup.sh. Nothing can run unenforced by accident.
use std::{env, fs, path::PathBuf, process::Command};

/// Must match the LLVM that bpf-linker was built against (scripts/setup.sh).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn toolchain_missing(toolchain: &str) -> Option<String> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(ref o) if o.status.success()) {
        return Some("bpf-linker is not installed".into());
    }
    let src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output();
    match src {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src") => {
            None
        }
        _ => Some(format!(
            "toolchain {toolchain} with rust-src is not installed"
        )),
    }
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=ENFORCER_NIGHTLY");
    println!("cargo:rerun-if-env-changed=PATH");
    let toolchain = env::var("ENFORCER_NIGHTLY").unwrap_or_else(|_| EBPF_TOOLCHAIN.to_string());
    let skip = env::var("AYA_BUILD_SKIP")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let missing = if skip {
        None
    } else {
        toolchain_missing(&toolchain)
    };
    if skip || missing.is_some() {
        if let Some(why) = missing {
            println!(
                "cargo:warning=eBPF object NOT built ({why}): this enforcer binary cannot enforce; \
                 run scripts/setup.sh and rebuild"
            );
        }
        fs::write(out_dir.join("enforcer-ebpf"), [])?;
        return Ok(());
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest.parent().expect("workspace root");
    let root = workspace.join("enforcer-ebpf");
    let root = root.to_str().expect("utf-8 path");
    println!("cargo:rerun-if-changed={root}/src");
    // The eBPF object also embeds the shared types.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("enforcer-common/src").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "enforcer-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
