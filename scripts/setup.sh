#!/usr/bin/env bash
# Installs what falcon needs to build and test on Debian 12 or newer, then
# builds it (release; `--no-build` skips that, for the test command, whose
# builds are its own). Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The second line: building with --features rdma (ibverbs-sys runs cmake and bindgen);
# the third: the tap-attach tests (a QEMU guest built by scripts/vm-guest.sh).
packages=(libpcap-dev pkg-config openssl python3 python3-fusepy fuse3 tcpdump util-linux redis-server redis-tools memcached postgresql sockperf
    cmake libnl-3-dev libnl-route-3-dev libclang-dev libibverbs-dev
    cpio qemu-system-x86 iproute2 iputils-ping netcat-openbsd)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "falcon setup: installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "falcon setup: cargo not found. falcon needs Rust 1.85 or newer (edition 2024);" >&2
    echo "install it with rustup (https://rustup.rs), then run this again." >&2
    exit 1
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true

[ "${1:-}" = --no-build ] || cargo build --release --locked
