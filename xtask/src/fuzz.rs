//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (cargo-fuzz), each
//! over enforcer's own entry point, run for a time, side by side.
//!
//! - Installs cargo-fuzz (pinned) when it is missing, then builds the
//!   targets with the pinned nightly (`AYA_BUILD_SKIP=1`: the targets are
//!   userspace code, the eBPF object is not needed).
//! - Runs every target (or `--target`s) for `--seconds`, `--jobs` at a
//!   time, from its seeds (`fuzz/seeds/<target>`, committed: every input a
//!   crash was once found with stays there as a regression input) and its
//!   working corpus (`fuzz/corpus/<target>`, not committed).
//! - Reports per target: executions, executions/s, coverage, corpus size,
//!   peak RSS, and the result. A crash, panic, timeout (`-timeout`), leak
//!   (AddressSanitizer's LeakSanitizer) or RSS above `-rss_limit_mb` fails
//!   the command and names the reproducer in `fuzz/artifacts/<target>/`.
//! - `--smoke` (CI): an unoptimized build without a sanitizer, which builds
//!   in a fraction of the time; panics, overflow checks and timeouts still
//!   fail it.
//!
//! Writes `target/fuzz/results.json`.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::util;

const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Above this the run fails (libFuzzer's `-rss_limit_mb`, also its
/// per-allocation limit): an input that makes a parser allocate without
/// bound is a finding.
const RSS_LIMIT_MB: u64 = 2048;
/// Seconds one input may take before it is reported as a hang.
const TIMEOUT_S: u64 = 10;

#[derive(clap::Args, Clone)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only these targets (repeatable; default: all of `fuzz/Cargo.toml`).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Targets run at a time (default: the number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
    /// CI's short run: unoptimized, no sanitizer (builds much faster).
    #[arg(long)]
    smoke: bool,
    /// Stop a target after this many executions (`--seconds` still caps
    /// it); reported as reached or not.
    #[arg(long)]
    runs: Option<u64>,
}

impl FuzzArgs {
    /// CI's smoke: every target for `seconds`.
    pub fn smoke(seconds: u64) -> Self {
        Self {
            seconds,
            targets: Vec::new(),
            jobs: None,
            smoke: true,
            runs: None,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    target: String,
    execs: u64,
    secs: f64,
    cov: u64,
    corpus: u64,
    peak_rss_mb: u64,
    /// None: ran to its time; Some: what went wrong.
    failure: Option<String>,
    artifact: Option<String>,
}

fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        });
    if have {
        return Ok(());
    }
    eprintln!("xtask fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (crates.io)");
    let st = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !st.success() {
        bail!("cargo install cargo-fuzz {CARGO_FUZZ_VERSION} failed ({st})");
    }
    Ok(())
}

/// `cargo fuzz` with the pinned nightly, in the repository.
fn cargo_fuzz(root: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{}", util::NIGHTLY))
        .arg("fuzz")
        .env("AYA_BUILD_SKIP", "1")
        .current_dir(root);
    c
}

fn list_targets(root: &Path) -> Result<Vec<String>> {
    let out = cargo_fuzz(root)
        .args(["list", "--fuzz-dir", "fuzz"])
        .output()
        .context("cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// The value of libFuzzer's final `stat::<name>: N` line.
fn stat(log: &str, name: &str) -> Option<u64> {
    let key = format!("stat::{name}:");
    log.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&key)?.trim().parse().ok())
}

/// `cov: N` and `corp: N` of the last status line (`#… cov: … corp: n/…`).
fn last_status(log: &str) -> (u64, u64) {
    let field = |l: &str, key: &str| -> Option<u64> {
        let rest = &l[l.find(key)? + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())?
            .parse()
            .ok()
    };
    log.lines()
        .rev()
        .filter(|l| l.starts_with('#'))
        .find_map(|l| Some((field(l, "cov: ")?, field(l, "corp: ")?)))
        .unwrap_or((0, 0))
}

/// What a failed run's log says went wrong, and the reproducer it wrote.
fn failure(log: &str) -> (String, Option<String>) {
    let what = [
        ("panicked at", "panic"),
        ("ERROR: libFuzzer: deadly signal", "crash (deadly signal)"),
        ("ERROR: libFuzzer: timeout", "timeout (hang)"),
        ("ERROR: libFuzzer: out-of-memory", "out of memory"),
        ("ERROR: LeakSanitizer", "leak"),
        ("ERROR: AddressSanitizer", "memory error (AddressSanitizer)"),
    ]
    .iter()
    .find(|(needle, _)| log.contains(needle))
    .map_or("failed", |(_, w)| w);
    let detail = log
        .lines()
        .find(|l| l.contains("panicked at") || l.starts_with("==") && l.contains("ERROR"))
        .map(|l| format!("{what}: {}", l.trim()))
        .unwrap_or_else(|| what.to_string());
    let artifact = log.lines().find_map(|l| {
        let i = l.find("Test unit written to ")?;
        Some(l[i + "Test unit written to ".len()..].trim().to_string())
    });
    (detail, artifact)
}

fn run_target(root: &Path, bin: &Path, target: &str, args: &FuzzArgs) -> Result<Outcome> {
    let corpus = root.join("fuzz/corpus").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    let logs = root.join("target/fuzz");
    for d in [&corpus, &artifacts, &logs] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    if !seeds.is_dir() {
        bail!("target {target} has no seeds in {}", seeds.display());
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = fs::File::create(&log_path)?;
    let start = Instant::now();
    let st = Command::new(bin)
        .arg(&corpus)
        .arg(&seeds)
        .arg(format!("-max_total_time={}", args.seconds))
        .args(args.runs.map(|n| format!("-runs={n}")))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={TIMEOUT_S}"))
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    let secs = start.elapsed().as_secs_f64();
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let (cov, corp) = last_status(&text);
    let mut o = Outcome {
        target: target.to_string(),
        execs: stat(&text, "number_of_executed_units").unwrap_or(0),
        secs,
        cov,
        corpus: corp,
        peak_rss_mb: stat(&text, "peak_rss_mb").unwrap_or(0),
        failure: None,
        artifact: None,
    };
    if !st.success() {
        let (what, artifact) = failure(&text);
        o.failure = Some(format!("{what} (exit {st}; log {})", log_path.display()));
        o.artifact = artifact;
    } else if o.execs == 0 {
        o.failure = Some(format!(
            "no executions reported (log {})",
            log_path.display()
        ));
    }
    Ok(o)
}

pub fn run(args: &FuzzArgs) -> Result<u8> {
    let root = util::repo_root();
    util::ensure_setup(&root)?;
    ensure_cargo_fuzz()?;
    let all = list_targets(&root)?;
    let targets: Vec<String> = if args.targets.is_empty() {
        all.clone()
    } else {
        for t in &args.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t:?} (targets: {})", all.join(", "));
            }
        }
        args.targets.clone()
    };
    let (profile, build): (&str, &[&str]) = if args.smoke {
        ("debug", &["--dev", "-s", "none"])
    } else {
        ("release", &["-O"])
    };
    eprintln!(
        "xtask fuzz: building {} target(s) ({})",
        targets.len(),
        if args.smoke {
            "smoke: unoptimized, no sanitizer"
        } else {
            "optimized, AddressSanitizer"
        }
    );
    let st = cargo_fuzz(&root)
        .arg("build")
        .args(build)
        .args(["--fuzz-dir", "fuzz"])
        .status()
        .context("cargo fuzz build")?;
    if !st.success() {
        bail!("cargo fuzz build failed ({st})");
    }
    let bin_dir = root.join("fuzz/target").join(host_triple()?).join(profile);
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    eprintln!(
        "xtask fuzz: {} s per target, {jobs} at a time; logs in target/fuzz/<target>.log",
        args.seconds
    );
    let queue = Arc::new(Mutex::new(targets.clone()));
    let results = Arc::new(Mutex::new(Vec::<Result<Outcome>>::new()));
    std::thread::scope(|s| {
        for _ in 0..jobs.min(targets.len()) {
            let (queue, results, root, bin_dir) = (&queue, &results, &root, &bin_dir);
            s.spawn(move || loop {
                let Some(t) = queue.lock().unwrap().pop() else {
                    break;
                };
                let r = run_target(root, &bin_dir.join(&t), &t, args)
                    .with_context(|| format!("fuzz target {t}"));
                if let Ok(o) = &r {
                    eprintln!(
                        "xtask fuzz: {t}: {} executions, {}",
                        o.execs,
                        o.failure.as_deref().unwrap_or("ok")
                    );
                }
                results.lock().unwrap().push(r);
            });
        }
    });
    let mut outcomes = Vec::new();
    for r in Arc::try_unwrap(results).unwrap().into_inner().unwrap() {
        outcomes.push(r?);
    }
    outcomes.sort_by(|a, b| a.target.cmp(&b.target));
    report(&root, args, &outcomes)?;
    Ok(if outcomes.iter().any(|o| o.failure.is_some()) {
        1
    } else {
        0
    })
}

fn report(root: &Path, args: &FuzzArgs, outcomes: &[Outcome]) -> Result<()> {
    println!(
        "\n{:<14} {:>12} {:>9} {:>7} {:>7} {:>8}  result",
        "target", "executions", "exec/s", "cov", "corpus", "peak RSS"
    );
    for o in outcomes {
        let min = match args.runs {
            Some(m) if o.execs >= m => format!(" ({m} runs reached)"),
            Some(m) => format!(" ({m} runs NOT reached: raise --seconds)"),
            None => String::new(),
        };
        println!(
            "{:<14} {:>12} {:>9.0} {:>7} {:>7} {:>5} MB  {}{min}",
            o.target,
            o.execs,
            o.execs as f64 / o.secs.max(1e-9),
            o.cov,
            o.corpus,
            o.peak_rss_mb,
            o.failure.as_deref().unwrap_or("ok"),
        );
        if let Some(a) = &o.artifact {
            println!(
                "  reproduce: cargo +{} fuzz run --fuzz-dir fuzz {} {a}",
                util::NIGHTLY,
                o.target
            );
        }
    }
    let out = root.join("target/fuzz/results.json");
    let v = json!({
        "seconds": args.seconds,
        "runs": args.runs,
        "smoke": args.smoke,
        "targets": outcomes.iter().map(|o| json!({
            "target": o.target,
            "executions": o.execs,
            "seconds": o.secs,
            "cov": o.cov,
            "corpus": o.corpus,
            "peak_rss_mb": o.peak_rss_mb,
            "failure": o.failure,
            "artifact": o.artifact,
        })).collect::<Vec<_>>(),
    });
    fs::write(&out, serde_json::to_string_pretty(&v)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The host's target triple (cargo-fuzz builds for it explicitly).
fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(String::from))
        .context("rustc -vV printed no host")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "INFO: Seed: 1\n\
        #2\tINITED cov: 120 ft: 130 corp: 4/210b exec/s: 0 rss: 40Mb\n\
        #4096\tpulse  cov: 300 ft: 400 corp: 25/1200b lim: 40 exec/s: 2048 rss: 60Mb\n\
        #9000\tDONE   cov: 321 ft: 456 corp: 30/1500b lim: 40 exec/s: 3000 rss: 61Mb\n\
        Done 9000 runs in 3 second(s)\n\
        stat::number_of_executed_units: 9000\n\
        stat::average_exec_per_sec:     3000\n\
        stat::new_units_added:          26\n\
        stat::slowest_unit_time_sec:    0\n\
        stat::peak_rss_mb:              61\n";

    #[test]
    fn reads_libfuzzer_final_stats() {
        assert_eq!(stat(LOG, "number_of_executed_units"), Some(9000));
        assert_eq!(stat(LOG, "peak_rss_mb"), Some(61));
        assert_eq!(stat(LOG, "missing"), None);
        assert_eq!(last_status(LOG), (321, 30));
    }

    #[test]
    fn names_a_panic_and_its_reproducer() {
        let log = "thread '<unnamed>' panicked at fuzz_targets/aip.rs:22:10:\n\
            the converted policy does not validate\n\
            ==1234== ERROR: libFuzzer: deadly signal\n\
            artifact_prefix='fuzz/artifacts/aip/'; Test unit written to fuzz/artifacts/aip/crash-abc\n";
        let (what, artifact) = failure(log);
        assert!(what.starts_with("panic: "), "{what}");
        assert!(what.contains("aip.rs:22:10"), "{what}");
        assert_eq!(artifact.as_deref(), Some("fuzz/artifacts/aip/crash-abc"));
        let (what, artifact) = failure("==9== ERROR: libFuzzer: timeout after 10 seconds\n");
        assert!(what.starts_with("timeout"), "{what}");
        assert_eq!(artifact, None);
    }
}
