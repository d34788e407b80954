//! Damaged repositories heal instead of passing damage on (issue 11, items 3, 6 and 7; on the
//! format-2 layout of issue 13): a backup stores again the blocks whose blobs are in a pack
//! that is missing or that `verify --read-data` set aside (parent references, change
//! tracking), which also makes the older snapshots readable again; `latest` and id prefixes
//! skip unreadable snapshot files; and a source named by different paths is one volume.

use crate::util::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

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

/// The pack holding block `block` of `snap`, checked to hold data blobs only (so that damage
/// to it leaves the snapshot's tree readable).
fn data_pack_of(repo: &Path, snap: &str, block: u64) -> BlockLoc {
    let loc = locate_block(repo, snap, block);
    assert!(
        !pack_has_tree_blobs(&loc.pack_path),
        "block {block} shares its pack with tree blobs: pick another block"
    );
    loc
}

/// Backs up a 64 MiB file of random data, damages the pack holding one block with `damage`
/// (running `verify --read-data` first when `via_verify`: damage inside an existing file is
/// found by reading it), backs up again, and checks that the second backup stored those
/// blocks again (instead of referring to blobs of the missing or set-aside pack) and that both
/// snapshots restore bit-exact: the first one too, because the blobs were stored again under
/// the same content-addressed ids, in new packs.
fn damaged_parent_pack_is_stored_again(damage: impl Fn(&Path), via_verify: bool) -> String {
    let t = TestDir::new();
    let src = t.join("v.img");
    let repo = t.join("repo");
    random_file(&src, 64 * MIB, 311);
    init_repo(&repo, &[]);
    let full = backup_json(&src, &repo, &[]);
    let first = jstr(&full, "/snapshot").to_string();
    let loc = data_pack_of(&repo, &first, 100);
    damage(&loc.pack_path);
    if via_verify {
        volback_code(&["verify", "--read-data", p(&repo)], 1).stdout_has(&[&loc.pack]);
        assert!(
            !loc.pack_path.exists(),
            "the damaged pack is still in place"
        );
        assert_eq!(bad_packs(&repo).len(), 1, "set aside as <id>.bad");
    }
    // Blobs of the pack that no existing pack holds (verify stores again what it can still
    // read of a damaged pack before setting it aside).
    let idx = read_index(&repo);
    let lost = idx.packs[&loc.pack]
        .iter()
        .filter(|e| {
            idx.locations(&e.id)
                .iter()
                .all(|(pk, _)| !pack_path(&repo, pk).exists())
        })
        .count();
    let out = t.join("out.img");
    if lost > 0 {
        // The old snapshot needs the pack: it cannot be restored now, with a clear error.
        volback_code(&["restore", p(&repo), &first, p(&out)], 1).stderr_has(&[&loc.pack[..12]]);
    }

    let args = ["backup", "--json", p(&src), p(&repo)];
    let r = volback_ok(&args);
    let incr = r.json();
    assert_eq!(incr["parent"], full["snapshot"], "{incr}");
    if lost > 0 {
        assert!(
            ju64(&incr, "/new_chunks") >= 1,
            "nothing stored again: {incr}"
        );
    } else {
        assert_eq!(ju64(&incr, "/new_bytes"), 0, "{incr}");
    }
    assert!(
        ju64(&incr, "/new_bytes") < 64 * MIB / 2,
        "more than the lost pack stored again: {incr}"
    );
    assert_restores(&repo, "latest", &src, &out);
    assert_restores(&repo, &first, &src, &out);
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);
    // A third backup finds everything in place again.
    let again = volback_ok(&args);
    assert_eq!(ju64(&again.json(), "/new_chunks"), 0, "{}", again.stdout);
    // Healing is not silent: the run that stored the blobs again said so, the next did not.
    assert!(
        lost == 0
            || (r.stderr.contains("missing or damaged") && r.stderr.contains("verify --read-data")),
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

/// Item 3's reproduction on format 2: the pack holding a block of the parent deleted between
/// two backups.
#[test]
fn missing_parent_pack_is_stored_again_and_old_snapshot_repaired() {
    damaged_parent_pack_is_stored_again(|pack| std::fs::remove_file(pack).unwrap(), false);
}

/// The same with the pack's magic bytes broken, and with it truncated: `verify --read-data`
/// sets it aside, then the backup stores its blocks again.
#[test]
fn broken_or_truncated_parent_pack_is_set_aside_and_stored_again() {
    damaged_parent_pack_is_stored_again(|pack| write_at(pack, 0, b"JUNK"), true);
    damaged_parent_pack_is_stored_again(
        |pack| {
            let f = std::fs::OpenOptions::new().write(true).open(pack).unwrap();
            f.set_len(1000).unwrap();
        },
        true,
    );
}

/// The repair procedure of docs/REPAIR.md: damage inside a frame (a flipped byte; the pack's
/// table and length are intact) is found by `verify --read-data`, which sets the pack aside
/// as `<id>.bad` (never deleting it) and names the pack, the blob and the snapshots; the
/// next backup of the source stores the blocks again, which repairs the older snapshot, and
/// `verify --read-data` is clean again.
#[test]
fn verify_sets_damaged_pack_aside_and_next_backup_repairs_it() {
    let t = TestDir::new();
    let src = t.join("v.img");
    let repo = t.join("repo");
    random_file(&src, 64 * MIB, 312);
    // Plain: the test damages one blob inside a raw frame.
    init_repo(&repo, &["--no-encryption"]);
    let full = backup_json(&src, &repo, &[]);
    let first = jstr(&full, "/snapshot").to_string();
    let loc = data_pack_of(&repo, &first, 4000);
    // Without --read-data, verify does not read packs: the damage is not seen.
    corrupt_frame(&loc.pack_path, &loc.entry);
    let bytes = std::fs::read(&loc.pack_path).unwrap();
    volback_ok(&["verify", p(&repo)]);
    // A restore reads the blob and checks its hash: a clear error naming the blob and the
    // pack, never zeros or garbage in its place.
    let out = t.join("out.img");
    volback_code(&["restore", p(&repo), &first, p(&out)], 1)
        .stderr_has(&[&loc.blob[..12], &loc.pack[..12]]);
    assert!(!out.exists(), "a failed restore left its file");

    let v = volback_code(&["verify", "--read-data", p(&repo)], 1);
    v.stdout_has(&[&loc.pack, &loc.blob, &first[..12]]);
    let aside = loc.pack_path.with_file_name(format!("{}.bad", loc.pack));
    assert!(
        !loc.pack_path.exists(),
        "the damaged pack is still in place"
    );
    assert_eq!(
        std::fs::read(&aside).expect("the damaged pack is kept as <id>.bad"),
        bytes
    );
    // Until the next backup, the pack is reported missing, with the snapshot that needs it.
    volback_code(&["verify", p(&repo)], 1).stdout_has(&[&loc.pack, &first[..12]]);
    volback_code(&["restore", p(&repo), &first, p(&out)], 1)
        .stderr_has(&[&loc.blob[..12], &loc.pack[..12]]);
    assert!(!out.exists(), "a failed restore left its file");

    let r = volback_ok(&["backup", "--json", p(&src), p(&repo)]);
    let incr = r.json();
    assert!(ju64(&incr, "/new_chunks") >= 1, "{incr}");
    r.stderr_has(&["missing or damaged"]);
    assert_restores(&repo, &first, &src, &out);
    assert_restores(&repo, "latest", &src, &out);
    volback_ok(&["verify", "--read-data", p(&repo)]).stdout_has(&["no problems"]);
    assert!(
        aside.exists(),
        "verify or backup deleted the set-aside copy"
    );
}

/// Change tracking takes unchanged blocks from the parent without reading them; a block
/// whose parent blob is in a deleted pack must be read and stored again instead. On a real
/// ext4 filesystem: the block chosen is one of a file that did not change (which change
/// tracking takes unread), found with `debugfs`, whatever the filesystem's allocation.
#[test]
fn change_tracking_does_not_inherit_a_missing_parent_pack() {
    if !require_root_loop_and(&["debugfs"], false) {
        return;
    }
    let t = TestDir::new();
    let img = t.join("fs.img");
    let repo = t.join("repo");
    let mnt = t.join("mnt");
    sparse_file(&img, 64 * MIB);
    // Small packs: deleting the pack of one block loses a few blocks, not the tree.
    init_repo(&repo, &["--pack-size", "1M"]);
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
    let control_id = jstr(&control, "/snapshot").to_string();
    let control_out = t.join("control.img");
    restore(&repo, &control_id, &control_out);

    // A block in the middle of f2.bin (change tracking takes it unread), and its pack.
    let bmap = run_ok("debugfs", &["-R", "bmap /f2.bin 300", p(&img)]);
    let fs_block: u64 = bmap
        .stdout
        .trim()
        .parse()
        .expect("debugfs bmap prints a number");
    let block = fs_block * 4096 / repo_block_size(&repo);
    let loc = data_pack_of(&repo, &control_id, block);
    std::fs::remove_file(&loc.pack_path).unwrap();

    let r = volback_ok(&["backup", "--json", p(&img), p(&repo)]);
    let incr = r.json();
    assert_eq!(incr["parent"], control["snapshot"], "{incr}");
    assert!(
        ju64(&incr, "/unread_blocks") < control_unread,
        "the blocks of the missing pack were taken unread: {incr}"
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
        .envs(password_env(&[p(&repo)]))
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
        .envs(password_env(&[p(&repo)]))
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
