//! DNS proxy listeners in the network namespaces of bound workloads.
//!
//! The kernel steers a bound process's DNS to `127.0.0.1:<dns_port>` in the
//! process's own network namespace. In Kubernetes each pod has its own, and
//! the daemon (a DaemonSet pod) listens in another one: without this, every
//! DNS query of an enforced pod would fail (closed, but broken).
//!
//! On every reconcile (the 2 s tick, pod events, reloads) [`sync`]:
//! - finds the namespaces the processes of each bound cgroup tree use
//!   (`/proc/<pid>/ns/net`, deduplicated by (dev, inode); the daemon's own
//!   namespace is skipped: the proxy's home listeners serve it), for every
//!   cgroup bound to a loaded policy with a DNS proxy;
//! - for each new (namespace, identity) opens the namespace (one fd, held
//!   by the listener set and closed with it) and asks the proxy to serve the
//!   identity there ([`crate::dns::DnsProxy::serve_netns`]); a failure (the
//!   pod's loopback is down, its port is taken there) is logged loudly with
//!   the cgroup, the pod and the pid, counted
//!   (`enforcer_dns_netns_errors_total{identity,reason}`), shown in
//!   `enforcer status`, and retried on the next reconcile;
//! - closes the listener sets of namespaces no bound process of the
//!   identity uses any more (the pod went). Removing a policy or restarting
//!   its proxy on another port closes all of them (they live in the proxy's
//!   per-identity state).
//!
//! `enforcer_dns_netns_listeners{identity}` counts the namespaces served.
use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use super::{control, State};
use crate::{
    dns::NetnsFailure,
    dns_bridge::DnsService,
    kernel::cgroup,
    metrics::Metrics,
    netns::{Netns, NetnsId},
};

/// A (identity, namespace) some bound process uses, and what came of it.
#[derive(Clone, Debug)]
pub struct NetnsUse {
    pub identity: String,
    /// One process of the identity in that namespace (the first seen).
    pub pid: u32,
    /// The bound cgroup it was found under.
    pub cgroup: PathBuf,
    /// Kubernetes mode: `namespace/pod` bound at that cgroup.
    pub pod: Option<String>,
    /// Kubernetes mode: that pod, for DNS audit records and metrics.
    pub workload: Option<crate::events::Workload>,
    /// Why the proxy cannot serve there (retried every reconcile).
    pub error: Option<NetnsFailure>,
    /// [::1] is served there too.
    pub v6: bool,
}

impl NetnsUse {
    fn what(&self) -> String {
        match &self.pod {
            Some(p) => format!(
                "pod {p} (cgroup {}, pid {})",
                self.cgroup.display(),
                self.pid
            ),
            None => format!("cgroup {} (pid {})", self.cgroup.display(), self.pid),
        }
    }
}

impl State {
    /// Every (slot, namespace) in use by a process of a bound cgroup whose
    /// identity has a DNS proxy, other than the daemon's own namespace.
    fn netns_in_use(&self) -> BTreeMap<(u32, NetnsId), NetnsUse> {
        let mut out = BTreeMap::new();
        let Some(own) = self.own_netns else {
            return out;
        };
        for (path, b) in &self.bound {
            if b.slot == enforcer_common::SLOT_UNKNOWN || self.kernel.dns_port(b.slot) == 0 {
                continue;
            }
            for pid in cgroup::pids_in_tree(path) {
                let Ok(id) = NetnsId::of_pid(pid) else {
                    continue; // exited, or a zombie
                };
                if id == own {
                    continue;
                }
                out.entry((b.slot, id)).or_insert_with(|| NetnsUse {
                    identity: b.policy.clone(),
                    pid,
                    cgroup: path.clone(),
                    pod: self
                        .pods
                        .get(path)
                        .map(|p| format!("{}/{}", p.entry.info.namespace, p.entry.info.name)),
                    workload: self.pods.get(path).map(|p| crate::events::Workload {
                        spiffe_id: p.spiffe_id.clone(),
                        namespace: p.entry.info.namespace.clone(),
                        pod: p.entry.info.name.clone(),
                        container: None,
                    }),
                    error: None,
                    v6: false,
                });
            }
        }
        out
    }

    /// Per identity: the namespaces its proxy serves or tried to (status).
    pub(super) fn netns_status(&self, slot: u32) -> Vec<control::NetnsStatus> {
        self.dns_netns
            .iter()
            .filter(|((s, _), _)| *s == slot)
            .map(|((_, id), u)| control::NetnsStatus {
                netns: id.to_string(),
                dev: id.dev,
                inode: id.ino,
                pid: u.pid,
                cgroup: u.cgroup.display().to_string(),
                pod: u.pod.clone(),
                serving: u.error.is_none(),
                ipv6: u.v6,
                error: u.error.as_ref().map(|e| e.to_string()),
            })
            .collect()
    }
}

/// Open, keep and close the proxy's listeners in the namespaces of bound
/// processes (module docs). The state lock is not held across an await.
pub async fn sync(state: &Mutex<State>, dns: &DnsService, metrics: &Metrics) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let (mut wanted, slots, previous) = {
        let s = lock();
        (s.netns_in_use(), s.slot_names(), s.dns_netns.clone())
    };
    // Close what no bound process uses any more.
    for (slot, name) in &slots {
        for served in dns.netns_of(*slot) {
            if !wanted.contains_key(&(*slot, served.id)) {
                dns.close_netns(*slot, served.id);
                let was = previous
                    .get(&(*slot, served.id))
                    .map(|u| u.what())
                    .unwrap_or_default();
                tracing::info!(identity = %name, netns = %served.id, "DNS proxy listeners closed: no bound process uses the namespace any more (was {was})");
            }
        }
    }
    // Open what is new (or failed before).
    for ((slot, id), u) in wanted.iter_mut() {
        if let Some(s) = dns.netns_of(*slot).into_iter().find(|s| s.id == *id) {
            u.v6 = s.v6;
            continue;
        }
        let opened = Netns::open_pid(u.pid)
            .map_err(|e| NetnsFailure {
                reason: "other",
                detail: format!("opening /proc/{}/ns/net: {e}", u.pid),
            })
            .and_then(|ns| {
                if ns.id == *id {
                    Ok(ns)
                } else {
                    // The process moved or the pid was reused: next round.
                    Err(NetnsFailure {
                        reason: "raced",
                        detail: format!("pid {} left {id}", u.pid),
                    })
                }
            });
        let r = match opened {
            Ok(ns) => dns.serve_netns(*slot, Arc::new(ns)).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                u.v6 = dns.netns_of(*slot).iter().any(|s| s.id == *id && s.v6);
                tracing::info!(identity = %u.identity, netns = %id, ipv6 = u.v6, "DNS proxy listening in the namespace of {}", u.what());
            }
            Err(e) if e.reason == "raced" => {}
            Err(e) => {
                metrics.inc_dns_netns_error(&u.identity, e.reason);
                let before = previous.get(&(*slot, *id)).and_then(|p| p.error.as_ref());
                if before != Some(&e) {
                    tracing::error!(identity = %u.identity, netns = %id, reason = e.reason, "DNS proxy cannot listen in the namespace of {}: {}; that workload's DNS fails (closed) until this is fixed (retried every reconcile)", u.what(), e.detail);
                }
                u.error = Some(e);
            }
        }
    }
    let mut served_count: BTreeMap<&str, u64> = BTreeMap::new();
    for (slot, name) in &slots {
        served_count.insert(name, dns.netns_of(*slot).len() as u64);
    }
    for (name, n) in &served_count {
        metrics.set_dns_netns_listeners(name, *n);
    }
    // Keep only what is still wanted (and not a passing race).
    wanted.retain(|_, u| u.error.as_ref().is_none_or(|e| e.reason != "raced"));
    let active: HashSet<u32> = slots.iter().map(|(s, _)| *s).collect();
    wanted.retain(|(s, _), _| active.contains(s));
    let mut s = lock();
    s.attribution.set_netns_workloads(
        wanted
            .iter()
            .filter_map(|(k, u)| Some((*k, u.workload.clone()?)))
            .collect(),
    );
    s.dns_netns = wanted;
}
