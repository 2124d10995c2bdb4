#!/usr/bin/env bash
# Makes what mutual TLS on falcon's peer links needs, with openssl: a cluster
# CA and, for every replica of a cluster file, a certificate signed by it that
# names the replica's peer IP (the dialer checks it) and a private key.
#
#   scripts/tls-certs.sh --config cluster.toml [--out DIR] [--days N] [--ca-days N]
#
# Certificates last --days (825), a new CA --ca-days (3650); it warns when an
# existing CA would expire before the certificates it signs.
# DIR (default: tls/ beside the cluster file) gets ca.pem, ca.key,
# replica-ID.pem and replica-ID.key (keys mode 0600). Then, in the cluster
# file: tls_ca = "tls/ca.pem" at the top and, in each [[replica]],
# tls_cert = "tls/replica-ID.pem" and tls_key = "tls/replica-ID.key"; copy
# each replica's two files and ca.pem (not ca.key) to its host. Keep ca.key
# offline: whoever holds it can make certificates the cluster accepts.
# An existing CA in DIR is reused, so a replica added later gets a
# certificate from the same CA.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
config="" out="" days=825 ca_days=3650
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        --ca-days) ca_days="$2"; shift 2 ;;
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

# openssl, quiet unless it fails (then its message, and exit 1).
ossl() {
    local err
    err=$(mktemp)
    if ! openssl "$@" 2>"$err" >/dev/null; then
        echo "tls-certs: openssl $1 failed:" >&2
        cat "$err" >&2
        rm -f "$err"
        exit 1
    fi
    rm -f "$err"
}

umask 077
if [ ! -f "$out/ca.pem" ] || [ ! -f "$out/ca.key" ]; then
    name=$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb")).get("cluster","falcon"))' "$config")
    ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out/ca.key" -out "$out/ca.pem" -days "$ca_days" \
        -subj "/CN=falcon cluster $name CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    chmod 644 "$out/ca.pem"
    echo "tls-certs: made a new CA: $out/ca.pem (keep $out/ca.key offline)"
else
    echo "tls-certs: using the CA in $out"
    if ! openssl x509 -in "$out/ca.pem" -noout -checkend $(( days * 86400 )) >/dev/null; then
        echo "tls-certs: warning: the CA $out/ca.pem expires within $days days, before these certificates; every link fails when it does (make a new CA: move ca.pem and ca.key away)" >&2
    fi
fi

while read -r id ip; do
    ext=$(mktemp)
    printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' "$ip" > "$ext"
    ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out/replica-$id.key" -out "$out/replica-$id.csr" \
        -subj "/CN=falcon replica $id"
    ossl x509 -req -in "$out/replica-$id.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -CAcreateserial -out "$out/replica-$id.pem" -days "$days" -extfile "$ext"
    rm -f "$ext" "$out/replica-$id.csr"
    chmod 644 "$out/replica-$id.pem"
    echo "tls-certs: replica $id: $out/replica-$id.pem (IP $ip), $out/replica-$id.key"
done <<< "$replicas"
