//! `enforcer run --policy FILE -- CMD ARGS...`: enforce one agent locally.
//!
//! Order matters: the policy is compiled and the programs are attached to a
//! fresh cgroup *before* the agent exists; the agent is then started in
//! that cgroup by `sandbox` (its own PID namespace under a small init, a
//! private mount view without bpffs, seccomp, no capabilities, no
//! inherited descriptors; see `sandbox/mod.rs`), which hands back the
//! seccomp listener whose refusals become decisions here.
//!
//! The links are pinned under bpffs while the agent runs, so that a crash of
//! this process does not lift enforcement (the agent's init is also sent
//! SIGKILL through PR_SET_PDEATHSIG, which ends its PID namespace). On exit
//! the cgroup is emptied and removed.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    audit::{AuditFormat, AuditLog, AuditOptions, LifecycleAction},
    dns_bridge::DnsService,
    events::{
        reader::{Attribution, SlotInfo},
        sink::{self, Readers, Sinks},
        Decision, IdentityRef, Verdict,
    },
    kernel::{cgroup, Kernel},
    metrics::{self, Metrics},
    policy,
};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Policy file (YAML, AgentPolicy).
    #[arg(long, short = 'p')]
    pub policy: PathBuf,
    /// Which policy of a multi-document file to enforce.
    #[arg(long)]
    pub policy_name: Option<String>,
    /// Append one JSON line per decision here (SHA-256 chained).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Format of the --audit-log records: json (DESIGN.md's records) or ocsf (OCSF 1.3.0
    /// events, same hash chain). A file already written in the other format is refused.
    #[arg(long, value_enum, default_value_t = AuditFormat::Json)]
    pub audit_format: AuditFormat,
    /// Serve Prometheus metrics (/metrics, /healthz) on this address.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Run CMD as this user (NAME, UID or UID:GID). Default: the user who ran sudo
    /// (SUDO_UID/SUDO_GID). uid 0 only with an explicit `--user root`, and then with a
    /// read-only file system except the working directory, a private /tmp and `spec.writable`.
    #[arg(long)]
    pub user: Option<String>,
    /// Keep this inherited descriptor open for CMD (repeatable); every other
    /// descriptor but 0-2 is closed before CMD starts.
    #[arg(long = "pass-fd", value_name = "FD")]
    pub pass_fds: Vec<i32>,
    /// Allowed decisions in the audit log: 1 = all, as flow records (one per flow per second,
    /// with a count; default), 0 = only counted, N = ~1 in N as records. Denials and audits
    /// are always one record each.
    #[arg(long, default_value_t = 1)]
    pub allow_events: u32,
    /// On a kernel without BPF LSM, run a policy that uses `files:`/`onTaint:`
    /// with its network part only (said in the log, audit log and summary)
    /// instead of refusing it.
    #[arg(long)]
    pub allow_degraded: bool,
    /// A resolver IPC socket the agent may never reach (repeatable; replaces
    /// the default list: systemd-resolved's varlink sockets and nscd's,
    /// under /run and /var/run). Resolving through one would bypass the DNS
    /// proxy; `spec.local` cannot list one. Needs Linux >= 6.7.
    #[arg(long = "resolver-socket", value_name = "PATH")]
    pub resolver_sockets: Vec<PathBuf>,
    /// bpffs directory where links are pinned while the agent runs.
    #[arg(long, default_value = "/sys/fs/bpf/enforcer")]
    pub pin_dir: PathBuf,
    /// Do not print the summary.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// The agent command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

const SLOT: u32 = 1;

pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`enforcer {what}` needs root (it loads eBPF programs and creates cgroups); \
             run it with sudo"
        );
    }
    Ok(())
}

/// Pick the one policy to enforce from a file.
pub fn select_policy(path: &Path, name: Option<&str>) -> Result<policy::LoadedPolicy> {
    let mut all = policy::load_files(&[path.to_path_buf()]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let chosen = match name {
        Some(n) => {
            let idx = all
                .iter()
                .position(|p| p.policy.metadata.name == n)
                .with_context(|| format!("{}: no policy named {n:?}", path.display()))?;
            all.swap_remove(idx)
        }
        None if all.len() == 1 => all.remove(0),
        None if all.is_empty() => bail!("{}: no AgentPolicy document", path.display()),
        None => bail!(
            "{}: {} policies in this file; choose one with --policy-name ({})",
            path.display(),
            all.len(),
            all.iter()
                .map(|p| p.policy.metadata.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Ok(chosen)
}

/// File policy needs BPF LSM. On a kernel without it, a policy that uses
/// `files:`/`onTaint:` is refused with the kernel requirement, unless
/// `allow_degraded`: then those parts are dropped and the returned note says
/// so (log, audit, status). With BPF LSM present, `check_supported` decides.
pub fn gate_file_policy(
    p: &mut policy::LoadedPolicy,
    lsm: &crate::kernel::LsmSupport,
    allow_degraded: bool,
) -> Result<Option<String>> {
    let Some((line, col)) = p.file_policy_span().filter(|_| !lsm.available) else {
        return Ok(None);
    };
    let name = p.policy.metadata.name.clone();
    if !allow_degraded {
        bail!(
            "{}:{line}:{col}: policy {name:?} uses file policy, but this kernel has no BPF LSM: \
             {}. {}. Run with --allow-degraded (daemon: allowDegraded: true) to enforce the \
             network part only.",
            p.source.display(),
            lsm.detail,
            crate::kernel::LSM_REQUIREMENT
        );
    }
    let note = format!(
        "DEGRADED: policy {name:?}: files/onTaint NOT enforced (no BPF LSM on this kernel: {}); \
         network egress is enforced",
        lsm.detail
    );
    p.strip_file_policy();
    Ok(Some(note))
}

/// `spec.local` must not name a resolver socket of the configured list
/// (the validator checked the default list; an operator's list may differ).
pub fn check_local_resolvers(p: &policy::LoadedPolicy, resolvers: &[PathBuf]) -> Result<()> {
    for (i, r) in p.policy.spec.local.iter().enumerate() {
        let Some(path) = &r.path else { continue };
        if let Some(m) = policy::local::resolver_conflict(path, resolvers) {
            let e = p.error(&format!("spec.local[{i}].path"), m);
            bail!("{e}");
        }
    }
    Ok(())
}

#[derive(Default)]
struct Summary {
    /// (action, destination, rule, verdict) -> (count, first comm/pid)
    denials: BTreeMap<(String, String, String, String), (u64, String)>,
    dns_answered: u64,
    dns_refused: u64,
}

/// `enforcer run`: prepare the policy, enforce it on a fresh cgroup, build
/// the agent's contained view, start recording, start the DNS proxy, spawn
/// the agent and wait for it, then tear down and print the summary. Each
/// phase is a function below, in this order (the order matters: nothing of
/// the agent exists before its cgroup is enforced).
pub fn run(args: RunArgs) -> Result<i32> {
    require_root("run")?;
    if args.command.is_empty() {
        bail!("no command given: enforcer run --policy FILE -- CMD [ARGS...]");
    }
    let loaded = select_policy(&args.policy, args.policy_name.as_deref())?;
    let mount = cgroup::cgroup2_mount()?;
    collect_dead_runs(&mount.join("enforcer"), &args.pin_dir);
    let mut kernel = Kernel::load(None)?;
    let plan = prepare_policy(&args, &mut kernel, loaded)?;
    let enforced = enforce_in_cgroup(&args, &mut kernel, &plan, &mount)?;
    let agent = contain_agent(&args, &plan, &enforced)?;
    let (recording, rings) = start_recording(&args, &mut kernel, &plan, &enforced, &agent)?;
    let kernel = Arc::new(Mutex::new(kernel));
    publish_kernel_metrics(&kernel, &recording.metrics, &plan.compiled.name);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = rt.block_on(supervise(
        &args,
        &kernel,
        &plan,
        &enforced.cg,
        agent.prepared,
        &recording,
        rings,
    ))?;
    tear_down(
        &args,
        &kernel,
        plan,
        enforced,
        agent.containment,
        recording,
        code,
    )
}

/// The policy to enforce, checked against this kernel, and what the agent
/// will run as.
struct Plan {
    loaded: policy::LoadedPolicy,
    compiled: policy::CompiledPolicy,
    identity: IdentityRef,
    lsm: crate::kernel::LsmSupport,
    /// The note when file policy was dropped (`--allow-degraded`).
    degraded: Option<String>,
    resolvers: Vec<PathBuf>,
    user: crate::sandbox::AgentUser,
    filter: crate::sandbox::seccomp::Filter,
}

/// Gate (BPF LSM), check and compile the selected policy; resolve the
/// agent's user and build its seccomp filter.
fn prepare_policy(
    args: &RunArgs,
    kernel: &mut Kernel,
    mut loaded: policy::LoadedPolicy,
) -> Result<Plan> {
    let lsm = kernel.probe_lsm();
    if !lsm.available {
        tracing::warn!("BPF LSM unavailable: {}", lsm.detail);
    }
    let degraded = gate_file_policy(&mut loaded, &lsm, args.allow_degraded)?;
    if let Some(note) = &degraded {
        eprintln!("enforcer: {note}");
    }
    policy::check_supported(&loaded).map_err(|e| anyhow::anyhow!("{e}"))?;
    let compiled = policy::compile::compile(&loaded).map_err(|e| anyhow::anyhow!("{e}"))?;
    let resolvers = if args.resolver_sockets.is_empty() {
        policy::local::default_resolver_sockets()
    } else {
        args.resolver_sockets.clone()
    };
    check_local_resolvers(&loaded, &resolvers)?;

    let identity = IdentityRef {
        name: compiled.name.clone(),
        spiffe_id: compiled.spiffe_id.clone(),
    };
    let user = crate::sandbox::resolve_user(args.user.as_deref(), &|k| std::env::var(k).ok())?;
    let filter = crate::sandbox::seccomp::build().context("building the seccomp filter")?;
    kernel.set_allow_sample(args.allow_events)?;
    Ok(Plan {
        loaded,
        compiled,
        identity,
        lsm,
        degraded,
        resolvers,
        user,
        filter,
    })
}

/// What is attached for the run.
/// (Fields drop in this order on an error path: the links before the
/// cgroup, as they were made the other way round.)
struct Enforced {
    attachment: crate::kernel::Attachment,
    cg: cgroup::OwnedCgroup,
    unix: crate::kernel::UnixSupport,
    /// File rules resolved to inodes.
    file_entries: u64,
}

/// Attach the hooks (unix sockets, BPF LSM), install the policy's tables,
/// and bind a fresh cgroup to them: enforced before anything runs in it.
fn enforce_in_cgroup(
    args: &RunArgs,
    kernel: &mut Kernel,
    plan: &Plan,
    mount: &Path,
) -> Result<Enforced> {
    let (compiled, lsm, resolvers) = (&plan.compiled, &plan.lsm, &plan.resolvers);
    let pin_dir = if bpffs_mounted(&args.pin_dir) {
        crate::kernel::private_dir(&args.pin_dir)
            .with_context(|| format!("pin directory {}", args.pin_dir.display()))?;
        Some(args.pin_dir.join(format!("run-{}", std::process::id())))
    } else {
        tracing::warn!(
            "bpffs is not mounted at {}: enforcement is not pinned and ends if enforcer is killed \
             (the agent is killed with it: PR_SET_PDEATHSIG)",
            args.pin_dir.display()
        );
        None
    };
    if lsm.available {
        // The BPF LSM unix hooks see the peer socket: preferred over the
        // cgroup unix hooks (which are then not attached).
        if let Err(e) =
            kernel.attach_unix_lsm_hooks(pin_dir.as_ref().map(|d| d.join("unix-lsm")).as_deref())
        {
            tracing::warn!("BPF LSM unix hooks: {e:#}");
        }
    }
    let unix = kernel.unix_support();
    if !unix.available {
        tracing::warn!(
            "unix socket hooks unavailable: {}; {}",
            unix.detail,
            crate::kernel::UNIX_REQUIREMENT
        );
        eprintln!(
            "enforcer: WARNING: unix sockets are NOT enforced on this kernel ({}): the agent can \
             reach every unix socket, including resolver IPC",
            unix.detail
        );
    }
    kernel
        .set_resolver_sockets(resolvers)
        .context("installing the resolver socket list")?;
    if lsm.available {
        // Global hooks: file policy (attached before the paths are resolved:
        // the resolver needs them), and the socket hooks (families no cgroup
        // hook sees, inet sockets created outside the identity) for every
        // policy. Idle costs: see README "Files" and "foreign sockets".
        let attached = kernel
            .attach_lsm_hooks(pin_dir.as_ref().map(|d| d.join("lsm")).as_deref())
            .context("attaching the BPF LSM hooks");
        match attached {
            Err(e) if !compiled.files.is_empty() => return Err(e),
            Err(e) => tracing::warn!(
                "{e:#}: socket families and foreign sockets are judged by the cgroup hooks only"
            ),
            Ok(()) => {}
        }
    }
    // Every BPF LSM program enforcer run loads is loaded.
    kernel.release_btf();
    let files = kernel.resolve_files(&compiled.files);
    for (id, path, why) in &files.unresolved {
        eprintln!(
            "enforcer: warning: {} ({}) is not protected: {why}",
            compiled.rule_name(*id),
            path.display()
        );
    }
    for path in &files.truncated {
        eprintln!(
            "enforcer: warning: {} holds more than {} files: hard links made before this run to \
             files beyond those are not matched",
            path.display(),
            crate::kernel::files::MAX_TREE_ENTRIES
        );
    }
    kernel
        .install_policy(SLOT, compiled, &files)
        .context("installing the policy tables")?;
    let cg = cgroup::OwnedCgroup::create(
        &mount.join("enforcer"),
        &format!("run-{}", std::process::id()),
    )?;
    kernel.bind_cgroup(cg.id, SLOT)?;
    let attachment = kernel.attach(&cg.path, pin_dir.as_deref())?;
    Ok(Enforced {
        attachment,
        cg,
        unix,
        file_entries: files.entries.len() as u64,
    })
}

/// The agent, ready to start: its contained view and how it is described.
struct Agent {
    prepared: crate::sandbox::child::Prepared,
    containment: String,
}

/// The agent's view: its own PID namespace and mounts, the audit log and the
/// policy read-only, its user, seccomp (see `sandbox`).
fn contain_agent(args: &RunArgs, plan: &Plan, enforced: &Enforced) -> Result<Agent> {
    let (loaded, user, filter, unix, cg) = (
        &plan.loaded,
        &plan.user,
        &plan.filter,
        &enforced.unix,
        &enforced.cg,
    );
    // The audit log exists before the agent's view is built, so that it is
    // bound read-only there (AuditLog::open appends to it).
    if let Some(p) = &args.audit_log {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("creating audit log {}", p.display()))?;
    }
    let (prepared, view) = crate::sandbox::prepare(
        &crate::sandbox::Options {
            cgroup_dir: &cg.path,
            command: &args.command,
            user,
            writable: &loaded.policy.spec.writable,
            pass_fds: &args.pass_fds,
            protect: &[Some(args.policy.clone()), args.audit_log.clone()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>(),
            abstract_by_policy: unix.available
                && loaded
                    .policy
                    .spec
                    .local
                    .iter()
                    .any(|l| l.abstract_name.is_some()),
        },
        filter,
    )?;
    let containment = format!(
        "agent user: {}; {}; writable: {}; seccomp: bpf, perf_event_open, io_uring, mount, \
         namespaces, keyrings, modules, other processes' memory refused; sockets: AF_UNIX, \
         AF_INET, AF_INET6, AF_NETLINK only",
        view.user,
        view.view,
        if view.writable.is_empty() {
            "host permissions".to_string()
        } else {
            view.writable
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Ok(Agent {
        prepared,
        containment,
    })
}

/// The kernel's side of the records: the event rings and the flow tables.
struct Rings {
    events: (
        aya::maps::RingBuf<aya::maps::MapData>,
        aya::maps::RingBuf<aya::maps::MapData>,
    ),
    flows: crate::events::flows::FlowTables,
}

/// Where decisions go: metrics, the audit log (with its `start` record) and
/// the summary.
struct Recording {
    attribution: Attribution,
    /// The DNS proxy (it records its decisions here too).
    dns: Arc<DnsService>,
    metrics: Arc<Metrics>,
    sinks: Arc<Sinks>,
    summary: Arc<Mutex<Summary>>,
}

fn start_recording(
    args: &RunArgs,
    kernel: &mut Kernel,
    plan: &Plan,
    enforced: &Enforced,
    agent: &Agent,
) -> Result<(Recording, Rings)> {
    let (compiled, identity, lsm, unix, cg) = (
        &plan.compiled,
        &plan.identity,
        &plan.lsm,
        &enforced.unix,
        &enforced.cg,
    );
    let (resolvers, degraded, containment) = (&plan.resolvers, &plan.degraded, &agent.containment);
    let ring = kernel
        .take_events()
        .context("event ring buffers already taken")?;
    let flows = kernel.take_flows().context("flow tables already taken")?;

    let attribution = Attribution::default();
    attribution.set(SLOT, SlotInfo::new(identity.clone(), compiled));

    let metrics = Arc::new(Metrics::new());
    metrics.set_capability("bpf_lsm", lsm.available);
    metrics.set_capability("unix_sockets", unix.available);
    metrics.set_attached_cgroups(1);
    metrics.set_policy_info(
        &compiled.name,
        compiled.spiffe_id.as_deref(),
        if compiled.audit { "audit" } else { "enforce" },
        &compiled.hash,
    );
    metrics.set_policy_entries(&compiled.name, compiled.entry_count() as u64);
    metrics.set_file_rules(&compiled.name, enforced.file_entries);
    let audit = match &args.audit_log {
        Some(p) => {
            let options = AuditOptions {
                format: args.audit_format,
                ..Default::default()
            };
            Some(
                AuditLog::open_with(p, options)
                    .with_context(|| format!("opening audit log {}", p.display()))?,
            )
        }
        None => None,
    };
    let sinks = Arc::new(Sinks::new(metrics.clone(), audit));
    sinks.lifecycle(
        LifecycleAction::Start,
        Some(identity),
        &compiled.hash,
        &format!(
            "enforcer run {:?} in cgroup {}; {containment}; {}; bpf_lsm: {}; unix sockets: {} \
             ({}; resolver sockets refused: {}){}",
            args.command,
            cg.path.display(),
            compiled.inspection_note(),
            lsm.detail,
            if unix.available {
                "enforced by spec.local"
            } else {
                "NOT enforced"
            },
            unix.detail,
            resolvers
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            degraded
                .as_deref()
                .map(|n| format!("; {n}"))
                .unwrap_or_default()
        ),
    );

    let summary = Arc::new(Mutex::new(Summary::default()));
    {
        let summary = summary.clone();
        sinks.set_observer(Box::new(move |d| summarize(d, &summary)));
    }
    let dns = Arc::new(DnsService::new(
        kernel,
        sinks.clone(),
        metrics.clone(),
        attribution.clone(),
    )?);
    Ok((
        Recording {
            attribution,
            dns,
            metrics,
            sinks,
            summary,
        },
        Rings {
            events: ring,
            flows,
        },
    ))
}

/// Kernel counters (per identity) reach the metrics at each scrape.
fn publish_kernel_metrics(kernel: &Arc<Mutex<Kernel>>, metrics: &Arc<Metrics>, name: &str) {
    let weak_kernel = Arc::downgrade(kernel);
    let weak_metrics = Arc::downgrade(metrics);
    let slots = [(SLOT, name.to_string())];
    metrics.set_collector(Box::new(move || {
        if let (Some(k), Some(m)) = (weak_kernel.upgrade(), weak_metrics.upgrade()) {
            publish(&k, &m, &slots);
        }
    }));
}

/// Serve metrics and the DNS proxy, read the rings, spawn the agent, relay
/// signals and its refused system calls, wait for it; then kill what it
/// left and drain the last records. Returns its exit status.
async fn supervise(
    args: &RunArgs,
    kernel: &Arc<Mutex<Kernel>>,
    plan: &Plan,
    cg: &cgroup::OwnedCgroup,
    prepared: crate::sandbox::child::Prepared,
    recording: &Recording,
    rings: Rings,
) -> Result<i32> {
    let (compiled, identity) = (&plan.compiled, &plan.identity);
    let (metrics, sinks, attribution, dns) = (
        &recording.metrics,
        &recording.sinks,
        &recording.attribution,
        &recording.dns,
    );
    let dns_policy = Arc::new(crate::dns::compile_dns(&plan.loaded, compiled));
    let running = Arc::new(AtomicBool::new(true));
    let _server = match args.metrics_addr {
        Some(addr) => {
            let r = running.clone();
            let (bound, handle) = metrics::serve(
                metrics.clone(),
                addr,
                Arc::new(move || r.load(Ordering::Relaxed)),
            )
            .await?;
            if !args.quiet {
                eprintln!("enforcer: metrics on http://{bound}/metrics");
            }
            Some(handle)
        }
        None => None,
    };
    // The DNS proxy serves before the agent exists: its first query is
    // already steered and answered.
    let dns_port = dns.serve(kernel, SLOT, dns_policy.clone()).await?;
    tracing::info!(port = dns_port, "DNS proxy ready");
    let readers = Readers::spawn(
        rings.events,
        rings.flows,
        sinks.clone(),
        dns.attributor(attribution.clone()),
    );
    // The forked side makes only raw syscalls on memory prepared
    // before the clone, so cloning this multi-threaded process is safe.
    let spawned = crate::sandbox::spawn(&prepared)
        .with_context(|| format!("starting {:?}", args.command[0]))?;
    let child_pid = spawned.init_pid;
    tracing::info!(pid = child_pid, cgroup = %cg.path.display(), "agent started");
    crate::kernel::release_free_memory();
    let mut supervisor = {
        let sinks = sinks.clone();
        let identity = identity.clone();
        let hash = compiled.hash.clone();
        let cgroup_id = cg.id;
        tokio::spawn(crate::sandbox::seccomp::serve(
            spawned.listener,
            move |call| {
                sinks.handle(&refused_call_decision(&call, &identity, &hash, cgroup_id));
            },
        ))
    };
    let poller = {
        let metrics = metrics.clone();
        let name = compiled.name.clone();
        let dns = dns.clone();
        tokio::spawn(async move {
            let slots = [(SLOT, name)];
            loop {
                dns.gc(&metrics, &slots);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // The agent has a session of its own (no terminal signal reaches
    // it through enforcer's process group): SIGINT, SIGTERM, SIGHUP,
    // SIGQUIT and SIGWINCH to enforcer are forwarded to its init, which
    // passes them on to the agent.
    let forward = tokio::spawn(async move {
        use nix::sys::signal::Signal;
        use tokio::signal::unix::{signal, SignalKind};
        let kinds = [
            (SignalKind::terminate(), Signal::SIGTERM),
            (SignalKind::hangup(), Signal::SIGHUP),
            (SignalKind::interrupt(), Signal::SIGINT),
            (SignalKind::quit(), Signal::SIGQUIT),
            (SignalKind::window_change(), Signal::SIGWINCH),
        ];
        let mut streams = Vec::new();
        for (k, sig) in kinds {
            if let Ok(s) = signal(k) {
                streams.push((s, sig));
            }
        }
        loop {
            let futs = streams
                .iter_mut()
                .map(|(s, sig)| {
                    let sig = *sig;
                    Box::pin(async move {
                        s.recv().await;
                        sig
                    })
                })
                .collect::<Vec<_>>();
            if futs.is_empty() {
                return;
            }
            let (sig, _, _) = futures::future::select_all(futs).await;
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child_pid as i32), sig);
        }
    });
    let status = tokio::task::spawn_blocking(move || wait_exit(child_pid)).await??;
    // Leftover descendants die with the agent, before the last drain:
    // what they did until then is in the records and the summary (an
    // allow the flow cache answered is counted only when its way is
    // drained).
    cg.kill_all(Duration::from_secs(2));
    // The listener hangs up once no process is left under the filter:
    // the supervisor then records what it still counts and ends.
    if tokio::time::timeout(Duration::from_secs(2), &mut supervisor)
        .await
        .is_err()
    {
        supervisor.abort();
    }
    running.store(false, Ordering::Relaxed);
    forward.abort();
    // The agent's last records are in the ring and the flow tables.
    readers.finish().await;
    poller.abort();
    Ok(status)
}

/// Detach and unpin, write the `stop` record, print the summary.
fn tear_down(
    args: &RunArgs,
    kernel: &Arc<Mutex<Kernel>>,
    plan: Plan,
    enforced: Enforced,
    containment: String,
    recording: Recording,
    code: i32,
) -> Result<i32> {
    let (compiled, identity) = (&plan.compiled, &plan.identity);
    let Enforced { cg, attachment, .. } = enforced;
    let Recording { sinks, summary, .. } = recording;
    // (Leftover descendants were killed before the last drain.) Detach and
    // unpin.
    kernel
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .detach_file_hooks();
    attachment.release();
    let (counters, reasons) = {
        let k = kernel.lock().unwrap_or_else(|e| e.into_inner());
        (k.slot_counters(SLOT), k.slot_reasons(SLOT))
    };
    sinks.lifecycle(
        LifecycleAction::Stop,
        Some(identity),
        &compiled.hash,
        &format!("agent exited with status {code}"),
    );
    drop(cg);
    if !args.quiet {
        print_summary(
            &args.command,
            code,
            identity,
            compiled.audit,
            &counters,
            &reasons,
            &summary,
        );
        eprintln!("enforcer: containment: {containment}");
    }
    Ok(code)
}

fn summarize(d: &Decision, summary: &Mutex<Summary>) {
    let mut s = summary.lock().unwrap_or_else(|e| e.into_inner());
    if d.action == crate::events::Action::Dns {
        if d.verdict == Verdict::Allow {
            s.dns_answered += 1;
        } else {
            s.dns_refused += 1;
        }
    }
    if d.verdict != Verdict::Allow {
        let (dest, who) = match (d.action, &d.host) {
            // The proxy sees a query, not a process: name the query.
            (crate::events::Action::Dns, Some(name)) => {
                let from = match (d.ip, d.port) {
                    (Some(ip), Some(port)) => std::net::SocketAddr::new(ip, port).to_string(),
                    _ => "?".into(),
                };
                (name.clone(), format!("dns proxy, from {from}"))
            }
            _ => {
                let mut dest = format!(
                    "{} {}",
                    sink::destination(d),
                    d.protocol.as_deref().unwrap_or("")
                );
                if let Some(f) = &d.first_bytes {
                    dest.push_str(&format!(
                        ": {} {} ({})",
                        f.kind,
                        f.name.as_deref().unwrap_or("-"),
                        f.reason.unwrap_or("")
                    ));
                }
                (dest, format!("{} pid {}", d.comm, d.pid))
            }
        };
        let key = (
            d.action.as_str().to_string(),
            dest,
            d.rule.clone(),
            d.verdict.as_str().to_string(),
        );
        let e = s.denials.entry(key).or_insert((0, who));
        e.0 += 1;
    }
}

fn publish(kernel: &Mutex<Kernel>, metrics: &Metrics, slots: &[(u32, String)]) {
    let k = kernel.lock().unwrap_or_else(|e| e.into_inner());
    sink::publish_kernel_counters(&k, metrics, slots);
}

fn print_summary(
    command: &[String],
    code: i32,
    identity: &IdentityRef,
    audit_mode: bool,
    counters: &crate::kernel::SlotCounters,
    reasons: &[(u8, bool, u64)],
    summary: &Mutex<Summary>,
) {
    let s = summary.lock().unwrap_or_else(|e| e.into_inner());
    let total = |v: Verdict| -> u64 {
        counters
            .iter()
            .map(|row| row[v.kernel_code() as usize])
            .sum()
    };
    eprintln!(
        "\nenforcer: {} exited with status {code}; identity {}{} ({} mode)",
        command[0],
        identity.name,
        identity
            .spiffe_id
            .as_deref()
            .map(|s| format!(" <{s}>"))
            .unwrap_or_default(),
        if audit_mode { "audit" } else { "enforce" }
    );
    // Refused first bytes are counted by reason, not in the counters.
    let refused: u64 = reasons.iter().filter(|r| !r.1).map(|r| r.2).sum();
    let audited: u64 = reasons.iter().filter(|r| r.1).map(|r| r.2).sum();
    eprintln!(
        "enforcer: decisions: {} allowed, {} denied, {} audited",
        total(Verdict::Allow),
        total(Verdict::Deny) + refused,
        total(Verdict::Audit) + audited
    );
    if !reasons.is_empty() {
        let by: Vec<String> = reasons
            .iter()
            .map(|(r, audit, n)| {
                format!(
                    "{} {n}{}",
                    enforcer_common::first_bytes::reason::as_str(*r),
                    if *audit { " (audit)" } else { "" }
                )
            })
            .collect();
        eprintln!(
            "enforcer: first bytes refused (TLS SNI / HTTP Host): {}",
            by.join(", ")
        );
    }
    if s.dns_answered + s.dns_refused > 0 {
        eprintln!(
            "enforcer: dns: {} answered, {} refused",
            s.dns_answered, s.dns_refused
        );
    }
    if s.denials.is_empty() {
        eprintln!("enforcer: nothing was denied");
        return;
    }
    eprintln!(
        "enforcer: {:<8} {:<12} {:<34} {:<16} {:>5}  first by",
        "verdict", "action", "destination", "rule", "count"
    );
    for (i, ((action, dest, rule, verdict), (n, who))) in s.denials.iter().enumerate() {
        if i == 20 {
            eprintln!("enforcer: ... and {} more", s.denials.len() - 20);
            break;
        }
        let rule = rule.split_whitespace().next().unwrap_or(rule);
        eprintln!("enforcer: {verdict:<8} {action:<12} {dest:<34} {rule:<16} {n:>5}  {who}");
    }
}

/// A `run-<pid>` cgroup or pin directory whose enforcer died (SIGKILL,
/// crash) stays behind on purpose: its pinned links keep the agent's
/// leftover processes enforced. Once that enforcer pid is gone, the next
/// run kills the leftovers, then removes the cgroup and the pins.
fn collect_dead_runs(cgroup_parent: &Path, pin_dir: &Path) {
    let dead = |name: &str| -> bool {
        name.strip_prefix("run-")
            .and_then(|p| p.parse::<u32>().ok())
            .map(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists())
            .unwrap_or(false)
    };
    if let Ok(rd) = std::fs::read_dir(cgroup_parent) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && dead(&name) {
                tracing::info!(cgroup = %e.path().display(), "removing the cgroup of a dead enforcer run");
                drop(cgroup::OwnedCgroup::adopt(e.path()));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(pin_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                tracing::info!(pins = %e.path().display(), "removing the pins of a dead enforcer run");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn bpffs_mounted(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut it = l.split_whitespace();
        let (_, Some(mnt), Some(fs)) = (it.next(), it.next(), it.next()) else {
            return false;
        };
        fs == "bpf" && dir.starts_with(mnt)
    })
}

/// Wait for the agent's init; its exit code is the agent's (128+signal
/// when the agent was killed; likewise when init itself was).
fn wait_exit(pid: u32) -> Result<i32> {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the agent"),
        }
    }
}

/// A call the seccomp filter refused, as a decision of the identity.
fn refused_call_decision(
    call: &crate::sandbox::seccomp::RefusedCall,
    identity: &IdentityRef,
    policy_hash: &str,
    cgroup_id: u64,
) -> Decision {
    let comm = std::fs::read(format!("/proc/{}/comm", call.pid))
        .map(|b| crate::events::reader::comm_str(b.strip_suffix(b"\n").unwrap_or(&b)))
        .unwrap_or_default();
    Decision {
        ts: chrono::Utc::now(),
        identity: identity.clone(),
        cgroup_id,
        pid: call.pid,
        comm,
        action: crate::events::Action::Syscall,
        ip: None,
        port: None,
        protocol: None,
        host: None,
        path: None,
        workload: None,
        verdict: Verdict::Deny,
        rule: format!("seccomp:{}", call.syscall),
        policy_hash: policy_hash.to_string(),
        detail: Some(call.detail.clone()),
        first_bytes: None,
        unix: None,
        flow: None,
    }
}
