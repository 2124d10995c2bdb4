#!/usr/bin/env bash
# The main job on a fresh Debian machine: set up, build, and show what this
# release does for an operator — inspect, verify, follow and export a
# replica's log. (When `falcon replicate` lands, this becomes a replicated
# Redis demo.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
falcon=target/release/falcon
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "falcon log-inspect fixtures/logs/clean   (summary of a replica's log)"
$falcon log-inspect fixtures/logs/clean
step "falcon log-inspect fixtures/logs/clean --entries --conn 3"
$falcon log-inspect fixtures/logs/clean --entries --conn 3
step "falcon log-inspect fixtures/logs/clean --verify"
$falcon log-inspect fixtures/logs/clean --verify
step "falcon log-inspect fixtures/logs/torn-tail --verify   (a crash cut the last write)"
$falcon log-inspect fixtures/logs/torn-tail --verify
step "falcon log-inspect fixtures/logs/corrupt-middle --verify   (bit rot: exit 1)"
if $falcon log-inspect fixtures/logs/corrupt-middle --verify; then exit 1; else echo "exit status $?"; fi
step "falcon log-inspect fixtures/logs/clean --export-pcap session.pcap && tcpdump -r session.pcap"
$falcon log-inspect fixtures/logs/clean --export-pcap "$work/session.pcap"
tcpdump -r "$work/session.pcap" -nn -A 2>/dev/null | grep -m 8 -E "Flags|SET|GET" || true
step "falcon bench --log --duration 300ms   (the log against the raw disk)"
$falcon bench --log --duration 300ms --verify-mib 32 --dir "$work"
