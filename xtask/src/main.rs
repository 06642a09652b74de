//! Project tasks: `cargo xtask demo`, `cargo xtask test`, `cargo xtask bench`,
//! `cargo xtask bench-dns`, `cargo xtask bench-open`, `cargo xtask bench-tls`, `cargo xtask vm-test`,
//! `cargo xtask image`, `cargo xtask fuzz`, `cargo xtask soak`.
//!
//! They need root and the real kernel (they load the enforcer's eBPF
//! programs through the `enforcer` binary). This crate does not depend on
//! the enforcer crates: it drives the binary, like a user would.
mod bench;
mod daemon_harness;
mod demo;
mod dns_bench;
mod dns_upstream;
mod empty_progs;
mod fuzz;
mod image;
mod matrix;
mod open_bench;
mod peers;
mod pod_images;
mod soak;
mod soak_agent;
mod test;
mod tls_bench;
mod util;
mod vm;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "enforcer project tasks (cargo xtask ...)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct BinArgs {
    /// Use this enforcer binary instead of building it (also: $ENFORCER_BIN).
    #[arg(long, env = "ENFORCER_BIN")]
    pub enforcer_bin: Option<PathBuf>,
    /// Build enforcer in debug mode (default: release).
    #[arg(long)]
    pub debug: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a prompt-injected agent under `enforcer run` and show what got out (needs root).
    Demo {
        #[command(flatten)]
        bin: BinArgs,
        /// Policy to enforce (also: $DEMO_POLICY). Default: policies/demo-agent.yaml.
        #[arg(long, env = "DEMO_POLICY")]
        policy: Option<PathBuf>,
        /// Metrics address given to `enforcer run`.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_addr: String,
    },
    /// Measure enforcement overhead: connect/sendto rate enforced vs not and vs nftables, rule-count scaling, daemon RSS, the DNS proxy vs dnsmasq (needs root).
    Bench {
        #[command(flatten)]
        bin: BinArgs,
        /// Interleaved rounds per side and comparison.
        #[arg(long, default_value_t = 40)]
        rounds: u32,
        /// Seconds per round per side.
        #[arg(long, default_value_t = 0.25)]
        secs: f64,
        /// Skip the big-vs-10-rule comparison.
        #[arg(long)]
        skip_scaling: bool,
        /// Rules of the big policy in the scaling comparison.
        #[arg(long, default_value_t = 100_000)]
        big_rules: usize,
        /// Skip the peers (nftables with the same rules; dnsmasq in front of
        /// the DNS bench's upstream, at bench-dns's defaults).
        #[arg(long)]
        skip_peers: bool,
    },
    /// Compare enforcer builds side by side: per-program ns/run of connect4/sendmsg4 minus an empty program run in the same calls, builds alternating (needs root).
    BenchAb {
        /// Two or more enforcer binaries.
        #[arg(required = true, num_args = 2..)]
        bins: Vec<PathBuf>,
        /// Rounds (each runs every build once, the order alternating).
        #[arg(long, default_value_t = 4)]
        rounds: u32,
        /// Seconds of connects, then of sends, per build and round.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
    },
    /// Measure the DNS proxy: added latency (p50/p99) vs querying the upstream directly and vs dnsmasq, and queries/s (needs root).
    BenchDns {
        #[command(flatten)]
        bin: BinArgs,
        /// Sequential queries per round per side.
        #[arg(long, default_value_t = dns_bench::DEFAULT_QUERIES)]
        queries: usize,
        /// Interleaved rounds (the sides' order changing every round).
        #[arg(long, default_value_t = dns_bench::DEFAULT_ROUNDS)]
        rounds: usize,
        /// Queries in flight for the throughput run.
        #[arg(long, default_value_t = dns_bench::DEFAULT_CONCURRENCY)]
        concurrency: usize,
        /// Seconds of throughput per side, in `--rounds` interleaved rounds.
        #[arg(long, default_value_t = dns_bench::DEFAULT_SECS)]
        secs: f64,
        /// Skip the peer (dnsmasq forwarding to the same upstream).
        #[arg(long)]
        skip_peers: bool,
    },
    /// Measure the BPF LSM file hooks: open() rate with them attached vs detached, in the VM runner (needs root).
    BenchOpen(open_bench::OpenArgs),
    /// The whole test suite, as CI runs it: setup, fmt, clippy, unit and real-kernel integration tests (needs root).
    Test {
        /// Only the last step: the BPF LSM tests in the VMs (after a change
        /// that only they can check; CI always runs every step).
        #[arg(long)]
        vm_only: bool,
    },
    /// Build the DaemonSet's container image as an OCI archive (no container engine needed).
    Image(image::ImageArgs),
    /// Build the CRI tests' pod images (a pause image and a Python agent image) as OCI archives.
    PodImages {
        /// Directory for pause.oci.tar and agent.oci.tar (default: target/pod-images).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Run the libFuzzer targets of fuzz/ (policy files, AIP manifests, daemon config, AgentPolicy objects, DNS client messages and upstream answers, BTF, audit logs, first bytes) for a time each; fails on a crash, panic, hang or unbounded allocation.
    Fuzz(fuzz::FuzzArgs),
    /// Run a command as root inside a VM booted with a Debian kernel (6.1 unless --kernel) that loads BPF LSM programs (default: a self-check; needs root).
    VmTest(vm::VmArgs),
    /// The real-kernel suites on every kernel pinned in scripts/vm-kernels.txt (5.10, 6.1, 6.12), one VM each; prints the kernel x suite table (needs root; ~30 min per kernel).
    VmMatrix(matrix::MatrixArgs),
    /// The daemon for M minutes under load and faults: policy reloads (valid and invalid), SIGHUP, kill -9 and restart every minute, ring-buffer floods; checks that nothing denied gets out, allowed traffic keeps working, nothing grows across restarts and the audit chain holds (needs root).
    Soak(soak::SoakArgs),
    /// Load of one identity in `soak` (runs inside its cgroup).
    #[command(hide = true)]
    SoakAgent(soak_agent::SoakAgentArgs),
    /// Load generator used by `bench` (runs inside the cgroup under test).
    #[command(hide = true)]
    BenchWorker(worker::WorkerArgs),
    /// What the kernel's first-bytes check (TLS SNI) costs a TLS client:
    /// handshake + request rate to a learned address, inspected vs
    /// `inspect: none`, interleaved (root, real kernel).
    BenchTls {
        #[command(flatten)]
        bin: BinArgs,
        /// Handshakes per round per side.
        #[arg(long, default_value_t = 200)]
        conns: usize,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// Query generator used by `bench-dns` (runs under `enforcer run`).
    #[command(hide = true)]
    BenchDnsWorker(dns_bench::DnsWorkerArgs),
    /// Open/close loop used by `bench-open` (runs as the agent or beside it).
    #[command(hide = true)]
    BenchOpenWorker(open_bench::OpenWorkerArgs),
}

fn main() -> std::process::ExitCode {
    util::scrub_cargo_run_env();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Demo {
            bin,
            policy,
            metrics_addr,
        } => demo::run(&bin, policy, &metrics_addr),
        Cmd::Bench {
            bin,
            rounds,
            secs,
            skip_scaling,
            big_rules,
            skip_peers,
        } => bench::run(&bin, rounds, secs, skip_scaling, big_rules, skip_peers),
        Cmd::BenchDns {
            bin,
            queries,
            rounds,
            concurrency,
            secs,
            skip_peers,
        } => dns_bench::run(&bin, queries, rounds, concurrency, secs, !skip_peers),
        Cmd::BenchAb { bins, rounds, secs } => bench::ab(&bins, rounds, secs),
        Cmd::BenchOpen(args) => open_bench::run(&args),
        Cmd::Test { vm_only } => test::run(&util::repo_root(), vm_only),
        Cmd::Fuzz(args) => fuzz::run(&args),
        Cmd::VmTest(args) => vm::run(&util::repo_root(), &args),
        Cmd::VmMatrix(args) => matrix::run(&util::repo_root(), &args),
        Cmd::Image(args) => image::run(&args),
        Cmd::PodImages { out } => pod_images::run(out),
        Cmd::Soak(args) => soak::run(&args),
        Cmd::SoakAgent(args) => soak_agent::run(args).map(|()| 0),
        Cmd::BenchWorker(args) => worker::run(&args).map(|()| 0),
        Cmd::BenchTls { bin, conns, rounds } => tls_bench::run(&bin, conns, rounds),
        Cmd::BenchDnsWorker(args) => dns_bench::worker(&args).map(|()| 0),
        Cmd::BenchOpenWorker(args) => open_bench::worker(&args).map(|()| 0),
    };
    match r {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
