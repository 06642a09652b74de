//! The event loop: start-up (pinned state, programs, DNS, readers, metrics,
//! control socket), then what wakes a reconcile (SIGHUP, the policies
//! directory, pods, `AgentPolicy` objects, cgroups that appear, the resync
//! timer) and in what order it runs the steps, and shutdown.
use super::*;

pub fn main(config_path: &Path) -> Result<i32> {
    crate::run::require_root("daemon")?;
    let cfg = Config::load(config_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg, config_path.to_path_buf()))
}

/// The daemon from start to shutdown: programs, outputs, state, the
/// Kubernetes watchers, the first reconcile, the servers, then a reconcile
/// per wake-up until SIGTERM/SIGINT.
async fn serve(cfg: Config, config_path: PathBuf) -> Result<i32> {
    let mount = cgroup::cgroup2_mount()?;
    let mut loaded = load_programs(&cfg)?;
    let ring = loaded.kernel.take_events().context("event ring buffer")?;
    let flows = loaded.kernel.take_flows().context("flow tables")?;
    let (metrics, sinks) = open_outputs(&cfg, &loaded)?;
    let attribution = Attribution::default();
    let dns = Arc::new(DnsService::new(
        &mut loaded.kernel,
        sinks.clone(),
        metrics.clone(),
        attribution.clone(),
    )?);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating stateDir {}", cfg.state_dir.display()))?;
    let slots = SlotTable::load(&cfg.state_dir.join("slots.json"));
    let state = State {
        node: Node {
            cfg: cfg.clone(),
            mount,
            lsm: loaded.lsm,
            unix: loaded.unix,
            resolvers: loaded.resolvers,
            own_netns: crate::netns::NetnsId::own()
                .map_err(|e| {
                    tracing::error!("reading /proc/self/ns/net: {e}; DNS proxy listeners in workload network namespaces are disabled")
                })
                .ok(),
            started: chrono::Utc::now(),
            sinks: sinks.clone(),
            metrics: metrics.clone(),
            dns: dns.clone(),
            attribution: attribution.clone(),
        },
        kernel: loaded.kernel,
        policies: Policies::new(slots),
        bindings: Bindings::default(),
        roots: roots::Roots::default(),
        k8s: None,
    };
    let state = Arc::new(Mutex::new(state));
    let wake = Wake::default();
    let (k8s_tasks, status_tx) = match &cfg.kubernetes {
        Some(kc) => start_kubernetes(kc, &state, &wake).await?,
        None => (Vec::new(), None),
    };
    collect_kernel_counters(&state, &metrics);
    announce_start(&cfg, &config_path, &state, &sinks);
    // Reload triggers: SIGHUP, file changes (debounced), periodic tick.
    // The directory is watched before the first read of its policies: a
    // file changed while the daemon starts (seconds with many bindings) is
    // either read by that first reload or wakes the loop below for another
    // (the watcher's events queue until the loop runs).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Trigger>(16);
    let _watcher = watch_dir(&cfg.policies_dir, tx.clone());
    let reconciler = Reconciler {
        state: state.clone(),
        dns: dns.clone(),
        metrics: metrics.clone(),
        status_tx,
        config_path,
    };
    reconciler.run(Trigger::Start).await;
    // Start-up parsed the kernel's BTF twice (struct offsets; aya's, for the
    // BPF LSM loads) and the eBPF object: ~20 MB of small allocations, freed
    // now but kept by the allocator. Hand them back to the kernel (a long-lived node
    // daemon's RSS is what operators watch).
    crate::kernel::release_free_memory();

    let _metrics_server = match cfg.metrics_addr {
        Some(addr) => {
            let (bound, handle) = metrics::serve(metrics.clone(), addr, Arc::new(|| true)).await?;
            tracing::info!("metrics on http://{bound}/metrics");
            Some(handle)
        }
        None => None,
    };
    let readers = Readers::spawn(ring, flows, sinks.clone(), dns.attributor(attribution));
    let control_task = control::serve(&cfg.control_socket, state.clone()).await?;

    reconcile_until_stopped(&cfg, &reconciler, &mut rx, &wake).await?;
    heartbeat::beat(&cfg.state_dir, true);
    tracing::info!("shutting down; pinned programs stay attached (enforcement continues)");
    sinks.lifecycle(
        LifecycleAction::Stop,
        None,
        "",
        "daemon stopped; pinned links keep enforcing",
    );
    readers.finish().await;
    control_task.abort();
    for t in k8s_tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    // Attachments are pinned: dropping them here closes our fds only.
    Ok(0)
}

/// Reconcile on every wake-up (SIGHUP, a change in the policies directory,
/// the resync tick, pods, `AgentPolicy` objects) until SIGTERM or SIGINT.
async fn reconcile_until_stopped(
    cfg: &Config,
    reconciler: &Reconciler,
    rx: &mut tokio::sync::mpsc::Receiver<Trigger>,
    wake: &Wake,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.resync_seconds));
    // Ready once the signal handlers are in place (a SIGHUP before would
    // kill the daemon).
    println!(
        "enforcer daemon: ready (control socket {})",
        cfg.control_socket.display()
    );
    loop {
        let why = tokio::select! {
            _ = hup.recv() => Trigger::Sighup,
            Some(w) = rx.recv() => {
                // Debounce bursts of file events (editors write in several steps).
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
                w
            }
            _ = tick.tick() => Trigger::Tick,
            _ = wake.pods.notified() => Trigger::Pods,
            _ = wake.policies.notified() => Trigger::AgentPolicies,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        reconciler.run(why).await;
        if why == Trigger::Tick {
            heartbeat::beat(&cfg.state_dir, false);
        }
    }
    Ok(())
}

/// The programs loaded (maps pinned under `pinDir`), the global hooks
/// attached, and what this kernel can enforce.
struct Loaded {
    kernel: Kernel,
    lsm: crate::kernel::LsmSupport,
    unix: crate::kernel::UnixSupport,
    /// The resolver IPC sockets in force (config, else the default list).
    resolvers: Vec<PathBuf>,
}

/// Load the programs, attach the global BPF LSM hooks if the kernel has
/// BPF LSM, and install the resolver socket list and the sampling of
/// allowed events. What the kernel lacks is logged loudly.
fn load_programs(cfg: &Config) -> Result<Loaded> {
    ensure_bpffs(&cfg.pin_dir)?;
    let mut kernel = Kernel::load(Some(&cfg.pin_dir.join("maps")))?;
    let mut lsm = kernel.probe_lsm();
    if lsm.available {
        // Global hooks, idle (one array lookup) while no policy has files:.
        if let Err(e) = kernel.attach_lsm_hooks(Some(&cfg.pin_dir.join("lsm"))) {
            lsm = crate::kernel::LsmSupport {
                available: false,
                detail: format!("BPF LSM probe passed, but the file hooks failed: {e:#}"),
            };
        }
    }
    if lsm.available {
        tracing::info!("BPF LSM available: {}", lsm.detail);
    } else {
        tracing::warn!(
            "BPF LSM unavailable: {}; policies with files:/onTaint: are {}",
            lsm.detail,
            if cfg.allow_degraded {
                "enforced for network egress only (allowDegraded)"
            } else {
                "rejected"
            }
        );
    }
    if lsm.available {
        // The BPF LSM unix hooks see the peer socket: preferred over the
        // cgroup unix hooks (which are then not attached to cgroups).
        if let Err(e) = kernel.attach_unix_lsm_hooks(Some(&cfg.pin_dir.join("unix-lsm"))) {
            tracing::warn!("BPF LSM unix hooks: {e:#}");
        }
    }
    // Every BPF LSM program the daemon loads is loaded: the parsed kernel
    // BTF (~9 MB) goes (released to the kernel below, once start-up is over).
    kernel.release_btf();
    let unix = kernel.unix_support();
    let resolvers = if cfg.resolver_sockets.is_empty() {
        policy::local::default_resolver_sockets()
    } else {
        cfg.resolver_sockets.clone()
    };
    if unix.available {
        tracing::info!("unix socket hooks available: {}", unix.detail);
    } else {
        tracing::warn!(
            "unix socket hooks unavailable: {}; {}: spec.local is NOT enforced",
            unix.detail,
            crate::kernel::UNIX_REQUIREMENT
        );
    }
    kernel
        .set_resolver_sockets(&resolvers)
        .context("installing the resolver socket list")?;
    kernel.set_allow_sample(cfg.allow_events)?;
    Ok(Loaded {
        kernel,
        lsm,
        unix,
        resolvers,
    })
}

/// The metrics registry (with the kernel's capabilities) and the sinks
/// decisions go to (the audit log, if configured).
fn open_outputs(cfg: &Config, loaded: &Loaded) -> Result<(Arc<Metrics>, Arc<Sinks>)> {
    let metrics = Arc::new(Metrics::new());
    metrics.set_capability("bpf_lsm", loaded.lsm.available);
    metrics.set_capability("unix_sockets", loaded.unix.available);
    let audit = match &cfg.audit_log {
        Some(p) => {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).ok();
            }
            let options = crate::audit::AuditOptions {
                format: cfg.audit_format,
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
    Ok((metrics, sinks))
}

/// What wakes the reconcile loop from the Kubernetes side.
#[derive(Default)]
struct Wake {
    /// A change of the node's pods, or a pod cgroup appearing.
    pods: Arc<tokio::sync::Notify>,
    /// A change of the `AgentPolicy` objects.
    policies: Arc<tokio::sync::Notify>,
}

type StatusTx = tokio::sync::watch::Sender<Vec<crate::k8s::policies::Report>>;

/// Kubernetes mode: this node's pods and the AgentPolicy objects, watched
/// in the background; a change wakes the reconcile loop. Status reports
/// go to a writer task (API calls never hold the state lock or block the
/// loop). Returns the tasks and the writer's input.
async fn start_kubernetes(
    kc: &config::KubernetesConfig,
    state: &Mutex<State>,
    wake: &Wake,
) -> Result<(Vec<tokio::task::JoinHandle<()>>, Option<StatusTx>)> {
    let node = kc
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty())
        .context(
            "kubernetes: no node name (set kubernetes.nodeName or NODE_NAME from the \
             downward API: fieldRef spec.nodeName)",
        )?;
    let client = match &kc.api_server {
        Some(url) => {
            let uri = url
                .parse()
                .map_err(|e| anyhow::anyhow!("kubernetes.apiServer {url:?}: {e}"))?;
            kube::Client::try_from(kube::Config::new(uri)).context("kubernetes client")?
        }
        None => kube::Client::try_default()
            .await
            .context("kubernetes client (in-cluster service account or kubeconfig)")?,
    };
    let cache = Arc::new(Mutex::new(crate::k8s::watch::PodCache::default()));
    let policies = kc
        .agent_policies
        .then(|| Arc::new(Mutex::new(crate::k8s::policies::PolicyCache::default())));
    state.lock().unwrap_or_else(|e| e.into_inner()).k8s = Some(K8s {
        cache: cache.clone(),
        policies: policies.clone(),
        trust_domain: kc.trust_domain.clone(),
        kubelet_root: kc.kubelet_cgroup_root.clone(),
        wake: wake.pods.clone(),
        parents: None,
        watched: HashSet::new(),
    });
    let mut tasks = Vec::new();
    tracing::info!(node = %node, "kubernetes: watching this node's pods");
    let notify = wake.pods.clone();
    tasks.push(tokio::spawn(crate::k8s::watch::run(
        client.clone(),
        node.clone(),
        cache,
        move || notify.notify_one(),
    )));
    let Some(policies) = policies else {
        return Ok((tasks, None));
    };
    tracing::info!("kubernetes: watching AgentPolicy objects (all namespaces)");
    let notify = wake.policies.clone();
    tasks.push(tokio::spawn(crate::k8s::policies::run(
        client.clone(),
        policies,
        move || notify.notify_one(),
    )));
    let (tx, mut rx) = tokio::sync::watch::channel(Vec::new());
    let mut writer = crate::k8s::policies::StatusWriter::new(client, &node);
    tasks.push(tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let reports = rx.borrow_and_update().clone();
            writer.sync(&reports).await;
        }
    }));
    Ok((tasks, Some(tx)))
}

/// Scrapes read the kernel counters at scrape time.
fn collect_kernel_counters(state: &Arc<Mutex<State>>, metrics: &Arc<Metrics>) {
    let weak_state = Arc::downgrade(state);
    let weak_metrics = Arc::downgrade(metrics);
    metrics.set_collector(Box::new(move || {
        if let (Some(st), Some(m)) = (weak_state.upgrade(), weak_metrics.upgrade()) {
            let s = st.lock().unwrap_or_else(|e| e.into_inner());
            sink::publish_kernel_counters(&s.kernel, &m, &s.policies.slot_names());
        }
    }));
}

/// The start record (with how long the node ran without a daemon, while
/// the pins kept enforcing) and the first heartbeat.
fn announce_start(cfg: &Config, config_path: &Path, state: &Mutex<State>, sinks: &Sinks) {
    let gap = heartbeat::previous(&cfg.state_dir).map(|prev| {
        let lost = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .kernel
            .stat(enforcer_common::stat::EVENTS_LOST);
        heartbeat::describe_gap(prev, chrono::Utc::now().timestamp(), lost)
    });
    if let Some(g) = &gap {
        tracing::warn!("{g}");
    }
    heartbeat::beat(&cfg.state_dir, false);
    sinks.lifecycle(
        LifecycleAction::Start,
        None,
        "",
        &format!(
            "enforcer daemon, config {}{}",
            config_path.display(),
            gap.as_deref().map(|g| format!("; {g}")).unwrap_or_default()
        ),
    );
}

/// What woke a reconcile.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trigger {
    /// The first reconcile, at start-up.
    Start,
    /// SIGHUP: the config's bindings and the policies are read again.
    Sighup,
    /// A change in the policies directory (debounced).
    FileChange,
    /// The resync tick.
    Tick,
    /// A change of the node's pods, or a pod cgroup appearing.
    Pods,
    /// A change of the `AgentPolicy` objects.
    AgentPolicies,
}

impl Trigger {
    /// The name logs give it.
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Sighup => "sighup",
            Trigger::FileChange => "file-change",
            Trigger::Tick => "tick",
            Trigger::Pods => "pods",
            Trigger::AgentPolicies => "agentpolicies",
        }
    }
}

/// One reconcile, in the order data flows: policy sources -> kernel, the
/// DNS proxies the reload asked for, cgroups and pods -> identities, the
/// CAP_NET_RAW scan, status reports, DNS listeners in the workloads'
/// network namespaces.
struct Reconciler {
    state: Arc<Mutex<State>>,
    dns: Arc<DnsService>,
    metrics: Arc<Metrics>,
    status_tx: Option<StatusTx>,
    config_path: PathBuf,
}

impl Reconciler {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reconcile woken by `why`. The state lock is not held across an
    /// await.
    async fn run(&self, why: Trigger) {
        {
            let mut s = self.lock();
            if why == Trigger::Sighup {
                s.reload_bindings(&self.config_path);
            }
            match why {
                Trigger::Start => s.reload_policies(),
                Trigger::Tick | Trigger::Pods => {
                    let State {
                        kernel,
                        policies,
                        node,
                        ..
                    } = &mut *s;
                    policies.retry_unresolved_files(kernel, &node.metrics);
                    policies.retry_moved_unix_sockets(kernel);
                    if why == Trigger::Tick {
                        s.grow_roots();
                    }
                }
                _ => {
                    tracing::info!(trigger = why.as_str(), "reloading policies");
                    s.reload_policies();
                }
            }
        }
        start_dns(&self.state, &self.dns).await;
        {
            let mut s = self.lock();
            s.reconcile_bindings();
            let State {
                kernel,
                policies,
                bindings,
                node,
                ..
            } = &mut *s;
            bindings.scan_net_raw(kernel, &node.metrics, policies);
            if let Some(tx) = &self.status_tx {
                tx.send_replace(s.policy_reports());
            }
            if why != Trigger::Start {
                // Kernel counters reach the metrics at scrape time (the collector).
                self.dns.gc(&self.metrics, &s.policies.slot_names());
            }
        }
        dns_netns::sync(&self.state, &self.dns, &self.metrics).await;
    }
}

impl State {
    /// SIGHUP: the config's static bindings are read again (the rest of
    /// the config needs a restart).
    fn reload_bindings(&mut self, config_path: &Path) {
        match Config::load(config_path) {
            Ok(new) => {
                if new.bindings != self.node.cfg.bindings {
                    tracing::info!("bindings changed in config");
                }
                self.node.cfg.bindings = new.bindings;
            }
            Err(e) => tracing::error!("config reload rejected, keeping the old one: {e:#}"),
        }
    }
}

/// (Re)start the DNS proxies a reload asked for, then point each identity's
/// steering at its proxy port. The state lock is not held across the await.
async fn start_dns(state: &Mutex<State>, dns: &DnsService) {
    let pending = state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .policies
        .take_pending_dns();
    for (slot, policy) in pending {
        let name = policy.identity.name.clone();
        // After a restart the pinned kernel state still steers to the old
        // proxy's port: take the same one if it is free.
        let preferred = {
            let s = state.lock().unwrap_or_else(|e| e.into_inner());
            Some(s.kernel.dns_port(slot)).filter(|p| *p != 0)
        };
        match dns.start(slot, policy, preferred).await {
            Ok(port) => {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                match s.kernel.set_dns_port(slot, port) {
                    Ok(()) => tracing::info!(policy = %name, port, "DNS proxy serving"),
                    Err(e) => tracing::error!(policy = %name, "steering DNS to the proxy: {e:#}"),
                }
            }
            Err(e) => tracing::error!(policy = %name, "starting the DNS proxy: {e:#}"),
        }
    }
}

fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let on_bpffs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[2] == "bpf" && pin_dir.starts_with(f[1])
    });
    if !on_bpffs {
        anyhow::bail!(
            "pinDir {} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` \
             (the DaemonSet mounts the host's /sys/fs/bpf)",
            pin_dir.display()
        );
    }
    crate::kernel::private_dir(pin_dir)?;
    crate::kernel::private_dir(&pin_dir.join("links"))?;
    Ok(())
}

fn watch_dir(
    dir: &Path,
    tx: tokio::sync::mpsc::Sender<Trigger>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !ev.kind.is_access() {
                let _ = tx.try_send(Trigger::FileChange);
            }
        }
    })
    .map_err(|e| tracing::warn!("file watcher unavailable ({e}); reload with SIGHUP"))
    .ok()?;
    w.watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!("watching {}: {e}; reload with SIGHUP", dir.display()))
        .ok()?;
    Some(w)
}
