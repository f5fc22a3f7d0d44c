#!/usr/bin/env bash
# The demo on one machine, on the lab network (scripts/lab): a client, the
# balancer and 4 backends on one L2 segment in network namespaces. l4lb is
# attached in driver mode on the balancer and given the lab's three services
# (an IPv4 VIP with IPv4 backends, an IPv4 VIP with IPv6 backends, an IPv6
# VIP) by its agent, `l4lb serve`; HTTP requests from different client source ports
# are answered by different backends straight back to the client (direct
# server return); then
# a random-source SYN flood from the client (hping3 --rand-source --flood, as
# the seed did) with the live statistics for DEMO_SECONDS (default 10)
# seconds. The lab is removed at the end, also on Ctrl-C or failure, unless
# KEEP=1 (`make demo KEEP=1`): then it stays up for you to try.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TO_RUN=${DEMO_SECONDS:-10}
case ${KEEP:-} in ""|0|no|false) KEEP="" ;; *) KEEP=1 ;; esac
export LAB_PREFIX=${LAB_PREFIX:-l4lb-lab}
STATE=${LAB_STATE_DIR:-/run/$LAB_PREFIX}
L4LB=$PWD/target/release/l4lb
export L4LB

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (network namespaces, XDP): run it with sudo" >&2
  exit 1
fi
[[ $SECONDS_TO_RUN =~ ^[1-9][0-9]*$ ]] || { echo "demo: DEMO_SECONDS must be a whole number of seconds" >&2; exit 1; }

flood_pid=""
lab_started=""
cleanup() {
  local status=$?
  if [ -n "$flood_pid" ]; then
    kill "$flood_pid" 2>/dev/null || true
    wait "$flood_pid" 2>/dev/null || true
  fi
  if [ -n "$lab_started" ]; then
    if [ -n "$KEEP" ]; then
      step "the lab stays up (KEEP=1)"
      echo "try:    ip netns exec $LAB_PREFIX-client curl http://203.0.113.10/"
      echo "        ip netns exec $LAB_PREFIX-client curl 'http://[2001:db8:113::10]/'"
      echo "        ip netns exec $LAB_PREFIX-lb target/release/l4lb stats -i lb0"
      echo "        scripts/lab status"
      echo "remove: scripts/lab down"
    else
      step "tear down"
      scripts/lab down
    fi
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { local line="$*"; printf '$ %s\n' "${line//$PWD\//}"; "$@"; }

step "build"
make --no-print-directory all

step "the lab: client, balancer (l4lb in driver mode, 3 services) and 4 backends (l4lb decap, HTTP) on one bridge"
lab_started=1
scripts/lab up --backends 4
# shellcheck disable=SC1091
. "$STATE/lab.env"

step "l4lb on the balancer: the running configuration and each service's Maglev table"
show ip netns exec "$LB_NS" "$L4LB" config -i "$LB_DEV"
show ip netns exec "$LB_NS" "$L4LB" status -i "$LB_DEV"

# curl closes first, so each port it used stays in TIME_WAIT for 60 s: start
# from a random port, so that the demo can run again right away on a kept lab.
port=$((40000 + RANDOM % 200 * 100))
for url in "http://$VIP/" "http://$VIP_4IN6/" "http://[$VIP6]/"; do
  step "HTTP from the client to $url, one source port after the other, until every backend has answered"
  declare -A seen=()
  for ((tries = 1; tries <= 24; port++, tries++)); do
    answer=$(ip netns exec "$CLIENT_NS" curl -sS --max-time 3 --local-port "$port" "$url")
    printf '$ curl --local-port %s %s   ->  %s\n' "$port" "$url" "$answer"
    seen[${answer%% *}]=1
    [ "${#seen[@]}" -lt "$BACKENDS" ] || [ "$tries" -lt 4 ] || break
  done
  port=$((port + 1))   # `break` skipped the increment: that port is in TIME_WAIT
  unset seen
done
echo "(each answer went from its backend straight to the client: the balancer only sees the client's packets)"

step "a change with connections open: 12 keep-alive connections to $VIP, then be1 drained (weight 0) and be2 removed"
# One HTTP/1.1 connection per client port, each asked once before and once
# after the apply: a connection whose backend stays in the service (be1 at
# weight 0 included) keeps it although its slot may now name another one;
# be2's connections break (their backend left). The slots whose backend
# changed are in transition until the sweep ends them (the lab's agent,
# `l4lb serve`, runs it every second; one round is also run by hand with
# `l4lb settle` right after the apply).
backend_addr_of() { grep -v '^#' "$DESTINATIONS" | sed -n "${1}s/,.*//p" | tr -d ' '; }
changed="$STATE/lb-changed.toml"
python3 - "$STATE/lb.toml" "$changed" "$(backend_addr_of 1)" "$(backend_addr_of 2)" <<'PY'
import re, sys
src, dst, be1, be2 = sys.argv[1:5]
text = open(src).read()
text = re.sub(r'\n\[\[service\]\]\nvip = "[^"]*"', lambda m: m.group(0) + "\nidle_timeout = 5", text)
text = re.sub(r'(  \{ address = "%s", mac = "[^"]*") \},' % re.escape(be1), r'\1, weight = 0 },', text)
text = re.sub(r'  \{ address = "%s", mac = "[^"]*" \},\n' % re.escape(be2), '', text)
open(dst, "w").write(text)
PY
fifo="$STATE/demo-keepalive.fifo"
rm -f "$fifo"; mkfifo "$fifo"
cat >"$STATE/demo-keepalive.py" <<'PY'
import http.client, sys
vip, first_port = sys.argv[1], int(sys.argv[2])
conns = []
for i in range(12):
    c = http.client.HTTPConnection(vip, 80, timeout=3, source_address=("", first_port + i))
    c.request("GET", "/"); before = c.getresponse().read().decode().split()[0]
    conns.append((first_port + i, c, before))
print("opened:", " ".join(f"{p}->{b}" for p, _, b in conns), flush=True)
sys.stdin.readline()
kept = broke = moved = 0
for p, c, before in conns:
    try:
        c.request("GET", "/"); after = c.getresponse().read().decode().split()[0]
    except Exception as err:
        after = f"broken ({type(err).__name__})"
    verdict = "kept" if after == before else ("broken" if after.startswith("broken") else "MOVED")
    kept += verdict == "kept"; broke += verdict == "broken"; moved += verdict == "MOVED"
    print(f"  port {p}: {before} -> {after}  {verdict}")
print(f"{kept} kept their backend, {broke} broken (their backend was removed), {moved} moved")
PY
ip netns exec "$CLIENT_NS" python3 "$STATE/demo-keepalive.py" "$VIP" "$port" <"$fifo" &
client_pid=$!
exec 3>"$fifo"
sleep 1.5
port=$((port + 12))
show ip netns exec "$LB_NS" "$L4LB" apply -i "$LB_DEV" -c "$changed"
show ip netns exec "$LB_NS" "$L4LB" settle -i "$LB_DEV"
echo >&3; exec 3>&-
wait "$client_pid" || true
rm -f "$fifo" "$STATE/demo-keepalive.py"
echo "(the connections' idle time is 5 s here: once they are idle that long, the sweep of the lab's"
echo " agent, \`l4lb serve -i $LB_DEV ... --sweep-every 1' running since \`scripts/lab up', ends the transitions)"
sleep 7
echo "\$ grep transition_ended $STATE/agent.log | tail -n 3    # the agent's log of the transitions it ended"
grep transition_ended "$STATE/agent.log" | tail -n 3 || true
show ip netns exec "$LB_NS" "$L4LB" settle -i "$LB_DEV"
show ip netns exec "$LB_NS" "$L4LB" apply -i "$LB_DEV" -c "$STATE/lb.toml"
rm -f "$changed"

step "flood: hping3 $VIP --rand-source --flood -S -p 80 from the client, live l4lb stats for ${SECONDS_TO_RUN}s"
# Started directly (not through a shell function) so that $! is hping3 itself.
ip netns exec "$CLIENT_NS" hping3 "$VIP" --rand-source --flood -S -p 80 -q >/dev/null 2>&1 &
flood_pid=$!
ip netns exec "$LB_NS" "$L4LB" stats -i "$LB_DEV" --interval 1 --count "$SECONDS_TO_RUN"
kill "$flood_pid" 2>/dev/null || true
wait "$flood_pid" 2>/dev/null || true
flood_pid=""
sleep 0.5   # let the last frames drain

step "what l4lb sent to each backend (its IPv4 and IPv6 address, every service), and what each backend decapsulated"
lb_json=$(ip netns exec "$LB_NS" "$L4LB" stats -i "$LB_DEV" --json --count 1 --interval 0.1)
printf '%-8s %-14s %-18s %14s %14s\n' backend IPv4 IPv6 "l4lb sent" decapsulated
for ((k = 1; k <= BACKENDS; k++)); do
  addr=$(grep -v '^#' "$DESTINATIONS" | sed -n "${k}s/,.*//p")
  addr6=2001:db8:18::$((100 + k))
  decap_json=$(ip netns exec "$BACKEND_NS_PREFIX$k" "$L4LB" decap stats -i "be$k" --json --count 1 --interval 0.1)
  python3 - "$k" "$addr" "$addr6" "$lb_json" "$decap_json" <<'PY'
import json, sys
k, addr, addr6, lb, decap = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
sent = sum(b["packets"] for s in lb["services"] for b in s["backends"] if b["addr"] in (addr, addr6))
print(f"{'be' + k:<8} {addr:<14} {addr6:<18} {sent:>14,} {decap['counters']['decapsulated']:>14,}")
PY
done
