#!/usr/bin/env bash
# prune.sh VOLDIR WORKDIR — forget/prune benchmark (issue 13): volback against restic on a
# history of HISTORY versions of the benchmark volume, and the size of an incremental backup
# against a qcow2 overlay holding only the changed clusters.
#
#   scripts/bench/make-volumes.sh /work/bench-data                # once: v1.img, v2.img
#   scripts/bench/prune.sh /work/bench-data /work/bench-data/prune-run
#
# Units (UNITS="history prune incremental", the default, runs all three):
#   history      version 1 is v1.img, version 2 is v2.img, each later version is the one
#                before with the v1→v2 mutation of helpers.py applied again (seed SEED:hN,
#                on a loop mount of WORKDIR/h.img). Each version is backed up into volback
#                (`backup` of the image) and into restic (`backup --stdin`, repository v2,
#                compressed); both repositories are then copied aside (*.pristine) so that
#                the prune unit can run again without rebuilding the history.
#   prune        from fresh copies of the pristine repositories, times
#                `volback forget --keep-last KEEP --prune` and
#                `restic forget --keep-last KEEP --prune`: wall time, peak RSS, repository size
#                before and after; then restores the newest version from both and compares
#                it with its SHA-256 (untimed).
#   incremental  a fresh volback repository: backup of v1.img, then of v2.img (v1 is its
#                parent): new_bytes_stored of v2, against a qcow2 overlay of v2 on v1
#                (zstd, 64 KiB clusters) holding only the clusters that differ, made by
#                `qemu-img create -b v2.img` + `qemu-img rebase -c -b v1.img` (rebase copies
#                into the overlay exactly the clusters where the two backings differ;
#                `qemu-img convert -B` would copy every cluster of a raw source).
#
# Results: WORKDIR/prune.kv ("key value") and WORKDIR/prune.json; timings as in anchors.sh
# (page cache dropped before each timed run, /usr/bin/time, idle wait BENCH_IDLE_TIMEOUT).
# Parameters: HISTORY (10), KEEP (3), SEED (volback-bench-1), CHANGE_EVERY (50),
# NEW_RANDOM_BYTES (1.2% of v1's used bytes), VB (volback binary; default: release build).
# Needs root (loop mounts, dropping caches), restic, qemu-img, about 4 × the volume's used
# bytes of free space in WORKDIR. Do not run it on a shared machine while others measure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$here/anchors.sh"

(($# == 2)) || { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
vol=$(cd "$1" && pwd)
mkdir -p "$2"
work=$(cd "$2" && pwd)
[[ -f $vol/v1.img && -f $vol/v2.img ]] || bench_die "$vol must contain v1.img and v2.img"
(($(id -u) == 0)) || bench_die "must run as root (loop mounts, dropping caches)"
bench_require losetup mount umount e2fsck sha256sum /usr/bin/time "$BENCH_PYTHON"
exec 7>"$work/.lock"
flock -n 7 || bench_die "another prune.sh is running in $work"

HISTORY=${HISTORY:-10}
KEEP=${KEEP:-3}
SEED=${SEED:-volback-bench-1}
CHANGE_EVERY=${CHANGE_EVERY:-50}
UNITS=${UNITS:-history prune incremental}
((HISTORY >= 2 && KEEP >= 1 && KEEP < HISTORY)) || bench_die "need HISTORY >= 2 and 1 <= KEEP < HISTORY"
for u in $UNITS; do
    case $u in
    history | prune) bench_require restic ;;
    incremental) bench_require qemu-img ;;
    esac
done
if [[ -z ${NEW_RANDOM_BYTES:-} ]]; then
    used=$(awk '$1 == "fs_used_bytes" { print $2 }' "$vol/v1.stats" 2>/dev/null || :)
    NEW_RANDOM_BYTES=$(( ${used:-2684354560} * 12 / 1000 ))
fi
if [[ -z ${VB:-} ]]; then
    (cd "$root" && cargo build --release --quiet)
    VB="$root/target/release/volback"
fi

BENCH_KV="$work/prune.kv"
BENCH_DISCARD="$work/.discard"
# A run without the history unit adds to the figures of the run that made it.
if [[ " $UNITS " == *" history "* || ! -f $BENCH_KV ]]; then : >"$BENCH_KV"; fi
bench_record_meta
bench_record meta.voldir "$vol"
bench_record meta.history "$HISTORY"
bench_record meta.keep "$KEEP"
bench_record meta.volback_version "$("$VB" --version)"
bench_record meta.volback_commit "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
bench_record meta.qemu_img_version "$(qemu-img --version | awk 'NR == 1 { print $3 }')"

VB_REPO=$work/vb-repo
RESTIC_REPO=$work/restic-repo
export RESTIC_PASSWORD=$BENCH_RESTIC_PASSWORD RESTIC_CACHE_DIR=$work/restic-cache

MNT="" LOOP=""
cleanup() {
    local rc=$?
    if [[ -n $MNT ]]; then umount "$MNT" 2>/dev/null || :; rmdir "$MNT" 2>/dev/null || :; fi
    if [[ -n $LOOP ]]; then losetup -d "$LOOP" 2>/dev/null || :; fi
    rm -f "$work"/{vb-restored.img,restic-restored.img}
    rm -rf "${BENCH_DISCARD:?}"
    exit "$rc"
}
trap cleanup EXIT

# json_field FILE KEY — a top-level field of a JSON file.
json_field() { "$BENCH_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# mutate_image N — applies the v1→v2 mutation (seed SEED:hN) to WORKDIR/h.img in place.
mutate_image() {
    local n=$1
    LOOP=$(losetup --find --show -- "$work/h.img")
    MNT=$(mktemp -d /tmp/volback-prune-mnt.XXXXXX)
    mount -t ext4 -o noatime,nodiscard "$LOOP" "$MNT"
    # helpers.py mutate reads only the paths of its manifest ("DIGEST  PATH" lines).
    (cd "$MNT" && find . -type f ! -name $'*\n*' ! -path './lost+found/*' -printf '0  %P\n' |
        LC_ALL=C sort -k2) >"$work/h.manifest"
    bench_py mutate "$MNT" --manifest "$work/h.manifest" --seed "$SEED:h$n" \
        --every "$CHANGE_EVERY" --new-text-files 20 --new-random-bytes "$NEW_RANDOM_BYTES" \
        --db large/db.dat --db-pages 128 --log "$work/h$n.changes.tsv" >"$work/h$n.changes"
    umount "$MNT"
    rmdir "$MNT"
    MNT=""
    sync
    losetup -d "$LOOP"
    LOOP=""
    e2fsck -fn "$work/h.img" >/dev/null 2>&1 || bench_die "e2fsck reports problems in version $n"
}

history_unit() {
    local n key
    bench_discard "$VB_REPO" "$RESTIC_REPO" "$VB_REPO.pristine" "$RESTIC_REPO.pristine" "$RESTIC_CACHE_DIR"
    "$VB" init --no-encryption "$VB_REPO" >/dev/null
    restic init -q --repository-version 2 --repo "$RESTIC_REPO" >/dev/null
    : >"$work/history.sha256"
    for ((n = 1; n <= HISTORY; n++)); do
        key=$(printf 'h%02d' "$n")
        case $n in
        1) cp --sparse=always -- "$vol/v1.img" "$work/h.img" ;;
        2) cp --sparse=always -- "$vol/v2.img" "$work/h.img" ;;
        *)
            bench_log "version $n: mutating"
            mutate_image "$n"
            bench_import_kv "history.$key.changes" "$work/h$n.changes"
            ;;
        esac
        echo "$(sha256sum <"$work/h.img" | awk '{ print $1 }') $key" >>"$work/history.sha256"
        bench_time "history.$key.volback_backup" "$VB" backup --quiet --json "$work/h.img" "$VB_REPO" \
            >"$work/vb-$key.json"
        bench_record "history.$key.volback_new_bytes_stored" "$(json_field "$work/vb-$key.json" new_bytes_stored)"
        bench_record "history.$key.volback_repo_bytes" "$(bench_dir_bytes "$VB_REPO")"
        bench_time "history.$key.restic_backup" restic backup -q --json --repo "$RESTIC_REPO" \
            --stdin --stdin-filename vol.img --host volback-bench --tag "$key" <"$work/h.img" \
            >"$work/restic-$key.json"
        bench_record "history.$key.restic_repo_bytes" "$(bench_dir_bytes "$RESTIC_REPO")"
    done
    rm -f "$work/h.img"
    cp -a "$VB_REPO" "$VB_REPO.pristine"
    cp -a "$RESTIC_REPO" "$RESTIC_REPO.pristine"
}

prune_unit() {
    local newest sha
    [[ -d $VB_REPO.pristine && -d $RESTIC_REPO.pristine ]] || bench_die "run the history unit first"
    bench_discard "$VB_REPO" "$RESTIC_REPO"
    cp -a "$VB_REPO.pristine" "$VB_REPO"
    cp -a "$RESTIC_REPO.pristine" "$RESTIC_REPO"

    bench_record prune.volback.repo_bytes_before "$(bench_dir_bytes "$VB_REPO")"
    bench_time prune.volback.forget_prune "$VB" forget --keep-last "$KEEP" --prune "$VB_REPO" \
        >"$work/vb-forget.out"
    bench_record prune.volback.repo_bytes_after "$(bench_dir_bytes "$VB_REPO")"
    bench_record prune.volback.snapshots_after "$("$VB" snapshots --json "$VB_REPO" |
        "$BENCH_PYTHON" -c 'import json,sys; print(len(json.load(sys.stdin)))')"

    bench_record prune.restic.repo_bytes_before "$(bench_dir_bytes "$RESTIC_REPO")"
    bench_time prune.restic.forget_prune restic forget -q --repo "$RESTIC_REPO" \
        --keep-last "$KEEP" --prune >"$work/restic-forget.out"
    bench_record prune.restic.repo_bytes_after "$(bench_dir_bytes "$RESTIC_REPO")"

    # Untimed: the newest version restores from both.
    read -r sha newest < <(tail -n 1 "$work/history.sha256")
    # A filesystem-aware backup restores unused blocks as zeros, so the image's own SHA-256
    # is not the reference: the same snapshot restored from the repository before the prune is.
    "$VB" restore --quiet "$VB_REPO" latest "$work/vb-restored.img" >/dev/null
    "$VB" restore --quiet "$VB_REPO.pristine" latest "$work/vb-reference.img" >/dev/null
    local vb_ref
    vb_ref=$(sha256sum <"$work/vb-reference.img" | awk '{ print $1 }')
    rm -f "$work/vb-reference.img"
    check_restored volback "$work/vb-restored.img" "$vb_ref" "$newest"
    restic dump -q --repo "$RESTIC_REPO" latest vol.img >"$work/restic-restored.img"
    check_restored restic "$work/restic-restored.img" "$sha" "$newest"
}

check_restored() { # tool image expected_sha256 version: records the verdict, removes the image
    if [[ $(sha256sum <"$2" | awk '{ print $1 }') == "$3" ]]; then
        bench_record "prune.$1.restore_newest_verified" true
    else
        bench_record "prune.$1.restore_newest_verified" false
        bench_log "WARNING: $1 restore of $4 differs after prune"
    fi
    rm -f "$2"
}

incremental_unit() {
    local repo=$work/vb-incr-repo ov=$work/v2-on-v1.qcow2 s1 s2 vb ovb
    bench_discard "$repo" "$ov"
    "$VB" init --no-encryption "$repo" >/dev/null
    bench_time incremental.volback.full_v1 "$VB" backup --quiet --json "$vol/v1.img" "$repo" \
        >"$work/vb-incr-v1.json"
    s1=$(bench_dir_bytes "$repo")
    bench_time incremental.volback.incr_v2 "$VB" backup --quiet --json "$vol/v2.img" "$repo" \
        >"$work/vb-incr-v2.json"
    s2=$(bench_dir_bytes "$repo")
    vb=$(json_field "$work/vb-incr-v2.json" new_bytes_stored)
    bench_record incremental.volback.incr_v2.new_bytes_stored "$vb"
    bench_record incremental.volback.incr_v2.repo_growth_bytes $((s2 - s1))

    # The overlay starts empty on top of v2; rebasing it onto v1 copies in (compressed) the
    # clusters where v1 and v2 differ, and nothing else.
    qemu-img create -q -f qcow2 -o compression_type=zstd,cluster_size=65536 \
        -b "$vol/v2.img" -F raw "$ov"
    bench_time incremental.qcow2_overlay.rebase qemu-img rebase -q -c -b "$vol/v1.img" -F raw "$ov"
    bench_record_sizes incremental.qcow2_overlay "$ov"
    if qemu-img compare -q -f qcow2 -F raw "$ov" "$vol/v2.img"; then
        bench_record incremental.qcow2_overlay.verified true
    else
        bench_record incremental.qcow2_overlay.verified false
        bench_log "WARNING: the qcow2 overlay does not read as v2.img"
    fi
    ovb=$(stat -c %s -- "$ov")
    bench_record incremental.volback_over_qcow2 "$(awk -v a="$vb" -v b="$ovb" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')"
    rm -f "$ov"
}

start=$SECONDS
for u in $UNITS; do
    case $u in
    history | prune | incremental) bench_log "unit: $u"; "${u}_unit" ;;
    *) bench_die "unknown unit: $u" ;;
    esac
done
bench_record meta.total_seconds $((SECONDS - start))
bench_kv_to_json "$BENCH_KV" "$work/prune.json"
bench_log "results: $work/prune.json"
grep -E '^(prune\.(volback|restic)\.(forget_prune\.(wall_s|max_rss_kib)|repo_bytes_(before|after))|incremental\.(volback\.incr_v2\.new_bytes_stored|qcow2_overlay\.output_bytes|volback_over_qcow2)) ' \
    "$BENCH_KV" >&2 || :
