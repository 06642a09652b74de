//! The peers a user would pick instead of the enforcer, set up the way an
//! operator would, for `cargo xtask bench` and `cargo xtask bench-dns`:
//!
//! - **nftables**: an `output` chain that sends every packet of a socket in
//!   the agent's cgroup (`socket cgroupv2 level N "<path>"`) to a chain
//!   holding the same allowlist as the enforcer's bench policy (the same
//!   generated [`Rule`]s), as interval sets, and rejects the rest with
//!   `icmpx admin-prohibited`. Stateless: no `ct state` (conntrack would
//!   then track every flow of the host, the unenforced baseline's too, and a
//!   loopback connect loop of ~30,000 connections/s fills its table).
//! - **dnsmasq**: a forwarder without a cache in front of the same upstream
//!   responder the enforcer's DNS proxy forwards to.
//!
//! Both come from Debian's packages (`nftables`, `dnsmasq-base`), installed
//! here when missing.
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::bench::{Port, Proto, Rule};

/// The table the bench loads (deleted at the end and on error).
pub const NFT_TABLE: &str = "enforcer_bench";

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `nft` and `dnsmasq` on PATH, or installed now from Debian's packages
/// (root; like scripts/setup.sh, saying so on stderr).
pub fn ensure_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !have("nft", "--version") {
        missing.push("nftables");
    }
    if !have("dnsmasq", "--version") {
        missing.push("dnsmasq-base");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the peer comparisons need {}: apt-get install {} (as root)",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    eprintln!(
        "bench: the peer comparisons need Debian's {}: installing (apt-get install -y {})",
        missing.join(", "),
        missing.join(" ")
    );
    let apt = |args: &[&str]| -> Result<bool> {
        Ok(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .context("running apt-get")?
            .success())
    };
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(&missing);
    // A fresh machine may not have package lists yet: update, then again.
    let installed = apt(&install)? || (apt(&["update", "-qq"])? && apt(&install)?);
    if !installed {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    if !have("nft", "--version") || !have("dnsmasq", "--version") {
        bail!("nft or dnsmasq still missing after apt-get install");
    }
    Ok(())
}

fn first_line(tool: &str, arg: &str) -> String {
    Command::new(tool)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// `nft --version`, e.g. "nftables v1.0.6 (Lester Gooch #5)".
pub fn nft_version() -> String {
    first_line("nft", "--version")
}

/// The first line of `dnsmasq --version`.
pub fn dnsmasq_version() -> String {
    first_line("dnsmasq", "--version")
}

// ---------------------------------------------------------------------------
// nftables

/// The shape of a set: which fields its elements have.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Shape {
    /// address . protocol . port: rules with ports (no protocol: tcp and udp).
    AddrProtoPort,
    /// address . protocol: rules with a protocol and no ports.
    AddrProto,
    /// address: rules with neither (every protocol, every port).
    Addr,
}

/// One set element.
#[derive(Clone, Copy, Debug)]
struct Elem {
    v6: bool,
    /// The prefix, left-aligned in 128 bits (IPv4 too), and its length.
    net: u128,
    len: u32,
    proto: Option<Proto>,
    ports: (u16, u16),
}

impl Elem {
    fn shape(&self) -> Shape {
        match self.proto {
            None => Shape::Addr,
            Some(_) if self.ports == (0, 65535) => Shape::AddrProto,
            Some(_) => Shape::AddrProtoPort,
        }
    }

    /// `self` covers all of `other` (same family, shape and protocol).
    fn covers(&self, other: &Elem) -> bool {
        self.len <= other.len
            && prefix(other.net, self.len) == self.net
            && self.ports.0 <= other.ports.0
            && other.ports.1 <= self.ports.1
    }

    fn render(&self) -> String {
        let addr = if self.v6 {
            IpAddr::from((self.net).to_be_bytes())
        } else {
            IpAddr::from(((self.net >> 96) as u32).to_be_bytes())
        };
        let mut s = format!("{addr}/{}", self.len);
        if let Some(p) = self.proto {
            let _ = write!(s, " . {}", p.name());
        }
        if self.shape() == Shape::AddrProtoPort {
            let (lo, hi) = self.ports;
            if lo == hi {
                let _ = write!(s, " . {lo}");
            } else {
                let _ = write!(s, " . {lo}-{hi}");
            }
        }
        s
    }
}

fn prefix(net: u128, len: u32) -> u128 {
    if len == 0 {
        0
    } else {
        net & (!0u128 << (128 - len))
    }
}

/// What the generated ruleset holds (for the report).
#[derive(Debug, Default, PartialEq)]
pub struct NftStats {
    pub rules: usize,
    pub elements: usize,
    /// Each set's name and element count, in the chain's order.
    pub sets: Vec<(String, usize)>,
    /// Elements left out because another element of the same rules already
    /// covers them (same answer, and nft refuses overlapping elements).
    pub covered: usize,
}

/// A set being filled: its elements, indexed by (prefix, length) so that
/// the elements whose prefix contains a new one's are found in `len + 1`
/// lookups.
struct SetFill {
    name: String,
    shape: Shape,
    v6: bool,
    by_prefix: HashMap<(u128, u32), Vec<Elem>>,
    elems: Vec<Elem>,
}

impl SetFill {
    /// The elements whose prefix contains (or equals) `e`'s, same protocol.
    fn containing<'a>(&'a self, e: &'a Elem) -> impl Iterator<Item = &'a Elem> + 'a {
        (0..=e.len)
            .filter_map(move |l| self.by_prefix.get(&(prefix(e.net, l), l)))
            .flatten()
            .filter(move |x| x.proto == e.proto)
    }
}

/// The nftables ruleset for `rules`, applied to the sockets of the cgroup at
/// `cgroup` (`level` below the cgroup v2 root; `cgroup` relative to
/// /sys/fs/cgroup, where nft looks it up): table `inet enforcer_bench`, the
/// allowlist in chain `agent`, and the base chain `output` that jumps there
/// (see [`Nft`] for why the base chain is separate).
///
/// nft's concatenated interval sets refuse overlapping elements, and random
/// CIDRs nest: an element covered by one already in the same set family is
/// left out (same answer), one that only overlaps goes to the next set of
/// its shape. Elements are placed shortest prefix first, so an overlapping
/// element already placed always contains the new one's prefix.
pub fn nft_ruleset(rules: &[Rule]) -> (String, NftStats) {
    let mut elems = Vec::new();
    for r in rules {
        let (v6, net) = match r.addr {
            IpAddr::V4(a) => (false, (u32::from(a) as u128) << 96),
            IpAddr::V6(a) => (true, u128::from(a)),
        };
        let len = r.len;
        let ports: Vec<(u16, u16)> = if r.ports.is_empty() {
            vec![(0, 65535)]
        } else {
            r.ports.iter().map(|p: &Port| p.bounds()).collect()
        };
        // No protocol with ports: the ports of TCP and of UDP (the only
        // transports an enforced agent can open).
        let protos: Vec<Option<Proto>> = match (r.proto, r.ports.is_empty()) {
            (Some(p), _) => vec![Some(p)],
            (None, true) => vec![None],
            (None, false) => vec![Some(Proto::Tcp), Some(Proto::Udp)],
        };
        for proto in protos {
            for &ports in &ports {
                elems.push(Elem {
                    v6,
                    net,
                    len,
                    proto,
                    ports,
                });
            }
        }
    }
    let generated = elems.len();
    // Shortest prefix first, and for one prefix the widest port range first
    // (so that a rule's single port inside its own range is covered).
    elems.sort_by_key(|e| (e.len, std::cmp::Reverse(e.ports.1 - e.ports.0)));
    let mut sets: Vec<SetFill> = Vec::new();
    let mut covered = 0;
    'elems: for e in elems {
        let shape = e.shape();
        for s in sets.iter().filter(|s| s.shape == shape && s.v6 == e.v6) {
            if s.containing(&e).any(|x| x.covers(&e)) {
                covered += 1;
                continue 'elems;
            }
        }
        let mut target = None;
        for (i, s) in sets.iter().enumerate() {
            if s.shape != shape || s.v6 != e.v6 {
                continue;
            }
            let overlaps = s
                .containing(&e)
                .any(|x| x.ports.0 <= e.ports.1 && e.ports.0 <= x.ports.1);
            if !overlaps {
                target = Some(i);
                break;
            }
        }
        let i = match target {
            Some(i) => i,
            None => {
                let n = sets
                    .iter()
                    .filter(|s| s.shape == shape && s.v6 == e.v6)
                    .count();
                let fam = if e.v6 { "v6" } else { "v4" };
                let sh = match shape {
                    Shape::AddrProtoPort => "pp",
                    Shape::AddrProto => "p",
                    Shape::Addr => "any",
                };
                sets.push(SetFill {
                    name: format!("{fam}_{sh}_{n}"),
                    shape,
                    v6: e.v6,
                    by_prefix: HashMap::new(),
                    elems: Vec::new(),
                });
                sets.len() - 1
            }
        };
        let s = &mut sets[i];
        s.by_prefix.entry((e.net, e.len)).or_default().push(e);
        s.elems.push(e);
    }
    // Port sets first (the bench's targets are there), IPv4 before IPv6.
    sets.sort_by_key(|s| {
        (
            s.v6,
            match s.shape {
                Shape::AddrProtoPort => 0,
                Shape::AddrProto => 1,
                Shape::Addr => 2,
            },
            s.name.clone(),
        )
    });
    let mut t = format!("table inet {NFT_TABLE} {{\n");
    let mut chain = String::from("  chain agent {\n");
    for s in &sets {
        let addr = if s.v6 { "ip6" } else { "ip" };
        let (ty, selector) = match s.shape {
            Shape::AddrProtoPort => (
                "addr . inet_proto . inet_service",
                format!("{addr} daddr . meta l4proto . th dport"),
            ),
            Shape::AddrProto => ("addr . inet_proto", format!("{addr} daddr . meta l4proto")),
            Shape::Addr => ("addr", format!("{addr} daddr")),
        };
        let ty = ty.replace("addr", if s.v6 { "ipv6_addr" } else { "ipv4_addr" });
        let _ = write!(
            t,
            "  set {} {{\n    type {ty}\n    flags interval\n    elements = {{\n",
            s.name
        );
        for e in &s.elems {
            let _ = writeln!(t, "      {},", e.render());
        }
        t.push_str("    }\n  }\n");
        let _ = writeln!(chain, "    {selector} @{} accept", s.name);
    }
    chain.push_str("    reject with icmpx admin-prohibited\n  }\n");
    t.push_str(&chain);
    t.push_str("}\n");
    let stats = NftStats {
        rules: rules.len(),
        elements: generated - covered,
        sets: sets
            .iter()
            .map(|s| (s.name.clone(), s.elems.len()))
            .collect(),
        covered,
    };
    (t, stats)
}

/// The `nft` path and level of a cgroup v2 directory: nft resolves the path
/// under /sys/fs/cgroup (also on a hybrid host, where cgroup v2 is mounted at
/// /sys/fs/cgroup/unified), while the level counts from the cgroup v2 root.
pub fn nft_cgroup(mount: &Path, cgroup: &Path) -> Result<(String, usize)> {
    let level = cgroup
        .strip_prefix(mount)
        .with_context(|| format!("{} is not under {}", cgroup.display(), mount.display()))?
        .components()
        .count();
    let rel = cgroup.strip_prefix("/sys/fs/cgroup").with_context(|| {
        format!(
            "nft looks cgroups up under /sys/fs/cgroup, not {}",
            cgroup.display()
        )
    })?;
    Ok((rel.display().to_string(), level))
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The loaded table. The allowlist stays loaded for the whole comparison;
/// the base chain (the hook, with the cgroup match) is added only while the
/// nftables side is measured ([`Nft::hook`]): a base chain runs for every
/// packet of the host, and an operator runs nftables *or* the enforcer, so
/// the enforcer's and the unenforced sides must not pay for it. Dropped:
/// the table is deleted.
pub struct Nft {
    base: String,
    pub stats: NftStats,
    pub load_time: Duration,
    pub file: PathBuf,
}

impl Nft {
    /// Load the ruleset for `rules` (written to `file`, loaded with `nft
    /// -f`, as an operator would), not yet hooked.
    pub fn load(rules: &[Rule], cgroup_path: &str, level: usize, file: &Path) -> Result<Self> {
        let _ = nft(&["delete", "table", "inet", NFT_TABLE], None);
        let (text, stats) = nft_ruleset(rules);
        std::fs::write(file, &text)?;
        let base = format!(
            "add chain inet {NFT_TABLE} output {{ type filter hook output priority filter; policy accept; }}\n\
             add rule inet {NFT_TABLE} output socket cgroupv2 level {level} \"{cgroup_path}\" jump agent\n"
        );
        let t0 = Instant::now();
        nft(&["-f", &file.display().to_string()], None)?;
        Ok(Nft {
            base,
            stats,
            load_time: t0.elapsed(),
            file: file.to_path_buf(),
        })
    }

    /// Add (`true`) or remove (`false`) the base chain.
    pub fn hook(&self, on: bool) -> Result<()> {
        if on {
            nft(&["-f", "-"], Some(&self.base))
        } else {
            nft(
                &["-f", "-"],
                Some(&format!(
                    "flush chain inet {NFT_TABLE} output\ndelete chain inet {NFT_TABLE} output\n"
                )),
            )
        }
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "inet", NFT_TABLE], None) {
            eprintln!("bench: could not delete the nftables table {NFT_TABLE}: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------
// dnsmasq

/// dnsmasq forwarding to `upstream`, no cache, on 127.0.0.1:`port`. Dropped:
/// killed.
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    pub args: Vec<String>,
}

impl Dnsmasq {
    /// Its log (`--log-facility=-`: stderr) goes to `log`.
    pub fn start(upstream: SocketAddr, log: &Path) -> Result<Self> {
        // A free port (the race with another process binding it meanwhile
        // shows as dnsmasq exiting: reported below).
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let args: Vec<String> = vec![
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--cache-size=0".into(),
            format!("--server={}#{}", upstream.ip(), upstream.port()),
            format!("--port={port}"),
            "--listen-address=127.0.0.1".into(),
            "--bind-interfaces".into(),
            "--pid-file=".into(),
            "--user=nobody".into(),
            "--log-facility=-".into(),
        ];
        let mut child = Command::new("dnsmasq")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("starting dnsmasq")?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        // Ready when it answers (any answer: the zone's names are not asked
        // here).
        let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
        probe.set_read_timeout(Some(Duration::from_millis(100)))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let q = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1, // root NS
        ];
        loop {
            if let Some(st) = child.try_wait()? {
                let err = std::fs::read_to_string(log).unwrap_or_default();
                bail!("dnsmasq exited ({st}): {}", err.trim());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("dnsmasq did not answer on {addr} within 10 s");
            }
            let _ = probe.send_to(&q, addr);
            let mut buf = [0u8; 512];
            if let Ok((n, _)) = probe.recv_from(&mut buf) {
                if n >= 2 && buf[..2] == q[..2] {
                    break;
                }
            }
        }
        Ok(Dnsmasq { child, addr, args })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(addr: &str, len: u32, ports: &[Port], proto: Option<Proto>) -> Rule {
        Rule {
            addr: addr.parse().unwrap(),
            len,
            ports: ports.to_vec(),
            proto,
        }
    }

    #[test]
    fn every_rule_shape_becomes_set_elements() {
        let rules = [
            rule("127.0.0.1", 32, &[Port::One(4000)], Some(Proto::Tcp)),
            rule("10.0.0.0", 8, &[], None),
            rule("10.1.0.0", 16, &[], Some(Proto::Udp)),
            rule(
                "192.168.0.0",
                24,
                &[Port::One(53), Port::Range(100, 200)],
                None,
            ),
            rule("2001:db8::", 32, &[Port::One(443)], Some(Proto::Tcp)),
        ];
        let (t, stats) = nft_ruleset(&rules);
        for line in [
            "127.0.0.1/32 . tcp . 4000,",
            "10.0.0.0/8,",
            "10.1.0.0/16 . udp,",
            "192.168.0.0/24 . tcp . 53,",
            "192.168.0.0/24 . udp . 53,",
            "192.168.0.0/24 . tcp . 100-200,",
            "192.168.0.0/24 . udp . 100-200,",
            "2001:db8::/32 . tcp . 443,",
            "ip daddr . meta l4proto . th dport @v4_pp_0 accept",
            "ip daddr . meta l4proto @v4_p_0 accept",
            "ip daddr @v4_any_0 accept",
            "ip6 daddr . meta l4proto . th dport @v6_pp_0 accept",
            "reject with icmpx admin-prohibited",
        ] {
            assert!(t.contains(line), "missing {line:?} in\n{t}");
        }
        assert_eq!(
            stats,
            NftStats {
                rules: 5,
                elements: 8,
                sets: [
                    ("v4_pp_0", 5),
                    ("v4_p_0", 1),
                    ("v4_any_0", 1),
                    ("v6_pp_0", 1)
                ]
                .map(|(n, c)| (n.to_string(), c))
                .to_vec(),
                covered: 0
            }
        );
    }

    #[test]
    fn nested_prefixes_are_left_out_when_covered_and_split_when_they_overlap() {
        let rules = [
            rule("10.0.0.0", 8, &[Port::Range(1000, 2000)], Some(Proto::Tcp)),
            // Covered by the /8: same answer, left out.
            rule("10.1.2.0", 24, &[Port::One(1500)], Some(Proto::Tcp)),
            // Overlaps it (1900-2100): a second set.
            rule("10.1.3.0", 24, &[Port::Range(1900, 2100)], Some(Proto::Tcp)),
            // Does not overlap it (another protocol): the first set.
            rule("10.1.4.0", 24, &[Port::One(1500)], Some(Proto::Udp)),
        ];
        let (t, stats) = nft_ruleset(&rules);
        assert_eq!(stats.covered, 1);
        assert_eq!(stats.elements, 3);
        assert!(!t.contains("10.1.2.0/24"), "{t}");
        let set1 = &t[t.find("set v4_pp_1").expect("a second set")..];
        assert!(set1[..set1.find('}').unwrap()].contains("10.1.3.0/24 . tcp . 1900-2100"));
        let set0 = &t[t.find("set v4_pp_0").unwrap()..];
        assert!(set0[..set0.find("  }\n").unwrap()].contains("10.1.4.0/24 . udp . 1500"));
    }

    #[test]
    fn nft_cgroup_counts_levels_from_the_cgroup2_root() {
        let (p, l) = nft_cgroup(
            Path::new("/sys/fs/cgroup/unified"),
            Path::new("/sys/fs/cgroup/unified/enforcer-bench/nft"),
        )
        .unwrap();
        assert_eq!((p.as_str(), l), ("unified/enforcer-bench/nft", 2));
        let (p, l) = nft_cgroup(
            Path::new("/sys/fs/cgroup"),
            Path::new("/sys/fs/cgroup/enforcer-bench/nft"),
        )
        .unwrap();
        assert_eq!((p.as_str(), l), ("enforcer-bench/nft", 2));
    }
}
