//! `cargo xtask vm-matrix`: the real-kernel suites on each kernel pinned in
//! `scripts/vm-kernels.txt` (Debian's 5.10, 6.1, 6.12), one VM boot per
//! kernel (`cargo xtask vm-test --kernel K`), and a table of what passed.
//!
//! Each suite is one test binary of `enforcer-tests` (the host-ignored BPF
//! LSM ones with `--ignored`). The guest prints a marker line before each,
//! so the "test result:" lines can be told apart. Results go to
//! `target/vm-matrix/<kernel>.json` and, as a Markdown table (kernel ×
//! suite, passed/failed), to stdout: the README's kernel table is copied
//! from it.
use std::{collections::BTreeMap, path::Path, process::Command, time::Instant};

use anyhow::{bail, Context, Result};

/// enforcer's minimum Linux (enforcer/src/kernel/mod.rs `MIN_LINUX`; a
/// test below keeps the two equal).
const MIN_LINUX: &str = "5.17";

/// (suite, test binary, run the host-ignored tests, what it covers).
pub const SUITES: &[(&str, &str, bool, &str)] = &[
    (
        "capability",
        "capability",
        false,
        "kernel probes, refusal or degradation",
    ),
    (
        "network",
        "run_egress",
        false,
        "IP/port egress, audit mode, metrics",
    ),
    (
        "containment",
        "containment",
        false,
        "the agent attacks the enforcer",
    ),
    ("dns", "dns", false, "host rules through the DNS proxy"),
    (
        "files",
        "files",
        true,
        "BPF LSM file rules, the taint clamp",
    ),
    (
        "channels",
        "channels",
        false,
        "ingress, taint clamp on open sockets, IP options",
    ),
    (
        "first_bytes",
        "first_bytes",
        false,
        "TLS SNI / HTTP Host judge",
    ),
    (
        "unix",
        "unix_sockets",
        false,
        "unix sockets by policy (cgroup hooks)",
    ),
    (
        "unix_lsm",
        "unix_lsm",
        true,
        "unix sockets by policy (BPF LSM)",
    ),
    (
        "cri",
        "cri",
        true,
        "pods made by containerd + runc through CRI",
    ),
];

#[derive(clap::Args)]
pub struct MatrixArgs {
    /// Kernels (short names of scripts/vm-kernels.txt); default: all pinned.
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Suites to run (default: all): capability, network, containment, dns, files, channels, first_bytes, unix, unix_lsm, cri.
    #[arg(long = "suite")]
    pub suites: Vec<String>,
    /// Give up on one kernel's VM after this many seconds.
    #[arg(long, default_value_t = 5400)]
    pub timeout: u64,
}

/// The short names pinned in scripts/vm-kernels.txt, in file order.
pub fn pinned_kernels(root: &Path) -> Result<Vec<String>> {
    let p = root.join("scripts/vm-kernels.txt");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

#[derive(Default)]
struct SuiteResult {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Names of the failed tests.
    failures: Vec<String>,
    /// Not run: the kernel is older than enforcer's minimum, where enforcer
    /// refuses to start (the capability suite checks that it does).
    refused: bool,
}

pub fn run(root: &Path, args: &MatrixArgs) -> Result<u8> {
    crate::util::require_root("vm-matrix")?;
    let kernels = if args.kernels.is_empty() {
        pinned_kernels(root)?
    } else {
        args.kernels.clone()
    };
    let suites: Vec<_> = SUITES
        .iter()
        .filter(|s| args.suites.is_empty() || args.suites.iter().any(|n| n == s.0))
        .collect();
    if let Some(bad) = args
        .suites
        .iter()
        .find(|n| !SUITES.iter().any(|s| s.0 == n.as_str()))
    {
        bail!("unknown suite {bad}");
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let names: Vec<&str> = suites.iter().map(|s| s.1).collect();
    let bins = crate::test::test_binaries(root, &cargo, &names)?;
    let mut build = Command::new(&cargo);
    build.args(["build", "-p", "enforcer"]).current_dir(root);
    if !build.status()?.success() {
        bail!("cargo build -p enforcer failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| root.join(t))
        .unwrap_or_else(|| root.join("target"));
    let enforcer = target.join("debug/enforcer");
    let pod_images = target.join("pod-images");
    if suites.iter().any(|s| s.0 == "cri") {
        // setup-vm.sh installs catatonit (the pause image's binary).
        crate::vm::setup(root, None)?;
        crate::pod_images::write(root, &pod_images)?;
    }
    let q = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    // Below enforcer's minimum Linux only the capability suite runs (it
    // checks that enforcer refuses to start, and says why); the others are
    // marked "refused".
    let mut script = format!(
        "st=0; skip=; rel=$(uname -r); echo \"@@release $rel\"; \
         if [ \"$(printf '%s\\n%s\\n' {MIN} \"$rel\" | sort -V | head -1)\" != {MIN} ]; then \
         echo \"@@below-min $rel\"; skip=1; fi; ",
        MIN = MIN_LINUX
    );
    for (s, bin) in suites.iter().zip(&bins) {
        let ignored = if s.2 { " --ignored" } else { "" };
        let guard = if s.0 == "capability" {
            ""
        } else {
            "[ -n \"$skip\" ] || "
        };
        script += &format!(
            "echo '@@suite {}'; {guard}{}{ignored} --test-threads=1 || st=$?; ",
            s.0,
            q(bin)
        );
    }
    script += "exit $st";
    let out_dir = root.join("target/vm-matrix");
    std::fs::create_dir_all(&out_dir)?;
    let exe = std::env::current_exe().context("xtask's own path")?;
    let mut table: BTreeMap<String, BTreeMap<&str, SuiteResult>> = BTreeMap::new();
    let mut any_failed = false;
    for k in &kernels {
        eprintln!("\n==> xtask vm-matrix: kernel {k}: {} suites", suites.len());
        let t = Instant::now();
        let mut vm = Command::new(&exe);
        vm.args([
            "vm-test",
            "--kernel",
            k,
            "--timeout",
            &args.timeout.to_string(),
        ])
        .arg("--env")
        .arg(format!("ENFORCER_BIN={}", enforcer.display()))
        .arg("--env")
        .arg(format!("ENFORCER_POD_IMAGES={}", pod_images.display()))
        // capability.rs may find the kernel below enforcer's minimum only
        // where the matrix expects it (it checks the refusal there).
        .args(["--env", "ENFORCER_TEST_BELOW_MIN_OK=1"])
        .args(["--env", "CI=true", "--", "sh", "-c", &script])
        .current_dir(root)
        .stdout(std::process::Stdio::piped());
        let mut child = vm.spawn().context("starting xtask vm-test")?;
        let mut results: BTreeMap<&str, SuiteResult> = BTreeMap::new();
        let mut current: Option<&str> = None;
        use std::io::BufRead;
        let mut release = String::new();
        let mut below_min = false;
        for line in std::io::BufReader::new(child.stdout.take().context("stdout")?).lines() {
            let line = line?;
            println!("{line}");
            if let Some(r) = line.strip_prefix("@@release ") {
                release = r.trim().to_string();
            } else if line.starts_with("@@below-min ") {
                below_min = true;
            } else if let Some(name) = line.strip_prefix("@@suite ") {
                current = suites.iter().find(|s| s.0 == name.trim()).map(|s| s.0);
                if let Some(c) = current {
                    results.entry(c).or_default();
                }
            } else if let Some(rest) = line.strip_prefix("test result: ") {
                if let Some(r) = current.and_then(|c| results.get_mut(c)) {
                    let (p, f, i) = crate::test::parse_result(rest);
                    r.passed += p;
                    r.failed += f;
                    r.ignored += i;
                }
            } else if let (Some(c), Some(name)) = (
                current,
                line.strip_prefix("test ")
                    .and_then(|l| l.strip_suffix(" ... FAILED")),
            ) {
                if let Some(r) = results.get_mut(c) {
                    r.failures.push(name.to_string());
                }
            }
        }
        let st = child.wait()?;
        // A suite that printed no result (crashed, or the VM died) failed.
        for s in &suites {
            let r = results.entry(s.0).or_default();
            if below_min && s.0 != "capability" {
                r.refused = true;
            } else if r.passed + r.failed == 0 && r.ignored == 0 {
                r.failed += 1;
                r.failures
                    .push("(no test result: the binary or the VM died)".into());
            }
        }
        any_failed |= !st.success() || results.values().any(|r| r.failed > 0);
        let json = serde_json::json!({
            "kernel": k,
            "release": release,
            "secs": t.elapsed().as_secs_f64().round(),
            "suites": results.iter().map(|(k, r)| (k.to_string(), serde_json::json!({
                "passed": r.passed, "failed": r.failed, "ignored": r.ignored,
                "failures": r.failures, "refused": r.refused,
            }))).collect::<serde_json::Map<_, _>>(),
        });
        let path = out_dir.join(format!("{k}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
        eprintln!(
            "==> xtask vm-matrix: kernel {k} ({release}) done in {:.0} s: {}",
            t.elapsed().as_secs_f64(),
            path.display()
        );
        table.insert(format!("{k} ({release})"), results);
    }
    // The table: one row per kernel, one column per suite.
    let mut md = String::from("| kernel |");
    for s in &suites {
        md += &format!(" {} |", s.0);
    }
    md += "\n|---|";
    md += &"---|".repeat(suites.len());
    md += "\n";
    for (k, results) in &table {
        md += &format!("| {k} |");
        for s in &suites {
            let r = &results[s.0];
            md += &if r.refused {
                format!(" refused (Linux < {MIN_LINUX}) |")
            } else if r.failed == 0 {
                format!(" {} passed |", r.passed)
            } else {
                format!(" **{} failed**, {} passed |", r.failed, r.passed)
            };
        }
        md += "\n";
    }
    println!("\n{md}");
    for (k, results) in &table {
        for (s, r) in results {
            for f in &r.failures {
                println!("{k}: {s}: FAILED {f}");
            }
        }
    }
    std::fs::write(out_dir.join("table.md"), &md)?;
    Ok(if any_failed { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    #[test]
    fn min_linux_is_enforcers() {
        let src = include_str!("../../enforcer/src/kernel/mod.rs");
        assert!(
            src.contains(&format!(
                "pub const MIN_LINUX: &str = \"{}\";",
                super::MIN_LINUX
            )),
            "xtask's MIN_LINUX differs from enforcer/src/kernel/mod.rs"
        );
    }

    #[test]
    fn every_pinned_kernel_has_a_short_name() {
        let k = super::pinned_kernels(&crate::util::repo_root()).unwrap();
        assert!(
            k.contains(&"6.1".to_string()) && k.contains(&"6.12".to_string()),
            "{k:?}"
        );
        assert!(k.contains(&"5.10".to_string()), "{k:?}");
    }
}
