//! Where decisions go: metrics, the audit log, and a short per-identity list
//! of recent denials (for `enforcer status`). Shared by `run` and `daemon`.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use super::{Action, Decision, Verdict};
use crate::{
    audit::{AuditLog, LifecycleAction, LifecycleEvent},
    kernel::Kernel,
    metrics::Metrics,
};

const RECENT: usize = 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecentDenial {
    pub ts: String,
    pub action: String,
    pub destination: String,
    pub rule: String,
    pub verdict: String,
    pub comm: String,
    pub pid: u32,
}

type Observer = Box<dyn Fn(&Decision) + Send + Sync>;

pub struct Sinks {
    pub metrics: Arc<Metrics>,
    pub audit: Option<Mutex<AuditLog>>,
    recent: Mutex<HashMap<String, VecDeque<RecentDenial>>>,
    /// Extra consumer of every decision (`enforcer run`'s exit summary).
    observer: Mutex<Option<Observer>>,
    /// Identities that read a `taint` file (and when).
    tainted: Mutex<HashMap<String, String>>,
}

impl Sinks {
    pub fn new(metrics: Arc<Metrics>, audit: Option<AuditLog>) -> Self {
        Self {
            metrics,
            audit: audit.map(Mutex::new),
            recent: Mutex::new(HashMap::new()),
            observer: Mutex::new(None),
            tainted: Mutex::new(HashMap::new()),
        }
    }

    /// Identities tainted so far: name -> the record of the first taint.
    pub fn tainted(&self) -> HashMap<String, String> {
        self.tainted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The identity's workload ended (policy removed): forget its taint.
    pub fn forget_taint(&self, identity: &str) {
        self.tainted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(identity);
        self.metrics.set_tainted(identity, false);
    }

    /// The kernel reported a `taint` read: the first one of an identity is
    /// the clamp (log, metric, audit lifecycle record).
    fn on_taint(&self, d: &Decision) {
        let what = format!(
            "{} (pid {}) read {} ({}): egress clamped to spec.onTaint.egress until the workload ends",
            d.comm,
            d.pid,
            d.path.as_deref().unwrap_or("a taint file"),
            d.rule
        );
        let first = {
            let mut t = self.tainted.lock().unwrap_or_else(|e| e.into_inner());
            if t.contains_key(&d.identity.name) {
                false
            } else {
                t.insert(d.identity.name.clone(), what.clone());
                true
            }
        };
        if first {
            tracing::warn!(identity = %d.identity.name, "identity tainted: {what}");
            self.metrics.set_tainted(&d.identity.name, true);
            self.lifecycle(
                LifecycleAction::TaintClamp,
                Some(&d.identity),
                &d.policy_hash,
                &what,
            );
        }
    }

    pub fn set_observer(&self, f: Observer) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    pub fn handle(&self, d: &Decision) {
        if let Some(f) = self
            .observer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f(d);
        }
        let n = d.flow.as_ref().map_or(1, |f| f.count);
        self.metrics
            .record_events(&d.identity.name, d.action, d.verdict, n);
        if let Some(w) = &d.workload {
            self.metrics
                .record_pod_event(&d.identity.name, w, d.action, d.verdict, n);
        }
        if let Some(a) = &self.audit {
            let mut a = a.lock().unwrap_or_else(|e| e.into_inner());
            match a.append_decision(d) {
                Ok(_) => self.metrics.inc_audit_records(1),
                Err(e) => self.audit_failed(&e),
            }
        }
        if d.verdict == Verdict::Taint {
            self.on_taint(d);
        }
        if d.verdict != Verdict::Allow {
            let dest = destination(d);
            self.metrics
                .record_denied_destination(&d.identity.name, d.action, d.verdict, &dest);
            let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let q = r.entry(d.identity.name.clone()).or_default();
            if q.len() == RECENT {
                q.pop_front();
            }
            q.push_back(RecentDenial {
                ts: d.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                action: d.action.as_str().into(),
                destination: dest,
                rule: d.rule.clone(),
                verdict: d.verdict.as_str().into(),
                comm: d.comm.clone(),
                pid: d.pid,
            });
        }
    }

    /// A record the audit log refused: counted; logged once per failure,
    /// not once per record while the log waits to reopen its file.
    fn audit_failed(&self, e: &crate::audit::AuditError) {
        self.metrics.inc_audit_lost();
        match e {
            crate::audit::AuditError::Poisoned { .. } => {
                tracing::debug!("audit log write refused: {e:#}")
            }
            _ => tracing::error!("audit log write failed: {e:#}"),
        }
    }

    pub fn flush(&self) {
        if let Some(a) = &self.audit {
            if let Err(e) = a.lock().unwrap_or_else(|e| e.into_inner()).flush() {
                tracing::error!("audit log flush failed: {e:#}");
            }
        }
    }

    /// A lifecycle record (start, policy_load, reload rejected, attach, ...).
    pub fn lifecycle(
        &self,
        action: LifecycleAction,
        identity: Option<&super::IdentityRef>,
        policy_hash: &str,
        detail: &str,
    ) {
        let Some(a) = &self.audit else {
            return;
        };
        let mut ev = LifecycleEvent::new(action, detail);
        if let Some(i) = identity {
            ev = ev.with_identity(i.clone());
        }
        if !policy_hash.is_empty() {
            ev = ev.with_policy_hash(policy_hash);
        }
        let mut a = a.lock().unwrap_or_else(|e| e.into_inner());
        match a.append_lifecycle(&ev).and_then(|_| a.flush()) {
            Ok(()) => self.metrics.inc_audit_records(1),
            Err(e) => self.audit_failed(&e),
        }
    }

    pub fn recent(&self, identity: &str) -> Vec<RecentDenial> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }
}

pub fn destination(d: &Decision) -> String {
    if d.action.is_file() {
        return d
            .path
            .clone()
            .or_else(|| d.detail.clone())
            .unwrap_or_default();
    }
    if let (Action::Dns, Some(name)) = (d.action, &d.host) {
        return format!("{name} ({})", d.protocol.as_deref().unwrap_or("dns"));
    }
    if let Some(u) = &d.unix {
        return match u.kind {
            "abstract" => format!("unix @{}", u.name),
            _ => format!("unix {}", u.name),
        };
    }
    match (d.ip, d.port) {
        (Some(std::net::IpAddr::V6(ip)), Some(p)) => format!("[{ip}]:{p}"),
        (Some(ip), Some(p)) => format!("{ip}:{p}"),
        _ => d.detail.clone().unwrap_or_default(),
    }
}

/// Copy the kernel's per-slot counters and stats into the metrics.
pub fn publish_kernel_counters(kernel: &Kernel, metrics: &Metrics, slots: &[(u32, String)]) {
    let unknown = (enforcer_common::SLOT_UNKNOWN, "unknown".to_string());
    for (slot, name) in slots.iter().chain(std::iter::once(&unknown)) {
        let c = kernel.slot_counters(*slot);
        // Actions decided in the kernel by this release.
        for a in [
            Action::Connect,
            Action::Sendmsg,
            Action::SockCreate,
            Action::UnixConnect,
            Action::UnixSend,
        ] {
            for v in Verdict::ALL {
                let n = c[a.kernel_code() as usize][v.kernel_code() as usize];
                if n > 0 || *slot != enforcer_common::SLOT_UNKNOWN {
                    metrics.set_decisions_total(name, a.as_str(), v.as_str(), n);
                }
            }
        }
        // First bytes: allowed judgements by (action, verdict), refusals by reason.
        let allowed =
            c[Action::Inspect.kernel_code() as usize][Verdict::Allow.kernel_code() as usize];
        if allowed > 0 || *slot != enforcer_common::SLOT_UNKNOWN {
            metrics.set_decisions_total(name, Action::Inspect.as_str(), "allow", allowed);
        }
        for (reason, audit, n) in kernel.slot_reasons(*slot) {
            let v = if audit { Verdict::Audit } else { Verdict::Deny };
            metrics.set_decisions_total_reason(
                name,
                Action::Inspect.as_str(),
                v.as_str(),
                enforcer_common::first_bytes::reason::as_str(reason),
                n,
            );
        }
    }
    metrics.set_events_lost_total(kernel.stat(enforcer_common::stat::EVENTS_LOST));
    metrics.set_no_identity_decisions_total(kernel.stat(enforcer_common::stat::NO_IDENTITY));
    metrics.set_dns_steered_total(
        kernel.stat(enforcer_common::stat::DNS_STEERED),
        kernel.stat(enforcer_common::stat::DNS_NO_STATE),
    );
}

/// The two tasks that bring the kernel's decisions to the sinks: the
/// ring-buffer reader (denials at once, other records within
/// `reader::POLL`) and the flow drainer (allowed flows every
/// `flows::INTERVAL`).
pub struct Readers {
    /// Each task with the notification that stops it.
    tasks: Vec<(Arc<tokio::sync::Notify>, tokio::task::JoinHandle<()>)>,
}

impl Readers {
    /// Start both tasks (inside a tokio runtime). `attribute` turns a kernel
    /// event into a decision (identity, rule, learned host).
    pub fn spawn(
        ring: (
            aya::maps::RingBuf<aya::maps::MapData>,
            aya::maps::RingBuf<aya::maps::MapData>,
        ),
        flows: super::flows::FlowTables,
        sinks: Arc<Sinks>,
        attribute: impl Fn(&enforcer_common::Event, &super::reader::Clock) -> Decision
            + Send
            + Sync
            + 'static,
    ) -> Self {
        let (stop_reader, stop_drainer) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let attribute = Arc::new(attribute);
        let clock = Arc::new(super::reader::Clock::new());
        let reader = {
            let (s1, s2, attribute, clock) = (
                sinks.clone(),
                sinks.clone(),
                attribute.clone(),
                clock.clone(),
            );
            let stop = stop_reader.clone();
            tokio::spawn(async move {
                let r = super::reader::run(
                    ring,
                    stop,
                    move |r: super::reader::Decoded| {
                        r.reset_refused();
                        let mut d = attribute(&r.ev, &clock);
                        d.first_bytes = r.first;
                        d.unix = r.unix;
                        s1.handle(&d)
                    },
                    move || s2.flush(),
                )
                .await;
                if let Err(e) = r {
                    tracing::error!("event ring buffer reader stopped: {e:#}");
                }
            })
        };
        let drainer = {
            let (s1, s2) = (sinks.clone(), sinks);
            tokio::spawn(super::flows::run(
                flows,
                stop_drainer.clone(),
                move |f: super::flows::Flow| {
                    let mut d = attribute(&f.ev, &clock);
                    d.flow = Some(super::FlowSpan {
                        count: f.count,
                        first_seen: clock.wall(f.first_ns),
                        last_seen: clock.wall(f.last_ns),
                    });
                    s1.handle(&d)
                },
                move || s2.flush(),
            ))
        };
        // Stopped in this order: the drainer's last drain may send flows
        // the spill ring cannot take as allow records, which the reader's
        // last drain then reads.
        Self {
            tasks: vec![(stop_drainer, drainer), (stop_reader, reader)],
        }
    }

    /// Read what is left (both flow sides, the whole ring) and stop; gives
    /// up after `reader::DRAIN_GRACE`.
    pub async fn finish(self) {
        for (stop, mut t) in self.tasks {
            // Stored if the task is not waiting yet.
            stop.notify_one();
            if tokio::time::timeout(super::reader::DRAIN_GRACE, &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
    }
}
