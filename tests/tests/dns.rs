//! DNS-aware egress: `host:` rules and the `dns:` block under `enforcer run`
//! (and the daemon for the per-identity test).
//!
//! Every test runs its own upstream DNS server on 127.0.0.1:<free port>
//! (`enforcer_tests::dns_server`), set as the policy's `dns.upstream`, and an
//! agent (`agents/dns_agent.py`) that builds its queries by hand and sends
//! them to resolver addresses where nothing listens (127.0.0.9:53,
//! 127.0.0.1:53, [::1]:53): an answer can only come from the enforcer's
//! proxy, and the upstream's query log shows what the proxy forwarded.
//!
//! Names resolve into 127.0.0.x, which the rebinding defence installs only
//! when a `cidr` rule vouches for it: policies carry `127.0.0.0/8` port 9
//! ([`vouch_loopback`]), except in the rebinding test.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use enforcer_tests::{dns_server::DnsServer, *};

const RESOLVER: &str = "127.0.0.9";
const NOERROR: i64 = 0;
const REFUSED: i64 = 5;

/// Everything one `enforcer run` of a DNS test owns.
struct Env {
    dir: TestDir,
    pins: PinDir,
    dns: DnsServer,
    audit: PathBuf,
    metrics: SocketAddr,
}

impl Env {
    fn new(test: &str) -> Self {
        let dir = TestDir::new(test);
        Self {
            audit: dir.join("audit.jsonl"),
            pins: PinDir::new(test),
            dir,
            dns: DnsServer::start(),
            metrics: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        }
    }

    /// Write the policy `name` and start the agent under `enforcer run`.
    fn run(&self, name: &str, egress: &[String], dns_extra: &[&str]) -> RunAgent {
        self.run_with(name, egress, dns_extra, &self.audit, self.metrics)
    }

    fn run_with(
        &self,
        name: &str,
        egress: &[String],
        dns_extra: &[&str],
        audit: &Path,
        metrics: SocketAddr,
    ) -> RunAgent {
        let policy = self.dir.join(&format!("{name}.yaml"));
        std::fs::write(
            &policy,
            dns_policy_yaml(name, egress, &self.dns.upstream(), dns_extra),
        )
        .unwrap();
        RunAgent::spawn(
            &policy,
            &[
                "--audit-log".into(),
                audit.display().to_string(),
                "--metrics-addr".into(),
                metrics.to_string(),
                "--pin-dir".into(),
                self.pins.path.display().to_string(),
            ],
            &self.dir.dns_agent(),
        )
    }

    fn scrape(&self) -> String {
        let (code, body) = http_get(self.metrics, "/metrics").expect("scraping /metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        body
    }
}

/// One query from inside the agent; panics unless an answer came back.
#[track_caller]
fn resolve(a: &mut RunAgent, server: &str, name: &str, qtype: &str, tcp: bool) -> Value {
    let v = try_resolve(a, server, name, qtype, tcp, false);
    assert_eq!(
        v["ok"],
        true,
        "query {qtype} {name} to {server}:53 ({}) got no answer: {v}",
        if tcp { "tcp" } else { "udp" }
    );
    v
}

fn try_resolve(
    a: &mut RunAgent,
    server: &str,
    name: &str,
    qtype: &str,
    tcp: bool,
    connected: bool,
) -> Value {
    a.cmd(
        json!({"op": "resolve", "server": server, "port": 53, "name": name,
                 "qtype": qtype, "tcp": tcp, "connected": connected, "timeout": 5}),
    )
}

fn addrs(v: &Value) -> Vec<String> {
    v["addrs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect()
}

/// `127.0.0.9:53` / `[::1]:53`, as the agent formats a peer.
fn sock(server: &str) -> String {
    if server.contains(':') {
        format!("[{server}]:53")
    } else {
        format!("{server}:53")
    }
}

#[track_caller]
fn assert_rcode(v: &Value, rcode: i64, what: &str) {
    assert_eq!(v["rcode"].as_i64(), Some(rcode), "{what}: {v}");
}

fn finish(a: &mut RunAgent) {
    a.finish(Duration::from_secs(20));
}

fn audit_text(recs: &[Value]) -> String {
    recs.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------

/// Scenario 1: An allowed name resolves through whatever resolver the agent asked;
/// the reply comes from that resolver's address; the learned address is
/// reachable on the host rule's ports (and only those); CNAMEs are followed.
#[test]
fn allowed_name_resolves_and_connects() {
    if !require_root("allowed_name_resolves_and_connects") {
        return;
    }
    let env = Env::new("dns-allowed");
    let sink = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let other_port = SinkPair::bind("127.0.0.5");
    let cdn = TcpSink::bind("127.0.0.6:0".parse().unwrap()).unwrap();
    env.dns.add_addrs("api.example.com", &["127.0.0.5"]);
    env.dns
        .add_cname("www.example.com", "edge.cdn.test")
        .add_cname("edge.cdn.test", "node1.cdn.test")
        .add_addrs("node1.cdn.test", &["127.0.0.6"]);
    let name = "dns-allowed";
    let mut a = env.run(
        name,
        &[
            host_rule("api.example.com", &[sink.port()], "tcp"),
            host_rule("www.example.com", &[cdn.port()], "tcp"),
            vouch_loopback(),
        ],
        &[],
    );
    let mut checks = Checks::new();

    // Before any answer, the address is not reachable.
    checks.check("connect before resolving", || {
        assert_eperm(
            &a.tcp("127.0.0.5", sink.port(), "early"),
            "connect to 127.0.0.5 before resolving api.example.com",
        )
    });
    let v = resolve(&mut a, RESOLVER, "api.example.com", "A", false);
    checks.check("answer", || {
        assert_rcode(&v, NOERROR, "A api.example.com");
        assert_eq!(addrs(&v), vec!["127.0.0.5"], "{v}");
        assert_eq!(v["id_ok"], true, "reply id: {v}");
    });
    checks.check("reply source", || {
        assert_eq!(
            v["src"],
            sock(RESOLVER),
            "the reply must come from the resolver the agent asked: {v}"
        )
    });
    checks.check("forwarded upstream", || {
        assert!(
            env.dns.saw_type("api.example.com", "A"),
            "{}",
            env.dns.describe()
        )
    });
    checks.check("connect to the learned address", || {
        assert_ok(
            &a.tcp("127.0.0.5", sink.port(), "hello-dns"),
            "connect to api.example.com's address",
        );
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(20), || sink
                .bytes()
                >= 9),
            "bytes did not arrive: {:?}",
            sink.text()
        );
        assert_eq!(sink.text(), "hello-dns");
    });
    checks.check("other port of the learned address", || {
        assert_eperm(
            &a.tcp("127.0.0.5", other_port.port(), "wrong-port"),
            "learned address on a port the host rule does not list",
        );
        assert_eq!(
            other_port.total_bytes() + other_port.tcp.conns(),
            0,
            "{}",
            other_port.describe()
        );
    });
    // A connected UDP socket (what glibc does): getpeername and the reply
    // source are the resolver's, not the proxy's.
    checks.check("connected udp socket", || {
        let v = try_resolve(&mut a, RESOLVER, "api.example.com", "A", false, true);
        assert_rcode(&v, NOERROR, "connected A api.example.com");
        assert_eq!(v["peer"], sock(RESOLVER), "getpeername: {v}");
        assert_eq!(v["src"], sock(RESOLVER), "recvfrom source: {v}");
    });
    checks.check("cname chain", || {
        let v = resolve(&mut a, RESOLVER, "www.example.com", "A", false);
        assert_rcode(&v, NOERROR, "A www.example.com");
        assert_eq!(addrs(&v), vec!["127.0.0.6"], "{v}");
        assert_ok(
            &a.tcp("127.0.0.6", cdn.port(), "via-cname"),
            "connect to the CNAME target's address",
        );
    });
    // DNS names are case-insensitive: 0x20-randomizing stubs send mixed case.
    checks.check("mixed case name", || {
        let v = resolve(&mut a, RESOLVER, "Api.ExAmple.COM", "A", false);
        assert_rcode(&v, NOERROR, "A Api.ExAmple.COM");
    });
    finish(&mut a);
    checks.check("audit: connect record carries the name", || {
        let recs = read_jsonl(&env.audit);
        assert!(
            recs.iter().any(|r| r["action"] == "connect"
                && r["verdict"] == "allow"
                && r["ip"] == "127.0.0.5"
                && r["port"] == sink.port()
                && r["host"] == "api.example.com"),
            "no allowed connect record with host api.example.com:\n{}",
            audit_text(&recs)
        );
    });
    checks.finish();
}

/// Scenario 2: A name no host rule allows is REFUSED, never reaches the upstream,
/// and the address it would resolve to stays unreachable.
#[test]
fn disallowed_name_is_refused_and_never_forwarded() {
    if !require_root("disallowed_name_is_refused_and_never_forwarded") {
        return;
    }
    let env = Env::new("dns-refused");
    let evil = SinkPair::bind("127.0.0.6");
    env.dns
        .add_addrs("api.example.com", &["127.0.0.5"])
        .add_addrs("evil.attacker.test", &["127.0.0.6"])
        .add_addrs("other.example.com", &["127.0.0.6"])
        .add_addrs("api.example.com.attacker.test", &["127.0.0.6"])
        .add_addrs("xapi.example.com", &["127.0.0.6"]);
    let mut a = env.run(
        "dns-refused",
        &[
            host_rule("api.example.com", &[443], "tcp"),
            vouch_loopback(),
        ],
        &[],
    );
    let mut checks = Checks::new();
    for n in [
        "evil.attacker.test",
        "other.example.com",
        "api.example.com.attacker.test",
        "xapi.example.com",
    ] {
        for tcp in [false, true] {
            checks.check(&format!("{n} tcp={tcp}"), || {
                let v = resolve(&mut a, RESOLVER, n, "A", tcp);
                assert_rcode(&v, REFUSED, n);
                assert!(addrs(&v).is_empty(), "{v}");
            });
        }
    }
    checks.check("connect to the address of a refused name", || {
        assert_eperm(
            &a.tcp("127.0.0.6", evil.port(), "exfil"),
            "connect to 127.0.0.6",
        );
    });
    // The allowed name works in the same run (the proxy is up).
    checks.check("allowed name", || {
        assert_rcode(
            &resolve(&mut a, RESOLVER, "api.example.com", "A", false),
            NOERROR,
            "api.example.com",
        )
    });
    finish(&mut a);
    checks.check("upstream never saw a refused name", || {
        for n in [
            "evil.attacker.test",
            "other.example.com",
            "api.example.com.attacker.test",
            "xapi.example.com",
        ] {
            assert!(
                !env.dns.saw(n),
                "{n} reached the upstream: {}",
                env.dns.describe()
            );
        }
        assert!(env.dns.saw("api.example.com"), "{}", env.dns.describe());
    });
    std::thread::sleep(Duration::from_millis(200));
    checks.check("zero bytes at the refused name's address", || {
        assert_eq!(
            evil.total_bytes() + evil.tcp.conns() + evil.udp.datagrams(),
            0,
            "{}",
            evil.describe()
        )
    });
    checks.finish();
}

/// Scenario 3: Queries to any address on port 53, v4 or v6 (or v4-mapped), UDP or
/// TCP, from the agent or its child, are all answered by the proxy.
#[test]
fn queries_to_any_resolver_are_steered() {
    if !require_root("queries_to_any_resolver_are_steered") {
        return;
    }
    let env = Env::new("dns-steer");
    env.dns.add_suffix("example.com", &["127.0.0.5"]);
    env.dns.add_addrs("v6.example.com", &["::1"]);
    let mut a = env.run(
        "dns-steer",
        &[
            host_rule("*.example.com", &[443], "tcp"),
            vouch_loopback(),
            // vouches for the AAAA answer ::1 (rebinding defence)
            cidr_rule("::1/128", &[9], "tcp"),
        ],
        &[],
    );
    let mut checks = Checks::new();
    let cases: &[(&str, &str, &str, bool, bool)] = &[
        // (name, server, qtype, tcp, connected)
        ("u1.example.com", "127.0.0.9", "A", false, false),
        ("u2.example.com", "127.0.0.1", "A", false, true),
        ("u3.example.com", "::1", "A", false, false),
        ("v6.example.com", "::1", "AAAA", false, true),
        ("u4.example.com", "::ffff:127.0.0.9", "A", false, false),
        ("t1.example.com", "127.0.0.9", "A", true, false),
        ("t2.example.com", "::1", "A", true, false),
        ("t3.example.com", "127.0.0.1", "A", true, false),
    ];
    for &(n, server, qtype, tcp, connected) in cases {
        checks.check(&format!("{n} via {server} tcp={tcp}"), || {
            let v = try_resolve(&mut a, server, n, qtype, tcp, connected);
            assert_eq!(v["ok"], true, "no answer: {v}");
            assert_rcode(&v, NOERROR, n);
            assert!(!addrs(&v).is_empty(), "no address: {v}");
            assert!(
                env.dns.saw_type(n, qtype),
                "{n} was not forwarded: {}",
                env.dns.describe()
            );
            let src = v["src"].as_str().unwrap_or_default();
            assert_eq!(
                src,
                sock(server),
                "reply source must be the queried resolver: {v}"
            );
        });
    }
    checks.check("child process", || {
        let v = a.cmd(
            json!({"op": "child", "cmd": {"op": "resolve", "server": RESOLVER,
                             "port": 53, "name": "c1.example.com", "qtype": "A"}}),
        );
        assert_eq!(v["ok"], true, "{v}");
        let c = &v["child"];
        assert_eq!(c["ok"], true, "child: {v}");
        assert_ne!(c["pid"], v["pid"], "ran in the same process: {v}");
        assert_rcode(c, NOERROR, "child c1.example.com");
        assert!(env.dns.saw("c1.example.com"), "{}", env.dns.describe());
    });
    // Refusals hold on every path too.
    for (server, tcp) in [("::1", true), ("::1", false), ("127.0.0.1", true)] {
        checks.check(&format!("refused via {server} tcp={tcp}"), || {
            let n = format!("leak-{}.attacker.test", if tcp { "t" } else { "u" });
            let v = resolve(&mut a, server, &n, "A", tcp);
            assert_rcode(&v, REFUSED, &n);
            assert!(!env.dns.saw(&n), "{}", env.dns.describe());
        });
    }
    finish(&mut a);
    checks.finish();
}

/// A steered socket's reply still comes from the resolver it addressed after
/// a burst of other sockets queried meanwhile. Where that resolver was is
/// kept per socket (socket storage, freed with the socket): a global table
/// (an LRU of 65,536 entries once) let a burst of fresh sockets, from any
/// identity, evict an in-flight query's entry; its reply then came from the
/// proxy's port and the resolver dropped it.
#[test]
fn a_burst_of_sockets_does_not_lose_an_in_flight_query() {
    if !require_root("a_burst_of_sockets_does_not_lose_an_in_flight_query") {
        return;
    }
    let env = Env::new("dns-burst");
    env.dns.add_suffix("example.com", &["127.0.0.5"]);
    let mut a = env.run(
        "dns-burst",
        &[host_rule("*.example.com", &[443], "tcp"), vouch_loopback()],
        &[],
    );
    let counter = |body: &str, name: &str| metric(body, name, &[]).unwrap_or(0.0);
    let steered_before = counter(&env.scrape(), "enforcer_dns_steered_total");
    // More fresh sockets than the old table held.
    const BURST: u64 = 100_000;
    let v = a.cmd_timeout(
        json!({"op": "resolve", "server": RESOLVER, "port": 53,
               "name": "burst.example.com", "qtype": "A", "flood": BURST,
               "timeout": 10}),
        Duration::from_secs(60 * u64::from(slowdown())),
    );
    assert_eq!(v["ok"], true, "no answer after the burst: {v}");
    assert_rcode(&v, NOERROR, "burst.example.com");
    assert_eq!(
        v["src"].as_str(),
        Some(sock(RESOLVER).as_str()),
        "the reply lost the resolver's address during the burst: {v}"
    );
    eprintln!("burst of {BURST} sockets took {}s", v["flood_secs"]);
    // Every socket of the burst was steered (and recorded): the burst was
    // real, and none was refused for want of its record.
    let body = env.scrape();
    let steered = counter(&body, "enforcer_dns_steered_total") - steered_before;
    assert!(
        steered >= BURST as f64,
        "only {steered} of the {BURST} sends of the burst were steered\n{body}"
    );
    assert_eq!(
        counter(&body, "enforcer_dns_steer_failed_total"),
        0.0,
        "steered sends refused for want of their record\n{body}"
    );
    finish(&mut a);
}

/// Scenario 4: A tunnelling loop (unique subdomains under an allowed wildcard) is cut
/// off at `namesPerMinute`; names over budget never reach the upstream.
#[test]
fn tunnelling_is_cut_off_at_the_name_budget() {
    if !require_root("tunnelling_is_cut_off_at_the_name_budget") {
        return;
    }
    let env = Env::new("dns-tunnel");
    env.dns.add_suffix("t.example.com", &["127.0.0.7"]);
    let mut a = env.run(
        "dns-tunnel",
        &[
            host_rule("*.t.example.com", &[443], "tcp"),
            vouch_loopback(),
        ],
        &["namesPerMinute: 10"],
    );
    let names: Vec<String> = (0..25)
        .map(|i| format!("{:032x}.t.example.com", 0x5ec2e7u128 * 7919 + i))
        .collect();
    let rcodes: Vec<i64> = names
        .iter()
        .map(|n| {
            resolve(&mut a, RESOLVER, n, "A", false)["rcode"]
                .as_i64()
                .unwrap_or(-1)
        })
        .collect();
    let mut checks = Checks::new();
    checks.check("budget", || {
        assert!(
            rcodes[..10].iter().all(|&r| r == NOERROR),
            "first 10 names must be answered: {rcodes:?}"
        );
        assert!(
            rcodes[10..].iter().all(|&r| r == REFUSED),
            "names over budget must be REFUSED: {rcodes:?}"
        );
    });
    checks.check("over-budget names never reached the upstream", || {
        for n in &names[10..] {
            assert!(
                !env.dns.saw(n),
                "{n} reached the upstream: {}",
                env.dns.describe()
            );
        }
        let forwarded = env
            .dns
            .queries()
            .iter()
            .filter(|q| q.name.ends_with(".t.example.com"))
            .map(|q| q.name.clone())
            .collect::<std::collections::BTreeSet<_>>();
        assert!(
            forwarded.len() <= 10,
            "{} distinct names forwarded: {}",
            forwarded.len(),
            env.dns.describe()
        );
    });
    // The budget counts *distinct* names: a name already admitted in this
    // minute is not a new one.
    checks.check("admitted name again", || {
        let v = resolve(&mut a, RESOLVER, &names[0], "A", false);
        assert_rcode(&v, NOERROR, "an admitted name queried again");
    });
    finish(&mut a);
    checks.finish();
}

/// Scenario 4b: Names longer than `maxQueryLength` are refused, never forwarded.
#[test]
fn overlong_names_are_refused() {
    if !require_root("overlong_names_are_refused") {
        return;
    }
    let env = Env::new("dns-long");
    env.dns.add_suffix("t.example.com", &["127.0.0.7"]);
    let mut a = env.run(
        "dns-long",
        &[
            host_rule("*.t.example.com", &[443], "tcp"),
            vouch_loopback(),
        ],
        &["maxQueryLength: 64"],
    );
    let long = format!("{}.{}.t.example.com", "a".repeat(40), "b".repeat(20)); // 76
    let short = format!("{}.t.example.com", "c".repeat(40)); // 54
    let v_long = resolve(&mut a, RESOLVER, &long, "A", false);
    let v_short = resolve(&mut a, RESOLVER, &short, "A", false);
    finish(&mut a);
    assert_rcode(&v_long, REFUSED, "76-byte name with maxQueryLength 64");
    assert!(!env.dns.saw(&long), "{}", env.dns.describe());
    assert_rcode(&v_short, NOERROR, "54-byte name");
}

/// Scenario 4c: The letter case of a name carries nothing upstream ("0x20
/// encoding": `aPi.ExAmple.COM` spells bits in its case). The upstream
/// receives only the canonical lower-case name, over UDP and TCP; the agent
/// gets its question back byte for byte (and the answer records of the
/// queried name in its spelling), the learned addresses (CNAME chains
/// followed) are reachable, and case variants of a name are one name in
/// the name budget.
#[test]
fn letter_case_never_reaches_the_upstream() {
    if !require_root("letter_case_never_reaches_the_upstream") {
        return;
    }
    let env = Env::new("dns-case");
    let sink = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let cdn = TcpSink::bind("127.0.0.6:0".parse().unwrap()).unwrap();
    env.dns.add_addrs("api.example.com", &["127.0.0.5"]);
    env.dns
        .add_cname("www.example.com", "edge.cdn.test")
        .add_addrs("edge.cdn.test", &["127.0.0.6"]);
    env.dns.add_suffix("t.example.com", &["127.0.0.7"]);
    let mut a = env.run(
        "dns-case",
        &[
            host_rule("api.example.com", &[sink.port()], "tcp"),
            host_rule("www.example.com", &[cdn.port()], "tcp"),
            host_rule("*.t.example.com", &[443], "tcp"),
            vouch_loopback(),
        ],
        &["namesPerMinute: 2"],
    );
    let mut checks = Checks::new();
    for (name, tcp) in [("aPi.ExAmple.COM", false), ("API.EXAMPLE.COM", true)] {
        let v = resolve(&mut a, RESOLVER, name, "A", tcp);
        checks.check(&format!("answer to {name} (tcp: {tcp})"), || {
            assert_rcode(&v, NOERROR, name);
            assert_eq!(addrs(&v), vec!["127.0.0.5"], "{v}");
            assert_eq!(v["id_ok"], true, "{v}");
            assert_eq!(v["question_same"], true, "the question as asked: {v}");
            assert_eq!(v["qname"], name, "{v}");
            assert_eq!(v["owners"], json!([name]), "{v}");
        });
    }
    checks.check(
        "connect to the address learned for a mixed-case query",
        || {
            assert_ok(
                &a.tcp("127.0.0.5", sink.port(), "case"),
                "connect to api.example.com's address",
            );
        },
    );
    let v = resolve(&mut a, RESOLVER, "WwW.Example.Com", "A", false);
    checks.check("cname chain of a mixed-case query", || {
        assert_rcode(&v, NOERROR, "A WwW.Example.Com");
        assert_eq!(addrs(&v), vec!["127.0.0.6"], "{v}");
        assert_eq!(v["cnames"], json!(["edge.cdn.test"]), "{v}");
        assert_eq!(v["owners"], json!(["WwW.Example.Com", "edge.cdn.test"]));
        assert_eq!(v["question_same"], true, "{v}");
        assert_ok(
            &a.tcp("127.0.0.6", cdn.port(), "case-cname"),
            "connect to the CNAME target's address",
        );
    });
    // namesPerMinute 2: four spellings of x, then y, fit; z does not.
    let budget: Vec<(&str, i64)> = [
        "x.t.example.com",
        "X.t.example.com",
        "x.T.EXAMPLE.COM",
        "X.T.Example.Com",
        "y.t.example.com",
        "z.t.example.com",
    ]
    .into_iter()
    .map(|n| {
        let rcode = resolve(&mut a, RESOLVER, n, "A", false)["rcode"]
            .as_i64()
            .unwrap_or(-1);
        (n, rcode)
    })
    .collect();
    finish(&mut a);
    checks.check("case variants are one name in the budget", || {
        let want = [NOERROR, NOERROR, NOERROR, NOERROR, NOERROR, REFUSED];
        let got: Vec<i64> = budget.iter().map(|b| b.1).collect();
        assert_eq!(got, want, "{budget:?}");
    });
    checks.check("the upstream saw lower-case names only", || {
        let raw = env.dns.raw_names();
        assert!(
            raw.iter().all(|n| *n == n.to_ascii_lowercase()),
            "{}",
            env.dns.describe()
        );
        assert_eq!(
            raw,
            [
                "api.example.com",
                "api.example.com",
                "www.example.com",
                "x.t.example.com",
                "x.t.example.com",
                "x.t.example.com",
                "x.t.example.com",
                "y.t.example.com",
            ],
            "{}",
            env.dns.describe()
        );
        let tcp = env.dns.queries().iter().filter(|q| q.tcp).count();
        assert_eq!(tcp, 1, "{}", env.dns.describe());
    });
    checks.finish();
}

/// Scenario 5: TXT (and ANY, NULL) are refused by default; TXT is answered when the
/// policy lists it.
#[test]
fn query_types_are_limited() {
    if !require_root("query_types_are_limited") {
        return;
    }
    let env = Env::new("dns-qtypes");
    env.dns
        .add_addrs("api.example.com", &["127.0.0.5"])
        .add_txt("api.example.com", "v=secret-channel");
    let mut checks = Checks::new();
    {
        let mut a = env.run(
            "dns-qtypes-default",
            &[
                host_rule("api.example.com", &[443], "tcp"),
                vouch_loopback(),
            ],
            &[],
        );
        for qt in ["TXT", "ANY", "NULL", "MX"] {
            checks.check(&format!("default: {qt}"), || {
                let v = resolve(&mut a, RESOLVER, "api.example.com", qt, false);
                assert_rcode(&v, REFUSED, &format!("{qt} api.example.com by default"));
                assert!(
                    !env.dns.saw_type("api.example.com", qt),
                    "{}",
                    env.dns.describe()
                );
            });
        }
        checks.check("default: A and AAAA", || {
            assert_rcode(
                &resolve(&mut a, RESOLVER, "api.example.com", "A", false),
                NOERROR,
                "A",
            );
            assert_rcode(
                &resolve(&mut a, RESOLVER, "api.example.com", "AAAA", false),
                NOERROR,
                "AAAA",
            );
        });
        finish(&mut a);
    }
    {
        let metrics = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut a = env.run_with(
            "dns-qtypes-txt",
            &[
                host_rule("api.example.com", &[443], "tcp"),
                vouch_loopback(),
            ],
            &["queryTypes: [A, TXT]"],
            &env.dir.join("audit2.jsonl"),
            metrics,
        );
        checks.check("listed: TXT", || {
            let v = resolve(&mut a, RESOLVER, "api.example.com", "TXT", false);
            assert_rcode(&v, NOERROR, "TXT with queryTypes [A, TXT]");
            assert_eq!(v["txt"], json!(["v=secret-channel"]), "{v}");
            assert!(
                env.dns.saw_type("api.example.com", "TXT"),
                "{}",
                env.dns.describe()
            );
        });
        checks.check("not listed: AAAA", || {
            let v = resolve(&mut a, RESOLVER, "api.example.com", "AAAA", false);
            assert_rcode(&v, REFUSED, "AAAA with queryTypes [A, TXT]");
        });
        finish(&mut a);
    }
    checks.finish();
}

/// Scenario 6: A learned address expires at the clamped TTL (max 2 s although the
/// upstream said 60 s); a new answer opens it again.
#[test]
fn learned_address_expires_at_clamped_ttl() {
    if !require_root("learned_address_expires_at_clamped_ttl") {
        return;
    }
    let env = Env::new("dns-ttl");
    let sink = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    env.dns
        .set_ttl(60)
        .add_addrs("api.example.com", &["127.0.0.5"]);
    let mut a = env.run(
        "dns-ttl",
        &[
            host_rule("api.example.com", &[sink.port()], "tcp"),
            vouch_loopback(),
        ],
        &["ttl: {min: 1s, max: 2s}"],
    );
    let v = resolve(&mut a, RESOLVER, "api.example.com", "A", false);
    let t0 = Instant::now();
    assert_rcode(&v, NOERROR, "A api.example.com");
    eprintln!("TTL seen by the agent: {}", v["ttls"]);
    assert_ok(
        &a.tcp("127.0.0.5", sink.port(), "t0"),
        "connect right after the answer",
    );
    let mut denied_after = None;
    let mut last = Value::Null;
    while t0.elapsed() < Duration::from_secs(8) {
        last = a.tcp("127.0.0.5", sink.port(), "poll");
        if last["ok"] == false {
            denied_after = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(after) = denied_after else {
        panic!("the learned address was still reachable 8 s after an answer clamped to 2 s");
    };
    assert_eperm(&last, "connect after the clamped TTL");
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_secs(5),
        "expired after {after:?}: expected ~2 s (ttl max 2s)"
    );
    // A new answer opens it again.
    assert_rcode(
        &resolve(&mut a, RESOLVER, "api.example.com", "A", false),
        NOERROR,
        "A again",
    );
    assert_ok(
        &a.tcp("127.0.0.5", sink.port(), "again"),
        "connect after a fresh answer",
    );
    finish(&mut a);
}

/// Scenario 7: Two agents with different policies (two `enforcer run`s) do not share
/// learned addresses.
#[test]
fn learned_addresses_are_per_identity() {
    if !require_root("learned_addresses_are_per_identity") {
        return;
    }
    let env = Env::new("dns-ident");
    let sink = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    env.dns
        .add_addrs("a.example.com", &["127.0.0.5"])
        .add_addrs("b.example.com", &["127.0.0.8"]);
    let mut a = env.run(
        "dns-ident-a",
        &[
            host_rule("a.example.com", &[sink.port()], "tcp"),
            vouch_loopback(),
        ],
        &[],
    );
    let mut b = env.run_with(
        "dns-ident-b",
        &[
            host_rule("b.example.com", &[sink.port()], "tcp"),
            vouch_loopback(),
        ],
        &[],
        &env.dir.join("audit-b.jsonl"),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    assert_rcode(
        &resolve(&mut a, RESOLVER, "a.example.com", "A", false),
        NOERROR,
        "A resolves a.example.com",
    );
    assert_ok(
        &a.tcp("127.0.0.5", sink.port(), "from-a"),
        "A connects to 127.0.0.5",
    );
    let mut checks = Checks::new();
    checks.check("B cannot use A's learned address", || {
        assert_eperm(
            &b.tcp("127.0.0.5", sink.port(), "from-b"),
            "B connects to 127.0.0.5",
        );
    });
    checks.check("B cannot resolve A's name", || {
        assert_rcode(
            &resolve(&mut b, RESOLVER, "a.example.com", "A", false),
            REFUSED,
            "B asks a.example.com",
        );
        assert_eperm(
            &b.tcp("127.0.0.5", sink.port(), "from-b2"),
            "B connects to 127.0.0.5 after asking",
        );
    });
    checks.check("B's own name works", || {
        assert_rcode(
            &resolve(&mut b, RESOLVER, "b.example.com", "A", false),
            NOERROR,
            "B resolves b.example.com",
        );
    });
    finish(&mut a);
    finish(&mut b);
    std::thread::sleep(Duration::from_millis(200));
    checks.check("only A's bytes arrived", || {
        assert_eq!(sink.text(), "from-a")
    });
    checks.finish();
}

/// Scenario 7b: The same under `enforcer daemon`, two bindings, two policies.
#[test]
fn learned_addresses_are_per_identity_daemon() {
    if !require_root("learned_addresses_are_per_identity_daemon") {
        return;
    }
    let cg_a = Cgroup::create("dns-daemon-a");
    let cg_b = Cgroup::create("dns-daemon-b");
    let pins = PinDir::new("dns-daemon");
    let dir = TestDir::new("dns-daemon");
    let dns = DnsServer::start();
    let sink = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    dns.add_addrs("a.example.com", &["127.0.0.5"])
        .add_addrs("b.example.com", &["127.0.0.8"]);
    let mut d = Daemon::configure(
        &dir,
        &pins,
        &[(&cg_a.path, "dns-da"), (&cg_b.path, "dns-db")],
    );
    for (file, name, host) in [
        ("a.yaml", "dns-da", "a.example.com"),
        ("b.yaml", "dns-db", "b.example.com"),
    ] {
        write_atomic(
            &d.policies.join(file),
            &dns_policy_yaml(
                name,
                &[host_rule(host, &[sink.port()], "tcp"), vouch_loopback()],
                &dns.upstream(),
                &[],
            ),
        );
    }
    d.start();
    let mut pa = Probe::spawn_script(&dir.dns_agent());
    move_pid(&cg_a.path, pa.pid);
    let mut pb = Probe::spawn_script(&dir.dns_agent());
    move_pid(&cg_b.path, pb.pid);
    let q = |p: &mut Probe, n: &str| {
        p.cmd(json!({"op": "resolve", "server": RESOLVER, "port": 53, "name": n, "qtype": "A"}))
    };
    // The daemon may attach a moment after "ready": wait until A's queries are answered.
    let mut va = Value::Null;
    poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        va = q(&mut pa, "a.example.com");
        va["ok"] == true && va["rcode"] == NOERROR
    });
    assert_eq!(
        va["rcode"],
        NOERROR,
        "A resolves a.example.com under the daemon: {va}\n{}",
        d.stderr()
    );
    assert_eq!(va["src"], sock(RESOLVER), "{va}");
    assert_ok(
        &pa.tcp("127.0.0.5", sink.port(), "from-a"),
        "A connects to 127.0.0.5",
    );
    assert_eperm(
        &pb.tcp("127.0.0.5", sink.port(), "from-b"),
        "B connects to A's learned address",
    );
    let vb = q(&mut pb, "a.example.com");
    assert_eq!(vb["rcode"], REFUSED, "B asks a.example.com: {vb}");
    assert_eperm(
        &pb.tcp("127.0.0.5", sink.port(), "from-b2"),
        "B connects after asking",
    );
    let vb = q(&mut pb, "b.example.com");
    assert_eq!(vb["rcode"], NOERROR, "B resolves b.example.com: {vb}");
    // The daemon's metrics count per identity.
    let body = d.scrape();
    assert!(
        metric(
            &body,
            "enforcer_dns_queries_total",
            &[("identity", "dns-db"), ("verdict", "deny")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "enforcer_dns_queries_total{{identity=dns-db,verdict=deny}}:\n{body}"
    );
    pa.kill();
    pb.kill();
    d.kill9();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sink.text(), "from-a");
}

/// Scenario 8: No race between the answer and the kernel's table: 10,000
/// resolve-then-connect iterations, each name learned fresh on its first
/// use (2,000 names, each its own address), zero connect failures.
#[test]
fn resolve_then_connect_has_no_race() {
    if !require_root("resolve_then_connect_has_no_race") {
        return;
    }
    let env = Env::new("dns-race");
    // 0.0.0.0: accepts connections to every 127.x.y.z of the names below.
    let sink = AcceptSink::bind(Ipv4Addr::UNSPECIFIED);
    let n_names = 2000u32;
    let names: Vec<String> = (0..n_names)
        .map(|i| format!("r{i}.race.example.com"))
        .collect();
    for (i, n) in names.iter().enumerate() {
        let ip = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8).to_string();
        env.dns.add_addrs(n, &[ip.as_str()]);
    }
    let mut a = env.run(
        "dns-race",
        &[
            host_rule("*.race.example.com", &[sink.port()], "tcp"),
            vouch_loopback(),
        ],
        &["namesPerMinute: 5000"],
    );
    // Under emulation (the VM runner: ENFORCER_TEST_SLOWDOWN) every
    // iteration costs tens of times more: fewer of them, same property.
    let iterations = 10_000 / u64::from(slowdown() * slowdown());
    let t0 = Instant::now();
    let r = a.cmd_timeout(
        json!({"op": "loop", "server": RESOLVER, "port": 53, "names": names,
               "iterations": iterations, "connect_port": sink.port()}),
        Duration::from_secs(180) * slowdown(),
    );
    let el = t0.elapsed();
    finish(&mut a);
    eprintln!("race loop: {r} in {el:?}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["resolve_fail"], 0, "resolve failures: {r}");
    assert_eq!(
        r["connect_fail"], 0,
        "connect failures right after an answer: {r}"
    );
    poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        sink.conns() >= iterations
    });
    assert_eq!(sink.conns(), iterations, "connections accepted");
    assert!(
        el < Duration::from_secs(60) * slowdown(),
        "{iterations} iterations took {el:?} (> 60 s x {})",
        slowdown()
    );
}

/// Scenario 9: Rebinding: an allowed name resolving into loopback is not installed
/// without a `cidr` rule that vouches for it.
#[test]
fn rebinding_to_loopback_needs_a_vouching_cidr() {
    if !require_root("rebinding_to_loopback_needs_a_vouching_cidr") {
        return;
    }
    let env = Env::new("dns-rebind");
    let sink = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    env.dns.add_addrs("intranet.example.com", &["127.0.0.5"]);
    let name = "dns-rebind";
    let mut a = env.run(
        name,
        &[host_rule("intranet.example.com", &[sink.port()], "tcp")],
        &[],
    );
    let v = resolve(&mut a, RESOLVER, "intranet.example.com", "A", false);
    let mut checks = Checks::new();
    checks.check("answered or stripped", || {
        let rc = v["rcode"].as_i64();
        assert!(rc == Some(NOERROR) || rc == Some(REFUSED), "{v}");
    });
    checks.check("connect denied", || {
        assert_eperm(
            &a.tcp("127.0.0.5", sink.port(), "rebind"),
            "connect to a loopback answer without a vouching cidr",
        );
    });
    checks.check("metrics", || {
        let body = env.scrape();
        assert!(
            metric(
                &body,
                "enforcer_dns_rebinding_blocked_total",
                &[("identity", name)]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "enforcer_dns_rebinding_blocked_total{{identity={name}}}:\n{body}"
        );
        assert_eq!(
            metric(
                &body,
                "enforcer_dns_learned_addresses",
                &[("identity", name)]
            )
            .unwrap_or(0.0),
            0.0,
            "nothing may be learned:\n{body}"
        );
    });
    finish(&mut a);
    std::thread::sleep(Duration::from_millis(200));
    checks.check("zero bytes", || {
        assert_eq!(sink.bytes() + sink.conns(), 0, "{:?}", sink.text())
    });
    checks.check("audit", || {
        let recs = read_jsonl(&env.audit);
        assert!(
            recs.iter()
                .any(|r| r["action"] == "dns" && r["host"] == "intranet.example.com"),
            "no dns record for intranet.example.com:\n{}",
            audit_text(&recs)
        );
        assert!(
            recs.iter().any(|r| r["action"] == "connect"
                && r["verdict"] == "deny"
                && r["ip"] == "127.0.0.5"),
            "no connect deny record for 127.0.0.5:\n{}",
            audit_text(&recs)
        );
    });
    checks.finish();
}

/// Scenario 10: DNS-over-TLS and direct connects to addresses no answer gave stay denied.
#[test]
fn dot_and_unresolved_addresses_are_denied() {
    if !require_root("dot_and_unresolved_addresses_are_denied") {
        return;
    }
    let env = Env::new("dns-dot");
    let dot = TcpSink::bind("127.0.0.9:853".parse().unwrap()).ok();
    let https = TcpSink::bind("127.0.0.9:0".parse().unwrap()).unwrap();
    env.dns.add_addrs("api.example.com", &["127.0.0.5"]);
    let mut a = env.run(
        "dns-dot",
        &[
            host_rule("api.example.com", &[https.port()], "tcp"),
            vouch_loopback(),
        ],
        &[],
    );
    let mut checks = Checks::new();
    assert_rcode(
        &resolve(&mut a, RESOLVER, "api.example.com", "A", false),
        NOERROR,
        "A api.example.com",
    );
    for (h, p) in [("127.0.0.9", 853), ("::1", 853), ("127.0.0.1", 853)] {
        checks.check(&format!("DoT {h}:{p}"), || {
            assert_eperm(&a.tcp(h, p, "dot"), "DoT connect")
        });
    }
    checks.check("direct connect to an unresolved address", || {
        assert_eperm(
            &a.tcp("127.0.0.9", https.port(), "doh"),
            "connect to 127.0.0.9 (no allowed name resolved to it)",
        );
    });
    finish(&mut a);
    std::thread::sleep(Duration::from_millis(200));
    if let Some(dot) = &dot {
        checks.check("zero bytes at 127.0.0.9:853", || {
            assert_eq!(dot.bytes() + dot.conns(), 0)
        });
    }
    checks.check("zero bytes at 127.0.0.9", || {
        assert_eq!(https.bytes() + https.conns(), 0)
    });
    checks.finish();
}

/// Scenario 11: Metrics and audit records of DNS decisions.
#[test]
fn dns_metrics_and_audit() {
    if !require_root("dns_metrics_and_audit") {
        return;
    }
    let env = Env::new("dns-obs");
    let sink = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    env.dns.add_addrs("api.example.com", &["127.0.0.5"]);
    let name = "dns-obs";
    let mut a = env.run(
        name,
        &[
            host_rule("api.example.com", &[sink.port()], "tcp"),
            vouch_loopback(),
        ],
        &[],
    );
    let refused = ["x1.attacker.test", "x2.attacker.test", "x3.attacker.test"];
    for n in refused {
        assert_rcode(&resolve(&mut a, RESOLVER, n, "A", false), REFUSED, n);
    }
    assert_rcode(
        &resolve(&mut a, RESOLVER, "api.example.com", "TXT", false),
        REFUSED,
        "TXT",
    );
    for _ in 0..2 {
        assert_rcode(
            &resolve(&mut a, RESOLVER, "api.example.com", "A", false),
            NOERROR,
            "A",
        );
    }
    assert_ok(
        &a.tcp("127.0.0.5", sink.port(), "obs"),
        "connect to the learned address",
    );
    let mut checks = Checks::new();
    let mut body = String::new();
    let got = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        body = env.scrape();
        metric(
            &body,
            "enforcer_dns_queries_total",
            &[("identity", name), ("verdict", "deny")],
        )
        .unwrap_or(0.0)
            >= 4.0
            // the gauge is published every 500 ms
            && metric(
                &body,
                "enforcer_dns_learned_addresses",
                &[("identity", name)],
            )
            .unwrap_or(0.0)
                >= 1.0
            // (published with the gauge)
            && metric(
                &body,
                "enforcer_dns_learn_writes_total",
                &[("result", "skipped")],
            )
            .unwrap_or(0.0)
                >= 1.0
    });
    checks.check("queries_total deny", || {
        assert!(
            got,
            "enforcer_dns_queries_total{{identity={name},verdict=deny}} < 4:\n{body}"
        )
    });
    checks.check("queries_total allow", || {
        assert!(
            metric(
                &body,
                "enforcer_dns_queries_total",
                &[("identity", name), ("verdict", "allow")]
            )
            .unwrap_or(0.0)
                >= 2.0,
            "enforcer_dns_queries_total{{identity={name},verdict=allow}} < 2:\n{body}"
        )
    });
    checks.check("refusal reasons", || {
        let r = |reason| {
            metric(
                &body,
                "enforcer_dns_refused_total",
                &[("identity", name), ("reason", reason)],
            )
            .unwrap_or(0.0)
        };
        assert!(r("name-not-allowed") >= 3.0, "name-not-allowed:\n{body}");
        assert!(r("query-type") >= 1.0, "query-type:\n{body}");
    });
    checks.check("denied destinations", || {
        // The dashboard's "top denied destinations": each refused name is a
        // series of its own.
        for n in refused {
            let dest = format!("{n} (udp)");
            assert_eq!(
                metric(
                    &body,
                    "enforcer_denied_destinations_total",
                    &[
                        ("identity", name),
                        ("action", "dns"),
                        ("verdict", "deny"),
                        ("destination", &dest)
                    ],
                ),
                Some(1.0),
                "{dest}:\n{body}"
            );
        }
    });
    checks.check("latency histogram", || {
        assert!(
            metric(
                &body,
                "enforcer_dns_query_duration_seconds_count",
                &[("identity", name)]
            )
            .unwrap_or(0.0)
                >= 6.0,
            "enforcer_dns_query_duration_seconds_count{{identity={name}}} < 6:\n{body}"
        )
    });
    checks.check("learn writes", || {
        // The second answer, right after the first, needed no map write
        // (and the connect after it was allowed).
        let w = |result| {
            metric(
                &body,
                "enforcer_dns_learn_writes_total",
                &[("result", result)],
            )
            .unwrap_or(0.0)
        };
        assert!(w("written") >= 1.0, "written:\n{body}");
        assert!(w("skipped") >= 1.0, "skipped:\n{body}");
    });
    checks.check("learned addresses gauge", || {
        assert!(
            metric(
                &body,
                "enforcer_dns_learned_addresses",
                &[("identity", name)]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "enforcer_dns_learned_addresses{{identity={name}}} < 1:\n{body}"
        )
    });
    finish(&mut a);
    let recs = read_jsonl(&env.audit);
    let text = audit_text(&recs);
    checks.check("audit: refused names", || {
        for n in refused {
            assert!(
                recs.iter().any(|r| r["action"] == "dns"
                    && r["verdict"] == "deny"
                    && r["host"] == n
                    && r["identity"]["name"] == name),
                "no dns deny record for {n}:\n{text}"
            );
        }
    });
    checks.check("audit: refused query type is recorded", || {
        assert!(
            recs.iter().any(|r| r["action"] == "dns"
                && r["verdict"] == "deny"
                && r["host"] == "api.example.com"
                && r.to_string().contains("TXT")),
            "no dns deny record for TXT api.example.com naming the type:\n{text}"
        );
    });
    checks.check("audit: allowed query", || {
        assert!(
            recs.iter().any(|r| r["action"] == "dns"
                && r["verdict"] == "allow"
                && r["host"] == "api.example.com"),
            "no dns allow record for api.example.com:\n{text}"
        );
    });
    checks.check("audit: connect carries the name", || {
        assert!(
            recs.iter().any(|r| r["action"] == "connect"
                && r["verdict"] == "allow"
                && r["ip"] == "127.0.0.5"
                && r["host"] == "api.example.com"),
            "no connect record with host api.example.com:\n{text}"
        );
    });
    checks.check("audit chain verifies", || {
        let mut c = enforcer();
        c.args(["audit", "verify"]).arg(&env.audit);
        let out = output_with_timeout(c, Duration::from_secs(20));
        assert!(
            out.status.success(),
            "enforcer audit verify: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    checks.finish();
}

/// The harness itself (no root, no enforcer): the test upstream answers
/// the agent's hand-made queries over UDP and TCP, follows CNAMEs, serves
/// TXT and suffixes, says NXDOMAIN otherwise, and logs every query.
#[test]
fn harness_upstream_and_agent_agree() {
    let dir = TestDir::new("dns-harness");
    let dns = DnsServer::start();
    dns.set_ttl(42)
        .add_addrs("api.example.com", &["127.0.0.5", "::1"])
        .add_cname("www.example.com", "edge.cdn.test")
        .add_addrs("edge.cdn.test", &["127.0.0.6"])
        .add_txt("api.example.com", "hello")
        .add_suffix("t.example.com", &["127.0.0.7"]);
    let once = |cmd: Value| -> Value {
        let mut c = std::process::Command::new(python());
        c.arg(dir.dns_agent()).arg("once").arg(cmd.to_string());
        let out = output_with_timeout(c, Duration::from_secs(20));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let port = dns.addr.port();
    let q = |name: &str, qtype: &str, tcp: bool| {
        once(
            json!({"op": "resolve", "server": "127.0.0.1", "port": port, "name": name, "qtype": qtype, "tcp": tcp}),
        )
    };
    for tcp in [false, true] {
        let v = q("api.example.com", "A", tcp);
        assert_eq!(v["ok"], true, "{v}");
        assert_rcode(&v, NOERROR, "A");
        assert_eq!(addrs(&v), vec!["127.0.0.5"], "{v}");
        assert_eq!(v["ttls"], json!([42]), "{v}");
        assert_eq!(v["src"], format!("127.0.0.1:{port}"), "{v}");
        assert_eq!(addrs(&q("api.example.com", "AAAA", tcp)), vec!["::1"]);
        let v = q("www.example.com", "A", tcp);
        assert_eq!(addrs(&v), vec!["127.0.0.6"], "{v}");
        assert_eq!(v["cnames"], json!(["edge.cdn.test"]), "{v}");
        assert_eq!(q("api.example.com", "TXT", tcp)["txt"], json!(["hello"]));
        assert_eq!(addrs(&q("abc.t.example.com", "A", tcp)), vec!["127.0.0.7"]);
        assert_rcode(&q("nope.example.com", "A", tcp), 3, "NXDOMAIN");
    }
    assert!(dns.saw_type("api.example.com", "TXT"));
    assert!(dns
        .queries()
        .iter()
        .any(|l| l.tcp && l.name == "www.example.com"));
    assert!(!dns.saw("never.example.com"));
}

/// A daemon restart (kill -9): the pinned kernel state keeps steering the
/// agent's DNS to the old proxy port, so the new daemon takes that port
/// again and never turns steering off in between (a query is never judged
/// by the CIDR table, i.e. never EPERM); names resolve again and learned
/// addresses still connect.
#[test]
fn daemon_restart_keeps_the_dns_proxy_port() {
    if !require_root("daemon_restart_keeps_the_dns_proxy_port") {
        return;
    }
    let cg = Cgroup::create("dns-restart");
    let pins = PinDir::new("dns-restart");
    let dir = TestDir::new("dns-restart");
    let dns = DnsServer::start();
    let sink = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    dns.add_addrs("r.example.com", &["127.0.0.5"]);
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, "dns-restart")]);
    write_atomic(
        &d.policies.join("r.yaml"),
        &dns_policy_yaml(
            "dns-restart",
            &[
                host_rule("r.example.com", &[sink.port()], "tcp"),
                vouch_loopback(),
            ],
            &dns.upstream(),
            &[],
        ),
    );
    d.start();
    let port_of = |d: &Daemon| -> u64 {
        d.identity("dns-restart")
            .and_then(|i| i["dns_port"].as_u64())
            .unwrap_or(0)
    };
    let old_port = port_of(&d);
    assert_ne!(old_port, 0, "no DNS proxy port in status: {}", d.status());
    let mut p = Probe::spawn_script(&dir.dns_agent());
    move_pid(&cg.path, p.pid);
    let q = |p: &mut Probe| {
        p.cmd(json!({"op": "resolve", "server": RESOLVER, "port": 53, "name": "r.example.com", "qtype": "A"}))
    };
    let mut v = Value::Null;
    poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        v = q(&mut p);
        v["ok"] == true && v["rcode"] == NOERROR
    });
    assert_eq!(v["rcode"], NOERROR, "resolves before the restart: {v}");
    assert_ok(&p.tcp("127.0.0.5", sink.port(), "before"), "connect before");

    d.kill9();
    d.start();
    assert_eq!(
        port_of(&d),
        old_port,
        "the restarted daemon took the old proxy port"
    );
    // The same policy: what was learned before the restart still holds.
    assert_ok(
        &p.tcp("127.0.0.5", sink.port(), "adopted"),
        "connect after the restart, before resolving again",
    );
    let mut v = Value::Null;
    let answered = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        v = q(&mut p);
        // Never EPERM: steering stayed on across the restart.
        assert_ne!(
            v["errno"].as_i64(),
            Some(libc::EPERM as i64),
            "DNS judged by CIDR: {v}"
        );
        v["ok"] == true && v["rcode"] == NOERROR
    });
    assert!(answered, "resolves after the restart: {v}\n{}", d.stderr());
    assert_ok(&p.tcp("127.0.0.5", sink.port(), "after"), "connect after");

    // Another policy while no daemon runs (it still allows the name and
    // port): the addresses the old one learned are forgotten at start, the
    // agent resolves again.
    d.kill9();
    write_atomic(
        &d.policies.join("r.yaml"),
        &dns_policy_yaml(
            "dns-restart",
            &[
                host_rule("r.example.com", &[sink.port()], "tcp"),
                host_rule("other.example.com", &[443], "tcp"),
                vouch_loopback(),
            ],
            &dns.upstream(),
            &[],
        ),
    );
    d.start();
    assert_eperm(
        &p.tcp("127.0.0.5", sink.port(), "stale"),
        "connect on an address learned under the previous policy",
    );
    let mut v = Value::Null;
    poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        v = q(&mut p);
        v["ok"] == true && v["rcode"] == NOERROR
    });
    assert_eq!(v["rcode"], NOERROR, "resolves under the new policy: {v}");
    assert_ok(
        &p.tcp("127.0.0.5", sink.port(), "relearned"),
        "connect after resolving again",
    );
    p.kill();
    d.kill9();
}
