//! `enforcer daemon`: fail closed, CAP_NET_RAW holders, reload, restart.
//!
//! Each test owns its cgroups (`<cgroup2>/enforcer-test-<pid>-<name>`), its
//! pin dir (`/sys/fs/bpf/enforcer-test-<pid>-<name>`), control socket,
//! metrics port and listeners. Guards are declared so that drop order is:
//! probes and daemon first, then pins, then cgroups.
use std::{path::Path, time::Duration};

use enforcer_tests::*;

fn spiffe(name: &str) -> String {
    format!("spiffe://example.org/ns/tests/sa/{name}")
}

fn write_policy(d: &Daemon, file: &str, name: &str, allow_tcp_port: u16) {
    write_atomic(
        &d.policies.join(file),
        &policy_yaml(
            name,
            &spiffe(name),
            "enforce",
            &[("127.0.0.1/32", &[allow_tcp_port], "tcp")],
        ),
    );
}

fn cgroup_listed(st: &Value, identity: &str, cg: &Path) -> bool {
    st["identities"].as_array().into_iter().flatten().any(|i| {
        i["name"] == identity
            && i["cgroups"].as_array().into_iter().flatten().any(|c| {
                c["path"]
                    .as_str()
                    .map(|p| Path::new(p) == cg)
                    .unwrap_or(false)
            })
    })
}

/// Scenario 5: a bound cgroup whose policy does not exist denies everything.
#[test]
fn missing_policy_fails_closed() {
    if !require_root("missing_policy_fails_closed") {
        return;
    }
    let cg = Cgroup::create("fail-closed");
    let pins = PinDir::new("fail-closed");
    let dir = TestDir::new("fail-closed");
    let api = SinkPair::bind("127.0.0.1");
    let outside = SinkPair::bind("127.0.0.2");
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, "no-such-policy")]);
    // Another, valid policy exists (allowing the very port we will try): it must
    // not leak into the unbound cgroup.
    write_policy(&d, "other.yaml", "other-agent", api.port());
    d.start();

    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    assert_eperm(
        &p.tcp("127.0.0.1", api.port(), "fail-closed"),
        "tcp to 127.0.0.1 from a fail-closed cgroup",
    );
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "fail-closed"),
        "tcp to 127.0.0.2",
    );
    assert_eperm(
        &p.udp("127.0.0.1", api.port(), "fail-closed"),
        "udp to 127.0.0.1",
    );
    assert_eperm(
        &p.udp("127.0.0.2", outside.port(), "fail-closed"),
        "udp to 127.0.0.2",
    );
    assert_eperm(&p.tcp("::1", api.port(), "fail-closed"), "tcp to ::1");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        api.total_bytes() + api.tcp.conns() + api.udp.datagrams(),
        0,
        "{}",
        api.describe()
    );
    assert_eq!(
        outside.total_bytes() + outside.tcp.conns() + outside.udp.datagrams(),
        0,
        "{}",
        outside.describe()
    );

    let st = d.status();
    let fc = st["fail_closed_cgroups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        fc.iter().any(|c| c
            .as_str()
            .map(|s| s.contains(cg.path.to_str().unwrap()))
            .unwrap_or(false)),
        "status must list {} as failing closed: {st:#}",
        cg.path.display()
    );
    // The denials are audited as no-policy.
    let ok = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        read_jsonl(&d.audit).iter().any(|r| {
            r["action"] == "connect"
                && r["verdict"] == "deny"
                && r["rule"] == "no-policy"
                && r["port"] == api.port()
        })
    });
    assert!(
        ok,
        "no no-policy deny record in {}:\n{}",
        d.audit.display(),
        std::fs::read_to_string(&d.audit).unwrap_or_default()
    );
    p.kill();
    d.kill9();
}

/// A binding moved to another policy (config + SIGHUP) applies to the
/// processes already running in the cgroup: the programs' per-CPU identity
/// cache (`IDENTITY_CACHE`) must not keep the old slot.
#[test]
fn moving_a_binding_applies_to_running_processes() {
    if !require_root("moving_a_binding_applies_to_running_processes") {
        return;
    }
    let cg = Cgroup::create("rebind");
    let pins = PinDir::new("rebind");
    let dir = TestDir::new("rebind");
    let a = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, "rebind-a")]);
    write_policy(&d, "a.yaml", "rebind-a", a.port());
    write_policy(&d, "b.yaml", "rebind-b", b.port());
    d.start();

    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    // Warm every CPU's cache with the first binding.
    for i in 0..20 {
        assert_ok(
            &p.tcp("127.0.0.1", a.port(), "a"),
            &format!("policy a: A ({i})"),
        );
    }
    assert_eperm(&p.tcp("127.0.0.1", b.port(), "b"), "policy a: B");

    d.write_config(&[(&cg.path, "rebind-b")]);
    d.signal(libc::SIGHUP);
    let moved = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        cgroup_listed(&d.status(), "rebind-b", &cg.path)
    });
    assert!(moved, "binding not moved: {:#}", d.status());
    let conns = a.conns();
    for i in 0..20 {
        assert_eperm(
            &p.tcp("127.0.0.1", a.port(), "a-after"),
            &format!("policy b: A ({i})"),
        );
        assert_ok(
            &p.tcp("127.0.0.1", b.port(), "b"),
            &format!("policy b: B ({i})"),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.conns(), conns, "connections to A after the move");
    p.kill();
    d.kill9();
}

/// Scenario 6: a full-capability root process in a bound cgroup.
///
/// Raw IP sockets are refused by the hook whatever the capabilities. Packet
/// sockets never reach `cgroup/sock_create` (the kernel runs it from
/// inet_create/inet6_create only), so for a CAP_NET_RAW holder the daemon's
/// guarantee is detection: it must report the process in `enforcer status`
/// and in `enforcer_net_raw_processes`.
#[test]
fn root_with_cap_net_raw_is_contained() {
    if !require_root("root_with_cap_net_raw_is_contained") {
        return;
    }
    let cg = Cgroup::create("capnetraw");
    let pins = PinDir::new("capnetraw");
    let dir = TestDir::new("capnetraw");
    let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let outside = SinkPair::bind("127.0.0.3");
    let outside6 = SinkPair::bind("::1");
    let name = "capnetraw-agent";
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_policy(&d, "p.yaml", name, api.port());
    d.start();

    // Control: outside any bound cgroup this process can open raw and packet
    // sockets, so a denial inside is the hook's doing, not a missing capability.
    let mut control = Probe::spawn(&dir);
    assert_ok(
        &control.op("raw"),
        "raw socket outside the cgroup (control)",
    );
    assert_ok(
        &control.op("packet"),
        "packet socket outside the cgroup (control)",
    );
    control.kill();

    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    let mut failures = Vec::new();
    for op in ["raw", "raw6", "ping"] {
        let v = p.op(op);
        let errno_ok = v["errno"].as_i64() == Some(EPERM)
            // ping_group_range may refuse a ping socket (EACCES) before any hook.
            || (op == "ping" && v["errno"].as_i64() == Some(EACCES));
        if v["ok"] == true || !errno_ok {
            failures.push(format!(
                "{op} socket in the bound cgroup: expected EPERM, got {v}"
            ));
        }
    }
    let allowed = p.tcp("127.0.0.1", api.port(), "capnetraw-allowed");
    if allowed["ok"] != true {
        failures.push(format!("allowed connect failed: {allowed}"));
    }
    let denied = p.tcp("127.0.0.3", outside.port(), "capnetraw-denied");
    if denied["ok"] != false || denied["errno"].as_i64() != Some(EPERM) {
        failures.push(format!("denied connect: {denied}"));
    }
    // A CAP_NET_RAW holder in a bound cgroup is reported (its packet sockets
    // cannot be refused by cgroup hooks on this kernel).
    let pid = p.pid.to_string();
    let reported = poll_until(Duration::from_secs(8), Duration::from_millis(200), || {
        d.status()["net_raw_processes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .any(|x| x.as_str().unwrap_or("").contains(&format!("pid {pid} ")))
            })
            .unwrap_or(false)
    });
    if !reported {
        failures.push(format!(
            "CAP_NET_RAW holder {pid} not reported in status: {}",
            d.status()
        ));
    }
    let gauge = metric(
        &d.scrape(),
        "enforcer_net_raw_processes",
        &[("identity", name)],
    );
    if gauge.unwrap_or(0.0) < 1.0 {
        failures.push(format!(
            "enforcer_net_raw_processes{{identity={name}}} = {gauge:?}, expected >= 1"
        ));
    }
    let denied_udp = p.udp("127.0.0.3", outside.port(), "capnetraw-denied");
    if denied_udp["ok"] != false || denied_udp["errno"].as_i64() != Some(EPERM) {
        failures.push(format!("denied udp: {denied_udp}"));
    }

    // A nested cgroup of the bound one is enforced too.
    let nested = cg.child("nested");
    let mut n = Probe::spawn(&dir);
    move_pid(&nested, n.pid);
    let v = n.tcp("127.0.0.3", outside.port(), "nested-denied");
    if v["ok"] != false || v["errno"].as_i64() != Some(EPERM) {
        failures.push(format!("nested cgroup: denied connect: {v}"));
    }
    let v = n.op("raw");
    if v["ok"] != false || v["errno"].as_i64() != Some(EPERM) {
        failures.push(format!("nested cgroup: raw socket: {v}"));
    }
    let v = n.tcp("127.0.0.1", api.port(), "nested-allowed");
    if v["ok"] != true {
        failures.push(format!("nested cgroup: allowed connect: {v}"));
    }

    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        api.text().contains("capnetraw-allowed") && api.text().contains("nested-allowed")
    });
    if !(api.text().contains("capnetraw-allowed") && api.text().contains("nested-allowed")) {
        failures.push(format!("allowed bytes did not arrive: {:?}", api.text()));
    }
    std::thread::sleep(Duration::from_millis(300));
    for o in [&outside, &outside6] {
        if o.total_bytes() + o.tcp.conns() + o.udp.datagrams() != 0 {
            failures.push(format!("traffic leaked: {}", o.describe()));
        }
    }
    // The raw-socket denial is audited with the identity.
    let ok = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        read_jsonl(&d.audit).iter().any(|r| {
            r["action"] == "sock_create"
                && r["verdict"] == "deny"
                && r["rule"] == "raw-socket"
                && r["identity"]["name"] == name
        })
    });
    if !ok {
        failures.push(format!(
            "no sock_create raw-socket deny record:\n{}",
            std::fs::read_to_string(&d.audit).unwrap_or_default()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    n.kill();
    p.kill();
    d.kill9();
}

/// Scenario 7: file-change reload, rejected invalid policy, SIGHUP.
#[test]
fn daemon_reloads_and_rejects_invalid_policy() {
    if !require_root("daemon_reloads_and_rejects_invalid_policy") {
        return;
    }
    let cg = Cgroup::create("reload");
    let cg2 = Cgroup::create("reload-hup");
    let pins = PinDir::new("reload");
    let dir = TestDir::new("reload");
    let a = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let name = "reload-agent";
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_policy(&d, "agent.yaml", name, a.port());
    d.start();

    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    assert_ok(
        &p.tcp("127.0.0.1", a.port(), "A1"),
        "port A under the first policy",
    );
    assert_eperm(
        &p.tcp("127.0.0.1", b.port(), "B1"),
        "port B under the first policy",
    );

    // 1. The file changes: B allowed, A denied, within a few seconds.
    write_policy(&d, "agent.yaml", name, b.port());
    let mut last = (Value::Null, Value::Null);
    let switched = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let vb = p.tcp("127.0.0.1", b.port(), "B2");
        let va = p.tcp("127.0.0.1", a.port(), "A2");
        let done = vb["ok"] == true && va["errno"].as_i64() == Some(EPERM);
        last = (vb, va);
        done
    });
    assert!(
        switched,
        "policy file change not applied within 10 s: B {} A {}\n{}",
        last.0,
        last.1,
        d.stderr()
    );

    // 2. An invalid policy is rejected; B stays in force.
    std::fs::write(
        d.policies.join("agent.yaml"),
        format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  \
             egress:\n    - cidr: 127.0.0.1/32\n      ports: [{}]\n      bogusField: 1\n",
            a.port()
        ),
    )
    .unwrap();
    let mut st = Value::Null;
    let rejected = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        st = d.status();
        st["rejected"]
            .as_array()
            .map(|r| !r.is_empty())
            .unwrap_or(false)
    });
    assert!(rejected, "invalid policy not reported as rejected: {st:#}");
    let rej = st["rejected"][0].to_string();
    assert!(
        rej.contains("agent.yaml"),
        "rejection must name the file: {rej}"
    );
    let re_ok = {
        // file:line:column, e.g. ".../agent.yaml:9:7"
        let s = rej.as_str();
        s.match_indices("agent.yaml:").any(|(i, m)| {
            let rest = &s[i + m.len()..];
            let line: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            let after = &rest[line.len()..];
            !line.is_empty()
                && after.starts_with(':')
                && after[1..].starts_with(|c: char| c.is_ascii_digit())
        })
    };
    assert!(re_ok, "rejection must give file:line:column: {rej}");
    assert!(
        rej.contains("bogusField"),
        "rejection must name the field: {rej}"
    );
    // Still B, not A (the invalid file wanted A).
    std::thread::sleep(Duration::from_millis(500));
    assert_ok(
        &p.tcp("127.0.0.1", b.port(), "B3"),
        "port B after a rejected reload",
    );
    assert_eperm(
        &p.tcp("127.0.0.1", a.port(), "A3"),
        "port A after a rejected reload",
    );
    let body = d.scrape();
    assert!(
        metric(
            &body,
            "enforcer_policy_reloads_total",
            &[("result", "rejected")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{body}"
    );
    assert!(
        metric(&body, "enforcer_policy_reloads_total", &[("result", "ok")]).unwrap_or(0.0) >= 1.0,
        "{body}"
    );

    // 3. SIGHUP re-reads the config: a new binding appears only through it
    //    (the config file is not watched).
    d.write_config(&[(&cg.path, name), (&cg2.path, name)]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !cgroup_listed(&d.status(), name, &cg2.path),
        "binding applied without SIGHUP?"
    );
    d.signal(libc::SIGHUP);
    let mut st = Value::Null;
    let hup = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        st = d.status();
        cgroup_listed(&st, name, &cg2.path)
    });
    assert!(hup, "SIGHUP did not reload the config: {st:#}");
    let mut q = Probe::spawn(&dir);
    move_pid(&cg2.path, q.pid);
    assert_eperm(
        &q.tcp("127.0.0.1", a.port(), "hup-A"),
        "new binding after SIGHUP: A",
    );
    assert_ok(
        &q.tcp("127.0.0.1", b.port(), "hup-B"),
        "new binding after SIGHUP: B",
    );

    // 4. Fixing the file clears the rejection and applies it.
    write_policy(&d, "agent.yaml", name, a.port());
    let fixed = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let st = d.status();
        st["rejected"]
            .as_array()
            .map(|r| r.is_empty())
            .unwrap_or(false)
            && p.tcp("127.0.0.1", a.port(), "A4")["ok"] == true
    });
    assert!(fixed, "fixed policy not applied: {:#}", d.status());
    q.kill();
    p.kill();
    d.kill9();
}

/// Issue 15: a policy file rewritten while the daemon starts (after its
/// first read of the policies dir, before it is ready: seconds with many
/// bindings) is applied once the daemon is up, without a SIGHUP or another
/// file event. The daemon used to create its directory watcher only after
/// the first reload and the bindings: such a change was missed, silently.
#[test]
fn a_policy_changed_while_the_daemon_starts_is_applied() {
    if !require_root("a_policy_changed_while_the_daemon_starts_is_applied") {
        return;
    }
    // Many bindings, each with its own policy: installing and binding them
    // all keeps the daemon starting for a while after its first read.
    const N: usize = 20;
    let cgs: Vec<Cgroup> = (0..N)
        .map(|i| Cgroup::create(&format!("startup-{i:02}")))
        .collect();
    let pins = PinDir::new("startup");
    let dir = TestDir::new("startup");
    let a = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let names: Vec<String> = (0..N).map(|i| format!("startup-{i:02}")).collect();
    let bindings: Vec<(&Path, &str)> = cgs
        .iter()
        .zip(&names)
        .map(|(c, n)| (c.path.as_path(), n.as_str()))
        .collect();
    let mut d = Daemon::configure(&dir, &pins, &bindings);
    for n in &names {
        write_policy(&d, &format!("{n}.yaml"), n, a.port());
    }
    // The probe is in its cgroup before the daemon binds it.
    let name = names[0].as_str();
    let mut p = Probe::spawn(&dir);
    move_pid(&cgs[0].path, p.pid);

    d.spawn();
    // The first "policy installed" line: the daemon has read every policy
    // file (it reads the directory, then installs).
    let first_install = poll_until(Duration::from_secs(180), Duration::from_millis(2), || {
        d.stderr().contains("policy installed")
    });
    assert!(
        first_install,
        "no \"policy installed\" in the daemon's log; stderr:\n{}",
        d.stderr()
    );
    write_policy(&d, &format!("{name}.yaml"), name, b.port());
    // The control socket is bound just before "ready": the change came
    // while the daemon was still starting (else this test proves nothing).
    let during_startup = !d.socket.exists();
    let rewritten = std::time::Instant::now();
    d.wait_ready();
    eprintln!(
        "policy rewritten {:?} before \"ready\"",
        rewritten.elapsed()
    );
    assert!(
        during_startup,
        "the policy was rewritten only after the daemon had started: the start-up \
         window was not exercised; stderr:\n{}",
        d.stderr()
    );

    // What the first reload installed for `name` (the old file).
    let stderr = d.stderr();
    let old_hash = stderr
        .lines()
        .find(|l| l.contains("policy installed") && l.contains(&format!("policy={name} ")))
        .and_then(|l| l.split("hash=").nth(1))
        .and_then(|h| h.split_whitespace().next())
        .unwrap_or_else(|| {
            panic!("no \"policy installed\" line with the hash of {name}:\n{stderr}")
        })
        .to_string();

    // The new file is in force: B allowed, A denied, the status's hash moved.
    let mut last = (Value::Null, Value::Null, Value::Null);
    let applied = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let vb = p.tcp("127.0.0.1", b.port(), "B");
        let va = p.tcp("127.0.0.1", a.port(), "A");
        let hash = d
            .identity(name)
            .map(|i| i["policy_hash"].clone())
            .unwrap_or(Value::Null);
        let done = vb["ok"] == true
            && va["errno"].as_i64() == Some(EPERM)
            && hash.as_str().is_some_and(|h| h != old_hash);
        last = (vb, va, hash);
        done
    });
    assert!(
        applied,
        "a policy rewritten while the daemon started was not applied within 10 s of \
         \"ready\": port B (new) {}, port A (old) {}, policy_hash {} (first installed: {old_hash})\n\
         status: {:#}\nstderr:\n{}",
        last.0,
        last.1,
        last.2,
        d.status(),
        d.stderr()
    );
    p.kill();
    d.kill9();
}

fn count_pins(dir: &Path) -> usize {
    fn walk(p: &Path, n: &mut usize) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), n);
                } else {
                    *n += 1;
                }
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

/// Scenario 8: kill -9 the daemon; pinned programs keep enforcing; a new
/// daemon adopts them.
#[test]
fn daemon_restart_keeps_enforcing() {
    if !require_root("daemon_restart_keeps_enforcing") {
        return;
    }
    let cg = Cgroup::create("restart");
    let pins = PinDir::new("restart");
    let dir = TestDir::new("restart");
    let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let outside = SinkPair::bind("127.0.0.2");
    let name = "restart-agent";
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_policy(&d, "p.yaml", name, api.port());
    d.start();

    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    assert_ok(
        &p.tcp("127.0.0.1", api.port(), "before"),
        "allowed before the restart",
    );
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "before"),
        "denied before the restart",
    );
    let links_before = count_pins(&pins.path.join("links"));
    assert!(
        links_before > 0,
        "no links pinned under {}",
        pins.path.display()
    );

    d.kill9();
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "down"),
        "denied while the daemon is dead",
    );
    assert_eperm(
        &p.udp("127.0.0.2", outside.port(), "down"),
        "udp denied while the daemon is dead",
    );
    assert_ok(
        &p.tcp("127.0.0.1", api.port(), "down"),
        "allowed while the daemon is dead",
    );
    assert_eperm(&p.op("raw"), "raw socket while the daemon is dead");
    // A process that enters the cgroup while the daemon is down is enforced too.
    let mut late = Probe::spawn(&dir);
    move_pid(&cg.path, late.pid);
    assert_eperm(
        &late.tcp("127.0.0.2", outside.port(), "late"),
        "late joiner while the daemon is dead",
    );

    std::thread::sleep(Duration::from_secs(2));
    d.start();
    let st = d.status();
    assert!(
        cgroup_listed(&st, name, &cg.path),
        "restarted daemon does not list the cgroup: {st:#}"
    );
    // The restart reports the gap: a start record that says the previous
    // daemon died and for how long the node had none.
    let starts: Vec<Value> = read_jsonl(&d.audit)
        .into_iter()
        .filter(|r| r["action"] == "start")
        .collect();
    let last = starts.last().expect("start records");
    let detail = last["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("died without stopping") && detail.contains("s without a daemon"),
        "the restart did not report the gap: {last}"
    );
    let secs: u64 = detail
        .split(" s without a daemon")
        .next()
        .and_then(|h| h.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        secs >= 2,
        "gap of {secs} s, the daemon was down >= 2 s: {detail}"
    );
    assert_eq!(
        count_pins(&pins.path.join("links")),
        links_before,
        "restarted daemon changed the number of pinned links (double attach?)"
    );
    // The same build adopts its own links (their programs' tags match the
    // ones it loaded); it replaces only another build's.
    let log = d.stderr();
    assert!(
        log.contains("adopted pinned links") && !log.contains("another enforcer build"),
        "the restarted daemon did not adopt its own links:\n{log}"
    );
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "after"),
        "denied after the restart",
    );
    assert_ok(
        &p.tcp("127.0.0.1", api.port(), "after"),
        "allowed after the restart",
    );
    let body = d.scrape();
    assert_eq!(
        metric(&body, "enforcer_attached_cgroups", &[]),
        Some(1.0),
        "{body}"
    );

    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        api.text().matches("after").count() >= 1
    });
    assert!(
        api.text().contains("before")
            && api.text().contains("down")
            && api.text().contains("after"),
        "{:?}",
        api.text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outside.total_bytes() + outside.tcp.conns() + outside.udp.datagrams(),
        0,
        "{}",
        outside.describe()
    );
    late.kill();
    p.kill();
    d.kill9();
}

/// Pin a new map at `path` with `bpftool map create`.
fn bpftool_map_create(path: &Path, kind: &str, key: u64, value: u64, entries: u64, name: &str) {
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args(["type", kind])
        .args(["key", &key.to_string(), "value", &value.to_string()])
        .args(["entries", &entries.to_string(), "name", name])
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An upgrade whose maps changed shape: a pinned map of another build (here
/// `FLOW_WAYS` with a value 8 bytes shorter, as before the flow cache's
/// `hits` word; and `ALLOW_HITS` of another type with the same sizes, as
/// `DNS_ORIG` changed from an LRU hash to socket storage) is replaced,
/// loudly, instead of being reused under programs that would read past its
/// values or that the verifier refuses; the daemon then enforces.
#[test]
fn a_pinned_map_of_another_build_is_replaced() {
    if !require_root("a_pinned_map_of_another_build_is_replaced") {
        return;
    }
    let cg = Cgroup::create("repin");
    let pins = PinDir::new("repin");
    let dir = TestDir::new("repin");
    let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let outside = SinkPair::bind("127.0.0.2");
    let name = "repin-agent";
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_policy(&d, "p.yaml", name, api.port());
    d.start();
    d.kill9();
    let ways = pins.path.join("maps").join("FLOW_WAYS");
    assert!(ways.exists(), "no pinned {}", ways.display());
    std::fs::remove_file(&ways).unwrap();
    bpftool_map_create(&ways, "percpu_array", 4, 104, 64, "FLOW_WAYS");
    // Same key, value and entries, another type (array -> percpu_array).
    let hits = pins.path.join("maps").join("ALLOW_HITS");
    let show = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&hits)
        .output()
        .expect("running bpftool");
    let info: Value = serde_json::from_slice(&show.stdout).expect("bpftool map show -j");
    assert_eq!(info["type"], "array", "{info}");
    std::fs::remove_file(&hits).unwrap();
    let size = |k: &str| info[k].as_u64().expect("bpftool map show: sizes");
    bpftool_map_create(
        &hits,
        "percpu_array",
        size("bytes_key"),
        size("bytes_value"),
        size("max_entries"),
        "ALLOW_HITS",
    );
    d.start();
    let log = d.stderr();
    assert!(
        log.contains("FLOW_WAYS was made by another enforcer build (value size 104 != 112)"),
        "the old pin was not reported and replaced:\n{log}"
    );
    assert!(
        log.contains("ALLOW_HITS was made by another enforcer build (map type 6 != 2)"),
        "the pin of another type was not reported and replaced:\n{log}"
    );
    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    assert_ok(
        &p.tcp("127.0.0.1", api.port(), "ok"),
        "allowed after the upgrade",
    );
    assert_eperm(
        &p.tcp("127.0.0.2", outside.port(), "no"),
        "denied after the upgrade",
    );
    assert_eperm(
        &p.udp("127.0.0.2", outside.port(), "no"),
        "udp denied after the upgrade",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outside.total_bytes() + outside.tcp.conns() + outside.udp.datagrams(),
        0,
        "{}",
        outside.describe()
    );
    p.kill();
    d.kill9();
}

/// The event ring buffer overflows while nothing reads it (the daemon is
/// stopped with SIGSTOP): every verdict is still given at once, the events
/// that did not fit are counted in the kernel and reported once the daemon
/// runs again (`enforcer_events_lost_total`, `enforcer status`), the
/// per-identity decision counters (kernel counters, not events) miss
/// nothing, and zero bytes get out.
#[test]
fn ring_buffer_overflow_is_counted_and_never_delays_a_verdict() {
    if !require_root("ring_buffer_overflow_is_counted_and_never_delays_a_verdict") {
        return;
    }
    let cg = Cgroup::create("overflow");
    let pins = PinDir::new("overflow");
    let dir = TestDir::new("overflow");
    let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let outside = UdpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let name = "overflow-agent";
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_policy(&d, "p.yaml", name, api.port());
    d.start();
    let lost = |d: &Daemon| metric(&d.scrape(), "enforcer_events_lost_total", &[]);
    assert_eq!(lost(&d), Some(0.0));

    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    // The ring holds 1 MiB: about 12,000 events of this size.
    let n: u64 = 40_000;
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGSTOP) }, 0);
    let r = p.cmd(serde_json::json!({
        "op": "udp_many", "host": "127.0.0.2", "port": outside.port(), "count": n
    }));
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGCONT) }, 0);
    assert_eq!(r["eperm"], n, "every sendto refused at once: {r}");
    assert_eq!(r["sent"], 0, "{r}");

    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
            lost(&d).unwrap_or(0.0) >= (n / 2) as f64
        }),
        "lost events not counted: {:?}",
        lost(&d)
    );
    let st = d.status();
    assert!(
        st["events_lost"].as_u64().unwrap_or(0) >= n / 2,
        "status: {}",
        st["events_lost"]
    );
    let denied = metric(
        &d.scrape(),
        "enforcer_decisions_total",
        &[
            ("identity", name),
            ("action", "sendmsg"),
            ("verdict", "deny"),
        ],
    );
    assert!(
        denied.unwrap_or(0.0) >= n as f64,
        "kernel counters count every verdict: {denied:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(outside.bytes() + outside.datagrams(), 0, "zero bytes out");
}

/// The kernel answers a repeated allowed flow from its flow cache without
/// a table lookup (`report::repeat_allow`). A reload that denies the flow
/// must stop it at once, not when the cache's epoch turns: an agent keeps
/// sending datagrams on one socket as fast as it can while the policy
/// changes under it; once another process of the identity sees the new
/// policy, at most what was already queued at the listener arrives.
#[test]
fn a_cached_flow_is_cut_by_a_reload() {
    if !require_root("a_cached_flow_is_cut_by_a_reload") {
        return;
    }
    let cg = Cgroup::create("cached-flow");
    let pins = PinDir::new("cached-flow");
    let dir = TestDir::new("cached-flow");
    let sink = UdpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let other = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let name = "cached-flow-agent";
    let (udp_port, tcp_port) = ([sink.port()], [other.port()]);
    let policy = |udp: bool| {
        let mut rules: Vec<(&str, &[u16], &str)> = vec![("127.0.0.1/32", &tcp_port, "tcp")];
        if udp {
            rules.push(("127.0.0.1/32", &udp_port, "udp"));
        }
        policy_yaml(name, &spiffe(name), "enforce", &rules)
    };
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, name)]);
    write_atomic(&d.policies.join("agent.yaml"), &policy(true));
    d.start();

    // The sender: one unconnected UDP socket (made once the process is in
    // the cgroup: a socket is judged by its creator's cgroup), sendto in a
    // loop (errors ignored), until killed.
    let script = dir.join("sender.py");
    std::fs::write(
        &script,
        format!(
            "import socket, sys\nprint('ready', flush=True)\nsys.stdin.readline()\n\
             u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             while True:\n    try:\n        u.sendto(b'x' * 16, ('127.0.0.1', {}))\n    \
             except OSError:\n        pass\n",
            sink.port()
        ),
    )
    .unwrap();
    let mut c = std::process::Command::new(python());
    c.arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut sender = ChildGuard::new(c.spawn().unwrap());
    let mut out = std::io::BufReader::new(sender.child().stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    move_pid(&cg.path, sender.id());
    let mut go = sender.child().stdin.take().unwrap();
    std::io::Write::write_all(&mut go, b"go\n").unwrap();
    let flowing = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        sink.datagrams() > 10_000
    });
    assert!(
        flowing,
        "the allowed flow did not flow: {} datagrams\n{}",
        sink.datagrams(),
        d.stderr()
    );

    // Deny the flow (the TCP rule stays: the probe's marker).
    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    write_atomic(&d.policies.join("agent.yaml"), &policy(false));
    let mut last = Value::Null;
    let switched = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        last = p.udp("127.0.0.1", sink.port(), "probe");
        last["errno"].as_i64() == Some(EPERM)
    });
    assert!(switched, "reload not applied: {last}\n{}", d.stderr());
    let at_switch = sink.datagrams();
    std::thread::sleep(Duration::from_millis(1500));
    let after = sink.datagrams() - at_switch;
    // A stale way would let the sender through until the epoch turned
    // (up to a second: tens of thousands of datagrams). What may still
    // arrive is what sat in the listener's receive queue (a few hundred).
    assert!(
        after <= 400,
        "{after} datagrams arrived after the reload denied the flow"
    );
    assert_ok(
        &p.tcp("127.0.0.1", other.port(), "still"),
        "the rule the reload kept",
    );
    sender.kill9();
    p.kill();
    d.kill9();
}
