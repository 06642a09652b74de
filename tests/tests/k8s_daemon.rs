//! `enforcer daemon` in Kubernetes mode against a fake API server.
//!
//! No Kubernetes API server can run on these machines. The daemon's kube
//! client is pointed (`kubernetes.apiServer`) at a small HTTP server in the
//! test that answers the pod list and streams watch events, like the real
//! one does for `GET /api/v1/pods?fieldSelector=spec.nodeName=...`. The
//! pod's cgroups are real, in the kubelet's systemd + containerd layout
//! under a test prefix (given as `kubelet_cgroup_root`); a process in the
//! container's cgroup is enforced by the policy that selects the pod.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use enforcer_tests::*;
use serde_json::{json, Value};

/// The fake API server: a pod list, and watch streams it can send events on.
struct FakeApi {
    addr: SocketAddr,
    pods: Arc<Mutex<Vec<Value>>>,
    watchers: Arc<Mutex<Vec<TcpStream>>>,
    /// Request lines seen (method path?query).
    seen: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    fn start(pods: Vec<Value>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let pods = Arc::new(Mutex::new(pods));
        let watchers = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (p, w, s) = (pods.clone(), watchers.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (p, w, s) = (p.clone(), w.clone(), s.clone());
                std::thread::spawn(move || serve(conn, &p, &w, &s));
            }
        });
        Self {
            addr,
            pods,
            watchers,
            seen,
        }
    }

    /// Send one watch event to every open watch.
    fn event(&self, kind: &str, pod: &Value) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": pod})).unwrap();
        line.push(b'\n');
        let chunk = [
            format!("{:x}\r\n", line.len()).into_bytes(),
            line,
            b"\r\n".to_vec(),
        ]
        .concat();
        for s in self.watchers.lock().unwrap().iter_mut() {
            let _ = s.write_all(&chunk).and_then(|()| s.flush());
        }
    }
}

fn serve(
    mut conn: TcpStream,
    pods: &Mutex<Vec<Value>>,
    watchers: &Mutex<Vec<TcpStream>>,
    seen: &Mutex<Vec<String>>,
) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        // Headers (no request bodies for GETs).
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
        seen.lock().unwrap().push(target.clone());
        let on_node = target.contains("fieldSelector=spec.nodeName%3Dnode-a");
        if target.contains("watch=true") {
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            let _ = conn.flush();
            watchers.lock().unwrap().push(conn.try_clone().unwrap());
            // Hold the watch open; events are written by FakeApi::event.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let items = if on_node {
            pods.lock().unwrap().clone()
        } else {
            vec![]
        };
        let body = serde_json::to_vec(&json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "100"},
            "items": items,
        }))
        .unwrap();
        let _ = conn.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        let _ = conn.write_all(&body);
        let _ = conn.flush();
    }
}

fn pod_json(uid: &str, container_id: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "research-0", "namespace": "agents", "uid": uid,
                     "resourceVersion": "90", "labels": {"app": "research"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "research",
                 "containers": [{"name": "agent", "image": "agent:1"}]},
        "status": {"phase": "Running", "qosClass": "Burstable",
                   "containerStatuses": [{"name": "agent", "image": "agent:1", "imageID": "",
                       "ready": true, "restartCount": 0, "containerID": container_id}]}
    })
}

fn identity<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["identities"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
}

/// One node as the tests set it up: the kubelet's systemd + containerd
/// layout under a test cgroup prefix (given as `kubeletCgroupRoot`), the fake
/// API server listing one pod of this node, a policy file selecting it, and
/// the daemon in Kubernetes mode. Fields drop in order: the daemon first.
struct Node {
    d: Daemon,
    fake: FakeApi,
    pod: Value,
    uid: String,
    /// The pod-level cgroup (`kubepods-burstable-pod<uid_>.slice`).
    pod_dir: PathBuf,
    /// The app container's cgroup (not created by `Node::start`).
    container: PathBuf,
    api: TcpSink,
    outside: TcpSink,
    dir: TestDir,
    _pins: PinDir,
    _prefix: Cgroup,
}

impl Node {
    /// `sandbox`: the pod-level cgroup exists before the daemon starts.
    /// `extra_config`: more top-level daemon config lines.
    fn start(name: &str, sandbox: bool, extra_config: &str) -> Self {
        let prefix = Cgroup::create(name);
        let pins = PinDir::new(name);
        let dir = TestDir::new(name);
        let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let outside = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();

        let pid = std::process::id();
        let uid = format!("{pid:08x}-7c1e-4a2b-9f00-0016d3cca427");
        let cid = format!("{:016x}", u64::from(pid) << 8 | 0xc3).repeat(4);
        let qos_dir = prefix.path.join("kubepods.slice/kubepods-burstable.slice");
        let pod_dir = qos_dir.join(format!(
            "kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ));
        // The kubelet made its QoS-level cgroups when it started.
        std::fs::create_dir_all(&qos_dir).unwrap();
        if sandbox {
            std::fs::create_dir(&pod_dir).unwrap();
        }
        let pod = pod_json(&uid, &format!("containerd://{cid}"));
        let fake = FakeApi::start(vec![pod.clone()]);

        let mut d = Daemon::configure(&dir, &pins, &[]);
        let kubelet_root = PathBuf::from("/").join(prefix.relative());
        let cfg = std::fs::read_to_string(&d.config).unwrap();
        write_atomic(
            &d.config,
            &format!(
                "{cfg}{extra_config}kubernetes:\n  nodeName: node-a\n  trustDomain: example.org\n  \
                 apiServer: http://{}\n  kubeletCgroupRoot: {}\n",
                fake.addr,
                kubelet_root.display()
            ),
        );
        write_atomic(
            &d.policies.join("research.yaml"),
            &format!(
                "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: research\n\
                 spec:\n  identity:\n    kubernetes:\n      namespace: agents\n      serviceAccount: \
                 research\n      podSelector:\n        matchLabels: {{app: research}}\n  egress:\n    \
                 - cidr: 127.0.0.1/32\n      ports: [{}]\n      protocol: tcp\n",
                api.port()
            ),
        );
        d.start();
        Self {
            d,
            fake,
            pod,
            uid,
            container: pod_dir.join(format!("cri-containerd-{cid}.scope")),
            pod_dir,
            api,
            outside,
            dir,
            _pins: pins,
            _prefix: prefix,
        }
    }

    /// The pods `enforcer status` lists for the policy.
    fn pods(&self) -> Vec<Value> {
        identity(&self.d.status(), "research")
            .and_then(|i| i["pods"].as_array().cloned())
            .unwrap_or_default()
    }
}

/// A denied connect in the audit log that carries the pod's SPIFFE ID
/// (derived: the policy sets none), namespace, pod and container.
fn labelled_denial(recs: &[Value]) -> bool {
    recs.iter().any(|r| {
        r["action"] == "connect"
            && r["identity"]["spiffe_id"] == "spiffe://example.org/ns/agents/sa/research"
            && r["verdict"] == "deny"
            && r["namespace"] == "agents"
            && r["pod"] == "research-0"
            && r["container"] == "agent"
    })
}

#[test]
fn daemon_binds_the_pods_a_policy_selects() {
    if !require_root("daemon_binds_the_pods_a_policy_selects") {
        return;
    }
    let _serial = serial();
    // The sandbox exists: the kubelet made the pod-level cgroup.
    let n = Node::start("k8s-daemon", true, "");
    let (d, fake, api, outside) = (&n.d, &n.fake, &n.api, &n.outside);
    let (pod_dir, container, uid, dir) = (&n.pod_dir, &n.container, &n.uid, &n.dir);

    // The watcher lists this node's pods; the pod's cgroup gets bound.
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            identity(&d.status(), "research")
                .and_then(|i| i["pods"].as_array().cloned())
                .is_some_and(|p| p.len() == 1 && p[0]["cgroup"] != "")
        }),
        "pod not bound: {:#}\nAPI requests: {:?}\n{}",
        d.status(),
        fake.seen.lock().unwrap(),
        d.stderr()
    );
    assert!(
        fake.seen
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "every request is scoped to the node: {:?}",
        fake.seen.lock().unwrap()
    );

    // The app container starts after the binding: enforced from its start.
    std::fs::create_dir(container).unwrap();
    let mut p = Probe::spawn(dir);
    move_pid(container, p.pid);
    assert_ok(&p.tcp("127.0.0.1", api.port(), "from-the-pod"), "allowed");
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "exfil"),
        "not in the policy",
    );
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || api.text().contains("from-the-pod")
    ));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(outside.bytes() + outside.conns(), 0, "zero bytes out");

    // Status: pod, SPIFFE ID, container and its cgroup.
    let st = d.status();
    let pods = identity(&st, "research").unwrap()["pods"].clone();
    assert_eq!(pods[0]["namespace"], "agents", "{pods:#}");
    assert_eq!(pods[0]["name"], "research-0");
    assert_eq!(
        pods[0]["spiffe_id"],
        "spiffe://example.org/ns/agents/sa/research"
    );
    assert_eq!(pods[0]["cgroup"], pod_dir.display().to_string());
    assert_eq!(pods[0]["containers"][0]["name"], "agent");
    assert_eq!(
        pods[0]["containers"][0]["cgroup"],
        container.display().to_string()
    );

    // Audit records and metrics name the pod and the container, from the
    // first denial on: the container cgroup, made after the daemon's last
    // reconcile, is placed under its pod when its first event arrives.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            labelled_denial(&read_jsonl(&d.audit))
        }),
        "the first denial has no namespace/pod/container: {:#?}",
        read_jsonl(&d.audit)
    );
    let m = d.scrape();
    assert!(
        metric(
            &m,
            "enforcer_pod_events_total",
            &[
                ("identity", "research"),
                ("spiffe_id", "spiffe://example.org/ns/agents/sa/research"),
                ("namespace", "agents"),
                ("pod", "research-0"),
                ("container", "agent"),
                ("action", "connect"),
                ("verdict", "deny")
            ]
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "enforcer_pod_info",
            &[
                ("identity", "research"),
                ("spiffe_id", "spiffe://example.org/ns/agents/sa/research"),
                ("namespace", "agents"),
                ("pod", "research-0"),
                ("uid", uid.as_str())
            ]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(outside.bytes() + outside.conns(), 0, "zero bytes out");

    // The pod is deleted: the binding is released.
    fake.pods.lock().unwrap().clear();
    fake.event("DELETED", &n.pod);
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            identity(&d.status(), "research")
                .and_then(|i| i["pods"].as_array().cloned())
                .is_some_and(|p| p.is_empty())
        }),
        "pod not released: {:#}",
        d.status()
    );
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            !d.scrape().contains("enforcer_pod_info{")
        }),
        "enforcer_pod_info of a gone pod"
    );
    drop(p);
}

/// The pod object reaches the daemon before the kubelet made its cgroup (the
/// usual order: the API server schedules, then the kubelet creates the pod
/// cgroup, the sandbox, the containers). The daemon lists the pod as
/// selected but not bound, watches the QoS-level directory, and binds the
/// pod cgroup when it appears. The periodic resync is set to an hour here,
/// and no pod event follows the list, so only that watch can bind it; the
/// container cgroup is made after that reconcile, so only the placement at
/// first event can name it.
#[test]
fn pod_cgroup_made_after_the_pod_object_is_bound_when_it_appears() {
    if !require_root("pod_cgroup_made_after_the_pod_object_is_bound_when_it_appears") {
        return;
    }
    let _serial = serial();
    let n = Node::start("k8s-late-cgroup", false, "resyncSeconds: 3600\n");

    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            let p = n.pods();
            p.len() == 1 && p[0]["cgroup"] == ""
        }),
        "the selected pod is not listed as waiting for its cgroup: {:#}\n{}",
        n.d.status(),
        n.d.stderr()
    );
    assert!(!n.pod_dir.exists());

    // The kubelet creates the pod cgroup: bound without a resync.
    std::fs::create_dir(&n.pod_dir).unwrap();
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            n.pods()
                .first()
                .is_some_and(|p| p["cgroup"] == n.pod_dir.display().to_string())
        }),
        "pod cgroup not bound when it appeared: {:#}\n{}",
        n.d.status(),
        n.d.stderr()
    );

    // The container starts inside the bound pod cgroup: enforced.
    std::fs::create_dir(&n.container).unwrap();
    let mut p = Probe::spawn(&n.dir);
    move_pid(&n.container, p.pid);
    assert_ok(&p.tcp("127.0.0.1", n.api.port(), "late-pod"), "allowed");
    assert_eperm(
        &p.tcp("127.0.0.2", n.outside.port(), "exfil"),
        "not in the policy",
    );
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || n.api.text().contains("late-pod")
    ));
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            labelled_denial(&read_jsonl(&n.d.audit))
        }),
        "the denial has no namespace/pod/container: {:#?}",
        read_jsonl(&n.d.audit)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(n.outside.bytes() + n.outside.conns(), 0, "zero bytes out");
}
