#!/usr/bin/env bash
# Round trip of a 64-byte TCP echo through a VM, side by side in one run.
# Every guest (scripts/vm-guest.sh) runs under -accel tcg, and all of them
# run at once; the rounds alternate between the setups, so that a slower
# minute of this host slows every setup alike:
#   plain       the guest on a plain TAP device (QEMU -netdev tap);
#   1 replica   one guest behind `falcon tap-attach` alone: falcon's own
#               path (TAP device -> falcon -> QEMU stream and back, the log
#               append), no peers;
#   committed   three guests behind `falcon tap-attach --deliver committed`
#               on three network hosts (namespaces on a bridge): the
#               leader's VM gets a frame once a majority has it;
#   early       the same with `--deliver early` (the default): the leader's
#               VM gets it at once, and its answer waits for the commit.
# The two 3-replica clusters are measured twice per round: as they are (the
# backups' guests emulate every frame on the same two cores as the
# leader's), and with the backups' QEMUs at idle CPU priority (chrt
# --idle), which stands for backups on hosts of their own: their guests
# then use only what the leader's leaves idle.
# Each measurement is `falcon bench --rtt --peer 10.0.0.2:7 --plain-echo`
# from the leader's host. The clusters' mean commit latency (propose to
# commit, from the leader's --metrics) is printed beside them.
# Root only (namespaces, TAP devices).
#   Usage: scripts/bench-vm.sh [ITERS] [ROUNDS]   (FALCON_BENCH_SYNC=never|batch)
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-2000}
rounds=${2:-5}
per=$((iters / rounds))
sync=${FALCON_BENCH_SYNC:-batch}
falcon=$PWD/target/release/falcon
[ -x "$falcon" ] || cargo build --release --locked -q
guest=${FALCON_VM_GUEST_DIR:-/var/tmp/falcon-vm-guest}
bash scripts/vm-guest.sh "$guest" >&2
tag=vb$$
work=$(mktemp -d)
cleanup() {
    for ns in $(ip netns list | awk -v t="$tag-" 'index($1, t) == 1 {print $1}'); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    for l in $(ip -o link show | awk -F': ' -v t="$tag" 'index($2, t) == 1 {sub(/@.*/, "", $2); print $2}'); do
        ip link del "$l" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

append="console=ttyS0 quiet panic=-1 falcon.ip=10.0.0.2/24"
nic="virtio-net-pci,mac=52:54:00:12:34:56,romfile="
qemu=(qemu-system-x86_64 -accel tcg -m 128 -nodefaults -display none -no-reboot
    -kernel "$guest/vmlinux" -initrd "$guest/initrd.cpio.gz" -append "$append")

wait_ping() { # $1: namespace; the guest answers pings and its echo port is open
    for _ in $(seq 1 300); do
        ip netns exec "$1" ping -c 1 -W 1 10.0.0.2 >/dev/null 2>&1 &&
            ip netns exec "$1" nc -z -w 1 10.0.0.2 7 2>/dev/null && return 0
        sleep 0.2
    done
    echo "bench-vm: the guest never answered in $1" >&2
    return 1
}

measure() { # $1: namespace; prints p50 p99 (µs)
    ip netns exec "$1" "$falcon" bench --rtt --peer 10.0.0.2:7 --plain-echo --size 64 \
        --iters "$per" --warmup "${FALCON_BENCH_WARMUP:-100}" --json 2>/dev/null |
        python3 -c 'import json,sys; r=json.load(sys.stdin); r=r.get("result", r); print("%.1f %.1f" % (r["rtt"]["p50_us"], r["rtt"]["p99_us"]))'
}

commit_stats() { # $1: namespace, $2: metrics address; prints the commit latency's sum (s) and count
    ip netns exec "$1" python3 - "$2" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode()
v = {l.split()[0].split("{")[0]: float(l.split()[1]) for l in text.splitlines() if l.startswith("falcon_commit_latency_seconds_")}
print(v.get("falcon_commit_latency_seconds_sum", 0), v.get("falcon_commit_latency_seconds_count", 0))
PY
}

cpu_of() { # $1..: namespaces; prints the CPU time (ns) their falcon and QEMU processes used so far
    local pids=""
    for ns in "$@"; do pids+=" $(ip netns pids "$ns" | tr '\n' ' ')"; done
    python3 - $pids <<'PY'
import os, sys
f = q = 0
for pid in sys.argv[1:]:
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        ns = sum(int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0]) for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        continue
    if comm == "falcon":
        f += ns
    elif comm.startswith("qemu"):
        q += ns
print(f, q)
PY
}

start_plain() {
    local ns=$tag-p
    ip netns add "$ns"
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip tuntap add dev tap0 mode tap
    ip netns exec "$ns" ip addr add 10.0.0.1/24 dev tap0
    ip netns exec "$ns" ip link set tap0 up
    ip netns exec "$ns" "${qemu[@]}" -serial "file:$work/plain.log" \
        -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
        -device "$nic,netdev=n0" >/dev/null 2>&1 &
}

start_cluster() { # $1: cluster number, $2: replicas, $3: --deliver
    local c=$1 n=$2 dir=$work/c$1 i ns
    mkdir -p "$dir"
    ip link add "${tag}b$c" type bridge
    ip link set "${tag}b$c" up
    head -c 32 /dev/urandom > "$dir/cluster.key"
    printf 'cluster = "bench-vm-%d"\nkey_file = "cluster.key"\nelection_timeout = "1s"\nsync = "%s"\n' "$c" "$sync" > "$dir/cluster.toml"
    for i in $(seq 1 "$n"); do
        ns=$tag-c$c-$i
        ip netns add "$ns"
        ip link add "${tag}c${c}v$i" type veth peer name "${tag}c${c}p$i"
        ip link set "${tag}c${c}p$i" netns "$ns"
        ip link set "${tag}c${c}v$i" master "${tag}b$c"
        ip link set "${tag}c${c}v$i" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip addr add "10.76.$c.$i/24" dev "${tag}c${c}p$i"
        ip netns exec "$ns" ip link set "${tag}c${c}p$i" up
        printf '\n[[replica]]\nid = %d\npeer = "10.76.%d.%d:7101"\nclient = "10.76.%d.%d:7201"\napp = "10.76.%d.%d:7001"\ndata_dir = "data/%d"\n' \
            "$i" "$c" "$i" "$c" "$i" "$c" "$i" "$i" >> "$dir/cluster.toml"
    done
    for i in $(seq 1 "$n"); do
        (cd "$dir" && ip netns exec "$tag-c$c-$i" "$falcon" tap-attach tap0 --create --deliver "$3" \
            --config cluster.toml --node "$i" --metrics "127.0.0.1:9100" -- \
            "${qemu[@]}" -serial "file:$dir/console$i.log" -device "$nic,netdev=falcon" \
            </dev/null >/dev/null 2>"$dir/replica$i.log" &)
    done
    for i in $(seq 1 "$n"); do
        for _ in $(seq 1 100); do ip netns exec "$tag-c$c-$i" ip link show tap0 >/dev/null 2>&1 && break; sleep 0.1; done
        ip netns exec "$tag-c$c-$i" ip addr add 10.0.0.1/24 dev tap0
    done
}

leader_of() { # $1: cluster number, $2: replicas; prints the leader's id
    local i
    for _ in $(seq 1 150); do
        for i in $(seq 1 "$2"); do
            grep -q "role: replica $i leads view" "$work/c$1/replica$i.log" 2>/dev/null && { echo "$i"; return 0; }
        done
        sleep 0.2
    done
    echo "bench-vm: cluster $1 has no leader" >&2
    cat "$work/c$1"/replica*.log >&2
    return 1
}

backups_priority() { # $1: cluster, $2: leader, $3: idle|other
    local i pid
    for i in 1 2 3; do
        [ "$i" = "$2" ] && continue
        for pid in $(ip netns pids "$tag-c$1-$i"); do
            case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
                qemu*) chrt -a "--$3" -p 0 "$pid" >/dev/null ;;
            esac
        done
    done
}

echo "== falcon bench-vm: 64-byte TCP echo through the test guest, $rounds rounds of $per round trips per setup (after 100 warm-up each)"
echo "   cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) cores); kernel $(uname -r); guests: QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}') -accel tcg, 128 MiB"
echo "   falcon: replicas over TCP on a bridge, sync $sync; the client on the leader's host; every guest and falcon on this host's cores"
# FALCON_BENCH_SETUPS picks some of: one committed early (plain always runs).
setups=" ${FALCON_BENCH_SETUPS:-one committed early} "
clusters=""
start_plain
[[ $setups == *" one "* ]] && start_cluster 1 1 early && clusters+=" 1"
[[ $setups == *" committed "* ]] && start_cluster 2 3 committed && clusters+=" 2"
[[ $setups == *" early "* ]] && start_cluster 3 3 early && clusters+=" 3"
wait_ping "$tag-p"
declare -A lead
for c in $clusters; do
    lead[$c]=$(leader_of "$c" "$([ "$c" = 1 ] && echo 1 || echo 3)")
    wait_ping "$tag-c$c-${lead[$c]}"
done
results=$work/results
: > "$results"
for r in $(seq 1 "$rounds"); do
    echo "   round $r/$rounds" >&2
    c0=$(cpu_of "$tag-p")
    rtt=$(measure "$tag-p")
    echo "plain $r $rtt - - - - $c0 - - $(cpu_of "$tag-p") - -" >> "$results"
    if [ -n "${lead[1]:-}" ]; then
        c0=$(cpu_of "$tag-c1-${lead[1]}")
        rtt=$(measure "$tag-c1-${lead[1]}")
        echo "one $r $rtt - - - - $c0 - - $(cpu_of "$tag-c1-${lead[1]}") - -" >> "$results"
    fi
    for c in $clusters; do
        [ "$c" = 1 ] && continue
        l=${lead[$c]}
        name=$([ "$c" = 2 ] && echo committed || echo early)
        for prio in other idle; do
            backups_priority "$c" "$l" "$prio"
            others=$(for i in 1 2 3; do [ "$i" != "$l" ] && echo "$tag-c$c-$i"; done)
            before=$(commit_stats "$tag-c$c-$l" 127.0.0.1:9100)
            c0="$(cpu_of "$tag-c$c-$l") $(cpu_of $others)"
            rtt=$(measure "$tag-c$c-$l")
            c1="$(cpu_of "$tag-c$c-$l") $(cpu_of $others)"
            after=$(commit_stats "$tag-c$c-$l" 127.0.0.1:9100)
            echo "$name-$prio $r $rtt $before $after $c0 $c1" >> "$results"
        done
        backups_priority "$c" "$l" other
    done
done
for c in 1 2 3; do
    for i in $(seq 1 3); do
        ip netns list | grep -q "^$tag-c$c-$i" && ip netns pids "$tag-c$c-$i" | xargs -r kill -TERM
    done
done
sleep 3
for c in $clusters; do
    [ "$c" = 1 ] && continue
    l=${lead[$c]}
    grep -h "tap tap0: [0-9T]" "$work/c$c/replica$l.log" | sed "s/^.*tap tap0:/   cluster $c's leader:/" || true
done
python3 - "$results" "$((per + ${FALCON_BENCH_WARMUP:-100}))" <<'PY'
import sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    name, p50, p99 = f[0], float(f[2]), float(f[3])
    commit = None
    if f[4] != "-":
        s0, c0, s1, c1 = map(float, f[4:8])
        if c1 > c0:
            commit = (s1 - s0) / (c1 - c0) * 1e6
    # CPU (ns) before and after: leader's falcon, leader's QEMU, backups' falcons, backups' QEMUs.
    b = [float(x) if x != "-" else 0.0 for x in f[8:12]]
    a = [float(x) if x != "-" else 0.0 for x in f[12:16]]
    cpu = [y - x for x, y in zip(b, a)]
    rows.setdefault(name, []).append((int(f[1]), p50, p99, commit, cpu))
plain = {x[0]: x[1] for x in rows["plain"]}
labels = [
    ("plain", "plain TAP"),
    ("one", "falcon, 1 replica (its own path, no peers)"),
    ("committed-other", "falcon, 3 replicas, --deliver committed"),
    ("early-other", "falcon, 3 replicas, --deliver early"),
    ("committed-idle", "falcon, 3 replicas, committed, backups' guests idle-priority"),
    ("early-idle", "falcon, 3 replicas, early, backups' guests idle-priority"),
]
rtts = int(sys.argv[2])
print("| setup | p50 µs | p99 µs | p50 vs plain | rounds' range | commit µs (mean) | CPU µs per round trip: falcon / QEMU (leader) | backups' falcons / QEMUs |")
print("|---|---|---|---|---|---|---|---|")
for key, label in labels:
    rs = rows.get(key, [])
    if not rs:
        continue
    p50 = st.median(x[1] for x in rs)
    p99 = st.median(x[2] for x in rs)
    # Each round's p50 against the plain guest's in the same round.
    ratios = [x[1] / plain[x[0]] for x in rs]
    ratio = st.median(ratios)
    spread = "%+.0f%% .. %+.0f%%" % (100 * (min(ratios) - 1), 100 * (max(ratios) - 1))
    commits = [x[3] for x in rs if x[3] is not None]
    commit = "%.1f" % st.median(commits) if commits else "-"
    if key == "plain":
        spread = "%.0f .. %.0f µs" % (min(x[1] for x in rs), max(x[1] for x in rs))
    # CPU per round trip, over every round (warm-up included: it is the same work).
    cpu = [sum(x[4][k] for x in rs) / (len(rs) * rtts) / 1e3 for k in range(4)]
    lead_cpu = f"{cpu[0]:.0f} / {cpu[1]:.0f}" if key != "plain" else f"- / {cpu[1]:.0f}"
    back_cpu = f"{cpu[2]:.0f} / {cpu[3]:.0f}" if key.startswith(("committed", "early")) else "-"
    print(f"| {label} | {p50:.1f} | {p99:.1f} | {'%+.0f%%' % (100 * (ratio - 1)) if key != 'plain' else '-'} | {spread} | {commit} | {lead_cpu} | {back_cpu} |")
print("(medians over the rounds; 'p50 vs plain' is the median of each round's p50 over the plain guest's p50 in that round)")
PY
