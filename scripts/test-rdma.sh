#!/usr/bin/env bash
# The rdma transport for real, on a host without RDMA hardware: builds falcon
# and its rdma tests with `--features rdma` here, boots the Soft-RoCE guest
# (scripts/rdma-guest.sh: Debian 12 under QEMU -accel tcg, rdma_rxe on a
# dummy interface) and runs inside it:
#   * the rdma tests that need a device (the transport conformance suite, a
#     4 KiB ring wrapping ~300 times under a slow receiver, a restarted peer,
#     a peer with another ring size);
#   * `falcon bench --rtt --local` over tcp, shm and rdma, side by side;
#   * `falcon bench --consensus --transport rdma`: three `falcon replicate`
#     processes whose peer links are rdma queue pairs, driven by clients.
# Timings inside the guest are of an emulated CPU: they show that it works
# and how the transports compare, not how fast real hardware is.
# Needs root (the guest build uses debootstrap). Exit status: the tests' (the
# benchmarks inform; under emulation one can stop early, which is reported).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== rdma: building falcon and its tests with --features rdma"
cargo build --locked --features rdma --bin falcon
testbin=$(cargo test --locked --features rdma --test rdma --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("name") == "rdma" and "test" in t.get("kind", []):
        print(m["executable"])')
[ -x "$testbin" ] || { echo "test-rdma: could not find the rdma test binary" >&2; exit 1; }
rel=${testbin#"$PWD/"}

bash scripts/rdma-guest.sh build
echo "== rdma: inside the Soft-RoCE guest"
bash scripts/rdma-guest.sh run "$PWD" -- bash -c "
set -e
echo '-- device:'; ibv_devices | sed -n '3,\$p'
echo '-- rdma tests that need a device:'
./$rel --ignored --test-threads 1
for t in tcp shm rdma; do
    echo \"-- bench --rtt --local --transport \$t:\"
    ./target/debug/falcon bench --rtt --local --transport \$t --iters 2000 --warmup 200 --color never | grep -E 'transport:|round trip' || echo '   (this benchmark did not complete under emulation; the tests above decide)'
done
for t in tcp shm rdma; do
    echo \"-- bench --consensus --transport \$t (3 replicas):\"
    ./target/debug/falcon -q bench --consensus --transport \$t --replicas 3 --clients 4 --sync never --duration 2s --dir /tmp --color never | grep -E 'cluster:|^.[ ]*(replicas|3) ' || echo '   (this benchmark did not complete: under emulation a view change can interrupt it; the tests above decide)'
done
"
