//! Kubernetes container-to-cgroup resolution against real cgroup v2 trees.
//!
//! Each test builds, under its own `<cgroup2>/enforcer-test-<pid>-<name>`
//! prefix (passed to the resolver as the kubelet's `--cgroup-root`), the tree
//! a kubelet and a container runtime would create for one pod, resolves it
//! with `enforcer::k8s::cgroups`, binds the *resolved pod-level cgroup* to a
//! policy in a real `enforcer daemon`, and then creates a container cgroup
//! (after the daemon is up, as a container started after the pod was bound)
//! and runs a probe in it: the descendant must be enforced by the pod's
//! binding. Guards are declared so that drop order is probe, daemon, pins,
//! cgroups.
use std::{path::PathBuf, time::Duration};

use enforcer::k8s::cgroups::{
    resolve_container, resolve_pod, ContainerId, Driver, PodRef, QosClass,
};
use enforcer_tests::*;

struct Case {
    name: &'static str,
    driver: Driver,
    /// "containerd" or "cri-o" (the containerID scheme).
    scheme: &'static str,
    qos: QosClass,
    /// The pod cgroup below the prefix, as the kubelet names it.
    pod_rel: fn(uid: &str) -> String,
    /// The container cgroup's name inside the pod cgroup, as the runtime names it.
    leaf: fn(id: &str) -> String,
    /// A sibling the runtime also creates that must not be taken for the container.
    decoy: Option<fn(id: &str) -> String>,
}

fn run(case: Case) {
    if !require_root(case.name) {
        return;
    }
    let prefix = Cgroup::create(case.name);
    let pins = PinDir::new(case.name);
    let dir = TestDir::new(case.name);
    let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let outside = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();

    let pid = std::process::id();
    let uid = format!("{pid:08x}-2fa1-41d2-883f-0016d3cca427");
    let cid_hex = format!("{:016x}", u64::from(pid) << 8 | 0xa1).repeat(4);
    let init_hex = format!("{:016x}", u64::from(pid) << 8 | 0xb2).repeat(4);
    let app: ContainerId = format!("{}://{cid_hex}", case.scheme).parse().unwrap();
    let init: ContainerId = format!("{}://{init_hex}", case.scheme).parse().unwrap();
    let pod = PodRef {
        uid: &uid,
        qos: case.qos,
    };
    let mount = cgroup2_mount();
    let kubelet_root = PathBuf::from("/").join(prefix.relative());
    let kubelet_root = Some(kubelet_root.as_path());

    // The kubelet creates the pod cgroup (and the sandbox runs in it) before
    // any app container exists.
    let expected_pod = prefix.path.join((case.pod_rel)(&uid));
    assert_eq!(
        resolve_pod(&mount, kubelet_root, &pod),
        None,
        "no pod cgroup yet"
    );
    std::fs::create_dir_all(&expected_pod)
        .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", expected_pod.display()));
    if let Some(decoy) = case.decoy {
        std::fs::create_dir(expected_pod.join(decoy(&app.id))).unwrap();
    }
    let (pod_dir, driver) = resolve_pod(&mount, kubelet_root, &pod).unwrap_or_else(|| {
        panic!(
            "{}: pod cgroup {} not resolved",
            case.name,
            expected_pod.display()
        )
    });
    assert_eq!(pod_dir, expected_pod);
    assert_eq!(driver, case.driver);
    assert_eq!(
        resolve_container(&mount, kubelet_root, &pod, &app),
        None,
        "only the runtime's other cgroup exists; it is not the container"
    );

    // Bind the pod-level cgroup.
    let policy = format!("{}-agent", case.name);
    let mut d = Daemon::configure(&dir, &pins, &[(&pod_dir, &policy)]);
    write_atomic(
        &d.policies.join("agent.yaml"),
        &policy_yaml(
            &policy,
            &format!("spiffe://example.org/ns/tests/sa/{policy}"),
            "enforce",
            &[("127.0.0.1/32", &[api.port()], "tcp")],
        ),
    );
    d.start();

    // Containers start after the binding: their cgroups appear below the pod's.
    for c in [&init, &app] {
        std::fs::create_dir(pod_dir.join((case.leaf)(&c.id))).unwrap();
    }
    for c in [&init, &app] {
        let got = resolve_container(&mount, kubelet_root, &pod, c)
            .unwrap_or_else(|| panic!("{}: container {c} not resolved", case.name));
        assert_eq!(got, pod_dir.join((case.leaf)(&c.id)));
    }

    for (c, what) in [(&init, "init container"), (&app, "app container")] {
        let cg = resolve_container(&mount, kubelet_root, &pod, c).unwrap();
        let mut p = Probe::spawn(&dir);
        move_pid(&cg, p.pid);
        let before = api.bytes();
        let msg = format!("{}-{what}", case.name);
        assert_ok(
            &p.tcp("127.0.0.1", api.port(), &msg),
            &format!("{what}: tcp to the allowed 127.0.0.1:{}", api.port()),
        );
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(20), || api
                .bytes()
                >= before + msg.len() as u64),
            "{what}: the allowed connection's bytes did not arrive ({} bytes, {:?})",
            api.bytes(),
            api.text()
        );
        assert_eperm(
            &p.tcp("127.0.0.2", outside.port(), "must-not-arrive"),
            &format!("{what}: tcp to 127.0.0.2:{}", outside.port()),
        );
        p.kill();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        (outside.conns(), outside.bytes()),
        (0, 0),
        "nothing may reach the 127.0.0.2 listener: {:?}",
        outside.text()
    );
    d.kill9();
}

fn uid_(uid: &str) -> String {
    uid.replace('-', "_")
}

/// systemd driver, containerd, Burstable (the kubeadm default layout).
#[test]
fn systemd_containerd_burstable() {
    run(Case {
        name: "k8s-sd-ctrd",
        driver: Driver::Systemd,
        scheme: "containerd",
        qos: QosClass::Burstable,
        pod_rel: |uid| {
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid_(uid)
            )
        },
        leaf: |id| format!("cri-containerd-{id}.scope"),
        decoy: None,
    });
}

/// cgroupfs driver, CRI-O, BestEffort; CRI-O's conmon cgroup sits beside the
/// container's.
#[test]
fn cgroupfs_crio_besteffort() {
    run(Case {
        name: "k8s-fs-crio",
        driver: Driver::Cgroupfs,
        scheme: "cri-o",
        qos: QosClass::BestEffort,
        pod_rel: |uid| format!("kubepods/besteffort/pod{uid}"),
        leaf: |id| format!("crio-{id}"),
        decoy: Some(|id| format!("crio-conmon-{id}")),
    });
}

/// systemd driver, CRI-O, Guaranteed (no QoS slice); conmon's scope beside.
#[test]
fn systemd_crio_guaranteed() {
    run(Case {
        name: "k8s-sd-crio",
        driver: Driver::Systemd,
        scheme: "cri-o",
        qos: QosClass::Guaranteed,
        pod_rel: |uid| format!("kubepods.slice/kubepods-pod{}.slice", uid_(uid)),
        leaf: |id| format!("crio-{id}.scope"),
        decoy: Some(|id| format!("crio-conmon-{id}.scope")),
    });
}

/// cgroupfs driver, containerd, Burstable.
#[test]
fn cgroupfs_containerd_burstable() {
    run(Case {
        name: "k8s-fs-ctrd",
        driver: Driver::Cgroupfs,
        scheme: "containerd",
        qos: QosClass::Burstable,
        pod_rel: |uid| format!("kubepods/burstable/pod{uid}"),
        leaf: |id| id.to_string(),
        decoy: None,
    });
}
