#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time: SECONDS each
# (default 10). Builds with the stable toolchain and libFuzzer's coverage
# instrumentation, without cargo-fuzz (the flags are the ones `cargo fuzz
# build -s none` uses), so it needs nothing beyond cargo and a C++ compiler.
# The corpus of each run starts from the seeds in fuzz/seeds/TARGET (when
# present; fuzz/corpus is cargo-fuzz's own, not committed) and is
# thrown away; crashes are kept in target/fuzz-artifacts/TARGET and fail the run.
#
#   bash scripts/fuzz.sh            # 10 s per target (the test command runs 3 s each)
#   bash scripts/fuzz.sh 600        # a longer run
#   bash scripts/fuzz.sh 60 peer_handshake
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
shift || true
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$PWD/target/fuzz-build"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml | grep -v '^falcon-fuzz$')
fi
echo "== fuzz: building ${#targets[@]} targets (release, coverage instrumented)"
(cd fuzz && cargo build --locked --release --target "$triple" $(printf -- '--bin %s ' "${targets[@]}"))
status=0
for t in "${targets[@]}"; do
    corpus=$(mktemp -d)
    [ -d "fuzz/seeds/$t" ] && cp -r "fuzz/seeds/$t/." "$corpus/"
    artifacts="$PWD/target/fuzz-artifacts/$t"
    mkdir -p "$artifacts"
    log=$(mktemp)
    if "$CARGO_TARGET_DIR/$triple/release/$t" "$corpus" -max_total_time="$secs" \
        -artifact_prefix="$artifacts/" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1)
        echo "fuzz $t: ${runs:-?} runs in ${secs}s, ${cov:-cov: ?}, no crash"
    else
        echo "fuzz $t: CRASH (inputs in $artifacts)"
        tail -40 "$log"
        status=1
    fi
    rm -rf "$corpus" "$log"
done
exit $status
