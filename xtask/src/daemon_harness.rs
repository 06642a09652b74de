//! What `bench` and `soak` share to drive a real `enforcer daemon`: its
//! configuration and start/stop (with the readiness check through `enforcer
//! status`), a guard for the cgroups it binds, and worker processes driven
//! one line at a time over stdin/stdout, moved into a cgroup before they
//! make any socket.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

// ---------------------------------------------------------------------------
// cgroups

/// Cgroups `<mount>/<dir>/<name>`, removed (and any left over from an earlier
/// run removed first) when dropped. The processes in them must be gone by
/// then (a cgroup with processes cannot be removed).
pub struct Cgroups {
    pub root: PathBuf,
}

impl Cgroups {
    pub fn create(mount: &Path, dir: &str, names: &[&str]) -> Result<Self> {
        let me = Self {
            root: mount.join(dir),
        };
        me.cleanup();
        std::fs::create_dir_all(&me.root)
            .with_context(|| format!("creating {}", me.root.display()))?;
        for n in names {
            std::fs::create_dir(me.path(n)).with_context(|| format!("creating cgroup {n}"))?;
        }
        Ok(me)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn cleanup(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.cleanup();
    }
}

// ---------------------------------------------------------------------------
// the daemon

/// Paths of one daemon configuration, all under `dir` but the pins.
pub struct DaemonFiles {
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    pub policies: PathBuf,
    pub socket: PathBuf,
    pub audit: PathBuf,
}

impl DaemonFiles {
    pub fn new(dir: &Path, pin_dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
            config: dir.join("daemon.yaml"),
            policies: dir.join("policies"),
            socket: dir.join("control.sock"),
            audit: dir.join("audit.jsonl"),
        }
    }

    /// Wipe `dir` and the pins, write `policies` (name, YAML: `name.yaml`)
    /// and the daemon's configuration: the default one but for the paths
    /// (its identity slots in `dir/state`, not the node's /run/enforcer),
    /// `extra` (more top-level lines, e.g. `allowEvents: 0\n`) and
    /// `bindings` (cgroup, policy name).
    pub fn write(
        &self,
        policies: &[(&str, &str)],
        bindings: &[(PathBuf, &str)],
        extra: &str,
    ) -> Result<()> {
        remove_pins(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.policies)?;
        for (name, yaml) in policies {
            std::fs::write(self.policies.join(format!("{name}.yaml")), yaml)?;
        }
        let mut cfg = format!(
            "policiesDir: {}\npinDir: {}\ncontrolSocket: {}\nauditLog: {}\nstateDir: {}\n{extra}bindings:\n",
            self.policies.display(),
            self.pin_dir.display(),
            self.socket.display(),
            self.audit.display(),
            self.dir.join("state").display(),
        );
        for (cg, pol) in bindings {
            let _ = writeln!(cfg, "  - {{cgroup: {}, policy: {pol}}}", cg.display());
        }
        std::fs::write(&self.config, cfg)?;
        Ok(())
    }
}

pub fn remove_pins(pin_dir: &Path) {
    let _ = std::fs::remove_dir_all(pin_dir);
}

pub struct Daemon {
    child: Child,
    log: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    /// `files.write(...)`, then start the daemon and wait until every
    /// binding is attached with its policy installed.
    pub fn start(
        enforcer: &Path,
        files: &DaemonFiles,
        policies: &[(&str, &str)],
        bindings: &[(PathBuf, &str)],
        extra: &str,
        timeout: Duration,
    ) -> Result<(Self, Duration)> {
        files.write(policies, bindings, extra)?;
        let started = Instant::now();
        let mut d = Self::spawn(enforcer, files, &files.dir.join("daemon.log"))?;
        d.wait_ready(enforcer, bindings, started + timeout)?;
        Ok((d, started.elapsed()))
    }

    /// Start `enforcer daemon` on the configuration in `files` (written
    /// before), its output appended to `log`. Returns at once.
    pub fn spawn(enforcer: &Path, files: &DaemonFiles, log: &Path) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(enforcer)
            .args(["--log", "info", "daemon", "--config"])
            .arg(&files.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting enforcer daemon")?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
            pin_dir: files.pin_dir.clone(),
            socket: files.socket.clone(),
        })
    }

    /// Ready = control socket up and `enforcer status` lists every binding
    /// attached with its policy. A rejected policy file is an error.
    /// Returns the last status.
    pub fn wait_ready(
        &mut self,
        enforcer: &Path,
        bindings: &[(PathBuf, &str)],
        deadline: Instant,
    ) -> Result<serde_json::Value> {
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "enforcer daemon exited ({st}) during startup:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("enforcer daemon not ready in time:\n{}", self.log_tail());
            }
            if self.socket.exists() {
                if let Ok(status) = status_json(enforcer, &self.socket) {
                    if let Some(r) = status["rejected"].as_array().filter(|r| !r.is_empty()) {
                        let errors: Vec<&str> = r
                            .iter()
                            .flat_map(|x| x["errors"].as_array().into_iter().flatten())
                            .filter_map(|e| e.as_str())
                            .collect();
                        bail!("enforcer daemon rejected a policy: {}", errors.join("; "));
                    }
                    if bindings.iter().all(|(cg, pol)| attached(&status, cg, pol)) {
                        return Ok(status);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("enforcer daemon exited ({st}):\n{}", self.log_tail());
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM (a clean stop), then remove the pins: enforcement ends.
    pub fn stop(mut self) -> Result<()> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        remove_pins(&self.pin_dir);
        Ok(())
    }

    /// `kill -9`, as a crash: the pins stay and keep enforcing.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill().context("kill -9 of the daemon")?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            remove_pins(&self.pin_dir);
        }
    }
}

pub fn status_json(enforcer: &Path, sock: &Path) -> Result<serde_json::Value> {
    let out = Command::new(enforcer)
        .args(["status", "--json", "--socket"])
        .arg(sock)
        .stderr(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("enforcer status failed");
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `status` lists cgroup `cg` under identity `policy`.
pub fn attached(status: &serde_json::Value, cg: &Path, policy: &str) -> bool {
    let Some(ids) = status["identities"].as_array() else {
        return false;
    };
    ids.iter().any(|id| {
        id["name"] == policy
            && id["cgroups"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["path"].as_str().map(Path::new) == Some(cg))
            })
    })
}

// ---------------------------------------------------------------------------
// workers

/// A child process driven with one command line per answer line.
pub struct Worker {
    pub name: String,
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Spawn `cmd` with piped stdin/stdout; `cgroup`: move it there before
    /// it makes any socket (it must wait on stdin until asked).
    pub fn spawn(name: &str, mut cmd: Command, cgroup: Option<&Path>) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting worker {name}"))?;
        if let Some(cg) = cgroup {
            std::fs::write(cg.join("cgroup.procs"), child.id().to_string())
                .with_context(|| format!("moving worker into {}", cg.display()))?;
        }
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        Ok(Worker {
            name: name.to_string(),
            child,
            stdin,
            stdout,
        })
    }

    /// Send one command line, read one answer line.
    pub fn ask(&mut self, cmd: &str) -> Result<String> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("worker {} died", self.name);
        }
        Ok(line.trim().to_string())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
