#!/usr/bin/env bash
# The scale-out demo (scripts/scale-lab, docs/scale-out.md): a client behind
# a BGP router that spreads its connections over 2 balancers by ECMP, each
# balancer running `l4lb serve`, which announces the VIP through BIRD. It
# shows the router's two nexthops and which balancer and backend answer
# connections from different source ports; then stops balancer 2's agent
# (the VIP is withdrawn there, the router keeps one nexthop) and shows the
# same connections answered by the same backends through balancer 1; then
# starts the agent again. The lab is removed at the end, also on Ctrl-C or
# failure, unless KEEP=1 (`make demo-scale KEEP=1`).
set -euo pipefail
cd "$(dirname "$0")/.."

case ${KEEP:-} in ""|0|no|false) KEEP="" ;; *) KEEP=1 ;; esac
export SCALE_PREFIX=${SCALE_PREFIX:-l4lb-scale}
STATE=/run/$SCALE_PREFIX
export L4LB=$PWD/target/release/l4lb
VIP=203.0.113.10
CLIENT_NS=$SCALE_PREFIX-client RT_NS=$SCALE_PREFIX-rt

if [ "$(id -u)" -ne 0 ]; then
  echo "demo-scale: needs root (network namespaces, XDP, BIRD): run it with sudo" >&2
  exit 1
fi
finish() { [ -n "$KEEP" ] && echo "KEEP=1: the lab stays up (scripts/scale-lab down removes it)" || scripts/scale-lab down >/dev/null; }
trap finish EXIT

cargo build --release --quiet
scripts/scale-lab up --balancers 2 --backends 3

# Which balancer the router sends source port P to, and who answers it.
show() {
  echo "== $1"
  ip -n "$RT_NS" route show "$VIP"
  for port in 40001 40002 40003 40004 40005 40006; do
    via=$(ip -n "$RT_NS" route get "$VIP" from 198.18.1.10 iif rt-client ipproto tcp sport "$port" dport 80 |
      grep -o 'via [0-9.]*')
    # The server closes first (HTTP/1.0): the client keeps no TIME_WAIT, the
    # port is free for the next round.
    answer=$(ip netns exec "$CLIENT_NS" curl -s -m 2 --http1.0 --local-port "$port" "http://$VIP/" || echo "no answer")
    printf '  client port %s: router %s -> %s\n' "$port" "$via" "$answer"
    sleep 0.1
  done
}

show "two balancers announce the VIP"
echo "== stopping balancer 2's agent (SIGTERM): it withdraws the VIP; its datapath keeps forwarding"
kill -TERM "$(cat "$STATE/agent-lb2.pid")"
for _ in $(seq 100); do [ "$(ip -n "$RT_NS" route show "$VIP" | grep -c nexthop)" -eq 0 ] && break; sleep 0.05; done
show "one balancer left: the same ports reach the same backends"
scripts/scale-lab start-agent 2
for _ in $(seq 100); do [ "$(ip -n "$RT_NS" route show "$VIP" | grep -c nexthop)" -eq 2 ] && break; sleep 0.05; done
show "balancer 2 is back"
