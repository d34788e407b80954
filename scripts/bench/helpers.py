#!/usr/bin/env python3
"""Small deterministic helpers for the volback benchmark scripts (stdlib only).

Sub-commands (see `helpers.py SUBCOMMAND --help`):

  pick          choose real files from /usr for the volumes (seeded hash order)
  random-files  write a tree of incompressible files (seeded PRNG)
  random-file   write one incompressible file
  text-files    write a tree of compressible synthetic text files (logs, CSV, JSON)
  db-file       write one database-like file (8 KiB pages, mixed content)
  mutate        turn a mounted copy of v1 into v2 (modify/delete/append/add files)
  freescan      count non-zero bytes in the free blocks of an ext2/3/4 image
  blockdiff     count differing 4 KiB blocks between two images
  restic-summary  print the summary of `restic backup --json` as key value lines
  kv2json       convert "key value" lines (dotted keys) into a nested JSON object

Every generator derives its randomness from random.Random(<str seed>); string
seeds are hashed with SHA-512 by CPython, so output is identical across runs and
Python versions >= 3.9 (random.randbytes).
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import sys

MIB = 1 << 20
CHUNK = 4 * MIB


# --------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------

def rng(*parts):
    """A PRNG seeded by the string form of *parts* (stable across runs)."""
    return random.Random(":".join(str(p) for p in parts))


def log_uniform_sizes(r, total, lo, hi):
    """Sizes drawn log-uniformly in [lo, hi] until they sum to *total*."""
    sizes, acc = [], 0
    llo, lhi = math.log(lo), math.log(hi)
    while acc < total:
        s = int(math.exp(r.uniform(llo, lhi)))
        s = min(s, total - acc)
        sizes.append(s)
        acc += s
    return sizes


def write_random(path, size, r):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, CHUNK)
            f.write(r.randbytes(n))
            left -= n


def nested_path(root, index, per_dir, name):
    """root/dNNN/name, spreading files over sub-directories."""
    d = os.path.join(root, "d%03d" % (index // per_dir))
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)


# --------------------------------------------------------------------------
# synthetic compressible text
# --------------------------------------------------------------------------

class TextGen:
    """Log/CSV/JSON-like text with a Zipf-distributed pseudo-word vocabulary.

    Compresses roughly like real logs (zstd -3: ~4-6x)."""

    LEVELS = ["INFO"] * 12 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]

    def __init__(self, r, vocab=6000):
        self.r = r
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        lw = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8,
              2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
        words = set()
        while len(words) < vocab:
            n = r.randint(2, 11)
            words.add("".join(r.choices(letters, weights=lw, k=n)))
        self.words = sorted(words)
        r.shuffle(self.words)
        acc, cw = 0.0, []
        for rank in range(1, vocab + 1):
            acc += 1.0 / rank
            cw.append(acc)
        self.cw = cw
        self.components = self.pick(24)

    def pick(self, k):
        return self.r.choices(self.words, cum_weights=self.cw, k=k)

    def log_lines(self, nbytes, t0):
        r, out, size, t = self.r, [], 0, t0
        while size < nbytes:
            ws = self.pick(r.randint(3, 14))
            t += r.randint(0, 4000)
            s, ms = divmod(t, 1000)
            m, s = divmod(s, 60)
            h, m = divmod(m, 60)
            d, h = divmod(h, 24)
            line = "2024-%02d-%02dT%02d:%02d:%02d.%03dZ %s [%s] %s id=%08x took=%dms\n" % (
                1 + (d // 28) % 12, 1 + d % 28, h, m, s, ms,
                r.choice(self.LEVELS), r.choice(self.components), " ".join(ws),
                r.getrandbits(32), r.randint(0, 2500))
            out.append(line)
            size += len(line)
        return "".join(out)

    def csv_lines(self, nbytes, first_id):
        r, out, size, i = self.r, ["id,name,category,price,qty,date\n"], 0, first_id
        while size < nbytes:
            w = self.pick(2)
            line = "%d,%s,%s,%.2f,%d,2023-%02d-%02d\n" % (
                i, w[0], w[1], r.random() * 500, r.randint(0, 999),
                r.randint(1, 12), r.randint(1, 28))
            out.append(line)
            size += len(line)
            i += 1
        return "".join(out)

    def json_lines(self, nbytes, first_id):
        r, out, size, i = self.r, [], 0, first_id
        while size < nbytes:
            line = json.dumps({"id": i, "user": self.pick(1)[0],
                               "tags": self.pick(r.randint(0, 4)),
                               "score": round(r.random(), 4),
                               "text": " ".join(self.pick(r.randint(4, 20)))}) + "\n"
            out.append(line)
            size += len(line)
            i += 1
        return "".join(out)

    def text(self, nbytes, kind):
        start = self.r.randint(0, 10 ** 9)
        if kind == "log":
            s = self.log_lines(nbytes, start)
        elif kind == "csv":
            s = self.csv_lines(nbytes, start)
        else:
            s = self.json_lines(nbytes, start)
        return s.encode()[:nbytes]


def write_text(path, size, gen, kind):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, CHUNK)
            f.write(gen.text(n, kind))
            left -= n


# --------------------------------------------------------------------------
# sub-commands
# --------------------------------------------------------------------------

def cmd_pick(a):
    """Order all regular files under the roots by sha256(seed:path), then take
    consecutive slices filling each named byte budget. Keying each file by its
    own hash (rather than shuffling the list) keeps the choice stable when a
    few files appear in or vanish from /usr: only those files move. Python
    byte-code caches (__pycache__, *.pyc), which come and go, are skipped.
    Lists are NUL-separated paths relative to / (for `tar -C / --null -T
    LIST`), sorted within a list."""
    budgets = []
    for spec in a.budget:
        name, _, val = spec.partition("=")
        budgets.append((name, int(val)))
    seen, pool = set(), []
    for root in a.roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fn in filenames:
                if fn.endswith(".pyc"):
                    continue
                p = os.path.join(dirpath, fn)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size > a.max_file_bytes:
                    continue
                if (st.st_dev, st.st_ino) in seen or not os.access(p, os.R_OK):
                    continue  # hard link already taken / unreadable
                if "\n" in p:
                    continue
                seen.add((st.st_dev, st.st_ino))
                pool.append((p, st.st_size))
    pool.sort(key=lambda e: hashlib.sha256(("%s:%s" % (a.seed, e[0])).encode()).digest())
    it = iter(pool)
    os.makedirs(a.outdir, exist_ok=True)
    for name, budget in budgets:
        chosen, acc = [], 0
        for p, size in it:
            chosen.append(p)
            acc += size
            if acc >= budget:
                break
        if acc < budget:
            sys.exit("pick: /usr pool exhausted while filling %s (%d < %d bytes)"
                     % (name, acc, budget))
        chosen.sort()
        with open(os.path.join(a.outdir, name + ".list"), "wb") as f:
            for p in chosen:
                f.write(p.lstrip("/").encode() + b"\0")
        print("%s files=%d bytes=%d" % (name, len(chosen), acc))


def cmd_random_files(a):
    r = rng(a.seed, "sizes")
    sizes = log_uniform_sizes(r, a.total, a.min, a.max)
    for i, size in enumerate(sizes):
        name = "%s%05d%s" % (a.prefix, i, a.ext)
        write_random(nested_path(a.dir, i, a.per_dir, name), size, rng(a.seed, i))
    print("files=%d bytes=%d" % (len(sizes), sum(sizes)))


def cmd_random_file(a):
    d = os.path.dirname(a.path)
    if d:
        os.makedirs(d, exist_ok=True)
    write_random(a.path, a.size, rng(a.seed, "file"))


def cmd_text_files(a):
    r = rng(a.seed, "sizes")
    gen = TextGen(rng(a.seed, "text"))
    sizes = log_uniform_sizes(r, a.total, a.min, a.max)
    kinds = [("log", ".log"), ("csv", ".csv"), ("json", ".jsonl")]
    for i, size in enumerate(sizes):
        kind, ext = kinds[i % 3]
        path = nested_path(a.dir, i, a.per_dir, "%s%05d%s" % (a.prefix, i, ext))
        write_text(path, size, gen, kind)
    print("files=%d bytes=%d" % (len(sizes), sum(sizes)))


def db_page(r, gen, pageno, psize=8192):
    """One page of a fake B-tree/heap database file."""
    kind = r.random()
    if kind < 0.12:
        return bytes(psize)  # free page
    if kind < 0.22:
        return r.randbytes(psize)  # compressed blob/TOAST page
    if kind < 0.37:  # index page: sorted keys + child pointers
        n = (psize - 16) // 12
        base = r.getrandbits(40)
        keys = sorted(base + r.getrandbits(20) for _ in range(n))
        body = b"".join(struct.pack("<QI", k, r.getrandbits(24)) for k in keys)
        return (struct.pack("<IHHQ", pageno, 2, n, base) + body).ljust(psize, b"\0")
    # heap page: header + variable records, free space left as zeros
    recs, used = [], 16
    fill = r.randint(psize // 2, psize - 64)
    while used < fill:
        words = " ".join(gen.pick(r.randint(1, 8))).encode()
        rec = struct.pack("<QIdH", r.getrandbits(48), r.getrandbits(31),
                          r.random() * 1e4, len(words)) + words
        if used + len(rec) > psize:
            break
        recs.append(rec)
        used += len(rec)
    body = b"".join(recs)
    return (struct.pack("<IHHQ", pageno, 1, len(recs), r.getrandbits(64)) + body).ljust(psize, b"\0")


def cmd_db_file(a):
    r = rng(a.seed, "db")
    gen = TextGen(rng(a.seed, "dbtext"), vocab=3000)
    d = os.path.dirname(a.path)
    if d:
        os.makedirs(d, exist_ok=True)
    npages = a.size // 8192
    with open(a.path, "wb") as f:
        buf = []
        for p in range(npages):
            buf.append(db_page(r, gen, p))
            if len(buf) == 512:
                f.write(b"".join(buf))
                buf = []
        f.write(b"".join(buf))


def looks_textual(b):
    if not b:
        return True
    printable = sum(1 for c in b[:4096] if 32 <= c < 127 or c in (9, 10, 13))
    return printable >= 0.9 * min(len(b), 4096)


def unescape_sha256sum(name):
    """Undo sha256sum's escaping of "\\" and newline in file names."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), name)


def cmd_mutate(a):
    """Deterministically turn the mounted copy of v1 at a.root into v2.

    Files come from the v1 manifest (sorted by path). Every a.every-th file is
    selected; the j-th selected file gets, by j % 10:
      3      -> deleted
      7      -> appended to (16..64 KiB, like a growing log)
      other  -> files >= 128 KiB: a 64 KiB, 4 KiB-aligned region in the middle
                is overwritten in place (like `dd conv=notrunc`);
                smaller files: rewritten through a temp file + rename (as
                editors do), with a region of up to 4 KiB changed.
    A database-like file (a.db, if present) gets a.db_pages scattered 8 KiB page
    rewrites. New files: real /usr files from the spare list, a few new text
    files and one new random "media" file.
    """
    files = []
    with open(a.manifest) as f:
        for line in f:
            digest, path = line.rstrip("\n").split("  ", 1)
            if digest.startswith("\\"):  # sha256sum escaped the name
                path = unescape_sha256sum(path)
            files.append(path)
    files.sort()
    root = a.root
    st = {k: 0 for k in ("selected", "modified_inplace", "rewritten", "appended",
                         "deleted", "added", "bytes_inplace", "bytes_rewritten",
                         "bytes_appended", "bytes_deleted", "bytes_added", "db_pages")}
    data_bytes = sum(os.path.getsize(os.path.join(root, p)) for p in files)
    changes = open(a.log, "w")

    def note(op, path, off, length):
        changes.write("%s\t%s\t%d\t%d\n" % (op, path, off, length))

    def new_bytes(path, old, n, tag):
        r = rng(a.seed, tag, path)
        if looks_textual(old):
            return TextGen(r, vocab=500).text(n, "log")
        return r.randbytes(n)

    j = -1
    for i, rel in enumerate(files):
        if i % a.every != a.every // 2:
            continue
        j += 1
        st["selected"] += 1
        path = os.path.join(root, rel)
        size = os.path.getsize(path)
        mode = j % 10
        if mode == 3:
            os.unlink(path)
            st["deleted"] += 1
            st["bytes_deleted"] += size
            note("delete", rel, 0, size)
        elif mode == 7:
            with open(path, "rb") as f:
                f.seek(max(0, size - 4096))
                tail = f.read()
            n = rng(a.seed, "applen", rel).randint(16 << 10, 64 << 10)
            with open(path, "ab") as f:
                f.write(new_bytes(rel, tail, n, "append"))
            st["appended"] += 1
            st["bytes_appended"] += n
            note("append", rel, size, n)
        elif size >= 128 << 10:
            n = 64 << 10
            off = (size // 2 - n // 2) & ~4095
            with open(path, "r+b") as f:
                f.seek(off)
                old = f.read(n)
                f.seek(off)
                f.write(new_bytes(rel, old, n, "inplace"))
            st["modified_inplace"] += 1
            st["bytes_inplace"] += n
            note("inplace", rel, off, n)
        else:
            with open(path, "rb") as f:
                data = bytearray(f.read())
            n = min(4096, max(len(data) // 4, 64))
            off = max(0, len(data) // 2 - n // 2)
            data[off:off + n] = new_bytes(rel, bytes(data[off:off + n]), n, "rewrite")
            tmp = path + ".vbtmp"
            with open(tmp, "wb") as f:
                f.write(data)
            shutil.copystat(path, tmp)
            os.rename(tmp, path)
            st["rewritten"] += 1
            st["bytes_rewritten"] += len(data)
            note("rewrite", rel, off, len(data))

    # database-like file: scattered page updates
    dbp = os.path.join(root, a.db) if a.db else None
    if dbp and os.path.exists(dbp):
        npages = os.path.getsize(dbp) // 8192
        r = rng(a.seed, "dbpages")
        gen = TextGen(rng(a.seed, "dbtext2"), vocab=3000)
        with open(dbp, "r+b") as f:
            for pno in sorted(r.sample(range(npages), min(a.db_pages, npages))):
                f.seek(pno * 8192)
                f.write(db_page(r, gen, pno))
                st["db_pages"] += 1
                note("dbpage", a.db, pno * 8192, 8192)
        st["bytes_inplace"] += st["db_pages"] * 8192

    # new files: real files from the spare list
    newroot = os.path.join(root, "new")
    os.makedirs(newroot, exist_ok=True)
    acc = 0
    if a.spare:
        with open(a.spare, "rb") as f:
            spare = [p.decode() for p in f.read().split(b"\0") if p]
        max_files = max(1, len(files) // 400)  # keep new files ~0.25% by count
        for p in spare[:max_files]:
            if acc >= a.new_copy_bytes:
                break
            dst = os.path.join(newroot, "import", p)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile("/" + p, dst)
            n = os.path.getsize(dst)
            acc += n
            st["added"] += 1
            note("add", os.path.relpath(dst, root), 0, n)
    # new text files
    gen = TextGen(rng(a.seed, "newtext"))
    for k in range(a.new_text_files):
        rel = "new/logs/app-%03d.log" % k
        n = rng(a.seed, "newtextlen", k).randint(16 << 10, 256 << 10)
        os.makedirs(os.path.join(root, "new/logs"), exist_ok=True)
        write_text(os.path.join(root, rel), n, gen, "log")
        acc += n
        st["added"] += 1
        note("add", rel, 0, n)
    # one new incompressible file
    if a.new_random_bytes:
        rel = "new/media/import-0001.mp4"
        os.makedirs(os.path.join(root, "new/media"), exist_ok=True)
        write_random(os.path.join(root, rel), a.new_random_bytes, rng(a.seed, "newmedia"))
        acc += a.new_random_bytes
        st["added"] += 1
        note("add", rel, 0, a.new_random_bytes)
    st["bytes_added"] = acc
    changes.close()

    changed = (st["bytes_inplace"] + st["bytes_rewritten"] + st["bytes_appended"]
               + st["bytes_added"])
    out = {"v1_files": len(files), "v1_file_bytes": data_bytes}
    out.update({"files_" + k: v for k, v in st.items() if not k.startswith("bytes_")})
    out.update({k: v for k, v in st.items() if k.startswith("bytes_")})
    out["bytes_changed_total"] = changed
    out["pct_files_touched"] = round(100.0 * (st["selected"] + st["added"]) / len(files), 3)
    out["pct_bytes_changed"] = round(100.0 * changed / data_bytes, 3)
    for k, v in out.items():
        print("%s %s" % (k, v))


def cmd_freescan(a):
    """Parse `dumpe2fs` free-block ranges and count non-zero blocks there."""
    txt = subprocess.run(["dumpe2fs", a.image], check=True, capture_output=True,
                         text=True).stdout
    bs = int(re.search(r"^Block size:\s+(\d+)", txt, re.M).group(1))
    count = int(re.search(r"^Block count:\s+(\d+)", txt, re.M).group(1))
    ranges = []
    for m in re.finditer(r"^\s+Free blocks: (.*)$", txt, re.M):
        for part in m.group(1).split(","):
            part = part.strip()
            if not part:
                continue
            lo, _, hi = part.partition("-")
            ranges.append((int(lo), int(hi or lo)))
    zero = bytes(bs)
    free = nonzero = 0
    with open(a.image, "rb") as f:
        for lo, hi in ranges:
            f.seek(lo * bs)
            left = hi - lo + 1
            free += left
            while left:
                n = min(left, CHUNK // bs)
                buf = f.read(n * bs)
                for k in range(0, len(buf), bs):
                    if buf[k:k + bs] != zero:
                        nonzero += 1
                left -= n
    print("block_size %d" % bs)
    print("block_count %d" % count)
    print("fs_used_bytes %d" % ((count - free) * bs))
    print("fs_free_bytes %d" % (free * bs))
    print("free_nonzero_bytes %d" % (nonzero * bs))


def cmd_blockdiff(a):
    """Bytes of 4 KiB blocks that differ between two equally sized images."""
    bs, diff = 4096, 0
    with open(a.a, "rb") as fa, open(a.b, "rb") as fb:
        while True:
            ba, bb = fa.read(CHUNK), fb.read(CHUNK)
            if not ba and not bb:
                break
            if ba != bb:
                for k in range(0, max(len(ba), len(bb)), bs):
                    if ba[k:k + bs] != bb[k:k + bs]:
                        diff += 1
    print("blocks_differing_from_v1_bytes %d" % (diff * bs))


def cmd_restic_summary(a):
    """Key fields of the summary message of `restic backup --json` output."""
    summary = None
    with open(a.file) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{") and '"summary"' in line:
                msg = json.loads(line)
                if msg.get("message_type") == "summary":
                    summary = msg
    if summary is None:
        sys.exit("restic-summary: no summary message in %s" % a.file)
    for k in ("snapshot_id", "data_added", "total_bytes_processed", "data_blobs",
              "tree_blobs", "total_duration"):
        if k in summary:
            print("%s %s" % (k, summary[k]))


def parse_value(v):
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if re.fullmatch(r"-?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", v):
        return float(v)
    if v in ("true", "false"):
        return v == "true"
    return v


def cmd_kv2json(a):
    """`key value` lines -> nested JSON ("a.b.c 1" -> {"a":{"b":{"c":1}}}).
    Later lines win; blank lines and lines starting with # are ignored."""
    obj = {}
    for fn in a.inputs:
        with open(fn) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip() or line.startswith("#"):
                    continue
                key, _, val = line.partition(" ")
                node = obj
                parts = key.split(".")
                for p in parts[:-1]:
                    nxt = node.get(p)
                    if not isinstance(nxt, dict):
                        nxt = node[p] = {}
                    node = nxt
                node[parts[-1]] = parse_value(val.strip())
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    if a.output == "-":
        sys.stdout.write(text)
    else:
        tmp = a.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.output)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("pick")
    p.add_argument("--seed", required=True)
    p.add_argument("--outdir", required=True)
    p.add_argument("--max-file-bytes", type=int, default=32 * MIB)
    p.add_argument("--budget", action="append", required=True, help="NAME=BYTES (ordered)")
    p.add_argument("roots", nargs="+")
    p.set_defaults(fn=cmd_pick)

    for name, fn in (("random-files", cmd_random_files), ("text-files", cmd_text_files)):
        p = sub.add_parser(name)
        p.add_argument("dir")
        p.add_argument("--seed", required=True)
        p.add_argument("--total", type=int, required=True)
        p.add_argument("--min", type=int, required=True)
        p.add_argument("--max", type=int, required=True)
        p.add_argument("--prefix", default="f")
        p.add_argument("--ext", default=".bin")
        p.add_argument("--per-dir", type=int, default=100)
        p.set_defaults(fn=fn)

    for name, fn in (("random-file", cmd_random_file), ("db-file", cmd_db_file)):
        p = sub.add_parser(name)
        p.add_argument("path")
        p.add_argument("--seed", required=True)
        p.add_argument("--size", type=int, required=True)
        p.set_defaults(fn=fn)

    p = sub.add_parser("mutate")
    p.add_argument("root")
    p.add_argument("--manifest", required=True)
    p.add_argument("--seed", required=True)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--spare")
    p.add_argument("--new-copy-bytes", type=int, default=0)
    p.add_argument("--new-text-files", type=int, default=0)
    p.add_argument("--new-random-bytes", type=int, default=0)
    p.add_argument("--db", help="path (relative to root) of the database-like file")
    p.add_argument("--db-pages", type=int, default=32)
    p.add_argument("--log", required=True, help="TSV log of every change")
    p.set_defaults(fn=cmd_mutate)

    p = sub.add_parser("freescan")
    p.add_argument("image")
    p.set_defaults(fn=cmd_freescan)

    p = sub.add_parser("blockdiff")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(fn=cmd_blockdiff)

    p = sub.add_parser("restic-summary")
    p.add_argument("file")
    p.set_defaults(fn=cmd_restic_summary)

    p = sub.add_parser("kv2json")
    p.add_argument("-o", "--output", default="-")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(fn=cmd_kv2json)

    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
