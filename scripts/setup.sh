#!/usr/bin/env bash
# Idempotent setup for a fresh machine of this kind (Debian bookworm, rustup, root).
# Installs what the eBPF build needs and says what it is doing:
#   - Debian: llvm-22-dev + libpolly-22-dev (bpf-linker links against LLVM 22,
#     the LLVM of the pinned nightly), iproute2 (tests), python3 (demo agent),
#     libseccomp-dev (the agent's seccomp filter under `enforcer run`),
#     bpftool (tests check attachments from outside), protobuf-compiler
#     (protoc: the CRI client crate of the tests builds its gRPC types)
#   - rustup: the pinned nightly with rust-src (build-std=core for bpfel)
#   - cargo: bpf-linker 0.13.0 built against LLVM 22
set -euo pipefail

NIGHTLY="${ENFORCER_NIGHTLY:-nightly-2026-05-20}"
BPF_LINKER_VERSION="0.13.0"
LLVM_MAJOR=22

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "warning: not root; apt-get steps will be skipped"
fi

need_pkgs=()
for p in "llvm-${LLVM_MAJOR}-dev" "libpolly-${LLVM_MAJOR}-dev" iproute2 python3 curl openssl libzstd-dev zlib1g-dev libseccomp-dev pkg-config bpftool protobuf-compiler; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    need_pkgs+=("$p")
  fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing Debian packages: ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    say "missing Debian packages (run as root): ${need_pkgs[*]}"; exit 1
  fi
else
  say "Debian packages present"
fi

if ! rustup toolchain list | grep -q "^${NIGHTLY}"; then
  say "installing rust toolchain ${NIGHTLY} (pinned: its LLVM must match bpf-linker's)"
  rustup toolchain install "${NIGHTLY}" --profile minimal --component rust-src
else
  say "toolchain ${NIGHTLY} present"
fi
if ! rustup component list --toolchain "${NIGHTLY}" --installed | grep -q '^rust-src'; then
  say "adding rust-src to ${NIGHTLY}"
  rustup component add rust-src --toolchain "${NIGHTLY}"
fi

have_linker=""
if command -v bpf-linker >/dev/null 2>&1; then
  if bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"; then
    have_linker=1
  fi
fi
if [ -z "$have_linker" ]; then
  say "building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_MAJOR} (a few minutes)"
  PATH="/usr/lib/llvm-${LLVM_MAJOR}/bin:$PATH" cargo install bpf-linker --locked --version "${BPF_LINKER_VERSION}" \
      --no-default-features --features "llvm-${LLVM_MAJOR}"
else
  say "bpf-linker ${BPF_LINKER_VERSION} present"
fi

# bpffs for pinned maps/links (daemon); harmless if already mounted.
if [ "$(id -u)" = 0 ] && ! grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; then
  say "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf || say "warning: could not mount bpffs"
fi
say "done"
