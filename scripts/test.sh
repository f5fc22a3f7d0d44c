#!/usr/bin/env bash
# Every test of l4lb: the standalone object build (BPF warnings are errors),
# `cargo fmt --check` and clippy with warnings as errors, unit tests,
# datapath golden tests through BPF_PROG_TEST_RUN, the offload subset check
# and the end-to-end tests over veth pairs in namespaces.
# Root-only suites report their tests as ignored, with the reason, when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

make --no-print-directory l4lb_xdp.o
# Style and lints first: they fail fast, before the long suites.
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo build --release --locked
cargo test --locked 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}

# The end-to-end tests remove their namespaces even when they fail; make sure.
left=$(ip netns list 2>/dev/null | grep -c '^l4lbt-' || true)
if [ "$left" -gt 0 ]; then
  echo "test.sh: $left test namespace(s) were left behind:" >&2
  ip netns list | grep '^l4lbt-' >&2
  status=1
fi

passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
ignored=$(grep -Eo '[0-9]+ ignored' target/test-output.txt | awk '{s+=$1} END {print s+0}')
echo
echo "total: $passed passed, $failed failed, $ignored skipped"
exit "$status"
