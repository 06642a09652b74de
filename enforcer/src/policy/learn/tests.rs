//! Unit tests of `enforcer policy learn`: audit records in, policy out.
//! The records are written as the audit log writes them (`crate::audit`).
use serde_json::{json, Value};

use super::*;
use crate::policy::{EgressRule, FileAccess, Inspect, Protocol};

const ID: &str = "research-agent";

/// Seconds after a fixed instant, as the log writes it.
fn ts(s: u32) -> String {
    format!("2026-12-05T10:{:02}:{:02}.000000Z", s / 60, s % 60)
}

fn decision(t: u32, action: &str, verdict: &str, extra: Value) -> Value {
    let mut r = json!({
        "seq": 0, "ts": ts(t), "identity": {"name": ID, "spiffe_id": null},
        "cgroup_id": 42, "pid": 100, "comm": "curl", "action": action,
        "ip": null, "port": null, "protocol": null, "host": null,
        "verdict": verdict, "rule": "default-deny", "policy_hash": "ab", "prev_hash": "00"
    });
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

/// An audit-mode DNS record of `name` answered with `addrs`.
fn dns(t: u32, name: &str, qtype: &str, addrs: &[&str]) -> Value {
    let detail = if addrs.is_empty() {
        format!("qtype={qtype} reason=name-not-allowed transport=udp latency_us=80")
    } else {
        format!(
            "qtype={qtype} reason=name-not-allowed transport=udp latency_us=80 answered=[{}]",
            addrs.join(",")
        )
    };
    decision(
        t,
        "dns",
        "audit",
        json!({"ip": "127.0.0.1", "port": 40000, "protocol": "udp", "host": name,
               "rule": "name-not-allowed", "detail": detail, "comm": ""}),
    )
}

fn connect(t: u32, ip: &str, port: u16, comm: &str) -> Value {
    decision(
        t,
        "connect",
        "audit",
        json!({"ip": ip, "port": port, "protocol": "tcp", "comm": comm}),
    )
}

fn sendmsg(t: u32, ip: &str, port: u16) -> Value {
    decision(
        t,
        "sendmsg",
        "audit",
        json!({"ip": ip, "port": port, "protocol": "udp"}),
    )
}

fn file_open(t: u32, path: &str, comm: &str) -> Value {
    decision(
        t,
        "file_open",
        "audit",
        json!({"path": path, "rule": format!("files[0] {path}"), "comm": comm,
               "detail": "inode 12 dev 8:1"}),
    )
}

fn start(t: u32) -> Value {
    json!({"seq": 0, "ts": ts(t), "identity": null, "action": "start",
           "detail": "enforcer run", "prev_hash": "00"})
}

fn log(records: &[Value]) -> String {
    records.iter().map(|r| format!("{r}\n")).collect()
}

fn learn_str(records: &[Value], opts: &LearnOptions) -> Learned {
    let o = records::read_str(&log(records), opts.identity.as_deref())
        .unwrap_or_else(|e| panic!("{e}"));
    build(&o, &[PathBuf::from("audit.jsonl")], opts).unwrap_or_else(|e| panic!("{e}"))
}

fn rules(l: &Learned) -> Vec<String> {
    l.policy
        .spec
        .egress
        .iter()
        .map(render::egress_text)
        .collect()
}

fn on_taint(l: &Learned) -> Vec<String> {
    l.policy
        .spec
        .on_taint
        .as_ref()
        .map(|t| t.egress.iter().map(render::egress_text).collect())
        .unwrap_or_default()
}

/// The learned YAML reads back as the learned policy.
fn assert_round_trip(l: &Learned) {
    let back = crate::policy::parse_str(&l.yaml, Path::new("out.yaml"))
        .unwrap_or_else(|e| panic!("output does not validate:\n{e}\n{}", l.yaml));
    assert_eq!(back[0].policy, l.policy, "{}", l.yaml);
}

#[test]
fn names_explain_connects_and_the_rest_are_exact_addresses() {
    let l = learn_str(
        &[
            start(0),
            dns(1, "api.example.com", "A", &["203.0.113.10", "203.0.113.11"]),
            dns(1, "api.example.com", "AAAA", &["2001:db8::10"]),
            connect(2, "203.0.113.10", 443, "curl"),
            connect(3, "203.0.113.11", 443, "python3"),
            connect(4, "2001:db8::10", 443, "python3"),
            // No DNS answer named this one.
            connect(5, "198.51.100.7", 5432, "psql"),
            // Steered to the DNS proxy: never a rule.
            sendmsg(6, "10.0.0.2", 53),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(
        rules(&l),
        vec![
            "host api.example.com ports [443] tcp",
            "cidr 198.51.100.7/32 ports [5432] tcp",
        ]
    );
    assert_round_trip(&l);
    assert!(
        l.yaml.contains(
            "# api.example.com: connects: 3, first 2026-12-05T10:00:02Z, last \
             2026-12-05T10:00:04Z, by curl, python3"
        ),
        "{}",
        l.yaml
    );
    assert!(l
        .yaml
        .contains("no DNS answer of the agent named this address"));
    assert!(l.policy.spec.on_taint.is_none() && l.policy.spec.files.is_empty());
    assert_eq!(l.policy.spec.mode, crate::policy::Mode::Enforce);
}

#[test]
fn a_connect_before_the_answer_is_not_explained_by_it() {
    // In enforce mode the connect would come before the address is learned:
    // a host rule would not let it through.
    let l = learn_str(
        &[
            connect(1, "203.0.113.10", 443, "curl"),
            dns(30, "api.example.com", "A", &["203.0.113.10"]),
            connect(31, "203.0.113.10", 443, "curl"),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(
        rules(&l),
        vec![
            "host api.example.com ports [443] tcp",
            "cidr 203.0.113.10/32 ports [443] tcp",
        ]
    );
}

#[test]
fn an_answer_of_one_run_explains_nothing_in_the_next() {
    let l = learn_str(
        &[
            start(0),
            dns(1, "api.example.com", "A", &["203.0.113.10"]),
            connect(2, "203.0.113.10", 443, "curl"),
            start(100),
            connect(101, "203.0.113.10", 443, "curl"),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(
        rules(&l),
        vec![
            "host api.example.com ports [443] tcp",
            "cidr 203.0.113.10/32 ports [443] tcp",
        ]
    );
}

#[test]
fn flow_records_count_and_ports_merge_into_ranges() {
    let mut flow = connect(9, "203.0.113.10", 8001, "agent");
    flow["verdict"] = "allow".into();
    flow["rule"] = "egress[0] host api.example.com".into();
    flow["host"] = "api.example.com".into();
    flow["flow"] = json!({"count": 40, "first_seen": ts(2), "last_seen": ts(9)});
    let l = learn_str(
        &[
            dns(1, "api.example.com", "A", &["203.0.113.10"]),
            flow,
            connect(10, "203.0.113.10", 8000, "agent"),
            connect(11, "203.0.113.10", 8002, "agent"),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(
        rules(&l),
        vec!["host api.example.com ports [8000-8002] tcp"],
        "unknown ports keep the name check"
    );
    assert!(l.yaml.contains("connects: 42,"), "{}", l.yaml);
    assert!(!l.yaml.contains("inspect: none"), "{}", l.yaml);
    assert_round_trip(&l);
}

#[test]
fn nameless_protocols_and_udp_opt_out_of_inspection_quic_is_not_learned() {
    let l = learn_str(
        &[
            dns(1, "git.example.com", "A", &["203.0.113.20"]),
            connect(2, "203.0.113.20", 22, "ssh"),
            connect(3, "203.0.113.20", 443, "git"),
            dns(4, "quic.example.com", "A", &["203.0.113.21"]),
            sendmsg(5, "203.0.113.21", 443),
            dns(6, "pool.ntp.example", "A", &["203.0.113.22"]),
            sendmsg(7, "203.0.113.22", 123),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(
        rules(&l),
        vec![
            "host git.example.com ports [443] tcp",
            "host git.example.com ports [22] tcp inspect none",
            "host pool.ntp.example ports [123] udp inspect none",
        ]
    );
    for w in [
        "UDP to quic.example.com port 443 (QUIC) is not learned",
        "git.example.com port 22 (tcp): inspect: none",
        "pool.ntp.example port 123 (udp): inspect: none",
    ] {
        assert!(
            l.warnings.iter().any(|x| x.contains(w)),
            "{w}: {:?}",
            l.warnings
        );
    }
    assert_round_trip(&l);
}

/// A refused first-bytes judgement (a fronting attempt) never turns the
/// name check off; first bytes that were neither TLS nor HTTP do, for that
/// port.
#[test]
fn only_nameless_first_bytes_turn_inspection_off() {
    let inspect = |t: u32, port: u16, reason: &str| {
        decision(
            t,
            "inspect",
            "audit",
            json!({"ip": "203.0.113.10", "port": port, "protocol": "tcp", "reason": reason,
                   "first_bytes": "tls", "presented": "evil.example"}),
        )
    };
    let l = learn_str(
        &[
            dns(1, "api.example.com", "A", &["203.0.113.10"]),
            connect(2, "203.0.113.10", 443, "agent"),
            inspect(2, 443, "name-mismatch"),
            connect(3, "203.0.113.10", 7000, "agent"),
            inspect(3, 7000, "not-tls-or-http"),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(
        rules(&l),
        vec![
            "host api.example.com ports [443] tcp",
            "host api.example.com ports [7000] tcp inspect none",
        ]
    );
    assert!(l
        .yaml
        .contains("first bytes on port 7000 that were neither TLS nor HTTP"));
}

#[test]
fn siblings_collapse_at_the_threshold_never_above_a_registrable_domain() {
    let mut recs = Vec::new();
    for (i, n) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let t = 10 * i as u32;
        let ip = format!("203.0.113.{}", 30 + i);
        recs.push(dns(t, &format!("{n}.cdn.example.com"), "A", &[&ip]));
        recs.push(connect(t + 1, &ip, 443, "agent"));
    }
    // Four siblings under example.org: below the threshold.
    for (i, n) in ["w", "x", "y", "z"].iter().enumerate() {
        let t = 100 + 10 * i as u32;
        let ip = format!("198.51.100.{}", 30 + i);
        recs.push(dns(t, &format!("{n}.example.org"), "A", &[&ip]));
        recs.push(connect(t + 1, &ip, 443, "agent"));
    }
    // Five "siblings" directly under a public suffix: never `*.co.uk`.
    for (i, n) in ["p", "q", "r", "s", "t"].iter().enumerate() {
        let t = 200 + 10 * i as u32;
        let ip = format!("192.0.2.{}", 30 + i);
        recs.push(dns(t, &format!("{n}.co.uk"), "A", &[&ip]));
        recs.push(connect(t + 1, &ip, 443, "agent"));
    }
    let l = learn_str(&recs, &LearnOptions::default());
    let r = rules(&l);
    assert!(
        r.contains(&"host *.cdn.example.com ports [443] tcp".to_string()),
        "{r:?}"
    );
    assert!(!r.iter().any(|x| x.contains("a.cdn.example.com")), "{r:?}");
    assert!(
        r.contains(&"host w.example.org ports [443] tcp".to_string()),
        "{r:?}"
    );
    assert!(!r.iter().any(|x| x.contains("*.example.org")), "{r:?}");
    assert!(
        r.contains(&"host p.co.uk ports [443] tcp".to_string()),
        "{r:?}"
    );
    assert!(!r.iter().any(|x| x.contains("*.co.uk")), "{r:?}");
    assert!(
        l.yaml.contains(
            "5 sibling names connected to, collapsed: a.cdn.example.com, b.cdn.example.com, \
             c.cdn.example.com, d.cdn.example.com, e.cdn.example.com"
        ),
        "{}",
        l.yaml
    );
    assert_round_trip(&l);

    // A lower threshold collapses example.org; 0 never collapses.
    let l = learn_str(
        &recs,
        &LearnOptions {
            wildcard_threshold: 4,
            ..LearnOptions::default()
        },
    );
    assert!(rules(&l).contains(&"host *.example.org ports [443] tcp".to_string()));
    let l = learn_str(
        &recs,
        &LearnOptions {
            wildcard_threshold: 0,
            ..LearnOptions::default()
        },
    );
    assert!(!rules(&l).iter().any(|r| r.contains('*')));
}

#[test]
fn wildcard_parents_stop_at_the_public_suffix_list() {
    assert_eq!(
        wildcard_parent("a.b.example.com").as_deref(),
        Some("b.example.com")
    );
    assert_eq!(
        wildcard_parent("api.example.com").as_deref(),
        Some("example.com")
    );
    assert_eq!(wildcard_parent("example.com"), None, "*.com");
    assert_eq!(
        wildcard_parent("shop.example.co.uk").as_deref(),
        Some("example.co.uk")
    );
    assert_eq!(wildcard_parent("example.co.uk"), None, "*.co.uk");
    // A private suffix of the list (github.io): each user is a registrable
    // domain; and github.io is multi-tenant: nothing collapses under it.
    assert_eq!(wildcard_parent("alice.github.io"), None, "*.github.io");
    assert_eq!(wildcard_parent("docs.alice.github.io"), None);
    // Multi-tenant domains the list misses: buckets, wildcard DNS.
    assert_eq!(wildcard_parent("bucket.storage.googleapis.com"), None);
    assert_eq!(wildcard_parent("a.b.storage.googleapis.com"), None);
    assert_eq!(wildcard_parent("1-2-3-4.nip.io"), None);
    assert_eq!(wildcard_parent("x.elb.amazonaws.com"), None);
    assert_eq!(
        wildcard_parent("api.internal.example.com").as_deref(),
        Some("internal.example.com")
    );
}

#[test]
fn names_only_resolved_are_not_allowed_and_a_tunnel_is_called_out() {
    let mut recs = vec![
        dns(1, "api.example.com", "A", &["203.0.113.10"]),
        connect(2, "203.0.113.10", 443, "agent"),
        dns(3, "prefetch.example.net", "A", &["203.0.113.99"]),
    ];
    for i in 0..12 {
        recs.push(dns(10 + i, &format!("c2VjcmV0{i}.t.evil.test"), "TXT", &[]));
    }
    let l = learn_str(&recs, &LearnOptions::default());
    assert_eq!(rules(&l), vec!["host api.example.com ports [443] tcp"]);
    assert!(
        l.yaml.contains("# - host: \"prefetch.example.net\""),
        "{}",
        l.yaml
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("12 distinct names under evil.test") && w.contains("DNS tunnel")),
        "{:?}",
        l.warnings
    );
    // TXT was only asked for names the policy does not allow.
    let d = l.policy.spec.dns.as_ref().unwrap();
    assert_eq!(d.query_types, vec!["A", "AAAA"]);
    assert_round_trip(&l);
}

#[test]
fn rebinding_answers_get_a_vouching_cidr_rule() {
    let l = learn_str(
        &[
            dns(1, "svc.internal.example", "A", &["127.0.0.5"]),
            connect(2, "127.0.0.5", 8443, "agent"),
            dns(3, "db.corp.example", "A", &["10.1.2.3"]),
            connect(4, "10.1.2.3", 5432, "agent"),
            connect(5, "169.254.169.254", 80, "agent"),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(
        rules(&l),
        vec![
            "host db.corp.example ports [5432] tcp inspect none",
            "host svc.internal.example ports [8443] tcp",
            "cidr 10.1.2.3/32 ports [5432] tcp",
            "cidr 127.0.0.5/32 ports [8443] tcp",
            "cidr 169.254.169.254/32 ports [80] tcp",
        ]
    );
    assert!(l
        .yaml
        .contains("vouches for svc.internal.example: its answer is in loopback space"));
    assert!(l
        .yaml
        .contains("vouches for db.corp.example: its answer is in private/internal space"));
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("169.254.169.254:80") && w.contains("cloud metadata")),
        "{:?}",
        l.warnings
    );
    assert_round_trip(&l);
}

#[test]
fn cidr_prefix_widens_unexplained_addresses() {
    let l = learn_str(
        &[
            connect(1, "198.51.100.7", 443, "agent"),
            connect(2, "198.51.100.9", 443, "agent"),
            connect(3, "2001:db8:1:2::7", 443, "agent"),
        ],
        &LearnOptions {
            cidr_prefix_v4: 24,
            cidr_prefix_v6: 64,
            ..LearnOptions::default()
        },
    );
    assert_eq!(
        rules(&l),
        vec![
            "cidr 198.51.100.0/24 ports [443] tcp",
            "cidr 2001:db8:1:2::/64 ports [443] tcp",
        ]
    );
}

/// The scenario of the issue: the agent reads an SSH key, then a hostile
/// instruction sends it once to a fresh destination.
fn exfiltration_run() -> Vec<Value> {
    vec![
        start(0),
        dns(1, "api.example.com", "A", &["203.0.113.10"]),
        connect(2, "203.0.113.10", 443, "agent"),
        file_open(10, "/home/agent/.ssh", "agent"),
        // After the read: the agent's own API again (cached answer)...
        connect(11, "203.0.113.10", 443, "agent"),
        // ...it resolves it again and connects...
        dns(12, "api.example.com", "A", &["203.0.113.10"]),
        connect(13, "203.0.113.10", 443, "agent"),
        // ...and the exfiltration: once, after the read.
        dns(14, "upload.evil.test", "A", &["198.51.100.66"]),
        connect(15, "198.51.100.66", 443, "agent"),
    ]
}

#[test]
fn a_secret_read_becomes_taint_with_the_egress_seen_after_it() {
    let l = learn_str(&exfiltration_run(), &LearnOptions::default());
    let f = &l.policy.spec.files;
    assert_eq!(f.len(), 1);
    assert_eq!(
        (f[0].path.to_str().unwrap(), f[0].access),
        ("/home/agent/.ssh", FileAccess::Taint)
    );
    assert!(
        l.yaml
            .contains("# SSH keys: opens: 1, first 2026-12-05T10:00:10Z, by agent"),
        "{}",
        l.yaml
    );
    // Before the read: only the API.
    assert_eq!(rules(&l), vec!["host api.example.com ports [443] tcp"]);
    // After it: the API (the first connect after the read used the answer
    // from before it, which the DNS proxy installs under the taint key too
    // since the onTaint rules allow the name), and the exfiltration.
    assert_eq!(
        on_taint(&l),
        vec![
            "host api.example.com ports [443] tcp",
            "host upload.evil.test ports [443] tcp",
        ]
    );
    assert!(l.yaml.contains("answered before the taint read"));
    let warning = l
        .warnings
        .iter()
        .find(|w| {
            w.contains(
                "upload.evil.test port 443 was contacted once, only after reading /home/agent/.ssh",
            )
        })
        .unwrap_or_else(|| panic!("no warning: {:?}", l.warnings));
    assert!(warning.contains("--exclude"));
    assert!(
        l.yaml.contains(
            "# WARNING: contacted once, only after a taint read: an exfiltration?\n      \
             # upload.evil.test: connects: 1, first 2026-12-05T10:00:15Z, by agent\n      \
             - host: \"upload.evil.test\""
        ),
        "{}",
        l.yaml
    );
    assert!(!l
        .warnings
        .iter()
        .any(|w| w.contains("api.example.com port")));
    assert_round_trip(&l);
}

#[test]
fn excluded_destinations_are_not_learned() {
    for exclude in [
        "host=upload.evil.test",
        "host=*.evil.test",
        "ip=198.51.100.0/24",
    ] {
        let l = learn_str(
            &exfiltration_run(),
            &LearnOptions {
                excludes: vec![exclude.parse().unwrap()],
                ..LearnOptions::default()
            },
        );
        assert!(
            !on_taint(&l)
                .iter()
                .any(|r| r.contains("evil") || r.contains("198.51.100")),
            "--exclude {exclude}: {:?}",
            on_taint(&l)
        );
        assert!(l
            .yaml
            .contains(&format!("# Excluded (--exclude {exclude}): ")));
        assert!(
            !l.warnings.iter().any(|w| w.contains("evil")),
            "{:?}",
            l.warnings
        );
    }
    // By process: everything `nc` did.
    let mut recs = exfiltration_run();
    recs.push(connect(16, "192.0.2.1", 4444, "nc"));
    let l = learn_str(
        &recs,
        &LearnOptions {
            excludes: vec!["process=nc".parse().unwrap()],
            ..LearnOptions::default()
        },
    );
    assert!(!on_taint(&l).iter().any(|r| r.contains("192.0.2.1")));
    assert!("port=1".parse::<Exclude>().is_err());
    assert!("host=10.0.0.1".parse::<Exclude>().is_err());
    assert!("process=a-very-long-process-name"
        .parse::<Exclude>()
        .is_err());
}

#[test]
fn the_base_policy_keeps_upstreams_and_unopened_secrets_become_deny() {
    let base = crate::policy::parse_str(
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: discover\n\
         spec:\n  identity: {spiffeId: spiffe://example.org/agent}\n  mode: audit\n  egress: []\n  \
         dns:\n    upstream: [\"127.0.0.53:53\"]\n  files:\n    - {path: /home/agent/.ssh, access: audit}\n    \
         - {path: /home/agent/.aws, access: audit}\n    - {path: /srv/data, access: audit}\n",
        Path::new("discover.yaml"),
    )
    .unwrap()
    .remove(0)
    .policy;
    let l = learn_str(
        &exfiltration_run(),
        &LearnOptions {
            base: Some(base),
            excludes: vec!["host=upload.evil.test".parse().unwrap()],
            ..LearnOptions::default()
        },
    );
    let files: Vec<(String, FileAccess)> = l
        .policy
        .spec
        .files
        .iter()
        .map(|f| (f.path.display().to_string(), f.access))
        .collect();
    assert_eq!(
        files,
        vec![
            ("/home/agent/.aws".to_string(), FileAccess::Deny),
            ("/home/agent/.ssh".to_string(), FileAccess::Taint),
            ("/srv/data".to_string(), FileAccess::Audit),
        ]
    );
    assert!(l
        .yaml
        .contains("AWS credentials: watched by the run's policy, never opened: deny"));
    assert_eq!(l.policy.metadata.name, "discover");
    let d = l.policy.spec.dns.as_ref().unwrap();
    assert_eq!(d.upstream, vec!["127.0.0.53:53".parse().unwrap()]);
    assert_eq!(
        l.policy
            .spec
            .identity
            .as_ref()
            .unwrap()
            .spiffe_id
            .as_deref(),
        Some("spiffe://example.org/agent")
    );
    assert_round_trip(&l);
}

#[test]
fn dns_settings_come_from_the_allowed_queries_with_headroom() {
    let long = format!("{}.{}.example.com", "a".repeat(45), "b".repeat(45));
    let mut recs = vec![
        dns(1, &long, "A", &["203.0.113.40"]),
        connect(2, "203.0.113.40", 443, "agent"),
        dns(3, "_sip._tcp.voice.example.com", "SRV", &[]),
        dns(3, "voice.example.com", "A", &["203.0.113.41"]),
        connect(4, "203.0.113.41", 5061, "agent"),
    ];
    // Six names under one wildcard within a minute.
    for i in 0..6 {
        let ip = format!("203.0.113.{}", 50 + i);
        recs.push(dns(10 + i, &format!("n{i}.cdn.example.net"), "A", &[&ip]));
        recs.push(connect(10 + i, &ip, 443, "agent"));
    }
    let l = learn_str(&recs, &LearnOptions::default());
    let d = l.policy.spec.dns.as_ref().unwrap();
    assert_eq!(d.max_query_length, Some(154), "103 + 50%");
    assert_eq!(
        d.query_types,
        vec!["A", "AAAA"],
        "SRV was for a refused name"
    );
    assert_eq!(d.names_per_minute, Some(16), "6 doubled is 12, at least 16");
    assert!(l.yaml.contains("# longest name asked: 103"));
    // Allow the SRV name: its type is kept.
    recs.push(dns(
        30,
        "_sip._tcp.voice.example.com",
        "SRV",
        &["203.0.113.42"],
    ));
    recs.push(connect(31, "203.0.113.42", 5061, "agent"));
    let l = learn_str(&recs, &LearnOptions::default());
    assert_eq!(
        l.policy.spec.dns.as_ref().unwrap().query_types,
        vec!["A", "AAAA", "SRV"]
    );
    assert_round_trip(&l);
}

#[test]
fn denied_and_unlearnable_records_are_reported_not_learned() {
    let mut denied = connect(2, "192.0.2.9", 443, "agent");
    denied["verdict"] = "deny".into();
    let raw = decision(
        3,
        "sock_create",
        "audit",
        json!({"rule": "raw-socket", "detail": "family=inet type=raw protocol=1"}),
    );
    let l = learn_str(
        &[connect(1, "198.51.100.7", 443, "agent"), denied, raw],
        &LearnOptions::default(),
    );
    assert_eq!(rules(&l), vec!["cidr 198.51.100.7/32 ports [443] tcp"]);
    assert!(
        l.yaml
            .contains("# Not learned: 1 denied connect record(s), e.g. ")
            && l.yaml.contains("audit.jsonl:2 (192.0.2.9:443 by agent)"),
        "{}",
        l.yaml
    );
    assert!(l
        .yaml
        .contains("# Not learned: 1 sock_create (raw-socket) record(s)"));
}

#[test]
fn unix_sockets_and_inbound_peers_are_learned() {
    let l = learn_str(
        &[
            decision(
                1,
                "unix_connect",
                "audit",
                json!({"socket": "/run/agent/helper.sock", "socket_kind": "path"}),
            ),
            decision(
                2,
                "unix_send",
                "audit",
                json!({"socket": "my-helper", "socket_kind": "abstract"}),
            ),
            decision(
                3,
                "unix_connect",
                "deny",
                json!({"socket": "/run/nscd/socket", "socket_kind": "path", "rule": "resolver-ipc"}),
            ),
            decision(
                4,
                "ingress",
                "audit",
                json!({"ip": "10.30.0.7", "port": 8080, "protocol": "tcp"}),
            ),
        ],
        &LearnOptions::default(),
    );
    let local: Vec<String> = l
        .policy
        .spec
        .local
        .iter()
        .map(|r| format!("{:?} {:?}", r.path, r.abstract_name))
        .collect();
    assert_eq!(
        local,
        vec![
            "None Some(\"my-helper\")",
            "Some(\"/run/agent/helper.sock\") None",
        ]
    );
    let i = &l.policy.spec.ingress;
    assert_eq!(i.len(), 1);
    assert_eq!(i[0].cidr.to_string(), "10.30.0.7/32");
    assert_eq!(i[0].protocol, Protocol::Tcp);
    assert_round_trip(&l);
}

#[test]
fn identities_are_chosen_and_bad_logs_are_refused_with_their_line() {
    let mut other = connect(1, "192.0.2.1", 443, "x");
    other["identity"]["name"] = "other-agent".into();
    let text = log(&[connect(1, "198.51.100.7", 443, "agent"), other]);
    let e = records::read_str(&text, None).unwrap_err().to_string();
    assert!(
        e.contains("several identities") && e.contains("other-agent (1 records)"),
        "{e}"
    );
    let o = records::read_str(&text, Some("other-agent")).unwrap();
    assert_eq!(o.flows.len(), 1);
    let e = records::read_str(&text, Some("nobody"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no decision records of identity \"nobody\""),
        "{e}"
    );

    let bad = format!(
        "{}{{\"ts\": \"2026-12-05T10:00:00Z\", \"seq\": 1\n",
        log(&[start(0)])
    );
    let e = records::read_str(&bad, None).unwrap_err().to_string();
    assert!(
        e.contains("audit.jsonl:2: not an enforcer audit record"),
        "{e}"
    );
    // OCSF events have an `action` of their own ("Denied").
    let ocsf = "{\"class_uid\": 4001, \"action\": \"Denied\", \"time\": 1}\n";
    let e = records::read_str(ocsf, None).unwrap_err().to_string();
    assert!(e.contains("audit.jsonl:1: an OCSF event"), "{e}");
    let e = records::read_str(&log(&[start(0)]), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no decision records"), "{e}");
}

#[test]
fn diff_lists_what_would_be_added_and_removed() {
    let l = learn_str(&exfiltration_run(), &LearnOptions::default());
    let mut old = l.policy.clone();
    old.spec.egress = vec![EgressRule {
        cidr: Some("10.0.0.0/8".parse().unwrap()),
        host: None,
        ports: vec![],
        protocol: Protocol::Any,
        inspect: Inspect::Name,
    }];
    old.spec.files.clear();
    let d = diff(&old, &l.policy);
    assert_eq!(
        d,
        vec![
            "- egress: cidr 10.0.0.0/8 ports [all] any",
            "+ egress: host api.example.com ports [443] tcp",
            "+ files: /home/agent/.ssh taint",
        ]
    );
    assert!(diff(&l.policy, &l.policy).is_empty());
}

#[test]
fn the_discovery_policy_validates_and_watches_existing_secrets() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".ssh")).unwrap();
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    let y = discovery(
        "discover",
        &[home.path().to_path_buf()],
        &[secrets::parse("~/.config/acme=ACME token").unwrap()],
        &["127.0.0.53:53".parse().unwrap()],
    );
    let p = crate::policy::parse_str(&y, Path::new("discover.yaml"))
        .unwrap_or_else(|e| panic!("{e}\n{y}"))
        .remove(0)
        .policy;
    assert_eq!(p.spec.mode, crate::policy::Mode::Audit);
    assert!(p.spec.egress.is_empty());
    let watched: Vec<_> = p.spec.files.iter().map(|f| f.path.clone()).collect();
    assert!(watched.contains(&home.path().join(".ssh")), "{y}");
    assert!(watched.contains(&home.path().join(".aws")), "{y}");
    assert!(p.spec.files.iter().all(|f| f.access == FileAccess::Audit));
    assert!(y.contains(&format!(
        "#   {}",
        home.path().join(".config/acme").display()
    )));
}

// ---------------------------------------------------------------- poisoning

/// Two names on one address (a CDN, or a decoy resolving to the real API's
/// address): both are learned, none is dropped, and it is called out.
#[test]
fn an_address_answered_for_several_names_explains_for_all_of_them() {
    let l = learn_str(
        &[
            dns(1, "api.openai.com", "A", &["203.0.113.10"]),
            connect(2, "203.0.113.10", 443, "python3"),
            dns(3, "c2.attacker.net", "A", &["203.0.113.10"]),
            connect(4, "203.0.113.10", 443, "python3"),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(
        rules(&l),
        vec![
            "host api.openai.com ports [443] tcp",
            "host c2.attacker.net ports [443] tcp",
        ]
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("203.0.113.10 was answered for names of different domains")),
        "{:?}",
        l.warnings
    );
    // Excluding the decoy keeps the real name.
    let l = learn_str(
        &[
            dns(1, "api.openai.com", "A", &["203.0.113.10"]),
            dns(3, "c2.attacker.net", "A", &["203.0.113.10"]),
            connect(4, "203.0.113.10", 443, "python3"),
        ],
        &LearnOptions {
            excludes: vec!["host=c2.attacker.net".parse().unwrap()],
            ..LearnOptions::default()
        },
    );
    assert_eq!(rules(&l), vec!["host api.openai.com ports [443] tcp"]);
}

#[test]
fn an_answer_older_than_the_ttl_clamp_explains_nothing() {
    let l = learn_str(
        &[
            dns(1, "api.example.com", "A", &["203.0.113.10"]),
            // 31 minutes later: the learned address expired long ago.
            connect(1861, "203.0.113.10", 443, "agent"),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(rules(&l), vec!["cidr 203.0.113.10/32 ports [443] tcp"]);
    assert!(
        l.yaml.contains("# - host: \"api.example.com\""),
        "{}",
        l.yaml
    );
}

#[test]
fn runs_are_split_per_file() {
    // Two logs of concurrent runs: each file's answers explain its own
    // connects, whatever the other file's `start` records say.
    let a = log(&[
        start(0),
        dns(10, "api.example.com", "A", &["203.0.113.10"]),
        connect(11, "203.0.113.10", 443, "agent"),
    ]);
    let b = log(&[start(5), connect(20, "198.51.100.1", 443, "agent")]);
    let dir = tempfile::tempdir().unwrap();
    let (fa, fb) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    std::fs::write(&fa, a).unwrap();
    std::fs::write(&fb, b).unwrap();
    let l = learn(&[fa, fb], &LearnOptions::default()).unwrap();
    assert_eq!(
        rules(&l),
        vec![
            "host api.example.com ports [443] tcp",
            "cidr 198.51.100.1/32 ports [443] tcp",
        ]
    );
}

#[test]
fn the_runs_file_rules_are_never_weakened() {
    let base = crate::policy::parse_str(
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: b\nspec:\n  \
         mode: audit\n  egress: []\n  files:\n    - {path: /srv/keys, access: deny}\n    \
         - {path: /srv/customer-data, access: taint}\n",
        Path::new("b.yaml"),
    )
    .unwrap()
    .remove(0)
    .policy;
    let l = learn_str(
        &[
            file_open(1, "/srv/keys", "agent"),
            dns(2, "api.example.com", "A", &["203.0.113.10"]),
            connect(3, "203.0.113.10", 443, "agent"),
            file_open(4, "/srv/customer-data", "agent"),
            dns(5, "upload.example.net", "A", &["198.51.100.5"]),
            connect(6, "198.51.100.5", 443, "agent"),
        ],
        &LearnOptions {
            base: Some(base),
            ..LearnOptions::default()
        },
    );
    let files: Vec<(String, FileAccess)> = l
        .policy
        .spec
        .files
        .iter()
        .map(|f| (f.path.display().to_string(), f.access))
        .collect();
    assert_eq!(
        files,
        vec![
            ("/srv/customer-data".to_string(), FileAccess::Taint),
            ("/srv/keys".to_string(), FileAccess::Deny),
        ]
    );
    assert!(l
        .warnings
        .iter()
        .any(|w| w.contains("/srv/keys: the run's policy denies it")));
    // The custom taint file clamps too: what came after it is onTaint.
    assert_eq!(rules(&l), vec!["host api.example.com ports [443] tcp"]);
    assert_eq!(
        on_taint(&l),
        vec!["host upload.example.net ports [443] tcp"]
    );
    assert!(l.warnings.iter().any(|w| w.contains(
        "upload.example.net port 443 was contacted once, only after reading /srv/customer-data"
    )));
}

/// The warning does not depend on the count, and reaches a wildcard that
/// admits the destination.
#[test]
fn every_destination_first_contacted_after_the_read_is_called_out() {
    let mut recs = exfiltration_run();
    recs.push(dns(16, "upload.evil.test", "A", &["198.51.100.66"]));
    recs.push(connect(17, "198.51.100.66", 443, "agent"));
    for (i, n) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let t = 20 + 2 * i as u32;
        let ip = format!("192.0.2.{}", 10 + i);
        recs.push(dns(t, &format!("{n}.drop.example.org"), "A", &[&ip]));
        recs.push(connect(t + 1, &ip, 443, "agent"));
    }
    let l = learn_str(&recs, &LearnOptions::default());
    assert!(
        l.warnings.iter().any(|w| w.starts_with(
            "upload.evil.test port 443 was contacted only after reading /home/agent/.ssh"
        ) && w.contains("(2 contact(s))")),
        "{:?}",
        l.warnings
    );
    assert!(on_taint(&l).contains(&"host *.drop.example.org ports [443] tcp".to_string()));
    let wild = l.yaml.find("- host: \"*.drop.example.org\"").unwrap();
    let before = &l.yaml[..wild];
    let last_rule = before.rfind("- ").unwrap();
    assert!(
        before[last_rule..].contains("# WARNING: contacted once, only after a taint read"),
        "{}",
        l.yaml
    );
}

/// A tunnel hidden under a learned wildcard: the settings come from the
/// names connected to, and the bulk of resolved-only names is called out.
#[test]
fn a_tunnel_under_a_wildcard_does_not_raise_the_dns_settings() {
    let mut recs = Vec::new();
    for (i, n) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let t = 2 * i as u32;
        let ip = format!("203.0.113.{}", 60 + i);
        recs.push(dns(t, &format!("{n}.t.attacker.net"), "A", &[&ip]));
        recs.push(connect(t + 1, &ip, 443, "agent"));
    }
    for i in 0..300 {
        let name = format!("{}{i}.t.attacker.net", "x".repeat(40));
        recs.push(dns(20 + i / 10, &name, "TXT", &[]));
    }
    let l = learn_str(&recs, &LearnOptions::default());
    assert!(rules(&l).contains(&"host *.t.attacker.net ports [443] tcp".to_string()));
    let d = l.policy.spec.dns.as_ref().unwrap();
    assert_eq!(d.query_types, vec!["A", "AAAA"]);
    assert_eq!(d.names_per_minute, Some(16));
    assert_eq!(d.max_query_length, Some(64));
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("300 distinct names under attacker.net") && w.contains("tunnel")),
        "{:?}",
        l.warnings
    );
}

#[test]
fn multi_tenant_domains_never_collapse_and_every_collapsed_name_is_listed() {
    let mut recs = Vec::new();
    for i in 0..6 {
        let ip = format!("203.0.113.{}", 70 + i);
        recs.push(dns(
            2 * i,
            &format!("b{i}.storage.googleapis.com"),
            "A",
            &[&ip],
        ));
        recs.push(connect(2 * i + 1, &ip, 443, "agent"));
    }
    for i in 0..7 {
        let ip = format!("198.51.100.{}", 70 + i);
        recs.push(dns(
            40 + 2 * i,
            &format!("n{i}.cdn.example.com"),
            "A",
            &[&ip],
        ));
        recs.push(connect(41 + 2 * i, &ip, 443, "agent"));
    }
    let l = learn_str(&recs, &LearnOptions::default());
    let r = rules(&l);
    assert!(
        !r.iter().any(|x| x.contains("*.storage.googleapis.com")),
        "{r:?}"
    );
    assert!(r.contains(&"host b0.storage.googleapis.com ports [443] tcp".to_string()));
    assert!(l.yaml.contains(
        "7 sibling names connected to, collapsed: n0.cdn.example.com, n1.cdn.example.com, \
         n2.cdn.example.com, n3.cdn.example.com, n4.cdn.example.com, n5.cdn.example.com, \
         n6.cdn.example.com"
    ));
}

#[test]
fn more_ports_than_a_rule_holds_are_merged_into_ranges() {
    let mut recs = vec![dns(0, "api.example.com", "A", &["203.0.113.10"])];
    for i in 0..20u16 {
        recs.push(connect(1, "203.0.113.10", 10000 + 7 * i, "agent"));
    }
    for i in 0..20u16 {
        recs.push(connect(2, "198.51.100.9", 20000 + 11 * i, "agent"));
    }
    let l = learn_str(&recs, &LearnOptions::default());
    let e = &l.policy.spec.egress;
    assert_eq!(e.len(), 2);
    for r in e {
        assert!(r.ports.len() <= enforcer_common::MAX_PORT_RULES, "{r:?}");
        assert!(r.ports.iter().any(|p| p.lo < p.hi), "merged: {r:?}");
    }
    assert!(l.yaml.contains("20 ports merged into"));
    assert_round_trip(&l);
}

/// Process names, names and socket names are the agent's: they cannot
/// move the terminal's cursor or break the YAML's lines.
#[test]
fn agent_chosen_strings_cannot_break_the_output() {
    let l = learn_str(
        &[
            connect(1, "169.254.169.254", 80, "\r\u{1b}[2K\u{1b}[8m"),
            connect(2, "198.51.100.7", 443, "a\u{2028}  ports:"),
            decision(
                3,
                "unix_connect",
                "audit",
                json!({"socket": "/var/run/docker.sock", "socket_kind": "path"}),
            ),
            dns(4, "svc.example.com", "A", &["127.0.0.9"]),
            connect(5, "127.0.0.9", 2375, "agent"),
        ],
        &LearnOptions::default(),
    );
    for w in &l.warnings {
        assert!(
            !w.chars().any(|c| c.is_control() || c == '\u{2028}'),
            "{w:?}"
        );
    }
    assert!(!l.yaml.contains('\u{2028}') && !l.yaml.contains('\u{1b}'));
    assert_round_trip(&l);
    for w in [
        "169.254.169.254:80: link-local: the cloud metadata service",
        "unix socket /var/run/docker.sock: the Docker API: root on the host",
        "svc.example.com resolves to 127.0.0.9 (loopback)",
    ] {
        assert!(
            l.warnings.iter().any(|x| x.contains(w)),
            "{w}: {:?}",
            l.warnings
        );
    }
}

/// A daemon's log in Kubernetes mode: records name the pod and the pod's
/// SPIFFE ID; the learned policy says which workload it saw.
#[test]
fn a_daemon_log_names_the_workload_it_was_learned_from() {
    let pod = |r: Value| {
        let mut r = r;
        r["identity"]["spiffe_id"] = "spiffe://cluster.local/ns/agents/sa/research".into();
        r["namespace"] = "agents".into();
        r["pod"] = "research-7d9f".into();
        r["container"] = "agent".into();
        r
    };
    let l = learn_str(
        &[
            json!({"seq": 0, "ts": ts(0), "identity": null, "action": "start",
                   "detail": "daemon", "prev_hash": "00"}),
            pod(dns(1, "api.example.com", "A", &["203.0.113.10"])),
            pod(connect(2, "203.0.113.10", 443, "python3")),
        ],
        &LearnOptions::default(),
    );
    assert_eq!(rules(&l), vec!["host api.example.com ports [443] tcp"]);
    assert!(
        l.yaml.contains(
            "# Workload identity seen: SPIFFE ID spiffe://cluster.local/ns/agents/sa/research, \
             namespace agents"
        ),
        "{}",
        l.yaml
    );
}

/// A log written as OCSF (`--audit-format ocsf`) teaches the same policy as
/// the same records in JSON.
#[test]
fn an_ocsf_log_teaches_what_its_json_twin_teaches() {
    let mut recs = exfiltration_run();
    let mut flow = connect(20, "203.0.113.10", 8443, "agent");
    flow["verdict"] = "allow".into();
    flow["host"] = "api.example.com".into();
    flow["flow"] = json!({"count": 7, "first_seen": ts(18), "last_seen": ts(20)});
    recs.push(flow);
    recs.push(connect(21, "198.51.100.7", 5432, "psql"));
    recs.push(decision(
        22,
        "unix_connect",
        "audit",
        json!({"socket": "/run/agent/helper.sock", "socket_kind": "path"}),
    ));
    recs.push(decision(
        23,
        "ingress",
        "audit",
        json!({"ip": "10.30.0.7", "port": 8080, "protocol": "tcp"}),
    ));
    let json_text = log(&recs);
    let ctx = crate::ocsf::Context::local();
    let mut ocsf_text = String::new();
    for (i, line) in json_text.lines().enumerate() {
        let mut v: Value = serde_json::from_str(line).unwrap();
        v["seq"] = i.into();
        let line = v.to_string();
        let r: crate::ocsf::Record<'_> = serde_json::from_str(&line).unwrap();
        let mut out = Vec::new();
        crate::ocsf::write_event(&mut out, &r, &ctx).unwrap();
        ocsf_text.push_str(std::str::from_utf8(&out).unwrap());
        ocsf_text.push('\n');
    }
    assert!(ocsf_text.contains("\"class_uid\":4003"));
    let opts = LearnOptions::default();
    let from_json = records::read_str(&json_text, None).unwrap();
    let from_ocsf = records::read_str(&ocsf_text, None).unwrap();
    let a = build(&from_json, &[PathBuf::from("a.jsonl")], &opts).unwrap();
    let b = build(&from_ocsf, &[PathBuf::from("a.jsonl")], &opts).unwrap();
    assert_eq!(a.policy, b.policy, "json:\n{}\nocsf:\n{}", a.yaml, b.yaml);
    assert_eq!(a.warnings, b.warnings);
    assert!(!b.policy.spec.local.is_empty() && !b.policy.spec.ingress.is_empty());
    assert!(b.policy.spec.on_taint.is_some());
}
