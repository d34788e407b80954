//! Copies: `volback copy` (raw and BIN, single file and slices), `copy --update`, `export`,
//! and `restore` / `verify` of copies. Judges: `qemu-img compare`, the kernel's loop driver
//! (read-only mounts of the copies), `e2fsck -fn`, file checksums, and block-by-block
//! comparison of the copy before and after an update.

use crate::ext4::{mkfs_ext4, modify, populate};
use crate::util::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use volback::copy::{CopyFormat, CopyOptions};
use volback::progress::Progress;
use volback::source::Source;

/// Block size of copies (the default).
const BS: u64 = 256 * KIB;
/// A volume size that is not a multiple of the block size.
const SIZE: u64 = 40 * MIB + 100 * KIB;

/// An ext4 image of [`SIZE`] bytes filled with files; returns their checksums.
fn ext4_source(
    t: &TestDir,
    name: &str,
    seed: u64,
) -> (PathBuf, std::collections::BTreeMap<String, String>) {
    let img = t.join(name);
    sparse_file(&img, SIZE);
    mkfs_ext4(&img);
    let mnt = Mount::new(&img, &t.join(&format!("{name}.mnt")), Some("loop"));
    populate(&mnt.dir, &mut Rng::new(seed), 120);
    let files = tree_hashes(&mnt.dir);
    mnt.unmount();
    (img, files)
}

/// Changes files of the ext4 image; returns the new checksums.
fn change_files(t: &TestDir, img: &Path, seed: u64) -> std::collections::BTreeMap<String, String> {
    let mnt = Mount::new(img, &t.join("change.mnt"), Some("loop"));
    modify(&mnt.dir, &mut Rng::new(seed));
    let files = tree_hashes(&mnt.dir);
    mnt.unmount();
    files
}

/// `qemu-img compare` of two images (raw unless told), which must be identical.
fn assert_identical(a: &Path, fa: &str, b: &Path, fb: &str) {
    run_ok(
        "qemu-img",
        &["compare", "-q", "-f", fa, "-F", fb, p(a), p(b)],
    );
}

/// The source as a restore of its backup shows it: used blocks as they are, unused blocks
/// zeroed (what a copy made through the allocation map must equal). `--rehash`: the judge
/// reads every used block, so that what its repository held before does not matter.
fn backup_and_restore(t: &TestDir, src: &Path, name: &str) -> PathBuf {
    // One repository per test: later backups are incremental. Its blocks are the copies'
    // (unused blocks are zeroed with that granularity; a repository's default is 4 KiB).
    let repo = t.join("judge.repo");
    if !repo.exists() {
        init_repo(&repo, &["--block-size", "256K"]);
    }
    let b = backup_json(src, &repo, &["--rehash"]);
    let out = t.join(&format!("{name}.restored"));
    restore(&repo, jstr(&b, "/snapshot"), &out);
    out
}

/// `volback copy --json ARGS…`.
fn copy_json(args: &[&str]) -> serde_json::Value {
    let mut v = vec!["copy", "--json"];
    v.extend_from_slice(args);
    volback_ok(&v).json()
}

/// Mounts `image` read-only through a loop device, checks its files and runs `e2fsck -fn`.
fn mount_and_check(t: &TestDir, image: &Path, files: &std::collections::BTreeMap<String, String>) {
    run_ok("e2fsck", &["-fn", p(image)]);
    let lo = Loop::attach(image, true);
    let dir = t.join("check.mnt");
    let mnt = Mount::new(lo.path(), &dir, Some("ro"));
    assert_eq!(
        &tree_hashes(&mnt.dir),
        files,
        "files of {}",
        image.display()
    );
    mnt.unmount();
    drop(lo);
}

/// Concatenates data files into one image.
fn concat(parts: &[PathBuf], out: &Path) {
    let mut o = std::fs::File::create(out).unwrap();
    for part in parts {
        let mut f = std::fs::File::open(part).unwrap();
        std::io::copy(&mut f, &mut o).unwrap();
    }
}

/// Blocks of [`BS`] that differ between two files of the same size.
fn differing_blocks(a: &Path, b: &Path) -> u64 {
    let da = std::fs::read(a).unwrap();
    let db = std::fs::read(b).unwrap();
    assert_eq!(da.len(), db.len());
    da.chunks(BS as usize)
        .zip(db.chunks(BS as usize))
        .filter(|(x, y)| x != y)
        .count() as u64
}

fn files_of(report: &serde_json::Value) -> Vec<PathBuf> {
    report["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| PathBuf::from(f.as_str().unwrap()))
        .collect()
}

#[test]
fn raw_and_bin_copies_equal_the_source_mount_and_pass_fsck() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (src, files) = ext4_source(&t, "src.img", 1);
    assert_ne!(SIZE % BS, 0);
    let expected = backup_and_restore(&t, &src, "src");

    for format in ["raw", "bin"] {
        // Through the allocation map: unused blocks are holes (zeros).
        let dest = t.join(&format!("copy.{format}"));
        let r = copy_json(&["--format", format, p(&src), p(&dest)]);
        assert_eq!(r["format"], format, "{r}");
        assert_eq!(r["update"], false);
        assert_eq!(ju64(&r, "/block_count"), SIZE.div_ceil(BS));
        assert!(
            ju64(&r, "/unused_blocks") > 0,
            "the map skipped nothing: {r}"
        );
        assert_eq!(
            ju64(&r, "/blocks_written"),
            ju64(&r, "/data_blocks"),
            "a new copy writes its data blocks: {r}"
        );
        let parts = files_of(&r);
        assert_eq!(parts.len(), 1, "{r}");
        let image = &parts[0];
        if format == "bin" {
            assert_eq!(
                image.file_name().unwrap().to_str().unwrap(),
                format!("0.{SIZE}.copydata.bin")
            );
        } else {
            assert_eq!(image, &dest);
        }
        assert_eq!(std::fs::metadata(image).unwrap().len(), SIZE);
        assert!(
            allocated_bytes(image) < SIZE / 2,
            "unused blocks are holes: {} bytes allocated",
            allocated_bytes(image)
        );
        assert_identical(image, "raw", &expected, "raw");
        mount_and_check(&t, image, &files);
        volback_ok(&["verify", p(&dest)]).stdout_has(&["no problems"]);

        // restore COPY TARGET gives the volume back.
        let back = t.join(&format!("back.{format}"));
        volback_ok(&["restore", "--verify", p(&dest), p(&back)]);
        assert_identical(&back, "raw", &expected, "raw");

        // Every block: identical to the source.
        let all = t.join(&format!("all.{format}"));
        let r = copy_json(&["--format", format, "--all-blocks", p(&src), p(&all)]);
        assert_eq!(r["all_blocks"], true);
        assert_eq!(ju64(&r, "/unused_blocks"), 0, "{r}");
        assert_identical(&files_of(&r)[0], "raw", &src, "raw");
    }
}

#[test]
fn sliced_copies_have_the_right_names_and_sizes() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let size = 10 * MIB + 3 * KIB;
    random_file(&src, size, 2);
    // Zeros in the middle: holes in the copy.
    write_at(&src, 2 * MIB, &vec![0u8; 2 * MIB as usize]);

    let bin = t.join("bin");
    let r = copy_json(&["--format", "bin", "--slice-size", "4M", p(&src), p(&bin)]);
    let names: Vec<String> = files_of(&r)
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "0.4194304.copydata.bin".to_string(),
            "4194304.4194304.copydata.bin".to_string(),
            format!("8388608.{}.copydata.bin", size - 8 * MIB),
        ]
    );
    let mut in_dir: Vec<String> = std::fs::read_dir(&bin)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_dir.sort();
    assert_eq!(
        in_dir.len(),
        5,
        "three slices, metadata and hash list: {in_dir:?}"
    );
    assert!(
        in_dir.contains(&"volback-copy.json".to_string()),
        "{in_dir:?}"
    );
    assert!(
        in_dir.contains(&"volback-copy.sha256".to_string()),
        "{in_dir:?}"
    );
    for f in files_of(&r) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let len: u64 = name.split('.').nth(1).unwrap().parse().unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().len(), len, "{name}");
    }
    assert!(allocated_bytes(&files_of(&r)[0]) <= 2 * MIB + 64 * KIB);
    let joined = t.join("joined.img");
    concat(&files_of(&r), &joined);
    assert_identical(&joined, "raw", &src, "raw");
    volback_ok(&["verify", p(&bin)]).stdout_has(&["no problems"]);

    // Raw slices: DEST.000, DEST.001, …
    let raw = t.join("disk.img");
    let r = copy_json(&["--format", "raw", "--slice-size", "4M", p(&src), p(&raw)]);
    let names: Vec<String> = files_of(&r)
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["disk.img.000", "disk.img.001", "disk.img.002"]);
    assert!(t.join("disk.img.volback-copy.json").is_file());
    let out = t.join("restored.img");
    volback_ok(&["restore", p(&raw), p(&out)]);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    // Restored again with --only-changed: compared through the copy's hash list, nothing
    // written; then one changed byte in the target is put back alone.
    volback_ok(&["restore", "--only-changed", p(&raw), p(&out)])
        .stdout_has(&["0 B written", "already up to date"]);
    let mut b = std::fs::read(&out).unwrap();
    let at = b.iter().position(|&x| x != 0).expect("some data");
    b[at] ^= 1;
    std::fs::write(&out, &b).unwrap();
    volback_ok(&["restore", "--only-changed", p(&raw), p(&out)]).stdout_has(&["64.0 KiB written"]);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    // Through the metadata file itself.
    volback_ok(&["verify", p(&t.join("disk.img.volback-copy.json"))]);

    // A slice size that is not a multiple of the block size is refused.
    volback_code(
        &[
            "copy",
            "--format",
            "bin",
            "--slice-size",
            "1000000",
            p(&src),
            p(&t.join("x")),
        ],
        1,
    )
    .stderr_has(&["multiple of the block size"]);
    // An existing copy is not overwritten by a new one.
    volback_code(&["copy", "--format", "bin", p(&src), p(&bin)], 1).stderr_has(&["--update"]);
}

#[test]
fn update_rewrites_only_changed_blocks() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (src, _) = ext4_source(&t, "src.img", 3);
    for (format, extra) in [("raw", vec![]), ("bin", vec!["--slice-size", "8M"])] {
        let dest = t.join(&format!("copy.{format}"));
        let mut args = vec!["--format", format];
        args.extend_from_slice(&extra);
        args.extend([p(&src), p(&dest)]);
        let first = copy_json(&args);
        let parts = files_of(&first);
        let before = t.join(&format!("before.{format}"));
        concat(&parts, &before);

        let files = change_files(&t, &src, 4 + format.len() as u64);
        let r = copy_json(&["--update", p(&src), p(&dest)]);
        assert_eq!(r["update"], true, "{r}");
        assert_eq!(r["resumed"], false, "{r}");
        let after = t.join(&format!("after.{format}"));
        concat(&parts, &after);
        let changed = differing_blocks(&before, &after);
        let rewritten = ju64(&r, "/blocks_written") + ju64(&r, "/blocks_zeroed");
        assert!(changed > 0, "the change touched no block");
        assert_eq!(
            rewritten, changed,
            "exactly the changed blocks are rewritten: {r}"
        );
        assert_eq!(
            ju64(&r, "/unchanged_blocks") + rewritten,
            SIZE.div_ceil(BS),
            "{r}"
        );
        let expected = backup_and_restore(&t, &src, &format!("upd.{format}"));
        assert_identical(&after, "raw", &expected, "raw");
        if format == "raw" {
            mount_and_check(&t, &dest, &files);
        } else {
            run_ok("e2fsck", &["-fn", p(&after)]);
        }
        volback_ok(&["verify", p(&dest)]).stdout_has(&["no problems"]);

        // Nothing changed since: nothing rewritten.
        let r = copy_json(&["--update", p(&src), p(&dest)]);
        assert_eq!(ju64(&r, "/blocks_written"), 0, "{r}");
        assert_eq!(ju64(&r, "/blocks_zeroed"), 0, "{r}");
    }
}

/// True when the copy journal at `path` holds records with blocks: more than its header (16
/// bytes, JSON, checksum) and the run's first record (124 bytes), by a margin.
fn journal_has_records(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    let header_end = bytes.get(12..16).map_or(u64::MAX / 2, |b| {
        48 + u32::from_le_bytes(b.try_into().unwrap()) as u64
    });
    bytes.len() as u64 > header_end + 124 + 276
}

/// A copy's [`Progress`] that stops the copy at a chosen point: in the "copy" phase, the
/// first report after `ready()` says yes calls `stop` (once). The copy engine reports a batch
/// of blocks before it checkpoints them, so with a zero checkpoint interval every batch
/// reported before that one is in the journal.
struct Gate<R, S> {
    in_copy: AtomicBool,
    done: AtomicU64,
    fired: AtomicBool,
    ready: R,
    stop: S,
}

impl<R: Fn(u64) -> bool + Send + Sync, S: Fn() + Send + Sync> Gate<R, S> {
    /// `ready` gets the bytes reported so far in the copy phase.
    fn new(ready: R, stop: S) -> Self {
        Gate {
            in_copy: AtomicBool::new(false),
            done: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            ready,
            stop,
        }
    }
}

impl<R: Fn(u64) -> bool + Send + Sync, S: Fn() + Send + Sync> Progress for Gate<R, S> {
    fn start(&self, phase: &str, _total: u64) {
        self.in_copy.store(phase == "copy", Ordering::SeqCst);
        self.done.store(0, Ordering::SeqCst);
    }

    fn advance(&self, bytes: u64) {
        if !self.in_copy.load(Ordering::SeqCst) {
            return;
        }
        let done = self.done.fetch_add(bytes, Ordering::SeqCst);
        if (self.ready)(done) && !self.fired.swap(true, Ordering::SeqCst) {
            (self.stop)();
        }
    }
}

/// Marks the child process of [`kill_update_midway`]; its value is `SOURCE\nDEST\nJOURNAL`.
const CHILD_ENV: &str = "VOLBACK_TEST_KILLED_UPDATE_CHILD";
/// What the child prints once it has stopped for good.
const CHILD_STOPPED: &str = "volback-test: update stopped";

/// The child of [`kill_update_midway`] (does nothing in a normal test run): `copy --update`
/// through the library, stopped for good once the copy journal records written blocks.
#[test]
fn killed_update_child() {
    let Ok(paths) = std::env::var(CHILD_ENV) else {
        return;
    };
    let [src, dest, journal]: [&str; 3] = paths
        .split('\n')
        .collect::<Vec<_>>()
        .try_into()
        .expect("SOURCE\nDEST\nJOURNAL");
    let gate = Gate::new(
        |_| {
            volback::copy::journal::Journal::open(Path::new(journal))
                .ok()
                .flatten()
                .is_some_and(|(_, _, replay)| replay.stats.blocks_written > 0)
        },
        || {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{CHILD_STOPPED}").unwrap();
            out.flush().unwrap();
            loop {
                std::thread::park();
            }
        },
    );
    let opts = CopyOptions {
        checkpoint_interval: Duration::ZERO,
        ..CopyOptions::default()
    };
    let source = Source::open(Path::new(src)).unwrap();
    let r = volback::copy::update(&source, Path::new(dest), &opts, &gate);
    panic!(
        "the update ended before it was stopped: {:?}",
        r.map(|r| r.stats)
    );
}

/// Runs `copy --update` in a child process (this test binary running
/// [`killed_update_child`]) that stops once its journal records written blocks, and kills
/// it with SIGKILL.
fn kill_update_midway(src: &Path, dest: &Path, journal: &Path) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "copy::killed_update_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, [p(src), p(dest), p(journal)].join("\n"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Not piped: a child blocked on a full stderr pipe would never reach the gate.
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child test");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let stopped = stdout
        .lines()
        .map_while(Result::ok)
        // Not a whole line: libtest prints "test NAME ... " before the test's own output.
        .any(|line| line.contains(CHILD_STOPPED));
    if !stopped {
        let _ = child.kill();
        let status = child.wait().unwrap();
        panic!("the child ended ({status:?}) before it stopped (its stderr is above)");
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    let (_, _, replay) = volback::copy::journal::Journal::open(journal)
        .unwrap()
        .expect("the journal of the killed update");
    assert!(replay.stats.blocks_written > 0, "{replay:?}");
}

#[test]
fn killed_update_is_refused_as_incomplete_then_finished() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (src, _) = ext4_source(&t, "src.img", 5);
    let dest = t.join("copy.img");
    copy_json(&["--format", "raw", p(&src), p(&dest)]);
    // Many changed blocks: a big new file.
    let mnt = Mount::new(&src, &t.join("m"), Some("loop"));
    std::fs::write(
        mnt.dir.join("new.bin"),
        Rng::new(6).bytes(12 * MIB as usize),
    )
    .unwrap();
    let files = tree_hashes(&mnt.dir);
    mnt.unmount();

    let journal = t.join("copy.img.volback-copy.journal");
    kill_update_midway(&src, &dest, &journal);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.join("copy.img.volback-copy.json")).unwrap())
            .unwrap();
    assert_eq!(meta["state"], "updating", "{meta}");

    // Readers refuse it.
    for args in [
        vec!["verify", p(&dest)],
        vec!["restore", p(&dest), p(&t.join("r.img"))],
    ] {
        volback_code(&args, 1).stderr_has(&["incomplete", "copy --update"]);
    }
    assert!(!t.join("r.img").exists());

    let r = copy_json(&["--update", p(&src), p(&dest)]);
    assert_eq!(r["resumed"], true, "{r}");
    assert!(
        ju64(&r, "/stats/blocks_written") > ju64(&r, "/blocks_written"),
        "the first run's writes count in the total: {r}"
    );
    assert!(!journal.exists(), "journal removed at the end");
    let expected = backup_and_restore(&t, &src, "after");
    assert_identical(&dest, "raw", &expected, "raw");
    mount_and_check(&t, &dest, &files);
    volback_ok(&["verify", p(&dest)]).stdout_has(&["no problems"]);
}

#[test]
fn interrupted_new_copy_is_finished_by_update() {
    let t = TestDir::new();
    let src = t.join("src.img");
    // Much more than the scan can hold in flight (its buffer pool and staging buffers, about
    // 21 MiB at 64 KiB blocks), so that blocks remain unread when the copy is cancelled.
    random_file(&src, 48 * MIB + 5, 7);
    let dest = t.join("bin");
    let journal = dest.join("volback-copy.journal");
    // A new copy, interrupted (as by Ctrl-C) once 1 MiB is done…
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = CopyOptions {
        format: CopyFormat::Bin,
        block_size: Some(64 * KIB as u32),
        threads: 2,
        checkpoint_interval: Duration::ZERO,
        cancel: Some(cancel.clone()),
        ..CopyOptions::default()
    };
    let gate = Gate::new(|done| done >= MIB, || cancel.store(true, Ordering::SeqCst));
    let source = Source::open(&src).unwrap();
    let e = volback::copy::copy(&source, &dest, &opts, &gate).unwrap_err();
    assert!(
        matches!(e, volback::Error::Interrupted { checkpointed: true }),
        "{e}"
    );
    drop(source);
    assert!(journal_has_records(&journal));
    volback_code(&["verify", p(&dest)], 1).stderr_has(&["incomplete"]);
    volback_code(&["copy", "--format", "bin", p(&src), p(&dest)], 1)
        .stderr_has(&["incomplete", "copy --update"]);
    // …is finished by copy --update.
    let r = copy_json(&["--update", p(&src), p(&dest)]);
    assert_eq!(r["resumed"], true, "{r}");
    let out = t.join("out.img");
    volback_ok(&["restore", p(&dest), p(&out)]);
    assert_eq!(sha256_file(&out), sha256_file(&src));
}

#[test]
fn damaged_copies_give_clear_errors() {
    let t = TestDir::new();
    let src = t.join("src.img");
    random_file(&src, 3 * MIB + 1000, 8);
    let fresh = |name: &str| -> PathBuf {
        let dest = t.join(name);
        copy_json(&["--format", "bin", "--slice-size", "1M", p(&src), p(&dest)]);
        dest
    };
    let target = t.join("target.img");

    // Corrupt metadata.
    let d = fresh("meta");
    std::fs::write(
        d.join("volback-copy.json"),
        b"{\"format\": \"volback-copy\", \"vers",
    )
    .unwrap();
    volback_code(&["verify", p(&d)], 1).stderr_has(&["unusable", "json"]);
    volback_code(&["restore", p(&d), p(&target)], 1).stderr_has(&["unusable"]);
    volback_code(&["copy", "--update", p(&src), p(&d)], 1).stderr_has(&["unusable"]);

    // Unknown version.
    let d = fresh("version");
    let m = std::fs::read_to_string(d.join("volback-copy.json")).unwrap();
    std::fs::write(
        d.join("volback-copy.json"),
        m.replace("\"version\": 1", "\"version\": 9"),
    )
    .unwrap();
    volback_code(&["verify", p(&d)], 1).stderr_has(&["version 9"]);

    // A missing slice.
    let d = fresh("missing");
    std::fs::remove_file(d.join("1048576.1048576.copydata.bin")).unwrap();
    volback_code(&["verify", p(&d)], 1).stderr_has(&["1048576.1048576.copydata.bin", "missing"]);
    volback_code(&["restore", p(&d), p(&target)], 1).stderr_has(&["missing"]);

    // A shortened slice.
    let d = fresh("short");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("2097152.1048576.copydata.bin"))
        .unwrap();
    f.set_len(1000).unwrap();
    volback_code(&["verify", p(&d)], 1).stderr_has(&["2097152.1048576.copydata.bin", "truncated"]);

    // A damaged hash list.
    let d = fresh("hashes");
    let h = d.join("volback-copy.sha256");
    let mut b = std::fs::read(&h).unwrap();
    b[64 + 5] ^= 1;
    std::fs::write(&h, &b).unwrap();
    volback_code(&["verify", p(&d)], 1).stderr_has(&["hash list", "checksum"]);

    // A changed data byte: verify names the block, restore refuses to write it.
    let d = fresh("data");
    write_at(&d.join("1048576.1048576.copydata.bin"), 300_000, b"X");
    let v = volback_code(&["verify", "--json", p(&d)], 1).json();
    assert_eq!(ju64(&v, "/bad_blocks"), 1, "{v}");
    assert_eq!(ju64(&v, "/bad/0/offset"), MIB + BS, "{v}");
    volback_code(&["restore", p(&d), p(&target)], 1).stderr_has(&["does not match", "sha-256"]);

    // Not a copy at all.
    volback_code(&["restore", p(&src), p(&target)], 2).stderr_has(&["not a volback copy"]);
}

#[test]
fn export_equals_restore_of_the_snapshot() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (src, files) = ext4_source(&t, "src.img", 9);
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let b = backup_json(&src, &repo, &[]);
    let snap = jstr(&b, "/snapshot").to_string();
    let restored = t.join("restored.img");
    restore(&repo, &snap, &restored);

    let raw = t.join("export.img");
    let r = volback_ok(&[
        "export",
        "--json",
        "--format",
        "raw",
        p(&repo),
        &snap,
        p(&raw),
    ])
    .json();
    assert_eq!(r["snapshot"], snap.as_str(), "{r}");
    assert_identical(&raw, "raw", &restored, "raw");
    assert!(
        allocated_bytes(&raw) < SIZE / 2,
        "unstored blocks are holes"
    );
    mount_and_check(&t, &raw, &files);

    let bin = t.join("export.bin");
    let r = volback_ok(&[
        "export",
        "--json",
        "--format",
        "bin",
        "--slice-size",
        "16M",
        p(&repo),
        "latest",
        p(&bin),
    ])
    .json();
    let joined = t.join("joined.img");
    concat(&files_of(&r), &joined);
    assert_identical(&joined, "raw", &restored, "raw");
    volback_ok(&["verify", p(&bin)]).stdout_has(&["no problems"]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bin.join("volback-copy.json")).unwrap()).unwrap();
    assert_eq!(meta["snapshot"]["id"], snap.as_str(), "{meta}");
    assert_eq!(meta["state"], "complete");

    for format in ["vhd", "vhd-dynamic", "vhdx", "qcow2"] {
        let out = t.join(&format!("export.{format}"));
        volback_ok(&["export", "--format", format, p(&repo), &snap, p(&out)]);
        assert_identical(&out, qemu_format(format), &restored, "raw");
        volback_ok(&["verify", p(&out)]).stdout_has(&["no problems"]);
    }
}

/// qemu-img's name for a copy format.
fn qemu_format(format: &str) -> &'static str {
    match format {
        "vhd" | "vhd-dynamic" => "vpc",
        "vhdx" => "vhdx",
        "qcow2" => "qcow2",
        _ => "raw",
    }
}

/// The image as a raw file, converted by qemu-img.
fn to_raw(image: &Path, format: &str, out: &Path) {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            qemu_format(format),
            "-O",
            "raw",
            p(image),
            p(out),
        ],
    );
}

#[test]
fn image_copies_equal_the_source_update_in_place_and_survive_kill_9() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let (pristine, _) = ext4_source(&t, "pristine.img", 11);
    let src = t.join("src.img");
    let pristine_restored = backup_and_restore(&t, &pristine, "pristine");
    for (i, format) in ["vhd", "vhd-dynamic", "vhdx", "qcow2"]
        .into_iter()
        .enumerate()
    {
        // Each format starts from the same filesystem (the changes below would fill it).
        run_ok("cp", &["--sparse=always", p(&pristine), p(&src)]);
        let qemu = qemu_format(format);
        let expected = &pristine_restored;

        // Every block: identical to the source; through the map: equal to a restore.
        let all = t.join(&format!("all.{format}"));
        copy_json(&["--format", format, "--all-blocks", p(&src), p(&all)]);
        assert_identical(&all, qemu, &src, "raw");
        let dest = t.join(&format!("copy.{format}"));
        let r = copy_json(&["--format", format, p(&src), p(&dest)]);
        assert_eq!(r["format"], format, "{r}");
        assert_identical(&dest, qemu, expected, "raw");
        if qemu != "vpc" {
            run_ok("qemu-img", &["check", "-q", "-f", qemu, p(&dest)]);
        }
        volback_ok(&["verify", p(&dest)]).stdout_has(&["no problems"]);
        let back = t.join(&format!("back.{format}"));
        volback_ok(&["restore", p(&dest), p(&back)]);
        assert_identical(&back, "raw", expected, "raw");

        // Update: exactly the changed blocks are rewritten.
        let before = t.join(&format!("before.{format}.raw"));
        to_raw(&dest, format, &before);
        change_files(&t, &src, 20 + i as u64);
        let r = copy_json(&["--update", p(&src), p(&dest)]);
        let after = t.join(&format!("after.{format}.raw"));
        to_raw(&dest, format, &after);
        let changed = differing_blocks(&before, &after);
        assert!(changed > 0);
        assert_eq!(
            ju64(&r, "/blocks_written") + ju64(&r, "/blocks_zeroed"),
            changed,
            "{format}: {r}"
        );
        let expected = backup_and_restore(&t, &src, &format!("{format}.after"));
        assert_identical(&dest, qemu, &expected, "raw");
        if qemu != "vpc" {
            run_ok("qemu-img", &["check", "-q", "-f", qemu, p(&dest)]);
        }

        // Killed midway, refused, finished.
        let mnt = Mount::new(&src, &t.join("m"), Some("loop"));
        std::fs::write(
            mnt.dir.join(format!("big{i}.bin")),
            Rng::new(30 + i as u64).bytes(8 * MIB as usize),
        )
        .unwrap();
        mnt.unmount();
        let journal = t.join(&format!("copy.{format}.volback-copy.journal"));
        kill_update_midway(&src, &dest, &journal);
        volback_code(&["verify", p(&dest)], 1).stderr_has(&["incomplete"]);
        let r = copy_json(&["--update", p(&src), p(&dest)]);
        assert_eq!(r["resumed"], true, "{r}");
        let expected = backup_and_restore(&t, &src, &format!("{format}.killed"));
        assert_identical(&dest, qemu, &expected, "raw");
        if qemu != "vpc" {
            run_ok("qemu-img", &["check", "-q", "-f", qemu, p(&dest)]);
        }
        volback_ok(&["verify", p(&dest)]).stdout_has(&["no problems"]);
    }
}

#[test]
fn copy_refuses_a_read_write_mounted_source_unless_allowed() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = t.join("src.img");
    sparse_file(&img, 16 * MIB);
    mkfs_ext4(&img);
    let lo = Loop::attach(&img, false);
    let mnt = Mount::new(lo.path(), &t.join("m"), None);
    let dest = t.join("copy.img");
    volback_code(&["copy", "--format", "raw", p(lo.path()), p(&dest)], 1)
        .stderr_has(&["mounted read-write", "--allow-mounted"]);
    assert!(!dest.exists(), "nothing written when refused");
    copy_json(&["--format", "raw", "--allow-mounted", p(lo.path()), p(&dest)]);
    mnt.unmount();
    drop(lo);
    volback_ok(&["verify", p(&dest)]);
}

#[test]
fn mount_shows_a_copy_and_its_files() {
    if !require_root_loop_and_fuse() {
        return;
    }
    let t = TestDir::new();
    let (src, files) = ext4_source(&t, "src.img", 12);
    for format in ["bin", "qcow2"] {
        let dest = t.join(&format!("copy.{format}"));
        copy_json(&["--format", format, p(&src), p(&dest)]);
        let view = t.join(&format!("view.{format}"));
        let got = t.join(&format!("files.{format}"));
        std::fs::create_dir_all(&view).unwrap();
        let info = volback_ok(&["mount", "--json", "--files", p(&got), p(&dest), p(&view)]).json();
        assert_eq!(info["images"].as_array().map(Vec::len), Some(1), "{info}");
        assert_eq!(
            std::fs::metadata(view.join("volume.img")).unwrap().len(),
            SIZE
        );
        assert_eq!(tree_hashes(&got), files, "{format}");
        volback_ok(&["umount", p(&view)]);
        assert!(
            !mountinfo_mentions(p(&view)),
            "{format}: the view is still mounted"
        );
    }
    // An incomplete copy is refused.
    let dest = t.join("copy.bin");
    let meta = dest.join("volback-copy.json");
    let m = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, m.replace("\"complete\"", "\"updating\"").replace(
        "\"update\": null",
        "\"update\": {\"journal\": \"volback-copy.journal\", \"id\": \"x\", \"base\": \"hashes\"}",
    ))
    .unwrap();
    let view = t.join("view.incomplete");
    std::fs::create_dir_all(&view).unwrap();
    volback_code(&["mount", p(&dest), p(&view)], 1).stderr_has(&["incomplete"]);
}

#[test]
fn volumes_ending_inside_a_sector_round_trip_in_every_format() {
    let t = TestDir::new();
    let src = t.join("src.img");
    let size = 3 * MIB + 1001;
    random_file(&src, size, 13);
    write_at(&src, MIB, &vec![0u8; MIB as usize]);
    for format in ["raw", "bin", "vhd", "vhd-dynamic", "vhdx", "qcow2"] {
        let dest = t.join(&format!("copy.{format}"));
        copy_json(&["--format", format, "--block-size", "64K", p(&src), p(&dest)]);
        let out = t.join(&format!("out.{format}"));
        volback_ok(&["restore", p(&dest), p(&out)]);
        assert_eq!(sha256_file(&out), sha256_file(&src), "{format}");
        volback_ok(&["verify", p(&dest)]).stdout_has(&["no problems"]);
    }
    // The last, short block changes: an update rewrites it.
    write_at(&src, size - 10, b"0123456789");
    for format in ["raw", "bin", "vhd", "vhd-dynamic", "vhdx", "qcow2"] {
        let dest = t.join(&format!("copy.{format}"));
        let r = copy_json(&["--update", p(&src), p(&dest)]);
        assert_eq!(ju64(&r, "/blocks_written"), 1, "{format}: {r}");
        let out = t.join(&format!("out2.{format}"));
        volback_ok(&["restore", p(&dest), p(&out)]);
        assert_eq!(sha256_file(&out), sha256_file(&src), "{format}");
    }
}

#[test]
fn copy_usage_errors_exit_2() {
    let t = TestDir::new();
    let src = t.join("src.img");
    random_file(&src, MIB, 14);
    let d = p(&t.join("d")).to_string();
    for args in [
        vec!["copy", p(&src), &d],
        vec!["copy", "--format", "zip", p(&src), &d],
        vec!["copy", "--update", "--slice-size", "1M", p(&src), &d],
        vec!["copy", "--format", "raw", p(&src)],
        vec!["export", p(&src), "latest", &d],
    ] {
        let r = volback_code(&args, 2);
        assert!(!r.stderr.is_empty(), "{args:?}");
    }
    assert!(!t.join("d").exists());
}
