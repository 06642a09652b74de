//! `cargo xtask vm-test`: run a command as root inside a second, real kernel
//! (Debian's kernel pinned in `scripts/vm-kernels.txt`: 6.1 by default,
//! `--kernel 5.10|6.12` for the others) that loads BPF LSM and fentry
//! programs, which this machine's own kernel refuses (DESIGN.md section 4).
//!
//! 1. `scripts/setup-vm.sh` (idempotent, cached in `target/vm/`): qemu,
//!    udev, busybox, kmod, virtme-ng in a venv, the kernel package
//!    downloaded and unpacked. It prints `VNG=` and `VMLINUZ=` lines.
//! 2. `vng --disable-kvm --force-9p -r <vmlinuz> --append "lsm=...,bpf ..."`
//!    boots it under QEMU/TCG (KVM guests hang on these machines) with the
//!    host's filesystem as the guest's root: read-only, except the repo,
//!    the current directory, `$CARGO_TARGET_DIR` and any `--rwdir`.
//! 3. The guest command runs as root in the current directory, wrapped in a
//!    shell script (a file in `target/vm/run-PID/`) that mounts bpffs and
//!    writes the command's exit status to a file beside it; that status becomes ours (vng's own exit code
//!    is only a fallback). Without a command: a self-check of the guest.
//!
//! A timeout bounds the whole run; on timeout or Ctrl-C the VM's process
//! group is killed.
use std::{
    io::{Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// LSM list for the guest: the Debian default plus `bpf`.
const LSM_APPEND: &str = "lsm=lockdown,capability,landlock,yama,apparmor,bpf";

/// Modules udev's coldplug would load for QEMU's emulated hardware (KVM,
/// SATA/CD-ROM, watchdogs, i2c, input, crypto acceleration). Under TCG
/// loading them costs ~10 s per boot and no test needs them. Modules a test
/// asks for by name (veth, nf_*, ...) are not in the list.
const MODULE_BLACKLIST: &str = "kvm,kvm_amd,kvm_intel,irqbypass,crct10dif_pclmul,crc32_pclmul,\
ghash_clmulni_intel,sha1_ssse3,sha256_ssse3,sha512_ssse3,aesni_intel,crypto_simd,cryptd,\
psmouse,evdev,serio_raw,pcspkr,joydev,mousedev,floppy,sr_mod,cdrom,sg,ahci,libahci,libata,\
iTCO_wdt,iTCO_vendor_support,intel_pmc_bxt,i6300esb,i2c_i801,i2c_smbus,lpc_ich,button,qemu_fw_cfg";

/// Host environment variables handed to the guest command when set (the
/// guest's init starts it with a clean environment).
const FORWARD_ENV: &[&str] = &["CI", "RUST_BACKTRACE", "RUST_LOG", "RUST_TEST_THREADS"];

/// Default guest command: what the VM is for, checked.
const SELF_CHECK: &str = r#"
fail=0
echo "vm-test self-check"
echo "  guest kernel:  $(uname -r)"
echo "  user:          $(id -un) (uid $(id -u))"
echo "  cpus, memory:  $(nproc), $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo)"
lsm="$(cat /sys/kernel/security/lsm)"
echo "  active LSMs:   $lsm"
case ",$lsm," in
  *,bpf,*) echo "  ok: bpf is an active LSM" ;;
  *) echo "  FAIL: bpf is not in /sys/kernel/security/lsm"; fail=1 ;;
esac
if [ -r /sys/kernel/btf/vmlinux ]; then
  echo "  ok: /sys/kernel/btf/vmlinux ($(wc -c </sys/kernel/btf/vmlinux) bytes)"
  if grep -aq bpf_lsm_socket_connect /sys/kernel/btf/vmlinux; then
    echo "  ok: BTF has the LSM hook bpf_lsm_socket_connect"
  else
    echo "  FAIL: BTF lacks bpf_lsm_socket_connect"; fail=1
  fi
else
  echo "  FAIL: no /sys/kernel/btf/vmlinux"; fail=1
fi
echo "  mounts:"
grep -E ' (bpf|tracefs|cgroup2|9p) ' /proc/mounts | awk '{print "    " $2 " " $3 " " $4}' | cut -c1-100
for m in /sys/fs/bpf:bpf /sys/kernel/tracing:tracefs; do
  d="${m%%:*}"; t="${m##*:}"
  if grep -q " $d $t " /proc/mounts; then echo "  ok: $t at $d"; else echo "  FAIL: no $t at $d"; fail=1; fi
done
cg="$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)"
if [ -n "$cg" ]; then echo "  ok: cgroup2 at $cg"; else echo "  FAIL: no cgroup2 mount"; fail=1; fi
if [ "$fail" = 0 ]; then echo "vm-test self-check: OK"; else echo "vm-test self-check: FAILED"; fi
exit $fail
"#;

#[derive(clap::Args)]
pub struct VmArgs {
    /// Guest kernel: a short name pinned in scripts/vm-kernels.txt (5.10, 6.1, 6.12) or a Debian linux-image ABI of those series, e.g. 6.1.0-56-amd64 (default: 6.1).
    #[arg(long = "kernel", visible_alias = "kernel-version")]
    pub kernel_version: Option<String>,
    /// Give up (and kill the VM) after this many seconds, boot included.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Guest memory (qemu -m).
    #[arg(long, default_value = "2G")]
    pub memory: String,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// More host directories the guest may write (the repo, the current directory and $CARGO_TARGET_DIR always are).
    #[arg(long)]
    pub rwdir: Vec<PathBuf>,
    /// KEY=VALUE set for the guest command (CI, RUST_BACKTRACE, RUST_LOG, RUST_TEST_THREADS are passed on when set).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub envs: Vec<String>,
    /// Show the guest kernel's console log (boot messages, oopses) on stderr.
    #[arg(long)]
    pub verbose: bool,
    /// Command to run as root in the guest, in the current directory (default: a self-check).
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

/// POSIX shell quoting.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Run scripts/setup-vm.sh; returns (vng, vmlinuz).
pub(crate) fn setup(root: &Path, kernel_version: Option<&str>) -> Result<(PathBuf, PathBuf)> {
    let t = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/setup-vm.sh"))
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(v) = kernel_version {
        cmd.env("VM_KERNEL_VERSION", v);
    }
    let out = cmd.output().context("running scripts/setup-vm.sh")?;
    if !out.status.success() {
        bail!("scripts/setup-vm.sh failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .with_context(|| format!("scripts/setup-vm.sh printed no {key} line"))
    };
    let (vng, vmlinuz) = (get("VNG=")?, get("VMLINUZ=")?);
    eprintln!(
        "xtask vm-test: setup done in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok((vng, vmlinuz))
}

/// Copy a child's output to ours as it comes (qemu reopens a file given as
/// its stdout and truncates it, so vng never gets our stdout directly).
fn forward(mut from: impl Read + Send + 'static, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let _ = if to_stderr {
                std::io::stderr().write_all(&buf[..n])
            } else {
                let mut o = std::io::stdout().lock();
                o.write_all(&buf[..n]).and_then(|()| o.flush())
            };
        }
    })
}

/// Boot, run, return the guest command's status. A guest that gave no
/// status within its first 30 s never booted (seen once: vng exited 255
/// after 5.5 s right after another VM had ended): that boot is tried once
/// more.
pub fn run(root: &Path, args: &VmArgs) -> Result<u8> {
    match run_once(root, args)? {
        Some(st) => Ok(st),
        None => {
            eprintln!("xtask vm-test: the guest did not boot; trying once more");
            run_once(root, args)?.ok_or_else(|| {
                anyhow::anyhow!("the guest did not boot twice: rerun with --verbose")
            })
        }
    }
}

fn run_once(root: &Path, args: &VmArgs) -> Result<Option<u8>> {
    crate::util::require_root("vm-test")?;
    let (vng, vmlinuz) = setup(root, args.kernel_version.as_deref())?;
    let kver = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or("?")
        .to_string();

    let cwd = std::env::current_dir().context("current directory")?;
    let run_dir = root.join(format!("target/vm/run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let status_file = run_dir.join("status");

    // Host directories the guest may write.
    let mut rw: Vec<PathBuf> = vec![root.to_path_buf()];
    let mut add_rw = |p: PathBuf| {
        if p.is_dir() && !rw.iter().any(|d| p.starts_with(d)) {
            rw.push(p);
        }
    };
    add_rw(cwd.clone());
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        add_rw(cwd.join(t));
    }
    for d in &args.rwdir {
        let d = cwd.join(d);
        if !d.is_dir() {
            bail!("--rwdir {}: not a directory", d.display());
        }
        add_rw(d);
    }

    // The guest script: environment, mounts, the command, its status.
    let mut script = String::from("set -u\n");
    if let Ok(path) = std::env::var("PATH") {
        script += &format!("export PATH={}\n", sh_quote(&path));
    }
    for k in FORWARD_ENV {
        if let Ok(v) = std::env::var(k) {
            script += &format!("export {k}={}\n", sh_quote(&v));
        }
    }
    for kv in &args.envs {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv}: expected KEY=VALUE");
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("--env {kv}: bad variable name");
        }
        script += &format!("export {k}={}\n", sh_quote(v));
    }
    // Test timeouts for a finishing process stretch by this (tests/src/lib.rs `slowdown`).
    script += "export ENFORCER_TEST_SLOWDOWN=${ENFORCER_TEST_SLOWDOWN:-3}\n";
    script += "grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf\n";
    script += "grep -q ' /sys/kernel/tracing tracefs ' /proc/mounts || mount -t tracefs nodev /sys/kernel/tracing\n";
    script += &format!("cd {} || exit 125\n", sh_quote(&cwd.to_string_lossy()));
    let shown_cmd;
    if args.cmd.is_empty() {
        shown_cmd = "(self-check)".to_string();
        script += &format!("( {SELF_CHECK} )\n");
    } else {
        let q: Vec<String> = args.cmd.iter().map(|a| sh_quote(a)).collect();
        shown_cmd = q.join(" ");
        script += &shown_cmd;
        script += "\n";
    }
    script += &format!(
        "st=$?\necho $st > {}\nexit $st\n",
        sh_quote(&status_file.to_string_lossy())
    );

    let mut vng_cmd = Command::new(&vng);
    vng_cmd
        .args(["--disable-kvm", "--force-9p"])
        .arg("-r")
        .arg(&vmlinuz)
        .arg("--append")
        .arg(format!("{LSM_APPEND} module_blacklist={MODULE_BLACKLIST}"))
        .args(["--user", "root", "--cpus", &args.cpus.to_string()])
        .args(["--memory", &args.memory])
        .arg("--cwd")
        .arg(&cwd);
    for d in &rw {
        vng_cmd.arg(format!("--rwdir={}", d.display()));
    }
    if args.verbose {
        vng_cmd.arg("--verbose");
    }
    // The script goes in a file on the shared filesystem: vng passes the
    // --exec string base64'd on the kernel command line (2 KiB at most).
    let script_file = run_dir.join("guest.sh");
    std::fs::write(&script_file, &script)
        .with_context(|| format!("writing {}", script_file.display()))?;
    vng_cmd
        .arg("--exec")
        .arg(format!("sh {}", sh_quote(&script_file.to_string_lossy())));
    // vng starts `virtme-run` from $PATH: put the venv's first.
    let venv_bin = vng.parent().expect("vng lives in a directory");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![venv_bin.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    vng_cmd
        .env("PATH", std::env::join_paths(paths)?)
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: the timeout kills vng, virtme-run and qemu at once.
        .process_group(0);

    eprintln!(
        "xtask vm-test: booting {kver} under QEMU/TCG (no KVM: KVM guests hang on these machines; \
         TCG is slow, boot ~10-15 s), {} CPUs, {} memory, timeout {} s\n\
         xtask vm-test: guest runs as root in {}: {shown_cmd}\n\
         xtask vm-test: guest may write: {}",
        args.cpus,
        args.memory,
        args.timeout,
        cwd.display(),
        rw.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let t = Instant::now();
    let mut child = vng_cmd
        .spawn()
        .with_context(|| format!("starting {}", vng.display()))?;
    let pgid = child.id() as libc::pid_t;
    let out = forward(child.stdout.take().expect("piped"), false);
    let err = forward(child.stderr.take().expect("piped"), true);
    let deadline = t + Duration::from_secs(args.timeout);
    let mut why_killed = None;
    let vng_status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if why_killed.is_none() {
            if INTERRUPTED.load(Ordering::SeqCst) {
                why_killed = Some("interrupted".to_string());
            } else if Instant::now() >= deadline {
                why_killed = Some(format!("timed out after {} s", args.timeout));
            }
            if why_killed.is_some() {
                unsafe { libc::kill(-pgid, libc::SIGTERM) };
                // qemu normally goes on SIGTERM; make sure.
                let grace = Instant::now() + Duration::from_secs(5);
                while child.try_wait()?.is_none() && Instant::now() < grace {
                    std::thread::sleep(Duration::from_millis(100));
                }
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Anything left in the group (it is ours alone).
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = out.join();
    let _ = err.join();
    let secs = t.elapsed().as_secs_f64();

    let guest_status = std::fs::read_to_string(&status_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let _ = std::fs::remove_dir_all(&run_dir);
    if let Some(why) = why_killed {
        bail!("VM {why} (killed it); rerun with --verbose to see the guest kernel's log");
    }
    match guest_status {
        Some(st) => {
            eprintln!("xtask vm-test: guest command exited with status {st} ({secs:.1} s in the VM runner)");
            Ok(Some(u8::try_from(st).unwrap_or(1)))
        }
        None if secs < 30.0 => {
            eprintln!("xtask vm-test: no status from the guest after {secs:.1} s (vng: {vng_status})");
            Ok(None)
        }
        None => bail!(
            "the guest command did not finish: no status from the guest (vng: {vng_status}, after {secs:.1} s). \
             The kernel may have failed to boot or panicked: rerun with --verbose"
        ),
    }
}
