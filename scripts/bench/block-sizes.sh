#!/usr/bin/env bash
# Block-size sweep: full backup of v1 and incremental of v2 at several block sizes, to choose
# the default. Prints one line per size: wall/user/sys seconds of each backup, repository
# size after the full backup, and bytes newly stored by the incremental.
#   scripts/bench/block-sizes.sh /work/bench-data > /work/bench-data/run/blocksize.txt
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
vol=$(cd "$1" && pwd)
VB=$root/target/release/volback
repo=$(mktemp -d /tmp/vb-bs.XXXXXX)
trap 'rm -rf "$repo"' EXIT
field='import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])'
for bs in ${SIZES:-65536 262144 524288 1048576 4194304}; do
    rm -rf "$repo"
    "$VB" init "$repo" --block-size "$bs" >/dev/null
    t1=$({ /usr/bin/time -f '%e/%U/%S' "$VB" backup --quiet --json "$vol/v1.img" "$repo" >"$repo.full.json"; } 2>&1)
    s1=$(du -sb "$repo" | cut -f1)
    t2=$({ /usr/bin/time -f '%e/%U/%S' "$VB" backup --quiet --json "$vol/v2.img" "$repo" >"$repo.incr.json"; } 2>&1)
    echo "block_size=$bs full_wall/user/sys=$t1 repo_bytes=$s1 incr_wall/user/sys=$t2" \
        "incr_new_bytes_stored=$(python3 -c "$field" "$repo.incr.json" new_bytes_stored)"
    rm -f "$repo.full.json" "$repo.incr.json"
done
