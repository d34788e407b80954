#!/usr/bin/env bash
# The side-by-side benchmark: volback and its anchors (dd | zstd, restic, partclone | zstd,
# e2image) on the same generated volumes, in one run, then ratios into docs/BENCHMARKS.md.
#
#   scripts/bench/make-volumes.sh /work/bench-data        # once: v1.img, v2.img (4 GiB ext4)
#   scripts/bench/run.sh /work/bench-data /work/bench-data/run
#
# Needs root (drops the page cache before every timed run), a release build of volback
# (built here), and the anchor tools. ANCHORS="zstd restic partclone e2image" selects anchors;
# ANCHORS=none reuses WORKDIR/anchors.kv from an earlier run of the same volumes;
# UNITS="volback_access_unit …" reruns only those volback units and keeps every other figure
# of the last run (WORKDIR/bench.kv).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$here/anchors.sh"

(($# == 2)) || { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
vol=$(cd "$1" && pwd)
mkdir -p "$2"
work=$(cd "$2" && pwd)
[[ -f $vol/v1.img && -f $vol/v2.img ]] || bench_die "$vol must contain v1.img and v2.img"

(cd "$root" && cargo build --release --quiet)
VB="$root/target/release/volback"

BENCH_KV="$work/bench.kv"
BENCH_DISCARD="$work/.discard"
if [[ -n ${UNITS:-} ]]; then
    # Rerun only these volback units; keep every other figure of the last run.
    [[ -f $BENCH_KV ]] || bench_die "UNITS needs $BENCH_KV from an earlier run"
elif [[ ${ANCHORS:-} == none ]]; then
    [[ -f $work/anchors.kv ]] || bench_die "ANCHORS=none needs $work/anchors.kv"
    cp "$work/anchors.kv" "$BENCH_KV"
else
    : >"$BENCH_KV"
    bench_record_meta
    for v in v1 v2; do bench_import_kv "volumes.$v" "$vol/$v.stats"; done
    bench_import_kv volumes.v2_changes "$vol/v2.changes"
    for a in ${ANCHORS:-zstd restic partclone e2image}; do
        case $a in
        restic) bench_run_unit anchor_restic "$vol" "$work" 2 ;;
        *) bench_run_unit "anchor_$a" "$vol" "$work" ;;
        esac
    done
    cp "$BENCH_KV" "$work/anchors.kv"
fi
[[ -z ${UNITS:-} ]] || bench_record meta.rerun "$(date -u +%FT%TZ): $UNITS"
bench_record meta.volback_version "$("$VB" --version)"
bench_record meta.volback_commit "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"

# volback: full backup of v1, incremental of v2 (same filesystem UUID: v1 is the parent),
# restore of v2 to a sparse file, and a full backup with --all-blocks for comparison.
volback_unit() {
    local repo=$work/vb-repo
    bench_discard "$repo" "$work/vb-restored.img"
    "$VB" init --no-encryption "$repo" >/dev/null
    bench_time volback.full_v1 "$VB" backup --quiet --json "$vol/v1.img" "$repo" >"$work/vb-full.json"
    bench_record volback.full_v1.repo_bytes "$(bench_dir_bytes "$repo")"
    bench_time volback.incr_v2 "$VB" backup --quiet --json "$vol/v2.img" "$repo" >"$work/vb-incr.json"
    bench_record volback.incr_v2.repo_bytes "$(bench_dir_bytes "$repo")"
    local field='import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])'
    bench_record volback.incr_v2.new_bytes_stored "$(python3 -c "$field" "$work/vb-incr.json" new_bytes_stored)"
    bench_record volback.incr_v2.bytes_read "$(python3 -c "$field" "$work/vb-incr.json" bytes_read)"
    bench_record volback.full_v1.bytes_read "$(python3 -c "$field" "$work/vb-full.json" bytes_read)"
    # Restore the v1 snapshot (the zstd anchor restores v1 too).
    local snap
    snap=$(python3 -c "$field" "$work/vb-full.json" snapshot)
    bench_time volback.restore_v1 "$VB" restore --quiet "$repo" "$snap" "$work/vb-restored.img"
    if e2fsck -fn "$work/vb-restored.img" >/dev/null 2>&1; then
        bench_record volback.restore_v1.fsck_clean true
    else
        bench_record volback.restore_v1.fsck_clean false
    fi
    # Bring that restore of v1 up to v2 with --only-changed (reads the target, writes what
    # differs), and check it against v2.img over the blocks v2 uses (a full restore of v2).
    local snap2
    snap2=$(python3 -c "$field" "$work/vb-incr.json" snapshot)
    bench_time volback.restore_only_changed_v2 "$VB" restore --quiet --only-changed "$repo" "$snap2" "$work/vb-restored.img"
    "$VB" restore --quiet "$repo" "$snap2" "$work/vb-restored-v2.img" >/dev/null
    if cmp -s "$work/vb-restored.img" "$work/vb-restored-v2.img"; then
        bench_record volback.restore_only_changed_v2.identical true
    else
        bench_record volback.restore_only_changed_v2.identical false
    fi
    rm -f "$work/vb-restored.img" "$work/vb-restored-v2.img"
    bench_discard "$repo"
    "$VB" init --no-encryption "$repo" >/dev/null
    bench_time volback.full_v1_all_blocks "$VB" backup --quiet --all-blocks --json "$vol/v1.img" "$repo" >/dev/null
    bench_record volback.full_v1_all_blocks.repo_bytes "$(bench_dir_bytes "$repo")"
    bench_discard "$repo"
}

# Peak memory on a 1 TiB sparse file holding the v1 filesystem (4 GiB, ~3 GiB used).
volback_sparse_unit() {
    local big=$work/sparse-1t.img repo=$work/vb-repo-sparse
    rm -rf "$big" "$repo"
    truncate -s 1T "$big"
    dd if="$vol/v1.img" of="$big" bs=1M conv=notrunc,sparse status=none
    "$VB" init --no-encryption "$repo" >/dev/null
    bench_time volback.sparse_1t "$VB" backup --quiet --json "$big" "$repo" >/dev/null
    bench_record volback.sparse_1t.repo_bytes "$(bench_dir_bytes "$repo")"
    bench_time volback.sparse_1t_restore "$VB" restore --quiet "$repo" latest "$work/sparse-restored.img"
    rm -rf "$big" "$repo" "$work/sparse-restored.img"
}

# Files without restoring: tar of every file through `volback mount --files` against the same
# from v1.img loop-mounted directly; time from `volback mount` to the first byte of a file;
# `qemu-img convert` from `volback serve --nbd` against the same from v1.img.
# (GNU tar skips reading files when the archive is /dev/null, hence `| cat`.)
volback_access_unit() {
    local repo=$work/vb-repo-access raw=$work/mnt-raw view=$work/view files=$work/files first
    rm -rf "$repo"
    mkdir -p "$raw" "$view" "$files"
    "$VB" init --no-encryption "$repo" >/dev/null
    "$VB" backup --quiet "$vol/v1.img" "$repo" >/dev/null
    mount -o loop,ro,noload "$vol/v1.img" "$raw"
    first=$(cd "$raw" && find . -type f -size +1k -print -quit)
    bench_time_sh volback.tar_raw_mount 'cd "$1" && tar -cf - . | cat >/dev/null' "$raw"
    umount "$raw"
    bench_time_sh volback.mount_first_byte \
        '"$1" mount "$2" latest "$3" --files "$4" >/dev/null && head -c 1 "$4/$5" >/dev/null' \
        "$VB" "$repo" "$view" "$files" "$first"
    bench_time_sh volback.tar_volback_mount 'cd "$1" && tar -cf - . | cat >/dev/null' "$files"
    "$VB" umount "$view" >/dev/null
    if "$VB" serve --help >/dev/null 2>&1; then
        local sock=$work/nbd.sock pid
        rm -f "$sock" "$work/convert-raw.img" "$work/convert-nbd.img"
        bench_time volback.convert_raw qemu-img convert -f raw -O raw "$vol/v1.img" "$work/convert-raw.img"
        rm -f "$work/convert-raw.img"
        "$VB" serve "$repo" latest --nbd "$sock" >/dev/null 2>&1 &
        pid=$!
        for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
        bench_time volback.convert_nbd qemu-img convert -f raw -O raw "nbd+unix:///?socket=$sock" "$work/convert-nbd.img"
        kill -INT "$pid"; wait "$pid" || true
        rm -f "$work/convert-nbd.img"
    fi
    rm -rf "$repo"
}

# Plain copies: raw and qcow2 copies of v1 against e2image -ra / -Qa (the e2image anchor),
# then `copy --update` of the raw copy with v2.
volback_copy_unit() {
    local raw=$work/copy-raw.img q=$work/copy.qcow2 field
    field='import json,sys; d=json.load(open(sys.argv[1])); print(d.get(sys.argv[2], d.get("stats", {}).get(sys.argv[2], "")))'
    rm -rf "$raw"* "$q"* "$work/e2-adjacent".*
    # e2image again right next to the copies: this VM's disk speed drifts within minutes, so
    # the copy ratios use these adjacent runs (the anchor section keeps its own figures).
    bench_time volback.adjacent_e2image_ra e2image -ra "$vol/v1.img" "$work/e2-adjacent.raw" 2>/dev/null
    rm -f "$work/e2-adjacent.raw"
    bench_time volback.copy_raw_v1 "$VB" copy --quiet --json "$vol/v1.img" "$raw" --format raw >"$work/copy-raw.json"
    bench_time volback.copy_update_v2 "$VB" copy --quiet --json --update "$vol/v2.img" "$raw" >"$work/copy-update.json"
    bench_record volback.copy_update_v2.blocks_rewritten "$(python3 -c "$field" "$work/copy-update.json" blocks_written)"
    bench_record volback.copy_update_v2.bytes_read "$(python3 -c "$field" "$work/copy-update.json" bytes_read)"
    rm -rf "$raw"*
    bench_time volback.adjacent_e2image_qa e2image -Qa "$vol/v1.img" "$work/e2-adjacent.qcow2" 2>/dev/null
    rm -f "$work/e2-adjacent.qcow2"
    bench_time volback.copy_qcow2_v1 "$VB" copy --quiet --json "$vol/v1.img" "$q" --format qcow2 >/dev/null
    bench_record volback.copy_qcow2_v1.output_bytes "$(du -B1 "$q" | cut -f1)"
    if qemu-img check -q "$q" >/dev/null 2>&1; then
        bench_record volback.copy_qcow2_v1.qemu_img_check clean
    else
        bench_record volback.copy_qcow2_v1.qemu_img_check FAILED
    fi
    rm -rf "$q"*
}

rm -rf "$BENCH_DISCARD"
for unit in ${UNITS:-volback_unit volback_sparse_unit volback_copy_unit volback_access_unit}; do
    bench_run_unit "$unit"
done
rm -rf "$BENCH_DISCARD"
bench_kv_to_json "$BENCH_KV" "$work/bench.json"
python3 "$here/report.py" "$work/bench.json" "$root/docs/BENCHMARKS.md" \
    "scripts/bench/run.sh $1 $2"
bench_log "report: docs/BENCHMARKS.md"
