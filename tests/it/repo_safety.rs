//! Issue 11, items 4, 5, 8 and 9: repository files that are symbolic links or FIFOs, restore
//! targets that are the same file or device as something in use (by identity, not path),
//! `restore --only-changed` onto a huge sparse file, failed restores, temporary files left by
//! killed writers, and repositories without a `lock` file.

use crate::util::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `volback ARGS` under `timeout -s KILL`: a safety net so that a hang fails the test instead
/// of blocking the suite (the limit is generous; it asserts nothing about speed).
fn volback_guarded(args: &[&str]) -> Run {
    let mut all = vec!["-s", "KILL", "300", VOLBACK];
    all.extend_from_slice(args);
    let mut c = Command::new("timeout");
    c.args(&all).envs(password_env(args)).stdin(Stdio::null());
    let r = run_command(c, &format!("timeout {}", all.join(" ")));
    assert!(
        r.code.is_some() && r.code != Some(137) && r.code != Some(124),
        "`volback {}` hung (killed by the safety timeout)",
        args.join(" ")
    );
    assert!(!r.stderr.contains("panicked"), "volback panicked: {r:?}");
    r
}

/// Runs `volback ARGS` (guarded) and asserts it fails (exit 1) mentioning every one of `needles`.
fn fails_with(args: &[&str], needles: &[&str]) -> Run {
    let r = volback_guarded(args);
    assert_eq!(r.code, Some(1), "expected failure: {r:?}");
    r.stderr_has(needles);
    r
}

fn mkfifo(path: &Path) {
    run_ok("mkfifo", &[p(path)]);
}

/// A repository holding one backup of a 6 MiB file of random data; returns (repo, source).
fn repo_with_backup(t: &TestDir) -> (PathBuf, PathBuf) {
    let repo = t.join("repo");
    let src = t.join("src.img");
    random_file(&src, 6 * MIB, 11);
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &[]);
    (repo, src)
}

fn volume_lock_files(repo: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo.join("journals"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "lock"))
        .collect()
}

#[test]
fn volume_lock_symlink_never_truncates_its_target() {
    let t = TestDir::new();
    let (repo, src) = repo_with_backup(&t);
    let locks = volume_lock_files(&repo);
    assert_eq!(locks.len(), 1, "one volume lock file after a backup");
    let victim = t.join("victim.txt");
    std::fs::write(
        &victim,
        b"precious data that a backup must never truncate\n",
    )
    .unwrap();
    std::fs::remove_file(&locks[0]).unwrap();
    std::os::unix::fs::symlink(&victim, &locks[0]).unwrap();
    fails_with(
        &["backup", p(&src), p(&repo)],
        &["symbolic link", "not a regular file"],
    );
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious data that a backup must never truncate\n"
    );
    // The repository lock too: refused, victim untouched.
    std::fs::remove_file(repo.join("lock")).unwrap();
    std::os::unix::fs::symlink(&victim, repo.join("lock")).unwrap();
    fails_with(&["snapshots", p(&repo)], &["symbolic link"]);
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious data that a backup must never truncate\n"
    );
}

#[test]
fn volume_lock_file_is_not_truncated() {
    // A lock file is opened without truncation: whatever it holds stays (it is a regular
    // file of the repository; nothing follows a link through it).
    let t = TestDir::new();
    let (repo, src) = repo_with_backup(&t);
    let lock = &volume_lock_files(&repo)[0];
    std::fs::write(lock, b"marker").unwrap();
    volback_ok(&["backup", p(&src), p(&repo)]);
    assert_eq!(std::fs::read(lock).unwrap(), b"marker");
}

#[test]
fn fifos_in_a_repository_fail_fast_with_a_clear_message() {
    let t = TestDir::new();
    let (repo, src) = repo_with_backup(&t);
    let id = snapshot_ids(&repo).remove(0);
    let target = t.join("out.img");

    // A FIFO as a snapshot file (a 64-hex-digit name): naming it fails, never blocks.
    let fake_id = "ab".repeat(32);
    mkfifo(&repo.join("snapshots").join(&fake_id));
    fails_with(
        &["restore", p(&repo), &fake_id, p(&target)],
        &["FIFO", "not a regular file"],
    );
    std::fs::remove_file(repo.join("snapshots").join(&fake_id)).unwrap();

    // A FIFO as a pack: the restore fails naming it, and removes the file it created.
    let pack = largest_pack(&repo);
    std::fs::remove_file(&pack).unwrap();
    mkfifo(&pack);
    fails_with(&["restore", p(&repo), &id, p(&target)], &["FIFO"]);
    assert!(!target.exists(), "an incomplete restore left its file");
    let v = volback_guarded(&["verify", "--read-data", p(&repo)]);
    assert_eq!(v.code, Some(1), "{v:?}");
    assert!(v.all_output().contains("FIFO"), "{v:?}");
    std::fs::remove_file(&pack).unwrap();

    // A FIFO as the repository lock.
    std::fs::remove_file(repo.join("lock")).unwrap();
    mkfifo(&repo.join("lock"));
    fails_with(&["snapshots", p(&repo)], &["FIFO"]);
    fails_with(&["backup", p(&src), p(&repo)], &["FIFO"]);
    std::fs::remove_file(repo.join("lock")).unwrap();

    // A FIFO as the config.
    std::fs::remove_file(repo.join("config")).unwrap();
    mkfifo(&repo.join("config"));
    fails_with(&["snapshots", p(&repo)], &["FIFO", "config"]);
    fails_with(&["restore", p(&repo), &id, p(&target)], &["FIFO"]);
}

#[test]
fn restore_refuses_hard_links_to_repository_files() {
    let t = TestDir::new();
    let (repo, _src) = repo_with_backup(&t);
    let id = snapshot_ids(&repo).remove(0);
    let config_before = std::fs::read(repo.join("config")).unwrap();
    let link = t.join("innocent-looking.img");
    std::fs::hard_link(repo.join("config"), &link).unwrap();
    fails_with(
        &["restore", p(&repo), &id, p(&link)],
        &["refusing to restore", "repo"],
    );
    assert_eq!(std::fs::read(repo.join("config")).unwrap(), config_before);
    // A hard link to a snapshot file, and to a pack.
    let snap = repo.join("snapshots").join(&id);
    let snap_before = std::fs::read(&snap).unwrap();
    let link2 = t.join("snap-link.img");
    std::fs::hard_link(&snap, &link2).unwrap();
    fails_with(&["restore", p(&repo), &id, p(&link2)], &["refusing"]);
    assert_eq!(std::fs::read(&snap).unwrap(), snap_before);
    let pack = largest_pack(&repo);
    let pack_before = std::fs::read(&pack).unwrap();
    let link3 = t.join("pack-link.img");
    std::fs::hard_link(&pack, &link3).unwrap();
    fails_with(&["restore", p(&repo), &id, p(&link3)], &["refusing"]);
    assert_eq!(std::fs::read(&pack).unwrap(), pack_before);
    // The same repository through a symbolic link to its directory.
    let alias = t.join("alias");
    std::os::unix::fs::symlink(&repo, &alias).unwrap();
    fails_with(
        &[
            "restore",
            p(&repo),
            &id,
            p(&alias.join("snapshots").join("x")),
        ],
        &["refusing"],
    );
    volback_ok(&["verify", "--read-data", p(&repo)]);
}

#[test]
fn failed_restore_says_incomplete_and_removes_the_file_it_created() {
    let t = TestDir::new();
    let (repo, src) = repo_with_backup(&t);
    let id = snapshot_ids(&repo).remove(0);
    // An existing target, overwritten: it is left holding a partial restore, and says so.
    let existing = t.join("existing.img");
    restore(&repo, &id, &existing);
    assert_eq!(sha256_file(&existing), sha256_file(&src));
    // Every pack holding data damaged inside a frame (trees intact: the restore starts).
    for pack in pack_files(&repo) {
        if read_pack_table(&pack).iter().any(|e| e.kind == 0) {
            corrupt_pack(&pack);
        }
    }
    let r = fails_with(
        &["restore", p(&repo), &id, p(&existing)],
        &["incomplete restore", "do not use it"],
    );
    assert!(r.stderr.contains(p(&existing)), "{r:?}");
    // A new target: removed, and the message says so.
    let fresh = t.join("fresh.img");
    fails_with(
        &["restore", p(&repo), &id, p(&fresh)],
        &["incomplete file", "removed"],
    );
    assert!(!fresh.exists(), "the partial file was left behind");
    // The same with --only-changed onto a new file.
    fails_with(
        &["restore", "--only-changed", p(&repo), &id, p(&fresh)],
        &["removed"],
    );
    assert!(!fresh.exists());
}

#[test]
fn stale_temporary_files_are_removed_by_the_next_backup() {
    let t = TestDir::new();
    let (repo, src) = repo_with_backup(&t);
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    // What a kill -9 leaves: temporary files nobody holds.
    let dead = [
        repo.join("tmp").join(".tmp-deadbeef0000-0.snapshot"),
        repo.join("journals").join(".tmp-deadbeef0000-1.journal"),
        repo.join(".tmp-deadbeef0000-2"),
    ];
    for d in &dead {
        std::fs::write(d, b"").unwrap();
        std::fs::File::options()
            .write(true)
            .open(d)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }
    // A writer that is alive (this process holds its lock), just as old: kept.
    let live_path = repo.join("tmp").join(".tmp-0123456789ab-0.snapshot");
    let live = std::fs::File::create(&live_path).unwrap();
    live.set_modified(hour_ago).unwrap();
    live.lock().unwrap();
    // Something that is not a temporary file: kept.
    let other = repo.join("tmp").join("notes.txt");
    std::fs::write(&other, b"x").unwrap();

    volback_ok(&["backup", p(&src), p(&repo)]);
    for d in &dead {
        assert!(!d.exists(), "{} was not removed", d.display());
    }
    assert!(
        live_path.exists(),
        "a live writer's temporary file was removed"
    );
    assert!(other.exists());
    drop(live);

    // A real kill -9 during a backup, when the snapshot's temporary file shows up in time
    // (the fabricated files above make the assertion that matters regardless of timing).
    let big = t.join("big.img");
    random_file(&big, 96 * MIB, 12);
    let mut child = Command::new(VOLBACK)
        .args(["backup", "--threads", "1", p(&big), p(&repo)])
        .envs(password_env(&[p(&repo)]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp_files = || -> Vec<PathBuf> {
        std::fs::read_dir(repo.join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".snapshot"))
            .collect()
    };
    let mut seen = Vec::new();
    while child.try_wait().unwrap().is_none() {
        seen = tmp_files();
        if !seen.is_empty() {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.wait().unwrap();
    let left: Vec<PathBuf> = tmp_files()
        .into_iter()
        .filter(|f| seen.contains(f))
        .collect();
    if !left.is_empty() {
        volback_ok(&["backup", p(&big), p(&repo)]);
        for f in &left {
            assert!(!f.exists(), "{} survived the next backup", f.display());
        }
    }
    volback_ok(&["verify", p(&repo)]);
}

#[test]
fn restore_works_without_a_lock_file() {
    let t = TestDir::new();
    let (repo, src) = repo_with_backup(&t);
    std::fs::remove_file(repo.join("lock")).unwrap();
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    // Recreated (the repository is writable), empty.
    assert_eq!(std::fs::metadata(repo.join("lock")).unwrap().len(), 0);
}

#[test]
fn read_only_repository_without_a_lock_file_can_be_read() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (repo, src) = repo_with_backup(&t);
    std::fs::remove_file(repo.join("lock")).unwrap();
    // A read-only view of the repository (root ignores permission bits: a read-only bind
    // mount is what makes it unwritable).
    let ro = t.join("ro");
    std::fs::create_dir(&ro).unwrap();
    let m = Mount::new(&repo, &ro, Some("bind"));
    run_ok("mount", &["-o", "remount,ro,bind", p(&ro)]);
    let out = t.join("out.img");
    restore(&ro, "latest", &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    volback_ok(&["snapshots", p(&ro)]);
    volback_ok(&["verify", "--read-data", p(&ro)]);
    assert!(!repo.join("lock").exists());
    m.unmount();
}

/// A 64 MiB ext4 image holding a file, attached to a loop device and mounted.
fn mounted_image(t: &TestDir) -> (PathBuf, Loop, Mount) {
    let img = t.join("fs.img");
    sparse_file(&img, 64 * MIB);
    run_ok("mkfs.ext4", &["-q", "-F", p(&img)]);
    let lo = Loop::attach(&img, false);
    let m = Mount::new(lo.path(), &t.join("mnt"), None);
    std::fs::write(m.dir.join("hello.txt"), b"still here\n").unwrap();
    run_ok("sync", &[]);
    (img, lo, m)
}

#[test]
fn restore_refuses_a_second_loop_device_over_a_mounted_image() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (repo, _src) = repo_with_backup(&t);
    let (img, _lo, m) = mounted_image(&t);
    let second = Loop::attach(&img, false);
    fails_with(
        &["restore", p(&repo), "latest", p(second.path())],
        &["refusing", "mounted"],
    );
    fails_with(
        &[
            "restore",
            "--only-changed",
            p(&repo),
            "latest",
            p(second.path()),
        ],
        &["mounted"],
    );
    assert_eq!(
        std::fs::read(m.dir.join("hello.txt")).unwrap(),
        b"still here\n"
    );
    drop(second);
    m.unmount();
    run_ok("e2fsck", &["-fn", p(&img)]);
}

#[test]
fn restore_refuses_links_and_new_names_of_a_mounted_backing_file() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (repo, _src) = repo_with_backup(&t);
    let (img, _lo, m) = mounted_image(&t);
    let link = t.join("hard-link.img");
    std::fs::hard_link(&img, &link).unwrap();
    fails_with(&["restore", p(&repo), "latest", p(&link)], &["mounted"]);
    // Renamed after it was attached.
    let renamed = t.join("renamed.img");
    std::fs::rename(&img, &renamed).unwrap();
    fails_with(&["restore", p(&repo), "latest", p(&renamed)], &["mounted"]);
    // The link again, once the name the loop device knows is gone.
    std::fs::remove_file(&renamed).unwrap();
    fails_with(&["restore", p(&repo), "latest", p(&link)], &["mounted"]);
    assert_eq!(
        std::fs::read(m.dir.join("hello.txt")).unwrap(),
        b"still here\n"
    );
    m.unmount();
    run_ok("e2fsck", &["-fn", p(&link)]);
}

#[test]
fn only_changed_onto_a_huge_sparse_file_skips_its_holes() {
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    const TIB: u64 = 1 << 40;
    let src = t.join("sparse.img");
    sparse_file(&src, TIB);
    // v1: data in a few places, one of them at the very end.
    let mut rng = Rng::new(81);
    let v1_at = [0, 5 * MIB, 300 * 1024 * MIB, TIB - 2 * MIB];
    for &at in &v1_at {
        write_at(&src, at, &rng.bytes(2 * MIB as usize));
    }
    let v1 = backup_json(&src, &repo, &[]);
    let v1_id = jstr(&v1, "/snapshot").to_string();
    // v2: one range rewritten, one zeroed, one new.
    write_at(&src, 5 * MIB, &rng.bytes(MIB as usize));
    write_at(&src, 300 * 1024 * MIB, &vec![0u8; 2 * MIB as usize]);
    let new_at = 700 * 1024 * MIB + 12345;
    write_at(&src, new_at, &rng.bytes(3 * MIB as usize));
    let v2 = backup_json(&src, &repo, &[]);
    let v2_id = jstr(&v2, "/snapshot").to_string();

    let target = t.join("target.img");
    restore(&repo, &v1_id, &target);
    volback_ok(&["restore", "--only-changed", p(&repo), &v2_id, p(&target)]);
    assert_eq!(std::fs::metadata(&target).unwrap().len(), TIB);
    // Every range that held data in either version, and some holes, compared byte for byte.
    let mut ranges: Vec<(u64, u64)> = v1_at.iter().map(|&a| (a, 2 * MIB)).collect();
    ranges.push((new_at - MIB, 5 * MIB));
    ranges.push((512 * 1024 * MIB, MIB));
    for (at, len) in ranges {
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&src).unwrap(), &mut a, at)
            .unwrap();
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&target).unwrap(),
            &mut b,
            at,
        )
        .unwrap();
        assert!(a == b, "target differs from v2 in [{at}, +{len})");
    }
    // Still sparse: what it allocates is of the order of the data, not of the size.
    let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(allocated < 64 * MIB, "target allocates {allocated} bytes");
}

#[test]
fn restore_refuses_a_partition_of_a_second_loop_device_over_a_mounted_disk_image() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (repo, _src) = repo_with_backup(&t);
    let disk = t.join("disk.img");
    sparse_file(&disk, 64 * MIB);
    run_stdin_ok("sfdisk", &["-q", p(&disk)], b"label: dos\n,24M\n,\n");
    let first = attach_partitioned(&disk);
    let p1 = PathBuf::from(format!("{}p1", p(first.path())));
    run_ok("mkfs.ext4", &["-q", "-F", p(&p1)]);
    let m = Mount::new(&p1, &t.join("mnt"), None);
    let second = attach_partitioned(&disk);
    let q1 = PathBuf::from(format!("{}p1", p(second.path())));
    let q2 = PathBuf::from(format!("{}p2", p(second.path())));
    fails_with(&["restore", p(&repo), "latest", p(&q1)], &["mounted"]);
    fails_with(
        &["restore", p(&repo), "latest", p(second.path())],
        &["mounted"],
    );
    // The other partition holds nothing mounted: allowed.
    volback_ok(&["restore", p(&repo), "latest", p(&q2)]);
    run_program("partx", &["-d", p(second.path())]);
    drop(second);
    m.unmount();
    run_program("partx", &["-d", p(first.path())]);
}

/// A loop device over `file` with its partitions 1 and 2 (scanned by the kernel, or added with
/// `partx` where it does not scan).
fn attach_partitioned(file: &Path) -> Loop {
    let r = run_ok("losetup", &["--find", "--show", "--partscan", p(file)]);
    let l = Loop {
        dev: PathBuf::from(r.stdout.trim()),
    };
    let there = |l: &Loop| (1..=2).all(|n| Path::new(&format!("{}p{n}", l.dev.display())).exists());
    for round in 0..2 {
        for _ in 0..50 {
            if there(&l) {
                return l;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if round == 0 {
            run_program("partx", &["-a", p(&l.dev)]);
        }
    }
    panic!("the partitions of {} never appeared", l.dev.display());
}

/// The same bytes mounted through a loop device with an offset (`losetup -o`), and the
/// partition over them from another loop device of the file: refused. The partition's
/// device node is made with `partx`, never by the restore: a missing device path is refused
/// instead of being created as a plain file in /dev.
#[test]
fn restore_refuses_a_partition_over_a_range_mounted_through_an_offset_loop_device() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (repo, _src) = repo_with_backup(&t);
    let disk = t.join("disk.img");
    sparse_file(&disk, 64 * MIB);
    run_stdin_ok("sfdisk", &["-q", p(&disk)], b"label: dos\n,24M\n,\n");
    let r = run_ok(
        "losetup",
        &[
            "--find",
            "--show",
            "--offset",
            &(MIB).to_string(),
            "--sizelimit",
            &(24 * MIB).to_string(),
            p(&disk),
        ],
    );
    let ranged = Loop {
        dev: PathBuf::from(r.stdout.trim()),
    };
    run_ok("mkfs.ext4", &["-q", "-F", p(ranged.path())]);
    let m = Mount::new(ranged.path(), &t.join("mnt"), None);
    let second = attach_partitioned(&disk);
    let q1 = PathBuf::from(format!("{}p1", p(second.path())));
    fails_with(&["restore", p(&repo), "latest", p(&q1)], &["mounted"]);
    run_program("partx", &["-d", p(second.path())]);
    drop(second);
    m.unmount();
    drop(ranged);
}

#[test]
fn restore_refuses_a_device_path_that_does_not_exist() {
    let t = TestDir::new();
    let (repo, _src) = repo_with_backup(&t);
    let ghost = PathBuf::from(format!("/dev/volback-test-absent-{}", std::process::id()));
    fails_with(
        &["restore", p(&repo), "latest", p(&ghost)],
        &["no such device"],
    );
    assert!(!ghost.exists(), "the restore created {}", ghost.display());
}

/// A repository directory replaced by a symbolic link (journals/, tmp/, packs/, index/, a
/// pack fan-out directory) is refused: a link planted there must not redirect the
/// repository's writes.
#[test]
fn symlinked_repository_directories_are_refused() {
    for dir in [
        "journals",
        "tmp",
        "snapshots",
        "packs",
        "index",
        "writers",
        "pending",
    ] {
        let t = TestDir::new();
        let (repo, src) = repo_with_backup(&t);
        let elsewhere = t.join("elsewhere");
        std::fs::rename(repo.join(dir), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, repo.join(dir)).unwrap();
        let before = std::fs::read_dir(&elsewhere).unwrap().count();
        fails_with(
            &["backup", p(&src), p(&repo)],
            &[dir, "symbolic link", "not a directory"],
        );
        assert_eq!(
            std::fs::read_dir(&elsewhere).unwrap().count(),
            before,
            "{dir}"
        );
    }
    // The pack fan-out directories: a backup that would store a pack there refuses. Every
    // one of packs/00 … packs/ff is a link (whether init made them or not), so that the new
    // pack's directory is one.
    let t = TestDir::new();
    let (repo, _) = repo_with_backup(&t);
    let src = t.join("other.img");
    random_file(&src, 2 * MIB, 77);
    let elsewhere = t.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for i in 0..=255u8 {
        let d = repo.join("packs").join(format!("{i:02x}"));
        if d.is_dir() {
            std::fs::remove_dir_all(&d).unwrap();
        }
        std::os::unix::fs::symlink(&elsewhere, &d).unwrap();
    }
    fails_with(
        &["backup", p(&src), p(&repo)],
        &["symbolic link", "not a directory"],
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

/// A new file target is written as `TARGET.volback-incomplete` and renamed when complete: a
/// restore killed with -9 never leaves a partial image under the target's name, and a link
/// planted under the temporary name is not written through.
#[test]
fn killed_restore_never_leaves_a_partial_file_under_the_target_name() {
    let t = TestDir::new();
    let repo = t.join("repo");
    let src = t.join("src.img");
    random_file(&src, 192 * MIB, 21);
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &[]);
    let target = t.join("restored.img");
    let staging = t.join("restored.img.volback-incomplete");
    let mut child = std::process::Command::new(VOLBACK)
        .args(["restore", "--threads", "1", p(&repo), "latest", p(&target)])
        .envs(password_env(&[p(&repo)]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has started writing (or let it finish, if it is faster than us).
    for _ in 0..2000 {
        if staging.exists() || target.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Whatever the timing: the target name holds a complete restore or nothing.
    if target.exists() {
        assert_eq!(sha256_file(&target), sha256_file(&src));
    }
    // The next restore completes and leaves no temporary file.
    let _ = std::fs::remove_file(&target);
    restore(&repo, "latest", &target);
    assert_eq!(sha256_file(&target), sha256_file(&src));
    assert!(!staging.exists());
    // A link planted under the temporary name: removed, never written through.
    let victim = t.join("victim.txt");
    std::fs::write(&victim, b"keep me").unwrap();
    std::fs::remove_file(&target).unwrap();
    std::os::unix::fs::symlink(&victim, &staging).unwrap();
    restore(&repo, "latest", &target);
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(sha256_file(&target), sha256_file(&src));
    assert!(!staging.exists());
}
