#!/usr/bin/env bash
# Idempotent setup of the VM test runner (`cargo xtask vm-test`): a second,
# real kernel that loads BPF LSM/fentry programs (the host kernel refuses
# them), booted by virtme-ng under QEMU/TCG. Root, Debian bookworm.
# Says what it does (on stderr) and skips whatever is already there:
#   - Debian: qemu-system-x86 (the VM), kmod (depmod), busybox-static (the
#     guest initramfs), udev (virtme-ng's guest init needs it to find the
#     virtio-serial ports that carry the command's stdout/stderr and its
#     exit status; without it the output and the status are lost);
#     containerd, runc, containernetworking-plugins and catatonit (the CRI
#     tests' container runtime, pod networks and pause image; installed
#     with services held back: the guest starts its own containerd);
#     systemd (the CRI tests' systemd cgroup driver: the guest runs one as
#     the init of a PID namespace for runc to create scopes through)
#   - a Python venv with virtme-ng (pinned) in the cache dir
#   - the guest kernel pinned in scripts/vm-kernels.txt (6.1 unless
#     $VM_KERNEL_VERSION names another): Debian's linux-image-<ABI>,
#     `apt-get download` (own apt lists per suite) + `dpkg -x` into the
#     cache dir, depmod'ed there
#     (virtme-ng takes the modules from beside the vmlinuz), and its modules
#     also copied to /lib/modules/<ver> and depmod'ed
# On stdout it prints only two lines for xtask: VNG=<path> and VMLINUZ=<path>.
#
# Environment: VM_CACHE (default: <repo>/target/vm), VM_KERNEL_VERSION
# (a short name of scripts/vm-kernels.txt: 5.10, 6.1, 6.12; or an ABI such
# as 6.1.0-56-amd64; default: 6.1), VM_KERNEL_STRICT=1 (fail instead of
# booting the newest ABI of the series when a pinned one left Debian's mirror).
set -euo pipefail

VIRTME_NG_VERSION="1.42"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VM_CACHE:-$ROOT/target/vm}"

say() { printf '\033[1m[setup-vm]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get install, /lib/modules)"
mkdir -p "$CACHE"

# --- Debian packages -------------------------------------------------------
apt_updated=""
apt_update() {
  if [ -z "$apt_updated" ]; then
    say "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
  fi
}
need_pkgs=()
VM_PKGS="qemu-system-x86 kmod busybox-static udev containerd runc containernetworking-plugins catatonit systemd"
for p in $VM_PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    need_pkgs+=("$p")
  fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  apt_update
  say "installing Debian packages: ${need_pkgs[*]}"
  # No service of these packages starts on this host (containerd's unit):
  # policy-rc.d says no while they install.
  # (Removed again however the install ends: a policy-rc.d left behind
  # would hold back every later package's services on this host.)
  held=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT INT TERM
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    held=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
  if [ -n "$held" ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT INT TERM
  fi
else
  say "Debian packages present ($VM_PKGS)"
fi

# --- virtme-ng in a venv ---------------------------------------------------
VENV="$CACHE/venv"
VNG="$VENV/bin/vng"
if [ -x "$VNG" ] && [ "$("$VNG" --version 2>/dev/null)" = "virtme-ng $VIRTME_NG_VERSION" ]; then
  say "virtme-ng $VIRTME_NG_VERSION present ($VNG)"
else
  say "installing virtme-ng $VIRTME_NG_VERSION into $VENV"
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >&2 2>/dev/null; then
    # Debian's own python3 needs python3-venv for this.
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV" >&2
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "virtme-ng==$VIRTME_NG_VERSION" >&2
  got="$("$VNG" --version)"
  [ "$got" = "virtme-ng $VIRTME_NG_VERSION" ] || die "vng --version says '$got'"
  say "$got"
fi

# --- the guest kernel ------------------------------------------------------
# Pinned in scripts/vm-kernels.txt: a short name (5.10, 6.1, 6.12), the
# Debian suites that carry it, the package ABI. VM_KERNEL_VERSION may be a
# short name, a pinned ABI, or another ABI of the same series (e.g.
# 6.1.0-56-amd64), looked up in the same suites.
PINS="$ROOT/scripts/vm-kernels.txt"
pins() { grep -v '^[[:space:]]*#' "$PINS" | awk 'NF == 3'; }
want="${VM_KERNEL_VERSION:-6.1}"
# (String comparisons: awk would compare 6.10 and 6.1 as equal numbers.)
pin="$(pins | awk -v w="$want" '$1"" == w"" || $3"" == w"" || $3"" == w "-amd64"' | head -1)"
from_pin=1
if [ -z "$pin" ]; then
  from_pin=0
  # Another ABI of a pinned series: the series is the leading x.y.
  case "$want" in *-amd64) ;; *) want="$want-amd64" ;; esac
  series="$(printf '%s' "$want" | sed -n 's/^\([0-9]*\.[0-9]*\)[.-].*$/\1/p')"
  pin="$(pins | awk -v s="$series" '$1"" == s""' | head -1)"
  [ -n "$pin" ] || die "kernel '$want': not a short name or ABI of $PINS ($(pins | awk '{print $1}' | tr '\n' ' '))"
  pin="$(printf '%s' "$pin" | awk -v a="$want" '{print $1, $2, a}')"
fi
read -r short suites want <<<"$pin"
[[ "$want" =~ ^[0-9]+\.[0-9]+[-.+a-z0-9]*-amd64$ ]] || die "kernel ABI '$want' is not of the form X.Y...-amd64"
KDIR="$CACHE/kernel-$want"
VMLINUZ="$KDIR/boot/vmlinuz-$want"
if [ -f "$KDIR/.done" ] && [ -f "$VMLINUZ" ]; then
  say "kernel $want ($short) present ($KDIR)"
else
  # apt with its own lists for the pin's suites (the host's sources stay as
  # they are); signatures are checked against Debian's archive keyring.
  APTD="$CACHE/apt-$short"
  mkdir -p "$APTD/lists/partial" "$APTD/cache/archives/partial"
  : >"$APTD/sources.list"
  for s in ${suites//,/ }; do
    case "$s" in
      *-security) echo "deb http://deb.debian.org/debian-security $s main" >>"$APTD/sources.list" ;;
      *) echo "deb http://deb.debian.org/debian $s main" >>"$APTD/sources.list" ;;
    esac
  done
  # The host's apt.conf.d still applies: no update hooks, no pinning or
  # default release of the host's.
  APT_OPTS=(-o "Dir::Etc::SourceList=$APTD/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$APTD/lists" -o "Dir::Cache=$APTD/cache" -o Dir::State::status=/dev/null
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
    -o APT::Default-Release= -o APT::Update::Post-Invoke-Success::= -o APT::Update::Post-Invoke::=)
  say "apt-get update for $suites (lists in $APTD)"
  apt-get "${APT_OPTS[@]}" update -qq >&2 || die "apt-get update for $suites failed"
  rm -rf "$KDIR" "$CACHE/debs-$want"
  mkdir -p "$CACHE/debs-$want"
  # The signed package carries the vmlinuz; the -unsigned one is the fallback.
  got=""
  for pkg in "linux-image-$want" "linux-image-$want-unsigned"; do
    apt-cache "${APT_OPTS[@]}" show "$pkg" >/dev/null 2>&1 || continue
    say "apt-get download $pkg"
    if (cd "$CACHE/debs-$want" && apt-get "${APT_OPTS[@]}" download -q "$pkg" 2>&1 | grep -v 'unsandboxed' >&2); then :; fi
    deb="$(ls -1 "$CACHE/debs-$want"/"${pkg}"_*.deb 2>/dev/null | head -1 || true)"
    if [ -n "$deb" ] && dpkg-deb -c "$deb" | grep -c "\./boot/vmlinuz-$want\$" >/dev/null; then
      got="$deb"; break
    fi
    say "$pkg has no /boot/vmlinuz-$want"
  done
  if [ -z "$got" ]; then
    have="$(apt-cache "${APT_OPTS[@]}" search --names-only "^linux-image-${short//./\\.}[.-][.0-9+a-z-]*-amd64\$" \
      | awk '{print $1}' | sed 's/^linux-image-//' | { grep -v -e '-rt-' -e '-cloud-' || true; } | sort -V)"
    newest="$(printf '%s\n' "$have" | tail -1)"
    # A fresh machine (CI) must not go red the day Debian drops the pinned
    # ABI: the newest of the series stands in, loudly, unless VM_KERNEL_STRICT=1.
    if [ -z "$newest" ] || [ "$from_pin" = 0 ] || [ "${VM_KERNEL_STRICT:-0}" = 1 ]; then
      die "Debian's mirror no longer carries linux-image-$want ($suites); it has: $(printf '%s' "$have" | tr '\n' ' ')- update $PINS"
    fi
    say "WARNING: Debian's mirror no longer carries the pinned linux-image-$want; using the newest $short ABI, $newest, instead: results are not those of the pin. Update $PINS (and the README's kernel table)."
    rm -rf "$CACHE/debs-$want"
    want="$newest"
    KDIR="$CACHE/kernel-$want"
    VMLINUZ="$KDIR/boot/vmlinuz-$want"
    if [ ! -f "$KDIR/.done" ]; then
      rm -rf "$KDIR"; mkdir -p "$CACHE/debs-$want"
      (cd "$CACHE/debs-$want" && apt-get "${APT_OPTS[@]}" download -q "linux-image-$want" 2>&1 | grep -v 'unsandboxed' >&2) || true
      got="$(ls -1 "$CACHE/debs-$want"/linux-image-"$want"_*.deb 2>/dev/null | head -1 || true)"
      [ -n "$got" ] || die "apt-get download linux-image-$want failed"
    fi
  fi
fi
if [ -n "${got:-}" ] && [ ! -f "$KDIR/.done" ]; then
  say "dpkg -x $(basename "$got") $KDIR"
  dpkg -x "$got" "$KDIR"
  # trixie's packages put the modules under /usr (merged /usr).
  if [ ! -d "$KDIR/lib/modules/$want" ] && [ -d "$KDIR/usr/lib/modules/$want" ]; then
    mkdir -p "$KDIR/lib/modules"
    mv "$KDIR/usr/lib/modules/$want" "$KDIR/lib/modules/$want"
  fi
  say "depmod for $want in $KDIR (virtme-ng uses these modules)"
  depmod -b "$KDIR" "$want"
  if [ ! -d "/lib/modules/$want" ]; then
    say "copying modules to /lib/modules/$want"
    mkdir -p /lib/modules
    cp -a "$KDIR/lib/modules/$want" "/lib/modules/$want"
  fi
  rm -rf "$CACHE/debs-$want"
  touch "$KDIR/.done"
fi
if [ ! -f "/lib/modules/$want/modules.dep" ]; then
  [ -d "/lib/modules/$want" ] || cp -a "$KDIR/lib/modules/$want" "/lib/modules/$want"
  say "depmod $want"
  depmod "$want"
fi

echo "VNG=$VNG"
echo "VMLINUZ=$VMLINUZ"
