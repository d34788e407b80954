#!/usr/bin/env bash
# compare-builds.sh OLD_VOLBACK NEW_VOLBACK VOLDIR WORKDIR [ROUNDS]
#
# Times two volback builds side by side on the benchmark volumes (make-volumes.sh): a full
# backup of v1.img into a fresh repository, then the incremental of v2.img, then a restore
# of v2 to a sparse file; a raw copy of v1.img and its `copy --update` with v2.img; a tar of
# every file through `volback mount --files`; a `qemu-img convert` through `volback serve
# --nbd`. The builds alternate within each round (old, new, new, old, ...)
# so that drift of the disk or the machine load hits both alike; caches are dropped before
# every timed run. Prints one line per run and the median of each build per step, and the
# ratio new/old. Needs root (drop_caches).
set -euo pipefail
OLD=$1 NEW=$2 VOLDIR=$3 WORK=$4 ROUNDS=${5:-2}
mkdir -p "$WORK"
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
timed() { # label cmd...
    local label=$1; shift
    drop
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    echo "$label $(echo "$t1 - $t0" | bc)" | tee -a "$WORK/times.txt"
}
: >"$WORK/times.txt"
run_build() { # name binary round
    local name=$1 bin=$2 r=$3 repo="$WORK/repo-$1-$3"
    # Old repositories are moved aside, not deleted, right before timed runs (README).
    [[ -e $repo ]] && mv "$repo" "$WORK/.discard-$RANDOM$RANDOM"
    # Plain repositories: builds before encryption do not know --no-encryption.
    local plain=()
    "$bin" init --help | grep -q -- --no-encryption && plain=(--no-encryption)
    "$bin" init "${plain[@]}" "$repo" >/dev/null
    timed "$name full_v1" "$bin" backup "$VOLDIR/v1.img" "$repo"
    timed "$name incr_v2" "$bin" backup "$VOLDIR/v2.img" "$repo"
    rm -f "$WORK/restored.img"
    timed "$name restore_v2" "$bin" restore "$repo" latest "$WORK/restored.img"
    echo "$name repo_bytes $(du -sb "$repo" | cut -f1)" | tee -a "$WORK/times.txt"
    rm -f "$WORK/copy.img" "$WORK"/copy.img.*
    timed "$name copy_v1" "$bin" copy --quiet "$VOLDIR/v1.img" "$WORK/copy.img" --format raw
    timed "$name copy_update_v2" "$bin" copy --quiet --update "$VOLDIR/v2.img" "$WORK/copy.img"
    rm -f "$WORK/copy.img" "$WORK"/copy.img.*
    local view=$WORK/view files=$WORK/files sock=$WORK/nbd.sock pid
    mkdir -p "$view" "$files"
    "$bin" mount "$repo" latest "$view" --files "$files" >/dev/null
    # GNU tar skips reading when the archive is /dev/null, hence `| cat`.
    timed "$name mount_tar" sh -c 'cd "$1" && tar -cf - . | cat' sh "$files"
    "$bin" umount "$view" >/dev/null
    rm -f "$sock" "$WORK/convert.img"
    "$bin" serve "$repo" latest --nbd "$sock" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
    timed "$name nbd_convert" qemu-img convert -f raw -O raw "nbd+unix:///?socket=$sock" "$WORK/convert.img"
    kill -INT "$pid"; wait "$pid" || true
    rm -f "$WORK/convert.img"
}
for r in $(seq 1 "$ROUNDS"); do
    if (( r % 2 )); then run_build old "$OLD" "$r"; run_build new "$NEW" "$r"
    else run_build new "$NEW" "$r"; run_build old "$OLD" "$r"; fi
done
rm -rf "$WORK"/.discard-* "$WORK"/repo-*
python3 - "$WORK/times.txt" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, step, v = line.split()
    d[(name, step)].append(float(v))
for step in ["full_v1", "incr_v2", "restore_v2", "repo_bytes", "copy_v1", "copy_update_v2",
             "mount_tar", "nbd_convert"]:
    o = statistics.median(d[("old", step)]); n = statistics.median(d[("new", step)])
    print(f"{step:12s} old {o:14.2f}  new {n:14.2f}  new/old {n / o:.3f}")
PY
