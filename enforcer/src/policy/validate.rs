//! Schema validation: spanned YAML tree -> [`AgentPolicy`], collecting every
//! error of a document with its location and field path.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;

use super::{
    tree::{Node, Value},
    types::*,
    FieldSpans, PolicyError,
};

pub struct Validator<'a> {
    file: &'a Path,
    pub errors: Vec<PolicyError>,
    pub spans: FieldSpans,
}

/// The entries of a YAML mapping that passed the unknown-field check.
struct Fields<'n> {
    path: String,
    line: usize,
    column: usize,
    /// (key, key node, value node)
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

impl<'a> Validator<'a> {
    pub fn new(file: &'a Path) -> Self {
        Self {
            file,
            errors: Vec::new(),
            spans: FieldSpans::new(),
        }
    }

    fn err_at(&mut self, line: usize, column: usize, field: &str, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn err(&mut self, node: &Node, field: &str, message: impl Into<String>) {
        self.err_at(node.line, node.column, field, message);
    }

    fn expected(&mut self, node: &Node, field: &str, what: &str) {
        let found = node.value.describe();
        self.err(node, field, format!("expected {what}, found {found}"));
    }

    /// A mapping with only `allowed` keys (null counts as an empty mapping).
    /// Problems with the mapping as a whole (a missing field) are reported at
    /// the key that holds it, when there is one.
    fn map<'n>(&mut self, node: &'n Node, path: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let (line, column) = *self
            .spans
            .entry(path.to_owned())
            .or_insert((node.line, node.column));
        let entries = match &node.value {
            Value::Map(m) => m,
            Value::Null => {
                return Some(Fields {
                    path: path.to_owned(),
                    line,
                    column,
                    entries: Vec::new(),
                })
            }
            _ => {
                self.expected(node, path, "a mapping");
                return None;
            }
        };
        let mut fields = Fields {
            path: path.to_owned(),
            line,
            column,
            entries: Vec::new(),
        };
        for (k, v) in entries {
            let Value::Str(key) = &k.value else {
                self.expected(k, path, "a string key");
                continue;
            };
            if allowed.contains(&key.as_str()) {
                fields.entries.push((key.as_str(), k, v));
            } else {
                let hint = closest(key, allowed)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                self.err(
                    k,
                    &join(path, key),
                    format!(
                        "unknown field `{key}`{hint}, expected one of: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
        Some(fields)
    }

    /// The value of `name` in `f`; records where the field (its key) is.
    fn get<'n>(&mut self, f: &Fields<'n>, name: &str) -> Option<(&'n Node, String)> {
        let (_, key, node) = f.entries.iter().find(|(k, _, _)| *k == name)?;
        let path = join(&f.path, name);
        self.spans.insert(path.clone(), (key.line, key.column));
        Some((node, path))
    }

    fn required<'n>(&mut self, f: &Fields<'n>, name: &str) -> Option<(&'n Node, String)> {
        let r = self.get(f, name);
        if r.is_none() {
            let path = join(&f.path, name);
            let (line, column) = (f.line, f.column);
            self.err_at(line, column, &path, "missing required field");
        }
        r
    }

    fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            _ => {
                self.expected(node, path, "a string");
                None
            }
        }
    }

    fn seq<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            Value::Null => Some(&[]),
            _ => {
                self.expected(node, path, "a list");
                None
            }
        }
    }

    /// Check a string against `check`, reporting its error message.
    fn checked<T>(
        &mut self,
        node: &Node,
        path: &str,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.string(node, path)?;
        match check(&s) {
            Ok(v) => Some(v),
            Err(m) => {
                self.err(node, path, m);
                None
            }
        }
    }

    fn enumerated<T: Copy>(&mut self, node: &Node, path: &str, options: &[(&str, T)]) -> Option<T> {
        let s = self.string(node, path)?;
        match options.iter().find(|(n, _)| *n == s) {
            Some((_, v)) => Some(*v),
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.err(
                    node,
                    path,
                    format!("invalid value {s:?}, expected one of: {}", names.join(", ")),
                );
                None
            }
        }
    }

    /// Validate one document. `None` if anything was wrong (see `errors`).
    pub fn document(&mut self, root: &Node) -> Option<AgentPolicy> {
        let before = self.errors.len();
        let f = self.map(root, "", &["apiVersion", "kind", "metadata", "spec"])?;
        let api_version = self.required(&f, "apiVersion").and_then(|(n, p)| {
            self.checked(n, &p, |s| {
                if s == API_VERSION {
                    Ok(s.to_owned())
                } else {
                    Err(format!(
                        "unsupported apiVersion {s:?}, expected {API_VERSION:?}"
                    ))
                }
            })
        });
        let kind = self.required(&f, "kind").and_then(|(n, p)| {
            self.checked(n, &p, |s| {
                if s == KIND {
                    Ok(s.to_owned())
                } else {
                    Err(format!("unsupported kind {s:?}, expected {KIND:?}"))
                }
            })
        });
        let metadata = self
            .required(&f, "metadata")
            .and_then(|(n, p)| self.metadata(n, &p));
        let spec = self
            .required(&f, "spec")
            .and_then(|(n, p)| self.spec(n, &p));
        if self.errors.len() != before {
            return None;
        }
        Some(AgentPolicy {
            api_version: api_version?,
            kind: kind?,
            metadata: metadata?,
            spec: spec?,
        })
    }

    fn metadata(&mut self, node: &Node, path: &str) -> Option<Metadata> {
        let f = self.map(node, path, &["name"])?;
        let (n, p) = self.required(&f, "name")?;
        let name = self.checked(n, &p, |s| dns_label(s, "policy name"))?;
        Some(Metadata { name })
    }

    fn spec(&mut self, node: &Node, path: &str) -> Option<Spec> {
        let f = self.map(
            node,
            path,
            &[
                "identity", "mode", "egress", "ingress", "dns", "files", "onTaint", "writable",
                "local",
            ],
        )?;
        let mut ok = true;
        let mut spec = Spec::default();
        if let Some((n, p)) = self.get(&f, "identity") {
            spec.identity = self.identity(n, &p);
            ok &= spec.identity.is_some();
        }
        if let Some((n, p)) = self.get(&f, "mode") {
            match self.enumerated(n, &p, &[("enforce", Mode::Enforce), ("audit", Mode::Audit)]) {
                Some(m) => spec.mode = m,
                None => ok = false,
            }
        }
        if let Some((n, p)) = self.get(&f, "egress") {
            match self.egress(n, &p) {
                Some(e) => spec.egress = e,
                None => ok = false,
            }
        }
        if let Some((n, p)) = self.get(&f, "ingress") {
            match self.ingress(n, &p) {
                Some(e) => spec.ingress = e,
                None => ok = false,
            }
        }
        if let Some((n, p)) = self.get(&f, "dns") {
            spec.dns = self.dns(n, &p);
            ok &= spec.dns.is_some();
        }
        if let Some((n, p)) = self.get(&f, "files") {
            match self.files(n, &p) {
                Some(e) => spec.files = e,
                None => ok = false,
            }
        }
        if let Some((n, p)) = self.get(&f, "onTaint") {
            let t = self.map(n, &p, &["egress"]).and_then(|t| {
                let egress = match self.get(&t, "egress") {
                    Some((n, p)) => self.egress(n, &p)?,
                    None => Vec::new(),
                };
                Some(OnTaint { egress })
            });
            ok &= t.is_some();
            spec.on_taint = t;
        }
        if let Some((n, p)) = self.get(&f, "writable") {
            match self.writable(n, &p) {
                Some(w) => spec.writable = w,
                None => ok = false,
            }
        }
        if let Some((n, p)) = self.get(&f, "local") {
            match self.local(n, &p) {
                Some(l) => spec.local = l,
                None => ok = false,
            }
        }
        ok.then_some(spec)
    }

    fn identity(&mut self, node: &Node, path: &str) -> Option<Identity> {
        let f = self.map(node, path, &["spiffeId", "kubernetes"])?;
        let mut ok = true;
        let mut id = Identity::default();
        if let Some((n, p)) = self.get(&f, "spiffeId") {
            id.spiffe_id = self.checked(n, &p, spiffe_id);
            ok &= id.spiffe_id.is_some();
        }
        if let Some((n, p)) = self.get(&f, "kubernetes") {
            id.kubernetes = self.kubernetes(n, &p);
            ok &= id.kubernetes.is_some();
        }
        ok.then_some(id)
    }

    fn kubernetes(&mut self, node: &Node, path: &str) -> Option<KubernetesIdentity> {
        let f = self.map(node, path, &["namespace", "serviceAccount", "podSelector"])?;
        let mut ok = true;
        let mut k = KubernetesIdentity::default();
        if let Some((n, p)) = self.get(&f, "namespace") {
            k.namespace = self.checked(n, &p, |s| dns_label(s, "namespace"));
            ok &= k.namespace.is_some();
        }
        if let Some((n, p)) = self.get(&f, "serviceAccount") {
            k.service_account = self.checked(n, &p, |s| dns_subdomain(s, "service account"));
            ok &= k.service_account.is_some();
        }
        if let Some((n, p)) = self.get(&f, "podSelector") {
            k.pod_selector = self.selector(n, &p);
            ok &= k.pod_selector.is_some();
        }
        ok.then_some(k)
    }

    fn selector(&mut self, node: &Node, path: &str) -> Option<LabelSelector> {
        let f = self.map(node, path, &["matchLabels", "matchExpressions"])?;
        let before = self.errors.len();
        let mut sel = LabelSelector::default();
        if let Some((n, p)) = self.get(&f, "matchLabels") {
            if let Value::Map(entries) = &n.value {
                for (k, v) in entries {
                    let key = self.checked(k, &p, label_key);
                    let kp = join(&p, &key.clone().unwrap_or_default());
                    let val = self.checked(v, &kp, label_value);
                    if let (Some(key), Some(val)) = (key, val) {
                        sel.match_labels.insert(key, val);
                    }
                }
            } else if n.value != Value::Null {
                self.expected(n, &p, "a mapping of label keys to values");
            }
        }
        if let Some((n, p)) = self.get(&f, "matchExpressions") {
            for (i, item) in self.seq(n, &p).unwrap_or_default().iter().enumerate() {
                let ip = format!("{p}[{i}]");
                if let Some(r) = self.requirement(item, &ip) {
                    sel.match_expressions.push(r);
                }
            }
        }
        (self.errors.len() == before).then_some(sel)
    }

    fn requirement(&mut self, node: &Node, path: &str) -> Option<LabelSelectorRequirement> {
        let f = self.map(node, path, &["key", "operator", "values"])?;
        let before = self.errors.len();
        let key = self
            .required(&f, "key")
            .and_then(|(n, p)| self.checked(n, &p, label_key));
        let op = self.required(&f, "operator").and_then(|(n, p)| {
            use SelectorOperator::*;
            let ops = [
                ("In", In),
                ("NotIn", NotIn),
                ("Exists", Exists),
                ("DoesNotExist", DoesNotExist),
            ];
            Some((self.enumerated(n, &p, &ops)?, n, p))
        });
        let mut values = Vec::new();
        let values_field = self.get(&f, "values");
        if let Some((n, p)) = &values_field {
            for (i, v) in self.seq(n, p).unwrap_or_default().iter().enumerate() {
                values.extend(self.checked(v, &format!("{p}[{i}]"), label_value));
            }
        }
        if self.errors.len() != before {
            return None;
        }
        let (op, op_node, op_path) = op?;
        let needs_values = matches!(op, SelectorOperator::In | SelectorOperator::NotIn);
        if needs_values && values.is_empty() {
            let m = format!("operator {op:?} needs a non-empty `values` list");
            self.err(op_node, &op_path, m);
            return None;
        }
        if let (false, Some((n, p))) = (needs_values, &values_field) {
            if !values.is_empty() {
                self.err(n, p, format!("operator {op:?} takes no `values`"));
                return None;
            }
        }
        Some(LabelSelectorRequirement {
            key: key?,
            operator: op,
            values,
        })
    }

    fn egress(&mut self, node: &Node, path: &str) -> Option<Vec<EgressRule>> {
        let items = self.seq(node, path)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.egress_rule(item, &format!("{path}[{i}]")) {
                Some(r) => out.push(r),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn ingress(&mut self, node: &Node, path: &str) -> Option<Vec<IngressRule>> {
        let items = self.seq(node, path)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            // Peers are judged by address: no `host` (a peer's name is not
            // known when its SYN arrives) and nothing to inspect.
            let Some(f) = self.map(item, &p, &["cidr", "ports", "protocol"]) else {
                ok = false;
                continue;
            };
            if self.get(&f, "cidr").is_none() {
                self.err_at(
                    f.line,
                    f.column,
                    &p,
                    "an ingress rule needs `cidr` (the peers' addresses)",
                );
                ok = false;
                continue;
            }
            match self.egress_rule(item, &p) {
                Some(EgressRule {
                    cidr: Some(cidr),
                    ports,
                    protocol,
                    ..
                }) => out.push(IngressRule {
                    cidr,
                    ports,
                    protocol,
                }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn egress_rule(&mut self, node: &Node, path: &str) -> Option<EgressRule> {
        let f = self.map(
            node,
            path,
            &["cidr", "host", "ports", "protocol", "inspect"],
        )?;
        let before = self.errors.len();
        let cidr = self.get(&f, "cidr");
        let host = self.get(&f, "host");
        let (cidr, host) = match (cidr, host) {
            (Some((n, p)), None) => (self.checked(n, &p, parse_cidr), None),
            (None, Some((n, p))) => (None, self.checked(n, &p, host_pattern)),
            (Some(_), Some((n, p))) => {
                self.err(
                    n,
                    &p,
                    "a rule has either `cidr` or `host`, not both; split it into two rules",
                );
                (None, None)
            }
            (None, None) => {
                self.err_at(f.line, f.column, path, "a rule needs `cidr` or `host`");
                (None, None)
            }
        };
        let mut ports = Vec::new();
        if let Some((n, p)) = self.get(&f, "ports") {
            match &n.value {
                Value::Seq(items) if !items.is_empty() => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(r) = self.port(item, &format!("{p}[{i}]")) {
                            ports.push(r);
                        }
                    }
                }
                Value::Seq(_) | Value::Null => self.err(
                    n,
                    &p,
                    "an empty list allows no port; omit `ports` to allow all ports",
                ),
                _ => self.expected(n, &p, "a list of ports"),
            }
        }
        let mut protocol = Protocol::Any;
        if let Some((n, p)) = self.get(&f, "protocol") {
            if let Some(pr) = self.enumerated(
                n,
                &p,
                &[
                    ("tcp", Protocol::Tcp),
                    ("udp", Protocol::Udp),
                    ("any", Protocol::Any),
                ],
            ) {
                protocol = pr;
            }
        }
        let mut inspect = Inspect::Name;
        if let Some((n, p)) = self.get(&f, "inspect") {
            if let Some(i) =
                self.enumerated(n, &p, &[("name", Inspect::Name), ("none", Inspect::None)])
            {
                if cidr.is_some() {
                    self.err(
                        n,
                        &p,
                        "`inspect` applies to `host` rules only: a `cidr` rule's connections \
                         are never judged by their first bytes",
                    );
                }
                inspect = i;
            }
        }
        if let (Some(h), Inspect::Name) = (&host, inspect) {
            let body = h.strip_prefix("*.").unwrap_or(h);
            if body.len() > enforcer_common::first_bytes::NAME_MAX {
                if let Some((n, p)) = self.get(&f, "host") {
                    self.err(
                        n,
                        &p,
                        format!(
                            "a name longer than {} characters cannot be checked against the \
                             TLS SNI / HTTP Host in the kernel; shorten it or add `inspect: none`",
                            enforcer_common::first_bytes::NAME_MAX
                        ),
                    );
                }
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(EgressRule {
            cidr,
            host,
            ports,
            protocol,
            inspect,
        })
    }

    fn port(&mut self, node: &Node, path: &str) -> Option<PortRange> {
        let r = match &node.value {
            Value::Int(i) => port_number(&i.to_string()).map(|p| PortRange { lo: p, hi: p }),
            Value::Str(s) => port_range(s),
            _ => {
                self.expected(node, path, "a port number or a \"lo-hi\" range");
                return None;
            }
        };
        r.map_err(|m| self.err(node, path, m)).ok()
    }

    fn dns(&mut self, node: &Node, path: &str) -> Option<Dns> {
        let f = self.map(
            node,
            path,
            &[
                "upstream",
                "ttl",
                "maxQueryLength",
                "queryTypes",
                "namesPerMinute",
            ],
        )?;
        let before = self.errors.len();
        let mut dns = Dns::default();
        if let Some((n, p)) = self.get(&f, "upstream") {
            for (i, item) in self.seq(n, &p).unwrap_or_default().iter().enumerate() {
                if let Some(a) = self.checked(item, &format!("{p}[{i}]"), upstream) {
                    dns.upstream.push(a);
                }
            }
        }
        if let Some((n, p)) = self.get(&f, "ttl") {
            if let Some(t) = self.map(n, &p, &["min", "max"]) {
                let min = self
                    .required(&t, "min")
                    .and_then(|(n, p)| self.duration(n, &p));
                let max = self.required(&t, "max");
                let maxv = max.as_ref().and_then(|(n, p)| self.duration(n, p));
                if let (Some(min), Some(maxv), Some((mn, mp))) = (min, maxv, &max) {
                    if min > maxv {
                        self.err(
                            mn,
                            mp,
                            format!(
                                "ttl.max ({}s) is less than ttl.min ({}s)",
                                maxv.as_secs(),
                                min.as_secs()
                            ),
                        );
                    } else {
                        dns.ttl = Some(DnsTtl { min, max: maxv });
                    }
                }
            }
        }
        if let Some((n, p)) = self.get(&f, "maxQueryLength") {
            match &n.value {
                Value::Int(i) if (1..=253).contains(i) => dns.max_query_length = Some(*i as u16),
                Value::Int(i) => self.err(n, &p, format!("{i} is out of range 1..=253")),
                _ => self.expected(n, &p, "an integer 1..=253"),
            }
        }
        if let Some((n, p)) = self.get(&f, "queryTypes") {
            match &n.value {
                Value::Seq(items) if !items.is_empty() => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(t) = self.checked(item, &format!("{p}[{i}]"), query_type) {
                            if !dns.query_types.contains(&t) {
                                dns.query_types.push(t);
                            }
                        }
                    }
                }
                Value::Seq(_) | Value::Null => self.err(
                    n,
                    &p,
                    "an empty list allows no query type; omit `queryTypes` for the default \
                     [A, AAAA]",
                ),
                _ => self.expected(n, &p, "a list of record types such as [A, AAAA, TXT]"),
            }
        }
        if let Some((n, p)) = self.get(&f, "namesPerMinute") {
            match &n.value {
                Value::Int(i) if (1..=i128::from(u32::MAX)).contains(i) => {
                    dns.names_per_minute = Some(*i as u32)
                }
                Value::Int(i) => self.err(n, &p, format!("{i} is out of range 1..={}", u32::MAX)),
                _ => self.expected(n, &p, "an integer >= 1"),
            }
        }
        (self.errors.len() == before).then_some(dns)
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        if let Value::Int(i) = node.value {
            self.err(
                node,
                path,
                format!("invalid duration `{i}`: a unit is required ({i}s, {i}m or {i}h)"),
            );
            return None;
        }
        self.checked(node, path, duration)
    }

    fn writable(&mut self, node: &Node, path: &str) -> Option<Vec<PathBuf>> {
        let before = self.errors.len();
        let mut out = Vec::new();
        for (i, item) in self.seq(node, path)?.iter().enumerate() {
            if let Some(p) = self.checked(item, &format!("{path}[{i}]"), file_path) {
                out.push(p);
            }
        }
        (self.errors.len() == before).then_some(out)
    }

    /// `spec.local`: `- path: /abs/socket` or `- abstract: name`. A resolver
    /// IPC socket (the default list) is an error that says why.
    fn local(&mut self, node: &Node, path: &str) -> Option<Vec<LocalRule>> {
        use super::local::{
            default_resolver_sockets, local_abstract, local_path, resolver_conflict,
        };
        let before = self.errors.len();
        let resolvers = default_resolver_sockets();
        let mut out = Vec::new();
        for (i, item) in self.seq(node, path)?.iter().enumerate() {
            let ip = format!("{path}[{i}]");
            let Some(f) = self.map(item, &ip, &["path", "abstract"]) else {
                continue;
            };
            let rule = match (self.get(&f, "path"), self.get(&f, "abstract")) {
                (Some((n, p)), None) => self.checked(n, &p, local_path).and_then(|sp| {
                    match resolver_conflict(&sp, &resolvers) {
                        Some(m) => {
                            self.err(n, &p, m);
                            None
                        }
                        None => Some(LocalRule {
                            path: Some(sp),
                            abstract_name: None,
                        }),
                    }
                }),
                (None, Some((n, p))) => self.checked(n, &p, local_abstract).map(|a| LocalRule {
                    path: None,
                    abstract_name: Some(a),
                }),
                (Some(_), Some((n, p))) => {
                    self.err(
                        n,
                        &p,
                        "a rule has either `path` or `abstract`, not both; split it into two rules",
                    );
                    None
                }
                (None, None) => {
                    self.err_at(f.line, f.column, &ip, "a rule needs `path` or `abstract`");
                    None
                }
            };
            out.extend(rule);
        }
        (self.errors.len() == before).then_some(out)
    }

    fn files(&mut self, node: &Node, path: &str) -> Option<Vec<FileRule>> {
        let before = self.errors.len();
        let mut out = Vec::new();
        for (i, item) in self.seq(node, path)?.iter().enumerate() {
            let ip = format!("{path}[{i}]");
            let Some(f) = self.map(item, &ip, &["path", "access"]) else {
                continue;
            };
            let fpath = self
                .required(&f, "path")
                .and_then(|(n, p)| self.checked(n, &p, file_path));
            let access = self.required(&f, "access").and_then(|(n, p)| {
                self.enumerated(
                    n,
                    &p,
                    &[
                        ("deny", FileAccess::Deny),
                        ("audit", FileAccess::Audit),
                        ("taint", FileAccess::Taint),
                    ],
                )
            });
            if let (Some(path), Some(access)) = (fpath, access) {
                out.push(FileRule { path, access });
            }
        }
        (self.errors.len() == before).then_some(out)
    }
}

/// The known field most similar to `key` (for typos), if any is close.
fn closest<'s>(key: &str, allowed: &[&'s str]) -> Option<&'s str> {
    let key = key.to_ascii_lowercase();
    allowed
        .iter()
        .map(|a| (edit_distance(&key, &a.to_ascii_lowercase()), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 4))
        .min()
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, 1..=63 bytes.
pub fn dns_label(s: &str, what: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid {what} {s:?}: must be an RFC 1123 DNS label (lower-case letters, digits \
             and '-', starting and ending with a letter or digit, at most 63 characters)"
        ))
    }
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 bytes.
fn dns_subdomain(s: &str, what: &str) -> Result<String, String> {
    if s.len() <= 253 && s.split('.').all(|l| dns_label(l, what).is_ok()) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid {what} {s:?}: must be an RFC 1123 DNS subdomain (dot-separated DNS \
             labels, at most 253 characters)"
        ))
    }
}

/// Kubernetes label name part: 1..=63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn label_key(s: &str) -> Result<String, String> {
    let ok = match s.split_once('/') {
        Some((prefix, name)) => dns_subdomain(prefix, "").is_ok() && label_name(name),
        None => label_name(s),
    };
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid label key {s:?}: expected [prefix/]name, name up to 63 characters of \
             letters, digits, '-', '_', '.' starting and ending alphanumeric"
        ))
    }
}

fn label_value(s: &str) -> Result<String, String> {
    if s.is_empty() || label_name(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid label value {s:?}: up to 63 characters of letters, digits, '-', '_', '.' \
             starting and ending alphanumeric"
        ))
    }
}

/// `spiffe://<trust-domain>/<path>` (SPIFFE ID spec: lower-case trust domain,
/// non-empty path of segments that are not `.` or `..`).
pub fn spiffe_id(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("invalid SPIFFE ID {s:?}: {why}"));
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return bad("must start with \"spiffe://\" (spiffe://<trust-domain>/<path>)");
    };
    let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
    if td.is_empty()
        || !td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
    {
        return bad("the trust domain must be non-empty lower-case letters, digits, '.', '-', '_'");
    }
    if path.is_empty() {
        return bad("a path is required (spiffe://<trust-domain>/<path>)");
    }
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("path segments must be non-empty and not '.' or '..'");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return bad("path segments may only hold letters, digits, '.', '-', '_'");
        }
    }
    if s.len() > 2048 {
        return bad("longer than 2048 bytes");
    }
    Ok(s.to_owned())
}

/// An IPv4/IPv6 CIDR in network form, or a bare address (/32, /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let help =
        "expected an IPv4/IPv6 CIDR or address such as 10.0.0.0/8, 2001:db8::/32 or 10.1.2.3";
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = s
        .parse()
        .map_err(|e| format!("invalid CIDR {s:?}: {e}; {help}"))?;
    if net.trunc() != net {
        return Err(format!(
            "invalid CIDR {s:?}: host bits are set; the network is {} (or write the bare address {} for one host)",
            net.trunc(),
            net.addr()
        ));
    }
    Ok(net)
}

/// Exact DNS name or `*.` + name (the wildcard matches one or more labels).
/// Names are returned lower-case, without a trailing dot.
pub fn host_pattern(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let base = name.strip_prefix("*.").unwrap_or(name);
    if base.parse::<IpAddr>().is_ok() {
        return Err(format!("{s:?} is an address: use `cidr:` for addresses"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if base.is_empty() || name.len() > 253 || !base.split('.').all(label_ok) {
        return Err(format!(
            "invalid host {s:?}: expected a DNS name (api.example.com) or a wildcard \
             (*.example.com; `*` only as the whole first label)"
        ));
    }
    Ok(name.to_owned())
}

fn port_number(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u64>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1..=65535")),
        Err(_) if s.trim().starts_with('-') => {
            Err(format!("port {} is out of range 1..=65535", s.trim()))
        }
        Err(_) => Err(format!(
            "invalid port {s:?}: expected a number 1..=65535 or a \"lo-hi\" range"
        )),
    }
}

/// `"443"` or `"8000-8100"` (inclusive, lo <= hi).
pub(super) fn port_range(s: &str) -> Result<PortRange, String> {
    match s.split_once('-') {
        Some((lo, hi)) if !lo.trim().is_empty() => {
            let (lo, hi) = (port_number(lo)?, port_number(hi)?);
            if lo > hi {
                return Err(format!(
                    "invalid port range {s:?}: start {lo} is greater than end {hi}"
                ));
            }
            Ok(PortRange { lo, hi })
        }
        _ => port_number(s).map(|p| PortRange { lo: p, hi: p }),
    }
}

/// A DNS record type name as hickory's `RecordType` parses it
/// (case-insensitive), returned in its canonical upper-case spelling.
pub fn query_type(s: &str) -> Result<String, String> {
    use hickory_proto::rr::RecordType;
    match s.trim().to_ascii_uppercase().parse::<RecordType>() {
        Ok(t) => Ok(t.to_string()),
        Err(_) => Err(format!(
            "unknown DNS record type {s:?}: expected a type name such as A, AAAA, CNAME, \
             TXT, MX, SRV, HTTPS, NULL or ANY"
        )),
    }
}

/// `ip:port`, IPv6 as `[::1]:53`.
fn upstream(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s.parse().map_err(|_| {
        format!("invalid upstream {s:?}: expected ip:port, e.g. 127.0.0.53:53 or [::1]:53")
    })?;
    if a.port() == 0 {
        return Err(format!("invalid upstream {s:?}: port 0"));
    }
    Ok(a)
}

/// `<n>s`, `<n>m` or `<n>h`.
pub(super) fn duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {s:?}: expected a whole number with a unit s, m or h (5s, 300s, 5m)"
        )
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .filter(|&secs| secs <= u32::MAX as u64)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

fn file_path(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!("path {s:?} must be absolute"));
    }
    if p.components().any(|c| c == Component::ParentDir) || s.contains('\0') {
        return Err(format!("path {s:?} must not contain '..' or NUL"));
    }
    Ok(p.to_path_buf())
}
