#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs every falcon test: formatting,
# lints, the unit and integration suites (with the real binary, tcpdump and
# fixture logs). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
# A stage's heading with the seconds since the start (to see where CI time goes).
stage() { echo "== $* (at $(( $(date +%s) - started )) s)"; }

bash scripts/setup.sh --no-build

# Both lock files current (fuzz/ is its own workspace: a dependency added to
# falcon must land in fuzz/Cargo.lock too, or the fuzz stage fails late).
stage "lock files"
for dir in . fuzz; do
    (cd "$dir" && cargo metadata --locked --format-version 1 >/dev/null) || {
        echo "error: $dir/Cargo.lock is out of date: run 'cargo metadata --format-version 1 >/dev/null' in $dir and commit it" >&2
        exit 1
    }
done

stage "cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt --all -- --check)
stage "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --features rdma -- -D warnings
# One build for every test: with the rdma feature (off by default; it links
# libibverbs, which setup.sh installs), so the rdma tests below reuse it. Its
# tests that need a device say so and skip here; they run in the guest.
stage "cargo test"
cargo test --locked --features rdma --all-targets --no-fail-fast 2>&1 | tee target/test-output.txt
# Doc tests (not part of --all-targets).
cargo test --locked --features rdma --doc 2>&1 | tee -a target/test-output.txt

# A bounded run of every fuzz target (fuzz/: every decoder of outside input).
stage "fuzz: 3 s per target"
bash scripts/fuzz.sh 3

# The rdma transport: as root, where the Soft-RoCE guest can be built, the
# tests that need a device, inside QEMU (scripts/test-rdma.sh).
if [ "$(id -u)" = 0 ]; then
    stage "rdma feature: the tests that need a device, in the Soft-RoCE guest"
    bash scripts/test-rdma.sh 2>&1 | tee -a target/test-output.txt
else
    echo "rdma guest tests skipped: building the Soft-RoCE guest needs root"
fi

passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
ignored=$(grep -Eo '[0-9]+ ignored' target/test-output.txt | awk '{s+=$1} END {print s+0}')
echo "falcon tests took $(( $(date +%s) - started ))s"
echo "total: ${passed} passed, ${failed} failed, ${ignored} skipped"
