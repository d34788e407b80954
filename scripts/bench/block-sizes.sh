#!/usr/bin/env bash
# Block-size sweep: full backup of v1 and incremental of v2 at several block sizes, to choose
# the default. Prints one line per size: wall/user/sys seconds of each backup, repository
# size after the full backup, and bytes newly stored by the incremental.
#   scripts/bench/block-sizes.sh /work/bench-data > /work/bench-data/run/blocksize.txt
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
vol=$(cd "$1" && pwd)
VB=$root/target/release/volback
# One fresh repository per size, all deleted at the end: deleting one right before the next
# timed backup would time the deletion too (see lib.sh, bench_discard).
work=$(mktemp -d /tmp/vb-bs.XXXXXX)
trap 'rm -rf "$work"' EXIT
field='import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])'
drop() { sync; [[ -w /proc/sys/vm/drop_caches ]] && echo 3 >/proc/sys/vm/drop_caches || true; }
for bs in ${SIZES:-65536 262144 524288 1048576 4194304}; do
    repo=$work/$bs
    "$VB" init --no-encryption "$repo" --block-size "$bs" >/dev/null
    drop
    t1=$({ /usr/bin/time -f '%e/%U/%S' "$VB" backup --quiet --json "$vol/v1.img" "$repo" >"$repo.full.json"; } 2>&1)
    s1=$(find "$repo" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }')
    drop
    t2=$({ /usr/bin/time -f '%e/%U/%S' "$VB" backup --quiet --json "$vol/v2.img" "$repo" >"$repo.incr.json"; } 2>&1)
    echo "block_size=$bs full_wall/user/sys=$t1 repo_bytes=$s1 incr_wall/user/sys=$t2" \
        "incr_new_bytes_stored=$(python3 -c "$field" "$repo.incr.json" new_bytes_stored)"
    rm -f "$repo.full.json" "$repo.incr.json"
done
