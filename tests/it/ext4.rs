//! Real ext4 filesystems on loop devices: back up the device and its image file, change files,
//! back up again, restore both snapshots, check with `e2fsck -fn` and file checksums; restore
//! onto block devices; refusals of unsafe restore targets.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::Path;

/// `mkfs.ext4` without background initialisation, so that nothing changes the volume after
/// it is unmounted.
pub(crate) fn mkfs_ext4(target: &Path) {
    mkfs_ext4_with(target, &[]);
}

/// [`mkfs_ext4`] with extra options (`-b 4096`…).
pub(crate) fn mkfs_ext4_with(target: &Path, extra: &[&str]) {
    let mut args = vec!["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"];
    args.extend_from_slice(extra);
    args.push(p(target));
    run_ok("mkfs.ext4", &args);
}

fn file_content(rng: &mut Rng, len: usize) -> Vec<u8> {
    if rng.below(2) == 0 {
        rng.bytes(len)
    } else {
        rng.text(len)
    }
}

/// Writes `count` files of mixed sizes (random and text) in a few directories, plus two
/// files of a few MiB.
pub(crate) fn populate(root: &Path, rng: &mut Rng, count: usize) {
    for d in 0..6 {
        std::fs::create_dir_all(root.join(format!("dir{d}/sub"))).unwrap();
    }
    for i in 0..count {
        let len = match rng.below(10) {
            0 => 0,
            1..=6 => rng.below(16 * KIB) as usize,
            _ => (16 * KIB + rng.below(240 * KIB)) as usize,
        };
        let sub = if i % 3 == 0 { "/sub" } else { "" };
        let path = root.join(format!("dir{}{sub}/file{i:04}.dat", i % 6));
        std::fs::write(path, file_content(rng, len)).unwrap();
    }
    std::fs::write(
        root.join("big-random.bin"),
        rng.bytes(3 * MIB as usize + 123),
    )
    .unwrap();
    std::fs::write(root.join("big-text.txt"), rng.text(2 * MIB as usize + 7)).unwrap();
}

/// Rewrites some files, deletes some, adds some, grows a big one.
pub(crate) fn modify(root: &Path, rng: &mut Rng) {
    let files: Vec<String> = tree_hashes(root).into_keys().collect();
    for (i, f) in files.iter().enumerate() {
        let path = root.join(f);
        if i % 7 == 0 {
            let len = rng.below(64 * KIB) as usize + 1;
            std::fs::write(&path, file_content(rng, len)).unwrap();
        } else if i % 11 == 0 {
            std::fs::remove_file(&path).unwrap();
        }
    }
    std::fs::create_dir_all(root.join("new")).unwrap();
    for i in 0..40 {
        let len = rng.below(100 * KIB) as usize;
        std::fs::write(
            root.join(format!("new/added{i}.dat")),
            file_content(rng, len),
        )
        .unwrap();
    }
    let mut big = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("big-text.txt"))
        .unwrap();
    std::io::Write::write_all(&mut big, &rng.text(300 * KIB as usize)).unwrap();
}

/// Which blocks of the ext2/3/4 filesystem in `image` are free, according to `dumpe2fs`.
struct FreeMap {
    fs_block_size: u64,
    free: Vec<bool>,
}

impl FreeMap {
    fn read(image: &Path) -> FreeMap {
        let r = run_ok("dumpe2fs", &[p(image)]);
        let field = |name: &str| -> u64 {
            r.stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("dumpe2fs shows no {name:?}"))
        };
        let fs_block_size = field("Block size:");
        let mut free = vec![false; field("Block count:") as usize];
        // Per group: "  Free blocks: 1200-4095, 5000, 6000-6001" (the superblock's own
        // "Free blocks:" line is a count, not indented).
        for list in r
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix("  Free blocks: "))
        {
            for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let (a, b) = item.split_once('-').unwrap_or((item, item));
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                free[a..=b].iter_mut().for_each(|f| *f = true);
            }
        }
        FreeMap {
            fs_block_size,
            free,
        }
    }

    /// True when every filesystem block in the byte range is free.
    fn all_free(&self, start: u64, end: u64) -> bool {
        let first = (start / self.fs_block_size) as usize;
        let last = (end.div_ceil(self.fs_block_size) as usize).min(self.free.len());
        first < last && self.free[first..last].iter().all(|&f| f)
    }
}

/// Asserts that `restored` holds the bytes of `source` in every block of `bs` bytes that the
/// filesystem uses, and either the source's bytes or zeros in blocks it does not use. Returns
/// how many blocks were restored as zeros where the source held stale data.
fn assert_used_blocks_match(source: &Path, restored: &Path, bs: u64, free: &FreeMap) -> u64 {
    use std::io::Read;
    let size = std::fs::metadata(source).unwrap().len();
    assert_eq!(std::fs::metadata(restored).unwrap().len(), size);
    let mut a = std::io::BufReader::new(std::fs::File::open(source).unwrap());
    let mut b = std::io::BufReader::new(std::fs::File::open(restored).unwrap());
    let (mut x, mut y) = (vec![0u8; bs as usize], vec![0u8; bs as usize]);
    let mut zeroed = 0;
    let mut off = 0;
    while off < size {
        let n = bs.min(size - off) as usize;
        a.read_exact(&mut x[..n]).unwrap();
        b.read_exact(&mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            assert!(
                y[..n].iter().all(|&v| v == 0) && free.all_free(off, off + n as u64),
                "{} differs from {} at offset {off}, in a block the filesystem uses",
                restored.display(),
                source.display()
            );
            zeroed += 1;
        }
        off += n as u64;
    }
    zeroed
}

/// `e2fsck -fn`, then every file's SHA-256 through a read-only loop mount.
fn assert_fs_clean_with_files(t: &TestDir, image: &Path, files: &BTreeMap<String, String>) {
    run_ok("e2fsck", &["-fn", p(image)]);
    let name = image.file_name().unwrap().to_string_lossy();
    let lo = Loop::attach(image, true);
    let m = Mount::new(&lo.dev, &t.join(&format!("{name}.mnt")), Some("ro"));
    let got = tree_hashes(&m.dir);
    m.unmount();
    assert_eq!(got.len(), files.len(), "{name}: number of files");
    for (f, h) in files {
        assert_eq!(
            got.get(f),
            Some(h),
            "{name}: file {f} differs or is missing"
        );
    }
}

#[test]
fn ext4_loop_device_and_image_backups_restore_with_clean_fsck_and_same_files() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    let mnt = t.join("mnt");
    let size = 256 * MIB;
    let mut rng = Rng::new(10);
    sparse_file(&img, size);
    init_repo(&repo, &[]);
    let bs = repo_block_size(&repo);
    let lo = Loop::attach(&img, false);
    mkfs_ext4(&lo.dev);

    let m = Mount::new(&lo.dev, &mnt, None);
    populate(&m.dir, &mut rng, 300);
    let files1 = tree_hashes(&m.dir);
    m.unmount();
    assert!(files1.len() > 300);
    let sha1 = sha256_file(&img);
    assert_eq!(sha256_file(&lo.dev), sha1, "device and backing file agree");
    let free1 = FreeMap::read(&img);

    // The block device, reading only what ext4 uses; the image file, every block.
    let d1 = backup_json(&lo.dev, &repo, &[]);
    assert!(d1["parent"].is_null(), "{d1}");
    assert_eq!(d1["filesystem"]["type"], "ext4", "{d1}");
    assert!(
        ju64(&d1, "/bytes_read") < size / 2,
        "blocks ext4 does not use were read: {d1}"
    );
    let f1 = backup_json(&img, &repo, &["--all-blocks"]);
    assert_eq!(f1["all_blocks"], true, "{f1}");
    // Device and file hold the same bytes: the second backup stores little new (it reads
    // the volume in other runs, and content-defined blobs are cut at the ends of runs until
    // the next cut the content decides, so the blobs around some run ends differ).
    assert!(
        ju64(&f1, "/new_bytes") * 5 <= ju64(&d1, "/new_bytes"),
        "the image's blocks were stored again: {f1}"
    );
    let list = volback_ok(&["snapshots", "--json", p(&repo)]).json();
    let dev_entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == d1["snapshot"])
        .expect("device snapshot listed");
    assert_eq!(dev_entry["source"].as_str(), Some(p(&lo.dev)));
    assert_eq!(ju64(dev_entry, "/size"), size);

    let id = |v: &serde_json::Value| jstr(v, "/snapshot").to_string();
    let out_d1 = t.join("dev1.img");
    restore(&repo, &id(&d1), &out_d1);
    assert_used_blocks_match(&img, &out_d1, bs, &free1);
    assert_fs_clean_with_files(&t, &out_d1, &files1);
    let sha_d1 = sha256_file(&out_d1);
    std::fs::remove_file(&out_d1).unwrap();

    // Rewrite, delete and add files.
    let m = Mount::new(&lo.dev, &mnt, None);
    modify(&m.dir, &mut rng);
    let files2 = tree_hashes(&m.dir);
    m.unmount();
    let sha2 = sha256_file(&img);
    assert_ne!(sha1, sha2);
    let free2 = FreeMap::read(&img);

    let d2 = backup_json(&lo.dev, &repo, &[]);
    let f2 = backup_json(&img, &repo, &["--all-blocks"]);
    // Device and image are the same volume (same filesystem): each is incremental on one of
    // the earlier snapshots.
    for (b, earlier) in [(&d2, [&d1, &f1]), (&f2, [&f1, &d2])] {
        assert!(
            earlier.iter().any(|e| b["parent"] == e["snapshot"]),
            "not incremental: {b}"
        );
    }
    // Only the changed part of the filesystem is stored again.
    assert!(
        ju64(&d2, "/new_bytes") < 32 * MIB,
        "incremental stored too much: {d2}"
    );
    assert!(
        ju64(&d2, "/stats/unchanged_blocks") > 0,
        "no block recognised as unchanged: {d2}"
    );

    let out_d2 = t.join("dev2.img");
    restore(&repo, &format!("latest:{}", p(&lo.dev)), &out_d2);
    let zeroed = assert_used_blocks_match(&img, &out_d2, bs, &free2);
    eprintln!("{zeroed} blocks freed by deletions were restored as zeros");
    assert_fs_clean_with_files(&t, &out_d2, &files2);
    std::fs::remove_file(&out_d2).unwrap();

    // Every-block snapshots of the image are bit-exact.
    for (snap, sha, name) in [(&f1, &sha1, "file1"), (&f2, &sha2, "file2")] {
        let out = t.join(&format!("{name}.img"));
        restore(&repo, &id(snap)[..12], &out);
        assert_eq!(
            &sha256_file(&out),
            sha,
            "{name}: restored image differs from the volume"
        );
        run_ok("e2fsck", &["-fn", p(&out)]);
        std::fs::remove_file(&out).unwrap();
    }
    // The first snapshot is unchanged by the later ones.
    let again = t.join("dev1-again.img");
    restore(&repo, &id(&d1), &again);
    assert_eq!(sha256_file(&again), sha_d1);
    volback_ok(&["verify", p(&repo)]).stdout_has(&["checked 4 snapshots", "no problems"]);
}

#[test]
fn restore_onto_a_larger_block_device_zeroes_unused_blocks() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    let mut rng = Rng::new(11);
    sparse_file(&img, 64 * MIB);
    mkfs_ext4(&img);
    {
        let lo = Loop::attach(&img, false);
        let m = Mount::new(&lo.dev, &t.join("mnt"), None);
        populate(&m.dir, &mut rng, 50);
        m.unmount();
    }
    let sha = sha256_file(&img);
    init_repo(&repo, &[]);
    backup_json(&img, &repo, &["--block-size", "64K"]);

    // The target device starts full of garbage: unused blocks must come back as zeros.
    let target_file = t.join("target.img");
    random_file(&target_file, 80 * MIB, 12);
    let target = Loop::attach(&target_file, false);
    volback_ok(&["restore", "--verify", p(&repo), "latest", p(&target.dev)])
        .stdout_has(&["restored snapshot", "read back and verified"]);
    assert_eq!(
        sha256_prefix(&target.dev, Some(64 * MIB)),
        sha,
        "the first 64 MiB of the device differ from the volume"
    );
    // The restored device holds a clean filesystem.
    run_ok("e2fsck", &["-fn", p(&target.dev)]);
    drop(target);
    assert_eq!(sha256_prefix(&target_file, Some(64 * MIB)), sha);
}

#[test]
fn backup_refuses_a_filesystem_mounted_read_write_unless_allowed() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let fs_img = t.join("mounted.img");
    sparse_file(&fs_img, 64 * MIB);
    mkfs_ext4(&fs_img);
    let lo = Loop::attach(&fs_img, false);
    let m = Mount::new(&lo.dev, &t.join("mnt"), None);
    // The device and the image file behind it are both refused, with the way out named.
    for source in [p(&lo.dev), p(&fs_img)] {
        volback_code(&["backup", source, p(&repo)], 1).stderr_has(&[
            "mounted read-write",
            p(&m.dir),
            "--allow-mounted",
            "snapshot",
        ]);
    }
    assert!(snapshot_ids(&repo).is_empty());
    let j = backup_json(&lo.dev, &repo, &["--allow-mounted"]);
    assert!(!jstr(&j, "/snapshot").is_empty());
    m.unmount();
    // Mounted read-only is fine without the flag.
    let m = Mount::new(&lo.dev, &t.join("mnt"), Some("ro"));
    backup_json(&lo.dev, &repo, &[]);
    m.unmount();
}

#[test]
fn restore_refuses_mounted_and_too_small_devices() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    random_file(&src, 32 * MIB, 13);
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &[]);

    // A mounted device, and the image file behind it.
    let fs_img = t.join("mounted.img");
    sparse_file(&fs_img, 64 * MIB);
    mkfs_ext4(&fs_img);
    let lo = Loop::attach(&fs_img, false);
    let m = Mount::new(&lo.dev, &t.join("mnt"), None);
    std::fs::write(m.dir.join("keep.txt"), b"must survive").unwrap();
    volback_code(&["restore", p(&repo), "latest", p(&lo.dev)], 1).stderr_has(&[
        "refusing",
        "mounted",
        p(&m.dir),
    ]);
    volback_code(&["restore", p(&repo), "latest", p(&fs_img)], 1)
        .stderr_has(&["refusing", "mounted"]);
    assert_eq!(
        std::fs::read(m.dir.join("keep.txt")).unwrap(),
        b"must survive"
    );
    m.unmount();
    drop(lo);
    run_ok("e2fsck", &["-fn", p(&fs_img)]);

    // A device smaller than the volume.
    let small_file = t.join("small.img");
    random_file(&small_file, 16 * MIB, 14);
    let before = sha256_file(&small_file);
    let small = Loop::attach(&small_file, false);
    volback_code(&["restore", p(&repo), "latest", p(&small.dev)], 1).stderr_has(&[
        "refusing",
        &(16 * MIB).to_string(),
        &(32 * MIB).to_string(),
    ]);
    drop(small);
    assert_eq!(
        sha256_file(&small_file),
        before,
        "refused target was written"
    );
}

#[test]
fn restore_refuses_a_target_inside_the_repository() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    random_file(&src, 2 * MIB, 15);
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &[]);
    for target in [
        repo.join("restored.img"),
        repo.join("packs/x.img"),
        repo.join("config"),
        repo.clone(),
    ] {
        volback_code(&["restore", p(&repo), "latest", p(&target)], 1)
            .stderr_has(&["refusing", "inside"]);
    }
    assert!(!repo.join("restored.img").exists());
    assert!(!repo.join("packs/x.img").exists());
    // The repository is intact.
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);
    // Through a path with `..` too.
    let sneaky = format!("{}/packs/../tmp/../snap.img", p(&repo));
    volback_code(&["restore", p(&repo), "latest", &sneaky], 1).stderr_has(&["refusing"]);
    assert!(!repo.join("snap.img").exists());
}

/// An ext4 whose journal needs recovery (mounted, or not cleanly unmounted) may allocate in
/// the journal blocks that the bitmaps show free: no map, every block read, with a warning.
#[test]
fn ext4_needing_journal_recovery_is_read_whole() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    sparse_file(&img, 32 * MIB);
    mkfs_ext4(&img);
    run_ok("debugfs", &["-w", "-R", "feature needs_recovery", p(&img)]);
    init_repo(&repo, &[]);
    let r = volback(&["backup", "--json", p(&img), p(&repo)]).expect_code(0);
    r.stderr_has(&["journal needs recovery", "reading every block"]);
    let v = r.json();
    assert_eq!(v["all_blocks"], true, "{v}");
    assert_eq!(v["filesystem"]["type"], "ext4", "{v}");
}

/// Asserts that every filesystem block `free` marks used holds the same bytes in `restored`
/// as in `source` (free blocks may hold anything: zeros, or what an earlier snapshot held).
fn assert_used_fs_blocks_match(source: &Path, restored: &Path, free: &FreeMap) {
    use std::io::Read;
    let fbs = free.fs_block_size as usize;
    let mut a = std::io::BufReader::new(std::fs::File::open(source).unwrap());
    let mut b = std::io::BufReader::new(std::fs::File::open(restored).unwrap());
    let (mut x, mut y) = (vec![0u8; fbs], vec![0u8; fbs]);
    for (i, &is_free) in free.free.iter().enumerate() {
        a.read_exact(&mut x).unwrap();
        b.read_exact(&mut y).unwrap();
        assert!(
            is_free || x == y,
            "{} differs from {} in used filesystem block {i}",
            restored.display(),
            source.display()
        );
    }
}

/// The physical block (in filesystem blocks) holding logical block `logical` of `file`.
fn physical_block(image: &Path, file: &str, logical: u64) -> u64 {
    let r = run_ok(
        "debugfs",
        &["-R", &format!("bmap {file} {logical}"), p(image)],
    );
    r.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("debugfs bmap: {:?}", r.stdout))
}

/// Change tracking: an incremental backup of an unmounted ext4 volume takes the blocks of
/// unchanged files from the parent without reading them; the restore still matches the
/// volume in every used block, fsck is clean and every file matches. A file changed in the
/// second before the parent was taken counts as changed even when its inode looks the same;
/// a write under the filesystem (raw device) is only seen with `--rehash`.
#[test]
fn change_tracking_reads_only_what_changed_and_restores_exactly() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    let mnt = t.join("mnt");
    let mut rng = Rng::new(77);
    sparse_file(&img, 256 * MIB);
    init_repo(&repo, &[]);
    mkfs_ext4_with(&img, &["-b", "4096"]);
    let old_content = rng.bytes(2 * MIB as usize);
    let m = Mount::new(&img, &mnt, Some("loop"));
    populate(&m.dir, &mut rng, 300);
    std::fs::write(m.dir.join("old.bin"), &old_content).unwrap();
    run_ok("sync", &[]);
    // Files changed more than a few seconds before the filesystem was last written are
    // trusted; "racy.bin", written just before, is not.
    std::thread::sleep(std::time::Duration::from_secs(5));
    std::fs::write(m.dir.join("racy.bin"), &old_content).unwrap();
    m.unmount();

    let full = backup_json(&img, &repo, &[]);
    assert_eq!(ju64(&full, "/unread_blocks"), 0, "{full}");

    // Change files through the filesystem…
    let m = Mount::new(&img, &mnt, Some("loop"));
    modify(&m.dir, &mut rng);
    m.unmount();
    // …and overwrite 4 KiB in the middle of old.bin and racy.bin under it, as a write in the
    // same clock tick as the backup would look: inodes untouched.
    let patch = vec![0xA5u8; 4096];
    let fs_bs = 4096;
    for f in ["/old.bin", "/racy.bin"] {
        let blk = physical_block(&img, f, 256);
        write_at(&img, blk * fs_bs, &patch);
    }
    let mut new_content = old_content.clone();
    new_content[256 * 4096..257 * 4096].copy_from_slice(&patch);
    let free = FreeMap::read(&img);

    let incr = backup_json(&img, &repo, &[]);
    assert_eq!(incr["parent"], full["snapshot"], "{incr}");
    assert!(ju64(&incr, "/unread_blocks") > 0, "nothing skipped: {incr}");
    let out = t.join("incr.img");
    restore(&repo, jstr(&incr, "/snapshot"), &out);
    run_ok("e2fsck", &["-fn", p(&out)]);
    let check = |image: &Path, expect_old: &[u8], name: &str| {
        let lo = Loop::attach(image, true);
        let m = Mount::new(&lo.dev, &t.join(&format!("{name}.mnt")), Some("ro"));
        let racy = std::fs::read(m.dir.join("racy.bin")).unwrap();
        let old = std::fs::read(m.dir.join("old.bin")).unwrap();
        let files = tree_hashes(&m.dir);
        m.unmount();
        assert!(
            racy == new_content,
            "{name}: the racy file's change was missed"
        );
        assert!(old == expect_old, "{name}: old.bin");
        files
    };
    // The write under the filesystem to a trusted file is not seen (tracking trusts ctime)…
    let files = check(&out, &old_content, "incr");
    // …every other file and every used block except that one is the volume's.
    let src_lo = Loop::attach(&img, true);
    let src_m = Mount::new(&src_lo.dev, &t.join("src.mnt"), Some("ro"));
    let mut expect = tree_hashes(&src_m.dir);
    src_m.unmount();
    drop(src_lo);
    expect.insert("old.bin".into(), sha256_bytes(&old_content));
    assert_eq!(files, expect);

    // --rehash reads every used block: the restore equals the volume in every used block.
    let rehash = backup_json(&img, &repo, &["--rehash"]);
    assert_eq!(ju64(&rehash, "/unread_blocks"), 0, "{rehash}");
    // Both ran on the same volume: tracking read less, and what it read plus what it took
    // unread is within the used blocks (holes of the image count as used, not read).
    assert!(
        ju64(&incr, "/bytes_read") < ju64(&rehash, "/bytes_read"),
        "tracking did not save reading: {incr} vs {rehash}"
    );
    let used = ju64(&rehash, "/stats/data_blocks") + ju64(&rehash, "/stats/zero_blocks");
    assert!(
        ju64(&incr, "/bytes_read").div_ceil(repo_block_size(&repo)) + ju64(&incr, "/unread_blocks")
            <= used,
        "the incremental read and skipped more than the {used} used blocks: {incr}"
    );
    let out2 = t.join("rehash.img");
    restore(&repo, jstr(&rehash, "/snapshot"), &out2);
    assert_used_fs_blocks_match(&img, &out2, &free);
    check(&out2, &new_content, "rehash");

    // The next tracked backup builds on the rehashed one and matches in every used block.
    let m = Mount::new(&img, &mnt, Some("loop"));
    modify(&m.dir, &mut rng);
    m.unmount();
    let free = FreeMap::read(&img);
    let again = backup_json(&img, &repo, &[]);
    assert_eq!(again["parent"], rehash["snapshot"], "{again}");
    let out3 = t.join("again.img");
    restore(&repo, jstr(&again, "/snapshot"), &out3);
    assert_used_fs_blocks_match(&img, &out3, &free);
    run_ok("e2fsck", &["-fn", p(&out3)]);
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);
}
