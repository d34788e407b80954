//! `volback mount` / `volback umount`: the FUSE view of a snapshot read through the kernel's
//! loop driver (ext4 and NTFS), a partitioned disk showing each partition, `--files`, reads
//! past the end, and `umount` after the server was killed with SIGKILL.

use crate::ext4::{mkfs_ext4, mkfs_ext4_with};
use crate::util::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn fill(root: &Path, rng: &mut Rng) {
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    for i in 0..40 {
        let len = (rng.below(200) * KIB) as usize + 3;
        let sub = if i % 2 == 0 { "d" } else { "d/e" };
        std::fs::write(root.join(format!("{sub}/f{i}.bin")), rng.bytes(len)).unwrap();
    }
    std::fs::write(root.join("big.txt"), rng.text(3 * MIB as usize)).unwrap();
}

/// Mounts `image` read-only with `options` and returns its file hashes.
fn hashes_of(
    image: &Path,
    options: &str,
    dir: &Path,
) -> std::collections::BTreeMap<String, String> {
    let m = Mount::new(image, dir, Some(options));
    let h = tree_hashes(&m.dir);
    m.unmount();
    h
}

pub(crate) fn mount_view(repo: &Path, view: &Path, extra: &[&str]) -> serde_json::Value {
    std::fs::create_dir_all(view).unwrap();
    let mut args = vec!["mount", p(repo), "latest", p(view), "--json"];
    args.extend_from_slice(extra);
    volback_ok(&args).json()
}

pub(crate) fn umount(dir: &Path) {
    volback_ok(&["umount", p(dir)]);
}

/// Leaves nothing behind: no mount and no loop device under `base`.
fn assert_clean(base: &Path) {
    let b = p(base);
    assert!(!mountinfo_mentions(b), "a mount under {b} is left");
    assert!(
        loops_mentioning(b).is_empty(),
        "loop devices left: {:?}",
        loops_mentioning(b)
    );
}

#[test]
fn ext4_snapshot_through_the_loop_driver_and_files() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let dir = TestDir::new();
    let img = dir.join("ext4.img");
    sparse_file(&img, 48 * MIB);
    mkfs_ext4(&img);
    let mut rng = Rng::new(51);
    {
        let m = Mount::new(&img, &dir.join("fill"), Some("loop"));
        fill(&m.dir, &mut rng);
        m.unmount();
    }
    let expected = hashes_of(&img, "loop,ro", &dir.join("src"));
    let repo = dir.join("repo");
    init_repo(&repo, &[]);
    backup_json(&img, &repo, &[]);

    let view = dir.join("view");
    let files = dir.join("files");
    let info = mount_view(&repo, &view, &["--files", p(&files)]);
    assert_eq!(info["images"].as_array().unwrap().len(), 1, "{info}");
    let volume = view.join("volume.img");
    assert_eq!(std::fs::metadata(&volume).unwrap().len(), 48 * MIB);
    // The files through --files…
    assert_eq!(tree_hashes(&files), expected);
    // …and through the kernel's loop driver on the view's image, mounted by the test.
    assert_eq!(
        hashes_of(&volume, "loop,ro,noload", &dir.join("by-loop")),
        expected
    );
    // The image is read-only, and reads past its end return nothing (no error, no hang).
    assert!(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&volume)
            .is_err()
    );
    let f = std::fs::File::open(&volume).unwrap();
    let mut buf = [0u8; 4096];
    assert_eq!(f.read_at(&mut buf, 48 * MIB + 4096).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, 48 * MIB - 100).unwrap(), 100);
    drop(f);
    // umount via the files directory undoes the whole view.
    umount(&files);
    assert_clean(dir.path());
}

#[test]
fn umount_after_the_server_was_killed() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let dir = TestDir::new();
    let img = dir.join("ext4.img");
    sparse_file(&img, 32 * MIB);
    mkfs_ext4(&img);
    {
        let m = Mount::new(&img, &dir.join("fill"), Some("loop"));
        fill(&m.dir, &mut Rng::new(7));
        m.unmount();
    }
    let repo = dir.join("repo");
    init_repo(&repo, &[]);
    backup_json(&img, &repo, &[]);
    let view = dir.join("view");
    let files = dir.join("files");
    mount_view(&repo, &view, &["--files", p(&files)]);
    // A loop device attached by hand to the view is undone too.
    let extra = Loop::attach(&view.join("volume.img"), true);
    let needle = format!("mount {} latest {}", p(&repo), p(&view));
    let pids = run_ok("pgrep", &["-f", &needle]).stdout;
    let pid = pids.lines().next().expect("the mount server is running");
    run_ok("kill", &["-9", pid]);
    // Wait for it to be gone (not our child: no wait() to block on); the bound only guards
    // against a hang, it is not a timing assumption.
    let gone = (0..3000).any(|_| {
        run_program("kill", &["-0", pid]).code != Some(0) || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            false
        }
    });
    assert!(gone, "the mount server survived SIGKILL for a minute");
    umount(&view);
    std::mem::forget(extra);
    assert_clean(dir.path());
    // A second umount says there is nothing to undo.
    volback_code(&["umount", p(&view)], 1).stderr_has(&["nothing is mounted"]);
}

#[test]
fn partitioned_disk_shows_each_partition() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let dir = TestDir::new();
    let disk = dir.join("disk.img");
    sparse_file(&disk, 40 * MIB);
    let script = "label: gpt\nstart=2048, size=30720, type=L\nstart=34816, size=36864, type=L\n";
    run_stdin_ok(
        "sfdisk",
        &["-q", "--no-reread", "--no-tell-kernel", p(&disk)],
        script.as_bytes(),
    );
    let parts = [(MIB, 15 * MIB), (17 * MIB, 18 * MIB)];
    let mut expected = Vec::new();
    for (i, (start, size)) in parts.iter().enumerate() {
        run_ok(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                &format!("offset={start},lazy_itable_init=0,lazy_journal_init=0"),
                p(&disk),
                &format!("{}k", size / 1024),
            ],
        );
        let opts = format!("loop,offset={start},sizelimit={size}");
        let m = Mount::new(&disk, &dir.join(&format!("fill{i}")), Some(&opts));
        fill(&m.dir, &mut Rng::new(100 + i as u64));
        m.unmount();
        expected.push(hashes_of(
            &disk,
            &format!("{opts},ro"),
            &dir.join(&format!("src{i}")),
        ));
    }
    let repo = dir.join("repo");
    init_repo(&repo, &[]);
    backup_json(&disk, &repo, &[]);
    let view = dir.join("view");
    let files = dir.join("files");
    let info = mount_view(&repo, &view, &["--files", p(&files)]);
    let mut names: Vec<String> = std::fs::read_dir(&view)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["part1.img", "part2.img", "volume.img"], "{info}");
    for (i, (start, size)) in parts.iter().enumerate() {
        let part = view.join(format!("part{}.img", i + 1));
        assert_eq!(std::fs::metadata(&part).unwrap().len(), *size);
        // The partition file is the disk's byte range.
        let (a, b) = (
            std::fs::File::open(&part).unwrap(),
            std::fs::File::open(view.join("volume.img")).unwrap(),
        );
        let (mut x, mut y) = (vec![0u8; 8192], vec![0u8; 8192]);
        a.read_exact_at(&mut x, 1024).unwrap();
        b.read_exact_at(&mut y, start + 1024).unwrap();
        assert_eq!(x, y);
        assert_eq!(
            tree_hashes(&files.join(format!("part{}", i + 1))),
            expected[i]
        );
    }
    umount(&view);
    assert_clean(dir.path());
}

#[test]
fn ntfs_snapshot_through_the_loop_driver() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let dir = TestDir::new();
    let img = dir.join("ntfs.img");
    sparse_file(&img, 32 * MIB);
    run_ok("mkfs.ntfs", &["-q", "-F", "-f", p(&img)]);
    let fill_dir = dir.join("fill");
    std::fs::create_dir_all(&fill_dir).unwrap();
    run_ok("ntfs-3g", &[p(&img), p(&fill_dir)]);
    fill(&fill_dir, &mut Rng::new(3));
    run_ok("umount", &[p(&fill_dir)]);
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    run_ok("ntfs-3g", &["-o", "ro", p(&img), p(&src)]);
    let expected = tree_hashes(&src);
    run_ok("umount", &[p(&src)]);
    assert!(expected.len() >= 40);

    let repo = dir.join("repo");
    init_repo(&repo, &[]);
    backup_json(&img, &repo, &[]);
    let view = dir.join("view");
    let info = mount_view(&repo, &view, &[]);
    assert_eq!(info["images"][0]["filesystem"], "ntfs", "{info}");
    // The kernel loop driver on the view's image, NTFS read by ntfs-3g from the loop device.
    let lo = Loop::attach(&view.join("volume.img"), true);
    let got = dir.join("got");
    std::fs::create_dir_all(&got).unwrap();
    run_ok("ntfs-3g", &["-o", "ro", p(lo.path()), p(&got)]);
    let h = tree_hashes(&got);
    run_ok("umount", &[p(&got)]);
    drop(lo);
    assert_eq!(h, expected);
    umount(&view);
    assert_clean(dir.path());
}

/// A source with a bad block (ddrescue's case): the FUSE view of a snapshot one of whose
/// blobs was damaged returns EIO for that block. Backing the view up retries the failing
/// run sector by sector, stores the unreadable sectors as zeros, records them in the
/// snapshot, and exits 3; every other byte is backed up.
#[test]
fn unreadable_sectors_are_zero_filled_recorded_and_exit_3() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let dir = TestDir::new();
    let img = dir.join("ext4.img");
    sparse_file(&img, 32 * MIB);
    mkfs_ext4_with(&img, &["-b", "4096"]);
    let mut rng = Rng::new(77);
    {
        let m = Mount::new(&img, &dir.join("fill"), Some("loop"));
        fill(&m.dir, &mut rng);
        std::fs::write(m.dir.join("big.bin"), rng.bytes(4 * MIB as usize)).unwrap();
        m.unmount();
    }
    // The 1 MiB block holding logical block 300 of big.bin: in a repository of 1 MiB blocks,
    // one blob alone in its frame, so that the damage is exactly that block.
    let bmap = run_ok("debugfs", &["-R", "bmap /big.bin 300", p(&img)]);
    let fs_block: u64 = bmap
        .stdout
        .trim()
        .parse()
        .expect("debugfs bmap prints a number");
    let bs = MIB;
    let index = fs_block * 4096 / bs;

    let repo_a = dir.join("repo-a");
    init_repo(&repo_a, &["--block-size", "1M"]);
    let snap_a = jstr(&backup_json(&img, &repo_a, &[]), "/snapshot").to_string();
    let loc = locate_block(&repo_a, &snap_a, index);
    assert_eq!(loc.entry.len, bs, "one block, one blob");
    corrupt_frame(&loc.pack_path, &loc.entry);

    let view = dir.join("view");
    mount_view(&repo_a, &view, &[]);
    let repo_b = dir.join("repo-b");
    init_repo(&repo_b, &[]);
    let failing = view.join("volume.img");
    let r = volback(&["backup", "--json", p(&failing), p(&repo_b)]).expect_code(3);
    r.stderr_has(&["unreadable", "stored as zeros"]);
    let v = r.json();
    assert_eq!(
        v["unreadable"],
        serde_json::json!([[index * bs, bs]]),
        "exactly the damaged block is unreadable: {v}"
    );
    umount(&view);
    assert_clean(dir.path());

    let restored = dir.join("restored.img");
    restore(&repo_b, "latest", &restored).expect_code(0);
    let got = std::fs::read(&restored).unwrap();
    assert!(
        got[(index * bs) as usize..((index + 1) * bs) as usize]
            .iter()
            .all(|&b| b == 0)
    );
    run_ok("e2fsck", &["-fn", p(&restored)]);
    let list = volback_ok(&["snapshots", "--json", p(&repo_b)]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
}

/// A FAT snapshot with `--files` (no kernel vfat here: the FUSE driver `fusefat` reads the
/// view's image); `umount` finds that mount too and leaves nothing behind.
#[test]
fn fat_snapshot_files_through_a_fuse_driver() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let dir = TestDir::new();
    let img = dir.join("fat.img");
    sparse_file(&img, 32 * MIB);
    run_ok("mkfs.vfat", &[p(&img)]);
    let mut rng = Rng::new(91);
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..12 {
        let name = format!("F{i}.BIN");
        let len = (rng.below(300) * KIB) as usize + 5;
        let data = rng.bytes(len);
        let src = dir.join(&name);
        std::fs::write(&src, &data).unwrap();
        run_ok("mcopy", &["-i", p(&img), p(&src), &format!("::{name}")]);
        expected.insert(name, sha256_bytes(&data));
    }
    let repo = dir.join("repo");
    init_repo(&repo, &[]);
    backup_json(&img, &repo, &[]);
    let view = dir.join("view");
    let files = dir.join("files");
    mount_view(&repo, &view, &["--files", p(&files)]);
    assert_eq!(tree_hashes(&files), expected);
    umount(&view);
    assert_clean(dir.path());
}
