#!/usr/bin/env bash
# Runs commands inside a small QEMU guest that has Soft-RoCE (rdma_rxe)
# working, for tests that need real RDMA verbs on a host whose kernel has no
# InfiniBand support.
#
#   scripts/rdma-guest.sh build
#       Builds the guest (Debian 12 minbase with a kernel, rdma-core and
#       ibverbs-utils) in $FALCON_GUEST_DIR, or reuses it when its recipe
#       (this script's build functions and package list) has not changed.
#       Needs root; installs debootstrap, qemu-system-x86 and e2fsprogs with
#       apt-get when they are missing.
#
#   scripts/rdma-guest.sh run HOSTDIR -- CMD [ARG...]
#       Boots the guest (building it first if needed), shares HOSTDIR
#       read-write at /mnt/host, brings up rxe0 on a dummy netdev, runs CMD
#       in /mnt/host and powers off. The guest console (CMD's stdout and
#       stderr) goes to stdout; this script's own messages go to stderr.
#       Exit status: CMD's, or 124 when the guest timed out, or 125 when the
#       guest could not be booted or set up.
#
# Inside the guest CMD sees:
#   FALCON_RXE_DEV=rxe0          the verbs device (ibv_devices lists it)
#   FALCON_RXE_NETDEV=rxe_net    the dummy netdev rxe0 is bound to
#   FALCON_RXE_ADDR=192.0.2.1    that netdev's IPv4 address
#   FALCON_RXE_GID_INDEX=N       the GID index of the RoCE v2 GID for that
#                                address (pass it as -g N to ibv_*_pingpong)
#
# The guest has no network card: nothing it sends leaves the guest. rxe
# traffic between two QPs in the guest is looped back inside its kernel.
#
# Environment:
#   FALCON_GUEST_DIR      cache dir (default /var/tmp/falcon-rdma-guest)
#   FALCON_GUEST_TIMEOUT  seconds before a run's QEMU is killed (default 600)
#   FALCON_GUEST_MEM      guest memory (default 2G)
#   FALCON_GUEST_CPUS     guest CPUs (default 2)
#   FALCON_GUEST_MIRROR   Debian mirror for debootstrap (default: the host's
#                         apt mirror, else http://deb.debian.org/debian)
#
# QEMU always runs with -accel tcg: /dev/kvm exists on our machines but
# cannot boot a guest.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo_dir=$(cd "$script_dir/.." && pwd -P)
guest_dir=${FALCON_GUEST_DIR:-/var/tmp/falcon-rdma-guest}
guest_timeout=${FALCON_GUEST_TIMEOUT:-600}
guest_mem=${FALCON_GUEST_MEM:-2G}
guest_cpus=${FALCON_GUEST_CPUS:-2}
qemu_pid= # the running guest's timeout(1) process, during a run

# What the guest is made of. Any change here (or in the build_* functions
# below) changes the recipe hash and makes the next `build` start afresh.
guest_suite=bookworm
guest_packages=(
    linux-image-amd64 kmod iproute2
    rdma-core ibverbs-providers ibverbs-utils libibverbs1
    librdmacm1 rdmacm-utils
    libpcap0.8
)
# The guest's rxe setup. Used by the stage 1 script, which is written afresh
# for every run: changing these needs no rebuild.
rxe_dev=rxe0
rxe_netdev=rxe_net
rxe_addr=192.0.2.1 # TEST-NET-1 (RFC 5737): never routed, and the guest has no NIC anyway

log() { echo "rdma-guest: $*" >&2; }
die() {
    echo "rdma-guest: error: $*" >&2
    exit 125
}

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
    exit 2
}

# Installs the host packages that provide the given commands, when missing.
# Arguments: pairs of "command:package".
ensure_host_tools() {
    local pair cmd pkg missing=()
    for pair in "$@"; do
        cmd=${pair%%:*} pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 ||
            missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run as root or install them with apt-get"
    log "installing host packages: ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
}

# The host's Debian mirror (the first non-security "…/debian" URI apt uses),
# so debootstrap fetches from where apt already does.
host_mirror() {
    local uri
    uri=$(grep -rhoE '(URIs:[[:space:]]*|^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

# Refuses a cache dir inside the repository (it holds a ~1 GB image).
check_guest_dir() {
    guest_dir=$(realpath -m "$guest_dir")
    case "$guest_dir/" in
    "$repo_dir"/*) die "FALCON_GUEST_DIR ($guest_dir) must not be inside the repository ($repo_dir)" ;;
    esac
    mkdir -p "$guest_dir"
}

# Stage 0: the guest's init (PID 1, via init= on the kernel command line),
# baked into the image. It only mounts the per-run control share and hands
# over to the stage 1 script this script writes there for each run, so
# changing the run-time setup needs no rebuild.
build_stage0_init() {
    cat <<'EOF'
#!/bin/sh
# falcon rdma-guest stage 0 (PID 1): mount the control share, run stage 1.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
fail() {
    echo "rdma-guest: guest stage 0: $*" >/dev/console
    echo o >/proc/sysrq-trigger # power off at once
    sleep 60
}
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modprobe -a 9pnet_virtio 9p || fail "cannot load the 9p modules"
mount -t 9p -o trans=virtio,version=9p2000.L falconctl /mnt/ctl || fail "cannot mount the control share"
[ -r /mnt/ctl/stage1.sh ] || fail "no /mnt/ctl/stage1.sh"
exec /bin/bash /mnt/ctl/stage1.sh
EOF
}

# debootstrap + customisation of the root filesystem in $1; tool output
# goes to the log file $3.
build_rootfs() {
    local root=$1 mirror=$2 build_log=$3
    local includes
    includes=$(
        IFS=,
        echo "${guest_packages[*]}"
    )
    log "debootstrap $guest_suite (minbase) from $mirror"
    debootstrap --variant=minbase --components=main --include="$includes" \
        "$guest_suite" "$root" "$mirror" >>"$build_log" 2>&1 ||
        die "debootstrap failed; last lines of $build_log:
$(tail -n 20 "$build_log")"

    log "customising the root filesystem"
    build_stage0_init >"$root/sbin/falcon-init"
    chmod 755 "$root/sbin/falcon-init"
    mkdir -p "$root/mnt/ctl" "$root/mnt/host"
    echo falcon-guest >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tfalcon-guest\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    : >"$root/etc/fstab"
    # A small initrd with just what mounting the root needs: Debian's default
    # (MODULES=most) is 35 MB and takes ~5 s more to unpack under TCG.
    echo MODULES=list >"$root/etc/initramfs-tools/conf.d/falcon.conf"
    printf '%s\n' virtio_pci virtio_blk ext4 >>"$root/etc/initramfs-tools/modules"
    mount -t proc proc "$root/proc"
    chroot "$root" update-initramfs -u -k all >>"$build_log" 2>&1 ||
        die "update-initramfs failed; last lines of $build_log:
$(tail -n 20 "$build_log")"
    umount "$root/proc"
    # Nothing in the guest needs apt's caches, docs or man pages.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/*
    # shellcheck disable=SC2016 # dpkg-query's ${…} fields, not the shell's
    chroot "$root" dpkg-query -W -f='${Package} ${Version}\n' >"$root.packages.txt"
}

# Mount points at or under directory $1, deepest first.
mounts_under() {
    awk -v d="$1" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts | sort -r
}

# Removes the build directory $1, unmounting first whatever is still mounted
# in it (debootstrap mounts proc and sys in its target and can leave them
# behind when it fails). Never deletes through a mount it could not undo.
remove_work_dir() {
    local dir=$1 mnt
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd -P)
    mounts_under "$dir" | while read -r mnt; do umount -l "$mnt" || true; done
    if [ -n "$(mounts_under "$dir")" ]; then
        log "warning: still mounted under $dir, not removing it:" "$(mounts_under "$dir")"
        return 1
    fi
    rm -rf --one-file-system "$dir"
}

recipe_hash() {
    {
        declare -f build_stage0_init build_rootfs
        echo "$guest_suite ${guest_packages[*]}"
    } | sha256sum | cut -c1-16
}

guest_is_current() {
    [ -f "$guest_dir/recipe" ] && [ "$(cat "$guest_dir/recipe")" = "$(recipe_hash)" ] &&
        [ -f "$guest_dir/rootfs.ext4" ] && [ -f "$guest_dir/vmlinuz" ] && [ -f "$guest_dir/initrd.img" ]
}

cmd_build() {
    [ $# = 0 ] || usage
    [ "$(id -u)" = 0 ] || die "build needs root (debootstrap, chroot)"
    check_guest_dir
    exec 9>"$guest_dir/.lock"
    flock 9 # one build at a time; runs hold the lock shared
    if guest_is_current; then
        log "guest in $guest_dir is up to date (recipe $(recipe_hash))"
        return 0
    fi
    local started=$SECONDS
    ensure_host_tools debootstrap:debootstrap mkfs.ext4:e2fsprogs qemu-system-x86_64:qemu-system-x86
    local work="$guest_dir/build.tmp" build_log="$guest_dir/build.log"
    remove_work_dir "$work" || die "cannot clean up the previous build in $work"
    mkdir -p "$work"
    : >"$build_log"
    # shellcheck disable=SC2064 # expand $work now
    trap "remove_work_dir '$work'" EXIT
    build_rootfs "$work/rootfs" "${FALCON_GUEST_MIRROR:-$(host_mirror)}" "$build_log"

    log "extracting the kernel and initrd"
    local kernels initrds
    kernels=("$work"/rootfs/boot/vmlinuz-*)
    initrds=("$work"/rootfs/boot/initrd.img-*)
    if [ ${#kernels[@]} != 1 ] || [ ! -f "${kernels[0]}" ]; then
        die "expected one kernel in the guest's /boot, found: ${kernels[*]}"
    fi
    if [ ${#initrds[@]} != 1 ] || [ ! -f "${initrds[0]}" ]; then
        die "expected one initrd in the guest's /boot, found: ${initrds[*]}"
    fi
    cp "${kernels[0]}" "$work/vmlinuz"
    cp "${initrds[0]}" "$work/initrd.img"

    local size_mb
    size_mb=$(($(du -sm "$work/rootfs" | cut -f1) * 5 / 4 + 256))
    log "making a ${size_mb} MB ext4 image"
    mkfs.ext4 -q -F -L falcon-root -d "$work/rootfs" "$work/rootfs.ext4" "${size_mb}M" >/dev/null ||
        die "mkfs.ext4 failed"

    # Replace the old guest only once the new one is complete.
    rm -f "$guest_dir/recipe"
    mv -f "$work/vmlinuz" "$work/initrd.img" "$work/rootfs.ext4" "$guest_dir/"
    mv -f "$work/rootfs.packages.txt" "$guest_dir/packages.txt"
    recipe_hash >"$guest_dir/recipe"
    trap - EXIT
    remove_work_dir "$work" || true
    log "built guest in $guest_dir ($(basename "${kernels[0]}"), recipe $(recipe_hash)) in $((SECONDS - started))s"
}

# Stage 1: written to the control share for each run and run by stage 0 as
# PID 1. Sets up the guest, brings up rxe, runs /mnt/ctl/cmd.sh in
# /mnt/host, writes its exit status to /mnt/ctl/status and powers off.
# Reports a setup failure as "setup-failed: why" in /mnt/ctl/status.
# Its output and the command's go to the second serial port (ttyS1, the
# host's stdout); the kernel console (ttyS0) goes to a log file that is shown
# only when something fails.
write_stage1() {
    cat <<EOF
#!/bin/bash
rxe_dev=$rxe_dev
rxe_netdev=$rxe_netdev
rxe_addr=$rxe_addr
EOF
    cat <<'EOF'
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8
poweroff_now() {
    sync
    umount /mnt/host 2>/dev/null
    echo o >/proc/sysrq-trigger
    sleep 60
}
setup_failed() {
    echo "rdma-guest: guest setup failed: $*" >/dev/console
    echo "setup-failed: $*" >/mnt/ctl/status
    poweroff_now
}

exec >/dev/ttyS1 2>&1 </dev/null
stty -F /dev/ttyS1 raw -echo 2>/dev/null # plain \n line ends on the host side
dmesg -n 1 2>/dev/null
mountpoint -q /run || mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts devpts /dev/pts
mountpoint -q /dev/shm || mount -t tmpfs tmpfs /dev/shm
hostname falcon-guest
ulimit -l unlimited # memory registration (ibv_reg_mr) pins pages
ip link set lo up

# Soft-RoCE on a dummy netdev (rxe cannot bind to lo).
modprobe rdma_rxe || setup_failed "cannot load rdma_rxe"
modprobe dummy numdummies=0 || setup_failed "cannot load dummy"
ip link add "$rxe_netdev" type dummy || setup_failed "cannot create the dummy netdev"
ip addr add "$rxe_addr/24" dev "$rxe_netdev" || setup_failed "cannot set $rxe_addr on $rxe_netdev"
ip link set "$rxe_netdev" up || setup_failed "cannot bring $rxe_netdev up"
rdma link add "$rxe_dev" type rxe netdev "$rxe_netdev" || setup_failed "rdma link add $rxe_dev failed"

# The RoCE v2 GID for the IPv4 address (::ffff:a.b.c.d) shows up
# asynchronously; find its index.
IFS=. read -r a b c d <<<"$rxe_addr"
want=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' "$a" "$b" "$c" "$d")
gid_index=
for _ in $(seq 100); do
    for f in /sys/class/infiniband/"$rxe_dev"/ports/1/gids/*; do
        [ "$(cat "$f" 2>/dev/null)" = "$want" ] || continue
        gid_index=${f##*/}
        break 2
    done
    sleep 0.1
done
[ -n "$gid_index" ] || setup_failed "no GID for $rxe_addr on $rxe_dev"

mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /mnt/host ||
    setup_failed "cannot mount the host share"
export FALCON_RXE_DEV=$rxe_dev FALCON_RXE_NETDEV=$rxe_netdev FALCON_RXE_ADDR=$rxe_addr FALCON_RXE_GID_INDEX=$gid_index
echo "rdma-guest: $rxe_dev up on $rxe_netdev ($rxe_addr, GID index $gid_index); running the command" >/dev/console

cd /mnt/host || setup_failed "cannot cd /mnt/host"
/bin/bash /mnt/ctl/cmd.sh
echo $? >/mnt/ctl/status
poweroff_now
EOF
}

cmd_run() {
    if [ $# -lt 3 ] || [ "$2" != -- ]; then usage; fi
    local hostdir=$1
    shift 2
    [ -d "$hostdir" ] || die "HOSTDIR $hostdir is not a directory"
    hostdir=$(cd "$hostdir" && pwd -P)
    if ! [[ $guest_timeout =~ ^[1-9][0-9]*$ ]]; then
        die "FALCON_GUEST_TIMEOUT must be a positive number of seconds, not '$guest_timeout'"
    fi

    check_guest_dir
    if ! guest_is_current; then
        log "guest missing or out of date; building it first"
        (cmd_build) || exit $?
    fi
    ensure_host_tools qemu-system-x86_64:qemu-system-x86 flock:util-linux timeout:coreutils

    local ctl
    ctl=$(mktemp -d "${TMPDIR:-/tmp}/falcon-rdma-guest.XXXXXX")
    # shellcheck disable=SC2064 # expand $ctl now
    trap "rm -rf '$ctl'" EXIT
    write_stage1 >"$ctl/stage1.sh"
    {
        echo "# the command given to rdma-guest.sh run"
        printf '%q ' "$@"
        echo
    } >"$ctl/cmd.sh"

    # Keep a rebuild from replacing the image under a running guest.
    exec 9>"$guest_dir/.lock"
    flock -s 9

    local append="console=ttyS0 root=/dev/vda rootfstype=ext4 rw fsck.mode=skip quiet loglevel=3 panic=-1 init=/sbin/falcon-init"
    local started=$SECONDS rc=0
    log "booting the guest (tcg, ${guest_cpus} CPUs, ${guest_mem}, timeout ${guest_timeout}s)"
    # snapshot=on: guest writes to its root go to a temporary overlay, so the
    # image stays pristine and several guests can run at once. "," in a QEMU
    # option value is written ",,".
    # QEMU runs in the background so that a signal to this script (a test
    # harness giving up) stops it instead of leaving it behind.
    timeout -k 10 "$guest_timeout" \
        qemu-system-x86_64 -accel tcg -cpu max -m "$guest_mem" -smp "$guest_cpus" \
        -nodefaults -no-user-config -display none -monitor none -no-reboot -nic none \
        -serial "file:${ctl//,/,,}/console.log" -serial stdio \
        -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.img" -append "$append" \
        -drive "file=${guest_dir//,/,,}/rootfs.ext4,format=raw,if=virtio,snapshot=on" \
        -virtfs "local,path=${ctl//,/,,},mount_tag=falconctl,security_model=none,id=falconctl" \
        -virtfs "local,path=${hostdir//,/,,},mount_tag=host,security_model=none,multidevs=remap,id=host" \
        </dev/null &
    qemu_pid=$!
    trap stop_guest INT TERM HUP
    wait "$qemu_pid" || rc=$?
    trap - INT TERM HUP
    local took=$((SECONDS - started))

    local status
    status=$(cat "$ctl/status" 2>/dev/null || true)
    if [[ $status =~ ^[0-9]+$ ]]; then
        log "guest finished in ${took}s; command exit status $status"
        exit "$status"
    fi
    show_console_log "$ctl/console.log"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        log "error: the guest did not finish within ${guest_timeout}s (FALCON_GUEST_TIMEOUT); QEMU was killed"
        exit 124
    fi
    [ -z "$status" ] || die "${status} (after ${took}s)"
    die "the guest stopped without reporting the command's exit status (QEMU exit status $rc, after ${took}s)"
}

# Signal handler for a run: stops QEMU (through timeout(1), which passes the
# signal on) and exits.
stop_guest() {
    kill -TERM "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    log "interrupted; the guest was stopped"
    exit 130
}

# Shows the end of the guest's kernel console log, for a failed run.
show_console_log() {
    [ -s "$1" ] || return 0
    log "last lines of the guest's console:"
    tail -n 40 "$1" | tr -d '\r' | sed 's/^/  | /' >&2
}

case "${1:-}" in
build)
    shift
    cmd_build "$@"
    ;;
run)
    shift
    cmd_run "$@"
    ;;
*) usage ;;
esac
