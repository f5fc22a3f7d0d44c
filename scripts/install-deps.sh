#!/usr/bin/env bash
# Installs the system packages l4lb needs to build, test and run its demo
# (Debian 12). Does nothing when they are all present.
set -euo pipefail

packages=(
  clang llvm          # BPF compiler; libclang for bindgen; llvm tools for scripts/path-length
  libelf-dev zlib1g-dev pkg-config   # libbpf-sys (vendored libbpf)
  libbpf-dev          # bpf/bpf_helpers.h for the datapath
  linux-libc-dev      # linux/bpf.h and friends
  bpftool iproute2    # loading and inspecting from the shell
  ethtool hping3 tcpdump  # demo traffic and inspection
  curl python3        # the lab (scripts/lab): HTTP servers on the backends, requests from the client
  systemd             # systemd-analyze: the agent's unit (systemd/l4lb@.service) is verified by the install test
  prometheus          # promtool checks the agent's metrics (tests/agent.rs)
  tmux                # a real terminal for `l4lb top` (tests/agent.rs)
  bird2               # BGP: the agent announces the VIPs through BIRD (tests/agent.rs, scale-out lab)
  make
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo (the Rust toolchain) is required and not on PATH; install it with rustup" >&2
  exit 1
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
