//! A real container runtime for the tests: Debian's `containerd` and `runc`
//! with the CNI bridge plugin, driven through the CRI API (gRPC over
//! containerd's socket, the `k8s-cri` crate) the way the kubelet drives it:
//! RunPodSandbox with the kubelet's `cgroup_parent`, CreateContainer,
//! StartContainer, StopContainer, RemoveContainer, StopPodSandbox,
//! RemovePodSandbox.
//!
//! containerd runs with a configuration of its own (only what the tests
//! need: the CRI plugin, runc with the cgroupfs driver, the overlayfs
//! snapshotter, CNI from `/usr/lib/cni`) and keeps its root and state on a
//! tmpfs mounted for it (overlayfs cannot stack on the VM runner's 9p root).
//! runc's state (`/run/containerd/runc`), the shims' sockets
//! (`/run/containerd/s`) and the pods' network namespaces (`/var/run/netns`)
//! stay at containerd's fixed paths: private to the VM's guest, but shared
//! with a system containerd if this ran on a host that has one (it is
//! `#[ignore]`d there).
//! Images come from `cargo xtask pod-images` (no registry is reachable):
//! `$ENFORCER_POD_IMAGES/{pause,agent}.oci.tar`, imported with `ctr`.
use std::{
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

/// containerd, started for one test and stopped (with every pod it made)
/// on drop.
pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    child: Child,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
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
    /// Start containerd and import the pod images. Errors say what is
    /// missing (the packages come from `scripts/setup-vm.sh`).
    pub fn start(name: &str) -> Result<Self, String> {
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
        let spawned = (|| -> Result<Child, String> {
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
            SystemdCgroup = false
      [plugins."io.containerd.grpc.v1.cri".cni]
        bin_dir = "/usr/lib/cni"
        conf_dir = "{cni}"
    "#,
                    root = dir.join("root").display(),
                    state = dir.join("state").display(),
                    sock = sock.display(),
                    cni = cni_conf.display(),
                ),
            )
            .map_err(|e| e.to_string())?;
            let log =
                std::fs::File::create(dir.join("containerd.log")).map_err(|e| e.to_string())?;
            let child = Command::new("containerd")
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("starting containerd: {e}"))?;
            Ok(child)
        })();
        let child = match spawned {
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
            child,
            rt,
            client: placeholder,
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
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let gone = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !gone {
            let _ = self.child.kill();
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
