//! The `enforcer` command line. The implementation lives in the library
//! (`src/lib.rs`); this file only parses arguments and dispatches.
use enforcer::{audit, daemon, k8s, policy, run};
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "enforcer",
    version,
    about = "Kernel-level egress enforcer for AI-agent workloads (eBPF, cgroup v2)",
    long_about = "Ties the network activity of agent process trees to their workload identity \
                  and enforces each agent's declared egress policy in the kernel: what is not \
                  declared is denied with EPERM (or recorded, in audit mode)."
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "enforcer=debug".
    #[arg(long, global = true, env = "ENFORCER_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD in a fresh cgroup under POLICY; exit with CMD's status. Needs root.
    ///
    /// The agent starts already enforced, in its own cgroup, contained: its own PID
    /// namespace and session, a private mount view without bpffs (read-only for uid 0),
    /// a seccomp filter whose refusals are recorded, no capabilities, no_new_privs, no
    /// inherited descriptors, and the sudo user unless --user says otherwise. A summary
    /// of denials is printed to stderr when it exits.
    Run(run::RunArgs),
    /// The node daemon: policies directory, static cgroup bindings, metrics, audit log.
    Daemon {
        /// Daemon configuration file (YAML).
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
    /// Show what the running daemon enforces, per identity (root only).
    Status {
        /// Control socket of the daemon.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Kubernetes tools.
    K8s {
        #[command(subcommand)]
        command: K8sCmd,
    },
}

#[derive(Subcommand)]
enum K8sCmd {
    /// Print the AgentPolicy CustomResourceDefinition (YAML), generated from the policy types.
    ///
    /// deploy/10-crd.yaml is this output: `enforcer k8s crd > deploy/10-crd.yaml`.
    Crd,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Learn a minimal policy for one identity from audit logs of runs in `mode: audit`.
    ///
    /// Names the agent resolved become `host` rules with the ports and protocols it then used
    /// (sibling names collapse into a wildcard past --wildcard-threshold); addresses no answer
    /// explained become `cidr` rules; files it opened under well-known secret locations become
    /// `taint`, with the `onTaint` egress the run showed after the first read; `dns` settings
    /// come from the queries, with headroom. Every rule is commented with its evidence (first
    /// seen, count, processes). Warnings on stderr: destinations contacted once, only after a
    /// secret read (exclude them with --exclude), link-local and loopback destinations, names
    /// resolved in bulk and never connected to. The output passes `enforcer policy check`.
    Learn(LearnArgs),
    /// Print a discovery policy: audit mode, no egress rules, and an `audit` file rule for each
    /// well-known secret location that exists. Run the agent under it, then `policy learn`.
    Discover(DiscoverArgs),
    /// Validate policy files; errors name file:line:column and field. Exit 1 on any error.
    Check {
        /// Policy files or directories.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Convert an AIP (Agent Identity Protocol draft) AgentPolicy manifest into an enforcer policy.
    ///
    /// Reads an aip-proxy manifest (apiVersion aip.io/v1alpha*, kind AgentPolicy) and writes an
    /// enforcer AgentPolicy: metadata.name (made a DNS label if needed), spec.mode (monitor
    /// becomes audit) and spec.protected_paths (each one a `deny` file rule). Every AIP field that
    /// cannot be carried over (MCP tool and method lists, tool rules, DLP, identity tokens, ...)
    /// is listed on stderr, one line each, and as comments in the output. The result has no
    /// egress rules, so it denies all network egress until you add some. Exit 0 with notes,
    /// 1 if the manifest cannot be read or is not a valid AIP AgentPolicy.
    ImportAip {
        /// AIP manifest (YAML, e.g. agent.yaml).
        file: PathBuf,
        /// Write the enforcer policy to OUT instead of stdout.
        #[arg(long, short = 'o', value_name = "OUT")]
        output: Option<PathBuf>,
        /// Home directory that `~/` in protected paths stands for on the agent's machine
        /// (e.g. /home/agent); without it such paths are not carried over.
        #[arg(long, value_name = "DIR", value_parser = policy::aip::base_dir)]
        home: Option<PathBuf>,
        /// Directory that relative protected paths are resolved against (aip-proxy uses its
        /// own working directory); without it they are not carried over.
        #[arg(long, value_name = "DIR", value_parser = policy::aip::base_dir)]
        workdir: Option<PathBuf>,
    },
}

/// `enforcer policy learn` arguments.
#[derive(clap::Args)]
struct LearnArgs {
    /// Audit logs (JSON or OCSF) of runs in `mode: audit`: `enforcer run --audit-log` or the daemon's.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The identity to learn (needed when the logs name several).
    #[arg(long)]
    identity: Option<String>,
    /// Write the policy to OUT instead of stdout.
    #[arg(long, short = 'o', value_name = "OUT")]
    output: Option<PathBuf>,
    /// The policy the runs were made under: its name, identity, DNS upstreams and `writable` are
    /// kept, and its secret file rules the agent never opened become `deny`.
    #[arg(long, value_name = "POLICY")]
    from: Option<PathBuf>,
    /// Show what the learned policy adds to and removes from POLICY (one line per rule, `+`/`-`),
    /// on stdout instead of the policy (which still goes to --output if given).
    #[arg(long, value_name = "POLICY")]
    diff: Option<PathBuf>,
    /// Do not learn from these records: host=NAME, host=*.DOMAIN, ip=ADDRESS[/PREFIX],
    /// process=COMM (the hostile part of a run). Repeatable.
    #[arg(long, value_name = "WHAT=VALUE")]
    exclude: Vec<policy::learn::Exclude>,
    /// Connected sibling names (a.cdn.example.com, b.cdn.example.com, ...) that collapse into
    /// `*.cdn.example.com`; never above a registrable domain (Public Suffix List). 0: never.
    #[arg(long, value_name = "N", default_value_t = policy::learn::DEFAULT_WILDCARD_THRESHOLD)]
    wildcard_threshold: usize,
    /// Prefix length of `cidr` rules for IPv4 addresses no DNS answer explained (32: exact).
    #[arg(long, value_name = "BITS", default_value_t = 32,
          value_parser = clap::value_parser!(u8).range(0..=32))]
    cidr_prefix: u8,
    /// The same for IPv6 addresses (128: exact).
    #[arg(long, value_name = "BITS", default_value_t = 128,
          value_parser = clap::value_parser!(u8).range(0..=128))]
    cidr_prefix6: u8,
    /// Another secret location: ~/relative/path, /absolute/path or a file name, optionally
    /// `=what it holds`. Repeatable (adds to the built-in list).
    #[arg(long, value_name = "PATH[=WHAT]", value_parser = policy::learn::secrets::parse)]
    secret: Vec<policy::learn::secrets::Secret>,
}

/// `enforcer policy discover` arguments.
#[derive(clap::Args)]
struct DiscoverArgs {
    /// metadata.name of the policy.
    name: String,
    /// Home directories whose secret locations are watched (default: /root and each directory
    /// of /home). Repeatable.
    #[arg(long, value_name = "DIR")]
    home: Vec<PathBuf>,
    /// Another secret location to watch (as for `policy learn --secret`). Repeatable.
    #[arg(long, value_name = "PATH[=WHAT]", value_parser = policy::learn::secrets::parse)]
    secret: Vec<policy::learn::secrets::Secret>,
    /// dns.upstream of the policy (default: the nameservers of /etc/resolv.conf). Repeatable.
    #[arg(long, value_name = "IP:PORT")]
    upstream: Vec<std::net::SocketAddr>,
    /// Write the policy to OUT instead of stdout.
    #[arg(long, short = 'o', value_name = "OUT")]
    output: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify the SHA-256 chain of an audit log (JSON or OCSF); exit 1 if a record was changed
    /// or removed.
    Verify { file: PathBuf },
    /// Print an audit log's records, as written or converted to OCSF events; with --follow, go
    /// on printing the records appended to it (a live stream for a log shipper).
    ///
    /// JSON records become OCSF 1.3.0 events with --format ocsf, as `--audit-format ocsf` would
    /// have written them; OCSF events are not converted back. Only complete lines are printed.
    /// A followed file that is truncated or replaced (rotated) is read again from its start.
    Tail {
        /// Audit log; or --config to take the daemon's `auditLog`.
        #[arg(required_unless_present = "config")]
        file: Option<PathBuf>,
        /// Daemon configuration file whose `auditLog` to print.
        #[arg(long, short = 'c', conflicts_with = "file")]
        config: Option<PathBuf>,
        /// Print records in this format (default: as written).
        #[arg(long, value_enum)]
        format: Option<audit::AuditFormat>,
        /// Keep printing records as they are appended (until interrupted).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Start with the last N records instead of the first.
        #[arg(long, short = 'n', value_name = "N")]
        lines: Option<u64>,
    },
}

#[cfg(test)]
mod docs_tests;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(log_colour())
        .try_init();
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("enforcer: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Colour in log lines only on a terminal, and never with `NO_COLOR` set
/// (any non-empty value, <https://no-color.org>).
fn log_colour() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

fn dispatch(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Run(args) => run::run(args),
        Cmd::Daemon { config } => daemon::main(&config),
        Cmd::Policy {
            command: PolicyCmd::Check { files },
        } => policy_check(&files),
        Cmd::Policy {
            command:
                PolicyCmd::ImportAip {
                    file,
                    output,
                    home,
                    workdir,
                },
        } => policy_import_aip(
            &file,
            output.as_deref(),
            &policy::aip::ImportOptions { home, workdir },
        ),
        Cmd::Policy {
            command: PolicyCmd::Learn(args),
        } => policy_learn(args),
        Cmd::Policy {
            command: PolicyCmd::Discover(args),
        } => policy_discover(args),
        Cmd::Audit {
            command: AuditCmd::Verify { file },
        } => audit_verify(&file),
        Cmd::Audit {
            command:
                AuditCmd::Tail {
                    file,
                    config,
                    format,
                    follow,
                    lines,
                },
        } => audit_tail(file, config, format, follow, lines),
        Cmd::Status { socket, json } => daemon::control::status(&socket, json),
        Cmd::K8s {
            command: K8sCmd::Crd,
        } => {
            print!("{}", k8s::crd::crd_yaml());
            Ok(0)
        }
    }
}

fn policy_check(files: &[PathBuf]) -> anyhow::Result<i32> {
    match policy::load_files(files) {
        Ok(policies) => {
            let mut failed = false;
            for p in &policies {
                match policy::compile::compile(p) {
                    Ok(c) => {
                        let files = if c.files.is_empty() {
                            String::new()
                        } else {
                            format!(" ({} file rules: need BPF LSM)", c.files.len())
                        };
                        println!(
                            "{}:{}: {} ok{files}",
                            p.source.display(),
                            p.line,
                            p.policy.metadata.name
                        );
                        println!("  {}", c.inspection_note());
                        println!(
                            "  unix sockets: {} listed in spec.local; every other one refused, \
                             resolver IPC always (needs BPF LSM or Linux >= 6.7)",
                            c.local.len()
                        );
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            Ok(i32::from(failed))
        }
        Err(errors) => {
            eprintln!("{errors}");
            Ok(1)
        }
    }
}

fn policy_import_aip(
    file: &std::path::Path,
    output: Option<&std::path::Path>,
    opts: &policy::aip::ImportOptions,
) -> anyhow::Result<i32> {
    if let Some(out) = output {
        let same = matches!(
            (file.canonicalize(), out.canonicalize()),
            (Ok(a), Ok(b)) if a == b
        );
        if same {
            eprintln!(
                "{}: refusing to overwrite the AIP manifest with its conversion",
                out.display()
            );
            return Ok(1);
        }
    }
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", file.display());
            return Ok(1);
        }
    };
    let conversion = match policy::aip::convert_str(&text, file, opts) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(1);
        }
    };
    for note in &conversion.notes {
        eprintln!("{note}");
    }
    let name = &conversion.policy.metadata.name;
    match output {
        Some(out) => {
            std::fs::write(out, &conversion.yaml)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("{}: wrote enforcer policy {name}", out.display());
        }
        None => print!("{}", conversion.yaml),
    }
    eprintln!(
        "{}: converted: {} protected path(s) carried over as file rules, {} item(s) not carried over",
        file.display(),
        conversion.policy.spec.files.len(),
        conversion.not_carried().len()
    );
    Ok(0)
}

/// The one policy of FILE named `name`, or its only one.
fn one_policy(file: &std::path::Path, name: Option<&str>) -> Result<policy::AgentPolicy, String> {
    let loaded = policy::load_files(&[file.to_path_buf()]).map_err(|e| e.to_string())?;
    let mut found: Vec<_> = loaded
        .iter()
        .filter(|l| name.is_none_or(|n| l.policy.metadata.name == n))
        .collect();
    match (found.len(), loaded.len()) {
        (1, _) => Ok(found.remove(0).policy.clone()),
        (_, 1) => Ok(loaded[0].policy.clone()),
        _ => Err(format!(
            "{}: {} policies; none or several named {:?}",
            file.display(),
            loaded.len(),
            name.unwrap_or("")
        )),
    }
}

fn policy_learn(a: LearnArgs) -> anyhow::Result<i32> {
    if let Some(out) = &a.output {
        let out = out.canonicalize().ok();
        if out.is_some() && a.files.iter().any(|f| f.canonicalize().ok() == out) {
            eprintln!("refusing to overwrite an audit log with the learned policy");
            return Ok(1);
        }
    }
    let base = match &a.from {
        Some(f) => match one_policy(f, a.identity.as_deref()) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{e}");
                return Ok(1);
            }
        },
        None => None,
    };
    let opts = policy::learn::LearnOptions {
        identity: a.identity.clone(),
        wildcard_threshold: a.wildcard_threshold,
        cidr_prefix_v4: a.cidr_prefix,
        cidr_prefix_v6: a.cidr_prefix6,
        excludes: a.exclude.clone(),
        secrets: a.secret.clone(),
        base,
    };
    let learned = match policy::learn::learn(&a.files, &opts) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("enforcer policy learn: {e}");
            return Ok(1);
        }
    };
    for w in &learned.warnings {
        eprintln!("warning: {w}");
    }
    match &a.output {
        Some(out) => {
            std::fs::write(out, &learned.yaml)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("{}: wrote the learned policy", out.display());
        }
        None if a.diff.is_none() => print!("{}", learned.yaml),
        None => {}
    }
    if let Some(old) = &a.diff {
        let old = match one_policy(old, Some(&learned.policy.metadata.name)) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return Ok(1);
            }
        };
        let lines = policy::learn::diff(&old, &learned.policy);
        if lines.is_empty() {
            println!("no difference");
        }
        for l in lines {
            println!("{l}");
        }
    }
    eprintln!("{}", learned.summary);
    Ok(0)
}

fn policy_discover(a: DiscoverArgs) -> anyhow::Result<i32> {
    let homes = if a.home.is_empty() {
        let mut h = vec![PathBuf::from("/root")];
        if let Ok(rd) = std::fs::read_dir("/home") {
            let mut dirs: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            h.extend(dirs);
        }
        h
    } else {
        a.home.clone()
    };
    if let Err(e) = policy::learn::check_name(&a.name) {
        eprintln!("enforcer policy discover: {e}");
        return Ok(1);
    }
    let y = policy::learn::discovery(&a.name, &homes, &a.secret, &a.upstream);
    match &a.output {
        Some(out) => {
            std::fs::write(out, &y).with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("{}: wrote the discovery policy {}", out.display(), a.name);
        }
        None => print!("{y}"),
    }
    Ok(0)
}

fn audit_tail(
    file: Option<PathBuf>,
    config: Option<PathBuf>,
    format: Option<audit::AuditFormat>,
    follow: bool,
    last: Option<u64>,
) -> anyhow::Result<i32> {
    let path = match (file, config) {
        (Some(f), _) => f,
        (None, Some(c)) => daemon::config::Config::load(&c)?
            .audit_log
            .with_context(|| format!("{}: no auditLog is configured", c.display()))?,
        (None, None) => anyhow::bail!("give an audit log FILE or --config"),
    };
    let opts = enforcer::audit_tail::TailOptions {
        format,
        follow,
        last,
        ..Default::default()
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    enforcer::audit_tail::tail(&path, &opts, &mut out, &|| false)?;
    Ok(0)
}

fn audit_verify(file: &std::path::Path) -> anyhow::Result<i32> {
    match audit::verify(file) {
        Ok(report) => {
            println!(
                "{}: ok: {} records{}, chain intact; head {} (seq {}){}",
                file.display(),
                report.records,
                if report.format == Some(audit::AuditFormat::Ocsf) {
                    format!(" (OCSF {} events)", enforcer::ocsf::OCSF_VERSION)
                } else {
                    String::new()
                },
                report.head,
                report
                    .last_seq
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                if report.chain_resumes.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; chain resumed after a torn write at seq {:?}",
                        report.chain_resumes
                    )
                }
            );
            println!("  (a removed tail cannot be detected from the file alone: anchor the head hash elsewhere)");
            Ok(0)
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            Ok(1)
        }
    }
}
