//! The node's pods, from the Kubernetes API (kube + k8s-openapi).
//!
//! One watcher per daemon, scoped to its node with the field selector
//! `spec.nodeName=<NODE_NAME>` (the downward API gives the DaemonSet pod its
//! node name), so the API server sends only this node's pods. The watcher
//! (`kube::runtime::watcher`, list then watch, with the default backoff)
//! restarts by itself after a dropped connection or a `410 Gone` (expired
//! resourceVersion): it relists, and [`PodCache`] replaces its whole content
//! at the end of the relist, so a pod deleted while the connection was down
//! disappears too.
//!
//! What is kept of a pod ([`PodEntry`]): identity fields for the binding
//! (`super::binding`), its QoS class and UID (its pod-level cgroup), and the
//! container IDs of its init, app and ephemeral containers (their cgroups).

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};

use super::binding::PodInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerKind {
    Init,
    App,
    Ephemeral,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContainerEntry {
    pub name: String,
    pub kind: ContainerKind,
    /// `containerd://<id>`, `cri-o://<id>`; absent until the container was created.
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    pub info: PodInfo,
    /// `status.qosClass` (`Guaranteed`, `Burstable`, `BestEffort`).
    pub qos: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
    pub containers: Vec<ContainerEntry>,
}

impl PodEntry {
    /// The pod's reference for cgroup resolution (`BestEffort` when the
    /// API has not reported a QoS class yet).
    pub fn pod_ref(&self) -> super::cgroups::PodRef<'_> {
        super::cgroups::PodRef {
            uid: &self.info.uid,
            qos: self
                .qos
                .as_deref()
                .and_then(|q| q.parse().ok())
                .unwrap_or(super::cgroups::QosClass::BestEffort),
        }
    }
}

/// The parts of `p` the enforcer uses; `None` without a UID, name or namespace.
pub fn pod_entry(p: &Pod) -> Option<PodEntry> {
    let m = &p.metadata;
    let info = PodInfo {
        namespace: m.namespace.clone()?,
        name: m.name.clone()?,
        uid: m.uid.clone()?,
        service_account: p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
    };
    let status = p.status.as_ref();
    let mut containers = Vec::new();
    let mut add = |kind, list: Option<&Vec<ContainerStatus>>| {
        for c in list.into_iter().flatten() {
            containers.push(ContainerEntry {
                name: c.name.clone(),
                kind,
                container_id: c.container_id.clone().filter(|s| !s.is_empty()),
            });
        }
    };
    add(
        ContainerKind::Init,
        status.and_then(|s| s.init_container_statuses.as_ref()),
    );
    add(
        ContainerKind::App,
        status.and_then(|s| s.container_statuses.as_ref()),
    );
    add(
        ContainerKind::Ephemeral,
        status.and_then(|s| s.ephemeral_container_statuses.as_ref()),
    );
    Some(PodEntry {
        info,
        qos: status.and_then(|s| s.qos_class.clone()),
        phase: status.and_then(|s| s.phase.clone()),
        containers,
    })
}

/// The node's pods by UID, kept from watcher events.
#[derive(Debug, Default)]
pub struct PodCache(super::cache::UidCache<PodEntry>);

impl PodCache {
    /// Apply one watcher event; true when the visible content changed.
    pub fn apply(&mut self, ev: watcher::Event<Pod>) -> bool {
        self.0.apply(
            ev,
            |p| pod_entry(p).map(|e| (e.info.uid.clone(), e)),
            PartialEq::eq,
        )
    }

    pub fn get(&self, uid: &str) -> Option<&PodEntry> {
        self.0.get(uid)
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodEntry> {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The event stream of `node`'s pods (list + watch, restarted with backoff).
pub fn node_pods(
    client: Client,
    node: &str,
) -> impl Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send {
    let api: Api<Pod> = Api::all(client);
    watcher(
        api,
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
    .default_backoff()
}

/// Feed `node`'s pod events into `cache` until the stream ends; `changed`
/// is called after each event that changed the cache. Watch errors are
/// logged (the watcher retries with backoff).
pub async fn run(
    client: Client,
    node: String,
    cache: std::sync::Arc<std::sync::Mutex<PodCache>>,
    changed: impl Fn() + Send,
) {
    let stream = node_pods(client, &node);
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                let c = cache.lock().unwrap_or_else(|e| e.into_inner()).apply(ev);
                if c {
                    changed();
                }
            }
            Err(e) => tracing::warn!(node = %node, "pod watch: {e} (retrying)"),
        }
    }
}

#[cfg(test)]
mod tests;
