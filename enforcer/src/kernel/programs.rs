//! Loading the programs: the cgroup programs (several at once), the
//! optional unix socket hooks, and a verifier's refusal in words a user
//! can act on.
use std::{sync::Mutex, time::Instant};

use anyhow::{anyhow, bail, Result};
use aya::{programs::Program, Ebpf};
use enforcer_common::prog_names;

use super::{UnixSupport, MIN_LINUX};

/// Load the cgroup programs (`prog_names::ALL`), several at once: the
/// kernel verifies privileged loads in parallel, and the verifier's walk is
/// most of a start's time (seconds per program under the VM runner's
/// emulation, and on a busy node). The largest programs go first. An error
/// names the first program of `prog_names::ALL` that failed.
pub(super) fn load_cgroup_programs(ebpf: &mut Ebpf) -> Result<()> {
    let mut progs: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(n, _)| prog_names::ALL.contains(n))
        .collect();
    if let Some(missing) = prog_names::ALL
        .iter()
        .find(|n| !progs.iter().any(|(p, _)| p == *n))
    {
        bail!("eBPF object has no program {missing}");
    }
    // Largest first (their verification takes longest), so that the
    // workers finish together.
    progs.sort_by_key(|(n, _)| std::cmp::Reverse(verify_weight(n)));
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let queue = Mutex::new(progs.into_iter());
    let results: Mutex<Vec<(&str, std::result::Result<(), String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let next = queue.lock().map(|mut q| q.next()).unwrap_or(None);
                let Some((name, prog)) = next else { break };
                let started = Instant::now();
                let res = match prog {
                    Program::CgroupSockAddr(p) => p.load(),
                    Program::CgroupSock(p) => p.load(),
                    Program::CgroupSkb(p) => p.load(),
                    Program::CgroupSockopt(p) => p.load(),
                    _ => {
                        if let Ok(mut r) = results.lock() {
                            r.push((name, Err("an unexpected program type".into())));
                        }
                        continue;
                    }
                };
                let took = started.elapsed();
                let insns = prog
                    .info()
                    .ok()
                    .and_then(|i| i.verified_instruction_count());
                tracing::debug!(
                    "loading program {name} took {took:?} ({} instructions verified)",
                    insns.map_or("?".to_string(), |n| n.to_string())
                );
                if let Ok(mut r) = results.lock() {
                    r.push((name, res.map_err(|e| format!("{e:#}"))));
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    for name in prog_names::ALL {
        let Some((_, res)) = results.iter().find(|(n, _)| *n == name) else {
            bail!("program {name} was not loaded");
        };
        if let Err(e) = res {
            tracing::debug!("loading program {name}: {e}");
            return Err(match missing_helper(e) {
                // The whole verifier log says nothing more.
                Some(hint) => anyhow!("loading program {name}: {hint} ({})", short_load_error(e)),
                None => anyhow!("loading program {name}: {e}"),
            });
        }
    }
    Ok(())
}

/// How long a program's verification takes, roughly (instructions the
/// verifier walks on Linux 6.18, thousands): the load order.
fn verify_weight(name: &str) -> u32 {
    match name {
        prog_names::INSPECT => 176,
        prog_names::CONNECT6 => 167,
        prog_names::SENDMSG6 => 158,
        prog_names::INGRESS => 61,
        prog_names::CONNECT4 => 39,
        prog_names::SENDMSG4 => 38,
        _ => 10,
    }
}

/// Load `cgroup/connect_unix` and `cgroup/sendmsg_unix` (Linux >= 6.7; an
/// older kernel refuses the attach type). Either both load or neither stays.
pub(super) fn load_unix_programs(ebpf: &mut Ebpf) -> UnixSupport {
    let mut loaded = Vec::new();
    for name in prog_names::UNIX {
        let res = match ebpf.program_mut(name) {
            Some(Program::CgroupSockAddr(p)) => p
                .load()
                .map_err(|e| anyhow!("{}", short_load_error(&format!("{e:#}")))),
            _ => Err(anyhow!(
                "the eBPF object has no cgroup sock_addr program {name}"
            )),
        };
        if let Err(e) = res {
            for done in loaded {
                if let Some(Program::CgroupSockAddr(p)) = ebpf.program_mut(done) {
                    let _ = p.unload();
                }
            }
            return UnixSupport {
                available: false,
                detail: format!(
                    "loading {name} failed (cgroup unix socket hooks need Linux >= 6.7): {e}"
                ),
            };
        }
        loaded.push(name);
    }
    UnixSupport {
        available: true,
        detail: "cgroup/connect_unix and cgroup/sendmsg_unix loaded".into(),
    }
}

/// BPF helpers our programs call that are newer than the ring buffer (5.8):
/// id, name, first Linux release.
const NEWER_HELPERS: &[(u32, &str, &str)] = &[
    (158, "bpf_get_current_task_btf", "5.11"),
    (160, "bpf_ktime_get_coarse_ns", "5.11"),
    (181, "bpf_loop", "5.17"),
];

/// When the verifier refused a program over a helper it calls, the sentence
/// that says why and what enforcer needs. "invalid func unknown#160" (Linux
/// < 5.13 words it so) means the kernel does not have the helper; "unknown
/// func bpf_loop#181" means this kernel has it but refused it here: too
/// old for the helper, or the loader lacks a capability it needs (CAP_BPF,
/// CAP_PERFMON).
fn missing_helper(log: &str) -> Option<String> {
    let running = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into());
    missing_helper_on(log, &running)
}

fn missing_helper_on(log: &str, running: &str) -> Option<String> {
    let line = log
        .lines()
        .find(|l| l.contains("invalid func ") || l.contains("unknown func "))?;
    let id: u32 = line.rsplit_once('#')?.1.trim().parse().ok()?;
    let known = NEWER_HELPERS.iter().find(|h| h.0 == id);
    let what = match known {
        Some((_, name, since)) => format!("the BPF helper {name} (#{id}, Linux >= {since})"),
        None => format!("BPF helper #{id}"),
    };
    let version = |v: &str| -> Option<(u32, u32)> {
        let mut it = v.split(|c: char| !c.is_ascii_digit());
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    let older = match (version(running), version(MIN_LINUX)) {
        (Some(r), Some(m)) => r < m,
        _ => false,
    };
    Some(if line.contains("invalid func ") || older {
        format!("this kernel (Linux {running}) lacks {what}; enforcer needs Linux >= {MIN_LINUX}")
    } else {
        format!(
            "the kernel (Linux {running}) refused {what} for this program: enforcer needs \
             Linux >= {MIN_LINUX} and CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (run it as root)"
        )
    })
}

/// A program load error without the verifier's log, but with its last
/// line (the reason), for logs and status.
pub(super) fn short_load_error(e: &str) -> String {
    match e.split_once(" Verifier output:") {
        Some((head, log)) => {
            let last = log
                .lines()
                .rev()
                .find(|l| {
                    !l.trim().is_empty()
                        && !l.starts_with("processed")
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                })
                .unwrap_or("")
                .trim();
            if last.is_empty() {
                head.to_string()
            } else {
                format!("{head} (verifier: {last})")
            }
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod load_error_tests {
    use super::*;

    #[test]
    fn a_missing_helper_is_named_with_the_kernel_it_needs() {
        let old = "the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: \
                   ; fun()\n1092: (85) call unknown#160\ninvalid func unknown#160\nverification time 291617 usec\n";
        let hint = missing_helper_on(old, "5.10.0-46-amd64").expect("named");
        assert!(hint.contains("Linux 5.10.0-46-amd64) lacks"), "{hint}");
        assert!(
            hint.contains("bpf_ktime_get_coarse_ns (#160, Linux >= 5.11)"),
            "{hint}"
        );
        assert!(
            hint.ends_with(&format!("enforcer needs Linux >= {MIN_LINUX}")),
            "{hint}"
        );
        // Newer kernels say "unknown func" also when the helper exists but
        // is refused (privileges, program type): not "lacks" there.
        let new = "Verifier output: 0: (85) call bpf_loop#181\nunknown func bpf_loop#181\n";
        let hint = missing_helper_on(new, "6.12.117+deb13-amd64").unwrap();
        assert!(
            hint.contains("refused the BPF helper bpf_loop (#181, Linux >= 5.17)"),
            "{hint}"
        );
        assert!(hint.contains("CAP_BPF"), "{hint}");
        assert!(missing_helper_on(new, "5.15.0").unwrap().contains("lacks"));
        assert_eq!(
            missing_helper_on("Verifier output: R0 invalid mem access 'scalar'\n", "6.1.0"),
            None
        );
        assert_eq!(missing_helper_on("invalid func unknown#\n", "6.1.0"), None);
    }
}
