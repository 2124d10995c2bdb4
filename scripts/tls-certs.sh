#!/usr/bin/env bash
# Makes what mutual TLS on falcon's peer links needs, with openssl: a cluster
# CA and, for every replica of a cluster file, a certificate signed by it that
# names the replica's peer IP (the dialer checks it) and a private key.
#
#   scripts/tls-certs.sh --config cluster.toml [--out DIR] [--days N]
#
# DIR (default: tls/ beside the cluster file) gets ca.pem, ca.key,
# replica-ID.pem and replica-ID.key (keys mode 0600). Then, in the cluster
# file: tls_ca = "tls/ca.pem" at the top and, in each [[replica]],
# tls_cert = "tls/replica-ID.pem" and tls_key = "tls/replica-ID.key"; copy
# each replica's two files and ca.pem (not ca.key) to its host. Keep ca.key
# offline: whoever holds it can make certificates the cluster accepts.
# An existing CA in DIR is reused, so a replica added later gets a
# certificate from the same CA.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
config="" out="" days=825
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "tls-certs: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
[ -n "$config" ] || { echo "tls-certs: --config FILE is required" >&2; exit 2; }
[ -f "$config" ] || { echo "tls-certs: no such file: $config" >&2; exit 2; }
command -v openssl >/dev/null || { echo "tls-certs: needs openssl (apt-get install openssl)" >&2; exit 1; }
[ -n "$out" ] || out="$(dirname "$config")/tls"
mkdir -p "$out"

# "ID IP" per replica, from the cluster file.
replicas=$(python3 - "$config" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    cfg = tomllib.load(f)
for r in cfg.get("replica", []):
    peer = r["peer"]
    host = peer.rsplit(":", 1)[0].strip("[]")
    print(r["id"], host)
EOF
)
[ -n "$replicas" ] || { echo "tls-certs: $config has no [[replica]]" >&2; exit 2; }

umask 077
if [ ! -f "$out/ca.pem" ] || [ ! -f "$out/ca.key" ]; then
    name=$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb")).get("cluster","falcon"))' "$config")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out/ca.key" -out "$out/ca.pem" -days "$days" \
        -subj "/CN=falcon cluster $name CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    chmod 644 "$out/ca.pem"
    echo "tls-certs: made a new CA: $out/ca.pem (keep $out/ca.key offline)"
else
    echo "tls-certs: using the CA in $out"
fi

while read -r id ip; do
    ext=$(mktemp)
    printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' "$ip" > "$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out/replica-$id.key" -out "$out/replica-$id.csr" \
        -subj "/CN=falcon replica $id" 2>/dev/null
    openssl x509 -req -in "$out/replica-$id.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -CAcreateserial -out "$out/replica-$id.pem" -days "$days" -extfile "$ext" 2>/dev/null
    rm -f "$ext" "$out/replica-$id.csr"
    chmod 644 "$out/replica-$id.pem"
    echo "tls-certs: replica $id: $out/replica-$id.pem (IP $ip), $out/replica-$id.key"
done <<< "$replicas"
