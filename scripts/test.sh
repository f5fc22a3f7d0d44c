#!/usr/bin/env bash
# Every test of l4lb: the standalone object build (BPF warnings are errors),
# `cargo fmt --check` and clippy with warnings as errors, unit tests,
# datapath golden tests through BPF_PROG_TEST_RUN, the offload subset check
# and the end-to-end tests over veth pairs in namespaces.
# Root-only suites report their tests as ignored, with the reason, when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

# Test namespaces that exist before the run (another run's, a developer's
# lab) are not this run's to answer for.
test_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep '^l4lbt-' | sort || true; }
before=$(test_namespaces)

make --no-print-directory l4lb_xdp.o
# The path-length count runs the datapath in an interpreter and checks every
# frame it sends (and that its model of the maps still fits include/l4lb.h).
scripts/path-length > /dev/null
# Style and lints first: they fail fast, before the long suites.
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo build --release --locked
cargo test --locked 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}

# The end-to-end tests remove their namespaces even when they fail; make sure.
left=$(comm -13 <(printf '%s\n' "$before") <(test_namespaces) | sed '/^$/d')
if [ -n "$left" ]; then
  echo "test.sh: $(wc -l <<<"$left") test namespace(s) were left behind:" >&2
  printf '%s\n' "$left" >&2
  status=1
fi

passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
ignored=$(grep -Eo '[0-9]+ ignored' target/test-output.txt | awk '{s+=$1} END {print s+0}')
echo
echo "total: $passed passed, $failed failed, $ignored skipped"
exit "$status"
