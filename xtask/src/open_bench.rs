//! `cargo xtask bench-open`: what the BPF LSM file hooks cost an `open()` of
//! an unprotected file (issue 4). Floor: A/B >= 0.95x.
//!
//! BPF LSM programs are global, and this host's kernel refuses them. The
//! measurement itself (`bench-open --inner`) runs where BPF LSM is active:
//! `cargo xtask bench-open` builds `enforcer` and `xtask` (release), then runs
//! `<xtask> bench-open --inner --enforcer-bin <enforcer> ...` inside the VM
//! runner (`vm-test`: Debian 6.1 with `lsm=...,bpf` under QEMU/TCG), or
//! right here when this kernel lists `bpf` in /sys/kernel/security/lsm.
//!
//! The load: `xtask bench-open-worker` opens (`O_RDONLY`) and closes the 4
//! files of `<tmpfs>/home/project/src/module/` round-robin for `--secs` (the
//! clock is read every 64 opens) and prints `{"opens_per_sec": ...}`. None of
//! them is protected. They live on a tmpfs mounted for the bench: the
//! cheapest open there is, so the hooks' share of it is the largest. The
//! policy has a realistic rule table: egress 127.0.0.1/32, `deny` on
//! `<tmpfs>/home/.ssh` (a directory of `--protected-files` files, which turns
//! the parent walk on) and `taint` on `<tmpfs>/home/.config/token`.
//!
//! Sides, a fresh worker process each round:
//!
//! | side | what runs                                                      |
//! |------|----------------------------------------------------------------|
//! | A    | `enforcer run --policy P -- <worker>`: the worker is the agent; every open looks up the file's inode and walks its 5 parents up to the tmpfs root |
//! | B    | the worker alone: no enforcer running, no LSM program attached |
//! | C    | the worker outside the agent while `enforcer run --policy P -- sleep` runs: hooks attached; the cost for every other process on the node (a cgroup -> identity lookup) |
//!
//! B and C workers (and this process) sit in a cgroup 4 levels deep
//! (`enforcer-bench-open/kubepods/burstable/pod/container`), like a
//! Kubernetes container: C's identity lookup walks the cgroup's ancestors.
//!
//! Comparisons: A/B (the floor), C/B (reported against the same floor; it
//! does not decide the exit status), and B/B (control, A/A: the harness's
//! own noise). Each: a warm-up of ¼ round per side (not recorded), then
//! `--rounds` rounds alternating the order (A B, B A, ...); reported: the
//! median of the per-round ratios and their spread (min..max). Every A round
//! checks that the agent is enforced (opening a protected file fails with
//! EPERM/EACCES); every B round that no `enforcer run` has LSM links pinned;
//! every C round that its links are pinned; B and C workers that the
//! protected file opens for them.
//!
//! Prints a table and a one-line JSON summary, writes
//! `target/bench/open.json`; exits 0 when A/B >= 0.95, 1 when not, 2 when
//! the bench could not run.
use std::{
    ffi::CString,
    io::{BufRead, BufReader},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    bench::{cpu_model, kernel_release, median},
    util, vm, BinArgs,
};

const FLOOR: f64 = 0.95;
/// Unprotected files the worker opens.
const FILES: usize = 4;
/// Opens between two reads of the clock.
const BATCH: usize = 64;
/// Where `enforcer run` pins its links (its `--pin-dir` default).
const PIN_ROOT: &str = "/sys/fs/bpf/enforcer";
/// The cgroup of the B and C workers, under the cgroup2 mount.
const NODE_CGROUP: &str = "enforcer-bench-open/kubepods/burstable/pod/container";

#[derive(clap::Args)]
pub struct OpenArgs {
    #[command(flatten)]
    pub bin: BinArgs,
    /// Interleaved rounds per comparison.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Seconds per round per side.
    #[arg(long, default_value_t = 1.0)]
    pub secs: f64,
    /// Files in the protected (`deny`) directory of the policy.
    #[arg(long, default_value_t = 100)]
    pub protected_files: usize,
    /// Measure here, now (needs BPF LSM in this kernel; builds nothing: give
    /// --enforcer-bin). `cargo xtask bench-open` runs this inside the VM.
    #[arg(long)]
    pub inner: bool,
    /// Give up on the VM after this many seconds, boot included (default:
    /// from --rounds and --secs).
    #[arg(long)]
    pub vm_timeout: Option<u64>,
    /// Guest kernel, as `vm-test --kernel-version`.
    #[arg(long)]
    pub kernel_version: Option<String>,
}

// ---------------------------------------------------------------------------
// worker

#[derive(clap::Args)]
pub struct OpenWorkerArgs {
    /// Seconds of the timed loop.
    #[arg(long)]
    secs: f64,
    /// Directory whose regular files are opened and closed, round-robin.
    #[arg(long)]
    dir: PathBuf,
    /// Open this file once before the loop and report how it went
    /// (`"probe": "ok"` or the errno's name).
    #[arg(long)]
    probe: Option<PathBuf>,
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("{}: NUL", p.display()))
}

fn open_close(p: &CString) -> Result<(), i32> {
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    unsafe { libc::close(fd) };
    Ok(())
}

fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ENOENT => "ENOENT".into(),
        e => format!("errno {e}"),
    }
}

pub fn worker(args: &OpenWorkerArgs) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.dir)
        .with_context(|| format!("reading {}", args.dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no regular files to open", args.dir.display());
    }
    let paths = files.iter().map(|p| cpath(p)).collect::<Result<Vec<_>>>()?;
    let probe = match &args.probe {
        Some(p) => Some(match open_close(&cpath(p)?) {
            Ok(()) => "ok".to_string(),
            Err(e) => errno_name(e),
        }),
        None => None,
    };
    let dur = Duration::from_secs_f64(args.secs);
    let (mut opens, mut errors, mut first_errno) = (0u64, 0u64, 0i32);
    let mut i = 0;
    let start = Instant::now();
    let elapsed = loop {
        for _ in 0..BATCH {
            match open_close(&paths[i]) {
                Ok(()) => opens += 1,
                Err(e) => {
                    if errors == 0 {
                        first_errno = e;
                    }
                    errors += 1;
                }
            }
            i += 1;
            if i == paths.len() {
                i = 0;
            }
        }
        let el = start.elapsed();
        // Do not spin on an error storm.
        if el >= dur || (errors > 1000 && opens == 0) {
            break el;
        }
    };
    println!(
        "{}",
        json!({
            "opens_per_sec": opens as f64 / elapsed.as_secs_f64(),
            "opens": opens,
            "secs": elapsed.as_secs_f64(),
            "files": paths.len(),
            "errors": errors,
            "first_errno": first_errno,
            "probe": probe,
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// host side

fn active_lsms() -> String {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("(/sys/kernel/security/lsm: {e})"))
}

fn has_bpf_lsm(lsms: &str) -> bool {
    lsms.split(',').any(|m| m.trim() == "bpf")
}

pub fn run(args: &OpenArgs) -> Result<u8> {
    if args.inner {
        return inner(args);
    }
    let root = util::repo_root();
    util::require_root("bench-open")?;
    let t = Instant::now();
    let enforcer = util::enforcer_bin(&root, &args.bin)?;
    // The worker loop runs in this binary: release, whatever --debug says.
    let xtask = util::cargo_build_bin(&root, "xtask", true)?;
    let cmd: Vec<String> = vec![
        xtask.display().to_string(),
        "bench-open".into(),
        "--inner".into(),
        "--enforcer-bin".into(),
        enforcer.display().to_string(),
        "--rounds".into(),
        args.rounds.to_string(),
        "--secs".into(),
        args.secs.to_string(),
        "--protected-files".into(),
        args.protected_files.to_string(),
    ];
    let lsms = active_lsms();
    let code = if has_bpf_lsm(&lsms) {
        eprintln!("bench-open: this kernel has BPF LSM ({lsms}): measuring here");
        let st = Command::new(&cmd[0])
            .args(&cmd[1..])
            .status()
            .with_context(|| format!("running {}", cmd[0]))?;
        st.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(2)
    } else {
        // Per round and comparison: two sides, each a process start (A: an
        // `enforcer run` start, seconds under TCG) plus `secs`; generous.
        let timeout = args
            .vm_timeout
            .unwrap_or(600 + u64::from(args.rounds + 1) * 3 * (2 * args.secs.ceil() as u64 + 60));
        eprintln!(
            "bench-open: this kernel has no BPF LSM ({lsms}): measuring inside the VM runner \
             (vm-test: QEMU/TCG, an emulated CPU; only the ratios mean something)"
        );
        vm::run(
            &root,
            &vm::VmArgs {
                kernel_version: args.kernel_version.clone(),
                timeout,
                memory: "2G".into(),
                cpus: 2,
                rwdir: Vec::new(),
                envs: Vec::new(),
                verbose: false,
                cmd,
            },
        )?
    };
    eprintln!(
        "bench-open: done in {:.0} s (builds included), exit status {code}",
        t.elapsed().as_secs_f64()
    );
    Ok(code)
}

// ---------------------------------------------------------------------------
// inner: the measurement, where BPF LSM is active

/// The files of the bench on a tmpfs of their own; unmounted on drop.
struct Tree {
    root: PathBuf,
    /// The worker's directory: the unprotected files.
    work: PathBuf,
    /// A file in the protected directory (the probe).
    probe: PathBuf,
    policy: PathBuf,
    logs: PathBuf,
}

impl Tree {
    fn create(protected_files: usize) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("enforcer-bench-open-{}", std::process::id()));
        std::fs::create_dir_all(&root)?;
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=64m,mode=0755",
                "enforcer-bench-open",
            ])
            .arg(&root)
            .status()
            .context("mount -t tmpfs")?;
        if !st.success() {
            let _ = std::fs::remove_dir(&root);
            bail!("could not mount a tmpfs at {}", root.display());
        }
        let tree = Tree {
            work: root.join("home/project/src/module"),
            probe: root.join("home/.ssh/key-000"),
            policy: root.join("policy.yaml"),
            logs: root.join("logs"),
            root,
        };
        std::fs::create_dir_all(&tree.work)?;
        std::fs::create_dir_all(&tree.logs)?;
        let body = "fn main() {}\n".repeat(64);
        for n in 0..FILES {
            std::fs::write(tree.work.join(format!("file-{n}.rs")), &body)?;
        }
        let ssh = tree.root.join("home/.ssh");
        std::fs::create_dir_all(&ssh)?;
        for n in 0..protected_files.max(1) {
            std::fs::write(ssh.join(format!("key-{n:03}")), "not for the agent\n")?;
        }
        let config = tree.root.join("home/.config");
        std::fs::create_dir_all(&config)?;
        std::fs::write(config.join("token"), "TOKEN\n")?;
        std::fs::write(
            &tree.policy,
            format!(
                "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: bench-open\n\
                 spec:\n  egress:\n    - {{cidr: 127.0.0.1/32}}\n  files:\n    \
                 - {{path: {}, access: deny}}\n    - {{path: {}, access: taint}}\n",
                ssh.display(),
                config.join("token").display()
            ),
        )?;
        Ok(tree)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Ok(p) = cpath(&self.root) {
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// This process (and so every worker of sides B and C) in a cgroup 4 levels
/// deep; back to where it was on drop.
struct NodeCgroup {
    base: PathBuf,
    leaf: PathBuf,
    orig: PathBuf,
}

impl NodeCgroup {
    fn enter(mount: &Path) -> Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let orig = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let top = NODE_CGROUP.split('/').next().expect("non-empty");
        let me = NodeCgroup {
            base: mount.join(top),
            leaf: mount.join(NODE_CGROUP),
            orig: mount.join(orig.trim_start_matches('/')),
        };
        me.remove_dirs();
        std::fs::create_dir_all(&me.leaf)
            .with_context(|| format!("creating cgroup {}", me.leaf.display()))?;
        std::fs::write(me.leaf.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving into {}", me.leaf.display()))?;
        Ok(me)
    }
    fn remove_dirs(&self) {
        let mut d = self.leaf.clone();
        while d.starts_with(&self.base) {
            let _ = std::fs::remove_dir(&d);
            if !d.pop() {
                break;
            }
        }
    }
}

impl Drop for NodeCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.orig.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        self.remove_dirs();
    }
}

/// The LSM links `enforcer run` processes have pinned right now.
fn pinned_lsm_links() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for run in std::fs::read_dir(PIN_ROOT).into_iter().flatten().flatten() {
        for l in std::fs::read_dir(run.path().join("lsm"))
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push(l.path());
        }
    }
    out
}

/// An `enforcer run` in the background, stopped (SIGTERM, then SIGKILL) on drop.
struct Background {
    child: Child,
    log: PathBuf,
}

impl Background {
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Ok(None) = self.child.try_wait() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// A: the worker is the agent of `enforcer run`.
    Agent,
    /// B: the worker alone, no enforcer.
    Detached,
    /// C: the worker outside the agent of a running `enforcer run`.
    Outside,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Agent => "A (agent, hooks attached)",
            Side::Detached => "B (detached)",
            Side::Outside => "C (non-agent, hooks attached)",
        }
    }
}

struct Ctx {
    enforcer: PathBuf,
    xtask: PathBuf,
    tree: Tree,
    /// Wall time of each A run minus its timed loop: `enforcer run` start + stop.
    agent_overhead: Vec<f64>,
}

impl Ctx {
    fn worker_cmd(&self, secs: f64) -> Vec<String> {
        vec![
            self.xtask.display().to_string(),
            "bench-open-worker".into(),
            "--secs".into(),
            secs.to_string(),
            "--dir".into(),
            self.tree.work.display().to_string(),
            "--probe".into(),
            self.tree.probe.display().to_string(),
        ]
    }

    /// The worker as the agent of `enforcer run --policy P` (side A).
    fn agent_cmd(&self, secs: f64) -> Command {
        let mut c = Command::new(&self.enforcer);
        c.args(["run", "--quiet", "--user", "root", "--policy"])
            .arg(&self.tree.policy)
            .current_dir(&self.tree.root)
            .arg("--")
            .args(self.worker_cmd(secs))
            .stdin(Stdio::null());
        c
    }

    /// ns per run of each enforcer program (kernel statistics, on only
    /// for this) while an agent opens files for `secs`: the programs of an
    /// `enforcer run` exist only while it runs, so they are read every
    /// 200 ms and the last reading before it exits is kept.
    fn program_costs(&mut self, secs: f64) -> Result<Vec<(String, u64, f64)>> {
        let _stats = crate::empty_progs::StatsOn::enable()?;
        let mut child = self
            .agent_cmd(secs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting enforcer run")?;
        let mut last = Vec::new();
        while child.try_wait()?.is_none() {
            let now = crate::empty_progs::named_runs("enforcer")?;
            if now.iter().any(|(_, r)| r.cnt > 0) {
                last = now;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(last
            .into_iter()
            .filter_map(|(name, r)| {
                r.ns_per_run_since(&crate::empty_progs::Runs::default())
                    .map(|ns| (name, r.cnt, ns))
            })
            .collect())
    }

    /// One timed loop on `side`; opens per second.
    fn rate(&mut self, side: Side, secs: f64) -> Result<f64> {
        match side {
            Side::Agent => {
                let t = Instant::now();
                let out = self
                    .agent_cmd(secs)
                    .output()
                    .context("starting enforcer run")?;
                if !out.status.success() {
                    bail!(
                        "side A: `enforcer run --policy {} -- <worker>` failed ({}); its stderr:\n{}",
                        self.tree.policy.display(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim_end()
                    );
                }
                let w = WorkerOut::parse(side, &out.stdout, &out.stderr)?;
                if w.probe != "EPERM" && w.probe != "EACCES" {
                    bail!(
                        "side A: the agent's open of the protected {} gave {:?}, not EPERM: the \
                         file hooks are not enforcing",
                        self.tree.probe.display(),
                        w.probe
                    );
                }
                self.agent_overhead.push(t.elapsed().as_secs_f64() - w.secs);
                Ok(w.opens_per_sec)
            }
            Side::Detached => {
                let pins = pinned_lsm_links();
                if !pins.is_empty() {
                    bail!(
                        "side B must run with no file hooks attached, but LSM links are pinned: {}",
                        pins.iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                self.direct(side, secs)
            }
            Side::Outside => {
                let log = self.tree.logs.join("enforcer-c.log");
                let child = Command::new(&self.enforcer)
                    .args(["run", "--quiet", "--user", "root", "--policy"])
                    .arg(&self.tree.policy)
                    .current_dir(&self.tree.root)
                    .args(["--", "sh", "-c", "echo ready; exec sleep 1000"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("starting enforcer run")?;
                let mut bg = Background { child, log };
                let mut line = String::new();
                BufReader::new(bg.child.stdout.take().expect("piped")).read_line(&mut line)?;
                if line.trim() != "ready" {
                    bg.stop();
                    bail!(
                        "side C: `enforcer run --policy {} -- sh -c 'echo ready; exec sleep 1000'` \
                         did not start its agent ({:?}); its stderr:\n{}",
                        self.tree.policy.display(),
                        bg.child.try_wait().ok().flatten(),
                        std::fs::read_to_string(&bg.log)
                            .unwrap_or_default()
                            .trim_end()
                    );
                }
                let pins = Path::new(PIN_ROOT).join(format!("run-{}/lsm", bg.child.id()));
                let n = std::fs::read_dir(&pins).map(|d| d.count()).unwrap_or(0);
                if n == 0 {
                    bail!(
                        "side C: the agent runs but {} holds no LSM link: are the file hooks attached?",
                        pins.display()
                    );
                }
                let r = self.direct(side, secs);
                bg.stop();
                r
            }
        }
    }

    /// The worker as a child of this process (sides B and C).
    fn direct(&self, side: Side, secs: f64) -> Result<f64> {
        let cmd = self.worker_cmd(secs);
        let out = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .output()
            .context("starting the worker")?;
        if !out.status.success() {
            bail!(
                "side {}: the worker failed ({}): {}",
                side.label(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        let w = WorkerOut::parse(side, &out.stdout, &out.stderr)?;
        if w.probe != "ok" {
            bail!(
                "side {}: a process outside the agent could not open {} ({}): the hooks must \
                 let it through",
                side.label(),
                self.tree.probe.display(),
                w.probe
            );
        }
        Ok(w.opens_per_sec)
    }
}

struct WorkerOut {
    opens_per_sec: f64,
    secs: f64,
    probe: String,
}

impl WorkerOut {
    fn parse(side: Side, stdout: &[u8], stderr: &[u8]) -> Result<Self> {
        let text = String::from_utf8_lossy(stdout);
        let Some(v) = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
            .find(|v| v.get("opens_per_sec").is_some())
        else {
            bail!(
                "side {}: no result line from the worker; stdout:\n{text}\nstderr:\n{}",
                side.label(),
                String::from_utf8_lossy(stderr).trim_end()
            );
        };
        let errors = v["errors"].as_u64().unwrap_or(0);
        if errors > 0 {
            bail!(
                "side {}: {errors} of the worker's opens failed (first errno {}): the files are \
                 not protected, every open must succeed",
                side.label(),
                v["first_errno"]
            );
        }
        Ok(WorkerOut {
            opens_per_sec: v["opens_per_sec"].as_f64().unwrap_or(f64::NAN),
            secs: v["secs"].as_f64().unwrap_or(0.0),
            probe: v["probe"].as_str().unwrap_or("").to_string(),
        })
    }
}

struct Comparison {
    name: &'static str,
    subject: Side,
    reference: Side,
    floor: f64,
    /// Whether the floor decides the exit status.
    gating: bool,
    rounds: Vec<(f64, f64)>,
}

impl Comparison {
    fn ratios(&self) -> Vec<f64> {
        self.rounds.iter().map(|(a, b)| a / b).collect()
    }
    fn ratio(&self) -> f64 {
        median(self.ratios())
    }
    fn min(&self) -> f64 {
        self.ratios().into_iter().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.ratios().into_iter().fold(f64::NEG_INFINITY, f64::max)
    }
    fn pass(&self) -> bool {
        self.ratio() >= self.floor
    }
    fn result(&self) -> &'static str {
        match (self.floor == 0.0, self.pass(), self.gating) {
            (true, _, _) => "(control)",
            (false, true, true) => "PASS",
            (false, false, true) => "MISS",
            (false, true, false) => "pass (informational)",
            (false, false, false) => "miss (informational)",
        }
    }
    fn json(&self, detail: bool) -> serde_json::Value {
        let mut v = json!({
            "name": self.name,
            "subject": self.subject.label(),
            "reference": self.reference.label(),
            "median_ratio": self.ratio(),
            "min_ratio": self.min(),
            "max_ratio": self.max(),
            "subject_median_opens_per_sec": median(self.rounds.iter().map(|x| x.0).collect()),
            "reference_median_opens_per_sec": median(self.rounds.iter().map(|x| x.1).collect()),
            "floor": if self.floor == 0.0 { serde_json::Value::Null } else { json!(self.floor) },
            "gating": self.gating,
            "pass": if self.floor == 0.0 { serde_json::Value::Null } else { json!(self.pass()) },
        });
        if detail {
            v["rounds"] = self
                .rounds
                .iter()
                .map(|(a, b)| json!({"subject": a, "reference": b, "ratio": a / b}))
                .collect();
        }
        v
    }
}

/// Warm-up, then `rounds` rounds alternating A B, B A, ...
fn compare(
    ctx: &mut Ctx,
    name: &'static str,
    (a, b): (Side, Side),
    (floor, gating): (f64, bool),
    rounds: u32,
    secs: f64,
) -> Result<Comparison> {
    eprint!("bench-open: {name:<48}");
    ctx.rate(a, secs / 4.0)?;
    ctx.rate(b, secs / 4.0)?;
    let mut out = Vec::new();
    for i in 0..rounds {
        let (ra, rb) = if i % 2 == 0 {
            let ra = ctx.rate(a, secs)?;
            (ra, ctx.rate(b, secs)?)
        } else {
            let rb = ctx.rate(b, secs)?;
            (ctx.rate(a, secs)?, rb)
        };
        out.push((ra, rb));
        eprint!(".");
    }
    let c = Comparison {
        name,
        subject: a,
        reference: b,
        floor,
        gating,
        rounds: out,
    };
    eprintln!(" {:.3}x", c.ratio());
    Ok(c)
}

fn inner(args: &OpenArgs) -> Result<u8> {
    util::require_root("bench-open --inner")?;
    let lsms = active_lsms();
    if !has_bpf_lsm(&lsms) {
        bail!(
            "`bench-open --inner` measures the BPF LSM file hooks, but this kernel has no BPF LSM \
             (active LSMs: {lsms}). Run `cargo xtask bench-open`: it runs the bench inside a VM \
             whose kernel has it."
        );
    }
    if args.bin.enforcer_bin.is_none() {
        bail!("`bench-open --inner` builds nothing: pass --enforcer-bin PATH (or ENFORCER_BIN)");
    }
    if args.rounds == 0 || args.secs.is_nan() || args.secs <= 0.0 {
        bail!("--rounds and --secs must be positive");
    }
    let root = util::repo_root();
    let enforcer = util::enforcer_bin(&root, &args.bin)?;
    let xtask = std::env::current_exe().context("this executable")?;
    util::ensure_bpffs()?;
    let mount = util::cgroup2_mount()?;
    let t0 = Instant::now();
    let tree = Tree::create(args.protected_files)?;
    let node = NodeCgroup::enter(&mount)?;
    eprintln!(
        "bench-open: kernel {}, LSMs {lsms}; enforcer {}; files on tmpfs at {}; workers B, C in \
         {}",
        kernel_release(),
        enforcer.display(),
        tree.root.display(),
        node.leaf.display()
    );
    let mut ctx = Ctx {
        enforcer,
        xtask,
        tree,
        agent_overhead: Vec::new(),
    };
    let (rounds, secs) = (args.rounds, args.secs);
    let comps = vec![
        compare(
            &mut ctx,
            "open: agent, hooks attached vs detached (A/B)",
            (Side::Agent, Side::Detached),
            (FLOOR, true),
            rounds,
            secs,
        )?,
        compare(
            &mut ctx,
            "open: non-agent, hooks attached vs detached (C/B)",
            (Side::Outside, Side::Detached),
            (FLOOR, false),
            rounds,
            secs,
        )?,
        compare(
            &mut ctx,
            "control: detached vs detached (B/B)",
            (Side::Detached, Side::Detached),
            (0.0, false),
            rounds,
            secs,
        )?,
    ];
    // Per program, the kernel's own statistics (after the rates: they slow
    // every program down).
    let costs = ctx.program_costs(secs.max(1.0))?;
    let elapsed = t0.elapsed().as_secs_f64();
    let overhead = median(ctx.agent_overhead.clone());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);

    println!();
    println!(
        "enforcer bench-open: {rounds} interleaved rounds x {secs}s per side; kernel {}; {cpus} \
         CPUs ({}); {FILES} unprotected files, 5 directories below a tmpfs root; policy: deny \
         on a directory of {} files + 1 taint file",
        kernel_release(),
        cpu_model(),
        args.protected_files.max(1)
    );
    println!();
    println!(
        "{:<50} {:>11} {:>11} {:>8} {:>15} {:>7}  result",
        "comparison", "subject/s", "reference/s", "ratio", "spread", "floor"
    );
    for c in &comps {
        println!(
            "{:<50} {:>11.0} {:>11.0} {:>7.3}x {:>6.3}..{:<6.3}x {:>7}  {}",
            c.name,
            median(c.rounds.iter().map(|x| x.0).collect()),
            median(c.rounds.iter().map(|x| x.1).collect()),
            c.ratio(),
            c.min(),
            c.max(),
            if c.floor == 0.0 {
                "-".to_string()
            } else {
                format!("{:.2}x", c.floor)
            },
            c.result()
        );
    }
    println!(
        "\n`enforcer run` start + stop per A round: {overhead:.2} s (median, not timed); bench: \
         {elapsed:.0} s"
    );
    println!("\nper program, the agent's opens (kernel statistics; under QEMU/TCG in the VM):");
    for (name, cnt, ns) in &costs {
        println!("  {name:<22} {ns:>10.0} ns/run over {cnt} runs");
    }
    let summary = |detail: bool| {
        json!({
            "bench": "open",
            "kernel": kernel_release(),
            "lsms": lsms,
            "cpus": cpus,
            "cpu_model": cpu_model(),
            "rounds": rounds,
            "secs_per_round": secs,
            "files": FILES,
            "file_depth_below_fs_root": 5,
            "filesystem": "tmpfs",
            "protected_files": args.protected_files.max(1),
            "node_cgroup": NODE_CGROUP,
            "comparisons": comps.iter().map(|c| c.json(detail)).collect::<Vec<_>>(),
            "enforcer_run_start_stop_secs_median": overhead,
            "bench_secs": elapsed,
            "program_ns_per_run": costs
                .iter()
                .map(|(n, cnt, ns)| (n.clone(), json!({"ns_per_run": ns, "runs": cnt})))
                .collect::<serde_json::Map<_, _>>(),
            "pass": comps[0].pass(),
        })
    };
    println!("{}", summary(false));
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("open.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary(true))?)?;
    println!("results: {}", path.display());
    drop(ctx);
    drop(node);
    Ok(if comps[0].pass() { 0 } else { 1 })
}
