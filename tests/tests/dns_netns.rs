//! DNS of bound workloads in their own network namespace (Kubernetes pods:
//! the daemon is a DaemonSet pod, each agent pod has its own netns).
//!
//! The kernel steers an agent's DNS to `127.0.0.1:<dns_port>` in the
//! *agent's* namespace; the daemon must listen there. Each test makes a real
//! network namespace (an `unshare --net` holder process), binds a real
//! cgroup with the daemon's config `bindings`, and runs
//! `agents/dns_agent.py` inside that namespace (`nsenter --net`) and inside
//! the cgroup. The "outside hosts" (TCP sinks on 127.0.0.x) live in that
//! namespace only; the upstream DNS server (`enforcer_tests::dns_server`, on
//! 127.0.0.53) lives in the daemon's (the test's own) namespace only: the
//! proxy listens in the agent's namespace but forwards from its own, so an
//! answer proves both. The agent controls its namespace: a fake resolver
//! there, on the upstream's very address, must never be asked (else it
//! would choose the addresses the proxy learns for an allowed name).
use std::{
    process::Command,
    time::{Duration, Instant},
};

use enforcer_tests::{dns_server::DnsServer, *};

const RESOLVER: &str = "127.0.0.9";
const NOERROR: i64 = 0;
const REFUSED: i64 = 5;

fn resolve(p: &mut Probe, name: &str, tcp: bool) -> Value {
    p.cmd(
        json!({"op": "resolve", "server": RESOLVER, "port": 53, "name": name,
                 "qtype": "A", "tcp": tcp, "timeout": 3}),
    )
}

/// The `dns_netns` entries of identity `name` in `enforcer status`.
fn netns_status(d: &Daemon, name: &str) -> Vec<Value> {
    let st = d.status();
    st["identities"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == name)
        .and_then(|i| i["dns_netns"].as_array().cloned())
        .unwrap_or_default()
}

/// Fds of process `pid` that point to namespace `ns` (`net:[<inode>]`).
fn fds_to(pid: u32, ns: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|l| l.to_string_lossy() == ns)
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// `enforcer status` as text.
fn status_text(d: &Daemon) -> String {
    let mut c = enforcer();
    c.args(["status", "--socket"]).arg(&d.socket);
    let out = output_with_timeout(c, Duration::from_secs(20));
    assert!(out.status.success(), "enforcer status: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn gauge(d: &Daemon, name: &str) -> Option<f64> {
    metric(
        &d.scrape(),
        "enforcer_dns_netns_listeners",
        &[("identity", name)],
    )
}

/// The daemon listens in the agent's namespace: an allowed name resolves
/// (UDP and TCP) through the proxy, forwarded from the daemon's namespace,
/// and its answer is reachable; a denied name is refused and never
/// forwarded; an address never resolved is EPERM. When the agent and the
/// namespace go, the daemon closes its listeners there and keeps no fd to
/// it.
#[test]
fn dns_is_served_in_the_agents_network_namespace() {
    if !require_root("dns_is_served_in_the_agents_network_namespace") {
        return;
    }
    let name = "dns-netns";
    let cg = Cgroup::create(name);
    let pins = PinDir::new(name);
    let dir = TestDir::new(name);
    let mut ns = TestNetns::new(true);
    // The outside hosts exist only inside the namespace; the upstream only
    // in the daemon's.
    let (sink, never) = ns.run(|| {
        (
            TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap(),
            TcpSink::bind("127.0.0.6:0".parse().unwrap()).unwrap(),
        )
    });
    let dns = DnsServer::start_on("127.0.0.53".parse().unwrap());
    dns.add_addrs("allowed.example.com", &["127.0.0.5"])
        .add_addrs("denied.example.com", &["127.0.0.6"]);
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_atomic(
        &d.policies.join("p.yaml"),
        &dns_policy_yaml(
            name,
            &[
                host_rule("allowed.example.com", &[sink.port()], "tcp"),
                vouch_loopback(),
            ],
            &dns.upstream(),
            &[],
        ),
    );
    d.start();
    let mut a = ns.agent(&dir);
    move_pid(&cg.path, a.pid);
    let mut checks = Checks::new();

    // The daemon finds the namespace on its next reconcile (2 s tick).
    let mut v = Value::Null;
    poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
        v = resolve(&mut a, "allowed.example.com", false);
        v["ok"] == true && v["rcode"] == NOERROR
    });
    checks.check("allowed name resolves in the namespace (UDP)", || {
        assert_eq!(
            v["rcode"],
            NOERROR,
            "A allowed.example.com from inside the namespace: {v}\ndaemon stderr:\n{}",
            d.stderr()
        );
        assert_eq!(v["addrs"], json!(["127.0.0.5"]), "{v}");
        assert_eq!(v["src"], format!("{RESOLVER}:53"), "reply source: {v}");
    });
    checks.check("allowed name resolves in the namespace (TCP)", || {
        let v = resolve(&mut a, "allowed.example.com", true);
        assert_eq!(v["rcode"], NOERROR, "TCP query: {v}");
        assert_eq!(v["addrs"], json!(["127.0.0.5"]), "{v}");
    });
    checks.check(
        "the query was forwarded (from the daemon's namespace)",
        || {
            assert!(dns.count("allowed.example.com") >= 1, "{}", dns.describe());
        },
    );
    checks.check("connect to the answer", || {
        assert_ok(
            &a.tcp("127.0.0.5", sink.port(), "hello-allowed"),
            "connect to allowed.example.com's address",
        );
        assert!(
            poll_until(Duration::from_secs(3), Duration::from_millis(20), || sink
                .text()
                == "hello-allowed"),
            "the listener in the namespace got: {:?}",
            sink.text()
        );
    });
    checks.check("denied name is refused, never forwarded", || {
        let v = resolve(&mut a, "denied.example.com", false);
        assert_eq!(v["rcode"], REFUSED, "A denied.example.com: {v}");
        let v = resolve(&mut a, "denied.example.com", true);
        assert_eq!(v["rcode"], REFUSED, "A denied.example.com over TCP: {v}");
        assert_eq!(
            dns.count("denied.example.com"),
            0,
            "the upstream saw the denied name: {}",
            dns.describe()
        );
    });
    checks.check("never-resolved address is EPERM, zero bytes", || {
        assert_eperm(
            &a.tcp("127.0.0.6", never.port(), "leak"),
            "connect to an address no answer gave",
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(never.bytes(), 0, "bytes reached 127.0.0.6");
        assert_eq!(never.conns(), 0, "a connection reached 127.0.0.6");
    });
    checks.check("status and metric show the namespace", || {
        let st = netns_status(&d, name);
        assert_eq!(st.len(), 1, "dns_netns: {st:?}");
        assert_eq!(st[0]["netns"], ns.name(), "{st:?}");
        assert_eq!(st[0]["serving"], true, "{st:?}");
        assert_eq!(st[0]["pid"], a.pid, "{st:?}");
        assert_eq!(st[0]["cgroup"], cg.path.display().to_string(), "{st:?}");
        assert_eq!(gauge(&d, name), Some(1.0), "enforcer_dns_netns_listeners");
        assert!(
            fds_to(d.pid(), &ns.name()) >= 1,
            "the daemon holds the netns"
        );
        let text = status_text(&d);
        assert!(
            text.contains(&format!("dns proxy also in {}", ns.name())),
            "{text}"
        );
    });

    // The agent and the namespace go: the daemon closes its listeners there.
    a.kill();
    ns.kill_holder();
    let ns_name = ns.name();
    let start = Instant::now();
    let closed = poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
        netns_status(&d, name).is_empty() && gauge(&d, name) == Some(0.0)
    });
    // Only the listener set holds the namespace fd (forwards in flight hold
    // none), and it is closed before the status entry goes.
    checks.check("listeners closed after the namespace went", || {
        assert!(
            closed,
            "after {:?}: dns_netns {:?}, gauge {:?}\n{}",
            start.elapsed(),
            netns_status(&d, name),
            gauge(&d, name),
            d.stderr()
        );
        assert_eq!(
            fds_to(d.pid(), &ns_name),
            0,
            "the daemon still holds an fd to the namespace"
        );
        assert!(
            d.stderr().contains("DNS proxy listeners closed"),
            "log: {}",
            d.stderr()
        );
    });
    d.kill9();
    checks.finish();
}

/// The agent owns its namespace (with a user namespace, `unshare -Urn`, an
/// agent may make one and add any address there): a fake resolver in the
/// agent's namespace, on the upstream's very address and port, answers the
/// allowed name with an attacker address. The proxy forwards from the
/// daemon's namespace only: the agent gets the real answer, the fake is
/// never asked, and the attacker address stays EPERM with zero bytes.
#[test]
fn a_fake_resolver_in_the_agents_namespace_is_never_asked() {
    if !require_root("a_fake_resolver_in_the_agents_namespace_is_never_asked") {
        return;
    }
    let name = "dns-netns-fake";
    let cg = Cgroup::create(name);
    let pins = PinDir::new(name);
    let dir = TestDir::new(name);
    let ns = TestNetns::new(true);
    // The real upstream, in the daemon's namespace.
    let dns = DnsServer::start_on("127.0.0.53".parse().unwrap());
    dns.add_addrs("allowed.example.com", &["127.0.0.5"]);
    // The agent's side: the real host, the attacker's host and the fake
    // resolver at the upstream's address, all in the agent's namespace.
    let (sink, evil, fake) = ns.run(|| {
        (
            TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap(),
            TcpSink::bind("127.0.0.7:0".parse().unwrap()).unwrap(),
            DnsServer::start_at(dns.addr),
        )
    });
    fake.add_addrs("allowed.example.com", &["127.0.0.7"]);
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_atomic(
        &d.policies.join("p.yaml"),
        &dns_policy_yaml(
            name,
            &[
                host_rule("allowed.example.com", &[sink.port(), evil.port()], "tcp"),
                vouch_loopback(),
            ],
            &dns.upstream(),
            &[],
        ),
    );
    d.start();
    let mut a = ns.agent(&dir);
    move_pid(&cg.path, a.pid);
    let mut checks = Checks::new();
    let mut v = Value::Null;
    poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
        v = resolve(&mut a, "allowed.example.com", false);
        v["ok"] == true && v["rcode"] == NOERROR
    });
    checks.check("the real answer (UDP)", || {
        assert_eq!(
            v["rcode"],
            NOERROR,
            "A allowed.example.com: {v}\ndaemon stderr:\n{}",
            d.stderr()
        );
        assert_eq!(v["addrs"], json!(["127.0.0.5"]), "{v}");
    });
    checks.check("the real answer (TCP)", || {
        let v = resolve(&mut a, "allowed.example.com", true);
        assert_eq!(v["rcode"], NOERROR, "TCP query: {v}");
        assert_eq!(v["addrs"], json!(["127.0.0.5"]), "{v}");
    });
    checks.check("the real upstream was asked, the fake never", || {
        assert!(dns.count("allowed.example.com") >= 1, "{}", dns.describe());
        assert_eq!(
            fake.queries().len(),
            0,
            "the fake resolver in the agent's namespace was asked: {}",
            fake.describe()
        );
    });
    checks.check("the real answer opens", || {
        assert_ok(
            &a.tcp("127.0.0.5", sink.port(), "hello-real"),
            "connect to the real answer",
        );
        assert!(
            poll_until(Duration::from_secs(3), Duration::from_millis(20), || sink
                .text()
                == "hello-real"),
            "the real host got: {:?}",
            sink.text()
        );
    });
    checks.check("the fake's address is EPERM, zero bytes", || {
        assert_eperm(
            &a.tcp("127.0.0.7", evil.port(), "exfil"),
            "connect to the address only the fake resolver gave",
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(evil.bytes(), 0, "bytes reached the attacker's 127.0.0.7");
        assert_eq!(evil.conns(), 0, "a connection reached 127.0.0.7");
    });
    a.kill();
    d.kill9();
    checks.finish();
}

/// A namespace whose loopback is down cannot be served: the daemon says so
/// (log, status, `enforcer_dns_netns_errors_total`) and the agent's DNS
/// fails closed; once `lo` is up the next reconcile serves it.
#[test]
fn namespace_with_loopback_down_is_reported_then_served() {
    if !require_root("namespace_with_loopback_down_is_reported_then_served") {
        return;
    }
    let name = "dns-netns-lo";
    let cg = Cgroup::create(name);
    let pins = PinDir::new(name);
    let dir = TestDir::new(name);
    let ns = TestNetns::new(false);
    let dns = DnsServer::start();
    dns.add_addrs("allowed.example.com", &["127.0.0.5"]);
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_atomic(
        &d.policies.join("p.yaml"),
        &dns_policy_yaml(
            name,
            &[
                host_rule("allowed.example.com", &[80], "tcp"),
                vouch_loopback(),
            ],
            &dns.upstream(),
            &[],
        ),
    );
    d.start();
    let mut a = ns.agent(&dir);
    move_pid(&cg.path, a.pid);
    let mut checks = Checks::new();
    let mut st = Vec::new();
    let reported = poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
        st = netns_status(&d, name);
        st.len() == 1 && st[0]["serving"] == false
    });
    checks.check("status reports the namespace it cannot serve", || {
        assert!(reported, "dns_netns: {st:?}\n{}", d.stderr());
        assert_eq!(st[0]["netns"], ns.name(), "{st:?}");
        assert!(
            st[0]["error"]
                .as_str()
                .unwrap_or("")
                .starts_with("loopback-unavailable"),
            "{st:?}"
        );
        let text = status_text(&d);
        assert!(
            text.contains(&format!("dns proxy NOT in {}", ns.name())),
            "{text}"
        );
    });
    checks.check("error counted and logged", || {
        let body = d.scrape();
        assert!(
            metric(
                &body,
                "enforcer_dns_netns_errors_total",
                &[("identity", name), ("reason", "loopback-unavailable")]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "{body}"
        );
        assert_eq!(gauge(&d, name), Some(0.0));
        assert!(
            d.stderr()
                .contains("DNS proxy cannot listen in the namespace"),
            "{}",
            d.stderr()
        );
    });
    checks.check("the agent's DNS fails closed", || {
        let v = resolve(&mut a, "allowed.example.com", false);
        assert_ne!(v["ok"], true, "{v}");
        assert_eq!(dns.count("allowed.example.com"), 0, "{}", dns.describe());
    });
    // The pod brings lo up: the next reconcile serves it.
    let st = Command::new("nsenter")
        .arg(format!("--net={}", ns.path.display()))
        .args(["ip", "link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(st.success());
    let served = poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
        let st = netns_status(&d, name);
        st.len() == 1 && st[0]["serving"] == true
    });
    checks.check("served once lo is up", || {
        assert!(served, "{:?}\n{}", netns_status(&d, name), d.stderr());
        assert_eq!(gauge(&d, name), Some(1.0));
    });
    a.kill();
    d.kill9();
    checks.finish();
}
