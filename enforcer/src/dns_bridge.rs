//! Glue between the DNS proxy (`dns/`) and the rest: the kernel's learned
//! tables (`kernel::learned`), the audit log and metrics (`events::sink`),
//! and connect attribution (which name an address was learned from).
use std::{
    fmt::Write as _,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use enforcer_common::RuleSet;

use crate::{
    dns::{DnsEvent, DnsPolicy, DnsProxy, DnsSink, Learner, NetnsFailure, NetnsServed, TaintView},
    events::{
        reader::{Attribution, Clock},
        sink::Sinks,
        Action, Decision, Verdict,
    },
    kernel::{learned::LearnedTable, Kernel},
    metrics::Metrics,
};

/// Installs learned addresses in the kernel before the proxy releases an answer.
struct KernelLearner {
    table: Arc<Mutex<LearnedTable>>,
    /// The table's learning epochs, read once per query without its lock.
    epochs: Arc<crate::kernel::learned::Epochs>,
}

impl Learner for KernelLearner {
    fn epoch(&self, slot: u32) -> u64 {
        self.epochs.get(slot)
    }

    fn learn(
        &self,
        slot: u32,
        ip: IpAddr,
        set: &RuleSet,
        ttl: Duration,
        host: &str,
        epoch: u64,
    ) -> Result<()> {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .learn(slot, ip, set, ttl, host, epoch)
    }
}

/// DNS decisions -> audit log, metrics, recent denials.
struct Recorder {
    sinks: Arc<Sinks>,
    metrics: Arc<Metrics>,
    attribution: Attribution,
}

impl DnsSink for Recorder {
    fn record(&self, ev: &DnsEvent) {
        let name = ev.identity.name.as_str();
        self.metrics.record_dns_query(name, ev.verdict);
        if ev.verdict != Verdict::Allow {
            self.metrics.record_dns_refused(name, ev.reason);
        }
        self.metrics
            .observe_dns_latency(name, ev.latency.as_secs_f64());
        if !ev.rebinding_blocked.is_empty() {
            self.metrics
                .add_dns_rebinding_blocked(name, ev.rebinding_blocked.len() as u64);
        }
        // The detail is the audit record's: written out only with an audit
        // log (`enforcer run` without `--audit-log` counts and summarizes).
        let mut detail = self.sinks.audit.is_some().then(|| dns_detail(ev));
        // An answered query names the host rule that admitted it; a refused
        // one names why (its matching rule, if any, goes to the detail).
        let rule = match (&ev.rule, ev.verdict) {
            (Some(r), Verdict::Allow) => r.clone(),
            (Some(r), _) => {
                if let Some(d) = detail.as_mut() {
                    let _ = write!(d, " matched=\"{r}\"");
                }
                ev.reason.to_string()
            }
            (None, _) => ev.reason.to_string(),
        };
        // A query that came in on a listener in a pod's network namespace
        // names the pod (not the container: a pod's containers share it),
        // and the pod's SPIFFE ID.
        let workload = ev
            .netns
            .and_then(|id| self.attribution.netns_workload(ev.slot, id));
        let mut identity = ev.identity.clone();
        if let Some(w) = workload.as_ref().filter(|w| !w.spiffe_id.is_empty()) {
            identity.spiffe_id = Some(w.spiffe_id.clone());
        }
        self.sinks.handle(&Decision {
            ts: chrono::Utc::now(),
            identity,
            cgroup_id: 0,
            pid: 0,
            comm: String::new(),
            action: Action::Dns,
            ip: Some(ev.client.ip()),
            port: Some(ev.client.port()),
            protocol: Some(ev.transport.to_string()),
            host: Some(ev.qname.clone()),
            path: None,
            workload,
            verdict: ev.verdict,
            rule,
            policy_hash: ev.policy_hash.clone(),
            detail,
            first_bytes: None,
            unix: None,
            flow: None,
        });
    }

    fn malformed(&self, slot: u32) {
        let name = self
            .attribution
            .get(slot)
            .map(|i| i.identity.name)
            .unwrap_or_else(|| "unknown".into());
        self.metrics.inc_dns_malformed(&name);
    }
}

/// A DNS decision's audit detail: `qtype=A reason=... transport=udp
/// latency_us=N [tainted=true] [learned=[..]] [answered=[..]]
/// [rebinding_blocked=[..]]` (`answered`: `mode: audit`, the addresses of an
/// answer to a would-be refused name, not learned).
fn dns_detail(ev: &DnsEvent) -> String {
    let mut d = String::with_capacity(96);
    let _ = write!(
        d,
        "qtype={} reason={} transport={} latency_us={}",
        ev.qtype,
        ev.reason,
        ev.transport,
        ev.latency.as_micros()
    );
    if ev.tainted {
        // Judged by the onTaint rules; learned under the taint key.
        d.push_str(" tainted=true");
    }
    for (key, list) in [
        ("learned", &ev.answers),
        ("answered", &ev.answered),
        ("rebinding_blocked", &ev.rebinding_blocked),
    ] {
        if list.is_empty() {
            continue;
        }
        let _ = write!(d, " {key}=[");
        for (i, a) in list.iter().enumerate() {
            let _ = write!(d, "{}{a}", if i == 0 { "" } else { "," });
        }
        d.push(']');
    }
    d
}

/// The DNS side of a controller (`run` or `daemon`): one proxy, one
/// learned-address table.
pub struct DnsService {
    proxy: DnsProxy,
    learned: Arc<Mutex<LearnedTable>>,
}

impl DnsService {
    /// The proxy asks the kernel's `TAINTED` flags whether an identity is
    /// tainted (its DNS is then judged by its policy's onTaint rules).
    pub fn new(
        kernel: &mut Kernel,
        sinks: Arc<Sinks>,
        metrics: Arc<Metrics>,
        attribution: Attribution,
    ) -> Result<Self> {
        let table = kernel
            .take_learned()
            .ok_or_else(|| anyhow::anyhow!("learned-address tables already taken"))?;
        let epochs = table.epochs();
        let learned = Arc::new(Mutex::new(table));
        let proxy = DnsProxy::new(
            Arc::new(KernelLearner {
                table: learned.clone(),
                epochs,
            }),
            Arc::new(Recorder {
                sinks,
                metrics,
                attribution,
            }),
            Arc::new(KernelTaint(kernel.taint_table())),
        );
        Ok(Self { proxy, learned })
    }

    /// Serve (or update) identity `slot`'s proxy; the caller points the
    /// kernel's DNS steering at the returned port.
    pub async fn start(
        &self,
        slot: u32,
        policy: Arc<DnsPolicy>,
        preferred_port: Option<u16>,
    ) -> Result<u16> {
        self.proxy
            .serve_identity_on(slot, policy, preferred_port)
            .await
    }

    /// Serve (or update) identity `slot`'s proxy and point its DNS steering
    /// at it. `kernel` is only locked for the map update.
    pub async fn serve(
        &self,
        kernel: &Mutex<Kernel>,
        slot: u32,
        policy: Arc<DnsPolicy>,
    ) -> Result<u16> {
        let port = self.proxy.serve_identity(slot, policy).await?;
        kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_dns_port(slot, port)?;
        Ok(port)
    }

    /// Serve identity `slot` inside network namespace `ns` too (see
    /// [`DnsProxy::serve_netns`]).
    pub async fn serve_netns(
        &self,
        slot: u32,
        ns: Arc<crate::netns::Netns>,
    ) -> std::result::Result<(), NetnsFailure> {
        self.proxy.serve_netns(slot, ns).await
    }

    /// Close identity `slot`'s listeners in namespace `id`.
    pub fn close_netns(&self, slot: u32, id: crate::netns::NetnsId) -> bool {
        self.proxy.close_netns(slot, id)
    }

    /// The other namespaces identity `slot` is served in.
    pub fn netns_of(&self, slot: u32) -> Vec<NetnsServed> {
        self.proxy.netns_of(slot)
    }

    /// How many namespaces one identity is served in, at most.
    pub fn netns_limit(&self) -> usize {
        self.proxy.netns_limit()
    }

    /// Stop identity `slot`'s proxy and forget what it learned.
    pub fn stop(&self, slot: u32) {
        self.proxy.stop_identity(slot);
        self.forget(slot);
    }

    /// A served identity's new policy: swapped into its proxy and its
    /// learned addresses forgotten in one step (a query is judged by the old
    /// policy and its epoch, or by the new policy and the new epoch: nothing
    /// a query judged by the old policy learns outlives the swap). False if
    /// the identity is not served (start it instead).
    pub fn reload(&self, slot: u32, policy: Arc<DnsPolicy>) -> bool {
        self.proxy
            .replace_policy(slot, policy, || self.forget(slot))
    }

    /// Forget what identity `slot` learned (its policy changed: names are
    /// judged again under the new rules when the agent resolves again).
    pub fn forget(&self, slot: u32) {
        self.learned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_slot(slot);
    }

    /// Drop expired learned addresses and publish the gauges.
    pub fn gc(&self, metrics: &Metrics, slots: &[(u32, String)]) {
        let mut t = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        t.gc();
        let (written, skipped) = t.write_counts();
        metrics.set_dns_learn_writes_total(written, skipped);
        for (slot, name) in slots {
            metrics.set_dns_learned(name, t.count(*slot) as u64);
        }
    }

    /// The name `ip` was learned from by identity `slot`, if it still is.
    pub fn host_of(&self, slot: u32, ip: IpAddr) -> Option<String> {
        self.learned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .host_of(slot, ip)
    }

    pub fn learned_count(&self, slot: u32) -> usize {
        self.learned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count(slot)
    }

    /// A decoder for the event reader: kernel event -> attributed decision,
    /// with the DNS name a destination was learned from.
    pub fn attributor(
        &self,
        attribution: Attribution,
    ) -> impl Fn(&enforcer_common::Event, &Clock) -> Decision + Send + 'static {
        let learned = self.learned.clone();
        move |ev, clock| {
            let mut d = attribution.decision(ev, clock);
            if let Some(ip) = d.ip {
                d.host = learned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .host_of(ev.slot, ip);
            }
            d
        }
    }
}

/// The kernel's `TAINTED` flags as the DNS proxy sees them (asked once per
/// query of an identity with a taint clamp).
pub struct KernelTaint(pub Arc<std::sync::Mutex<crate::kernel::TaintTable>>);

impl TaintView for KernelTaint {
    fn is_tainted(&self, slot: u32) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_tainted(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_detail_names_what_the_answer_did() {
        let mut ev = DnsEvent {
            slot: 1,
            identity: crate::events::IdentityRef {
                name: "agent".into(),
                spiffe_id: None,
            },
            policy_hash: String::new(),
            client: "127.0.0.1:5353".parse().unwrap(),
            netns: None,
            transport: "udp",
            qname: "api.example.com".into(),
            qtype: "A".into(),
            verdict: Verdict::Allow,
            reason: "allowed",
            rule: None,
            tainted: false,
            answers: vec!["93.184.216.34".parse().unwrap(), "::1".parse().unwrap()],
            answered: Vec::new(),
            rebinding_blocked: Vec::new(),
            latency: std::time::Duration::from_micros(75),
        };
        assert_eq!(
            dns_detail(&ev),
            "qtype=A reason=allowed transport=udp latency_us=75 learned=[93.184.216.34,::1]"
        );
        ev.answers.clear();
        ev.tainted = true;
        ev.rebinding_blocked = vec!["10.0.0.1".parse().unwrap()];
        assert_eq!(
            dns_detail(&ev),
            "qtype=A reason=allowed transport=udp latency_us=75 tainted=true rebinding_blocked=[10.0.0.1]"
        );
        ev.tainted = false;
        ev.rebinding_blocked.clear();
        ev.verdict = Verdict::Audit;
        ev.reason = "name-not-allowed";
        ev.answered = vec!["203.0.113.7".parse().unwrap()];
        assert_eq!(
            dns_detail(&ev),
            "qtype=A reason=name-not-allowed transport=udp latency_us=75 answered=[203.0.113.7]"
        );
    }
}
