//! Parsing and validation: shipped policies, and every error path with its
//! file, line, column and field.
use super::*;

const HEAD: &str = "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: t\n";

fn parse(yaml: &str) -> Vec<LoadedPolicy> {
    parse_str(yaml, Path::new("t.yaml")).unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
}

fn errs(yaml: &str) -> Vec<PolicyError> {
    match parse_str(yaml, Path::new("t.yaml")) {
        Ok(p) => panic!("expected errors, parsed {p:?}"),
        Err(PolicyErrors(e)) => e,
    }
}

/// Exactly one error, at (line, column) about `field`, whose message contains `text`.
fn one_err(yaml: &str, line: usize, column: usize, field: &str, text: &str) -> PolicyError {
    let e = errs(yaml);
    assert_eq!(
        e.len(),
        1,
        "expected one error, got:\n{}",
        PolicyErrors(e.clone())
    );
    let e = e.into_iter().next().unwrap();
    assert_eq!(e.file, Path::new("t.yaml"));
    assert_eq!(
        (e.line, e.column, e.field.as_str()),
        (line, column, field),
        "{e}"
    );
    assert!(e.message.contains(text), "{e}");
    e
}

/// `HEAD` + `spec:` + body; the body starts on line 6.
fn spec(body: &str) -> String {
    format!("{HEAD}spec:\n{body}")
}

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn shipped_policies_parse_and_validate() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(shipped_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let ps = parse_str(&text, f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!ps.is_empty());
        for p in &ps {
            assert_eq!(p.source, *f);
            assert_eq!(p.hash.len(), 64);
        }
    }
    // The directory loads as a whole too (names unique across files).
    let all = load_files(&[shipped_dir()]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.len(), files.len());
}

#[test]
fn demo_policy_is_what_the_demo_needs() {
    let ps = load_files(&[shipped_dir().join("demo-agent.yaml")]).unwrap();
    let p = &ps[0];
    assert_eq!(p.policy.metadata.name, "demo-agent");
    assert_eq!(p.policy.spec.mode, Mode::Enforce);
    check_supported(p).unwrap();
    let c = compile(p).unwrap();
    assert!(!c.audit);
    // The API by name (egress[0]), not in the LPM tables.
    assert_eq!(
        p.policy.spec.egress[0].host.as_deref(),
        Some("api.agent.demo")
    );
    assert!(c.rules[0].contains("api.agent.demo"), "{:?}", c.rules);
    // Telemetry (egress[1]) and the loopback voucher (egress[2]).
    assert!(c.v6.is_empty());
    let nets: Vec<String> = c.v4.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(nets, ["127.0.0.1/32", "127.0.0.10/32"]);
    let r = &c.v4[0].1.rules[0];
    assert_eq!(
        (r.port_lo, r.port_hi, r.proto_mask, r.rule_id),
        (5353, 5353, enforcer_common::proto::UDP, 2)
    );
    let r = &c.v4[1].1.rules[0];
    assert_eq!(
        (r.port_lo, r.port_hi, r.proto_mask, r.rule_id),
        (9, 9, enforcer_common::proto::TCP, 3)
    );
    assert_eq!(
        p.policy.spec.dns.as_ref().unwrap().upstream,
        ["127.0.0.1:5300".parse::<std::net::SocketAddr>().unwrap()]
    );
}

#[test]
fn dns_example_is_enforceable() {
    let ps = load_files(&[shipped_dir().join("dns-agent.yaml")]).unwrap();
    check_supported(&ps[0]).unwrap();
    let c = compile(&ps[0]).unwrap();
    assert_eq!(c.entry_count(), 0);
    let d = crate::dns::compile_dns(&ps[0], &c);
    assert_eq!(d.hosts.len(), 2);
    assert!(d.match_host("raw.githubusercontent.com").is_some());
    assert!(d.match_host("githubusercontent.com").is_none());
}

#[test]
fn audit_example_is_audit() {
    let ps = load_files(&[shipped_dir().join("audit-example.yaml")]).unwrap();
    assert_eq!(ps[0].policy.spec.mode, Mode::Audit);
    assert!(compile(&ps[0]).unwrap().audit);
}

#[test]
fn research_agent_validates_and_compiles_file_rules() {
    let f = shipped_dir().join("research-agent.yaml");
    let ps = load_files(std::slice::from_ref(&f)).unwrap();
    let p = &ps[0];
    let spec = &p.policy.spec;
    assert_eq!(spec.egress.len(), 2);
    assert_eq!(spec.egress[0].cidr.unwrap().to_string(), "10.20.0.0/16");
    assert_eq!(
        spec.egress[0].ports,
        vec![
            PortRange { lo: 5432, hi: 5432 },
            PortRange { lo: 8000, hi: 8100 }
        ]
    );
    assert_eq!(spec.egress[1].host.as_deref(), Some("api.openai.com"));
    let dns = spec.dns.as_ref().unwrap();
    assert_eq!(dns.upstream, vec!["127.0.0.53:53".parse().unwrap()]);
    let ttl = dns.ttl.unwrap();
    assert_eq!((ttl.min.as_secs(), ttl.max.as_secs()), (5, 300));
    assert_eq!(dns.max_query_length, Some(253));
    assert_eq!(spec.files[0].access, FileAccess::Deny);
    let k = spec.identity.as_ref().unwrap().kubernetes.as_ref().unwrap();
    assert_eq!(k.namespace.as_deref(), Some("agents"));
    let sel = k.pod_selector.as_ref().unwrap();
    assert_eq!(
        sel.match_labels.get("app").map(String::as_str),
        Some("research")
    );

    assert_eq!(spec.files[1].access, FileAccess::Taint);
    check_supported(p).unwrap();
    let c = compile(p).unwrap();
    assert_eq!(c.files.len(), 2);
    assert_eq!(c.files[0].rule_id, enforcer_common::rule::FILE_BASE + 1);
    assert_eq!(
        c.rule_name(enforcer_common::rule::FILE_BASE + 2),
        "files[1]"
    );
    // A taint file: the onTaint generation exists (host rules only: no LPM entries).
    let t = c.taint.as_ref().unwrap();
    assert!(t.v4.is_empty() && t.v6.is_empty());
    assert_eq!(
        c.taint_rules,
        vec!["onTaint.egress[0] host api.openai.com ports 443 any".to_string()]
    );
}

#[test]
fn file_rules_and_on_taint_compile_with_their_own_rule_ids() {
    let yaml = spec(
        "  egress:\n    - cidr: 10.0.0.0/8\n  files:\n    - path: /secret\n      access: taint\n    - path: /keys\n      access: deny\n  onTaint:\n    egress:\n      - cidr: 10.1.0.0/16\n        ports: [443]\n      - cidr: 192.0.2.1\n",
    );
    let ps = parse(&yaml);
    let c = compile(&ps[0]).unwrap();
    // Main generation: egress[0] only.
    assert_eq!(c.v4.len(), 1);
    assert_eq!(c.v4[0].1.rules[0].rule_id, 1);
    let t = c.taint.clone().unwrap();
    let ids: Vec<(String, u32)> =
        t.v4.iter()
            .map(|(n, s)| (n.to_string(), s.rules[0].rule_id))
            .collect();
    use enforcer_common::rule::TAINT_BASE;
    assert_eq!(
        ids,
        vec![
            ("10.1.0.0/16".to_string(), TAINT_BASE + 1),
            ("192.0.2.1/32".to_string(), TAINT_BASE + 2)
        ]
    );
    assert_eq!(c.rule_name(TAINT_BASE + 2), "onTaint.egress[1]");
    // No taint file: no onTaint generation (and an onTaint section is inert).
    let yaml = spec(
        "  files:\n    - path: /keys\n      access: deny\n    - path: /keys\n      access: audit\n",
    );
    let e = compile(&parse(&yaml)[0]).unwrap_err();
    assert!(e.to_string().contains("spec.files[1].path"), "{e}");
    assert!(
        e.to_string().contains("already listed as spec.files[0]"),
        "{e}"
    );
    let yaml = spec("  files:\n    - path: /keys\n      access: deny\n");
    assert!(compile(&parse(&yaml)[0]).unwrap().taint.is_none());
}

#[test]
fn minimal_policy_defaults() {
    let ps = parse(&format!("{HEAD}spec: {{}}\n"));
    let s = &ps[0].policy.spec;
    assert_eq!(s.mode, Mode::Enforce);
    assert!(s.egress.is_empty() && s.identity.is_none() && s.dns.is_none());
    assert_eq!(ps[0].line, 1);
    let r = &parse(&spec("  egress:\n    - cidr: 10.1.2.3\n"))[0]
        .policy
        .spec
        .egress[0];
    assert_eq!(r.cidr.unwrap().to_string(), "10.1.2.3/32");
    assert!(r.ports.is_empty());
    assert_eq!(r.protocol, Protocol::Any);
}

#[test]
fn multiple_documents_and_hash() {
    let text = format!(
        "{HEAD}spec: {{}}\n---\n# second\n{}spec: {{mode: audit}}\n",
        HEAD.replace("name: t", "name: u")
    );
    let ps = parse(&text);
    assert_eq!(ps.len(), 2);
    assert_eq!((ps[0].line, ps[1].line), (1, 8));
    assert_eq!(ps[1].policy.metadata.name, "u");
    assert_ne!(ps[0].hash, ps[1].hash);
    let json = serde_json::to_vec(&ps[1].policy).unwrap();
    assert_eq!(ps[1].hash, hex::encode(Sha256::digest(&json)));
    // The JSON form round-trips (and is what the hash covers).
    let back: AgentPolicy = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, ps[1].policy);
}

#[test]
fn full_schema_round_trips_through_json() {
    let f = shipped_dir().join("research-agent.yaml");
    let p = &load_files(&[f]).unwrap()[0];
    let json = serde_json::to_string(&p.policy).unwrap();
    assert_eq!(
        serde_json::from_str::<AgentPolicy>(&json).unwrap(),
        p.policy
    );
    assert_eq!(policy_hash(&p.policy), p.hash);
}

#[test]
fn unknown_field_top_level() {
    one_err(
        &format!("{HEAD}spec: {{}}\nspecs: {{}}\n"),
        6,
        1,
        "specs",
        "unknown field `specs` (did you mean `spec`?)",
    );
}

#[test]
fn unknown_field_nested() {
    one_err(
        &spec("  egress:\n    - cidr: 10.0.0.0/8\n      portz: [1]\n"),
        8,
        7,
        "spec.egress[0].portz",
        "unknown field `portz` (did you mean `ports`?)",
    );
    one_err(
        &spec("  dns:\n    ttl: {min: 1s, max: 2s, avg: 1s}\n"),
        7,
        29,
        "spec.dns.ttl.avg",
        "unknown field `avg`",
    );
    one_err(
        &format!("{HEAD}  labels: {{a: b}}\nspec: {{}}\n"),
        5,
        3,
        "metadata.labels",
        "unknown field",
    );
}

#[test]
fn bad_cidr() {
    one_err(
        &spec("  egress:\n    - cidr: 10.0.0.300/8\n"),
        7,
        13,
        "spec.egress[0].cidr",
        "invalid CIDR \"10.0.0.300/8\"",
    );
    one_err(
        &spec("  egress:\n    - cidr: 10.0.0.0/33\n"),
        7,
        13,
        "spec.egress[0].cidr",
        "invalid CIDR",
    );
    one_err(
        &spec("  egress:\n    - cidr: 443\n"),
        7,
        13,
        "spec.egress[0].cidr",
        "expected a string",
    );
}

#[test]
fn host_bits_set_suggest_network() {
    let e = one_err(
        &spec("  egress:\n    - cidr: 10.1.2.3/8\n"),
        7,
        13,
        "spec.egress[0].cidr",
        "host bits are set",
    );
    assert!(e.message.contains("10.0.0.0/8"), "{e}");
    let e = one_err(
        &spec("  egress:\n    - cidr: 2001:db8::1/32\n"),
        7,
        13,
        "spec.egress[0].cidr",
        "host bits",
    );
    assert!(e.message.contains("2001:db8::/32"), "{e}");
}

#[test]
fn bad_ports() {
    let y = spec("  egress:\n    - cidr: 10.0.0.0/8\n      ports: [0, 70000, \"90-80\", 22, \"x\", \"1-65536\"]\n");
    let e = errs(&y);
    let got: Vec<(usize, usize, &str)> = e
        .iter()
        .map(|e| (e.line, e.column, e.field.as_str()))
        .collect();
    let f = |i: usize| format!("spec.egress[0].ports[{i}]");
    let want = [
        (8, 15, f(0)),
        (8, 18, f(1)),
        (8, 25, f(2)),
        (8, 38, f(4)),
        (8, 43, f(5)),
    ];
    let want: Vec<(usize, usize, &str)> =
        want.iter().map(|(l, c, f)| (*l, *c, f.as_str())).collect();
    assert_eq!(got, want);
    assert!(
        e[0].message.contains("port 0 is out of range 1..=65535"),
        "{}",
        e[0]
    );
    assert!(
        e[1].message.contains("port 70000 is out of range"),
        "{}",
        e[1]
    );
    assert!(
        e[2].message.contains("start 90 is greater than end 80"),
        "{}",
        e[2]
    );
    assert!(e[4].message.contains("65536"), "{}", e[4]);
    one_err(
        &spec("  egress:\n    - cidr: 10.0.0.0/8\n      ports: []\n"),
        8,
        14,
        "spec.egress[0].ports",
        "omit `ports` to allow all ports",
    );
    let ps = parse(&spec(
        "  egress:\n    - cidr: 10.0.0.0/8\n      ports: [\"443\", \"1-1024\", 65535]\n",
    ));
    assert_eq!(
        ps[0].policy.spec.egress[0].ports,
        vec![
            PortRange { lo: 443, hi: 443 },
            PortRange { lo: 1, hi: 1024 },
            PortRange {
                lo: 65535,
                hi: 65535
            }
        ]
    );
}

#[test]
fn bad_protocol_and_mode() {
    one_err(
        &spec("  egress:\n    - cidr: 10.0.0.0/8\n      protocol: icmp\n"),
        8,
        17,
        "spec.egress[0].protocol",
        "invalid value \"icmp\", expected one of: tcp, udp, any",
    );
    one_err(
        &spec("  mode: block\n"),
        6,
        9,
        "spec.mode",
        "expected one of: enforce, audit",
    );
}

#[test]
fn cidr_and_host_both_or_neither() {
    one_err(
        &spec("  egress:\n    - cidr: 10.0.0.0/8\n      host: example.com\n"),
        8,
        13,
        "spec.egress[0].host",
        "either `cidr` or `host`, not both",
    );
    one_err(
        &spec("  egress:\n    - cidr: 10.0.0.0/8\n    - ports: [443]\n"),
        8,
        7,
        "spec.egress[1]",
        "needs `cidr` or `host`",
    );
}

#[test]
fn hosts() {
    let ps = parse(&spec(
        "  egress:\n    - host: API.Example.com.\n    - host: \"*.example.com\"\n",
    ));
    let e = &ps[0].policy.spec.egress;
    assert_eq!(e[0].host.as_deref(), Some("api.example.com"));
    assert_eq!(e[1].host.as_deref(), Some("*.example.com"));
    for bad in [
        "\"a.*.com\"",
        "\"*\"",
        "-a.com",
        "10.0.0.1",
        "\"a b.com\"",
        "a..com",
    ] {
        one_err(
            &spec(&format!("  egress:\n    - host: {bad}\n")),
            7,
            13,
            "spec.egress[0].host",
            "",
        );
    }
}

#[test]
fn bad_names() {
    for bad in ["Bad", "a_b", "-a", "a-", "\"\""] {
        let y = format!(
            "{}spec: {{}}\n",
            HEAD.replace("name: t", &format!("name: {bad}"))
        );
        one_err(&y, 4, 9, "metadata.name", "RFC 1123");
    }
    let long = "a".repeat(64);
    let y = format!(
        "{}spec: {{}}\n",
        HEAD.replace("name: t", &format!("name: {long}"))
    );
    one_err(&y, 4, 9, "metadata.name", "at most 63");
    let y = format!("{}spec: {{}}\n", HEAD.replace("  name: t\n", "  {}\n"));
    one_err(&y, 3, 1, "metadata.name", "missing required field");
}

#[test]
fn bad_api_version_and_kind() {
    one_err(
        &format!("{}spec: {{}}\n", HEAD.replace("v1alpha1", "v1")),
        1,
        13,
        "apiVersion",
        "unsupported apiVersion \"enforcer.dev/v1\"",
    );
    one_err(
        &format!(
            "{}spec: {{}}\n",
            HEAD.replace("kind: AgentPolicy", "kind: NetworkPolicy")
        ),
        2,
        7,
        "kind",
        "unsupported kind \"NetworkPolicy\"",
    );
    one_err(
        "kind: AgentPolicy\nmetadata: {name: a}\nspec: {}\n",
        1,
        1,
        "apiVersion",
        "missing required field",
    );
}

#[test]
fn duplicate_names_in_one_file() {
    let y = format!("{HEAD}spec: {{}}\n---\n{HEAD}spec: {{}}\n");
    let e = one_err(&y, 10, 3, "metadata.name", "duplicate policy name \"t\"");
    assert!(e.message.contains("already defined at t.yaml:4:3"), "{e}");
}

#[test]
fn duplicate_names_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yml");
    std::fs::write(&a, format!("{HEAD}spec: {{}}\n")).unwrap();
    std::fs::write(&b, format!("# other\n{HEAD}spec: {{}}\n")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
    let e = load_files(&[dir.path().to_path_buf()]).unwrap_err().0;
    assert_eq!(e.len(), 1, "{}", PolicyErrors(e.clone()));
    assert_eq!(
        (e[0].file.as_path(), e[0].line, e[0].column),
        (b.as_path(), 5, 3)
    );
    assert_eq!(e[0].field, "metadata.name");
    assert!(
        e[0].message
            .contains(&format!("already defined at {}:4:3", a.display())),
        "{}",
        e[0]
    );
    // Each file alone is fine.
    assert_eq!(load_files(std::slice::from_ref(&a)).unwrap().len(), 1);
    // A missing file is an error naming it.
    let e = load_files(&[dir.path().join("nope.yaml")]).unwrap_err();
    assert!(e.to_string().contains("nope.yaml:0:0: cannot read"), "{e}");
}

#[test]
fn host_rules_and_dns_are_supported() {
    let yaml = spec(
        "  egress:\n    - host: api.example.com\n      ports: [443]\n    - cidr: 10.0.0.0/8\n  dns:\n    upstream: [\"127.0.0.1:53\"]\n    queryTypes: [a, AAAA, Txt, txt]\n    namesPerMinute: 10\n",
    );
    let ps = parse(&yaml);
    check_supported(&ps[0]).unwrap();
    let dns = ps[0].policy.spec.dns.as_ref().unwrap();
    assert_eq!(dns.query_types, vec!["A", "AAAA", "TXT"]);
    assert_eq!(dns.names_per_minute, Some(10));
    let c = compile(&ps[0]).unwrap();
    // The host rule is no LPM entry but keeps its id: the cidr rule is id 2.
    assert_eq!(c.v4.len(), 1);
    assert_eq!(c.v4[0].1.rules[0].rule_id, 2);
    assert_eq!(c.rules[0], "egress[0] host api.example.com ports 443 any");
    // Omitted fields stay out of the canonical JSON (hashes are unchanged).
    let ps = parse(&spec("  dns:\n    maxQueryLength: 100\n"));
    let json = serde_json::to_string(&ps[0].policy).unwrap();
    assert!(
        !json.contains("queryTypes") && !json.contains("namesPerMinute"),
        "{json}"
    );
}

#[test]
fn dns_query_types_and_budget_errors() {
    one_err(
        &spec("  dns:\n    queryTypes: [A, BOGUS]\n"),
        7,
        21,
        "spec.dns.queryTypes[1]",
        "unknown DNS record type \"BOGUS\"",
    );
    one_err(
        &spec("  dns:\n    queryTypes: []\n"),
        7,
        17,
        "spec.dns.queryTypes",
        "an empty list allows no query type",
    );
    one_err(
        &spec("  dns:\n    queryTypes: TXT\n"),
        7,
        17,
        "spec.dns.queryTypes",
        "expected a list of record types",
    );
    one_err(
        &spec("  dns:\n    queryTypes: [1]\n"),
        7,
        18,
        "spec.dns.queryTypes[0]",
        "expected a string",
    );
    one_err(
        &spec("  dns:\n    namesPerMinute: 0\n"),
        7,
        21,
        "spec.dns.namesPerMinute",
        "0 is out of range 1..=4294967295",
    );
    one_err(
        &spec("  dns:\n    namesPerMinute: 5000000000\n"),
        7,
        21,
        "spec.dns.namesPerMinute",
        "out of range",
    );
    one_err(
        &spec("  dns:\n    namesPerMinute: \"10\"\n"),
        7,
        21,
        "spec.dns.namesPerMinute",
        "expected an integer >= 1",
    );
    one_err(
        &spec("  dns:\n    namesPerMinit: 10\n"),
        7,
        5,
        "spec.dns.namesPerMinit",
        "did you mean `namesPerMinute`?",
    );
}

#[test]
fn dns_errors() {
    one_err(
        &spec("  dns:\n    ttl: {min: 5m, max: 10s}\n"),
        7,
        25,
        "spec.dns.ttl.max",
        "ttl.max (10s) is less than ttl.min (300s)",
    );
    one_err(
        &spec("  dns:\n    ttl: {min: 5, max: 10s}\n"),
        7,
        16,
        "spec.dns.ttl.min",
        "a unit is required (5s",
    );
    one_err(
        &spec("  dns:\n    maxQueryLength: 254\n"),
        7,
        21,
        "spec.dns.maxQueryLength",
        "1..=253",
    );
    one_err(
        &spec("  dns:\n    upstream: [\"::1:53\"]\n"),
        7,
        16,
        "spec.dns.upstream[0]",
        "[::1]:53",
    );
    let ps = parse(&spec(
        "  dns:\n    upstream: [\"[::1]:53\", \"127.0.0.1:5353\"]\n    ttl: {min: 0s, max: 1h}\n",
    ));
    let d = ps[0].policy.spec.dns.as_ref().unwrap();
    assert_eq!(d.upstream.len(), 2);
    assert_eq!(d.ttl.unwrap().max.as_secs(), 3600);
}

#[test]
fn files_errors() {
    one_err(
        &spec("  files:\n    - path: home/agent/.ssh\n      access: deny\n"),
        7,
        13,
        "spec.files[0].path",
        "must be absolute",
    );
    one_err(
        &spec("  files:\n    - path: /a/../etc\n      access: deny\n"),
        7,
        13,
        "spec.files[0].path",
        "'..'",
    );
    one_err(
        &spec("  files:\n    - path: /a\n      access: read\n"),
        8,
        15,
        "spec.files[0].access",
        "deny, audit, taint",
    );
    one_err(
        &spec("  files:\n    - path: /a\n"),
        7,
        7,
        "spec.files[0].access",
        "missing required field",
    );
}

#[test]
fn identity_errors() {
    one_err(
        &spec("  identity:\n    spiffeId: https://example.org/x\n"),
        7,
        15,
        "spec.identity.spiffeId",
        "spiffe://",
    );
    one_err(
        &spec("  identity:\n    spiffeId: spiffe://example.org\n"),
        7,
        15,
        "spec.identity.spiffeId",
        "path is required",
    );
    one_err(
        &spec("  identity:\n    spiffeId: spiffe://Example.org/a\n"),
        7,
        15,
        "spec.identity.spiffeId",
        "trust domain",
    );
    one_err(
        &spec("  identity:\n    kubernetes:\n      podSelector:\n        matchExpressions:\n          - {key: app, operator: Like}\n"),
        10,
        34,
        "spec.identity.kubernetes.podSelector.matchExpressions[0].operator",
        "In, NotIn, Exists, DoesNotExist",
    );
    one_err(
        &spec("  identity:\n    kubernetes:\n      podSelector:\n        matchExpressions:\n          - {key: app, operator: In}\n"),
        10,
        34,
        "spec.identity.kubernetes.podSelector.matchExpressions[0].operator",
        "non-empty `values`",
    );
    one_err(
        &spec("  identity:\n    kubernetes:\n      podSelector:\n        matchExpressions:\n          - {key: app, operator: Exists, values: [a]}\n"),
        10,
        50,
        "spec.identity.kubernetes.podSelector.matchExpressions[0].values",
        "takes no `values`",
    );
    one_err(
        &spec("  identity:\n    kubernetes:\n      podSelector:\n        matchExpressions:\n          - {key: app, operator: In, values: 5}\n"),
        10,
        46,
        "spec.identity.kubernetes.podSelector.matchExpressions[0].values",
        "expected a list",
    );
    let ps = parse(&spec("  identity:\n    kubernetes:\n      podSelector:\n        matchExpressions:\n          - {key: app, operator: NotIn, values: [a, b]}\n          - {key: tier, operator: Exists}\n"));
    let sel = ps[0]
        .policy
        .spec
        .identity
        .as_ref()
        .unwrap()
        .kubernetes
        .as_ref()
        .unwrap()
        .pod_selector
        .as_ref()
        .unwrap();
    assert_eq!(sel.match_expressions.len(), 2);
    assert_eq!(sel.match_expressions[0].operator, SelectorOperator::NotIn);
}

#[test]
fn all_errors_of_a_file_are_reported() {
    let y = format!(
        "{}bogus: 1\nspec:\n  egress:\n    - cidr: 10.0.0.300/8\n    - cidr: 10.0.0.1/8\n      protocol: icmp\n---\n{HEAD}spec:\n  mode: x\n",
        HEAD.replace("v1alpha1", "v2")
    );
    let e = errs(&y);
    let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
    assert_eq!(
        lines,
        vec![1, 5, 8, 9, 10, 17],
        "{}",
        PolicyErrors(e.clone())
    );
}

#[test]
fn yaml_syntax_and_duplicate_keys() {
    let e = errs("apiVersion: a: b\n");
    assert_eq!((e[0].line, e[0].field.as_str()), (1, ""));
    assert!(e[0].to_string().starts_with("t.yaml:1:"), "{}", e[0]);
    assert!(e[0].message.starts_with("invalid YAML"), "{}", e[0]);
    let e = errs(&format!("{HEAD}spec: {{}}\nspec: {{}}\n"));
    assert_eq!(e[0].line, 6);
    assert!(e[0].message.contains("duplicate mapping key"), "{}", e[0]);
    assert!(!e[0].message.contains("DuplicateKeyPolicy"), "{}", e[0]);
    one_err("", 1, 1, "", "no policy document");
}

#[test]
fn display_format() {
    let e = PolicyError {
        file: "policies/bad.yaml".into(),
        line: 12,
        column: 9,
        field: "spec.egress[1].cidr".into(),
        message: "invalid CIDR".into(),
    };
    assert_eq!(
        e.to_string(),
        "policies/bad.yaml:12:9: spec.egress[1].cidr: invalid CIDR"
    );
    let two = PolicyErrors(vec![e.clone(), e]);
    assert_eq!(two.to_string().lines().count(), 2);
}

#[test]
fn fixed_rule_names() {
    use enforcer_common::rule;
    assert_eq!(rule_name(rule::DEFAULT_DENY), Some("default-deny"));
    assert_eq!(rule_name(rule::NO_POLICY), Some("no-policy"));
    assert_eq!(rule_name(rule::RAW_SOCKET), Some("raw-socket"));
    assert_eq!(rule_name(rule::SOCKET_FAMILY), Some("socket-family"));
    assert_eq!(rule_name(1), None);
}

/// The YAML budget must admit policies as large as the kernel tables allow
/// (the parser's default of 250k nodes stopped at ~37k rules).
#[test]
fn parses_a_100k_rule_policy() {
    let mut text = String::from(
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: big\nspec:\n  egress:\n",
    );
    for i in 0..100_000u32 {
        let [a, b, c, _] = (0x0a00_0000u32 + (i << 8)).to_be_bytes();
        text.push_str(&format!(
            "    - cidr: {a}.{b}.{c}.0/24\n      ports: [443, \"8000-8100\"]\n      protocol: tcp\n"
        ));
    }
    let docs = parse_str(&text, std::path::Path::new("big.yaml")).expect("100k rules parse");
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].policy.spec.egress.len(), 100_000);
}

#[test]
fn local_rules_validate_and_compile_with_their_own_rule_ids() {
    let p = parse(&spec(
        "  local:\n    - path: /run/proxy.sock\n    - abstract: my-helper\n",
    ));
    assert_eq!(p[0].policy.spec.local.len(), 2);
    let c = compile::compile(&p[0]).unwrap();
    assert_eq!(c.local.len(), 2);
    assert_eq!(c.local[0].rule_id, enforcer_common::rule::LOCAL_BASE + 1);
    assert_eq!(c.local[0].name, b"/run/proxy.sock");
    assert_eq!(c.local[1].name, b"\0my-helper");
    assert_eq!(
        c.rule_name(enforcer_common::rule::LOCAL_BASE + 2),
        "local[1] abstract my-helper"
    );
    assert_eq!(
        c.rule_name(enforcer_common::rule::UNIX_RESOLVER),
        "resolver-ipc"
    );
    // The policy hash of a policy without `local:` does not change.
    let plain = parse(&spec("  egress: []\n"));
    let json = serde_json::to_string(&plain[0].policy).unwrap();
    assert!(!json.contains("local"), "{json}");
}

#[test]
fn local_errors() {
    one_err(
        &spec("  local:\n    - path: /run/systemd/resolve/io.systemd.Resolve\n"),
        7,
        13,
        "spec.local[0].path",
        "resolver IPC would bypass the DNS proxy",
    );
    one_err(
        &spec("  local:\n    - path: /var/run/nscd/socket\n"),
        7,
        13,
        "spec.local[0].path",
        "resolver IPC socket",
    );
    one_err(
        &spec("  local:\n    - path: run/x.sock\n"),
        7,
        13,
        "spec.local[0].path",
        "must be absolute",
    );
    one_err(
        &spec("  local:\n    - path: /run//x.sock\n"),
        7,
        13,
        "spec.local[0].path",
        "normalized",
    );
    one_err(
        &spec("  local:\n    - path: /a\n      abstract: b\n"),
        8,
        17,
        "spec.local[0].abstract",
        "not both",
    );
    one_err(
        &spec("  local:\n    - {}\n"),
        7,
        7,
        "spec.local[0]",
        "needs `path` or `abstract`",
    );
    let e = errs(&spec("  local:\n    - socket: /a\n"));
    assert!(
        e.iter()
            .any(|e| e.field == "spec.local[0].socket" && e.message.contains("unknown field")),
        "{e:?}"
    );
    one_err(
        &spec(&format!("  local:\n    - abstract: {}\n", "a".repeat(108))),
        7,
        17,
        "spec.local[0].abstract",
        "longer than 107",
    );
    let dup = parse(&spec(
        "  local:\n    - path: /a.sock\n    - path: /a.sock\n",
    ));
    let e = check_supported(&dup[0]).unwrap_err().0;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].line, e[0].column), (8, 7));
    assert!(
        e[0].message.contains("already listed as spec.local[0]"),
        "{e:?}"
    );
    // A policy that did not come through the YAML validator (a CRD object)
    // is checked again: a resolver socket is refused there too.
    let mut crd = dup[0].clone();
    crd.policy.spec.local = vec![LocalRule {
        path: Some("/run/systemd/resolve/io.systemd.Resolve".into()),
        abstract_name: None,
    }];
    let e = check_supported(&crd).unwrap_err().0;
    assert!(e[0].message.contains("bypass the DNS proxy"), "{e:?}");
}
