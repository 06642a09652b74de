//! The channels the connect/sendmsg hooks do not see, on the real kernel,
//! against an agent under `enforcer run`:
//!
//! - inbound: the agent listens; a peer in another network namespace (over
//!   a veth pair, addresses from 198.18.0.0/15) and a process of the host
//!   outside the identity connect in. Only the `spec.ingress` peer gets the
//!   agent's secret; the agent's own loopback connection to itself works.
//! - IPv4 options (`IP_OPTIONS`, an `IP_RETOPTS` cmsg) and an IPv6 routing
//!   header (`IPV6_RTHDR`): no packet carrying them leaves.
//!
//! The taint clamp on sockets opened before a taint read needs BPF LSM: it
//! is in `files.rs` (run in the VM).
use std::{
    io::Read,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use enforcer_tests::*;
use serde_json::{json, Value};

const SECRET: &str = "AGENT-SECRET-0c9e";

/// A veth pair: the host end 198.18.0.1/24, the peer end 198.18.0.2/24 in
/// a fresh network namespace (the attacker's host).
struct Veth {
    ns: TestNetns,
    host_if: String,
}

impl Veth {
    fn new(tag: &str) -> Self {
        let ns = TestNetns::new(true);
        let host_if = format!("vh{}{tag}", std::process::id() % 100_000);
        let peer_if = format!("va{}{tag}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        let pid = ns.holder_pid().to_string();
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &pid,
        ]);
        ip(&["addr", "add", "198.18.0.1/24", "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let nsenter = |args: &[&str]| {
            let st = Command::new("nsenter")
                .arg(format!("--net={}", ns.path.display()))
                .args(args)
                .status()
                .expect("nsenter");
            assert!(st.success(), "nsenter {args:?}");
        };
        nsenter(&["ip", "addr", "add", "198.18.0.2/24", "dev", &peer_if]);
        nsenter(&["ip", "link", "set", &peer_if, "up"]);
        Self { ns, host_if }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

/// Connect and read what the agent sends: `Ok(bytes)` or the error.
fn fetch(addr: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Send a datagram and wait briefly for any reply: the bytes received.
fn udp_probe(from: &str, to: SocketAddr) -> usize {
    let u = UdpSocket::bind(from).unwrap();
    u.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    u.send_to(b"hello agent", to).unwrap();
    let mut buf = [0u8; 512];
    u.recv_from(&mut buf).map(|(n, _)| n).unwrap_or(0)
}

fn spawn_agent(
    dir: &TestDir,
    policy: &Path,
    audit: &Path,
    mode: &str,
    cfg: &Value,
) -> (ChildGuard, OutputThreads) {
    let mut c = Command::new(enforcer_bin());
    c.arg("run")
        .args(["--user", "65534:65534"])
        .arg("--policy")
        .arg(policy)
        .arg("--audit-log")
        .arg(audit)
        .arg("--")
        .arg(python())
        .arg(dir.join("channel_agent.py"))
        .arg(mode)
        .arg(cfg.to_string())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut g = ChildGuard::new(c.spawn().expect("spawning enforcer run"));
    let t = OutputThreads::take(g.child());
    (g, t)
}

#[test]
fn inbound_connections_need_an_ingress_rule() {
    if !require_root("inbound_connections_need_an_ingress_rule") {
        return;
    }
    let dir = TestDir::new("ingress");
    // The agent (uid 65534) writes its ready file here.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let veth = Veth::new("i");
    let (denied, allowed, udp) = (free_port(), free_port(), free_port());
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: ingress\n\
             spec:\n  egress:\n    - cidr: 127.0.0.1/32\n      ports: [{denied}]\n      protocol: tcp\n  \
             ingress:\n    - cidr: 198.18.0.2/32\n      ports: [{allowed}]\n      protocol: tcp\n"
        ),
    )
    .unwrap();
    let audit = dir.join("audit.jsonl");
    let ready = dir.join("ready");
    let go = dir.join("go");
    let cfg = json!({
        "tcp_ports": [denied, allowed],
        "udp_port": udp,
        "secret": SECRET,
        "ready_file": ready.to_str().unwrap(),
        "go_file": go.to_str().unwrap(),
    });
    let (mut g, threads) = spawn_agent(&dir, &policy, &audit, "serve", &cfg);
    // Generous: under QEMU/TCG (the VM runner) loading and verifying the
    // programs alone takes tens of seconds.
    // Ready = the file parses: the agent may be halfway through writing it.
    let mut me = Value::Null;
    if !poll_until(Duration::from_secs(150), Duration::from_millis(50), || {
        match std::fs::read_to_string(&ready).map(|t| serde_json::from_str::<Value>(&t)) {
            Ok(Ok(v)) => {
                me = v;
                true
            }
            _ => false,
        }
    }) {
        std::fs::write(&go, "").unwrap();
        let out = threads.finish(&mut g, Duration::from_secs(30));
        panic!(
            "the agent did not get ready; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(me["ok"], true, "the agent's own loopback connection: {me}");

    let host = |p: u16| SocketAddr::from(([198, 18, 0, 1], p));
    // The attacker's host: only the ingress rule's port answers.
    let (att_denied, att_allowed, att_udp) = veth.ns.run(|| {
        (
            fetch(host(denied)),
            fetch(host(allowed)),
            udp_probe("198.18.0.2:0", host(udp)),
        )
    });
    // A process of this host outside the identity, over loopback.
    let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let local_denied = fetch(lo(denied));
    let local_allowed_port = fetch(lo(allowed));
    let local_udp = udp_probe("127.0.0.1:0", lo(udp));

    std::fs::write(&go, "").unwrap();
    let out = threads.finish(&mut g, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let r: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no agent output; stderr:\n{stderr}"));

    assert_eq!(
        att_allowed.as_deref(),
        Ok(SECRET),
        "the ingress peer: {r}\n{stderr}"
    );
    for (what, got) in [
        ("attacker -> denied port", &att_denied),
        ("host process -> denied port", &local_denied),
        (
            "host process -> ingress port (not its peer)",
            &local_allowed_port,
        ),
    ] {
        assert!(
            !got.as_deref().is_ok_and(|s| !s.is_empty()),
            "{what}: bytes arrived: {got:?}"
        );
    }
    assert_eq!(att_udp, 0, "a datagram from the attacker got a reply");
    assert_eq!(local_udp, 0, "a datagram from a host process got a reply");
    // The agent accepted its own connection and the ingress peer's, nothing else.
    let accepted = r["accepted"].as_array().unwrap();
    assert!(
        accepted
            .iter()
            .all(|a| (a[0] == "127.0.0.1" && a[1] == denied)
                || (a[0] == "198.18.0.2" && a[1] == allowed)),
        "accepted: {accepted:?}"
    );
    assert_eq!(
        accepted.iter().filter(|a| a[0] == "127.0.0.1").count(),
        1,
        "only the agent's own loopback connection: {accepted:?}"
    );
    assert!(r["udp_from"].as_array().unwrap().is_empty(), "{r}");

    let recs = read_jsonl(&audit);
    let ingress = |ip: &str, port: u16| {
        recs.iter().any(|x| {
            x["action"] == "ingress" && x["verdict"] == "deny" && x["ip"] == ip && x["port"] == port
        })
    };
    assert!(
        ingress("198.18.0.2", denied),
        "no ingress denial of the attacker: {recs:#?}"
    );
    assert!(
        ingress("127.0.0.1", denied),
        "no ingress denial of the host process: {recs:#?}"
    );
    assert!(
        ingress("198.18.0.2", udp),
        "no ingress denial of the datagram: {recs:#?}"
    );
}

/// A TCP port free on `addr` now (bound, read, released).
fn free_tcp_port(addr: &str) -> u16 {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

#[test]
fn ip_options_and_routing_headers_never_leave() {
    if !require_root("ip_options_and_routing_headers_never_leave") {
        return;
    }
    let dir = TestDir::new("ipopts");
    let lo4 = "127.0.0.1:0".parse().unwrap();
    let opt_tcp = TcpSink::bind(lo4).unwrap();
    let opt_udp = UdpSink::bind(lo4).unwrap();
    let opt_udp6 = UdpSink::bind("[::1]:0".parse().unwrap()).unwrap();
    let bind_udp = UdpSink::bind(lo4).unwrap();
    let listen6_port = free_tcp_port("[::1]:0");
    let control_tcp = TcpSink::bind(lo4).unwrap();
    let control_udp = UdpSink::bind(lo4).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        policy_yaml(
            "ipopts",
            "spiffe://example.org/ipopts",
            "enforce",
            &[
                ("127.0.0.1/32", &[opt_tcp.port(), control_tcp.port()], "tcp"),
                (
                    "127.0.0.1/32",
                    &[opt_udp.port(), control_udp.port(), bind_udp.port()],
                    "udp",
                ),
                ("::1/128", &[opt_udp6.port()], "udp"),
                ("::1/128", &[listen6_port], "tcp"),
            ],
        ),
    )
    .unwrap();
    let audit = dir.join("audit.jsonl");
    let cfg = json!({
        "tcp_port": opt_tcp.port(),
        "udp_port": opt_udp.port(),
        "udp6_port": opt_udp6.port(),
        "control_tcp": control_tcp.port(),
        "control_udp": control_udp.port(),
        "bind_udp": bind_udp.port(),
        "listen6_port": listen6_port,
        "payload": SECRET,
    });
    let (mut g, threads) = spawn_agent(&dir, &policy, &audit, "ipopts", &cfg);
    // Generous: under QEMU/TCG (the VM runner) loading and verifying the
    // programs alone takes tens of seconds (the whole run took ~50 s there,
    // and once more than 60).
    let out = threads.finish(&mut g, Duration::from_secs(180));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let r: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no agent output; stderr:\n{stderr}"));
    // The control traffic (no options) arrives: the test can see bytes.
    assert_eq!(r["control"]["ok"], true, "{r}\n{stderr}");
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
            control_tcp.text() == "CONTROL" && control_udp.text() == "CONTROL"
        }),
        "control traffic: {r}"
    );
    std::thread::sleep(Duration::from_millis(300));
    // Nothing carrying options arrived, whatever the kernel let the agent set.
    assert_eq!(opt_tcp.conns(), 0, "{r}");
    assert_eq!(opt_tcp.bytes(), 0, "{r}");
    assert_eq!(opt_udp.datagrams(), 0, "{r}");
    assert_eq!(opt_udp6.datagrams(), 0, "{r}");
    assert_eq!(bind_udp.datagrams(), 0, "{r}");
    // The socket options are refused at setsockopt (cgroup/setsockopt) on
    // every kernel: a listener's options ride on its SYN-ACKs, which under
    // SYN cookies pass no cgroup egress program. (Without the enforcer an
    // unprivileged agent may set a Record Route option and an IPv6 routing
    // header: measured on 6.1 and 6.18.)
    let recs = read_jsonl(&audit);
    let recorded = |act: &str, rule: &str, port: Option<u16>| {
        recs.iter().any(|x| {
            x["action"] == act
                && x["rule"] == rule
                && x["verdict"] == "deny"
                && port.is_none_or(|p| x["port"] == p)
        })
    };
    let set = |k: &str| r[k]["setopt"].as_str().unwrap_or("").to_string();
    for k in [
        "tcp_options",
        "udp_options",
        "udp6_rthdr",
        "listener6_rthdr",
    ] {
        assert!(
            set(k).split(',').all(|e| e.ends_with("EPERM")),
            "{k}: not refused at setsockopt: {r}"
        );
    }
    assert!(
        recs.iter()
            .filter(|x| x["action"] == "setsockopt"
                && x["rule"] == "ip-options"
                && x["verdict"] == "deny")
            .count()
            >= 4,
        "setsockopt refusals recorded: {recs:#?}"
    );
    for k in ["so_bindtodevice", "ip_unicast_if"] {
        assert_eq!(r["bind_device"][k], "EPERM", "{k}: {r}");
    }
    assert!(
        recs.iter()
            .filter(|x| x["action"] == "setsockopt" && x["rule"] == "bind-device")
            .count()
            >= 2,
        "bind-device refusals recorded: {recs:#?}"
    );
    // Per-message options (control messages) reach the egress program,
    // which drops the packet and says so.
    let dropped = |port: u16| recorded("packet", "ip-options", Some(port));
    assert_eq!(r["udp_retopts"]["errno"], "EPERM", "IP_RETOPTS cmsg: {r}");
    assert!(
        dropped(opt_udp.port()),
        "no ip-options record (IP_RETOPTS): {recs:#?}"
    );
    if r["udp6_rthdr_cmsg"]["type"].is_string()
        || r["udp6_rthdr_cmsg"]["errno"]
            .as_str()
            .is_some_and(|e| e.contains("EPERM"))
    {
        assert!(
            dropped(opt_udp6.port()),
            "no ip-options record (IPV6_RTHDR cmsg): {r}\n{recs:#?}"
        );
    }
    eprintln!("options the kernel accepted: {r}");
}
