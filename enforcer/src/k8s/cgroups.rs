//! Container to cgroup: where the kubelet and the container runtime put a
//! pod's and its containers' cgroup v2 directories.
//!
//! # Layouts
//!
//! The kubelet names a pod's cgroup abstractly as the list
//! `[<cgroup-root parts>.., "kubepods", <qos>.., "pod<uid>"]`, where `<qos>` is
//! empty for Guaranteed pods, `burstable` or `besteffort` otherwise
//! (kubernetes `pkg/kubelet/cm/qos_container_manager_linux.go`,
//! `pod_container_manager_linux.go`). The cgroup driver turns that list into a
//! path (`pkg/kubelet/cm/cgroup_manager_linux.go`):
//!
//! | driver | pod cgroup (Burstable; Guaranteed drops the QoS level) |
//! |---|---|
//! | `systemd` | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//! | `cgroupfs` | `kubepods/burstable/pod<uid>` |
//!
//! Under systemd every component is escaped (`-` becomes `_`, so the UID
//! `1b4e28ba-2fa1-…` appears as `1b4e28ba_2fa1_…`) and each level is a slice
//! named by all the components above it joined with `-` (systemd's slice
//! expansion, runc's `ExpandSlice`). The kubelet parses its `--cgroup-root`
//! as a cgroupfs path and prepends its components to the list, so under
//! cgroupfs `/foo` gives `foo/kubepods/…` and under systemd `/kubelet` gives
//! `kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/…`
//! (the layout of kind nodes). [`resolve_pod`] also tries the root as a
//! plain directory prefix in front of the default layout, which is what a
//! kubelet in its own cgroup namespace with the default root looks like from
//! the host, and what the integration tests build. A kubelet with both (a
//! namespaced node *and* a non-default root, as in kind) is found by passing
//! the node's cgroup-namespace root as `cgroup_root` and the kubelet's flag as
//! `kubelet_root`: `cgroup_root` is only a directory to resolve under.
//!
//! Inside the pod cgroup the runtime creates one cgroup per container (the
//! sandbox "pause" container included):
//!
//! | runtime | systemd driver | cgroupfs driver |
//! |---|---|---|
//! | containerd (CRI plugin) | `cri-containerd-<id>.scope` | `<id>` |
//! | CRI-O | `crio-<id>.scope` | `crio-<id>` |
//! | Docker (cri-dockerd) | `docker-<id>.scope` | `<id>` |
//!
//! CRI-O also creates `crio-conmon-<id>` (`.scope` under systemd) in the pod
//! cgroup for the container's monitor process: that is *not* the container
//! and is never returned for it. A runtime may nest further cgroups below a
//! container's (crun's `container` sub-cgroup); they are descendants and need
//! nothing of their own.
//!
//! # Keeping the window between container start and attach closed
//!
//! The enforcer binds the **pod-level** cgroup, not the containers'. The pod
//! cgroup is created by the kubelet before the sandbox (pause) container and
//! therefore before any init, app or ephemeral container of the pod starts.
//! The enforcer's cgroup programs run for every descendant of the cgroup they
//! are attached to, and its identity lookup walks from the current cgroup up
//! to the nearest bound ancestor (`bpf_get_current_ancestor_cgroup_id`), so a
//! container whose cgroup appears later is enforced from its first
//! instruction: there is no moment at which it runs in an unbound cgroup, and
//! no race with the runtime's `mkdir` to win. Binding as soon as
//! [`resolve_pod`] finds the directory (the pod watcher retries until it
//! exists, and the pod cannot run containers before it does) is what closes
//! the window. Per-container cgroups ([`resolve_container`]) serve status and
//! attribution (which container of the pod made a connection) only.
//!
//! Paths returned by the `*_candidates` functions are relative to the cgroup2
//! mount; the `resolve_*` functions return the existing directory as
//! `cgroup_root.join(relative)`.
use std::{
    fmt,
    path::{Component, Path, PathBuf},
    str::FromStr,
};

/// The container runtime, from the scheme of a CRI container ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// containerd's CRI plugin (`containerd://`).
    Containerd,
    /// CRI-O (`cri-o://`).
    CriO,
    /// Docker through cri-dockerd (`docker://`).
    Docker,
}

impl Runtime {
    /// The scheme of `Pod.status.containerStatuses[].containerID`.
    pub fn scheme(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
        }
    }
}

/// The kubelet's (and the runtime's, which must agree) cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// `Pod.status.qosClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The kubelet's QoS level below `kubepods` (none for Guaranteed).
    fn level(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

impl FromStr for QosClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "Guaranteed" => Ok(QosClass::Guaranteed),
            "Burstable" => Ok(QosClass::Burstable),
            "BestEffort" => Ok(QosClass::BestEffort),
            _ => Err(format!(
                "unknown QoS class {s:?} (expected Guaranteed, Burstable or BestEffort)"
            )),
        }
    }
}

/// A container ID as in `Pod.status.containerStatuses[].containerID` (also
/// `initContainerStatuses` and `ephemeralContainerStatuses`):
/// `containerd://<64 hex>`, `cri-o://<64 hex>`, `docker://<64 hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerId {
    pub runtime: Runtime,
    /// 64 lowercase hex digits (validated by `FromStr`: it becomes a path
    /// component, so nothing else may get through).
    pub id: String,
}

/// Why a container ID string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerIdError {
    #[error("container ID {0:?} has no \"<runtime>://\" prefix")]
    NoScheme(String),
    #[error("container ID {0:?}: unknown runtime {1:?} (supported: containerd, cri-o, docker)")]
    UnknownRuntime(String, String),
    #[error("container ID {0:?}: the ID must be 64 lowercase hex digits ({1})")]
    Malformed(String, &'static str),
}

impl FromStr for ContainerId {
    type Err = ContainerIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((scheme, id)) = s.split_once("://") else {
            return Err(ContainerIdError::NoScheme(s.to_string()));
        };
        let runtime = match scheme {
            "containerd" => Runtime::Containerd,
            "cri-o" => Runtime::CriO,
            "docker" => Runtime::Docker,
            _ => {
                return Err(ContainerIdError::UnknownRuntime(
                    s.to_string(),
                    scheme.to_string(),
                ))
            }
        };
        if id.len() != 64 {
            return Err(ContainerIdError::Malformed(
                s.to_string(),
                if id.is_empty() {
                    "it is empty"
                } else {
                    "wrong length"
                },
            ));
        }
        if !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ContainerIdError::Malformed(
                s.to_string(),
                "not lowercase hex",
            ));
        }
        Ok(ContainerId {
            runtime,
            id: id.to_string(),
        })
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.runtime.scheme(), self.id)
    }
}

/// What the resolver needs of a pod: `metadata.uid` and `status.qosClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRef<'a> {
    pub uid: &'a str,
    pub qos: QosClass,
}

/// A UID that may become a path component: non-empty, ASCII alphanumerics and
/// `-` only (API-server UUIDs, and the hex hashes of static/mirror pods).
/// Anything else yields no candidates, so a hostile string never walks the
/// cgroup tree.
fn uid_ok(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// systemd's escaping of one kubelet cgroup-name component.
fn systemd_escape(part: &str) -> String {
    part.replace('-', "_")
}

/// The kubelet's abstract pod cgroup name below the cgroup root.
fn pod_name_parts(pod: &PodRef) -> Vec<String> {
    let mut v = vec!["kubepods".to_string()];
    if let Some(l) = pod.qos.level() {
        v.push(l.to_string());
    }
    v.push(format!("pod{}", pod.uid));
    v
}

/// systemd: `[a, b, c]` → `a.slice/a-b.slice/a-b-c.slice` (components escaped).
fn systemd_path(parts: &[String]) -> PathBuf {
    let esc: Vec<String> = parts.iter().map(|p| systemd_escape(p)).collect();
    let mut path = PathBuf::new();
    for i in 1..=esc.len() {
        path.push(format!("{}.slice", esc[..i].join("-")));
    }
    path
}

/// The kubelet's parse of `--cgroup-root`, whatever the driver: a cgroupfs
/// path split at `/` (`ParseCgroupfsToCgroupName` in
/// `pkg/kubelet/cm/container_manager_linux.go`). Under systemd these parts
/// are then escaped and expanded like the rest of the name. `/`: no parts.
fn root_parts(root: &Path) -> Option<Vec<String>> {
    let rel = relative_root(root)?;
    Some(
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect(),
    )
}

/// A kubelet root as a relative path (leading `/` dropped); `None` if it
/// would leave the cgroup tree (`..`).
fn relative_root(root: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in root.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Pod cgroup candidates (relative) for a driver and an optional kubelet
/// `--cgroup-root`, most faithful to the kubelet first.
fn pod_candidates_rooted(
    pod: &PodRef,
    driver: Driver,
    kubelet_root: Option<&Path>,
) -> Vec<PathBuf> {
    if !uid_ok(pod.uid) {
        return Vec::new();
    }
    let name = pod_name_parts(pod);
    let plain = match kubelet_root {
        None => PathBuf::new(),
        Some(r) => match relative_root(r) {
            Some(p) => p,
            None => return Vec::new(),
        },
    };
    let mut out = Vec::new();
    match driver {
        Driver::Systemd => {
            let mut full = kubelet_root.and_then(root_parts).unwrap_or_default();
            full.extend(name.iter().cloned());
            out.push(systemd_path(&full));
            // The default layout below the root taken as a directory prefix.
            if !plain.as_os_str().is_empty() {
                let p = plain.join(systemd_path(&name));
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        Driver::Cgroupfs => {
            let mut p = plain;
            for part in &name {
                p.push(part);
            }
            out.push(p);
        }
    }
    out
}

/// The name of a container's cgroup inside its pod's cgroup.
fn container_leaf(c: &ContainerId, driver: Driver) -> String {
    match (driver, c.runtime) {
        (Driver::Systemd, Runtime::Containerd) => format!("cri-containerd-{}.scope", c.id),
        (Driver::Systemd, Runtime::CriO) => format!("crio-{}.scope", c.id),
        (Driver::Systemd, Runtime::Docker) => format!("docker-{}.scope", c.id),
        (Driver::Cgroupfs, Runtime::Containerd | Runtime::Docker) => c.id.clone(),
        (Driver::Cgroupfs, Runtime::CriO) => format!("crio-{}", c.id),
    }
}

/// An ID that may become a path component (a `ContainerId` built by hand
/// rather than parsed gets the same check as `FromStr`).
fn id_ok(c: &ContainerId) -> bool {
    c.id.len() == 64 && c.id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Candidate cgroup v2 paths (relative to the cgroup2 mount) of the pod-level
/// cgroup, for a driver, with the kubelet's default (empty) cgroup root.
pub fn pod_cgroup_candidates(pod: &PodRef, driver: Driver) -> Vec<PathBuf> {
    pod_candidates_rooted(pod, driver, None)
}

/// Candidate cgroup v2 paths (relative to the cgroup2 mount) of one
/// container's cgroup, for a driver, with the default cgroup root.
pub fn container_cgroup_candidates(pod: &PodRef, c: &ContainerId, driver: Driver) -> Vec<PathBuf> {
    container_candidates_rooted(pod, c, driver, None)
}

fn container_candidates_rooted(
    pod: &PodRef,
    c: &ContainerId,
    driver: Driver,
    kubelet_root: Option<&Path>,
) -> Vec<PathBuf> {
    if !id_ok(c) {
        return Vec::new();
    }
    let leaf = container_leaf(c, driver);
    pod_candidates_rooted(pod, driver, kubelet_root)
        .into_iter()
        .map(|p| p.join(&leaf))
        .collect()
}

/// Drivers in the order they are tried (systemd is the kubeadm default).
const DRIVERS: [Driver; 2] = [Driver::Systemd, Driver::Cgroupfs];

/// Find the pod's cgroup under `cgroup_root` (the cgroup2 mount): tries both
/// drivers, with the kubelet's `--cgroup-root` (`kubelet_root`, default
/// none), and returns the first existing directory as
/// `cgroup_root.join(relative)` with the driver it matched. `None` until the
/// kubelet has created it (retry: it exists before any container runs).
pub fn resolve_pod(
    cgroup_root: &Path,
    kubelet_root: Option<&Path>,
    pod: &PodRef,
) -> Option<(PathBuf, Driver)> {
    DRIVERS.iter().find_map(|&d| {
        pod_candidates_rooted(pod, d, kubelet_root)
            .into_iter()
            .map(|rel| cgroup_root.join(rel))
            .find(|p| p.is_dir())
            .map(|p| (p, d))
    })
}

/// The directories the kubelet creates the pod's cgroup in (its QoS-level
/// parents, every driver), absolute under `cgroup_root`. The daemon watches
/// those that exist while a selected pod has no cgroup yet, so the pod is
/// bound when its cgroup appears rather than on the next periodic resync.
pub fn pod_parent_dirs(
    cgroup_root: &Path,
    kubelet_root: Option<&Path>,
    pod: &PodRef,
) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for d in DRIVERS {
        for rel in pod_candidates_rooted(pod, d, kubelet_root) {
            if let Some(parent) = cgroup_root.join(rel).parent() {
                if !out.iter().any(|p| p == parent) {
                    out.push(parent.to_path_buf());
                }
            }
        }
    }
    out
}

/// Find one container's cgroup under `cgroup_root`, as [`resolve_pod`] does
/// for the pod. Never CRI-O's `crio-conmon-<id>` (the monitor, not the
/// container). For status and attribution: enforcement binds the pod.
pub fn resolve_container(
    cgroup_root: &Path,
    kubelet_root: Option<&Path>,
    pod: &PodRef,
    c: &ContainerId,
) -> Option<PathBuf> {
    DRIVERS.iter().find_map(|&d| {
        container_candidates_rooted(pod, c, d, kubelet_root)
            .into_iter()
            .map(|rel| cgroup_root.join(rel))
            .find(|p| p.is_dir())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const UID_: &str = "1b4e28ba_2fa1_11d2_883f_0016d3cca427";
    const QOS: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];

    fn id(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }
    fn cid(rt: Runtime, c: char) -> ContainerId {
        ContainerId {
            runtime: rt,
            id: id(c),
        }
    }
    fn pod(qos: QosClass) -> PodRef<'static> {
        PodRef { uid: UID, qos }
    }

    /// The layouts written out by hand, as seen on nodes.
    fn expected_pod(driver: Driver, qos: QosClass) -> &'static str {
        match (driver, qos) {
            (Driver::Systemd, QosClass::Guaranteed) => {
                "kubepods.slice/kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice"
            }
            (Driver::Systemd, QosClass::Burstable) => {
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice"
            }
            (Driver::Systemd, QosClass::BestEffort) => {
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice"
            }
            (Driver::Cgroupfs, QosClass::Guaranteed) => {
                "kubepods/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427"
            }
            (Driver::Cgroupfs, QosClass::Burstable) => {
                "kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427"
            }
            (Driver::Cgroupfs, QosClass::BestEffort) => {
                "kubepods/besteffort/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427"
            }
        }
    }

    fn expected_leaf(driver: Driver, rt: Runtime, id: &str) -> String {
        match (driver, rt) {
            (Driver::Systemd, Runtime::Containerd) => format!("cri-containerd-{id}.scope"),
            (Driver::Systemd, Runtime::CriO) => format!("crio-{id}.scope"),
            (Driver::Systemd, Runtime::Docker) => format!("docker-{id}.scope"),
            (Driver::Cgroupfs, Runtime::CriO) => format!("crio-{id}"),
            (Driver::Cgroupfs, _) => id.to_string(),
        }
    }

    #[test]
    fn parses_container_ids() {
        let c: ContainerId = format!("containerd://{}", id('a')).parse().unwrap();
        assert_eq!(c, cid(Runtime::Containerd, 'a'));
        let c: ContainerId = format!("cri-o://{}", id('0')).parse().unwrap();
        assert_eq!(c, cid(Runtime::CriO, '0'));
        let c: ContainerId = format!("docker://{}", id('f')).parse().unwrap();
        assert_eq!(c.runtime, Runtime::Docker);
        assert_eq!(c.to_string(), format!("docker://{}", id('f')));
    }

    #[test]
    fn malformed_container_ids_are_errors() {
        let good = id('a');
        let cases = [
            (good.clone(), "no \"<runtime>://\" prefix"),
            (format!("rkt://{good}"), "unknown runtime \"rkt\""),
            (format!("CONTAINERD://{good}"), "unknown runtime"),
            (format!("://{good}"), "unknown runtime"),
            ("containerd://".to_string(), "it is empty"),
            (format!("containerd://{}", &good[..63]), "wrong length"),
            (format!("containerd://{good}a"), "wrong length"),
            (
                format!("containerd://{}", good.to_uppercase()),
                "not lowercase hex",
            ),
            (format!("cri-o://{}g", &good[..63]), "not lowercase hex"),
            (
                format!("containerd://../../{}", &good[..58]),
                "not lowercase hex",
            ),
            (
                format!("containerd:///{}", &good[..63]),
                "not lowercase hex",
            ),
        ];
        for (s, want) in cases {
            let e = s.parse::<ContainerId>().expect_err(&s).to_string();
            assert!(
                e.contains(want),
                "{s:?}: error {e:?} should mention {want:?}"
            );
        }
    }

    #[test]
    fn systemd_maps_uid_dashes_to_underscores() {
        let p = pod_cgroup_candidates(&pod(QosClass::Burstable), Driver::Systemd);
        assert_eq!(p.len(), 1);
        let s = p[0].to_str().unwrap();
        assert!(
            s.ends_with(&format!("kubepods-burstable-pod{UID_}.slice")),
            "{s}"
        );
        assert!(!s.contains(UID), "{s}");
        // cgroupfs keeps the UID as it is.
        let p = pod_cgroup_candidates(&pod(QosClass::Burstable), Driver::Cgroupfs);
        assert_eq!(
            p,
            vec![PathBuf::from(format!("kubepods/burstable/pod{UID}"))]
        );
    }

    #[test]
    fn candidates_match_the_layouts() {
        for driver in DRIVERS {
            for qos in QOS {
                let p = pod(qos);
                assert_eq!(
                    pod_cgroup_candidates(&p, driver),
                    vec![PathBuf::from(expected_pod(driver, qos))],
                    "{driver:?} {qos:?}"
                );
                for rt in [Runtime::Containerd, Runtime::CriO, Runtime::Docker] {
                    let c = cid(rt, 'b');
                    assert_eq!(
                        container_cgroup_candidates(&p, &c, driver),
                        vec![PathBuf::from(expected_pod(driver, qos))
                            .join(expected_leaf(driver, rt, &c.id))],
                        "{driver:?} {qos:?} {rt:?}"
                    );
                }
            }
        }
    }

    /// All four runtime × driver layouts (plus docker) × three QoS classes, built as
    /// plain directories standing for the cgroup2 mount.
    #[test]
    fn resolves_fixture_trees() {
        for driver in DRIVERS {
            for rt in [Runtime::Containerd, Runtime::CriO, Runtime::Docker] {
                for qos in QOS {
                    let t = tempfile::tempdir().unwrap();
                    let root = t.path();
                    let p = pod(qos);
                    let pod_dir = root.join(expected_pod(driver, qos));
                    let app = cid(rt, '1');
                    let init = cid(rt, '2');
                    let eph = cid(rt, '3');
                    let what = format!("{driver:?} {rt:?} {qos:?}");
                    assert_eq!(resolve_pod(root, None, &p), None, "{what}: nothing yet");
                    // The sandbox creates the pod cgroup first: the pod resolves
                    // before any container does.
                    std::fs::create_dir_all(&pod_dir).unwrap();
                    assert_eq!(
                        resolve_pod(root, None, &p),
                        Some((pod_dir.clone(), driver)),
                        "{what}"
                    );
                    assert_eq!(resolve_container(root, None, &p, &app), None, "{what}");
                    for c in [&app, &init, &eph] {
                        std::fs::create_dir(pod_dir.join(expected_leaf(driver, rt, &c.id)))
                            .unwrap();
                    }
                    for c in [&app, &init, &eph] {
                        assert_eq!(
                            resolve_container(root, None, &p, c),
                            Some(pod_dir.join(expected_leaf(driver, rt, &c.id))),
                            "{what} {c}"
                        );
                    }
                    // Another pod's UID, or another QoS class, does not match.
                    let other = PodRef {
                        uid: "00000000-0000-0000-0000-000000000000",
                        qos,
                    };
                    assert_eq!(resolve_pod(root, None, &other), None, "{what}");
                    for q in QOS.into_iter().filter(|q| *q != qos) {
                        let wrong = PodRef { uid: UID, qos: q };
                        assert_eq!(resolve_pod(root, None, &wrong), None, "{what} as {q:?}");
                    }
                    // Another runtime's ID of the same hex does not match
                    // (except docker vs containerd under cgroupfs: same name).
                    if !(driver == Driver::Cgroupfs && rt != Runtime::CriO) {
                        let other_rt = if rt == Runtime::CriO {
                            Runtime::Containerd
                        } else {
                            Runtime::CriO
                        };
                        assert_eq!(
                            resolve_container(root, None, &p, &cid(other_rt, '1')),
                            None,
                            "{what}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn crio_conmon_cgroup_is_not_the_container() {
        for driver in DRIVERS {
            let t = tempfile::tempdir().unwrap();
            let p = pod(QosClass::Burstable);
            let c = cid(Runtime::CriO, 'c');
            let pod_dir = t.path().join(expected_pod(driver, QosClass::Burstable));
            let conmon = match driver {
                Driver::Systemd => format!("crio-conmon-{}.scope", c.id),
                Driver::Cgroupfs => format!("crio-conmon-{}", c.id),
            };
            std::fs::create_dir_all(pod_dir.join(conmon)).unwrap();
            assert_eq!(
                resolve_container(t.path(), None, &p, &c),
                None,
                "{driver:?}"
            );
            std::fs::create_dir(pod_dir.join(expected_leaf(driver, Runtime::CriO, &c.id))).unwrap();
            let got = resolve_container(t.path(), None, &p, &c).unwrap();
            assert!(
                !got.to_str().unwrap().contains("conmon"),
                "{}",
                got.display()
            );
        }
    }

    #[test]
    fn kubelet_cgroup_root_systemd_expands_like_the_kubelet() {
        // kind: --cgroup-root=/kubelet with the systemd driver.
        let t = tempfile::tempdir().unwrap();
        let p = pod(QosClass::BestEffort);
        let dir = t.path().join(format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_}.slice"
        ));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(resolve_pod(t.path(), None, &p), None);
        for root in ["/kubelet", "kubelet", "/kubelet/"] {
            assert_eq!(
                resolve_pod(t.path(), Some(Path::new(root)), &p),
                Some((dir.clone(), Driver::Systemd)),
                "{root}"
            );
        }
        // A root is a cgroupfs path to the kubelet: components are escaped
        // and expanded like the rest of the name.
        let r = pod_candidates_rooted(&p, Driver::Systemd, Some(Path::new("/a-b")));
        assert_eq!(
            r[0],
            PathBuf::from(format!(
                "a_b.slice/a_b-kubepods.slice/a_b-kubepods-besteffort.slice/\
                 a_b-kubepods-besteffort-pod{UID_}.slice"
            ))
        );
        let r = pod_candidates_rooted(&p, Driver::Systemd, Some(Path::new("/a/b")));
        assert_eq!(
            r[0],
            PathBuf::from(format!(
                "a.slice/a-b.slice/a-b-kubepods.slice/a-b-kubepods-besteffort.slice/\
                 a-b-kubepods-besteffort-pod{UID_}.slice"
            ))
        );
        // "/" is the default root.
        assert_eq!(
            pod_candidates_rooted(&p, Driver::Systemd, Some(Path::new("/"))),
            pod_cgroup_candidates(&p, Driver::Systemd)
        );
    }

    #[test]
    fn kubelet_cgroup_root_as_directory_prefix() {
        for driver in DRIVERS {
            for qos in QOS {
                let t = tempfile::tempdir().unwrap();
                let p = pod(qos);
                let c = cid(Runtime::Containerd, 'd');
                let pod_dir = t
                    .path()
                    .join("nested/node-1")
                    .join(expected_pod(driver, qos));
                let leaf = pod_dir.join(expected_leaf(driver, Runtime::Containerd, &c.id));
                std::fs::create_dir_all(&leaf).unwrap();
                let root = Path::new("/nested/node-1");
                assert_eq!(resolve_pod(t.path(), None, &p), None);
                assert_eq!(
                    resolve_pod(t.path(), Some(root), &p),
                    Some((pod_dir, driver)),
                    "{driver:?} {qos:?}"
                );
                assert_eq!(resolve_container(t.path(), Some(root), &p, &c), Some(leaf));
            }
        }
    }

    #[test]
    fn hostile_inputs_yield_no_candidates() {
        for uid in ["", "../x", "a/b", "a.b", "a b"] {
            let p = PodRef {
                uid,
                qos: QosClass::Burstable,
            };
            for d in DRIVERS {
                assert!(pod_cgroup_candidates(&p, d).is_empty(), "{uid:?}");
            }
        }
        let p = pod(QosClass::Burstable);
        let bad = ContainerId {
            runtime: Runtime::Containerd,
            id: "../../etc".into(),
        };
        for d in DRIVERS {
            assert!(container_cgroup_candidates(&p, &bad, d).is_empty());
        }
        assert!(
            pod_candidates_rooted(&p, Driver::Cgroupfs, Some(Path::new("/a/../../b"))).is_empty()
        );
        // A static pod's UID (hex hash, no dashes) is fine.
        let s = PodRef {
            uid: "6f1b2c3d4e5f60718293a4b5c6d7e8f9",
            qos: QosClass::Guaranteed,
        };
        assert_eq!(
            pod_cgroup_candidates(&s, Driver::Systemd),
            vec![PathBuf::from(
                "kubepods.slice/kubepods-pod6f1b2c3d4e5f60718293a4b5c6d7e8f9.slice"
            )]
        );
    }

    #[test]
    fn pod_parent_dirs_are_the_qos_level_directories() {
        let root = Path::new("/sys/fs/cgroup");
        let pod = pod(QosClass::Burstable);
        assert_eq!(
            pod_parent_dirs(root, None, &pod),
            vec![
                PathBuf::from("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice"),
                PathBuf::from("/sys/fs/cgroup/kubepods/burstable"),
            ]
        );
        let g = pod_parent_dirs(
            root,
            None,
            &super::PodRef {
                uid: UID,
                qos: QosClass::Guaranteed,
            },
        );
        assert_eq!(
            g,
            vec![
                PathBuf::from("/sys/fs/cgroup/kubepods.slice"),
                PathBuf::from("/sys/fs/cgroup/kubepods"),
            ]
        );
        let hostile = super::PodRef {
            uid: "../x",
            qos: QosClass::Burstable,
        };
        assert!(pod_parent_dirs(root, None, &hostile).is_empty());
    }

    #[test]
    fn qos_class_parses() {
        assert_eq!("Burstable".parse::<QosClass>(), Ok(QosClass::Burstable));
        assert_eq!("BestEffort".parse::<QosClass>(), Ok(QosClass::BestEffort));
        assert_eq!("Guaranteed".parse::<QosClass>(), Ok(QosClass::Guaranteed));
        assert!("besteffort".parse::<QosClass>().is_err());
    }
}
