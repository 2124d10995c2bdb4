#!/usr/bin/env bash
# Builds the small guest that falcon's tap-attach tests run under QEMU:
# Debian's stock kernel (booted as an uncompressed ELF vmlinux through PVH,
# a few seconds under -accel tcg), and a busybox-static initramfs that loads
# the virtio-net modules, takes its IPv4 address from the kernel command line
# (falcon.ip=10.0.0.2/24), turns TCP timestamps and IPv6 off, and runs
# tests/guest/server.c (echo on 7, a request counter and key-value store on
# 80; see that file).
#
#   scripts/vm-guest.sh [DIR]     builds into DIR (default
#                                 ${FALCON_VM_GUEST_DIR:-/var/tmp/falcon-vm-guest});
#                                 reuses it when the recipe has not changed.
#
# Writes DIR/vmlinux and DIR/initrd.cpio.gz, and prints the QEMU options:
#   qemu-system-x86_64 -accel tcg -m 128 -nodefaults -nographic -no-reboot \
#     -kernel DIR/vmlinux -initrd DIR/initrd.cpio.gz \
#     -append "console=ttyS0 quiet panic=-1 falcon.ip=10.0.0.2/24" \
#     -device virtio-net-pci,netdev=falcon,mac=52:54:00:12:34:56,romfile=
# Needs apt-get download (Debian's archive), dpkg-deb, cpio, gzip, gcc, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${FALCON_VM_GUEST_DIR:-/var/tmp/falcon-vm-guest}}
log() { echo "vm-guest: $*" >&2; }

kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kernel_pkg" ] || { log "cannot find Debian's kernel package (apt-cache depends linux-image-amd64)"; exit 1; }
modules="failover net_failover virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_net"
recipe=$( { echo "$kernel_pkg $modules"; sed -n '/^# ---- recipe/,$p' "$0"; cat tests/guest/server.c; } | sha256sum | cut -c1-16)
if [ -f "$out/recipe" ] && [ "$(cat "$out/recipe")" = "$recipe" ] && [ -f "$out/vmlinux" ] && [ -f "$out/initrd.cpio.gz" ]; then
    log "guest in $out is up to date ($kernel_pkg, recipe $recipe)"
    exit 0
fi
# ---- recipe (everything below is hashed: a change rebuilds the guest)
for tool in cpio gzip gcc python3 dpkg-deb; do
    command -v "$tool" >/dev/null || { log "needs $tool (apt-get install cpio gzip gcc python3 dpkg)"; exit 1; }
done
started=$(date +%s)
work=$(mktemp -d)
chmod 755 "$work" # apt-get download drops privileges to _apt
trap 'rm -rf "$work"' EXIT
log "downloading $kernel_pkg and busybox-static"
(cd "$work" && apt-get download "$kernel_pkg" busybox-static >/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/b"

# vmlinuz is a bzImage holding an xz-compressed ELF: take the ELF out (QEMU
# boots it directly through the PVH entry, without decompressing under TCG).
python3 - "$work"/k/boot/vmlinuz-* "$work/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
at = data.find(b"\xfd7zXZ\x00")
while at >= 0:
    try:
        elf = lzma.LZMADecompressor().decompress(data[at:])
        if elf[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(elf)
            sys.exit(0)
    except lzma.LZMAError:
        pass
    at = data.find(b"\xfd7zXZ\x00", at + 1)
sys.exit("no xz-compressed ELF kernel in " + sys.argv[1])
PY

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$work/b/bin/busybox" "$root/bin/busybox"
for m in $modules; do
    f=$(find "$work"/k/lib/modules -name "$m.ko" | head -1)
    [ -n "$f" ] || { log "module $m.ko is not in $kernel_pkg"; exit 1; }
    cp "$f" "$root/lib/modules/"
done
gcc -static -O2 -Wall -Wextra -o "$root/server" tests/guest/server.c
cat > "$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $modules; do insmod /lib/modules/\$m.ko; done
ip=10.0.0.2/24
for a in \$(cat /proc/cmdline); do case \$a in falcon.ip=*) ip=\${a#falcon.ip=};; esac; done
echo 0 > /proc/sys/net/ipv4/tcp_timestamps
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
ip link set lo up
ip addr add \$ip dev eth0
ip link set eth0 up
echo "falcon guest: eth0 \$ip up, server on 7 and 80"
/server &
while :; do sleep 3600; done
EOF
chmod +x "$root/init"
mkdir -p "$out"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initrd.cpio.gz.tmp"
mv "$out/initrd.cpio.gz.tmp" "$out/initrd.cpio.gz"
mv "$work/vmlinux" "$out/vmlinux"
echo "$recipe" > "$out/recipe"
log "built $out ($kernel_pkg) in $(( $(date +%s) - started ))s"
