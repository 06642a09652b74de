//! `enforcer daemon` in Kubernetes mode against a fake API server.
//!
//! No Kubernetes API server can run on these machines. The daemon's kube
//! client is pointed (`kubernetes.apiServer`) at a small HTTP server
//! (`enforcer_tests::fake_api`) that answers the pod list and streams watch
//! events, serves `AgentPolicy` objects and records the status writes and
//! Events the daemon sends. The pod's cgroups are real, in the kubelet's
//! systemd + containerd layout under a test prefix (given as
//! `kubelet_cgroup_root`), made by hand; a process in the container's
//! cgroup is enforced by the policy that selects the pod. `cri.rs` does the
//! same with pods that containerd made through the CRI API.
use std::{path::PathBuf, sync::atomic::Ordering, time::Duration};

use enforcer_tests::{
    dns_server::DnsServer,
    fake_api::{FakeApi, Res, POLICIES},
    *,
};
use serde_json::{json, Value};

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

/// How a test's node starts.
struct NodeOpts<'a> {
    /// The pod-level cgroup exists before the daemon starts.
    sandbox: bool,
    /// More top-level daemon config lines.
    extra_config: &'a str,
    /// The AgentPolicy CRD is installed (else its requests get 404).
    crd: bool,
    /// The `research` policy file selects the pod.
    policy_file: bool,
}

/// One node as the tests set it up: the kubelet's systemd + containerd
/// layout under a test cgroup prefix (given as `kubeletCgroupRoot`), the fake
/// API server listing one pod of this node, optionally a policy file
/// selecting it, and the daemon in Kubernetes mode. Fields drop in order:
/// the daemon first.
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
    fn start(name: &str, o: NodeOpts) -> Self {
        let NodeOpts {
            sandbox,
            extra_config,
            crd,
            policy_file,
        } = o;
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
        fake.crd.store(crd, Ordering::SeqCst);

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
        if policy_file {
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
        }
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
    // This cluster has no AgentPolicy CRD: file policies must keep working.
    let n = Node::start(
        "k8s-daemon",
        NodeOpts {
            sandbox: true,
            extra_config: "",
            crd: false,
            policy_file: true,
        },
    );
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
            .filter(|r| r.starts_with("/api/v1/pods"))
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "every pod request is scoped to the node: {:?}",
        fake.seen.lock().unwrap()
    );
    // The missing CRD (404) is said loudly and retried with backoff; no
    // status is written.
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
            fake.seen
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.starts_with(POLICIES))
                .count()
                >= 2
                && d.stderr()
                    .contains("is the CRD deploy/10-crd.yaml installed?")
        }),
        "AgentPolicy list not retried or not logged: {:?}\n{}",
        fake.seen.lock().unwrap(),
        d.stderr()
    );
    assert!(fake.writes.lock().unwrap().is_empty());

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
    fake.event(Res::Pods, "DELETED", &n.pod);
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
    let n = Node::start(
        "k8s-late-cgroup",
        NodeOpts {
            sandbox: false,
            extra_config: "resyncSeconds: 3600\n",
            crd: true,
            policy_file: true,
        },
    );

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

    // The pod finishes (a Job's pod): neither bound nor waiting any more.
    drop(p);
    let mut done = n.pod.clone();
    done["status"]["phase"] = json!("Succeeded");
    done["metadata"]["resourceVersion"] = json!("95");
    *n.fake.pods.lock().unwrap() = vec![done.clone()];
    n.fake.event(Res::Pods, "MODIFIED", &done);
    assert!(
        poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            n.pods().is_empty()
        }),
        "a finished pod is still listed: {:#}",
        n.d.status()
    );
}

fn agentpolicy(ns: &str, name: &str, uid: &str, generation: i64, spec: Value) -> Value {
    json!({
        "apiVersion": "enforcer.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "generation": generation,
                     "resourceVersion": format!("{}", 200 + generation)},
        "spec": spec,
    })
}

/// The `Accepted` condition and this node's entry of the last status
/// write to `ns`/`name` for `generation`.
fn last_status(fake: &FakeApi, ns: &str, name: &str, generation: i64) -> Option<(String, Value)> {
    fake.status_writes(ns, name)
        .into_iter()
        .rev()
        .find(|(_, b)| b["status"]["observedGeneration"] == generation)
}

/// `file:LINE:COLUMN: field` is in `msg`, with numbers.
fn has_position(msg: &str, file: &str, field: &str) -> bool {
    msg.lines().any(|l| {
        let Some(rest) = l.strip_prefix(&format!("{file}:")) else {
            return false;
        };
        let mut it = rest.splitn(3, ':');
        let (Some(line), Some(col), Some(tail)) = (it.next(), it.next(), it.next()) else {
            return false;
        };
        line.parse::<u32>().is_ok_and(|n| n > 0)
            && col.parse::<u32>().is_ok_and(|n| n > 0)
            && tail.trim_start().starts_with(field)
    })
}

#[test]
fn daemon_enforces_agentpolicy_objects() {
    if !require_root("daemon_enforces_agentpolicy_objects") {
        return;
    }
    let _serial = serial();
    // No policy file at all: everything comes from objects.
    let n = Node::start(
        "k8s-crdpol",
        NodeOpts {
            sandbox: true,
            extra_config: "",
            crd: true,
            policy_file: false,
        },
    );
    let (d, fake, api, outside) = (&n.d, &n.fake, &n.api, &n.outside);
    let (pod_dir, container, dir) = (&n.pod_dir, &n.container, &n.dir);
    let api2 = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    std::fs::create_dir(container).unwrap();
    let mut p = Probe::spawn(dir);
    move_pid(container, p.pid);
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            fake.watching(Res::Policies) && fake.watching(Res::Pods)
        }),
        "no AgentPolicy watch: {:?}\n{}",
        fake.seen.lock().unwrap(),
        d.stderr()
    );
    let ident = "agents/research";
    let pods_of = |st: &Value| {
        identity(st, ident)
            .and_then(|i| i["pods"].as_array().cloned())
            .unwrap_or_default()
    };

    // 1. ADDED: the namespace is left unset (it is the object's own).
    let selector = json!({"serviceAccount": "research",
                          "podSelector": {"matchLabels": {"app": "research"}}});
    let v1 = agentpolicy(
        "agents",
        "research",
        "uid-p1",
        1,
        json!({"identity": {"kubernetes": selector},
               "egress": [{"cidr": "127.0.0.1/32", "ports": [api.port()], "protocol": "tcp"}]}),
    );
    fake.policies.lock().unwrap().push(v1.clone());
    fake.event(Res::Policies, "ADDED", &v1);
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            let p = pods_of(&d.status());
            p.len() == 1 && p[0]["cgroup"] == pod_dir.display().to_string()
        }),
        "pod not bound to the object's policy: {:#}\n{}",
        d.status(),
        d.stderr()
    );
    let st = d.status();
    let id = identity(&st, ident).unwrap();
    assert_eq!(id["source"], "agentpolicy/agents/research", "{id:#}");
    let hash_v1 = id["policy_hash"].as_str().unwrap().to_string();
    assert_ok(
        &p.tcp("127.0.0.1", api.port(), "v1-allowed"),
        "allowed by v1",
    );
    assert_eperm(&p.tcp("127.0.0.2", outside.port(), "exfil"), "not in v1");
    assert_eperm(
        &p.tcp("127.0.0.1", api2.port(), "v1-api2"),
        "api2 not in v1",
    );
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || api.text().contains("v1-allowed")
    ));
    // Status: Accepted, the hash, this node's entry with the bound pod,
    // applied with this node's field manager.
    assert!(
        poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            last_status(fake, "agents", "research", 1)
                .is_some_and(|(_, b)| b["status"]["nodes"][0]["boundPods"] == 1)
        }),
        "no accepted status with the bound pod: {:?}",
        fake.writes.lock().unwrap()
    );
    let (q, b) = last_status(fake, "agents", "research", 1).unwrap();
    assert!(
        q.contains("fieldManager=enforcer-node-node-a") && q.contains("force=true"),
        "{q}"
    );
    let st = &b["status"];
    assert_eq!(st["conditions"][0]["type"], "Accepted");
    assert_eq!(st["conditions"][0]["status"], "True", "{st:#}");
    assert_eq!(st["policyHash"], hash_v1.as_str());
    assert_eq!(st["nodes"][0]["node"], "node-a");
    assert_eq!(st["nodes"][0]["enforced"], true);
    assert!(
        fake.events("agents").is_empty(),
        "no event for an accepted object"
    );

    // 2. MODIFIED to an invalid spec (host bits set; it would also allow
    //    api2): rejected, reported, and v1 stays enforced.
    let v2 = agentpolicy(
        "agents",
        "research",
        "uid-p1",
        2,
        json!({"identity": {"kubernetes": selector},
               "egress": [{"cidr": "127.0.0.1/8", "ports": [api.port(), api2.port()], "protocol": "tcp"}]}),
    );
    *fake.policies.lock().unwrap() = vec![v2.clone()];
    fake.event(Res::Policies, "MODIFIED", &v2);
    assert!(
        poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            last_status(fake, "agents", "research", 2).is_some()
                && !fake.events("agents").is_empty()
        }),
        "no rejected status and event: {:?}\n{}",
        fake.writes.lock().unwrap(),
        d.stderr()
    );
    let (_, b) = last_status(fake, "agents", "research", 2).unwrap();
    let c = &b["status"]["conditions"][0];
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("Invalid")),
        "{b:#}"
    );
    let msg = c["message"].as_str().unwrap();
    assert!(
        has_position(msg, "agentpolicy/agents/research", "spec.egress[0].cidr"),
        "{msg}"
    );
    assert_eq!(
        b["status"]["nodes"][0]["enforced"], true,
        "v1 still enforced"
    );
    assert_eq!(b["status"]["nodes"][0]["policyHash"], hash_v1.as_str());
    let ev = &fake.events("agents")[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "PolicyRejected");
    assert_eq!(ev["regarding"]["kind"], "AgentPolicy");
    assert_eq!(ev["regarding"]["name"], "research");
    assert_eq!(ev["regarding"]["uid"], "uid-p1");
    let st = d.status();
    assert!(
        st["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["file"] == "agentpolicy/agents/research"),
        "{st:#}"
    );
    assert_eq!(
        identity(&st, ident).unwrap()["policy_hash"],
        hash_v1.as_str()
    );
    assert_ok(
        &p.tcp("127.0.0.1", api.port(), "v1-still"),
        "v1 still allows",
    );
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "exfil2"),
        "still denied",
    );
    assert_eperm(
        &p.tcp("127.0.0.1", api2.port(), "v2-api2"),
        "invalid v2 not applied",
    );
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || api.text().contains("v1-still")
    ));
    let audit = read_jsonl(&d.audit);
    assert!(
        audit.iter().any(|r| r["action"] == "policy_reload_rejected"
            && r["detail"]
                .as_str()
                .is_some_and(|s| s.starts_with("agentpolicy/agents/research: "))),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|r| r["action"] == "policy_load"
            && r["identity"]["name"] == ident
            && r["detail"]
                .as_str()
                .is_some_and(|s| s.starts_with("agentpolicy/agents/research "))),
        "{audit:#?}"
    );
    // Written once: the daemon does not rewrite an unchanged status.
    let writes_v2 = fake.status_writes("agents", "research").len();

    // 3. MODIFIED to a valid change: api2 is now allowed.
    let v3 = agentpolicy(
        "agents",
        "research",
        "uid-p1",
        3,
        json!({"identity": {"kubernetes": selector},
               "egress": [{"cidr": "127.0.0.1/32", "ports": [api.port(), api2.port()], "protocol": "tcp"}]}),
    );
    *fake.policies.lock().unwrap() = vec![v3.clone()];
    fake.event(Res::Policies, "MODIFIED", &v3);
    assert!(
        poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            identity(&d.status(), ident).is_some_and(|i| i["policy_hash"] != hash_v1.as_str())
        }),
        "v3 not applied: {:#}\n{}",
        d.status(),
        d.stderr()
    );
    assert_ok(
        &p.tcp("127.0.0.1", api2.port(), "v3-api2"),
        "v3 allows api2",
    );
    assert_ok(&p.tcp("127.0.0.1", api.port(), "v3-api"), "v3 allows api");
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "exfil3"),
        "still denied",
    );
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || api2.text().contains("v3-api2")
    ));
    assert!(
        poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            last_status(fake, "agents", "research", 3)
                .is_some_and(|(_, b)| b["status"]["conditions"][0]["status"] == "True")
        }),
        "no accepted status for v3"
    );
    assert!(fake.status_writes("agents", "research").len() > writes_v2);

    // 4. An object in another namespace that selects this pod's namespace:
    //    rejected (and it does not make the pod a conflict).
    let grab = agentpolicy(
        "intruder",
        "grab",
        "uid-p2",
        1,
        json!({"identity": {"kubernetes": {"namespace": "agents",
                                           "podSelector": {"matchLabels": {"app": "research"}}}},
               "egress": [{"cidr": "127.0.0.2/32"}]}),
    );
    fake.policies.lock().unwrap().push(grab.clone());
    fake.event(Res::Policies, "ADDED", &grab);
    assert!(
        poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            last_status(fake, "intruder", "grab", 1).is_some()
        }),
        "no status for the cross-namespace object: {:?}",
        fake.writes.lock().unwrap()
    );
    let (_, b) = last_status(fake, "intruder", "grab", 1).unwrap();
    let c = &b["status"]["conditions"][0];
    assert_eq!(c["status"], "False", "{b:#}");
    let msg = c["message"].as_str().unwrap();
    assert!(
        has_position(
            msg,
            "agentpolicy/intruder/grab",
            "spec.identity.kubernetes.namespace"
        ) && msg.contains("not this object's namespace"),
        "{msg}"
    );
    assert_eq!(b["status"]["nodes"][0]["enforced"], false);
    assert!(
        !fake.events("intruder").is_empty(),
        "rejection event in the object's namespace"
    );
    let st = d.status();
    assert!(identity(&st, "intruder/grab").is_none(), "{st:#}");
    assert_eq!(
        pods_of(&st).len(),
        1,
        "still bound to agents/research: {st:#}"
    );
    assert_ok(
        &p.tcp("127.0.0.1", api.port(), "after-grab"),
        "still the pod's own policy",
    );
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "grab-exfil"),
        "the intruder allows nothing here",
    );

    // 4b. A valid object that selects pods and uses `files:`: the spec is
    //     Accepted (valid everywhere). Its paths resolve in each container's
    //     root (tests/tests/cri.rs proves that with real containers), so the
    //     node enforces it wherever the kernel has BPF LSM; on a kernel
    //     without it (and no allowDegraded) the node says why it does not.
    let filesy = agentpolicy(
        "agents",
        "filesy",
        "uid-p3",
        1,
        json!({"identity": {"kubernetes": {"podSelector": {"matchLabels": {"app": "nobody"}}}},
               "files": [{"path": "/nonexistent/enforcer-test", "access": "deny"}]}),
    );
    fake.policies.lock().unwrap().push(filesy.clone());
    fake.event(Res::Policies, "ADDED", &filesy);
    assert!(
        poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            last_status(fake, "agents", "filesy", 1).is_some()
        }),
        "no status for the files: object: {:?}",
        fake.writes.lock().unwrap()
    );
    let (_, b) = last_status(fake, "agents", "filesy", 1).unwrap();
    assert_eq!(b["status"]["conditions"][0]["status"], "True", "{b:#}");
    assert!(b["status"]["policyHash"].is_string(), "{b:#}");
    let node = &b["status"]["nodes"][0];
    let lsm = d.status()["capabilities"]["bpf_lsm"]["available"].as_bool();
    if node["enforced"] == true {
        assert_eq!(lsm, Some(true), "enforced without BPF LSM? {b:#}");
        assert!(identity(&d.status(), "agents/filesy").is_some());
    } else {
        assert_ne!(lsm, Some(true), "not enforced with BPF LSM: {b:#}");
        assert!(
            node["message"]
                .as_str()
                .is_some_and(|m| m.contains("no BPF LSM")),
            "{b:#}"
        );
        assert!(
            fake.events("agents")
                .iter()
                .any(|e| e["regarding"]["name"] == "filesy"
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("not enforced on this node"))),
            "{:?}",
            fake.events("agents")
        );
        assert!(identity(&d.status(), "agents/filesy").is_none());
    }

    // 5. DELETED: the policy is gone, the pod's cgroup fails closed.
    fake.policies
        .lock()
        .unwrap()
        .retain(|o| o["metadata"]["uid"] != "uid-p1");
    fake.event(Res::Policies, "DELETED", &v3);
    assert!(
        poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            let st = d.status();
            identity(&st, ident).is_none()
                && st["fail_closed_cgroups"].as_array().is_some_and(|a| {
                    a.iter().any(|c| {
                        c.as_str()
                            .is_some_and(|c| c.starts_with(&pod_dir.display().to_string()))
                    })
                })
        }),
        "pod not failing closed after the delete: {:#}\n{}",
        d.status(),
        d.stderr()
    );
    let before = api.bytes();
    assert_eperm(
        &p.tcp("127.0.0.1", api.port(), "after-delete"),
        "fails closed",
    );
    assert_eperm(
        &p.tcp("127.0.0.1", api2.port(), "after-delete2"),
        "fails closed",
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(api.bytes(), before, "zero bytes after the delete");
    assert!(!api.text().contains("after-delete"));
    assert_eq!(outside.bytes() + outside.conns(), 0, "zero bytes out");
    assert!(read_jsonl(&d.audit)
        .iter()
        .any(|r| r["action"] == "policy_remove"
            && r["detail"]
                .as_str()
                .is_some_and(|s| s.starts_with("agentpolicy/agents/research removed"))));
    drop(p);
}

/// A pod in its own network namespace (every pod without hostNetwork),
/// bound through an AgentPolicy object with a host rule. The kernel steers
/// the pod's DNS to the proxy port on the pod's own loopback: the daemon
/// serves it there and forwards from its own namespace (the upstream exists
/// only in the daemon's; a fake resolver at the same address in the pod's
/// namespace is never asked), so the allowed name resolves and its address
/// opens; a denied name is refused and never forwarded; an address no
/// answer gave stays closed. The DNS decisions name the pod and its SPIFFE
/// ID.
#[test]
fn pod_in_its_own_network_namespace_gets_its_dns_through_the_proxy() {
    if !require_root("pod_in_its_own_network_namespace_gets_its_dns_through_the_proxy") {
        return;
    }
    let _serial = serial();
    // No periodic resync: what happens, happens on events.
    let n = Node::start(
        "k8s-netns",
        NodeOpts {
            sandbox: true,
            extra_config: "resyncSeconds: 3600\n",
            crd: true,
            policy_file: false,
        },
    );
    let (d, fake, dir) = (&n.d, &n.fake, &n.dir);
    let ns = TestNetns::new(true);
    // The upstream lives in the daemon's namespace (as cluster DNS is
    // reached from the DaemonSet's); the sites and a fake resolver at the
    // upstream's address live in the pod's.
    let dns = DnsServer::start_on("127.0.0.53".parse().unwrap());
    dns.add_addrs("allowed.example.com", &["127.0.0.5"])
        .add_addrs("denied.example.com", &["127.0.0.6"]);
    let (site, never, fake_dns) = ns.run(|| {
        (
            TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap(),
            TcpSink::bind("127.0.0.6:0".parse().unwrap()).unwrap(),
            DnsServer::start_at(dns.addr),
        )
    });
    fake_dns.add_addrs("allowed.example.com", &["127.0.0.6"]);
    let policy = agentpolicy(
        "agents",
        "research",
        "uid-netns",
        1,
        json!({"identity": {"kubernetes": {"serviceAccount": "research",
                                            "podSelector": {"matchLabels": {"app": "research"}}}},
               // The cidr rule vouches for loopback answers (rebinding
               // protection drops private and loopback answers otherwise).
               "egress": [{"host": "allowed.example.com", "ports": [site.port()], "protocol": "tcp", "inspect": "none"},
                          {"cidr": "127.0.0.0/8", "ports": [9], "protocol": "tcp"}],
               "dns": {"upstream": [dns.upstream()]}}),
    );
    // An event sent before the daemon watches would be lost (the list it
    // made before would not have the object either).
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            fake.watching(Res::Policies) && fake.watching(Res::Pods)
        }),
        "no AgentPolicy watch: {:?}",
        fake.seen.lock().unwrap()
    );
    fake.policies.lock().unwrap().push(policy.clone());
    fake.event(Res::Policies, "ADDED", &policy);
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            identity(&d.status(), "agents/research")
                .and_then(|i| i["pods"].as_array().cloned())
                .is_some_and(|p| p.len() == 1 && p[0]["cgroup"] != "")
        }),
        "pod not bound: {:#}",
        d.status()
    );
    // Then the sandbox starts: its process, holding the pod's network
    // namespace, enters the (empty) pod cgroup. That change of the pod's
    // cgroup.events is what makes the daemon serve the namespace (the
    // resync is an hour away and no API event follows).
    move_pid(&n.pod_dir, ns.holder_pid());

    // The app container, in the pod's namespace and its container cgroup.
    std::fs::create_dir(&n.container).unwrap();
    let mut a = ns.agent(dir);
    move_pid(&n.container, a.pid);
    let resolve = |a: &mut Probe, name: &str| {
        a.cmd(
            json!({"op": "resolve", "server": "10.96.0.10", "port": 53, "name": name,
                     "qtype": "A", "tcp": false, "timeout": 3}),
        )
    };
    let mut v = Value::Null;
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(250), || {
            v = resolve(&mut a, "allowed.example.com");
            v["ok"] == true && v["rcode"] == 0
        }),
        "the pod's DNS is not served in its namespace: {v}\n{:#}\n{}",
        d.status(),
        d.stderr()
    );
    assert_eq!(v["addrs"], json!(["127.0.0.5"]), "{v}");
    assert!(dns.count("allowed.example.com") >= 1, "{}", dns.describe());
    assert_eq!(fake_dns.queries().len(), 0, "{}", fake_dns.describe());
    assert_ok(
        &a.tcp("127.0.0.5", site.port(), "via-dns"),
        "the answer opens",
    );
    assert!(poll_until(
        Duration::from_secs(3),
        Duration::from_millis(20),
        || site.text().contains("via-dns")
    ));
    let v = resolve(&mut a, "denied.example.com");
    assert_eq!(v["rcode"], 5, "REFUSED: {v}");
    assert_eq!(dns.count("denied.example.com"), 0, "{}", dns.describe());
    assert_eperm(&a.tcp("127.0.0.6", never.port(), "leak"), "never resolved");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(never.bytes() + never.conns(), 0, "zero bytes out");

    // The DNS decisions name the pod (not a container: the pod's
    // containers share the namespace) and its SPIFFE ID.
    let spiffe = "spiffe://example.org/ns/agents/sa/research";
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            read_jsonl(&d.audit).iter().any(|r| {
                r["action"] == "dns"
                    && r["host"] == "denied.example.com"
                    && r["verdict"] == "deny"
                    && r["identity"]["name"] == "agents/research"
                    && r["identity"]["spiffe_id"] == spiffe
                    && r["namespace"] == "agents"
                    && r["pod"] == "research-0"
            })
        }),
        "no DNS record naming the pod: {:#?}",
        read_jsonl(&d.audit)
    );
    let m = d.scrape();
    assert!(
        metric(
            &m,
            "enforcer_pod_events_total",
            &[
                ("identity", "agents/research"),
                ("spiffe_id", spiffe),
                ("pod", "research-0"),
                ("action", "dns"),
                ("verdict", "allow")
            ]
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
}

/// The policy of a bound pod is deleted while the daemon is down. The
/// pinned kernel state keeps enforcing it meanwhile; the restarted daemon
/// does not bind the pod again (no policy selects it), so it must remove
/// the stale policy from the kernel: the pod's cgroup then fails closed
/// instead of keeping a deleted (maybe permissive) policy in force.
#[test]
fn policy_deleted_while_the_daemon_is_down_fails_closed_after_restart() {
    if !require_root("policy_deleted_while_the_daemon_is_down_fails_closed_after_restart") {
        return;
    }
    let _serial = serial();
    let mut n = Node::start(
        "k8s-stale",
        NodeOpts {
            sandbox: true,
            extra_config: "",
            crd: false,
            policy_file: true,
        },
    );
    std::fs::create_dir(&n.container).unwrap();
    let mut p = Probe::spawn(&n.dir);
    move_pid(&n.container, p.pid);
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            n.pods().first().is_some_and(|p| p["cgroup"] != "")
        }),
        "pod not bound: {:#}",
        n.d.status()
    );
    assert_ok(&p.tcp("127.0.0.1", n.api.port(), "before"), "allowed");

    n.d.kill9();
    std::fs::remove_file(n.d.policies.join("research.yaml")).unwrap();
    assert_ok(
        &p.tcp("127.0.0.1", n.api.port(), "daemon-down"),
        "the pinned policy keeps enforcing while the daemon is down",
    );
    n.d.start();
    let before = n.api.bytes();
    assert_eperm(
        &p.tcp("127.0.0.1", n.api.port(), "after-restart"),
        "the deleted policy is out of the kernel: fail closed",
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(n.api.bytes(), before, "zero bytes after the restart");
    assert!(
        read_jsonl(&n.d.audit).iter().any(|r| {
            r["action"] == "policy_remove"
                && r["identity"]["name"] == "research"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("not loaded after a daemon restart"))
        }),
        "{:#?}",
        read_jsonl(&n.d.audit)
    );
}
