//! A real container runtime for the tests: Debian's `containerd` and `runc`
//! with the CNI bridge plugin, driven through the CRI API (gRPC over
//! containerd's socket, the `k8s-cri` crate) the way the kubelet drives it:
//! RunPodSandbox with the kubelet's `cgroup_parent`, CreateContainer,
//! StartContainer, StopContainer, RemoveContainer, StopPodSandbox,
//! RemovePodSandbox.
//!
//! containerd runs with a configuration of its own (only what the tests
//! need: the CRI plugin, runc with the cgroupfs or the systemd driver, the overlayfs
//! snapshotter, CNI from `/usr/lib/cni`) and keeps its root and state on a
//! tmpfs mounted for it (overlayfs cannot stack on the VM runner's 9p root).
//! runc's state (`/run/containerd/runc`), the shims' sockets
//! (`/run/containerd/s`) and the pods' network namespaces (`/var/run/netns`)
//! stay at containerd's fixed paths: private to the VM's guest, but shared
//! with a system containerd if this ran on a host that has one (it is
//! `#[ignore]`d there).
//! With the systemd driver ([`CgroupDriver::Systemd`]) the guest, which has
//! no systemd, gets one ([`Systemd`]): Debian's systemd as the init of a
//! PID and mount namespace of its own, owning the guest's cgroup2 root, so
//! that runc creates each container's `cri-containerd-<id>.scope` through
//! it (D-Bus on `/run/systemd/private`) where a node's systemd would:
//! `/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/…`.
//! containerd, its shims and runc then run in those namespaces (as they
//! share systemd's on a node); the daemon and the test stay outside, as a
//! DaemonSet's pod does (host PID namespace, a mount namespace of its own).
//! Images come from `cargo xtask pod-images` (no registry is reachable):
//! `$ENFORCER_POD_IMAGES/{pause,agent}.oci.tar`, imported with `ctr`.
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerMetadata,
    ContainerStatusRequest, CreateContainerRequest, DnsConfig, ImageSpec, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{poll_until, slowdown, unique};

/// The pause image (the CRI plugin's `sandbox_image`).
pub const PAUSE_IMAGE: &str = "docker.io/library/enforcer-pause:1";
/// The agent image: `/usr/bin/python3` and `/agents/*.py`.
pub const AGENT_IMAGE: &str = "docker.io/library/enforcer-agent:1";
/// The pods' network (CNI bridge `enforcer-cni0`, host-local IPAM); the
/// bridge (the pods' gateway) is `.1`.
pub const POD_SUBNET: &str = "10.89.0.0/24";
pub const POD_GATEWAY: &str = "10.89.0.1";

/// Where `cargo xtask pod-images` wrote the archives.
pub fn pod_images_dir() -> PathBuf {
    std::env::var_os("ENFORCER_POD_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/pod-images"))
}

/// The cgroup driver the kubelet and the runtime agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// Pod and container cgroups are directories the kubelet and runc make.
    Cgroupfs,
    /// Slices and scopes systemd makes when the kubelet and runc ask it.
    Systemd,
}

impl CgroupDriver {
    /// The `cgroup_parent` the kubelet sends in RunPodSandbox for a
    /// BestEffort pod: a path in the cgroup2 hierarchy (cgroupfs: under the
    /// kubelet's `--cgroup-root`, `kubelet_root`; systemd: the slice path
    /// with the UID's dashes as underscores, as systemd's unit names need).
    pub fn pod_cgroup_parent(self, kubelet_root: Option<&Path>, uid: &str) -> String {
        match self {
            CgroupDriver::Cgroupfs => kubelet_root
                .unwrap_or(Path::new("/"))
                .join(format!("kubepods/besteffort/pod{uid}"))
                .display()
                .to_string(),
            CgroupDriver::Systemd => {
                assert!(kubelet_root.is_none(), "the systemd layout is at the root");
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                )
            }
        }
    }
}

/// Debian's systemd as the init of a PID and mount namespace of its own,
/// with the guest's cgroup2 root as its own (see the module's text); killed
/// with everything in its PID namespace on drop, and the cgroups it made
/// removed.
pub struct Systemd {
    /// Its PID here (outside its namespace).
    pub pid: i32,
    launcher: Child,
    /// Top-level cgroups that were not there before it.
    before: Vec<PathBuf>,
}

fn top_cgroups() -> Vec<PathBuf> {
    std::fs::read_dir(crate::cgroup2_mount())
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Remove a cgroup tree, leaves first; false if something stays.
fn remove_cgroup_tree(dir: &Path) -> bool {
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

impl Systemd {
    /// Start it (in the root cgroup, which it takes for its own) and wait
    /// until it says it is running.
    pub fn start() -> Result<Self, String> {
        for (cmd, pkg) in [
            ("unshare", "util-linux"),
            ("nsenter", "util-linux"),
            ("systemctl", "systemd"),
        ] {
            if !which(cmd) {
                return Err(format!("no {cmd} (Debian package {pkg})"));
            }
        }
        if !Path::new("/lib/systemd/systemd").exists() {
            return Err("no /lib/systemd/systemd (Debian package systemd)".into());
        }
        let before = top_cgroups();
        // `container=` tells systemd it is a container's init: it leaves
        // the kernel's settings alone. `slices.target` starts nothing but
        // the root slices (no services of the guest's unit files).
        let launcher = Command::new("sh")
            .arg("-c")
            .arg(
                "echo $$ > /sys/fs/cgroup/cgroup.procs && exec unshare --pid --fork --mount \
                 --mount-proc --propagation private env -i container=enforcer-test \
                 /lib/systemd/systemd --system --unit=slices.target --show-status=no \
                 --log-level=warning",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting systemd: {e}"))?;
        let mut me = Self {
            pid: 0,
            launcher,
            before,
        };
        let limit = Duration::from_secs(60 * u64::from(slowdown()));
        let u = me.launcher.id();
        let found = poll_until(limit, Duration::from_millis(100), || {
            me.pid = crate::first_child(u).map_or(0, |p| p as i32);
            me.pid > 0
        });
        if !found {
            return Err("systemd: unshare started no init".into());
        }
        let mut state = String::new();
        let up = poll_until(limit, Duration::from_millis(250), || {
            state = me
                .command("systemctl")
                .arg("is-system-running")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            state == "running" || state == "degraded"
        });
        if !up {
            return Err(format!("systemd did not come up in {limit:?}: {state:?}"));
        }
        Ok(me)
    }

    /// `prog` to be run in systemd's PID and mount namespaces (where a
    /// node's runtime runs).
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("--target")
            .arg(self.pid.to_string())
            .args(["--pid", "--mount", "--", prog]);
        c
    }

    /// A launcher ([`crate::Daemon::launcher`]) that runs the daemon as a
    /// DaemonSet's pod runs on a node: in the host's PID namespace (this
    /// systemd's: its PID 1 is systemd, whose mount namespace the runtime
    /// shares) and in a mount namespace of its own (with a `/proc` of that
    /// PID namespace).
    pub fn daemon_launcher(&self) -> Vec<String> {
        [
            "nsenter",
            "--target",
            &self.pid.to_string(),
            "--pid",
            "--",
            "unshare",
            "--mount",
            "--mount-proc",
            "--propagation",
            "private",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `systemctl ARGS`; an error with its output if it fails.
    pub fn systemctl(&self, args: &[&str]) -> Result<(), String> {
        let out = self
            .command("systemctl")
            .args(args)
            .output()
            .map_err(|e| format!("systemctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "systemctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init from outside it kills every
        // process of the namespace.
        if self.pid > 0 {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        let made: Vec<PathBuf> = top_cgroups()
            .into_iter()
            .filter(|c| !self.before.contains(c))
            .collect();
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            made.iter().all(|c| remove_cgroup_tree(c))
        });
    }
}

/// containerd, started for one test and stopped (with every pod it made)
/// on drop.
pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub driver: CgroupDriver,
    child: Child,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    /// Declared last: dropped after containerd is stopped.
    systemd: Option<Systemd>,
}

/// What the kubelet says about a pod when it asks for its sandbox.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The kubelet's cgroup parent, e.g. `/kubepods/besteffort/pod<uid>`
    /// (cgroupfs driver: a path in the cgroup2 hierarchy).
    pub cgroup_parent: String,
    /// Nameservers of the pod's `/etc/resolv.conf`.
    pub dns_servers: Vec<String>,
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).exists()))
        .unwrap_or(false)
}

impl Containerd {
    /// Start containerd (with the systemd driver: systemd first) and
    /// import the pod images. Errors say what is missing (the packages
    /// come from `scripts/setup-vm.sh`).
    pub fn start(name: &str, driver: CgroupDriver) -> Result<Self, String> {
        for (cmd, pkg) in [
            ("containerd", "containerd"),
            ("ctr", "containerd"),
            ("runc", "runc"),
        ] {
            if !which(cmd) {
                return Err(format!(
                    "no {cmd} (Debian package {pkg}; scripts/setup-vm.sh installs it)"
                ));
            }
        }
        if !Path::new("/usr/lib/cni/bridge").exists() {
            return Err(
                "no /usr/lib/cni/bridge (Debian package containernetworking-plugins)".into(),
            );
        }
        let images = pod_images_dir();
        for f in ["pause.oci.tar", "agent.oci.tar"] {
            if !images.join(f).exists() {
                return Err(format!(
                    "no {} (cargo xtask pod-images)",
                    images.join(f).display()
                ));
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let dir = PathBuf::from(format!("/run/enforcer-cri-{}", unique(name)));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mounting a tmpfs on {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
        let sock = dir.join("containerd.sock");
        // Until containerd runs (then `Drop` cleans up), a failure unmounts.
        // systemd starts after the tmpfs is mounted: its mount namespace is
        // a copy of this one then.
        let spawned = (|| -> Result<(Child, Option<Systemd>), String> {
            let systemd = match driver {
                CgroupDriver::Systemd => Some(Systemd::start()?),
                CgroupDriver::Cgroupfs => None,
            };
            let cni_conf = dir.join("cni");
            std::fs::create_dir_all(&cni_conf).map_err(|e| e.to_string())?;
            std::fs::write(
                cni_conf.join("10-enforcer-test.conflist"),
                serde_json::json!({
                    "cniVersion": "1.0.0",
                    "name": "enforcer-test",
                    "plugins": [{
                        "type": "bridge",
                        "bridge": "enforcer-cni0",
                        "isGateway": true,
                        "ipMasq": false,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GATEWAY}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": dir.join("ipam").display().to_string(),
                        },
                    }],
                })
                .to_string(),
            )
            .map_err(|e| e.to_string())?;
            let config = dir.join("config.toml");
            std::fs::write(
                &config,
                format!(
                    r#"version = 2
    root = "{root}"
    state = "{state}"
    disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
    [grpc]
      address = "{sock}"
    [plugins."io.containerd.grpc.v1.cri"]
      sandbox_image = "{PAUSE_IMAGE}"
      disable_apparmor = true
      enable_selinux = false
      [plugins."io.containerd.grpc.v1.cri".containerd]
        snapshotter = "overlayfs"
        default_runtime_name = "runc"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            SystemdCgroup = {systemd_cgroup}
      [plugins."io.containerd.grpc.v1.cri".cni]
        bin_dir = "/usr/lib/cni"
        conf_dir = "{cni}"
    "#,
                    root = dir.join("root").display(),
                    state = dir.join("state").display(),
                    sock = sock.display(),
                    cni = cni_conf.display(),
                    systemd_cgroup = driver == CgroupDriver::Systemd,
                ),
            )
            .map_err(|e| e.to_string())?;
            let log =
                std::fs::File::create(dir.join("containerd.log")).map_err(|e| e.to_string())?;
            let mut cmd = match &systemd {
                Some(s) => s.command("containerd"),
                None => Command::new("containerd"),
            };
            // Its own process group: stopped as one with nsenter, if that
            // runs it.
            let child = cmd
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(|e| format!("starting containerd: {e}"))?;
            Ok((child, systemd))
        })();
        let (child, systemd) = match spawned {
            Ok(c) => c,
            Err(e) => {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        // A client that connects nowhere until the socket answers (then
        // replaced): `me` exists from here on, so that a failure below
        // still stops containerd (Drop).
        let placeholder = {
            let _in_rt = rt.enter();
            RuntimeServiceClient::new(Endpoint::from_static("http://[::1]:1").connect_lazy())
        };
        let mut me = Self {
            dir,
            sock,
            driver,
            child,
            rt,
            client: placeholder,
            systemd,
        };
        let up = poll_until(
            Duration::from_secs(60 * u64::from(slowdown())),
            Duration::from_millis(200),
            || me.sock.exists(),
        );
        if !up {
            return Err(format!(
                "containerd did not open {} in time:\n{}",
                me.sock.display(),
                me.log()
            ));
        }
        for f in ["pause.oci.tar", "agent.oci.tar"] {
            let out = Command::new("ctr")
                .arg("--address")
                .arg(&me.sock)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(images.join(f))
                .output()
                .map_err(|e| format!("running ctr: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ctr images import {f}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let path = me.sock.clone();
        let channel = me
            .rt
            .block_on(
                Endpoint::from_static("http://[::1]:1").connect_with_connector(tower::service_fn(
                    move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    },
                )),
            )
            .map_err(|e| format!("connecting to containerd's CRI: {e}"))?;
        me.client = RuntimeServiceClient::new(channel);
        Ok(me)
    }

    /// What the kubelet does before RunPodSandbox: the pod's cgroup
    /// (cgroupfs: a directory; systemd: the pod's slice, started through
    /// systemd, its parent slices with it).
    pub fn make_pod_cgroup(&self, pod: &PodSpec) -> Result<(), String> {
        match &self.systemd {
            Some(s) => s.systemctl(&["start", &slice_of(pod)]),
            None => std::fs::create_dir_all(pod_cgroup(pod)).map_err(|e| e.to_string()),
        }
    }

    /// What the kubelet does once a pod is gone: its cgroup goes; true if
    /// it is gone.
    pub fn remove_pod_cgroup(&self, pod: &PodSpec) -> bool {
        if let Some(s) = &self.systemd {
            let _ = s.systemctl(&["stop", &slice_of(pod)]);
        }
        let dir = pod_cgroup(pod);
        std::fs::remove_dir(&dir).is_ok() || !dir.exists()
    }

    /// The systemd the runtime talks to (systemd driver).
    pub fn systemd(&self) -> Option<&Systemd> {
        self.systemd.as_ref()
    }

    /// Where containerd's runc puts a container of `pod` (absolute).
    pub fn container_cgroup(&self, pod: &PodSpec, id: &str) -> PathBuf {
        pod_cgroup(pod).join(match self.driver {
            CgroupDriver::Cgroupfs => id.to_string(),
            CgroupDriver::Systemd => format!("cri-containerd-{id}.scope"),
        })
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The sandbox config the kubelet sends for `pod` (again with each
    /// CreateContainer).
    pub fn sandbox_config(&self, pod: &PodSpec) -> PodSandboxConfig {
        let logs = self.dir.join("pods").join(&pod.uid);
        let _ = std::fs::create_dir_all(&logs);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            hostname: pod.name.clone(),
            log_directory: logs.display().to_string(),
            dns_config: Some(DnsConfig {
                servers: pod.dns_servers.clone(),
                searches: vec![],
                options: vec![],
            }),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: pod.cgroup_parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// One CRI call, bounded (a wedged containerd fails the test instead
    /// of hanging it): its answer or what went wrong.
    fn rpc<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, String> {
        let limit = Duration::from_secs(120 * u64::from(slowdown()));
        match self
            .rt
            .block_on(async { tokio::time::timeout(limit, call).await })
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: no answer from containerd in {limit:?}")),
        }
    }

    /// RunPodSandbox: the pod's sandbox (pause container, network
    /// namespace); its id.
    pub fn run_pod(&self, pod: &PodSpec) -> Result<String, String> {
        let mut c = self.client.clone();
        let req = RunPodSandboxRequest {
            config: Some(self.sandbox_config(pod)),
            runtime_handler: String::new(),
        };
        self.rpc("RunPodSandbox", c.run_pod_sandbox(req))
            .map(|r| r.pod_sandbox_id)
            .map_err(|e| format!("{e}\n{}", self.log()))
    }

    /// The pod's IP address (CNI).
    pub fn pod_ip(&self, pod_id: &str) -> Result<String, String> {
        let mut c = self.client.clone();
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_string(),
            verbose: false,
        };
        let r = self.rpc("PodSandboxStatus", c.pod_sandbox_status(req))?;
        Ok(r.status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default())
    }

    /// CreateContainer of the agent image running `args` (after the
    /// image's `python3 -I -S -B`), with `host_dir` mounted at `/out`.
    /// Its id; its output goes to `<log dir>/<name>_<attempt>.log` (CRI log
    /// format).
    pub fn create_container(
        &self,
        pod_id: &str,
        pod: &PodSpec,
        name: &str,
        attempt: u32,
        args: &[&str],
        host_dir: &Path,
    ) -> Result<String, String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: AGENT_IMAGE.to_string(),
                ..Default::default()
            }),
            args: args.iter().map(|s| s.to_string()).collect(),
            working_dir: "/agents".into(),
            mounts: vec![Mount {
                container_path: "/out".into(),
                host_path: host_dir.display().to_string(),
                ..Default::default()
            }],
            log_path: format!("{name}_{attempt}.log"),
            ..Default::default()
        };
        let mut c = self.client.clone();
        let req = CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config),
            sandbox_config: Some(self.sandbox_config(pod)),
        };
        self.rpc("CreateContainer", c.create_container(req))
            .map(|r| r.container_id)
            .map_err(|e| format!("{e}\n{}", self.log()))
    }

    pub fn start_container(&self, id: &str) -> Result<(), String> {
        let mut c = self.client.clone();
        let req = StartContainerRequest {
            container_id: id.to_string(),
        };
        self.rpc("StartContainer", c.start_container(req))
            .map(|_| ())
            .map_err(|e| format!("{e}\n{}", self.log()))
    }

    /// The container's state (`ContainerState` as i32: 0 created, 1
    /// running, 2 exited, 3 unknown) and exit code.
    pub fn container_state(&self, id: &str) -> Result<(i32, i32), String> {
        let mut c = self.client.clone();
        let req = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        let s = self
            .rpc("ContainerStatus", c.container_status(req))?
            .status
            .ok_or("ContainerStatus: no status")?;
        Ok((s.state, s.exit_code))
    }

    /// Wait for the container to exit; its exit code.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> Option<i32> {
        let mut code = None;
        poll_until(timeout, Duration::from_millis(250), || {
            match self.container_state(id) {
                Ok((2, c)) => {
                    code = Some(c);
                    true
                }
                _ => false,
            }
        });
        code
    }

    /// StopContainer + RemoveContainer.
    pub fn remove_container(&self, id: &str) -> Result<(), String> {
        let mut c = self.client.clone();
        let _ = self.rpc(
            "StopContainer",
            c.stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout: 0,
            }),
        );
        let req = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.rpc("RemoveContainer", c.remove_container(req))
            .map(|_| ())
    }

    /// StopPodSandbox + RemovePodSandbox (its containers go with it).
    pub fn remove_pod(&self, id: &str) -> Result<(), String> {
        let mut c = self.client.clone();
        let _ = self.rpc(
            "StopPodSandbox",
            c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            }),
        );
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.rpc("RemovePodSandbox", c.remove_pod_sandbox(req))
            .map(|_| ())
    }

    /// The container's output (the message part of each CRI log line).
    pub fn container_output(&self, pod: &PodSpec, name: &str, attempt: u32) -> String {
        let path = self
            .dir
            .join("pods")
            .join(&pod.uid)
            .join(format!("{name}_{attempt}.log"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            // "<time> <stream> <P|F> <message>"
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The pod's cgroup (absolute).
pub fn pod_cgroup(pod: &PodSpec) -> PathBuf {
    crate::cgroup2_mount().join(pod.cgroup_parent.trim_start_matches('/'))
}

/// The pod's slice (the systemd driver's cgroup parent's last part).
fn slice_of(pod: &PodSpec) -> String {
    Path::new(&pod.cgroup_parent)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let mut c = self.client.clone();
        if let Ok(r) = self.rpc(
            "ListPodSandbox",
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        ) {
            for p in r.items {
                let _ = self.remove_pod(&p.id);
            }
        }
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGTERM) };
        let gone = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !gone {
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
        // The shims (containerd-shim-runc-v2) outlive containerd: they go
        // with their sandboxes above; any left are killed here.
        let _ = Command::new("pkill")
            .args([
                "-9",
                "-f",
                &format!("containerd-shim-runc-v2 .*{}", self.dir.display()),
            ])
            .status();
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
    }
}
