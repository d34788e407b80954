#!/usr/bin/env bash
# Garage (an S3-compatible object store) on loopback, for the S3 tests and benchmarks.
#
#   scripts/garage.sh install
#       Prints the path of a garage 2.5.0 binary: $GARAGE, `garage` on PATH, ~/.cargo/bin/garage
#       or $GARAGE_ROOT/bin/garage when one says 2.5.0; otherwise builds one into
#       $GARAGE_ROOT/bin (default ~/.cargo) with a reduced feature set and a cheap profile
#       (`cargo install garage@2.5.0 --no-default-features --features lmdb,bundled-libs`, opt-level 1,
#       256 codegen units: fine for tests, not for benchmarks), niced. Log: $GARAGE_ROOT/garage-build.log.
#       (`--features lmdb` alone does not build: garage's main.rs requires bundled-libs or
#       system-libs; bundled-libs needs no -dev packages.)
#   scripts/garage.sh start DIR [PORT]
#       One node (replication factor 1) with its files in DIR, S3 API on 127.0.0.1:PORT
#       (default 39100; RPC on PORT+1, admin on PORT+3), bucket `volback` and a key allowed
#       on it. Prints `export` lines (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
#       AWS_DEFAULT_REGION=garage, AWS_ENDPOINT_URL) and writes them to DIR/env.
#   scripts/garage.sh start-cluster DIR BASEPORT
#       Three nodes on loopback (replication factor 3, consistency mode "consistent"), node i
#       (1..3) in DIR/n<i> with its S3 API on BASEPORT+10(i-1) (RPC +1, admin +3), connected,
#       layout applied; bucket and key usable through every node. Prints the same `export`
#       lines (endpoint of node 1) plus GARAGE_ENDPOINTS (the three S3 endpoints).
#   scripts/garage.sh stop DIR
#       Stops the node(s) started in DIR (SIGTERM, then SIGKILL after 10 s).
#
# Environment: GARAGE (binary), GARAGE_BUCKET (default volback), GARAGE_ROOT (install root).
set -euo pipefail

BUCKET=${GARAGE_BUCKET:-volback}
ROOT=${GARAGE_ROOT:-$HOME/.cargo}
VERSION=2.5.0

die() { echo "garage.sh: $*" >&2; exit 1; }

# `garage --version` says "garage cargo:2.5.0 [features: ...]" (a git build: "garage v2.5.0 ...").
is_wanted() { [ -x "$1" ] && "$1" --version 2>/dev/null | grep -Eq "(^|[^0-9.])${VERSION//./\\.}([^0-9.]|$)"; }

find_garage() {
    local c
    for c in "${GARAGE:-}" "$(command -v garage 2>/dev/null || true)" "$HOME/.cargo/bin/garage" \
        "$ROOT/bin/garage"; do
        if [ -n "$c" ] && is_wanted "$c"; then echo "$c"; return 0; fi
    done
    return 1
}

install_garage() {
    if find_garage; then return 0; fi
    mkdir -p "$ROOT"
    # One build at a time: a second `install` (CI starts one in the background early) waits
    # for the first and then finds its binary.
    exec 9>"$ROOT/garage-build.lock"
    flock 9
    if find_garage; then return 0; fi
    local log="$ROOT/garage-build.log" tgt
    tgt=$(mktemp -d "${TMPDIR:-/tmp}/garage-build.XXXXXX")
    echo "garage.sh: building garage $VERSION into $ROOT/bin (log: $log)" >&2
    if ! (time CARGO_TARGET_DIR="$tgt" CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 CARGO_PROFILE_RELEASE_DEBUG=0 \
        nice -n 10 cargo install garage --version "$VERSION" --locked \
        --no-default-features --features lmdb,bundled-libs --root "$ROOT") >"$log" 2>&1; then
        rm -rf "$tgt"
        die "building garage failed: see $log"
    fi
    rm -rf "$tgt"
    is_wanted "$ROOT/bin/garage" || die "$ROOT/bin/garage does not say v$VERSION"
    echo "$ROOT/bin/garage"
}

garage_bin() {
    find_garage || die "no garage $VERSION (set GARAGE, or run: $0 install)"
}

secret() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# write_config FILE NODEDIR S3PORT RPCPORT ADMINPORT REPLICATION SECRET
write_config() {
    mkdir -p "$2/meta" "$2/data"
    cat >"$1" <<EOT
metadata_dir = "$2/meta"
data_dir = "$2/data"
db_engine = "lmdb"
replication_factor = $6
consistency_mode = "consistent"
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$4"
rpc_public_addr = "127.0.0.1:$4"
rpc_secret = "$7"
bootstrap_peers = []
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$5"
EOT
}

# start_server NODEDIR: garage server in the background, pid in NODEDIR/pid.
start_server() {
    "$G" -c "$1/garage.toml" server >>"$1/server.log" 2>&1 &
    echo $! >"$1/pid"
}

# wait_for NODEDIR: until the node answers on RPC (10 s).
wait_for() {
    local _
    for _ in $(seq 1 50); do
        "$G" -c "$1/garage.toml" status >/dev/null 2>&1 && return 0
        kill -0 "$(cat "$1/pid")" 2>/dev/null || die "garage in $1 exited: $(tail -5 "$1/server.log")"
        sleep 0.2
    done
    die "garage in $1 does not answer: $(tail -5 "$1/server.log")"
}

# make_bucket NODEDIR: bucket + key; prints the key's id and secret (two words).
make_bucket() {
    local g=("$G" -c "$1/garage.toml") _
    # The layout takes a moment to be usable after it is applied.
    for _ in $(seq 1 50); do
        "${g[@]}" bucket create "$BUCKET" >/dev/null 2>&1 && break
        "${g[@]}" bucket info "$BUCKET" >/dev/null 2>&1 && break
        sleep 0.2
    done
    "${g[@]}" bucket info "$BUCKET" >/dev/null || die "cannot create bucket $BUCKET"
    "${g[@]}" key create "$BUCKET-key" >"$1/key.txt"
    "${g[@]}" bucket allow --read --write --owner "$BUCKET" --key "$BUCKET-key" >/dev/null
    echo "$(awk '/Key ID/ {print $NF}' "$1/key.txt") $(awk '/Secret key/ {print $NF}' "$1/key.txt")"
}

print_env() { # DIR KEYID SECRET ENDPOINT [ENDPOINTS]
    {
        echo "export AWS_ACCESS_KEY_ID=$2"
        echo "export AWS_SECRET_ACCESS_KEY=$3"
        echo "export AWS_DEFAULT_REGION=garage"
        echo "export AWS_ENDPOINT_URL=$4"
        [ -z "${5:-}" ] || echo "export GARAGE_ENDPOINTS=\"$5\""
        echo "# bucket: $BUCKET"
    } | tee "$1/env"
}

start_single() {
    local d=$1 p=${2:-39100}
    mkdir -p "$d"; d=$(cd "$d" && pwd)
    [ ! -e "$d/pid" ] || die "$d already has a server (stop it first)"
    G=$(garage_bin)
    write_config "$d/garage.toml" "$d" "$p" $((p + 1)) $((p + 3)) 1 "$(secret)"
    start_server "$d"
    wait_for "$d"
    local node
    node=$("$G" -c "$d/garage.toml" node id -q | cut -d@ -f1)
    "$G" -c "$d/garage.toml" layout assign -z dc1 -c 20G "$node" >/dev/null
    "$G" -c "$d/garage.toml" layout apply --version 1 >/dev/null
    read -r kid ksecret < <(make_bucket "$d") || true
    [ -n "${ksecret:-}" ] || die "no key was made: see $d/server.log"
    print_env "$d" "$kid" "$ksecret" "http://127.0.0.1:$p"
}

start_cluster() {
    local d=$1 b=${2:?usage: $0 start-cluster DIR BASEPORT} s i n ids=() endpoints=""
    mkdir -p "$d"; d=$(cd "$d" && pwd)
    [ ! -e "$d/n1/pid" ] || die "$d already has servers (stop them first)"
    G=$(garage_bin)
    s=$(secret)
    for i in 1 2 3; do
        n="$d/n$i"; local o=$((b + 10 * (i - 1)))
        write_config "$n/garage.toml" "$n" "$o" $((o + 1)) $((o + 3)) 3 "$s"
        mkdir -p "$n"
        start_server "$n"
        endpoints="$endpoints${endpoints:+ }http://127.0.0.1:$o"
    done
    for i in 1 2 3; do
        wait_for "$d/n$i"
        ids+=("$("$G" -c "$d/n$i/garage.toml" node id -q)")
    done
    local g=("$G" -c "$d/n1/garage.toml")
    "${g[@]}" node connect "${ids[1]}" >/dev/null
    "${g[@]}" node connect "${ids[2]}" >/dev/null
    # Peers learnt by `node connect` are saved only from time to time: name them in the
    # configurations, so that the cluster finds itself again after a crash and a restart.
    for i in 1 2 3; do
        sed -i "s|^bootstrap_peers = \[\]|bootstrap_peers = [\"${ids[0]}\", \"${ids[1]}\", \"${ids[2]}\"]|" "$d/n$i/garage.toml"
    done
    # Until node 1 sees the other two.
    for _ in $(seq 1 50); do
        [ "$("${g[@]}" status 2>/dev/null | grep -c '127.0.0.1:')" -ge 3 ] && break
        sleep 0.2
    done
    for i in 0 1 2; do
        "${g[@]}" layout assign -z dc1 -c 1G "${ids[$i]%@*}" >/dev/null
    done
    "${g[@]}" layout apply --version 1 >/dev/null
    # Until every node has the layout.
    for i in 2 3; do
        for _ in $(seq 1 50); do
            "$G" -c "$d/n$i/garage.toml" layout show 2>/dev/null | grep -q 'Current cluster layout version: 1' && break
            sleep 0.2
        done
    done
    read -r kid ksecret < <(make_bucket "$d/n1") || true
    [ -n "${ksecret:-}" ] || die "no key was made: see $d/n1/server.log"
    print_env "$d" "$kid" "$ksecret" "http://127.0.0.1:$b" "$endpoints"
}

stop_dir() {
    local d=${1:?usage: $0 stop DIR} f pids=()
    for f in "$d/pid" "$d"/n*/pid; do
        [ -f "$f" ] || continue
        pids+=("$(cat "$f")")
        kill "$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
    [ ${#pids[@]} -gt 0 ] || die "no server was started in $d"
    local p _
    for p in "${pids[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
}

case "${1:-}" in
install) install_garage ;;
start) start_single "${2:?usage: $0 start DIR [PORT]}" "${3:-}" ;;
start-cluster) start_cluster "${2:?usage: $0 start-cluster DIR BASEPORT}" "${3:-}" ;;
stop) stop_dir "${2:-}" ;;
*) die "usage: $0 install | start DIR [PORT] | start-cluster DIR BASEPORT | stop DIR" ;;
esac
