#!/usr/bin/env bash
# s3.sh VOLDIR WORKDIR — volback into a Garage S3 server on loopback against volback into a
# local directory, on the benchmark volume, with restic's `backup --stdin` into the same
# Garage side by side (issue 15).
#
#   scripts/bench/make-volumes.sh /work/bench-data              # once: v1.img, v2.img
#   GARAGE=/path/to/garage scripts/bench/s3.sh /work/bench-data /work/bench-data/s3
#
# Each round times, for a local repository and one in a fresh bucket prefix of a single
# Garage node (scripts/garage.sh start; compression off, consistent mode): a full backup of
# v1.img, the incremental of v2.img, and a restore of v2 to a sparse file; peak RSS of each.
# The kinds alternate (local first in odd rounds, S3 first in even ones). Both repositories are
# encrypted (the default), Argon2id at KDF_MEMORY MiB. The two restores must be identical.
# Then, unless RESTIC=0, restic 0.14 (`backup --stdin` of v1 then v2, `dump` of v2) into the
# same Garage.
#
# Prints medians and the limits of issue 15: S3 full backup ≤ 1.3 × local and ≤ 0.5 × restic's
# backup into the same Garage, S3 restore ≤ 1.5 × local, S3 incremental ≤ 0.3 × S3 full, peak
# RSS ≤ 300 MiB. Garage runs on the same two cores (MD5/SHA-256 of every byte it receives):
# the figures depend on how the garage binary was built (scripts/garage.sh install builds at
# opt-level 1 for the tests; a `cargo install garage --locked` release build is faster).
#
# Timings as in anchors.sh (caches dropped before each timed run). Results: WORKDIR/s3.kv and
# WORKDIR/summary.txt. Parameters: ROUNDS (3), KDF_MEMORY (64), RESTIC (1), VB (volback
# binary; default: the release build of this tree), GARAGE (binary; default: found by
# scripts/garage.sh), PORT (39700). Needs root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$here/anchors.sh"

(($# == 2)) || { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
vol=$(cd "$1" && pwd)
mkdir -p "$2"
work=$(cd "$2" && pwd)
[[ -f $vol/v1.img && -f $vol/v2.img ]] || bench_die "$vol must contain v1.img and v2.img"
(($(id -u) == 0)) || bench_die "must run as root (dropping caches)"
ROUNDS=${ROUNDS:-3}
KDF_MEMORY=${KDF_MEMORY:-64}
RESTIC=${RESTIC:-1}
PORT=${PORT:-39700}
bench_require sha256sum /usr/bin/time "$BENCH_PYTHON"
[[ $RESTIC == 0 ]] || bench_require restic
exec 7>"$work/.lock"
flock -n 7 || bench_die "another s3.sh is running in $work"

if [[ -z ${VB:-} ]]; then
    (cd "$root" && cargo build --release --quiet)
    VB="$root/target/release/volback"
fi
GARAGE=${GARAGE:-$("$root/scripts/garage.sh" install)}
export GARAGE

BENCH_KV="$work/s3.kv"
BENCH_DISCARD="$work/.discard"
: >"$BENCH_KV"
bench_record_meta
bench_record meta.volback_commit "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
bench_record meta.garage "$("$GARAGE" --version | head -n 1)"
bench_record meta.rounds "$ROUNDS"

gdir=$work/garage
rm -rf "$gdir"
"$root/scripts/garage.sh" start "$gdir" "$PORT" >/dev/null
# shellcheck disable=SC1091
source "$gdir/env"
PASSWORD=volback-bench-s3-password
cleanup() {
    local rc=$?
    "$root/scripts/garage.sh" stop "$gdir" >/dev/null 2>&1 || true
    rm -f "$work/restored-local.img" "$work/restored-s3.img"
    rm -rf "${BENCH_DISCARD:?}"
    exit "$rc"
}
trap cleanup EXIT

json_field() { "$BENCH_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# run_kind local|s3 ROUND — full backup, incremental and restore, under runs.KIND.rROUND.*.
run_kind() {
    local kind=$1 r=$2 k=runs.$1.r$2 repo out
    local -a vb=(env "VOLBACK_PASSWORD=$PASSWORD" "VOLBACK_CACHE_DIR=$work/cache-$r" "$VB")
    if [[ $kind == s3 ]]; then
        repo="s3:$AWS_ENDPOINT_URL/volback/round-$r"
    else
        repo=$work/repo-local
        bench_discard "$repo"
    fi
    out=$work/restored-$kind.img
    bench_discard "$out" "$work/cache-$r"
    "${vb[@]}" init --kdf-memory "$KDF_MEMORY" "$repo" >/dev/null
    bench_time "$k.full_v1" "${vb[@]}" backup --quiet --json "$vol/v1.img" "$repo" >"$work/$kind-full.json"
    bench_record "$k.full_v1.new_bytes_stored" "$(json_field "$work/$kind-full.json" new_bytes_stored)"
    bench_time "$k.incr_v2" "${vb[@]}" backup --quiet --json "$vol/v2.img" "$repo" >"$work/$kind-incr.json"
    bench_time "$k.restore_v2" "${vb[@]}" restore --quiet "$repo" latest "$out" >/dev/null
}

start=$SECONDS
failed=0
for ((r = 1; r <= ROUNDS; r++)); do
    bench_log "round $r of $ROUNDS"
    if ((r % 2)); then order="local s3"; else order="s3 local"; fi
    for kind in $order; do run_kind "$kind" "$r"; done
    if cmp -s "$work/restored-local.img" "$work/restored-s3.img"; then
        bench_record "runs.r$r.restores_equal" true
    else
        bench_record "runs.r$r.restores_equal" false
        bench_log "WARNING: round $r: the S3 and the local restore of v2 differ"
        failed=1
    fi
done

if [[ $RESTIC != 0 ]]; then
    bench_log "restic into the same Garage"
    export RESTIC_REPOSITORY="s3:$AWS_ENDPOINT_URL/volback/restic" RESTIC_PASSWORD=$PASSWORD
    export RESTIC_CACHE_DIR="$work/restic-cache"
    bench_discard "$RESTIC_CACHE_DIR"
    k=anchors.restic_s3
    ropt=(-o s3.region=garage)
    restic "${ropt[@]}" init -q >/dev/null
    bench_time "$k.backup_v1" restic "${ropt[@]}" backup -q --stdin --stdin-filename vol.img --host bench <"$vol/v1.img"
    bench_time "$k.backup_v2" restic "${ropt[@]}" backup -q --stdin --stdin-filename vol.img --host bench <"$vol/v2.img"
    bench_time "$k.restore_v2" restic "${ropt[@]}" dump -q latest vol.img >"$work/restic-restored.img"
    cmp -s "$vol/v2.img" "$work/restic-restored.img" && bench_record "$k.restore_v2.verified" true
    rm -f "$work/restic-restored.img"
fi
bench_record meta.total_seconds $((SECONDS - start))

"$BENCH_PYTHON" - "$BENCH_KV" <<'PY' | tee "$work/summary.txt"
import collections, statistics, sys
kv = {}
for line in open(sys.argv[1]):
    parts = line.split(None, 1)
    if len(parts) == 2:
        kv[parts[0]] = parts[1].strip()
runs = collections.defaultdict(list)
for key, value in kv.items():
    p = key.split(".")
    if p[0] == "runs" and len(p) == 5 and p[1] in ("local", "s3"):
        try:
            runs[(p[1], p[3], p[4])].append(float(value))
        except ValueError:
            pass
def med(kind, step, field):
    v = runs.get((kind, step, field))
    return statistics.median(v) if v else None
print(f"{'step':<20} {'local':>10} {'s3':>10} {'s3/local':>9}")
for step in ("full_v1", "incr_v2", "restore_v2"):
    a, b = med("local", step, "wall_s"), med("s3", step, "wall_s")
    if a and b:
        print(f"{step + ' (s)':<20} {a:>10.2f} {b:>10.2f} {b / a:>9.3f}")
def check(label, value, limit):
    if value is None:
        return
    print(f"{label:<44} {value:>8.3f}  <= {limit}  {'PASS' if value <= limit else 'FAIL'}")
full_l, full_s = med("local", "full_v1", "wall_s"), med("s3", "full_v1", "wall_s")
rest_l, rest_s = med("local", "restore_v2", "wall_s"), med("s3", "restore_v2", "wall_s")
incr_s = med("s3", "incr_v2", "wall_s")
check("S3 full backup / local full backup", full_s / full_l if full_s and full_l else None, 1.3)
check("S3 restore / local restore", rest_s / rest_l if rest_s and rest_l else None, 1.5)
check("S3 incremental / S3 full backup", incr_s / full_s if incr_s and full_s else None, 0.3)
rt = kv.get("anchors.restic_s3.backup_v1.wall_s")
if rt and full_s:
    check("S3 full backup / restic backup into Garage", full_s / float(rt), 0.5)
    print(f"restic into Garage: backup v1 {float(rt):.2f} s, backup v2 "
          f"{float(kv.get('anchors.restic_s3.backup_v2.wall_s', 0)):.2f} s, dump v2 "
          f"{float(kv.get('anchors.restic_s3.restore_v2.wall_s', 0)):.2f} s")
rss = max((v for (kind, step, f), vs in runs.items() if kind == "s3" and f == "max_rss_kib"
           for v in vs), default=None)
if rss:
    check("S3 peak RSS (MiB)", rss / 1024, 300)
PY
exit "$failed"
