#!/usr/bin/env python3
"""Writes docs/BENCHMARKS.md from a bench.json made by scripts/bench/run.sh.

usage: report.py BENCH_JSON OUTPUT_MD COMMAND
"""
import json
import sys


NOTES = {
    "blocksize.txt": (
        "`scripts/bench/block-sizes.sh /work/bench-data > WORKDIR/blocksize.txt`: the full backup "
        "of v1 and the incremental of v2 at each block size (wall/user/sys seconds, page cache "
        "dropped before each; sizes are exact). With pack chunks the block size no longer "
        "changes how well a full backup compresses; smaller blocks trade snapshot metadata "
        "(about 34 bytes per stored block per snapshot) for smaller incrementals."
    ),
    "primitives.txt": (
        "`cargo bench --bench primitives`: single-core throughput on 256 KiB blocks. BLAKE3 "
        "hashes about 3.5× faster than SHA-256 (with SHA-NI) here, so it is the default chunk "
        "hash; `init --hash sha256` is available."
    ),
}


def get(d, path, default=None):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def gib(n):
    return f"{n / 2**30:.2f} GiB" if n is not None else "n/a"


def mib(n):
    return f"{n / 2**20:.1f} MiB" if n is not None else "n/a"


def secs(x):
    return f"{x:.2f} s" if x is not None else "n/a"


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def verdict(r, limit):
    if r is None:
        return "n/a"
    return f"{r:.2f}× ({'meets' if r <= limit else 'misses'} ≤ {limit}×)"


def main():
    data = json.load(open(sys.argv[1]))
    out, command = sys.argv[2], sys.argv[3]
    a = data.get("anchors", {})
    v = data.get("volback", {})
    m = data.get("meta", {})
    vols = data.get("volumes", {})

    zstd_t = get(a, "zstd.compress_v1.wall_s")
    zstd_b = get(a, "zstd.compress_v1.output_bytes")
    unzstd_t = get(a, "zstd.restore_v1.wall_s")
    pc_t = get(a, "partclone.clone_v1.wall_s")
    pc_b = get(a, "partclone.clone_v1.output_bytes")
    restic_t = get(a, "restic_repo_v2.backup_v1.wall_s")
    restic_incr_t = get(a, "restic_repo_v2.backup_v2.wall_s")
    restic_growth = get(a, "restic_repo_v2.growth_v2_bytes")
    e2_raw_t = get(a, "e2image.raw_v1.wall_s")
    e2_q_t = get(a, "e2image.qcow2_v1.wall_s")

    full_t = get(v, "full_v1.wall_s")
    full_b = get(v, "full_v1.repo_bytes")
    full_rss = get(v, "full_v1.max_rss_kib")
    incr_t = get(v, "incr_v2.wall_s")
    incr_new = get(v, "incr_v2.new_bytes_stored")
    incr_growth = None
    if get(v, "incr_v2.repo_bytes") is not None and full_b is not None:
        incr_growth = get(v, "incr_v2.repo_bytes") - full_b
    rest_t = get(v, "restore_v1.wall_s")
    oc_t = get(v, "restore_only_changed_v2.wall_s")
    all_t = get(v, "full_v1_all_blocks.wall_s")
    all_b = get(v, "full_v1_all_blocks.repo_bytes")
    sparse_rss = get(v, "sparse_1t.max_rss_kib")
    sparse_t = get(v, "sparse_1t.wall_s")

    lines = []
    w = lines.append
    w("# Benchmarks")
    w("")
    w("Produced by the side-by-side benchmark; every figure below comes from one run of")
    w("")
    w("```sh")
    w("scripts/bench/make-volumes.sh /work/bench-data   # once: the generated volumes")
    w(command)
    w("```")
    w("")
    w(f"Date {m.get('date', '?')}, {m.get('nproc', '?')} cores, kernel {m.get('kernel', '?')}, "
      f"{m.get('volback_version', 'volback')} at commit {m.get('volback_commit', '?')}; "
      f"zstd {m.get('zstd_version', '?')}, restic {m.get('restic_version', '?')}, "
      f"partclone {m.get('partclone_version', '?')}, e2fsprogs {m.get('e2fsprogs_version', '?')}.")
    if m.get("rerun"):
        w(f"The volback units were rerun after the anchors, with `UNITS=` ({m['rerun']}); the "
          "anchors and every other figure are from the run above.")
    w("The page cache is dropped before every timed command; wall time includes reading the")
    w("source from disk. Peak RSS is that of the largest process.")
    w("")
    v1 = vols.get("v1", {})
    ch = vols.get("v2_changes", {})
    w("## The volumes")
    w("")
    w(f"- `v1.img`: {gib(v1.get('volume_bytes'))} ext4, {gib(v1.get('fs_used_bytes'))} used, "
      f"{v1.get('files', '?')} files (real files from /usr, random media-like files, logs, a "
      f"database-like file), and {gib(v1.get('free_nonzero_bytes'))} of deleted-file residue in "
      "free blocks.")
    w(f"- `v2.img`: v1 with {ch.get('pct_files_touched', '?')}% of the files changed "
      f"({ch.get('files_rewritten', '?')} rewritten, {ch.get('files_modified_inplace', '?')} modified in "
      f"place, {ch.get('files_appended', '?')} appended, {ch.get('files_deleted', '?')} deleted, "
      f"{ch.get('files_added', '?')} added; {mib(ch.get('bytes_changed_total'))} of file data).")
    w("")
    w("## Results")
    w("")
    w("| operation | volback | anchor | ratio |")
    w("|---|---|---|---|")
    w(f"| full backup of v1, wall | {secs(full_t)} | `dd bs=1M \\| zstd -3 -T0`: {secs(zstd_t)} | "
      f"{verdict(ratio(full_t, zstd_t), 0.7)} |")
    w(f"| full backup of v1, stored bytes | {gib(full_b)} | `dd \\| zstd -3 -T0` output: {gib(zstd_b)} | "
      f"{verdict(ratio(full_b, zstd_b), 1.0)} |")
    w(f"| full backup of v1, wall | {secs(full_t)} | `partclone.ext4 -c \\| zstd -3 -T0`: {secs(pc_t)} | "
      f"{verdict(ratio(full_t, pc_t), 0.5)} |")
    w(f"| full backup of v1, stored bytes | {gib(full_b)} | partclone \\| zstd output: {gib(pc_b)} | "
      f"{verdict(ratio(full_b, pc_b), 1.0)} |")
    w(f"| full backup of v1, wall | {secs(full_t)} | `restic backup --stdin` (repo v2, compressed): "
      f"{secs(restic_t)} | {ratio(full_t, restic_t) and f'{ratio(full_t, restic_t):.2f}×'} |")
    w(f"| incremental backup of v2, wall | {secs(incr_t)} | volback's own full backup: {secs(full_t)} | "
      f"{verdict(ratio(incr_t, full_t), 0.3)} |")
    w(f"| incremental backup of v2, wall | {secs(incr_t)} | restic incremental: {secs(restic_incr_t)} | "
      f"{ratio(incr_t, restic_incr_t) and f'{ratio(incr_t, restic_incr_t):.2f}×'} |")
    w(f"| incremental of v2, new bytes stored | {mib(incr_new)} (repository grew {mib(incr_growth)}) | "
      f"restic repository growth: {mib(restic_growth)} | {verdict(ratio(incr_growth, restic_growth), 1.0)} |")
    w(f"| restore of v1 to a file, wall | {secs(rest_t)} | `zstd -d \\| dd bs=1M`: {secs(unzstd_t)} | "
      f"{verdict(ratio(rest_t, unzstd_t), 1.0)} |")
    if oc_t is not None:
        same = get(v, "restore_only_changed_v2.identical", "n/a")
        w(f"| restore of v2 `--only-changed` onto the restore of v1 (identical to a full restore of "
          f"v2: {same}) | {secs(oc_t)} | volback's full restore of v1: {secs(rest_t)} | "
          f"{ratio(oc_t, rest_t) and f'{ratio(oc_t, rest_t):.2f}×'} |")
    w(f"| full backup, `--all-blocks` (every block, residue included) | {secs(all_t)}, {gib(all_b)} | "
      f"`dd \\| zstd`: {secs(zstd_t)}, {gib(zstd_b)} | {ratio(all_t, zstd_t) and f'{ratio(all_t, zstd_t):.2f}× time'} |")
    w(f"| peak RSS, full backup of v1 | {mib(full_rss and full_rss * 1024)} | | limit 300 MiB |")
    w(f"| peak RSS, 1 TiB sparse file holding v1 | {mib(sparse_rss and sparse_rss * 1024)} "
      f"({secs(sparse_t)}) | | limit 300 MiB |")
    w(f"| e2image -ra / -Qa of v1 (for reference) | | {secs(e2_raw_t)} / {secs(e2_q_t)} | |")
    w("")
    w("### Plain copies")
    w("")
    w("| operation | volback | anchor | ratio |")
    w("|---|---|---|---|")
    c_raw = get(v, "copy_raw_v1.wall_s")
    c_q = get(v, "copy_qcow2_v1.wall_s")
    c_up = get(v, "copy_update_v2.wall_s")
    adj_ra = get(v, "adjacent_e2image_ra.wall_s", e2_raw_t)
    adj_qa = get(v, "adjacent_e2image_qa.wall_s", e2_q_t)
    w(f"| `copy --format raw` of v1 | {secs(c_raw)} | `e2image -ra`, run just before: {secs(adj_ra)} | "
      f"{verdict(ratio(c_raw, adj_ra), 1.0)} |")
    w(f"| `copy --format qcow2` of v1 | {secs(c_q)} (`qemu-img check`: "
      f"{get(v, 'copy_qcow2_v1.qemu_img_check', 'n/a')}) | `e2image -Qa`, run just before: "
      f"{secs(adj_qa)} | {verdict(ratio(c_q, adj_qa), 1.0)} |")
    w(f"| `copy --update` of the raw copy with v2 | {secs(c_up)} "
      f"({get(v, 'copy_update_v2.blocks_rewritten', '?')} blocks rewritten) | the first raw copy: "
      f"{secs(c_raw)} | {verdict(ratio(c_up, c_raw), 0.3)} |")
    w("")
    w("### Files without restoring")
    w("")
    w("| operation | volback | anchor | ratio |")
    w("|---|---|---|---|")
    tar_raw = get(v, "tar_raw_mount.wall_s")
    tar_vb = get(v, "tar_volback_mount.wall_s")
    first = get(v, "mount_first_byte.wall_s")
    conv_raw = get(v, "convert_raw.wall_s")
    conv_nbd = get(v, "convert_nbd.wall_s")
    w(f"| every file of v1 through `mount --files` (`tar -cf - . \\| cat`) | {secs(tar_vb)} | "
      f"v1.img loop-mounted directly: {secs(tar_raw)} | {verdict(ratio(tar_vb, tar_raw), 2.0)} |")
    w(f"| `volback mount --files` to the first byte of a file | {secs(first)} | | "
      f"{'meets' if first is not None and first < 2 else 'misses'} < 2 s |")
    w(f"| `qemu-img convert` from `volback serve --nbd` (Unix socket) | {secs(conv_nbd)} | "
      f"from v1.img: {secs(conv_raw)} | {verdict(ratio(conv_nbd, conv_raw), 1.5)} |")
    w("")
    w(f"Restored image passes `e2fsck -fn`: {get(v, 'restore_v1.fsck_clean', 'n/a')}.")
    w("")
    import os
    extra = os.path.dirname(os.path.abspath(sys.argv[1]))
    for name, title in (("blocksize.txt", "Block size"), ("primitives.txt", "Hash and compression primitives")):
        path = os.path.join(extra, name)
        if os.path.exists(path):
            w(f"## {title}")
            w("")
            w(NOTES.get(name, ""))
            w("")
            w("```text")
            w(open(path).read().rstrip())
            w("```")
            w("")
    w("## Raw figures")
    w("")
    w("```json")
    w(json.dumps({"volback": v, "anchors": a}, indent=1, sort_keys=True))
    w("```")
    open(out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
