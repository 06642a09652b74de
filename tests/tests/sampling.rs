//! Allowed decisions are counted in the kernel whatever the event sampling;
//! denials are always events. `--allow-events 0` keeps allows out of the
//! audit log but not out of the counts; `--allow-events 1` (the default)
//! accounts every allow in a flow record (`flow.count` decisions).
use std::time::Duration;

use enforcer_tests::*;

const AGENT: &str = r#"
import socket, sys
api, attacker = int(sys.argv[1]), int(sys.argv[2])
for i in range(5):
    s = socket.create_connection(("127.0.0.1", api), timeout=3); s.sendall(b"ok"); s.close()
for i in range(2):
    try:
        socket.create_connection(("127.0.0.2", attacker), timeout=3)
    except OSError:
        pass
"#;

fn run_with(allow_events: &str) -> (String, Vec<serde_json::Value>) {
    let dir = TestDir::new(&format!("sampling-{allow_events}"));
    let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let attacker = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let pol = dir.join("p.yaml");
    write_atomic(
        &pol,
        &policy_yaml(
            "sampling-agent",
            "spiffe://test/sampling",
            "enforce",
            &[("127.0.0.1/32", &[api.port()], "tcp")],
        ),
    );
    let audit = dir.join("audit.jsonl");
    let mut c = enforcer();
    c.arg("run")
        .args(["--user", "root", "--policy"])
        .arg(&pol)
        .current_dir(dir.path())
        .arg("--audit-log")
        .arg(&audit)
        .args(["--allow-events", allow_events, "--"])
        .arg(python())
        .args([
            "-c",
            AGENT,
            &api.port().to_string(),
            &attacker.port().to_string(),
        ]);
    let out = output_with_timeout(c, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert_eq!(
        attacker.bytes() + attacker.conns(),
        0,
        "zero bytes to the attacker"
    );
    (err, read_jsonl(&audit))
}

/// Decisions the records stand for (a flow record: `flow.count`).
fn count(audit: &[serde_json::Value], verdict: &str) -> u64 {
    audit
        .iter()
        .filter(|r| r["action"] == "connect" && r["verdict"] == verdict)
        .map(|r| r["flow"]["count"].as_u64().unwrap_or(1))
        .sum()
}

#[test]
fn allows_are_counted_whatever_the_sampling() {
    if !require_root("allows_are_counted_whatever_the_sampling") {
        return;
    }
    let (summary, audit) = run_with("0");
    assert!(
        summary.contains("decisions: 5 allowed, 2 denied"),
        "kernel counters count every decision: {summary}"
    );
    assert_eq!(
        count(&audit, "allow"),
        0,
        "no allow events with --allow-events 0"
    );
    assert_eq!(count(&audit, "deny"), 2, "denials are always events");

    let (summary, audit) = run_with("1");
    assert!(
        summary.contains("decisions: 5 allowed, 2 denied"),
        "{summary}"
    );
    assert_eq!(
        count(&audit, "allow"),
        5,
        "every allow accounted with --allow-events 1"
    );
    // The five connects to one destination are one flow record.
    let flows: Vec<_> = audit
        .iter()
        .filter(|r| r["action"] == "connect" && r["verdict"] == "allow")
        .collect();
    assert!(
        !flows.is_empty() && flows.iter().all(|r| r["flow"]["count"].as_u64() >= Some(1)),
        "allows are flow records: {flows:#?}"
    );
    assert!(flows.len() < 5, "five connects, one flow: {flows:#?}");
    let f = &flows[0]["flow"];
    assert!(
        f["first_seen"].as_str() <= f["last_seen"].as_str(),
        "first_seen <= last_seen: {f}"
    );
    assert_eq!(count(&audit, "deny"), 2);
    assert!(
        audit
            .iter()
            .filter(|r| r["verdict"] == "deny")
            .all(|r| r.get("flow").is_none()),
        "a denial is its own record"
    );
}

/// Run `agent` (Python source) under `enforcer run` with a policy named
/// `name` that allows UDP to `cidr`; returns its stderr and audit log.
fn run_udp_agent(name: &str, cidr: &str, agent: &str) -> (String, Vec<serde_json::Value>) {
    let dir = TestDir::new(&format!("sampling-{name}"));
    let pol = dir.join("p.yaml");
    write_atomic(
        &pol,
        &policy_yaml(
            name,
            &format!("spiffe://test/{name}"),
            "enforce",
            &[(cidr, &[], "udp")],
        ),
    );
    let audit = dir.join("audit.jsonl");
    let mut c = enforcer();
    c.args(["run", "--user", "root", "--policy"])
        .arg(&pol)
        .current_dir(dir.path())
        .arg("--audit-log")
        .arg(&audit)
        .args(["--"])
        .arg(python())
        .args(["-c", agent]);
    let out = output_with_timeout(c, Duration::from_secs(120));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    (err, read_jsonl(&audit))
}

/// Many flows at once (more than a CPU's flow cache holds, interleaved so
/// that each decision evicts another flow to the spill ring, across the
/// drain interval): the flow records still account for every allowed
/// decision, per destination, and agree with the count the agent's loop
/// makes and with the run summary (the kernel's counters plus the flow
/// cache's answers).
#[test]
fn interleaved_flows_account_for_every_decision() {
    if !require_root("interleaved_flows_account_for_every_decision") {
        return;
    }
    const PORTS: u16 = 24;
    const ROUNDS: u16 = 60;
    let sink = UdpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // Round-robin over PORTS destinations; a pause in the middle spans at
    // least one drain of the flow tables.
    let agent = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for r in range({ROUNDS}):\n\
         \x20   if r == {half}: time.sleep(1.5)\n\
         \x20   for p in range({PORTS}):\n\
         \x20       s.sendto(b'x', ('127.0.0.1', 20000 + p))\n\
         s.sendto(b'x', ('127.0.0.1', {port}))\n",
        half = ROUNDS / 2,
        port = sink.port()
    );
    let (err, recs) = run_udp_agent("flows", "127.0.0.0/8", &agent);
    let total = u64::from(PORTS) * u64::from(ROUNDS) + 1;
    assert!(
        err.contains(&format!("decisions: {total} allowed, 0 denied")),
        "kernel counters: {err}"
    );
    let mut per_port = std::collections::BTreeMap::<u64, u64>::new();
    for r in recs
        .iter()
        .filter(|r| r["action"] == "sendmsg" && r["verdict"] == "allow")
    {
        let n = r["flow"]["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("an allow that is not a flow record: {r}"));
        *per_port.entry(r["port"].as_u64().unwrap()).or_default() += n;
    }
    for p in 0..PORTS {
        assert_eq!(
            per_port.get(&(20000 + u64::from(p))).copied(),
            Some(u64::from(ROUNDS)),
            "port {}: {per_port:?}",
            20000 + p
        );
    }
    assert_eq!(per_port.values().sum::<u64>(), total, "{per_port:?}");
    assert_eq!(sink.bytes(), 1, "the allowed datagram arrived");
}

/// A hostile agent floods allowed flows (thousands of distinct ports, so
/// that every decision evicts a flow and the spill and allow rings fill)
/// to push its denials out of the audit log: every denial still has its
/// record (allows never take the room of a denial).
#[test]
fn an_allow_flood_does_not_hide_denials() {
    if !require_root("an_allow_flood_does_not_hide_denials") {
        return;
    }
    const DENIED: u32 = 200;
    let attacker = UdpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let agent = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         denied = 0\n\
         for i in range({total}):\n\
         \x20   s.sendto(b'x', ('127.0.0.1', 1024 + i % 30000))\n\
         \x20   if i % 1000 == 999:\n\
         \x20       try:\n\
         \x20           s.sendto(b'secret', ('127.0.0.2', {port}))\n\
         \x20       except OSError:\n\
         \x20           denied += 1\n\
         assert denied == {DENIED}, denied\n",
        total = DENIED * 1000,
        port = attacker.port()
    );
    let (err, recs) = run_udp_agent("flood", "127.0.0.1/32", &agent);
    assert_eq!(attacker.bytes(), 0, "zero bytes to the attacker");
    assert!(
        err.contains(&format!("{DENIED} denied")),
        "kernel counters: {err}"
    );
    let denials = recs
        .iter()
        .filter(|r| r["action"] == "sendmsg" && r["verdict"] == "deny")
        .count();
    assert_eq!(
        denials, DENIED as usize,
        "every denial has its record despite the allow flood"
    );
}
