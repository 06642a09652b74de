//! Prometheus metrics (events/ -> metrics) and the `/metrics` + `/healthz`
//! HTTP endpoint.
//!
//! Every metric is prefixed `enforcer_` (DESIGN.md section 5):
//!
//! | metric | type | labels | fed by |
//! |---|---|---|---|
//! | `enforcer_decisions_total` | counter | identity, action, verdict, reason | kernel per-CPU counters (`COUNTERS`, plus `ALLOW_HITS`: allows the flow cache answered, added when their way is drained), [`Metrics::set_decisions_total`]; `reason` is set for refused first bytes (action `inspect`: `name-mismatch`, `no-sni`, `ech`, ...), else empty |
//! | `enforcer_events_total` | counter | identity, action, verdict | decisions reported to userspace: ring-buffer events, plus each allowed flow record's count, [`Metrics::record_events`] |
//! | `enforcer_pod_events_total` | counter | identity, spiffe_id, namespace, pod, container, action, verdict | events of bound pods (Kubernetes mode), [`Metrics::record_pod_event`] |
//! | `enforcer_denied_destinations_total` | counter | identity, action, verdict (deny, audit), destination | refused (or, in audit mode, would-be refused) decisions by destination as the audit log names it (`ip:port`, `name (udp)`, a path, `unix <name>`); at most [`DENIED_DESTINATIONS_PER_IDENTITY`] destinations per identity, the rest under `destination="other"`, [`Metrics::record_denied_destination`] |
//! | `enforcer_pod_info` | gauge (=1) | identity, spiffe_id, namespace, pod, uid | bound pods, [`Metrics::set_pods`] |
//! | `enforcer_events_lost_total` | counter | | kernel stat, [`Metrics::set_events_lost_total`] |
//! | `enforcer_no_identity_decisions_total` | counter | | kernel stat, [`Metrics::set_no_identity_decisions_total`] |
//! | `enforcer_dns_steered_total` | counter | | kernel stat, [`Metrics::set_dns_steered_total`] |
//! | `enforcer_dns_steer_failed_total` | counter | | kernel stat, [`Metrics::set_dns_steered_total`] |
//! | `enforcer_dns_queries_total` | counter | identity, verdict | [`Metrics::record_dns_query`] |
//! | `enforcer_dns_refused_total` | counter | identity, reason | [`Metrics::record_dns_refused`] |
//! | `enforcer_dns_query_duration_seconds` | histogram | identity | [`Metrics::observe_dns_latency`] |
//! | `enforcer_dns_learned_addresses` | gauge | identity | [`Metrics::set_dns_learned`] |
//! | `enforcer_dns_learn_writes_total` | counter | result (`written`, `skipped`: the kernel entry already stood for the answer) | learned-address map writes, [`Metrics::set_dns_learn_writes_total`] |
//! | `enforcer_dns_rebinding_blocked_total` | counter | identity | [`Metrics::add_dns_rebinding_blocked`] |
//! | `enforcer_dns_malformed_total` | counter | identity | [`Metrics::inc_dns_malformed`] |
//! | `enforcer_dns_netns_listeners` | gauge | identity | network namespaces besides the daemon's (pods) where the identity's DNS proxy listens, [`Metrics::set_dns_netns_listeners`] |
//! | `enforcer_dns_netns_errors_total` | counter | identity, reason | failed attempts at listening in a workload's namespace (retried every reconcile; `limit`: once per namespace beyond `dns::MAX_NETNS_PER_IDENTITY`), [`Metrics::inc_dns_netns_error`] |
//! | `enforcer_attached_cgroups` | gauge | | [`Metrics::set_attached_cgroups`] |
//! | `enforcer_policy_entries` | gauge | identity | LPM entries, [`Metrics::set_policy_entries`] |
//! | `enforcer_identity_tainted` | gauge (1/0) | identity | set when the identity read a `taint` file, [`Metrics::set_tainted`] |
//! | `enforcer_file_rules` | gauge | identity | inodes in the identity's file rule table, [`Metrics::set_file_rules`] |
//! | `enforcer_policy_info` | gauge (=1) | identity, spiffe_id, mode, policy_hash | [`Metrics::set_policy_info`] |
//! | `enforcer_policy_reloads_total` | counter | result (ok, rejected) | [`Metrics::record_policy_reload`] |
//! | `enforcer_audit_records_total` | counter | | [`Metrics::inc_audit_records`] |
//! | `enforcer_audit_records_lost_total` | counter | | [`Metrics::inc_audit_lost`] |
//! | `enforcer_build_info` | gauge (=1) | version | set at construction |
//! | `enforcer_capability` | gauge (1/0) | name | [`Metrics::set_capability`] |
//!
//! "Absolute-total" setters take the current value of a kernel counter and
//! advance the Prometheus counter by the difference to the last value seen.
//! Counters never go down: a total lower than the last one means the kernel
//! counter was reset (slot reuse, map recreated), so the new total is added in
//! full. The first value seen is added in full as well.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::Context as _;
use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::events::{Action, Decision, Verdict};

/// Outcome of a policy reload, the `result` label of `enforcer_policy_reloads_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    Rejected,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
        }
    }
}

/// Last values seen by the absolute-total setters, and label sets that must
/// be removable per identity.
#[derive(Default)]
struct Seen {
    /// identity -> (action, verdict, reason) -> last kernel total.
    decisions: HashMap<String, HashMap<(String, String, String), u64>>,
    events_lost: u64,
    no_identity: u64,
    dns_steered: u64,
    dns_steer_failed: u64,
    dns_learn_written: u64,
    dns_learn_skipped: u64,
    /// identity -> [spiffe_id, mode, policy_hash] currently exported.
    policy_info: HashMap<String, [String; 3]>,
    /// identity -> destinations with their own `denied_destinations` series
    /// (and the label sets exported, to remove them with the identity).
    denied: HashMap<String, (HashSet<String>, HashSet<[String; 3]>)>,
}

/// Distinct destinations one identity gets in
/// `enforcer_denied_destinations_total`; further ones are counted under
/// `destination="other"` (an agent probing many addresses must not grow the
/// daemon's metrics without bound).
pub const DENIED_DESTINATIONS_PER_IDENTITY: usize = 50;

/// (identity, spiffe_id, namespace, pod, uid) of a bound pod.
pub type PodLabels = (String, String, String, String, String);

/// (namespace, pod) -> label sets of its `enforcer_pod_events_total` series.
type PodSeries = HashMap<(String, String), Vec<Vec<String>>>;

/// The enforcer's metrics registry. Cheap to share: wrap in an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// Every metric registered (vectors without series too): name, labels.
    names: Vec<(String, Vec<String>)>,
    denied_destinations: IntCounterVec,
    decisions: IntCounterVec,
    events: IntCounterVec,
    pod_events: IntCounterVec,
    pod_info: IntGaugeVec,
    /// Label sets of `pod_events` per (namespace, pod), to remove a gone pod's.
    pod_series: Mutex<PodSeries>,
    events_lost: IntCounter,
    no_identity_decisions: IntCounter,
    dns_steered: IntCounter,
    dns_steer_failed: IntCounter,
    dns_learn_writes: IntCounterVec,
    dns_queries: IntCounterVec,
    attached_cgroups: IntGauge,
    policy_entries: IntGaugeVec,
    tainted: IntGaugeVec,
    file_rules: IntGaugeVec,
    policy_info: IntGaugeVec,
    policy_reloads: IntCounterVec,
    audit_records: IntCounter,
    audit_lost: IntCounter,
    build_info: IntGaugeVec,
    capability: IntGaugeVec,
    net_raw_processes: IntGaugeVec,
    dns_refused: IntCounterVec,
    dns_latency: HistogramVec,
    dns_learned: IntGaugeVec,
    dns_rebinding: IntCounterVec,
    dns_malformed: IntCounterVec,
    dns_netns_listeners: IntGaugeVec,
    dns_netns_errors: IntCounterVec,
    state: Mutex<Seen>,
    /// Runs before each render: pulls the kernel's counters so that a scrape
    /// sees the current totals, not the last poll's.
    collector: Mutex<Option<Collector>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Add `total` to `counter` under absolute-total semantics (module docs).
fn advance(counter: &IntCounter, last: &mut u64, total: u64) {
    let delta = if total >= *last { total - *last } else { total };
    if delta > 0 {
        counter.inc_by(delta);
    }
    *last = total;
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Self {
        /// The registry, and the names registered in it.
        struct Reg {
            registry: Registry,
            names: std::cell::RefCell<Vec<(String, Vec<String>)>>,
        }
        let registry = Reg {
            registry: Registry::new(),
            names: Default::default(),
        };
        // Names and labels are constants: registration cannot fail except by
        // a programming error (duplicate name), caught by the tests.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Reg, c: C) -> C {
            r.names.borrow_mut().extend(
                c.desc()
                    .iter()
                    .map(|d| (d.fq_name.clone(), d.variable_labels.clone())),
            );
            r.registry
                .register(Box::new(c.clone()))
                .expect("static metric definition");
            c
        }
        fn counter_vec(r: &Reg, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
            )
        }
        fn gauge_vec(r: &Reg, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            reg(
                r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"),
            )
        }
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid counter"),
            )
        };
        let r = &registry;
        let m = Self {
            denied_destinations: counter_vec(
                r,
                "enforcer_denied_destinations_total",
                "Refused decisions (verdict deny; audit: would-be refusals in audit mode) by \
                 destination as the audit log names it; at most 50 destinations per identity, \
                 the rest under destination=\"other\".",
                &["identity", "action", "verdict", "destination"],
            ),
            decisions: counter_vec(
                r,
                "enforcer_decisions_total",
                "Decisions taken in the kernel, from the kernel's per-CPU counters (allows answered by the flow cache: when their flow is drained, within ~1 s).",
                &["identity", "action", "verdict", "reason"],
            ),
            events: counter_vec(
                r,
                "enforcer_events_total",
                "Decisions the kernel reported: ring-buffer events, and the allowed decisions that flow records stand for.",
                &["identity", "action", "verdict"],
            ),
            pod_events: counter_vec(
                r,
                "enforcer_pod_events_total",
                "Decision events of processes in a bound pod (Kubernetes mode), by container.",
                &[
                    "identity",
                    "spiffe_id",
                    "namespace",
                    "pod",
                    "container",
                    "action",
                    "verdict",
                ],
            ),
            pod_info: gauge_vec(
                r,
                "enforcer_pod_info",
                "1 for each pod bound to an identity (Kubernetes mode).",
                &["identity", "spiffe_id", "namespace", "pod", "uid"],
            ),
            pod_series: Mutex::new(HashMap::new()),
            events_lost: counter(
                "enforcer_events_lost_total",
                "Decision events the kernel could not put in the ring buffer (full).",
            ),
            no_identity_decisions: counter(
                "enforcer_no_identity_decisions_total",
                "Decisions for cgroups with no bound identity (denied, fail closed).",
            ),
            dns_steered: counter(
                "enforcer_dns_steered_total",
                "Sends and connects to port 53 the kernel steered to a DNS proxy.",
            ),
            dns_steer_failed: counter(
                "enforcer_dns_steer_failed_total",
                "Sends and connects to port 53 refused because the socket's record of the \
                 resolver it addressed could not be created (fail closed).",
            ),
            dns_learn_writes: counter_vec(
                r,
                "enforcer_dns_learn_writes_total",
                "Writes of learned addresses to the kernel map (written), and writes \
                 skipped because the kernel entry already stood for the answer (skipped).",
                &["result"],
            ),
            dns_queries: counter_vec(
                r,
                "enforcer_dns_queries_total",
                "DNS queries seen by the enforcer's DNS proxy.",
                &["identity", "verdict"],
            ),
            attached_cgroups: reg(
                r,
                IntGauge::new(
                    "enforcer_attached_cgroups",
                    "Cgroups the enforcement programs are attached to.",
                )
                .expect("valid gauge"),
            ),
            policy_entries: gauge_vec(
                r,
                "enforcer_policy_entries",
                "Entries (LPM prefixes) in the identity's compiled egress table.",
                &["identity"],
            ),
            tainted: gauge_vec(
                r,
                "enforcer_identity_tainted",
                "1 once the identity read a `taint` file: its egress is clamped to spec.onTaint.",
                &["identity"],
            ),
            file_rules: gauge_vec(
                r,
                "enforcer_file_rules",
                "Inodes in the identity's file rule table (rule paths and the files listed under directory rules).",
                &["identity"],
            ),
            policy_info: gauge_vec(
                r,
                "enforcer_policy_info",
                "Policy in force per identity (always 1).",
                &["identity", "spiffe_id", "mode", "policy_hash"],
            ),
            policy_reloads: counter_vec(
                r,
                "enforcer_policy_reloads_total",
                "Policy reloads by result.",
                &["result"],
            ),
            audit_records: counter(
                "enforcer_audit_records_total",
                "Records appended to the audit log.",
            ),
            audit_lost: counter(
                "enforcer_audit_records_lost_total",
                "Records that could not be written to the audit log (a write failed; the log \
                 reopens its file and says so in a chain_resume record).",
            ),
            build_info: gauge_vec(
                r,
                "enforcer_build_info",
                "Build information (always 1).",
                &["version"],
            ),
            capability: gauge_vec(
                r,
                "enforcer_capability",
                "Kernel capability available to the enforcer (1) or missing (0).",
                &["name"],
            ),
            dns_refused: counter_vec(
                r,
                "enforcer_dns_refused_total",
                "DNS queries refused (REFUSED; SERVFAIL for learn-error and policy-changed), by reason (name-not-allowed, tainted, \
                 query-type, too-long, budget, learn-error, policy-changed).",
                &["identity", "reason"],
            ),
            dns_latency: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "enforcer_dns_query_duration_seconds",
                        "Time from a query's arrival at the DNS proxy to its answer.",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0, 2.5,
                    ]),
                    &["identity"],
                )
                .expect("valid histogram"),
            ),
            dns_learned: gauge_vec(
                r,
                "enforcer_dns_learned_addresses",
                "Addresses currently reachable because a DNS answer allowed them.",
                &["identity"],
            ),
            dns_rebinding: counter_vec(
                r,
                "enforcer_dns_rebinding_blocked_total",
                "Answer addresses in loopback/link-local/private ranges not installed \
                 (no cidr rule covers them).",
                &["identity"],
            ),
            dns_malformed: counter_vec(
                r,
                "enforcer_dns_malformed_total",
                "Malformed DNS messages dropped by the proxy.",
                &["identity"],
            ),
            dns_netns_listeners: gauge_vec(
                r,
                "enforcer_dns_netns_listeners",
                "Network namespaces besides the daemon's (pods) where the identity's DNS proxy \
                 listens.",
                &["identity"],
            ),
            dns_netns_errors: counter_vec(
                r,
                "enforcer_dns_netns_errors_total",
                "Failed attempts at opening the identity's DNS proxy listeners in a workload's \
                 network namespace (reason: loopback-unavailable, port-in-use, setns, other; limit: \
                 once per namespace beyond the identity's cap).",
                &["identity", "reason"],
            ),
            net_raw_processes: gauge_vec(
                r,
                "enforcer_net_raw_processes",
                "Processes of an identity holding CAP_NET_RAW: their packet sockets cannot be \
                 refused by cgroup hooks on a kernel without BPF LSM.",
                &["identity"],
            ),
            names: registry.names.take(),
            registry: registry.registry,
            state: Mutex::new(Seen::default()),
            collector: Mutex::new(None),
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for r in [ReloadResult::Ok, ReloadResult::Rejected] {
            m.policy_reloads.with_label_values(&[r.as_str()]);
        }
        m
    }

    /// The registry, for collectors registered elsewhere.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric this registry exports, with its labels (a vector
    /// without series yet included; a histogram's `_bucket`, `_sum` and
    /// `_count` are under its name).
    pub fn names(&self) -> &[(String, Vec<String>)] {
        &self.names
    }

    /// A refused (`Deny`) or would-be refused (`Audit`) decision of
    /// `identity` to `destination` (other verdicts are not counted).
    pub fn record_denied_destination(
        &self,
        identity: &str,
        action: Action,
        verdict: Verdict,
        destination: &str,
    ) {
        if !matches!(verdict, Verdict::Deny | Verdict::Audit) {
            return;
        }
        let labels = {
            let mut st = self.state();
            let (kept, series) = st.denied.entry(identity.to_string()).or_default();
            let dest = if kept.contains(destination) {
                destination
            } else if kept.len() < DENIED_DESTINATIONS_PER_IDENTITY {
                kept.insert(destination.to_string());
                destination
            } else {
                "other"
            };
            let labels = [
                action.as_str().to_string(),
                verdict.as_str().to_string(),
                dest.to_string(),
            ];
            series.insert(labels.clone());
            labels
        };
        self.denied_destinations
            .with_label_values(&[identity, &labels[0], &labels[1], &labels[2]])
            .inc();
    }

    fn state(&self) -> MutexGuard<'_, Seen> {
        // A panic while holding the lock leaves plain numbers behind: usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advance `enforcer_decisions_total{identity,action,verdict}` to the
    /// kernel's absolute `total` (absolute-total semantics, module docs).
    pub fn set_decisions_total(&self, identity: &str, action: &str, verdict: &str, total: u64) {
        self.set_decisions_total_reason(identity, action, verdict, "", total);
    }

    /// As [`Self::set_decisions_total`], with a `reason` (refused first bytes).
    pub fn set_decisions_total_reason(
        &self,
        identity: &str,
        action: &str,
        verdict: &str,
        reason: &str,
        total: u64,
    ) {
        let counter = self
            .decisions
            .with_label_values(&[identity, action, verdict, reason]);
        let mut st = self.state();
        let last = st
            .decisions
            .entry(identity.to_string())
            .or_default()
            .entry((action.to_string(), verdict.to_string(), reason.to_string()))
            .or_default();
        advance(&counter, last, total);
    }

    /// Count one event read from the ring buffer.
    pub fn record_event(&self, identity: &str, action: Action, verdict: Verdict) {
        self.record_events(identity, action, verdict, 1);
    }

    /// Count `n` decisions the audit log received (one event, or a flow
    /// record that stands for `n` allowed decisions).
    pub fn record_events(&self, identity: &str, action: Action, verdict: Verdict, n: u64) {
        self.events
            .with_label_values(&[identity, action.as_str(), verdict.as_str()])
            .inc_by(n);
    }

    /// An event of a process in a bound pod (its container when known).
    pub fn record_pod_event(
        &self,
        identity: &str,
        w: &crate::events::Workload,
        action: Action,
        verdict: Verdict,
        n: u64,
    ) {
        let labels = vec![
            identity.to_string(),
            w.spiffe_id.clone(),
            w.namespace.clone(),
            w.pod.clone(),
            w.container.clone().unwrap_or_default(),
            action.as_str().to_string(),
            verdict.as_str().to_string(),
        ];
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.pod_events.with_label_values(&refs).inc_by(n);
        let mut s = self.pod_series.lock().unwrap_or_else(|e| e.into_inner());
        let v = s.entry((w.namespace.clone(), w.pod.clone())).or_default();
        if !v.contains(&labels) {
            v.push(labels);
        }
    }

    /// The bound pods: (identity, spiffe_id, namespace, pod, uid). Pods no
    /// longer listed lose their `enforcer_pod_info` and event series.
    pub fn set_pods(&self, pods: &[PodLabels]) {
        self.pod_info.reset();
        for (identity, spiffe, ns, pod, uid) in pods {
            self.pod_info
                .with_label_values(&[identity, spiffe, ns, pod, uid])
                .set(1);
        }
        let mut s = self.pod_series.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|(ns, pod), series| {
            let keep = pods.iter().any(|p| &p.2 == ns && &p.3 == pod);
            if !keep {
                for l in series.iter() {
                    let refs: Vec<&str> = l.iter().map(String::as_str).collect();
                    let _ = self.pod_events.remove_label_values(&refs);
                }
            }
            keep
        });
    }

    /// [`Self::record_event`] for a decoded decision.
    pub fn record_decision(&self, d: &Decision) {
        self.record_event(&d.identity.name, d.action, d.verdict);
    }

    /// Absolute-total setter for `enforcer_events_lost_total`.
    pub fn set_events_lost_total(&self, total: u64) {
        advance(&self.events_lost, &mut self.state().events_lost, total);
    }

    /// Absolute-total setter for `enforcer_no_identity_decisions_total`.
    pub fn set_no_identity_decisions_total(&self, total: u64) {
        advance(
            &self.no_identity_decisions,
            &mut self.state().no_identity,
            total,
        );
    }

    /// Absolute-total setters for `enforcer_dns_steered_total` and
    /// `enforcer_dns_steer_failed_total`.
    pub fn set_dns_steered_total(&self, steered: u64, failed: u64) {
        let mut st = self.state();
        advance(&self.dns_steered, &mut st.dns_steered, steered);
        advance(&self.dns_steer_failed, &mut st.dns_steer_failed, failed);
    }

    /// Absolute-total setter for `enforcer_dns_learn_writes_total`.
    pub fn set_dns_learn_writes_total(&self, written: u64, skipped: u64) {
        let mut st = self.state();
        advance(
            &self.dns_learn_writes.with_label_values(&["written"]),
            &mut st.dns_learn_written,
            written,
        );
        advance(
            &self.dns_learn_writes.with_label_values(&["skipped"]),
            &mut st.dns_learn_skipped,
            skipped,
        );
    }

    pub fn record_dns_query(&self, identity: &str, verdict: Verdict) {
        self.dns_queries
            .with_label_values(&[identity, verdict.as_str()])
            .inc();
    }

    pub fn set_attached_cgroups(&self, n: u64) {
        self.attached_cgroups.set(gauge_value(n));
    }

    pub fn set_policy_entries(&self, identity: &str, entries: u64) {
        self.policy_entries
            .with_label_values(&[identity])
            .set(gauge_value(entries));
    }

    pub fn set_tainted(&self, identity: &str, tainted: bool) {
        self.tainted
            .with_label_values(&[identity])
            .set(i64::from(tainted));
    }

    pub fn set_file_rules(&self, identity: &str, inodes: u64) {
        self.file_rules
            .with_label_values(&[identity])
            .set(gauge_value(inodes));
    }

    /// Export the policy in force for `identity`; the previous label set of
    /// that identity (other hash, mode, ...) is removed.
    pub fn set_policy_info(
        &self,
        identity: &str,
        spiffe_id: Option<&str>,
        mode: &str,
        policy_hash: &str,
    ) {
        let new = [
            spiffe_id.unwrap_or("").to_string(),
            mode.to_string(),
            policy_hash.to_string(),
        ];
        let mut st = self.state();
        if let Some(old) = st.policy_info.get(identity) {
            if *old == new {
                return;
            }
            let _ = self
                .policy_info
                .remove_label_values(&[identity, &old[0], &old[1], &old[2]]);
        }
        self.policy_info
            .with_label_values(&[identity, &new[0], &new[1], &new[2]])
            .set(1);
        st.policy_info.insert(identity.to_string(), new);
    }

    pub fn record_policy_reload(&self, result: ReloadResult) {
        self.policy_reloads
            .with_label_values(&[result.as_str()])
            .inc();
    }

    pub fn inc_audit_records(&self, n: u64) {
        self.audit_records.inc_by(n);
    }

    pub fn inc_audit_lost(&self) {
        self.audit_lost.inc();
    }

    /// `enforcer_capability{name}`: 1 if available, 0 if missing (e.g. "bpf_lsm").
    pub fn set_capability(&self, name: &str, available: bool) {
        self.capability
            .with_label_values(&[name])
            .set(i64::from(available));
    }

    pub fn record_dns_refused(&self, identity: &str, reason: &str) {
        self.dns_refused
            .with_label_values(&[identity, reason])
            .inc();
    }

    pub fn observe_dns_latency(&self, identity: &str, seconds: f64) {
        self.dns_latency
            .with_label_values(&[identity])
            .observe(seconds);
    }

    pub fn set_dns_learned(&self, identity: &str, n: u64) {
        self.dns_learned
            .with_label_values(&[identity])
            .set(gauge_value(n));
    }

    pub fn add_dns_rebinding_blocked(&self, identity: &str, n: u64) {
        self.dns_rebinding.with_label_values(&[identity]).inc_by(n);
    }

    pub fn inc_dns_malformed(&self, identity: &str) {
        self.dns_malformed.with_label_values(&[identity]).inc();
    }

    /// `enforcer_dns_netns_listeners{identity}`.
    pub fn set_dns_netns_listeners(&self, identity: &str, n: u64) {
        self.dns_netns_listeners
            .with_label_values(&[identity])
            .set(gauge_value(n));
    }

    /// `enforcer_dns_netns_errors_total{identity,reason}`.
    pub fn inc_dns_netns_error(&self, identity: &str, reason: &str) {
        self.dns_netns_errors
            .with_label_values(&[identity, reason])
            .inc();
    }

    /// `enforcer_net_raw_processes{identity}`.
    pub fn set_net_raw_processes(&self, identity: &str, n: u64) {
        self.net_raw_processes
            .with_label_values(&[identity])
            .set(gauge_value(n));
    }

    /// Drop every label set of `identity` (its policy was removed). Its
    /// absolute-total history is forgotten too: if it comes back, its kernel
    /// totals are counted from scratch.
    pub fn forget_identity(&self, identity: &str) {
        let mut st = self.state();
        if let Some(seen) = st.decisions.remove(identity) {
            for (action, verdict, reason) in seen.keys() {
                let _ = self
                    .decisions
                    .remove_label_values(&[identity, action, verdict, reason]);
            }
        }
        if let Some(old) = st.policy_info.remove(identity) {
            let _ = self
                .policy_info
                .remove_label_values(&[identity, &old[0], &old[1], &old[2]]);
        }
        if let Some((_, series)) = st.denied.remove(identity) {
            for l in series {
                let _ = self
                    .denied_destinations
                    .remove_label_values(&[identity, &l[0], &l[1], &l[2]]);
            }
        }
        drop(st);
        for verdict in Verdict::ALL {
            for action in Action::ALL {
                let _ =
                    self.events
                        .remove_label_values(&[identity, action.as_str(), verdict.as_str()]);
            }
            let _ = self
                .dns_queries
                .remove_label_values(&[identity, verdict.as_str()]);
        }
        let _ = self.policy_entries.remove_label_values(&[identity]);
        let _ = self.tainted.remove_label_values(&[identity]);
        let _ = self.file_rules.remove_label_values(&[identity]);
        let _ = self.net_raw_processes.remove_label_values(&[identity]);
        let _ = self.dns_latency.remove_label_values(&[identity]);
        let _ = self.dns_learned.remove_label_values(&[identity]);
        let _ = self.dns_rebinding.remove_label_values(&[identity]);
        let _ = self.dns_malformed.remove_label_values(&[identity]);
        let _ = self.dns_netns_listeners.remove_label_values(&[identity]);
        for reason in [
            "loopback-unavailable",
            "port-in-use",
            "setns",
            "not-served",
            "other",
        ] {
            let _ = self
                .dns_netns_errors
                .remove_label_values(&[identity, reason]);
        }
        for reason in [
            "name-not-allowed",
            "tainted",
            "query-type",
            "too-long",
            "budget",
            "upstream-error",
            "learn-error",
            "policy-changed",
            "malformed",
        ] {
            let _ = self.dns_refused.remove_label_values(&[identity, reason]);
        }
    }

    /// Identities that currently have decision counters (for tests/status).
    pub fn identities(&self) -> HashSet<String> {
        let st = self.state();
        st.decisions
            .keys()
            .chain(st.policy_info.keys())
            .cloned()
            .collect()
    }

    /// Prometheus text exposition format 0.0.4.
    /// Install the hook that refreshes kernel-fed values before a render.
    pub fn set_collector(&self, f: Collector) {
        *self.collector.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    pub fn render(&self) -> String {
        if let Some(f) = self
            .collector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f();
        }
        let mut out = Vec::with_capacity(4096);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())
    }
}

/// Refresh hook, see [`Metrics::set_collector`].
pub type Collector = Box<dyn Fn() + Send + Sync>;

/// Readiness probe for `/healthz`: must be quick and must not block.
pub type HealthCheck = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: HealthCheck,
}

/// `GET /metrics` and `GET /healthz` (200 "ok" / 503 "unhealthy").
pub fn router(metrics: Arc<Metrics>, health: HealthCheck) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        s.metrics.render(),
    )
}

async fn health_handler(State(s): State<AppState>) -> impl IntoResponse {
    if (s.health)() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    }
}

/// Bind `addr` (port 0 picks one) and serve [`router`] on a spawned task.
/// Returns the bound address and the task; abort the task to stop serving.
/// There are no request timeouts: bind to a node-local address.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    health: HealthCheck,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = router(metrics, health);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics and /healthz");
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The value of the sample `name{labels}` (labels exactly as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let ctype = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        (status, ctype, body.to_string())
    }

    #[test]
    fn metrics_decisions_absolute_total_and_reset() {
        let m = Metrics::new();
        let s = r#"enforcer_decisions_total{action="connect",identity="research",reason="",verdict="deny"}"#;
        m.set_decisions_total("research", "connect", "deny", 5);
        assert_eq!(sample(&m.render(), s), Some(5.0));
        m.set_decisions_total("research", "connect", "deny", 12);
        assert_eq!(sample(&m.render(), s), Some(12.0));
        m.set_decisions_total("research", "connect", "deny", 12);
        assert_eq!(sample(&m.render(), s), Some(12.0));
        // Kernel counter reset (slot reused): 3 new decisions since.
        m.set_decisions_total("research", "connect", "deny", 3);
        assert_eq!(sample(&m.render(), s), Some(15.0));
        m.set_decisions_total("research", "connect", "deny", 4);
        assert_eq!(sample(&m.render(), s), Some(16.0));
        // Label sets are independent.
        m.set_decisions_total("research", "connect", "allow", 2);
        let allow = s.replace("deny", "allow");
        assert_eq!(sample(&m.render(), &allow), Some(2.0));
        assert_eq!(sample(&m.render(), s), Some(16.0));
    }

    #[test]
    fn metrics_scalar_absolute_totals() {
        let m = Metrics::new();
        m.set_events_lost_total(7);
        m.set_events_lost_total(9);
        m.set_events_lost_total(1);
        m.set_no_identity_decisions_total(4);
        let text = m.render();
        assert_eq!(sample(&text, "enforcer_events_lost_total"), Some(10.0));
        assert_eq!(
            sample(&text, "enforcer_no_identity_decisions_total"),
            Some(4.0)
        );
    }

    #[test]
    fn metrics_policy_info_replaces_and_forget_identity_removes() {
        let m = Metrics::new();
        let sp = Some("spiffe://example.org/ns/agents/sa/research");
        m.set_policy_info("research", sp, "enforce", "aaaa");
        m.set_policy_info("research", sp, "audit", "bbbb");
        m.set_policy_info("other", None, "enforce", "cccc");
        m.set_policy_entries("research", 12);
        m.set_decisions_total("research", "connect", "deny", 1);
        m.record_event("research", Action::Connect, Verdict::Deny);
        m.record_dns_query("research", Verdict::Allow);
        let text = m.render();
        assert!(!text.contains("aaaa"), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"enforcer_policy_info{identity="research",mode="audit",policy_hash="bbbb",spiffe_id="spiffe://example.org/ns/agents/sa/research"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"enforcer_policy_entries{identity="research"}"#),
            Some(12.0)
        );

        m.forget_identity("research");
        let text = m.render();
        assert!(!text.contains(r#"identity="research""#), "{text}");
        assert!(text.contains(r#"identity="other""#), "{text}");
        assert_eq!(m.identities(), HashSet::from(["other".to_string()]));

        // A returning identity starts its kernel totals from scratch.
        m.set_decisions_total("research", "connect", "deny", 1);
        assert_eq!(
            sample(
                &m.render(),
                r#"enforcer_decisions_total{action="connect",identity="research",reason="",verdict="deny"}"#
            ),
            Some(1.0)
        );
    }

    #[tokio::test]
    async fn metrics_http_scrape_and_healthz() {
        let m = Arc::new(Metrics::new());
        m.set_decisions_total("research", "connect", "deny", 42);
        m.record_event("research", Action::Dns, Verdict::Allow);
        m.record_event("research", Action::Dns, Verdict::Allow);
        m.set_attached_cgroups(3);
        m.set_policy_info("research", None, "enforce", "ab12");
        m.record_policy_reload(ReloadResult::Rejected);
        m.inc_audit_records(5);
        m.set_capability("bpf_lsm", false);
        m.set_capability("cgroup_sock_addr", true);
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let (addr, task) = serve(
            m.clone(),
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(move || h.load(Ordering::SeqCst)),
        )
        .await
        .unwrap();
        assert_ne!(addr.port(), 0);

        let (status, ctype, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        for (series, value) in [
            (
                r#"enforcer_decisions_total{action="connect",identity="research",reason="",verdict="deny"}"#,
                42.0,
            ),
            (
                r#"enforcer_events_total{action="dns",identity="research",verdict="allow"}"#,
                2.0,
            ),
            ("enforcer_attached_cgroups", 3.0),
            (
                r#"enforcer_policy_info{identity="research",mode="enforce",policy_hash="ab12",spiffe_id=""}"#,
                1.0,
            ),
            (r#"enforcer_policy_reloads_total{result="ok"}"#, 0.0),
            (r#"enforcer_policy_reloads_total{result="rejected"}"#, 1.0),
            ("enforcer_audit_records_total", 5.0),
            ("enforcer_events_lost_total", 0.0),
            (r#"enforcer_capability{name="bpf_lsm"}"#, 0.0),
            (r#"enforcer_capability{name="cgroup_sock_addr"}"#, 1.0),
            (
                &format!(
                    r#"enforcer_build_info{{version="{}"}}"#,
                    env!("CARGO_PKG_VERSION")
                ),
                1.0,
            ),
        ] {
            assert_eq!(sample(&body, series), Some(value), "{series} in\n{body}");
        }
        assert!(body.contains("# TYPE enforcer_decisions_total counter"));
        assert!(body.contains("# TYPE enforcer_attached_cgroups gauge"));

        let (status, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        healthy.store(false, Ordering::SeqCst);
        let (status, _, _) = http_get(addr, "/healthz").await;
        assert_eq!(status, 503);

        let (status, _, _) = http_get(addr, "/nope").await;
        assert_eq!(status, 404);
        task.abort();
    }

    #[tokio::test]
    async fn metrics_serve_reports_bind_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(Arc::new(Metrics::new()), addr, Arc::new(|| true))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("binding the metrics endpoint"));
    }

    /// The PromQL expressions of a Grafana dashboard: every panel target's
    /// `expr` and every template variable's query.
    fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            // A datasource variable's query names a plugin, not PromQL.
            serde_json::Value::Object(m) if m.get("type").is_some_and(|t| t == "datasource") => {}
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(q)) => {
                            out.push(q.clone())
                        }
                        _ => dashboard_queries(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
            _ => {}
        }
    }

    /// `enforcer_*` names in `expr`, and the label names it matches on or
    /// groups by (`{name=..}`, `{name=~..}`, `by (a, b)`).
    fn promql_names(expr: &str) -> (Vec<String>, Vec<String>) {
        let b = expr.as_bytes();
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let (mut metrics, mut labels) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'"' {
                // A string: skip it (label values, legend text).
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1 + usize::from(b[i] == b'\\');
                }
                i += 1;
                continue;
            }
            if !ident(b[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let next = expr[i..].trim_start();
            if word.starts_with("enforcer_") {
                metrics.push(word.to_string());
            } else if next.starts_with("=~")
                || next.starts_with("!~")
                || next.starts_with("!=")
                || (next.starts_with('=') && !next.starts_with("=="))
            {
                labels.push(word.to_string());
            } else if word == "by" && next.starts_with('(') {
                let close = next.find(')').expect("by (...) closes");
                labels.extend(
                    next[1..close]
                        .split(',')
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty()),
                );
            }
        }
        (metrics, labels)
    }

    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics_and_labels() {
        let m = Metrics::new();
        let exported: HashMap<&str, &Vec<String>> =
            m.names().iter().map(|(n, l)| (n.as_str(), l)).collect();
        // The registry lists vectors without series too.
        assert!(exported.contains_key("enforcer_denied_destinations_total"));
        assert!(exported.contains_key("enforcer_dns_query_duration_seconds"));
        let text = include_str!("../../deploy/monitoring/grafana-dashboard.json");
        let dash: serde_json::Value = serde_json::from_str(text).expect("dashboard is JSON");
        let mut queries = Vec::new();
        dashboard_queries(&dash, &mut queries);
        assert!(queries.len() >= 20, "{queries:?}");
        let mut seen = HashSet::new();
        for q in &queries {
            let (metrics, labels) = promql_names(q);
            assert!(!metrics.is_empty(), "a query of no enforcer metric: {q}");
            let mut allowed: HashSet<&str> = HashSet::new();
            for name in &metrics {
                // A histogram's series carry a suffix (and the `le` label).
                let (base, le) = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suf| {
                        let base = name.strip_suffix(suf)?;
                        exported
                            .contains_key(base)
                            .then_some((base, *suf == "_bucket"))
                    })
                    .unwrap_or((name.as_str(), false));
                let Some(l) = exported.get(base) else {
                    panic!("the dashboard queries {name}, which enforcer does not export: {q}");
                };
                allowed.extend(l.iter().map(String::as_str));
                if le {
                    allowed.insert("le");
                }
                seen.insert(base.to_string());
            }
            for l in &labels {
                assert!(
                    allowed.contains(l.as_str()),
                    "label {l} is not a label of {metrics:?}: {q}"
                );
            }
        }
        // What the dashboard is for (issue 16): decisions per identity and
        // verdict, top denied destinations, DNS refusals by reason, taint
        // state, lost events.
        for must in [
            "enforcer_decisions_total",
            "enforcer_denied_destinations_total",
            "enforcer_dns_refused_total",
            "enforcer_identity_tainted",
            "enforcer_events_lost_total",
        ] {
            assert!(seen.contains(must), "the dashboard does not show {must}");
        }
        // The checks can fail: a misspelt metric and a label it lacks.
        let (bad, _) = promql_names("rate(enforcer_decision_total[5m])");
        assert!(!exported.contains_key(bad[0].as_str()));
        let (_, labels) =
            promql_names(r#"sum by (pod) (enforcer_decisions_total{verdict="deny"})"#);
        assert_eq!(labels, ["pod", "verdict"]);
        assert!(!exported["enforcer_decisions_total"].contains(&"pod".to_string()));
    }

    #[test]
    fn denied_destinations_are_bounded_per_identity() {
        let m = Metrics::new();
        for i in 0..DENIED_DESTINATIONS_PER_IDENTITY + 10 {
            m.record_denied_destination(
                "agent",
                Action::Connect,
                Verdict::Deny,
                &format!("10.0.0.{i}:443"),
            );
        }
        m.record_denied_destination("agent", Action::Connect, Verdict::Deny, "10.0.0.0:443");
        m.record_denied_destination("agent", Action::Connect, Verdict::Allow, "10.9.9.9:443");
        let text = m.render();
        let series = |d: &str| {
            sample(
                &text,
                &format!(
                    r#"enforcer_denied_destinations_total{{action="connect",destination="{d}",identity="agent",verdict="deny"}}"#
                ),
            )
        };
        assert_eq!(series("10.0.0.0:443"), Some(2.0));
        assert_eq!(series("other"), Some(10.0));
        assert_eq!(series("10.0.0.55:443"), None, "past the bound: under other");
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("enforcer_denied_destinations_total{"))
                .count(),
            DENIED_DESTINATIONS_PER_IDENTITY + 1
        );
        assert!(!text.contains("10.9.9.9"), "an allow is not a denial");
        m.forget_identity("agent");
        assert!(!m.render().contains("enforcer_denied_destinations_total{"));
    }
}
