//! XFS and btrfs allocation maps against real filesystems: `mkfs` on a loop device, files
//! written through a mount, part of them deleted (their bytes stay behind in free space), a
//! backup of the device, a restore to a file, `xfs_repair -n` / `btrfs check` on it, every
//! file compared through a read-only mount, and the deleted residue neither read nor stored.
//! Then the cases that must fall back to reading every block, with a warning saying why.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::Path;

fn file_content(rng: &mut Rng, len: usize) -> Vec<u8> {
    if rng.below(2) == 0 {
        rng.bytes(len)
    } else {
        rng.text(len)
    }
}

/// Writes files of mixed sizes, flushes them to the device, then deletes the big random
/// "doomed" files and every fifth small one. Returns the bytes of random data deleted.
fn populate_and_delete(root: &Path, rng: &mut Rng) -> u64 {
    let mut small = Vec::new();
    for d in 0..4 {
        std::fs::create_dir_all(root.join(format!("dir{d}/sub"))).unwrap();
    }
    for i in 0..160 {
        let len = match rng.below(10) {
            0 => 0,
            1..=6 => rng.below(12 * KIB) as usize,
            _ => (12 * KIB + rng.below(180 * KIB)) as usize,
        };
        let sub = if i % 3 == 0 { "/sub" } else { "" };
        let path = root.join(format!("dir{}{sub}/f{i:03}.dat", i % 4));
        std::fs::write(&path, file_content(rng, len)).unwrap();
        small.push(path);
    }
    std::fs::write(root.join("big-random.bin"), rng.bytes(3 * MIB as usize + 5)).unwrap();
    std::fs::write(root.join("big-text.txt"), rng.text(2 * MIB as usize + 11)).unwrap();
    let doomed_len = 6 * MIB;
    let doomed: Vec<_> = (0..10)
        .map(|i| {
            let p = root.join(format!("doomed{i}.bin"));
            std::fs::write(&p, rng.bytes(doomed_len as usize)).unwrap();
            p
        })
        .collect();
    // Allocate and write everything before deleting, so that the residue reaches the disk.
    run_ok("sync", &["-f", p(root)]);
    for f in doomed.iter().chain(small.iter().step_by(5)) {
        std::fs::remove_file(f).unwrap();
    }
    run_ok("sync", &["-f", p(root)]);
    doomed_len * doomed.len() as u64
}

fn blkid(dev: &Path, tag: &str) -> String {
    run_ok("blkid", &["-p", "-o", "value", "-s", tag, p(dev)])
        .stdout
        .trim()
        .to_string()
}

/// One filesystem to put through the round trip.
struct Case<'a> {
    fs_type: &'static str,
    size: u64,
    mkfs: &'a [&'a str],
    /// Options for mounting the source read-write.
    mount_opts: Option<&'a str>,
    /// Options for mounting the restored image.
    restored_opts: &'a str,
    check: &'a [&'a str],
}

fn round_trip(case: &Case, seed: u64) {
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    sparse_file(&img, case.size);
    init_repo(&repo, &[]);
    let lo = Loop::attach(&img, false);
    let mut mkfs = case.mkfs.to_vec();
    mkfs.extend(["-L", "vb-map", p(&lo.dev)]);
    run_ok(mkfs[0], &mkfs[1..]);

    let m = Mount::new(&lo.dev, &t.join("mnt"), case.mount_opts);
    let deleted = populate_and_delete(&m.dir, &mut Rng::new(seed));
    let files = tree_hashes(&m.dir);
    m.unmount();
    assert!(files.len() > 100, "{} files", files.len());

    let r = volback_ok(&["backup", "--json", p(&lo.dev), p(&repo)]);
    assert!(
        !r.stderr.contains("warning"),
        "{}: unexpected warning: {}",
        case.fs_type,
        r.stderr
    );
    let d = r.json();
    assert_eq!(d["all_blocks"], false, "{d}");
    assert_eq!(d["filesystem"]["type"], case.fs_type, "{d}");
    assert_eq!(jstr(&d, "/filesystem/uuid"), blkid(&lo.dev, "UUID"), "{d}");
    assert_eq!(d["filesystem"]["label"], "vb-map", "{d}");
    assert_eq!(ju64(&d, "/filesystem/size"), case.size, "{d}");
    let used = ju64(&d, "/filesystem/used_bytes");
    let stored = ju64(&d, "/new_bytes");
    let read = ju64(&d, "/bytes_read");
    eprintln!(
        "{}: used {used}, read {read}, stored {stored}, deleted {deleted}",
        case.fs_type
    );
    // What is stored is what the filesystem uses plus whole blocks (of the repository's
    // block size) around what it uses: at most two partial blocks per file or directory
    // wherever the filesystem put them, and 12 MiB for its metadata. (That the residue of
    // the deleted files is not stored is checked below, against a backup of every block.)
    let rounding = (files.len() as u64 + 8) * 2 * repo_block_size(&repo);
    assert!(
        stored <= used + rounding + 12 * MIB,
        "{}: stored {stored} bytes for {used} used: {d}",
        case.fs_type
    );
    assert!(
        stored + 12 * MIB >= used,
        "{}: stored too little: {d}",
        case.fs_type
    );
    // The residue is there: a backup of every block stores it.
    let all = backup_json(&lo.dev, &repo, &["--all-blocks"]);
    eprintln!(
        "{}: every block stores {} more",
        case.fs_type,
        ju64(&all, "/new_bytes")
    );
    assert!(
        ju64(&all, "/new_bytes") >= deleted * 3 / 4,
        "{}: the deleted files left no residue to skip: {all}",
        case.fs_type
    );
    // btrfs refuses a second device with the same fsid while this one is known: detach it.
    drop(lo);

    let out = t.join("restored.img");
    restore(&repo, jstr(&d, "/snapshot"), &out);
    let mut check = case.check.to_vec();
    check.push(p(&out));
    run_ok(check[0], &check[1..]);
    let rlo = Loop::attach(&out, true);
    let m = Mount::new(&rlo.dev, &t.join("restored"), Some(case.restored_opts));
    let got = tree_hashes(&m.dir);
    m.unmount();
    assert_same_files(case.fs_type, &files, &got);
}

fn assert_same_files(what: &str, want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
    assert_eq!(got.len(), want.len(), "{what}: number of files");
    for (f, h) in want {
        assert_eq!(
            got.get(f),
            Some(h),
            "{what}: file {f} differs or is missing"
        );
    }
}

#[test]
fn xfs_backup_reads_only_allocated_blocks_and_restores_a_clean_filesystem() {
    if !require_root_and_loop() {
        return;
    }
    round_trip(
        &Case {
            fs_type: "xfs",
            size: 320 * MIB,
            // 4 KiB sectors: the AGF and log records sit on 4 KiB boundaries.
            mkfs: &["mkfs.xfs", "-q", "-f", "-s", "size=4096"],
            mount_opts: None,
            restored_opts: "ro,norecovery,nouuid",
            check: &["xfs_repair", "-n"],
        },
        40,
    );
}

#[test]
fn btrfs_backup_reads_only_allocated_blocks_and_restores_a_clean_filesystem() {
    if !require_root_and_loop() {
        return;
    }
    // DUP metadata (the default on one device): both copies are kept. `nodiscard`: the
    // deleted files' bytes must stay on the device for the residue check.
    round_trip(
        &Case {
            fs_type: "btrfs",
            size: 192 * MIB,
            mkfs: &["mkfs.btrfs", "-q", "-f", "-m", "dup", "-d", "single"],
            mount_opts: Some("nodiscard"),
            restored_opts: "ro",
            check: &["btrfs", "check", "--readonly"],
        },
        41,
    );
}

#[test]
fn btrfs_with_single_metadata_and_xxhash_checksums() {
    if !require_root_and_loop() {
        return;
    }
    round_trip(
        &Case {
            fs_type: "btrfs",
            size: 160 * MIB,
            mkfs: &["mkfs.btrfs", "-q", "-f", "-m", "single", "--csum", "xxhash"],
            mount_opts: Some("nodiscard"),
            restored_opts: "ro",
            check: &["btrfs", "check", "--readonly"],
        },
        42,
    );
}

#[test]
fn btrfs_with_sha256_checksums() {
    if !require_root_and_loop() {
        return;
    }
    round_trip(
        &Case {
            fs_type: "btrfs",
            size: 160 * MIB,
            mkfs: &["mkfs.btrfs", "-q", "-f", "--csum", "sha256"],
            mount_opts: Some("nodiscard"),
            restored_opts: "ro",
            check: &["btrfs", "check", "--readonly"],
        },
        45,
    );
}

/// XFS v4 (no CRCs): this kernel no longer mounts it, so files go in through a `mkfs.xfs`
/// prototype file; the restored image must equal the source byte for byte (mkfs never wrote
/// its free space).
#[test]
fn xfs_v4_populated_by_mkfs_restores_bit_exact() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("src");
    let mut rng = Rng::new(43);
    let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\n");
    for d in 0..3 {
        std::fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        proto += &format!("d{d} d--755 0 0\n");
        for i in 0..20 {
            let path = src.join(format!("d{d}/f{i}"));
            let len = rng.below(300 * KIB) as usize;
            std::fs::write(&path, file_content(&mut rng, len)).unwrap();
            proto += &format!("f{i} ---644 0 0 {}\n", p(&path));
        }
        proto += "$\n";
    }
    proto += "$\n";
    let proto_file = t.join("proto");
    std::fs::write(&proto_file, proto).unwrap();

    let img = t.join("v4.img");
    sparse_file(&img, 320 * MIB);
    let lo = Loop::attach(&img, false);
    run_ok(
        "mkfs.xfs",
        &["-q", "-f", "-m", "crc=0", "-p", p(&proto_file), p(&lo.dev)],
    );
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let r = volback_ok(&["backup", "--json", p(&lo.dev), p(&repo)]);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let d = r.json();
    assert_eq!(d["all_blocks"], false, "{d}");
    assert_eq!(d["filesystem"]["type"], "xfs", "{d}");
    assert!(ju64(&d, "/bytes_read") < 96 * MIB, "read too much: {d}");
    drop(lo);
    let out = t.join("restored.img");
    restore(&repo, "latest", &out);
    assert_eq!(
        sha256_file(&out),
        sha256_file(&img),
        "restored image differs"
    );
    run_ok("xfs_repair", &["-n", p(&out)]);
}

/// XFS with an external log and a realtime device: the data device is mapped (the log needs
/// nothing), with a warning that the realtime data lives elsewhere.
#[test]
fn xfs_with_external_log_and_realtime_device() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let files: Vec<_> = ["data", "log", "rt"]
        .iter()
        .map(|n| {
            let f = t.join(&format!("{n}.img"));
            sparse_file(&f, if *n == "data" { 320 } else { 64 } * MIB);
            f
        })
        .collect();
    let (data, log, rt) = (
        Loop::attach(&files[0], false),
        Loop::attach(&files[1], false),
        Loop::attach(&files[2], false),
    );
    let logdev = format!("logdev={}", p(&log.dev));
    let rtdev = format!("rtdev={}", p(&rt.dev));
    run_ok(
        "mkfs.xfs",
        &["-q", "-f", "-l", &logdev, "-r", &rtdev, p(&data.dev)],
    );
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let r = volback_ok(&["backup", "--json", p(&data.dev), p(&repo)]);
    r.stderr_has(&["warning", "realtime", "separately"]);
    let d = r.json();
    assert_eq!(d["all_blocks"], false, "{d}");
    assert!(ju64(&d, "/bytes_read") < 32 * MIB, "read too much: {d}");
    let out = t.join("restored.img");
    restore(&repo, "latest", &out);
    run_ok(
        "xfs_repair",
        &["-n", "-l", p(&log.dev), "-r", p(&rt.dev), p(&out)],
    );
}

#[test]
fn damaged_or_multi_device_filesystems_fall_back_to_every_block() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);

    // XFS whose first AGF is overwritten.
    let img = t.join("xfs.img");
    sparse_file(&img, 320 * MIB);
    run_ok("mkfs.xfs", &["-q", "-f", "-s", "size=512", p(&img)]);
    write_at(&img, 512, b"garbage!");
    let r = volback_ok(&["backup", "--json", p(&img), p(&repo)]);
    r.stderr_has(&[
        "warning",
        "xfs allocation data is unusable",
        "AGF of AG 0",
        "every block",
    ]);
    assert_eq!(r.json()["all_blocks"], true);

    // XFS shut down without unmounting cleanly: the log holds allocations the free-space
    // trees do not show. Every block is kept, and the restored copy replays its log.
    let img = t.join("dirty.img");
    sparse_file(&img, 320 * MIB);
    run_ok("mkfs.xfs", &["-q", "-f", p(&img)]);
    let files = {
        let lo = Loop::attach(&img, false);
        let m = Mount::new(&lo.dev, &t.join("dirty"), None);
        let mut rng = Rng::new(44);
        for i in 0..20 {
            std::fs::write(m.dir.join(format!("f{i}")), rng.bytes(300 * KIB as usize)).unwrap();
        }
        run_ok("sync", &["-f", p(&m.dir)]);
        let files = tree_hashes(&m.dir);
        run_ok("xfs_io", &["-x", "-c", "shutdown", p(&m.dir)]);
        m.unmount();
        files
    };
    let r = volback_ok(&["backup", "--json", p(&img), p(&repo)]);
    r.stderr_has(&[
        "warning",
        "xfs allocation data is unusable",
        "log needs recovery",
    ]);
    let d = r.json();
    assert_eq!(d["all_blocks"], true, "{d}");
    let out = t.join("dirty-restored.img");
    restore(&repo, jstr(&d, "/snapshot"), &out);
    let rlo = Loop::attach(&out, false);
    let m = Mount::new(&rlo.dev, &t.join("dirty-restored"), None);
    let got = tree_hashes(&m.dir);
    m.unmount();
    assert_same_files("xfs after log recovery", &files, &got);
    drop(rlo);
    run_ok("xfs_repair", &["-n", p(&out)]);

    // btrfs over two devices.
    let files: Vec<_> = (0..2)
        .map(|i| {
            let f = t.join(&format!("btrfs{i}.img"));
            sparse_file(&f, 128 * MIB);
            f
        })
        .collect();
    let (a, b) = (
        Loop::attach(&files[0], false),
        Loop::attach(&files[1], false),
    );
    run_ok(
        "mkfs.btrfs",
        &[
            "-q",
            "-f",
            "-d",
            "single",
            "-m",
            "single",
            p(&a.dev),
            p(&b.dev),
        ],
    );
    let r = volback_ok(&["backup", "--json", p(&a.dev), p(&repo)]);
    r.stderr_has(&[
        "warning",
        "btrfs allocation data is unusable",
        "spans 2 devices",
    ]);
    let d = r.json();
    assert_eq!(d["all_blocks"], true, "{d}");
    assert_eq!(d["filesystem"]["type"], "btrfs", "{d}");

    // btrfs whose extent tree root (SINGLE metadata: one copy) is damaged.
    let img = t.join("btrfs1.img");
    sparse_file(&img, 128 * MIB);
    run_ok("mkfs.btrfs", &["-q", "-f", "-m", "single", p(&img)]);
    let dump = run_ok(
        "btrfs",
        &["inspect-internal", "dump-tree", "-t", "extent", p(&img)],
    );
    let root: u64 = dump
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("leaf ").or_else(|| l.strip_prefix("node ")))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no extent tree root in {}", dump.stdout));
    let phys = btrfs_physical(&img, root);
    write_at(&img, phys + 200, b"\xFF\x00\xFF\x00");
    let r = volback_ok(&["backup", "--json", p(&img), p(&repo)]);
    r.stderr_has(&[
        "warning",
        "btrfs allocation data is unusable",
        "checksum mismatch",
    ]);
    assert_eq!(r.json()["all_blocks"], true);
}

/// The physical offset of logical address `logical` in a single-device btrfs image with
/// SINGLE metadata, from the chunk tree `btrfs inspect-internal dump-tree -t chunk` prints.
fn btrfs_physical(img: &Path, logical: u64) -> u64 {
    let dump = run_ok(
        "btrfs",
        &["inspect-internal", "dump-tree", "-t", "chunk", p(img)],
    );
    // "item 2 key (FIRST_CHUNK_TREE CHUNK_ITEM 30408704) itemoff … itemsize …"
    // "        length 67108864 owner 2 stripe_len 65536 type METADATA"
    // "            stripe 0 devid 1 offset 30408704"
    let mut start = None;
    let mut length = None;
    for line in dump.stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "CHUNK_ITEM") {
            start = words
                .get(i + 1)
                .and_then(|w| w.trim_end_matches(')').parse::<u64>().ok());
            length = None;
        } else if words.first() == Some(&"length") {
            length = words.get(1).and_then(|w| w.parse::<u64>().ok());
        } else if words.first() == Some(&"stripe")
            && let (Some(s), Some(l)) = (start, length)
            && (s..s + l).contains(&logical)
        {
            let off: u64 = words[5].parse().unwrap();
            return off + (logical - s);
        }
    }
    panic!("logical {logical} is in no chunk:\n{}", dump.stdout);
}
