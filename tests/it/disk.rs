//! Whole partitioned disks: a GPT disk and an MBR disk with an extended partition holding
//! several logical partitions, each with ext filesystems (filled, then partly deleted so that
//! residue stays in free blocks), a partition of unknown content, boot-loader bytes in the gap
//! before the first partition and junk in gaps between partitions.
//!
//! After backup and restore: the partition table and every byte outside the filesystems are
//! identical; every filesystem passes `e2fsck -fn` and its files match; inside a filesystem,
//! each 4 KiB block is either the source's or zero, and zero only where `e2image -ra` (the
//! independent judge of "used") also leaves it out. The residue is not stored.

use crate::util::*;
use std::path::Path;

const SECTOR: u64 = 512;

/// A partition of a test disk.
struct Part {
    start: u64,
    size: u64,
    /// "ext4", "ext2" or "" (unknown content: random bytes).
    fs: &'static str,
}

impl Part {
    fn mount_options(&self, ro: bool) -> String {
        format!(
            "loop,offset={},sizelimit={}{}",
            self.start,
            self.size,
            if ro { ",ro,noload" } else { "" }
        )
    }
}

fn mib(n: u64) -> u64 {
    n * MIB
}

/// Builds a disk image: table from `script`, filesystems in `parts` (each filled, then part of
/// its data deleted so that residue stays in free blocks), boot code and gap junk.
fn build_disk(disk: &Path, size: u64, script: &str, parts: &[Part], rng: &mut Rng, dir: &TestDir) {
    sparse_file(disk, size);
    run_stdin_ok(
        "sfdisk",
        &["-q", "--no-reread", "--no-tell-kernel", p(disk)],
        script.as_bytes(),
    );
    // Boot code in the MBR (bytes 0..440) and a "boot loader" in the gap before the first
    // partition, after the table sectors (GPT entries end at LBA 33).
    write_at(disk, 0, &rng.bytes(440));
    write_at(
        disk,
        40 * SECTOR,
        &rng.bytes(((2048 - 40) * SECTOR) as usize),
    );
    for (i, part) in parts.iter().enumerate() {
        match part.fs {
            "" => {
                write_at(disk, part.start, &rng.bytes(mib(1) as usize + 4321));
            }
            fs => {
                run_ok(
                    &format!("mkfs.{fs}"),
                    &[
                        "-q",
                        "-F",
                        "-b",
                        "4096",
                        "-E",
                        &format!(
                            "offset={},lazy_itable_init=0,lazy_journal_init=0",
                            part.start
                        ),
                        p(disk),
                        &format!("{}k", part.size / 1024),
                    ],
                );
                let mnt = dir.join(&format!("fill{i}"));
                let m = Mount::new(disk, &mnt, Some(&part.mount_options(false)));
                for f in 0..24 {
                    let len = (rng.below(300) * KIB) as usize + 17;
                    std::fs::write(mnt.join(format!("file{f:02}.bin")), rng.bytes(len)).unwrap();
                }
                std::fs::create_dir_all(mnt.join("docs")).unwrap();
                for f in 0..30 {
                    let len = rng.below(20 * KIB) as usize;
                    std::fs::write(mnt.join(format!("docs/note{f}.txt")), rng.text(len)).unwrap();
                }
                // Residue: random data written, synced, then deleted.
                std::fs::write(mnt.join("residue.bin"), rng.bytes((part.size / 4) as usize))
                    .unwrap();
                run_ok("sync", &[]);
                std::fs::remove_file(mnt.join("residue.bin")).unwrap();
                m.unmount();
            }
        }
    }
}

/// The bytes `[start, start+len)` of `file`.
fn read_range(file: &Path, start: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, start).unwrap();
    buf
}

/// Copies a byte range of `disk` into its own file.
fn extract(disk: &Path, start: u64, len: u64, out: &Path) {
    std::fs::write(out, read_range(disk, start, len)).unwrap();
}

/// Checks one restored disk against its source, partition by partition.
fn check_restored(source: &Path, restored: &Path, parts: &[Part], dir: &TestDir) {
    let size = std::fs::metadata(source).unwrap().len();
    assert_eq!(std::fs::metadata(restored).unwrap().len(), size);
    let dump = |d: &Path| {
        run_ok("sfdisk", &["--dump", p(d)])
            .stdout
            .replace(p(d), "DISK")
    };
    assert_eq!(dump(restored), dump(source), "partition tables differ");

    // Everything outside the filesystems is identical (table areas, EBRs, gaps, unknown
    // partitions, the space after the last partition).
    let mut fs_ranges: Vec<(u64, u64)> = parts
        .iter()
        .filter(|p| !p.fs.is_empty())
        .map(|p| (p.start, p.start + p.size))
        .collect();
    fs_ranges.sort();
    let mut pos = 0;
    for &(s, e) in fs_ranges.iter().chain([(size, size)].iter()) {
        if s > pos {
            assert!(
                read_range(source, pos, s - pos) == read_range(restored, pos, s - pos),
                "bytes {pos}..{s} (outside the filesystems) differ"
            );
        }
        pos = e;
    }

    for (i, part) in parts.iter().enumerate().filter(|(_, p)| !p.fs.is_empty()) {
        let src = dir.join(&format!("src-part{i}.img"));
        let got = dir.join(&format!("restored-part{i}.img"));
        let judge = dir.join(&format!("e2image-part{i}.img"));
        extract(source, part.start, part.size, &src);
        extract(restored, part.start, part.size, &got);
        run_ok("e2fsck", &["-fn", p(&got)]);
        run_ok("e2image", &["-ra", p(&src), p(&judge)]);
        let (s, g, j) = (
            std::fs::read(&src).unwrap(),
            std::fs::read(&got).unwrap(),
            std::fs::read(&judge).unwrap(),
        );
        let mut dropped_used = 0;
        for b in 0..s.len() / 4096 {
            let r = b * 4096..(b + 1) * 4096;
            let zero = g[r.clone()].iter().all(|&x| x == 0);
            assert!(
                g[r.clone()] == s[r.clone()] || zero,
                "partition {i}: restored block {b} is neither the source's nor zeros"
            );
            if g[r.clone()] != s[r.clone()] && j[r.clone()] != g[r.clone()] {
                dropped_used += 1;
            }
        }
        assert_eq!(
            dropped_used, 0,
            "partition {i}: blocks that e2image keeps were not restored"
        );
        let m1 = Mount::new(&src, &dir.join(&format!("m-src{i}")), Some("loop,ro"));
        let m2 = Mount::new(&got, &dir.join(&format!("m-got{i}")), Some("loop,ro"));
        let (a, b) = (tree_hashes(&m1.dir), tree_hashes(&m2.dir));
        assert!(a.len() > 50, "partition {i}: only {} files", a.len());
        assert_eq!(a, b, "partition {i}: files differ after restore");
        m1.unmount();
        m2.unmount();
    }
}

fn backup_restore_check(disk: &Path, parts: &[Part], table: &str, dir: &TestDir) {
    let repo = dir.join("repo");
    init_repo(&repo, &[]);
    let r = backup_json(disk, &repo, &[]);
    assert_eq!(jstr(&r, "/layout/table"), table);
    let layout_parts = r["layout"]["partitions"].as_array().unwrap();
    for part in parts {
        let lp = layout_parts
            .iter()
            .find(|lp| lp["start"].as_u64() == Some(part.start))
            .unwrap_or_else(|| panic!("no partition at {} in {r}", part.start));
        if part.fs.is_empty() {
            assert_eq!(lp["all_blocks"], true, "{lp}");
        } else {
            assert_eq!(lp["filesystem"]["type"], part.fs, "{lp}");
            assert_eq!(lp["all_blocks"], false, "{lp}");
        }
    }
    // The residue (a quarter of each filesystem) is not stored.
    let fs_bytes: u64 = parts
        .iter()
        .filter(|p| !p.fs.is_empty())
        .map(|p| p.size)
        .sum();
    let disk_size = std::fs::metadata(disk).unwrap().len();
    let read = ju64(&r, "/bytes_read");
    assert!(
        read < disk_size - fs_bytes / 5,
        "read {read} of {disk_size} bytes: the residue was read"
    );
    assert!(ju64(&r, "/stats/unused_blocks") > 0);

    let restored = dir.join("restored.img");
    restore(&repo, "latest", &restored).expect_code(0);
    check_restored(disk, &restored, parts, dir);
    volback_ok(&["verify", p(&repo), "--read-data"]);

    // The same disk under another path is the same volume (found by the table's disk id).
    let moved = dir.join("moved.img");
    std::fs::rename(disk, &moved).unwrap();
    let r2 = backup_json(&moved, &repo, &[]);
    assert_eq!(jstr(&r2, "/parent"), jstr(&r, "/snapshot"));
    assert!(
        ju64(&r2, "/new_bytes") < MIB,
        "an unchanged disk stored {} new bytes",
        ju64(&r2, "/new_bytes")
    );
    std::fs::rename(&moved, disk).unwrap();
}

#[test]
fn gpt_disk_with_gaps_and_unknown_partition() {
    if !require_root_and_loop() {
        return;
    }
    let dir = TestDir::new();
    let disk = dir.join("gpt.img");
    let mut rng = Rng::new(0x6a7);
    // 1 MiB boot gap; ext4 20 MiB; unknown 6 MiB; a 1 MiB gap with junk; ext2 16 MiB; free
    // space to the end.
    let parts = [
        Part {
            start: mib(1),
            size: mib(20),
            fs: "ext4",
        },
        Part {
            start: mib(21),
            size: mib(6),
            fs: "",
        },
        Part {
            start: mib(28),
            size: mib(16),
            fs: "ext2",
        },
    ];
    let script = "label: gpt\n\
        start=2048, size=40960, type=L, name=root\n\
        start=43008, size=12288, type=L, name=raw\n\
        start=57344, size=32768, type=L, name=data\n";
    build_disk(&disk, mib(48), script, &parts, &mut rng, &dir);
    write_at(&disk, mib(27) + 12345, &rng.bytes(100_000));
    backup_restore_check(&disk, &parts, "gpt", &dir);
}

#[test]
fn mbr_disk_with_logical_partitions() {
    if !require_root_and_loop() {
        return;
    }
    let dir = TestDir::new();
    let disk = dir.join("mbr.img");
    let mut rng = Rng::new(0x3b7);
    // Primary ext4 at 1 MiB; extended from 21 MiB holding three logicals (ext4, unknown,
    // ext2), each preceded by its EBR.
    let parts = [
        Part {
            start: mib(1),
            size: mib(20),
            fs: "ext4",
        },
        Part {
            start: mib(22),
            size: mib(12),
            fs: "ext4",
        },
        Part {
            start: mib(35),
            size: mib(4),
            fs: "",
        },
        Part {
            start: mib(40),
            size: mib(12),
            fs: "ext2",
        },
    ];
    let script = "label: dos\n\
        start=2048, size=40960, type=83, bootable\n\
        start=43008, size=65536, type=5\n\
        start=45056, size=24576, type=83\n\
        start=71680, size=8192, type=83\n\
        start=81920, size=24576, type=83\n";
    build_disk(&disk, mib(56), script, &parts, &mut rng, &dir);
    backup_restore_check(&disk, &parts, "dos", &dir);
}

/// Change tracking works per partition: after a small change to one filesystem of a GPT disk,
/// the incremental takes the other files' blocks from the parent without reading them, and
/// the restore passes the same checks as a full one.
#[test]
fn gpt_disk_partitions_are_change_tracked() {
    if !require_root_and_loop() {
        return;
    }
    let dir = TestDir::new();
    let disk = dir.join("gpt.img");
    let mut rng = Rng::new(0x7ac);
    let parts = [
        Part {
            start: mib(1),
            size: mib(24),
            fs: "ext4",
        },
        Part {
            start: mib(25),
            size: mib(16),
            fs: "ext4",
        },
    ];
    let script = "label: gpt\n\
        start=2048, size=49152, type=L, name=one\n\
        start=51200, size=32768, type=L, name=two\n";
    build_disk(&disk, mib(44), script, &parts, &mut rng, &dir);
    // Files written a few seconds before the filesystems were last written are trusted.
    std::thread::sleep(std::time::Duration::from_secs(4));
    for (i, part) in parts.iter().enumerate() {
        let m = Mount::new(
            &disk,
            &dir.join(&format!("touch{i}")),
            Some(&part.mount_options(false)),
        );
        std::fs::write(m.dir.join("late.txt"), b"written last").unwrap();
        m.unmount();
    }
    let repo = dir.join("repo");
    init_repo(&repo, &[]);
    let full = backup_json(&disk, &repo, &[]);

    let m = Mount::new(
        &disk,
        &dir.join("change"),
        Some(&parts[1].mount_options(false)),
    );
    let added = 50 * KIB;
    std::fs::write(m.dir.join("docs/added.txt"), rng.text(added as usize)).unwrap();
    m.unmount();
    let incr = backup_json(&disk, &repo, &[]);
    assert_eq!(incr["parent"], full["snapshot"], "{incr}");
    // Change tracking took blocks from the parent without reading them…
    let bs = repo_block_size(&repo);
    let unread = ju64(&incr, "/unread_blocks");
    assert!(unread > 0, "nothing skipped: {incr}");
    // …and read no more than the blocks in use at the full backup minus those it skipped,
    // plus the blocks the change may have newly put in use. Where ext4 places the new file
    // is its choice (it may take blocks that were free at the full backup), so the bound is
    // what the bytes written can occupy: the file's blocks, one more where it straddles a
    // block boundary, and one for a new directory or extent block.
    let slack = added.div_ceil(bs) + 2;
    let read_blocks = ju64(&incr, "/bytes_read").div_ceil(bs);
    let full_used = ju64(&full, "/stats/data_blocks") + ju64(&full, "/stats/zero_blocks");
    assert!(
        read_blocks + unread <= full_used + slack,
        "the incremental read {read_blocks} blocks and skipped {unread}; {full_used} were in \
         use at the full backup, and the change can add at most {slack}: {incr} after {full}"
    );
    let restored = dir.join("restored.img");
    restore(&repo, jstr(&incr, "/snapshot"), &restored).expect_code(0);
    check_restored(&disk, &restored, &parts, &dir);
}
