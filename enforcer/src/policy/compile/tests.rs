//! Compilation: a reference LPM matcher over the compiled entries is checked
//! against brute-force, in-order evaluation of the original rules.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer_common::proto::{ANY, OTHER, TCP, UDP};

use super::*;
use crate::policy::{AgentPolicy, Metadata, PortRange, Spec, API_VERSION, KIND};

fn rule(cidr: &str, ports: &[(u16, u16)], protocol: Protocol) -> EgressRule {
    EgressRule {
        cidr: Some(crate::policy::validate::parse_cidr(cidr).unwrap()),
        host: None,
        ports: ports.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect(),
        protocol,
        inspect: Inspect::Name,
    }
}

fn loaded(egress: Vec<EgressRule>) -> LoadedPolicy {
    LoadedPolicy::from_policy(
        AgentPolicy {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata { name: "t".into() },
            spec: Spec {
                egress,
                ..Spec::default()
            },
        },
        "t.yaml",
    )
}

fn first_match(set: &RuleSet, port: u16, bit: u8) -> Option<u32> {
    set.rules[..set.count as usize]
        .iter()
        .find(|r| r.proto_mask & bit != 0 && r.port_lo <= port && port <= r.port_hi)
        .map(|r| r.rule_id)
}

/// What the kernel does: mapped IPv6 goes to the IPv4 table, one LPM lookup,
/// then the first entry of that prefix admitting (port, protocol).
fn matches(c: &CompiledPolicy, ip: IpAddr, port: u16, bit: u8) -> Option<u32> {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            c.v4.iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .and_then(|(_, s)| first_match(s, port, bit))
        }
        IpAddr::V6(a) => {
            c.v6.iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .and_then(|(_, s)| first_match(s, port, bit))
        }
    }
}

/// The policy's meaning: the first rule (in file order) admitting the
/// connection. A mapped destination is an IPv4 destination.
fn brute(p: &LoadedPolicy, ip: IpAddr, port: u16, bit: u8) -> Option<u32> {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    p.policy.spec.egress.iter().enumerate().find_map(|(i, r)| {
        let net = family_net(r.cidr?);
        let port_ok = r.ports.is_empty() || r.ports.iter().any(|pr| pr.lo <= port && port <= pr.hi);
        (net.contains(&ip) && port_ok && proto_mask(r.protocol) & bit != 0).then_some(i as u32 + 1)
    })
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().unwrap())
}

#[test]
fn overlapping_prefixes_carry_the_broader_rules() {
    let p = loaded(vec![
        rule("10.0.0.0/8", &[(443, 443)], Protocol::Tcp),
        rule("10.1.0.0/16", &[(80, 80)], Protocol::Tcp),
    ]);
    let c = compile(&p).unwrap();
    assert_eq!(c.entry_count(), 2);
    let (net, set) = &c.v4[1];
    assert_eq!(net.to_string(), "10.1.0.0/16");
    assert_eq!(set.count, 2);
    // A lookup landing on the /16 admits both 80 and 443.
    assert_eq!(matches(&c, v4("10.1.2.3"), 80, TCP), Some(2));
    assert_eq!(matches(&c, v4("10.1.2.3"), 443, TCP), Some(1));
    assert_eq!(matches(&c, v4("10.1.2.3"), 443, UDP), None);
    assert_eq!(matches(&c, v4("10.2.0.1"), 80, TCP), None);
    assert_eq!(matches(&c, v4("10.2.0.1"), 443, TCP), Some(1));
    assert_eq!(matches(&c, v4("11.0.0.1"), 443, TCP), None);
}

#[test]
fn default_routes_and_bare_addresses() {
    let p = loaded(vec![
        rule("0.0.0.0/0", &[(53, 53)], Protocol::Udp),
        rule("::/0", &[(53, 53)], Protocol::Udp),
        rule("192.0.2.7", &[], Protocol::Any),
        rule("2001:db8::7", &[(22, 22)], Protocol::Tcp),
    ]);
    let c = compile(&p).unwrap();
    let v4s: Vec<String> = c.v4.iter().map(|(n, _)| n.to_string()).collect();
    let v6s: Vec<String> = c.v6.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(v4s, ["0.0.0.0/0", "192.0.2.7/32"]);
    assert_eq!(v6s, ["::/0", "2001:db8::7/128"]);
    assert_eq!(matches(&c, v4("8.8.8.8"), 53, UDP), Some(1));
    assert_eq!(matches(&c, v4("8.8.8.8"), 53, TCP), None);
    assert_eq!(matches(&c, v4("192.0.2.7"), 53, UDP), Some(1));
    assert_eq!(matches(&c, v4("192.0.2.7"), 9, OTHER), Some(3));
    let a: IpAddr = "2001:db8::7".parse().unwrap();
    assert_eq!(matches(&c, a, 22, TCP), Some(4));
    assert_eq!(matches(&c, a, 53, UDP), Some(2));
    assert_eq!(matches(&c, "2001:db8::8".parse().unwrap(), 22, TCP), None);
    // ::/0 is IPv6 only: a mapped destination is judged by the IPv4 table.
    assert_eq!(
        matches(&c, "::ffff:8.8.8.8".parse().unwrap(), 53, UDP),
        Some(1)
    );
    // The all-ports entry of the bare address.
    let set = &c.v4[1].1;
    let all = set.rules[..set.count as usize]
        .iter()
        .find(|r| r.rule_id == 3)
        .unwrap();
    assert_eq!((all.port_lo, all.port_hi, all.proto_mask), (0, 65535, ANY));
}

#[test]
fn mapped_ipv4_becomes_an_ipv4_rule() {
    let p = loaded(vec![
        rule("::ffff:10.0.0.0/104", &[(443, 443)], Protocol::Tcp),
        rule("::ffff:127.0.0.1/128", &[], Protocol::Any),
    ]);
    let c = compile(&p).unwrap();
    assert!(c.v6.is_empty());
    let v4s: Vec<String> = c.v4.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(v4s, ["10.0.0.0/8", "127.0.0.1/32"]);
    assert_eq!(matches(&c, v4("10.9.9.9"), 443, TCP), Some(1));
    assert_eq!(
        matches(&c, "::ffff:10.9.9.9".parse().unwrap(), 443, TCP),
        Some(1)
    );
    assert_eq!(
        c.rules[0],
        "egress[0] cidr ::ffff:10.0.0.0/104 (as 10.0.0.0/8) ports 443 tcp"
    );
}

#[test]
fn ports_protocols_and_merging() {
    let p = loaded(vec![
        // Same rule: overlapping / touching ranges merge into 80-100, 200.
        rule(
            "10.0.0.0/24",
            &[(80, 80), (81, 90), (85, 100), (200, 200)],
            Protocol::Tcp,
        ),
        // Already admitted by rule 1 for TCP: only UDP and OTHER remain.
        rule("10.0.0.0/24", &[(85, 86)], Protocol::Any),
        // Fully shadowed by rule 1: dropped.
        rule("10.0.0.0/24", &[(90, 90)], Protocol::Tcp),
        rule("10.0.0.0/24", &[(1000, 2000)], Protocol::Udp),
    ]);
    let c = compile(&p).unwrap();
    let set = &c.v4[0].1;
    let got: Vec<(u16, u16, u8, u32)> = set.rules[..set.count as usize]
        .iter()
        .map(|r| (r.port_lo, r.port_hi, r.proto_mask, r.rule_id))
        .collect();
    assert_eq!(
        got,
        [
            (80, 100, TCP, 1),
            (200, 200, TCP, 1),
            (85, 86, UDP | OTHER, 2),
            (1000, 2000, UDP, 4)
        ]
    );
    let ip = v4("10.0.0.9");
    assert_eq!(matches(&c, ip, 85, TCP), Some(1));
    assert_eq!(matches(&c, ip, 85, UDP), Some(2));
    assert_eq!(matches(&c, ip, 85, OTHER), Some(2));
    assert_eq!(matches(&c, ip, 101, TCP), None);
    assert_eq!(matches(&c, ip, 1500, UDP), Some(4));
    assert_eq!(matches(&c, ip, 1500, TCP), None);
}

#[test]
fn rule_ids_names_and_descriptions() {
    let p = loaded(vec![
        rule("10.20.0.0/16", &[(5432, 5432), (8000, 8100)], Protocol::Tcp),
        rule("127.0.0.1/32", &[], Protocol::Any),
    ]);
    let c = compile(&p).unwrap();
    assert_eq!(c.name, "t");
    assert_eq!(c.hash, p.hash);
    assert_eq!(
        c.rules,
        [
            "egress[0] cidr 10.20.0.0/16 ports 5432,8000-8100 tcp",
            "egress[1] cidr 127.0.0.1/32 ports all any"
        ]
    );
    assert_eq!(c.rule_name(1), "egress[0]");
    assert_eq!(c.rule_name(2), "egress[1]");
    assert_eq!(c.rule_name(3), "unknown-rule-3");
    assert_eq!(c.rule_name(0), "default-deny");
    assert_eq!(c.rule_name(enforcer_common::rule::NO_POLICY), "no-policy");
    assert_eq!(c.rule_name(enforcer_common::rule::RAW_SOCKET), "raw-socket");
    assert_eq!(
        c.rule_name(enforcer_common::rule::SOCKET_FAMILY),
        "socket-family"
    );
    for (_, set) in c.v4.iter() {
        for r in &set.rules[..set.count as usize] {
            assert!(r.rule_id >= 1 && r.rule_id as usize <= c.rules.len());
        }
    }
}

#[test]
fn too_many_entries_on_one_prefix() {
    let ports: Vec<(u16, u16)> = (0..17).map(|i| (1000 + 2 * i, 1000 + 2 * i)).collect();
    let e = compile(&loaded(vec![rule("10.0.0.1/32", &ports, Protocol::Tcp)]))
        .unwrap_err()
        .0;
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].field, "spec.egress[0].cidr");
    assert!(
        e[0].message.contains("prefix 10.0.0.1/32 needs 17"),
        "{}",
        e[0]
    );
    // Adjacent ports of one rule merge, so this fits.
    let ports: Vec<(u16, u16)> = (0..40).map(|i| (1000 + i, 1000 + i)).collect();
    compile(&loaded(vec![rule("10.0.0.1/32", &ports, Protocol::Tcp)])).unwrap();
}

#[test]
fn overflow_through_covering_rules_names_them() {
    let a: Vec<(u16, u16)> = (0..10).map(|i| (100 + 2 * i, 100 + 2 * i)).collect();
    let b: Vec<(u16, u16)> = (0..10).map(|i| (500 + 2 * i, 500 + 2 * i)).collect();
    let text = "apiVersion: enforcer.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: t}\nspec:\n  egress:\n";
    let ports = |v: &[(u16, u16)]| {
        v.iter()
            .map(|p| p.0.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        "{text}    - cidr: 10.0.0.0/8\n      ports: [{}]\n    - cidr: 10.1.0.0/16\n      ports: [{}]\n    - cidr: 10.2.0.0/16\n",
        ports(&a),
        ports(&b)
    );
    let p = &crate::policy::parse_str(&text, std::path::Path::new("o.yaml")).unwrap()[0];
    let e = compile(p).unwrap_err().0;
    assert_eq!(e.len(), 1, "{}", PolicyErrors(e.clone()));
    assert_eq!(
        (e[0].line, e[0].column, e[0].field.as_str()),
        (8, 7, "spec.egress[1].cidr")
    );
    let m = &e[0].message;
    assert!(m.contains("prefix 10.1.0.0/16 needs 20"), "{m}");
    assert!(
        m.contains("egress[0] (10.0.0.0/8)") && m.contains("egress[1] (10.1.0.0/16)"),
        "{m}"
    );
    assert!(e[0]
        .to_string()
        .starts_with("o.yaml:8:7: spec.egress[1].cidr: "));
}

fn host(h: &str, ports: &[(u16, u16)], protocol: Protocol) -> EgressRule {
    EgressRule {
        cidr: None,
        host: Some(h.into()),
        ports: ports.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect(),
        protocol,
        inspect: Inspect::Name,
    }
}

#[test]
fn host_rules_are_skipped_and_keep_rule_ids() {
    let p = loaded(vec![
        host("example.com", &[], Protocol::Any),
        rule("10.0.0.0/8", &[], Protocol::Any),
        host("*.example.com", &[(443, 443)], Protocol::Tcp),
        rule("10.1.0.0/16", &[(53, 53)], Protocol::Udp),
    ]);
    let c = compile(&p).unwrap();
    assert_eq!(c.v4.len(), 2);
    assert_eq!(c.rules.len(), 4);
    assert_eq!(c.rule_name(3), "egress[2]");
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    assert_eq!(matches(&c, ip, 53, UDP), Some(2));
    assert_eq!(c.v4[1].1.rules[..c.v4[1].1.count as usize].len(), 1);
}

#[test]
fn host_rule_sets_merge_ranges_and_rules_of_one_pattern() {
    let egress = vec![
        host(
            "a.example",
            &[(80, 80), (81, 90), (443, 443)],
            Protocol::Tcp,
        ),
        rule("10.0.0.0/8", &[], Protocol::Any),
        host("a.example", &[(53, 53), (85, 85)], Protocol::Any),
        host("b.example", &[], Protocol::Udp),
    ];
    let groups = host_groups(&egress);
    assert_eq!(
        groups,
        vec![
            ("a.example".into(), vec![1, 3]),
            ("b.example".into(), vec![4])
        ]
    );
    let set = host_rule_set(&egress, &[1, 3]).unwrap();
    let got: Vec<(u16, u16, u8, u32)> = set.rules[..set.count as usize]
        .iter()
        .map(|r| (r.port_lo, r.port_hi, r.proto_mask, r.rule_id))
        .collect();
    // 80 and 81-90 merge; port 85 of rule 3 keeps only what rule 1 lacks (udp, other).
    assert_eq!(
        got,
        vec![
            (80, 90, TCP, 1),
            (443, 443, TCP, 1),
            (53, 53, ANY, 3),
            (85, 85, UDP | OTHER, 3)
        ]
    );
    let set = host_rule_set(&egress, &[4]).unwrap();
    assert_eq!(set.count, 1);
    assert_eq!(
        (
            set.rules[0].port_lo,
            set.rules[0].port_hi,
            set.rules[0].proto_mask
        ),
        (0, u16::MAX, UDP)
    );
}

#[test]
fn host_rule_with_too_many_port_ranges_is_an_error() {
    let ports: Vec<(u16, u16)> = (0..20).map(|i| (1000 + 2 * i, 1000 + 2 * i)).collect();
    let p = loaded(vec![
        rule("10.0.0.0/8", &[], Protocol::Any),
        host("x.example", &ports, Protocol::Tcp),
    ]);
    let e = compile(&p).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].field, "spec.egress[1].ports");
    assert!(e.0[0].message.contains("host x.example needs 20"), "{e}");
}

#[test]
fn hundred_thousand_rules() {
    let mut egress = vec![rule("10.0.0.0/8", &[(443, 443)], Protocol::Tcp)];
    for i in 0..100_000u32 {
        let a = Ipv4Addr::from(0x0a00_0000 | (i * 7));
        egress.push(EgressRule {
            cidr: Some(IpNet::V4(Ipv4Net::new(a, 32).unwrap())),
            host: None,
            ports: vec![PortRange { lo: 80, hi: 80 }],
            protocol: Protocol::Tcp,
            inspect: Inspect::Name,
        });
    }
    for i in 0..1000u128 {
        let a = Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 16));
        egress.push(EgressRule {
            cidr: Some(IpNet::V6(Ipv6Net::new(a, 112).unwrap())),
            host: None,
            ports: vec![],
            protocol: Protocol::Udp,
            inspect: Inspect::Name,
        });
    }
    let c = compile(&loaded(egress)).unwrap();
    assert_eq!(c.v4.len(), 100_001);
    assert_eq!(c.v6.len(), 1000);
    assert_eq!(c.entry_count(), 101_001);
    assert_eq!(c.rules.len(), 101_001);
    // Every /32 carries its own rule and the covering /8.
    assert!(c.v4[1..].iter().all(|(_, s)| s.count == 2));
    assert_eq!(matches(&c, v4("10.0.0.7"), 80, TCP), Some(3));
    assert_eq!(matches(&c, v4("10.0.0.7"), 443, TCP), Some(1));
}

/// Small deterministic PRNG (SplitMix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random CIDR in a small space so that rules overlap a lot.
fn random_net(rng: &mut Rng) -> IpNet {
    match rng.below(10) {
        0 => "0.0.0.0/0".parse().unwrap(),
        1 => "::/0".parse().unwrap(),
        2..=5 => {
            let a = Ipv4Addr::from(
                0x0a00_0000 | (rng.below(1 << 12) as u32) << 4 | rng.below(16) as u32,
            );
            IpNet::V4(Ipv4Net::new(a, 8 + rng.below(25) as u8).unwrap().trunc())
        }
        6..=7 => {
            let a = Ipv6Addr::from((0x2001_0db8u128 << 96) | rng.below(1 << 16) as u128);
            IpNet::V6(Ipv6Net::new(a, 100 + rng.below(29) as u8).unwrap().trunc())
        }
        _ => {
            // IPv4-mapped IPv6.
            let a = Ipv4Addr::from(0x0a00_0000 | rng.below(1 << 16) as u32);
            let m = a.to_ipv6_mapped();
            IpNet::V6(
                Ipv6Net::new(m, 96 + 8 + rng.below(25) as u8)
                    .unwrap()
                    .trunc(),
            )
        }
    }
}

fn random_ip(rng: &mut Rng, nets: &[IpNet]) -> IpAddr {
    // Mostly inside some rule's network, sometimes anywhere nearby.
    let base = if nets.is_empty() || rng.below(4) == 0 {
        random_net(rng)
    } else {
        nets[rng.below(nets.len() as u64) as usize]
    };
    match base {
        IpNet::V4(n) => {
            let host = if n.prefix_len() == 0 {
                rng.next() as u32
            } else {
                rng.next() as u32 & !u32::from(n.netmask())
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
        }
        IpNet::V6(n) => {
            let host = (rng.next() as u128) & !u128::from(n.netmask());
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
        }
    }
}

#[test]
fn compiled_tables_agree_with_brute_force() {
    let mut rng = Rng(0x5eed);
    let mut compiled = 0;
    for _ in 0..300 {
        let n = 1 + rng.below(12) as usize;
        let egress: Vec<EgressRule> = (0..n)
            .map(|_| {
                let ports = (0..rng.below(4))
                    .map(|_| {
                        let lo = 1 + rng.below(60) as u16;
                        PortRange {
                            lo,
                            hi: lo + rng.below(6) as u16,
                        }
                    })
                    .collect();
                let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Any][rng.below(3) as usize];
                EgressRule {
                    cidr: Some(random_net(&mut rng)),
                    host: None,
                    ports,
                    protocol,
                    inspect: Inspect::Name,
                }
            })
            .collect();
        let nets: Vec<IpNet> = egress.iter().filter_map(|r| r.cidr).collect();
        let p = loaded(egress);
        let c = match compile(&p) {
            Ok(c) => c,
            Err(e) => {
                assert!(e.to_string().contains("port/protocol entries"), "{e}");
                continue;
            }
        };
        compiled += 1;
        for _ in 0..300 {
            let ip = random_ip(&mut rng, &nets);
            let port = [1 + rng.below(70) as u16, 0, 65535][(rng.below(20) / 18) as usize];
            let bit = [TCP, UDP, OTHER][rng.below(3) as usize];
            assert_eq!(
                matches(&c, ip, port, bit),
                brute(&p, ip, port, bit),
                "ip {ip} port {port} bit {bit}\nrules: {:#?}\nv4: {:?}\nv6: {:?}",
                c.rules,
                c.v4,
                c.v6
            );
        }
    }
    assert!(compiled > 250, "only {compiled} random policies compiled");
}
