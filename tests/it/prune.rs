//! Issue 13: `forget` and `prune` on repositories of format 2 (packs, index files, pending
//! records, writer markers).
//!
//! - a history of ten ext4 versions pruned to the last three: exact restores, clean fsck, a
//!   repository about as small as one that only ever held those three;
//! - deduplication of data that moved (a copied file, a cloned volume with a new UUID);
//! - a backup paused (SIGSTOP) while forget and prune remove its parent's siblings and repack
//!   their packs; a restore paused while prune deletes the packs it was reading;
//! - prune killed at each of its crash points (`VOLBACK_TEST_ABORT_AT`): the repository stays
//!   valid, and the next prune reaches the size of a prune that never crashed;
//! - a second prune refused while one holds `prune.lock`;
//! - the retention policy as the CLI reports it (`forget --dry-run --json`).
//!
//! Pausing uses SIGSTOP/SIGCONT once the repository shows the state wanted (a writer marker,
//! new pack files, bytes restored), so the interleaving does not depend on timing: the
//! polling only waits for that state.

use crate::ext4::{mkfs_ext4_with, modify, populate};
use crate::util::*;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Repository inspection (format 2 layout, docs/FORMAT.md)

/// Complete files (temporaries `.tmp-*` skipped) directly in `dir`, or under its fan-out
/// subdirectories when `fanout`.
fn files_in(dir: &Path, fanout: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with(".tmp") {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        if fanout && ft.is_dir() {
            out.extend(files_in(&path, false));
        } else if !fanout && ft.is_file() {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Pack files, `REPO/packs/XX/<id>`.
fn pack_files(repo: &Path) -> Vec<PathBuf> {
    files_in(&repo.join("packs"), true)
}

/// Index files, `REPO/index/<id>`.
fn index_files(repo: &Path) -> Vec<PathBuf> {
    files_in(&repo.join("index"), false)
}

/// Writer markers of running (or killed, not yet cleaned) backups, `REPO/writers/<id>`.
fn writer_markers(repo: &Path) -> Vec<PathBuf> {
    files_in(&repo.join("writers"), false)
}

/// Prune's condemnation records, `REPO/pending/<id>`.
fn pending_records(repo: &Path) -> Vec<PathBuf> {
    files_in(&repo.join("pending"), false)
}

fn total_len(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// What the repository's data occupies: packs and index files (bytes, apparent size).
fn repo_data_bytes(repo: &Path) -> u64 {
    total_len(&pack_files(repo)) + total_len(&index_files(repo))
}

/// Allocated bytes of every file in `dir` (a restore may write to a temporary name).
fn dir_allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| allocated_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// Asserts that a `prune --json` report shows packs repacked (the case where packs that
/// running readers and writers know disappear).
fn assert_repacked(report: serde_json::Value) {
    assert!(
        report["packs_repacked"].as_u64().is_some_and(|n| n > 0),
        "nothing was repacked: {report}"
    );
}

fn assert_verify_clean(repo: &Path) {
    volback_ok(&["verify", "--read-data", p(repo)]).stdout_has(&["no problems"]);
}

/// Restores `snap` to `target` and asserts it is `sha` bit for bit; removes the file.
fn assert_restores(repo: &Path, snap: &str, target: &Path, sha: &str) {
    restore(repo, snap, target);
    assert_eq!(
        sha256_file(target),
        sha,
        "snapshot {snap} does not restore to the volume it was taken of"
    );
    std::fs::remove_file(target).unwrap();
}

/// `cp --sparse=always SRC DST` (volume images are mostly holes).
fn copy_sparse(src: &Path, dst: &Path) {
    run_ok("cp", &["--sparse=always", p(src), p(dst)]);
}

/// `cp -a` of a whole repository directory.
fn copy_tree(src: &Path, dst: &Path) {
    run_ok("cp", &["-a", p(src), p(dst)]);
}

/// Overwrites `len` bytes at `offset` of `path` with random data from `seed`.
fn rewrite(path: &Path, offset: u64, len: u64, seed: u64) {
    write_at(path, offset, &Rng::new(seed).bytes(len as usize));
}

/// Overwrites `count` regions of `len` bytes at random 4 KiB-aligned offsets; returns the
/// offsets.
fn rewrite_regions(path: &Path, rng: &mut Rng, count: usize, len: u64) -> Vec<u64> {
    let size = std::fs::metadata(path).unwrap().len();
    (0..count)
        .map(|_| {
            let off = rng.below((size - len) / 4096) * 4096;
            rewrite(path, off, len, rng.next_u64());
            off
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// volback in the background, paused and resumed by signals

/// A `volback` run in the background, its output going to files (a paused process must not
/// block on a full pipe). Killed when dropped unfinished (a failed assertion must not leave
/// a stopped process behind).
struct Bg {
    child: Option<Child>,
    cmd: String,
    out: PathBuf,
    err: PathBuf,
}

impl Bg {
    fn spawn(t: &TestDir, name: &str, args: &[&str], env: &[(&str, &str)]) -> Bg {
        let out = t.join(&format!("{name}.stdout"));
        let err = t.join(&format!("{name}.stderr"));
        let child = Command::new(VOLBACK)
            .args(args)
            .envs(password_env(args))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .expect("spawn volback");
        Bg {
            child: Some(child),
            cmd: format!("volback {}", args.join(" ")),
            out,
            err,
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    fn signal(&mut self, sig: &str) {
        let pid = self.child().id().to_string();
        run_ok("kill", &[sig, &pid]);
    }

    /// Polls until `ready()` holds while the process still runs (true), or the process has
    /// exited (false).
    fn wait_until(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        loop {
            if self.child().try_wait().expect("try_wait").is_some() {
                return false;
            }
            if ready() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for the end and returns what it printed.
    fn finish(mut self) -> Run {
        let status = self.child.take().expect("running").wait().expect("wait");
        Run {
            cmd: self.cmd.clone(),
            code: status.code(),
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `volback ARGS` with extra environment variables, whatever its exit code.
fn volback_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = Command::new(VOLBACK)
        .args(args)
        .envs(password_env(args))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run volback");
    Run {
        cmd: format!("{env:?} volback {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Ten versions of an ext4 volume, forget --keep-last 3 --prune

/// Backs up `images` (in order, each copied to the same source path so that each backup is
/// incremental on the one before) into a new repository; returns its data size.
fn fresh_repository_bytes(t: &TestDir, images: &[PathBuf]) -> u64 {
    let repo = t.join("fresh-repo");
    let src = t.join("fresh-src.img");
    init_repo(&repo, &[]);
    for img in images {
        copy_sparse(img, &src);
        backup_json(&src, &repo, &["--all-blocks"]);
    }
    repo_data_bytes(&repo)
}

#[test]
fn ten_backups_forget_keep_last_3_prune_restore_exactly_in_a_compact_repository() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    let mnt = t.join("mnt");
    let mut rng = Rng::new(1300);
    sparse_file(&img, 160 * MIB);
    mkfs_ext4_with(&img, &["-b", "4096"]);
    init_repo(&repo, &[]);

    // (snapshot id, SHA-256 of the image, saved copy for the last three)
    let mut versions: Vec<(String, String, Option<PathBuf>)> = Vec::new();
    for v in 1..=10 {
        let m = Mount::new(&img, &mnt, Some("loop"));
        // `modify` works on `work/`; the large file lives outside it so that only this test
        // decides what happens to it.
        let work = m.dir.join("work");
        if v == 1 {
            std::fs::create_dir_all(&work).unwrap();
            populate(&work, &mut rng, 300);
            std::fs::create_dir_all(m.dir.join("bulk")).unwrap();
            random_file(&m.dir.join("bulk/large.bin"), 24 * MIB, 1301);
        } else {
            modify(&work, &mut rng);
        }
        if v == 5 {
            // Moved to another directory through a copy: its data lands elsewhere on disk.
            std::fs::create_dir_all(m.dir.join("moved")).unwrap();
            std::fs::copy(m.dir.join("bulk/large.bin"), m.dir.join("moved/large.bin")).unwrap();
            std::fs::remove_file(m.dir.join("bulk/large.bin")).unwrap();
        }
        m.unmount();
        let sha = sha256_file(&img);
        let saved = (v > 7).then(|| {
            let c = t.join(&format!("v{v}.img"));
            copy_sparse(&img, &c);
            c
        });
        // Every block: the restore must be the image bit for bit, free blocks included.
        let b = backup_json(&img, &repo, &["--all-blocks"]);
        eprintln!("version {v}: new_bytes {}", b["new_bytes"]);
        if v == 5 {
            // The 24 MiB file that moved is not stored again (the usual churn is a few MiB).
            assert!(
                ju64(&b, "/new_bytes") < 16 * MIB,
                "the moved file was stored again: {b}"
            );
        }
        if let Some((prev, _, _)) = versions.last() {
            assert_eq!(b["parent"].as_str(), Some(prev.as_str()), "{b}");
        }
        versions.push((jstr(&b, "/snapshot").to_string(), sha, saved));
    }
    let before = repo_data_bytes(&repo);

    let r = volback_ok(&["forget", p(&repo), "--keep-last", "3", "--prune", "--json"]);
    eprintln!("forget --prune: {}", r.stdout);
    let mut kept = snapshot_ids(&repo);
    kept.sort();
    let mut expect: Vec<String> = versions[7..].iter().map(|v| v.0.clone()).collect();
    expect.sort();
    assert_eq!(kept, expect, "forget --keep-last 3 keeps the three newest");
    assert!(
        pending_records(&repo).is_empty(),
        "no backup was running: prune finished its condemnation records"
    );
    let after = repo_data_bytes(&repo);
    assert!(after < before, "prune freed nothing: {before} -> {after}");

    let out = t.join("restored.img");
    for (id, sha, _) in &versions[7..] {
        restore(&repo, id, &out);
        assert_eq!(&sha256_file(&out), sha, "snapshot {id} after prune");
        run_ok("e2fsck", &["-fn", p(&out)]);
        std::fs::remove_file(&out).unwrap();
    }
    assert_verify_clean(&repo);
    let stats = volback_ok(&["stats", p(&repo), "--json"]).json();
    assert!(stats.is_object(), "{stats}");
    volback_ok(&["stats", p(&repo), &expect[0], "--json"]).json();

    // About the size of a repository that only ever held the three kept versions.
    let images: Vec<PathBuf> = versions[7..]
        .iter()
        .map(|v| v.2.clone().expect("saved"))
        .collect();
    let fresh = fresh_repository_bytes(&t, &images);
    eprintln!("pruned repository: {after} bytes; fresh one with the 3 versions: {fresh} bytes");
    let again = volback_ok(&[
        "prune",
        "--dry-run",
        "--json",
        p(&repo),
        "--max-unused",
        "0",
    ]);
    eprintln!("prune --dry-run --max-unused 0 now: {}", again.stdout);
    assert!(
        after.abs_diff(fresh) <= fresh / 10,
        "pruned repository holds {after} bytes, a fresh one with the same 3 versions {fresh}"
    );

    // Life goes on after the prune: filesystem-aware backups (unchanged files' blocks taken
    // from the parent) on top of repacked data, then a prune that keeps only the last one.
    volback_ok(&["stats", p(&repo), "--json"]);
    let a = backup_json(&img, &repo, &[]);
    let m = Mount::new(&img, &mnt, Some("loop"));
    modify(&m.dir.join("work"), &mut rng);
    let files = tree_hashes(&m.dir);
    m.unmount();
    let b = backup_json(&img, &repo, &[]);
    assert_eq!(b["parent"], a["snapshot"], "{b}");
    eprintln!("after the prune: unread_blocks {}", b["unread_blocks"]);
    volback_ok(&["forget", p(&repo), "--keep-last", "1", "--prune"]);
    assert_eq!(snapshot_ids(&repo), vec![jstr(&b, "/snapshot").to_string()]);
    restore(&repo, jstr(&b, "/snapshot"), &out);
    run_ok("e2fsck", &["-fn", p(&out)]);
    let lo = Loop::attach(&out, true);
    let m = Mount::new(&lo.dev, &t.join("check"), Some("ro"));
    let got = tree_hashes(&m.dir);
    m.unmount();
    drop(lo);
    assert_eq!(got, files, "files of the last backup after two prunes");
    assert_verify_clean(&repo);
}

// ---------------------------------------------------------------------------------------------
// 2. Moved data is stored once

#[test]
fn a_copied_file_and_a_cloned_volume_store_almost_nothing_new() {
    if !require_root_loop_and(&["tune2fs"], false) {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    let mnt = t.join("mnt");
    sparse_file(&img, 512 * MIB);
    mkfs_ext4_with(&img, &["-b", "4096"]);
    init_repo(&repo, &[]);
    let m = Mount::new(&img, &mnt, Some("loop"));
    std::fs::create_dir_all(m.dir.join("a")).unwrap();
    random_file(&m.dir.join("a/big.bin"), 200 * MIB, 1310);
    let big_sha = sha256_file(&m.dir.join("a/big.bin"));
    m.unmount();
    let first = backup_json(&img, &repo, &[]);
    assert!(ju64(&first, "/new_bytes") >= 200 * MIB, "{first}");

    // The same 200 MiB at other places of the volume.
    let m = Mount::new(&img, &mnt, Some("loop"));
    std::fs::create_dir_all(m.dir.join("b")).unwrap();
    std::fs::copy(m.dir.join("a/big.bin"), m.dir.join("b/big.bin")).unwrap();
    m.unmount();
    let second = backup_json(&img, &repo, &[]);
    assert_eq!(second["parent"], first["snapshot"], "{second}");
    eprintln!(
        "after copying 200 MiB: new_bytes {}, new_bytes_stored {}",
        second["new_bytes"], second["new_bytes_stored"]
    );
    assert!(
        ju64(&second, "/new_bytes") < 5 * MIB,
        "a copied file was stored again: {second}"
    );
    let out = t.join("second.img");
    restore(&repo, jstr(&second, "/snapshot"), &out);
    run_ok("e2fsck", &["-fn", p(&out)]);
    {
        let lo = Loop::attach(&out, true);
        let m = Mount::new(&lo.dev, &t.join("check"), Some("ro"));
        for f in ["a/big.bin", "b/big.bin"] {
            assert_eq!(sha256_file(&m.dir.join(f)), big_sha, "{f} restored");
        }
        m.unmount();
    }
    std::fs::remove_file(&out).unwrap();

    // A clone of the volume with a new UUID: another volume, the same data.
    let clone = t.join("clone.img");
    copy_sparse(&img, &clone);
    run_ok("e2fsck", &["-fp", p(&clone)]); // tune2fs -U wants a freshly checked filesystem
    run_ok("tune2fs", &["-U", "random", p(&clone)]);
    let c = backup_json(&clone, &repo, &[]);
    eprintln!(
        "clone backup: parent {}, new_bytes {}, new_bytes_stored {}",
        c["parent"], c["new_bytes"], c["new_bytes_stored"]
    );
    let entry = volback_ok(&["snapshots", "--json", p(&repo)])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == c["snapshot"])
        .cloned()
        .expect("clone snapshot listed");
    let used = ju64(&c, "/stats/data_blocks") * ju64(&entry, "/block_size");
    assert!(used >= 400 * MIB, "{c}");
    assert!(
        ju64(&c, "/new_bytes_stored") < used / 50,
        "the clone stored more than 2% of its {used} used bytes: {c}"
    );
    let out = t.join("clone-restored.img");
    restore(&repo, jstr(&c, "/snapshot"), &out);
    run_ok("e2fsck", &["-fn", p(&out)]);
    std::fs::remove_file(&out).unwrap();
    assert_verify_clean(&repo);
}

// ---------------------------------------------------------------------------------------------
// 3. Backups and restores running while forget and prune work

#[test]
fn backup_and_restore_paused_during_forget_and_prune_complete_exactly() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    let size = 160 * MIB;
    random_file(&src, size, 1330);
    init_repo(&repo, &["--pack-size", "4M"]);
    let mut rng = Rng::new(1331);
    let mut history: Vec<(String, String)> = Vec::new();
    for v in 1..=5 {
        if v > 1 {
            rewrite_regions(&src, &mut rng, 3, 2 * MIB);
        }
        let b = backup_json(&src, &repo, &[]);
        history.push((jstr(&b, "/snapshot").to_string(), sha256_file(&src)));
    }
    let (id5, sha5) = history[4].clone();

    // A backup with 96 MiB of new data, paused once it has written packs: it has chosen v5
    // as its parent and loaded the index.
    rewrite(&src, 32 * MIB, 96 * MIB, 1332);
    let sha6 = sha256_file(&src);
    let packs_before = pack_files(&repo).len();
    let mut backup = Bg::spawn(&t, "backup6", &["backup", "--json", p(&src), p(&repo)], &[]);
    let caught = backup.wait_until(|| {
        !writer_markers(&repo).is_empty() && pack_files(&repo).len() >= packs_before + 2
    });
    assert!(caught, "the backup ended before writing two packs");
    backup.signal("-STOP");
    assert!(!writer_markers(&repo).is_empty());

    // Its parent's siblings go; every pack holding their data is repacked or deleted.
    volback_ok(&["forget", p(&repo), "--keep-last", "1"]);
    assert_eq!(snapshot_ids(&repo), vec![id5.clone()]);
    assert_repacked(volback_ok(&["prune", "--json", p(&repo), "--max-unused", "0"]).json());
    assert!(
        !pending_records(&repo).is_empty(),
        "with a backup running, condemned packs wait in a pending record"
    );
    // Restores of the kept snapshot work meanwhile.
    assert_restores(&repo, &id5, &t.join("v5-during.img"), &sha5);

    backup.signal("-CONT");
    let r = backup.finish().expect_code(0);
    let b6 = r.json();
    assert_eq!(b6["parent"].as_str(), Some(id5.as_str()), "{b6}");
    let id6 = jstr(&b6, "/snapshot").to_string();
    assert_restores(&repo, &id6, &t.join("v6.img"), &sha6);
    assert_restores(&repo, &id5, &t.join("v5.img"), &sha5);
    assert_verify_clean(&repo);

    // A restore paused while prune deletes packs it reads: it must find the blobs again.
    let rdir = t.join("restore-during-prune");
    std::fs::create_dir(&rdir).unwrap();
    let target = rdir.join("v6.img");
    let mut rs = Bg::spawn(
        &t,
        "restore6",
        &["restore", p(&repo), &id6, p(&target)],
        &[],
    );
    let paused = rs.wait_until(|| dir_allocated(&rdir) >= 16 * MIB);
    if paused {
        rs.signal("-STOP");
    } else {
        eprintln!("the restore finished before it could be paused: concurrency not exercised");
    }
    volback_ok(&["forget", p(&repo), &id5]);
    assert_repacked(volback_ok(&["prune", "--json", p(&repo), "--max-unused", "0"]).json());
    assert!(
        pending_records(&repo).is_empty(),
        "no backup is running: every pending record is finished"
    );
    if paused {
        rs.signal("-CONT");
    }
    rs.finish().expect_code(0);
    assert_eq!(
        sha256_file(&target),
        sha6,
        "restore run across a prune differs"
    );
    assert_verify_clean(&repo);
    assert_restores(&repo, &id6, &t.join("v6-again.img"), &sha6);
}

/// Three versions of a 64 MiB image of random data in a repository of 4 MiB packs, each
/// version rewriting four 2 MiB regions (whole frames die, packs are partly dead); returns
/// the repository, the snapshot ids, and the SHA-256 of the last version.
fn three_versions(t: &TestDir) -> (PathBuf, Vec<String>, String) {
    let src = t.join("src.img");
    let repo = t.join("repo");
    random_file(&src, 64 * MIB, 1335);
    init_repo(&repo, &["--pack-size", "4M"]);
    let mut rng = Rng::new(1336);
    let mut ids = Vec::new();
    for v in 0..3 {
        if v > 0 {
            rewrite_regions(&src, &mut rng, 4, 2 * MIB);
        }
        ids.push(jstr(&backup_json(&src, &repo, &[]), "/snapshot").to_string());
    }
    let sha = sha256_file(&src);
    std::fs::remove_file(&src).unwrap();
    (repo, ids, sha)
}

/// Forgets the first two snapshots and prunes with repacking.
fn forget_two_and_repack(repo: &Path, ids: &[String]) {
    volback_ok(&["forget", p(repo), &ids[0], &ids[1]]);
    assert_repacked(volback_ok(&["prune", "--json", p(repo), "--max-unused", "0"]).json());
    assert!(pending_records(repo).is_empty());
}

/// A mounted snapshot read half before and half after a prune that deleted the packs its
/// server had indexed: every byte still reads right.
#[test]
fn a_mounted_snapshot_reads_correctly_across_a_prune() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let t = TestDir::new();
    let (repo, ids, sha) = three_versions(&t);
    let size = 64 * MIB;
    let view = t.join("view");
    std::fs::create_dir_all(&view).unwrap();
    volback_ok(&["mount", p(&repo), &ids[2], p(&view), "--json"]);
    let volume = File::open(view.join("volume.img")).unwrap();
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut read_range = |from: u64, to: u64, h: &mut sha2::Sha256| {
        let mut off = from;
        while off < to {
            std::os::unix::fs::FileExt::read_exact_at(&volume, &mut buf, off)
                .unwrap_or_else(|e| panic!("read the mounted volume at {off}: {e}"));
            sha2::Digest::update(h, &buf);
            off += MIB;
        }
    };
    read_range(0, size / 2, &mut h);
    forget_two_and_repack(&repo, &ids);
    read_range(size / 2, size, &mut h);
    drop(volume);
    crate::mount::umount(&view);
    assert_eq!(
        hex::encode(sha2::Digest::finalize(h)),
        sha,
        "the mounted snapshot read across a prune differs from the volume"
    );
    assert_verify_clean(&repo);
}

/// `serve --nbd` started before a prune that repacks: qemu-img reads the whole export after
/// it, and it is the volume.
#[test]
fn a_served_snapshot_reads_correctly_across_a_prune() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    let t = TestDir::new();
    let (repo, ids, sha) = three_versions(&t);
    let sock = t.join("nbd.sock");
    let err = t.join("serve.stderr");
    let mut server = Command::new(VOLBACK)
        .args(["serve", p(&repo), &ids[2], "--nbd", p(&sock)])
        .envs(password_env(&[p(&repo)]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("start volback serve");
    // Killed if an assertion fails before the end.
    struct KillOnDrop(Option<Child>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let stdout = server.stdout.take().expect("stdout");
    let mut guard = KillOnDrop(Some(server));
    let mut uri = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut uri).unwrap();
    assert!(
        uri.starts_with("nbd"),
        "serve printed {uri:?}: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let uri = uri.trim().to_string();
    let export_sha = |name: &str| {
        let out = t.join(name);
        run_ok("qemu-img", &["convert", "-O", "raw", &uri, p(&out)]);
        let h = sha256_file(&out);
        std::fs::remove_file(&out).unwrap();
        h
    };
    assert_eq!(export_sha("before.img"), sha);
    forget_two_and_repack(&repo, &ids);
    assert_eq!(
        export_sha("after.img"),
        sha,
        "the export read after a prune differs from the volume"
    );
    let child = guard.0.as_mut().unwrap();
    run_ok("kill", &["-INT", &child.id().to_string()]);
    let status = child.wait().unwrap();
    guard.0 = None;
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "volback serve: {stderr}");
    assert_verify_clean(&repo);
}

// ---------------------------------------------------------------------------------------------
// 4. Prune killed at each crash point

const ABORT_POINTS: &[&str] = &[
    "mark",
    "repack-pack",
    "repack-index",
    "compact-index",
    "pending-written",
    "old-index-deleted",
    "pack-deleted",
    "pending-removed",
    "rescue",
    "orphans",
];

/// A repository where one prune meets every case: the snapshots to keep with their SHA-256,
/// partly dead packs to repack, fully dead ones, a pending record whose condemned packs hold
/// blobs a later backup used again (rescue), and packs no index names (a killed backup).
struct CrashTemplate {
    repo: PathBuf,
    keep: Vec<(String, String)>,
}

fn crash_template(t: &TestDir) -> CrashTemplate {
    let repo = t.join("template");
    let a = t.join("a.img");
    let a1 = t.join("a-v1.img");
    random_file(&a, 32 * MIB, 1340);
    std::fs::copy(&a, &a1).unwrap();
    // Prune keeps or drops whole frames (up to 1 MiB of blobs): regions of 2 MiB kill whole
    // frames, and packs of 4 MiB hold several frames, some of which die (repack).
    init_repo(&repo, &["--pack-size", "4M"]);
    let mut rng = Rng::new(1341);
    let mut ids = Vec::new();
    let mut last_regions = Vec::new();
    let mut sha6 = String::new();
    for v in 1..=6 {
        if v > 1 {
            if v == 6 {
                // A region v5 wrote: v5's packs become partly dead once v5 goes.
                rewrite(&a, last_regions[0], 2 * MIB, 1344);
            }
            last_regions = rewrite_regions(&a, &mut rng, 3, 2 * MIB);
        }
        ids.push(jstr(&backup_json(&a, &repo, &[]), "/snapshot").to_string());
        sha6 = sha256_file(&a);
    }
    volback_ok(&["forget", p(&repo), "--keep-last", "2"]);

    // C: 24 MiB of new data, then v1 again. Paused after its first pack (index loaded, v1's
    // part not reached yet), a prune condemns the packs of v1's dead blobs; the backup then
    // finds those blobs in its index and refers to them: the next prune must rescue them.
    let c = t.join("c.img");
    random_file(&c, 24 * MIB, 1342);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&c).unwrap();
        f.write_all(&std::fs::read(&a1).unwrap()).unwrap();
    }
    let sha_c = sha256_file(&c);
    let packs_before = pack_files(&repo).len();
    let mut bc = Bg::spawn(t, "backup-c", &["backup", "--json", p(&c), p(&repo)], &[]);
    let caught = bc
        .wait_until(|| !writer_markers(&repo).is_empty() && pack_files(&repo).len() > packs_before);
    assert!(caught, "backup of C ended before writing a pack");
    bc.signal("-STOP");
    volback_ok(&["prune", p(&repo), "--max-unused", "0"]);
    assert!(
        !pending_records(&repo).is_empty(),
        "a backup is running: the condemned packs wait"
    );
    bc.signal("-CONT");
    let id_c = jstr(&bc.finish().expect_code(0).json(), "/snapshot").to_string();

    // v5 goes: dead data again, in packs shared with v6.
    volback_ok(&["forget", p(&repo), &ids[4]]);

    // B: killed after writing packs, before any checkpoint indexed them.
    let b = t.join("b.img");
    random_file(&b, 16 * MIB, 1343);
    let packs_before = pack_files(&repo).len();
    let mut bb = Bg::spawn(
        t,
        "backup-b",
        &["backup", "--checkpoint-secs", "3600", p(&b), p(&repo)],
        &[],
    );
    let caught = bb.wait_until(|| pack_files(&repo).len() >= packs_before + 2);
    assert!(caught, "backup of B ended before writing two packs");
    bb.signal("-KILL");
    let _ = bb.finish();
    // And a temporary file a killed writer left among the packs.
    let fan = repo.join("packs").join("00");
    std::fs::create_dir_all(&fan).unwrap();
    std::fs::write(fan.join(".tmp-crash-leftover"), vec![7u8; 4096]).unwrap();

    assert_verify_clean(&repo);
    CrashTemplate {
        repo,
        keep: vec![(ids[5].clone(), sha6), (id_c, sha_c)],
    }
}

/// Every kept snapshot restores exactly and verify finds nothing wrong.
fn assert_repository_intact(repo: &Path, keep: &[(String, String)], out: &Path) {
    assert_verify_clean(repo);
    let mut ids = snapshot_ids(repo);
    ids.sort();
    let mut want: Vec<String> = keep.iter().map(|k| k.0.clone()).collect();
    want.sort();
    assert_eq!(ids, want, "snapshots of {}", repo.display());
    for (id, sha) in keep {
        assert_restores(repo, id, out, sha);
    }
}

#[test]
fn prune_killed_at_every_crash_point_leaves_a_valid_repository_and_the_next_prune_finishes() {
    let t = TestDir::new();
    let tpl = crash_template(&t);
    let out = t.join("restored.img");

    // The size a prune that never crashed reaches.
    let reference = t.join("reference");
    copy_tree(&tpl.repo, &reference);
    let rep = volback_ok(&["prune", "--json", p(&reference), "--max-unused", "0"]).json();
    // The template reaches every crash point: the report says what the prune met.
    for key in [
        "packs_repacked",
        "packs_rescued",
        "orphans_deleted",
        "packs_deleted",
    ] {
        assert!(
            rep[key].as_u64().is_some_and(|n| n > 0),
            "{key}: the template does not exercise this part of prune: {rep}"
        );
    }
    assert!(pending_records(&reference).is_empty());
    assert_repository_intact(&reference, &tpl.keep, &out);
    let ref_bytes = repo_data_bytes(&reference);
    assert!(
        ref_bytes < repo_data_bytes(&tpl.repo),
        "the reference prune freed nothing"
    );

    for point in ABORT_POINTS {
        let repo = t.join(&format!("repo-{point}"));
        copy_tree(&tpl.repo, &repo);
        let r = volback_env(
            &["prune", p(&repo), "--max-unused", "0"],
            &[("VOLBACK_TEST_ABORT_AT", point)],
        );
        assert_ne!(
            r.code,
            Some(0),
            "prune did not stop at {point}: {}\n{}",
            r.stdout,
            r.stderr
        );
        assert_repository_intact(&repo, &tpl.keep, &out);

        volback_ok(&["prune", p(&repo), "--max-unused", "0"]);
        assert!(
            pending_records(&repo).is_empty(),
            "after a crash at {point}, the next prune left pending records"
        );
        assert_repository_intact(&repo, &tpl.keep, &out);
        let bytes = repo_data_bytes(&repo);
        eprintln!("{point}: {bytes} bytes after the next prune (no crash: {ref_bytes})");
        assert!(
            bytes.abs_diff(ref_bytes) <= (ref_bytes / 20).max(MIB),
            "after a crash at {point} and a prune: {bytes} bytes, {ref_bytes} without the crash"
        );
        std::fs::remove_dir_all(&repo).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 5. One prune at a time

#[test]
fn a_second_prune_is_refused_while_one_holds_the_prune_lock() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    random_file(&src, 8 * MIB, 1350);
    init_repo(&repo, &[]);
    backup_json(&src, &repo, &[]);
    rewrite(&src, 0, 4 * MIB, 1351);
    let b2 = backup_json(&src, &repo, &[]);
    let sha2 = sha256_file(&src);
    volback_ok(&["forget", p(&repo), "--keep-last", "1"]);

    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(repo.join("prune.lock"))
        .unwrap();
    lock.try_lock().expect("nobody holds prune.lock");
    let before = repo_data_bytes(&repo);
    let r = volback(&["prune", p(&repo)]);
    assert_ne!(r.code, Some(0), "{r:?}");
    r.stderr_has(&["another prune"]);
    assert_eq!(
        repo_data_bytes(&repo),
        before,
        "the refused prune changed the repository"
    );
    let r = volback(&["forget", p(&repo), "--keep-last", "1", "--prune"]);
    assert_ne!(r.code, Some(0), "{r:?}");
    r.stderr_has(&["another prune"]);

    drop(lock);
    // A dry run changes nothing.
    volback_ok(&["prune", "--dry-run", "--json", p(&repo)]).json();
    assert_eq!(
        repo_data_bytes(&repo),
        before,
        "prune --dry-run changed the repository"
    );
    volback_ok(&["prune", p(&repo)]);
    assert!(repo_data_bytes(&repo) < before, "the prune freed nothing");
    assert_restores(&repo, jstr(&b2, "/snapshot"), &t.join("out.img"), &sha2);
    assert_verify_clean(&repo);
}

// ---------------------------------------------------------------------------------------------
// 6. The policy as the CLI reports it

fn sorted(ids: &[&String]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn sorted_ids(repo: &Path) -> Vec<String> {
    let mut v = snapshot_ids(repo);
    v.sort();
    v
}

/// The decision `forget --json` reports for snapshot `id`: (action, reasons).
fn decision(report: &serde_json::Value, id: &str) -> (String, Vec<String>) {
    let d = report["snapshots"]
        .as_array()
        .unwrap_or_else(|| panic!("no snapshots array: {report}"))
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("{id} not reported: {report}"));
    let reasons = d["reasons"]
        .as_array()
        .unwrap_or_else(|| panic!("no reasons: {d}"))
        .iter()
        .map(|r| r.as_str().expect("reason string").to_string())
        .collect();
    (jstr(d, "/action").to_string(), reasons)
}

#[test]
fn forget_reports_every_snapshot_with_its_reasons_and_removes_what_it_says() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let repo = t.join("repo");
    random_file(&src, 2 * MIB, 1360);
    init_repo(&repo, &[]);
    let mut shas = Vec::new();
    for v in 0..5u64 {
        if v > 0 {
            rewrite(&src, v * 256 * KIB, 64 * KIB, 1361 + v);
        }
        let tags: &[&str] = if v == 1 { &["--tag", "keepme"] } else { &[] };
        backup_json(&src, &repo, tags);
        shas.push(sha256_file(&src));
    }
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), 5);

    let policy = ["--keep-last", "2", "--keep-tag", "keepme"];
    let mut args = vec!["forget", p(&repo), "--dry-run", "--json"];
    args.extend(policy);
    let dry = volback_ok(&args).json();
    assert_eq!(
        dry["snapshots"].as_array().map(|a| a.len()),
        Some(5),
        "{dry}"
    );
    let (action, reasons) = decision(&dry, &ids[4]);
    assert_eq!(action, "keep");
    assert!(
        reasons.contains(&"newest".to_string()) && reasons.contains(&"last".to_string()),
        "{reasons:?}"
    );
    assert_eq!(
        decision(&dry, &ids[3]),
        ("keep".into(), vec!["last".into()])
    );
    assert_eq!(
        decision(&dry, &ids[1]),
        ("keep".into(), vec!["tag:keepme".into()])
    );
    for i in [0, 2] {
        assert_eq!(decision(&dry, &ids[i]), ("remove".into(), vec![]), "{dry}");
    }
    assert_eq!(ju64(&dry, "/kept"), 3, "{dry}");
    assert_eq!(ju64(&dry, "/removed"), 2, "{dry}");
    assert_eq!(snapshot_ids(&repo), ids, "a dry run removed snapshots");

    // A named snapshot is removed, even the newest.
    let named = volback_ok(&["forget", p(&repo), "--dry-run", "--json", &ids[4][..12]]).json();
    assert_eq!(
        decision(&named, &ids[4]),
        ("remove".into(), vec!["named".into()])
    );
    assert_eq!(named["snapshots"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(snapshot_ids(&repo), ids);

    // For real: the policy, then a name.
    let mut args = vec!["forget", p(&repo), "--json"];
    args.extend(policy);
    let done = volback_ok(&args).json();
    assert_eq!(ju64(&done, "/removed"), 2, "{done}");
    // (Snapshots of the same second whose parents are gone list in id order: compare sets.)
    assert_eq!(sorted_ids(&repo), sorted(&[&ids[1], &ids[3], &ids[4]]));
    volback_ok(&["forget", p(&repo), &ids[4]]);
    assert_eq!(sorted_ids(&repo), sorted(&[&ids[1], &ids[3]]));

    // forget --prune --json: forget's report, then prune's, one JSON line each.
    // (Named: these snapshots share one second and ids[1]..ids[3]'s link is gone, so which
    // of them a policy sees as newer is the id order.)
    let r = volback_ok(&["forget", p(&repo), &ids[1], "--prune", "--json"]);
    let lines: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert_eq!(decision(&lines[0], &ids[1]).0, "remove", "{}", r.stdout);
    assert!(lines[1].is_object(), "{}", r.stdout);
    assert_eq!(snapshot_ids(&repo), vec![ids[3].clone()]);
    assert_restores(&repo, &ids[3], &t.join("out.img"), &shas[3]);

    // A second volume: policies apply per volume, --source picks one.
    let other = t.join("other.img");
    random_file(&other, MIB, 1370);
    let o1 = jstr(&backup_json(&other, &repo, &[]), "/snapshot").to_string();
    rewrite(&other, 0, 64 * KIB, 1371);
    let o2 = jstr(&backup_json(&other, &repo, &[]), "/snapshot").to_string();
    let all = volback_ok(&[
        "forget",
        p(&repo),
        "--dry-run",
        "--json",
        "--keep-within",
        "30d",
        "--keep-daily",
        "1",
    ])
    .json();
    assert_eq!(
        all["snapshots"].as_array().map(|a| a.len()),
        Some(3),
        "{all}"
    );
    assert_eq!(ju64(&all, "/removed"), 0, "{all}");
    for newest in [&ids[3], &o2] {
        let (action, reasons) = decision(&all, newest);
        assert_eq!(action, "keep");
        for r in ["newest", "daily", "within"] {
            assert!(reasons.iter().any(|x| x == r), "{newest}: {reasons:?}");
        }
    }
    assert_eq!(decision(&all, &o1), ("keep".into(), vec!["within".into()]));
    let one = volback_ok(&[
        "forget",
        p(&repo),
        "--json",
        "--keep-last",
        "1",
        "--source",
        p(&other),
    ])
    .json();
    assert_eq!(
        one["snapshots"].as_array().map(|a| a.len()),
        Some(2),
        "{one}"
    );
    assert_eq!(decision(&one, &o1).0, "remove");
    assert_eq!(sorted_ids(&repo), sorted(&[&ids[3], &o2]));
    assert_verify_clean(&repo);
}
