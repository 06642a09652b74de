//! Allowed decisions are counted in the kernel whatever the event sampling;
//! denials are always events. `--allow-events 0` keeps allows out of the
//! audit log but not out of the counts; `--allow-events 1` records each.
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

fn count(audit: &[serde_json::Value], verdict: &str) -> usize {
    audit
        .iter()
        .filter(|r| r["action"] == "connect" && r["verdict"] == verdict)
        .count()
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
        "every allow recorded with --allow-events 1"
    );
    assert_eq!(count(&audit, "deny"), 2);
}
