#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs every falcon test: formatting,
# lints, the unit and integration suites (with the real binary, tcpdump and
# fixture logs). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets --no-fail-fast 2>&1 | tee target/test-output.txt
# Doc tests (not part of --all-targets).
cargo test --locked --doc 2>&1 | tee -a target/test-output.txt

passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
ignored=$(grep -Eo '[0-9]+ ignored' target/test-output.txt | awk '{s+=$1} END {print s+0}')
echo "falcon tests took $(( $(date +%s) - started ))s"
echo "total: ${passed} passed, ${failed} failed, ${ignored} skipped"
