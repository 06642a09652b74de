//! Builds the eBPF object (enforcer-ebpf) with the pinned nightly and
//! bpf-linker through aya-build. With AYA_BUILD_SKIP=1 (clippy, docs, a machine
//! without the eBPF toolchain) an empty stub object is written instead and the
//! binary refuses to load it with a clear error.
use std::{env, fs, path::PathBuf};

/// Must match the LLVM that bpf-linker was built against (scripts/setup.sh).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=ENFORCER_NIGHTLY");
    let skip = env::var("AYA_BUILD_SKIP")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    if skip {
        fs::write(out_dir.join("enforcer"), [])?;
        return Ok(());
    }
    let toolchain = env::var("ENFORCER_NIGHTLY").unwrap_or_else(|_| EBPF_TOOLCHAIN.to_string());
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .expect("workspace root")
        .join("enforcer-ebpf");
    let root = root.to_str().expect("utf-8 path");
    println!("cargo:rerun-if-changed={root}/src");
    // The eBPF object also embeds the shared types.
    let common = manifest
        .parent()
        .expect("workspace root")
        .join("enforcer-common/src");
    println!("cargo:rerun-if-changed={}", common.display());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "enforcer-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
