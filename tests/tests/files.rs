//! File policy (BPF LSM), the taint clamp, and the daemon's BPF LSM
//! refusal of agents' packet sockets, on a real kernel.
//!
//! These tests need a kernel that accepts BPF LSM programs. The host kernel
//! of these machines refuses them, so the tests are `#[ignore]`d in the
//! host run and `cargo xtask test` runs them inside the VM runner
//! (`cargo xtask vm-test -- <this test binary> --ignored`), where they must
//! pass: they assert that BPF LSM is there instead of skipping.
//!
//! The hostile agent (`tests/agents/file_agent.py`) runs under `enforcer
//! run` and tries every way in to a protected file; whatever it manages to
//! read it then sends to a loopback listener that the policy allows, so the
//! listener proves that no protected byte left.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use enforcer_tests::*;
use serde_json::Value;

const SECRET: &str = "SECRET-ID-RSA-7f3a";
const DEEP: &str = "SECRET-DEEP-91c2";
const LATER: &str = "SECRET-LATER-5d0e";
const TOKEN: &str = "TAINT-TOKEN-4b1f";

fn require_bpf_lsm() {
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    assert!(
        lsm.split(',').any(|m| m.trim() == "bpf"),
        "these tests need BPF LSM (run them with `cargo xtask vm-test`); this kernel's LSMs: {lsm}"
    );
}

/// The agent script, copied into `dir`: the agent sees its working
/// directory, not the checkout (which may itself lie under the private /tmp).
fn file_agent(dir: &Path) -> PathBuf {
    let dst = dir.join("file_agent.py");
    if !dst.exists() {
        std::fs::copy(agents_dir().join("file_agent.py"), &dst).unwrap();
    }
    dst
}

/// `enforcer run --policy P --audit-log A -- python3 file_agent.py --json VECTORS`
/// in the background; returns the child and its output collector.
fn spawn_run(policy: &Path, audit: &Path, vectors: &[String]) -> (ChildGuard, OutputThreads) {
    let mut c = Command::new(enforcer_bin());
    // uid 0 (explicit --user root), working directory = the test's
    // directory, so that its files are in the agent's view (/tmp and
    // /dev/shm are private to the agent otherwise).
    c.arg("run")
        .args(["--user", "root"])
        .arg("--policy")
        .arg(policy)
        .arg("--audit-log")
        .arg(audit)
        .current_dir(policy.parent().expect("policy in a directory"))
        .arg("--")
        .arg(python())
        .arg(file_agent(policy.parent().expect("policy in a directory")))
        .arg("--json")
        .args(vectors)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut g = ChildGuard::new(c.spawn().expect("spawning enforcer run"));
    let t = OutputThreads::take(g.child());
    (g, t)
}

/// The agent's JSON result object (the last JSON line of its stdout).
fn results(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON from the agent; stdout:\n{text}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn assert_denied(r: &Value, key: &str) {
    let v = &r[key];
    assert_eq!(v["ok"], false, "{key} must be refused: {v}");
    let e = v["errno"].as_str().unwrap_or("");
    assert!(
        e == "EPERM" || e == "EACCES",
        "{key}: refused by the policy (EPERM/EACCES), got {v}"
    );
}

fn assert_read(r: &Value, key: &str, content: &str) {
    let v = &r[key];
    assert_eq!(v["ok"], true, "{key} must open: {v}");
    assert!(
        v["data"].as_str().unwrap_or("").contains(content),
        "{key} read the wrong data: {v}"
    );
}

fn write(path: &Path, s: &str) {
    std::fs::write(path, s).unwrap();
}

/// Every evasion class against `deny` rules, on one filesystem (`root`).
fn evasion_on(root: &Path, label: &str) {
    let ssh = root.join("ssh");
    std::fs::create_dir_all(ssh.join("sub")).unwrap();
    std::fs::create_dir_all(root.join("work")).unwrap();
    write(&ssh.join("id_rsa"), SECRET);
    write(&ssh.join("sub/deep"), DEEP);
    write(&root.join("public.txt"), "PUBLIC-DATA");
    write(&root.join("notes.txt"), "NOTES-DATA");
    // Made before the policy: a hard link outside the tree and a symlink.
    std::fs::hard_link(ssh.join("id_rsa"), root.join("prelink")).unwrap();
    // (relative: it resolves once the test renames ssh/ to keys/ below)
    std::os::unix::fs::symlink("keys/id_rsa", root.join("symlink")).unwrap();
    // A bind mount of the protected directory, made before the policy.
    let bind = root.join("bindmnt");
    std::fs::create_dir_all(&bind).unwrap();
    let st = Command::new("mount")
        .arg("--bind")
        .arg(&ssh)
        .arg(&bind)
        .status()
        .unwrap();
    assert!(st.success(), "mount --bind");
    let sink = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let policy = root.join("policy.yaml");
    write(
        &policy,
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: files-{label}\n\
             spec:\n  egress:\n    - cidr: 127.0.0.1/32\n      ports: [{}]\n      protocol: tcp\n  \
             files:\n    - path: {}\n      access: deny\n    - path: {}\n      access: audit\n",
            sink.port(),
            ssh.display(),
            root.join("notes.txt").display()
        ),
    );
    let audit = root.join("audit.jsonl");
    // After the agent says it is running (the policy is in force), the
    // test renames the protected directory and a file in it, and creates a
    // new file inside: the agent then only knows the new names.
    let keys = root.join("keys");
    let p = |s: &str| root.join(s).display().to_string();
    let vectors: Vec<String> = vec![
        format!("create={}", p("ready")),
        format!("wait={}", p("go")),
        format!("open={}", p("keys/id_rsa")),
        format!("open={}", p("keys/sub/deep2")),
        format!("open={}", p("keys/later.key")),
        format!("open={}", p("symlink")),
        format!("symlink={},{}", p("keys/id_rsa"), p("work/own-symlink")),
        format!("open={}", p("prelink")),
        format!("hardlink={},{}", p("keys/id_rsa"), p("work/own-hardlink")),
        format!("relative={},{}", p("work"), "../keys/./sub/../id_rsa"),
        format!("procroot={}", p("keys/id_rsa")),
        format!("procfd={}", p("keys/id_rsa")),
        format!("iouring={}", p("keys/id_rsa")),
        format!("rename={},{}", p("keys/id_rsa"), p("work/moved")),
        format!("list={}", p("keys")),
        format!("create={}", p("keys/planted")),
        format!("open={}", p("bindmnt/id_rsa")),
        format!("open={}", p("public.txt")),
        format!("open={}", p("notes.txt")),
        format!("send=127.0.0.1,{}", sink.port()),
    ];
    let (mut g, threads) = spawn_run(&policy, &audit, &vectors);
    assert!(
        poll_until(Duration::from_secs(120), Duration::from_millis(20), || {
            root.join("ready").exists()
        }),
        "the agent did not start"
    );
    std::fs::rename(ssh.join("sub/deep"), ssh.join("sub/deep2")).unwrap();
    std::fs::rename(&ssh, &keys).unwrap();
    write(&keys.join("later.key"), LATER);
    write(&root.join("go"), "");
    let out = threads.finish(&mut g, Duration::from_secs(180));
    let _ = Command::new("umount").arg(&bind).status();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let r = results(&out);
    for k in [
        "open", "open#2", "open#3", "open#4", "symlink", "open#5", "open#6", "relative",
        "procroot", "procfd", "iouring", "rename", "list",
    ] {
        assert_denied(&r, k);
    }
    assert_eq!(
        r["hardlink"]["link_errno"], "EPERM",
        "link(2) refused: {}",
        r["hardlink"]
    );
    assert_eq!(
        r["rename"]["rename_errno"], "EPERM",
        "rename(2) refused: {}",
        r["rename"]
    );
    assert_eq!(
        r["procfd"]["opath_ok"], true,
        "O_PATH itself is not an open: {}",
        r["procfd"]
    );
    assert_denied(&r, "create#2");
    assert_read(&r, "open#7", "PUBLIC-DATA");
    assert_read(&r, "open#8", "NOTES-DATA");
    assert_eq!(r["send"]["ok"], true, "{}", r["send"]);
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            sink.text().contains("NOTES-DATA")
        }),
        "the allowed exfiltration channel got nothing: {:?}",
        sink.text()
    );
    let got = sink.text();
    for s in [SECRET, DEEP, LATER] {
        assert!(!got.contains(s), "a protected byte left: {got:?}");
    }
    // O_CREAT makes the name before the open is judged: it may exist, but
    // nothing was written through it.
    assert_eq!(
        std::fs::metadata(keys.join("planted")).map_or(0, |m| m.len()),
        0
    );
    assert!(
        std::fs::exists(keys.join("id_rsa")).unwrap(),
        "rename was refused"
    );

    // The audit log names the rule path, and the chain verifies.
    let recs = read_jsonl(&audit);
    let file_recs = |action: &str, verdict: &str| {
        recs.iter()
            .filter(|r| r["action"] == action && r["verdict"] == verdict)
            .count()
    };
    assert!(file_recs("file_open", "deny") >= 10, "{recs:#?}");
    assert!(file_recs("file_link", "deny") >= 1, "{recs:#?}");
    assert!(file_recs("file_rename", "deny") >= 1, "{recs:#?}");
    assert!(file_recs("file_open", "audit") >= 1, "{recs:#?}");
    let deny = recs
        .iter()
        .find(|r| r["action"] == "file_open" && r["verdict"] == "deny")
        .unwrap();
    assert_eq!(deny["path"], ssh.display().to_string(), "{deny}");
    assert_eq!(deny["identity"]["name"], format!("files-{label}"));
    assert!(deny["detail"].as_str().unwrap().contains("inode"), "{deny}");
    let v = Command::new(enforcer_bin())
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn deny_rules_hold_against_every_evasion_on_overlayfs_or_disk() {
    require_bpf_lsm();
    // The test dir lives under /tmp: an overlay in the VM runner.
    let dir = TestDir::new("files-evasion");
    evasion_on(dir.path(), "disk");
}

#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn deny_rules_hold_against_every_evasion_on_tmpfs() {
    require_bpf_lsm();
    let dir = tempfile::Builder::new()
        .prefix("enforcer-files-")
        .tempdir_in("/dev/shm")
        .unwrap();
    evasion_on(dir.path(), "tmpfs");
}

#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn taint_clamps_egress_of_every_process_of_the_agent() {
    require_bpf_lsm();
    let dir = TestDir::new("files-taint");
    let root = dir.path();
    let token = root.join("token");
    write(&token, TOKEN);
    // Allowed before the taint; after it only the onTaint host is.
    let before = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let on_taint = TcpSink::bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let policy = root.join("policy.yaml");
    write(
        &policy,
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: taint-agent\n\
             spec:\n  egress:\n    - cidr: 127.0.0.2/32\n      ports: [{b}]\n      protocol: tcp\n  \
             files:\n    - path: {t}\n      access: taint\n  onTaint:\n    egress:\n      - cidr: \
             127.0.0.3/32\n        ports: [{o}]\n        protocol: tcp\n",
            b = before.port(),
            t = token.display(),
            o = on_taint.port()
        ),
    );
    let audit = root.join("audit.jsonl");
    // The second connect before the read is answered by the flow cache (a
    // repeat of an allowed flow); the taint must move the verdict
    // generation on, or the first send after it (a connect of the same
    // flow) would be answered too.
    let vectors = vec![
        format!("connect=127.0.0.2,{}", before.port()),
        format!("connect=127.0.0.2,{}", before.port()),
        format!("send=127.0.0.3,{}", on_taint.port()),
        format!("open={}", token.display()),
        format!("send=127.0.0.2,{}", before.port()),
        format!("child_send=127.0.0.2,{}", before.port()),
        format!("send=127.0.0.3,{}", on_taint.port()),
        format!("child_send=127.0.0.3,{}", on_taint.port()),
    ];
    let (mut g, threads) = spawn_run(&policy, &audit, &vectors);
    let out = threads.finish(&mut g, Duration::from_secs(180));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let r = results(&out);
    // Before: the ordinary policy (127.0.0.2 allowed, the onTaint host not).
    assert_eq!(r["connect"]["ok"], true, "{r}");
    assert_eq!(r["connect#2"]["ok"], true, "{r}");
    assert_denied(&r, "send");
    // The taint file itself is readable.
    assert_read(&r, "open", TOKEN);
    // After: the host allowed before is refused, for the agent and for a
    // process it starts later; the onTaint host is allowed.
    assert_denied(&r, "send#2");
    assert_eq!(r["child_send"]["ok"], false, "{r}");
    assert_eq!(r["send#3"]["ok"], true, "{r}");
    assert_eq!(r["child_send#2"]["ok"], true, "{r}");
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            on_taint.text().contains("CHILD:")
        }),
        "onTaint host: {:?}",
        on_taint.text()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(before.conns(), 2, "only the pre-taint connects reached it");
    assert_eq!(before.bytes(), 0, "zero bytes after the taint");
    // The audit log records the read and the clamp.
    let recs = read_jsonl(&audit);
    let taint_read = recs
        .iter()
        .find(|r| r["action"] == "file_open" && r["verdict"] == "taint")
        .unwrap_or_else(|| panic!("no taint record: {recs:#?}"));
    assert_eq!(taint_read["path"], token.display().to_string());
    assert!(
        recs.iter().any(|r| r["action"] == "taint_clamp"
            && r["detail"].as_str().unwrap_or("").contains("onTaint")),
        "no taint_clamp record: {recs:#?}"
    );
    assert!(
        recs.iter().any(|r| r["action"] == "connect"
            && r["verdict"] == "deny"
            && r["port"] == before.port()),
        "{recs:#?}"
    );
    assert!(err.contains("tainted") || err.contains("taint"), "{err}");
}

/// The clamp reaches sockets opened before the taint read: a TCP
/// connection and a connected UDP socket to a host allowed before (not by
/// onTaint) carry nothing written after the read; a connection to the
/// onTaint host keeps working.
#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn taint_clamp_cuts_sockets_opened_before_the_taint() {
    require_bpf_lsm();
    let dir = TestDir::new("files-taint-open");
    let root = dir.path();
    let token = root.join("token");
    write(&token, TOKEN);
    let before = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let before_udp = UdpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let on_taint = TcpSink::bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let policy = root.join("policy.yaml");
    write(
        &policy,
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: taint-open\n\
             spec:\n  egress:\n    - cidr: 127.0.0.2/32\n      ports: [{b}]\n      protocol: tcp\n    \
             - cidr: 127.0.0.2/32\n      ports: [{u}]\n      protocol: udp\n    \
             - cidr: 127.0.0.3/32\n      ports: [{o}]\n      protocol: tcp\n  \
             files:\n    - path: {t}\n      access: taint\n  onTaint:\n    egress:\n      - cidr: \
             127.0.0.3/32\n        ports: [{o}]\n        protocol: tcp\n",
            b = before.port(),
            u = before_udp.port(),
            t = token.display(),
            o = on_taint.port()
        ),
    );
    let audit = root.join("audit.jsonl");
    let vectors = vec![
        format!("hold=127.0.0.2,{}", before.port()),
        format!("hold_udp=127.0.0.2,{}", before_udp.port()),
        format!("hold=127.0.0.3,{}", on_taint.port()),
        format!("open={}", token.display()),
        format!("held_send=tcp,127.0.0.2,{}", before.port()),
        format!("held_send=udp,127.0.0.2,{}", before_udp.port()),
        format!("held_send=tcp,127.0.0.3,{}", on_taint.port()),
    ];
    let (mut g, threads) = spawn_run(&policy, &audit, &vectors);
    let out = threads.finish(&mut g, Duration::from_secs(180));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let r = results(&out);
    for k in ["hold", "hold_udp", "hold#2"] {
        assert_eq!(r[k]["ok"], true, "{k} before the taint: {r}");
    }
    assert_read(&r, "open", TOKEN);
    // The onTaint host's connection carries the data on.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            on_taint.text().contains(TOKEN)
        }),
        "onTaint host: {:?}\n{r}",
        on_taint.text()
    );
    std::thread::sleep(Duration::from_millis(300));
    // Zero bytes written after the read reached the host allowed before.
    assert_eq!(before.text(), "HELD-BEFORE;", "{r}");
    assert!(
        !before_udp.text().contains("HELD-AFTER"),
        "connected UDP after the taint: {:?}",
        before_udp.text()
    );
    assert!(before_udp.text().contains("HELD-BEFORE"), "{r}");
    // The TCP connection was cut: its reader sees an error, not a reply.
    let cut = &r["held_send"];
    assert!(
        cut["ok"] == false || cut["recv_errno"].is_string() || cut["recv"] == "eof",
        "the clamped connection was not cut: {cut}"
    );
    let recs = read_jsonl(&audit);
    let clamped: Vec<&Value> = recs
        .iter()
        .filter(|x| x["action"] == "packet" && x["rule"] == "taint-clamp" && x["verdict"] == "deny")
        .collect();
    assert!(
        clamped
            .iter()
            .any(|x| x["port"] == before.port() && x["protocol"] == "tcp"),
        "no taint-clamp record for the TCP connection: {recs:#?}"
    );
    assert!(
        clamped
            .iter()
            .any(|x| x["port"] == before_udp.port() && x["protocol"] == "udp"),
        "no taint-clamp record for the UDP socket: {recs:#?}"
    );
    // One record per socket, not one per dropped packet.
    assert!(clamped.len() <= 2, "{clamped:#?}");
}

/// Sockets created outside the identity (a host process passes them in
/// over SCM_RIGHTS): the agent can neither send on them nor connect them,
/// even to a destination its policy allows.
#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn foreign_sockets_carry_nothing() {
    require_bpf_lsm();
    let dir = TestDir::new("files-foreign");
    let root = dir.path();
    let sink = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let udp = UdpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let path = root.join("fds.sock");
    // The host process: makes the sockets outside every bound cgroup and
    // hands them to whoever connects.
    let giver = format!(
        "import socket,sys\n\
         l=socket.socket(socket.AF_UNIX); l.bind(sys.argv[1]); l.listen(1)\n\
         print('ready', flush=True)\n\
         c,_=l.accept()\n\
         t=socket.create_connection(('127.0.0.2', {tp})); f=socket.socket(); d=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         socket.send_fds(c, [b'x'], [t.fileno(), f.fileno(), d.fileno()])\n\
         c.recv(1)\n",
        tp = sink.port()
    );
    let mut gc = Command::new(python());
    gc.args(["-c", &giver])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut giver = ChildGuard::new(gc.spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(giver.child().stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    let policy = root.join("policy.yaml");
    write(
        &policy,
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: foreign\n\
             spec:\n  egress:\n    - cidr: 127.0.0.2/32\n      ports: [{t}, {u}]\n\
             {local}",
            t = sink.port(),
            u = udp.port(),
            local = format_args!("  local:\n    - path: {}\n", path.display()),
        ),
    );
    let audit = root.join("audit.jsonl");
    let vectors = vec![format!(
        "foreign={},127.0.0.2,{},{}",
        path.display(),
        sink.port(),
        udp.port()
    )];
    let (mut g, threads) = spawn_run(&policy, &audit, &vectors);
    let out = threads.finish(&mut g, Duration::from_secs(120));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let r = results(&out);
    let f = &r["foreign"];
    assert_eq!(f["ok"], true, "{r}\n{err}");
    // The descriptors never arrive (lsm/file_receive); were one to arrive,
    // every use of it must fail (socket_connect / socket_sendmsg).
    assert_eq!(f["received"], 0, "foreign sockets were received: {f}");
    assert_eq!(f["ctrunc"], true, "{f}");
    for k in ["send", "connect", "sendto"] {
        assert!(
            f[k].is_null() || f[k] == "EPERM",
            "{k} on a foreign socket: {f}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.bytes(), 0, "bytes over the foreign TCP socket");
    assert_eq!(sink.conns(), 1, "only the host process's own connect");
    assert_eq!(udp.datagrams(), 0, "datagrams over the foreign UDP socket");
    let recs = read_jsonl(&audit);
    assert!(
        recs.iter().any(|x| x["action"] == "fd_receive"
            && x["rule"] == "foreign-socket"
            && x["verdict"] == "deny"),
        "no foreign-socket record: {recs:#?}"
    );
    giver.kill9();
}

#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn daemon_enforces_file_rules_and_taint_on_bound_cgroups() {
    require_bpf_lsm();
    let _serial = serial();
    let cg = Cgroup::create("files-daemon");
    let pins = PinDir::new("files-daemon");
    let dir = TestDir::new("files-daemon");
    let root = dir.path();
    std::fs::create_dir_all(root.join("secrets")).unwrap();
    write(&root.join("secrets/key"), SECRET);
    write(&root.join("token"), TOKEN);
    write(&root.join("public"), "PUBLIC-DATA");
    let before = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let on_taint = TcpSink::bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, "files-daemon")]);
    write_atomic(
        &d.policies.join("files.yaml"),
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: files-daemon\n\
             spec:\n  egress:\n    - cidr: 127.0.0.2/32\n      ports: [{b}]\n  files:\n    - path: \
             {s}\n      access: deny\n    - path: {t}\n      access: taint\n    - path: {l}\n      \
             access: deny\n  onTaint:\n    egress:\n      - cidr: 127.0.0.3/32\n        ports: \
             [{o}]\n",
            b = before.port(),
            s = root.join("secrets").display(),
            l = root.join("late-key").display(),
            t = root.join("token").display(),
            o = on_taint.port()
        ),
    );
    d.start();
    let st = d.status();
    assert_eq!(st["capabilities"]["bpf_lsm"]["available"], true, "{st}");
    assert_eq!(st["rejected"], serde_json::json!([]), "{st}");
    let id = d.identity("files-daemon").unwrap_or_else(|| panic!("{st}"));
    assert_eq!(id["file_rules"], 3, "{id}");
    assert!(id["file_inodes"].as_u64().unwrap() >= 3, "{id}");
    assert!(id["tainted"].is_null(), "{id}");
    // A rule whose path does not exist yet is said to be not in force...
    let late = root.join("late-key");
    assert!(
        id["unresolved_files"].to_string().contains("late-key"),
        "{id}"
    );

    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    let read = |p: &mut Probe, path: &Path| {
        p.cmd(serde_json::json!({"op": "read", "path": path.display().to_string()}))
    };
    let r = read(&mut p, &root.join("secrets/key"));
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    assert_eq!(read(&mut p, &root.join("public"))["data"], "PUBLIC-DATA");
    // ...and protected once it is created: the daemon resolves missing rule
    // paths again on every reconcile (every resyncSeconds, 2 s here).
    write(&late, SECRET);
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            d.identity("files-daemon").is_some_and(|i| {
                i["unresolved_files"] == serde_json::json!([])
                    && i["file_inodes"].as_u64().unwrap_or(0) >= 4
            })
        }),
        "the created rule path was not resolved: {}",
        d.status()
    );
    let r = read(&mut p, &late);
    assert_eq!(r["errno"], libc::EPERM, "a rule path created later: {r}");
    assert_eq!(p.tcp("127.0.0.2", before.port(), "")["ok"], true);
    assert_eq!(read(&mut p, &root.join("token"))["data"], TOKEN);
    let r = p.tcp("127.0.0.2", before.port(), "after-taint");
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    assert_eq!(
        p.tcp("127.0.0.3", on_taint.port(), "to-on-taint")["ok"],
        true
    );
    // A process started in the cgroup after the taint is clamped too.
    let mut q = Probe::spawn(&dir);
    move_pid(&cg.path, q.pid);
    let r = q.tcp("127.0.0.2", before.port(), "later-process");
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    assert!(poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || on_taint.text().contains("to-on-taint")
    ));
    assert_eq!(before.bytes(), 0, "zero bytes after the taint");
    // Status and metrics say so.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
            metric(
                &d.scrape(),
                "enforcer_identity_tainted",
                &[("identity", "files-daemon")],
            ) == Some(1.0)
        }),
        "{}",
        d.scrape()
    );
    let id = d.identity("files-daemon").unwrap();
    assert!(
        id["tainted"].as_str().unwrap_or("").contains("token"),
        "{id}"
    );
    assert!(
        id["recent_denials"].to_string().contains("file_open"),
        "{id}"
    );
    let lsm_pins = |p: &Path| std::fs::read_dir(p).map(|r| r.count()).unwrap_or(0);
    assert_eq!(
        lsm_pins(&pins.path.join("lsm")),
        enforcer_common::prog_names::LSM.len(),
        "every LSM link is pinned (files, exec hold, socket families, foreign sockets)"
    );

    // kill -9: the pinned hooks keep enforcing the file rules and the clamp.
    d.kill9();
    let r = read(&mut p, &root.join("secrets/key"));
    assert_eq!(r["errno"], libc::EPERM, "while the daemon is dead: {r}");
    let r = q.tcp("127.0.0.2", before.port(), "daemon-dead");
    assert_eq!(r["errno"], libc::EPERM, "still tainted: {r}");
    // A restarted daemon adopts the hooks (no second set) and keeps both.
    d.start();
    assert_eq!(
        lsm_pins(&pins.path.join("lsm")),
        enforcer_common::prog_names::LSM.len(),
        "adopted, not attached twice"
    );
    let r = read(&mut p, &root.join("secrets/key"));
    assert_eq!(r["errno"], libc::EPERM, "after the restart: {r}");
    assert_eq!(read(&mut p, &root.join("public"))["data"], "PUBLIC-DATA");
    let r = q.tcp("127.0.0.2", before.port(), "restarted");
    assert_eq!(
        r["errno"],
        libc::EPERM,
        "still tainted after the restart: {r}"
    );
    let id = d.identity("files-daemon").unwrap();
    assert!(
        id["tainted"].is_string(),
        "the kernel's taint flag survives: {id}"
    );
    assert_eq!(before.bytes(), 0, "zero bytes after the taint");
    d.kill9();
}

/// The clamp reaches DNS: once tainted, the identity's names are judged by
/// the onTaint host rules (others REFUSED, never forwarded) and the
/// addresses learned before for the ordinary rules no longer open anything.
#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn taint_clamps_dns_to_on_taint_host_rules() {
    require_bpf_lsm();
    use enforcer_tests::dns_server::DnsServer;
    let dir = TestDir::new("files-taint-dns");
    let pins = PinDir::new("files-taint-dns");
    let dns = DnsServer::start();
    dns.add_addrs("api.before.test", &["127.0.0.5"]);
    dns.add_addrs("api.after.test", &["127.0.0.6"]);
    let before = TcpSink::bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let after = TcpSink::bind("127.0.0.6:0".parse().unwrap()).unwrap();
    let token = dir.join("token");
    write(&token, TOKEN);
    let mut yaml = dns_policy_yaml(
        "taint-dns",
        &[
            host_rule("api.before.test", &[before.port()], "tcp"),
            vouch_loopback(),
        ],
        &dns.upstream(),
        &[],
    );
    yaml.push_str(&format!(
        "  files:\n    - {{path: {}, access: taint}}\n  onTaint:\n    egress:\n      - {}\n      - {}\n",
        token.display(),
        host_rule("api.after.test", &[after.port()], "tcp"),
        vouch_loopback()
    ));
    let policy = dir.join("taint-dns.yaml");
    write(&policy, &yaml);
    let mut a = RunAgent::spawn(
        &policy,
        &["--pin-dir".into(), pins.path.display().to_string()],
        &dir.dns_agent(),
    );
    let q = |a: &mut RunAgent, name: &str| {
        a.cmd(
            serde_json::json!({"op": "resolve", "server": "127.0.0.9", "port": 53,
            "name": name, "qtype": "A", "tcp": false, "connected": false, "timeout": 5}),
        )
    };
    // Before: the ordinary host rule.
    let v = q(&mut a, "api.before.test");
    assert_eq!(v["rcode"], 0, "{v}");
    assert_ok(&a.tcp("127.0.0.5", before.port(), ""), "before the taint");
    assert_eq!(q(&mut a, "api.after.test")["rcode"], 5, "not yet allowed");
    // The taint read.
    let r = a.cmd(serde_json::json!({"op": "read", "path": token.display().to_string()}));
    assert_eq!(r["data"], TOKEN, "{r}");
    // After: the ordinary name is refused and not forwarded again, its
    // learned address is closed; the onTaint name resolves and connects.
    let forwarded = dns.count("api.before.test");
    assert_eq!(
        q(&mut a, "api.before.test")["rcode"],
        5,
        "refused once tainted"
    );
    assert_eq!(
        dns.count("api.before.test"),
        forwarded,
        "{}",
        dns.describe()
    );
    assert_eperm(
        &a.tcp("127.0.0.5", before.port(), "after-taint"),
        "a learned address of the ordinary rules after the taint",
    );
    let v = q(&mut a, "api.after.test");
    assert_eq!(v["rcode"], 0, "{v}");
    assert_ok(
        &a.tcp("127.0.0.6", after.port(), "on-taint-host"),
        "the onTaint host",
    );
    assert!(poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || after.text() == "on-taint-host"
    ));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(before.bytes(), 0, "zero bytes after the taint");
    a.finish(Duration::from_secs(20));
}

/// `mode: audit`: deny rules record `audit` and allow.
#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn audit_mode_records_file_denials_and_allows_them() {
    require_bpf_lsm();
    let dir = TestDir::new("files-audit");
    let root = dir.path();
    std::fs::create_dir_all(root.join("ssh")).unwrap();
    write(&root.join("ssh/id_rsa"), SECRET);
    let policy = root.join("policy.yaml");
    write(
        &policy,
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: files-audit\n\
             spec:\n  mode: audit\n  files:\n    - path: {}\n      access: deny\n",
            root.join("ssh").display()
        ),
    );
    let audit = root.join("audit.jsonl");
    let vectors = vec![format!("open={}", root.join("ssh/id_rsa").display())];
    let (mut g, threads) = spawn_run(&policy, &audit, &vectors);
    let out = threads.finish(&mut g, Duration::from_secs(120));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_read(&results(&out), "open", SECRET);
    let recs = read_jsonl(&audit);
    assert!(
        recs.iter().any(|r| r["action"] == "file_open"
            && r["verdict"] == "audit"
            && r["rule"].as_str().unwrap_or("").starts_with("files[0]")),
        "{recs:#?}"
    );
}

/// A root process in a bound cgroup holds CAP_NET_RAW; no cgroup hook sees
/// AF_PACKET. With BPF LSM the daemon refuses its packet sockets (EPERM,
/// rule raw-socket, recorded), so a hand-built UDP frame never reaches the
/// listener; a process outside every bound cgroup keeps its packet sockets.
/// AF_XDP, AF_VSOCK and AF_TIPC sockets are refused too; AF_UNIX and
/// AF_NETLINK stay open.
#[test]
#[ignore = "needs BPF LSM: runs inside the VM (cargo xtask vm-test), see module docs"]
fn daemon_refuses_packet_sockets_of_agents() {
    require_bpf_lsm();
    let _serial = serial();
    let cg = Cgroup::create("lsm-packet");
    let pins = PinDir::new("lsm-packet");
    let dir = TestDir::new("lsm-packet");
    let allowed = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // IPv4 loopback sources are martians on input: the frames are IPv6 (see
    // probe.py's packet_udp).
    let target = UdpSink::bind("[::1]:0".parse().unwrap()).unwrap();
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, "packet-agent")]);
    write_atomic(
        &d.policies.join("p.yaml"),
        &format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: packet-agent\n\
             spec:\n  egress:\n    - cidr: 127.0.0.1/32\n      ports: [{}]\n",
            allowed.port()
        ),
    );
    d.start();

    // Control: outside the bound cgroup the same frame gets through.
    let mut control = Probe::spawn(&dir);
    let r = control.cmd(serde_json::json!({
        "op": "packet_udp", "host": "::1", "port": target.port(), "data": "control"
    }));
    assert!(r["sent"].as_u64().unwrap_or(0) > 0, "control frame: {r}");
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
            target.datagrams() >= 1
        }),
        "the control frame did not arrive: the test cannot tell a refusal from a lost frame"
    );
    let before = target.datagrams();

    let mut p = Probe::spawn(&dir);
    move_pid(&cg.path, p.pid);
    assert_ok(&p.tcp("127.0.0.1", allowed.port(), "agent"), "allowed");
    let r = p.op("packet");
    assert_eq!(r["errno"], libc::EPERM, "packet socket of the agent: {r}");
    let r = p.cmd(serde_json::json!({
        "op": "packet_udp", "host": "::1", "port": target.port(), "data": "exfil"
    }));
    assert_eq!(r["errno"], libc::EPERM, "packet frame of the agent: {r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(target.datagrams(), before, "zero frames from the agent");
    assert!(!target.text().contains("exfil"));
    // Other families no cgroup hook judges: AF_XDP (frames, CAP_NET_RAW),
    // AF_VSOCK (the host of a VM-isolated runtime, no capability), AF_TIPC.
    // Outside the cgroup they are not refused by enforcer (the kernel may
    // still lack the family: EAFNOSUPPORT); inside they are EPERM.
    for (family, kind) in [
        (44, libc::SOCK_RAW),
        (40, libc::SOCK_STREAM),
        (30, libc::SOCK_RDM),
    ] {
        let want = serde_json::json!({"op": "socket", "family": family, "type": kind});
        let c = control.cmd(want.clone());
        assert_ne!(
            c["errno"],
            libc::EPERM,
            "family {family} outside the cgroup: {c}"
        );
        let r = p.cmd(want);
        assert_eq!(r["errno"], libc::EPERM, "family {family} in the agent: {r}");
    }
    // Ordinary families stay open to the agent.
    for (family, kind) in [
        (libc::AF_UNIX, libc::SOCK_STREAM),
        (libc::AF_NETLINK, libc::SOCK_RAW),
    ] {
        let r = p.cmd(serde_json::json!({"op": "socket", "family": family, "type": kind}));
        assert_eq!(r["ok"], true, "family {family} in the agent: {r}");
    }

    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            read_jsonl(&d.audit).iter().any(|r| {
                r["action"] == "sock_create"
                    && r["verdict"] == "deny"
                    && r["rule"] == "raw-socket"
                    && r["identity"]["name"] == "packet-agent"
            }) && read_jsonl(&d.audit).iter().any(|r| {
                r["action"] == "sock_create"
                    && r["verdict"] == "deny"
                    && r["rule"] == "socket-family"
                    && r["identity"]["name"] == "packet-agent"
            })
        }),
        "no sock_create denial in the audit log: {:#?}",
        read_jsonl(&d.audit)
    );
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            d.status()["net_raw_processes"]
                .to_string()
                .contains("refused by the BPF LSM socket_create hook")
        }),
        "{}",
        d.status()
    );
}
