#!/usr/bin/env bash
# The seed demo on one machine: a generator namespace and a balancer namespace
# joined by a veth pair; l4lb attached in driver mode on the balancer's end,
# 32 destinations loaded, a random-source SYN flood from the generator
# (hping3 --rand-source --flood, as the seed did) and the live statistics for
# DEMO_SECONDS (default 10) seconds. Everything is removed at the end, also on
# Ctrl-C or failure.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TO_RUN=${DEMO_SECONDS:-10}
GEN_NS=l4lb-demo-gen
LB_NS=l4lb-demo-lb
GEN_DEV=l4lbdemo-gen
LB_DEV=l4lbdemo-lb
GEN_ADDR=192.0.2.1
LB_ADDR=192.0.2.2   # the address the generator floods (TEST-NET-1, only inside these namespaces)
DESTINATIONS=destination_samples/32_destinations.csv
L4LB=$PWD/target/release/l4lb

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (network namespaces, XDP): run it with sudo" >&2
  exit 1
fi

flood_pid=""
cleanup() {
  [ -n "$flood_pid" ] && kill "$flood_pid" 2>/dev/null || true
  ip netns del "$GEN_NS" 2>/dev/null || true
  ip netns del "$LB_NS" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cleanup   # leftovers of an interrupted run

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "build"
make --no-print-directory all

step "network: $GEN_NS ($GEN_ADDR) <-veth-> $LB_NS ($LB_ADDR)"
ip netns add "$GEN_NS"
ip netns add "$LB_NS"
ip link add "$GEN_DEV" netns "$GEN_NS" type veth peer name "$LB_DEV" netns "$LB_NS"
ip -n "$GEN_NS" addr add "$GEN_ADDR/24" dev "$GEN_DEV"
ip -n "$LB_NS" addr add "$LB_ADDR/24" dev "$LB_DEV"
ip -n "$GEN_NS" link set "$GEN_DEV" up
ip -n "$LB_NS" link set "$LB_DEV" up
ip -n "$GEN_NS" neigh add "$LB_ADDR" lladdr "$(ip netns exec "$LB_NS" cat /sys/class/net/$LB_DEV/address)" dev "$GEN_DEV"

step "attach l4lb (driver mode) and load $DESTINATIONS"
show ip netns exec "$LB_NS" "$L4LB" attach -i "$LB_DEV" --mode drv
show ip netns exec "$LB_NS" "$L4LB" map -i "$LB_DEV" -f "$DESTINATIONS"
show ip netns exec "$LB_NS" "$L4LB" status -i "$LB_DEV" | head -12

step "flood: hping3 $LB_ADDR --rand-source --flood -S -p 80 (for ${SECONDS_TO_RUN}s)"
ip netns exec "$GEN_NS" hping3 "$LB_ADDR" --rand-source --flood -S -p 80 -q >/dev/null 2>&1 &
flood_pid=$!
ip netns exec "$LB_NS" "$L4LB" stats -i "$LB_DEV" --interval 1 --count "$SECONDS_TO_RUN"
kill "$flood_pid" 2>/dev/null || true
wait "$flood_pid" 2>/dev/null || true
flood_pid=""

step "detach and clean up"
show ip netns exec "$LB_NS" "$L4LB" detach -i "$LB_DEV"
