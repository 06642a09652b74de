//! Unix sockets by policy (`spec.local`) through `enforcer run`, on the
//! host kernel's cgroup unix hooks (`cgroup/connect_unix`,
//! `cgroup/sendmsg_unix`, Linux >= 6.7).
//!
//! A hostile agent (agents/unix_agent.py) tries to have local services talk
//! to the network for it: a fake systemd-resolved (a varlink server that
//! records every name asked of `io.systemd.Resolve.ResolveHostname`),
//! passed as the resolver socket; a unix-socket "proxy" outside the
//! identity; a host daemon's abstract socket; a datagram server. None of
//! them may receive a byte, and the audit log must hold each denial with
//! its reason. What `spec.local` lists works. The daemon enforces the same
//! with its `resolverSockets:` and reports the capability.
use std::{
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use enforcer_tests::{unix::*, *};

/// BPF LSM is an active LSM (the VM runner's kernels): enforcer then judges
/// unix sockets with the LSM hooks, by peer socket.
fn bpf_lsm_active() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .is_ok_and(|l| l.trim().split(',').any(|m| m == "bpf"))
}

/// The cgroup unix hooks exist (Linux >= 6.7).
fn kernel_has_unix_hooks() -> bool {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = r.trim().split(['.', '-']);
    let major: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 7)
}

fn skip(test: &str) -> bool {
    if !require_root(test) {
        return true;
    }
    if !kernel_has_unix_hooks() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: needs Linux >= 6.7 (CI is set, so not skipping)"
        );
        eprintln!("SKIP: needs Linux >= 6.7 ({test})");
        return true;
    }
    false
}

struct World {
    dir: TestDir,
    names: Arc<Mutex<Vec<String>>>,
    proxy: Arc<Seen>,
    allowed: Arc<Seen>,
    abstract_bad: Arc<Seen>,
    abstract_ok: Arc<Seen>,
    dgram_bad: Arc<Seen>,
    dgram_ok: Arc<Seen>,
    abstract_bad_name: String,
    abstract_ok_name: String,
}

impl World {
    fn new(test: &str) -> Self {
        let dir = TestDir::new(test);
        std::fs::copy(
            agents_dir().join("unix_agent.py"),
            dir.join("unix_agent.py"),
        )
        .unwrap();
        open_to_all(&dir.join("unix_agent.py"));
        let abstract_bad_name = format!("enforcer-test-{}-daemon", unique(test));
        let abstract_ok_name = format!("enforcer-test-{}-helper", unique(test));
        let w = Self {
            names: fake_resolved(&dir.join("resolve.varlink")),
            proxy: path_sink(
                &dir.join("proxy.sock"),
                b"HTTP/1.1 200 Connection established\r\n\r\n",
            ),
            allowed: path_sink(&dir.join("allowed.sock"), b"welcome"),
            abstract_bad: abstract_sink(&abstract_bad_name),
            abstract_ok: abstract_sink(&abstract_ok_name),
            dgram_bad: dgram_sink(&dir.join("dgram-bad.sock")),
            dgram_ok: dgram_sink(&dir.join("dgram-ok.sock")),
            abstract_bad_name,
            abstract_ok_name,
            dir,
        };
        std::os::unix::fs::symlink(w.dir.join("allowed.sock"), w.dir.join("alias.sock")).unwrap();
        w
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn policy(&self, name: &str, mode: &str) -> std::path::PathBuf {
        let p = self.dir.join(&format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!(
                "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\n\
                 spec:\n  mode: {mode}\n  egress: []\n  local:\n    - path: {}\n    - abstract: {}\n\
                 \x20   - path: {}\n",
                self.path("allowed.sock"),
                self.abstract_ok_name,
                self.path("dgram-ok.sock"),
            ),
        )
        .unwrap();
        p
    }

    fn agent_config(&self, secret: &str) -> Value {
        json!({
            "resolver": self.path("resolve.varlink"),
            "proxy": self.path("proxy.sock"),
            "allowed": self.path("allowed.sock"),
            "alias": self.path("alias.sock"),
            "abstract_bad": self.abstract_bad_name,
            "abstract_ok": self.abstract_ok_name,
            "dgram_bad": self.path("dgram-bad.sock"),
            "dgram_ok": self.path("dgram-ok.sock"),
            "secret": secret,
        })
    }

    /// `enforcer run` of the agent: (exit ok, records by name, stderr, audit log).
    fn run(&self, policy: &Path, secret: &str) -> (bool, Vec<Value>, String, Vec<Value>) {
        let audit = self.dir.join(&format!("audit-{secret}.jsonl"));
        let mut c = Command::new(enforcer_bin());
        c.arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--audit-log")
            .arg(&audit)
            .args(["--user", "65534:65534"])
            .arg("--resolver-socket")
            .arg(self.dir.join("resolve.varlink"))
            .arg("--")
            .arg(python())
            .arg(self.dir.join("unix_agent.py"))
            .arg(self.agent_config(secret).to_string())
            .current_dir(self.dir.path());
        let out = output_with_timeout(c, Duration::from_secs(60));
        let records = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .collect();
        // Give the event reader a moment: the audit log is flushed on exit.
        (
            out.status.success(),
            records,
            String::from_utf8_lossy(&out.stderr).into_owned(),
            read_jsonl(&audit),
        )
    }
}

fn by_name<'a>(records: &'a [Value], name: &str, stderr: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("agent did not report {name}: {records:#?}\nstderr:\n{stderr}"))
}

/// The decision records of `action` on `socket`.
fn decisions<'a>(audit: &'a [Value], action: &str, socket: &str) -> Vec<&'a Value> {
    audit
        .iter()
        .filter(|r| r["action"] == action && r["socket"] == socket)
        .collect()
}

#[test]
fn hostile_agent_reaches_no_local_service_outside_spec_local() {
    if skip("hostile_agent_reaches_no_local_service_outside_spec_local") {
        return;
    }
    let w = World::new("unix-enforce");
    let policy = w.policy("unix-agent", "enforce");
    let secret = "s3cr3t-enforce";
    let (ok, recs, stderr, audit) = w.run(&policy, secret);
    assert!(ok, "enforcer run failed:\n{stderr}");

    // The agent's own view: refused with EPERM, allowed ones worked. With
    // BPF LSM (a VM kernel) the hooks judge the peer socket, not the string
    // (README, Unix sockets): a symlink alias of an allowed socket is that
    // socket, and an abstract name nobody listens on finds no peer to judge.
    let lsm = bpf_lsm_active();
    let mut problems = Vec::new();
    for n in [
        "resolver_varlink",
        "proxy",
        "proxy_relative",
        "allowed_via_symlink",
        "abstract_bad",
        "abstract_ok_extended",
        "dgram_sendto_bad",
        "dgram_connect_bad",
    ] {
        if lsm && n == "allowed_via_symlink" {
            continue;
        }
        let r = by_name(&recs, n, &stderr);
        let refused = if lsm && n == "abstract_ok_extended" {
            r["ok"] == json!(false) && (r["errno"] == "EPERM" || r["errno"] == "ECONNREFUSED")
        } else {
            r["ok"] == json!(false) && r["errno"] == "EPERM"
        };
        if !refused {
            problems.push(format!("{n}: expected EPERM: {r}"));
        }
    }
    let mut works = vec![
        "allowed_path",
        "allowed_path_nul_garbage",
        "abstract_ok",
        "dgram_sendto_ok",
        "socketpair",
    ];
    if lsm {
        works.push("allowed_via_symlink");
    }
    for n in works {
        let r = by_name(&recs, n, &stderr);
        if r["ok"] != json!(true) {
            problems.push(format!("{n}: expected to work: {r}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nstderr:\n{stderr}",
        problems.join("\n")
    );
    assert_eq!(by_name(&recs, "allowed_path", &stderr)["reply"], "welcome");

    // Nothing arrived anywhere it must not.
    poll_until(Duration::from_secs(2), Duration::from_millis(50), || {
        w.allowed.conns() >= 2 && w.dgram_ok.conns() >= 1
    });
    assert!(
        w.names.lock().unwrap().is_empty(),
        "the fake resolver was asked {:?}",
        w.names.lock().unwrap()
    );
    for (what, s) in [
        ("proxy", &w.proxy),
        ("abstract daemon", &w.abstract_bad),
        ("datagram server", &w.dgram_bad),
    ] {
        assert_eq!(
            (s.conns(), s.bytes()),
            (0, 0),
            "{what} received {:?}",
            s.text()
        );
    }
    assert!(!w.abstract_ok.text().contains(secret));
    // (With BPF LSM the symlink alias reaches the allowed socket too.)
    let expect = if bpf_lsm_active() { 3 } else { 2 };
    assert_eq!(w.allowed.conns(), expect, "{}", w.allowed.text());
    assert!(w.allowed.text().contains("hello-allowed"));
    assert!(w.allowed.text().contains("hello-nul"));
    assert_eq!(w.abstract_ok.text(), "hello-abstract");
    assert_eq!(w.dgram_ok.text(), "hello-dgram");

    // The audit log says what was refused, where, and why.
    let resolver = decisions(&audit, "unix_connect", &w.path("resolve.varlink"));
    assert_eq!(resolver.len(), 1, "{audit:#?}");
    assert_eq!(resolver[0]["verdict"], "deny");
    assert_eq!(resolver[0]["rule"], "resolver-ipc");
    assert_eq!(resolver[0]["socket_kind"], "path");
    assert!(
        resolver[0]["detail"]
            .as_str()
            .unwrap()
            .contains("resolver IPC would bypass the DNS proxy"),
        "{}",
        resolver[0]
    );
    // (socket, records with the cgroup hooks, records with BPF LSM): the
    // cgroup hooks record the address as written; BPF LSM records the peer
    // socket's path (the relative alias is proxy.sock too), finds no peer
    // for an abstract name nobody listens on, and allows the symlink alias
    // of allowed.sock.
    let lsm = bpf_lsm_active();
    for (action, socket, kind, cgroup_hooks, with_lsm) in [
        ("unix_connect", w.path("proxy.sock"), "path", 1, 2),
        ("unix_connect", "proxy.sock".to_string(), "path", 1, 0),
        ("unix_connect", w.path("alias.sock"), "path", 1, 0),
        (
            "unix_connect",
            w.abstract_bad_name.clone(),
            "abstract",
            1,
            1,
        ),
        (
            "unix_connect",
            format!("{}\\x00x", w.abstract_ok_name),
            "abstract",
            1,
            0,
        ),
        // (BPF LSM judges a datagram connect in unix_may_send: a send.)
        ("unix_send", w.path("dgram-bad.sock"), "path", 1, 2),
        ("unix_connect", w.path("dgram-bad.sock"), "path", 1, 0),
    ] {
        let d = decisions(&audit, action, &socket);
        let expect = if lsm { with_lsm } else { cgroup_hooks };
        assert_eq!(d.len(), expect, "{action} {socket}: {audit:#?}");
        if d.is_empty() {
            continue;
        }
        assert_eq!(d[0]["verdict"], "deny", "{}", d[0]);
        assert_eq!(d[0]["rule"], "default-deny", "{}", d[0]);
        assert_eq!(d[0]["socket_kind"], kind, "{}", d[0]);
        assert_eq!(d[0]["identity"]["name"], "unix-agent");
    }
    for (action, socket, rule) in [
        ("unix_connect", w.path("allowed.sock"), "local[0]"),
        ("unix_connect", w.abstract_ok_name.clone(), "local[1]"),
        ("unix_send", w.path("dgram-ok.sock"), "local[2]"),
    ] {
        let d = decisions(&audit, action, &socket);
        assert!(!d.is_empty(), "{action} {socket}: {audit:#?}");
        assert!(d
            .iter()
            .all(|r| r["verdict"] == "allow" && r["rule"].as_str().unwrap().starts_with(rule)));
    }
    // The summary names the refusals.
    assert!(stderr.contains("resolver-ipc"), "{stderr}");
}

#[test]
fn audit_mode_records_and_allows() {
    if skip("audit_mode_records_and_allows") {
        return;
    }
    let w = World::new("unix-audit");
    let policy = w.policy("unix-audit", "audit");
    let (ok, recs, stderr, audit) = w.run(&policy, "audit-secret");
    assert!(ok, "enforcer run failed:\n{stderr}");
    // Audit mode: the would-be denials happen and are recorded.
    assert_eq!(by_name(&recs, "proxy", &stderr)["ok"], true, "{stderr}");
    poll_until(Duration::from_secs(2), Duration::from_millis(50), || {
        w.proxy.conns() >= 1
    });
    assert!(w.proxy.conns() >= 1);
    let d = decisions(&audit, "unix_connect", &w.path("proxy.sock"));
    // The cgroup hooks record the path as written (the relative alias is
    // another string); BPF LSM records the peer's path for both.
    let expect = if bpf_lsm_active() { 2 } else { 1 };
    assert_eq!(d.len(), expect, "{audit:#?}");
    assert!(d.iter().all(|r| r["verdict"] == "audit"), "{d:?}");
    let r = decisions(&audit, "unix_connect", &w.path("resolve.varlink"));
    assert_eq!(r.len(), 1, "{audit:#?}");
    assert_eq!(
        (&r[0]["verdict"], &r[0]["rule"]),
        (&json!("audit"), &json!("resolver-ipc"))
    );
}

#[test]
fn spec_local_cannot_list_a_resolver_socket() {
    if !require_root("spec_local_cannot_list_a_resolver_socket") {
        return;
    }
    let dir = TestDir::new("unix-resolver-listed");
    // The default list: refused by the validator (`policy check` too).
    let p = dir.join("p.yaml");
    std::fs::write(
        &p,
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: r\nspec:\n  \
         local:\n    - path: /run/systemd/resolve/io.systemd.Resolve\n",
    )
    .unwrap();
    let out = output_with_timeout(
        {
            let mut c = enforcer();
            c.args(["policy", "check"]).arg(&p);
            c
        },
        Duration::from_secs(30),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("p.yaml:7:13"), "{text}");
    assert!(
        text.contains("resolver IPC would bypass the DNS proxy"),
        "{text}"
    );
    // A configured resolver socket: refused by `enforcer run`.
    let sock = dir.join("resolve.varlink");
    let q = dir.join("q.yaml");
    std::fs::write(
        &q,
        format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: r\nspec:\n  \
             local:\n    - path: {}\n",
            sock.display()
        ),
    )
    .unwrap();
    let mut c = enforcer();
    c.args(["run", "--user", "65534:65534", "--policy"])
        .arg(&q)
        .arg("--resolver-socket")
        .arg(&sock)
        .args(["--", "/bin/true"])
        .current_dir(dir.path());
    let out = output_with_timeout(c, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("resolver IPC would bypass the DNS proxy"),
        "{err}"
    );
}

#[test]
fn daemon_enforces_spec_local_and_reports_the_capability() {
    if skip("daemon_enforces_spec_local_and_reports_the_capability") {
        return;
    }
    let cg = Cgroup::create("unix-daemon");
    let pins = PinDir::new("unix-daemon");
    let dir = TestDir::new("unix-daemon");
    let names = fake_resolved(&dir.join("resolve.varlink"));
    let proxy = path_sink(&dir.join("proxy.sock"), b"ok");
    let allowed = path_sink(&dir.join("allowed.sock"), b"ok");
    let name = "unix-daemon-agent";
    let d = {
        let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
        let cfg = std::fs::read_to_string(&d.config).unwrap();
        write_atomic(
            &d.config,
            &format!(
                "{cfg}resolverSockets: [{}]\n",
                dir.join("resolve.varlink").display()
            ),
        );
        write_atomic(
            &d.policies.join("p.yaml"),
            &format!(
                "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\n\
                 spec:\n  egress: []\n  local:\n    - path: {}\n",
                dir.join("allowed.sock").display()
            ),
        );
        d.start();
        d
    };
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || d
            .identity(name)
            .is_some()),
        "daemon did not install {name}: {}",
        d.stderr()
    );
    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    let path = |n: &str| dir.join(n).display().to_string();
    let unix = |p: &mut Probe, target: String| {
        p.cmd(json!({"op": "unix", "path": target, "data": "from-the-agent"}))
    };
    assert_ok(&unix(&mut p, path("allowed.sock")), "listed socket");
    assert_eperm(&unix(&mut p, path("proxy.sock")), "unlisted socket");
    assert_eperm(&unix(&mut p, path("resolve.varlink")), "resolver socket");
    p.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!((proxy.conns(), proxy.bytes()), (0, 0), "{}", proxy.text());
    assert!(names.lock().unwrap().is_empty());
    assert!(allowed.text().contains("from-the-agent"));

    let st = d.status();
    assert_eq!(
        st["capabilities"]["unix_sockets"]["available"], true,
        "{st:#}"
    );
    let body = d.scrape();
    assert_eq!(
        metric(&body, "enforcer_capability", &[("name", "unix_sockets")]),
        Some(1.0),
        "{body}"
    );
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            metric(
                &d.scrape(),
                "enforcer_decisions_total",
                &[
                    ("identity", name),
                    ("action", "unix_connect"),
                    ("verdict", "deny"),
                ],
            ) == Some(2.0)
        }),
        "{}",
        d.scrape()
    );
    let audit = read_jsonl(&d.audit);
    let r: Vec<&Value> = audit
        .iter()
        .filter(|r| r["action"] == "unix_connect" && r["rule"] == "resolver-ipc")
        .collect();
    assert_eq!(r.len(), 1, "{audit:#?}");
    assert_eq!(r[0]["identity"]["name"], name);
    assert_eq!(r[0]["socket"], path("resolve.varlink"));
}
