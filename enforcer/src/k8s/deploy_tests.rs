//! `deploy/`: every manifest parses into its Kubernetes type (and back, so a
//! misspelled field that the type would skip is caught), and the pieces fit:
//! the config the ConfigMap holds is what the daemon loads, every path in it
//! is on a volume of the DaemonSet, the RBAC is exactly what the daemon
//! needs, and the Service and monitors select the daemon's pods and port.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::daemon::config::Config;

const NAMESPACE: &str = "enforcer-system";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

/// Every document of every `deploy/**/*.yaml`, keyed by kind.
#[derive(Default)]
struct Manifests {
    docs: BTreeMap<String, Vec<(PathBuf, Value)>>,
}

impl Manifests {
    fn load() -> Self {
        let mut files = Vec::new();
        yaml_files(&deploy_dir(), &mut files);
        files.sort();
        let mut m = Self::default();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            for d in docs.into_iter().filter(|d| !d.is_null()) {
                let kind = d["kind"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: no kind", f.display()));
                m.docs
                    .entry(kind.to_owned())
                    .or_default()
                    .push((f.clone(), d));
            }
        }
        m
    }

    fn raw(&self, kind: &str) -> &[(PathBuf, Value)] {
        self.docs.get(kind).map(Vec::as_slice).unwrap_or_default()
    }

    /// The one document of `kind`, as `T`; it must serialize back to what
    /// was written (k8s-openapi ignores unknown fields when deserializing).
    fn one<T: DeserializeOwned + serde::Serialize>(&self, kind: &str) -> T {
        let docs = self.raw(kind);
        assert_eq!(docs.len(), 1, "exactly one {kind} expected in deploy/");
        typed(&docs[0].0, &docs[0].1)
    }
}

fn typed<T: DeserializeOwned + serde::Serialize>(file: &Path, doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{}: {}: {e}", file.display(), doc["kind"]));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        &back,
        doc,
        "{}: {} does not round-trip through its type (a misspelled or misplaced field?)",
        file.display(),
        doc["kind"]
    );
    t
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn container(ds: &DaemonSet) -> &Container {
    let pod = pod_spec(ds);
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

fn pod_labels(ds: &DaemonSet) -> BTreeMap<String, String> {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap()
}

fn is_subset(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v.clone()).unwrap()
}

fn daemon_config(m: &Manifests) -> Config {
    let cm: ConfigMap = m.one("ConfigMap");
    let text = &cm.data.as_ref().unwrap()["config.yaml"];
    Config::parse(text).unwrap_or_else(|e| panic!("the ConfigMap's config.yaml: {e}"))
}

#[test]
fn every_manifest_parses_into_its_type() {
    let m = Manifests::load();
    let kinds: BTreeSet<&str> = m.docs.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "DaemonSet",
            "Namespace",
            "PodMonitor",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]),
        "unexpected kinds in deploy/"
    );
    let ns: Namespace = m.one("Namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
    let _: ServiceAccount = m.one("ServiceAccount");
    let _: ClusterRole = m.one("ClusterRole");
    let _: ClusterRoleBinding = m.one("ClusterRoleBinding");
    let _: ConfigMap = m.one("ConfigMap");
    let _: DaemonSet = m.one("DaemonSet");
    let _: Service = m.one("Service");
    let crd: CustomResourceDefinition = m.one("CustomResourceDefinition");
    assert_eq!(crd, super::crd::crd());
    // Namespaced objects live in the enforcer's namespace.
    for kind in [
        "ServiceAccount",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
        "PodMonitor",
    ] {
        for (f, d) in m.raw(kind) {
            assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{}", f.display());
        }
    }
    // `kubectl apply -f deploy/` applies files in name order: the namespace
    // and the CRD must come first, and the monitors (whose CRDs may be
    // missing) are not in deploy/ itself.
    let mut top: Vec<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    top.sort();
    assert_eq!(top[0], "00-namespace.yaml");
    assert_eq!(top[1], "10-crd.yaml");
    for (f, _) in m.raw("ServiceMonitor").iter().chain(m.raw("PodMonitor")) {
        assert_eq!(f.parent().unwrap().file_name().unwrap(), "monitoring");
    }
}

#[test]
fn configmap_holds_a_daemon_config_whose_paths_are_all_mounted() {
    let m = Manifests::load();
    let cfg = daemon_config(&m);
    let ds: DaemonSet = m.one("DaemonSet");
    let pod = pod_spec(&ds);
    let c = container(&ds);
    let mounts = c.volume_mounts.as_ref().unwrap();
    let volumes = pod.volumes.as_ref().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v.name == name).unwrap();
    // The mount (and its volume's host path, if any) that holds `path`.
    let mount_of = |path: &Path| {
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{} is on no volume of the DaemonSet", path.display()));
        (m, volume(&m.name))
    };
    let host_path = |path: &Path| {
        let (m, v) = mount_of(path);
        let hp = v
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{} must be on a hostPath volume", path.display()));
        assert_eq!(
            hp.path, m.mount_path,
            "{}: host and container paths differ",
            m.name
        );
        assert_ne!(
            m.read_only,
            Some(true),
            "{} is written by the daemon",
            path.display()
        );
        m
    };

    // The config file: args name it, the ConfigMap provides it.
    assert_eq!(
        c.args.as_deref().unwrap(),
        ["daemon", "--config", "/etc/enforcer/config.yaml"]
    );
    let (cm_mount, cm_vol) = mount_of(Path::new("/etc/enforcer/config.yaml"));
    assert_eq!(cm_mount.mount_path, "/etc/enforcer/config.yaml");
    assert_eq!(cm_mount.sub_path.as_deref(), Some("config.yaml"));
    let cm: ConfigMap = m.one("ConfigMap");
    assert_eq!(
        cm_vol.config_map.as_ref().unwrap().name,
        cm.metadata.name.unwrap()
    );

    // Policies: a directory of its own.
    let (pm, pv) = mount_of(&cfg.policies_dir);
    assert_eq!(Path::new(&pm.mount_path), cfg.policies_dir);
    assert!(pv.config_map.is_some());

    // Pins: the host's bpffs, propagated both ways.
    let bpf = host_path(&cfg.pin_dir);
    assert_eq!(bpf.mount_path, "/sys/fs/bpf");
    assert_eq!(bpf.mount_propagation.as_deref(), Some("Bidirectional"));
    // State, control socket and audit log: host directories that outlive the pod.
    host_path(&cfg.state_dir);
    host_path(cfg.control_socket.parent().unwrap());
    host_path(cfg.audit_log.as_deref().unwrap().parent().unwrap());
    // The cgroup2 hierarchy (found through /proc/self/mounts).
    assert_eq!(
        host_path(Path::new("/sys/fs/cgroup")).mount_path,
        "/sys/fs/cgroup"
    );
    // Read-only views of the kernel: BTF (CO-RE offsets) and the LSM list.
    for p in ["/sys/kernel/btf", "/sys/kernel/security"] {
        let (m, v) = mount_of(Path::new(p));
        assert_eq!(m.mount_path, p);
        assert_eq!(m.read_only, Some(true), "{p}");
        assert_eq!(v.host_path.as_ref().unwrap().path, p);
    }

    // Metrics: the port the config binds is the container's `metrics` port,
    // probed on /healthz.
    let addr = cfg.metrics_addr.expect("metricsAddr is set");
    assert!(
        addr.ip().is_unspecified(),
        "metrics must be reachable from outside the pod"
    );
    let port = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .unwrap();
    assert_eq!(port.container_port, i32::from(addr.port()));
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
        );
    }
}

#[test]
fn daemonset_runs_privileged_on_every_node_and_knows_its_node() {
    let m = Manifests::load();
    let ds: DaemonSet = m.one("DaemonSet");
    let pod = pod_spec(&ds);
    let c = container(&ds);
    let env = c.env.as_ref().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a DaemonSet of an enforcer must tolerate every taint"
    );
    // The selector selects the template.
    let sel = ds
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .clone()
        .unwrap();
    assert!(is_subset(&sel, &pod_labels(&ds)));
    // It runs as the ServiceAccount the RBAC binds.
    let sa: ServiceAccount = m.one("ServiceAccount");
    assert_eq!(pod.service_account_name, sa.metadata.name);
}

#[test]
fn cluster_role_grants_exactly_what_the_daemon_needs() {
    let m = Manifests::load();
    let role: ClusterRole = m.one("ClusterRole");
    let mut granted = BTreeSet::new();
    for r in role.rules.as_ref().unwrap() {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.as_ref().unwrap() {
            for res in r.resources.as_ref().unwrap() {
                for v in &r.verbs {
                    assert!(
                        granted.insert((g.as_str(), res.as_str(), v.as_str())),
                        "{g} {res} {v} twice"
                    );
                }
            }
        }
    }
    // Exactly the calls the daemon makes: the pod and AgentPolicy watchers
    // (list + watch), the status writer (server-side apply = patch of the
    // status subresource) and kube's event recorder (events.k8s.io/v1:
    // create, and patch for a repeated event's series).
    let mut want = BTreeSet::new();
    for v in ["list", "watch"] {
        want.insert(("", "pods", v));
        want.insert(("enforcer.dev", "agentpolicies", v));
    }
    want.insert(("enforcer.dev", "agentpolicies/status", "patch"));
    for v in ["create", "patch"] {
        want.insert(("events.k8s.io", "events", v));
    }
    assert_eq!(granted, want);

    let binding: ClusterRoleBinding = m.one("ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
    let sa: ServiceAccount = m.one("ServiceAccount");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

#[test]
fn service_and_monitors_select_the_daemon_and_its_metrics_port() {
    let m = Manifests::load();
    let ds: DaemonSet = m.one("DaemonSet");
    let labels = pod_labels(&ds);
    let c = container(&ds);
    let port_names: BTreeSet<&str> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|p| p.name.as_deref())
        .collect();

    let svc: Service = m.one("Service");
    let spec = svc.spec.as_ref().unwrap();
    assert!(is_subset(spec.selector.as_ref().unwrap(), &labels));
    let ports = spec.ports.as_ref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(ports[0].port, 9464);
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let IntOrString::String(target) = ports[0].target_port.clone().unwrap() else {
        panic!("targetPort should name the container port");
    };
    assert!(port_names.contains(target.as_str()));
    let svc_labels = svc.metadata.labels.clone().unwrap();

    // prometheus-operator's types are not in k8s-openapi: check the fields
    // that matter as JSON.
    for (kind, endpoints, selects, ports) in [
        (
            "ServiceMonitor",
            "endpoints",
            &svc_labels,
            BTreeSet::from(["metrics"]),
        ),
        (
            "PodMonitor",
            "podMetricsEndpoints",
            &labels,
            port_names.clone(),
        ),
    ] {
        let docs = m.raw(kind);
        assert_eq!(docs.len(), 1, "{kind}");
        let (f, d) = &docs[0];
        assert_eq!(
            d["apiVersion"],
            "monitoring.coreos.com/v1",
            "{}",
            f.display()
        );
        let spec = d["spec"].as_object().unwrap();
        let mut keys: Vec<&str> = spec.keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec!["namespaceSelector", "selector", endpoints];
        want.sort();
        assert_eq!(keys, want, "{}", f.display());
        assert!(
            is_subset(&string_map(&d["spec"]["selector"]["matchLabels"]), selects),
            "{kind}"
        );
        assert_eq!(
            d["spec"]["namespaceSelector"]["matchNames"],
            serde_json::json!([NAMESPACE])
        );
        let eps = d["spec"][endpoints].as_array().unwrap();
        assert!(!eps.is_empty());
        for ep in eps {
            assert!(ports.contains(ep["port"].as_str().unwrap()), "{kind}: {ep}");
            assert_eq!(ep["path"], "/metrics");
        }
    }
}
