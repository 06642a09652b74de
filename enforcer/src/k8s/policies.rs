//! `AgentPolicy` objects from the Kubernetes API, and the status the daemon
//! reports on them.
//!
//! Watch: one watcher per daemon over all namespaces (`kube::runtime::watcher`,
//! list then watch, restarted with the default backoff). Objects are read
//! as `DynamicObject`s, not as the typed [`AgentPolicy`]: the typed spec
//! checks values while deserializing, and one object with a bad value would
//! make the whole list fail to decode (no policy object at all would load).
//! Raw, each spec goes through the file validator on its own
//! (`super::crd::object_policy`) and a bad one is rejected alone. Like
//! [`super::watch::PodCache`], [`PolicyCache`] replaces its whole content at
//! the end of a relist (after a `410 Gone`), so an object deleted while the
//! watch was down disappears too. A missing CRD (404) is logged as an error
//! on every retry; the cache keeps what it had (nothing, at start), so file
//! policies keep working.
//!
//! Status: see [`AgentPolicyStatus`]. [`desired_status`] computes what this
//! node would write; [`StatusWriter`] writes it with server-side apply on the
//! `status` subresource (field manager `enforcer-node-<node>`, forced), only
//! when it differs from what the object says (and from what this node last
//! wrote), ignoring `lastTransitionTime`, which is kept while the
//! condition's status does not flip. A write that reports a rejection also
//! records a `Warning` Event (`PolicyRejected`) regarding the object.
use std::collections::HashMap;

use futures::{Stream, StreamExt};
use k8s_openapi::{api::core::v1::ObjectReference, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher, WatchStreamExt,
    },
    Api, Client,
};

use super::crd::{AgentPolicy, AgentPolicyStatus, NodeStatus};

/// The API resource of `AgentPolicy` (group, version, plural).
pub fn api_resource() -> ApiResource {
    ApiResource::erase::<AgentPolicy>(&())
}

/// What the daemon keeps of an `AgentPolicy` object.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyObject {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// `spec`, raw (validated by the daemon, not by deserialization).
    pub spec: serde_json::Value,
    /// `status` as stored (`None` when absent or not decodable).
    pub status: Option<AgentPolicyStatus>,
}

/// The parts of `o` the daemon uses; `None` without UID, name or namespace.
pub fn policy_object(o: &DynamicObject) -> Option<PolicyObject> {
    let m = &o.metadata;
    Some(PolicyObject {
        uid: m.uid.clone()?,
        namespace: m.namespace.clone()?,
        name: m.name.clone()?,
        generation: m.generation,
        spec: o
            .data
            .get("spec")
            .cloned()
            .unwrap_or(serde_json::Value::Null),
        status: o
            .data
            .get("status")
            .and_then(|s| serde_json::from_value(s.clone()).ok()),
    })
}

/// Equal but for `status`.
fn same_policy(a: &PolicyObject, b: &PolicyObject) -> bool {
    (&a.uid, &a.namespace, &a.name, a.generation, &a.spec)
        == (&b.uid, &b.namespace, &b.name, b.generation, &b.spec)
}

/// The cluster's `AgentPolicy` objects by UID, kept from watcher events.
#[derive(Debug, Default)]
pub struct PolicyCache(super::cache::UidCache<PolicyObject>);

impl PolicyCache {
    /// Apply one watcher event; true when what the policies depend on
    /// changed. A change of `status` alone (the daemons' own writes) is
    /// stored but is no change: it does not need a reload.
    pub fn apply(&mut self, ev: watcher::Event<DynamicObject>) -> bool {
        self.0.apply(
            ev,
            |o| policy_object(o).map(|e| (e.uid.clone(), e)),
            same_policy,
        )
    }

    /// Whether a complete list of the objects arrived at least once (until
    /// then an absent object may just not be listed yet).
    pub fn synced(&self) -> bool {
        self.0.synced()
    }

    pub fn get(&self, uid: &str) -> Option<&PolicyObject> {
        self.0.get(uid)
    }

    pub fn objects(&self) -> impl Iterator<Item = &PolicyObject> {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The event stream of all `AgentPolicy` objects (list + watch, restarted
/// with backoff).
pub fn all_policies(
    client: Client,
) -> impl Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>> + Send {
    let api: Api<DynamicObject> = Api::all_with(client, &api_resource());
    watcher(api, watcher::Config::default()).default_backoff()
}

/// Whether a watch error says that the API server does not serve the
/// resource (the CRD is not installed).
pub fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Feed `AgentPolicy` events into `cache` until the stream ends; `changed`
/// is called after each event that changed the cache.
pub async fn run(
    client: Client,
    cache: std::sync::Arc<std::sync::Mutex<PolicyCache>>,
    changed: impl Fn() + Send,
) {
    let stream = all_policies(client);
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                let c = cache.lock().unwrap_or_else(|e| e.into_inner()).apply(ev);
                if c {
                    changed();
                }
            }
            Err(e) if is_not_found(&e) => tracing::error!(
                "AgentPolicy objects cannot be read: the API server does not serve \
                 agentpolicies.enforcer.dev (404: is the CRD deploy/10-crd.yaml installed?). \
                 Retrying with backoff; policy files keep working. Set \
                 kubernetes.agentPolicies: false if this cluster has no CRD. ({e})"
            ),
            Err(e) => tracing::warn!("AgentPolicy watch: {e} (retrying)"),
        }
    }
}

/// The node-independent verdict on an object's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Validated; the policy hash.
    Valid(String),
    /// Rejected; the validator's (or compiler's) errors.
    Invalid(Vec<String>),
}

/// What the daemon has to say about one object (computed under the state
/// lock, written by [`StatusWriter`] outside it).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// The status stored on the object (as last seen by the watcher).
    pub current: Option<AgentPolicyStatus>,
    pub verdict: Verdict,
    /// This node's entry (`node` filled by the writer).
    pub node: NodeStatus,
}

/// The field manager of `node`'s status writes.
pub fn field_manager(node: &str) -> String {
    // Field managers are at most 128 characters (node names are DNS
    // subdomains, at most 253).
    format!("enforcer-node-{node}").chars().take(128).collect()
}

/// The status `node` wants on the object of `r`, or `None` when the
/// object already says it (or this node already wrote it: `last`).
/// Compared without `lastTransitionTime`; that is kept from the stored
/// condition when its status does not flip, else `now`.
pub fn desired_status(
    node: &str,
    r: &Report,
    last: Option<&AgentPolicyStatus>,
    now: Time,
) -> Option<AgentPolicyStatus> {
    let mut want = match &r.verdict {
        Verdict::Valid(hash) => AgentPolicyStatus::accepted(r.generation, hash, now),
        Verdict::Invalid(errors) => AgentPolicyStatus::rejected(r.generation, errors, now),
    };
    let mut entry = r.node.clone();
    entry.node = node.to_owned();
    want.nodes = vec![entry];
    if let (Some(c), Some(old)) = (
        want.conditions.first_mut(),
        r.current.as_ref().and_then(|s| s.accepted_condition()),
    ) {
        if old.status == c.status {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    let mine = |s: &AgentPolicyStatus| normalized(s, node);
    let w = mine(&want);
    let stored = r.current.as_ref().map(mine);
    if stored.as_ref() == Some(&w) || last.map(mine).as_ref() == Some(&w) {
        return None;
    }
    Some(want)
}

/// `s` as `node` compares it: its own node entry only, no transition times.
fn normalized(s: &AgentPolicyStatus, node: &str) -> AgentPolicyStatus {
    let mut s = s.clone();
    for c in &mut s.conditions {
        c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    }
    s.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    s.nodes.retain(|n| n.node == node);
    s
}

/// The server-side apply body of `status` for object `namespace`/`name`.
pub fn apply_body(namespace: &str, name: &str, status: &AgentPolicyStatus) -> serde_json::Value {
    let ar = api_resource();
    serde_json::json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "metadata": {"name": name, "namespace": namespace},
        "status": status,
    })
}

/// Writes this node's reports (status, events); keeps what it wrote.
pub struct StatusWriter {
    client: Client,
    node: String,
    recorder: Recorder,
    /// uid -> the status this node last wrote successfully.
    written: HashMap<String, AgentPolicyStatus>,
}

impl StatusWriter {
    pub fn new(client: Client, node: &str) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "enforcer".into(),
                instance: Some(node.to_owned()),
            },
        );
        Self {
            client,
            node: node.to_owned(),
            recorder,
            written: HashMap::new(),
        }
    }

    /// Write what changed among `reports`; returns the number of status
    /// writes made. API errors are logged; the write is tried again on the
    /// next call.
    pub async fn sync(&mut self, reports: &[Report]) -> usize {
        let live: std::collections::HashSet<&str> =
            reports.iter().map(|r| r.uid.as_str()).collect();
        self.written.retain(|uid, _| live.contains(uid.as_str()));
        let mut writes = 0;
        for r in reports {
            let now = Time(k8s_openapi::jiff::Timestamp::now());
            let Some(want) = desired_status(&self.node, r, self.written.get(&r.uid), now) else {
                continue;
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &r.namespace, &api_resource());
            let pp = PatchParams::apply(&field_manager(&self.node)).force();
            let body = apply_body(&r.namespace, &r.name, &want);
            match api.patch_status(&r.name, &pp, &Patch::Apply(&body)).await {
                Ok(_) => {
                    writes += 1;
                    tracing::info!(object = %format!("{}/{}", r.namespace, r.name), accepted = matches!(r.verdict, Verdict::Valid(_)), enforced = r.node.enforced, "AgentPolicy status written");
                    self.written.insert(r.uid.clone(), want);
                }
                Err(e) => {
                    tracing::warn!(object = %format!("{}/{}", r.namespace, r.name), "writing AgentPolicy status: {e} (tried again later)");
                    continue;
                }
            }
            if let Some(note) = rejection_note(r) {
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "PolicyRejected".into(),
                    note: Some(note),
                    action: "Validate".into(),
                    secondary: None,
                };
                if let Err(e) = self.recorder.publish(&ev, &object_ref(r)).await {
                    tracing::warn!(object = %format!("{}/{}", r.namespace, r.name), "recording the rejection event: {e}");
                }
            }
        }
        writes
    }
}

/// The event note of a report that rejects something (at most 1 kB, as
/// the Events API allows), or `None`.
pub fn rejection_note(r: &Report) -> Option<String> {
    let mut note = match (&r.verdict, &r.node.message) {
        (Verdict::Invalid(errors), _) => format!(
            "rejected{}: {}",
            if r.node.enforced {
                "; the previously accepted version stays in force"
            } else {
                ""
            },
            errors.join("; ")
        ),
        (Verdict::Valid(_), Some(m)) => format!("not enforced on this node: {m}"),
        (Verdict::Valid(_), None) => return None,
    };
    if note.len() > 1024 {
        let mut end = 1021;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    Some(note)
}

/// The object `r` is about, for events.
pub fn object_ref(r: &Report) -> ObjectReference {
    let ar = api_resource();
    ObjectReference {
        api_version: Some(ar.api_version),
        kind: Some(ar.kind),
        name: Some(r.name.clone()),
        namespace: Some(r.namespace.clone()),
        uid: Some(r.uid.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
