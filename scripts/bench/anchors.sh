#!/usr/bin/env bash
# anchors.sh — time the "anchor" tools volback is compared against.
#
# Standalone:  anchors.sh VOLDIR WORKDIR
#   VOLDIR holds v1.img and v2.img (from make-volumes.sh, plus its *.stats);
#   WORKDIR receives the tools' outputs and WORKDIR/anchors.json.
# Library:     source scripts/bench/anchors.sh
#   Defines bench_time / bench_time_sh / bench_record / bench_kv_to_json and
#   the anchor_* functions without running anything or changing shell options,
#   so a volback benchmark script can record its runs in the same format.
#
# Every timed run is preceded by `sync; echo 3 > /proc/sys/vm/drop_caches`, so
# each tool reads its input from disk, and is run under
# `/usr/bin/time -f '%e %M %U %S'`: wall seconds, peak RSS in KiB, user and
# system CPU seconds. For a pipeline (timed through `bash -c`), the RSS is
# that of its largest process (GNU time reports the children's maximum, not
# their sum). After each run `sync` is timed separately (sync_s): wall_s +
# sync_s is the time until the outputs are durable. other_cpu_s measures CPU
# time used by other processes during the run; anchors disturbed that way are
# run again (see bench_time, bench_run_unit). Disk contention from other
# processes is not detected.
#
# Results are collected as "key value" lines (dotted keys) in $BENCH_KV and
# converted to nested JSON at the end:
#   anchors.zstd.compress_v1.{wall_s,max_rss_kib,user_s,sys_s,sync_s,
#                             other_cpu_s,cpu_busy_pct_before,output_bytes}
#   anchors.zstd.restore_v1.{wall_s,...,verified}
#   anchors.restic_repo_v2.{init,backup_v1,backup_v2,restore_v2}.*  (restic's
#     default repository format 2: compressed), repo_bytes_v1, repo_bytes_v2,
#     growth_v2_bytes (= what restic stores for the v1->v2 change); repo
#     sizes are the sum of the repository's file sizes (du -sb minus the
#     directories' own sizes)
#   anchors.restic_repo_v1.*   the same with format 1 (no compression)
#   anchors.partclone.{clone_v1,restore_v1}.*
#   anchors.e2image.{raw_v1,qcow2_v1}.{...,output_bytes,output_alloc_bytes}
#   volumes.v1.*, volumes.v2.*, volumes.v2_changes.*   (copied from VOLDIR)
#   meta.*   host, kernel, tool versions, date, attempts per anchor
#
# Environment:
#   ANCHORS              [zstd restic partclone e2image]  anchors to run
#   RESTIC_REPO_VERSIONS [2 1]   restic repository formats to try
#   BENCH_DROP_CACHES    [1]     0 = do not drop the page cache
#   BENCH_IDLE_TIMEOUT   [0]     seconds to wait, before each run, for other
#                                processes to leave the CPUs idle (see
#                                bench_wait_idle; BENCH_IDLE_MAX_PCT [15])
#   BENCH_RETRIES        [2]     rerun an anchor (up to this many times) when
#                                other processes used more than
#                                BENCH_MAX_OTHER_FRAC [0.15] of the CPUs
#                                during one of its runs (see bench_disturbed)
#   KEEP_OUTPUTS         [1]     0 = delete the big outputs when done
#                                (restored images are always deleted)

# shellcheck disable=SC2016  # single-quoted pipelines, see "anchors" below
_ANCHORS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$_ANCHORS_DIR/lib.sh"

BENCH_KV=${BENCH_KV:-}
BENCH_DROP_CACHES=${BENCH_DROP_CACHES:-1}
BENCH_RESTIC_PASSWORD=volback-bench-fixed-password

# bench_record KEY VALUE — append one result line to $BENCH_KV.
bench_record() {
    [[ -n $BENCH_KV ]] || bench_die "BENCH_KV is not set"
    printf '%s %s\n' "$1" "$2" >>"$BENCH_KV"
}

# "IDLE TOTAL" clock ticks (USER_HZ) of all CPUs (iowait counts as idle).
_bench_cpu_sample() {
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; printf "%.0f %.0f\n", $5 + $6, t; exit }' /proc/stat
}

# Percentage of the machine's CPU time that was busy during the last second.
bench_cpu_busy_pct() {
    local i1 t1 i2 t2
    read -r i1 t1 < <(_bench_cpu_sample)
    sleep 1
    read -r i2 t2 < <(_bench_cpu_sample)
    awk -v i=$((i2 - i1)) -v t=$((t2 - t1)) 'BEGIN { printf "%.0f\n", (t > 0 ? 100 * (1 - i / t) : 0) }'
}

# Wait (up to BENCH_IDLE_TIMEOUT seconds, default 0) until other processes use
# less than BENCH_IDLE_MAX_PCT [15] % of the CPUs; print the last busy %.
bench_wait_idle() {
    local timeout=${BENCH_IDLE_TIMEOUT:-0} max=${BENCH_IDLE_MAX_PCT:-15} waited=0 busy
    busy=$(bench_cpu_busy_pct)
    while ((busy > max && waited < timeout)); do
        ((waited == 0)) && bench_log "waiting for the machine to be idle (busy ${busy}%)"
        sleep 4
        busy=$(bench_cpu_busy_pct)
        waited=$((waited + 5))
    done
    echo "$busy"
}

# bench_time KEY CMD [ARGS...] — wait for an idle machine (see bench_wait_idle),
# drop caches, run CMD under GNU time. Records under KEY:
#   wall_s, max_rss_kib     GNU time %e and %M
#   user_s, sys_s           CPU time of CMD and its children (%U, %S)
#   sync_s                  time of the `sync` right after CMD
#   cpu_busy_pct_before     CPU used by others just before the run
#   other_cpu_s             machine-wide busy CPU time during the run minus
#                           CMD's own user+sys: interference by other
#                           processes (plus kernel threads doing the run's
#                           writeback, so a few seconds are normal)
# Redirections on the bench_time call apply to CMD. Returns CMD's status.
bench_time() {
    local key=$1 tf rc=0 wall rss usr sys t0 t1 i0 c0 i1 c1 hz
    shift
    bench_record "$key.cpu_busy_pct_before" "$(bench_wait_idle)"
    if [[ $BENCH_DROP_CACHES == 1 ]] && ! bench_drop_caches; then
        bench_log "WARNING: cannot drop caches (not root?)"
        bench_record "$key.caches_dropped" false
    fi
    tf=$(mktemp /tmp/bench-time.XXXXXX)
    read -r i0 c0 < <(_bench_cpu_sample)
    /usr/bin/time -f '%e %M %U %S' -o "$tf" -- "$@" || rc=$?
    read -r i1 c1 < <(_bench_cpu_sample)
    read -r wall rss usr sys < <(tail -n 1 "$tf")
    rm -f "$tf"
    t0=$(date +%s.%N)
    sync
    t1=$(date +%s.%N)
    hz=$(getconf CLK_TCK)
    bench_record "$key.wall_s" "$wall"
    bench_record "$key.max_rss_kib" "$rss"
    bench_record "$key.user_s" "$usr"
    bench_record "$key.sys_s" "$sys"
    bench_record "$key.sync_s" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
    bench_record "$key.other_cpu_s" "$(awk -v busy=$(((c1 - c0) - (i1 - i0))) -v hz="$hz" \
        -v u="$usr" -v s="$sys" 'BEGIN { x = busy / hz - u - s; printf "%.2f", (x > 0 ? x : 0) }')"
    if ((rc != 0)); then
        bench_record "$key.exit_status" "$rc"
        bench_log "$key: FAILED with status $rc after ${wall}s"
    else
        bench_log "$key: ${wall}s wall, ${rss} KiB peak RSS"
    fi
    return "$rc"
}

# bench_time_sh KEY 'PIPELINE' [ARGS...] — bench_time a bash -o pipefail -c
# snippet; ARGS become its $1, $2, ... (avoids quoting file names).
bench_time_sh() {
    local key=$1 script=$2
    shift 2
    bench_time "$key" bash -o pipefail -c "$script" bench "$@"
}

# bench_record_sizes KEY FILE — KEY.output_bytes (apparent), KEY.output_alloc_bytes.
bench_record_sizes() {
    local s
    s=$(bench_file_sizes "$2")
    bench_record "$1.output_bytes" "${s% *}"
    bench_record "$1.output_alloc_bytes" "${s#* }"
}

# bench_import_kv PREFIX FILE — copy "key value" lines of FILE under PREFIX.
bench_import_kv() {
    [[ -r $2 ]] || return 0
    awk -v p="$1" 'NF { print p "." $0 }' "$2" >>"$BENCH_KV"
}

# bench_kv_to_json KV_FILE JSON_FILE
bench_kv_to_json() { bench_py kv2json -o "$2" "$1"; }

# bench_record_meta — host and tool versions under meta.*.
bench_record_meta() {
    bench_record meta.schema volback-bench/1
    bench_record meta.date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    bench_record meta.kernel "$(uname -r)"
    bench_record meta.nproc "$(nproc)"
    bench_record meta.mem_total_kib "$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
    bench_record meta.cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    bench_record meta.caches_dropped "$([[ $BENCH_DROP_CACHES == 1 ]] && echo true || echo false)"
    bench_record meta.zstd_version "$(zstd --version 2>&1 | grep -o 'v[0-9.]*' | head -1 || :)"
    bench_record meta.restic_version "$(restic version 2>&1 | awk '{ print $2 }' || :)"
    bench_record meta.partclone_version "$(partclone.ext4 -v 2>&1 | awk '/Partclone/ { print $3; exit }' || :)"
    bench_record meta.e2fsprogs_version "$(dumpe2fs -V 2>&1 | awk 'NR == 1 { print $2 }' || :)"
}

# ------------------------------------------------------------------ anchors
# Each takes VOLDIR WORKDIR and records under anchors.<name>.
# The pipelines are single-quoted on purpose: their $1.. are bench_time_sh's
# extra arguments (hence the file-wide SC2016 exception at the top).

# Whole-image zstd: compress v1, then restore it and check it is identical.
anchor_zstd() {
    local vol=$1 work=$2 k=anchors.zstd
    rm -f "$work/v1.img.zst" "$work/restored.img"
    bench_time_sh "$k".compress_v1 'dd if="$1" bs=1M status=none | zstd -3 -T0 -q -o "$2"' \
        "$vol/v1.img" "$work/v1.img.zst"
    bench_record_sizes "$k".compress_v1 "$work/v1.img.zst"
    bench_time_sh "$k".restore_v1 'zstd -d -q -c "$1" | dd of="$2" bs=1M status=none' \
        "$work/v1.img.zst" "$work/restored.img"
    if cmp -s "$vol/v1.img" "$work/restored.img"; then
        bench_record "$k".restore_v1.verified true
    else
        bench_record "$k".restore_v1.verified false
        bench_log "WARNING: zstd restore differs from v1.img"
    fi
    rm -f "$work/restored.img"
}

# restic --stdin backups of v1 then v2 into a fresh repository of format
# VERSION (3rd argument), then a restore (restic dump) of the v2 snapshot.
anchor_restic() {
    local vol=$1 work=$2 ver=${3:-2} k s0 s1 s2 snap
    k=anchors.restic_repo_v$ver
    local repo="$work/restic-repo-v$ver"
    if [[ -n ${BENCH_DISCARD:-} ]]; then
        bench_discard "$repo" "$work/restic-cache-v$ver"
    else
        rm -rf "$repo" "$work/restic-cache-v$ver"
    fi
    export RESTIC_REPOSITORY=$repo RESTIC_PASSWORD=$BENCH_RESTIC_PASSWORD
    export RESTIC_CACHE_DIR="$work/restic-cache-v$ver"

    bench_time "$k".init restic init -q --repository-version "$ver" >/dev/null
    s0=$(bench_dir_bytes "$repo")
    bench_record "$k".repo_bytes_empty "$s0"

    bench_time "$k".backup_v1 restic backup -q --json --stdin --stdin-filename vol.img \
        --host volback-bench --tag v1 <"$vol/v1.img" >"$work/restic-v$ver-backup-v1.json"
    bench_import_kv "$k".backup_v1 <(bench_py restic-summary "$work/restic-v$ver-backup-v1.json")
    s1=$(bench_dir_bytes "$repo")
    bench_record "$k".repo_bytes_v1 "$s1"

    bench_time "$k".backup_v2 restic backup -q --json --stdin --stdin-filename vol.img \
        --host volback-bench --tag v2 <"$vol/v2.img" >"$work/restic-v$ver-backup-v2.json"
    bench_import_kv "$k".backup_v2 <(bench_py restic-summary "$work/restic-v$ver-backup-v2.json")
    s2=$(bench_dir_bytes "$repo")
    bench_record "$k".repo_bytes_v2 "$s2"
    bench_record "$k".growth_v2_bytes $((s2 - s1))

    snap=$(bench_py restic-summary "$work/restic-v$ver-backup-v2.json" | awk '$1 == "snapshot_id" { print $2 }')
    bench_time "$k".restore_v2 restic dump -q "$snap" vol.img >"$work/restic-restored.img"
    if cmp -s "$vol/v2.img" "$work/restic-restored.img"; then
        bench_record "$k".restore_v2.verified true
    else
        bench_record "$k".restore_v2.verified false
        bench_log "WARNING: restic restore differs from v2.img"
    fi
    rm -f "$work/restic-restored.img"
    unset RESTIC_REPOSITORY RESTIC_PASSWORD RESTIC_CACHE_DIR
}

# partclone image (used blocks only) of v1 piped through zstd, and a restore.
anchor_partclone() {
    local vol=$1 work=$2 k=anchors.partclone
    rm -f "$work/pc.zst" "$work/pc-restored.img"
    bench_time_sh "$k".clone_v1 \
        'partclone.ext4 -c -q -s "$1" -o - -L "$2" 2>/dev/null | zstd -3 -T0 -q -o "$3"' \
        "$vol/v1.img" "$work/partclone-clone.log" "$work/pc.zst"
    bench_record_sizes "$k".clone_v1 "$work/pc.zst"
    bench_record "$k".clone_v1.uncompressed_bytes "$(zstd -d -q -c "$work/pc.zst" | wc -c)"

    # Restore into a sparse file of the volume's size (-O: it exists).
    truncate -s "$(stat -c %s "$vol/v1.img")" "$work/pc-restored.img"
    bench_time_sh "$k".restore_v1 \
        'zstd -d -q -c "$1" | partclone.ext4 -r -q -s - -O "$2" -L "$3" 2>/dev/null' \
        "$work/pc.zst" "$work/pc-restored.img" "$work/partclone-restore.log"
    if e2fsck -fn "$work/pc-restored.img" >/dev/null 2>&1; then
        bench_record "$k".restore_v1.fsck_clean true
    else
        bench_record "$k".restore_v1.fsck_clean false
        bench_log "WARNING: partclone restore does not pass e2fsck -fn"
    fi
    rm -f "$work/pc-restored.img"
}

# e2image raw (sparse, metadata + data) and qcow2 (metadata + data) of v1.
anchor_e2image() {
    local vol=$1 work=$2 k=anchors.e2image
    rm -f "$work/e2.raw" "$work/e2.qcow2"
    bench_time "$k".raw_v1 e2image -ra "$vol/v1.img" "$work/e2.raw" 2>>"$work/e2image.log"
    bench_record_sizes "$k".raw_v1 "$work/e2.raw"
    bench_time "$k".qcow2_v1 e2image -Qa "$vol/v1.img" "$work/e2.qcow2" 2>>"$work/e2image.log"
    bench_record_sizes "$k".qcow2_v1 "$work/e2.qcow2"
}

# bench_disturbed FROM_LINE — true (and prints the keys) if a run recorded
# in $BENCH_KV after line FROM_LINE had other_cpu_s above both 1 s and
# BENCH_MAX_OTHER_FRAC [0.15] of the machine's CPU capacity during that run
# (wall_s x nproc).
bench_disturbed() {
    tail -n +"$(($1 + 1))" "$BENCH_KV" | awk -v frac="${BENCH_MAX_OTHER_FRAC:-0.15}" \
        -v ncpu="$(nproc)" '
        { n = split($1, k, "."); key = substr($1, 1, length($1) - length(k[n]) - 1) }
        k[n] == "wall_s" { wall[key] = $2 }
        k[n] == "other_cpu_s" { other[key] = $2 }
        END { for (key in other)
                  if (other[key] > 1 && other[key] > frac * wall[key] * ncpu) { print key; bad = 1 }
              exit !bad }'
}

# bench_run_unit FUNC ARGS... — run an anchor function; while one of its runs
# was disturbed by other processes, run it again (up to BENCH_RETRIES [2]
# more times). Later records of a key replace earlier ones in the JSON.
bench_run_unit() {
    local try=0 from bad
    while :; do
        bench_log "anchor: ${1#anchor_}${4:+ (repository v$4)}$( ((try == 0)) || echo ", attempt $((try + 1))")"
        from=$(wc -l <"$BENCH_KV")
        "$@"
        bad=$(bench_disturbed "$from") || break
        bad=${bad//$'\n'/ }
        if ((try >= ${BENCH_RETRIES:-2})); then
            bench_log "WARNING: still disturbed by other processes: $bad"
            break
        fi
        bench_log "disturbed by other processes ($bad), running again"
        try=$((try + 1))
    done
    bench_record "meta.attempts.${1#anchor_}${4:+_v$4}" $((try + 1))
}

# ---------------------------------------------------------------- standalone
anchors_main() {
    (($# == 2)) || { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
    local vol work a v
    vol=$(cd "$1" && pwd)
    mkdir -p "$2"
    work=$(cd "$2" && pwd)
    [[ -f $vol/v1.img && -f $vol/v2.img ]] || bench_die "$vol must contain v1.img and v2.img"
    (($(id -u) == 0)) || bench_log "WARNING: not root: page cache cannot be dropped"
    bench_require zstd restic partclone.ext4 e2image e2fsck dd cmp /usr/bin/time "$BENCH_PYTHON"
    exec 8>"$work/.lock"
    flock -n 8 || bench_die "another anchors.sh is running in $work"

    _ANCHORS_WORK=$work
    trap 'rm -f "$_ANCHORS_WORK"/{restored.img,restic-restored.img,pc-restored.img}' EXIT
    BENCH_KV="$work/anchors.kv"
    : >"$BENCH_KV"
    bench_record_meta
    bench_record meta.voldir "$vol"
    for v in v1 v2; do
        bench_import_kv "volumes.$v" "$vol/$v.stats"
    done
    bench_import_kv volumes.v2_changes "$vol/v2.changes"

    local start=$SECONDS units=() u fn ver
    for a in ${ANCHORS:-zstd restic partclone e2image}; do
        case $a in
        restic) for v in ${RESTIC_REPO_VERSIONS:-2 1}; do units+=("restic $v"); done ;;
        zstd | partclone | e2image) units+=("$a") ;;
        *) bench_die "unknown anchor: $a" ;;
        esac
    done
    for u in "${units[@]}"; do
        read -r fn ver <<<"$u" # "restic 2" -> anchor_restic VOL WORK 2
        bench_run_unit "anchor_$fn" "$vol" "$work" ${ver:+"$ver"}
    done
    bench_record meta.total_seconds $((SECONDS - start))

    if [[ ${KEEP_OUTPUTS:-1} == 0 ]]; then
        rm -rf "$work"/v1.img.zst "$work"/pc.zst "$work"/e2.raw "$work"/e2.qcow2 "$work"/restic-repo-v* \
            "$work"/restic-cache-v*
    fi
    bench_kv_to_json "$BENCH_KV" "$work/anchors.json"
    bench_log "results: $work/anchors.json"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    anchors_main "$@"
fi
