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
//! 5. The BPF LSM tests, in a VM (`cargo xtask vm-test`: Debian 6.1 booted
//!    with `lsm=...,bpf` under QEMU/TCG), because this host's kernel refuses
//!    BPF LSM programs: `tests/tests/files.rs` (ignored in step 4, run here
//!    with `--ignored`) and `tests/tests/capability.rs` (the
//!    kernel-has-BPF-LSM side of the capability detection); and
//!    `first_bytes.rs` and `channels.rs` again (the cgroup_skb programs on
//!    Linux 6.1). Then a second boot, Debian 13's 6.12: `capability.rs` and
//!    `files.rs` (its verifier checks LSM return values; the whole kernel
//!    matrix is `cargo xtask vm-matrix`).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

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
    let vm = vm_tests(root, &cargo)?;
    // One plain closing line for the whole suite (cargo's last line is the
    // last crate's doc tests, often "0 passed"). The VM ran the host's
    // ignored BPF LSM tests: they are not skipped.
    let skipped = ignored.saturating_sub(vm.lsm_tests);
    let (passed, failed) = (passed + vm.passed, failed + vm.failed);
    println!(
        "tests: {passed} passed, {failed} failed, {skipped} skipped (of which in the BPF LSM VM: \
         {} passed, {} failed)",
        vm.passed, vm.failed
    );
    if failed > 0 || passed == 0 || vm.passed == 0 {
        bail!("test failed: {failed} failed, {passed} passed");
    }
    eprintln!("\n==> xtask test: all steps passed");
    Ok(0)
}

struct VmResult {
    passed: u64,
    failed: u64,
    /// Tests of the ignored-on-the-host binary that ran in the VM.
    lsm_tests: u64,
}

/// Test binaries of `enforcer-tests` for `names`, built (not run).
pub(crate) fn test_binaries(
    root: &Path,
    cargo: &std::ffi::OsStr,
    names: &[&str],
) -> Result<Vec<PathBuf>> {
    let mut c = Command::new(cargo);
    c.args([
        "test",
        "-p",
        "enforcer-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for n in names {
        c.args(["--test", n]);
    }
    let out = c
        .env_remove("AYA_BUILD_SKIP")
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the VM test binaries")?;
    if !out.status.success() {
        bail!("building the VM test binaries failed ({})", out.status);
    }
    let mut found = vec![None; names.len()];
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| *n == name) {
            found[i] = Some(PathBuf::from(exe));
        }
    }
    found
        .into_iter()
        .zip(names)
        .map(|(f, n)| f.with_context(|| format!("cargo built no test binary {n}")))
        .collect()
}

/// Step 5: the BPF LSM tests inside the VM runner.
fn vm_tests(root: &Path, cargo: &std::ffi::OsStr) -> Result<VmResult> {
    let bins = test_binaries(
        root,
        cargo,
        &["files", "capability", "first_bytes", "channels", "unix_lsm"],
    )?;
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "enforcer"]).current_dir(root);
    step("build enforcer for the VM", build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| root.join(t))
        .unwrap_or_else(|| root.join("target"));
    let enforcer = target.join("debug/enforcer");
    let q = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    // The binaries run in one boot; the status is the first failure's.
    // first_bytes and channels also run on the host: here they prove the
    // cgroup_skb programs on Linux 6.1 (its verifier checks bpf_loop
    // callbacks differently, and its cgroup_skb helpers differ).
    // unix_lsm: the BPF LSM unix hooks (ignored on the host, like files).
    let script = format!(
        "st=0; {files} --ignored --test-threads=1 || st=$?; \
         {cap} --test-threads=1 || st=$?; {fb} --test-threads=1 || st=$?; \
         {ch} --test-threads=1 || st=$?; {ul} --ignored --test-threads=1 || st=$?; exit $st",
        files = q(&bins[0]),
        cap = q(&bins[1]),
        fb = q(&bins[2]),
        ch = q(&bins[3]),
        ul = q(&bins[4]),
    );
    let exe = std::env::current_exe().context("xtask's own path")?;
    let mut vm = Command::new(&exe);
    // The default 900 s is too tight for the whole set under TCG (878 s
    // measured with the unix and channel tests added): 30 minutes.
    vm.arg("vm-test")
        .args(["--timeout", "1800"])
        .arg("--env")
        .arg(format!("ENFORCER_BIN={}", enforcer.display()))
        .args(["--env", "CI=true", "--", "sh", "-c", &script])
        .current_dir(root);
    eprintln!("\n==> xtask test: BPF LSM tests in the VM (QEMU/TCG, a few minutes)");
    let results = run_tests_lines(vm)?;
    // One "test result:" line per binary, in order: a binary that died
    // without one would shift the counts onto the wrong suite.
    if results.len() != 5 {
        bail!(
            "the VM run reported {} test results, not 5 (one per binary)",
            results.len()
        );
    }
    let files = &results[0];
    let mut r = VmResult {
        passed: results.iter().map(|r| r.0).sum(),
        failed: results.iter().map(|r| r.1).sum(),
        // The host-ignored binaries: files (first) and unix_lsm (fifth).
        lsm_tests: files.0 + files.1 + results.get(4).map_or(0, |r| r.0 + r.1),
    };

    // One more kernel: Debian 13's 6.12, whose verifier checks the range of
    // an LSM program's return value (Linux >= 6.10; it refused all our LSM
    // hooks once). The capability suite and the file rules run there; the
    // whole matrix is `cargo xtask vm-matrix`.
    let script = format!(
        "st=0; {cap} --test-threads=1 || st=$?; {files} --ignored --test-threads=1 || st=$?; exit $st",
        cap = q(&bins[1]),
        files = q(&bins[0]),
    );
    let mut vm = Command::new(&exe);
    vm.arg("vm-test")
        .args(["--kernel", EXTRA_KERNEL, "--timeout", "1500"])
        .arg("--env")
        .arg(format!("ENFORCER_BIN={}", enforcer.display()))
        .args(["--env", "CI=true", "--", "sh", "-c", &script])
        .current_dir(root);
    eprintln!("\n==> xtask test: capability and file rules on Linux {EXTRA_KERNEL} in the VM");
    let extra = run_tests_lines(vm)?;
    if extra.len() != 2 {
        bail!(
            "the {EXTRA_KERNEL} VM run reported {} test results, not 2",
            extra.len()
        );
    }
    r.passed += extra.iter().map(|x| x.0).sum::<u64>();
    r.failed += extra.iter().map(|x| x.1).sum::<u64>();
    Ok(r)
}

/// The second kernel `cargo xtask test` boots (a short name of
/// scripts/vm-kernels.txt).
const EXTRA_KERNEL: &str = "6.12";

/// Run `cargo test`, echo its output, and add up its "test result:" lines.
fn run_tests(cmd: Command) -> Result<(u64, u64, u64)> {
    let r = run_tests_lines(cmd)?;
    Ok((
        r.iter().map(|x| x.0).sum(),
        r.iter().map(|x| x.1).sum(),
        r.iter().map(|x| x.2).sum(),
    ))
}

/// (passed, failed, ignored) of a "test result:" line's rest.
pub(crate) fn parse_result(rest: &str) -> (u64, u64, u64) {
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
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
    (passed, failed, ignored)
}

/// Run a test command, echo its output, and return each "test result:"
/// line as (passed, failed, ignored), in order.
fn run_tests_lines(mut cmd: Command) -> Result<Vec<(u64, u64, u64)>> {
    use std::io::{BufRead, BufReader};
    eprintln!("\n==> xtask test: test: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running the tests")?;
    let mut results = Vec::new();
    let out = child.stdout.take().context("test stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            results.push(parse_result(rest));
        }
    }
    let st = child.wait()?;
    if !st.success() && results.iter().all(|r| r.1 == 0) {
        bail!("tests failed ({st}) before reporting test results");
    }
    Ok(results)
}
