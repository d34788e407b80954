//! ext2/3/4 with damaged but repairable metadata (issue 11, item 2): the allocation map must
//! not be trusted. Every backup either falls back to reading every block, with a warning that
//! says why, or restores every block that the filesystem still uses after `e2fsck -fy`
//! repairs a copy of the damaged source. Never a smaller map that drops data e2fsck keeps.
//!
//! Filesystems are made by the real mkfs tools and filled through loop mounts; damage is made
//! with `debugfs` and by overwriting bytes.

use crate::ext4::populate;
use crate::util::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A 64 MiB filesystem made by `mkfs` with `args`, filled through a loop mount.
fn make_filled(t: &TestDir, name: &str, mkfs: &str, args: &[&str], seed: u64) -> PathBuf {
    let img = t.join(&format!("{name}.img"));
    sparse_file(&img, 64 * MIB);
    let mut a = vec!["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"];
    a.extend_from_slice(args);
    a.push(p(&img));
    run_ok(mkfs, &a);
    let lo = Loop::attach(&img, false);
    let m = Mount::new(&lo.dev, &t.join(&format!("{name}.mnt")), None);
    populate(&m.dir, &mut Rng::new(seed), 150);
    m.unmount();
    drop(lo);
    img
}

/// A field of `dumpe2fs -h`.
fn dumpe2fs_field(image: &Path, name: &str) -> u64 {
    let r = run_ok("dumpe2fs", &["-h", p(image)]);
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("dumpe2fs -h shows no {name:?}"))
}

/// `debugfs -w -n -R CMD IMAGE` (no checksum verification, so that it opens damaged images).
fn debugfs_w(image: &Path, cmd: &str) {
    run_ok("debugfs", &["-w", "-n", "-R", cmd, p(image)]);
}

/// A copy of `image` repaired by `e2fsck -fy`; `None` when e2fsck could not repair it.
fn fsck_copy(image: &Path, copy: &Path) -> Option<PathBuf> {
    std::fs::copy(image, copy).unwrap();
    let r = run_program("e2fsck", &["-fy", p(copy)]);
    // 0: clean, 1: errors corrected, 2: corrected, reboot advised; 4 and up: left uncorrected.
    matches!(r.code, Some(0..=3)).then(|| copy.to_path_buf())
}

/// Every file's SHA-256 through a read-only loop mount.
fn files_of(t: &TestDir, image: &Path) -> BTreeMap<String, String> {
    let name = image.file_name().unwrap().to_string_lossy().into_owned();
    let lo = Loop::attach(image, true);
    let m = Mount::new(&lo.dev, &t.join(&format!("{name}.mnt")), Some("ro"));
    let files = tree_hashes(&m.dir);
    m.unmount();
    files
}

/// Backs `img` up into a new repository and restores it to `restored`; returns the backup's
/// JSON report and stderr.
fn backup_and_restore(img: &Path, repo: &Path, restored: &Path) -> (serde_json::Value, String) {
    init_repo(repo, &[]);
    let r = volback(&["backup", "--json", p(img), p(repo)]).expect_code(0);
    let v = r.json();
    restore(repo, "latest", restored);
    (v, r.stderr)
}

/// The reproduction: the damaged source is read whole with a warning naming `reason`, the
/// restore equals it bit for bit, and e2fsck keeps the same files in both. `reason`: words
/// the warning must contain.
fn assert_read_whole_and_files_kept(t: &TestDir, img: &Path, label: &str, reason: &[&str]) {
    let repo = t.join(&format!("{label}.repo"));
    let restored = t.join(&format!("{label}.restored"));
    let (v, stderr) = backup_and_restore(img, &repo, &restored);
    let err = stderr.to_lowercase();
    assert!(
        err.contains("allocation data is unusable")
            && err.contains("reading every block")
            && reason.iter().all(|r| err.contains(r)),
        "{label}: no warning naming {reason:?}: {stderr}"
    );
    assert_eq!(v["all_blocks"], true, "{label}: {v}");
    assert_eq!(
        sha256_file(&restored),
        sha256_file(img),
        "{label}: the restore differs from the damaged source"
    );
    let fixed_src = fsck_copy(img, &t.join(&format!("{label}.src-fsck")))
        .unwrap_or_else(|| panic!("{label}: e2fsck cannot repair the damaged source"));
    let fixed_rst = fsck_copy(&restored, &t.join(&format!("{label}.rst-fsck")))
        .unwrap_or_else(|| panic!("{label}: e2fsck cannot repair the restore"));
    let kept = files_of(t, &fixed_src);
    assert!(
        kept.len() > 100,
        "{label}: e2fsck kept only {} files",
        kept.len()
    );
    assert_eq!(
        files_of(t, &fixed_rst),
        kept,
        "{label}: the repaired restore lacks files"
    );
}

/// Filesystem kinds of the reproductions: a label, mkfs and its options (4 KiB blocks with
/// 4096 blocks per group, so that backup descriptors exist for e2fsck to repair from).
const KINDS: [(&str, &str, &[&str]); 4] = [
    ("ext4-csum", "mkfs.ext4", &["-b", "4096", "-g", "4096"]),
    (
        "ext4-gdtcsum",
        "mkfs.ext4",
        &["-b", "4096", "-g", "4096", "-O", "^metadata_csum,uninit_bg"],
    ),
    (
        "ext4-1k-nocsum",
        "mkfs.ext4",
        &["-b", "1024", "-O", "^metadata_csum"],
    ),
    ("ext3", "mkfs.ext3", &["-b", "4096", "-g", "4096"]),
];

/// Issue 11: `debugfs -w -R "set_bg 0 block_bitmap 0"` made the backup read a few MiB and lose
/// files that e2fsck keeps.
#[test]
fn block_bitmap_pointing_at_the_superblock_is_not_trusted() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    for (i, (label, mkfs, args)) in KINDS.iter().enumerate() {
        let img = make_filled(&t, label, mkfs, args, 1100 + i as u64);
        debugfs_w(&img, "set_bg 0 block_bitmap 0");
        let reason = match *label {
            "ext4-csum" | "ext4-gdtcsum" => &["descriptor checksum mismatch"][..],
            // With 1 KiB blocks block 0 lies before the first group.
            "ext4-1k-nocsum" => &["outside the filesystem"],
            _ => &["superblock of group 0", "overlap"],
        };
        assert_read_whole_and_files_kept(&t, &img, label, reason);
    }
}

/// The same with the descriptor checksum recomputed: the location check alone must catch it.
#[test]
fn block_bitmap_at_the_superblock_behind_a_valid_checksum_is_not_trusted() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = make_filled(&t, "ext4", "mkfs.ext4", &["-b", "4096", "-g", "4096"], 1200);
    debugfs_w(&img, "set_bg 0 block_bitmap 0");
    debugfs_w(&img, "set_bg 0 checksum calc");
    assert_read_whole_and_files_kept(
        &t,
        &img,
        "ext4-resealed",
        &["superblock of group 0", "overlap"],
    );
}

/// Issue 11: zeroing the group descriptor block made the backup read a few MiB and lose
/// files that e2fsck (which falls back to the backup descriptors) keeps.
#[test]
fn zeroed_group_descriptor_block_is_not_trusted() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    for (i, (label, mkfs, args)) in KINDS.iter().enumerate() {
        let img = make_filled(&t, label, mkfs, args, 1300 + i as u64);
        let bs = dumpe2fs_field(&img, "Block size:");
        let first = dumpe2fs_field(&img, "First block:");
        write_at(&img, (first + 1) * bs, &vec![0u8; bs as usize]);
        let reason = match *label {
            "ext4-csum" | "ext4-gdtcsum" => &["descriptor checksum mismatch"][..],
            "ext4-1k-nocsum" => &["outside the filesystem"],
            _ => &["overlap"],
        };
        assert_read_whole_and_files_kept(&t, &img, label, reason);
    }
}

/// Which filesystem blocks of a (consistent) ext2/3/4 image are in use, per `dumpe2fs`.
fn used_blocks(image: &Path) -> Vec<bool> {
    let r = run_ok("dumpe2fs", &[p(image)]);
    let count = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .expect("dumpe2fs shows the block count");
    let mut used = vec![true; count];
    // Per group: "  Free blocks: 1200-4095, 5000" (the superblock's line is not indented).
    for list in r
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  Free blocks: "))
    {
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
            used[a..=b.min(count - 1)]
                .iter_mut()
                .for_each(|u| *u = false);
        }
    }
    used
}

/// Numbers after `prefix` on `dumpe2fs` lines ("Block bitmap at 259 (+258)" gives 259).
fn dumpe2fs_locations(image: &Path, prefix: &str) -> Vec<u64> {
    let r = run_ok("dumpe2fs", &[p(image)]);
    r.stdout
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(prefix)? + prefix.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        })
        .collect()
}

/// One random damage to the metadata of `img` (deterministic for `rng`); returns what it did.
fn damage(img: &Path, rng: &mut Rng, targets: &[u64], bs: u64, groups: u64, blocks: u64) -> String {
    let pick = |rng: &mut Rng| targets[rng.below(targets.len() as u64) as usize];
    match rng.below(4) {
        0 => {
            let blk = pick(rng);
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let off = blk * bs + rng.below(bs);
                let mut b = [0u8; 1];
                std::os::unix::fs::FileExt::read_exact_at(
                    &std::fs::File::open(img).unwrap(),
                    &mut b,
                    off,
                )
                .unwrap();
                write_at(img, off, &[b[0] ^ (rng.below(255) as u8 + 1)]);
            }
            format!("{n} bytes changed in block {blk}")
        }
        1 => {
            let blk = pick(rng);
            write_at(img, blk * bs, &vec![0u8; bs as usize]);
            format!("block {blk} zeroed")
        }
        2 => {
            let g = rng.below(groups);
            let (field, value) = match rng.below(5) {
                0 => ("block_bitmap", rng.below(blocks)),
                1 => ("inode_bitmap", rng.below(blocks)),
                2 => ("inode_table", rng.below(blocks)),
                3 => ("free_blocks_count", rng.below(8192)),
                _ => ("flags", rng.below(8)),
            };
            debugfs_w(img, &format!("set_bg {g} {field} {value}"));
            debugfs_w(img, &format!("set_bg {g} checksum calc"));
            format!("set_bg {g} {field} {value} with its checksum recomputed")
        }
        _ => {
            let (field, value) = match rng.below(5) {
                0 => ("free_blocks_count", rng.below(blocks)),
                1 => ("blocks_per_group", 8 * (1 + rng.below(1024))),
                2 => ("reserved_gdt_blocks", rng.below(300)),
                3 => ("first_data_block", rng.below(3)),
                _ => ("blocks_count", blocks / 2 + rng.below(blocks)),
            };
            debugfs_w(img, &format!("ssv {field} {value}"));
            format!("ssv {field} {value}")
        }
    }
}

/// Random damage to descriptors, bitmaps, superblocks and the journal inode of a real
/// metadata_csum ext4, 16 deterministic cases: either the backup warns and restores the
/// damaged source bit for bit, or every block that the filesystem uses after `e2fsck -fy`
/// repaired a copy (and that e2fsck did not rewrite) is restored with the source's bytes.
#[test]
fn random_metadata_damage_never_drops_blocks_e2fsck_keeps() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let base = make_filled(&t, "base", "mkfs.ext4", &["-b", "1024"], 1400);
    let bs = dumpe2fs_field(&base, "Block size:");
    let blocks = dumpe2fs_field(&base, "Block count:");
    let per_group = dumpe2fs_field(&base, "Blocks per group:");
    let groups = blocks.div_ceil(per_group);
    // Damage targets: the superblock and its first backup, the descriptor blocks, every block
    // bitmap, and the inode table block holding the journal inode.
    let mut targets = vec![1, per_group + 1];
    targets.extend(2..2 + groups.div_ceil(bs / 64));
    targets.extend(dumpe2fs_locations(&base, "Block bitmap at "));
    let imap = run_ok("debugfs", &["-R", "imap <8>", p(&base)]);
    let journal_slot: u64 = imap
        .stdout
        .split("located at block ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .expect("debugfs imap names the journal inode's block");
    targets.push(journal_slot);

    let (mut whole, mut mapped) = (0, 0);
    for case in 0..16u64 {
        let mut rng = Rng::new(0xE17D_A3A6_E000 + case);
        let img = t.join("damaged.img");
        std::fs::copy(&base, &img).unwrap();
        let what = damage(&img, &mut rng, &targets, bs, groups, blocks);
        let repo = t.join(&format!("case{case}.repo"));
        let restored = t.join("restored.img");
        let _ = std::fs::remove_file(&restored);
        let (v, stderr) = backup_and_restore(&img, &repo, &restored);
        eprintln!("case {case}: {what}: all blocks read: {}", v["all_blocks"]);
        let src = std::fs::read(&img).unwrap();
        let rst = std::fs::read(&restored).unwrap();
        if v["all_blocks"] == true {
            assert!(
                stderr.contains("reading every block"),
                "case {case} ({what}): every block read without a warning: {stderr}"
            );
            assert!(
                src == rst,
                "case {case} ({what}): restore differs from the source"
            );
            whole += 1;
        } else {
            mapped += 1;
            let Some(fixed) = fsck_copy(&img, &t.join("fixed.img")) else {
                // e2fsck keeps nothing it can name: no block to compare.
                continue;
            };
            let fixed_bytes = std::fs::read(&fixed).unwrap();
            for (b, used) in used_blocks(&fixed).into_iter().enumerate() {
                let r = b * bs as usize..(b + 1) * bs as usize;
                if used && fixed_bytes[r.clone()] == src[r.clone()] {
                    assert!(
                        rst[r.clone()] == src[r],
                        "case {case} ({what}): block {b}, in use after e2fsck, not restored"
                    );
                }
            }
        }
        std::fs::remove_dir_all(&repo).unwrap();
    }
    eprintln!("{whole} damaged sources read whole, {mapped} through a map");
}

/// Red team A: a 256 MiB ext4 (1 KiB blocks) holding twelve 12 MiB random files, made by
/// mkfs and filled through a loop mount; returns the image and every file's SHA-256.
fn make_twelve_files(t: &TestDir, name: &str) -> (PathBuf, BTreeMap<String, String>) {
    let img = t.join(&format!("{name}.img"));
    sparse_file(&img, 256 * MIB);
    run_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "1024",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            p(&img),
        ],
    );
    let lo = Loop::attach(&img, false);
    let m = Mount::new(&lo.dev, &t.join(&format!("{name}.mnt")), None);
    for i in 1..=12u64 {
        random_file(&m.dir.join(format!("f{i}")), 12 * MIB, 0xA11C + i);
    }
    let files = tree_hashes(&m.dir);
    m.unmount();
    drop(lo);
    (img, files)
}

/// The leaf extents of `file` (`debugfs -R "ex FILE"`): (physical start, length). A leaf
/// line holds nine numbers (level/depth, entry/entries, logical and physical ranges,
/// length); index lines hold eight.
fn extents_of(image: &Path, file: &str) -> Vec<(u64, u64)> {
    let r = run_ok("debugfs", &["-R", &format!("ex {file}"), p(image)]);
    r.stdout
        .lines()
        .filter_map(|l| {
            let n: Vec<u64> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            (n.len() == 9).then(|| (n[6], n[8]))
        })
        .collect()
}

/// `dumpe2fs` facts of a group: its free block count and every metadata block inside it
/// (superblock copies, descriptors, reserved GDT blocks, bitmaps and inode tables of any
/// group that flex_bg placed there).
fn group_facts(image: &Path, g: u64, first: u64, len: u64) -> (u64, u64) {
    let r = run_ok("dumpe2fs", &[p(image)]);
    let out = r.stdout;
    let head = format!("Group {g}: ");
    let free = out
        .lines()
        .skip_while(|l| !l.starts_with(&head))
        .find_map(|l| l.trim().split_once(" free blocks,"))
        .and_then(|(n, _)| n.parse().ok())
        .expect("dumpe2fs shows the group's free blocks");
    let mut meta = 0;
    for l in out.lines() {
        for what in [
            "superblock at ",
            "Group descriptors at ",
            "Reserved GDT blocks at ",
            "Block bitmap at ",
            "Inode bitmap at ",
            "Inode table at ",
        ] {
            let Some(at) = l.find(what) else { continue };
            let range: String = l[at + what.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '-')
                .collect();
            let (a, b) = range.split_once('-').unwrap_or((&range, &range));
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            let (s, e) = (a.max(first), (b + 1).min(first + len));
            meta += e.saturating_sub(s);
        }
    }
    (free, meta)
}

/// Red team A: a file's blocks marked free in the block bitmap (`freeb`), or its group
/// flagged BLOCK_UNINIT, with the free counts and checksums made consistent, so that every
/// check of the bitmaps alone passes. e2fsck keeps the file ("Block bitmap differences");
/// the backup must check the bitmaps against the inodes, warn, and read every block.
#[test]
fn file_blocks_marked_free_behind_consistent_counts_are_found() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    for variant in ["freeb", "block-uninit"] {
        let (img, files) = make_twelve_files(&t, variant);
        let per_group = dumpe2fs_field(&img, "Blocks per group:");
        let first_block = dumpe2fs_field(&img, "First block:");
        let sb_free = dumpe2fs_field(&img, "Free blocks:");
        let extents = extents_of(&img, "/f5");
        assert!(!extents.is_empty(), "debugfs lists no extent of /f5");
        // Blocks of /f5 per group.
        let mut in_group: BTreeMap<u64, u64> = BTreeMap::new();
        for &(start, len) in &extents {
            for b in start..start + len {
                *in_group.entry((b - first_block) / per_group).or_default() += 1;
            }
        }
        let cmds = if variant == "freeb" {
            // The first extent, clipped to its group.
            let (start, len) = extents[0];
            let g = (start - first_block) / per_group;
            let group_end = first_block + (g + 1) * per_group;
            let len = len.min(group_end - start);
            let (free, _) = group_facts(&img, g, 0, 0);
            format!(
                "freeb {start} {len}\nset_bg {g} free_blocks_count {}\nset_bg {g} checksum calc\n\
                 ssv free_blocks_count {}\n",
                free + len,
                sb_free + len
            )
        } else {
            // A group holding nothing but /f5 and metadata: uninitialised, it claims to hold
            // only its metadata, with the free count that implies.
            let (g, free, mine) = in_group
                .iter()
                .find_map(|(&g, &mine)| {
                    let first = first_block + g * per_group;
                    let (free, meta) = group_facts(&img, g, first, per_group);
                    (free + mine + meta == per_group).then_some((g, per_group - meta, mine))
                })
                .expect("/f5 fills a group");
            format!(
                "set_bg {g} flags 2\nset_bg {g} free_blocks_count {free}\nset_bg {g} checksum calc\n\
                 ssv free_blocks_count {}\n",
                sb_free + mine
            )
        };
        run_stdin_ok("debugfs", &["-w", "-f", "-", p(&img)], cmds.as_bytes());

        let repo = t.join(&format!("{variant}.repo"));
        let restored = t.join(&format!("{variant}.restored"));
        let (v, stderr) = backup_and_restore(&img, &repo, &restored);
        assert!(
            stderr.contains("reading every block")
                && stderr.contains("free")
                && stderr.contains("but inode")
                && stderr.contains("uses it"),
            "{variant}: no warning naming the inode: {stderr}"
        );
        assert_eq!(v["all_blocks"], true, "{variant}: {v}");
        assert_eq!(
            sha256_file(&restored),
            sha256_file(&img),
            "{variant}: the restore differs from the damaged source"
        );
        // e2fsck keeps /f5 (it marks its blocks used again); so does the restore.
        let fixed = fsck_copy(&restored, &t.join(&format!("{variant}.rst-fsck")))
            .unwrap_or_else(|| panic!("{variant}: e2fsck cannot repair the restore"));
        let kept = files_of(&t, &fixed);
        for (name, hash) in &files {
            assert_eq!(kept.get(name), Some(hash), "{variant}: {name} lost");
        }
        for f in [img, restored, fixed] {
            std::fs::remove_file(f).unwrap();
        }
        std::fs::remove_dir_all(&repo).unwrap();
    }
}
