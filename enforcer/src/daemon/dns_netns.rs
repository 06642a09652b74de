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
//!   identity there ([`crate::dns::DnsProxy::serve_netns`]): listeners only,
//!   the queries go upstream from the daemon's own namespace (a workload
//!   controls its namespace's routes and addresses; see `dns::proxy`); a
//!   failure (the pod's loopback is down, its port is taken there) is logged
//!   loudly with the cgroup, the pod and the pid, counted
//!   (`enforcer_dns_netns_errors_total{identity,reason}`), shown in
//!   `enforcer status`, and retried on the next reconcile;
//! - serves at most [`crate::dns::MAX_NETNS_PER_IDENTITY`] namespaces per identity (the
//!   ones served first stay served): more are not served (their DNS fails,
//!   closed), shown in status with reason `limit`, counted once per
//!   namespace (`reason="limit"`), and logged at error level once per
//!   identity when it reaches the cap (each further namespace at debug);
//!   they are served once served ones go;
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

use super::{bindings::Bindings, control, Node, State};
use crate::{
    dns::NetnsFailure,
    dns_bridge::DnsService,
    kernel::{cgroup, Kernel},
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

/// Every (slot, namespace) in use by a process of a bound cgroup whose
/// identity has a DNS proxy, other than the daemon's own namespace.
fn netns_in_use(
    node: &Node,
    kernel: &Kernel,
    bindings: &Bindings,
) -> BTreeMap<(u32, NetnsId), NetnsUse> {
    let mut out = BTreeMap::new();
    let Some(own) = node.own_netns else {
        return out;
    };
    for (path, b) in bindings.bound() {
        if b.slot == enforcer_common::SLOT_UNKNOWN || kernel.dns_port(b.slot) == 0 {
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
                pod: bindings
                    .pods()
                    .get(path)
                    .map(|p| format!("{}/{}", p.entry.info.namespace, p.entry.info.name)),
                workload: bindings.pods().get(path).map(|p| p.workload(None)),
                error: None,
                v6: false,
            });
        }
    }
    out
}

/// Per identity: the namespaces its proxy serves or tried to (status).
pub(super) fn status(dns_netns: &BTreeMap<Key, NetnsUse>, slot: u32) -> Vec<control::NetnsStatus> {
    dns_netns
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

type Key = (u32, NetnsId);

/// What came of one wanted (identity, namespace) this round.
#[derive(Debug)]
enum Attempt {
    /// Served (already, or from now on).
    Served { v6: bool },
    /// The process moved or its pid was reused between the scan and the
    /// open: not served, forgotten until a scan finds it again.
    Raced,
    /// Not served (retried next round).
    Failed(NetnsFailure),
}

/// Apply this round's attempts to the wanted entries: record v6 or the
/// error, drop raced entries (never served, so they neither show in status
/// nor name a workload for DNS records) and entries of identities no
/// longer served.
fn settle(
    wanted: &mut BTreeMap<Key, NetnsUse>,
    attempts: BTreeMap<Key, Attempt>,
    active: &HashSet<u32>,
) {
    for (k, a) in attempts {
        match a {
            Attempt::Served { v6 } => {
                if let Some(u) = wanted.get_mut(&k) {
                    u.v6 = v6;
                    u.error = None;
                }
            }
            Attempt::Raced => {
                wanted.remove(&k);
            }
            Attempt::Failed(e) => {
                if let Some(u) = wanted.get_mut(&k) {
                    u.error = Some(e);
                }
            }
        }
    }
    wanted.retain(|(s, _), _| active.contains(s));
}

/// Open, keep and close the proxy's listeners in the namespaces of bound
/// processes (module docs). The state lock is not held across an await.
pub async fn sync(state: &Mutex<State>, dns: &DnsService, metrics: &Metrics) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let (mut wanted, slots, previous) = {
        let s = lock();
        (
            netns_in_use(&s.node, &s.kernel, &s.bindings),
            s.policies.slot_names(),
            s.bindings.dns_netns.clone(),
        )
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
    let cap = dns.netns_limit();
    let limited_before = |slot: u32| {
        previous
            .iter()
            .any(|((s, _), u)| *s == slot && u.error.as_ref().is_some_and(|e| e.reason == "limit"))
    };
    // Open what is new (or failed before), up to the cap per identity.
    let mut attempts = BTreeMap::new();
    let mut served_now: BTreeMap<u32, usize> = BTreeMap::new();
    let mut limited_now: BTreeMap<u32, usize> = BTreeMap::new();
    for (&(slot, id), u) in &wanted {
        let served = dns.netns_of(slot);
        if let Some(s) = served.iter().find(|s| s.id == id) {
            attempts.insert((slot, id), Attempt::Served { v6: s.v6 });
            continue;
        }
        let n = *served_now.entry(slot).or_insert(served.len());
        let r = if n >= cap {
            // Not even opened: an agent holding thousands of namespaces
            // costs one scan, no fd.
            Err(NetnsFailure {
                reason: "limit",
                detail: format!(
                    "the identity's DNS proxy already serves {n} namespaces (at most {cap})"
                ),
            })
        } else {
            let opened = Netns::open_pid(u.pid)
                .map_err(|e| NetnsFailure {
                    reason: "other",
                    detail: format!("opening /proc/{}/ns/net: {e}", u.pid),
                })
                .and_then(|ns| {
                    if ns.id == id {
                        Ok(ns)
                    } else {
                        // The process moved or the pid was reused: next round.
                        Err(NetnsFailure {
                            reason: "raced",
                            detail: format!("pid {} left {id}", u.pid),
                        })
                    }
                });
            match opened {
                Ok(ns) => dns.serve_netns(slot, Arc::new(ns)).await,
                Err(e) => Err(e),
            }
        };
        let attempt = match r {
            Ok(()) => {
                let v6 = dns.netns_of(slot).iter().any(|s| s.id == id && s.v6);
                *served_now.entry(slot).or_default() += 1;
                tracing::info!(identity = %u.identity, netns = %id, ipv6 = v6, "DNS proxy listening in the namespace of {}", u.what());
                Attempt::Served { v6 }
            }
            Err(e) if e.reason == "raced" => {
                tracing::debug!(identity = %u.identity, netns = %id, "{}", e.detail);
                Attempt::Raced
            }
            Err(e) if e.reason == "limit" => {
                let before = previous.get(&(slot, id)).and_then(|p| p.error.as_ref());
                if before.is_none_or(|b| b.reason != "limit") {
                    // Counted once per namespace refused, not per round.
                    metrics.inc_dns_netns_error(&u.identity, e.reason);
                    tracing::debug!(identity = %u.identity, netns = %id, "DNS proxy not listening in the namespace of {}: {e}", u.what());
                }
                *limited_now.entry(slot).or_default() += 1;
                Attempt::Failed(e)
            }
            Err(e) => {
                metrics.inc_dns_netns_error(&u.identity, e.reason);
                let before = previous.get(&(slot, id)).and_then(|p| p.error.as_ref());
                if before != Some(&e) {
                    tracing::error!(identity = %u.identity, netns = %id, reason = e.reason, "DNS proxy cannot listen in the namespace of {}: {}; that workload's DNS fails (closed) until this is fixed (retried every reconcile)", u.what(), e.detail);
                }
                Attempt::Failed(e)
            }
        };
        attempts.insert((slot, id), attempt);
    }
    for (slot, name) in &slots {
        match limited_now.get(slot) {
            Some(n) if !limited_before(*slot) => {
                tracing::error!(identity = %name, limit = cap, refused = n, "DNS proxy: the identity's processes use more than {cap} network namespaces; {n} more are not served (their DNS fails, closed) until served ones go (status: reason `limit`)");
            }
            None if limited_before(*slot) => {
                tracing::info!(identity = %name, "DNS proxy: the identity is back under its limit of {cap} network namespaces");
            }
            _ => {}
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
    let active: HashSet<u32> = slots.iter().map(|(s, _)| *s).collect();
    settle(&mut wanted, attempts, &active);
    let mut s = lock();
    s.node.attribution.set_netns_workloads(
        wanted
            .iter()
            .filter(|(_, u)| u.error.is_none())
            .filter_map(|(k, u)| Some((*k, u.workload.clone()?)))
            .collect(),
    );
    s.bindings.dns_netns = wanted;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(identity: &str) -> NetnsUse {
        NetnsUse {
            identity: identity.into(),
            pid: 1,
            cgroup: PathBuf::from("/sys/fs/cgroup/x"),
            pod: None,
            workload: None,
            error: None,
            v6: false,
        }
    }

    fn ns(ino: u64) -> NetnsId {
        NetnsId { dev: 4, ino }
    }

    /// A raced namespace (never served) is dropped: not shown as serving,
    /// not used to name a workload; failures are kept with their reason,
    /// served ones get their v6 flag; identities no longer served go.
    #[test]
    fn settle_drops_raced_and_inactive_entries() {
        let mut wanted: BTreeMap<Key, NetnsUse> = [
            ((1, ns(10)), entry("a")),
            ((1, ns(11)), entry("a")),
            ((1, ns(12)), entry("a")),
            ((1, ns(13)), entry("a")),
            ((2, ns(10)), entry("b")),
        ]
        .into_iter()
        .collect();
        let fail = |reason| NetnsFailure {
            reason,
            detail: String::new(),
        };
        let attempts = [
            ((1, ns(10)), Attempt::Served { v6: true }),
            ((1, ns(11)), Attempt::Raced),
            ((1, ns(12)), Attempt::Failed(fail("limit"))),
            ((1, ns(13)), Attempt::Failed(fail("port-in-use"))),
            ((2, ns(10)), Attempt::Served { v6: false }),
        ]
        .into_iter()
        .collect();
        settle(&mut wanted, attempts, &HashSet::from([1]));
        let keys: Vec<Key> = wanted.keys().copied().collect();
        assert_eq!(keys, vec![(1, ns(10)), (1, ns(12)), (1, ns(13))]);
        assert!(wanted[&(1, ns(10))].v6);
        assert!(wanted[&(1, ns(10))].error.is_none());
        assert_eq!(wanted[&(1, ns(12))].error.as_ref().unwrap().reason, "limit");
        assert_eq!(
            wanted[&(1, ns(13))].error.as_ref().unwrap().reason,
            "port-in-use"
        );
    }
}
