//! Pods made by a real container runtime: containerd + runc (Debian's),
//! driven through the CRI API the way the kubelet drives it
//! (`enforcer_tests::cri`), with the daemon in Kubernetes mode against the
//! fake API server (`enforcer_tests::fake_api`: no API server can run on
//! these machines) whose pod objects carry the pod UID, cgroup parent and
//! container IDs containerd reported.
//!
//! The pod has an init container and an app container (both the agent
//! image), each enforced from its first instruction.
//!
//! `#[ignore]`d on the host (no containerd there); `cargo xtask test` runs
//! it in the VM runner, where containerd keeps its state on a tmpfs.
use std::{path::Path, time::Duration};

use enforcer_tests::{
    cri::{pod_cgroup, CgroupDriver, Containerd, PodSpec, POD_GATEWAY},
    dns_server::DnsServer,
    fake_api::{FakeApi, Res},
    *,
};
use serde_json::{json, Value};

/// The agent container's program (`python3 -I -S -B -c AGENT GW ALLOWED
/// DENIED SITE`): its first instruction after the imports connects to a
/// denied port (then it says so in `/out/first`); then the allowed one;
/// then, once the test says go
/// (`/out/go`), the denied one again; then it resolves `allowed.example.com`
/// with glibc (the pod's resolv.conf names the gateway) and connects to the
/// answer's SITE port, and resolves `denied.example.com`. One JSON line on
/// stdout.
const AGENT: &str = r#"
import json, os, socket, sys, time
gw, allowed, denied = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def tcp(port, data):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((gw, port))
        s.sendall(data)
        return "ok"
    except OSError as e:
        return e.errno
    finally:
        s.close()
first = tcp(denied, b"exfil-first")
open("/out/first", "w").close()
ok = tcp(allowed, b"from-the-pod")
for _ in range(1200):
    if os.path.exists("/out/go"):
        break
    time.sleep(0.1)
second = tcp(denied, b"exfil-second")
def resolve(name):
    try:
        return socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        return "gaierror %d" % e.errno
site = resolve("allowed.example.com")
gw = site if not site.startswith("gaierror") else gw
via_dns = tcp(int(sys.argv[4]), b"via-dns")
refused = resolve("denied.example.com")
print(json.dumps({"first": first, "allowed": ok, "second": second, "site": site,
                  "via_dns": via_dns, "refused": refused}), flush=True)
"#;

/// A container the kubelet reported: init container or not, name, ID,
/// restart count.
type Announced = (bool, String, String, u32);

/// The pod object the API server would hold, with the containers the
/// kubelet reported so far (an init container as terminated, app
/// containers as running).
fn pod_object(pod: &PodSpec, known: &[Announced], rv: u32) -> Value {
    let status = |(init, name, id, restarts): &Announced| {
        json!({"name": name, "image": "enforcer-agent:1", "imageID": "", "ready": !init,
               "restartCount": restarts, "containerID": format!("containerd://{id}"),
               "state": if *init { json!({"terminated": {"exitCode": 0}}) }
                        else { json!({"running": {}}) }})
    };
    let init: Vec<Value> = known.iter().filter(|k| k.0).map(status).collect();
    let app: Vec<Value> = known.iter().filter(|k| !k.0).map(status).collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                     "resourceVersion": rv.to_string(), "labels": {"app": "research"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "research",
                 "initContainers": [{"name": "init", "image": "enforcer-agent:1"}],
                 "containers": [{"name": "agent", "image": "enforcer-agent:1"}]},
        "status": {"phase": if app.is_empty() { "Pending" } else { "Running" },
                   "qosClass": "BestEffort", "initContainerStatuses": init,
                   "containerStatuses": app}
    })
}

/// `secs` at native speed, stretched under emulation (the VM runner).
fn wait(secs: u64) -> Duration {
    Duration::from_secs(secs * u64::from(slowdown()))
}

/// A pod in namespace `agents` whose cgroup parent is in the kubelet's
/// layout for `cri`'s driver (cgroupfs: under `kubelet_root`); `n` tells
/// pods of a test apart.
fn pod_spec(cri: &Containerd, kubelet_root: Option<&Path>, name: &str, n: u32) -> PodSpec {
    let uid = format!(
        "{:08x}-5d2c-4f0e-8a11-7e3c2b1d0f{n:02x}",
        std::process::id()
    );
    PodSpec {
        name: name.into(),
        namespace: "agents".into(),
        cgroup_parent: cri.driver.pod_cgroup_parent(kubelet_root, &uid),
        uid,
        dns_servers: vec![POD_GATEWAY.into()],
    }
}

/// The daemon in Kubernetes mode (node `node-a`) against `fake`, with the
/// kubelet's cgroup root `kubelet_root` (none: the default); not started.
fn kubernetes_daemon(
    dir: &TestDir,
    pins: &PinDir,
    fake: &FakeApi,
    kubelet_root: Option<&Path>,
) -> Daemon {
    let d = Daemon::configure(dir, pins, &[]);
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let root = kubelet_root
        .map(|r| format!("  kubeletCgroupRoot: {}\n", r.display()))
        .unwrap_or_default();
    write_atomic(
        &d.config,
        &format!(
            "{cfg}kubernetes:\n  nodeName: node-a\n  trustDomain: example.org\n  apiServer: http://{}\n{root}",
            fake.addr,
        ),
    );
    d
}

fn set_pod(fake: &FakeApi, obj: &Value, kind: &str) {
    *fake.pods.lock().unwrap() = if kind == "DELETED" {
        vec![]
    } else {
        vec![obj.clone()]
    };
    fake.event(Res::Pods, kind, obj);
}

fn research_pods(d: &Daemon) -> Vec<Value> {
    d.identity("research")
        .and_then(|i| i["pods"].as_array().cloned())
        .unwrap_or_default()
}

/// The agent's JSON line from the container's log.
fn agent_result(cri: &Containerd, pod: &PodSpec, name: &str, attempt: u32) -> Value {
    let out = cri.container_output(pod, name, attempt);
    out.lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no result from container {name} (attempt {attempt}):\n{out}"))
}

/// Run one container of the agent image (`name`, attempt `attempt`; an
/// init container if `init`) to its end: created and started through CRI,
/// announced in the pod object (`known`) once it made its first connect,
/// told to go on once the daemon lists it. Its ID, result line, and the
/// daemon's pods while it ran.
#[allow(clippy::too_many_arguments)]
fn run_agent(
    cri: &mut Containerd,
    fake: &FakeApi,
    d: &Daemon,
    (pod_id, pod): (&str, &PodSpec),
    (name, init, attempt): (&str, bool, u32),
    known: &mut Vec<Announced>,
    ports: (u16, u16, u16),
    out: &Path,
) -> (String, Value, Vec<Value>) {
    let _ = std::fs::remove_file(out.join("go"));
    let _ = std::fs::remove_file(out.join("first"));
    let (allowed, denied, site) = (
        ports.0.to_string(),
        ports.1.to_string(),
        ports.2.to_string(),
    );
    let cid = cri
        .create_container(
            pod_id,
            pod,
            name,
            attempt,
            &["-c", AGENT, POD_GATEWAY, &allowed, &denied, &site],
            out,
        )
        .unwrap();
    cri.start_container(&cid).unwrap();
    // The kubelet reports the container once it runs; here only after its
    // first connect, so that the daemon cannot have known the container
    // (its ID, its cgroup's events) then: the pod cgroup's binding alone
    // judged it.
    assert!(
        poll_until(wait(120), Duration::from_millis(100), || out
            .join("first")
            .exists()),
        "container {name} did not make its first connect:\n{}\n{}",
        cri.container_output(pod, name, attempt),
        cri.log()
    );
    known.retain(|k| k.1 != name);
    known.push((init, name.to_string(), cid.clone(), attempt));
    let rv = 100 + 10 * known.len() as u32 + attempt;
    set_pod(fake, &pod_object(pod, known, rv), "MODIFIED");
    let mut pods = Vec::new();
    let cgroup = cri.container_cgroup(pod, &cid).display().to_string();
    let listed = poll_until(wait(30), Duration::from_millis(200), || {
        pods = research_pods(d);
        pods.iter().any(|p| {
            p["containers"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["cgroup"] == cgroup))
        })
    });
    assert!(
        listed,
        "the daemon does not list container {cid}: {:#}\n{}",
        d.status(),
        d.stderr()
    );
    std::fs::write(out.join("go"), "go").unwrap();
    let code = cri.wait_exited(&cid, wait(120));
    assert_eq!(
        code,
        Some(0),
        "container {name} did not finish well:\n{}\n{}",
        cri.container_output(pod, name, attempt),
        cri.log()
    );
    (cid, agent_result(cri, pod, name, attempt), pods)
}

#[test]
#[ignore = "needs containerd and runc: runs in the VM runner (cargo xtask test)"]
fn pods_made_by_containerd_are_enforced_from_their_first_instruction() {
    if !require_root("pods_made_by_containerd_are_enforced_from_their_first_instruction") {
        return;
    }
    pods_enforced_from_their_first_instruction(CgroupDriver::Cgroupfs);
}

/// The same with the systemd cgroup driver (most nodes' kubelet default):
/// the pod is a slice and each container a `cri-containerd-<id>.scope`
/// that runc asks systemd for (`enforcer_tests::cri::Systemd`). `cargo
/// xtask vm-matrix --suite cri` runs it; CI's boot skips it for time (the
/// systemd file test covers the layout there).
#[test]
#[ignore = "needs containerd, runc and systemd: runs in the VM runner (cargo xtask vm-matrix)"]
fn pods_under_the_systemd_cgroup_driver_are_enforced_from_their_first_instruction() {
    if !require_root(
        "pods_under_the_systemd_cgroup_driver_are_enforced_from_their_first_instruction",
    ) {
        return;
    }
    pods_enforced_from_their_first_instruction(CgroupDriver::Systemd);
}

fn pods_enforced_from_their_first_instruction(driver: CgroupDriver) {
    let _serial = serial();
    let mut cri = Containerd::start("cri", driver).unwrap_or_else(|e| panic!("containerd: {e}"));
    let prefix = Cgroup::create("cri");
    let pins = PinDir::new("cri");
    let dir = TestDir::new("cri");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();

    // The kubelet's cgroupfs layout under the test prefix; systemd's slices
    // are where a node has them (the kubelet's default cgroup root).
    let kubelet_root = Path::new("/").join(prefix.relative());
    let kubelet_root = (driver == CgroupDriver::Cgroupfs).then_some(kubelet_root.as_path());
    let pod = pod_spec(&cri, kubelet_root, "research-0", 0x9a);
    let pod_dir = pod_cgroup(&pod);
    // The API server has the pod (scheduled to this node) before the
    // kubelet makes its sandbox.
    let fake = FakeApi::start(vec![pod_object(&pod, &[], 90)]);

    let mut d = kubernetes_daemon(&dir, &pins, &fake, kubelet_root);
    if let Some(s) = cri.systemd() {
        d.launcher = s.daemon_launcher();
    }
    // Listeners on every address (the pods reach the node at their
    // gateway, the bridge that appears with the first pod): the policy
    // allows one port of the gateway.
    let any = "0.0.0.0:0".parse().unwrap();
    let api = TcpSink::bind(any).unwrap();
    let outside = TcpSink::bind(any).unwrap();
    let site = TcpSink::bind(any).unwrap();
    // The cluster's DNS, reached from the daemon's namespace (the
    // DaemonSet's); the pod's resolv.conf names its gateway, which the
    // kernel steers to the identity's proxy inside the pod's namespace.
    let dns = DnsServer::start_on("127.0.0.53".parse().unwrap());
    dns.add_addrs("allowed.example.com", &[POD_GATEWAY])
        .add_addrs("denied.example.com", &[POD_GATEWAY]);
    write_atomic(
        &d.policies.join("research.yaml"),
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: research\n\
             spec:\n  identity:\n    kubernetes:\n      namespace: agents\n      serviceAccount: \
             research\n      podSelector:\n        matchLabels: {{app: research}}\n  egress:\n    \
             - cidr: {POD_GATEWAY}/32\n      ports: [{}]\n      protocol: tcp\n    \
             - host: allowed.example.com\n      ports: [{}]\n      protocol: tcp\n      \
             inspect: none\n  dns:\n    upstream: [\"{}\"]\n",
            api.port(),
            site.port(),
            dns.upstream()
        ),
    );
    d.start();

    // The kubelet: QoS and pod cgroups, then RunPodSandbox.
    cri.make_pod_cgroup(&pod).unwrap();
    let pod_id = cri.run_pod(&pod).unwrap();
    let ip = cri.pod_ip(&pod_id).unwrap();
    assert!(
        ip.starts_with("10.89.0."),
        "the pod has no address on the CNI bridge: {ip:?}"
    );
    // The daemon binds the pod's cgroup (made by the kubelet, holding
    // containerd's sandbox) before any app container starts.
    assert!(
        poll_until(wait(60), Duration::from_millis(200), || {
            research_pods(&d)
                .first()
                .is_some_and(|p| p["cgroup"] == pod_dir.display().to_string())
        }),
        "pod not bound: {:#}\n{}",
        d.status(),
        d.stderr()
    );

    let ports = (api.port(), outside.port(), site.port());
    let mut known = Vec::new();
    // The init container runs to its end first, enforced the same way.
    let (_, r, pods) = run_agent(
        &mut cri,
        &fake,
        &d,
        (&pod_id, &pod),
        ("init", true, 0),
        &mut known,
        ports,
        &out,
    );
    assert_eq!(r["first"], libc::EPERM, "init, first instruction: {r}");
    assert_eq!(r["allowed"], "ok", "init, allowed: {r}");
    assert_eq!(r["second"], libc::EPERM, "init, later: {r}");
    assert!(
        pods[0]["containers"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == "init")),
        "the init container is not listed by name: {pods:#?}"
    );

    let (cid, r, pods) = run_agent(
        &mut cri,
        &fake,
        &d,
        (&pod_id, &pod),
        ("agent", false, 0),
        &mut known,
        ports,
        &out,
    );
    assert_eq!(r["first"], libc::EPERM, "first instruction: {r}");
    assert_eq!(r["allowed"], "ok", "allowed: {r}");
    assert_eq!(r["second"], libc::EPERM, "later: {r}");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || api.text().contains("from-the-pod")
    ));
    // DNS through the identity's proxy in the pod's own namespace.
    assert_eq!(
        r["site"],
        POD_GATEWAY,
        "glibc's answer: {r}\n{}",
        dns.describe()
    );
    assert_eq!(r["via_dns"], "ok", "the answer opens: {r}");
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || site.text().contains("via-dns")
    ));
    assert!(
        r["refused"]
            .as_str()
            .is_some_and(|e| e.starts_with("gaierror")),
        "a name outside the policy resolves: {r}"
    );
    assert!(dns.count("allowed.example.com") >= 1, "{}", dns.describe());
    assert_eq!(dns.count("denied.example.com"), 0, "{}", dns.describe());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(outside.bytes() + outside.conns(), 0, "zero bytes out");

    // Status (while the container ran), audit and metrics carry the real
    // IDs.
    assert_eq!(pods[0]["namespace"], "agents", "{pods:#?}");
    assert_eq!(pods[0]["name"], "research-0");
    assert_eq!(
        pods[0]["spiffe_id"],
        "spiffe://example.org/ns/agents/sa/research"
    );
    let agent = pods[0]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "agent"))
        .unwrap_or_else(|| panic!("no container agent: {pods:#?}"));
    assert_eq!(
        agent["cgroup"],
        cri.container_cgroup(&pod, &cid).display().to_string(),
        "containerd's layout: <cgroup_parent>/<container id> (cgroupfs), \
         <pod slice>/cri-containerd-<container id>.scope (systemd)"
    );
    let labelled = |recs: &[Value], container: &str| {
        recs.iter().any(|r| {
            r["action"] == "connect"
                && r["verdict"] == "deny"
                && r["identity"]["spiffe_id"] == "spiffe://example.org/ns/agents/sa/research"
                && r["namespace"] == "agents"
                && r["pod"] == "research-0"
                && r["container"] == container
        })
    };
    for container in ["init", "agent"] {
        assert!(
            poll_until(wait(15), Duration::from_millis(200), || {
                labelled(&read_jsonl(&d.audit), container)
            }),
            "no denial names namespace/pod/container {container}: {:#?}",
            read_jsonl(&d.audit)
        );
    }
    let m = d.scrape();
    assert!(
        metric(
            &m,
            "enforcer_pod_events_total",
            &[
                ("namespace", "agents"),
                ("pod", "research-0"),
                ("container", "agent"),
                ("action", "connect"),
                ("verdict", "deny"),
            ]
        )
        .is_some_and(|v| v >= 1.0),
        "no pod-labelled denial metric:\n{m}"
    );

    // A restarted container (new ID, restart count 1) is enforced too.
    cri.remove_container(&cid).unwrap();
    let (cid2, r, _) = run_agent(
        &mut cri,
        &fake,
        &d,
        (&pod_id, &pod),
        ("agent", false, 1),
        &mut known,
        ports,
        &out,
    );
    assert_ne!(cid, cid2);
    assert_eq!(r["first"], libc::EPERM, "restarted, first instruction: {r}");
    assert_eq!(r["allowed"], "ok", "restarted, allowed: {r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outside.bytes() + outside.conns(),
        0,
        "zero bytes out after the restart"
    );

    // The pod is deleted: containerd removes the sandbox, the kubelet its
    // cgroup, the API server the object; the daemon lets go of it.
    cri.remove_pod(&pod_id).unwrap();
    assert!(
        poll_until(wait(30), Duration::from_millis(200), || {
            cri.remove_pod_cgroup(&pod)
        }),
        "the pod cgroup is still there (containerd left a cgroup in it?)"
    );
    set_pod(&fake, &pod_object(&pod, &[], 200), "DELETED");
    assert!(
        poll_until(wait(30), Duration::from_millis(200), || {
            d.identity("research")
                .is_some_and(|i| i["pods"].as_array().is_some_and(|p| p.is_empty()))
        }),
        "a deleted pod is still listed: {:#}",
        d.status()
    );
}

/// The file-policy container's program (`python3 -I -S -B -c FILES_AGENT
/// GW ALLOWED ON_TAINT TAG`): its first statement reads `/secret/token`
/// (then it says so in `/out/first`); once the test says go (`/out/go`)
/// it tries the other ways to that inode through `file_agent.py` (a child
/// process: started in a resolved container, not held), connects to the
/// allowed port, reads the taint file, connects to the allowed port again
/// (sending TAG) and to the onTaint port. One JSON line on stdout; then,
/// for each further argument STEP, once `/out/STEP` exists: `decoy` moves
/// `/out/vault` (a volume's protected file's directory) aside and plants a
/// decoy at the rule path `/out/vault/token`; any other STEP reads the
/// moved token; each prints `{STEP: result, STEP_image: /secret/token}`.
const FILES_AGENT: &str = r#"
import json, os, socket, subprocess, sys, time
def read(p):
    try:
        with open(p, "rb") as f:
            return f.read().decode()
    except OSError as e:
        return e.errno
first = read("/secret/token")
open("/out/first", "w").close()
gw, allowed, on_taint, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def tcp(port, data):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((gw, port))
        s.sendall(data)
        return "ok"
    except OSError as e:
        return e.errno
    finally:
        s.close()
for _ in range(1200):
    if os.path.exists("/out/go"):
        break
    time.sleep(0.1)
ways = subprocess.run([sys.executable, "-I", "-S", "-B", "/agents/file_agent.py", "--json",
    "open=/etc/agent/token", "open=/secret/token", "symlink=/secret/token,/tmp/l",
    "hardlink=/secret/token,/tmp/h", "procroot=/secret/token", "procfd=/secret/token",
    "relative=/secret,token", "rename=/secret/token,/tmp/moved", "iouring=/secret/token"],
    capture_output=True, text=True)
try:
    ways = json.loads(ways.stdout)
except ValueError:
    ways = {"stdout": ways.stdout, "stderr": ways.stderr}
before = tcp(allowed, b"before-taint-" + tag.encode())
taint = read("/secret/taint")
after = tcp(allowed, b"after-taint-" + tag.encode())
print(json.dumps({"first": first, "ways": ways, "before": before, "taint": taint,
                  "after": after, "on_taint": tcp(on_taint, b"on-taint-" + tag.encode())}),
      flush=True)
for step in sys.argv[5:]:
    for _ in range(3000):
        if os.path.exists("/out/" + step):
            break
        time.sleep(0.1)
    if step == "decoy":
        # Move the protected file's (unprotected) directory aside and plant
        # a decoy at the rule path, for the daemon to resolve next time.
        try:
            os.rename("/out/vault", "/out/vault-moved")
            os.mkdir("/out/vault")
            with open("/out/vault/token", "w") as f:
                f.write("decoy")
            result = "ok"
        except OSError as e:
            result = e.errno
    else:
        result = read("/out/vault-moved/token")
    print(json.dumps({step: result, step + "_image": read("/secret/token")}), flush=True)
"#;

/// The daemon's status entry of container `agent` of `app`'s first pod
/// (null if it lists none).
fn agent_entry(d: &Daemon, app: &str) -> Value {
    d.identity(app)
        .and_then(|i| i["pods"][0]["containers"].as_array().cloned())
        .and_then(|cs| cs.into_iter().find(|c| c["name"] == "agent"))
        .unwrap_or(Value::Null)
}

/// A pod object of `app` (service account `app`) with its running app
/// containers `(name, id)`.
fn app_pod(pod: &PodSpec, app: &str, running: &[(&str, &str)], rv: u32) -> Value {
    let statuses: Vec<Value> = running
        .iter()
        .map(|(name, id)| {
            json!({"name": name, "image": "enforcer-agent:1", "imageID": "", "ready": true,
                   "restartCount": 0, "containerID": format!("containerd://{id}"),
                   "state": {"running": {}}})
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                     "resourceVersion": rv.to_string(), "labels": {"app": app}},
        "spec": {"nodeName": "node-a", "serviceAccountName": app,
                 "containers": [{"name": "agent", "image": "enforcer-agent:1"}]},
        "status": {"phase": if running.is_empty() { "Pending" } else { "Running" },
                   "qosClass": "BestEffort", "containerStatuses": statuses}
    })
}

/// The processes under a cgroup, with their state and root (diagnostics).
fn cgroup_processes(dir: &Path) -> String {
    let mut out = String::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for pid in std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap_or_default();
            out += &format!(
                "\n  {} {pid} {stat:.60} root {}",
                d.display(),
                root.display()
            );
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            dirs.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
        }
    }
    out
}

fn set_pods(fake: &FakeApi, objs: &[Value]) {
    *fake.pods.lock().unwrap() = objs.to_vec();
    for o in objs {
        fake.event(Res::Pods, "MODIFIED", o);
    }
}

/// `files:` of a policy that selects pods name paths inside its
/// containers: they are resolved in each container's root (an absolute
/// symlink of the image resolves inside it), before the container's first
/// instruction, and enforced by the BPF LSM hooks; another pod of the same
/// image under another policy reads the same file.
#[test]
#[ignore = "needs containerd, runc and BPF LSM: runs in the VM runner (cargo xtask test)"]
fn file_rules_of_pods_resolve_in_their_containers() {
    if !require_root("file_rules_of_pods_resolve_in_their_containers") {
        return;
    }
    file_rules_resolve_in_containers(CgroupDriver::Cgroupfs);
}

/// The same with the systemd cgroup driver (containers in scopes that
/// systemd makes), and the daemon where a DaemonSet's pod runs: in the
/// node's PID namespace (systemd's, not the kernel's initial one here) and
/// a mount namespace of its own. (A daemon outside the initial PID
/// namespace once went unrecognized as the resolver by the hooks: the
/// volume file's inode was never recorded.)
#[test]
#[ignore = "needs containerd, runc, systemd and BPF LSM: runs in the VM runner (cargo xtask test)"]
fn file_rules_of_pods_resolve_under_the_systemd_cgroup_driver() {
    if !require_root("file_rules_of_pods_resolve_under_the_systemd_cgroup_driver") {
        return;
    }
    file_rules_resolve_in_containers(CgroupDriver::Systemd);
}

fn file_rules_resolve_in_containers(driver: CgroupDriver) {
    let _serial = serial();
    let cri = Containerd::start("crif", driver).unwrap_or_else(|e| panic!("containerd: {e}"));
    let prefix = Cgroup::create("crif");
    let pins = PinDir::new("crif");
    let dir = TestDir::new("crif");
    let kubelet_root = Path::new("/").join(prefix.relative());
    let kubelet_root = (driver == CgroupDriver::Cgroupfs).then_some(kubelet_root.as_path());
    let (research, other) = (
        pod_spec(&cri, kubelet_root, "research-f", 1),
        pod_spec(&cri, kubelet_root, "other-f", 2),
    );
    let started = std::time::Instant::now();
    let mut phases: Vec<(String, u64)> = Vec::new();
    let mut phase = |what: &str| phases.push((what.to_string(), started.elapsed().as_secs()));
    let fake = FakeApi::start(vec![
        app_pod(&research, "research", &[], 90),
        app_pod(&other, "other", &[], 90),
    ]);
    let mut d = kubernetes_daemon(&dir, &pins, &fake, kubelet_root);
    if let Some(s) = cri.systemd() {
        d.launcher = s.daemon_launcher();
    }
    let any = "0.0.0.0:0".parse().unwrap();
    let allowed = TcpSink::bind(any).unwrap();
    let on_taint = TcpSink::bind(any).unwrap();
    let policy = |app: &str, files: &str| {
        format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {app}\n\
             spec:\n  identity:\n    kubernetes:\n      namespace: agents\n      podSelector:\n        \
             matchLabels: {{app: {app}}}\n  egress:\n    - cidr: {POD_GATEWAY}/32\n      ports: [{}]\n      \
             protocol: tcp\n  files:\n{files}  onTaint:\n    egress:\n      - cidr: {POD_GATEWAY}/32\n        \
             ports: [{}]\n        protocol: tcp\n",
            allowed.port(),
            on_taint.port()
        )
    };
    // research: the token through the image's absolute symlink /etc/agent
    // -> /secret (resolved in the container's root, it is /secret/token of
    // the container; in the daemon's root it is nothing), and the taint
    // file. other: a rule of its own, nothing on /secret.
    write_atomic(
        &d.policies.join("research.yaml"),
        &policy(
            "research",
            "    - path: /etc/agent/token\n      access: deny\n    - path: /secret/taint\n      \
             access: taint\n    - path: /out/vault/token\n      access: deny\n",
        ),
    );
    write_atomic(
        &d.policies.join("other.yaml"),
        &policy(
            "other",
            "    - path: /etc/shadow-of-other\n      access: deny\n",
        ),
    );
    d.start();
    phase("daemon started");
    let st = d.status();
    for name in ["research", "other"] {
        assert!(
            d.identity(name).is_some(),
            "policy {name} not loaded (pods with files: are enforced now): {st:#}\n{}",
            d.stderr()
        );
    }

    let out_dir = |name: &str| {
        let o = dir.join(name);
        std::fs::create_dir_all(&o).unwrap();
        o
    };
    let mut objects = vec![
        app_pod(&research, "research", &[], 91),
        app_pod(&other, "other", &[], 91),
    ];
    let mut results = Vec::new();
    for (i, (pod, app)) in [(&research, "research"), (&other, "other")]
        .into_iter()
        .enumerate()
    {
        let pod_dir = pod_cgroup(pod);
        cri.make_pod_cgroup(pod).unwrap();
        phase(&format!("{app}: sandbox"));
        let pod_id = cri.run_pod(pod).unwrap_or_else(|e| {
            panic!(
                "RunPodSandbox for {app}: {}\nprocesses: {}\ndaemon: {}",
                e.lines().next().unwrap_or(""),
                cgroup_processes(&pod_dir),
                d.stderr()
            )
        });
        assert!(
            poll_until(wait(60), Duration::from_millis(200), || {
                d.identity(app)
                    .and_then(|i| i["pods"].as_array().cloned())
                    .is_some_and(|p| {
                        p.first()
                            .is_some_and(|p| p["cgroup"] == pod_dir.display().to_string())
                    })
            }),
            "pod {app} not bound: {:#}\n{}",
            d.status(),
            d.stderr()
        );
        let out = out_dir(app);
        // A file of a volume (the host directory mounted at /out).
        std::fs::create_dir_all(out.join("vault")).unwrap();
        std::fs::write(out.join("vault/token"), "volume-secret").unwrap();
        let args = [
            "-c",
            FILES_AGENT,
            POD_GATEWAY,
            &allowed.port().to_string(),
            &on_taint.port().to_string(),
            app,
            if app == "research" { "decoy" } else { "" },
            if app == "research" { "ticked" } else { "" },
            if app == "research" { "restarted" } else { "" },
            if app == "research" { "updated" } else { "" },
        ]
        .map(|s| s.to_string());
        let args: Vec<&String> = args.iter().filter(|a| !a.is_empty()).collect();
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let cid = cri
            .create_container(&pod_id, pod, "agent", 0, &args, &out)
            .unwrap();
        cri.start_container(&cid).unwrap();
        phase(&format!("{app}: started"));
        assert!(
            poll_until(wait(120), Duration::from_millis(100), || out
                .join("first")
                .exists()),
            "container of {app} did not start:\n{}\n{}\n{}",
            cri.container_output(pod, "agent", 0),
            cri.log(),
            d.stderr()
        );
        // Announced once it ran its first statement (the kubelet's report
        // comes later too); then the rest, labelled with its name.
        objects[i] = app_pod(pod, app, &[("agent", &cid)], 100 + i as u32);
        set_pods(&fake, &objects);
        let mut listed = Value::Null;
        let cgroup = cri.container_cgroup(pod, &cid).display().to_string();
        assert!(
            poll_until(wait(30), Duration::from_millis(200), || {
                listed = agent_entry(&d, app);
                listed["cgroup"] == cgroup
            }),
            "the daemon does not list the container of {app}: {:#}",
            d.status()
        );
        std::fs::write(out.join("go"), "go").unwrap();
        if app == "research" {
            // While the container runs: the daemon is killed and started
            // again (it finds the container through the pinned FILE_READY
            // and its recorded mount namespace, and resolves it before it
            // installs the policy), then the policy changes (the container
            // is resolved again for the new version). Its token stays
            // refused through both.
            let line = |key: &str| {
                cri.container_output(pod, "agent", 0)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|v| !v[key].is_null())
            };
            // Tell the agent to take step `key`; wait for its line.
            let step = |key: &str| {
                std::fs::write(out.join(key), "").unwrap();
                assert!(poll_until(wait(60), Duration::from_millis(200), || line(
                    key
                )
                .is_some()));
            };
            assert!(
                poll_until(wait(120), Duration::from_millis(200), || line("ways")
                    .is_some()),
                "no first result from research:\n{}",
                cri.container_output(pod, "agent", 0)
            );
            // The agent moves the volume's protected file aside and plants
            // a decoy where the rule points: the daemon resolving again
            // must not drop the real file's inode.
            std::fs::write(out.join("decoy"), "").unwrap();
            assert!(
                poll_until(wait(60), Duration::from_millis(200), || line("decoy")
                    .is_some()),
                "{}",
                cri.container_output(pod, "agent", 0)
            );
            phase("decoy planted");
            // The next resync resolves the rule path again and adds the
            // decoy's inode (the container's count grows); the moved file
            // stays refused.
            let before = listed["file_inodes"].as_u64().unwrap_or(0);
            assert!(
                poll_until(wait(30), Duration::from_millis(200), || {
                    agent_entry(&d, app)["file_inodes"].as_u64().unwrap_or(0) > before
                }),
                "no resync added the decoy's inode ({before} inodes): {:#}",
                d.status()
            );
            step("ticked");
            phase("resynced");
            d.kill9();
            // A container started while no daemon runs: its program is held
            // (stopped) before its first instruction, until a daemon has
            // resolved the container.
            let held_out = out_dir("research-held");
            let held_args = [
                "-c",
                FILES_AGENT,
                POD_GATEWAY,
                &allowed.port().to_string(),
                &on_taint.port().to_string(),
                "held",
            ]
            .map(|s| s.to_string());
            let held_args: Vec<&str> = held_args.iter().map(|s| s.as_str()).collect();
            let held = cri
                .create_container(&pod_id, pod, "held", 0, &held_args, &held_out)
                .unwrap();
            cri.start_container(&held).unwrap();
            let held_dir = cri.container_cgroup(pod, &held);
            assert!(
                poll_until(wait(30), Duration::from_millis(200), || {
                    cgroup_processes(&held_dir).contains(") T ")
                }),
                "the program of a container started without a daemon is not held: {}",
                cgroup_processes(&held_dir)
            );
            std::thread::sleep(wait(3));
            assert!(
                !held_out.join("first").exists(),
                "a container started while no daemon runs ran its first statement"
            );
            d.start();
            phase("daemon restarted");
            assert!(
                poll_until(wait(60), Duration::from_millis(200), || held_out
                    .join("first")
                    .exists()),
                "the held container was not resumed: {}\n{}",
                cgroup_processes(&held_dir),
                d.stderr()
            );
            std::fs::write(held_out.join("go"), "go").unwrap();
            assert_eq!(cri.wait_exited(&held, wait(120)), Some(0));
            let h = agent_result(&cri, pod, "held", 0);
            assert_eq!(h["first"], libc::EPERM, "held, then resumed: {h}");
            assert_eq!(h["ways"]["open"]["errno"], "EPERM", "{h:#}");
            assert!(
                d.stderr().contains("held programs resumed"),
                "{}",
                d.stderr()
            );
            assert!(
                d.stderr().contains("resolved in its root again"),
                "the restarted daemon did not adopt the container:\n{}",
                d.stderr()
            );
            step("restarted");
            let hash = d.identity("research").unwrap()["policy_hash"].clone();
            write_atomic(
                &d.policies.join("research.yaml"),
                &policy(
                    "research",
                    "    - path: /etc/agent/token\n      access: deny\n    - path: /secret/taint\n      \
                     access: taint\n    - path: /out/vault/token\n      access: deny\n    - path: \
                     /agents\n      access: audit\n",
                ),
            );
            assert!(
                poll_until(wait(30), Duration::from_millis(200), || d
                    .identity("research")
                    .is_some_and(|i| i["policy_hash"] != hash)),
                "the new policy version is not in force: {:#}",
                d.status()
            );
            std::fs::write(out.join("updated"), "").unwrap();
            phase("policy updated");
        }
        let code = cri.wait_exited(&cid, wait(120));
        phase(&format!("{app}: exited"));
        assert_eq!(
            code,
            Some(0),
            "container of {app}:\n{}\n{}",
            cri.container_output(pod, "agent", 0),
            cri.log()
        );
        let out = cri.container_output(pod, "agent", 0);
        let mut r = out
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or_else(|| panic!("no result from {app}:\n{out}"));
        for l in out.lines().skip_while(|l| !l.contains("\"ways\"")).skip(1) {
            if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(l) {
                for (k, v) in m {
                    r[k] = v;
                }
            }
        }
        results.push((app, pod_id, pod, listed, r));
    }

    let (_, _, _, listed, r) = &results[0];
    // research: refused from its first statement, every way.
    assert_eq!(r["first"], libc::EPERM, "first statement: {r}");
    // (The hard link is refused, so its name does not exist to open.)
    for way in [
        "open", "open#2", "symlink", "procroot", "procfd", "relative", "rename", "iouring",
    ] {
        let v = &r["ways"][way];
        assert_eq!(v["ok"], false, "{way} must be refused: {r:#}");
        assert_eq!(v["errno"], "EPERM", "{way}: {r:#}");
    }
    assert_eq!(r["ways"]["hardlink"]["ok"], false, "{r:#}");
    assert_eq!(r["ways"]["hardlink"]["link_errno"], "EPERM", "{r:#}");
    assert_eq!(r["ways"]["rename"]["rename_errno"], "EPERM", "{r:#}");
    // The taint read is allowed and clamps the identity's egress.
    assert_eq!(r["before"], "ok", "{r}");
    assert_eq!(r["taint"], "pod-taint-marker\n", "{r}");
    assert_eq!(r["after"], libc::EPERM, "clamped after the taint read: {r}");
    assert_eq!(r["on_taint"], "ok", "onTaint egress: {r}");
    assert_eq!(r["decoy"], "ok", "the decoy was planted: {r}");
    for step in ["ticked", "restarted", "updated"] {
        assert_eq!(
            r[step],
            libc::EPERM,
            "the moved volume file after the {step} daemon resolved again: {r}\n{}",
            d.stderr()
        );
        assert_eq!(r[format!("{step}_image")], libc::EPERM, "{step}: {r}");
    }
    assert!(
        listed["file_inodes"].as_u64().is_some_and(|n| n >= 2),
        "the container's resolved inodes in the status: {listed:#}"
    );
    // other: the same image, another identity: reads the file, not clamped.
    let (_, _, _, _, o) = &results[1];
    assert_eq!(o["first"], "pod-secret-TOKEN-7f3a\n", "{o}");
    assert_eq!(o["ways"]["open"]["ok"], true, "{o:#}");
    assert_eq!(o["taint"], "pod-taint-marker\n", "{o}");
    assert_eq!(o["after"], "ok", "another identity is not clamped: {o}");
    std::thread::sleep(Duration::from_millis(300));
    let got = allowed.text();
    assert!(
        got.contains("before-taint-research") && got.contains("after-taint-other"),
        "{got:?}"
    );
    assert!(
        !got.contains("after-taint-research"),
        "zero bytes after the taint: {got:?}"
    );
    // Denials name the pod and the container.
    assert!(
        poll_until(wait(15), Duration::from_millis(200), || {
            read_jsonl(&d.audit).iter().any(|rec| {
                rec["action"] == "file_open"
                    && rec["verdict"] == "deny"
                    && rec["pod"] == "research-f"
                    && rec["container"] == "agent"
            })
        }),
        "no labelled file denial: {:#?}",
        read_jsonl(&d.audit)
    );

    // Pods deleted: their containers leave the policies.
    for (app, pod_id, pod, _, _) in &results {
        cri.remove_pod(pod_id).unwrap();
        assert!(
            poll_until(wait(30), Duration::from_millis(200), || {
                cri.remove_pod_cgroup(pod)
            }),
            "the pod cgroup of {app} is still there"
        );
    }
    *fake.pods.lock().unwrap() = vec![];
    for o in &objects {
        fake.event(Res::Pods, "DELETED", o);
    }
    assert!(
        poll_until(wait(30), Duration::from_millis(200), || {
            ["research", "other"].iter().all(|app| {
                d.identity(app)
                    .is_some_and(|i| i["pods"].as_array().is_some_and(|p| p.is_empty()))
            })
        }),
        "deleted pods still listed: {:#}",
        d.status()
    );
    let log = d.stderr();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    // Resolution failures are retried at once: a storm of them is a bug.
    let failures = log
        .matches("resolving the file rules in the container")
        .count();
    assert!(failures < 5, "{failures} failed resolutions:\n{log}");
    eprintln!(
        "phases (s): {phases:?}; held programs resumed: {}",
        log.matches("held programs resumed").count()
    );
}
