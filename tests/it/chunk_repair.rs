//! Damaged repositories heal instead of passing damage on (issue 11, items 3, 6 and 7): a
//! backup stores again a block whose existing chunk is missing or fails the cheap header
//! check (parent references, change tracking, pack slots), `verify` moves damaged chunks aside
//! so that the next backup re-stores them, `latest` and id prefixes skip unreadable snapshot
//! files, and a source named by different paths is one volume.

use crate::util::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The chunk file (a pack with the default settings) that holds block `block` of `snap`.
fn chunk_file_of(repo: &Path, snap: &str, block: u64) -> PathBuf {
    chunk_of_block(repo, snap, block).1
}

/// Restores `snap` and asserts that it equals `expect` bit for bit.
fn assert_restores(repo: &Path, snap: &str, expect: &Path, out: &Path) {
    let _ = std::fs::remove_file(out);
    restore(repo, snap, out);
    assert_eq!(
        sha256_file(out),
        sha256_file(expect),
        "restore of {snap} differs from {}",
        expect.display()
    );
}

/// Backs up a 64 MiB file of random data, damages one chunk with `damage`, backs up again,
/// and checks that the second backup stored the block again (instead of referring to the
/// damaged chunk) and that both snapshots restore bit-exact: the first one too, because the
/// chunk was stored again under the same content-addressed name.
fn damaged_parent_chunk_is_stored_again(damage: impl Fn(&Path)) -> String {
    let t = TestDir::new();
    let src = t.join("v.img");
    let repo = t.join("repo");
    random_file(&src, 64 * MIB, 311);
    init_repo(&repo, &[]);
    let full = backup_json(&src, &repo, &[]);
    let first = jstr(&full, "/snapshot").to_string();
    damage(&chunk_file_of(&repo, &first, 100));

    let args = ["backup", "--json", p(&src), p(&repo)];
    let r = volback_ok(&args);
    let incr = r.json();
    assert_eq!(incr["parent"], full["snapshot"], "{incr}");
    assert!(
        ju64(&incr, "/new_chunks") >= 1,
        "nothing stored again: {incr}"
    );
    let out = t.join("out.img");
    assert_restores(&repo, "latest", &src, &out);
    assert_restores(&repo, &first, &src, &out);
    volback_ok(&["verify", "--read-data", p(&repo)]);
    // A third backup finds everything in place again.
    let again = volback_ok(&args);
    assert_eq!(ju64(&again.json(), "/new_chunks"), 0, "{}", again.stdout);
    // Healing is not silent: the run that stored the chunk again said so, the next did not.
    assert!(
        r.stderr.contains("missing or damaged") && r.stderr.contains("verify --read-data"),
        "the backup must name the damage it repaired: {}",
        r.stderr
    );
    assert!(
        !again.stderr.contains("missing or damaged"),
        "{}",
        again.stderr
    );
    r.stderr
}

/// Item 3's reproduction: the magic bytes of one pack broken between two backups.
#[test]
fn parent_chunk_with_broken_magic_is_stored_again_and_old_snapshot_repaired() {
    damaged_parent_chunk_is_stored_again(|chunk| write_at(chunk, 0, b"JUNK"));
}

/// The same with the parent's chunk deleted, and with it truncated.
#[test]
fn missing_or_truncated_parent_chunk_is_stored_again() {
    damaged_parent_chunk_is_stored_again(|chunk| std::fs::remove_file(chunk).unwrap());
    damaged_parent_chunk_is_stored_again(|chunk| {
        let f = std::fs::OpenOptions::new().write(true).open(chunk).unwrap();
        f.set_len(1000).unwrap();
    });
}

/// The repair procedure of docs/REPAIR.md: damage that the cheap check cannot see (a flipped
/// byte inside a pack) is found by `verify --read-data`, which moves the chunk aside (never
/// deleting it); the next backup of the source stores it again, which repairs the older
/// snapshot, and `verify --read-data` is clean again.
#[test]
fn verify_moves_damaged_chunk_aside_and_next_backup_repairs_it() {
    let t = TestDir::new();
    let src = t.join("v.img");
    let repo = t.join("repo");
    random_file(&src, 64 * MIB, 312);
    init_repo(&repo, &[]);
    let full = backup_json(&src, &repo, &[]);
    let first = jstr(&full, "/snapshot").to_string();
    let chunk = chunk_file_of(&repo, &first, 37);
    let mut bytes = std::fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&chunk, &bytes).unwrap();
    let name = chunk.file_name().unwrap().to_string_lossy().into_owned();

    // The cheap check passes such a chunk: without verify, a backup would reuse it.
    let v = volback_code(&["verify", "--read-data", p(&repo)], 1);
    v.stdout_has(&[&name[..12]]);
    assert!(
        v.all_output().contains("moved aside"),
        "verify did not say where the chunk went: {}",
        v.all_output()
    );
    let aside = chunk.with_file_name(format!("{name}.bad"));
    assert!(!chunk.exists(), "the damaged chunk is still in place");
    assert_eq!(
        std::fs::read(&aside).expect("the damaged chunk is kept as <id>.bad"),
        bytes
    );
    // Until the next backup, the chunk is reported missing.
    volback_code(&["verify", p(&repo)], 1);

    let incr = backup_json(&src, &repo, &[]);
    assert!(ju64(&incr, "/new_chunks") >= 1, "{incr}");
    let out = t.join("out.img");
    assert_restores(&repo, &first, &src, &out);
    assert_restores(&repo, "latest", &src, &out);
    volback_ok(&["verify", "--read-data", p(&repo)]);
    assert!(
        aside.exists(),
        "verify or backup deleted the set-aside copy"
    );
}

/// Change tracking takes unchanged blocks from the parent without reading them; a block
/// whose parent chunk was deleted must be read and stored again instead. On a real ext4
/// filesystem: the block chosen is one that change tracking knows (asked through the
/// library), whatever the filesystem's allocation.
#[test]
fn change_tracking_does_not_inherit_a_missing_parent_chunk() {
    if !require_root_and_loop() {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    let mnt = t.join("mnt");
    sparse_file(&img, 64 * MIB);
    init_repo(&repo, &[]);
    run_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            p(&img),
        ],
    );
    let mut rng = Rng::new(313);
    let m = Mount::new(&img, &mnt, Some("loop"));
    for i in 0..4 {
        std::fs::write(m.dir.join(format!("f{i}.bin")), rng.bytes(3 * MIB as usize)).unwrap();
    }
    run_ok("sync", &[]);
    // Change tracking trusts inodes changed a few seconds before the filesystem's last write.
    std::thread::sleep(std::time::Duration::from_secs(5));
    m.unmount();

    let full = backup_json(&img, &repo, &[]);
    let first = jstr(&full, "/snapshot").to_string();
    // An incremental of the unchanged volume takes blocks unread: the control.
    let control = backup_json(&img, &repo, &[]);
    let control_unread = ju64(&control, "/unread_blocks");
    assert!(control_unread > 0, "change tracking unused: {control}");
    let control_out = t.join("control.img");
    restore(&repo, jstr(&control, "/snapshot"), &control_out);

    // A block that change tracking knows, and its chunk.
    let known_block = {
        let r = volback::repo::Repository::open(&repo).unwrap();
        let snap = r.open_snapshot(jstr(&control, "/snapshot")).unwrap();
        let base = volback::repo::reader::SnapshotVolume::new(snap, r.chunks().clone());
        let source = volback::source::Source::open(&img).unwrap();
        let known =
            volback::job::track_changes(&source, &base, 256 * KIB, &[], &volback::progress::Silent)
                .unwrap()
                .expect("change tracking");
        (0..known.block_count())
            .find(|&b| {
                known.is_used(b) && block_ref(&repo, jstr(&control, "/snapshot"), b).is_data()
            })
            .expect("a known data block")
    };
    let chunk = chunk_file_of(&repo, jstr(&control, "/snapshot"), known_block);
    std::fs::remove_file(&chunk).unwrap();

    let r = volback_ok(&["backup", "--json", p(&img), p(&repo)]);
    let incr = r.json();
    assert_eq!(incr["parent"], control["snapshot"], "{incr}");
    assert!(
        ju64(&incr, "/unread_blocks") < control_unread,
        "the block of the missing chunk was taken unread: {incr}"
    );
    assert!(ju64(&incr, "/new_chunks") >= 1, "{incr}");
    r.stderr_has(&["missing or damaged"]);
    let out = t.join("out.img");
    restore(&repo, "latest", &out);
    assert_eq!(sha256_file(&out), sha256_file(&control_out));
    run_ok("e2fsck", &["-fn", p(&out)]);
    // Every snapshot of the repository is complete again.
    volback_ok(&["verify", p(&repo), &first]);
    volback_ok(&["verify", "--read-data", p(&repo)]);
}

/// Item 6: an unreadable snapshot file (a damaged old snapshot, a stray file with a
/// 64-hex-digit name) does not stop `latest`: restore, export and serve use the latest
/// readable snapshot and warn; an id prefix matching one readable snapshot and a stray file
/// names the readable one; verify still reports the unreadable files.
#[test]
fn latest_skips_unreadable_snapshot_files() {
    let t = TestDir::new();
    let src = t.join("v.img");
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    random_file(&src, 2 * MIB, 314);
    let old = backup_json(&src, &repo, &[]);
    random_file(&src, 2 * MIB, 315);
    let new = backup_json(&src, &repo, &[]);
    let new_id = jstr(&new, "/snapshot").to_string();
    // The old snapshot's file truncated; a stray file named like a snapshot that sorts with
    // the new one's first hex digit.
    let old_path = repo.join("snapshots").join(jstr(&old, "/snapshot"));
    let len = std::fs::metadata(&old_path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&old_path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let stray_name = format!("{}{}", &new_id[..1], "0".repeat(63));
    let stray_name = if stray_name == new_id {
        format!("{}{}", &new_id[..1], "1".repeat(63))
    } else {
        stray_name
    };
    std::fs::write(repo.join("snapshots").join(&stray_name), b"not a snapshot").unwrap();

    let out = t.join("out.img");
    let r = volback_ok(&["restore", p(&repo), "latest", p(&out)]);
    r.stderr_has(&["skipping unreadable snapshot", &stray_name]);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    std::fs::remove_file(&out).unwrap();
    let r = volback_ok(&["restore", p(&repo), &format!("latest:{}", p(&src)), p(&out)]);
    r.stderr_has(&["skipping unreadable snapshot"]);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    std::fs::remove_file(&out).unwrap();
    // A one-digit prefix matches the new snapshot and the stray file.
    let r = volback_ok(&["restore", p(&repo), &new_id[..1], p(&out)]);
    r.stderr_has(&["skipping unreadable snapshot"]);
    assert_eq!(sha256_file(&out), sha256_file(&src));

    let exported = t.join("export.img");
    volback_ok(&[
        "export",
        p(&repo),
        "latest",
        p(&exported),
        "--format",
        "raw",
    ]);
    assert_eq!(sha256_file(&exported), sha256_file(&src));

    // serve: it resolves `latest` and prints its URI (then it is stopped).
    let sock = t.join("nbd.sock");
    let mut child = Command::new(VOLBACK)
        .args(["serve", p(&repo), "latest", "--nbd", p(&sock)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start volback serve");
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    read.unwrap();
    assert!(line.contains("nbd"), "serve printed no URI: {line:?}");

    let v = volback_code(&["verify", p(&repo)], 1);
    assert!(
        v.all_output().contains(&stray_name[..12])
            && v.all_output().contains(&jstr(&old, "/snapshot")[..12]),
        "verify does not report the unreadable files: {}",
        v.all_output()
    );
}

/// Item 7: a volume without a filesystem UUID, backed up as `../x/v.img` from one directory,
/// as `/abs/x/v.img` and through a symbolic link, is one volume: one parent chain and one
/// volume lock.
#[test]
fn relative_absolute_and_symlinked_paths_are_one_volume() {
    let t = TestDir::new();
    let x = t.join("x");
    let work = t.join("work");
    std::fs::create_dir_all(&x).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let src = x.join("v.img");
    random_file(&src, 4 * MIB, 316);
    let link = t.join("link.img");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let repo = t.join("repo");
    init_repo(&repo, &[]);

    let rel = Command::new(VOLBACK)
        .current_dir(&work)
        .args(["backup", "--json", "../x/v.img", p(&repo)])
        .output()
        .unwrap();
    assert!(
        rel.status.success(),
        "{}",
        String::from_utf8_lossy(&rel.stderr)
    );
    let first: serde_json::Value = serde_json::from_slice(&rel.stdout).unwrap();
    let abs = backup_json(&src, &repo, &[]);
    assert_eq!(abs["parent"], first["snapshot"], "{abs}");
    assert_eq!(ju64(&abs, "/new_chunks"), 0, "{abs}");
    let linked = backup_json(&link, &repo, &[]);
    assert_eq!(linked["parent"], abs["snapshot"], "{linked}");
    let locks: Vec<_> = std::fs::read_dir(repo.join("journals"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".lock"))
        .collect();
    assert_eq!(locks.len(), 1, "one volume, one lock: {locks:?}");
    // The recorded path is the canonical one, and `latest:` finds it by any name.
    let out = t.join("out.img");
    restore(&repo, &format!("latest:{}", p(&link)), &out);
    assert_eq!(sha256_file(&out), sha256_file(&src));
}
