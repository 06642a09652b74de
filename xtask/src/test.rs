//! `cargo xtask test`: the whole test suite, exactly what CI runs.
//!
//! 1. `scripts/setup.sh` (idempotent: Debian packages, pinned nightly +
//!    rust-src, bpf-linker against LLVM 22, bpffs mount)
//! 2. `cargo fmt --check`
//! 3. `cargo clippy --workspace --all-targets -D warnings` with
//!    `AYA_BUILD_SKIP=1` (proves clippy needs neither nightly nor
//!    bpf-linker: the eBPF object is a stub there)
//! 4. `cargo test --workspace`: unit tests and the integration tests in
//!    `tests/`, which load the real programs into this kernel as root. With
//!    `CI` set they fail rather than skip when they cannot run.
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

fn step(name: &str, mut cmd: Command) -> Result<()> {
    eprintln!("\n==> xtask test: {name}: {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {name}"))?;
    if !st.success() {
        bail!("{name} failed ({st})");
    }
    Ok(())
}

pub fn run(root: &Path) -> Result<u8> {
    crate::util::require_root("test")?;
    let mut setup = Command::new("bash");
    setup.arg(root.join("scripts/setup.sh")).current_dir(root);
    step("setup", setup)?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut fmt = Command::new(&cargo);
    fmt.args(["fmt", "--all", "--", "--check"])
        .current_dir(root);
    step("fmt", fmt)?;

    let mut clippy = Command::new(&cargo);
    clippy
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("AYA_BUILD_SKIP", "1")
        .env("CARGO_TARGET_DIR", root.join("target/clippy"))
        .current_dir(root);
    step(
        "clippy (no eBPF toolchain needed: AYA_BUILD_SKIP=1)",
        clippy,
    )?;

    let mut test = Command::new(&cargo);
    test.args(["test", "--workspace", "--no-fail-fast"])
        .env_remove("AYA_BUILD_SKIP")
        .current_dir(root);
    let (passed, failed, ignored) = run_tests(test)?;
    // One plain closing line for the whole suite (cargo's last line is the
    // last crate's doc tests, often "0 passed").
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if failed > 0 || passed == 0 {
        bail!("test failed: {failed} failed, {passed} passed");
    }
    eprintln!("\n==> xtask test: all steps passed");
    Ok(0)
}

/// Run `cargo test`, echo its output, and add up its "test result:" lines.
fn run_tests(mut cmd: Command) -> Result<(u64, u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("\n==> xtask test: test: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    let out = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut it = part.split_whitespace().rev();
                let (Some(word), Some(n)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match word {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let st = child.wait()?;
    if !st.success() && failed == 0 {
        bail!("cargo test failed ({st}) before reporting test results");
    }
    Ok((passed, failed, ignored))
}
