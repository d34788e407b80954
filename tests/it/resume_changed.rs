//! Issue 11 item 1: an interrupted backup or copy is resumed only when its source is proven
//! unchanged; otherwise the run starts over and says why, and the result is the new state of
//! the source, never a mix of two states.
//!
//! Interruptions are deterministic: the run is started through the library with a progress
//! observer that sets the cancel flag (what Ctrl-C sets) as soon as the first block is
//! committed. With one worker the scan pipeline holds a few staging buffers in flight (runs of
//! up to 16 MiB at most for a backup of format 2), so a source with far more used data than
//! that is always interrupted with a journal that covers a prefix of it, wherever the
//! filesystem put its files (raw sources here are at least 128 MiB).

use crate::util::*;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use volback::progress::Progress;

/// Sets the cancel flag at the first committed block.
struct CancelAtFirstBlock(Arc<AtomicBool>);

impl Progress for CancelAtFirstBlock {
    fn advance(&self, bytes: u64) {
        if bytes > 0 {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs a backup of `src` into `repo` (one worker, a checkpoint after every batch) that is
/// interrupted right after it started; the journal must cover some blocks.
///
/// It opens the repository with `Repository::open` (no password), so the tests that use it
/// make plain repositories (`--no-encryption`).
fn interrupted_backup(src: &Path, repo: &Path) {
    let flag = Arc::new(AtomicBool::new(false));
    let repository = volback::repo::Repository::open(repo).expect("open repository");
    let source = volback::source::Source::open(src).expect("open source");
    let opts = volback::backup::BackupOptions {
        threads: 1,
        checkpoint_interval: std::time::Duration::ZERO,
        cancel: Some(flag.clone()),
        // An incremental reads every used block too (change tracking would skip most).
        rehash: true,
        ..Default::default()
    };
    let r = volback::backup::backup(&repository, &source, &opts, &CancelAtFirstBlock(flag));
    match r {
        Err(volback::error::Error::Interrupted { checkpointed: true }) => {}
        other => panic!("the backup was not interrupted: {other:?}"),
    }
    assert!(
        journal_blocks(repo) > 0,
        "the journal covers finished blocks"
    );
}

/// Runs `copy --update` of `src` into the copy `dest` through the library, interrupted right
/// after it started.
fn interrupted_update(src: &Path, dest: &Path) {
    let flag = Arc::new(AtomicBool::new(false));
    let source = volback::source::Source::open(src).expect("open source");
    let opts = volback::copy::CopyOptions {
        threads: 1,
        checkpoint_interval: std::time::Duration::ZERO,
        cancel: Some(flag.clone()),
        ..Default::default()
    };
    let r = volback::copy::update(&source, dest, &opts, &CancelAtFirstBlock(flag));
    match r {
        Err(volback::error::Error::Interrupted { checkpointed: true }) => {}
        other => panic!("the update was not interrupted: {other:?}"),
    }
}

const FS_SIZE: u64 = 256 * MIB;

/// A 256 MiB ext4 image holding 24 files of 4 MiB of random data (seeded).
fn ext4_with_files(t: &TestDir) -> std::path::PathBuf {
    let img = t.join("e4.img");
    sparse_file(&img, FS_SIZE);
    run_ok("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", p(&img)]);
    let lo = Loop::attach(&img, false);
    let m = Mount::new(lo.path(), &t.join("mnt"), None);
    for i in 0..24u64 {
        random_file(&m.dir.join(format!("old{i:02}.bin")), 4 * MIB, 100 + i);
    }
    m.unmount();
    drop(lo);
    img
}

/// Mounts `img` read-write, runs `f` on the mount point, unmounts.
fn with_mounted(t: &TestDir, img: &Path, f: impl FnOnce(&Path)) {
    let lo = Loop::attach(img, false);
    let m = Mount::new(lo.path(), &t.join("mnt"), None);
    f(&m.dir);
    m.unmount();
    drop(lo);
}

/// Restores the latest snapshot of `repo`, checks it with `e2fsck -fn` and returns every
/// file's SHA-256 read through a read-only mount.
fn restored_tree(t: &TestDir, repo: &Path) -> std::collections::BTreeMap<String, String> {
    let out = t.join("restored.img");
    let _ = std::fs::remove_file(&out);
    restore(repo, "latest", &out);
    run_ok("e2fsck", &["-fn", p(&out)]);
    let lo = Loop::attach(&out, true);
    let m = Mount::new(lo.path(), &t.join("rmnt"), Some("ro"));
    let tree = tree_hashes(&m.dir);
    m.unmount();
    tree
}

fn source_tree(t: &TestDir, img: &Path) -> std::collections::BTreeMap<String, String> {
    let lo = Loop::attach(img, true);
    let m = Mount::new(lo.path(), &t.join("smnt"), Some("ro"));
    let tree = tree_hashes(&m.dir);
    m.unmount();
    tree
}

/// Runs `volback backup --json` and returns the report and stderr.
fn backup_with_stderr(src: &Path, repo: &Path) -> (serde_json::Value, String) {
    let r = volback_ok(&["backup", "--json", p(src), p(repo)]);
    (r.json(), r.stderr.clone())
}

fn assert_started_over(report: &serde_json::Value, stderr: &str, why: &str) {
    assert_eq!(report["resumed"], false, "{report}");
    assert!(
        stderr.contains("not resuming the interrupted backup") && stderr.contains(why),
        "the run must say why it starts over ({why}): {stderr}"
    );
}

/// Reproduction (a): files deleted and new ones written between the interruption and the
/// next run. The run starts over, and the restore holds the new files.
#[test]
fn backup_of_ext4_changed_after_interruption_starts_over() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = ext4_with_files(&t);
    let repo = t.join("repo");
    init_repo(&repo, &["--no-encryption"]);
    interrupted_backup(&img, &repo);
    with_mounted(&t, &img, |d| {
        for i in (0..24).step_by(3) {
            std::fs::remove_file(d.join(format!("old{i:02}.bin"))).unwrap();
        }
        for i in 0..6u64 {
            random_file(&d.join(format!("new{i}.bin")), 3 * MIB, 900 + i);
        }
    });
    let (report, stderr) = backup_with_stderr(&img, &repo);
    assert_started_over(&report, &stderr, "the source changed since it started");
    assert!(stderr.contains("ext4 write markers"), "{stderr}");
    assert!(journals(&repo).is_empty());
    let restored = restored_tree(&t, &repo);
    assert!(restored.contains_key("new5.bin"), "{restored:?}");
    assert_eq!(restored, source_tree(&t, &img));
}

/// A change that keeps the allocation identical: a file overwritten in place.
#[test]
fn backup_of_ext4_overwritten_in_place_starts_over() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = ext4_with_files(&t);
    let repo = t.join("repo");
    init_repo(&repo, &["--no-encryption"]);
    interrupted_backup(&img, &repo);
    let noise = t.join("noise.bin");
    random_file(&noise, 4 * MIB, 77);
    with_mounted(&t, &img, |d| {
        for i in 0..24 {
            let target = d.join(format!("old{i:02}.bin"));
            run_ok(
                "dd",
                &[
                    &format!("if={}", p(&noise)),
                    &format!("of={}", p(&target)),
                    "bs=1M",
                    "conv=notrunc,fsync",
                    "status=none",
                ],
            );
        }
    });
    let (report, stderr) = backup_with_stderr(&img, &repo);
    assert_started_over(&report, &stderr, "the source changed since it started");
    let restored = restored_tree(&t, &repo);
    assert_eq!(restored, source_tree(&t, &img));
    assert_eq!(restored["old00.bin"], sha256_file(&noise));
}

/// A raw source (no filesystem) rewritten in a block finished before the interruption.
#[test]
fn backup_of_raw_source_rewritten_in_a_finished_block_starts_over() {
    let t = TestDir::new();
    let src = t.join("raw.img");
    random_file(&src, 128 * MIB, 5);
    let repo = t.join("repo");
    init_repo(&repo, &["--no-encryption"]);
    interrupted_backup(&src, &repo);
    write_at(&src, 4096, &[0x5a; 8192]);
    let (report, stderr) = backup_with_stderr(&src, &repo);
    assert_started_over(&report, &stderr, "file identity, size, modification");
    let out = t.join("restored.img");
    restore(&repo, "latest", &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
}

/// An unchanged source still resumes, reading less than a full run.
#[test]
fn backup_of_unchanged_ext4_resumes() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = ext4_with_files(&t);
    let repo = t.join("repo");
    init_repo(&repo, &["--no-encryption"]);
    interrupted_backup(&img, &repo);
    let (report, stderr) = backup_with_stderr(&img, &repo);
    assert_eq!(report["resumed"], true, "{report}\n{stderr}");
    assert!(!stderr.contains("not resuming"), "{stderr}");
    assert!(
        ju64(&report, "/bytes_read") < ju64(&report, "/stats/bytes_read"),
        "{report}"
    );
    assert_eq!(restored_tree(&t, &repo), source_tree(&t, &img));
}

/// A block device source (a loop device): an unchanged device resumes; after a write through
/// a mount, its write counters differ and the backup starts over.
#[test]
fn backup_of_block_device_resumes_only_while_its_write_counters_stand() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = ext4_with_files(&t);
    let lo = Loop::attach(&img, false);
    let repo = t.join("repo");
    init_repo(&repo, &["--no-encryption"]);
    interrupted_backup(lo.path(), &repo);
    let (report, stderr) = backup_with_stderr(lo.path(), &repo);
    assert_eq!(report["resumed"], true, "{report}\n{stderr}");

    interrupted_backup(lo.path(), &repo);
    let m = Mount::new(lo.path(), &t.join("mnt"), None);
    std::fs::remove_file(m.dir.join("old03.bin")).unwrap();
    random_file(&m.dir.join("late.bin"), 2 * MIB, 55);
    m.unmount();
    let (report, stderr) = backup_with_stderr(lo.path(), &repo);
    assert_started_over(&report, &stderr, "write counters of");
    drop(lo);
    assert_eq!(restored_tree(&t, &repo), source_tree(&t, &img));
}

/// A journal written before volback recorded the source state (its header has no
/// `source_state`) is not resumed: nothing proves the source did not change.
#[test]
fn journal_without_source_state_starts_over() {
    let t = TestDir::new();
    let src = t.join("raw.img");
    random_file(&src, 192 * MIB, 6);
    let repo = t.join("repo");
    init_repo(&repo, &["--no-encryption"]);
    interrupted_backup(&src, &repo);
    // Rewrite the journal header without the field (FORMAT.md §5: magic, version, length,
    // JSON, BLAKE3 of the JSON).
    let path = journals(&repo).into_iter().next().unwrap();
    let b = std::fs::read(&path).unwrap();
    let hlen = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&b[16..16 + hlen]).unwrap();
    assert!(
        header
            .as_object_mut()
            .unwrap()
            .remove("source_state")
            .is_some()
    );
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = b[..12].to_vec();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(blake3::hash(&json).as_bytes());
    out.extend_from_slice(&b[16 + hlen + 32..]);
    std::fs::write(&path, out).unwrap();
    let (report, stderr) = backup_with_stderr(&src, &repo);
    assert_started_over(&report, &stderr, "older volback");
    let restored = t.join("restored.img");
    restore(&repo, "latest", &restored);
    assert_eq!(sha256_file(&restored), sha256_file(&src));
}

/// Reproduction (b): `copy --update` of a raw copy interrupted, the source rewritten, then
/// run again: it starts over, and the copy is the source's new state bit for bit.
#[test]
fn copy_update_of_changed_source_starts_over() {
    let t = TestDir::new();
    let src = t.join("src.img");
    random_file(&src, 96 * MIB, 7);
    let dest = t.join("copy.img");
    volback_ok(&["copy", "--format", "raw", p(&src), p(&dest)]);
    // Every block changes, so that the update has work to interrupt.
    random_file(&src, 96 * MIB, 8);
    interrupted_update(&src, &dest);
    // The source changes again, in blocks the interrupted run had finished.
    random_file(&src, 96 * MIB, 9);
    let r = volback_ok(&["copy", "--update", "--json", p(&src), p(&dest)]);
    assert!(
        r.stderr.contains("not resuming the interrupted run")
            && r.stderr.contains("rewriting every block"),
        "{}",
        r.stderr
    );
    assert_eq!(r.json()["resumed"], false, "{}", r.stdout);
    if in_path("qemu-img") {
        run_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", p(&src), p(&dest)],
        );
    }
    assert_eq!(sha256_file(&dest), sha256_file(&src));
    volback_ok(&["verify", p(&dest)]);
}

/// An interrupted new copy whose source changed is started over from an empty copy.
#[test]
fn interrupted_new_copy_of_changed_source_starts_over() {
    let t = TestDir::new();
    let src = t.join("src.img");
    random_file(&src, 64 * MIB, 10);
    let dest = t.join("copy.img");
    let flag = Arc::new(AtomicBool::new(false));
    let source = volback::source::Source::open(&src).unwrap();
    let opts = volback::copy::CopyOptions {
        threads: 1,
        checkpoint_interval: std::time::Duration::ZERO,
        cancel: Some(flag.clone()),
        ..Default::default()
    };
    let r = volback::copy::copy(&source, &dest, &opts, &CancelAtFirstBlock(flag));
    assert!(
        matches!(r, Err(volback::error::Error::Interrupted { .. })),
        "{r:?}"
    );
    drop(source);
    write_at(&src, 0, &[0xa5; 4096]);
    let r = volback_ok(&["copy", "--update", "--json", p(&src), p(&dest)]);
    assert!(r.stderr.contains("starting the copy over"), "{}", r.stderr);
    assert_eq!(sha256_file(&dest), sha256_file(&src));
    volback_ok(&["verify", p(&dest)]);
}

/// The source state of an image, with fixed platform markers (so that only what volback reads
/// from the volume itself is compared).
fn volume_state(img: &Path) -> volback::source_state::SourceState {
    let source = volback::source::Source::open(img).expect("open image");
    let m = volback::probe::disk::map_volume(&source, 512, 256 * KIB).expect("map");
    let fixed = volback::source_state::Marker {
        what: "fixed".into(),
        hash: String::new(),
    };
    volback::source_state::SourceState::capture_volume(
        &source,
        Some(fixed),
        m.fs.as_ref(),
        m.layout.as_ref(),
        m.map.as_ref(),
    )
}

/// The write markers volback reads from each filesystem (see FORMAT.md §5.1) are stable while
/// it is untouched and change when a file is written into a subdirectory through the
/// filesystem's own driver.
#[test]
fn filesystem_write_markers_change_when_a_file_is_written() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let t = TestDir::new();
    let payload = t.join("payload.bin");
    random_file(&payload, 192 * KIB, 31);
    for (fs, size) in [
        ("ext4", 64 * MIB),
        ("xfs", 320 * MIB),
        ("btrfs", 128 * MIB),
        ("ntfs", 64 * MIB),
        ("vfat", 64 * MIB),
        ("exfat", 64 * MIB),
    ] {
        let img = t.join(&format!("{fs}.img"));
        sparse_file(&img, size);
        let i = p(&img);
        match fs {
            "ext4" => run_ok("mkfs.ext4", &["-q", "-F", i]),
            "xfs" => run_ok("mkfs.xfs", &["-q", "-f", i]),
            "btrfs" => run_ok("mkfs.btrfs", &["-q", "-f", i]),
            "ntfs" => run_ok("mkntfs", &["-Q", "-F", "-q", i]),
            "vfat" => run_ok("mkfs.vfat", &["-F", "32", "-s", "1", i]),
            _ => run_ok("mkfs.exfat", &[i]),
        };
        // Writes `name` (the payload) into the directory `d`, created if needed.
        let write = |name: &str| {
            if fs == "vfat" {
                let _ = run_program("mmd", &["-i", i, "::/d"]);
                run_ok("mcopy", &["-i", i, p(&payload), &format!("::/d/{name}")]);
                return;
            }
            let lo = Loop::attach(&img, false);
            let dir = t.join(&format!("{fs}.mnt"));
            let m = match fs {
                "ntfs" => Mount::with_command("ntfs-3g", &[p(&lo.dev), p(&dir)]),
                "exfat" => Mount::with_command("mount.exfat-fuse", &[p(&lo.dev), p(&dir)]),
                _ => Mount::new(lo.path(), &dir, None),
            };
            std::fs::create_dir_all(m.dir.join("d")).unwrap();
            std::fs::copy(&payload, m.dir.join("d").join(name)).unwrap();
            m.unmount();
            drop(lo);
        };
        write("a.bin");
        let before = volume_state(&img);
        assert_eq!(
            before.filesystems.len(),
            1,
            "{fs}: a filesystem is recognised"
        );
        assert_eq!(
            before.change_from(&volume_state(&img)),
            None,
            "{fs}: the markers of an untouched filesystem are stable"
        );
        write("b.bin");
        let why = before
            .change_from(&volume_state(&img))
            .unwrap_or_else(|| panic!("{fs}: writing a file changes its write markers"));
        let name = before.filesystems[0].fs_type.clone();
        assert!(
            why.contains(&format!("{name} write markers at offset 0")),
            "{fs}: {why}"
        );
    }
}

/// A change to the partition table alone (a GPT partition's name) is seen.
#[test]
fn partition_table_marker_changes_with_the_table() {
    if !in_path("sfdisk") {
        eprintln!("skipped: sfdisk is not installed");
        return;
    }
    let t = TestDir::new();
    let img = t.join("disk.img");
    sparse_file(&img, 64 * MIB);
    run_stdin_ok("sfdisk", &["-q", p(&img)], b"label: gpt\n,16M\n,\n");
    let before = volume_state(&img);
    assert!(before.partition_table.is_some(), "{before:?}");
    assert_eq!(before.change_from(&volume_state(&img)), None);
    run_ok("sfdisk", &["-q", "--part-label", p(&img), "2", "renamed"]);
    let why = before.change_from(&volume_state(&img)).unwrap();
    assert!(why.contains("partition table"), "{why}");
}

/// Issue 11 item 3, on format 2: blobs that a resume journal names but whose pack was
/// deleted since the interruption (by hand, by a disk error), or damaged and set aside by
/// `verify --read-data`, are not carried into the snapshot: the run starts over or stores
/// them again, says so, and the result restores bit-exact.
#[test]
fn backup_whose_journal_names_a_lost_or_damaged_pack_does_not_use_it() {
    for damage in ["delete", "truncate"] {
        let t = TestDir::new();
        let src = t.join("raw.img");
        random_file(&src, 128 * MIB, 9);
        let repo = t.join("repo");
        init_repo(&repo, &["--no-encryption"]);
        interrupted_backup(&src, &repo);
        let packs = pack_files(&repo);
        assert!(!packs.is_empty(), "the interrupted run stored packs");
        for c in &packs {
            match damage {
                "delete" => std::fs::remove_file(c).expect("delete pack"),
                _ => std::fs::OpenOptions::new()
                    .write(true)
                    .open(c)
                    .and_then(|f| f.set_len(100))
                    .expect("truncate pack"),
            }
        }
        if damage == "truncate" {
            // Damage inside an existing file is found by reading it.
            volback_code(&["verify", "--read-data", p(&repo)], 1);
            assert!(!bad_packs(&repo).is_empty(), "truncated packs set aside");
        }
        let (report, stderr) = backup_with_stderr(&src, &repo);
        let said = stderr.contains("not resuming the interrupted backup")
            || stderr.contains("missing or damaged");
        assert!(
            said,
            "{damage}: the run must say that blobs were lost: {stderr}"
        );
        assert!(report["snapshot"].is_string(), "{damage}: {report}");
        let out = t.join("restored.img");
        restore(&repo, "latest", &out);
        assert_eq!(sha256_file(&out), sha256_file(&src), "{damage}");
        volback_ok(&["verify", "--read-data", p(&repo)]);
    }
}
