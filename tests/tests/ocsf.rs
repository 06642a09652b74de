//! The audit log in OCSF format, written by a real `enforcer run`: every
//! event validates against the shipped OCSF 1.3.0 JSON Schema of its class,
//! the hash chain verifies (`enforcer audit verify`), a changed byte is
//! found, and `enforcer audit tail --format ocsf` of a JSON log gives the
//! same classes.
use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use enforcer_tests::*;
use serde_json::Value;

fn schemas() -> HashMap<u64, jsonschema::Validator> {
    let dir = workspace_root().join("enforcer/tests/data/ocsf/1.3.0");
    [
        (4001, "network_activity"),
        (4003, "dns_activity"),
        (1001, "file_activity"),
        (1003, "kernel_activity"),
        (6002, "application_lifecycle"),
    ]
    .into_iter()
    .map(|(uid, f)| {
        let text = std::fs::read_to_string(dir.join(format!("{f}.json"))).unwrap();
        let schema: Value = serde_json::from_str(&text).unwrap();
        (uid, jsonschema::draft7::new(&schema).unwrap())
    })
    .collect()
}

fn enforcer_out(args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(enforcer_bin());
    c.args(args);
    let out = output_with_timeout(c, Duration::from_secs(60));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One allowed and one denied connect under `enforcer run`, logged in
/// `format`.
fn run(dir: &TestDir, format: &str, log: &Path, allowed: u16, denied: u16) {
    let policy = dir.join(&format!("policy-{format}.yaml"));
    std::fs::write(
        &policy,
        policy_yaml(
            "ocsf-agent",
            "spiffe://example.org/ocsf",
            "enforce",
            &[("127.0.0.5/32", &[allowed], "tcp")],
        ),
    )
    .unwrap();
    let py = format!(
        "import socket\nfor port in ({allowed}, {denied}):\n    try:\n        \
         socket.create_connection(('127.0.0.5', port), timeout=5).sendall(b'x')\n    \
         except OSError as e:\n        print(port, e.errno)\n"
    );
    let mut c = Command::new(enforcer_bin());
    c.arg("run")
        .args(["--user", "root"])
        .arg("--policy")
        .arg(&policy)
        .arg("--audit-log")
        .arg(log)
        .args(["--audit-format", format])
        .current_dir(dir.path())
        .arg("--")
        .arg(python())
        .arg("-c")
        .arg(py)
        .stdin(Stdio::null());
    let out = output_with_timeout(c, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "enforcer run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_run_writes_schema_valid_ocsf_with_a_verifiable_chain() {
    if !require_root("a_run_writes_schema_valid_ocsf_with_a_verifiable_chain") {
        return;
    }
    let dir = TestDir::new("ocsf");
    let allowed = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let denied = SinkPair::bind("127.0.0.5");
    let log = dir.join("audit.ocsf.jsonl");
    run(&dir, "ocsf", &log, allowed.port(), denied.port());
    assert_eq!(denied.total_bytes(), 0, "{}", denied.describe());

    let events = read_jsonl(&log);
    let v = schemas();
    for (i, e) in events.iter().enumerate() {
        let uid = e["class_uid"].as_u64().unwrap_or(0);
        let validator = v
            .get(&uid)
            .unwrap_or_else(|| panic!("line {}: class {uid} has no shipped schema: {e}", i + 1));
        let errors: Vec<String> = validator.iter_errors(e).map(|x| x.to_string()).collect();
        assert!(
            errors.is_empty(),
            "line {}: {e}\n{}",
            i + 1,
            errors.join("\n")
        );
        assert_eq!(e["metadata"]["sequence"].as_u64(), Some(i as u64), "{e}");
    }
    let refused = events
        .iter()
        .find(|e| {
            e["class_uid"] == 4001
                && e["dst_endpoint"]["port"] == denied.port()
                && e["disposition_id"] == 2
        })
        .unwrap_or_else(|| panic!("no blocked Network Activity event: {events:#?}"));
    assert_eq!(refused["actor"]["app_name"], "ocsf-agent", "{refused}");
    assert_eq!(
        refused["actor"]["app_uid"], "spiffe://example.org/ocsf",
        "{refused}"
    );
    assert_eq!(refused["dst_endpoint"]["ip"], "127.0.0.5");
    assert!(events.iter().any(|e| e["class_uid"] == 4001
        && e["dst_endpoint"]["port"] == allowed.port()
        && e["disposition_id"] == 1));
    assert!(events.iter().any(|e| e["class_uid"] == 6002));

    let (code, out, err) = enforcer_out(&["audit", "verify", &log.display().to_string()]);
    assert_eq!(code, 0, "audit verify: {out}{err}");
    assert!(out.contains("OCSF"), "{out}");

    // One changed byte in a middle record breaks the chain at the next.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    let mut tampered: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    tampered[1] = tampered[1].replacen("ocsf-agent", "ocsf-agenT", 1);
    let bad = dir.join("tampered.jsonl");
    std::fs::write(&bad, tampered.join("\n") + "\n").unwrap();
    let (code, out, err) = enforcer_out(&["audit", "verify", &bad.display().to_string()]);
    assert_eq!(code, 1, "a changed record must fail: {out}{err}");
    assert!(err.contains("line 3") || err.contains("line 2"), "{err}");

    // A JSON log converted by `audit tail` gives the same classes.
    let json_log = dir.join("audit.jsonl");
    run(&dir, "json", &json_log, allowed.port(), denied.port());
    let (code, out, err) = enforcer_out(&[
        "audit",
        "tail",
        &json_log.display().to_string(),
        "--format",
        "ocsf",
    ]);
    assert_eq!(code, 0, "audit tail: {err}");
    let converted: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(converted.len(), read_jsonl(&json_log).len());
    for e in &converted {
        let uid = e["class_uid"].as_u64().unwrap_or(0);
        let errors: Vec<String> = v[&uid].iter_errors(e).map(|x| x.to_string()).collect();
        assert!(errors.is_empty(), "{e}\n{}", errors.join("\n"));
    }
    assert!(converted
        .iter()
        .any(|e| e["dst_endpoint"]["port"] == denied.port() && e["disposition_id"] == 2));
}
