#!/usr/bin/env bash
# Idempotent setup of the VM test runner (`cargo xtask vm-test`): a second,
# real kernel that loads BPF LSM/fentry programs (the host kernel refuses
# them), booted by virtme-ng under QEMU/TCG. Root, Debian bookworm.
# Says what it does (on stderr) and skips whatever is already there:
#   - Debian: qemu-system-x86 (the VM), kmod (depmod), busybox-static (the
#     guest initramfs), udev (virtme-ng's guest init needs it to find the
#     virtio-serial ports that carry the command's stdout/stderr and its
#     exit status; without it the output and the status are lost)
#   - a Python venv with virtme-ng (pinned) in the cache dir
#   - the newest Debian linux-image-6.1.0-NN-amd64 (or $VM_KERNEL_VERSION),
#     `apt-get download` + `dpkg -x` into the cache dir, depmod'ed there
#     (virtme-ng takes the modules from beside the vmlinuz), and its modules
#     also copied to /lib/modules/<ver> and depmod'ed
# On stdout it prints only two lines for xtask: VNG=<path> and VMLINUZ=<path>.
#
# Environment: VM_CACHE (default: <repo>/target/vm), VM_KERNEL_VERSION
# (e.g. 6.1.0-56-amd64 or 6.1.0-56; default: the newest cached one, else the
# newest in apt's lists).
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
for p in qemu-system-x86 kmod busybox-static udev; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    need_pkgs+=("$p")
  fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  apt_update
  say "installing Debian packages: ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
else
  say "Debian packages present (qemu-system-x86 kmod busybox-static udev)"
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
want="${VM_KERNEL_VERSION:-}"
case "$want" in
  "" | *-amd64) ;;
  *) want="$want-amd64" ;;
esac
if [ -z "$want" ]; then
  # Newest already extracted, else the newest apt knows.
  want="$(ls -1 "$CACHE" 2>/dev/null | sed -n 's/^kernel-\(6\.1\.0-[0-9]*-amd64\)$/\1/p' | sort -V | tail -1)"
  if [ -z "$want" ] || [ ! -f "$CACHE/kernel-$want/.done" ]; then
    newest() {
      apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' \
        | sed 's/^linux-image-//' | sort -V | tail -1
    }
    want="$(newest)"
    if [ -z "$want" ]; then apt_update; want="$(newest)"; fi
    [ -n "$want" ] || die "apt knows no linux-image-6.1.0-NN-amd64 package"
  fi
fi
[[ "$want" =~ ^6\.1\.0-[0-9]+-amd64$ ]] || die "kernel version '$want' is not of the form 6.1.0-NN-amd64"
KDIR="$CACHE/kernel-$want"
VMLINUZ="$KDIR/boot/vmlinuz-$want"
if [ -f "$KDIR/.done" ] && [ -f "$VMLINUZ" ]; then
  say "kernel $want present ($KDIR)"
else
  rm -rf "$KDIR" "$CACHE/debs-$want"
  mkdir -p "$CACHE/debs-$want"
  # The signed package carries the vmlinuz on bookworm; the -unsigned one
  # is the fallback.
  got=""
  for pkg in "linux-image-$want" "linux-image-$want-unsigned"; do
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then apt_update; fi
    say "apt-get download $pkg"
    if (cd "$CACHE/debs-$want" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' >&2); then :; fi
    deb="$(ls -1 "$CACHE/debs-$want"/"${pkg}"_*.deb 2>/dev/null | head -1 || true)"
    if [ -n "$deb" ] && dpkg-deb -c "$deb" | grep -c "\./boot/vmlinuz-$want\$" >/dev/null; then
      got="$deb"; break
    fi
    say "$pkg has no /boot/vmlinuz-$want"
  done
  [ -n "$got" ] || die "no package of linux-image-$want holds /boot/vmlinuz-$want"
  say "dpkg -x $(basename "$got") $KDIR"
  dpkg -x "$got" "$KDIR"
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
