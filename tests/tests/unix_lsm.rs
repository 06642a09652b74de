//! Unix sockets by policy with the BPF LSM unix hooks (`lsm/unix_stream_connect`,
//! `lsm/unix_may_send`), which see the peer socket: needs BPF LSM, so
//! `#[ignore]`d on the host and run in the VM runner (Debian 6.1, where the
//! cgroup unix hooks of Linux 6.7 do not exist):
//! `cargo xtask vm-test -- <this test binary> --ignored --test-threads 1`.
//!
//! The agent (agents/unix_lsm_agent.py) runs as root under `enforcer run`:
//! the fake resolver, the proxy, a foreign abstract socket and a datagram
//! server get nothing; its own helpers (same identity, listed nowhere) work;
//! the listed path works through a symlink alias (inode), and the listed
//! path swapped for a symlink to the proxy does not.
use std::{os::unix::fs::PermissionsExt, process::Command, time::Duration};

use enforcer_tests::{unix::*, *};

fn require_bpf_lsm() {
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    assert!(
        lsm.split(',').any(|m| m.trim() == "bpf"),
        "BPF LSM is not active (/sys/kernel/security/lsm: {lsm:?}): run this in the VM"
    );
}

#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn lsm_hooks_judge_the_peer_socket() {
    require_bpf_lsm();
    let dir = TestDir::new("unix-lsm");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    for f in ["unix_lsm_agent.py", "unix_agent.py"] {
        std::fs::copy(agents_dir().join(f), dir.join(f)).unwrap();
        open_to_all(&dir.join(f));
    }
    let p = |n: &str| dir.join(n).display().to_string();
    let names = fake_resolved(&dir.join("resolve.varlink"));
    let proxy = path_sink(&dir.join("proxy.sock"), b"HTTP/1.1 200 OK\r\n\r\n");
    let allowed = path_sink(&dir.join("allowed.sock"), b"welcome");
    let bad_name = format!("enforcer-test-{}-daemon", unique("lsm"));
    let ok_name = format!("enforcer-test-{}-helper", unique("lsm"));
    let abstract_bad = abstract_sink(&bad_name);
    let abstract_ok = abstract_sink(&ok_name);
    let dgram_bad = dgram_sink(&dir.join("dgram-bad.sock"));
    let dgram_ok = dgram_sink(&dir.join("dgram-ok.sock"));
    let policy = dir.join("p.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: unix-lsm\n\
             spec:\n  egress: []\n  local:\n    - path: {}\n    - abstract: {}\n    - path: {}\n",
            p("allowed.sock"),
            ok_name,
            p("dgram-ok.sock"),
        ),
    )
    .unwrap();
    let secret = "lsm-s3cr3t";
    let cfg = json!({
        "dir": p(""),
        "resolver": p("resolve.varlink"),
        "proxy": p("proxy.sock"),
        "allowed": p("allowed.sock"),
        "abstract_bad": bad_name,
        "abstract_ok": ok_name,
        "dgram_bad": p("dgram-bad.sock"),
        "dgram_ok": p("dgram-ok.sock"),
        "secret": secret,
    });
    let audit_path = dir.join("audit.jsonl");
    let mut c = Command::new(enforcer_bin());
    c.arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--audit-log")
        .arg(&audit_path)
        .args(["--user", "root"])
        .arg("--resolver-socket")
        .arg(dir.join("resolve.varlink"))
        .arg("--")
        .arg(python())
        .arg(dir.join("unix_lsm_agent.py"))
        .arg(cfg.to_string())
        .current_dir(dir.path());
    let out = output_with_timeout(c, Duration::from_secs(180));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "enforcer run failed:\n{stderr}");
    let recs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .collect();
    let by_name = |n: &str| -> Value {
        recs.iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("agent did not report {n}: {recs:#?}\nstderr:\n{stderr}"))
    };
    let mut problems = Vec::new();
    for n in [
        "resolver_varlink",
        "proxy",
        "abstract_bad",
        "dgram_sendto_bad",
        "allowed_path_swapped_to_proxy",
    ] {
        let r = by_name(n);
        if r["ok"] != json!(false) || r["errno"] != "EPERM" {
            problems.push(format!("{n}: expected EPERM: {r}"));
        }
    }
    for n in [
        "own_helper_path",
        "own_helper_abstract",
        "allowed_path",
        "allowed_via_symlink",
        "abstract_ok",
        "dgram_sendto_ok",
    ] {
        let r = by_name(n);
        if r["ok"] != json!(true) {
            problems.push(format!("{n}: expected to work: {r}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nstderr:\n{stderr}",
        problems.join("\n")
    );
    assert_eq!(by_name("own_helper_path")["reply"], "helper:hi");
    assert_eq!(by_name("allowed_via_symlink")["reply"], "welcome");
    assert!(
        names.lock().unwrap().is_empty(),
        "resolver asked {:?}",
        names.lock().unwrap()
    );
    for (what, s) in [
        ("proxy", &proxy),
        ("abstract daemon", &abstract_bad),
        ("datagram server", &dgram_bad),
    ] {
        assert_eq!(
            (s.conns(), s.bytes()),
            (0, 0),
            "{what} received {:?}",
            s.text()
        );
    }
    poll_until(Duration::from_secs(2), Duration::from_millis(50), || {
        allowed.conns() >= 2 && dgram_ok.conns() >= 1 && abstract_ok.conns() >= 1
    });
    assert_eq!(allowed.conns(), 2, "{}", allowed.text());
    assert_eq!(dgram_ok.text(), "hello-dgram");
    assert_eq!(abstract_ok.text(), "hello-abstract");

    let audit = read_jsonl(&audit_path);
    let find = |action: &str, rule: &str| -> Vec<&Value> {
        audit
            .iter()
            .filter(|r| r["action"] == action && r["rule"] == rule)
            .collect()
    };
    let resolver = find("unix_connect", "resolver-ipc");
    assert_eq!(resolver.len(), 1, "{audit:#?}");
    assert_eq!(resolver[0]["socket"], p("resolve.varlink"));
    assert_eq!(resolver[0]["verdict"], "deny");
    let denied: Vec<&Value> = find("unix_connect", "default-deny");
    for s in [p("proxy.sock"), bad_name.clone()] {
        assert!(
            denied.iter().any(|r| r["socket"] == s.as_str()),
            "{s}: {audit:#?}"
        );
    }
    assert!(
        find("unix_send", "default-deny")
            .iter()
            .any(|r| r["socket"] == p("dgram-bad.sock").as_str()),
        "{audit:#?}"
    );
    assert!(
        !find("unix_connect", "unix-same-identity").is_empty(),
        "{audit:#?}"
    );
    // The start record says which hooks judge unix sockets.
    assert!(
        audit[0]["detail"]
            .as_str()
            .unwrap()
            .contains("BPF LSM unix_stream_connect"),
        "{}",
        audit[0]
    );
}

/// The daemon with the BPF LSM unix hooks: a listed socket that its service
/// re-creates (a new inode at the same path) is allowed again after the
/// periodic resync; another socket stays refused; the agent's own helper
/// socket needs no listing.
#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn daemon_follows_a_re_created_socket() {
    require_bpf_lsm();
    let cg = Cgroup::create("unix-lsm-daemon");
    let pins = PinDir::new("unix-lsm-daemon");
    let dir = TestDir::new("unix-lsm-daemon");
    let svc = dir.join("svc.sock");
    let first = path_sink(&svc, b"first");
    let other = path_sink(&dir.join("other.sock"), b"other");
    let name = "unix-lsm-daemon-agent";
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_atomic(
        &d.policies.join("p.yaml"),
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\n\
             spec:\n  egress: []\n  local:\n    - path: {}\n",
            svc.display()
        ),
    );
    d.start();
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(200), || d
            .identity(name)
            .is_some()),
        "daemon did not install {name}: {}",
        d.stderr()
    );
    let st = d.status();
    assert_eq!(
        st["capabilities"]["unix_sockets"]["available"], true,
        "{st:#}"
    );
    assert!(
        st["capabilities"]["unix_sockets"]["detail"]
            .as_str()
            .unwrap()
            .contains("BPF LSM"),
        "{st:#}"
    );
    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    let unix = |p: &mut Probe, target: &std::path::Path, data: &str| {
        p.cmd(json!({"op": "unix", "path": target.display().to_string(), "data": data}))
    };
    assert_ok(&unix(&mut p, &svc, "to-first"), "listed socket");
    assert_eperm(
        &unix(&mut p, &dir.join("other.sock"), "to-other"),
        "unlisted socket",
    );
    // The service restarts: a new socket (inode) at the same path.
    std::fs::remove_file(&svc).unwrap();
    let second = path_sink(&svc, b"second");
    let ok = poll_until(Duration::from_secs(20), Duration::from_millis(300), || {
        unix(&mut p, &svc, "to-second")["ok"] == json!(true)
    });
    assert!(
        ok,
        "the re-created socket stayed refused; daemon:\n{}",
        d.stderr()
    );
    // The map update that lets the connect through lands before the log
    // line that reports it: wait for the line.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || d
            .stderr()
            .contains("re-created")),
        "the daemon did not say it reinstalled: {}",
        d.stderr()
    );
    assert_eperm(
        &unix(&mut p, &dir.join("other.sock"), "to-other"),
        "unlisted socket",
    );
    p.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(first.text().contains("to-first"));
    assert!(second.text().contains("to-second"));
    assert_eq!((other.conns(), other.bytes()), (0, 0), "{}", other.text());
    d.kill9();
}
