//! Real ext4 filesystems on loop devices: back up the device and its image file, change files,
//! back up again, restore both snapshots, check with `e2fsck -fn` and file checksums; restore
//! onto block devices; refusals of unsafe restore targets.

use crate::util::*;
use std::collections::BTreeMap;
use std::path::Path;

/// `mkfs.ext4` without background initialisation, so that nothing changes the volume after
/// it is unmounted.
fn mkfs_ext4(target: &Path) {
    run_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            p(target),
        ],
    );
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
fn populate(root: &Path, rng: &mut Rng, count: usize) {
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
fn modify(root: &Path, rng: &mut Rng) {
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

/// Restores `snapshot` to a file and checks it: SHA-256 of the whole image, `e2fsck -fn`, and
/// (when `files` is given) every file's SHA-256 through a read-only loop mount.
fn check_restored(
    t: &TestDir,
    repo: &Path,
    snapshot: &str,
    name: &str,
    image_sha: &str,
    files: Option<&BTreeMap<String, String>>,
) {
    let out = t.join(&format!("{name}.img"));
    restore(repo, snapshot, &out);
    assert_eq!(
        sha256_file(&out),
        image_sha,
        "{name}: restored image differs from the volume at backup time"
    );
    run_ok("e2fsck", &["-fn", p(&out)]);
    if let Some(files) = files {
        let lo = Loop::attach(&out, true);
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
    std::fs::remove_file(&out).unwrap();
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
    let mut rng = Rng::new(10);
    sparse_file(&img, 256 * MIB);
    init_repo(&repo, &[]);
    let lo = Loop::attach(&img, false);
    mkfs_ext4(&lo.dev);

    let m = Mount::new(&lo.dev, &mnt, None);
    populate(&m.dir, &mut rng, 300);
    let files1 = tree_hashes(&m.dir);
    m.unmount();
    assert!(files1.len() > 300);
    let sha1 = sha256_file(&img);
    assert_eq!(sha256_file(&lo.dev), sha1, "device and backing file agree");

    let d1 = backup_json(&lo.dev, &repo, &[]);
    let f1 = backup_json(&img, &repo, &[]);
    assert!(d1["parent"].is_null() && f1["parent"].is_null());
    // Device and file hold the same bytes: the second backup stores nothing new.
    assert_eq!(ju64(&f1, "/new_chunks"), 0, "{f1}");
    let list = volback_ok(&["snapshots", "--json", p(&repo)]).json();
    let dev_entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == d1["snapshot"])
        .expect("device snapshot listed");
    assert_eq!(dev_entry["source"].as_str(), Some(p(&lo.dev)));
    assert_eq!(ju64(dev_entry, "/size"), 256 * MIB);

    let m = Mount::new(&lo.dev, &mnt, None);
    modify(&m.dir, &mut rng);
    let files2 = tree_hashes(&m.dir);
    m.unmount();
    let sha2 = sha256_file(&img);
    assert_ne!(sha1, sha2);

    let d2 = backup_json(&lo.dev, &repo, &[]);
    let f2 = backup_json(&img, &repo, &[]);
    assert_eq!(d2["parent"], d1["snapshot"], "{d2}");
    assert_eq!(f2["parent"], f1["snapshot"], "{f2}");
    // Only the changed part of the filesystem is stored again.
    assert!(
        ju64(&d2, "/new_bytes") < 32 * MIB,
        "incremental stored too much: {d2}"
    );
    assert!(
        ju64(&d2, "/stats/unchanged_blocks") > 0,
        "no block recognised as unchanged: {d2}"
    );

    let id = |v: &serde_json::Value| jstr(v, "/snapshot").to_string();
    check_restored(&t, &repo, &id(&d1), "dev1", &sha1, Some(&files1));
    check_restored(&t, &repo, &id(&d2), "dev2", &sha2, Some(&files2));
    check_restored(&t, &repo, &id(&f1)[..12], "file1", &sha1, None);
    check_restored(
        &t,
        &repo,
        &format!("latest:{}", p(&img)),
        "file2",
        &sha2,
        None,
    );
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
    volback_ok(&["restore", p(&repo), "latest", p(&target.dev)])
        .stdout_has(&["restored snapshot", "verified"]);
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
        repo.join("chunks/00/x.img"),
        repo.join("config"),
        repo.clone(),
    ] {
        volback_code(&["restore", p(&repo), "latest", p(&target)], 1)
            .stderr_has(&["refusing", "inside"]);
    }
    assert!(!repo.join("restored.img").exists());
    assert!(!repo.join("chunks/00/x.img").exists());
    // The repository is intact.
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);
    // Through a path with `..` too.
    let sneaky = format!("{}/chunks/../tmp/../snap.img", p(&repo));
    volback_code(&["restore", p(&repo), "latest", &sneaky], 1).stderr_has(&["refusing"]);
    assert!(!repo.join("snap.img").exists());
}
