# shellcheck shell=bash
# Shared helpers for the volback benchmark scripts. Source it; it sets no
# shell options and defines only functions/variables prefixed for the bench.

BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_HELPERS="$BENCH_LIB_DIR/helpers.py"
BENCH_PYTHON=${BENCH_PYTHON:-python3}

bench_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
bench_die() { bench_log "ERROR: $*"; exit 1; }

# helpers.py SUBCOMMAND ARGS...
bench_py() { "$BENCH_PYTHON" "$BENCH_HELPERS" "$@"; }

# Parse an IEC size ("4G", "512M", "4GiB", "1073741824") into bytes.
bench_to_bytes() {
    local s=${1%iB}
    s=${s%B}
    numfmt --from=iec "$s"
}

# Abort unless every named command is on PATH.
bench_require() {
    local c missing=()
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
    ((${#missing[@]} == 0)) || bench_die "missing commands: ${missing[*]}"
}

# Apparent and allocated size of a file (bytes), "APPARENT ALLOCATED".
bench_file_sizes() {
    # (%.0f, not %d: mawk's %d saturates at 2^31-1)
    stat -c '%s %b %B' -- "$1" | awk '{ printf "%.0f %.0f\n", $1, $2 * $3 }'
}

# Total apparent bytes of the files in a directory tree (like du -sb, but
# without the directories' own 4 KiB each).
bench_dir_bytes() {
    find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'
}

# Moves trees of many files out of the way (under $BENCH_DISCARD, deleted at the end of the
# run) instead of deleting them now: on an ext4 without a journal the inode allocator skips
# inodes freed in the last seconds, so creating files right after deleting thousands costs
# several times more, and the previous repository's deletion was timed as part of the next
# backup.
bench_discard() {
    local d
    d=${BENCH_DISCARD:?}/$(date +%s%N)
    mkdir -p "$d"
    local p
    for p in "$@"; do
        if [[ -e $p ]]; then mv -- "$p" "$d/"; fi
    done
}

# Flush dirty data and drop the page cache, so the next run reads from disk.
# Returns 1 (without failing the caller under set -e) if we may not do it.
bench_drop_caches() {
    sync
    if [[ -w /proc/sys/vm/drop_caches ]]; then
        echo 3 >/proc/sys/vm/drop_caches && return 0
    fi
    return 1
}
