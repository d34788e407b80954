//! Interrupted backups: kill -9 at several points and Ctrl-C (SIGINT). The repository must
//! stay valid after each interruption, and the next run must resume without re-reading or
//! re-storing what was finished.

use crate::util::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn spawn_backup(src: &Path, repo: &Path) -> Child {
    Command::new(VOLBACK)
        .args([
            "backup",
            "--json",
            "--checkpoint-secs",
            "0.2",
            p(src),
            p(repo),
        ])
        .envs(password_env(&[p(repo)]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn volback backup")
}

/// How a watched backup ended.
enum Ended {
    /// It finished by itself with exit code 0 before the condition was met.
    Completed,
    /// The condition was met and `signal` was delivered; the exit status follows.
    Signalled(std::process::Output),
}

/// Polls the repository every few milliseconds until `ready(repo)` holds, then runs
/// `signal(pid)`. A backup that finishes first must have succeeded.
fn watch(
    mut child: Child,
    repo: &Path,
    ready: impl Fn(&Path) -> bool,
    signal: impl Fn(&mut Child),
) -> Ended {
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            let out = child.wait_with_output().expect("collect output");
            assert!(
                out.status.success(),
                "backup failed before being interrupted: {:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            return Ended::Completed;
        }
        if ready(repo) {
            signal(&mut child);
            return Ended::Signalled(child.wait_with_output().expect("collect output"));
        }
        std::thread::sleep(Duration::from_millis(3));
    }
}

fn assert_repository_valid(repo: &Path) {
    volback_ok(&["verify", "--read-data", p(repo)]).stdout_has(&["no problems"]);
}

#[test]
fn kill_9_at_several_points_then_resume_without_rework() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let size = 400 * MIB;
    random_file(&src, size, 20);
    let sha = sha256_file(&src);
    init_repo(&repo, &[]);

    let mut completed_early = false;
    // Kill points in bytes of pack files (400 MiB of random data are stored as about 400
    // MiB of packs; packs left by a killed run that no index file names count too).
    for threshold in [24 * MIB, 140 * MIB, 260 * MIB] {
        let child = spawn_backup(&src, &repo);
        let ended = watch(
            child,
            &repo,
            |r| pack_bytes(r) > threshold,
            |c| c.kill().expect("SIGKILL"),
        );
        match ended {
            Ended::Completed => {
                eprintln!("backup finished before {threshold} bytes were stored; not killed");
                completed_early = true;
                break;
            }
            Ended::Signalled(out) => {
                assert_eq!(
                    out.status.code(),
                    None,
                    "killed by a signal: {:?}",
                    out.status
                );
            }
        }
        // Only committed snapshots are verified: the repository must be valid after a crash.
        assert_repository_valid(&repo);
        assert_eq!(
            journals(&repo).len(),
            1,
            "an interrupted backup leaves its resume journal in {}",
            repo.join("journals").display()
        );
        assert!(
            snapshot_ids(&repo).is_empty(),
            "no snapshot before completion"
        );
    }

    let last = backup_json(&src, &repo, &["--checkpoint-secs", "0.2"]);
    if completed_early {
        eprintln!("a run completed before being killed: resume not exercised this time");
    } else {
        assert_eq!(last["resumed"], true, "final run resumes: {last}");
        assert!(
            ju64(&last, "/bytes_read") < size,
            "the final run re-read finished work: {last}"
        );
        // Every block is counted once across runs: read once, stored at most once.
        assert_eq!(ju64(&last, "/stats/bytes_read"), size, "{last}");
        assert!(ju64(&last, "/stats/resumed") >= 1, "{last}");
    }
    assert!(last["parent"].is_null(), "{last}");
    let bs = repo_block_size(&repo);
    let blocks = size / bs;
    assert_eq!(ju64(&last, "/stats/data_blocks"), blocks, "{last}");
    assert!(
        ju64(&last, "/stats/new_bytes") <= size,
        "new bytes exceed the volume: {last}"
    );
    // Overhead: a 16-byte header per frame (at most 1 MiB of blobs each) and a 52-byte
    // table entry per blob (at most one per block).
    let overhead = blocks * 52 + size / MIB * 16 + 3 * MIB;
    assert!(
        ju64(&last, "/stats/new_bytes_stored") <= size + overhead,
        "data stored more than once: {last}"
    );
    // Random data: the indexed data blobs hold the volume (what killed runs had stored
    // without indexing it is not part of the repository; a blob indexed by a killed run just
    // before it was killed, whose blocks the resumed run read again, may overlap a new one:
    // at most one pack per kill), no blob is indexed twice, and the indexed packs hold the
    // data about once.
    let idx = read_index(&repo);
    let data_bytes: u64 = idx
        .blobs
        .values()
        .filter(|locs| locs[0].1.kind == 0)
        .map(|locs| locs[0].1.len)
        .sum();
    assert!(
        (size..=size + 3 * 16 * MIB).contains(&data_bytes),
        "{data_bytes} bytes of distinct data blobs for {size}"
    );
    let copies: u64 = idx
        .blobs
        .values()
        .filter(|locs| locs[0].1.kind == 0)
        .map(|locs| locs.len() as u64 - 1)
        .sum();
    assert_eq!(copies, 0, "a data blob indexed twice");
    let on_disk: u64 = idx
        .packs
        .keys()
        .map(|id| std::fs::metadata(pack_path(&repo, id)).unwrap().len())
        .sum();
    assert!(
        on_disk <= data_bytes + overhead,
        "{on_disk} bytes of indexed packs"
    );
    assert!(
        journals(&repo).is_empty(),
        "journal removed after completion"
    );

    assert_repository_valid(&repo);
    let out = t.join("restored.img");
    restore(&repo, "latest", &out);
    assert_eq!(
        sha256_file(&out),
        sha,
        "restored volume differs from the source"
    );
}

#[test]
fn sigint_exits_130_and_the_next_run_resumes() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let size = 300 * MIB;
    random_file(&src, size, 21);
    let sha = sha256_file(&src);
    init_repo(&repo, &[]);

    let child = spawn_backup(&src, &repo);
    // Interrupt once the journal exists (the signal handler is installed by then) and some
    // work was done.
    let ended = watch(
        child,
        &repo,
        // (300 MiB of random data: about 300 MiB of packs.)
        |r| !journals(r).is_empty() && pack_bytes(r) > 60 * MIB,
        |c| {
            run_ok("kill", &["-INT", &c.id().to_string()]);
        },
    );
    let resumed_expected = match ended {
        Ended::Completed => {
            eprintln!("backup finished before it could be interrupted");
            false
        }
        Ended::Signalled(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(130),
                "Ctrl-C exits with 130: {:?}\n{stderr}",
                out.status
            );
            assert!(stderr.contains("interrupted"), "stderr: {stderr}");
            assert!(!stderr.contains("panicked"), "stderr: {stderr}");
            assert_eq!(journals(&repo).len(), 1, "journal kept for resuming");
            assert_repository_valid(&repo);
            true
        }
    };

    let last = backup_json(&src, &repo, &[]);
    if resumed_expected {
        assert_eq!(last["resumed"], true, "{last}");
        assert!(ju64(&last, "/bytes_read") < size, "{last}");
        assert_eq!(ju64(&last, "/stats/bytes_read"), size, "{last}");
    }
    assert!(journals(&repo).is_empty());
    let out = t.join("restored.img");
    restore(&repo, "latest", &out);
    assert_eq!(sha256_file(&out), sha);
}

/// Sectors found unreadable before an interruption are still listed in the snapshot that the
/// resumed run completes (the journal carries them), although that run never reads them.
#[test]
fn unreadable_ranges_found_before_an_interruption_stay_in_the_snapshot() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let t = TestDir::new();
    let src = t.join("src.img");
    let size = 512 * MIB;
    random_file(&src, size, 23);
    // A snapshot of 1 MiB blocks (one blob each, alone in its frame) whose block 4 is
    // damaged: read through `mount`, that block fails with EIO, like a disk with a bad area
    // 4 MiB from its start.
    let bad = MIB;
    let repo_a = t.join("repo-a");
    // Plain: one blob of a raw frame is damaged by hand.
    init_repo(&repo_a, &["--block-size", "1M", "--no-encryption"]);
    let snap_a = jstr(&backup_json(&src, &repo_a, &[]), "/snapshot").to_string();
    let loc = locate_block(&repo_a, &snap_a, 4);
    assert_eq!(loc.entry.len, bad, "one block, one blob");
    assert!(
        corrupt_frame(&loc.pack_path, &loc.entry),
        "random data is stored raw"
    );
    let view = t.join("view");
    crate::mount::mount_view(&repo_a, &view, &[]);
    let failing = view.join("volume.img");

    let repo = t.join("repo");
    // Plain: the test reads the resume journal by hand.
    init_repo(&repo, &["--no-encryption"]);
    let bs = repo_block_size(&repo);
    // Killed once a checkpoint covers the bad block.
    let ended = watch(
        spawn_backup(&failing, &repo),
        &repo,
        |r| journal_blocks(r) * bs > 6 * bad,
        |c| c.kill().expect("SIGKILL"),
    );
    assert!(
        matches!(ended, Ended::Signalled(_)),
        "the backup finished before it could be interrupted"
    );
    let r = volback(&["backup", "--json", p(&failing), p(&repo)]).expect_code(3);
    let last = r.json();
    assert_eq!(last["resumed"], true, "{last}");
    assert!(
        ju64(&last, "/bytes_read") <= size - 6 * bad,
        "the resumed run read the bad block again: {last}"
    );
    assert_eq!(
        last["unreadable"],
        serde_json::json!([[4 * bad, bad]]),
        "the journal kept the unreadable block: {last}"
    );
    crate::mount::umount(&view);
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    let got = std::fs::read(&out).unwrap();
    assert!(
        got[(4 * bad) as usize..(5 * bad) as usize]
            .iter()
            .all(|&b| b == 0)
    );
}
