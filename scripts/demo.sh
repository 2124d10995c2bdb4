#!/usr/bin/env bash
# The main job on a fresh Debian machine: set up, build, then run a replicated
# Redis — three falcon replicas, each with its own redis-server, on three
# network hosts (network namespaces on a bridge when run as root; 127.0.0.1-3
# otherwise, or with FALCON_DEMO_LOOPBACK=1) — push a redis-benchmark run
# through it, kill the leader with SIGKILL, show the failover, restart the
# dead replica and show that every copy of Redis ends in the same state.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
falcon="$PWD/target/release/falcon"
work=$(mktemp -d)
pids=()
tag="fdemo$$"
netns=0
if [ "$(id -u)" = 0 ] && [ -z "${FALCON_DEMO_LOOPBACK:-}" ] && ip netns list >/dev/null 2>&1; then netns=1; fi
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    sleep 0.5
    if [ "$netns" = 1 ]; then
        for i in 1 2 3; do
            ip netns pids "$tag-$i" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
            ip netns del "$tag-$i" 2>/dev/null || true
            ip link del "${tag}v$i" 2>/dev/null || true
        done
        ip link del "${tag}br" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
# host N: a replica's address; in N CMD…: run CMD on replica N's host.
host() { if [ "$netns" = 1 ]; then echo "10.77.0.$1"; else echo "127.0.0.$1"; fi; }
app_host() { if [ "$netns" = 1 ]; then echo "127.0.0.1"; else echo "127.0.0.$1"; fi; }
in_() { local n=$1; shift; if [ "$netns" = 1 ]; then ip netns exec "$tag-$n" "$@"; else "$@"; fi; }
if [ "$netns" = 1 ]; then
    ip link add "${tag}br" type bridge && ip addr add 10.77.0.254/24 dev "${tag}br" && ip link set "${tag}br" up
    for i in 1 2 3; do
        ip netns add "$tag-$i"
        ip link add "${tag}v$i" type veth peer name "${tag}p$i"
        ip link set "${tag}p$i" netns "$tag-$i"
        ip link set "${tag}v$i" master "${tag}br" && ip link set "${tag}v$i" up
        ip netns exec "$tag-$i" ip link set lo up
        ip netns exec "$tag-$i" ip addr add "10.77.0.$i/24" dev "${tag}p$i"
        ip netns exec "$tag-$i" ip link set "${tag}p$i" up
    done
    echo "three hosts: network namespaces $tag-1..3 on a bridge, 10.77.0.1-3"
else
    echo "three hosts: 127.0.0.1-3 on this machine (run as root for network namespaces)"
fi
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cat > "$work/cluster.toml" <<TOML
cluster = "demo"
key_file = "cluster.key"
election_timeout = "300ms"
# Redis's protocol: every client's committed commands go down one pipelined
# connection to each copy of Redis (the default, "bytes", suits any program).
program_protocol = "resp"
$(for i in 1 2 3; do printf '\n[[replica]]\nid = %s\npeer = "%s:7101"\nclient = "%s:7201"\napp = "%s:7001"\ndata_dir = "data/%s"\n' $i "$(host $i)" "$(host $i)" "$(app_host $i)" $i; done)
TOML
"$falcon" replicate --new-key "$work/cluster.key"

start() {
    # --follower-clients refuse: only the leader answers, so the demo can see who leads.
    (cd "$work" && exec $( [ "$netns" = 1 ] && echo ip netns exec "$tag-$1" ) "$falcon" replicate --config cluster.toml --node "$1" --follower-clients refuse -- \
        redis-server --bind "$(app_host "$1")" --port 7001 --save '' --appendonly no --enable-debug-command local \
        >"$work/node$1.log" 2>&1) &
    pids[$1]=$!
}
leader() {
    for _ in $(seq 1 200); do
        for i in 1 2 3; do
            if [ "$(redis-cli -h "$(host $i)" -p 7201 PING 2>/dev/null)" = PONG ]; then echo "$i"; return; fi
        done
        sleep 0.05
    done
    echo none
}

step "start three replicas (falcon replicate --config cluster.toml --node N -- redis-server …)"
for i in 1 2 3; do start "$i"; done
L=$(leader)
echo "leader: replica $L"

step "redis-benchmark through the leader (SET, GET, INCR, LPUSH; 50 clients)"
redis-benchmark -h "$(host $L)" -p 7201 -t set,get,incr,lpush -n 20000 -c 50 -q 2>&1 | tr '\r' '\n' | grep -E "requests per second" | tee "$work/bench.txt"
served=$(awk '{s+=20000} END {print s}' "$work/bench.txt")
redis-cli -h "$(host $L)" -p 7201 SET before-failover yes >/dev/null

step "kill the leader (replica $L) with SIGKILL"
t0=$(date +%s%N)
{ kill -9 "${pids[$L]}"; wait "${pids[$L]}"; } 2>/dev/null || true
N=$(leader)
t1=$(date +%s%N)
failover_ms=$(( (t1 - t0) / 1000000 ))
echo "new leader: replica $N after ${failover_ms} ms"
echo "GET before-failover on the new leader: $(redis-cli -h "$(host $N)" -p 7201 GET before-failover)"
redis-cli -h "$(host $N)" -p 7201 SET after-failover yes >/dev/null

step "restart replica $L: a fresh redis-server, replayed from the log and caught up"
for _ in $(seq 1 100); do in_ "$L" redis-cli -h "$(app_host $L)" -p 7001 PING >/dev/null 2>&1 || break; sleep 0.05; done
t2=$(date +%s%N)
start "$L"
digest() { in_ "$1" redis-cli -h "$(app_host $1)" -p 7001 DEBUG DIGEST 2>/dev/null || echo "-"; }
for _ in $(seq 1 600); do
    [ "$(digest "$L")" = "$(digest "$N")" ] && break
    sleep 0.1
done
echo "replica $L caught up in $(( ($(date +%s%N) - t2) / 1000000 )) ms (program start included)"

step "falcon failover status: what an operator sees"
"$falcon" failover status --config "$work/cluster.toml" || true

step "result"
printf '%-9s %-12s %s\n' replica role "DEBUG DIGEST"
digests=()
for i in 1 2 3; do
    d=$(digest "$i")
    role=follower; [ "$i" = "$N" ] && role=leader
    printf '%-9s %-12s %s\n' "$i" "$role" "$d"
    digests+=("$d")
done
agree=no; [ "${digests[0]}" = "${digests[1]}" ] && [ "${digests[1]}" = "${digests[2]}" ] && agree=yes
printf '\n%-26s %s\n%-26s %s ms\n%-26s %s\n' "requests served:" "$served" "failover time:" "$failover_ms" "all digests agree:" "$agree"
[ "$agree" = yes ]
