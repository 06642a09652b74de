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
//! 5. The soak, CI's form: `cargo xtask soak --minutes 3` (the daemon
//!    with 20 identities under load, reloads, floods, `kill -9` every
//!    minute; zero bytes at denied listeners, no growth across lifetimes).
//! 6. The fuzz smoke: `cargo xtask fuzz --smoke --seconds 5`, every
//!    libFuzzer target of `fuzz/` from its seeds (an unoptimized build
//!    without sanitizer; the long runs are `cargo xtask fuzz`).
//! 7. The BPF LSM tests, in VMs (`cargo xtask vm-test`: Debian kernels
//!    booted with `lsm=...,bpf` under QEMU/TCG), because this host's kernel
//!    refuses BPF LSM programs. Debian 12's 6.1: `tests/tests/files.rs`
//!    (ignored in step 4, run here with `--ignored`), `capability.rs` (the
//!    kernel-has-BPF-LSM side of the capability detection), `first_bytes.rs`
//!    and `channels.rs` again (the cgroup_skb programs on 6.1) and
//!    `unix_lsm.rs`; then Debian 13's 6.12: `capability.rs` (its verifier
//!    checks LSM return values). The whole kernel matrix is `cargo xtask
//!    vm-matrix`. `cargo xtask test --vm-only` runs this step alone.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Cargo's target directory for the repository at `root`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| root.join(t))
        .unwrap_or_else(|| root.join("target"))
}

/// Seconds per fuzz target in CI's smoke.
const FUZZ_SMOKE_S: u64 = 5;

fn step(name: &str, mut cmd: Command) -> Result<()> {
    eprintln!("\n==> xtask test: {name}: {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {name}"))?;
    if !st.success() {
        bail!("{name} failed ({st})");
    }
    Ok(())
}

pub fn run(root: &Path, vm_only: bool) -> Result<u8> {
    crate::util::require_root("test")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if vm_only {
        let vm = vm_tests(root, &cargo)?;
        println!(
            "tests in the BPF LSM VMs: {} passed, {} failed",
            vm.passed, vm.failed
        );
        if vm.failed > 0 || vm.passed == 0 {
            bail!("test failed: {} failed, {} passed", vm.failed, vm.passed);
        }
        return Ok(0);
    }
    let mut setup = Command::new("bash");
    setup.arg(root.join("scripts/setup.sh")).current_dir(root);
    step("setup", setup)?;

    let mut fmt = Command::new(&cargo);
    fmt.args(["fmt", "--all", "--", "--check"])
        .current_dir(root);
    step("fmt", fmt)?;
    // The fuzz crate is a workspace of its own (its build flags are the
    // fuzzer's): format-checked here, built by the fuzz smoke below.
    let mut fmt = Command::new(&cargo);
    fmt.args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])
        .current_dir(root);
    step("fmt (fuzz)", fmt)?;

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
    // The soak, CI's form: 3 minutes of load, reloads, floods and three
    // daemon lifetimes (kill -9 every minute) on the debug build the tests
    // used. A failure is reported at the end, after the VM step.
    let mut build = Command::new(&cargo);
    build.args(["build", "-p", "enforcer"]).current_dir(root);
    step("build enforcer for the soak", build)?;
    let mut soak = Command::new(std::env::current_exe().context("xtask's own path")?);
    soak.args(["soak", "--minutes", "3", "--enforcer-bin"])
        .arg(target_dir(root).join("debug/enforcer"))
        .current_dir(root);
    eprintln!("\n==> xtask test: soak: {soak:?}");
    let soak_ok = soak.status().is_ok_and(|st| st.success());
    // The fuzz smoke: every libFuzzer target for a few seconds from its
    // seeds, which keep the input of every crash ever found. A failure is
    // reported at the end, after the VM step.
    eprintln!("\n==> xtask test: fuzz smoke (cargo xtask fuzz --smoke --seconds {FUZZ_SMOKE_S})");
    let fuzz = crate::fuzz::run(&crate::fuzz::FuzzArgs::smoke(FUZZ_SMOKE_S));
    let fuzz_ok = matches!(fuzz, Ok(0));
    if let Err(e) = &fuzz {
        eprintln!("xtask test: the fuzz smoke did not run: {e:#}");
    }
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
    if !soak_ok {
        bail!("the soak failed (see its tables above; logs in target/soak/)");
    }
    if !fuzz_ok {
        bail!("the fuzz smoke failed (see its table above; logs in target/fuzz/)");
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

/// One test binary of a boot: its index in `vm_tests`' binary list and
/// its extra arguments.
type Run = (usize, &'static str);

/// A "test result:" line: (passed, failed, ignored).
type Counts = (u64, u64, u64);

/// One VM boot of the CI step.
struct Boot {
    /// Shown before each line of its output (`[6.1] test ... ok`).
    tag: &'static str,
    /// A short name of scripts/vm-kernels.txt; `None`: the default (6.1).
    kernel: Option<&'static str>,
    runs: Vec<Run>,
    timeout_s: u64,
}

/// Step 5: the BPF LSM tests inside the VM runner, one boot after the
/// other. Measured on CI's machine (Dec 3, 2026; before enforcer loaded its
/// programs in parallel): files 982 s, capability 292 s, first_bytes
/// 139 s, channels 183 s, unix_lsm ~250 s on 6.1; 6.12's capability 123 s.
fn vm_tests(root: &Path, cargo: &std::ffi::OsStr) -> Result<VmResult> {
    const FILES: usize = 0;
    const CAP: usize = 1;
    const FIRST_BYTES: usize = 2;
    const CHANNELS: usize = 3;
    const UNIX_LSM: usize = 4;
    const CRI: usize = 5;
    const LEARN: usize = 6;
    let bins = test_binaries(
        root,
        cargo,
        &[
            "files",
            "capability",
            "first_bytes",
            "channels",
            "unix_lsm",
            "cri",
            "learn",
        ],
    )?;
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "enforcer"]).current_dir(root);
    step("build enforcer for the VM", build)?;
    let target = target_dir(root);
    let enforcer = target.join("debug/enforcer");
    // setup-vm.sh first: it installs what the pod images are made of
    // (catatonit) and the runtime the guest runs (containerd, runc).
    crate::vm::setup(root, None)?;
    let pod_images = target.join("pod-images");
    crate::pod_images::write(root, &pod_images)?;
    // Debian 12's 6.1: the file rules (the BPF LSM tests the host cannot
    // run), the capability detection, the cgroup_skb programs again
    // (first_bytes, channels: 6.1's verifier checks bpf_loop callbacks
    // differently, and its cgroup_skb helpers differ) and the BPF LSM unix
    // hooks. Then Debian 13's 6.12, whose verifier checks the range of an
    // LSM program's return value (Linux >= 6.10; it refused all our LSM
    // hooks once): the capability suite loads every LSM program there.
    // 6.12's file suite and the rest of the kernel matrix are `cargo xtask
    // vm-matrix` (CI's time).
    let boots = [
        Boot {
            tag: "6.1",
            kernel: None,
            runs: vec![
                (FILES, "--ignored"),
                (CAP, ""),
                (FIRST_BYTES, ""),
                (CHANNELS, ""),
                (UNIX_LSM, "--ignored"),
                // `policy learn` of a secret read: taint and onTaint.
                (LEARN, "--ignored"),
                // The systemd driver's network test is vm-matrix's (its
                // file test covers the systemd layout here), and so is
                // the cgroupfs file test (the network test covers the
                // cgroupfs layout here).
                // The cgroupfs file test too: the systemd file test runs
                // the same steps in the layout of kubeadm's default
                // driver, and CI's time went to the fuzz smoke.
                (
                    CRI,
                    "--ignored --skip pods_under_the_systemd_cgroup_driver \
                     --skip file_rules_of_pods_resolve_in_their_containers",
                ),
            ],
            // 1800 s was too short once on CI's machine (before the
            // parallel program loads).
            timeout_s: 3000,
        },
        Boot {
            tag: EXTRA_KERNEL,
            kernel: Some(EXTRA_KERNEL),
            runs: vec![(CAP, "")],
            timeout_s: 900,
        },
    ];
    eprintln!("\n==> xtask test: BPF LSM tests in VMs (QEMU/TCG)");
    let started = std::time::Instant::now();
    let mut r = VmResult {
        passed: 0,
        failed: 0,
        lsm_tests: 0,
    };
    for boot in &boots {
        let t = std::time::Instant::now();
        for ((bin, _), (p, f, _)) in run_boot(root, boot, &bins, &enforcer, &pod_images)? {
            r.passed += p;
            r.failed += f;
            // The binaries the host ignores (BPF LSM, containerd).
            if bin == FILES || bin == UNIX_LSM || bin == CRI || bin == LEARN {
                r.lsm_tests += p + f;
            }
        }
        eprintln!(
            "==> xtask test: the {} VM took {:.0} s",
            boot.tag,
            t.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "==> xtask test: the VM step took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(r)
}

/// Boot `boot.kernel` once and run its binaries (the status is the first
/// failure's); each binary's "test result:" line, in order.
fn run_boot(
    root: &Path,
    boot: &Boot,
    bins: &[PathBuf],
    enforcer: &Path,
    pod_images: &Path,
) -> Result<Vec<(Run, Counts)>> {
    let q = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let mut script = String::from("st=0; ");
    for (bin, args) in &boot.runs {
        script.push_str(&format!(
            "{} {args} --test-threads=1 || st=$?; ",
            q(&bins[*bin])
        ));
    }
    script.push_str("exit $st");
    let exe = std::env::current_exe().context("xtask's own path")?;
    let mut vm = Command::new(&exe);
    vm.arg("vm-test")
        .args(["--timeout", &boot.timeout_s.to_string()]);
    if let Some(k) = boot.kernel {
        vm.args(["--kernel", k]);
    }
    vm.arg("--env")
        .arg(format!("ENFORCER_BIN={}", enforcer.display()))
        .arg("--env")
        .arg(format!("ENFORCER_POD_IMAGES={}", pod_images.display()))
        .args(["--env", "CI=true", "--", "sh", "-c", &script])
        .current_dir(root);
    let results = run_tests_tagged(vm, boot.tag).with_context(|| format!("VM {}", boot.tag))?;
    // One "test result:" line per binary, in order: a binary that died
    // without one would shift the counts onto the wrong suite.
    if results.len() != boot.runs.len() {
        bail!(
            "the VM {} reported {} test results, not {} (one per binary)",
            boot.tag,
            results.len(),
            boot.runs.len()
        );
    }
    Ok(boot.runs.iter().copied().zip(results).collect())
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

/// `run_tests_lines` for a VM boot: each line of its output (stdout and
/// stderr) is echoed after `[tag] `.
fn run_tests_tagged(mut cmd: Command, tag: &str) -> Result<Vec<(u64, u64, u64)>> {
    use std::io::{BufRead, BufReader};
    eprintln!("\n==> xtask test: [{tag}] {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running the tests")?;
    let err = child.stderr.take().context("test stderr")?;
    let err_tag = tag.to_string();
    let echo_err = std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            eprintln!("[{err_tag}] {line}");
        }
    });
    let mut results = Vec::new();
    let out = child.stdout.take().context("test stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("[{tag}] {line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            results.push(parse_result(rest));
        }
    }
    let st = child.wait()?;
    let _ = echo_err.join();
    if !st.success() && results.iter().all(|r| r.1 == 0) {
        bail!("tests failed ({st}) before reporting test results");
    }
    Ok(results)
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
