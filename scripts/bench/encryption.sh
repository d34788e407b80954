#!/usr/bin/env bash
# encryption.sh VOLDIR WORKDIR — encrypted against plain volback repositories on the benchmark
# volume (issue 14), with restic's (always encrypted) backup of the same volume side by side.
#
#   scripts/bench/make-volumes.sh /work/bench-data              # once: v1.img, v2.img
#   scripts/bench/encryption.sh /work/bench-data /work/bench-data/encryption
#
# Each round times, for a plain repository (`init --no-encryption`) and an encrypted one
# (`init`, password from VOLBACK_PASSWORD, Argon2id at KDF_MEMORY MiB): a full backup of v1.img
# into the fresh repository, the incremental of v2.img (v1 is its parent), and a restore of v2
# to a sparse file; and records the repository's size after each backup and the report's
# new_bytes_stored. The two kinds alternate (plain then encrypted in odd rounds, encrypted then
# plain in even ones) so that drift of the disk or of the machine load hits both alike. The
# restores of both kinds must be identical (untimed SHA-256). Then, unless RESTIC=0, restic's
# anchor (anchors.sh: `restic backup --stdin` of v1 then v2 into a fresh repository of format 2,
# compressed and encrypted, and `restic dump` of v2, checked with cmp).
#
# Prints the median of each step per kind, the ratios encrypted/plain and the limits of
# issue 14: encrypted full backup, incremental and restore at most 1.1 x the plain time,
# repository size within 1 %. The encrypted times include one Argon2id derivation per command
# (about 0.5 s at the default 64 MiB; KDF_MEMORY=1 leaves it out).
#
# Timings as in anchors.sh (page cache dropped before each timed run, /usr/bin/time, idle wait
# BENCH_IDLE_TIMEOUT). Results: WORKDIR/encryption.kv ("key value") and WORKDIR/encryption.json.
# Parameters: ROUNDS (3), KDF_MEMORY (64), RESTIC (1), VB (volback binary; default: the
# release build of this tree). Needs root (dropping caches), about 3 x the volume's used bytes
# of free space in WORKDIR. Exit status 0 when every run succeeded and the restores agree,
# whether or not the limits are met (they are printed as PASS/FAIL).
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
((ROUNDS >= 1)) || bench_die "ROUNDS must be at least 1"
bench_require sha256sum /usr/bin/time "$BENCH_PYTHON"
[[ $RESTIC == 0 ]] || bench_require restic
exec 7>"$work/.lock"
flock -n 7 || bench_die "another encryption.sh is running in $work"

if [[ -z ${VB:-} ]]; then
    (cd "$root" && cargo build --release --quiet)
    VB="$root/target/release/volback"
fi
"$VB" init --help | grep -q -- --no-encryption ||
    bench_die "$VB does not know --no-encryption: it was built before encrypted repositories"

BENCH_KV="$work/encryption.kv"
BENCH_DISCARD="$work/.discard"
: >"$BENCH_KV"
bench_record_meta
for v in v1 v2; do bench_import_kv "volumes.$v" "$vol/$v.stats"; done
bench_import_kv volumes.v2_changes "$vol/v2.changes"
bench_record meta.volback_version "$("$VB" --version)"
bench_record meta.volback_commit "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
bench_record meta.rounds "$ROUNDS"
bench_record meta.kdf_memory_mib "$KDF_MEMORY"

PASSWORD=volback-bench-encryption-password
RESTORED_PLAIN=$work/restored-plain.img
RESTORED_ENC=$work/restored-enc.img
cleanup() {
    local rc=$?
    rm -f "$RESTORED_PLAIN" "$RESTORED_ENC"
    rm -rf "${BENCH_DISCARD:?}"
    exit "$rc"
}
trap cleanup EXIT

# json_field FILE KEY — a top-level field of a JSON file.
json_field() { "$BENCH_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# run_kind plain|enc ROUND — one full backup, incremental and restore, recorded under
# runs.KIND.rROUND.*. A plain repository gets no password at all: volback refuses one.
run_kind() {
    local kind=$1 r=$2 repo=$work/repo-$1 k=runs.$1.r$2 out
    local -a vb
    if [[ $kind == enc ]]; then
        vb=(env -u VOLBACK_PASSWORD_FILE "VOLBACK_PASSWORD=$PASSWORD" "$VB")
        out=$RESTORED_ENC
    else
        vb=(env -u VOLBACK_PASSWORD -u VOLBACK_PASSWORD_FILE "$VB")
        out=$RESTORED_PLAIN
    fi
    bench_discard "$repo" "$out"
    if [[ $kind == enc ]]; then
        "${vb[@]}" init --kdf-memory "$KDF_MEMORY" "$repo" >/dev/null
    else
        "${vb[@]}" init --no-encryption "$repo" >/dev/null
    fi
    bench_time "$k.full_v1" "${vb[@]}" backup --quiet --json "$vol/v1.img" "$repo" >"$work/$kind-full.json"
    bench_record "$k.full_v1.repo_bytes" "$(bench_dir_bytes "$repo")"
    bench_record "$k.full_v1.new_bytes_stored" "$(json_field "$work/$kind-full.json" new_bytes_stored)"
    bench_time "$k.incr_v2" "${vb[@]}" backup --quiet --json "$vol/v2.img" "$repo" >"$work/$kind-incr.json"
    bench_record "$k.incr_v2.repo_bytes" "$(bench_dir_bytes "$repo")"
    bench_record "$k.incr_v2.new_bytes_stored" "$(json_field "$work/$kind-incr.json" new_bytes_stored)"
    bench_time "$k.restore_v2" "${vb[@]}" restore --quiet "$repo" latest "$out" >/dev/null
    bench_record "$k.restore_v2.sha256" "$(sha256sum <"$out" | awk '{ print $1 }')"
}

start=$SECONDS
failed=0
for ((r = 1; r <= ROUNDS; r++)); do
    bench_log "round $r of $ROUNDS"
    if ((r % 2)); then order="plain enc"; else order="enc plain"; fi
    for kind in $order; do run_kind "$kind" "$r"; done
    # A filesystem-aware restore writes unused blocks as zeros, so the reference is the other
    # kind's restore of the same snapshot, not v2.img itself.
    if cmp -s "$RESTORED_PLAIN" "$RESTORED_ENC"; then
        bench_record "runs.r$r.restores_equal" true
    else
        bench_record "runs.r$r.restores_equal" false
        bench_log "WARNING: round $r: the encrypted and the plain restore of v2 differ"
        failed=1
    fi
    rm -f "$RESTORED_PLAIN" "$RESTORED_ENC"
done
bench_discard "$work/repo-plain" "$work/repo-enc"

if [[ $RESTIC != 0 ]]; then
    bench_log "restic"
    anchor_restic "$vol" "$work" 2
fi
bench_record meta.total_seconds $((SECONDS - start))

# Medians, ratios and the limits of issue 14; the summary goes into the kv file too.
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
    # runs.KIND.rN.STEP.FIELD
    if p[0] == "runs" and len(p) == 5 and p[1] in ("plain", "enc"):
        try:
            runs[(p[1], p[3], p[4])].append(float(value))
        except ValueError:
            pass
def med(kind, step, field):
    v = runs.get((kind, step, field))
    return statistics.median(v) if v else None
out = []
def rec(k, v):
    out.append(f"summary.{k} {v}")
print(f"{'step':<22} {'plain':>14} {'encrypted':>14} {'enc/plain':>10}  limit")
ok = True
for step, label in [("full_v1", "full backup v1 (s)"), ("incr_v2", "incremental v2 (s)"),
                    ("restore_v2", "restore v2 (s)")]:
    a, b = med("plain", step, "wall_s"), med("enc", step, "wall_s")
    if a is None or b is None:
        continue
    ratio = b / a
    good = ratio <= 1.10
    ok &= good
    print(f"{label:<22} {a:>14.2f} {b:>14.2f} {ratio:>10.3f}  <= 1.10 {'PASS' if good else 'FAIL'}")
    rec(f"{step}.plain_wall_s", f"{a:.2f}")
    rec(f"{step}.enc_wall_s", f"{b:.2f}")
    rec(f"{step}.ratio", f"{ratio:.3f}")
    ua, ub = med("plain", step, "user_s"), med("enc", step, "user_s")
    if ua and ub:
        print(f"{'  user CPU (s)':<22} {ua:>14.2f} {ub:>14.2f} {ub / ua:>10.3f}")
        rec(f"{step}.cpu_ratio", f"{ub / ua:.3f}")
for step, label in [("full_v1", "repository after v1"), ("incr_v2", "repository after v2")]:
    a, b = med("plain", step, "repo_bytes"), med("enc", step, "repo_bytes")
    if a is None or b is None:
        continue
    ratio = b / a
    good = abs(ratio - 1) <= 0.01
    ok &= good
    print(f"{label + ' (MB)':<22} {a / 1e6:>14.1f} {b / 1e6:>14.1f} {ratio:>10.4f}  within 1% {'PASS' if good else 'FAIL'}")
    rec(f"{step}.plain_repo_bytes", f"{a:.0f}")
    rec(f"{step}.enc_repo_bytes", f"{b:.0f}")
    rec(f"{step}.size_ratio", f"{ratio:.4f}")
r = "anchors.restic_repo_v2"
if f"{r}.backup_v1.wall_s" in kv:
    print("restic (encrypted, compressed, --stdin), one run; ratio = restic / volback encrypted")
    for step, label in [("backup_v1", "full backup v1 (s)"), ("backup_v2", "backup v2 (s)"),
                        ("restore_v2", "restore v2 (s)")]:
        mine = {"backup_v1": "full_v1", "backup_v2": "incr_v2", "restore_v2": "restore_v2"}[step]
        t = float(kv[f"{r}.{step}.wall_s"])
        b = med("enc", mine, "wall_s")
        print(f"{label:<22} {t:>14.2f} {'':>14} {t / b if b else 0:>10.3f}")
        rec(f"restic.{step}.wall_s", f"{t:.2f}")
    for key, label, mine in [("repo_bytes_v1", "repository after v1", "full_v1"),
                             ("repo_bytes_v2", "repository after v2", "incr_v2")]:
        s = float(kv[f"{r}.{key}"])
        b = med("enc", mine, "repo_bytes")
        print(f"{label + ' (MB)':<22} {s / 1e6:>14.1f} {'':>14} {s / b if b else 0:>10.4f}")
        rec(f"restic.{key}", f"{s:.0f}")
rec("limits_met", "true" if ok else "false")
print("limits of issue 14:", "all met" if ok else "NOT all met")
with open(sys.argv[1], "a") as f:
    f.write("\n".join(out) + "\n")
PY
bench_kv_to_json "$BENCH_KV" "$work/encryption.json"
bench_log "results: $work/encryption.json, $work/summary.txt"
exit "$failed"
