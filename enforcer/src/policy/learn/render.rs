//! A [`Proposal`] -> policy YAML with every rule's evidence as comments,
//! and the difference between two policies (`--diff`).
use std::fmt::Write as _;

use super::propose::{Item, Proposal};
use crate::policy::{
    aip::{comment, quoted},
    AgentPolicy, EgressRule, FileAccess, Inspect, PortRange, Protocol,
};

/// The YAML of `policy` (built from `p`), with `header` lines on top.
pub fn yaml(policy: &AgentPolicy, p: &Proposal, header: &[String]) -> String {
    let mut y = String::new();
    for h in header {
        for line in h.lines() {
            let _ = writeln!(y, "{}", comment(&format!("# {line}")).trim_end());
        }
    }
    let _ = writeln!(
        y,
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: {}\nspec:",
        policy.api_version, policy.kind, policy.metadata.name
    );
    if let Some(id) = &policy.spec.identity {
        y.push_str("  # from the run's policy (--from)\n  identity:\n");
        let text = serde_saphyr::to_string(id).unwrap_or_default();
        for line in text.lines().filter(|l| !l.trim().is_empty() && *l != "---") {
            let _ = writeln!(y, "    {line}");
        }
    }
    y.push_str("  mode: enforce\n");
    egress(&mut y, "  ", "egress", &p.egress, &p.resolved_only);
    if !p.ingress.is_empty() {
        y.push_str("  ingress:\n");
        for i in &p.ingress {
            why(&mut y, "    ", &i.why);
            let _ = writeln!(y, "    - cidr: {}", i.rule.cidr);
            ports_protocol(&mut y, "      ", &i.rule.ports, i.rule.protocol);
        }
    }
    let d = &policy.spec.dns;
    if let Some(d) = d {
        y.push_str("  dns:\n");
        let w = |y: &mut String, key: &str| {
            if let Some(text) = p.dns_why.get(key) {
                let _ = writeln!(y, "    {}", comment(&format!("# {text}")));
            }
        };
        if !d.upstream.is_empty() {
            w(&mut y, "upstream");
            let list: Vec<String> = d.upstream.iter().map(|u| quoted(&u.to_string())).collect();
            let _ = writeln!(y, "    upstream: [{}]", list.join(", "));
        }
        if let Some(t) = d.ttl {
            let _ = writeln!(
                y,
                "    ttl: {{min: {}s, max: {}s}}",
                t.min.as_secs(),
                t.max.as_secs()
            );
        }
        if let Some(m) = d.max_query_length {
            w(&mut y, "maxQueryLength");
            let _ = writeln!(y, "    maxQueryLength: {m}");
        }
        if !d.query_types.is_empty() {
            w(&mut y, "queryTypes");
            let _ = writeln!(y, "    queryTypes: [{}]", d.query_types.join(", "));
        }
        if let Some(n) = d.names_per_minute {
            w(&mut y, "namesPerMinute");
            let _ = writeln!(y, "    namesPerMinute: {n}");
        }
    }
    if !p.files.is_empty() {
        y.push_str("  files:\n");
        for f in &p.files {
            why(&mut y, "    ", &f.why);
            let access = match f.rule.access {
                FileAccess::Deny => "deny",
                FileAccess::Audit => "audit",
                FileAccess::Taint => "taint",
            };
            let _ = writeln!(
                y,
                "    - path: {}\n      access: {access}",
                quoted(&f.rule.path.display().to_string())
            );
        }
    }
    if let Some(rules) = &p.on_taint {
        y.push_str(
            "  # After the first read of a `taint` file, egress narrows to these rules\n  \
             # (what the run did after that read).\n  onTaint:\n",
        );
        egress(&mut y, "    ", "egress", rules, &p.resolved_only_taint);
    }
    if !p.local.is_empty() {
        y.push_str("  local:\n");
        for l in &p.local {
            why(&mut y, "    ", &l.why);
            match (&l.rule.path, &l.rule.abstract_name) {
                (Some(path), _) => {
                    let _ = writeln!(y, "    - path: {}", quoted(&path.display().to_string()));
                }
                (None, Some(a)) => {
                    let _ = writeln!(y, "    - abstract: {}", quoted(a));
                }
                (None, None) => {}
            }
        }
    }
    y
}

fn why(y: &mut String, indent: &str, lines: &[String]) {
    for l in lines {
        let _ = writeln!(y, "{indent}{}", comment(&format!("# {l}")));
    }
}

fn egress(
    y: &mut String,
    indent: &str,
    key: &str,
    rules: &[Item<EgressRule>],
    resolved_only: &[(String, super::propose::Evidence)],
) {
    if rules.is_empty() {
        let _ = writeln!(
            y,
            "{indent}# nothing observed: every destination is denied\n{indent}{key}: []"
        );
    } else {
        let _ = writeln!(y, "{indent}{key}:");
    }
    let item = format!("{indent}  ");
    for r in rules {
        why(y, &item, &r.why);
        match (&r.rule.host, &r.rule.cidr) {
            (Some(h), _) => {
                let _ = writeln!(y, "{item}- host: {}", quoted(h));
            }
            (None, Some(c)) => {
                let _ = writeln!(y, "{item}- cidr: {c}");
            }
            (None, None) => continue,
        }
        let field = format!("{item}  ");
        ports_protocol(y, &field, &r.rule.ports, r.rule.protocol);
        if r.rule.inspect == Inspect::None {
            let _ = writeln!(y, "{field}inspect: none");
        }
    }
    if !resolved_only.is_empty() {
        let _ = writeln!(
            y,
            "{item}# Resolved, never connected to: not allowed (the agent's queries for them\n\
             {item}# are refused). Uncomment a rule, with the ports it needs, to allow one:"
        );
        for (name, ev) in resolved_only {
            let _ = writeln!(
                y,
                "{item}{}",
                comment(&format!(
                    "# - host: {}   # {}",
                    quoted(name),
                    ev.text("queries")
                ))
            );
        }
    }
}

fn ports_protocol(y: &mut String, indent: &str, ports: &[PortRange], proto: Protocol) {
    if !ports.is_empty() {
        let _ = writeln!(y, "{indent}ports: [{}]", ports_list(ports));
    }
    let p = match proto {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "any",
    };
    let _ = writeln!(y, "{indent}protocol: {p}");
}

fn ports_list(ports: &[PortRange]) -> String {
    ports
        .iter()
        .map(|r| {
            if r.lo == r.hi {
                r.lo.to_string()
            } else {
                format!("\"{}-{}\"", r.lo, r.hi)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per rule or setting: `+` only in `new`, `-` only in `old`.
pub fn diff(old: &AgentPolicy, new: &AgentPolicy) -> Vec<String> {
    let mut out = Vec::new();
    let mut section = |name: &str, a: Vec<String>, b: Vec<String>| {
        for x in &a {
            if !b.contains(x) {
                out.push(format!("- {name}: {x}"));
            }
        }
        for x in &b {
            if !a.contains(x) {
                out.push(format!("+ {name}: {x}"));
            }
        }
    };
    let egress = |rules: &[EgressRule]| rules.iter().map(egress_text).collect::<Vec<_>>();
    section("egress", egress(&old.spec.egress), egress(&new.spec.egress));
    let on_taint = |p: &AgentPolicy| {
        p.spec
            .on_taint
            .as_ref()
            .map(|t| egress(&t.egress))
            .unwrap_or_default()
    };
    section("onTaint.egress", on_taint(old), on_taint(new));
    let ingress = |p: &AgentPolicy| {
        p.spec
            .ingress
            .iter()
            .map(|i| egress_text(&i.as_egress()))
            .collect::<Vec<_>>()
    };
    section("ingress", ingress(old), ingress(new));
    let files = |p: &AgentPolicy| {
        p.spec
            .files
            .iter()
            .map(|f| format!("{} {:?}", f.path.display(), f.access).to_lowercase())
            .collect::<Vec<_>>()
    };
    section("files", files(old), files(new));
    let local = |p: &AgentPolicy| {
        p.spec
            .local
            .iter()
            .map(|l| match (&l.path, &l.abstract_name) {
                (Some(p), _) => format!("path {}", p.display()),
                (None, Some(a)) => format!("abstract {a}"),
                (None, None) => String::new(),
            })
            .collect::<Vec<_>>()
    };
    section("local", local(old), local(new));
    let dns = |p: &AgentPolicy| {
        let Some(d) = &p.spec.dns else {
            return Vec::new();
        };
        let mut v = Vec::new();
        if !d.upstream.is_empty() {
            v.push(format!("upstream {:?}", d.upstream));
        }
        if let Some(t) = d.ttl {
            v.push(format!("ttl {}s..{}s", t.min.as_secs(), t.max.as_secs()));
        }
        if let Some(m) = d.max_query_length {
            v.push(format!("maxQueryLength {m}"));
        }
        if !d.query_types.is_empty() {
            v.push(format!("queryTypes [{}]", d.query_types.join(", ")));
        }
        if let Some(n) = d.names_per_minute {
            v.push(format!("namesPerMinute {n}"));
        }
        v
    };
    section("dns", dns(old), dns(new));
    if old.spec.mode != new.spec.mode {
        out.push(format!(
            "~ mode: {:?} -> {:?}",
            old.spec.mode, new.spec.mode
        ));
    }
    out
}

/// `host api.example.com ports [443] tcp` / `cidr 10.0.0.0/8 ports [all] any`.
pub fn egress_text(r: &EgressRule) -> String {
    let dest = match (&r.host, &r.cidr) {
        (Some(h), _) => format!("host {h}"),
        (None, Some(c)) => format!("cidr {c}"),
        (None, None) => "?".into(),
    };
    let ports = if r.ports.is_empty() {
        "all".to_string()
    } else {
        ports_list(&r.ports).replace('"', "")
    };
    let proto = match r.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "any",
    };
    let inspect = if r.inspect == Inspect::None && r.host.is_some() {
        " inspect none"
    } else {
        ""
    };
    format!("{dest} ports [{ports}] {proto}{inspect}")
}
