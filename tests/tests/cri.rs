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
    cri::{Containerd, PodSpec, POD_GATEWAY},
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
    let listed = poll_until(wait(30), Duration::from_millis(200), || {
        pods = research_pods(d);
        pods.iter().any(|p| {
            p["containers"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["cgroup"].as_str().is_some_and(|g| g.ends_with(&cid)))
            })
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
    let _serial = serial();
    let mut cri = Containerd::start("cri").unwrap_or_else(|e| panic!("containerd: {e}"));
    let prefix = Cgroup::create("cri");
    let pins = PinDir::new("cri");
    let dir = TestDir::new("cri");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();

    // The kubelet's cgroupfs layout under the test prefix.
    let kubelet_root = Path::new("/").join(prefix.relative());
    let uid = format!("{:08x}-5d2c-4f0e-8a11-7e3c2b1d0f9a", std::process::id());
    let pod = PodSpec {
        name: "research-0".into(),
        namespace: "agents".into(),
        uid: uid.clone(),
        cgroup_parent: kubelet_root
            .join(format!("kubepods/besteffort/pod{uid}"))
            .display()
            .to_string(),
        dns_servers: vec![POD_GATEWAY.into()],
    };
    let pod_dir = cgroup2_mount().join(pod.cgroup_parent.trim_start_matches('/'));
    // The API server has the pod (scheduled to this node) before the
    // kubelet makes its sandbox.
    let fake = FakeApi::start(vec![pod_object(&pod, &[], 90)]);

    let mut d = Daemon::configure(&dir, &pins, &[]);
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    write_atomic(
        &d.config,
        &format!(
            "{cfg}kubernetes:\n  nodeName: node-a\n  trustDomain: example.org\n  apiServer: http://{}\n  \
             kubeletCgroupRoot: {}\n",
            fake.addr,
            kubelet_root.display()
        ),
    );
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
    std::fs::create_dir_all(&pod_dir).unwrap();
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
        pod_dir.join(&cid).display().to_string(),
        "containerd's cgroupfs layout: <cgroup_parent>/<container id>"
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
            std::fs::remove_dir(&pod_dir).is_ok() || !pod_dir.exists()
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
